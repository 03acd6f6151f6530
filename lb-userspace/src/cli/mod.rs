//! The `lb` command line: `lb agent` runs the agent, every other command sends one
//! [`Request`] to a running agent and prints its typed reply as a table ([`tables`])
//! or, with `--json`, as JSON.
use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};

use lb_userspace::{
    agent,
    api::{self, Request},
    config::{BackendConfig, Forwarding, MacAddr, Protocol, VipConfig, DEFAULT_WEIGHT},
};

mod tables;

#[derive(Parser)]
#[command(name = "lb", about = "XDP layer-4 load balancer: agent and CLI")]
pub struct Cli {
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

impl Cmd {
    /// The request to the agent that this command is.
    fn request(self) -> Request {
        match self {
            Cmd::Agent { .. } => unreachable!("the agent is no request"),
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
        }
    }
}

fn run_agent(
    config: Option<PathBuf>,
    netns: Option<String>,
    stop: bool,
    instance: &str,
) -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    agent::require_root()?;
    if let Some(ns) = netns {
        agent::enter_netns(&ns)?;
    }
    if stop {
        return agent::stop(instance);
    }
    agent::run(&config.expect("clap requires it"), instance)
}

fn run(cli: Cli) -> Result<()> {
    if let Cmd::Agent {
        config,
        netns,
        stop,
    } = cli.cmd
    {
        return run_agent(config, netns, stop, &cli.instance);
    }
    let req = cli.cmd.request();
    let reply = api::request(&cli.instance, &req)?;
    let out = if cli.json {
        tables::json(&reply)
    } else {
        tables::human(&reply)
    };
    print!("{out}");
    Ok(())
}

/// `lb`'s `main`.
pub fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: {e:#}");
            ExitCode::FAILURE
        }
    }
}
