//! Pure-Rust reference model of the XDP programs `lb` and `decap`, written from
//! `docs/dataplane.md` independently of `lb-ebpf`. The differential test runs the same
//! packets through both and requires the same verdict, reason and output bytes.
//!
//! The byte logic is written by hand (no packet library), so the model is also independent
//! of the etherparse-based builders in `packets.rs`. Only the hashes (`flow_hash`,
//! `flow_entropy`, `ring_slot`) are shared with the program, by design.
//!
//! `VIP_FILTER` is not modelled: by the spec neither of its words (the prefilter, and the
//! stateless-address bit that looks `VIPS` up before `CONNS`) changes a result. `decap`'s
//! second chance depends on the backend's sockets and FIB, which the model cannot see:
//! [`decap_with`] takes both as inputs; [`decap`] is a host with neither.
//!
//! Places where the spec leaves a choice are marked `// spec:`.

use lb_common::{
    flow_entropy, flow_hash, ring_slot, AddrKey, Backend, ConnVal, Counters, DecapReason, FlowKey,
    Forwarding, Reason, VipKey, VipMeta, BACKEND_DRAINING, BACKEND_EMPTY, BACKEND_UP,
    CONN_F_CLOSING, FAMILY_V4, FAMILY_V6, GUE_F_REDIRECTED, GUE_F_SECOND, GUE_LB_MAGIC, GUE_PORT,
    ICMP4_QUOTE, ICMP6_QUOTE, NUM_REASONS, OUTER_TTL, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP,
    PROTO_UDP, VIP_F_AFFINITY, VIP_F_STATELESS,
};
use std::collections::{HashMap, HashSet};

/// XDP verdict of the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// `XDP_PASS`
    Pass,
    /// `XDP_DROP`
    Drop,
    /// `XDP_TX`
    Tx,
    /// `XDP_REDIRECT` (only `decap`'s second chance, to another interface).
    Redirect,
}

impl Action {
    /// The XDP return code (`XDP_DROP` 1, `XDP_PASS` 2, `XDP_TX` 3, `XDP_REDIRECT` 4).
    pub fn xdp_code(self) -> u32 {
        match self {
            Action::Drop => 1,
            Action::Pass => 2,
            Action::Tx => 3,
            Action::Redirect => 4,
        }
    }

    /// The action of an XDP return code (`None` for `XDP_ABORTED` and unknown codes).
    pub fn from_xdp_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(Action::Drop),
            2 => Some(Action::Pass),
            3 => Some(Action::Tx),
            4 => Some(Action::Redirect),
            _ => None,
        }
    }
}

/// What the `lb` program did with one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub action: Action,
    pub reason: Reason,
    /// The frame as the program leaves it (for `Pass`/`Drop`: the unchanged input).
    pub frame: Vec<u8>,
    /// The backend the frame was forwarded to (`TxForward`, `TxIcmpForward`), else `None`.
    pub backend: Option<u32>,
    /// This packet counted a new flow: it created (or overwrote) a `CONNS` entry, or, for a
    /// stateless VIP, it is a SYN (no entry). Can be true for a packet that was then
    /// dropped/answered as too big (selection comes before forwarding).
    pub new_flow: bool,
    /// Stateless VIPs: the secondary backend id the packet carries (`GUE_F_SECOND`) when
    /// forwarded, else `None`.
    pub second: Option<u32>,
}

/// What selection reads of a TCP segment (UDP: neither).
#[derive(Clone, Copy, Debug)]
struct Seg {
    /// SYN set, ACK clear.
    syn: bool,
    /// FIN or RST set.
    closing: bool,
}

/// The maps the program reads, and the counters it would have incremented.
#[derive(Default, Clone, Debug)]
pub struct Model {
    pub config: lb_common::Config,
    pub vips: HashMap<VipKey, VipMeta>,
    pub vip_addrs: HashSet<AddrKey>,
    /// `RINGS` index -> slot word: primary backend id in the low 16 bits, secondary in the
    /// high 16 (see [`slot_word`]); an absent index is a lookup miss.
    pub rings: HashMap<u32, u32>,
    /// Index = backend id; beyond `len()` is a lookup miss.
    pub backends: Vec<Backend>,
    /// The connection table; `atime` is left 0 (the kernel's clock is not modelled).
    pub conns: HashMap<FlowKey, ConnVal>,
    /// `STATS[reason]`.
    pub stats: [u64; NUM_REASONS as usize],
    pub vip_stats: HashMap<u32, Counters>,
    pub be_stats: HashMap<u32, Counters>,
}

// ---------------------------------------------------------------------------------------
// Byte helpers. Callers check bounds first; these index and would panic otherwise (a
// panic in a test is a bug in the model's bounds checks, which the fuzz test looks for).

fn be16(f: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([f[off], f[off + 1]])
}

fn raw16(f: &[u8], off: usize) -> u16 {
    u16::from_ne_bytes([f[off], f[off + 1]])
}

fn raw32(f: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([f[off], f[off + 1], f[off + 2], f[off + 3]])
}

fn raw128(f: &[u8], off: usize) -> [u32; 4] {
    [
        raw32(f, off),
        raw32(f, off + 4),
        raw32(f, off + 8),
        raw32(f, off + 12),
    ]
}

fn push_words(out: &mut Vec<u8>, words: &[u32]) {
    for w in words {
        out.extend_from_slice(&w.to_ne_bytes());
    }
}

/// One's-complement sum of 16-bit big-endian words (odd trailing byte padded with zero),
/// not yet folded or inverted.
fn sum16(mut acc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
        // Fold early so that long inputs cannot overflow.
        acc = (acc & 0xffff) + (acc >> 16);
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// RFC 1624 eqn. 3: checksum `hc` after one 16-bit word changed from `m` to `m2`
/// (all big-endian values).
fn csum_replace(hc: u16, m: u16, m2: u16) -> u16 {
    fold(u32::from(!hc) + u32::from(!m) + u32::from(m2))
}

/// Internet checksum (RFC 1071) of `data`, as the value to store big-endian.
pub fn inet_checksum(data: &[u8]) -> u16 {
    fold(sum16(0, data))
}

/// ICMPv6 checksum: IPv6 pseudo-header (source, destination, upper-layer length, next
/// header 58) plus the ICMPv6 message.
pub fn icmp6_checksum(src: &[u8; 16], dst: &[u8; 16], msg: &[u8]) -> u16 {
    let mut acc = sum16(0, src);
    acc = sum16(acc, dst);
    acc = sum16(acc, &(msg.len() as u32).to_be_bytes());
    acc = sum16(acc, &[0, 0, 0, PROTO_ICMPV6]);
    fold(sum16(acc, msg))
}

/// A `RINGS` slot word from its primary and secondary backend ids (spec: "`RINGS` slots
/// hold words": `primary = w & 0xFFFF`, `secondary = w >> 16`).
pub fn slot_word(primary: u32, secondary: u32) -> u32 {
    (primary & 0xFFFF) | (secondary << 16)
}

fn slot_primary(w: u32) -> u32 {
    w & 0xFFFF
}

fn slot_secondary(w: u32) -> u32 {
    w >> 16
}

// ---------------------------------------------------------------------------------------

/// Internal verdict before the final `STATS` increment. `Tx` carries the output frame,
/// the backend and the carried secondary.
enum Verdict {
    Pass(Reason),
    Drop(Reason),
    Tx(Reason, Vec<u8>, Option<u32>, Option<u32>),
}

/// How to encapsulate one packet.
struct Encap<'a> {
    mac: [u8; 6],
    entropy: u32,
    gue: bool,
    /// The GUE variant 0 header after UDP (stateless VIPs), else empty.
    gue0: &'a [u8],
    outer6: bool,
    inner_len: usize,
    overhead: usize,
}

/// What selection chose.
struct Choice {
    backend: u32,
    /// Counted as a new flow.
    new: bool,
    /// Stateless VIPs: the slot's secondary, when it is carried.
    second: Option<u32>,
}
use Verdict::{Drop as VDrop, Pass as VPass, Tx as VTx};

/// The parsed IP packet the forwarding steps need.
struct Ip<'a> {
    f: &'a [u8],
    l3: usize,
    ip_end: usize,
    family: u8,
    src: [u32; 4],
    dst: [u32; 4],
    /// IPv4 DF bit (false for IPv6).
    df: bool,
}

impl Ip<'_> {
    /// IPv4 TOS, or IPv6 traffic class.
    fn tos(&self) -> u8 {
        let f = self.f;
        if self.family == FAMILY_V4 {
            f[self.l3 + 1]
        } else {
            (f[self.l3] << 4) | (f[self.l3 + 1] >> 4)
        }
    }
}

fn mk_addr_key(addr: [u32; 4], family: u8) -> AddrKey {
    AddrKey {
        addr,
        family,
        _pad: [0; 3],
    }
}

impl Model {
    /// A model with the given config and empty maps.
    pub fn new(config: lb_common::Config) -> Self {
        Model {
            config,
            ..Default::default()
        }
    }

    /// Run one frame through `lb`. Updates the connection table and counters like the
    /// program would.
    pub fn lb(&mut self, frame: &[u8]) -> Outcome {
        let mut new_flow = false;
        let v = self.lb_inner(frame, &mut new_flow);
        let (action, reason, out, backend, second) = match v {
            VPass(r) => (Action::Pass, r, frame.to_vec(), None, None),
            VDrop(r) => (Action::Drop, r, frame.to_vec(), None, None),
            VTx(r, out, be, second) => (Action::Tx, r, out, be, second),
        };
        self.stats[reason as usize] += 1;
        Outcome {
            action,
            reason,
            frame: out,
            backend,
            new_flow,
            second,
        }
    }

    fn has_vip_addr(&self, addr: [u32; 4], family: u8) -> bool {
        self.vip_addrs.contains(&mk_addr_key(addr, family))
    }

    fn lb_inner(&mut self, f: &[u8], nf: &mut bool) -> Verdict {
        // spec: the model always has a Config, so `DropNoConfig` never happens here.
        let len = f.len();
        if len < 14 {
            return VDrop(Reason::DropTruncated);
        }
        let mut ethertype = be16(f, 12);
        let mut l3 = 14;
        if ethertype == 0x8100 {
            if len < 18 {
                return VDrop(Reason::DropTruncated);
            }
            ethertype = be16(f, 16);
            l3 = 18;
        }
        match ethertype {
            0x0800 => self.lb_v4(f, l3, nf),
            0x86DD => self.lb_v6(f, l3, nf),
            _ => VPass(Reason::PassNotIp),
        }
    }

    fn lb_v4(&mut self, f: &[u8], l3: usize, nf: &mut bool) -> Verdict {
        let len = f.len();
        if l3 + 20 > len {
            return VDrop(Reason::DropTruncated);
        }
        let vihl = f[l3];
        let ihl = usize::from(vihl & 0x0f);
        if vihl >> 4 != 4 || ihl < 5 {
            return VDrop(Reason::DropBadHeader);
        }
        let hl = ihl * 4;
        if l3 + hl > len {
            return VDrop(Reason::DropTruncated);
        }
        let tot = usize::from(be16(f, l3 + 2));
        if tot < hl || l3 + tot > len {
            return VDrop(Reason::DropBadHeader);
        }
        let ip = Ip {
            f,
            l3,
            ip_end: l3 + tot,
            family: FAMILY_V4,
            src: [raw32(f, l3 + 12), 0, 0, 0],
            dst: [raw32(f, l3 + 16), 0, 0, 0],
            df: be16(f, l3 + 6) & 0x4000 != 0,
        };
        let proto = f[l3 + 9];
        if be16(f, l3 + 6) & 0x3FFF != 0 {
            return if self.has_vip_addr(ip.dst, FAMILY_V4) {
                VDrop(Reason::DropFragment)
            } else {
                VPass(Reason::PassNotVip)
            };
        }
        let l4 = l3 + hl;
        match proto {
            PROTO_TCP | PROTO_UDP => self.l4_to_vip(&ip, l4, proto, nf),
            PROTO_ICMP => {
                if !self.has_vip_addr(ip.dst, FAMILY_V4) {
                    VPass(Reason::PassNotVip)
                } else {
                    self.icmp_to_vip(&ip, l4)
                }
            }
            _ => self.other_proto(&ip),
        }
    }

    fn lb_v6(&mut self, f: &[u8], l3: usize, nf: &mut bool) -> Verdict {
        let len = f.len();
        if l3 + 40 > len {
            return VDrop(Reason::DropTruncated);
        }
        if f[l3] >> 4 != 6 {
            return VDrop(Reason::DropBadHeader);
        }
        let ip_end = l3 + 40 + usize::from(be16(f, l3 + 4));
        if ip_end > len {
            return VDrop(Reason::DropBadHeader);
        }
        let ip = Ip {
            f,
            l3,
            ip_end,
            family: FAMILY_V6,
            src: raw128(f, l3 + 8),
            dst: raw128(f, l3 + 24),
            df: false,
        };
        let l4 = l3 + 40;
        match f[l3 + 6] {
            PROTO_TCP | PROTO_UDP => self.l4_to_vip(&ip, l4, f[l3 + 6], nf),
            PROTO_ICMPV6 => {
                if !self.has_vip_addr(ip.dst, FAMILY_V6) {
                    VPass(Reason::PassNotVip)
                } else {
                    self.icmp_to_vip(&ip, l4)
                }
            }
            44 => {
                if self.has_vip_addr(ip.dst, FAMILY_V6) {
                    VDrop(Reason::DropFragment)
                } else {
                    VPass(Reason::PassNotVip)
                }
            }
            _ => self.other_proto(&ip),
        }
    }

    fn other_proto(&self, ip: &Ip) -> Verdict {
        if self.has_vip_addr(ip.dst, ip.family) {
            VDrop(Reason::DropUnsupported)
        } else {
            VPass(Reason::PassNotVip)
        }
    }

    fn count_vip(&mut self, id: u32, len: usize) {
        let c = self.vip_stats.entry(id).or_default();
        c.packets += 1;
        c.bytes += len as u64;
    }

    /// TCP or UDP (`proto`) with its header at `l4`.
    fn l4_to_vip(&mut self, ip: &Ip, l4: usize, proto: u8, nf: &mut bool) -> Verdict {
        let f = ip.f;
        let l4_len = if proto == PROTO_TCP { 20 } else { 8 };
        if l4 + l4_len > ip.ip_end {
            return VDrop(Reason::DropTruncated);
        }
        let sport = raw16(f, l4);
        let dport = raw16(f, l4 + 2);
        let key = VipKey {
            addr: ip.dst,
            port: dport,
            proto,
            family: ip.family,
        };
        let Some(meta) = self.vips.get(&key).copied() else {
            return VPass(Reason::PassNotVip);
        };
        self.count_vip(meta.id, f.len());
        let flow = FlowKey {
            src: ip.src,
            dst: ip.dst,
            sport,
            dport,
            proto,
            family: ip.family,
            _pad: [0; 2],
        };
        let seg = if proto == PROTO_TCP {
            let flags = f[l4 + 13];
            Seg {
                syn: flags & 0x12 == 0x02,
                closing: flags & 0x05 != 0,
            }
        } else {
            Seg {
                syn: false,
                closing: false,
            }
        };
        match self.select(&meta, &flow, Some(seg)) {
            Ok(c) => {
                *nf = c.new;
                self.forward(ip, &meta, &flow, &c, false)
            }
            Err(r) => VDrop(r),
        }
    }

    /// Does the entry `c` hold for VIP id `vip`: same VIP, a backend of that VIP that is up
    /// or draining?
    fn holds(&self, c: &ConnVal, vip: u32) -> bool {
        c.vip as u32 == vip
            && self.backends.get(c.backend as usize).is_some_and(|be| {
                be.vip == vip && (be.state == BACKEND_UP || be.state == BACKEND_DRAINING)
            })
    }

    /// Backend selection. `seg` is the TCP/UDP segment, `None` for an ICMP error about the
    /// flow (reads the table, never writes it).
    fn select(
        &mut self,
        meta: &VipMeta,
        flow: &FlowKey,
        seg: Option<Seg>,
    ) -> Result<Choice, Reason> {
        let stateless = meta.flags & VIP_F_STATELESS != 0;
        let syn = seg.is_some_and(|s| s.syn);
        // A stateless VIP never reads, creates or refreshes an entry.
        if let Some(&c) = self.conns.get(flow).filter(|_| !syn && !stateless) {
            if self.holds(&c, meta.id) {
                if let Some(seg) = seg {
                    // spec: `atime` is the kernel's clock; the model does not keep it.
                    if seg.closing {
                        self.conns.get_mut(flow).unwrap().flags |= CONN_F_CLOSING;
                    }
                }
                return Ok(Choice {
                    backend: c.backend,
                    new: false,
                    second: None,
                });
            }
        }
        if meta.ring_size == 0 {
            return Err(Reason::DropNoBackend);
        }
        let affinity = meta.flags & VIP_F_AFFINITY != 0;
        let slot = ring_slot(
            flow_hash(self.config.hash_seed, flow, affinity),
            meta.ring_size,
        );
        // spec: the index is computed in u32 (wrapping, like the program's arithmetic); a
        // miss in RINGS is treated like a missing backend: DropNoBackend.
        let Some(&word) = self.rings.get(&meta.ring_base.wrapping_add(slot)) else {
            return Err(Reason::DropNoBackend);
        };
        let b = slot_primary(word);
        let family = match self.backends.get(b as usize) {
            None => return Err(Reason::DropNoBackend),
            Some(be) if be.state == BACKEND_EMPTY => return Err(Reason::DropNoBackend),
            // The ring's choice is final, whatever its (non-EMPTY) state.
            Some(be) => be.family,
        };
        if stateless {
            // The secondary travels with the packet when it is another backend that holds
            // connections (up or draining) in this VIP, of the primary's family.
            let s = slot_secondary(word);
            let second = Some(s).filter(|&s| {
                s != b
                    && self.backends.get(s as usize).is_some_and(|be| {
                        (be.state == BACKEND_UP || be.state == BACKEND_DRAINING)
                            && be.vip == meta.id
                            && be.family == family
                    })
            });
            // New: a SYN (never an ICMP error).
            if syn {
                self.vip_stats.entry(meta.id).or_default().new_flows += 1;
            }
            return Ok(Choice {
                backend: b,
                new: syn,
                second,
            });
        }
        let plain = Choice {
            backend: b,
            new: false,
            second: None,
        };
        let Some(seg) = seg else {
            return Ok(plain);
        };
        if seg.syn {
            // spec: a bare SYN is routed by the ring, creates no entry and removes the
            // 5-tuple's old one.
            self.conns.remove(flow);
            return Ok(plain);
        }
        self.conns.insert(
            *flow,
            ConnVal {
                backend: b,
                vip: meta.id as u16,
                flags: if seg.closing { CONN_F_CLOSING } else { 0 },
                _pad: 0,
                atime: 0,
            },
        );
        self.vip_stats.entry(meta.id).or_default().new_flows += 1;
        Ok(Choice {
            backend: b,
            new: true,
            second: None,
        })
    }

    /// ICMP / ICMPv6 to a VIP address, ICMP header at `l4`.
    fn icmp_to_vip(&mut self, ip: &Ip, l4: usize) -> Verdict {
        let f = ip.f;
        let end = ip.ip_end;
        if l4 + 8 > end {
            return VDrop(Reason::DropTruncated);
        }
        let ty = f[l4];
        if (ip.family == FAMILY_V4 && ty == 8) || (ip.family == FAMILY_V6 && ty == 128) {
            return echo_reply(ip, l4);
        }
        let inner = l4 + 8;
        let (proto, isrc, idst, ports) = if ip.family == FAMILY_V4 {
            if ty != 3 && ty != 11 {
                return VDrop(Reason::DropIcmp);
            }
            if inner + 20 > end {
                return VDrop(Reason::DropTruncated);
            }
            let vihl = f[inner];
            if vihl >> 4 != 4 || vihl & 0x0f < 5 {
                return VDrop(Reason::DropBadHeader);
            }
            let proto = f[inner + 9];
            if proto != PROTO_TCP && proto != PROTO_UDP {
                return VDrop(Reason::DropIcmp);
            }
            let ports = inner + usize::from(vihl & 0x0f) * 4;
            if ports + 4 > end {
                return VDrop(Reason::DropTruncated);
            }
            (
                proto,
                [raw32(f, inner + 12), 0, 0, 0],
                [raw32(f, inner + 16), 0, 0, 0],
                ports,
            )
        } else {
            if !(1..=3).contains(&ty) {
                return VDrop(Reason::DropIcmp);
            }
            if inner + 40 > end {
                return VDrop(Reason::DropTruncated);
            }
            if f[inner] >> 4 != 6 {
                return VDrop(Reason::DropBadHeader);
            }
            let proto = f[inner + 6];
            if proto != PROTO_TCP && proto != PROTO_UDP {
                return VDrop(Reason::DropIcmp);
            }
            let ports = inner + 40;
            if ports + 4 > end {
                return VDrop(Reason::DropTruncated);
            }
            (proto, raw128(f, inner + 8), raw128(f, inner + 24), ports)
        };
        let isport = raw16(f, ports);
        let idport = raw16(f, ports + 2);
        // The quoted packet went VIP -> client: the VIP is its source.
        let key = VipKey {
            addr: isrc,
            port: isport,
            proto,
            family: ip.family,
        };
        let Some(meta) = self.vips.get(&key).copied() else {
            return VDrop(Reason::DropIcmp);
        };
        self.count_vip(meta.id, f.len());
        let flow = FlowKey {
            src: idst,
            dst: isrc,
            sport: idport,
            dport: isport,
            proto,
            family: ip.family,
            _pad: [0; 2],
        };
        match self.select(&meta, &flow, None) {
            Ok(c) => self.forward(ip, &meta, &flow, &c, true),
            Err(r) => VDrop(r),
        }
    }

    fn forward(
        &mut self,
        ip: &Ip,
        meta: &VipMeta,
        flow: &FlowKey,
        choice: &Choice,
        icmp: bool,
    ) -> Verdict {
        let f = ip.f;
        let b = choice.backend;
        let be = self.backends[b as usize];
        let mac = if be.mac == [0; 6] {
            self.config.gw_mac
        } else {
            be.mac
        };
        let entropy = flow_entropy(flow);
        let mut second = None;
        let out = match Forwarding::from_u8(meta.forwarding) {
            Some(Forwarding::L2Dsr) => {
                let mut out = f.to_vec();
                out[0..6].copy_from_slice(&mac);
                out[6..12].copy_from_slice(&f[0..6]);
                out
            }
            Some(mode) => {
                let gue = mode == Forwarding::Gue;
                // spec: outer IPv6 iff the backend's family is FAMILY_V6; any other value
                // (4, or garbage) gives an outer IPv4 header.
                let outer6 = be.family == FAMILY_V6;
                // spec: the GUE variant 0 header is written for a stateless VIP in `Gue`
                // mode; a stateless VIP of another mode (which the agent refuses) forwards
                // as that mode does, with no second chance.
                let gue0 = if gue && meta.flags & VIP_F_STATELESS != 0 {
                    second = choice.second;
                    Some(self.gue0_header(ip.family, outer6, second))
                } else {
                    None
                };
                let inner_len = ip.ip_end - ip.l3;
                let gue_len = gue0.as_ref().map_or(0, Vec::len);
                let overhead = if outer6 { 40 } else { 20 } + if gue { 8 + gue_len } else { 0 };
                let mtu = self.config.mtu;
                if mtu != 0 && (inner_len + overhead) as u64 > u64::from(mtu) {
                    if icmp || (ip.family == FAMILY_V4 && !ip.df) {
                        return VDrop(Reason::DropTooBig);
                    }
                    return self.too_big(ip, overhead);
                }
                let enc = Encap {
                    mac,
                    entropy,
                    gue,
                    gue0: gue0.as_deref().unwrap_or(&[]),
                    outer6,
                    inner_len,
                    overhead,
                };
                self.encap(ip, &be, &enc)
            }
            // spec: a VIP whose `forwarding` is not a known mode is not covered; the model
            // drops with DropUnsupported at forwarding time (after selection).
            None => return VDrop(Reason::DropUnsupported),
        };
        let c = self.be_stats.entry(b).or_default();
        c.packets += 1;
        c.bytes += f.len() as u64;
        c.new_flows += u64::from(choice.new);
        let reason = if icmp {
            Reason::TxIcmpForward
        } else {
            Reason::TxForward
        };
        VTx(reason, out, Some(b), second)
    }

    /// The GUE variant 0 header of a stateless VIP's packet (spec "`lb`: forward"): `hlen`
    /// (2 words of private data in an IPv4 outer header, 5 in IPv6), the inner protocol (4
    /// or 41), two zero bytes; then "LB", flags, 0 and the secondary's address in the outer
    /// family (zeros when none is carried).
    fn gue0_header(&self, inner_family: u8, outer6: bool, second: Option<u32>) -> Vec<u8> {
        let addr_len = if outer6 { 16 } else { 4 };
        let mut h = vec![(4 + addr_len) as u8 / 4];
        h.push(if inner_family == FAMILY_V4 { 4 } else { 41 });
        h.extend_from_slice(&[0, 0]);
        h.extend_from_slice(&GUE_LB_MAGIC);
        h.push(if second.is_some() { GUE_F_SECOND } else { 0 });
        h.push(0);
        let addr = second.map_or([0; 4], |s| self.backends[s as usize].addr);
        let mut a = Vec::new();
        push_words(&mut a, &addr);
        h.extend_from_slice(&a[..addr_len]);
        h
    }

    fn encap(&self, ip: &Ip, be: &Backend, e: &Encap) -> Vec<u8> {
        let f = ip.f;
        let l3 = ip.l3;
        let cfg = &self.config;
        let (entropy, inner_len) = (e.entropy, e.inner_len);
        let mut out = Vec::with_capacity(f.len() + e.overhead);
        out.extend_from_slice(&e.mac);
        out.extend_from_slice(&f[0..6]);
        // The VLAN tag (TPID + TCI), if any, exactly as received.
        out.extend_from_slice(&f[12..l3 - 2]);
        out.extend_from_slice(&(if e.outer6 { 0x86DDu16 } else { 0x0800 }).to_be_bytes());
        let proto = if e.gue {
            PROTO_UDP
        } else if ip.family == FAMILY_V4 {
            4
        } else {
            41
        };
        let tos = ip.tos();
        if e.outer6 {
            let w0 = (6u32 << 28) | (u32::from(tos) << 20) | (entropy & 0xFFFFF);
            out.extend_from_slice(&w0.to_be_bytes());
            // spec: length fields are 16 bits; they are truncated (`as u16`) if a huge frame
            // exceeds them with the MTU check off. The payload is everything after the 40
            // bytes: UDP and the GUE header included.
            let plen = (e.overhead - 40 + inner_len) as u16;
            out.extend_from_slice(&plen.to_be_bytes());
            out.push(proto);
            out.push(OUTER_TTL);
            let src3 = (cfg.src6[3] & !cfg.src6_mask) | (entropy & cfg.src6_mask);
            push_words(&mut out, &[cfg.src6[0], cfg.src6[1], cfg.src6[2], src3]);
            push_words(&mut out, &be.addr);
        } else {
            let mut h = [0u8; 20];
            h[0] = 0x45;
            h[1] = tos;
            h[2..4].copy_from_slice(&((inner_len + e.overhead) as u16).to_be_bytes());
            h[8] = OUTER_TTL;
            h[9] = proto;
            let src = (cfg.src4 & !cfg.src4_mask) | (entropy & cfg.src4_mask);
            h[12..16].copy_from_slice(&src.to_ne_bytes());
            h[16..20].copy_from_slice(&be.addr[0].to_ne_bytes());
            let c = inet_checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            out.extend_from_slice(&h);
        }
        if e.gue {
            let sport = 0xC000u16 | (entropy & 0x3FFF) as u16;
            out.extend_from_slice(&sport.to_be_bytes());
            out.extend_from_slice(&GUE_PORT.to_be_bytes());
            out.extend_from_slice(&((8 + e.gue0.len() + inner_len) as u16).to_be_bytes());
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(e.gue0);
        }
        // Inner packet and any Ethernet padding after it, unchanged.
        out.extend_from_slice(&f[l3..]);
        out
    }

    /// "Too big" reply to the sender.
    fn too_big(&self, ip: &Ip, overhead: usize) -> Verdict {
        let f = ip.f;
        let l3 = ip.l3;
        // spec: computed in u32, wrapping if mtu < overhead; the IPv4 field takes the low
        // 16 bits.
        let next_hop = self.config.mtu.wrapping_sub(overhead as u32);
        let v4 = ip.family == FAMILY_V4;
        let quote = if v4 { ICMP4_QUOTE } else { ICMP6_QUOTE } as usize;
        // spec: "fewer than 64 (128) bytes from l3" counts frame bytes (len - l3), not
        // ip_end: Ethernet padding after the datagram may be quoted.
        if f.len() - l3 < quote {
            return VDrop(Reason::DropTooBig);
        }
        let mut out = Vec::with_capacity(l3 + 48 + quote);
        out.extend_from_slice(&f[6..12]);
        out.extend_from_slice(&f[0..6]);
        // VLAN tag kept, ethertype unchanged (same family).
        out.extend_from_slice(&f[12..l3]);
        if v4 {
            let mut h = [0u8; 20];
            h[0] = 0x45;
            h[2..4].copy_from_slice(&(20u16 + 8 + quote as u16).to_be_bytes());
            h[8] = OUTER_TTL;
            h[9] = PROTO_ICMP;
            h[12..16].copy_from_slice(&f[l3 + 16..l3 + 20]);
            h[16..20].copy_from_slice(&f[l3 + 12..l3 + 16]);
            let c = inet_checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            out.extend_from_slice(&h);
            let mut icmp = vec![3u8, 4, 0, 0, 0, 0];
            icmp.extend_from_slice(&(next_hop as u16).to_be_bytes());
            icmp.extend_from_slice(&f[l3..l3 + quote]);
            let c = inet_checksum(&icmp);
            icmp[2..4].copy_from_slice(&c.to_be_bytes());
            out.extend_from_slice(&icmp);
        } else {
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src.copy_from_slice(&f[l3 + 24..l3 + 40]);
            dst.copy_from_slice(&f[l3 + 8..l3 + 24]);
            out.extend_from_slice(&[0x60, 0, 0, 0]);
            out.extend_from_slice(&(8u16 + quote as u16).to_be_bytes());
            out.push(PROTO_ICMPV6);
            out.push(OUTER_TTL);
            out.extend_from_slice(&src);
            out.extend_from_slice(&dst);
            let mut icmp = vec![2u8, 0, 0, 0];
            icmp.extend_from_slice(&next_hop.to_be_bytes());
            icmp.extend_from_slice(&f[l3..l3 + quote]);
            let c = icmp6_checksum(&src, &dst, &icmp);
            icmp[2..4].copy_from_slice(&c.to_be_bytes());
            out.extend_from_slice(&icmp);
        }
        VTx(Reason::TxIcmpTooBig, out, None, None)
    }
}

/// Echo request to a VIP address: answered in place (spec "Echo reply").
fn echo_reply(ip: &Ip, l4: usize) -> Verdict {
    let f = ip.f;
    let l3 = ip.l3;
    let mut out = f.to_vec();
    out[0..6].copy_from_slice(&f[6..12]);
    out[6..12].copy_from_slice(&f[0..6]);
    let reply_type = if ip.family == FAMILY_V4 {
        out[l3 + 12..l3 + 16].copy_from_slice(&f[l3 + 16..l3 + 20]);
        out[l3 + 16..l3 + 20].copy_from_slice(&f[l3 + 12..l3 + 16]);
        let old = be16(f, l3 + 8);
        let new = u16::from_be_bytes([OUTER_TTL, f[l3 + 9]]);
        out[l3 + 8] = OUTER_TTL;
        let c = csum_replace(be16(f, l3 + 10), old, new);
        out[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        0
    } else {
        out[l3 + 8..l3 + 24].copy_from_slice(&f[l3 + 24..l3 + 40]);
        out[l3 + 24..l3 + 40].copy_from_slice(&f[l3 + 8..l3 + 24]);
        out[l3 + 7] = OUTER_TTL;
        129
    };
    let old = be16(f, l4);
    let new = u16::from_be_bytes([reply_type, f[l4 + 1]]);
    out[l4] = reply_type;
    let c = csum_replace(be16(f, l4 + 2), old, new);
    out[l4 + 2..l4 + 4].copy_from_slice(&c.to_be_bytes());
    VTx(Reason::TxIcmpEcho, out, None, None)
}

/// What `bpf_fib_lookup` finds for a secondary backend (the model sees no FIB): the next
/// hop's MAC, the egress interface's MAC, and whether the egress interface is the one the
/// packet came in on (then `XDP_TX`, else `XDP_REDIRECT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FibRoute {
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub same_interface: bool,
}

/// The `decap` program on a host with no local sockets and no route to any secondary
/// (forwarding off): [`decap_with`] with `local = |_| false` and `fib = None`. Returns the
/// verdict, its `DECAP_STATS` reason and the frame as the program leaves it.
pub fn decap(frame: &[u8]) -> (Action, DecapReason, Vec<u8>) {
    decap_with(frame, |_| false, None)
}

/// The `decap` program with explicit stand-ins for what the model cannot see:
/// - `local(flow)`: whether the socket lookup on the inner TCP 5-tuple makes the segment
///   this host's (a socket that is not a listener, or a listener accepting its SYN cookie);
///   asked only for a TCP segment that is not a bare SYN, of a packet with our private data;
/// - `fib`: the FIB lookup's answer for the secondary (`None`: no route or no neighbour).
pub fn decap_with(
    f: &[u8],
    local: impl Fn(&FlowKey) -> bool,
    fib: Option<FibRoute>,
) -> (Action, DecapReason, Vec<u8>) {
    let untouched = || (Action::Pass, DecapReason::Pass, f.to_vec());
    let bad = || (Action::Drop, DecapReason::DropMalformed, f.to_vec());
    let len = f.len();
    // spec: a frame too short for its Ethernet header / VLAN tag is "anything else":
    // passed untouched (decap has no truncation reason of its own before it sees ours).
    if len < 14 {
        return untouched();
    }
    let mut ethertype = be16(f, 12);
    let mut l3 = 14;
    if ethertype == 0x8100 {
        if len < 18 {
            return untouched();
        }
        ethertype = be16(f, 16);
        l3 = 18;
    }
    // The outer version nibble must match the ethertype (else not ours: pass); the outer
    // length fields are not checked.
    let (proto, l4, outer6) = match ethertype {
        0x0800 => {
            if l3 + 20 > len {
                return untouched();
            }
            let ihl = usize::from(f[l3] & 0x0f);
            if f[l3] >> 4 != 4 || ihl < 5 || l3 + ihl * 4 > len {
                return untouched();
            }
            if be16(f, l3 + 6) & 0x3FFF != 0 {
                return untouched();
            }
            (f[l3 + 9], l3 + ihl * 4, false)
        }
        0x86DD => {
            if l3 + 40 > len || f[l3] >> 4 != 6 {
                return untouched();
            }
            (f[l3 + 6], l3 + 40, true)
        }
        _ => return untouched(),
    };
    // Offset of our private data, when the packet carries it.
    let mut private = None;
    let (family, inner) = match proto {
        4 => (FAMILY_V4, l4),
        41 => (FAMILY_V6, l4),
        PROTO_UDP => {
            // spec: the whole 8-byte UDP header must be in the frame to be recognised as
            // ours; otherwise the packet is "anything else" and passed.
            if l4 + 8 > len || be16(f, l4 + 2) != GUE_PORT {
                return untouched();
            }
            let g = l4 + 8;
            if g + 4 > len {
                return bad();
            }
            let first = f[g];
            match first >> 6 {
                1 => match first >> 4 {
                    4 => (FAMILY_V4, g),
                    6 => (FAMILY_V6, g),
                    _ => return bad(),
                },
                0 => {
                    if first & 0x20 != 0 {
                        return bad();
                    }
                    let family = match f[g + 1] {
                        4 => FAMILY_V4,
                        41 => FAMILY_V6,
                        _ => return bad(),
                    };
                    let hlen = usize::from(first & 0x1f);
                    let ours = if outer6 { 5 } else { 2 };
                    if hlen == ours && g + 4 + 20 <= len && f[g + 4..g + 6] == GUE_LB_MAGIC {
                        private = Some(g + 4);
                    }
                    (family, g + 4 + 4 * hlen)
                }
                _ => return bad(),
            }
        }
        _ => return untouched(),
    };
    let inner_hl = if family == FAMILY_V4 { 20 } else { 40 };
    if inner + inner_hl > len {
        return bad();
    }
    let mut reason = DecapReason::Decapped;
    if let Some(pd) = private {
        if !this_hosts(f, inner, family, &local) {
            let flags = f[pd + 2];
            if flags & GUE_F_SECOND != 0 && flags & GUE_F_REDIRECTED == 0 {
                return redirect(f, l3, outer6, pd, fib);
            }
            reason = DecapReason::NoSecondChance;
        }
    }
    let mut out = Vec::with_capacity(len - (inner - l3));
    out.extend_from_slice(&f[..l3 - 2]);
    out.extend_from_slice(
        &(if family == FAMILY_V4 {
            0x0800u16
        } else {
            0x86DD
        })
        .to_be_bytes(),
    );
    out.extend_from_slice(&f[inner..]);
    (Action::Pass, reason, out)
}

/// Second chance for an ICMP error at `l4` (IPv4 types 3/11, ICMPv6 1-3) quoting a TCP
/// segment from this host (VIP) to a client: `local` decides on the quoted connection, seen
/// from here (source := the quote's destination, ports swapped). Any other ICMP, or a quote
/// cut before its ports, is this host's.
fn icmp_this_hosts(f: &[u8], l4: usize, family: u8, local: &impl Fn(&FlowKey) -> bool) -> bool {
    let len = f.len();
    if l4 + 8 > len {
        return true;
    }
    let ty = f[l4];
    let error = if family == FAMILY_V4 {
        ty == 3 || ty == 11
    } else {
        (1..=3).contains(&ty)
    };
    if !error {
        return true;
    }
    let q = l4 + 8;
    let (p, src, dst) = if family == FAMILY_V4 {
        if q + 20 > len {
            return true;
        }
        let qihl = usize::from(f[q] & 0x0f) * 4;
        if f[q] >> 4 != 4 || qihl < 20 || f[q + 9] != PROTO_TCP {
            return true;
        }
        (
            q + qihl,
            [raw32(f, q + 16), 0, 0, 0],
            [raw32(f, q + 12), 0, 0, 0],
        )
    } else {
        if q + 40 > len || f[q] >> 4 != 6 || f[q + 6] != PROTO_TCP {
            return true;
        }
        (q + 40, raw128(f, q + 24), raw128(f, q + 8))
    };
    if p + 4 > len {
        return true;
    }
    local(&FlowKey {
        src,
        dst,
        sport: raw16(f, p + 2),
        dport: raw16(f, p),
        proto: PROTO_TCP,
        family,
        _pad: [0; 2],
    })
}

/// Second chance: is the inner packet at `inner` this host's? Anything but a TCP segment
/// whose 20-byte header is in the frame is; so is a SYN without ACK; else `local` decides.
fn this_hosts(f: &[u8], inner: usize, family: u8, local: &impl Fn(&FlowKey) -> bool) -> bool {
    let (th, src, dst) = if family == FAMILY_V4 {
        let ihl = usize::from(f[inner] & 0x0f) * 4;
        if ihl < 20 || be16(f, inner + 6) & 0x3FFF != 0 {
            return true;
        }
        if f[inner + 9] == 1 {
            return icmp_this_hosts(f, inner + ihl, family, local);
        }
        if f[inner + 9] != PROTO_TCP {
            return true;
        }
        (
            inner + ihl,
            [raw32(f, inner + 12), 0, 0, 0],
            [raw32(f, inner + 16), 0, 0, 0],
        )
    } else {
        if f[inner + 6] == 58 {
            return icmp_this_hosts(f, inner + 40, family, local);
        }
        // Extension headers included: anything but TCP right after the header.
        if f[inner + 6] != PROTO_TCP {
            return true;
        }
        (inner + 40, raw128(f, inner + 8), raw128(f, inner + 24))
    };
    if th + 20 > f.len() {
        return true;
    }
    if f[th + 13] & 0x12 == 0x02 {
        return true;
    }
    local(&FlowKey {
        src,
        dst,
        sport: raw16(f, th),
        dport: raw16(f, th + 2),
        proto: PROTO_TCP,
        family,
        _pad: [0; 2],
    })
}

/// Send the packet on to the secondary at `pd + 4`: flags `|= GUE_F_REDIRECTED`, outer
/// destination := secondary, TTL / hop limit 64 (IPv4: 20-byte header only, checksum
/// recomputed, UDP checksum 0); Ethernet from the FIB, or unchanged through the stack
/// (always for a VLAN-tagged frame).
fn redirect(
    f: &[u8],
    l3: usize,
    outer6: bool,
    pd: usize,
    fib: Option<FibRoute>,
) -> (Action, DecapReason, Vec<u8>) {
    let mut out = f.to_vec();
    if outer6 {
        out[pd + 2] |= GUE_F_REDIRECTED;
        out[l3 + 24..l3 + 40].copy_from_slice(&f[pd + 4..pd + 20]);
        out[l3 + 7] = OUTER_TTL;
    } else {
        if f[l3] != 0x45 {
            return (Action::Drop, DecapReason::DropMalformed, f.to_vec());
        }
        out[pd + 2] |= GUE_F_REDIRECTED;
        out[l3 + 16..l3 + 20].copy_from_slice(&f[pd + 4..pd + 8]);
        out[l3 + 8] = OUTER_TTL;
        out[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
        let c = inet_checksum(&out[l3..l3 + 20]);
        out[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        // The UDP checksum (after the 20-byte header).
        out[l3 + 26..l3 + 28].copy_from_slice(&[0, 0]);
    }
    // spec: a frame with a VLAN tag goes through the stack (the FIB would name the VLAN
    // device, where XDP cannot send).
    match fib.filter(|_| l3 == 14) {
        None => (Action::Pass, DecapReason::RedirectedStack, out),
        Some(r) => {
            out[0..6].copy_from_slice(&r.dmac);
            out[6..12].copy_from_slice(&r.smac);
            let action = if r.same_interface {
                Action::Tx
            } else {
                Action::Redirect
            };
            (action, DecapReason::Redirected, out)
        }
    }
}

#[cfg(test)]
mod tests;
