//! Suite item 1: Mpps through the `lb` program and through the baseline forwarder (swap
//! MACs, XDP_TX) in the same run, taking turns on one veth (see `lb_bench::turns`), for
//! the Maglev paper's traffic mixes: one constant 5-tuple, established flows (1,000,
//! 100,000, 1,000,000 ACK flows the LB has seen) and SYN only (every frame a new flow);
//! IPv4 and IPv6; "inline" (the LB runs in the generator's softirq on CPU 0) and "split"
//! (the LB veth's receive in a NAPI thread bound to CPU 1: its capacity on its own core).
//! Prints a table, appends JSON lines (`lb_bench::out`).
use std::collections::BTreeMap;

use anyhow::{Context, Result};
use lb_bench::{
    live::pin_to_cpu,
    out::{self, median},
    traffic::{gen_config, min_frame, Mix},
    turns::{Bench, Prog, Turn, MAX_CONNS},
};
use lb_common::{bench::RX_NOT_IP, Reason};
use lb_tests::netns::in_netns;
use serde_json::json;

/// Frames per turn (the "every ~250k frames").
const TURN_FRAMES: u32 = 250_000;

struct Cell {
    v6: bool,
    mix: Mix,
    flows: u32,
}

struct Row {
    lb: Vec<Turn>,
    fwd: Vec<Turn>,
    ratios: Vec<f64>,
    lb_ns: f64,
    fwd_ns: f64,
    miss_rate: f64,
    reasons: BTreeMap<String, u64>,
}

/// "1,000 established flows", "new flows".
fn flows_label(cell: &Cell) -> String {
    match cell.mix {
        Mix::Syn => "new".into(),
        _ => cell.flows.to_string(),
    }
}

fn vip_id(v6: bool) -> u32 {
    // The standard fixture's VIP ids: 0 is 198.18.10.1:80/tcp, 1 is [2001:db8:10::1]:80/tcp.
    v6 as u32
}

fn measure(b: &mut Bench, cell: &Cell, rounds: usize) -> Result<Row> {
    let cfg = gen_config(cell.mix, cell.v6, cell.flows, min_frame(cell.v6));
    if cell.mix == Mix::Established {
        // The LB sees every flow once before it is timed.
        let mut warm = cfg;
        warm.flows = cell.flows;
        b.turn(Prog::Lb, &warm, cell.flows)?;
    }
    let reasons0 = b.dp.reason_counts()?;
    let vip0 = b.dp.vip_counters(vip_id(cell.v6))?;
    let (mut lb, mut fwd, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        // Alternate who goes first, so neither always follows the other.
        let order = if r % 2 == 0 {
            [Prog::Lb, Prog::Fwd]
        } else {
            [Prog::Fwd, Prog::Lb]
        };
        let mut pair = [None, None];
        for p in order {
            let t = b.turn(p, &cfg, TURN_FRAMES)?;
            pair[(p == Prog::Fwd) as usize] = Some(t);
        }
        let [Some(l), Some(f)] = pair else {
            unreachable!()
        };
        ratios.push(l.mpps() / f.mpps());
        lb.push(l);
        fwd.push(f);
    }
    let vip1 = b.dp.vip_counters(vip_id(cell.v6))?;
    let reasons1 = b.dp.reason_counts()?;
    let reasons = Reason::ALL
        .iter()
        .zip(reasons1.iter().zip(&reasons0))
        .filter(|(_, (a, b))| a > b)
        .map(|(r, (a, b))| (r.name().to_string(), a - b))
        .collect();
    let packets = (vip1.packets - vip0.packets).max(1);
    let miss_rate = (vip1.new_flows - vip0.new_flows) as f64 / packets as f64;
    // The programs' own cost, from the kernel's run-time statistics (a pass of its own:
    // the statistics cost two clock reads per run).
    out::bpf_stats(true)?;
    let mut ns = [0.0; 2];
    for (i, p) in [Prog::Lb, Prog::Fwd].into_iter().enumerate() {
        b.put(p)?;
        let (t0, n0) = b.prog_stats(p)?;
        b.turn(p, &cfg, TURN_FRAMES)?;
        let (t1, n1) = b.prog_stats(p)?;
        ns[i] = (t1 - t0).as_nanos() as f64 / (n1 - n0).max(1) as f64;
    }
    out::bpf_stats(false)?;
    Ok(Row {
        lb,
        fwd,
        ratios,
        lb_ns: ns[0],
        fwd_ns: ns[1],
        miss_rate,
        reasons,
    })
}

fn main() -> Result<()> {
    let quick = out::quick();
    let rounds = if quick { 5 } else { 15 };
    let mut b = Bench::new(MAX_CONNS)?;
    let mut cells = Vec::new();
    for v6 in [false, true] {
        cells.push(Cell {
            v6,
            mix: Mix::Constant,
            flows: 1,
        });
        for flows in [1_000, 100_000, 1_000_000] {
            cells.push(Cell {
                v6,
                mix: Mix::Established,
                flows,
            });
        }
        cells.push(Cell {
            v6,
            mix: Mix::Syn,
            flows: 0,
        });
    }
    println!(
        "Throughput: lb vs forwarder taking turns of {TURN_FRAMES} frames on one veth, \
         {rounds} rounds, medians; {}-entry connection table, 65,537-slot rings, \
         minimum-size frames; inline = LB in the generator's softirq (CPU 0), split = LB's \
         receive on CPU 1",
        MAX_CONNS
    );
    println!(
        "{:<5} {:<12} {:>9} {:<7} {:>8} {:>8} {:>6} {:>8} {:>7} {:>7} {:>7} {:>6} {:>7}",
        "fam",
        "mix",
        "flows",
        "mode",
        "lb Mpps",
        "fwd Mpps",
        "ratio",
        "target",
        "lb ns",
        "fwd ns",
        "diff ns",
        "miss",
        "lost"
    );
    let gen_ns = b.wire.gen.name().to_string();
    let mut missed = Vec::new();
    for split in [false, true] {
        b.wire.steer_lb(split.then_some(1))?;
        for cell in &cells {
            let row = in_netns(&gen_ns, || -> Result<Row> {
                pin_to_cpu(0)?;
                measure(&mut b, cell, rounds)
            })??;
            let mode = if split { "split" } else { "inline" };
            let lb = median(&mut row.lb.iter().map(Turn::mpps).collect::<Vec<_>>());
            let fwd = median(&mut row.fwd.iter().map(Turn::mpps).collect::<Vec<_>>());
            let ratio = median(&mut row.ratios.clone());
            let target = match (cell.mix, cell.flows) {
                (Mix::Established, 1_000) => Some(0.8),
                (Mix::Syn, _) => Some(0.5),
                _ => None,
            };
            let verdict =
                target.map(|t| format!("{t:.1} {}", if ratio >= t { "met" } else { "MISS" }));
            let lost: u64 = row
                .lb
                .iter()
                .map(|t| t.sent.saturating_sub(t.received))
                .sum();
            let sent: u64 = row.lb.iter().map(|t| t.sent).sum();
            let mut backends = BTreeMap::new();
            for t in &row.lb {
                for (i, n) in t.buckets.iter().enumerate() {
                    if *n > 0 {
                        let k = if i as u32 == RX_NOT_IP {
                            "not-ip".to_string()
                        } else {
                            format!(".{i}")
                        };
                        *backends.entry(k).or_insert(0u64) += n;
                    }
                }
            }
            let diff_ns = 1e3 / lb - 1e3 / fwd;
            println!(
                "{:<5} {:<12} {:>9} {:<7} {:>8.2} {:>8.2} {:>6.2} {:>8} {:>7.0} {:>7.0} {:>7.0} {:>5.1}% {:>6.1}%",
                if cell.v6 { "IPv6" } else { "IPv4" },
                cell.mix.name(),
                flows_label(cell),
                mode,
                lb,
                fwd,
                ratio,
                verdict.clone().unwrap_or_else(|| "-".into()),
                row.lb_ns,
                row.fwd_ns,
                diff_ns,
                row.miss_rate * 100.0,
                lost as f64 * 100.0 / sent as f64,
            );
            out::record(
                "throughput",
                json!({
                    "family": if cell.v6 { 6 } else { 4 },
                    "mix": cell.mix.name(),
                    "flows": cell.flows,
                    "mode": mode,
                    "lb_mpps": lb,
                    "fwd_mpps": fwd,
                    "ratio": ratio,
                    "target": target,
                    "lb_turns": row.lb.iter().map(Turn::mpps).collect::<Vec<_>>(),
                    "fwd_turns": row.fwd.iter().map(Turn::mpps).collect::<Vec<_>>(),
                    "lb_prog_ns": row.lb_ns,
                    "fwd_prog_ns": row.fwd_ns,
                    "diff_ns": diff_ns,
                    "miss_rate": row.miss_rate,
                    "lost": lost as f64 / sent as f64,
                    "reasons": row.reasons,
                    "lb_frames_by_dst": backends,
                    "turn_frames": TURN_FRAMES,
                    "rounds": rounds,
                    "max_conns": MAX_CONNS,
                }),
            )
            .context("recording")?;
            if split && !cell.v6 && target.is_some_and(|t| ratio < t) {
                missed.push(cell);
            }
        }
    }
    // Where a target is missed, where the LB's CPU spends its time.
    for cell in missed {
        let top = profile(&mut b, &gen_ns, cell, 1)?;
        println!(
            "\nperf profile of CPU 1 (the LB's, split) during IPv4 {} traffic, {} flows:",
            cell.mix.name(),
            flows_label(cell)
        );
        for (pct, sym) in &top {
            println!("  {pct:>6.2}%  {sym}");
        }
        out::record(
            "profile",
            json!({"mix": cell.mix.name(), "flows": cell.flows, "family": 4, "cpu": 1,
                   "top": top.iter().map(|(p, s)| json!({"pct": p, "sym": s})).collect::<Vec<_>>()}),
        )?;
    }
    Ok(())
}

/// Where CPU `cpu`'s time goes while the LB alone takes turns with `cell`'s traffic:
/// `perf record` of that CPU (the LB's in split mode), the top symbols by self time.
fn profile(b: &mut Bench, gen_ns: &str, cell: &Cell, cpu: usize) -> Result<Vec<(f64, String)>> {
    let data = tempfile::NamedTempFile::new()?.into_temp_path();
    let _ = std::fs::write("/proc/sys/net/core/bpf_jit_kallsyms", "1");
    let mut perf = std::process::Command::new("perf")
        .args(["record", "-q", "-C", &cpu.to_string(), "-o"])
        .arg(&data)
        .args(["--", "sleep", "30"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting perf record")?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let cfg = gen_config(cell.mix, cell.v6, cell.flows, min_frame(cell.v6));
    in_netns(gen_ns, || -> Result<()> {
        pin_to_cpu(0)?;
        for _ in 0..8 {
            b.turn(Prog::Lb, &cfg, TURN_FRAMES)?;
        }
        Ok(())
    })??;
    unsafe { libc::kill(perf.id() as i32, libc::SIGINT) };
    perf.wait()?;
    let report = std::process::Command::new("perf")
        .args(["report", "--stdio", "--no-children", "--sort", "sym", "-i"])
        .arg(&data)
        .output()
        .context("perf report")?;
    let text = String::from_utf8_lossy(&report.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let (pct, rest) = l.split_once('%')?;
            let pct: f64 = pct.trim().parse().ok()?;
            let sym = rest
                .trim()
                .trim_start_matches("[k]")
                .trim_start_matches("[.]")
                .trim();
            Some((pct, sym.to_string()))
        })
        .take(15)
        .collect())
}
