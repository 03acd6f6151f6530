//! A whole load-balancing setup in network namespaces: a client, the LB "on a stick" and N
//! backends with real servers, joined by a Linux bridge. The end-to-end tests, `cargo xtask
//! testbed up|down` and the demo are built on it.
//!
//! ```text
//!                       <prefix>-bridge: br0
//!        ┌──────────────────┬──────────┴─────────┬──────────────────┐
//!   <prefix>-client    <prefix>-lb          <prefix>-be1  ...  <prefix>-beN
//!   eth0 198.18.0.100  eth0 198.18.0.2      eth0 198.18.0.11    198.18.0.(10+N)
//!   2001:db8::100      2001:db8::2          2001:db8::11        2001:db8::(10+N)
//!   VIPs via the LB    XDP `lb` (agent);    XDP `decap`; VIP ranges local on lo;
//!                      bridge side: `pass`  lb-testbed-server (HTTP, UDP echo)
//! ```
//!
//! - Everything is named `<prefix>-...`: namespaces, the agent instance `<prefix>-lb` (its
//!   pins `/sys/fs/bpf/<prefix>-lb`, socket `/run/lb/<prefix>-lb.sock`, log
//!   `<tmp>/<prefix>-lb.log`), the pinned `pass`/`decap` links and their maps
//!   (`/sys/fs/bpf/<prefix>-xdp`), the state directory `<tmp>/<prefix>-testbed` (agent
//!   config, server logs). So [`down_prefix`] finds and removes all of it, also after a
//!   crash, and [`leftovers`] tells whether anything remains.
//! - Addresses only from 198.18.0.0/15 and 2001:db8::/32, MACs `02:1b:00:00:00:<host>`
//!   (`02:1b:00:00:01:<host>` on the bridge side). VIPs come from [`VIP4_RANGE`] and
//!   [`VIP6_RANGE`]: the client routes both via the LB, every backend has them as local
//!   routes on `lo` (any VIP in the ranges works without touching the backends) and answers
//!   the client directly (DSR).
//! - The `pass` and `decap` programs are loaded here and their links pinned, so they stay
//!   attached after this process exits ([`Testbed::keep`], `cargo xtask testbed up`).
//!
//! ```no_run
//! # use lb_tests::testbed::*;
//! # fn main() -> anyhow::Result<()> {
//! let mut tb = Testbed::up(TestbedOpts::default())?;
//! let web = ForwardingPath::get("ipip4").tcp();
//! tb.start_agent(&tb.agent_config(&[])?)?;
//! tb.add_vip(&web)?; // through the `lb` CLI, as an operator would
//! let reply = tb.http_get(web.socket_addr(), "/")?;
//! println!("{} answered", reply.backend());
//! tb.down()?; // or drop it
//! # Ok(()) }
//! ```
use std::{
    fmt, fs,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Map, MapData, PerCpuArray},
    programs::{links::FdLink, XdpMode},
};
use lb_userspace::{
    config::{BackendConfig, Config, Forwarding, Protocol, VipConfig, DEFAULT_WEIGHT},
    dataplane::{Dataplane, Sizes},
};

use crate::netns::{
    find_bin, find_lb_bin, fmt_mac, lb, unique_name, veth_pair, Agent, LbOut, Netns, Process,
    VethEnd,
};

/// IPv4 VIPs: routed via the LB by the client, local on every backend.
pub const VIP4_RANGE: &str = "198.18.10.0/24";
/// IPv6 VIPs: routed via the LB by the client, local on every backend.
pub const VIP6_RANGE: &str = "2001:db8:10::/64";
/// Default ports of the backends' servers.
pub const HTTP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 53;
/// Every host's interface into the bridge.
pub const IFACE: &str = "eth0";
/// The bridge, in `<prefix>-bridge`.
pub const BRIDGE: &str = "br0";
pub const MAX_BACKENDS: usize = 50;
/// LB hosts: 198.18.0.2 (`lb`) to 198.18.0.9 (`lb8`).
pub const MAX_LBS: usize = 8;
/// With several LB hosts: the client's network, behind the router.
pub const CLIENT_NET4: &str = "198.18.1.0/24";
pub const CLIENT_NET6: &str = "2001:db8:1::/64";
/// The router's AS and the LB hosts' (one AS for all: the router merges their routes
/// into one multipath route).
pub const ROUTER_ASN: u32 = 65000;
pub const LB_ASN: u32 = 65001;

/// Binaries a testbed runs: processes with one of these names and an argument naming the
/// prefix are the testbed's.
const OWN_BINARIES: [&str; 2] = ["lb", "lb-testbed-server"];

// ---------------------------------------------------------------------------------------
// Hosts and addresses

/// Which host of the testbed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Lb,
    /// Backend `i`, 1-based.
    Backend(u8),
    /// LB host `i` (2-based: the first is [`Role::Lb`]) of a testbed with several.
    ExtraLb(u8),
    /// The router in front of several LB hosts (BGP, ECMP).
    Router,
}

impl Role {
    /// "client", "lb", "be1": the namespace suffix and the bridge port's name.
    pub fn name(self) -> String {
        match self {
            Role::Client => "client".into(),
            Role::Lb => "lb".into(),
            Role::Backend(i) => format!("be{i}"),
            Role::ExtraLb(i) => format!("lb{i}"),
            Role::Router => "router".into(),
        }
    }

    /// The host part of its addresses and MAC.
    fn host(self) -> u8 {
        match self {
            Role::Client => 100,
            Role::Lb => 2,
            Role::Backend(i) => 10 + i,
            Role::ExtraLb(i) => 1 + i,
            Role::Router => 1,
        }
    }

    /// 198.18.0.<host>/24 on `eth0`.
    pub fn v4(self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, self.host())
    }

    /// 2001:db8::<host>/64 on `eth0` (the host number written in decimal digits).
    pub fn v6(self) -> Ipv6Addr {
        format!("2001:db8::{}", self.host()).parse().unwrap()
    }

    /// `eth0`'s MAC.
    pub fn mac(self) -> [u8; 6] {
        [0x02, 0x1b, 0, 0, 0, self.host()]
    }

    /// The MAC of its port's bridge-side end.
    pub fn bridge_mac(self) -> [u8; 6] {
        [0x02, 0x1b, 0, 0, 1, self.host()]
    }
}

/// One host: a namespace with `eth0` into the bridge.
#[derive(Debug)]
pub struct Host {
    pub role: Role,
    /// "client", "lb", "be1", ...
    pub name: String,
    pub ns: Netns,
    pub mac: [u8; 6],
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl Host {
    /// The namespace's name, for `ip netns exec`.
    pub fn netns(&self) -> &str {
        self.ns.name()
    }

    /// Its IPv6 or IPv4 address on `eth0`.
    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 {
            self.v6.into()
        } else {
            self.v4.into()
        }
    }

    /// Run `f` on a thread inside this host's namespace (sockets opened there stay there).
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        self.ns.run_in(f)
    }

    /// `ip netns exec <ns> args...`
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        self.ns.exec(args)
    }
}

// ---------------------------------------------------------------------------------------
// VIPs

/// A VIP to configure on the testbed: its backends are the testbed's backends.
#[derive(Clone, Debug, PartialEq)]
pub struct VipSpec {
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub forwarding: Forwarding,
    /// `conntrack` (default) or `stateless`.
    pub mode: lb_userspace::config::Mode,
    /// Use the backends' IPv6 (else IPv4) addresses: ipip 4-in-6, gue 4-in-6 / 6-in-4.
    pub backends_v6: bool,
    /// Weight of each testbed backend in order; missing entries get the default weight.
    pub weights: Vec<u32>,
    /// The VIP's `health` table (`None`: the defaults).
    pub health: Option<lb_userspace::config::HealthSpec>,
    /// Testbed backends (by index) that are backups.
    pub backups: Vec<usize>,
    pub panic_threshold: Option<u8>,
    pub slow_start_s: u32,
}

impl VipSpec {
    /// Backends of the VIP's own family, default weights.
    pub fn new(
        name: &str,
        address: IpAddr,
        port: u16,
        protocol: Protocol,
        forwarding: Forwarding,
    ) -> VipSpec {
        VipSpec {
            name: name.into(),
            address,
            port,
            protocol,
            forwarding,
            mode: Default::default(),
            backends_v6: address.is_ipv6(),
            weights: Vec::new(),
            health: None,
            backups: Vec::new(),
            panic_threshold: None,
            slow_start_s: 0,
        }
    }

    /// TCP to [`HTTP_PORT`].
    pub fn tcp(name: &str, address: impl Into<IpAddr>, forwarding: Forwarding) -> VipSpec {
        VipSpec::new(name, address.into(), HTTP_PORT, Protocol::Tcp, forwarding)
    }

    /// UDP to [`UDP_PORT`].
    pub fn udp(name: &str, address: impl Into<IpAddr>, forwarding: Forwarding) -> VipSpec {
        VipSpec::new(name, address.into(), UDP_PORT, Protocol::Udp, forwarding)
    }

    /// TCP to [`HTTP_PORT`] over GUE, stateless (second chance).
    pub fn stateless(name: &str, address: impl Into<IpAddr>) -> VipSpec {
        let mut v = VipSpec::tcp(name, address, Forwarding::Gue);
        v.mode = lb_userspace::config::Mode::Stateless;
        v
    }

    pub fn with_backends_v6(mut self, v6: bool) -> VipSpec {
        self.backends_v6 = v6;
        self
    }

    pub fn with_weights(mut self, weights: &[u32]) -> VipSpec {
        self.weights = weights.to_vec();
        self
    }

    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }

    fn weight(&self, i: usize) -> u32 {
        self.weights.get(i).copied().unwrap_or(DEFAULT_WEIGHT)
    }
}

/// One way a packet can travel from the LB to a backend: forwarding mode, VIP family and
/// backend (outer) family. Each has its own VIP address in the VIP ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardingPath {
    pub label: &'static str,
    pub forwarding: Forwarding,
    pub vip_v6: bool,
    pub backends_v6: bool,
    /// Host part of the VIP: 198.18.10.<n> or 2001:db8:10::<n>.
    pub n: u8,
}

const fn path(
    label: &'static str,
    forwarding: Forwarding,
    vip_v6: bool,
    backends_v6: bool,
    n: u8,
) -> ForwardingPath {
    ForwardingPath {
        label,
        forwarding,
        vip_v6,
        backends_v6,
        n,
    }
}

/// Every forwarding path the data plane has.
pub const FORWARDING_PATHS: [ForwardingPath; 9] = [
    path("ipip4", Forwarding::Ipip, false, false, 1),
    path("ipip6", Forwarding::Ipip, true, true, 1),
    path("gue4", Forwarding::Gue, false, false, 2),
    path("gue6", Forwarding::Gue, true, true, 2),
    path("l2dsr4", Forwarding::L2dsr, false, false, 3),
    path("l2dsr6", Forwarding::L2dsr, true, true, 3),
    path("ipip4in6", Forwarding::Ipip, false, true, 4),
    path("gue4in6", Forwarding::Gue, false, true, 5),
    path("gue6in4", Forwarding::Gue, true, false, 5),
];

impl ForwardingPath {
    /// The path labelled `label` ("ipip4", "gue6in4", ...); panics if there is none.
    pub fn get(label: &str) -> ForwardingPath {
        *FORWARDING_PATHS
            .iter()
            .find(|p| p.label == label)
            .unwrap_or_else(|| panic!("no forwarding path {label:?}"))
    }

    pub fn vip(&self) -> IpAddr {
        if self.vip_v6 {
            Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, self.n as u16).into()
        } else {
            Ipv4Addr::new(198, 18, 10, self.n).into()
        }
    }

    /// "<label>-http": TCP port [`HTTP_PORT`].
    pub fn tcp(&self) -> VipSpec {
        VipSpec::tcp(&format!("{}-http", self.label), self.vip(), self.forwarding)
            .with_backends_v6(self.backends_v6)
    }

    /// "<label>-udp": UDP port [`UDP_PORT`].
    pub fn udp(&self) -> VipSpec {
        VipSpec::udp(&format!("{}-udp", self.label), self.vip(), self.forwarding)
            .with_backends_v6(self.backends_v6)
    }
}

/// A TCP and a UDP VIP for every forwarding path.
pub fn standard_vips() -> Vec<VipSpec> {
    FORWARDING_PATHS
        .iter()
        .flat_map(|p| [p.tcp(), p.udp()])
        .collect()
}

// ---------------------------------------------------------------------------------------
// The testbed

/// What [`Testbed::up`] builds.
#[derive(Clone, Debug)]
pub struct TestbedOpts {
    /// Names of everything start with `<prefix>-`. Letters, digits, '-', '_', '.';
    /// at least 3 characters, starting with a letter.
    pub prefix: String,
    pub backends: usize,
    pub tcp_ports: Vec<u16>,
    pub udp_ports: Vec<u16>,
    /// The server binary; default: `lb-testbed-server` of this build (or
    /// `$LB_TESTBED_SERVER`).
    pub server_bin: Option<PathBuf>,
    /// Start the servers and the agent in process groups of their own, to outlive the
    /// terminal (for a testbed that is [kept](Testbed::keep)).
    pub detach: bool,
    /// LB hosts. More than one: the client sits behind a router (its own namespace,
    /// BIRD 2, multipath routes with an L4 hash) that learns the VIPs from every LB's
    /// agent by BGP; see [`Testbed::start_agent_on`].
    pub lbs: usize,
}

impl Default for TestbedOpts {
    /// Prefix `lbtestbed-<pid>-<n>`, 3 backends, HTTP on port 80, UDP echo on port 53.
    fn default() -> Self {
        TestbedOpts {
            prefix: unique_name("lbtestbed"),
            backends: 3,
            tcp_ports: vec![HTTP_PORT],
            udp_ports: vec![UDP_PORT],
            server_bin: None,
            detach: false,
            lbs: 1,
        }
    }
}

impl TestbedOpts {
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.into();
        self
    }

    pub fn backends(mut self, n: usize) -> Self {
        self.backends = n;
        self
    }

    pub fn server_bin(mut self, path: impl Into<PathBuf>) -> Self {
        self.server_bin = Some(path.into());
        self
    }

    pub fn detach(mut self, detach: bool) -> Self {
        self.detach = detach;
        self
    }

    pub fn lbs(mut self, n: usize) -> Self {
        self.lbs = n;
        self
    }
}

/// Capacities of the data plane whose `pass` and `decap` programs the testbed attaches
/// (their maps are unused but for `DECAP_STATS`).
const XDP_SIZES: Sizes = Sizes {
    max_vips: 1,
    max_backends: 1,
    max_conns: 1024,
    ring_stride: 2,
};

/// A running testbed. Dropping it (or [`Testbed::down`]) removes everything it made;
/// [`Testbed::keep`] leaves it running.
pub struct Testbed {
    prefix: String,
    opts: TestbedOpts,
    /// Hosts in order: client, lb, be1, ...
    hosts: Vec<Host>,
    bridge: Option<Netns>,
    servers: Vec<Process>,
    xdp_pins: Option<PathBuf>,
    server_bin: Option<PathBuf>,
    /// One per LB host (the first is `lb`'s).
    agents: Vec<Option<Agent>>,
    /// BIRD on the router (several LB hosts).
    router_bird: Option<Process>,
    dir: Option<StateDir>,
    torn_down: bool,
}

impl fmt::Debug for Testbed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Testbed")
            .field("prefix", &self.prefix)
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

impl Testbed {
    /// Build it all; on any error, remove what was built. Fails if anything with the
    /// prefix exists already (see [`down_prefix`]).
    pub fn up(opts: TestbedOpts) -> Result<Testbed> {
        check_prefix(&opts.prefix)?;
        if !(1..=MAX_LBS).contains(&opts.lbs) {
            bail!("lbs: {} is out of range 1..={MAX_LBS}", opts.lbs);
        }
        if !(1..=MAX_BACKENDS).contains(&opts.backends) {
            bail!(
                "backends: {} is out of range 1..={MAX_BACKENDS}",
                opts.backends
            );
        }
        let left = leftovers(&opts.prefix)?;
        if !left.is_empty() {
            bail!(
                "a testbed with prefix {:?} exists already ({left}); remove it first: \
                 `cargo xtask testbed down --prefix {}`",
                opts.prefix,
                opts.prefix
            );
        }
        let server_bin = match &opts.server_bin {
            Some(p) => p.clone(),
            None => find_bin("lb-testbed-server", Some("LB_TESTBED_SERVER")).context(
                "build it with `cargo build --release -p lb-tests --bins`, or set \
                 LB_TESTBED_SERVER",
            )?,
        };
        lb_userspace::agent::ensure_bpffs()?;
        let prefix = opts.prefix.clone();
        let mut tb = Testbed {
            prefix: prefix.clone(),
            opts: opts.clone(),
            hosts: Vec::new(),
            bridge: None,
            servers: Vec::new(),
            xdp_pins: None,
            server_bin: None,
            agents: (0..opts.lbs).map(|_| None).collect(),
            router_bird: None,
            dir: None,
            torn_down: false,
        };
        // From here on, an error drops `tb`, which removes whatever exists.
        tb.dir = Some(StateDir::create(&state_dir(&prefix))?);
        tb.build_network()?;
        tb.attach_xdp()?;
        tb.start_servers(&server_bin)?;
        if tb.has_router() {
            tb.start_router()?;
        }
        Ok(tb)
    }

    /// Several LB hosts: a router in front, the client behind it.
    pub fn has_router(&self) -> bool {
        self.opts.lbs > 1
    }

    fn build_network(&mut self) -> Result<()> {
        let p = &self.prefix;
        let routed = self.has_router();
        let bridge = Netns::create(&format!("{p}-bridge"))?;
        bridge.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        bridge.ip(&["link", "set", BRIDGE, "up"])?;
        self.bridge = Some(bridge);
        // Hosts in this order: client, lb, be1..beN, lb2..lbK, router.
        let roles = [Role::Client, Role::Lb]
            .into_iter()
            .chain((1..=self.opts.backends as u8).map(Role::Backend))
            .chain((2..=self.opts.lbs as u8).map(Role::ExtraLb))
            .chain(routed.then_some(Role::Router));
        let router = Role::Router;
        // Where the LB hosts and the backends send what is not on the bridge.
        let gateway = if routed { router } else { Role::Client };
        for role in roles {
            let name = role.name();
            let ns = Netns::create(&format!("{p}-{name}"))?;
            let bridge = self.bridge.as_ref().unwrap();
            let (mut v4, mut v6) = (role.v4(), role.v6());
            if role == Role::Client && routed {
                // Behind the router, on a link of its own.
                v4 = Ipv4Addr::new(198, 18, 1, 100);
                v6 = "2001:db8:1::100".parse().unwrap();
            } else {
                let (a4, a6) = (format!("{v4}/24"), format!("{v6}/64"));
                veth_pair(
                    &VethEnd {
                        ns: &ns,
                        name: IFACE,
                        mac: role.mac(),
                        addrs: &[&a4, &a6],
                    },
                    &VethEnd {
                        ns: bridge,
                        name: &name,
                        mac: role.bridge_mac(),
                        addrs: &[],
                    },
                )?;
                bridge.ip(&["link", "set", &name, "master", BRIDGE])?;
                if routed && matches!(role, Role::Lb | Role::ExtraLb(_)) {
                    // A switch floods frames for a MAC it has not learned (or forgot: a
                    // port went down) to every port, and XDP sees them whatever their
                    // destination MAC: an LB would forward another LB's traffic. An LB's
                    // NIC filters by MAC; here, the bridge does not flood to the LB ports of
                    // a testbed with several (each LB's BGP keepalives, every second, keep
                    // its MAC learned).
                    bridge.exec(&["bridge", "link", "set", "dev", &name, "flood", "off"])?;
                }
                // Checksum offload would hand XDP (and so the backends) partial checksums.
                ns.exec(&["ethtool", "-K", IFACE, "tx", "off"])
                    .context("ethtool (installed by scripts/setup.sh)")?;
            }
            let host = Host {
                role,
                name,
                ns,
                mac: role.mac(),
                v4,
                v6,
            };
            match role {
                Role::Client if !routed => {
                    let lb = Role::Lb;
                    host.ns
                        .ip(&["route", "add", VIP4_RANGE, "via", &lb.v4().to_string()])?;
                    host.ns.ip(&[
                        "-6",
                        "route",
                        "add",
                        VIP6_RANGE,
                        "via",
                        &lb.v6().to_string(),
                    ])?;
                }
                Role::Client => {} // linked to the router below
                Role::Lb | Role::ExtraLb(_) => {
                    // A default route, as an LB host has (without a router the client
                    // stands in for it): health probes to a VIP are routed by the host,
                    // then `hc_encap` sends them to their backend.
                    host.ns
                        .ip(&["route", "add", "default", "via", &gateway.v4().to_string()])?;
                    host.ns.ip(&[
                        "-6",
                        "route",
                        "add",
                        "default",
                        "via",
                        &gateway.v6().to_string(),
                    ])?;
                }
                Role::Backend(_) => {
                    // The VIPs are local (routes of type local on lo: every address of
                    // the ranges), answered directly to the client, never announced.
                    host.ns
                        .ip(&["route", "add", "local", VIP4_RANGE, "dev", "lo"])?;
                    host.ns
                        .ip(&["-6", "route", "add", "local", VIP6_RANGE, "dev", "lo"])?;
                    for k in ["all", "default", "lo", IFACE] {
                        host.ns
                            .sysctl(&format!("net.ipv4.conf.{k}.rp_filter"), "0")?;
                    }
                    host.ns.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
                    host.ns.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
                    // Stateless VIPs: decap hands a second-chance redirect whose next hop
                    // is not resolved yet to the stack, which forwards it (and resolves
                    // the neighbour for the next one). No ICMP redirects about it.
                    for (k, v) in [
                        ("net.ipv4.ip_forward", "1"),
                        ("net.ipv6.conf.all.forwarding", "1"),
                        ("net.ipv4.conf.all.send_redirects", "0"),
                        ("net.ipv4.conf.default.send_redirects", "0"),
                    ] {
                        host.ns.sysctl(k, v)?;
                    }
                    if routed {
                        host.ns.ip(&[
                            "route",
                            "add",
                            CLIENT_NET4,
                            "via",
                            &router.v4().to_string(),
                        ])?;
                        host.ns.ip(&[
                            "-6",
                            "route",
                            "add",
                            CLIENT_NET6,
                            "via",
                            &router.v6().to_string(),
                        ])?;
                    }
                    // IPv6 has no arp_announce: the backend would solicit its next hop's
                    // MAC from the VIP, and the answer would follow the route to the VIPs
                    // (an LB), losing the first reply of each backend. Here, a static entry.
                    host.ns.ip(&[
                        "-6",
                        "neigh",
                        "replace",
                        &gateway.v6().to_string(),
                        "lladdr",
                        &fmt_mac(gateway.mac()),
                        "dev",
                        IFACE,
                        "nud",
                        "permanent",
                    ])?;
                }
                Role::Router => {
                    for (k, v) in [
                        ("net.ipv4.ip_forward", "1"),
                        ("net.ipv6.conf.all.forwarding", "1"),
                        // ECMP by the 5-tuple, not by addresses only.
                        ("net.ipv4.fib_multipath_hash_policy", "1"),
                        ("net.ipv6.fib_multipath_hash_policy", "1"),
                        ("net.ipv4.conf.all.rp_filter", "0"),
                        ("net.ipv4.conf.default.rp_filter", "0"),
                    ] {
                        host.ns.sysctl(k, v)?;
                    }
                }
            }
            self.hosts.push(host);
        }
        if routed {
            let (client, router) = (&self.hosts[0], self.hosts.last().unwrap());
            veth_pair(
                &VethEnd {
                    ns: &client.ns,
                    name: IFACE,
                    mac: Role::Client.mac(),
                    addrs: &["198.18.1.100/24", "2001:db8:1::100/64"],
                },
                &VethEnd {
                    ns: &router.ns,
                    name: "eth1",
                    mac: [0x02, 0x1b, 0, 0, 2, 1],
                    addrs: &["198.18.1.1/24", "2001:db8:1::1/64"],
                },
            )?;
            for h in [client, router] {
                for i in ["eth0", "eth1"] {
                    if h.ns.ip(&["link", "show", i]).is_ok() {
                        h.ns.exec(&["ethtool", "-K", i, "tx", "off"])?;
                    }
                }
            }
            client
                .ns
                .ip(&["route", "add", "default", "via", "198.18.1.1"])?;
            client
                .ns
                .ip(&["-6", "route", "add", "default", "via", "2001:db8:1::1"])?;
        }
        Ok(())
    }

    /// BIRD on the router: a BGP session with every LB host (BFD on), their VIP routes
    /// merged into multipath routes in the kernel.
    fn start_router(&mut self) -> Result<()> {
        let conf = self.dir().join("router-bird.conf");
        let mut c = format!(
            "router id {r};\nlog stderr all;\nprotocol device {{ scan time 1; }}\n\
             protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths on; }}\n\
             protocol kernel {{ ipv6 {{ import none; export all; }}; merge paths on; }}\n\
             protocol bfd {{ interface \"{IFACE}\" {{ interval 100 ms; multiplier 3; }}; }}\n\
             template bgp lbs {{\n  local {r} as {ROUTER_ASN};\n  hold time 3; keepalive time 1;\n  \
             connect delay time 1; connect retry time 1; error wait time 1, 5;\n  bfd on;\n  \
             ipv4 {{ import all; export none; }};\n  ipv6 {{ import all; export none; }};\n}}\n",
            r = Role::Router.v4()
        );
        for h in self.lbs() {
            c += &format!(
                "protocol bgp {} from lbs {{ neighbor {} as {LB_ASN}; }}\n",
                h.name, h.v4
            );
        }
        fs::write(&conf, c)?;
        let sock = self.dir().join("router-bird.ctl");
        let log = self.dir().join("router-bird.log");
        let conf_s = conf.display().to_string();
        let sock_s = sock.display().to_string();
        let router = self.router().context("no router")?;
        let p = Process::spawn(
            &router.ns,
            Path::new("bird"),
            &["-f", "-c", &conf_s, "-s", &sock_s],
            &log,
            self.opts.detach,
        )
        .context("starting BIRD on the router (Debian's bird2; scripts/setup.sh)")?;
        self.router_bird = Some(p);
        Ok(())
    }

    /// `birdc` on the router's BIRD.
    pub fn router_birdc(&self, args: &[&str]) -> Result<String> {
        let sock = self.dir().join("router-bird.ctl");
        lb_userspace::bgp::birdc(&sock, args)
    }

    /// The router's route to `dst` (`ip route show`), e.g. the multipath route to a VIP.
    pub fn router_route(&self, dst: IpAddr) -> Result<String> {
        let r = self.router().context("no router")?;
        let fam = if dst.is_ipv6() { "-6" } else { "-4" };
        r.ns.ip(&[fam, "route", "show", &dst.to_string()])
    }

    /// `pass` on the LB's and the backends' bridge ports (frames the LB sends with XDP_TX,
    /// and a backend's second-chance redirects, arrive there as XDP frames, which a veth
    /// drops unless it runs XDP itself), `decap` on every backend's `eth0`. Links and maps
    /// are pinned under `/sys/fs/bpf/<prefix>-xdp`.
    fn attach_xdp(&mut self) -> Result<()> {
        let dir = xdp_pin_dir(&self.prefix);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        self.xdp_pins = Some(dir.clone());
        let mut dp = Dataplane::load_at(XDP_SIZES, &dir)?;
        let bridge = self.bridge.as_ref().unwrap();
        for lb in self.lbs() {
            attach_pinned(
                &mut dp,
                bridge,
                &lb.name,
                "pass",
                &dir.join(format!("pass-{}", lb.name)),
            )?;
        }
        for be in self.backends() {
            attach_pinned(
                &mut dp,
                &be.ns,
                IFACE,
                "decap",
                &dir.join(format!("decap-{}", be.name)),
            )?;
            attach_pinned(
                &mut dp,
                bridge,
                &be.name,
                "pass",
                &dir.join(format!("pass-{}", be.name)),
            )?;
        }
        Ok(())
    }

    fn start_servers(&mut self, bin: &Path) -> Result<()> {
        self.server_bin = Some(bin.to_path_buf());
        for i in 0..self.opts.backends {
            let p = self.spawn_server(i)?;
            self.servers.push(p);
        }
        for i in 0..self.opts.backends {
            self.wait_server(i)?;
        }
        Ok(())
    }

    fn spawn_server(&self, i: usize) -> Result<Process> {
        let bin = self.server_bin.clone().context("no server binary")?;
        let (tcp, udp) = (&self.opts.tcp_ports, &self.opts.udp_ports);
        let be = &self.hosts[2 + i];
        let mut args = vec![
            "--name".to_string(),
            be.name.clone(),
            "--testbed".into(),
            self.prefix.clone(),
        ];
        for p in tcp {
            args.extend(["--tcp".into(), p.to_string()]);
        }
        for p in udp {
            args.extend(["--udp".into(), p.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = self.dir().join(format!("server-{}.log", be.name));
        Process::spawn(&be.ns, &bin, &args, &log, self.opts.detach)
    }

    /// Ready when server `i` answers on every port (from inside its namespace).
    fn wait_server(&mut self, i: usize) -> Result<()> {
        let (tcp, udp) = (self.opts.tcp_ports.clone(), self.opts.udp_ports.clone());
        let deadline = Instant::now() + Duration::from_secs(10);
        let name = self.hosts[2 + i].name.clone();
        loop {
            self.servers[i].check_running()?;
            let be = &self.hosts[2 + i];
            let ok = be.run_in(|| {
                let t = Duration::from_millis(200);
                tcp.iter().all(|&p| {
                    TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, p).into(), t).is_ok()
                }) && udp.iter().all(|&p| {
                    [
                        IpAddr::from(Ipv4Addr::LOCALHOST),
                        Ipv6Addr::LOCALHOST.into(),
                    ]
                    .iter()
                    .all(|a| {
                        udp_request(SocketAddr::new(*a, p), b"ready?", t)
                            .is_ok_and(|r| r.backend == name)
                    })
                })
            })?;
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "server on {name} not answering after 10 s; log:\n{}",
                    self.servers[i].log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Take `decap` off backend `i`'s interface: IP-in-IP and GUE to it are dropped from
    /// now on (its kernel has no tunnel devices), plain traffic still arrives.
    pub fn detach_decap(&self, i: usize) -> Result<()> {
        let dir = self.xdp_pins.as_ref().context("testbed is down")?;
        let pin = dir.join(format!("decap-{}", self.hosts[2 + i].name));
        let link = aya::programs::links::PinnedLink::from_pin(&pin)
            .with_context(|| format!("opening {}", pin.display()))?;
        drop(link.unpin()?); // the last reference: detached
        Ok(())
    }

    /// Kill backend `i`'s server (SIGKILL): its ports refuse connections from now on.
    pub fn kill_server(&mut self, i: usize) {
        self.servers[i].kill();
    }

    /// Start backend `i`'s server again; returns once it answers.
    pub fn restart_server(&mut self, i: usize) -> Result<()> {
        self.servers[i].kill();
        self.servers[i] = self.spawn_server(i)?;
        self.wait_server(i)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn client(&self) -> &Host {
        &self.hosts[0]
    }

    pub fn lb_host(&self) -> &Host {
        &self.hosts[1]
    }

    pub fn backends(&self) -> &[Host] {
        &self.hosts[2..2 + self.opts.backends]
    }

    /// Every LB host: `lb`, then `lb2`, `lb3`, ...
    pub fn lbs(&self) -> Vec<&Host> {
        let extra = &self.hosts[2 + self.opts.backends..];
        std::iter::once(&self.hosts[1])
            .chain(extra.iter().filter(|h| matches!(h.role, Role::ExtraLb(_))))
            .collect()
    }

    /// The router in front of several LB hosts.
    pub fn router(&self) -> Option<&Host> {
        self.hosts.iter().find(|h| h.role == Role::Router)
    }

    /// Client, LB, backends (then the other LB hosts and the router, if any).
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The bridge's namespace.
    pub fn bridge(&self) -> &Netns {
        self.bridge.as_ref().expect("testbed is down")
    }

    /// `<tmp>/<prefix>-testbed`: the agent's config file, server logs.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("testbed is down").path()
    }

    /// The agent's instance name: `<prefix>-lb`.
    pub fn instance(&self) -> String {
        format!("{}-lb", self.prefix)
    }

    /// The instance name of the agent on LB host `k` (0-based): `<prefix>-lb`,
    /// `<prefix>-lb2`, ...
    pub fn instance_on(&self, k: usize) -> String {
        format!("{}-{}", self.prefix, self.lbs()[k].name)
    }

    /// Where [`Testbed::start_agent`] writes the agent's config.
    pub fn config_path(&self) -> PathBuf {
        self.dir().join("lb.toml")
    }

    /// The `[agent]` table for the LB: native XDP on `eth0`, small maps. Nothing else: the
    /// agent finds the backends' MACs (routes and neighbours) and the outer source of
    /// encapsulated packets (the interface's addresses) itself.
    pub fn agent_table() -> Config {
        Config::parse(&format!(
            r#"[agent]
interface = "{IFACE}"
xdp_mode = "native"
ring_size = 16381
max_vips = 32
max_backends = 256
max_conns = 65536
"#
        ))
        .expect("the agent table is valid")
    }

    /// A VIP whose backends are this testbed's backends (addresses only: the agent
    /// resolves their MACs).
    pub fn vip_config(&self, spec: &VipSpec) -> VipConfig {
        VipConfig {
            name: spec.name.clone(),
            address: spec.address,
            port: spec.port,
            protocol: spec.protocol,
            forwarding: spec.forwarding,
            mode: spec.mode,
            affinity: false,
            backends: self
                .backends()
                .iter()
                .enumerate()
                .map(|(i, b)| BackendConfig {
                    address: b.addr(spec.backends_v6),
                    weight: spec.weight(i),
                    backup: spec.backups.contains(&i),
                    ..Default::default()
                })
                .collect(),
            health: spec.health.clone(),
            panic_threshold: spec.panic_threshold,
            slow_start_s: spec.slow_start_s,
        }
    }

    /// An agent config for the LB with these VIPs (validated).
    pub fn agent_config(&self, vips: &[VipSpec]) -> Result<Config> {
        let mut cfg = Self::agent_table();
        cfg.vips = vips.iter().map(|v| self.vip_config(v)).collect();
        cfg.validate()
            .map_err(|e| anyhow!("testbed agent config: {e}"))?;
        Ok(cfg)
    }

    /// [`Testbed::agent_config`] as TOML text.
    pub fn agent_config_toml(&self, vips: &[VipSpec]) -> Result<String> {
        Ok(toml::to_string_pretty(&self.agent_config(vips)?)?)
    }

    /// Write `cfg` to [`Testbed::config_path`] and start `lb agent` on the LB as instance
    /// `<prefix>-lb`; returns once it answers. Stopped (and unpinned) with the testbed.
    pub fn start_agent(&mut self, cfg: &Config) -> Result<&Agent> {
        self.start_agent_on(0, cfg)
    }

    /// [`Testbed::start_agent`] on LB host `k` (0-based), instance
    /// [`Testbed::instance_on`], config `lb.toml`, `lb2.toml`, ...
    pub fn start_agent_on(&mut self, k: usize, cfg: &Config) -> Result<&Agent> {
        if self.agents[k].is_some() {
            bail!("the agent on {} is running already", self.lbs()[k].name);
        }
        let path = self.config_path_on(k);
        cfg.save(&path)?;
        let mut agent = Agent::with_instance(&self.lbs()[k].ns, &path, &self.instance_on(k));
        if self.opts.detach {
            agent = agent.in_own_process_group();
        }
        agent.spawn()?;
        Ok(self.agents[k].insert(agent))
    }

    /// Where the agent of LB host `k` keeps its config.
    pub fn config_path_on(&self, k: usize) -> PathBuf {
        if k == 0 {
            self.config_path()
        } else {
            self.dir().join(format!("{}.toml", self.lbs()[k].name))
        }
    }

    /// The `[bgp]` table for LB host `k`: its addresses as next hops, the router as the
    /// one neighbour.
    pub fn bgp_config_on(&self, k: usize) -> lb_userspace::config::bgp::BgpConfig {
        let h = self.lbs()[k];
        lb_userspace::config::bgp::BgpConfig {
            local_asn: LB_ASN,
            next_hop: h.v4,
            next_hop_v6: Some(h.v6),
            router_id: None,
            hold_time_s: 3,
            bfd: true,
            bfd_interval_ms: 100,
            neighbors: vec![lb_userspace::config::bgp::Neighbor {
                address: Role::Router.v4(),
                asn: ROUTER_ASN,
            }],
            bird: "bird".into(),
        }
    }

    /// [`Testbed::agent_config`] for LB host `k`, with its `[bgp]` when there is a router.
    pub fn agent_config_on(&self, k: usize, vips: &[VipSpec]) -> Result<Config> {
        let mut cfg = self.agent_config(vips)?;
        if self.has_router() {
            cfg.bgp = Some(self.bgp_config_on(k));
        }
        cfg.validate()
            .map_err(|e| anyhow!("testbed agent config: {e}"))?;
        Ok(cfg)
    }

    /// The running agent (see [`Testbed::start_agent`]).
    pub fn agent(&self) -> Option<&Agent> {
        self.agents[0].as_ref()
    }

    pub fn agent_mut(&mut self) -> Option<&mut Agent> {
        self.agents[0].as_mut()
    }

    /// The agent of LB host `k`.
    pub fn agent_on(&self, k: usize) -> Option<&Agent> {
        self.agents[k].as_ref()
    }

    pub fn agent_on_mut(&mut self, k: usize) -> Option<&mut Agent> {
        self.agents[k].as_mut()
    }

    /// Forget the agent of LB host `k` without stopping it (it was killed, or a test
    /// stops it itself); its data plane stays until the testbed goes.
    pub fn take_agent_on(&mut self, k: usize) -> Option<Agent> {
        self.agents[k].take()
    }

    /// `lb --instance <instance of LB host k> args...`
    pub fn lb_on(&self, k: usize, args: &[&str]) -> LbOut {
        let inst = self.instance_on(k);
        let mut a = vec!["--instance", inst.as_str()];
        a.extend_from_slice(args);
        lb(&a)
    }

    /// Packets the `lb` program of LB host `k` counted for VIP `name` (`lb stats`; 0 if
    /// the agent does not answer).
    pub fn vip_packets_on(&self, k: usize, name: &str) -> u64 {
        let out = self.lb_on(k, &["--json", "stats"]);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
        v["vips"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|x| x["name"] == name)
            .and_then(|x| x["packets"].as_u64())
            .unwrap_or(0)
    }

    /// `lb --instance <prefix>-lb args...`
    pub fn lb(&self, args: &[&str]) -> LbOut {
        self.lb_on(0, args)
    }

    /// `lb --instance <prefix>-lb --json args...`, parsed.
    pub fn lb_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.lb(&a);
        if !out.ok() {
            bail!("`lb {}` failed: {}", args.join(" "), out.stderr.trim());
        }
        serde_json::from_str(&out.stdout)
            .with_context(|| format!("`lb {}`: not JSON: {}", args.join(" "), out.stdout))
    }

    /// The `lb` commands (arguments after `lb --instance ...`) that create `spec`:
    /// `vip add`, then one `backend add` per testbed backend.
    pub fn cli_commands(&self, spec: &VipSpec) -> Vec<Vec<String>> {
        let v = self.vip_config(spec);
        let mut cmds = vec![vec![
            "vip".to_string(),
            "add".into(),
            v.name.clone(),
            v.address.to_string(),
            v.port.to_string(),
            v.protocol.to_string(),
            "--forwarding".into(),
            v.forwarding.to_string(),
        ]];
        if v.mode != Default::default() {
            cmds[0].extend(["--mode".into(), v.mode.to_string()]);
        }
        for b in &v.backends {
            cmds.push(vec![
                "backend".into(),
                "add".into(),
                v.name.clone(),
                b.address.to_string(),
                "--weight".into(),
                b.weight.to_string(),
            ]);
        }
        cmds
    }

    /// Create `spec` in the running agent through the `lb` CLI ([`Testbed::cli_commands`]).
    pub fn add_vip(&self, spec: &VipSpec) -> Result<()> {
        for cmd in self.cli_commands(spec) {
            let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
            let out = self.lb(&args);
            if !out.ok() {
                bail!("`lb {}` failed: {}", cmd.join(" "), out.stderr.trim());
            }
        }
        Ok(())
    }

    /// Run `f` on a thread in the client's namespace.
    pub fn in_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        self.client().run_in(f)
    }

    /// [`http_get`] from the client (5 s timeout).
    pub fn http_get(&self, addr: SocketAddr, path: &str) -> Result<HttpReply> {
        self.in_client(|| http_get(addr, path, Duration::from_secs(5)))?
    }

    /// [`udp_request`] from the client (2 s timeout).
    pub fn udp_request(&self, addr: SocketAddr, payload: &[u8]) -> Result<UdpReply> {
        self.in_client(|| udp_request(addr, payload, Duration::from_secs(2)))?
    }

    /// The live Maglev ring of `spec` on LB host `k`, slot by slot, as backend addresses
    /// (read from the agent's pinned maps): what every LB host must agree on.
    pub fn ring_on(&self, k: usize, spec: &VipSpec) -> Result<Vec<IpAddr>> {
        use aya::maps::{Array, HashMap};
        use lb_common::{Backend, VipKey, VipMeta};
        let dir = lb_userspace::agent::pin_dir(&self.instance_on(k));
        let open = |name: &str| {
            MapData::from_pin(dir.join(name)).with_context(|| format!("{}/{name}", dir.display()))
        };
        let key = lb_userspace::reconcile::vip_key(&self.vip_config(spec));
        let vips: HashMap<MapData, VipKey, VipMeta> =
            HashMap::try_from(Map::HashMap(open("VIPS")?))?;
        let meta = vips.get(&key, 0).context("VIP not in VIPS")?;
        let rings: Array<MapData, [u32; 2]> = Array::try_from(Map::Array(open("RINGS")?))?;
        let backends: Array<MapData, Backend> = Array::try_from(Map::Array(open("BACKENDS")?))?;
        let mut out = Vec::with_capacity(meta.ring_size as usize);
        let mut cache = std::collections::HashMap::new();
        for s in 0..meta.ring_size {
            let g = meta.ring_base + s;
            let id = lb_common::ring_primary(rings.get(&(g / 2), 0)?[(g % 2) as usize]);
            let addr = match cache.get(&id) {
                Some(a) => *a,
                None => {
                    let b = backends.get(&id, 0)?;
                    let a = lb_userspace::dataplane::ip_from_raw(b.addr, b.family);
                    cache.insert(id, a);
                    a
                }
            };
            out.push(addr);
        }
        Ok(out)
    }

    /// Health probes the LB encapsulated to backends (`HC_STATS[Sent]`): the backends'
    /// decap counts them too.
    pub fn hc_encapsulated(&self) -> Result<u64> {
        let data =
            MapData::from_pin(lb_userspace::agent::pin_dir(&self.instance()).join("HC_STATS"))?;
        let map: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(data))?;
        Ok(map
            .get(&(lb_common::HcReason::Sent as u32), 0)?
            .iter()
            .sum())
    }

    /// The `decap` programs' counters (all backends together), by `DecapReason`.
    pub fn decap_counts(&self) -> Result<Vec<u64>> {
        let dir = self.xdp_pins.as_ref().context("testbed is down")?;
        let data = MapData::from_pin(dir.join("DECAP_STATS"))?;
        let map: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(data))?;
        (0..lb_common::NUM_DECAP_REASONS)
            .map(|i| Ok(map.get(&i, 0)?.iter().sum()))
            .collect()
    }

    /// The server processes, one per backend, in order.
    pub fn servers(&mut self) -> &mut [Process] {
        &mut self.servers
    }

    /// What was built, how to use it: for people.
    pub fn describe(&self) -> String {
        let p = &self.prefix;
        let mut s = format!(
            "testbed {p}: {} backends on bridge {BRIDGE} in netns {p}-bridge\n\n",
            self.backends().len()
        );
        s += &format!(
            "  {:<7} {:<20} {:<10} {:<18} {:<16} {:<17} WHAT\n",
            "HOST", "NETNS", "INTERFACE", "MAC", "IPV4", "IPV6"
        );
        for h in &self.hosts {
            let what = match h.role {
                Role::Client if self.has_router() => "behind the router".to_string(),
                Role::Client => format!("routes {VIP4_RANGE}, {VIP6_RANGE} via the LB"),
                Role::Lb => format!("XDP lb (agent {})", self.instance()),
                Role::ExtraLb(_) => "XDP lb (agent <prefix>-<host>), BGP to the router".into(),
                Role::Router => format!(
                    "BIRD: BGP with every LB (AS {LB_ASN}), multipath to the VIPs; eth1 \
                     198.18.1.1 to the client"
                ),
                Role::Backend(_) => format!(
                    "XDP decap; VIP ranges local; server: http {:?}, udp echo {:?}",
                    self.opts.tcp_ports, self.opts.udp_ports
                ),
            };
            s += &format!(
                "  {:<7} {:<20} {:<10} {:<18} {:<16} {:<17} {what}\n",
                h.name,
                h.netns(),
                IFACE,
                fmt_mac(h.mac),
                format!("{}/24", h.v4),
                format!("{}/64", h.v6),
            );
        }
        s += &format!(
            "\n  pinned: /sys/fs/bpf/{p}-xdp (pass, decap links), /sys/fs/bpf/{}\n",
            self.instance()
        );
        s += &format!("  state:  {}\n", self.dir().display());
        let cfg = self.agents[0]
            .as_ref()
            .and_then(|a| Config::load(a.config()).ok());
        if let (Some(a), Some(cfg)) = (&self.agents[0], cfg) {
            s += &format!(
                "\nagent {} (pid {}) on {}/{IFACE}: config {}, log {}\n",
                a.instance(),
                a.pid(),
                self.lb_host().netns(),
                a.config().display(),
                a.log_path().display()
            );
            if let Ok(cmd) = a.shell_command() {
                s += &format!(
                    "  restart it (after kill -9 or a rebuild it adopts the pinned maps and \
                     link):\n    {cmd}\n"
                );
            }
            s += &format!(
                "\n  {:<16} {:<22} {:<6} {:<6} {:<10} {}\n",
                "VIP", "ADDRESS", "PORT", "PROTO", "MODE", "BACKENDS"
            );
            for v in &cfg.vips {
                let bs: Vec<String> = v
                    .backends
                    .iter()
                    .map(|b| format!("{}*{}", b.address, b.weight))
                    .collect();
                s += &format!(
                    "  {:<16} {:<22} {:<6} {:<6} {:<10} {}\n",
                    v.name,
                    v.address,
                    v.port,
                    v.protocol.to_string(),
                    v.forwarding.to_string(),
                    bs.join(" ")
                );
            }
        }
        let lb = find_lb_bin()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "lb".into());
        let c = self.client().netns();
        s += &format!(
            "\ntry:\n  ip netns exec {c} curl -s http://198.18.10.1/\n  \
             ip netns exec {c} curl -s 'http://[2001:db8:10::1]/bytes?n=100' | od -An -tx1 | head -2\n  \
             ip netns exec {c} bash -c 'exec 3<>/dev/udp/198.18.10.2/{UDP_PORT}; echo hello >&3; timeout 1 dd bs=64k count=1 status=none <&3'\n  \
             {lb} --instance {} vip list   (also: status, stats, backend list|add|weight|drain ...)\n  \
             ip netns exec {} ip -d link show {IFACE}\n",
            self.instance(),
            self.lb_host().netns(),
        );
        s
    }

    /// Leave everything running (namespaces, XDP, servers, agent) and forget it; remove it
    /// later with [`down_prefix`] (`cargo xtask testbed down`). Returns the prefix.
    pub fn keep(self) -> String {
        let p = self.prefix.clone();
        std::mem::forget(self);
        p
    }

    /// Remove everything; an error says what could not be removed.
    pub fn down(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        // The agent guards stop them the operator's way: `lb agent --stop` detaches and
        // unpins.
        self.agents.clear();
        drop(self.router_bird.take());
        self.servers.clear();
        // Anything else running in the namespaces (e.g. started by a test) keeps them alive.
        kill_processes(&self.prefix)?;
        if let Some(d) = self.xdp_pins.take() {
            remove_path(&d);
        }
        self.hosts.clear();
        self.bridge.take();
        self.dir.take();
        // Whatever is left (nothing, normally).
        down_prefix(&self.prefix).map(drop)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("testbed {}: {e:#}", self.prefix);
        }
    }
}

fn attach_pinned(
    dp: &mut Dataplane,
    ns: &Netns,
    iface: &str,
    prog: &str,
    pin: &Path,
) -> Result<()> {
    ns.run_in(|| -> Result<()> {
        let p = dp.program(prog)?;
        let id = p
            .attach(iface, XdpMode::Driver)
            .with_context(|| format!("attaching {prog} to {iface} in {}", ns.name()))?;
        let link = FdLink::try_from(p.take_link(id)?).context("XDP attached without a bpf_link")?;
        link.pin(pin)
            .with_context(|| format!("pinning {}", pin.display()))?;
        Ok(())
    })?
}

// ---------------------------------------------------------------------------------------
// Finding and removing a testbed by its prefix

fn check_prefix(p: &str) -> Result<()> {
    let ok = p.len() >= 3
        && p.len() <= 64
        && p.starts_with(|c: char| c.is_ascii_alphabetic())
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !ok {
        bail!("testbed prefix {p:?}: 3-64 characters of [A-Za-z0-9-_.], starting with a letter");
    }
    Ok(())
}

fn matches(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|rest| rest.starts_with('-'))
}

fn state_dir(prefix: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{prefix}-testbed"))
}

fn xdp_pin_dir(prefix: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/{prefix}-xdp"))
}

/// Entries of `dir` whose names start with `<prefix>-`.
fn entries(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| matches(&e.file_name().to_string_lossy(), prefix))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// What exists of the testbeds whose names start with `<prefix>-`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// In /run/netns.
    pub namespaces: Vec<String>,
    /// In /sys/fs/bpf (agent instances, `-xdp` pins).
    pub pins: Vec<PathBuf>,
    /// Agent sockets in /run/lb.
    pub sockets: Vec<PathBuf>,
    /// State directories and logs in the temp dir.
    pub files: Vec<PathBuf>,
    /// (pid, command line): processes in those namespaces, or `lb` / `lb-testbed-server`
    /// processes naming the prefix.
    pub processes: Vec<(u32, String)>,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        *self == Leftovers::default()
    }
}

impl fmt::Display for Leftovers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("nothing");
        }
        let mut parts = Vec::new();
        if !self.namespaces.is_empty() {
            parts.push(format!("namespaces {}", self.namespaces.join(" ")));
        }
        let paths = |v: &[PathBuf]| {
            v.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        if !self.pins.is_empty() {
            parts.push(format!("pins {}", paths(&self.pins)));
        }
        if !self.sockets.is_empty() {
            parts.push(format!("sockets {}", paths(&self.sockets)));
        }
        if !self.files.is_empty() {
            parts.push(format!("files {}", paths(&self.files)));
        }
        if !self.processes.is_empty() {
            let p: Vec<String> = self
                .processes
                .iter()
                .map(|(pid, cmd)| format!("{pid} ({cmd})"))
                .collect();
            parts.push(format!("processes {}", p.join(", ")));
        }
        // `{:#}`: one kind per line.
        f.write_str(&parts.join(if f.alternate() { "\n  " } else { "; " }))
    }
}

fn netns_inode(name: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(format!("/run/netns/{name}"))
        .ok()
        .map(|m| m.ino())
}

/// Processes of the testbeds with this prefix: inside their namespaces, or one of our
/// binaries with an argument naming the prefix (`--instance <prefix>-lb`,
/// `--testbed <prefix>`), whatever namespace they are in. Zombies are not counted.
fn processes(prefix: &str, namespaces: &[String]) -> Vec<(u32, String)> {
    let inodes: Vec<u64> = namespaces.iter().filter_map(|n| netns_inode(n)).collect();
    let me = std::process::id();
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if cmdline.is_empty() {
            continue; // kernel thread or zombie
        }
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let ours = args.first().is_some_and(|a0| {
            let base = a0.rsplit('/').next().unwrap_or(a0);
            OWN_BINARIES.contains(&base)
        }) && args[1..].iter().any(|a| a == prefix || matches(a, prefix));
        let in_ns = fs::read_link(e.path().join("ns/net"))
            .ok()
            .and_then(|l| {
                let l = l.to_string_lossy().into_owned();
                l.strip_prefix("net:[")?
                    .strip_suffix(']')?
                    .parse::<u64>()
                    .ok()
            })
            .is_some_and(|ino| inodes.contains(&ino));
        if ours || in_ns {
            out.push((pid, args.join(" ")));
        }
    }
    out.sort();
    out
}

/// Fail unless the testbed `prefix` left nothing behind (namespaces, pins, sockets, files,
/// processes).
pub fn assert_clean(prefix: &str) -> Result<()> {
    let left = leftovers(prefix)?;
    anyhow::ensure!(left.is_empty(), "testbed {prefix} left behind: {left}");
    Ok(())
}

/// Everything that exists of testbeds named `<prefix>-...`.
pub fn leftovers(prefix: &str) -> Result<Leftovers> {
    check_prefix(prefix)?;
    let names = |dir: &str| -> Vec<String> {
        entries(Path::new(dir), prefix)
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    };
    let namespaces = names("/run/netns");
    let processes = processes(prefix, &namespaces);
    Ok(Leftovers {
        processes,
        namespaces,
        pins: entries(Path::new("/sys/fs/bpf"), prefix),
        sockets: entries(
            lb_userspace::api::socket_path(prefix)
                .parent()
                .unwrap_or(Path::new("/run/lb")),
            prefix,
        ),
        files: entries(&std::env::temp_dir(), prefix),
    })
}

/// SIGKILL the testbeds' processes (by process id) and wait until they are gone.
fn kill_processes(prefix: &str) -> Result<()> {
    let left = leftovers(prefix)?;
    for (pid, _) in &left.processes {
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = processes(prefix, &left.namespaces);
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("processes still running after SIGKILL: {left:?}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn remove_path(p: &Path) {
    let _ = if p.is_dir() {
        fs::remove_dir_all(p)
    } else {
        fs::remove_file(p)
    };
}

/// Remove every testbed named `<prefix>-...` (whoever made it, also after a crash):
/// processes, agent data planes (`lb agent --stop`), pins, namespaces, sockets, state
/// files. Returns what it found; an error if anything remains.
pub fn down_prefix(prefix: &str) -> Result<Leftovers> {
    let found = leftovers(prefix)?;
    kill_processes(prefix)?;
    for pin in &found.pins {
        if pin.join("link").exists() {
            // An agent instance: stop it the operator's way (detach, unpin).
            if let Ok(bin) = find_lb_bin() {
                let inst = pin.file_name().unwrap().to_string_lossy().into_owned();
                let _ = std::process::Command::new(bin)
                    .args(["agent", "--stop", "--instance", &inst])
                    .stdin(std::process::Stdio::null())
                    .output();
            }
        }
        // Unpinning the last reference to a link detaches its program.
        remove_path(pin);
    }
    for ns in &found.namespaces {
        let _ = crate::netns::run("ip", &["netns", "del", ns]);
    }
    for p in found.sockets.iter().chain(&found.files) {
        remove_path(p);
    }
    let left = leftovers(prefix)?;
    if !left.is_empty() {
        bail!("testbed {prefix}: could not remove {left}");
    }
    Ok(found)
}

// ---------------------------------------------------------------------------------------
// Traffic: what the servers send, and clients for them (run these in the client namespace)

/// The bytes `GET /bytes?n=N` sends, from `offset` on: every 8-byte block is its index
/// times an odd constant, little-endian, so a lost, repeated or shifted block shows.
pub fn fill_pattern(offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let at = offset + i as u64;
        let word = (at / 8).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        *b = (word >> ((at % 8) * 8)) as u8;
    }
}

/// The first offset where `data` (from offset 0) differs from the pattern.
pub fn pattern_mismatch(data: &[u8]) -> Option<usize> {
    let mut want = vec![0u8; 64 * 1024];
    for (k, chunk) in data.chunks(want.len()).enumerate() {
        let off = k * want.len();
        fill_pattern(off as u64, &mut want[..chunk.len()]);
        if let Some(i) = chunk.iter().zip(&want).position(|(a, b)| a != b) {
            return Some(off + i);
        }
    }
    None
}

/// An HTTP response.
#[derive(Clone, Debug)]
pub struct HttpReply {
    /// The client's end of the connection (its flow: a reused port is the same flow).
    pub local: SocketAddr,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The backend that answered (`X-Backend`), "" if none said.
    pub fn backend(&self) -> &str {
        self.header("x-backend").unwrap_or("")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `GET path` over a new connection (`Connection: close`); the body by `Content-Length`.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<HttpReply> {
    let what = format!("GET http://{addr}{path}");
    TcpStream::connect_timeout(&addr, timeout)
        .map_err(anyhow::Error::from)
        .and_then(|s| http_get_on(s, addr, path, timeout))
        .with_context(|| what)
}

/// As [`http_get`], from local port `port` (as a busy client or a NAT reuses ports).
pub fn http_get_from(
    port: u16,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<HttpReply> {
    use std::os::fd::FromRawFd;
    let what = format!("GET http://{addr}{path} from port {port}");
    let r = (|| -> Result<HttpReply> {
        let sock = socket2_free::bound(port, addr.is_ipv6())?;
        let s = unsafe { TcpStream::from_raw_fd(sock) };
        s.set_write_timeout(Some(timeout))?; // SO_SNDTIMEO bounds connect() too
        socket2_free::connect(&s, addr)?;
        http_get_on(s, addr, path, timeout)
    })();
    r.with_context(|| what)
}

/// Bind before connect with plain libc (std has no such call).
mod socket2_free {
    use std::{
        net::{SocketAddr, TcpStream},
        os::fd::AsRawFd,
    };

    use anyhow::{bail, Result};

    fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, u32) {
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match a {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as u16,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as u16,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: 0,
                };
                unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        (ss, len as u32)
    }

    /// A TCP socket bound to `port` (SO_REUSEADDR), not connected.
    pub fn bound(port: u16, v6: bool) -> Result<i32> {
        let fam = if v6 { libc::AF_INET6 } else { libc::AF_INET };
        let fd = unsafe { libc::socket(fam, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        let one: libc::c_int = 1;
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                &one as *const _ as *const libc::c_void,
                4,
            )
        };
        let any: SocketAddr = if v6 {
            (std::net::Ipv6Addr::UNSPECIFIED, port).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, port).into()
        };
        let (ss, len) = sockaddr(any);
        if unsafe { libc::bind(fd, &ss as *const _ as *const libc::sockaddr, len) } != 0 {
            let e = std::io::Error::last_os_error();
            unsafe { libc::close(fd) };
            bail!("bind to port {port}: {e}");
        }
        Ok(fd)
    }

    pub fn connect(s: &TcpStream, to: SocketAddr) -> Result<()> {
        let (ss, len) = sockaddr(to);
        let r =
            unsafe { libc::connect(s.as_raw_fd(), &ss as *const _ as *const libc::sockaddr, len) };
        if r != 0 {
            bail!("connect: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// GET `path` over the connected stream `s`.
fn http_get_on(
    mut s: TcpStream,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<HttpReply> {
    let local = s.local_addr()?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    read_reply(&mut BufReader::new(s), local)
}

/// One response (status line, headers, a body of `Content-Length` bytes).
fn read_reply(r: &mut BufReader<TcpStream>, local: SocketAddr) -> Result<HttpReply> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        bail!("connection closed before the status line");
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {line:?}"))?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            bail!("connection closed in the headers");
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| anyhow!("bad header {h:?}"))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut reply = HttpReply {
        local,
        status,
        headers,
        body: Vec::new(),
    };
    let len: usize = reply
        .header("content-length")
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| anyhow!("no Content-Length"))?;
    reply.body = vec![0; len];
    r.read_exact(&mut reply.body)?;
    Ok(reply)
}

/// An HTTP/1.1 keep-alive connection: request after request on one flow (one 5-tuple),
/// as a long-lived client connection is. Open it in the client's namespace.
pub struct HttpConn {
    r: BufReader<TcpStream>,
    addr: SocketAddr,
    pub local: SocketAddr,
}

impl HttpConn {
    pub fn open(addr: SocketAddr, timeout: Duration) -> Result<HttpConn> {
        let s = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        Ok(HttpConn {
            local: s.local_addr()?,
            r: BufReader::new(s),
            addr,
        })
    }

    /// `GET path` on this connection.
    pub fn get(&mut self, path: &str) -> Result<HttpReply> {
        write!(
            self.r.get_mut(),
            "GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n",
            self.addr
        )?;
        read_reply(&mut self.r, self.local)
    }
}

/// A UDP echo reply: which backend, and what it echoed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpReply {
    pub backend: String,
    pub echo: Vec<u8>,
}

impl UdpReply {
    /// Parse `"<backend> <echo>"`.
    pub fn parse(datagram: &[u8]) -> Result<UdpReply> {
        let sp = datagram
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| anyhow!("not an echo reply: {datagram:?}"))?;
        Ok(UdpReply {
            backend: String::from_utf8_lossy(&datagram[..sp]).into_owned(),
            echo: datagram[sp + 1..].to_vec(),
        })
    }
}

/// Send `payload` from a new socket connected to `addr` (so only a reply from `addr`
/// itself counts) and wait for the echo.
pub fn udp_request(addr: SocketAddr, payload: &[u8], timeout: Duration) -> Result<UdpReply> {
    udp_request_from(0, addr, payload, timeout)
}

/// [`udp_request`] from a chosen local port (0: any). Sockets closed one after the other
/// may get the same ephemeral port, and so be one flow: choose ports to count flows.
pub fn udp_request_from(
    port: u16,
    addr: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<UdpReply> {
    let r = (|| -> Result<UdpReply> {
        let local: SocketAddr = if addr.is_ipv6() {
            (Ipv6Addr::UNSPECIFIED, port).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, port).into()
        };
        let s = UdpSocket::bind(local)?;
        s.connect(addr)?;
        s.set_read_timeout(Some(timeout))?;
        s.send(payload)?;
        let mut buf = vec![0u8; 65536];
        let n = s.recv(&mut buf)?;
        UdpReply::parse(&buf[..n])
    })();
    r.with_context(|| format!("UDP request to {addr}"))
}

/// The testbed's own directory, at a fixed path (so that `testbed down` finds it after a
/// crash), removed when dropped.
#[derive(Debug)]
struct StateDir(PathBuf);

impl StateDir {
    fn create(path: &Path) -> Result<StateDir> {
        fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(StateDir(path.to_path_buf()))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
