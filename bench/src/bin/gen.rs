//! The packet generator: minimum-size (or larger) TCP SYN, TCP ACK or UDP frames of many
//! flows, IPv4 or IPv6, sent from a namespace by BPF_PROG_TEST_RUN in live-frames mode
//! (the kernel has no pktgen). Without `--netns` it builds its own two-namespace wire and
//! sends through the `lb` program (standard fixture, production sizes) or the baseline
//! forwarder, and the receiver counts what comes back by destination.
//!
//!   cargo xtask bench gen --mix syn --count 5000000
//!   cargo xtask bench gen --netns client --iface eth0 --dst-mac 02:00:00:00:00:01 \
//!       --dst 198.18.10.1 --mix established --flows 100000 --duration 10 --rate 1000000
use std::{
    io::Write,
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Parser;
use lb_bench::{
    live::{pin_to_cpu, Tools},
    traffic::{client, gen_config_to, min_frame, vip, Mix},
    turns::{Bench, Prog, MAX_CONNS},
};
use lb_common::bench::RX_NOT_IP;
use lb_tests::netns::in_netns;
use lb_userspace::config::MacAddr;

#[derive(Parser, Debug)]
#[command(about = "Send test traffic from a namespace at line rate (BPF live frames)")]
struct Args {
    /// Send from this namespace (with --iface); without it, through a wire of our own.
    #[arg(long, requires = "iface")]
    netns: Option<String>,
    /// The interface to send on, in --netns.
    #[arg(long, requires = "netns")]
    iface: Option<String>,
    /// Destination MAC of the frames (with --netns; default: broadcast).
    #[arg(long)]
    dst_mac: Option<MacAddr>,
    /// On our own wire: `lb` (the LB program) or `fwd` (the baseline forwarder).
    #[arg(long, default_value = "lb")]
    through: String,
    /// Destination address (default: the benchmark VIP, 198.18.10.1 or 2001:db8:10::1).
    #[arg(long)]
    dst: Option<IpAddr>,
    /// First source address (flows add to its last 16 bits).
    #[arg(long)]
    src: Option<IpAddr>,
    /// IPv6 (when neither --dst nor --src says).
    #[arg(long)]
    v6: bool,
    #[arg(long, default_value_t = 80)]
    port: u16,
    /// syn (every frame a new flow), established (ACKs over --flows), constant (one
    /// 5-tuple) or udp (datagrams over --flows).
    #[arg(long, default_value = "established")]
    mix: String,
    /// Flows the frames cycle over (established, udp).
    #[arg(long, default_value_t = 1000)]
    flows: u32,
    /// Frames to send.
    #[arg(long, conflicts_with = "duration")]
    count: Option<u64>,
    /// Seconds to send for.
    #[arg(long)]
    duration: Option<f64>,
    /// Frames per second (default: as fast as the CPU goes).
    #[arg(long)]
    rate: Option<u64>,
    /// Frame length without the FCS (default: the smallest that fits, 60 or 74).
    #[arg(long)]
    size: Option<u16>,
    /// CPU to send from.
    #[arg(long, default_value_t = 0)]
    cpu: usize,
}

fn test_address(field: &str, a: IpAddr) -> Result<()> {
    let ok = match a {
        IpAddr::V4(v) => (u32::from(v) & 0xfffe_0000) == u32::from_be_bytes([198, 18, 0, 0]),
        IpAddr::V6(v) => v.segments()[..2] == [0x2001, 0x0db8],
    };
    if !ok {
        bail!("{field} {a}: test traffic goes only to and from 198.18.0.0/15 and 2001:db8::/32");
    }
    Ok(())
}

fn main() -> Result<()> {
    let a = Args::parse();
    let mix = Mix::parse(&a.mix)
        .with_context(|| format!("--mix {:?}: one of syn, established, constant, udp", a.mix))?;
    let v6 = match (a.dst, a.src) {
        (Some(d), Some(s)) if d.is_ipv6() != s.is_ipv6() => {
            bail!("--src {s} and --dst {d} are of different families")
        }
        (Some(x), _) | (_, Some(x)) => x.is_ipv6(),
        _ => a.v6,
    };
    let dst = a.dst.unwrap_or_else(|| vip(v6));
    let src = a.src.unwrap_or_else(|| client(v6));
    test_address("--dst", dst)?;
    test_address("--src", src)?;
    if a.flows == 0 || a.flows > 1 << 31 {
        bail!("--flows {}: from 1 to 2^31", a.flows);
    }
    let size = a.size.unwrap_or(min_frame(v6));
    if size < min_frame(v6) || size > 1514 {
        bail!("--size {size}: from {} to 1514 bytes", min_frame(v6));
    }
    if a.rate == Some(0) {
        bail!("--rate 0: give a positive rate or leave it out");
    }
    let through = match a.through.as_str() {
        "lb" => Prog::Lb,
        "fwd" => Prog::Fwd,
        t => bail!("--through {t:?}: lb or fwd"),
    };
    let mut cfg = gen_config_to(mix, src, dst, a.port, a.flows, size);
    let limit = match (a.count, a.duration) {
        (Some(n), _) => Limit::Frames(n),
        (None, Some(s)) if s > 0.0 => Limit::Time(Duration::from_secs_f64(s)),
        (None, Some(s)) => bail!("--duration {s}: give a positive number of seconds"),
        (None, None) => Limit::Frames(1_000_000),
    };
    match (a.netns, a.iface) {
        (Some(ns), Some(iface)) => {
            let mut tools = Tools::load()?;
            cfg.dst_mac = a.dst_mac.map(|m| m.octets()).unwrap_or([0xff; 6]);
            let (sent, took) = in_netns(&ns, || -> Result<(u64, Duration)> {
                pin_to_cpu(a.cpu)?;
                let c = std::ffi::CString::new(iface.clone())?;
                let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
                if ifindex == 0 {
                    bail!("--iface {iface}: no such interface in namespace {ns}");
                }
                cfg.src_mac = mac_of(&iface)?;
                tools.set_gen(&cfg)?;
                send(&mut tools, ifindex, size, limit, a.rate)
            })
            .with_context(|| format!("--netns {ns}"))??;
            summary(sent, took);
        }
        _ => {
            let mut b = Bench::new(MAX_CONNS)?;
            b.put(through)?;
            let gen_ns = b.wire.gen.name().to_string();
            let ifindex = b.wire.gen_ifindex;
            let before = b.tools.received()?;
            let (sent, took) = in_netns(&gen_ns, || -> Result<(u64, Duration)> {
                pin_to_cpu(a.cpu)?;
                b.tools.set_gen(&cfg)?;
                send(&mut b.tools, ifindex, size, limit, a.rate)
            })??;
            let after = b.tools.settle()?;
            summary(sent, took);
            let got: Vec<(usize, u64)> = after
                .iter()
                .zip(&before)
                .map(|(x, y)| x - y)
                .enumerate()
                .filter(|(_, n)| *n > 0)
                .collect();
            let total: u64 = got.iter().map(|(_, n)| n).sum();
            println!(
                "received back through {}: {total} of {sent} ({} lost at the veths' rings), \
                 by destination:",
                through.name(),
                sent.saturating_sub(total)
            );
            for (i, n) in got {
                let name = if i as u32 == RX_NOT_IP {
                    "not IP".to_string()
                } else {
                    format!("address ending .{i}")
                };
                println!(
                    "  {name:<20} {n:>12} {:>6.1}%",
                    n as f64 * 100.0 / total as f64
                );
            }
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Limit {
    Frames(u64),
    Time(Duration),
}

fn mac_of(iface: &str) -> Result<[u8; 6]> {
    let s = std::fs::read_to_string(format!("/sys/class/net/{iface}/address")).unwrap_or_default();
    Ok(s.trim()
        .parse::<MacAddr>()
        .map(|m| m.octets())
        .unwrap_or([0x02, 0, 0, 0, 0, 0x01]))
}

/// Send in chunks (at most 20 ms of the rate, or 1M frames), pacing to `rate` and
/// printing a progress line every half second.
fn send(
    tools: &mut Tools,
    ifindex: u32,
    size: u16,
    limit: Limit,
    rate: Option<u64>,
) -> Result<(u64, Duration)> {
    let t0 = Instant::now();
    let mut sent = 0u64;
    let mut shown = t0;
    let chunk = rate.map_or(1 << 20, |r| (r / 50).clamp(1, 1 << 20));
    loop {
        let n = match limit {
            Limit::Frames(total) if sent >= total => break,
            Limit::Frames(total) => chunk.min(total - sent),
            Limit::Time(d) if t0.elapsed() >= d => break,
            Limit::Time(_) => chunk,
        };
        tools.send(ifindex, size, n as u32)?;
        sent += n;
        if let Some(r) = rate {
            let due = Duration::from_secs_f64(sent as f64 / r as f64);
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        if shown.elapsed() >= Duration::from_millis(500) {
            shown = Instant::now();
            let s = t0.elapsed().as_secs_f64();
            eprint!(
                "\r  {sent:>12} frames  {s:>6.1} s  {:>6.2} Mpps ",
                sent as f64 / s / 1e6
            );
            let _ = std::io::stderr().flush();
        }
    }
    if shown != t0 {
        eprintln!();
    }
    Ok((sent, t0.elapsed()))
}

fn summary(sent: u64, took: Duration) {
    let s = took.as_secs_f64();
    println!(
        "sent {sent} frames in {s:.3} s: {:.2} Mpps",
        sent as f64 / s / 1e6
    );
}
