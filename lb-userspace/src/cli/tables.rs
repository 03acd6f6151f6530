//! Printing the agent's replies: human tables (comfy-table) or JSON.
use std::net::SocketAddr;

use comfy_table::{presets, CellAlignment, ContentArrangement, Table};
use lb_userspace::api::{BackendRow, Event, Reply, Stats, Status, VipRow};

/// The reply as JSON (what `--json` prints).
pub fn json(reply: &Reply) -> String {
    serde_json::to_string_pretty(reply).expect("replies serialize") + "\n"
}

/// The reply for people.
pub fn human(reply: &Reply) -> String {
    match reply {
        Reply::Changed(_) | Reply::Done {} => "ok\n".into(),
        Reply::Vips(rows) => vips(rows),
        Reply::Backends(rows) => backends(rows),
        Reply::Status(s) => status(s),
        Reply::Stats(s) => stats(s),
        Reply::Events(v) => v.iter().map(event_line).collect(),
    }
}

/// `lb stats --watch`: per VIP and backend, packets, bytes and new flows per second
/// between two snapshots `dt` apart, with the connection counts of the second.
pub fn rates(prev: &Stats, now: &Stats, dt: std::time::Duration) -> String {
    let secs = dt.as_secs_f64().max(1e-3);
    let rate = |a: u64, b: u64| format!("{:.0}", b.saturating_sub(a) as f64 / secs);
    let mut t = table(
        &[
            "VIP / BACKEND",
            "STATE",
            "PKT/S",
            "BYTES/S",
            "NEW/S",
            "ACTIVE",
            "INACTIVE",
        ],
        &[2, 3, 4, 5, 6],
    );
    for v in &now.vips {
        let pv = prev.vips.iter().find(|p| p.name == v.name);
        let c0 = pv.map(|p| p.counters).unwrap_or_default();
        t.add_row(vec![
            format!(
                "{} {} {}",
                v.name,
                v.protocol,
                SocketAddr::new(v.address, v.port)
            ),
            String::new(),
            rate(c0.packets, v.counters.packets),
            rate(c0.bytes, v.counters.bytes),
            rate(c0.new_flows, v.counters.new_flows),
            v.backends
                .iter()
                .map(|b| b.conns.active)
                .sum::<u64>()
                .to_string(),
            v.backends
                .iter()
                .map(|b| b.conns.inactive)
                .sum::<u64>()
                .to_string(),
        ]);
        for b in &v.backends {
            let b0 = pv
                .and_then(|p| p.backends.iter().find(|x| x.address == b.address))
                .map(|x| x.counters)
                .unwrap_or_default();
            t.add_row(vec![
                format!("  -> {}", b.address),
                b.state.to_string(),
                rate(b0.packets, b.counters.packets),
                rate(b0.bytes, b.counters.bytes),
                rate(b0.new_flows, b.counters.new_flows),
                b.conns.active.to_string(),
                b.conns.inactive.to_string(),
            ]);
        }
    }
    format!(
        "lb stats --watch (every second; Ctrl-C stops)\n\n{}",
        text(&t)
    )
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS.mmm` (UTC).
pub fn utc(ms: u64) -> String {
    let (secs, milli) = (ms / 1000, ms % 1000);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{milli:03}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// One event as one line.
pub fn event_line(e: &Event) -> String {
    let who = match e.backend {
        Some(b) => format!("{}/{b}", e.vip),
        None => e.vip.clone(),
    };
    format!("{}  {who}  {}  ({})\n", utc(e.time_ms), e.what, e.reason)
}

/// A table without borders: columns two spaces apart, those in `right` right-aligned.
fn table(header: &[&str], right: &[usize]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.to_vec());
    for (i, c) in t.column_iter_mut().enumerate() {
        c.set_padding((0, 2));
        if right.contains(&i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

fn text(t: &Table) -> String {
    t.trim_fmt() + "\n"
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn vips(rows: &[VipRow]) -> String {
    let mut t = table(
        &[
            "NAME",
            "ADDRESS",
            "PORT",
            "PROTOCOL",
            "FORWARDING",
            "MODE",
            "AFFINITY",
            "BACKENDS",
            "ACTIVE",
        ],
        &[2, 7, 8],
    );
    for v in rows {
        t.add_row(vec![
            v.name.clone(),
            v.address.to_string(),
            v.port.to_string(),
            v.protocol.to_string(),
            v.forwarding.to_string(),
            v.mode.to_string(),
            yes(v.affinity).into(),
            v.backends.to_string(),
            v.active.to_string(),
        ]);
    }
    text(&t)
}

fn backends(rows: &[BackendRow]) -> String {
    let mut t = table(
        &["VIP", "ADDRESS", "WEIGHT", "STATE", "NEXT HOP", "ID"],
        &[2, 5],
    );
    for b in rows {
        // The MAC frames go to: configured, resolved, the gateway's, or why there is none.
        let next_hop = match (&b.unresolved, b.mac, b.next_hop) {
            (Some(why), _, _) => format!("unresolved ({why})"),
            (None, Some(m), _) => format!("{m} (configured)"),
            (None, None, Some(m)) => m.to_string(),
            (None, None, None) => "agent.gateway_mac".into(),
        };
        t.add_row(vec![
            b.vip.clone(),
            b.address.to_string(),
            b.weight.to_string(),
            match b.drain_left_s {
                Some(left) => format!("{} ({left}s left)", b.state),
                None => b.state.to_string(),
            },
            next_hop,
            b.id.map_or("-".into(), |i| i.to_string()),
        ]);
    }
    text(&t)
}

fn status(s: &Status) -> String {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled);
    for (k, v) in [
        ("instance", s.instance.clone()),
        ("config", s.config.display().to_string()),
        ("interface", s.interface.clone()),
        ("xdp mode", format!("{:?}", s.xdp_mode).to_lowercase()),
        ("program id", s.program_id.to_string()),
        ("adopted", yes(s.adopted).into()),
        ("start", format!("{:?}", s.start).to_lowercase()),
        ("mtu", s.mtu.to_string()),
        ("vips", s.vips.to_string()),
        ("backends", s.backends.to_string()),
        ("pins", s.pins.display().to_string()),
    ] {
        t.add_row(vec![k.to_string(), v]);
    }
    for c in t.column_iter_mut() {
        c.set_padding((0, 2));
    }
    let mut out = text(&t);
    if let Some(b) = &s.bgp {
        let ann: Vec<String> = b.announced.iter().map(ToString::to_string).collect();
        out += &format!(
            "bgp: AS {} next hop {}; announcing {}\n",
            b.local_asn,
            b.next_hop,
            if ann.is_empty() {
                "nothing (no VIP has a healthy backend)".to_string()
            } else {
                ann.join(", ")
            }
        );
        for n in &b.sessions {
            out += &format!(
                "  neighbour {} ({}): {} {}\n",
                n.neighbor, n.name, n.state, n.info
            );
        }
    }
    for (vip, m) in &s.modes {
        if m.panic {
            out += &format!(
                "{vip}: PANIC: fewer primaries pass than panic_threshold; all take new flows\n"
            );
        }
        if m.backups {
            out += &format!("{vip}: no primary passes its checks; the backups serve\n");
        }
    }
    if !s.health.is_empty() {
        let mut h = table(
            &[
                "VIP", "BACKEND", "STATE", "SINCE", "REASON", "CHECK", "LAST", "A", "MTBF", "MTTR",
            ],
            &[6, 7, 8, 9],
        );
        let secs = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.0}s"));
        for r in &s.health {
            h.add_row(vec![
                r.vip.clone(),
                r.backend.to_string(),
                r.state.clone(),
                utc(r.since_ms),
                r.reason.clone(),
                r.check.clone(),
                match (r.last_ok, r.last_ms) {
                    (Some(true), Some(ms)) => format!("ok {ms:.1}ms"),
                    (Some(false), _) => r.last_error.clone(),
                    _ => "-".into(),
                },
                format!("{:.4}", r.availability.availability),
                secs(r.availability.mtbf_s),
                secs(r.availability.mttr_s),
            ]);
        }
        out += "\n";
        out += &text(&h);
    }
    out
}

/// Like `ipvsadm -Ln --stats`: a row per VIP and under it a row per backend of that VIP,
/// then the reason counters.
fn stats(s: &Stats) -> String {
    let mut t = table(
        &[
            "VIP / BACKEND",
            "WEIGHT",
            "STATE",
            "PACKETS",
            "BYTES",
            "NEW FLOWS",
            "ACTIVE",
            "INACTIVE",
        ],
        &[1, 3, 4, 5, 6, 7],
    );
    for v in &s.vips {
        let active: u64 = v.backends.iter().map(|b| b.conns.active).sum();
        let inactive: u64 = v.backends.iter().map(|b| b.conns.inactive).sum();
        t.add_row(vec![
            format!(
                "{} {} {}",
                v.name,
                v.protocol,
                SocketAddr::new(v.address, v.port)
            ),
            String::new(),
            String::new(),
            v.counters.packets.to_string(),
            v.counters.bytes.to_string(),
            v.counters.new_flows.to_string(),
            active.to_string(),
            inactive.to_string(),
        ]);
        for b in &v.backends {
            t.add_row(vec![
                format!("  -> {}", b.address),
                b.weight.to_string(),
                b.state.to_string(),
                b.counters.packets.to_string(),
                b.counters.bytes.to_string(),
                b.counters.new_flows.to_string(),
                b.conns.active.to_string(),
                b.conns.inactive.to_string(),
            ]);
        }
    }
    let out = text(&t);

    let mut r = table(&["REASON", "PACKETS"], &[1]);
    let known = lb_common::Reason::ALL.iter().map(|r| r.name());
    let unknown = s
        .reasons
        .keys()
        .map(String::as_str)
        .filter(|k| !lb_common::Reason::ALL.iter().any(|r| r.name() == *k));
    for name in known.chain(unknown) {
        if let Some(n) = s.reasons.get(name) {
            r.add_row(vec![name.to_string(), n.to_string()]);
        }
    }
    out + "\n" + &text(&r)
}

#[cfg(test)]
mod tests {
    use lb_userspace::{
        api::{BackendState, Conns, Counters, VipBackendStats, VipStats},
        config::Protocol,
    };

    use super::*;

    #[test]
    fn unix_milliseconds_print_as_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(utc(1_764_547_200_123), "2025-12-01 00:00:00.123");
        assert_eq!(utc(951_827_696_007), "2000-02-29 12:34:56.007");
    }

    fn counters(packets: u64, bytes: u64, new_flows: u64) -> Counters {
        Counters {
            packets,
            bytes,
            new_flows,
        }
    }

    #[test]
    fn stats_are_one_row_per_vip_with_its_backends_under_it() {
        let be = |address: &str, weight, state, c, active| VipBackendStats {
            address: address.parse().unwrap(),
            id: Some(0),
            weight,
            state,
            counters: c,
            conns: Conns {
                active,
                inactive: 0,
            },
        };
        let s = Stats {
            reasons: [
                ("tx_forward", 30),
                ("pass_not_vip", 2),
                ("from_the_future", 1),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            vips: vec![
                VipStats {
                    name: "web".into(),
                    address: "198.18.10.1".parse().unwrap(),
                    port: 80,
                    protocol: Protocol::Tcp,
                    counters: counters(20, 2000, 4),
                    backends: vec![
                        be(
                            "198.18.20.1",
                            100,
                            BackendState::Up,
                            counters(25, 2500, 5),
                            3,
                        ),
                        be(
                            "198.18.20.2",
                            0,
                            BackendState::Weight0,
                            counters(0, 0, 0),
                            0,
                        ),
                        be(
                            "198.18.20.3",
                            5,
                            BackendState::Draining,
                            counters(1, 60, 0),
                            1,
                        ),
                    ],
                },
                VipStats {
                    name: "dns".into(),
                    address: "2001:db8:10::53".parse().unwrap(),
                    port: 53,
                    protocol: Protocol::Udp,
                    counters: counters(10, 500, 1),
                    backends: vec![be(
                        "198.18.20.1",
                        100,
                        BackendState::Up,
                        counters(25, 2500, 5),
                        1,
                    )],
                },
            ],
            backends: vec![],
        };
        let want = "\
VIP / BACKEND                 WEIGHT  STATE     PACKETS  BYTES  NEW FLOWS  ACTIVE  INACTIVE
web tcp 198.18.10.1:80                               20   2000          4       4         0
  -> 198.18.20.1                 100  up             25   2500          5       3         0
  -> 198.18.20.2                   0  weight 0        0      0          0       0         0
  -> 198.18.20.3                   5  draining        1     60          0       1         0
dns udp [2001:db8:10::53]:53                         10    500          1       1         0
  -> 198.18.20.1                 100  up             25   2500          5       1         0

REASON           PACKETS
pass_not_vip           2
tx_forward            30
from_the_future        1
";
        assert_eq!(human(&Reply::Stats(s)), want);
    }

    #[test]
    fn watch_prints_rates_over_the_interval_and_the_current_connections() {
        let vip = |c: Counters, b: Counters, active| VipStats {
            name: "web".into(),
            address: "198.18.10.1".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            counters: c,
            backends: vec![VipBackendStats {
                address: "198.18.20.1".parse().unwrap(),
                id: Some(0),
                weight: 100,
                state: BackendState::Up,
                counters: b,
                conns: Conns {
                    active,
                    inactive: 1,
                },
            }],
        };
        let stats = |v| Stats {
            reasons: Default::default(),
            vips: vec![v],
            backends: vec![],
        };
        let prev = stats(vip(counters(100, 10_000, 10), counters(100, 10_000, 10), 5));
        let now = stats(vip(counters(300, 50_000, 14), counters(300, 50_000, 14), 7));
        // 200 packets, 40000 bytes and 4 new flows in two seconds.
        let want = "\
lb stats --watch (every second; Ctrl-C stops)

VIP / BACKEND           STATE  PKT/S  BYTES/S  NEW/S  ACTIVE  INACTIVE
web tcp 198.18.10.1:80           100    20000      2       7         1
  -> 198.18.20.1        up       100    20000      2       7         1
";
        assert_eq!(rates(&prev, &now, std::time::Duration::from_secs(2)), want);
    }
}
