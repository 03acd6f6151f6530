//! What the agent writes into a stateless VIP's ring words, and what the data plane makes
//! of them: each slot names a primary and a secondary backend (docs/dataplane.md). The
//! secondary is where the slot's connections may still be: the slot's owner before a change
//! moved it; the previous secondary while nothing moves it; a draining backend's slots
//! (also after a restart that lost the live ring); Maglev's second choice otherwise. The
//! expected values come from the rings the agent wrote before (read back from the kernel
//! map) and from the config, not from the code that computes them. Needs root (BPF maps).
use std::net::{IpAddr, Ipv4Addr};

use lb_common::*;
use lb_tests::{
    fixture::v4,
    harness::{self, test_sizes},
    packets::Opts,
};
use lb_userspace::{
    config::{BackendConfig, Config, Forwarding, Mode, Protocol, VipConfig},
    dataplane::Dataplane,
    reconcile::{self, Applied},
};

const RING: u32 = 4093;

fn config(mode: Mode, backends: &[(u8, u32, bool)]) -> Config {
    Config {
        agent: harness::test_agent(RING),
        bgp: None,
        vips: vec![VipConfig {
            name: "web".into(),
            address: v4(10, 1),
            port: 80,
            protocol: Protocol::Tcp,
            forwarding: Forwarding::Gue,
            mode,
            backends: backends
                .iter()
                .map(|&(b, weight, drain)| BackendConfig {
                    address: v4(20, b),
                    weight,
                    drain,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
    }
}

/// An LB's maps and what the agent applied to them: configs in, ring words out.
struct Lb {
    dp: Dataplane,
    applied: Applied,
}

impl Lb {
    fn new() -> Lb {
        Lb {
            dp: Dataplane::load(test_sizes()).unwrap(),
            applied: Applied::default(),
        }
    }

    /// Reconcile to `cfg`; then its VIP's live ring, each id turned into its backend's last
    /// address byte (0 for none): (primary, secondary) per slot.
    fn apply(&mut self, cfg: &Config) -> Vec<(u8, u8)> {
        cfg.validate().unwrap();
        reconcile::reconcile(&mut self.dp, cfg, &mut self.applied, 1500).unwrap();
        let meta = self.meta(cfg);
        if meta.ring_size == 0 {
            return Vec::new();
        }
        let backends = self.dp.read_backends().unwrap();
        let byte = |id: u32| backends[id as usize].addr[0].to_ne_bytes()[3];
        self.dp
            .read_ring(meta.ring_base, meta.ring_size)
            .unwrap()
            .into_iter()
            .map(|w| {
                let (p, s) = (ring_primary(w), ring_secondary(w));
                (byte(p), if s == p { 0 } else { byte(s) })
            })
            .collect()
    }

    fn meta(&self, cfg: &Config) -> VipMeta {
        self.dp
            .vips
            .get(&reconcile::vip_key(&cfg.vips[0]), 0)
            .unwrap()
    }
}

#[test]
fn a_slot_that_moves_names_its_previous_owner_and_one_that_stays_keeps_its_secondary() {
    let mut lb = Lb::new();
    let c0 = config(
        Mode::Stateless,
        &[(11, 100, false), (12, 100, false), (13, 100, false)],
    );
    let w0 = lb.apply(&c0);
    assert!(
        w0.iter().all(|&(p, s)| p != s),
        "a secondary equal to its primary"
    );
    // Maglev's second choice: most slots were walked over by another backend (3 backends
    // over 4,093 slots: about 90%).
    let carried = w0.iter().filter(|&&(_, s)| s != 0).count();
    assert!(
        carried * 100 >= w0.len() * 80,
        "only {carried} of {} slots carry a second choice",
        w0.len()
    );

    // .13 takes a bigger share: the slots it takes name their old owner.
    let c1 = config(
        Mode::Stateless,
        &[(11, 100, false), (12, 100, false), (13, 400, false)],
    );
    let w1 = lb.apply(&c1);
    let (mut moved, mut kept) = (0, 0);
    for (s, (&(p0, s0), &(p1, s1))) in w0.iter().zip(&w1).enumerate() {
        if p0 != p1 {
            moved += 1;
            assert_eq!(
                s1, p0,
                "slot {s} moved from .{p0} to .{p1}: secondary .{s1}"
            );
        } else {
            kept += 1;
            // (A slot that had none may get the new table's second choice.)
            if s0 != 0 {
                assert_eq!(s1, s0, "slot {s} stayed on .{p0}: .{s0} became .{s1}");
            }
        }
    }
    assert!(moved > RING as usize / 10, "only {moved} slots moved");
    assert!(kept > 0);

    // The same config again changes nothing (the ring is not even rewritten).
    let base = lb.meta(&c1).ring_base;
    assert_eq!(lb.apply(&c1), w1);
    let again = lb.meta(&c1).ring_base;
    assert_eq!(base, again, "an unchanged config rewrote the ring");
}

#[test]
fn a_draining_backend_is_its_slots_secondary_also_after_a_restart_without_the_live_ring() {
    let all = [(11, 100, false), (12, 100, false), (13, 100, false)];
    let drained = [(11, 100, false), (12, 100, true), (13, 100, false)];
    let mut lb = Lb::new();
    let c0 = config(Mode::Stateless, &all);
    let w0 = lb.apply(&c0);
    let c1 = config(Mode::Stateless, &drained);
    let w1 = lb.apply(&c1);
    let owned: Vec<usize> = (0..w0.len()).filter(|&s| w0[s].0 == 12).collect();
    assert!(!owned.is_empty());
    for &s in &owned {
        assert_ne!(w1[s].0, 12, "slot {s}: a draining backend is a primary");
        assert_eq!(w1[s].1, 12, "slot {s}: .12 drained, secondary .{}", w1[s].1);
    }

    // A new LB (or one whose maps were removed) with the same config: no live ring to
    // learn from, the draining backend is still named for its slots.
    let w2 = Lb::new().apply(&c1);
    for &s in &owned {
        assert_eq!(w2[s].0, w1[s].0, "slot {s}: another primary on a fresh LB");
        assert_eq!(w2[s].1, 12, "slot {s}: fresh LB, secondary .{}", w2[s].1);
    }
}

#[test]
fn a_conntrack_ring_carries_no_secondaries() {
    let mut lb = Lb::new();
    let c = config(
        Mode::Conntrack,
        &[(11, 100, false), (12, 100, false), (13, 100, false)],
    );
    lb.apply(&c);
    let meta = lb.meta(&c);
    assert_eq!(meta.flags & VIP_F_STATELESS, 0);
    let ring = lb.dp.read_ring(meta.ring_base, meta.ring_size).unwrap();
    assert!(ring.iter().all(|&w| ring_secondary(w) == 0));
}

/// From config to wire: after a weight change, a packet of a moved slot leaves the LB for
/// its new primary with the old one's address in the GUE header (bytes read off the frame
/// at the offsets the spec gives, not through our parser).
#[test]
fn a_packet_of_a_moved_slot_carries_its_old_owner_s_address() {
    let mut lb = Lb::new();
    let c0 = config(Mode::Stateless, &[(11, 100, false), (12, 100, false)]);
    let w0 = lb.apply(&c0);
    let c1 = config(
        Mode::Stateless,
        &[(11, 100, false), (12, 100, false), (13, 100, false)],
    );
    let w1 = lb.apply(&c1);
    let vip = Ipv4Addr::new(198, 18, 10, 1);
    let client = Ipv4Addr::new(198, 18, 1, 7);
    let mut checked = 0;
    for sport in 1024..1324u16 {
        let flow = lb_tests::packets::flow4(client, sport, vip, 80, PROTO_TCP);
        let slot = ring_slot(flow_hash(42, &flow, false), RING) as usize;
        let frame = Opts::default().tcp4(client, sport, vip, 80, b"x");
        let run = harness::run(&mut lb.dp, "lb", &frame).unwrap();
        let out = &run.frame;
        assert_eq!(run.action, 3, "XDP_TX for sport {sport}");
        // Ethernet 14, outer IPv4 20, UDP 8, then GUE: hlen 2, proto 4, 0, 0, "LB", flags.
        assert_eq!(&out[34 + 2..34 + 4], &GUE_PORT.to_be_bytes());
        assert_eq!(&out[42..48], &[2, 4, 0, 0, b'L', b'B']);
        assert_eq!(out[33], w1[slot].0, "outer destination");
        if w0[slot].0 != w1[slot].0 {
            assert_eq!(out[48], GUE_F_SECOND, "flags of a moved slot");
            let second = IpAddr::from([out[50], out[51], out[52], out[53]]);
            assert_eq!(second, v4(20, w0[slot].0), "slot {slot}");
            checked += 1;
        }
        // The inner packet follows unchanged.
        assert_eq!(&out[54..], &frame[14..]);
    }
    assert!(checked > 30, "only {checked} flows of moved slots");
}

/// A backend removed in a change is gone from the VIP: no slot names it as secondary (its
/// id is retired and may come back for a newcomer).
#[test]
fn a_removed_backend_is_no_slot_s_secondary() {
    let mut lb = Lb::new();
    let c0 = config(
        Mode::Stateless,
        &[(11, 100, false), (12, 100, false), (13, 100, false)],
    );
    let w0 = lb.apply(&c0);
    assert!(w0.iter().any(|&(p, _)| p == 13));
    let c1 = config(Mode::Stateless, &[(11, 100, false), (12, 100, false)]);
    let w1 = lb.apply(&c1);
    for (s, &(p, sec)) in w1.iter().enumerate() {
        assert!(
            p != 13 && sec != 13,
            "slot {s}: .{p} / .{sec} after .13 left"
        );
    }
}

/// Every backend of a stateless VIP draining: the ring is built over them (nothing else
/// would keep their connections), the same primaries as before the drain.
#[test]
fn a_stateless_vip_whose_backends_all_drain_keeps_a_ring_over_them() {
    let mut lb = Lb::new();
    let c0 = config(Mode::Stateless, &[(11, 100, false), (12, 100, false)]);
    let w0 = lb.apply(&c0);
    let c1 = config(Mode::Stateless, &[(11, 100, true), (12, 100, true)]);
    let w1 = lb.apply(&c1);
    assert_eq!(w1.len(), RING as usize, "an empty ring");
    let p = |w: &[(u8, u8)]| w.iter().map(|x| x.0).collect::<Vec<_>>();
    assert_eq!(p(&w1), p(&w0));
    // A conntrack VIP keeps its drained backends' flows in its table: its ring empties.
    let c2 = config(Mode::Conntrack, &[(11, 100, true), (12, 100, true)]);
    lb.apply(&c2);
    assert_eq!(lb.meta(&c2).ring_size, 0);
}
