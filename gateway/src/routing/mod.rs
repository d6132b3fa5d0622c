//! Routing strategies: each a [`Strategy`] that picks one endpoint for a request from the
//! candidates (already filtered for model, LoRA adapter, ejection and saturation) and
//! their loads. Pure apart from each strategy's own memory (round-robin counter, prefix
//! index, session table). [`Router`] holds one instance of each.
//!
//! ```text
//! request features ─┐
//! candidates+loads ─┼─> Router::strategy(model's or header's) ─> pick ─> EndpointId
//! ```

pub mod kv_aware;
pub mod kv_index;
pub mod prefix;
pub mod session;
pub mod simple;

use std::sync::Arc;

use flotilla_api::spec::RoutingStrategy;

use crate::load::EndpointLoad;
use crate::request::RequestFeatures;
use crate::table::{Endpoint, EndpointId};

/// Picks an endpoint; `endpoints` and `load` are parallel slices.
pub trait Strategy: Send + Sync {
    fn pick(&self, req: &RequestFeatures, endpoints: &[Arc<Endpoint>], load: &[EndpointLoad]) -> Option<EndpointId>;
}

/// Index of the lowest `key`, ties broken by `tie` (an index offset so equal endpoints
/// share the work).
pub(crate) fn argmin_by(n: usize, tie: usize, key: impl Fn(usize) -> f64) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for k in 0..n {
        let i = (k + tie) % n;
        let v = key(i);
        if best.is_none_or(|(_, b)| v < b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

/// One instance of every strategy.
pub struct Router {
    random: simple::Random,
    round_robin: simple::RoundRobin,
    least_request: simple::LeastRequest,
    least_kv: simple::LeastKvCache,
    least_latency: simple::LeastLatency,
    p2c: simple::PowerOfTwo,
    prefix: prefix::PrefixCache,
    session: session::SessionAffinity,
    pub kv_aware: kv_aware::KvAware,
}

impl Router {
    pub fn new(prefix_cfg: prefix::PrefixConfig, kv_cfg: kv_aware::KvAwareConfig) -> Self {
        Router {
            random: simple::Random,
            round_robin: simple::RoundRobin::default(),
            least_request: simple::LeastRequest::default(),
            least_kv: simple::LeastKvCache::default(),
            least_latency: simple::LeastLatency::default(),
            p2c: simple::PowerOfTwo,
            prefix: prefix::PrefixCache::new(prefix_cfg),
            session: session::SessionAffinity::new(100_000),
            kv_aware: kv_aware::KvAware::new(kv_cfg, prefix::PrefixCache::new(prefix_cfg)),
        }
    }

    /// The strategy named `s`; `auto` is resolved by the gateway before it picks
    /// ([`crate::state::Gateway::resolve_routing`]), and is least-request here.
    pub fn strategy(&self, s: RoutingStrategy) -> &dyn Strategy {
        match s {
            RoutingStrategy::Auto => &self.least_request,
            RoutingStrategy::Random => &self.random,
            RoutingStrategy::RoundRobin => &self.round_robin,
            RoutingStrategy::LeastRequest => &self.least_request,
            RoutingStrategy::LeastKvCache => &self.least_kv,
            RoutingStrategy::LeastLatency => &self.least_latency,
            RoutingStrategy::PowerOfTwo => &self.p2c,
            RoutingStrategy::PrefixCache => &self.prefix,
            RoutingStrategy::SessionAffinity => &self.session,
            RoutingStrategy::KvAware => &self.kv_aware,
        }
    }
}

/// Parses the `x-flotilla-routing` header; the error names the valid strategies.
pub fn parse_override(v: &str) -> Result<RoutingStrategy, String> {
    v.trim().parse::<RoutingStrategy>().map_err(|_| {
        let names: Vec<_> = RoutingStrategy::ALL.iter().map(|r| r.as_str()).collect();
        format!("x-flotilla-routing {v:?} is not one of {}", names.join(", "))
    })
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    pub fn eps(n: usize) -> Vec<Arc<Endpoint>> {
        (0..n).map(|i| Arc::new(Endpoint::new("m", format!("e{i}:1").parse().unwrap()))).collect()
    }

    pub fn loads(q: &[u32]) -> Vec<EndpointLoad> {
        q.iter().map(|&in_flight| EndpointLoad { in_flight, ..Default::default() }).collect()
    }

    pub fn req(prompt: &str) -> RequestFeatures {
        RequestFeatures { model: "m".into(), prompt: prompt.into(), ..Default::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_header_errors_name_every_strategy() {
        assert_eq!(parse_override("prefix-cache").unwrap(), RoutingStrategy::PrefixCache);
        let e = parse_override("fastest").unwrap_err();
        for s in RoutingStrategy::ALL {
            assert!(e.contains(s.as_str()), "{e}");
        }
    }

    #[test]
    fn every_strategy_picks_from_candidates_and_none_from_nothing() {
        let r = Router::new(prefix::PrefixConfig::default(), kv_aware::KvAwareConfig::default());
        let eps = testutil::eps(3);
        let l = testutil::loads(&[1, 0, 2]);
        for s in RoutingStrategy::ALL {
            let got = r.strategy(s).pick(&testutil::req("hello"), &eps, &l).unwrap();
            assert!(eps.iter().any(|e| e.id == got), "{s:?}");
            assert!(r.strategy(s).pick(&testutil::req("hello"), &[], &[]).is_none(), "{s:?}");
        }
    }
}
