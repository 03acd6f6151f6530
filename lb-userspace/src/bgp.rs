//! Announcing the VIPs by BGP, so that several LB hosts can stand behind routers that
//! spread flows over them (ECMP). The agent runs BIRD 2 (Debian's `bird2`) as its child:
//! it writes BIRD's configuration, and one static route per VIP address that has at least
//! one healthy backend; BIRD exports those to every neighbour with this host as the next
//! hop. When the set changes the agent rewrites the route files and asks BIRD to reload
//! (`birdc configure`: sessions stay up, only the routes change).
//!
//! Withdrawal, in every case:
//! - a VIP address whose VIPs have no healthy backend left, or that is removed: its route
//!   leaves the file, BIRD withdraws it;
//! - the agent stops (`lb agent --stop`, SIGTERM) or dies (`kill -9`, a crash): BIRD is
//!   started with `PR_SET_PDEATHSIG` = SIGKILL, so it dies with the agent; its sessions'
//!   TCP connections close and the routers withdraw this host's routes at once;
//! - the host or its link goes (nothing left to close the sessions): BFD with every
//!   neighbour (100 ms x 3 by default), and the BGP hold timer (3 s) where BFD is off.
//!
//! A restarted agent starts a new BIRD, which announces again once its sessions are up
//! (a second or two): meanwhile the routers send the flows to the other LB hosts, which
//! pick the same backends (identical rings), so established connections carry on.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    net::IpAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use tracing::{info, warn};

use crate::config::{bgp::BgpConfig, Config};

/// Fail unless `bird` names an executable (a path, or a name found in `PATH`): checked
/// before the agent touches the data plane, so a missing BIRD changes nothing.
pub fn check_binary(bird: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let exec = |p: &Path| {
        fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let found = if bird.contains('/') {
        exec(Path::new(bird))
    } else {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| exec(&d.join(bird))))
            .unwrap_or(false)
            || ["/usr/sbin", "/sbin"]
                .iter()
                .any(|d| exec(&Path::new(d).join(bird)))
    };
    if !found {
        bail!("bgp.bird: {bird:?} is not an executable (install Debian's bird2: scripts/setup.sh)");
    }
    Ok(())
}

/// The addresses to announce: those with at least one VIP that has a backend in its ring
/// which is also `healthy(vip, backend)` (has passed a check, or is not checked: a ring
/// in panic mode, or an agent that has not checked yet, announces nothing), and the names
/// of the VIPs on each.
pub fn wanted(
    eff: &Config,
    healthy: impl Fn(&str, IpAddr) -> bool,
) -> BTreeMap<IpAddr, Vec<String>> {
    let mut out: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
    for v in &eff.vips {
        if v.backends
            .iter()
            .any(|b| b.active() && healthy(&v.name, b.address))
        {
            out.entry(v.address).or_default().push(v.name.clone());
        }
    }
    out
}

/// BIRD's configuration for `cfg`, reading its routes from `dir` (BIRD takes `include`
/// only at the start of a line).
pub fn bird_config(cfg: &BgpConfig, dir: &Path) -> String {
    let mut c = String::new();
    let _ = writeln!(
        c,
        "# Written by the lb agent at every start and change: edit the agent's [bgp] instead.\n\
         router id {};\n\
         log stderr all;\n\
         protocol device {{ }}\n\
         protocol static vips4 {{\n  ipv4;\n  include \"{}\";\n}}\n\
         protocol static vips6 {{\n  ipv6;\n  include \"{}\";\n}}",
        cfg.router_id(),
        dir.join("vips4.conf").display(),
        dir.join("vips6.conf").display(),
    );
    if cfg.bfd {
        let _ = writeln!(
            c,
            "protocol bfd {{ interface \"*\" {{ interval {} ms; multiplier 3; }}; }}",
            cfg.bfd_interval_ms
        );
    }
    for n in &cfg.neighbors {
        let _ = writeln!(
            c,
            "protocol bgp {} {{\n  local {} as {};\n  neighbor {} as {};\n  \
             hold time {}; keepalive time {};\n  connect delay time 1; connect retry time 1; \
             error wait time 1, 5;\n  bfd {};\n  \
             ipv4 {{ import none; export where proto = \"vips4\"; next hop self; }};",
            session_name(n.address),
            cfg.next_hop,
            cfg.local_asn,
            n.address,
            n.asn,
            cfg.hold_time_s,
            (cfg.hold_time_s / 3).max(1),
            if cfg.bfd { "on" } else { "off" },
        );
        if let Some(v6) = cfg.next_hop_v6 {
            let _ = writeln!(
                c,
                "  ipv6 {{ import none; export where proto = \"vips6\"; next hop address {v6}; }};"
            );
        }
        let _ = writeln!(c, "}}");
    }
    c
}

/// BIRD's name of the session with `neighbor` (by address, not position: a neighbour added
/// or removed on reload leaves the others' sessions alone).
pub fn session_name(neighbor: std::net::Ipv4Addr) -> String {
    format!("n_{}", neighbor.to_string().replace('.', "_"))
}

/// The static routes of one family: one blackhole route per announced address (BIRD only
/// exports them; nothing on this host routes by them).
pub fn routes(addrs: &BTreeSet<IpAddr>, v6: bool) -> String {
    let mut s = String::new();
    for a in addrs.iter().filter(|a| a.is_ipv6() == v6) {
        let len = if v6 { 128 } else { 32 };
        let _ = writeln!(s, "route {a}/{len} blackhole;");
    }
    s
}

/// The BIRD this agent runs.
pub struct Speaker {
    cfg: BgpConfig,
    dir: PathBuf,
    child: Option<Child>,
    /// Announced now (in the route files BIRD last read).
    announced: BTreeSet<IpAddr>,
    /// A reload BIRD has not confirmed yet: try again at the next tick.
    pending: bool,
    last_start: Option<Instant>,
    /// Wait before starting a BIRD that died again.
    backoff: Duration,
    /// The sessions at the last tick.
    sessions: Vec<(String, String, String)>,
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

impl Speaker {
    /// Write the configuration (announcing nothing yet) and start BIRD.
    pub fn start(cfg: &BgpConfig, instance: &str) -> Result<Speaker> {
        let dir = crate::api::run_dir().join(format!("{instance}.bgp"));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut s = Speaker {
            cfg: cfg.clone(),
            dir,
            child: None,
            announced: BTreeSet::new(),
            pending: false,
            last_start: None,
            backoff: Duration::from_secs(1),
            sessions: Vec::new(),
        };
        s.write_files()?;
        s.spawn()?;
        Ok(s)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("bird.ctl")
    }

    pub fn announced(&self) -> &BTreeSet<IpAddr> {
        &self.announced
    }

    fn write_files(&self) -> Result<()> {
        write_atomic(
            &self.dir.join("vips4.conf"),
            &routes(&self.announced, false),
        )?;
        write_atomic(&self.dir.join("vips6.conf"), &routes(&self.announced, true))?;
        write_atomic(
            &self.dir.join("bird.conf"),
            &bird_config(&self.cfg, &self.dir),
        )
    }

    fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new(&self.cfg.bird);
        cmd.arg("-f")
            .arg("-c")
            .arg(self.dir.join("bird.conf"))
            .arg("-s")
            .arg(self.socket())
            // BIRD's log lines go where the agent's go.
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // BIRD dies with the agent (whatever kills it): its sessions close and the routers
        // withdraw this host. The agent's event loop runs on the main thread, whose exit
        // is the process's.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The agent may be gone already (between fork and prctl).
                if libc::getppid() == 1 {
                    return Err(std::io::Error::other("parent gone"));
                }
                Ok(())
            });
        }
        self.last_start = Some(Instant::now());
        let child = cmd.spawn().with_context(|| {
            format!(
                "bgp.bird: starting {:?} (Debian's bird2; scripts/setup.sh installs it)",
                self.cfg.bird
            )
        })?;
        info!(pid = child.id(), dir = %self.dir.display(), "bgp: BIRD started");
        self.child = Some(child);
        Ok(())
    }

    /// Announce exactly `want` (addresses with the names of their VIPs); returns what was
    /// announced and what withdrawn.
    pub fn announce(
        &mut self,
        want: &BTreeMap<IpAddr, Vec<String>>,
    ) -> Result<(Vec<IpAddr>, Vec<IpAddr>)> {
        let set: BTreeSet<IpAddr> = want.keys().copied().collect();
        let added: Vec<IpAddr> = set.difference(&self.announced).copied().collect();
        let removed: Vec<IpAddr> = self.announced.difference(&set).copied().collect();
        if added.is_empty() && removed.is_empty() && !self.pending {
            return Ok((added, removed));
        }
        // Until BIRD has the new files, a retry is due (`tick`): a failed write is not
        // forgotten.
        self.pending = true;
        let old = std::mem::replace(&mut self.announced, set);
        if let Err(e) = self.write_files() {
            self.announced = old;
            return Err(e);
        }
        self.reload();
        Ok((added, removed))
    }

    /// New neighbours, timers, ...: rewrite and reload.
    pub fn reconfigure(&mut self, cfg: &BgpConfig) -> Result<()> {
        if *cfg == self.cfg {
            return Ok(());
        }
        let bird_changed = cfg.bird != self.cfg.bird;
        self.cfg = cfg.clone();
        self.pending = true;
        self.write_files()?;
        if bird_changed {
            self.stop_child();
            self.spawn()?;
        } else {
            self.reload();
        }
        Ok(())
    }

    fn reload(&mut self) {
        match birdc(&self.socket(), &["configure"]) {
            // 0003 Reconfigured, 0004 Reconfiguration in progress (not "... ignored").
            Ok(out)
                if out.contains("Reconfigured") || out.contains("Reconfiguration in progress") =>
            {
                self.pending = false
            }
            Ok(out) => warn!(answer = out.trim(), "bgp: BIRD did not take the new routes"),
            // Not up yet: it reads the files when it starts.
            Err(e) => warn!(error = %format!("{e:#}"), "bgp: reloading BIRD"),
        }
    }

    /// Every second: restart BIRD if it died (backing off up to 30 s when it keeps dying),
    /// retry a reload BIRD has not confirmed, and read its sessions (what `lb status` and
    /// the metrics show: they never wait for BIRD themselves).
    pub fn tick(&mut self) {
        let exited = match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(st))) => Some(st.to_string()),
            Some(Err(e)) => Some(e.to_string()),
            Some(Ok(None)) => None,
            None => Some("not running".into()),
        };
        if let Some(why) = exited {
            // Reaped (or lost): never signal that pid again.
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
                warn!(why, "bgp: BIRD exited");
            }
            self.sessions.clear();
            if self.last_start.is_some_and(|t| t.elapsed() < self.backoff) {
                return;
            }
            self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
            if let Err(e) = self.spawn() {
                warn!(error = %format!("{e:#}"), "bgp: restarting BIRD");
            }
            return;
        }
        if self
            .last_start
            .is_some_and(|t| t.elapsed() > Duration::from_secs(60))
        {
            self.backoff = Duration::from_secs(1);
        }
        if self.pending {
            self.reload();
        }
        self.sessions = self.read_sessions();
    }

    /// Sessions as BIRD last reported them (at the last tick): (name, state, info).
    pub fn sessions(&self) -> Vec<(String, String, String)> {
        self.sessions.clone()
    }

    fn read_sessions(&self) -> Vec<(String, String, String)> {
        let Ok(out) = birdc(&self.socket(), &["show", "protocols"]) else {
            return Vec::new();
        };
        out.lines()
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                // Name Proto Table State Since Info
                (w.len() >= 4 && w[1] == "BGP").then(|| {
                    (
                        w[0].to_string(),
                        w[3].to_string(),
                        w.get(5..).map(|x| x.join(" ")).unwrap_or_default(),
                    )
                })
            })
            .collect()
    }

    /// Stop BIRD (the agent is stopping): the routers withdraw this host at once.
    pub fn stop(&mut self) {
        self.stop_child();
        let _ = fs::remove_dir_all(&self.dir);
    }

    fn stop_child(&mut self) {
        if let Some(mut c) = self.child.take() {
            if !matches!(c.try_wait(), Ok(None)) {
                return; // gone already (and now reaped)
            }
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(2) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Speaker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One `birdc` command on BIRD's socket; its answer. Killed after a second: the agent's
/// event loop must never hang on a BIRD that accepts but does not answer.
pub fn birdc(socket: &Path, args: &[&str]) -> Result<String> {
    use std::io::Read;
    let mut child = Command::new("birdc")
        .arg("-s")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("running birdc (Debian's bird2)")?;
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t.elapsed() > Duration::from_secs(1) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("birdc {}: no answer from BIRD within 1 s", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let mut text = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut text);
    }
    if !status.success() || text.contains("Unable to connect") {
        bail!("birdc {}: {}", args.join(" "), text.trim());
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn cfg(text: &str) -> Config {
        let c = Config::parse(text).unwrap();
        c.validate().unwrap();
        c
    }

    const TEXT: &str = r#"
[agent]
interface = "eth0"
[bgp]
local_asn = 65001
next_hop = "198.18.0.2"
next_hop_v6 = "2001:db8::2"
[[bgp.neighbor]]
address = "198.18.0.1"
asn = 65000
[[vip]]
name = "a"
address = "198.18.10.1"
port = 80
protocol = "tcp"
backends = [{ address = "198.18.0.11" }]
[[vip]]
name = "b"
address = "198.18.10.1"
port = 53
protocol = "udp"
backends = [{ address = "198.18.0.11", drain = true }]
[[vip]]
name = "c"
address = "2001:db8:10::1"
port = 80
protocol = "tcp"
backends = [{ address = "2001:db8::11", weight = 0 }]
"#;

    #[test]
    fn an_address_is_announced_while_one_of_its_vips_has_an_active_backend() {
        let c = cfg(TEXT);
        let w = wanted(&c, |_, _| true);
        // Nothing passes its checks (yet, or in panic mode): nothing is announced.
        assert!(wanted(&c, |_, _| false).is_empty());
        // a has an active backend; b's is draining; c's has weight 0: no route for c.
        assert_eq!(w.len(), 1);
        assert_eq!(w[&"198.18.10.1".parse::<IpAddr>().unwrap()], ["a"]);
        let set: BTreeSet<IpAddr> = ["198.18.10.1", "2001:db8:10::1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(routes(&set, false), "route 198.18.10.1/32 blackhole;\n");
        assert_eq!(routes(&set, true), "route 2001:db8:10::1/128 blackhole;\n");
    }

    #[test]
    fn birds_config_has_one_session_per_neighbour_exporting_only_the_vip_routes() {
        let c = cfg(TEXT);
        let text = bird_config(c.bgp.as_ref().unwrap(), Path::new("/run/lb/x.bgp"));
        for line in [
            "router id 198.18.0.2;",
            "  include \"/run/lb/x.bgp/vips4.conf\";",
            "protocol bfd { interface \"*\" { interval 100 ms; multiplier 3; }; }",
            "  local 198.18.0.2 as 65001;",
            "protocol bgp n_198_18_0_1 {",
            "  neighbor 198.18.0.1 as 65000;",
            "  hold time 3; keepalive time 1;",
            "  bfd on;",
            "  ipv4 { import none; export where proto = \"vips4\"; next hop self; };",
            "  ipv6 { import none; export where proto = \"vips6\"; next hop address 2001:db8::2; };",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
