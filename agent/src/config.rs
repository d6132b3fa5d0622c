//! Command-line flags ([`AgentArgs`], `flotilla agent --help`) and their validation into
//! the typed [`AgentConfig`] the agent runs with. Flags and `FLOTILLA_*` env vars map
//! onto the config here and nowhere else.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::AgentError;

/// `flotilla agent`: the node daemon. Registers this machine's GPUs with the leader, keeps
/// a heartbeat stream to it, and runs the engines (vLLM or `flotilla sim`) it is assigned.
///
/// Example: `flotilla agent --server 10.0.0.1:7070,10.0.0.2:7070 --node-name gpu-1 --nvidia`
/// or, simulated: `flotilla agent --server 127.0.0.1:7070 --node-name n1 --gpus 4 --gpu-type A100-80GB`
#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// Server gRPC addresses (host:port or http://host:port), tried in order, following
    /// leader hints. Set from the binary's global `--server` flag (env FLOTILLA_SERVER),
    /// which the `flotilla` CLI owns, so it is not a flag of its own here.
    #[arg(skip = vec!["127.0.0.1:7070".to_owned()])]
    pub server: Vec<String>,
    /// TLS to the servers, from the binary's global `--tls-*` flags (the certificate must
    /// name this node: `spiffe://flotilla/agent/<node-name>`).
    #[arg(skip)]
    pub tls: Option<std::sync::Arc<flotilla_security::Tls>>,
    /// This node's name, a DNS label unique in the cluster; default: the host name.
    #[arg(long, env = "FLOTILLA_NODE_NAME")]
    pub node_name: Option<String>,
    /// Directory for engine logs, the model cache and the agent's state (engine adoption).
    #[arg(long, env = "FLOTILLA_AGENT_DATA_DIR", default_value = "./.flotilla-agent")]
    pub data_dir: PathBuf,
    /// IP address engines on this node listen on and are reachable at: the address this
    /// agent connects to the servers from (servers refuse engine endpoints on other hosts;
    /// loopback is accepted from an agent on the servers' own host).
    #[arg(long, default_value = "127.0.0.1")]
    pub address: String,
    /// TLS between gateways (and this agent) and the engines it starts: `on` gives each
    /// engine its own self-signed certificate for --address (vLLM's --ssl-certfile and
    /// --ssl-keyfile) and reports its SHA-256, which gateways pin (no CA to distribute);
    /// `off` serves plain HTTP; `auto` is `on` unless --address is loopback (so `flotilla
    /// dev` and single-machine setups stay plain). An engine adopted after a restart keeps
    /// what it was started with. See docs/security.md.
    #[arg(long, value_enum, default_value_t = crate::engine_tls::EngineTlsMode::Auto)]
    pub engine_tls: crate::engine_tls::EngineTlsMode,
    /// Node labels, comma-separated `key=value` pairs (e.g. `zone=a,rack=r1`).
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Number of simulated GPUs (needs --gpu-type); conflicts with --nvidia.
    #[arg(long, conflicts_with = "nvidia")]
    pub gpus: Option<u32>,
    /// GPU type of the simulated GPUs (e.g. A100-80GB).
    #[arg(long)]
    pub gpu_type: Option<String>,
    /// Memory of each simulated GPU in MiB; default: read from a `-NNGB` suffix of the type, else 81920.
    #[arg(long)]
    pub gpu_memory_mib: Option<u64>,
    /// Read the GPUs from NVIDIA's NVML (real machines); fails at start-up if NVML cannot load.
    #[arg(long)]
    pub nvidia: bool,
    /// YAML list of faults for the simulated GPUs, re-read whenever it changes, e.g.
    /// `- {gpu: 1, fault: xid, code: 79}` or `- {gpu: 0, fault: throttle, reason: thermal}`
    /// (kinds: xid, throttle, ecc, missing, unreachable, pcie, retired_pages, remap; see
    /// docs/agent.md, "GPU health"). Simulated GPUs only.
    #[arg(long, conflicts_with = "nvidia")]
    pub gpu_faults: Option<PathBuf>,
    /// Heartbeat interval in milliseconds (the server's Registered value wins when set).
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_interval_ms: u64,
    /// Ports engines are started on, `LOW-HIGH` inclusive.
    #[arg(long, default_value = "20000-29999")]
    pub engine_port_range: String,
    /// Program that runs `flotilla sim` engines; default: this executable.
    #[arg(long, env = "FLOTILLA_SIM_BINARY")]
    pub sim_binary: Option<PathBuf>,
    /// Subcommand word put before the sim flags (`sim` for the flotilla binary; empty for a
    /// standalone sim binary).
    #[arg(long, default_value = "sim")]
    pub sim_subcommand: String,
    /// Extra flags for every sim engine, one shell-quoted string (e.g. `--speedup 20`).
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub sim_args: String,
    /// Command template for vLLM engines. Placeholders: {source} (local model path once
    /// downloaded), {model} (served model name), {port}, {host} (--address; required: engines
    /// listen there only), {replica}, {gpus} (count of bound GPUs), {args} (the model's
    /// engine_args, one word each). CUDA_VISIBLE_DEVICES is set from the bound GPU indices,
    /// VLLM_API_KEY to the engine's key.
    #[arg(
        long,
        env = "FLOTILLA_VLLM_COMMAND",
        default_value = "vllm serve {source} --host {host} --port {port} --served-model-name {model} {args}"
    )]
    pub vllm_command: String,
    /// Environment variables engines inherit from the agent, besides the defaults (PATH,
    /// HOME, LANG, LC_*, TZ, TMPDIR, USER, CUDA_*, NCCL_*, NVIDIA_*, LD_LIBRARY_PATH, VLLM_*,
    /// HF_HOME, HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE, OMP_*, DO_NOT_TRACK): names or NAME_*
    /// globs, comma-separated (e.g. `HF_TOKEN,PYTORCH_*`). Engines get nothing else of the
    /// agent's environment: not its download credentials (HF_TOKEN, AWS_*).
    #[arg(long, value_delimiter = ',')]
    pub engine_env: Vec<String>,
    /// The network interface the members of multi-node replicas (gangs) on this node talk
    /// over (e.g. `ib0`, `ens1f0`): vLLM engines get it as GLOO_SOCKET_IFNAME and
    /// NCCL_SOCKET_IFNAME (besides VLLM_HOST_IP = --address, always). Unset: Gloo and NCCL
    /// pick one. Sim engines ignore it.
    #[arg(long, value_name = "IFACE")]
    pub gang_interface: Option<String>,
    /// Ray's CLI (e.g. `/opt/venv/bin/ray`): run the members of `layout: ray` gangs on this
    /// node, each as a Ray node (`ray start --block`) with, on the head, vLLM's Ray executor
    /// attached to it. Unset: such members fail with the reason. Ray's ports have no
    /// authentication: give it only on a network closed to everything but the cluster
    /// (docs/security.md, docs/agent.md "Ray layout").
    #[arg(long, value_name = "PROGRAM")]
    pub ray: Option<PathBuf>,
    /// Start every engine (not headless gang workers) publishing its KV cache events, as
    /// vLLM's `--kv-events-config` does: a ZMQ PUB and a replay socket bound on --address
    /// at free ports, topic `kv@<replica>`; gateways find them at the engine's
    /// `GET /kv_event_sources`. The events carry prompts' token ids and ZMQ has no key: give
    /// it only where the node network is closed to all but the cluster (docs/security.md).
    #[arg(long)]
    pub kv_events: bool,
    /// A UCX setting for the engines of P/D members (prefill/decode disaggregation: NIXL
    /// and LMCache move KV blocks over UCX), `UCX_NAME=VALUE`, repeatable, e.g.
    /// `--ucx-env UCX_TLS=rc,cuda_ipc,cuda_copy --ucx-env UCX_NET_DEVICES=mlx5_0:1`. Only
    /// `UCX_*` names; at most 32, names of at most 64 bytes, values of at most 512
    /// printable ASCII bytes. Other engines do not get them. See docs/agent.md, "P/D connectors".
    #[arg(long, value_name = "UCX_NAME=VALUE")]
    pub ucx_env: Vec<String>,
    /// The flotilla binary whose `ray-member` subcommand supervises a Ray member (its Ray
    /// node and engine as one process); default: this executable.
    #[arg(long, value_name = "PATH", requires = "ray")]
    pub ray_member_binary: Option<PathBuf>,
    /// YAML file changing which Model engine_args the agent refuses to start an engine with:
    /// `allow: [--trust-remote-code]` lifts a default refusal, `deny: [--flag, --prefix-*]`
    /// adds refusals. By default the agent refuses flags that load code or plugins
    /// (--trust-remote-code, --worker-cls, ...), that read files the Model names, and those it
    /// sets itself (--host, --port, --api-key, --served-model-name); see docs/security.md.
    #[arg(long)]
    pub engine_policy: Option<PathBuf>,
    /// Run the engines of Models that name an `engine_image` in containers, through this
    /// runtime's client (`docker run` / `podman run` with host networking, GPUs by
    /// `--gpus` or CDI). Without it such Models' replicas fail with the reason.
    #[arg(long, value_enum)]
    pub container_runtime: Option<crate::container::Runtime>,
    /// Serve Prometheus metrics (`flotilla_agent_*`: engines by state, starts, crashes,
    /// start-to-ready time, downloads, adapter loads, drains, GPUs by health) on
    /// `GET /metrics` at this HOST:PORT, e.g. `127.0.0.1:9101`. Off when not given.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The runtime's client program (default: `docker` or `podman` from PATH).
    #[arg(long, requires = "container_runtime")]
    pub container_cli: Option<PathBuf>,
    /// An image prefix this agent runs (`vllm/vllm-openai:`, `registry.example.com/ml/`);
    /// repeat or comma-separate for several. An image is code: with none listed, no image
    /// runs.
    #[arg(long, value_delimiter = ',', requires = "container_runtime")]
    pub engine_image: Vec<String>,
    /// Where downloads may come from: `--source-policy`, `--hf-endpoint`, `--s3-endpoint`.
    #[command(flatten)]
    pub sources: crate::download::sources::SourceArgs,
    /// Stop every engine when the agent exits (dev mode). By default engines keep running
    /// and the restarted agent adopts them.
    #[arg(long)]
    pub stop_engines_on_exit: bool,
    /// First restart delay after an engine crash, in milliseconds (doubles per crash).
    #[arg(long, default_value_t = 1000)]
    pub restart_backoff_initial_ms: u64,
    /// Longest restart delay, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    pub restart_backoff_max_ms: u64,
    /// An engine that ran this long (ms) without crashing gets its backoff reset.
    #[arg(long, default_value_t = 60_000)]
    pub restart_stable_ms: u64,
    /// Crashes within --crash-window-ms after which the engine is reported failed.
    #[arg(long, default_value_t = 5)]
    pub max_crashes: u32,
    /// Window over which crashes are counted, in milliseconds.
    #[arg(long, default_value_t = 300_000)]
    pub crash_window_ms: u64,
    /// How long an engine may take to answer /health with 200, in seconds (vLLM loads weights).
    #[arg(long, default_value_t = 900)]
    pub engine_start_timeout_s: u64,
    /// A ready engine whose /health keeps failing this long (seconds) is killed and restarted
    /// like a crash; it is reported not ready (`starting`) after about three failed checks.
    #[arg(long, default_value_t = 60)]
    pub engine_liveness_timeout_s: u64,
    /// A ready engine with running requests whose generated-token count does not move for
    /// this long (seconds, from its scraped metrics) is stalled: it is killed and restarted
    /// like a crash, with the reason. 0 turns the check off.
    #[arg(long, default_value_t = 120)]
    pub engine_stall_timeout_s: u64,
    /// Grace period between SIGTERM and SIGKILL when stopping an engine, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub stop_grace_ms: u64,
    /// Drain before stopping an unassigned ready engine (scale-down, node drain, move): wait
    /// until it has no running or waiting request, at most this long (milliseconds), so
    /// in-flight streams finish; gateways stop routing to a Draining replica at once. 0 stops
    /// at once. Agent shutdown does not drain.
    #[arg(long, default_value_t = 60_000)]
    pub drain_timeout_ms: u64,
    /// Rotate an engine's log when it exceeds this many bytes.
    #[arg(long, default_value_t = 50 * 1024 * 1024)]
    pub log_max_bytes: u64,
    /// Rotated log files kept per engine (`<replica>.log.1` .. `.N`).
    #[arg(long, default_value_t = 3)]
    pub log_keep: u32,
}

/// Validated agent configuration.
/// How this agent runs `layout: ray` gang members (`--ray`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RayConfig {
    /// Ray's CLI.
    pub program: PathBuf,
    /// The flotilla binary run as `ray-member` ([`crate::ray_member`]).
    pub member_binary: PathBuf,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Server gRPC URLs (`http://host:port`), in the order to try.
    pub servers: Vec<String>,
    /// TLS to the servers.
    pub tls: Option<std::sync::Arc<flotilla_security::Tls>>,
    /// Node name.
    pub node_name: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Host engines listen on and are reachable at.
    pub address: String,
    /// New engines serve TLS with a pinned self-signed certificate (`--engine-tls`, resolved).
    pub engine_tls: bool,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// GPU source.
    pub gpus: GpuSource,
    /// Fault file of simulated GPUs (checked at start-up; re-read when it changes).
    pub gpu_faults: Option<PathBuf>,
    /// Heartbeat interval.
    pub heartbeat_interval: Duration,
    /// Engine ports.
    pub ports: RangeInclusive<u16>,
    /// Sim program.
    pub sim_binary: PathBuf,
    /// Sim subcommand word (may be empty).
    pub sim_subcommand: String,
    /// Extra sim words.
    pub sim_args: Vec<String>,
    /// vLLM command template, split into words.
    pub vllm_command: Vec<String>,
    /// Variables engines inherit besides the default allowlist.
    pub engine_env: Vec<crate::engine_env::EnvPattern>,
    /// The interface gang members' collectives use (`--gang-interface`).
    pub gang_interface: Option<String>,
    /// How `layout: ray` members run (`--ray`); None: they are refused.
    pub ray: Option<RayConfig>,
    /// Engines publish KV cache events (`--kv-events`).
    pub kv_events: bool,
    /// `--ucx-env`, checked: the UCX settings of P/D members' engines.
    pub ucx_env: Vec<(String, String)>,
    /// Which Model engine_args are refused.
    pub engine_policy: crate::engine_policy::Policy,
    /// The container runtime for Models with an `engine_image` (None: none runs).
    pub containers: Option<crate::container::Containers>,
    /// Where `/metrics` is served (None: nowhere).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Which download sources are refused.
    pub source_policy: crate::source_policy::Policy,
    /// Stop engines when the agent exits.
    pub stop_engines_on_exit: bool,
    /// Crash handling.
    pub restart: crate::engines::backoff::RestartPolicy,
    /// Start timeout.
    pub start_timeout: Duration,
    /// Ready engine failing /health this long → restarted.
    pub liveness_timeout: Duration,
    /// Running requests and no new tokens this long → restarted (`None`: off).
    pub stall_timeout: Option<Duration>,
    /// SIGTERM → SIGKILL grace.
    pub stop_grace: Duration,
    /// Longest wait for in-flight requests before stopping an unassigned engine.
    pub drain_timeout: Duration,
    /// Log rotation size.
    pub log_max_bytes: u64,
    /// Rotated files kept.
    pub log_keep: u32,
    /// Hugging Face endpoint (no trailing slash).
    pub hf_endpoint: String,
    /// S3 endpoint (no trailing slash).
    pub s3_endpoint: String,
}

/// Where the GPU inventory comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum GpuSource {
    /// Simulated from flags.
    Simulated {
        /// Count.
        count: u32,
        /// Type.
        gpu_type: String,
        /// Memory per GPU.
        memory_mib: u64,
    },
    /// NVML.
    Nvidia,
}

impl AgentArgs {
    /// `--container-runtime`, `--container-cli` and `--engine-image`, checked.
    fn containers(&self) -> Result<Option<crate::container::Containers>, AgentError> {
        use crate::container::{Containers, Runtime};
        let Some(runtime) = self.container_runtime else { return Ok(None) };
        let mut allowed = Vec::new();
        for p in self.engine_image.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
            // a prefix is an image reference cut short: the same characters
            flotilla_api::spec::validate_image("engine-image", p)
                .map_err(|e| AgentError::invalid("engine-image", e.to_string()))?;
            allowed.push(p.to_string());
        }
        let default = match runtime {
            Runtime::Docker => "docker",
            Runtime::Podman => "podman",
        };
        Ok(Some(Containers { runtime, program: self.container_cli.clone().unwrap_or_else(|| default.into()), allowed }))
    }

    /// Checks every flag and returns the typed config, or the first bad flag.
    pub fn validate(&self) -> Result<AgentConfig, AgentError> {
        let servers = parse_servers(&self.server)?;
        let node_name = match &self.node_name {
            Some(n) => n.clone(),
            None => hostname().ok_or_else(|| {
                AgentError::invalid("node-name", "is not set and the host name cannot be read; pass --node-name")
            })?,
        };
        validate_dns_label(&node_name)?;
        let address = self.address.trim();
        if address != "localhost" && address.parse::<std::net::IpAddr>().is_err() {
            return Err(AgentError::invalid(
                "address",
                format!(
                    "{address:?} is not an IP address; give the IP engines are reachable at, the one this agent \
                     connects to the servers from (they refuse engine endpoints on any other host)"
                ),
            ));
        }
        let gpus = self.gpu_source()?;
        if let (Some(path), GpuSource::Simulated { count, .. }) = (&self.gpu_faults, &gpus) {
            crate::gpu::load_faults(path, *count)?;
        }
        if self.heartbeat_interval_ms == 0 || self.heartbeat_interval_ms > 60_000 {
            return Err(AgentError::invalid(
                "heartbeat-interval-ms",
                format!("must be between 1 and 60000, got {}", self.heartbeat_interval_ms),
            ));
        }
        let sim_binary = match &self.sim_binary {
            Some(p) => p.clone(),
            None => std::env::current_exe().map_err(|e| {
                AgentError::invalid("sim-binary", format!("is not set and the current executable is unknown: {e}"))
            })?,
        };
        let sim_args = shlex::split(&self.sim_args)
            .ok_or_else(|| AgentError::invalid("sim-args", format!("{:?} has unbalanced quotes", self.sim_args)))?;
        crate::driver::refuse_agent_flags("sim-args", &sim_args)?;
        let vllm_command = crate::driver::parse_template(&self.vllm_command)?;
        let engine_env = self
            .engine_env
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| crate::engine_env::EnvPattern::parse(s).map_err(|r| AgentError::invalid("engine-env", r)))
            .collect::<Result<Vec<_>, _>>()?;
        let engine_policy = match &self.engine_policy {
            None => crate::engine_policy::Policy::default(),
            Some(path) => load_policy(path)?,
        };
        if self.restart_backoff_initial_ms == 0 || self.restart_backoff_initial_ms > self.restart_backoff_max_ms {
            return Err(AgentError::invalid(
                "restart-backoff-initial-ms",
                format!(
                    "must be positive and at most --restart-backoff-max-ms ({}), got {}",
                    self.restart_backoff_max_ms, self.restart_backoff_initial_ms
                ),
            ));
        }
        if self.max_crashes == 0 {
            return Err(AgentError::invalid("max-crashes", "must be at least 1, got 0"));
        }
        if self.log_max_bytes < 1024 {
            return Err(AgentError::invalid(
                "log-max-bytes",
                format!("must be at least 1024, got {}", self.log_max_bytes),
            ));
        }
        let gang_interface = match self.gang_interface.as_deref().map(str::trim) {
            None => None,
            Some(i) => {
                crate::gang::check_interface(i).map_err(|r| AgentError::invalid("gang-interface", r))?;
                Some(i.to_string())
            }
        };
        let ray = match &self.ray {
            None => None,
            Some(program) => Some(RayConfig {
                program: program.clone(),
                member_binary: match &self.ray_member_binary {
                    Some(p) => p.clone(),
                    None => std::env::current_exe().map_err(|e| {
                        AgentError::invalid(
                            "ray-member-binary",
                            format!("is not set and the current executable is unknown: {e}"),
                        )
                    })?,
                },
            }),
        };
        let loopback = address == "localhost" || address.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        let source_policy =
            self.sources.policy(loopback, &self.data_dir).map_err(|(flag, e)| AgentError::invalid(flag, e))?;
        Ok(AgentConfig {
            servers,
            tls: self.tls.clone(),
            node_name,
            data_dir: self.data_dir.clone(),
            address: self.address.trim().to_string(),
            engine_tls: self.engine_tls.enabled(address),
            labels: parse_labels(&self.labels)?,
            gpus,
            gpu_faults: self.gpu_faults.clone(),
            heartbeat_interval: Duration::from_millis(self.heartbeat_interval_ms),
            ports: parse_port_range(&self.engine_port_range)?,
            sim_binary,
            sim_subcommand: self.sim_subcommand.trim().to_string(),
            sim_args,
            vllm_command,
            engine_env,
            gang_interface,
            ray,
            kv_events: self.kv_events,
            ucx_env: crate::kv_transfer::parse_ucx_env(&self.ucx_env).map_err(|r| AgentError::invalid("ucx-env", r))?,
            engine_policy,
            containers: self.containers()?,
            metrics_listen: self.metrics_listen,
            source_policy,
            stop_engines_on_exit: self.stop_engines_on_exit,
            restart: crate::engines::backoff::RestartPolicy {
                initial: Duration::from_millis(self.restart_backoff_initial_ms),
                max: Duration::from_millis(self.restart_backoff_max_ms),
                stable_after: Duration::from_millis(self.restart_stable_ms),
                max_crashes: self.max_crashes,
                window: Duration::from_millis(self.crash_window_ms),
            },
            start_timeout: Duration::from_secs(self.engine_start_timeout_s.max(1)),
            liveness_timeout: Duration::from_secs(self.engine_liveness_timeout_s.max(1)),
            stall_timeout: (self.engine_stall_timeout_s > 0).then(|| Duration::from_secs(self.engine_stall_timeout_s)),
            stop_grace: Duration::from_millis(self.stop_grace_ms),
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
            log_max_bytes: self.log_max_bytes,
            log_keep: self.log_keep,
            hf_endpoint: self.sources.hf_endpoint.trim_end_matches('/').to_string(),
            s3_endpoint: self.sources.s3_endpoint.trim_end_matches('/').to_string(),
        })
    }

    fn gpu_source(&self) -> Result<GpuSource, AgentError> {
        if self.nvidia {
            return Ok(GpuSource::Nvidia);
        }
        let count = self.gpus.unwrap_or(0);
        if count > 1024 {
            return Err(AgentError::invalid("gpus", format!("must be at most 1024, got {count}")));
        }
        let gpu_type = match (&self.gpu_type, count) {
            (Some(t), _) if !t.trim().is_empty() => t.trim().to_string(),
            (_, 0) => String::new(),
            _ => {
                return Err(AgentError::invalid(
                    "gpu-type",
                    format!("is required with --gpus {count} (e.g. A100-80GB)"),
                ))
            }
        };
        let memory_mib = match self.gpu_memory_mib {
            Some(0) => return Err(AgentError::invalid("gpu-memory-mib", "must be positive, got 0")),
            Some(m) => m,
            None => memory_from_type(&gpu_type).unwrap_or(81_920),
        };
        Ok(GpuSource::Simulated { count, gpu_type, memory_mib })
    }
}

/// Reads and checks an `--engine-policy` file; errors name the file and the entry at fault.
fn load_policy(path: &std::path::Path) -> Result<crate::engine_policy::Policy, AgentError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| AgentError::invalid("engine-policy", format!("cannot read {}: {e}", path.display())))?;
    crate::engine_policy::PolicyFile::parse(&text)
        .and_then(|f| crate::engine_policy::Policy::new(&f))
        .map_err(|e| AgentError::invalid("engine-policy", format!("{}: {e}", path.display())))
}

/// `A100-80GB` → 81920 MiB.
fn memory_from_type(t: &str) -> Option<u64> {
    let upper = t.to_ascii_uppercase();
    let gb = upper.strip_suffix("GB")?.rsplit(|c: char| !c.is_ascii_digit()).next()?;
    gb.parse::<u64>().ok().filter(|g| *g > 0).map(|g| g * 1024)
}

fn parse_servers(raw: &[String]) -> Result<Vec<String>, AgentError> {
    let mut out = Vec::new();
    for s in raw.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        out.push(server_url(s).map_err(|r| AgentError::invalid("server", r))?);
    }
    if out.is_empty() {
        return Err(AgentError::invalid("server", "is empty; give at least one host:port"));
    }
    Ok(out)
}

/// `host:port` → `http://host:port`; keeps an explicit scheme.
pub fn server_url(s: &str) -> Result<String, String> {
    let url = if s.starts_with("http://") || s.starts_with("https://") { s.to_string() } else { format!("http://{s}") };
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or_default();
    if rest.is_empty() || !rest.contains(':') {
        return Err(format!("{s:?} is not host:port"));
    }
    Ok(url)
}

fn parse_labels(raw: &[String]) -> Result<BTreeMap<String, String>, AgentError> {
    let mut out = BTreeMap::new();
    for item in raw.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            return Err(AgentError::invalid("labels", format!("{item:?} is not key=value")));
        };
        let ok = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        if k.is_empty() || !ok(k) || !ok(v) {
            return Err(AgentError::invalid(
                "labels",
                format!("{item:?} has an empty key or characters outside [A-Za-z0-9-_./]"),
            ));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// `20000-29999` → 20000..=29999.
pub fn parse_port_range(s: &str) -> Result<RangeInclusive<u16>, AgentError> {
    let bad =
        || AgentError::invalid("engine-port-range", format!("{s:?} is not LOW-HIGH with 1024 <= LOW <= HIGH <= 65535"));
    let (lo, hi) = s.split_once('-').ok_or_else(bad)?;
    let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
    let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
    if lo < 1024 || lo > hi {
        return Err(bad());
    }
    Ok(lo..=hi)
}

fn validate_dns_label(name: &str) -> Result<(), AgentError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(AgentError::invalid(
            "node-name",
            format!("{name:?} is not a DNS label (lowercase letters, digits, '-', at most 63)"),
        ))
    }
}

fn hostname() -> Option<String> {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").ok().or_else(|| std::env::var("HOSTNAME").ok())?;
    let name = raw.trim().split('.').next()?.to_ascii_lowercase();
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: AgentArgs,
    }

    fn parse_args(extra: &[&str]) -> AgentArgs {
        let mut argv = vec!["agent", "--sim-binary", "/bin/true"];
        if !extra.contains(&"--node-name") {
            argv.extend(["--node-name", "n1"]);
        }
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).expect("clap").args
    }

    fn parse(extra: &[&str]) -> Result<AgentConfig, AgentError> {
        parse_args(extra).validate()
    }

    fn flag(r: Result<AgentConfig, AgentError>) -> &'static str {
        match r {
            Err(AgentError::InvalidConfig { flag, .. }) => flag,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_and_simulated_gpus() {
        let c = parse(&["--gpus", "4", "--gpu-type", "A100-80GB", "--labels", "zone=a,rack=r1"]).unwrap();
        assert_eq!(c.gpus, GpuSource::Simulated { count: 4, gpu_type: "A100-80GB".into(), memory_mib: 81920 });
        assert_eq!(c.servers, vec!["http://127.0.0.1:7070".to_string()]);
        assert_eq!(c.labels.get("rack").map(String::as_str), Some("r1"));
        assert_eq!(c.ports, 20000..=29999);
        assert_eq!(c.vllm_command[0], "vllm");
    }

    #[test]
    fn bad_flags_name_the_flag() {
        assert_eq!(flag(parse(&["--gpus", "2"])), "gpu-type");
        assert_eq!(flag(parse(&["--engine-port-range", "300-20"])), "engine-port-range");
        assert_eq!(flag(parse(&["--engine-port-range", "x"])), "engine-port-range");
        assert_eq!(flag(parse(&["--engine-port-range", "80-8000"])), "engine-port-range");
        assert!(parse(&["--gpus", "1", "--gpu-type", "T", "--engine-port-range", "1024-1024"]).is_ok());
        assert_eq!(flag(parse(&["--address", "gpu-01.example"])), "address");
        assert_eq!(flag(parse(&["--address", ""])), "address");
        for ok in ["10.0.0.7", "::1", "localhost"] {
            assert!(parse(&["--gpus", "1", "--gpu-type", "T", "--address", ok]).is_ok(), "{ok}");
        }
        assert_eq!(flag(parse(&["--labels", "novalue"])), "labels");
        let mut bad_server = parse_args(&[]);
        bad_server.server = vec!["nohostport".into()];
        assert_eq!(flag(bad_server.validate()), "server");
        assert_eq!(flag(parse(&["--node-name", "Bad_Name"])), "node-name");
        assert_eq!(flag(parse(&["--sim-args", "'unbalanced"])), "sim-args");
        assert_eq!(flag(parse(&["--vllm-command", "vllm serve --port 1"])), "vllm-command");
        assert!(parse(&["--gpus", "2"]).unwrap_err().is_usage());
    }

    #[test]
    fn engine_env_and_policy_flags() {
        let c = parse(&["--engine-env", "HF_TOKEN,MY_*"]).unwrap();
        assert_eq!(
            c.engine_env,
            [
                crate::engine_env::EnvPattern::Exact("HF_TOKEN".into()),
                crate::engine_env::EnvPattern::Prefix("MY_".into())
            ]
        );
        assert_eq!(flag(parse(&["--engine-env", "*"])), "engine-env");
        assert_eq!(parse(&["--gang-interface", "ib0"]).unwrap().gang_interface.as_deref(), Some("ib0"));
        assert_eq!(parse(&[]).unwrap().gang_interface, None);
        assert_eq!(parse(&[]).unwrap().ray, None, "no Ray nodes unless asked");
        let ray = parse(&["--ray", "/opt/ray", "--ray-member-binary", "/usr/bin/flotilla"]).unwrap().ray.unwrap();
        assert_eq!((ray.program.to_str(), ray.member_binary.to_str()), (Some("/opt/ray"), Some("/usr/bin/flotilla")));
        assert_eq!(flag(parse(&["--gang-interface", "eth0:1"])), "gang-interface");
        let ucx = parse(&["--ucx-env", "UCX_TLS=rc,cuda_copy", "--ucx-env", "UCX_NET_DEVICES=mlx5_0:1"]).unwrap();
        assert_eq!(
            ucx.ucx_env,
            [("UCX_TLS".to_string(), "rc,cuda_copy".to_string()), ("UCX_NET_DEVICES".into(), "mlx5_0:1".into())]
        );
        assert!(parse(&[]).unwrap().ucx_env.is_empty());
        for bad in ["LD_PRELOAD=/x.so", "UCX_TLS", "UCX_TLS=a\tb"] {
            let e = parse(&["--ucx-env", bad]).unwrap_err();
            assert!(e.is_usage() && e.exit_code() == 2 && e.to_string().contains("--ucx-env"), "{bad}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.yaml");
        std::fs::write(
            &good,
            "allow: [--trust-remote-code]
",
        )
        .unwrap();
        let c = parse(&["--engine-policy", good.to_str().unwrap()]).unwrap();
        use crate::engine_policy::{check, Parser};
        let trust = ["--trust-remote-code".to_string()];
        assert!(check(&c.engine_policy, Parser::Argparse, &trust).is_ok());
        assert!(check(&parse(&[]).unwrap().engine_policy, Parser::Argparse, &trust).is_err());
        let bad = dir.path().join("bad.yaml");
        std::fs::write(
            &bad,
            "allow: [--trust-remote-code]
alow: [--port]
",
        )
        .unwrap();
        let e = parse(&["--engine-policy", bad.to_str().unwrap()]).unwrap_err();
        assert!(e.is_usage());
        let text = e.to_string();
        assert!(text.contains("--engine-policy") && text.contains("bad.yaml") && text.contains("alow"), "{text}");
        let missing = dir.path().join("missing.yaml");
        assert_eq!(flag(parse(&["--engine-policy", missing.to_str().unwrap()])), "engine-policy");
        assert_eq!(flag(parse(&["--sim-args", "--api-key k"])), "sim-args");
        assert_eq!(
            flag(parse(&["--vllm-command", "vllm serve {source} --host {host} --port {port} --api-key k"])),
            "vllm-command"
        );
    }

    #[test]
    fn source_policy_flag_and_loopback_defaults() {
        use crate::source_policy::Rule;
        let rule = |c: &AgentConfig, src: &str| c.source_policy.check(src).err().map(|r| r.rule);
        let local = parse(&[]).unwrap();
        assert_eq!(rule(&local, "http://127.0.0.1:9/m"), None, "a loopback agent may fetch over http");
        let remote = parse(&["--address", "10.0.0.7"]).unwrap();
        assert_eq!(rule(&remote, "http://127.0.0.1:9/m"), Some(Rule::Schemes));
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("agent");
        let c = parse(&["--data-dir", data.to_str().unwrap()]).unwrap();
        assert_eq!(rule(&c, &format!("file://{}/agent-id", data.display())), Some(Rule::AgentData));
        let good = dir.path().join("good.yaml");
        std::fs::write(&good, "schemes: [file]\npaths: {file: [/models]}\n").unwrap();
        let c = parse(&["--source-policy", good.to_str().unwrap()]).unwrap();
        assert_eq!(rule(&c, "file:///models/x"), None);
        assert_eq!(rule(&c, "file:///etc/x"), Some(Rule::Paths));
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, "schemes: [file]\nhost: [h]\n").unwrap();
        let e = parse(&["--source-policy", bad.to_str().unwrap()]).unwrap_err();
        assert!(e.is_usage() && e.exit_code() == 2);
        let text = e.to_string();
        assert!(text.contains("--source-policy") && text.contains("bad.yaml") && text.contains("`host`"), "{text}");
        let missing = dir.path().join("missing.yaml");
        assert_eq!(flag(parse(&["--source-policy", missing.to_str().unwrap()])), "source-policy");
        assert_eq!(flag(parse(&["--hf-endpoint", "https://user@h"])), "hf-endpoint");
    }

    #[test]
    fn every_flag_is_documented() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        for arg in cmd.get_arguments().filter(|a| a.get_id() != "help") {
            assert!(arg.get_help().is_some(), "--{} has no help text", arg.get_id());
        }
    }

    #[test]
    fn memory_is_read_from_the_type() {
        assert_eq!(memory_from_type("H100-80GB"), Some(81920));
        assert_eq!(memory_from_type("L4-24GB"), Some(24576));
        assert_eq!(memory_from_type("T4"), None);
    }
}
