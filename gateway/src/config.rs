//! Command-line flags ([`GatewayArgs`]) and the validated, typed [`Config`] built from them
//! once at start-up. Every duration carries its unit in the flag name.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use flotilla_api::spec::{PriorityClass, RoutingStrategy};
use http::uri::Authority;

use crate::error::GatewayError;

/// `flotilla gateway` flags.
///
/// Example: `flotilla gateway --listen 0.0.0.0:8080 --backend llama=http://10.0.0.5:8000 --no-auth`
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// Address to serve the OpenAI API on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080", env = "FLOTILLA_GATEWAY_LISTEN")]
    pub listen: String,
    /// Static engine endpoint `MODEL=URL` (repeatable). When given, the gateway does not
    /// watch the cluster for endpoints; models use least-request and auth must be off or
    /// tenants come from the cluster.
    #[arg(long = "backend", value_name = "MODEL=URL")]
    pub backends: Vec<String>,
    /// The API key the static backends were started with (vLLM's --api-key), sent as the
    /// bearer token on every request to them; from the environment only, so it is not in
    /// `ps`. Engines without a key ignore it.
    #[arg(skip = std::env::var("FLOTILLA_BACKEND_API_KEY").ok())]
    pub backend_api_key: Option<String>,
    /// Serve without API keys (every request is tenant `anonymous`, no RPM/TPM limits).
    #[arg(long)]
    pub no_auth: bool,
    /// Largest accepted request body, in bytes (413 beyond it).
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Time a client has to send the request headers, in milliseconds (slowloris guard).
    #[arg(long, default_value_t = 10_000)]
    pub header_timeout_ms: u64,
    /// Time a client has to send the request body, in milliseconds (408 beyond it).
    #[arg(long, default_value_t = 30_000)]
    pub body_timeout_ms: u64,
    /// Time to open a TCP connection to an engine, in milliseconds.
    #[arg(long, default_value_t = 2_000)]
    pub connect_timeout_ms: u64,
    /// Time an engine has to send response headers, in seconds (504 beyond it).
    #[arg(long, default_value_t = 600)]
    pub upstream_timeout_s: u64,
    /// Longest silence between two chunks of a streamed response, in seconds.
    #[arg(long, default_value_t = 300)]
    pub stream_idle_timeout_s: u64,
    /// Extra attempts on another endpoint after a connect failure or a 5xx before the
    /// first byte.
    #[arg(long, default_value_t = 2)]
    pub max_retries: u32,
    /// Consecutive failures that eject an endpoint from routing.
    #[arg(long, default_value_t = 5)]
    pub eject_after_failures: u32,
    /// First ejection time in milliseconds (doubles on each re-ejection, up to 32x); then
    /// one probe request decides.
    #[arg(long, default_value_t = 10_000)]
    pub eject_base_ms: u64,
    /// An endpoint is saturated at this many gateway requests in flight.
    #[arg(long, default_value_t = 256)]
    pub max_in_flight_per_endpoint: u32,
    /// An endpoint is saturated when the engine reports this many waiting requests
    /// (0 disables the check).
    #[arg(long, default_value_t = 32)]
    pub max_engine_waiting: u32,
    /// An endpoint is saturated at this KV-cache usage, 0..=1 (0 disables the check).
    #[arg(long, default_value_t = 0.98)]
    pub max_kv_cache_usage: f64,
    /// Most requests waiting in the gateway per model; past it sheddable ones go first.
    #[arg(long, default_value_t = 4096)]
    pub max_queue: usize,
    /// Longest queue wait of a critical request, in milliseconds (then 503).
    #[arg(long, default_value_t = 60_000)]
    pub queue_deadline_critical_ms: u64,
    /// Longest queue wait of a standard request, in milliseconds (then 503).
    #[arg(long, default_value_t = 30_000)]
    pub queue_deadline_standard_ms: u64,
    /// Longest queue wait of a sheddable request, in milliseconds (then 503).
    #[arg(long, default_value_t = 2_000)]
    pub queue_deadline_sheddable_ms: u64,
    /// Number of gateway instances sharing tenant limits: each enforces RPM/N and TPM/N.
    #[arg(long, default_value_t = 1, env = "FLOTILLA_GATEWAY_REPLICAS")]
    pub gateway_replicas: u32,
    /// Prefix-cache routing: characters per hashed block (about 4 characters per token).
    #[arg(long, default_value_t = 64)]
    pub prefix_block_chars: usize,
    /// Prefix-cache routing: leave the best-matching endpoint when its load exceeds the
    /// least loaded one by this many requests (and by the relative threshold).
    #[arg(long, default_value_t = 8)]
    pub prefix_balance_abs: u32,
    /// Prefix-cache routing: ... and when its load exceeds `least * this`.
    #[arg(long, default_value_t = 1.5)]
    pub prefix_balance_rel: f64,
    /// The routing strategy of a static `--backend` model, MODEL=STRATEGY (repeatable; default
    /// least-request). Cluster models take their Model's `routing`; a request's
    /// `x-flotilla-routing` header overrides either.
    #[arg(long = "routing", value_name = "MODEL=STRATEGY")]
    pub routing: Vec<String>,
    /// Serve MODEL disaggregated (repeatable): prefill on the static `MODEL-prefill`
    /// backends, decode on the `MODEL-decode` backends, with vLLM's P/D protocol
    /// (docs/gateway.md, "Prefill/decode disaggregation"); the engines of both serve MODEL.
    /// Cluster models are disaggregated by their Model's `spec.disaggregation` instead.
    #[arg(long = "pd", value_name = "MODEL")]
    pub pd: Vec<String>,
    /// `--pd` models: prompts shorter than this many tokens are prefilled on the decode
    /// engine (a transfer costs more than it saves).
    #[arg(long, default_value_t = 256, value_name = "TOKENS")]
    pub pd_min_remote_prefill_tokens: u32,
    /// `--pd` models: when every prefill engine already has this many requests in flight,
    /// the decode engine computes the prompt itself (0: never for this reason).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub pd_max_prefill_queue: u32,
    /// The tokenizer of a model, MODEL=sim (the `flotilla sim` engine's) or MODEL=DIR (a
    /// Hugging Face model directory: tokenizer.json, tokenizer_config.json, chat template),
    /// repeatable. `kv-aware` routing needs it to key prompts exactly as the engine does;
    /// without one a model's kv-aware requests are routed by the approximate prefix index.
    #[arg(long = "tokenizer", value_name = "MODEL=SOURCE")]
    pub tokenizer: Vec<String>,
    /// kv-aware routing: the cost of one request in an engine's queue, in prompt tokens to
    /// compute (the cost of an engine = uncached prompt tokens + this × its queue).
    #[arg(long, default_value_t = 64.0, value_name = "TOKENS")]
    pub kv_load_weight: f64,
    /// kv-aware routing: the cost of one prompt token already sent to an engine and not yet
    /// begun, relative to one it must compute (1). Lower keeps requests sharing a prefix
    /// together while it is computed; higher spreads them (replicating the prefix).
    /// The default, 0.5, was chosen on bench/routing (docs/gateway.md).
    #[arg(long, default_value_t = 0.5, value_name = "WEIGHT")]
    pub kv_pending_weight: f64,
    /// kv-aware routing: the cost of one prompt token an engine holds offloaded (KV events
    /// with medium CPU or STORAGE: host memory, disk) and loads back, relative to one it must
    /// compute (1), within 0..=1 (1: offloaded blocks count for nothing; 0: as much as blocks
    /// on the GPU). The default, 0.25, is an estimate: vLLM measured 2-22× lower time to
    /// first token for prompts loaded from CPU memory than computed, more for longer ones
    /// (blog.vllm.ai, 2026-01-08, on its KV offloading connector, H100); by bandwidth,
    /// Llama-3.1-8B keeps 128 KiB of KV per token, which PCIe 5 moves at 25-50 GB/s (200k-400k
    /// tokens/s) while an H100 prefills some 30k tokens/s, so a loaded token costs under 0.15
    /// of a computed one. 0.25 errs toward computing: a model without grouped-query attention
    /// has 4× the bytes per token, and storage, slower than CPU memory, is weighted alike.
    #[arg(long, default_value_t = 0.25, value_name = "WEIGHT")]
    pub kv_offload_weight: f64,
    /// kv-aware routing: how long a request's prompt blocks count as held by the engine it
    /// was sent to before that engine's own KV event confirms them, in milliseconds.
    #[arg(long, default_value_t = 5_000, value_name = "MS")]
    pub kv_speculate_ms: u64,
    /// kv-aware routing: most (engine, block) entries a model's KV index keeps (about 66
    /// bytes each, in whatever tiers the engine holds the block); past it the oldest go first.
    #[arg(long, default_value_t = 1_000_000, value_name = "N")]
    pub kv_index_capacity: usize,
    /// Poll static backends' `/metrics` and `/v1/models` this often, in milliseconds
    /// (0: never; cluster endpoints get their load figures from the server).
    #[arg(long, default_value_t = 1_000)]
    pub scrape_interval_ms: u64,
    /// Longest wait for an on-demand LoRA adapter load (`EnsureLoaded` on the leader), in
    /// milliseconds, at most 120000; a request also waits no longer than its class's
    /// queue deadline. Cluster endpoints only.
    #[arg(long, default_value_t = 30_000)]
    pub adapter_load_timeout_ms: u64,
    /// Send the leader a demand report (`AutoscaleService.ReportDemand`) this often, in
    /// milliseconds (0: never). Cluster endpoints only.
    #[arg(long, default_value_t = 1_000)]
    pub demand_report_interval_ms: u64,
    /// Most requests held per model while it has no ready endpoint (scale from zero);
    /// past it, 503 with Retry-After (0: never hold). Cluster endpoints only.
    #[arg(long, default_value_t = 256)]
    pub max_held_per_model: usize,
    /// Longest hold of a request for a model without a ready endpoint, in milliseconds
    /// (a cold start of a GPU replica takes minutes); a request is held for the longer of
    /// this and its class's queue deadline, then gets 503 with Retry-After.
    #[arg(long, default_value_t = 120_000)]
    pub cold_start_timeout_ms: u64,
    /// Requests one tenant may have in flight on this gateway at once when its `Tenant`
    /// has no `max_concurrent_requests` (0: unbounded); past it, 429
    /// `concurrency_limit_exceeded` with Retry-After. Auth off: not applied.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub tenant_max_concurrency: u32,
    /// Longest a streamed response may last, with a unit: `ms`, `s`, `m` or `h` (e.g. `30m`,
    /// `90s`; `0`: no bound). Past it the gateway sends the client an SSE error event
    /// (`stream_duration_exceeded`), ends the stream and cancels the engine's request.
    #[arg(long, default_value = "30m", value_name = "DURATION")]
    pub max_stream_duration: String,
    /// On SIGTERM or Ctrl-C the gateway stops accepting connections at once and gives the
    /// requests in flight (streams included) this many seconds to finish before it exits
    /// (1 to 3600). Keep the supervisor's stop timeout above it (systemd's TimeoutStopSec).
    #[arg(long, default_value_t = 30, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub shutdown_grace_s: u64,
    /// At start, when the endpoint table comes from servers (no `--backend`), hold new
    /// connections (they wait in the listener's backlog, nothing is refused) until the
    /// gateway has its first endpoint table and the `Model`, `Tenant` and `Adapter` lists, at
    /// most this many seconds (0 to 600); then it serves what it has. A restarted gateway
    /// thus does not answer `no_endpoint_table` to the traffic a balancer sends it at once.
    #[arg(long, default_value_t = 10, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(0..=600))]
    pub start_wait_s: u64,
    /// Serve `/metrics` on this separate HOST:PORT (e.g. `127.0.0.1:9090`, port 0: any)
    /// and not on `--listen` (404 there), so that tenants cannot read other tenants'
    /// names and traffic. Without it `/metrics` is on `--listen`.
    #[arg(long, value_name = "ADDR", env = "FLOTILLA_GATEWAY_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Serve `--listen` over HTTPS with this certificate chain (PEM): one your clients trust
    /// (a public CA's or your company's), not flotilla's CA. Read again when the file
    /// changes (renewals need no restart). Needs `--https-key`.
    #[arg(long, value_name = "FILE", env = "FLOTILLA_GATEWAY_HTTPS_CERT", requires = "https_key")]
    pub https_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of `--https-cert`.
    #[arg(long, value_name = "FILE", env = "FLOTILLA_GATEWAY_HTTPS_KEY", requires = "https_cert")]
    pub https_key: Option<std::path::PathBuf>,
    /// The global gateway of a federation (`--federation SERVERS` and its flags;
    /// docs/gateway.md, "Global gateway (federation)").
    #[command(flatten)]
    pub federation: crate::federation::FederationArgs,
    /// Filled in by the binary from its global `--server` flag (env FLOTILLA_SERVER).
    #[arg(skip)]
    pub server: Vec<String>,
    /// Filled in by the binary from its global `--tls-*` flags.
    #[arg(skip)]
    pub tls: Option<std::sync::Arc<flotilla_security::Tls>>,
    /// Fetches Models' tokenizer files from their sources; filled in by the binary
    /// (`--tokenizer-cache`, `--source-policy`, ...). None: only `--tokenizer` and sims.
    #[arg(skip)]
    pub tokenizer_fetcher: Option<crate::source_tokenizers::TokenizerFetcher>,
}

impl Default for GatewayArgs {
    fn default() -> Self {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            a: GatewayArgs,
        }
        P::parse_from(["gateway"]).a
    }
}

/// One static `--backend`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticBackend {
    pub model: crate::names::ModelName,
    pub authority: Authority,
    /// `FLOTILLA_BACKEND_API_KEY`, when set.
    pub api_key: Option<flotilla_engine::EngineKey>,
}

/// Queue deadlines per priority class.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub critical: Duration,
    pub standard: Duration,
    pub sheddable: Duration,
}

impl Deadlines {
    pub fn of(&self, class: PriorityClass) -> Duration {
        match class {
            PriorityClass::Critical => self.critical,
            PriorityClass::Standard => self.standard,
            PriorityClass::Sheddable => self.sheddable,
        }
    }
}

/// When an endpoint counts as saturated.
#[derive(Debug, Clone, Copy)]
pub struct Saturation {
    pub max_in_flight: u32,
    pub max_engine_waiting: u32,
    pub max_kv_cache_usage: f64,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub backends: Vec<StaticBackend>,
    pub servers: Vec<String>,
    /// TLS to the servers (the process's certificate identifies it as a gateway).
    pub tls: Option<std::sync::Arc<flotilla_security::Tls>>,
    pub auth: bool,
    pub max_body_bytes: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub stream_idle_timeout: Duration,
    pub max_retries: u32,
    pub eject_after_failures: u32,
    pub eject_base: Duration,
    pub saturation: Saturation,
    pub max_queue: usize,
    pub deadlines: Deadlines,
    pub gateway_replicas: u32,
    pub prefix_block_chars: usize,
    pub prefix_balance_abs: u32,
    pub prefix_balance_rel: f64,
    /// `--routing`: static backend models' strategies.
    pub routing: Vec<(crate::names::ModelName, RoutingStrategy)>,
    /// `--pd`: static models served disaggregated, with their decider.
    pub pd: Vec<(crate::names::ModelName, flotilla_api::spec::PdDecider)>,
    /// `--tokenizer`, loaded.
    pub tokenizers: crate::prompt_tokens::Tokenizers,
    /// Fetches the tokenizers of Models routed on token ids (None: not fetched).
    pub tokenizer_fetcher: Option<crate::source_tokenizers::TokenizerFetcher>,
    pub kv: crate::routing::kv_aware::KvAwareConfig,
    pub kv_index_capacity: usize,
    pub scrape_interval: Option<Duration>,
    pub adapter_load_timeout: Duration,
    /// None: demand reports off.
    pub demand_report_interval: Option<Duration>,
    pub max_held_per_model: usize,
    pub cold_start_timeout: Duration,
    /// Per-tenant requests in flight when the tenant sets none (0: unbounded).
    pub tenant_max_concurrency: u32,
    /// None: streams are not bounded.
    pub max_stream_duration: Option<Duration>,
    /// How long requests in flight may take to finish once the gateway is stopping.
    pub shutdown_grace: Duration,
    /// Longest the listener holds connections at start for the first view of the cluster.
    pub start_wait: Duration,
    /// Where `/metrics` is served instead of `listen`.
    pub metrics_listen: Option<String>,
    /// HTTPS on `listen` (None: plain HTTP).
    pub https: Option<std::sync::Arc<flotilla_security::https::HttpsCert>>,
}

impl Config {
    /// How long a request of `class` may be held for a model without a ready endpoint:
    /// the longer of the cold-start timeout and the class's queue deadline.
    pub fn hold_deadline(&self, class: PriorityClass) -> Duration {
        self.cold_start_timeout.max(self.deadlines.of(class))
    }
}

/// Parses `MODEL=URL` (URL `http://host:port` or `host:port`).
pub fn parse_backend(s: &str) -> Result<StaticBackend, GatewayError> {
    let bad = |why: &str| GatewayError::Usage(format!("--backend {s:?}: {why} (expected MODEL=http://HOST:PORT)"));
    let (model, url) = s.split_once('=').ok_or_else(|| bad("missing '='"))?;
    if model.is_empty() {
        return Err(bad("empty model name"));
    }
    let rest = if let Some(r) = url.strip_prefix("http://") {
        r
    } else if url.contains("://") {
        return Err(bad("only http:// engines are supported"));
    } else {
        url
    };
    let rest = rest.trim_end_matches('/');
    let authority: Authority = rest.parse().map_err(|_| bad("not a HOST:PORT"))?;
    if authority.port_u16().is_none() {
        return Err(bad("missing port"));
    }
    Ok(StaticBackend { model: model.into(), authority, api_key: None })
}

/// Longest `--max-stream-duration`.
pub const MAX_STREAM_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Parses `--max-stream-duration`: a whole number with a unit `ms`, `s`, `m` or `h`, or `0`
/// (no bound, None); at most [`MAX_STREAM_DURATION`].
pub fn parse_stream_duration(s: &str) -> Result<Option<Duration>, GatewayError> {
    let bad = |why: &str| {
        GatewayError::Usage(format!(
            "--max-stream-duration {s:?}: {why} (expected a number with a unit ms, s, m or h, e.g. 30m; 0: no bound)"
        ))
    };
    if s == "0" {
        return Ok(None);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| bad("no unit"))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad("not a whole number"))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(bad("unknown unit")),
    }
    .ok_or_else(|| bad("too long"))?;
    let d = Duration::from_millis(ms);
    if d.is_zero() {
        return Ok(None);
    }
    if d > MAX_STREAM_DURATION {
        return Err(bad("longer than 168h"));
    }
    Ok(Some(d))
}

fn check_addr(flag: &str, addr: &str) -> Result<(), GatewayError> {
    if addr.parse::<SocketAddr>().is_err() && !addr.contains(':') {
        return Err(GatewayError::Usage(format!("{flag} {addr:?} is not HOST:PORT")));
    }
    Ok(())
}

impl GatewayArgs {
    /// Checks every flag once; errors are usage errors (exit code 2).
    pub fn validate(&self) -> Result<Config, GatewayError> {
        let usage = |m: String| Err(GatewayError::Usage(m));
        check_addr("--listen", &self.listen)?;
        if let Some(m) = &self.metrics_listen {
            check_addr("--metrics-listen", m)?;
            if *m == self.listen && !m.ends_with(":0") {
                return usage(format!("--metrics-listen {m:?} is the same address as --listen"));
            }
        }
        let max_stream_duration = parse_stream_duration(&self.max_stream_duration)?;
        let https = match (&self.https_cert, &self.https_key) {
            (Some(cert), Some(key)) => Some(
                flotilla_security::https::HttpsCert::load(cert.clone(), key.clone())
                    .map_err(|e| GatewayError::Usage(format!("--https-cert/--https-key: {e}")))?,
            ),
            (None, None) => None,
            _ => return usage("--https-cert and --https-key go together".into()),
        };
        if self.tenant_max_concurrency > flotilla_api::spec::MAX_TENANT_CONCURRENCY {
            return usage(format!(
                "--tenant-max-concurrency {} is over the maximum of {}",
                self.tenant_max_concurrency,
                flotilla_api::spec::MAX_TENANT_CONCURRENCY
            ));
        }
        let mut backends = self.backends.iter().map(|b| parse_backend(b)).collect::<Result<Vec<_>, _>>()?;
        if let Some(k) = &self.backend_api_key {
            let key = flotilla_engine::EngineKey::new(k).ok_or_else(|| {
                GatewayError::Usage("FLOTILLA_BACKEND_API_KEY is not a valid bearer token (printable ASCII)".into())
            })?;
            backends.iter_mut().for_each(|b| b.api_key = Some(key.clone()));
        }
        if backends.is_empty() && self.server.is_empty() {
            return usage("no endpoints: give --backend MODEL=URL or --server ADDR".into());
        }
        if self.max_body_bytes < 1024 {
            return usage(format!("--max-body-bytes {} is below 1024", self.max_body_bytes));
        }
        if !(0.0..=1.0).contains(&self.max_kv_cache_usage) {
            return usage(format!("--max-kv-cache-usage {} is not within 0..=1", self.max_kv_cache_usage));
        }
        if self.max_in_flight_per_endpoint == 0 {
            return usage("--max-in-flight-per-endpoint must be at least 1".into());
        }
        if self.gateway_replicas == 0 {
            return usage("--gateway-replicas must be at least 1".into());
        }
        if self.prefix_block_chars == 0 || !self.prefix_balance_rel.is_finite() || self.prefix_balance_rel < 1.0 {
            return usage("--prefix-block-chars must be positive and --prefix-balance-rel at least 1".into());
        }
        for (name, v) in [
            ("--header-timeout-ms", self.header_timeout_ms),
            ("--body-timeout-ms", self.body_timeout_ms),
            ("--connect-timeout-ms", self.connect_timeout_ms),
            ("--upstream-timeout-s", self.upstream_timeout_s),
            ("--stream-idle-timeout-s", self.stream_idle_timeout_s),
        ] {
            if v == 0 {
                return usage(format!("{name} must be positive"));
            }
        }
        if !(1..=120_000).contains(&self.adapter_load_timeout_ms) {
            return usage(format!(
                "--adapter-load-timeout-ms {} is not within 1..=120000",
                self.adapter_load_timeout_ms
            ));
        }
        if !(1..=3_600_000).contains(&self.cold_start_timeout_ms) {
            return usage(format!("--cold-start-timeout-ms {} is not within 1..=3600000", self.cold_start_timeout_ms));
        }
        let mut routing = Vec::new();
        for r in &self.routing {
            let bad = |why: String| GatewayError::Usage(format!("--routing {r:?}: {why} (expected MODEL=STRATEGY)"));
            let (m, s) = r.split_once('=').ok_or_else(|| bad("no '='".into()))?;
            let s = crate::routing::parse_override(s).map_err(|e| bad(e.replace("x-flotilla-routing ", "")))?;
            if m.is_empty() || routing.iter().any(|(n, _): &(crate::names::ModelName, _)| n.as_str() == m) {
                return Err(bad("empty or repeated model".into()));
            }
            routing.push((crate::names::ModelName::from(m), s));
        }
        let mut pd = Vec::new();
        for m in &self.pd {
            let name: flotilla_api::ObjectName =
                m.parse().map_err(|e| GatewayError::Usage(format!("--pd {m:?}: {e}")))?;
            if name.as_str().len() > flotilla_api::spec::MAX_DISAGGREGATED_NAME {
                return usage(format!(
                    "--pd {m:?}: at most {} characters (its pools are MODEL-prefill and MODEL-decode)",
                    flotilla_api::spec::MAX_DISAGGREGATED_NAME
                ));
            }
            if pd.iter().any(|(n, _): &(crate::names::ModelName, _)| n.as_str() == m) {
                return usage(format!("--pd {m:?} is repeated"));
            }
            let decider = flotilla_api::spec::PdDecider {
                min_remote_prefill_tokens: self.pd_min_remote_prefill_tokens,
                max_prefill_queue: self.pd_max_prefill_queue,
                ..Default::default()
            };
            pd.push((crate::names::ModelName::from(m.as_str()), decider));
        }
        use flotilla_api::spec::{MAX_MIN_REMOTE_PREFILL_TOKENS, MAX_PREFILL_QUEUE};
        if self.pd_max_prefill_queue > MAX_PREFILL_QUEUE {
            return usage(format!("--pd-max-prefill-queue {} is over {MAX_PREFILL_QUEUE}", self.pd_max_prefill_queue));
        }
        if self.pd_min_remote_prefill_tokens > MAX_MIN_REMOTE_PREFILL_TOKENS {
            return usage(format!(
                "--pd-min-remote-prefill-tokens {} is over {MAX_MIN_REMOTE_PREFILL_TOKENS}",
                self.pd_min_remote_prefill_tokens
            ));
        }
        let tokenizers = self
            .tokenizer
            .iter()
            .map(|t| crate::prompt_tokens::parse_tokenizer_flag(t).map_err(GatewayError::Usage))
            .collect::<Result<Vec<_>, _>>()?;
        let tokenizers = crate::prompt_tokens::Tokenizers::load(&tokenizers).map_err(GatewayError::Usage)?;
        for (flag, w) in [("--kv-load-weight", self.kv_load_weight), ("--kv-pending-weight", self.kv_pending_weight)] {
            if !w.is_finite() || w < 0.0 {
                return usage(format!("{flag} {w} must be a non-negative number"));
            }
        }
        if !(0.0..=1.0).contains(&self.kv_offload_weight) {
            return usage(format!("--kv-offload-weight {} is not within 0..=1", self.kv_offload_weight));
        }
        if !(1..=600_000).contains(&self.kv_speculate_ms) {
            return usage(format!("--kv-speculate-ms {} is not within 1..=600000", self.kv_speculate_ms));
        }
        if !(1_000..=100_000_000).contains(&self.kv_index_capacity) {
            return usage(format!("--kv-index-capacity {} is not within 1000..=100000000", self.kv_index_capacity));
        }
        let mut seen = BTreeMap::new();
        for b in &backends {
            if seen.insert((b.model.clone(), b.authority.to_string()), ()).is_some() {
                return usage(format!("--backend {}={} given twice", b.model, b.authority));
            }
        }
        let ms = Duration::from_millis;
        Ok(Config {
            listen: self.listen.clone(),
            backends,
            servers: self.server.clone(),
            tls: self.tls.clone(),
            auth: !self.no_auth,
            max_body_bytes: self.max_body_bytes,
            header_timeout: ms(self.header_timeout_ms),
            body_timeout: ms(self.body_timeout_ms),
            connect_timeout: ms(self.connect_timeout_ms),
            upstream_timeout: Duration::from_secs(self.upstream_timeout_s),
            stream_idle_timeout: Duration::from_secs(self.stream_idle_timeout_s),
            max_retries: self.max_retries.min(10),
            eject_after_failures: self.eject_after_failures.max(1),
            eject_base: ms(self.eject_base_ms.max(1)),
            saturation: Saturation {
                max_in_flight: self.max_in_flight_per_endpoint,
                max_engine_waiting: self.max_engine_waiting,
                max_kv_cache_usage: self.max_kv_cache_usage,
            },
            max_queue: self.max_queue,
            deadlines: Deadlines {
                critical: ms(self.queue_deadline_critical_ms),
                standard: ms(self.queue_deadline_standard_ms),
                sheddable: ms(self.queue_deadline_sheddable_ms),
            },
            gateway_replicas: self.gateway_replicas,
            prefix_block_chars: self.prefix_block_chars,
            prefix_balance_abs: self.prefix_balance_abs,
            prefix_balance_rel: self.prefix_balance_rel,
            routing,
            pd,
            tokenizers,
            tokenizer_fetcher: self.tokenizer_fetcher.clone(),
            kv: crate::routing::kv_aware::KvAwareConfig {
                load_weight: self.kv_load_weight,
                pending_weight: self.kv_pending_weight,
                offload_weight: self.kv_offload_weight,
                speculate_for: ms(self.kv_speculate_ms),
                ..Default::default()
            },
            kv_index_capacity: self.kv_index_capacity,
            scrape_interval: (self.scrape_interval_ms > 0).then(|| ms(self.scrape_interval_ms)),
            adapter_load_timeout: ms(self.adapter_load_timeout_ms),
            demand_report_interval: (self.demand_report_interval_ms > 0).then(|| ms(self.demand_report_interval_ms)),
            max_held_per_model: self.max_held_per_model,
            cold_start_timeout: ms(self.cold_start_timeout_ms),
            tenant_max_concurrency: self.tenant_max_concurrency,
            max_stream_duration,
            shutdown_grace: Duration::from_secs(self.shutdown_grace_s),
            start_wait: Duration::from_secs(self.start_wait_s),
            metrics_listen: self.metrics_listen.clone(),
            https,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_flags_parse() {
        let b = parse_backend("llama=http://127.0.0.1:8000/").unwrap();
        assert_eq!(b.model, "llama");
        assert_eq!(b.authority.as_str(), "127.0.0.1:8000");
        assert_eq!(parse_backend("m=10.0.0.1:80").unwrap().authority.as_str(), "10.0.0.1:80");
        assert!(parse_backend("nomodel").is_err());
        assert!(parse_backend("m=https://x:1").is_err());
        assert!(parse_backend("m=http://x").is_err());
    }

    #[test]
    fn defaults_need_an_endpoint_source() {
        let a = GatewayArgs::default();
        assert_eq!(a.listen, "127.0.0.1:8080");
        assert!(a.validate().unwrap_err().is_usage());
        let a = GatewayArgs { backends: vec!["m=127.0.0.1:1".into()], ..GatewayArgs::default() };
        let c = a.validate().unwrap();
        assert!(c.auth);
        assert_eq!(c.deadlines.of(PriorityClass::Sheddable), Duration::from_secs(2));
        assert_eq!(c.adapter_load_timeout, Duration::from_secs(30));
        assert_eq!(c.demand_report_interval, Some(Duration::from_secs(1)));
        assert_eq!((c.max_held_per_model, c.cold_start_timeout), (256, Duration::from_secs(120)));
        assert_eq!(c.hold_deadline(PriorityClass::Sheddable), Duration::from_secs(120), "the longer of the two");
        let long = GatewayArgs { queue_deadline_critical_ms: 300_000, ..a.clone() }.validate().unwrap();
        assert_eq!(long.hold_deadline(PriorityClass::Critical), Duration::from_secs(300));
        let off = GatewayArgs { demand_report_interval_ms: 0, ..a.clone() }.validate().unwrap();
        assert_eq!(off.demand_report_interval, None);
        assert!(GatewayArgs { cold_start_timeout_ms: 0, ..a.clone() }.validate().unwrap_err().is_usage());
        assert_eq!((c.tenant_max_concurrency, c.max_stream_duration), (256, Some(Duration::from_secs(1800))));
        assert_eq!(c.metrics_listen, None);
        let a = GatewayArgs { adapter_load_timeout_ms: 0, ..a };
        assert!(a.validate().unwrap_err().is_usage());
    }

    #[test]
    fn stream_durations_take_a_unit_and_zero_is_no_bound() {
        let s = Duration::from_secs;
        let cases: [(&str, Result<Option<Duration>, &str>); 14] = [
            ("30m", Ok(Some(s(1800)))),
            ("90s", Ok(Some(s(90)))),
            ("250ms", Ok(Some(Duration::from_millis(250)))),
            ("2h", Ok(Some(s(7200)))),
            ("168h", Ok(Some(s(168 * 3600)))),
            ("0", Ok(None)),
            ("0s", Ok(None)),
            ("169h", Err("longer than 168h")),
            ("30", Err("no unit")),
            ("-5m", Err("not a whole number")),
            ("m", Err("not a whole number")),
            ("5 m", Err("unknown unit")),
            ("1.5h", Err("unknown unit")),
            ("99999999999999999999h", Err("not a whole number")),
        ];
        for (arg, want) in cases {
            match (parse_stream_duration(arg), want) {
                (Ok(d), Ok(w)) => assert_eq!(d, w, "{arg}"),
                (Err(e), Err(w)) => {
                    assert!(e.is_usage() && e.to_string().contains(w), "{arg}: {e}");
                    assert!(e.to_string().contains("--max-stream-duration"), "{e}");
                }
                (got, want) => panic!("{arg}: {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn bounds_and_the_metrics_listener_are_checked_at_start() {
        let a = GatewayArgs { backends: vec!["m=127.0.0.1:1".into()], ..GatewayArgs::default() };
        let cases: [(GatewayArgs, Option<&str>); 6] = [
            (GatewayArgs { tenant_max_concurrency: 0, ..a.clone() }, None),
            (GatewayArgs { tenant_max_concurrency: 1_000_001, ..a.clone() }, Some("--tenant-max-concurrency")),
            (GatewayArgs { max_stream_duration: "forever".into(), ..a.clone() }, Some("--max-stream-duration")),
            (GatewayArgs { metrics_listen: Some("127.0.0.1:9090".into()), ..a.clone() }, None),
            (GatewayArgs { metrics_listen: Some("nonsense".into()), ..a.clone() }, Some("--metrics-listen")),
            (GatewayArgs { metrics_listen: Some(a.listen.clone()), ..a.clone() }, Some("same address")),
        ];
        for (args, want) in cases {
            match (args.validate(), want) {
                (Ok(_), None) => {}
                (Err(e), Some(w)) => assert!(e.is_usage() && e.to_string().contains(w), "{e}"),
                (got, want) => panic!("{:?}: {want:?}", got.map(|c| c.metrics_listen)),
            }
        }
    }

    #[test]
    fn pd_flags_are_checked_at_start() {
        let a = GatewayArgs { backends: vec!["m-prefill=127.0.0.1:1".into()], ..GatewayArgs::default() };
        let c = GatewayArgs { pd: vec!["m".into()], pd_min_remote_prefill_tokens: 64, ..a.clone() }.validate().unwrap();
        assert_eq!(c.pd.len(), 1);
        assert_eq!((c.pd[0].0.as_str(), c.pd[0].1.min_remote_prefill_tokens), ("m", 64));
        let cases = [
            (GatewayArgs { pd: vec!["Bad Name".into()], ..a.clone() }, "--pd \"Bad Name\""),
            (GatewayArgs { pd: vec!["a".repeat(60)], ..a.clone() }, "at most 55"),
            (GatewayArgs { pd: vec!["m".into(), "m".into()], ..a.clone() }, "repeated"),
            (GatewayArgs { pd_min_remote_prefill_tokens: u32::MAX, ..a.clone() }, "--pd-min-remote-prefill-tokens"),
        ];
        for (args, want) in cases {
            let e = args.validate().err().unwrap_or_else(|| panic!("{want}: accepted"));
            assert!(e.is_usage() && e.to_string().contains(want), "{e}");
        }
    }

    #[test]
    fn routing_and_kv_flags_are_checked_at_start() {
        let a = GatewayArgs { backends: vec!["m=127.0.0.1:1".into()], ..GatewayArgs::default() };
        let ok = GatewayArgs {
            routing: vec!["m=kv-aware".into()],
            tokenizer: vec!["m=sim".into()],
            kv_pending_weight: 0.0,
            ..a.clone()
        };
        let c = ok.validate().unwrap();
        assert_eq!(c.routing, [(crate::names::ModelName::from("m"), RoutingStrategy::KvAware)]);
        assert_eq!(c.kv.offload_weight, 0.25);
        for w in [0.0, 1.0] {
            let c = GatewayArgs { kv_offload_weight: w, ..a.clone() }.validate().unwrap();
            assert_eq!(c.kv.offload_weight, w, "the bounds are allowed");
        }
        assert_eq!(c.tokenizers.get("m").map(|t| t.kind()), Some("sim"));
        let cases: [(GatewayArgs, &str); 11] = [
            (GatewayArgs { routing: vec!["m=fastest".into()], ..a.clone() }, "not one of"),
            (GatewayArgs { routing: vec!["kv-aware".into()], ..a.clone() }, "expected MODEL=STRATEGY"),
            (GatewayArgs { routing: vec!["m=random".into(), "m=kv-aware".into()], ..a.clone() }, "repeated"),
            (GatewayArgs { tokenizer: vec!["m=/nonexistent/dir".into()], ..a.clone() }, "--tokenizer m: "),
            (GatewayArgs { kv_load_weight: -1.0, ..a.clone() }, "--kv-load-weight"),
            (GatewayArgs { kv_pending_weight: f64::NAN, ..a.clone() }, "--kv-pending-weight"),
            (GatewayArgs { kv_offload_weight: -0.1, ..a.clone() }, "--kv-offload-weight -0.1 is not within 0..=1"),
            (GatewayArgs { kv_offload_weight: 1.5, ..a.clone() }, "--kv-offload-weight 1.5 is not within 0..=1"),
            (GatewayArgs { kv_offload_weight: f64::NAN, ..a.clone() }, "--kv-offload-weight NaN"),
            (GatewayArgs { kv_speculate_ms: 0, ..a.clone() }, "--kv-speculate-ms"),
            (GatewayArgs { kv_index_capacity: 10, ..a.clone() }, "--kv-index-capacity"),
        ];
        for (args, want) in cases {
            let e = args.validate().err().unwrap_or_else(|| panic!("accepted, want {want}"));
            assert!(e.is_usage() && e.to_string().contains(want), "{e}");
        }
    }
}
