//! Answering the CLI: one [`Request`] in, one [`Response`] out. Changes go through
//! [`Agent::apply`] (validate, apply, persist); queries read the config and the maps.
use anyhow::{anyhow, bail, Result};
use serde_json::json;

use super::{
    pins::{self, pin_dir},
    Agent,
};
use crate::{
    api::{Request, Response},
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
            } => {
                cfg.backend_mut(vip, address)?.drain = *drain;
            }
            _ => unreachable!("not a mutation"),
        }
        self.apply(cfg, true, "cli")
    }

    fn backend_id(&self, vip: &crate::config::VipConfig, addr: &std::net::IpAddr) -> Option<u32> {
        self.applied.member_id(&reconcile::vip_key(vip), addr)
    }

    pub fn handle(&mut self, req: Request) -> Response {
        if req.mutates() {
            return match self.mutate(&req) {
                Ok(c) => Response::ok(json!({ "rings_rebuilt": c.rings_rebuilt })),
                Err(e) => Response::err(format!("{e:#}")),
            };
        }
        let r: Result<serde_json::Value> = (|| {
            Ok(match &req {
                Request::VipList => json!(self
                    .cfg
                    .vips
                    .iter()
                    .map(|v| json!({
                        "name": v.name, "address": v.address, "port": v.port,
                        "protocol": v.protocol, "forwarding": v.forwarding, "affinity": v.affinity,
                        "backends": v.backends.len(),
                        "active": v.backends.iter().filter(|b| b.active()).count(),
                    }))
                    .collect::<Vec<_>>()),
                Request::BackendList { vip } => {
                    if let Some(n) = vip {
                        self.cfg
                            .vip(n)
                            .ok_or_else(|| anyhow!("vip[{n}]: no such VIP"))?;
                    }
                    let mut out = Vec::new();
                    for v in self
                        .cfg
                        .vips
                        .iter()
                        .filter(|v| vip.as_ref().is_none_or(|n| &v.name == n))
                    {
                        for b in &v.backends {
                            out.push(json!({
                                "vip": v.name, "address": b.address, "weight": b.weight,
                                "drain": b.drain, "mac": b.mac, "id": self.backend_id(v, &b.address),
                            }));
                        }
                    }
                    json!(out)
                }
                Request::Status => {
                    let prog = self.dp.program("lb")?.info()?;
                    json!({
                        "instance": self.instance,
                        "config": self.config_path,
                        "interface": pins::attached_interface(&pin_dir(&self.instance))?,
                        "xdp_mode": self.cfg.agent.xdp_mode,
                        "program_id": prog.id(),
                        "adopted": self.start != super::Start::Fresh,
                        "start": self.start,
                        "mtu": self.mtu,
                        "vips": self.cfg.vips.len(),
                        "backends": self.applied.members.len(),
                        "pins": pin_dir(&self.instance),
                    })
                }
                Request::Stats => {
                    let reasons = self.dp.reason_counts()?;
                    let reasons: serde_json::Map<String, serde_json::Value> =
                        lb_common::Reason::ALL
                            .iter()
                            .map(|r| (r.name().to_string(), json!(reasons[*r as usize])))
                            .collect();
                    let mut vips = Vec::new();
                    for v in &self.cfg.vips {
                        if let Some(a) = self.applied.vips.get(&reconcile::vip_key(v)) {
                            let c = self.dp.vip_counters(a.meta.id)?;
                            vips.push(json!({"name": v.name, "packets": c.packets, "bytes": c.bytes, "new_flows": c.new_flows}));
                        }
                    }
                    let mut backends = Vec::new();
                    for v in &self.cfg.vips {
                        for b in &v.backends {
                            if let Some(id) = self.backend_id(v, &b.address) {
                                let c = self.dp.backend_counters(id)?;
                                backends.push(json!({"vip": v.name, "address": b.address, "id": id, "packets": c.packets, "bytes": c.bytes, "new_flows": c.new_flows}));
                            }
                        }
                    }
                    json!({"reasons": reasons, "vips": vips, "backends": backends})
                }
                Request::Shutdown => json!({}),
                _ => unreachable!(),
            })
        })();
        match r {
            Ok(d) => Response::ok(d),
            Err(e) => Response::err(format!("{e:#}")),
        }
    }
}
