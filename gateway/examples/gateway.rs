//! A standalone `flotilla gateway` for benchmarks and manual runs before the CLI wires it:
//! `cargo run --release -p flotilla-gateway --example gateway -- --backend m=http://127.0.0.1:8000 --no-auth`.
//! `--server ADDR` (repeatable, or env FLOTILLA_SERVER comma-separated) stands in for the
//! binary's global flag.

use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[arg(long = "server", env = "FLOTILLA_SERVER", value_delimiter = ',')]
    server: Vec<String>,
    #[command(flatten)]
    gateway: flotilla_gateway::GatewayArgs,
}

fn main() {
    let cli = Cli::parse();
    let mut args = cli.gateway;
    args.server = cli.server;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    if let Err(e) = rt.block_on(flotilla_gateway::run(args)) {
        eprintln!("error: {e}");
        std::process::exit(if e.is_usage() { 2 } else { 1 });
    }
}
