//! `kind: Model`: a base model served by a set of engine replicas.
use serde::{Deserialize, Serialize};

use super::{at_most, validate_source, AutoscalingSpec, ReplicaTemplate, RolloutSpec, Topology};
use crate::ApiError;

/// Most replicas one model may ask for.
pub const MAX_REPLICAS: u32 = 1000;
/// Most GPUs one replica may ask for (a multi-node fleet's whole gang).
pub const MAX_GPUS_PER_REPLICA: u32 = 64;

/// What runs each replica.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    /// A real `vllm serve` process.
    #[default]
    Vllm,
    /// `flotilla sim`, the simulated vLLM engine.
    Sim,
}

/// How the gateway picks a replica for a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoutingStrategy {
    /// The default: `kv-aware` once the model's engines publish KV events and the gateway
    /// has the model's tokenizer, `least-request` until then (decided per request).
    #[default]
    Auto,
    Random,
    RoundRobin,
    /// Fewest requests in flight (the gateway's own count plus the engine's queue).
    LeastRequest,
    /// Lowest engine KV-cache usage.
    LeastKvCache,
    /// Lowest EWMA of time to first token and time per output token.
    LeastLatency,
    /// The less loaded of two random endpoints.
    PowerOfTwo,
    /// The endpoint most likely to hold the prompt's prefix in its KV cache.
    PrefixCache,
    /// Sticky by the `x-session-id` header.
    SessionAffinity,
    /// Lowest cost from the engines' own KV cache events: prompt tokens not cached there
    /// (token-exact, through the model's tokenizer) plus its load (docs/gateway.md).
    KvAware,
}

impl RoutingStrategy {
    pub const ALL: [RoutingStrategy; 10] = [
        RoutingStrategy::Auto,
        RoutingStrategy::Random,
        RoutingStrategy::RoundRobin,
        RoutingStrategy::LeastRequest,
        RoutingStrategy::LeastKvCache,
        RoutingStrategy::LeastLatency,
        RoutingStrategy::PowerOfTwo,
        RoutingStrategy::PrefixCache,
        RoutingStrategy::SessionAffinity,
        RoutingStrategy::KvAware,
    ];

    /// The kebab-case name used in specs and the `x-flotilla-routing` header.
    pub fn as_str(self) -> &'static str {
        match self {
            RoutingStrategy::Auto => "auto",
            RoutingStrategy::Random => "random",
            RoutingStrategy::RoundRobin => "round-robin",
            RoutingStrategy::LeastRequest => "least-request",
            RoutingStrategy::LeastKvCache => "least-kv-cache",
            RoutingStrategy::LeastLatency => "least-latency",
            RoutingStrategy::PowerOfTwo => "power-of-two",
            RoutingStrategy::PrefixCache => "prefix-cache",
            RoutingStrategy::SessionAffinity => "session-affinity",
            RoutingStrategy::KvAware => "kv-aware",
        }
    }
}

impl std::str::FromStr for RoutingStrategy {
    type Err = ApiError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RoutingStrategy::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| {
            let names: Vec<_> = RoutingStrategy::ALL.iter().map(|r| r.as_str()).collect();
            ApiError::invalid("routing", format!("{s:?} is not one of {}", names.join(", ")))
        })
    }
}

fn one() -> u32 {
    1
}

/// The spec of a `Model`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    #[serde(default)]
    pub engine: EngineKind,
    /// Where the weights come from: `hf://`, `s3://`, `file://`, `http(s)://`.
    pub source: String,
    /// Desired number of replicas (the autoscaler moves it within its bounds).
    #[serde(default = "one")]
    pub replicas: u32,
    /// GPUs per replica; 0 runs on CPU.
    #[serde(default = "one")]
    pub gpus: u32,
    /// Allowed GPU types, e.g. `A100-80GB`; empty allows any.
    #[serde(default)]
    pub gpu_types: Vec<String>,
    /// Extra arguments passed to the engine.
    #[serde(default)]
    pub engine_args: Vec<String>,
    /// A container image to run the engine in (`vllm/vllm-openai:v0.11.0`), through the
    /// agent's `--container-runtime`; None runs the engine as a process on the node. Agents
    /// only run images their `--engine-image` prefixes allow (see docs/deploy.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_image: Option<String>,
    /// One replica spanning several nodes (a gang); None: each replica on one node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<Topology>,
    #[serde(default)]
    pub routing: RoutingStrategy,
    /// Boxed: most models have none, and it is large (`Spec` stays small to move).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Box<AutoscalingSpec>>,
    /// How a change of the replica template ([`ModelSpec::template`]) replaces replicas.
    #[serde(default, skip_serializing_if = "RolloutSpec::is_default")]
    pub rollout: RolloutSpec,
    /// Prefill and decode on separate pools (member Models derived by the controller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disaggregation: Option<Box<super::DisaggregationSpec>>,
    /// This Model is one role of a disaggregated Model: its engines start with the
    /// connector's KV-transfer settings ([`super::KvTransferRole`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_transfer: Option<super::KvTransferRole>,
}

/// The LoRA settings of a model's engine, read from its `engine_args` with vLLM's
/// defaults: what the adapter controller plans slots with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraLimits {
    /// vLLM needs `--enable-lora`; the sim serves LoRA unless `--disable-lora`.
    pub enabled: bool,
    /// `--max-loras`: distinct adapters in one batch (GPU slots). Default 1.
    pub max_loras: u32,
    /// `--max-cpu-loras`: adapters the engine keeps loaded (CPU cache); at least
    /// `max_loras`. Default `max_loras`. The controller keeps at most this many adapters
    /// assigned to a replica.
    pub max_cpu_loras: u32,
    /// `--max-lora-rank`. Default 16.
    pub max_lora_rank: u32,
}

/// The value of `--flag N` or `--flag=N` in `args`, the last one winning as in argparse.
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let mut found = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == flag {
            found = it.next().map(String::as_str);
        } else if let Some(v) = a.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            found = Some(v);
        }
    }
    found
}

/// A container image reference as docker and podman take it: `[registry/]repo[:tag][@digest]`,
/// at most 255 characters of `[A-Za-z0-9._/:@-]`, not starting with `-` (it becomes one word
/// of the runtime's command line, where a leading dash would read as a flag).
pub fn validate_image(field: &str, image: &str) -> Result<(), ApiError> {
    let bad = |why: &str| Err(ApiError::invalid(field, format!("{image:?} is not an image reference: {why}")));
    if image.is_empty() {
        return bad("it is empty");
    }
    if image.len() > 255 {
        return bad("longer than 255 characters");
    }
    if image.starts_with(['-', '.', '/', ':', '@']) {
        return bad("it must start with a letter or digit");
    }
    if let Some(c) = image.chars().find(|c| !(c.is_ascii_alphanumeric() || "._/:@-".contains(*c))) {
        return bad(&format!("{c:?} is not allowed"));
    }
    Ok(())
}

impl ModelSpec {
    /// What each replica is started with; its [`ReplicaTemplate::hash`] is the revision
    /// stored with every replica.
    pub fn template(&self) -> ReplicaTemplate {
        ReplicaTemplate {
            engine: self.engine,
            source: self.source.clone(),
            engine_args: self.engine_args.clone(),
            gpus: self.gpus,
            gpu_types: self.gpu_types.clone(),
            engine_image: self.engine_image.clone(),
            topology: self.topology.clone(),
            kv_transfer: self.kv_transfer.clone(),
        }
    }

    /// Sets the template fields from `t` (a rollback).
    pub fn set_template(&mut self, t: ReplicaTemplate) {
        self.engine = t.engine;
        self.source = t.source;
        self.engine_args = t.engine_args;
        self.gpus = t.gpus;
        self.gpu_types = t.gpu_types;
        self.engine_image = t.engine_image;
        self.topology = t.topology;
        self.kv_transfer = t.kv_transfer;
    }

    /// The engine's LoRA settings (an unparsable number is an error naming the flag).
    pub fn lora(&self) -> Result<LoraLimits, ApiError> {
        let num = |flag: &str, default: u32| -> Result<u32, ApiError> {
            match flag_value(&self.engine_args, flag) {
                None => Ok(default),
                Some(v) => v.parse::<u32>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                    ApiError::invalid("spec.engine_args", format!("{flag} needs a positive integer, got {v:?}"))
                }),
            }
        };
        let has = |flag: &str| self.engine_args.iter().any(|a| a == flag);
        let enabled = match self.engine {
            EngineKind::Vllm => has("--enable-lora"),
            EngineKind::Sim => !has("--disable-lora"),
        };
        let max_loras = num("--max-loras", 1)?;
        let max_cpu_loras = num("--max-cpu-loras", max_loras)?;
        if max_cpu_loras < max_loras {
            return Err(ApiError::invalid(
                "spec.engine_args",
                format!("--max-cpu-loras {max_cpu_loras} is below --max-loras {max_loras} (vLLM refuses that)"),
            ));
        }
        Ok(LoraLimits { enabled, max_loras, max_cpu_loras, max_lora_rank: num("--max-lora-rank", 16)? })
    }

    pub fn validate(&self) -> Result<(), ApiError> {
        validate_source("spec.source", &self.source)?;
        if let Some(image) = &self.engine_image {
            validate_image("spec.engine_image", image)?;
        }
        at_most("spec.replicas", self.replicas, MAX_REPLICAS)?;
        match &self.topology {
            Some(t) => {
                t.validate("spec.topology", self.gpus, &self.engine_args)?;
                // A Ray member runs its Ray node beside the engine, on the host (agent/src/ray_member.rs).
                if t.layout == super::GangLayout::Ray && self.engine_image.is_some() {
                    return Err(ApiError::invalid(
                        "spec.engine_image",
                        "layout ray runs Ray's nodes on the hosts, beside the engine: engine_image is \
                         not supported with it (use tp-pp or data-parallel, or no image)",
                    ));
                }
            }
            None => at_most("spec.gpus", self.gpus, MAX_GPUS_PER_REPLICA)?,
        }
        at_most("spec.gpu_types", self.gpu_types.len(), 64)?;
        for (i, t) in self.gpu_types.iter().enumerate() {
            if t.trim().is_empty() || t.len() > 64 {
                return Err(ApiError::invalid(format!("spec.gpu_types[{i}]"), format!("{t:?} is not a GPU type name")));
            }
        }
        at_most("spec.engine_args", self.engine_args.len(), 256)?;
        for (i, a) in self.engine_args.iter().enumerate() {
            at_most(&format!("spec.engine_args[{i}] length"), a.len(), 4096)?;
        }
        self.lora()?;
        if let Some(a) = &self.autoscaling {
            a.validate("spec.autoscaling")?;
        }
        self.rollout.validate("spec.rollout")?;
        self.validate_disaggregation()?;
        Ok(())
    }
}
