//! Prometheus metrics of a server: Raft state gauges (refreshed at scrape time), the apply
//! latency histogram, gRPC request counts and latencies per method and status code, and
//! forwards to a leader abandoned when the leader changed. Code running inside the server
//! (the controllers) adds its own metrics under `flotilla_` with [`Metrics::register`].
use std::sync::{Arc, RwLock};
use tokio::time::Instant;

use openraft::{BasicNode, RaftMetrics};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tonic::Status;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    method: &'static str,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

type HistogramFamily = Family<MethodLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.25 ms .. ~8 s
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// All metrics of one server. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Metrics {
    registry: Arc<RwLock<Registry>>,
    term: Gauge,
    leader_id: Gauge,
    is_leader: Gauge,
    last_log_index: Gauge,
    applied_index: Gauge,
    commit_index: Gauge,
    snapshot_index: Gauge,
    members: Gauge,
    store_revision: Gauge,
    apply_seconds: Histogram,
    grpc_requests: Family<GrpcLabels, Counter>,
    grpc_seconds: HistogramFamily,
    forwards_abandoned: Counter,
    campaigns: Counter,
    leader_gone: Counter,
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let mut r = Registry::with_prefix("flotilla");
        let m = Metrics {
            registry: Arc::default(),
            term: Gauge::default(),
            leader_id: Gauge::default(),
            is_leader: Gauge::default(),
            last_log_index: Gauge::default(),
            applied_index: Gauge::default(),
            commit_index: Gauge::default(),
            snapshot_index: Gauge::default(),
            members: Gauge::default(),
            store_revision: Gauge::default(),
            apply_seconds: latency_histogram(),
            grpc_requests: Family::default(),
            grpc_seconds: HistogramFamily::new_with_constructor(latency_histogram),
            forwards_abandoned: Counter::default(),
            campaigns: Counter::default(),
            leader_gone: Counter::default(),
        };
        r.register("raft_term", "Current Raft term", m.term.clone());
        r.register("raft_leader_id", "ID of the known leader (0: none)", m.leader_id.clone());
        r.register("raft_is_leader", "1 if this server is the leader", m.is_leader.clone());
        r.register("raft_last_log_index", "Index of the last log entry", m.last_log_index.clone());
        r.register(
            "raft_applied_index",
            "Index of the last entry applied to the state machine",
            m.applied_index.clone(),
        );
        r.register(
            "raft_commit_index",
            "Index known committed by a majority (leader only; else the applied index)",
            m.commit_index.clone(),
        );
        r.register("raft_snapshot_index", "Last log index covered by the current snapshot", m.snapshot_index.clone());
        r.register("raft_members", "Members (voters and learners) in the configuration", m.members.clone());
        r.register("store_revision", "Store revision of the applied state", m.store_revision.clone());
        r.register(
            "apply_duration_seconds",
            "Time from proposing a write to its result, seconds",
            m.apply_seconds.clone(),
        );
        r.register("grpc_requests", "gRPC requests handled, by method and status code", m.grpc_requests.clone());
        r.register("grpc_request_duration_seconds", "gRPC request latency, seconds", m.grpc_seconds.clone());
        r.register(
            "forwards_abandoned",
            "Requests forwarded to a leader and abandoned because this server's view of the leader changed (then retried)",
            m.forwards_abandoned.clone(),
        );
        r.register(
            "raft_campaigns_started",
            "Elections this server started at once on rejecting a candidate whose log is shorter than its own",
            m.campaigns.clone(),
        );
        r.register(
            "raft_leader_gone_campaigns",
            "Elections this server started at once because its silent leader's address refused connections (its process was gone)",
            m.leader_gone.clone(),
        );
        Metrics { registry: Arc::new(RwLock::new(r)), ..m }
    }

    /// Lets `add` register more metrics, named `flotilla_<name>` (scraped with the rest).
    pub(crate) fn register(&self, add: impl FnOnce(&mut Registry)) {
        add(&mut self.registry.write().unwrap_or_else(|e| e.into_inner()));
    }

    pub(crate) fn grpc_timer(&self, method: &'static str) -> GrpcTimer {
        GrpcTimer { metrics: self.clone(), method, start: Instant::now() }
    }

    pub(crate) fn campaign_started(&self) {
        self.campaigns.inc();
    }

    pub(crate) fn leader_gone(&self) {
        self.leader_gone.inc();
    }

    pub(crate) fn forward_abandoned(&self) {
        self.forwards_abandoned.inc();
    }

    pub(crate) fn observe_apply(&self, start: Instant) {
        self.apply_seconds.observe(start.elapsed().as_secs_f64());
    }

    /// Refreshes the Raft gauges from openraft's metrics and renders Prometheus text 0.0.4.
    pub(crate) fn render(&self, raft: &RaftMetrics<u64, BasicNode>, store_revision: u64) -> String {
        let applied = raft.last_applied.map_or(0, |l| l.index);
        self.term.set(raft.current_term as i64);
        self.leader_id.set(raft.current_leader.unwrap_or(0) as i64);
        self.is_leader.set(i64::from(raft.current_leader == Some(raft.id)));
        self.last_log_index.set(raft.last_log_index.unwrap_or(0) as i64);
        self.applied_index.set(applied as i64);
        self.commit_index.set(crate::node::commit_index(raft).unwrap_or(applied) as i64);
        self.snapshot_index.set(raft.snapshot.map_or(0, |l| l.index) as i64);
        self.members.set(raft.membership_config.nodes().count() as i64);
        self.store_revision.set(store_revision as i64);
        let mut out = String::new();
        let registry = self.registry.read().unwrap_or_else(|e| e.into_inner());
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encoding to a String");
        flotilla_api::metrics_text::to_prometheus_text(&out)
    }
}

/// Measures one gRPC call; `finish` records its latency and status code.
pub(crate) struct GrpcTimer {
    metrics: Metrics,
    method: &'static str,
    start: Instant,
}

impl GrpcTimer {
    pub(crate) fn finish<T>(self, r: Result<T, Status>) -> Result<T, Status> {
        let code = match &r {
            Ok(_) => "OK".to_owned(),
            Err(s) => format!("{:?}", s.code()),
        };
        self.metrics.grpc_requests.get_or_create(&GrpcLabels { method: self.method, code }).inc();
        self.metrics
            .grpc_seconds
            .get_or_create(&MethodLabels { method: self.method })
            .observe(self.start.elapsed().as_secs_f64());
        r
    }
}
