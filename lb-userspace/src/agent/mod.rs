//! The long-lived agent: loads (or adopts) the data plane, keeps the maps equal to the
//! config file, answers the CLI, reloads on SIGHUP, exits on SIGTERM leaving the data plane
//! running. Everything it creates in the kernel is pinned under `/sys/fs/bpf/<instance>/`,
//! so a restarted (or upgraded) agent picks up the same maps and link and drops nothing.
//!
//! [`os`]: what it needs of the system; [`pins`]: the pinned program, link and maps;
//! [`handle`]: answering requests; [`run`]: the event loop.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use tracing::{error, info};

use std::{collections::BTreeMap, net::SocketAddr};

use crate::{
    config::{CheckKind, Config, Via},
    dataplane::{
        pinned::{self, Pins},
        Dataplane, Sizes,
    },
    health::{
        policy::{self, VipMode},
        record::BackendHealth,
        Checker, Probe, Report, Reports, Target, TargetId,
    },
    migrate,
    reconcile::{self, Applied, Changes},
};

mod effective;
pub mod events;
mod handle;
pub mod os;
pub mod pins;
mod run;

pub use os::{ensure_bpffs, enter_netns, interface_mtu, require_root};
pub use pins::{pin_dir, stop};
use pins::{remove_pins, Attached, InstanceLock};
pub use run::run;

/// How long a start or a change waits for neighbours to answer (ARP / NDP).
const RESOLVE_WAIT: Duration = Duration::from_secs(1);

pub(crate) fn sizes(cfg: &Config) -> Sizes {
    Sizes {
        max_vips: cfg.agent.max_vips,
        max_backends: cfg.agent.max_backends,
        max_conns: cfg.agent.max_conns,
        ring_stride: cfg.agent.ring_size,
    }
}

pub struct Agent {
    pub(crate) instance: String,
    pub(crate) config_path: PathBuf,
    /// The operator's config (what the file says, what the CLI shows and writes back).
    pub(crate) cfg: Config,
    /// What the data plane runs: `cfg` completed from the kernel (see `effective`) and
    /// from health (see `health::policy`).
    pub(crate) eff: Config,
    pub(crate) view: effective::KernelView,
    /// The checking thread, and its results.
    checker: Checker,
    pub(crate) reports: Reports,
    /// Every checked backend's record.
    pub(crate) health: BTreeMap<TargetId, BackendHealth>,
    /// Backends whose weight ramps up (slow start), since when.
    ramp: BTreeMap<TargetId, Instant>,
    /// What the policy did to each VIP.
    pub(crate) modes: BTreeMap<String, VipMode>,
    /// Backends without a next hop when last composed, and why (for their events).
    unresolved_seen: BTreeMap<std::net::IpAddr, String>,
    pub(crate) events: events::Events,
    pub(crate) metrics: crate::metrics::Metrics,
    pub(crate) dp: Dataplane,
    pub(crate) applied: Applied,
    pub(crate) mtu: u32,
    /// How this agent found the data plane at start.
    pub(crate) start: Start,
    /// BIRD, announcing the VIPs (`[bgp]`).
    pub(crate) bgp: Option<crate::bgp::Speaker>,
    lock: Option<InstanceLock>,
}

/// How an agent found the data plane when it started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// Nothing was pinned: maps created, program attached.
    Fresh,
    /// Pinned maps adopted as they were, the new program swapped into the link.
    Adopted,
    /// Pinned maps of other sizes or layouts migrated to new ones (see `migrate`).
    Migrated,
}

impl Agent {
    pub fn start(config_path: &Path, instance: &str) -> Result<Agent> {
        require_root()?;
        let cfg = Config::load(config_path)?;
        if let Some(b) = &cfg.bgp {
            crate::bgp::check_binary(&b.bird)?;
        }
        ensure_bpffs()?;
        let lock = pins::lock(instance, std::time::Duration::ZERO)?;
        let dir = pin_dir(instance);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let fresh = !dir.join("link").exists();
        let t = Instant::now();
        let mut view = effective::KernelView::new()?;
        let started = (|| {
            if fresh && std::fs::read_dir(&dir)?.next().is_some() {
                // Maps without a link run no program: what a start that died halfway left.
                info!(dir = %dir.display(), "removing pins that no attached program uses");
                remove_pins(&dir);
                std::fs::create_dir_all(&dir)?;
            }
            migrate::recover(&dir, pins::link_program_maps(&dir)?)?;
            let mtu = interface_mtu(&cfg.agent.interface)?;
            let sizes = sizes(&cfg);
            let iface = &cfg.agent.interface;
            let mode = cfg.agent.xdp_mode;
            match pinned::inspect(&dir, &sizes)? {
                Pins::None | Pins::Same => {
                    let mut dp = Dataplane::load_at(sizes, &dir)?;
                    let how = pins::attach(&mut dp, &dir, iface, mode)?;
                    let mut applied = reconcile::adopt(&mut dp)?;
                    let mut eff =
                        view.effective(&cfg, &effective::macs_in(&applied), RESOLVE_WAIT)?;
                    policy::apply(&mut eff, &BTreeMap::new(), Instant::now());
                    let changes = reconcile::reconcile(&mut dp, &eff, &mut applied, mtu)?;
                    log_attached(&how);
                    log_changes(&changes, "start", None);
                    let start = if how == Attached::Fresh {
                        Start::Fresh
                    } else {
                        Start::Adopted
                    };
                    Ok::<_, anyhow::Error>((mtu, dp, applied, start, eff))
                }
                Pins::Differ { pinned, changes } => {
                    info!(
                        ?changes,
                        "the pinned maps differ from this build and config: migrating"
                    );
                    let mut how = None;
                    let last = migrate::old_macs(&dir, &pinned);
                    let mut eff = view.effective(&cfg, &last, RESOLVE_WAIT)?;
                    policy::apply(&mut eff, &BTreeMap::new(), Instant::now());
                    let (dp, applied, report) =
                        migrate::migrate(&dir, &pinned, &eff, sizes, mtu, |dp| {
                            how = Some(pins::attach(dp, &dir, iface, mode)?);
                            Ok(())
                        })?;
                    log_migrated(&report);
                    if let Some(how) = how {
                        log_attached(&how);
                    }
                    Ok((mtu, dp, applied, Start::Migrated, eff))
                }
            }
        })();
        let (mtu, dp, applied, start, eff) = match started {
            Ok(s) => s,
            Err(e) => {
                // Nothing was running before: leave nothing behind either.
                if fresh {
                    remove_pins(&dir);
                }
                return Err(e);
            }
        };
        info!(
            instance,
            interface = %cfg.agent.interface,
            ?start,
            mtu,
            vips = cfg.vips.len(),
            ms = t.elapsed().as_millis() as u64,
            "data plane ready"
        );
        let (checker, reports) = Checker::spawn()?;
        let mut agent = Agent {
            instance: instance.into(),
            config_path: config_path.into(),
            cfg,
            eff,
            view,
            checker,
            reports,
            health: BTreeMap::new(),
            ramp: BTreeMap::new(),
            modes: BTreeMap::new(),
            unresolved_seen: BTreeMap::new(),
            events: events::Events::default(),
            metrics: crate::metrics::Metrics::default(),
            dp,
            applied,
            mtu,
            start,
            bgp: None,
            lock: Some(lock),
        };
        agent.sync_checks(false);
        agent.sync_bgp()?;
        Ok(agent)
    }

    /// The config to run for the operator's `cfg`: completed from the kernel (next hops,
    /// outer source), then from health (down backends, backups, panic, slow start).
    fn compose(&mut self, cfg: &Config, wait: Duration) -> Result<Config> {
        let last = effective::macs_in(&self.applied);
        let mut eff = self.view.effective(cfg, &last, wait)?;
        let seen = self
            .health
            .iter()
            .map(|(id, h)| {
                let s = policy::Seen {
                    up: h.up,
                    ramp_from: self.ramp.get(id).copied(),
                };
                (id.clone(), s)
            })
            .collect();
        let modes = policy::apply(&mut eff, &seen, Instant::now());
        for (vip, m) in &modes {
            let was = self.modes.get(vip).copied().unwrap_or_default();
            if m.panic != was.panic {
                let (what, why) = if m.panic {
                    ("panic", "fewer primaries pass their checks than panic_threshold: all of them take new flows")
                } else {
                    ("panic_over", "enough primaries pass their checks again")
                };
                self.events.push(vip, None, what, why);
            }
            if m.backups != was.backups {
                let (what, why) = if m.backups {
                    ("backups_serve", "no primary passes its checks")
                } else {
                    ("primaries_serve", "a primary passes its checks again")
                };
                self.events.push(vip, None, what, why);
            }
        }
        self.modes = modes;
        self.next_hop_events(cfg);
        Ok(eff)
    }

    /// A backend that lost its next hop, or found one again: an event for each of its VIPs.
    fn next_hop_events(&mut self, cfg: &Config) {
        let now = &self.view.unresolved;
        let mut news = Vec::new();
        for (addr, why) in now {
            if self.unresolved_seen.get(addr) != Some(why) {
                news.push((*addr, "unresolved", why.clone()));
            }
        }
        for addr in self.unresolved_seen.keys() {
            if !now.contains_key(addr) {
                news.push((*addr, "resolved", "a next hop answers again".to_string()));
            }
        }
        self.unresolved_seen = now.clone();
        for (addr, what, why) in news {
            for v in cfg
                .vips
                .iter()
                .filter(|v| v.backends.iter().any(|b| b.address == addr))
            {
                self.events.push(&v.name, Some(addr), what, &why);
            }
        }
    }

    /// Tell the checker what to check, from the operator's config: every backend whose
    /// check is not `none`. Records of backends no longer checked go; a backend added
    /// while the agent runs starts its slow start (`ramp_new`).
    fn sync_checks(&mut self, ramp_new: bool) {
        let now = Instant::now();
        let mut targets = BTreeMap::new();
        for v in &self.cfg.vips {
            let key = reconcile::vip_key(v);
            for (i, b) in v.backends.iter().enumerate() {
                let at = format!("{}.backends[{i}]", v.field());
                let Ok(check) = crate::config::health::check_of(v, b, &at) else {
                    continue; // validated before: cannot happen
                };
                if check.kind == CheckKind::None {
                    continue;
                }
                let id: TargetId = (v.name.clone(), b.address);
                let (dst, mark) = match check.via {
                    Via::Direct => (SocketAddr::new(b.address, check.port), None),
                    Via::Tunnel => {
                        let Some(member) = self.applied.member_id(&key, &b.address) else {
                            continue;
                        };
                        (
                            SocketAddr::new(v.address, check.port),
                            Some(lb_common::HC_MARK | member),
                        )
                    }
                };
                let h = self.health.entry(id.clone()).or_insert_with(|| {
                    if ramp_new && v.slow_start_s > 0 {
                        self.ramp.insert(id.clone(), now);
                    }
                    BackendHealth::new(true, now)
                });
                let probe = Probe { check, dst, mark };
                targets.insert(id, Target { probe, up: h.up });
            }
        }
        self.health.retain(|id, _| targets.contains_key(id));
        self.ramp.retain(|id, _| targets.contains_key(id));
        self.checker.set(targets);
    }

    /// Take in the checker's results so far; if a state changed, apply it (only the rings
    /// of the VIPs concerned change; several changes, one pass).
    pub fn drain_reports(&mut self) {
        let mut changed = false;
        for r in self.reports.take() {
            changed |= self.on_report(r);
        }
        if changed {
            self.rerun("health");
        }
    }

    /// One check result. A state change is logged with its reason and becomes an event;
    /// returns whether the state changed.
    fn on_report(&mut self, r: Report) -> bool {
        let now = r.at;
        let Some(h) = self.health.get_mut(&r.id) else {
            return false; // no longer checked
        };
        h.record(r.up, r.changed, &r.result, r.latency, now);
        let backend = r.id.1.to_string();
        self.metrics.checked(&r.id.0, &backend, r.latency);
        if !r.changed {
            return false;
        }
        self.metrics.changed(&r.id.0, &backend, r.up);
        let (vip, addr) = r.id.clone();
        let reason = h.reason.clone();
        let slow = self.cfg.vip(&vip).is_some_and(|v| v.slow_start_s > 0);
        if r.up && slow {
            self.ramp.insert(r.id.clone(), now);
        }
        self.events
            .push(&vip, Some(addr), if r.up { "up" } else { "down" }, &reason);
        true
    }

    /// Compose the running config again and apply what differs (health, next hops, a slow
    /// start's next step).
    fn rerun(&mut self, why: &str) {
        let t = Instant::now();
        let cfg = self.cfg.clone();
        let eff = match self.compose(&cfg, Duration::ZERO) {
            Ok(e) => e,
            Err(e) => {
                error!(error = %format!("{e:#}"), why, "composing the running config");
                return;
            }
        };
        if eff == self.eff {
            return;
        }
        match reconcile::reconcile(&mut self.dp, &eff, &mut self.applied, self.mtu) {
            Ok(changes) => {
                self.eff = eff;
                log_changes(&changes, why, Some(t.elapsed()));
            }
            Err(e) => error!(error = %format!("{e:#}"), why, "applying"),
        }
        self.sync_bgp_logged();
    }

    /// Start, reconfigure or stop BIRD as `[bgp]` says, and announce exactly the VIP
    /// addresses that have a healthy backend in what runs (`eff`).
    fn sync_bgp(&mut self) -> Result<()> {
        match (&self.cfg.bgp, self.bgp.as_mut()) {
            (None, None) => return Ok(()),
            (None, Some(_)) => {
                self.bgp = None; // stops BIRD: the routers withdraw everything
                self.events
                    .push("-", None, "bgp stopped", "[bgp] removed from the config");
                return Ok(());
            }
            (Some(c), None) => self.bgp = Some(crate::bgp::Speaker::start(c, &self.instance)?),
            (Some(c), Some(s)) => s.reconfigure(c)?,
        }
        let health = &self.health;
        let want = crate::bgp::wanted(&self.eff, |vip, addr| {
            health
                .get(&(vip.to_string(), addr))
                .is_none_or(|h| h.up && h.last.is_some())
        });
        let speaker = self.bgp.as_mut().expect("started above");
        let (added, removed) = speaker.announce(&want)?;
        for a in added {
            self.events.push(
                &want[&a].join(","),
                None,
                "announced",
                &format!("{a}: a VIP on it has a healthy backend"),
            );
        }
        for a in removed {
            let names: Vec<String> = self
                .cfg
                .vips
                .iter()
                .filter(|v| v.address == a)
                .map(|v| v.name.clone())
                .collect();
            let why = if names.is_empty() {
                format!("{a}: no VIP on it any more")
            } else {
                format!("{a}: no VIP on it has a healthy backend")
            };
            let label = if names.is_empty() {
                a.to_string()
            } else {
                names.join(",")
            };
            self.events.push(&label, None, "withdrawn", &why);
        }
        Ok(())
    }

    fn sync_bgp_logged(&mut self) {
        if let Err(e) = self.sync_bgp() {
            error!(error = %format!("{e:#}"), "bgp");
        }
    }

    /// A Prometheus scrape: the data plane's counters and the health state, now.
    pub fn metrics_text(&self) -> String {
        use crate::metrics::{BackendSnap, Snapshot, VipSnap};
        let now = Instant::now();
        let mut snap = Snapshot::default();
        if let Ok(counts) = self.dp.reason_counts() {
            snap.reasons = lb_common::Reason::ALL
                .iter()
                .map(|r| (r.name(), counts[*r as usize]))
                .collect();
        }
        if let Ok(c) = self.dp.hc_counts() {
            let names = [
                "pass",
                "sent",
                "sent_l2",
                "drop_no_backend",
                "drop_malformed",
                "drop_helper",
            ];
            snap.probes = names.iter().zip(c).map(|(n, v)| (*n, v)).collect();
        }
        for v in &self.cfg.vips {
            let key = reconcile::vip_key(v);
            let Some(a) = self.applied.vips.get(&key) else {
                continue;
            };
            let mode = self.modes.get(&v.name).copied().unwrap_or_default();
            let ran = self.eff.vip(&v.name);
            let mut healthy = 0;
            for b in &v.backends {
                let h = self.health.get(&(v.name.clone(), b.address));
                healthy += h.is_none_or(|h| h.up) as u64;
                let in_ring = ran
                    .and_then(|r| r.backends.iter().find(|x| x.address == b.address))
                    .is_some_and(|x| x.active());
                let counters = self
                    .applied
                    .member_id(&key, &b.address)
                    .and_then(|id| self.dp.backend_counters(id).ok())
                    .map(Into::into)
                    .unwrap_or_default();
                snap.backends.push(BackendSnap {
                    vip: v.name.clone(),
                    backend: b.address.to_string(),
                    counters,
                    up: h.map(|h| h.up),
                    in_ring,
                    availability: h.map(|h| h.availability(now)),
                });
            }
            snap.vips.push(VipSnap {
                vip: v.name.clone(),
                counters: self
                    .dp
                    .vip_counters(a.meta.id)
                    .map(Into::into)
                    .unwrap_or_default(),
                panic: mode.panic,
                backups_serving: mode.backups,
                healthy,
                backends: v.backends.len() as u64,
            });
        }
        snap.bgp = self.bgp_status().map(|b| {
            (
                b.announced.iter().map(ToString::to_string).collect(),
                b.sessions
                    .iter()
                    .map(|n| (n.neighbor.to_string(), n.state == "up"))
                    .collect(),
            )
        });
        self.metrics.render(snap)
    }

    /// Every second: slow starts take their next step, next hops are re-validated.
    pub fn tick(&mut self) {
        self.drain_reports();
        if let Err(e) = self.view.refresh() {
            error!(error = %format!("{e:#}"), "re-validating next hops");
        }
        let now = Instant::now();
        let cfg = &self.cfg;
        self.ramp.retain(|(vip, _), from| {
            let total = cfg.vip(vip).map_or(0, |v| v.slow_start_s);
            now.saturating_duration_since(*from)
                < Duration::from_secs(total.into()) + Duration::from_secs(1)
        });
        if self.modes.values().any(|m| m.ramping) {
            self.rerun("slow start");
        }
        self.end_drains();
        if let Some(b) = &mut self.bgp {
            b.tick();
        }
        // A first passing check changes no state but may allow an announcement.
        self.sync_bgp_logged();
    }

    /// Backends whose drain timeout has passed leave their VIP (written to the file).
    fn end_drains(&mut self) {
        let now = handle::unix_now();
        let mut cfg = self.cfg.clone();
        let mut done = Vec::new();
        for v in &mut cfg.vips {
            v.backends.retain(|b| {
                let over = b.drain && b.drain_until.is_some_and(|t| t <= now);
                if over {
                    done.push((v.name.clone(), b.address));
                }
                !over
            });
        }
        if done.is_empty() {
            return;
        }
        match self.apply(cfg, true, "drain timeout") {
            Ok(_) => {
                for (vip, addr) in done {
                    self.events.push(
                        &vip,
                        Some(addr),
                        "drain_done",
                        "drain timeout over: removed",
                    );
                }
            }
            Err(e) => error!(error = %format!("{e:#}"), "removing backends whose drain ended"),
        }
    }

    /// Let go of the instance (at exit): the lock file goes, the data plane stays.
    pub fn release(&mut self) {
        // BIRD goes first: the routers withdraw this host before it stops answering.
        self.bgp = None;
        if let Some(l) = self.lock.take() {
            l.release();
        }
    }

    /// Validate, apply, then persist; on any failure the maps go back to the old config.
    /// New sizes migrate the data plane; a new interface moves the program there.
    fn apply(&mut self, new: Config, persist: bool, why: &str) -> Result<Changes> {
        new.validate().map_err(|e| anyhow!("{e}"))?;
        if let Some(b) = &new.bgp {
            crate::bgp::check_binary(&b.bird)?;
        }
        let dir = pin_dir(&self.instance);
        let moved = new.agent.interface != self.cfg.agent.interface;
        let mtu = if moved {
            interface_mtu(&new.agent.interface)?
        } else {
            self.mtu
        };
        let eff = self.compose(&new, RESOLVE_WAIT)?;
        if sizes(&new).normalized() != self.dp.sizes {
            return self.migrate_to(new, eff, mtu, persist, why);
        }
        let old = self.eff.clone();
        let result = reconcile::reconcile(&mut self.dp, &eff, &mut self.applied, mtu)
            .and_then(|c| {
                if moved {
                    let how =
                        pins::attach(&mut self.dp, &dir, &new.agent.interface, new.agent.xdp_mode)?;
                    log_attached(&how);
                }
                Ok(c)
            })
            .and_then(|c| {
                if persist {
                    new.save(&self.config_path).map(|_| c)
                } else {
                    Ok(c)
                }
            });
        match result {
            Ok(changes) => {
                self.cfg = new;
                self.eff = eff;
                self.mtu = mtu;
                log_changes(&changes, why, None);
                self.sync_checks(true);
                self.sync_bgp_logged();
                Ok(changes)
            }
            Err(e) => {
                if let Err(e2) =
                    reconcile::reconcile(&mut self.dp, &old, &mut self.applied, self.mtu)
                {
                    error!(error = %e2, "rolling back to the previous config failed");
                }
                Err(e)
            }
        }
    }

    /// New map sizes in a running agent: migrate to maps of those sizes (see `migrate`).
    fn migrate_to(
        &mut self,
        new: Config,
        eff: Config,
        mtu: u32,
        persist: bool,
        why: &str,
    ) -> Result<Changes> {
        let dir = pin_dir(&self.instance);
        let sizes = sizes(&new);
        // A migration of this agent's that could not rename its pins is finished first.
        migrate::recover(&dir, pins::link_program_maps(&dir)?)?;
        let Pins::Differ { pinned, changes } = pinned::inspect(&dir, &sizes)? else {
            bail!("the pinned maps already have the new sizes");
        };
        info!(why, ?changes, "new map sizes: migrating");
        let (iface, mode) = (new.agent.interface.clone(), new.agent.xdp_mode);
        let (dp, applied, report) = migrate::migrate(&dir, &pinned, &eff, sizes, mtu, |dp| {
            log_attached(&pins::attach(dp, &dir, &iface, mode)?);
            Ok(())
        })?;
        log_migrated(&report);
        // The new maps run now, whatever follows.
        self.dp = dp;
        self.applied = applied;
        self.mtu = mtu;
        self.cfg = new.clone();
        self.eff = eff;
        self.sync_checks(true);
        self.sync_bgp_logged();
        if persist {
            new.save(&self.config_path)?;
        }
        Ok(Changes {
            migrated: true,
            rings_rebuilt: self.applied.vips.len(),
            ..Default::default()
        })
    }

    /// Routes, neighbours or addresses changed: compose again and apply what differs (a
    /// next-hop MAC, a backend resolved or lost, a new interface address).
    pub fn kernel_changed(&mut self) {
        self.rerun("next hops");
    }

    pub fn reload(&mut self) {
        match Config::load(&self.config_path) {
            Ok(new) => match self.apply(new, false, "reload") {
                Ok(_) => info!(path = %self.config_path.display(), "config reloaded"),
                Err(e) => error!(error = %format!("{e:#}"), "reload refused; running config kept"),
            },
            Err(e) => error!(error = %format!("{e:#}"), "reload refused; running config kept"),
        }
    }
}

/// `took`: from the decision to the maps written (the new rings live), where it is timed.
fn log_changes(c: &Changes, why: &str, took: Option<Duration>) {
    if c.is_empty() {
        info!(why, "no change to the maps");
        return;
    }
    info!(
        why,
        ms = took.map(|t| format!("{:.1}", t.as_secs_f64() * 1e3)),
        vips_added = ?c.vips_added,
        vips_updated = ?c.vips_updated,
        vips_removed = c.vips_removed,
        migrated = c.migrated,
        backends_added = ?c.backends_added,
        backends_removed = ?c.backends_removed,
        rings_rebuilt = c.rings_rebuilt,
        "maps updated"
    );
}

fn log_attached(how: &Attached) {
    match how {
        Attached::Fresh => info!("program attached"),
        Attached::Swapped => info!("program swapped into the pinned link"),
        Attached::Moved { from } => info!(from = %from, "program moved to the new interface"),
    }
}

fn log_migrated(r: &migrate::Report) {
    info!(
        conns_copied = r.conns_copied,
        conns_late = r.conns_late,
        conns_dropped = r.conns_dropped,
        "migrated to the new maps"
    );
    for p in &r.problems {
        error!(problem = %p, "after the program swap (the new maps run; the next start finishes)");
    }
    if r.conns_dropped > 0 {
        tracing::warn!(
            dropped = r.conns_dropped,
            "the new connection table is smaller than the old one's entries: the least \
             recently used were not copied (their flows follow the ring)"
        );
    }
}
