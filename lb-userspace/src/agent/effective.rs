//! The config the data plane runs: the operator's, with what the kernel knows filled in
//! where the operator left it out, so that a config naming only the interface, VIPs and
//! backend addresses works:
//! - each backend's next-hop MAC (its own `mac`, else `agent.gateway_mac`, else the MAC of
//!   the neighbour its route goes through: see `nexthop`);
//! - the outer source of encapsulated packets (`agent.encap_source_v4/v6`, else the
//!   interface's first global address of that family as a /32 or /128: one address, so the
//!   outer source carries no flow entropy and a backend's RSS spreads IP-in-IP flows by
//!   outer destination only; configure a prefix routed to the LB to spread them, or use
//!   `gue`, whose UDP source port carries the entropy).
//!
//! A backend whose next hop cannot be found (no route out of the agent's interface, no
//! neighbour answer yet, or its neighbour entry failed) is kept out of the rings, like a
//! drained one, until it resolves: new flows would have nowhere to go. Its established
//! flows keep the last MAC it had, if any (they are lost anyway if that is really gone).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use anyhow::{anyhow, Result};
use ipnet::{Ipv4Net, Ipv6Net};
use tracing::{info, warn};

use crate::{
    config::{Config, MacAddr},
    nexthop::{if_index, Netlink, NextHops},
    reconcile::Applied,
};

/// The MACs the maps hold now, by backend address.
pub fn macs_in(applied: &Applied) -> BTreeMap<IpAddr, [u8; 6]> {
    applied
        .members
        .iter()
        .filter(|(_, (_, be))| be.mac != [0; 6])
        .map(|((_, addr), (_, be))| (*addr, be.mac))
        .collect()
}

/// What the agent learns from the kernel to complete the operator's config.
pub struct KernelView {
    nl: Netlink,
    pub nexthops: NextHops,
    /// Backends left out of the rings for want of a next hop, and why.
    pub unresolved: BTreeMap<IpAddr, String>,
}

impl KernelView {
    pub fn new() -> Result<KernelView> {
        Ok(KernelView {
            nl: Netlink::new()?,
            nexthops: NextHops::default(),
            unresolved: BTreeMap::new(),
        })
    }

    /// The config to run for the operator's `cfg`. Resolves next hops (waiting up to
    /// `wait` for neighbours not resolved yet). `last` holds the MACs backends had so far
    /// (in the maps): an unresolved backend keeps its last one for its established flows.
    pub fn effective(
        &mut self,
        cfg: &Config,
        last: &BTreeMap<IpAddr, [u8; 6]>,
        wait: Duration,
    ) -> Result<Config> {
        let mut eff = cfg.clone();
        let ifindex = if_index(&cfg.agent.interface)?;
        let addrs = self.nl.addresses(ifindex)?;
        if eff.agent.encap_source_v4.is_none() {
            eff.agent.encap_source_v4 = addrs.iter().find_map(|a| match a {
                IpAddr::V4(a) => Ipv4Net::new(*a, 32).ok(),
                _ => None,
            });
        }
        if eff.agent.encap_source_v6.is_none() {
            eff.agent.encap_source_v6 = addrs.iter().find_map(|a| match a {
                IpAddr::V6(a) => Ipv6Net::new(*a, 128).ok(),
                _ => None,
            });
        }
        eff.check_encap_sources(&cfg.agent.interface)
            .map_err(|e| anyhow!("{e}"))?;
        if cfg.agent.gateway_mac.is_some() {
            self.unresolved.clear();
            return Ok(eff);
        }
        let need: BTreeSet<IpAddr> = cfg
            .vips
            .iter()
            .flat_map(|v| &v.backends)
            .filter(|b| b.mac.is_none())
            .map(|b| b.address)
            .collect();
        self.nexthops.resolve(&mut self.nl, ifindex, &need, wait)?;
        let mut unresolved = BTreeMap::new();
        for v in &mut eff.vips {
            for b in &mut v.backends {
                if b.mac.is_some() {
                    continue;
                }
                match self.nexthops.mac(&b.address) {
                    Some(m) => b.mac = Some(MacAddr(m)),
                    None => {
                        b.mac = last.get(&b.address).copied().map(MacAddr);
                        let why = match self.nexthops.unroutable.get(&b.address) {
                            Some(w) => w.clone(),
                            None => format!(
                                "no neighbour answer for {}",
                                self.nexthops.via(&b.address).unwrap_or(b.address)
                            ),
                        };
                        b.drain = true;
                        unresolved.insert(b.address, why);
                    }
                }
            }
        }
        for (addr, why) in &unresolved {
            if self.unresolved.get(addr) != Some(why) {
                warn!(backend = %addr, reason = %why, "next hop unresolved: kept out of the rings");
            }
        }
        for addr in self.unresolved.keys() {
            if !unresolved.contains_key(addr) {
                info!(backend = %addr, "next hop resolved: back in the rings");
            }
        }
        self.unresolved = unresolved;
        Ok(eff)
    }

    /// Ask the kernel to re-validate the next hops now and then.
    pub fn refresh(&mut self) -> Result<()> {
        self.nexthops.refresh(&mut self.nl)
    }
}
