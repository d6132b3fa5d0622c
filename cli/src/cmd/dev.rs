//! `flotilla dev`: the whole stack on one machine, for development and demos. Today that is
//! one server bootstrapped in `./.flotilla` with a demo model applied; the agent, simulated
//! engines and the gateway join it as they are built.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use flotilla_api::pb::object_service_client::ObjectServiceClient;
use flotilla_api::pb::ApplyRequest;
use flotilla_cluster::ServerConfig;

use crate::error::CliError;

/// The demo model `flotilla dev` applies.
pub(crate) const DEMO_MODEL: &str = "kind: Model
metadata:
  name: demo
  labels: {app: flotilla-dev}
spec:
  engine: sim
  source: file:///models/demo
  replicas: 2
  gpus: 1
";

#[derive(Args, Debug)]
pub(crate) struct DevArgs {
    /// Data directory of the embedded server.
    #[arg(long, default_value = ".flotilla")]
    data_dir: PathBuf,
    /// gRPC address of the embedded server.
    #[arg(long, default_value = "127.0.0.1:7070")]
    grpc_addr: SocketAddr,
    /// HTTP address (metrics, health) of the embedded server.
    #[arg(long, default_value = "127.0.0.1:7071")]
    http_addr: SocketAddr,
    /// Do not apply the demo model.
    #[arg(long)]
    no_demo: bool,
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
    let handle = flotilla_cluster::start(config).await?;
    if !args.no_demo {
        let mut client = ObjectServiceClient::connect(format!("http://{}", handle.grpc_addr))
            .await
            .map_err(|e| CliError::runtime(format!("cannot reach the embedded server: {e}")))?;
        let req = ApplyRequest { manifest: DEMO_MODEL.into(), expected_revision: None };
        let mut attempt = 0;
        loop {
            match client.apply(req.clone()).await {
                Ok(r) => {
                    let o = r.into_inner().object.unwrap_or_default();
                    eprintln!("applied model/{} (revision {})", o.name, o.revision);
                    break;
                }
                Err(e) if attempt < 50 => {
                    attempt += 1;
                    tracing::debug!(error = %e, "waiting for the server to elect itself");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    println!(
        "flotilla dev ready: grpc={} http={} (try: flotilla get models; Ctrl-C stops)",
        handle.grpc_addr, handle.http_addr
    );
    super::server::wait_for_shutdown(handle).await
}
