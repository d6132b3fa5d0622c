//! Prefix-cache routing: an index of recent prompts per endpoint at block granularity.
//! A prompt is cut into fixed-size character blocks; block i's key hashes block i and the
//! key of block i-1 (a chain, like vLLM's block hashes), so a key names a whole prefix.
//! The endpoint holding the longest matching chain wins, unless it is too loaded compared
//! with the least loaded candidate (the imbalance guard), then least-request decides.
//!
//! ```text
//! "sys prompt .... question"  ->  [k1]->[k2]->[k3]->[k4]     index: k -> {endpoint: stamp}
//!                                   match on e0: k1 k2 k3 (3 blocks)  -> e0, if balanced
//! ```

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use super::{argmin_by, Strategy};
use crate::load::EndpointLoad;
use crate::request::RequestFeatures;
use crate::table::{Endpoint, EndpointId};

/// Tuning of the prefix index and its imbalance guard.
#[derive(Debug, Clone, Copy)]
pub struct PrefixConfig {
    pub block_chars: usize,
    /// Entries (block, endpoint) kept; the oldest go first.
    pub capacity: usize,
    /// Leave the best match when its queue exceeds the least by more than this...
    pub balance_abs: u32,
    /// ... and is more than `least * balance_rel`.
    pub balance_rel: f64,
    /// Most blocks hashed per prompt.
    pub max_blocks: usize,
}

impl Default for PrefixConfig {
    fn default() -> Self {
        PrefixConfig { block_chars: 64, capacity: 200_000, balance_abs: 8, balance_rel: 1.5, max_blocks: 512 }
    }
}

/// The chained block keys of a prompt (full blocks only).
pub fn block_keys(prompt: &str, block_chars: usize, max_blocks: usize) -> Vec<u64> {
    let bytes = prompt.as_bytes();
    let mut prev = 0u64;
    bytes
        .chunks_exact(block_chars)
        .take(max_blocks)
        .map(|block| {
            let mut h = DefaultHasher::new();
            prev.hash(&mut h);
            block.hash(&mut h);
            prev = h.finish();
            prev
        })
        .collect()
}

#[derive(Default)]
struct Index {
    map: HashMap<u64, HashMap<EndpointId, u64>>,
    order: VecDeque<(u64, EndpointId, u64)>,
    clock: u64,
}

impl Index {
    fn insert(&mut self, keys: &[u64], ep: &EndpointId, capacity: usize) {
        self.clock += 1;
        for &k in keys {
            self.map.entry(k).or_default().insert(ep.clone(), self.clock);
            self.order.push_back((k, ep.clone(), self.clock));
        }
        while self.order.len() > capacity {
            let Some((k, e, stamp)) = self.order.pop_front() else { break };
            if let Some(m) = self.map.get_mut(&k) {
                if m.get(&e) == Some(&stamp) {
                    m.remove(&e);
                }
                if m.is_empty() {
                    self.map.remove(&k);
                }
            }
        }
    }

    /// Candidates holding the longest matching chain, and its length in blocks.
    fn longest(&self, keys: &[u64], eps: &[Arc<Endpoint>]) -> (Vec<usize>, usize) {
        let mut alive: Vec<usize> = (0..eps.len()).collect();
        let mut depth = 0;
        for k in keys {
            let Some(holders) = self.map.get(k) else { break };
            let next: Vec<usize> = alive.iter().copied().filter(|&i| holders.contains_key(&eps[i].id)).collect();
            if next.is_empty() {
                break;
            }
            alive = next;
            depth += 1;
        }
        (alive, depth)
    }
}

/// The prefix-cache strategy.
pub struct PrefixCache {
    cfg: PrefixConfig,
    index: Mutex<Index>,
    tie: AtomicUsize,
}

impl PrefixCache {
    pub fn new(cfg: PrefixConfig) -> Self {
        PrefixCache { cfg, index: Mutex::new(Index::default()), tie: AtomicUsize::new(0) }
    }

    /// Blocks of `prompt` the index believes `ep` holds (for tests and metrics).
    pub fn matched_blocks(&self, prompt: &str, ep: &Arc<Endpoint>) -> usize {
        let keys = block_keys(prompt, self.cfg.block_chars, self.cfg.max_blocks);
        let idx = self.index.lock().unwrap_or_else(|e| e.into_inner());
        idx.longest(&keys, std::slice::from_ref(ep)).1
    }
}

impl Strategy for PrefixCache {
    fn pick(&self, req: &RequestFeatures, eps: &[Arc<Endpoint>], load: &[EndpointLoad]) -> Option<EndpointId> {
        let tie = self.tie.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let least = argmin_by(eps.len(), tie, |i| load[i].queue())?;
        let keys = block_keys(&req.prompt, self.cfg.block_chars, self.cfg.max_blocks);
        let mut idx = self.index.lock().unwrap_or_else(|e| e.into_inner());
        let (holders, depth) = idx.longest(&keys, eps);
        let chosen = if depth == 0 {
            least
        } else {
            let best =
                holders.iter().copied().min_by(|&a, &b| load[a].queue().total_cmp(&load[b].queue())).unwrap_or(least);
            let (qb, ql) = (load[best].queue(), load[least].queue());
            let imbalanced = qb - ql > self.cfg.balance_abs as f64 && qb > ql * self.cfg.balance_rel;
            if imbalanced {
                least
            } else {
                best
            }
        };
        let id = eps[chosen].id.clone();
        idx.insert(&keys, &id, self.cfg.capacity);
        Some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    fn cfg() -> PrefixConfig {
        PrefixConfig { block_chars: 4, capacity: 1000, balance_abs: 2, balance_rel: 1.5, max_blocks: 100 }
    }

    #[test]
    fn keys_chain_so_equal_blocks_at_different_depths_differ() {
        let k = block_keys("abcdabcdab", 4, 10);
        assert_eq!(k.len(), 2);
        assert_ne!(k[0], k[1]);
        assert_eq!(block_keys("abcdabcdXYZW", 4, 10)[..2], k[..]);
    }

    #[test]
    fn repeats_of_a_prefix_stick_to_the_same_endpoint() {
        let s = PrefixCache::new(cfg());
        let eps = eps(4);
        let first = s.pick(&req("system prompt one; question A"), &eps, &loads(&[0, 0, 0, 0])).unwrap();
        for q in ["B", "C", "D"] {
            let l = loads(&[1, 1, 1, 1]);
            assert_eq!(s.pick(&req(&format!("system prompt one; question {q}")), &eps, &l).unwrap(), first);
        }
        let i = eps.iter().position(|e| e.id == first).unwrap();
        assert!(s.matched_blocks("system prompt one; question Z", &eps[i]) >= 4);
    }

    #[test]
    fn imbalance_guard_spills_to_the_least_loaded() {
        let s = PrefixCache::new(cfg());
        let eps = eps(2);
        let first = s.pick(&req("long shared prefix here"), &eps, &loads(&[0, 0])).unwrap();
        let i = eps.iter().position(|e| e.id == first).unwrap();
        let mut q = [0u32, 0];
        q[i] = 2; // within the guard: stays
        assert_eq!(s.pick(&req("long shared prefix here"), &eps, &loads(&q)).unwrap(), first);
        q[i] = 3; // 3 - 0 > 2 and 3 > 0 * 1.5: spills
        assert_eq!(s.pick(&req("long shared prefix here"), &eps, &loads(&q)).unwrap(), eps[1 - i].id);
        // and now both hold it: the less loaded holder wins
        q = [0, 0];
        q[i] = 1;
        assert_eq!(s.pick(&req("long shared prefix here"), &eps, &loads(&q)).unwrap(), eps[1 - i].id);
    }

    #[test]
    fn index_is_bounded() {
        let s = PrefixCache::new(PrefixConfig { capacity: 10, ..cfg() });
        let eps = eps(1);
        for i in 0..100 {
            s.pick(&req(&format!("prompt number {i:04} with some text")), &eps, &loads(&[0]));
        }
        let idx = s.index.lock().unwrap();
        assert!(idx.order.len() <= 10 && idx.map.values().map(HashMap::len).sum::<usize>() <= 10);
    }
}
