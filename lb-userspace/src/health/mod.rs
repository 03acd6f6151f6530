//! Health checking. Probes run on a thread of their own (a tokio runtime there), one task
//! per (VIP, backend): a slow or black-holed backend never delays another's check, and
//! ring rebuilds in the agent's loop never delay any. The agent says what to check
//! ([`Checker::set`]) and hears back every result ([`Report`]), state changes marked,
//! through [`Reports`]: a queue that wakes the agent only for a state change.
//!
//! [`state`]: rise/fall counting; [`probe`]: the checks themselves.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{
    mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender},
    Notify,
};

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
    /// When the probe ended.
    pub at: Instant,
}

/// The checker's results in the order they came. A state change wakes the agent at once;
/// the rest wait until the agent drains the queue (each second, and before it answers),
/// so 1,000 checks a second cost the agent's loop one wake-up a second, not 1,000.
#[derive(Clone, Default)]
pub struct Reports {
    queue: Arc<Mutex<Vec<Report>>>,
    wake: Arc<Notify>,
}

impl Reports {
    fn push(&self, r: Report) {
        let changed = r.changed;
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).push(r);
        if changed {
            self.wake.notify_one();
        }
    }

    /// Everything queued so far, oldest first.
    pub fn take(&self) -> Vec<Report> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Returns when a state change was queued (at once if one was since the last call).
    pub async fn changed(&self) {
        self.wake.notified().await
    }
}

enum Command {
    Set(BTreeMap<TargetId, Target>),
}

/// The checking thread, as seen from the agent.
pub struct Checker {
    tx: UnboundedSender<Command>,
}

impl Checker {
    /// Start the thread; its results come out of the returned queue.
    pub fn spawn() -> std::io::Result<(Checker, Reports)> {
        let (tx, rx) = unbounded_channel();
        let reports = Reports::default();
        let rtx = reports.clone();
        std::thread::Builder::new()
            .name("lb-health".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for health checks");
                rt.block_on(manage(rx, rtx));
            })?;
        Ok((Checker { tx }, reports))
    }

    /// Check exactly these targets from now on: new ones start, gone ones stop, changed
    /// ones restart (keeping their state), unchanged ones go on undisturbed.
    pub fn set(&self, targets: BTreeMap<TargetId, Target>) {
        let _ = self.tx.send(Command::Set(targets));
    }
}

async fn manage(mut rx: UnboundedReceiver<Command>, reports: Reports) {
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
async fn check_loop(id: TargetId, t: Target, reports: Reports) {
    let mut health = Health::new(t.up);
    let c = &t.probe.check;
    let spread = c.interval.mul_f64(jitter(&id));
    tokio::time::sleep(spread).await;
    loop {
        let started = Instant::now();
        let result = probe::run(&t.probe).await;
        let at = Instant::now();
        let changed = health.record(result.is_ok(), c.rise, c.fall);
        reports.push(Report {
            id: id.clone(),
            result,
            latency: at - started,
            up: health.up,
            changed,
            at,
        });
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
