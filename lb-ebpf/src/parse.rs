//! The `lb` packet path, top to bottom: parse Ethernet / VLAN / IPv4 / IPv6, find out
//! whether the packet is for a VIP, and hand it to selection (`select`) or to the ICMP
//! handlers (`icmp`). Each step returns the verdict with the one `Reason` it is counted
//! under (`docs/dataplane.md` is the contract; the reference model in `tests/` checks it).
use aya_ebpf::{bindings::xdp_action::*, programs::XdpContext};
use lb_common::*;

use crate::{
    forward::Frame,
    icmp::{icmp4, icmp6},
    maps::{VIPS, VIP_ADDRS, VIP_FILTER},
    pkt::*,
    select::{conn_of, established, to_backend, Segment},
};

pub type Verdict = (u32, Reason);

pub const fn pass(r: Reason) -> Verdict {
    (XDP_PASS, r)
}
pub const fn drop(r: Reason) -> Verdict {
    (XDP_DROP, r)
}

#[inline(always)]
pub fn lb(ctx: &XdpContext) -> Verdict {
    let len = ctx.data_end() - ctx.data();
    let Some(eth) = check(ctx, 0, 14) else {
        return drop(Reason::DropTruncated);
    };
    let et = ld16(eth + 12);
    if et == ETH_P_IP {
        return ipv4(ctx, 14, len);
    }
    if et == ETH_P_IPV6 {
        return ipv6(ctx, 14, len);
    }
    if et != ETH_P_8021Q {
        return pass(Reason::PassNotIp);
    }
    let Some(tag) = check(ctx, 14, 4) else {
        return drop(Reason::DropTruncated);
    };
    let et = ld16(tag + 2);
    if et == ETH_P_IP {
        return ipv4(ctx, 18, len);
    }
    if et == ETH_P_IPV6 {
        return ipv6(ctx, 18, len);
    }
    pass(Reason::PassNotIp)
}

/// False when no VIP can have this address: one bit test instead of a hash lookup.
#[inline(always)]
fn maybe_vip(addr: &[u32; 4]) -> bool {
    match VIP_FILTER.get(0) {
        Some(f) => (*f >> vip_filter_bit(addr)) & 1 != 0,
        None => true,
    }
}

/// False when no stateless VIP can have this address (`VIP_FILTER[1]`).
#[inline(always)]
fn maybe_stateless(addr: &[u32; 4]) -> bool {
    match VIP_FILTER.get(1) {
        Some(f) => (*f >> vip_filter_bit(addr)) & 1 != 0,
        None => false,
    }
}

/// A fragment, ICMP or other protocol: ours only if the address carries a VIP.
#[inline(always)]
fn vip_address(addr: [u32; 4], family: u8) -> bool {
    if !maybe_vip(&addr) {
        return false;
    }
    let key = AddrKey {
        addr,
        family,
        _pad: [0; 3],
    };
    VIP_ADDRS.get_ptr(&key).is_some()
}

#[inline(always)]
fn not_l4(addr: [u32; 4], family: u8, if_vip: Reason) -> Verdict {
    if vip_address(addr, family) {
        drop(if_vip)
    } else {
        pass(Reason::PassNotVip)
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, l3: usize, len: usize) -> Verdict {
    let Some(ip) = check(ctx, l3, 20) else {
        return drop(Reason::DropTruncated);
    };
    let vihl = ld8(ip);
    // Masking IHL keeps every later offset provably under 60 bytes for the verifier.
    let ihl = ((vihl & 0xf) as usize) << 2;
    if vihl >> 4 != 4 || ihl < 20 {
        return drop(Reason::DropBadHeader);
    }
    if l3 + ihl > len {
        return drop(Reason::DropTruncated);
    }
    let tot = u16::from_be(ld16(ip + 2)) as usize;
    if tot < ihl || l3 + tot > len {
        return drop(Reason::DropBadHeader);
    }
    let ip_end = l3 + tot;
    let dst = [ld32(ip + 16), 0, 0, 0];
    if u16::from_be(ld16(ip + 6)) & 0x3fff != 0 {
        return not_l4(dst, FAMILY_V4, Reason::DropFragment);
    }
    let proto = ld8(ip + 9);
    let l4 = l3 + ihl;
    let frame = Frame {
        l3,
        len,
        ip_len: tot,
        tos: ld8(ip + 1),
        df: ld8(ip + 6) & 0x40 != 0,
        family: FAMILY_V4,
    };
    let src = [ld32(ip + 12), 0, 0, 0];
    match proto {
        PROTO_TCP | PROTO_UDP => l4_to_vip(ctx, &frame, src, dst, proto, l4, ip_end),
        PROTO_ICMP => {
            if !vip_address(dst, FAMILY_V4) {
                return pass(Reason::PassNotVip);
            }
            icmp4(ctx, &frame, l4, ip_end)
        }
        _ => not_l4(dst, FAMILY_V4, Reason::DropUnsupported),
    }
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, l3: usize, len: usize) -> Verdict {
    let Some(ip) = check(ctx, l3, 40) else {
        return drop(Reason::DropTruncated);
    };
    if ld8(ip) >> 4 != 6 {
        return drop(Reason::DropBadHeader);
    }
    let ip_len = 40 + u16::from_be(ld16(ip + 4)) as usize;
    if l3 + ip_len > len {
        return drop(Reason::DropBadHeader);
    }
    let ip_end = l3 + ip_len;
    let dst = ld_addr6(ip + 24);
    let next = ld8(ip + 6);
    let frame = Frame {
        l3,
        len,
        ip_len,
        tos: ((ld8(ip) & 0xf) << 4) | (ld8(ip + 1) >> 4),
        df: true,
        family: FAMILY_V6,
    };
    match next {
        PROTO_TCP | PROTO_UDP => {
            let src = ld_addr6(ip + 8);
            l4_to_vip(ctx, &frame, src, dst, next, l3 + 40, ip_end)
        }
        PROTO_ICMPV6 => {
            if !vip_address(dst, FAMILY_V6) {
                return pass(Reason::PassNotVip);
            }
            icmp6(ctx, &frame, l3 + 40, ip_end)
        }
        44 => not_l4(dst, FAMILY_V6, Reason::DropFragment),
        _ => not_l4(dst, FAMILY_V6, Reason::DropUnsupported),
    }
}

/// TCP or UDP: the ports decide whether this is a VIP.
#[inline(always)]
fn l4_to_vip(
    ctx: &XdpContext,
    frame: &Frame,
    src: [u32; 4],
    dst: [u32; 4],
    proto: u8,
    l4: usize,
    ip_end: usize,
) -> Verdict {
    let hdr = if proto == PROTO_TCP { 20 } else { 8 };
    if l4 + hdr > ip_end {
        return drop(Reason::DropTruncated);
    }
    let Some(p) = check(ctx, l4, 4) else {
        return drop(Reason::DropTruncated);
    };
    let flow = FlowKey {
        src,
        dst,
        sport: ld16(p),
        dport: ld16(p + 2),
        proto,
        family: frame.family,
        _pad: [0; 2],
    };
    if !maybe_vip(&dst) {
        return pass(Reason::PassNotVip);
    }
    let seg = if proto == PROTO_TCP {
        let Some(t) = check(ctx, l4, 14) else {
            return drop(Reason::DropTruncated);
        };
        Segment::tcp(ld8(t + 13))
    } else {
        Segment::UDP
    };
    let key = VipKey {
        addr: dst,
        port: flow.dport,
        proto,
        family: frame.family,
    };
    // An address with a stateless VIP: the VIP first, so that its packets never pay for a
    // connection-table lookup (at a million flows, two cache misses they have no use for).
    if maybe_stateless(&dst) {
        let Some(vip) = VIPS.get_ptr(&key) else {
            return pass(Reason::PassNotVip);
        };
        let vip = unsafe { &*vip };
        let conn = if seg.syn || vip.flags & VIP_F_STATELESS != 0 {
            None
        } else {
            conn_of(&flow)
        };
        return to_backend(ctx, frame, &flow, vip, conn, Some(seg));
    }
    // A SYN opens a connection: it always follows the ring, never an old entry (a client
    // reusing its port must not land on a backend that was drained or removed since).
    let conn = if seg.syn { None } else { conn_of(&flow) };
    if let Some(v) = established(ctx, frame, &flow, &key, conn, seg) {
        return v;
    }
    let Some(vip) = VIPS.get_ptr(&key) else {
        return pass(Reason::PassNotVip);
    };
    to_backend(ctx, frame, &flow, unsafe { &*vip }, conn, Some(seg))
}
