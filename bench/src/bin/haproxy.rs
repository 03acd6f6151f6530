//! Suite item 3: against what operators use instead. Connections per second, request
//! latency (p50, p99) and CPU per request through `lb` and through HAProxy (Debian's
//! `haproxy`, `mode tcp`, `balance roundrobin`) with the same real backends and the same
//! client, in the same run.
//!
//! The namespace testbed (`lb_tests::testbed`): a client, the LB and three backends running
//! `lb-testbed-server` (HTTP/1.1, a thread per connection), joined by a bridge.
//! - lb: the real agent on the LB, a TCP VIP (198.18.10.1:80, IP-in-IP) over the three
//!   backends, configured through the `lb` CLI; the backends answer the client directly
//!   (DSR).
//! - HAProxy: on the LB's namespace too, listening on 198.18.10.200:80 (on the LB's `lo`;
//!   not an lb VIP, so the `lb` program passes its packets to the kernel), proxying to the
//!   backends' own addresses, port 80: both legs of every connection go through it.
//!
//! The client, our own, in the client's namespace: [`WORKERS`] threads, each looping
//! connect, `GET / HTTP/1.1` with `Connection: close`, read to EOF (the server closes);
//! a request's latency is connect to EOF; a failed connect, a timeout or an answer other
//! than 200 is an error. Ports: the client's `ip_local_port_range` is widened to 1024-65535
//! and `tcp_tw_reuse` is on in the client's and the LB's namespaces.
//!
//! Rounds (quick 3, full 5) after a warm-up of each path; each round one measurement of
//! each path (alternating which goes first), each a fixed time (quick 3 s, full 6 s).
//! Reported: medians over rounds of connections per second, p50 and p99 latency, and CPU
//! per request: the whole machine's (busy jiffies of all CPUs in `/proc/stat`, everything
//! but idle and iowait, over requests: client, servers and LB together), and the LB's own:
//! HAProxy's process (utime + stime of all its threads), or the `lb` XDP program's run time
//! (the kernel's per-program statistics, `kernel.bpf_stats_enabled`, on during both paths'
//! measurements; read from the agent's pinned program). Errors are the total over rounds.
//!
//! Prints a table; asserts nothing about speed. Needs root, `haproxy` (scripts/setup.sh),
//! `target/release/lb` and `lb-testbed-server` (`cargo build --release --workspace --bins`).
use std::{
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use aya::programs::ProgramInfo;
use lb_bench::{haproxy::Haproxy, out};
use lb_tests::{
    netns::spawn_in_netns,
    testbed::{http_get, ForwardingPath, Testbed, TestbedOpts},
};
use serde_json::json;

const WORKERS: usize = 16;
/// HAProxy's address: in the VIP range (the client routes it via the LB), not an lb VIP.
const HAPROXY_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 200);
const PORT: u16 = 80;
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Lb,
    Haproxy,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Lb => "lb",
            Path::Haproxy => "haproxy",
        }
    }
}

// ---------------------------------------------------------------------------------------
// The client

/// What the workers of one measurement did.
#[derive(Default)]
struct Load {
    /// Latency of every successful request, µs.
    lat_us: Vec<u32>,
    errors: u64,
}

/// One request on a new connection: its latency, or why it failed.
fn request(addr: SocketAddr, buf: &mut Vec<u8>) -> Result<Duration> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    s.set_read_timeout(Some(READ_TIMEOUT))?;
    s.set_nodelay(true)?;
    s.write_all(REQUEST)?;
    buf.clear();
    s.read_to_end(buf)?;
    let took = t0.elapsed();
    ensure!(buf.starts_with(b"HTTP/1.1 200 "), "not a 200 answer");
    Ok(took)
}

/// [`WORKERS`] threads in namespace `ns` making requests to `addr` for `dur`.
fn load(ns: &str, addr: SocketAddr, dur: Duration) -> Result<Load> {
    let until = Instant::now() + dur;
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            spawn_in_netns(ns, move || {
                let mut l = Load {
                    lat_us: Vec::with_capacity(1 << 16),
                    errors: 0,
                };
                let mut buf = Vec::with_capacity(512);
                while Instant::now() < until {
                    match request(addr, &mut buf) {
                        Ok(t) => l.lat_us.push(t.as_micros().min(u32::MAX as u128) as u32),
                        Err(_) => {
                            l.errors += 1;
                            thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
                l
            })
        })
        .collect();
    let mut all = Load::default();
    for w in workers {
        let l = w
            .join()
            .map_err(|_| anyhow::anyhow!("a client worker panicked"))??;
        all.lat_us.extend(l.lat_us);
        all.errors += l.errors;
    }
    Ok(all)
}

/// Percentile `p` (nearest rank) of sorted `v`.
fn pct(v: &[u32], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1] as f64
}

// ---------------------------------------------------------------------------------------
// CPU

/// Busy jiffies of all CPUs: everything in `/proc/stat`'s `cpu` line but idle and iowait
/// (user nice system idle iowait irq softirq steal; guest time is inside user and nice).
fn busy_jiffies() -> Result<u64> {
    let stat = fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse())
        .collect::<Result<_, _>>()?;
    ensure!(f.len() == 8, "/proc/stat: {line}");
    Ok(f.iter().sum::<u64>() - f[3] - f[4])
}

fn clk_tck() -> f64 {
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// utime + stime of every thread of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok(ticks as f64 / clk_tck())
}

/// The kernel's run time (seconds) and run count of the agent's pinned `lb` program so far.
fn prog_stats(pin: &std::path::Path) -> Result<(f64, u64)> {
    let info = ProgramInfo::from_pin(pin).with_context(|| format!("{}", pin.display()))?;
    Ok((info.run_time().as_secs_f64(), info.run_count()))
}

/// `kernel.bpf_stats_enabled` on while this lives, then as it was.
struct BpfStats(bool);

impl BpfStats {
    fn on() -> Result<BpfStats> {
        let was = fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
            .context("kernel.bpf_stats_enabled")?
            .trim()
            == "1";
        out::bpf_stats(true)?;
        Ok(BpfStats(was))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = out::bpf_stats(self.0) {
            eprintln!("{e:#}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// HAProxy

/// maxconn 8,000 (far above the client's [`WORKERS`] connections at a time): HAProxy
/// needs two descriptors per connection and will not start if it cannot raise its limit
/// that far (20,000 here, and root may not raise it).
fn haproxy_cfg(backends: &[Ipv4Addr]) -> String {
    let mut s = format!(
        "global\n  maxconn 8000\n\n\
         defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10s\n  \
         timeout server 10s\n\n\
         frontend fe\n  bind {HAPROXY_ADDR}:{PORT}\n  maxconn 8000\n  default_backend be\n\n\
         backend be\n  balance roundrobin\n"
    );
    for (i, b) in backends.iter().enumerate() {
        s += &format!("  server be{} {b}:{PORT}\n", i + 1);
    }
    s
}

// ---------------------------------------------------------------------------------------
// Measurements

/// One measurement of one path.
struct Run {
    requests: u64,
    errors: u64,
    cps: f64,
    p50_us: f64,
    p99_us: f64,
    /// Whole machine, µs of CPU per request.
    cpu_us: f64,
    /// The LB's own: HAProxy's process or the `lb` program, µs per request.
    own_us: f64,
    /// The `lb` program's run time per request (on the HAProxy path it passes packets).
    prog_us: f64,
    /// The `lb` program's runs (packets) per request.
    prog_runs: f64,
}

struct Paths {
    client_ns: String,
    lb_addr: SocketAddr,
    haproxy_addr: SocketAddr,
    prog_pin: PathBuf,
    haproxy_pid: u32,
}

impl Paths {
    fn measure(&self, path: Path, dur: Duration) -> Result<Run> {
        let addr = match path {
            Path::Lb => self.lb_addr,
            Path::Haproxy => self.haproxy_addr,
        };
        let own = || match path {
            Path::Lb => prog_stats(&self.prog_pin).map(|s| s.0),
            Path::Haproxy => cpu_seconds(self.haproxy_pid),
        };
        let (own0, prog0, busy0, t0) = (
            own()?,
            prog_stats(&self.prog_pin)?,
            busy_jiffies()?,
            Instant::now(),
        );
        let mut l = load(&self.client_ns, addr, dur)?;
        let (busy1, secs) = (busy_jiffies()?, t0.elapsed().as_secs_f64());
        let (own1, prog1) = (own()?, prog_stats(&self.prog_pin)?);
        l.lat_us.sort_unstable();
        let n = l.lat_us.len() as u64;
        let per_req = |s: f64| if n == 0 { f64::NAN } else { s * 1e6 / n as f64 };
        Ok(Run {
            requests: n,
            errors: l.errors,
            cps: n as f64 / secs,
            p50_us: pct(&l.lat_us, 0.50),
            p99_us: pct(&l.lat_us, 0.99),
            cpu_us: per_req((busy1 - busy0) as f64 / clk_tck()),
            own_us: per_req(own1 - own0),
            prog_us: per_req(prog1.0 - prog0.0),
            prog_runs: (prog1.1 - prog0.1) as f64 / n as f64,
        })
    }
}

/// Requests to `addr` from the client until every backend has answered (a few tries).
fn check_path(tb: &Testbed, what: &str, addr: SocketAddr) -> Result<()> {
    let want: std::collections::BTreeSet<String> =
        tb.backends().iter().map(|b| b.name.clone()).collect();
    let mut seen = std::collections::BTreeSet::new();
    let mut last_err = None;
    for _ in 0..60 {
        match tb.in_client(|| http_get(addr, "/", Duration::from_secs(2)))? {
            Ok(r) if r.status == 200 => {
                seen.insert(r.backend().to_string());
            }
            Ok(r) => last_err = Some(anyhow::anyhow!("status {}", r.status)),
            Err(e) => last_err = Some(e),
        }
        if seen == want {
            println!(
                "{what} at {addr} answers from {}",
                seen.into_iter().collect::<Vec<_>>().join(", ")
            );
            return Ok(());
        }
        if last_err.is_some() {
            thread::sleep(Duration::from_millis(100));
        }
    }
    match last_err {
        Some(e) => Err(e.context(format!("{what} at {addr}: answered by {seen:?} only"))),
        None => bail!("{what} at {addr}: answered by {seen:?} only"),
    }
}

fn main() -> Result<()> {
    let quick = out::quick();
    let (rounds, secs) = if quick { (3, 3) } else { (5, 6) };
    let dur = Duration::from_secs(secs);
    let version = lb_bench::haproxy::version()?;

    let prefix = format!("lbhx{}", std::process::id());
    let mut tb = Testbed::up(TestbedOpts::default().prefix(&prefix).backends(3))?;
    let cfg = tb.agent_config(&[])?;
    tb.start_agent(&cfg)?;
    let web = ForwardingPath::get("ipip4").tcp();
    tb.add_vip(&web)?;
    let prog_pin = tb.agent().context("no agent")?.pin_dir().join("lb");

    let (client, lbh) = (tb.client(), tb.lb_host());
    client
        .ns
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    for h in [client, lbh] {
        h.ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    }
    // HAProxy's own connections to the backends.
    lbh.ns
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    lbh.ns
        .ip(&["addr", "add", &format!("{HAPROXY_ADDR}/32"), "dev", "lo"])?;

    let backends: Vec<Ipv4Addr> = tb.backends().iter().map(|b| b.v4).collect();
    let hcfg = tb.dir().join("haproxy.cfg");
    fs::write(&hcfg, haproxy_cfg(&backends))?;
    let hlog = tb.dir().join("haproxy.log");
    // Dropped before the testbed: HAProxy is gone before its namespace.
    let mut hap = Haproxy::start(lbh.netns(), &hcfg, &hlog)?;
    let haproxy_addr = SocketAddr::from((HAPROXY_ADDR, PORT));
    let t = Instant::now();
    while lbh
        .run_in(|| TcpStream::connect_timeout(&haproxy_addr, Duration::from_millis(200)))?
        .is_err()
    {
        if let Some(st) = hap.0.try_wait()? {
            bail!(
                "haproxy exited ({st}): {}",
                fs::read_to_string(&hlog).unwrap_or_default()
            );
        }
        ensure!(
            t.elapsed() < Duration::from_secs(10),
            "haproxy not listening after 10 s"
        );
        thread::sleep(Duration::from_millis(50));
    }

    let paths = Paths {
        client_ns: client.netns().to_string(),
        lb_addr: web.socket_addr(),
        haproxy_addr,
        // `ip netns exec` execs haproxy: same pid.
        haproxy_pid: hap.0.id(),
        prog_pin,
    };
    check_path(&tb, "lb (ipip4 VIP)", paths.lb_addr)?;
    check_path(&tb, &format!("HAProxy {version}"), haproxy_addr)?;

    println!(
        "\nHTTP/1.1 GET / on a new connection each (Connection: close), {WORKERS} client \
         workers, 3 backends; {rounds} rounds of {secs} s per path, taking turns; {} CPUs",
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    let _stats = BpfStats::on()?;
    // Warm-up: caches, the backends' thread stacks, HAProxy's pools.
    for p in [Path::Lb, Path::Haproxy] {
        paths.measure(p, Duration::from_secs(1))?;
    }
    let mut runs: Vec<(Path, Run)> = Vec::new();
    for r in 0..rounds {
        let order = if r % 2 == 0 {
            [Path::Lb, Path::Haproxy]
        } else {
            [Path::Haproxy, Path::Lb]
        };
        for p in order {
            let run = paths.measure(p, dur)?;
            println!(
                "  round {} {:<8} {:>8.0} conn/s  p50 {:>6.0} µs  p99 {:>6.0} µs  errors {}  \
                 machine {:>5.1} µs/req  own {:>5.2} µs/req",
                r + 1,
                p.name(),
                run.cps,
                run.p50_us,
                run.p99_us,
                run.errors,
                run.cpu_us,
                run.own_us
            );
            runs.push((p, run));
        }
        if let Some(st) = hap.0.try_wait()? {
            bail!("haproxy exited ({st})");
        }
    }

    println!(
        "\n{:<28} {:>9} {:>8} {:>8} {:>7} {:>14} {:>14}",
        "path", "conn/s", "p50 µs", "p99 µs", "errors", "machine µs/req", "own CPU µs/req"
    );
    let mut med = std::collections::BTreeMap::new();
    let mut notes = Vec::new();
    for p in [Path::Lb, Path::Haproxy] {
        let sel: Vec<&Run> = runs
            .iter()
            .filter(|(q, _)| *q == p)
            .map(|(_, r)| r)
            .collect();
        let m = |f: fn(&Run) -> f64| out::median(&mut sel.iter().map(|r| f(r)).collect::<Vec<_>>());
        let cps_rounds: Vec<f64> = sel.iter().map(|r| r.cps.round()).collect();
        let (cps, p50, p99, cpu, own, prog, runs) = (
            m(|r| r.cps),
            m(|r| r.p50_us),
            m(|r| r.p99_us),
            m(|r| r.cpu_us),
            m(|r| r.own_us),
            m(|r| r.prog_us),
            m(|r| r.prog_runs),
        );
        let errors: u64 = sel.iter().map(|r| r.errors).sum();
        let requests: u64 = sel.iter().map(|r| r.requests).sum();
        let label = match p {
            Path::Lb => "lb (XDP, ipip, DSR)".to_string(),
            Path::Haproxy => format!("HAProxy {version} (tcp)"),
        };
        println!(
            "{label:<28} {cps:>9.0} {p50:>8.0} {p99:>8.0} {errors:>7} {cpu:>14.1} {own:>14.2}"
        );
        notes.push(format!(
            "the lb program on the {} path: {runs:.1} runs (packets) and {prog:.2} µs per \
             request, {:.0} ns per run{}",
            p.name(),
            prog * 1e3 / runs,
            if p == Path::Haproxy {
                " (passing them to the kernel)"
            } else {
                ""
            }
        ));
        let mut rec = json!({
            "path": p.name(),
            "cps": cps,
            "p50_us": p50,
            "p99_us": p99,
            "errors": errors,
            "cpu_us_per_req": cpu,
            "own_cpu_us_per_req": own,
            "rounds": rounds,
            "seconds": secs,
            "workers": WORKERS,
            "cps_rounds": cps_rounds,
        });
        if p == Path::Haproxy {
            rec["version"] = json!(version);
        }
        out::record("haproxy", rec)?;
        ensure!(requests > 0, "no request through {} succeeded", p.name());
        med.insert(p.name(), (cps, p99));
    }
    for n in notes {
        println!("  {n}");
    }
    let (lb, hx) = (med["lb"], med["haproxy"]);
    println!(
        "lb / HAProxy: conn/s x{:.2}, p99 x{:.2}",
        lb.0 / hx.0,
        lb.1 / hx.1
    );
    drop(hap);
    tb.down()
}
