//! HAProxy, the baseline of the `health` and `haproxy` suites: started in a namespace as
//! a child process (`haproxy -db`), killed when its guard goes.
use std::{
    fs,
    path::Path,
    process::{Child, Command, Stdio},
};

use anyhow::{Context, Result};

/// A running HAProxy; killed and reaped on drop.
pub struct Haproxy(pub Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Haproxy {
    /// `ip netns exec NETNS haproxy -db -f CONFIG`, its stderr to `log`.
    pub fn start(netns: &str, config: &Path, log: &Path) -> Result<Haproxy> {
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "haproxy", "-db", "-f"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(log)?)
            .spawn()
            .context("haproxy")?;
        Ok(Haproxy(child))
    }
}

/// The version in `haproxy -v`'s first line ("HAProxy version 2.6.12-1+deb12u4 ...").
pub fn version() -> Result<String> {
    let v = Command::new("haproxy")
        .arg("-v")
        .output()
        .context("haproxy (scripts/setup.sh installs it)")?;
    let text = String::from_utf8_lossy(&v.stdout);
    let first = text.lines().next().unwrap_or("");
    Ok(first.split_whitespace().nth(2).unwrap_or(first).to_string())
}
