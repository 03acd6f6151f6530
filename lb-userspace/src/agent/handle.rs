//! Answering the CLI: one [`Request`] in, one [`Response`] out. Changes go through
//! [`Agent::apply`] (validate, apply, persist); queries read the config and the maps.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use anyhow::{anyhow, bail, Result};

use super::{
    pins::{self, pin_dir},
    Agent,
};
use crate::{
    api::{
        BackendRow, BackendState, BackendStats, Changed, Conns, Counters, HealthRow, Reply,
        Request, Response, Stats, Status, VipBackendStats, VipRow, VipStats,
    },
    reconcile::{self, Changes},
};

impl Agent {
    fn mutate(&mut self, req: &Request) -> Result<Changes> {
        let mut cfg = self.cfg.clone();
        let no_vip = |n: &str| anyhow!("vip[{n}]: no such VIP");
        match req {
            Request::VipAdd { vip } => {
                if cfg.vip(&vip.name).is_some() {
                    bail!("vip[{}].name: a VIP of that name exists", vip.name);
                }
                cfg.vips.push(vip.clone());
            }
            Request::VipRemove { name } => {
                let before = cfg.vips.len();
                cfg.vips.retain(|v| &v.name != name);
                if cfg.vips.len() == before {
                    return Err(no_vip(name));
                }
            }
            Request::BackendAdd { vip, backend } => {
                cfg.vip_mut(vip)
                    .ok_or_else(|| no_vip(vip))?
                    .backends
                    .push(backend.clone());
            }
            Request::BackendRemove { vip, address } => {
                let v = cfg.vip_mut(vip).ok_or_else(|| no_vip(vip))?;
                let before = v.backends.len();
                v.backends.retain(|b| &b.address != address);
                if v.backends.len() == before {
                    bail!("vip[{vip}].backends: no backend {address}");
                }
            }
            Request::BackendWeight {
                vip,
                address,
                weight,
            } => {
                cfg.backend_mut(vip, address)?.weight = *weight;
            }
            Request::BackendDrain {
                vip,
                address,
                drain,
                timeout_s,
            } => {
                let b = cfg.backend_mut(vip, address)?;
                b.drain = *drain;
                b.drain_until = match (drain, timeout_s) {
                    (true, Some(t)) => Some(unix_now() + u64::from(*t)),
                    _ => None,
                };
            }
            _ => unreachable!("not a mutation"),
        }
        self.apply(cfg, true, "cli")
    }

    fn backend_id(&self, vip: &crate::config::VipConfig, addr: &std::net::IpAddr) -> Option<u32> {
        self.applied.member_id(&reconcile::vip_key(vip), addr)
    }

    pub fn handle(&mut self, req: Request) -> Response {
        let reply = if req.mutates() {
            self.mutate(&req).map(|c| {
                Reply::Changed(Changed {
                    rings_rebuilt: c.rings_rebuilt,
                })
            })
        } else {
            self.query(&req)
        };
        match reply {
            Ok(r) => Response::ok(&r),
            Err(e) => Response::err(format!("{e:#}")),
        }
    }

    fn query(&mut self, req: &Request) -> Result<Reply> {
        Ok(match req {
            Request::VipList => Reply::Vips(
                self.cfg
                    .vips
                    .iter()
                    .map(|v| VipRow {
                        name: v.name.clone(),
                        address: v.address,
                        port: v.port,
                        protocol: v.protocol,
                        forwarding: v.forwarding,
                        mode: v.mode,
                        affinity: v.affinity,
                        backends: v.backends.len(),
                        active: v.backends.iter().filter(|b| b.active()).count(),
                    })
                    .collect(),
            ),
            Request::BackendList { vip } => {
                if let Some(n) = vip {
                    self.cfg
                        .vip(n)
                        .ok_or_else(|| anyhow!("vip[{n}]: no such VIP"))?;
                }
                let vips = self.cfg.vips.iter();
                let vips = vips.filter(|v| vip.as_ref().is_none_or(|n| &v.name == n));
                Reply::Backends(
                    vips.flat_map(|v| {
                        v.backends.iter().map(|b| BackendRow {
                            vip: v.name.clone(),
                            address: b.address,
                            weight: b.weight,
                            drain: b.drain,
                            mac: b.mac,
                            id: self.backend_id(v, &b.address),
                            next_hop: self
                                .applied
                                .members
                                .get(&(reconcile::vip_key(v), b.address))
                                .map(|(_, be)| be.mac)
                                .filter(|m| *m != [0; 6])
                                .map(crate::config::MacAddr),
                            unresolved: self.view.unresolved.get(&b.address).cloned(),
                            state: self.state_of(v, b),
                            drain_left_s: b.drain_until.map(|t| t.saturating_sub(unix_now())),
                        })
                    })
                    .collect(),
                )
            }
            Request::Status => Reply::Status(Status {
                instance: self.instance.clone(),
                config: self.config_path.clone(),
                // The kernel's word, not the config's: where the program really runs.
                interface: pins::attached_interface(&pin_dir(&self.instance))?
                    .unwrap_or_else(|| "(none)".into()),
                xdp_mode: self.cfg.agent.xdp_mode,
                program_id: self.dp.program("lb")?.info()?.id(),
                adopted: self.start != super::Start::Fresh,
                start: self.start,
                mtu: self.mtu,
                vips: self.cfg.vips.len(),
                backends: self.applied.members.len(),
                pins: pin_dir(&self.instance),
                health: self.health_rows(),
                modes: self
                    .modes
                    .iter()
                    .filter(|(_, m)| m.panic || m.backups)
                    .map(|(k, m)| (k.clone(), *m))
                    .collect(),
                bgp: self.bgp_status(),
            }),
            Request::Events { .. } => Reply::Events(self.events.recent()),
            Request::Stats => Reply::Stats(self.stats()?),
            Request::Shutdown => Reply::Done {},
            _ => unreachable!("a change"),
        })
    }

    /// A backend's state in words, from what the agent runs (`eff`).
    fn state_of(
        &self,
        v: &crate::config::VipConfig,
        b: &crate::config::BackendConfig,
    ) -> BackendState {
        if self.view.unresolved.contains_key(&b.address) {
            return BackendState::Unresolved;
        }
        let ran = self
            .eff
            .vip(&v.name)
            .and_then(|v| v.backends.iter().find(|x| x.address == b.address));
        match ran {
            Some(r) if r.down => BackendState::Down,
            Some(r) if b.backup && r.drain && !b.drain => BackendState::Backup,
            _ => BackendState::of(b),
        }
    }

    /// Every checked backend: state, why, last check, availability.
    pub(super) fn bgp_status(&self) -> Option<crate::api::BgpStatus> {
        let (c, s) = (self.cfg.bgp.as_ref()?, self.bgp.as_ref()?);
        let sessions = s.sessions();
        Some(crate::api::BgpStatus {
            local_asn: c.local_asn,
            next_hop: c.next_hop,
            announced: s.announced().iter().copied().collect(),
            sessions: c
                .neighbors
                .iter()
                .map(|n| {
                    let name = crate::bgp::session_name(n.address);
                    let (state, info) = sessions
                        .iter()
                        .find(|x| x.0 == name)
                        .map_or(("?".into(), "BIRD does not answer".into()), |x| {
                            (x.1.clone(), x.2.clone())
                        });
                    crate::api::BgpSession {
                        name,
                        neighbor: n.address,
                        state,
                        info,
                    }
                })
                .collect(),
        })
    }

    fn health_rows(&self) -> Vec<HealthRow> {
        let now = std::time::Instant::now();
        let ms = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        };
        self.health
            .iter()
            .map(|((vip, addr), h)| {
                let check = self
                    .cfg
                    .vip(vip)
                    .and_then(|v| {
                        let b = v.backends.iter().find(|b| b.address == *addr)?;
                        crate::config::health::check_of(v, b, "").ok()
                    })
                    .map_or(String::new(), |c| format!("{} via {}", c.kind, c.via));
                HealthRow {
                    vip: vip.clone(),
                    backend: *addr,
                    state: if h.up { "up" } else { "down" }.into(),
                    since_ms: ms(h.since_wall),
                    reason: h.reason.clone(),
                    check,
                    last_ok: h.last.as_ref().map(|l| l.0),
                    last_ms: h.last.as_ref().map(|l| l.1.as_secs_f64() * 1000.0),
                    last_error: h.last.as_ref().map(|l| l.2.clone()).unwrap_or_default(),
                    checks: h.checks,
                    failed_checks: h.failed_checks,
                    availability: h.availability(now),
                }
            })
            .collect()
    }

    fn stats(&self) -> Result<Stats> {
        let counts = self.dp.reason_counts()?;
        let reasons = lb_common::Reason::ALL
            .iter()
            .map(|r| (r.name().to_string(), counts[*r as usize]))
            .collect();
        let conns = self.conns()?;
        let mut vips = Vec::new();
        for v in &self.cfg.vips {
            let Some(applied) = self.applied.vips.get(&reconcile::vip_key(v)) else {
                continue;
            };
            let vip_id = applied.meta.id;
            let mut backends = Vec::new();
            for b in &v.backends {
                let id = self.backend_id(v, &b.address);
                let counters = match id {
                    Some(id) => self.dp.backend_counters(id)?.into(),
                    None => Counters::default(),
                };
                backends.push(VipBackendStats {
                    address: b.address,
                    id,
                    weight: b.weight,
                    state: self.state_of(v, b),
                    counters,
                    conns: id
                        .and_then(|id| conns.get(&id))
                        .copied()
                        .unwrap_or_default(),
                });
            }
            vips.push(VipStats {
                name: v.name.clone(),
                address: v.address,
                port: v.port,
                protocol: v.protocol,
                counters: self.dp.vip_counters(vip_id)?.into(),
                backends,
            });
        }
        // Every address once, over all the VIPs it serves.
        let mut by_addr: BTreeMap<IpAddr, (u32, Counters)> = BTreeMap::new();
        for ((_, addr), (id, _)) in &self.applied.members {
            let c: Counters = self.dp.backend_counters(*id)?.into();
            let e = by_addr.entry(*addr).or_insert((*id, Counters::default()));
            e.0 = e.0.min(*id);
            e.1.packets += c.packets;
            e.1.bytes += c.bytes;
            e.1.new_flows += c.new_flows;
        }
        let backends = by_addr
            .into_iter()
            .map(|(address, (id, counters))| BackendStats {
                address,
                id,
                counters,
            })
            .collect();
        Ok(Stats {
            reasons,
            vips,
            backends,
        })
    }

    /// Connections by backend id, from the connection table: *active* while no FIN or RST
    /// was seen and the last packet is younger than IPVS's default timeouts (TCP
    /// established 900 s, UDP 300 s), else *inactive*. Entries that no longer hold (their
    /// backend left their VIP) are not counted.
    fn conns(&self) -> Result<HashMap<u32, Conns>> {
        let live: HashMap<u32, u32> = self
            .applied
            .members
            .values()
            .map(|(id, be)| (*id, be.vip))
            .collect();
        let now = crate::migrate::coarse_now();
        let mut out: HashMap<u32, Conns> = HashMap::new();
        for (k, c) in self.dp.read_conns()? {
            if live.get(&c.backend) != Some(&(c.vip as u32)) {
                continue;
            }
            let window = if k.proto == lb_common::PROTO_TCP {
                ACTIVE_TCP
            } else {
                ACTIVE_UDP
            };
            let open = c.flags & lb_common::CONN_F_CLOSING == 0;
            let e = out.entry(c.backend).or_default();
            if open && now.saturating_sub(c.atime) < window.as_nanos() as u64 {
                e.active += 1;
            } else {
                e.inactive += 1;
            }
        }
        Ok(out)
    }
}

/// How long an open TCP connection counts as active since its last packet (IPVS's
/// default established timeout).
pub const ACTIVE_TCP: std::time::Duration = std::time::Duration::from_secs(900);
/// The same for UDP (IPVS's default UDP timeout).
pub const ACTIVE_UDP: std::time::Duration = std::time::Duration::from_secs(300);

/// Unix time, seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
