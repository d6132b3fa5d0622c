//! The federation control plane (`flotilla server --federation`, docs/federation.md): on
//! the federation group's leader, a controller spreads each FederatedModel over the member
//! Clusters by its placement policy and keeps one member Model per chosen cluster through
//! that cluster's own gRPC API, and reports what each cluster runs.
//!
//! ```text
//!  federation Raft group (Clusters, FederatedModels)
//!        │ leader only
//!        ▼
//!  controller ── each tick ──► read each Cluster's Models and Replicas (its API)
//!        │                     placement::spread → a count per cluster
//!        │                     reconcile::action per (FederatedModel, cluster)
//!        └──► member cluster API: apply / delete member Models (labelled, compare-and-set)
//! ```
//!
//! The federation is never on a cluster's request or control path: a member cluster keeps
//! serving, and takes local applies, with the federation down.
use std::path::PathBuf;
use std::time::Duration;

use flotilla_cluster::ClusterHandle;

mod controller;
pub mod member;
pub mod metrics;
pub mod placement;
pub mod reconcile;
pub mod tracking;

/// The federation controller's settings.
#[derive(Debug, Clone)]
pub struct FederationConfig {
    /// How often the leader reconciles when nothing changes in its store.
    pub interval: Duration,
    /// The federation server's own CA (`--tls-ca`), used to verify member servers whose
    /// Cluster names no `ca_file`.
    pub own_ca: Option<PathBuf>,
}

impl Default for FederationConfig {
    fn default() -> Self {
        FederationConfig { interval: Duration::from_secs(2), own_ca: None }
    }
}

/// The server extension that runs the controller on the leader.
pub fn extensions(config: FederationConfig) -> flotilla_cluster::Extensions {
    Box::new(move |handle, _routes| {
        let metrics = metrics::Metrics::default();
        let m = metrics.clone();
        handle.register_metrics(move |r| m.register(r));
        tokio::spawn(run(handle, config, metrics));
    })
}

/// Reconciles while this server leads: each interval and on each change to the store.
async fn run(handle: ClusterHandle, config: FederationConfig, metrics: metrics::Metrics) {
    let mut leading = handle.leadership();
    let mut changes = handle.reader().subscribe();
    loop {
        if leading.wait_for(|l| *l).await.is_err() {
            return;
        }
        tracing::info!("leading the federation: reconciling member clusters");
        let mut controller = controller::Controller::new(handle.clone(), config.clone(), metrics.clone());
        while *leading.borrow() {
            controller.tick().await;
            metrics.tick();
            tokio::select! {
                _ = tokio::time::sleep(config.interval) => {}
                r = changes.changed() => if r.is_err() { return },
                r = leading.changed() => if r.is_err() { return },
            }
        }
    }
}
