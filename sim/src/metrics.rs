//! Prometheus exposition of vLLM's own metric names, types and labels (as scraped from a
//! real vLLM 0.32: `shared/real-vllm/metrics-vllm-0.32.0.txt`), written by the engine task
//! once per step and rendered on `GET /metrics`. Simulated seconds, not wall seconds.

use std::fmt::Write as _;

/// A cumulative histogram with fixed upper bounds (the `+Inf` bucket is implicit).
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &[f64]) -> Self {
        Histogram { bounds: bounds.to_vec(), counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }

    /// Records one value.
    pub fn observe(&mut self, v: f64) {
        let v = if v.is_finite() { v.max(0.0) } else { 0.0 };
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sum of observations.
    pub fn sum(&self) -> f64 {
        self.sum
    }
}

const TTFT: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
];
const TOKEN_LATENCY: &[f64] =
    &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const REQUEST_LATENCY: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
];
const PARAMS_N: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0];
const PREEMPTIONS: &[f64] = &[1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0];

/// vLLM's `build_1_2_5_buckets(max_model_len)`.
fn buckets_1_2_5(max: u32) -> Vec<f64> {
    let mut out = Vec::new();
    let mut exp = 1.0;
    'outer: loop {
        for m in [1.0, 2.0, 5.0] {
            let v: f64 = m * exp;
            if v > f64::from(max) {
                break 'outer;
            }
            out.push(v);
        }
        exp *= 10.0;
    }
    out
}

/// vLLM V1's fixed iteration-token buckets.
const ITERATION_TOKENS: &[f64] =
    &[1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0];

/// Finished-reason labels, in vLLM's order.
pub const FINISH_REASONS: [&str; 5] = ["stop", "length", "abort", "error", "repetition"];

/// What `vllm:cache_config_info` reports about the KV cache.
#[derive(Debug, Clone, Copy)]
pub struct CacheInfo {
    /// Tokens per block.
    pub block_size: u32,
    /// Blocks in the cache.
    pub num_gpu_blocks: u32,
    /// `--num-gpu-blocks`, when given.
    pub num_gpu_blocks_override: Option<u32>,
    /// Automatic prefix caching on.
    pub prefix_caching: bool,
    /// `--max-model-len` (for `kv_cache_max_concurrency`).
    pub max_model_len: u32,
    /// KV bytes per token of the profile's model (for `kv_cache_memory_bytes`).
    pub kv_bytes_per_token: u64,
}

/// Every value the simulator exposes.
#[derive(Debug, Clone)]
pub struct Metrics {
    model: String,
    /// `vllm:num_requests_running`.
    pub running: u64,
    /// `vllm:num_requests_waiting`.
    pub waiting: u64,
    /// Waiting for a LoRA slot (`reason="deferred"`).
    pub deferred: u64,
    /// `vllm:kv_cache_usage_perc` (0..1).
    pub kv_usage: f64,
    /// `vllm:prefix_cache_queries_total` in tokens.
    pub prefix_queries: u64,
    /// `vllm:prefix_cache_hits_total` in tokens.
    pub prefix_hits: u64,
    /// `vllm:num_preemptions_total`.
    pub preemptions: u64,
    /// `vllm:prompt_tokens_total`.
    pub prompt_tokens: u64,
    /// Prompt tokens served from the prefix cache or a KV transfer.
    pub prompt_cached: u64,
    /// Of those, from a KV transfer (`source="external_kv_transfer"`).
    pub prompt_external: u64,
    /// `vllm:external_prefix_cache_queries_total` (prompt tokens of P/D decode requests).
    pub external_queries: u64,
    /// `vllm:external_prefix_cache_hits_total` (tokens installed from a KV transfer).
    pub external_hits: u64,
    /// The NIXL connector's metrics (rendered only with `--kv-transfer-config`).
    pub nixl: Nixl,
    /// `vllm:generation_tokens_total`.
    pub generation_tokens: u64,
    /// `vllm:request_success_total` by [`FINISH_REASONS`] index.
    pub success: [u64; 5],
    /// LoRA info gauge labels: (max_lora, running, waiting), when LoRA is enabled.
    pub lora: Option<(u32, String, String)>,
    /// `vllm:cache_config_info` labels, rendered once by [`Metrics::set_cache_config`].
    cache_config: Option<String>,
    /// `vllm:request_prompt_tokens`.
    pub h_prompt_tokens: Histogram,
    /// `vllm:request_generation_tokens`.
    pub h_generation_tokens: Histogram,
    /// `vllm:iteration_tokens_total`.
    pub h_iteration_tokens: Histogram,
    /// `vllm:request_max_num_generation_tokens`.
    pub h_max_generation_tokens: Histogram,
    /// `vllm:request_params_n`.
    pub h_params_n: Histogram,
    /// `vllm:request_params_max_tokens`.
    pub h_params_max_tokens: Histogram,
    /// `vllm:time_to_first_token_seconds`.
    pub h_ttft: Histogram,
    /// `vllm:inter_token_latency_seconds`.
    pub h_itl: Histogram,
    /// `vllm:request_time_per_output_token_seconds`.
    pub h_tpot: Histogram,
    /// `vllm:e2e_request_latency_seconds`.
    pub h_e2e: Histogram,
    /// `vllm:request_queue_time_seconds`.
    pub h_queue: Histogram,
    /// `vllm:request_inference_time_seconds`.
    pub h_inference: Histogram,
    /// `vllm:request_prefill_time_seconds`.
    pub h_prefill: Histogram,
    /// `vllm:request_decode_time_seconds`.
    pub h_decode: Histogram,
    /// `vllm:request_num_preemptions`.
    pub h_num_preemptions: Histogram,
    /// `vllm:request_prefill_kv_computed_tokens`.
    pub h_prefill_kv_computed: Histogram,
}

impl Metrics {
    /// All zero, with bucket bounds derived from the limits as vLLM does.
    pub fn new(model: &str, max_model_len: u32, max_loras: Option<u32>) -> Self {
        let len = buckets_1_2_5(max_model_len);
        Metrics {
            model: escape(model),
            running: 0,
            waiting: 0,
            deferred: 0,
            kv_usage: 0.0,
            prefix_queries: 0,
            prefix_hits: 0,
            preemptions: 0,
            prompt_tokens: 0,
            prompt_cached: 0,
            prompt_external: 0,
            external_queries: 0,
            external_hits: 0,
            nixl: Nixl::default(),
            generation_tokens: 0,
            success: [0; 5],
            lora: max_loras.map(|m| (m, String::new(), String::new())),
            cache_config: None,
            h_prompt_tokens: Histogram::new(&len),
            h_generation_tokens: Histogram::new(&len),
            h_iteration_tokens: Histogram::new(ITERATION_TOKENS),
            h_max_generation_tokens: Histogram::new(&len),
            h_params_n: Histogram::new(PARAMS_N),
            h_params_max_tokens: Histogram::new(&len),
            h_ttft: Histogram::new(TTFT),
            h_itl: Histogram::new(TOKEN_LATENCY),
            h_tpot: Histogram::new(TOKEN_LATENCY),
            h_e2e: Histogram::new(REQUEST_LATENCY),
            h_queue: Histogram::new(REQUEST_LATENCY),
            h_inference: Histogram::new(REQUEST_LATENCY),
            h_prefill: Histogram::new(REQUEST_LATENCY),
            h_decode: Histogram::new(REQUEST_LATENCY),
            h_num_preemptions: Histogram::new(PREEMPTIONS),
            h_prefill_kv_computed: Histogram::new(&len),
        }
    }

    /// Fills `vllm:cache_config_info` (vLLM's CacheConfig as labels) from the engine's cache.
    pub fn set_cache_config(&mut self, c: &CacheInfo) {
        let tokens = u64::from(c.num_gpu_blocks) * u64::from(c.block_size);
        let py_bool = |b: bool| if b { "True" } else { "False" };
        let override_ = c.num_gpu_blocks_override.map_or("None".to_string(), |n| n.to_string());
        let concurrency = tokens as f64 / f64::from(c.max_model_len.max(1));
        let (bs, blocks, prefix) = (c.block_size, c.num_gpu_blocks, py_bool(c.prefix_caching));
        let bytes = tokens * c.kv_bytes_per_token;
        let labels: [(&str, String); 37] = [
            ("_block_size_resolved", "True".into()),
            ("block_size", bs.to_string()),
            ("cache_dtype", "auto".into()),
            ("cache_hit_alignment_tokens", "None".into()),
            ("effective_attention_block_size", bs.to_string()),
            ("enable_mamba_shared_prefix_checkpoint", "False".into()),
            ("enable_prefix_caching", prefix.into()),
            ("engine", "0".into()),
            ("gpu_memory_utilization", "0.9".into()),
            ("hash_block_size", "None".into()),
            ("is_attention_free", "False".into()),
            ("kv_cache_dtype_skip_layers", "[]".into()),
            ("kv_cache_layout", "None".into()),
            ("kv_cache_max_concurrency", format!("{concurrency:?}")),
            ("kv_cache_memory_bytes", bytes.to_string()),
            ("kv_cache_size_tokens", tokens.to_string()),
            ("kv_offloading_backend", "native".into()),
            ("kv_offloading_size", "None".into()),
            ("kv_sharing_fast_prefill", "False".into()),
            ("mamba_block_size", "None".into()),
            ("mamba_cache_dtype", "auto".into()),
            ("mamba_cache_mode", "none".into()),
            ("mamba_page_size_padded", "None".into()),
            ("mamba_ssm_cache_dtype", "auto".into()),
            ("num_cpu_blocks", "None".into()),
            ("num_gpu_blocks", blocks.to_string()),
            ("num_gpu_blocks_override", override_),
            ("prefix_cache_retention_interval", "0".into()),
            ("prefix_caching_hash_algo", "sha256".into()),
            ("prefix_match_unit", "None".into()),
            ("replayssm_buffer_len", "16".into()),
            ("skip_page_size_padded", "None".into()),
            ("sliding_window", "None".into()),
            ("swa_bounded_replay", "True".into()),
            ("use_kda_recoverssm", "False".into()),
            ("use_replayssm", "False".into()),
            ("user_specified_block_size", "False".into()),
        ];
        let body: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        self.cache_config = Some(body.join(","));
    }

    /// Prometheus text format (version 0.0.4).
    pub fn render(&self, now_unix: f64) -> String {
        let mut w = Writer { out: String::with_capacity(16 * 1024), model: &self.model };
        w.family("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.");
        w.sample("vllm:num_requests_running", None, self.running as f64);
        w.family("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.");
        w.sample("vllm:num_requests_waiting", None, self.waiting as f64);
        w.family(
            "vllm:num_requests_waiting_by_reason",
            "gauge",
            "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.",
        );
        let deferred = self.deferred.min(self.waiting);
        w.sample("vllm:num_requests_waiting_by_reason", Some(("reason", "capacity")), (self.waiting - deferred) as f64);
        w.sample("vllm:num_requests_waiting_by_reason", Some(("reason", "deferred")), deferred as f64);
        w.family(
            "vllm:engine_sleep_state",
            "gauge",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
        );
        for (state, v) in [("awake", 1.0), ("weights_offloaded", 0.0), ("discard_all", 0.0)] {
            w.sample("vllm:engine_sleep_state", Some(("sleep_state", state)), v);
        }
        w.family("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.");
        w.sample("vllm:kv_cache_usage_perc", None, self.kv_usage);
        w.counter(
            "vllm:prefix_cache_queries_total",
            "Prefix cache queries, in terms of number of queried tokens.",
            self.prefix_queries,
        );
        w.counter(
            "vllm:prefix_cache_hits_total",
            "Prefix cache hits, in terms of number of cached tokens.",
            self.prefix_hits,
        );
        // no multimodal inputs; the external ones stay 0 without a KV connector, as on a real text-only vLLM
        w.counter(
            "vllm:external_prefix_cache_queries_total",
            "External prefix cache queries from KV connector cross-instance cache sharing, in terms of number of queried tokens.",
            self.external_queries,
        );
        w.counter(
            "vllm:external_prefix_cache_hits_total",
            "External prefix cache hits from KV connector cross-instance cache sharing, in terms of number of cached tokens.",
            self.external_hits,
        );
        w.counter("vllm:mm_cache_queries_total", "Multi-modal cache queries, in terms of number of queried items.", 0);
        w.counter("vllm:mm_cache_hits_total", "Multi-modal cache hits, in terms of number of cached items.", 0);
        w.counter("vllm:num_preemptions_total", "Cumulative number of preemption from the engine.", self.preemptions);
        w.counter("vllm:prompt_tokens_total", "Number of prefill tokens processed.", self.prompt_tokens);
        w.family("vllm:prompt_tokens_by_source_total", "counter", "Number of prompt tokens by source.");
        let computed = self.prompt_tokens - self.prompt_cached.min(self.prompt_tokens);
        w.sample("vllm:prompt_tokens_by_source_total", Some(("source", "local_compute")), computed as f64);
        let external = self.prompt_external.min(self.prompt_cached);
        let local_hit = (self.prompt_cached - external) as f64;
        w.sample("vllm:prompt_tokens_by_source_total", Some(("source", "local_cache_hit")), local_hit);
        w.sample("vllm:prompt_tokens_by_source_total", Some(("source", "external_kv_transfer")), external as f64);
        w.counter(
            "vllm:prompt_tokens_cached_total",
            "Number of cached prompt tokens (local + external).",
            self.prompt_cached,
        );
        w.family(
            "vllm:prompt_tokens_cached_by_source_total",
            "counter",
            "Prefix-cache hit tokens by the cache tier that supplied them: device (local HBM), host (offloaded to DRAM), disk, p2p (transferred from another vLLM instance) or external_unspecified. Counted at admission; sums to vllm:prefix_cache_hits + vllm:external_prefix_cache_hits.",
        );
        for source in ["device", "host", "p2p", "disk", "external_unspecified"] {
            let v = match source {
                "device" => self.prefix_hits,
                "p2p" => self.external_hits,
                _ => 0,
            };
            w.sample("vllm:prompt_tokens_cached_by_source_total", Some(("source", source)), v as f64);
        }
        w.counter("vllm:generation_tokens_total", "Number of generation tokens processed.", self.generation_tokens);
        w.family("vllm:request_success_total", "counter", "Count of successfully processed requests.");
        for (reason, n) in FINISH_REASONS.iter().zip(self.success) {
            w.sample("vllm:request_success_total", Some(("finished_reason", reason)), n as f64);
        }
        let hists: [(&str, &str, &Histogram); 16] = [
            ("vllm:request_prompt_tokens", "Number of prefill tokens processed.", &self.h_prompt_tokens),
            ("vllm:request_generation_tokens", "Number of generation tokens processed.", &self.h_generation_tokens),
            ("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", &self.h_iteration_tokens),
            (
                "vllm:request_max_num_generation_tokens",
                "Histogram of maximum number of requested generation tokens.",
                &self.h_max_generation_tokens,
            ),
            ("vllm:request_params_n", "Histogram of the n request parameter.", &self.h_params_n),
            (
                "vllm:request_params_max_tokens",
                "Histogram of the max_tokens request parameter.",
                &self.h_params_max_tokens,
            ),
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", &self.h_ttft),
            ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", &self.h_itl),
            (
                "vllm:request_time_per_output_token_seconds",
                "Histogram of time_per_output_token_seconds per request.",
                &self.h_tpot,
            ),
            ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", &self.h_e2e),
            ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", &self.h_queue),
            (
                "vllm:request_inference_time_seconds",
                "Histogram of time spent in RUNNING phase for request.",
                &self.h_inference,
            ),
            (
                "vllm:request_prefill_time_seconds",
                "Histogram of time spent in PREFILL phase for request.",
                &self.h_prefill,
            ),
            (
                "vllm:request_decode_time_seconds",
                "Histogram of time spent in DECODE phase for request.",
                &self.h_decode,
            ),
            (
                "vllm:request_num_preemptions",
                "Histogram of the number of times a request was preempted.",
                &self.h_num_preemptions,
            ),
            (
                "vllm:request_prefill_kv_computed_tokens",
                "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
                &self.h_prefill_kv_computed,
            ),
        ];
        w.family(
            "vllm:admission_rejections_total",
            "counter",
            "Number of admission attempts rejected by a queue limit, by reason.",
        );
        for reason in ["max_num_queued_reqs", "max_num_queued_tokens"] {
            // no engine label here in vLLM; the sim has no queue limit, so never rejects
            let _ = writeln!(
                w.out,
                "vllm:admission_rejections_total{{model_name=\"{}\",reason=\"{reason}\"}} 0.0",
                self.model
            );
        }
        for (name, help, h) in hists {
            w.histogram(name, help, h);
        }
        if let Some(labels) = &self.cache_config {
            w.family("vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig");
            let _ = writeln!(w.out, "vllm:cache_config_info{{{labels}}} 1.0");
        }
        if let Some((max_lora, running, waiting)) = &self.lora {
            w.family("vllm:lora_requests_info", "gauge", "Running stats on lora requests.");
            let _ = writeln!(
                w.out,
                "vllm:lora_requests_info{{max_lora=\"{max_lora}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} {now_unix:?}",
                escape(running),
                escape(waiting)
            );
        }
        if self.nixl.enabled {
            self.nixl.render(&mut w);
        }
        w.out
    }
}

/// The NIXL connector's metrics (vLLM's `NixlPromMetrics`), in simulated seconds.
#[derive(Debug, Clone)]
pub struct Nixl {
    /// Rendered (a KV connector is configured).
    pub enabled: bool,
    /// `vllm:nixl_xfer_time_seconds`: one observation per pull.
    pub xfer_time: Histogram,
    /// `vllm:nixl_bytes_transferred`.
    pub bytes: Histogram,
    /// `vllm:nixl_num_failed_transfers` (decode side; `_total` as prometheus_client writes counters).
    pub failed: u64,
    /// `vllm:nixl_num_kv_expired_reqs` (prefill side).
    pub kv_expired: u64,
}

impl Default for Nixl {
    fn default() -> Self {
        let bytes: Vec<f64> = (1..25).step_by(2).map(|i: i32| 2f64.powi(10 + i)).collect(); // vLLM's buckets
        Nixl {
            enabled: false,
            xfer_time: Histogram::new(&[0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0]),
            bytes: Histogram::new(&bytes),
            failed: 0,
            kv_expired: 0,
        }
    }
}

impl Nixl {
    fn render(&self, w: &mut Writer<'_>) {
        w.histogram(
            "vllm:nixl_xfer_time_seconds",
            "Histogram of transfer duration for NIXL KV Cache transfers.",
            &self.xfer_time,
        );
        w.histogram(
            "vllm:nixl_bytes_transferred",
            "Histogram of bytes transferred per NIXL KV Cache transfers.",
            &self.bytes,
        );
        w.counter(
            "vllm:nixl_num_failed_transfers_total",
            "Number of failed NIXL KV Cache transfers, including handshake and notification failures. NOTE: KV expiry is tracked separately in vllm:nixl_num_kv_expired_reqs.",
            self.failed,
        );
        w.counter(
            "vllm:nixl_num_kv_expired_reqs_total",
            "Number of requests that had their KV expire. NOTE: This metric is tracked on the P instance.",
            self.kv_expired,
        );
    }
}

/// Escapes a label value for the text format.
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

struct Writer<'a> {
    out: String,
    model: &'a str,
}

impl Writer<'_> {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample with `engine`, optional `le`-free extra label, and `model_name`, in the
    /// alphabetical order vLLM's Python client writes them.
    fn sample(&mut self, name: &str, extra: Option<(&str, &str)>, v: f64) {
        let _ = write!(self.out, "{name}{{engine=\"0\",");
        match extra {
            Some((k, val)) if k < "model_name" => {
                let _ = write!(self.out, "{k}=\"{val}\",model_name=\"{}\"}}", self.model);
            }
            Some((k, val)) => {
                let _ = write!(self.out, "model_name=\"{}\",{k}=\"{val}\"}}", self.model);
            }
            None => {
                let _ = write!(self.out, "model_name=\"{}\"}}", self.model);
            }
        }
        let _ = writeln!(self.out, " {v:?}");
    }

    fn counter(&mut self, name: &str, help: &str, v: u64) {
        self.family(name, "counter", help);
        self.sample(name, None, v as f64);
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.family(name, "histogram", help);
        let mut cum = 0;
        for (b, c) in h.bounds.iter().zip(&h.counts) {
            cum += c;
            let _ = writeln!(
                self.out,
                "{name}_bucket{{engine=\"0\",le=\"{b:?}\",model_name=\"{}\"}} {:?}",
                self.model, cum as f64
            );
        }
        let _ = writeln!(
            self.out,
            "{name}_bucket{{engine=\"0\",le=\"+Inf\",model_name=\"{}\"}} {:?}",
            self.model, h.count as f64
        );
        let _ = writeln!(self.out, "{name}_count{{engine=\"0\",model_name=\"{}\"}} {:?}", self.model, h.count as f64);
        let _ = writeln!(self.out, "{name}_sum{{engine=\"0\",model_name=\"{}\"}} {:?}", self.model, h.sum);
    }
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;
