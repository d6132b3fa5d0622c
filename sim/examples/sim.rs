//! `cargo run -p flotilla-sim --example sim -- --port 0 --model demo`: the simulator
//! without the `flotilla` binary (benchmarks use it until `flotilla sim` is wired).

use clap::Parser;

#[derive(Parser)]
#[command(name = "sim", about = "flotilla simulated vLLM engine")]
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
            eprintln!("sim: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(flotilla_sim::run(cli.args)) {
        eprintln!("sim: {e}");
        std::process::exit(e.exit_code());
    }
}
