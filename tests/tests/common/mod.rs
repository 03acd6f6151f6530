//! Helpers shared by the integration test files: a freshly loaded data plane with the
//! standard fixture, reason-counter bookkeeping, expected backends and outer headers
//! computed from the fixture (never from the program), and readable frame diffs.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{
    flow_entropy, flow_hash, Backend, Config, DecapReason, FlowKey, Forwarding, Reason, VipMeta,
    NUM_DECAP_REASONS, RINGS_PER_VIP,
};
use lb_tests::{
    fixture::Fixture,
    harness::{self, Run},
    model::Model,
    packets::{expected_gue, expected_ipip, expected_l2dsr, flow_key, parse_l2, Outer},
};
use lb_userspace::dataplane::Dataplane;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// Clients live outside every fixture prefix (198.18.0.0/15, 2001:db8::/32 subnets 0xa, 0x14).
pub fn client4(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2 + ((i >> 8) & 1) as u8, (i & 0xff) as u8)
}
pub fn client6(i: u32) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, (i >> 16) as u16, i as u16)
}
/// A client of the same family as `vip`.
pub fn client_for(vip: IpAddr, i: u32) -> IpAddr {
    match vip {
        IpAddr::V4(_) => client4(i).into(),
        IpAddr::V6(_) => client6(i).into(),
    }
}

/// Addresses that carry no VIP.
pub const NOT_VIP4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
pub const NOT_VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 9);

/// A loaded data plane, the standard fixture applied to it and to the reference model.
pub struct Env {
    pub dp: Dataplane,
    pub model: Model,
    pub fx: Fixture,
}

impl Env {
    pub fn standard() -> Env {
        Env::with_sizes(harness::test_sizes())
    }

    /// The standard fixture on a data plane of these sizes.
    pub fn with_sizes(sizes: lb_userspace::dataplane::Sizes) -> Env {
        let mut dp = Dataplane::load(sizes).expect("loading the XDP object");
        let fx = Fixture::standard();
        let mut model = Model::default();
        fx.apply(&mut dp, &mut model).expect("applying the fixture");
        Env { dp, model, fx }
    }

    pub fn cfg(&self) -> Config {
        self.fx.config
    }

    /// Index (= VIP id) of the fixture VIP `addr:port/proto`.
    pub fn vip(&self, addr: IpAddr, port: u16, proto: u8) -> usize {
        find_vip(&self.fx, addr, port, proto)
    }

    /// Run `frame` through `lb` and return the run and the one reason it was counted
    /// under (panics unless exactly one reason counter went up by exactly one).
    pub fn lb(&mut self, frame: &[u8]) -> (Run, Reason) {
        let before = self.dp.reason_counts().expect("reading STATS");
        let run = harness::run(&mut self.dp, "lb", frame).expect("running lb");
        let after = self.dp.reason_counts().expect("reading STATS");
        let reason = one_reason(&before, &after)
            .unwrap_or_else(|e| panic!("{e}\nframe ({} bytes): {}", frame.len(), hex(frame)));
        (run, reason)
    }

    /// Run `frame` through `decap`; the one `DECAP_STATS` reason it was counted under.
    pub fn decap(&mut self, frame: &[u8]) -> (Run, DecapReason) {
        let before = self.dp.decap_counts().expect("reading DECAP_STATS");
        let run = harness::run(&mut self.dp, "decap", frame).expect("running decap");
        let after = self.dp.decap_counts().expect("reading DECAP_STATS");
        let moved: Vec<usize> = (0..NUM_DECAP_REASONS as usize)
            .filter(|&i| after[i] != before[i])
            .collect();
        assert!(
            moved.len() == 1 && after[moved[0]] == before[moved[0]] + 1,
            "decap: expected exactly one DECAP_STATS counter +1, before {before:?} after {after:?}"
        );
        let r = [
            DecapReason::Pass,
            DecapReason::Decapped,
            DecapReason::DropMalformed,
        ][moved[0]];
        (run, r)
    }

    /// The backend the fixture's live ring of VIP `vip` names for `flow`.
    pub fn ring_choice(&self, vip: usize, flow: &FlowKey) -> u32 {
        ring_choice(
            &self.cfg(),
            &self.fx.ring(vip),
            self.fx.vips[vip].affinity,
            flow,
        )
    }

    /// MAC a packet to backend `b` is sent to (its own, or the gateway's).
    pub fn mac_of(&self, b: u32) -> [u8; 6] {
        let m = self.fx.backends[b as usize].mac;
        if m == [0; 6] {
            self.cfg().gw_mac
        } else {
            m
        }
    }

    /// The outer addresses of a packet of `flow` encapsulated to backend `b`.
    pub fn outer(&self, b: u32, flow: &FlowKey) -> Outer {
        outer_for(
            &self.cfg(),
            self.fx.backends[b as usize].addr,
            flow_entropy(flow),
        )
    }

    /// The frame `lb` must send for `input` (a packet of `flow` to VIP `vip`) when it goes
    /// to backend `b`, built with `packets::expected_*`.
    pub fn expected_forward(&self, vip: usize, b: u32, flow: &FlowKey, input: &[u8]) -> Vec<u8> {
        let mac = self.mac_of(b);
        let e = flow_entropy(flow);
        match self.fx.vips[vip].forwarding {
            Forwarding::Ipip => expected_ipip(input, mac, self.outer(b, flow), e),
            Forwarding::Gue => expected_gue(input, mac, self.outer(b, flow), e),
            Forwarding::L2Dsr => expected_l2dsr(input, mac),
        }
    }

    /// Make `ring` the live ring of VIP `vip` (written into the buffer not in use, then
    /// switched to with one `VIPS` update), in the kernel and in the model.
    pub fn set_ring(&mut self, vip: usize, ring: &[u32]) {
        let key = self.fx.vips[vip].key();
        let old = self.dp.vips.get(&key, 0).expect("VIP present");
        let stride = self.dp.sizes.ring_stride;
        let which = if old.ring_base == vip as u32 * RINGS_PER_VIP * stride {
            1
        } else {
            0
        };
        let base = self
            .dp
            .write_ring(vip as u32, which, ring)
            .expect("write_ring");
        let meta = VipMeta {
            ring_base: base,
            ring_size: ring.len() as u32,
            ..old
        };
        self.dp.set_vip(&key, &meta).expect("set_vip");
        for (i, b) in ring.iter().enumerate() {
            self.model.rings.insert(base + i as u32, *b);
        }
        self.model.vips.insert(key, meta);
    }

    /// Change backend `b`'s state in the fixture, the kernel and the model.
    pub fn set_backend_state(&mut self, b: u32, state: u8) {
        self.fx.backends[b as usize].state = state;
        let be: Backend = self.fx.backend(b);
        self.dp.set_backend(b, &be).expect("set_backend");
        self.model.backends[b as usize] = be;
    }

    /// Number of entries in the kernel's connection table.
    pub fn conns_len(&self) -> usize {
        self.dp.conns.keys().filter_map(|k| k.ok()).count()
    }

    pub fn conn(&self, flow: &FlowKey) -> Option<u32> {
        self.dp.conns.get(flow, 0).ok().map(|c| c.backend)
    }
}

fn find_vip(fx: &Fixture, addr: IpAddr, port: u16, proto: u8) -> usize {
    fx.vips
        .iter()
        .position(|v| v.addr == addr && v.port == port && v.proto == proto)
        .unwrap_or_else(|| panic!("no fixture VIP {addr}:{port}/{proto}"))
}

/// Index (= VIP id) of the standard fixture's VIP `addr:port/proto`.
pub fn vip_index(addr: IpAddr, port: u16, proto: u8) -> usize {
    find_vip(&Fixture::standard(), addr, port, proto)
}

pub fn ring_choice(cfg: &Config, ring: &[u32], affinity: bool, flow: &FlowKey) -> u32 {
    ring[(flow_hash(cfg.hash_seed, flow, affinity) % ring.len() as u32) as usize]
}

/// Outer header addresses per the spec: source from the config and the flow entropy,
/// destination the backend.
pub fn outer_for(cfg: &Config, backend: IpAddr, entropy: u32) -> Outer {
    match backend {
        IpAddr::V4(dst) => {
            let src = (cfg.src4 & !cfg.src4_mask) | (entropy & cfg.src4_mask);
            Outer::V4 {
                src: Ipv4Addr::from(src.to_ne_bytes()),
                dst,
            }
        }
        IpAddr::V6(dst) => {
            let mut w = cfg.src6;
            w[3] = (w[3] & !cfg.src6_mask) | (entropy & cfg.src6_mask);
            let mut o = [0u8; 16];
            for (i, x) in w.iter().enumerate() {
                o[4 * i..4 * i + 4].copy_from_slice(&x.to_ne_bytes());
            }
            Outer::V6 {
                src: Ipv6Addr::from(o),
                dst,
            }
        }
    }
}

/// Flow key of a packet client -> VIP.
pub fn flow(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, proto: u8) -> FlowKey {
    flow_key(src, sport, dst, dport, proto)
}

/// The single reason whose counter went up by one between two `reason_counts()`.
pub fn one_reason(before: &[u64], after: &[u64]) -> Result<Reason, String> {
    let moved: Vec<(Reason, i128)> = Reason::ALL
        .iter()
        .enumerate()
        .filter(|(i, _)| after[*i] != before[*i])
        .map(|(i, r)| (*r, after[i] as i128 - before[i] as i128))
        .collect();
    match moved[..] {
        [(r, 1)] => Ok(r),
        _ => Err(format!(
            "expected exactly one reason counter to go up by one, got changes {moved:?}"
        )),
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Assert two frames are identical; on failure show the lengths, the first differing
/// offset and both frames around it.
#[track_caller]
pub fn assert_frame_eq(got: &[u8], want: &[u8], ctx: &str) {
    if got == want {
        return;
    }
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let lo = first.saturating_sub(8);
    let hi_g = (first + 24).min(got.len());
    let hi_w = (first + 24).min(want.len());
    panic!(
        "{ctx}: frames differ (got {} bytes, want {} bytes), first difference at offset {first}\n\
         got  [{lo}..]: {}\nwant [{lo}..]: {}\nfull got : {}\nfull want: {}",
        got.len(),
        want.len(),
        hex(&got[lo.min(got.len())..hi_g]),
        hex(&want[lo.min(want.len())..hi_w]),
        hex(&got[..got.len().min(160)]),
        hex(&want[..want.len().min(160)]),
    );
}

/// Offset of the IP header of a frame (14, or 18 with a VLAN tag).
pub fn l3_of(frame: &[u8]) -> usize {
    parse_l2(frame).l3
}
