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
    net::{IpAddr, SocketAddr},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    netns::{fmt_mac, unique_name},
    testbed::{assert_clean, ForwardingPath, Testbed, TestbedOpts},
    transfer::*,
};

fn opts() -> TestbedOpts {
    TestbedOpts::default()
        .prefix(&unique_name("lblong"))
        .server_bin(env!("CARGO_BIN_EXE_lb-testbed-server"))
        .backends(4)
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

    let run = Running::start(&tb, addr);
    let mut w = Watch {
        shared: run.shared.clone(),
        t0,
        local: addr,
        own: String::new(),
        own_netns: String::new(),
        own_addr: addr.ip(),
        packets: 0,
        log: Vec::new(),
    };
    let done = run.head().and_then(|head| {
        w.local = head.local;
        events(&mut tb, &spec.name, spec.backends_v6, addr, head, &mut w)
    });
    let d = run.finish(label, done, &w.log)?;
    eprintln!(
        "{label}: {} bytes from {} in {:.2}s, byte for byte; test {:.2}s",
        d.bytes,
        w.own,
        d.elapsed.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    no_new_resets(&tb, resets_before, label)?;
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
