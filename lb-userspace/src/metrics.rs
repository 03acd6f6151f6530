//! The Prometheus endpoint (`GET /metrics` on `agent.metrics`, loopback by default), in
//! the Prometheus text format (prometheus-client encodes it). Every family has the `lb_`
//! prefix; counters end in `_total`; labels are `vip`, `backend`, `reason`, `state`.
//!
//! The data plane's counters (per-CPU, summed here) and the health state are read when
//! scraped; check latencies and state changes are counted as they happen.
use std::{
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::Histogram,
        MetricType,
    },
    registry::Registry,
};

use crate::{api::Counters, health::record::Availability};

/// Labels of one family member.
pub type Labels = Vec<(&'static str, String)>;

/// What the data plane and the health checks say at the moment of a scrape.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Every packet the `lb` program saw, by reason.
    pub reasons: Vec<(&'static str, u64)>,
    /// Health probes through the tunnel (`hc_encap`), by reason.
    pub probes: Vec<(&'static str, u64)>,
    pub vips: Vec<VipSnap>,
    pub backends: Vec<BackendSnap>,
    /// With `[bgp]`: the addresses announced now, and each neighbour's session (up or not).
    pub bgp: Option<BgpSnap>,
}

/// (announced addresses, (neighbour, session up) each).
pub type BgpSnap = (Vec<String>, Vec<(String, bool)>);

#[derive(Debug, Default)]
pub struct VipSnap {
    pub vip: String,
    pub counters: Counters,
    pub panic: bool,
    pub backups_serving: bool,
    /// Backends that pass their checks (or are not checked).
    pub healthy: u64,
    pub backends: u64,
}

#[derive(Debug, Default)]
pub struct BackendSnap {
    pub vip: String,
    pub backend: String,
    pub counters: Counters,
    /// Checked: up or down. `None`: not checked.
    pub up: Option<bool>,
    /// Takes new flows now (in the VIP's ring).
    pub in_ring: bool,
    pub availability: Option<Availability>,
}

/// Families updated as events happen, plus the scrape-time snapshot.
pub struct Metrics {
    registry: Registry,
    snapshot: Arc<Mutex<Snapshot>>,
    check_seconds: Family<Labels, Histogram>,
    changes: Family<Labels, Counter>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Buckets of the check latency histogram, seconds: 0.5 ms to 5 s.
const CHECK_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("lb");
        let check_seconds = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(CHECK_BUCKETS.iter().copied())
        });
        registry.register(
            "backend_check_duration_seconds",
            "How long health checks took (passed or failed)",
            check_seconds.clone(),
        );
        let changes = Family::<Labels, Counter>::default();
        registry.register(
            "backend_state_changes",
            "Health state changes of a backend, by the state it went to",
            changes.clone(),
        );
        let snapshot = Arc::new(Mutex::new(Snapshot::default()));
        registry.register_collector(Box::new(Scrape(snapshot.clone())));
        Metrics {
            registry,
            snapshot,
            check_seconds,
            changes,
        }
    }
}

impl Metrics {
    /// One health check took `latency`.
    pub fn checked(&self, vip: &str, backend: &str, latency: Duration) {
        self.check_seconds
            .get_or_create(&labels(vip, backend))
            .observe(latency.as_secs_f64());
    }

    /// A backend went up or down.
    pub fn changed(&self, vip: &str, backend: &str, up: bool) {
        let mut l = labels(vip, backend);
        l.push(("state", if up { "up" } else { "down" }.into()));
        self.changes.get_or_create(&l).inc();
    }

    /// The text of a scrape, with `snapshot` as the current state.
    pub fn render(&self, snapshot: Snapshot) -> String {
        *self.snapshot.lock().unwrap() = snapshot;
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

fn labels(vip: &str, backend: &str) -> Labels {
    vec![("vip", vip.to_string()), ("backend", backend.to_string())]
}

/// The scrape-time families.
#[derive(Debug)]
struct Scrape(Arc<Mutex<Snapshot>>);

/// Write one family: `name` of `ty`, a member per (labels, value).
fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    ty: MetricType,
    members: impl IntoIterator<Item = (Labels, M)>,
) -> fmt::Result {
    let mut e = enc.encode_descriptor(name, help, None, ty)?;
    for (l, m) in members {
        m.encode(e.encode_family(&l)?)?;
    }
    Ok(())
}

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

fn gauge(v: f64) -> ConstGauge<f64> {
    ConstGauge::new(v)
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = self.0.lock().unwrap();
        use MetricType::{Counter as C, Gauge as G};
        let reason = |r: &str| vec![("reason", r.to_string())];
        family(
            &mut enc,
            "packets",
            "Packets the lb program saw, by what it did with them and why",
            C,
            s.reasons.iter().map(|(r, n)| (reason(r), counter(*n))),
        )?;
        family(
            &mut enc,
            "health_probes",
            "Health probes sent through the tunnel (hc_encap), by outcome",
            C,
            s.probes.iter().map(|(r, n)| (reason(r), counter(*n))),
        )?;
        let vip = |v: &VipSnap| vec![("vip", v.vip.clone())];
        for (name, help, f) in [
            (
                "vip_packets",
                "Packets to the VIP",
                (|c: &Counters| c.packets) as fn(&Counters) -> u64,
            ),
            (
                "vip_bytes",
                "Bytes of the frames to the VIP",
                |c: &Counters| c.bytes,
            ),
            (
                "vip_new_flows",
                "Flows entered into the connection table (a connection's first packet after \
                 its SYN, a UDP flow's first datagram, a flow taken over from elsewhere)",
                |c: &Counters| c.new_flows,
            ),
        ] {
            family(
                &mut enc,
                name,
                help,
                C,
                s.vips.iter().map(|v| (vip(v), counter(f(&v.counters)))),
            )?;
        }
        for (name, help, f) in [
            (
                "vip_panic",
                "1 while fewer primaries pass than panic_threshold",
                (|v: &VipSnap| v.panic as u64 as f64) as fn(&VipSnap) -> f64,
            ),
            (
                "vip_backups_serving",
                "1 while no primary passes and the backups serve",
                |v: &VipSnap| v.backups_serving as u64 as f64,
            ),
            (
                "vip_healthy_backends",
                "Backends of the VIP that pass their checks",
                |v: &VipSnap| v.healthy as f64,
            ),
            ("vip_backends", "Backends of the VIP", |v: &VipSnap| {
                v.backends as f64
            }),
        ] {
            family(
                &mut enc,
                name,
                help,
                G,
                s.vips.iter().map(|v| (vip(v), gauge(f(v)))),
            )?;
        }
        if let Some((announced, sessions)) = &s.bgp {
            family(
                &mut enc,
                "bgp_announced",
                "1 for each VIP address this host announces by BGP (it has a healthy backend)",
                G,
                announced
                    .iter()
                    .map(|a| (vec![("address", a.clone())], gauge(1.0))),
            )?;
            family(
                &mut enc,
                "bgp_session_up",
                "1 while the BGP session with the neighbour is established",
                G,
                sessions
                    .iter()
                    .map(|(n, up)| (vec![("neighbor", n.clone())], gauge(*up as u64 as f64))),
            )?;
        }
        let be = |b: &BackendSnap| labels(&b.vip, &b.backend);
        for (name, help, f) in [
            (
                "backend_packets",
                "Packets forwarded to the backend (of this VIP)",
                (|c: &Counters| c.packets) as fn(&Counters) -> u64,
            ),
            (
                "backend_bytes",
                "Bytes forwarded to the backend",
                |c: &Counters| c.bytes,
            ),
            (
                "backend_new_flows",
                "New flows given to the backend",
                |c: &Counters| c.new_flows,
            ),
        ] {
            family(
                &mut enc,
                name,
                help,
                C,
                s.backends.iter().map(|b| (be(b), counter(f(&b.counters)))),
            )?;
        }
        family(
            &mut enc,
            "backend_up",
            "1 if the backend passes its health checks (0 down); unchecked backends are absent",
            G,
            s.backends
                .iter()
                .filter_map(|b| Some((be(b), gauge(b.up? as u64 as f64)))),
        )?;
        family(
            &mut enc,
            "backend_in_ring",
            "1 if the backend takes new flows now",
            G,
            s.backends
                .iter()
                .map(|b| (be(b), gauge(b.in_ring as u64 as f64))),
        )?;
        let avail = |f: fn(&Availability) -> Option<f64>| {
            s.backends
                .iter()
                .filter_map(move |b| Some((be(b), gauge(f(b.availability.as_ref()?)?))))
        };
        family(
            &mut enc,
            "backend_availability",
            "A = MTBF / (MTBF + MTTR) since the agent started (the share of time up)",
            G,
            avail(|a| Some(a.availability)),
        )?;
        family(
            &mut enc,
            "backend_mtbf_seconds",
            "Mean time between failures since the agent started",
            G,
            avail(|a| a.mtbf_s),
        )?;
        family(
            &mut enc,
            "backend_mttr_seconds",
            "Mean time to repair since the agent started",
            G,
            avail(|a| a.mttr_s),
        )?;
        let failures = s
            .backends
            .iter()
            .filter_map(|b| Some((be(b), counter(b.availability.as_ref()?.failures))));
        family(
            &mut enc,
            "backend_failures",
            "Times the backend went down since the agent started",
            C,
            failures,
        )?;
        Ok(())
    }
}
