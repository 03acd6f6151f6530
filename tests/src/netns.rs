//! Network namespaces, veth pairs and `lb agent` processes for integration tests.
//!
//! Everything here is a guard that removes what it made when dropped, also when the test
//! panics: [`Netns`] deletes its namespace, [`Agent`] kills its process and runs
//! `lb agent --stop` (no pins, socket or process left), [`TempDir`] removes its directory.
//! Names carry a prefix, the test process id and a counter, so tests running in parallel
//! (and test binaries running at the same time) never collide.
//!
//! - [`Netns::new`], [`Netns::ip`], [`Netns::exec`], [`Netns::sysctl`], [`Netns::mac`]
//! - [`veth_pair`]: a veth pair between two namespaces (or inside one), chosen MACs and
//!   addresses.
//! - [`in_netns`] / [`spawn_in_netns`]: run a closure on a fresh thread that has entered a
//!   namespace, e.g. to open sockets there (a socket stays in the namespace it was opened
//!   in, whichever thread uses it later).
//! - [`RawSocket`]: an `AF_PACKET` socket to send and receive whole Ethernet frames.
//! - [`lb_bin`], [`lb`]: the `lb` binary next to the test executable, and running it;
//!   [`find_bin`] for any other binary of this build.
//! - [`Process`]: a program started inside a namespace, killed when dropped.
use std::{
    ffi::CString,
    fs,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use lb_userspace::api::{self, Request};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `prefix-<pid>-<n>`: unique within this process and across processes.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Run a command; its stdout if it exits 0, else an error with the command and its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// "02:00:00:00:00:01"
pub fn fmt_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// A network namespace, deleted (with every interface in it) when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Create `prefix-<pid>-<n>` with its loopback up.
    pub fn new(prefix: &str) -> Result<Netns> {
        Netns::create(&unique_name(prefix))
    }

    /// Create a namespace with exactly this name (fails if it exists), loopback up.
    pub fn create(name: &str) -> Result<Netns> {
        run("ip", &["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        // No duplicate address detection on the interfaces made later: their IPv6
        // link-local addresses are usable at once (neighbour solicitations need one).
        for k in ["all", "default"] {
            ns.sysctl(&format!("net.ipv6.conf.{k}.accept_dad"), "0")?;
        }
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `ip -n <name> args...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// `ip netns exec <name> args...`, failing unless it exits 0.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["netns", "exec", &self.name];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// `ip netns exec <name> args...`, whatever its exit status.
    pub fn exec_output(&self, args: &[&str]) -> Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running ip netns exec")
    }

    /// `sysctl -w key=value` inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")])
            .map(drop)
    }

    /// The MAC address of an interface in this namespace.
    pub fn mac(&self, iface: &str) -> Result<[u8; 6]> {
        let out = self.ip(&["-br", "link", "show", "dev", iface])?;
        out.split_whitespace()
            .find_map(|w| w.parse::<lb_userspace::config::MacAddr>().ok())
            .map(|m| m.octets())
            .ok_or_else(|| anyhow!("no MAC for {iface} in `ip -br link`: {out}"))
    }

    /// [`in_netns`] for this namespace.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(&self.name, f)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("netns: {e:#}");
        }
    }
}

/// One end of a veth pair.
#[derive(Clone, Copy, Debug)]
pub struct VethEnd<'a> {
    pub ns: &'a Netns,
    /// At most 15 characters; only unique within `ns`.
    pub name: &'a str,
    pub mac: [u8; 6],
    /// Addresses with prefix length ("198.18.0.1/24", "2001:db8::1/64"); IPv6 ones are
    /// added without duplicate address detection so they are usable at once.
    pub addrs: &'a [&'a str],
}

/// Create a veth pair `a.name` (in `a.ns`) <-> `b.name` (in `b.ns`, which may be `a.ns`),
/// set the MACs and addresses and bring both ends up. Removed with its namespace.
pub fn veth_pair(a: &VethEnd, b: &VethEnd) -> Result<()> {
    let (mac_a, mac_b) = (fmt_mac(a.mac), fmt_mac(b.mac));
    a.ns.ip(&[
        "link",
        "add",
        a.name,
        "address",
        &mac_a,
        "type",
        "veth",
        "peer",
        "name",
        b.name,
        "address",
        &mac_b,
        "netns",
        b.ns.name(),
    ])?;
    for end in [a, b] {
        for addr in end.addrs {
            let mut args = vec!["addr", "add", addr, "dev", end.name];
            if addr.contains(':') {
                args.push("nodad");
            }
            end.ns.ip(&args)?;
        }
        end.ns.ip(&["link", "set", end.name, "up"])?;
    }
    Ok(())
}

fn enter(name: &str) -> Result<()> {
    let path = format!("/run/netns/{name}");
    let f = fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns({path}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Run `f` on a new thread that has entered network namespace `name`, and wait for it.
/// A panic in `f` is passed on to the caller.
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    thread::scope(|s| {
        let h = s.spawn(|| -> Result<T> {
            enter(name)?;
            Ok(f())
        });
        match h.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

/// As [`in_netns`], without waiting: the thread's handle (its result is an error if it
/// could not enter the namespace).
pub fn spawn_in_netns<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<Result<T>> {
    let name = name.to_string();
    thread::spawn(move || {
        enter(&name)?;
        Ok(f())
    })
}

/// An `AF_PACKET` socket on one interface: whole Ethernet frames out and in. Open it inside
/// the interface's namespace (e.g. in [`in_netns`]); it can be used from any thread after.
#[derive(Debug)]
pub struct RawSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl RawSocket {
    pub fn open(iface: &str) -> Result<RawSocket> {
        let c = CString::new(iface)?;
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) } as i32;
        if ifindex == 0 {
            bail!("no interface {iface} in this namespace");
        }
        let proto = (libc::ETH_P_ALL as u16).to_be();
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32) };
        if fd < 0 {
            bail!("socket(AF_PACKET): {}", std::io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex;
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r != 0 {
            bail!(
                "bind(AF_PACKET, {iface}): {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(RawSocket { fd, ifindex })
    }

    /// Send one frame as is (Ethernet header included).
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
            )
        };
        if n != frame.len() as isize {
            bail!("send(AF_PACKET): {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next frame seen on the interface (either direction), or `None` after `timeout`.
    pub fn recv(&self, timeout: Duration) -> Result<Option<Vec<u8>>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; 65536];
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n < 0 {
            bail!("recv(AF_PACKET): {}", std::io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(Some(buf))
    }

    pub fn ifindex(&self) -> i32 {
        self.ifindex
    }
}

/// A program started inside a network namespace with `ip netns exec NS program args...`
/// (which execs it: the process id is the program's), stdout and stderr appended to a log
/// file. Dropping it kills (SIGKILL) and reaps the process; the log is printed if a test
/// is failing, then removed.
#[derive(Debug)]
pub struct Process {
    what: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Process {
    /// Start `program args...` in `ns`. With `own_process_group` it gets a process group of
    /// its own (it survives a Ctrl-C of the terminal that started it).
    pub fn spawn(
        ns: &Netns,
        program: &Path,
        args: &[&str],
        log: &Path,
        own_process_group: bool,
    ) -> Result<Process> {
        let what = format!(
            "{} {} (netns {})",
            program.display(),
            args.join(" "),
            ns.name()
        );
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns.name()])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        if own_process_group {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let child = cmd.spawn().with_context(|| format!("spawning {what}"))?;
        Ok(Process {
            what,
            log: log.to_path_buf(),
            child: Some(child),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("process reaped").id()
    }

    /// Everything the process wrote so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An error with the log if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| anyhow!("{} was reaped", self.what))?;
        if let Some(st) = child.try_wait()? {
            bail!("{} exited ({st}); log:\n{}", self.what, self.log());
        }
        Ok(())
    }

    /// Kill (SIGKILL) and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!(
                "{} log ({}):\n{}",
                self.what,
                self.log.display(),
                self.log()
            );
        }
        let _ = fs::remove_file(&self.log);
    }
}

/// A temporary directory (under `$TMPDIR`, named `<prefix>...`), removed when dropped.
pub fn temp_dir(prefix: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("{prefix}-"))
        .tempdir()
        .context("creating a temporary directory")
}

/// A binary of this build: `$env` if that is set, else `name` beside the running
/// executable (`target/<profile>/` for a binary, `target/<profile>/deps/` for a test) or in
/// `target/release` / `target/debug`. The error lists where it looked.
pub fn find_bin(name: &str, env: Option<&str>) -> Result<PathBuf> {
    if let Some(p) = env.and_then(std::env::var_os) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let mut tried = Vec::new();
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    let dirs: Vec<&Path> = exe.ancestors().skip(1).take(2).collect();
    for d in &dirs {
        tried.push(d.join(name));
    }
    for d in &dirs {
        if let Some(target) = d.parent() {
            tried.push(target.join("release").join(name));
            tried.push(target.join("debug").join(name));
        }
    }
    tried.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        anyhow!(
            "the `{name}` binary was not found (looked at {})",
            tried
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// The `lb` binary of this build: `target/<profile>/lb` beside the test executable
/// (`target/<profile>/deps/<test>`), else the other profile's; `$LB_BIN` overrides.
/// An error with instructions if there is none.
pub fn find_lb_bin() -> Result<PathBuf> {
    let bin = find_bin("lb", Some("LB_BIN")).map_err(|e| {
        anyhow!(
            "{e}; build it first: `cargo build --release -p lb-userspace` (or run the tests \
             with `cargo test --release --workspace`), or point LB_BIN at it"
        )
    })?;
    warn_if_stale(&bin);
    Ok(bin)
}

/// [`find_lb_bin`], panicking with its message.
pub fn lb_bin() -> PathBuf {
    find_lb_bin().unwrap_or_else(|e| panic!("{e:#}"))
}

/// `cargo test -p lb-tests` rebuilds the `lb_userspace` library but not the `lb` binary:
/// say so (once) if the binary is older than the library this test was built with.
fn warn_if_stale(bin: &Path) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
        let Some(bin_time) = mtime(bin) else { return };
        let Some(deps) = bin.parent().map(|d| d.join("deps")) else {
            return;
        };
        let newest_lib = fs::read_dir(deps)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.starts_with("liblb_userspace-") && n.ends_with(".rlib")
            })
            .filter_map(|e| mtime(&e.path()))
            .max();
        if newest_lib.is_some_and(|l| l > bin_time) {
            eprintln!(
                "warning: {} is older than the lb_userspace library; rebuild it with \
                 `cargo build --release -p lb-userspace` (or test with --workspace)",
                bin.display()
            );
        }
    });
}

/// What one `lb` command did.
#[derive(Clone, Debug)]
pub struct LbOut {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl LbOut {
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    /// stdout, panicking with the whole output unless the command succeeded.
    pub fn expect_ok(&self, what: &str) -> &str {
        assert!(
            self.ok(),
            "{what}: exit {}\nstdout: {}\nstderr: {}",
            self.status,
            self.stdout,
            self.stderr
        );
        &self.stdout
    }

    /// stdout parsed as JSON (for `--json`), panicking unless the command succeeded.
    pub fn json(&self, what: &str) -> serde_json::Value {
        serde_json::from_str(self.expect_ok(what))
            .unwrap_or_else(|e| panic!("{what}: stdout is not JSON ({e}): {}", self.stdout))
    }
}

/// Run `lb args...` (no namespace needed: the CLI talks to the agent's Unix socket).
pub fn lb(args: &[&str]) -> LbOut {
    lb_command(Command::new(lb_bin()).args(args))
}

/// Run a prepared command (e.g. `setpriv ... lb ...`) and collect its output.
pub fn lb_command(cmd: &mut Command) -> LbOut {
    let out = cmd
        .stdin(Stdio::null())
        .env("NO_COLOR", "1")
        .output()
        .expect("running lb");
    LbOut {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `/sys/fs/bpf/<instance>`
pub fn pin_dir(instance: &str) -> PathBuf {
    lb_userspace::agent::pin_dir(instance)
}

/// `/run/lb/<instance>.sock`
pub fn socket_path(instance: &str) -> PathBuf {
    api::socket_path(instance)
}

/// `word` as one word for sh: as is if it has no special characters, else single-quoted.
pub fn shell_quote(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_./:=@%+,-".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// A running `lb agent --config PATH --instance NAME --netns NS`. Dropping it kills the
/// process and runs `lb agent --stop --instance NAME`: the XDP program is detached, the pins
/// and the socket are removed. Its log (stderr) is kept in a file, printed if a test fails.
#[derive(Debug)]
pub struct Agent {
    instance: String,
    config: PathBuf,
    netns: String,
    log: PathBuf,
    child: Option<Child>,
    own_process_group: bool,
    /// The `lb` binary to run (default: this build's).
    bin: Option<PathBuf>,
    /// Extra environment of the next spawns.
    env: Vec<(String, String)>,
}

impl Agent {
    /// Start an agent with a fresh instance name and wait until it answers `status`.
    pub fn start(ns: &Netns, config: &Path) -> Result<Agent> {
        let mut a = Agent::new(ns, config);
        a.spawn()?;
        Ok(a)
    }

    /// An agent guard that is not running yet (see [`Agent::spawn`], [`Agent::run_to_exit`]).
    pub fn new(ns: &Netns, config: &Path) -> Agent {
        Agent::with_instance(ns, config, &unique_name("lbt"))
    }

    /// As [`Agent::new`] with a chosen instance name (pins `/sys/fs/bpf/<instance>`, socket
    /// `/run/lb/<instance>.sock`, log `<tmp>/<instance>.log`).
    pub fn with_instance(ns: &Netns, config: &Path, instance: &str) -> Agent {
        Agent {
            instance: instance.to_string(),
            config: config.to_path_buf(),
            netns: ns.name().to_string(),
            log: std::env::temp_dir().join(format!("{instance}.log")),
            child: None,
            own_process_group: false,
            bin: None,
            env: Vec::new(),
        }
    }

    /// Set (`Some`) or clear (`None`) an environment variable of the next spawns.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.into(), v.into()));
        }
    }

    /// Run another `lb` binary from the next [`Agent::spawn`] on (`None`: this build's),
    /// e.g. an earlier release to upgrade from.
    pub fn set_binary(&mut self, bin: Option<PathBuf>) {
        self.bin = bin;
    }

    /// Start the process in a process group of its own, so that it outlives a Ctrl-C or
    /// hangup of the terminal that started it (for agents meant to be left running).
    pub fn in_own_process_group(mut self) -> Agent {
        self.own_process_group = true;
        self
    }

    /// Where the agent's stderr goes.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn config(&self) -> &Path {
        &self.config
    }

    pub fn pin_dir(&self) -> PathBuf {
        pin_dir(&self.instance)
    }

    pub fn socket(&self) -> PathBuf {
        socket_path(&self.instance)
    }

    /// The process id (panics if not running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent not running").id()
    }

    /// Everything the agent wrote to stderr so far, over all its runs.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The arguments of `lb` that run this agent.
    fn args(&self) -> Vec<String> {
        let config = self.config.display().to_string();
        ["agent", "--config", &config, "--instance", &self.instance]
            .into_iter()
            .chain(["--netns", &self.netns])
            .map(String::from)
            .collect()
    }

    /// The shell command that starts this agent as [`Agent::spawn`] does (stdin from
    /// /dev/null, stdout and stderr appended to [`Agent::log_path`]), in the background:
    /// for people, to restart it by hand.
    pub fn shell_command(&self) -> Result<String> {
        let words: Vec<String> = [find_lb_bin()?.display().to_string()]
            .into_iter()
            .chain(self.args())
            .map(|w| shell_quote(&w))
            .collect();
        Ok(format!(
            "{} < /dev/null >> {} 2>&1 &",
            words.join(" "),
            shell_quote(&self.log.display().to_string())
        ))
    }

    fn command(&self) -> Result<Command> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let bin = match &self.bin {
            Some(b) => b.clone(),
            None => find_lb_bin()?,
        };
        let mut cmd = Command::new(bin);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.args(self.args())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if self.own_process_group {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        Ok(cmd)
    }

    /// Start the process (again) and wait until it answers `status` (10 s), or fail with
    /// its log if it exits first.
    pub fn spawn(&mut self) -> Result<()> {
        assert!(self.child.is_none(), "agent already running");
        self.child = Some(self.command()?.spawn().context("spawning lb agent")?);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait()? {
                self.child = None;
                bail!("lb agent exited at start ({st}); log:\n{}", self.log());
            }
            if self.socket().exists() {
                if let Ok(r) = api::call(&self.instance, &Request::Status) {
                    if r.ok {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("lb agent not ready after 10 s; log:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Run the agent expecting it to exit by itself (e.g. a refused config): its exit
    /// status and log. Fails if it is still running after `timeout`.
    pub fn run_to_exit(&mut self, timeout: Duration) -> Result<(ExitStatus, String)> {
        assert!(self.child.is_none(), "agent already running");
        self.child = Some(self.command()?.spawn().context("spawning lb agent")?);
        let st = self.wait_exit(timeout)?;
        Ok((st, self.log()))
    }

    /// Wait for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().ok_or_else(|| anyhow!("not running"))?;
        loop {
            if let Some(st) = child.try_wait()? {
                self.child = None;
                return Ok(st);
            }
            if Instant::now() > deadline {
                bail!(
                    "lb agent still running after {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Send a signal (e.g. `libc::SIGHUP`).
    pub fn signal(&self, sig: i32) -> Result<()> {
        if unsafe { libc::kill(self.pid() as i32, sig) } != 0 {
            bail!(
                "kill({}, {sig}): {}",
                self.pid(),
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// `kill -9` and reap: the agent gets no chance to clean up.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().context("SIGKILL")?;
            c.wait()?;
        }
        Ok(())
    }

    /// `lb agent --stop --instance NAME` (its output), then wait for the agent to exit.
    pub fn stop(&mut self) -> Result<(LbOut, Option<ExitStatus>)> {
        let out = lb(&["agent", "--stop", "--instance", &self.instance]);
        let st = match self.child {
            Some(_) => Some(self.wait_exit(Duration::from_secs(5))?),
            None => None,
        };
        Ok((out, st))
    }

    /// `lb --instance NAME args...`
    pub fn lb(&self, args: &[&str]) -> LbOut {
        let mut a = vec!["--instance", self.instance.as_str()];
        a.extend_from_slice(args);
        lb(&a)
    }

    /// `lb --instance NAME --json args...`, parsed; panics unless it succeeds.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        self.lb(&a).json(&args.join(" "))
    }
}

impl Drop for Agent {
    // Must not panic: it runs while a failed test unwinds, before the namespaces go.
    fn drop(&mut self) {
        let _ = self.kill9();
        let stop = find_lb_bin().and_then(|bin| {
            Command::new(bin)
                .args(["agent", "--stop", "--instance", &self.instance])
                .stdin(Stdio::null())
                .output()
                .context("running lb agent --stop")
        });
        match stop {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "agent {}: lb agent --stop: {}",
                self.instance,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("agent {}: {e:#}", self.instance),
        }
        let _ = fs::remove_file(self.socket());
        if thread::panicking() {
            eprintln!(
                "agent {} log ({}):\n{}",
                self.instance,
                self.log.display(),
                self.log()
            );
        }
        let _ = fs::remove_file(&self.log);
    }
}
