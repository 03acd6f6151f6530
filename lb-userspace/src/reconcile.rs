//! Turning a validated [`Config`] into map contents with the fewest changes: ids are kept
//! for VIPs and backends that already exist (also across an agent restart, when they are
//! read back from the pinned maps), rings are rebuilt only when their input changed and are
//! swapped in by writing the idle buffer and then flipping the VIP's entry.
//!
//! A backend id names a *membership*: one backend address in one VIP. The same address in
//! two VIPs has two ids, so draining or removing it in one VIP never touches the other's
//! flows, and a connection entry stops holding the moment its backend leaves its VIP.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    time::Instant,
};

use anyhow::{anyhow, Context, Result};
use lb_common::*;

use crate::{
    config::{BackendConfig, Config, Mode, VipConfig},
    dataplane::{addr_raw, ip_from_raw, port_raw, vip_info, Dataplane},
    maglev::{self, MaglevInput},
};

/// What the agent last wrote for one VIP.
#[derive(Clone, Debug, PartialEq)]
pub struct AppliedVip {
    pub meta: VipMeta,
    /// Fingerprint of the live ring (read back from RINGS when adopted): enough to skip
    /// rewriting an identical ring without keeping 256 KiB per VIP in the agent.
    pub ring: u64,
    /// What the ring was built from: (VIP, hash seed, ring size); `None` when adopted.
    pub input: Option<(VipConfig, u32, u32)>,
}

/// A membership: (VIP, backend address).
pub type MemberKey = (VipKey, IpAddr);

/// The agent's record of the maps' contents.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    /// Every backend of every VIP: its id and `BACKENDS` entry.
    pub members: HashMap<MemberKey, (u32, Backend)>,
    pub vips: HashMap<VipKey, AppliedVip>,
    /// Ids of removed backends (`RETIRED` in the map) and when they were retired: not
    /// handed out again for [`ID_QUARANTINE`].
    pub retired: BTreeMap<u32, Instant>,
    /// Ids to give VIPs and memberships that have none yet, where free (a migration keeps
    /// the ids the old maps used; consumed by the next reconcile).
    pub hints: IdHints,
}

/// Preferred ids, see [`Applied::hints`].
#[derive(Clone, Debug, Default)]
pub struct IdHints {
    pub vips: HashMap<VipKey, u32>,
    pub members: HashMap<MemberKey, u32>,
}

impl Applied {
    /// The id of backend `addr` of VIP `key`.
    pub fn member_id(&self, key: &VipKey, addr: &IpAddr) -> Option<u32> {
        self.members.get(&(*key, *addr)).map(|(id, _)| *id)
    }

    /// The (VIP, address) a backend id stands for.
    pub fn member_of(&self, id: u32) -> Option<MemberKey> {
        self.members
            .iter()
            .find(|(_, (i, _))| *i == id)
            .map(|(k, _)| *k)
    }
}

/// How long a removed backend's id stays unused. Far longer than any packet can take, so a
/// packet that read an old ring always finds the backend that ring meant.
pub const ID_QUARANTINE: std::time::Duration = std::time::Duration::from_secs(2);

/// What a reconcile changed, for the log. Backends are named `vip/address`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub vips_added: Vec<String>,
    pub vips_updated: Vec<String>,
    pub vips_removed: usize,
    pub backends_added: Vec<String>,
    pub backends_removed: Vec<String>,
    pub rings_rebuilt: usize,
    /// Connection entries deleted because their VIP or backend was removed.
    pub conns_swept: usize,
    /// The maps were replaced by new ones of other sizes (see `migrate`).
    pub migrated: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

pub fn vip_key(v: &VipConfig) -> VipKey {
    let (addr, family) = addr_raw(v.address);
    VipKey {
        addr,
        port: port_raw(v.port),
        proto: v.protocol.number(),
        family,
    }
}

/// Read back what an earlier agent left in pinned maps, and repair what it may have left
/// half done: `VIP_INFO` mirrors `VIPS`, `VIP_FILTER` covers every VIP address, and a
/// backend whose VIP is gone is retired (its connection entries deleted).
/// (From then on `Dataplane::set_vip` and `remove_vip` keep the first two right.)
pub fn adopt(dp: &mut Dataplane) -> Result<Applied> {
    let mut applied = Applied::default();
    let vips: Vec<(VipKey, VipMeta)> = dp.vips.iter().collect::<Result<_, _>>()?;
    let by_id: HashMap<u32, VipKey> = vips.iter().map(|(k, m)| (m.id, *k)).collect();
    let mut orphans = BTreeSet::new();
    for (id, be) in dp.read_backends()?.into_iter().enumerate() {
        let id = id as u32;
        match (be.state, by_id.get(&be.vip)) {
            (BACKEND_EMPTY, _) => {}
            (BACKEND_RETIRED, _) => {
                applied.retired.insert(id, Instant::now());
            }
            (_, Some(key)) => {
                applied
                    .members
                    .insert((*key, ip_from_raw(be.addr, be.family)), (id, be));
            }
            (_, None) => {
                dp.set_backend(
                    id,
                    &Backend {
                        state: BACKEND_RETIRED,
                        ..be
                    },
                )?;
                applied.retired.insert(id, Instant::now());
                orphans.insert(id);
            }
        }
    }
    for (key, meta) in vips {
        let ring = dp.read_ring(meta.ring_base, meta.ring_size)?;
        dp.set_vip_info(meta.id, &vip_info(&key, &meta))?;
        applied.vips.insert(
            key,
            AppliedVip {
                meta,
                ring: ring_hash(&ring),
                input: None,
            },
        );
    }
    dp.refresh_vip_filter()?;
    // An earlier agent may have died between retiring ids and sweeping their entries:
    // sweep now, so that no entry outlives what it names (the ids leave quarantine later).
    if !orphans.is_empty() {
        dp.wait_for_programs()?;
    }
    let live: BTreeSet<u32> = applied.vips.values().map(|v| v.meta.id).collect();
    let retired = &applied.retired;
    dp.sweep_conns(|c| retired.contains_key(&c.backend) || !live.contains(&(c.vip as u32)))?;
    Ok(applied)
}

/// The data-plane `Config` entry for an agent config and interface MTU.
pub fn dataplane_config(cfg: &Config, mtu: u32) -> Result<lb_common::Config> {
    let a = &cfg.agent;
    let mut c = lb_common::Config {
        hash_seed: a.hash_seed,
        mtu: a.mtu.unwrap_or(mtu),
        ..Default::default()
    };
    if let Some(m) = a.gateway_mac {
        c.gw_mac = m.octets();
    }
    if let Some(p) = a.encap_source_v4 {
        let len = p.prefix_len();
        let host = if len == 32 { 0 } else { u32::MAX >> len };
        c.src4 = addr_raw(p.addr().into()).0[0];
        c.src4_mask = host.to_be();
    }
    if let Some(p) = a.encap_source_v6 {
        let bits = 128 - p.prefix_len() as u32; // <= 32, checked by validation
        let host = if bits == 0 {
            0
        } else {
            u32::MAX >> (32 - bits)
        };
        c.src6 = addr_raw(p.addr().into()).0;
        c.src6_mask = host.to_be();
    }
    Ok(c)
}

/// FNV-1a over a ring's words (backend ids; with a secondary for stateless VIPs).
pub fn ring_hash(ring: &[u32]) -> u64 {
    ring.iter()
        .flat_map(|id| id.to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        })
        ^ ring.len() as u64
}

/// The Maglev ring of a VIP as backend addresses: its active backends, named by address so
/// that every LB host with the same config builds the same ring.
pub fn ring_addresses(cfg: &Config, v: &VipConfig) -> Result<Vec<IpAddr>> {
    let (active, table, _) = ring_of(cfg, v)?;
    Ok(table
        .into_iter()
        .map(|i| active[i as usize].address)
        .collect())
}

/// No backend id (never a valid one: ids are below `agent.max_backends` <= 65536).
const NO_ID: u32 = u32::MAX;

/// A stateless VIP's ring words: each slot's primary (`ring`) with a secondary, the first
/// of these that holds connections (up or draining in this VIP) and is not the primary:
/// 1. the slot's primary in the live ring `prev` (the slot moved: its connections are
///    there);
/// 2. the secondary in `prev` (a slot that moved before keeps its second chance until it
///    moves again);
/// 3. the slot's owner in a ring that still counts the draining backends (after a restart
///    without the live ring, a drain in progress is still known);
/// 4. the slot's Maglev second choice (`seconds`, ids): usually the old owner of a slot a
///    joining backend took, so LB hosts without history agree with those that have it.
///
/// Otherwise none (secondary = primary). 1 and 2 make a host's choice depend on the rings
/// it has seen: hosts that saw the same changes agree; see docs/dataplane.md.
fn with_secondaries(
    cfg: &Config,
    v: &VipConfig,
    key: &VipKey,
    applied: &Applied,
    ring: Vec<u32>,
    prev: Option<Vec<u32>>,
    seconds: &[u32],
) -> Result<Vec<u32>> {
    // From the config, not from `applied`: a backend removed in this change is still a
    // member there until it is retired (and its id may come back for a newcomer).
    let holds: HashSet<u32> = v
        .backends
        .iter()
        .filter(|b| !b.down)
        .filter_map(|b| applied.member_id(key, &b.address))
        .collect();
    let draining = v
        .backends
        .iter()
        .any(|b| b.drain && !b.down && b.weight > 0);
    let with_draining: Option<Vec<u32>> = if draining {
        let mut all = v.clone();
        for b in &mut all.backends {
            b.drain = false;
        }
        let (active, table, _) = ring_of(cfg, &all)?;
        let ids: Vec<u32> = active
            .iter()
            .map(|b| applied.member_id(key, &b.address).unwrap_or(NO_ID))
            .collect();
        Some(table.into_iter().map(|i| ids[i as usize]).collect())
    } else {
        None
    };
    Ok(ring
        .iter()
        .enumerate()
        .map(|(s, &p)| {
            let ok = |id: u32| id != p && holds.contains(&id);
            let old = prev.as_ref().map(|r| r[s]);
            let second = [
                old.map(ring_primary),
                old.map(ring_secondary),
                with_draining.as_ref().map(|r| r[s]),
                seconds.get(s).copied(),
            ]
            .into_iter()
            .flatten()
            .find(|&id| ok(id))
            .unwrap_or(p);
            ring_word(p, second)
        })
        .collect())
}

/// A VIP's active backends, its Maglev table of indices into them, and each slot's second
/// choice (an index, or `maglev::NO_SECOND`).
type Table<'a> = (Vec<&'a BackendConfig>, Vec<u32>, Vec<u32>);

fn ring_of<'a>(cfg: &Config, v: &'a VipConfig) -> Result<Table<'a>> {
    let active: Vec<_> = v.backends.iter().filter(|b| b.active()).collect();
    let names: Vec<String> = active.iter().map(|b| b.address.to_string()).collect();
    let input: Vec<MaglevInput> = active
        .iter()
        .zip(&names)
        .map(|(b, n)| MaglevInput {
            name: n.as_bytes(),
            weight: b.weight,
        })
        .collect();
    let (table, seconds) = if v.mode == Mode::Stateless {
        maglev::build_with_seconds(cfg.agent.hash_seed, &input, cfg.agent.ring_size)
    } else {
        maglev::build(cfg.agent.hash_seed, &input, cfg.agent.ring_size).map(|t| (t, Vec::new()))
    }
    .map_err(|e| anyhow!("vip[{}]: ring: {e:?}", v.name))?;
    Ok((active, table, seconds))
}

/// The next id from `from` on that `taken` does not claim. `from` is a cursor kept across
/// the calls of one reconcile (every id below it is taken), so 10,000 new backends cost
/// 10,000 probes, not 50 million.
fn next_free(from: &mut u32, max: u32, taken: impl Fn(u32) -> bool) -> Option<u32> {
    let id = (*from..max).find(|&i| !taken(i))?;
    *from = id + 1;
    Some(id)
}

/// A backend id: the hinted one if it is free, else the lowest neither in use nor in
/// quarantine; failing that, the longest-retired one.
fn free_backend_id(
    used: &BTreeSet<u32>,
    retired: &mut BTreeMap<u32, Instant>,
    max: u32,
    from: &mut u32,
    hint: Option<u32>,
) -> Result<u32> {
    let now = Instant::now();
    retired.retain(|_, t| now.duration_since(*t) < ID_QUARANTINE);
    if let Some(h) = hint.filter(|h| *h < max && !used.contains(h) && !retired.contains_key(h)) {
        return Ok(h);
    }
    if let Some(id) = next_free(from, max, |i| used.contains(&i) || retired.contains_key(&i)) {
        return Ok(id);
    }
    let (&id, _) = retired.iter().min_by_key(|(_, t)| **t).ok_or_else(|| {
        anyhow!(
            "no free backend id below {max} (agent.max_backends): the ids of backends removed \
             in the same change are free only after it; remove first, then add, or raise \
             agent.max_backends"
        )
    })?;
    retired.remove(&id);
    Ok(id)
}

/// Make the maps say what `cfg` says. `cfg` must be validated.
pub fn reconcile(
    dp: &mut Dataplane,
    cfg: &Config,
    applied: &mut Applied,
    mtu: u32,
) -> Result<Changes> {
    let mut ch = Changes::default();
    let hints = std::mem::take(&mut applied.hints);
    let dcfg = dataplane_config(cfg, mtu)?;
    if dp.config.get(&0, 0)? != dcfg {
        dp.set_config(&dcfg)?;
    }

    // VIP ids first: every membership names its VIP's id.
    let mut vip_ids: BTreeSet<u32> = applied.vips.values().map(|v| v.meta.id).collect();
    let mut vip_cursor = 0;
    let mut ids: HashMap<VipKey, (u32, bool)> = HashMap::new();
    for v in &cfg.vips {
        let key = vip_key(v);
        let id = match applied.vips.get(&key) {
            Some(a) => (a.meta.id, false),
            None => {
                let max = dp.sizes.max_vips;
                let id = match hints.vips.get(&key) {
                    Some(&h) if h < max && !vip_ids.contains(&h) => h,
                    _ => next_free(&mut vip_cursor, max, |i| vip_ids.contains(&i)).ok_or_else(
                        || {
                            anyhow!(
                                "no free VIP id below {max} (agent.max_vips): the ids of VIPs \
                                 removed in the same change are free only after it"
                            )
                        },
                    )?,
                };
                vip_ids.insert(id);
                // A new VIP counts from zero, whatever an earlier holder of the id counted.
                dp.zero_vip_counters(id)?;
                (id, true)
            }
        };
        ids.insert(key, id);
    }

    // Memberships: a draining (or weight 0) backend keeps its flows and is in no ring.
    let mut want: HashMap<MemberKey, Backend> = HashMap::new();
    for v in &cfg.vips {
        let key = vip_key(v);
        for b in &v.backends {
            let (addr, family) = addr_raw(b.address);
            want.insert(
                (key, b.address),
                Backend {
                    addr,
                    mac: b.mac.map_or([0; 6], |m| m.octets()),
                    family,
                    // Down (its checks fail): its flows move. Drained, weight 0: kept.
                    state: if b.down {
                        BACKEND_DOWN
                    } else if b.active() {
                        BACKEND_UP
                    } else {
                        BACKEND_DRAINING
                    },
                    vip: ids[&key].0,
                },
            );
        }
    }
    let mut used: BTreeSet<u32> = applied.members.values().map(|(id, _)| *id).collect();
    let mut be_cursor = 0;
    // In a stable order, so that ids do not depend on hash-map iteration.
    let mut order: Vec<(&MemberKey, &Backend)> = want.iter().collect();
    order.sort_by_key(|((k, a), b)| (b.vip, k.port, *a));
    for (mk, be) in order {
        match applied.members.get(mk) {
            Some((_, old)) if old == be => {}
            Some(&(id, _)) => {
                dp.set_backend(id, be)?;
                applied.members.insert(*mk, (id, *be));
            }
            None => {
                let id = free_backend_id(
                    &used,
                    &mut applied.retired,
                    dp.sizes.max_backends,
                    &mut be_cursor,
                    hints.members.get(mk).copied(),
                )?;
                used.insert(id);
                dp.zero_backend_counters(id)?;
                dp.set_backend(id, be)?;
                applied.members.insert(*mk, (id, *be));
                ch.backends_added.push(member_name(cfg, mk));
            }
        }
    }

    // Rings: rebuild those whose input changed, flip buffers.
    let mut live = Vec::new();
    for v in &cfg.vips {
        let key = vip_key(v);
        live.push(key);
        // Same VIP, seed and ring size: same ring (ids of kept memberships never change),
        // so skip the build.
        let input = (v.clone(), cfg.agent.hash_seed, cfg.agent.ring_size);
        if applied.vips.get(&key).and_then(|a| a.input.as_ref()) == Some(&input) {
            continue;
        }
        // Slot -> backend index -> id: one id lookup per backend, not one per slot
        // (65,537 hash lookups were most of a rebuild).
        // Every backend of a stateless VIP draining: with no table to keep their connections,
        // a ring over the draining ones does (new connections land there too: nobody else
        // would take them). Weight 0 stays out: it has no share.
        let all_draining;
        let source = if v.mode == Mode::Stateless && !v.backends.iter().any(|b| b.active()) {
            let mut all = v.clone();
            for b in &mut all.backends {
                b.drain = false;
            }
            all_draining = all;
            &all_draining
        } else {
            v
        };
        let (active, table, seconds) = ring_of(cfg, source)?;
        let id_of: Vec<u32> = active
            .iter()
            .map(|b| applied.members[&(key, b.address)].0)
            .collect();
        let mut ring: Vec<u32> = table.into_iter().map(|i| id_of[i as usize]).collect();
        if v.mode == Mode::Stateless {
            let prev = match applied.vips.get(&key) {
                Some(a)
                    if a.meta.ring_size == ring.len() as u32
                        && a.meta.flags & VIP_F_STATELESS != 0 =>
                {
                    Some(dp.read_ring(a.meta.ring_base, a.meta.ring_size)?)
                }
                _ => None,
            };
            let seconds: Vec<u32> = seconds
                .into_iter()
                .map(|i| id_of.get(i as usize).copied().unwrap_or(NO_ID))
                .collect();
            ring = with_secondaries(cfg, v, &key, applied, ring, prev, &seconds)?;
        }
        let mut flags = if v.affinity { VIP_F_AFFINITY } else { 0 };
        if v.mode == Mode::Stateless {
            flags |= VIP_F_STATELESS;
        }
        let forwarding = v.forwarding.to_common() as u8;
        let (id, is_new) = ids[&key];
        let which = match applied.vips.get(&key) {
            Some(a) => {
                let unchanged = a.ring == ring_hash(&ring)
                    && a.meta.flags == flags
                    && a.meta.forwarding == forwarding;
                if unchanged {
                    // Adopted (or rebuilt to the same ring): remember what it is built from.
                    if let Some(a) = applied.vips.get_mut(&key) {
                        a.input = Some(input);
                    }
                    continue;
                }
                1 - dp.ring_buffer(a.meta.ring_base)
            }
            None => 0,
        };
        let ring_base = dp
            .write_ring(id, which, &ring)
            .with_context(|| format!("vip[{}]", v.name))?;
        let meta = VipMeta {
            id,
            ring_base,
            ring_size: ring.len() as u32,
            forwarding,
            flags,
            _pad: [0; 2],
        };
        dp.set_vip(&key, &meta)?;
        applied.vips.insert(
            key,
            AppliedVip {
                meta,
                ring: ring_hash(&ring),
                input: Some(input),
            },
        );
        ch.rings_rebuilt += 1;
        if is_new {
            ch.vips_added.push(v.name.clone());
        } else {
            ch.vips_updated.push(v.name.clone());
        }
    }
    let gone: Vec<VipKey> = applied
        .vips
        .keys()
        .filter(|k| !live.contains(k))
        .copied()
        .collect();
    let mut gone_vips = BTreeSet::new();
    for key in gone {
        dp.remove_vip(&key)?;
        gone_vips.insert(applied.vips.remove(&key).unwrap().meta.id);
        ch.vips_removed += 1;
    }

    // After any flip, wait until no packet can still be reading an old ring: only then may
    // the next reconcile rewrite that buffer, or the backends only it named be retired.
    if ch.rings_rebuilt > 0 || ch.vips_removed > 0 {
        dp.wait_for_programs()?;
    }
    // Memberships that are gone: retired last, after no ring names them. Only the state
    // byte changes, so even a packet that raced the flip reads a whole, valid entry.
    let gone: Vec<MemberKey> = applied
        .members
        .keys()
        .filter(|k| !want.contains_key(k))
        .copied()
        .collect();
    let mut gone_ids = BTreeSet::new();
    for mk in gone {
        let (id, be) = applied.members.remove(&mk).unwrap();
        dp.set_backend(
            id,
            &Backend {
                state: BACKEND_RETIRED,
                ..be
            },
        )?;
        applied.retired.insert(id, Instant::now());
        gone_ids.insert(id);
        ch.backends_removed
            .push(format!("{}/{}", ip_from_raw(mk.0.addr, mk.0.family), mk.1));
    }
    // Their connection entries go too, so that no entry ever names an id that is handed
    // out again. A packet that read a backend as up just before it was retired can at most
    // refresh an entry; none can create one naming it any more.
    if !gone_ids.is_empty() || !gone_vips.is_empty() {
        dp.wait_for_programs()?;
        ch.conns_swept = dp.sweep_conns(|c| {
            gone_ids.contains(&c.backend) || gone_vips.contains(&(c.vip as u32))
        })?;
    }
    Ok(ch)
}

/// `vip/address` for the log.
fn member_name(cfg: &Config, (key, addr): &MemberKey) -> String {
    let name = cfg
        .vips
        .iter()
        .find(|v| vip_key(v) == *key)
        .map(|v| v.name.as_str())
        .unwrap_or("?");
    format!("{name}/{addr}")
}
