//! The `lb` packet path, top to bottom: parse, find the VIP, select the backend, forward.
//! Each step returns the verdict with the one `Reason` it is counted under
//! (`docs/dataplane.md` is the contract; the reference model in `tests/` checks it).
use aya_ebpf::{bindings::xdp_action::*, programs::XdpContext};
use lb_common::*;

use crate::{
    forward::{echo_reply, forward, Frame},
    maps::{
        bump_counters, BACKENDS, BE_STATS, CONFIG, CONNS, RINGS, VIPS, VIP_ADDRS, VIP_FILTER,
        VIP_INFO, VIP_STATS,
    },
    pkt::*,
};

pub type Verdict = (u32, Reason);

const fn pass(r: Reason) -> Verdict {
    (XDP_PASS, r)
}
const fn drop(r: Reason) -> Verdict {
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

/// A fragment, ICMP or other protocol: ours only if the address carries a VIP.
#[inline(always)]
fn vip_address(addr: [u32; 4], family: u8) -> bool {
    if !maybe_vip(&addr) {
        return false;
    }
    let key = AddrKey { addr, family, _pad: [0; 3] };
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
    let key = VipKey { addr: dst, port: flow.dport, proto, family: frame.family };
    // Established flow fast path: the entry names its VIP, VIP_INFO confirms that VIP still
    // has this key (an array read instead of the VIPS hash lookup). Same result as the full
    // path below, which handles everything else.
    let conn = conn_of(&flow);
    if let Some(c) = conn {
        if let Some(info) = VIP_INFO.get(c.vip) {
            if info.live != 0 && info.key == key {
                if let Some(be) = BACKENDS.get(c.backend).filter(|be| keeps_flows(be)) {
                    let Some(cfg) = CONFIG.get(0) else {
                        return drop(Reason::DropNoConfig);
                    };
                    let to = To { vip: c.vip, forwarding: info.forwarding, backend: c.backend };
                    return send(ctx, frame, &flow, &to, be, cfg, false, false);
                }
            }
        }
    }
    let Some(vip) = VIPS.get_ptr(&key) else {
        return pass(Reason::PassNotVip);
    };
    to_backend(ctx, frame, &flow, unsafe { &*vip }, conn, false)
}

/// The flow's connection-table entry, copied out.
#[inline(always)]
fn conn_of(flow: &FlowKey) -> Option<ConnVal> {
    CONNS.get_ptr(flow).map(|c| unsafe { *c })
}

/// A backend that keeps its established flows.
#[inline(always)]
fn keeps_flows(be: &Backend) -> bool {
    be.state == BACKEND_UP || be.state == BACKEND_DRAINING
}

/// Where a selected packet goes: its VIP (counters, forwarding mode) and backend.
struct To {
    vip: u32,
    forwarding: u8,
    backend: u32,
}

/// Forward to the chosen backend and count it: VIP always, backend when sent.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn send(
    ctx: &XdpContext,
    frame: &Frame,
    flow: &FlowKey,
    to: &To,
    be: &Backend,
    cfg: &Config,
    new: bool,
    icmp: bool,
) -> Verdict {
    bump_counters(&VIP_STATS, to.vip, frame.len as u64, new);
    let verdict = forward(ctx, frame, flow, to.forwarding, be, cfg, icmp);
    if verdict.1 == Reason::TxForward || verdict.1 == Reason::TxIcmpForward {
        bump_counters(&BE_STATS, to.backend, frame.len as u64, new);
    }
    verdict
}

/// ICMP error about a VIP flow: forward to the backend of the quoted flow.
#[inline(always)]
fn icmp4(ctx: &XdpContext, frame: &Frame, l4: usize, ip_end: usize) -> Verdict {
    if l4 + 8 > ip_end {
        return drop(Reason::DropTruncated);
    }
    let Some(icmp) = check(ctx, l4, 8) else {
        return drop(Reason::DropTruncated);
    };
    let ty = ld8(icmp);
    if ty == 8 {
        return echo_reply(ctx, frame, l4);
    }
    if ty != 3 && ty != 11 {
        return drop(Reason::DropIcmp);
    }
    let inner = l4 + 8;
    if inner + 20 > ip_end {
        return drop(Reason::DropTruncated);
    }
    let Some(iip) = check(ctx, inner, 20) else {
        return drop(Reason::DropTruncated);
    };
    let vihl = ld8(iip);
    let ihl = ((vihl & 0xf) as usize) << 2;
    if vihl >> 4 != 4 || ihl < 20 {
        return drop(Reason::DropBadHeader);
    }
    let proto = ld8(iip + 9);
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return drop(Reason::DropIcmp);
    }
    let isrc = [ld32(iip + 12), 0, 0, 0];
    let idst = [ld32(iip + 16), 0, 0, 0];
    quoted_flow(ctx, frame, isrc, idst, proto, inner + ihl, ip_end)
}

#[inline(always)]
fn icmp6(ctx: &XdpContext, frame: &Frame, l4: usize, ip_end: usize) -> Verdict {
    if l4 + 8 > ip_end {
        return drop(Reason::DropTruncated);
    }
    let Some(icmp) = check(ctx, l4, 8) else {
        return drop(Reason::DropTruncated);
    };
    let ty = ld8(icmp);
    if ty == 128 {
        return echo_reply(ctx, frame, l4);
    }
    if !(1..=3).contains(&ty) {
        return drop(Reason::DropIcmp);
    }
    let inner = l4 + 8;
    if inner + 40 > ip_end {
        return drop(Reason::DropTruncated);
    }
    let Some(iip) = check(ctx, inner, 40) else {
        return drop(Reason::DropTruncated);
    };
    if ld8(iip) >> 4 != 6 {
        return drop(Reason::DropBadHeader);
    }
    let proto = ld8(iip + 6);
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return drop(Reason::DropIcmp);
    }
    let (isrc, idst) = (ld_addr6(iip + 8), ld_addr6(iip + 24));
    quoted_flow(ctx, frame, isrc, idst, proto, inner + 40, ip_end)
}

/// The quoted packet went VIP → client; its reverse is the client's flow.
#[inline(always)]
fn quoted_flow(
    ctx: &XdpContext,
    frame: &Frame,
    isrc: [u32; 4],
    idst: [u32; 4],
    proto: u8,
    ports: usize,
    ip_end: usize,
) -> Verdict {
    if ports + 4 > ip_end {
        return drop(Reason::DropTruncated);
    }
    let Some(p) = check(ctx, ports, 4) else {
        return drop(Reason::DropTruncated);
    };
    let (isport, idport) = (ld16(p), ld16(p + 2));
    let key = VipKey { addr: isrc, port: isport, proto, family: frame.family };
    let Some(vip) = VIPS.get_ptr(&key) else {
        return drop(Reason::DropIcmp);
    };
    let flow = FlowKey {
        src: idst,
        dst: isrc,
        sport: idport,
        dport: isport,
        proto,
        family: frame.family,
        _pad: [0; 2],
    };
    to_backend(ctx, frame, &flow, unsafe { &*vip }, conn_of(&flow), true)
}

/// Connection table first, then the VIP's Maglev ring.
#[inline(always)]
fn to_backend(
    ctx: &XdpContext,
    frame: &Frame,
    flow: &FlowKey,
    vip: &VipMeta,
    conn: Option<ConnVal>,
    icmp: bool,
) -> Verdict {
    let Some(cfg) = CONFIG.get(0) else {
        return drop(Reason::DropNoConfig);
    };
    let (id, be, new) = match select(flow, vip, cfg, conn, !icmp) {
        Ok(sel) => sel,
        Err(r) => {
            bump_counters(&VIP_STATS, vip.id, frame.len as u64, false);
            return drop(r);
        }
    };
    let to = To { vip: vip.id, forwarding: vip.forwarding, backend: id };
    send(ctx, frame, flow, &to, be, cfg, new && !icmp, icmp)
}

#[inline(always)]
fn select<'a>(
    flow: &FlowKey,
    vip: &VipMeta,
    cfg: &Config,
    conn: Option<ConnVal>,
    insert: bool,
) -> Result<(u32, &'a Backend, bool), Reason> {
    if let Some(c) = conn {
        if let Some(be) = BACKENDS.get(c.backend).filter(|be| keeps_flows(be)) {
            // An entry from the VIP's earlier life under another id: adopt it.
            if insert && c.vip != vip.id {
                let _ = CONNS.insert(flow, ConnVal { backend: c.backend, vip: vip.id }, 0);
            }
            return Ok((c.backend, be, false));
        }
    }
    if vip.ring_size == 0 {
        return Err(Reason::DropNoBackend);
    }
    let hash = flow_hash(cfg.hash_seed, flow, vip.flags & VIP_F_AFFINITY != 0);
    let slot = vip.ring_base.wrapping_add(ring_slot(hash, vip.ring_size));
    let Some(pair) = RINGS.get(slot >> 1) else {
        return Err(Reason::DropNoBackend);
    };
    let id = pair[(slot & 1) as usize];
    let Some(be) = BACKENDS.get(id) else {
        return Err(Reason::DropNoBackend);
    };
    if be.state == BACKEND_EMPTY {
        return Err(Reason::DropNoBackend);
    }
    if insert {
        let _ = CONNS.insert(flow, ConnVal { backend: id, vip: vip.id }, 0);
    }
    Ok((id, be, true))
}
