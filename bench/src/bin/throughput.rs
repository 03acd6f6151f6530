//! Suite item 1: Mpps through the `lb` program and through the baseline forwarder (swap
//! MACs, XDP_TX) in the same run, taking turns on one veth (see `lb_bench::turns`), for
//! the Maglev paper's traffic mixes: one constant 5-tuple, established flows (1,000,
//! 100,000, 1,000,000 ACK flows the LB has seen) and SYN only (every frame a new flow);
//! IPv4 and IPv6; "inline" (the LB runs in the generator's softirq on CPU 0) and "split"
//! (the LB veth's receive in a NAPI thread bound to CPU 1: its capacity on its own core).
//! Each through the VIP as the fixture has it ("conntrack": connection table, IP in IP)
//! and switched to stateless (second chance: no table, GUE variant 0 carrying a secondary
//! in every packet, `Bench::set_vip_mode`); then the stateless targets: flow count stops
//! mattering. Prints a table, appends JSON lines (`lb_bench::out`).
use std::collections::BTreeMap;

use anyhow::{Context, Result};
use lb_bench::{
    live::pin_to_cpu,
    out::{self, median},
    traffic::{gen_config, min_frame, Mix},
    turns::{Bench, Prog, Turn, VipMode, MAX_CONNS},
};
use lb_common::{bench::RX_NOT_IP, Reason};
use lb_tests::netns::in_netns;
use serde_json::json;

/// Frames per turn (the "every ~250k frames").
const TURN_FRAMES: u32 = 250_000;

/// Each program's ns per packet is the median over this many passes of
/// `TURN_FRAMES / NS_PASSES` frames.
const NS_PASSES: u32 = 5;

/// Stateless targets: a 1,000,000-flow cell's program ns within this factor of the
/// constant 5-tuple's ...
const NS_FACTOR: f64 = 1.3;
/// ... and its LB / forwarder ratio within this of the 1,000-flow cell's.
const RATIO_DIFF: f64 = 0.05;

/// (family, mode, vip, mix, flows) of a measured cell.
type Key = (u8, &'static str, &'static str, &'static str, u32);

#[derive(Clone, Copy)]
struct Cell {
    v6: bool,
    vip: VipMode,
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
    if cell.mix == Mix::Established && cell.vip == VipMode::Conntrack {
        // The LB sees every flow once before it is timed (a stateless VIP keeps nothing).
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
    // The programs' own cost, from the kernel's run-time statistics (passes of their own:
    // the statistics cost two clock reads per run), the median of short passes: a burst
    // of stolen CPU inflates the one pass it falls in.
    out::bpf_stats(true)?;
    let mut per_pass = [Vec::new(), Vec::new()];
    for _ in 0..NS_PASSES {
        for (i, p) in [Prog::Lb, Prog::Fwd].into_iter().enumerate() {
            b.put(p)?;
            let (t0, n0) = b.prog_stats(p)?;
            b.turn(p, &cfg, TURN_FRAMES / NS_PASSES)?;
            let (t1, n1) = b.prog_stats(p)?;
            per_pass[i].push((t1 - t0).as_nanos() as f64 / (n1 - n0).max(1) as f64);
        }
    }
    let ns = per_pass.map(|mut v| median(&mut v));
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
        for vip in [VipMode::Conntrack, VipMode::Stateless] {
            cells.push(Cell {
                v6,
                vip,
                mix: Mix::Constant,
                flows: 1,
            });
            for flows in [1_000, 100_000, 1_000_000] {
                // Quick: the stateless targets need only the two ends.
                if quick && vip == VipMode::Stateless && flows == 100_000 {
                    continue;
                }
                cells.push(Cell {
                    v6,
                    vip,
                    mix: Mix::Established,
                    flows,
                });
            }
            cells.push(Cell {
                v6,
                vip,
                mix: Mix::Syn,
                flows: 0,
            });
        }
    }
    println!(
        "Throughput: lb vs forwarder taking turns of {TURN_FRAMES} frames on one veth, \
         {rounds} rounds, medians; {}-entry connection table, 65,537-slot rings, \
         minimum-size frames; inline = LB in the generator's softirq (CPU 0), split = LB's \
         receive on CPU 1; vip conntrack = the fixture's (connection table, IP in IP), \
         stateless = the same VIP switched to stateless (no table, GUE variant 0 with a \
         secondary in every packet: 12 / 24 header bytes more than IP in IP, IPv4 / IPv6)",
        MAX_CONNS
    );
    println!(
        "{:<5} {:<9} {:<12} {:>9} {:<7} {:>8} {:>8} {:>6} {:>8} {:>7} {:>7} {:>7} {:>6} {:>7}",
        "fam",
        "vip",
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
    // Each cell's (LB / fwd ratio, LB program ns).
    let mut seen: BTreeMap<Key, (f64, f64)> = BTreeMap::new();
    let mut modes = [VipMode::Conntrack; 2];
    for split in [false, true] {
        b.wire.steer_lb(split.then_some(1))?;
        for cell in &cells {
            let id = vip_id(cell.v6);
            if modes[id as usize] != cell.vip {
                b.set_vip_mode(id as usize, cell.vip)?;
                modes[id as usize] = cell.vip;
            }
            let row = in_netns(&gen_ns, || -> Result<Row> {
                pin_to_cpu(0)?;
                measure(&mut b, cell, rounds)
            })??;
            let mode = if split { "split" } else { "inline" };
            let lb = median(&mut row.lb.iter().map(Turn::mpps).collect::<Vec<_>>());
            let fwd = median(&mut row.fwd.iter().map(Turn::mpps).collect::<Vec<_>>());
            let ratio = median(&mut row.ratios.clone());
            // The absolute targets are the conntrack VIP's; a stateless VIP's are relative
            // (below).
            let target = match (cell.vip, cell.mix, cell.flows) {
                (VipMode::Stateless, _, _) => None,
                (_, Mix::Established, 1_000) => Some(0.8),
                (_, Mix::Syn, _) => Some(0.5),
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
                "{:<5} {:<9} {:<12} {:>9} {:<7} {:>8.2} {:>8.2} {:>6.2} {:>8} {:>7.0} {:>7.0} {:>7.0} {:>5.1}% {:>6.1}%",
                if cell.v6 { "IPv6" } else { "IPv4" },
                cell.vip.name(),
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
                    "vip": cell.vip.name(),
                    "forwarding": if cell.vip == VipMode::Stateless { "gue" } else { "ipip" },
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
                    "ns_passes": NS_PASSES,
                    "rounds": rounds,
                    "max_conns": MAX_CONNS,
                }),
            )
            .context("recording")?;
            seen.insert(
                (
                    if cell.v6 { 6 } else { 4 },
                    mode,
                    cell.vip.name(),
                    cell.mix.name(),
                    cell.flows,
                ),
                (ratio, row.lb_ns),
            );
            if split && !cell.v6 && target.is_some_and(|t| ratio < t) {
                missed.push(cell);
            }
        }
    }
    for vip in [VipMode::Stateless, VipMode::Conntrack] {
        targets(&seen, vip)?;
    }
    for (id, mode) in modes.into_iter().enumerate() {
        if mode != VipMode::Conntrack {
            b.set_vip_mode(id, VipMode::Conntrack)?;
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

/// The stateless targets (flow count stops mattering), per family and mode: (a) the
/// program's ns per packet at 1,000,000 established flows and SYN only within
/// [`NS_FACTOR`] of the constant 5-tuple's; (b) the LB / forwarder ratio at 1,000,000
/// established flows and SYN only within [`RATIO_DIFF`] of the ratio at 1,000 established
/// flows. Printed and recorded ("stateless_targets") for `vip`; the conntrack VIP's same
/// figures are shown for comparison, without a verdict.
fn targets(seen: &BTreeMap<Key, (f64, f64)>, vip: VipMode) -> Result<()> {
    let stateless = vip == VipMode::Stateless;
    println!(
        "\n{} VIP: {}",
        vip.name(),
        if stateless {
            format!(
                "targets (flow count stops mattering): prog ns <= {NS_FACTOR} x the constant \
                 5-tuple's, LB / fwd ratio within {RATIO_DIFF} of 1,000 flows'"
            )
        } else {
            "the same figures, for comparison (no target)".into()
        }
    );
    println!(
        "{:<5} {:<7} {:<26} {:>9} {:>9} {:>8} {:>10}",
        "fam", "mode", "measure", "value", "reference", "x / diff", "verdict"
    );
    for fam in [4u8, 6] {
        for mode in ["inline", "split"] {
            let get =
                |mix: &'static str, flows: u32| seen.get(&(fam, mode, vip.name(), mix, flows));
            let Some(&(_, c_ns)) = get("constant", 1) else {
                continue;
            };
            let Some(&(r_1k, _)) = get("established", 1_000) else {
                continue;
            };
            for (label, mix, flows) in [
                ("established 1,000,000", "established", 1_000_000),
                ("SYN only", "syn", 0),
            ] {
                let Some(&(ratio, ns)) = get(mix, flows) else {
                    continue;
                };
                let x = ns / c_ns;
                let diff = ratio - r_1k;
                for (measure, value, reference, by, met) in [
                    ("prog ns", ns, c_ns, x, x <= NS_FACTOR),
                    ("LB / fwd", ratio, r_1k, diff, diff.abs() <= RATIO_DIFF),
                ] {
                    let verdict = if !stateless {
                        "-"
                    } else if met {
                        "met"
                    } else {
                        "MISS"
                    };
                    let (value_s, ref_s, by_s) = if measure == "prog ns" {
                        (
                            format!("{value:.0}"),
                            format!("{reference:.0}"),
                            format!("{by:.2}x"),
                        )
                    } else {
                        (
                            format!("{value:.2}"),
                            format!("{reference:.2}"),
                            format!("{by:+.2}"),
                        )
                    };
                    println!(
                        "IPv{fam:<1} {mode:<7} {:<26} {value_s:>9} {ref_s:>9} {by_s:>8} {verdict:>10}",
                        format!("{measure}, {label}"),
                    );
                    out::record(
                        "stateless_targets",
                        json!({
                            "vip": vip.name(),
                            "family": fam,
                            "mode": mode,
                            "measure": measure,
                            "mix": mix,
                            "flows": flows,
                            "value": value,
                            // The constant 5-tuple's ns, or the 1,000 flows' ratio.
                            "reference": reference,
                            "reference_cell": if measure == "prog ns" {
                                "constant"
                            } else {
                                "established 1000"
                            },
                            "factor": (measure == "prog ns").then_some(by),
                            "diff": (measure != "prog ns").then_some(by),
                            "limit": if measure == "prog ns" { NS_FACTOR } else { RATIO_DIFF },
                            "met": stateless.then_some(met),
                        }),
                    )?;
                }
            }
        }
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
