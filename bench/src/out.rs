//! Machine-readable results: every suite appends one JSON object per measurement to a
//! JSON-lines file, which `bin/report.rs` turns into `bench/results/REPORT.md`.
use std::{fs::OpenOptions, io::Write, path::PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};

/// `$LB_BENCH_RESULTS`, or `bench/results/results.jsonl` in the source tree.
pub fn results_path() -> PathBuf {
    std::env::var_os("LB_BENCH_RESULTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results/results.jsonl"))
}

/// Whether the quick mode was asked for (`LB_BENCH_QUICK=1`): fewer turns and sizes.
pub fn quick() -> bool {
    std::env::var("LB_BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// Append `{"suite": suite, ...fields}` to the results file.
pub fn record(suite: &str, fields: Value) -> Result<()> {
    let mut v = json!({ "suite": suite });
    if let (Some(o), Value::Object(f)) = (v.as_object_mut(), fields) {
        o.extend(f);
    }
    let path = results_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{v}").with_context(|| format!("writing {}", path.display()))
}

/// CPU model, cores, kernel and memory of this machine.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let mem_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    json!({
        "cpu": model,
        "cores": cores,
        "kernel": kernel,
        "memory_gib": (mem_kb as f64 / 1048576.0 * 10.0).round() / 10.0,
    })
}

pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Turn the kernel's per-program run-time statistics on or off.
pub fn bpf_stats(on: bool) -> Result<()> {
    std::fs::write(
        "/proc/sys/kernel/bpf_stats_enabled",
        if on { "1" } else { "0" },
    )
    .context("writing kernel.bpf_stats_enabled")
}
