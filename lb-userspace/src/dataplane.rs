//! Loading the XDP object and writing its maps. One home for every map handle, so the
//! agent, the tests and the benchmarks all drive the data plane the same way.
use std::net::IpAddr;

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    include_bytes_aligned,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues},
    programs::Xdp,
    Ebpf, EbpfLoader,
};
use lb_common::*;

/// The compiled `lb-ebpf` object (built by `build.rs`).
pub static OBJECT: &[u8] = include_bytes_aligned!(env!("LB_EBPF_OBJ"));

/// Map capacities, fixed when the object is loaded.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub max_vips: u32,
    pub max_backends: u32,
    pub max_conns: u32,
    /// Slots reserved per ring: the largest ring size any VIP may use.
    pub ring_stride: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        Sizes {
            max_vips: MAX_VIPS,
            max_backends: MAX_BACKENDS,
            max_conns: MAX_CONNS,
            ring_stride: DEFAULT_RING_SIZE,
        }
    }
}

impl Sizes {
    /// Kernel memory of the rings: `max_vips * 2 * ring_stride * 4` bytes.
    pub fn ring_entries(&self) -> Result<u32> {
        self.max_vips
            .checked_mul(RINGS_PER_VIP)
            .and_then(|n| n.checked_mul(self.ring_stride))
            .ok_or_else(|| anyhow!("max_vips * 2 * ring_stride overflows u32"))
    }
}

/// Raw address words and family of an IP address (the form every map key uses).
pub fn addr_raw(ip: IpAddr) -> ([u32; 4], u8) {
    match ip {
        IpAddr::V4(a) => ([u32::from_ne_bytes(a.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], FAMILY_V6)
        }
    }
}

/// Raw (network-order) port.
pub fn port_raw(port: u16) -> u16 {
    port.to_be()
}

/// A loaded (not yet attached) data plane and typed handles to all its maps.
pub struct Dataplane {
    pub ebpf: Ebpf,
    pub sizes: Sizes,
    pub vips: HashMap<MapData, VipKey, VipMeta>,
    pub vip_addrs: HashMap<MapData, AddrKey, u32>,
    pub rings: Array<MapData, u32>,
    pub backends: Array<MapData, Backend>,
    pub conns: HashMap<MapData, FlowKey, ConnVal>,
    pub config: Array<MapData, Config>,
    pub stats: PerCpuArray<MapData, u64>,
    pub vip_stats: PerCpuArray<MapData, Counters>,
    pub be_stats: PerCpuArray<MapData, Counters>,
    pub decap_stats: PerCpuArray<MapData, u64>,
}

impl Dataplane {
    /// Load the object with the given capacities and load (verify) every program.
    pub fn load(sizes: Sizes) -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("VIPS", sizes.max_vips)
            .map_max_entries("VIP_ADDRS", sizes.max_vips)
            .map_max_entries("VIP_STATS", sizes.max_vips)
            .map_max_entries("RINGS", sizes.ring_entries()?)
            .map_max_entries("BACKENDS", sizes.max_backends)
            .map_max_entries("BE_STATS", sizes.max_backends)
            .map_max_entries("CONNS", sizes.max_conns)
            .load(OBJECT)
            .context("loading the lb-ebpf object")?;
        for name in ["lb", "decap", "pass", "floor"] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("verifier rejected program {name}"))?;
        }
        fn take(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from object"))
        }
        Ok(Dataplane {
            vips: HashMap::try_from(take(&mut ebpf, "VIPS")?)?,
            vip_addrs: HashMap::try_from(take(&mut ebpf, "VIP_ADDRS")?)?,
            rings: Array::try_from(take(&mut ebpf, "RINGS")?)?,
            backends: Array::try_from(take(&mut ebpf, "BACKENDS")?)?,
            conns: HashMap::try_from(take(&mut ebpf, "CONNS")?)?,
            config: Array::try_from(take(&mut ebpf, "CONFIG")?)?,
            stats: PerCpuArray::try_from(take(&mut ebpf, "STATS")?)?,
            vip_stats: PerCpuArray::try_from(take(&mut ebpf, "VIP_STATS")?)?,
            be_stats: PerCpuArray::try_from(take(&mut ebpf, "BE_STATS")?)?,
            decap_stats: PerCpuArray::try_from(take(&mut ebpf, "DECAP_STATS")?)?,
            ebpf,
            sizes,
        })
    }

    /// One of the loaded programs: `lb`, `decap`, `pass` or `floor`.
    pub fn program(&mut self, name: &str) -> Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("no program {name}"))?
            .try_into()?)
    }

    pub fn set_config(&mut self, cfg: &Config) -> Result<()> {
        self.config.set(0, cfg, 0).context("writing CONFIG")
    }

    pub fn set_backend(&mut self, id: u32, be: &Backend) -> Result<()> {
        if id >= self.sizes.max_backends {
            bail!(
                "backend id {id} beyond max_backends {}",
                self.sizes.max_backends
            );
        }
        self.backends.set(id, be, 0).context("writing BACKENDS")
    }

    /// Write `ring` into ring buffer `which` (0 or 1) of VIP `vip_id`; returns its base index.
    /// The ring is not live until a `VipMeta` naming that base is written.
    pub fn write_ring(&mut self, vip_id: u32, which: u32, ring: &[u32]) -> Result<u32> {
        if ring.len() as u64 > self.sizes.ring_stride as u64 {
            bail!(
                "ring of {} slots exceeds ring_stride {}",
                ring.len(),
                self.sizes.ring_stride
            );
        }
        let base = (vip_id * RINGS_PER_VIP + which) * self.sizes.ring_stride;
        for (i, id) in ring.iter().enumerate() {
            self.rings.set(base + i as u32, id, 0)?;
        }
        Ok(base)
    }

    /// Make a VIP live (or update it: one hash-map update, atomic for readers).
    pub fn set_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<()> {
        self.vips.insert(key, meta, 0).context("writing VIPS")?;
        let ak = AddrKey {
            addr: key.addr,
            family: key.family,
            _pad: [0; 3],
        };
        self.vip_addrs.insert(ak, 1, 0).context("writing VIP_ADDRS")
    }

    /// Remove a VIP; its address leaves `VIP_ADDRS` with its last VIP.
    pub fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        self.vips.remove(key).context("removing from VIPS")?;
        let still = self
            .vips
            .keys()
            .filter_map(|k| k.ok())
            .any(|k| k.addr == key.addr && k.family == key.family);
        if !still {
            let ak = AddrKey {
                addr: key.addr,
                family: key.family,
                _pad: [0; 3],
            };
            self.vip_addrs
                .remove(&ak)
                .context("removing from VIP_ADDRS")?;
        }
        Ok(())
    }

    /// Sum of a per-CPU reason counter array.
    pub fn reason_counts(&self) -> Result<Vec<u64>> {
        (0..NUM_REASONS)
            .map(|i| Ok(self.stats.get(&i, 0)?.iter().sum()))
            .collect()
    }

    pub fn decap_counts(&self) -> Result<Vec<u64>> {
        (0..NUM_DECAP_REASONS)
            .map(|i| Ok(self.decap_stats.get(&i, 0)?.iter().sum()))
            .collect()
    }

    pub fn vip_counters(&self, id: u32) -> Result<Counters> {
        Ok(sum_counters(&self.vip_stats.get(&id, 0)?))
    }

    pub fn backend_counters(&self, id: u32) -> Result<Counters> {
        Ok(sum_counters(&self.be_stats.get(&id, 0)?))
    }
}

fn sum_counters(v: &PerCpuValues<Counters>) -> Counters {
    v.iter().fold(Counters::default(), |a, c| Counters {
        packets: a.packets + c.packets,
        bytes: a.bytes + c.bytes,
        new_flows: a.new_flows + c.new_flows,
    })
}
