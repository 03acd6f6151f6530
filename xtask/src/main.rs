//! `cargo xtask`: the project's entry points. `setup` installs what a fresh machine lacks,
//! `test` runs the whole suite (what CI runs), `bench` prints the benchmark tables,
//! `testbed up|down` builds / removes the namespace testbed.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and benchmark the load balancer")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install Debian's rustc-web, LLVM and bpf-linker if missing (idempotent).
    Setup,
    /// Set up, then run every test (unit, BPF_PROG_TEST_RUN, namespaces). Needs root.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Set up, then show the data plane at work on an embedded default configuration.
    Demo,
    /// Set up, build, then run the data-plane and control-plane benchmarks (print tables).
    /// Extra arguments go to the data-plane benchmark (CPU, number of flows).
    Bench {
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// The namespace testbed (client, LB on a stick, backends with servers, a bridge),
    /// left running: `up` builds it and prints how to use it, `down` removes it.
    Testbed {
        #[command(subcommand)]
        cmd: TestbedCmd,
    },
}

#[derive(Subcommand)]
enum TestbedCmd {
    /// Set up, build, then build the testbed, start the agent with a TCP and a UDP VIP per
    /// forwarding path, and print namespaces, addresses, VIPs and commands to try.
    Up {
        /// Everything it makes is named `<prefix>-...`.
        #[arg(long, default_value = "lbtb")]
        prefix: String,
        #[arg(long, default_value_t = 3)]
        backends: usize,
    },
    /// Remove everything named `<prefix>-...`: processes, XDP programs and pins,
    /// namespaces, sockets, files (also what a crashed run left).
    Down {
        #[arg(long, default_value = "lbtb")]
        prefix: String,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn setup() -> Result<()> {
    if unsafe { libc_geteuid() } != 0 {
        bail!("run as root: loading XDP programs and creating namespaces needs it");
    }
    run(Command::new("bash").arg(root().join("scripts/setup.sh")))
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// `cargo test` over the workspace, its output passed through, then one closing line with
/// the totals of every test binary (cargo prints one `test result:` per binary, many of
/// them for targets without tests).
fn test(cargo: &str, args: &[String]) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(cargo)
        .current_dir(root())
        .args([
            "test",
            "--workspace",
            "--release",
            "--no-fail-fast",
            "--lib",
            "--bins",
            "--tests",
            "--",
        ])
        .args(["--test-threads", "2"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let num = |word: &str| {
                rest.split(';')
                    .find_map(|part| {
                        part.trim().strip_suffix(word).map(|n| {
                            n.trim()
                                .rsplit(' ')
                                .next()
                                .unwrap_or("0")
                                .parse::<u64>()
                                .unwrap_or(0)
                        })
                    })
                    .unwrap_or(0)
            };
            passed += num("passed");
            failed += num("failed");
        }
    }
    let status = child.wait()?;
    println!("{passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("tests failed ({status})");
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Test { args } => {
            setup()?;
            // The tests run the real `lb` binary (and test servers): build every binary
            // first, `cargo test` alone builds only test targets.
            run(Command::new(&cargo).current_dir(root()).args([
                "build",
                "--workspace",
                "--release",
                "--bins",
            ]))?;
            test(&cargo, &args)
        }
        Cmd::Demo => {
            setup()?;
            // The demo runs the agent (`lb`) and the test servers: build every binary.
            eprintln!("demo: building (the first time takes a few minutes)...");
            run(Command::new(&cargo).current_dir(root()).args([
                "build",
                "--quiet",
                "--workspace",
                "--release",
                "--bins",
            ]))?;
            run(&mut Command::new(root().join("target/release/demo")))
        }
        Cmd::Bench { args } => {
            setup()?;
            // The control benchmark runs the real agent: target/release/lb must be current.
            run(Command::new(&cargo).current_dir(root()).args([
                "build",
                "--release",
                "--workspace",
            ]))?;
            for (bin, args) in [("dataplane", &args[..]), ("control", &[][..])] {
                run(Command::new(&cargo)
                    .current_dir(root())
                    .args(["run", "--release", "-p", "lb-bench", "--bin", bin, "--"])
                    .args(args))?;
            }
            Ok(())
        }
        Cmd::Testbed { cmd } => {
            let args = match cmd {
                TestbedCmd::Up { prefix, backends } => {
                    setup()?;
                    // The testbed runs `lb` and `lb-testbed-server`: build them current.
                    run(Command::new(&cargo).current_dir(root()).args([
                        "build",
                        "--release",
                        "-p",
                        "lb-userspace",
                        "-p",
                        "lb-tests",
                        "--bins",
                    ]))?;
                    vec![
                        "up".to_string(),
                        "--prefix".into(),
                        prefix,
                        "--backends".into(),
                        backends.to_string(),
                    ]
                }
                TestbedCmd::Down { prefix } => vec!["down".into(), "--prefix".into(), prefix],
            };
            run(Command::new(&cargo)
                .current_dir(root())
                .args(["run", "--quiet", "--release", "-p", "lb-tests", "--bin"])
                .args(["testbed", "--"])
                .args(args))
        }
    }
}
