//! Every map of the data plane, in one place. Names are what the agent pins and what
//! `bpftool` shows (15 characters at most). Sizes are defaults; the agent sets its own.
use aya_ebpf::{
    bindings::BPF_F_NO_COMMON_LRU,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    AddrKey, Backend, Config, ConnVal, Counters, FlowKey, VipInfo, VipKey, VipMeta,
    DEFAULT_RING_SIZE, MAX_BACKENDS, MAX_CONNS, MAX_VIPS, NUM_DECAP_REASONS, NUM_HC_REASONS,
    NUM_REASONS, RINGS_PER_VIP,
};

/// (address, port, protocol) → VIP.
#[map]
pub static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(MAX_VIPS, 0);

/// VIP id → its key and forwarding: established flows check their VIP here (an inlined
/// array read) instead of looking it up in `VIPS` (a hash).
#[map]
pub static VIP_INFO: Array<VipInfo> = Array::with_max_entries(MAX_VIPS, 0);

/// Addresses that carry at least one VIP (for fragments, ICMP and other protocols).
#[map]
pub static VIP_ADDRS: HashMap<AddrKey, u32> = HashMap::with_max_entries(MAX_VIPS, 0);

/// Two words. `[0]`: bit `vip_filter_bit(addr)` is set for every VIP address (a one-hash
/// Bloom filter), so most non-VIP packets pass without a `VIPS` lookup. `[1]`: the same for
/// addresses of stateless VIPs, whose packets look up `VIPS` before (instead of) `CONNS`.
#[map]
pub static VIP_FILTER: Array<u64> = Array::with_max_entries(2, 0);

/// Maglev rings, two per VIP (double buffer), `ring_stride` (even) slots each: backend
/// ids, two per element. The kernel rounds array values up to 8 bytes, so a `u32` element
/// would waste half of the largest map.
#[map]
pub static RINGS: Array<[u32; 2]> =
    Array::with_max_entries(MAX_VIPS * RINGS_PER_VIP * (DEFAULT_RING_SIZE + 1) / 2, 0);

/// Backend id → backend.
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Connection table: 5-tuple → backend, LRU with per-CPU LRU lists (no shared lock).
#[map]
pub static CONNS: LruHashMap<FlowKey, ConnVal> =
    LruHashMap::with_max_entries(MAX_CONNS, BPF_F_NO_COMMON_LRU);

/// One element: hash seed, MTU, outer source addresses, gateway MAC.
#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Per-CPU count of every `lb_common::Reason`.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_REASONS, 0);

/// Per-CPU counters per VIP id.
#[map]
pub static VIP_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

/// Per-CPU counters per backend id.
#[map]
pub static BE_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Per-CPU counters of the `decap` program, by `lb_common::DecapReason`.
#[map]
pub static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_DECAP_REASONS, 0);

/// Per-CPU counters of the `hc_encap` program, by `lb_common::HcReason`.
#[map]
pub static HC_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_HC_REASONS, 0);

/// Map name → layout version and shape of its key and value (see `lb_common::layout`):
/// written by the agent, never read by the programs; how a later build knows what it is
/// adopting.
#[map]
pub static LAYOUT: HashMap<[u8; 16], lb_common::layout::MapLayout> =
    HashMap::with_max_entries(32, 0);

#[inline(always)]
pub fn bump_reason(map: &PerCpuArray<u64>, idx: u32) {
    if let Some(p) = map.get_ptr_mut(idx) {
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub fn bump_counters(map: &PerCpuArray<Counters>, idx: u32, bytes: u64, new_flow: bool) {
    if let Some(p) = map.get_ptr_mut(idx) {
        unsafe {
            (*p).packets += 1;
            (*p).bytes += bytes;
            (*p).new_flows += new_flow as u64;
        }
    }
}
