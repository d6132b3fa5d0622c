//! `flotilla dev`: the whole stack on one machine, for development and demos: one server
//! (data in `./.flotilla`), one agent with 4 simulated GPUs running `flotilla sim` engines,
//! the gateway on 127.0.0.1:8080 (auth off), and the `demo` model with 2 replicas. Ctrl-C
//! stops everything, engines included.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser};
use flotilla_api::pb::object_service_client::ObjectServiceClient;
use flotilla_api::pb::{ApplyRequest, ListRequest};
use flotilla_cluster::ServerConfig;
use tonic::transport::Channel;

use crate::error::CliError;

/// The TLS of the dev stack's processes with `--secure`.
struct DevTls {
    agent: std::sync::Arc<flotilla_security::Tls>,
    gateway: std::sync::Arc<flotilla_security::Tls>,
    admin: std::sync::Arc<flotilla_security::Tls>,
}

/// The demo model `flotilla dev` applies. LoRA slots as a GPU serving several adapters
/// would have: 4 adapters per batch (`--max-loras`), 8 held per replica
/// (`--max-cpu-loras`), so 16 adapters stay loaded across the 2 replicas and more load on
/// demand (docs/lora.md).
pub(crate) const DEMO_MODEL: &str = "kind: Model
metadata:
  name: demo
  labels: {app: flotilla-dev}
spec:
  engine: sim
  source: file:///models/demo
  replicas: 2
  gpus: 1
  engine_args: [--max-loras, '4', --max-cpu-loras, '8']
";

#[derive(Args, Debug)]
pub(crate) struct DevArgs {
    /// Data directory of the embedded server and agent.
    #[arg(long, default_value = ".flotilla")]
    data_dir: PathBuf,
    /// gRPC address of the embedded server.
    #[arg(long, default_value = "127.0.0.1:7070")]
    grpc_addr: SocketAddr,
    /// HTTP address (metrics, health) of the embedded server.
    #[arg(long, default_value = "127.0.0.1:7071")]
    http_addr: SocketAddr,
    /// Listen address of the gateway (OpenAI API; auth off in dev).
    #[arg(long, default_value = "127.0.0.1:8080")]
    gateway_addr: SocketAddr,
    /// Simulated GPUs of the embedded agent.
    #[arg(long, default_value_t = 4)]
    gpus: u32,
    /// Extra flags for every simulated engine, e.g. "--speedup 10".
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    sim_args: String,
    /// Do not apply the demo model.
    #[arg(long)]
    no_demo: bool,
    /// Run with security on: a CA and certificates for the server, agent, gateway and an
    /// admin in DATA_DIR/tls (made once), TLS on every link and the role table enforced.
    #[arg(long)]
    secure: bool,
}

#[derive(Parser)]
struct AgentFlags {
    #[command(flatten)]
    agent: flotilla_agent::AgentArgs,
}

#[derive(Parser)]
struct SourceFlags {
    #[command(flatten)]
    sources: flotilla_agent::download::sources::SourceArgs,
}

#[derive(Parser)]
struct GatewayFlags {
    #[command(flatten)]
    gateway: flotilla_gateway::GatewayArgs,
}

pub(crate) async fn run(args: DevArgs) -> Result<(), CliError> {
    crate::init_logging("warn");
    let config = ServerConfig {
        grpc_addr: args.grpc_addr,
        http_addr: args.http_addr,
        bootstrap: true,
        ..ServerConfig::new(1, args.data_dir.join("server-1"))
    };
    eprintln!("starting server 1 (data in {})", config.data_dir.display());
    let actors = flotilla_actors::ActorsConfig::default();
    let (config, tls) = if args.secure {
        let dir = args.data_dir.join("tls");
        let set = super::tls::dev_set(&dir, "dev")?;
        let load = |f: flotilla_security::TlsFiles| {
            flotilla_security::Tls::load(f).map_err(|e| CliError::runtime(e.to_string()))
        };
        let tls = DevTls { agent: load(set.agent)?, gateway: load(set.gateway)?, admin: load(set.admin.clone())? };
        eprintln!("security on: TLS on every link, roles enforced; certificates in {}", dir.display());
        eprintln!(
            "  for the CLI: export FLOTILLA_TLS_CERT={} FLOTILLA_TLS_KEY={} FLOTILLA_TLS_CA={}",
            set.admin.cert.display(),
            set.admin.key.display(),
            set.admin.ca.display()
        );
        (ServerConfig { tls: Some(load(set.server)?), ..config }, Some(tls))
    } else {
        eprintln!("security is off (loopback only): no TLS, every call allowed; `flotilla dev --secure` turns it on");
        (config, None)
    };
    let server = flotilla_cluster::start_with(config, flotilla_actors::extensions(actors)).await?;
    let grpc = server.grpc_addr.to_string();

    let agent_dir = args.data_dir.join("agent-dev");
    let gpus = args.gpus.to_string();
    let mut flags =
        vec!["agent", "--node-name", "dev", "--gpus", &gpus, "--gpu-type", "SIM-80GB", "--stop-engines-on-exit"];
    let sim_args = format!("--sim-args={}", args.sim_args);
    flags.push(&sim_args);
    let mut agent_args = AgentFlags::try_parse_from(flags).map_err(|e| CliError::usage(e.to_string()))?.agent;
    agent_args.server = vec![grpc.clone()];
    agent_args.data_dir = agent_dir.clone();
    agent_args.tls = tls.as_ref().map(|t| t.agent.clone());
    eprintln!("starting agent dev with {} simulated GPUs (data in {})", args.gpus, agent_dir.display());
    let agent = flotilla_agent::start(agent_args).await.map_err(CliError::from)?;

    let listen = format!("--listen={}", args.gateway_addr);
    let mut gateway_args = GatewayFlags::try_parse_from(["gateway", "--no-auth", listen.as_str()])
        .map_err(|e| CliError::usage(e.to_string()))?
        .gateway;
    gateway_args.server = vec![grpc.clone()];
    gateway_args.tls = tls.as_ref().map(|t| t.gateway.clone());
    let sources = SourceFlags::try_parse_from(["gateway"]).map_err(|e| CliError::usage(e.to_string()))?.sources;
    gateway_args.tokenizer_fetcher =
        Some(super::gateway::fetcher(&sources, args.data_dir.join("gateway-tokenizers"), true)?);
    let gateway = flotilla_gateway::start(gateway_args).await.map_err(CliError::from)?;
    let gateway_addr = gateway.local_addr();
    eprintln!("gateway listening on http://{gateway_addr} (auth off)");

    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .map_err(|e| CliError::runtime(e.to_string()))?;
    let mut client = ObjectServiceClient::new(flotilla_security::connect::connect_lazy(
        endpoint,
        tls.as_ref().map(|t| &t.admin),
        &grpc,
    ));
    let mut endpoints = Vec::new();
    if !args.no_demo {
        apply_demo(&mut client).await?;
        endpoints = wait_ready(&mut client, 2).await?;
    }
    let signals = super::server::Signals::install()?;
    println!("flotilla dev ready: gateway=http://{gateway_addr} grpc={} http={}", server.grpc_addr, server.http_addr);
    for e in &endpoints {
        println!("  demo replica at http://{e}");
    }
    println!(
        "  try: curl -s http://{gateway_addr}/v1/chat/completions -H 'Content-Type: application/json' -d '{{\"model\":\"demo\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'"
    );
    println!("  and: flotilla get models; flotilla get replicas; flotilla node list   (Ctrl-C stops everything)");
    signals.wait().await;
    eprintln!("stopping the gateway, the agent and its engines");
    gateway.shutdown().await;
    if let Err(e) = agent.shutdown(true).await {
        eprintln!("warning: agent shutdown: {e}");
    }
    server.shutdown().await;
    Ok(())
}

async fn apply_demo(client: &mut ObjectServiceClient<Channel>) -> Result<(), CliError> {
    let req = ApplyRequest { manifest: DEMO_MODEL.into(), expected_revision: None };
    for attempt in 0.. {
        match client.apply(req.clone()).await {
            Ok(r) => {
                let o = r.into_inner().object.unwrap_or_default();
                eprintln!("applied model/{} (revision {})", o.name, o.revision);
                return Ok(());
            }
            Err(e) if attempt < 100 => {
                tracing::debug!(error = %e, "waiting for the server to elect itself");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!("the loop returns")
}

/// Waits until `n` demo replicas are Ready, printing progress; returns their endpoints.
async fn wait_ready(client: &mut ObjectServiceClient<Channel>, n: usize) -> Result<Vec<String>, CliError> {
    let mut last = String::new();
    for _ in 0..1200 {
        let req = ListRequest { kind: "Replica".into(), label_selector: "model=demo".into(), stale: true };
        if let Ok(r) = client.list(req).await {
            let mut phases = Vec::new();
            let mut ready = Vec::new();
            for o in r.into_inner().objects {
                let status: serde_json::Value = serde_json::from_str(&o.status_json).unwrap_or_default();
                let phase = status["phase"].as_str().unwrap_or("Pending").to_owned();
                if phase == "Ready" {
                    if let Some(e) = status["endpoint"].as_str() {
                        ready.push(e.to_owned());
                    }
                }
                phases.push(phase);
            }
            phases.sort();
            let line =
                format!("demo replicas: {}", if phases.is_empty() { "none yet".into() } else { phases.join(", ") });
            if line != last {
                eprintln!("{line}");
                last = line;
            }
            if ready.len() >= n {
                return Ok(ready);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(CliError::runtime(
        "the demo replicas did not become ready within 2 minutes; see the agent logs in .flotilla/agent-dev/logs",
    ))
}

#[cfg(test)]
mod tests {
    use flotilla_api::{Manifest, Spec};

    #[test]
    fn the_demo_model_has_several_lora_slots() {
        let m = Manifest::parse(super::DEMO_MODEL).expect("the demo model parses");
        let Spec::Model(spec) = m.spec else { panic!("not a model") };
        let lora = spec.lora().expect("valid LoRA flags");
        assert!(lora.enabled);
        assert_eq!((lora.max_loras, lora.max_cpu_loras), (4, 8), "{lora:?}");
        assert_eq!(spec.replicas, 2);
    }
}
