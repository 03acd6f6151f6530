//! Control-plane costs: building a Maglev ring, installing it into the kernel, a whole
//! reconcile, and what the real agent (`lb agent`) costs at startup, in RSS and in kernel
//! map memory with 100 VIPs x 100 backends. Prints tables; asserts nothing about time.
//!
//! Needs root and the `lb` binary next to this one (`target/release/lb`):
//! `cargo xtask bench` builds the workspace first.
use std::{
    fs,
    os::fd::{AsFd, AsRawFd},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use lb_common::{VipKey, VipMeta, DEFAULT_RING_SIZE, RINGS_PER_VIP};
use lb_tests::netns::{find_lb_bin, temp_dir, veth_pair, Agent, Netns, VethEnd};
use lb_userspace::{
    config::Config,
    dataplane::{addr_raw, port_raw, Dataplane, Sizes, MAP_NAMES},
    maglev::{self, MaglevInput},
    reconcile::{self, Applied},
};

const M: u32 = DEFAULT_RING_SIZE;
const SEED: u32 = 0x1b_5eed;
const MTU: u32 = 1500;

/// Deterministic weights in 1..=100 (splitmix64).
fn weights(n: usize, seed: u64) -> Vec<u32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) % 100) as u32 + 1
        })
        .collect()
}

/// Backend `j` of VIP `k` (both from 0): 198.18.(20+k).(j+1), so 100 VIPs x 100 backends
/// stay inside 198.18.0.0/15 and every backend address is distinct.
fn backend_addr(k: usize, j: usize) -> String {
    format!("198.18.{}.{}", 20 + k, j + 1)
}

/// Median and p99 (nearest rank) of durations, in ms.
fn med_p99(v: &[Duration]) -> (f64, f64) {
    let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let n = ms.len();
    let med = if n % 2 == 1 {
        ms[n / 2]
    } else {
        (ms[n / 2 - 1] + ms[n / 2]) / 2.0
    };
    let p99 = ms[((n as f64 * 0.99).ceil() as usize).clamp(1, n) - 1];
    (med, p99)
}

fn time<T>(f: impl FnOnce() -> Result<T>) -> Result<(Duration, T)> {
    let t = Instant::now();
    let r = f()?;
    Ok((t.elapsed(), r))
}

// ---------------------------------------------------------------------------------------
// 1. Maglev table build
// ---------------------------------------------------------------------------------------

fn maglev_builds() -> Result<()> {
    const RUNS: usize = 100;
    println!("1. Maglev table build (lb_userspace::maglev::build), M = {M}, weights 1..=100, {RUNS} runs");
    println!(
        "{:>9} {:>10} {:>10} {:>18} {:>14}",
        "backends", "median ms", "p99 ms", "target", "Maglev paper"
    );
    for n in [10usize, 100, 1000] {
        let names: Vec<String> = (0..n)
            .map(|i| backend_addr(i / 250, i % 250))
            .collect::<Vec<_>>();
        let w = weights(n, n as u64);
        let input: Vec<MaglevInput> = names
            .iter()
            .zip(&w)
            .map(|(name, &weight)| MaglevInput {
                name: name.as_bytes(),
                weight,
            })
            .collect();
        maglev::build(SEED, &input, M).map_err(|e| anyhow!("{e}"))?; // warm-up
        let mut t = Vec::with_capacity(RUNS);
        for _ in 0..RUNS {
            let (d, table) = time(|| maglev::build(SEED, &input, M).map_err(|e| anyhow!("{e}")))?;
            std::hint::black_box(table);
            t.push(d);
        }
        let (med, p99) = med_p99(&t);
        let (target, paper) = if n == 1000 {
            let verdict = if p99 < 5.0 { "met" } else { "missed" };
            (format!("< 5 ms ({verdict})"), "1.8 ms")
        } else {
            ("-".to_string(), "-")
        };
        println!("{n:>9} {med:>10.3} {p99:>10.3} {target:>18} {paper:>14}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 2. Installing a ring; a whole reconcile
// ---------------------------------------------------------------------------------------

fn ring_of(nbackends: usize) -> Result<Vec<u32>> {
    let names: Vec<String> = (0..nbackends).map(|j| backend_addr(0, j)).collect();
    let w = weights(nbackends, 7);
    let input: Vec<MaglevInput> = names
        .iter()
        .zip(&w)
        .map(|(n, &weight)| MaglevInput {
            name: n.as_bytes(),
            weight,
        })
        .collect();
    maglev::build(SEED, &input, M).map_err(|e| anyhow!("{e}"))
}

/// A config of `nvips` VIPs (198.18.10.(k+1):80/tcp) of `nbackends` backends each, not
/// health-checked (these backends do not exist; `health` measures checking).
fn config_toml(iface: &str, nvips: usize, nbackends: usize) -> String {
    let mut s = format!(
        "[agent]\ninterface = \"{iface}\"\nxdp_mode = \"native\"\nring_size = {M}\n\
         max_vips = {}\nmax_backends = {}\nmax_conns = {}\n\
         gateway_mac = \"02:00:00:00:00:fe\"\nencap_source_v4 = \"198.18.255.0/24\"\n",
        nvips.max(1),
        (nvips * nbackends).max(1),
        1 << 20
    );
    for k in 0..nvips {
        s += &format!(
            "\n[[vip]]\nname = \"vip{k}\"\naddress = \"198.18.10.{}\"\nport = 80\nprotocol = \"tcp\"\n\
             health = {{ kind = \"none\" }}\nbackends = [\n",
            k + 1
        );
        for (j, w) in weights(nbackends, k as u64).into_iter().enumerate() {
            s += &format!(
                "  {{ address = \"{}\", weight = {w} }},\n",
                backend_addr(k, j)
            );
        }
        s += "]\n";
    }
    s
}

/// Time reconciles that each change one backend's weight of VIP 0 (alternating between two
/// values, so every reconcile rebuilds and flips exactly one ring).
fn time_reconciles(nvips: usize, runs: usize) -> Result<(Duration, Vec<Duration>)> {
    let cfg = Config::parse(&config_toml("lo", nvips, 100))?;
    let mut dp = Dataplane::load(Sizes {
        max_vips: cfg.agent.max_vips,
        max_backends: cfg.agent.max_backends,
        max_conns: 1 << 16,
        ring_stride: M,
    })?;
    let mut applied = Applied::default();
    let (first, _) = time(|| reconcile::reconcile(&mut dp, &cfg, &mut applied, MTU))?;
    let mut cfg = cfg;
    let w0 = cfg.vips[0].backends[0].weight;
    let mut t = Vec::with_capacity(runs);
    for i in 0..runs {
        cfg.vips[0].backends[0].weight = if i % 2 == 0 { w0 % 100 + 1 } else { w0 };
        let (d, ch) = time(|| reconcile::reconcile(&mut dp, &cfg, &mut applied, MTU))?;
        if ch.rings_rebuilt != 1 || ch.vips_updated != ["vip0"] {
            bail!("reconcile changed {ch:?}, expected one ring of vip0");
        }
        t.push(d);
    }
    Ok((first, t))
}

fn ring_installs() -> Result<()> {
    const RUNS: usize = 100;
    const SLOW_RUNS: usize = 3;
    let ring = ring_of(100)?;
    let mut dp = Dataplane::load(Sizes {
        max_vips: 2,
        max_backends: 128,
        max_conns: 1 << 16,
        ring_stride: M,
    })?;
    let (addr, family) = addr_raw("198.18.10.1".parse()?);
    let key = VipKey {
        addr,
        port: port_raw(80),
        proto: lb_common::PROTO_TCP,
        family,
    };
    let meta = |base: u32| VipMeta {
        id: 0,
        ring_base: base,
        ring_size: M,
        forwarding: lb_common::Forwarding::Ipip as u8,
        flags: 0,
        _pad: [0; 2],
    };
    // Warm-up: both buffers once.
    for which in 0..RINGS_PER_VIP {
        let base = dp.write_ring(0, which, &ring)?;
        dp.set_vip(&key, &meta(base))?;
    }
    let (mut w, mut f, mut total) = (vec![], vec![], vec![]);
    for i in 0..RUNS {
        let which = i as u32 % RINGS_PER_VIP;
        let t0 = Instant::now();
        let base = dp.write_ring(0, which, &ring)?;
        let t1 = Instant::now();
        dp.set_vip(&key, &meta(base))?;
        let t2 = Instant::now();
        w.push(t1 - t0);
        f.push(t2 - t1);
        total.push(t2 - t0);
    }
    if dp.read_ring(dp.sizes.ring_stride * ((RUNS as u32 - 1) % 2), M)? != ring {
        bail!("the ring read back differs from the ring written");
    }
    let mut slow = vec![];
    for _ in 0..SLOW_RUNS {
        let base = dp.sizes.ring_stride; // buffer 1 of VIP 0
        let t0 = Instant::now();
        for (i, pair) in ring.chunks(2).enumerate() {
            dp.rings.set(
                base / 2 + i as u32,
                [pair[0], *pair.get(1).unwrap_or(&0)],
                0,
            )?;
        }
        dp.set_vip(&key, &meta(base))?;
        slow.push(t0.elapsed());
    }
    drop(dp);

    let (first1, rec1) = time_reconciles(1, 50)?;
    let (first100, rec100) = time_reconciles(100, 20)?;

    println!("\n2. Installing a rebuilt ring (M = {M}, 100 backends) into the kernel");
    println!(
        "{:<58} {:>5} {:>10} {:>10} {:>10}",
        "operation", "runs", "median ms", "p99 ms", "target"
    );
    let row = |name: &str, v: &[Duration], target: &str| {
        let (m, p) = med_p99(v);
        println!("{name:<58} {:>5} {m:>10.3} {p:>10.3} {target:>10}", v.len());
        let _ = lb_bench::out::record(
            "control",
            serde_json::json!({"measure": name, "runs": v.len(), "median_ms": m, "p99_ms": p}),
        );
    };
    row("write_ring (one BPF_MAP_UPDATE_BATCH)", &w, "");
    row("set_vip (the flip: VIPS + VIP_ADDRS updates)", &f, "");
    let (_, p) = med_p99(&total);
    let verdict = if p < 20.0 { "met" } else { "missed" };
    row(
        "write_ring + set_vip, end to end",
        &total,
        &format!("< 20 {verdict}"),
    );
    row(
        "same ring, one rings.set per element (2 slots) + set_vip",
        &slow,
        "",
    );
    row(
        "reconcile: 1 VIP x 100 backends, one weight changed",
        &rec1,
        "",
    );
    row(
        "reconcile: 100 VIPs x 100 backends, one weight changed",
        &rec100,
        "",
    );
    println!(
        "first reconcile from empty maps: 1 VIP {:.1} ms, 100 VIPs x 100 backends {:.1} ms",
        first1.as_secs_f64() * 1e3,
        first100.as_secs_f64() * 1e3
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 3. The real agent: startup and RSS
// ---------------------------------------------------------------------------------------

fn proc_status_kb(pid: u32, field: &str) -> Result<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))
}

/// `ms=N` of the agent's "data plane ready" log line (its startup reconcile).
fn ready_ms(log: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains("data plane ready"))?;
    let mut clean = String::new();
    let mut esc = false;
    for c in line.chars() {
        match (esc, c) {
            (false, '\x1b') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => clean.push(c),
        }
    }
    let at = clean.find(" ms=")?;
    clean[at + 4..].split_whitespace().next()?.parse().ok()
}

fn agent_bench() -> Result<()> {
    const NVIPS: usize = 100;
    const NBACKENDS: usize = 100;
    // The tests' guards: dropped in reverse order, the agent (killed, `lb agent --stop`)
    // goes before its namespace, errors or not.
    let ns = Netns::new("lbbench-ctl")?;
    veth_pair(
        &VethEnd {
            ns: &ns,
            name: "lbc0",
            mac: [2, 0, 0, 0, 0xfe, 1],
            addrs: &["198.18.254.1/30"],
        },
        &VethEnd {
            ns: &ns,
            name: "lbc1",
            mac: [2, 0, 0, 0, 0xfe, 2],
            addrs: &["198.18.254.2/30"],
        },
    )?;
    let dir = temp_dir("lbbench-ctl")?;
    let cfg_path = dir.path().join("lb.toml");
    let text = config_toml("lbc0", NVIPS, NBACKENDS);
    let cfg = Config::parse(&text)?;
    fs::write(&cfg_path, &text)?;
    let t0 = Instant::now();
    let agent = Agent::start(&ns, &cfg_path)?;
    let pid = agent.pid();
    let startup = t0.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let rss = proc_status_kb(pid, "VmRSS")?;
    let hwm = proc_status_kb(pid, "VmHWM")?;
    let log = agent.log();

    println!(
        "\n3. Agent ({}): {NVIPS} VIPs x {NBACKENDS} backends, ring_size {M}, in netns {}",
        find_lb_bin()?.display(),
        ns.name()
    );
    println!("{:<52} {:>12}", "measure", "value");
    println!(
        "{:<52} {:>9.1} ms",
        "startup: spawn to answering `lb status`",
        startup.as_secs_f64() * 1e3
    );
    match ready_ms(&log) {
        Some(ms) => println!(
            "{:<52} {:>9} ms",
            "  of which the first reconcile (agent's log)", ms
        ),
        None => println!("  (no \"data plane ready ms=\" in the agent's log)"),
    }
    println!(
        "{:<52} {:>9.1} MB",
        "idle RSS after 1 s (VmRSS)",
        rss as f64 / 1e3 * 1.024
    );
    println!(
        "{:<52} {:>9.1} MB",
        "peak RSS (VmHWM)",
        hwm as f64 / 1e3 * 1.024
    );
    lb_bench::out::record(
        "control_agent",
        serde_json::json!({"vips": NVIPS, "backends_per_vip": NBACKENDS,
            "startup_ms": startup.as_secs_f64() * 1e3, "first_reconcile_ms": ready_ms(&log),
            "rss_mb": rss as f64 / 1e3 * 1.024, "peak_rss_mb": hwm as f64 / 1e3 * 1.024}),
    )?;

    map_memory(&agent.pin_dir(), &cfg)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 4. Kernel map memory
// ---------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct MapFdInfo {
    map_type: u32,
    key_size: u64,
    value_size: u64,
    max_entries: u64,
    map_flags: u64,
    memlock: u64,
}

fn map_fdinfo(path: &Path) -> Result<MapFdInfo> {
    let map = aya::maps::MapData::from_pin(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let fd = map.fd().as_fd().as_raw_fd();
    let text = fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    let mut info = MapFdInfo::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        let num = || -> u64 {
            v.strip_prefix("0x")
                .map(|h| u64::from_str_radix(h, 16).unwrap_or(0))
                .unwrap_or_else(|| v.parse().unwrap_or(0))
        };
        match k {
            "map_type" => info.map_type = num() as u32,
            "key_size" => info.key_size = num(),
            "value_size" => info.value_size = num(),
            "max_entries" => info.max_entries = num(),
            "map_flags" => info.map_flags = num(),
            "memlock" => info.memlock = num(),
            _ => {}
        }
    }
    Ok(info)
}

/// Kernel struct sizes the map memory accounting uses, from the running kernel's BTF
/// (bpftool), else the values of Linux 6.18 x86_64.
struct KernelSizes {
    bpf_array: u64,
    bpf_htab: u64,
    htab_elem: u64,
    bucket: u64,
    from_btf: bool,
}

fn kernel_sizes() -> KernelSizes {
    let mut k = KernelSizes {
        bpf_array: 312,
        bpf_htab: 832,
        htab_elem: 48,
        bucket: 16,
        from_btf: false,
    };
    let Ok(out) = Command::new("bpftool")
        .args([
            "btf",
            "dump",
            "file",
            "/sys/kernel/btf/vmlinux",
            "format",
            "raw",
        ])
        .stderr(Stdio::null())
        .output()
    else {
        return k;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut found = 0;
    for line in text.lines() {
        let size = |name: &str| -> Option<u64> {
            let rest = line.split_once(&format!(" STRUCT '{name}' size="))?.1;
            rest.split_whitespace().next()?.parse().ok()
        };
        for (name, slot) in [
            ("bpf_array", &mut k.bpf_array),
            ("bpf_htab", &mut k.bpf_htab),
            ("htab_elem", &mut k.htab_elem),
            ("bucket", &mut k.bucket),
        ] {
            if let Some(s) = size(name) {
                *slot = s;
                found += 1;
            }
        }
    }
    k.from_btf = found == 4;
    k
}

fn possible_cpus() -> Result<u64> {
    let s = fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut n = 0;
    for part in s.trim().split(',') {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<u64>()? - a.parse::<u64>()? + 1,
            None => 1,
        };
    }
    Ok(n)
}

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_F_NO_PREALLOC: u64 = 1;

fn round8(n: u64) -> u64 {
    n.div_ceil(8) * 8
}

/// What the kernel's `map_mem_usage` (kernel/bpf/arraymap.c, hashtab.c) should report
/// for this map, and that formula in words.
fn predicted(i: &MapFdInfo, k: &KernelSizes, cpus: u64) -> Option<(u64, &'static str)> {
    let (n, v) = (i.max_entries, round8(i.value_size));
    Some(match i.map_type {
        BPF_MAP_TYPE_ARRAY => (k.bpf_array + n * v, "n * round8(value)"),
        BPF_MAP_TYPE_PERCPU_ARRAY => (
            k.bpf_array + n * 8 + n * v * cpus,
            "n * (8 + ncpus * round8(value))",
        ),
        t @ (BPF_MAP_TYPE_HASH | BPF_MAP_TYPE_LRU_HASH) if i.map_flags & BPF_F_NO_PREALLOC == 0 => {
            let lru = t == BPF_MAP_TYPE_LRU_HASH;
            let elem = k.htab_elem + round8(i.key_size) + v;
            let entries = if lru { n } else { n + cpus };
            let mut b = k.bpf_htab
                + k.bucket * n.next_power_of_two()
                + 4 * cpus * 8 // per-CPU map locks
                + elem * entries;
            if !lru {
                b += 8 * cpus; // extra_elems pointers
            }
            (
                b,
                if lru {
                    "n * (48 + key + value) + pow2(n) * 16"
                } else {
                    "(n + ncpus) * (48 + key + value) + pow2(n) * 16"
                },
            )
        }
        _ => return None,
    })
}

fn mb(b: u64) -> String {
    format!("{:.2} MB", b as f64 / 1e6)
}

fn map_memory(pins: &Path, cfg: &Config) -> Result<()> {
    let cpus = possible_cpus()?;
    let k = kernel_sizes();
    let a = &cfg.agent;
    println!(
        "\n4. Kernel map memory of the agent's pinned maps ({}/*), memlock from fdinfo; \
         {cpus} possible CPUs; kernel struct sizes {}",
        pins.display(),
        if k.from_btf {
            "from BTF"
        } else {
            "assumed (6.18)"
        }
    );
    println!(
        "{:<12} {:>4} {:>4} {:>6} {:>9} {:>15} {:>15} {:>8}  formula",
        "map", "type", "key", "value", "entries", "measured B", "predicted B", "diff"
    );
    let (mut total, mut total_pred) = (0u64, 0u64);
    let mut by_name = std::collections::HashMap::new();
    for name in MAP_NAMES {
        let i = map_fdinfo(&pins.join(name))?;
        let pred = predicted(&i, &k, cpus);
        total += i.memlock;
        total_pred += pred.map_or(i.memlock, |p| p.0);
        println!(
            "{name:<12} {:>4} {:>4} {:>6} {:>9} {:>15} {:>15} {:>8}  {}",
            i.map_type,
            i.key_size,
            i.value_size,
            i.max_entries,
            i.memlock,
            pred.map_or("-".into(), |p| p.0.to_string()),
            pred.map_or("-".into(), |p| format!(
                "{:+}",
                i.memlock as i64 - p.0 as i64
            )),
            pred.map_or("?", |p| p.1),
        );
        lb_bench::out::record(
            "map_memory",
            serde_json::json!({"map": name, "entries": i.max_entries, "value_size": i.value_size,
                "measured_bytes": i.memlock, "predicted_bytes": pred.map(|p| p.0)}),
        )?;
        by_name.insert(name, i);
    }
    println!(
        "{:<12} {:>4} {:>4} {:>6} {:>9} {:>15} {:>15}  = {} measured",
        "total",
        "",
        "",
        "",
        "",
        total,
        total_pred,
        mb(total)
    );

    // The same, as per-VIP / per-backend / per-connection figures.
    let ring = u64::from(a.ring_size);
    let counters = 24u64; // size_of::<Counters>()
    let pc = |entries: u64| entries * (8 + cpus * counters);
    let stride = (ring + 1) & !1; // ring size rounded up to even; two slots per 8-byte element
    let rings = u64::from(a.max_vips) * 2 * stride * 4;
    let conn_value = std::mem::size_of::<lb_common::ConnVal>() as u64;
    let backend_value = (std::mem::size_of::<lb_common::Backend>() as u64 + 7) & !7;
    let conn_elem = k.htab_elem + 40 + conn_value;
    let conns =
        u64::from(a.max_conns) * conn_elem + u64::from(a.max_conns).next_power_of_two() * k.bucket;
    let measured = |n: &str| by_name.get(n).map_or(0, |i| i.memlock);
    println!("\nper-slot formulas (max_vips {}, max_backends {}, max_conns {}, ring_size {ring}, ncpus {cpus}):",
        a.max_vips, a.max_backends, a.max_conns);
    println!("{:<58} {:>14} {:>14}", "component", "formula", "measured");
    println!(
        "{:<58} {:>14} {:>14}",
        format!("RINGS: max_vips*2*even(ring)*4 ({} B/VIP)", 2 * stride * 4),
        mb(rings),
        mb(measured("RINGS"))
    );
    println!(
        "{:<58} {:>14} {:>14}",
        format!(
            "CONNS: max_conns*({}+40+{conn_value}) + pow2(max_conns)*{}",
            k.htab_elem, k.bucket
        ),
        mb(conns),
        mb(measured("CONNS"))
    );
    println!(
        "{:<58} {:>14} {:>14}",
        format!(
            "VIP_STATS: max_vips*(8+ncpus*24) ({} B/VIP)",
            8 + cpus * counters
        ),
        mb(pc(u64::from(a.max_vips))),
        mb(measured("VIP_STATS"))
    );
    println!(
        "{:<58} {:>14} {:>14}",
        format!(
            "BE_STATS: max_backends*(8+ncpus*24) ({} B/backend)",
            8 + cpus * counters
        ),
        mb(pc(u64::from(a.max_backends))),
        mb(measured("BE_STATS"))
    );
    println!(
        "{:<58} {:>14} {:>14}",
        format!("BACKENDS: max_backends*{backend_value}"),
        mb(u64::from(a.max_backends) * backend_value),
        mb(measured("BACKENDS"))
    );
    let per_vip = 2 * stride * 4
        + 8
        + cpus * counters
        + (k.htab_elem + 24 + 16 + k.bucket)
        + (k.htab_elem + 24 + 8 + k.bucket);
    let per_be = backend_value + 8 + cpus * counters;
    println!(
        "=> per VIP slot ~{} B (rings {} + VIP_STATS + VIPS + VIP_ADDRS), per backend slot {} B, \
         per connection slot ~{} B",
        per_vip,
        2 * stride * 4,
        per_be,
        conn_elem + k.bucket
    );
    let est = u64::from(a.max_vips) * per_vip + u64::from(a.max_backends) * per_be + conns;
    println!(
        "=> estimate max_vips*{per_vip} + max_backends*{per_be} + CONNS = {} vs measured total {} ({:+.2}%)",
        mb(est),
        mb(total),
        (total as f64 - est as f64) / est as f64 * 100.0
    );
    Ok(())
}

fn main() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root: loading BPF maps and creating namespaces needs it");
    }
    maglev_builds()?;
    ring_installs()?;
    agent_bench()?;
    Ok(())
}
