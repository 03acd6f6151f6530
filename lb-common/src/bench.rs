//! The benchmark tools' BPF programs (`lb-ebpf/src/bench.rs`: the packet generator, the
//! receiver and the baseline forwarder) and their userspace driver share these.

/// What the generator writes into every frame (one element of `GEN_CFG`). The frame is
/// rewritten whole, Ethernet to L4 header, on every run: live-frame pages are recycled
/// and keep what the last program (the LB) wrote into them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenConfig {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// First client address (raw, IPv4 in word 0); flow `i` adds `i >> 15` to its last
    /// 16 bits (in network order) and uses source port `GEN_SPORT_BASE + (i & 0x7fff)`.
    pub src: [u32; 4],
    /// Destination (the VIP), raw.
    pub dst: [u32; 4],
    /// Number of flows the frames cycle over; 0: every frame is a flow of its own (the
    /// frame counter is the flow number, 2^32 of them).
    pub flows: u32,
    /// Added to the flow number: each turn of a benchmark can have its own flows.
    pub flow_base: u32,
    /// Destination port, host order.
    pub dst_port: u16,
    /// Whole frame length (at least the headers; the payload's bytes are whatever the
    /// template had).
    pub frame_len: u16,
    /// 4 or 6.
    pub family: u8,
    /// `lb_common::PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// TCP flags byte (0x02 SYN, 0x10 ACK).
    pub tcp_flags: u8,
    pub _pad: u8,
}

/// Source port of flow 0.
pub const GEN_SPORT_BASE: u16 = 10_000;
/// Flows per client address.
pub const GEN_FLOWS_PER_ADDR: u32 = 1 << 15;

/// Receiver buckets: frames counted by the last byte of their (outer) destination
/// address, plus one bucket for frames that are not IP.
pub const RX_BUCKETS: u32 = 257;
pub const RX_NOT_IP: u32 = 256;
