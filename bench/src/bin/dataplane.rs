//! Per-packet cost of the `lb` XDP program, the way Katran's `katran_tester` times its own:
//! BPF_PROG_TEST_RUN with `repeat = 1` per call (an encapsulating program must not see its
//! own output again), the kernel's own `duration` per call, median over many calls, one
//! pinned CPU. Prints ns per packet and the multiple of the floor (a program that only
//! returns XDP_TX), next to Katran's multiples measured the same way on this machine kind.
use std::net::IpAddr;

use anyhow::{Context, Result};
use aya::programs::{TestRun, TestRunOptions};
use lb_tests::{
    fixture::{v4, v6, Fixture},
    harness::test_sizes,
    model::Model,
    packets,
};
use lb_userspace::dataplane::Dataplane;

const DEFAULT_FLOWS: u32 = 20_000;
/// Timed calls per fixture (at least).
const CALLS: u32 = 20_000;

fn pin_to_cpu(cpu: usize) -> Result<()> {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            anyhow::bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

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

fn median(mut v: Vec<u64>) -> f64 {
    v.sort_unstable();
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2] as f64
    } else {
        (v[n / 2 - 1] + v[n / 2]) as f64 / 2.0
    }
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

struct Row {
    name: &'static str,
    katran: Option<f64>,
    target: Option<f64>,
    ns: [f64; 2],
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
    let mut dp = Dataplane::load(test_sizes())?;
    let fx = Fixture::standard();
    fx.apply(&mut dp, &mut Model::default())?;

    let mut rows = vec![
        Row {
            name: "floor (XDP_TX only)",
            katran: Some(1.0),
            target: None,
            ns: [0.0; 2],
        },
        Row {
            name: "non-VIP packet",
            katran: Some(1.8),
            target: Some(1.5),
            ns: [0.0; 2],
        },
        Row {
            name: "new flow (SYN, distinct flows)",
            katran: Some(6.9),
            target: Some(4.5),
            ns: [0.0; 2],
        },
        Row {
            name: "established (ACK, same flows)",
            katran: Some(4.0),
            target: Some(2.8),
            ns: [0.0; 2],
        },
        Row {
            name: "hot flow (one flow)",
            katran: Some(3.1),
            target: Some(2.3),
            ns: [0.0; 2],
        },
    ];
    for (fam, (client, vip, other)) in [
        (
            Box::new(|i: u32| v4(100 + (i >> 16) as u8, (i >> 8) as u8))
                as Box<dyn Fn(u32) -> IpAddr>,
            v4(10, 1),
            v4(30, 1),
        ),
        (
            Box::new(|i: u32| v6(100 + (i >> 8) as u16, i as u16)) as Box<dyn Fn(u32) -> IpAddr>,
            v6(10, 1),
            v6(30, 1),
        ),
    ]
    .into_iter()
    .enumerate()
    {
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
        // Warm the non-VIP path once, then measure.
        time_frames(&mut dp, "lb", &non_vip[..1000])?;
        let nv = time_frames(&mut dp, "lb", &non_vip)?;
        let new = time_frames(&mut dp, "lb", &syns)?;
        let est = time_frames(&mut dp, "lb", &acks)?;
        let hot_ns = time_frames(&mut dp, "lb", &hot)?;
        for (row, v) in rows.iter_mut().zip([floor, nv, new, est, hot_ns]) {
            row.ns[fam] = median(v);
        }
    }

    println!("lb XDP program, BPF_PROG_TEST_RUN repeat=1, median over >= {CALLS} calls per fixture, {nflows} flows, CPU {cpu}");
    println!(
        "{:<30} {:>9} {:>7} {:>9} {:>7} {:>8} {:>8}",
        "fixture", "IPv4 ns", "x floor", "IPv6 ns", "x floor", "Katran", "target"
    );
    let floor = rows[0].ns;
    for r in &rows {
        let x = |f: usize| r.ns[f] / floor[f];
        let opt = |o: Option<f64>| o.map(|v| format!("{v:.1}x")).unwrap_or_else(|| "-".into());
        let verdict = match r.target {
            Some(t) if x(0) <= t && x(1) <= t => " ok",
            Some(_) => " MISSED",
            None => "",
        };
        println!(
            "{:<30} {:>9.0} {:>6.2}x {:>9.0} {:>6.2}x {:>8} {:>8}{}",
            r.name,
            r.ns[0],
            x(0),
            r.ns[1],
            x(1),
            opt(r.katran),
            opt(r.target),
            verdict
        );
    }
    Ok(())
}
