//! From health to what the rings hold, per VIP (applied to the config the agent runs):
//! - a backend whose checks say down is down (out of the ring; its flows move);
//! - backups take new flows only while no primary passes its checks (HAProxy's `backup`),
//!   and are drained (keeping their flows) when one does;
//! - the panic threshold (Envoy's): while fewer primaries than that share pass, new flows
//!   go to all of them, as if every one were up, rather than overload the few that pass;
//!   if none passes and a backup does, the backups serve instead;
//! - slow start (HAProxy's `slowstart`): a backend that came back or was added takes its
//!   weight in four steps (25, 50, 75, 100 %) over `slow_start_s`.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::config::Config;

/// What the policy needs to know of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub up: bool,
    /// When its weight should start ramping (it came back up, or was added while the
    /// agent ran); `None`: full weight.
    pub ramp_from: Option<Instant>,
}

/// What the policy did to a VIP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipMode {
    /// Fewer primaries pass than the panic threshold: all primaries take new flows.
    pub panic: bool,
    /// No primary passes: the backups take new flows.
    pub backups: bool,
    /// Some backend's weight is still ramping up (the policy must run again soon).
    pub ramping: bool,
}

/// The share of its weight a backend has `elapsed` into a slow start of `total`.
pub fn ramp(elapsed: Duration, total: Duration) -> f64 {
    if total.is_zero() || elapsed >= total {
        return 1.0;
    }
    let step = (elapsed.as_secs_f64() / total.as_secs_f64() * 4.0).floor() + 1.0;
    (step / 4.0).min(1.0)
}

/// Apply health to `eff` (the config the agent runs). `seen` has every checked backend,
/// by (VIP name, address); backends without an entry count as up at full weight.
pub fn apply(
    eff: &mut Config,
    seen: &BTreeMap<(String, IpAddr), Seen>,
    now: Instant,
) -> BTreeMap<String, VipMode> {
    let mut modes = BTreeMap::new();
    for v in &mut eff.vips {
        let mut mode = VipMode::default();
        let state = |addr: IpAddr| seen.get(&(v.name.clone(), addr)).copied();
        let up = |addr: IpAddr| state(addr).is_none_or(|s| s.up);
        // Backends configured to take new flows, and of those the ones that pass.
        let serving = |backup: bool| {
            v.backends
                .iter()
                .filter(move |b| b.backup == backup && !b.drain && b.weight > 0)
        };
        let primaries = serving(false).count();
        let healthy = serving(false).filter(|b| up(b.address)).count();
        let healthy_backups = serving(true).filter(|b| up(b.address)).count();
        let below = |t: u8| primaries > 0 && healthy * 100 < t as usize * primaries;
        let threshold = v.panic_threshold;
        if healthy > 0 {
            mode.panic = threshold.is_some_and(below);
        } else if healthy_backups > 0 {
            mode.backups = true;
        } else {
            mode.panic = threshold.is_some() && primaries > 0;
        }
        let total = Duration::from_secs(v.slow_start_s.into());
        for b in &mut v.backends {
            let s = state(b.address);
            b.down = !s.is_none_or(|s| s.up);
            if mode.panic && !b.backup {
                b.down = false;
            }
            if b.backup && !mode.backups {
                // Keeps the flows it took while the primaries were down.
                b.drain = true;
            }
            if let Some(from) = s.and_then(|s| s.ramp_from) {
                let share = ramp(now.saturating_duration_since(from), total);
                if share < 1.0 && b.weight > 0 {
                    b.weight = ((b.weight as f64 * share).round() as u32).max(1);
                    mode.ramping = true;
                }
            }
        }
        modes.insert(v.name.clone(), mode);
    }
    modes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendConfig, VipConfig};

    fn cfg(backends: &[(&str, bool)], panic: Option<u8>, slow: u32) -> Config {
        let mut c = Config::parse("[agent]\ninterface = \"eth0\"\n").unwrap();
        c.vips.push(VipConfig {
            name: "web".into(),
            address: "198.18.10.1".parse().unwrap(),
            port: 80,
            panic_threshold: panic,
            slow_start_s: slow,
            backends: backends
                .iter()
                .map(|(a, backup)| BackendConfig {
                    address: a.parse().unwrap(),
                    backup: *backup,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
        c
    }

    fn seen(down: &[&str]) -> BTreeMap<(String, IpAddr), Seen> {
        down.iter()
            .map(|a| {
                (
                    ("web".to_string(), a.parse().unwrap()),
                    Seen {
                        up: false,
                        ramp_from: None,
                    },
                )
            })
            .collect()
    }

    /// (down, drain) of each backend after the policy.
    fn after(c: &mut Config, s: &BTreeMap<(String, IpAddr), Seen>) -> (Vec<(bool, bool)>, VipMode) {
        let m = apply(c, s, Instant::now())["web"];
        (
            c.vips[0]
                .backends
                .iter()
                .map(|b| (b.down, b.drain))
                .collect(),
            m,
        )
    }

    const A: &str = "198.18.20.1";
    const B: &str = "198.18.20.2";
    const K: &str = "198.18.20.9";

    #[test]
    fn down_backends_are_down_and_backups_wait_for_every_primary_to_fail() {
        let mut c = cfg(&[(A, false), (B, false), (K, true)], None, 0);
        let (st, m) = after(&mut c.clone(), &seen(&[]));
        assert_eq!(st, [(false, false), (false, false), (false, true)]);
        assert_eq!(m, VipMode::default());
        let (st, _) = after(&mut c.clone(), &seen(&[A]));
        assert_eq!(st, [(true, false), (false, false), (false, true)]);
        let (st, m) = after(&mut c, &seen(&[A, B]));
        assert_eq!(st, [(true, false), (true, false), (false, false)]);
        assert!(m.backups && !m.panic);
    }

    #[test]
    fn below_the_panic_threshold_every_primary_takes_flows() {
        let four = [
            (A, false),
            (B, false),
            ("198.18.20.3", false),
            ("198.18.20.4", false),
        ];
        let mut c = cfg(&four, Some(50), 0);
        // 2 of 4 pass: 50 % is not below 50 %.
        let (st, m) = after(&mut c.clone(), &seen(&[A, B]));
        assert_eq!(st[0], (true, false));
        assert!(!m.panic);
        // 1 of 4: panic, all four serve.
        let (st, m) = after(&mut c, &seen(&[A, B, "198.18.20.3"]));
        assert!(st.iter().all(|&(d, _)| !d), "{st:?}");
        assert!(m.panic);
        // No primary passes but a backup does: the backup, not panic.
        let mut c = cfg(&[(A, false), (K, true)], Some(50), 0);
        let (st, m) = after(&mut c, &seen(&[A]));
        assert_eq!(st, [(true, false), (false, false)]);
        assert!(m.backups && !m.panic);
    }

    #[test]
    fn slow_start_ramps_the_weight_in_four_steps() {
        let s = Duration::from_secs;
        assert_eq!(
            [0, 2, 3, 5, 8, 9, 10, 11].map(|t| ramp(s(t), s(10))),
            [0.25, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
        );
        let mut c = cfg(&[(A, false), (B, false)], None, 10);
        let t0 = Instant::now();
        let mut seen = BTreeMap::new();
        seen.insert(
            ("web".to_string(), A.parse().unwrap()),
            Seen {
                up: true,
                ramp_from: Some(t0),
            },
        );
        let m = apply(&mut c, &seen, t0 + s(3))["web"];
        assert!(m.ramping);
        let w: Vec<u32> = c.vips[0].backends.iter().map(|b| b.weight).collect();
        assert_eq!(w, [50, 100], "half the default weight 100 at 3 s of 10");
    }
}
