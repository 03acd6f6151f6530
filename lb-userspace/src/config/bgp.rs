//! `[bgp]`: announcing the VIPs to the routers in front of several LB hosts (ECMP). Off
//! unless the section is there. The agent runs BIRD 2 for it (see `crate::bgp`).
//!
//! ```toml
//! [bgp]
//! local_asn = 65001
//! next_hop = "198.18.0.2"        # this host: where the routers send VIP traffic
//! next_hop_v6 = "2001:db8::2"    # needed when there are IPv6 VIPs
//! [[bgp.neighbor]]
//! address = "198.18.0.1"
//! asn = 65000
//! ```
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use super::{err, FieldError, VipConfig};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BgpConfig {
    /// This host's AS number (the same on every LB host of a group is usual; the routers
    /// merge equal routes into one multipath route).
    pub local_asn: u32,
    /// This host's IPv4 address on the routers' network: the session's source and the next
    /// hop of the IPv4 VIPs.
    pub next_hop: Ipv4Addr,
    /// Next hop of the IPv6 VIPs (carried over the same sessions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop_v6: Option<Ipv6Addr>,
    /// BGP router id; default: `next_hop`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_id: Option<Ipv4Addr>,
    /// Seconds without a keepalive before a router drops the session and withdraws this
    /// host's routes (the fallback when BFD is off). BGP's minimum is 3.
    #[serde(default = "default_hold_time")]
    pub hold_time_s: u16,
    /// BFD with every neighbour: a lost host is noticed in `bfd_interval_ms` x 3.
    #[serde(default = "default_bfd")]
    pub bfd: bool,
    #[serde(default = "default_bfd_interval")]
    pub bfd_interval_ms: u32,
    #[serde(rename = "neighbor")]
    pub neighbors: Vec<Neighbor>,
    /// The BIRD 2 binary (Debian's `bird2`).
    #[serde(default = "default_bird", skip_serializing_if = "is_default_bird")]
    pub bird: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Neighbor {
    pub address: Ipv4Addr,
    pub asn: u32,
}

fn default_hold_time() -> u16 {
    3
}
fn default_bfd() -> bool {
    true
}
fn default_bfd_interval() -> u32 {
    100
}
fn default_bird() -> String {
    "bird".into()
}
fn is_default_bird(s: &str) -> bool {
    s == "bird"
}

fn asn_ok(asn: u32) -> bool {
    // 0 and 65535 / 4294967295 are reserved (RFC 7300).
    asn != 0 && asn != 65535 && asn != u32::MAX
}

fn usable(a: IpAddr) -> bool {
    !(a.is_unspecified() || a.is_loopback() || a.is_multicast())
        && a != IpAddr::V4(Ipv4Addr::BROADCAST)
}

impl BgpConfig {
    pub fn router_id(&self) -> Ipv4Addr {
        self.router_id.unwrap_or(self.next_hop)
    }

    pub fn validate(&self, vips: &[VipConfig]) -> Result<(), FieldError> {
        if !asn_ok(self.local_asn) {
            return err(
                "bgp.local_asn",
                format!(
                    "{} is reserved; use 1..=4294967294 but 65535",
                    self.local_asn
                ),
            );
        }
        if !usable(self.next_hop.into()) {
            return err(
                "bgp.next_hop",
                format!("{} cannot be a next hop", self.next_hop),
            );
        }
        if let Some(a) = self.next_hop_v6 {
            if !usable(a.into()) {
                return err("bgp.next_hop_v6", format!("{a} cannot be a next hop"));
            }
        }
        if self.hold_time_s < 3 {
            return err(
                "bgp.hold_time_s",
                format!("{} is below BGP's minimum of 3 seconds", self.hold_time_s),
            );
        }
        if !(10..=10_000).contains(&self.bfd_interval_ms) {
            return err(
                "bgp.bfd_interval_ms",
                format!("{} is out of range 10..=10000", self.bfd_interval_ms),
            );
        }
        if self.neighbors.is_empty() {
            return err(
                "bgp.neighbor",
                "at least one neighbour (a router) is needed",
            );
        }
        for (i, n) in self.neighbors.iter().enumerate() {
            if !asn_ok(n.asn) {
                return err(
                    format!("bgp.neighbor[{i}].asn"),
                    format!("{} is reserved", n.asn),
                );
            }
            if !usable(n.address.into()) || n.address == self.next_hop {
                return err(
                    format!("bgp.neighbor[{i}].address"),
                    format!("{} cannot be a neighbour", n.address),
                );
            }
            if self.neighbors[..i].iter().any(|m| m.address == n.address) {
                return err(
                    format!("bgp.neighbor[{i}].address"),
                    format!("{} is listed twice", n.address),
                );
            }
        }
        if self.next_hop_v6.is_none() {
            if let Some(v) = vips.iter().find(|v| v.address.is_ipv6()) {
                return err(
                    "bgp.next_hop_v6",
                    format!("needed to announce the IPv6 VIP {}", v.field()),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const BASE: &str = r#"
[agent]
interface = "eth0"
[bgp]
local_asn = 65001
next_hop = "198.18.0.2"
[[bgp.neighbor]]
address = "198.18.0.1"
asn = 65000
"#;

    fn check(extra_bgp: &str, vips: &str) -> Result<Config, String> {
        let text = BASE.replace(
            "[[bgp.neighbor]]",
            &format!("{extra_bgp}\n[[bgp.neighbor]]"),
        );
        let cfg = Config::parse(&format!("{text}\n{vips}")).map_err(|e| format!("{e:#}"))?;
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    #[test]
    fn defaults_are_bfd_100ms_and_a_3s_hold_time() {
        let b = check("", "").unwrap().bgp.unwrap();
        assert!(b.bfd);
        assert_eq!((b.bfd_interval_ms, b.hold_time_s), (100, 3));
        assert_eq!(b.router_id().to_string(), "198.18.0.2");
        assert_eq!(b.bird, "bird");
        // Absent: off.
        let off = Config::parse("[agent]\ninterface = \"eth0\"\n").unwrap();
        assert!(off.bgp.is_none());
    }

    #[test]
    fn bad_values_are_refused_naming_the_field() {
        for (extra, field) in [
            ("hold_time_s = 1", "bgp.hold_time_s"),
            ("bfd_interval_ms = 5", "bgp.bfd_interval_ms"),
            ("next_hop_v6 = \"::1\"", "bgp.next_hop_v6"),
        ] {
            let e = check(extra, "").unwrap_err();
            assert!(e.contains(field), "{extra}: {e}");
        }
        let err_of = |text: &str| match Config::parse(text) {
            Err(e) => format!("{e:#}"),
            Ok(c) => c.validate().unwrap_err().to_string(),
        };
        let e = err_of(&BASE.replace("65001", "0"));
        assert!(e.contains("bgp.local_asn"), "{e}");
        let twice = format!("{BASE}[[bgp.neighbor]]\naddress = \"198.18.0.1\"\nasn = 65000\n");
        let e = err_of(&twice);
        assert!(e.contains("bgp.neighbor[1].address"), "{e}");
        let own = BASE.replace("address = \"198.18.0.1\"", "address = \"198.18.0.2\"");
        let e = err_of(&own);
        assert!(e.contains("bgp.neighbor[0].address"), "{e}");
        // A typo is an unknown field.
        let e = check("hold_time = 3", "").unwrap_err();
        assert!(e.contains("hold_time"), "{e}");
        // IPv6 VIPs need an IPv6 next hop.
        let v6 =
            "[[vip]]\nname = \"w6\"\naddress = \"2001:db8:10::1\"\nport = 80\nprotocol = \"tcp\"\n";
        let e = check("", v6).unwrap_err();
        assert!(
            e.contains("bgp.next_hop_v6") && e.contains("vip[w6]"),
            "{e}"
        );
        check("next_hop_v6 = \"2001:db8::2\"", v6).unwrap();
    }
}
