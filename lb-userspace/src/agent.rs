//! The long-lived agent: loads (or adopts) the data plane, keeps the maps equal to the
//! config file, answers the CLI, reloads on SIGHUP, exits on SIGTERM leaving the data plane
//! running. Everything it creates in the kernel is pinned under `/sys/fs/bpf/<instance>/`,
//! so a restarted (or upgraded) agent picks up the same maps and link and drops nothing.
use std::{
    ffi::CString,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{anyhow, bail, Context, Result};
use aya::programs::{links::FdLink, links::PinnedLink, xdp::XdpLink, XdpMode as AyaXdpMode};
use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot},
};
use tracing::{error, info, warn};

use crate::{
    api::{self, Request, Response},
    config::{Config, XdpMode},
    dataplane::{Dataplane, Sizes, MAP_NAMES},
    reconcile::{self, Applied, Changes},
};

pub fn pin_dir(instance: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/{instance}"))
}

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

fn sizes(cfg: &Config) -> Sizes {
    Sizes {
        max_vips: cfg.agent.max_vips,
        max_backends: cfg.agent.max_backends,
        max_conns: cfg.agent.max_conns,
        ring_stride: cfg.agent.ring_size,
    }
}

/// Attach `lb` to the interface, or, if a link is pinned from an earlier run, swap the
/// freshly loaded program into that link (atomic: BPF_LINK_UPDATE). Returns true if adopted.
fn attach_or_adopt(dp: &mut Dataplane, dir: &Path, iface: &str, mode: XdpMode) -> Result<bool> {
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
fn remove_pins(dir: &Path) {
    for name in MAP_NAMES.iter().chain(&["lb"]) {
        let _ = std::fs::remove_file(dir.join(name));
    }
    let _ = std::fs::remove_dir(dir);
}

pub struct Agent {
    instance: String,
    config_path: PathBuf,
    cfg: Config,
    dp: Dataplane,
    applied: Applied,
    mtu: u32,
    adopted: bool,
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

    fn mutate(&mut self, req: &Request) -> Result<Changes> {
        let mut cfg = self.cfg.clone();
        let no_vip = |n: &str| anyhow!("vip[{n}]: no such VIP");
        match req {
            Request::VipAdd { vip } => {
                if cfg.vip(&vip.name).is_some() {
                    bail!("vip[{}].name: a VIP of that name exists", vip.name);
                }
                cfg.vips.push(vip.clone());
            }
            Request::VipRemove { name } => {
                let before = cfg.vips.len();
                cfg.vips.retain(|v| &v.name != name);
                if cfg.vips.len() == before {
                    return Err(no_vip(name));
                }
            }
            Request::BackendAdd { vip, backend } => {
                cfg.vip_mut(vip)
                    .ok_or_else(|| no_vip(vip))?
                    .backends
                    .push(backend.clone());
            }
            Request::BackendRemove { vip, address } => {
                let v = cfg.vip_mut(vip).ok_or_else(|| no_vip(vip))?;
                let before = v.backends.len();
                v.backends.retain(|b| &b.address != address);
                if v.backends.len() == before {
                    bail!("vip[{vip}].backends: no backend {address}");
                }
            }
            Request::BackendWeight {
                vip,
                address,
                weight,
            } => {
                cfg.backend_mut(vip, address)?.weight = *weight;
            }
            Request::BackendDrain {
                vip,
                address,
                drain,
            } => {
                cfg.backend_mut(vip, address)?.drain = *drain;
            }
            _ => unreachable!("not a mutation"),
        }
        self.apply(cfg, true, "cli")
    }

    fn backend_id(&self, addr: &std::net::IpAddr) -> Option<u32> {
        self.applied.backends.get(addr).map(|(id, _)| *id)
    }

    pub fn handle(&mut self, req: Request) -> Response {
        if req.mutates() {
            return match self.mutate(&req) {
                Ok(c) => Response::ok(json!({ "rings_rebuilt": c.rings_rebuilt })),
                Err(e) => Response::err(format!("{e:#}")),
            };
        }
        let r: Result<serde_json::Value> = (|| {
            Ok(match &req {
                Request::VipList => json!(self
                    .cfg
                    .vips
                    .iter()
                    .map(|v| json!({
                        "name": v.name, "address": v.address, "port": v.port,
                        "protocol": v.protocol, "forwarding": v.forwarding, "affinity": v.affinity,
                        "backends": v.backends.len(),
                        "active": v.backends.iter().filter(|b| b.active()).count(),
                    }))
                    .collect::<Vec<_>>()),
                Request::BackendList { vip } => {
                    if let Some(n) = vip {
                        self.cfg
                            .vip(n)
                            .ok_or_else(|| anyhow!("vip[{n}]: no such VIP"))?;
                    }
                    let mut out = Vec::new();
                    for v in self
                        .cfg
                        .vips
                        .iter()
                        .filter(|v| vip.as_ref().is_none_or(|n| &v.name == n))
                    {
                        for b in &v.backends {
                            out.push(json!({
                                "vip": v.name, "address": b.address, "weight": b.weight,
                                "drain": b.drain, "mac": b.mac, "id": self.backend_id(&b.address),
                            }));
                        }
                    }
                    json!(out)
                }
                Request::Status => {
                    let prog = self.dp.program("lb")?.info()?;
                    json!({
                        "instance": self.instance,
                        "config": self.config_path,
                        "interface": self.cfg.agent.interface,
                        "xdp_mode": self.cfg.agent.xdp_mode,
                        "program_id": prog.id(),
                        "adopted": self.adopted,
                        "mtu": self.mtu,
                        "vips": self.cfg.vips.len(),
                        "backends": self.applied.backends.len(),
                        "pins": pin_dir(&self.instance),
                    })
                }
                Request::Stats => {
                    let reasons = self.dp.reason_counts()?;
                    let reasons: serde_json::Map<String, serde_json::Value> =
                        lb_common::Reason::ALL
                            .iter()
                            .map(|r| (r.name().to_string(), json!(reasons[*r as usize])))
                            .collect();
                    let mut vips = Vec::new();
                    for v in &self.cfg.vips {
                        if let Some(a) = self.applied.vips.get(&reconcile::vip_key(v)) {
                            let c = self.dp.vip_counters(a.meta.id)?;
                            vips.push(json!({"name": v.name, "packets": c.packets, "bytes": c.bytes, "new_flows": c.new_flows}));
                        }
                    }
                    let mut backends = Vec::new();
                    for (addr, (id, _)) in &self.applied.backends {
                        let c = self.dp.backend_counters(*id)?;
                        backends.push(json!({"address": addr, "id": id, "packets": c.packets, "bytes": c.bytes, "new_flows": c.new_flows}));
                    }
                    json!({"reasons": reasons, "vips": vips, "backends": backends})
                }
                Request::Shutdown => json!({}),
                _ => unreachable!(),
            })
        })();
        match r {
            Ok(d) => Response::ok(d),
            Err(e) => Response::err(format!("{e:#}")),
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

type Job = (Request, oneshot::Sender<Response>);

/// Run the agent in the foreground until SIGTERM/SIGINT or a `Shutdown` request.
pub fn run(config: &Path, instance: &str) -> Result<()> {
    let mut agent = Agent::start(config, instance)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let sock = api::socket_path(instance);
        std::fs::create_dir_all(sock.parent().unwrap())?;
        let _ = std::fs::remove_file(&sock);
        // Only root may talk to the agent: the socket is created 0600.
        let old = unsafe { libc::umask(0o177) };
        let listener = UnixListener::bind(&sock);
        unsafe { libc::umask(old) };
        let listener = listener.with_context(|| format!("binding {}", sock.display()))?;
        let (tx, mut rx) = mpsc::channel::<Job>(16);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut lines = BufReader::new(r).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let resp = match serde_json::from_str::<Request>(&line) {
                            Ok(req) => {
                                let (otx, orx) = oneshot::channel();
                                if tx.send((req, otx)).await.is_err() {
                                    break;
                                }
                                orx.await
                                    .unwrap_or_else(|_| Response::err("agent is shutting down"))
                            }
                            Err(e) => Response::err(format!("bad request: {e}")),
                        };
                        let mut out = serde_json::to_string(&resp).unwrap();
                        out.push('\n');
                        if w.write_all(out.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        info!(socket = %sock.display(), "listening");
        loop {
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM: exiting, data plane stays attached"); break; }
                _ = int.recv() => { info!("SIGINT: exiting, data plane stays attached"); break; }
                _ = hup.recv() => agent.reload(),
                Some((req, reply)) = rx.recv() => {
                    let shutdown = matches!(req, Request::Shutdown);
                    let _ = reply.send(agent.handle(req));
                    if shutdown {
                        info!("shutdown requested: exiting, data plane stays attached");
                        break;
                    }
                }
            }
        }
        // Let the last answer reach its client before the runtime goes.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let _ = std::fs::remove_file(&sock);
        Ok(())
    })
}
