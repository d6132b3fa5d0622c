//! `kind: Replica`: one engine serving one model, placed on a node by the controllers.
use serde::{Deserialize, Serialize};

use super::{AdapterBinding, EngineKind};
use crate::ObjectName;

/// What a replica runs and where. Written by the controllers when they create and bind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaSpec {
    pub model: ObjectName,
    pub engine: EngineKind,
    pub source: String,
    #[serde(default)]
    pub engine_args: Vec<String>,
    /// GPUs the replica needs (copied from the model).
    pub gpus_needed: u32,
    /// Allowed GPU types (copied from the model; empty: any).
    #[serde(default)]
    pub gpu_types: Vec<String>,
    /// The node it is bound to; `None` while Pending.
    #[serde(default)]
    pub node: Option<ObjectName>,
    /// GPU indices on that node.
    #[serde(default)]
    pub gpus: Vec<u32>,
    /// LoRA adapters the engine must hold (written by the adapter controller), by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adapters: Vec<AdapterBinding>,
    /// The hash of the model's [`super::ReplicaTemplate`] this replica was made from
    /// (empty in replicas made before revisions existed: [`ReplicaSpec::template_hash`]
    /// computes it from the copied fields).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub template_hash: String,
    /// The container image to run the engine in (copied from the model); None: a process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_image: Option<String>,
    /// A multi-node replica's shape (copied from the model); then `gpus_needed` is per
    /// member, and `node` and `gpus` are the head's (rank 0), repeated as `members[0]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<super::Topology>,
    /// Where each member of a gang is bound, by rank (empty for a one-node replica, and
    /// while Pending). All bound in one transaction, or none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<GangMember>,
    /// The role its engine plays in a disaggregated Model (the agent sets the connector up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_transfer: Option<super::KvTransferRole>,
}

/// One member of a multi-node replica: its node and GPU indices there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GangMember {
    pub node: ObjectName,
    pub gpus: Vec<u32>,
}

impl ReplicaSpec {
    /// The template this replica runs, from the fields copied out of its model.
    pub fn template(&self) -> super::ReplicaTemplate {
        super::ReplicaTemplate {
            engine: self.engine,
            source: self.source.clone(),
            engine_args: self.engine_args.clone(),
            gpus: self.gpus_needed,
            gpu_types: self.gpu_types.clone(),
            engine_image: self.engine_image.clone(),
            topology: self.topology.clone(),
            kv_transfer: self.kv_transfer.clone(),
        }
    }

    /// Every (node, GPU indices) the replica holds: its gang members' by rank, or its one
    /// node's; nothing while unbound.
    pub fn bindings(&self) -> Vec<(&ObjectName, &[u32])> {
        if self.members.is_empty() {
            self.node.iter().map(|n| (n, self.gpus.as_slice())).collect()
        } else {
            self.members.iter().map(|m| (&m.node, m.gpus.as_slice())).collect()
        }
    }

    /// The template revision: as stored, or computed for an older replica.
    pub fn template_hash(&self) -> String {
        if self.template_hash.is_empty() {
            self.template().hash()
        } else {
            self.template_hash.clone()
        }
    }
}

/// Replica lifecycle: Pending → Scheduled → Starting → Ready → Draining → Stopped, or Failed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ReplicaPhase {
    /// Waiting for a node with room.
    #[default]
    Pending,
    /// Bound to a node; the agent has not started it yet.
    Scheduled,
    /// Downloading weights or starting the engine.
    Starting,
    /// The engine answers `/health`.
    Ready,
    /// Being stopped (scale-down, drain, delete).
    Draining,
    Stopped,
    /// Gave up: too many crashes, a failed download, or a lost node.
    Failed,
}

/// Observed state of a replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ReplicaStatus {
    #[serde(default)]
    pub phase: ReplicaPhase,
    /// Why it is not Ready (e.g. "no node has 2 free GPUs of type H100-80GB: 1 is cordoned").
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// `host:port` of the engine's OpenAI endpoint once it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Times the agent restarted the engine after a crash.
    #[serde(default)]
    pub restarts: u32,
    /// Download progress in [0, 1] while Starting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download_progress: Option<f64>,
    /// Bytes downloaded so far, written with each step of `download_progress`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download_bytes: Option<u64>,
    /// Total bytes of the download, when the source lists sizes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download_total_bytes: Option<u64>,
    /// The agent's recent download rate in bytes per second, as of the last step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download_bytes_per_second: Option<f64>,
    /// The engine's API key (set with `endpoint`), which gateways send as a bearer token. A
    /// secret: stored with the object, so it survives a leader change, and removed from every
    /// object a client reads ([`crate::Kind::secret_status_fields`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// The SHA-256 (hex) of the self-signed certificate the engine serves TLS with (set with
    /// `endpoint`; None: plain HTTP). Gateways call it over https and accept only that
    /// certificate. Not a secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_cert_sha256: Option<String>,
    /// A multi-node replica's head rendezvous address (`host:port`), as its agent reported
    /// it: the workers' agents start their members with it. Never written for a one-node
    /// replica, so servers that predate gangs read every other replica unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rendezvous: Option<String>,
    /// A `layout: ray` gang's shared secret (Ray's auth token), as its head's agent
    /// reported it with `rendezvous`; handed to the workers' agents. A secret: never sent to
    /// clients ([`crate::Kind::secret_status_fields`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gang_token: Option<String>,
}
