//! Live traffic through a program under test, the way the suite measures throughput:
//! a generator namespace and an LB namespace joined by one veth pair. The generator
//! (`gen`, run by BPF_PROG_TEST_RUN in live-frames mode on the generator's veth) sends
//! frames to the LB's veth; the program under test (the `lb` program, or the baseline
//! `fwd`) sends them back with XDP_TX; the receiver (`count`, XDP on the generator's
//! veth) tallies them by destination and drops them. Programs take turns on the LB's
//! veth by being swapped into its one XDP link.
use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, PerCpuArray},
    programs::{
        links::FdLink,
        xdp::{XdpLink, XdpLinkId},
        TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode,
    },
    Ebpf,
};
use lb_common::bench::{GenConfig, RX_BUCKETS};
use lb_tests::netns::{run, veth_pair, Netns, VethEnd};

pub const GEN_MAC: [u8; 6] = [0x02, 0xbe, 0, 0, 0, 0x01];
pub const LB_MAC: [u8; 6] = [0x02, 0xbe, 0, 0, 0, 0x02];
/// Frames per BPF_PROG_TEST_RUN batch (the kernel's maximum).
const BATCH: u32 = 256;

/// Bind the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The benchmark tools' object: generator, receiver, forwarder.
pub struct Tools {
    ebpf: Ebpf,
}

impl Tools {
    pub fn load() -> Result<Tools> {
        let path = lb_userspace::dataplane::BENCH_OBJECT_PATH;
        let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
        let mut ebpf = Ebpf::load(&bytes).context("loading the benchmark tools' object")?;
        for name in ["gen", "count", "fwd"] {
            let p: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("no program {name}"))?
                .try_into()?;
            p.load().with_context(|| format!("loading {name}"))?;
        }
        Ok(Tools { ebpf })
    }

    pub fn program(&mut self, name: &str) -> Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("no program {name}"))?
            .try_into()?)
    }

    pub fn set_gen(&mut self, cfg: &GenConfig) -> Result<()> {
        let mut a: Array<_, GenConfig> =
            Array::try_from(self.ebpf.map_mut("GEN_CFG").context("GEN_CFG")?)?;
        a.set(0, cfg, 0).context("writing GEN_CFG")
    }

    /// Frames received so far, per bucket (summed over CPUs).
    pub fn received(&self) -> Result<Vec<u64>> {
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("RX_COUNT").context("RX_COUNT")?)?;
        (0..RX_BUCKETS)
            .map(|i| Ok(m.get(&i, 0)?.iter().sum()))
            .collect()
    }

    pub fn received_total(&self) -> Result<u64> {
        Ok(self.received()?.iter().sum())
    }

    /// Wait until the count of received frames stands still (frames in flight through a
    /// veth ring drain in microseconds); the count per bucket then.
    pub fn settle(&self) -> Result<Vec<u64>> {
        let mut last = self.received_total()?;
        loop {
            std::thread::sleep(Duration::from_millis(2));
            let now = self.received_total()?;
            if now == last {
                return self.received();
            }
            last = now;
        }
    }

    /// Send `frames` frames from `ifindex` (run this on a thread inside the generator's
    /// namespace: the kernel resolves the index there). Returns the wall time it took.
    pub fn send(&mut self, ifindex: u32, frame_len: u16, frames: u32) -> Result<Duration> {
        let data = vec![0u8; frame_len as usize];
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex. Live frames need data_end = the length and the interface.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame_len as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let prog = self.program("gen")?;
        let t = Instant::now();
        prog.test_run(TestRunOptions {
            data_in: Some(&data),
            ctx_in: Some(&ctx),
            repeat: frames,
            attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN (live frames) of gen")?;
        Ok(t.elapsed())
    }
}

/// Generator and LB namespaces joined by one veth pair, the receiver attached to the
/// generator's end. Interface names carry our process id: NAPI threads are named after
/// the interface, whatever its namespace. Removed when dropped.
pub struct Wire {
    pub gen: Netns,
    pub lb: Netns,
    pub gen_if: String,
    pub lb_if: String,
    pub gen_ifindex: u32,
    /// The LB veth's one XDP link, whoever holds it now.
    link: Option<FdLink>,
    _rx: XdpLinkId,
}

fn if_index(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {name}");
    }
    Ok(i)
}

impl Wire {
    pub fn up(tools: &mut Tools) -> Result<Wire> {
        let gen = Netns::new("lbbench-gen")?;
        let lb = Netns::new("lbbench-lb")?;
        // No IPv6 on the veths: router and neighbour solicitations would be counted.
        for ns in [&gen, &lb] {
            ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        }
        let gen_if = format!("bg{}", std::process::id());
        let lb_if = format!("bl{}", std::process::id());
        veth_pair(
            &VethEnd {
                ns: &gen,
                name: &gen_if,
                mac: GEN_MAC,
                addrs: &[],
            },
            &VethEnd {
                ns: &lb,
                name: &lb_if,
                mac: LB_MAC,
                addrs: &[],
            },
        )?;
        let (gen_ifindex, rx) = gen.run_in(|| -> Result<(u32, XdpLinkId)> {
            let rx = tools
                .program("count")?
                .attach(&gen_if, XdpMode::Driver)
                .context("attaching the receiver")?;
            Ok((if_index(&gen_if)?, rx))
        })??;
        Ok(Wire {
            gen,
            lb,
            gen_if,
            lb_if,
            gen_ifindex,
            link: None,
            _rx: rx,
        })
    }

    /// Put `prog` on the LB's veth: attached the first time, then swapped into the same
    /// link (BPF_LINK_UPDATE), so the interface is never without a program.
    pub fn put(&mut self, prog: &mut Xdp) -> Result<()> {
        let id = match self.link.take() {
            None => self
                .lb
                .run_in(|| prog.attach(&self.lb_if, XdpMode::Driver))??,
            Some(link) => prog.attach_to_link(XdpLink::try_from(link)?)?,
        };
        self.link = Some(FdLink::try_from(prog.take_link(id)?)?);
        Ok(())
    }

    /// Run the LB veth's receive (its NAPI) in a kernel thread bound to `cpu` ("split"),
    /// or in the softirq of whoever sends to it (`None`, "inline": the generator's CPU).
    pub fn steer_lb(&self, cpu: Option<usize>) -> Result<()> {
        let on = if cpu.is_some() { "1" } else { "0" };
        self.lb.exec(&[
            "sh",
            "-c",
            &format!("echo {on} > /sys/class/net/{}/threaded", self.lb_if),
        ])?;
        if let Some(cpu) = cpu {
            let ids = napi_threads(&self.lb_if)?;
            if ids.is_empty() {
                bail!(
                    "no napi/{}-* kernel thread after enabling threaded NAPI",
                    self.lb_if
                );
            }
            for pid in ids {
                run("taskset", &["-p", "-c", &cpu.to_string(), &pid.to_string()])?;
            }
        }
        Ok(())
    }
}

/// Process ids of the NAPI kernel threads of interfaces named `dev` (any namespace).
fn napi_threads(dev: &str) -> Result<Vec<u32>> {
    let prefix = format!("napi/{dev}-");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc")? {
        let e = e?;
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(comm) =
            std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("comm"))
        else {
            continue;
        };
        if comm.trim_end().starts_with(&prefix) {
            out.push(pid);
        }
    }
    Ok(out)
}
