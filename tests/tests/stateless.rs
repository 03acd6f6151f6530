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
    net::{IpAddr, SocketAddr},
    sync::{atomic::Ordering, mpsc, Arc},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use lb_common::{flow_hash, ring_slot, DecapReason, PROTO_TCP};
use lb_tests::{
    netns::{spawn_in_netns, unique_name},
    packets::flow_key,
    testbed::{assert_clean, Testbed, TestbedOpts, VipSpec},
    transfer::*,
};

const VIP4: [u8; 4] = [198, 18, 10, 80];

fn opts(prefix: &str) -> TestbedOpts {
    TestbedOpts::default()
        .prefix(&unique_name(prefix))
        .server_bin(env!("CARGO_BIN_EXE_lb-testbed-server"))
        .backends(3)
}

/// What the download is doing, seen from outside.
struct Conn {
    shared: Arc<Shared>,
    t0: Instant,
    spec: VipSpec,
    seed: u32,
    ring_size: u32,
    local: SocketAddr,
    own: usize,
    own_netns: String,
    own_addr: IpAddr,
    log: Vec<String>,
}

impl Conn {
    /// The connection's ring slot (rings of `agent.ring_size` slots).
    fn slot(&self) -> usize {
        let flow = flow_key(
            self.local.ip(),
            self.local.port(),
            self.spec.address,
            self.spec.port,
            PROTO_TCP,
        );
        ring_slot(flow_hash(self.seed, &flow, false), self.ring_size) as usize
    }

    /// The backend the live ring names for the connection's slot.
    fn primary(&self, tb: &Testbed) -> Result<IpAddr> {
        let ring = tb.ring_on(0, &self.spec)?;
        ensure!(
            ring.len() == self.ring_size as usize,
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

    /// After an event: [`STEP`] more bytes, still established on its own backend.
    fn mark(&mut self, what: &str) -> Result<()> {
        let at = self.shared.received.load(Ordering::Relaxed);
        let got = wait_received(&self.shared, at + STEP, what)?;
        ensure!(
            established_in(&self.own_netns, self.local)?,
            "{what}: {} is established on {} no more",
            self.local,
            self.own_addr
        );
        self.log.push(format!(
            "{:>6.2}s {got:>9} bytes  {what}",
            self.t0.elapsed().as_secs_f64()
        ));
        Ok(())
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

fn weights(tb: &Testbed, spec: &VipSpec, w: &[(IpAddr, u32)]) -> Result<()> {
    for (a, n) in w {
        lb(
            tb,
            &[
                "backend",
                "weight",
                &spec.name,
                &a.to_string(),
                &n.to_string(),
            ],
        )?;
    }
    Ok(())
}

fn events(tb: &mut Testbed, c: &mut Conn) -> Result<()> {
    let vip = c.spec.socket_addr();
    wait_received(&c.shared, STEP, "the start")?;
    ensure!(
        c.primary(tb)? == c.own_addr,
        "the ring names {} for the connection, but {} answered",
        c.primary(tb)?,
        c.own_addr
    );
    c.mark(&format!("started on {}", c.own_addr))?;

    // 1. An LB that lost everything finds the same primary: nothing was needed.
    restart_empty(tb)?;
    c.mark("LB restarted with its maps removed")?;

    // 2. A weight that moves the connection's slot away from its backend, in one change
    // (a slot that moves twice before its connection ends may lose it: the README says
    // so): the lightest weight for its backend whose ring, built here from the config
    // with the agent's own function, puts the slot elsewhere.
    let before = Conn::redirects(tb)?;
    let mut cfg = tb.agent_config(std::slice::from_ref(&c.spec))?;
    let slot = c.slot();
    let own = cfg.vips[0]
        .backends
        .iter()
        .position(|b| b.address == c.own_addr)
        .context("own backend not in the config")?;
    let light = (1..100)
        .find(|&w| {
            cfg.vips[0].backends[own].weight = w;
            lb_userspace::reconcile::ring_addresses(&cfg, &cfg.vips[0])
                .is_ok_and(|r| r[slot] != c.own_addr)
        })
        .context("no weight moves the slot")?;
    weights(tb, &c.spec, &[(c.own_addr, light)])?;
    let moved_to = c.primary(tb)?;
    ensure!(
        moved_to != c.own_addr,
        "the weights did not move the connection's slot (still {moved_to})"
    );
    c.mark(&format!("slot moved to {moved_to} by weights"))?;
    let after = Conn::redirects(tb)?;
    ensure!(
        after > before,
        "the slot moved but no backend redirected anything ({before} -> {after})"
    );

    // 3. The agent dies; the maps (and the ring's secondaries) stay.
    let agent = tb.agent_mut().context("agent")?;
    agent.kill9()?;
    agent.spawn()?;
    c.mark("agent killed (-9) and restarted")?;
    ensure!(
        c.primary(tb)? == moved_to,
        "the restart moved the slot again"
    );

    // 4. Its weight back, in one change (the ring depends only on the config): the slot
    // returns. Then drain the connection's own backend.
    weights(
        tb,
        &c.spec,
        &[(c.own_addr, cfg.vips[0].backends[(own + 1) % 3].weight)],
    )?;
    ensure!(
        c.primary(tb)? == c.own_addr,
        "equal weights again, but the slot is on {}",
        c.primary(tb)?
    );
    c.mark("weights back: the slot returned")?;
    lb(
        tb,
        &["backend", "drain", &c.spec.name, &c.own_addr.to_string()],
    )?;
    ensure!(
        c.primary(tb)? != c.own_addr,
        "drained, yet still the primary"
    );
    let own_name = tb.backends()[c.own].name.clone();
    let answered = probe(tb, vip, &own_name, "after the drain")?;
    c.mark(&format!(
        "drained its backend; new connections: {answered:?}"
    ))?;

    // 5. The LB loses everything again, while the drain goes on.
    restart_empty(tb)?;
    ensure!(
        listed(tb, &c.spec.name, c.own_addr)?.1,
        "the drain was lost in the restart"
    );
    probe(tb, vip, &own_name, "after the empty restart")?;
    c.mark("LB restarted with its maps removed, draining")
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
    let seed = cfg.agent.hash_seed;
    tb.start_agent(&cfg)?;
    let vips = tb.lb_json(&["vip", "list"])?;
    ensure!(
        vips[0]["mode"] == "stateless",
        "`lb vip list` does not show the mode: {vips}"
    );
    let resets_before = resets(&tb)?;

    let addr = spec.socket_addr();
    let shared = Arc::new(Shared::default());
    let _stop = StopOnDrop(shared.clone());
    let (head_tx, head_rx) = mpsc::channel();
    let downloader = {
        let shared = shared.clone();
        spawn_in_netns(tb.client().netns(), move || {
            download(addr, &shared, head_tx)
        })
    };
    let mut c = Conn {
        shared: shared.clone(),
        t0,
        spec: spec.clone(),
        seed,
        ring_size: cfg.agent.ring_size,
        local: addr,
        own: 0,
        own_netns: String::new(),
        own_addr: addr.ip(),
        log: Vec::new(),
    };
    let done = head_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| anyhow!("no response head from the VIP"))
        .and_then(|head| {
            c.local = head.local;
            c.own = tb
                .backends()
                .iter()
                .position(|b| b.name == head.backend)
                .with_context(|| format!("answered by {:?}", head.backend))?;
            c.own_netns = tb.backends()[c.own].netns().to_string();
            c.own_addr = tb.backends()[c.own].addr(v6);
            events(&mut tb, &mut c)
        });
    if done.is_err() {
        shared.stop.store(true, Ordering::Relaxed);
    }
    shared.fast.store(true, Ordering::Relaxed);
    let download = downloader
        .join()
        .map_err(|_| anyhow!("the downloading thread panicked"))
        .and_then(|r| r)
        .and_then(|r| r);
    let label = if v6 { "stateless6" } else { "stateless4" };
    for l in &c.log {
        eprintln!("{label}: {l}");
    }
    let counts = tb.decap_counts().unwrap_or_default();
    eprintln!("{label}: decap counters {counts:?}");
    match (done, download) {
        (Err(e), d) => {
            let d = d.map_or_else(|e| format!("{e:#}"), |d| format!("{d:?}"));
            bail!("{label}: {e:#}\n  download: {d}");
        }
        (Ok(()), Err(e)) => bail!("{label}: the download failed: {e:#}"),
        (Ok(()), Ok(d)) => {
            ensure!(d.bytes == TOTAL, "{label}: {} bytes of {TOTAL}", d.bytes);
            eprintln!(
                "{label}: {} bytes in {:.2}s, byte for byte; test {:.2}s",
                d.bytes,
                d.elapsed.as_secs_f64(),
                t0.elapsed().as_secs_f64()
            );
        }
    }
    let resets_after = resets(&tb)?;
    ensure!(
        resets_after == resets_before,
        "{label}: TCP resets (client EstabResets, backends OutRsts): {resets_before:?} -> \
         {resets_after:?}"
    );
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
