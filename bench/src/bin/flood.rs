//! Suite item 5: established flows under a SYN flood. SYNs of new flows arrive, ten times
//! the connection table's size in all, through the `lb` program on the live wire (inline),
//! while 10,000 established flows (ACKs) either keep talking (a packet each every tenth of
//! a table turnover) or sit idle until the flood is over. Before and after, each
//! established flow's backend is read by running its next packet through the program
//! (BPF_PROG_TEST_RUN, the outer destination of what it sends). Reported: the share of
//! established flows whose connection-table entry survived, and the share that kept their
//! backend, without and with a backend change (a weight 1 -> 4) halfway through the flood.
//!
//! Then the same VIP switched to stateless (`Bench::set_vip_mode`): it keeps no entries,
//! so what is checked is that every established flow's packets still go to the same
//! backend (primary) with the same secondary after the flood as before. Without a weight
//! change only: a weight change legitimately moves slots there (their connections survive
//! by the second chance on the backends, which this suite does not run).
use anyhow::{Context, Result};
use aya::programs::{TestRun, TestRunOptions};
use lb_bench::{
    live::pin_to_cpu,
    out,
    traffic::{gen_config, min_frame, reference_frame, Mix},
    turns::{Bench, Prog, VipMode},
};
use std::net::Ipv4Addr;

use lb_common::{FlowKey, PROTO_TCP};
use lb_tests::netns::in_netns;
use lb_tests::packets::flow4;
use serde_json::json;

const ESTABLISHED: u32 = 10_000;
/// Flood frames between two rounds of established packets: the table turns over ten
/// times in the flood, each established flow sends a packet ten times per turnover.
const ROUNDS_PER_TURNOVER: u32 = 10;

/// Where `lb` sends flow `i` of `cfg`: the last byte of the outer destination (the
/// backend) and, for a stateless VIP's GUE variant 0 header, of the secondary it carries
/// (0 for none, or no such header).
fn backends_of(b: &mut Bench, cfg: &lb_common::bench::GenConfig) -> Result<Vec<[u8; 2]>> {
    let prog = b.dp.program("lb")?;
    let mut out = vec![0u8; 512];
    (0..cfg.flows)
        .map(|i| {
            let f = reference_frame(cfg, i + cfg.flow_base, 0);
            let r = prog
                .test_run(TestRunOptions {
                    data_in: Some(&f),
                    data_out: Some(&mut out),
                    repeat: 1,
                    ..Default::default()
                })
                .context("test_run lb")?;
            anyhow::ensure!(r.return_value == 3, "lb did not forward flow {i}");
            // IPv4 outer header: protocol 23, destination 30..34; UDP 34..42; GUE 42..46,
            // then "LB", flags, 0, the secondary's address 50..54.
            let second = if out[23] == 17 && out[46..48] == *b"LB" && out[48] & 1 != 0 {
                out[53]
            } else {
                0
            };
            Ok([out[33], second])
        })
        .collect()
}

/// How many of the flows of `cfg` have a connection-table entry.
fn entries(b: &Bench, cfg: &lb_common::bench::GenConfig) -> Result<u32> {
    let keys: std::collections::HashSet<FlowKey> =
        b.dp.read_conns()?.into_iter().map(|(k, _)| k).collect();
    let mut n = 0;
    for i in 0..cfg.flows {
        let f = reference_frame(cfg, i + cfg.flow_base, 0);
        // IPv4 TCP: src 26..30, dst 30..34, ports 34..38.
        let addr = |at: usize| Ipv4Addr::new(f[at], f[at + 1], f[at + 2], f[at + 3]);
        let port = |at: usize| u16::from_be_bytes([f[at], f[at + 1]]);
        let k = flow4(addr(26), port(34), addr(30), port(36), PROTO_TCP);
        n += keys.contains(&k) as u32;
    }
    Ok(n)
}

fn main() -> Result<()> {
    let quick = out::quick();
    let table: u32 = if quick { 1 << 16 } else { 1 << 20 };
    let flood = table * 10;
    let mut b = Bench::new(table)?;
    let gen_ns = b.wire.gen.name().to_string();
    println!(
        "Flood: {flood} SYNs of new flows = 10 x the {table}-entry connection table, \
         {ESTABLISHED} established IPv4 flows talking (a packet each every {} SYNs) or idle; \
         lb on the live wire, inline. Backend kept: conntrack VIP (IP in IP), the same \
         backend before and after; stateless VIP (GUE, no table: no entries), the same \
         backend and the same secondary, without a weight change (one moves slots there \
         by design, the second chance on the backends keeps their connections)",
        table / ROUNDS_PER_TURNOVER
    );
    println!(
        "{:<10} {:<12} {:<24} {:>14} {:>14}",
        "vip", "flows", "backends", "entries kept", "backend kept"
    );
    use VipMode::{Conntrack, Stateless};
    let variants = [
        (Conntrack, true, false),
        (Conntrack, true, true),
        (Conntrack, false, false),
        (Conntrack, false, true),
        (Stateless, true, false),
        (Stateless, false, false),
    ];
    for (n, (vip, talking, change)) in variants.into_iter().enumerate() {
        let variant = if change {
            "weight change mid-flood"
        } else {
            "unchanged"
        };
        // Each variant its own established flows, far from the flood's; the fixture's
        // weights as they were.
        b.fixture.backends[0].weight = 1;
        let ring = b.fixture.ring(0);
        let base = b.dp.write_ring(0, 0, &ring)?;
        let mut meta = b.fixture.meta(0, ring.len(), b.dp.sizes.ring_stride);
        meta.ring_base = base;
        b.dp.set_vip(&b.fixture.vips[0].key(), &meta)?;
        b.dp.wait_for_programs()?;
        if vip == Stateless {
            b.set_vip_mode(0, Stateless)?;
        }
        let mut est = gen_config(Mix::Established, false, ESTABLISHED, min_frame(false));
        est.flow_base = (n as u32 + 1) << 26;
        let mut syn = gen_config(Mix::Syn, false, 0, min_frame(false));
        syn.flow_base = 1 << 30;
        let chunk = if talking {
            table / ROUNDS_PER_TURNOVER
        } else {
            flood / 2
        };
        let rounds = flood / chunk;
        let (before, after, kept_entries) = in_netns(&gen_ns, || -> Result<_> {
            pin_to_cpu(0)?;
            b.turn(Prog::Lb, &est, ESTABLISHED)?;
            let before = backends_of(&mut b, &est)?;
            for r in 0..rounds {
                if change && r == rounds / 2 {
                    // Backend 0 of VIP 0 (weight 1) to weight 4: a new ring, live at once.
                    b.fixture.backends[0].weight = 4;
                    let ring = b.fixture.ring(0);
                    let which = 1;
                    let base = b.dp.write_ring(0, which, &ring)?;
                    let mut meta = b.fixture.meta(0, ring.len(), b.dp.sizes.ring_stride);
                    meta.ring_base = base;
                    let key = b.fixture.vips[0].key();
                    b.dp.set_vip(&key, &meta)?;
                }
                b.turn(Prog::Lb, &syn, chunk)?;
                if talking {
                    b.turn(Prog::Lb, &est, ESTABLISHED)?;
                }
            }
            let kept_entries = entries(&b, &est)?;
            let after = backends_of(&mut b, &est)?;
            Ok((before, after, kept_entries))
        })??;
        // Conntrack: the backend. Stateless: the backend and the secondary it carries.
        let kept = before.iter().zip(&after).filter(|(x, y)| x == y).count();
        let kept_share = kept as f64 / ESTABLISHED as f64;
        let stateless = vip == Stateless;
        if stateless {
            anyhow::ensure!(
                before.iter().all(|p| p[1] != 0),
                "a stateless VIP's packet carried no secondary"
            );
        }
        // A stateless VIP has no entries: none is expected, none is made.
        let entry_share = kept_entries as f64 / ESTABLISHED as f64;
        let flows = if talking { "talking" } else { "idle" };
        let entries_col = if stateless {
            format!("{kept_entries} (none)")
        } else {
            format!("{:.2}%", entry_share * 100.0)
        };
        println!(
            "{:<10} {:<12} {:<24} {:>14} {:>13.2}%",
            vip.name(),
            flows,
            variant,
            entries_col,
            kept_share * 100.0,
        );
        out::record(
            "flood",
            json!({"vip": vip.name(), "flows": flows, "backends": variant,
                   "backend_change": change,
                   "established": ESTABLISHED, "table": table, "flood": flood,
                   "entries_kept": (!stateless).then_some(entry_share),
                   "entries": kept_entries,
                   "checked": if stateless {
                       "same backend and same secondary before and after"
                   } else {
                       "same backend before and after"
                   },
                   "backend_kept": kept_share}),
        )?;
    }
    b.set_vip_mode(0, Conntrack)?;
    Ok(())
}
