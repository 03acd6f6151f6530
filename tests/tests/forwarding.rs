//! Forwarding, byte for byte, through the real compiled `lb` and `decap` programs.
//!
//! Every expected frame is built independently with `packets::expected_*` (etherparse), the
//! backend from the fixture's Maglev ring and `flow_hash`, the outer source / entropy from
//! `flow_entropy` and the config masks, as `docs/dataplane.md` says. The reference model is
//! not consulted here. Outputs are also re-parsed with etherparse to check checksums and
//! that the inner packet is carried byte-identical.
mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use common::*;
use etherparse::{
    EtherType, Icmpv4Slice, Icmpv6Slice, Ipv4HeaderSlice, Ipv6HeaderSlice, SlicedPacket,
    UdpHeaderSlice,
};
use lb_common::{DecapReason, Forwarding, Reason, GUE_PORT, OUTER_TTL};
use lb_tests::fixture::{v4, v6, Fixture, GW_MAC};
use lb_tests::packets::{
    expected_decap, expected_icmp_too_big4, expected_icmp_too_big6, icmp4_dest_unreach,
    icmp4_time_exceeded, icmp6_dest_unreach, icmp6_packet_too_big, ip_packet, parse_l2, raw_ether,
    Opts, TCP, UDP,
};

const ROUTER4: Ipv4Addr = Ipv4Addr::new(198, 18, 250, 1);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 1);

/// Frame shapes every forwarding mode must handle.
fn variants() -> Vec<(&'static str, Opts)> {
    vec![
        ("plain", Opts::default()),
        (
            "vlan",
            Opts {
                vlan: Some(100),
                vlan_pcp: 5,
                ..Default::default()
            },
        ),
        ("tos", Opts::default().with_tos(0xb9)),
        ("padding", Opts::default().with_padding(6)),
        (
            "vlan+tos+df+padding",
            Opts {
                vlan: Some(4094),
                ..Default::default()
            }
            .with_tos(0x03)
            .with_df(true)
            .with_padding(11),
        ),
    ]
}

/// A client -> VIP frame of VIP `vip`'s protocol.
fn input_for(
    env: &Env,
    vip: usize,
    o: &Opts,
    client: IpAddr,
    sport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let v = &env.fx.vips[vip];
    if v.proto == TCP {
        o.tcp(client, sport, v.addr, v.port, payload)
    } else {
        o.udp(client, sport, v.addr, v.port, payload)
    }
}

/// Check an output of `lb` with etherparse, independently of the expected-bytes builders:
/// Ethernet/VLAN, outer header fields and checksum, GUE UDP header, inner packet identical.
fn verify_parsed(out: &[u8], input: &[u8], mode: Forwarding, mac: [u8; 6], ctx: &str) {
    let lin = parse_l2(input);
    let lout = parse_l2(out);
    assert_eq!(lout.eth.destination, mac, "{ctx}: destination MAC");
    assert_eq!(lout.eth.source, lin.eth.destination, "{ctx}: source MAC");
    assert_eq!(
        lout.vlan.as_ref().map(|v| v.to_bytes()[..2].to_vec()),
        lin.vlan.as_ref().map(|v| v.to_bytes()[..2].to_vec()),
        "{ctx}: VLAN TCI kept"
    );
    let inner_in = &input[lin.l3..];
    let inner_len = ip_packet(input).len();
    let l3 = lout.l3;
    if mode == Forwarding::L2Dsr {
        assert_eq!(
            &out[12..],
            &input[12..],
            "{ctx}: L2DSR changes only the MACs"
        );
        return;
    }
    let gue = mode == Forwarding::Gue;
    let (hl, proto) = if lout.ether_type == EtherType::IPV4 {
        let h = Ipv4HeaderSlice::from_slice(&out[l3..]).expect("outer IPv4 parses");
        assert_eq!(
            h.header_checksum(),
            h.to_header().calc_header_checksum(),
            "{ctx}: outer IPv4 header checksum"
        );
        assert_eq!(h.ihl(), 5, "{ctx}: outer IHL");
        assert_eq!(
            usize::from(h.total_len()),
            20 + if gue { 8 } else { 0 } + inner_len,
            "{ctx}: outer total length"
        );
        assert_eq!(h.ttl(), OUTER_TTL, "{ctx}: outer TTL");
        assert!(
            !h.more_fragments() && h.fragments_offset().value() == 0,
            "{ctx}: outer not a fragment"
        );
        (20, h.protocol().0)
    } else {
        assert_eq!(lout.ether_type, EtherType::IPV6, "{ctx}: outer ethertype");
        let h = Ipv6HeaderSlice::from_slice(&out[l3..]).expect("outer IPv6 parses");
        assert_eq!(
            usize::from(h.payload_length()),
            if gue { 8 } else { 0 } + inner_len,
            "{ctx}: outer payload length"
        );
        assert_eq!(h.hop_limit(), OUTER_TTL, "{ctx}: outer hop limit");
        (40, h.next_header().0)
    };
    let inner_at = if gue {
        assert_eq!(proto, 17, "{ctx}: GUE outer protocol");
        let u = UdpHeaderSlice::from_slice(&out[l3 + hl..]).expect("GUE UDP parses");
        assert_eq!(u.destination_port(), GUE_PORT, "{ctx}: GUE port");
        assert_eq!(
            u.source_port() & 0xC000,
            0xC000,
            "{ctx}: GUE source port range"
        );
        assert_eq!(usize::from(u.length()), 8 + inner_len, "{ctx}: UDP length");
        assert_eq!(u.checksum(), 0, "{ctx}: GUE UDP checksum 0");
        l3 + hl + 8
    } else {
        let want = if inner_in[0] >> 4 == 4 { 4 } else { 41 };
        assert_eq!(proto, want, "{ctx}: IPIP outer protocol");
        l3 + hl
    };
    assert_eq!(
        &out[inner_at..],
        inner_in,
        "{ctx}: inner packet (and padding) byte-identical"
    );
    // The inner packet still parses, with valid checksums where it has them.
    let sliced = SlicedPacket::from_ip(&out[inner_at..inner_at + inner_len])
        .unwrap_or_else(|e| panic!("{ctx}: inner packet does not parse: {e:?}"));
    if let Some(etherparse::NetSlice::Ipv4(ip)) = sliced.net {
        let h = ip.header();
        assert_eq!(
            h.header_checksum(),
            h.to_header().calc_header_checksum(),
            "{ctx}: inner IPv4 checksum"
        );
    }
}

/// Send one client -> VIP packet; require it forwarded to the ring's backend with exactly
/// the expected bytes; check the bytes with etherparse, and that `decap` undoes it.
fn forward_case(
    env: &mut Env,
    vip: usize,
    name: &str,
    o: &Opts,
    client: IpAddr,
    sport: u16,
) -> u32 {
    let v = env.fx.vips[vip].clone();
    let payload: Vec<u8> = (0..(sport % 50) as u8).collect();
    let input = input_for(env, vip, o, client, sport, &payload);
    let fl = flow(client, sport, v.addr, v.port, v.proto);
    let b = env.ring_choice(vip, &fl);
    let want = env.expected_forward(vip, b, &fl, &input);
    let ctx = format!(
        "VIP {vip} ({:?} {}:{}/{}), {name}, from {client}:{sport}, backend {b} ({})",
        v.forwarding, v.addr, v.port, v.proto, env.fx.backends[b as usize].addr
    );
    let (run, reason) = env.lb(&input);
    assert_eq!(
        (run.action, reason),
        (XDP_TX, Reason::TxForward),
        "{ctx}: verdict"
    );
    assert_frame_eq(&run.frame, &want, &ctx);
    verify_parsed(&run.frame, &input, v.forwarding, env.mac_of(b), &ctx);

    // On the backend, `decap` gives back the client's packet.
    let (d, dr) = env.decap(&run.frame);
    if v.forwarding == Forwarding::L2Dsr {
        assert_eq!(
            (d.action, dr),
            (XDP_PASS, DecapReason::Pass),
            "{ctx}: decap of L2DSR"
        );
        assert_frame_eq(
            &d.frame,
            &run.frame,
            &format!("{ctx}: decap leaves L2DSR untouched"),
        );
    } else {
        let l3 = l3_of(&input);
        assert_eq!(
            (d.action, dr),
            (XDP_PASS, DecapReason::Decapped),
            "{ctx}: decap"
        );
        assert_frame_eq(
            &d.frame,
            &expected_decap(&run.frame, &input[l3..]),
            &format!("{ctx}: decap"),
        );
        assert_eq!(
            ip_packet(&d.frame),
            ip_packet(&input),
            "{ctx}: decapped IP packet"
        );
    }
    b
}

/// Every variant, many flows, of the VIPs `vips`; every backend of each VIP is reached.
fn forward_all(vips: &[usize]) {
    let mut env = Env::standard();
    for &vip in vips {
        let addr = env.fx.vips[vip].addr;
        let mut seen = BTreeSet::new();
        for (vi, (name, o)) in variants().iter().enumerate() {
            for k in 0..48u32 {
                let client = client_for(addr, vi as u32 * 48 + k);
                seen.insert(forward_case(
                    &mut env,
                    vip,
                    name,
                    o,
                    client,
                    1024 + k as u16 * 7,
                ));
            }
        }
        let all: BTreeSet<u32> = env.fx.vips[vip].backends.iter().copied().collect();
        assert_eq!(seen, all, "VIP {vip}: flows reached every backend");
    }
}

#[test]
fn ipip_4in4_tcp_and_udp() {
    let vips = [vip_index(v4(10, 1), 80, TCP), vip_index(v4(10, 2), 80, UDP)];
    forward_all(&vips);
}

#[test]
fn ipip_6in6_tcp_and_udp() {
    let vips = [vip_index(v6(10, 1), 80, TCP), vip_index(v6(10, 2), 80, UDP)];
    forward_all(&vips);
}

#[test]
fn ipip_4in6_ipv4_vip_with_ipv6_backends() {
    let vips = [vip_index(v4(10, 3), 80, TCP)];
    forward_all(&vips);
}

#[test]
fn gue_over_ipv4() {
    let vips = [vip_index(v4(10, 1), 81, TCP), vip_index(v4(10, 2), 81, UDP)];
    forward_all(&vips);
}

#[test]
fn gue_over_ipv6() {
    let vips = [vip_index(v6(10, 1), 81, TCP), vip_index(v6(10, 2), 81, UDP)];
    forward_all(&vips);
}

#[test]
fn gue_4in6_to_backend_without_mac_uses_gateway_mac() {
    // The expected frames (Env::expected_forward) carry Config::gw_mac for this backend.
    let fx = Fixture::standard();
    let vip = vip_index(v4(10, 3), 81, UDP);
    let b = fx.vips[vip].backends[0] as usize;
    assert_eq!(fx.vips[vip].backends.len(), 1, "fixture: one backend");
    assert_eq!(
        fx.backends[b].mac, [0; 6],
        "fixture: the backend has no MAC"
    );
    assert_eq!(fx.config.gw_mac, GW_MAC);
    forward_all(&[vip]);
}

#[test]
fn l2dsr_v4_and_v6() {
    let vips = [
        vip_index(v4(10, 1), 82, TCP),
        vip_index(v4(10, 2), 82, UDP),
        vip_index(v6(10, 1), 82, TCP),
        vip_index(v6(10, 2), 82, UDP),
    ];
    forward_all(&vips);
}

// ---------------------------------------------------------------------------------------
// Too big to encapsulate (Config::mtu 1500)

/// A client -> VIP frame whose IP packet is exactly `ip_len` bytes.
fn sized_input(env: &Env, vip: usize, o: &Opts, client: IpAddr, ip_len: usize) -> Vec<u8> {
    let v = &env.fx.vips[vip];
    let hdrs = if v.addr.is_ipv4() { 20 } else { 40 } + if v.proto == TCP { 20 } else { 8 };
    let payload = vec![0x5a; ip_len - hdrs];
    let f = input_for(env, vip, o, client, 4321, &payload);
    assert_eq!(ip_packet(&f).len(), ip_len);
    f
}

fn outer_overhead(env: &Env, vip: usize) -> usize {
    let v = &env.fx.vips[vip];
    let outer6 = env.fx.backends[v.backends[0] as usize].addr.is_ipv6();
    (if outer6 { 40 } else { 20 })
        + if v.forwarding == Forwarding::Gue {
            8
        } else {
            0
        }
}

fn check_icmp4_reply(out: &[u8], input: &[u8], mtu: u16, ctx: &str) {
    let l2 = parse_l2(out);
    let ip = Ipv4HeaderSlice::from_slice(&out[l2.l3..]).expect("reply IPv4 parses");
    assert_eq!(
        ip.header_checksum(),
        ip.to_header().calc_header_checksum(),
        "{ctx}: reply IPv4 header checksum"
    );
    assert_eq!(ip.protocol().0, 1, "{ctx}: reply protocol");
    let icmp = Icmpv4Slice::from_slice(&out[l2.l3 + 20..]).expect("ICMP parses");
    assert_eq!(
        (icmp.type_u8(), icmp.code_u8()),
        (3, 4),
        "{ctx}: ICMP type/code"
    );
    assert_eq!(
        icmp.checksum(),
        icmp.icmp_type().calc_checksum(icmp.payload()),
        "{ctx}: ICMP checksum"
    );
    assert_eq!(
        &icmp.bytes5to8()[2..],
        &mtu.to_be_bytes(),
        "{ctx}: next-hop MTU"
    );
    let l3 = l3_of(input);
    assert_eq!(icmp.payload(), &input[l3..l3 + 64], "{ctx}: quote");
}

fn check_icmp6_reply(out: &[u8], input: &[u8], mtu: u32, ctx: &str) {
    let l2 = parse_l2(out);
    let ip = Ipv6HeaderSlice::from_slice(&out[l2.l3..]).expect("reply IPv6 parses");
    assert_eq!(ip.next_header().0, 58, "{ctx}: reply next header");
    let icmp = Icmpv6Slice::from_slice(&out[l2.l3 + 40..]).expect("ICMPv6 parses");
    assert_eq!(
        (icmp.type_u8(), icmp.code_u8()),
        (2, 0),
        "{ctx}: ICMPv6 type/code"
    );
    assert!(
        icmp.is_checksum_valid(ip.source(), ip.destination()),
        "{ctx}: ICMPv6 checksum"
    );
    assert_eq!(icmp.bytes5to8(), mtu.to_be_bytes(), "{ctx}: MTU");
    let l3 = l3_of(input);
    assert_eq!(icmp.payload(), &input[l3..l3 + 128], "{ctx}: quote");
}

/// At exactly the MTU: forwarded. One byte more: the too-big verdict of the family/DF.
fn too_big_cases(vips: &[usize], df: bool) {
    let mut env = Env::standard();
    let mtu = env.cfg().mtu as usize;
    for &vip in vips {
        let v = env.fx.vips[vip].clone();
        let overhead = outer_overhead(&env, vip);
        for (name, o) in [
            ("plain", Opts::default()),
            ("vlan", Opts::default().with_vlan(7)),
        ] {
            let o = o.with_df(df);
            let client = client_for(v.addr, 77);
            let ctx = format!(
                "VIP {vip} ({:?} {}:{}), {name}, DF {df}, overhead {overhead}",
                v.forwarding, v.addr, v.port
            );
            // Fits exactly.
            let fits = sized_input(&env, vip, &o, client, mtu - overhead);
            let fl = flow(client, 4321, v.addr, v.port, v.proto);
            let b = env.ring_choice(vip, &fl);
            let (run, reason) = env.lb(&fits);
            assert_eq!(
                (run.action, reason),
                (XDP_TX, Reason::TxForward),
                "{ctx}: at MTU"
            );
            assert_frame_eq(
                &run.frame,
                &env.expected_forward(vip, b, &fl, &fits),
                &format!("{ctx}: at MTU"),
            );
            // One byte too many.
            let big = sized_input(&env, vip, &o, client, mtu - overhead + 1);
            let be_before = env.dp.backend_counters(b).unwrap();
            let vip_before = env.dp.vip_counters(vip as u32).unwrap();
            let (run, reason) = env.lb(&big);
            let ctx = format!("{ctx}: {} bytes IP", mtu - overhead + 1);
            let hop = (mtu - overhead) as u16;
            match (v.addr, df) {
                (IpAddr::V4(_), true) => {
                    assert_eq!(
                        (run.action, reason),
                        (XDP_TX, Reason::TxIcmpTooBig),
                        "{ctx}"
                    );
                    assert_frame_eq(&run.frame, &expected_icmp_too_big4(&big, hop), &ctx);
                    check_icmp4_reply(&run.frame, &big, hop, &ctx);
                }
                (IpAddr::V4(_), false) => {
                    assert_eq!(
                        (run.action, reason),
                        (XDP_DROP, Reason::DropTooBig),
                        "{ctx}"
                    );
                    assert_frame_eq(&run.frame, &big, &format!("{ctx}: dropped frame unchanged"));
                }
                (IpAddr::V6(_), _) => {
                    assert_eq!(
                        (run.action, reason),
                        (XDP_TX, Reason::TxIcmpTooBig),
                        "{ctx}"
                    );
                    assert_frame_eq(
                        &run.frame,
                        &expected_icmp_too_big6(&big, u32::from(hop)),
                        &ctx,
                    );
                    check_icmp6_reply(&run.frame, &big, u32::from(hop), &ctx);
                }
            }
            assert_eq!(
                env.dp.backend_counters(b).unwrap(),
                be_before,
                "{ctx}: no backend counters for a too-big packet"
            );
            let vip_after = env.dp.vip_counters(vip as u32).unwrap();
            assert_eq!(
                (vip_after.packets, vip_after.bytes),
                (vip_before.packets + 1, vip_before.bytes + big.len() as u64),
                "{ctx}: VIP counted the packet"
            );
        }
    }
}

fn ipv4_encap_vips() -> Vec<usize> {
    vec![
        vip_index(v4(10, 1), 80, TCP), // 4-in-4, overhead 20
        vip_index(v4(10, 2), 80, UDP),
        vip_index(v4(10, 1), 81, TCP), // GUE over v4, 28
        vip_index(v4(10, 3), 80, TCP), // 4-in-6, 40
        vip_index(v4(10, 3), 81, UDP), // GUE 4-in-6, 48
    ]
}

#[test]
fn too_big_ipv4_with_df_is_answered_with_fragmentation_needed() {
    let vips = ipv4_encap_vips();
    too_big_cases(&vips, true);
}

#[test]
fn too_big_ipv4_without_df_is_dropped() {
    let vips = ipv4_encap_vips();
    too_big_cases(&vips, false);
}

#[test]
fn too_big_ipv6_is_answered_with_packet_too_big() {
    let vips = vec![
        vip_index(v6(10, 1), 80, TCP), // 6-in-6, overhead 40
        vip_index(v6(10, 2), 80, UDP),
        vip_index(v6(10, 1), 81, TCP), // GUE over v6, 48
    ];
    too_big_cases(&vips, false);
}

#[test]
fn l2dsr_has_no_mtu_check() {
    let mut env = Env::standard();
    for vip in [env.vip(v4(10, 1), 82, TCP), env.vip(v6(10, 2), 82, UDP)] {
        let v = env.fx.vips[vip].clone();
        let client = client_for(v.addr, 3);
        let input = sized_input(&env, vip, &Opts::default().with_df(true), client, 1500);
        let fl = flow(client, 4321, v.addr, v.port, v.proto);
        let b = env.ring_choice(vip, &fl);
        let (run, reason) = env.lb(&input);
        assert_eq!(
            (run.action, reason),
            (XDP_TX, Reason::TxForward),
            "VIP {vip}"
        );
        assert_frame_eq(
            &run.frame,
            &env.expected_forward(vip, b, &fl, &input),
            "L2DSR 1500",
        );
    }
}

// ---------------------------------------------------------------------------------------
// ICMP errors about VIP flows

/// The IP packet a VIP sent to a client (what an ICMP error quotes).
fn quoted(env: &Env, vip: usize, client: IpAddr, cport: u16) -> Vec<u8> {
    let v = &env.fx.vips[vip];
    let o = Opts::default();
    let f = if v.proto == TCP {
        o.tcp(v.addr, v.port, client, cport, &[0x11; 24])
    } else {
        o.udp(v.addr, v.port, client, cport, &[0x11; 24])
    };
    ip_packet(&f)
}

/// ICMP errors of every kind the spec accepts, about the flow client:cport -> VIP.
fn icmp_errors(env: &Env, vip: usize, client: IpAddr, cport: u16) -> Vec<(&'static str, Vec<u8>)> {
    let q = quoted(env, vip, client, cport);
    match env.fx.vips[vip].addr {
        IpAddr::V4(a) => vec![
            (
                "dest-unreach/frag-needed",
                icmp4_dest_unreach(ROUTER4, a, 1400, &q),
            ),
            ("time-exceeded", icmp4_time_exceeded(ROUTER4, a, &q)),
        ],
        IpAddr::V6(a) => vec![
            ("packet-too-big", icmp6_packet_too_big(ROUTER6, a, 1280, &q)),
            ("dest-unreach", icmp6_dest_unreach(ROUTER6, a, &q)),
        ],
    }
}

#[test]
fn icmp_errors_about_a_vip_flow_follow_the_flow_to_its_backend() {
    let mut env = Env::standard();
    let vips = [
        env.vip(v4(10, 1), 80, TCP),
        env.vip(v4(10, 2), 80, UDP),
        env.vip(v4(10, 1), 81, TCP),
        env.vip(v4(10, 1), 82, TCP),
        env.vip(v4(10, 3), 80, TCP),
        env.vip(v4(10, 3), 81, UDP),
        env.vip(v6(10, 1), 80, TCP),
        env.vip(v6(10, 2), 81, UDP),
        env.vip(v6(10, 1), 82, TCP),
    ];
    for vip in vips {
        let v = env.fx.vips[vip].clone();
        // Establish flows.
        let mut flows = Vec::new();
        for k in 0..12u32 {
            let client = client_for(v.addr, 500 + k);
            let cport = 20000 + k as u16;
            let b = forward_case(&mut env, vip, "establish", &Opts::default(), client, cport);
            flows.push((client, cport, b));
        }
        // Move the ring elsewhere, so that only the connection table knows the backends.
        let other = match v.backends[..] {
            // One backend: another of the same family (of another VIP: the ring's choice
            // is final, whoever it names).
            [only] => (0..env.fx.backends.len() as u32)
                .find(|&b| {
                    b != only
                        && env.fx.backends[b as usize].addr.is_ipv6()
                            == env.fx.backends[only as usize].addr.is_ipv6()
                })
                .unwrap(),
            _ => v.backends[3],
        };
        env.set_ring(vip, &[other]);
        assert!(
            flows.iter().any(|f| f.2 != other),
            "test setup: some flow must live off the new ring's backend"
        );
        let conns = env.conns_len();
        for (client, cport, b) in flows {
            let fl = flow(client, cport, v.addr, v.port, v.proto);
            for (name, icmp) in icmp_errors(&env, vip, client, cport) {
                let ctx = format!(
                    "VIP {vip} ({:?} {}:{}), {name} about {client}:{cport} (backend {b})",
                    v.forwarding, v.addr, v.port
                );
                let be_before = env.dp.backend_counters(b).unwrap();
                let (run, reason) = env.lb(&icmp);
                assert_eq!(
                    (run.action, reason),
                    (XDP_TX, Reason::TxIcmpForward),
                    "{ctx}: verdict"
                );
                // Same backend, same outer header (entropy) as the flow's own packets.
                assert_frame_eq(&run.frame, &env.expected_forward(vip, b, &fl, &icmp), &ctx);
                verify_parsed(&run.frame, &icmp, v.forwarding, env.mac_of(b), &ctx);
                let be_after = env.dp.backend_counters(b).unwrap();
                assert_eq!(
                    (be_after.packets, be_after.bytes, be_after.new_flows),
                    (
                        be_before.packets + 1,
                        be_before.bytes + icmp.len() as u64,
                        be_before.new_flows
                    ),
                    "{ctx}: backend counters (never a new flow)"
                );
            }
        }
        assert_eq!(
            env.conns_len(),
            conns,
            "ICMP errors never insert into CONNS"
        );
        // The ring did change: a new flow goes to `other`.
        let client = client_for(v.addr, 999);
        let input = input_for(&env, vip, &Opts::default(), client, 999, b"new");
        let fl = flow(client, 999, v.addr, v.port, v.proto);
        let (run, reason) = env.lb(&input);
        assert_eq!((run.action, reason), (XDP_TX, Reason::TxForward));
        assert_frame_eq(
            &run.frame,
            &env.expected_forward(vip, other, &fl, &input),
            &format!("VIP {vip}: new flow after the ring change goes to backend {other}"),
        );
    }
}

#[test]
fn icmp_error_about_an_unknown_flow_uses_the_ring_and_records_nothing() {
    let mut env = Env::standard();
    for vip in [env.vip(v4(10, 1), 80, TCP), env.vip(v6(10, 1), 81, TCP)] {
        let v = env.fx.vips[vip].clone();
        for k in 0..16u32 {
            let client = client_for(v.addr, 700 + k);
            let cport = 3000 + k as u16;
            let fl = flow(client, cport, v.addr, v.port, v.proto);
            let b = env.ring_choice(vip, &fl);
            for (name, icmp) in icmp_errors(&env, vip, client, cport) {
                let vc = env.dp.vip_counters(vip as u32).unwrap();
                let (run, reason) = env.lb(&icmp);
                let ctx = format!("VIP {vip}, {name} about unknown flow {client}:{cport}");
                assert_eq!(
                    (run.action, reason),
                    (XDP_TX, Reason::TxIcmpForward),
                    "{ctx}"
                );
                assert_frame_eq(&run.frame, &env.expected_forward(vip, b, &fl, &icmp), &ctx);
                assert_eq!(env.conn(&fl), None, "{ctx}: no CONNS entry");
                let vc2 = env.dp.vip_counters(vip as u32).unwrap();
                assert_eq!(
                    (vc2.packets, vc2.bytes, vc2.new_flows),
                    (vc.packets + 1, vc.bytes + icmp.len() as u64, vc.new_flows),
                    "{ctx}: VIP counters"
                );
            }
        }
    }
    assert_eq!(env.conns_len(), 0);
}

// ---------------------------------------------------------------------------------------
// decap

#[test]
fn decap_gives_back_the_original_packet_of_every_encapsulation() {
    // Fed with the frames built by packets::expected_* (not with lb's output: that is
    // checked in forward_case), so a bug in lb cannot hide one in decap.
    let mut env = Env::standard();
    let mut kinds = BTreeSet::new();
    for vip in 0..env.fx.vips.len() {
        let v = env.fx.vips[vip].clone();
        if v.forwarding == Forwarding::L2Dsr {
            continue;
        }
        for (name, o) in variants() {
            for k in 0..4u32 {
                let client = client_for(v.addr, k);
                let sport = 5000 + k as u16;
                let input = input_for(&env, vip, &o, client, sport, b"decap me");
                let fl = flow(client, sport, v.addr, v.port, v.proto);
                let b = env.ring_choice(vip, &fl);
                let enc = env.expected_forward(vip, b, &fl, &input);
                kinds.insert((
                    v.forwarding as u8,
                    v.addr.is_ipv6(),
                    env.fx.backends[b as usize].addr.is_ipv6(),
                ));
                let ctx = format!("VIP {vip} ({:?}), {name}, backend {b}", v.forwarding);
                let (run, r) = env.decap(&enc);
                assert_eq!((run.action, r), (XDP_PASS, DecapReason::Decapped), "{ctx}");
                let l3 = l3_of(&input);
                assert_frame_eq(&run.frame, &expected_decap(&enc, &input[l3..]), &ctx);
                // Same Ethernet addresses and VLAN as the encapsulated frame, the client's
                // packet (with its padding) behind them.
                assert_eq!(&run.frame[..12], &enc[..12], "{ctx}: MACs");
                assert_eq!(&run.frame[12..], &input[12..], "{ctx}: the client's packet");
            }
        }
    }
    // 4-in-4, 6-in-6, 4-in-6, for both IPIP and GUE.
    assert_eq!(kinds.len(), 6, "covered {kinds:?}");
}

#[test]
fn decap_passes_everything_else_untouched() {
    let mut env = Env::standard();
    let c4 = client4(1);
    let c6 = client6(1);
    let b4 = Ipv4Addr::new(198, 18, 20, 10);
    let b6: Ipv6Addr = "2001:db8:14::a".parse().unwrap();
    let mut frames: Vec<(&str, Vec<u8>)> = vec![
        ("tcp4", Opts::default().tcp4(c4, 1, b4, 80, b"x")),
        ("udp4", Opts::default().udp4(c4, 1, b4, 53, b"x")),
        (
            "udp4 to 6081",
            Opts::default().udp4(c4, 1, b4, 6081, &[0x45; 40]),
        ),
        (
            "tcp6 vlan",
            Opts::default().with_vlan(3).tcp6(c6, 1, b6, 80, b"x"),
        ),
        (
            "udp6 to 6081",
            Opts::default().udp6(c6, 1, b6, 6081, &[0x60; 60]),
        ),
        (
            "gre4",
            Opts::default().ip_raw(c4.into(), b4.into(), 47, &[0; 24]),
        ),
        ("arp", raw_ether(0x0806, None, &[0; 28])),
        ("lldp", raw_ether(0x88cc, None, &[0; 40])),
        ("vlan arp", raw_ether(0x0806, Some(9), &[0; 28])),
        (
            "ipv4 fragment of IPIP",
            Opts {
                more_fragments: true,
                ..Default::default()
            }
            .ip_raw(c4.into(), b4.into(), 4, &[0x45; 40]),
        ),
    ];
    // lb outputs that are not encapsulated: L2DSR and too-big replies.
    let v = env.vip(v4(10, 1), 82, TCP);
    let input = input_for(&env, v, &Opts::default(), c4.into(), 7, b"dsr");
    frames.push(("l2dsr output", env.lb(&input).0.frame));
    let v = env.vip(v4(10, 1), 80, TCP);
    let big = sized_input(&env, v, &Opts::default().with_df(true), c4.into(), 1490);
    let reply = env.lb(&big).0.frame;
    assert_frame_eq(&reply, &expected_icmp_too_big4(&big, 1480), "too-big reply");
    frames.push(("icmp too-big reply", reply));
    for (name, f) in frames {
        let (run, r) = env.decap(&f);
        assert_eq!((run.action, r), (XDP_PASS, DecapReason::Pass), "{name}");
        assert_frame_eq(&run.frame, &f, &format!("{name}: untouched"));
    }
}

/// A VIP answers pings as a host would: MACs and addresses swapped, TTL / hop limit 64,
/// type echo reply, valid checksums, identifier, sequence and payload unchanged. The
/// expected reply is built from scratch with etherparse.
#[test]
fn echo_requests_to_a_vip_are_answered_by_the_lb() {
    use etherparse::{IcmpEchoHeader, Icmpv4Type, Icmpv6Type};
    use lb_tests::packets::{CLIENT_MAC, LB_MAC};
    let mut env = Env::standard();
    let echo = IcmpEchoHeader { id: 0x1234, seq: 7 };
    let payload = b"ping payload, 32 bytes long....";
    for (name, o) in variants() {
        let answer = Opts {
            ttl: OUTER_TTL,
            ..o.clone()
        }
        .with_macs(LB_MAC, CLIENT_MAC);
        let (IpAddr::V4(vip), IpAddr::V4(client)) = (v4(10, 1), v4(100, 7)) else {
            unreachable!()
        };
        let request = o.icmp4(client, vip, Icmpv4Type::EchoRequest(echo), payload);
        let want = answer.icmp4(vip, client, Icmpv4Type::EchoReply(echo), payload);
        let (run, reason) = env.lb(&request);
        assert_eq!((run.action, reason), (3, Reason::TxIcmpEcho), "{name} v4");
        assert_frame_eq(&run.frame, &want, &format!("{name}: IPv4 echo reply"));

        let (IpAddr::V6(vip), IpAddr::V6(client)) = (v6(10, 1), v6(100, 7)) else {
            unreachable!()
        };
        let o6 = Opts {
            df: false,
            ..o.clone()
        };
        let answer6 = Opts {
            ttl: OUTER_TTL,
            df: false,
            ..o.clone()
        }
        .with_macs(LB_MAC, CLIENT_MAC);
        let request = o6.icmp6(client, vip, Icmpv6Type::EchoRequest(echo), payload);
        let want = answer6.icmp6(vip, client, Icmpv6Type::EchoReply(echo), payload);
        let (run, reason) = env.lb(&request);
        assert_eq!((run.action, reason), (3, Reason::TxIcmpEcho), "{name} v6");
        assert_frame_eq(&run.frame, &want, &format!("{name}: IPv6 echo reply"));
    }
}
