//! Counters of what the controllers do, kept in memory (the cluster crate owns /metrics;
//! these are read with [`Metrics::snapshot`] by tests, the benchmark, and an exporter).
use std::sync::atomic::{AtomicU64, Ordering};

/// Monotonic counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Raft proposals made by the controllers and services.
    pub proposals: AtomicU64,
    /// Proposals refused by a failed compare (retried with fresh state).
    pub conflicts: AtomicU64,
    /// Replicas bound to a node by the scheduler.
    pub bindings: AtomicU64,
    /// Scheduling rounds.
    pub schedule_rounds: AtomicU64,
    /// Replicas created by model actors.
    pub replicas_created: AtomicU64,
    /// Replicas unbound because their node was lost.
    pub replicas_rescheduled: AtomicU64,
    /// Heartbeats received.
    pub heartbeats: AtomicU64,
    /// Actors rebuilt after an uncertain write or a failure.
    pub actor_restarts: AtomicU64,
    /// Adapters assigned to a replica (pinned or on demand).
    pub adapter_bindings: AtomicU64,
    /// `EnsureLoaded` calls that had to load the adapter (cold loads).
    pub adapter_cold_loads: AtomicU64,
    /// Changes of a model's desired replica count by its autoscaler.
    pub scaling_events: AtomicU64,
    /// GPU health state changes recorded in node statuses (Healthy/Degraded/Failed).
    pub gpu_health_changes: AtomicU64,
}

impl Metrics {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// `(name, value)` of every counter, for an exporter.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("flotilla_actors_proposals_total", g(&self.proposals)),
            ("flotilla_actors_conflicts_total", g(&self.conflicts)),
            ("flotilla_actors_bindings_total", g(&self.bindings)),
            ("flotilla_actors_schedule_rounds_total", g(&self.schedule_rounds)),
            ("flotilla_actors_replicas_created_total", g(&self.replicas_created)),
            ("flotilla_actors_replicas_rescheduled_total", g(&self.replicas_rescheduled)),
            ("flotilla_actors_heartbeats_total", g(&self.heartbeats)),
            ("flotilla_actors_actor_restarts_total", g(&self.actor_restarts)),
            ("flotilla_actors_adapter_bindings_total", g(&self.adapter_bindings)),
            ("flotilla_actors_adapter_cold_loads_total", g(&self.adapter_cold_loads)),
            ("flotilla_actors_scaling_events_total", g(&self.scaling_events)),
            ("flotilla_actors_gpu_health_changes_total", g(&self.gpu_health_changes)),
        ]
    }
}
