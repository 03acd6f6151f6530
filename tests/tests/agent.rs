//! The `lb` agent and CLI as an operator meets them: a real agent process in a network
//! namespace on a veth, driven through the `lb` binary. Needs root, bpffs and `bpftool`.
//!
//! Every namespace, agent, pin and socket is a guard from `lb_tests::netns`: it is removed
//! when the test ends, also when it fails.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{Ipv4Addr, UdpSocket},
    os::unix::fs::{FileTypeExt, PermissionsExt},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::{
    maps::{HashMap as BpfHashMap, Map, MapData},
    programs::XdpMode,
};
use lb_common::{ConnVal, DecapReason, FlowKey};
use lb_tests::{
    harness::test_sizes,
    netns::{lb_command, run, temp_dir, veth_pair, Agent, LbOut, Netns, RawSocket, VethEnd},
    packets::{flow4, Opts, UDP},
    support::{wait_for, StopOnDrop},
};
use lb_userspace::{
    config::{CheckKind, Config, Via},
    dataplane::{Dataplane, MAP_NAMES},
};
use serde_json::Value;

const LB_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const PEER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];

/// The `[agent]` table of every test config: native XDP on `veth0`, small maps.
fn agent_table(max_vips: u32, ring_size: u32) -> String {
    let max_conns = lb_tests::support::conns_for(2048);
    format!(
        r#"[agent]
interface = "veth0"
xdp_mode = "native"
ring_size = {ring_size}
max_vips = {max_vips}
max_backends = 16
max_conns = {max_conns}
encap_source_v4 = "198.18.255.0/24"
encap_source_v6 = "2001:db8:ff::/112"
"#
    )
}

/// No backend answers in these tests: no health checks, or they would take it down.
const WEB: &str = r#"
[[vip]]
name = "web"
address = "198.18.10.1"
port = 80
protocol = "tcp"
health = { kind = "none" }
backends = [{ address = "198.18.20.1", weight = 100, mac = "02:00:00:00:20:01" }]
"#;

/// A namespace with a veth pair (`veth0` 198.18.0.1/24 for the agent, `veth1` its peer),
/// and a directory for the config file.
struct Host {
    config: std::path::PathBuf,
    ns: Netns,
    _dir: tempfile::TempDir,
}

fn host(config: &str) -> Result<Host> {
    let dir = temp_dir("lbt-agent")?;
    let ns = Netns::new("lbt-agent")?;
    veth_pair(
        &VethEnd {
            ns: &ns,
            name: "veth0",
            mac: LB_MAC,
            addrs: &["198.18.0.1/24"],
        },
        &VethEnd {
            ns: &ns,
            name: "veth1",
            mac: PEER_MAC,
            addrs: &[],
        },
    )?;
    let path = dir.path().join("lb.toml");
    fs::write(&path, config)?;
    Ok(Host {
        config: path,
        ns,
        _dir: dir,
    })
}

fn bpftool(args: &[&str]) -> Result<String> {
    run("bpftool", args).context("bpftool (installed by scripts/setup.sh)")
}

/// `ip -d link show dev` in a namespace.
fn link_details(ns: &Netns, dev: &str) -> String {
    ns.ip(&["-d", "link", "show", "dev", dev]).unwrap()
}

fn program_id(a: &Agent) -> u64 {
    a.json(&["status"])["program_id"]
        .as_u64()
        .expect("status has a numeric program_id")
}

/// The maps a loaded program uses (`bpftool prog show`): id -> name. Internal maps of
/// global data (names with a '.', e.g. `.rodata`) are left out: they are constant.
fn program_maps(prog: u64) -> Result<BTreeMap<u32, String>> {
    let v: Value =
        serde_json::from_str(&bpftool(&["-j", "prog", "show", "id", &prog.to_string()])?)?;
    let mut out = BTreeMap::new();
    for id in v["map_ids"].as_array().context("map_ids")? {
        let id = id.as_u64().context("map id")? as u32;
        let m: Value =
            serde_json::from_str(&bpftool(&["-j", "map", "show", "id", &id.to_string()])?)?;
        let name = m["name"].as_str().unwrap_or_default().to_string();
        if !name.contains('.') {
            out.insert(id, name);
        }
    }
    Ok(out)
}

/// The maps pinned under the agent's directory: id -> file name.
fn pinned_maps(a: &Agent) -> Result<BTreeMap<u32, String>> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(a.pin_dir())? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name != "lb" && name != "link" {
            let id = MapData::from_pin(a.pin_dir().join(&name))?.info()?.id();
            out.insert(id, name);
        }
    }
    Ok(out)
}

/// `bpftool link show pinned`: (link id, program id).
fn pinned_link(a: &Agent) -> Result<(u64, u64)> {
    let path = a.pin_dir().join("link");
    let v: Value = serde_json::from_str(&bpftool(&[
        "-j",
        "link",
        "show",
        "pinned",
        path.to_str().unwrap(),
    ])?)?;
    Ok((
        v["id"].as_u64().context("link id")?,
        v["prog_id"].as_u64().context("link prog_id")?,
    ))
}

/// Everything the operator and the data plane can see of the configuration: the CLI's
/// lists, the config file's bytes and the kernel maps the program reads.
#[derive(Debug, PartialEq)]
struct State {
    vips: Value,
    backends: Value,
    file: String,
    maps: Vec<String>,
}

fn state(a: &Agent) -> State {
    let maps = ["VIPS", "VIP_ADDRS", "BACKENDS", "CONFIG"]
        .iter()
        .map(|m| {
            let p = a.pin_dir().join(m);
            bpftool(&["-j", "map", "dump", "pinned", p.to_str().unwrap()]).unwrap()
        })
        .collect();
    State {
        vips: a.json(&["vip", "list"]),
        backends: a.json(&["backend", "list"]),
        file: fs::read_to_string(a.config()).unwrap(),
        maps,
    }
}

fn assert_refused(out: &LbOut, field: &str, what: &str) {
    assert!(
        !out.ok(),
        "{what}: accepted, should be refused\nstdout: {}",
        out.stdout
    );
    assert!(
        out.stderr.contains(field),
        "{what}: the message should name {field:?}: {}",
        out.stderr
    );
}

// ---------------------------------------------------------------------------------------

#[test]
fn agent_attaches_and_pins_everything_and_stop_detaches_and_removes_it_all() -> Result<()> {
    let h = host(&(agent_table(8, 1009) + WEB))?;
    let mut a = Agent::start(&h.ns, &h.config)?;

    let text = a.lb(&["status"]);
    assert!(text.expect_ok("lb status").contains(a.instance()));
    let st = a.json(&["status"]);
    assert_eq!(st["interface"], "veth0");
    assert_eq!(st["adopted"], false);
    assert_eq!(st["vips"], 1);
    let prog = program_id(&a);
    let link = link_details(&h.ns, "veth0");
    assert!(
        link.contains(&format!("prog/xdp id {prog} ")),
        "veth0 should run program {prog} in native mode: {link}"
    );

    for name in MAP_NAMES.iter().chain(&["lb", "link"]) {
        let p = a.pin_dir().join(name);
        assert!(p.exists(), "{} should be pinned", p.display());
    }
    // Every map the running program reads or writes is pinned: a restart can adopt it.
    let pinned = pinned_maps(&a)?;
    let unpinned: Vec<String> = program_maps(prog)?
        .into_iter()
        .filter(|(id, _)| !pinned.contains_key(id))
        .map(|(_, name)| name)
        .collect();
    assert!(
        unpinned.is_empty(),
        "maps of program lb not pinned in {}: {unpinned:?}",
        a.pin_dir().display()
    );
    let vips = a.pin_dir().join("VIPS");
    let dump = bpftool(&["map", "dump", "pinned", vips.to_str().unwrap()])?;
    assert!(dump.contains("Found 1 element"), "VIPS dump: {dump}");
    let (_, link_prog) = pinned_link(&a)?;
    assert_eq!(link_prog, prog, "the pinned link holds the running program");

    let sock = fs::metadata(a.socket())?;
    assert!(sock.file_type().is_socket());
    assert_eq!(sock.permissions().mode() & 0o777, 0o600, "socket mode");

    let (out, exit) = a.stop()?;
    out.expect_ok("lb agent --stop");
    let exit = exit.expect("agent was running");
    assert!(exit.success(), "the agent exits cleanly on stop: {exit}");
    let link = link_details(&h.ns, "veth0");
    assert!(
        !link.contains("xdp"),
        "XDP still attached after stop: {link}"
    );
    assert!(
        !a.pin_dir().exists(),
        "pins left in {}",
        a.pin_dir().display()
    );
    assert!(
        !a.socket().exists(),
        "socket left: {}",
        a.socket().display()
    );
    Ok(())
}

#[test]
fn two_instances_run_side_by_side_and_stop_independently() -> Result<()> {
    let h1 = host(&(agent_table(8, 1009) + WEB))?;
    let h2 = host(&agent_table(8, 1009))?;
    let mut a1 = Agent::start(&h1.ns, &h1.config)?;
    let a2 = Agent::start(&h2.ns, &h2.config)?;

    let (s1, s2) = (a1.json(&["status"]), a2.json(&["status"]));
    assert_eq!(s1["instance"], a1.instance());
    assert_eq!(s2["instance"], a2.instance());
    assert_eq!(
        (s1["vips"].clone(), s2["vips"].clone()),
        (1.into(), 0.into())
    );
    let (p1, p2) = (program_id(&a1), program_id(&a2));
    assert_ne!(p1, p2);
    assert!(link_details(&h1.ns, "veth0").contains(&format!("prog/xdp id {p1} ")));
    assert!(link_details(&h2.ns, "veth0").contains(&format!("prog/xdp id {p2} ")));
    assert!(a1.pin_dir().join("link").exists() && a2.pin_dir().join("link").exists());

    a1.stop()?.0.expect_ok("stopping the first instance");
    assert!(!a1.pin_dir().exists());
    assert!(!link_details(&h1.ns, "veth0").contains("xdp"));
    // The second is untouched.
    assert_eq!(a2.json(&["status"])["program_id"], p2);
    assert!(link_details(&h2.ns, "veth0").contains(&format!("prog/xdp id {p2} ")));
    assert!(a2.pin_dir().join("link").exists());
    Ok(())
}

#[test]
fn cli_changes_are_written_to_the_config_file_and_survive_kill_9_and_restart() -> Result<()> {
    let h = host(&agent_table(8, 1009))?;
    let mut a = Agent::start(&h.ns, &h.config)?;
    let steps: &[&[&str]] = &[
        &["vip", "add", "web", "198.18.10.1", "80", "tcp"],
        &[
            "vip",
            "add",
            "dns",
            "2001:db8:10::53",
            "53",
            "udp",
            "--forwarding",
            "gue",
        ],
        &[
            "backend",
            "add",
            "web",
            "198.18.20.1",
            "--mac",
            "02:00:00:00:20:01",
        ],
        &[
            "backend",
            "add",
            "web",
            "198.18.20.2",
            "--weight",
            "7",
            "--mac",
            "02:00:00:00:20:02",
        ],
        &["backend", "weight", "web", "198.18.20.1", "250"],
        &["backend", "drain", "web", "198.18.20.2"],
        &[
            "vip",
            "add",
            "api",
            "198.18.10.2",
            "8080",
            "tcp",
            "--check",
            "http",
            "--via",
            "direct",
            "--check-path",
            "/healthz",
            "--check-interval-ms",
            "500",
            "--panic-threshold",
            "50",
            "--slow-start-s",
            "30",
        ],
        &[
            "backend",
            "add",
            "dns",
            "198.18.20.1",
            "--mac",
            "02:00:00:00:20:01",
        ],
    ];
    for s in steps {
        a.lb(s).expect_ok(&s.join(" "));
    }

    // The file is valid for the agent and says what the CLI did.
    let text = fs::read_to_string(a.config())?;
    let cfg = Config::parse(&text).with_context(|| format!("written config:\n{text}"))?;
    let web = cfg.vip("web").expect("vip web in the file");
    assert_eq!(web.address.to_string(), "198.18.10.1");
    assert_eq!(web.port, 80);
    let b: Vec<_> = web
        .backends
        .iter()
        .map(|b| {
            (
                b.address.to_string(),
                b.weight,
                b.drain,
                b.mac.unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        b,
        [
            ("198.18.20.1".into(), 250, false, "02:00:00:00:20:01".into()),
            ("198.18.20.2".into(), 7, true, "02:00:00:00:20:02".into()),
        ]
    );
    let dns = cfg.vip("dns").expect("vip dns in the file");
    assert_eq!(dns.forwarding.to_string(), "gue");
    assert_eq!(dns.backends.len(), 1);
    assert_eq!(cfg.agent.ring_size, 1009, "the agent table is kept");
    let api = cfg.vip("api").expect("vip api in the file");
    let hc = api.health.as_ref().expect("api's health table");
    assert_eq!(
        (hc.kind, hc.via, hc.path.as_deref(), hc.interval_ms),
        (
            Some(CheckKind::Http),
            Some(Via::Direct),
            Some("/healthz"),
            Some(500)
        )
    );
    assert_eq!((api.panic_threshold, api.slow_start_s), (Some(50), 30));
    assert!(
        text.contains(
            r#"health = { kind = "http", via = "direct", interval_ms = 500, path = "/healthz" }"#
        ),
        "{text}"
    );

    let before = (a.json(&["backend", "list"]), a.json(&["vip", "list"]));
    let maps_before = state(&a).maps;
    a.kill9()?;
    a.spawn()?;
    assert_eq!(a.json(&["status"])["adopted"], true);
    let after = (a.json(&["backend", "list"]), a.json(&["vip", "list"]));
    assert_eq!(before, after, "backend/vip lists across kill -9 + restart");
    assert_eq!(maps_before, state(&a).maps, "kernel maps across restart");
    Ok(())
}

/// The config file is the operator's: a CLI change edits what changed and keeps the rest,
/// a symlinked config stays a symlink (its target is updated), the mode stays 0640.
#[test]
fn cli_changes_keep_the_files_comments_symlink_and_mode() -> Result<()> {
    let h = host("")?;
    let real_dir = h.config.parent().unwrap().join("real");
    fs::create_dir(&real_dir)?;
    let real = real_dir.join("lb.toml");
    let text = agent_table(8, 1009).replace(
        "[agent]\n",
        "# Kept by hand: do not lose this.\n[agent]   # the agent\n",
    ) + &WEB.replace("backends = [", "# the web backends\nbackends = [");
    fs::write(&real, &text)?;
    fs::set_permissions(&real, fs::Permissions::from_mode(0o640))?;
    fs::remove_file(&h.config)?;
    std::os::unix::fs::symlink(&real, &h.config)?;
    let a = Agent::start(&h.ns, &h.config)?;

    a.lb(&[
        "backend",
        "add",
        "web",
        "198.18.20.2",
        "--weight",
        "7",
        "--mac",
        "02:00:00:00:20:02",
    ])
    .expect_ok("backend add");
    a.lb(&["backend", "weight", "web", "198.18.20.1", "50"])
        .expect_ok("backend weight");

    assert!(
        fs::symlink_metadata(&h.config)?.file_type().is_symlink(),
        "the config is still a symlink"
    );
    assert_eq!(fs::read_link(&h.config)?, real);
    let now = fs::read_to_string(&real)?;
    let want = text.replace(
        r#"backends = [{ address = "198.18.20.1", weight = 100, mac = "02:00:00:00:20:01" }]"#,
        r#"backends = [{ address = "198.18.20.1", weight = 50, mac = "02:00:00:00:20:01" }, { address = "198.18.20.2", weight = 7, mac = "02:00:00:00:20:02" }]"#,
    );
    assert_eq!(now, want, "only the changed backends are rewritten");
    assert_eq!(fs::metadata(&real)?.permissions().mode() & 0o7777, 0o640);
    let names: Vec<_> = fs::read_dir(&real_dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    assert_eq!(names, ["lb.toml"], "temporary files left beside the target");
    Ok(())
}

#[test]
fn sighup_applies_an_edited_config_file() -> Result<()> {
    let h = host(&(agent_table(8, 1009) + WEB))?;
    let a = Agent::start(&h.ns, &h.config)?;
    let edited = agent_table(8, 1009)
        + &WEB.replace(
            "}]",
            r#"}, { address = "198.18.20.2", weight = 5, mac = "02:00:00:00:20:02" }]"#,
        )
        + r#"
[[vip]]
name = "dns"
address = "198.18.10.2"
port = 53
protocol = "udp"
forwarding = "gue"
backends = [{ address = "198.18.20.3", mac = "02:00:00:00:20:03" }]
"#;
    fs::write(a.config(), &edited)?;
    a.signal(libc::SIGHUP)?;
    wait_for("the reload", Duration::from_secs(5), || {
        a.json(&["vip", "list"]).as_array().unwrap().len() == 2
    });
    let backends = a.json(&["backend", "list"]);
    let addrs: Vec<&str> = backends
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["address"].as_str().unwrap())
        .collect();
    assert_eq!(addrs, ["198.18.20.1", "198.18.20.2", "198.18.20.3"]);
    let vips = a.pin_dir().join("VIPS");
    let dump = bpftool(&["map", "dump", "pinned", vips.to_str().unwrap()])?;
    assert!(
        dump.contains("Found 2 elements"),
        "VIPS after reload: {dump}"
    );
    assert_eq!(
        fs::read_to_string(a.config())?,
        edited,
        "a reload does not rewrite the file"
    );
    Ok(())
}

#[test]
fn sighup_with_a_broken_config_file_is_refused_and_the_running_state_kept() -> Result<()> {
    let h = host(&(agent_table(8, 1009) + WEB))?;
    let a = Agent::start(&h.ns, &h.config)?;
    let before = state(&a);
    let broken = [
        ("not TOML", "[agent\ninterface = ".to_string()),
        (
            "weight out of range",
            agent_table(8, 1009) + &WEB.replace("weight = 100", "weight = 10001"),
        ),
        ("ring size not prime", agent_table(8, 1000) + WEB),
    ];
    for (i, (what, text)) in broken.iter().enumerate() {
        fs::write(a.config(), text)?;
        a.signal(libc::SIGHUP)?;
        wait_for(
            &format!("{what}: reload refused"),
            Duration::from_secs(5),
            || a.log().matches("reload refused").count() == i + 1,
        );
        a.lb(&["status"]).expect_ok("status after a refused reload");
        let now = State {
            file: before.file.clone(),
            ..state(&a)
        };
        assert_eq!(now, before, "{what}: running state changed");
    }
    let log = a.log();
    assert!(
        log.contains("agent.ring_size"),
        "log names the field: {log}"
    );
    assert!(log.contains("weight"), "log names the field: {log}");
    Ok(())
}

#[test]
fn cli_refuses_bad_input_naming_the_field_and_changes_nothing() -> Result<()> {
    let six = r#"
[[vip]]
name = "six"
address = "2001:db8:10::1"
port = 80
protocol = "tcp"
health = { kind = "none" }
"#;
    let h = host(&(agent_table(8, 1009) + WEB + six))?;
    let a = Agent::start(&h.ns, &h.config)?;
    let before = state(&a);
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "backend for an unknown VIP",
            &[
                "backend",
                "add",
                "nope",
                "198.18.20.9",
                "--mac",
                "02:00:00:00:20:09",
            ],
            "vip[nope]",
        ),
        (
            "remove an unknown VIP",
            &["vip", "remove", "nope"],
            "vip[nope]",
        ),
        (
            "weight on an unknown VIP",
            &["backend", "weight", "nope", "198.18.20.1", "5"],
            "vip[nope]",
        ),
        (
            "weight of an unknown backend",
            &["backend", "weight", "web", "198.18.20.9", "5"],
            "vip[web].backends",
        ),
        (
            "same address/port/protocol under another name",
            &["vip", "add", "web2", "198.18.10.1", "80", "tcp"],
            "vip[web2]",
        ),
        (
            "same name",
            &["vip", "add", "web", "198.18.10.9", "81", "udp"],
            "vip[web].name",
        ),
        (
            "duplicate backend",
            &[
                "backend",
                "add",
                "web",
                "198.18.20.1",
                "--mac",
                "02:00:00:00:20:01",
            ],
            "vip[web].backends[1].address",
        ),
        (
            "weight 10001 by `backend weight`",
            &["backend", "weight", "web", "198.18.20.1", "10001"],
            "vip[web].backends[0].weight",
        ),
        (
            "weight 10001 by `backend add`",
            &[
                "backend",
                "add",
                "web",
                "198.18.20.2",
                "--weight",
                "10001",
                "--mac",
                "02:00:00:00:20:02",
            ],
            "vip[web].backends[1].weight",
        ),
        (
            "invalid VIP address",
            &["vip", "add", "x", "198.18.300.1", "80", "tcp"],
            "<ADDRESS>",
        ),
        (
            "invalid backend address",
            &[
                "backend",
                "add",
                "web",
                "198.18.20",
                "--mac",
                "02:00:00:00:20:02",
            ],
            "<ADDRESS>",
        ),
        (
            "IPv6 VIP, IPv4 backend, ipip",
            &[
                "backend",
                "add",
                "six",
                "198.18.20.5",
                "--mac",
                "02:00:00:00:20:05",
            ],
            "vip[six].backends[0].address",
        ),
        (
            "bad backend MAC",
            &[
                "backend",
                "add",
                "web",
                "198.18.20.2",
                "--mac",
                "02:00:00:00:20",
            ],
            "--mac",
        ),
        (
            "panic threshold 0 %",
            &[
                "vip",
                "add",
                "x",
                "198.18.10.9",
                "80",
                "tcp",
                "--panic-threshold",
                "0",
            ],
            "vip[x].panic_threshold",
        ),
        (
            "checks every 0 ms",
            &[
                "vip",
                "add",
                "x",
                "198.18.10.9",
                "80",
                "tcp",
                "--check-interval-ms",
                "0",
            ],
            "vip[x].health.interval_ms",
        ),
        (
            "an unknown kind of check",
            &[
                "vip",
                "add",
                "x",
                "198.18.10.9",
                "80",
                "tcp",
                "--check",
                "icmp",
            ],
            "--check",
        ),
        (
            "IPv4-mapped IPv6 VIP address",
            &["vip", "add", "x", "::ffff:198.18.10.9", "80", "tcp"],
            "vip[x].address: ::ffff:198.18.10.9 is an IPv4-mapped IPv6 address: \
             write 198.18.10.9",
        ),
        (
            "unspecified VIP address",
            &["vip", "add", "x", "0.0.0.0", "80", "tcp"],
            "vip[x].address: 0.0.0.0 is the unspecified address",
        ),
        (
            "multicast VIP address",
            &["vip", "add", "x", "ff05::1", "80", "tcp"],
            "vip[x].address: ff05::1 is a multicast address",
        ),
        (
            "loopback backend",
            &[
                "backend",
                "add",
                "web",
                "127.0.0.1",
                "--mac",
                "02:00:00:00:20:02",
            ],
            "vip[web].backends[1].address: 127.0.0.1 is a loopback address",
        ),
        (
            "broadcast backend",
            &[
                "backend",
                "add",
                "web",
                "255.255.255.255",
                "--mac",
                "02:00:00:00:20:02",
            ],
            "vip[web].backends[1].address: 255.255.255.255 is the broadcast address",
        ),
        (
            "IPv4-mapped IPv6 backend",
            &[
                "backend",
                "add",
                "web",
                "::ffff:198.18.20.14",
                "--mac",
                "02:00:00:00:20:0e",
            ],
            "vip[web].backends[1].address: ::ffff:198.18.20.14 is an IPv4-mapped IPv6 \
             address: write 198.18.20.14",
        ),
    ];
    for (what, args, field) in cases {
        let out = a.lb(args);
        assert_refused(&out, field, what);
        assert_eq!(state(&a), before, "{what}: state changed");
    }
    Ok(())
}

#[test]
fn lb_version_prints_the_version() {
    for flag in ["--version", "-V"] {
        let out = lb_command(Command::new(lb_tests::netns::lb_bin()).arg(flag));
        assert_eq!(
            out.expect_ok(flag),
            format!("lb {}\n", env!("CARGO_PKG_VERSION")),
            "lb {flag}"
        );
    }
}

/// `lb backend list | head -0`: the reader is gone before `lb` writes. That is not an
/// error of `lb`: it exits 0 without a word (it used to panic, exit 101).
#[test]
fn cli_output_into_a_closed_pipe_exits_0_quietly() -> Result<()> {
    let h = host(&(agent_table(8, 1009) + WEB))?;
    let a = Agent::start(&h.ns, &h.config)?;
    for args in [
        &["backend", "list"][..],
        &["--json", "stats"],
        &["vip", "list"],
        &["status"],
    ] {
        let (reader, writer) = std::io::pipe()?;
        drop(reader);
        let out = Command::new(lb_tests::netns::lb_bin())
            .args(["--instance", a.instance()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(writer)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "lb {}: {} ({stderr})",
            args.join(" "),
            out.status
        );
        assert_eq!(stderr, "", "lb {}", args.join(" "));
    }
    Ok(())
}

/// Logs written to a file (not a terminal) carry no ANSI colour codes, also without
/// NO_COLOR in the environment.
#[test]
fn agent_log_in_a_file_has_no_colour_codes() -> Result<()> {
    let h = host(&(agent_table(8, 1009) + WEB))?;
    // Not started: only its name, and at the end its `lb agent --stop`.
    let guard = Agent::new(&h.ns, &h.config);
    let log_path = h.config.with_file_name("agent.log");
    let log = fs::File::create(&log_path)?;
    let mut child = Command::new(lb_tests::netns::lb_bin())
        .args(["agent", "--config"])
        .arg(&h.config)
        .args(["--instance", guard.instance(), "--netns", h.ns.name()])
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let ran = (|| -> Result<()> {
        wait_for("the agent", Duration::from_secs(10), || {
            lb_userspace::api::call(guard.instance(), &lb_userspace::api::Request::Status)
                .is_ok_and(|r| r.ok)
        });
        // Also a warning-level line: a reload of a broken file.
        fs::write(&h.config, "[agent\n")?;
        if unsafe { libc::kill(child.id() as i32, libc::SIGHUP) } != 0 {
            anyhow::bail!("kill -HUP: {}", std::io::Error::last_os_error());
        }
        wait_for("the refused reload", Duration::from_secs(5), || {
            fs::read_to_string(&log_path).is_ok_and(|l| l.contains("reload refused"))
        });
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    ran?;
    let text = fs::read(&log_path)?;
    let shown = String::from_utf8_lossy(&text);
    assert!(shown.contains("data plane ready"), "{shown}");
    assert!(!text.contains(&0x1b), "ESC in the log:\n{shown}");
    Ok(())
}

#[test]
fn vips_beyond_agent_max_vips_are_refused() -> Result<()> {
    let h = host(&agent_table(2, 1009))?;
    let a = Agent::start(&h.ns, &h.config)?;
    a.lb(&["vip", "add", "a", "198.18.10.1", "80", "tcp"])
        .expect_ok("first VIP");
    a.lb(&["vip", "add", "b", "198.18.10.2", "80", "tcp"])
        .expect_ok("second VIP");
    let before = state(&a);
    let out = a.lb(&["vip", "add", "c", "198.18.10.3", "80", "tcp"]);
    assert_refused(&out, "agent.max_vips", "a third VIP with max_vips = 2");
    assert_eq!(state(&a), before);
    Ok(())
}

/// The agent refuses to start with `config`: exit status non-zero, `field` named on stderr,
/// nothing left behind.
fn refused_at_start(config: &str, field: &str) -> Result<()> {
    let h = host(config)?;
    let mut a = Agent::new(&h.ns, &h.config);
    let (st, log) = a.run_to_exit(Duration::from_secs(10))?;
    assert!(!st.success(), "the agent started with a bad config");
    assert!(
        log.contains(field),
        "the error should name {field:?}: {log}"
    );
    assert!(!a.pin_dir().exists(), "pins left by a refused start");
    assert!(!a.socket().exists(), "socket left by a refused start");
    assert!(!link_details(&h.ns, "veth0").contains("xdp"));
    Ok(())
}

#[test]
fn agent_refuses_to_start_with_an_unknown_config_field() -> Result<()> {
    refused_at_start(
        &(agent_table(8, 1009) + &WEB.replace("port = 80", "port = 80\nbogus_field = 1")),
        "bogus_field",
    )
}

#[test]
fn agent_refuses_to_start_with_a_non_prime_ring_size() -> Result<()> {
    refused_at_start(&(agent_table(8, 1000) + WEB), "agent.ring_size")
}

#[test]
fn non_root_users_get_permission_denied() -> Result<()> {
    let h = host(&(agent_table(8, 1009) + WEB))?;
    let a = Agent::start(&h.ns, &h.config)?;
    let before = state(&a);
    let as_nobody = |args: &[&str]| {
        lb_command(
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(lb_tests::netns::lb_bin())
                .args(["--instance", a.instance()])
                .args(args),
        )
    };
    for args in [
        &["status"][..],
        &["vip", "add", "x", "198.18.10.7", "80", "tcp"],
        &["vip", "remove", "web"],
        &["agent", "--stop"],
    ] {
        let out = as_nobody(args);
        assert!(!out.ok(), "`lb {}` as nobody succeeded", args.join(" "));
        assert!(
            out.stderr.to_lowercase().contains("permission denied"),
            "`lb {}` as nobody: {}",
            args.join(" "),
            out.stderr
        );
    }
    assert_eq!(state(&a), before);
    a.lb(&["status"]).expect_ok("root still can");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Restart / upgrade under traffic

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);
const CLIENT_PORT: u16 = 40000;

fn conns(a: &Agent) -> Result<BpfHashMap<MapData, FlowKey, ConnVal>> {
    let data = MapData::from_pin(a.pin_dir().join("CONNS"))?;
    Ok(BpfHashMap::try_from(Map::HashMap(data))?)
}

fn map_id(a: &Agent, name: &str) -> Result<u32> {
    Ok(MapData::from_pin(a.pin_dir().join(name))?.info()?.id())
}

/// LB namespace: `veth0` with the agent. CLIENT namespace: `veth1`, which is at once the
/// client (an `AF_PACKET` socket sends frames from 198.18.0.99 to the VIP, to veth0's MAC)
/// and the VIP's only backend (address/MAC of veth1, `decap` attached, the VIP on `lo`, a
/// UDP socket bound to VIP:5000 receives what the LB encapsulated).
///
/// Datagrams numbered 0.. go out every 500 us while the agent is `kill -9`ed and restarted,
/// twice. A restart loads a new program instance into the pinned link and reuses the pinned
/// maps: this is also how an upgrade happens.
#[test]
fn upgrade_by_restart_swaps_the_program_in_the_link_keeps_maps_and_flows_and_loses_nothing(
) -> Result<()> {
    let dir = temp_dir("lbt-upgrade")?;
    let lbns = Netns::new("lbt-lb")?;
    let client = Netns::new("lbt-client")?;
    veth_pair(
        &VethEnd {
            ns: &lbns,
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
    client.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
    for k in ["all", "default", "veth1", "lo"] {
        client.sysctl(&format!("net.ipv4.conf.{k}.rp_filter"), "0")?;
    }
    // XDP_TX'ed frames arriving on a veth need an XDP program there; decap is the backend's.
    let decap = client.run_in(|| -> Result<Dataplane> {
        let mut dp = Dataplane::load(test_sizes())?;
        dp.program("decap")?.attach("veth1", XdpMode::Driver)?;
        Ok(dp)
    })??;

    let config = dir.path().join("lb.toml");
    fs::write(
        &config,
        agent_table(8, 1009)
            + &format!(
                r#"
[[vip]]
name = "udp"
address = "{VIP}"
port = 5000
protocol = "udp"
forwarding = "ipip"
backends = [{{ address = "198.18.0.2", mac = "{}" }}]
"#,
                lb_tests::netns::fmt_mac(client.mac("veth1")?)
            ),
    )?;
    let mut a = Agent::start(&lbns, &config)?;

    let rx = client.run_in(|| UdpSocket::bind((VIP, 5000)))??;
    rx.set_read_timeout(Some(Duration::from_millis(50)))?;
    let tx = client.run_in(|| RawSocket::open("veth1"))??;

    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_threads = StopOnDrop(stop.clone()); // also when an assertion fails
    let receiver = {
        let (received, stop) = (received.clone(), stop.clone());
        thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, _)) = rx.recv_from(&mut buf) {
                    if n >= 8 {
                        got.push(u64::from_be_bytes(buf[..8].try_into().unwrap()));
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            got
        })
    };
    let sender = {
        let (sent, stop) = (sent.clone(), stop.clone());
        thread::spawn(move || -> Result<u64> {
            const PERIOD: Duration = Duration::from_micros(500);
            let opts = Opts::default().with_macs(PEER_MAC, LB_MAC);
            let start = Instant::now();
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut payload = seq.to_be_bytes().to_vec();
                payload.resize(32, 0xab);
                tx.send(&opts.udp4(CLIENT_IP, CLIENT_PORT, VIP, 5000, &payload))?;
                seq += 1;
                sent.store(seq, Ordering::Relaxed);
                if seq > 100_000 {
                    break; // stuck: the assertions will say why
                }
                let next = start + PERIOD * seq as u32;
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    thread::sleep(d);
                }
            }
            Ok(seq)
        })
    };
    let wait_sent = |n: u64| {
        wait_for(
            &format!("{n} datagrams sent"),
            Duration::from_secs(10),
            || sent.load(Ordering::Relaxed) >= n,
        )
    };

    let flow = flow4(CLIENT_IP, CLIENT_PORT, VIP, 5000, UDP);
    wait_for("the first datagram through", Duration::from_secs(5), || {
        received.load(Ordering::Relaxed) > 0
    });
    let entry = conns(&a)?.get(&flow, 0).context("CONNS has the flow")?;
    // A flow the program never saw: only an adopted map can still hold it later.
    let sentinel = flow4(Ipv4Addr::new(198, 18, 0, 98), 1, VIP, 5000, UDP);
    conns(&a)?.insert(
        sentinel,
        ConnVal {
            backend: 7,
            ..Default::default()
        },
        0,
    )?;
    let map_ids: Vec<u32> = MAP_NAMES
        .iter()
        .map(|m| map_id(&a, m))
        .collect::<Result<_>>()?;
    let (link_id, link_prog) = pinned_link(&a)?;
    let mut programs = vec![program_id(&a)];
    assert_eq!(link_prog, programs[0]);
    let first_maps = program_maps(programs[0])?;

    let mut down = Vec::new();
    for round in 1..=2 {
        wait_sent(sent.load(Ordering::Relaxed) + 200);
        a.kill9()?;
        let killed_at = sent.load(Ordering::Relaxed);
        a.spawn()?;
        down.push(sent.load(Ordering::Relaxed) - killed_at);
        let st = a.json(&["status"]);
        assert_eq!(st["adopted"], true, "round {round}: restart adopts");
        let prog = st["program_id"].as_u64().unwrap();
        assert!(
            !programs.contains(&prog),
            "round {round}: a new program instance is loaded ({prog} in {programs:?})"
        );
        programs.push(prog);
        assert_eq!(
            program_maps(prog)?,
            first_maps,
            "round {round}: the new program uses the very maps of the old one"
        );
        assert_eq!(
            pinned_link(&a)?,
            (link_id, prog),
            "round {round}: the same link now runs the new program"
        );
        let link = link_details(&lbns, "veth0");
        assert!(link.contains(&format!("prog/xdp id {prog} ")), "{link}");
    }
    wait_sent(sent.load(Ordering::Relaxed) + 200);
    stop.store(true, Ordering::Relaxed);
    let total = sender.join().unwrap()?;
    // Let the receiver drain, then stop it.
    let deadline = Instant::now() + Duration::from_secs(3);
    while received.load(Ordering::Relaxed) < total && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    thread::sleep(Duration::from_millis(100)); // anything extra (a duplicate) arrives too
    let got = receiver.join().unwrap();

    assert!(
        down.iter().all(|&d| d > 0),
        "datagrams were sent while no agent ran: {down:?}"
    );
    let unique: BTreeSet<u64> = got.iter().copied().collect();
    let missing: Vec<u64> = (0..total).filter(|s| !unique.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "{} of {total} datagrams lost (sent while the agent was down: {down:?}): {:?}",
        missing.len(),
        &missing[..missing.len().min(50)]
    );
    assert_eq!(got.len() as u64, total, "duplicates received");

    // Same maps, same entries: the flow was never seen as new again.
    let ids_after: Vec<u32> = MAP_NAMES
        .iter()
        .map(|m| map_id(&a, m))
        .collect::<Result<_>>()?;
    assert_eq!(map_ids, ids_after, "the pinned maps are reused");
    let c = conns(&a)?;
    assert_eq!(c.get(&flow, 0)?.backend, entry.backend, "the flow's entry");
    assert_eq!(c.get(&sentinel, 0)?.backend, 7, "CONNS content survives");
    let stats = a.json(&["stats"]);
    let vip = &stats["vips"][0];
    assert_eq!(vip["name"], "udp");
    assert_eq!(vip["packets"], total, "every datagram went through lb");
    assert_eq!(vip["new_flows"], 1, "one flow, created once");
    // Under the VIP, its backend: the flow's counters and its connection-table entry (the
    // sentinel names another backend).
    let be = &vip["backends"][0];
    assert_eq!(be["address"], "198.18.0.2");
    assert_eq!(be["state"], "up");
    assert_eq!(be["packets"], total);
    assert_eq!(be["new_flows"], 1);
    assert_eq!(be["conns"]["active"], 1, "{stats}");
    assert_eq!(be["conns"]["inactive"], 0);
    assert_eq!(stats["reasons"]["tx_forward"], total);
    let decapped = decap.decap_counts()?[DecapReason::Decapped as usize];
    assert_eq!(decapped, total, "decapped on veth1");
    Ok(())
}
