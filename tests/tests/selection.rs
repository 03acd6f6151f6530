//! Backend selection through the real `lb` program: connection-table stickiness across
//! ring changes, failover away from DOWN backends, draining, weights, session affinity,
//! counters, and an empty ring. Expected backends come from the fixture's Maglev rings and
//! `flow_hash` (docs/dataplane.md "a TCP/UDP packet to a VIP"), never from the program.
mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use common::*;
use lb_common::{Counters, FlowKey, Reason, VipMeta, BACKEND_DOWN, BACKEND_DRAINING};
use lb_tests::fixture::{v4, v6};
use lb_tests::harness;
use lb_tests::packets::{ip_packet, Opts, TCP, UDP};

/// A client -> VIP frame of VIP `vip`'s protocol with `payload`.
fn input_for(env: &Env, vip: usize, client: IpAddr, sport: u16, payload: &[u8]) -> Vec<u8> {
    let v = &env.fx.vips[vip];
    let o = Opts::default();
    if v.proto == TCP {
        o.tcp(client, sport, v.addr, v.port, payload)
    } else {
        o.udp(client, sport, v.addr, v.port, payload)
    }
}

fn flow_of(env: &Env, vip: usize, client: IpAddr, sport: u16) -> FlowKey {
    let v = &env.fx.vips[vip];
    flow(client, sport, v.addr, v.port, v.proto)
}

/// Send one packet of the flow client:sport -> VIP `vip`; require it forwarded to backend
/// `want` with the expected bytes. Returns the frame length.
#[track_caller]
fn send_expect(
    env: &mut Env,
    vip: usize,
    client: IpAddr,
    sport: u16,
    want: u32,
    ctx: &str,
) -> usize {
    let payload = vec![0xab; (sport % 64) as usize];
    let input = input_for(env, vip, client, sport, &payload);
    let fl = flow_of(env, vip, client, sport);
    let (run, reason) = env.lb(&input);
    let ctx = format!("{ctx}: VIP {vip}, flow {client} port {sport}, want backend {want}");
    assert_eq!((run.action, reason), (XDP_TX, Reason::TxForward), "{ctx}");
    if run.frame != env.expected_forward(vip, want, &fl, &input) {
        let got = (0..env.fx.backends.len() as u32)
            .find(|&b| run.frame == env.expected_forward(vip, b, &fl, &input));
        match got {
            Some(b) => panic!("{ctx}: went to backend {b}"),
            None => assert_frame_eq(
                &run.frame,
                &env.expected_forward(vip, want, &fl, &input),
                &ctx,
            ),
        }
    }
    input.len()
}

/// The live ring of VIP `vip` if its backend list were `backends` (states as in the fixture).
fn ring_with(env: &Env, vip: usize, backends: &[u32]) -> Vec<u32> {
    let mut fx = env.fx.clone();
    fx.vips[vip].backends = backends.to_vec();
    fx.ring(vip)
}

/// Establish `n` flows on VIP `vip` (new, so on the fixture's ring choice).
fn establish(env: &mut Env, vip: usize, n: u32) -> Vec<(IpAddr, u16, u32)> {
    let addr = env.fx.vips[vip].addr;
    (0..n)
        .map(|i| {
            let client = client_for(addr, i);
            let sport = 10_000 + (i as u16 % 97);
            let b = env.ring_choice(vip, &flow_of(env, vip, client, sport));
            send_expect(env, vip, client, sport, b, "establish");
            let fl = flow_of(env, vip, client, sport);
            assert_eq!(env.conn(&fl), Some(b), "CONNS entry of a new flow");
            (client, sport, b)
        })
        .collect()
}

#[test]
fn established_flows_stick_when_the_ring_changes_and_new_flows_follow_the_new_ring() {
    let mut env = Env::standard();
    let vip = vip_index(v4(10, 1), 80, TCP);
    let flows = establish(&mut env, vip, 400);
    // The agent replaces the ring with one of backends 2 and 3 only (buffer 1).
    let ring = ring_with(&env, vip, &[2, 3]);
    env.set_ring(vip, &ring);
    let off_ring = flows.iter().filter(|f| f.2 == 0 || f.2 == 1).count();
    assert!(off_ring > 50, "setup: {off_ring} flows on backends 0/1");
    let new_before = env.dp.vip_counters(vip as u32).unwrap().new_flows;
    for &(client, sport, b) in &flows {
        send_expect(
            &mut env,
            vip,
            client,
            sport,
            b,
            "established after ring change",
        );
    }
    assert_eq!(
        env.dp.vip_counters(vip as u32).unwrap().new_flows,
        new_before,
        "established flows are not new"
    );
    let cfg = env.cfg();
    for i in 0..400u32 {
        let client = client4(i);
        let sport = 30_000 + i as u16;
        let b = ring_choice(
            &cfg,
            &ring,
            false,
            &flow_of(&env, vip, client.into(), sport),
        );
        assert!(b == 2 || b == 3);
        send_expect(
            &mut env,
            vip,
            client.into(),
            sport,
            b,
            "new flow after ring change",
        );
    }
}

#[test]
fn flows_of_a_down_backend_move_to_the_ring_choice_and_conns_is_rewritten() {
    let mut env = Env::standard();
    let vip = vip_index(v4(10, 1), 80, TCP);
    let flows = establish(&mut env, vip, 400);
    let down = 3;
    env.set_backend_state(down, BACKEND_DOWN);
    let ring = env.fx.ring(vip); // rebuilt without the DOWN backend
    assert!(!ring.contains(&down));
    env.set_ring(vip, &ring);
    let cfg = env.cfg();
    let vc = env.dp.vip_counters(vip as u32).unwrap();
    let mut moved = 0u64;
    let mut moved_to: BTreeMap<u32, u64> = BTreeMap::new();
    let be_before: Vec<Counters> = (0..4)
        .map(|b| env.dp.backend_counters(b).unwrap())
        .collect();
    for &(client, sport, b) in &flows {
        let fl = flow_of(&env, vip, client, sport);
        let want = if b == down {
            moved += 1;
            let n = ring_choice(&cfg, &ring, false, &fl);
            *moved_to.entry(n).or_default() += 1;
            n
        } else {
            b
        };
        send_expect(&mut env, vip, client, sport, want, "after DOWN");
        assert_eq!(env.conn(&fl), Some(want), "CONNS entry of {client}:{sport}");
    }
    assert!(moved > 50, "setup: {moved} flows were on the DOWN backend");
    let vc2 = env.dp.vip_counters(vip as u32).unwrap();
    assert_eq!(
        vc2.new_flows - vc.new_flows,
        moved,
        "moved flows count as new"
    );
    for (b, n) in moved_to {
        let c = env.dp.backend_counters(b).unwrap();
        assert_eq!(
            c.new_flows - be_before[b as usize].new_flows,
            n,
            "backend {b} new flows"
        );
    }
    assert_eq!(
        env.dp.backend_counters(down).unwrap().packets,
        be_before[down as usize].packets,
        "nothing more reaches the DOWN backend"
    );
    // Once moved, they stay (not new any more).
    for &(client, sport, _) in &flows {
        let fl = flow_of(&env, vip, client, sport);
        let b = env.conn(&fl).unwrap();
        send_expect(&mut env, vip, client, sport, b, "after move");
    }
    assert_eq!(
        env.dp.vip_counters(vip as u32).unwrap().new_flows,
        vc2.new_flows
    );
}

#[test]
fn a_draining_backend_keeps_its_flows_and_gets_no_new_ones() {
    let mut env = Env::standard();
    let vip = vip_index(v6(10, 2), 82, UDP); // L2DSR, four IPv6 backends
    let flows = establish(&mut env, vip, 400);
    let draining = env.fx.vips[vip].backends[3];
    env.set_backend_state(draining, BACKEND_DRAINING);
    let ring = env.fx.ring(vip);
    assert!(!ring.contains(&draining));
    env.set_ring(vip, &ring);
    let on_draining = flows.iter().filter(|f| f.2 == draining).count();
    assert!(
        on_draining > 50,
        "setup: {on_draining} flows on the draining backend"
    );
    let vc = env.dp.vip_counters(vip as u32).unwrap();
    for &(client, sport, b) in &flows {
        send_expect(
            &mut env,
            vip,
            client,
            sport,
            b,
            "established, backend draining",
        );
    }
    assert_eq!(
        env.dp.vip_counters(vip as u32).unwrap().new_flows,
        vc.new_flows
    );
    let cfg = env.cfg();
    let before = env.dp.backend_counters(draining).unwrap();
    for i in 0..2000u32 {
        let client = client6(50_000 + i);
        let fl = flow_of(&env, vip, client.into(), 777);
        let b = ring_choice(&cfg, &ring, false, &fl);
        assert_ne!(b, draining);
        send_expect(
            &mut env,
            vip,
            client.into(),
            777,
            b,
            "new flow, backend draining",
        );
    }
    let after = env.dp.backend_counters(draining).unwrap();
    assert_eq!(
        after.new_flows, before.new_flows,
        "no new flow on a draining backend"
    );
    assert_eq!(after.packets, before.packets);
}

#[test]
fn weights_1_2_3_4_share_100000_new_flows_within_one_point() {
    let mut env = Env::standard();
    let vip = vip_index(v4(10, 1), 80, TCP);
    let weights: Vec<(u32, u32)> = env.fx.vips[vip]
        .backends
        .iter()
        .map(|&b| (b, env.fx.backends[b as usize].weight))
        .collect();
    assert_eq!(
        weights.iter().map(|w| w.1).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    let by_addr: HashMap<[u8; 4], u32> = weights
        .iter()
        .map(|&(b, _)| match env.fx.backends[b as usize].addr {
            IpAddr::V4(a) => (a.octets(), b),
            _ => unreachable!(),
        })
        .collect();
    let ring = env.fx.ring(vip);
    let cfg = env.cfg();
    let v = env.fx.vips[vip].clone();
    const N: u32 = 100_000;
    let reasons = env.dp.reason_counts().unwrap();
    let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
    let mut bytes = 0u64;
    for i in 0..N {
        let client = Ipv4Addr::from(0x6440_0000u32 + i / 4); // 100.64.0.0/10
        let sport = 1024 + (i % 4) as u16 * 1000;
        let input = Opts::default().with_syn(true).tcp4(
            client,
            sport,
            match v.addr {
                IpAddr::V4(a) => a,
                _ => unreachable!(),
            },
            v.port,
            b"",
        );
        bytes += input.len() as u64;
        let run = harness::run(&mut env.dp, "lb", &input).unwrap();
        assert_eq!(run.action, XDP_TX, "flow {i}");
        // IPIP 4-in-4: the outer destination is the backend.
        let dst: [u8; 4] = run.frame[30..34].try_into().unwrap();
        let b = by_addr[&dst];
        let want = ring_choice(
            &cfg,
            &ring,
            false,
            &flow_of(&env, vip, client.into(), sport),
        );
        assert_eq!(b, want, "flow {i} ({client}:{sport})");
        *counts.entry(b).or_default() += 1;
    }
    let after = env.dp.reason_counts().unwrap();
    for r in Reason::ALL {
        let d = after[r as usize] - reasons[r as usize];
        let want = if r == Reason::TxForward {
            u64::from(N)
        } else {
            0
        };
        assert_eq!(d, want, "{r:?} counter");
    }
    let total_w: u32 = weights.iter().map(|w| w.1).sum();
    for &(b, w) in &weights {
        let share = f64::from(counts.get(&b).copied().unwrap_or(0)) / f64::from(N);
        let want = f64::from(w) / f64::from(total_w);
        assert!(
            (share - want).abs() <= 0.01,
            "backend {b} (weight {w}): {:.2}% of new flows, want {:.2}% ± 1",
            share * 100.0,
            want * 100.0
        );
        let c = env.dp.backend_counters(b).unwrap();
        // SYNs create no entry: not new flows.
        assert_eq!(
            (c.packets, c.new_flows),
            (u64::from(counts[&b]), 0),
            "backend {b} counters"
        );
    }
    let vc = env.dp.vip_counters(vip as u32).unwrap();
    assert_eq!(
        vc,
        Counters {
            packets: u64::from(N),
            bytes,
            new_flows: 0
        }
    );
}

#[test]
fn affinity_vip_sends_every_flow_of_a_client_to_one_backend() {
    let mut env = Env::standard();
    let vip = vip_index(v4(10, 4), 443, TCP);
    assert!(env.fx.vips[vip].affinity);
    let meta: VipMeta = env.dp.vips.get(&env.fx.vips[vip].key(), 0).unwrap();
    assert_eq!(
        meta.flags & lb_common::VIP_F_AFFINITY,
        lb_common::VIP_F_AFFINITY
    );
    let ring = env.fx.ring(vip);
    let cfg = env.cfg();
    let mut per_client = BTreeSet::new();
    let mut by_port_alone = BTreeSet::new();
    for c in 0..64u32 {
        let client: IpAddr = client4(c).into();
        let want = ring_choice(&cfg, &ring, true, &flow_of(&env, vip, client, 1));
        for p in 0..24u16 {
            let sport = 1024 + p * 2311;
            let fl = flow_of(&env, vip, client, sport);
            // The 5-tuple hash would spread these ports; affinity must not.
            by_port_alone.insert(ring_choice(&cfg, &ring, false, &fl));
            send_expect(&mut env, vip, client, sport, want, "affinity");
        }
        per_client.insert(want);
    }
    assert!(
        by_port_alone.len() > 1,
        "setup: ports alone would spread flows"
    );
    let all: BTreeSet<u32> = env.fx.vips[vip].backends.iter().copied().collect();
    assert_eq!(
        per_client, all,
        "different clients spread over all backends"
    );
}

#[test]
fn counters_match_what_was_sent() {
    let mut env = Env::standard();
    let vips = [
        vip_index(v4(10, 2), 80, UDP), // IPIP 4-in-4
        vip_index(v6(10, 1), 82, TCP), // L2DSR v6
        vip_index(v4(10, 3), 81, UDP), // GUE to the MAC-less backend 8
        vip_index(v6(10, 1), 81, TCP), // GUE 6-in-6
    ];
    let mut want_vip: BTreeMap<u32, Counters> = BTreeMap::new();
    let mut want_be: BTreeMap<u32, Counters> = BTreeMap::new();
    for (n, &vip) in vips.iter().enumerate() {
        let addr = env.fx.vips[vip].addr;
        for f in 0..(10 + n as u32) {
            let client = client_for(addr, 100 * n as u32 + f);
            let sport = 2000 + f as u16;
            let b = env.ring_choice(vip, &flow_of(&env, vip, client, sport));
            for k in 0..3u16 {
                // Same flow, three packets of different sizes; the first is new.
                let payload = vec![k as u8; usize::from(k) * 100 + f as usize];
                let input = input_for(&env, vip, client, sport, &payload);
                let (run, reason) = env.lb(&input);
                assert_eq!((run.action, reason), (XDP_TX, Reason::TxForward));
                for c in [
                    want_vip.entry(vip as u32).or_default(),
                    want_be.entry(b).or_default(),
                ] {
                    c.packets += 1;
                    c.bytes += input.len() as u64;
                    c.new_flows += u64::from(k == 0);
                }
            }
        }
    }
    // Packets that reach no VIP are counted nowhere but in STATS.
    for f in [
        Opts::default().udp4(client4(1), 1, NOT_VIP4, 80, b"x"),
        Opts::default().tcp(client6(1).into(), 1, v6(10, 1), 9999, b"x"),
        Opts::default().tcp(client4(1).into(), 1, v4(10, 2), 80, b"x"), // VIP is UDP only
    ] {
        let (run, reason) = env.lb(&f);
        assert_eq!((run.action, reason), (XDP_PASS, Reason::PassNotVip));
    }
    // An ICMP error about an established flow: VIP and backend packets/bytes, not new.
    let vip = vips[0];
    let addr = env.fx.vips[vip].addr;
    let (client, sport) = (client_for(addr, 0), 2000u16);
    let b = env.ring_choice(vip, &flow_of(&env, vip, client, sport));
    let q = ip_packet(&Opts::default().udp(addr, 80, client, sport, b"reply"));
    let icmp = match addr {
        IpAddr::V4(a) => {
            lb_tests::packets::icmp4_dest_unreach(Ipv4Addr::new(198, 18, 250, 1), a, 1400, &q)
        }
        _ => unreachable!(),
    };
    let (run, reason) = env.lb(&icmp);
    assert_eq!((run.action, reason), (XDP_TX, Reason::TxIcmpForward));
    for c in [
        want_vip.entry(vip as u32).or_default(),
        want_be.entry(b).or_default(),
    ] {
        c.packets += 1;
        c.bytes += icmp.len() as u64;
    }
    for id in 0..env.fx.vips.len() as u32 {
        assert_eq!(
            env.dp.vip_counters(id).unwrap(),
            want_vip.get(&id).copied().unwrap_or_default(),
            "VIP {id} counters"
        );
    }
    for id in 0..env.fx.backends.len() as u32 {
        assert_eq!(
            env.dp.backend_counters(id).unwrap(),
            want_be.get(&id).copied().unwrap_or_default(),
            "backend {id} counters"
        );
    }
}

#[test]
fn vip_with_an_empty_ring_drops_new_flows_with_no_backend() {
    let mut env = Env::standard();
    let vip = vip_index(v4(10, 1), 81, TCP); // GUE over v4
    let v = env.fx.vips[vip].clone();
    // One flow established before the ring empties.
    let est = establish(&mut env, vip, 1)[0];
    let key = v.key();
    let meta = env.dp.vips.get(&key, 0).unwrap();
    env.dp
        .set_vip(
            &key,
            &VipMeta {
                ring_size: 0,
                ..meta
            },
        )
        .unwrap();
    let conns = env.conns_len();
    let be: Vec<Counters> = (0..9)
        .map(|b| env.dp.backend_counters(b).unwrap())
        .collect();
    for i in 0..20u32 {
        let client = client4(200 + i);
        let input = input_for(&env, vip, client.into(), 5555, b"nobody home");
        let vc = env.dp.vip_counters(vip as u32).unwrap();
        let (run, reason) = env.lb(&input);
        assert_eq!(
            (run.action, reason),
            (XDP_DROP, Reason::DropNoBackend),
            "new flow {client} to an empty ring"
        );
        assert_frame_eq(&run.frame, &input, "dropped frame unchanged");
        let vc2 = env.dp.vip_counters(vip as u32).unwrap();
        assert_eq!(
            (vc2.packets, vc2.bytes, vc2.new_flows),
            (vc.packets + 1, vc.bytes + input.len() as u64, vc.new_flows),
            "the VIP counts the packet, not a flow"
        );
    }
    assert_eq!(env.conns_len(), conns, "no CONNS entry for a dropped flow");
    for b in 0..9u32 {
        assert_eq!(
            env.dp.backend_counters(b).unwrap(),
            be[b as usize],
            "backend {b}"
        );
    }
    // The established flow's CONNS entry still names a live backend: it keeps flowing.
    send_expect(
        &mut env,
        vip,
        est.0,
        est.1,
        est.2,
        "established, ring empty",
    );
}

/// Send one segment of the flow (a SYN if `syn`, else an ACK); require it forwarded to
/// backend `want`; return whether it counted as a new flow.
#[track_caller]
fn tcp_expect(env: &mut Env, vip: usize, client: IpAddr, sport: u16, syn: bool, want: u32) -> bool {
    let v = env.fx.vips[vip].clone();
    let input = Opts::default()
        .with_syn(syn)
        .tcp(client, sport, v.addr, v.port, b"x");
    let fl = flow_of(env, vip, client, sport);
    let before = env.dp.vip_counters(vip as u32).unwrap().new_flows;
    let (run, reason) = env.lb(&input);
    let what = if syn { "SYN" } else { "ACK" };
    assert_eq!((run.action, reason), (XDP_TX, Reason::TxForward), "{what}");
    if run.frame != env.expected_forward(vip, want, &fl, &input) {
        let got = (0..env.fx.backends.len() as u32)
            .find(|&b| run.frame == env.expected_forward(vip, b, &fl, &input));
        panic!("{what} of {client}:{sport}: went to backend {got:?}, want {want}");
    }
    env.dp.vip_counters(vip as u32).unwrap().new_flows > before
}

#[test]
fn a_syn_follows_the_ring_even_when_its_ports_name_an_entry_on_a_draining_backend() {
    let mut env = Env::standard();
    let vip = vip_index(v4(10, 1), 80, TCP);
    let flows = establish(&mut env, vip, 400);
    let draining = env.fx.vips[vip].backends[3];
    env.set_backend_state(draining, BACKEND_DRAINING);
    let ring = env.fx.ring(vip);
    assert!(!ring.contains(&draining));
    env.set_ring(vip, &ring);
    let mut on_draining = 0;
    for &(client, sport, b) in &flows {
        // The established connection goes on where it was, draining or not.
        assert!(!tcp_expect(&mut env, vip, client, sport, false, b));
        // The client opens a new connection from the same port: a new flow on the ring.
        let fl = flow_of(&env, vip, client, sport);
        let r = ring_choice(&env.cfg(), &ring, false, &fl);
        assert!(
            !tcp_expect(&mut env, vip, client, sport, true, r),
            "a SYN creates no entry"
        );
        assert_eq!(
            env.conn(&fl),
            None,
            "the SYN removed the old connection's entry"
        );
        // The handshake's ACK follows the ring too, and creates the entry.
        assert!(tcp_expect(&mut env, vip, client, sport, false, r));
        assert_eq!(env.conn(&fl), Some(r));
        assert!(!tcp_expect(&mut env, vip, client, sport, false, r));
        on_draining += (b == draining) as usize;
    }
    assert!(
        on_draining > 50,
        "setup: {on_draining} flows on the drained backend"
    );
}

#[test]
fn an_entry_whose_backend_left_its_vip_no_longer_holds() {
    let mut env = Env::standard();
    for (vip, proto) in [
        (vip_index(v4(10, 1), 80, TCP), TCP),
        (vip_index(v6(10, 2), 80, UDP), UDP),
    ] {
        let flows = establish(&mut env, vip, 300);
        let (gone, moved) = (env.fx.vips[vip].backends[1], env.fx.vips[vip].backends[2]);
        let keep: Vec<u32> = env.fx.vips[vip]
            .backends
            .iter()
            .copied()
            .filter(|b| *b != gone && *b != moved)
            .collect();
        let ring = ring_with(&env, vip, &keep);
        env.set_ring(vip, &ring);
        // `gone` retired; `moved` still up, but its id now belongs to another VIP (as an
        // id does once handed out again).
        env.set_backend_state(gone, lb_common::BACKEND_RETIRED);
        let other = (vip as u32 + 1) % env.fx.vips.len() as u32;
        env.fx.backends[moved as usize].vip = other;
        let be = env.fx.backend(moved);
        env.dp.set_backend(moved, &be).unwrap();
        env.model.backends[moved as usize] = be;
        let (mut left, mut stayed) = (0, 0);
        for &(client, sport, b) in &flows {
            let fl = flow_of(&env, vip, client, sport);
            if b == gone || b == moved {
                let r = ring_choice(&env.cfg(), &ring, false, &fl);
                let new = if proto == TCP {
                    tcp_expect(&mut env, vip, client, sport, false, r)
                } else {
                    send_expect(&mut env, vip, client, sport, r, "reselected");
                    true
                };
                assert!(new, "a reselected flow is new");
                assert_eq!(env.conn(&fl), Some(r));
                left += 1;
            } else {
                send_expect(&mut env, vip, client, sport, b, "kept");
                stayed += 1;
            }
        }
        assert!(
            left > 50 && stayed > 50,
            "setup: {left} reselected, {stayed} kept"
        );
    }
}

#[test]
fn a_vip_removed_and_added_again_keeps_none_of_its_old_entries() {
    let mut env = Env::standard();
    let vip = vip_index(v4(10, 2), 81, UDP);
    let flows = establish(&mut env, vip, 200);
    // Removed, then added again under a new id with new backend ids (the agent's own
    // sequence): the old members are even left up, to show the VIP id alone decides.
    let key = env.fx.vips[vip].key();
    let old = env.dp.vips.get(&key, 0).unwrap();
    env.dp.remove_vip(&key).unwrap();
    env.model.vips.remove(&key);
    let new_id = 15;
    let first = 200;
    let mut members = Vec::new();
    for (k, &b) in env.fx.vips[vip].backends.clone().iter().enumerate() {
        let mut spec = env.fx.backends[b as usize].clone();
        spec.vip = new_id;
        let id = first + k as u32;
        while env.fx.backends.len() <= id as usize {
            env.fx.backends.push(spec.clone());
        }
        env.fx.backends[id as usize] = spec;
        let be = env.fx.backend(id);
        env.dp.set_backend(id, &be).unwrap();
        members.push(id);
    }
    env.fx.vips[vip].backends = members.clone();
    let ring = env.fx.ring(vip);
    let base = env.dp.write_ring(new_id, 0, &ring).unwrap();
    let meta = VipMeta {
        id: new_id,
        ring_base: base,
        ring_size: ring.len() as u32,
        ..old
    };
    env.dp.set_vip(&key, &meta).unwrap();
    let before = env.dp.vip_counters(new_id).unwrap().new_flows;
    for &(client, sport, _) in &flows {
        let fl = flow_of(&env, vip, client, sport);
        let r = ring_choice(&env.cfg(), &ring, false, &fl);
        assert!(members.contains(&r));
        send_expect(&mut env, vip, client, sport, r, "after re-adding the VIP");
    }
    assert_eq!(
        env.dp.vip_counters(new_id).unwrap().new_flows - before,
        flows.len() as u64,
        "every old flow is new to the re-added VIP"
    );
}

#[test]
fn entries_record_their_last_use_and_a_fin_or_rst() {
    let mut env = Env::standard();
    let vip = vip_index(v4(10, 1), 80, TCP);
    let v = env.fx.vips[vip].clone();
    let client: IpAddr = client4(7).into();
    let fl = flow_of(&env, vip, client, 5000);
    let now = lb_userspace::migrate::coarse_now();
    env.lb(&Opts::default().tcp(client, 5000, v.addr, v.port, b"x"));
    let e = env.dp.conns.get(&fl, 0).unwrap();
    assert!(
        e.atime.abs_diff(now) < 2_000_000_000,
        "atime {} now {now}",
        e.atime
    );
    assert_eq!(e.flags, 0);
    // An old entry is refreshed by its next packet; a fresh one is left alone.
    let mut old = e;
    old.atime -= 10_000_000_000;
    env.dp.conns.insert(fl, old, 0).unwrap();
    env.lb(&Opts::default().tcp(client, 5000, v.addr, v.port, b"x"));
    let e = env.dp.conns.get(&fl, 0).unwrap();
    assert!(e.atime > old.atime + 9_000_000_000, "refreshed");
    let fresh = e.atime;
    env.lb(&Opts::default().tcp(client, 5000, v.addr, v.port, b"x"));
    assert_eq!(
        env.dp.conns.get(&fl, 0).unwrap().atime,
        fresh,
        "written at most once a second"
    );
    for (i, what, o) in [
        (8, "FIN", Opts::default().with_fin(true)),
        (9, "RST", Opts::default().with_rst(true)),
    ] {
        let c: IpAddr = client4(i).into();
        let f = flow_of(&env, vip, c, 6000);
        env.lb(&Opts::default().tcp(c, 6000, v.addr, v.port, b"x"));
        assert_eq!(env.dp.conns.get(&f, 0).unwrap().flags, 0);
        env.lb(&o.tcp(c, 6000, v.addr, v.port, b""));
        assert_eq!(
            env.dp.conns.get(&f, 0).unwrap().flags,
            lb_common::CONN_F_CLOSING,
            "{what} marks the entry closing"
        );
    }
}

/// A SYN flood of ten times the connection table's size: SYNs create no entry, so every
/// established flow keeps its entry and its backend; a SYN of an established flow's 5-tuple
/// (a reused port) removes that flow's old entry and its ACK makes the new one.
#[test]
fn a_syn_flood_of_ten_times_the_table_evicts_no_established_flow() {
    // A table of 4,096 entries per CPU: room for the 500 flows on whichever CPU runs them.
    let mut env = Env::with_sizes(lb_userspace::dataplane::Sizes {
        max_conns: lb_tests::support::conns_for(4096),
        ..lb_tests::harness::test_sizes()
    });
    let vip = vip_index(v4(10, 1), 80, TCP);
    let flows = establish(&mut env, vip, 500);
    let table = env.dp.sizes.max_conns;
    let entries = |env: &Env| env.dp.read_conns().unwrap().len();
    let before = entries(&env);
    let v = env.fx.vips[vip].clone();
    let new_before = env.dp.vip_counters(vip as u32).unwrap().new_flows;
    for i in 0..table * 10 {
        let client = Ipv4Addr::from(0x6480_0000u32 + i / 8); // 100.128.0.0/9: not establish()'s
        let input = Opts::default().with_syn(true).tcp4(
            client,
            2000 + (i % 8) as u16,
            match v.addr {
                IpAddr::V4(a) => a,
                _ => unreachable!(),
            },
            v.port,
            b"",
        );
        let (run, reason) = env.lb(&input);
        assert_eq!((run.action, reason), (XDP_TX, Reason::TxForward), "SYN {i}");
    }
    assert_eq!(entries(&env), before, "the flood added no entry");
    assert_eq!(
        env.dp.vip_counters(vip as u32).unwrap().new_flows,
        new_before,
        "SYNs are not new flows"
    );
    for &(client, sport, b) in &flows {
        let fl = flow_of(&env, vip, client, sport);
        assert_eq!(env.conn(&fl), Some(b), "{client}:{sport} kept its entry");
        assert!(!tcp_expect(&mut env, vip, client, sport, false, b));
    }
}
