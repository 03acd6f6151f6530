//! `cargo xtask testbed up|down`: the namespace testbed of `lb_tests::testbed`, left
//! running for people (and the demo) to use.
//!
//! ```text
//! testbed up   [--prefix lbtb] [--backends 3] [--lbs 1]
//!                                               build it, start the agent (on every LB
//!                                               host: with --lbs N > 1 a router in front
//!                                               learns the VIPs from each by BGP) with a
//!                                               TCP and a UDP VIP per forwarding path,
//!                                               print it all
//! testbed down [--prefix lbtb]                  remove everything named <prefix>-...
//! ```
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use lb_tests::testbed::{down_prefix, standard_vips, Testbed, TestbedOpts};

const USAGE: &str =
    "usage: testbed up [--prefix P] [--backends N] [--lbs N] | testbed down [--prefix P]";

fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let cmd = args.next().unwrap_or_default();
    let (mut prefix, mut backends, mut lbs) = ("lbtb".to_string(), 3usize, 1usize);
    while let Some(a) = args.next() {
        let val = args
            .next()
            .with_context(|| format!("{a} needs a value\n{USAGE}"))?;
        match a.as_str() {
            "--prefix" => prefix = val,
            "--backends" => backends = val.parse().context("--backends")?,
            "--lbs" => lbs = val.parse().context("--lbs")?,
            _ => bail!("unknown argument {a}\n{USAGE}"),
        }
    }
    match cmd.as_str() {
        "up" => {
            let mut tb = Testbed::up(
                TestbedOpts::default()
                    .prefix(&prefix)
                    .backends(backends)
                    .lbs(lbs)
                    .detach(true),
            )?;
            let vips = standard_vips();
            for k in 0..lbs {
                let cfg = tb.agent_config_on(k, &vips)?;
                tb.start_agent_on(k, &cfg)?;
            }
            if lbs > 1 {
                // Ready when the router has learned every VIP address from every LB.
                let t = std::time::Instant::now();
                while !vips.iter().all(|v| {
                    tb.router_route(v.address)
                        .is_ok_and(|r| r.matches(" via ").count() == lbs)
                }) {
                    if t.elapsed() > std::time::Duration::from_secs(20) {
                        bail!("the router has not learned every VIP from every LB after 20 s");
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
            print!("{}", tb.describe());
            println!("  cargo xtask testbed down --prefix {prefix}   (removes it all)");
            tb.keep();
            Ok(())
        }
        "down" => {
            let found = down_prefix(&prefix)?;
            if found.is_empty() {
                println!("testbed {prefix}: nothing to remove");
            } else {
                println!("testbed {prefix}: removed\n  {found:#}");
            }
            Ok(())
        }
        _ => bail!("{USAGE}"),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("testbed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
