//! Differential test: well over 100,000 random and mutated frames go through the real `lb`
//! program (BPF_PROG_TEST_RUN) and through the pure-Rust reference model written separately
//! from docs/dataplane.md. Verdict and output bytes must agree on every frame, and the
//! counters, connection table and `decap` results must agree at the end.
//!
//! The fixture gets stateless VIPs too, whose ring words carry secondaries (valid ones and
//! ones of another VIP, another family, down or missing), one of them on an address that
//! conntrack VIPs share (so those take the "stateless address" path). `decap` meets their
//! GUE variant 0 frames, tweaked and mutated, in an empty network namespace: no socket,
//! no route, so every second chance goes through the stack (`RedirectedStack`).
//!
//! Reproduce a failure with `LB_DIFF_SEED=<seed> cargo test --release --test differential`.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::*;
use lb_tests::{
    fixture::{v4, v6, BackendSpec, Fixture, VipSpec},
    harness::{run, test_sizes},
    model::{self, Model},
    netns::Netns,
    packets::{self, Opts},
};
use lb_userspace::dataplane::{Dataplane, Sizes};
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

/// Room for the standard fixture's VIPs and the stateless ones (and a free id to move a
/// VIP to).
fn sizes() -> Sizes {
    Sizes {
        max_vips: 24,
        ..test_sizes()
    }
}

/// Add stateless GUE VIPs to the fixture (applied as conntrack VIPs by `Fixture::apply`,
/// then made stateless by [`make_stateless`]); returns their indices. Each has backend ids
/// of its own: four of its family and one of the other (a secondary of the other family
/// is never carried; a primary of it gives 4-in-6 / 6-in-4).
fn add_stateless(fx: &mut Fixture) -> Vec<usize> {
    let specs = [
        // Shares 198.18.10.1 with conntrack VIPs (ports 80-82).
        (v4(10, 1), 90, PROTO_TCP, false),
        (v6(10, 5), 90, PROTO_TCP, true),
        (v4(10, 6), 91, PROTO_UDP, false),
    ];
    let mut out = Vec::new();
    for (addr, port, proto, six) in specs {
        let i = fx.vips.len();
        let mut v = VipSpec {
            addr,
            port,
            proto,
            forwarding: Forwarding::Gue,
            affinity: false,
            backends: Vec::new(),
        };
        for k in 0..5u16 {
            let other = k == 4;
            let addr = if six != other {
                v6(21 + i as u16, 10 + k)
            } else {
                v4(21 + i as u8, 10 + k as u8)
            };
            v.backends.push(fx.backends.len() as u32);
            fx.backends.push(BackendSpec {
                addr,
                weight: 1 + k as u32 % 3,
                mac: [0x02, 0, 0, 0x21, i as u8, k as u8],
                state: BACKEND_UP,
                vip: i as u32,
            });
        }
        fx.vips.push(v);
        out.push(i);
    }
    out
}

/// A stateless VIP's ring: Maglev's primaries, each with a secondary that is mostly one of
/// the VIP's members (so sometimes the primary itself: none, or of the other family),
/// else another VIP's backend, an unused id, or an id beyond `BACKENDS`.
fn stateless_words(fx: &Fixture, i: usize, rng: &mut StdRng) -> Vec<u32> {
    let members = &fx.vips[i].backends;
    let n = fx.backends.len() as u32;
    fx.ring(i)
        .into_iter()
        .map(|p| {
            let s = match rng.gen_range(0..10) {
                0..=6 => members[rng.gen_range(0..members.len())],
                7 => rng.gen_range(0..n),
                8 if rng.gen_bool(0.5) => p,
                8 => rng.gen_range(n..sizes().max_backends),
                _ => 0xffff,
            };
            (s << 16) | p
        })
        .collect()
}

/// Write VIP `i`'s ring as slot words and flag it stateless, in the kernel and the model.
fn make_stateless(fx: &Fixture, dp: &mut Dataplane, model: &mut Model, i: usize, rng: &mut StdRng) {
    let key = fx.vips[i].key();
    let mut meta = model.vips[&key];
    let words = stateless_words(fx, i, rng);
    let base = dp.write_ring(meta.id, 0, &words).unwrap();
    for (s, w) in words.iter().enumerate() {
        model.rings.insert(base + s as u32, *w);
    }
    meta.ring_base = base;
    meta.ring_size = words.len() as u32;
    meta.flags |= VIP_F_STATELESS;
    dp.set_vip(&key, &meta).unwrap();
    model.vips.insert(key, meta);
}

/// Where our GUE variant 0 header is in an encapsulated frame (as `lb` writes it: a
/// 20-byte outer IPv4 header or IPv6, UDP to 6080, variant 0 with our hlen).
struct Gue0 {
    l3: usize,
    /// Offset of the GUE header.
    gue: usize,
    /// Offset of the private data ("LB", flags, 0, address).
    private: usize,
    /// Offset of the inner IP packet.
    inner: usize,
}

fn gue0(f: &[u8]) -> Option<Gue0> {
    let l3 = if f.get(12..14)? == [0x81, 0] { 18 } else { 14 };
    let outer6 = f.get(l3 - 2..l3)? == [0x86, 0xdd];
    let udp = l3 + if outer6 { 40 } else { 20 };
    let gue = udp + 8;
    let hlen = if outer6 { 5 } else { 2 };
    let ours = f.get(l3 + if outer6 { 6 } else { 9 }) == Some(&PROTO_UDP)
        && f.get(udp + 2..udp + 4)? == [0x17, 0xc0]
        && *f.get(gue)? == hlen;
    ours.then_some(Gue0 {
        l3,
        gue,
        private: gue + 4,
        inner: gue + 4 + 4 * hlen as usize,
    })
}

/// Change what decides a second chance in a GUE variant 0 frame: its flags (redirected
/// already, no secondary, random), the inner TCP flags (SYN, SYN+ACK, RST, ...), the GUE
/// header bytes (hlen, C bit, protocol), the magic, the secondary, outer IPv4 options; or what
/// a redirect rewrites (TTL / hop limit and UDP checksum, as routers and senders leave
/// them).
fn tweak_gue0(rng: &mut StdRng, mut f: Vec<u8>) -> Vec<u8> {
    let Some(g) = gue0(&f) else {
        return f;
    };
    if rng.gen_bool(0.3) {
        let six = f[g.l3] >> 4 == 6;
        f[g.l3 + if six { 7 } else { 8 }] = rng.gen();
        f[g.gue - 2] = rng.gen();
        f[g.gue - 1] = rng.gen();
    }
    match rng.gen_range(0..10) {
        0..=2 => {
            f[g.private + 2] =
                [0, GUE_F_SECOND, GUE_F_REDIRECTED, 3, rng.gen()][rng.gen_range(0..5)]
        }
        3..=5 => {
            let inner6 = f[g.gue + 1] == 41;
            let th = if inner6 {
                (f.get(g.inner + 6) == Some(&PROTO_TCP)).then_some(g.inner + 40)
            } else {
                let ihl = 4 * (f[g.inner] & 0xf) as usize;
                (f.get(g.inner + 9) == Some(&PROTO_TCP)).then_some(g.inner + ihl)
            };
            if let Some(th) = th.filter(|&th| th + 14 <= f.len()) {
                f[th + 13] = [0x02, 0x12, 0x10, 0x04, 0x14, 0x11, rng.gen()][rng.gen_range(0..7)];
            }
        }
        6 => f[g.gue] = rng.gen(),
        7 => f[g.gue + 1] = [4, 41, 6, rng.gen()][rng.gen_range(0..4)],
        8 => {
            let i = g.private + rng.gen_range(0..2);
            f[i] ^= 1 << rng.gen_range(0..8);
        }
        _ => {
            if f[g.l3] == 0x45 && rng.gen_bool(0.3) {
                // Outer IPv4 options (NOPs): decapsulated as well, never redirected.
                f.splice(g.l3 + 20..g.l3 + 20, [1u8; 4]);
                f[g.l3] = 0x46;
                let tot = u16::from_be_bytes([f[g.l3 + 2], f[g.l3 + 3]]).wrapping_add(4);
                f[g.l3 + 2..g.l3 + 4].copy_from_slice(&tot.to_be_bytes());
            } else {
                let i = g.private + 4 + rng.gen_range(0..4);
                f[i] = rng.gen();
            }
        }
    }
    f
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
    let mut dp = Dataplane::load(sizes()).unwrap();
    let mut model = Model::default();
    let mut fx = Fixture::standard();
    let mut stateless = add_stateless(&mut fx);
    fx.apply(&mut dp, &mut model).unwrap();
    for &i in &stateless {
        make_stateless(&fx, &mut dp, &mut model, i, &mut rng);
    }
    // Rings that name a draining and a down backend, as primaries and as secondaries.
    for (&i, state) in stateless.iter().zip([BACKEND_DRAINING, BACKEND_DOWN]) {
        let id = fx.vips[i].backends[1];
        fx.backends[id as usize].state = state;
        let be = fx.backend(id);
        dp.set_backend(id, &be).unwrap();
        model.backends[id as usize] = be;
    }

    // VIP index in the fixture → its current id (they move, see below).
    let mut vip_ids: Vec<u32> = (0..fx.vips.len() as u32).collect();
    let mut mismatches = Vec::new();
    let mut tx = 0;
    // Stateless VIPs' forwarded frames with and without a secondary carried.
    let (mut carried, mut alone) = (0, 0);
    for n in 0..FRAMES {
        // A third of the way in, two conntrack GUE VIPs (TCP over IPv4, UDP over IPv6)
        // turn stateless with their connection entries still in CONNS: from then on those
        // are neither read, refreshed nor removed.
        if n == FRAMES / 3 {
            for i in [4, 7] {
                let v = &fx.vips[i];
                assert_eq!(v.forwarding, Forwarding::Gue);
                let ids = v.backends.clone();
                assert!(
                    model.conns.values().any(|c| ids.contains(&c.backend)),
                    "VIP {i} has entries"
                );
                make_stateless(&fx, &mut dp, &mut model, i, &mut rng);
                stateless.push(i);
            }
        }
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
            let id = (0..sizes().max_vips)
                .find(|id| !used.contains(id) && *id != old.id)
                .unwrap();
            let ring = if stateless.contains(&i) {
                // Half the time its members follow it (new memberships, as the agent
                // makes them), so that secondaries are carried again.
                if rng.gen_bool(0.5) {
                    for b in fx.vips[i].backends.clone() {
                        if fx.backends[b as usize].vip == old.id {
                            fx.backends[b as usize].vip = id;
                            let be = fx.backend(b);
                            dp.set_backend(b, &be).unwrap();
                            model.backends[b as usize] = be;
                        }
                    }
                }
                stateless_words(&fx, i, &mut rng)
            } else {
                fx.ring(i)
            };
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
        match gue0(&want.frame) {
            Some(g) if want.action == model::Action::Tx => {
                assert_eq!(
                    want.frame[g.private + 2] == GUE_F_SECOND,
                    want.second.is_some()
                );
                if want.second.is_some() {
                    carried += 1;
                } else {
                    alone += 1;
                }
            }
            _ => assert!(want.second.is_none()),
        }
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
    println!("stateless frames: {carried} with a secondary, {alone} without");
    assert!(
        carried > 500 && alone > 500,
        "stateless frames: {carried} with a secondary, {alone} without"
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

/// `decap` in an empty namespace (no socket, no route, forwarding off): a packet of no
/// local connection with a second chance is rewritten and passed to the stack, exactly as
/// the model's `decap` (`local = |_| false`, `fib = None`) says.
#[test]
fn decap_and_model_agree_on_random_and_mutated_frames_with_no_socket_and_no_route() {
    let ns = Netns::new("diff-decap").unwrap();
    ns.run_in(decap_differential).unwrap();
}

fn decap_differential() {
    // BPF_PROG_TEST_RUN's socket and FIB lookups see this thread's namespace.
    let forwarding = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    assert_eq!(
        forwarding.trim(),
        "0",
        "forwarding off in the fresh namespace"
    );
    let mut rng = StdRng::seed_from_u64(7);
    let mut dp = Dataplane::load(sizes()).unwrap();
    let mut model = Model::default();
    let mut fx = Fixture::standard();
    let stateless = add_stateless(&mut fx);
    fx.apply(&mut dp, &mut model).unwrap();
    for &i in &stateless {
        make_stateless(&fx, &mut dp, &mut model, i, &mut rng);
    }
    // Most frames to the stateless VIPs: theirs are the ones with a second chance.
    let only_stateless = Fixture {
        vips: stateless.iter().map(|&i| fx.vips[i].clone()).collect(),
        ..fx.clone()
    };
    let mut reasons = [0u64; NUM_DECAP_REASONS as usize];
    const N: usize = 60_000;
    for n in 0..N {
        // Encapsulated frames come from the lb program itself, then get tweaked / mutated.
        let to = if rng.gen_bool(0.6) {
            &only_stateless
        } else {
            &fx
        };
        // Mostly frames the model forwards (a few tries), else whatever came.
        let tries = if rng.gen_bool(0.8) { 4 } else { 1 };
        let mut f = Vec::new();
        for _ in 0..tries {
            let frame = base_frame(&mut rng, to);
            let lb_out = model.lb(&frame);
            if lb_out.action == model::Action::Tx {
                f = lb_out.frame;
                break;
            }
            f = frame;
        }
        if rng.gen_bool(0.4) {
            f = tweak_gue0(&mut rng, f);
        }
        if rng.gen_bool(0.3) {
            f = mutate(&mut rng, f);
        }
        let got = run(&mut dp, "decap", &f).unwrap();
        let (action, reason, out) = model::decap(&f);
        reasons[reason as usize] += 1;
        assert_eq!(
            (got.action, &got.frame),
            (action.xdp_code(), &out),
            "frame #{n} {f:02x?}: model says {reason:?}"
        );
    }
    // Every frame counted under the model's reason; each reason seen often enough.
    let counts = dp.decap_counts().unwrap();
    for r in DecapReason::ALL {
        assert_eq!(
            counts[r as usize],
            reasons[r as usize],
            "DECAP_STATS[{}]",
            r.name()
        );
    }
    println!("decap reasons: {reasons:?}");
    for (r, min) in [
        (DecapReason::Pass, 2000),
        (DecapReason::Decapped, 6000),
        (DecapReason::DropMalformed, 1000),
        (DecapReason::RedirectedStack, 1000),
        (DecapReason::NoSecondChance, 1000),
    ] {
        assert!(
            reasons[r as usize] >= min,
            "only {} frames {}",
            reasons[r as usize],
            r.name()
        );
    }
    assert_eq!(
        reasons[DecapReason::Redirected as usize],
        0,
        "no route here"
    );
}
