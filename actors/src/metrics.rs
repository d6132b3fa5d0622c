//! The controllers' Prometheus metrics (`flotilla_controller_*`), registered on the server's
//! `/metrics` by [`crate::extensions`] and updated where things happen: reconcile passes and
//! their failures per controller, Raft proposals per controller and result, scheduling
//! rounds, placement latency and the replicas left Pending by reason, autoscaler decisions,
//! adapter bindings, evictions and cold loads, heartbeats, GPU health changes, actor rebuilds.
//!
//! Besides, [`FleetGauges`] reads the fleet's state from the store at each scrape: nodes by
//! state, replicas by phase, GPUs by use.
//!
//! Every server has them, but only the leader's move (the controllers run there); the gauges
//! (`pending_replicas`, `leading`, the fleet's) are zero or absent elsewhere, so a `sum` over
//! servers is the cluster's value. Labels are bounded: `controller` and `result` from fixed sets below, `reason` from
//! [`UnplaceableCode`], `direction` up or down. No object names: those are unbounded, and
//! `flotilla get` shows them.
use flotilla_api::spec::{NodeState, ReplicaPhase};
use flotilla_api::{Kind, LabelSelector};
use flotilla_storage::StoreReader;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::objects::{NodeView, ReplicaView};
use crate::placement::UnplaceableCode;

/// The controllers (and the services that write for agents), as metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Controller {
    Model,
    Node,
    Scheduler,
    Adapters,
    Autoscaler,
    /// The agent service's own writes (session registration, replica status).
    Agents,
}

impl Controller {
    pub const ALL: [Controller; 6] = [
        Controller::Model,
        Controller::Node,
        Controller::Scheduler,
        Controller::Adapters,
        Controller::Autoscaler,
        Controller::Agents,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Controller::Model => "model",
            Controller::Node => "node",
            Controller::Scheduler => "scheduler",
            Controller::Adapters => "adapters",
            Controller::Autoscaler => "autoscaler",
            Controller::Agents => "agents",
        }
    }
}

/// How a proposal ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proposal {
    Applied,
    /// Refused by a failed compare or a missing object (retried with fresh state).
    Conflict,
    /// Refused because this server no longer leads.
    NotLeader,
    /// May or may not have committed (the actor is rebuilt from the state machine).
    Uncertain,
    /// Certainly not applied for another reason.
    Error,
}

impl Proposal {
    fn as_str(self) -> &'static str {
        match self {
            Proposal::Applied => "applied",
            Proposal::Conflict => "conflict",
            Proposal::NotLeader => "not_leader",
            Proposal::Uncertain => "uncertain",
            Proposal::Error => "error",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabels {
    controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProposalLabels {
    controller: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

/// Every controller metric of one server. Clones share the values.
#[derive(Debug, Clone)]
pub struct Metrics {
    reconciles: Family<ControllerLabels, Counter>,
    reconcile_errors: Family<ControllerLabels, Counter>,
    proposals: Family<ProposalLabels, Counter>,
    /// Replicas bound to a node by the scheduler.
    pub bindings: Counter,
    /// Scheduling rounds.
    pub schedule_rounds: Counter,
    /// Seconds from a replica first seen Pending by this leader's scheduler to its binding.
    pub placement_seconds: Histogram,
    pending: Family<ReasonLabels, Gauge>,
    /// Replicas created by model actors.
    pub replicas_created: Counter,
    /// Replicas unbound because their node was lost.
    pub replicas_rescheduled: Counter,
    /// Heartbeats received.
    pub heartbeats: Counter,
    /// Actors rebuilt after an uncertain write or a failure.
    pub actor_restarts: Counter,
    /// Adapters assigned to a replica (pinned or on demand).
    pub adapter_bindings: Counter,
    /// Adapter bindings removed to make room for another adapter.
    pub adapter_evictions: Counter,
    /// `EnsureLoaded` calls that had to load the adapter (cold loads).
    pub adapter_cold_loads: Counter,
    scaling: Family<DirectionLabels, Counter>,
    /// GPU health state changes recorded in node statuses (Healthy/Degraded/Failed).
    pub gpu_health_changes: Counter,
    /// 1 while this server's controllers run.
    pub leading: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            reconciles: Family::default(),
            reconcile_errors: Family::default(),
            proposals: Family::default(),
            bindings: Counter::default(),
            schedule_rounds: Counter::default(),
            // 1 ms .. ~65 s
            placement_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            pending: Family::default(),
            replicas_created: Counter::default(),
            replicas_rescheduled: Counter::default(),
            heartbeats: Counter::default(),
            actor_restarts: Counter::default(),
            adapter_bindings: Counter::default(),
            adapter_evictions: Counter::default(),
            adapter_cold_loads: Counter::default(),
            scaling: Family::default(),
            gpu_health_changes: Counter::default(),
            leading: Gauge::default(),
        };
        // Every label value a dashboard may select exists from the first scrape.
        for c in Controller::ALL {
            let _ = m.reconciles.get_or_create(&ControllerLabels { controller: c.as_str() });
            let _ = m.reconcile_errors.get_or_create(&ControllerLabels { controller: c.as_str() });
        }
        for code in UnplaceableCode::ALL {
            let _ = m.pending.get_or_create(&ReasonLabels { reason: code.as_str() });
        }
        for direction in ["up", "down"] {
            let _ = m.scaling.get_or_create(&DirectionLabels { direction });
        }
        m
    }
}

impl Metrics {
    /// Decisions `controller` has made so far.
    pub fn reconciles(&self, controller: Controller) -> u64 {
        self.reconciles.get_or_create(&ControllerLabels { controller: controller.as_str() }).get()
    }

    /// One pass of `controller`'s reconcile loop (a decision made).
    pub fn reconciled(&self, controller: Controller) {
        self.reconciles.get_or_create(&ControllerLabels { controller: controller.as_str() }).inc();
    }

    /// A pass of `controller` that ended in an error (its actor is rebuilt).
    pub fn reconcile_failed(&self, controller: Controller) {
        self.reconcile_errors.get_or_create(&ControllerLabels { controller: controller.as_str() }).inc();
    }

    pub fn proposed(&self, controller: Controller, result: Proposal) {
        let labels = ProposalLabels { controller: controller.as_str(), result: result.as_str() };
        self.proposals.get_or_create(&labels).inc();
    }

    /// Replicas left Pending by the last scheduling round: one code each (every reason's
    /// gauge is set, to zero when none).
    pub fn set_pending(&self, unplaced: impl IntoIterator<Item = UnplaceableCode>) {
        let mut counts = [0i64; UnplaceableCode::ALL.len()];
        for code in unplaced {
            if let Some(i) = UnplaceableCode::ALL.iter().position(|c| *c == code) {
                counts[i] += 1;
            }
        }
        for (code, n) in UnplaceableCode::ALL.iter().zip(counts) {
            self.pending.get_or_create(&ReasonLabels { reason: code.as_str() }).set(n);
        }
    }

    /// A change of a model's desired replicas by its autoscaler.
    pub fn scaled(&self, up: bool) {
        self.scaling.get_or_create(&DirectionLabels { direction: if up { "up" } else { "down" } }).inc();
    }

    /// Adds every metric to `registry` (the server's, prefix `flotilla_`) as
    /// `flotilla_controller_*`, with the fleet's state read from `reader` at each scrape.
    pub fn register(&self, registry: &mut Registry, reader: StoreReader) {
        let r = registry.sub_registry_with_prefix("controller");
        r.register_collector(Box::new(FleetGauges { reader, leading: self.leading.clone() }));
        r.register("reconciles", "Reconcile passes (decisions made), by controller", self.reconciles.clone());
        r.register(
            "reconcile_errors",
            "Reconcile passes that ended in an uncertain write or a failure (the actor is rebuilt), by controller",
            self.reconcile_errors.clone(),
        );
        r.register(
            "proposals",
            "Raft proposals made by the controllers, by controller and result (applied, conflict, not_leader, uncertain, error)",
            self.proposals.clone(),
        );
        r.register("bindings", "Replicas bound to a node by the scheduler", self.bindings.clone());
        r.register("schedule_rounds", "Scheduling rounds run", self.schedule_rounds.clone());
        r.register(
            "placement_duration_seconds",
            "Time from a replica first seen Pending by the leader's scheduler to its binding, seconds",
            self.placement_seconds.clone(),
        );
        r.register(
            "pending_replicas",
            "Replicas the last scheduling round could not place, by reason (zero off the leader)",
            self.pending.clone(),
        );
        r.register("replicas_created", "Replicas created by the model controllers", self.replicas_created.clone());
        r.register(
            "replicas_rescheduled",
            "Replicas unbound for rescheduling because their node was lost",
            self.replicas_rescheduled.clone(),
        );
        r.register("heartbeats", "Agent heartbeats received", self.heartbeats.clone());
        r.register("actor_restarts", "Controller actors rebuilt by their supervisor", self.actor_restarts.clone());
        r.register("adapter_bindings", "Adapters assigned to a replica", self.adapter_bindings.clone());
        r.register(
            "adapter_evictions",
            "Adapter bindings removed to free a slot for another adapter",
            self.adapter_evictions.clone(),
        );
        r.register(
            "adapter_cold_loads",
            "Adapter requests that had to load the adapter first",
            self.adapter_cold_loads.clone(),
        );
        r.register(
            "autoscaler_scalings",
            "Changes of a model's desired replicas by its autoscaler, by direction",
            self.scaling.clone(),
        );
        r.register(
            "gpu_health_changes",
            "GPU health state changes recorded in node statuses",
            self.gpu_health_changes.clone(),
        );
        r.register("leading", "1 while this server leads and its controllers run", self.leading.clone());
    }

    /// `(name, value)` of the unlabelled counters, for tests and the scheduler benchmark.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("flotilla_controller_bindings_total", self.bindings.get()),
            ("flotilla_controller_schedule_rounds_total", self.schedule_rounds.get()),
            ("flotilla_controller_replicas_created_total", self.replicas_created.get()),
            ("flotilla_controller_replicas_rescheduled_total", self.replicas_rescheduled.get()),
            ("flotilla_controller_heartbeats_total", self.heartbeats.get()),
            ("flotilla_controller_actor_restarts_total", self.actor_restarts.get()),
            ("flotilla_controller_adapter_bindings_total", self.adapter_bindings.get()),
            ("flotilla_controller_adapter_evictions_total", self.adapter_evictions.get()),
            ("flotilla_controller_adapter_cold_loads_total", self.adapter_cold_loads.get()),
            ("flotilla_controller_gpu_health_changes_total", self.gpu_health_changes.get()),
        ]
    }
}

const NODE_STATES: [(NodeState, &str); 5] = [
    (NodeState::Ready, "Ready"),
    (NodeState::NotReady, "NotReady"),
    (NodeState::Cordoned, "Cordoned"),
    (NodeState::Draining, "Draining"),
    (NodeState::Drained, "Drained"),
];

const REPLICA_PHASES: [(ReplicaPhase, &str); 7] = [
    (ReplicaPhase::Pending, "Pending"),
    (ReplicaPhase::Scheduled, "Scheduled"),
    (ReplicaPhase::Starting, "Starting"),
    (ReplicaPhase::Ready, "Ready"),
    (ReplicaPhase::Draining, "Draining"),
    (ReplicaPhase::Stopped, "Stopped"),
    (ReplicaPhase::Failed, "Failed"),
];

/// The fleet's state, counted from the store at each scrape while this server leads (absent
/// elsewhere, so a sum over servers counts each object once): `nodes{state}`,
/// `nodes_unschedulable{why}` (cordoned or draining by spec), `replicas{phase}`,
/// `gpus{state}` (free, allocated, unhealthy).
pub struct FleetGauges {
    reader: StoreReader,
    leading: Gauge,
}

impl std::fmt::Debug for FleetGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetGauges").field("leading", &self.leading.get()).finish_non_exhaustive()
    }
}

/// What [`FleetGauges`] reports, counted from the objects.
#[derive(Debug, Default, PartialEq)]
pub struct FleetCounts {
    pub nodes: [i64; 5],
    pub cordoned: i64,
    pub draining: i64,
    pub replicas: [i64; 7],
    pub gpus_free: i64,
    pub gpus_allocated: i64,
    pub gpus_unhealthy: i64,
}

impl FleetCounts {
    pub fn of(nodes: &[NodeView], replicas: &[ReplicaView]) -> FleetCounts {
        let mut c = FleetCounts::default();
        for n in nodes {
            if let Some(i) = NODE_STATES.iter().position(|(s, _)| *s == n.status.state) {
                c.nodes[i] += 1;
            }
            c.cordoned += i64::from(n.spec.cordoned);
            c.draining += i64::from(n.spec.draining);
            c.gpus_free += n.free_gpus() as i64;
            c.gpus_allocated += n.status.allocations.len() as i64;
            c.gpus_unhealthy += n.status.unhealthy_gpus.len() as i64;
        }
        for r in replicas {
            if let Some(i) = REPLICA_PHASES.iter().position(|(p, _)| *p == r.phase()) {
                c.replicas[i] += 1;
            }
        }
        c
    }
}

fn gauge_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    values: &[(&str, i64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (value, n) in values {
        ConstGauge::new(*n).encode(family.encode_family(&[(label, *value)])?)?;
    }
    Ok(())
}

impl Collector for FleetGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.leading.get() != 1 {
            return Ok(());
        }
        let all = LabelSelector::default();
        let nodes: Vec<NodeView> =
            self.reader.list(Kind::Node, &all).0.iter().filter_map(|o| NodeView::from_stored(o).ok()).collect();
        let replicas: Vec<ReplicaView> =
            self.reader.list(Kind::Replica, &all).0.iter().filter_map(|o| ReplicaView::from_stored(o).ok()).collect();
        let c = FleetCounts::of(&nodes, &replicas);
        let states: Vec<(&str, i64)> = NODE_STATES.iter().zip(c.nodes).map(|((_, s), n)| (*s, n)).collect();
        gauge_family(&mut encoder, "nodes", "Nodes by state (leader only)", "state", &states)?;
        gauge_family(
            &mut encoder,
            "nodes_unschedulable",
            "Nodes an operator cordoned or is draining (leader only)",
            "why",
            &[("cordoned", c.cordoned), ("draining", c.draining)],
        )?;
        let phases: Vec<(&str, i64)> = REPLICA_PHASES.iter().zip(c.replicas).map(|((_, p), n)| (*p, n)).collect();
        gauge_family(&mut encoder, "replicas", "Replicas by phase (leader only)", "phase", &phases)?;
        gauge_family(
            &mut encoder,
            "gpus",
            "GPUs of all nodes: free (healthy, unbound), allocated, unhealthy (leader only)",
            "state",
            &[("free", c.gpus_free), ("allocated", c.gpus_allocated), ("unhealthy", c.gpus_unhealthy)],
        )?;
        Ok(())
    }
}
