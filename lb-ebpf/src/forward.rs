//! Getting a packet to its backend: MAC rewrite (`L2Dsr`), IP-in-IP or GUE encapsulation,
//! or, when the encapsulated packet would not fit the MTU, an ICMP "too big" to the client
//! (built in `icmp`).
use aya_ebpf::{bindings::xdp_action::*, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::*;

use crate::{csum::fold, icmp::too_big, parse::Verdict, pkt::*};

/// What the parser learnt about the frame, enough to rebuild its headers.
pub struct Frame {
    /// Offset of the IP header: 14, or 18 behind one VLAN tag.
    pub l3: usize,
    /// Frame length as received.
    pub len: usize,
    /// IP datagram length (header included), padding excluded.
    pub ip_len: usize,
    /// IPv4 TOS or IPv6 traffic class.
    pub tos: u8,
    /// IPv4 DF (always true for IPv6: routers never fragment it).
    pub df: bool,
    pub family: u8,
}

/// The second chance a stateless VIP's packet carries (in a GUE variant 0 header).
#[derive(Clone, Copy)]
pub struct Second {
    pub stateless: bool,
    /// The secondary backend's address, if the slot has one that holds connections.
    pub addr: Option<[u32; 4]>,
}

impl Second {
    pub const CONNTRACK: Second = Second {
        stateless: false,
        addr: None,
    };
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn forward(
    ctx: &XdpContext,
    frame: &Frame,
    flow: &FlowKey,
    forwarding: u8,
    be: &Backend,
    cfg: &Config,
    icmp: bool,
    second: &Second,
) -> Verdict {
    let ok = if icmp {
        Reason::TxIcmpForward
    } else {
        Reason::TxForward
    };
    let mut mac = Mac::from_bytes(&be.mac);
    if mac.is_zero() {
        mac = Mac::from_bytes(&cfg.gw_mac);
    }
    let Some(eth) = check(ctx, 0, 14) else {
        return (XDP_DROP, Reason::DropTruncated);
    };
    let old_dst = Mac::load(eth);
    if forwarding == Forwarding::L2Dsr as u8 {
        mac.store(eth);
        old_dst.store(eth + 6);
        return (XDP_TX, ok);
    }

    let outer6 = be.family == FAMILY_V6;
    let gue = forwarding == Forwarding::Gue as u8;
    // Stateless VIPs are GUE only (the agent refuses anything else): variant 0 with our
    // private data after the UDP header.
    let gue0 = gue && second.stateless;
    let ip_hdr = if outer6 { 40 } else { 20 };
    let gue_len = match (gue0, outer6) {
        (false, _) => 0,
        (true, false) => GUE_V0_LEN4,
        (true, true) => GUE_V0_LEN6,
    };
    let overhead = ip_hdr + if gue { 8 + gue_len } else { 0 };
    if cfg.mtu != 0 && (frame.ip_len + overhead) as u32 > cfg.mtu {
        if icmp || !frame.df {
            return (XDP_DROP, Reason::DropTooBig);
        }
        return too_big(ctx, frame, cfg.mtu - overhead as u32);
    }

    let l3 = frame.l3;
    let tag = if l3 == 18 {
        match check(ctx, 14, 2) {
            Some(p) => ld16(p),
            None => 0,
        }
    } else {
        0
    };
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(overhead as i32)) } != 0 {
        return (XDP_DROP, Reason::DropHelper);
    }
    // adjust_head invalidated every packet pointer: re-derive from the new start.
    // Verifier: each header below gets its own check; one combined `l3 + overhead` check
    // was lost when LLVM computed `overhead` without a branch.
    let Some(p) = check(ctx, 0, 18) else {
        return (XDP_DROP, Reason::DropHelper);
    };
    let et = if outer6 { ETH_P_IPV6 } else { ETH_P_IP };
    write_eth(p, l3, mac, old_dst, tag, et);

    let entropy = flow_entropy(flow);
    let inner_proto = if gue {
        PROTO_UDP
    } else if frame.family == FAMILY_V4 {
        4
    } else {
        41
    };
    if outer6 {
        let Some(ip) = check(ctx, l3, 40) else {
            return (XDP_DROP, Reason::DropHelper);
        };
        let fl = entropy & 0xf_ffff;
        let pl = (frame.ip_len + overhead - 40) as u16;
        st32(
            ip,
            w(
                0x60 | (frame.tos >> 4),
                (frame.tos << 4) | (fl >> 16) as u8,
                (fl >> 8) as u8,
                fl as u8,
            ),
        );
        st32(ip + 4, w((pl >> 8) as u8, pl as u8, inner_proto, OUTER_TTL));
        st32(ip + 8, cfg.src6[0]);
        st32(ip + 12, cfg.src6[1]);
        st32(ip + 16, cfg.src6[2]);
        st32(
            ip + 20,
            (cfg.src6[3] & !cfg.src6_mask) | (entropy & cfg.src6_mask),
        );
        st32(ip + 24, be.addr[0]);
        st32(ip + 28, be.addr[1]);
        st32(ip + 32, be.addr[2]);
        st32(ip + 36, be.addr[3]);
    } else {
        let Some(ip) = check(ctx, l3, 20) else {
            return (XDP_DROP, Reason::DropHelper);
        };
        let tl = (frame.ip_len + overhead) as u16;
        let w0 = w(0x45, frame.tos, (tl >> 8) as u8, tl as u8);
        let w2 = w(OUTER_TTL, inner_proto, 0, 0);
        let src = (cfg.src4 & !cfg.src4_mask) | (entropy & cfg.src4_mask);
        let sum = w0 as u64 + w2 as u64 + src as u64 + be.addr[0] as u64;
        let c = fold(sum).to_ne_bytes();
        st32(ip, w0);
        st32(ip + 4, 0);
        st32(ip + 8, w(OUTER_TTL, inner_proto, c[0], c[1]));
        st32(ip + 12, src);
        st32(ip + 16, be.addr[0]);
    }
    if gue {
        let Some(udp) = check(ctx, l3 + ip_hdr, 8) else {
            return (XDP_DROP, Reason::DropHelper);
        };
        let sport = 0xc000 | (entropy & 0x3fff) as u16;
        let ulen = (frame.ip_len + 8 + gue_len) as u16;
        st32(
            udp,
            w(
                (sport >> 8) as u8,
                sport as u8,
                (GUE_PORT >> 8) as u8,
                GUE_PORT as u8,
            ),
        );
        st32(udp + 4, w((ulen >> 8) as u8, ulen as u8, 0, 0));
    }
    if gue0 {
        // GUE variant 0: version 0, C 0, hlen (private data words), protocol of the inner
        // packet, flags 0; then "LB", flags, 0, the secondary's address (or zeros).
        let inner = if frame.family == FAMILY_V4 { 4 } else { 41 };
        let (flags, addr) = match second.addr {
            Some(a) => (GUE_F_SECOND, a),
            None => (0, [0; 4]),
        };
        let m = GUE_LB_MAGIC;
        if outer6 {
            let Some(g) = check(ctx, l3 + 48, GUE_V0_LEN6) else {
                return (XDP_DROP, Reason::DropHelper);
            };
            st32(g, w(((GUE_V0_LEN6 - 4) / 4) as u8, inner, 0, 0));
            st32(g + 4, w(m[0], m[1], flags, 0));
            st32(g + 8, addr[0]);
            st32(g + 12, addr[1]);
            st32(g + 16, addr[2]);
            st32(g + 20, addr[3]);
        } else {
            let Some(g) = check(ctx, l3 + 28, GUE_V0_LEN4) else {
                return (XDP_DROP, Reason::DropHelper);
            };
            st32(g, w(((GUE_V0_LEN4 - 4) / 4) as u8, inner, 0, 0));
            st32(g + 4, w(m[0], m[1], flags, 0));
            st32(g + 8, addr[0]);
        }
    }
    (XDP_TX, ok)
}
