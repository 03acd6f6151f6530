//! The traffic mixes of the Maglev paper's evaluation, as generator settings.
use std::net::IpAddr;

use etherparse::PacketBuilder;

use lb_common::{bench::GenConfig, PROTO_TCP, PROTO_UDP};
use lb_tests::fixture::{v4, v6};
use lb_userspace::dataplane::addr_raw;

use crate::live::{GEN_MAC, LB_MAC};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mix {
    /// Every frame a SYN of a flow never seen before.
    Syn,
    /// ACKs cycling over a set of flows the LB has seen.
    Established,
    /// One 5-tuple, ACKs.
    Constant,
    /// UDP datagrams cycling over a set of flows.
    Udp,
}

impl Mix {
    pub fn name(self) -> &'static str {
        match self {
            Mix::Syn => "syn",
            Mix::Established => "established",
            Mix::Constant => "constant",
            Mix::Udp => "udp",
        }
    }

    pub fn parse(s: &str) -> Option<Mix> {
        [Mix::Syn, Mix::Established, Mix::Constant, Mix::Udp]
            .into_iter()
            .find(|m| m.name() == s)
    }
}

/// The benchmark's VIP of family `v6` (the standard fixture's first TCP/UDP VIP: IP-in-IP
/// to four backends of weights 1, 2, 3, 4, last address bytes 10 to 13).
pub fn vip(v6_: bool) -> IpAddr {
    if v6_ {
        v6(10, 1)
    } else {
        v4(10, 1)
    }
}

/// The first client address; flows add to its last 16 bits.
pub fn client(v6_: bool) -> IpAddr {
    if v6_ {
        v6(100, 0)
    } else {
        v4(100, 0)
    }
}

/// Smallest frame that carries the headers and is at least Ethernet's minimum (60 bytes
/// without the frame check sequence); the generator's IPv6 path needs 74.
pub fn min_frame(v6_: bool) -> u16 {
    if v6_ {
        74
    } else {
        60
    }
}

/// Generator settings for `mix` over `flows` flows (ignored by `Syn` and `Constant`).
pub fn gen_config(mix: Mix, v6_: bool, flows: u32, frame_len: u16) -> GenConfig {
    gen_config_to(mix, client(v6_), vip(v6_), 80, flows, frame_len)
}

pub fn gen_config_to(
    mix: Mix,
    src: IpAddr,
    dst: IpAddr,
    dst_port: u16,
    flows: u32,
    frame_len: u16,
) -> GenConfig {
    let (src, family) = addr_raw(src);
    let (dst, _) = addr_raw(dst);
    GenConfig {
        dst_mac: LB_MAC,
        src_mac: GEN_MAC,
        src,
        dst,
        flows: match mix {
            Mix::Syn => 0,
            Mix::Constant => 1,
            Mix::Established | Mix::Udp => flows,
        },
        flow_base: 0,
        dst_port,
        frame_len,
        family,
        proto: if mix == Mix::Udp {
            PROTO_UDP
        } else {
            PROTO_TCP
        },
        tcp_flags: if mix == Mix::Syn { 0x02 } else { 0x10 },
        _pad: 0,
    }
}

/// Flow `i`'s frame as the generator's contract (`lb_common::bench`) describes it, built
/// with etherparse (the tests' oracle for the generator; the flood suite's frames to probe
/// the LB with), payload bytes `payload_byte`.
pub fn reference_frame(cfg: &GenConfig, i: u32, payload_byte: u8) -> Vec<u8> {
    let sport = 10_000 + (i & 0x7fff) as u16;
    let off = (i >> 15) as u16;
    let v6 = cfg.family == 6;
    let hdrs = 14 + if v6 { 40 } else { 20 } + if cfg.proto == 6 { 20 } else { 8 };
    let payload = vec![payload_byte; cfg.frame_len as usize - hdrs];
    let eth = PacketBuilder::ethernet2(cfg.src_mac, cfg.dst_mac);
    let ip = if v6 {
        let mut s: [u8; 16] = bytemuck(cfg.src);
        let last = u16::from_be_bytes([s[14], s[15]]).wrapping_add(off);
        s[14..].copy_from_slice(&last.to_be_bytes());
        eth.ipv6(s, bytemuck(cfg.dst), 64)
    } else {
        let mut s: [u8; 4] = cfg.src[0].to_ne_bytes();
        let last = u16::from_be_bytes([s[2], s[3]]).wrapping_add(off);
        s[2..].copy_from_slice(&last.to_be_bytes());
        eth.ipv4(s, cfg.dst[0].to_ne_bytes(), 64)
    };
    let mut out = Vec::new();
    if cfg.proto == 6 {
        let mut b = ip.tcp(sport, cfg.dst_port, 1, 65535);
        b = if cfg.tcp_flags == 0x02 {
            b.syn()
        } else {
            b.ack(0)
        };
        b.write(&mut out, &payload).unwrap();
    } else {
        ip.udp(sport, cfg.dst_port)
            .write(&mut out, &payload)
            .unwrap();
    }
    if !v6 {
        // DF set, identification 0 (etherparse's defaults are DF clear).
        out[20] |= 0x40;
        let mut h = etherparse::Ipv4Header::from_slice(&out[14..]).unwrap().0;
        h.dont_fragment = true;
        h.header_checksum = h.calc_header_checksum();
        out[14..34].copy_from_slice(&h.to_bytes());
    }
    // The generator leaves L4 checksums zero (see lb-ebpf/src/bench.rs).
    let l4 = 14 + if v6 { 40 } else { 20 };
    let at = l4 + if cfg.proto == 6 { 16 } else { 6 };
    out[at..at + 2].copy_from_slice(&[0, 0]);
    out
}

fn bytemuck(w: [u32; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    for (i, x) in w.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&x.to_ne_bytes());
    }
    b
}
