//! What health checking costs and how fast it acts: the real agent (`lb agent`) checking
//! 1,000 backends (10 VIPs x 100) every second by TCP connect, next to the same agent with
//! checks off and to HAProxy checking the same 1,000 servers with the same settings
//! (`inter 1000 rise 2 fall 3`, `timeout check 1000`), in the same run. Then 100 induced
//! failures, half refused (the server's listening socket closed) and half black holes (the
//! backend's address gone: SYNs vanish), timed from the failure to the moment the VIP's
//! live ring flips to one without the backend (`VIPS[vip].ring_base` changes and
//! `BACKENDS[id]` says down), polled every millisecond from the pinned maps.
//!
//! The backends are 1,000 addresses (198.19.0.0/16) on the loopback of one namespace, each
//! with its own listening socket served by this program; the probe rate is counted where
//! probes land, by the namespace's kernel (`/proc/net/snmp`). Checks go `via = "direct"`
//! (a tunnel check costs the agent the same connect; its encapsulation is the tc program's).
//!
//! Prints tables; asserts nothing about time. Needs root, `haproxy` (scripts/setup.sh) and
//! `target/release/lb` (`cargo xtask bench` builds it).
use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context, Result};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use lb_common::{Backend, VipKey, VipMeta, BACKEND_DOWN, BACKEND_UP};
use lb_tests::netns::{
    find_lb_bin, in_netns, lb_command, run, temp_dir, veth_pair, Agent, Netns, VethEnd,
};
use lb_userspace::dataplane::{addr_raw, port_raw};
use tokio::sync::{mpsc, oneshot};

const NVIPS: usize = 10;
const PER_VIP: usize = 100;
const N: usize = NVIPS * PER_VIP;
const INTERVAL_MS: u64 = 1000;
const TIMEOUT_MS: u64 = 1000;
const RISE: u64 = 2;
const FALL: u64 = 3;
/// How long each CPU measurement lasts.
/// CPU measurement window (the quick mode: 10 s).
fn window() -> Duration {
    Duration::from_secs(if lb_bench::out::quick() { 10 } else { 30 })
}
/// Failure rounds, one failure per VIP each (the quick mode: 3).
fn rounds() -> usize {
    if lb_bench::out::quick() {
        3
    } else {
        10
    }
}

/// Backend `i` (0..N): 198.19.(i / 250).(i % 250 + 1).
fn backend(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn vip_addr(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 10, k as u8 + 1)
}

/// Deterministic pseudo-random numbers (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

// ---------------------------------------------------------------------------------------
// The backends: one listening socket per address, in the backends' namespace
// ---------------------------------------------------------------------------------------

enum FarmCmd {
    /// Close backend i's listening socket (connections are refused from then on).
    Close(usize, oneshot::Sender<()>),
    /// Listen again.
    Open(usize, oneshot::Sender<Result<()>>),
}

struct Farm {
    tx: mpsc::UnboundedSender<FarmCmd>,
    ns: String,
}

impl Farm {
    fn start(ns: &Netns) -> Result<Farm> {
        let (tx, mut rx) = mpsc::unbounded_channel::<FarmCmd>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        // A current-thread runtime: every socket is made on this thread, in `ns`.
        drop(lb_tests::netns::spawn_in_netns(ns.name(), move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return ready_tx.send(Err(e.into())).unwrap_or(()),
            };
            rt.block_on(async move {
                let listen = |i: usize| -> Result<tokio::task::JoinHandle<()>> {
                    let sock = tokio::net::TcpSocket::new_v4()?;
                    sock.set_reuseaddr(true)?;
                    sock.bind(SocketAddr::new(backend(i).into(), 80))
                        .with_context(|| format!("binding {}:80", backend(i)))?;
                    let l = sock.listen(1024)?;
                    Ok(tokio::spawn(async move {
                        loop {
                            match l.accept().await {
                                Ok((s, _)) => drop(s),
                                // Reset before it was accepted (HAProxy's checks end with
                                // an RST), or out of descriptors: go on listening.
                                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                            }
                        }
                    }))
                };
                let mut tasks = Vec::with_capacity(N);
                for i in 0..N {
                    match listen(i) {
                        Ok(t) => tasks.push(Some(t)),
                        Err(e) => return ready_tx.send(Err(e)).unwrap_or(()),
                    }
                }
                ready_tx.send(Ok(())).unwrap_or(());
                while let Some(cmd) = rx.recv().await {
                    match cmd {
                        FarmCmd::Close(i, done) => {
                            if let Some(t) = tasks[i].take() {
                                t.abort();
                                let _ = t.await; // the listener is dropped (closed) now
                            }
                            let _ = done.send(());
                        }
                        FarmCmd::Open(i, done) => {
                            let r = if tasks[i].is_some() {
                                Ok(())
                            } else {
                                listen(i).map(|t| tasks[i] = Some(t))
                            };
                            let _ = done.send(r);
                        }
                    }
                }
            });
        }));
        ready_rx
            .recv()
            .context("the backends' thread ended")?
            .context("starting the backends")?;
        Ok(Farm {
            tx,
            ns: ns.name().to_string(),
        })
    }

    fn close(&self, i: usize) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(FarmCmd::Close(i, tx))
            .ok()
            .context("farm gone")?;
        rx.blocking_recv().context("farm gone")
    }

    fn open(&self, i: usize) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(FarmCmd::Open(i, tx))
            .ok()
            .context("farm gone")?;
        rx.blocking_recv().context("farm gone")?
    }

    /// Probes that reached the backends: connections their kernel completed
    /// (`PassiveOpens`) plus those the prober abandoned half-open (`AttemptFails`: HAProxy
    /// resets after the SYN-ACK without completing the handshake), from the namespace's
    /// `/proc/net/snmp`.
    fn accepted(&self) -> Result<u64> {
        let snmp = in_netns(&self.ns, || {
            fs::read_to_string("/proc/thread-self/net/snmp")
        })??;
        let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = (tcp.next().context("Tcp:")?, tcp.next().context("Tcp:")?);
        let field = |name: &str| -> Result<u64> {
            let at = names
                .split_whitespace()
                .position(|n| n == name)
                .with_context(|| name.to_string())?;
            Ok(values.split_whitespace().nth(at).context("Tcp:")?.parse()?)
        };
        Ok(field("PassiveOpens")? + field("AttemptFails")?)
    }
}

// ---------------------------------------------------------------------------------------
// Processes: CPU time and memory from /proc
// ---------------------------------------------------------------------------------------

/// utime + stime of every thread of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

fn status_mb(pid: u32, key: &str) -> Result<f64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("{key} of {pid}"))?;
    Ok(kb * 1024.0 / 1e6)
}

struct Usage {
    cpu_pct: f64,
    probes_per_s: f64,
    rss_mb: f64,
    hwm_mb: f64,
}

/// Over `window()`: `pid`'s CPU (% of one core) and the connections the backends accepted.
fn measure(pid: u32, farm: &Farm) -> Result<Usage> {
    let (c0, a0, t0) = (cpu_seconds(pid)?, farm.accepted()?, Instant::now());
    thread::sleep(window());
    let (c1, a1, dt) = (cpu_seconds(pid)?, farm.accepted()?, t0.elapsed());
    Ok(Usage {
        cpu_pct: 100.0 * (c1 - c0) / dt.as_secs_f64(),
        probes_per_s: (a1 - a0) as f64 / dt.as_secs_f64(),
        rss_mb: status_mb(pid, "VmRSS")?,
        hwm_mb: status_mb(pid, "VmHWM")?,
    })
}

// ---------------------------------------------------------------------------------------
// The agent and HAProxy configurations
// ---------------------------------------------------------------------------------------

fn agent_toml(iface: &str, checks: bool) -> String {
    let mut s = format!(
        "[agent]\ninterface = \"{iface}\"\nmax_vips = {NVIPS}\nmax_backends = {N}\n\
         gateway_mac = \"02:00:00:00:00:fe\"\nencap_source_v4 = \"198.18.255.0/24\"\n\
         metrics = \"off\"\n"
    );
    let health = if checks {
        format!(
            "{{ kind = \"tcp\", via = \"direct\", interval_ms = {INTERVAL_MS}, \
             timeout_ms = {TIMEOUT_MS}, rise = {RISE}, fall = {FALL} }}"
        )
    } else {
        "{ kind = \"none\" }".to_string()
    };
    for k in 0..NVIPS {
        s += &format!(
            "\n[[vip]]\nname = \"vip{k}\"\naddress = \"{}\"\nport = 80\nprotocol = \"tcp\"\n\
             health = {health}\nbackends = [\n",
            vip_addr(k)
        );
        for j in 0..PER_VIP {
            s += &format!("  {{ address = \"{}\" }},\n", backend(k * PER_VIP + j));
        }
        s += "]\n";
    }
    s
}

fn haproxy_cfg() -> String {
    let mut s = format!(
        "global\n  maxconn 4096\n\ndefaults\n  mode tcp\n  timeout connect {TIMEOUT_MS}ms\n  \
         timeout client 5s\n  timeout server 5s\n  timeout check {TIMEOUT_MS}ms\n\n\
         # HAProxy will not start without a listener; nothing connects to it.\n\
         frontend idle\n  bind 127.0.0.1:18080\n  default_backend vip0\n"
    );
    for k in 0..NVIPS {
        s += &format!("\nbackend vip{k}\n");
        for j in 0..PER_VIP {
            let i = k * PER_VIP + j;
            s += &format!(
                "  server s{i} {}:80 check inter {INTERVAL_MS} rise {RISE} fall {FALL}\n",
                backend(i)
            );
        }
    }
    s
}

/// HAProxy in `ns`, killed when dropped.

// ---------------------------------------------------------------------------------------
// Induced failures
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    Refused,
    BlackHole,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Refused => "refused (listener closed)",
            Kind::BlackHole => "black hole (address gone)",
        }
    }
}

struct Failure {
    kind: Kind,
    vip: usize,
    backend: usize,
    id: u32,
    base: u32,
    induced: Instant,
    induced_wall: SystemTime,
    /// Failure to ring flip.
    took: Option<Duration>,
    /// The agent's verdict (its `down` event), unix ms, and the event's reason.
    verdict: Option<(u64, String)>,
}

struct Maps {
    vips: BpfHashMap<MapData, VipKey, VipMeta>,
    backends: Array<MapData, Backend>,
}

impl Maps {
    fn open(pins: &Path) -> Result<Maps> {
        let vips = MapData::from_pin(pins.join("VIPS")).context("VIPS")?;
        let backends = MapData::from_pin(pins.join("BACKENDS")).context("BACKENDS")?;
        Ok(Maps {
            vips: BpfHashMap::try_from(Map::HashMap(vips))?,
            backends: Array::try_from(Map::Array(backends))?,
        })
    }

    fn ring_base(&self, k: usize) -> Result<u32> {
        let (addr, family) = addr_raw(vip_addr(k).into());
        let key = VipKey {
            addr,
            port: port_raw(80),
            proto: 6,
            family,
        };
        Ok(self.vips.get(&key, 0)?.ring_base)
    }

    fn state(&self, id: u32) -> Result<u8> {
        Ok(self.backends.get(&id, 0)?.state)
    }
}

/// Backend ids by address, per VIP (`lb backend list --json`).
fn backend_ids(instance: &str) -> Result<BTreeMap<(usize, Ipv4Addr), u32>> {
    let out = lb_command(Command::new(find_lb_bin()?).args([
        "--instance",
        instance,
        "--json",
        "backend",
        "list",
    ]));
    let rows = out.json("lb backend list");
    let mut ids = BTreeMap::new();
    for r in rows.as_array().context("a list")? {
        let k: usize = r["vip"].as_str().unwrap_or("")[3..].parse()?;
        let a: Ipv4Addr = r["address"].as_str().unwrap_or("").parse()?;
        let id = r["id"].as_u64().context("an id")? as u32;
        ids.insert((k, a), id);
    }
    ensure!(ids.len() == N, "{} backends listed", ids.len());
    Ok(ids)
}

/// (VIP name, backend address) -> [(unix ms, reason)].
type Events = BTreeMap<(String, String), Vec<(u64, String)>>;

/// The agent's `down` events.
fn down_events(instance: &str) -> Result<Events> {
    let out =
        lb_command(Command::new(find_lb_bin()?).args(["--instance", instance, "--json", "events"]));
    let mut m: BTreeMap<_, Vec<_>> = BTreeMap::new();
    for e in out.json("lb events").as_array().context("a list")? {
        if e["what"] == "down" {
            m.entry((
                e["vip"].as_str().unwrap_or("").to_string(),
                e["backend"].as_str().unwrap_or("").to_string(),
            ))
            .or_default()
            .push((
                e["time_ms"].as_u64().unwrap_or(0),
                e["reason"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    Ok(m)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn induce(kind: Kind, i: usize, farm: &Farm, be_ns: &Netns) -> Result<()> {
    match kind {
        Kind::Refused => farm.close(i),
        Kind::BlackHole => be_ns
            .ip(&["addr", "del", &format!("{}/32", backend(i)), "dev", "lo"])
            .map(drop),
    }
}

fn repair(kind: Kind, i: usize, farm: &Farm, be_ns: &Netns) -> Result<()> {
    match kind {
        Kind::Refused => farm.open(i),
        Kind::BlackHole => be_ns
            .ip(&["addr", "add", &format!("{}/32", backend(i)), "dev", "lo"])
            .map(drop),
    }
}

fn failures(agent: &Agent, be_ns: &Netns, farm: &Farm) -> Result<Vec<Failure>> {
    let maps = Maps::open(&agent.pin_dir())?;
    let ids = backend_ids(agent.instance())?;
    let mut rng = Rng(0x004e_a17b);
    let mut all = Vec::new();
    for round in 0..rounds() {
        // One failure per VIP, started at random moments within one interval.
        let kind = if round % 2 == 0 {
            Kind::Refused
        } else {
            Kind::BlackHole
        };
        let mut now: Vec<Failure> = Vec::new();
        for k in 0..NVIPS {
            thread::sleep(Duration::from_millis(
                rng.next() % (INTERVAL_MS / NVIPS as u64),
            ));
            let j = (rng.next() % PER_VIP as u64) as usize;
            let i = k * PER_VIP + j;
            let id = ids[&(k, backend(i))];
            let base = maps.ring_base(k)?;
            induce(kind, i, farm, be_ns)?;
            now.push(Failure {
                kind,
                vip: k,
                backend: i,
                id,
                base,
                induced: Instant::now(),
                induced_wall: SystemTime::now(),
                took: None,
                verdict: None,
            });
        }
        let limit = Duration::from_millis(INTERVAL_MS * (FALL + 3) + TIMEOUT_MS);
        let t = Instant::now();
        while now.iter().any(|f| f.took.is_none()) && t.elapsed() < limit {
            for f in now.iter_mut().filter(|f| f.took.is_none()) {
                let base = maps.ring_base(f.vip)?;
                if base != f.base {
                    if maps.state(f.id)? == BACKEND_DOWN {
                        f.took = Some(f.induced.elapsed());
                    } else {
                        f.base = base; // another change of this VIP's ring
                    }
                }
            }
            thread::sleep(Duration::from_millis(1));
        }
        for f in &now {
            repair(f.kind, f.backend, farm, be_ns)?;
        }
        // Every backend up again (after `rise`) before the next round.
        let t = Instant::now();
        while now
            .iter()
            .any(|f| maps.state(f.id).ok() != Some(BACKEND_UP))
        {
            ensure!(
                t.elapsed() < Duration::from_secs(15),
                "backends not back up after 15 s"
            );
            thread::sleep(Duration::from_millis(10));
        }
        all.extend(now);
    }
    let events = down_events(agent.instance())?;
    for f in &mut all {
        let key = (format!("vip{}", f.vip), backend(f.backend).to_string());
        let after = unix_ms(f.induced_wall);
        f.verdict = events
            .get(&key)
            .and_then(|v| v.iter().find(|(t, _)| *t + 1 >= after).cloned());
    }
    Ok(all)
}

/// p50 and p99 (nearest rank) and the maximum, in ms.
fn pcts(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
    (rank(0.50), rank(0.99), v[v.len() - 1])
}

// ---------------------------------------------------------------------------------------

fn main() -> Result<()> {
    // `health [agent] [failures] [haproxy]`: only those parts (default: all).
    let parts: Vec<String> = std::env::args().skip(1).collect();
    let want = |p: &str| parts.is_empty() || parts.iter().any(|x| x == p);
    let ns = Netns::new("lbbench-hc")?;
    let be_ns = Netns::new("lbbench-hcb")?;
    veth_pair(
        &VethEnd {
            ns: &ns,
            name: "hb0",
            mac: [2, 0, 0, 0, 0xfd, 1],
            addrs: &["198.18.254.1/30"],
        },
        &VethEnd {
            ns: &be_ns,
            name: "hb1",
            mac: [2, 0, 0, 0, 0xfd, 2],
            addrs: &["198.18.254.2/30"],
        },
    )?;
    ns.ip(&["route", "add", "198.19.0.0/16", "via", "198.18.254.2"])?;
    be_ns.ip(&["link", "set", "lo", "up"])?;
    let dir = temp_dir("lbbench-hc")?;
    let batch = dir.path().join("addrs");
    let lines: String = (0..N)
        .map(|i| format!("addr add {}/32 dev lo\n", backend(i)))
        .collect();
    fs::write(&batch, lines)?;
    run(
        "ip",
        &["-n", be_ns.name(), "-batch", &batch.display().to_string()],
    )?;
    let farm = Farm::start(&be_ns)?;

    println!(
        "Health checking {N} backends ({NVIPS} VIPs x {PER_VIP}): tcp connect every {INTERVAL_MS} ms, \
         timeout {TIMEOUT_MS} ms, rise {RISE}, fall {FALL}; {} CPUs; CPU over {} s",
        thread::available_parallelism().map_or(0, |n| n.get()),
        window().as_secs()
    );
    println!("\n1. Steady state: CPU and memory of the checker");
    println!(
        "{:<40} {:>14} {:>12} {:>9} {:>10}",
        "checker", "CPU % of core", "probes/s", "RSS MB", "peak RSS"
    );
    let mut rows: Vec<(String, Usage)> = Vec::new();
    let mut row = |name: String, u: Usage| {
        println!(
            "{name:<40} {:>14.2} {:>12.0} {:>9.1} {:>10.1}",
            u.cpu_pct, u.probes_per_s, u.rss_mb, u.hwm_mb
        );
        let _ = lb_bench::out::record(
            "health_cost",
            serde_json::json!({"checker": name, "backends": N, "interval_ms": INTERVAL_MS,
                "cpu_pct": u.cpu_pct, "probes_per_s": u.probes_per_s, "rss_mb": u.rss_mb,
                "peak_rss_mb": u.hwm_mb}),
        );
        rows.push((name, u));
    };

    // The agent with checks off: what the agent costs anyway.
    let cfg = dir.path().join("off.toml");
    fs::write(&cfg, agent_toml("hb0", false))?;
    if want("agent") {
        let agent = Agent::start(&ns, &cfg)?;
        thread::sleep(Duration::from_secs(2));
        row("lb agent, checks off".into(), measure(agent.pid(), &farm)?);
    }

    // The agent checking.
    let cfg = dir.path().join("on.toml");
    fs::write(&cfg, agent_toml("hb0", true))?;
    let agent = Agent::start(&ns, &cfg)?;
    thread::sleep(Duration::from_secs(3));
    let mut on_cpu = None;
    if want("agent") {
        let on = measure(agent.pid(), &farm)?;
        on_cpu = Some(on.cpu_pct);
        row("lb agent, checks on".into(), on);
    }
    let failures = if want("failures") {
        failures(&agent, &be_ns, &farm)?
    } else {
        Vec::new()
    };
    // The agent's own timing of each health-triggered rebuild (its log: `ms=` of "maps
    // updated", from the decision to the rings written and the grace period waited).
    let rebuilds: Vec<f64> = agent
        .log()
        .lines()
        .filter(|l| l.contains("why=\"health\"") && l.contains("maps updated"))
        .filter_map(|l| l.split("ms=\"").nth(1)?.split('"').next()?.parse().ok())
        .collect();
    drop(agent);

    // HAProxy checking the same servers.
    let hcfg = dir.path().join("haproxy.cfg");
    fs::write(&hcfg, haproxy_cfg())?;
    let version = lb_bench::haproxy::version()?;
    if want("haproxy") {
        let hlog = dir.path().join("haproxy.log");
        let mut h = lb_bench::haproxy::Haproxy::start(ns.name(), &hcfg, &hlog)?;
        thread::sleep(Duration::from_secs(3));
        if let Some(st) = h.0.try_wait()? {
            bail!(
                "haproxy exited ({st}); try haproxy -c -f {}",
                hcfg.display()
            );
        }
        // `ip netns exec` execs haproxy: same pid.
        let u = measure(h.0.id(), &farm)?;
        if u.probes_per_s < 1.0 {
            let log = fs::read_to_string(&hlog).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            println!("(HAProxy's checks did not arrive; its log ends with {tail:#?})");
        }
        row(format!("HAProxy {version}"), u);
    }
    if let Some(cpu) = on_cpu {
        println!(
            "target: agent under 5% of one core with checks on: {} ({cpu:.2}%)",
            if cpu < 5.0 { "met" } else { "missed" },
        );
    }
    if failures.is_empty() {
        return Ok(());
    }

    let target = (INTERVAL_MS * FALL + TIMEOUT_MS + 50) as f64;
    println!(
        "\n2. Failure to ring update, {} induced failures ({} rounds of one per VIP; \
         target p99 <= interval x fall + timeout + 50 = {target:.0} ms)",
        failures.len(),
        rounds()
    );
    println!(
        "{:<28} {:>4} {:>9} {:>9} {:>9} {:>22} {:>26}",
        "failure", "n", "p50 ms", "p99 ms", "max ms", "verdict->ring p50/p99", "agent's reasons"
    );
    let mut missing = 0;
    for kind in [Some(Kind::Refused), Some(Kind::BlackHole), None] {
        let sel: Vec<&Failure> = failures
            .iter()
            .filter(|f| kind.is_none_or(|k| f.kind == k))
            .collect();
        let took: Vec<f64> = sel
            .iter()
            .filter_map(|f| f.took)
            .map(|d| d.as_secs_f64() * 1e3)
            .collect();
        missing += if kind.is_none() {
            sel.len() - took.len()
        } else {
            0
        };
        let install: Vec<f64> = sel
            .iter()
            .filter_map(|f| {
                let (t, _) = f.verdict.as_ref()?;
                let flip = unix_ms(f.induced_wall) as f64 + f.took?.as_secs_f64() * 1e3;
                Some((flip - *t as f64).max(0.0))
            })
            .collect();
        let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
        for f in &sel {
            let r = f.verdict.as_ref().map_or("(no event)", |v| v.1.as_str());
            *reasons.entry(r).or_default() += 1;
        }
        let reasons: Vec<String> = reasons.iter().map(|(r, n)| format!("{r} x{n}")).collect();
        if took.is_empty() {
            continue;
        }
        let (p50, p99, max) = pcts(&took);
        let inst = if install.is_empty() {
            "-".to_string()
        } else {
            let (a, b, _) = pcts(&install);
            format!("{a:.0} / {b:.0}")
        };
        lb_bench::out::record(
            "health_failover",
            serde_json::json!({"failure": kind.map_or("all", Kind::name), "n": took.len(),
                "p50_ms": p50, "p99_ms": p99, "max_ms": max, "target_ms": target}),
        )?;
        println!(
            "{:<28} {:>4} {p50:>9.0} {p99:>9.0} {max:>9.0} {inst:>22} {:>26}",
            kind.map_or("all", Kind::name),
            took.len(),
            reasons.join(", ")
        );
    }
    let took: Vec<f64> = failures
        .iter()
        .filter_map(|f| f.took)
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    if missing > 0 {
        println!("{missing} failures saw no ring update in time");
    }
    if !rebuilds.is_empty() {
        let (p50, p99, max) = pcts(&rebuilds);
        println!(
            "agent's log, {} health rebuilds, decision to rings written + RCU grace wait: \
             p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms",
            rebuilds.len()
        );
    }
    if !took.is_empty() {
        let (_, p99, _) = pcts(&took);
        println!(
            "target: p99 {p99:.0} ms <= {target:.0} ms: {}",
            if p99 <= target && missing == 0 {
                "met"
            } else {
                "missed"
            }
        );
    }
    Ok(())
}
