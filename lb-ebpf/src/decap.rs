//! `decap`, for backends: strip our IPIP / IP6IP6 / 4-in-6 / GUE encapsulation so the
//! inner packet (client → VIP) reaches the backend's stack as if it had been routed there.
//! This kernel has no IPIP, FOU or GUE devices, so the backends do it in XDP.
use aya_ebpf::{bindings::xdp_action::*, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{DecapReason, GUE_PORT, PROTO_UDP};

use crate::pkt::*;

#[inline(always)]
pub fn decap(ctx: &XdpContext) -> (u32, DecapReason) {
    const PASS: (u32, DecapReason) = (XDP_PASS, DecapReason::Pass);
    let Some(eth) = check(ctx, 0, 14) else {
        return PASS;
    };
    let mut et = ld16(eth + 12);
    let mut l3 = 14;
    if et == ETH_P_8021Q {
        let Some(tag) = check(ctx, 14, 4) else {
            return PASS;
        };
        et = ld16(tag + 2);
        l3 = 18;
    }
    // (offset of the inner packet, its protocol: 4 = IPv4, 41 = IPv6, 17 = GUE)
    let (inner, proto) = if et == ETH_P_IP {
        let Some(ip) = check(ctx, l3, 20) else {
            return PASS;
        };
        let vihl = ld8(ip);
        let ihl = ((vihl & 0xf) as usize) << 2;
        if vihl >> 4 != 4 || ihl < 20 || check(ctx, l3, ihl).is_none() {
            return PASS;
        }
        if u16::from_be(ld16(ip + 6)) & 0x3fff != 0 {
            return PASS;
        }
        (l3 + ihl, ld8(ip + 9))
    } else if et == ETH_P_IPV6 {
        let Some(ip) = check(ctx, l3, 40) else {
            return PASS;
        };
        if ld8(ip) >> 4 != 6 {
            return PASS;
        }
        (l3 + 40, ld8(ip + 6))
    } else {
        return PASS;
    };
    let (inner, family) = match proto {
        4 => (inner, 4),
        41 => (inner, 6),
        PROTO_UDP => {
            let Some(udp) = check(ctx, inner, 8) else {
                return PASS;
            };
            if ld16(udp + 2) != GUE_PORT.to_be() {
                return PASS;
            }
            // Verifier: a 1-byte check compiles to `end > p`, which proves no range; any
            // inner header has 20 bytes, so check those.
            let Some(first) = check(ctx, inner + 8, 20) else {
                return (XDP_DROP, DecapReason::DropMalformed);
            };
            (inner + 8, ld8(first) >> 4)
        }
        _ => return PASS,
    };
    let need = match family {
        4 => 20,
        6 => 40,
        _ => return (XDP_DROP, DecapReason::DropMalformed),
    };
    if check(ctx, inner, need).is_none() {
        return (XDP_DROP, DecapReason::DropMalformed);
    }
    let Some(old) = check(ctx, 0, 18) else {
        return (XDP_DROP, DecapReason::DropMalformed);
    };
    let (dst, src, tag) = (Mac::load(old), Mac::load(old + 6), ld16(old + 14));
    let strip = inner - l3;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, strip as i32) } != 0 {
        return (XDP_DROP, DecapReason::DropMalformed);
    }
    let Some(p) = check(ctx, 0, l3) else {
        return (XDP_DROP, DecapReason::DropMalformed);
    };
    let et = if family == 4 { ETH_P_IP } else { ETH_P_IPV6 };
    write_eth(p, l3, dst, src, tag, et);
    (XDP_PASS, DecapReason::Decapped)
}
