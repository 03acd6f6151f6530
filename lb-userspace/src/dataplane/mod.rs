//! Loading the XDP object and writing its maps ([`sys`]: the few raw `bpf(2)` calls aya 0.14
//! lacks). One home for every map handle, so the
//! agent, the tests and the benchmarks all drive the data plane the same way.
use std::{
    net::IpAddr,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::Path,
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    include_bytes_aligned,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues},
    programs::Xdp,
    Ebpf, EbpfLoader,
};
use lb_common::*;

mod maps;
pub mod pinned;
pub mod sys;

pub use maps::{spec_of, Capacity, MapSpec, Sizes, MAPS, MAP_NAMES, NO_COMMON_LRU};

/// Kernel description of a loaded map.
fn map_info(map: &aya::maps::Map) -> Result<aya::maps::MapInfo> {
    use aya::maps::Map::*;
    let d = match map {
        Array(d) | HashMap(d) | LruHashMap(d) | PerCpuArray(d) => d,
        _ => bail!("unexpected map type"),
    };
    Ok(d.info()?)
}

/// The compiled `lb-ebpf` object (built by `build.rs`).
pub static OBJECT: &[u8] = include_bytes_aligned!(env!("LB_EBPF_OBJ"));

/// Where the benchmark tools' object (generator, receiver, baseline forwarder) was built,
/// beside ours by the same command. Not embedded: only `bench` loads it.
pub const BENCH_OBJECT_PATH: &str = env!("LB_BENCH_EBPF_OBJ");

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

/// The address an [`addr_raw`] pair stands for.
pub fn ip_from_raw(addr: [u32; 4], family: u8) -> IpAddr {
    if family == FAMILY_V6 {
        let mut o = [0u8; 16];
        for (i, w) in addr.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(o)
    } else {
        IpAddr::from(addr[0].to_ne_bytes())
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
    pub vip_filter: Array<MapData, u64>,
    pub vip_info: Array<MapData, VipInfo>,
    /// Two ring slots per element; see [`Dataplane::write_ring`].
    pub rings: Array<MapData, [u32; 2]>,
    pub backends: Array<MapData, Backend>,
    pub conns: HashMap<MapData, FlowKey, ConnVal>,
    pub config: Array<MapData, Config>,
    pub stats: PerCpuArray<MapData, u64>,
    pub vip_stats: PerCpuArray<MapData, Counters>,
    pub be_stats: PerCpuArray<MapData, Counters>,
    pub decap_stats: PerCpuArray<MapData, u64>,
    pub hc_stats: PerCpuArray<MapData, u64>,
    pub layout: HashMap<MapData, [u8; 16], layout::MapLayout>,
    /// Second handles on `RINGS`, `BACKENDS` and `CONNS` for batch operations (aya 0.14 has
    /// none).
    rings_fd: OwnedFd,
    backends_fd: OwnedFd,
    conns_fd: OwnedFd,
    /// A private map-of-maps whose update waits for an RCU grace period.
    grace: Option<(OwnedFd, OwnedFd)>,
}

impl Dataplane {
    /// Load the object with the given capacities and load (verify) every program; maps
    /// are created and not pinned (tests, benchmarks, the backends' `decap`).
    pub fn load(sizes: Sizes) -> Result<Self> {
        Self::load_with(sizes, None)
    }

    /// As [`Dataplane::load`], with every map pinned under `pin_dir`: maps already pinned
    /// there are reused as they are (the caller has checked them with
    /// [`pinned::inspect`]), the others are created and pinned. `LAYOUT` is written.
    pub fn load_at(sizes: Sizes, pin_dir: &Path) -> Result<Self> {
        Self::load_with(sizes, Some(pin_dir))
    }

    fn load_with(sizes: Sizes, pin_dir: Option<&Path>) -> Result<Self> {
        let sizes = sizes.normalized();
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&str, std::path::PathBuf)> = match pin_dir {
            Some(d) => MAPS.iter().map(|m| (m.name, d.join(m.name))).collect(),
            None => Vec::new(),
        };
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        for m in &MAPS {
            if !matches!(m.capacity, Capacity::Fixed(_)) {
                loader.map_max_entries(m.name, sizes.entries(m.capacity)?);
            }
        }
        let mut ebpf = loader.load(OBJECT).context("loading the lb-ebpf object")?;
        for name in ["lb", "decap", "pass", "floor"] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("verifier rejected program {name}"))?;
        }
        let hc: &mut aya::programs::SchedClassifier = ebpf
            .program_mut("hc_encap")
            .ok_or_else(|| anyhow!("program hc_encap missing from object"))?
            .try_into()?;
        hc.load().context("verifier rejected program hc_encap")?;
        // The table must describe the object exactly: a map missing from it would not be
        // pinned (a restarted agent would get a fresh, empty one), a wrong size would make
        // every later comparison with the pins wrong.
        for (name, map) in ebpf.maps() {
            let Some(spec) = spec_of(name) else {
                bail!("map {name} of the object is missing from dataplane::MAPS");
            };
            let info = map_info(map)?;
            let entries = sizes.entries(spec.capacity)?;
            let got = (
                info.map_type()? as u32,
                info.key_size(),
                info.value_size(),
                info.map_flags(),
                info.max_entries(),
            );
            let want = (
                spec.map_type,
                spec.key_size,
                spec.value_size,
                spec.flags,
                entries,
            );
            if got != want {
                bail!(
                    "map {name} is (type, key, value, flags, entries) {got:?}, dataplane::MAPS                      says {want:?}"
                );
            }
        }
        fn take(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from object"))
        }
        fn fd_of(map: &aya::maps::Map) -> Result<OwnedFd> {
            match map {
                aya::maps::Map::Array(d) | aya::maps::Map::LruHashMap(d) => {
                    Ok(d.fd().as_fd().try_clone_to_owned()?)
                }
                _ => bail!("no batch handle for this map type"),
            }
        }
        let rings = take(&mut ebpf, "RINGS")?;
        let rings_fd = fd_of(&rings)?;
        let backends = take(&mut ebpf, "BACKENDS")?;
        let backends_fd = fd_of(&backends)?;
        let conns = take(&mut ebpf, "CONNS")?;
        let conns_fd = fd_of(&conns)?;
        let mut dp = Dataplane {
            grace: None,
            rings_fd,
            backends_fd,
            conns_fd,
            vips: HashMap::try_from(take(&mut ebpf, "VIPS")?)?,
            vip_addrs: HashMap::try_from(take(&mut ebpf, "VIP_ADDRS")?)?,
            vip_filter: Array::try_from(take(&mut ebpf, "VIP_FILTER")?)?,
            vip_info: Array::try_from(take(&mut ebpf, "VIP_INFO")?)?,
            rings: Array::try_from(rings)?,
            backends: Array::try_from(backends)?,
            conns: HashMap::try_from(conns)?,
            config: Array::try_from(take(&mut ebpf, "CONFIG")?)?,
            stats: PerCpuArray::try_from(take(&mut ebpf, "STATS")?)?,
            vip_stats: PerCpuArray::try_from(take(&mut ebpf, "VIP_STATS")?)?,
            be_stats: PerCpuArray::try_from(take(&mut ebpf, "BE_STATS")?)?,
            decap_stats: PerCpuArray::try_from(take(&mut ebpf, "DECAP_STATS")?)?,
            hc_stats: PerCpuArray::try_from(take(&mut ebpf, "HC_STATS")?)?,
            layout: HashMap::try_from(take(&mut ebpf, "LAYOUT")?)?,
            ebpf,
            sizes,
        };
        for m in &MAPS {
            let key = layout::key(m.name);
            if dp.layout.get(&key, 0).ok() != Some(m.layout) {
                dp.layout
                    .insert(key, m.layout, 0)
                    .context("writing LAYOUT")?;
            }
        }
        Ok(dp)
    }

    /// The health probes' tc egress program (see `lb-ebpf/src/health.rs`).
    pub fn hc_program(&mut self) -> Result<&mut aya::programs::SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut("hc_encap")
            .ok_or_else(|| anyhow!("no program hc_encap"))?
            .try_into()?)
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
    /// The ring is not live until a `VipMeta` naming that base is written. One
    /// `BPF_MAP_UPDATE_BATCH` call for the whole ring, not one syscall per slot.
    pub fn write_ring(&mut self, vip_id: u32, which: u32, ring: &[u32]) -> Result<u32> {
        if ring.len() as u64 > self.sizes.ring_stride as u64 {
            bail!(
                "ring of {} slots exceeds ring_stride {}",
                ring.len(),
                self.sizes.ring_stride
            );
        }
        if vip_id >= self.sizes.max_vips || which >= RINGS_PER_VIP {
            bail!("ring {which} of VIP id {vip_id} is outside RINGS");
        }
        let base = (vip_id * RINGS_PER_VIP + which) * self.sizes.ring_stride;
        let pairs: Vec<[u32; 2]> = ring
            .chunks(2)
            .map(|c| [c[0], *c.get(1).unwrap_or(&0)])
            .collect();
        let keys: Vec<u32> = (base / 2..base / 2 + pairs.len() as u32).collect();
        sys::update_batch(&self.rings_fd, &keys, &pairs).context("writing RINGS")?;
        Ok(base)
    }

    /// Return only once every program run that started before the call has finished
    /// (an RCU grace period). After flipping a VIP to a new ring, this is what makes it
    /// safe to rewrite the old buffer or empty the backends only it named. The kernel waits
    /// for one after every update of a map-of-maps; we keep a private one for that.
    pub fn wait_for_programs(&mut self) -> Result<()> {
        if self.grace.is_none() {
            let inner = sys::map_create(sys::BPF_MAP_TYPE_ARRAY, 4, 4, 1, None)?;
            let outer = sys::map_create(sys::BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, 4, 1, Some(&inner))?;
            self.grace = Some((outer, inner));
        }
        let (outer, inner) = self.grace.as_ref().unwrap();
        sys::update_elem(outer, &0u32, &(inner.as_raw_fd() as u32))
            .context("waiting for an RCU grace period")?;
        Ok(())
    }

    /// Read `len` slots of RINGS from `base` (one `BPF_MAP_LOOKUP_BATCH` call or a few).
    pub fn read_ring(&self, base: u32, len: u32) -> Result<Vec<u32>> {
        if !base.is_multiple_of(2) {
            bail!("ring base {base} is not even");
        }
        let pairs: Vec<[u32; 2]> = sys::lookup_batch(&self.rings_fd, base / 2, len.div_ceil(2))
            .context("reading RINGS")?;
        Ok(pairs.into_iter().flatten().take(len as usize).collect())
    }

    /// Every `BACKENDS` entry, by id, in one batch.
    pub fn read_backends(&self) -> Result<Vec<Backend>> {
        sys::lookup_batch(&self.backends_fd, 0, self.sizes.max_backends).context("reading BACKENDS")
    }

    /// Every connection-table entry (`BPF_MAP_LOOKUP_BATCH`, a few thousand per call).
    pub fn read_conns(&self) -> Result<Vec<(FlowKey, ConnVal)>> {
        sys::dump_hash(&self.conns_fd, 4096).context("reading CONNS")
    }

    /// Delete every connection entry `doomed` picks; returns how many went.
    pub fn sweep_conns(&mut self, doomed: impl Fn(&ConnVal) -> bool) -> Result<usize> {
        let keys: Vec<FlowKey> = self
            .read_conns()?
            .into_iter()
            .filter(|(_, v)| doomed(v))
            .map(|(k, _)| k)
            .collect();
        sys::delete_keys(&self.conns_fd, &keys).context("deleting from CONNS")
    }

    /// Insert connection entries, the most recently used last (if they do not all fit, the
    /// LRU keeps those).
    ///
    /// `CONNS` keeps one LRU list per CPU (`BPF_F_NO_COMMON_LRU`) and an insert takes its
    /// element from the inserting CPU's share (`max_conns / possible CPUs`): so the entries
    /// are inserted from each CPU this process may run on, a share each, or most would
    /// evict each other. (Where it may not pin itself, it inserts from wherever it runs.)
    pub fn insert_conns(&mut self, mut entries: Vec<(FlowKey, ConnVal)>) -> Result<()> {
        entries.sort_by_key(|(_, v)| v.atime);
        let cpus = sys::allowed_cpus().unwrap_or_default();
        let chunk = entries.len().div_ceil(cpus.len().max(1)).max(1);
        for (i, part) in entries.chunks(chunk).enumerate() {
            let (keys, values): (Vec<FlowKey>, Vec<ConnVal>) = part.iter().copied().unzip();
            let write = || sys::update_batch(&self.conns_fd, &keys, &values);
            match cpus.get(i) {
                Some(&cpu) => match sys::on_cpu(cpu, write) {
                    Ok(r) => r,
                    Err(_) => write(),
                },
                None => write(),
            }
            .context("writing CONNS")?;
        }
        Ok(())
    }

    /// Which of a VIP's two ring buffers a `ring_base` names.
    pub fn ring_buffer(&self, ring_base: u32) -> u32 {
        (ring_base / self.sizes.ring_stride) % RINGS_PER_VIP
    }

    /// Make a VIP live (or update it: one hash-map update, atomic for readers). Its address
    /// enters `VIP_FILTER` and `VIP_ADDRS` first, so no packet to it is ever passed as
    /// not-a-VIP once the VIP exists (and, for a stateless VIP, `VIP_FILTER[1]` too, so
    /// that none of its packets reads `CONNS` once it is stateless).
    pub fn set_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<()> {
        let bit = 1u64 << vip_filter_bit(&key.addr);
        let stateless = meta.flags & VIP_F_STATELESS != 0;
        let filter = self.vip_filter.get(&0, 0)?;
        if filter & bit == 0 {
            self.vip_filter
                .set(0, filter | bit, 0)
                .context("writing VIP_FILTER")?;
        }
        let filter1 = self.vip_filter.get(&1, 0)?;
        if stateless && filter1 & bit == 0 {
            self.vip_filter
                .set(1, filter1 | bit, 0)
                .context("writing VIP_FILTER")?;
        }
        let ak = AddrKey {
            addr: key.addr,
            family: key.family,
            _pad: [0; 3],
        };
        self.vip_addrs
            .insert(ak, 1, 0)
            .context("writing VIP_ADDRS")?;
        self.set_vip_info(meta.id, &vip_info(key, meta))?;
        self.vips.insert(key, meta, 0).context("writing VIPS")?;
        if !stateless && filter1 & bit != 0 {
            self.refresh_vip_filter()?;
        }
        Ok(())
    }

    /// Both `VIP_FILTER` words from what `VIPS` holds now.
    pub fn refresh_vip_filter(&mut self) -> Result<()> {
        let mut words = [0u64; 2];
        for kv in self.vips.iter() {
            let (k, m) = kv.context("reading VIPS")?;
            let bit = 1u64 << vip_filter_bit(&k.addr);
            words[0] |= bit;
            if m.flags & VIP_F_STATELESS != 0 {
                words[1] |= bit;
            }
        }
        for (i, w) in words.into_iter().enumerate() {
            if self.vip_filter.get(&(i as u32), 0)? != w {
                self.vip_filter
                    .set(i as u32, w, 0)
                    .context("writing VIP_FILTER")?;
            }
        }
        Ok(())
    }

    /// `VIP_INFO[id]`, written only when it differs (one array element).
    pub fn set_vip_info(&mut self, id: u32, info: &VipInfo) -> Result<()> {
        if self.vip_info.get(&id, 0)? != *info {
            self.vip_info.set(id, info, 0).context("writing VIP_INFO")?;
        }
        Ok(())
    }

    /// Remove a VIP; its address leaves `VIP_ADDRS` (and its bit `VIP_FILTER`, unless
    /// another address shares it) with its last VIP.
    pub fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        let meta = self.vips.get(key, 0).context("removing from VIPS")?;
        self.vips.remove(key).context("removing from VIPS")?;
        self.set_vip_info(meta.id, &VipInfo::default())?;
        let keys: Vec<VipKey> = self.vips.keys().filter_map(|k| k.ok()).collect();
        if !keys
            .iter()
            .any(|k| k.addr == key.addr && k.family == key.family)
        {
            let ak = AddrKey {
                addr: key.addr,
                family: key.family,
                _pad: [0; 3],
            };
            self.vip_addrs
                .remove(&ak)
                .context("removing from VIP_ADDRS")?;
        }
        self.refresh_vip_filter()
    }

    /// Sum of a per-CPU reason counter array.
    pub fn reason_counts(&self) -> Result<Vec<u64>> {
        (0..NUM_REASONS)
            .map(|i| Ok(self.stats.get(&i, 0)?.iter().sum()))
            .collect()
    }

    /// `HC_STATS` summed over CPUs, by `HcReason`.
    pub fn hc_counts(&self) -> Result<Vec<u64>> {
        (0..NUM_HC_REASONS)
            .map(|i| Ok(self.hc_stats.get(&i, 0)?.iter().sum()))
            .collect()
    }

    pub fn decap_counts(&self) -> Result<Vec<u64>> {
        (0..NUM_DECAP_REASONS)
            .map(|i| Ok(self.decap_stats.get(&i, 0)?.iter().sum()))
            .collect()
    }

    /// Zero a VIP id's per-CPU counters (before the id is given to a new VIP).
    pub fn zero_vip_counters(&mut self, id: u32) -> Result<()> {
        let n = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        self.vip_stats
            .set(id, PerCpuValues::try_from(vec![Counters::default(); n])?, 0)
            .context("zeroing VIP_STATS")
    }

    /// Zero a backend id's per-CPU counters (before the id is given to a new backend).
    pub fn zero_backend_counters(&mut self, id: u32) -> Result<()> {
        let n = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        self.be_stats
            .set(id, PerCpuValues::try_from(vec![Counters::default(); n])?, 0)
            .context("zeroing BE_STATS")
    }

    pub fn vip_counters(&self, id: u32) -> Result<Counters> {
        Ok(sum_counters(&self.vip_stats.get(&id, 0)?))
    }

    pub fn backend_counters(&self, id: u32) -> Result<Counters> {
        Ok(sum_counters(&self.be_stats.get(&id, 0)?))
    }
}

/// What `VIP_INFO` holds for a live VIP.
pub fn vip_info(key: &VipKey, meta: &VipMeta) -> VipInfo {
    VipInfo {
        key: *key,
        forwarding: meta.forwarding,
        live: 1,
        _pad: [0; 2],
    }
}

fn sum_counters(v: &PerCpuValues<Counters>) -> Counters {
    v.iter().fold(Counters::default(), |a, c| Counters {
        packets: a.packets + c.packets,
        bytes: a.bytes + c.bytes,
        new_flows: a.new_flows + c.new_flows,
    })
}
