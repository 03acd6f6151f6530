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

use crate::{
    config::Config,
    dataplane::{
        pinned::{self, Pins},
        Dataplane, Sizes,
    },
    migrate,
    reconcile::{self, Applied, Changes},
};

mod effective;
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
    /// What the data plane runs: `cfg` completed from the kernel (see `effective`).
    pub(crate) eff: Config,
    pub(crate) view: effective::KernelView,
    pub(crate) dp: Dataplane,
    pub(crate) applied: Applied,
    pub(crate) mtu: u32,
    /// How this agent found the data plane at start.
    pub(crate) start: Start,
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
                    let eff = view.effective(&cfg, &effective::macs_in(&applied), RESOLVE_WAIT)?;
                    let changes = reconcile::reconcile(&mut dp, &eff, &mut applied, mtu)?;
                    log_attached(&how);
                    log_changes(&changes, "start");
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
                    let eff = view.effective(&cfg, &last, RESOLVE_WAIT)?;
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
        Ok(Agent {
            instance: instance.into(),
            config_path: config_path.into(),
            cfg,
            eff,
            view,
            dp,
            applied,
            mtu,
            start,
            lock: Some(lock),
        })
    }

    /// Let go of the instance (at exit): the lock file goes, the data plane stays.
    pub fn release(&mut self) {
        if let Some(l) = self.lock.take() {
            l.release();
        }
    }

    /// Validate, apply, then persist; on any failure the maps go back to the old config.
    /// New sizes migrate the data plane; a new interface moves the program there.
    fn apply(&mut self, new: Config, persist: bool, why: &str) -> Result<Changes> {
        new.validate().map_err(|e| anyhow!("{e}"))?;
        let dir = pin_dir(&self.instance);
        let moved = new.agent.interface != self.cfg.agent.interface;
        let mtu = if moved {
            interface_mtu(&new.agent.interface)?
        } else {
            self.mtu
        };
        let eff = self
            .view
            .effective(&new, &effective::macs_in(&self.applied), RESOLVE_WAIT)?;
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
                log_changes(&changes, why);
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
        if persist {
            new.save(&self.config_path)?;
        }
        Ok(Changes {
            migrated: true,
            rings_rebuilt: self.applied.vips.len(),
            ..Default::default()
        })
    }

    /// Routes, neighbours or addresses changed: complete the config again and apply what
    /// differs (a next-hop MAC, a backend resolved or lost, a new interface address).
    pub fn kernel_changed(&mut self) {
        let last = effective::macs_in(&self.applied);
        let eff = match self.view.effective(&self.cfg, &last, Duration::ZERO) {
            Ok(e) => e,
            Err(e) => {
                error!(error = %format!("{e:#}"), "after a route/neighbour change");
                return;
            }
        };
        if eff == self.eff {
            return;
        }
        match reconcile::reconcile(&mut self.dp, &eff, &mut self.applied, self.mtu) {
            Ok(changes) => {
                self.eff = eff;
                log_changes(&changes, "next hops");
            }
            Err(e) => error!(error = %format!("{e:#}"), "applying next-hop changes"),
        }
    }

    /// Ask the kernel to re-validate every next hop (periodically).
    pub fn refresh_next_hops(&mut self) {
        if let Err(e) = self.view.refresh() {
            error!(error = %format!("{e:#}"), "re-validating next hops");
        }
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

fn log_changes(c: &Changes, why: &str) {
    if c.is_empty() {
        info!(why, "no change to the maps");
        return;
    }
    info!(
        why,
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
