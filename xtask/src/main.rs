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
    /// Set up, then run every test (unit, doc, BPF_PROG_TEST_RUN, namespaces). Needs root.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Set up, then show the data plane at work on an embedded default configuration.
    Demo,
    /// Set up, build, then run the benchmark suite (every suite prints its table and appends
    /// JSON lines to bench/results/results.jsonl). `bench SUITE [ARGS]` runs one suite
    /// (throughput, dataplane, haproxy, maglev, flood, control, health) or the packet
    /// generator (`bench gen --help`); `bench report [--quick]` runs them all and writes
    /// bench/results/REPORT.md with its charts.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
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
        /// LB hosts; more than one puts a router (BIRD, BGP, ECMP) in front of them.
        #[arg(long, default_value_t = 1)]
        lbs: usize,
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

/// `cargo test` over the workspace (unit, integration and doc tests), its output passed
/// through, then one closing line with the totals over every test binary. cargo prints
/// one `test result:` line per binary it ran; a binary that crashed (or a target that did
/// not build) prints none and is counted apart. A run in which no test ran fails: with a
/// filter that matches nothing, that is a typo, not a success.
/// Every suite of the benchmark, in the order `bench` and `bench report` run them.
const SUITES: [&str; 7] = [
    "throughput",
    "dataplane",
    "haproxy",
    "maglev",
    "flood",
    "control",
    "health",
];

fn bench(args: &[String]) -> Result<()> {
    let bin = |name: &str| root().join("target/release").join(name);
    match args.first().map(String::as_str) {
        None => SUITES
            .iter()
            .try_for_each(|s| run(&mut Command::new(bin(s)))),
        Some("report") => {
            let quick = match &args[1..] {
                [] => false,
                [q] if q == "--quick" => true,
                other => bail!("bench report takes only --quick, not {other:?}"),
            };
            // The committed report is a full run's; a quick one goes beside it.
            let dir = root().join(if quick {
                "bench/results/quick"
            } else {
                "bench/results"
            });
            std::fs::create_dir_all(&dir)?;
            let results = dir.join(if quick { "quick.jsonl" } else { "full.jsonl" });
            let _ = std::fs::remove_file(&results);
            for s in SUITES {
                let mut c = Command::new(bin(s));
                c.env("LB_BENCH_RESULTS", &results)
                    .env("LB_BENCH_QUICK", if quick { "1" } else { "0" });
                run(&mut c)?;
            }
            run(Command::new(bin("report")).arg(&results).arg(&dir))
        }
        Some(s) if s == "gen" || SUITES.contains(&s) => run(Command::new(bin(s)).args(&args[1..])),
        Some(s) => bail!(
            "bench {s:?}: one of {}, gen, report (or nothing: every suite)",
            SUITES.join(", ")
        ),
    }
}

fn test(cargo: &str, args: &[String]) -> Result<()> {
    use std::{
        io::{BufRead, BufReader},
        process::Stdio,
    };
    let mut child = Command::new(cargo)
        .current_dir(root())
        .args(["test", "--workspace", "--release", "--no-fail-fast", "--"])
        .args(["--test-threads", "2"])
        .args(args)
        // Its messages are read below: no colour codes in them.
        .env("CARGO_TERM_COLOR", "never")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    // cargo's own messages (stderr) say which test binaries it started and what did not
    // build; the binaries' stderr comes through here too.
    let stderr = child.stderr.take().unwrap();
    let messages = std::thread::spawn(move || {
        let (mut started, mut unbuilt) = (0u64, 0u64);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if line.starts_with("     Running ") || line.starts_with("   Doc-tests ") {
                started += 1;
            } else if line.starts_with("error: could not compile") {
                unbuilt += 1;
            }
        }
        (started, unbuilt)
    });
    let (mut passed, mut failed, mut results) = (0u64, 0u64, 0u64);
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
            results += 1;
        }
    }
    let status = child.wait()?;
    let (started, unbuilt) = messages.join().expect("the stderr reader");
    let broken = started.saturating_sub(results) + unbuilt;
    if broken > 0 {
        println!(
            "{passed} passed, {failed} failed, {broken} test binar{} crashed or did not build",
            if broken == 1 { "y" } else { "ies" }
        );
        bail!("tests failed ({status})");
    }
    println!("{passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("tests failed ({status})");
    }
    if passed == 0 {
        if args.is_empty() {
            bail!("no test ran");
        }
        bail!(
            "no test ran: nothing matched `{}` (a test name filter matches a substring of \
             a test's path, e.g. `cargo xtask test agent` or `cargo xtask test config::`)",
            args.join(" ")
        );
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    // The message alone: a backtrace of xtask (RUST_BACKTRACE=1) says nothing about tests.
    match run_cli(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_cli(cli: Cli) -> Result<()> {
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
            // The upgrade tests run earlier releases, built from git history once (a few
            // minutes the first time): build them now, not while timing-sensitive tests run.
            run(Command::new(root().join("target/release/lb-legacy")).env("CARGO", &cargo))?;
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
                "--quiet",
                "--release",
                "--workspace",
                "--bins",
            ]))?;
            bench(&args)
        }
        Cmd::Testbed { cmd } => {
            let args = match cmd {
                TestbedCmd::Up {
                    prefix,
                    backends,
                    lbs,
                } => {
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
                        "--lbs".into(),
                        lbs.to_string(),
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
