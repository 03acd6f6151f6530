//! What the agent remembers of each checked backend: its state and why, its last check,
//! and its availability since the agent started, as high-availability design defines it:
//! MTBF (mean time between failures: time up per failure), MTTR (mean time to repair:
//! time down per recovery) and A = MTBF / (MTBF + MTTR), which is the share of the time
//! it was up.
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

/// One backend's record.
#[derive(Clone, Debug)]
pub struct BackendHealth {
    pub up: bool,
    /// In this state since.
    pub since: Instant,
    pub since_wall: SystemTime,
    /// Why it is in this state (the check result that made it so; "started" at first).
    pub reason: String,
    /// The last check: passed, how long it took, why it failed.
    pub last: Option<(bool, Duration, String)>,
    /// Up -> down changes.
    pub failures: u64,
    /// Down -> up changes.
    pub recoveries: u64,
    /// Time spent up / down before `since`.
    up_before: Duration,
    down_before: Duration,
    /// Checks run, and of those failed.
    pub checks: u64,
    pub failed_checks: u64,
}

/// Availability figures of a backend, for `lb status` and the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Availability {
    pub up_s: f64,
    pub down_s: f64,
    pub failures: u64,
    /// Seconds; `None` before the first failure (infinite).
    pub mtbf_s: Option<f64>,
    /// Seconds; `None` before the first recovery.
    pub mttr_s: Option<f64>,
    /// MTBF / (MTBF + MTTR); 1 without failures.
    pub availability: f64,
}

impl BackendHealth {
    pub fn new(up: bool, now: Instant) -> BackendHealth {
        BackendHealth {
            up,
            since: now,
            since_wall: SystemTime::now(),
            reason: "started".into(),
            last: None,
            failures: 0,
            recoveries: 0,
            up_before: Duration::ZERO,
            down_before: Duration::ZERO,
            checks: 0,
            failed_checks: 0,
        }
    }

    /// Count one check result; `changed` says it flipped the state to `up`.
    pub fn record(
        &mut self,
        up: bool,
        changed: bool,
        result: &Result<(), String>,
        latency: Duration,
        now: Instant,
    ) {
        self.checks += 1;
        self.failed_checks += result.is_err() as u64;
        self.last = Some((
            result.is_ok(),
            latency,
            result.clone().err().unwrap_or_default(),
        ));
        if changed {
            let spent = now.saturating_duration_since(self.since);
            if self.up {
                self.up_before += spent;
                self.failures += 1;
            } else {
                self.down_before += spent;
                self.recoveries += 1;
            }
            self.up = up;
            self.since = now;
            self.since_wall = SystemTime::now();
            self.reason = match result {
                Ok(()) => "checks pass".into(),
                Err(why) => why.clone(),
            };
        }
    }

    pub fn availability(&self, now: Instant) -> Availability {
        let current = now.saturating_duration_since(self.since);
        let (up, down) = if self.up {
            (self.up_before + current, self.down_before)
        } else {
            (self.up_before, self.down_before + current)
        };
        let (up_s, down_s) = (up.as_secs_f64(), down.as_secs_f64());
        let mtbf_s = (self.failures > 0).then(|| up_s / self.failures as f64);
        // Repairs: the recoveries, and the outage under way counts as one begun.
        let repairs = self.recoveries + (!self.up) as u64;
        let mttr_s = (repairs > 0).then(|| down_s / repairs as f64);
        let availability = if up_s + down_s > 0.0 {
            up_s / (up_s + down_s)
        } else {
            1.0
        };
        Availability {
            up_s,
            down_s,
            failures: self.failures,
            mtbf_s,
            mttr_s,
            availability,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn availability_is_mtbf_over_mtbf_plus_mttr() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut h = BackendHealth::new(true, t0);
        let fail = Err("connection refused".to_string());
        // Up 90 s, down 10 s, up 90 s, down 10 s (under way).
        h.record(false, true, &fail, s(0), t0 + s(90));
        assert_eq!(h.reason, "connection refused");
        h.record(true, true, &Ok(()), s(0), t0 + s(100));
        h.record(false, true, &fail, s(0), t0 + s(190));
        let a = h.availability(t0 + s(200));
        assert_eq!((a.up_s, a.down_s, a.failures), (180.0, 20.0, 2));
        assert_eq!(a.mtbf_s, Some(90.0));
        assert_eq!(a.mttr_s, Some(10.0));
        assert!((a.availability - 0.9).abs() < 1e-9);
        let mtbf = a.mtbf_s.unwrap();
        let mttr = a.mttr_s.unwrap();
        assert!((a.availability - mtbf / (mtbf + mttr)).abs() < 1e-9);
        // Never failed: MTBF unbounded, A = 1.
        let ok = BackendHealth::new(true, t0).availability(t0 + s(50));
        assert_eq!((ok.mtbf_s, ok.mttr_s, ok.availability), (None, None, 1.0));
    }
}
