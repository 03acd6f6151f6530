//! Health checks as the config describes them: per VIP (`health = { ... }`), overridable
//! field by field per backend, with HAProxy's defaults (`inter` 2000 ms, `rise` 2, `fall`
//! 3, the timeout as long as the interval, HTTP status 200-399). [`Check`] is one backend's
//! check with every default applied.
use std::{fmt, time::Duration};

use serde::{Deserialize, Serialize};

use super::{err, BackendConfig, FieldError, Protocol, VipConfig};

/// What to probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connect (the handshake completes).
    Tcp,
    /// `GET path` over TCP; the status must be in `status`.
    Http,
    /// Send `payload`, expect a datagram back (equal to `expect` if set).
    Udp,
    /// No check: the backend counts as up.
    None,
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Http => "http",
            CheckKind::Udp => "udp",
            CheckKind::None => "none",
        })
    }
}

/// Which way a probe goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// Addressed to the VIP and sent to this one backend exactly as client traffic is
    /// (encapsulated, or MAC-rewritten for l2dsr): a pass proves the whole path (the
    /// backend holds the VIP, its decap works, its server answers on the VIP).
    Tunnel,
    /// To the backend's own address: for backends that do not run our decap.
    Direct,
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Via::Tunnel => "tunnel",
            Via::Direct => "direct",
        })
    }
}

/// The `health` table of a VIP, or a backend's override of some of its fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    /// Default: `tcp` for a TCP VIP, `none` for a UDP VIP (a UDP check needs a payload
    /// the service answers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<CheckKind>,
    /// Default: `tunnel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<Via>,
    /// Port to probe; default: the VIP's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Time between two checks of a backend in a steady state (HAProxy `inter`): 2000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u32>,
    /// Time between checks while a backend is changing state (HAProxy `fastinter`);
    /// default: `interval_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fastinter_ms: Option<u32>,
    /// How long a check may take; default: `interval_ms` (HAProxy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u32>,
    /// Consecutive passes that bring a down backend up: 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rise: Option<u32>,
    /// Consecutive failures that take an up backend down: 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fall: Option<u32>,
    /// `http`: the path to GET; default `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `http`: accepted status codes, ranges and single codes separated by commas
    /// (`"200-399"`, the default; `"200,204"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// `http`: the Host header; default: the probed address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `udp`: what to send (UTF-8 text); default `"ping"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// `udp`: the reply must contain this text; default: any reply passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<String>,
}

impl HealthSpec {
    /// Each field of `over` that is set replaces this one's.
    fn overlay(&self, over: &HealthSpec) -> HealthSpec {
        fn pick<T: Clone>(a: &Option<T>, b: &Option<T>) -> Option<T> {
            b.clone().or_else(|| a.clone())
        }
        HealthSpec {
            kind: pick(&self.kind, &over.kind),
            via: pick(&self.via, &over.via),
            port: pick(&self.port, &over.port),
            interval_ms: pick(&self.interval_ms, &over.interval_ms),
            fastinter_ms: pick(&self.fastinter_ms, &over.fastinter_ms),
            timeout_ms: pick(&self.timeout_ms, &over.timeout_ms),
            rise: pick(&self.rise, &over.rise),
            fall: pick(&self.fall, &over.fall),
            path: pick(&self.path, &over.path),
            status: pick(&self.status, &over.status),
            host: pick(&self.host, &over.host),
            payload: pick(&self.payload, &over.payload),
            expect: pick(&self.expect, &over.expect),
        }
    }
}

/// One backend's check, every default applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub kind: CheckKind,
    pub via: Via,
    pub port: u16,
    pub interval: Duration,
    pub fastinter: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub path: String,
    /// Accepted HTTP status ranges, inclusive.
    pub status: Vec<(u16, u16)>,
    pub host: Option<String>,
    pub payload: Vec<u8>,
    pub expect: Option<Vec<u8>>,
}

pub const DEFAULT_INTERVAL_MS: u32 = 2000;
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 3;

/// `"200-399"`, `"200,204,300-302"` → inclusive ranges.
pub fn parse_status(s: &str) -> Option<Vec<(u16, u16)>> {
    s.split(',')
        .map(|part| {
            let part = part.trim();
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let (a, b): (u16, u16) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
            ((100..=599).contains(&a) && (a..=599).contains(&b)).then_some((a, b))
        })
        .collect()
}

/// The check of backend `b` of VIP `v`, or the field that makes it impossible (`at`
/// names the backend: `vip[web].backends[0]`).
pub fn check_of(v: &VipConfig, b: &BackendConfig, at: &str) -> Result<Check, FieldError> {
    let vip_spec = v.health.clone().unwrap_or_default();
    let spec = match &b.health {
        Some(over) => vip_spec.overlay(over),
        None => vip_spec,
    };
    // The field of an error: the backend's own if it set it, else the VIP's.
    let field = |name: &str, set_by_backend: bool| {
        if set_by_backend {
            format!("{at}.health.{name}")
        } else {
            format!("{}.health.{name}", v.field())
        }
    };
    let by_be = |f: fn(&HealthSpec) -> bool| b.health.as_ref().is_some_and(f);
    let kind = spec.kind.unwrap_or(match v.protocol {
        Protocol::Tcp => CheckKind::Tcp,
        Protocol::Udp => CheckKind::None,
    });
    match (kind, v.protocol) {
        (CheckKind::Tcp | CheckKind::Http, Protocol::Udp) | (CheckKind::Udp, Protocol::Tcp) => {
            return err(
                field("kind", by_be(|h| h.kind.is_some())),
                format!("a {kind} check cannot probe a {} VIP", v.protocol),
            )
        }
        _ => {}
    }
    let interval_ms = spec.interval_ms.unwrap_or(DEFAULT_INTERVAL_MS);
    if !(50..=3_600_000).contains(&interval_ms) {
        return err(
            field("interval_ms", by_be(|h| h.interval_ms.is_some())),
            format!("{interval_ms} is out of range 50..=3600000"),
        );
    }
    let fastinter_ms = spec.fastinter_ms.unwrap_or(interval_ms);
    if !(50..=3_600_000).contains(&fastinter_ms) {
        return err(
            field("fastinter_ms", by_be(|h| h.fastinter_ms.is_some())),
            format!("{fastinter_ms} is out of range 50..=3600000"),
        );
    }
    let timeout_ms = spec.timeout_ms.unwrap_or(interval_ms);
    if timeout_ms == 0 || timeout_ms > interval_ms.max(fastinter_ms) {
        return err(
            field("timeout_ms", by_be(|h| h.timeout_ms.is_some())),
            format!(
                "{timeout_ms} must be 1..={} (no longer than the interval)",
                interval_ms.max(fastinter_ms)
            ),
        );
    }
    let (rise, fall) = (
        spec.rise.unwrap_or(DEFAULT_RISE),
        spec.fall.unwrap_or(DEFAULT_FALL),
    );
    for (name, n, by) in [
        ("rise", rise, by_be(|h| h.rise.is_some())),
        ("fall", fall, by_be(|h| h.fall.is_some())),
    ] {
        if !(1..=100).contains(&n) {
            return err(field(name, by), format!("{n} is out of range 1..=100"));
        }
    }
    let status_text = spec.status.clone().unwrap_or_else(|| "200-399".into());
    let Some(status) = parse_status(&status_text) else {
        return err(
            field("status", by_be(|h| h.status.is_some())),
            format!("{status_text:?} is not a list of status codes and ranges like \"200-399\""),
        );
    };
    let path = spec.path.clone().unwrap_or_else(|| "/".into());
    if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return err(
            field("path", by_be(|h| h.path.is_some())),
            format!("{path:?} must start with / and hold no spaces"),
        );
    }
    if let Some(h) = &spec.host {
        if h.is_empty() || h.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return err(
                field("host", by_be(|h| h.host.is_some())),
                format!("{h:?} is not a host name"),
            );
        }
    }
    Ok(Check {
        kind,
        via: spec.via.unwrap_or(Via::Tunnel),
        port: spec.port.unwrap_or(v.port),
        interval: Duration::from_millis(interval_ms.into()),
        fastinter: Duration::from_millis(fastinter_ms.into()),
        timeout: Duration::from_millis(timeout_ms.into()),
        rise,
        fall,
        path,
        status,
        host: spec.host.clone(),
        payload: spec
            .payload
            .clone()
            .unwrap_or_else(|| "ping".into())
            .into_bytes(),
        expect: spec.expect.clone().map(String::into_bytes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lists_parse_and_bad_ones_do_not() {
        assert_eq!(parse_status("200-399"), Some(vec![(200, 399)]));
        assert_eq!(
            parse_status("200, 204,300-302"),
            Some(vec![(200, 200), (204, 204), (300, 302)])
        );
        for bad in ["", "2xx", "399-200", "99", "200-600", "200,"] {
            assert_eq!(parse_status(bad), None, "{bad:?}");
        }
    }
}
