//! The KV block manager: a fixed pool of blocks of `block_size` tokens, reference counted,
//! with automatic prefix caching like vLLM V1's `KVCacheManager`.
//!
//! ```text
//!   request tokens  [t0 .. t15][t16 .. t31][t32 .. t40]
//!   hash chain      h0=H(0,b0)  h1=H(h0,b1)  (partial block: not cached)
//!   cached map      h -> block id   (only full blocks, one block per hash)
//!   free queue      LRU order, head evicted first; a freed cached block keeps its
//!                   hash until it is popped for reuse, so later requests can hit it
//! ```
//!
//! Freed blocks go to the tail in reverse order (a request's last blocks are evicted
//! first). A cache hit on a free block takes it out of the free queue. Usage is
//! `1 - free / total`, as vLLM reports `kv_cache_usage_perc`.
//!
//! With events on ([`BlockManager::enable_events`], `--kv-events-config`), it records what
//! vLLM's block pool publishes: `BlockStored` when full blocks enter the cache (their hashes,
//! the parent block's hash, their token ids), `BlockRemoved` when a cached block is reused
//! for something else. [`BlockManager::take_events`] hands them to the publisher each step.

use std::collections::HashMap;

use flotilla_engine::kv_events::{BlockHash, KvEvent, Medium};

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Block {
    refs: u32,
    hash: Option<u64>,
    prev: u32,
    next: u32,
}

/// Blocks held by one sequence and how many of them are registered in the cache.
#[derive(Debug, Default, Clone)]
pub struct SeqBlocks {
    /// Block ids, in token order.
    pub ids: Vec<u32>,
    /// Leading blocks already registered in the prefix cache.
    pub cached: usize,
}

/// The pool of KV blocks.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    blocks: Vec<Block>,
    head: u32,
    tail: u32,
    free: usize,
    cached: HashMap<u64, u32>,
    caching: bool,
    /// KV events since the last [`BlockManager::take_events`]; None: not recorded.
    events: Option<Vec<KvEvent>>,
}

/// Extends `hashes` with the chain hashes of every full block of `tokens` not yet hashed.
/// `salt` separates caches of different LoRA adapters.
pub fn extend_hashes(tokens: &[u32], block_size: usize, salt: u64, hashes: &mut Vec<u64>) {
    let full = tokens.len() / block_size;
    while hashes.len() < full {
        let i = hashes.len();
        let parent = if i == 0 { crate::text::mix(salt ^ 0x4B56) } else { hashes[i - 1] };
        let mut h = parent;
        for t in &tokens[i * block_size..(i + 1) * block_size] {
            h = crate::text::mix(h ^ u64::from(*t));
        }
        hashes.push(h);
    }
}

impl BlockManager {
    /// A pool of `num_blocks` empty blocks.
    pub fn new(num_blocks: u32, block_size: u32, caching: bool) -> Self {
        let n = num_blocks as usize;
        let blocks = (0..n)
            .map(|i| Block {
                refs: 0,
                hash: None,
                prev: if i == 0 { NIL } else { (i - 1) as u32 },
                next: if i + 1 == n { NIL } else { (i + 1) as u32 },
            })
            .collect();
        BlockManager {
            block_size: block_size as usize,
            blocks,
            head: if n == 0 { NIL } else { 0 },
            tail: if n == 0 { NIL } else { (n - 1) as u32 },
            free: n,
            cached: HashMap::new(),
            caching,
            events: None,
        }
    }

    /// Records KV events from now on.
    pub fn enable_events(&mut self) {
        self.events.get_or_insert_with(Vec::new);
    }

    /// The events recorded since the last call (empty when not recording).
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Total blocks.
    pub fn total(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks with no reference (some may still hold cached prefixes).
    pub fn free(&self) -> usize {
        self.free
    }

    /// Fraction of blocks referenced by sequences, as `vllm:kv_cache_usage_perc`.
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() {
            return 0.0;
        }
        1.0 - self.free as f64 / self.blocks.len() as f64
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// How many leading blocks of a prompt with these hashes are cached, leaving at least
    /// one token of `num_tokens` to compute (the last token's logits are needed).
    pub fn cached_prefix(&self, hashes: &[u64], num_tokens: usize) -> usize {
        if !self.caching || num_tokens == 0 {
            return 0;
        }
        let limit = (num_tokens - 1) / self.block_size;
        hashes.iter().take(limit).take_while(|h| self.cached.contains_key(h)).count()
    }

    fn unlink(&mut self, id: u32) {
        let (prev, next) = {
            let b = &self.blocks[id as usize];
            (b.prev, b.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        let b = &mut self.blocks[id as usize];
        b.prev = NIL;
        b.next = NIL;
        self.free -= 1;
    }

    fn push_tail(&mut self, id: u32) {
        let old_tail = self.tail;
        {
            let b = &mut self.blocks[id as usize];
            b.prev = old_tail;
            b.next = NIL;
        }
        if old_tail == NIL {
            self.head = id;
        } else {
            self.blocks[old_tail as usize].next = id;
        }
        self.tail = id;
        self.free += 1;
    }

    /// Makes `seq` hold blocks for `num_tokens` tokens, first re-using the cached prefix
    /// blocks named by `hashes[seq.ids.len()..hit_blocks]`. Returns false, changing
    /// nothing, when the free pool cannot cover the request.
    pub fn allocate(&mut self, seq: &mut SeqBlocks, hashes: &[u64], hit_blocks: usize, num_tokens: usize) -> bool {
        let have = seq.ids.len();
        let hits = hit_blocks.saturating_sub(have).min(hashes.len().saturating_sub(have));
        let hits_free = hashes[have.min(hashes.len())..][..hits]
            .iter()
            .filter_map(|h| self.cached.get(h))
            .filter(|id| self.blocks[**id as usize].refs == 0)
            .count();
        let want = num_tokens.div_ceil(self.block_size);
        let new = want.saturating_sub(have + hits);
        if new + hits_free > self.free {
            return false;
        }
        for i in 0..hits {
            let Some(&id) = self.cached.get(&hashes[have + i]) else {
                break;
            };
            if self.blocks[id as usize].refs == 0 {
                self.unlink(id);
            }
            self.blocks[id as usize].refs += 1;
            seq.ids.push(id);
            seq.cached = seq.ids.len();
        }
        for _ in 0..new {
            let id = self.head;
            self.unlink(id);
            if let Some(h) = self.blocks[id as usize].hash.take() {
                if self.cached.get(&h) == Some(&id) {
                    self.cached.remove(&h);
                    // One event per block, as vLLM's block pool sends them.
                    if let Some(events) = self.events.as_mut() {
                        events.push(KvEvent::BlockRemoved {
                            block_hashes: vec![BlockHash(h)],
                            medium: Some(Medium::Gpu),
                        });
                    }
                }
            }
            self.blocks[id as usize].refs = 1;
            seq.ids.push(id);
        }
        true
    }

    /// Registers the sequence's blocks that are full after `num_computed` tokens in the
    /// prefix cache. `tokens` (at least the computed ones) and `lora` name them in events.
    pub fn cache_full_blocks(
        &mut self,
        seq: &mut SeqBlocks,
        hashes: &[u64],
        tokens: &[u32],
        lora: Option<u32>,
        num_computed: usize,
    ) {
        if !self.caching {
            return;
        }
        let full = (num_computed / self.block_size).min(hashes.len()).min(seq.ids.len());
        let bs = self.block_size;
        // One BlockStored per run of blocks this call enters into the cache (a block whose
        // hash another block already holds is not entered, and not announced).
        let mut run: Option<(Option<BlockHash>, Vec<BlockHash>, Vec<u32>)> = None;
        while seq.cached < full {
            let i = seq.cached;
            let (id, h) = (seq.ids[i], hashes[i]);
            self.blocks[id as usize].hash = Some(h);
            let entered = !self.cached.contains_key(&h);
            self.cached.entry(h).or_insert(id);
            seq.cached += 1;
            if self.events.is_none() {
                continue;
            }
            match (&mut run, entered) {
                (Some((_, hs, ids)), true) => {
                    hs.push(BlockHash(h));
                    ids.extend_from_slice(&tokens[i * bs..(i + 1) * bs]);
                }
                (None, true) => {
                    let parent = i.checked_sub(1).map(|p| BlockHash(hashes[p]));
                    run = Some((parent, vec![BlockHash(h)], tokens[i * bs..(i + 1) * bs].to_vec()));
                }
                (Some(_), false) => self.push_stored(run.take(), lora),
                (None, false) => {}
            }
        }
        self.push_stored(run, lora);
    }

    fn push_stored(&mut self, run: Option<(Option<BlockHash>, Vec<BlockHash>, Vec<u32>)>, lora: Option<u32>) {
        let (Some(events), Some((parent, block_hashes, token_ids))) = (self.events.as_mut(), run) else { return };
        events.push(KvEvent::BlockStored {
            block_hashes,
            parent,
            token_ids,
            block_size: self.block_size as u32,
            lora_id: lora.map(i64::from),
            lora_name: None,
            medium: Some(Medium::Gpu),
        });
    }

    /// Drops the sequence's references, last block first, so its tail is evicted first.
    pub fn release(&mut self, seq: &mut SeqBlocks) {
        while let Some(id) = seq.ids.pop() {
            let b = &mut self.blocks[id as usize];
            b.refs -= 1;
            if b.refs == 0 {
                self.push_tail(id);
            }
        }
        seq.cached = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(tokens: &[u32], bs: usize) -> Vec<u64> {
        let mut h = Vec::new();
        extend_hashes(tokens, bs, 0, &mut h);
        h
    }

    #[test]
    fn allocation_fails_cleanly_when_pool_is_short() {
        let mut m = BlockManager::new(4, 4, true);
        let mut a = SeqBlocks::default();
        assert!(m.allocate(&mut a, &[], 0, 12));
        assert_eq!(m.free(), 1);
        let mut b = SeqBlocks::default();
        assert!(!m.allocate(&mut b, &[], 0, 8));
        assert!(b.ids.is_empty());
        assert_eq!(m.free(), 1);
        m.release(&mut a);
        assert_eq!(m.free(), 4);
        assert!(m.usage().abs() < 1e-9);
    }

    #[test]
    fn released_full_blocks_are_hit_by_the_same_prefix() {
        let tokens: Vec<u32> = (0..40).collect();
        let h = hashes(&tokens, 16);
        assert_eq!(h.len(), 2);
        let mut m = BlockManager::new(8, 16, true);
        let mut a = SeqBlocks::default();
        assert_eq!(m.cached_prefix(&h, 40), 0);
        assert!(m.allocate(&mut a, &h, 0, 40));
        m.cache_full_blocks(&mut a, &h, &tokens, None, 40);
        m.release(&mut a);
        assert_eq!(m.cached_prefix(&h, 40), 2);
        // a prompt of exactly 32 tokens may reuse only one block: the last token is recomputed
        assert_eq!(m.cached_prefix(&h, 32), 1);
        let mut b = SeqBlocks::default();
        assert!(m.allocate(&mut b, &h, 2, 40));
        assert_eq!(b.ids.len(), 3);
        assert_eq!(m.free(), 5);
        // a different prefix misses
        let other: Vec<u32> = (100..140).collect();
        assert_eq!(m.cached_prefix(&hashes(&other, 16), 40), 0);
    }

    #[test]
    fn shared_blocks_are_reference_counted() {
        let tokens: Vec<u32> = (0..33).collect();
        let h = hashes(&tokens, 16);
        let mut m = BlockManager::new(6, 16, true);
        let mut a = SeqBlocks::default();
        assert!(m.allocate(&mut a, &h, 0, 33));
        m.cache_full_blocks(&mut a, &h, &tokens, None, 33);
        let mut b = SeqBlocks::default();
        let hit = m.cached_prefix(&h, 33);
        assert_eq!(hit, 2);
        assert!(m.allocate(&mut b, &h, hit, 33));
        assert_eq!(m.free(), 6 - 3 - 1);
        m.release(&mut a);
        assert_eq!(m.free(), 6 - 3 - 1 + 1, "shared blocks stay referenced by b");
        m.release(&mut b);
        assert_eq!(m.free(), 6);
    }

    #[test]
    fn lru_evicts_oldest_free_block_first_and_forgets_its_hash() {
        let mut m = BlockManager::new(2, 4, true);
        let t1: Vec<u32> = vec![1, 1, 1, 1, 9];
        let t2: Vec<u32> = vec![2, 2, 2, 2, 9];
        let (h1, h2) = (hashes(&t1, 4), hashes(&t2, 4));
        for (t, h) in [(&t1, &h1), (&t2, &h2)] {
            let mut s = SeqBlocks::default();
            assert!(m.allocate(&mut s, h, 0, 4));
            m.cache_full_blocks(&mut s, h, t, None, t.len());
            m.release(&mut s);
        }
        assert_eq!(m.cached_prefix(&h1, 5), 1);
        assert_eq!(m.cached_prefix(&h2, 5), 1);
        // one fresh block evicts the least recently freed: t1's
        let mut s = SeqBlocks::default();
        assert!(m.allocate(&mut s, &[], 0, 1));
        assert_eq!(m.cached_prefix(&h1, 5), 0);
        assert_eq!(m.cached_prefix(&h2, 5), 1);
    }

    #[test]
    fn events_name_stored_runs_with_their_tokens_and_parents_and_evictions() {
        let mut m = BlockManager::new(3, 4, true);
        m.enable_events();
        let t: Vec<u32> = (1..=9).collect();
        let h = hashes(&t, 4);
        let mut a = SeqBlocks::default();
        assert!(m.allocate(&mut a, &h, 0, 9));
        m.cache_full_blocks(&mut a, &h, &t, Some(3), 4);
        m.cache_full_blocks(&mut a, &h, &t, Some(3), 9);
        let stored = |hs: &[u64], parent: Option<u64>, ids: &[u32]| KvEvent::BlockStored {
            block_hashes: hs.iter().map(|h| BlockHash(*h)).collect(),
            parent: parent.map(BlockHash),
            token_ids: ids.to_vec(),
            block_size: 4,
            lora_id: Some(3),
            lora_name: None,
            medium: Some(Medium::Gpu),
        };
        assert_eq!(
            m.take_events(),
            [stored(&h[..1], None, &[1, 2, 3, 4]), stored(&h[1..2], Some(h[0]), &[5, 6, 7, 8])],
            "a block enters once it is full; the second names the first as parent"
        );
        m.release(&mut a);
        // The same prefix again: hits, nothing new to announce.
        let mut b = SeqBlocks::default();
        assert!(m.allocate(&mut b, &h, 2, 9));
        m.cache_full_blocks(&mut b, &h, &t, Some(3), 9);
        assert!(m.take_events().is_empty());
        m.release(&mut b);
        // Three fresh blocks take every free block, both cached ones among them.
        let mut c = SeqBlocks::default();
        assert!(m.allocate(&mut c, &[], 0, 12));
        let mut removed: Vec<BlockHash> = m
            .take_events()
            .into_iter()
            .flat_map(|e| match e {
                KvEvent::BlockRemoved { block_hashes, medium: Some(Medium::Gpu) } if block_hashes.len() == 1 => {
                    block_hashes
                }
                other => panic!("one BlockRemoved per block, as vLLM sends them: {other:?}"),
            })
            .collect();
        removed.sort();
        let mut want = vec![BlockHash(h[0]), BlockHash(h[1])];
        want.sort();
        assert_eq!(removed, want);
        // Off: nothing is recorded.
        let mut off = BlockManager::new(3, 4, true);
        let mut d = SeqBlocks::default();
        assert!(off.allocate(&mut d, &h, 0, 9));
        off.cache_full_blocks(&mut d, &h, &t, None, 9);
        assert!(off.take_events().is_empty());
    }

    #[test]
    fn caching_off_never_hits() {
        let tokens: Vec<u32> = (0..40).collect();
        let h = hashes(&tokens, 16);
        let mut m = BlockManager::new(8, 16, false);
        let mut a = SeqBlocks::default();
        assert!(m.allocate(&mut a, &h, 0, 40));
        m.cache_full_blocks(&mut a, &h, &tokens, None, 40);
        m.release(&mut a);
        assert_eq!(m.cached_prefix(&h, 40), 0);
    }
}
