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

#[derive(Clone, Debug)]
pub struct BackendSpec {
    pub addr: IpAddr,
    pub weight: u32,
    pub mac: [u8; 6],
    pub state: u8,
}

#[derive(Clone, Debug)]
pub struct VipSpec {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
    pub forwarding: Forwarding,
    pub affinity: bool,
    /// Backend ids (indices into `Fixture::backends`).
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
    /// Backends 0-3 IPv4 (weights 1,2,3,4), 4-7 IPv6 (weights 1,2,3,4), 8 an IPv6 backend
    /// with no MAC (uses the gateway MAC). One VIP per forwarding mode and family, TCP and
    /// UDP, plus an affinity VIP; `ring_size` small enough to keep tests quick.
    pub fn standard() -> Self {
        let mut backends = Vec::new();
        for i in 0..4u8 {
            backends.push(BackendSpec {
                addr: v4(20, 10 + i),
                weight: i as u32 + 1,
                mac: [0x02, 0, 0, 0, 0x20, 10 + i],
                state: BACKEND_UP,
            });
        }
        for i in 0..4u16 {
            backends.push(BackendSpec {
                addr: v6(20, 10 + i),
                weight: i as u32 + 1,
                mac: [0x02, 0, 0, 0, 0x60, 10 + i as u8],
                state: BACKEND_UP,
            });
        }
        backends.push(BackendSpec {
            addr: v6(20, 99),
            weight: 1,
            mac: [0; 6],
            state: BACKEND_UP,
        });
        let four = vec![0, 1, 2, 3];
        let six = vec![4, 5, 6, 7];
        let mut vips = Vec::new();
        let mut id = 0u8;
        for (fwd, port) in [
            (Forwarding::Ipip, 80),
            (Forwarding::Gue, 81),
            (Forwarding::L2Dsr, 82),
        ] {
            for proto in [PROTO_TCP, PROTO_UDP] {
                vips.push(VipSpec {
                    addr: v4(10, 1 + id % 2),
                    port,
                    proto,
                    forwarding: fwd,
                    affinity: false,
                    backends: four.clone(),
                });
                vips.push(VipSpec {
                    addr: v6(10, 1 + (id % 2) as u16),
                    port,
                    proto,
                    forwarding: fwd,
                    affinity: false,
                    backends: six.clone(),
                });
                id += 1;
            }
        }
        // 4-in-6: an IPv4 VIP served by IPv6 backends; GUE to a backend without a MAC.
        vips.push(VipSpec {
            addr: v4(10, 3),
            port: 80,
            proto: PROTO_TCP,
            forwarding: Forwarding::Ipip,
            affinity: false,
            backends: six.clone(),
        });
        vips.push(VipSpec {
            addr: v4(10, 3),
            port: 81,
            proto: PROTO_UDP,
            forwarding: Forwarding::Gue,
            affinity: false,
            backends: vec![8],
        });
        vips.push(VipSpec {
            addr: v4(10, 4),
            port: 443,
            proto: PROTO_TCP,
            forwarding: Forwarding::Ipip,
            affinity: true,
            backends: four,
        });
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
