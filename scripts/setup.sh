#!/usr/bin/env bash
# Idempotent host setup for building and testing the load balancer on Debian 12.
# Installs Debian's rustc-web (prebuilt `core` for bpfel), LLVM dev files, and
# bpf-linker built against the same LLVM major as Debian's rustc (see shared toolchain notes).
set -euo pipefail

# prometheus: for promtool (the metrics and alert-rule tests); haproxy: the baseline of
# bench/src/bin/health.rs (Debian's package does not start a service where there is no init)
# linux-perf: the throughput suite's profiles; fonts-dejavu-core: the report's charts
# bird2: BGP (the agent announces VIPs with it; the multi-LB testbed's router runs it)
need_pkgs=(rustc-web cargo-web libstd-rust-web-dev-bpf iproute2 ethtool bpftool procps util-linux prometheus haproxy linux-perf fonts-dejavu-core bird2)
missing=()
for p in "${need_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

llvm_major=$(/usr/bin/rustc --version --verbose | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[[ -n "$llvm_major" ]] || { echo "setup: cannot read LLVM version of /usr/bin/rustc" >&2; exit 1; }
if ! dpkg-query -W -f='${Status}' "llvm-${llvm_major}-dev" 2>/dev/null | grep -q "install ok installed"; then
  echo "setup: installing llvm-${llvm_major}-dev" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "llvm-${llvm_major}-dev" >/dev/null
fi

want_linker="0.13.0"
if ! { command -v bpf-linker >/dev/null && bpf-linker --version 2>/dev/null | grep -q "$want_linker"; }; then
  echo "setup: building bpf-linker $want_linker against LLVM $llvm_major" >&2
  LLVM_PREFIX="/usr/lib/llvm-${llvm_major}" cargo install --locked bpf-linker --version "$want_linker" \
    --no-default-features --features "llvm-${llvm_major}" >&2
fi

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
echo "setup: ok (rustc-web LLVM $llvm_major, bpf-linker $want_linker)" >&2
