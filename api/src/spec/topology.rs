//! `spec.topology` of a Model: one replica spanning several nodes (a gang). A gang of
//! `nodes` members, each holding `gpus_per_node` GPUs of one type on its own node; rank 0 is
//! the head (serves the API), the others are headless workers. Placement binds every member
//! in one transaction or none, and the whole gang lives and dies as one replica.
use serde::{Deserialize, Serialize};

use super::at_most;
use crate::ApiError;

/// Members a gang may have at most.
pub const MAX_GANG_NODES: u32 = 64;
/// GPUs one member may hold at most.
pub const MAX_GPUS_PER_NODE: u32 = 16;
/// The node label whose values are the topology domains (racks) by default.
pub const DEFAULT_DOMAIN_LABEL: &str = "flotilla.io/rack";

/// How the engine splits the model over the members.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GangLayout {
    /// Tensor parallel inside a node, pipeline parallel across nodes (vLLM's native
    /// multi-node: `--nnodes`, `--node-rank`, `--master-addr`, `--headless`).
    #[default]
    TpPp,
    /// One data-parallel rank group per node (`--data-parallel-size` and friends).
    DataParallel,
    /// A Ray cluster across the members and `--distributed-executor-backend ray`.
    Ray,
}

impl GangLayout {
    /// The name the spec and the agent protocol use (`tp-pp`, `data-parallel`, `ray`).
    pub fn as_str(self) -> &'static str {
        match self {
            GangLayout::TpPp => "tp-pp",
            GangLayout::DataParallel => "data-parallel",
            GangLayout::Ray => "ray",
        }
    }
}

/// Where the members go, over the topology domains (the values of `domain_label` on nodes),
/// as Ray's placement group strategies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GangPlacement {
    /// As few domains as possible; spans more when one is short.
    #[default]
    Pack,
    /// As many domains as possible; shares one when they are short.
    Spread,
    /// All members in one domain, or Pending.
    StrictPack,
    /// Every member in a domain of its own, or Pending.
    StrictSpread,
}

impl GangPlacement {
    pub fn as_str(self) -> &'static str {
        match self {
            GangPlacement::Pack => "pack",
            GangPlacement::Spread => "spread",
            GangPlacement::StrictPack => "strict-pack",
            GangPlacement::StrictSpread => "strict-spread",
        }
    }
}

/// Flags the agent sets on every member of a gang (rendezvous, ranks, parallel sizes): a
/// multi-node Model's `engine_args` may not set them.
pub const GANG_FLAGS: [&str; 14] = [
    "--nnodes",
    "--node-rank",
    "--master-addr",
    "--master-port",
    "--headless",
    "--tensor-parallel-size",
    "--pipeline-parallel-size",
    "--data-parallel-size",
    "--data-parallel-size-local",
    "--data-parallel-start-rank",
    "--data-parallel-address",
    "--data-parallel-rpc-port",
    "--distributed-executor-backend",
    "--data-parallel-backend",
];

/// The first of `args` that sets one of [`GANG_FLAGS`] (`--flag`, `--flag=v`, `--flag_with_underscores`).
pub fn gang_flag_in(args: &[String]) -> Option<&'static str> {
    args.iter().find_map(|a| {
        let flag = a.split('=').next().unwrap_or(a).replace('_', "-");
        GANG_FLAGS.iter().copied().find(|f| *f == flag)
    })
}

fn default_domain_label() -> String {
    DEFAULT_DOMAIN_LABEL.to_owned()
}

fn is_default_domain_label(l: &str) -> bool {
    l == DEFAULT_DOMAIN_LABEL
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// A multi-node replica's shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// Members of each replica, one per node (at least 2).
    pub nodes: u32,
    /// GPUs each member holds on its node.
    pub gpus_per_node: u32,
    #[serde(default, skip_serializing_if = "is_default")]
    pub layout: GangLayout,
    #[serde(default, skip_serializing_if = "is_default")]
    pub placement: GangPlacement,
    /// The node label naming each node's domain (rack, NVLink domain, zone). A node without
    /// the label is a domain of its own.
    #[serde(default = "default_domain_label", skip_serializing_if = "is_default_domain_label")]
    pub domain_label: String,
}

impl Topology {
    /// GPUs of the whole gang.
    pub fn gpus(&self) -> u32 {
        self.nodes.saturating_mul(self.gpus_per_node)
    }

    /// Checks the bounds, that the model's `gpus` (the whole replica's) agrees, and that its
    /// `engine_args` leave the gang flags to the agent.
    pub fn validate(&self, field: &str, model_gpus: u32, engine_args: &[String]) -> Result<(), ApiError> {
        if let Some(flag) = gang_flag_in(engine_args) {
            return Err(ApiError::invalid(
                "spec.engine_args",
                format!("{flag} is set by the agent on each member of a multi-node replica (from {field})"),
            ));
        }
        if self.nodes < 2 {
            return Err(ApiError::invalid(
                format!("{field}.nodes"),
                format!("{} node(s): a topology spans at least 2 nodes (leave it out for one)", self.nodes),
            ));
        }
        at_most(&format!("{field}.nodes"), self.nodes, MAX_GANG_NODES)?;
        if self.gpus_per_node == 0 {
            return Err(ApiError::invalid(format!("{field}.gpus_per_node"), "must be at least 1".to_owned()));
        }
        at_most(&format!("{field}.gpus_per_node"), self.gpus_per_node, MAX_GPUS_PER_NODE)?;
        let label_ok = !self.domain_label.is_empty()
            && self.domain_label.len() <= 253
            && self.domain_label.chars().all(|c| c.is_ascii_alphanumeric() || "./-_".contains(c));
        if !label_ok {
            return Err(ApiError::invalid(
                format!("{field}.domain_label"),
                format!("{:?} is not a label key", self.domain_label),
            ));
        }
        if model_gpus != self.gpus() {
            return Err(ApiError::invalid(
                "spec.gpus",
                format!(
                    "{model_gpus}, but {field} asks for {} nodes x {} GPUs = {}: set gpus: {} (the whole replica's)",
                    self.nodes,
                    self.gpus_per_node,
                    self.gpus(),
                    self.gpus()
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo(yaml: &str) -> Topology {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn defaults_and_names() {
        let t = topo("{nodes: 2, gpus_per_node: 8}");
        assert_eq!(
            (t.layout, t.placement, t.domain_label.as_str()),
            (GangLayout::TpPp, GangPlacement::Pack, "flotilla.io/rack")
        );
        assert_eq!(serde_json::to_string(&t).unwrap(), r#"{"nodes":2,"gpus_per_node":8}"#, "defaults left out");
        let t =
            topo("{nodes: 4, gpus_per_node: 8, layout: data-parallel, placement: strict-spread, domain_label: zone}");
        assert_eq!((t.layout, t.placement), (GangLayout::DataParallel, GangPlacement::StrictSpread));
        assert!(serde_yaml::from_str::<Topology>("{nodes: 2, gpus_per_node: 8, placement: tight}").is_err());
        assert!(serde_yaml::from_str::<Topology>("{nodes: 2, gpus_per_node: 8, rack: a}").is_err());
    }

    #[test]
    fn bounds_and_gpus_are_checked_naming_the_field() {
        let err = |t: &Topology, gpus| t.validate("spec.topology", gpus, &[]).unwrap_err().to_string();
        assert!(topo("{nodes: 2, gpus_per_node: 8}").validate("spec.topology", 16, &[]).is_ok());
        assert!(err(&topo("{nodes: 1, gpus_per_node: 8}"), 8).contains("spec.topology.nodes"));
        assert!(err(&topo("{nodes: 65, gpus_per_node: 1}"), 65).contains("spec.topology.nodes"));
        assert!(err(&topo("{nodes: 2, gpus_per_node: 0}"), 0).contains("spec.topology.gpus_per_node"));
        assert!(err(&topo("{nodes: 2, gpus_per_node: 17}"), 34).contains("spec.topology.gpus_per_node"));
        assert!(err(&topo("{nodes: 2, gpus_per_node: 8, domain_label: 'a b'}"), 16).contains("domain_label"));
        let e = err(&topo("{nodes: 2, gpus_per_node: 8}"), 8);
        assert!(e.contains("spec.gpus") && e.contains("2 nodes x 8 GPUs = 16"), "{e}");
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let e = topo("{nodes: 2, gpus_per_node: 8}").validate("spec.topology", 16, &args(&["--node_rank=1"]));
        assert!(e.unwrap_err().to_string().contains("--node-rank is set by the agent"));
        assert_eq!(gang_flag_in(&args(&["--max-model-len", "4096", "--headless"])), Some("--headless"));
        assert_eq!(gang_flag_in(&args(&["--max-model-len", "4096"])), None);
    }
}
