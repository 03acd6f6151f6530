//! Pure-Rust reference model of the XDP programs `lb` and `decap`, written from
//! `docs/dataplane.md` independently of `lb-ebpf`. The differential test runs the same
//! packets through both and requires the same verdict, reason and output bytes.
//!
//! The byte logic is written by hand (no packet library), so the model is also independent
//! of the etherparse-based builders in `packets.rs`. Only the hashes (`flow_hash`,
//! `flow_entropy`, `ring_slot`) are shared with the program, by design.
//!
//! Places where the spec leaves a choice are marked `// spec:`.

use lb_common::{
    flow_entropy, flow_hash, ring_slot, AddrKey, Backend, ConnVal, Counters, DecapReason, FlowKey,
    Forwarding, Reason, VipKey, VipMeta, BACKEND_DRAINING, BACKEND_EMPTY, BACKEND_UP, FAMILY_V4,
    FAMILY_V6, GUE_PORT, ICMP4_QUOTE, ICMP6_QUOTE, NUM_REASONS, OUTER_TTL, PROTO_ICMP,
    PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, VIP_F_AFFINITY,
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
}

impl Action {
    /// The XDP return code (`XDP_DROP` 1, `XDP_PASS` 2, `XDP_TX` 3).
    pub fn xdp_code(self) -> u32 {
        match self {
            Action::Drop => 1,
            Action::Pass => 2,
            Action::Tx => 3,
        }
    }

    /// The action of an XDP return code (`None` for `XDP_ABORTED`, `XDP_REDIRECT`, ...).
    pub fn from_xdp_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(Action::Drop),
            2 => Some(Action::Pass),
            3 => Some(Action::Tx),
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
    /// This packet created (or overwrote) a `CONNS` entry and counted a new flow.
    /// Can be true for a packet that was then dropped/answered as too big (the connection
    /// entry is made before forwarding).
    pub new_flow: bool,
}

/// The maps the program reads, and the counters it would have incremented.
#[derive(Default, Clone, Debug)]
pub struct Model {
    pub config: lb_common::Config,
    pub vips: HashMap<VipKey, VipMeta>,
    pub vip_addrs: HashSet<AddrKey>,
    /// `RINGS` index -> backend id (an absent index is a lookup miss).
    pub rings: HashMap<u32, u32>,
    /// Index = backend id; beyond `len()` is a lookup miss.
    pub backends: Vec<Backend>,
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

// ---------------------------------------------------------------------------------------

/// Internal verdict before the final `STATS` increment.
enum Verdict {
    Pass(Reason),
    Drop(Reason),
    Tx(Reason, Vec<u8>, Option<u32>),
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
        let (action, reason, out, backend) = match v {
            VPass(r) => (Action::Pass, r, frame.to_vec(), None),
            VDrop(r) => (Action::Drop, r, frame.to_vec(), None),
            VTx(r, out, be) => (Action::Tx, r, out, be),
        };
        self.stats[reason as usize] += 1;
        Outcome {
            action,
            reason,
            frame: out,
            backend,
            new_flow,
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
        match self.select(&meta, &flow, true) {
            Ok((b, new)) => {
                *nf = new;
                self.forward(ip, &meta, &flow, b, new, false)
            }
            Err(r) => VDrop(r),
        }
    }

    /// Backend selection. Returns (backend, new).
    fn select(
        &mut self,
        meta: &VipMeta,
        flow: &FlowKey,
        insert: bool,
    ) -> Result<(u32, bool), Reason> {
        if let Some(&c) = self.conns.get(flow) {
            if let Some(be) = self.backends.get(c.backend as usize) {
                if be.state == BACKEND_UP || be.state == BACKEND_DRAINING {
                    // An entry made under another VIP id is rewritten with this VIP's id.
                    if insert && c.vip != meta.id {
                        self.conns.insert(
                            *flow,
                            ConnVal {
                                backend: c.backend,
                                vip: meta.id,
                            },
                        );
                    }
                    return Ok((c.backend, false));
                }
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
        let Some(&b) = self.rings.get(&meta.ring_base.wrapping_add(slot)) else {
            return Err(Reason::DropNoBackend);
        };
        match self.backends.get(b as usize) {
            None => return Err(Reason::DropNoBackend),
            Some(be) if be.state == BACKEND_EMPTY => return Err(Reason::DropNoBackend),
            // The ring's choice is final, whatever its (non-EMPTY) state.
            Some(_) => {}
        }
        if !insert {
            return Ok((b, false));
        }
        self.conns.insert(
            *flow,
            ConnVal {
                backend: b,
                vip: meta.id,
            },
        );
        self.vip_stats.entry(meta.id).or_default().new_flows += 1;
        Ok((b, true))
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
        match self.select(&meta, &flow, false) {
            Ok((b, _)) => self.forward(ip, &meta, &flow, b, false, true),
            Err(r) => VDrop(r),
        }
    }

    fn forward(
        &mut self,
        ip: &Ip,
        meta: &VipMeta,
        flow: &FlowKey,
        b: u32,
        new: bool,
        icmp: bool,
    ) -> Verdict {
        let f = ip.f;
        let be = self.backends[b as usize];
        let mac = if be.mac == [0; 6] {
            self.config.gw_mac
        } else {
            be.mac
        };
        let entropy = flow_entropy(flow);
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
                let inner_len = ip.ip_end - ip.l3;
                let overhead = if outer6 { 40 } else { 20 } + if gue { 8 } else { 0 };
                let mtu = self.config.mtu;
                if mtu != 0 && (inner_len + overhead) as u64 > u64::from(mtu) {
                    if icmp || (ip.family == FAMILY_V4 && !ip.df) {
                        return VDrop(Reason::DropTooBig);
                    }
                    return self.too_big(ip, overhead);
                }
                self.encap(ip, &be, mac, entropy, gue, outer6, inner_len, overhead)
            }
            // spec: a VIP whose `forwarding` is not a known mode is not covered; the model
            // drops with DropUnsupported at forwarding time (after selection).
            None => return VDrop(Reason::DropUnsupported),
        };
        let c = self.be_stats.entry(b).or_default();
        c.packets += 1;
        c.bytes += f.len() as u64;
        c.new_flows += u64::from(new);
        let reason = if icmp {
            Reason::TxIcmpForward
        } else {
            Reason::TxForward
        };
        VTx(reason, out, Some(b))
    }

    #[allow(clippy::too_many_arguments)]
    fn encap(
        &self,
        ip: &Ip,
        be: &Backend,
        mac: [u8; 6],
        entropy: u32,
        gue: bool,
        outer6: bool,
        inner_len: usize,
        overhead: usize,
    ) -> Vec<u8> {
        let f = ip.f;
        let l3 = ip.l3;
        let cfg = &self.config;
        let mut out = Vec::with_capacity(f.len() + overhead);
        out.extend_from_slice(&mac);
        out.extend_from_slice(&f[0..6]);
        // The VLAN tag (TPID + TCI), if any, exactly as received.
        out.extend_from_slice(&f[12..l3 - 2]);
        out.extend_from_slice(&(if outer6 { 0x86DDu16 } else { 0x0800 }).to_be_bytes());
        let proto = if gue {
            PROTO_UDP
        } else if ip.family == FAMILY_V4 {
            4
        } else {
            41
        };
        let tos = ip.tos();
        if outer6 {
            let w0 = (6u32 << 28) | (u32::from(tos) << 20) | (entropy & 0xFFFFF);
            out.extend_from_slice(&w0.to_be_bytes());
            // spec: length fields are 16 bits; they are truncated (`as u16`) if a huge frame
            // exceeds them with the MTU check off.
            let plen = (inner_len + if gue { 8 } else { 0 }) as u16;
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
            h[2..4].copy_from_slice(&((inner_len + overhead) as u16).to_be_bytes());
            h[8] = OUTER_TTL;
            h[9] = proto;
            let src = (cfg.src4 & !cfg.src4_mask) | (entropy & cfg.src4_mask);
            h[12..16].copy_from_slice(&src.to_ne_bytes());
            h[16..20].copy_from_slice(&be.addr[0].to_ne_bytes());
            let c = inet_checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            out.extend_from_slice(&h);
        }
        if gue {
            let sport = 0xC000u16 | (entropy & 0x3FFF) as u16;
            out.extend_from_slice(&sport.to_be_bytes());
            out.extend_from_slice(&GUE_PORT.to_be_bytes());
            out.extend_from_slice(&((8 + inner_len) as u16).to_be_bytes());
            out.extend_from_slice(&[0, 0]);
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
        VTx(Reason::TxIcmpTooBig, out, None)
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
    VTx(Reason::TxIcmpEcho, out, None)
}

/// The `decap` program: returns the verdict, its `DECAP_STATS` reason and the frame as the
/// program leaves it (unchanged unless `Decapped`).
pub fn decap(frame: &[u8]) -> (Action, DecapReason, Vec<u8>) {
    match decap_inner(frame) {
        Ok(Some(out)) => (Action::Pass, DecapReason::Decapped, out),
        Ok(None) => (Action::Pass, DecapReason::Pass, frame.to_vec()),
        Err(()) => (Action::Drop, DecapReason::DropMalformed, frame.to_vec()),
    }
}

/// `Ok(None)`: not ours, pass untouched. `Err`: malformed, drop.
fn decap_inner(f: &[u8]) -> Result<Option<Vec<u8>>, ()> {
    let len = f.len();
    // spec: a frame too short for its Ethernet header / VLAN tag is "anything else":
    // passed untouched (decap has no truncation reason of its own before it sees ours).
    if len < 14 {
        return Ok(None);
    }
    let mut ethertype = be16(f, 12);
    let mut l3 = 14;
    if ethertype == 0x8100 {
        if len < 18 {
            return Ok(None);
        }
        ethertype = be16(f, 16);
        l3 = 18;
    }
    // The outer version nibble must match the ethertype (else not ours: pass); the outer
    // length fields are not checked.
    let (proto, l4) = match ethertype {
        0x0800 => {
            if l3 + 20 > len {
                return Ok(None);
            }
            let ihl = usize::from(f[l3] & 0x0f);
            if f[l3] >> 4 != 4 || ihl < 5 || l3 + ihl * 4 > len {
                return Ok(None);
            }
            if be16(f, l3 + 6) & 0x3FFF != 0 {
                return Ok(None);
            }
            (f[l3 + 9], l3 + ihl * 4)
        }
        0x86DD => {
            if l3 + 40 > len || f[l3] >> 4 != 6 {
                return Ok(None);
            }
            (f[l3 + 6], l3 + 40)
        }
        _ => return Ok(None),
    };
    let (family, inner) = match proto {
        4 => (FAMILY_V4, l4),
        41 => (FAMILY_V6, l4),
        PROTO_UDP => {
            // spec: the whole 8-byte UDP header must be in the frame to be recognised as
            // ours; otherwise the packet is "anything else" and passed.
            if l4 + 8 > len || be16(f, l4 + 2) != GUE_PORT {
                return Ok(None);
            }
            let inner = l4 + 8;
            if inner >= len {
                return Err(());
            }
            match f[inner] >> 4 {
                4 => (FAMILY_V4, inner),
                6 => (FAMILY_V6, inner),
                _ => return Err(()),
            }
        }
        _ => return Ok(None),
    };
    let inner_hl = if family == FAMILY_V4 { 20 } else { 40 };
    if inner + inner_hl > len {
        return Err(());
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
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packets::*;
    use etherparse::{Icmpv4Slice, Icmpv4Type, Icmpv6Slice, Icmpv6Type, Ipv4HeaderSlice};
    use lb_common::{Config, BACKEND_DOWN};
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    const VIP4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
    const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
    const CLIENT4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
    const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 7);
    const ROUTER4: Ipv4Addr = Ipv4Addr::new(198, 18, 250, 1);
    const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 1);
    const OTHER4: Ipv4Addr = Ipv4Addr::new(198, 19, 99, 9);
    const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 9);
    const BE4A: Ipv4Addr = Ipv4Addr::new(198, 19, 10, 1);
    const BE4B: Ipv4Addr = Ipv4Addr::new(198, 19, 10, 2);
    const BE6A: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
    const BE6B: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
    const MAC_A: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 1];
    const MAC_C: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 3];
    const GW_MAC: [u8; 6] = [0x02, 0x99, 0, 0, 0, 0x99];
    const SRC4: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 0);
    const SRC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0);

    // Backend ids.
    const B4A: u32 = 1; // v4, own MAC
    const B4B: u32 = 2; // v4, gateway MAC
    const B6A: u32 = 3; // v6, own MAC
    const B6B: u32 = 4; // v6, gateway MAC
    const B4C: u32 = 5; // v4, own MAC, for multi-backend rings
    const RING_STRIDE: u32 = 64;

    fn config(mtu: u32) -> Config {
        Config {
            hash_seed: 0x5eed_1234,
            mtu,
            src4: addr4_raw(SRC4),
            src4_mask: u32::from_ne_bytes([0, 0, 0xff, 0xff]),
            src6: addr6_raw(SRC6),
            src6_mask: u32::from_ne_bytes([0, 0, 0xff, 0xff]),
            gw_mac: GW_MAC,
            _pad: [0; 2],
        }
    }

    fn backend(addr: IpAddr, mac: [u8; 6]) -> Backend {
        let (a, family) = addr_raw(addr);
        Backend {
            addr: a,
            mac,
            family,
            state: BACKEND_UP,
        }
    }

    fn model(mtu: u32) -> Model {
        let mut m = Model::new(config(mtu));
        m.backends = vec![
            Backend::default(),
            backend(BE4A.into(), MAC_A),
            backend(BE4B.into(), [0; 6]),
            backend(BE6A.into(), MAC_A),
            backend(BE6B.into(), [0; 6]),
            backend(Ipv4Addr::new(198, 19, 10, 3).into(), MAC_C),
        ];
        m
    }

    #[allow(clippy::too_many_arguments)]
    fn add_vip(
        m: &mut Model,
        addr: IpAddr,
        port: u16,
        proto: u8,
        id: u32,
        mode: Forwarding,
        ring: &[u32],
        flags: u8,
    ) {
        let ring_base = id * 2 * RING_STRIDE + RING_STRIDE; // the "second" ring of the pair
        for (i, b) in ring.iter().enumerate() {
            m.rings.insert(ring_base + i as u32, *b);
        }
        m.vips.insert(
            vip_key(addr, port, proto),
            VipMeta {
                id,
                ring_base,
                ring_size: ring.len() as u32,
                forwarding: mode as u8,
                flags,
                _pad: [0; 2],
            },
        );
        m.vip_addrs.insert(addr_key(addr));
    }

    fn outer4(cfg: &Config, entropy: u32, dst: Ipv4Addr) -> Outer {
        let src = (cfg.src4 & !cfg.src4_mask) | (entropy & cfg.src4_mask);
        Outer::V4 {
            src: Ipv4Addr::from(src.to_ne_bytes()),
            dst,
        }
    }

    fn outer6(cfg: &Config, entropy: u32, dst: Ipv6Addr) -> Outer {
        let mut w = cfg.src6;
        w[3] = (w[3] & !cfg.src6_mask) | (entropy & cfg.src6_mask);
        let mut b = [0u8; 16];
        for i in 0..4 {
            b[4 * i..4 * i + 4].copy_from_slice(&w[i].to_ne_bytes());
        }
        Outer::V6 {
            src: Ipv6Addr::from(b),
            dst,
        }
    }

    fn outer_for(cfg: &Config, entropy: u32, be: IpAddr) -> Outer {
        match be {
            IpAddr::V4(a) => outer4(cfg, entropy, a),
            IpAddr::V6(a) => outer6(cfg, entropy, a),
        }
    }

    fn client_for(vip: IpAddr) -> IpAddr {
        match vip {
            IpAddr::V4(_) => CLIENT4.into(),
            IpAddr::V6(_) => CLIENT6.into(),
        }
    }

    /// The outer IPv4 header checksum and the checksum of an outer ICMP message verify with
    /// etherparse; with `deep`, also every header inside IP-in-IP / GUE encapsulation.
    fn verify_checksums_deep(frame: &[u8], deep: bool) {
        let l2 = parse_l2(frame);
        let mut ip = &frame[l2.l3..];
        let mut v6 = l2.ether_type == etherparse::EtherType::IPV6;
        loop {
            let (proto, l4, src6, dst6) = if !v6 {
                let h = Ipv4HeaderSlice::from_slice(ip).expect("ipv4 header");
                assert_eq!(
                    h.to_header().calc_header_checksum(),
                    h.header_checksum(),
                    "ipv4 checksum"
                );
                let end = usize::from(h.total_len()).min(ip.len());
                (h.protocol().0, &ip[h.slice().len()..end], [0; 16], [0; 16])
            } else {
                let h = etherparse::Ipv6HeaderSlice::from_slice(ip).expect("ipv6 header");
                let end = (40 + usize::from(h.payload_length())).min(ip.len());
                (h.next_header().0, &ip[40..end], h.source(), h.destination())
            };
            match proto {
                4 | 41 | 17 if !deep => return,
                4 | 41 => {
                    v6 = proto == 41;
                    ip = l4;
                }
                17 if l4.len() >= 9 && u16::from_be_bytes([l4[2], l4[3]]) == GUE_PORT => {
                    v6 = l4[8] >> 4 == 6;
                    ip = &l4[8..];
                }
                1 => {
                    let s = Icmpv4Slice::from_slice(l4).unwrap();
                    let want = etherparse::Icmpv4Header::with_checksum(s.icmp_type(), s.payload());
                    assert_eq!(want.checksum, s.checksum(), "icmp checksum");
                    return;
                }
                58 => {
                    let s = Icmpv6Slice::from_slice(l4).unwrap();
                    assert!(s.is_checksum_valid(src6, dst6), "icmpv6 checksum");
                    return;
                }
                _ => return,
            }
        }
    }

    fn verify_checksums(frame: &[u8]) {
        verify_checksums_deep(frame, false)
    }

    fn assert_frame_eq(got: &[u8], want: &[u8]) {
        if got != want {
            let first = got.iter().zip(want).position(|(a, b)| a != b);
            panic!(
                "frames differ (len {} vs {}), first difference at {:?}\n got: {:02x?}\nwant: {:02x?}",
                got.len(),
                want.len(),
                first,
                got,
                want
            );
        }
    }

    fn check_invariants(m: &Model, frame: &[u8], o: &Outcome) {
        match o.action {
            Action::Pass | Action::Drop => {
                assert_eq!(o.frame, frame);
                assert!(o.backend.is_none());
            }
            Action::Tx => {
                assert!(matches!(
                    o.reason,
                    Reason::TxForward
                        | Reason::TxIcmpForward
                        | Reason::TxIcmpTooBig
                        | Reason::TxIcmpEcho
                ));
                // Only what the program built: the ICMP reply, or an outer header.
                if o.reason == Reason::TxIcmpTooBig || o.frame.len() != frame.len() {
                    verify_checksums(&o.frame);
                }
            }
        }
        let name = o.reason.name();
        assert_eq!(
            o.action == Action::Pass,
            name.starts_with("pass"),
            "action {:?} vs reason {name}",
            o.action
        );
        let _ = m;
    }

    // -----------------------------------------------------------------------------------
    // Forwarding modes and family combinations

    struct Case {
        vip: IpAddr,
        proto: u8,
        be: u32,
        be_addr: IpAddr,
        mac: [u8; 6],
        mode: Forwarding,
        opts: Opts,
    }

    fn run_case(c: &Case) {
        let mut m = model(1500);
        add_vip(&mut m, c.vip, 443, c.proto, 7, c.mode, &[c.be], 0);
        let client = client_for(c.vip);
        let payload: Vec<u8> = (0..100u8).collect();
        let input = if c.proto == TCP {
            c.opts.tcp(client, 40000, c.vip, 443, &payload)
        } else {
            c.opts.udp(client, 40000, c.vip, 443, &payload)
        };
        let flow = flow_key(client, 40000, c.vip, 443, c.proto);
        let entropy = flow_entropy(&flow);
        let o = m.lb(&input);
        assert_eq!((o.action, o.reason), (Action::Tx, Reason::TxForward));
        assert_eq!(o.backend, Some(c.be));
        assert!(o.new_flow);
        let want = match c.mode {
            Forwarding::Ipip => expected_ipip(
                &input,
                c.mac,
                outer_for(&m.config, entropy, c.be_addr),
                entropy,
            ),
            Forwarding::Gue => expected_gue(
                &input,
                c.mac,
                outer_for(&m.config, entropy, c.be_addr),
                entropy,
            ),
            Forwarding::L2Dsr => expected_l2dsr(&input, c.mac),
        };
        assert_frame_eq(&o.frame, &want);
        verify_checksums_deep(&o.frame, true);
        // Counters.
        assert_eq!(m.stats[Reason::TxForward as usize], 1);
        assert_eq!(m.stats.iter().sum::<u64>(), 1);
        let vs = m.vip_stats[&7];
        assert_eq!(
            (vs.packets, vs.bytes, vs.new_flows),
            (1, input.len() as u64, 1)
        );
        let bs = m.be_stats[&c.be];
        assert_eq!(
            (bs.packets, bs.bytes, bs.new_flows),
            (1, input.len() as u64, 1)
        );
        assert_eq!(m.conns[&flow].backend, c.be);
        // Second packet: established, same bytes out.
        let o2 = m.lb(&input);
        assert_eq!(o2.frame, o.frame);
        assert!(!o2.new_flow);
        assert_eq!(m.be_stats[&c.be].new_flows, 1);
        assert_eq!(m.be_stats[&c.be].packets, 2);
        // Decapsulation on the backend gives back the client's packet.
        if c.mode != Forwarding::L2Dsr {
            let (a, r, d) = decap(&o.frame);
            assert_eq!((a, r), (Action::Pass, DecapReason::Decapped));
            let l3 = parse_l2(&input).l3;
            assert_frame_eq(&d, &expected_decap(&o.frame, &input[l3..]));
            assert_eq!(&d[12..], &input[12..]);
        }
    }

    fn all_cases() -> Vec<Case> {
        let mut v = Vec::new();
        let opt_sets = [
            Opts::default(),
            Opts::default().with_vlan(42).with_tos(0xb9).with_df(true),
            Opts::default().with_padding(7).with_tos(3),
            Opts {
                ipv4_options: vec![1, 1, 1, 0, 0x94, 4, 0, 0],
                flow_label: 0xabcde,
                ..Opts::default().with_vlan(4095)
            },
        ];
        for opts in &opt_sets {
            for proto in [TCP, UDP] {
                for mode in [Forwarding::Ipip, Forwarding::Gue, Forwarding::L2Dsr] {
                    for vip in [IpAddr::from(VIP4), IpAddr::from(VIP6)] {
                        let backends: [(u32, IpAddr, [u8; 6]); 4] = [
                            (B4A, BE4A.into(), MAC_A),
                            (B4B, BE4B.into(), GW_MAC),
                            (B6A, BE6A.into(), MAC_A),
                            (B6B, BE6B.into(), GW_MAC),
                        ];
                        for (be, be_addr, mac) in backends {
                            v.push(Case {
                                vip,
                                proto,
                                be,
                                be_addr,
                                mac,
                                mode,
                                opts: opts.clone(),
                            });
                        }
                    }
                }
            }
        }
        v
    }

    #[test]
    fn every_mode_and_family_matches_etherparse_expectation() {
        // 4-in-4, 6-in-6, 4-in-6, 6-in-4 (IPIP), GUE over v4 and v6, L2 DSR; with and
        // without VLAN, TOS, padding, IPv4 options, gateway MAC.
        for c in all_cases() {
            run_case(&c);
        }
    }

    #[test]
    fn outer_header_details() {
        // Spot-check bytes against the spec text directly (not only against etherparse).
        let mut m = model(0);
        add_vip(&mut m, VIP4.into(), 80, TCP, 1, Forwarding::Gue, &[B6A], 0);
        let input = Opts::default()
            .with_tos(0xfd)
            .tcp4(CLIENT4, 1234, VIP4, 80, b"x");
        let o = m.lb(&input);
        let f = &o.frame;
        let flow = flow4(CLIENT4, 1234, VIP4, 80, TCP);
        let e = flow_entropy(&flow);
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        let w0 = u32::from_be_bytes([f[14], f[15], f[16], f[17]]);
        assert_eq!(w0, 0x6000_0000 | (0xfd << 20) | (e & 0xfffff));
        let inner_len = input.len() - 14;
        assert_eq!(u16::from_be_bytes([f[18], f[19]]) as usize, inner_len + 8);
        assert_eq!((f[20], f[21]), (17, 64));
        assert_eq!(
            u16::from_be_bytes([f[54], f[55]]),
            0xC000 | (e & 0x3fff) as u16
        );
        assert_eq!(u16::from_be_bytes([f[56], f[57]]), 6080);
        assert_eq!(u16::from_be_bytes([f[58], f[59]]) as usize, 8 + inner_len);
        assert_eq!(&f[60..62], &[0, 0]);
        assert_eq!(&f[62..], &input[14..]);
        // mtu 0: no check even for a big packet.
        let big = tcp4(CLIENT4, 1234, VIP4, 80, false, &[0u8; 9000]);
        assert_eq!(m.lb(&big).reason, Reason::TxForward);
    }

    // -----------------------------------------------------------------------------------
    // Parse errors

    fn simple_model() -> Model {
        let mut m = model(1500);
        add_vip(&mut m, VIP4.into(), 80, TCP, 1, Forwarding::Ipip, &[B4A], 0);
        add_vip(&mut m, VIP4.into(), 53, UDP, 2, Forwarding::Gue, &[B4B], 0);
        add_vip(&mut m, VIP6.into(), 80, TCP, 3, Forwarding::Ipip, &[B6A], 0);
        add_vip(
            &mut m,
            VIP6.into(),
            53,
            UDP,
            4,
            Forwarding::L2Dsr,
            &[B6B],
            0,
        );
        m
    }

    fn reason(m: &mut Model, f: &[u8]) -> (Action, Reason) {
        let o = m.lb(f);
        check_invariants(m, f, &o);
        (o.action, o.reason)
    }

    const DROP_TRUNC: (Action, Reason) = (Action::Drop, Reason::DropTruncated);
    const DROP_BAD: (Action, Reason) = (Action::Drop, Reason::DropBadHeader);
    const PASS_NOT_VIP: (Action, Reason) = (Action::Pass, Reason::PassNotVip);
    const PASS_NOT_IP: (Action, Reason) = (Action::Pass, Reason::PassNotIp);

    #[test]
    fn truncation_at_every_length() {
        let mut m = simple_model();
        let v4opts = Opts {
            ipv4_options: vec![1; 8],
            ..Default::default()
        };
        let frames: Vec<(Vec<u8>, usize)> = vec![
            (tcp4(CLIENT4, 1, VIP4, 80, true, b"hello"), 14),
            (udp4(CLIENT4, 1, VIP4, 53, b"hello"), 14),
            (
                Opts::default()
                    .with_vlan(3)
                    .tcp4(CLIENT4, 1, VIP4, 80, b"hi"),
                18,
            ),
            (v4opts.tcp4(CLIENT4, 1, VIP4, 80, b""), 14),
            (tcp6(CLIENT6, 1, VIP6, 80, true, b"hello"), 14),
            (
                Opts::default()
                    .with_vlan(3)
                    .udp6(CLIENT6, 1, VIP6, 53, b"x"),
                18,
            ),
        ];
        for (f, l3) in frames {
            let v6 = f[l3 - 2] == 0x86;
            let hl = if v6 { 40 } else { usize::from(f[l3] & 0xf) * 4 };
            assert_eq!(reason(&mut m, &f).0, Action::Tx);
            for n in 0..f.len() {
                let want = if n < 14 || n < l3 || n < l3 + 20 || n < l3 + hl {
                    DROP_TRUNC
                } else {
                    // The length field now claims more than the frame holds.
                    DROP_BAD
                };
                assert_eq!(reason(&mut m, &f[..n]), want, "len {n} of {}", f.len());
            }
            // Padding can be cut off freely.
            let mut padded = f.clone();
            padded.extend_from_slice(&[0; 10]);
            for n in f.len()..=padded.len() {
                assert_eq!(reason(&mut m, &padded[..n]).0, Action::Tx);
            }
        }
    }

    #[test]
    fn l4_header_must_fit_in_datagram() {
        let mut m = simple_model();
        // TCP header cut by the IP length (the rest of the frame becomes padding).
        for (mut f, tl) in [
            (tcp4(CLIENT4, 1, VIP4, 80, false, b""), 20 + 19),
            (udp4(CLIENT4, 1, VIP4, 53, b""), 20 + 7),
            (tcp4(CLIENT4, 1, OTHER4, 80, false, b""), 20 + 19),
        ] {
            f[16..18].copy_from_slice(&(tl as u16).to_be_bytes());
            assert_eq!(reason(&mut m, &f), DROP_TRUNC);
            f[16..18].copy_from_slice(&(tl as u16 + 1).to_be_bytes());
            assert_eq!(
                reason(&mut m, &f).0 == Action::Tx,
                f[30..34] == VIP4.octets()
            );
        }
        let mut f = tcp6(CLIENT6, 1, VIP6, 80, false, b"");
        f[18..20].copy_from_slice(&19u16.to_be_bytes());
        assert_eq!(reason(&mut m, &f), DROP_TRUNC);
        f[18..20].copy_from_slice(&20u16.to_be_bytes());
        assert_eq!(reason(&mut m, &f).1, Reason::TxForward);
    }

    #[test]
    fn bad_headers() {
        let mut m = simple_model();
        let good4 = tcp4(CLIENT4, 1, VIP4, 80, false, b"data");
        let good6 = tcp6(CLIENT6, 1, VIP6, 80, false, b"data");
        let edit4 = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut v = good4.clone();
            f(&mut v);
            v
        };
        // Wrong version nibble, IHL < 5.
        assert_eq!(reason(&mut m, &edit4(&|v| v[14] = 0x65)), DROP_BAD);
        assert_eq!(reason(&mut m, &edit4(&|v| v[14] = 0x44)), DROP_BAD);
        assert_eq!(reason(&mut m, &edit4(&|v| v[14] = 0x40)), DROP_BAD);
        // IHL 15 in a frame shorter than 14 + 60: truncated (checked before total length).
        assert_eq!(reason(&mut m, &edit4(&|v| v[14] = 0x4f)), DROP_TRUNC);
        // IHL 6 (ports then read 4 bytes later; still fits: to VIP, other ports).
        assert_eq!(reason(&mut m, &edit4(&|v| v[14] = 0x46)), PASS_NOT_VIP);
        // Total length < IHL*4, > frame.
        assert_eq!(
            reason(
                &mut m,
                &edit4(&|v| v[16..18].copy_from_slice(&19u16.to_be_bytes()))
            ),
            DROP_BAD
        );
        assert_eq!(
            reason(
                &mut m,
                &edit4(&|v| v[16..18].copy_from_slice(&0u16.to_be_bytes()))
            ),
            DROP_BAD
        );
        let n = (good4.len() - 14 + 1) as u16;
        assert_eq!(
            reason(
                &mut m,
                &edit4(&|v| v[16..18].copy_from_slice(&n.to_be_bytes()))
            ),
            DROP_BAD
        );
        // Total length == 20 exactly (no room for TCP): truncated L4.
        assert_eq!(
            reason(
                &mut m,
                &edit4(&|v| v[16..18].copy_from_slice(&20u16.to_be_bytes()))
            ),
            DROP_TRUNC
        );
        // Bad header checksum is not verified.
        assert_eq!(
            reason(&mut m, &edit4(&|v| v[24] ^= 0xff)).1,
            Reason::TxForward
        );
        // IPv6: version, payload length beyond the frame.
        let mut v = good6.clone();
        v[14] = 0x40;
        assert_eq!(reason(&mut m, &v), DROP_BAD);
        let mut v = good6.clone();
        let pl = (good6.len() - 54 + 1) as u16;
        v[18..20].copy_from_slice(&pl.to_be_bytes());
        assert_eq!(reason(&mut m, &v), DROP_BAD);
        // IPv4 ethertype with an IPv6 packet and vice versa.
        let mut v = good6.clone();
        v[12..14].copy_from_slice(&[8, 0]);
        assert_eq!(reason(&mut m, &v), DROP_BAD);
        let mut v = good4.clone();
        v[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(reason(&mut m, &v), DROP_BAD); // long enough for 40 bytes, version 4
    }

    #[test]
    fn non_ip_and_vlan() {
        let mut m = simple_model();
        assert_eq!(
            reason(&mut m, &raw_ether(0x0806, None, &[0; 28])),
            PASS_NOT_IP
        );
        assert_eq!(reason(&mut m, &raw_ether(0x88cc, None, &[])), PASS_NOT_IP);
        assert_eq!(
            reason(&mut m, &raw_ether(0x0806, Some(5), &[0; 28])),
            PASS_NOT_IP
        );
        // Only one tag is parsed: QinQ (0x8100 inside 0x8100) is not IP.
        let mut qinq = raw_ether(0x8100, Some(5), &[0, 6, 8, 0]);
        qinq.extend_from_slice(&ip_packet(&tcp4(CLIENT4, 1, VIP4, 80, false, b"")));
        assert_eq!(reason(&mut m, &qinq), PASS_NOT_IP);
        // 802.1ad outer tag is not parsed at all.
        assert_eq!(
            reason(&mut m, &raw_ether(0x88a8, None, &[0; 40])),
            PASS_NOT_IP
        );
        // VLAN tag without payload / cut inside the tag.
        let tagged = raw_ether(0x0800, Some(5), &[]);
        assert_eq!(tagged.len(), 18);
        assert_eq!(reason(&mut m, &tagged), DROP_TRUNC);
        assert_eq!(reason(&mut m, &tagged[..17]), DROP_TRUNC);
        assert_eq!(reason(&mut m, &tagged[..14]), DROP_TRUNC);
        assert_eq!(
            reason(&mut m, &raw_ether(0x0806, Some(5), &[])),
            PASS_NOT_IP
        );
        assert_eq!(reason(&mut m, &raw_ether(0x0800, None, &[])), DROP_TRUNC);
        assert_eq!(
            reason(&mut m, &raw_ether(0x86dd, None, &[0x60; 39])),
            DROP_TRUNC
        );
        assert_eq!(reason(&mut m, &[]), DROP_TRUNC);
    }

    #[test]
    fn fragments_other_protocols_and_not_vip() {
        let mut m = simple_model();
        let mf = Opts {
            more_fragments: true,
            ..Default::default()
        };
        let off = Opts {
            frag_offset: 100,
            ..Default::default()
        };
        for o in [&mf, &off] {
            assert_eq!(
                reason(&mut m, &o.tcp4(CLIENT4, 1, VIP4, 80, b"x")),
                (Action::Drop, Reason::DropFragment)
            );
            // Any port/protocol on a VIP address.
            assert_eq!(
                reason(&mut m, &o.udp4(CLIENT4, 1, VIP4, 9, b"x")),
                (Action::Drop, Reason::DropFragment)
            );
            assert_eq!(
                reason(&mut m, &o.ip_raw(CLIENT4.into(), VIP4.into(), 47, b"")),
                (Action::Drop, Reason::DropFragment)
            );
            assert_eq!(
                reason(&mut m, &o.tcp4(CLIENT4, 1, OTHER4, 80, b"x")),
                PASS_NOT_VIP
            );
        }
        // DF alone is not a fragment.
        assert_eq!(
            reason(
                &mut m,
                &Opts::default()
                    .with_df(true)
                    .tcp4(CLIENT4, 1, VIP4, 80, b"x")
            )
            .1,
            Reason::TxForward
        );
        // A fragment is checked before the L4 header length.
        let mut f = mf.tcp4(CLIENT4, 1, VIP4, 80, b"");
        f.truncate(14 + 20 + 4);
        f[16..18].copy_from_slice(&24u16.to_be_bytes());
        assert_eq!(reason(&mut m, &f), (Action::Drop, Reason::DropFragment));
        let v6f = Opts {
            ipv6_fragment: true,
            ..Default::default()
        };
        let f = v6f.tcp6(CLIENT6, 1, VIP6, 80, b"x");
        assert_eq!(f[20], 44);
        assert_eq!(reason(&mut m, &f), (Action::Drop, Reason::DropFragment));
        assert_eq!(
            reason(&mut m, &v6f.tcp6(CLIENT6, 1, OTHER6, 80, b"x")),
            PASS_NOT_VIP
        );
        // Other protocols.
        assert_eq!(
            reason(
                &mut m,
                &Opts::default().ip_raw(CLIENT4.into(), VIP4.into(), 47, &[0; 8])
            ),
            (Action::Drop, Reason::DropUnsupported)
        );
        assert_eq!(
            reason(
                &mut m,
                &Opts::default().ip_raw(CLIENT4.into(), OTHER4.into(), 47, &[0; 8])
            ),
            PASS_NOT_VIP
        );
        assert_eq!(
            reason(
                &mut m,
                &Opts::default().ip_raw(CLIENT4.into(), VIP4.into(), 58, &[0; 8])
            ),
            (Action::Drop, Reason::DropUnsupported)
        );
        let mut hop_by_hop = tcp6(CLIENT6, 1, VIP6, 80, false, b"");
        hop_by_hop[20] = 0;
        assert_eq!(
            reason(&mut m, &hop_by_hop),
            (Action::Drop, Reason::DropUnsupported)
        );
        assert_eq!(
            reason(
                &mut m,
                &Opts::default().ip_raw(CLIENT6.into(), VIP6.into(), 1, &[0; 8])
            ),
            (Action::Drop, Reason::DropUnsupported)
        );
        assert_eq!(
            reason(
                &mut m,
                &Opts::default().ip_raw(CLIENT6.into(), OTHER6.into(), 43, &[0; 8])
            ),
            PASS_NOT_VIP
        );
        // TCP/UDP to a VIP address but not a VIP port/protocol; to another address.
        assert_eq!(
            reason(&mut m, &tcp4(CLIENT4, 1, VIP4, 81, false, b"")),
            PASS_NOT_VIP
        );
        assert_eq!(
            reason(&mut m, &udp4(CLIENT4, 1, VIP4, 80, b"")),
            PASS_NOT_VIP
        );
        assert_eq!(
            reason(&mut m, &tcp6(CLIENT6, 1, VIP6, 53, false, b"")),
            PASS_NOT_VIP
        );
        assert_eq!(
            reason(&mut m, &tcp4(CLIENT4, 1, OTHER4, 80, false, b"")),
            PASS_NOT_VIP
        );
        // ICMP to a non-VIP address passes; a VIP answers echo requests.
        let echo4 = Icmpv4Type::EchoRequest(etherparse::IcmpEchoHeader { id: 1, seq: 1 });
        let echo6 = Icmpv6Type::EchoRequest(etherparse::IcmpEchoHeader { id: 1, seq: 1 });
        assert_eq!(
            reason(
                &mut m,
                &Opts::default().icmp4(CLIENT4, OTHER4, echo4.clone(), b"ping")
            ),
            PASS_NOT_VIP
        );
        assert_eq!(
            reason(
                &mut m,
                &Opts::default().icmp4(CLIENT4, VIP4, echo4, b"ping")
            ),
            (Action::Tx, Reason::TxIcmpEcho)
        );
        assert_eq!(
            reason(
                &mut m,
                &Opts::default().icmp6(CLIENT6, OTHER6, echo6, b"ping")
            ),
            PASS_NOT_VIP
        );
        assert_eq!(
            reason(
                &mut m,
                &Opts::default().icmp6(CLIENT6, VIP6, echo6, b"ping")
            ),
            (Action::Tx, Reason::TxIcmpEcho)
        );
        // No VIP counters for any of these (only the one DF packet forwarded above).
        assert_eq!(m.vip_stats.len(), 1);
        assert_eq!(m.vip_stats[&1].packets, 1);
        assert_eq!(m.conns.len(), 1);
    }

    // -----------------------------------------------------------------------------------
    // Too big

    #[test]
    fn too_big_v4_df_and_not_df() {
        for (mode, be, be_addr, overhead) in [
            (Forwarding::Ipip, B4A, IpAddr::from(BE4A), 20u32),
            (Forwarding::Gue, B4A, BE4A.into(), 28),
            (Forwarding::Ipip, B6A, BE6A.into(), 40),
            (Forwarding::Gue, B6B, BE6B.into(), 48),
        ] {
            let mtu = 1400;
            let mut m = model(mtu);
            add_vip(&mut m, VIP4.into(), 80, TCP, 1, mode, &[be], 0);
            for vlan in [None, Some(9)] {
                let o = Opts {
                    vlan,
                    ..Default::default()
                };
                // inner_len + overhead == mtu: forwarded.
                let fit = (mtu - overhead - 40) as usize;
                let f = o
                    .clone()
                    .with_df(true)
                    .tcp4(CLIENT4, 5, VIP4, 80, &vec![1; fit]);
                let out = m.lb(&f);
                assert_eq!(out.reason, Reason::TxForward);
                let e = flow_entropy(&flow4(CLIENT4, 5, VIP4, 80, TCP));
                let outer = outer_for(&m.config, e, be_addr);
                let want = if mode == Forwarding::Gue {
                    expected_gue(&f, MAC_A_OR_GW(be), outer, e)
                } else {
                    expected_ipip(&f, MAC_A_OR_GW(be), outer, e)
                };
                assert_frame_eq(&out.frame, &want);
                // One byte more: DF -> ICMP, no DF -> drop.
                let f = o
                    .clone()
                    .with_df(true)
                    .tcp4(CLIENT4, 5, VIP4, 80, &vec![1; fit + 1]);
                let out = m.lb(&f);
                assert_eq!((out.action, out.reason), (Action::Tx, Reason::TxIcmpTooBig));
                assert_eq!(out.backend, None);
                assert_frame_eq(
                    &out.frame,
                    &expected_icmp_too_big4(&f, (mtu - overhead) as u16),
                );
                verify_checksums(&out.frame);
                let f = o
                    .clone()
                    .with_df(false)
                    .tcp4(CLIENT4, 5, VIP4, 80, &vec![1; fit + 1]);
                let out = m.lb(&f);
                assert_eq!((out.action, out.reason), (Action::Drop, Reason::DropTooBig));
            }
            // Backend counters only for the forwarded packets; CONNS has the flow.
            assert_eq!(m.be_stats[&be].packets, 2);
            assert_eq!(m.vip_stats[&1].packets, 6);
            assert_eq!(m.vip_stats[&1].new_flows, 1);
            assert_eq!(m.stats[Reason::TxIcmpTooBig as usize], 2);
            assert_eq!(m.stats[Reason::DropTooBig as usize], 2);
        }
    }

    #[allow(non_snake_case)]
    fn MAC_A_OR_GW(be: u32) -> [u8; 6] {
        if be == B4B || be == B6B {
            GW_MAC
        } else {
            MAC_A
        }
    }

    #[test]
    fn too_big_new_flow_is_still_recorded() {
        let mut m = model(100);
        add_vip(&mut m, VIP4.into(), 80, TCP, 1, Forwarding::Ipip, &[B4A], 0);
        let f = Opts::default()
            .with_df(true)
            .tcp4(CLIENT4, 5, VIP4, 80, &[0; 100]);
        let o = m.lb(&f);
        assert_eq!(o.reason, Reason::TxIcmpTooBig);
        assert!(o.new_flow);
        assert_eq!(m.conns.len(), 1);
        assert!(m.be_stats.is_empty());
    }

    #[test]
    fn too_big_v6() {
        for (mode, be, overhead) in [
            (Forwarding::Ipip, B6A, 40u32),
            (Forwarding::Gue, B6A, 48),
            (Forwarding::Ipip, B4A, 20),
            (Forwarding::Gue, B4B, 28),
        ] {
            let mtu = 1280;
            let mut m = model(mtu);
            add_vip(&mut m, VIP6.into(), 443, UDP, 2, mode, &[be], 0);
            let fit = (mtu - overhead - 48) as usize;
            let f = Opts::default()
                .with_vlan(7)
                .udp6(CLIENT6, 5, VIP6, 443, &vec![2; fit]);
            assert_eq!(m.lb(&f).reason, Reason::TxForward);
            let f = Opts::default()
                .with_vlan(7)
                .udp6(CLIENT6, 5, VIP6, 443, &vec![2; fit + 1]);
            let out = m.lb(&f);
            assert_eq!((out.action, out.reason), (Action::Tx, Reason::TxIcmpTooBig));
            assert_frame_eq(&out.frame, &expected_icmp_too_big6(&f, mtu - overhead));
            verify_checksums(&out.frame);
        }
    }

    #[test]
    fn too_big_but_too_short_to_quote() {
        // mtu so small that a short packet is too big, but it has < 64 / 128 bytes from l3.
        let mut m = model(60);
        add_vip(&mut m, VIP4.into(), 80, TCP, 1, Forwarding::Ipip, &[B4A], 0);
        add_vip(&mut m, VIP6.into(), 80, TCP, 2, Forwarding::Ipip, &[B6A], 0);
        let f = Opts::default()
            .with_df(true)
            .tcp4(CLIENT4, 5, VIP4, 80, &[0; 23]); // 63 bytes
        assert_eq!(reason(&mut m, &f), (Action::Drop, Reason::DropTooBig));
        let f = Opts::default()
            .with_df(true)
            .tcp4(CLIENT4, 5, VIP4, 80, &[0; 24]); // 64 bytes
        assert_eq!(reason(&mut m, &f), (Action::Tx, Reason::TxIcmpTooBig));
        // Ethernet padding counts as frame bytes from l3 (spec: "frames holding").
        let f = Opts::default()
            .with_df(true)
            .with_padding(1)
            .tcp4(CLIENT4, 5, VIP4, 80, &[0; 23]);
        let o = m.lb(&f);
        assert_eq!(o.reason, Reason::TxIcmpTooBig);
        assert_frame_eq(&o.frame, &expected_icmp_too_big4(&f, 40));
        let f = tcp6(CLIENT6, 5, VIP6, 80, false, &[0; 67]); // 127 bytes
        assert_eq!(reason(&mut m, &f), (Action::Drop, Reason::DropTooBig));
        let f = tcp6(CLIENT6, 5, VIP6, 80, false, &[0; 68]);
        let o = m.lb(&f);
        assert_eq!(o.reason, Reason::TxIcmpTooBig);
        // mtu - overhead = 60 - 40 = 20.
        assert_frame_eq(&o.frame, &expected_icmp_too_big6(&f, 20));
    }

    // -----------------------------------------------------------------------------------
    // ICMP errors about VIP flows

    #[test]
    fn icmp_errors_follow_the_flow() {
        let mut m = model(1500);
        // Multi-backend ring so the CONNS entry (not the ring) must decide.
        add_vip(
            &mut m,
            VIP4.into(),
            80,
            TCP,
            1,
            Forwarding::Ipip,
            &[B4A, B4B, B4C],
            0,
        );
        add_vip(
            &mut m,
            VIP6.into(),
            80,
            UDP,
            2,
            Forwarding::Gue,
            &[B6A, B6B],
            0,
        );
        // Established flows pinned to a backend the ring would maybe not choose.
        let flow = flow4(CLIENT4, 5555, VIP4, 80, TCP);
        m.conns.insert(
            flow,
            ConnVal {
                backend: B4C,
                vip: 0,
            },
        );
        let flow6 = flow6(CLIENT6, 5555, VIP6, 80, UDP);
        m.conns.insert(
            flow6,
            ConnVal {
                backend: B6B,
                vip: 0,
            },
        );

        let quoted = ip_packet(&tcp4(VIP4, 80, CLIENT4, 5555, false, &[9; 30]));
        for f in [
            icmp4_dest_unreach(ROUTER4, VIP4, 1400, &quoted),
            icmp4_time_exceeded(ROUTER4, VIP4, &quoted),
            icmp4_dest_unreach(ROUTER4, VIP4, 1400, &quoted[..24]), // ports only
        ] {
            let o = m.lb(&f);
            assert_eq!(
                (o.action, o.reason, o.backend, o.new_flow),
                (Action::Tx, Reason::TxIcmpForward, Some(B4C), false)
            );
            let e = flow_entropy(&flow);
            let want = expected_ipip(
                &f,
                MAC_C,
                outer4(&m.config, e, Ipv4Addr::new(198, 19, 10, 3)),
                e,
            );
            assert_frame_eq(&o.frame, &want);
        }
        assert_eq!(m.be_stats[&B4C].packets, 3);
        assert_eq!(m.be_stats[&B4C].new_flows, 0);
        assert_eq!(m.vip_stats[&1].packets, 3);

        let quoted6 = ip_packet(&udp6(VIP6, 80, CLIENT6, 5555, &[9; 200]));
        for f in [
            icmp6_packet_too_big(ROUTER6, VIP6, 1280, &quoted6),
            icmp6_dest_unreach(ROUTER6, VIP6, &quoted6[..44]),
        ] {
            let o = m.lb(&f);
            assert_eq!((o.reason, o.backend), (Reason::TxIcmpForward, Some(B6B)));
            let e = flow_entropy(&flow6);
            assert_frame_eq(
                &o.frame,
                &expected_gue(&f, GW_MAC, outer6(&m.config, e, BE6B), e),
            );
        }

        // Unknown flow: ring choice, nothing inserted, no new flow counted.
        let conns = m.conns.clone();
        let quoted = ip_packet(&tcp4(VIP4, 80, CLIENT4, 7777, false, &[]));
        let o = m.lb(&icmp4_dest_unreach(ROUTER4, VIP4, 1400, &quoted));
        assert_eq!(o.reason, Reason::TxIcmpForward);
        assert_eq!(m.conns, conns);
        assert_eq!(m.vip_stats[&1].new_flows, 0);
        // ... and it is the backend a packet of that flow would get.
        let o2 = m.lb(&tcp4(CLIENT4, 7777, VIP4, 80, true, b""));
        assert_eq!(o2.backend, o.backend);
        assert!(o2.new_flow);
    }

    #[test]
    fn icmp_error_reasons() {
        let mut m = model(1500);
        add_vip(&mut m, VIP4.into(), 80, TCP, 1, Forwarding::Ipip, &[B4A], 0);
        add_vip(&mut m, VIP6.into(), 80, TCP, 2, Forwarding::Ipip, &[B6A], 0);
        let q4 = ip_packet(&tcp4(VIP4, 80, CLIENT4, 5555, false, &[]));
        let q6 = ip_packet(&tcp6(VIP6, 80, CLIENT6, 5555, false, &[]));
        let drop = |r| (Action::Drop, r);
        // Quote too short for the IP header / the ports.
        assert_eq!(
            reason(&mut m, &icmp4_dest_unreach(ROUTER4, VIP4, 1, &q4[..19])),
            drop(Reason::DropTruncated)
        );
        assert_eq!(
            reason(&mut m, &icmp4_dest_unreach(ROUTER4, VIP4, 1, &q4[..23])),
            drop(Reason::DropTruncated)
        );
        assert_eq!(
            reason(&mut m, &icmp6_packet_too_big(ROUTER6, VIP6, 1, &q6[..39])),
            drop(Reason::DropTruncated)
        );
        assert_eq!(
            reason(&mut m, &icmp6_packet_too_big(ROUTER6, VIP6, 1, &q6[..43])),
            drop(Reason::DropTruncated)
        );
        // ICMP header itself truncated by the IP length.
        let mut f = icmp4_dest_unreach(ROUTER4, VIP4, 1, &q4);
        f[16..18].copy_from_slice(&27u16.to_be_bytes());
        assert_eq!(reason(&mut m, &f), drop(Reason::DropTruncated));
        // Type checked before the quote.
        let mut f = icmp4_dest_unreach(ROUTER4, VIP4, 1, &[]);
        f[34] = 5; // redirect
        assert_eq!(reason(&mut m, &f), drop(Reason::DropIcmp));
        let mut f = icmp6_packet_too_big(ROUTER6, VIP6, 1, &[]);
        f[54] = 4; // parameter problem
        assert_eq!(reason(&mut m, &f), drop(Reason::DropIcmp));
        // Quoted header with wrong version / IHL.
        let mut q = q4.clone();
        q[0] = 0x44;
        assert_eq!(
            reason(&mut m, &icmp4_dest_unreach(ROUTER4, VIP4, 1, &q)),
            drop(Reason::DropBadHeader)
        );
        q[0] = 0x65;
        assert_eq!(
            reason(&mut m, &icmp4_dest_unreach(ROUTER4, VIP4, 1, &q)),
            drop(Reason::DropBadHeader)
        );
        let mut q = q6.clone();
        q[0] = 0x45;
        assert_eq!(
            reason(&mut m, &icmp6_packet_too_big(ROUTER6, VIP6, 1, &q)),
            drop(Reason::DropBadHeader)
        );
        // Quoted IHL 6 moves the ports: here they are beyond the quote.
        let mut q = q4[..24].to_vec();
        q[0] = 0x46;
        assert_eq!(
            reason(&mut m, &icmp4_dest_unreach(ROUTER4, VIP4, 1, &q)),
            drop(Reason::DropTruncated)
        );
        // Quoted protocol not TCP/UDP.
        let mut q = q4.clone();
        q[9] = 1;
        assert_eq!(
            reason(&mut m, &icmp4_dest_unreach(ROUTER4, VIP4, 1, &q)),
            drop(Reason::DropIcmp)
        );
        let mut q = q6.clone();
        q[6] = 58;
        assert_eq!(
            reason(&mut m, &icmp6_packet_too_big(ROUTER6, VIP6, 1, &q)),
            drop(Reason::DropIcmp)
        );
        // Quoted tuple is not from a VIP (wrong source port / direction).
        let q = ip_packet(&tcp4(VIP4, 81, CLIENT4, 5555, false, &[]));
        assert_eq!(
            reason(&mut m, &icmp4_dest_unreach(ROUTER4, VIP4, 1, &q)),
            drop(Reason::DropIcmp)
        );
        let q = ip_packet(&tcp4(CLIENT4, 5555, VIP4, 80, false, &[]));
        assert_eq!(
            reason(&mut m, &icmp4_dest_unreach(ROUTER4, VIP4, 1, &q)),
            drop(Reason::DropIcmp)
        );
        assert!(m.vip_stats.is_empty());
        // Too big to encapsulate: always dropped, even with DF (never ICMP about ICMP).
        m.config.mtu = 60;
        let f = Opts::default().with_df(true).icmp4(
            ROUTER4,
            VIP4,
            Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port),
            &q4,
        );
        assert_eq!(reason(&mut m, &f), drop(Reason::DropTooBig));
        assert_eq!(
            reason(&mut m, &icmp6_packet_too_big(ROUTER6, VIP6, 1, &q6)),
            drop(Reason::DropTooBig)
        );
        assert_eq!(m.vip_stats[&1].packets, 1);
        assert!(m.be_stats.is_empty());
        // No backend.
        m.config.mtu = 0;
        m.vips.get_mut(&vip_key4(VIP4, 80, TCP)).unwrap().ring_size = 0;
        assert_eq!(
            reason(&mut m, &icmp4_time_exceeded(ROUTER4, VIP4, &q4)),
            drop(Reason::DropNoBackend)
        );
    }

    // -----------------------------------------------------------------------------------
    // Selection

    #[test]
    fn stickiness_down_draining_empty() {
        let mut m = model(0);
        add_vip(
            &mut m,
            VIP4.into(),
            80,
            TCP,
            1,
            Forwarding::L2Dsr,
            &[B4A],
            0,
        );
        let flow = flow4(CLIENT4, 1000, VIP4, 80, TCP);
        let f = tcp4(CLIENT4, 1000, VIP4, 80, false, b"");
        // An entry pointing elsewhere wins over the ring.
        m.conns.insert(
            flow,
            ConnVal {
                backend: B4C,
                vip: 0,
            },
        );
        assert_eq!((m.lb(&f).backend, m.lb(&f).new_flow), (Some(B4C), false));
        // DRAINING keeps it.
        m.backends[B4C as usize].state = BACKEND_DRAINING;
        let o = m.lb(&f);
        assert_eq!((o.backend, o.new_flow), (Some(B4C), false));
        assert_frame_eq(&o.frame, &expected_l2dsr(&f, MAC_C));
        // DOWN: moved to the ring's choice, entry overwritten, new flow.
        m.backends[B4C as usize].state = BACKEND_DOWN;
        let o = m.lb(&f);
        assert_eq!((o.backend, o.new_flow), (Some(B4A), true));
        assert_eq!(m.conns[&flow].backend, B4A);
        assert_eq!(m.vip_stats[&1].new_flows, 1);
        assert_eq!(m.be_stats[&B4A].new_flows, 1);
        // EMPTY and out-of-range backends too.
        for b in [0, 99, u32::MAX] {
            m.conns.insert(flow, ConnVal { backend: b, vip: 0 });
            let o = m.lb(&f);
            assert_eq!((o.backend, o.new_flow), (Some(B4A), true));
        }
        // The ring's choice is final even if DOWN or DRAINING.
        m.conns.clear();
        m.backends[B4A as usize].state = BACKEND_DOWN;
        let o = m.lb(&f);
        assert_eq!(
            (o.reason, o.backend, o.new_flow),
            (Reason::TxForward, Some(B4A), true)
        );
        // ...and then that DOWN backend's entry is reselected every time (still new).
        assert!(m.lb(&f).new_flow);
        m.backends[B4A as usize].state = BACKEND_DRAINING;
        m.conns.clear();
        assert_eq!(m.lb(&f).backend, Some(B4A));
        assert!(!m.lb(&f).new_flow);
        // Ring names an EMPTY slot / a missing backend / ring miss / empty ring.
        m.conns.clear();
        m.backends[B4A as usize].state = BACKEND_EMPTY;
        assert_eq!(reason(&mut m, &f), (Action::Drop, Reason::DropNoBackend));
        let base = m.vips[&vip_key4(VIP4, 80, TCP)].ring_base;
        m.rings.insert(base, 1000);
        assert_eq!(reason(&mut m, &f), (Action::Drop, Reason::DropNoBackend));
        m.rings.remove(&base);
        assert_eq!(reason(&mut m, &f), (Action::Drop, Reason::DropNoBackend));
        m.rings.insert(base, B4B);
        m.vips.get_mut(&vip_key4(VIP4, 80, TCP)).unwrap().ring_size = 0;
        assert_eq!(reason(&mut m, &f), (Action::Drop, Reason::DropNoBackend));
        // Dropped for no backend: VIP counted, no flow recorded.
        assert!(m.conns.is_empty());
        assert_eq!(m.stats[Reason::DropNoBackend as usize], 4);
        // Empty ring, but an established flow to a live backend still works.
        m.conns.insert(
            flow,
            ConnVal {
                backend: B4B,
                vip: 0,
            },
        );
        assert_eq!(m.lb(&f).backend, Some(B4B));
    }

    #[test]
    fn ring_slot_and_affinity() {
        let ring: Vec<u32> = (0..13).map(|i| [B4A, B4B, B4C][i % 3]).collect();
        for affinity in [false, true] {
            let mut m = model(0);
            let flags = if affinity { VIP_F_AFFINITY } else { 0 };
            add_vip(
                &mut m,
                VIP4.into(),
                80,
                TCP,
                1,
                Forwarding::L2Dsr,
                &ring,
                flags,
            );
            let meta = m.vips[&vip_key4(VIP4, 80, TCP)];
            let mut seen = HashSet::new();
            for port in 1000..1100u16 {
                let flow = flow4(CLIENT4, port, VIP4, 80, TCP);
                let slot = flow_hash(m.config.hash_seed, &flow, affinity) % 13;
                let want = m.rings[&(meta.ring_base + slot)];
                let o = m.lb(&tcp4(CLIENT4, port, VIP4, 80, true, b""));
                assert_eq!(o.backend, Some(want));
                seen.insert(want);
            }
            assert_eq!(seen.len(), if affinity { 1 } else { 3 });
        }
        // Affinity is per client address.
        let mut m = model(0);
        add_vip(
            &mut m,
            VIP6.into(),
            80,
            TCP,
            1,
            Forwarding::L2Dsr,
            &ring,
            VIP_F_AFFINITY,
        );
        let mut seen = HashSet::new();
        for i in 0..64u16 {
            let c = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, i, 7);
            seen.insert(m.lb(&tcp6(c, 1000 + i, VIP6, 80, true, b"")).backend);
        }
        assert!(seen.len() > 1);
    }

    #[test]
    fn unknown_forwarding_mode() {
        let mut m = model(0);
        add_vip(&mut m, VIP4.into(), 80, TCP, 1, Forwarding::Ipip, &[B4A], 0);
        m.vips.get_mut(&vip_key4(VIP4, 80, TCP)).unwrap().forwarding = 9;
        assert_eq!(
            reason(&mut m, &tcp4(CLIENT4, 1, VIP4, 80, true, b"")),
            (Action::Drop, Reason::DropUnsupported)
        );
    }

    // -----------------------------------------------------------------------------------
    // decap

    #[test]
    fn decap_cases() {
        let pass = (Action::Pass, DecapReason::Pass);
        let bad = (Action::Drop, DecapReason::DropMalformed);
        let dec = |f: &[u8]| {
            let (a, r, out) = decap(f);
            if r != DecapReason::Decapped {
                assert_eq!(out, f);
            }
            (a, r)
        };
        // Not encapsulated.
        assert_eq!(dec(&tcp4(CLIENT4, 1, VIP4, 80, false, b"x")), pass);
        assert_eq!(dec(&udp6(CLIENT6, 1, VIP6, 6081, b"x")), pass);
        assert_eq!(dec(&raw_ether(0x0806, None, &[0; 28])), pass);
        assert_eq!(dec(&[0; 5]), pass);
        // Encapsulated by the model, every variant; then truncated at every length.
        let mut m = model(0);
        let modes = [
            (Forwarding::Ipip, B4A),
            (Forwarding::Ipip, B6A),
            (Forwarding::Gue, B4B),
            (Forwarding::Gue, B6B),
        ];
        for (i, (mode, be)) in modes.iter().enumerate() {
            add_vip(
                &mut m,
                VIP4.into(),
                1000 + i as u16,
                UDP,
                i as u32,
                *mode,
                &[*be],
                0,
            );
            add_vip(
                &mut m,
                VIP6.into(),
                1000 + i as u16,
                UDP,
                10 + i as u32,
                *mode,
                &[*be],
                0,
            );
        }
        for i in 0..4u16 {
            for vlan in [None, Some(3)] {
                for vip in [IpAddr::from(VIP4), IpAddr::from(VIP6)] {
                    let o = Opts {
                        vlan,
                        ..Default::default()
                    };
                    let input = o.udp(client_for(vip), 9, vip, 1000 + i, b"payload");
                    let enc = m.lb(&input).frame;
                    let l3 = parse_l2(&enc).l3;
                    let (a, r, out) = decap(&enc);
                    assert_eq!((a, r), (Action::Pass, DecapReason::Decapped));
                    assert_frame_eq(&out, &expected_decap(&enc, &input[l3..]));
                    let outer_v6 = enc[l3 - 2] == 0x86;
                    let gue = enc[l3 + if outer_v6 { 6 } else { 9 }] == 17;
                    let outer_hl = if outer_v6 { 40 } else { 20 };
                    let inner = l3 + outer_hl + if gue { 8 } else { 0 };
                    let inner_hl = if vip.is_ipv4() { 20 } else { 40 };
                    for n in 0..enc.len() {
                        let want = if n < l3 + outer_hl || (gue && n < l3 + outer_hl + 8) {
                            pass
                        } else if n < inner + inner_hl {
                            bad
                        } else {
                            (Action::Pass, DecapReason::Decapped)
                        };
                        assert_eq!(dec(&enc[..n]), want, "len {n}");
                    }
                    if gue {
                        let mut e = enc.clone();
                        e[inner] = 0x55;
                        assert_eq!(dec(&e), bad);
                        let mut e = enc.clone();
                        e[l3 + outer_hl + 3] ^= 1; // other UDP port
                        assert_eq!(dec(&e), pass);
                    }
                    if !outer_v6 {
                        let mut e = enc.clone();
                        e[l3 + 6] = 0x20; // MF
                        assert_eq!(dec(&e), pass);
                        let mut e = enc.clone();
                        e[l3] = 0x44; // IHL 4
                        assert_eq!(dec(&e), pass);
                    }
                }
            }
        }
        // IPIP with IPv4 options on the outer header: removed with the header.
        let inner = ip_packet(&tcp4(CLIENT4, 1, VIP4, 80, false, b"abc"));
        let o = Opts {
            ipv4_options: vec![1, 1, 1, 1],
            ..Default::default()
        };
        let enc = o.ip_raw(BE4A.into(), BE4B.into(), 4, &inner);
        let (_, r, out) = decap(&enc);
        assert_eq!(r, DecapReason::Decapped);
        assert_eq!(&out[14..], &inner[..]);
        // 6-in-4 IPIP.
        let inner6 = ip_packet(&tcp6(CLIENT6, 1, VIP6, 80, false, b"abc"));
        let enc = Opts::default().ip_raw(BE4A.into(), BE4B.into(), 41, &inner6);
        let (_, r, out) = decap(&enc);
        assert_eq!(r, DecapReason::Decapped);
        assert_eq!(&out[12..14], &[0x86, 0xdd]);
        assert_eq!(&out[14..], &inner6[..]);
    }

    // -----------------------------------------------------------------------------------
    // Fuzz-ish

    #[test]
    fn random_and_mutated_frames_never_panic() {
        let mut rng = StdRng::seed_from_u64(0xfeed);
        let mut m = simple_model();
        add_vip(
            &mut m,
            VIP4.into(),
            443,
            UDP,
            5,
            Forwarding::Gue,
            &[B6A, B4A, 0, B4C],
            VIP_F_AFFINITY,
        );
        add_vip(
            &mut m,
            VIP6.into(),
            443,
            TCP,
            6,
            Forwarding::Ipip,
            &[B4A, B6B],
            0,
        );
        let q4 = ip_packet(&tcp4(VIP4, 80, CLIENT4, 5555, false, &[1; 40]));
        let q6 = ip_packet(&udp6(VIP6, 53, CLIENT6, 5555, &[1; 40]));
        let seeds: Vec<Vec<u8>> = vec![
            tcp4(CLIENT4, 1, VIP4, 80, true, &[7; 60]),
            udp4(CLIENT4, 1, VIP4, 53, &[7; 60]),
            udp4(CLIENT4, 1, VIP4, 443, &[7; 60]),
            Opts::default()
                .with_vlan(5)
                .with_df(true)
                .tcp4(CLIENT4, 1, VIP4, 80, &[7; 300]),
            tcp6(CLIENT6, 1, VIP6, 80, true, &[7; 60]),
            tcp6(CLIENT6, 1, VIP6, 443, true, &[7; 60]),
            Opts::default()
                .with_vlan(5)
                .udp6(CLIENT6, 1, VIP6, 53, &[7; 300]),
            icmp4_dest_unreach(ROUTER4, VIP4, 1000, &q4),
            icmp6_packet_too_big(ROUTER6, VIP6, 1280, &q6),
            Opts {
                ipv4_options: vec![1; 12],
                ..Default::default()
            }
            .udp4(CLIENT4, 1, VIP4, 53, b"opt"),
        ];
        let mut count = 0u64;
        let mut txs = 0;
        for i in 0..100_000 {
            m.config.mtu = [0, 1500, 200, 100, 1280][i % 5];
            let mut f = if i % 10 == 0 {
                let n = rng.gen_range(0..200);
                (0..n).map(|_| rng.gen()).collect::<Vec<u8>>()
            } else {
                let mut f = seeds[rng.gen_range(0..seeds.len())].clone();
                for _ in 0..rng.gen_range(0..4) {
                    let at = rng.gen_range(0..f.len());
                    // Mostly header bytes.
                    let at = if rng.gen_bool(0.8) {
                        at % 80.min(f.len())
                    } else {
                        at
                    };
                    f[at] = rng.gen();
                }
                if rng.gen_bool(0.3) {
                    let n = rng.gen_range(0..=f.len());
                    f.truncate(n);
                }
                f
            };
            if rng.gen_bool(0.05) {
                f.extend_from_slice(&[0; 5]);
            }
            // Client ports vary so that flows are created.
            let o = m.lb(&f);
            count += 1;
            check_invariants(&m, &f, &o);
            if o.action == Action::Tx {
                txs += 1;
                let (_, r, _) = decap(&o.frame);
                let _ = r;
            }
            let (a, r, out) = decap(&f);
            if r != DecapReason::Decapped {
                assert_eq!(out, f);
                assert_eq!(a == Action::Drop, r == DecapReason::DropMalformed);
            }
        }
        assert_eq!(m.stats.iter().sum::<u64>(), count);
        assert!(txs > 1000, "only {txs} forwarded");
        let vip_pkts: u64 = m.vip_stats.values().map(|c| c.packets).sum();
        let be_pkts: u64 = m.be_stats.values().map(|c| c.packets).sum();
        let fwd = m.stats[Reason::TxForward as usize] + m.stats[Reason::TxIcmpForward as usize];
        assert_eq!(be_pkts, fwd);
        assert!(vip_pkts >= fwd);
    }
}
