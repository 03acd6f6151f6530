//! Several LB hosts behind a router, with a real routing daemon: every LB's agent announces
//! the VIPs by BGP (BIRD 2), the router (BIRD 2 too) installs one multipath route over all
//! of them and spreads flows by their 5-tuple. Because every LB builds the same rings, the
//! router may move a flow from one LB to another at any time and it still reaches its
//! backend: an LB killed, an LB's link cut, an LB added back, a backend that fails for all.
//! Expected figures come from the setup (three LBs, the configured timers), not from the
//! agents.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use lb_tests::{
    netns::{spawn_in_netns, unique_name},
    support::{try_wait_for, StopOnDrop},
    testbed::{http_get, HttpConn, Testbed, TestbedOpts, VipSpec},
};
use lb_userspace::config::{Forwarding, HealthSpec, Via};

const LBS: usize = 3;
/// The longest the router may take to drop a lost LB: BFD 100 ms x 3, and BIRD's own
/// reaction, with room for a loaded machine (the BGP hold time, 3 s, is the fallback).
const WITHDRAW: Duration = Duration::from_secs(3);

fn web() -> VipSpec {
    let mut v = VipSpec::tcp("web", IpAddr::from([198, 18, 10, 1]), Forwarding::Ipip);
    v.health = Some(HealthSpec {
        via: Some(Via::Tunnel),
        interval_ms: Some(100),
        timeout_ms: Some(100),
        fall: Some(2),
        rise: Some(2),
        ..Default::default()
    });
    v
}

fn web6() -> VipSpec {
    VipSpec::tcp(
        "web6",
        "2001:db8:10::1".parse::<IpAddr>().unwrap(),
        Forwarding::Gue,
    )
    .with_backends_v6(true)
}

/// Three LB hosts, three backends, an agent on each LB with the same VIPs (the third
/// lists its backends in the opposite order: rings must not depend on it).
fn cluster() -> Result<Testbed> {
    cluster_with(&[web(), web6()])
}

fn cluster_with(vips: &[VipSpec]) -> Result<Testbed> {
    let mut tb = Testbed::up(
        TestbedOpts::default()
            .prefix(&unique_name("lbso"))
            .lbs(LBS)
            .server_bin(env!("CARGO_BIN_EXE_lb-testbed-server")),
    )?;
    for k in 0..LBS {
        let mut cfg = tb.agent_config_on(k, vips)?;
        if k == 2 {
            for v in &mut cfg.vips {
                v.backends.reverse();
            }
        }
        tb.start_agent_on(k, &cfg)?;
    }
    for v in vips {
        wait_next_hops(&tb, v.address, LBS, Duration::from_secs(15))?;
    }
    Ok(tb)
}

/// The router's next hops for `vip` (its multipath route).
fn next_hops(tb: &Testbed, vip: IpAddr) -> Result<Vec<String>> {
    let r = tb.router_route(vip)?;
    let mut hops: Vec<String> = r
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "via")
        .map(|w| w[1].to_string())
        .collect();
    hops.sort();
    Ok(hops)
}

fn wait_next_hops(tb: &Testbed, vip: IpAddr, n: usize, within: Duration) -> Result<Duration> {
    let t = Instant::now();
    try_wait_for(&format!("{n} next hops for {vip}"), within, || {
        Ok(next_hops(tb, vip)?.len() == n)
    })
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}: router has {:?}; BGP: {}",
            tb.router_route(vip),
            tb.router_birdc(&["show", "protocols"]).unwrap_or_default()
        )
    })?;
    Ok(t.elapsed())
}

fn rings_agree(tb: &Testbed, spec: &VipSpec) -> Result<Vec<IpAddr>> {
    let first = tb.ring_on(0, spec)?;
    for k in 1..LBS {
        let r = tb.ring_on(k, spec)?;
        ensure!(
            r == first,
            "LB {k}'s ring of {} differs from LB 0's in {} of {} slots",
            spec.name,
            r.iter().zip(&first).filter(|(a, b)| a != b).count(),
            r.len()
        );
    }
    Ok(first)
}

#[test]
fn every_lb_announces_the_vips_and_the_router_spreads_new_connections_over_all() -> Result<()> {
    let tb = cluster()?;
    // One multipath route per VIP, every LB a next hop.
    for vip in [web().address, web6().address] {
        let hops = next_hops(&tb, vip)?;
        let want: Vec<String> = {
            let mut w: Vec<String> = tb
                .lbs()
                .iter()
                .map(|h| {
                    if vip.is_ipv6() {
                        h.v6.to_string()
                    } else {
                        h.v4.to_string()
                    }
                })
                .collect();
            w.sort();
            w
        };
        assert_eq!(hops, want, "next hops of {vip}");
    }
    // Each agent says what it announces, and that its session is up.
    for k in 0..LBS {
        let s = tb.lb_on(k, &["--json", "status"]);
        let v: serde_json::Value = serde_json::from_str(&s.stdout)?;
        let bgp = &v["bgp"];
        let ann: Vec<&str> = bgp["announced"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|a| a.as_str())
            .collect();
        assert_eq!(ann, ["198.18.10.1", "2001:db8:10::1"], "LB {k} announces");
        assert_eq!(bgp["sessions"][0]["state"], "up", "LB {k}: {bgp}");
    }
    // ... and so does its Prometheus endpoint.
    let text = tb.lbs()[1].run_in(|| -> Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", 9469))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })??;
    for sample in [
        "lb_bgp_announced{address=\"198.18.10.1\"}",
        "lb_bgp_announced{address=\"2001:db8:10::1\"}",
        "lb_bgp_session_up{neighbor=\"198.18.0.1\"}",
    ] {
        let value = text.lines().find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .parse::<f64>()
                .ok()
        });
        assert_eq!(value, Some(1.0), "{sample} in\n{text}");
    }
    // Same rings everywhere, though LB 2 lists the backends the other way round.
    rings_agree(&tb, &web())?;
    rings_agree(&tb, &web6())?;

    // New connections from many source ports: all answered, every LB carries some.
    let before: Vec<u64> = (0..LBS).map(|k| tb.vip_packets_on(k, "web")).collect();
    let addr = web().socket_addr();
    let n = 300;
    let answered = tb.in_client(|| {
        (0..n)
            .filter(|_| http_get(addr, "/", Duration::from_secs(3)).is_ok_and(|r| r.status == 200))
            .count()
    })?;
    assert_eq!(answered, n, "new connections answered");
    for (k, b) in before.iter().enumerate() {
        let got = tb.vip_packets_on(k, "web") - b;
        // 300 connections over 3 LBs: each should see about 100 (5 packets each from the
        // client); a hash that ignored ports would send all to one.
        assert!(got >= 50, "LB {k} carried {got} packets of {n} connections");
    }
    let addr6 = web6().socket_addr();
    let answered6 = tb.in_client(|| {
        (0..30)
            .filter(|_| http_get(addr6, "/", Duration::from_secs(3)).is_ok())
            .count()
    })?;
    assert_eq!(answered6, 30, "IPv6 connections answered");
    tb.down()
}

/// What each long-lived connection saw: requests answered, errors, the longest gap
/// between two answers, and the backend that answered.
#[derive(Clone, Debug, Default)]
struct Seen {
    answered: u64,
    errors: Vec<String>,
    gap: Duration,
    backend: String,
}

/// `n` keep-alive connections from the client to `addr`, a request every 20 ms each, until
/// `stop`; what each saw, by its client address.
struct Talkers {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<BTreeMap<SocketAddr, Seen>>>,
    threads: Vec<thread::JoinHandle<Result<Result<()>>>>,
    _guard: StopOnDrop,
}

impl Talkers {
    fn start(tb: &Testbed, addr: SocketAddr, n: usize) -> Result<Talkers> {
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<BTreeMap<SocketAddr, Seen>>> = Arc::default();
        let threads = (0..n)
            .map(|_| {
                let (stop, seen) = (stop.clone(), seen.clone());
                spawn_in_netns(tb.client().netns(), move || -> Result<()> {
                    let mut c = HttpConn::open(addr, Duration::from_secs(10))?;
                    let local = c.local;
                    seen.lock().unwrap().insert(local, Seen::default());
                    let mut last = Instant::now();
                    while !stop.load(Ordering::Relaxed) {
                        let r = c.get("/");
                        let now = Instant::now();
                        let mut s = seen.lock().unwrap();
                        let e = s.get_mut(&local).unwrap();
                        match r {
                            Ok(r) if r.status == 200 => {
                                e.answered += 1;
                                e.gap = e.gap.max(now - last);
                                e.backend = r.backend().to_string();
                                last = now;
                            }
                            Ok(r) => e.errors.push(format!("status {}", r.status)),
                            Err(err) => {
                                e.errors.push(format!("{err:#}"));
                                return Ok(()); // the connection is gone
                            }
                        }
                        drop(s);
                        thread::sleep(Duration::from_millis(20));
                    }
                    Ok(())
                })
            })
            .collect();
        let t = Talkers {
            _guard: StopOnDrop(stop.clone()),
            stop,
            seen,
            threads,
        };
        try_wait_for("every connection answered", Duration::from_secs(10), || {
            let s = t.seen.lock().unwrap();
            Ok(s.len() == n && s.values().all(|e| e.answered > 0))
        })?;
        Ok(t)
    }

    fn answered(&self) -> u64 {
        self.seen.lock().unwrap().values().map(|e| e.answered).sum()
    }

    fn snapshot(&self) -> BTreeMap<SocketAddr, Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Stop them; what each saw.
    fn finish(mut self) -> Result<BTreeMap<SocketAddr, Seen>> {
        self.stop.store(true, Ordering::Relaxed);
        for t in std::mem::take(&mut self.threads) {
            t.join().unwrap()??;
        }
        Ok(self.snapshot())
    }
}

/// The LBs whose VIP `name` forwarded packets in the next half second.
fn busy_lbs(tb: &Testbed, name: &str) -> Vec<usize> {
    let carried =
        |tb: &Testbed| -> Vec<u64> { (0..LBS).map(|k| tb.vip_packets_on(k, name)).collect() };
    let c0 = carried(tb);
    thread::sleep(Duration::from_millis(500));
    let c1 = carried(tb);
    (0..LBS).filter(|&k| c1[k] > c0[k]).collect()
}

#[test]
fn established_connections_survive_an_lb_killed_its_link_cut_and_its_return() -> Result<()> {
    let mut tb = cluster()?;
    let addr = web().socket_addr();
    const CONNS: usize = 30;
    let talkers = Talkers::start(&tb, addr, CONNS)?;
    // Which LBs carry the talkers now: the one killed must carry some.
    let carried =
        |tb: &Testbed| -> Vec<u64> { (0..LBS).map(|k| tb.vip_packets_on(k, "web")).collect() };
    let busy = busy_lbs(&tb, "web");
    assert!(
        busy.len() >= 2,
        "30 connections over 3 LBs use at least 2: {busy:?}"
    );
    let victim = busy[0];

    // 1. kill -9 the agent of an LB that carries connections: its BIRD dies with it, the
    //    router withdraws it; its flows go to the others, which pick the same backends.
    let mut agent = tb.take_agent_on(victim).unwrap();
    let t = Instant::now();
    agent.kill9()?;
    let vip = web().address;
    wait_next_hops(&tb, vip, LBS - 1, WITHDRAW)?;
    let withdrawn = t.elapsed();
    let a0 = talkers.answered();
    thread::sleep(Duration::from_secs(1));
    assert!(talkers.answered() > a0, "connections keep being answered");
    let ok = tb.in_client(|| {
        (0..50)
            .filter(|_| http_get(addr, "/", Duration::from_secs(3)).is_ok())
            .count()
    })?;
    assert_eq!(ok, 50, "new connections after the kill");

    // 2. Cut the link of another busy LB (its bridge port down): nothing closes its
    //    sessions; BFD notices.
    let other = *busy.iter().find(|&&k| k != victim).unwrap();
    let port = tb.lbs()[other].name.clone();
    let t = Instant::now();
    tb.bridge().ip(&["link", "set", &port, "down"])?;
    wait_next_hops(&tb, vip, LBS - 2, WITHDRAW)?;
    let cut_withdrawn = t.elapsed();
    thread::sleep(Duration::from_secs(1));
    let ok = tb.in_client(|| {
        (0..50)
            .filter(|_| http_get(addr, "/", Duration::from_secs(3)).is_ok())
            .count()
    })?;
    assert_eq!(ok, 50, "new connections after the link cut");

    // 3. Both come back: the link up, the agent started again (it adopts its data plane and
    //    announces again); they take their share of new flows, nothing breaks.
    tb.bridge().ip(&["link", "set", &port, "up"])?;
    // Not `drop`: the guard would stop the instance (detach, unpin); the new agent adopts
    // what the killed one left, and its guard stops it at the end.
    std::mem::forget(agent);
    let cfg = lb_userspace::config::Config::load(&tb.config_path_on(victim))?;
    tb.start_agent_on(victim, &cfg)?;
    let back = wait_next_hops(&tb, vip, LBS, Duration::from_secs(15))?;
    let before = carried(&tb);
    let ok = tb.in_client(|| {
        (0..150)
            .filter(|_| http_get(addr, "/", Duration::from_secs(3)).is_ok())
            .count()
    })?;
    assert_eq!(ok, 150, "new connections with every LB back");
    let after = carried(&tb);
    for k in 0..LBS {
        assert!(
            after[k] > before[k],
            "LB {k} takes new flows again: {before:?} -> {after:?}"
        );
    }
    thread::sleep(Duration::from_millis(500));

    let s = talkers.finish()?;
    let broken: Vec<String> = s
        .iter()
        .filter(|(_, e)| !e.errors.is_empty())
        .map(|(a, e)| format!("{a}: {:?}", e.errors))
        .collect();
    let gap = s.values().map(|e| e.gap).max().unwrap_or_default();
    println!(
        "withdrawn after kill -9 in {withdrawn:?}, after the link cut in {cut_withdrawn:?}; \
         back in {back:?}; {} of {CONNS} connections survived all of it; longest gap {gap:?}",
        CONNS - broken.len()
    );
    assert!(broken.is_empty(), "connections broken: {broken:#?}");
    tb.down()
}

#[test]
fn a_backend_failure_is_seen_by_every_lb_and_their_rings_converge() -> Result<()> {
    let mut tb = cluster()?;
    let spec = web();
    let full = rings_agree(&tb, &spec)?;
    let be2 = tb.backends()[1].v4;
    assert!(full.contains(&IpAddr::V4(be2)));
    tb.kill_server(1);
    // Every LB's own checks take it out (views may differ for a moment); then the rings
    // agree again, without it.
    try_wait_for(
        "every LB's ring without be2",
        Duration::from_secs(10),
        || {
            Ok((0..LBS).all(|k| {
                tb.ring_on(k, &spec)
                    .is_ok_and(|r| !r.contains(&IpAddr::V4(be2)))
            }))
        },
    )?;
    let without = rings_agree(&tb, &spec)?;
    assert!(!without.is_empty());
    for k in 0..LBS {
        let ev = tb.lb_on(k, &["events"]);
        assert!(ev.stdout.contains("down"), "LB {k}'s events: {}", ev.stdout);
    }
    tb.restart_server(1)?;
    try_wait_for(
        "every LB's ring with be2 again",
        Duration::from_secs(10),
        || {
            Ok((0..LBS).all(|k| {
                tb.ring_on(k, &spec)
                    .is_ok_and(|r| r.contains(&IpAddr::V4(be2)))
            }))
        },
    )?;
    assert_eq!(rings_agree(&tb, &spec)?, full, "back to the very same ring");

    // Views that differ: be2 stops answering LB 0's probes only (its replies to LB 0's
    // address are blackholed); LB 0 takes it out, the others keep it. When LB 0 hears from
    // it again, every ring is the very same again.
    let lb0 = tb.lbs()[0].v4.to_string();
    let be = &tb.backends()[1];
    be.ns
        .ip(&["route", "add", "blackhole", &format!("{lb0}/32")])?;
    try_wait_for("LB 0's ring without be2", Duration::from_secs(10), || {
        Ok(!tb.ring_on(0, &spec)?.contains(&IpAddr::V4(be2)))
    })?;
    for k in 1..LBS {
        assert_eq!(tb.ring_on(k, &spec)?, full, "LB {k} still sees be2 up");
    }
    be.ns
        .ip(&["route", "del", "blackhole", &format!("{lb0}/32")])?;
    try_wait_for(
        "LB 0's ring with be2 again",
        Duration::from_secs(10),
        || Ok(tb.ring_on(0, &spec)?.contains(&IpAddr::V4(be2))),
    )?;
    assert_eq!(
        rings_agree(&tb, &spec)?,
        full,
        "views agree again: the same ring"
    );

    // No backend passes: every LB withdraws the VIP's address, and announces it again when
    // one comes back.
    for i in 0..3 {
        tb.kill_server(i);
    }
    let vip = spec.address;
    wait_next_hops(&tb, vip, 0, Duration::from_secs(10))?;
    for k in 0..LBS {
        let ev = tb.lb_on(k, &["events"]);
        assert!(
            ev.stdout.contains("withdrawn"),
            "LB {k}'s events: {}",
            ev.stdout
        );
    }
    tb.restart_server(0)?;
    wait_next_hops(&tb, vip, LBS, Duration::from_secs(10))?;
    tb.down()
}

/// Why stateless VIPs exist. Long-lived connections talk through two VIPs over the same
/// three backends, one stateless and one conntrack. The backend with the most of them is
/// drained on every LB, then an LB that carries them is killed: its flows (and, with the
/// router's hash-threshold multipath, some of the others') move to LBs that never saw them.
/// A conntrack LB that has no entry for a moved flow sends it by the ring, which no longer
/// names the drained backend: those connections are reset (counted, not asserted: which
/// flows move is the router's choice). A stateless LB never had entries to lose: the new
/// primary sends each packet on to the drained backend, and not one connection breaks.
#[test]
fn after_a_drain_losing_an_lb_breaks_no_stateless_connection() -> Result<()> {
    const CONNS: usize = 30;
    let webs = VipSpec::stateless("webs", IpAddr::from([198, 18, 10, 3]));
    let webc = VipSpec::tcp("webc", IpAddr::from([198, 18, 10, 4]), Forwarding::Gue);
    let mut tb = cluster_with(&[webs.clone(), webc.clone()])?;
    let ts = Talkers::start(&tb, webs.socket_addr(), CONNS)?;
    let tc = Talkers::start(&tb, webc.socket_addr(), CONNS)?;

    let mut on: BTreeMap<String, usize> = BTreeMap::new();
    for e in ts.snapshot().values() {
        *on.entry(e.backend.clone()).or_default() += 1;
    }
    let (name, _) = on.iter().max_by_key(|(_, n)| **n).unwrap();
    let drained = tb
        .backends()
        .iter()
        .find(|b| &b.name == name)
        .unwrap()
        .addr(false)
        .to_string();
    for k in 0..LBS {
        for vip in ["webs", "webc"] {
            let out = tb.lb_on(k, &["backend", "drain", vip, &drained]);
            ensure!(out.ok(), "LB {k}: drain {vip}: {}", out.stderr);
        }
    }
    thread::sleep(Duration::from_millis(500));
    let busy = busy_lbs(&tb, "webs");
    ensure!(!busy.is_empty(), "no LB carries the stateless VIP");
    let mut agent = tb.take_agent_on(busy[0]).unwrap();
    agent.kill9()?;
    wait_next_hops(&tb, webs.address, LBS - 1, WITHDRAW)?;
    let a0 = ts.answered();
    thread::sleep(Duration::from_millis(1500));
    ensure!(
        ts.answered() > a0,
        "the stateless connections stopped talking"
    );
    let (s, c) = (ts.finish()?, tc.finish()?);
    let broken = |m: &BTreeMap<SocketAddr, Seen>| -> Vec<String> {
        m.iter()
            .filter(|(_, e)| !e.errors.is_empty())
            .map(|(a, e)| format!("{a} on {}: {:?}", e.backend, e.errors))
            .collect()
    };
    let on_drained =
        |m: &BTreeMap<SocketAddr, Seen>| m.values().filter(|e| &e.backend == name).count();
    println!(
        "drained {name} ({drained}) on every LB, then killed LB {}: stateless {} of {CONNS} \
         connections broken ({} were on {name}); conntrack {} of {CONNS} broken ({} were on \
         {name})",
        busy[0],
        broken(&s).len(),
        on_drained(&s),
        broken(&c).len(),
        on_drained(&c)
    );
    ensure!(
        broken(&s).is_empty(),
        "stateless connections broken: {:#?}",
        broken(&s)
    );
    drop(agent);
    tb.down()
}
