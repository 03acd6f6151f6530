//! Stateless (second-chance) VIPs through the testbed, with real TCP: the LB keeps no
//! connection table, so whatever happens to it, a connection is found again by the
//! backends themselves. A client downloads 50 MiB (`GET /bytes`, byte-checked, read slowly
//! through a small receive buffer so every byte needs ACKs through the LB) while:
//!
//! 1. the LB restarts with its maps removed (`kill -9`, `lb agent --stop`, a fresh start):
//!    nothing to lose;
//! 2. weights change so that the connection's ring slot moves to another backend: the new
//!    primary has no such connection and sends each packet on to the secondary, the
//!    connection's own backend (decap's `redirected` counters grow);
//! 3. the agent is `kill -9`ed and restarted (the maps stay): the live ring keeps the
//!    secondary;
//! 4. the weights are equal again (the slot returns) and the connection's own backend is
//!    drained:
//!    its slots move, new connections never land on it, the download goes on through the
//!    second chance (each change moves the slot once: a slot that moves twice before its
//!    connection ends may have neither backend of the connection in its pair);
//! 5. the LB restarts with its maps removed again, while the drain goes on: the secondary
//!    comes from the ring that still counts draining backends.
//!
//! After each: the download makes progress and is established on its backend. It ends with
//! exactly the pattern's bytes, a clean end of stream, no TCP reset anywhere (client or
//! backends), and nothing of the testbed left. Needs root.
use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use lb_common::{flow_hash, ring_slot, DecapReason, PROTO_TCP};
use lb_tests::{
    netns::unique_name,
    packets::flow_key,
    testbed::{assert_clean, Testbed, TestbedOpts, VipSpec},
    transfer::*,
};
use lb_userspace::config::Config;

const VIP4: [u8; 4] = [198, 18, 10, 80];

fn opts(prefix: &str) -> TestbedOpts {
    TestbedOpts::default()
        .prefix(&unique_name(prefix))
        .server_bin(env!("CARGO_BIN_EXE_lb-testbed-server"))
        .backends(3)
}

/// What the download is doing, seen from outside, and the config of its VIP.
struct Conn {
    w: Watch,
    spec: VipSpec,
    cfg: Config,
}

impl Conn {
    /// The connection's ring slot (rings of `agent.ring_size` slots).
    fn slot(&self) -> usize {
        let flow = flow_key(
            self.w.local.ip(),
            self.w.local.port(),
            self.spec.address,
            self.spec.port,
            PROTO_TCP,
        );
        let a = &self.cfg.agent;
        ring_slot(flow_hash(a.hash_seed, &flow, false), a.ring_size) as usize
    }

    /// The backend the live ring names for the connection's slot.
    fn primary(&self, tb: &Testbed) -> Result<IpAddr> {
        let ring = tb.ring_on(0, &self.spec)?;
        ensure!(
            ring.len() == self.cfg.agent.ring_size as usize,
            "ring of {} slots",
            ring.len()
        );
        Ok(ring[self.slot()])
    }

    /// Second-chance redirects the backends made so far (fast path and through the stack).
    fn redirects(tb: &Testbed) -> Result<u64> {
        let c = tb.decap_counts()?;
        Ok(c[DecapReason::Redirected as usize] + c[DecapReason::RedirectedStack as usize])
    }
}

/// The LB loses everything: `kill -9`, its pins and program removed, a fresh start.
fn restart_empty(tb: &mut Testbed) -> Result<()> {
    let agent = tb.agent_mut().context("agent")?;
    agent.kill9()?;
    let (out, _) = agent.stop()?;
    ensure!(out.ok(), "lb agent --stop: {}", out.stderr.trim());
    agent.spawn()?;
    let st = tb.lb_json(&["status"])?;
    ensure!(
        st["adopted"] == false,
        "a start on removed maps adopts: {st}"
    );
    Ok(())
}

fn weight(tb: &Testbed, spec: &VipSpec, backend: IpAddr, w: u32) -> Result<()> {
    let (b, w) = (backend.to_string(), w.to_string());
    lb(tb, &["backend", "weight", &spec.name, &b, &w])
}

fn events(tb: &mut Testbed, c: &mut Conn) -> Result<()> {
    let vip = c.spec.socket_addr();
    wait_received(&c.w.shared, STEP, "the start")?;
    ensure!(
        c.primary(tb)? == c.w.own_addr,
        "the ring names {} for the connection, but {} answered",
        c.primary(tb)?,
        c.w.own_addr
    );
    c.w.progress(&format!("started on {}", c.w.own_addr))?;

    // 1. An LB that lost everything finds the same primary: nothing was needed.
    restart_empty(tb)?;
    c.w.progress("LB restarted with its maps removed")?;

    // 2. A weight that moves the connection's slot away from its backend, in one change
    // (a slot that moves twice before its connection ends may lose it: the README says
    // so): the lightest weight for its backend whose ring, built here from the config
    // with the agent's own function, puts the slot elsewhere.
    let before = Conn::redirects(tb)?;
    let mut cfg = c.cfg.clone();
    let slot = c.slot();
    let own = cfg.vips[0]
        .backends
        .iter()
        .position(|b| b.address == c.w.own_addr)
        .context("own backend not in the config")?;
    let light = (1..100)
        .find(|&w| {
            cfg.vips[0].backends[own].weight = w;
            lb_userspace::reconcile::ring_addresses(&cfg, &cfg.vips[0])
                .is_ok_and(|r| r[slot] != c.w.own_addr)
        })
        .context("no weight moves the slot")?;
    weight(tb, &c.spec, c.w.own_addr, light)?;
    let moved_to = c.primary(tb)?;
    ensure!(
        moved_to != c.w.own_addr,
        "the weights did not move the connection's slot (still {moved_to})"
    );
    c.w.progress(&format!("slot moved to {moved_to} by weights"))?;
    let after = Conn::redirects(tb)?;
    ensure!(
        after > before,
        "the slot moved but no backend redirected anything ({before} -> {after})"
    );

    // 3. The agent dies; the maps (and the ring's secondaries) stay.
    let agent = tb.agent_mut().context("agent")?;
    agent.kill9()?;
    agent.spawn()?;
    c.w.progress("agent killed (-9) and restarted")?;
    ensure!(
        c.primary(tb)? == moved_to,
        "the restart moved the slot again"
    );

    // 4. Its weight back, in one change (the ring depends only on the config): the slot
    // returns. Then drain the connection's own backend.
    weight(
        tb,
        &c.spec,
        c.w.own_addr,
        c.cfg.vips[0].backends[own].weight,
    )?;
    ensure!(
        c.primary(tb)? == c.w.own_addr,
        "equal weights again, but the slot is on {}",
        c.primary(tb)?
    );
    c.w.progress("weights back: the slot returned")?;
    lb(
        tb,
        &["backend", "drain", &c.spec.name, &c.w.own_addr.to_string()],
    )?;
    ensure!(
        c.primary(tb)? != c.w.own_addr,
        "drained, yet still the primary"
    );
    let own_name = c.w.own.clone();
    let answered = probe(tb, vip, &own_name, "after the drain")?;
    c.w.progress(&format!(
        "drained its backend; new connections: {answered:?}"
    ))?;

    // 5. The LB loses everything again, while the drain goes on.
    restart_empty(tb)?;
    ensure!(
        listed(tb, &c.spec.name, c.w.own_addr)?.1,
        "the drain was lost in the restart"
    );
    probe(tb, vip, &own_name, "after the empty restart")?;
    c.w.progress("LB restarted with its maps removed, draining")
}

fn download_survives(v6: bool) -> Result<()> {
    let t0 = Instant::now();
    let mut tb = Testbed::up(opts(if v6 { "lbsl6" } else { "lbsl4" }))?;
    let prefix = tb.prefix().to_string();
    let address: IpAddr = if v6 {
        "2001:db8:10::80".parse()?
    } else {
        IpAddr::from(VIP4)
    };
    let spec = VipSpec::stateless("web", address);
    let cfg = tb.agent_config(std::slice::from_ref(&spec))?;
    tb.start_agent(&cfg)?;
    let vips = tb.lb_json(&["vip", "list"])?;
    ensure!(
        vips[0]["mode"] == "stateless",
        "`lb vip list` does not show the mode: {vips}"
    );
    let resets_before = resets(&tb)?;

    let addr = spec.socket_addr();
    let run = Running::start(&tb, addr);
    let mut c = Conn {
        w: Watch {
            shared: run.shared.clone(),
            t0,
            local: addr,
            own: String::new(),
            own_netns: String::new(),
            own_addr: addr.ip(),
            packets: 0,
            log: Vec::new(),
        },
        spec,
        cfg,
    };
    let done = run.head().and_then(|head| {
        let own = tb
            .backends()
            .iter()
            .find(|b| b.name == head.backend)
            .with_context(|| format!("answered by {:?}", head.backend))?;
        c.w.local = head.local;
        c.w.own = head.backend;
        c.w.own_netns = own.netns().to_string();
        c.w.own_addr = own.addr(v6);
        events(&mut tb, &mut c)
    });
    let label = if v6 { "stateless6" } else { "stateless4" };
    let counts = tb.decap_counts().unwrap_or_default();
    eprintln!("{label}: decap counters {counts:?}");
    let d = run.finish(label, done, &c.w.log)?;
    eprintln!(
        "{label}: {} bytes in {:.2}s, byte for byte; test {:.2}s",
        d.bytes,
        d.elapsed.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    no_new_resets(&tb, resets_before, label)?;
    tb.down()?;
    assert_clean(&prefix)
}

#[test]
fn stateless_ipv4_download_survives_empty_lb_restarts_slot_moves_kill_9_and_drain() -> Result<()> {
    download_survives(false)
}

#[test]
fn stateless_ipv6_download_survives_empty_lb_restarts_slot_moves_kill_9_and_drain() -> Result<()> {
    download_survives(true)
}

/// A `TcpExt:` counter of `/proc/net/netstat` in a backend's namespace.
fn tcp_ext(tb: &Testbed, i: usize, name: &str) -> Result<u64> {
    let text = tb.backends()[i].exec(&["cat", "/proc/net/netstat"])?;
    let mut ext = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = ext.next().zip(ext.next()).context("no TcpExt lines")?;
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
        .with_context(|| format!("no TcpExt {name}"))
}

/// The connections a backend owns without a socket the lookup would find, and the ones it
/// keeps after they close: with SYN cookies always on (`tcp_syncookies = 2`: no request
/// socket, the handshake's ACK meets only the listener) and servers that close first
/// (TIME_WAIT on the backend), every request through a stateless VIP whose slots carry
/// secondaries succeeds and not one packet is redirected: the ACK is the listener's by its
/// cookie, the last ACK the TIME_WAIT socket's. (Were either sent on to the secondary, it
/// would answer with a reset: the request would fail, `redirected` or `no_second_chance`
/// would count it.)
#[test]
fn syn_cookie_handshakes_and_time_wait_stay_on_their_backend() -> Result<()> {
    const REQUESTS: usize = 60;
    let mut tb = Testbed::up(opts("lbslck"))?;
    let prefix = tb.prefix().to_string();
    for b in tb.backends() {
        b.ns.sysctl("net.ipv4.tcp_syncookies", "2")?;
    }
    let spec = VipSpec::stateless("web", IpAddr::from(VIP4));
    tb.start_agent(&tb.agent_config(std::slice::from_ref(&spec))?)?;
    let ring = tb.ring_on(0, &spec)?;
    ensure!(!ring.is_empty(), "empty ring");
    let before = tb.decap_counts()?;
    let cookies: u64 = (0..3)
        .map(|i| tcp_ext(&tb, i, "SyncookiesRecv"))
        .sum::<Result<u64>>()?;
    let addr = spec.socket_addr();
    let answered = tb.in_client(|| {
        (0..REQUESTS)
            .map(|_| lb_tests::testbed::http_get(addr, "/", Duration::from_secs(5)))
            .collect::<Result<Vec<_>>>()
    })??;
    ensure!(answered.len() == REQUESTS);
    // The backends' last ACKs arrive just after the client's close.
    std::thread::sleep(Duration::from_millis(300));
    let after = tb.decap_counts()?;
    let d = |r: DecapReason| after[r as usize] - before[r as usize];
    let cookies_now: u64 = (0..3)
        .map(|i| tcp_ext(&tb, i, "SyncookiesRecv"))
        .sum::<Result<u64>>()?;
    ensure!(
        cookies_now - cookies >= REQUESTS as u64,
        "{} handshakes completed by a SYN cookie, want {REQUESTS}",
        cookies_now - cookies
    );
    ensure!(
        d(DecapReason::Redirected) + d(DecapReason::RedirectedStack) == 0
            && d(DecapReason::NoSecondChance) == 0,
        "redirected {} (+{} via the stack), no second chance {}: {before:?} -> {after:?}",
        d(DecapReason::Redirected),
        d(DecapReason::RedirectedStack),
        d(DecapReason::NoSecondChance)
    );
    ensure!(
        d(DecapReason::Decapped) >= 5 * REQUESTS as u64,
        "only {} packets decapsulated",
        d(DecapReason::Decapped)
    );
    tb.down()?;
    assert_clean(&prefix)
}
