//! Rings are swapped in atomically: while the agent's reconcile installs one backend set
//! after another into a VIP, another thread pushes new flows through the real program
//! (BPF_PROG_TEST_RUN); every packet must be forwarded to the backend that the ring live
//! before it ran, or the one being installed, assigns to its flow: never dropped, never a
//! stale ring (the idle buffer still holds the ring of two installs ago), never anyone else.
use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use aya_obj::programs::XdpAttachType;
use lb_common::*;
use lb_tests::{
    fixture::v4,
    harness::{self, test_sizes},
    packets::Opts,
};
use lb_userspace::{
    config::{BackendConfig, Config, Forwarding, Protocol, VipConfig},
    dataplane::{addr_raw, Dataplane},
    reconcile::{self, Applied},
};

fn config(backends: &[(u8, u32)]) -> Config {
    Config {
        agent: harness::test_agent(65537),
        bgp: None,
        vips: vec![VipConfig {
            name: "web".into(),
            address: v4(10, 1),
            port: 80,
            protocol: Protocol::Tcp,
            forwarding: Forwarding::Ipip,
            affinity: false,
            backends: backends
                .iter()
                .map(|&(b, weight)| BackendConfig {
                    address: v4(20, b),
                    weight,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
    }
}

/// The backend address each of the two rings gives every flow, by ring slot.
fn ring_addresses(cfg: &Config) -> Vec<IpAddr> {
    reconcile::ring_addresses(cfg, &cfg.vips[0]).unwrap()
}

const CONFIGS: usize = 24;

/// Install number `k`: three or four backends out of a pool, weights varying.
fn config_k(k: usize) -> Config {
    let n = 3 + k % 2;
    let set: Vec<(u8, u32)> = (0..n)
        .map(|i| {
            (
                10 + ((k * 3 + i) % 40) as u8,
                10 + ((k + i) * 37 % 90) as u32,
            )
        })
        .collect();
    config(&set)
}

#[test]
fn packets_see_the_old_ring_or_the_new_one_while_rings_are_rebuilt() {
    let configs: Vec<Config> = (0..CONFIGS).map(config_k).collect();
    let rings: Vec<Vec<IpAddr>> = configs.iter().map(ring_addresses).collect();

    let mut dp = Dataplane::load(test_sizes()).unwrap();
    let mut applied = Applied::default();
    reconcile::reconcile(&mut dp, &configs[0], &mut applied, 1500).unwrap();

    // A second handle on the same loaded program, for the traffic thread.
    let pin = format!("/sys/fs/bpf/lbtest-swap-{}", std::process::id());
    dp.program("lb").unwrap().pin(&pin).unwrap();
    let prog = Xdp::from_pin(&pin, XdpAttachType::Interface).unwrap();
    std::fs::remove_file(&pin).unwrap();

    // `live`: the install known complete; `installing`: the one in progress (or done).
    let live = Arc::new(AtomicUsize::new(0));
    let installing = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (stop, live, installing) = (stop.clone(), live.clone(), installing.clone());
        std::thread::spawn(move || {
            let mut out = vec![0u8; 2048];
            let (mut n, mut bad) = (0u32, Vec::new());
            let mut straddled = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let client = IpAddr::V4(Ipv4Addr::new(198, 19, (n >> 16) as u8, (n >> 8) as u8));
                let sport = 1024 + (n & 0xff) as u16;
                let frame = Opts::default()
                    .with_syn(true)
                    .tcp(client, sport, v4(10, 1), 80, b"");
                let lo = live.load(Ordering::SeqCst);
                let r = prog
                    .test_run(TestRunOptions {
                        data_in: Some(&frame),
                        data_out: Some(&mut out),
                        ..Default::default()
                    })
                    .unwrap();
                let hi = installing.load(Ordering::SeqCst);
                straddled += (hi > lo) as u32;
                let got = (r.return_value == 3)
                    .then(|| IpAddr::V4(Ipv4Addr::new(out[30], out[31], out[32], out[33])));
                let flow = FlowKey {
                    src: addr_raw(client).0,
                    dst: addr_raw(v4(10, 1)).0,
                    sport: sport.to_be(),
                    dport: 80u16.to_be(),
                    proto: PROTO_TCP,
                    family: FAMILY_V4,
                    _pad: [0; 2],
                };
                let slot = flow_hash(42, &flow, false) as usize % 65537;
                let ok = (lo..=hi).any(|k| Some(rings[k % CONFIGS][slot]) == got);
                if !ok && bad.len() < 5 {
                    let matches: Vec<usize> = (0..CONFIGS)
                        .filter(|&k| Some(rings[k][slot]) == got)
                        .collect();
                    bad.push(format!(
                        "flow {n}: verdict {} to {got:?}, live {lo}, installing {hi}; rings (mod {CONFIGS}) giving that: {matches:?}",
                        r.return_value
                    ));
                }
                n += 1;
            }
            (n, bad, straddled)
        })
    };

    let t = std::time::Instant::now();
    let mut k = 0;
    while t.elapsed().as_millis() < 1500 || k < 2 * CONFIGS {
        k += 1;
        installing.store(k, Ordering::SeqCst);
        reconcile::reconcile(&mut dp, &configs[k % CONFIGS], &mut applied, 1500).unwrap();
        live.store(k, Ordering::SeqCst);
    }
    stop.store(true, Ordering::SeqCst);
    let (n, bad, straddled) = traffic.join().unwrap();
    println!(
        "{n} new flows during {k} ring installs; {straddled} ran while a ring was being installed"
    );
    let reasons: Vec<String> = Reason::ALL
        .iter()
        .zip(dp.reason_counts().unwrap())
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| format!("{}={n}", r.name()))
        .collect();
    println!("reasons: {}", reasons.join(" "));
    assert!(
        bad.is_empty(),
        "packets that saw neither the live nor the new ring:\n{}",
        bad.join("\n")
    );
    assert!(
        straddled > 100,
        "traffic hardly overlapped the installs ({straddled})"
    );
}
