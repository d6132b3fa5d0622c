//! The global gateway's Prometheus metrics (prefix `flotilla_gateway_federation_`, served
//! on its `/metrics` as the cluster gateway serves its own): requests by cluster, model and
//! outcome; failovers and spillovers by cluster and reason; per member its up gauge,
//! latency EWMA and requests in flight; request duration; Cluster lists and member polls
//! by result; failed TLS handshakes on an HTTPS listener.
//!
//! Label values are bounded: `cluster` is a `Cluster` object's name (or `none` for
//! requests answered by the global gateway itself), `model` a model some member serves
//! (else `unknown`), `outcome` an HTTP status or one of the gateway's error codes, `reason`
//! one of [`super::proxy::Reason`]'s.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub cluster: String,
    pub model: String,
    /// The HTTP status relayed (`200`, `429`, ...; `499`: the client left), or the global
    /// gateway's own error code (`invalid_api_key`, `upstream_error`, ...).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The cluster that was left.
    pub cluster: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PollLabels {
    pub cluster: String,
    /// `ok` or `error`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

fn duration_hist() -> Histogram {
    Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0])
}

/// Every metric of the global gateway.
pub struct FedMetrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub failovers: Family<ReasonLabels, Counter>,
    pub spillovers: Family<ReasonLabels, Counter>,
    pub member_up: Family<ClusterLabels, Gauge>,
    pub member_latency: Family<ClusterLabels, Gauge<f64, AtomicU64>>,
    pub member_in_flight: Family<ClusterLabels, Gauge>,
    pub request_duration: Family<ClusterLabels, Histogram, fn() -> Histogram>,
    pub cluster_lists: Family<ResultLabels, Counter>,
    pub clusters: Gauge,
    pub member_polls: Family<PollLabels, Counter>,
    pub tls_handshake_failures: Counter,
}

impl Default for FedMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl FedMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("flotilla_gateway_federation");
        let m = FedMetrics {
            requests: Family::default(),
            failovers: Family::default(),
            spillovers: Family::default(),
            member_up: Family::default(),
            member_latency: Family::default(),
            member_in_flight: Family::default(),
            request_duration: Family::new_with_constructor(duration_hist),
            cluster_lists: Family::default(),
            clusters: Gauge::default(),
            member_polls: Family::default(),
            tls_handshake_failures: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by the cluster that answered (none: the global gateway itself), model and outcome",
            m.requests.clone(),
        );
        registry.register(
            "failovers",
            "Attempts moved to another cluster because this one failed before answering (connect_error, timeout, transport_error, status_5xx, model_not_found)",
            m.failovers.clone(),
        );
        registry.register(
            "spillovers",
            "Attempts moved to another cluster because this one was saturated (status_429, status_503, queue_wait)",
            m.spillovers.clone(),
        );
        registry.register(
            "member_up",
            "1 while the member cluster's gateway answers, 0 while it is down",
            m.member_up.clone(),
        );
        registry.register(
            "member_latency_ewma_seconds",
            "EWMA of the member gateway's time to response headers (requests and polls)",
            m.member_latency.clone(),
        );
        registry.register(
            "member_in_flight_requests",
            "Requests of this gateway in flight on the member cluster",
            m.member_in_flight.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to the end of its response, by the cluster that answered",
            m.request_duration.clone(),
        );
        registry.register(
            "cluster_lists",
            "Cluster lists from the federation servers, by result",
            m.cluster_lists.clone(),
        );
        registry.register("clusters", "Member clusters with a gateway in the last Cluster list", m.clusters.clone());
        registry.register("member_polls", "Polls of members' /v1/models, by result", m.member_polls.clone());
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes on the HTTPS listener that failed or timed out",
            m.tls_handshake_failures.clone(),
        );
        FedMetrics { registry, ..m }
    }

    /// The Prometheus text of every metric.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        flotilla_api::metrics_text::to_prometheus_text(&s)
    }

    pub fn request(&self, cluster: &str, model: &str, outcome: &str) {
        self.requests
            .get_or_create(&RequestLabels { cluster: cluster.into(), model: model.into(), outcome: outcome.into() })
            .inc();
    }

    /// Forgets a member's gauges (it left the federation).
    pub fn forget(&self, cluster: &str) {
        let l = ClusterLabels { cluster: cluster.into() };
        self.member_up.remove(&l);
        self.member_latency.remove(&l);
        self.member_in_flight.remove(&l);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_prefixed_and_counters_named_by_their_total() {
        let m = FedMetrics::new();
        m.request("us-east", "llama", "200");
        m.member_up.get_or_create(&ClusterLabels { cluster: "us-east".into() }).set(1);
        m.member_latency.get_or_create(&ClusterLabels { cluster: "us-east".into() }).set(0.012);
        let text = m.encode();
        assert!(text.contains("# TYPE flotilla_gateway_federation_requests_total counter"), "{text}");
        assert!(
            text.contains(
                r#"flotilla_gateway_federation_requests_total{cluster="us-east",model="llama",outcome="200"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"flotilla_gateway_federation_member_up{cluster="us-east"} 1"#), "{text}");
        assert!(text.contains(r#"flotilla_gateway_federation_member_latency_ewma_seconds{cluster="us-east"} 0.012"#));
        m.forget("us-east");
        assert!(!m.encode().contains("member_up{"));
    }
}
