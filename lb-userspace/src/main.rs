//! `lb`: the load balancer's agent (`lb agent`) and the CLI that manages it ([`cli`]).
mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
