//! Health checking. Probes run on a thread of their own (a tokio runtime there), one task
//! per (VIP, backend): a slow or black-holed backend never delays another's check, and
//! ring rebuilds in the agent's loop never delay any. The agent says what to check
//! ([`Checker::set`]) and hears back every result ([`Report`]), state changes marked.
//!
//! [`state`]: rise/fall counting; [`probe`]: the checks themselves.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

pub mod policy;
pub mod probe;
pub mod record;
pub mod state;

pub use probe::Probe;
use state::Health;

/// A checked backend: (VIP name, backend address).
pub type TargetId = (String, IpAddr);

/// What to check of one backend, and the state it starts in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub probe: Probe,
    /// Its state when the check starts (kept from an earlier target of the same id).
    pub up: bool,
}

/// One check's result.
#[derive(Clone, Debug)]
pub struct Report {
    pub id: TargetId,
    /// `Ok` or why it failed.
    pub result: Result<(), String>,
    pub latency: Duration,
    /// The backend's state after this result.
    pub up: bool,
    /// This result changed the state.
    pub changed: bool,
}

enum Command {
    Set(BTreeMap<TargetId, Target>),
}

/// The checking thread, as seen from the agent.
pub struct Checker {
    tx: UnboundedSender<Command>,
}

impl Checker {
    /// Start the thread; its reports come out of the returned receiver.
    pub fn spawn() -> std::io::Result<(Checker, UnboundedReceiver<Report>)> {
        let (tx, rx) = unbounded_channel();
        let (rtx, rrx) = unbounded_channel();
        std::thread::Builder::new()
            .name("lb-health".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for health checks");
                rt.block_on(manage(rx, rtx));
            })?;
        Ok((Checker { tx }, rrx))
    }

    /// Check exactly these targets from now on: new ones start, gone ones stop, changed
    /// ones restart (keeping their state), unchanged ones go on undisturbed.
    pub fn set(&self, targets: BTreeMap<TargetId, Target>) {
        let _ = self.tx.send(Command::Set(targets));
    }
}

async fn manage(mut rx: UnboundedReceiver<Command>, reports: UnboundedSender<Report>) {
    let mut running: BTreeMap<TargetId, (Probe, tokio::task::JoinHandle<()>)> = BTreeMap::new();
    while let Some(Command::Set(targets)) = rx.recv().await {
        running.retain(|id, (probe, task)| {
            let keep = targets.get(id).is_some_and(|t| t.probe == *probe);
            if !keep {
                task.abort();
            }
            keep
        });
        for (id, t) in targets {
            if running.contains_key(&id) {
                continue;
            }
            let task = tokio::spawn(check_loop(id.clone(), t.clone(), reports.clone()));
            running.insert(id, (t.probe, task));
        }
    }
    for (_, (_, task)) in running {
        task.abort();
    }
}

/// Check one backend forever: a probe every interval (`fastinter` while its state is
/// changing), counted by rise/fall. The first one at a random point of the first
/// interval, so that many backends' checks spread out instead of firing together.
async fn check_loop(id: TargetId, t: Target, reports: UnboundedSender<Report>) {
    let mut health = Health::new(t.up);
    let c = &t.probe.check;
    let spread = c.interval.mul_f64(jitter(&id));
    tokio::time::sleep(spread).await;
    loop {
        let started = Instant::now();
        let result = probe::run(&t.probe).await;
        let latency = started.elapsed();
        let changed = health.record(result.is_ok(), c.rise, c.fall);
        let r = Report {
            id: id.clone(),
            result,
            latency,
            up: health.up,
            changed,
        };
        if reports.send(r).is_err() {
            return;
        }
        let next = started + probe::next_in(c, health.changing());
        tokio::time::sleep_until(next.into()).await;
    }
}

/// A number in [0, 1) that depends only on the target (so restarts keep the phase).
fn jitter(id: &TargetId) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.0.bytes().chain(id.1.to_string().bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    (h >> 11) as f64 / (1u64 << 53) as f64
}
