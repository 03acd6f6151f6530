//! Programs under test taking turns on the LB's veth: the `lb` program (production sizes:
//! 1M-entry connection table, 65,537-slot rings, the standard fixture) and the baseline
//! forwarder, swapped through the one XDP link, each turn timed on its own. The host
//! steals CPU in bursts; turns a fraction of a second apart see the same machine, so the
//! suite compares each LB turn with the forwarder turn beside it and reports medians.
use std::time::Duration;

use anyhow::{Context, Result};
use lb_common::{
    bench::GenConfig, ring_primary, ring_word, Forwarding, VIP_F_AFFINITY, VIP_F_STATELESS,
};
use lb_tests::{fixture::Fixture, model::Model};
use lb_userspace::dataplane::{Dataplane, Sizes};

use crate::live::{Tools, Wire};

/// The conn-table size of every throughput measurement (Katran's default, and the
/// data-plane benchmark's).
pub const MAX_CONNS: u32 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prog {
    Lb,
    Fwd,
}

impl Prog {
    pub fn name(self) -> &'static str {
        match self {
            Prog::Lb => "lb",
            Prog::Fwd => "fwd",
        }
    }
}

/// How the fixture's VIP under test keeps its flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VipMode {
    /// As the fixture has it: connection table, IP-in-IP.
    Conntrack,
    /// Stateless (second chance): no connection table, GUE variant 0 with a secondary in
    /// every packet (12 more header bytes than IP-in-IP over IPv4, 24 over IPv6).
    Stateless,
}

impl VipMode {
    pub fn name(self) -> &'static str {
        match self {
            VipMode::Conntrack => "conntrack",
            VipMode::Stateless => "stateless",
        }
    }
}

/// What one turn measured.
#[derive(Clone, Debug)]
pub struct Turn {
    pub sent: u64,
    pub received: u64,
    pub secs: f64,
    /// Frames received per bucket (last byte of the outer destination).
    pub buckets: Vec<u64>,
}

impl Turn {
    pub fn mpps(&self) -> f64 {
        self.received as f64 / self.secs / 1e6
    }
}

pub struct Bench {
    pub tools: Tools,
    pub wire: Wire,
    pub dp: Dataplane,
    pub fixture: Fixture,
    on: Option<Prog>,
}

impl Bench {
    pub fn new(max_conns: u32) -> Result<Bench> {
        let mut tools = Tools::load()?;
        let mut wire = Wire::up(&mut tools)?;
        let mut dp = Dataplane::load(Sizes {
            max_conns,
            ..Sizes::default()
        })?;
        let mut fixture = Fixture::standard();
        fixture.ring_size = lb_common::DEFAULT_RING_SIZE;
        fixture.apply(&mut dp, &mut Model::default())?;
        wire.put(dp.program("lb")?)?;
        Ok(Bench {
            tools,
            wire,
            dp,
            fixture,
            on: Some(Prog::Lb),
        })
    }

    /// Make `prog` the LB veth's program (a no-op if it is already).
    pub fn put(&mut self, prog: Prog) -> Result<()> {
        if self.on == Some(prog) {
            return Ok(());
        }
        match prog {
            Prog::Lb => self.wire.put(self.dp.program("lb")?)?,
            Prog::Fwd => self.wire.put(self.tools.program("fwd")?)?,
        }
        self.on = Some(prog);
        Ok(())
    }

    /// Send `frames` frames of `cfg` through `prog` and count what comes back. Call it on
    /// a thread inside the generator's namespace.
    pub fn turn(&mut self, prog: Prog, cfg: &GenConfig, frames: u32) -> Result<Turn> {
        self.put(prog)?;
        self.tools.set_gen(cfg)?;
        let before = self.tools.received()?;
        let took = self
            .tools
            .send(self.wire.gen_ifindex, cfg.frame_len, frames)?;
        // With the LB on another CPU, frames may still be in flight.
        let after = self.tools.settle()?;
        let buckets: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        Ok(Turn {
            sent: frames as u64,
            received: buckets.iter().sum(),
            secs: took.as_secs_f64(),
            buckets,
        })
    }

    /// Switch fixture VIP `id` (0 = 198.18.10.1:80/tcp, 1 = [2001:db8:10::1]:80/tcp: IP in
    /// IP over four backends of its family, all up) to `mode`, keeping its live ring's
    /// primaries. Stateless: every slot also names a secondary, the next backend of the
    /// VIP after its primary (up, of the same family: every packet carries one, the
    /// expensive case), forwarding GUE, `VIP_F_STATELESS`. Conntrack: plain primaries, the
    /// fixture's forwarding and flags. The words go into the VIP's other ring buffer, then
    /// one `set_vip` flips to it (and keeps `VIP_FILTER[1]` in step); a grace period
    /// follows, so the buffer left behind may be rewritten by the next switch.
    pub fn set_vip_mode(&mut self, id: usize, mode: VipMode) -> Result<()> {
        let spec = &self.fixture.vips[id];
        let key = spec.key();
        let mut meta = self.dp.vips.get(&key, 0).context("reading VIPS")?;
        let live = self.dp.read_ring(meta.ring_base, meta.ring_size)?;
        let words = live
            .iter()
            .map(|&w| {
                let p = ring_primary(w);
                Ok(match mode {
                    VipMode::Conntrack => p,
                    VipMode::Stateless => {
                        let at = spec
                            .backends
                            .iter()
                            .position(|&b| b == p)
                            .with_context(|| {
                                format!("ring of VIP {id} names backend {p}, not one of its own")
                            })?;
                        ring_word(p, spec.backends[(at + 1) % spec.backends.len()])
                    }
                })
            })
            .collect::<Result<Vec<u32>>>()?;
        let (forwarding, flags) = match mode {
            VipMode::Conntrack => (
                spec.forwarding as u8,
                if spec.affinity { VIP_F_AFFINITY } else { 0 },
            ),
            VipMode::Stateless => (
                Forwarding::Gue as u8,
                (meta.flags & VIP_F_AFFINITY) | VIP_F_STATELESS,
            ),
        };
        let other = 1 - self.dp.ring_buffer(meta.ring_base);
        meta.ring_base = self.dp.write_ring(id as u32, other, &words)?;
        meta.forwarding = forwarding;
        meta.flags = flags;
        self.dp.set_vip(&key, &meta)?;
        self.dp.wait_for_programs()
    }

    /// Kernel-measured (run time, runs) of `prog` so far (kernel.bpf_stats_enabled).
    pub fn prog_stats(&mut self, prog: Prog) -> Result<(Duration, u64)> {
        let info = match prog {
            Prog::Lb => self.dp.program("lb")?.info()?,
            Prog::Fwd => self.tools.program("fwd")?.info()?,
        };
        Ok((info.run_time(), info.run_count()))
    }
}
