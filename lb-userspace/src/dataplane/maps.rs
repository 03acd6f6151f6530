//! The maps of the object as the agent must find them in the kernel: type, key and value
//! sizes, capacity (which config field sets it) and layout version. One table, so pinning,
//! adoption, migration and the checks all agree.
use anyhow::{anyhow, Result};
use lb_common::{layout::MapLayout, *};

/// Map capacities, fixed when the object is loaded; set by the `[agent]` config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub max_vips: u32,
    pub max_backends: u32,
    pub max_conns: u32,
    /// Slots reserved per ring: the ring size (`agent.ring_size`) rounded up to even by
    /// [`Sizes::normalized`] (so that no `RINGS` element holds slots of two rings).
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
    /// As the kernel will make them: `ring_stride` rounded up to even, and `max_conns` up
    /// to a multiple of the possible CPUs (`htab_map_alloc` does that for a per-CPU LRU,
    /// `BPF_F_NO_COMMON_LRU`: each CPU's list gets an equal share).
    pub fn normalized(self) -> Sizes {
        let cpus = aya::util::nr_cpus().map(|n| n as u32).unwrap_or(1).max(1);
        Sizes {
            ring_stride: (self.ring_stride + 1) & !1,
            max_conns: self.max_conns.div_ceil(cpus).saturating_mul(cpus),
            ..self
        }
    }

    /// Elements of `RINGS` (two slots each): kernel memory `max_vips * 2 * ring_stride * 4`
    /// bytes, with `ring_stride` even.
    pub fn ring_entries(&self) -> Result<u32> {
        self.max_vips
            .checked_mul(RINGS_PER_VIP)
            .and_then(|n| n.checked_mul(self.ring_stride))
            .map(|n| n / 2)
            .ok_or_else(|| anyhow!("agent.max_vips * 2 * agent.ring_size overflows u32"))
    }

    /// `max_entries` of a map of this capacity.
    pub fn entries(&self, c: Capacity) -> Result<u32> {
        Ok(match c {
            Capacity::Vips => self.max_vips,
            Capacity::Backends => self.max_backends,
            Capacity::Conns => self.max_conns,
            Capacity::Rings => self.ring_entries()?,
            Capacity::Fixed(n) => n,
        })
    }
}

/// What sets a map's `max_entries`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capacity {
    Vips,
    Backends,
    Conns,
    Rings,
    /// Fixed by the object (reason counters, one-element arrays).
    Fixed(u32),
}

impl Capacity {
    /// The config field an operator changes to change it.
    pub fn field(self) -> &'static str {
        match self {
            Capacity::Vips => "agent.max_vips",
            Capacity::Backends => "agent.max_backends",
            Capacity::Conns => "agent.max_conns",
            Capacity::Rings => "agent.max_vips / agent.ring_size",
            Capacity::Fixed(_) => "(this build)",
        }
    }
}

/// One map of the object.
#[derive(Clone, Copy, Debug)]
pub struct MapSpec {
    /// Its name in the object, in `bpftool` and as a pin.
    pub name: &'static str,
    /// `BPF_MAP_TYPE_*`.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub flags: u32,
    pub capacity: Capacity,
    pub layout: MapLayout,
}

const HASH: u32 = 1;
const ARRAY: u32 = 2;
const PERCPU_ARRAY: u32 = 6;
const LRU_HASH: u32 = 9;
/// `BPF_F_NO_COMMON_LRU`: one LRU list per CPU (no shared lock); each CPU's list holds
/// `max_entries / ncpus` entries.
pub const NO_COMMON_LRU: u32 = 2;

const fn spec<K, V>(name: &'static str, map_type: u32, flags: u32, capacity: Capacity) -> MapSpec {
    // The version and shape come from lb-common's table, by name.
    let mut i = 0;
    let layout = loop {
        let (n, l) = layout::MAPS[i];
        if const_eq(n, name) {
            break l;
        }
        i += 1;
    };
    MapSpec {
        name,
        map_type,
        key_size: std::mem::size_of::<K>() as u32,
        value_size: std::mem::size_of::<V>() as u32,
        flags,
        capacity,
        layout,
    }
}

const fn const_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Every map of the object. A map of the object missing here is refused at load (it would
/// not be pinned, and a restarted agent would get a fresh, empty one).
pub const MAPS: [MapSpec; 14] = [
    spec::<VipKey, VipMeta>("VIPS", HASH, 0, Capacity::Vips),
    spec::<AddrKey, u32>("VIP_ADDRS", HASH, 0, Capacity::Vips),
    spec::<u32, u64>("VIP_FILTER", ARRAY, 0, Capacity::Fixed(2)),
    spec::<u32, VipInfo>("VIP_INFO", ARRAY, 0, Capacity::Vips),
    spec::<u32, [u32; 2]>("RINGS", ARRAY, 0, Capacity::Rings),
    spec::<u32, Backend>("BACKENDS", ARRAY, 0, Capacity::Backends),
    spec::<FlowKey, ConnVal>("CONNS", LRU_HASH, NO_COMMON_LRU, Capacity::Conns),
    spec::<u32, Config>("CONFIG", ARRAY, 0, Capacity::Fixed(1)),
    spec::<u32, u64>("STATS", PERCPU_ARRAY, 0, Capacity::Fixed(NUM_REASONS)),
    spec::<u32, Counters>("VIP_STATS", PERCPU_ARRAY, 0, Capacity::Vips),
    spec::<u32, Counters>("BE_STATS", PERCPU_ARRAY, 0, Capacity::Backends),
    spec::<u32, u64>(
        "DECAP_STATS",
        PERCPU_ARRAY,
        0,
        Capacity::Fixed(NUM_DECAP_REASONS),
    ),
    spec::<[u8; 16], MapLayout>("LAYOUT", HASH, 0, Capacity::Fixed(32)),
    spec::<u32, u64>("HC_STATS", PERCPU_ARRAY, 0, Capacity::Fixed(NUM_HC_REASONS)),
];

/// The names of [`MAPS`].
pub const MAP_NAMES: [&str; MAPS.len()] = {
    let mut names = [""; MAPS.len()];
    let mut i = 0;
    while i < MAPS.len() {
        names[i] = MAPS[i].name;
        i += 1;
    }
    names
};

/// The spec of map `name`.
pub fn spec_of(name: &str) -> Option<&'static MapSpec> {
    MAPS.iter().find(|m| m.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_map_of_lb_common_s_layout_table_is_here_and_named_once() {
        let mut names: Vec<&str> = layout::MAPS.iter().map(|(n, _)| *n).collect();
        names.sort();
        let mut ours = MAP_NAMES.to_vec();
        ours.sort();
        assert_eq!(names, ours);
        ours.dedup();
        assert_eq!(ours.len(), MAPS.len());
        assert!(MAPS.iter().all(|m| m.name.len() <= 15));
    }
}
