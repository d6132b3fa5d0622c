//! Configuration of the controller actors and the agent/fleet services, validated once at
//! start-up. Durations are in milliseconds.
use crate::ActorsError;

/// How the scheduler scores the nodes that can take a replica.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PlacementStrategy {
    /// Fill the fullest node that fits first (keeps whole nodes free for big replicas).
    #[default]
    BinPack,
    /// Prefer the node with the most free GPUs and the fewest replicas of the same model.
    Spread,
}

impl std::str::FromStr for PlacementStrategy {
    type Err = ActorsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bin-pack" | "binpack" => Ok(PlacementStrategy::BinPack),
            "spread" => Ok(PlacementStrategy::Spread),
            other => Err(ActorsError::Config(format!("placement strategy {other:?} is not one of bin-pack, spread"))),
        }
    }
}

/// Knobs of the controllers. `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct ActorsConfig {
    /// A node whose agent has not sent a heartbeat for this long becomes NotReady.
    pub node_ttl_ms: u64,
    /// After a further grace period NotReady, the node's replicas are unbound (GPUs freed)
    /// and rescheduled elsewhere.
    pub reschedule_grace_ms: u64,
    /// How often agents are asked to send heartbeats (sent to them in `Registered`).
    pub heartbeat_interval_ms: u64,
    /// Period of the self-scheduled reconcile tick of model and node actors.
    pub reconcile_interval_ms: u64,
    /// Default placement scoring (a model may ask for spread with the label
    /// `flotilla.io/placement: spread`).
    pub placement: PlacementStrategy,
    /// Most replicas bound by one Raft transaction.
    pub bind_batch: usize,
    /// How long a Failed replica (crash loop, failed download) keeps counting against the
    /// desired count before a replacement is created (a backoff against restart storms).
    pub failed_replace_backoff_ms: u64,
    /// Failed replicas kept per model for operators to inspect; older ones are deleted.
    pub failed_keep: usize,
    /// Period of full endpoint snapshots on `WatchEndpoints` (load figures refresh).
    pub endpoints_refresh_ms: u64,
    /// Pause before an actor that stopped on an uncertain write is rebuilt.
    pub restart_delay_ms: u64,
    /// How often each autoscaler samples its model's signals and decides.
    pub autoscale_interval_ms: u64,
}

impl Default for ActorsConfig {
    fn default() -> Self {
        ActorsConfig {
            node_ttl_ms: 5_000,
            reschedule_grace_ms: 10_000,
            heartbeat_interval_ms: 1_000,
            reconcile_interval_ms: 1_000,
            placement: PlacementStrategy::BinPack,
            bind_batch: 512,
            failed_replace_backoff_ms: 30_000,
            failed_keep: 3,
            endpoints_refresh_ms: 2_000,
            restart_delay_ms: 200,
            autoscale_interval_ms: 1_000,
        }
    }
}

impl ActorsConfig {
    pub fn validate(&self) -> Result<(), ActorsError> {
        let bad = |m: String| Err(ActorsError::Config(m));
        let positive = [
            ("node_ttl_ms", self.node_ttl_ms),
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
            ("reconcile_interval_ms", self.reconcile_interval_ms),
            ("endpoints_refresh_ms", self.endpoints_refresh_ms),
            ("autoscale_interval_ms", self.autoscale_interval_ms),
            ("bind_batch", self.bind_batch as u64),
        ];
        for (name, v) in positive {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if self.heartbeat_interval_ms * 2 > self.node_ttl_ms {
            return bad(format!(
                "node_ttl_ms {} must be at least twice heartbeat_interval_ms {}",
                self.node_ttl_ms, self.heartbeat_interval_ms
            ));
        }
        Ok(())
    }

    pub(crate) fn ms(v: u64) -> std::time::Duration {
        std::time::Duration::from_millis(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_nonsense_is_refused() {
        assert!(ActorsConfig::default().validate().is_ok());
        let e = ActorsConfig { node_ttl_ms: 1_000, ..Default::default() }.validate().unwrap_err();
        assert!(e.to_string().contains("node_ttl_ms"), "{e}");
        assert!(ActorsConfig { bind_batch: 0, ..Default::default() }.validate().is_err());
        assert_eq!("spread".parse::<PlacementStrategy>().unwrap(), PlacementStrategy::Spread);
        assert!("random".parse::<PlacementStrategy>().is_err());
    }
}
