//! `kind: Node`: a machine running an agent, registered by the agent itself. Its status
//! holds the GPU allocation, so binding a replica is a compare-and-set on the node.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ObjectName;

/// One GPU of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    /// Device index on the node (`CUDA_VISIBLE_DEVICES` value).
    pub index: u32,
    /// GPU type, e.g. `A100-80GB`.
    pub gpu_type: String,
    pub memory_mib: u64,
}

/// What the agent registered (and what operators change: cordon, drain).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Host that engines on this node are reachable at, e.g. `10.0.0.7` or `127.0.0.1`.
    pub address: String,
    pub gpus: Vec<Gpu>,
    /// Identity of the agent process that holds this name (persisted in its data dir).
    pub agent_id: String,
    /// No new replicas are placed here.
    #[serde(default)]
    pub cordoned: bool,
    /// Replicas are moved off this node.
    #[serde(default)]
    pub draining: bool,
}

/// Lifecycle state of a node as the controllers see it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    Ready,
    #[default]
    NotReady,
    Cordoned,
    Draining,
    /// Draining finished: no replica is left on the node.
    Drained,
}

/// Observed state of a node, written by the leader's controllers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NodeStatus {
    #[serde(default)]
    pub state: NodeState,
    /// GPU index → replica bound to it.
    #[serde(default)]
    pub allocations: BTreeMap<u32, ObjectName>,
    /// Unhealthy GPUs (by index), reported by the agent's probes.
    #[serde(default)]
    pub unhealthy_gpus: Vec<u32>,
    /// Why the node is not Ready, if it is not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Wall-clock milliseconds since the Unix epoch of the last state change.
    #[serde(default)]
    pub last_transition_ms: u64,
}

impl NodeStatus {
    /// GPUs of `spec` that are healthy and not bound to any replica.
    pub fn free_gpus<'a>(&'a self, spec: &'a NodeSpec) -> impl Iterator<Item = &'a Gpu> + 'a {
        spec.gpus.iter().filter(|g| !self.allocations.contains_key(&g.index) && !self.unhealthy_gpus.contains(&g.index))
    }
}
