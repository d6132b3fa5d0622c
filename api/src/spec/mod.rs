//! Typed specs for each kind. A spec is what the user asked for; `validate` checks the
//! ranges and relations that serde's typing cannot, naming the field at fault.
mod adapter;
mod autoscaling;
mod disaggregation;
mod federation;
mod model;
mod node;
mod replica;
mod rollout;
mod tenant;
mod token;
mod topology;
mod uri;

pub use adapter::{
    AdapterBinding, AdapterOnReplica, AdapterPhase, AdapterPlacement, AdapterReplicaState, AdapterReplicas,
    AdapterSpec, AdapterStatus, MAX_ADAPTER_TENANTS, MAX_LORA_RANK,
};
pub use autoscaling::{
    AutoscalingSpec, Bounds, MetricKind, MetricSource, MetricTarget, ScalingStrategy, Schedule, SloTarget,
    SpecDuration, TimeOfDay, Weekday, MAX_METRICS, MAX_SCALE_DOWN_DELAY, MAX_SCHEDULES, MAX_WINDOW,
};
pub use disaggregation::{
    member_name, served_name, DisaggregationSpec, EngineRole, KvConnector, KvTransferRole, PdDecider, RolePool,
    KV_TRANSFER_FLAGS, MAX_DISAGGREGATED_NAME, MAX_MIN_REMOTE_PREFILL_TOKENS, MAX_PREFILL_QUEUE, MEMBER_OF_LABEL,
    ROLE_LABEL,
};
pub use federation::{
    ClusterOverride, ClusterSpec, FederatedAdapterSpec, FederatedModelSpec, FederatedPlacement,
    DEFAULT_FEDERATION_GRACE, FEDERATED_BY_LABEL, MAX_CLUSTER_SERVERS, MAX_FEDERATION_GRACE, MAX_PLACEMENT_CLUSTERS,
};
pub use model::{
    validate_image, EngineKind, LoraLimits, ModelSpec, RoutingStrategy, MAX_GPUS_PER_REPLICA, MAX_REPLICAS,
};
pub use node::{Gpu, GpuHealth, GpuHealthState, NodeSpec, NodeState, NodeStatus};
pub use replica::{GangMember, ReplicaPhase, ReplicaSpec, ReplicaStatus};
pub use rollout::{CanarySpec, IntOrPercent, ReplicaTemplate, RolloutSpec, MAX_CANARY_STEPS};
pub use tenant::{
    hash_api_key, PriorityClass, TenantKey, TenantSpec, HASHED_KEY_PREFIX, MAX_TENANT_CONCURRENCY, TENANT_KEY_PREFIX,
};
pub use token::{parse_token, TokenSpec, TOKEN_PREFIX, TOKEN_ROLES};
pub use topology::{
    gang_flag_in, GangLayout, GangPlacement, Topology, DEFAULT_DOMAIN_LABEL, GANG_FLAGS, MAX_GANG_NODES,
    MAX_GPUS_PER_NODE,
};
pub use uri::validate_source;

use serde::Serialize;

use crate::{ApiError, Kind};

/// The validated spec of one object, by kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Spec {
    Model(ModelSpec),
    Adapter(AdapterSpec),
    Tenant(TenantSpec),
    Token(TokenSpec),
    Cluster(ClusterSpec),
    FederatedModel(FederatedModelSpec),
    FederatedAdapter(FederatedAdapterSpec),
}

impl Spec {
    pub fn kind(&self) -> Kind {
        match self {
            Spec::Model(_) => Kind::Model,
            Spec::Adapter(_) => Kind::Adapter,
            Spec::Tenant(_) => Kind::Tenant,
            Spec::Token(_) => Kind::Token,
            Spec::Cluster(_) => Kind::Cluster,
            Spec::FederatedModel(_) => Kind::FederatedModel,
            Spec::FederatedAdapter(_) => Kind::FederatedAdapter,
        }
    }

    /// Deserializes the `spec` section of a manifest of the given kind.
    pub fn from_yaml(kind: Kind, value: serde_yaml::Value) -> Result<Spec, ApiError> {
        fn typed<T: serde::de::DeserializeOwned>(v: serde_yaml::Value) -> Result<T, ApiError> {
            serde_path_to_error::deserialize(v).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                if path == "." {
                    ApiError::Parse(format!("spec: {inner}"))
                } else {
                    ApiError::Parse(format!("spec.{path}: {inner}"))
                }
            })
        }
        let spec = match kind {
            Kind::Model => Spec::Model(typed(value)?),
            Kind::Adapter => Spec::Adapter(typed(value)?),
            Kind::Tenant => {
                let mut t: TenantSpec = typed(value)?;
                t.validate()?;
                t.hash_keys();
                if let Some(field) = t.duplicate_key() {
                    return Err(ApiError::invalid(field, "is a key this tenant already has"));
                }
                Spec::Tenant(t)
            }
            Kind::Token => Spec::Token(typed(value)?),
            Kind::Cluster => Spec::Cluster(typed(value)?),
            Kind::FederatedModel => Spec::FederatedModel(typed(value)?),
            Kind::FederatedAdapter => Spec::FederatedAdapter(typed(value)?),
            Kind::Node | Kind::Replica => {
                return Err(ApiError::invalid(
                    "kind",
                    format!("{kind} objects are managed by flotilla (agents register nodes, controllers place replicas) and cannot be applied"),
                ))
            }
        };
        spec.validate()?;
        Ok(spec)
    }

    pub fn validate(&self) -> Result<(), ApiError> {
        match self {
            Spec::Model(s) => s.validate(),
            Spec::Adapter(s) => s.validate(),
            Spec::Tenant(s) => s.validate(),
            Spec::Token(s) => s.validate(),
            Spec::Cluster(s) => s.validate(),
            Spec::FederatedModel(s) => s.validate(),
            Spec::FederatedAdapter(s) => s.validate(),
        }
    }

    /// Canonical JSON of the spec, as stored and compared for idempotent applies.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("specs serialize to JSON")
    }
}

/// Checks `value <= max`, naming the field otherwise.
pub(crate) fn at_most<T: PartialOrd + std::fmt::Display>(field: &str, value: T, max: T) -> Result<(), ApiError> {
    if value > max {
        return Err(ApiError::invalid(field, format!("{value} is over the maximum of {max}")));
    }
    Ok(())
}
