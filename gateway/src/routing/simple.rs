//! Load-only strategies: random, round-robin, least-request (default), least-kv-cache,
//! least-latency (EWMA TTFT + TPOT x expected tokens) and power-of-two choices.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::Rng;

use super::{argmin_by, Strategy};
use crate::load::EndpointLoad;
use crate::request::RequestFeatures;
use crate::table::{Endpoint, EndpointId};

/// Uniformly random.
pub struct Random;

impl Strategy for Random {
    fn pick(&self, _: &RequestFeatures, eps: &[Arc<Endpoint>], _: &[EndpointLoad]) -> Option<EndpointId> {
        if eps.is_empty() {
            return None;
        }
        Some(eps[rand::rng().random_range(0..eps.len())].id.clone())
    }
}

/// A turn counter per model: the next turn among `eps` (all of one model). One counter for
/// every model would let another model's requests set the parity: with a disaggregated
/// model's prefill and decode picks alternating, every decode pick saw the same turn and
/// round-robin sent all of them to one engine.
#[derive(Default)]
pub struct Turns(Mutex<HashMap<crate::names::ModelName, usize>>);

impl Turns {
    pub fn next(&self, eps: &[Arc<Endpoint>]) -> usize {
        let Some(first) = eps.first() else { return 0 };
        let mut turns = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let turn = turns.entry(first.model.clone()).or_insert(0);
        let now = *turn;
        *turn = now.wrapping_add(1);
        now
    }
}

/// In turn.
#[derive(Default)]
pub struct RoundRobin(Turns);

impl Strategy for RoundRobin {
    fn pick(&self, _: &RequestFeatures, eps: &[Arc<Endpoint>], _: &[EndpointLoad]) -> Option<EndpointId> {
        if eps.is_empty() {
            return None;
        }
        Some(eps[self.0.next(eps) % eps.len()].id.clone())
    }
}

/// Fewest requests queued: gateway in-flight plus engine waiting.
#[derive(Default)]
pub struct LeastRequest(Turns);

impl Strategy for LeastRequest {
    fn pick(&self, _: &RequestFeatures, eps: &[Arc<Endpoint>], load: &[EndpointLoad]) -> Option<EndpointId> {
        let tie = self.0.next(eps);
        argmin_by(eps.len(), tie, |i| load[i].queue()).map(|i| eps[i].id.clone())
    }
}

/// Lowest engine KV-cache usage, then fewest queued.
#[derive(Default)]
pub struct LeastKvCache(Turns);

impl Strategy for LeastKvCache {
    fn pick(&self, _: &RequestFeatures, eps: &[Arc<Endpoint>], load: &[EndpointLoad]) -> Option<EndpointId> {
        let tie = self.0.next(eps);
        argmin_by(eps.len(), tie, |i| load[i].engine.kv_cache_usage * 1e3 + load[i].queue()).map(|i| eps[i].id.clone())
    }
}

/// Lowest expected latency: EWMA TTFT + EWMA TPOT x expected output tokens, scaled by
/// the queue. Endpoints without samples are tried first.
#[derive(Default)]
pub struct LeastLatency(Turns);

impl Strategy for LeastLatency {
    fn pick(&self, req: &RequestFeatures, eps: &[Arc<Endpoint>], load: &[EndpointLoad]) -> Option<EndpointId> {
        let tie = self.0.next(eps);
        let tokens = req.max_tokens.unwrap_or(128).min(4096) as f64;
        argmin_by(eps.len(), tie, |i| {
            let l = &load[i];
            if l.ttft == 0.0 && l.tpot == 0.0 {
                return -1.0 / (1.0 + l.queue());
            }
            (l.ttft + l.tpot * tokens) * (1.0 + l.queue())
        })
        .map(|i| eps[i].id.clone())
    }
}

/// The less queued of two distinct random endpoints.
pub struct PowerOfTwo;

impl Strategy for PowerOfTwo {
    fn pick(&self, _: &RequestFeatures, eps: &[Arc<Endpoint>], load: &[EndpointLoad]) -> Option<EndpointId> {
        match eps.len() {
            0 => None,
            1 => Some(eps[0].id.clone()),
            n => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..n);
                let b = (a + rng.random_range(1..n)) % n;
                let i = if load[b].queue() < load[a].queue() { b } else { a };
                Some(eps[i].id.clone())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn least_request_counts_engine_waiting_too() {
        let eps = eps(3);
        let mut l = loads(&[2, 1, 3]);
        assert_eq!(LeastRequest::default().pick(&req(""), &eps, &l).unwrap(), eps[1].id);
        l[1].engine.waiting = 2.0;
        l[1].engine.running = 3.0; // other gateways' load shows in the engine's figures
        assert_eq!(LeastRequest::default().pick(&req(""), &eps, &l).unwrap(), eps[0].id);
    }

    #[test]
    fn least_request_spreads_ties() {
        let eps = eps(3);
        let l = loads(&[0, 0, 0]);
        let s = LeastRequest::default();
        let picks: std::collections::HashSet<_> = (0..3).map(|_| s.pick(&req(""), &eps, &l).unwrap()).collect();
        assert_eq!(picks.len(), 3);
    }

    #[test]
    fn round_robin_cycles() {
        let eps = eps(3);
        let s = RoundRobin::default();
        let got: Vec<_> = (0..6).map(|_| s.pick(&req(""), &eps, &loads(&[0, 0, 0])).unwrap()).collect();
        assert_eq!(got[0], got[3]);
        assert_ne!(got[0], got[1]);
        // another model's picks in between do not set this model's turn
        let other: Vec<Arc<Endpoint>> = vec![Arc::new(Endpoint::new("other", "o:1".parse().unwrap()))];
        let mine: Vec<_> = (0..4)
            .map(|_| {
                s.pick(&req(""), &other, &loads(&[0])).unwrap();
                s.pick(&req(""), &eps, &loads(&[0, 0, 0])).unwrap()
            })
            .collect();
        assert_eq!(mine.iter().collect::<std::collections::BTreeSet<_>>().len(), 3, "{mine:?}");
    }

    #[test]
    fn least_kv_and_least_latency() {
        let eps = eps(2);
        let mut l = loads(&[0, 5]);
        l[0].engine.kv_cache_usage = 0.9;
        l[1].engine.kv_cache_usage = 0.1;
        assert_eq!(LeastKvCache::default().pick(&req(""), &eps, &l).unwrap(), eps[1].id);
        let mut l = loads(&[0, 0]);
        l[0].ttft = 0.5;
        l[0].tpot = 0.05;
        l[1].ttft = 0.1;
        l[1].tpot = 0.01;
        assert_eq!(LeastLatency::default().pick(&req(""), &eps, &l).unwrap(), eps[1].id);
        l[0] = EndpointLoad::default(); // unmeasured: explored first
        assert_eq!(LeastLatency::default().pick(&req(""), &eps, &l).unwrap(), eps[0].id);
    }

    #[test]
    fn power_of_two_with_two_endpoints_takes_the_lighter() {
        let eps = eps(2);
        let l = loads(&[9, 1]);
        for _ in 0..20 {
            assert_eq!(PowerOfTwo.pick(&req(""), &eps, &l).unwrap(), eps[1].id);
        }
    }
}
