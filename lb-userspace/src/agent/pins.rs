//! The life of what the agent leaves in the kernel: the program, its link and every map,
//! pinned under `/sys/fs/bpf/<instance>/`; and the lock that lets one agent at a time own
//! them. Attach, swap or move the program at start and on reload; detach and unpin at
//! `lb agent --stop`.
use std::{
    fs::File,
    io::{Read, Seek, Write},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::programs::{
    links::FdLink, links::PinnedLink, loaded_programs, xdp::XdpLink, XdpMode as AyaXdpMode,
};
use tracing::{info, warn};

use super::os::{ensure_bpffs, require_root};
use crate::{
    api::{self, Request},
    config::XdpMode,
    dataplane::{sys, Dataplane, MAP_NAMES},
    migrate,
};

pub fn pin_dir(instance: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/{instance}"))
}

pub fn lock_path(instance: &str) -> PathBuf {
    PathBuf::from(format!("/run/lb/{instance}.lock"))
}

/// Held for an agent's whole life (released by the kernel when the process ends, also by
/// `kill -9`): one agent per instance.
pub struct InstanceLock {
    _file: File,
    path: PathBuf,
}

/// Take the instance's lock, or say which agent holds it. With `wait`, wait up to that long
/// for it to be released. Whoever holds the lock may remove the file ([`InstanceLock::
/// release`]); a waiter that then wins the lock on the removed file notices and retries.
pub fn lock(instance: &str, wait: std::time::Duration) -> Result<InstanceLock> {
    use std::os::unix::fs::MetadataExt;
    let path = lock_path(instance);
    std::fs::create_dir_all(path.parent().unwrap())?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            let same = std::fs::metadata(&path).map(|m| m.ino()).ok() == Some(f.metadata()?.ino());
            if !same {
                continue; // removed by its last holder after we opened it
            }
            f.set_len(0)?;
            f.rewind()?;
            writeln!(f, "{}", std::process::id())?;
            return Ok(InstanceLock { _file: f, path });
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(err).with_context(|| format!("locking {}", path.display()));
        }
        if std::time::Instant::now() >= deadline {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            bail!(
                "another agent is running instance {instance:?} (pid {}): one agent per \
                 instance; stop it first (SIGTERM, or `lb agent --stop --instance {instance}` \
                 to also detach the data plane)",
                pid.trim()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

impl InstanceLock {
    /// Remove the lock file, then let go of the lock (at exit).
    pub fn release(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// How the program came to run on the interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attached {
    /// Attached for the first time (a new link).
    Fresh,
    /// Swapped into the pinned link (atomic: `BPF_LINK_UPDATE`): a restart or upgrade.
    Swapped,
    /// The config names another interface than the pinned link's: attached there, then
    /// the old link removed.
    Moved { from: String },
}

fn if_index(iface: &str) -> Result<u32> {
    let c = std::ffi::CString::new(iface)?;
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => bail!("agent.interface {iface:?}: no such interface"),
        i => Ok(i),
    }
}

fn if_name(index: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("ifindex {index}");
    }
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// The interface the pinned link of `dir` is attached to, as the kernel says.
pub fn attached_interface(dir: &Path) -> Result<Option<String>> {
    let link = dir.join("link");
    if !link.exists() {
        return Ok(None);
    }
    let fd = sys::obj_get(&link)?;
    Ok(Some(if_name(sys::xdp_link_ifindex(
        std::os::fd::AsFd::as_fd(&fd),
    )?)))
}

/// Ids of the maps the program in the pinned link uses.
pub fn link_program_maps(dir: &Path) -> Result<Option<Vec<u32>>> {
    let link = dir.join("link");
    if !link.exists() {
        return Ok(None);
    }
    let prog = FdLink::from(PinnedLink::from_pin(&link).context("opening the pinned link")?)
        .info()?
        .program_id();
    for p in loaded_programs() {
        // Another process's program may go while we list them: skip it.
        let Ok(p) = p else { continue };
        if p.id() == prog {
            return Ok(p.map_ids()?);
        }
    }
    Ok(None)
}

fn attach_new(dp: &mut Dataplane, iface: &str, mode: XdpMode) -> Result<FdLink> {
    let prog = dp.program("lb")?;
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
    FdLink::try_from(prog.take_link(id)?).context("XDP attached without a bpf_link")
}

/// Run `dp`'s `lb` program on `iface`: attach it (no link pinned yet), swap it into the
/// pinned link (same interface), or move it (the pinned link is on another interface:
/// attach to the new one first, then drop the old link, so the new interface never goes
/// without it and the old one stops being balanced).
pub fn attach(dp: &mut Dataplane, dir: &Path, iface: &str, mode: XdpMode) -> Result<Attached> {
    let link_pin = dir.join("link");
    let want = if_index(iface)?;
    let attached = if link_pin.exists() {
        let fd = sys::obj_get(&link_pin)?;
        let have = sys::xdp_link_ifindex(std::os::fd::AsFd::as_fd(&fd))?;
        if have == want {
            let pinned = PinnedLink::from_pin(&link_pin).context("opening the pinned link")?;
            let link = XdpLink::try_from(FdLink::from(pinned))
                .context("pinned link is not an XDP link")?;
            let prog = dp.program("lb")?;
            let id = prog
                .attach_to_link(link)
                .context("replacing the program in the pinned link")?;
            // The pin keeps the link; our handle may go.
            drop(prog.take_link(id)?);
            Attached::Swapped
        } else {
            let old =
                FdLink::from(PinnedLink::from_pin(&link_pin).context("opening the pinned link")?);
            let new = attach_new(dp, iface, mode)?;
            let tmp = dir.join("link_next");
            let _ = std::fs::remove_file(&tmp);
            drop(new.pin(&tmp).context("pinning the new link")?);
            std::fs::rename(&tmp, &link_pin).context("replacing the link pin")?;
            drop(old); // its pin is gone: the last reference, so it detaches
            Attached::Moved {
                from: if_name(have),
            }
        }
    } else {
        let link = attach_new(dp, iface, mode)?;
        drop(link.pin(&link_pin).context("pinning the link")?);
        Attached::Fresh
    };
    let prog_pin = dir.join("lb");
    let _ = std::fs::remove_file(&prog_pin);
    dp.program("lb")?
        .pin(&prog_pin)
        .context("pinning the program")?;
    attach_hc(dp, dir, iface)?;
    Ok(attached)
}

/// Put `hc_encap` on the egress of `iface` (a TCX link, pinned as `hclink`): swap the new
/// program into the pinned link, or move it if the interface changed, or attach it.
fn attach_hc(dp: &mut Dataplane, dir: &Path, iface: &str) -> Result<()> {
    use aya::programs::{tc::SchedClassifierLink, TcAttachType};
    let pin = dir.join("hclink");
    let want = if_index(iface)?;
    let prog = dp.hc_program()?;
    if pin.exists() {
        let fd = sys::obj_get(&pin)?;
        let have = sys::link_ifindex(std::os::fd::AsFd::as_fd(&fd), sys::LINK_TCX)?;
        if have == want {
            let link = SchedClassifierLink::try_from(FdLink::from(
                PinnedLink::from_pin(&pin).context("opening the pinned hclink")?,
            ))
            .context("the pinned hclink is not a TCX link")?;
            let id = prog
                .attach_to_link(link)
                .context("replacing hc_encap in the pinned hclink")?;
            drop(prog.take_link(id)?); // the pin keeps it
            return Ok(());
        }
        let old = PinnedLink::from_pin(&pin).context("opening the pinned hclink")?;
        drop(old.unpin().context("unpinning the old hclink")?); // last reference: detaches
    }
    let id = prog
        .attach(iface, TcAttachType::Egress)
        .with_context(|| format!("attaching hc_encap to the egress of {iface}"))?;
    let link = FdLink::try_from(prog.take_link(id)?).context("tc attached without a link")?;
    drop(link.pin(&pin).context("pinning the hclink")?);
    Ok(())
}

/// Detach the data plane and remove every pin of an instance.
pub fn stop(instance: &str) -> Result<()> {
    require_root()?;
    ensure_bpffs()?;
    if api::socket_path(instance).exists() && api::call(instance, &Request::Shutdown).is_ok() {
        info!(instance, "asked the running agent to exit");
    }
    // The agent lets go of its lock when it exits: only then may its pins go.
    let lock = lock(instance, std::time::Duration::from_secs(10))?;
    let _ = std::fs::remove_file(api::socket_path(instance));
    let dir = pin_dir(instance);
    for name in ["link", "hclink"] {
        let link = dir.join(name);
        if link.exists() {
            let pinned = PinnedLink::from_pin(&link).context("opening a pinned link")?;
            drop(pinned.unpin().context("unpinning a link")?); // last reference: detaches
        }
    }
    remove_pins(&dir);
    if dir.exists() {
        bail!("could not remove {}", dir.display());
    }
    lock.release();
    info!(instance, "data plane detached and unpinned");
    Ok(())
}

/// Remove the map and program pins of an instance, a migration's `next/`, and the
/// directory (not the link).
pub fn remove_pins(dir: &Path) {
    let next = migrate::staging(dir);
    for d in [next.as_path(), dir] {
        for name in MAP_NAMES.iter().chain(&["lb", "link_next", "hclink"]) {
            let _ = std::fs::remove_file(d.join(name));
        }
        let _ = std::fs::remove_dir(d);
    }
}
