//! One long download through a VIP, checked byte for byte, watched from outside: the
//! machinery of the tests that keep a connection alive through operations
//! (`tests/long_transfer.rs`, `tests/stateless.rs`).
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

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::{
    netns::run,
    testbed::{fill_pattern, http_get, Host, Testbed},
};

/// What the client downloads: 50 MiB.
pub const TOTAL: u64 = 50 << 20;
/// The client's pace until every event is done (then it reads as fast as it can).
pub const SLOW_RATE: f64 = 3.0 * (1 << 20) as f64;
/// The client's receive buffer (the kernel doubles it): the server stays close behind.
pub const RCVBUF: libc::c_int = 64 << 10;
/// Progress the download must make after each event.
pub const STEP: u64 = 1 << 20;
/// New connections checked after the drain, the restart and the upgrade.
pub const PROBES: usize = 12;
pub const TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// The download

/// Shared between the test and the downloading thread.
#[derive(Default)]
pub struct Shared {
    /// Body bytes received (and checked) so far.
    pub received: AtomicU64,
    /// Stop pacing.
    pub fast: AtomicBool,
    /// The test failed: give up.
    pub stop: AtomicBool,
    /// The downloading thread has ended.
    pub done: AtomicBool,
}

/// Sets `stop` when dropped: the download ends with the test, however it ends.
pub struct StopOnDrop(pub Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Relaxed);
    }
}

/// What the response's head said: sent to the test as soon as it is read.
#[derive(Clone, Debug)]
pub struct Head {
    pub local: SocketAddr,
    pub backend: String,
}

#[derive(Debug)]
pub struct Download {
    pub bytes: u64,
    pub elapsed: Duration,
}

/// `GET /bytes?n=TOTAL` over one connection; every chunk is compared with the pattern as
/// it arrives. Errors name the offset: a differing byte, a reset, an early end of stream.
pub fn download(
    addr: SocketAddr,
    shared: &Shared,
    head_tx: mpsc::Sender<Head>,
) -> Result<Download> {
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
pub fn wait_received(shared: &Shared, n: u64, what: &str) -> Result<u64> {
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
pub fn tcp_counter(host: &Host, name: &str) -> Result<u64> {
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
pub fn resets(tb: &Testbed) -> Result<(u64, u64)> {
    let client = tcp_counter(tb.client(), "EstabResets")?;
    let mut sent = 0;
    for b in tb.backends() {
        sent += tcp_counter(b, "OutRsts")?;
    }
    Ok((client, sent))
}

/// The client's connection is established in backend namespace `netns` (`ss` there).
pub fn established_in(netns: &str, client: SocketAddr) -> Result<bool> {
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
pub fn backend_packets(tb: &Testbed, addr: IpAddr) -> Result<u64> {
    let stats = tb.lb_json(&["stats"])?;
    stats["backends"]
        .as_array()
        .context("stats backends")?
        .iter()
        .find(|b| b["address"] == addr.to_string())
        .and_then(|b| b["packets"].as_u64())
        .with_context(|| format!("no backend {addr} in `lb stats`: {stats}"))
}

pub fn program_id(tb: &Testbed) -> Result<u64> {
    let st = tb.lb_json(&["status"])?;
    st["program_id"]
        .as_u64()
        .with_context(|| format!("no program_id in `lb status`: {st}"))
}

pub fn lb(tb: &Testbed, args: &[&str]) -> Result<()> {
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
pub fn probe(tb: &Testbed, addr: SocketAddr, not: &str, when: &str) -> Result<Vec<String>> {
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
pub struct Watch {
    pub shared: Arc<Shared>,
    pub t0: Instant,
    /// The connection: client end, backend (name, namespace, address on the VIP).
    pub local: SocketAddr,
    pub own: String,
    pub own_netns: String,
    pub own_addr: IpAddr,
    /// Packets the LB has forwarded to `own` so far.
    pub packets: u64,
    pub log: Vec<String>,
}

impl Watch {
    pub fn note(&mut self, got: u64, what: &str) {
        self.log.push(format!(
            "{:>6.2}s {got:>9} bytes  {what}",
            self.t0.elapsed().as_secs_f64()
        ));
    }

    /// After an event: the download flows on ([`STEP`] more bytes) and is still established
    /// on its backend; noted in the log.
    pub fn progress(&mut self, what: &str) -> Result<()> {
        let at = self.shared.received.load(Ordering::Relaxed);
        let got = wait_received(&self.shared, at + STEP, what)?;
        ensure!(
            established_in(&self.own_netns, self.local)?,
            "{what}: {} is established on {} no more",
            self.local,
            self.own
        );
        self.note(got, what);
        Ok(())
    }

    /// [`Watch::progress`], and the LB still forwards (its ACKs) to that backend.
    pub fn mark(&mut self, tb: &Testbed, what: &str) -> Result<()> {
        self.progress(what)?;
        let p = backend_packets(tb, self.own_addr)?;
        ensure!(
            p > self.packets,
            "{what}: the LB forwarded nothing more to {} ({p} packets)",
            self.own
        );
        self.packets = p;
        Ok(())
    }
}

/// A [`download`] from `TOTAL` bytes on a thread in the client's namespace, stopped if it
/// is dropped unfinished.
pub struct Running {
    pub shared: Arc<Shared>,
    head: mpsc::Receiver<Head>,
    thread: thread::JoinHandle<Result<Result<Download>>>,
    _stop: StopOnDrop,
}

impl Running {
    pub fn start(tb: &Testbed, addr: SocketAddr) -> Running {
        let shared = Arc::new(Shared::default());
        let (head_tx, head) = mpsc::channel();
        let thread = {
            let shared = shared.clone();
            crate::netns::spawn_in_netns(tb.client().netns(), move || {
                download(addr, &shared, head_tx)
            })
        };
        Running {
            _stop: StopOnDrop(shared.clone()),
            shared,
            head,
            thread,
        }
    }

    /// The response's head, once it is read.
    pub fn head(&self) -> Result<Head> {
        self.head
            .recv_timeout(TIMEOUT)
            .map_err(|_| anyhow::anyhow!("no response head from the VIP"))
    }

    /// End it after the events (`done`): at full speed if they went well, stopped if not.
    /// Prints `log`, then the verdict: every one of [`TOTAL`] bytes, byte for byte.
    pub fn finish(self, label: &str, done: Result<()>, log: &[String]) -> Result<Download> {
        if done.is_err() {
            self.shared.stop.store(true, Ordering::Relaxed);
        }
        self.shared.fast.store(true, Ordering::Relaxed);
        let download = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("the downloading thread panicked"))
            .and_then(|r| r)
            .and_then(|r| r);
        for l in log {
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
                Ok(d)
            }
        }
    }
}

/// No TCP reset since `before` ([`resets`]: client EstabResets, backends OutRsts).
pub fn no_new_resets(tb: &Testbed, before: (u64, u64), label: &str) -> Result<()> {
    let after = resets(tb)?;
    ensure!(
        after == before,
        "{label}: TCP resets (client EstabResets, backends OutRsts): {before:?} -> {after:?}"
    );
    Ok(())
}

/// The VIP's backends' addresses (sorted) from `lb backend list`, and whether `addr` is
/// drained.
pub fn listed(tb: &Testbed, vip: &str, addr: IpAddr) -> Result<(Vec<String>, bool)> {
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
