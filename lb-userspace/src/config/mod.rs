//! The agent's configuration file: parsing into typed values (serde), validation with
//! messages that name the field, and the write-back of changes made through the CLI, which
//! edits only what changed and replaces the file atomically ([`file`]).
use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::IpAddr,
    path::Path,
    str::FromStr,
};

use anyhow::{Context, Result};
use ipnet::{Ipv4Net, Ipv6Net};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use crate::maglev::{is_prime, next_prime};

pub mod bgp;
mod file;
pub mod health;

pub use health::{Check, CheckKind, HealthSpec, Via};

pub const MAX_WEIGHT: u32 = 10_000;
pub const DEFAULT_WEIGHT: u32 = 100;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub agent: AgentConfig,
    /// Announce the VIPs by BGP (several LB hosts behind ECMP); off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<bgp::BgpConfig>,
    #[serde(default, rename = "vip", skip_serializing_if = "Vec::is_empty")]
    pub vips: Vec<VipConfig>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Driver mode only: fail if the driver cannot.
    #[default]
    Native,
    /// Generic (skb) mode.
    Skb,
    /// Native, falling back to generic.
    Auto,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The NIC the `lb` program is attached to.
    pub interface: String,
    #[serde(default)]
    pub xdp_mode: XdpMode,
    /// Seed of the flow hash: the same on every LB host behind one ECMP group.
    #[serde(default = "default_seed")]
    pub hash_seed: u32,
    /// Maglev ring size of every VIP: a prime, at least 100 x the largest backend count.
    #[serde(default = "default_ring_size")]
    pub ring_size: u32,
    #[serde(default = "default_max_vips")]
    pub max_vips: u32,
    #[serde(default = "default_max_backends")]
    pub max_backends: u32,
    #[serde(default = "default_max_conns")]
    pub max_conns: u32,
    /// MTU the encapsulated packets must fit; default: the interface's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Next hop for backends without a `mac` of their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_mac: Option<MacAddr>,
    /// Outer IPv4 source of encapsulated packets, as a prefix: its host bits carry flow
    /// entropy, e.g. "198.18.255.0/24". Required if a VIP encapsulates to IPv4 backends.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "encap_source_v4"
    )]
    pub encap_source_v4: Option<Ipv4Net>,
    /// Same for IPv6, e.g. "2001:db8:ff::/112" (entropy in at most the low 32 bits).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "encap_source_v6"
    )]
    pub encap_source_v6: Option<Ipv6Net>,
    /// Where the Prometheus endpoint listens (`GET /metrics`), or `"off"`. Default:
    /// `127.0.0.1:9469` (loopback only).
    #[serde(default = "default_metrics")]
    pub metrics: Listen,
}

/// An address to listen on, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listen {
    Off,
    At(std::net::SocketAddr),
}

impl Serialize for Listen {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Listen::Off => s.serialize_str("off"),
            Listen::At(a) => s.collect_str(a),
        }
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Listen, D::Error> {
        let s = String::deserialize(d)?;
        if s == "off" {
            return Ok(Listen::Off);
        }
        s.parse().map(Listen::At).map_err(|_| {
            de::Error::custom(format!(
                "{s:?} is not an address:port like 127.0.0.1:9469, or \"off\""
            ))
        })
    }
}

fn default_metrics() -> Listen {
    Listen::At(([127, 0, 0, 1], 9469).into())
}

/// An optional prefix, or an error that says what was expected (ipnet's own says only
/// "invalid IP address syntax").
fn prefix<'de, D: Deserializer<'de>, N: FromStr>(
    d: D,
    family: u8,
    example: &str,
) -> Result<Option<N>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|s| {
            s.parse().map_err(|_| {
                de::Error::custom(format!("{s:?} is not an IPv{family} prefix like {example}"))
            })
        })
        .transpose()
}

fn encap_source_v4<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ipv4Net>, D::Error> {
    prefix(d, 4, "198.18.255.0/24")
}

fn encap_source_v6<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ipv6Net>, D::Error> {
    prefix(d, 6, "2001:db8:ff::/112")
}

/// A MAC address, written "aa:bb:cc:dd:ee:ff" in the config file and on the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub fn octets(self) -> [u8; 6] {
        self.0
    }
}

impl From<[u8; 6]> for MacAddr {
    fn from(octets: [u8; 6]) -> Self {
        MacAddr(octets)
    }
}

/// Why a string is not a [`MacAddr`]: it says what was given and what is expected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MacParseError(String);

impl fmt::Display for MacParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not a MAC address (aa:bb:cc:dd:ee:ff)", self.0)
    }
}

impl std::error::Error for MacParseError {}

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || MacParseError(s.to_string());
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for m in mac.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

fn default_seed() -> u32 {
    0x1b_5eed
}
fn default_ring_size() -> u32 {
    lb_common::DEFAULT_RING_SIZE
}
fn default_max_vips() -> u32 {
    lb_common::MAX_VIPS
}
fn default_max_backends() -> u32 {
    lb_common::MAX_BACKENDS
}
fn default_max_conns() -> u32 {
    1 << 20
}
fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}
fn is_false(b: &bool) -> bool {
    !*b
}
fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    #[default]
    Ipip,
    Gue,
    L2dsr,
}

impl Forwarding {
    pub fn to_common(self) -> lb_common::Forwarding {
        match self {
            Forwarding::Ipip => lb_common::Forwarding::Ipip,
            Forwarding::Gue => lb_common::Forwarding::Gue,
            Forwarding::L2dsr => lb_common::Forwarding::L2Dsr,
        }
    }
}

impl fmt::Display for Forwarding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Forwarding::Ipip => "ipip",
            Forwarding::Gue => "gue",
            Forwarding::L2dsr => "l2dsr",
        })
    }
}

/// How a VIP keeps established connections on their backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A connection table on the LB (IPVS's and Katran's way): any protocol, any
    /// forwarding, backends need nothing but decap.
    #[default]
    Conntrack,
    /// No table (GLB's and Unimog's way): every packet goes to its ring slot's primary,
    /// which sends a packet of a connection it does not have on to the slot's secondary.
    /// TCP over GUE only.
    Stateless,
}

impl Mode {
    fn is_default(&self) -> bool {
        *self == Mode::Conntrack
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Conntrack => "conntrack",
            Mode::Stateless => "stateless",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipConfig {
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    #[serde(default)]
    pub forwarding: Forwarding,
    /// `conntrack` (default) or `stateless` (second chance; TCP over GUE).
    #[serde(default, skip_serializing_if = "Mode::is_default")]
    pub mode: Mode,
    /// Hash only the client address: every flow of a client lands on one backend.
    #[serde(default, skip_serializing_if = "is_false")]
    pub affinity: bool,
    /// Health checks of the backends (each may override fields). Default: a TCP connect
    /// for a TCP VIP (every 2 s, rise 2, fall 3), none for a UDP VIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSpec>,
    /// Envoy's panic threshold, in percent (off by default): when fewer of the primary
    /// backends than this pass their checks, new flows go to all of them, as if all were
    /// up, rather than overload the few.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic_threshold: Option<u8>,
    /// HAProxy's `slowstart`: a backend that comes up (or is added) takes its weight in
    /// steps over this many seconds instead of at once. 0 (the default): at once.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub slow_start_s: u32,
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
}

impl Default for VipConfig {
    fn default() -> Self {
        VipConfig {
            name: String::new(),
            address: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            port: 0,
            protocol: Protocol::Tcp,
            forwarding: Forwarding::default(),
            mode: Mode::default(),
            affinity: false,
            health: None,
            panic_threshold: None,
            slow_start_s: 0,
            backends: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub address: IpAddr,
    /// Share of new flows, relative to the VIP's other backends; 0 takes no new flows.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Draining: keeps its established flows, gets no new ones.
    #[serde(default, skip_serializing_if = "is_false")]
    pub drain: bool,
    /// Next-hop MAC of this backend (else `agent.gateway_mac`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// A backup: takes new flows only while every primary (non-backup) backend of the VIP
    /// is down, and hands them back when one returns.
    #[serde(default, skip_serializing_if = "is_false")]
    pub backup: bool,
    /// Overrides of the VIP's `health` fields for this backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSpec>,
    /// A drain with a timeout (`lb backend drain --timeout`): removed from the VIP at this
    /// Unix time (seconds). Kept in the file, so a restart keeps the deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_until: Option<u64>,
    /// Not configured: set by the agent in the config it runs when the backend's checks
    /// say it is down (its flows move; it is in no ring).
    #[serde(skip)]
    pub down: bool,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            address: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            weight: DEFAULT_WEIGHT,
            drain: false,
            mac: None,
            backup: false,
            health: None,
            drain_until: None,
            down: false,
        }
    }
}

impl BackendConfig {
    /// Takes new flows.
    pub fn active(&self) -> bool {
        !self.drain && self.weight > 0 && !self.down
    }
}

/// A validation failure: the field's path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for FieldError {}

fn err<T>(field: impl Into<String>, reason: impl Into<String>) -> Result<T, FieldError> {
    Err(FieldError {
        field: field.into(),
        reason: reason.into(),
    })
}

/// Why `addr` cannot be the address of a VIP or a backend, if it cannot: no packet to or
/// from it can be load balanced.
pub fn unusable_address(addr: IpAddr) -> Option<String> {
    let why = match addr {
        IpAddr::V4(a) if a.is_unspecified() => "the unspecified address",
        IpAddr::V4(a) if a.is_loopback() => "a loopback address",
        IpAddr::V4(a) if a.is_broadcast() => "the broadcast address",
        IpAddr::V4(a) if a.is_multicast() => "a multicast address",
        IpAddr::V6(a) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return Some(format!("{a} is an IPv4-mapped IPv6 address: write {v4}"));
            }
            if a.is_unspecified() {
                "the unspecified address"
            } else if a.is_loopback() {
                "the loopback address"
            } else if a.is_multicast() {
                "a multicast address"
            } else {
                return None;
            }
        }
        IpAddr::V4(_) => return None,
    };
    Some(format!("{addr} is {why}"))
}

impl Config {
    pub fn parse(text: &str) -> Result<Config> {
        let cfg: Config =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Config::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Write this config to `path`, the operator's file: only what differs from what the
    /// file says is edited (its comments and layout stay), and the file is replaced
    /// atomically with its mode and owner; a symlink stays a symlink to an updated target.
    /// A file that does not exist yet is written whole.
    pub fn save(&self, path: &Path) -> Result<()> {
        let target = file::resolve(path)?;
        let (text, like) = match std::fs::read_to_string(&target) {
            Ok(old) => {
                let text = file::edit(&old, self)
                    .with_context(|| format!("updating {}", target.display()))?;
                (text, Some(std::fs::metadata(&target)?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                format!("{}{}", file::HEADER, toml::to_string_pretty(self)?),
                None,
            ),
            Err(e) => return Err(e).with_context(|| format!("reading {}", target.display())),
        };
        file::write_atomically(&target, text.as_bytes(), like.as_ref())
    }

    pub fn vip(&self, name: &str) -> Option<&VipConfig> {
        self.vips.iter().find(|v| v.name == name)
    }

    pub fn vip_mut(&mut self, name: &str) -> Option<&mut VipConfig> {
        self.vips.iter_mut().find(|v| v.name == name)
    }

    /// Backend `address` of VIP `vip`, or an error naming what is missing.
    pub fn backend_mut(&mut self, vip: &str, address: &IpAddr) -> Result<&mut BackendConfig> {
        let v = self
            .vip_mut(vip)
            .ok_or_else(|| anyhow::anyhow!("vip[{vip}]: no such VIP"))?;
        v.backends
            .iter_mut()
            .find(|b| &b.address == address)
            .ok_or_else(|| anyhow::anyhow!("vip[{vip}].backends: no backend {address}"))
    }

    /// Every rule a running agent relies on. The error names the first offending field.
    pub fn validate(&self) -> Result<(), FieldError> {
        let a = &self.agent;
        a.validate()?;
        if self.vips.len() > a.max_vips as usize {
            return err(
                "vip",
                format!(
                    "{} VIPs exceed agent.max_vips = {}",
                    self.vips.len(),
                    a.max_vips
                ),
            );
        }
        let mut names = HashSet::new();
        let mut keys = HashMap::new();
        let mut backends = 0usize;
        for v in &self.vips {
            v.validate(a)?;
            let at = v.field();
            if !names.insert(&v.name) {
                return err(format!("{at}.name"), "duplicate VIP name");
            }
            if let Some(other) = keys.insert((v.address, v.port, v.protocol), &v.name) {
                return err(
                    at,
                    format!(
                        "{} {}:{} is already VIP {other:?}",
                        v.protocol, v.address, v.port
                    ),
                );
            }
            backends += v.backends.len();
        }
        if let Some(b) = &self.bgp {
            b.validate(&self.vips)?;
        }
        // Every backend of every VIP has an id of its own (an address in two VIPs, two).
        if backends > a.max_backends as usize {
            return err(
                "vip",
                format!(
                    "{backends} backends (counted per VIP) exceed agent.max_backends = {}",
                    a.max_backends
                ),
            );
        }
        Ok(())
    }

    /// The outer source address every encapsulating VIP needs. Checked by the agent on the
    /// config it runs, after it filled in what the interface's own addresses provide
    /// (`interface` names it in the message).
    pub fn check_encap_sources(&self, interface: &str) -> Result<(), FieldError> {
        for v in &self.vips {
            if v.forwarding == Forwarding::L2dsr {
                continue;
            }
            for b in &v.backends {
                let (field, missing, fam) = if b.address.is_ipv4() {
                    (
                        "agent.encap_source_v4",
                        self.agent.encap_source_v4.is_none(),
                        4,
                    )
                } else {
                    (
                        "agent.encap_source_v6",
                        self.agent.encap_source_v6.is_none(),
                        6,
                    )
                };
                if missing {
                    return err(
                        field,
                        format!(
                            "required: {} encapsulates to {} and {interface} has no global \
                             IPv{fam} address to use instead",
                            v.field(),
                            b.address
                        ),
                    );
                }
            }
        }
        Ok(())
    }
}

impl AgentConfig {
    /// The `[agent]` table on its own.
    fn validate(&self) -> Result<(), FieldError> {
        if self.interface.is_empty() {
            return err("agent.interface", "must name a network interface");
        }
        if !is_prime(self.ring_size) {
            return err(
                "agent.ring_size",
                format!(
                    "{} is not prime (the next prime is {})",
                    self.ring_size,
                    next_prime(self.ring_size.min(u32::MAX - 1000))
                ),
            );
        }
        if self.ring_size > 1 << 22 {
            return err(
                "agent.ring_size",
                format!("{} is larger than the maximum {}", self.ring_size, 1 << 22),
            );
        }
        for (field, v, lo, hi) in [
            ("agent.max_vips", self.max_vips, 1, 4096),
            ("agent.max_backends", self.max_backends, 1, 1 << 16),
            ("agent.max_conns", self.max_conns, 1024, 1 << 27),
        ] {
            if v < lo || v > hi {
                return err(field, format!("{v} is out of range {lo}..={hi}"));
            }
        }
        if let Some(m) = self.mtu {
            if !(576..=9216).contains(&m) {
                return err("agent.mtu", format!("{m} is out of range 576..=9216"));
            }
        }
        if let Some(p) = self.encap_source_v6 {
            if p.prefix_len() < 96 {
                return err(
                    "agent.encap_source_v6",
                    format!(
                        "/{}: at most the low 32 bits can carry entropy (use /96 or longer)",
                        p.prefix_len()
                    ),
                );
            }
        }
        Ok(())
    }
}

impl VipConfig {
    /// `vip[NAME]`: how messages name this VIP.
    pub fn field(&self) -> String {
        format!("vip[{}]", self.name)
    }

    /// This VIP and its backends on their own (not against the other VIPs).
    fn validate(&self, agent: &AgentConfig) -> Result<(), FieldError> {
        let at = self.field();
        // The VIP's own health table, even with no backend to check yet.
        health::check_of(
            self,
            &BackendConfig::default(),
            &format!("{at}.backends[-]"),
        )?;
        if let Some(p) = self.panic_threshold {
            if !(1..=100).contains(&p) {
                return err(
                    format!("{at}.panic_threshold"),
                    format!("{p} is out of range 1..=100 (percent)"),
                );
            }
        }
        if self.slow_start_s > 3600 {
            return err(
                format!("{at}.slow_start_s"),
                format!("{} is out of range 0..=3600", self.slow_start_s),
            );
        }
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return err(
                format!("{at}.name"),
                "must be 1-64 characters of [A-Za-z0-9-_.]",
            );
        }
        if let Some(why) = unusable_address(self.address) {
            return err(format!("{at}.address"), why);
        }
        if self.port == 0 {
            return err(format!("{at}.port"), "must be 1-65535");
        }
        if self.mode == Mode::Stateless {
            if self.protocol != Protocol::Tcp {
                return err(
                    format!("{at}.mode"),
                    "stateless needs protocol = \"tcp\" (a backend can look up only a TCP \
                     connection; use conntrack for UDP)",
                );
            }
            if self.forwarding != Forwarding::Gue {
                return err(
                    format!("{at}.mode"),
                    "stateless needs forwarding = \"gue\" (the secondary backend travels \
                     in the GUE header)",
                );
            }
            if let Some(i) = self
                .backends
                .iter()
                .position(|b| b.address.is_ipv4() != self.backends[0].address.is_ipv4())
            {
                return err(
                    format!("{at}.backends[{i}].address"),
                    "a stateless VIP's backends must share one address family (a backend \
                     redirects within the outer header it received)",
                );
            }
        }
        let mut addrs = HashSet::new();
        for (i, b) in self.backends.iter().enumerate() {
            let bat = format!("{at}.backends[{i}]");
            if !addrs.insert(b.address) {
                return err(
                    format!("{bat}.address"),
                    format!("duplicate backend {}", b.address),
                );
            }
            b.validate(&bat, self)?;
        }
        let active = self.backends.iter().filter(|b| b.active()).count();
        if active as u64 * 10 > agent.ring_size as u64 {
            return err(
                "agent.ring_size",
                format!(
                    "{} is too small for the {active} backends of {at}",
                    agent.ring_size
                ),
            );
        }
        Ok(())
    }
}

impl BackendConfig {
    /// One backend of `vip`; `at` names it (`vip[NAME].backends[I]`).
    fn validate(&self, at: &str, vip: &VipConfig) -> Result<(), FieldError> {
        if let Some(why) = unusable_address(self.address) {
            return err(format!("{at}.address"), why);
        }
        health::check_of(vip, self, at)?;
        if self.drain_until.is_some() && !self.drain {
            return err(
                format!("{at}.drain_until"),
                "only for a draining backend (drain = true)",
            );
        }
        if self.weight > MAX_WEIGHT {
            return err(
                format!("{at}.weight"),
                format!("{} is out of range 0..={MAX_WEIGHT}", self.weight),
            );
        }
        if vip.address.is_ipv6() && self.address.is_ipv4() && vip.forwarding == Forwarding::Ipip {
            return err(
                format!("{at}.address"),
                "ipip cannot carry an IPv6 VIP to an IPv4 backend (use gue or an IPv6 backend)",
            );
        }
        if vip.forwarding == Forwarding::L2dsr && vip.address.is_ipv4() != self.address.is_ipv4() {
            return err(
                format!("{at}.address"),
                "l2dsr needs a backend of the VIP's address family",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every TOML example of the README is a config the agent accepts (those without an
    /// `[agent]` table under a minimal one).
    #[test]
    fn the_readmes_examples_parse() {
        let readme = include_str!("../../../README.md");
        let blocks: Vec<&str> = readme
            .split("```toml\n")
            .skip(1)
            .map(|b| b.split("```").next().unwrap())
            .collect();
        assert!(blocks.len() >= 3, "{} TOML blocks", blocks.len());
        for b in blocks {
            let text = if b.contains("[agent]") {
                b.to_string()
            } else {
                format!("[agent]\ninterface = \"eth0\"\n{b}")
            };
            if let Err(e) = Config::parse(&text) {
                panic!("{e:#}\n{text}");
            }
        }
    }

    const GOOD: &str = r#"
[agent]
interface = "eth0"
gateway_mac = "02:00:00:00:00:fe"
encap_source_v4 = "198.18.255.0/24"
encap_source_v6 = "2001:db8:ff::/112"

[[vip]]
name = "web"
address = "198.18.10.1"
port = 80
protocol = "tcp"
backends = [
  { address = "198.18.20.11", weight = 100 },
  { address = "198.18.20.12", weight = 50, mac = "02:00:00:00:20:0c" },
]
"#;

    fn with(f: impl FnOnce(&mut Config)) -> String {
        let mut c = Config::parse(GOOD).unwrap();
        f(&mut c);
        c.validate().unwrap_err().to_string()
    }

    #[test]
    fn a_good_config_round_trips_through_save() {
        let c = Config::parse(GOOD).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lb.toml");
        c.save(&p).unwrap();
        assert_eq!(Config::load(&p).unwrap(), c);
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let e = Config::parse(&GOOD.replace("port = 80", "port = 80\nprot = 1")).unwrap_err();
        assert!(format!("{e:#}").contains("prot"), "{e:#}");
    }

    #[test]
    fn each_bad_value_names_its_field() {
        assert!(
            with(|c| c.agent.ring_size = 65536).starts_with("agent.ring_size: 65536 is not prime")
        );
        assert!(with(|c| c.vips[0].backends[0].weight = 10_001)
            .starts_with("vip[web].backends[0].weight"));
        assert!(
            with(|c| c.vips[0].backends[1].address = c.vips[0].backends[0].address)
                .starts_with("vip[web].backends[1].address: duplicate")
        );
        assert!(with(|c| {
            let v = c.vips[0].clone();
            c.vips.push(VipConfig {
                name: "web2".into(),
                ..v
            })
        })
        .contains("already VIP \"web\""));
        assert!(with(|c| {
            let v = c.vips[0].clone();
            c.vips.push(VipConfig { port: 81, ..v })
        })
        .starts_with("vip[web].name: duplicate"));
        assert!(with(|c| {
            c.vips[0].address = "2001:db8::1".parse().unwrap();
        })
        .contains("ipip cannot carry an IPv6 VIP to an IPv4 backend"));
        // No MAC and no encap source: the agent finds them (next hops, interface address).
        let mut c = Config::parse(GOOD).unwrap();
        c.agent.gateway_mac = None;
        c.agent.encap_source_v4 = None;
        c.vips[0].backends[1].mac = None;
        assert_eq!(c.validate(), Ok(()));
        assert!(c
            .check_encap_sources("eth0")
            .unwrap_err()
            .to_string()
            .starts_with("agent.encap_source_v4: required: vip[web] encapsulates to 198.18.20.11 and eth0 has no global IPv4 address"));
        assert!(with(|c| c.agent.max_vips = 0).starts_with("agent.max_vips"));
        assert!(with(|c| {
            c.agent.max_backends = 1;
        })
        .contains("2 backends (counted per VIP) exceed agent.max_backends = 1"));
        assert!(with(|c| c.vips[0].port = 0).starts_with("vip[web].port"));
    }

    /// Parse errors of typed values: what was given, what is expected, where.
    #[test]
    fn values_are_parsed_into_types_with_reasons() {
        let e = format!(
            "{:#}",
            Config::parse(&GOOD.replace("02:00:00:00:00:fe", "02:00:00:00:fe")).unwrap_err()
        );
        assert!(
            e.contains("\"02:00:00:00:fe\" is not a MAC address (aa:bb:cc:dd:ee:ff)")
                && e.contains("gateway_mac"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            Config::parse(&GOOD.replace("198.18.255.0/24", "198.18.255.0/33")).unwrap_err()
        );
        assert!(
            e.contains("\"198.18.255.0/33\" is not an IPv4 prefix like 198.18.255.0/24")
                && e.contains("encap_source_v4"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            Config::parse(&GOOD.replace("2001:db8:ff::/112", "198.18.255.0/24")).unwrap_err()
        );
        assert!(e.contains("is not an IPv6 prefix like"), "{e}");
        assert!(
            with(|c| c.agent.encap_source_v6 = Some("2001:db8:ff::/64".parse().unwrap()))
                .starts_with("agent.encap_source_v6: /64: at most the low 32 bits")
        );

        let c = Config::parse(GOOD).unwrap();
        assert_eq!(
            c.agent.gateway_mac,
            Some(MacAddr([2, 0, 0, 0, 0, 0xfe])),
            "parsed once, into bytes"
        );
        let v4 = c.agent.encap_source_v4.unwrap();
        assert_eq!(
            (v4.addr().to_string(), v4.prefix_len()),
            ("198.18.255.0".into(), 24)
        );
        assert_eq!(
            c.vips[0].backends[1].mac.unwrap().to_string(),
            "02:00:00:00:20:0c"
        );
    }

    #[test]
    fn mac_addresses_parse_and_print() {
        let m: MacAddr = "02:AB:cd:00:20:0c".parse().unwrap();
        assert_eq!(m.octets(), [0x02, 0xab, 0xcd, 0x00, 0x20, 0x0c]);
        assert_eq!(m.to_string(), "02:ab:cd:00:20:0c");
        for bad in [
            "",
            "02:00:00:00:20",
            "02:00:00:00:20:0c:01",
            "02:00:00:00:20:c",
            "02:00:00:00:20:+c",
            "02-00-00-00-20-0c",
            "zz:00:00:00:20:0c",
        ] {
            let e = bad.parse::<MacAddr>().unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("{bad:?} is not a MAC address (aa:bb:cc:dd:ee:ff)")
            );
        }
    }

    #[test]
    fn stateless_vips_are_tcp_over_gue_with_backends_of_one_family() {
        let ok = Config::parse(&GOOD.replace(
            "protocol = \"tcp\"\n",
            "protocol = \"tcp\"\nmode = \"stateless\"\nforwarding = \"gue\"\n",
        ))
        .unwrap();
        assert_eq!(ok.vips[0].mode, Mode::Stateless);
        ok.validate().unwrap();
        assert_eq!(
            with(|c| c.vips[0].mode = Mode::Stateless),
            "vip[web].mode: stateless needs forwarding = \"gue\" (the secondary backend \
             travels in the GUE header)"
        );
        assert_eq!(
            with(|c| {
                c.vips[0].mode = Mode::Stateless;
                c.vips[0].forwarding = Forwarding::Gue;
                c.vips[0].protocol = Protocol::Udp;
            }),
            "vip[web].mode: stateless needs protocol = \"tcp\" (a backend can look up only a \
             TCP connection; use conntrack for UDP)"
        );
        assert_eq!(
            with(|c| {
                c.vips[0].mode = Mode::Stateless;
                c.vips[0].forwarding = Forwarding::Gue;
                c.vips[0].backends[1].address = "2001:db8::1".parse().unwrap();
            }),
            "vip[web].backends[1].address: a stateless VIP's backends must share one address \
             family (a backend redirects within the outer header it received)"
        );
        assert!(Config::parse(&GOOD.replace(
            "protocol = \"tcp\"\n",
            "protocol = \"tcp\"\nmode = \"stateles\"\n"
        ))
        .unwrap_err()
        .to_string()
        .contains("stateles"));
    }

    #[test]
    fn addresses_that_cannot_work_are_refused_naming_the_field() {
        let cases = [
            ("0.0.0.0", "0.0.0.0 is the unspecified address"),
            ("::", ":: is the unspecified address"),
            ("127.0.0.1", "127.0.0.1 is a loopback address"),
            ("127.1.2.3", "127.1.2.3 is a loopback address"),
            ("::1", "::1 is the loopback address"),
            (
                "255.255.255.255",
                "255.255.255.255 is the broadcast address",
            ),
            ("224.0.0.1", "224.0.0.1 is a multicast address"),
            ("239.1.2.3", "239.1.2.3 is a multicast address"),
            ("ff02::1", "ff02::1 is a multicast address"),
            (
                "::ffff:198.18.20.14",
                "::ffff:198.18.20.14 is an IPv4-mapped IPv6 address: write 198.18.20.14",
            ),
        ];
        for (addr, why) in cases {
            let ip: IpAddr = addr.parse().unwrap();
            assert_eq!(
                with(|c| c.vips[0].address = ip),
                format!("vip[web].address: {why}")
            );
            assert_eq!(
                with(|c| {
                    // gue carries either family to either family: only the address is wrong.
                    c.vips[0].forwarding = Forwarding::Gue;
                    c.vips[0].backends[1].address = ip;
                }),
                format!("vip[web].backends[1].address: {why}")
            );
        }
        for ok in ["198.18.20.14", "2001:db8::14", "10.0.0.1", "198.51.100.255"] {
            assert_eq!(unusable_address(ok.parse().unwrap()), None, "{ok}");
        }
        // Also when read from the file.
        let e = Config::parse(&GOOD.replace("198.18.20.12", "::ffff:198.18.20.12"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("write 198.18.20.12"), "{e}");
    }

    /// The operator's file, with comments everywhere and both ways of writing backends.
    const COMMENTED: &str = r#"# LB config, kept by hand.
[agent]
interface = "eth0"
xdp_mode = "native"                 # native | skb | auto
hash_seed = 1793773                 # the same on every LB host
gateway_mac = "02:00:00:00:00:fe"   # next hop of backends without a mac
encap_source_v4 = "198.18.255.0/24" # outer source
encap_source_v6 = "2001:db8:ff::/112"

# The web site.
[[vip]]
name = "web"            # what the CLI calls it
address = "198.18.10.1"
port = 80
protocol = "tcp"
backends = [
  # rack 1
  { address = "198.18.20.11", weight = 100 },  # the big one
  { address = "198.18.20.12", weight = 50, drain = true },
  { address = "198.18.20.13", weight = 50 },   # small
]

# DNS, one table per backend.
[[vip]]
name = "dns"
address = "198.18.10.2"
port = 53
protocol = "udp"
forwarding = "gue"

[[vip.backends]]
address = "198.18.20.21" # first
weight = 10

# second
[[vip.backends]]
address = "198.18.20.22"

# end of file
"#;

    fn save_to(dir: &Path, text: &str, change: impl FnOnce(&mut Config)) -> (Config, String) {
        let p = dir.join("lb.toml");
        std::fs::write(&p, text).unwrap();
        let mut c = Config::load(&p).unwrap();
        change(&mut c);
        c.save(&p).unwrap();
        let written = std::fs::read_to_string(&p).unwrap();
        assert_eq!(Config::parse(&written).unwrap(), c, "{written}");
        (c, written)
    }

    fn backend(address: &str, weight: u32) -> BackendConfig {
        BackendConfig {
            address: address.parse().unwrap(),
            weight,
            ..Default::default()
        }
    }

    #[test]
    fn backend_changes_keep_the_operators_comments_and_layout() {
        let dir = tempfile::tempdir().unwrap();
        let (_, text) = save_to(dir.path(), COMMENTED, |c| {
            let web = c.vip_mut("web").unwrap();
            web.backends.remove(0); // with its comments
            web.backends[0].drain = false;
            web.backends[1].weight = 3;
            web.backends.push(BackendConfig {
                mac: Some("02:00:00:00:20:0e".parse().unwrap()),
                ..backend("198.18.20.14", 7)
            });
            let dns = c.vip_mut("dns").unwrap();
            dns.backends[0].weight = 11;
            dns.backends.push(BackendConfig {
                drain: true,
                ..backend("198.18.20.23", 100)
            });
        });
        let want = COMMENTED
            .replace(
                r#"  # rack 1
  { address = "198.18.20.11", weight = 100 },  # the big one
  { address = "198.18.20.12", weight = 50, drain = true },
  { address = "198.18.20.13", weight = 50 },   # small
"#,
                r#"  { address = "198.18.20.12", weight = 50 },
  { address = "198.18.20.13", weight = 3 },   # small
  { address = "198.18.20.14", weight = 7, mac = "02:00:00:00:20:0e" },
"#,
            )
            .replace(
                "address = \"198.18.20.21\" # first\nweight = 10\n",
                "address = \"198.18.20.21\" # first\nweight = 11\n",
            )
            .replace(
                "address = \"198.18.20.22\"\n",
                "address = \"198.18.20.22\"\n\n[[vip.backends]]\naddress = \"198.18.20.23\"\nweight = 100\ndrain = true\n",
            );
        assert_eq!(text, want);

        // Removing the last backend of each; adding a key to an inline entry.
        let (_, text) = save_to(dir.path(), COMMENTED, |c| {
            let web = c.vip_mut("web").unwrap();
            web.backends.pop();
            web.backends[0].drain = true;
            c.vip_mut("dns").unwrap().backends.pop();
        });
        let want = COMMENTED
            .replace(
                r#"  { address = "198.18.20.11", weight = 100 },  # the big one
  { address = "198.18.20.12", weight = 50, drain = true },
  { address = "198.18.20.13", weight = 50 },   # small
"#,
                r#"  { address = "198.18.20.11", weight = 100, drain = true },  # the big one
  { address = "198.18.20.12", weight = 50, drain = true },
"#,
            )
            .replace(
                "\n# second\n[[vip.backends]]\naddress = \"198.18.20.22\"\n",
                "",
            );
        assert_eq!(text, want);
    }

    #[test]
    fn vip_and_agent_changes_keep_the_operators_comments_and_layout() {
        let dir = tempfile::tempdir().unwrap();
        let (_, text) = save_to(dir.path(), COMMENTED, |c| {
            c.agent.xdp_mode = XdpMode::Auto;
            c.agent.encap_source_v6 = None;
            c.agent.mtu = Some(1500);
            c.vips.retain(|v| v.name != "web");
            c.vips.push(VipConfig {
                name: "new".into(),
                address: "2001:db8:10::1".parse().unwrap(),
                port: 443,
                protocol: Protocol::Tcp,
                forwarding: Forwarding::Gue,
                affinity: true,
                backends: vec![backend("198.18.20.11", 5), backend("198.18.20.15", 6)],
                ..Default::default()
            });
            c.vip_mut("dns").unwrap().port = 5353;
        });
        let want = r#"# LB config, kept by hand.
[agent]
interface = "eth0"
xdp_mode = "auto"                 # native | skb | auto
hash_seed = 1793773                 # the same on every LB host
gateway_mac = "02:00:00:00:00:fe"   # next hop of backends without a mac
encap_source_v4 = "198.18.255.0/24" # outer source
mtu = 1500

# DNS, one table per backend.
[[vip]]
name = "dns"
address = "198.18.10.2"
port = 5353
protocol = "udp"
forwarding = "gue"

[[vip.backends]]
address = "198.18.20.21" # first
weight = 10

# second
[[vip.backends]]
address = "198.18.20.22"

[[vip]]
name = "new"
address = "2001:db8:10::1"
port = 443
protocol = "tcp"
forwarding = "gue"
affinity = true
backends = [
  { address = "198.18.20.11", weight = 5 },
  { address = "198.18.20.15", weight = 6 },
]

# end of file
"#;
        assert_eq!(text, want);
        // A VIP without backends, then its first backend.
        let (_, text) = save_to(dir.path(), &text, |c| {
            c.vips.push(VipConfig {
                name: "empty".into(),
                backends: vec![],
                ..c.vips[0].clone()
            });
            c.vips[2].port = 5354;
        });
        assert!(
            text.ends_with(
                "\n[[vip]]\nname = \"empty\"\naddress = \"198.18.10.2\"\nport = 5354\n\
                 protocol = \"udp\"\nforwarding = \"gue\"\nbackends = []\n\n# end of file\n"
            ),
            "{text}"
        );
        let (_, text) = save_to(dir.path(), &text, |c| {
            c.vips[2].backends.push(backend("198.18.20.30", 1));
        });
        assert!(
            text.contains(
                "backends = [\n  { address = \"198.18.20.30\", weight = 1 },\n]\n\n# end of file\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn an_unchanged_config_leaves_the_file_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let (_, text) = save_to(dir.path(), COMMENTED, |_| {});
        assert_eq!(text, COMMENTED);
    }

    #[test]
    fn a_file_that_does_not_parse_any_more_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lb.toml");
        let c = Config::parse(GOOD).unwrap();
        let broken = GOOD.replace("port = 80", "port = \"eighty\"");
        std::fs::write(&p, &broken).unwrap();
        let e = format!("{:#}", c.save(&p).unwrap_err());
        assert!(
            e.contains("does not parse") && e.contains("kill -HUP"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&p).unwrap(), broken);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn a_symlinked_config_stays_a_symlink_and_its_target_changes() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::write(real.join("lb.toml"), COMMENTED).unwrap();
        let link = dir.path().join("lb.toml");
        std::os::unix::fs::symlink("real/lb.toml", &link).unwrap();

        let mut c = Config::load(&link).unwrap();
        c.vip_mut("web").unwrap().backends[0].weight = 99;
        c.save(&link).unwrap();

        let meta = std::fs::symlink_metadata(&link).unwrap();
        assert!(meta.file_type().is_symlink(), "the link was replaced");
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            Path::new("real/lb.toml")
        );
        let target = std::fs::read_to_string(real.join("lb.toml")).unwrap();
        assert!(target.contains("weight = 99 },  # the big one"), "{target}");
        assert_eq!(Config::load(&link).unwrap(), c);
        let names = |d: &Path| -> Vec<String> {
            std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(names(&real), ["lb.toml"], "temporary files left");
        let mut top = names(dir.path());
        top.sort();
        assert_eq!(top, ["lb.toml", "real"]);
    }

    #[test]
    fn mode_and_owner_are_kept() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lb.toml");
        std::fs::write(&p, GOOD).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            std::os::unix::fs::chown(&p, Some(4321), Some(4322)).unwrap();
        }
        let before = std::fs::metadata(&p).unwrap();
        let mut c = Config::load(&p).unwrap();
        c.vips[0].backends[0].weight = 7;
        c.save(&p).unwrap();
        let after = std::fs::metadata(&p).unwrap();
        assert_ne!(after.ino(), before.ino(), "replaced by rename");
        assert_eq!(after.mode() & 0o7777, 0o640);
        assert_eq!((after.uid(), after.gid()), (before.uid(), before.gid()));
        if root {
            assert_eq!((after.uid(), after.gid()), (4321, 4322));
        }
        // A new file: 0644.
        let q = dir.path().join("new.toml");
        c.save(&q).unwrap();
        assert_eq!(std::fs::metadata(&q).unwrap().mode() & 0o7777, 0o644);
        assert!(std::fs::read_to_string(&q)
            .unwrap()
            .starts_with("# Written by the lb agent"));
    }

    /// Every field set, changed, and unset again, written into a file that says little.
    #[test]
    fn every_field_round_trips_through_the_file() {
        let full = Config {
            agent: AgentConfig {
                interface: "eth1".into(),
                xdp_mode: XdpMode::Skb,
                hash_seed: 7,
                ring_size: 1009,
                max_vips: 8,
                max_backends: 32,
                max_conns: 4096,
                mtu: Some(9000),
                gateway_mac: Some("02:00:00:00:00:01".parse().unwrap()),
                encap_source_v4: Some("198.18.254.0/23".parse().unwrap()),
                encap_source_v6: Some("2001:db8:fe::/96".parse().unwrap()),
                metrics: Listen::At("[::1]:9100".parse().unwrap()),
            },
            bgp: None,
            vips: vec![
                VipConfig {
                    name: "a".into(),
                    address: "198.18.10.5".parse().unwrap(),
                    port: 8080,
                    protocol: Protocol::Udp,
                    forwarding: Forwarding::L2dsr,
                    mode: Mode::Conntrack,
                    affinity: true,
                    health: Some(HealthSpec {
                        kind: Some(CheckKind::Udp),
                        via: Some(Via::Direct),
                        port: Some(5353),
                        interval_ms: Some(500),
                        fastinter_ms: Some(100),
                        timeout_ms: Some(300),
                        rise: Some(1),
                        fall: Some(4),
                        payload: Some("hello".into()),
                        expect: Some("hello".into()),
                        ..Default::default()
                    }),
                    panic_threshold: Some(30),
                    slow_start_s: 20,
                    backends: vec![BackendConfig {
                        address: "198.18.20.5".parse().unwrap(),
                        weight: 0,
                        drain: true,
                        mac: Some("02:00:00:00:20:05".parse().unwrap()),
                        backup: true,
                        health: Some(HealthSpec {
                            interval_ms: Some(1000),
                            ..Default::default()
                        }),
                        drain_until: Some(1_800_000_000),
                        down: false,
                    }],
                },
                VipConfig {
                    name: "b".into(),
                    address: "2001:db8:10::5".parse().unwrap(),
                    port: 1,
                    protocol: Protocol::Tcp,
                    forwarding: Forwarding::Gue,
                    mode: Mode::Conntrack,
                    affinity: false,
                    health: Some(HealthSpec {
                        kind: Some(CheckKind::Http),
                        path: Some("/healthz".into()),
                        status: Some("200,204".into()),
                        host: Some("web.example".into()),
                        ..Default::default()
                    }),
                    panic_threshold: None,
                    slow_start_s: 0,
                    backends: vec![backend("198.18.20.6", 10_000), backend("2001:db8:20::6", 1)],
                },
            ],
        };
        full.validate().unwrap();
        let changed = {
            let mut c = full.clone();
            let a = &mut c.agent;
            a.interface = "eth2".into();
            a.xdp_mode = XdpMode::Native;
            a.hash_seed = 8;
            a.ring_size = 65537;
            a.max_vips = 9;
            a.max_backends = 33;
            a.max_conns = 4097;
            a.mtu = Some(1400);
            a.gateway_mac = Some("02:00:00:00:00:02".parse().unwrap());
            a.metrics = Listen::Off;
            a.encap_source_v4 = Some("198.18.253.0/24".parse().unwrap());
            a.encap_source_v6 = Some("2001:db8:fd::/120".parse().unwrap());
            let v = &mut c.vips[0];
            v.address = "198.18.10.6".parse().unwrap();
            v.port = 8081;
            v.protocol = Protocol::Tcp;
            v.forwarding = Forwarding::Ipip;
            v.affinity = false;
            v.health = Some(HealthSpec {
                kind: Some(CheckKind::Tcp),
                rise: Some(3),
                ..Default::default()
            });
            v.panic_threshold = Some(50);
            v.slow_start_s = 0;
            let b = &mut v.backends[0];
            b.weight = 3;
            b.drain = false;
            b.mac = Some("02:00:00:00:20:06".parse().unwrap());
            b.backup = false;
            b.health = None;
            b.drain_until = None;
            c.vips[1].backends[1].weight = 2;
            c
        };
        changed.validate().unwrap();
        let bare = {
            let mut c = changed.clone();
            c.agent.mtu = None;
            c.agent.encap_source_v6 = None;
            c.vips.truncate(1);
            c.vips[0].backends[0].mac = None;
            c
        };
        bare.validate().unwrap();

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lb.toml");
        std::fs::write(
            &p,
            "[agent]\ninterface = \"eth0\"\ngateway_mac = \"02:00:00:00:00:fe\"\n",
        )
        .unwrap();
        for (what, c) in [
            ("full", &full),
            ("changed", &changed),
            ("bare", &bare),
            ("full again", &full),
        ] {
            c.save(&p).unwrap();
            let text = std::fs::read_to_string(&p).unwrap();
            assert_eq!(&Config::load(&p).unwrap(), c, "{what}:\n{text}");
        }
    }
}
