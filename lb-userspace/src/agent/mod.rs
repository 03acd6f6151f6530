//! The long-lived agent: loads (or adopts) the data plane, keeps the maps equal to the
//! config file, answers the CLI, reloads on SIGHUP, exits on SIGTERM leaving the data plane
//! running. Everything it creates in the kernel is pinned under `/sys/fs/bpf/<instance>/`,
//! so a restarted (or upgraded) agent picks up the same maps and link and drops nothing.
//!
//! [`os`]: what it needs of the system; [`pins`]: the pinned program, link and maps;
//! [`handle`]: answering requests; [`run`]: the event loop.
use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{anyhow, Context, Result};
use tracing::{error, info};

use crate::{
    config::Config,
    dataplane::{Dataplane, Sizes},
    reconcile::{self, Applied, Changes},
};

mod handle;
pub mod os;
pub mod pins;
mod run;

pub use os::{ensure_bpffs, enter_netns, interface_mtu, require_root};
use pins::{attach_or_adopt, remove_pins};
pub use pins::{pin_dir, stop};
pub use run::run;

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
    pub(crate) cfg: Config,
    pub(crate) dp: Dataplane,
    pub(crate) applied: Applied,
    pub(crate) mtu: u32,
    pub(crate) adopted: bool,
}

impl Agent {
    pub fn start(config_path: &Path, instance: &str) -> Result<Agent> {
        require_root()?;
        let cfg = Config::load(config_path)?;
        ensure_bpffs()?;
        let dir = pin_dir(instance);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let fresh = !dir.join("link").exists();
        let started = (|| {
            let mtu = interface_mtu(&cfg.agent.interface)?;
            let mut dp = Dataplane::load_pinned(sizes(&cfg), Some(&dir))?;
            let adopted = attach_or_adopt(&mut dp, &dir, &cfg.agent.interface, cfg.agent.xdp_mode)?;
            Ok::<_, anyhow::Error>((mtu, dp, adopted))
        })();
        let (mtu, mut dp, adopted) = match started {
            Ok(s) => s,
            Err(e) => {
                // Nothing was running before: leave nothing behind either.
                if fresh {
                    remove_pins(&dir);
                }
                return Err(e);
            }
        };
        let mut applied = reconcile::adopt(&mut dp)?;
        let t = Instant::now();
        let changes = reconcile::reconcile(&mut dp, &cfg, &mut applied, mtu)?;
        info!(
            instance,
            interface = %cfg.agent.interface,
            adopted,
            mtu,
            vips = cfg.vips.len(),
            ms = t.elapsed().as_millis() as u64,
            "data plane ready{}",
            if adopted { " (adopted pinned maps and link)" } else { "" }
        );
        log_changes(&changes, "start");
        Ok(Agent {
            instance: instance.into(),
            config_path: config_path.into(),
            cfg,
            dp,
            applied,
            mtu,
            adopted,
        })
    }

    /// Validate, apply, then persist; on any failure the maps go back to the old config.
    fn apply(&mut self, new: Config, persist: bool, why: &str) -> Result<Changes> {
        new.validate().map_err(|e| anyhow!("{e}"))?;
        let old = self.cfg.clone();
        let result = reconcile::reconcile(&mut self.dp, &new, &mut self.applied, self.mtu)
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
        backends_added = ?c.backends_added,
        backends_removed = ?c.backends_removed,
        rings_rebuilt = c.rings_rebuilt,
        "maps updated"
    );
}
