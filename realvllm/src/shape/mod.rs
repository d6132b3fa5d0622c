//! Shape comparison of what a client or the control plane observes from two engines (the
//! sim and a real vLLM): JSON bodies, server-sent-event streams, error answers and
//! Prometheus scrapes. Every function is pure — text in, a list of [`Difference`]s out
//! (empty = conformant) — so the same code checks stored samples in CI
//! (`tests/samples.rs`) and a live vLLM (`tests/real_vllm.rs`).
//!
//! ```text
//!  sim answer ──┐
//!               ├─> json_shape_diff / sse_diff / error_diff / metrics_diff ──> Vec<Difference>
//!  real answer ─┘        ^
//!                        └── KNOWN_DIFFERENCES (path, reason): the deliberate ones, skipped
//! ```
//!
//! Paths: JSON values are `$.a.b`, array elements `[]` (`$.choices[].delta.role`); stream
//! chunks are prefixed by their kind (`sse[finish] $.choices[].stop_reason`); metric
//! families are `metric:NAME`. A known difference's path may use `*` (any characters) and
//! also covers everything below it.

mod json;
mod metrics;
mod sse;

use std::fmt;

pub use json::{error_diff, json_shape_diff};
pub use metrics::{family_names, metrics_diff, missing_families, parse_metrics, Family, Scrape};
pub use sse::{chunk_kind, parse_sse, sse_diff, ChunkKind, SseEvent};

/// One observable way in which the sim differs from real vLLM.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Difference {
    /// Where: `$.choices[].message.tool_calls`, `sse[usage] $.usage`, `metric:vllm:x`, `status`.
    pub path: String,
    /// What, in words, naming both sides.
    pub what: String,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.what)
    }
}

pub(crate) fn diff(path: impl Into<String>, what: impl Into<String>) -> Difference {
    Difference { path: path.into(), what: what.into() }
}

/// A deliberate difference: the path it covers and why the sim keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownDifference {
    /// A path pattern (`*` matches any characters; the pattern covers its sub-paths too).
    pub path: &'static str,
    /// Why the sim differs there (also listed in `docs/sim.md`, "Known differences").
    pub reason: &'static str,
}

/// The sim's deliberate differences from vLLM 0.32, the one list that the tests ignore and
/// `docs/sim.md` ("Known differences from real vLLM") documents.
pub const KNOWN_DIFFERENCES: &[KnownDifference] = &[
    KnownDifference {
        path: "metric:*_created",
        reason: "prometheus_client's creation-time gauges; Prometheus drops them by default and nothing in flotilla reads them",
    },
    KnownDifference {
        path: "metric:python_*",
        reason: "Python interpreter (gc, version) metrics; the sim is not a Python process",
    },
    KnownDifference {
        path: "metric:process_*",
        reason: "the Python process collector (memory, CPU, fds); the sim's own process figures would say nothing about an engine",
    },
    KnownDifference {
        path: "metric:http_*",
        reason: "prometheus-fastapi-instrumentator's per-handler HTTP metrics; the sim models the engine, not the web framework",
    },
    KnownDifference {
        path: "metric:vllm:estimated_*_per_gpu_total",
        reason: "model FLOPs utilisation estimates; the sim has a latency model, not a FLOP or byte count",
    },
];

/// [`KNOWN_DIFFERENCES`], as a function.
pub fn known_differences() -> &'static [KnownDifference] {
    KNOWN_DIFFERENCES
}

/// The vLLM metric families that flotilla's control plane and dashboards read, by TYPE-line
/// name (`metrics_diff` also accepts them without the `_total` of a counter).
pub const CONTROL_PLANE_FAMILIES: &[&str] = &[
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:num_requests_waiting_by_reason",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "vllm:num_preemptions_total",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:request_time_per_output_token_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:request_prompt_tokens",
    "vllm:request_generation_tokens",
    "vllm:lora_requests_info",
    "vllm:cache_config_info",
];

/// `*` matches any run of characters; everything else literally.
fn glob(pattern: &str, text: &str) -> bool {
    let Some((head, rest)) = pattern.split_once('*') else {
        return pattern == text;
    };
    let Some(mut tail) = text.strip_prefix(head) else {
        return false;
    };
    loop {
        if glob(rest, tail) {
            return true;
        }
        let mut chars = tail.chars();
        if chars.next().is_none() {
            return false;
        }
        tail = chars.as_str();
    }
}

/// Whether `pattern` covers `path`: the path itself or anything below it.
pub fn covers(pattern: &str, path: &str) -> bool {
    glob(pattern, path) || glob(&format!("{pattern}.*"), path) || glob(&format!("{pattern}[*"), path)
}

/// The known difference covering `path`, if one does.
pub fn known<'a>(path: &str, ignored: &'a [KnownDifference]) -> Option<&'a KnownDifference> {
    ignored.iter().find(|k| covers(k.path, path))
}

/// `diffs` less those a known difference covers.
pub fn without_known(diffs: Vec<Difference>, ignored: &[KnownDifference]) -> Vec<Difference> {
    diffs.into_iter().filter(|d| known(&d.path, ignored).is_none()).collect()
}

#[cfg(test)]
mod tests;
