//! The life of what the agent leaves in the kernel: the program, its link and every map,
//! pinned under `/sys/fs/bpf/<instance>/`. Attach or adopt at start, detach and unpin at
//! `lb agent --stop`.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use aya::programs::{links::FdLink, links::PinnedLink, xdp::XdpLink, XdpMode as AyaXdpMode};
use tracing::{info, warn};

use super::os::{ensure_bpffs, require_root};
use crate::{
    api::{self, Request},
    config::XdpMode,
    dataplane::{Dataplane, MAP_NAMES},
};

pub fn pin_dir(instance: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/{instance}"))
}

/// Attach `lb` to the interface, or, if a link is pinned from an earlier run, swap the
/// freshly loaded program into that link (atomic: BPF_LINK_UPDATE). Returns true if adopted.
pub fn attach_or_adopt(dp: &mut Dataplane, dir: &Path, iface: &str, mode: XdpMode) -> Result<bool> {
    let link_pin = dir.join("link");
    let prog = dp.program("lb")?;
    let adopted = if link_pin.exists() {
        let pinned = PinnedLink::from_pin(&link_pin).context("opening the pinned link")?;
        let link =
            XdpLink::try_from(FdLink::from(pinned)).context("pinned link is not an XDP link")?;
        let id = prog
            .attach_to_link(link)
            .context("replacing the program in the pinned link")?;
        // The pin keeps the link; our handle may go.
        drop(prog.take_link(id)?);
        true
    } else {
        let try_mode = |prog: &mut aya::programs::Xdp, m| prog.attach(iface, m);
        let id = match mode {
            XdpMode::Native => try_mode(prog, AyaXdpMode::Driver),
            XdpMode::Skb => try_mode(prog, AyaXdpMode::Skb),
            XdpMode::Auto => try_mode(prog, AyaXdpMode::Driver).or_else(|e| {
                warn!(error = %e, "native XDP refused, falling back to generic (skb) mode");
                try_mode(prog, AyaXdpMode::Skb)
            }),
        }
        .with_context(|| format!("attaching lb to agent.interface {iface:?}"))?;
        let link =
            FdLink::try_from(prog.take_link(id)?).context("XDP attached without a bpf_link")?;
        link.pin(&link_pin).context("pinning the link")?;
        false
    };
    let prog_pin = dir.join("lb");
    let _ = std::fs::remove_file(&prog_pin);
    dp.program("lb")?
        .pin(&prog_pin)
        .context("pinning the program")?;
    Ok(adopted)
}

/// Detach the data plane and remove every pin of an instance.
pub fn stop(instance: &str) -> Result<()> {
    require_root()?;
    ensure_bpffs()?;
    if api::socket_path(instance).exists() {
        if api::call(instance, &Request::Shutdown).is_ok() {
            // Give it a moment to let go of the socket.
            for _ in 0..50 {
                if !api::socket_path(instance).exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_file(api::socket_path(instance));
    }
    let dir = pin_dir(instance);
    let link = dir.join("link");
    if link.exists() {
        let pinned = PinnedLink::from_pin(&link).context("opening the pinned link")?;
        drop(pinned.unpin().context("unpinning the link")?); // last reference: detaches
    }
    remove_pins(&dir);
    if dir.exists() {
        bail!("could not remove {}", dir.display());
    }
    info!(instance, "data plane detached and unpinned");
    Ok(())
}

/// Remove the map and program pins of an instance and its directory (not the link).
pub fn remove_pins(dir: &Path) {
    for name in MAP_NAMES.iter().chain(&["lb"]) {
        let _ = std::fs::remove_file(dir.join(name));
    }
    let _ = std::fs::remove_dir(dir);
}
