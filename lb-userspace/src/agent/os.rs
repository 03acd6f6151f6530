//! What the agent needs from the operating system: root, bpffs, an interface's MTU, and
//! entering another network namespace.
use std::ffi::CString;

use anyhow::{bail, Context, Result};

/// Refuse early and clearly: everything below needs root.
pub fn require_root() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("permission denied: the lb agent and CLI need root");
    }
    Ok(())
}

/// Mount bpffs on /sys/fs/bpf if nothing is mounted there.
pub fn ensure_bpffs() -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let p = CString::new("/sys/fs/bpf").unwrap();
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(p.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    let fs = CString::new("bpf").unwrap();
    if unsafe { libc::mount(fs.as_ptr(), p.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) } != 0 {
        bail!(
            "mounting bpffs on /sys/fs/bpf: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Interface MTU from the kernel (SIOCGIFMTU), in the agent's network namespace.
pub fn interface_mtu(iface: &str) -> Result<u32> {
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if s < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, b) in req.ifr_name.iter_mut().zip(iface.bytes().take(15)) {
        *d = b as libc::c_char;
    }
    let r = unsafe { libc::ioctl(s, libc::SIOCGIFMTU, &mut req) };
    let err = std::io::Error::last_os_error();
    unsafe { libc::close(s) };
    if r != 0 {
        bail!("agent.interface {iface:?}: {err}");
    }
    Ok(unsafe { req.ifr_ifru.ifru_mtu } as u32)
}

/// Enter the network namespace `/run/netns/NAME` (only the network namespace: unlike
/// `ip netns exec`, /sys stays the host's, so pins stay visible to the next agent).
pub fn enter_netns(name: &str) -> Result<()> {
    let path = format!("/run/netns/{name}");
    let f = std::fs::File::open(&path).with_context(|| format!("--netns: opening {path}"))?;
    use std::os::fd::AsRawFd;
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "--netns: setns({path}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
