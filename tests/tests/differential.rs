//! Differential test: well over 100,000 random and mutated frames go through the real `lb`
//! program (BPF_PROG_TEST_RUN) and through the pure-Rust reference model written separately
//! from docs/dataplane.md. Verdict and output bytes must agree on every frame, and the
//! counters, connection table and `decap` results must agree at the end.
//!
//! Reproduce a failure with `LB_DIFF_SEED=<seed> cargo test --release --test differential`.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::*;
use lb_tests::{
    fixture::{v4, v6, Fixture},
    harness::{run, test_sizes},
    model::{self, Model},
    packets::{self, Opts},
};
use lb_userspace::dataplane::Dataplane;
use rand::{rngs::StdRng, Rng, SeedableRng};

const FRAMES: usize = 120_000;
/// Distinct clients: the model's table is unbounded, the kernel's LRU is not; stay well
/// under capacity so eviction never makes them differ.
const CLIENTS: u32 = 3000;

fn client(rng: &mut StdRng, family6: bool) -> IpAddr {
    let i = rng.gen_range(0..CLIENTS);
    if family6 {
        v6(100, i as u16)
    } else {
        v4(100 + (i >> 8) as u8, i as u8)
    }
}

fn as4(a: IpAddr) -> Ipv4Addr {
    match a {
        IpAddr::V4(a) => a,
        _ => unreachable!(),
    }
}
fn as6(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V6(a) => a,
        _ => unreachable!(),
    }
}

/// A plausible frame: to a VIP or not, TCP/UDP/ICMP/other, options, VLAN, fragments, sizes
/// up to beyond the MTU.
fn base_frame(rng: &mut StdRng, fx: &Fixture) -> Vec<u8> {
    let vip = &fx.vips[rng.gen_range(0..fx.vips.len())];
    let six = vip.addr.is_ipv6();
    let mut o = Opts::default();
    if rng.gen_bool(0.2) {
        o = o.with_vlan(rng.gen_range(1..4095));
    }
    o.tos = if rng.gen_bool(0.3) { rng.gen() } else { 0 };
    o.df = rng.gen_bool(0.5);
    o.syn = rng.gen_bool(0.3);
    o.fin = rng.gen_bool(0.05);
    o.rst = rng.gen_bool(0.03);
    if !six && rng.gen_bool(0.1) {
        o.ipv4_options = vec![1; 4 * rng.gen_range(1..=10)];
    }
    if rng.gen_bool(0.05) {
        if six {
            o.ipv6_fragment = true;
        } else {
            o.more_fragments = true;
        }
        o.frag_offset = rng.gen_range(0..3);
    }
    if rng.gen_bool(0.1) {
        o.padding = rng.gen_range(1..20);
    }
    let src = client(rng, six);
    let dst = if rng.gen_bool(0.85) {
        vip.addr
    } else if six {
        v6(30, rng.gen_range(1..4))
    } else {
        v4(30, rng.gen_range(1..4))
    };
    let sport = 1024 + rng.gen_range(0..8) as u16;
    let dport = if rng.gen_bool(0.9) {
        vip.port
    } else {
        rng.gen_range(1..200)
    };
    let len = match rng.gen_range(0..10) {
        0 => rng.gen_range(1400..1500),
        1 => rng.gen_range(0..1600),
        _ => rng.gen_range(0..64),
    };
    let payload: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
    match rng.gen_range(0..21) {
        0..=7 => o.tcp(src, sport, dst, dport, &payload),
        8..=14 => o.udp(src, sport, dst, dport, &payload),
        15..=17 => {
            // An ICMP error about a VIP flow (VIP -> client), from some router.
            let quoted_full = if rng.gen_bool(0.5) {
                Opts::default().tcp(vip.addr, vip.port, src, sport, &payload[..len.min(40)])
            } else {
                Opts::default().udp(vip.addr, vip.port, src, sport, &payload[..len.min(40)])
            };
            let mut quoted = packets::ip_packet(&quoted_full);
            quoted.truncate(rng.gen_range(20..=quoted.len()));
            if six {
                let router = as6(v6(40, 1));
                if rng.gen_bool(0.5) {
                    packets::icmp6_packet_too_big(router, as6(vip.addr), 1400, &quoted)
                } else {
                    packets::icmp6_dest_unreach(router, as6(vip.addr), &quoted)
                }
            } else {
                let router = as4(v4(40, 1));
                if rng.gen_bool(0.5) {
                    packets::icmp4_dest_unreach(router, as4(vip.addr), 1400, &quoted)
                } else {
                    packets::icmp4_time_exceeded(router, as4(vip.addr), &quoted)
                }
            }
        }
        18 => Opts {
            ipv6_fragment: false,
            ..o
        }
        .ip_raw(src, dst, [47, 132, 1, 58, 2][rng.gen_range(0..5)], &payload),
        // Pings, to the VIP address or elsewhere.
        19 => {
            let echo = etherparse::IcmpEchoHeader {
                id: rng.gen(),
                seq: rng.gen(),
            };
            let o = Opts {
                ipv6_fragment: false,
                ..o
            };
            match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    o.icmp4(s, d, etherparse::Icmpv4Type::EchoRequest(echo), &payload)
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    o.icmp6(s, d, etherparse::Icmpv6Type::EchoRequest(echo), &payload)
                }
                _ => unreachable!(),
            }
        }
        _ => packets::raw_ether(
            [0x0806, 0x88cc, 0x8100, 0x0800, 0x86dd][rng.gen_range(0..5)],
            None,
            &payload,
        ),
    }
}

/// Flip, overwrite, truncate or extend: the header bytes get most of the attention.
fn mutate(rng: &mut StdRng, mut f: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.gen_range(1..=3) {
        match rng.gen_range(0..5) {
            0 if f.len() > 14 => {
                let n = rng.gen_range(14..f.len());
                f.truncate(n);
            }
            1 => {
                let n = rng.gen_range(1..64);
                f.extend((0..n).map(|_| rng.gen::<u8>()));
            }
            _ => {
                let hi = f.len().min(80);
                let i = rng.gen_range(0..hi);
                f[i] = if rng.gen_bool(0.5) {
                    rng.gen()
                } else {
                    f[i] ^ (1 << rng.gen_range(0..8))
                };
            }
        }
    }
    f
}

#[test]
fn program_and_model_agree_on_random_and_mutated_frames() {
    let seed: u64 = std::env::var("LB_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x1b_d1ff);
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut dp = Dataplane::load(test_sizes()).unwrap();
    let mut model = Model::default();
    let mut fx = Fixture::standard();
    fx.apply(&mut dp, &mut model).unwrap();

    // VIP index in the fixture → its current id (they move, see below).
    let mut vip_ids: Vec<u32> = (0..fx.vips.len() as u32).collect();
    let mut mismatches = Vec::new();
    let mut tx = 0;
    for n in 0..FRAMES {
        // Now and then a backend changes state under traffic (rings left as they are, so the
        // data plane also meets rings that name DOWN or DRAINING backends).
        if n % 5000 == 4999 {
            let id = rng.gen_range(0..fx.backends.len() as u32);
            let state = [BACKEND_UP, BACKEND_DOWN, BACKEND_DRAINING][rng.gen_range(0..3)];
            fx.backends[id as usize].state = state;
            let be = fx.backend(id);
            dp.set_backend(id, &be).unwrap();
            model.backends[id as usize] = be;
        }
        // Now and then a backend id leaves its VIP: retired, or handed to another VIP (as
        // an id is after its quarantine). Entries naming it must stop holding.
        if n % 6000 == 5999 {
            let id = rng.gen_range(0..fx.backends.len() as u32);
            let mut be = fx.backend(id);
            if rng.gen_bool(0.5) {
                be.state = BACKEND_RETIRED;
            } else {
                be.vip = vip_ids[rng.gen_range(0..vip_ids.len())];
            }
            fx.backends[id as usize].state = be.state;
            fx.backends[id as usize].vip = be.vip;
            dp.set_backend(id, &be).unwrap();
            model.backends[id as usize] = be;
        }
        // Now and then a VIP is removed and added again under another id (its ring moved to
        // that id's buffer): its established flows' entries name the old id.
        if n % 7000 == 6999 {
            let i = rng.gen_range(0..fx.vips.len());
            let key = fx.vips[i].key();
            let old = model.vips.remove(&key).unwrap();
            dp.remove_vip(&key).unwrap();
            let used: Vec<u32> = model.vips.values().map(|m| m.id).collect();
            let id = (0..test_sizes().max_vips)
                .find(|id| !used.contains(id) && *id != old.id)
                .unwrap();
            let ring = fx.ring(i);
            let base = dp.write_ring(id, 0, &ring).unwrap();
            for (s, b) in ring.iter().enumerate() {
                model.rings.insert(base + s as u32, *b);
            }
            let meta = VipMeta {
                id,
                ring_base: base,
                ..old
            };
            dp.set_vip(&key, &meta).unwrap();
            model.vips.insert(key, meta);
            vip_ids[i] = id;
        }
        let mut frame = base_frame(&mut rng, &fx);
        if rng.gen_bool(0.4) {
            frame = mutate(&mut rng, frame);
        }
        let got = run(&mut dp, "lb", &frame).unwrap();
        let want = model.lb(&frame);
        tx += (got.action == 3) as usize;
        if got.action != want.action.xdp_code() || got.frame != want.frame {
            if mismatches.len() < 5 {
                mismatches.push(format!(
                    "frame #{n}: {frame:02x?}\n  program: action {} bytes {:02x?}\n  model:   {:?} {:?} bytes {:02x?}",
                    got.action, got.frame, want.action, want.reason, want.frame
                ));
            } else {
                mismatches.push(String::new());
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches of {FRAMES}:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    assert!(
        tx > FRAMES / 5,
        "too few forwarded frames ({tx}) for the test to mean much"
    );

    // Every frame counted under exactly the reason the model gave.
    let counts = dp.reason_counts().unwrap();
    for r in Reason::ALL {
        assert_eq!(
            counts[r as usize],
            model.stats[r as usize],
            "STATS[{}]",
            r.name()
        );
    }
    assert_eq!(counts.iter().sum::<u64>(), FRAMES as u64);
    for id in 0..test_sizes().max_vips {
        let want = model.vip_stats.get(&id).copied().unwrap_or_default();
        assert_eq!(dp.vip_counters(id).unwrap(), want, "VIP_STATS[{id}]");
    }
    println!("VIP ids at the end: {vip_ids:?}");
    for id in 0..fx.backends.len() as u32 {
        let want = model.be_stats.get(&id).copied().unwrap_or_default();
        assert_eq!(dp.backend_counters(id).unwrap(), want, "BE_STATS[{id}]");
    }
    // The connection table holds exactly what the model says (the time of last use is the
    // kernel's clock: it is only checked to be set).
    let mut kernel: Vec<(FlowKey, ConnVal)> = dp.conns.iter().map(|e| e.unwrap()).collect();
    assert!(kernel.iter().all(|(_, v)| v.atime != 0), "atime set");
    for (_, v) in kernel.iter_mut() {
        v.atime = 0;
    }
    let mut want: Vec<(FlowKey, ConnVal)> = model.conns.iter().map(|(k, v)| (*k, *v)).collect();
    assert!(
        want.iter().any(|(_, v)| v.flags & CONN_F_CLOSING != 0)
            && want.iter().any(|(_, v)| v.flags == 0),
        "both open and closing entries"
    );
    let key = |e: &(FlowKey, ConnVal)| format!("{:?}", e.0);
    kernel.sort_by_key(key);
    want.sort_by_key(key);
    // Every entry was made on this one CPU: the table must not have needed to evict.
    let share = test_sizes().max_conns / lb_tests::support::possible_cpus();
    assert!(
        want.len() < share as usize,
        "{} entries, {share} per CPU",
        want.len()
    );
    assert_eq!(kernel.len(), want.len(), "connection table sizes");
    assert!(kernel == want, "connection tables differ");
}

#[test]
fn decap_and_model_agree_on_random_and_mutated_frames() {
    let mut rng = StdRng::seed_from_u64(7);
    let mut dp = Dataplane::load(test_sizes()).unwrap();
    let mut model = Model::default();
    let fx = Fixture::standard();
    fx.apply(&mut dp, &mut model).unwrap();
    let mut decapped = 0;
    for n in 0..40_000 {
        // Encapsulated frames come from the lb program itself, then get mutated.
        let frame = base_frame(&mut rng, &fx);
        let lb_out = model.lb(&frame);
        let mut f = if lb_out.action == model::Action::Tx {
            lb_out.frame
        } else {
            frame
        };
        if rng.gen_bool(0.5) {
            f = mutate(&mut rng, f);
        }
        let got = run(&mut dp, "decap", &f).unwrap();
        let (action, reason, out) = model::decap(&f);
        decapped += (reason == DecapReason::Decapped) as usize;
        assert_eq!(
            (got.action, &got.frame),
            (action.xdp_code(), &out),
            "frame #{n} {f:02x?}: model says {reason:?}"
        );
    }
    assert!(decapped > 6000, "only {decapped} frames decapsulated");
}
