//! Unit tests of the reference model: the spec's corner cases, one by one.
use super::*;
use crate::packets::*;
use etherparse::{Icmpv4Slice, Icmpv4Type, Icmpv6Slice, Icmpv6Type, Ipv4HeaderSlice};
use lb_common::{Config, BACKEND_DOWN};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const VIP4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 7);
const ROUTER4: Ipv4Addr = Ipv4Addr::new(198, 18, 250, 1);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 1);
const OTHER4: Ipv4Addr = Ipv4Addr::new(198, 19, 99, 9);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 9);
const BE4A: Ipv4Addr = Ipv4Addr::new(198, 19, 10, 1);
const BE4B: Ipv4Addr = Ipv4Addr::new(198, 19, 10, 2);
const BE6A: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
const BE6B: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
const MAC_A: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 1];
const MAC_C: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 3];
const GW_MAC: [u8; 6] = [0x02, 0x99, 0, 0, 0, 0x99];
const SRC4: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 0);
const SRC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0);

// Backend ids.
const B4A: u32 = 1; // v4, own MAC
const B4B: u32 = 2; // v4, gateway MAC
const B6A: u32 = 3; // v6, own MAC
const B6B: u32 = 4; // v6, gateway MAC
const B4C: u32 = 5; // v4, own MAC, for multi-backend rings
const RING_STRIDE: u32 = 64;

fn config(mtu: u32) -> Config {
    Config {
        hash_seed: 0x5eed_1234,
        mtu,
        src4: addr4_raw(SRC4),
        src4_mask: u32::from_ne_bytes([0, 0, 0xff, 0xff]),
        src6: addr6_raw(SRC6),
        src6_mask: u32::from_ne_bytes([0, 0, 0xff, 0xff]),
        gw_mac: GW_MAC,
        _pad: [0; 2],
    }
}

fn backend(addr: IpAddr, mac: [u8; 6]) -> Backend {
    let (a, family) = addr_raw(addr);
    Backend {
        addr: a,
        mac,
        family,
        state: BACKEND_UP,
        vip: 0,
    }
}

/// An entry for backend `backend` of VIP id `vip` (the backend is made a member of it).
fn entry(m: &mut Model, backend: u32, vip: u32) -> ConnVal {
    if let Some(be) = m.backends.get_mut(backend as usize) {
        be.vip = vip;
    }
    ConnVal {
        backend,
        vip: vip as u16,
        ..Default::default()
    }
}

fn model(mtu: u32) -> Model {
    let mut m = Model::new(config(mtu));
    m.backends = vec![
        Backend::default(),
        backend(BE4A.into(), MAC_A),
        backend(BE4B.into(), [0; 6]),
        backend(BE6A.into(), MAC_A),
        backend(BE6B.into(), [0; 6]),
        backend(Ipv4Addr::new(198, 19, 10, 3).into(), MAC_C),
    ];
    m
}

#[allow(clippy::too_many_arguments)]
fn add_vip(
    m: &mut Model,
    addr: IpAddr,
    port: u16,
    proto: u8,
    id: u32,
    mode: Forwarding,
    ring: &[u32],
    flags: u8,
) {
    let ring_base = id * 2 * RING_STRIDE + RING_STRIDE; // the "second" ring of the pair
    for (i, b) in ring.iter().enumerate() {
        m.rings.insert(ring_base + i as u32, *b);
        if let Some(be) = m.backends.get_mut(*b as usize) {
            be.vip = id; // a member of this VIP (its connection entries hold)
        }
    }
    m.vips.insert(
        vip_key(addr, port, proto),
        VipMeta {
            id,
            ring_base,
            ring_size: ring.len() as u32,
            forwarding: mode as u8,
            flags,
            _pad: [0; 2],
        },
    );
    m.vip_addrs.insert(addr_key(addr));
}

fn outer4(cfg: &Config, entropy: u32, dst: Ipv4Addr) -> Outer {
    let src = (cfg.src4 & !cfg.src4_mask) | (entropy & cfg.src4_mask);
    Outer::V4 {
        src: Ipv4Addr::from(src.to_ne_bytes()),
        dst,
    }
}

fn outer6(cfg: &Config, entropy: u32, dst: Ipv6Addr) -> Outer {
    let mut w = cfg.src6;
    w[3] = (w[3] & !cfg.src6_mask) | (entropy & cfg.src6_mask);
    let mut b = [0u8; 16];
    for i in 0..4 {
        b[4 * i..4 * i + 4].copy_from_slice(&w[i].to_ne_bytes());
    }
    Outer::V6 {
        src: Ipv6Addr::from(b),
        dst,
    }
}

fn outer_for(cfg: &Config, entropy: u32, be: IpAddr) -> Outer {
    match be {
        IpAddr::V4(a) => outer4(cfg, entropy, a),
        IpAddr::V6(a) => outer6(cfg, entropy, a),
    }
}

fn client_for(vip: IpAddr) -> IpAddr {
    match vip {
        IpAddr::V4(_) => CLIENT4.into(),
        IpAddr::V6(_) => CLIENT6.into(),
    }
}

/// The outer IPv4 header checksum and the checksum of an outer ICMP message verify with
/// etherparse; with `deep`, also every header inside IP-in-IP / GUE encapsulation.
fn verify_checksums_deep(frame: &[u8], deep: bool) {
    let l2 = parse_l2(frame);
    let mut ip = &frame[l2.l3..];
    let mut v6 = l2.ether_type == etherparse::EtherType::IPV6;
    loop {
        let (proto, l4, src6, dst6) = if !v6 {
            let h = Ipv4HeaderSlice::from_slice(ip).expect("ipv4 header");
            assert_eq!(
                h.to_header().calc_header_checksum(),
                h.header_checksum(),
                "ipv4 checksum"
            );
            let end = usize::from(h.total_len()).min(ip.len());
            (h.protocol().0, &ip[h.slice().len()..end], [0; 16], [0; 16])
        } else {
            let h = etherparse::Ipv6HeaderSlice::from_slice(ip).expect("ipv6 header");
            let end = (40 + usize::from(h.payload_length())).min(ip.len());
            (h.next_header().0, &ip[40..end], h.source(), h.destination())
        };
        match proto {
            4 | 41 | 17 if !deep => return,
            4 | 41 => {
                v6 = proto == 41;
                ip = l4;
            }
            17 if l4.len() >= 9 && u16::from_be_bytes([l4[2], l4[3]]) == GUE_PORT => {
                v6 = l4[8] >> 4 == 6;
                ip = &l4[8..];
            }
            1 => {
                let s = Icmpv4Slice::from_slice(l4).unwrap();
                let want = etherparse::Icmpv4Header::with_checksum(s.icmp_type(), s.payload());
                assert_eq!(want.checksum, s.checksum(), "icmp checksum");
                return;
            }
            58 => {
                let s = Icmpv6Slice::from_slice(l4).unwrap();
                assert!(s.is_checksum_valid(src6, dst6), "icmpv6 checksum");
                return;
            }
            _ => return,
        }
    }
}

fn verify_checksums(frame: &[u8]) {
    verify_checksums_deep(frame, false)
}

fn assert_frame_eq(got: &[u8], want: &[u8]) {
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "frames differ (len {} vs {}), first difference at {:?}\n got: {:02x?}\nwant: {:02x?}",
            got.len(),
            want.len(),
            first,
            got,
            want
        );
    }
}

fn check_invariants(m: &Model, frame: &[u8], o: &Outcome) {
    match o.action {
        Action::Pass | Action::Drop => {
            assert_eq!(o.frame, frame);
            assert!(o.backend.is_none());
        }
        Action::Redirect => panic!("lb never redirects"),
        Action::Tx => {
            assert!(matches!(
                o.reason,
                Reason::TxForward
                    | Reason::TxIcmpForward
                    | Reason::TxIcmpTooBig
                    | Reason::TxIcmpEcho
            ));
            // Only what the program built: the ICMP reply, or an outer header.
            if o.reason == Reason::TxIcmpTooBig || o.frame.len() != frame.len() {
                verify_checksums(&o.frame);
            }
        }
    }
    let name = o.reason.name();
    assert_eq!(
        o.action == Action::Pass,
        name.starts_with("pass"),
        "action {:?} vs reason {name}",
        o.action
    );
    let _ = m;
}

// -----------------------------------------------------------------------------------
// Forwarding modes and family combinations

struct Case {
    vip: IpAddr,
    proto: u8,
    be: u32,
    be_addr: IpAddr,
    mac: [u8; 6],
    mode: Forwarding,
    opts: Opts,
}

fn run_case(c: &Case) {
    let mut m = model(1500);
    add_vip(&mut m, c.vip, 443, c.proto, 7, c.mode, &[c.be], 0);
    let client = client_for(c.vip);
    let payload: Vec<u8> = (0..100u8).collect();
    let input = if c.proto == TCP {
        c.opts.tcp(client, 40000, c.vip, 443, &payload)
    } else {
        c.opts.udp(client, 40000, c.vip, 443, &payload)
    };
    let flow = flow_key(client, 40000, c.vip, 443, c.proto);
    let entropy = flow_entropy(&flow);
    let o = m.lb(&input);
    assert_eq!((o.action, o.reason), (Action::Tx, Reason::TxForward));
    assert_eq!(o.backend, Some(c.be));
    assert!(o.new_flow);
    let want = match c.mode {
        Forwarding::Ipip => expected_ipip(
            &input,
            c.mac,
            outer_for(&m.config, entropy, c.be_addr),
            entropy,
        ),
        Forwarding::Gue => expected_gue(
            &input,
            c.mac,
            outer_for(&m.config, entropy, c.be_addr),
            entropy,
        ),
        Forwarding::L2Dsr => expected_l2dsr(&input, c.mac),
    };
    assert_frame_eq(&o.frame, &want);
    verify_checksums_deep(&o.frame, true);
    // Counters.
    assert_eq!(m.stats[Reason::TxForward as usize], 1);
    assert_eq!(m.stats.iter().sum::<u64>(), 1);
    let vs = m.vip_stats[&7];
    assert_eq!(
        (vs.packets, vs.bytes, vs.new_flows),
        (1, input.len() as u64, 1)
    );
    let bs = m.be_stats[&c.be];
    assert_eq!(
        (bs.packets, bs.bytes, bs.new_flows),
        (1, input.len() as u64, 1)
    );
    assert_eq!(m.conns[&flow].backend, c.be);
    // Second packet: established, same bytes out.
    let o2 = m.lb(&input);
    assert_eq!(o2.frame, o.frame);
    assert!(!o2.new_flow);
    assert_eq!(m.be_stats[&c.be].new_flows, 1);
    assert_eq!(m.be_stats[&c.be].packets, 2);
    // Decapsulation on the backend gives back the client's packet.
    if c.mode != Forwarding::L2Dsr {
        let (a, r, d) = decap(&o.frame);
        assert_eq!((a, r), (Action::Pass, DecapReason::Decapped));
        let l3 = parse_l2(&input).l3;
        assert_frame_eq(&d, &expected_decap(&o.frame, &input[l3..]));
        assert_eq!(&d[12..], &input[12..]);
    }
}

fn all_cases() -> Vec<Case> {
    let mut v = Vec::new();
    let opt_sets = [
        Opts::default(),
        Opts::default().with_vlan(42).with_tos(0xb9).with_df(true),
        Opts::default().with_padding(7).with_tos(3),
        Opts {
            ipv4_options: vec![1, 1, 1, 0, 0x94, 4, 0, 0],
            flow_label: 0xabcde,
            ..Opts::default().with_vlan(4095)
        },
    ];
    for opts in &opt_sets {
        for proto in [TCP, UDP] {
            for mode in [Forwarding::Ipip, Forwarding::Gue, Forwarding::L2Dsr] {
                for vip in [IpAddr::from(VIP4), IpAddr::from(VIP6)] {
                    let backends: [(u32, IpAddr, [u8; 6]); 4] = [
                        (B4A, BE4A.into(), MAC_A),
                        (B4B, BE4B.into(), GW_MAC),
                        (B6A, BE6A.into(), MAC_A),
                        (B6B, BE6B.into(), GW_MAC),
                    ];
                    for (be, be_addr, mac) in backends {
                        v.push(Case {
                            vip,
                            proto,
                            be,
                            be_addr,
                            mac,
                            mode,
                            opts: opts.clone(),
                        });
                    }
                }
            }
        }
    }
    v
}

#[test]
fn every_mode_and_family_matches_etherparse_expectation() {
    // 4-in-4, 6-in-6, 4-in-6, 6-in-4 (IPIP), GUE over v4 and v6, L2 DSR; with and
    // without VLAN, TOS, padding, IPv4 options, gateway MAC.
    for c in all_cases() {
        run_case(&c);
    }
}

#[test]
fn outer_header_details() {
    // Spot-check bytes against the spec text directly (not only against etherparse).
    let mut m = model(0);
    add_vip(&mut m, VIP4.into(), 80, TCP, 1, Forwarding::Gue, &[B6A], 0);
    let input = Opts::default()
        .with_tos(0xfd)
        .tcp4(CLIENT4, 1234, VIP4, 80, b"x");
    let o = m.lb(&input);
    let f = &o.frame;
    let flow = flow4(CLIENT4, 1234, VIP4, 80, TCP);
    let e = flow_entropy(&flow);
    assert_eq!(&f[12..14], &[0x86, 0xdd]);
    let w0 = u32::from_be_bytes([f[14], f[15], f[16], f[17]]);
    assert_eq!(w0, 0x6000_0000 | (0xfd << 20) | (e & 0xfffff));
    let inner_len = input.len() - 14;
    assert_eq!(u16::from_be_bytes([f[18], f[19]]) as usize, inner_len + 8);
    assert_eq!((f[20], f[21]), (17, 64));
    assert_eq!(
        u16::from_be_bytes([f[54], f[55]]),
        0xC000 | (e & 0x3fff) as u16
    );
    assert_eq!(u16::from_be_bytes([f[56], f[57]]), 6080);
    assert_eq!(u16::from_be_bytes([f[58], f[59]]) as usize, 8 + inner_len);
    assert_eq!(&f[60..62], &[0, 0]);
    assert_eq!(&f[62..], &input[14..]);
    // mtu 0: no check even for a big packet.
    let big = tcp4(CLIENT4, 1234, VIP4, 80, false, &[0u8; 9000]);
    assert_eq!(m.lb(&big).reason, Reason::TxForward);
}

// -----------------------------------------------------------------------------------
// Parse errors

fn simple_model() -> Model {
    let mut m = model(1500);
    add_vip(&mut m, VIP4.into(), 80, TCP, 1, Forwarding::Ipip, &[B4A], 0);
    add_vip(&mut m, VIP4.into(), 53, UDP, 2, Forwarding::Gue, &[B4B], 0);
    add_vip(&mut m, VIP6.into(), 80, TCP, 3, Forwarding::Ipip, &[B6A], 0);
    add_vip(
        &mut m,
        VIP6.into(),
        53,
        UDP,
        4,
        Forwarding::L2Dsr,
        &[B6B],
        0,
    );
    m
}

fn reason(m: &mut Model, f: &[u8]) -> (Action, Reason) {
    let o = m.lb(f);
    check_invariants(m, f, &o);
    (o.action, o.reason)
}

const DROP_TRUNC: (Action, Reason) = (Action::Drop, Reason::DropTruncated);
const DROP_BAD: (Action, Reason) = (Action::Drop, Reason::DropBadHeader);
const PASS_NOT_VIP: (Action, Reason) = (Action::Pass, Reason::PassNotVip);
const PASS_NOT_IP: (Action, Reason) = (Action::Pass, Reason::PassNotIp);

#[test]
fn truncation_at_every_length() {
    let mut m = simple_model();
    let v4opts = Opts {
        ipv4_options: vec![1; 8],
        ..Default::default()
    };
    let frames: Vec<(Vec<u8>, usize)> = vec![
        (tcp4(CLIENT4, 1, VIP4, 80, true, b"hello"), 14),
        (udp4(CLIENT4, 1, VIP4, 53, b"hello"), 14),
        (
            Opts::default()
                .with_vlan(3)
                .tcp4(CLIENT4, 1, VIP4, 80, b"hi"),
            18,
        ),
        (v4opts.tcp4(CLIENT4, 1, VIP4, 80, b""), 14),
        (tcp6(CLIENT6, 1, VIP6, 80, true, b"hello"), 14),
        (
            Opts::default()
                .with_vlan(3)
                .udp6(CLIENT6, 1, VIP6, 53, b"x"),
            18,
        ),
    ];
    for (f, l3) in frames {
        let v6 = f[l3 - 2] == 0x86;
        let hl = if v6 { 40 } else { usize::from(f[l3] & 0xf) * 4 };
        assert_eq!(reason(&mut m, &f).0, Action::Tx);
        for n in 0..f.len() {
            let want = if n < 14 || n < l3 || n < l3 + 20 || n < l3 + hl {
                DROP_TRUNC
            } else {
                // The length field now claims more than the frame holds.
                DROP_BAD
            };
            assert_eq!(reason(&mut m, &f[..n]), want, "len {n} of {}", f.len());
        }
        // Padding can be cut off freely.
        let mut padded = f.clone();
        padded.extend_from_slice(&[0; 10]);
        for n in f.len()..=padded.len() {
            assert_eq!(reason(&mut m, &padded[..n]).0, Action::Tx);
        }
    }
}

#[test]
fn l4_header_must_fit_in_datagram() {
    let mut m = simple_model();
    // TCP header cut by the IP length (the rest of the frame becomes padding).
    for (mut f, tl) in [
        (tcp4(CLIENT4, 1, VIP4, 80, false, b""), 20 + 19),
        (udp4(CLIENT4, 1, VIP4, 53, b""), 20 + 7),
        (tcp4(CLIENT4, 1, OTHER4, 80, false, b""), 20 + 19),
    ] {
        f[16..18].copy_from_slice(&(tl as u16).to_be_bytes());
        assert_eq!(reason(&mut m, &f), DROP_TRUNC);
        f[16..18].copy_from_slice(&(tl as u16 + 1).to_be_bytes());
        assert_eq!(
            reason(&mut m, &f).0 == Action::Tx,
            f[30..34] == VIP4.octets()
        );
    }
    let mut f = tcp6(CLIENT6, 1, VIP6, 80, false, b"");
    f[18..20].copy_from_slice(&19u16.to_be_bytes());
    assert_eq!(reason(&mut m, &f), DROP_TRUNC);
    f[18..20].copy_from_slice(&20u16.to_be_bytes());
    assert_eq!(reason(&mut m, &f).1, Reason::TxForward);
}

#[test]
fn bad_headers() {
    let mut m = simple_model();
    let good4 = tcp4(CLIENT4, 1, VIP4, 80, false, b"data");
    let good6 = tcp6(CLIENT6, 1, VIP6, 80, false, b"data");
    let edit4 = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut v = good4.clone();
        f(&mut v);
        v
    };
    // Wrong version nibble, IHL < 5.
    assert_eq!(reason(&mut m, &edit4(&|v| v[14] = 0x65)), DROP_BAD);
    assert_eq!(reason(&mut m, &edit4(&|v| v[14] = 0x44)), DROP_BAD);
    assert_eq!(reason(&mut m, &edit4(&|v| v[14] = 0x40)), DROP_BAD);
    // IHL 15 in a frame shorter than 14 + 60: truncated (checked before total length).
    assert_eq!(reason(&mut m, &edit4(&|v| v[14] = 0x4f)), DROP_TRUNC);
    // IHL 6 (ports then read 4 bytes later; still fits: to VIP, other ports).
    assert_eq!(reason(&mut m, &edit4(&|v| v[14] = 0x46)), PASS_NOT_VIP);
    // Total length < IHL*4, > frame.
    assert_eq!(
        reason(
            &mut m,
            &edit4(&|v| v[16..18].copy_from_slice(&19u16.to_be_bytes()))
        ),
        DROP_BAD
    );
    assert_eq!(
        reason(
            &mut m,
            &edit4(&|v| v[16..18].copy_from_slice(&0u16.to_be_bytes()))
        ),
        DROP_BAD
    );
    let n = (good4.len() - 14 + 1) as u16;
    assert_eq!(
        reason(
            &mut m,
            &edit4(&|v| v[16..18].copy_from_slice(&n.to_be_bytes()))
        ),
        DROP_BAD
    );
    // Total length == 20 exactly (no room for TCP): truncated L4.
    assert_eq!(
        reason(
            &mut m,
            &edit4(&|v| v[16..18].copy_from_slice(&20u16.to_be_bytes()))
        ),
        DROP_TRUNC
    );
    // Bad header checksum is not verified.
    assert_eq!(
        reason(&mut m, &edit4(&|v| v[24] ^= 0xff)).1,
        Reason::TxForward
    );
    // IPv6: version, payload length beyond the frame.
    let mut v = good6.clone();
    v[14] = 0x40;
    assert_eq!(reason(&mut m, &v), DROP_BAD);
    let mut v = good6.clone();
    let pl = (good6.len() - 54 + 1) as u16;
    v[18..20].copy_from_slice(&pl.to_be_bytes());
    assert_eq!(reason(&mut m, &v), DROP_BAD);
    // IPv4 ethertype with an IPv6 packet and vice versa.
    let mut v = good6.clone();
    v[12..14].copy_from_slice(&[8, 0]);
    assert_eq!(reason(&mut m, &v), DROP_BAD);
    let mut v = good4.clone();
    v[12..14].copy_from_slice(&[0x86, 0xdd]);
    assert_eq!(reason(&mut m, &v), DROP_BAD); // long enough for 40 bytes, version 4
}

#[test]
fn non_ip_and_vlan() {
    let mut m = simple_model();
    assert_eq!(
        reason(&mut m, &raw_ether(0x0806, None, &[0; 28])),
        PASS_NOT_IP
    );
    assert_eq!(reason(&mut m, &raw_ether(0x88cc, None, &[])), PASS_NOT_IP);
    assert_eq!(
        reason(&mut m, &raw_ether(0x0806, Some(5), &[0; 28])),
        PASS_NOT_IP
    );
    // Only one tag is parsed: QinQ (0x8100 inside 0x8100) is not IP.
    let mut qinq = raw_ether(0x8100, Some(5), &[0, 6, 8, 0]);
    qinq.extend_from_slice(&ip_packet(&tcp4(CLIENT4, 1, VIP4, 80, false, b"")));
    assert_eq!(reason(&mut m, &qinq), PASS_NOT_IP);
    // 802.1ad outer tag is not parsed at all.
    assert_eq!(
        reason(&mut m, &raw_ether(0x88a8, None, &[0; 40])),
        PASS_NOT_IP
    );
    // VLAN tag without payload / cut inside the tag.
    let tagged = raw_ether(0x0800, Some(5), &[]);
    assert_eq!(tagged.len(), 18);
    assert_eq!(reason(&mut m, &tagged), DROP_TRUNC);
    assert_eq!(reason(&mut m, &tagged[..17]), DROP_TRUNC);
    assert_eq!(reason(&mut m, &tagged[..14]), DROP_TRUNC);
    assert_eq!(
        reason(&mut m, &raw_ether(0x0806, Some(5), &[])),
        PASS_NOT_IP
    );
    assert_eq!(reason(&mut m, &raw_ether(0x0800, None, &[])), DROP_TRUNC);
    assert_eq!(
        reason(&mut m, &raw_ether(0x86dd, None, &[0x60; 39])),
        DROP_TRUNC
    );
    assert_eq!(reason(&mut m, &[]), DROP_TRUNC);
}

#[test]
fn fragments_other_protocols_and_not_vip() {
    let mut m = simple_model();
    let mf = Opts {
        more_fragments: true,
        ..Default::default()
    };
    let off = Opts {
        frag_offset: 100,
        ..Default::default()
    };
    for o in [&mf, &off] {
        assert_eq!(
            reason(&mut m, &o.tcp4(CLIENT4, 1, VIP4, 80, b"x")),
            (Action::Drop, Reason::DropFragment)
        );
        // Any port/protocol on a VIP address.
        assert_eq!(
            reason(&mut m, &o.udp4(CLIENT4, 1, VIP4, 9, b"x")),
            (Action::Drop, Reason::DropFragment)
        );
        assert_eq!(
            reason(&mut m, &o.ip_raw(CLIENT4.into(), VIP4.into(), 47, b"")),
            (Action::Drop, Reason::DropFragment)
        );
        assert_eq!(
            reason(&mut m, &o.tcp4(CLIENT4, 1, OTHER4, 80, b"x")),
            PASS_NOT_VIP
        );
    }
    // DF alone is not a fragment.
    assert_eq!(
        reason(
            &mut m,
            &Opts::default()
                .with_df(true)
                .tcp4(CLIENT4, 1, VIP4, 80, b"x")
        )
        .1,
        Reason::TxForward
    );
    // A fragment is checked before the L4 header length.
    let mut f = mf.tcp4(CLIENT4, 1, VIP4, 80, b"");
    f.truncate(14 + 20 + 4);
    f[16..18].copy_from_slice(&24u16.to_be_bytes());
    assert_eq!(reason(&mut m, &f), (Action::Drop, Reason::DropFragment));
    let v6f = Opts {
        ipv6_fragment: true,
        ..Default::default()
    };
    let f = v6f.tcp6(CLIENT6, 1, VIP6, 80, b"x");
    assert_eq!(f[20], 44);
    assert_eq!(reason(&mut m, &f), (Action::Drop, Reason::DropFragment));
    assert_eq!(
        reason(&mut m, &v6f.tcp6(CLIENT6, 1, OTHER6, 80, b"x")),
        PASS_NOT_VIP
    );
    // Other protocols.
    assert_eq!(
        reason(
            &mut m,
            &Opts::default().ip_raw(CLIENT4.into(), VIP4.into(), 47, &[0; 8])
        ),
        (Action::Drop, Reason::DropUnsupported)
    );
    assert_eq!(
        reason(
            &mut m,
            &Opts::default().ip_raw(CLIENT4.into(), OTHER4.into(), 47, &[0; 8])
        ),
        PASS_NOT_VIP
    );
    assert_eq!(
        reason(
            &mut m,
            &Opts::default().ip_raw(CLIENT4.into(), VIP4.into(), 58, &[0; 8])
        ),
        (Action::Drop, Reason::DropUnsupported)
    );
    let mut hop_by_hop = tcp6(CLIENT6, 1, VIP6, 80, false, b"");
    hop_by_hop[20] = 0;
    assert_eq!(
        reason(&mut m, &hop_by_hop),
        (Action::Drop, Reason::DropUnsupported)
    );
    assert_eq!(
        reason(
            &mut m,
            &Opts::default().ip_raw(CLIENT6.into(), VIP6.into(), 1, &[0; 8])
        ),
        (Action::Drop, Reason::DropUnsupported)
    );
    assert_eq!(
        reason(
            &mut m,
            &Opts::default().ip_raw(CLIENT6.into(), OTHER6.into(), 43, &[0; 8])
        ),
        PASS_NOT_VIP
    );
    // TCP/UDP to a VIP address but not a VIP port/protocol; to another address.
    assert_eq!(
        reason(&mut m, &tcp4(CLIENT4, 1, VIP4, 81, false, b"")),
        PASS_NOT_VIP
    );
    assert_eq!(
        reason(&mut m, &udp4(CLIENT4, 1, VIP4, 80, b"")),
        PASS_NOT_VIP
    );
    assert_eq!(
        reason(&mut m, &tcp6(CLIENT6, 1, VIP6, 53, false, b"")),
        PASS_NOT_VIP
    );
    assert_eq!(
        reason(&mut m, &tcp4(CLIENT4, 1, OTHER4, 80, false, b"")),
        PASS_NOT_VIP
    );
    // ICMP to a non-VIP address passes; a VIP answers echo requests.
    let echo4 = Icmpv4Type::EchoRequest(etherparse::IcmpEchoHeader { id: 1, seq: 1 });
    let echo6 = Icmpv6Type::EchoRequest(etherparse::IcmpEchoHeader { id: 1, seq: 1 });
    assert_eq!(
        reason(
            &mut m,
            &Opts::default().icmp4(CLIENT4, OTHER4, echo4.clone(), b"ping")
        ),
        PASS_NOT_VIP
    );
    assert_eq!(
        reason(
            &mut m,
            &Opts::default().icmp4(CLIENT4, VIP4, echo4, b"ping")
        ),
        (Action::Tx, Reason::TxIcmpEcho)
    );
    assert_eq!(
        reason(
            &mut m,
            &Opts::default().icmp6(CLIENT6, OTHER6, echo6, b"ping")
        ),
        PASS_NOT_VIP
    );
    assert_eq!(
        reason(
            &mut m,
            &Opts::default().icmp6(CLIENT6, VIP6, echo6, b"ping")
        ),
        (Action::Tx, Reason::TxIcmpEcho)
    );
    // No VIP counters for any of these (only the one DF packet forwarded above).
    assert_eq!(m.vip_stats.len(), 1);
    assert_eq!(m.vip_stats[&1].packets, 1);
    assert_eq!(m.conns.len(), 1);
}

// -----------------------------------------------------------------------------------
// Too big

#[test]
fn too_big_v4_df_and_not_df() {
    for (mode, be, be_addr, overhead) in [
        (Forwarding::Ipip, B4A, IpAddr::from(BE4A), 20u32),
        (Forwarding::Gue, B4A, BE4A.into(), 28),
        (Forwarding::Ipip, B6A, BE6A.into(), 40),
        (Forwarding::Gue, B6B, BE6B.into(), 48),
    ] {
        let mtu = 1400;
        let mut m = model(mtu);
        add_vip(&mut m, VIP4.into(), 80, TCP, 1, mode, &[be], 0);
        for vlan in [None, Some(9)] {
            let o = Opts {
                vlan,
                ..Default::default()
            };
            // inner_len + overhead == mtu: forwarded.
            let fit = (mtu - overhead - 40) as usize;
            let f = o
                .clone()
                .with_df(true)
                .tcp4(CLIENT4, 5, VIP4, 80, &vec![1; fit]);
            let out = m.lb(&f);
            assert_eq!(out.reason, Reason::TxForward);
            let e = flow_entropy(&flow4(CLIENT4, 5, VIP4, 80, TCP));
            let outer = outer_for(&m.config, e, be_addr);
            let want = if mode == Forwarding::Gue {
                expected_gue(&f, MAC_A_OR_GW(be), outer, e)
            } else {
                expected_ipip(&f, MAC_A_OR_GW(be), outer, e)
            };
            assert_frame_eq(&out.frame, &want);
            // One byte more: DF -> ICMP, no DF -> drop.
            let f = o
                .clone()
                .with_df(true)
                .tcp4(CLIENT4, 5, VIP4, 80, &vec![1; fit + 1]);
            let out = m.lb(&f);
            assert_eq!((out.action, out.reason), (Action::Tx, Reason::TxIcmpTooBig));
            assert_eq!(out.backend, None);
            assert_frame_eq(
                &out.frame,
                &expected_icmp_too_big4(&f, (mtu - overhead) as u16),
            );
            verify_checksums(&out.frame);
            let f = o
                .clone()
                .with_df(false)
                .tcp4(CLIENT4, 5, VIP4, 80, &vec![1; fit + 1]);
            let out = m.lb(&f);
            assert_eq!((out.action, out.reason), (Action::Drop, Reason::DropTooBig));
        }
        // Backend counters only for the forwarded packets; CONNS has the flow.
        assert_eq!(m.be_stats[&be].packets, 2);
        assert_eq!(m.vip_stats[&1].packets, 6);
        assert_eq!(m.vip_stats[&1].new_flows, 1);
        assert_eq!(m.stats[Reason::TxIcmpTooBig as usize], 2);
        assert_eq!(m.stats[Reason::DropTooBig as usize], 2);
    }
}

#[allow(non_snake_case)]
fn MAC_A_OR_GW(be: u32) -> [u8; 6] {
    if be == B4B || be == B6B {
        GW_MAC
    } else {
        MAC_A
    }
}

#[test]
fn too_big_new_flow_is_still_recorded() {
    let mut m = model(100);
    add_vip(&mut m, VIP4.into(), 80, TCP, 1, Forwarding::Ipip, &[B4A], 0);
    let f = Opts::default()
        .with_df(true)
        .tcp4(CLIENT4, 5, VIP4, 80, &[0; 100]);
    let o = m.lb(&f);
    assert_eq!(o.reason, Reason::TxIcmpTooBig);
    assert!(o.new_flow);
    assert_eq!(m.conns.len(), 1);
    assert!(m.be_stats.is_empty());
}

#[test]
fn too_big_v6() {
    for (mode, be, overhead) in [
        (Forwarding::Ipip, B6A, 40u32),
        (Forwarding::Gue, B6A, 48),
        (Forwarding::Ipip, B4A, 20),
        (Forwarding::Gue, B4B, 28),
    ] {
        let mtu = 1280;
        let mut m = model(mtu);
        add_vip(&mut m, VIP6.into(), 443, UDP, 2, mode, &[be], 0);
        let fit = (mtu - overhead - 48) as usize;
        let f = Opts::default()
            .with_vlan(7)
            .udp6(CLIENT6, 5, VIP6, 443, &vec![2; fit]);
        assert_eq!(m.lb(&f).reason, Reason::TxForward);
        let f = Opts::default()
            .with_vlan(7)
            .udp6(CLIENT6, 5, VIP6, 443, &vec![2; fit + 1]);
        let out = m.lb(&f);
        assert_eq!((out.action, out.reason), (Action::Tx, Reason::TxIcmpTooBig));
        assert_frame_eq(&out.frame, &expected_icmp_too_big6(&f, mtu - overhead));
        verify_checksums(&out.frame);
    }
}

#[test]
fn too_big_but_too_short_to_quote() {
    // mtu so small that a short packet is too big, but it has < 64 / 128 bytes from l3.
    let mut m = model(60);
    add_vip(&mut m, VIP4.into(), 80, TCP, 1, Forwarding::Ipip, &[B4A], 0);
    add_vip(&mut m, VIP6.into(), 80, TCP, 2, Forwarding::Ipip, &[B6A], 0);
    let f = Opts::default()
        .with_df(true)
        .tcp4(CLIENT4, 5, VIP4, 80, &[0; 23]); // 63 bytes
    assert_eq!(reason(&mut m, &f), (Action::Drop, Reason::DropTooBig));
    let f = Opts::default()
        .with_df(true)
        .tcp4(CLIENT4, 5, VIP4, 80, &[0; 24]); // 64 bytes
    assert_eq!(reason(&mut m, &f), (Action::Tx, Reason::TxIcmpTooBig));
    // Ethernet padding counts as frame bytes from l3 (spec: "frames holding").
    let f = Opts::default()
        .with_df(true)
        .with_padding(1)
        .tcp4(CLIENT4, 5, VIP4, 80, &[0; 23]);
    let o = m.lb(&f);
    assert_eq!(o.reason, Reason::TxIcmpTooBig);
    assert_frame_eq(&o.frame, &expected_icmp_too_big4(&f, 40));
    let f = tcp6(CLIENT6, 5, VIP6, 80, false, &[0; 67]); // 127 bytes
    assert_eq!(reason(&mut m, &f), (Action::Drop, Reason::DropTooBig));
    let f = tcp6(CLIENT6, 5, VIP6, 80, false, &[0; 68]);
    let o = m.lb(&f);
    assert_eq!(o.reason, Reason::TxIcmpTooBig);
    // mtu - overhead = 60 - 40 = 20.
    assert_frame_eq(&o.frame, &expected_icmp_too_big6(&f, 20));
}

// -----------------------------------------------------------------------------------
// ICMP errors about VIP flows

#[test]
fn icmp_errors_follow_the_flow() {
    let mut m = model(1500);
    // Multi-backend ring so the CONNS entry (not the ring) must decide.
    add_vip(
        &mut m,
        VIP4.into(),
        80,
        TCP,
        1,
        Forwarding::Ipip,
        &[B4A, B4B, B4C],
        0,
    );
    add_vip(
        &mut m,
        VIP6.into(),
        80,
        UDP,
        2,
        Forwarding::Gue,
        &[B6A, B6B],
        0,
    );
    // Established flows pinned to a backend the ring would maybe not choose.
    let flow = flow4(CLIENT4, 5555, VIP4, 80, TCP);
    let e = entry(&mut m, B4C, 1);
    m.conns.insert(flow, e);
    let flow6 = flow6(CLIENT6, 5555, VIP6, 80, UDP);
    let e = entry(&mut m, B6B, 2);
    m.conns.insert(flow6, e);

    let quoted = ip_packet(&tcp4(VIP4, 80, CLIENT4, 5555, false, &[9; 30]));
    for f in [
        icmp4_dest_unreach(ROUTER4, VIP4, 1400, &quoted),
        icmp4_time_exceeded(ROUTER4, VIP4, &quoted),
        icmp4_dest_unreach(ROUTER4, VIP4, 1400, &quoted[..24]), // ports only
    ] {
        let o = m.lb(&f);
        assert_eq!(
            (o.action, o.reason, o.backend, o.new_flow),
            (Action::Tx, Reason::TxIcmpForward, Some(B4C), false)
        );
        let e = flow_entropy(&flow);
        let want = expected_ipip(
            &f,
            MAC_C,
            outer4(&m.config, e, Ipv4Addr::new(198, 19, 10, 3)),
            e,
        );
        assert_frame_eq(&o.frame, &want);
    }
    assert_eq!(m.be_stats[&B4C].packets, 3);
    assert_eq!(m.be_stats[&B4C].new_flows, 0);
    assert_eq!(m.vip_stats[&1].packets, 3);

    let quoted6 = ip_packet(&udp6(VIP6, 80, CLIENT6, 5555, &[9; 200]));
    for f in [
        icmp6_packet_too_big(ROUTER6, VIP6, 1280, &quoted6),
        icmp6_dest_unreach(ROUTER6, VIP6, &quoted6[..44]),
    ] {
        let o = m.lb(&f);
        assert_eq!((o.reason, o.backend), (Reason::TxIcmpForward, Some(B6B)));
        let e = flow_entropy(&flow6);
        assert_frame_eq(
            &o.frame,
            &expected_gue(&f, GW_MAC, outer6(&m.config, e, BE6B), e),
        );
    }

    // Unknown flow: ring choice, nothing inserted, no new flow counted.
    let conns = m.conns.clone();
    let quoted = ip_packet(&tcp4(VIP4, 80, CLIENT4, 7777, false, &[]));
    let o = m.lb(&icmp4_dest_unreach(ROUTER4, VIP4, 1400, &quoted));
    assert_eq!(o.reason, Reason::TxIcmpForward);
    assert_eq!(m.conns, conns);
    assert_eq!(m.vip_stats[&1].new_flows, 0);
    // ... and it is the backend a packet of that flow would get.
    // (A SYN would take the ring's choice too, but creates no entry: an ACK does.)
    let o2 = m.lb(&tcp4(CLIENT4, 7777, VIP4, 80, false, b""));
    assert_eq!(o2.backend, o.backend);
    assert!(o2.new_flow);
}

#[test]
fn icmp_error_reasons() {
    let mut m = model(1500);
    add_vip(&mut m, VIP4.into(), 80, TCP, 1, Forwarding::Ipip, &[B4A], 0);
    add_vip(&mut m, VIP6.into(), 80, TCP, 2, Forwarding::Ipip, &[B6A], 0);
    let q4 = ip_packet(&tcp4(VIP4, 80, CLIENT4, 5555, false, &[]));
    let q6 = ip_packet(&tcp6(VIP6, 80, CLIENT6, 5555, false, &[]));
    let drop = |r| (Action::Drop, r);
    // Quote too short for the IP header / the ports.
    assert_eq!(
        reason(&mut m, &icmp4_dest_unreach(ROUTER4, VIP4, 1, &q4[..19])),
        drop(Reason::DropTruncated)
    );
    assert_eq!(
        reason(&mut m, &icmp4_dest_unreach(ROUTER4, VIP4, 1, &q4[..23])),
        drop(Reason::DropTruncated)
    );
    assert_eq!(
        reason(&mut m, &icmp6_packet_too_big(ROUTER6, VIP6, 1, &q6[..39])),
        drop(Reason::DropTruncated)
    );
    assert_eq!(
        reason(&mut m, &icmp6_packet_too_big(ROUTER6, VIP6, 1, &q6[..43])),
        drop(Reason::DropTruncated)
    );
    // ICMP header itself truncated by the IP length.
    let mut f = icmp4_dest_unreach(ROUTER4, VIP4, 1, &q4);
    f[16..18].copy_from_slice(&27u16.to_be_bytes());
    assert_eq!(reason(&mut m, &f), drop(Reason::DropTruncated));
    // Type checked before the quote.
    let mut f = icmp4_dest_unreach(ROUTER4, VIP4, 1, &[]);
    f[34] = 5; // redirect
    assert_eq!(reason(&mut m, &f), drop(Reason::DropIcmp));
    let mut f = icmp6_packet_too_big(ROUTER6, VIP6, 1, &[]);
    f[54] = 4; // parameter problem
    assert_eq!(reason(&mut m, &f), drop(Reason::DropIcmp));
    // Quoted header with wrong version / IHL.
    let mut q = q4.clone();
    q[0] = 0x44;
    assert_eq!(
        reason(&mut m, &icmp4_dest_unreach(ROUTER4, VIP4, 1, &q)),
        drop(Reason::DropBadHeader)
    );
    q[0] = 0x65;
    assert_eq!(
        reason(&mut m, &icmp4_dest_unreach(ROUTER4, VIP4, 1, &q)),
        drop(Reason::DropBadHeader)
    );
    let mut q = q6.clone();
    q[0] = 0x45;
    assert_eq!(
        reason(&mut m, &icmp6_packet_too_big(ROUTER6, VIP6, 1, &q)),
        drop(Reason::DropBadHeader)
    );
    // Quoted IHL 6 moves the ports: here they are beyond the quote.
    let mut q = q4[..24].to_vec();
    q[0] = 0x46;
    assert_eq!(
        reason(&mut m, &icmp4_dest_unreach(ROUTER4, VIP4, 1, &q)),
        drop(Reason::DropTruncated)
    );
    // Quoted protocol not TCP/UDP.
    let mut q = q4.clone();
    q[9] = 1;
    assert_eq!(
        reason(&mut m, &icmp4_dest_unreach(ROUTER4, VIP4, 1, &q)),
        drop(Reason::DropIcmp)
    );
    let mut q = q6.clone();
    q[6] = 58;
    assert_eq!(
        reason(&mut m, &icmp6_packet_too_big(ROUTER6, VIP6, 1, &q)),
        drop(Reason::DropIcmp)
    );
    // Quoted tuple is not from a VIP (wrong source port / direction).
    let q = ip_packet(&tcp4(VIP4, 81, CLIENT4, 5555, false, &[]));
    assert_eq!(
        reason(&mut m, &icmp4_dest_unreach(ROUTER4, VIP4, 1, &q)),
        drop(Reason::DropIcmp)
    );
    let q = ip_packet(&tcp4(CLIENT4, 5555, VIP4, 80, false, &[]));
    assert_eq!(
        reason(&mut m, &icmp4_dest_unreach(ROUTER4, VIP4, 1, &q)),
        drop(Reason::DropIcmp)
    );
    assert!(m.vip_stats.is_empty());
    // Too big to encapsulate: always dropped, even with DF (never ICMP about ICMP).
    m.config.mtu = 60;
    let f = Opts::default().with_df(true).icmp4(
        ROUTER4,
        VIP4,
        Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port),
        &q4,
    );
    assert_eq!(reason(&mut m, &f), drop(Reason::DropTooBig));
    assert_eq!(
        reason(&mut m, &icmp6_packet_too_big(ROUTER6, VIP6, 1, &q6)),
        drop(Reason::DropTooBig)
    );
    assert_eq!(m.vip_stats[&1].packets, 1);
    assert!(m.be_stats.is_empty());
    // No backend.
    m.config.mtu = 0;
    m.vips.get_mut(&vip_key4(VIP4, 80, TCP)).unwrap().ring_size = 0;
    assert_eq!(
        reason(&mut m, &icmp4_time_exceeded(ROUTER4, VIP4, &q4)),
        drop(Reason::DropNoBackend)
    );
}

// -----------------------------------------------------------------------------------
// Selection

#[test]
fn stickiness_down_draining_empty() {
    let mut m = model(0);
    add_vip(
        &mut m,
        VIP4.into(),
        80,
        TCP,
        1,
        Forwarding::L2Dsr,
        &[B4A],
        0,
    );
    let flow = flow4(CLIENT4, 1000, VIP4, 80, TCP);
    let f = tcp4(CLIENT4, 1000, VIP4, 80, false, b"");
    // An entry pointing elsewhere (to another backend of this VIP) wins over the ring.
    let e = entry(&mut m, B4C, 1);
    m.conns.insert(flow, e);
    assert_eq!((m.lb(&f).backend, m.lb(&f).new_flow), (Some(B4C), false));
    // DRAINING keeps it.
    m.backends[B4C as usize].state = BACKEND_DRAINING;
    let o = m.lb(&f);
    assert_eq!((o.backend, o.new_flow), (Some(B4C), false));
    assert_frame_eq(&o.frame, &expected_l2dsr(&f, MAC_C));
    // DOWN: moved to the ring's choice, entry overwritten, new flow.
    m.backends[B4C as usize].state = BACKEND_DOWN;
    let o = m.lb(&f);
    assert_eq!((o.backend, o.new_flow), (Some(B4A), true));
    assert_eq!(m.conns[&flow].backend, B4A);
    assert_eq!(m.vip_stats[&1].new_flows, 1);
    assert_eq!(m.be_stats[&B4A].new_flows, 1);
    // EMPTY and out-of-range backends too.
    for b in [0, 99, u32::MAX] {
        m.conns.insert(
            flow,
            ConnVal {
                backend: b,
                vip: 1,
                ..Default::default()
            },
        );
        let o = m.lb(&f);
        assert_eq!((o.backend, o.new_flow), (Some(B4A), true));
    }
    // The ring's choice is final even if DOWN or DRAINING.
    m.conns.clear();
    m.backends[B4A as usize].state = BACKEND_DOWN;
    let o = m.lb(&f);
    assert_eq!(
        (o.reason, o.backend, o.new_flow),
        (Reason::TxForward, Some(B4A), true)
    );
    // ...and then that DOWN backend's entry is reselected every time (still new).
    assert!(m.lb(&f).new_flow);
    m.backends[B4A as usize].state = BACKEND_DRAINING;
    m.conns.clear();
    assert_eq!(m.lb(&f).backend, Some(B4A));
    assert!(!m.lb(&f).new_flow);
    // Ring names an EMPTY slot / a missing backend / ring miss / empty ring.
    m.conns.clear();
    m.backends[B4A as usize].state = BACKEND_EMPTY;
    assert_eq!(reason(&mut m, &f), (Action::Drop, Reason::DropNoBackend));
    let base = m.vips[&vip_key4(VIP4, 80, TCP)].ring_base;
    m.rings.insert(base, 1000);
    assert_eq!(reason(&mut m, &f), (Action::Drop, Reason::DropNoBackend));
    m.rings.remove(&base);
    assert_eq!(reason(&mut m, &f), (Action::Drop, Reason::DropNoBackend));
    m.rings.insert(base, B4B);
    m.vips.get_mut(&vip_key4(VIP4, 80, TCP)).unwrap().ring_size = 0;
    assert_eq!(reason(&mut m, &f), (Action::Drop, Reason::DropNoBackend));
    // Dropped for no backend: VIP counted, no flow recorded.
    assert!(m.conns.is_empty());
    assert_eq!(m.stats[Reason::DropNoBackend as usize], 4);
    // Empty ring, but an established flow to a live backend still works.
    let e = entry(&mut m, B4B, 1);
    m.conns.insert(flow, e);
    assert_eq!(m.lb(&f).backend, Some(B4B));
}

#[test]
fn ring_slot_and_affinity() {
    let ring: Vec<u32> = (0..13).map(|i| [B4A, B4B, B4C][i % 3]).collect();
    for affinity in [false, true] {
        let mut m = model(0);
        let flags = if affinity { VIP_F_AFFINITY } else { 0 };
        add_vip(
            &mut m,
            VIP4.into(),
            80,
            TCP,
            1,
            Forwarding::L2Dsr,
            &ring,
            flags,
        );
        let meta = m.vips[&vip_key4(VIP4, 80, TCP)];
        let mut seen = HashSet::new();
        for port in 1000..1100u16 {
            let flow = flow4(CLIENT4, port, VIP4, 80, TCP);
            let slot = flow_hash(m.config.hash_seed, &flow, affinity) % 13;
            let want = m.rings[&(meta.ring_base + slot)];
            let o = m.lb(&tcp4(CLIENT4, port, VIP4, 80, true, b""));
            assert_eq!(o.backend, Some(want));
            seen.insert(want);
        }
        assert_eq!(seen.len(), if affinity { 1 } else { 3 });
    }
    // Affinity is per client address.
    let mut m = model(0);
    add_vip(
        &mut m,
        VIP6.into(),
        80,
        TCP,
        1,
        Forwarding::L2Dsr,
        &ring,
        VIP_F_AFFINITY,
    );
    let mut seen = HashSet::new();
    for i in 0..64u16 {
        let c = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, i, 7);
        seen.insert(m.lb(&tcp6(c, 1000 + i, VIP6, 80, true, b"")).backend);
    }
    assert!(seen.len() > 1);
}

#[test]
fn unknown_forwarding_mode() {
    let mut m = model(0);
    add_vip(&mut m, VIP4.into(), 80, TCP, 1, Forwarding::Ipip, &[B4A], 0);
    m.vips.get_mut(&vip_key4(VIP4, 80, TCP)).unwrap().forwarding = 9;
    assert_eq!(
        reason(&mut m, &tcp4(CLIENT4, 1, VIP4, 80, true, b"")),
        (Action::Drop, Reason::DropUnsupported)
    );
}

// -----------------------------------------------------------------------------------
// decap

#[test]
fn decap_cases() {
    let pass = (Action::Pass, DecapReason::Pass);
    let bad = (Action::Drop, DecapReason::DropMalformed);
    let dec = |f: &[u8]| {
        let (a, r, out) = decap(f);
        if r != DecapReason::Decapped {
            assert_eq!(out, f);
        }
        (a, r)
    };
    // Not encapsulated.
    assert_eq!(dec(&tcp4(CLIENT4, 1, VIP4, 80, false, b"x")), pass);
    assert_eq!(dec(&udp6(CLIENT6, 1, VIP6, 6081, b"x")), pass);
    assert_eq!(dec(&raw_ether(0x0806, None, &[0; 28])), pass);
    assert_eq!(dec(&[0; 5]), pass);
    // Encapsulated by the model, every variant; then truncated at every length.
    let mut m = model(0);
    let modes = [
        (Forwarding::Ipip, B4A),
        (Forwarding::Ipip, B6A),
        (Forwarding::Gue, B4B),
        (Forwarding::Gue, B6B),
    ];
    for (i, (mode, be)) in modes.iter().enumerate() {
        add_vip(
            &mut m,
            VIP4.into(),
            1000 + i as u16,
            UDP,
            i as u32,
            *mode,
            &[*be],
            0,
        );
        add_vip(
            &mut m,
            VIP6.into(),
            1000 + i as u16,
            UDP,
            10 + i as u32,
            *mode,
            &[*be],
            0,
        );
    }
    for i in 0..4u16 {
        for vlan in [None, Some(3)] {
            for vip in [IpAddr::from(VIP4), IpAddr::from(VIP6)] {
                let o = Opts {
                    vlan,
                    ..Default::default()
                };
                let input = o.udp(client_for(vip), 9, vip, 1000 + i, b"payload");
                let enc = m.lb(&input).frame;
                let l3 = parse_l2(&enc).l3;
                let (a, r, out) = decap(&enc);
                assert_eq!((a, r), (Action::Pass, DecapReason::Decapped));
                assert_frame_eq(&out, &expected_decap(&enc, &input[l3..]));
                let outer_v6 = enc[l3 - 2] == 0x86;
                let gue = enc[l3 + if outer_v6 { 6 } else { 9 }] == 17;
                let outer_hl = if outer_v6 { 40 } else { 20 };
                let inner = l3 + outer_hl + if gue { 8 } else { 0 };
                let inner_hl = if vip.is_ipv4() { 20 } else { 40 };
                for n in 0..enc.len() {
                    let want = if n < l3 + outer_hl || (gue && n < l3 + outer_hl + 8) {
                        pass
                    } else if n < inner + inner_hl {
                        bad
                    } else {
                        (Action::Pass, DecapReason::Decapped)
                    };
                    assert_eq!(dec(&enc[..n]), want, "len {n}");
                }
                if gue {
                    let mut e = enc.clone();
                    e[inner] = 0x55;
                    assert_eq!(dec(&e), bad);
                    let mut e = enc.clone();
                    e[l3 + outer_hl + 3] ^= 1; // other UDP port
                    assert_eq!(dec(&e), pass);
                }
                if !outer_v6 {
                    let mut e = enc.clone();
                    e[l3 + 6] = 0x20; // MF
                    assert_eq!(dec(&e), pass);
                    let mut e = enc.clone();
                    e[l3] = 0x44; // IHL 4
                    assert_eq!(dec(&e), pass);
                }
            }
        }
    }
    // IPIP with IPv4 options on the outer header: removed with the header.
    let inner = ip_packet(&tcp4(CLIENT4, 1, VIP4, 80, false, b"abc"));
    let o = Opts {
        ipv4_options: vec![1, 1, 1, 1],
        ..Default::default()
    };
    let enc = o.ip_raw(BE4A.into(), BE4B.into(), 4, &inner);
    let (_, r, out) = decap(&enc);
    assert_eq!(r, DecapReason::Decapped);
    assert_eq!(&out[14..], &inner[..]);
    // 6-in-4 IPIP.
    let inner6 = ip_packet(&tcp6(CLIENT6, 1, VIP6, 80, false, b"abc"));
    let enc = Opts::default().ip_raw(BE4A.into(), BE4B.into(), 41, &inner6);
    let (_, r, out) = decap(&enc);
    assert_eq!(r, DecapReason::Decapped);
    assert_eq!(&out[12..14], &[0x86, 0xdd]);
    assert_eq!(&out[14..], &inner6[..]);
}

// -----------------------------------------------------------------------------------
// Fuzz-ish

#[test]
fn random_and_mutated_frames_never_panic() {
    let mut rng = StdRng::seed_from_u64(0xfeed);
    let mut m = simple_model();
    add_vip(
        &mut m,
        VIP4.into(),
        443,
        UDP,
        5,
        Forwarding::Gue,
        &[B6A, B4A, 0, B4C],
        VIP_F_AFFINITY,
    );
    add_vip(
        &mut m,
        VIP6.into(),
        443,
        TCP,
        6,
        Forwarding::Ipip,
        &[B4A, B6B],
        0,
    );
    // A stateless VIP whose slots carry secondaries (or not).
    add_vip(
        &mut m,
        VIP4.into(),
        90,
        TCP,
        8,
        Forwarding::Gue,
        &[
            slot_word(B4A, B4C),
            slot_word(B6A, B6B),
            slot_word(B4B, B4B),
            slot_word(B4C, B6A),
        ],
        VIP_F_STATELESS,
    );
    let q4 = ip_packet(&tcp4(VIP4, 80, CLIENT4, 5555, false, &[1; 40]));
    let q6 = ip_packet(&udp6(VIP6, 53, CLIENT6, 5555, &[1; 40]));
    let seeds: Vec<Vec<u8>> = vec![
        tcp4(CLIENT4, 1, VIP4, 90, false, &[7; 60]),
        tcp4(CLIENT4, 1, VIP4, 80, true, &[7; 60]),
        udp4(CLIENT4, 1, VIP4, 53, &[7; 60]),
        udp4(CLIENT4, 1, VIP4, 443, &[7; 60]),
        Opts::default()
            .with_vlan(5)
            .with_df(true)
            .tcp4(CLIENT4, 1, VIP4, 80, &[7; 300]),
        tcp6(CLIENT6, 1, VIP6, 80, true, &[7; 60]),
        tcp6(CLIENT6, 1, VIP6, 443, true, &[7; 60]),
        Opts::default()
            .with_vlan(5)
            .udp6(CLIENT6, 1, VIP6, 53, &[7; 300]),
        icmp4_dest_unreach(ROUTER4, VIP4, 1000, &q4),
        icmp6_packet_too_big(ROUTER6, VIP6, 1280, &q6),
        Opts {
            ipv4_options: vec![1; 12],
            ..Default::default()
        }
        .udp4(CLIENT4, 1, VIP4, 53, b"opt"),
    ];
    let mut count = 0u64;
    let mut txs = 0;
    for i in 0..100_000 {
        m.config.mtu = [0, 1500, 200, 100, 1280][i % 5];
        let mut f = if i % 10 == 0 {
            let n = rng.gen_range(0..200);
            (0..n).map(|_| rng.gen()).collect::<Vec<u8>>()
        } else {
            let mut f = seeds[rng.gen_range(0..seeds.len())].clone();
            for _ in 0..rng.gen_range(0..4) {
                let at = rng.gen_range(0..f.len());
                // Mostly header bytes.
                let at = if rng.gen_bool(0.8) {
                    at % 80.min(f.len())
                } else {
                    at
                };
                f[at] = rng.gen();
            }
            if rng.gen_bool(0.3) {
                let n = rng.gen_range(0..=f.len());
                f.truncate(n);
            }
            f
        };
        if rng.gen_bool(0.05) {
            f.extend_from_slice(&[0; 5]);
        }
        // Client ports vary so that flows are created.
        let o = m.lb(&f);
        count += 1;
        check_invariants(&m, &f, &o);
        // decap with any answer of the socket lookup and the FIB.
        let is_local = rng.gen_bool(0.5);
        let fib = [
            None,
            Some(FibRoute {
                dmac: [1; 6],
                smac: [2; 6],
                same_interface: rng.gen(),
            }),
        ][rng.gen_range(0..2)];
        if o.action == Action::Tx {
            txs += 1;
            let _ = decap_with(&o.frame, |_| is_local, fib);
        }
        let (a, r, out) = decap_with(&f, |_| is_local, fib);
        if matches!(r, DecapReason::Pass | DecapReason::DropMalformed) {
            assert_eq!(out, f);
            assert_eq!(a == Action::Drop, r == DecapReason::DropMalformed);
        }
        if matches!(r, DecapReason::Redirected | DecapReason::RedirectedStack) {
            assert_eq!(out.len(), f.len());
        }
    }
    assert_eq!(m.stats.iter().sum::<u64>(), count);
    assert!(txs > 1000, "only {txs} forwarded");
    let vip_pkts: u64 = m.vip_stats.values().map(|c| c.packets).sum();
    let be_pkts: u64 = m.be_stats.values().map(|c| c.packets).sum();
    let fwd = m.stats[Reason::TxForward as usize] + m.stats[Reason::TxIcmpForward as usize];
    assert_eq!(be_pkts, fwd);
    assert!(vip_pkts >= fwd);
}

// -----------------------------------------------------------------------------------
// Stateless VIPs (second chance): `lb`

/// Id of the stateless VIP of these tests.
const SVIP: u32 = 9;

/// A model with one stateless GUE VIP (id [`SVIP`]) at `vip`:80/`proto` whose ring holds
/// `words`; every backend a word names (primary or secondary) is made a member of it.
fn stateless_model(vip: IpAddr, proto: u8, words: &[u32]) -> Model {
    let mut m = model(0);
    add_vip(
        &mut m,
        vip,
        80,
        proto,
        SVIP,
        Forwarding::Gue,
        words,
        VIP_F_STATELESS,
    );
    for w in words {
        for b in [w & 0xffff, w >> 16] {
            if let Some(be) = m.backends.get_mut(b as usize) {
                be.vip = SVIP;
            }
        }
    }
    m
}

/// The GUE variant 0 frame of a stateless VIP, from the spec: [`expected_gue`] (variant 1)
/// with the 12 (IPv4 outer) / 24 (IPv6 outer) bytes of GUE header inserted after UDP and
/// every length grown by as much: hlen 2 / 5, inner protocol 4 / 41, 0, 0, "LB", flags
/// (1 with a secondary), 0, the secondary's address (zeros without).
fn expected_gue0(
    input: &[u8],
    mac: [u8; 6],
    outer: Outer,
    entropy: u32,
    second: Option<IpAddr>,
) -> Vec<u8> {
    let base = expected_gue(input, mac, outer, entropy);
    let inner_v4 = parse_l2(input).ether_type == etherparse::EtherType::IPV4;
    let outer6 = matches!(outer, Outer::V6 { .. });
    let mut g = vec![
        if outer6 { 5 } else { 2 },
        if inner_v4 { 4 } else { 41 },
        0,
        0,
    ];
    g.extend_from_slice(b"LB");
    g.extend_from_slice(&[second.is_some() as u8, 0]);
    match second {
        Some(IpAddr::V4(a)) => {
            assert!(!outer6);
            g.extend_from_slice(&a.octets());
        }
        Some(IpAddr::V6(a)) => {
            assert!(outer6);
            g.extend_from_slice(&a.octets());
        }
        None => g.resize(g.len() + if outer6 { 16 } else { 4 }, 0),
    }
    let l3 = parse_l2(&base).l3;
    let udp = l3 + if outer6 { 40 } else { 20 };
    let mut out = base[..udp + 8].to_vec();
    out.extend_from_slice(&g);
    out.extend_from_slice(&base[udp + 8..]);
    let grow = |b: &mut [u8], at: usize| {
        let v = u16::from_be_bytes([b[at], b[at + 1]]) + g.len() as u16;
        b[at..at + 2].copy_from_slice(&v.to_be_bytes());
    };
    grow(&mut out, udp + 4);
    if outer6 {
        grow(&mut out, l3 + 4);
    } else {
        grow(&mut out, l3 + 2);
        let mut h = Ipv4HeaderSlice::from_slice(&out[l3..l3 + 20])
            .unwrap()
            .to_header();
        h.header_checksum = h.calc_header_checksum();
        out[l3..l3 + 20].copy_from_slice(&h.to_bytes());
    }
    out
}

fn be_addr(m: &Model, b: u32) -> IpAddr {
    let be = &m.backends[b as usize];
    ip_from_raw(be.addr, be.family)
}

fn ip_from_raw(w: [u32; 4], family: u8) -> IpAddr {
    if family == FAMILY_V6 {
        let mut b = [0u8; 16];
        for i in 0..4 {
            b[4 * i..4 * i + 4].copy_from_slice(&w[i].to_ne_bytes());
        }
        Ipv6Addr::from(b).into()
    } else {
        Ipv4Addr::from(w[0].to_ne_bytes()).into()
    }
}

#[test]
fn stateless_vip_sends_gue_variant_0_carrying_the_slot_s_secondary() {
    // (VIP, primary, secondary): 4-in-4, 6-in-6, 4-in-6, 6-in-4; with and without VLAN.
    let cases = [
        (IpAddr::from(VIP4), B4A, B4C),
        (IpAddr::from(VIP6), B6A, B6B),
        (IpAddr::from(VIP4), B6B, B6A),
        (IpAddr::from(VIP6), B4B, B4A),
    ];
    for (vip, primary, second) in cases {
        for opts in [Opts::default(), Opts::default().with_vlan(9).with_tos(0x88)] {
            let mut m = stateless_model(vip, TCP, &[slot_word(primary, second)]);
            let client = client_for(vip);
            let input = opts.tcp(client, 40000, vip, 80, b"stateless");
            let flow = flow_key(client, 40000, vip, 80, TCP);
            let e = flow_entropy(&flow);
            let o = m.lb(&input);
            assert_eq!((o.action, o.reason), (Action::Tx, Reason::TxForward));
            assert_eq!((o.backend, o.second), (Some(primary), Some(second)));
            let mac = if m.backends[primary as usize].mac == [0; 6] {
                GW_MAC
            } else {
                MAC_A
            };
            let outer = outer_for(&m.config, e, be_addr(&m, primary));
            let want = expected_gue0(&input, mac, outer, e, Some(be_addr(&m, second)));
            assert_frame_eq(&o.frame, &want);
            verify_checksums(&o.frame);
            // The backend with the connection decapsulates it back to the client's packet.
            let l3 = parse_l2(&input).l3;
            let (a, r, d) = decap_with(&o.frame, |_| true, None);
            assert_eq!((a, r), (Action::Pass, DecapReason::Decapped));
            assert_frame_eq(&d, &expected_decap(&o.frame, &input[l3..]));
        }
    }
}

#[test]
fn stateless_vip_never_reads_creates_or_refreshes_a_connection_entry() {
    let mut m = stateless_model(VIP4.into(), TCP, &[slot_word(B4A, B4C)]);
    let flow = flow4(CLIENT4, 1000, VIP4, 80, TCP);
    // An entry that would hold (a live member of this VIP) is not read: the ring decides.
    let e = entry(&mut m, B4C, SVIP);
    m.conns.insert(flow, e);
    let ack = Opts::default()
        .with_fin(true)
        .tcp4(CLIENT4, 1000, VIP4, 80, b"");
    let o = m.lb(&ack);
    assert_eq!((o.backend, o.new_flow), (Some(B4A), false));
    // ... nor refreshed (FIN would mark it closing), nor removed by a SYN.
    assert_eq!(m.conns[&flow], e);
    let o = m.lb(&tcp4(CLIENT4, 1000, VIP4, 80, true, b""));
    assert_eq!((o.backend, o.new_flow), (Some(B4A), true));
    assert_eq!(m.conns.len(), 1);
    assert_eq!(m.conns[&flow], e);
    // No entry is made for other flows either, SYN or not.
    for port in 2000..2010 {
        m.lb(&tcp4(CLIENT4, port, VIP4, 80, port % 2 == 0, b""));
    }
    assert_eq!(m.conns.len(), 1);
    // new_flows counts SYNs: one above, five in the loop; VIP and backend alike.
    assert_eq!(m.vip_stats[&SVIP].new_flows, 6);
    assert_eq!(m.be_stats[&B4A].new_flows, 6);
    assert_eq!(m.vip_stats[&SVIP].packets, 12);
    // UDP is never new.
    let mut u = stateless_model(VIP4.into(), UDP, &[slot_word(B4A, B4C)]);
    let o = u.lb(&udp4(CLIENT4, 1, VIP4, 80, b"u"));
    assert_eq!(
        (o.backend, o.second, o.new_flow),
        (Some(B4A), Some(B4C), false)
    );
    assert!(u.conns.is_empty());
    assert_eq!(u.vip_stats[&SVIP].new_flows, 0);
}

#[test]
fn stateless_syn_with_ack_is_not_a_new_flow() {
    let mut m = stateless_model(VIP4.into(), TCP, &[slot_word(B4A, B4C)]);
    // SYN+ACK: build a SYN and set ACK in the TCP flags byte (checksum irrelevant here).
    let mut f = tcp4(CLIENT4, 1, VIP4, 80, true, b"");
    f[14 + 20 + 13] |= 0x10;
    let o = m.lb(&f);
    assert_eq!((o.reason, o.new_flow), (Reason::TxForward, false));
    assert!(m.vip_stats[&SVIP].new_flows == 0 && m.conns.is_empty());
}

#[test]
fn stateless_secondary_is_carried_only_when_it_holds_in_the_vip_and_the_family() {
    let input = tcp4(CLIENT4, 1000, VIP4, 80, false, b"");
    let l3 = 14;
    // GUE header after the outer IPv4 (20) and UDP (8): flags at +6, address at +8.
    let g = l3 + 28;
    let run = |m: &mut Model| {
        let o = m.lb(&input);
        assert_eq!(o.reason, Reason::TxForward);
        assert_eq!(o.backend, Some(B4A));
        let flags = o.frame[g + 6];
        let addr: [u8; 4] = o.frame[g + 8..g + 12].try_into().unwrap();
        assert_eq!(flags, o.second.is_some() as u8);
        if o.second.is_none() {
            assert_eq!(addr, [0; 4]);
        }
        (o.second, addr)
    };
    let carried = (Some(B4C), Ipv4Addr::new(198, 19, 10, 3).octets());
    // A live member of the VIP, up or draining: carried.
    let mut m = stateless_model(VIP4.into(), TCP, &[slot_word(B4A, B4C)]);
    assert_eq!(run(&mut m), carried);
    m.backends[B4C as usize].state = BACKEND_DRAINING;
    assert_eq!(run(&mut m), carried);
    // Down, retired, empty: not.
    for state in [BACKEND_DOWN, lb_common::BACKEND_RETIRED, BACKEND_EMPTY] {
        m.backends[B4C as usize].state = state;
        assert_eq!(run(&mut m), (None, [0; 4]), "state {state}");
    }
    // Up but a member of another VIP: not.
    m.backends[B4C as usize].state = BACKEND_UP;
    m.backends[B4C as usize].vip = SVIP + 1;
    assert_eq!(run(&mut m), (None, [0; 4]));
    // Equal to the primary (no secondary), of the other family, missing, id 0 (EMPTY).
    for s in [B4A, B6A, 999, 0xffff, 0] {
        let mut m = stateless_model(VIP4.into(), TCP, &[slot_word(B4A, s)]);
        assert_eq!(run(&mut m), (None, [0; 4]), "secondary {s}");
    }
    // The primary's state does not matter (the ring's choice is final) unless EMPTY.
    let mut m = stateless_model(VIP4.into(), TCP, &[slot_word(B4A, B4C)]);
    m.backends[B4A as usize].state = BACKEND_DOWN;
    assert_eq!(run(&mut m), carried);
    m.backends[B4A as usize].state = BACKEND_EMPTY;
    assert_eq!(m.lb(&input).reason, Reason::DropNoBackend);
    // A primary id beyond the table, an empty ring: no backend.
    let mut m = stateless_model(VIP4.into(), TCP, &[slot_word(777, B4C)]);
    assert_eq!(m.lb(&input).reason, Reason::DropNoBackend);
    m.vips.get_mut(&vip_key4(VIP4, 80, TCP)).unwrap().ring_size = 0;
    assert_eq!(m.lb(&input).reason, Reason::DropNoBackend);
    assert_eq!(m.vip_stats[&SVIP].packets, 2);
}

#[test]
fn stateless_slot_is_the_flow_hash_slot_of_the_word_ring() {
    // 13 slots of distinct words: the chosen primary and secondary both come from the
    // flow's slot.
    let pairs = [(B4A, B4C), (B4B, B4A), (B4C, B4B)];
    let words: Vec<u32> = (0..13)
        .map(|i| slot_word(pairs[i % 3].0, pairs[i % 3].1))
        .collect();
    let mut m = stateless_model(VIP4.into(), TCP, &words);
    let meta = m.vips[&vip_key4(VIP4, 80, TCP)];
    for port in 1000..1100u16 {
        let flow = flow4(CLIENT4, port, VIP4, 80, TCP);
        let slot = flow_hash(m.config.hash_seed, &flow, false) % 13;
        let (p, s) = pairs[slot as usize % 3];
        assert_eq!(words[slot as usize], m.rings[&(meta.ring_base + slot)]);
        let o = m.lb(&tcp4(CLIENT4, port, VIP4, 80, false, b""));
        assert_eq!((o.backend, o.second), (Some(p), Some(s)), "port {port}");
    }
}

#[test]
fn conntrack_vip_uses_only_the_primary_of_a_slot_word() {
    let mut m = model(0);
    add_vip(&mut m, VIP4.into(), 80, TCP, 1, Forwarding::Gue, &[0], 0);
    let base = m.vips[&vip_key4(VIP4, 80, TCP)].ring_base;
    m.rings.insert(base, slot_word(B4A, B4C));
    m.backends[B4A as usize].vip = 1;
    m.backends[B4C as usize].vip = 1;
    let input = tcp4(CLIENT4, 1000, VIP4, 80, false, b"x");
    let flow = flow4(CLIENT4, 1000, VIP4, 80, TCP);
    let e = flow_entropy(&flow);
    let o = m.lb(&input);
    assert_eq!((o.backend, o.second, o.new_flow), (Some(B4A), None, true));
    assert_eq!(m.conns[&flow].backend, B4A);
    // GUE variant 1: no GUE header at all.
    assert_frame_eq(
        &o.frame,
        &expected_gue(&input, MAC_A, outer4(&m.config, e, BE4A), e),
    );
}

#[test]
fn stateless_mtu_check_counts_the_gue_header() {
    let mtu = 1500;
    // Outer IPv4: 20 + 8 + 12 = 40 bytes; outer IPv6: 40 + 8 + 24 = 72.
    for (primary, overhead) in [(B4A, 40usize), (B6A, 72)] {
        let mut m = stateless_model(VIP4.into(), TCP, &[slot_word(primary, primary)]);
        m.config.mtu = mtu;
        let fits = mtu as usize - overhead - 40; // inner IPv4 + TCP headers: 40
        let o = Opts::default()
            .with_df(true)
            .tcp4(CLIENT4, 1, VIP4, 80, &vec![7; fits]);
        let out = m.lb(&o);
        assert_eq!(out.reason, Reason::TxForward, "overhead {overhead}");
        assert_eq!(out.frame.len(), o.len() + overhead);
        let big = Opts::default()
            .with_df(true)
            .tcp4(CLIENT4, 1, VIP4, 80, &vec![7; fits + 1]);
        let out = m.lb(&big);
        assert_eq!(out.reason, Reason::TxIcmpTooBig);
        assert_frame_eq(
            &out.frame,
            &expected_icmp_too_big4(&big, (mtu as usize - overhead) as u16),
        );
        let nodf = tcp4(CLIENT4, 1, VIP4, 80, false, &vec![7; fits + 1]);
        assert_eq!(m.lb(&nodf).reason, Reason::DropTooBig);
    }
    // IPv6 inner, IPv6 outer: too big says mtu - 72.
    let mut m = stateless_model(VIP6.into(), TCP, &[slot_word(B6A, B6B)]);
    m.config.mtu = mtu;
    let fits = mtu as usize - 72 - 60;
    let ok = tcp6(CLIENT6, 1, VIP6, 80, false, &vec![1; fits]);
    assert_eq!(m.lb(&ok).reason, Reason::TxForward);
    let big = tcp6(CLIENT6, 1, VIP6, 80, false, &vec![1; fits + 1]);
    let out = m.lb(&big);
    assert_eq!(out.reason, Reason::TxIcmpTooBig);
    assert_frame_eq(&out.frame, &expected_icmp_too_big6(&big, mtu - 72));
}

#[test]
fn stateless_icmp_error_goes_to_the_ring_primary_with_its_secondary() {
    let mut m = stateless_model(VIP4.into(), TCP, &[slot_word(B4A, B4C)]);
    let q = ip_packet(&tcp4(VIP4, 80, CLIENT4, 5555, false, &[1; 40]));
    let f = icmp4_dest_unreach(ROUTER4, VIP4, 1400, &q);
    let o = m.lb(&f);
    assert_eq!(
        (o.reason, o.backend, o.second, o.new_flow),
        (Reason::TxIcmpForward, Some(B4A), Some(B4C), false)
    );
    assert!(m.conns.is_empty());
    assert_eq!(m.vip_stats[&SVIP].new_flows, 0);
    // The ICMP packet itself is the inner packet of the GUE variant 0 frame.
    assert_eq!(
        &o.frame[14 + 28..14 + 28 + 8],
        &[2, 4, 0, 0, b'L', b'B', 1, 0]
    );
    assert_eq!(&o.frame[14 + 40..], &f[14..]);
    // IPv6.
    let mut m = stateless_model(VIP6.into(), UDP, &[slot_word(B6A, B6B)]);
    let q = ip_packet(&udp6(VIP6, 80, CLIENT6, 5555, &[1; 40]));
    let o = m.lb(&icmp6_packet_too_big(ROUTER6, VIP6, 1280, &q));
    assert_eq!(
        (o.reason, o.backend, o.second),
        (Reason::TxIcmpForward, Some(B6A), Some(B6B))
    );
    assert_eq!(&o.frame[14 + 48..14 + 56], &[5, 41, 0, 0, b'L', b'B', 1, 0]);
    assert_eq!(&o.frame[14 + 56..14 + 72], &BE6B.octets());
}

// -----------------------------------------------------------------------------------
// decap: GUE variant 0 and the second chance

/// An outer IPv4 (`BE4B` -> `BE4A`) / IPv6 (`BE6B` -> `BE6A`) UDP datagram to 6080 holding
/// `gue` then `inner` (an IP packet), UDP checksum 0. `opts` for VLAN / IPv4 options.
fn gue_frame(opts: &Opts, outer6: bool, gue: &[u8], inner: &[u8]) -> Vec<u8> {
    let mut udp = vec![0x12, 0x34, (GUE_PORT >> 8) as u8, GUE_PORT as u8];
    udp.extend_from_slice(&((8 + gue.len() + inner.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(gue);
    udp.extend_from_slice(inner);
    if outer6 {
        opts.ip_raw(BE6B.into(), BE6A.into(), UDP, &udp)
    } else {
        opts.ip_raw(BE4B.into(), BE4A.into(), UDP, &udp)
    }
}

/// Our GUE variant 0 header for an outer family: hlen, inner protocol, 0, 0, "LB", `flags`,
/// 0, `second` (4 / 16 bytes).
fn gue0(outer6: bool, inner_v4: bool, flags: u8, second: &[u8]) -> Vec<u8> {
    let mut g = vec![
        if outer6 { 5 } else { 2 },
        if inner_v4 { 4 } else { 41 },
        0,
        0,
    ];
    g.extend_from_slice(&[b'L', b'B', flags, 0]);
    g.extend_from_slice(second);
    g
}

const SECOND4: Ipv4Addr = Ipv4Addr::new(198, 19, 10, 77);
const SECOND6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x77);

fn second_of(outer6: bool) -> Vec<u8> {
    if outer6 {
        SECOND6.octets().to_vec()
    } else {
        SECOND4.octets().to_vec()
    }
}

fn never_asked(_: &FlowKey) -> bool {
    panic!("the socket lookup must not be asked")
}

#[test]
fn decap_parses_gue_variant_0() {
    let bad = (Action::Drop, DecapReason::DropMalformed);
    let inner4 = ip_packet(&tcp4(CLIENT4, 1, VIP4, 80, false, b"abc"));
    let inner6 = ip_packet(&tcp6(CLIENT6, 1, VIP6, 80, false, b"abc"));
    let o = Opts::default();
    for outer6 in [false, true] {
        for (inner, v4) in [(&inner4, true), (&inner6, false)] {
            let p = if v4 { 4 } else { 41 };
            // Any hlen: the inner packet follows 4 + 4*hlen bytes of GUE header. Only our
            // own hlen with "LB" is private data; the rest is plain decapsulation.
            for hlen in [0u8, 1, 2, 3, 5, 31] {
                let mut g = vec![hlen, p, 0, 0];
                g.extend((0..4 * hlen as usize).map(|i| 0xa0 ^ i as u8));
                let f = gue_frame(&o, outer6, &g, inner);
                let (a, r, out) = decap_with(&f, never_asked, None);
                assert_eq!((a, r), (Action::Pass, DecapReason::Decapped), "hlen {hlen}");
                assert_frame_eq(&out, &expected_decap(&f, inner));
            }
            // Flags byte and reserved bytes (2-3) are not checked.
            let f = gue_frame(&o, outer6, &[0, p, 0xff, 0xff], inner);
            assert_eq!(decap(&f).1, DecapReason::Decapped);
            // C set, another protocol, variants 2 and 3: malformed.
            for g in [
                [0x20, p, 0, 0],
                [0, 17, 0, 0],
                [0, 6, 0, 0],
                [0x80, p, 0, 0],
            ] {
                let f = gue_frame(&o, outer6, &g, inner);
                assert_eq!(decap_with(&f, never_asked, None), (bad.0, bad.1, f.clone()));
            }
            let f = gue_frame(&o, outer6, &[0xc0 | p, 0, 0, 0], inner);
            assert_eq!(decap(&f).1, DecapReason::DropMalformed);
            // The protocol byte names the inner family, whatever the inner packet says.
            let other = if v4 { &inner6 } else { &inner4 };
            let f = gue_frame(&o, outer6, &[0, p, 0, 0], other);
            let (_, r, out) = decap(&f);
            assert_eq!(r, DecapReason::Decapped);
            assert_eq!(&out[12..14], if v4 { &[8, 0] } else { &[0x86, 0xdd] });
            // Our private data but with the other family's hlen, or not "LB": not ours.
            let sec = second_of(!outer6);
            let g = gue0(!outer6, v4, GUE_F_SECOND, &sec);
            let f = gue_frame(&o, outer6, &g, inner);
            assert_eq!(decap_with(&f, never_asked, None).1, DecapReason::Decapped);
            let mut g = gue0(outer6, v4, GUE_F_SECOND, &second_of(outer6));
            g[5] = b'C';
            let f = gue_frame(&o, outer6, &g, inner);
            assert_eq!(decap_with(&f, never_asked, None).1, DecapReason::Decapped);
        }
    }
    // Truncated anywhere: before UDP's end not ours; then malformed until the inner header
    // is whole; from there the second chance (not local, no route) sends it on.
    for outer6 in [false, true] {
        let g = gue0(outer6, true, GUE_F_SECOND, &second_of(outer6));
        let f = gue_frame(&o, outer6, &g, &inner4);
        let udp = 14 + if outer6 { 40 } else { 20 };
        let inner = udp + 8 + g.len();
        for n in 0..f.len() {
            let (a, r, out) = decap(&f[..n]);
            let want = if n < udp + 8 {
                (Action::Pass, DecapReason::Pass)
            } else if n < inner + 20 {
                bad
            } else if n < inner + 40 {
                // TCP header cut: not a segment the socket lookup can judge: this host's.
                (Action::Pass, DecapReason::Decapped)
            } else {
                (Action::Pass, DecapReason::RedirectedStack)
            };
            assert_eq!((a, r), want, "outer6 {outer6} len {n}");
            if r != DecapReason::Decapped && r != DecapReason::RedirectedStack {
                assert_eq!(out, &f[..n]);
            }
        }
    }
}

/// The stateless frame `lb` sends for an ACK from `CLIENT4:1000` to the stateless VIP,
/// primary `primary`, secondary `second`, plus the input.
fn stateless_frame(vip: IpAddr, primary: u32, second: u32, opts: &Opts) -> (Vec<u8>, Vec<u8>) {
    let mut m = stateless_model(vip, TCP, &[slot_word(primary, second)]);
    let input = opts.tcp(client_for(vip), 1000, vip, 80, b"data");
    let o = m.lb(&input);
    assert_eq!(o.reason, Reason::TxForward);
    (input, o.frame)
}

#[test]
fn decap_second_chance_sends_a_segment_of_no_local_connection_to_the_secondary() {
    let vlan = Opts::default().with_vlan(12);
    for (vip, primary, second) in [
        (IpAddr::from(VIP4), B4A, B4C),
        (IpAddr::from(VIP6), B6A, B6B),
        (IpAddr::from(VIP4), B6A, B6B),
        (IpAddr::from(VIP6), B4A, B4C),
    ] {
        for opts in [Opts::default(), vlan.clone()] {
            let (input, mut enc) = stateless_frame(vip, primary, second, &opts);
            let l3 = parse_l2(&enc).l3;
            let outer6 = enc[l3] >> 4 == 6;
            let udp = l3 + if outer6 { 40 } else { 20 };
            let pd = udp + 12;
            // As it arrives through routers, from a sender that filled in a UDP checksum.
            enc[udp + 6..udp + 8].copy_from_slice(&[0xbe, 0xef]);
            if outer6 {
                enc[l3 + 7] = 61;
            } else {
                let mut h = Ipv4HeaderSlice::from_slice(&enc[l3..l3 + 20])
                    .unwrap()
                    .to_header();
                h.time_to_live = 61;
                h.header_checksum = h.calc_header_checksum();
                enc[l3..l3 + 20].copy_from_slice(&h.to_bytes());
            }
            let flow = flow_key(client_for(vip), 1000, vip, 80, TCP);
            // Not this host's, no route: rewritten and passed to the stack.
            let asked = std::cell::Cell::new(0);
            let (a, r, out) = decap_with(
                &enc,
                |k| {
                    assert_eq!(*k, flow, "the socket lookup sees the inner 5-tuple");
                    asked.set(asked.get() + 1);
                    false
                },
                None,
            );
            assert_eq!(asked.get(), 1);
            assert_eq!((a, r), (Action::Pass, DecapReason::RedirectedStack));
            // Spec, byte by byte: flags |= 2, destination := secondary, TTL 64 (IPv4:
            // header checksum recomputed, UDP checksum 0); the rest as it was.
            let mut want = enc.clone();
            want[pd + 2] |= GUE_F_REDIRECTED;
            let sec = match be_addr(&stateless_model(vip, TCP, &[]), second) {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            };
            if outer6 {
                want[l3 + 24..l3 + 40].copy_from_slice(&sec);
                want[l3 + 7] = 64;
            } else {
                let mut h = Ipv4HeaderSlice::from_slice(&enc[l3..l3 + 20])
                    .unwrap()
                    .to_header();
                h.destination.copy_from_slice(&sec);
                h.time_to_live = 64;
                h.header_checksum = h.calc_header_checksum();
                want[l3..l3 + 20].copy_from_slice(&h.to_bytes());
                want[udp + 6..udp + 8].copy_from_slice(&[0, 0]);
            }
            assert_frame_eq(&out, &want);
            assert_eq!(&out[pd + 4..pd + 4 + sec.len()], &sec[..]);
            verify_checksums(&out);
            // With a route: Ethernet from the FIB; TX out the same interface, else redirect.
            // A tagged frame goes through the stack whatever the FIB says.
            for (same, action) in [(true, Action::Tx), (false, Action::Redirect)] {
                let fib = FibRoute {
                    dmac: [0x0a; 6],
                    smac: [0x0b; 6],
                    same_interface: same,
                };
                let (a, r, out) = decap_with(&enc, |_| false, Some(fib));
                if l3 == 18 {
                    assert_eq!((a, r), (Action::Pass, DecapReason::RedirectedStack));
                    assert_frame_eq(&out, &want);
                    continue;
                }
                assert_eq!((a, r), (action, DecapReason::Redirected));
                let mut w = want.clone();
                w[0..6].copy_from_slice(&[0x0a; 6]);
                w[6..12].copy_from_slice(&[0x0b; 6]);
                assert_frame_eq(&out, &w);
            }
            // This host's connection: decapsulated, whatever the FIB says.
            let (a, r, out) = decap_with(
                &enc,
                |_| true,
                Some(FibRoute {
                    dmac: [1; 6],
                    smac: [2; 6],
                    same_interface: true,
                }),
            );
            assert_eq!((a, r), (Action::Pass, DecapReason::Decapped));
            assert_frame_eq(&out, &expected_decap(&enc, &input[opts_l3(&opts)..]));
            // At the secondary (redirected once): never again; decapsulated as no second
            // chance when it is not that host's either.
            let (a, r, again) = decap_with(&out_redirected(&enc), |_| false, None);
            assert_eq!((a, r), (Action::Pass, DecapReason::NoSecondChance));
            assert_frame_eq(&again, &expected_decap(&enc, &input[opts_l3(&opts)..]));
            let (_, r, _) = decap_with(&out_redirected(&enc), |_| true, None);
            assert_eq!(r, DecapReason::Decapped);
        }
    }
}

fn opts_l3(o: &Opts) -> usize {
    if o.vlan.is_some() {
        18
    } else {
        14
    }
}

/// `enc` as the model's decap redirects it (no route).
fn out_redirected(enc: &[u8]) -> Vec<u8> {
    let (_, r, out) = decap(enc);
    assert_eq!(r, DecapReason::RedirectedStack);
    out
}

#[test]
fn decap_second_chance_keeps_syns_non_tcp_and_cut_segments_and_rsts_follow_the_rule() {
    let o = Opts::default();
    for outer6 in [false, true] {
        let sec = second_of(outer6);
        let g = gue0(outer6, true, GUE_F_SECOND, &sec);
        let g6 = gue0(outer6, false, GUE_F_SECOND, &sec);
        let decapped = |f: &[u8]| {
            let (a, r, _) = decap_with(f, never_asked, None);
            (a, r)
        };
        let dec = (Action::Pass, DecapReason::Decapped);
        // A SYN starts where the ring sent it: no lookup.
        let syn = ip_packet(&tcp4(CLIENT4, 1, VIP4, 80, true, b""));
        assert_eq!(decapped(&gue_frame(&o, outer6, &g, &syn)), dec);
        let syn6 = ip_packet(&tcp6(CLIENT6, 1, VIP6, 80, true, b""));
        assert_eq!(decapped(&gue_frame(&o, outer6, &g6, &syn6)), dec);
        // UDP, ICMP: this host's.
        let u = ip_packet(&udp4(CLIENT4, 1, VIP4, 80, b"u"));
        assert_eq!(decapped(&gue_frame(&o, outer6, &g, &u)), dec);
        let u6 = ip_packet(&udp6(CLIENT6, 1, VIP6, 80, b"u"));
        assert_eq!(decapped(&gue_frame(&o, outer6, &g6, &u6)), dec);
        // An inner IPv4 fragment or IHL < 5; an IPv6 extension header before TCP.
        let ack = ip_packet(&tcp4(CLIENT4, 1, VIP4, 80, false, b"x"));
        let mut frag = ack.clone();
        frag[6] = 0x20;
        assert_eq!(decapped(&gue_frame(&o, outer6, &g, &frag)), dec);
        let mut ihl4 = ack.clone();
        ihl4[0] = 0x44;
        assert_eq!(decapped(&gue_frame(&o, outer6, &g, &ihl4)), dec);
        let ext = ip_packet(
            &Opts {
                ipv6_fragment: true,
                ..Default::default()
            }
            .tcp6(CLIENT6, 1, VIP6, 80, b"x"),
        );
        assert_eq!(decapped(&gue_frame(&o, outer6, &g6, &ext)), dec);
        // The TCP header not whole in the frame.
        let f = gue_frame(&o, outer6, &g, &ack);
        assert_eq!(decapped(&f[..f.len() - 2 - 1]), dec);
        // Inner IPv4 options: the TCP header is found after them.
        let opt = ip_packet(
            &Opts {
                ipv4_options: vec![1; 8],
                ..Default::default()
            }
            .tcp4(CLIENT4, 7, VIP4, 80, b"x"),
        );
        let want = flow4(CLIENT4, 7, VIP4, 80, TCP);
        let f = gue_frame(&o, outer6, &g, &opt);
        let (_, r, _) = decap_with(&f, |k| *k == want, None);
        assert_eq!(r, DecapReason::Decapped);
        assert_eq!(decap(&f).1, DecapReason::RedirectedStack);
        // RST, FIN, SYN+ACK: no exception.
        for flags in [0x04u8, 0x14, 0x11, 0x12] {
            let mut seg = ack.clone();
            seg[20 + 13] = flags;
            let f = gue_frame(&o, outer6, &g, &seg);
            assert_eq!(
                decap(&f).1,
                DecapReason::RedirectedStack,
                "flags {flags:#x}"
            );
        }
        // No secondary, or redirected already: decapsulated, "no second chance".
        for flags in [0, GUE_F_REDIRECTED, GUE_F_SECOND | GUE_F_REDIRECTED, 0xfe] {
            let g = gue0(outer6, true, flags, &sec);
            let f = gue_frame(&o, outer6, &g, &ack);
            let (a, r, out) = decap(&f);
            assert_eq!((a, r), (Action::Pass, DecapReason::NoSecondChance));
            assert_frame_eq(&out, &expected_decap(&f, &ack));
        }
        // Other flag bits ride along.
        let g = gue0(outer6, true, GUE_F_SECOND | 0x80, &sec);
        let (_, r, out) = decap(&gue_frame(&o, outer6, &g, &ack));
        assert_eq!(r, DecapReason::RedirectedStack);
        let pd = 14 + if outer6 { 40 } else { 20 } + 12;
        assert_eq!(out[pd + 2], 0x83);
    }
    // An outer IPv4 header with options cannot be redirected (only 20-byte headers are):
    // malformed, untouched; yet a packet of a local connection is decapsulated.
    let o = Opts {
        ipv4_options: vec![1; 4],
        ..Default::default()
    };
    let ack = ip_packet(&tcp4(CLIENT4, 1, VIP4, 80, false, b"x"));
    let f = gue_frame(
        &o,
        false,
        &gue0(false, true, GUE_F_SECOND, &SECOND4.octets()),
        &ack,
    );
    assert_eq!(
        decap(&f),
        (Action::Drop, DecapReason::DropMalformed, f.clone())
    );
    let (a, r, out) = decap_with(&f, |_| true, None);
    assert_eq!((a, r), (Action::Pass, DecapReason::Decapped));
    assert_frame_eq(&out, &expected_decap(&f, &ack));
}

/// An ICMP error about a TCP connection of the VIP (the quote went VIP -> client) asks
/// about that connection, seen from the backend (source := the quote's destination, ports
/// swapped): here → decapsulated; not here → sent on to the secondary (a path-MTU error
/// must reach the connection where it lives). Echoes and errors quoting UDP are this
/// host's, as are quotes cut before the ports.
#[test]
fn decap_second_chance_sends_an_icmp_error_about_a_connection_it_lacks_to_the_secondary() {
    let o = Opts::default();
    for outer6 in [false, true] {
        let sec = second_of(outer6);
        let g = gue0(outer6, true, GUE_F_SECOND, &sec);
        let g6 = gue0(outer6, false, GUE_F_SECOND, &sec);
        let q4 = ip_packet(&tcp4(VIP4, 80, CLIENT4, 5555, false, &[9; 30]));
        let q6 = ip_packet(&tcp6(VIP6, 80, CLIENT6, 5555, false, &[9; 30]));
        let conn4 = flow4(CLIENT4, 5555, VIP4, 80, TCP);
        let conn6 = flow6(CLIENT6, 5555, VIP6, 80, TCP);
        let cases = [
            (
                g.clone(),
                icmp4_dest_unreach(ROUTER4, VIP4, 1400, &q4),
                conn4,
            ),
            (
                g.clone(),
                icmp4_time_exceeded(ROUTER4, VIP4, &q4[..24]),
                conn4,
            ),
            (
                g6.clone(),
                icmp6_packet_too_big(ROUTER6, VIP6, 1280, &q6),
                conn6,
            ),
        ];
        for (gue, icmp, conn) in cases {
            let f = gue_frame(&o, outer6, &gue, &ip_packet(&icmp));
            let (_, r, _) = decap_with(&f, |k| *k == conn, None);
            assert_eq!(r, DecapReason::Decapped, "the connection is here");
            let (_, r, _) = decap_with(&f, |k| *k != conn, None);
            assert_eq!(
                r,
                DecapReason::RedirectedStack,
                "the connection is not here"
            );
        }
        // Quoting UDP, or cut before the quote's ports: this host's, nothing asked.
        let qu = ip_packet(&udp4(VIP4, 53, CLIENT4, 5555, b"x"));
        for icmp in [
            icmp4_dest_unreach(ROUTER4, VIP4, 1400, &qu),
            icmp4_dest_unreach(ROUTER4, VIP4, 1400, &q4[..22]),
        ] {
            let f = gue_frame(&o, outer6, &g, &ip_packet(&icmp));
            assert_eq!(decap_with(&f, never_asked, None).1, DecapReason::Decapped);
        }
    }
}
