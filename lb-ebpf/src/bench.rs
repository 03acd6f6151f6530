//! The benchmark tools' XDP programs, a separate object (`lb-bench-ebpf`) so that nothing
//! of them loads with the product:
//! - `gen`: the packet generator, run by BPF_PROG_TEST_RUN in live-frames mode on the
//!   generator's veth; writes a whole frame of flow `i` (see `lb_common::bench`) and
//!   returns XDP_TX, which the kernel turns into a transmission on that veth.
//! - `count`: the receiver, on the same veth: tallies each frame that comes back by the
//!   last byte of its (outer) destination address, and drops it.
//! - `fwd`: the baseline "LB": swaps the MAC addresses and returns XDP_TX.
#![no_std]
#![no_main]

#[path = "csum.rs"]
#[allow(dead_code)]
mod csum;
#[path = "pkt.rs"]
#[allow(dead_code)]
mod pkt;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    bench::{GenConfig, GEN_SPORT_BASE, RX_BUCKETS, RX_NOT_IP},
    PROTO_TCP,
};
use pkt::{check, ld16, ld8, st16, st32, Mac, ETH_P_IP, ETH_P_IPV6};

#[map]
static GEN_CFG: Array<GenConfig> = Array::with_max_entries(1, 0);
/// Frames generated on each CPU (the next frame's number).
#[map]
static GEN_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
/// Frames received, per bucket (`lb_common::bench::RX_BUCKETS`).
#[map]
static RX_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(RX_BUCKETS, 0);

/// `word` (raw) with `add` added to the 16-bit big-endian number in its last two bytes.
#[inline(always)]
fn add_low16(word: u32, add: u32) -> u32 {
    let v = u16::from_be((word >> 16) as u16).wrapping_add(add as u16);
    (word & 0xffff) | ((v.to_be() as u32) << 16)
}

#[xdp]
pub fn gen(ctx: XdpContext) -> u32 {
    let Some(cfg) = GEN_CFG.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let Some(seq) = GEN_SEQ.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let n = unsafe {
        let n = *seq;
        *seq = n + 1;
        n
    };
    let flow = if cfg.flows == 0 {
        n as u32
    } else {
        (n % cfg.flows as u64) as u32
    }
    .wrapping_add(cfg.flow_base);
    let sport = (GEN_SPORT_BASE + (flow & 0x7fff) as u16).to_be();
    let addr_off = flow >> 15;
    let l4_len = cfg.frame_len as u32;
    let tcp = cfg.proto == PROTO_TCP;
    let (l3, et) = if cfg.family == 6 {
        (40usize, ETH_P_IPV6)
    } else {
        (20usize, ETH_P_IP)
    };
    let Some(p) = check(&ctx, 0, 14 + 40 + 20) else {
        // Shorter than the longest header: only IPv4 can fit.
        return gen_short(&ctx, cfg, sport, addr_off);
    };
    Mac::from_bytes(&cfg.dst_mac).store(p);
    Mac::from_bytes(&cfg.src_mac).store(p + 6);
    st16(p + 12, et);
    let l4_len = l4_len - 14 - l3 as u32;
    let ip = p + 14;
    if cfg.family == 6 {
        st32(ip, pkt::w(0x60, 0, 0, 0));
        st16(ip + 4, (l4_len as u16).to_be());
        st16(ip + 6, u16::from_ne_bytes([cfg.proto, 64]));
        st32(ip + 8, cfg.src[0]);
        st32(ip + 12, cfg.src[1]);
        st32(ip + 16, cfg.src[2]);
        st32(ip + 20, add_low16(cfg.src[3], addr_off));
        st32(ip + 24, cfg.dst[0]);
        st32(ip + 28, cfg.dst[1]);
        st32(ip + 32, cfg.dst[2]);
        st32(ip + 36, cfg.dst[3]);
        write_l4(p + 54, cfg, sport, tcp, l4_len);
    } else {
        write_ip4(ip, cfg, addr_off, l4_len);
        write_l4(p + 34, cfg, sport, tcp, l4_len);
    }
    xdp_action::XDP_TX
}

/// A frame too short for an IPv6 header: IPv4 only (checked for its own length).
#[inline(always)]
fn gen_short(ctx: &XdpContext, cfg: &GenConfig, sport: u16, addr_off: u32) -> u32 {
    let tcp = cfg.proto == PROTO_TCP;
    let Some(p) = check(ctx, 0, 14 + 20 + 20) else {
        return xdp_action::XDP_ABORTED;
    };
    if cfg.family != 4 || (!tcp && cfg.frame_len < 42) {
        return xdp_action::XDP_ABORTED;
    }
    Mac::from_bytes(&cfg.dst_mac).store(p);
    Mac::from_bytes(&cfg.src_mac).store(p + 6);
    st16(p + 12, ETH_P_IP);
    let l4_len = cfg.frame_len as u32 - 34;
    write_ip4(p + 14, cfg, addr_off, l4_len);
    write_l4(p + 34, cfg, sport, tcp, l4_len);
    xdp_action::XDP_TX
}

#[inline(always)]
fn write_ip4(ip: usize, cfg: &GenConfig, addr_off: u32, l4_len: u32) {
    let w0 = pkt::w(0x45, 0, 0, 0) | (((20 + l4_len) as u16).to_be() as u32) << 16;
    let w1 = pkt::w(0, 0, 0x40, 0); // id 0, DF
    let w2 = u16::from_ne_bytes([64, cfg.proto]) as u32; // checksum 0 for the sum
    let src = add_low16(cfg.src[0], addr_off);
    let dst = cfg.dst[0];
    let sum = w0 as u64 + w1 as u64 + w2 as u64 + src as u64 + dst as u64;
    st32(ip, w0);
    st32(ip + 4, w1);
    st32(ip + 8, w2 | (csum::fold(sum) as u32) << 16);
    st32(ip + 12, src);
    st32(ip + 16, dst);
}

/// TCP (20 bytes, no options) or UDP header; L4 checksums are left zero (the LB does not
/// read them, and nothing delivers these frames to a socket).
#[inline(always)]
fn write_l4(l4: usize, cfg: &GenConfig, sport: u16, tcp: bool, l4_len: u32) {
    st16(l4, sport);
    st16(l4 + 2, cfg.dst_port.to_be());
    if tcp {
        st32(l4 + 4, 0x0100_0000); // seq 1
        st32(l4 + 8, 0);
        st16(l4 + 12, u16::from_ne_bytes([0x50, cfg.tcp_flags]));
        st16(l4 + 14, 0xffff);
        st32(l4 + 16, 0);
    } else {
        st16(l4 + 4, (l4_len as u16).to_be());
        st16(l4 + 6, 0);
    }
}

#[xdp]
pub fn count(ctx: XdpContext) -> u32 {
    let mut bucket = RX_NOT_IP;
    if let Some(p) = check(&ctx, 0, 14) {
        let et = ld16(p + 12);
        if et == ETH_P_IP {
            if let Some(p) = check(&ctx, 0, 34) {
                bucket = ld8(p + 33) as u32;
            }
        } else if et == ETH_P_IPV6 {
            if let Some(p) = check(&ctx, 0, 54) {
                bucket = ld8(p + 53) as u32;
            }
        }
    }
    if let Some(c) = RX_COUNT.get_ptr_mut(bucket) {
        unsafe { *c += 1 };
    }
    xdp_action::XDP_DROP
}

#[xdp]
pub fn fwd(ctx: XdpContext) -> u32 {
    let Some(p) = check(&ctx, 0, 12) else {
        return xdp_action::XDP_DROP;
    };
    let (d, s) = (Mac::load(p), Mac::load(p + 6));
    s.store(p);
    d.store(p + 6);
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
