//! Metric standardization: a Prometheus text-exposition parser and the mapping from each
//! engine family's metric names onto one [`EngineMetrics`], the load signals routing and
//! autoscaling read. Pure: no I/O, unit-tested against real vLLM scrapes and the sim.
//!
//! ```text
//!  GET /metrics text ──samples()──> Sample{name, labels, value} ──NAMES──> EngineMetrics
//!                                   (NaN/±Inf, histograms and        (sum or max over
//!                                    unknown names dropped)           label sets)
//! ```
//!
//! # Name table
//!
//! | field | vLLM V1 | older vLLM (V0 engine, early V1) | SGLang | over label sets |
//! |---|---|---|---|---|
//! | `running` | `vllm:num_requests_running` | same | `sglang:num_running_reqs` | sum |
//! | `waiting` | `vllm:num_requests_waiting` | same | `sglang:num_queue_reqs` | sum |
//! | `kv_cache_usage` | `vllm:kv_cache_usage_perc` | `vllm:gpu_cache_usage_perc` | `sglang:token_usage` | max |
//! | `prompt_tokens` | `vllm:prompt_tokens_total` | same | `sglang:prompt_tokens_total` | sum |
//! | `generation_tokens` | `vllm:generation_tokens_total` | same | `sglang:generation_tokens_total` | sum |
//! | `prefix_cache_queries` | `vllm:prefix_cache_queries_total` | `vllm:gpu_prefix_cache_queries[_total]` | — | sum |
//! | `prefix_cache_hits` | `vllm:prefix_cache_hits_total` | `vllm:gpu_prefix_cache_hits[_total]` | — | sum |
//! | `preemptions` | `vllm:num_preemptions_total` | same | — | sum |
//! | `requests_finished` | `vllm:request_success_total` (every `finished_reason`) | same | — | sum |
//! | `lora` | `vllm:lora_requests_info` | same | — | the sample with the largest value |
//!
//! Label sets are the several `engine="0"`, `engine="1"`… series of a data-parallel vLLM, or
//! several `model_name`s. Requests and counters add up across them. KV-cache usage is the
//! **maximum**: a data-parallel engine whose one part is full preempts or queues there even
//! if the others are empty, so it is as full as its fullest part (an average would call a
//! half-saturated engine half empty). Usage is clamped to `[0, 1]`.
//!
//! When an exposition has both a V1 name and its older counterpart for one field, the V1
//! name wins. [`EngineFlavor`] records which family was recognised, so an engine exposing
//! none of these names ([`EngineFlavor::Unknown`]) is distinguishable from one at zero load.
//!
//! Counters are cumulative since the engine started; consumers compute rates from two
//! scrapes, and a decrease means the engine restarted.
//!
//! `vllm:lora_requests_info` is a gauge whose value is a Unix timestamp and whose labels
//! carry the state (`running_lora_adapters` and `waiting_lora_adapters`: comma-separated
//! adapter names, `max_lora`); vLLM keeps one series per distinct label set, so the newest
//! (largest value) is the current one.

use std::borrow::Cow;

/// One sample line of a text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    /// Metric name, e.g. `vllm:num_requests_running` or `..._bucket`.
    pub name: &'a str,
    /// Labels in written order, values unescaped.
    pub labels: Vec<(&'a str, Cow<'a, str>)>,
    /// The value (may be NaN or ±Inf when parsed by [`parse_line`]).
    pub value: f64,
    /// The optional timestamp as written (milliseconds in the Prometheus text format).
    pub timestamp: Option<f64>,
}

impl Sample<'_> {
    /// The value of label `key`.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| *k == key).map(|(_, v)| v.as_ref())
    }
}

/// Every well-formed sample line of `text` with a finite value; comments (`# HELP`,
/// `# TYPE`), blank and malformed lines, NaN and ±Inf are skipped.
pub fn samples(text: &str) -> impl Iterator<Item = Sample<'_>> {
    text.lines().filter_map(parse_line).filter(|s| s.value.is_finite())
}

/// Parses one line: `name{label="value",...} value [timestamp]`. None for comments,
/// blank lines and anything malformed. Label values may hold spaces, commas, braces and
/// the escapes `\"`, `\\` and `\n`.
pub fn parse_line(line: &str) -> Option<Sample<'_>> {
    let line = line.trim_matches([' ', '\t', '\r']);
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
    let name = &line[..name_end];
    if !valid_metric_name(name) {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = parse_labels(r, &mut labels)?;
    }
    // An OpenMetrics exemplar (`# {...} v`) may follow the value or timestamp.
    let mut fields = rest.split_ascii_whitespace().take_while(|t| !t.starts_with('#'));
    let value = fields.next()?.parse::<f64>().ok()?;
    let timestamp = fields.next().map(str::parse::<f64>).transpose().ok()?;
    match fields.next() {
        Some(_) => None,
        None => Some(Sample { name, labels, value, timestamp }),
    }
}

fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses `k="v",...}` (after the opening brace) into `out`; returns what follows `}`.
fn parse_labels<'a>(mut s: &'a str, out: &mut Vec<(&'a str, Cow<'a, str>)>) -> Option<&'a str> {
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Some(rest);
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim_end();
        if !valid_label_name(key) {
            return None;
        }
        let (value, rest) = parse_quoted(s[eq + 1..].trim_start().strip_prefix('"')?)?;
        out.push((key, value));
        s = rest.trim_start();
        match s.strip_prefix(',') {
            Some(r) => s = r,
            None if s.starts_with('}') => {}
            None => return None,
        }
    }
}

/// Reads a label value up to its closing quote (`s` starts after the opening one),
/// unescaping `\"`, `\\` and `\n`; unknown escapes are kept as written.
fn parse_quoted(s: &str) -> Option<(Cow<'_, str>, &str)> {
    let bytes = s.as_bytes();
    let mut owned: Option<String> = None;
    let (mut i, mut start) = (0, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                let value = match owned {
                    Some(mut o) => {
                        o.push_str(&s[start..i]);
                        Cow::Owned(o)
                    }
                    None => Cow::Borrowed(&s[..i]),
                };
                return Some((value, &s[i + 1..]));
            }
            b'\\' => {
                let o = owned.get_or_insert_with(String::new);
                o.push_str(&s[start..i]);
                let (ch, used) = match bytes.get(i + 1) {
                    Some(b'n') => ('\n', 2),
                    Some(b'\\') => ('\\', 2),
                    Some(b'"') => ('"', 2),
                    _ => ('\\', 1),
                };
                o.push(ch);
                i += used;
                start = i;
            }
            _ => i += 1,
        }
    }
    None
}

/// Which engine family's metric names an exposition used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum EngineFlavor {
    /// vLLM with the V1 names (`vllm:kv_cache_usage_perc`, `vllm:prefix_cache_*`), or
    /// only names every vLLM shares.
    Vllm,
    /// Older vLLM (`vllm:gpu_cache_usage_perc`, `vllm:gpu_prefix_cache_*`).
    VllmLegacy,
    /// SGLang (`sglang:*`).
    Sglang,
    /// None of the known names: load figures are unknown, not zero.
    #[default]
    Unknown,
}

/// LoRA state from `vllm:lora_requests_info`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoraInfo {
    /// `max_lora`: adapters one batch may hold.
    pub max_lora: Option<u32>,
    /// Adapters with running requests.
    pub running: Vec<String>,
    /// Adapters with waiting requests.
    pub waiting: Vec<String>,
}

/// One engine's load signals, standardized across engine families (see the module doc's
/// name table). Request counts are gauges; token, cache, preemption and request counters
/// are cumulative since the engine started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineMetrics {
    /// Which names were recognised.
    pub flavor: EngineFlavor,
    /// Requests in the running batch.
    pub running: f64,
    /// Requests queued.
    pub waiting: f64,
    /// KV-cache usage in `[0, 1]` (max over label sets).
    pub kv_cache_usage: f64,
    /// Prompt (prefill) tokens processed.
    pub prompt_tokens: f64,
    /// Tokens generated.
    pub generation_tokens: f64,
    /// Prefix-cache lookups, in tokens.
    pub prefix_cache_queries: f64,
    /// Prefix-cache hits, in tokens.
    pub prefix_cache_hits: f64,
    /// Preemptions.
    pub preemptions: f64,
    /// Finished requests, every finish reason (`vllm:request_success_total`).
    pub requests_finished: f64,
    /// LoRA state, when the engine reports it.
    pub lora: Option<LoraInfo>,
}

#[derive(Clone, Copy)]
enum Field {
    Running,
    Waiting,
    KvUsage,
    PromptTokens,
    GenerationTokens,
    PrefixQueries,
    PrefixHits,
    Preemptions,
    RequestsFinished,
}
const FIELDS: usize = 9;

#[derive(Clone, Copy, PartialEq)]
enum Source {
    /// Only vLLM V1 has it.
    V1,
    /// Every vLLM has it.
    Shared,
    /// Only older vLLM has it; a V1 name for the same field wins.
    Legacy,
    Sglang,
}

/// The name table of the module doc.
const NAMES: &[(&str, Source, Field)] = &[
    ("vllm:num_requests_running", Source::Shared, Field::Running),
    ("vllm:num_requests_waiting", Source::Shared, Field::Waiting),
    ("vllm:kv_cache_usage_perc", Source::V1, Field::KvUsage),
    ("vllm:gpu_cache_usage_perc", Source::Legacy, Field::KvUsage),
    ("vllm:prompt_tokens_total", Source::Shared, Field::PromptTokens),
    ("vllm:generation_tokens_total", Source::Shared, Field::GenerationTokens),
    ("vllm:prefix_cache_queries_total", Source::V1, Field::PrefixQueries),
    ("vllm:prefix_cache_hits_total", Source::V1, Field::PrefixHits),
    ("vllm:gpu_prefix_cache_queries_total", Source::Legacy, Field::PrefixQueries),
    ("vllm:gpu_prefix_cache_queries", Source::Legacy, Field::PrefixQueries),
    ("vllm:gpu_prefix_cache_hits_total", Source::Legacy, Field::PrefixHits),
    ("vllm:gpu_prefix_cache_hits", Source::Legacy, Field::PrefixHits),
    ("vllm:num_preemptions_total", Source::Shared, Field::Preemptions),
    ("vllm:request_success_total", Source::Shared, Field::RequestsFinished),
    ("sglang:num_running_reqs", Source::Sglang, Field::Running),
    ("sglang:num_queue_reqs", Source::Sglang, Field::Waiting),
    ("sglang:token_usage", Source::Sglang, Field::KvUsage),
    ("sglang:prompt_tokens_total", Source::Sglang, Field::PromptTokens),
    ("sglang:generation_tokens_total", Source::Sglang, Field::GenerationTokens),
];

const LORA_INFO: &str = "vllm:lora_requests_info";

/// Sums (or maxes) per field, kept apart for primary names and legacy fallbacks.
#[derive(Default)]
struct Acc {
    primary: [Option<f64>; FIELDS],
    legacy: [Option<f64>; FIELDS],
}

impl Acc {
    fn add(&mut self, field: Field, legacy: bool, v: f64) {
        let slot = match legacy {
            true => &mut self.legacy[field as usize],
            false => &mut self.primary[field as usize],
        };
        *slot = Some(match (field, *slot) {
            (_, None) => v,
            (Field::KvUsage, Some(old)) => old.max(v),
            (_, Some(old)) => old + v,
        });
    }

    fn get(&self, field: Field) -> f64 {
        self.primary[field as usize].or(self.legacy[field as usize]).unwrap_or(0.0)
    }
}

impl EngineMetrics {
    /// Standardizes a Prometheus text exposition (see the module doc).
    pub fn parse(text: &str) -> EngineMetrics {
        let mut acc = Acc::default();
        let (mut v1, mut shared, mut legacy, mut sglang) = (false, false, false, false);
        let mut lora: Option<(f64, LoraInfo)> = None;
        // Only lines of known names are parsed in full (a real page is mostly histograms).
        let known = |line: &&str| {
            let name = line.trim_start().split(['{', ' ', '\t']).next().unwrap_or("");
            name == LORA_INFO || NAMES.iter().any(|(n, _, _)| *n == name)
        };
        for s in text.lines().filter(known).filter_map(parse_line).filter(|s| s.value.is_finite()) {
            if s.name == LORA_INFO {
                shared = true;
                if lora.as_ref().is_none_or(|(best, _)| s.value > *best) {
                    lora = Some((s.value, lora_info(&s)));
                }
                continue;
            }
            let Some(&(_, source, field)) = NAMES.iter().find(|(n, _, _)| *n == s.name) else { continue };
            match source {
                Source::V1 => v1 = true,
                Source::Shared => shared = true,
                Source::Legacy => legacy = true,
                Source::Sglang => sglang = true,
            }
            acc.add(field, source == Source::Legacy, s.value);
        }
        let flavor = match () {
            _ if v1 => EngineFlavor::Vllm,
            _ if legacy => EngineFlavor::VllmLegacy,
            _ if shared => EngineFlavor::Vllm,
            _ if sglang => EngineFlavor::Sglang,
            _ => EngineFlavor::Unknown,
        };
        EngineMetrics {
            flavor,
            running: acc.get(Field::Running),
            waiting: acc.get(Field::Waiting),
            kv_cache_usage: acc.get(Field::KvUsage).clamp(0.0, 1.0),
            prompt_tokens: acc.get(Field::PromptTokens),
            generation_tokens: acc.get(Field::GenerationTokens),
            prefix_cache_queries: acc.get(Field::PrefixQueries),
            prefix_cache_hits: acc.get(Field::PrefixHits),
            preemptions: acc.get(Field::Preemptions),
            requests_finished: acc.get(Field::RequestsFinished),
            lora: lora.map(|(_, info)| info),
        }
    }

    /// True when some known metric name was found (the figures mean something).
    pub fn is_known(&self) -> bool {
        self.flavor != EngineFlavor::Unknown
    }

    /// Prefix-cache hits over queries since the engine started; None before any query.
    pub fn prefix_cache_hit_rate(&self) -> Option<f64> {
        (self.prefix_cache_queries > 0.0).then(|| self.prefix_cache_hits / self.prefix_cache_queries)
    }
}

fn lora_info(s: &Sample<'_>) -> LoraInfo {
    let names = |key: &str| -> Vec<String> {
        s.label(key).unwrap_or("").split(',').map(str::trim).filter(|n| !n.is_empty()).map(str::to_string).collect()
    };
    LoraInfo {
        max_lora: s.label("max_lora").and_then(|m| m.trim().parse().ok()),
        running: names("running_lora_adapters"),
        waiting: names("waiting_lora_adapters"),
    }
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;
