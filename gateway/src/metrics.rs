//! Prometheus metrics served on `/metrics`: per model and endpoint requests, errors by
//! code, TTFT, TPOT, end-to-end latency, tokens in and out; queue wait per class; per
//! tenant requests, tokens and rejections; retries and ejections; on-demand adapter loads
//! (cold loads per adapter, the wait of requests that needed one, load errors by reason);
//! scale from zero (requests held per model, their hold time, hold timeouts); demand
//! reports by result; requests in flight per tenant and streams ended at
//! `--max-stream-duration`.
//!
//! Label values are bounded: models and adapters are names the gateway knows (a name a
//! client made up is `unknown`, `Gateway::model_label`), tenants are `Tenant` objects or
//! `anonymous`, endpoints come from the endpoint table.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub model: String,
    pub endpoint: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenizerLabels {
    pub model: String,
    /// `/tokenize` or `/detokenize`.
    pub path: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub model: String,
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub model: String,
    pub endpoint: String,
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub model: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub model: String,
    pub priority: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    pub tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantTokenLabels {
    pub tenant: String,
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub tenant: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdapterLabels {
    pub adapter: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FetchLabels {
    /// `ok` or `error`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PdLabels {
    pub model: String,
    /// `remote` (prefilled on the prefill pool), `local-short`, `local-cached` (the decider
    /// kept it on the decode engine) or `fallback` (every prefill attempt failed).
    pub split: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

fn latency_hist() -> Histogram {
    Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0])
}

fn tpot_hist() -> Histogram {
    Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64])
}

/// Every gateway metric.
pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub ttft: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    pub tpot: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    pub e2e: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    pub queue_wait: Family<QueueLabels, Histogram, fn() -> Histogram>,
    pub tokens: Family<TokenLabels, Counter>,
    pub in_flight: Family<EndpointLabels, Gauge>,
    pub retries: Family<EndpointLabels, Counter>,
    pub ejections: Family<EndpointLabels, Counter>,
    pub tenant_requests: Family<TenantLabels, Counter>,
    pub tenant_tokens: Family<TenantTokenLabels, Counter>,
    pub tenant_rejections: Family<RejectLabels, Counter>,
    pub adapter_cold_loads: Family<AdapterLabels, Counter>,
    pub adapter_cold_load_seconds: Histogram,
    pub adapter_load_errors: Family<ReasonLabels, Counter>,
    pub held_requests: Family<ModelLabels, Gauge>,
    pub cold_start_seconds: Histogram,
    pub held_timeouts: Family<ModelLabels, Counter>,
    pub demand_reports: Family<ResultLabels, Counter>,
    pub tokenizer_requests: Family<TokenizerLabels, Counter>,
    pub tenant_in_flight: Family<TenantLabels, Gauge>,
    pub stream_duration_exceeded: Family<ModelLabels, Counter>,
    /// TLS handshakes refused or timed out on an HTTPS `--listen`.
    pub tls_handshake_failures: Counter,
    /// kv-aware: prompt tokens routed with token ids, and of those the tokens predicted
    /// cached on the chosen engine (the index's accuracy against the engines'
    /// `vllm:prefix_cache_hits_total`).
    pub kv_prompt_tokens: Family<ModelLabels, Counter>,
    pub kv_predicted_hit_tokens: Family<ModelLabels, Counter>,
    /// kv-aware: the model's KV index: (engine, block) entries, bytes, engines followed.
    pub kv_index_entries: Family<ModelLabels, Gauge>,
    pub kv_index_bytes: Family<ModelLabels, Gauge>,
    pub kv_followers: Family<ModelLabels, Gauge>,
    /// kv-aware: followers that stopped (stream broken, gap not replayable) and restarted.
    pub kv_follow_restarts: Family<ModelLabels, Counter>,
    /// Tokenizer fetches from Models' sources by result (`source_tokenizers`).
    pub tokenizer_fetches: Family<FetchLabels, Counter>,
    /// 1 where a model routed on token ids has its tokenizer here, 0 where its prompts are
    /// keyed approximately.
    pub kv_token_exact: Family<ModelLabels, Gauge>,
    /// P/D: requests of a disaggregated model by how they were split.
    pub pd_requests: Family<PdLabels, Counter>,
    /// P/D: the prefill leg's time (request to the prefill engine's answer).
    pub pd_prefill_seconds: Family<ModelLabels, Histogram, fn() -> Histogram>,
    /// P/D: prefill attempts that failed (and were retried elsewhere or fell back).
    pub pd_prefill_failures: Family<ModelLabels, Counter>,
    /// P/D: decode attempts that failed before the first byte and were retried with a
    /// fresh prefill.
    pub pd_decode_retries: Family<ModelLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("flotilla_gateway");
        let requests = Family::default();
        let errors = Family::default();
        let ttft = Family::<EndpointLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_hist);
        let tpot = Family::<EndpointLabels, Histogram, fn() -> Histogram>::new_with_constructor(tpot_hist);
        let e2e = Family::<EndpointLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_hist);
        let queue_wait = Family::<QueueLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_hist);
        let tokens = Family::default();
        let in_flight = Family::default();
        let retries = Family::default();
        let ejections = Family::default();
        let tenant_requests = Family::default();
        let tenant_tokens = Family::default();
        let tenant_rejections = Family::default();
        let adapter_cold_loads = Family::default();
        let adapter_cold_load_seconds =
            Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0]);
        let adapter_load_errors = Family::default();
        let held_requests = Family::default();
        let cold_start_seconds = Histogram::new([0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0]);
        let held_timeouts = Family::default();
        let demand_reports = Family::default();
        let tokenizer_requests = Family::default();
        let tenant_in_flight = Family::default();
        let stream_duration_exceeded = Family::default();
        let tls_handshake_failures = Counter::default();
        let kv_prompt_tokens = Family::default();
        let kv_predicted_hit_tokens = Family::default();
        let kv_index_entries = Family::default();
        let kv_index_bytes = Family::default();
        let kv_followers = Family::default();
        let kv_follow_restarts = Family::default();
        let tokenizer_fetches = Family::default();
        let kv_token_exact = Family::default();
        registry.register(
            "tokenizer_fetches",
            "Tokenizer fetches from Models' sources (for kv-aware routing) by result",
            tokenizer_fetches.clone(),
        );
        registry.register(
            "kv_token_exact",
            "1 where a model routed on token ids has its tokenizer (prompts keyed exactly), 0 where keyed approximately",
            kv_token_exact.clone(),
        );
        let pd_requests = Family::default();
        let pd_prefill_seconds =
            Family::<ModelLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_hist);
        let pd_prefill_failures = Family::default();
        let pd_decode_retries = Family::default();
        registry.register("pd_requests", "Requests of disaggregated models by split", pd_requests.clone());
        registry.register(
            "pd_prefill_seconds",
            "Time of the prefill leg of disaggregated requests",
            pd_prefill_seconds.clone(),
        );
        registry.register(
            "pd_prefill_failures",
            "Prefill attempts of disaggregated requests that failed",
            pd_prefill_failures.clone(),
        );
        registry.register(
            "pd_decode_retries",
            "Decode attempts that failed before the first byte and were retried with a fresh prefill",
            pd_decode_retries.clone(),
        );
        registry.register(
            "kv_prompt_tokens",
            "Prompt tokens routed by kv-aware with token ids",
            kv_prompt_tokens.clone(),
        );
        registry.register(
            "kv_predicted_hit_tokens",
            "Prompt tokens kv-aware predicted cached on the engine it chose (compare vllm:prefix_cache_hits_total)",
            kv_predicted_hit_tokens.clone(),
        );
        registry.register(
            "kv_index_entries",
            "(engine, block) entries in a model's KV index",
            kv_index_entries.clone(),
        );
        registry.register("kv_index_bytes", "Approximate bytes of a model's KV index", kv_index_bytes.clone());
        registry.register("kv_followers", "Engines whose KV events this gateway follows", kv_followers.clone());
        registry.register(
            "kv_follow_restarts",
            "KV event followers that stopped (stream broken, a gap not replayable) and were started again",
            kv_follow_restarts.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes on the HTTPS listener that failed or timed out",
            tls_handshake_failures.clone(),
        );
        registry.register(
            "tenant_in_flight_requests",
            "Requests of a tenant in flight on this gateway (bounded by max_concurrent_requests)",
            tenant_in_flight.clone(),
        );
        registry.register(
            "stream_duration_exceeded",
            "Streamed responses ended by the gateway at --max-stream-duration",
            stream_duration_exceeded.clone(),
        );
        registry.register("requests", "Requests answered, by model, endpoint and status code", requests.clone());
        registry.register(
            "tokenizer_requests",
            "/tokenize and /detokenize calls answered, by model, path and status code",
            tokenizer_requests.clone(),
        );
        registry.register("errors", "Requests that failed, by model and error code", errors.clone());
        registry.register("time_to_first_token_seconds", "Time to first token", ttft.clone());
        registry.register("time_per_output_token_seconds", "Time per output token after the first", tpot.clone());
        registry.register("e2e_request_latency_seconds", "End-to-end request latency", e2e.clone());
        registry.register("queue_wait_seconds", "Time waiting in the QoS queue", queue_wait.clone());
        registry.register("tokens", "Tokens in (prompt) and out (completion)", tokens.clone());
        registry.register("in_flight_requests", "Requests in flight per endpoint", in_flight.clone());
        registry.register("retries", "Attempts moved to another endpoint", retries.clone());
        registry.register("ejections", "Outlier ejections of an endpoint", ejections.clone());
        registry.register("tenant_requests", "Requests admitted per tenant", tenant_requests.clone());
        registry.register("tenant_tokens", "Tokens used per tenant", tenant_tokens.clone());
        registry.register("tenant_rejections", "Requests refused per tenant and reason", tenant_rejections.clone());
        registry.register(
            "adapter_cold_loads",
            "EnsureLoaded calls of this gateway that loaded the adapter (cold starts)",
            adapter_cold_loads.clone(),
        );
        registry.register(
            "adapter_cold_load_seconds",
            "Time a request for an adapter no endpoint held waited for its on-demand load",
            adapter_cold_load_seconds.clone(),
        );
        registry.register(
            "adapter_load_errors",
            "Failed EnsureLoaded calls by reason (not_found, failed_precondition, deadline_exceeded, no_leader, other)",
            adapter_load_errors.clone(),
        );
        registry.register(
            "held_requests",
            "Requests held because their model has no ready endpoint (scale from zero)",
            held_requests.clone(),
        );
        registry.register(
            "cold_start_seconds",
            "Time a request was held for its model's first ready endpoint until released",
            cold_start_seconds.clone(),
        );
        registry.register(
            "held_timeouts",
            "Held requests answered 503 because no endpoint appeared within their hold deadline",
            held_timeouts.clone(),
        );
        registry.register(
            "demand_reports",
            "Demand reports sent to the leader, by result (ok, error)",
            demand_reports.clone(),
        );
        Metrics {
            registry,
            requests,
            errors,
            ttft,
            tpot,
            e2e,
            queue_wait,
            tokens,
            in_flight,
            retries,
            ejections,
            tenant_requests,
            tenant_tokens,
            tenant_rejections,
            adapter_cold_loads,
            adapter_cold_load_seconds,
            adapter_load_errors,
            held_requests,
            cold_start_seconds,
            held_timeouts,
            demand_reports,
            tokenizer_requests,
            tenant_in_flight,
            stream_duration_exceeded,
            tls_handshake_failures,
            kv_prompt_tokens,
            kv_predicted_hit_tokens,
            kv_index_entries,
            kv_index_bytes,
            kv_followers,
            kv_follow_restarts,
            tokenizer_fetches,
            kv_token_exact,
            pd_requests,
            pd_prefill_seconds,
            pd_prefill_failures,
            pd_decode_retries,
        }
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }

    pub fn reject(&self, tenant: &str, reason: &str) {
        self.tenant_rejections.get_or_create(&RejectLabels { tenant: tenant.into(), reason: reason.into() }).inc();
    }

    /// One failed request: `code` is the gateway's [`crate::error::ApiCode`] string, or the
    /// engine's HTTP status (`499`: the client left).
    pub fn error(&self, model: &str, code: &str) {
        self.errors.get_or_create(&ErrorLabels { model: model.into(), code: code.into() }).inc();
    }
}
