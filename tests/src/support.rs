//! Small helpers every kind of test needs: waiting for a condition, and a guard that stops
//! background threads however a test ends.
use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

/// Poll `f` every 5 ms until it is true; panic with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// As [`wait_for`], with a condition that may fail (the error ends the wait).
pub fn try_wait_for(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !f()? {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Sets the flag when dropped: threads that watch it end with the test, however it ends.
pub struct StopOnDrop(pub Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The kernel's possible CPUs (what per-CPU maps and per-CPU LRU lists are sized by).
pub fn possible_cpus() -> u32 {
    aya::util::nr_cpus().map(|n| n as u32).unwrap_or(1).max(1)
}

/// A connection-table size that holds `n` entries made on any one CPU: `CONNS` keeps one
/// LRU list per CPU (`BPF_F_NO_COMMON_LRU`), each `max_conns / possible CPUs` long, and a
/// test's traffic is handled on one or two CPUs. So no test depends on the CPU count.
pub fn conns_for(n: u32) -> u32 {
    (n * possible_cpus()).max(1024)
}
