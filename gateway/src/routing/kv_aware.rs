//! `kv-aware` routing: a cost per candidate from what the engines' own KV events say they
//! hold ([`KvIndex`], fed by [`crate::kv_fleet`]) and their load; the cheapest wins.
//!
//! ```text
//! cost(e) = prefill_weight × prompt tokens not cached on e
//!         + offload_weight × prompt tokens e holds offloaded (CPU, storage), to load
//!         + pending_weight × prefill tokens already sent to e, not yet begun
//!         + load_weight    × e's queue (max of this gateway's in-flight and the engine's running + waiting)
//! ```
//!
//! "Cached" is the longest run of the prompt's leading blocks the engine holds on its GPU,
//! by its events, or will hold: a request just sent there counts its blocks as held for
//! `speculate_for` (until the engine's own event arrives), so a burst sharing a new prefix
//! follows the first request. "Offloaded" is the run after it that the engine holds in a
//! slower tier (KV offloading to host memory): loaded over PCIe rather than computed
//! ([`KvIndex::held_by`]). Saturated endpoints never reach here (admission leaves them
//! out), which bounds how far a popular prefix can pile onto one engine.
//!
//! Requests without token ids (the model has no `--tokenizer`, the body has no single
//! prompt, an adapter's request — its blocks are keyed by the engine's adapter id) are
//! routed by the approximate `prefix-cache` strategy instead. Pure apart from the index
//! it reads and speculates into.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use super::kv_index::{block_keys, Held, KvIndex};
use super::prefix::PrefixCache;
use super::{argmin_by, Strategy};
use crate::load::EndpointLoad;
use crate::names::ModelName;
use crate::request::RequestFeatures;
use crate::table::{Endpoint, EndpointId};

/// Weights of the cost, and how long a routed request's blocks count as held.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvAwareConfig {
    /// Cost of one prompt token the engine must compute (1: costs are in prefill tokens).
    pub prefill_weight: f64,
    /// Cost of one prompt token sent to the engine before and not yet begun. Below
    /// `prefill_weight`: computing a prompt again elsewhere also costs cache space there
    /// (it evicts other prefixes), which waiting behind it does not.
    pub pending_weight: f64,
    /// Cost of one prompt token the engine holds in a slower tier than its GPU (CPU
    /// offload, storage) and loads instead of computing, relative to `prefill_weight`;
    /// within 0..=1 (1: an offloaded block is worth nothing). `--kv-offload-weight`, whose
    /// doc says why 0.25.
    pub offload_weight: f64,
    /// Cost of one request in the engine's queue, in prefill tokens.
    pub load_weight: f64,
    pub speculate_for: Duration,
    /// Most blocks of a prompt looked up.
    pub max_blocks: usize,
}

impl Default for KvAwareConfig {
    fn default() -> Self {
        KvAwareConfig {
            prefill_weight: 1.0,
            pending_weight: 0.5,
            offload_weight: 0.25,
            load_weight: 64.0,
            speculate_for: Duration::from_secs(5),
            max_blocks: 8192,
        }
    }
}

/// One candidate's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Leading prompt tokens on the engine's GPU (held or speculated).
    pub cached_tokens: usize,
    /// Of `cached_tokens`, those only speculated (routed there, not yet reported).
    pub speculative_tokens: usize,
    /// Prompt tokens after `cached_tokens` the engine holds in a slower tier, to load.
    pub offloaded_tokens: usize,
    pub pending_prefill: u64,
    pub queue: f64,
    pub cost: f64,
}

/// The candidates' costs (pure): `held` is what each endpoint holds of the prompt's
/// leading blocks, parallel with `load`.
pub fn costs(
    prompt_tokens: usize,
    block_size: usize,
    held: &[Held],
    load: &[EndpointLoad],
    cfg: &KvAwareConfig,
) -> Vec<Candidate> {
    held.iter()
        .zip(load)
        .map(|(h, l)| {
            let usable = (h.blocks * block_size).min(prompt_tokens);
            let offloaded_tokens = (h.offloaded * block_size).min(usable);
            let cached_tokens = usable - offloaded_tokens;
            let uncached = (prompt_tokens - usable) as f64;
            let queue = l.queue();
            let cost = cfg.prefill_weight * uncached
                + cfg.prefill_weight * cfg.offload_weight * offloaded_tokens as f64
                + cfg.pending_weight * l.prefill_pending as f64
                + cfg.load_weight * queue;
            Candidate {
                cached_tokens,
                speculative_tokens: (h.speculative * block_size).min(cached_tokens),
                offloaded_tokens,
                pending_prefill: l.prefill_pending,
                queue,
                cost,
            }
        })
        .collect()
}

/// One candidate's `(cached, speculative)` tokens as an `x-flotilla-route` explanation
/// written by [`KvAware::decide`] states them (None: `endpoint` is not in it), for tools and
/// tests that read the header.
pub fn explained_terms(explanation: &str, endpoint: &str) -> Option<(usize, usize)> {
    Some((explained_term(explanation, endpoint, "cached")?, explained_term(explanation, endpoint, "speculative")?))
}

/// One candidate's term `name` (`cached`, `speculative`, `offloaded`, `pending`) in an
/// `x-flotilla-route` explanation (None: `endpoint` or the term is not in it).
pub fn explained_term(explanation: &str, endpoint: &str, name: &str) -> Option<usize> {
    let part = explanation.split("; ").find(|p| p.split(' ').next() == Some(endpoint))?;
    part.split(' ').find_map(|w| w.strip_prefix(name)?.strip_prefix('='))?.parse().ok()
}

/// What kv-aware decided for a request.
#[derive(Debug, Clone)]
pub struct Decision {
    pub id: EndpointId,
    /// Prompt tokens the chosen engine is expected to compute (its pending prefill): neither
    /// cached on its GPU nor loaded from a slower tier.
    pub prefill_tokens: u64,
    /// Prompt tokens it is expected to find cached on its GPU (the accuracy metric's
    /// prediction). Offloaded tokens are left out: vLLM counts a hit it loads through its KV
    /// connector in `vllm:external_prefix_cache_hits_total`, not in the
    /// `vllm:prefix_cache_hits_total` this prediction is compared with.
    pub predicted_hit_tokens: u64,
    pub prompt_tokens: u64,
    /// `x-flotilla-route`: every candidate's terms, when the request asked.
    pub explanation: Option<String>,
}

/// The per-model KV indexes, shared with the event followers.
pub type KvIndexes = Arc<RwLock<HashMap<ModelName, Arc<Mutex<KvIndex>>>>>;

fn lock(index: &Mutex<KvIndex>) -> std::sync::MutexGuard<'_, KvIndex> {
    index.lock().unwrap_or_else(|p| p.into_inner())
}

/// The strategy: the indexes, the weights and the approximate fallback.
pub struct KvAware {
    pub indexes: KvIndexes,
    pub cfg: KvAwareConfig,
    fallback: PrefixCache,
}

impl KvAware {
    pub fn new(cfg: KvAwareConfig, fallback: PrefixCache) -> Self {
        KvAware { indexes: KvIndexes::default(), cfg, fallback }
    }

    fn index_of(&self, model: &ModelName) -> Option<Arc<Mutex<KvIndex>>> {
        self.indexes.read().unwrap_or_else(|p| p.into_inner()).get(model).cloned()
    }

    /// Whether `model`'s engines have told this gateway (KV events) of blocks they hold.
    pub fn has_events(&self, model: &str) -> bool {
        let indexes = self.indexes.read().unwrap_or_else(|p| p.into_inner());
        indexes.get(model).is_some_and(|ix| lock(ix).entries() > 0)
    }

    /// Chooses among `endpoints` (parallel with `load`, all of one model).
    pub fn decide(
        &self,
        req: &RequestFeatures,
        endpoints: &[Arc<Endpoint>],
        load: &[EndpointLoad],
        now: Instant,
    ) -> Option<Decision> {
        let first = endpoints.first()?;
        let (Some(tokens), Some(index)) = (req.tokens.as_deref(), self.index_of(&first.model)) else {
            let id = self.fallback.pick(req, endpoints, load)?;
            let explanation = req.explain_route.then(|| "prefix-cache (no token ids or no KV index)".to_string());
            return Some(Decision { id, prefill_tokens: 0, predicted_hit_tokens: 0, prompt_tokens: 0, explanation });
        };
        let names: Vec<&str> = endpoints.iter().map(|e| e.id.as_str()).collect();
        let mut ix = lock(&index);
        ix.expire_speculation(now);
        let block_size = ix.block_size();
        let keys = block_keys(tokens, block_size, None, self.cfg.max_blocks);
        let held = ix.held_by(&keys, &names);
        let c = costs(tokens.len(), block_size, &held, load, &self.cfg);
        // ties go to the fewest in the queue, then spread by a hash of the prompt's start
        let tie = keys.first().map_or(0, |k| (*k % endpoints.len() as u64) as usize);
        let best = argmin_by(endpoints.len(), tie, |i| c[i].cost + c[i].queue * 1e-6)?;
        let chosen = &endpoints[best];
        ix.speculate(chosen.id.as_str(), &keys, now, now + self.cfg.speculate_for);
        drop(ix);
        let explanation = req.explain_route.then(|| {
            let mut s = format!("kv-aware tokens={} block={block_size}", tokens.len());
            for (i, (e, c)) in endpoints.iter().zip(&c).enumerate() {
                let _ = write!(
                    s,
                    "; {} cached={} speculative={} offloaded={} pending={} queue={} cost={:.0}{}",
                    e.id.as_str(),
                    c.cached_tokens,
                    c.speculative_tokens,
                    c.offloaded_tokens,
                    c.pending_prefill,
                    c.queue,
                    c.cost,
                    if i == best { " chosen" } else { "" }
                );
            }
            s
        });
        let hit = c[best].cached_tokens as u64;
        let loaded = c[best].offloaded_tokens as u64;
        Some(Decision {
            id: chosen.id.clone(),
            prefill_tokens: tokens.len() as u64 - hit - loaded,
            predicted_hit_tokens: hit,
            prompt_tokens: tokens.len() as u64,
            explanation,
        })
    }
}

impl Strategy for KvAware {
    fn pick(&self, req: &RequestFeatures, endpoints: &[Arc<Endpoint>], load: &[EndpointLoad]) -> Option<EndpointId> {
        self.decide(req, endpoints, load, Instant::now()).map(|d| d.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::kv_index::test_events::{batch, removed, stored, stored_in};
    use crate::routing::prefix::PrefixConfig;
    use crate::routing::testutil;
    use flotilla_engine::kv_events::{KvEvent, Medium};

    fn load(queue: f64, pending: u64) -> EndpointLoad {
        EndpointLoad { in_flight: queue as u32, prefill_pending: pending, ..Default::default() }
    }

    /// `blocks` leading blocks on the GPU, `speculative` of them only speculated.
    fn gpu(blocks: usize, speculative: usize) -> Held {
        Held { blocks, offloaded: 0, speculative }
    }

    #[test]
    fn cost_weighs_uncached_tokens_against_load() {
        let cfg = KvAwareConfig::default();
        // 1,000-token prompt, blocks of 16: e0 holds 50 blocks (800 tokens) but is busy
        let c = costs(1000, 16, &[gpu(50, 10), gpu(0, 0)], &[load(2.0, 100), load(0.0, 0)], &cfg);
        assert_eq!((c[0].cached_tokens, c[0].speculative_tokens, c[0].offloaded_tokens), (800, 160, 0));
        assert_eq!(c[0].cost, 200.0 + 0.5 * 100.0 + 2.0 * 64.0);
        assert_eq!(c[1].cost, 1000.0);
        // a prompt shorter than what is held is all cached, never negative
        let c = costs(10, 16, &[gpu(1, 0)], &[load(0.0, 0)], &cfg);
        assert_eq!((c[0].cached_tokens, c[0].cost), (10, 0.0));
        // enough queue outweighs the hit
        let c = costs(1000, 16, &[gpu(50, 0), gpu(0, 0)], &[load(20.0, 0), load(0.0, 0)], &cfg);
        assert!(c[0].cost > c[1].cost);
    }

    #[test]
    fn offloaded_tokens_cost_the_offload_weight() {
        let cfg = KvAwareConfig::default();
        // 1,000-token prompt, blocks of 10: the same 800 tokens on the GPU, offloaded, nowhere
        let held = [gpu(80, 0), Held { blocks: 80, offloaded: 80, speculative: 0 }, gpu(0, 0)];
        let c = costs(1000, 10, &held, &[load(0.0, 0), load(0.0, 0), load(0.0, 0)], &cfg);
        assert_eq!((c[1].cached_tokens, c[1].offloaded_tokens), (0, 800));
        assert_eq!([c[0].cost, c[1].cost, c[2].cost], [200.0, 200.0 + 0.25 * 800.0, 1000.0]);
        // part on the GPU, the rest offloaded; a held run beyond the prompt is clipped
        let c = costs(95, 10, &[Held { blocks: 12, offloaded: 5, speculative: 1 }], &[load(0.0, 0)], &cfg);
        assert_eq!((c[0].cached_tokens, c[0].offloaded_tokens, c[0].speculative_tokens), (45, 50, 10));
        assert_eq!(c[0].cost, 0.25 * 50.0);
        // at weight 1 an offloaded block is worth nothing; at 0 as much as a GPU one
        for (w, want) in [(1.0, 1000.0), (0.0, 200.0)] {
            let c = costs(1000, 10, &held[1..2], &[load(0.0, 0)], &KvAwareConfig { offload_weight: w, ..cfg });
            assert_eq!(c[0].cost, want, "weight {w}");
        }
    }

    fn strategy_with(events: &[(&str, KvEvent)]) -> KvAware {
        let s = KvAware::new(KvAwareConfig::default(), PrefixCache::new(PrefixConfig::default()));
        let mut ix = KvIndex::new(4, 10_000);
        for (seq, (engine, ev)) in events.iter().enumerate() {
            ix.apply(engine, seq as i64, &batch(vec![ev.clone()]));
        }
        s.indexes.write().unwrap().insert(ModelName::from("m"), Arc::new(Mutex::new(ix)));
        s
    }

    fn req(tokens: &[u32]) -> RequestFeatures {
        RequestFeatures { tokens: Some(Arc::from(tokens)), explain_route: true, ..testutil::req("x") }
    }

    #[test]
    fn the_engine_holding_the_prefix_wins_and_a_burst_follows_the_first() {
        let prompt: Vec<u32> = (0..200).collect();
        let eps = testutil::eps(3);
        let e2 = eps[2].id.as_str().to_string();
        let s = strategy_with(&[(&e2, stored(&(0..20).collect::<Vec<u64>>(), None, &prompt[..80]))]);
        let l = [load(0.0, 0), load(0.0, 0), load(1.0, 0)];
        let d = s.decide(&req(&prompt), &eps, &l, Instant::now()).unwrap();
        assert_eq!(d.id, eps[2].id, "{:?}", d.explanation);
        assert_eq!((d.predicted_hit_tokens, d.prefill_tokens, d.prompt_tokens), (80, 120, 200));
        let x = d.explanation.unwrap();
        assert!(x.starts_with("kv-aware tokens=200 block=4; "), "{x}");
        assert_eq!(explained_terms(&x, &e2), Some((80, 0)));
        assert_eq!(explained_terms(&x, "nowhere:1"), None);
        assert!(
            x.contains(&format!("{e2} cached=80 speculative=0 offloaded=0 pending=0 queue=1 cost=184 chosen")),
            "{x}"
        );

        // A new prefix nobody holds: the first request goes somewhere; the next ones follow
        // it on its speculated blocks rather than scattering.
        let other: Vec<u32> = (1000..1200).collect();
        let l = [load(0.0, 0), load(0.0, 0), load(0.0, 0)];
        let first = s.decide(&req(&other), &eps, &l, Instant::now()).unwrap();
        for _ in 0..3 {
            let next = s.decide(&req(&other), &eps, &l, Instant::now()).unwrap();
            assert_eq!(next.id, first.id);
            assert_eq!(next.predicted_hit_tokens, 200, "{:?}", next.explanation);
        }
        // ... until its speculation expires unconfirmed
        let later = Instant::now() + Duration::from_secs(6);
        let d = s.decide(&req(&other), &eps, &[load(0.0, 0), load(0.0, 0), load(0.0, 0)], later).unwrap();
        assert_eq!(d.predicted_hit_tokens, 0);
    }

    #[test]
    fn a_gpu_holder_beats_an_offloaded_holder_beats_none_at_equal_load() {
        let prompt: Vec<u32> = (0..200).collect();
        let eps = testutil::eps(3);
        let (e0, e1) = (eps[0].id.as_str().to_string(), eps[1].id.as_str().to_string());
        let hashes: Vec<u64> = (0..20).collect();
        // e0 holds 80 tokens on its GPU; e1 the same 80, but its GPU evicted them after
        // offloading them to host memory
        let s = strategy_with(&[
            (&e0, stored(&hashes, None, &prompt[..80])),
            (&e1, stored(&hashes, None, &prompt[..80])),
            (&e1, stored_in(Some(Medium::Cpu), &hashes, None, &prompt[..80])),
            (&e1, removed(&hashes, Some(Medium::Gpu))),
        ]);
        let idle = [load(0.0, 0), load(0.0, 0), load(0.0, 0)];
        let d = s.decide(&req(&prompt), &eps, &idle, Instant::now()).unwrap();
        let x = d.explanation.unwrap();
        assert_eq!(d.id, eps[0].id, "{x}");
        assert!(
            x.contains(&format!("{e0} cached=80 speculative=0 offloaded=0 pending=0 queue=0 cost=120 chosen")),
            "{x}"
        );
        assert!(x.contains(&format!("{e1} cached=0 speculative=0 offloaded=80 pending=0 queue=0 cost=140;")), "{x}");
        assert_eq!(explained_term(&x, &e1, "offloaded"), Some(80));
        assert_eq!(explained_terms(&x, &e1), Some((0, 0)), "the old reader still reads it");
        assert_eq!(explained_term(&x, &e1, "offload"), None, "a whole term only");
        // without the GPU holder, the offloaded one wins over the engine holding nothing;
        // it computes only what it neither holds nor loads, and the hit predicted for
        // vllm:prefix_cache_hits is the GPU's alone
        let d = s.decide(&req(&prompt), &eps[1..], &idle[1..], Instant::now()).unwrap();
        assert_eq!(d.id, eps[1].id, "{:?}", d.explanation);
        assert_eq!((d.predicted_hit_tokens, d.prefill_tokens, d.prompt_tokens), (0, 120, 200));
    }

    #[test]
    fn two_gateways_with_the_same_state_decide_the_same() {
        let prompt: Vec<u32> = (0..64).collect();
        let eps = testutil::eps(4);
        let ev = [
            (eps[1].id.as_str(), stored(&[1, 2, 3], None, &prompt[..12])),
            (eps[3].id.as_str(), stored(&[7, 8], None, &prompt[..8])),
        ];
        let (a, b) = (strategy_with(&ev), strategy_with(&ev));
        let l = [load(0.0, 0), load(3.0, 0), load(0.0, 0), load(0.0, 0)];
        let now = Instant::now();
        for p in [&prompt[..], &prompt[..40], &[5u32; 64][..]] {
            let (da, db) = (a.decide(&req(p), &eps, &l, now).unwrap(), b.decide(&req(p), &eps, &l, now).unwrap());
            assert_eq!((da.id, da.explanation), (db.id, db.explanation));
        }
    }

    #[test]
    fn without_token_ids_it_falls_back_to_the_approximate_index() {
        let s = strategy_with(&[]);
        let eps = testutil::eps(2);
        let l = testutil::loads(&[0, 0]);
        let r = RequestFeatures { explain_route: true, ..testutil::req("hello") };
        let d = s.decide(&r, &eps, &l, Instant::now()).unwrap();
        assert_eq!(d.explanation.as_deref(), Some("prefix-cache (no token ids or no KV index)"));
        assert_eq!(d.prompt_tokens, 0);
        assert!(s.decide(&r, &[], &[], Instant::now()).is_none());
    }
}
