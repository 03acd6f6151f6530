//! Builds the XDP object (`lb-ebpf`) with Debian's rustc, which ships a prebuilt `core` for
//! `bpfel-unknown-none` (see `scripts/setup.sh`), and hands its path to the crate as
//! `LB_EBPF_OBJ`. The object is shared by every profile under `target/lb-ebpf`.
use std::{env, path::PathBuf, process::Command};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let ebpf = root.join("lb-ebpf");
    for p in [
        "lb-ebpf/src",
        "lb-ebpf/Cargo.toml",
        "lb-ebpf/Cargo.lock",
        "lb-common/src",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    // OUT_DIR is <target>/<profile>/build/<pkg>/out
    let target_dir = out.ancestors().nth(4).unwrap().join("lb-ebpf");
    let rustc = PathBuf::from("/usr/bin/rustc");
    let cargo = PathBuf::from("/usr/bin/cargo");
    if !rustc.exists() || !cargo.exists() {
        panic!("Debian's rustc-web is missing: run `bash scripts/setup.sh` first");
    }
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&ebpf)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "bpfel-unknown-none",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    // Nothing of the host build may leak into the BPF build.
    for (k, _) in env::vars() {
        if k.starts_with("CARGO_") || k.starts_with("RUST") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUSTC", &rustc)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf");
    let status = cmd.status().expect("running /usr/bin/cargo for lb-ebpf");
    if !status.success() {
        panic!("building lb-ebpf failed ({status})");
    }
    let obj = target_dir.join("bpfel-unknown-none/release/lb-ebpf");
    println!("cargo:rustc-env=LB_EBPF_OBJ={}", obj.display());
    // The benchmark tools' object is built by the same command; `bench` loads it by path.
    let bench = target_dir.join("bpfel-unknown-none/release/lb-bench-ebpf");
    println!("cargo:rustc-env=LB_BENCH_EBPF_OBJ={}", bench.display());
}
