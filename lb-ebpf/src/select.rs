//! Backend selection: the connection table first, then the VIP's Maglev ring; then the
//! packet is forwarded (`forward`) and counted.
use aya_ebpf::programs::XdpContext;
use lb_common::*;

use crate::{
    forward::{forward, Frame},
    maps::{bump_counters, BACKENDS, BE_STATS, CONFIG, CONNS, RINGS, VIP_INFO, VIP_STATS},
    parse::{drop, Verdict},
};

/// The flow's connection-table entry, copied out.
#[inline(always)]
pub fn conn_of(flow: &FlowKey) -> Option<ConnVal> {
    CONNS.get_ptr(flow).map(|c| unsafe { *c })
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
    conn: Option<ConnVal>,
) -> Option<Verdict> {
    let c = conn?;
    let info = VIP_INFO.get(c.vip)?;
    if info.live == 0 || info.key != *key {
        return None;
    }
    let be = BACKENDS.get(c.backend).filter(|be| keeps_flows(be))?;
    let Some(cfg) = CONFIG.get(0) else {
        return Some(drop(Reason::DropNoConfig));
    };
    let to = To {
        vip: c.vip,
        forwarding: info.forwarding,
        backend: c.backend,
    };
    Some(send(ctx, frame, flow, &to, be, cfg, false, false))
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

/// Connection table first, then the VIP's Maglev ring.
#[inline(always)]
pub fn to_backend(
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
    let to = To {
        vip: vip.id,
        forwarding: vip.forwarding,
        backend: id,
    };
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
                let _ = CONNS.insert(
                    flow,
                    ConnVal {
                        backend: c.backend,
                        vip: vip.id,
                    },
                    0,
                );
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
        let _ = CONNS.insert(
            flow,
            ConnVal {
                backend: id,
                vip: vip.id,
            },
            0,
        );
    }
    Ok((id, be, true))
}
