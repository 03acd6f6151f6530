//! The traffic mixes of the Maglev paper's evaluation, as generator settings.
use std::net::IpAddr;

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
