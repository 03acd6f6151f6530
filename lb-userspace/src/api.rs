//! The agent's control API: one JSON request per line over a Unix socket that only root
//! can open (`/run/lb/<instance>.sock`, mode 0600), one JSON response per line back. The
//! `data` of a successful response is the typed [`Reply`] to that request, the same types
//! for the agent that builds it and the CLI that prints it.
use std::{
    collections::BTreeMap,
    fmt,
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::PathBuf,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::{BackendConfig, Forwarding, MacAddr, Mode, Protocol, VipConfig, XdpMode};

/// Where the agents keep their sockets and run-time files.
pub fn run_dir() -> PathBuf {
    PathBuf::from("/run/lb")
}

pub fn socket_path(instance: &str) -> PathBuf {
    run_dir().join(format!("{instance}.sock"))
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    VipAdd {
        vip: VipConfig,
    },
    VipRemove {
        name: String,
    },
    VipList,
    BackendAdd {
        vip: String,
        backend: BackendConfig,
    },
    BackendRemove {
        vip: String,
        address: IpAddr,
    },
    BackendList {
        vip: Option<String>,
    },
    BackendWeight {
        vip: String,
        address: IpAddr,
        weight: u32,
    },
    BackendDrain {
        vip: String,
        address: IpAddr,
        drain: bool,
        /// With `drain`: remove the backend this many seconds from now.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_s: Option<u32>,
    },
    Status,
    Stats,
    /// The recent state changes; with `follow`, then every new one as it happens (one
    /// JSON [`Event`] per line) until the client goes.
    Events {
        #[serde(default)]
        follow: bool,
    },
    /// Exit the agent, leaving the data plane attached (as SIGTERM does).
    Shutdown,
}

impl Request {
    /// Does this request change the configuration?
    pub fn mutates(&self) -> bool {
        !matches!(
            self,
            Request::VipList
                | Request::BackendList { .. }
                | Request::Status
                | Request::Stats
                | Request::Events { .. }
                | Request::Shutdown
        )
    }
}

/// The answer to a [`Request`]: which variant is fixed by the request ([`Reply::read`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Reply {
    /// To every request that changes the configuration.
    Changed(Changed),
    /// `VipList`
    Vips(Vec<VipRow>),
    /// `BackendList`
    Backends(Vec<BackendRow>),
    Status(Status),
    Stats(Stats),
    /// `Events`: the recent ones, oldest first.
    Events(Vec<Event>),
    /// `Shutdown`
    Done {},
}

impl Reply {
    /// The reply to `req` in a response's `data`.
    pub fn read(req: &Request, data: serde_json::Value) -> Result<Reply> {
        let r = match req {
            _ if req.mutates() => Reply::Changed(serde_json::from_value(data)?),
            Request::VipList => Reply::Vips(serde_json::from_value(data)?),
            Request::BackendList { .. } => Reply::Backends(serde_json::from_value(data)?),
            Request::Status => Reply::Status(serde_json::from_value(data)?),
            Request::Events { .. } => Reply::Events(serde_json::from_value(data)?),
            Request::Stats => Reply::Stats(serde_json::from_value(data)?),
            _ => Reply::Done {},
        };
        Ok(r)
    }
}

/// A change was applied (and written to the config file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changed {
    /// Maglev rings rebuilt and swapped in.
    pub rings_rebuilt: usize,
}

/// One VIP of `lb vip list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipRow {
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub forwarding: Forwarding,
    pub mode: Mode,
    pub affinity: bool,
    /// Backends configured.
    pub backends: usize,
    /// Backends taking new flows.
    pub active: usize,
}

/// One backend of one VIP in `lb backend list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendRow {
    pub vip: String,
    pub address: IpAddr,
    pub weight: u32,
    pub drain: bool,
    /// The MAC the operator configured, if any.
    pub mac: Option<MacAddr>,
    /// Its id in the BACKENDS map (one per backend of each VIP).
    pub id: Option<u32>,
    /// The next-hop MAC the data plane sends its packets to (configured or resolved;
    /// `None`: `agent.gateway_mac`, or not resolved).
    #[serde(default)]
    pub next_hop: Option<MacAddr>,
    /// Why it is kept out of the rings for want of a next hop, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unresolved: Option<String>,
    pub state: BackendState,
    /// A drain with a timeout: seconds until the backend is removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_left_s: Option<u64>,
}

/// A state change the agent saw: a backend's health, its next hop, a VIP's mode.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unix time, milliseconds.
    pub time_ms: u64,
    pub vip: String,
    /// The backend it is about, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<IpAddr>,
    /// What changed: `up`, `down`, `unresolved`, `resolved`, `panic`, `panic_over`,
    /// `backups_serve`, `primaries_serve`, `drain_done`.
    pub what: String,
    /// Why, in the check's words (`connection refused`, `status 503`, ...).
    pub reason: String,
}

/// A checked backend in [`Status::health`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HealthRow {
    pub vip: String,
    pub backend: IpAddr,
    /// `up` or `down`.
    pub state: String,
    /// Unix time (ms) it has been in that state since.
    pub since_ms: u64,
    /// Why it is in that state ("started", "checks pass", "connection refused", ...).
    pub reason: String,
    /// The check: kind and way (`tcp via tunnel`).
    pub check: String,
    /// The last check: passed, milliseconds, why not.
    #[serde(default)]
    pub last_ok: Option<bool>,
    #[serde(default)]
    pub last_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_error: String,
    pub checks: u64,
    pub failed_checks: u64,
    #[serde(flatten)]
    pub availability: crate::health::record::Availability,
}

/// `lb status`: what the agent runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub instance: String,
    pub config: PathBuf,
    pub interface: String,
    pub xdp_mode: XdpMode,
    pub program_id: u32,
    /// Started on maps and a link pinned by an earlier agent.
    pub adopted: bool,
    /// How it started: `fresh`, `adopted` (pins as they were) or `migrated` (pins of other
    /// sizes or layouts, moved to new maps).
    pub start: crate::agent::Start,
    pub mtu: u32,
    pub vips: usize,
    /// Backend ids in the maps: one per backend of each VIP.
    pub backends: usize,
    /// Every checked backend: its state, why, and its availability since the agent
    /// started.
    #[serde(default)]
    pub health: Vec<HealthRow>,
    /// VIPs in panic mode, or served by their backups.
    #[serde(default)]
    pub modes: BTreeMap<String, crate::health::policy::VipMode>,
    pub pins: PathBuf,
    /// BGP, when `[bgp]` is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<BgpStatus>,
}

/// What the agent announces, and its BGP sessions as BIRD reports them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BgpStatus {
    pub local_asn: u32,
    pub next_hop: std::net::Ipv4Addr,
    /// VIP addresses announced now (those with a healthy backend).
    pub announced: Vec<IpAddr>,
    pub sessions: Vec<BgpSession>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BgpSession {
    /// BIRD's protocol name (`n_198_18_0_1` for neighbour 198.18.0.1).
    pub name: String,
    pub neighbor: std::net::Ipv4Addr,
    /// BIRD's state (`up`, `start`, ...) and its details (`Established`, `Active`, ...).
    pub state: String,
    pub info: String,
}

/// Packets, bytes and new flows counted by the data plane.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

impl From<lb_common::Counters> for Counters {
    fn from(c: lb_common::Counters) -> Self {
        Counters {
            packets: c.packets,
            bytes: c.bytes,
            new_flows: c.new_flows,
        }
    }
}

/// Connections of a backend in the connection table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conns {
    pub active: u64,
    pub inactive: u64,
}

/// Whether a backend takes new flows, and if not why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    /// Takes new flows in proportion to its weight.
    Up,
    /// Keeps its established flows, gets no new ones.
    Draining,
    /// Weight 0: gets no new flows.
    #[serde(rename = "weight_0")]
    Weight0,
    /// Its health checks fail: in no ring, its flows move to other backends.
    Down,
    /// A backup waiting for every primary to fail (in no ring until then).
    Backup,
    /// No next hop found for it (no neighbour entry): kept out of the rings.
    Unresolved,
}

impl BackendState {
    pub fn of(b: &BackendConfig) -> BackendState {
        if b.drain {
            BackendState::Draining
        } else if b.weight == 0 {
            BackendState::Weight0
        } else {
            BackendState::Up
        }
    }
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendState::Up => "up",
            BackendState::Draining => "draining",
            BackendState::Weight0 => "weight 0",
            BackendState::Down => "down",
            BackendState::Backup => "backup",
            BackendState::Unresolved => "unresolved",
        })
    }
}

/// `lb stats`: the reason counters, then per VIP its counters and its backends'.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Every packet the `lb` program saw, by verdict reason (`tx_forward`, ...).
    pub reasons: BTreeMap<String, u64>,
    pub vips: Vec<VipStats>,
    /// Every backend address once, its counters over all the VIPs it serves.
    pub backends: Vec<BackendStats>,
}

/// One VIP of [`Stats`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipStats {
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    #[serde(flatten)]
    pub counters: Counters,
    pub backends: Vec<VipBackendStats>,
}

/// One backend of one VIP in [`Stats`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipBackendStats {
    pub address: IpAddr,
    pub id: Option<u32>,
    pub weight: u32,
    pub state: BackendState,
    /// Counted by the data plane for this backend of this VIP.
    #[serde(flatten)]
    pub counters: Counters,
    /// Its connections of this VIP.
    pub conns: Conns,
}

/// One backend address in [`Stats::backends`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStats {
    pub address: IpAddr,
    pub id: u32,
    #[serde(flatten)]
    pub counters: Counters,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(reply: &Reply) -> Self {
        Response {
            ok: true,
            error: None,
            data: serde_json::to_value(reply).expect("replies serialize"),
        }
    }
    pub fn err(e: impl std::fmt::Display) -> Self {
        Response {
            ok: false,
            error: Some(e.to_string()),
            data: serde_json::Value::Null,
        }
    }
}

/// Send one request to a running agent.
pub fn call(instance: &str, req: &Request) -> Result<Response> {
    let path = socket_path(instance);
    let stream = UnixStream::connect(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => {
            anyhow::anyhow!("permission denied: {} is for root only", path.display())
        }
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            anyhow::anyhow!(
                "no agent is running for instance {instance:?} ({} not found)",
                path.display()
            )
        }
        _ => anyhow::Error::new(e).context(format!("connecting to {}", path.display())),
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut w = stream.try_clone()?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    w.write_all(line.as_bytes())?;
    let mut resp = String::new();
    BufReader::new(stream)
        .read_line(&mut resp)
        .context("reading the agent's answer")?;
    if resp.is_empty() {
        bail!("the agent closed the connection without answering");
    }
    Ok(serde_json::from_str(&resp)?)
}

/// `Events { follow: true }`: `each` gets the reply (the recent events), then every new
/// event as the agent sends it, until the agent or `each` ends it.
pub fn follow(
    instance: &str,
    req: &Request,
    mut each: impl FnMut(Option<&Reply>, Option<&Event>) -> Result<()>,
) -> Result<()> {
    let stream = UnixStream::connect(socket_path(instance))
        .map_err(|_| anyhow::anyhow!("no agent is running for instance {instance:?}"))?;
    let mut w = stream.try_clone()?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    w.write_all(line.as_bytes())?;
    let mut r = BufReader::new(stream);
    let mut first = String::new();
    r.read_line(&mut first)?;
    let resp: Response = serde_json::from_str(&first).context("the agent's answer")?;
    if !resp.ok {
        bail!("{}", resp.error.unwrap_or_else(|| "failed".into()));
    }
    each(Some(&Reply::read(req, resp.data)?), None)?;
    for line in r.lines() {
        let e: Event = serde_json::from_str(&line?).context("an event")?;
        each(None, Some(&e))?;
    }
    Ok(())
}

/// Send one request to a running agent: its typed reply, or the agent's error.
pub fn request(instance: &str, req: &Request) -> Result<Reply> {
    let resp = call(instance, req)?;
    if !resp.ok {
        bail!("{}", resp.error.unwrap_or_else(|| "failed".into()));
    }
    Reply::read(req, resp.data).context("the agent's answer")
}
