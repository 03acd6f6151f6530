//! A standard data-plane configuration, written identically into the kernel maps and into
//! the reference model, so tests and benchmarks start from the same state.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Result;
use lb_common::*;
use lb_userspace::{
    dataplane::{addr_raw, port_raw, Dataplane},
    maglev::{self, MaglevInput},
};

use crate::model::Model;

pub use crate::packets::{CLIENT_MAC, LB_MAC};
pub const GW_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0xfe];

/// One backend of one VIP (a membership: its index in `Fixture::backends` is its id).
#[derive(Clone, Debug)]
pub struct BackendSpec {
    pub addr: IpAddr,
    pub weight: u32,
    pub mac: [u8; 6],
    pub state: u8,
    /// Index (= id) of its VIP in `Fixture::vips`.
    pub vip: u32,
}

#[derive(Clone, Debug)]
pub struct VipSpec {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
    pub forwarding: Forwarding,
    pub affinity: bool,
    /// Its backends' ids (indices into `Fixture::backends`).
    pub backends: Vec<u32>,
}

impl VipSpec {
    pub fn key(&self) -> VipKey {
        let (addr, family) = addr_raw(self.addr);
        VipKey {
            addr,
            port: port_raw(self.port),
            proto: self.proto,
            family,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Fixture {
    pub config: Config,
    pub backends: Vec<BackendSpec>,
    pub vips: Vec<VipSpec>,
    pub ring_size: u32,
}

pub fn v4(a: u8, b: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, a, b))
}
pub fn v6(a: u16, b: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, a, 0, 0, 0, 0, b))
}

pub fn standard_config() -> Config {
    let (src6, _) = addr_raw(v6(0xff, 0));
    Config {
        hash_seed: 0x5eed_1234,
        mtu: 1500,
        src4: addr_raw(v4(255, 0)).0[0],
        src4_mask: u32::from_ne_bytes([0, 0, 0, 0xff]),
        src6,
        src6_mask: u32::from_ne_bytes([0, 0, 0xff, 0xff]),
        gw_mac: GW_MAC,
        _pad: [0; 2],
    }
}

impl Fixture {
    /// Four IPv4 addresses (weights 1,2,3,4), four IPv6 (weights 1,2,3,4) and an IPv6 one
    /// with no MAC (uses the gateway MAC). One VIP per forwarding mode and family, TCP and
    /// UDP, over the four of its family, plus a 4-in-6 VIP, a GUE VIP whose one backend has
    /// no MAC, and an affinity VIP; `ring_size` small enough to keep tests quick. Every VIP
    /// has backend ids of its own (ids name memberships), in VIP order.
    pub fn standard() -> Self {
        /// (address, weight, MAC) of each backend of a VIP.
        type Addrs = Vec<(IpAddr, u32, [u8; 6])>;
        let four: Addrs = (0..4u8)
            .map(|i| (v4(20, 10 + i), i as u32 + 1, [0x02, 0, 0, 0, 0x20, 10 + i]))
            .collect();
        let six: Addrs = (0..4u16)
            .map(|i| {
                (
                    v6(20, 10 + i),
                    i as u32 + 1,
                    [0x02, 0, 0, 0, 0x60, 10 + i as u8],
                )
            })
            .collect();
        let no_mac = vec![(v6(20, 99), 1, [0; 6])];
        let mut vips: Vec<(VipSpec, &Addrs)> = Vec::new();
        let spec = |addr, port, proto, forwarding, affinity| VipSpec {
            addr,
            port,
            proto,
            forwarding,
            affinity,
            backends: Vec::new(),
        };
        let mut id = 0u8;
        for (fwd, port) in [
            (Forwarding::Ipip, 80),
            (Forwarding::Gue, 81),
            (Forwarding::L2Dsr, 82),
        ] {
            for proto in [PROTO_TCP, PROTO_UDP] {
                vips.push((spec(v4(10, 1 + id % 2), port, proto, fwd, false), &four));
                vips.push((
                    spec(v6(10, 1 + (id % 2) as u16), port, proto, fwd, false),
                    &six,
                ));
                id += 1;
            }
        }
        // 4-in-6: an IPv4 VIP served by IPv6 backends; GUE to a backend without a MAC.
        vips.push((
            spec(v4(10, 3), 80, PROTO_TCP, Forwarding::Ipip, false),
            &six,
        ));
        vips.push((
            spec(v4(10, 3), 81, PROTO_UDP, Forwarding::Gue, false),
            &no_mac,
        ));
        vips.push((
            spec(v4(10, 4), 443, PROTO_TCP, Forwarding::Ipip, true),
            &four,
        ));
        let mut backends = Vec::new();
        let vips = vips
            .into_iter()
            .enumerate()
            .map(|(i, (mut v, addrs))| {
                for &(addr, weight, mac) in addrs {
                    v.backends.push(backends.len() as u32);
                    backends.push(BackendSpec {
                        addr,
                        weight,
                        mac,
                        state: BACKEND_UP,
                        vip: i as u32,
                    });
                }
                v
            })
            .collect();
        Fixture {
            config: standard_config(),
            backends,
            vips,
            ring_size: 4099,
        }
    }

    pub fn backend(&self, id: u32) -> Backend {
        let b = &self.backends[id as usize];
        let (addr, family) = addr_raw(b.addr);
        Backend {
            addr,
            mac: b.mac,
            family,
            state: b.state,
            vip: b.vip,
        }
    }

    /// The Maglev ring of VIP `i` as backend ids (empty if no backend is UP).
    pub fn ring(&self, i: usize) -> Vec<u32> {
        let v = &self.vips[i];
        let live: Vec<u32> = v
            .backends
            .iter()
            .copied()
            .filter(|&b| self.backends[b as usize].state == BACKEND_UP)
            .collect();
        let names: Vec<String> = live
            .iter()
            .map(|&b| self.backends[b as usize].addr.to_string())
            .collect();
        let input: Vec<MaglevInput> = live
            .iter()
            .zip(&names)
            .map(|(&b, n)| MaglevInput {
                name: n.as_bytes(),
                weight: self.backends[b as usize].weight,
            })
            .collect();
        let table = maglev::build(self.config.hash_seed, &input, self.ring_size).expect("maglev");
        table.into_iter().map(|i| live[i as usize]).collect()
    }

    pub fn meta(&self, i: usize, ring_len: usize, stride: u32) -> VipMeta {
        let v = &self.vips[i];
        VipMeta {
            id: i as u32,
            ring_base: i as u32 * RINGS_PER_VIP * stride,
            ring_size: ring_len as u32,
            forwarding: v.forwarding as u8,
            flags: if v.affinity { VIP_F_AFFINITY } else { 0 },
            _pad: [0; 2],
        }
    }

    /// Write everything into the kernel maps and the model.
    pub fn apply(&self, dp: &mut Dataplane, model: &mut Model) -> Result<()> {
        dp.set_config(&self.config)?;
        model.config = self.config;
        model.backends.clear();
        for id in 0..self.backends.len() as u32 {
            let be = self.backend(id);
            dp.set_backend(id, &be)?;
            model.backends.push(be);
        }
        let stride = dp.sizes.ring_stride;
        for i in 0..self.vips.len() {
            let ring = self.ring(i);
            let base = dp.write_ring(i as u32, 0, &ring)?;
            for (s, b) in ring.iter().enumerate() {
                model.rings.insert(base + s as u32, *b);
            }
            let meta = self.meta(i, ring.len(), stride);
            let key = self.vips[i].key();
            dp.set_vip(&key, &meta)?;
            model.vips.insert(key, meta);
            model.vip_addrs.insert(AddrKey {
                addr: key.addr,
                family: key.family,
                _pad: [0; 3],
            });
        }
        Ok(())
    }
}
