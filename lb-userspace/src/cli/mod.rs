//! The `lb` command line: `lb agent` runs the agent, every other command sends one
//! [`Request`] to a running agent and prints its typed reply as a table ([`tables`])
//! or, with `--json`, as JSON.
use std::{
    io::{IsTerminal, Write},
    net::IpAddr,
    path::PathBuf,
    process::ExitCode,
};

use anyhow::Result;
use clap::{Parser, Subcommand};

use lb_userspace::{
    agent,
    api::{self, Reply, Request},
    config::{
        BackendConfig, CheckKind, Forwarding, HealthSpec, MacAddr, Mode, Protocol, Via, VipConfig,
        DEFAULT_WEIGHT,
    },
};

mod tables;

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "XDP layer-4 load balancer: agent and CLI",
    after_help = "Every command but `agent` talks to a running agent over its socket; \
                  changes are validated, applied, then written to the agent's config file."
)]
pub struct Cli {
    /// Which agent: pins live under /sys/fs/bpf/NAME, the socket is /run/lb/NAME.sock.
    #[arg(long, global = true, default_value = "lb", value_name = "NAME")]
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
        /// The config file (TOML); CLI changes are written back to it.
        #[arg(long, required_unless_present = "stop", value_name = "PATH")]
        config: Option<PathBuf>,
        /// Enter this network namespace (/run/netns/NAME) first.
        #[arg(long, value_name = "NAME")]
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
    /// Counters: per VIP and its backends (with connections), drop/pass reasons.
    Stats {
        /// Live rates (per second) per VIP and backend, refreshed every second in place,
        /// until interrupted.
        #[arg(long, short)]
        watch: bool,
    },
    /// State changes: backends up and down (with why), next hops, panic and backup modes.
    Events {
        /// Then every new one as it happens, until interrupted.
        #[arg(long, short)]
        follow: bool,
    },
}

#[derive(Subcommand)]
enum VipCmd {
    /// Add a VIP without backends (add them with `lb backend add`).
    Add {
        /// Its name in the config and the CLI: 1-64 of [A-Za-z0-9-_.].
        name: String,
        /// The virtual IP address (IPv4 or IPv6).
        address: IpAddr,
        /// The port clients connect to.
        port: u16,
        /// The transport protocol.
        #[arg(value_enum)]
        protocol: Protocol,
        /// How packets reach the backends [default: ipip; gue with --mode stateless].
        #[arg(long, value_enum)]
        forwarding: Option<Forwarding>,
        /// conntrack (a connection table on the LB) or stateless (second chance on the
        /// backends; TCP over gue only).
        #[arg(long, value_enum, default_value_t = Mode::Conntrack)]
        mode: Mode,
        /// Send every flow of a client to one backend.
        #[arg(long)]
        affinity: bool,
        /// Health check of its backends (default: tcp for a TCP VIP, none for UDP).
        #[arg(long, value_enum)]
        check: Option<CheckKind>,
        /// Probes through the tunnel, as client traffic goes (default), or straight to
        /// the backend's address (for backends that do not run decap).
        #[arg(long, value_enum)]
        via: Option<Via>,
        /// Port to probe (default: the VIP's).
        #[arg(long)]
        check_port: Option<u16>,
        /// HTTP check: the path to GET (default /).
        #[arg(long)]
        check_path: Option<String>,
        /// Time between checks (default 2000; the timeout defaults to it).
        #[arg(long)]
        check_interval_ms: Option<u32>,
        /// Below this percentage of healthy backends, spread over all of them (1-100).
        #[arg(long)]
        panic_threshold: Option<u8>,
        /// Ramp a returning backend up to its weight over this many seconds.
        #[arg(long)]
        slow_start_s: Option<u32>,
    },
    /// Remove a VIP with its backends.
    Remove {
        /// The VIP's name.
        name: String,
    },
    /// List the VIPs.
    List,
}

#[derive(Subcommand)]
enum BackendCmd {
    /// Add a backend to a VIP.
    Add {
        /// The VIP's name.
        vip: String,
        /// The backend's address.
        address: IpAddr,
        /// Share of new flows relative to the VIP's other backends (0-10000; 0 takes none).
        #[arg(long, default_value_t = DEFAULT_WEIGHT)]
        weight: u32,
        /// Next-hop MAC override, aa:bb:cc:dd:ee:ff (default: found from routes/neighbours).
        #[arg(long)]
        mac: Option<MacAddr>,
        /// Add it draining: it gets no new flows.
        #[arg(long)]
        drain: bool,
        /// A backup: new flows only while every primary backend of the VIP is down.
        #[arg(long)]
        backup: bool,
    },
    /// Remove a backend from a VIP; its flows go to the VIP's other backends.
    Remove {
        /// The VIP's name.
        vip: String,
        /// The backend's address.
        address: IpAddr,
    },
    /// List the backends of one VIP, or of all.
    List {
        /// Only this VIP's backends.
        vip: Option<String>,
    },
    /// Set the weight (0 takes no new flows).
    Weight {
        /// The VIP's name.
        vip: String,
        /// The backend's address.
        address: IpAddr,
        /// The new weight, 0-10000.
        weight: u32,
    },
    /// Keep established flows, send no new ones.
    Drain {
        /// The VIP's name.
        vip: String,
        /// The backend's address.
        address: IpAddr,
        /// Remove it from the VIP this many seconds from now (its remaining connections
        /// then move to the other backends); without: drained until `undrain`.
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u32>,
    },
    /// Take new flows again after `drain`.
    Undrain {
        /// The VIP's name.
        vip: String,
        /// The backend's address.
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
                    mode,
                    affinity,
                    check,
                    via,
                    check_port,
                    check_path,
                    check_interval_ms,
                    panic_threshold,
                    slow_start_s,
                } => {
                    let health = HealthSpec {
                        kind: check,
                        via,
                        port: check_port,
                        path: check_path,
                        interval_ms: check_interval_ms,
                        ..Default::default()
                    };
                    Request::VipAdd {
                        vip: VipConfig {
                            name,
                            address,
                            port,
                            protocol,
                            forwarding: forwarding.unwrap_or(match mode {
                                Mode::Stateless => Forwarding::Gue,
                                Mode::Conntrack => Forwarding::Ipip,
                            }),
                            mode,
                            affinity,
                            health: (health != HealthSpec::default()).then_some(health),
                            panic_threshold,
                            slow_start_s: slow_start_s.unwrap_or_default(),
                            ..Default::default()
                        },
                    }
                }
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
                    backup,
                } => Request::BackendAdd {
                    vip,
                    backend: BackendConfig {
                        address,
                        weight,
                        drain,
                        mac,
                        backup,
                        ..Default::default()
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
                BackendCmd::Drain {
                    vip,
                    address,
                    timeout,
                } => Request::BackendDrain {
                    vip,
                    address,
                    drain: true,
                    timeout_s: timeout,
                },
                BackendCmd::Undrain { vip, address } => Request::BackendDrain {
                    vip,
                    address,
                    drain: false,
                    timeout_s: None,
                },
            },
            Cmd::Status => Request::Status,
            Cmd::Stats { .. } => Request::Stats,
            Cmd::Events { follow } => Request::Events { follow },
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
        // Colour codes only for a terminal, not in a log file or journal.
        .with_ansi(std::io::stderr().is_terminal())
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
    if let Cmd::Stats { watch: true } = cli.cmd {
        return watch_stats(&cli.instance);
    }
    let req = cli.cmd.request();
    if let Request::Events { follow: true } = req {
        let json = cli.json;
        return api::follow(&cli.instance, &req, |reply, event| {
            let out = match (reply, event) {
                (Some(r), _) if json => tables::json(r),
                (Some(r), _) => tables::human(r),
                (None, Some(e)) if json => serde_json::to_string(e).unwrap_or_default() + "\n",
                (None, Some(e)) => tables::event_line(e),
                _ => String::new(),
            };
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(out.as_bytes())?;
            stdout.flush()?;
            Ok(())
        });
    }
    let reply = api::request(&cli.instance, &req)?;
    let out = if cli.json {
        tables::json(&reply)
    } else {
        tables::human(&reply)
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(out.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// `lb stats --watch`: every second, the rates since the last second, in place.
fn watch_stats(instance: &str) -> Result<()> {
    let tty = std::io::stdout().is_terminal();
    let mut last: Option<(std::time::Instant, lb_userspace::api::Stats)> = None;
    loop {
        let Reply::Stats(now) = api::request(instance, &Request::Stats)? else {
            anyhow::bail!("the agent answered something else than stats");
        };
        let t = std::time::Instant::now();
        if let Some((t0, prev)) = &last {
            let out = tables::rates(prev, &now, t.duration_since(*t0));
            let mut stdout = std::io::stdout().lock();
            if tty {
                stdout.write_all(b"\x1b[H\x1b[2J")?;
            }
            stdout.write_all(out.as_bytes())?;
            if !tty {
                stdout.write_all(b"\n")?;
            }
            stdout.flush()?;
        }
        last = Some((t, now));
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// `lb`'s `main`.
pub fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        // Whoever reads our output stopped reading (`lb backend list | head -1`): not
        // an error of ours, and the answer was received.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "lb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every command and every argument says what it is in `--help`.
    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for sub in cmd.get_subcommands() {
                let at = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(at.clone());
                }
                walk(sub, &at, missing);
            }
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() {
                    missing.push(format!("{path} <{id}>"));
                }
            }
        }
        let mut missing = Vec::new();
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        walk(&cmd, "lb", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }

    #[test]
    fn version() {
        let e = Cli::try_parse_from(["lb", "--version"]).err().unwrap();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayVersion);
        assert_eq!(e.to_string(), format!("lb {}\n", env!("CARGO_PKG_VERSION")));
        let e = Cli::try_parse_from(["lb", "-V"]).err().unwrap();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayVersion);
    }
}
