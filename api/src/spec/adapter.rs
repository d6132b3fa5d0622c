//! `kind: Adapter`: a LoRA adapter multiplexed onto replicas of a base model. The spec says
//! which base model, where the weights come from, how many base replicas keep it loaded
//! (`replicas: N`, or `on-demand`: loaded when requested, evicted when idle) and how those
//! replicas are chosen; the status (written by the leader's adapter controller) says where
//! it is loaded and, for every other base replica, why not.
use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::model::{LoraLimits, MAX_REPLICAS};
use super::{at_most, validate_source, ModelSpec};
use crate::{ApiError, ObjectName};

/// Highest LoRA rank any engine accepts (vLLM's `--max-lora-rank` choices end at 512).
pub const MAX_LORA_RANK: u32 = 512;

/// How many base-model replicas keep an adapter loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterReplicas {
    /// Kept loaded (pinned, never evicted) on this many replicas; more load on demand.
    Count(u32),
    /// Loaded only when a request asks for it; evicted (LRU) when a replica needs the slot.
    OnDemand,
}

impl Default for AdapterReplicas {
    fn default() -> Self {
        AdapterReplicas::Count(1)
    }
}

impl AdapterReplicas {
    /// The pinned count (0 for on-demand).
    pub fn pinned(self) -> u32 {
        match self {
            AdapterReplicas::Count(n) => n,
            AdapterReplicas::OnDemand => 0,
        }
    }
}

impl Serialize for AdapterReplicas {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            AdapterReplicas::Count(n) => s.serialize_u32(*n),
            AdapterReplicas::OnDemand => s.serialize_str("on-demand"),
        }
    }
}

impl<'de> Deserialize<'de> for AdapterReplicas {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        const EXPECTED: &str = "a count of base replicas (0 to 1000) or \"on-demand\"";
        impl Visitor<'_> for V {
            type Value = AdapterReplicas;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<AdapterReplicas, E> {
                u32::try_from(v).map(AdapterReplicas::Count).map_err(|_| E::custom(format!("{v} is not {EXPECTED}")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<AdapterReplicas, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("{v} is not {EXPECTED}")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<AdapterReplicas, E> {
                Err(E::custom(format!("{v} is not {EXPECTED}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<AdapterReplicas, E> {
                match v {
                    "on-demand" => Ok(AdapterReplicas::OnDemand),
                    _ => Err(E::custom(format!("{v:?} is not {EXPECTED}"))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// How the controller picks base replicas for an adapter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdapterPlacement {
    /// The replica holding the fewest adapters (spreads adapters evenly).
    #[default]
    LeastAdapters,
    /// The fullest replica that still has a free slot (keeps other replicas' slots free).
    BinPack,
    /// The replica with the fewest requests running and waiting.
    LeastLoad,
}

/// The spec of an `Adapter`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSpec {
    /// The `Model` whose replicas load this adapter.
    pub base_model: ObjectName,
    /// Where the adapter weights come from: `file://`, `http(s)://`, `s3://`, `hf://`, or
    /// `sim://NAME[?rank=N]` (a synthetic adapter, for `flotilla sim` engines only).
    pub source: String,
    /// LoRA rank, checked against the base model's `--max-lora-rank` at apply. Unset: the
    /// engine checks it when loading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<u32>,
    /// Base replicas that keep it loaded, or `on-demand`.
    #[serde(default)]
    pub replicas: AdapterReplicas,
    #[serde(default)]
    pub placement: AdapterPlacement,
    /// The tenants that may use it (at most [`MAX_ADAPTER_TENANTS`], no duplicates). Empty
    /// or absent: every tenant allowed its base model. Gateways answer any other tenant as
    /// if the adapter did not exist (inference, /tokenize, /detokenize, /v1/models, and no
    /// on-demand load on its behalf).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<ObjectName>,
}

/// Most tenants one adapter may name in `spec.tenants`.
pub const MAX_ADAPTER_TENANTS: usize = 256;

impl AdapterSpec {
    pub fn validate(&self) -> Result<(), ApiError> {
        if !self.source.starts_with("sim://") {
            validate_source("spec.source", &self.source)?;
        } else if self.source.len() <= "sim://".len() || self.source.len() > 2048 {
            return Err(ApiError::invalid("spec.source", format!("{:?} names no adapter after sim://", self.source)));
        }
        if let Some(r) = self.rank {
            if r == 0 {
                return Err(ApiError::invalid("spec.rank", "must be at least 1"));
            }
            at_most("spec.rank", r, MAX_LORA_RANK)?;
        }
        at_most("spec.replicas", self.replicas.pinned(), MAX_REPLICAS)?;
        at_most("spec.tenants", self.tenants.len(), MAX_ADAPTER_TENANTS)?;
        let mut seen = std::collections::HashSet::new();
        for (i, t) in self.tenants.iter().enumerate() {
            if !seen.insert(t.as_str()) {
                return Err(ApiError::invalid(format!("spec.tenants[{i}]"), format!("tenant {t} is listed twice")));
            }
        }
        Ok(())
    }

    /// Checks the adapter against its base model (at apply, and by the controller): LoRA
    /// must be on in the base model's engine and the rank within its `--max-lora-rank`.
    pub fn check_base(&self, base: &ModelSpec) -> Result<LoraLimits, ApiError> {
        let lora = base.lora()?;
        if !lora.enabled {
            return Err(ApiError::invalid(
                "spec.base_model",
                format!(
                    "model {} does not serve LoRA adapters: add --enable-lora to its spec.engine_args",
                    self.base_model
                ),
            ));
        }
        if let Some(r) = self.rank.filter(|r| *r > lora.max_lora_rank) {
            return Err(ApiError::invalid(
                "spec.rank",
                format!(
                    "{r} is above the base model {}'s --max-lora-rank {} (raise it in the model's engine_args)",
                    self.base_model, lora.max_lora_rank
                ),
            ));
        }
        Ok(lora)
    }
}

/// An adapter's lifecycle as a whole.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdapterPhase {
    /// Not loaded anywhere and not being loaded (on-demand adapters rest here).
    #[default]
    Pending,
    /// An agent is fetching the weights into its node cache.
    Downloading,
    /// The engine is loading it.
    Loading,
    /// Loaded on at least the pinned count of replicas (on-demand: on at least one).
    Ready,
    /// Cannot load: bad source, engine refused it, base model missing.
    Failed,
}

/// Where an adapter stands on one base replica.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdapterReplicaState {
    /// Assigned here; the agent has not reported on it yet.
    #[default]
    Assigned,
    Downloading,
    Loading,
    Loaded,
    /// The last load here failed (see reason); retried elsewhere.
    Failed,
    /// Not assigned here (see reason).
    NotLoaded,
}

/// One base replica in an adapter's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterOnReplica {
    pub replica: ObjectName,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    pub state: AdapterReplicaState,
    /// Why it is not loaded here, or what failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Kept here by `replicas: N` (not evicted for on-demand loads).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pinned: bool,
}

/// The status of an `Adapter`, written by its controller.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterStatus {
    pub phase: AdapterPhase,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Replicas that keep it pinned (0 for on-demand).
    pub desired_replicas: u32,
    /// Replicas whose engine reports it loaded.
    pub loaded_replicas: u32,
    /// Every replica of the base model (and any other that holds it).
    #[serde(default)]
    pub replicas: Vec<AdapterOnReplica>,
    /// Download plus engine load time of the last load that succeeded, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_latency_ms: Option<u64>,
}

/// An adapter a replica must hold, as stored in the replica's spec (written by the adapter
/// controller, fenced by the replica's revision so slot counts stay exact).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterBinding {
    pub name: ObjectName,
    pub source: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> Result<AdapterSpec, String> {
        let s: AdapterSpec = serde_yaml::from_str(yaml).map_err(|e| e.to_string())?;
        s.validate().map_err(|e| e.to_string())?;
        Ok(s)
    }

    #[test]
    fn replicas_are_a_count_or_on_demand() {
        let s = spec("{base_model: m, source: 'sim://a'}").unwrap();
        assert_eq!((s.replicas, s.placement), (AdapterReplicas::Count(1), AdapterPlacement::LeastAdapters));
        let s = spec("{base_model: m, source: 'sim://a', replicas: on-demand, placement: bin-pack}").unwrap();
        assert_eq!((s.replicas, s.placement), (AdapterReplicas::OnDemand, AdapterPlacement::BinPack));
        assert_eq!(serde_json::to_value(&s).unwrap()["replicas"], "on-demand");
        assert_eq!(spec("{base_model: m, source: 'sim://a', replicas: 3}").unwrap().replicas.pinned(), 3);
        for bad in ["-1", "1.5", "lots", "1001"] {
            let e = spec(&format!("{{base_model: m, source: 'sim://a', replicas: {bad}}}")).unwrap_err();
            assert!(e.contains("replicas") || e.contains("on-demand"), "{bad}: {e}");
        }
        let round: AdapterSpec = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(round, s);
    }

    #[test]
    fn sources_and_ranks_are_checked() {
        assert!(spec("{base_model: m, source: 'file:///a/b', rank: 8}").is_ok());
        assert!(spec("{base_model: m, source: 'sim://'}").unwrap_err().contains("spec.source"));
        assert!(spec("{base_model: m, source: 'ftp://x'}").unwrap_err().contains("spec.source"));
        assert!(spec("{base_model: m, source: 'sim://a', rank: 0}").unwrap_err().contains("spec.rank"));
        assert!(spec("{base_model: m, source: 'sim://a', rank: 1024}").unwrap_err().contains("spec.rank"));
        assert!(spec("{base_model: m, source: 'sim://a', colour: red}").unwrap_err().contains("colour"));
    }

    #[test]
    fn tenants_are_names_bounded_and_distinct() {
        let s = spec("{base_model: m, source: 'sim://a'}").unwrap();
        assert!(s.tenants.is_empty());
        assert!(!serde_json::to_string(&s).unwrap().contains("tenants"), "absent stays absent");
        let s = spec("{base_model: m, source: 'sim://a', tenants: [team-a, team-b]}").unwrap();
        assert_eq!(s.tenants.iter().map(|t| t.as_str()).collect::<Vec<_>>(), ["team-a", "team-b"]);
        let round: AdapterSpec = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(round, s);
        let many: Vec<String> = (0..=MAX_ADAPTER_TENANTS).map(|i| format!("t{i}")).collect();
        let cases = [
            ("[team-a, team-a]".to_string(), "spec.tenants[1]"),
            ("[Not_A_Name]".to_string(), "may hold only lowercase letters"),
            ("['']".to_string(), "is empty"),
            ("team-a".to_string(), "expected a sequence"),
            (format!("[{}]", many.join(", ")), "spec.tenants"),
        ];
        for (bad, want) in cases {
            let e = spec(&format!("{{base_model: m, source: 'sim://a', tenants: {bad}}}")).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn the_base_model_must_serve_lora_at_that_rank() {
        let base = |args: &[&str], engine: &str| -> ModelSpec {
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            serde_json::from_value(serde_json::json!({"source": "hf://x/y", "engine": engine, "engine_args": args}))
                .unwrap()
        };
        let a = spec("{base_model: m, source: 'sim://a', rank: 32}").unwrap();
        let e = a.check_base(&base(&[], "vllm")).unwrap_err().to_string();
        assert!(e.starts_with("spec.base_model:") && e.contains("--enable-lora"), "{e}");
        let e = a.check_base(&base(&["--enable-lora"], "vllm")).unwrap_err().to_string();
        assert!(e.starts_with("spec.rank:") && e.contains("--max-lora-rank 16"), "{e}");
        let ok = a.check_base(&base(&["--enable-lora", "--max-lora-rank=64", "--max-loras", "4"], "vllm")).unwrap();
        assert_eq!((ok.max_loras, ok.max_cpu_loras, ok.max_lora_rank), (4, 4, 64));
        assert!(a.check_base(&base(&["--max-lora-rank", "32"], "sim")).is_ok(), "sim serves LoRA by default");
        assert!(a.check_base(&base(&["--disable-lora"], "sim")).is_err());
    }
}
