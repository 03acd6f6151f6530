//! `lb`: the load balancer's agent (`lb agent`) and the CLI that manages it.
use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use lb_userspace::{
    agent,
    api::{self, Request},
    config::{BackendConfig, Forwarding, MacAddr, Protocol, VipConfig, DEFAULT_WEIGHT},
};
use serde_json::Value;

#[derive(Parser)]
#[command(name = "lb", about = "XDP layer-4 load balancer: agent and CLI")]
struct Cli {
    /// Which agent: pins live under /sys/fs/bpf/NAME, the socket is /run/lb/NAME.sock.
    #[arg(long, global = true, default_value = "lb")]
    instance: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent in the foreground (or, with --stop, detach and unpin everything).
    Agent {
        #[arg(long, required_unless_present = "stop")]
        config: Option<PathBuf>,
        /// Enter this network namespace (/run/netns/NAME) first.
        #[arg(long)]
        netns: Option<String>,
        /// Stop a running agent, detach the XDP program and remove every pin.
        #[arg(long)]
        stop: bool,
    },
    /// Manage VIPs.
    Vip {
        #[command(subcommand)]
        cmd: VipCmd,
    },
    /// Manage backends of a VIP.
    Backend {
        #[command(subcommand)]
        cmd: BackendCmd,
    },
    /// What the agent runs.
    Status,
    /// Counters: drop/pass reasons, per VIP, per backend.
    Stats,
}

#[derive(Subcommand)]
enum VipCmd {
    Add {
        name: String,
        address: IpAddr,
        port: u16,
        #[arg(value_enum)]
        protocol: Protocol,
        #[arg(long, value_enum, default_value_t = Forwarding::Ipip)]
        forwarding: Forwarding,
        /// Send every flow of a client to one backend.
        #[arg(long)]
        affinity: bool,
    },
    Remove {
        name: String,
    },
    List,
}

#[derive(Subcommand)]
enum BackendCmd {
    Add {
        vip: String,
        address: IpAddr,
        #[arg(long, default_value_t = DEFAULT_WEIGHT)]
        weight: u32,
        #[arg(long)]
        mac: Option<MacAddr>,
        #[arg(long)]
        drain: bool,
    },
    Remove {
        vip: String,
        address: IpAddr,
    },
    List {
        vip: Option<String>,
    },
    /// Set the weight (0 takes no new flows).
    Weight {
        vip: String,
        address: IpAddr,
        weight: u32,
    },
    /// Keep established flows, send no new ones.
    Drain {
        vip: String,
        address: IpAddr,
    },
    Undrain {
        vip: String,
        address: IpAddr,
    },
}

fn table(rows: &[Value], cols: &[&str]) {
    let cell = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        v => v.to_string(),
    };
    let widths: Vec<usize> = cols
        .iter()
        .map(|c| {
            rows.iter()
                .map(|r| cell(&r[c]).len())
                .chain([c.len()])
                .max()
                .unwrap()
        })
        .collect();
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(cols.iter().map(|c| c.to_uppercase()).collect());
    for r in rows {
        line(cols.iter().map(|c| cell(&r[c])).collect());
    }
}

fn print(req: &Request, data: &Value, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(data).unwrap());
        return;
    }
    match req {
        Request::VipList => table(
            data.as_array().unwrap_or(&vec![]),
            &[
                "name",
                "address",
                "port",
                "protocol",
                "forwarding",
                "affinity",
                "backends",
                "active",
            ],
        ),
        Request::BackendList { .. } => table(
            data.as_array().unwrap_or(&vec![]),
            &["vip", "address", "weight", "drain", "mac", "id"],
        ),
        Request::Status => {
            if let Some(m) = data.as_object() {
                for (k, v) in m {
                    println!(
                        "{k:<12} {}",
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string())
                    );
                }
            }
        }
        Request::Stats => {
            println!("reasons:");
            if let Some(m) = data["reasons"].as_object() {
                for (k, v) in m {
                    println!("  {k:<24} {v}");
                }
            }
            println!("\nvips:");
            table(
                data["vips"].as_array().unwrap_or(&vec![]),
                &["name", "packets", "bytes", "new_flows"],
            );
            println!("\nbackends:");
            table(
                data["backends"].as_array().unwrap_or(&vec![]),
                &["address", "id", "packets", "bytes", "new_flows"],
            );
        }
        _ => println!("ok"),
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let req = match cli.cmd {
        Cmd::Agent {
            config,
            netns,
            stop,
        } => {
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .init();
            agent::require_root()?;
            if let Some(ns) = netns {
                agent::enter_netns(&ns)?;
            }
            if stop {
                return agent::stop(&cli.instance);
            }
            return agent::run(&config.expect("clap requires it"), &cli.instance);
        }
        Cmd::Vip { cmd } => match cmd {
            VipCmd::Add {
                name,
                address,
                port,
                protocol,
                forwarding,
                affinity,
            } => Request::VipAdd {
                vip: VipConfig {
                    name,
                    address,
                    port,
                    protocol,
                    forwarding,
                    affinity,
                    backends: vec![],
                },
            },
            VipCmd::Remove { name } => Request::VipRemove { name },
            VipCmd::List => Request::VipList,
        },
        Cmd::Backend { cmd } => match cmd {
            BackendCmd::Add {
                vip,
                address,
                weight,
                mac,
                drain,
            } => Request::BackendAdd {
                vip,
                backend: BackendConfig {
                    address,
                    weight,
                    drain,
                    mac,
                },
            },
            BackendCmd::Remove { vip, address } => Request::BackendRemove { vip, address },
            BackendCmd::List { vip } => Request::BackendList { vip },
            BackendCmd::Weight {
                vip,
                address,
                weight,
            } => Request::BackendWeight {
                vip,
                address,
                weight,
            },
            BackendCmd::Drain { vip, address } => Request::BackendDrain {
                vip,
                address,
                drain: true,
            },
            BackendCmd::Undrain { vip, address } => Request::BackendDrain {
                vip,
                address,
                drain: false,
            },
        },
        Cmd::Status => Request::Status,
        Cmd::Stats => Request::Stats,
    };
    let resp = api::call(&cli.instance, &req)?;
    if !resp.ok {
        bail!("{}", resp.error.unwrap_or_else(|| "failed".into()));
    }
    print(&req, &resp.data, cli.json);
    Ok(())
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: {e:#}");
            ExitCode::FAILURE
        }
    }
}
