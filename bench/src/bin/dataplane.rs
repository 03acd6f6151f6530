//! Per-packet cost of the `lb` XDP program, the way Katran's `katran_tester` times its own:
//! BPF_PROG_TEST_RUN with `repeat = 1` per call (an encapsulating program must not see its
//! own output again), the kernel's own `duration` per call, median over many calls, one
//! pinned CPU. Prints ns per packet and the multiple of the floor (a program that only
//! returns XDP_TX), next to Katran's multiples measured the same way on this machine kind.
use std::net::IpAddr;

use anyhow::{Context, Result};
use aya::programs::{TestRun, TestRunOptions};
use lb_bench::{live::pin_to_cpu, out::median};
use lb_tests::{
    fixture::{v4, v6, Fixture},
    model::Model,
    packets,
};
use lb_userspace::dataplane::{Dataplane, Sizes};

const DEFAULT_FLOWS: u32 = 20_000;
/// Timed calls per fixture (at least).
const CALLS: u32 = 20_000;

/// Kernel-measured ns of one run of `prog` on each frame, in order.
fn time_frames(dp: &mut Dataplane, prog: &str, frames: &[Vec<u8>]) -> Result<Vec<u64>> {
    let prog = dp.program(prog)?;
    let mut out = vec![0u8; 4096];
    let mut ns = Vec::with_capacity(frames.len());
    for f in frames {
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(f),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .context("test_run")?;
        ns.push(r.duration.as_nanos() as u64);
    }
    Ok(ns)
}

fn flows(n: u32, client: impl Fn(u32) -> IpAddr, vip: IpAddr, syn: bool) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let sport = 1024 + (i % 60000) as u16;
            packets::Opts::default()
                .with_syn(syn)
                .tcp(client(i), sport, vip, 80, b"")
        })
        .collect()
}

/// Client address of flow `i`.
type ClientFn = Box<dyn Fn(u32) -> IpAddr>;

/// ns per packet for [floor, non-VIP, new, established, hot], IPv4 and IPv6, each family
/// on a fresh data plane (1M-entry connection table, 65537-slot rings: production sizes).
fn measure(nflows: u32) -> Result<[[f64; 2]; 5]> {
    let mut out = [[0.0; 2]; 5];
    let families: [(ClientFn, IpAddr, IpAddr); 2] = [
        (
            Box::new(|i| v4(100 + (i >> 16) as u8, (i >> 8) as u8)),
            v4(10, 1),
            v4(30, 1),
        ),
        (
            Box::new(|i| v6(100 + (i >> 8) as u16, i as u16)),
            v6(10, 1),
            v6(30, 1),
        ),
    ];
    for (fam, (client, vip, other)) in families.into_iter().enumerate() {
        // A fresh data plane per family: each starts with an empty connection table.
        let mut dp = Dataplane::load(Sizes {
            max_conns: 1 << 20,
            ..Sizes::default()
        })?;
        let mut fx = Fixture::standard();
        fx.ring_size = lb_common::DEFAULT_RING_SIZE;
        fx.apply(&mut dp, &mut Model::default())?;
        let syns = flows(nflows, &client, vip, true);
        let acks = flows(nflows, &client, vip, false);
        let non_vip: Vec<Vec<u8>> = (0..CALLS)
            .map(|i| packets::Opts::default().tcp(client(i), 2000, other, 80, b""))
            .collect();
        let hot: Vec<Vec<u8>> = (0..CALLS).map(|_| acks[0].clone()).collect();
        // At least CALLS timed calls per fixture: the SYNs once each, the ACKs round after round.
        let acks: Vec<Vec<u8>> = acks
            .iter()
            .cycle()
            .take(acks.len().max(CALLS as usize))
            .cloned()
            .collect();
        let floor = time_frames(&mut dp, "floor", &acks)?;
        time_frames(&mut dp, "lb", &non_vip[..1000])?; // warm-up
        let nv = time_frames(&mut dp, "lb", &non_vip)?;
        let new = time_frames(&mut dp, "lb", &syns)?;
        let est = time_frames(&mut dp, "lb", &acks)?;
        let hot_ns = time_frames(&mut dp, "lb", &hot)?;
        for (row, v) in out.iter_mut().zip([floor, nv, new, est, hot_ns]) {
            row[fam] = median(&mut v.into_iter().map(|n| n as f64).collect::<Vec<_>>());
        }
    }
    Ok(out)
}

fn main() -> Result<()> {
    let cpu = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1usize);
    let nflows = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_FLOWS);
    pin_to_cpu(cpu)?;
    let quick = lb_bench::out::quick();
    let rows = [
        ("floor (XDP_TX only)", Some(1.0), None),
        ("non-VIP packet", Some(1.8), Some(1.5)),
        ("new flow (SYN, distinct flows)", Some(6.9), Some(4.5)),
        ("established (ACK, same flows)", Some(4.0), Some(2.8)),
        ("hot flow (one flow)", Some(3.1), Some(2.3)),
    ];
    let ns = measure(nflows)?;
    println!(
        "lb XDP program, BPF_PROG_TEST_RUN repeat=1, median over >= {CALLS} calls per fixture, \
         {nflows} flows, 1M-entry connection table, 65537-slot rings, CPU {cpu}"
    );
    println!(
        "{:<32} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7}",
        "fixture", "IPv4 ns", "x floor", "IPv6 ns", "x floor", "Katran", "target"
    );
    let floor = ns[0];
    for ((name, katran, target), v) in rows.iter().zip(ns) {
        let x = |f: usize| v[f] / floor[f];
        let opt = |o: Option<f64>| o.map(|v| format!("{v:.1}x")).unwrap_or_else(|| "-".into());
        let verdict = match target {
            Some(t) if x(0) <= *t && x(1) <= *t => " met",
            Some(_) => " missed",
            None => "",
        };
        lb_bench::out::record(
            "dataplane",
            serde_json::json!({"fixture": name, "flows": nflows, "ipv4_ns": v[0], "ipv6_ns": v[1],
                   "ipv4_x_floor": x(0), "ipv6_x_floor": x(1), "katran_x": katran,
                   "target_x": target}),
        )?;
        println!(
            "{:<32} {:>8.0} {:>7.2}x {:>8.0} {:>7.2}x {:>7} {:>7}{}",
            name,
            v[0],
            x(0),
            v[1],
            x(1),
            opt(*katran),
            opt(*target),
            verdict
        );
    }

    // Where the time of established flows goes: the same program, growing numbers of flows.
    // The compute cost is the 200-flow row; the rest is the connection table's buckets and
    // entries falling out of the CPU caches and TLB.
    println!("\nestablished-flow cost by number of flows (1M-entry table: a CPU's share of it is");
    println!("1M / CPUs, the per-CPU LRU lists of BPF_F_NO_COMMON_LRU):");
    println!(
        "{:>8} {:>10} {:>10} {:>10} {:>10}",
        "flows", "IPv4 ns", "x floor", "IPv6 ns", "x floor"
    );
    let sweep: &[u32] = if quick {
        &[200, 20_000, 1_000_000]
    } else {
        &[200, 2_000, 20_000, 200_000, 1_000_000]
    };
    for &n in sweep {
        let v = measure(n)?;
        lb_bench::out::record(
            "dataplane_sweep",
            serde_json::json!({"flows": n, "ipv4_ns": v[3][0], "ipv6_ns": v[3][1],
                   "ipv4_new_ns": v[2][0], "ipv6_new_ns": v[2][1],
                   "ipv4_floor_ns": v[0][0], "ipv6_floor_ns": v[0][1]}),
        )?;
        println!(
            "{:>8} {:>10.0} {:>9.2}x {:>10.0} {:>9.2}x",
            n,
            v[3][0],
            v[3][0] / v[0][0],
            v[3][1],
            v[3][1] / v[0][1]
        );
    }
    Ok(())
}
