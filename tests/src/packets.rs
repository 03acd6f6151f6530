//! Packet builders for tests, built with `etherparse` (independently of the XDP program and
//! of the hand-written reference model in `model.rs`).
//!
//! - Input frames: [`tcp4`], [`udp4`], [`tcp6`], [`udp6`] (defaults), or the same methods on
//!   [`Opts`] for VLAN, TOS/traffic class, DF, fragments, IPv4 options, padding, ...
//! - ICMP errors quoting a packet: [`icmp4_dest_unreach`], [`icmp4_time_exceeded`],
//!   [`icmp6_packet_too_big`], [`icmp6_dest_unreach`], or [`Opts::icmp4`] / [`Opts::icmp6`].
//! - Expected outputs of the `lb` program: [`expected_ipip`], [`expected_gue`],
//!   [`expected_l2dsr`], [`expected_icmp_too_big4`], [`expected_icmp_too_big6`].
//! - Raw words and map keys: [`addr4_raw`], [`addr6_raw`], [`port_raw`], [`flow4`],
//!   [`flow6`], [`vip_key4`], [`vip_key6`], [`addr_key4`], [`addr_key6`].

use etherparse::{
    icmpv4, icmpv6, EtherType, Ethernet2Header, Icmpv4Type, Icmpv6Type, IpFragOffset, IpHeaders,
    IpNumber, Ipv4Dscp, Ipv4Ecn, Ipv4Header, Ipv4HeaderSlice, Ipv4Options, Ipv6Extensions,
    Ipv6FlowLabel, Ipv6Header, Ipv6HeaderSlice, PacketBuilder, SingleVlanHeader, UdpHeader, VlanId,
    VlanPcp,
};
use lb_common::{
    AddrKey, FlowKey, VipKey, FAMILY_V4, FAMILY_V6, GUE_PORT, OUTER_TTL, PROTO_TCP, PROTO_UDP,
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Source MAC of test frames (the client side router); same value as `fixture::CLIENT_MAC`.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];
/// Destination MAC of test frames (the load balancer's interface); as `fixture::LB_MAC`.
pub const LB_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];

// ---------------------------------------------------------------------------------------
// Raw words and keys

/// Raw word of an IPv4 address: its wire bytes read native-endian.
pub fn addr4_raw(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

/// Raw words of an IPv6 address.
pub fn addr6_raw(a: Ipv6Addr) -> [u32; 4] {
    let o = a.octets();
    [0, 1, 2, 3].map(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
}

/// Raw address words and family of an address (IPv4 in word 0).
pub fn addr_raw(a: IpAddr) -> ([u32; 4], u8) {
    match a {
        IpAddr::V4(a) => ([addr4_raw(a), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(a) => (addr6_raw(a), FAMILY_V6),
    }
}

/// Raw (wire order, read native-endian) port.
pub fn port_raw(p: u16) -> u16 {
    u16::from_ne_bytes(p.to_be_bytes())
}

/// Flow key of a packet `src:sport -> dst:dport` (both addresses of one family).
pub fn flow_key(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, proto: u8) -> FlowKey {
    let (s, family) = addr_raw(src);
    let (d, dfam) = addr_raw(dst);
    assert_eq!(family, dfam, "mixed address families");
    FlowKey {
        src: s,
        dst: d,
        sport: port_raw(sport),
        dport: port_raw(dport),
        proto,
        family,
        _pad: [0; 2],
    }
}

pub fn flow4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, proto: u8) -> FlowKey {
    flow_key(src.into(), sport, dst.into(), dport, proto)
}

pub fn flow6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, proto: u8) -> FlowKey {
    flow_key(src.into(), sport, dst.into(), dport, proto)
}

/// `VIPS` key of `addr:port/proto`.
pub fn vip_key(addr: IpAddr, port: u16, proto: u8) -> VipKey {
    let (a, family) = addr_raw(addr);
    VipKey {
        addr: a,
        port: port_raw(port),
        proto,
        family,
    }
}

pub fn vip_key4(addr: Ipv4Addr, port: u16, proto: u8) -> VipKey {
    vip_key(addr.into(), port, proto)
}

pub fn vip_key6(addr: Ipv6Addr, port: u16, proto: u8) -> VipKey {
    vip_key(addr.into(), port, proto)
}

/// `VIP_ADDRS` key.
pub fn addr_key(addr: IpAddr) -> AddrKey {
    let (a, family) = addr_raw(addr);
    AddrKey {
        addr: a,
        family,
        _pad: [0; 3],
    }
}

pub fn addr_key4(addr: Ipv4Addr) -> AddrKey {
    addr_key(addr.into())
}

pub fn addr_key6(addr: Ipv6Addr) -> AddrKey {
    addr_key(addr.into())
}

// ---------------------------------------------------------------------------------------
// Input frames

/// How to build a test frame. `Opts::default()`: CLIENT_MAC -> LB_MAC, no VLAN, TOS 0,
/// DF clear, TTL 64, no options, no padding.
#[derive(Clone, Debug)]
pub struct Opts {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// One 802.1Q tag with this VLAN id (12 bits) and [`Opts::vlan_pcp`].
    pub vlan: Option<u16>,
    pub vlan_pcp: u8,
    /// IPv4 TOS byte (DSCP << 2 | ECN) or IPv6 traffic class.
    pub tos: u8,
    /// IPv4 don't-fragment bit.
    pub df: bool,
    pub ttl: u8,
    /// IPv4 identification.
    pub ident: u16,
    /// IPv4 more-fragments bit / IPv6 fragment header M bit.
    pub more_fragments: bool,
    /// Fragment offset in 8-byte units (13 bits): IPv4 header, or the IPv6 fragment header.
    pub frag_offset: u16,
    /// IPv6: insert a fragment header (next header 44).
    pub ipv6_fragment: bool,
    /// IPv6 flow label (20 bits).
    pub flow_label: u32,
    /// IPv4 options (length a multiple of 4, at most 40): IHL > 5.
    pub ipv4_options: Vec<u8>,
    /// TCP: SYN (else ACK).
    pub syn: bool,
    /// TCP: FIN too.
    pub fin: bool,
    /// TCP: RST too.
    pub rst: bool,
    /// Zero bytes appended after the IP datagram (Ethernet padding).
    pub padding: usize,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            src_mac: CLIENT_MAC,
            dst_mac: LB_MAC,
            vlan: None,
            vlan_pcp: 0,
            tos: 0,
            df: false,
            ttl: 64,
            ident: 0,
            more_fragments: false,
            frag_offset: 0,
            ipv6_fragment: false,
            flow_label: 0,
            ipv4_options: Vec::new(),
            syn: false,
            fin: false,
            rst: false,
            padding: 0,
        }
    }
}

/// The 14 or 18 bytes of Ethernet header (+ one VLAN tag) for `ether_type`.
pub fn l2_header(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    vlan: Option<SingleVlanHeader>,
    ether_type: EtherType,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(18);
    let eth = Ethernet2Header {
        source: src_mac,
        destination: dst_mac,
        ether_type: if vlan.is_some() {
            EtherType::VLAN_TAGGED_FRAME
        } else {
            ether_type
        },
    };
    eth.write(&mut out).unwrap();
    if let Some(mut v) = vlan {
        v.ether_type = ether_type;
        v.write(&mut out).unwrap();
    }
    out
}

impl Opts {
    pub fn with_vlan(mut self, id: u16) -> Self {
        self.vlan = Some(id);
        self
    }
    pub fn with_tos(mut self, tos: u8) -> Self {
        self.tos = tos;
        self
    }
    pub fn with_df(mut self, df: bool) -> Self {
        self.df = df;
        self
    }
    pub fn with_syn(mut self, syn: bool) -> Self {
        self.syn = syn;
        self
    }
    pub fn with_fin(mut self, fin: bool) -> Self {
        self.fin = fin;
        self
    }
    pub fn with_rst(mut self, rst: bool) -> Self {
        self.rst = rst;
        self
    }
    pub fn with_padding(mut self, n: usize) -> Self {
        self.padding = n;
        self
    }
    pub fn with_macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    fn vlan_header(&self) -> Option<SingleVlanHeader> {
        self.vlan.map(|id| SingleVlanHeader {
            pcp: VlanPcp::try_new(self.vlan_pcp).unwrap(),
            drop_eligible_indicator: false,
            vlan_id: VlanId::try_new(id).unwrap(),
            ether_type: EtherType::IPV4,
        })
    }

    fn l2(&self, ether_type: EtherType) -> Vec<u8> {
        l2_header(self.src_mac, self.dst_mac, self.vlan_header(), ether_type)
    }

    fn ip4(&self, src: Ipv4Addr, dst: Ipv4Addr) -> IpHeaders {
        let h = Ipv4Header {
            dscp: Ipv4Dscp::try_new(self.tos >> 2).unwrap(),
            ecn: Ipv4Ecn::try_new(self.tos & 3).unwrap(),
            identification: self.ident,
            dont_fragment: self.df,
            more_fragments: self.more_fragments,
            fragment_offset: IpFragOffset::try_new(self.frag_offset).unwrap(),
            time_to_live: self.ttl,
            source: src.octets(),
            destination: dst.octets(),
            options: Ipv4Options::try_from(&self.ipv4_options[..])
                .expect("bad IPv4 options length"),
            ..Default::default()
        };
        IpHeaders::Ipv4(h, Default::default())
    }

    fn ip6(&self, src: Ipv6Addr, dst: Ipv6Addr) -> IpHeaders {
        let h = Ipv6Header {
            traffic_class: self.tos,
            flow_label: Ipv6FlowLabel::try_new(self.flow_label).unwrap(),
            payload_length: 0,
            next_header: IpNumber(255),
            hop_limit: self.ttl,
            source: src.octets(),
            destination: dst.octets(),
        };
        // A fragment header, if asked for, is spliced in by `finish` (etherparse's builder
        // cannot write one in front of a transport header it also writes).
        let ext = Ipv6Extensions::default();
        IpHeaders::Ipv6(h, ext)
    }

    fn ip(&self, src: IpAddr, dst: IpAddr) -> (IpHeaders, EtherType) {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => (self.ip4(s, d), EtherType::IPV4),
            (IpAddr::V6(s), IpAddr::V6(d)) => (self.ip6(s, d), EtherType::IPV6),
            _ => panic!("mixed address families"),
        }
    }

    fn finish(&self, ether_type: EtherType, mut ip_packet: Vec<u8>) -> Vec<u8> {
        if self.ipv6_fragment && ether_type == EtherType::IPV6 {
            let next = ip_packet[6];
            ip_packet[6] = 44;
            let pl = u16::from_be_bytes([ip_packet[4], ip_packet[5]]) + 8;
            ip_packet[4..6].copy_from_slice(&pl.to_be_bytes());
            let off = (self.frag_offset << 3) | self.more_fragments as u16;
            let o = off.to_be_bytes();
            let frag = [next, 0, o[0], o[1], 0x12, 0x34, 0x56, 0x78];
            ip_packet.splice(40..40, frag);
        }
        let mut out = self.l2(ether_type);
        out.extend_from_slice(&ip_packet);
        out.resize(out.len() + self.padding, 0);
        out
    }

    /// TCP frame (SYN if `self.syn`, else ACK; FIN, RST if asked).
    pub fn tcp(&self, src: IpAddr, sport: u16, dst: IpAddr, dport: u16, payload: &[u8]) -> Vec<u8> {
        let (ip, et) = self.ip(src, dst);
        let mut b = PacketBuilder::ip(ip).tcp(sport, dport, 1000, 65535);
        b = if self.syn { b.syn() } else { b.ack(1) };
        if self.fin {
            b = b.fin();
        }
        if self.rst {
            b = b.rst();
        }
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        self.finish(et, out)
    }

    pub fn udp(&self, src: IpAddr, sport: u16, dst: IpAddr, dport: u16, payload: &[u8]) -> Vec<u8> {
        let (ip, et) = self.ip(src, dst);
        let mut out = Vec::new();
        PacketBuilder::ip(ip)
            .udp(sport, dport)
            .write(&mut out, payload)
            .unwrap();
        self.finish(et, out)
    }

    /// An IP packet with protocol / next header `proto` and `payload` after the IP header
    /// (no transport header is built: put one in `payload` if needed).
    pub fn ip_raw(&self, src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
        let (ip, et) = self.ip(src, dst);
        let mut out = Vec::new();
        PacketBuilder::ip(ip)
            .write(&mut out, IpNumber(proto), payload)
            .unwrap();
        self.finish(et, out)
    }

    pub fn tcp4(
        &self,
        src: Ipv4Addr,
        sport: u16,
        dst: Ipv4Addr,
        dport: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        self.tcp(src.into(), sport, dst.into(), dport, payload)
    }
    pub fn udp4(
        &self,
        src: Ipv4Addr,
        sport: u16,
        dst: Ipv4Addr,
        dport: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        self.udp(src.into(), sport, dst.into(), dport, payload)
    }
    pub fn tcp6(
        &self,
        src: Ipv6Addr,
        sport: u16,
        dst: Ipv6Addr,
        dport: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        self.tcp(src.into(), sport, dst.into(), dport, payload)
    }
    pub fn udp6(
        &self,
        src: Ipv6Addr,
        sport: u16,
        dst: Ipv6Addr,
        dport: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        self.udp(src.into(), sport, dst.into(), dport, payload)
    }

    /// ICMPv4 message of `icmp_type` (checksum computed) carrying `payload` (for errors:
    /// the quoted IP packet, e.g. from [`ip_packet`]).
    pub fn icmp4(
        &self,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        icmp_type: Icmpv4Type,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ip(self.ip4(src, dst))
            .icmpv4(icmp_type)
            .write(&mut out, payload)
            .unwrap();
        self.finish(EtherType::IPV4, out)
    }

    /// ICMPv6 message of `icmp_type` (checksum computed) carrying `payload`.
    pub fn icmp6(
        &self,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        icmp_type: Icmpv6Type,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ip(self.ip6(src, dst))
            .icmpv6(icmp_type)
            .write(&mut out, payload)
            .unwrap();
        self.finish(EtherType::IPV6, out)
    }
}

/// TCP/IPv4 frame with default [`Opts`] and the given SYN flag (else ACK).
pub fn tcp4(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    syn: bool,
    payload: &[u8],
) -> Vec<u8> {
    Opts::default()
        .with_syn(syn)
        .tcp4(src, sport, dst, dport, payload)
}

pub fn udp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    Opts::default().udp4(src, sport, dst, dport, payload)
}

pub fn tcp6(
    src: Ipv6Addr,
    sport: u16,
    dst: Ipv6Addr,
    dport: u16,
    syn: bool,
    payload: &[u8],
) -> Vec<u8> {
    Opts::default()
        .with_syn(syn)
        .tcp6(src, sport, dst, dport, payload)
}

pub fn udp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    Opts::default().udp6(src, sport, dst, dport, payload)
}

/// A frame with an arbitrary ethertype and payload (ARP, LLDP, ...).
pub fn raw_ether(ether_type: u16, vlan: Option<u16>, payload: &[u8]) -> Vec<u8> {
    let o = Opts {
        vlan,
        ..Default::default()
    };
    let mut out = o.l2(EtherType(ether_type));
    out.extend_from_slice(payload);
    out
}

/// ICMPv4 "destination unreachable / fragmentation needed" from `router` to `vip`, quoting
/// `quoted` (an IP packet VIP -> client, e.g. `ip_packet(&tcp4(vip, vport, client, cport,..))`).
pub fn icmp4_dest_unreach(
    router: Ipv4Addr,
    vip: Ipv4Addr,
    next_hop_mtu: u16,
    quoted: &[u8],
) -> Vec<u8> {
    let ty =
        Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu,
        });
    Opts::default().icmp4(router, vip, ty, quoted)
}

/// ICMPv4 "time exceeded" (TTL) from `router` to `vip`, quoting `quoted`.
pub fn icmp4_time_exceeded(router: Ipv4Addr, vip: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    let ty = Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit);
    Opts::default().icmp4(router, vip, ty, quoted)
}

/// ICMPv6 "packet too big" from `router` to `vip`, quoting `quoted`.
pub fn icmp6_packet_too_big(router: Ipv6Addr, vip: Ipv6Addr, mtu: u32, quoted: &[u8]) -> Vec<u8> {
    Opts::default().icmp6(router, vip, Icmpv6Type::PacketTooBig { mtu }, quoted)
}

/// ICMPv6 "destination unreachable / port unreachable" from `router` to `vip`.
pub fn icmp6_dest_unreach(router: Ipv6Addr, vip: Ipv6Addr, quoted: &[u8]) -> Vec<u8> {
    let ty = Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Port);
    Opts::default().icmp6(router, vip, ty, quoted)
}

// ---------------------------------------------------------------------------------------
// Parsing helpers (etherparse) for the expected-output builders

/// Ethernet part of a frame, parsed with etherparse.
#[derive(Clone, Debug)]
pub struct L2 {
    pub eth: Ethernet2Header,
    pub vlan: Option<SingleVlanHeader>,
    /// Offset of the IP header.
    pub l3: usize,
    /// Ethertype of the payload (after the VLAN tag).
    pub ether_type: EtherType,
}

/// Parse the Ethernet header and at most one 802.1Q tag.
pub fn parse_l2(frame: &[u8]) -> L2 {
    let (eth, rest) = Ethernet2Header::from_slice(frame).expect("ethernet header");
    if eth.ether_type == EtherType::VLAN_TAGGED_FRAME {
        let (vlan, _) = SingleVlanHeader::from_slice(rest).expect("vlan tag");
        L2 {
            eth: eth.clone(),
            ether_type: vlan.ether_type,
            vlan: Some(vlan),
            l3: 18,
        }
    } else {
        L2 {
            ether_type: eth.ether_type,
            eth,
            vlan: None,
            l3: 14,
        }
    }
}

/// The IP datagram of a frame (from the IP header to the end given by its length field,
/// without Ethernet padding).
pub fn ip_packet(frame: &[u8]) -> Vec<u8> {
    let l2 = parse_l2(frame);
    let ip = &frame[l2.l3..];
    let len = if l2.ether_type == EtherType::IPV4 {
        usize::from(Ipv4HeaderSlice::from_slice(ip).unwrap().total_len())
    } else {
        40 + usize::from(Ipv6HeaderSlice::from_slice(ip).unwrap().payload_length())
    };
    ip[..len].to_vec()
}

/// Facts about a frame's IP header: (family, tos/traffic class, datagram length, src, dst).
fn parse_ip(frame: &[u8], l2: &L2) -> (u8, u8, usize, IpAddr, IpAddr) {
    let ip = &frame[l2.l3..];
    if l2.ether_type == EtherType::IPV4 {
        let h = Ipv4HeaderSlice::from_slice(ip).unwrap();
        let tos = (h.dcp().value() << 2) | h.ecn().value();
        (
            FAMILY_V4,
            tos,
            h.total_len().into(),
            h.source_addr().into(),
            h.destination_addr().into(),
        )
    } else {
        let h = Ipv6HeaderSlice::from_slice(ip).unwrap();
        (
            FAMILY_V6,
            h.traffic_class(),
            40 + usize::from(h.payload_length()),
            h.source_addr().into(),
            h.destination_addr().into(),
        )
    }
}

// ---------------------------------------------------------------------------------------
// Expected outputs

/// The outer header addresses of an encapsulated packet (the source already mixed with the
/// flow entropy as the spec says).
#[derive(Clone, Copy, Debug)]
pub enum Outer {
    V4 { src: Ipv4Addr, dst: Ipv4Addr },
    V6 { src: Ipv6Addr, dst: Ipv6Addr },
}

fn expected_encap(input: &[u8], mac: [u8; 6], outer: Outer, entropy: u32, gue: bool) -> Vec<u8> {
    let l2 = parse_l2(input);
    let (family, tos, inner_len, _, _) = parse_ip(input, &l2);
    let udp_len = if gue { UdpHeader::LEN } else { 0 };
    let proto = if gue {
        IpNumber::UDP
    } else if family == FAMILY_V4 {
        IpNumber::IPV4
    } else {
        IpNumber::IPV6
    };
    let outer_et = match outer {
        Outer::V4 { .. } => EtherType::IPV4,
        Outer::V6 { .. } => EtherType::IPV6,
    };
    let mut out = l2_header(l2.eth.destination, mac, l2.vlan.clone(), outer_et);
    match outer {
        Outer::V4 { src, dst } => {
            let h = Ipv4Header {
                dscp: Ipv4Dscp::try_new(tos >> 2).unwrap(),
                ecn: Ipv4Ecn::try_new(tos & 3).unwrap(),
                total_len: (Ipv4Header::MIN_LEN + udp_len + inner_len) as u16,
                identification: 0,
                dont_fragment: false,
                more_fragments: false,
                fragment_offset: IpFragOffset::ZERO,
                time_to_live: OUTER_TTL,
                protocol: proto,
                header_checksum: 0,
                source: src.octets(),
                destination: dst.octets(),
                options: Default::default(),
            };
            h.write(&mut out).unwrap(); // computes the checksum
        }
        Outer::V6 { src, dst } => {
            let h = Ipv6Header {
                traffic_class: tos,
                flow_label: Ipv6FlowLabel::try_new(entropy & 0xFFFFF).unwrap(),
                payload_length: (udp_len + inner_len) as u16,
                next_header: proto,
                hop_limit: OUTER_TTL,
                source: src.octets(),
                destination: dst.octets(),
            };
            h.write(&mut out).unwrap();
        }
    }
    if gue {
        let u = UdpHeader {
            source_port: 0xC000 | (entropy & 0x3FFF) as u16,
            destination_port: GUE_PORT,
            length: (UdpHeader::LEN + inner_len) as u16,
            checksum: 0,
        };
        u.write(&mut out).unwrap();
    }
    out.extend_from_slice(&input[l2.l3..]);
    out
}

/// The frame `lb` sends for `input` in `Ipip` mode: Ethernet (dst `mac`, src the input's
/// destination, VLAN tag kept) + outer IPv4/IPv6 (addresses from `outer`, TOS/traffic class
/// copied, TTL 64, flow label `entropy & 0xFFFFF`) + the input's IP packet and padding.
pub fn expected_ipip(input: &[u8], mac: [u8; 6], outer: Outer, entropy: u32) -> Vec<u8> {
    expected_encap(input, mac, outer, entropy, false)
}

/// As [`expected_ipip`] with a UDP header (source port `0xC000 | entropy & 0x3FFF`,
/// destination [`GUE_PORT`], checksum 0) between the outer IP header and the inner packet.
pub fn expected_gue(input: &[u8], mac: [u8; 6], outer: Outer, entropy: u32) -> Vec<u8> {
    expected_encap(input, mac, outer, entropy, true)
}

/// `L2Dsr`: destination MAC := `mac`, source := the input's destination.
pub fn expected_l2dsr(input: &[u8], mac: [u8; 6]) -> Vec<u8> {
    let l2 = parse_l2(input);
    let mut eth = l2.eth.clone();
    eth.source = l2.eth.destination;
    eth.destination = mac;
    let mut out = eth.to_bytes().to_vec();
    out.extend_from_slice(&input[14..]);
    out
}

fn reply_l2(input: &[u8]) -> (L2, Vec<u8>) {
    let l2 = parse_l2(input);
    let hdr = l2_header(
        l2.eth.destination,
        l2.eth.source,
        l2.vlan.clone(),
        l2.ether_type,
    );
    (l2, hdr)
}

/// ICMPv4 "fragmentation needed" (type 3 code 4) the `lb` program answers an IPv4 `input`
/// with: back to the sender, from the VIP, quoting the first 64 bytes from the IP header.
pub fn expected_icmp_too_big4(input: &[u8], next_hop_mtu: u16) -> Vec<u8> {
    let (l2, mut out) = reply_l2(input);
    let (_, _, _, src, dst) = parse_ip(input, &l2);
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (src, dst) else {
        panic!("not IPv4")
    };
    let h = Ipv4Header {
        dont_fragment: false,
        time_to_live: OUTER_TTL,
        source: dst.octets(),
        destination: src.octets(),
        ..Default::default()
    };
    let ty =
        Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu,
        });
    PacketBuilder::ip(IpHeaders::Ipv4(h, Default::default()))
        .icmpv4(ty)
        .write(&mut out, &input[l2.l3..l2.l3 + 64])
        .unwrap();
    out
}

/// ICMPv6 "packet too big" the `lb` program answers an IPv6 `input` with, quoting the first
/// 128 bytes from the IP header.
pub fn expected_icmp_too_big6(input: &[u8], mtu: u32) -> Vec<u8> {
    let (l2, mut out) = reply_l2(input);
    let (_, _, _, src, dst) = parse_ip(input, &l2);
    let (IpAddr::V6(src), IpAddr::V6(dst)) = (src, dst) else {
        panic!("not IPv6")
    };
    PacketBuilder::ipv6(dst.octets(), src.octets(), OUTER_TTL)
        .icmpv6(Icmpv6Type::PacketTooBig { mtu })
        .write(&mut out, &input[l2.l3..l2.l3 + 128])
        .unwrap();
    out
}

/// What `decap` makes of an encapsulated frame: its Ethernet header (VLAN tag kept) with the
/// ethertype of `inner` (an IP packet, plus any bytes that followed it), then `inner`.
pub fn expected_decap(encapsulated: &[u8], inner: &[u8]) -> Vec<u8> {
    let l2 = parse_l2(encapsulated);
    let et = if inner[0] >> 4 == 6 {
        EtherType::IPV6
    } else {
        EtherType::IPV4
    };
    let mut out = l2_header(l2.eth.source, l2.eth.destination, l2.vlan, et);
    out.extend_from_slice(inner);
    out
}

/// TCP or UDP protocol number by name, for readability in tests.
pub const TCP: u8 = PROTO_TCP;
pub const UDP: u8 = PROTO_UDP;

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    const A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const B: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);

    #[test]
    fn raw_words() {
        assert_eq!(
            addr4_raw(Ipv4Addr::new(1, 2, 3, 4)).to_ne_bytes(),
            [1, 2, 3, 4]
        );
        let a: Ipv6Addr = "2001:db8::1:2".parse().unwrap();
        let w = addr6_raw(a);
        assert_eq!(w[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(w[3].to_ne_bytes(), [0, 1, 0, 2]);
        assert_eq!(port_raw(80).to_ne_bytes(), [0, 80]);
        let k = flow4(A, 1234, B, 80, TCP);
        assert_eq!(
            (k.src[0], k.dst[1], k.sport, k.family),
            (addr4_raw(A), 0, port_raw(1234), 4)
        );
        assert_eq!(vip_key4(B, 80, UDP).port, port_raw(80));
        assert_eq!(addr_key6(a).family, 6);
    }

    #[test]
    fn builders_produce_what_they_say() {
        let f = Opts {
            vlan: Some(100),
            tos: 0xb8,
            df: true,
            ipv4_options: vec![1, 1, 1, 1],
            padding: 6,
            ..Opts::default().with_syn(true)
        }
        .tcp4(A, 1234, B, 80, b"hi");
        assert_eq!(&f[12..14], &[0x81, 0x00]);
        assert_eq!(u16::from_be_bytes([f[14], f[15]]) & 0xfff, 100);
        assert_eq!(&f[16..18], &[0x08, 0x00]);
        assert_eq!(f[18], 0x46);
        assert_eq!(f[19], 0xb8);
        assert_eq!(f[24] & 0x40, 0x40);
        assert_eq!(f.len(), 18 + 24 + 20 + 2 + 6);
        assert_eq!(ip_packet(&f).len(), 24 + 20 + 2);
        let p = SlicedPacket::from_ethernet(&f[..f.len() - 6]).unwrap();
        let Some(NetSlice::Ipv4(ip)) = p.net else {
            panic!()
        };
        assert_eq!(ip.header().source_addr(), A);
        let Some(TransportSlice::Tcp(t)) = p.transport else {
            panic!()
        };
        assert!(t.syn());
        assert_eq!(t.destination_port(), 80);

        let f = tcp4(A, 1, B, 2, false, b"");
        assert_eq!(f[20] & 0x40, 0, "DF clear by default");
        assert_eq!(f.len(), 14 + 20 + 20);

        let f = Opts {
            tos: 0xab,
            flow_label: 0x12345,
            ..Default::default()
        }
        .udp6(Ipv6Addr::LOCALHOST, 1, Ipv6Addr::LOCALHOST, 2, b"x");
        assert_eq!(&f[14..18], &[0x6a, 0xb1, 0x23, 0x45]);
        assert_eq!(f.len(), 14 + 40 + 8 + 1);

        let quoted = ip_packet(&udp4(B, 53, A, 5353, b"q"));
        let f = icmp4_dest_unreach(A, B, 1400, &quoted);
        assert_eq!((f[34], f[35]), (3, 4));
        assert_eq!(u16::from_be_bytes([f[40], f[41]]), 1400);
        assert_eq!(&f[42..], &quoted[..]);
    }

    #[test]
    fn expected_ipip_bytes() {
        let input = Opts::default()
            .with_vlan(7)
            .with_tos(0x21)
            .udp4(A, 1, B, 2, b"abc");
        let src = Ipv4Addr::new(172, 16, 1, 2);
        let dst = Ipv4Addr::new(198, 19, 10, 1);
        let out = expected_ipip(&input, [9; 6], Outer::V4 { src, dst }, 0);
        assert_eq!(&out[0..6], &[9; 6]);
        assert_eq!(&out[6..12], &LB_MAC);
        assert_eq!(&out[12..18], &input[12..18]);
        let h = &out[18..38];
        assert_eq!(h[0], 0x45);
        assert_eq!(h[1], 0x21);
        assert_eq!(
            usize::from(u16::from_be_bytes([h[2], h[3]])),
            input.len() - 18 + 20
        );
        assert_eq!(&h[4..10], &[0, 0, 0, 0, 64, 4]);
        assert_eq!(&h[12..16], &src.octets());
        assert_eq!(&h[16..20], &dst.octets());
        assert_eq!(&out[38..], &input[18..]);
        let g = expected_gue(&input, [9; 6], Outer::V4 { src, dst }, 0x1234_5678);
        assert_eq!(g[27], 17);
        assert_eq!(&g[38..46], &[0xd6, 0x78, 0x17, 0xc0, 0, 8 + 31, 0, 0]);
    }
}
