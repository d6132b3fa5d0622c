//! `flotilla`: the one binary. Every role (server, sim, dev) and every operator command.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 bad usage or invalid input.
#![forbid(unsafe_code)]

mod client;
mod cmd;
mod config_file;
mod error;
mod output;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use crate::error::CliError;
use crate::output::Format;

/// flotilla: a control plane for fleets of vLLM engines on plain machines.
#[derive(Parser, Debug)]
#[command(
    name = "flotilla",
    version,
    about = "flotilla: a control plane for fleets of vLLM engines on plain machines",
    propagate_version = true
)]
struct Cli {
    /// Server gRPC address(es) for operator commands; a comma-separated list is tried in
    /// order until one answers [default: 127.0.0.1:7070; a gateway given only `--backend`s
    /// watches no server unless this is set].
    #[arg(long, global = true, env = "FLOTILLA_SERVER")]
    server: Option<String>,
    /// Output format of operator commands.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    /// TLS for every role and every command (see `flotilla tls` and docs/security.md).
    #[command(flatten)]
    tls: flotilla_security::TlsArgs,
    /// A bearer token (`flotilla token create`) identifying operator commands, for callers
    /// without a client certificate; needs TLS (`--tls-ca` alone is enough).
    #[arg(long, global = true, env = "FLOTILLA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A TOML file of flags for `server`, `agent`, `gateway` and `sim` (keys are the flags'
    /// names, `grpc_addr = "0.0.0.0:7070"`); the command line and FLOTILLA_* variables win.
    /// Examples in deploy/config/.
    #[arg(long, global = true, env = "FLOTILLA_CONFIG", value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// Export the role's traces over OTLP/gRPC to this collector URL (`server`, `agent`,
    /// `gateway`; off when not given), as service `flotilla-<role>`; docs/observability.md.
    /// Example: --otlp-endpoint http://127.0.0.1:4317
    #[arg(long, global = true, env = "FLOTILLA_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a server: a member of the Raft group serving the gRPC API.
    ///
    /// Example: flotilla server --id 1 --data-dir /var/lib/flotilla --bootstrap
    Server(cmd::server::ServerArgs),
    /// Run everything on this machine for development (data in ./.flotilla).
    Dev(cmd::dev::DevArgs),
    /// Create or update objects from a YAML or JSON file (`-` reads stdin).
    ///
    /// With --wait, follow each applied Model and Adapter until Ready: exit 0 once every
    /// replica the model wants is Ready, 1 if a replica fails (the reason is printed) or on
    /// timeout (naming what is pending and why), 2 on bad input.
    ///
    /// Example: flotilla apply -f model.yaml --wait --timeout 15m
    Apply(cmd::objects::ApplyArgs),
    /// Show objects of a kind, or one object.
    ///
    /// Example: flotilla get model llama-3-8b -o json
    Get(cmd::objects::GetArgs),
    /// Delete an object.
    ///
    /// Example: flotilla delete model llama-3-8b
    Delete(cmd::objects::DeleteArgs),
    /// Stream changes to objects of a kind (one JSON line per change).
    ///
    /// Example: flotilla watch model --after 42
    Watch(cmd::objects::WatchArgs),
    /// Change the desired replica count of a model (a compare-and-set on its spec).
    ///
    /// Example: flotilla scale model llama-3-8b 4
    Scale(cmd::scale::ScaleArgs),
    /// Follow and steer a model's rolling update: status, history, undo, pause, resume.
    ///
    /// A change of a model's engine, source, engine_args, gpus or gpu_types replaces its
    /// replicas make-before-break (spec.rollout: max_surge 25%, max_unavailable 0).
    /// Example: flotilla rollout status model llama-3-8b
    #[command(subcommand)]
    Rollout(cmd::rollout::RolloutCommand),
    /// List, cordon, uncordon and drain nodes.
    #[command(subcommand)]
    Node(cmd::node::NodeCommand),
    /// Inspect and change the Raft group.
    #[command(subcommand)]
    Cluster(cmd::cluster::ClusterCommand),
    /// Run a node agent: registers this machine's GPUs and runs the engines placed on it.
    ///
    /// Example: flotilla agent --server 10.0.0.1:7070 --node-name gpu-01 --nvidia
    Agent(Box<flotilla_agent::AgentArgs>),
    /// Run the OpenAI-compatible gateway: routes requests across the cluster's engines.
    ///
    /// Example: flotilla gateway --server 10.0.0.1:7070 --listen 0.0.0.0:8080
    Gateway(Box<cmd::gateway::GatewayCmd>),
    /// Run a simulated vLLM engine (same HTTP surface and metrics, no GPU).
    ///
    /// Example: flotilla sim --port 8000 --model demo --speedup 10
    // A flag given twice takes its last value, as vLLM's argparse does (a Model's
    // engine_args come after the agent's --sim-args).
    #[command(args_override_self = true)]
    Sim(flotilla_sim::SimArgs),
    /// Run one member of a `layout: ray` multi-node replica: its Ray node and, on the head,
    /// the engine attached to it, ending when either ends. Agents started with `--ray` run
    /// it; it is not meant to be run by hand (docs/agent.md, "Ray layout").
    ///
    /// Example: flotilla ray-member --ray /opt/venv/bin/ray --address 10.0.0.6 --join 10.0.0.5:20001
    RayMember(flotilla_agent::ray_member::RayMemberArgs),
    /// Fault-injection runs against a real multi-process cluster on this machine, with
    /// linearizability, placement and data-plane checks (see docs/chaos.md).
    ///
    /// Example: flotilla chaos run chaos/scenarios/leader-kill-loop.yaml --seed 7
    #[command(subcommand)]
    Chaos(flotilla_chaos::cli::ChaosCommand),
    /// Certificates for a secure cluster: a CA, and certificates naming a role and a name.
    ///
    /// Example: flotilla tls ca create && flotilla tls cert create --role server --name s1 --ip 10.0.0.1
    #[command(subcommand)]
    Tls(cmd::tls::TlsCommand),
    /// Bearer tokens for automation without a certificate: create (printed once), list, revoke.
    ///
    /// Example: flotilla token create --role operator --name ci-deploy --ttl 30d
    #[command(subcommand)]
    Token(cmd::token::TokenCommand),
    /// The audit log: who made which write through the API (apply, delete, membership),
    /// from where, when, and how it ended. Replicated, newest 10000 kept; needs an admin.
    ///
    /// Example: flotilla audit --since 1200 --who operator/
    Audit(cmd::audit::AuditArgs),
    /// What the controllers did and why: rollout steps, replacements for lost nodes,
    /// completed rollouts (replicated, newest 5000 kept).
    ///
    /// Example: flotilla events --for model/llama -w
    Events(cmd::events::EventsArgs),
    /// Back up the cluster's whole state to a checksummed file, and check one (admin).
    ///
    /// Example: flotilla snapshot save backup.snap && flotilla snapshot inspect backup.snap
    #[command(subcommand)]
    Snapshot(cmd::snapshot::SnapshotCommand),
    /// Tenants' API keys, made by the server and shown once: create, list, revoke.
    ///
    /// Example: flotilla tenant key create team-search
    #[command(subcommand)]
    Tenant(cmd::tenant::TenantCommand),
}

fn main() -> ExitCode {
    let argv = match config_file::expand(&Cli::command(), std::env::args_os().collect(), &|k| std::env::var(k).ok()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {}", e.0);
            return ExitCode::from(2);
        }
    };
    let cli = match Cli::try_parse_from(argv) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.message);
            ExitCode::from(e.exit_code)
        }
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    flotilla_api::dial::check_env().map_err(CliError::usage)?;
    let usage = |e: flotilla_security::TlsError| CliError::usage(e.to_string());
    let tls = match &cli.command {
        // these write or run without dialling a server with this process's certificate
        Command::Tls(_) | Command::Sim(_) | Command::RayMember(_) | Command::Chaos(_) | Command::Dev(_) => None,
        // the roles need a certificate of their own
        Command::Server(_) | Command::Agent(_) | Command::Gateway(_) => {
            flotilla_security::Tls::from_args(&cli.tls).map_err(usage)?
        }
        _ => flotilla_security::Tls::client_from_args(&cli.tls).map_err(usage)?,
    };
    if cli.token.is_some() && tls.is_none() {
        return Err(CliError::usage(
            "--token needs TLS (give --tls-ca): a token sent in plain text can be read on the way",
        ));
    }
    let _telemetry = telemetry(&cli.command, cli.otlp_endpoint.as_deref())?;
    let server = cli.server.clone().unwrap_or_else(|| DEFAULT_SERVER.to_string());
    let client = client::Client::new(&server, tls.clone(), cli.token.as_deref())?;
    match cli.command {
        Command::Server(args) => cmd::server::run(args, &cli.tls).await,
        Command::Dev(args) => cmd::dev::run(args).await,
        Command::Apply(args) => cmd::objects::apply(&client, args, cli.output).await,
        Command::Get(args) => cmd::objects::get(&client, args, cli.output).await,
        Command::Delete(args) => cmd::objects::delete(&client, args, cli.output).await,
        Command::Watch(args) => cmd::objects::watch(&client, args).await,
        Command::Cluster(c) => cmd::cluster::run(&client, c, cli.output).await,
        Command::Scale(args) => cmd::scale::run(&client, args, cli.output).await,
        Command::Rollout(c) => cmd::rollout::run(&client, c, cli.output).await,
        Command::Node(c) => cmd::node::run(&client, c, cli.output).await,
        Command::Agent(mut args) => {
            args.server = server_list(&server);
            args.tls = tls;
            flotilla_agent::run(*args).await.map_err(CliError::from)
        }
        Command::Gateway(cmd) => {
            let mut args = cmd.into_args()?;
            // static backends alone: no control plane unless one is named
            args.server = match &cli.server {
                None if !args.backends.is_empty() => Vec::new(),
                _ => server_list(&server),
            };
            args.tls = tls;
            flotilla_gateway::run(args).await.map_err(CliError::from)
        }
        Command::Sim(args) => {
            init_logging("info");
            flotilla_sim::run(args).await.map_err(CliError::from)
        }
        Command::RayMember(args) => {
            init_logging("info");
            let code = flotilla_agent::ray_member::run(args).await.map_err(CliError::from)?;
            std::process::exit(code)
        }
        Command::Tls(c) => cmd::tls::run(c),
        Command::Token(c) => cmd::token::run(&client, c, cli.output).await,
        Command::Audit(a) => cmd::audit::run(&client, a, cli.output).await,
        Command::Events(a) => cmd::events::run(&client, a, cli.output).await,
        Command::Snapshot(c) => cmd::snapshot::run(&client, c, cli.output).await,
        Command::Tenant(c) => cmd::tenant::run(&client, c, cli.output).await,
        Command::Chaos(c) => {
            init_logging("warn");
            let bin =
                std::env::current_exe().map_err(|e| CliError::runtime(format!("cannot find this executable: {e}")))?;
            flotilla_chaos::cli::run(c, &bin).await.map_err(|e| CliError { exit_code: e.code, message: e.message })
        }
    }
}

/// The roles' logs and, with `--otlp-endpoint`, trace export (kept until `run` returns).
fn telemetry(command: &Command, endpoint: Option<&str>) -> Result<Option<flotilla_telemetry::Guard>, CliError> {
    let (service, filter) = match command {
        Command::Server(_) => ("flotilla-server", "info,openraft=error"),
        Command::Agent(_) => ("flotilla-agent", "info"),
        Command::Gateway(_) => ("flotilla-gateway", "info"),
        _ if endpoint.is_some_and(|e| !e.is_empty()) => {
            return Err(CliError::usage("--otlp-endpoint is for the roles: server, agent and gateway"))
        }
        _ => return Ok(None),
    };
    let guard = flotilla_telemetry::init(service, endpoint, filter).map_err(|e| CliError::usage(e.to_string()))?;
    Ok(Some(guard))
}

/// Where operator commands, agents and gateways find the servers when `--server` is not given.
const DEFAULT_SERVER: &str = "127.0.0.1:7070";

/// The global `--server` value as a list of addresses.
fn server_list(server: &str) -> Vec<String> {
    server.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect()
}

/// Logs to stderr; `RUST_LOG` overrides the default level.
pub(crate) fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
