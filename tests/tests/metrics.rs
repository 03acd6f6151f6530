//! The Prometheus endpoint as Prometheus's own tool sees it: a scrape taken during real
//! traffic passes `promtool check metrics`, and its values match what was sent (new
//! connections counted by the clients); health state and changes show. The shipped alert
//! rules pass `promtool check rules` and their unit tests (`promtool test rules`).
use std::{
    io::{Read, Write},
    net::{IpAddr, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    netns::unique_name,
    support::try_wait_for,
    testbed::{Testbed, TestbedOpts, VipSpec},
};
use lb_userspace::config::{Forwarding, HealthSpec};

fn promtool(args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../monitoring"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("promtool (Debian package prometheus, installed by scripts/setup.sh)")?;
    if let Some(text) = stdin {
        child.stdin.take().unwrap().write_all(text.as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "promtool {args:?}: {text}");
    Ok(text)
}

/// `GET /metrics` from inside the LB's namespace (the endpoint is on loopback there).
fn scrape(tb: &Testbed) -> Result<String> {
    tb.lb_host().run_in(|| -> Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", 9469))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let (head, body) = text.split_once("\r\n\r\n").context("an HTTP answer")?;
        ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
        ensure!(head.contains("text/plain; version=0.0.4"), "{head}");
        Ok(body.to_string())
    })?
}

/// The value of the sample `name{labels}` (labels exactly as written).
fn value(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn a_scrape_during_traffic_passes_promtool_and_counts_what_was_sent() -> Result<()> {
    const N: usize = 60;
    let mut tb = Testbed::up(
        TestbedOpts::default()
            .prefix(&unique_name("lbmet"))
            .backends(2)
            .server_bin(env!("CARGO_BIN_EXE_lb-testbed-server")),
    )?;
    let mut web = VipSpec::tcp("web", IpAddr::from([198, 18, 10, 1]), Forwarding::Ipip);
    web.health = Some(HealthSpec {
        interval_ms: Some(100),
        timeout_ms: Some(100),
        fall: Some(2),
        ..Default::default()
    });
    let cfg = tb.agent_config(&[web])?;
    tb.start_agent(&cfg)?;
    let addr = "198.18.10.1:80".parse()?;
    for _ in 0..N {
        tb.http_get(addr, "/")?;
    }
    let text = scrape(&tb)?;
    promtool(&["check", "metrics"], Some(&text))?;
    // New connections, each one new flow; the backends' flows add up to the VIP's.
    assert_eq!(
        value(&text, r#"lb_vip_new_flows_total{vip="web"}"#),
        Some(N as f64),
        "{text}"
    );
    let be: Vec<String> = tb.backends().iter().map(|b| b.v4.to_string()).collect();
    let flows: f64 = be
        .iter()
        .map(|b| {
            value(
                &text,
                &format!(r#"lb_backend_new_flows_total{{vip="web",backend="{b}"}}"#),
            )
            .unwrap_or(0.0)
        })
        .sum();
    assert_eq!(flows, N as f64);
    assert_eq!(
        value(&text, r#"lb_packets_total{reason="tx_forward"}"#),
        value(&text, r#"lb_vip_packets_total{vip="web"}"#)
    );
    for b in &be {
        let up = format!(r#"lb_backend_up{{vip="web",backend="{b}"}}"#);
        assert_eq!(value(&text, &up), Some(1.0), "{up}");
        let checks =
            format!(r#"lb_backend_check_duration_seconds_count{{vip="web",backend="{b}"}}"#);
        assert!(value(&text, &checks).unwrap_or(0.0) >= 1.0, "{checks}");
    }
    assert_eq!(
        value(&text, r#"lb_vip_healthy_backends{vip="web"}"#),
        Some(2.0)
    );
    assert!(value(&text, r#"lb_health_probes_total{reason="sent"}"#).unwrap_or(0.0) > 0.0);
    // A backend dies: the scrape says so (and still passes promtool).
    tb.kill_server(0);
    let down = format!(r#"lb_backend_up{{vip="web",backend="{}"}}"#, be[0]);
    try_wait_for("the down state in a scrape", Duration::from_secs(5), || {
        Ok(value(&scrape(&tb)?, &down) == Some(0.0))
    })?;
    let text = scrape(&tb)?;
    promtool(&["check", "metrics"], Some(&text))?;
    let changes = format!(
        r#"lb_backend_state_changes_total{{vip="web",backend="{}",state="down"}}"#,
        be[0]
    );
    assert_eq!(value(&text, &changes), Some(1.0), "{text}");
    assert_eq!(
        value(&text, r#"lb_vip_healthy_backends{vip="web"}"#),
        Some(1.0)
    );
    Ok(())
}

#[test]
fn the_shipped_alert_rules_pass_promtool_and_their_unit_tests() -> Result<()> {
    let out = promtool(&["check", "rules", "alerts.yml"], None)?;
    assert!(out.contains("SUCCESS: 6 rules found"), "{out}");
    promtool(&["test", "rules", "alerts_test.yml"], None)?;
    Ok(())
}
