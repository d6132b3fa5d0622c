//! The kinds a federation group holds (`flotilla server --federation`, docs/federation.md):
//! `Cluster`, a member flotilla cluster (its API and gateway addresses, labels such as
//! `region`), `FederatedModel`, a Model template spread over member clusters by a
//! placement policy, and `FederatedAdapter`, an Adapter template kept in every cluster that
//! runs its base FederatedModel. The federation's controllers keep one member Model per chosen cluster,
//! through that cluster's own API; a cluster's server refuses these kinds, and a federation
//! server refuses the kinds a cluster runs.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{at_most, AdapterSpec, ModelSpec, SpecDuration, MAX_REPLICAS};
use crate::{ApiError, LabelSelector, ObjectName};

/// Most servers a Cluster may list.
pub const MAX_CLUSTER_SERVERS: usize = 16;
/// Most clusters a placement may name (weights, min, max, spillover, overrides).
pub const MAX_PLACEMENT_CLUSTERS: usize = 256;
/// Longest address or path in a Cluster, in bytes.
const MAX_ADDRESS: usize = 512;
/// The default and the bounds of a placement's grace.
pub const DEFAULT_FEDERATION_GRACE: SpecDuration = SpecDuration::from_secs(60);
pub const MAX_FEDERATION_GRACE: SpecDuration = SpecDuration::from_secs(86_400);

/// The label the federation puts on each member Model it keeps: the federation's
/// FederatedModel name. Local operators see where the Model comes from; the federation
/// never touches a Model without it.
pub const FEDERATED_BY_LABEL: &str = "flotilla.io/federated-by";

/// `kind: Cluster`: a member cluster of a federation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// The member's gRPC API: its servers' addresses (`host:port` or an `http(s)://` URL),
    /// tried in order.
    pub servers: Vec<String>,
    /// The member's gateway (the OpenAI API's base URL), for the global gateway tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// A file on every federation server holding a bearer token (`flt_...`, operator role)
    /// for the member's API. Absent: calls carry none (a member without TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
    /// A CA bundle (PEM) on every federation server to verify the member's servers with.
    /// Absent: the federation server's own `--tls-ca` (one PKI), or plain HTTP without TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

impl ClusterSpec {
    pub fn validate(&self) -> Result<(), ApiError> {
        if self.servers.is_empty() || self.servers.len() > MAX_CLUSTER_SERVERS {
            return Err(ApiError::invalid(
                "spec.servers",
                format!("must list 1-{MAX_CLUSTER_SERVERS} server addresses"),
            ));
        }
        for (i, s) in self.servers.iter().enumerate() {
            address(&format!("spec.servers[{i}]"), s)?;
        }
        if let Some(g) = &self.gateway {
            address("spec.gateway", g)?;
        }
        for (field, path) in [("spec.token_file", &self.token_file), ("spec.ca_file", &self.ca_file)] {
            if let Some(p) = path {
                if !p.starts_with('/') || p.len() > MAX_ADDRESS || p.contains('\0') {
                    return Err(ApiError::invalid(field, "must be an absolute path on the federation servers"));
                }
            }
        }
        Ok(())
    }
}

/// `host:port` or an `http(s)://host:port` URL, bounded, without spaces.
fn address(field: &str, s: &str) -> Result<(), ApiError> {
    let rest = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://")).unwrap_or(s);
    let rest = rest.trim_end_matches('/');
    let ok = s.len() <= MAX_ADDRESS
        && !s.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        && rest
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !ok {
        return Err(ApiError::invalid(field, format!("{s:?} is not host:port or an http(s)://host:port URL")));
    }
    Ok(())
}

/// `kind: FederatedModel`: a Model template spread over member clusters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederatedModelSpec {
    /// Replicas in all clusters together.
    pub replicas: u32,
    /// The member Model each chosen cluster runs, under the FederatedModel's name; its
    /// `replicas` is set per cluster by the placement.
    pub template: ModelSpec,
    #[serde(default)]
    pub placement: FederatedPlacement,
    /// Per-cluster changes to the template, by cluster name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub overrides: BTreeMap<String, ClusterOverride>,
}

/// How a FederatedModel's replicas are spread (docs/federation.md, "Placement").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederatedPlacement {
    /// A label selector over the Clusters' labels (`region=eu,cloud=gcp`); absent: every
    /// Cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clusters: Option<String>,
    /// Shares by cluster name: replicas are split in proportion (largest remainder, ties to
    /// the cluster named first in `spillover`, then by name). A selected cluster not named
    /// weighs 1; weight 0 takes replicas only as spillover.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub weights: BTreeMap<String, u32>,
    /// Fewest replicas a cluster gets while it is available (min = max fixes a count).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub min: BTreeMap<String, u32>,
    /// Most replicas a cluster gets, spillover included.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub max: BTreeMap<String, u32>,
    /// Where the replicas a cluster cannot take go, in order (then the other available
    /// clusters by weight).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spillover: Vec<String>,
    /// How long a cluster may be unreachable, or leave the federation's replicas Pending,
    /// before its share moves to others. A partition shorter than this moves nothing.
    #[serde(default = "default_grace")]
    pub grace: SpecDuration,
}

fn default_grace() -> SpecDuration {
    DEFAULT_FEDERATION_GRACE
}

impl Default for FederatedPlacement {
    fn default() -> Self {
        FederatedPlacement {
            clusters: None,
            weights: BTreeMap::new(),
            min: BTreeMap::new(),
            max: BTreeMap::new(),
            spillover: Vec::new(),
            grace: DEFAULT_FEDERATION_GRACE,
        }
    }
}

/// One cluster's changes to the template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterOverride {
    /// Replaces the template's `gpu_types`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_types: Option<Vec<String>>,
    /// Appended to the template's `engine_args`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub engine_args: Vec<String>,
    /// Replaces the template's `engine_image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_image: Option<String>,
}

impl FederatedModelSpec {
    pub fn validate(&self) -> Result<(), ApiError> {
        at_most("spec.replicas", self.replicas, MAX_REPLICAS)?;
        if self.template.autoscaling.is_some() {
            return Err(ApiError::invalid(
                "spec.template.autoscaling",
                "not supported in a FederatedModel yet: the federation sets each cluster's replicas",
            ));
        }
        if self.template.disaggregation.is_some() || self.template.kv_transfer.is_some() {
            return Err(ApiError::invalid(
                "spec.template.disaggregation",
                "disaggregated templates are not supported in a FederatedModel yet",
            ));
        }
        let p = &self.placement;
        if let Some(sel) = &p.clusters {
            LabelSelector::parse(sel).map_err(|e| ApiError::invalid("spec.placement.clusters", e.to_string()))?;
        }
        at_most("spec.placement.grace", p.grace, MAX_FEDERATION_GRACE)?;
        let named = [
            ("spec.placement.weights", p.weights.keys().collect::<Vec<_>>()),
            ("spec.placement.min", p.min.keys().collect()),
            ("spec.placement.max", p.max.keys().collect()),
            ("spec.placement.spillover", p.spillover.iter().collect()),
            ("spec.overrides", self.overrides.keys().collect()),
        ];
        for (field, names) in named {
            if names.len() > MAX_PLACEMENT_CLUSTERS {
                return Err(ApiError::invalid(field, format!("names more than {MAX_PLACEMENT_CLUSTERS} clusters")));
            }
            for n in names {
                n.parse::<ObjectName>().map_err(|e| ApiError::invalid(field, format!("{n:?}: {e}")))?;
            }
        }
        for (i, n) in p.spillover.iter().enumerate() {
            if p.spillover[..i].contains(n) {
                return Err(ApiError::invalid("spec.placement.spillover", format!("names {n:?} twice")));
            }
        }
        for (name, w) in &p.weights {
            at_most(&format!("spec.placement.weights.{name}"), *w, 1_000_000)?;
        }
        for (name, lo) in &p.min {
            let hi = p.max.get(name).copied().unwrap_or(u32::MAX);
            if *lo > hi {
                return Err(ApiError::invalid(
                    format!("spec.placement.min.{name}"),
                    format!("{lo} is above the cluster's max of {hi}"),
                ));
            }
        }
        let floors: u64 = p.min.values().map(|v| u64::from(*v)).sum();
        if floors > u64::from(self.replicas) {
            return Err(ApiError::invalid(
                "spec.placement.min",
                format!("the minimums add up to {floors}, more than the {} replicas", self.replicas),
            ));
        }
        self.template.validate().map_err(|e| match e {
            ApiError::Invalid { field, message } => {
                ApiError::invalid(field.replacen("spec.", "spec.template.", 1), message)
            }
            other => other,
        })?;
        for (name, o) in &self.overrides {
            let mut member = self.template.clone();
            o.apply(&mut member);
            member.validate().map_err(|e| match e {
                ApiError::Invalid { field, message } => {
                    ApiError::invalid(format!("spec.overrides.{name} ({field})"), message)
                }
                other => other,
            })?;
        }
        Ok(())
    }

    /// The member Model for `cluster` running `replicas`: the template with the cluster's
    /// override applied.
    pub fn member(&self, cluster: &str, replicas: u32) -> ModelSpec {
        let mut m = self.template.clone();
        if let Some(o) = self.overrides.get(cluster) {
            o.apply(&mut m);
        }
        m.replicas = replicas;
        m
    }
}

/// `kind: FederatedAdapter`: an Adapter kept, under the FederatedAdapter's name, in every
/// member cluster where its base FederatedModel (`template.base_model`) runs a member Model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederatedAdapterSpec {
    /// The member Adapter; its `base_model` names a FederatedModel (the member Models carry
    /// that name in each cluster).
    pub template: AdapterSpec,
}

impl FederatedAdapterSpec {
    pub fn validate(&self) -> Result<(), ApiError> {
        self.template.validate().map_err(|e| match e {
            ApiError::Invalid { field, message } => {
                ApiError::invalid(field.replacen("spec.", "spec.template.", 1), message)
            }
            other => other,
        })
    }
}

impl ClusterOverride {
    fn apply(&self, m: &mut ModelSpec) {
        if let Some(t) = &self.gpu_types {
            m.gpu_types = t.clone();
        }
        m.engine_args.extend(self.engine_args.iter().cloned());
        if let Some(i) = &self.engine_image {
            m.engine_image = Some(i.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fed(yaml: &str) -> Result<FederatedModelSpec, String> {
        let spec: FederatedModelSpec = serde_yaml::from_str(yaml).map_err(|e| e.to_string())?;
        spec.validate().map_err(|e| e.to_string())?;
        Ok(spec)
    }

    const GOOD: &str = "replicas: 6
template: {engine: sim, source: file:///m, gpus: 1}
placement: {weights: {a: 3, b: 2, c: 1}, min: {c: 1}, max: {a: 4}, spillover: [b, a]}
overrides: {a: {gpu_types: [H100-80GB], engine_args: ['--max-num-seqs', '64']}}
";

    #[test]
    fn a_good_federated_model_and_its_members() {
        let f = fed(GOOD).unwrap();
        assert_eq!(f.placement.grace, DEFAULT_FEDERATION_GRACE);
        let a = f.member("a", 3);
        assert_eq!((a.replicas, a.gpu_types.clone()), (3, vec!["H100-80GB".to_string()]));
        assert_eq!(a.engine_args, ["--max-num-seqs", "64"]);
        let b = f.member("b", 2);
        assert!(b.gpu_types.is_empty() && b.engine_args.is_empty(), "no override for b");
    }

    #[test]
    fn bad_federated_models_name_the_field() {
        for (change, field) in [
            (GOOD.replace("min: {c: 1}", "min: {c: 7}"), "spec.placement.min"),
            (GOOD.replace("max: {a: 4}", "max: {c: 0}"), "spec.placement.min.c"),
            (GOOD.replace("spillover: [b, a]", "spillover: [b, b]"), "spec.placement.spillover"),
            (GOOD.replace("spillover: [b, a]", "spillover: [B_]"), "spec.placement.spillover"),
            (GOOD.replace("placement: {", "placement: {clusters: '=x', "), "spec.placement.clusters"),
            (GOOD.replace("gpus: 1}", "gpus: 1, autoscaling: {min_replicas: 1, max_replicas: 2}}"), "autoscaling"),
            (
                GOOD.replace("gpus: 1}", "gpus: 1, engine_args: ['--kv-transfer-config', '{}']}"),
                "spec.template.engine_args",
            ),
            (GOOD.replace("gpu_types: [H100-80GB], ", "engine_image: 'bad image', "), "spec.overrides.a"),
            (GOOD.replace("replicas: 6", "replicas: 100000"), "spec.replicas"),
        ] {
            let e = fed(&change).unwrap_err();
            assert!(e.contains(field), "{change}\n→ {e}");
        }
        let e = fed(&GOOD.replace("spillover:", "spilover:")).unwrap_err();
        assert!(e.contains("spilover"), "unknown fields are refused: {e}");
    }

    #[test]
    fn federated_adapters_are_adapter_templates() {
        let ok: FederatedAdapterSpec =
            serde_yaml::from_str("template: {base_model: llm, source: 'sim://sql'}").unwrap();
        ok.validate().unwrap();
        let bad: FederatedAdapterSpec =
            serde_yaml::from_str("template: {base_model: llm, source: 'sim://sql', rank: 100000}").unwrap();
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("spec.template.rank"), "{e}");
    }

    #[test]
    fn clusters_need_servers_with_ports() {
        let ok = |y: &str| serde_yaml::from_str::<ClusterSpec>(y).unwrap().validate();
        assert!(ok("servers: ['10.0.0.1:7070', 'https://s2.example:7070']\ngateway: http://gw:8080\n").is_ok());
        for (y, field) in [
            ("servers: []", "spec.servers"),
            ("servers: ['10.0.0.1']", "spec.servers[0]"),
            ("servers: ['a:1', 'b c:2']", "spec.servers[1]"),
            ("servers: ['a:1']\ngateway: 'http://gw'", "spec.gateway"),
            ("servers: ['a:1']\ntoken_file: relative/token", "spec.token_file"),
        ] {
            let e = ok(y).unwrap_err().to_string();
            assert!(e.contains(field), "{y} → {e}");
        }
    }
}
