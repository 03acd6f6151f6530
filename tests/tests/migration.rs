//! Restarts and reloads that change what the maps must be: every size the config sets
//! (`max_vips`, `max_backends`, `max_conns`, `ring_size`), and the map layouts of an
//! earlier release. Each migrates the running data plane to new maps under live traffic:
//! no datagram may be lost, and every flow must stay on its backend, as seen from outside
//! the LB (the backend is the outer destination of what the LB sends).
//!
//! LB namespace: `veth0` with the agent. CLIENT namespace: `veth1`, which sends the flows
//! (an `AF_PACKET` socket) and captures the LB's IP-in-IP output (`pass` attached, so the
//! veth accepts `XDP_TX` frames). Every backend's next hop is `veth1`'s MAC.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::Ipv4Addr,
    time::Duration,
};

use anyhow::{Context, Result};
use aya::{
    maps::{HashMap as BpfHashMap, Map, MapData},
    programs::XdpMode,
};
use lb_common::{flow_hash, ConnVal, FlowKey};
use lb_tests::{
    harness::test_sizes,
    legacy,
    netns::{fmt_mac, temp_dir, veth_pair, Agent, Netns, VethEnd},
    packets::{flow4, UDP},
    support::conns_for,
    traffic::{Flow, Report, Traffic},
};
use lb_userspace::{
    config::Config,
    dataplane::{Dataplane, MAP_NAMES},
    reconcile,
};

const LB_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x01, 0x01];
const PEER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x01, 0x02];
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);
const PORT: u16 = 5000;

/// The sizes a config sets.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    max_vips: u32,
    max_backends: u32,
    max_conns: u32,
    ring_size: u32,
}

/// VIP `i` (1-based): 198.18.10.i:5000/udp, ipip, backends 198.18.20.(10i + 1..=n).
fn vip_addr(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 10, i)
}

fn config(s: Sizes, vips: &[(u8, u8)]) -> String {
    let mut c = format!(
        r#"# The operator's comment.
[agent]
interface = "veth0"
xdp_mode = "native"
max_vips = {}
max_backends = {}
max_conns = {}
ring_size = {}
gateway_mac = "{}"
encap_source_v4 = "198.18.255.0/24"
"#,
        s.max_vips,
        s.max_backends,
        s.max_conns,
        s.ring_size,
        fmt_mac(PEER_MAC)
    );
    for &(i, n) in vips {
        c += &format!(
            "\n[[vip]]\nname = \"v{i}\"\naddress = \"{}\"\nport = {PORT}\nprotocol = \"udp\"\nbackends = [",
            vip_addr(i)
        );
        for b in 1..=n {
            c += &format!("{{ address = \"198.18.20.{}\" }}, ", 10 * i + b);
        }
        c += "]\n";
    }
    c
}

/// The two namespaces, `pass` on `veth1`, a directory for the config.
struct Bed {
    lb: Netns,
    client: Netns,
    _pass: Dataplane,
    dir: tempfile::TempDir,
}

fn bed() -> Result<Bed> {
    let dir = temp_dir("lbt-migrate")?;
    let lb = Netns::new("lbt-mlb")?;
    let client = Netns::new("lbt-mcl")?;
    veth_pair(
        &VethEnd {
            ns: &lb,
            name: "veth0",
            mac: LB_MAC,
            addrs: &["198.18.0.1/24"],
        },
        &VethEnd {
            ns: &client,
            name: "veth1",
            mac: PEER_MAC,
            addrs: &["198.18.0.2/24"],
        },
    )?;
    let pass = client.run_in(|| -> Result<Dataplane> {
        let mut dp = Dataplane::load(test_sizes())?;
        dp.program("pass")?.attach("veth1", XdpMode::Driver)?;
        Ok(dp)
    })??;
    Ok(Bed {
        lb,
        client,
        _pass: pass,
        dir,
    })
}

impl Bed {
    fn traffic(&self, flows: Vec<Flow>) -> Result<Traffic> {
        Traffic::start(
            &self.client,
            "veth1",
            PEER_MAC,
            LB_MAC,
            flows,
            Duration::from_micros(400),
        )
    }
}

/// `n` flows to VIP `i`.
fn flows_to(i: u8, n: u16) -> Vec<Flow> {
    (0..n)
        .map(|k| Flow {
            src: CLIENT,
            sport: 40000 + 100 * i as u16 + k,
            vip: vip_addr(i),
            dport: PORT,
        })
        .collect()
}

fn key(f: &Flow) -> FlowKey {
    flow4(f.src, f.sport, f.vip, f.dport, UDP)
}

/// Nothing lost, nothing twice, every flow on one backend, and that backend the one it
/// had before the changes (`before`).
fn assert_kept(report: &Report, before: &BTreeMap<Flow, BTreeSet<Ipv4Addr>>) {
    let lost = report.lost();
    let lost_n: usize = lost.values().map(|v| v.len()).sum();
    assert!(
        lost.is_empty(),
        "{lost_n} of {} datagrams lost: {:?}",
        report.sent,
        lost.iter().take(5).collect::<Vec<_>>()
    );
    assert_eq!(report.duplicates(), 0, "duplicates");
    let moved = report.moved();
    assert!(moved.is_empty(), "flows that changed backend: {moved:?}");
    for (f, b) in before {
        assert_eq!(
            BTreeSet::from([report.backend_of(f)]),
            *b,
            "flow {f:?} kept its backend"
        );
    }
}

fn conns(a: &Agent) -> Result<BpfHashMap<MapData, FlowKey, ConnVal>> {
    let data = MapData::from_pin(a.pin_dir().join("CONNS"))?;
    Ok(BpfHashMap::try_from(Map::LruHashMap(data))?)
}

fn map_ids(a: &Agent) -> Result<BTreeMap<String, u32>> {
    MAP_NAMES
        .iter()
        .map(|m| {
            Ok((
                m.to_string(),
                MapData::from_pin(a.pin_dir().join(m))?.info()?.id(),
            ))
        })
        .collect()
}

/// How many `flows` the ring of `cfg` would give another backend than they have: flows
/// that only their connection entries keep in place.
fn held_by_entries_only(
    cfg: &str,
    flows: &[Flow],
    have: &BTreeMap<Flow, BTreeSet<Ipv4Addr>>,
) -> usize {
    let cfg = Config::parse(cfg).unwrap();
    flows
        .iter()
        .filter(|f| {
            let v = cfg
                .vips
                .iter()
                .find(|v| v.address == std::net::IpAddr::V4(f.vip))
                .unwrap();
            let ring = reconcile::ring_addresses(&cfg, v).unwrap();
            let h = flow_hash(cfg.agent.hash_seed, &key(f), false);
            let b = ring[(h % ring.len() as u32) as usize];
            !have[*f].contains(&match b {
                std::net::IpAddr::V4(a) => a,
                _ => unreachable!(),
            })
        })
        .count()
}

#[test]
fn every_size_change_migrates_the_maps_under_live_traffic_and_keeps_every_flow() -> Result<()> {
    let bed = bed()?;
    let path = bed.dir.path().join("lb.toml");
    let mut s = Sizes {
        max_vips: 8,
        max_backends: 32,
        max_conns: conns_for(2048),
        ring_size: 1009,
    };
    // Six VIPs (ids 0-5); three are removed below, leaving ids 0, 1 and 5.
    let six: Vec<(u8, u8)> = (1..=6).map(|i| (i, 3)).collect();
    fs::write(&path, config(s, &six))?;
    let mut a = Agent::start(&bed.lb, &path)?;
    for v in ["v3", "v4", "v5"] {
        a.lb(&["vip", "remove", v]).expect_ok("vip remove");
    }
    let kept: Vec<(u8, u8)> = vec![(1, 3), (2, 3), (6, 3)];
    let flows: Vec<Flow> = [1, 2, 6].iter().flat_map(|&i| flows_to(i, 16)).collect();
    let t = bed.traffic(flows.clone())?;
    t.wait_all_seen(Duration::from_secs(5));
    let before = t.backends_now();
    let ids_before = map_ids(&a)?;
    let mut programs = vec![a.json(&["status"])["program_id"].as_u64().unwrap()];

    let mut step = |a: &mut Agent, s: Sizes, how: &str| -> Result<()> {
        t.wait_more(300);
        let text = config(s, &kept);
        match how {
            "restart" => {
                a.kill9()?;
                fs::write(&path, &text)?;
                t.wait_more(100); // no agent at all for a while
                a.spawn()?;
                assert_eq!(a.json(&["status"])["start"], "migrated", "{s:?}");
            }
            _ => {
                let done = |a: &Agent| a.log().matches("migrated to the new maps").count();
                let before = done(a);
                fs::write(&path, &text)?;
                a.signal(libc::SIGHUP)?;
                lb_tests::support::wait_for("the reload", Duration::from_secs(10), || {
                    done(a) > before
                });
            }
        }
        let prog = a.json(&["status"])["program_id"].as_u64().unwrap();
        assert!(!programs.contains(&prog), "{s:?}: a new program runs");
        programs.push(prog);
        assert!(
            !a.pin_dir().join("next").exists(),
            "{s:?}: the migration finished"
        );
        Ok(())
    };

    // The defect that started this: lowering max_vips made ring writes land in another
    // VIP's ring. Now the maps are rebuilt at the new size; VIP id 5 no longer fits in 4.
    s.max_vips = 4;
    step(&mut a, s, "restart")?;
    s.max_conns = conns_for(4096);
    step(&mut a, s, "reload")?;
    // A larger ring: every flow's slot moves; only the copied entries keep the flows.
    s.ring_size = 2003;
    assert!(
        held_by_entries_only(&config(s, &kept), &flows, &before) > 5,
        "test setup: the new rings must disagree with some flows"
    );
    s.max_backends = 64;
    step(&mut a, s, "restart")?;
    s.max_conns = conns_for(1024);
    step(&mut a, s, "restart")?;
    t.wait_more(300);
    let report = t.finish()?;
    assert_kept(&report, &before);

    let ids_after = map_ids(&a)?;
    for m in ["RINGS", "VIPS", "CONNS", "BACKENDS"] {
        assert_ne!(ids_before[m], ids_after[m], "{m} was replaced");
    }
    let st = a.json(&["status"]);
    assert_eq!(st["vips"], 3);
    // Every flow still has its entry, naming a live VIP id below the new max_vips.
    let c = conns(&a)?;
    for f in &flows {
        let e = c.get(&key(f), 0).context("entry kept")?;
        assert!((e.vip as u32) < s.max_vips, "{f:?}: {e:?}");
    }

    // The reported symptom: with VIP rings in the right places, a backend added to v2 never
    // gets v6's traffic.
    a.lb(&["backend", "add", "v2", "198.18.20.29"])
        .expect_ok("backend add");
    let fresh = flows_to(6, 64)
        .into_iter()
        .map(|f| Flow {
            sport: f.sport + 5000,
            ..f
        })
        .collect::<Vec<_>>();
    let t = bed.traffic(fresh.clone())?;
    t.wait_all_seen(Duration::from_secs(5));
    let report = t.finish()?;
    for f in &fresh {
        let b = report.backend_of(f);
        assert!(
            [61, 62, 63].contains(&b.octets()[3]) && b.octets()[2] == 20,
            "a new flow to v6 went to {b}"
        );
    }
    Ok(())
}

#[test]
fn upgrade_from_the_first_release_converts_its_maps_under_live_traffic() -> Result<()> {
    let old = legacy::lb_at(legacy::V1)?;
    let bed = bed()?;
    let path = bed.dir.path().join("lb.toml");
    let s = Sizes {
        max_vips: 8,
        max_backends: 32,
        max_conns: conns_for(2048),
        ring_size: 1009,
    };
    // Two VIPs sharing a backend address: one id in release 1, two memberships now.
    let mut text = config(s, &[(1, 3), (2, 2)]);
    text = text.replace("198.18.20.22", "198.18.20.11");
    fs::write(&path, &text)?;
    let mut a = Agent::new(&bed.lb, &path);
    a.set_binary(Some(old));
    a.spawn()?;
    let flows: Vec<Flow> = [1, 2].iter().flat_map(|&i| flows_to(i, 24)).collect();
    let t = bed.traffic(flows.clone())?;
    t.wait_all_seen(Duration::from_secs(5));
    let before = t.backends_now();
    assert!(
        !a.pin_dir().join("LAYOUT").exists(),
        "release 1 pins no LAYOUT"
    );
    t.wait_more(300);

    // The operator's upgrade: stop the old agent (the data plane runs on), start the new.
    a.signal(libc::SIGTERM)?;
    a.wait_exit(Duration::from_secs(5))?;
    t.wait_more(100);
    a.set_binary(None);
    a.spawn()?;
    assert_eq!(a.json(&["status"])["start"], "migrated");
    t.wait_more(500);
    let report = t.finish()?;
    assert_kept(&report, &before);
    assert!(a.pin_dir().join("LAYOUT").exists(), "LAYOUT pinned");
    let c = conns(&a)?;
    let list = a.json(&["backend", "list"]);
    for f in &flows {
        let e = c.get(&key(f), 0).context("entry converted")?;
        let b = report.backend_of(f);
        let vip = if f.vip == vip_addr(1) { "v1" } else { "v2" };
        let row = list
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["vip"] == vip && r["address"] == b.to_string())
            .context("backend listed")?;
        assert_eq!(
            row["id"].as_u64(),
            Some(e.backend as u64),
            "{f:?}: the entry names the membership of {b} in {vip}"
        );
        assert!(e.atime != 0, "{f:?}: converted entries get a time");
    }
    Ok(())
}

/// A migration killed at either side of the program swap, or halfway through renaming the
/// new pins (as `kill -9` would): the data plane runs on (the old program on the old maps,
/// or the new one on the new maps), and the next start undoes or finishes it. Nothing is
/// lost either way.
#[test]
fn a_migration_killed_before_or_after_the_swap_is_undone_or_finished_by_the_next_start(
) -> Result<()> {
    let bed = bed()?;
    let path = bed.dir.path().join("lb.toml");
    let vips = [(1, 3), (2, 3)];
    let mut s = Sizes {
        max_vips: 8,
        max_backends: 32,
        max_conns: conns_for(2048),
        ring_size: 1009,
    };
    fs::write(&path, config(s, &vips))?;
    let mut a = Agent::start(&bed.lb, &path)?;
    let flows: Vec<Flow> = [1, 2].iter().flat_map(|&i| flows_to(i, 16)).collect();
    let t = bed.traffic(flows.clone())?;
    t.wait_all_seen(Duration::from_secs(5));
    let before = t.backends_now();
    for (fault, then) in [
        ("migrate-before-swap", "removed the new maps"),
        ("migrate-after-swap", "finished a migration"),
        // Halfway through renaming the new pins over the old (LAYOUT and VIPS done).
        ("migrate-mid-commit", "finished a migration"),
    ] {
        t.wait_more(200);
        a.kill9()?;
        s.max_conns += conns_for(1024);
        fs::write(&path, config(s, &vips))?;
        a.set_env("LB_FAULT", Some(fault));
        let (st, log) = a.run_to_exit(Duration::from_secs(20))?;
        assert!(!st.success(), "{fault}: the agent should have died: {log}");
        assert!(a.pin_dir().join("next").exists(), "{fault}: left next/");
        t.wait_more(200); // traffic goes on with no agent, mid-migration
        a.set_env("LB_FAULT", None);
        a.spawn()?;
        assert!(a.log().contains(then), "{fault}: {}", a.log());
        assert!(!a.pin_dir().join("next").exists(), "{fault}: next/ gone");
        let st = a.json(&["status"]);
        // Undone: migrated now. Finished: the new maps are the pins, adopted as they are.
        let want = if fault == "migrate-before-swap" {
            "migrated"
        } else {
            "adopted"
        };
        assert_eq!(st["start"], want, "{fault}");
    }
    t.wait_more(300);
    let report = t.finish()?;
    assert_kept(&report, &before);
    Ok(())
}
