//! `hc_encap` (tc egress on the LB's interface): the agent's health probes that carry the
//! mark `HC_MARK | backend id` leave exactly as the data plane sends client traffic to
//! that backend: encapsulated (IPIP / GUE, same outer source, entropy, TTL) or, for
//! `l2dsr`, with the backend's MAC. A passing check then proves the whole path: the
//! backend holds the VIP, runs its decap, and its server answers on the VIP. (Katran's
//! healthchecking program does the same.) Everything else passes untouched.
use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, TC_ACT_OK, TC_ACT_SHOT,
    },
    programs::TcContext,
};
use lb_common::*;

use crate::{
    csum::fold,
    maps::{BACKENDS, CONFIG, VIP_INFO},
    pkt::w,
};

pub type HcVerdict = (i32, HcReason);

fn shot(r: HcReason) -> HcVerdict {
    (TC_ACT_SHOT as i32, r)
}

#[inline(always)]
pub fn hc_encap(ctx: &TcContext) -> HcVerdict {
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & HC_MARK_MASK != HC_MARK {
        return (TC_ACT_OK as i32, HcReason::Pass);
    }
    let id = mark & !HC_MARK_MASK;
    let Some(be) = BACKENDS.get(id) else {
        return shot(HcReason::DropNoBackend);
    };
    if be.state == BACKEND_EMPTY || be.state == BACKEND_RETIRED {
        return shot(HcReason::DropNoBackend);
    }
    let Some(info) = VIP_INFO.get(be.vip) else {
        return shot(HcReason::DropNoBackend);
    };
    if info.live == 0 {
        return shot(HcReason::DropNoBackend);
    }
    let Some(cfg) = CONFIG.get(0) else {
        return shot(HcReason::DropNoBackend);
    };
    let mac = if be.mac == [0; 6] { cfg.gw_mac } else { be.mac };
    // The probe as the kernel built it: Ethernet, then IPv4 or IPv6 (no options, no
    // extension headers: it is ours), then TCP or UDP.
    let Ok(et) = ctx.load::<u16>(12) else {
        return shot(HcReason::DropMalformed);
    };
    let inner4 = et == 0x0800u16.to_be();
    if !inner4 && et != 0x86DDu16.to_be() {
        return shot(HcReason::DropMalformed);
    }
    // Flow entropy from the probe's source address and port, as for a client's flow.
    let mut flow = FlowKey::default();
    let ok = if inner4 {
        ctx.load::<u32>(14 + 12).map(|a| flow.src[0] = a).is_ok()
            && ctx.load::<u16>(14 + 20).map(|p| flow.sport = p).is_ok()
    } else {
        ctx.load::<[u32; 4]>(14 + 8).map(|a| flow.src = a).is_ok()
            && ctx.load::<u16>(14 + 40).map(|p| flow.sport = p).is_ok()
    };
    if !ok {
        return shot(HcReason::DropMalformed);
    }
    let inner_len = ctx.len() - 14;
    let (tos, inner_proto) = if inner4 {
        (ctx.load::<u8>(14 + 1).unwrap_or(0), 4u8)
    } else {
        let v = ctx.load::<u16>(14).unwrap_or(0).to_be();
        ((v >> 4) as u8, 41u8)
    };
    if info.forwarding == Forwarding::L2Dsr as u8 {
        if ctx.store(0, &mac, 0).is_err() {
            return shot(HcReason::DropHelper);
        }
        return (TC_ACT_OK as i32, HcReason::SentL2);
    }
    let outer6 = be.family == FAMILY_V6;
    let gue = info.forwarding == Forwarding::Gue as u8;
    let ip_hdr: u32 = if outer6 { 40 } else { 20 };
    let overhead = ip_hdr + if gue { 8 } else { 0 };
    let flags = if outer6 {
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV6
    } else {
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
    } as u64
        | if gue {
            BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
        } else {
            0
        };
    if ctx
        .adjust_room(overhead as i32, BPF_ADJ_ROOM_MAC, flags)
        .is_err()
    {
        return shot(HcReason::DropHelper);
    }
    let entropy = flow_entropy(&flow);
    let next = if gue { PROTO_UDP } else { inner_proto };
    let outer_et: u16 = if outer6 {
        0x86DDu16.to_be()
    } else {
        0x0800u16.to_be()
    };
    if ctx.store(0, &mac, 0).is_err() || ctx.store(12, &outer_et, 0).is_err() {
        return shot(HcReason::DropHelper);
    }
    let stored = if outer6 {
        let fl = entropy & 0xf_ffff;
        let pl = (inner_len + overhead - 40) as u16;
        let hdr: [u32; 10] = [
            w(
                0x60 | (tos >> 4),
                (tos << 4) | (fl >> 16) as u8,
                (fl >> 8) as u8,
                fl as u8,
            ),
            w((pl >> 8) as u8, pl as u8, next, OUTER_TTL),
            cfg.src6[0],
            cfg.src6[1],
            cfg.src6[2],
            (cfg.src6[3] & !cfg.src6_mask) | (entropy & cfg.src6_mask),
            be.addr[0],
            be.addr[1],
            be.addr[2],
            be.addr[3],
        ];
        ctx.store(14, &hdr, 0)
    } else {
        let tl = (inner_len + overhead) as u16;
        let w0 = w(0x45, tos, (tl >> 8) as u8, tl as u8);
        let w2 = w(OUTER_TTL, next, 0, 0);
        let src = (cfg.src4 & !cfg.src4_mask) | (entropy & cfg.src4_mask);
        let c = fold(w0 as u64 + w2 as u64 + src as u64 + be.addr[0] as u64).to_ne_bytes();
        let hdr: [u32; 5] = [w0, 0, w(OUTER_TTL, next, c[0], c[1]), src, be.addr[0]];
        ctx.store(14, &hdr, 0)
    };
    if stored.is_err() {
        return shot(HcReason::DropHelper);
    }
    if gue {
        let sport = 0xc000 | (entropy & 0x3fff) as u16;
        let ulen = (inner_len + 8) as u16;
        let udp: [u32; 2] = [
            w(
                (sport >> 8) as u8,
                sport as u8,
                (GUE_PORT >> 8) as u8,
                GUE_PORT as u8,
            ),
            w((ulen >> 8) as u8, ulen as u8, 0, 0),
        ];
        if ctx.store(14 + ip_hdr as usize, &udp, 0).is_err() {
            return shot(HcReason::DropHelper);
        }
    }
    (TC_ACT_OK as i32, HcReason::Sent)
}
