//! End to end, with real traffic: a client namespace opens real TCP connections (HTTP) and
//! sends real UDP datagrams to VIPs; the real `lb` XDP program, run by the real agent and
//! configured only through the `lb` CLI (as an operator would), forwards them to backend
//! namespaces, whose `decap` program and kernel hand them to `lb-testbed-server`, which
//! answers the client directly. One test per forwarding path (mode x VIP family x backend
//! family), one for weights, two for the testbed's own clean-up. Needs root.
//!
//! Every test builds its own `lb_tests::testbed::Testbed` (a guard: everything goes when it
//! is dropped, also when the test fails) and ends by asserting that no namespace, pin,
//! socket, file or process of it remains.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    process::Command,
    thread,
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use lb_common::DecapReason;
use lb_tests::{
    netns::{in_netns, lb, unique_name},
    support::try_wait_for,
    testbed::{
        assert_clean, down_prefix, http_get, http_get_from, leftovers, pattern_mismatch,
        udp_request, udp_request_from, ForwardingPath, Testbed, TestbedOpts, UdpReply, VipSpec,
    },
};
use lb_userspace::config::Forwarding;
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(5);

fn opts() -> TestbedOpts {
    TestbedOpts::default()
        .prefix(&unique_name("lbe2e"))
        .server_bin(env!("CARGO_BIN_EXE_lb-testbed-server"))
}

/// A testbed with the agent running on an empty config (no VIPs yet).
fn testbed(opts: TestbedOpts) -> Result<Testbed> {
    let mut tb = Testbed::up(opts)?;
    let cfg = tb.agent_config(&[])?;
    tb.start_agent(&cfg)?;
    Ok(tb)
}

/// `lb stats`: (packets, bytes, new_flows) of a VIP.
fn vip_stats(stats: &Value, name: &str) -> (u64, u64, u64) {
    let v = stats["vips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no VIP {name} in `lb stats`: {stats}"));
    let n = |k: &str| v[k].as_u64().unwrap();
    (n("packets"), n("bytes"), n("new_flows"))
}

fn names(tb: &Testbed) -> BTreeSet<String> {
    tb.backends().iter().map(|b| b.name.clone()).collect()
}

/// Through one forwarding path: a TCP VIP and a UDP VIP, created with `lb vip add` and
/// `lb backend add`. Many new connections and datagrams all get answers, from every
/// backend; a long download arrives byte for byte; a UDP flow stays on its backend; the
/// agent's counters and the backends' decap counters account for every packet.
fn path_carries_http_and_udp(label: &str) -> Result<()> {
    const FLOWS: usize = 60;
    let path = ForwardingPath::get(label);
    let tb = testbed(opts())?;
    let prefix = tb.prefix().to_string();
    let (web, echo) = (path.tcp(), path.udp());
    tb.add_vip(&web)?;
    tb.add_vip(&echo)?;
    let listed = tb.lb_json(&["vip", "list"])?;
    for spec in [&web, &echo] {
        let v = listed
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == spec.name.as_str())
            .with_context(|| format!("{} not in `lb vip list`: {listed}", spec.name))?;
        assert_eq!(v["forwarding"], spec.forwarding.to_string(), "{listed}");
        assert_eq!(v["active"], 3, "{listed}");
    }
    let all = names(&tb);
    let decap_before = tb.decap_counts()?;
    let hc_before = tb.hc_encapsulated()?;

    // HTTP, a new connection each time.
    let addr = web.socket_addr();
    let replies = tb.in_client(|| {
        (0..FLOWS)
            .map(|_| http_get(addr, "/", TIMEOUT))
            .collect::<Result<Vec<_>>>()
    })??;
    let mut seen = BTreeSet::new();
    for r in &replies {
        assert_eq!(r.status, 200, "{label}: {r:?}");
        let text = r.text();
        assert_eq!(text.lines().next(), Some(r.backend()), "{label}: {text}");
        assert!(text.contains(&format!("vip {addr}\n")), "{label}: {text}");
        // The backend saw the client's own address and port: it can answer it directly.
        assert!(
            text.contains(&format!("client {}\n", r.local)),
            "{label}: {text}"
        );
        seen.insert(r.backend().to_string());
    }
    assert_eq!(seen, all, "{label}: HTTP answered by {seen:?}");

    // A long transfer, byte for byte.
    const BIG: usize = 4_000_000;
    let big = tb.http_get(addr, &format!("/bytes?n={BIG}"))?;
    assert_eq!(big.status, 200);
    assert_eq!(big.body.len(), BIG, "{label}: length of /bytes");
    assert_eq!(
        pattern_mismatch(&big.body),
        None,
        "{label}: first byte that differs"
    );

    // UDP: a new flow (source port) per request, then one socket for many.
    let addr = echo.socket_addr();
    let udp = tb.in_client(|| {
        (0..FLOWS)
            .map(|i| {
                let port = 20000 + i as u16; // below the ephemeral range
                udp_request_from(port, addr, format!("ping {i}").as_bytes(), TIMEOUT)
            })
            .collect::<Result<Vec<_>>>()
    })??;
    let mut seen = BTreeSet::new();
    for (i, r) in udp.iter().enumerate() {
        assert_eq!(r.echo, format!("ping {i}").as_bytes(), "{label}: {r:?}");
        seen.insert(r.backend.clone());
    }
    assert_eq!(seen, all, "{label}: UDP answered by {seen:?}");
    let sticky = tb.in_client(|| -> Result<BTreeSet<String>> {
        let local: SocketAddr = if addr.is_ipv6() {
            "[::]:0".parse()?
        } else {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let s = UdpSocket::bind(local)?;
        s.connect(addr)?; // replies from any other source are not received
        s.set_read_timeout(Some(TIMEOUT))?;
        let mut backends = BTreeSet::new();
        let mut buf = [0u8; 2048];
        for i in 0..20 {
            s.send(format!("same flow {i}").as_bytes())?;
            let n = s.recv(&mut buf).context("echo on the same flow")?;
            let r = UdpReply::parse(&buf[..n])?;
            ensure!(r.echo == format!("same flow {i}").as_bytes(), "{r:?}");
            backends.insert(r.backend);
        }
        Ok(backends)
    })??;
    assert_eq!(
        sticky.len(),
        1,
        "{label}: one UDP flow, backends {sticky:?}"
    );

    // The agent counted every flow once (a connection that reused the port of an earlier
    // one is the same flow); the backends decapsulated every forwarded packet (l2dsr: none,
    // the frames arrive as they are).
    let stats = tb.lb_json(&["stats"])?;
    let (_, tcp_bytes, tcp_flows) = vip_stats(&stats, &web.name);
    let (_, _, udp_flows) = vip_stats(&stats, &echo.name);
    // Direct server return: the LB saw requests and ACKs, never the download.
    assert!(
        tcp_bytes < BIG as u64 / 4,
        "{label}: {tcp_bytes} bytes to the TCP VIP through the LB"
    );
    let tcp_ports: BTreeSet<u16> = replies
        .iter()
        .chain([&big])
        .map(|r| r.local.port())
        .collect();
    assert_eq!(tcp_flows, tcp_ports.len() as u64, "{label}: new TCP flows");
    assert_eq!(udp_flows, FLOWS as u64 + 1, "{label}: new UDP flows");
    let mut forwarded = 0;
    try_wait_for(
        "the backends to decapsulate what the LB forwarded",
        TIMEOUT,
        || {
            let stats = tb.lb_json(&["stats"])?;
            forwarded = vip_stats(&stats, &web.name).0 + vip_stats(&stats, &echo.name).0;
            // Health probes go through the tunnel too: the backends decap those as well.
            let probes = (tb.hc_encapsulated()? - hc_before) as i64;
            let decapped = (tb.decap_counts()?[DecapReason::Decapped as usize]
                - decap_before[DecapReason::Decapped as usize]) as i64
                - probes;
            let want = if path.forwarding == Forwarding::L2dsr {
                0
            } else {
                forwarded
            };
            Ok(decapped == want as i64 && stats["reasons"]["tx_forward"] == forwarded)
        },
    )
    .with_context(|| {
        format!(
            "{label}: {forwarded} forwarded, decap counters {:?} (before {decap_before:?})",
            tb.decap_counts().unwrap_or_default()
        )
    })?;
    assert_eq!(
        tb.decap_counts()?[DecapReason::DropMalformed as usize],
        0,
        "{label}: malformed"
    );

    tb.down()?;
    assert_clean(&prefix)
}

#[test]
fn http_and_udp_through_ipip_ipv4() -> Result<()> {
    path_carries_http_and_udp("ipip4")
}

#[test]
fn http_and_udp_through_ipip_ipv6() -> Result<()> {
    path_carries_http_and_udp("ipip6")
}

#[test]
fn http_and_udp_through_ipip_ipv4_in_ipv6() -> Result<()> {
    path_carries_http_and_udp("ipip4in6")
}

#[test]
fn http_and_udp_through_gue_ipv4() -> Result<()> {
    path_carries_http_and_udp("gue4")
}

#[test]
fn http_and_udp_through_gue_ipv6() -> Result<()> {
    path_carries_http_and_udp("gue6")
}

#[test]
fn http_and_udp_through_gue_ipv4_in_ipv6() -> Result<()> {
    path_carries_http_and_udp("gue4in6")
}

#[test]
fn http_and_udp_through_gue_ipv6_in_ipv4() -> Result<()> {
    path_carries_http_and_udp("gue6in4")
}

#[test]
fn http_and_udp_through_l2dsr_ipv4() -> Result<()> {
    path_carries_http_and_udp("l2dsr4")
}

#[test]
fn http_and_udp_through_l2dsr_ipv6() -> Result<()> {
    path_carries_http_and_udp("l2dsr6")
}

/// Weights 1, 2, 3 set with `lb backend weight`: over 2,400 new TCP connections each
/// backend's share is within 5 percentage points of its weight's share, and `lb stats`
/// counts exactly the flows (client ports) each backend answered.
#[test]
fn new_connections_split_by_the_weights_set_with_lb_backend_weight() -> Result<()> {
    const CONNS: usize = 2400;
    const THREADS: usize = 4;
    let tb = testbed(opts())?;
    let prefix = tb.prefix().to_string();
    let web = VipSpec::tcp("web", Ipv4Addr::new(198, 18, 10, 80), Forwarding::Ipip);
    tb.add_vip(&web)?;
    let weights = [1u32, 2, 3];
    for (b, w) in tb.backends().iter().zip(weights) {
        tb.lb(&[
            "backend",
            "weight",
            "web",
            &b.v4.to_string(),
            &w.to_string(),
        ])
        .expect_ok("lb backend weight");
    }
    let listed = tb.lb_json(&["backend", "list", "web"])?;
    let listed: Vec<u64> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["weight"].as_u64().unwrap())
        .collect();
    assert_eq!(listed, [1, 2, 3], "weights in `lb backend list`");

    let addr = web.socket_addr();
    let client = tb.client().netns().to_string();
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let client = client.clone();
            thread::spawn(move || {
                in_netns(&client, || -> Result<Vec<(u16, String)>> {
                    (0..CONNS / THREADS)
                        .map(|_| {
                            let r = http_get(addr, "/", TIMEOUT)?;
                            Ok((r.local.port(), r.backend().to_string()))
                        })
                        .collect()
                })?
            })
        })
        .collect();
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    // A connection from the port of an earlier one is the same flow, not a new one.
    let mut flows: BTreeMap<String, BTreeSet<u16>> = BTreeMap::new();
    for w in workers {
        for (port, name) in w.join().unwrap()? {
            *count.entry(name.clone()).or_default() += 1;
            flows.entry(name).or_default().insert(port);
        }
    }
    assert_eq!(count.values().sum::<usize>(), CONNS);
    let total_weight: u32 = weights.iter().sum();
    let stats = tb.lb_json(&["stats"])?;
    for (b, w) in tb.backends().iter().zip(weights) {
        let got = count.get(&b.name).copied().unwrap_or(0);
        let share = got as f64 / CONNS as f64;
        let want = w as f64 / total_weight as f64;
        assert!(
            (share - want).abs() <= 0.05,
            "{} (weight {w}): {:.1}% of new connections, want {:.1}% ± 5: {count:?}",
            b.name,
            share * 100.0,
            want * 100.0
        );
        let counted = stats["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["address"] == b.v4.to_string())
            .map(|s| s["new_flows"].as_u64().unwrap());
        let distinct = flows.get(&b.name).map_or(0, |f| f.len() as u64);
        assert_eq!(
            counted,
            Some(distinct),
            "{}: new flows in `lb stats` vs flows it answered",
            b.name
        );
    }
    let flows: usize = flows.values().map(BTreeSet::len).sum();
    eprintln!("weights {weights:?}: connections per backend {count:?} ({flows} flows)");
    tb.down()?;
    assert_clean(&prefix)
}

/// A test that fails half-way, with the agent running and a stray process in a testbed
/// namespace: dropping the testbed still removes everything.
#[test]
fn a_failing_test_leaves_nothing_behind() -> Result<()> {
    let opts = opts();
    let prefix = opts.prefix.clone();
    let mut stray = None;
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let tb = testbed(opts).unwrap();
        tb.add_vip(&ForwardingPath::get("gue4").tcp()).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", tb.client().netns(), "sleep", "600"])
            .spawn()
            .unwrap();
        stray = Some(child);
        assert!(!leftovers(tb.prefix()).unwrap().is_empty());
        panic!("the test fails here (on purpose)");
    }));
    assert!(r.is_err());
    let st = stray.expect("spawned").wait()?;
    assert!(!st.success(), "the stray process was killed: {st}");
    assert_clean(&prefix)
}

/// `testbed up` (what `cargo xtask testbed up` runs) exits leaving a working testbed: the
/// agent with a VIP per forwarding path, XDP programs, servers. `testbed down` removes it.
#[test]
fn the_testbed_command_leaves_a_working_testbed_and_down_removes_it() -> Result<()> {
    /// Removes the testbed however the test ends.
    struct Down(String);
    impl Drop for Down {
        fn drop(&mut self) {
            if let Err(e) = down_prefix(&self.0) {
                eprintln!("{e:#}");
            }
        }
    }
    let prefix = unique_name("lbe2e");
    let _down = Down(prefix.clone());
    let bin = env!("CARGO_BIN_EXE_testbed");
    let up = Command::new(bin)
        .args(["up", "--prefix", &prefix, "--backends", "2"])
        .output()?;
    let stdout = String::from_utf8_lossy(&up.stdout);
    ensure!(
        up.status.success(),
        "testbed up: {}\n{stdout}\n{}",
        up.status,
        String::from_utf8_lossy(&up.stderr)
    );
    for want in [
        format!("{prefix}-client"),
        format!("{prefix}-be2"),
        "198.18.0.100".into(),
        "2001:db8:10::1".into(),
        "gue6in4-udp".into(),
    ] {
        ensure!(
            stdout.contains(&want),
            "`testbed up` output lacks {want}:\n{stdout}"
        );
    }
    let client = format!("{prefix}-client");
    let mut seen = BTreeSet::new();
    for p in ["ipip4", "gue6", "l2dsr4"] {
        let path = ForwardingPath::get(p);
        let (tcp, udp) = (path.tcp().socket_addr(), path.udp().socket_addr());
        let (h, u) = in_netns(&client, || -> Result<_> {
            Ok((
                http_get(tcp, "/", TIMEOUT)?,
                udp_request(udp, b"hi", TIMEOUT)?,
            ))
        })??;
        ensure!(h.status == 200 && u.echo == b"hi", "{p}: {h:?} {u:?}");
        seen.insert(h.backend().to_string());
        seen.insert(u.backend);
    }
    ensure!(seen.iter().all(|b| b == "be1" || b == "be2"), "{seen:?}");

    // The banner's restart command, as printed, brings a killed agent back.
    let lines: Vec<&str> = stdout.lines().collect();
    let restart = lines
        .iter()
        .position(|l| l.trim_start().starts_with("restart it"))
        .and_then(|i| lines.get(i + 1))
        .map(|l| l.trim())
        .with_context(|| format!("no restart command in:\n{stdout}"))?;
    let inst = format!("{prefix}-lb");
    ensure!(
        restart.contains(" agent --config ")
            && restart.contains(&format!(" --instance {inst} --netns {prefix}-lb "))
            && restart.ends_with(" 2>&1 &"),
        "restart command: {restart}"
    );
    let pid: i32 = stdout
        .split_once(&format!("agent {inst} (pid "))
        .and_then(|(_, r)| r.split_once(')'))
        .and_then(|(p, _)| p.parse().ok())
        .with_context(|| format!("no agent pid in:\n{stdout}"))?;
    ensure!(
        unsafe { libc::kill(pid, libc::SIGKILL) } == 0,
        "kill -9 {pid}"
    );
    let st = Command::new("bash").args(["-c", restart]).status()?;
    ensure!(st.success(), "{restart}: {st}");
    try_wait_for("the restarted agent", Duration::from_secs(10), || {
        let out = lb(&["--instance", &inst, "--json", "status"]);
        // The killed agent answers nothing: an answer is the new one's.
        Ok(out.ok() && serde_json::from_str::<Value>(&out.stdout)?["adopted"] == true)
    })?;
    let tcp = ForwardingPath::get("ipip4").tcp().socket_addr();
    let h = in_netns(&client, || http_get(tcp, "/", TIMEOUT))??;
    ensure!(h.status == 200, "after the restart: {h:?}");

    let down = Command::new(bin)
        .args(["down", "--prefix", &prefix])
        .output()?;
    ensure!(
        down.status.success(),
        "testbed down: {}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert_clean(&prefix)
}

/// What the issue that asked for "a SYN always follows the ring" measured with real
/// clients: a client that reuses its source port (busy clients and NATs do) landed on its
/// old entry's backend, even when that backend was drained, removed from the VIP (while
/// still serving another VIP), or when the VIP was removed and added again without it.
#[test]
fn a_client_reusing_its_source_ports_is_only_sent_to_backends_that_take_new_connections(
) -> Result<()> {
    const PORTS: std::ops::Range<u16> = 42000..42090;
    let tb = testbed(opts())?;
    let web = VipSpec::tcp("web", Ipv4Addr::new(198, 18, 10, 1), Forwarding::Ipip);
    // The same backends serve a second VIP: removing one from `web` leaves it up there.
    let other = VipSpec::tcp("other", Ipv4Addr::new(198, 18, 10, 2), Forwarding::Ipip);
    tb.add_vip(&web)?;
    tb.add_vip(&other)?;
    let addr = web.socket_addr();
    let get_all = |what: &str| -> Result<BTreeMap<u16, String>> {
        tb.in_client(|| {
            PORTS
                .map(|p| {
                    let r = http_get_from(p, addr, "/", TIMEOUT)?;
                    ensure!(r.status == 200, "{what}: {r:?}");
                    ensure!(r.local.port() == p, "{what}: bound to {p}");
                    Ok((p, r.backend().to_string()))
                })
                .collect()
        })?
    };
    let first = get_all("first")?;
    let be = |i: usize| &tb.backends()[i];
    let on = |m: &BTreeMap<u16, String>, name: &str| m.values().filter(|b| *b == name).count();
    assert!(
        on(&first, &be(0).name) > 10 && on(&first, &be(1).name) > 10,
        "{first:?}"
    );

    tb.lb(&["backend", "drain", "web", &be(0).v4.to_string()])
        .expect_ok("drain");
    let after_drain = get_all("after the drain")?;
    assert_eq!(
        on(&after_drain, &be(0).name),
        0,
        "drained backend got: {after_drain:?}"
    );

    tb.lb(&["backend", "remove", "web", &be(1).v4.to_string()])
        .expect_ok("remove");
    let after_remove = get_all("after the removal")?;
    assert_eq!(
        on(&after_remove, &be(1).name),
        0,
        "removed backend got: {after_remove:?}"
    );

    tb.lb(&["vip", "remove", "web"]).expect_ok("vip remove");
    tb.lb(&["vip", "add", "web", "198.18.10.1", "80", "tcp"])
        .expect_ok("vip add");
    tb.lb(&["backend", "add", "web", &be(2).v4.to_string()])
        .expect_ok("backend add");
    let after_readd = get_all("after the VIP came back")?;
    assert_eq!(
        on(&after_readd, &be(2).name),
        PORTS.len(),
        "only the re-added VIP's backend: {after_readd:?}"
    );
    Ok(())
}
