//! Command-line flags ([`SimArgs`]) and their validation into the resolved
//! [`EngineConfig`] the engine runs with. Flags follow `vllm serve` names where vLLM has one.

use crate::error::SimError;
use crate::latency::{self, Profile};
use crate::parallel::{GangArgs, GangRole, Layout};

/// `flotilla sim`: a simulated vLLM engine with vLLM's HTTP surface and metric names.
///
/// Example: `flotilla sim --port 0 --model demo --profile h100-llama3-8b --speedup 10`
#[derive(clap::Args, Debug, Clone)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1", env = "FLOTILLA_SIM_HOST")]
    pub host: String,
    /// TCP port to listen on; 0 picks a free port (printed on start-up).
    #[arg(long, default_value_t = 8000, env = "FLOTILLA_SIM_PORT")]
    pub port: u16,
    /// Model name served on the OpenAI API (vLLM's --served-model-name).
    #[arg(long, alias = "served-model-name", default_value = "sim")]
    pub model: String,
    /// Most sequences in one batch (vLLM --max-num-seqs).
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: u32,
    /// Most tokens computed in one step, prefill chunks included; default from the profile
    /// (vLLM: 8192 on GPUs with >= 70 GiB, else 2048).
    #[arg(long)]
    pub max_num_batched_tokens: Option<u32>,
    /// Tokens per KV block (vLLM --block-size): 1, 8, 16, 32, 64 or 128.
    #[arg(long, default_value_t = 16)]
    pub block_size: u32,
    /// KV blocks in the GPU cache (vLLM --num-gpu-blocks-override); default from the
    /// profile's memory budget minus the LoRA slots' reservation.
    #[arg(long, alias = "kv-blocks", alias = "num-gpu-blocks-override")]
    pub num_gpu_blocks: Option<u32>,
    /// Longest prompt plus output in tokens (vLLM --max-model-len).
    #[arg(long, default_value_t = 8192)]
    pub max_model_len: u32,
    /// Latency profile: a100-llama3-8b, h100-llama3-8b or l4-llama3-8b.
    #[arg(long, default_value = "a100-llama3-8b")]
    pub profile: String,
    /// Divide every simulated duration by this factor (10 = ten times faster than real time).
    #[arg(long, default_value_t = 1.0)]
    pub speedup: f64,
    /// Accepted for vLLM compatibility; LoRA is on unless --disable-lora.
    #[arg(long)]
    pub enable_lora: bool,
    /// Refuse LoRA loading with vLLM's 500, as a vLLM started without --enable-lora does.
    #[arg(long, conflicts_with = "enable_lora")]
    pub disable_lora: bool,
    /// Distinct LoRA adapters allowed in one batch (vLLM --max-loras).
    #[arg(long, default_value_t = 1)]
    pub max_loras: u32,
    /// LoRA adapters the engine keeps loaded in its CPU cache, LRU (vLLM --max-cpu-loras);
    /// default --max-loras, never below it. Registered adapters beyond it stay listed and
    /// servable, but a request for one evicted from the cache reloads it from disk first
    /// (tens of ms, added to the step that admits it).
    #[arg(long)]
    pub max_cpu_loras: Option<u32>,
    /// Highest LoRA rank accepted; each slot reserves memory for this rank (vLLM --max-lora-rank).
    #[arg(long, default_value_t = 16)]
    pub max_lora_rank: u32,
    /// Adapters loaded at startup, before the API answers (vLLM --lora-modules, static
    /// multi-LoRA): `NAME=PATH` or vLLM's JSON form `{"name": ..., "path": ...}`, each one
    /// loaded as `/v1/load_lora_adapter` would (into the CPU cache, LRU beyond
    /// --max-cpu-loras). A bad one stops the start, as in vLLM.
    #[arg(long, num_args = 1.., value_name = "NAME=PATH")]
    pub lora_modules: Vec<String>,
    /// Disable automatic prefix caching (vLLM --no-enable-prefix-caching).
    #[arg(long)]
    pub no_enable_prefix_caching: bool,
    /// Publish KV cache events as vLLM does (vLLM --kv-events-config), JSON, e.g.
    /// `{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:0",
    /// "replay_endpoint": "tcp://*:0", "topic": "kv"}`; `*` is --host, port 0 a free port,
    /// and GET /kv_event_sources names the bound endpoints (src/kv_publisher.rs).
    #[arg(long, value_name = "JSON")]
    pub kv_events_config: Option<String>,
    /// Prefill/decode disaggregation as vLLM's --kv-transfer-config (JSON), e.g.
    /// `{"kv_connector": "NixlConnector", "kv_role": "kv_both"}`; NixlConnector,
    /// LMCacheConnectorV1 and P2pNcclConnector are all modelled by NIXL's pull protocol
    /// (src/pd.rs, docs/sim.md "P/D disaggregation").
    #[arg(long, value_name = "JSON")]
    pub kv_transfer_config: Option<String>,
    /// Link bandwidth of a P/D KV transfer in Gb/s (default: the profile's NIC).
    #[arg(long, value_name = "GBPS")]
    pub kv_transfer_gbps: Option<f64>,
    /// Host the P/D side channel binds and names in kv_transfer_params (default --host).
    #[arg(long, env = "VLLM_NIXL_SIDE_CHANNEL_HOST")]
    pub kv_side_channel_host: Option<String>,
    /// Port of the P/D side channel; 0 picks a free port (the bound one is named).
    #[arg(long, env = "VLLM_NIXL_SIDE_CHANNEL_PORT", default_value_t = crate::pd::DEFAULT_SIDE_CHANNEL_PORT)]
    pub kv_side_channel_port: u16,
    /// Serve POST /sim/faults (crash, hang, slow, error rate, stall) for chaos tests.
    #[arg(long)]
    pub allow_faults: bool,
    /// Fewest tokens the simulated model writes before end-of-sequence (unless ignore_eos).
    #[arg(long, default_value_t = 16)]
    pub eos_min_tokens: u32,
    /// Most tokens the simulated model writes before end-of-sequence (unless ignore_eos).
    #[arg(long, default_value_t = 512)]
    pub eos_max_tokens: u32,
    /// Seed for requests that bring none (text and lengths then depend on the prompt only).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Largest accepted request body in bytes; bigger bodies get 413.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Answer 400 to request fields the sim does not know (strict mode). Off by default:
    /// like vLLM, unknown fields are ignored (and logged at debug level).
    #[arg(long)]
    pub reject_unknown_fields: bool,
    /// Simulated seconds the engine takes to start (a vLLM loading weights): until then
    /// (S / --speedup wall seconds after start) /health and the inference endpoints answer
    /// 503. /metrics, /version and /sim/faults answer at once. 0 = ready at once.
    #[arg(long, default_value_t = 0.0)]
    pub startup_seconds: f64,
    /// Require `Authorization: Bearer KEY` on /v1, /v2, /inference and /cohere paths, as
    /// vLLM's --api-key does (401 `{"error":"Unauthorized"}` otherwise); /health, /metrics,
    /// /version and /tokenize stay open. Prefer the VLLM_API_KEY environment variable, which
    /// `ps` does not show; the flag wins over it.
    #[arg(long, env = "VLLM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Serve HTTPS (HTTP/1.1 over TLS) with this certificate chain (PEM), as `vllm serve
    /// --ssl-certfile` does; needs --ssl-keyfile. Plain HTTP requests then fail their
    /// handshake. The agent sets both for the engines it starts with --engine-tls.
    #[arg(long, requires = "ssl_keyfile")]
    pub ssl_certfile: Option<std::path::PathBuf>,
    /// The certificate's private key (PEM), as `vllm serve --ssl-keyfile`; needs --ssl-certfile.
    #[arg(long, requires = "ssl_certfile")]
    pub ssl_keyfile: Option<std::path::PathBuf>,
    /// Multi-node and parallel flags (vLLM's --nnodes, --node-rank, --master-addr,
    /// --master-port, --headless, --tensor/pipeline/data-parallel-*): `parallel.rs`.
    #[command(flatten)]
    pub gang: GangArgs,
}

impl Default for SimArgs {
    fn default() -> Self {
        SimArgs {
            host: "127.0.0.1".into(),
            port: 8000,
            model: "sim".into(),
            max_num_seqs: 256,
            max_num_batched_tokens: None,
            block_size: 16,
            num_gpu_blocks: None,
            max_model_len: 8192,
            profile: latency::PROFILES[0].name.into(),
            speedup: 1.0,
            enable_lora: false,
            disable_lora: false,
            max_loras: 1,
            max_cpu_loras: None,
            max_lora_rank: 16,
            lora_modules: Vec::new(),
            no_enable_prefix_caching: false,
            kv_events_config: None,
            kv_transfer_config: None,
            kv_transfer_gbps: None,
            kv_side_channel_host: None,
            kv_side_channel_port: crate::pd::DEFAULT_SIDE_CHANNEL_PORT,
            allow_faults: false,
            eos_min_tokens: 16,
            eos_max_tokens: 512,
            seed: 0,
            max_body_bytes: 4 * 1024 * 1024,
            reject_unknown_fields: false,
            startup_seconds: 0.0,
            api_key: None,
            ssl_certfile: None,
            ssl_keyfile: None,
            gang: GangArgs::default(),
        }
    }
}

/// The validated configuration the engine and HTTP layer run with.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Served model name.
    pub model: String,
    /// Calibrated latency profile.
    pub profile: &'static Profile,
    /// Tokens per KV block.
    pub block_size: u32,
    /// KV blocks available for sequences.
    pub num_blocks: u32,
    /// Batch limit in sequences.
    pub max_num_seqs: u32,
    /// Token budget per step.
    pub max_num_batched_tokens: u32,
    /// Context limit in tokens.
    pub max_model_len: u32,
    /// Time compression factor.
    pub speedup: f64,
    /// Whether LoRA adapters may be loaded.
    pub lora_enabled: bool,
    /// Distinct adapters per batch (GPU slots).
    pub max_loras: u32,
    /// Adapters kept loaded in the CPU cache (>= `max_loras`).
    pub max_cpu_loras: u32,
    /// Highest adapter rank.
    pub max_lora_rank: u32,
    /// Adapters to load at startup (`--lora-modules`): (name, path).
    pub lora_modules: Vec<(String, String)>,
    /// Automatic prefix caching on.
    pub prefix_caching: bool,
    /// Whether /sim/faults is served.
    pub allow_faults: bool,
    /// Natural output length range (inclusive).
    pub eos_range: (u32, u32),
    /// Default seed.
    pub seed: u64,
    /// Request body limit.
    pub max_body_bytes: usize,
    /// Unknown request fields get 400 instead of being ignored.
    pub reject_unknown_fields: bool,
    /// Wall-clock time from start until the engine is ready (--startup-seconds / --speedup).
    pub startup: std::time::Duration,
    /// The key guarded paths require (None: no check).
    pub api_key: Option<crate::http::auth::ApiKey>,
    /// How the replica's model is split (TP, PP, DP, nodes): scales step times, KV blocks,
    /// batch slots and token budget. `Layout::SINGLE` without the flags.
    pub layout: Layout,
    /// This process's part in a multi-node gang.
    pub gang: GangRole,
    /// KV cache events (`--kv-events-config`), when on.
    pub kv_events: Option<crate::kv_publisher::KvEventsConfig>,
    /// P/D disaggregation (`--kv-transfer-config`), when a connector is named.
    pub kv_transfer: Option<crate::pd::KvTransferConfig>,
}

const BLOCK_SIZES: [u32; 6] = [1, 8, 16, 32, 64, 128];

impl SimArgs {
    /// Checks every flag and resolves defaults; the error names the flag at fault.
    pub fn validate(&self) -> Result<EngineConfig, SimError> {
        let (layout, gang) = self.gang.validate()?;
        let dp = layout.dp;
        let profile = latency::profile(&self.profile).ok_or_else(|| {
            SimError::invalid(
                "profile",
                format!("unknown profile {:?}; known profiles: {}", self.profile, latency::profile_names()),
            )
        })?;
        if self.model.trim().is_empty() {
            return Err(SimError::invalid("model", "the served model name must not be empty"));
        }
        if self.host.trim().is_empty() {
            return Err(SimError::invalid("host", "the listen address must not be empty"));
        }
        match (&self.ssl_certfile, &self.ssl_keyfile) {
            (Some(_), None) => {
                return Err(SimError::invalid("ssl-keyfile", "not given; --ssl-certfile needs it (both or neither)"))
            }
            (None, Some(_)) => {
                return Err(SimError::invalid("ssl-certfile", "not given; --ssl-keyfile needs it (both or neither)"))
            }
            _ => {}
        }
        if !BLOCK_SIZES.contains(&self.block_size) {
            return Err(SimError::invalid(
                "block-size",
                format!("{} is not one of 1, 8, 16, 32, 64, 128", self.block_size),
            ));
        }
        if self.max_num_seqs == 0 {
            return Err(SimError::invalid("max-num-seqs", "must be at least 1, got 0"));
        }
        if self.max_model_len == 0 {
            return Err(SimError::invalid("max-model-len", "must be at least 1, got 0"));
        }
        if !(self.speedup.is_finite() && self.speedup > 0.0) {
            return Err(SimError::invalid("speedup", format!("must be a positive number, got {}", self.speedup)));
        }
        if !(self.startup_seconds.is_finite() && (0.0..=86_400.0).contains(&self.startup_seconds)) {
            return Err(SimError::invalid(
                "startup-seconds",
                format!("must be between 0 and 86400, got {}", self.startup_seconds),
            ));
        }
        if self.max_loras == 0 {
            return Err(SimError::invalid("max-loras", "must be at least 1, got 0"));
        }
        let max_cpu_loras = self.max_cpu_loras.unwrap_or(self.max_loras);
        if max_cpu_loras < self.max_loras {
            return Err(SimError::invalid(
                "max-cpu-loras",
                format!(
                    "{} is below --max-loras {} (vLLM needs max_cpu_loras >= max_loras)",
                    max_cpu_loras, self.max_loras
                ),
            ));
        }
        if self.max_lora_rank == 0 || self.max_lora_rank > 512 {
            return Err(SimError::invalid(
                "max-lora-rank",
                format!("must be between 1 and 512, got {}", self.max_lora_rank),
            ));
        }
        if self.eos_min_tokens == 0 {
            return Err(SimError::invalid("eos-min-tokens", "must be at least 1, got 0"));
        }
        if self.eos_max_tokens < self.eos_min_tokens {
            return Err(SimError::invalid(
                "eos-max-tokens",
                format!("{} is below --eos-min-tokens {}", self.eos_max_tokens, self.eos_min_tokens),
            ));
        }
        if self.max_body_bytes < 1024 {
            return Err(SimError::invalid(
                "max-body-bytes",
                format!("must be at least 1024, got {}", self.max_body_bytes),
            ));
        }
        let max_num_batched_tokens =
            self.max_num_batched_tokens.unwrap_or(profile.default_max_num_batched_tokens.max(self.max_num_seqs));
        if max_num_batched_tokens < self.max_num_seqs {
            return Err(SimError::invalid(
                "max-num-batched-tokens",
                format!(
                    "{} is below --max-num-seqs {}; every running sequence needs a token per step",
                    max_num_batched_tokens, self.max_num_seqs
                ),
            ));
        }
        // Each data-parallel rank has its own batch and budget; the sim runs them as one engine.
        let (max_num_seqs, max_num_batched_tokens) =
            (self.max_num_seqs.saturating_mul(dp), max_num_batched_tokens.saturating_mul(dp));
        let lora_enabled = !self.disable_lora;
        let num_blocks = match self.num_gpu_blocks {
            Some(0) => return Err(SimError::invalid("num-gpu-blocks", "must be at least 1, got 0")),
            // per data-parallel rank, as vLLM's override is per engine
            Some(n) => u64::from(n) * u64::from(dp),
            None => {
                let total = if layout == Layout::SINGLE {
                    profile.default_num_blocks(self.block_size)
                } else {
                    layout.kv_cache_bytes(profile) / (profile.kv_bytes_per_token * u64::from(self.block_size))
                };
                let reserved = if lora_enabled {
                    u64::from(dp)
                        * u64::from(self.max_loras)
                        * profile.lora_slot_blocks(self.max_lora_rank, self.block_size)
                } else {
                    0
                };
                if reserved >= total {
                    return Err(SimError::invalid(
                        "max-loras",
                        format!(
                            "{} LoRA slots of rank {} take all {} KV blocks of profile {}",
                            self.max_loras, self.max_lora_rank, total, profile.name
                        ),
                    ));
                }
                total - reserved
            }
        };
        let num_blocks = u32::try_from(num_blocks).unwrap_or(u32::MAX);
        let capacity = u64::from(num_blocks) * u64::from(self.block_size);
        if u64::from(self.max_model_len) > capacity {
            return Err(SimError::invalid(
                "max-model-len",
                format!(
                    "{} tokens exceed the KV cache's {} tokens ({} blocks of {}); lower it or raise --num-gpu-blocks",
                    self.max_model_len, capacity, num_blocks, self.block_size
                ),
            ));
        }
        Ok(EngineConfig {
            model: self.model.clone(),
            profile,
            block_size: self.block_size,
            num_blocks,
            max_num_seqs,
            max_num_batched_tokens,
            max_model_len: self.max_model_len,
            speedup: self.speedup,
            lora_enabled,
            max_loras: self.max_loras,
            max_cpu_loras,
            max_lora_rank: self.max_lora_rank,
            lora_modules: parse_lora_modules(&self.lora_modules, lora_enabled)?,
            prefix_caching: !self.no_enable_prefix_caching,
            allow_faults: self.allow_faults,
            eos_range: (self.eos_min_tokens, self.eos_max_tokens),
            seed: self.seed,
            max_body_bytes: self.max_body_bytes,
            reject_unknown_fields: self.reject_unknown_fields,
            startup: std::time::Duration::from_secs_f64(self.startup_seconds / self.speedup),
            api_key: self.api_key.as_deref().and_then(crate::http::auth::ApiKey::new),
            layout,
            gang,
            kv_events: match &self.kv_events_config {
                Some(json) => crate::kv_publisher::KvEventsConfig::parse(json)?,
                None => None,
            },
            kv_transfer: match &self.kv_transfer_config {
                Some(json) => crate::pd::KvTransferConfig::parse(
                    json,
                    self.kv_side_channel_host.clone().unwrap_or_else(|| self.host.clone()),
                    self.kv_side_channel_port,
                    self.kv_transfer_gbps.unwrap_or(profile.kv_link_gbps),
                )?,
                None => None,
            },
        })
    }
}

/// Most adapters `--lora-modules` may name.
pub const MAX_LORA_MODULES: usize = 4096;

/// `--lora-modules` words: `NAME=PATH` or `{"name": ..., "path": ...}` (vLLM's two forms).
fn parse_lora_modules(words: &[String], lora_enabled: bool) -> Result<Vec<(String, String)>, SimError> {
    const FLAG: &str = "lora-modules";
    if words.is_empty() {
        return Ok(Vec::new());
    }
    if !lora_enabled {
        return Err(SimError::invalid(FLAG, "LoRA is disabled (--disable-lora)"));
    }
    if words.len() > MAX_LORA_MODULES {
        return Err(SimError::invalid(FLAG, format!("{} adapters; at most {MAX_LORA_MODULES}", words.len())));
    }
    let mut out: Vec<(String, String)> = Vec::new();
    for w in words {
        let (name, path) = if w.trim_start().starts_with('{') {
            let v: serde_json::Value =
                serde_json::from_str(w).map_err(|e| SimError::invalid(FLAG, format!("{w:?} is not JSON: {e}")))?;
            let field = |k: &str| v[k].as_str().map(str::to_string);
            match (field("name"), field("path")) {
                (Some(n), Some(p)) => (n, p),
                _ => return Err(SimError::invalid(FLAG, format!("{w:?} needs \"name\" and \"path\""))),
            }
        } else {
            match w.split_once('=') {
                Some((n, p)) => (n.to_string(), p.to_string()),
                None => return Err(SimError::invalid(FLAG, format!("{w:?} is not NAME=PATH"))),
            }
        };
        if name.is_empty() || path.is_empty() {
            return Err(SimError::invalid(FLAG, format!("{w:?}: empty name or path")));
        }
        if out.iter().any(|(n, _)| *n == name) {
            return Err(SimError::invalid(FLAG, format!("{name:?} is named twice")));
        }
        out.push((name, path));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag_of(args: SimArgs) -> &'static str {
        match args.validate() {
            Err(SimError::InvalidConfig { flag, .. }) => flag,
            other => panic!("expected invalid config, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid_and_reserve_lora_slots() {
        let cfg = SimArgs::default().validate().unwrap();
        assert_eq!(cfg.num_blocks, 9472 - 40);
        assert_eq!(cfg.max_num_batched_tokens, 2048);
        let no_lora = SimArgs { disable_lora: true, ..SimArgs::default() }.validate().unwrap();
        assert_eq!(no_lora.num_blocks, 9472);
        assert_eq!(cfg.max_cpu_loras, 1, "defaults to --max-loras");
        let cpu = SimArgs { max_loras: 2, max_cpu_loras: Some(8), ..SimArgs::default() }.validate().unwrap();
        assert_eq!((cpu.max_loras, cpu.max_cpu_loras), (2, 8));
        let err = SimArgs { max_loras: 4, max_cpu_loras: Some(3), ..SimArgs::default() }.validate().unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--max-cpu-loras"), "{err}");
    }

    #[test]
    fn nonsense_is_rejected_naming_the_flag() {
        let d = SimArgs::default;
        assert_eq!(flag_of(SimArgs { num_gpu_blocks: Some(0), ..d() }), "num-gpu-blocks");
        assert_eq!(flag_of(SimArgs { block_size: 0, ..d() }), "block-size");
        assert_eq!(flag_of(SimArgs { block_size: 12, ..d() }), "block-size");
        assert_eq!(flag_of(SimArgs { profile: "tpu".into(), ..d() }), "profile");
        assert_eq!(flag_of(SimArgs { speedup: 0.0, ..d() }), "speedup");
        assert_eq!(flag_of(SimArgs { speedup: f64::NAN, ..d() }), "speedup");
        assert_eq!(flag_of(SimArgs { startup_seconds: -1.0, ..d() }), "startup-seconds");
        assert_eq!(flag_of(SimArgs { startup_seconds: f64::INFINITY, ..d() }), "startup-seconds");
        assert_eq!(flag_of(SimArgs { max_num_seqs: 0, ..d() }), "max-num-seqs");
        assert_eq!(flag_of(SimArgs { max_loras: 0, ..d() }), "max-loras");
        assert_eq!(flag_of(SimArgs { max_loras: 4, max_cpu_loras: Some(3), ..d() }), "max-cpu-loras");
        assert_eq!(flag_of(SimArgs { model: " ".into(), ..d() }), "model");
        assert_eq!(flag_of(SimArgs { eos_min_tokens: 9, eos_max_tokens: 8, ..d() }), "eos-max-tokens");
        assert_eq!(
            flag_of(SimArgs { max_num_seqs: 64, max_num_batched_tokens: Some(32), ..d() }),
            "max-num-batched-tokens"
        );
        assert_eq!(flag_of(SimArgs { num_gpu_blocks: Some(4), ..d() }), "max-model-len");
        assert_eq!(flag_of(SimArgs { ssl_certfile: Some("c.pem".into()), ..d() }), "ssl-keyfile");
        assert_eq!(flag_of(SimArgs { ssl_keyfile: Some("k.pem".into()), ..d() }), "ssl-certfile");
        let err = SimArgs { block_size: 0, ..d() }.validate().unwrap_err();
        assert!(err.is_usage());
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--block-size"), "{err}");
    }
}
