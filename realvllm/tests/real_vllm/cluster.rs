//! The control plane side of the tier: apply and delete the `Model`, read its replicas, and
//! watch the endpoints the agent reports (with the load it scraped from the engine).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use flotilla_api::pb::fleet_service_client::FleetServiceClient;
use flotilla_api::pb::object_service_client::ObjectServiceClient;
use flotilla_api::pb::{EndpointSet, ListRequest, WatchEndpointsRequest};
use tonic::transport::Channel;

use crate::install::{RealVllm, LORA_FLAGS};

/// The Model the agent serves: the tiny Llama through `file://`, on CPU, LoRA enabled.
pub fn model_manifest(install: &RealVllm) -> String {
    let args: Vec<String> = LORA_FLAGS.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "kind: Model\nmetadata:\n  name: tiny\nspec:\n  engine: vllm\n  source: file://{}\n  replicas: 1\n  gpus: 0\n  engine_args: [{}]\n",
        install.model().display(),
        args.join(", ")
    )
}

/// An in-process gateway (auth off) following the endpoint table of the server at `grpc`.
pub async fn gateway(grpc: &str) -> anyhow::Result<flotilla_gateway::GatewayHandle> {
    let args = flotilla_gateway::GatewayArgs {
        listen: "127.0.0.1:0".into(),
        no_auth: true,
        server: vec![grpc.to_owned()],
        ..flotilla_gateway::GatewayArgs::default()
    };
    flotilla_gateway::start(args).await.map_err(|e| anyhow::anyhow!("gateway: {e}"))
}

/// Runs `flotilla ARGS --server SERVER` (the CLI, as an operator would).
pub fn cli(bin: &Path, server: &str, args: &[&str], stdin_file: Option<&Path>) -> anyhow::Result<String> {
    let mut cmd = Command::new(bin);
    cmd.args(args).args(["--server", server]);
    if let Some(f) = stdin_file {
        cmd.stdin(std::fs::File::open(f)?);
    }
    let out = cmd.output().context("run flotilla")?;
    anyhow::ensure!(
        out.status.success(),
        "flotilla {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn channel(server: &str) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{server}"))?.connect_timeout(Duration::from_secs(3)).connect().await?)
}

/// A replica as the store shows it (`name` and `reason` are read through `Debug`, in
/// failure messages).
#[allow(dead_code)]
#[derive(Debug, Clone, Default)]
pub struct ReplicaView {
    pub name: String,
    pub phase: String,
    pub endpoint: Option<String>,
    pub restarts: u64,
    pub reason: String,
}

/// Replicas of `model`.
pub async fn replicas(server: &str, model: &str) -> anyhow::Result<Vec<ReplicaView>> {
    let mut c = ObjectServiceClient::new(channel(server).await?);
    let req = ListRequest { kind: "replica".into(), label_selector: format!("model={model}"), stale: false };
    let objs = c.list(req).await?.into_inner().objects;
    Ok(objs
        .iter()
        .map(|o| {
            let status: serde_json::Value = serde_json::from_str(&o.status_json).unwrap_or_default();
            ReplicaView {
                name: o.name.clone(),
                phase: status["phase"].as_str().unwrap_or("Pending").to_owned(),
                endpoint: status["endpoint"].as_str().map(str::to_owned),
                restarts: status["restarts"].as_u64().unwrap_or(0),
                reason: status["reason"].as_str().unwrap_or_default().to_owned(),
            }
        })
        .collect())
}

/// Polls the replicas of `model` until `pred` holds, or fails after `timeout` with the
/// last view.
pub async fn wait_replicas(
    server: &str,
    model: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&[ReplicaView]) -> bool,
) -> anyhow::Result<Vec<ReplicaView>> {
    let t0 = tokio::time::Instant::now();
    loop {
        let r = replicas(server, model).await.unwrap_or_default();
        if pred(&r) {
            return Ok(r);
        }
        anyhow::ensure!(t0.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}: {r:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The endpoint sets the leader streams (each with the agent's latest load figures).
pub async fn watch_endpoints(server: &str) -> anyhow::Result<tonic::Streaming<EndpointSet>> {
    let mut c = FleetServiceClient::new(channel(server).await?);
    Ok(c.watch_endpoints(WatchEndpointsRequest { model: "tiny".into() }).await?.into_inner())
}
