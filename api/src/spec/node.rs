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
    /// Failed GPUs (by index), reported by the agent's probes: their replicas are replaced.
    #[serde(default)]
    pub unhealthy_gpus: Vec<u32>,
    /// GPUs that are not healthy (Degraded or Failed), by index, with the agent's evidence.
    /// A GPU missing here is Healthy. Absent from older status documents.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub gpu_health: BTreeMap<u32, GpuHealth>,
    /// Why the node is not Ready, if it is not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Wall-clock milliseconds since the Unix epoch of the last state change.
    #[serde(default)]
    pub last_transition_ms: u64,
}

/// Health of one GPU as the agent classifies it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum GpuHealthState {
    #[default]
    Healthy,
    /// Works but should not take new replicas (throttling, PCIe downgrade, ECC trend, flapping).
    Degraded,
    /// Broken: replicas bound to it are replaced elsewhere.
    Failed,
}

impl GpuHealthState {
    /// The protocol's word (`GpuInfo.state`).
    pub fn as_str(self) -> &'static str {
        match self {
            GpuHealthState::Healthy => "healthy",
            GpuHealthState::Degraded => "degraded",
            GpuHealthState::Failed => "failed",
        }
    }

    /// Reads `GpuInfo.state`; an empty word (an older agent) is read from `healthy`.
    pub fn from_report(state: &str, healthy: bool) -> Option<GpuHealthState> {
        match state {
            "healthy" => Some(GpuHealthState::Healthy),
            "degraded" => Some(GpuHealthState::Degraded),
            "failed" => Some(GpuHealthState::Failed),
            "" if healthy => Some(GpuHealthState::Healthy),
            "" => Some(GpuHealthState::Failed),
            _ => None,
        }
    }
}

impl std::fmt::Display for GpuHealthState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The recorded health of one GPU that is not Healthy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GpuHealth {
    pub state: GpuHealthState,
    /// The agent's evidence, one line per signal (bounded by the server).
    #[serde(default)]
    pub evidence: Vec<String>,
    /// Wall-clock ms since the Unix epoch when the GPU entered `state`.
    #[serde(default)]
    pub since_ms: u64,
}

impl NodeStatus {
    /// GPUs of `spec` that are not bound to any replica and may take a new one: Healthy
    /// (Degraded and Failed GPUs take no new placements).
    pub fn free_gpus<'a>(&'a self, spec: &'a NodeSpec) -> impl Iterator<Item = &'a Gpu> + 'a {
        spec.gpus.iter().filter(|g| {
            !self.allocations.contains_key(&g.index)
                && !self.unhealthy_gpus.contains(&g.index)
                && self.gpu_state(g.index) == GpuHealthState::Healthy
        })
    }

    /// The recorded state of GPU `index` (Healthy when not recorded).
    pub fn gpu_state(&self, index: u32) -> GpuHealthState {
        self.gpu_health.get(&index).map_or(GpuHealthState::Healthy, |h| h.state)
    }

    /// Failed GPUs: `unhealthy_gpus` and any recorded Failed.
    pub fn failed_gpus(&self) -> impl Iterator<Item = u32> + '_ {
        let recorded = self.gpu_health.iter().filter(|(_, h)| h.state == GpuHealthState::Failed).map(|(i, _)| *i);
        self.unhealthy_gpus.iter().copied().chain(recorded.filter(|i| !self.unhealthy_gpus.contains(i)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(n: u32) -> NodeSpec {
        NodeSpec {
            gpus: (0..n).map(|index| Gpu { index, gpu_type: "A".into(), memory_mib: 1 }).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn degraded_and_failed_gpus_are_not_free() {
        let mut st = NodeStatus::default();
        st.gpu_health.insert(1, GpuHealth { state: GpuHealthState::Degraded, ..Default::default() });
        st.gpu_health.insert(2, GpuHealth { state: GpuHealthState::Failed, ..Default::default() });
        st.unhealthy_gpus = vec![3];
        let sp = spec(5);
        let free: Vec<u32> = st.free_gpus(&sp).map(|g| g.index).collect();
        assert_eq!(free, vec![0, 4]);
        let mut failed: Vec<u32> = st.failed_gpus().collect();
        failed.sort();
        assert_eq!(failed, vec![2, 3]);
    }

    #[test]
    fn old_status_documents_parse_and_healthy_maps_are_not_written() {
        let old = r#"{"state":"Ready","allocations":{},"unhealthy_gpus":[1],"last_transition_ms":5}"#;
        let st: NodeStatus = serde_json::from_str(old).unwrap();
        assert!(st.gpu_health.is_empty());
        assert_eq!(st.unhealthy_gpus, vec![1]);
        assert!(!serde_json::to_string(&st).unwrap().contains("gpu_health"));
        let mut st = st;
        st.gpu_health
            .insert(1, GpuHealth { state: GpuHealthState::Failed, evidence: vec!["xid 79".into()], since_ms: 7 });
        let back: NodeStatus = serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
        assert_eq!(back, st);
    }

    #[test]
    fn report_words() {
        assert_eq!(GpuHealthState::from_report("", true), Some(GpuHealthState::Healthy));
        assert_eq!(GpuHealthState::from_report("", false), Some(GpuHealthState::Failed));
        assert_eq!(GpuHealthState::from_report("degraded", true), Some(GpuHealthState::Degraded));
        assert_eq!(GpuHealthState::from_report("sick", true), None);
        for s in [GpuHealthState::Healthy, GpuHealthState::Degraded, GpuHealthState::Failed] {
            assert_eq!(GpuHealthState::from_report(s.as_str(), true), Some(s));
        }
    }
}
