//! One long-lived TCP connection through a VIP survives everything an operator does to the
//! load balancer while it runs. A client in the testbed downloads 50 MiB (`GET /bytes`),
//! reading slowly through a small receive buffer, so the server can never be far ahead:
//! until the last byte, every byte needs ACKs that go through the LB's XDP program. While
//! it flows, through the `lb` CLI only:
//!
//! 1. another backend is added to the VIP and another (not the connection's own) removed,
//! 2. the weights of other backends change,
//! 3. the connection's own backend is drained: the download keeps flowing, new connections
//!    never land on it,
//! 4. the agent is `kill -9`ed (the download flows on with no agent) and restarted,
//! 5. the agent is upgraded: it exits (SIGTERM) and a new run loads a new program instance
//!    into the pinned link (`lb status --json` `program_id` changes).
//!
//! After each event the download must make progress and still be established on the same
//! backend. It must end with exactly the pattern's bytes (else: the first differing
//! offset), a clean end of stream, no TCP reset anywhere, and nothing of the testbed left.
//! Needs root.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use lb_tests::{
    netns::{fmt_mac, run, spawn_in_netns, unique_name},
    testbed::{assert_clean, fill_pattern, http_get, ForwardingPath, Host, Testbed, TestbedOpts},
};
use serde_json::Value;

/// What the client downloads: 50 MiB.
const TOTAL: u64 = 50 << 20;
/// The client's pace until every event is done (then it reads as fast as it can).
const SLOW_RATE: f64 = 3.0 * (1 << 20) as f64;
/// The client's receive buffer (the kernel doubles it): the server stays close behind.
const RCVBUF: libc::c_int = 64 << 10;
/// Progress the download must make after each event.
const STEP: u64 = 1 << 20;
/// New connections checked after the drain, the restart and the upgrade.
const PROBES: usize = 12;
const TIMEOUT: Duration = Duration::from_secs(10);

fn opts() -> TestbedOpts {
    TestbedOpts::default()
        .prefix(&unique_name("lblong"))
        .server_bin(env!("CARGO_BIN_EXE_lb-testbed-server"))
        .backends(4)
}

// ---------------------------------------------------------------------------------------
// The download

/// Shared between the test and the downloading thread.
#[derive(Default)]
struct Shared {
    /// Body bytes received (and checked) so far.
    received: AtomicU64,
    /// Stop pacing.
    fast: AtomicBool,
    /// The test failed: give up.
    stop: AtomicBool,
    /// The downloading thread has ended.
    done: AtomicBool,
}

/// Sets `stop` when dropped: the download ends with the test, however it ends.
struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Relaxed);
    }
}

/// What the response's head said: sent to the test as soon as it is read.
#[derive(Clone, Debug)]
struct Head {
    local: SocketAddr,
    backend: String,
}

#[derive(Debug)]
struct Download {
    bytes: u64,
    elapsed: Duration,
}

/// `GET /bytes?n=TOTAL` over one connection; every chunk is compared with the pattern as
/// it arrives. Errors name the offset: a differing byte, a reset, an early end of stream.
fn download(addr: SocketAddr, shared: &Shared, head_tx: mpsc::Sender<Head>) -> Result<Download> {
    struct Done<'a>(&'a Shared);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.done.store(true, Ordering::Relaxed);
        }
    }
    let _done = Done(shared);
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    // Small and fixed (no autotuning): at most ~RCVBUF waits unread in the client.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &RCVBUF as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    ensure!(r == 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
    s.set_read_timeout(Some(TIMEOUT))?;
    let local = s.local_addr()?;
    write!(
        s,
        "GET /bytes?n={TOTAL} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut r = BufReader::with_capacity(16 << 10, s);
    let mut line = String::new();
    r.read_line(&mut line).context("status line")?;
    ensure!(line.starts_with("HTTP/1.1 200 "), "status line {line:?}");
    let (mut backend, mut len) = (None, None);
    loop {
        line.clear();
        ensure!(
            r.read_line(&mut line)? > 0,
            "connection closed in the headers"
        );
        let h = line.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("x-backend") {
                backend = Some(v.trim().to_string());
            } else if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse::<u64>().ok();
            }
        }
    }
    let backend = backend.context("no X-Backend header")?;
    ensure!(len == Some(TOTAL), "Content-Length {len:?}, want {TOTAL}");
    let _ = head_tx.send(Head { local, backend });

    let mut buf = vec![0u8; 16 << 10];
    let mut want = vec![0u8; buf.len()];
    let mut off = 0u64;
    // (since, from byte): reading at SLOW_RATE.
    let mut pace = (Instant::now(), 0u64);
    while off < TOTAL {
        ensure!(
            !shared.stop.load(Ordering::Relaxed),
            "stopped at byte {off}: the test failed"
        );
        if !shared.fast.load(Ordering::Relaxed) {
            let now = Instant::now();
            let due = pace.0 + Duration::from_secs_f64((off - pace.1) as f64 / SLOW_RATE);
            match due.checked_duration_since(now) {
                Some(d) => thread::sleep(d),
                // Behind (a stall): go on at the pace from here, no catching up in a burst.
                None if now - due > Duration::from_millis(50) => pace = (now, off),
                None => {}
            }
        }
        let k = (TOTAL - off).min(buf.len() as u64) as usize;
        let n = r
            .read(&mut buf[..k])
            .with_context(|| format!("reading at byte {off} of {TOTAL}"))?;
        ensure!(n > 0, "end of stream at byte {off} of {TOTAL}");
        fill_pattern(off, &mut want[..n]);
        if let Some(i) = buf[..n].iter().zip(&want).position(|(a, b)| a != b) {
            bail!(
                "byte {} differs from the pattern: got {:#04x}, want {:#04x}",
                off + i as u64,
                buf[i],
                want[i]
            );
        }
        off += n as u64;
        shared.received.store(off, Ordering::Relaxed);
    }
    // `Connection: close`: the server closes after the body, a FIN, not a reset.
    let mut extra = [0u8; 1];
    match r.read(&mut extra) {
        Ok(0) => {}
        Ok(_) => bail!("bytes after the body's {TOTAL}"),
        Err(e) => bail!("after the whole body: {e} (want a clean end of stream)"),
    }
    Ok(Download {
        bytes: off,
        elapsed: start.elapsed(),
    })
}

// ---------------------------------------------------------------------------------------
// Looking at it from outside

/// Wait until the download has `n` bytes; fails if it ends first (its error says why).
fn wait_received(shared: &Shared, n: u64, what: &str) -> Result<u64> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let got = shared.received.load(Ordering::Relaxed);
        if got >= n {
            ensure!(
                got < TOTAL,
                "{what}: the download finished already: the event was not mid-transfer"
            );
            return Ok(got);
        }
        ensure!(
            !shared.done.load(Ordering::Relaxed),
            "{what}: the download ended at byte {got}"
        );
        ensure!(
            Instant::now() < deadline,
            "{what}: the download is stuck at byte {got} (want {n})"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// A counter of the `Tcp:` line of `/proc/net/snmp` in a host's namespace.
fn tcp_counter(host: &Host, name: &str) -> Result<u64> {
    let snmp = host.exec(&["cat", "/proc/net/snmp"])?;
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next(), tcp.next());
    let (names, values) = names
        .zip(values)
        .context("no Tcp: lines in /proc/net/snmp")?;
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
        .with_context(|| format!("no Tcp {name} in /proc/net/snmp"))
}

/// Resets: received on established connections by the client, sent by any backend.
fn resets(tb: &Testbed) -> Result<(u64, u64)> {
    let client = tcp_counter(tb.client(), "EstabResets")?;
    let mut sent = 0;
    for b in tb.backends() {
        sent += tcp_counter(b, "OutRsts")?;
    }
    Ok((client, sent))
}

/// The client's connection is established in backend namespace `netns` (`ss` there).
fn established_in(netns: &str, client: SocketAddr) -> Result<bool> {
    let port = format!(":{}", client.port());
    let out = run(
        "ip",
        &[
            "netns",
            "exec",
            netns,
            "ss",
            "-Htn",
            "state",
            "established",
            "dport",
            "=",
            &port,
        ],
    )?;
    Ok(out.lines().any(|l| l.contains(&client.ip().to_string())))
}

/// Packets of a backend (over all VIPs) the LB forwarded, from `lb stats`.
fn backend_packets(tb: &Testbed, addr: IpAddr) -> Result<u64> {
    let stats = tb.lb_json(&["stats"])?;
    stats["backends"]
        .as_array()
        .context("stats backends")?
        .iter()
        .find(|b| b["address"] == addr.to_string())
        .and_then(|b| b["packets"].as_u64())
        .with_context(|| format!("no backend {addr} in `lb stats`: {stats}"))
}

fn program_id(tb: &Testbed) -> Result<u64> {
    let st = tb.lb_json(&["status"])?;
    st["program_id"]
        .as_u64()
        .with_context(|| format!("no program_id in `lb status`: {st}"))
}

fn lb(tb: &Testbed, args: &[&str]) -> Result<()> {
    let out = tb.lb(args);
    ensure!(
        out.ok(),
        "`lb {}` failed: {}",
        args.join(" "),
        out.stderr.trim()
    );
    Ok(())
}

/// `PROBES` new connections: all answered, none by `not`. Returns who answered.
fn probe(tb: &Testbed, addr: SocketAddr, not: &str, when: &str) -> Result<Vec<String>> {
    let answered = tb.in_client(|| {
        (0..PROBES)
            .map(|_| http_get(addr, "/", TIMEOUT).map(|r| r.backend().to_string()))
            .collect::<Result<Vec<_>>>()
    })??;
    ensure!(
        !answered.iter().any(|b| b == not),
        "{when}: a new connection landed on the drained {not}: {answered:?}"
    );
    Ok(answered)
}

// ---------------------------------------------------------------------------------------

/// The download seen from outside, after each event.
struct Watch {
    shared: Arc<Shared>,
    t0: Instant,
    /// The connection: client end, backend (name, namespace, address on the VIP).
    local: SocketAddr,
    own: String,
    own_netns: String,
    own_addr: IpAddr,
    /// Packets the LB has forwarded to `own` so far.
    packets: u64,
    log: Vec<String>,
}

impl Watch {
    fn note(&mut self, got: u64, what: &str) {
        self.log.push(format!(
            "{:>6.2}s {got:>9} bytes  {what}",
            self.t0.elapsed().as_secs_f64()
        ));
    }

    /// After an event: the download flows on ([`STEP`] more bytes), is still established on
    /// its backend, and the LB still forwards (its ACKs) to that backend.
    fn mark(&mut self, tb: &Testbed, what: &str) -> Result<()> {
        let at = self.shared.received.load(Ordering::Relaxed);
        let got = wait_received(&self.shared, at + STEP, what)?;
        ensure!(
            established_in(&self.own_netns, self.local)?,
            "{what}: {} is established on {} no more",
            self.local,
            self.own
        );
        let p = backend_packets(tb, self.own_addr)?;
        ensure!(
            p > self.packets,
            "{what}: the LB forwarded nothing more to {} ({p} packets)",
            self.own
        );
        self.packets = p;
        self.note(got, what);
        Ok(())
    }
}

/// The VIP's backends' addresses (sorted) from `lb backend list`, and whether `addr` is
/// drained.
fn listed(tb: &Testbed, vip: &str, addr: IpAddr) -> Result<(Vec<String>, bool)> {
    let v = tb.lb_json(&["backend", "list", vip])?;
    let list = v.as_array().context("backend list")?;
    let mut addrs: Vec<String> = list
        .iter()
        .map(|b| b["address"].as_str().unwrap_or_default().to_string())
        .collect();
    addrs.sort();
    let drained = list
        .iter()
        .any(|b| b["address"] == addr.to_string() && b["drain"] == Value::Bool(true));
    Ok((addrs, drained))
}

/// Steps 1-5 of the module doc, the download started on `shared`.
fn events(
    tb: &mut Testbed,
    vip: &str,
    v6: bool,
    addr: SocketAddr,
    head: Head,
    w: &mut Watch,
) -> Result<()> {
    let own = tb
        .backends()
        .iter()
        .position(|b| b.name == head.backend)
        .with_context(|| format!("answered by {:?}, not a backend", head.backend))?;
    ensure!(own < 3, "answered by {}, not on the VIP", head.backend);
    let bes: Vec<(String, IpAddr, String)> = tb
        .backends()
        .iter()
        .map(|b| (b.name.clone(), b.addr(v6), fmt_mac(b.mac)))
        .collect();
    // The others on the VIP: one is removed, one stays; be4 is added.
    let others: Vec<usize> = (0..3).filter(|&i| i != own).collect();
    let (gone, kept, added) = (&bes[others[0]], &bes[others[1]], &bes[3]);
    w.own = head.backend.clone();
    w.own_netns = tb.backends()[own].netns().to_string();
    w.own_addr = bes[own].1;
    w.packets = backend_packets(tb, w.own_addr)?;
    let own_addr = w.own_addr.to_string();
    let mut programs = vec![program_id(tb)?];

    wait_received(&w.shared, STEP, "the start")?;
    w.mark(tb, &format!("started on {own_addr} ({})", w.own))?;

    // 1. Another backend in, another out.
    let added_addr = added.1.to_string();
    lb(tb, &["backend", "add", vip, &added_addr, "--mac", &added.2])?;
    lb(tb, &["backend", "remove", vip, &gone.1.to_string()])?;
    let mut want = vec![own_addr.clone(), kept.1.to_string(), added_addr.clone()];
    want.sort();
    let (now, _) = listed(tb, vip, w.own_addr)?;
    ensure!(
        now == want,
        "backends after add/remove: {now:?}, want {want:?}"
    );
    w.mark(tb, &format!("added {}, removed {}", added.0, gone.0))?;

    // 2. Other backends' weights.
    lb(tb, &["backend", "weight", vip, &kept.1.to_string(), "30"])?;
    lb(tb, &["backend", "weight", vip, &added_addr, "250"])?;
    w.mark(tb, &format!("weights {} 30, {} 250", kept.0, added.0))?;

    // 3. Drain its own backend.
    lb(tb, &["backend", "drain", vip, &own_addr])?;
    ensure!(listed(tb, vip, w.own_addr)?.1, "{own_addr} not drained");
    let answered = probe(tb, addr, &w.own, "after the drain")?;
    w.mark(
        tb,
        &format!("drained {}; new connections: {answered:?}", w.own),
    )?;

    // 4. kill -9 the agent: the data plane carries on alone; then restart it.
    tb.agent_mut().context("agent")?.kill9()?;
    let at = w.shared.received.load(Ordering::Relaxed);
    let got = wait_received(&w.shared, at + STEP, "with no agent running")?;
    w.note(got, "flowing with the agent killed");
    tb.agent_mut().context("agent")?.spawn()?;
    let st = tb.lb_json(&["status"])?;
    ensure!(st["adopted"] == true, "restart after kill -9 adopts: {st}");
    let p = program_id(tb)?;
    ensure!(
        !programs.contains(&p),
        "restart: program {p}, seen {programs:?}"
    );
    programs.push(p);
    ensure!(listed(tb, vip, w.own_addr)?.1, "drain lost in the restart");
    probe(tb, addr, &w.own, "after kill -9 and restart")?;
    w.mark(tb, &format!("agent killed (-9), restarted: program {p}"))?;

    // 5. Upgrade: the agent exits, a new run swaps its program into the pinned link.
    let agent = tb.agent_mut().context("agent")?;
    agent.signal(libc::SIGTERM)?;
    let st = agent.wait_exit(Duration::from_secs(5))?;
    ensure!(st.success(), "agent exit on SIGTERM: {st}");
    agent.spawn()?;
    let st = tb.lb_json(&["status"])?;
    ensure!(st["adopted"] == true, "upgrade adopts: {st}");
    let p = program_id(tb)?;
    ensure!(
        !programs.contains(&p),
        "upgrade: program {p}, seen {programs:?}: no new program in the link"
    );
    probe(tb, addr, &w.own, "after the upgrade")?;
    w.mark(tb, &format!("upgraded (SIGTERM, new run): program {p}"))
}

/// One forwarding path: the VIP with be1..be3, the download, the events, the checks.
fn long_transfer_survives_operations(label: &str) -> Result<()> {
    let t0 = Instant::now();
    let mut tb = Testbed::up(opts())?;
    let prefix = tb.prefix().to_string();
    tb.start_agent(&tb.agent_config(&[])?)?;
    let spec = ForwardingPath::get(label).tcp();
    // The VIP with be1..be3, as an operator would type it; be4 comes later.
    for cmd in tb.cli_commands(&spec).iter().take(4) {
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        lb(&tb, &args)?;
    }
    let addr = spec.socket_addr();
    let resets_before = resets(&tb)?;

    let shared = Arc::new(Shared::default());
    let _stop = StopOnDrop(shared.clone());
    let (head_tx, head_rx) = mpsc::channel();
    let downloader = {
        let shared = shared.clone();
        spawn_in_netns(tb.client().netns(), move || {
            download(addr, &shared, head_tx)
        })
    };
    let mut w = Watch {
        shared: shared.clone(),
        t0,
        local: addr,
        own: String::new(),
        own_netns: String::new(),
        own_addr: addr.ip(),
        packets: 0,
        log: Vec::new(),
    };
    let done = head_rx
        .recv_timeout(TIMEOUT)
        .map_err(|_| anyhow!("no response head from the VIP"))
        .and_then(|head| {
            w.local = head.local;
            events(&mut tb, &spec.name, spec.backends_v6, addr, head, &mut w)
        });
    // Done: the download finishes at full speed. Failed: it stops.
    if done.is_err() {
        shared.stop.store(true, Ordering::Relaxed);
    }
    shared.fast.store(true, Ordering::Relaxed);
    let download = downloader
        .join()
        .map_err(|_| anyhow!("the downloading thread panicked"))
        .and_then(|r| r)
        .and_then(|r| r);
    for l in &w.log {
        eprintln!("{label}: {l}");
    }
    match (done, download) {
        (Err(e), d) => {
            let d = d.map_or_else(|e| format!("{e:#}"), |d| format!("{d:?}"));
            bail!("{label}: {e:#}\n  download: {d}");
        }
        (Ok(()), Err(e)) => bail!("{label}: the download failed: {e:#}"),
        (Ok(()), Ok(d)) => {
            ensure!(d.bytes == TOTAL, "{label}: {} bytes of {TOTAL}", d.bytes);
            eprintln!(
                "{label}: {} bytes from {} in {:.2}s, byte for byte; test {:.2}s",
                d.bytes,
                w.own,
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
fn long_download_through_ipip_ipv4_survives_backend_changes_drain_kill_9_and_upgrade() -> Result<()>
{
    long_transfer_survives_operations("ipip4")
}

#[test]
fn long_download_through_gue_ipv6_survives_backend_changes_drain_kill_9_and_upgrade() -> Result<()>
{
    long_transfer_survives_operations("gue6")
}
