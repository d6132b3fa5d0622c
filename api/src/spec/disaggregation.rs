//! Prefill/decode disaggregation: a Model whose prefill and decode run on separate engine
//! pools (`spec.disaggregation`), and the role a member pool's engines play
//! (`spec.kv_transfer`, set on the member Models the controller derives).
//!
//! A disaggregated Model runs no replicas of its own: the model controller keeps two member
//! Models, `<name>-prefill` and `<name>-decode` ([`member_name`]), each an ordinary Model
//! (its own replicas, rollout, autoscaling) derived by [`ModelSpec::member`] and labelled
//! [`MEMBER_OF_LABEL`]. Gateways serve the disaggregated name by sending each request's
//! prefill to one pool and its decode to the other (docs/gateway.md, "P/D").
use serde::{Deserialize, Serialize};

use super::{at_most, AutoscalingSpec, ModelSpec, MAX_GPUS_PER_REPLICA, MAX_REPLICAS};
use crate::{ApiError, ObjectName};

/// The label a member Model carries: the name of the disaggregated Model it belongs to.
pub const MEMBER_OF_LABEL: &str = "flotilla.io/member-of";
/// The label a member Model carries: its role (`prefill` or `decode`).
pub const ROLE_LABEL: &str = "flotilla.io/role";
/// Most characters of a disaggregated Model's name: `-prefill` must still fit a DNS label.
pub const MAX_DISAGGREGATED_NAME: usize = 63 - "-prefill".len();

/// How KV blocks move from the prefill engine to the decode engine: vLLM's connector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvConnector {
    /// `NixlConnector` (UCX: RDMA, NVLink, TCP), the one vLLM's P/D examples use.
    Nixl,
    /// `LMCacheConnectorV1` with LMCache's P/D (NIXL underneath).
    Lmcache,
    /// `P2pNcclConnector` (NCCL between the engines).
    P2pNccl,
}

impl KvConnector {
    /// Why flotilla cannot serve this connector's P/D yet (None: it can). The agent starts
    /// every connector's engines (docs/agent.md), but the gateways speak only the pull
    /// protocol of NixlConnector, where the prefill engine's answer names its blocks.
    pub fn unsupported(self) -> Option<&'static str> {
        match self {
            KvConnector::Nixl => None,
            KvConnector::Lmcache => Some(
                "lmcache is not served by flotilla's gateways yet: LMCache's P/D pushes the KV, so the prefill \
                 request must carry the decode engine's ports; use nixl",
            ),
            KvConnector::P2pNccl => Some(
                "p2p-nccl is not served by flotilla's gateways yet: P2pNcclConnector needs its proxy's request ids \
                 naming both engines (and vLLM 0.32 no longer ships it); use nixl",
            ),
        }
    }

    /// vLLM's `kv_connector` name.
    pub fn vllm_name(self) -> &'static str {
        match self {
            KvConnector::Nixl => "NixlConnector",
            KvConnector::Lmcache => "LMCacheConnectorV1",
            KvConnector::P2pNccl => "P2pNcclConnector",
        }
    }
}

/// The part of a request an engine pool serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineRole {
    Prefill,
    Decode,
}

impl EngineRole {
    pub const ALL: [EngineRole; 2] = [EngineRole::Prefill, EngineRole::Decode];

    /// The role named `s` (`prefill`, `decode`).
    pub fn parse(s: &str) -> Option<EngineRole> {
        EngineRole::ALL.into_iter().find(|r| r.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EngineRole::Prefill => "prefill",
            EngineRole::Decode => "decode",
        }
    }
}

/// What a member pool's engines are started as: the agent turns it into the connector's
/// `--kv-transfer-config` and side-channel settings.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvTransferRole {
    pub connector: KvConnector,
    pub role: EngineRole,
    /// Place this role's replicas in the topology domains (values of this node label) where
    /// the other role's replicas run ([`DisaggregationSpec::colocate`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub colocate: Option<String>,
}

impl KvTransferRole {
    /// The member Model serving the other role of the same disaggregated Model, when `model`
    /// is this role's member.
    pub fn sibling(&self, model: &str) -> Option<String> {
        let parent = served_name(model, Some(self.role));
        let other = if self.role == EngineRole::Prefill { EngineRole::Decode } else { EngineRole::Prefill };
        (parent != model).then(|| format!("{parent}-{}", other.as_str()))
    }
}

/// One role's pool: its own count, GPUs, extra engine arguments and autoscaling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolePool {
    #[serde(default = "one")]
    pub replicas: u32,
    /// GPUs per replica of this role; None: the Model's `gpus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    /// Appended to the Model's `engine_args` for this role's engines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub engine_args: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Box<AutoscalingSpec>>,
}

fn one() -> u32 {
    1
}

/// Most `min_remote_prefill_tokens` a decider may name.
pub const MAX_MIN_REMOTE_PREFILL_TOKENS: u32 = 1 << 20;
/// Most `max_prefill_queue` a decider may name.
pub const MAX_PREFILL_QUEUE: u32 = 100_000;

/// When the gateway sends a request's prefill to the prefill pool, and when it lets the
/// decode engine compute the prompt itself.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PdDecider {
    /// Prompts shorter than this many tokens are prefilled on the decode engine: a transfer
    /// costs more than it saves.
    #[serde(default = "default_min_remote_prefill_tokens")]
    pub min_remote_prefill_tokens: u32,
    /// When the chosen decode engine already caches at least this fraction of the prompt
    /// (the gateway's KV index), it prefills the rest itself.
    #[serde(default = "default_skip_when_cached")]
    pub skip_when_cached: f64,
    /// When every prefill engine already has this many requests in flight, the decode
    /// engine computes the prompt itself (conditional disaggregation: past the prefill pool's
    /// capacity, queueing there costs more TTFT than local prefill costs decode time).
    /// 0: never for this reason.
    #[serde(default)]
    pub max_prefill_queue: u32,
}

fn default_min_remote_prefill_tokens() -> u32 {
    256
}

fn default_skip_when_cached() -> f64 {
    0.8
}

impl Default for PdDecider {
    fn default() -> Self {
        PdDecider {
            min_remote_prefill_tokens: default_min_remote_prefill_tokens(),
            skip_when_cached: default_skip_when_cached(),
            max_prefill_queue: 0,
        }
    }
}

/// `spec.disaggregation`: the two pools and how KV moves between them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisaggregationSpec {
    pub connector: KvConnector,
    pub prefill: RolePool,
    pub decode: RolePool,
    #[serde(default)]
    pub decider: PdDecider,
    /// A node label naming topology domains (e.g. `flotilla.io/rack`): each role's replicas
    /// go, where capacity allows, to domains where the other role runs, so KV transfers stay
    /// on the domain's fabric. A preference, not a constraint: a replica that fits nowhere
    /// else is placed anyway. None: placed as any replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub colocate: Option<String>,
}

impl DisaggregationSpec {
    pub fn pool(&self, role: EngineRole) -> &RolePool {
        match role {
            EngineRole::Prefill => &self.prefill,
            EngineRole::Decode => &self.decode,
        }
    }

    pub(crate) fn validate(&self, field: &str) -> Result<(), ApiError> {
        if let Some(why) = self.connector.unsupported() {
            return Err(ApiError::invalid(format!("{field}.connector"), why));
        }
        for role in EngineRole::ALL {
            let pool = self.pool(role);
            let f = format!("{field}.{}", role.as_str());
            at_most(&format!("{f}.replicas"), pool.replicas, MAX_REPLICAS)?;
            if let Some(g) = pool.gpus {
                at_most(&format!("{f}.gpus"), g, MAX_GPUS_PER_REPLICA)?;
            }
            at_most(&format!("{f}.engine_args"), pool.engine_args.len(), 256)?;
            for (i, a) in pool.engine_args.iter().enumerate() {
                at_most(&format!("{f}.engine_args[{i}] length"), a.len(), 4096)?;
            }
            refuse_agent_flags(&format!("{f}.engine_args"), &pool.engine_args)?;
            if let Some(a) = &pool.autoscaling {
                a.validate(&format!("{f}.autoscaling"))?;
            }
        }
        let d = &self.decider;
        if !(0.0..=1.0).contains(&d.skip_when_cached) {
            return Err(ApiError::invalid(
                format!("{field}.decider.skip_when_cached"),
                format!("{} is not a fraction between 0 and 1", d.skip_when_cached),
            ));
        }
        let min_tokens = d.min_remote_prefill_tokens;
        at_most(&format!("{field}.decider.min_remote_prefill_tokens"), min_tokens, MAX_MIN_REMOTE_PREFILL_TOKENS)?;
        at_most(&format!("{field}.decider.max_prefill_queue"), d.max_prefill_queue, MAX_PREFILL_QUEUE)?;
        if let Some(key) = &self.colocate {
            let labels = std::collections::BTreeMap::from([(key.clone(), String::new())]);
            crate::manifest::validate_labels(&format!("{field}.colocate"), &labels)?;
        }
        Ok(())
    }
}

/// The engine arguments the agent owns for a member's engines: a Model may not set them.
pub const KV_TRANSFER_FLAGS: [&str; 1] = ["--kv-transfer-config"];

/// Refuses, naming `field[i]`, an argument of `args` that is one of [`KV_TRANSFER_FLAGS`].
fn refuse_agent_flags(field: &str, args: &[String]) -> Result<(), ApiError> {
    for (i, a) in args.iter().enumerate() {
        let flag = a.split('=').next().unwrap_or(a);
        if KV_TRANSFER_FLAGS.contains(&flag) {
            return Err(ApiError::invalid(
                format!("{field}[{i}]"),
                format!("{flag} is set by the agent from spec.disaggregation; remove it"),
            ));
        }
    }
    Ok(())
}

/// The name of `model`'s member Model for `role`.
pub fn member_name(model: &ObjectName, role: EngineRole) -> Result<ObjectName, ApiError> {
    format!("{model}-{}", role.as_str()).parse()
}

/// The model name a replica's engine serves: its Model's, except for a member of a
/// disaggregated Model, whose engines serve the disaggregated name (`llama-decode` serves
/// `llama`), so the gateway forwards the client's body unchanged.
pub fn served_name(model: &str, role: Option<EngineRole>) -> &str {
    match role {
        Some(role) => model.strip_suffix(role.as_str()).and_then(|m| m.strip_suffix('-')).unwrap_or(model),
        None => model,
    }
}

impl ModelSpec {
    /// The spec of the member Model serving `role` of this disaggregated Model (None when it
    /// is not disaggregated): the Model's template with the role's pool applied — its count,
    /// GPUs, extra arguments and autoscaling — and the role to start its engines as.
    pub fn member(&self, role: EngineRole) -> Option<ModelSpec> {
        let d = self.disaggregation.as_ref()?;
        let pool = d.pool(role);
        let mut engine_args = self.engine_args.clone();
        engine_args.extend(pool.engine_args.iter().cloned());
        Some(ModelSpec {
            replicas: pool.replicas,
            gpus: pool.gpus.unwrap_or(self.gpus),
            engine_args,
            autoscaling: pool.autoscaling.clone(),
            disaggregation: None,
            kv_transfer: Some(KvTransferRole { connector: d.connector, role, colocate: d.colocate.clone() }),
            ..self.clone()
        })
    }

    /// The checks of a disaggregated Model's fields against each other.
    pub(crate) fn validate_disaggregation(&self) -> Result<(), ApiError> {
        refuse_agent_flags("spec.engine_args", &self.engine_args)?;
        let Some(d) = &self.disaggregation else { return Ok(()) };
        d.validate("spec.disaggregation")?;
        if self.kv_transfer.is_some() {
            return Err(ApiError::invalid(
                "spec.kv_transfer",
                "a disaggregated Model is not itself a member of one: set spec.disaggregation or spec.kv_transfer, not both",
            ));
        }
        if self.autoscaling.is_some() {
            return Err(ApiError::invalid(
                "spec.autoscaling",
                "a disaggregated Model scales per role: use spec.disaggregation.prefill.autoscaling and .decode.autoscaling",
            ));
        }
        if self.replicas != 1 {
            return Err(ApiError::invalid(
                "spec.replicas",
                "a disaggregated Model runs no replicas itself: set spec.disaggregation.prefill.replicas and .decode.replicas",
            ));
        }
        if self.rollout.canary.is_some() {
            return Err(ApiError::invalid(
                "spec.rollout.canary",
                "canaries of disaggregated Models are not supported yet: roll them with maxSurge/maxUnavailable",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Spec;
    use crate::Kind;

    fn model(yaml: &str) -> Result<ModelSpec, ApiError> {
        let v: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
        match Spec::from_yaml(Kind::Model, v)? {
            Spec::Model(m) => Ok(m),
            _ => unreachable!(),
        }
    }

    const PD: &str = "source: file:///m\nengine: sim\ngpus: 1\nengine_args: [--max-model-len, '8192']\n\
        disaggregation:\n  connector: nixl\n  prefill: {replicas: 2, engine_args: [--max-num-batched-tokens, '8192']}\n  \
        decode: {replicas: 3, gpus: 2}\n";

    #[test]
    fn members_take_the_template_and_their_pool() {
        let m = model(PD).unwrap();
        let p = m.member(EngineRole::Prefill).unwrap();
        assert_eq!(p.replicas, 2);
        assert_eq!(p.gpus, 1);
        assert_eq!(p.engine_args, ["--max-model-len", "8192", "--max-num-batched-tokens", "8192"]);
        let role = |role| Some(KvTransferRole { connector: KvConnector::Nixl, role, colocate: None });
        assert_eq!(p.kv_transfer, role(EngineRole::Prefill));
        assert_eq!(p.kv_transfer.as_ref().unwrap().sibling("x-prefill").as_deref(), Some("x-decode"));
        assert_eq!(role(EngineRole::Decode).unwrap().sibling("x-decode").as_deref(), Some("x-prefill"));
        assert_eq!(role(EngineRole::Decode).unwrap().sibling("plain").as_deref(), None);
        assert!(p.disaggregation.is_none());
        let d = m.member(EngineRole::Decode).unwrap();
        assert_eq!((d.replicas, d.gpus), (3, 2));
        assert_eq!(d.engine_args, ["--max-model-len", "8192"]);
        // the role is part of the template: the pools never share a revision
        assert_ne!(p.template().hash(), d.template().hash());
        assert!(p.validate().is_ok() && d.validate().is_ok(), "a member is a valid Model");
        assert_eq!(KvConnector::P2pNccl.vllm_name(), "P2pNcclConnector");
        assert!(model("source: file:///m\n").unwrap().member(EngineRole::Decode).is_none());
    }

    #[test]
    fn a_template_without_a_role_hashes_as_before() {
        // Existing replicas must not roll when this field arrives.
        let m = model("source: file:///m\n").unwrap();
        assert!(!serde_json::to_string(&m.template()).unwrap().contains("kv_transfer"));
    }

    #[test]
    fn bad_disaggregations_name_the_field() {
        let cases = [
            (PD.replace("nixl", "rdma"), "spec"),
            (PD.replace("nixl", "lmcache"), "spec.disaggregation.connector"),
            (PD.replace("nixl", "p2p-nccl"), "spec.disaggregation.connector"),
            (PD.replace("replicas: 3", "replicas: 3, extra: 1"), "spec"),
            (PD.replace("replicas: 2", "replicas: 2000"), "spec.disaggregation.prefill.replicas"),
            (PD.replace("gpus: 2", "gpus: 99"), "spec.disaggregation.decode.gpus"),
            (format!("{PD}replicas: 4\n"), "spec.replicas"),
            (format!("{PD}autoscaling: {{min: 1, max: 2}}\n"), "spec.autoscaling"),
            (format!("{PD}kv_transfer: {{connector: nixl, role: decode}}\n"), "spec.kv_transfer"),
            (
                PD.replace("decode: {", "decider: {skip_when_cached: 1.5}\n  decode: {"),
                "spec.disaggregation.decider.skip_when_cached",
            ),
            (
                PD.replace("[--max-num-batched-tokens, '8192']", "['--kv-transfer-config={}']"),
                "spec.disaggregation.prefill.engine_args[0]",
            ),
            ("source: file:///m\nengine_args: [--kv-transfer-config, '{}']\n".to_string(), "spec.engine_args[0]"),
            (PD.replace("connector: nixl", "connector: nixl\n  colocate: 'a rack'"), "spec.disaggregation.colocate"),
        ];
        for (yaml, field) in cases {
            let e = model(&yaml).expect_err(&yaml).to_string();
            assert!(e.contains(field), "{yaml}\n-> {e} (wanted {field})");
        }
    }

    #[test]
    fn members_serve_the_disaggregated_name() {
        let role = Some;
        assert_eq!(served_name("llama-decode", role(EngineRole::Decode)), "llama");
        assert_eq!(served_name("llama-prefill", role(EngineRole::Prefill)), "llama");
        assert_eq!(served_name("llama-decode", None), "llama-decode");
        // a name that does not end in its role (never derived so) is served as it is
        assert_eq!(served_name("llama-decode", role(EngineRole::Prefill)), "llama-decode");
        assert_eq!(served_name("xdecode", role(EngineRole::Decode)), "xdecode");
    }

    #[test]
    fn member_names_fit_or_fail() {
        let ok: ObjectName = "llama".parse().unwrap();
        assert_eq!(member_name(&ok, EngineRole::Decode).unwrap().as_str(), "llama-decode");
        let long: ObjectName = "a".repeat(MAX_DISAGGREGATED_NAME + 1).parse().unwrap();
        assert!(member_name(&long, EngineRole::Prefill).is_err());
        let max: ObjectName = "a".repeat(MAX_DISAGGREGATED_NAME).parse().unwrap();
        assert!(member_name(&max, EngineRole::Prefill).is_ok());
    }
}
