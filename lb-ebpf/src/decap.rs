//! `decap`, for backends: strip our IPIP / IP6IP6 / 4-in-6 / GUE encapsulation so the
//! inner packet (client → VIP) reaches the backend's stack as if it had been routed there.
//! This kernel has no IPIP, FOU or GUE devices, so the backends do it in XDP.
//!
//! A stateless VIP's packet (GUE variant 0 with our private data) may carry a second
//! chance: when it belongs to no connection of this host, it is sent on once to the
//! secondary backend it names instead (docs/dataplane.md, "decap: the second chance").
use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, bpf_sock, bpf_sock_tuple, xdp_action::*,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_F_CURRENT_NETNS,
    },
    helpers::{
        bpf_fib_lookup, bpf_redirect, bpf_sk_release, bpf_skc_lookup_tcp, bpf_tcp_check_syncookie,
        bpf_xdp_adjust_head,
    },
    programs::XdpContext,
};
use lb_common::{
    DecapReason, GUE_F_REDIRECTED, GUE_F_SECOND, GUE_LB_MAGIC, GUE_PORT, OUTER_TTL, PROTO_ICMP,
    PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
};

use crate::{csum::fold, pkt::*};

/// TCP states as `bpf_sock::state` reports them (include/net/tcp_states.h).
const TCP_LISTEN: u32 = 10;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Our private data in a GUE variant 0 header: where it is and its flags byte.
struct Chance {
    /// Offset of the private data ("LB", flags, 0, secondary address).
    at: usize,
    flags: u8,
}

#[inline(always)]
pub fn decap(ctx: &XdpContext) -> (u32, DecapReason) {
    const PASS: (u32, DecapReason) = (XDP_PASS, DecapReason::Pass);
    const BAD: (u32, DecapReason) = (XDP_DROP, DecapReason::DropMalformed);
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
    let outer6 = et == ETH_P_IPV6;
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
    } else if outer6 {
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
    let mut chance = None;
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
            let g = inner + 8;
            // Verifier: a 1-byte check compiles to `end > p`, which proves no range; check
            // the 4 bytes of a GUE header.
            let Some(udp) = check(ctx, inner, 12) else {
                return BAD;
            };
            let first = ld8(udp + 8);
            match first >> 6 {
                // Variant 1: the inner IP header right after UDP.
                1 => (g, first >> 4),
                // Variant 0: 4 bytes, then `hlen` words (ours: private data), then the
                // packet of protocol `proto`. C (control) set is not data: malformed.
                0 => {
                    if first & 0x20 != 0 {
                        return BAD;
                    }
                    let hlen = ((first & 0x1f) as usize) << 2;
                    let family = match ld8(udp + 9) {
                        4 => 4,
                        41 => 6,
                        _ => return BAD,
                    };
                    let ours = if outer6 { 20 } else { 8 };
                    if hlen == ours {
                        if let Some(pd) = check(ctx, g + 4, 20) {
                            let m = ld16(pd);
                            if m == u16::from_ne_bytes(GUE_LB_MAGIC) {
                                chance = Some(Chance {
                                    at: g + 4,
                                    flags: ld8(pd + 2),
                                });
                            }
                        }
                    }
                    (g + 4 + hlen, family)
                }
                _ => return BAD,
            }
        }
        _ => return PASS,
    };
    let need = match family {
        4 => 20,
        6 => 40,
        _ => return BAD,
    };
    if check(ctx, inner, need).is_none() {
        return BAD;
    }
    let mut reason = DecapReason::Decapped;
    if let Some(c) = chance {
        if local(ctx, inner, family) == Some(false) {
            if c.flags & GUE_F_SECOND != 0 && c.flags & GUE_F_REDIRECTED == 0 {
                return redirect(ctx, l3, outer6, c.at);
            }
            reason = DecapReason::NoSecondChance;
        }
    }
    let Some(old) = check(ctx, 0, 18) else {
        return BAD;
    };
    let (dst, src, tag) = (Mac::load(old), Mac::load(old + 6), ld16(old + 14));
    let strip = inner - l3;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, strip as i32) } != 0 {
        return BAD;
    }
    let Some(p) = check(ctx, 0, l3) else {
        return BAD;
    };
    let et = if family == 4 { ETH_P_IP } else { ETH_P_IPV6 };
    write_eth(p, l3, dst, src, tag, et);
    (XDP_PASS, reason)
}

/// Whether the inner packet at `inner` belongs on this host: `Some(true)` for a SYN (a new
/// connection starts where the ring sent it) or a segment of a socket this host has
/// (established, request or TIME_WAIT, or an ACK whose SYN cookie a listener accepts);
/// `Some(false)` for a TCP segment of no connection here; `None` when it is not TCP (an
/// ICMP error, an IPv6 extension header): accepted as it is.
#[inline(always)]
fn local(ctx: &XdpContext, inner: usize, family: u8) -> Option<bool> {
    let (ip, th, tuple, iph_len) = if family == 4 {
        let ip = check(ctx, inner, 20)?;
        let vihl = ld8(ip);
        let ihl = ((vihl & 0xf) as usize) << 2;
        if ihl < 20 || u16::from_be(ld16(ip + 6)) & 0x3fff != 0 {
            return None;
        }
        let proto = ld8(ip + 9);
        if proto == PROTO_ICMP {
            return icmp_local(ctx, inner + ihl, 4);
        }
        if proto != PROTO_TCP {
            return None;
        }
        let th = check(ctx, inner + ihl, 20)?;
        let tuple = Tuple::v4(ld32(ip + 12), ld32(ip + 16), ld16(th), ld16(th + 2));
        (ip, th, tuple, 20u32)
    } else {
        let ip = check(ctx, inner, 40)?;
        let next = ld8(ip + 6);
        if next == PROTO_ICMPV6 {
            return icmp_local(ctx, inner + 40, 6);
        }
        if next != PROTO_TCP {
            return None;
        }
        let th = check(ctx, inner + 40, 20)?;
        let tuple = Tuple::v6(ld_addr6(ip + 8), ld_addr6(ip + 24), ld16(th), ld16(th + 2));
        (ip, th, tuple, 40u32)
    };
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    if ld8(th + 13) & (SYN | ACK) == SYN {
        return Some(true);
    }
    // A listener matches any tuple: only an ACK carrying a valid SYN cookie (the listener
    // overflowed and answered statelessly) makes the connection this host's.
    Some(tuple.ask(ctx, |sk| unsafe {
        (*sk).state != TCP_LISTEN
            || bpf_tcp_check_syncookie(sk as *mut _, ip as *mut _, iph_len, th as *mut _, 20) == 0
    }))
}

/// A socket lookup's key: the packet's source (the remote end) and destination (here).
struct Tuple {
    tuple: bpf_sock_tuple,
    size: u32,
}

impl Tuple {
    #[inline(always)]
    fn v4(saddr: u32, daddr: u32, sport: u16, dport: u16) -> Tuple {
        let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
        let t = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
        (t.saddr, t.daddr, t.sport, t.dport) = (saddr, daddr, sport, dport);
        Tuple { tuple, size: 12 }
    }

    #[inline(always)]
    fn v6(saddr: [u32; 4], daddr: [u32; 4], sport: u16, dport: u16) -> Tuple {
        let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
        let t = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
        (t.saddr, t.daddr, t.sport, t.dport) = (saddr, daddr, sport, dport);
        Tuple { tuple, size: 36 }
    }

    /// Whether this host has the connection: no socket → false; else what `here` says of
    /// the socket found (listener, request, TIME_WAIT or full), which is released after.
    #[inline(always)]
    fn ask(mut self, ctx: &XdpContext, here: impl FnOnce(*mut bpf_sock) -> bool) -> bool {
        let sk = unsafe {
            bpf_skc_lookup_tcp(
                ctx.ctx as *mut _,
                &mut self.tuple,
                self.size,
                BPF_F_CURRENT_NETNS as u64,
                0,
            )
        };
        if sk.is_null() {
            return false;
        }
        let r = here(sk);
        unsafe { bpf_sk_release(sk as *mut _) };
        r
    }
}

/// An ICMP error (IPv4 types 3, 11; ICMPv6 1-3) quoting a TCP segment this host sent (VIP
/// to client): `Some(true)` when the quoted connection has a socket here (not a listener),
/// `Some(false)` when not (the connection may be the secondary's: a path-MTU error must
/// reach it); `None` for any other ICMP, or a quote too short to tell.
#[inline(always)]
fn icmp_local(ctx: &XdpContext, l4: usize, family: u8) -> Option<bool> {
    let icmp = check(ctx, l4, 8)?;
    let ty = ld8(icmp);
    let error = if family == 4 {
        ty == 3 || ty == 11
    } else {
        (1..=3).contains(&ty)
    };
    if !error {
        return None;
    }
    let q = l4 + 8;
    // The quote went from here to the client: the socket's remote end is its destination.
    let tuple = if family == 4 {
        let qh = check(ctx, q, 20)?;
        let vihl = ld8(qh);
        let qihl = ((vihl & 0xf) as usize) << 2;
        if vihl >> 4 != 4 || qihl < 20 || ld8(qh + 9) != PROTO_TCP {
            return None;
        }
        let p = check(ctx, q + qihl, 4)?;
        Tuple::v4(ld32(qh + 16), ld32(qh + 12), ld16(p + 2), ld16(p))
    } else {
        let qh = check(ctx, q, 40)?;
        if ld8(qh) >> 4 != 6 || ld8(qh + 6) != PROTO_TCP {
            return None;
        }
        let p = check(ctx, q + 40, 4)?;
        Tuple::v6(ld_addr6(qh + 24), ld_addr6(qh + 8), ld16(p + 2), ld16(p))
    };
    Some(tuple.ask(ctx, |sk| unsafe { (*sk).state != TCP_LISTEN }))
}

/// Send the packet on to the secondary it carries, marked redirected: outer destination :=
/// the secondary, hop limit / TTL := 64, Ethernet from a FIB lookup. No route or
/// neighbour yet: the stack forwards it (and resolves the neighbour for the next one).
#[inline(always)]
fn redirect(ctx: &XdpContext, l3: usize, outer6: bool, pd: usize) -> (u32, DecapReason) {
    const BAD: (u32, DecapReason) = (XDP_DROP, DecapReason::DropMalformed);
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    fib.ifindex = ingress;
    fib.l4_protocol = PROTO_UDP;
    if outer6 {
        let (Some(ip), Some(p)) = (check_fresh(ctx, l3, 40), check_fresh(ctx, pd, 20)) else {
            return BAD;
        };
        st16(
            p + 2,
            u16::from_ne_bytes([ld8(p + 2) | GUE_F_REDIRECTED, ld8(p + 3)]),
        );
        let second = ld_addr6(p + 4);
        st32(ip + 24, second[0]);
        st32(ip + 28, second[1]);
        st32(ip + 32, second[2]);
        st32(ip + 36, second[3]);
        st16(ip + 6, u16::from_ne_bytes([ld8(ip + 6), OUTER_TTL]));
        fib.family = AF_INET6;
        fib.__bindgen_anon_1.tot_len = u16::from_be(ld16(ip + 4)) + 40;
        fib.__bindgen_anon_3.ipv6_src = ld_addr6(ip + 8);
        fib.__bindgen_anon_4.ipv6_dst = second;
    } else {
        // Verifier: 28 bytes, not the header's 20: the UDP checksum at +26 is written below.
        let (Some(ip), Some(p)) = (check_fresh(ctx, l3, 28), check_fresh(ctx, pd, 8)) else {
            return BAD;
        };
        // Our LB writes a 20-byte header; anything else keeps its checksum honest by
        // the full sum below, so options are refused rather than summed.
        if ld8(ip) != 0x45 {
            return BAD;
        }
        st16(
            p + 2,
            u16::from_ne_bytes([ld8(p + 2) | GUE_F_REDIRECTED, ld8(p + 3)]),
        );
        let second = ld32(p + 4);
        st32(ip + 16, second);
        st16(ip + 8, u16::from_ne_bytes([OUTER_TTL, ld8(ip + 9)]));
        st16(ip + 10, 0);
        let mut sum = 0u64;
        let mut i = 0;
        while i < 20 {
            sum += ld16(ip + i) as u64;
            i += 2;
        }
        st16(ip + 10, fold(sum));
        // An IPv4 UDP checksum may be 0; ours is, and a changed header would void another.
        st16(ip + 26, 0);
        fib.family = AF_INET;
        fib.__bindgen_anon_1.tot_len = u16::from_be(ld16(ip + 2));
        fib.__bindgen_anon_3.ipv4_src = ld32(ip + 12);
        fib.__bindgen_anon_4.ipv4_dst = second;
    }
    // A tagged frame: the FIB would name the VLAN device, to which XDP cannot send (the
    // packet would be lost at the redirect): the stack sends it.
    if l3 != 14 {
        return (XDP_PASS, DecapReason::RedirectedStack);
    }
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return (XDP_PASS, DecapReason::RedirectedStack);
    }
    let Some(eth) = check_fresh(ctx, 0, 12) else {
        return BAD;
    };
    Mac::from_bytes(&fib.dmac).store(eth);
    Mac::from_bytes(&fib.smac).store(eth + 6);
    if fib.ifindex == ingress {
        return (XDP_TX, DecapReason::Redirected);
    }
    (
        unsafe { bpf_redirect(fib.ifindex, 0) } as u32,
        DecapReason::Redirected,
    )
}
