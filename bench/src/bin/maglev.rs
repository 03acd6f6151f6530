//! Suite item 4: the weighted Maglev table (`lb_userspace::maglev`) against M and N.
//! Build time (median of several builds, one CPU) next to the Maglev paper's figures for
//! N = 1,000 (1.8 ms at M = 65,537, 22.9 ms at M = 655,373); balance (the largest share
//! over the ideal share); disruption (slots whose backend changed when one backend leaves
//! or joins, over the ideal 1/N).
use std::time::Instant;

use anyhow::Result;
use lb_bench::{live::pin_to_cpu, out};
use lb_userspace::maglev::{build, MaglevInput};
use serde_json::json;

const SEED: u32 = 0x5eed_1234;

fn names(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("198.18.{}.{}", 20 + i / 250, 1 + i % 250))
        .collect()
}

fn inputs(names: &[String], weight: impl Fn(usize) -> u32) -> Vec<MaglevInput<'_>> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| MaglevInput {
            name: n.as_bytes(),
            weight: weight(i),
        })
        .collect()
}

/// Table entries as names, so tables over different inputs compare.
fn by_name<'a>(t: &[u32], inp: &[MaglevInput<'a>]) -> Vec<&'a [u8]> {
    t.iter().map(|&i| inp[i as usize].name).collect()
}

fn moved(a: &[&[u8]], b: &[&[u8]]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / a.len() as f64
}

fn main() -> Result<()> {
    pin_to_cpu(1)?;
    let quick = out::quick();
    let ms: &[u32] = &[65_537, 655_373];
    let ns: &[usize] = &[10, 100, 1_000];
    println!(
        "Maglev (weighted, equal weights unless said): build time median of runs on CPU 1, \
         balance = largest share / ideal share, disruption = slots moved / ideal (1/N)"
    );
    println!(
        "{:>8} {:>6} {:>10} {:>9} {:>9} {:>12} {:>9} {:>12} {:>9}",
        "M",
        "N",
        "build ms",
        "paper ms",
        "balance",
        "leave moved",
        "x ideal",
        "join moved",
        "x ideal"
    );
    for &m in ms {
        for &n in ns {
            let nm = names(n + 1);
            let all = inputs(&nm, |_| 1);
            let base = &all[..n];
            let runs = if quick || m > 100_000 { 5 } else { 15 };
            let mut times = Vec::new();
            let mut table = Vec::new();
            for _ in 0..runs {
                let t = Instant::now();
                table = build(SEED, base, m)?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            let ms_build = out::median(&mut times);
            let mut count = vec![0u64; n];
            for &e in &table {
                count[e as usize] += 1;
            }
            let ideal = m as f64 / n as f64;
            let balance = *count.iter().max().unwrap() as f64 / ideal;
            // One leaves (the middle one), one joins (the spare name).
            let t0 = by_name(&table, base);
            let mut leave_in = base.to_vec();
            leave_in.remove(n / 2);
            let t_leave = by_name(&build(SEED, &leave_in, m)?, &leave_in);
            let t_join = by_name(&build(SEED, &all, m)?, &all);
            let (leave, join) = (moved(&t0, &t_leave), moved(&t0, &t_join));
            let ideal_leave = 1.0 / n as f64;
            let ideal_join = 1.0 / (n + 1) as f64;
            let paper = match (m, n) {
                (65_537, 1_000) => Some(1.8),
                (655_373, 1_000) => Some(22.9),
                _ => None,
            };
            println!(
                "{:>8} {:>6} {:>10.2} {:>9} {:>9.4} {:>11.3}% {:>8.2}x {:>11.3}% {:>8.2}x",
                m,
                n,
                ms_build,
                paper.map_or("-".into(), |p: f64| format!("{p:.1}")),
                balance,
                leave * 100.0,
                leave / ideal_leave,
                join * 100.0,
                join / ideal_join
            );
            out::record(
                "maglev",
                json!({"m": m, "n": n, "weighted": false, "build_ms": ms_build, "paper_ms": paper,
                       "balance": balance, "leave_moved": leave, "leave_x_ideal": leave / ideal_leave,
                       "join_moved": join, "join_x_ideal": join / ideal_join, "runs": runs}),
            )?;
        }
    }
    // Weighted: weights 1, 2, 3, 4 repeating; the ideal share is weight / total.
    println!("\nweighted (weights 1, 2, 3, 4 repeating), M = 65,537:");
    println!(
        "{:>6} {:>10} {:>9} {:>14}",
        "N", "build ms", "balance", "weight 4 -> 1"
    );
    for &n in ns {
        let nm = names(n);
        let w = |i: usize| 1 + (i % 4) as u32;
        let inp = inputs(&nm, w);
        let mut times = Vec::new();
        let mut table = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            table = build(SEED, &inp, 65_537)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let total: u32 = (0..n).map(w).sum();
        let mut count = vec![0u64; n];
        for &e in &table {
            count[e as usize] += 1;
        }
        let balance = (0..n)
            .map(|i| count[i] as f64 / (65_537.0 * w(i) as f64 / total as f64))
            .fold(0.0, f64::max);
        // A weight change moves only what it must: backend 3 (weight 4) down to 1.
        let mut changed = inp.clone();
        changed[3].weight = 1;
        let t_changed = by_name(&build(SEED, &changed, 65_537)?, &changed);
        let mv = moved(&by_name(&table, &inp), &t_changed);
        let ms_build = out::median(&mut times);
        println!(
            "{:>6} {:>10.2} {:>9.4} {:>13.3}%",
            n,
            ms_build,
            balance,
            mv * 100.0
        );
        out::record(
            "maglev",
            json!({"m": 65_537, "n": n, "weighted": true, "build_ms": ms_build,
                   "balance": balance, "weight_change_moved": mv}),
        )?;
    }
    Ok(())
}
