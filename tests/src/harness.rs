//! Runs the real XDP programs through `BPF_PROG_TEST_RUN` and mirrors map state into the
//! reference model, so a test can say "this packet in, these bytes out, this reason".
use anyhow::{Context, Result};
use aya::programs::{TestRun, TestRunOptions};
use lb_userspace::dataplane::{Dataplane, Sizes};

/// Small maps: tests load many copies of the object. The connection table holds 100,000
/// entries made on one CPU (see [`crate::support::conns_for`]).
pub fn test_sizes() -> Sizes {
    Sizes {
        max_vips: 16,
        max_backends: 256,
        max_conns: crate::support::conns_for(100_000),
        ring_stride: 65537,
    }
}

/// The `[agent]` table of tests that reconcile straight into maps loaded with
/// [`test_sizes`]: never attached (`lo`), a fixed seed, and a gateway MAC and outer source
/// so that nothing needs resolving.
pub fn test_agent(ring_size: u32) -> lb_userspace::config::AgentConfig {
    let s = test_sizes();
    lb_userspace::config::AgentConfig {
        interface: "lo".into(),
        xdp_mode: lb_userspace::config::XdpMode::Native,
        hash_seed: 42,
        ring_size,
        max_vips: s.max_vips,
        max_backends: s.max_backends,
        max_conns: s.max_conns,
        mtu: None,
        gateway_mac: Some("02:00:00:00:00:fe".parse().unwrap()),
        encap_source_v4: Some("198.18.255.0/24".parse().unwrap()),
        encap_source_v6: None,
        metrics: lb_userspace::config::Listen::Off,
    }
}

/// What a program did with one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub action: u32,
    pub frame: Vec<u8>,
}

pub fn run(dp: &mut Dataplane, prog: &str, frame: &[u8]) -> Result<Run> {
    let mut out = vec![0u8; frame.len() + 512];
    let prog = dp.program(prog)?;
    let res = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(res.data_size_out as usize);
    Ok(Run {
        action: res.return_value,
        frame: out,
    })
}
