//! Moving a running data plane onto maps of other sizes or layouts, without losing a packet
//! or a flow: what a restart or an upgrade does when the config's sizes (`agent.max_vips`,
//! `max_backends`, `max_conns`, `ring_size`) or this build's map layouts differ from what
//! is pinned. (Katran only reuses maps that did not change; everything else starts empty.)
//!
//! 1. A complete new set of maps is created, pinned in `<pins>/next/`, and filled from the
//!    config like a fresh start, except that VIPs and backends keep their old ids where
//!    those fit (so rings, counters and entries mean the same things).
//! 2. Connection entries are copied over, translated through what they name (VIP key,
//!    backend address), converted from older layouts, most recent last.
//! 3. The new program, which uses only the new maps, replaces the old one in the XDP link
//!    (one atomic `BPF_LINK_UPDATE`): from here every packet sees the new maps.
//! 4. After an RCU grace period no packet can still be in the old program: entries it made
//!    since step 2 are copied (those the new program has not made itself), and its counters
//!    are added to the new ones.
//! 5. The new pins are renamed over the old ones (one rename each) and `next/` removed.
//!
//! Before step 3 nothing the old program uses has changed: a failure there leaves the
//! running data plane as it was. A crash between 3 and 5 is finished by the next start
//! ([`recover`]): the link then runs a program that uses the `next/` maps.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuValues};
use lb_common::*;
use tracing::info;

use crate::{
    config::Config,
    dataplane::{ip_from_raw, pinned::Pinned, sys, Dataplane, Sizes, MAPS},
    reconcile::{self, Applied, MemberKey},
};

/// `Backend` of layout version 1: one id per address, shared by every VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct BackendV1 {
    addr: [u32; 4],
    mac: [u8; 6],
    family: u8,
    state: u8,
}

/// `ConnVal` of layout version 1.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ConnValV1 {
    backend: u32,
    vip: u32,
}

/// Where the new maps wait until they replace the old pins (bpffs refuses names with a
/// dot).
pub fn staging(dir: &Path) -> PathBuf {
    dir.join("next")
}

/// What the old maps say, read through their pins.
struct Old {
    pinned: BTreeMap<&'static str, Pinned>,
    /// VIP id -> key.
    vips: HashMap<u32, VipKey>,
    /// Backend id -> what it names: (VIP, address) for v2; (None, address) for v1, where
    /// the VIP comes from each connection entry.
    backends: HashMap<u32, (Option<VipKey>, IpAddr)>,
    conns: Option<OwnedFd>,
}

fn open(dir: &Path, name: &str) -> Result<Option<MapData>> {
    let path = dir.join(name);
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(MapData::from_pin(&path).with_context(|| {
        format!("opening pinned map {}", path.display())
    })?))
}

fn fd_of(d: &MapData) -> Result<OwnedFd> {
    Ok(d.fd().as_fd().try_clone_to_owned()?)
}

impl Old {
    fn read(dir: &Path, pinned: &BTreeMap<&'static str, Pinned>) -> Result<Old> {
        let mut vips = HashMap::new();
        if let Some(d) = open(dir, "VIPS")? {
            let m: BpfHashMap<MapData, VipKey, VipMeta> = BpfHashMap::try_from(Map::HashMap(d))?;
            for kv in m.iter() {
                let (k, v) = kv?;
                vips.insert(v.id, k);
            }
        }
        let mut backends = HashMap::new();
        if let (Some(d), Some(p)) = (open(dir, "BACKENDS")?, pinned.get("BACKENDS")) {
            let fd = fd_of(&d)?;
            let live = |state: u8| state == BACKEND_UP || state == BACKEND_DRAINING;
            if p.layout.version == 1 {
                let all: Vec<BackendV1> = sys::lookup_batch(&fd, 0, p.max_entries)?;
                for (id, b) in all.iter().enumerate().filter(|(_, b)| live(b.state)) {
                    backends.insert(id as u32, (None, ip_from_raw(b.addr, b.family)));
                }
            } else {
                let all: Vec<Backend> = sys::lookup_batch(&fd, 0, p.max_entries)?;
                for (id, b) in all.iter().enumerate().filter(|(_, b)| live(b.state)) {
                    if let Some(key) = vips.get(&b.vip) {
                        backends.insert(id as u32, (Some(*key), ip_from_raw(b.addr, b.family)));
                    }
                }
            }
        }
        let conns = open(dir, "CONNS")?.map(|d| fd_of(&d)).transpose()?;
        Ok(Old {
            pinned: pinned.clone(),
            vips,
            backends,
            conns,
        })
    }

    fn version(&self, name: &str) -> u32 {
        self.pinned.get(name).map_or(0, |p| p.layout.version)
    }

    /// The ids the new maps should reuse.
    fn hints(&self) -> reconcile::IdHints {
        let mut h = reconcile::IdHints::default();
        for (id, key) in &self.vips {
            h.vips.insert(*key, *id);
        }
        for (id, (key, addr)) in &self.backends {
            if let Some(key) = key {
                h.members.insert((*key, *addr), *id);
            }
        }
        h
    }

    /// The membership an old entry names.
    fn member(&self, backend: u32, vip: u32) -> Option<MemberKey> {
        let key = self.vips.get(&vip)?;
        match self.backends.get(&backend)? {
            (Some(k), addr) if k == key => Some((*k, *addr)),
            (Some(_), _) => None,
            (None, addr) => Some((*key, *addr)),
        }
    }

    /// Every old connection entry, as entries of the new maps (those whose VIP and
    /// backend still exist).
    fn conns(&self, applied: &Applied) -> Result<Vec<(FlowKey, ConnVal)>> {
        let Some(fd) = &self.conns else {
            return Ok(Vec::new());
        };
        let now = coarse_now();
        let old: Vec<(FlowKey, ConnVal)> = if self.version("CONNS") == 1 {
            sys::dump_hash::<FlowKey, ConnValV1>(fd, 4096)?
                .into_iter()
                .map(|(k, v)| {
                    let c = ConnVal {
                        backend: v.backend,
                        vip: v.vip as u16,
                        flags: 0,
                        _pad: 0,
                        atime: now,
                    };
                    (k, c)
                })
                .collect()
        } else {
            sys::dump_hash(fd, 4096)?
        };
        Ok(old
            .into_iter()
            .filter_map(|(k, c)| {
                let mk = self.member(c.backend, c.vip as u32)?;
                let backend = applied.member_id(&mk.0, &mk.1)?;
                let vip = applied.vips.get(&mk.0)?.meta.id as u16;
                Some((k, ConnVal { backend, vip, ..c }))
            })
            .collect())
    }
}

/// `CLOCK_MONOTONIC_COARSE` in ns: the data plane's `bpf_ktime_get_coarse_ns()`.
pub fn coarse_now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What [`migrate`] did, for the log.
#[derive(Debug, Default)]
pub struct Report {
    /// Entries copied before the program swap.
    pub conns_copied: usize,
    /// Entries the old program made or moved between that copy and the swap, written after
    /// it (unless the new program had made its own meanwhile).
    pub conns_late: usize,
    /// Entries beyond the new table's capacity (the least recently used; their flows
    /// follow the ring, which picks the same backend while the VIP's backends are as they
    /// were).
    pub conns_dropped: usize,
    /// Steps after the swap that failed (the new maps run regardless; the next start
    /// finishes what is left).
    pub problems: Vec<String>,
}

/// The next-hop MACs the old maps hold, by backend address: what the new maps use for a
/// backend whose next hop is not resolved (yet) at the time of the migration.
pub fn old_macs(dir: &Path, pinned: &BTreeMap<&'static str, Pinned>) -> BTreeMap<IpAddr, [u8; 6]> {
    let mut out = BTreeMap::new();
    let (Ok(Some(d)), Some(p)) = (open(dir, "BACKENDS"), pinned.get("BACKENDS")) else {
        return out;
    };
    let Ok(fd) = fd_of(&d) else {
        return out;
    };
    let mut add = |addr: [u32; 4], family: u8, mac: [u8; 6], state: u8| {
        if state != BACKEND_EMPTY && mac != [0; 6] {
            out.insert(ip_from_raw(addr, family), mac);
        }
    };
    if p.layout.version == 1 {
        if let Ok(all) = sys::lookup_batch::<BackendV1>(&fd, 0, p.max_entries) {
            all.iter()
                .for_each(|b| add(b.addr, b.family, b.mac, b.state));
        }
    } else if let Ok(all) = sys::lookup_batch::<Backend>(&fd, 0, p.max_entries) {
        all.iter()
            .for_each(|b| add(b.addr, b.family, b.mac, b.state));
    }
    out
}

/// Migrate the data plane pinned under `dir` (described by `pinned`) to the maps `cfg`
/// and this build want; `attach` puts the new program into the link. Returns the new data
/// plane, what reconcile made of it, and a report. An error means the running data plane
/// is as it was; once the new program runs, this never fails (see [`Report::problems`]).
pub fn migrate(
    dir: &Path,
    pinned: &BTreeMap<&'static str, Pinned>,
    cfg: &Config,
    sizes: Sizes,
    mtu: u32,
    attach: impl FnOnce(&mut Dataplane) -> Result<()>,
) -> Result<(Dataplane, Applied, Report)> {
    let old = Old::read(dir, pinned)?;
    let next = staging(dir);
    remove_dir(&next);
    std::fs::create_dir(&next).with_context(|| format!("creating {}", next.display()))?;
    let prepared = (|| {
        let mut dp = Dataplane::load_at(sizes, &next).with_context(|| {
            format!(
                "creating maps of agent.max_vips {}, agent.max_backends {}, agent.max_conns {}, \
                 agent.ring_size {}",
                sizes.max_vips, sizes.max_backends, sizes.max_conns, sizes.ring_stride
            )
        })?;
        let mut applied = Applied {
            hints: old.hints(),
            ..Default::default()
        };
        reconcile::reconcile(&mut dp, cfg, &mut applied, mtu)?;
        let conns = old.conns(&applied)?;
        let first: HashMap<FlowKey, (u32, u16)> = conns
            .iter()
            .map(|(k, v)| (*k, (v.backend, v.vip)))
            .collect();
        dp.insert_conns(conns)?;
        Ok::<_, anyhow::Error>((dp, applied, first))
    })();
    let (mut dp, applied, first) = match prepared {
        Ok(p) => p,
        Err(e) => {
            remove_dir(&next);
            return Err(e.context("preparing the new maps (the running data plane is unchanged)"));
        }
    };
    fault("migrate-before-swap");
    if let Err(e) = attach(&mut dp) {
        remove_dir(&next);
        return Err(e.context("swapping in the new program (the running data plane is unchanged)"));
    }
    fault("migrate-after-swap");
    // From here the new program runs on the new maps: whatever fails below is reported,
    // never undone (the old maps are no longer read by anyone).
    let mut report = Report {
        conns_copied: first.len(),
        conns_dropped: first.len().saturating_sub(sizes.max_conns as usize),
        ..Default::default()
    };
    // Wait until the old program cannot run any more: then its maps are frozen, and what
    // it did since the first copy can be carried over.
    let late = dp
        .wait_for_programs()
        .and_then(|_| carry_late_conns(&old, &applied, &mut dp, &first));
    match late {
        Ok(n) => report.conns_late = n,
        Err(e) => report
            .problems
            .push(format!("late connection entries: {e:#}")),
    }
    if let Err(e) = add_counters(dir, &old, &applied, &mut dp) {
        report.problems.push(format!("old counters: {e:#}"));
    }
    // A rename can fail only on a broken bpffs; try twice, then leave it to the next start
    // (`recover`, which sees that the link runs on these maps).
    if let Err(e) = commit(dir).or_else(|_| commit(dir)) {
        report
            .problems
            .push(format!("renaming the new pins into place: {e:#}"));
    }
    Ok((dp, applied, report))
}

/// After the swap: the entries the old program made or moved after the first copy. An
/// entry the new program has made (or moved) itself since is left as it is.
fn carry_late_conns(
    old: &Old,
    applied: &Applied,
    dp: &mut Dataplane,
    first: &HashMap<FlowKey, (u32, u16)>,
) -> Result<usize> {
    let mut n = 0;
    for (k, v) in old.conns(applied)? {
        let copied = first.get(&k).copied();
        if copied == Some((v.backend, v.vip)) {
            continue; // unchanged since the first copy
        }
        let now = dp.conns.get(&k, 0).ok().map(|c| (c.backend, c.vip));
        if now.is_none() || now == copied {
            dp.conns.insert(k, v, 0).context("writing CONNS")?;
            n += 1;
        }
    }
    Ok(n)
}

/// Add the old per-CPU counters to the new ones, translated by identity: reasons by index,
/// VIPs by key, backends by (VIP, address) where the old layout had that (version 2).
fn add_counters(dir: &Path, old: &Old, applied: &Applied, dp: &mut Dataplane) -> Result<()> {
    fn per_cpu<V: aya::Pod>(dir: &Path, name: &str) -> Result<Option<PerCpuArray<MapData, V>>> {
        open(dir, name)?
            .map(|d| Ok(PerCpuArray::try_from(Map::PerCpuArray(d))?))
            .transpose()
    }
    fn add<V: aya::Pod + Copy>(
        from: &PerCpuArray<MapData, V>,
        to: &mut PerCpuArray<MapData, V>,
        old_idx: u32,
        new_idx: u32,
        sum: impl Fn(V, V) -> V,
    ) -> Result<()> {
        let (Ok(a), Ok(b)) = (from.get(&old_idx, 0), to.get(&new_idx, 0)) else {
            return Ok(());
        };
        let merged: Vec<V> = a.iter().zip(b.iter()).map(|(x, y)| sum(*x, *y)).collect();
        to.set(new_idx, PerCpuValues::try_from(merged)?, 0)?;
        Ok(())
    }
    let counters = |a: Counters, b: Counters| Counters {
        packets: a.packets + b.packets,
        bytes: a.bytes + b.bytes,
        new_flows: a.new_flows + b.new_flows,
    };
    if let Some(m) = per_cpu::<u64>(dir, "STATS")? {
        for i in 0..NUM_REASONS {
            add(&m, &mut dp.stats, i, i, |a, b| a + b)?;
        }
    }
    if let Some(m) = per_cpu::<u64>(dir, "DECAP_STATS")? {
        for i in 0..NUM_DECAP_REASONS {
            add(&m, &mut dp.decap_stats, i, i, |a, b| a + b)?;
        }
    }
    if let Some(m) = per_cpu::<Counters>(dir, "VIP_STATS")? {
        for (id, key) in &old.vips {
            if let Some(v) = applied.vips.get(key) {
                add(&m, &mut dp.vip_stats, *id, v.meta.id, counters)?;
            }
        }
    }
    if old.version("BE_STATS") >= 2 {
        if let Some(m) = per_cpu::<Counters>(dir, "BE_STATS")? {
            for (id, (key, addr)) in &old.backends {
                let new = key.and_then(|k| applied.member_id(&k, addr));
                if let Some(new) = new {
                    add(&m, &mut dp.be_stats, *id, new, counters)?;
                }
            }
        }
    }
    Ok(())
}

/// Test hook: with `LB_FAULT=<at>` the agent dies at that point as under `kill -9`, so
/// tests can show that the next start finishes or undoes the migration.
fn fault(at: &str) {
    if std::env::var("LB_FAULT").is_ok_and(|v| v == at) {
        tracing::warn!(at, "LB_FAULT: aborting here");
        std::process::abort();
    }
}

/// Rename every map pinned in `next/` over its old pin, then remove `next/`. A directory
/// `next/committing` marks that the renames have begun (bpffs holds no plain files), so
/// that a crash halfway is finished by the next start ([`recover`]); `LAYOUT` goes first.
fn commit(dir: &Path) -> Result<()> {
    let next = staging(dir);
    let marker = next.join("committing");
    if !marker.exists() {
        std::fs::create_dir(&marker).with_context(|| format!("creating {}", marker.display()))?;
    }
    let layout_first = MAPS
        .iter()
        .filter(|m| m.name == "LAYOUT")
        .chain(MAPS.iter().filter(|m| m.name != "LAYOUT"));
    for m in layout_first {
        let from = next.join(m.name);
        if from.exists() {
            std::fs::rename(&from, dir.join(m.name))
                .with_context(|| format!("renaming {} into place", from.display()))?;
        }
        if m.name == "VIPS" {
            fault("migrate-mid-commit");
        }
    }
    std::fs::remove_dir(&marker).with_context(|| format!("removing {}", marker.display()))?;
    std::fs::remove_dir(&next).with_context(|| format!("removing {}", next.display()))
}

fn remove_dir(d: &Path) {
    if let Ok(entries) = std::fs::read_dir(d) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path()).or_else(|_| std::fs::remove_dir(e.path()));
        }
    }
    let _ = std::fs::remove_dir(d);
}

/// A `next/` left by a migration that did not finish (at start, and before any new
/// migration). If the renames had begun, or the link's program runs on maps pinned in
/// `next/`, the new maps are the live ones: finish (rename the rest into place).
/// Otherwise it never got past the swap: remove them (the old maps are the live ones).
pub fn recover(dir: &Path, link_prog_maps: Option<Vec<u32>>) -> Result<()> {
    let next = staging(dir);
    if !next.exists() {
        return Ok(());
    }
    let mut staged = Vec::new();
    for m in &MAPS {
        if let Some(d) = open(&next, m.name)? {
            staged.push(d.info()?.id());
        }
    }
    let live = link_prog_maps.unwrap_or_default();
    let committing = next.join("committing").exists();
    if committing || live.iter().any(|id| staged.contains(id)) {
        commit(dir)?;
        info!(dir = %dir.display(), "finished a migration that was interrupted after the program swap");
    } else {
        remove_dir(&next);
        if next.exists() {
            bail!("could not remove {}", next.display());
        }
        info!(dir = %dir.display(), "removed the new maps of a migration that was interrupted before the program swap");
    }
    Ok(())
}
