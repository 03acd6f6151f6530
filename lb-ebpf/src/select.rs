//! Backend selection: the connection table first, then the VIP's Maglev ring; then the
//! packet is forwarded (`forward`) and counted.
use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use lb_common::*;

use crate::{
    forward::{forward, Frame, Second},
    maps::{bump_counters, BACKENDS, BE_STATS, CONFIG, CONNS, RINGS, VIP_INFO, VIP_STATS},
    parse::{drop, Verdict},
};

/// What selection needs to know of a TCP segment (UDP: neither).
#[derive(Clone, Copy)]
pub struct Segment {
    /// SYN without ACK: the first packet of a connection.
    pub syn: bool,
    /// FIN or RST: the client is closing.
    pub closing: bool,
}

impl Segment {
    pub const UDP: Segment = Segment {
        syn: false,
        closing: false,
    };

    #[inline(always)]
    pub fn tcp(flags: u8) -> Segment {
        const FIN: u8 = 0x01;
        const SYN: u8 = 0x02;
        const RST: u8 = 0x04;
        const ACK: u8 = 0x10;
        Segment {
            syn: flags & (SYN | ACK) == SYN,
            closing: flags & (FIN | RST) != 0,
        }
    }

    #[inline(always)]
    fn flags(&self) -> u8 {
        if self.closing {
            CONN_F_CLOSING
        } else {
            0
        }
    }
}

/// The flow's connection-table entry (a pointer into the map: a hit refreshes it).
#[inline(always)]
pub fn conn_of(flow: &FlowKey) -> Option<*mut ConnVal> {
    CONNS.get_ptr_mut(flow)
}

/// The backend of an entry, if the entry still holds: the backend keeps flows (up or
/// draining) and still belongs to the entry's VIP `vip`.
#[inline(always)]
fn holds<'a>(c: &ConnVal, vip: u32) -> Option<&'a Backend> {
    if c.vip as u32 != vip {
        return None;
    }
    BACKENDS
        .get(c.backend)
        .filter(|be| (be.state == BACKEND_UP || be.state == BACKEND_DRAINING) && be.vip == vip)
}

/// A packet of an established flow: refresh the entry's time (at most once a second) and
/// note a FIN or RST.
#[inline(always)]
fn touch(c: *mut ConnVal, seg: Segment) {
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    unsafe {
        if now.wrapping_sub((*c).atime) >= ATIME_GRANULARITY_NS {
            (*c).atime = now;
        }
        if seg.closing && (*c).flags & CONN_F_CLOSING == 0 {
            (*c).flags |= CONN_F_CLOSING;
        }
    }
}

/// Established flow fast path: the entry names its VIP, `VIP_INFO` confirms that VIP still
/// has this key (an array read instead of the `VIPS` hash lookup). Same result as the full
/// path ([`to_backend`]), which handles everything else (`None`).
#[inline(always)]
pub fn established(
    ctx: &XdpContext,
    frame: &Frame,
    flow: &FlowKey,
    key: &VipKey,
    conn: Option<*mut ConnVal>,
    seg: Segment,
) -> Option<Verdict> {
    let c = conn?;
    let (vip, backend) = unsafe { ((*c).vip as u32, (*c).backend) };
    let info = VIP_INFO.get(vip)?;
    if info.live == 0 || info.key != *key {
        return None;
    }
    let be = holds(unsafe { &*c }, vip)?;
    let Some(cfg) = CONFIG.get(0) else {
        return Some(drop(Reason::DropNoConfig));
    };
    touch(c, seg);
    let to = To {
        vip,
        forwarding: info.forwarding,
        backend,
    };
    Some(send(
        ctx,
        frame,
        flow,
        &to,
        be,
        cfg,
        false,
        false,
        Second::CONNTRACK,
    ))
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
    second: Second,
) -> Verdict {
    bump_counters(&VIP_STATS, to.vip, frame.len as u64, new);
    let verdict = forward(ctx, frame, flow, to.forwarding, be, cfg, icmp, &second);
    if verdict.1 == Reason::TxForward || verdict.1 == Reason::TxIcmpForward {
        bump_counters(&BE_STATS, to.backend, frame.len as u64, new);
    }
    verdict
}

/// Connection table first, then the VIP's Maglev ring. `seg` is the TCP/UDP segment, or
/// `None` for an ICMP error about the flow (which never creates or refreshes an entry).
#[inline(always)]
pub fn to_backend(
    ctx: &XdpContext,
    frame: &Frame,
    flow: &FlowKey,
    vip: &VipMeta,
    conn: Option<*mut ConnVal>,
    seg: Option<Segment>,
) -> Verdict {
    let Some(cfg) = CONFIG.get(0) else {
        return drop(Reason::DropNoConfig);
    };
    let icmp = seg.is_none();
    let (id, be, new, second) = match select(flow, vip, cfg, conn, seg) {
        Ok(sel) => sel,
        Err(r) => {
            bump_counters(&VIP_STATS, vip.id, frame.len as u64, false);
            return drop(r);
        }
    };
    let to = To {
        vip: vip.id,
        forwarding: vip.forwarding,
        backend: id,
    };
    send(ctx, frame, flow, &to, be, cfg, new, icmp, second)
}

#[inline(always)]
fn select<'a>(
    flow: &FlowKey,
    vip: &VipMeta,
    cfg: &Config,
    conn: Option<*mut ConnVal>,
    seg: Option<Segment>,
) -> Result<(u32, &'a Backend, bool, Second), Reason> {
    let stateless = vip.flags & VIP_F_STATELESS != 0;
    if let Some(c) = conn.filter(|_| !stateless) {
        if let Some(be) = holds(unsafe { &*c }, vip.id) {
            if let Some(seg) = seg {
                touch(c, seg);
            }
            return Ok((unsafe { (*c).backend }, be, false, Second::CONNTRACK));
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
    let word = pair[(slot & 1) as usize];
    let id = ring_primary(word);
    let Some(be) = BACKENDS.get(id) else {
        return Err(Reason::DropNoBackend);
    };
    if be.state == BACKEND_EMPTY {
        return Err(Reason::DropNoBackend);
    }
    if stateless {
        // No table: the slot's secondary travels with the packet, if it still holds
        // connections (up or draining) in this VIP and shares the primary's family.
        let sid = ring_secondary(word);
        let second = if sid == id {
            None
        } else {
            BACKENDS.get(sid).filter(|s| {
                (s.state == BACKEND_UP || s.state == BACKEND_DRAINING)
                    && s.vip == vip.id
                    && s.family == be.family
            })
        };
        let new = matches!(seg, Some(s) if s.syn);
        return Ok((
            id,
            be,
            new,
            Second {
                stateless: true,
                addr: second.map(|s| s.addr),
            },
        ));
    }
    let Some(seg) = seg else {
        return Ok((id, be, false, Second::CONNTRACK));
    };
    if seg.syn {
        // A bare SYN creates no entry (the ring routes the handshake's next packet the same
        // way): a SYN flood cannot push established flows out of the table. An entry of
        // the same 5-tuple is an earlier connection's (a reused port): it goes, or the
        // next packet would follow it. Looked up first: a flood's SYNs miss, lock-free.
        if CONNS.get_ptr(flow).is_some() {
            let _ = CONNS.remove(flow);
        }
        return Ok((id, be, false, Second::CONNTRACK));
    }
    let entry = ConnVal {
        backend: id,
        vip: vip.id as u16,
        flags: seg.flags(),
        _pad: 0,
        atime: unsafe { bpf_ktime_get_coarse_ns() },
    };
    let _ = CONNS.insert(flow, &entry, 0);
    Ok((id, be, true, Second::CONNTRACK))
}
