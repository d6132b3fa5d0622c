//! flotilla-actors: the controllers that make models run. On the leader only, a Supervisor
//! rebuilds from the state machine one Model actor per model, one Node actor per node, one
//! adapter controller per base model with adapters, and a Scheduler; every server serves
//! `AgentService` (the agents' streams), `FleetService` (endpoints, nodes) and
//! `AdapterService` (on-demand adapter loads, usage), answering FAILED_PRECONDITION
//! `cluster.not_leader: leader=<addr>` off the leader.
//!
//! ```text
//!   agents ══stream══> AgentService ─heartbeats─> memory (TTL)     FleetService <── CLI, gateway
//!                          │ register/phase changes (Txn)               │ reads
//!                          v                                            v
//!   Raft state machine <── propose ── Model actors ── Scheduler ── Node actors
//!          │                               ^            ^              ^
//!          └──── change events ──> Supervisor (routes events, rebuilds actors)
//! ```
//!
//! Every decision is a pure function (`model::decide`, `node::decide`,
//! `placement::plan`, `reports::heartbeat_txn`, `adapters::decide`, `autoscale::decide`)
//! returning Raft commands, fenced by revisions; actors only receive messages, decide, and
//! execute (`writes`). The supervisor's routing is pure too (`supervisor::route`), and the
//! node facts every controller needs are read in one place (`facts`).
#![forbid(unsafe_code)]

pub mod adapters;
pub mod agent_bounds;
pub mod agent_service;
pub mod autoscale;
pub mod canary;
mod config;
pub mod disaggregation;
mod error;
pub mod facts;
pub mod fleet_service;
pub mod gang_placement;
pub mod gpu_health;
mod leadership;
pub mod metrics;
pub mod model;
pub mod node;
pub mod objects;
pub mod placement;
pub mod reports;
pub mod rollout;
pub mod scheduler;
pub mod shared;
pub mod supervisor;
pub mod writes;

#[cfg(test)]
mod testkit;

use std::sync::{Arc, OnceLock};

use flotilla_api::pb::adapter_service_server::AdapterServiceServer;
use flotilla_api::pb::agent_service_server::AgentServiceServer;
use flotilla_api::pb::autoscale_service_server::AutoscaleServiceServer;
use flotilla_api::pb::fleet_service_server::FleetServiceServer;

pub use config::{ActorsConfig, PlacementStrategy};
pub use error::ActorsError;
pub use shared::Ctx;

/// Registers `AgentService` and `FleetService` on a server and runs its controllers while
/// it leads. Call `config.validate()` first: an invalid config is logged and replaced by
/// the defaults.
pub fn extensions(config: ActorsConfig) -> flotilla_cluster::Extensions {
    extensions_with_probe(config).0
}

/// A late-bound view of one server's controllers (metrics, liveness) for tests and
/// benchmarks.
#[derive(Clone, Default)]
pub struct Probe(Arc<OnceLock<Arc<Ctx>>>);

impl Probe {
    pub fn ctx(&self) -> Option<Arc<Ctx>> {
        self.0.get().cloned()
    }
}

/// Like [`extensions`], also returning a [`Probe`] on the server's controllers.
pub fn extensions_with_probe(config: ActorsConfig) -> (flotilla_cluster::Extensions, Probe) {
    let probe = Probe::default();
    let slot = probe.0.clone();
    let ext: flotilla_cluster::Extensions = Box::new(move |handle, routes| {
        let config = match config.validate() {
            Ok(()) => config,
            Err(e) => {
                tracing::error!(error = %e, "invalid actors config; using the defaults");
                ActorsConfig::default()
            }
        };
        let ctx = Ctx::new(handle, config);
        ctx.handle.register_metrics(|r| ctx.metrics.register(r, ctx.handle.reader()));
        let _ = slot.set(ctx.clone());
        routes.add_service(AgentServiceServer::new(agent_service::AgentServiceImpl { ctx: ctx.clone() }));
        routes.add_service(FleetServiceServer::new(fleet_service::FleetServiceImpl { ctx: ctx.clone() }));
        routes.add_service(AdapterServiceServer::new(adapters::service::AdapterServiceImpl { ctx: ctx.clone() }));
        routes.add_service(AutoscaleServiceServer::new(autoscale::service::AutoscaleServiceImpl { ctx: ctx.clone() }));
        tokio::spawn(leadership::run(ctx));
    });
    (ext, probe)
}
