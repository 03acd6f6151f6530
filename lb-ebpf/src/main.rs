//! XDP programs of the load balancer. `lb` runs on the LB host's NIC; `decap` on backends;
//! `pass` on veth peers that must accept XDP_TX frames; `floor` is the benchmark baseline.
#![no_std]
#![no_main]

mod csum;
mod decap;
mod forward;
mod health;
mod icmp;
mod maps;
mod parse;
mod pkt;
mod select;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

#[xdp]
pub fn lb(ctx: XdpContext) -> u32 {
    let (action, reason) = parse::lb(&ctx);
    maps::bump_reason(&maps::STATS, reason as u32);
    action
}

#[xdp]
pub fn decap(ctx: XdpContext) -> u32 {
    let (action, reason) = decap::decap(&ctx);
    maps::bump_reason(&maps::DECAP_STATS, reason as u32);
    action
}

/// tc egress on the LB's interface: the agent's health probes go to their backend as
/// client traffic does (see `health`).
#[classifier]
pub fn hc_encap(ctx: TcContext) -> i32 {
    let (action, reason) = health::hc_encap(&ctx);
    maps::bump_reason(&maps::HC_STATS, reason as u32);
    action
}

/// Lets a veth accept frames redirected or transmitted to it by XDP on its peer.
#[xdp]
pub fn pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The cheapest possible program: the benchmarks' floor.
#[xdp]
pub fn floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
