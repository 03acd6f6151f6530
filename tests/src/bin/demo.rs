//! `cargo xtask demo`: the product on an embedded default configuration, in a namespace
//! testbed (client, LB on a stick, three backends running real HTTP servers). Sends real
//! HTTP requests through an IPv4 and an IPv6 VIP, prints which backend answered next to
//! the agent's own counters, then takes a backend out, drains another, restores both; then
//! kills a backend's server and lets the health checks take it out and bring it back, and
//! shows a stateless VIP keeping a 50 MiB download through an LB that loses everything
//! (kill -9, program and maps removed, a fresh start) and through a drain of the download's
//! own backend (the second chance), then tears everything down. Every change goes through
//! the `lb` CLI, as an operator's would.
//! Then scale-out: three LB hosts behind a router that learns the VIP from each by BGP;
//! one LB's agent is killed (kill -9) while connections talk through it, the router drops
//! it, the connections carry on through the others, and it comes back.
use std::{
    collections::BTreeMap,
    io::Write,
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lb_tests::{
    testbed::{Testbed, TestbedOpts, VipSpec},
    transfer,
};
use lb_userspace::config::{Forwarding, HealthSpec};

const REQUESTS: usize = 300;

struct Demo {
    tb: Testbed,
    vips: Vec<VipSpec>,
    start: Instant,
}

impl Demo {
    fn step(&self, what: &str) {
        println!("\n[{:5.1}s] {what}", self.start.elapsed().as_secs_f64());
    }

    /// `lb ...` on the agent; prints the command like an operator typed it.
    fn lb(&self, args: &[&str]) -> Result<()> {
        println!("  $ lb {}", args.join(" "));
        let out = self.tb.lb(args);
        anyhow::ensure!(out.ok(), "lb {}: {}", args.join(" "), out.stderr);
        for line in out.stdout.lines().filter(|l| *l != "ok") {
            println!("    {line}");
        }
        Ok(())
    }

    /// REQUESTS new connections to VIP `v`: answers per backend (from the X-Backend header).
    fn requests(&self, v: usize) -> Result<BTreeMap<String, usize>> {
        let addr = self.vips[v].socket_addr();
        let mut hits = BTreeMap::new();
        for i in 0..REQUESTS {
            let reply = self.tb.http_get(addr, "/")?;
            anyhow::ensure!(reply.status == 200, "HTTP {} from {addr}", reply.status);
            let who = reply.header("X-Backend").unwrap_or("?").to_string();
            *hits.entry(who).or_insert(0) += 1;
            if i % 20 == 19 || i + 1 == REQUESTS {
                print!("\r  GET http://{addr}/ ... {}/{REQUESTS}", i + 1);
                std::io::stdout().flush().ok();
            }
        }
        println!();
        Ok(hits)
    }

    /// The agent's per-backend (new flows, packets), by address (`lb stats`).
    fn counters(&self) -> Result<BTreeMap<String, (u64, u64)>> {
        let stats = self.tb.lb_json(&["stats"])?;
        Ok(stats["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| {
                let n = |k: &str| b[k].as_u64().unwrap_or(0);
                let addr = b["address"].as_str().unwrap_or("").to_string();
                (addr, (n("new_flows"), n("packets")))
            })
            .collect())
    }

    /// Send the requests; print them per backend next to its weight and to what the
    /// agent's counters say happened meanwhile.
    fn round(&self, v: usize) -> Result<()> {
        let before = self.counters()?;
        let hits = self.requests(v)?;
        self.table(v, &hits, &before)
    }

    /// Wait (up to `limit`) for the agent's event `what` about `backend` of VIP `v`; print
    /// it with the time it took since `since`.
    fn await_event(
        &self,
        v: usize,
        backend: &str,
        what: &str,
        since: Instant,
        limit: Duration,
    ) -> Result<()> {
        while since.elapsed() < limit {
            let events = self.tb.lb_json(&["events"])?;
            let hit = events.as_array().into_iter().flatten().find(|e| {
                e["vip"] == self.vips[v].name.as_str()
                    && e["backend"] == backend
                    && e["what"] == what
            });
            if let Some(e) = hit {
                println!(
                    "  after {:.2}s the agent saw it: {} {backend} {what} ({})",
                    since.elapsed().as_secs_f64(),
                    self.vips[v].name,
                    e["reason"].as_str().unwrap_or("")
                );
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        anyhow::bail!("no {what} event for {backend} within {limit:?}")
    }

    fn table(
        &self,
        v: usize,
        hits: &BTreeMap<String, usize>,
        before: &BTreeMap<String, (u64, u64)>,
    ) -> Result<()> {
        let backends = self.tb.lb_json(&["backend", "list", &self.vips[v].name])?;
        let counters = self.counters()?;
        let rows: Vec<_> = backends.as_array().into_iter().flatten().collect();
        let total_w: u64 = rows
            .iter()
            .filter(|b| b["state"] == "up")
            .map(|b| b["weight"].as_u64().unwrap_or(0))
            .sum();
        println!(
            "  {:<10} {:<20} {:>6} {:>8} {:>9} {:>11} | {:>13} {:>8}",
            "backend",
            "address",
            "weight",
            "state",
            "requests",
            "share",
            "lb: new flows",
            "packets"
        );
        for b in rows {
            let addr = b["address"].as_str().unwrap_or("");
            let ip: IpAddr = addr.parse().context("backend address")?;
            let host = self
                .tb
                .backends()
                .iter()
                .find(|h| h.addr(ip.is_ipv6()) == ip)
                .map(|h| h.name.clone())
                .unwrap_or_default();
            let n = hits.get(&host).copied().unwrap_or(0);
            let w = b["weight"].as_u64().unwrap_or(0);
            let state = b["state"].as_str().unwrap_or("?");
            let want = if state != "up" || total_w == 0 {
                "-".to_string()
            } else {
                format!("{:.0}%", 100.0 * w as f64 / total_w as f64)
            };
            let (nf, pk) = counters.get(addr).copied().unwrap_or_default();
            let (nf0, pk0) = before.get(addr).copied().unwrap_or_default();
            let (nf, pk) = (nf.saturating_sub(nf0), pk.saturating_sub(pk0));
            println!(
                "  {:<10} {:<20} {:>6} {:>8} {:>9} {:>4.0}% ({want:>4}) | {:>13} {:>8}",
                host,
                addr,
                w,
                state,
                n,
                100.0 * n as f64 / REQUESTS as f64,
                nf,
                pk
            );
        }
        Ok(())
    }
}

/// A stateless VIP: a download survives an LB that lost everything, and a drain of its own
/// backend through the backends' second chance.
fn stateless(demo: &mut Demo) -> Result<()> {
    use std::sync::atomic::Ordering;
    let spec = VipSpec::stateless("webs", "198.18.10.3".parse::<IpAddr>()?);
    demo.step(&format!(
        "a stateless VIP: no connection table on the LB, a second chance on the backends ({})",
        spec.socket_addr()
    ));
    for cmd in demo.tb.cli_commands(&spec) {
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        demo.lb(&args)?;
    }
    demo.lb(&["vip", "list"])?;
    let addr = spec.socket_addr();
    let run = transfer::Running::start(&demo.tb, addr);
    let shared = run.shared.clone();
    let head = run.head()?;
    let own = demo
        .tb
        .backends()
        .iter()
        .find(|b| b.name == head.backend)
        .context("answered by no backend")?
        .addr(false);
    let progress = |what: &str| -> Result<()> {
        let at = shared.received.load(Ordering::Relaxed);
        let got = transfer::wait_received(&shared, at + transfer::STEP, what)?;
        println!(
            "  download: {:.1} MiB received, byte-checked, still on {}",
            got as f64 / 1048576.0,
            head.backend
        );
        Ok(())
    };
    println!(
        "  GET http://{addr}/bytes?n=50MiB from {} (read slowly: every byte needs ACKs through the LB) on {} ({own})",
        head.local, head.backend
    );
    progress("the start")?;

    demo.step("the LB loses everything: kill -9, its program and maps removed, a fresh start");
    let agent = demo.tb.agent_mut().context("agent")?;
    agent.kill9()?;
    println!("  $ kill -9 <agent>; lb agent --stop; lb agent --config ...");
    let (out, _) = agent.stop()?;
    anyhow::ensure!(out.ok(), "lb agent --stop: {}", out.stderr);
    agent.spawn()?;
    progress("after the empty restart")?;

    demo.step(&format!(
        "draining {} ({own}), the download's own backend: its slots move, the new primaries \
         send the download's packets on to it",
        head.backend
    ));
    let before = demo.tb.decap_counts()?;
    demo.lb(&["backend", "drain", "webs", &own.to_string()])?;
    progress("after the drain")?;
    let after = demo.tb.decap_counts()?;
    let r = lb_common::DecapReason::Redirected as usize;
    println!(
        "  backends' decap: {} packets redirected to {} meanwhile",
        after[r] - before[r],
        head.backend
    );

    let d = run.finish("demo", Ok(()), &[])?;
    println!(
        "  download complete: {} bytes, every byte checked, clean end of stream",
        d.bytes
    );
    demo.lb(&["backend", "undrain", "webs", &own.to_string()])?;
    Ok(())
}

fn main() -> Result<()> {
    let start = Instant::now();
    println!("lb demo: a real XDP load balancer in a network-namespace testbed");
    let prefix = format!("lbdemo-{}", std::process::id());
    println!("\n[  0.0s] building the testbed ({prefix}-*): client, LB on a stick, 3 backends on a bridge");
    let mut tb = Testbed::up(TestbedOpts::default().prefix(&prefix).backends(3))?;
    let vips = vec![
        VipSpec::tcp("web4", "198.18.10.1".parse::<IpAddr>()?, Forwarding::Ipip)
            .with_weights(&[100, 200, 300]),
        VipSpec::tcp("web6", "2001:db8:10::1".parse::<IpAddr>()?, Forwarding::Gue)
            .with_weights(&[100, 200, 300]),
    ];
    // The embedded default: an IPv4 (ipip) and an IPv6 (gue) VIP, weights 1:2:3, checked
    // every 500 ms through the tunnel (down after 2 failures, up after 2 passes).
    let vips: Vec<VipSpec> = vips
        .into_iter()
        .map(|mut v| {
            v.health = Some(HealthSpec {
                interval_ms: Some(500),
                fall: Some(2),
                rise: Some(2),
                ..Default::default()
            });
            v
        })
        .collect();
    let cfg = tb.agent_config(&vips)?;
    println!(
        "\n[{:5.1}s] starting the agent: lb agent --config {} --instance {}",
        start.elapsed().as_secs_f64(),
        tb.config_path().display(),
        tb.instance()
    );
    tb.start_agent(&cfg)?;
    // What an operator would have written (the first VIP; the second is alike).
    let text = std::fs::read_to_string(tb.config_path())?;
    let mut shown: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .take_while(|l| !l.contains("web6"))
        .collect();
    while shown
        .last()
        .is_some_and(|l| l.is_empty() || *l == "[[vip]]")
    {
        shown.pop();
    }
    println!("  {}", shown.join("\n  ").trim_end());
    let mut demo = Demo { tb, vips, start };
    demo.lb(&["vip", "list"])?;
    // No MACs or outer source in the config: the agent found the next hops itself.
    demo.lb(&["backend", "list", "web4"])?;

    for v in 0..demo.vips.len() {
        let s = &demo.vips[v];
        demo.step(&format!(
            "{REQUESTS} HTTP requests, one new TCP connection each, to {} {} ({})",
            s.name,
            s.socket_addr(),
            s.forwarding
        ));
        demo.round(v)?;
    }

    let b = demo.tb.backends();
    let (out, drained) = (b[2].addr(false).to_string(), b[1].addr(false).to_string());
    demo.step(&format!(
        "taking {} ({out}) out of web4 by hand (lb backend remove)",
        b[2].name
    ));
    demo.lb(&["backend", "remove", "web4", &out])?;
    demo.round(0)?;

    demo.step(&format!(
        "draining {} ({drained}): no new connections",
        b[1].name
    ));
    demo.lb(&["backend", "drain", "web4", &drained])?;
    demo.round(0)?;

    demo.step("restoring both");
    demo.lb(&["backend", "undrain", "web4", &drained])?;
    // No MAC: the agent resolves the backend's next hop itself.
    demo.lb(&["backend", "add", "web4", &out, "--weight", "300"])?;
    demo.round(0)?;

    let (hurt, hurt_addr) = {
        let h = &demo.tb.backends()[1];
        (h.name.clone(), h.addr(false).to_string())
    };
    demo.step(&format!(
        "health checks: {}'s HTTP server is killed (kill -9); nobody tells the agent",
        hurt
    ));
    let killed = Instant::now();
    demo.tb.kill_server(1);
    demo.await_event(0, &hurt_addr, "down", killed, Duration::from_secs(10))?;
    demo.round(0)?;

    demo.step(&format!("{hurt}'s server is started again"));
    let back = Instant::now();
    demo.tb.restart_server(1)?;
    demo.await_event(0, &hurt_addr, "up", back, Duration::from_secs(10))?;
    demo.round(0)?;
    demo.lb(&["events"])?;

    stateless(&mut demo)?;

    demo.step("drop and pass reasons counted by the lb program");
    let stats = demo.tb.lb_json(&["stats"])?;
    if let Some(m) = stats["reasons"].as_object() {
        for (k, v) in m.iter().filter(|(_, v)| v.as_u64() != Some(0)) {
            println!("  {k:<24} {v}");
        }
    }

    demo.step("tearing down (agent stopped, pins, namespaces and processes removed)");
    let start = demo.start;
    drop(demo);
    scale_out(&format!("{prefix}x"), start)?;
    println!("\ndone in {:.1}s", start.elapsed().as_secs_f64());
    Ok(())
}

/// The scale-out act: three LB hosts, a router, BGP, ECMP.
fn scale_out(prefix: &str, start: Instant) -> Result<()> {
    use std::sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    };
    let step = |what: &str| println!("\n[{:5.1}s] {what}", start.elapsed().as_secs_f64());
    step(&format!(
        "scale-out: a new testbed ({prefix}-*) with 3 LB hosts behind a router (BIRD: BGP \
         with each, multipath routes hashed by 5-tuple), the client behind the router"
    ));
    let mut tb = Testbed::up(TestbedOpts::default().prefix(prefix).backends(3).lbs(3))?;
    let web = VipSpec::tcp("web4", "198.18.10.1".parse::<IpAddr>()?, Forwarding::Ipip);
    for k in 0..3 {
        let cfg = tb.agent_config_on(k, std::slice::from_ref(&web))?;
        tb.start_agent_on(k, &cfg)?;
    }
    let hops = |tb: &Testbed| {
        tb.router_route(web.address)
            .map(|r| r.matches(" via ").count())
            .unwrap_or(0)
    };
    let t = Instant::now();
    while hops(&tb) < 3 {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(15),
            "the router learned no route"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "  every agent announces {} ([bgp] in its config); the router's route, {:.1}s after \
         the agents started:",
        web.address,
        t.elapsed().as_secs_f64()
    );
    for l in tb.router_route(web.address)?.lines() {
        println!("    {}", l.trim());
    }
    let out = tb.lb_on(1, &["status"]);
    for l in out
        .stdout
        .lines()
        .filter(|l| l.starts_with("bgp") || l.contains("neighbour"))
    {
        println!("    lb2$ {}", l.trim());
    }
    let packets =
        |tb: &Testbed| -> Vec<u64> { (0..3).map(|k| tb.vip_packets_on(k, "web4")).collect() };
    step(&format!(
        "{REQUESTS} new connections from the client to {}",
        web.socket_addr()
    ));
    let before = packets(&tb);
    let addr = web.socket_addr();
    let mut hits: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..REQUESTS {
        let r = tb.http_get(addr, "/")?;
        *hits.entry(r.backend().to_string()).or_default() += 1;
    }
    let after = packets(&tb);
    for (k, h) in tb.lbs().iter().enumerate() {
        println!(
            "  {:<4} carried {:>5} packets",
            h.name,
            after[k] - before[k]
        );
    }
    println!("  answered by {hits:?}");

    step("20 long-lived connections talk (a request every 20 ms each); lb2's agent is killed (kill -9)");
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let talkers: Vec<_> = (0..20)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            lb_tests::netns::spawn_in_netns(tb.client().netns(), move || {
                let Ok(mut c) = lb_tests::testbed::HttpConn::open(addr, Duration::from_secs(5))
                else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                while !stop.load(Ordering::Relaxed) {
                    if c.get("/").is_ok_and(|r| r.status == 200) {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let mut agent = tb.take_agent_on(1).context("no agent on lb2")?;
    let t = Instant::now();
    agent.kill9()?;
    while hops(&tb) > 2 {
        anyhow::ensure!(t.elapsed() < Duration::from_secs(5), "lb2 still announced");
        std::thread::sleep(Duration::from_millis(5));
    }
    println!(
        "  the router dropped lb2 {:.0} ms after the kill (its BIRD died with the agent, the \
         session closed); its flows now reach lb and lb3, which pick the same backends",
        t.elapsed().as_secs_f64() * 1e3
    );
    std::thread::sleep(Duration::from_secs(1));
    step("lb2's agent is started again: it adopts its data plane and announces again");
    std::mem::forget(agent); // its guard would stop (unpin) the instance the new one adopts
    let cfg = lb_userspace::config::Config::load(&tb.config_path_on(1))?;
    tb.start_agent_on(1, &cfg)?;
    let t = Instant::now();
    while hops(&tb) < 3 {
        anyhow::ensure!(t.elapsed() < Duration::from_secs(15), "lb2 not back");
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "  back in the route after {:.1}s",
        t.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    for t in talkers {
        let _ = t.join();
    }
    println!(
        "  the 20 connections: {} requests answered, {} connections broken",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    step("tearing down the scale-out testbed");
    tb.down()
}
