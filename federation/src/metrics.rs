//! The federation controller's metrics (`flotilla_federation_*` on the server's /metrics).
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabel {
    cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    cluster: String,
    write: String,
    outcome: String,
}

/// Counters and gauges, cheap to clone.
#[derive(Clone, Default)]
pub struct Metrics {
    reachable: Family<ClusterLabel, Gauge>,
    writes: Family<WriteLabels, Counter>,
    ticks: Counter,
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "federation_cluster_reachable",
            "1 while a member cluster's API answered the federation's last read, else 0",
            self.reachable.clone(),
        );
        r.register(
            "federation_member_writes",
            "Member Model writes the federation made in member clusters, by cluster, write (create, update, delete) and outcome",
            self.writes.clone(),
        );
        r.register("federation_reconciles", "Reconcile passes of the federation controller", self.ticks.clone());
    }

    pub(crate) fn reachable(&self, cluster: &str, up: bool) {
        self.reachable.get_or_create(&ClusterLabel { cluster: cluster.into() }).set(i64::from(up));
    }

    pub(crate) fn member_write(&self, cluster: &str, write: &str, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.writes
            .get_or_create(&WriteLabels { cluster: cluster.into(), write: write.into(), outcome: outcome.into() })
            .inc();
    }

    pub(crate) fn tick(&self) {
        self.ticks.inc();
    }
}
