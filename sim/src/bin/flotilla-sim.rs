//! `flotilla-sim`: the simulator as its own small binary (the same flags and exit codes as
//! `flotilla sim`: 0, 1 runtime, 2 usage), so the sim crate's process tests
//! (`tests/gang_process.rs`) run real processes through `CARGO_BIN_EXE_flotilla-sim`
//! without building the whole `flotilla` binary, and bench/sim and the agent's tests (when
//! `FLOTILLA_BIN` is not set) run it as the simulator.

use clap::Parser;

#[derive(Parser)]
#[command(name = "flotilla-sim", about = "flotilla simulated vLLM engine")]
struct Cli {
    #[command(flatten)]
    args: flotilla_sim::SimArgs,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flotilla-sim: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(flotilla_sim::run(cli.args)) {
        eprintln!("flotilla-sim: {e}");
        std::process::exit(e.exit_code());
    }
}
