//! The benchmark tools' programs, from the kernel's side: the generator's frames byte for
//! byte against frames built with etherparse (over a buffer of garbage: live-frame pages
//! keep what the last program wrote), the receiver's tally and the forwarder's swap, and
//! live traffic through the `lb` program counted per backend against the reference model.
use aya::programs::{TestRun, TestRunOptions};
use etherparse::PacketBuilder;
use lb_bench::{
    live::{pin_to_cpu, Tools, GEN_MAC, LB_MAC},
    traffic::{gen_config, reference_frame, Mix},
    turns::{Bench, Prog},
};
use lb_tests::{fixture::Fixture, model::Model, netns::in_netns};

/// Run `gen` once (not live) over `len` bytes of 0xAA; the frame it wrote.
fn generate(tools: &mut Tools, len: usize) -> Vec<u8> {
    let data = vec![0xAA; len];
    let mut out = vec![0u8; len + 64];
    let r = tools
        .program("gen")
        .unwrap()
        .test_run(TestRunOptions {
            data_in: Some(&data),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(r.return_value, 3, "gen returns XDP_TX");
    out.truncate(r.data_size_out as usize);
    out
}

#[test]
fn the_generator_writes_every_header_byte_of_each_flow() {
    pin_to_cpu(0).unwrap(); // the frame counter is per CPU
    let mut tools = Tools::load().unwrap();
    // (config, frames): frame n (counted on this CPU since the program was loaded) is
    // flow n, or n modulo the number of flows, plus the base.
    let cases = [
        (gen_config(Mix::Syn, false, 0, 60), 4),
        (gen_config(Mix::Established, true, 3, 74), 5),
        (gen_config(Mix::Udp, false, 1_000_000, 100), 2),
        (gen_config(Mix::Constant, true, 0, 90), 3),
    ];
    let mut seq = 0u64;
    for (cfg, frames) in cases {
        // Flows far enough to move the source address too (flow_base).
        for base in [0u32, 70_000] {
            let mut cfg = cfg;
            cfg.flow_base = base;
            tools.set_gen(&cfg).unwrap();
            for _ in 0..frames {
                let want_flow = if cfg.flows == 0 {
                    seq as u32
                } else {
                    (seq % cfg.flows as u64) as u32
                };
                let got = generate(&mut tools, cfg.frame_len as usize);
                seq += 1;
                let want = reference_frame(&cfg, want_flow.wrapping_add(base), 0xAA);
                assert_eq!(
                    got,
                    want,
                    "frame of flow {} of {cfg:?}",
                    want_flow.wrapping_add(base)
                );
            }
        }
    }
    // The frames parse as what they claim.
    let f = reference_frame(&gen_config(Mix::Syn, false, 0, 60), 5, 0);
    let p = etherparse::SlicedPacket::from_ethernet(&f).unwrap();
    let Some(etherparse::TransportSlice::Tcp(t)) = p.transport else {
        panic!("not TCP")
    };
    assert!(t.syn() && !t.ack());
    assert_eq!(t.source_port(), 10_005);
}

#[test]
fn the_receiver_counts_by_destination_and_the_forwarder_swaps_macs() {
    let mut tools = Tools::load().unwrap();
    let to = |last: u8| {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(LB_MAC, GEN_MAC)
            .ipv4([198, 18, 100, 1], [198, 18, 20, last], 64)
            .udp(1000, 2000)
            .write(&mut out, &[0; 18])
            .unwrap();
        out
    };
    let to6 = |last: u8| {
        let mut out = Vec::new();
        let mut d = [0u8; 16];
        d[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        d[15] = last;
        PacketBuilder::ethernet2(LB_MAC, GEN_MAC)
            .ipv6(d, d, 64)
            .udp(1000, 2000)
            .write(&mut out, &[0; 18])
            .unwrap();
        out
    };
    let mut arp = vec![0u8; 14];
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    let frames = [to(12), to(12), to(13), to6(200), arp];
    let mut out = vec![0u8; 256];
    for f in &frames {
        let r = tools
            .program("count")
            .unwrap()
            .test_run(TestRunOptions {
                data_in: Some(f),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(r.return_value, 1, "count returns XDP_DROP");
    }
    let got = tools.received().unwrap();
    assert_eq!((got[12], got[13], got[200], got[256]), (2, 1, 1, 1));
    assert_eq!(got.iter().sum::<u64>(), 5);

    let f = to(12);
    let r = tools
        .program("fwd")
        .unwrap()
        .test_run(TestRunOptions {
            data_in: Some(&f),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(r.return_value, 3, "fwd returns XDP_TX");
    let mut want = f.clone();
    want[..6].copy_from_slice(&f[6..12]);
    want[6..12].copy_from_slice(&f[..6]);
    assert_eq!(&out[..r.data_size_out as usize], &want[..]);
}

/// Live frames over a real veth pair: every frame sent comes back, through the forwarder
/// to the VIP's bucket and through `lb` to the backend the reference model picks for it.
#[test]
fn live_frames_come_back_per_backend_as_the_model_predicts() {
    const N: u32 = 20_000;
    let mut b = Bench::new(1 << 18).unwrap();
    let mut model = Model::default();
    let mut fx = Fixture::standard();
    fx.ring_size = lb_common::DEFAULT_RING_SIZE;
    let mut scratch = lb_userspace::dataplane::Dataplane::load(Default::default()).unwrap();
    fx.apply(&mut scratch, &mut model).unwrap();
    let gen_ns = b.wire.gen.name().to_string();
    for (v6, prog) in [(false, Prog::Lb), (true, Prog::Lb), (false, Prog::Fwd)] {
        // Distinct flows per run: the frame counter goes on from run to run.
        let cfg = gen_config(Mix::Established, v6, N, if v6 { 74 } else { 60 });
        let t = in_netns(&gen_ns, || {
            pin_to_cpu(0).unwrap();
            b.turn(prog, &cfg, N).unwrap()
        })
        .unwrap();
        assert_eq!(
            t.received, N as u64,
            "{prog:?} v6={v6}: all {N} frames back"
        );
        let mut want = vec![0u64; 257];
        for i in 0..N {
            let f = reference_frame(&cfg, i, 0);
            let last = match prog {
                Prog::Fwd => f[if v6 { 53 } else { 33 }],
                Prog::Lb => {
                    let o = model.lb(&f);
                    o.frame[if v6 { 53 } else { 33 }]
                }
            };
            want[last as usize] += 1;
        }
        assert_eq!(t.buckets, want, "{prog:?} v6={v6}: frames per destination");
    }
}
