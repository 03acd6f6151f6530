//! Golden vectors: literal values of everything on the wire or shared between LB hosts,
//! computed by `tests/golden/generate.py` from docs/dataplane.md with an independent
//! implementation (MurmurHash3 from Python's `mmh3`, Maglev and headers written there).
//! A change to the flow hash, the ring slot, the entropy in outer headers, the GUE port,
//! the TTL, the Maglev table or any byte the data plane writes fails here, as Katran's
//! tester fixtures would. Never regenerate these to make a test pass: a changed value
//! breaks every LB host that still runs the old one.
use std::{
    net::{IpAddr, SocketAddr, TcpListener},
    os::fd::{FromRawFd, OwnedFd},
};

use lb_common::*;
use lb_tests::{
    harness,
    netns::{veth_pair, Netns, VethEnd},
    packets::flow4,
};
use lb_userspace::{
    config::Config as AgentConfig,
    dataplane::{addr_raw, port_raw, Dataplane},
    maglev::{self, MaglevInput},
    reconcile,
};

/// The default `agent.hash_seed`.
const SEED: u32 = 0x1b_5eed;

// V4_TCP: ('198.18.0.10', '198.18.10.1', 40000, 80, 6)
const V4_TCP_HASH: u32 = 0x8679cd2f;
const V4_TCP_HASH_AFFINITY: u32 = 0x3b02c39f;
const V4_TCP_SLOT_65537: u32 = 18102;
const V4_TCP_ENTROPY: u32 = 0x9ed5d018;
const V4_TCP_OUTER_SRC: &str = "198.18.255.158";
const V4_TCP_GUE_SPORT: u16 = 53272;
// V6_UDP: ('2001:db8:c::10', '2001:db8:10::3', 40000, 53, 17)
const V6_UDP_HASH: u32 = 0x72901d8e;
const V6_UDP_HASH_AFFINITY: u32 = 0x16e2942e;
const V6_UDP_SLOT_65537: u32 = 43775;
const V6_UDP_ENTROPY: u32 = 0xb280dcd6;
const V6_UDP_OUTER_SRC: &str = "2001:db8:ff::80b2";
const V6_UDP_FLOW_LABEL: u32 = 0x0dcd6;
const V6_UDP_GUE_SPORT: u16 = 56534;
const MAGLEV_13: [&str; 13] = [
    "198.18.20.12",
    "198.18.20.13",
    "198.18.20.13",
    "198.18.20.11",
    "198.18.20.12",
    "198.18.20.12",
    "198.18.20.13",
    "198.18.20.12",
    "198.18.20.11",
    "198.18.20.13",
    "198.18.20.13",
    "198.18.20.13",
    "198.18.20.13",
];
// ipip_4in4: VIP 198.18.10.1:80/6 ipip -> 198.18.20.11
const IN_IPIP_4IN4: &str = "02000000000102000000000c08004510002e123440003f069356c612000ac6120a019c40005000000001000000015010ffff43ca0000676f6c64656e";
const OUT_IPIP_4IN4: &str = "02000000200b020000000001080045100042000000004004dad9c612ff9ec612140b4510002e123440003f069356c612000ac6120a019c40005000000001000000015010ffff43ca0000676f6c64656e";
// ipip_6in6: VIP 2001:db8:10::1:80/6 ipip -> 2001:db8:20::11
const IN_IPIP_6IN6: &str = "02000000000102000000000c86dd62012345001a063f20010db8000c0000000000000000001020010db80010000000000000000000019c40005000000001000000015010ffff7e5b0000676f6c64656e";
const OUT_IPIP_6IN6: &str = "02000000601102000000000186dd6200dcd60042294020010db800ff000000000000000080b220010db800200000000000000000001162012345001a063f20010db8000c0000000000000000001020010db80010000000000000000000019c40005000000001000000015010ffff7e5b0000676f6c64656e";
// ipip_4in6: VIP 198.18.10.2:80/6 ipip -> 2001:db8:20::11
const IN_IPIP_4IN6: &str = "02000000000102000000000c08004510002e123440003f069355c612000ac6120a029c40005000000001000000015010ffff43c90000676f6c64656e";
const OUT_IPIP_4IN6: &str = "02000000601102000000000186dd6105d018002e044020010db800ff0000000000000000d59e20010db80020000000000000000000114510002e123440003f069355c612000ac6120a029c40005000000001000000015010ffff43c90000676f6c64656e";
// gue_4in4: VIP 198.18.10.3:53/17 gue -> 198.18.20.11
const IN_GUE_4IN4: &str = "02000000000102000000000c080045100022123440003f119355c612000ac6120a039c400035000e93e8676f6c64656e";
const OUT_GUE_4IN4: &str = "02000000200b02000000000108004510003e000000004011dad0c612ff9ec612140bd01817c0002a000045100022123440003f119355c612000ac6120a039c400035000e93e8676f6c64656e";
// gue_6in6: VIP 2001:db8:10::3:53/17 gue -> 2001:db8:20::11
const IN_GUE_6IN6: &str = "02000000000102000000000c86dd62012345000e113f20010db8000c0000000000000000001020010db80010000000000000000000039c400035000ece79676f6c64656e";
const OUT_GUE_6IN6: &str = "02000000601102000000000186dd6200dcd6003e114020010db800ff000000000000000080b220010db8002000000000000000000011dcd617c0003e000062012345000e113f20010db8000c0000000000000000001020010db80010000000000000000000039c400035000ece79676f6c64656e";
// l2dsr: VIP 198.18.10.4:80/6 l2dsr -> 198.18.20.11
const IN_L2DSR: &str = "02000000000102000000000c08004510002e123440003f069353c612000ac6120a049c40005000000001000000015010ffff43c70000676f6c64656e";
const OUT_L2DSR: &str = "02000000200b02000000000108004510002e123440003f069353c612000ac6120a049c40005000000001000000015010ffff43c70000676f6c64656e";
// stateless_4in4: stateless VIP 198.18.10.5:80/6 gue -> 198.18.20.11, secondary 198.18.20.12
const IN_STATELESS_4IN4: &str = "02000000000102000000000c08004510002e123440003f069352c612000ac6120a059c40005000000001000000015010ffff43c60000676f6c64656e";
const OUT_STATELESS_4IN4: &str = "02000000200b020000000001080045100056000000004011dab8c612ff9ec612140bd01817c000420000020400004c420100c612140c4510002e123440003f069352c612000ac6120a059c40005000000001000000015010ffff43c60000676f6c64656e";
// stateless_6in6: stateless VIP 2001:db8:10::5:80/6 gue -> 2001:db8:20::11, secondary 2001:db8:20::12
const IN_STATELESS_6IN6: &str = "02000000000102000000000c86dd62012345001a063f20010db8000c0000000000000000001020010db80010000000000000000000059c40005000000001000000015010ffff7e570000676f6c64656e";
const OUT_STATELESS_6IN6: &str = "02000000601102000000000186dd6200dcd60062114020010db800ff000000000000000080b220010db8002000000000000000000011dcd617c000620000052900004c42010020010db800200000000000000000001262012345001a063f20010db8000c0000000000000000001020010db80010000000000000000000059c40005000000001000000015010ffff7e570000676f6c64656e";
// stateless_4in6_alone: stateless VIP 198.18.10.6:80/6 gue -> 2001:db8:20::11, secondary None
const IN_STATELESS_4IN6_ALONE: &str = "02000000000102000000000c08004510002e123440003f069351c612000ac6120a069c40005000000001000000015010ffff43c50000676f6c64656e";
const OUT_STATELESS_4IN6_ALONE: &str = "02000000601102000000000186dd6105d018004e114020010db800ff0000000000000000d59e20010db8002000000000000000000011d01817c0004e0000050400004c420000000000000000000000000000000000004510002e123440003f069351c612000ac6120a069c40005000000001000000015010ffff43c50000676f6c64656e";
// redirect_v4: decap's second chance: to the stack / a FIB route via fib0 / via lo;
// or decapsulated when this host has the connection
const IN_REDIRECT_V4: &str = "02000000200b020000000001080045100056000000003d11ddb8c612ff9ec612140bd01817c000421234020400004c420100c612140c4510002e123440003f069352c612000ac6120a059c40005000000001000000015010ffff43c60000676f6c64656e";
const OUT_REDIRECT_V4_STACK: &str = "02000000200b020000000001080045100056000000004011dab7c612ff9ec612140cd01817c000420000020400004c420300c612140c4510002e123440003f069352c612000ac6120a059c40005000000001000000015010ffff43c60000676f6c64656e";
const OUT_REDIRECT_V4_FIB: &str = "02000000200c0200000000f0080045100056000000004011dab7c612ff9ec612140cd01817c000420000020400004c420300c612140c4510002e123440003f069352c612000ac6120a059c40005000000001000000015010ffff43c60000676f6c64656e";
const OUT_REDIRECT_V4_TX: &str = "02000000200c000000000000080045100056000000004011dab7c612ff9ec612140cd01817c000420000020400004c420300c612140c4510002e123440003f069352c612000ac6120a059c40005000000001000000015010ffff43c60000676f6c64656e";
const OUT_REDIRECT_V4_LOCAL: &str = "02000000200b02000000000108004510002e123440003f069352c612000ac6120a059c40005000000001000000015010ffff43c60000676f6c64656e";
// redirect_v6: decap's second chance: to the stack / a FIB route via fib0 / via lo;
// or decapsulated when this host has the connection
const IN_REDIRECT_V6: &str = "02000000601102000000000186dd6200dcd60062113d20010db800ff000000000000000080b220010db8002000000000000000000011dcd617c000621234052900004c42010020010db800200000000000000000001262012345001a063f20010db8000c0000000000000000001020010db80010000000000000000000059c40005000000001000000015010ffff7e570000676f6c64656e";
const OUT_REDIRECT_V6_STACK: &str = "02000000601102000000000186dd6200dcd60062114020010db800ff000000000000000080b220010db8002000000000000000000012dcd617c000621234052900004c42030020010db800200000000000000000001262012345001a063f20010db8000c0000000000000000001020010db80010000000000000000000059c40005000000001000000015010ffff7e570000676f6c64656e";
const OUT_REDIRECT_V6_FIB: &str = "0200000060120200000000f086dd6200dcd60062114020010db800ff000000000000000080b220010db8002000000000000000000012dcd617c000621234052900004c42030020010db800200000000000000000001262012345001a063f20010db8000c0000000000000000001020010db80010000000000000000000059c40005000000001000000015010ffff7e570000676f6c64656e";
const OUT_REDIRECT_V6_TX: &str = "02000000601200000000000086dd6200dcd60062114020010db800ff000000000000000080b220010db8002000000000000000000012dcd617c000621234052900004c42030020010db800200000000000000000001262012345001a063f20010db8000c0000000000000000001020010db80010000000000000000000059c40005000000001000000015010ffff7e570000676f6c64656e";
const OUT_REDIRECT_V6_LOCAL: &str = "02000000601102000000000186dd62012345001a063f20010db8000c0000000000000000001020010db80010000000000000000000059c40005000000001000000015010ffff7e570000676f6c64656e";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn flow(src: &str, dst: &str, sport: u16, dport: u16, proto: u8) -> FlowKey {
    let (s, family) = addr_raw(ip(src));
    FlowKey {
        src: s,
        dst: addr_raw(ip(dst)).0,
        sport: port_raw(sport),
        dport: port_raw(dport),
        proto,
        family,
        _pad: [0; 2],
    }
}

#[test]
fn murmurhash3_matches_its_published_test_vectors() {
    // From MurmurHash3's reference (SMHasher) and its common ports' test suites.
    for (data, seed, want) in [
        (&b""[..], 0, 0u32),
        (b"", 1, 0x514e_28b7),
        (b"", 0xffff_ffff, 0x81f1_6f39),
        (b"\0\0\0\0", 0, 0x2362_f9de),
        (b"\xff\xff\xff\xff", 0, 0x7629_3b50),
        (b"\x21\x43\x65\x87", 0, 0xf55b_516b),
        (b"\x21\x43\x65\x87", 0x5082_edee, 0x2362_f9de),
        (b"a", 0x9747_b28c, 0x7fa0_9ea6),
        (b"aa", 0x9747_b28c, 0x5d21_1726),
        (b"aaa", 0x9747_b28c, 0x283e_0130),
        (b"aaaa", 0x9747_b28c, 0x5a97_808a),
        (b"abcd", 0x9747_b28c, 0xf047_8627),
        (b"Hello, world!", 0x9747_b28c, 0x2488_4cba),
        (
            b"The quick brown fox jumps over the lazy dog",
            0x9747_b28c,
            0x2fa8_26cd,
        ),
    ] {
        assert_eq!(murmur3_32(data, seed), want, "{data:?} seed {seed:#x}");
    }
}

#[test]
fn the_flow_hash_and_its_ring_slot_are_these_numbers() {
    let v4 = flow("198.18.0.10", "198.18.10.1", 40000, 80, PROTO_TCP);
    let v6 = flow("2001:db8:c::10", "2001:db8:10::3", 40000, 53, PROTO_UDP);
    assert_eq!(flow_hash(SEED, &v4, false), V4_TCP_HASH);
    assert_eq!(flow_hash(SEED, &v4, true), V4_TCP_HASH_AFFINITY);
    assert_eq!(flow_hash(SEED, &v6, false), V6_UDP_HASH);
    assert_eq!(flow_hash(SEED, &v6, true), V6_UDP_HASH_AFFINITY);
    assert_eq!(ring_slot(V4_TCP_HASH, 65537), V4_TCP_SLOT_65537);
    assert_eq!(ring_slot(V6_UDP_HASH, 65537), V6_UDP_SLOT_65537);
    // The packets' own key builder agrees with the wire order.
    assert_eq!(
        flow4(
            "198.18.0.10".parse().unwrap(),
            40000,
            "198.18.10.1".parse().unwrap(),
            80,
            PROTO_TCP
        ),
        v4
    );
}

#[test]
fn outer_headers_carry_these_entropy_bits() {
    let v4 = flow("198.18.0.10", "198.18.10.1", 40000, 80, PROTO_TCP);
    let v6 = flow("2001:db8:c::10", "2001:db8:10::3", 40000, 53, PROTO_UDP);
    assert_eq!(flow_entropy(&v4), V4_TCP_ENTROPY);
    assert_eq!(flow_entropy(&v6), V6_UDP_ENTROPY);
    assert_eq!(V6_UDP_ENTROPY & 0xf_ffff, V6_UDP_FLOW_LABEL);
    // The agent turns `encap_source_*` prefixes into these masks.
    let cfg = AgentConfig::parse(
        r#"
[agent]
interface = "eth0"
gateway_mac = "02:00:00:00:00:fe"
encap_source_v4 = "198.18.255.0/24"
encap_source_v6 = "2001:db8:ff::/112"
"#,
    )
    .unwrap();
    let c = reconcile::dataplane_config(&cfg, 1500).unwrap();
    let src4 = (c.src4 & !c.src4_mask) | (V4_TCP_ENTROPY & c.src4_mask);
    assert_eq!(
        IpAddr::from(src4.to_ne_bytes()),
        ip(V4_TCP_OUTER_SRC),
        "outer IPv4 source"
    );
    let mut w = c.src6;
    w[3] = (w[3] & !c.src6_mask) | (V6_UDP_ENTROPY & c.src6_mask);
    assert_eq!(
        lb_userspace::dataplane::ip_from_raw(w, FAMILY_V6),
        ip(V6_UDP_OUTER_SRC),
        "outer IPv6 source"
    );
    assert_eq!(GUE_PORT, 6080);
    assert_eq!(OUTER_TTL, 64);
    assert_eq!(0xc000 | (V4_TCP_ENTROPY & 0x3fff) as u16, V4_TCP_GUE_SPORT);
    assert_eq!(0xc000 | (V6_UDP_ENTROPY & 0x3fff) as u16, V6_UDP_GUE_SPORT);
}

#[test]
fn a_small_weighted_maglev_table_is_this_one() {
    let names = ["198.18.20.13", "198.18.20.11", "198.18.20.12"]; // any order
    let weights = [3, 1, 2];
    let input: Vec<MaglevInput> = names
        .iter()
        .zip(weights)
        .map(|(n, weight)| MaglevInput {
            name: n.as_bytes(),
            weight,
        })
        .collect();
    let table: Vec<&str> = maglev::build(SEED, &input, 13)
        .unwrap()
        .into_iter()
        .map(|i| names[i as usize])
        .collect();
    assert_eq!(table, MAGLEV_13);
}

/// One VIP, one backend: the frame `input` must come out as `output`, byte for byte.
fn forwards(
    vip: &str,
    port: u16,
    proto: u8,
    fwd: Forwarding,
    backend: &str,
    input: &str,
    output: &str,
) {
    forwards_with(vip, port, proto, fwd, 0, backend, None, input, output)
}

/// A stateless VIP whose ring slots carry `second` (or nothing): `input` must come out as
/// `output`.
fn forwards_stateless(
    vip: &str,
    port: u16,
    proto: u8,
    backend: &str,
    second: Option<&str>,
    input: &str,
    output: &str,
) {
    let flags = VIP_F_STATELESS;
    forwards_with(
        vip,
        port,
        proto,
        Forwarding::Gue,
        flags,
        backend,
        second,
        input,
        output,
    )
}

#[allow(clippy::too_many_arguments)]
fn forwards_with(
    vip: &str,
    port: u16,
    proto: u8,
    fwd: Forwarding,
    flags: u8,
    backend: &str,
    second: Option<&str>,
    input: &str,
    output: &str,
) {
    let mut dp = Dataplane::load(harness::test_sizes()).unwrap();
    let (src6, _) = addr_raw(ip("2001:db8:ff::"));
    dp.set_config(&Config {
        hash_seed: SEED,
        mtu: 1500,
        src4: addr_raw(ip("198.18.255.0")).0[0],
        src4_mask: u32::from_ne_bytes([0, 0, 0, 0xff]),
        src6,
        src6_mask: u32::from_ne_bytes([0, 0, 0xff, 0xff]),
        gw_mac: [0x02, 0, 0, 0, 0, 0xfe],
        _pad: [0; 2],
    })
    .unwrap();
    let (addr, family) = addr_raw(ip(backend));
    let mac = if family == FAMILY_V6 {
        [0x02, 0, 0, 0, 0x60, 0x11]
    } else {
        [0x02, 0, 0, 0, 0x20, 0x0b]
    };
    let (vid, bid, sid) = (3, 5, 6);
    dp.set_backend(
        bid,
        &Backend {
            addr,
            mac,
            family,
            state: BACKEND_UP,
            vip: vid,
        },
    )
    .unwrap();
    // A slot word is the primary id in its low 16 bits and the secondary in the high 16
    // (equal: none).
    let mut word = bid | bid << 16;
    if let Some(second) = second {
        let (addr, family) = addr_raw(ip(second));
        let be = Backend {
            addr,
            mac: [0x02, 0, 0, 0, 0x77, 0x77],
            family,
            state: BACKEND_UP,
            vip: vid,
        };
        dp.set_backend(sid, &be).unwrap();
        word = bid | sid << 16;
    }
    let ring = [word; 7];
    let base = dp.write_ring(vid, 0, &ring).unwrap();
    let (vaddr, vfamily) = addr_raw(ip(vip));
    let key = VipKey {
        addr: vaddr,
        port: port_raw(port),
        proto,
        family: vfamily,
    };
    dp.set_vip(
        &key,
        &VipMeta {
            id: vid,
            ring_base: base,
            ring_size: ring.len() as u32,
            forwarding: fwd as u8,
            flags,
            _pad: [0; 2],
        },
    )
    .unwrap();
    let input = hex(input);
    let run = harness::run(&mut dp, "lb", &input).unwrap();
    assert_eq!(run.action, 3, "XDP_TX");
    assert_eq!(
        lb_tests_hex(&run.frame),
        output,
        "{vip}:{port}/{proto} {fwd:?} flags {flags} -> {backend}, secondary {second:?}"
    );
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn lb_tests_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn each_forwarding_mode_writes_exactly_these_bytes() {
    use Forwarding::*;
    let tcp = PROTO_TCP;
    let udp = PROTO_UDP;
    forwards(
        "198.18.10.1",
        80,
        tcp,
        Ipip,
        "198.18.20.11",
        IN_IPIP_4IN4,
        OUT_IPIP_4IN4,
    );
    forwards(
        "2001:db8:10::1",
        80,
        tcp,
        Ipip,
        "2001:db8:20::11",
        IN_IPIP_6IN6,
        OUT_IPIP_6IN6,
    );
    forwards(
        "198.18.10.2",
        80,
        tcp,
        Ipip,
        "2001:db8:20::11",
        IN_IPIP_4IN6,
        OUT_IPIP_4IN6,
    );
    forwards(
        "198.18.10.3",
        53,
        udp,
        Gue,
        "198.18.20.11",
        IN_GUE_4IN4,
        OUT_GUE_4IN4,
    );
    forwards(
        "2001:db8:10::3",
        53,
        udp,
        Gue,
        "2001:db8:20::11",
        IN_GUE_6IN6,
        OUT_GUE_6IN6,
    );
    forwards(
        "198.18.10.4",
        80,
        tcp,
        L2Dsr,
        "198.18.20.11",
        IN_L2DSR,
        OUT_L2DSR,
    );
}

#[test]
fn a_stateless_vip_writes_exactly_these_bytes() {
    // The values the spec gives these constants (the vectors below spell them out too).
    assert_eq!(VIP_F_STATELESS, 2);
    assert_eq!((GUE_F_SECOND, GUE_F_REDIRECTED), (1, 2));
    assert_eq!(GUE_LB_MAGIC, *b"LB");
    assert_eq!((GUE_V0_LEN4, GUE_V0_LEN6), (12, 24));
    let tcp = PROTO_TCP;
    forwards_stateless(
        "198.18.10.5",
        80,
        tcp,
        "198.18.20.11",
        Some("198.18.20.12"),
        IN_STATELESS_4IN4,
        OUT_STATELESS_4IN4,
    );
    forwards_stateless(
        "2001:db8:10::5",
        80,
        tcp,
        "2001:db8:20::11",
        Some("2001:db8:20::12"),
        IN_STATELESS_6IN6,
        OUT_STATELESS_6IN6,
    );
    forwards_stateless(
        "198.18.10.6",
        80,
        tcp,
        "2001:db8:20::11",
        None,
        IN_STATELESS_4IN6_ALONE,
        OUT_STATELESS_4IN6_ALONE,
    );
}

/// Run `decap` on `input` inside `ns` (its socket and FIB lookups see that namespace):
/// the action, the frame and the one `DECAP_STATS` reason counted.
fn decap_in(ns: &Netns, input: &str) -> (u32, String, DecapReason) {
    let input = hex(input);
    ns.run_in(|| {
        let mut dp = Dataplane::load(harness::test_sizes()).unwrap();
        let run = harness::run(&mut dp, "decap", &input).unwrap();
        let counts = dp.decap_counts().unwrap();
        assert_eq!(counts.iter().sum::<u64>(), 1, "one reason counted");
        let reason = DecapReason::ALL
            .into_iter()
            .find(|r| counts[*r as usize] == 1)
            .unwrap();
        (run.action, lb_tests_hex(&run.frame), reason)
    })
    .unwrap()
}

/// An empty namespace: no socket, no route to the secondary, forwarding off. An ACK of no
/// connection with a second chance goes to the stack rewritten for the secondary.
#[test]
fn decap_sends_a_segment_of_no_connection_to_the_secondary_through_the_stack_as_these_bytes() {
    let ns = Netns::new("golden-decap").unwrap();
    for (input, output) in [
        (IN_REDIRECT_V4, OUT_REDIRECT_V4_STACK),
        (IN_REDIRECT_V6, OUT_REDIRECT_V6_STACK),
    ] {
        let (action, frame, reason) = decap_in(&ns, input);
        assert_eq!(
            (action, reason),
            (2, DecapReason::RedirectedStack),
            "XDP_PASS"
        );
        assert_eq!(frame, output);
    }
}

/// A namespace with a route and a permanent neighbour entry for each secondary on the
/// veth `fib0`, forwarding on: the FIB lookup from the receiving interface (`lo` for
/// BPF_PROG_TEST_RUN) succeeds, the frame gets the neighbour's and `fib0`'s MACs and is
/// redirected to `fib0` (another interface than the receiving one).
#[test]
fn decap_sends_a_segment_of_no_connection_to_the_secondary_s_fib_neighbour_as_these_bytes() {
    let ns = Netns::new("golden-fib").unwrap();
    veth_pair(
        &VethEnd {
            ns: &ns,
            name: "fib0",
            mac: [0x02, 0, 0, 0, 0, 0xf0],
            addrs: &["198.18.20.1/24", "2001:db8:20::1/64"],
        },
        &VethEnd {
            ns: &ns,
            name: "fib1",
            mac: [0x02, 0, 0, 0, 0, 0xf1],
            addrs: &[],
        },
    )
    .unwrap();
    for (addr, lladdr) in [
        ("198.18.20.12", "02:00:00:00:20:0c"),
        ("2001:db8:20::12", "02:00:00:00:60:12"),
    ] {
        ns.ip(&[
            "neigh",
            "add",
            addr,
            "lladdr",
            lladdr,
            "nud",
            "permanent",
            "dev",
            "fib0",
        ])
        .unwrap();
    }
    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    ns.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
    for (input, output) in [
        (IN_REDIRECT_V4, OUT_REDIRECT_V4_FIB),
        (IN_REDIRECT_V6, OUT_REDIRECT_V6_FIB),
    ] {
        let (action, frame, reason) = decap_in(&ns, input);
        assert_eq!(
            (action, reason),
            (4, DecapReason::Redirected),
            "XDP_REDIRECT"
        );
        assert_eq!(frame, output);
    }
    // The same frames behind a VLAN tag go through the stack even with a route: XDP cannot
    // send on the VLAN device the FIB names. (The tag is inserted into the literals.)
    let tagged = |f: &str| -> String { format!("{}81000007{}", &f[..24], &f[24..]) };
    for (input, output) in [
        (IN_REDIRECT_V4, OUT_REDIRECT_V4_STACK),
        (IN_REDIRECT_V6, OUT_REDIRECT_V6_STACK),
    ] {
        let (action, frame, reason) = decap_in(&ns, &tagged(input));
        assert_eq!(
            (action, reason),
            (2, DecapReason::RedirectedStack),
            "tagged"
        );
        assert_eq!(frame, tagged(output));
    }
}

/// A route to each secondary out of the receiving interface itself (`lo`, whose MAC is all
/// zeros, under BPF_PROG_TEST_RUN) with a permanent neighbour entry, forwarding on: the
/// frame gets the neighbour's MAC and `lo`'s and goes back out (XDP_TX).
#[test]
fn decap_sends_a_segment_of_no_connection_back_out_the_receiving_interface_as_these_bytes() {
    let ns = Netns::new("golden-tx").unwrap();
    for (addr, lladdr) in [
        ("198.18.20.12", "02:00:00:00:20:0c"),
        ("2001:db8:20::12", "02:00:00:00:60:12"),
    ] {
        ns.ip(&["route", "add", addr, "dev", "lo"]).unwrap();
        ns.ip(&[
            "neigh",
            "add",
            addr,
            "lladdr",
            lladdr,
            "nud",
            "permanent",
            "dev",
            "lo",
        ])
        .unwrap();
    }
    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    ns.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
    for (input, output) in [
        (IN_REDIRECT_V4, OUT_REDIRECT_V4_TX),
        (IN_REDIRECT_V6, OUT_REDIRECT_V6_TX),
    ] {
        let (action, frame, reason) = decap_in(&ns, input);
        assert_eq!((action, reason), (3, DecapReason::Redirected), "XDP_TX");
        assert_eq!(frame, output);
    }
}

/// A TCP connection from `client` (bound to that address and port first, which std cannot
/// do) to `server`.
fn connect_from(client: SocketAddr, server: SocketAddr) -> std::io::Result<OwnedFd> {
    fn raw(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match a {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: 0,
                };
                unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        (ss, len as libc::socklen_t)
    }
    let family = if client.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let (c, clen) = raw(client);
    let (s, slen) = raw(server);
    use std::os::fd::AsRawFd;
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &c as *const _ as *const libc::sockaddr,
            clen,
        )
    } != 0
        || unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &s as *const _ as *const libc::sockaddr,
                slen,
            )
        } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// The second chance asks the backend's sockets: a listener on the VIP's port alone does
/// not make the ACK this host's (redirected, as in an empty namespace); once the client's
/// connection of that very 5-tuple is established here, the same frame is decapsulated.
#[test]
fn decap_keeps_a_segment_of_a_connection_of_this_host_as_these_bytes() {
    let ns = Netns::new("golden-local").unwrap();
    for addr in [
        "198.18.10.5/32",
        "198.18.0.10/32",
        "2001:db8:10::5/128",
        "2001:db8:c::10/128",
    ] {
        ns.ip(&["addr", "add", addr, "dev", "lo"]).unwrap();
    }
    for (vip, client, input, stack, local) in [
        (
            "198.18.10.5",
            "198.18.0.10",
            IN_REDIRECT_V4,
            OUT_REDIRECT_V4_STACK,
            OUT_REDIRECT_V4_LOCAL,
        ),
        (
            "2001:db8:10::5",
            "2001:db8:c::10",
            IN_REDIRECT_V6,
            OUT_REDIRECT_V6_STACK,
            OUT_REDIRECT_V6_LOCAL,
        ),
    ] {
        let server = SocketAddr::new(ip(vip), 80);
        let listener = ns.run_in(|| TcpListener::bind(server)).unwrap().unwrap();
        let (action, frame, reason) = decap_in(&ns, input);
        assert_eq!((action, reason), (2, DecapReason::RedirectedStack), "{vip}");
        assert_eq!(frame, stack);
        let client = SocketAddr::new(ip(client), 40000);
        let _conn = ns.run_in(|| connect_from(client, server)).unwrap().unwrap();
        let (_accepted, peer) = listener.accept().unwrap();
        assert_eq!(peer, client);
        let (action, frame, reason) = decap_in(&ns, input);
        assert_eq!((action, reason), (2, DecapReason::Decapped), "{vip}");
        assert_eq!(frame, local);
    }
}
