//! Earlier releases of `lb`, built from this repository's history, to upgrade from in tests:
//! a layout migration is only proven by running the old program on its own maps and then
//! starting this build on them.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

/// The first release (pinned maps of layout version 1, no `LAYOUT` map).
pub const V1: &str = "c46e6829f9da8fc0f0605938a58dfc203d8447cb";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The `lb` binary of `commit`, built once under `target/legacy/<commit>/` (about two
/// minutes the first time: its own dependencies, its own BPF object).
pub fn lb_at(commit: &str) -> Result<PathBuf> {
    let base = root().join("target/legacy").join(&commit[..12]);
    let bin = base.join("target/release/lb");
    if bin.exists() {
        return Ok(bin);
    }
    std::fs::create_dir_all(&base)?;
    // One build at a time (tests run in parallel).
    let lock = std::fs::File::create(base.join(".lock"))?;
    use std::os::fd::AsRawFd;
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!("locking {}", base.display());
    }
    if bin.exists() {
        return Ok(bin);
    }
    let src = base.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src)?;
    let archive = Command::new("git")
        .current_dir(root())
        .args(["archive", "--format=tar", commit])
        .stdout(Stdio::piped())
        .spawn()
        .context("running git archive")?;
    let untar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(&src)
        .stdin(archive.stdout.unwrap())
        .status()?;
    if !untar.success() {
        bail!(
            "extracting release {commit} from git history failed: the tests need a clone with \
             history (not a shallow one)"
        );
    }
    eprintln!("legacy: building lb at {commit} (once)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(&src)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "lb-userspace",
            "--bin",
            "lb",
        ])
        .arg("--target-dir")
        .arg(base.join("target"))
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .output()
        .context("building the legacy lb")?;
    if !out.status.success() || !bin.exists() {
        bail!(
            "building lb at {commit} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(bin)
}
