//! Types shared by the XDP data plane (`lb-ebpf`) and the userspace agent.
//!
//! Every struct here is a BPF map key or value: `#[repr(C)]`, no implicit padding, and
//! addresses and ports kept exactly as they appear on the wire ("raw": the packet's bytes
//! read as native-endian words). Both sides are little-endian (x86-64 host, bpfel), so the
//! same bytes give the same words and [`flow_hash`] gives the same value on both sides:
//! userspace can predict the backend of any flow.
//!
//! The data-plane behaviour these maps drive is specified in `docs/dataplane.md`.
#![cfg_attr(not(test), no_std)]

pub mod bench;

/// UDP destination port of our GUE encapsulation: "variant 1" (IP directly in UDP) for
/// conntrack VIPs, variant 0 with our private data ([`GUE_LB_MAGIC`]) for stateless ones.
pub const GUE_PORT: u16 = 6080;
/// First two bytes of the private data of our GUE variant 0 header ("LB"), which carries a
/// stateless VIP's second chance: `"LB"`, flags (`GUE_F_*`), 0, then the secondary
/// backend's address (4 bytes in an IPv4 outer header, 16 in IPv6). See docs/dataplane.md.
pub const GUE_LB_MAGIC: [u8; 2] = *b"LB";
/// GUE private-data flag: the address that follows is a secondary backend.
pub const GUE_F_SECOND: u8 = 1;
/// GUE private-data flag: already redirected once by a backend; never redirected again.
pub const GUE_F_REDIRECTED: u8 = 2;
/// Bytes of our GUE variant 0 header (4 of GUE, 4 of private data, the address) for an
/// outer header of each family.
pub const GUE_V0_LEN4: usize = 12;
pub const GUE_V0_LEN6: usize = 24;
/// Default Maglev ring size (prime, Katran's and the Maglev paper's).
pub const DEFAULT_RING_SIZE: u32 = 65537;
/// Capacity of the VIP map compiled into the object (the agent may lower or raise it).
pub const MAX_VIPS: u32 = 64;
/// Capacity of the backend array compiled into the object.
pub const MAX_BACKENDS: u32 = 4096;
/// Connection-table capacity compiled into the object.
pub const MAX_CONNS: u32 = 65536;
/// Rings are double-buffered: VIP `id` owns rings `2*id` and `2*id+1`, each `ring_stride`
/// slots long (the ring size rounded up to even); `VipMeta::ring_base` is the slot index
/// of the live one. `RINGS` packs two slots per element: slot `g` is `RINGS[g / 2][g % 2]`.
pub const RINGS_PER_VIP: u32 = 2;
/// ICMP payload quoted in our "fragmentation needed" replies (bytes after the ICMP header).
pub const ICMP4_QUOTE: u32 = 64;
/// ICMPv6 payload quoted in our "packet too big" replies.
pub const ICMP6_QUOTE: u32 = 128;
/// Socket mark of the agent's health probes that go through the tunnel: `HC_MARK |
/// backend id`. The `hc_encap` program on the LB's interface sends such a packet to that
/// one backend exactly as the data plane sends client traffic.
pub const HC_MARK: u32 = 0x4c42_0000;
/// The bits of a mark that say "a health probe" (the rest is the backend id).
pub const HC_MARK_MASK: u32 = 0xffff_0000;

/// TTL / hop limit of packets the data plane builds.
pub const OUTER_TTL: u8 = 64;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// How a VIP's packets reach the backend.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forwarding {
    /// IP in IP: 4-in-4, 6-in-6 or 4-in-6, by the families of VIP and backend.
    Ipip = 0,
    /// IP in UDP to [`GUE_PORT`], outer source port carries flow entropy.
    Gue = 1,
    /// Destination MAC rewrite only; the backend must be on the same L2 segment.
    L2Dsr = 2,
}

impl Forwarding {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Ipip),
            1 => Some(Self::Gue),
            2 => Some(Self::L2Dsr),
            _ => None,
        }
    }
}

/// Key of the `VIPS` map: destination address, port and protocol of a packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    /// Raw address words; an IPv4 address is `addr[0]`, the rest zero.
    pub addr: [u32; 4],
    /// Raw (network-order) port.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// `VipMeta::flags`: hash only the client address (session affinity).
pub const VIP_F_AFFINITY: u8 = 1;
/// `VipMeta::flags`: stateless (second-chance) VIP: no connection table; each packet goes
/// to its ring slot's primary with the slot's secondary carried in a GUE header.
pub const VIP_F_STATELESS: u8 = 2;

/// A `RINGS` slot word: the primary backend id in the low 16 bits, the secondary in the
/// high 16 (`agent.max_backends` <= 65536). A secondary equal to the primary means none;
/// only stateless VIPs use the secondary.
#[inline(always)]
pub const fn ring_word(primary: u32, secondary: u32) -> u32 {
    (primary & 0xffff) | (secondary << 16)
}
#[inline(always)]
pub const fn ring_primary(word: u32) -> u32 {
    word & 0xffff
}
#[inline(always)]
pub const fn ring_secondary(word: u32) -> u32 {
    word >> 16
}

/// Value of the `VIPS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipMeta {
    /// Index into `VIP_STATS`.
    pub id: u32,
    /// Index in `RINGS` of slot 0 of the live ring.
    pub ring_base: u32,
    /// Number of slots of the live ring; 0 means no backend (packets are dropped).
    pub ring_size: u32,
    /// [`Forwarding`] as u8.
    pub forwarding: u8,
    /// `VIP_F_*` bits.
    pub flags: u8,
    pub _pad: [u8; 2],
}

/// Key of the `VIP_ADDRS` map: every address that has at least one VIP. Consulted only
/// off the fast path (fragments, ICMP, other protocols) to tell "to a VIP" from "not ours".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// `Backend::state`.
pub const BACKEND_EMPTY: u8 = 0;
/// Takes new and established flows.
pub const BACKEND_UP: u8 = 1;
/// Keeps its established flows, gets no new ones (absent from rings).
pub const BACKEND_DRAINING: u8 = 2;
/// Failed: established flows are moved to the VIP's ring choice.
pub const BACKEND_DOWN: u8 = 3;
/// Removed from every VIP: behaves as `DOWN` (its flows move) while its id is quarantined,
/// so that a packet still holding an old ring never meets a half-rewritten entry.
pub const BACKEND_RETIRED: u8 = 4;

/// Element of the `BACKENDS` array, indexed by backend id. A backend id names one
/// *membership*: one backend address in one VIP. The same address in two VIPs has two ids,
/// so draining, removing or counting it in one VIP never touches the other.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Raw address words; IPv4 in `addr[0]`.
    pub addr: [u32; 4],
    /// Next-hop MAC for this backend; all zero means `Config::gw_mac`.
    pub mac: [u8; 6],
    pub family: u8,
    pub state: u8,
    /// Id of the VIP this backend belongs to: a connection entry is honoured only while its
    /// backend still belongs to the entry's VIP.
    pub vip: u32,
}

/// Key of the connection table (`CONNS`, LRU with per-CPU lists) and input of [`flow_hash`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Raw ports.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// `ConnVal::flags`: a FIN or RST of the client was seen (the connection is closing).
pub const CONN_F_CLOSING: u8 = 1;

/// Value of the connection table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnVal {
    /// Backend (membership) id.
    pub backend: u32,
    /// Id of the VIP the flow belongs to (`max_vips` <= 4096): with `VIP_INFO` it lets an
    /// established flow skip the `VIPS` lookup.
    pub vip: u16,
    /// `CONN_F_*` bits.
    pub flags: u8,
    pub _pad: u8,
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC_COARSE) of the flow's last packet,
    /// refreshed at most once per [`ATIME_GRANULARITY_NS`]: how the agent tells active
    /// connections from idle ones.
    pub atime: u64,
}

/// The data plane refreshes `ConnVal::atime` when it is at least this old.
pub const ATIME_GRANULARITY_NS: u64 = 1_000_000_000;

/// Element of the `VIP_INFO` array, indexed by VIP id: a mirror of `VIPS` (key and
/// forwarding of each live VIP id) that established flows check instead of a hash lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    pub key: VipKey,
    pub forwarding: u8,
    /// 1 while the VIP exists.
    pub live: u8,
    pub _pad: [u8; 2],
}

/// The one element of the `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Seed of [`flow_hash`]; identical on every LB host behind one ECMP group.
    pub hash_seed: u32,
    /// Interface MTU: an encapsulated packet whose IP length would exceed it is answered
    /// with ICMP instead. 0 disables the check.
    pub mtu: u32,
    /// Outer IPv4 source: `(src4 & !src4_mask) | (entropy & src4_mask)` (raw words).
    pub src4: u32,
    pub src4_mask: u32,
    /// Outer IPv6 source: words 0..3 from `src6`, word 3 mixed like `src4` with `src6_mask`.
    pub src6: [u32; 4],
    pub src6_mask: u32,
    /// Destination MAC of forwarded packets when the backend has none.
    pub gw_mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Per-VIP and per-backend counters (per-CPU arrays `VIP_STATS`, `BE_STATS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    /// Bytes of the frames as received.
    pub bytes: u64,
    /// Conntrack VIPs: packets that created a connection-table entry: found none (or one
    /// pointing at a dead backend) and are not a bare TCP SYN (a SYN creates no entry). One
    /// per connection (its handshake's ACK) or UDP flow; a SYN flood does not move it.
    /// Stateless VIPs (no table): SYNs.
    pub new_flows: u64,
}

/// Why the `lb` program returned what it returned: index into the per-CPU `STATS` array.
/// Every packet increments exactly one of these.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IPv4/IPv6 (ARP, LLDP, ...), or a VLAN tag with another ethertype inside.
    PassNotIp = 0,
    /// IP, but not to any VIP (address, port, protocol).
    PassNotVip = 1,
    /// Frame too short for the headers it announces (Ethernet, VLAN, IP, L4, ICMP inner).
    DropTruncated = 2,
    /// IPv4 header with IHL < 5, or total length shorter than its header or longer than
    /// the frame; IPv6 payload length longer than the frame; wrong IP version nibble.
    DropBadHeader = 3,
    /// A fragment to a VIP address (IPv4 MF or offset, IPv6 fragment header).
    DropFragment = 4,
    /// A protocol other than TCP/UDP/ICMP to a VIP address (incl. IPv6 extension headers).
    DropUnsupported = 5,
    /// The VIP has no backend (empty ring) or the ring named an unused backend slot.
    DropNoBackend = 6,
    /// ICMP to a VIP address that is neither an echo request nor an error about one of its
    /// flows.
    DropIcmp = 7,
    /// Too big to encapsulate and DF clear: cannot fragment in XDP.
    DropTooBig = 8,
    /// A helper (adjust_head/adjust_tail) failed.
    DropHelper = 9,
    /// Forwarded to a backend (encapsulated or MAC-rewritten).
    TxForward = 10,
    /// ICMP error about a VIP flow, forwarded to that flow's backend.
    TxIcmpForward = 11,
    /// Answered with ICMP fragmentation-needed / packet-too-big.
    TxIcmpTooBig = 12,
    /// `CONFIG` missing (agent not ready).
    DropNoConfig = 13,
    /// An echo request (ping) to a VIP address, answered with an echo reply.
    TxIcmpEcho = 14,
}

pub const NUM_REASONS: u32 = 15;

impl Reason {
    pub const ALL: [Reason; NUM_REASONS as usize] = [
        Reason::PassNotIp,
        Reason::PassNotVip,
        Reason::DropTruncated,
        Reason::DropBadHeader,
        Reason::DropFragment,
        Reason::DropUnsupported,
        Reason::DropNoBackend,
        Reason::DropIcmp,
        Reason::DropTooBig,
        Reason::DropHelper,
        Reason::TxForward,
        Reason::TxIcmpForward,
        Reason::TxIcmpTooBig,
        Reason::DropNoConfig,
        Reason::TxIcmpEcho,
    ];

    /// Metric label.
    pub fn name(self) -> &'static str {
        match self {
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassNotVip => "pass_not_vip",
            Reason::DropTruncated => "drop_truncated",
            Reason::DropBadHeader => "drop_bad_header",
            Reason::DropFragment => "drop_fragment",
            Reason::DropUnsupported => "drop_unsupported_proto",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::DropIcmp => "drop_icmp",
            Reason::DropTooBig => "drop_too_big",
            Reason::DropHelper => "drop_helper",
            Reason::TxForward => "tx_forward",
            Reason::TxIcmpForward => "tx_icmp_forward",
            Reason::TxIcmpTooBig => "tx_icmp_too_big",
            Reason::DropNoConfig => "drop_no_config",
            Reason::TxIcmpEcho => "tx_icmp_echo",
        }
    }
}

/// Counters of the `decap` program (per-CPU array `DECAP_STATS`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapReason {
    /// Not our encapsulation: passed untouched.
    Pass = 0,
    /// Outer header removed, inner packet passed up.
    Decapped = 1,
    /// Looked like ours but too short or inconsistent: dropped.
    DropMalformed = 2,
    /// A stateless VIP's packet of no connection on this host: sent on to the secondary
    /// it carried (XDP_TX or redirect after a FIB lookup).
    Redirected = 3,
    /// As `Redirected`, but the FIB had no neighbour (or no route) for the secondary: the
    /// re-encapsulated packet is passed to this host's stack to forward (and resolve).
    RedirectedStack = 4,
    /// A stateless VIP's packet of no connection on this host and no second chance left
    /// (no secondary, or redirected once already): decapsulated and passed up, where the
    /// kernel answers as for any unknown segment (RST).
    NoSecondChance = 5,
}
pub const NUM_DECAP_REASONS: u32 = 6;

impl DecapReason {
    pub const ALL: [DecapReason; NUM_DECAP_REASONS as usize] = [
        DecapReason::Pass,
        DecapReason::Decapped,
        DecapReason::DropMalformed,
        DecapReason::Redirected,
        DecapReason::RedirectedStack,
        DecapReason::NoSecondChance,
    ];

    /// Metric label.
    pub fn name(self) -> &'static str {
        match self {
            DecapReason::Pass => "pass",
            DecapReason::Decapped => "decapped",
            DecapReason::DropMalformed => "drop_malformed",
            DecapReason::Redirected => "redirected",
            DecapReason::RedirectedStack => "redirected_stack",
            DecapReason::NoSecondChance => "no_second_chance",
        }
    }
}

/// Counters of the `hc_encap` program (per-CPU array `HC_STATS`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HcReason {
    /// Not a health probe: passed untouched.
    Pass = 0,
    /// A probe, encapsulated to its backend as client traffic is (ipip, gue).
    Sent = 1,
    /// A probe of an `l2dsr` VIP, sent to its backend's MAC.
    SentL2 = 2,
    /// The mark names no live backend.
    DropNoBackend = 3,
    /// Not the IPv4/IPv6 TCP/UDP packet a probe is.
    DropMalformed = 4,
    /// A helper failed.
    DropHelper = 5,
}
pub const NUM_HC_REASONS: u32 = 6;

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

/// One MurmurHash3 (x86_32) block round.
#[inline(always)]
pub fn murmur_round(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// MurmurHash3 finalizer.
#[inline(always)]
pub fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The flow hash that picks a ring slot: MurmurHash3 (x86, 32-bit) with `seed`, over the
/// wire bytes of the VIP's hash fields, which are whole 32-bit words:
/// - default: source address, destination address, source port, destination port,
///   protocol as one byte followed by three zero bytes (16 bytes for IPv4, 40 for IPv6);
/// - with `affinity`: the source address only (4 or 16 bytes), so every flow of one
///   client lands on one backend.
///
/// It equals [`murmur3_32`] of those bytes (tests check both against MurmurHash3's
/// published vectors and against literal golden values).
#[inline(always)]
pub fn flow_hash(seed: u32, k: &FlowKey, affinity: bool) -> u32 {
    let mut h = seed;
    let len: u32;
    if k.family == FAMILY_V6 {
        h = murmur_round(h, k.src[0]);
        h = murmur_round(h, k.src[1]);
        h = murmur_round(h, k.src[2]);
        h = murmur_round(h, k.src[3]);
        if affinity {
            len = 16;
        } else {
            h = murmur_round(h, k.dst[0]);
            h = murmur_round(h, k.dst[1]);
            h = murmur_round(h, k.dst[2]);
            h = murmur_round(h, k.dst[3]);
            len = 40;
        }
    } else {
        h = murmur_round(h, k.src[0]);
        if affinity {
            len = 4;
        } else {
            h = murmur_round(h, k.dst[0]);
            len = 16;
        }
    }
    if !affinity {
        h = murmur_round(h, k.sport as u32 | (k.dport as u32) << 16);
        h = murmur_round(h, k.proto as u32);
    }
    fmix32(h ^ len)
}

/// MurmurHash3_x86_32 of any byte string (the reference algorithm, for userspace and tests;
/// [`flow_hash`] is the same function unrolled for whole words).
pub fn murmur3_32(data: &[u8], seed: u32) -> u32 {
    let mut h = seed;
    let mut blocks = data.chunks_exact(4);
    for b in &mut blocks {
        h = murmur_round(h, u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        let mut k = 0u32;
        for (i, &byte) in tail.iter().enumerate() {
            k |= (byte as u32) << (8 * i);
        }
        h ^= k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    }
    fmix32(h ^ data.len() as u32)
}

/// Cheap per-flow entropy for outer headers (outer source address bits, IPv6 flow label,
/// GUE source port), from the client's address and port: a backend's RSS then spreads
/// flows over its queues, and every packet of a flow gets the same value without hashing.
#[inline(always)]
pub fn flow_entropy(k: &FlowKey) -> u32 {
    let x = k.src[3] ^ k.src[0] ^ ((k.sport as u32) << 16 | k.sport as u32);
    x ^ (x >> 13).wrapping_mul(0x9e37_79b1)
}

/// Bit of the 64-bit `VIP_FILTER` word that an address sets. The filter lets the data plane
/// pass most non-VIP traffic without a hash-map lookup; it never hides a VIP (every VIP
/// address sets its bit before its VIP is inserted).
#[inline(always)]
pub fn vip_filter_bit(addr: &[u32; 4]) -> u32 {
    let x = addr[0] ^ addr[1] ^ addr[2] ^ addr[3];
    let x = x ^ (x >> 16);
    (x ^ (x >> 8)) & 63
}

/// Ring slot of a hash: `hash % ring_size`.
#[inline(always)]
pub fn ring_slot(hash: u32, ring_size: u32) -> u32 {
    hash % ring_size
}

/// Layouts of the pinned maps. Maps outlive the programs that use them (a restarted or
/// upgraded agent adopts them), so the agent records in the `LAYOUT` map, per map, the
/// layout *version* of its key and value (bumped by hand whenever a struct changes shape or
/// meaning) and their *shape* (a fingerprint of each struct's size and of every field's
/// name and offset, computed by the compiler). A pinned map of another version is migrated
/// (or refused); one of the same version but another shape means a struct was changed
/// without a new version, and is refused rather than misread.
pub mod layout {
    use super::*;
    use core::mem::size_of;

    /// Value of the `LAYOUT` map (key: the map's name, NUL-padded to 16 bytes). This struct
    /// and that key never change: they are how every later build reads the pins.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct MapLayout {
        pub version: u32,
        pub shape: u32,
    }

    /// FNV-1a step over the bytes of `x`.
    pub const fn fnv_u32(mut h: u32, x: u32) -> u32 {
        let b = x.to_le_bytes();
        let mut i = 0;
        while i < 4 {
            h = (h ^ b[i] as u32).wrapping_mul(0x0100_0193);
            i += 1;
        }
        h
    }

    /// FNV-1a step over a name.
    pub const fn fnv_str(mut h: u32, s: &str) -> u32 {
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() {
            h = (h ^ b[i] as u32).wrapping_mul(0x0100_0193);
            i += 1;
        }
        fnv_u32(h, b.len() as u32)
    }

    /// Shape of a plain integer (or array of them) `size` bytes long.
    pub const fn plain(size: usize) -> u32 {
        fnv_u32(0x811c_9dc5, size as u32)
    }

    /// Shape of a key and a value together.
    pub const fn pair(key: u32, value: u32) -> u32 {
        fnv_u32(fnv_u32(0x811c_9dc5, key), value)
    }

    /// Shape of a struct: its size and each listed field's name and offset. List every
    /// field (a test checks that the listed sizes add up to the struct's size).
    #[macro_export]
    macro_rules! shape {
        ($t:ty; $($f:ident),+ $(,)?) => {{
            let mut h = $crate::layout::fnv_u32(0x811c_9dc5, core::mem::size_of::<$t>() as u32);
            $(
                h = $crate::layout::fnv_str(h, stringify!($f));
                h = $crate::layout::fnv_u32(h, core::mem::offset_of!($t, $f) as u32);
            )+
            h
        }};
    }

    pub const VIP_KEY: u32 = shape!(VipKey; addr, port, proto, family);
    pub const VIP_META: u32 = shape!(VipMeta; id, ring_base, ring_size, forwarding, flags, _pad);
    pub const ADDR_KEY: u32 = shape!(AddrKey; addr, family, _pad);
    pub const BACKEND: u32 = shape!(Backend; addr, mac, family, state, vip);
    pub const FLOW_KEY: u32 = shape!(FlowKey; src, dst, sport, dport, proto, family, _pad);
    pub const CONN_VAL: u32 = shape!(ConnVal; backend, vip, flags, _pad, atime);
    pub const VIP_INFO: u32 = shape!(VipInfo; key, forwarding, live, _pad);
    pub const CONFIG: u32 =
        shape!(Config; hash_seed, mtu, src4, src4_mask, src6, src6_mask, gw_mac, _pad);
    pub const COUNTERS: u32 = shape!(Counters; packets, bytes, new_flows);
    const INDEX: u32 = plain(size_of::<u32>());

    /// Every pinned map of the data plane with its layout. Version history (append here,
    /// never reuse a number):
    /// - 1: the first release, which pinned no `LAYOUT` (a pin directory without one is v1).
    /// - 2: backend ids name a (VIP, backend) membership: `Backend::vip` added; `RINGS` and
    ///   `BE_STATS` are indexed by those ids; `ConnVal` gained `flags` and `atime` and its
    ///   `vip` became 16 bits.
    /// - 3 (`RINGS`): a slot word carries a secondary id in its high 16 bits ([`ring_word`]).
    ///   2 (`VIP_FILTER`): a second word, the addresses of stateless VIPs.
    pub const MAPS: [(&str, MapLayout); 14] = [
        (
            "VIPS",
            MapLayout {
                version: 1,
                shape: pair(VIP_KEY, VIP_META),
            },
        ),
        (
            "VIP_ADDRS",
            MapLayout {
                version: 1,
                shape: pair(ADDR_KEY, plain(4)),
            },
        ),
        (
            "VIP_FILTER",
            MapLayout {
                version: 2,
                shape: pair(INDEX, plain(8)),
            },
        ),
        (
            "VIP_INFO",
            MapLayout {
                version: 1,
                shape: pair(INDEX, VIP_INFO),
            },
        ),
        (
            "RINGS",
            MapLayout {
                version: 3,
                shape: pair(INDEX, plain(8)),
            },
        ),
        (
            "BACKENDS",
            MapLayout {
                version: 2,
                shape: pair(INDEX, BACKEND),
            },
        ),
        (
            "CONNS",
            MapLayout {
                version: 2,
                shape: pair(FLOW_KEY, CONN_VAL),
            },
        ),
        (
            "CONFIG",
            MapLayout {
                version: 1,
                shape: pair(INDEX, CONFIG),
            },
        ),
        (
            "STATS",
            MapLayout {
                version: 1,
                shape: pair(INDEX, plain(8)),
            },
        ),
        (
            "VIP_STATS",
            MapLayout {
                version: 1,
                shape: pair(INDEX, COUNTERS),
            },
        ),
        (
            "BE_STATS",
            MapLayout {
                version: 2,
                shape: pair(INDEX, COUNTERS),
            },
        ),
        (
            "DECAP_STATS",
            MapLayout {
                version: 1,
                shape: pair(INDEX, plain(8)),
            },
        ),
        (
            "LAYOUT",
            MapLayout {
                version: 1,
                shape: pair(plain(16), plain(8)),
            },
        ),
        (
            "HC_STATS",
            MapLayout {
                version: 1,
                shape: pair(INDEX, plain(8)),
            },
        ),
    ];

    /// The `LAYOUT` key of a map name.
    pub const fn key(name: &str) -> [u8; 16] {
        let mut k = [0u8; 16];
        let b = name.as_bytes();
        let mut i = 0;
        while i < b.len() && i < 16 {
            k[i] = b[i];
            i += 1;
        }
        k
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipMeta {}
    unsafe impl aya::Pod for AddrKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for ConnVal {}
    unsafe impl aya::Pod for VipInfo {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for crate::bench::GenConfig {}
    unsafe impl aya::Pod for layout::MapLayout {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<VipKey>(), 20);
        assert_eq!(size_of::<VipMeta>(), 16);
        assert_eq!(size_of::<AddrKey>(), 20);
        assert_eq!(size_of::<Backend>(), 28);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<ConnVal>(), 16);
        assert_eq!(size_of::<VipInfo>(), 24);
        assert_eq!(size_of::<Config>(), 44);
        assert_eq!(size_of::<Counters>(), 24);
    }

    #[test]
    fn hash_depends_on_every_default_field_and_affinity_only_on_source() {
        let base = FlowKey {
            src: [0x0a00_0001, 0, 0, 0],
            dst: [0x0b00_0001, 0, 0, 0],
            sport: 1234,
            dport: 80,
            proto: PROTO_TCP,
            family: FAMILY_V4,
            _pad: [0; 2],
        };
        let h = flow_hash(7, &base, false);
        let mut k = base;
        k.sport = 1235;
        assert_ne!(h, flow_hash(7, &k, false));
        assert_eq!(flow_hash(7, &base, true), flow_hash(7, &k, true));
        k = base;
        k.dst[0] ^= 1;
        assert_ne!(h, flow_hash(7, &k, false));
        assert_ne!(h, flow_hash(8, &base, false));
        k = base;
        k.src[0] ^= 1;
        assert_ne!(flow_hash(7, &base, true), flow_hash(7, &k, true));
    }

    #[test]
    fn flow_hash_is_murmur3_of_the_flow_s_wire_bytes() {
        let k = FlowKey {
            src: [0x0a00_0001, 0x1234_5678, 0x9abc_def0, 0x0fed_cba9],
            dst: [0x0b00_0001, 7, 8, 9],
            sport: 0x1234,
            dport: 0x5000,
            proto: PROTO_UDP,
            family: FAMILY_V6,
            _pad: [0; 2],
        };
        let words = |w: &[u32]| w.iter().flat_map(|x| x.to_ne_bytes()).collect::<Vec<u8>>();
        let mut all = words(&k.src);
        all.extend(words(&k.dst));
        all.extend(k.sport.to_ne_bytes());
        all.extend(k.dport.to_ne_bytes());
        all.extend([k.proto, 0, 0, 0]);
        assert_eq!(flow_hash(99, &k, false), murmur3_32(&all, 99));
        assert_eq!(flow_hash(99, &k, true), murmur3_32(&words(&k.src), 99));
        let k4 = FlowKey {
            family: FAMILY_V4,
            ..k
        };
        let mut all = words(&k.src[..1]);
        all.extend(words(&k.dst[..1]));
        all.extend(k.sport.to_ne_bytes());
        all.extend(k.dport.to_ne_bytes());
        all.extend([k.proto, 0, 0, 0]);
        assert_eq!(flow_hash(99, &k4, false), murmur3_32(&all, 99));
        assert_eq!(
            flow_hash(99, &k4, true),
            murmur3_32(&words(&k.src[..1]), 99)
        );
    }

    /// The shape of a struct lists every field: their sizes add up to the struct's.
    #[test]
    fn every_layout_shape_lists_every_field() {
        use core::mem::size_of_val;
        macro_rules! fields_cover {
            ($v:expr; $($f:ident),+) => {{
                let v = $v;
                let sum = 0 $(+ size_of_val(&v.$f))+;
                assert_eq!(sum, size_of_val(&v), stringify!($v));
            }};
        }
        fields_cover!(VipKey::default(); addr, port, proto, family);
        fields_cover!(VipMeta::default(); id, ring_base, ring_size, forwarding, flags, _pad);
        fields_cover!(AddrKey::default(); addr, family, _pad);
        fields_cover!(Backend::default(); addr, mac, family, state, vip);
        fields_cover!(FlowKey::default(); src, dst, sport, dport, proto, family, _pad);
        fields_cover!(ConnVal::default(); backend, vip, flags, _pad, atime);
        fields_cover!(VipInfo::default(); key, forwarding, live, _pad);
        fields_cover!(Config::default(); hash_seed, mtu, src4, src4_mask, src6, src6_mask, gw_mac, _pad);
        fields_cover!(Counters::default(); packets, bytes, new_flows);
        // And a reordering changes the shape.
        #[allow(dead_code)]
        #[repr(C)]
        struct Swapped {
            dport: u16,
            sport: u16,
        }
        #[allow(dead_code)]
        #[repr(C)]
        struct Straight {
            sport: u16,
            dport: u16,
        }
        assert_ne!(
            crate::shape!(Swapped; dport, sport),
            crate::shape!(Straight; sport, dport)
        );
    }
}
