//! How a Model's replicas are replaced when what shapes an engine changes: the replica
//! template (the fields that make one engine differ from another), its hash, and the
//! rollout settings (`spec.rollout`: surge, unavailability, pause), with Kubernetes'
//! Deployment defaults and rounding.
//!
//! The hash leaves out fields at their default value, so a later release that adds a
//! template field (with a default) does not change the hash of any existing model, and an
//! upgrade rolls nothing.
use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use super::{EngineKind, SpecDuration};
use crate::ApiError;

/// The part of a Model's spec that each replica is started with: a change to any of it
/// makes new replicas and retires the old ones (a rollout). Replica count, routing and
/// autoscaling are not in it: changing them rolls nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaTemplate {
    #[serde(default, skip_serializing_if = "is_default")]
    pub engine: EngineKind,
    pub source: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub engine_args: Vec<String>,
    pub gpus: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_types: Vec<String>,
    /// Last, and left out when None, so templates without an image hash as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_image: Option<String>,
    /// Left out when None, as `engine_image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<super::Topology>,
    /// Left out when None, as `engine_image`: the role of a disaggregated Model's member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_transfer: Option<super::KvTransferRole>,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

impl ReplicaTemplate {
    /// Ten hex digits of the SHA-256 of the template's JSON (fields in declaration order,
    /// defaults left out): equal templates hash equal on every server and release.
    pub fn hash(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        crate::hex(&Sha256::digest(&json)[..5])
    }
}

/// A count of replicas, or a percentage of the desired count (`"25%"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntOrPercent {
    Count(u32),
    Percent(u32),
}

impl IntOrPercent {
    /// The count for `desired` replicas, rounding a percentage up or down.
    pub fn resolve(self, desired: u32, round_up: bool) -> u32 {
        match self {
            IntOrPercent::Count(n) => n,
            IntOrPercent::Percent(p) => {
                let scaled = u64::from(desired) * u64::from(p);
                let n = if round_up { scaled.div_ceil(100) } else { scaled / 100 };
                n.min(u64::from(u32::MAX)) as u32
            }
        }
    }
}

impl fmt::Display for IntOrPercent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntOrPercent::Count(n) => write!(f, "{n}"),
            IntOrPercent::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for IntOrPercent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            IntOrPercent::Count(n) => s.serialize_u32(*n),
            IntOrPercent::Percent(_) => s.serialize_str(&self.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for IntOrPercent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        const EXPECTED: &str = "a replica count (0 to 1000) or a percentage such as \"25%\" (0% to 100%)";
        impl Visitor<'_> for V {
            type Value = IntOrPercent;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntOrPercent, E> {
                u32::try_from(v)
                    .ok()
                    .filter(|n| *n <= super::model::MAX_REPLICAS)
                    .map(IntOrPercent::Count)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Unsigned(v), &EXPECTED))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrPercent, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::invalid_value(de::Unexpected::Signed(v), &EXPECTED)),
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntOrPercent, E> {
                v.strip_suffix('%')
                    .and_then(|p| p.trim().parse::<u32>().ok())
                    .filter(|p| *p <= 100)
                    .map(IntOrPercent::Percent)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &EXPECTED))
            }
        }
        d.deserialize_any(V)
    }
}

fn quarter() -> IntOrPercent {
    IntOrPercent::Percent(25)
}

fn zero() -> IntOrPercent {
    IntOrPercent::Count(0)
}

/// `spec.rollout`: how a template change replaces replicas (make-before-break by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    /// Replicas above the desired count while rolling (rounded up). Default 25%.
    #[serde(default = "quarter")]
    pub max_surge: IntOrPercent,
    /// Ready replicas below the desired count allowed while rolling (rounded down).
    /// Default 0: an old replica stops taking requests only once a new one is Ready.
    #[serde(default = "zero")]
    pub max_unavailable: IntOrPercent,
    /// A paused rollout creates and retires nothing for the template change
    /// (`flotilla rollout pause|resume`); scaling still works.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// Shift traffic to the new template in steps, checked against the old one at each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanarySpec>,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        RolloutSpec { max_surge: quarter(), max_unavailable: zero(), paused: false, canary: None }
    }
}

/// Most canary steps.
pub const MAX_CANARY_STEPS: usize = 10;

fn default_steps() -> Vec<u32> {
    vec![10, 50, 100]
}
fn five_minutes() -> SpecDuration {
    SpecDuration::from_secs(300)
}
fn one_percent() -> f64 {
    0.01
}
fn ratio() -> f64 {
    1.2
}
fn twenty() -> u32 {
    20
}

/// `spec.rollout.canary`: the gateways send `steps[i]`% of the model's requests to the new
/// template for `interval` each; at the end of each step the leader compares the new
/// template's error rate and TTFT p95 with the old one's (from the gateways' reports) and
/// moves to the next step, or rolls back. After the last step (100) the old replicas are
/// replaced as in a rolling update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanarySpec {
    /// Traffic percentages, increasing, the last 100. Default [10, 50, 100].
    #[serde(default = "default_steps")]
    pub steps: Vec<u32>,
    /// Time at each step before its analysis. Default 5m.
    #[serde(default = "five_minutes")]
    pub interval: SpecDuration,
    /// Highest error rate (5xx and failed streams over requests) the new template may show.
    #[serde(default = "one_percent")]
    pub max_error_rate: f64,
    /// Highest ratio of the new template's TTFT p95 to the old one's.
    #[serde(default = "ratio")]
    pub max_ttft_p95_ratio: f64,
    /// Requests the new template must have served in a step before it is judged (a step
    /// with fewer waits longer).
    #[serde(default = "twenty")]
    pub min_requests: u32,
}

impl Default for CanarySpec {
    fn default() -> Self {
        CanarySpec {
            steps: default_steps(),
            interval: five_minutes(),
            max_error_rate: one_percent(),
            max_ttft_p95_ratio: ratio(),
            min_requests: twenty(),
        }
    }
}

impl CanarySpec {
    pub fn validate(&self, field: &str) -> Result<(), ApiError> {
        let bad = |what: &str, why: String| Err(ApiError::invalid(format!("{field}.{what}"), why));
        if self.steps.is_empty() || self.steps.len() > MAX_CANARY_STEPS {
            return bad("steps", format!("needs 1 to {MAX_CANARY_STEPS} steps, got {}", self.steps.len()));
        }
        if self.steps.windows(2).any(|w| w[0] >= w[1]) || self.steps.iter().any(|s| *s == 0 || *s > 100) {
            return bad("steps", format!("{:?}: percentages 1 to 100, each above the one before", self.steps));
        }
        if self.steps.last() != Some(&100) {
            return bad("steps", format!("{:?}: the last step must be 100", self.steps));
        }
        if self.interval.as_millis() < 1000 || self.interval.as_millis() > 24 * 3600 * 1000 {
            return bad("interval", format!("{} is not between 1s and 24h", self.interval));
        }
        if !(0.0..=1.0).contains(&self.max_error_rate) {
            return bad("max_error_rate", format!("{} is not a rate between 0 and 1", self.max_error_rate));
        }
        if !(self.max_ttft_p95_ratio >= 1.0 && self.max_ttft_p95_ratio <= 100.0) {
            return bad("max_ttft_p95_ratio", format!("{} is not between 1 and 100", self.max_ttft_p95_ratio));
        }
        if self.min_requests > 1_000_000 {
            return bad("min_requests", format!("{} is above 1000000", self.min_requests));
        }
        Ok(())
    }
}

impl RolloutSpec {
    pub fn is_default(&self) -> bool {
        *self == RolloutSpec::default()
    }

    /// (surge, unavailable) for `desired` replicas, as Kubernetes resolves them: surge
    /// rounds up, unavailability down, and when both come to 0 one replica may be
    /// unavailable (a rollout must be able to move).
    pub fn resolve(&self, desired: u32) -> (u32, u32) {
        let surge = self.max_surge.resolve(desired, true);
        let unavailable = self.max_unavailable.resolve(desired, false);
        if surge == 0 && unavailable == 0 {
            (0, 1)
        } else {
            (surge, unavailable)
        }
    }

    pub fn validate(&self, field: &str) -> Result<(), ApiError> {
        let zero = |v: IntOrPercent| matches!(v, IntOrPercent::Count(0) | IntOrPercent::Percent(0));
        if zero(self.max_surge) && zero(self.max_unavailable) {
            return Err(ApiError::invalid(
                field,
                "max_surge and max_unavailable cannot both be 0: the rollout could never replace a replica",
            ));
        }
        if let Some(c) = &self.canary {
            c.validate(&format!("{field}.canary"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> ReplicaTemplate {
        ReplicaTemplate {
            engine_image: Default::default(),
            topology: None,
            kv_transfer: None,
            engine: EngineKind::Sim,
            source: "hf://org/m".into(),
            engine_args: vec!["--x".into()],
            gpus: 1,
            gpu_types: vec![],
        }
    }

    #[test]
    fn hash_is_stable_and_changes_with_every_field() {
        let t = template();
        assert_eq!(t.hash(), template().hash());
        assert_eq!(t.hash().len(), 10);
        let variants = [
            ReplicaTemplate { engine: EngineKind::Vllm, ..template() },
            ReplicaTemplate { source: "hf://org/n".into(), ..template() },
            ReplicaTemplate { engine_args: vec!["--y".into()], ..template() },
            ReplicaTemplate { engine_args: vec![], ..template() },
            ReplicaTemplate { gpus: 2, ..template() },
            ReplicaTemplate { gpu_types: vec!["H100".into()], ..template() },
        ];
        for v in variants {
            assert_ne!(v.hash(), t.hash(), "{v:?}");
        }
    }

    #[test]
    fn hash_leaves_defaults_out_so_new_default_fields_roll_nothing() {
        let t = ReplicaTemplate { engine: EngineKind::Vllm, engine_args: vec![], gpu_types: vec![], ..template() };
        assert_eq!(serde_json::to_string(&t).unwrap(), r#"{"source":"hf://org/m","gpus":1}"#);
        // A frozen value: changing the hash's input rolls every replica of every cluster.
        assert_eq!(t.hash(), "b6bf9be042", "pin the hash function; change it only with a migration");
    }

    #[test]
    fn surge_and_unavailability_resolve_like_kubernetes() {
        let r = RolloutSpec::default();
        assert_eq!(r.resolve(4), (1, 0));
        assert_eq!(r.resolve(1), (1, 0), "25% of 1 rounds up to 1");
        assert_eq!(r.resolve(10), (3, 0));
        let r = RolloutSpec {
            max_surge: IntOrPercent::Count(0),
            max_unavailable: IntOrPercent::Percent(10),
            ..RolloutSpec::default()
        };
        assert_eq!(r.resolve(3), (0, 1), "both 0 after rounding: one may be unavailable");
        assert_eq!(r.resolve(20), (0, 2));
    }

    #[test]
    fn parses_counts_and_percents_and_names_bad_values() {
        let r: RolloutSpec = serde_yaml::from_str("max_surge: 2\nmax_unavailable: 50%").unwrap();
        assert_eq!((r.max_surge, r.max_unavailable), (IntOrPercent::Count(2), IntOrPercent::Percent(50)));
        assert_eq!(serde_json::to_value(&r).unwrap(), serde_json::json!({"max_surge": 2, "max_unavailable": "50%"}));
        for bad in ["max_surge: -1", "max_surge: 150%", "max_surge: lots", "max_surge: 5000", "surge: 1"] {
            assert!(serde_yaml::from_str::<RolloutSpec>(bad).is_err(), "{bad}");
        }
        let c: RolloutSpec = serde_yaml::from_str("canary: {steps: [5, 100], interval: 30s}").unwrap();
        let c = c.canary.unwrap();
        assert_eq!((c.steps, c.interval.as_millis(), c.max_error_rate), (vec![5, 100], 30_000, 0.01));
        for (bad, want) in [
            ("canary: {steps: [50, 10, 100]}", "each above the one before"),
            ("canary: {steps: [10, 50]}", "last step must be 100"),
            ("canary: {steps: []}", "1 to 10 steps"),
            ("canary: {interval: 0s}", "between 1s and 24h"),
            ("canary: {max_error_rate: 2}", "between 0 and 1"),
            ("canary: {max_ttft_p95_ratio: 0.5}", "between 1 and 100"),
        ] {
            let r: RolloutSpec = serde_yaml::from_str(bad).unwrap();
            let e = r.validate("spec.rollout").unwrap_err().to_string();
            assert!(e.contains("spec.rollout.canary") && e.contains(want), "{bad}: {e}");
        }
        let both_zero: RolloutSpec = serde_yaml::from_str("max_surge: 0%\nmax_unavailable: 0").unwrap();
        let e = both_zero.validate("spec.rollout").unwrap_err().to_string();
        assert!(e.contains("spec.rollout") && e.contains("both be 0"), "{e}");
    }
}
