//! Health checks and failover with real clients, in the namespace testbed: a backend whose
//! server dies, or whose link goes dark, is out of the ring before clients notice for
//! long, and back after `rise`; a check through the tunnel sees what a direct one cannot;
//! backups and the panic threshold; slow start. Every state change is an event with its
//! reason. Expected figures come from the configured intervals, never from the agent.
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

use anyhow::Result;
use lb_tests::{
    netns::{spawn_in_netns, unique_name},
    support::{wait_for, StopOnDrop},
    testbed::{http_get, udp_request_from, Testbed, TestbedOpts, VipSpec},
};
use lb_userspace::config::{CheckKind, Forwarding, HealthSpec, Via};
use serde_json::Value;

/// Checks every 100 ms, 100 ms timeout, down after 2 failures, up after 2 passes.
fn fast(via: Via) -> HealthSpec {
    HealthSpec {
        via: Some(via),
        interval_ms: Some(100),
        timeout_ms: Some(100),
        fall: Some(2),
        rise: Some(2),
        ..Default::default()
    }
}

fn testbed(backends: usize, vips: &[VipSpec]) -> Result<Testbed> {
    let mut tb = Testbed::up(
        TestbedOpts::default()
            .prefix(&unique_name("lbhc"))
            .backends(backends)
            .server_bin(env!("CARGO_BIN_EXE_lb-testbed-server")),
    )?;
    let cfg = tb.agent_config(vips)?;
    tb.start_agent(&cfg)?;
    Ok(tb)
}

fn web(name: &str, last: u8, health: HealthSpec) -> VipSpec {
    let mut v = VipSpec::tcp(name, IpAddr::from([198, 18, 10, last]), Forwarding::Ipip);
    v.health = Some(health);
    v
}

/// When a connection started, and which backend answered or why it failed.
type Attempts = Vec<(Instant, Result<String, String>)>;

/// New HTTP connections to `addr` from the client, one after another, until stopped.
struct Clients {
    log: Arc<Mutex<Attempts>>,
    _stop: StopOnDrop,
}

impl Clients {
    fn start(tb: &Testbed, addr: SocketAddr) -> Clients {
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (log, stop) = (log.clone(), stop.clone());
            drop(spawn_in_netns(tb.client().netns(), move || {
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let r = http_get(addr, "/", Duration::from_millis(300))
                        .map(|r| r.backend().to_string())
                        .map_err(|e| format!("{e:#}"));
                    log.lock().unwrap().push((t, r));
                    thread::sleep(Duration::from_millis(5));
                }
            }));
        }
        Clients {
            log,
            _stop: StopOnDrop(stop),
        }
    }

    /// Connections started in [from, to): backend -> count (failures under "failed").
    fn between(&self, from: Instant, to: Instant) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for (t, r) in self.log.lock().unwrap().iter() {
            if *t >= from && *t < to {
                let k = r.clone().unwrap_or_else(|_| "failed".into());
                *out.entry(k).or_default() += 1;
            }
        }
        out
    }

    /// The last failure and when it started.
    fn last_failure(&self) -> Option<(Instant, String)> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find_map(|(t, r)| r.clone().err().map(|e| (*t, e)))
    }
}

/// Backend `i`: its name (what its server answers) and IPv4 address.
fn who(tb: &Testbed, i: usize) -> (String, IpAddr) {
    let b = &tb.backends()[i];
    (b.name.clone(), IpAddr::V4(b.v4))
}

fn events(tb: &Testbed) -> Vec<Value> {
    tb.lb_json(&["events"]).unwrap().as_array().unwrap().clone()
}

/// The events about `backend` of `vip`: (what, reason).
fn changes(tb: &Testbed, vip: &str, backend: IpAddr) -> Vec<(String, String)> {
    events(tb)
        .iter()
        .filter(|e| e["vip"] == vip && e["backend"] == backend.to_string())
        .map(|e| {
            (
                e["what"].as_str().unwrap().to_string(),
                e["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn a_killed_server_is_out_within_a_second_and_back_after_rise() -> Result<()> {
    let mut tb = testbed(3, &[web("web", 1, fast(Via::Tunnel))])?;
    let be1 = who(&tb, 0);
    let clients = Clients::start(&tb, "198.18.10.1:80".parse()?);
    thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    tb.kill_server(0);
    thread::sleep(Duration::from_millis(2000));
    // Connections that started 1 s after the kill all worked.
    let late = clients.between(killed + Duration::from_secs(1), Instant::now());
    assert!(!late.contains_key("failed"), "failures after 1 s: {late:?}");
    assert!(!late.contains_key(&be1.0), "{late:?}");
    if let Some((t, why)) = clients.last_failure() {
        assert!(t < killed + Duration::from_secs(1), "last failure {why}");
    }
    assert_eq!(
        changes(&tb, "web", be1.1),
        [("down".to_string(), "connection refused".to_string())]
    );
    // Back: after `rise` passing checks it takes new connections again.
    tb.restart_server(0)?;
    let back = Instant::now();
    wait_for("be1 back", Duration::from_secs(3), || {
        clients.between(back, Instant::now()).contains_key(&be1.0)
    });
    let ch = changes(&tb, "web", be1.1);
    assert_eq!(ch.last().map(|c| c.0.as_str()), Some("up"), "{ch:?}");
    let st = tb.lb_json(&["status"])?;
    let row = st["health"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["backend"] == be1.1.to_string())
        .unwrap()
        .clone();
    assert_eq!(row["failures"], 1, "{row}");
    let a = row["availability"].as_f64().unwrap();
    assert!(a > 0.0 && a < 1.0, "{row}");
    Ok(())
}

#[test]
fn a_black_holed_backend_is_out_by_the_timeout_path() -> Result<()> {
    let tb = testbed(3, &[web("web", 1, fast(Via::Tunnel))])?;
    let be1 = who(&tb, 0);
    let clients = Clients::start(&tb, "198.18.10.1:80".parse()?);
    thread::sleep(Duration::from_millis(500));
    // Its link into the bridge goes dark: nothing is refused, everything is lost.
    let cut = Instant::now();
    tb.bridge().ip(&["link", "set", &be1.0, "down"])?;
    thread::sleep(Duration::from_millis(2000));
    let late = clients.between(cut + Duration::from_secs(1), Instant::now());
    assert!(!late.contains_key("failed"), "failures after 1 s: {late:?}");
    let ch = changes(&tb, "web", be1.1);
    assert_eq!(ch.len(), 1, "{ch:?}");
    assert!(ch[0].1.starts_with("timeout"), "{ch:?}");
    tb.bridge().ip(&["link", "set", &be1.0, "up"])?;
    let back = Instant::now();
    wait_for("be1 back", Duration::from_secs(5), || {
        clients.between(back, Instant::now()).contains_key(&be1.0)
    });
    Ok(())
}

#[test]
fn an_established_udp_flow_of_a_dead_backend_continues_at_once_on_another() -> Result<()> {
    let mut dns = VipSpec::udp("dns", IpAddr::from([198, 18, 10, 53]), Forwarding::Ipip);
    dns.health = Some(HealthSpec {
        kind: Some(CheckKind::Udp),
        ..fast(Via::Tunnel)
    });
    let mut tb = testbed(3, &[dns])?;
    let addr: SocketAddr = "198.18.10.53:53".parse()?;
    // One flow: always the same client port.
    let ask = |tb: &Testbed| {
        tb.in_client(|| udp_request_from(40053, addr, b"q", Duration::from_millis(300)))?
            .map(|r| r.backend)
    };
    let first = ask(&tb)?;
    for _ in 0..5 {
        assert_eq!(ask(&tb)?, first, "a UDP flow stays on its backend");
    }
    let i = tb.backends().iter().position(|b| b.name == first).unwrap();
    let addr_i = IpAddr::V4(tb.backends()[i].v4);
    tb.kill_server(i);
    wait_for("the backend down", Duration::from_secs(3), || {
        changes(&tb, "dns", addr_i).iter().any(|c| c.0 == "down")
    });
    // The flow's next datagram is answered by another backend, which keeps it.
    let next = ask(&tb)?;
    assert_ne!(next, first);
    for _ in 0..5 {
        assert_eq!(ask(&tb)?, next, "the flow stays on its new backend");
    }
    Ok(())
}

#[test]
fn a_tunnel_check_sees_a_lost_vip_or_decap_that_a_direct_check_cannot() -> Result<()> {
    let tb = testbed(
        3,
        &[
            web("tun", 1, fast(Via::Tunnel)),
            web("dir", 2, fast(Via::Direct)),
        ],
    )?;
    let (be1, be2) = (who(&tb, 0), who(&tb, 1));
    thread::sleep(Duration::from_millis(500));
    // be1 no longer holds the VIPs.
    tb.backends()[0].ns.ip(&[
        "route",
        "del",
        "local",
        "198.18.10.0/24",
        "dev",
        "lo",
        "table",
        "local",
    ])?;
    // be2 no longer decapsulates.
    tb.detach_decap(1)?;
    wait_for("tunnel checks fail", Duration::from_secs(3), || {
        changes(&tb, "tun", be1.1).len() == 1 && changes(&tb, "tun", be2.1).len() == 1
    });
    thread::sleep(Duration::from_millis(500));
    assert_eq!(changes(&tb, "dir", be1.1), [], "direct checks still pass");
    assert_eq!(changes(&tb, "dir", be2.1), []);
    // What clients of the tunnel-checked VIP see: only be3 answers, nothing fails.
    let replies: Vec<String> = tb.in_client(|| {
        (0..40)
            .map(|_| {
                http_get(
                    "198.18.10.1:80".parse().unwrap(),
                    "/",
                    Duration::from_secs(2),
                )
                .map(|r| r.backend().to_string())
                .unwrap_or_else(|e| format!("failed: {e:#}"))
            })
            .collect()
    })?;
    assert!(replies.iter().all(|r| r == "be3"), "{replies:?}");
    Ok(())
}

#[test]
fn backups_serve_only_while_no_primary_passes_and_hand_back() -> Result<()> {
    let mut spec = web("web", 1, fast(Via::Tunnel));
    spec.backups = vec![2]; // be3
    let mut tb = testbed(3, &[spec])?;
    let clients = Clients::start(&tb, "198.18.10.1:80".parse()?);
    thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    thread::sleep(Duration::from_millis(500));
    let normal = clients.between(t0, Instant::now());
    assert!(
        !normal.contains_key("be3"),
        "the backup took flows: {normal:?}"
    );
    tb.kill_server(0);
    tb.kill_server(1);
    thread::sleep(Duration::from_millis(1500));
    let t1 = Instant::now();
    thread::sleep(Duration::from_millis(500));
    let failover = clients.between(t1, Instant::now());
    assert_eq!(failover.keys().collect::<Vec<_>>(), ["be3"], "{failover:?}");
    tb.restart_server(0)?;
    thread::sleep(Duration::from_millis(1000));
    let t2 = Instant::now();
    thread::sleep(Duration::from_millis(500));
    let back = clients.between(t2, Instant::now());
    assert_eq!(back.keys().collect::<Vec<_>>(), ["be1"], "{back:?}");
    let what: Vec<String> = events(&tb)
        .iter()
        .filter(|e| e["backend"].is_null())
        .map(|e| e["what"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(what, ["backups_serve", "primaries_serve"]);
    Ok(())
}

#[test]
fn below_the_panic_threshold_new_flows_go_to_every_primary() -> Result<()> {
    let mut spec = web("web", 1, fast(Via::Tunnel));
    spec.panic_threshold = Some(50);
    let mut tb = testbed(4, &[spec])?;
    let clients = Clients::start(&tb, "198.18.10.1:80".parse()?);
    // Two of four down: 50 % pass, not below the threshold: only the two get flows.
    tb.kill_server(0);
    tb.kill_server(1);
    thread::sleep(Duration::from_millis(1200));
    let t = Instant::now();
    thread::sleep(Duration::from_millis(400));
    let two = clients.between(t, Instant::now());
    assert_eq!(two.keys().collect::<Vec<_>>(), ["be3", "be4"], "{two:?}");
    // Three of four down: panic, all four take new flows (and the dead ones refuse).
    tb.kill_server(2);
    wait_for("panic", Duration::from_secs(3), || {
        events(&tb).iter().any(|e| e["what"] == "panic")
    });
    let t = Instant::now();
    thread::sleep(Duration::from_millis(600));
    let panic = clients.between(t, Instant::now());
    assert!(
        panic.contains_key("be4") && panic.contains_key("failed"),
        "{panic:?}"
    );
    let st = tb.lb_json(&["status"])?;
    assert_eq!(st["modes"]["web"]["panic"], true, "{st}");
    // Two back: out of panic.
    tb.restart_server(0)?;
    tb.restart_server(1)?;
    wait_for("panic over", Duration::from_secs(3), || {
        events(&tb).iter().any(|e| e["what"] == "panic_over")
    });
    Ok(())
}

#[test]
fn a_returning_backend_ramps_its_share_up_over_slow_start() -> Result<()> {
    let mut spec = web("web", 1, fast(Via::Tunnel));
    spec.slow_start_s = 4;
    let mut tb = testbed(2, &[spec])?;
    let be1 = who(&tb, 0);
    let clients = Clients::start(&tb, "198.18.10.1:80".parse()?);
    tb.kill_server(0);
    wait_for("be1 down", Duration::from_secs(3), || {
        changes(&tb, "web", be1.1).len() == 1
    });
    tb.restart_server(0)?;
    wait_for("be1 up", Duration::from_secs(3), || {
        changes(&tb, "web", be1.1).len() == 2
    });
    let up = Instant::now();
    let share = |from_ms: u64, to_ms: u64| {
        let m = clients.between(
            up + Duration::from_millis(from_ms),
            up + Duration::from_millis(to_ms),
        );
        let n: usize = m.values().sum();
        m.get(&be1.0).copied().unwrap_or(0) as f64 / n.max(1) as f64
    };
    thread::sleep(Duration::from_millis(6500));
    // Weight 25 % of be2's at first (a share of 20 %), all of it (50 %) after 4 s plus a tick.
    let (first, last) = (share(0, 1000), share(5500, 6500));
    assert!(first < 0.33, "share in the first second {first:.2}");
    assert!(last > 0.40, "share after the ramp {last:.2}");
    assert!(first + 0.12 < last, "{first:.2} -> {last:.2}");
    Ok(())
}

#[test]
fn a_drain_with_a_timeout_removes_the_backend_when_it_ends() -> Result<()> {
    let tb = testbed(2, &[web("web", 1, fast(Via::Tunnel))])?;
    let be1 = who(&tb, 0);
    tb.lb(&[
        "backend",
        "drain",
        "web",
        &be1.1.to_string(),
        "--timeout",
        "2",
    ])
    .expect_ok("drain");
    let row = |tb: &Testbed| {
        tb.lb_json(&["backend", "list", "web"])
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["address"] == be1.1.to_string())
            .cloned()
    };
    let r = row(&tb).unwrap();
    assert_eq!(r["state"], "draining", "{r}");
    assert!(r["drain_left_s"].as_u64().is_some_and(|s| s <= 2), "{r}");
    assert!(std::fs::read_to_string(tb.config_path())?.contains("drain_until"));
    wait_for("the drain to end", Duration::from_secs(5), || {
        row(&tb).is_none()
    });
    let ch = changes(&tb, "web", be1.1);
    assert_eq!(
        ch.last().map(|c| c.0.as_str()),
        Some("drain_done"),
        "{ch:?}"
    );
    assert!(!std::fs::read_to_string(tb.config_path())?.contains(&be1.1.to_string()));
    Ok(())
}

#[test]
fn a_flapping_backend_changes_state_no_faster_than_rise_and_fall_allow() -> Result<()> {
    let tb = testbed(2, &[web("web", 1, fast(Via::Tunnel))])?;
    let be1 = who(&tb, 0);
    thread::sleep(Duration::from_millis(300));
    let log_before = tb.agent().unwrap().log().matches("why=\"health\"").count();
    // Its link goes dark and comes back every 50 ms, for 3 s.
    let start = Instant::now();
    let mut dark = false;
    while start.elapsed() < Duration::from_secs(3) {
        dark = !dark;
        tb.bridge()
            .ip(&["link", "set", &be1.0, if dark { "down" } else { "up" }])?;
        thread::sleep(Duration::from_millis(50));
    }
    tb.bridge().ip(&["link", "set", &be1.0, "up"])?;
    let elapsed = start.elapsed();
    let flips = changes(&tb, "web", be1.1).len();
    // A change needs two results in a row against the state (rise = fall = 2); checks
    // come at most every 100 ms: at most one change per 200 ms.
    let bound = (elapsed.as_millis() / 200) as usize + 1;
    assert!(
        flips <= bound,
        "{flips} state changes in {elapsed:?} (bound {bound})"
    );
    // Each change rebuilt one ring, nothing more.
    let rebuilds = tb.agent().unwrap().log().matches("why=\"health\"").count() - log_before;
    assert!(
        rebuilds <= flips,
        "{rebuilds} ring updates for {flips} changes"
    );
    Ok(())
}
