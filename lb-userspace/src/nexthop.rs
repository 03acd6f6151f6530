//! Where frames for a backend go on the wire: its next-hop MAC, found the way the host's
//! own stack would (the route to the backend, then the neighbour entry of that route's
//! gateway, or of the backend itself when it is on the link), and the interface's own
//! addresses (the default outer source of encapsulated packets). Read over netlink, and
//! followed: route, neighbour and address changes are announced on [`Monitor`], and
//! [`NextHops::refresh`] asks the kernel to re-validate every next hop now and then, as
//! XDP traffic never confirms a neighbour entry by itself.
//!
//! An operator may still set `mac` per backend or `agent.gateway_mac`: those win, and
//! nothing is resolved for them.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_REQUEST,
};
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage, AddressScope},
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    },
    route::{RouteAddress, RouteAttribute, RouteMessage},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// A netlink route socket for requests.
pub struct Netlink {
    sock: Socket,
    seq: u32,
}

/// The route the kernel would use to reach an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub oif: u32,
    pub gateway: Option<IpAddr>,
}

impl Netlink {
    pub fn new() -> Result<Netlink> {
        let mut sock = Socket::new(NETLINK_ROUTE).context("netlink socket")?;
        sock.bind_auto().context("binding the netlink socket")?;
        sock.connect(&SocketAddr::new(0, 0))
            .context("connecting the netlink socket")?;
        Ok(Netlink { sock, seq: 0 })
    }

    /// Send one request, collect every answer until the kernel says done (or acks).
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        req.finalize();
        let mut buf = vec![0u8; req.buffer_len()];
        req.serialize(&mut buf);
        self.sock.send(&buf, 0).context("netlink send")?;
        let mut out = Vec::new();
        loop {
            let (data, _) = self.sock.recv_from_full().context("netlink recv")?;
            let mut off = 0;
            while off < data.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[off..])
                    .map_err(|e| anyhow!("netlink: {e}"))?;
                let len = msg.header.length as usize;
                if msg.header.sequence_number != self.seq {
                    off += len.max(1);
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok(out),
                        Some(code) => {
                            return Err(std::io::Error::from_raw_os_error(-code.get()).into())
                        }
                    },
                    _ => {}
                }
                if flags & NLM_F_DUMP == 0 && flags & NLM_F_ACK == 0 && !out.is_empty() {
                    return Ok(out);
                }
                off += len.max(1);
            }
        }
    }

    /// `ip route get <dst>`: the route the kernel would use.
    pub fn route_to(&mut self, dst: IpAddr) -> Result<Option<Route>> {
        let mut m = RouteMessage::default();
        m.header.address_family = family(dst);
        m.header.destination_prefix_length = if dst.is_ipv4() { 32 } else { 128 };
        m.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(dst)));
        let answers = match self.request(RouteNetlinkMessage::GetRoute(m), 0) {
            Ok(a) => a,
            // No route (ENETUNREACH, EHOSTUNREACH...).
            Err(e) if e.downcast_ref::<std::io::Error>().is_some() => return Ok(None),
            Err(e) => return Err(e),
        };
        for a in answers {
            if let RouteNetlinkMessage::NewRoute(r) = a {
                let mut route = Route {
                    oif: 0,
                    gateway: None,
                };
                for attr in r.attributes {
                    match attr {
                        RouteAttribute::Oif(i) => route.oif = i,
                        RouteAttribute::Gateway(RouteAddress::Inet(a)) => {
                            route.gateway = Some(a.into())
                        }
                        RouteAttribute::Gateway(RouteAddress::Inet6(a)) => {
                            route.gateway = Some(a.into())
                        }
                        _ => {}
                    }
                }
                return Ok(Some(route));
            }
        }
        Ok(None)
    }

    /// The neighbour entries of interface `ifindex` that have a MAC: address -> MAC.
    pub fn neighbours(&mut self, ifindex: u32) -> Result<BTreeMap<IpAddr, [u8; 6]>> {
        let mut out = BTreeMap::new();
        for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut m = NeighbourMessage::default();
            m.header.family = fam;
            for a in self.request(RouteNetlinkMessage::GetNeighbour(m), NLM_F_DUMP)? {
                if let RouteNetlinkMessage::NewNeighbour(n) = a {
                    if n.header.ifindex != ifindex {
                        continue;
                    }
                    if let Some((addr, mac)) = usable(&n) {
                        out.insert(addr, mac);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Ask the kernel to resolve (or re-validate) the neighbour `addr` on `ifindex`, as if
    /// the host had a packet for it (`NTF_USE`; created if missing). The answer arrives as
    /// a neighbour event.
    pub fn probe(&mut self, ifindex: u32, addr: IpAddr) -> Result<()> {
        let mut m = NeighbourMessage::default();
        m.header.family = family(addr);
        m.header.ifindex = ifindex;
        m.header.state = NeighbourState::None;
        m.header.flags = NeighbourFlags::Use;
        m.attributes
            .push(NeighbourAttribute::Destination(match addr {
                IpAddr::V4(a) => NeighbourAddress::Inet(a),
                IpAddr::V6(a) => NeighbourAddress::Inet6(a),
            }));
        self.request(
            RouteNetlinkMessage::NewNeighbour(m),
            NLM_F_ACK | NLM_F_CREATE,
        )?;
        Ok(())
    }

    /// The global-scope addresses of interface `ifindex`, IPv4 first, in the kernel's
    /// order (the primary address first), without tentative or deprecated IPv6 ones.
    pub fn addresses(&mut self, ifindex: u32) -> Result<Vec<IpAddr>> {
        let mut out = Vec::new();
        for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut m = AddressMessage::default();
            m.header.family = fam;
            for a in self.request(RouteNetlinkMessage::GetAddress(m), NLM_F_DUMP)? {
                let RouteNetlinkMessage::NewAddress(a) = a else {
                    continue;
                };
                if a.header.index != ifindex || a.header.scope != AddressScope::Universe {
                    continue;
                }
                let mut addr = None;
                let mut usable = true;
                for attr in &a.attributes {
                    match attr {
                        AddressAttribute::Address(x) if addr.is_none() => addr = Some(*x),
                        AddressAttribute::Local(x) => addr = Some(*x),
                        AddressAttribute::Flags(f) => {
                            let bits = f.bits();
                            // IFA_F_TENTATIVE, IFA_F_DADFAILED, IFA_F_DEPRECATED
                            usable = bits & (0x40 | 0x08 | 0x20) == 0;
                        }
                        _ => {}
                    }
                }
                if let (Some(x), true) = (addr, usable) {
                    out.push(x);
                }
            }
        }
        Ok(out)
    }
}

fn family(a: IpAddr) -> AddressFamily {
    if a.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// (address, MAC) of a neighbour entry whose MAC can be used: resolved (reachable, stale,
/// delay, probe) or configured (permanent, noarp).
fn usable(n: &NeighbourMessage) -> Option<(IpAddr, [u8; 6])> {
    use NeighbourState as S;
    if !matches!(
        n.header.state,
        S::Reachable | S::Stale | S::Delay | S::Probe | S::Permanent | S::Noarp
    ) {
        return None;
    }
    let mut addr = None;
    let mut mac = None;
    for a in &n.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(x)) => addr = Some((*x).into()),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(x)) => addr = Some((*x).into()),
            NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                mac = Some(<[u8; 6]>::try_from(&l[..]).unwrap())
            }
            _ => {}
        }
    }
    Some((addr?, mac?)).filter(|(_, m)| *m != [0; 6])
}

/// A netlink socket that hears route, neighbour and address changes; [`Monitor::wait`]
/// blocks until one comes (run it on a thread of its own).
pub struct Monitor {
    sock: Socket,
}

impl Monitor {
    pub fn new() -> Result<Monitor> {
        // RTNLGRP_NEIGH 3, RTNLGRP_IPV4_IFADDR 5, RTNLGRP_IPV4_ROUTE 7,
        // RTNLGRP_IPV6_IFADDR 9, RTNLGRP_IPV6_ROUTE 11.
        let mut sock = Socket::new(NETLINK_ROUTE).context("netlink socket")?;
        sock.bind_auto().context("binding the netlink socket")?;
        for g in [3, 5, 7, 9, 11] {
            sock.add_membership(g)
                .context("joining a netlink multicast group")?;
        }
        Ok(Monitor { sock })
    }

    /// Block until the kernel announces a change.
    pub fn wait(&self) -> Result<()> {
        let mut buf = vec![0u8; 1 << 16];
        self.sock
            .recv(&mut &mut buf[..], 0)
            .context("netlink monitor")?;
        Ok(())
    }
}

/// What the agent knows of its backends' next hops.
#[derive(Debug, Default)]
pub struct NextHops {
    ifindex: u32,
    /// Backend -> its next hop (a gateway, or itself), by the last route lookup.
    via: BTreeMap<IpAddr, IpAddr>,
    /// Next hop -> MAC, by the last neighbour lookup (a next hop that is gone or FAILED
    /// there is gone here too).
    macs: BTreeMap<IpAddr, [u8; 6]>,
    /// Backends with no route out of the agent's interface, and why.
    pub unroutable: BTreeMap<IpAddr, String>,
    /// Next hops already asked for: a later resolve does not wait for them again (one
    /// that never answers must not slow down every change).
    asked: BTreeSet<IpAddr>,
    last_probe: Option<Instant>,
}

/// Re-validate every next hop this often (XDP traffic never confirms a neighbour).
pub const PROBE_EVERY: Duration = Duration::from_secs(30);
/// How often [`NextHops::refresh`] runs: next hops without a MAC are asked for again.
pub const TICK: Duration = Duration::from_secs(1);

impl NextHops {
    /// Resolve `backends` out of interface `ifindex`; wait up to `wait` for neighbours that
    /// are not resolved yet (after asking the kernel to resolve them).
    pub fn resolve(
        &mut self,
        nl: &mut Netlink,
        ifindex: u32,
        backends: &BTreeSet<IpAddr>,
        wait: Duration,
    ) -> Result<()> {
        if ifindex != self.ifindex {
            *self = NextHops {
                ifindex,
                ..Default::default()
            };
        }
        self.via.clear();
        self.unroutable.clear();
        for &b in backends {
            match nl.route_to(b)? {
                Some(r) if r.oif == ifindex => {
                    self.via.insert(b, r.gateway.unwrap_or(b));
                }
                Some(r) => {
                    self.unroutable.insert(
                        b,
                        format!(
                            "routed out of interface index {}, not agent.interface",
                            r.oif
                        ),
                    );
                }
                None => {
                    self.unroutable.insert(b, "no route".into());
                }
            }
        }
        let deadline = Instant::now() + wait;
        let mut probed = false;
        loop {
            let table = nl.neighbours(ifindex)?;
            let hops: BTreeSet<IpAddr> = self.via.values().copied().collect();
            self.macs = hops
                .iter()
                .filter_map(|h| Some((*h, *table.get(h)?)))
                .collect();
            let missing: Vec<IpAddr> = hops
                .iter()
                .filter(|h| !table.contains_key(h) && !self.asked.contains(h))
                .copied()
                .collect();
            if missing.is_empty() || Instant::now() >= deadline {
                self.asked.extend(hops);
                return Ok(());
            }
            if !probed {
                for h in &missing {
                    nl.probe(ifindex, *h)?;
                }
                probed = true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Call every [`TICK`]: asks the kernel again for next hops without a MAC, and to
    /// re-validate the others every [`PROBE_EVERY`]. The answers come as neighbour events.
    pub fn refresh(&mut self, nl: &mut Netlink) -> Result<()> {
        let all = self.last_probe.is_none_or(|t| t.elapsed() >= PROBE_EVERY);
        if all {
            self.last_probe = Some(Instant::now());
        }
        let hops: BTreeSet<IpAddr> = self.via.values().copied().collect();
        for h in hops {
            if all || !self.macs.contains_key(&h) {
                nl.probe(self.ifindex, h)?;
            }
        }
        Ok(())
    }

    /// The next-hop MAC of a backend, if known.
    pub fn mac(&self, backend: &IpAddr) -> Option<[u8; 6]> {
        self.macs.get(self.via.get(backend)?).copied()
    }

    /// The next hop of a backend (gateway or itself), if it has a route.
    pub fn via(&self, backend: &IpAddr) -> Option<IpAddr> {
        self.via.get(backend).copied()
    }
}

/// Interface index of `name`, or an error naming `agent.interface`.
pub fn if_index(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => bail!("agent.interface {name:?}: no such interface"),
        i => Ok(i),
    }
}
