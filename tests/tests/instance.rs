//! What an agent owns and how it lets go: one agent per instance (a lock), the program
//! moved when the config names another interface (on reload and on restart), and pins an
//! agent must not adopt refused with the running data plane left as it was.
use std::{fs, time::Duration};

use anyhow::Result;
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use lb_common::layout::{self, MapLayout};
use lb_tests::{
    netns::{temp_dir, veth_pair, Agent, Netns, VethEnd},
    support::wait_for,
};

fn agent_table(interface: &str) -> String {
    format!(
        r#"[agent]
interface = "{interface}"
xdp_mode = "native"
ring_size = 1009
max_vips = 8
max_backends = 16
max_conns = 4096
gateway_mac = "02:00:00:00:00:fe"
encap_source_v4 = "198.18.255.0/24"

[[vip]]
name = "web"
address = "198.18.10.1"
port = 80
protocol = "tcp"
health = {{ kind = "none" }}
backends = [{{ address = "198.18.20.1" }}]
"#
    )
}

/// A namespace with two veth pairs (`veth0`/`veth1`, `veth2`/`veth3`) and a config file.
struct Host {
    ns: Netns,
    config: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn host(interface: &str) -> Result<Host> {
    let dir = temp_dir("lbt-inst")?;
    let ns = Netns::new("lbt-inst")?;
    for (a, b, m) in [("veth0", "veth1", 1u8), ("veth2", "veth3", 3)] {
        veth_pair(
            &VethEnd {
                ns: &ns,
                name: a,
                mac: [0x02, 0, 0, 0, 0x0a, m],
                addrs: &[],
            },
            &VethEnd {
                ns: &ns,
                name: b,
                mac: [0x02, 0, 0, 0, 0x0a, m + 1],
                addrs: &[],
            },
        )?;
    }
    let config = dir.path().join("lb.toml");
    fs::write(&config, agent_table(interface))?;
    Ok(Host {
        ns,
        config,
        _dir: dir,
    })
}

/// The XDP program id `ip link` shows on `dev`, if any.
fn xdp_on(ns: &Netns, dev: &str) -> Option<u64> {
    let s = ns.ip(&["-d", "link", "show", "dev", dev]).unwrap();
    let i = s.find("prog/xdp id ")? + "prog/xdp id ".len();
    s[i..].split_whitespace().next()?.parse().ok()
}

fn program_id(a: &Agent) -> u64 {
    a.json(&["status"])["program_id"].as_u64().unwrap()
}

#[test]
fn a_second_agent_for_the_same_instance_is_refused_and_the_first_keeps_running() -> Result<()> {
    let h = host("veth0")?;
    let a = Agent::start(&h.ns, &h.config)?;
    let prog = program_id(&a);
    let mut b = Agent::with_instance(&h.ns, &h.config, a.instance());
    let (st, log) = b.run_to_exit(Duration::from_secs(10))?;
    assert!(!st.success(), "a second agent ran: {log}");
    assert!(
        log.contains("another agent is running instance") && log.contains("one agent per instance"),
        "{log}"
    );
    assert!(log.contains(&a.pid().to_string()), "names the pid: {log}");
    // The first one still owns everything and answers.
    assert_eq!(program_id(&a), prog);
    assert_eq!(xdp_on(&h.ns, "veth0"), Some(prog));
    assert!(a.socket().exists());
    a.lb(&["vip", "list"]).expect_ok("the first agent answers");
    std::mem::forget(b); // its guard would stop the shared instance
    Ok(())
}

#[test]
fn a_new_interface_moves_the_program_on_reload_and_on_restart() -> Result<()> {
    let h = host("veth0")?;
    let mut a = Agent::start(&h.ns, &h.config)?;
    let prog = program_id(&a);
    assert_eq!(xdp_on(&h.ns, "veth0"), Some(prog));
    assert_eq!(a.json(&["status"])["interface"], "veth0");

    // Reload with another interface: the program moves there.
    fs::write(&h.config, agent_table("veth2"))?;
    a.signal(libc::SIGHUP)?;
    wait_for("the move", Duration::from_secs(10), || {
        xdp_on(&h.ns, "veth2").is_some()
    });
    wait_for("veth0 released", Duration::from_secs(10), || {
        xdp_on(&h.ns, "veth0").is_none()
    });
    assert_eq!(a.json(&["status"])["interface"], "veth2");
    assert_eq!(xdp_on(&h.ns, "veth2"), Some(program_id(&a)));

    // An interface that does not exist: refused, naming the field; nothing moves, and the
    // status says where the program really is.
    fs::write(&h.config, agent_table("nope0"))?;
    a.signal(libc::SIGHUP)?;
    wait_for("the refusal", Duration::from_secs(10), || {
        a.log().contains("reload refused")
    });
    assert!(a.log().contains("agent.interface"), "{}", a.log());
    assert_eq!(a.json(&["status"])["interface"], "veth2");
    assert!(xdp_on(&h.ns, "veth2").is_some());

    // A restart with yet another interface moves it back.
    a.kill9()?;
    fs::write(&h.config, agent_table("veth0"))?;
    a.spawn()?;
    let prog = program_id(&a);
    assert_eq!(xdp_on(&h.ns, "veth0"), Some(prog));
    assert_eq!(xdp_on(&h.ns, "veth2"), None);
    let st = a.json(&["status"]);
    assert_eq!(st["interface"], "veth0");
    assert_eq!(st["adopted"], true, "the maps were kept");
    Ok(())
}

#[test]
fn pins_of_a_newer_build_are_refused_and_the_running_data_plane_is_left_alone() -> Result<()> {
    let h = host("veth0")?;
    let mut a = Agent::start(&h.ns, &h.config)?;
    let prog = program_id(&a);
    a.kill9()?;
    // As if a newer build had pinned the connection table.
    let data = MapData::from_pin(a.pin_dir().join("LAYOUT"))?;
    let mut l: BpfHashMap<MapData, [u8; 16], MapLayout> = BpfHashMap::try_from(Map::HashMap(data))?;
    let key = layout::key("CONNS");
    let ours = l.get(&key, 0)?;
    l.insert(
        key,
        MapLayout {
            version: ours.version + 1,
            ..ours
        },
        0,
    )?;
    let before: Vec<_> = fs::read_dir(a.pin_dir())?
        .map(|e| e.unwrap().file_name())
        .collect();
    let (st, log) = a.run_to_exit(Duration::from_secs(10))?;
    assert!(!st.success(), "started on pins it cannot read: {log}");
    assert!(
        log.contains("CONNS") && log.contains("newer than this build"),
        "{log}"
    );
    assert!(log.contains("lb agent --stop"), "says what to do: {log}");
    // The data plane runs on, untouched.
    assert_eq!(xdp_on(&h.ns, "veth0"), Some(prog));
    let after: Vec<_> = fs::read_dir(a.pin_dir())?
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after, "pins unchanged");
    // Back to what this build wrote: adopted again.
    l.insert(key, ours, 0)?;
    a.spawn()?;
    assert_eq!(a.json(&["status"])["adopted"], true);
    Ok(())
}
