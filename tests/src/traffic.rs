//! Live UDP traffic through a running LB, seen from outside it: numbered datagrams of many
//! flows go out of an `AF_PACKET` socket to the LB's MAC, round robin at a fixed pace; the
//! LB's IP-in-IP output comes back on the same interface (the LB sends with `XDP_TX`), where
//! a second thread reads the outer destination (the backend) and the inner datagram (flow
//! and number) of every frame. So a test can say afterwards: every datagram arrived exactly
//! once, and every flow stayed on one backend, whatever the agent did meanwhile.
//!
//! The capturing interface must run an XDP program that passes (e.g. `pass`): a veth drops
//! `XDP_TX` frames otherwise.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use crate::{
    netns::{Netns, RawSocket},
    packets::Opts,
    support::StopOnDrop,
};

/// One UDP flow: client address and port, VIP address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Flow {
    pub src: Ipv4Addr,
    pub sport: u16,
    pub vip: Ipv4Addr,
    pub dport: u16,
}

/// What arrived of one flow.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// Backend (outer destination) -> frames.
    pub backends: BTreeMap<Ipv4Addr, u64>,
    /// Sequence numbers received (a number twice is a duplicate).
    pub seqs: BTreeSet<u64>,
    pub duplicates: u64,
}

#[derive(Default)]
struct Shared {
    seen: BTreeMap<Flow, Seen>,
    /// Datagrams sent per flow (its sequence numbers are 0..n).
    sent: BTreeMap<Flow, u64>,
}

/// Traffic running in the background; stop it with [`Traffic::finish`].
pub struct Traffic {
    flows: Vec<Flow>,
    sent: Arc<AtomicU64>,
    shared: Arc<Mutex<Shared>>,
    stop_send: Arc<AtomicBool>,
    stop_recv: Arc<AtomicBool>,
    _guard: StopOnDrop,
    _guard_recv: StopOnDrop,
    sender: Option<JoinHandle<Result<()>>>,
    receiver: Option<JoinHandle<Result<()>>>,
}

/// The end of a run: what was sent and what was seen of each flow.
#[derive(Debug)]
pub struct Report {
    pub sent: u64,
    pub flows: BTreeMap<Flow, (u64, Seen)>,
}

impl Report {
    /// Datagrams sent but never seen, per flow (empty: nothing lost).
    pub fn lost(&self) -> BTreeMap<Flow, Vec<u64>> {
        self.flows
            .iter()
            .filter_map(|(f, (n, s))| {
                let missing: Vec<u64> = (0..*n).filter(|q| !s.seqs.contains(q)).collect();
                (!missing.is_empty()).then_some((*f, missing))
            })
            .collect()
    }

    /// Flows seen on more than one backend.
    pub fn moved(&self) -> BTreeMap<Flow, BTreeMap<Ipv4Addr, u64>> {
        self.flows
            .iter()
            .filter(|(_, (_, s))| s.backends.len() > 1)
            .map(|(f, (_, s))| (*f, s.backends.clone()))
            .collect()
    }

    pub fn duplicates(&self) -> u64 {
        self.flows.values().map(|(_, s)| s.duplicates).sum()
    }

    /// The one backend of each flow (panics if a flow had none or several).
    pub fn backend_of(&self, f: &Flow) -> Ipv4Addr {
        let b = &self.flows[f].1.backends;
        assert_eq!(b.len(), 1, "flow {f:?} backends {b:?}");
        *b.keys().next().unwrap()
    }
}

impl Traffic {
    /// Send `flows` round robin, one datagram every `period`, from `iface` in `ns` (frames
    /// from `src_mac` to `lb_mac`); capture what comes back to `src_mac`.
    pub fn start(
        ns: &Netns,
        iface: &str,
        src_mac: [u8; 6],
        lb_mac: [u8; 6],
        flows: Vec<Flow>,
        period: Duration,
    ) -> Result<Traffic> {
        let tx = ns.run_in(|| RawSocket::open(iface))??;
        let rx = ns.run_in(|| RawSocket::open(iface))??;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let sent = Arc::new(AtomicU64::new(0));
        let stop_send = Arc::new(AtomicBool::new(false));
        let stop_recv = Arc::new(AtomicBool::new(false));
        let receiver = {
            let (shared, stop) = (shared.clone(), stop_recv.clone());
            thread::spawn(move || -> Result<()> {
                while !stop.load(Ordering::Relaxed) {
                    let Some(frame) = rx.recv(Duration::from_millis(20))? else {
                        continue;
                    };
                    if let Some((flow, backend, seq)) = parse(&frame, src_mac) {
                        let mut sh = shared.lock().unwrap();
                        let s = sh.seen.entry(flow).or_default();
                        *s.backends.entry(backend).or_default() += 1;
                        if !s.seqs.insert(seq) {
                            s.duplicates += 1;
                        }
                    }
                }
                Ok(())
            })
        };
        let sender = {
            let (shared, sent, stop, flows) = (
                shared.clone(),
                sent.clone(),
                stop_send.clone(),
                flows.clone(),
            );
            thread::spawn(move || -> Result<()> {
                let opts = Opts::default().with_macs(src_mac, lb_mac);
                let start = Instant::now();
                let mut n = 0u64;
                let mut seq = vec![0u64; flows.len()];
                while !stop.load(Ordering::Relaxed) {
                    let i = (n % flows.len() as u64) as usize;
                    let f = flows[i];
                    let mut payload = seq[i].to_be_bytes().to_vec();
                    payload.resize(32, 0xab);
                    tx.send(&opts.udp4(f.src, f.sport, f.vip, f.dport, &payload))?;
                    seq[i] += 1;
                    shared.lock().unwrap().sent.insert(f, seq[i]);
                    n += 1;
                    sent.store(n, Ordering::Relaxed);
                    if n > 2_000_000 {
                        bail!("sender ran away");
                    }
                    let next = start + period * n as u32;
                    if let Some(d) = next.checked_duration_since(Instant::now()) {
                        thread::sleep(d);
                    }
                }
                Ok(())
            })
        };
        Ok(Traffic {
            flows,
            sent,
            shared,
            _guard: StopOnDrop(stop_send.clone()),
            _guard_recv: StopOnDrop(stop_recv.clone()),
            stop_send,
            stop_recv,
            sender: Some(sender),
            receiver: Some(receiver),
        })
    }

    /// Datagrams sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Wait until `n` more datagrams have gone out.
    pub fn wait_more(&self, n: u64) {
        let target = self.sent() + n;
        crate::support::wait_for(
            &format!("{target} datagrams sent"),
            Duration::from_secs(30),
            || self.sent() >= target,
        );
    }

    /// Wait until every flow has been seen at least once.
    pub fn wait_all_seen(&self, timeout: Duration) {
        crate::support::wait_for("every flow seen", timeout, || {
            let sh = self.shared.lock().unwrap();
            self.flows.iter().all(|f| sh.seen.contains_key(f))
        });
    }

    /// The backends each flow has been seen on so far.
    pub fn backends_now(&self) -> BTreeMap<Flow, BTreeSet<Ipv4Addr>> {
        let sh = self.shared.lock().unwrap();
        sh.seen
            .iter()
            .map(|(f, s)| (*f, s.backends.keys().copied().collect()))
            .collect()
    }

    /// Stop sending, let what is in flight arrive, stop capturing.
    pub fn finish(mut self) -> Result<Report> {
        self.stop_send.store(true, Ordering::Relaxed);
        self.sender.take().unwrap().join().unwrap()?;
        let total: u64 = self.shared.lock().unwrap().sent.values().sum();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            let got: u64 = {
                let sh = self.shared.lock().unwrap();
                sh.seen.values().map(|s| s.seqs.len() as u64).sum()
            };
            if got >= total {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        thread::sleep(Duration::from_millis(100)); // a duplicate would arrive too
        self.stop_recv.store(true, Ordering::Relaxed);
        self.receiver.take().unwrap().join().unwrap()?;
        let sh = std::mem::take(&mut *self.shared.lock().unwrap());
        let flows = sh
            .sent
            .iter()
            .map(|(f, n)| (*f, (*n, sh.seen.get(f).cloned().unwrap_or_default())))
            .collect();
        Ok(Report { sent: total, flows })
    }
}

/// An IPv4-in-IPv4 frame to `mac` carrying one of our datagrams: (flow, backend, number).
fn parse(f: &[u8], mac: [u8; 6]) -> Option<(Flow, Ipv4Addr, u64)> {
    if f.len() < 14 + 20 + 20 + 8 + 8 || f[..6] != mac || f[12..14] != [0x08, 0x00] {
        return None;
    }
    let outer = &f[14..];
    if outer[0] >> 4 != 4 || outer[9] != 4 {
        return None;
    }
    let backend = Ipv4Addr::new(outer[16], outer[17], outer[18], outer[19]);
    let inner = &outer[(outer[0] & 0xf) as usize * 4..];
    if inner[0] >> 4 != 4 || inner[9] != 17 {
        return None;
    }
    let udp = &inner[(inner[0] & 0xf) as usize * 4..];
    let flow = Flow {
        src: Ipv4Addr::new(inner[12], inner[13], inner[14], inner[15]),
        vip: Ipv4Addr::new(inner[16], inner[17], inner[18], inner[19]),
        sport: u16::from_be_bytes([udp[0], udp[1]]),
        dport: u16::from_be_bytes([udp[2], udp[3]]),
    };
    let seq = u64::from_be_bytes(udp.get(8..16)?.try_into().ok()?);
    Some((flow, backend, seq))
}
