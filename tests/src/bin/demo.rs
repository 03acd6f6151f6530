//! `cargo xtask demo` (for now): the data plane at work on an embedded default config,
//! driven through BPF_PROG_TEST_RUN on the real compiled program. Sends 20,000 new TCP
//! flows to an IPv4 and an IPv6 VIP, shows where they went next to the configured weights
//! and the program's own counters, then takes a backend down and drains another.
//! (The namespace testbed with real HTTP backends is issue 3/6.)
use std::{collections::BTreeMap, net::IpAddr};

use anyhow::Result;
use lb_common::*;
use lb_tests::{
    fixture::{v4, v6, Fixture},
    harness::{run, test_sizes},
    model::Model,
    packets::Opts,
};
use lb_userspace::dataplane::Dataplane;

const FLOWS: u32 = 20_000;

fn client(i: u32, six: bool) -> IpAddr {
    if six {
        v6(100, i as u16)
    } else {
        v4(100 + (i >> 8) as u8, i as u8)
    }
}

/// Send one ACK on each of `FLOWS` flows from port `port0..`; count packets per backend.
fn send(dp: &mut Dataplane, fx: &Fixture, vip: usize, port0: u16) -> Result<BTreeMap<u32, u32>> {
    let v = &fx.vips[vip];
    let mut hits = BTreeMap::new();
    let before: Vec<Counters> = (0..fx.backends.len() as u32)
        .map(|b| dp.backend_counters(b))
        .collect::<Result<_>>()?;
    for i in 0..FLOWS {
        let f = Opts::default().tcp(
            client(i, v.addr.is_ipv6()),
            port0 + (i % 7) as u16,
            v.addr,
            v.port,
            b"GET /",
        );
        let r = run(dp, "lb", &f)?;
        assert_eq!(r.action, 3, "not forwarded");
    }
    for b in 0..fx.backends.len() as u32 {
        let n = dp.backend_counters(b)?.packets - before[b as usize].packets;
        if n > 0 {
            hits.insert(b, n as u32);
        }
    }
    Ok(hits)
}

fn table(fx: &Fixture, vip: usize, title: &str, hits: &BTreeMap<u32, u32>) {
    let v = &fx.vips[vip];
    let total_w: u32 = v
        .backends
        .iter()
        .filter(|&&b| fx.backends[b as usize].state == BACKEND_UP)
        .map(|&b| fx.backends[b as usize].weight)
        .sum();
    println!("\n{title}");
    println!(
        "  {:<22} {:>6} {:>10} {:>8} {:>8}",
        "backend", "weight", "state", "flows", "share"
    );
    for &b in &v.backends {
        let be = &fx.backends[b as usize];
        let n = hits.get(&b).copied().unwrap_or(0);
        let state = match be.state {
            BACKEND_UP => "up",
            BACKEND_DRAINING => "draining",
            BACKEND_DOWN => "down",
            _ => "-",
        };
        let want = if be.state == BACKEND_UP {
            format!("(w {:.1}%)", 100.0 * be.weight as f64 / total_w as f64)
        } else {
            String::new()
        };
        println!(
            "  {:<22} {:>6} {:>10} {:>8} {:>7.1}% {}",
            be.addr,
            be.weight,
            state,
            n,
            100.0 * n as f64 / FLOWS as f64,
            want
        );
    }
}

fn rebuild(dp: &mut Dataplane, fx: &Fixture, vip: usize, which: u32) -> Result<()> {
    let ring = fx.ring(vip);
    dp.write_ring(vip as u32, which, &ring)?;
    let mut meta = fx.meta(vip, ring.len(), dp.sizes.ring_stride);
    meta.ring_base += which * dp.sizes.ring_stride;
    dp.set_vip(&fx.vips[vip].key(), &meta)
}

fn main() -> Result<()> {
    let mut dp = Dataplane::load(test_sizes())?;
    let mut fx = Fixture::standard();
    fx.apply(&mut dp, &mut Model::default())?;
    println!("lb demo: real XDP program, BPF_PROG_TEST_RUN, {FLOWS} TCP flows per step");
    for (vip, name) in [
        (0usize, "IPv4 VIP 198.18.10.1:80 (ipip)"),
        (1, "IPv6 VIP [2001:db8:10::1]:80 (ipip)"),
    ] {
        let hits = send(&mut dp, &fx, vip, 1000)?;
        table(&fx, vip, &format!("{name}: new flows by backend"), &hits);
    }

    let (down, drain) = (3u32, 2u32);
    println!(
        "\nbackend {} goes DOWN, backend {} is DRAINED; rings rebuilt without them",
        fx.backends[down as usize].addr, fx.backends[drain as usize].addr
    );
    fx.backends[down as usize].state = BACKEND_DOWN;
    fx.backends[drain as usize].state = BACKEND_DRAINING;
    for b in [down, drain] {
        dp.set_backend(b, &fx.backend(b))?;
    }
    rebuild(&mut dp, &fx, 0, 1)?;
    let hits = send(&mut dp, &fx, 0, 1000)?;
    table(
        &fx,
        0,
        "the same flows again: the down backend's flows moved, the draining one kept its own",
        &hits,
    );
    let hits = send(&mut dp, &fx, 0, 3000)?;
    table(&fx, 0, "brand-new flows: only the up backends", &hits);

    println!("\nreason counters of the lb program:");
    for (r, n) in Reason::ALL.iter().zip(dp.reason_counts()?) {
        if n > 0 {
            println!("  {:<24} {n}", r.name());
        }
    }
    Ok(())
}
