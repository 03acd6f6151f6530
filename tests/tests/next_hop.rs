//! The agent finds where frames for a backend go without being told: a config of only the
//! interface, VIPs and backend addresses works (next-hop MACs from the kernel's routes and
//! neighbours, the outer source from the interface's address), follows changes of
//! neighbours and routes, and keeps a backend it cannot reach out of the rings until it
//! can. In the namespace testbed, with real HTTP.
use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use anyhow::{Context, Result};
use lb_tests::{
    netns::{fmt_mac, unique_name},
    support::wait_for,
    testbed::{Testbed, TestbedOpts, VipSpec},
};
use lb_userspace::config::Forwarding;
use serde_json::Value;

fn testbed() -> Result<Testbed> {
    let mut tb = Testbed::up(
        TestbedOpts::default()
            .prefix(&unique_name("lbnh"))
            .backends(2)
            .server_bin(env!("CARGO_BIN_EXE_lb-testbed-server")),
    )?;
    let web = VipSpec::tcp("web", "198.18.10.1".parse::<IpAddr>()?, Forwarding::Ipip);
    let web6 = VipSpec::tcp("web6", "2001:db8:10::1".parse::<IpAddr>()?, Forwarding::Gue);
    let cfg = tb.agent_config(&[web, web6])?;
    tb.start_agent(&cfg)?;
    Ok(tb)
}

/// `lb backend list` row of `addr` in VIP `vip`.
fn row(tb: &Testbed, vip: &str, addr: &str) -> Result<Value> {
    let list = tb.lb_json(&["backend", "list"])?;
    list.as_array()
        .unwrap()
        .iter()
        .find(|r| r["vip"] == vip && r["address"] == addr)
        .cloned()
        .with_context(|| format!("{vip}/{addr} not in {list}"))
}

fn next_hop(tb: &Testbed, vip: &str, addr: &str) -> String {
    row(tb, vip, addr).unwrap()["next_hop"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// Backends that answered `n` new HTTP connections to `vip`.
fn answered(tb: &Testbed, vip: &str, n: usize) -> Result<BTreeSet<String>> {
    let addr = format!("{vip}:80").parse()?;
    let mut who = BTreeSet::new();
    for _ in 0..n {
        let r = tb.http_get(addr, "/")?;
        anyhow::ensure!(r.status == 200, "{r:?}");
        who.insert(r.backend().to_string());
    }
    Ok(who)
}

#[test]
fn a_config_of_addresses_only_works_and_next_hops_follow_the_kernel() -> Result<()> {
    let tb = testbed()?;
    let text = std::fs::read_to_string(tb.config_path())?;
    for absent in ["mac", "gateway_mac", "encap_source"] {
        assert!(!text.contains(absent), "the config has no {absent}: {text}");
    }
    let (be1, be2) = (&tb.backends()[0], &tb.backends()[1]);
    let lb = &tb.lb_host().ns;
    // Each backend's MAC, found by the agent, IPv4 and IPv6.
    for (vip, b) in [("web", be1), ("web", be2), ("web6", be1), ("web6", be2)] {
        let addr = b.addr(vip == "web6").to_string();
        assert_eq!(next_hop(&tb, vip, &addr), fmt_mac(b.mac), "{vip}/{addr}");
    }
    let everyone: BTreeSet<String> = [be1.name.clone(), be2.name.clone()].into();
    assert_eq!(answered(&tb, "198.18.10.1", 30)?, everyone);
    assert_eq!(answered(&tb, "[2001:db8:10::1]", 30)?, everyone);
    // The outer source is the LB's own address.
    let st = tb.lb_json(&["status"])?;
    assert_eq!(st["start"], "fresh");

    // A route change: be2 is now reached through be1 (as if be1 were its router). Its
    // packets go to be1's MAC, and be1 (whose decap strips the tunnel) answers them.
    let a2 = be2.v4.to_string();
    lb.ip(&[
        "route",
        "add",
        &format!("{a2}/32"),
        "via",
        &be1.v4.to_string(),
    ])?;
    wait_for("the route change", Duration::from_secs(5), || {
        next_hop(&tb, "web", &a2) == fmt_mac(be1.mac)
    });
    lb.ip(&["route", "del", &format!("{a2}/32")])?;
    wait_for("the route removed", Duration::from_secs(5), || {
        next_hop(&tb, "web", &a2) == fmt_mac(be2.mac)
    });

    // A route out of another interface: the LB cannot send there (XDP transmits on its
    // own interface), so be2 leaves the rings (new connections go to be1 only) until the
    // route is gone again.
    lb.ip(&[
        "link", "add", "side0", "type", "veth", "peer", "name", "side1",
    ])?;
    lb.ip(&["link", "set", "side0", "up"])?;
    lb.ip(&["route", "add", &format!("{a2}/32"), "dev", "side0"])?;
    wait_for("be2 unroutable", Duration::from_secs(5), || {
        row(&tb, "web", &a2).unwrap()["unresolved"]
            .as_str()
            .is_some_and(|w| w.contains("not agent.interface"))
    });
    assert_eq!(
        answered(&tb, "198.18.10.1", 30)?,
        BTreeSet::from([be1.name.clone()])
    );
    lb.ip(&["route", "del", &format!("{a2}/32")])?;
    wait_for("be2 back", Duration::from_secs(5), || {
        row(&tb, "web", &a2).unwrap()["unresolved"].is_null()
    });
    assert_eq!(answered(&tb, "198.18.10.1", 30)?, everyone);
    // Both changes are events, with the reason.
    let events = tb.lb_json(&["events"])?;
    let about: Vec<(String, String)> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["backend"] == a2.as_str())
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or("").to_string();
            (s("what"), s("reason"))
        })
        .collect();
    assert_eq!(about.len(), 2, "{about:?}");
    assert_eq!(about[0].0, "unresolved");
    assert!(about[0].1.contains("not agent.interface"), "{about:?}");
    assert_eq!(about[1].0, "resolved");

    // A neighbour change: be1 gets a new MAC, and the LB's neighbour table learns it.
    let new_mac = "02:aa:00:00:00:01";
    be1.ns
        .ip(&["link", "set", "dev", "eth0", "address", new_mac])?;
    let a1 = be1.v4.to_string();
    lb.ip(&[
        "neigh",
        "replace",
        &a1,
        "lladdr",
        new_mac,
        "dev",
        "eth0",
        "nud",
        "reachable",
    ])?;
    wait_for("the new MAC", Duration::from_secs(5), || {
        next_hop(&tb, "web", &a1) == new_mac
    });
    assert_eq!(
        answered(&tb, "198.18.10.1", 30)?,
        everyone,
        "be1 answers at its new MAC"
    );

    // A backend nobody answers for: kept out of the ring (every connection still gets an
    // answer), until a host takes the address.
    let ghost = "198.18.0.77";
    tb.lb(&["backend", "add", "web", ghost])
        .expect_ok("backend add");
    let r = row(&tb, "web", ghost)?;
    assert!(
        r["unresolved"]
            .as_str()
            .is_some_and(|w| w.contains("no neighbour answer")),
        "{r}"
    );
    assert_eq!(answered(&tb, "198.18.10.1", 30)?, everyone);
    be2.ns
        .ip(&["addr", "add", &format!("{ghost}/24"), "dev", "eth0"])?;
    wait_for("the ghost resolved", Duration::from_secs(10), || {
        next_hop(&tb, "web", ghost) == fmt_mac(be2.mac)
    });
    assert!(row(&tb, "web", ghost)?["unresolved"].is_null());
    Ok(())
}
