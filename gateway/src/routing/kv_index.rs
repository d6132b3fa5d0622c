//! The KV block index: which engines hold which blocks of token ids, in which tier, kept
//! from the engines' own KV cache events (`BlockStored`, `BlockRemoved`, `AllBlocksCleared`;
//! [`flotilla_engine::kv_events`]) rather than guessed from what the gateway routed. Pure:
//! the subscriber feeds it batches, the router asks it how many leading tokens of a prompt
//! each engine holds.
//!
//! Keys are the gateway's own, so every gateway computes the same ones for the same prompt
//! and an engine's hash seed or algorithm never matters: block i of a sequence is keyed
//! `k_i = H(k_{i-1}, its token ids)` with `k_{-1} = H(SEED, lora)` ([`block_keys`], a fixed
//! 64-bit mix). A `BlockStored` names its first block's parent by the engine's hash; the
//! index keeps, per engine, the engine hash → key map of the blocks it holds, so it chains
//! the new blocks on the key it computed for the parent. A parent it never saw (a gap)
//! makes the event an orphan: counted, not indexed.
//!
//! ```text
//! engine e3: BlockStored{hashes [h7, h8], parent h6, tokens [..32], medium CPU}
//!   e3.hashes[h6] = k6  ->  k7 = H(k6, tokens[0..16]), k8 = H(k7, tokens[16..32])
//!   e3.hashes[h7] = (k7, tiers | CPU); holders[k7].offloaded |= bit(e3); same for h8
//! lookup(prompt keys k0 k1 k2 ...): per engine, the leading run on the GPU, then the
//!   run after it held in a slower tier; stop when no engine goes on
//! ```
//!
//! Tiers: vLLM names where a block lives (`medium`): `GPU` (or none: an engine without KV
//! offloading), `CPU` (host memory, from the offloading connector), `STORAGE`. A block can
//! be in several at once (offloading copies it, the GPU copy stays until evicted), and a
//! `BlockRemoved` names the tier it leaves: each (engine, block) entry keeps its set of
//! tiers and goes when the set is empty. A medium this index does not know is taken as the
//! slowest tier (with `STORAGE`). The lookup follows how vLLM uses the tiers: its
//! scheduler takes the leading blocks in its GPU prefix cache, then asks the KV connector
//! for the blocks after those (the offloading connector loads a contiguous run it holds),
//! so a block on the GPU after an offloaded-only one is not reused. vLLM's offloading
//! connector may announce one block's CPU copy in several chunks (a shared prefix that does
//! not end on a chunk boundary) and leaves counting them to consumers; the index does not
//! count, so the first removal drops the copy (an under-count: a lost preference, never a
//! block reported that is not there).
//!
//! `AllBlocksCleared` drops every tier of the engine. vLLM sends it (without a medium) when
//! its GPU prefix cache is reset; the offloading connector's cache is reset by the same call
//! when asked to (`reset_connector`), and that sends no event at all, so the index cannot
//! tell whether the CPU copies survived. Dropping them never leaves entries the engine no
//! longer has (no event would ever remove them), which would draw requests to an engine for
//! blocks it must compute after all; the price is a lost preference for copies that did
//! survive.
//!
//! Bounds: at most [`MAX_ENGINES`] engines per index (a bit each; more are not indexed and
//! counted), and `capacity` (engine, block) entries, whatever their tiers: past it the
//! oldest entries go first (insertion order), as an engine's own LRU would have evicted them
//! long before. Sequence numbers are tracked per engine: [`KvIndex::apply`] says when a
//! batch skipped some, and the subscriber asks the engine's replay socket for them.
//!
//! Speculation: a request just routed to an engine will leave its prompt's blocks there,
//! but the engine's `BlockStored` comes only after its prefill ran. [`KvIndex::speculate`]
//! counts those blocks as held on that engine's GPU until a deadline, so a burst sharing a
//! new prefix follows the first request instead of scattering. Bounded by `capacity` as well.

use std::collections::{HashMap, VecDeque};

use tokio::time::Instant;

use flotilla_engine::kv_events::{BlockHash, EventBatch, KvEvent, Medium};

/// Engines one index can follow (one bit each in a block's holder set).
pub const MAX_ENGINES: usize = 64;

const SEED: u64 = 0x6b76_2d69_6e64_6578; // "kv-index"

fn mix(mut h: u64, v: u64) -> u64 {
    h ^= v.wrapping_add(0x9e37_79b9_7f4a_7c15).wrapping_add(h << 6).wrapping_add(h >> 2);
    // splitmix64 finaliser: every input bit reaches every output bit.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn first_parent(lora: Option<i64>) -> u64 {
    mix(SEED, lora.map_or(0, |l| l as u64 ^ (1 << 63)))
}

fn key(parent: u64, tokens: &[u32]) -> u64 {
    tokens.iter().fold(parent, |h, t| mix(h, u64::from(*t)))
}

/// Sets `slot`'s bits of the block with `key` to the tiers it now holds it in (none: it
/// holds it no more; the block's record goes with its last holder).
fn mark(holders: &mut HashMap<u64, Holders>, key: u64, slot: u8, tiers: Tiers) {
    let bit = 1u64 << slot;
    let set = |mask: u64, on: bool| if on { mask | bit } else { mask & !bit };
    match holders.get_mut(&key) {
        Some(h) => {
            h.gpu = set(h.gpu, tiers.gpu());
            h.offloaded = set(h.offloaded, tiers.offloaded());
            if h.gpu | h.offloaded == 0 {
                holders.remove(&key);
            }
        }
        None if tiers != Tiers::default() => {
            holders.insert(key, Holders { gpu: set(0, tiers.gpu()), offloaded: set(0, tiers.offloaded()) });
        }
        None => {}
    }
}

/// The chained keys of every full block of `tokens` (at most `max_blocks`).
pub fn block_keys(tokens: &[u32], block_size: usize, lora: Option<i64>, max_blocks: usize) -> Vec<u64> {
    let mut prev = first_parent(lora);
    tokens
        .chunks_exact(block_size.max(1))
        .take(max_blocks)
        .map(|b| {
            prev = key(prev, b);
            prev
        })
        .collect()
}

/// The tiers an engine holds one block in (a bit each).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Tiers(u8);

impl Tiers {
    const GPU: Tiers = Tiers(1);
    const CPU: Tiers = Tiers(2);
    /// `STORAGE`, and any medium this index does not know: the slowest.
    const STORAGE: Tiers = Tiers(4);
    const ALL: Tiers = Tiers(u8::MAX);

    /// The tier an event's `medium` names (none: GPU, as vLLM without offloading sends).
    fn of(medium: Option<&Medium>) -> Tiers {
        match medium {
            None | Some(Medium::Gpu) => Tiers::GPU,
            Some(Medium::Cpu) => Tiers::CPU,
            Some(Medium::Storage | Medium::Other(_)) => Tiers::STORAGE,
        }
    }

    fn gpu(self) -> bool {
        self.0 & Tiers::GPU.0 != 0
    }

    /// Held in a tier slower than the GPU.
    fn offloaded(self) -> bool {
        self.0 & !Tiers::GPU.0 != 0
    }
}

/// One block an engine holds: the gateway's key, and where.
#[derive(Debug, Clone, Copy)]
struct Entry {
    key: u64,
    tiers: Tiers,
}

/// Which engines (bits by slot) hold one block, by tier.
#[derive(Debug, Clone, Copy, Default)]
struct Holders {
    gpu: u64,
    /// In a slower tier (CPU, storage), whether or not also on the GPU.
    offloaded: u64,
}

/// One followed engine.
#[derive(Debug, Default)]
struct EngineBlocks {
    slot: u8,
    /// The engine's block hash → the gateway's key and tiers, for the blocks it holds.
    hashes: HashMap<BlockHash, Entry>,
    /// The last sequence number applied.
    last_seq: Option<i64>,
}

/// What [`KvIndex::apply`] saw of the batch's place in the engine's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sequence {
    /// The next one (or the first seen).
    InOrder,
    /// Already applied (a replayed batch, or a duplicate): ignored.
    Duplicate,
    /// Batches `from..seq` were missed; this one was applied.
    Gap { from: i64 },
    /// The engine's numbering began again at 0 (it restarted): what it held before was
    /// dropped, this batch applied.
    Restarted,
}

/// Counters of what the index could not use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Skipped {
    /// `BlockStored` whose parent the index does not know.
    pub orphans: u64,
    /// Events of a block size other than the index's.
    pub block_size: u64,
    /// Batches from engines beyond [`MAX_ENGINES`].
    pub engines: u64,
    /// (engine, block) entries dropped to stay within the capacity.
    pub evicted: u64,
}

/// The index of one model's engines.
#[derive(Debug)]
pub struct KvIndex {
    block_size: usize,
    /// A `BlockStored` was seen: the block size is the engines' (until then, a guess).
    sized: bool,
    capacity: usize,
    engines: HashMap<String, EngineBlocks>,
    /// Which engines hold the block with this key, by tier.
    holders: HashMap<u64, Holders>,
    /// (slot, engine hash) in insertion order, for the capacity bound.
    order: VecDeque<(u8, BlockHash)>,
    entries: usize,
    skipped: Skipped,
    /// Speculative holders by key (bits by slot), and when each bit expires, oldest first.
    spec: HashMap<u64, u64>,
    spec_order: VecDeque<(Instant, u64, u8)>,
    /// The latest deadline of each speculative (key, slot).
    spec_until: HashMap<(u64, u8), Instant>,
}

impl KvIndex {
    /// An empty index of blocks of `block_size` tokens, holding at most `capacity`
    /// (engine, block) entries.
    pub fn new(block_size: usize, capacity: usize) -> Self {
        KvIndex {
            block_size: block_size.max(1),
            sized: false,
            capacity: capacity.max(1),
            engines: HashMap::new(),
            holders: HashMap::new(),
            order: VecDeque::new(),
            entries: 0,
            skipped: Skipped::default(),
            spec: HashMap::new(),
            spec_order: VecDeque::new(),
            spec_until: HashMap::new(),
        }
    }

    /// Tokens per block (the first `BlockStored`'s; the one given to [`KvIndex::new`] until then).
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// About how many bytes the index holds (its tables' capacities).
    pub fn approx_bytes(&self) -> usize {
        use std::mem::size_of;
        // a hash table's slot is its key and value, plus a control byte
        let per_engine: usize =
            self.engines.values().map(|e| e.hashes.capacity() * (size_of::<(BlockHash, Entry)>() + 1)).sum();
        per_engine
            + self.holders.capacity() * (size_of::<(u64, Holders)>() + 1)
            + self.order.capacity() * size_of::<(u8, BlockHash)>()
            + self.spec.capacity() * (8 + 8 + 1)
            + self.spec_order.capacity() * size_of::<(Instant, u64, u8)>()
            + self.spec_until.capacity() * (size_of::<((u64, u8), Instant)>() + 1)
    }

    /// (engine, block) entries held.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// What the index could not use so far.
    pub fn skipped(&self) -> Skipped {
        self.skipped
    }

    /// The engines followed.
    pub fn engines(&self) -> impl Iterator<Item = &str> {
        self.engines.keys().map(String::as_str)
    }

    fn slot_of(&mut self, engine: &str) -> Option<u8> {
        if let Some(e) = self.engines.get(engine) {
            return Some(e.slot);
        }
        let used: u64 = self.engines.values().fold(0, |m, e| m | 1 << e.slot);
        let slot = (0..MAX_ENGINES as u8).find(|s| used & (1 << s) == 0)?;
        self.engines.insert(engine.to_string(), EngineBlocks { slot, ..Default::default() });
        Some(slot)
    }

    /// Applies one batch of `engine`'s events with sequence number `seq`.
    pub fn apply(&mut self, engine: &str, seq: i64, batch: &EventBatch) -> Sequence {
        let Some(slot) = self.slot_of(engine) else {
            self.skipped.engines += 1;
            return Sequence::InOrder;
        };
        let e = self.engines.get_mut(engine).expect("slot_of inserted it");
        let order = match e.last_seq {
            Some(last) if seq == 0 && last > 0 => Sequence::Restarted,
            Some(last) if seq <= last => return Sequence::Duplicate,
            Some(last) if seq > last + 1 => Sequence::Gap { from: last + 1 },
            _ => Sequence::InOrder,
        };
        e.last_seq = Some(seq);
        if order == Sequence::Restarted {
            self.clear_engine(engine);
        }
        self.apply_events(engine, slot, batch);
        order
    }

    /// The first missed sequence number when `seq` would skip some (None: in order, a
    /// duplicate, or the first batch seen of `engine`). Asked before [`KvIndex::apply`], so
    /// the missed batches can be replayed first.
    pub fn gap(&self, engine: &str, seq: i64) -> Option<i64> {
        let last = self.engines.get(engine)?.last_seq?;
        (seq > last + 1).then_some(last + 1)
    }

    fn apply_events(&mut self, engine: &str, slot: u8, batch: &EventBatch) {
        for ev in &batch.events {
            match ev {
                KvEvent::BlockStored { block_hashes, parent, token_ids, block_size, lora_id, medium, .. } => {
                    if !self.sized && *block_size > 0 {
                        self.block_size = *block_size as usize;
                    }
                    self.sized = true;
                    if *block_size as usize != self.block_size {
                        self.skipped.block_size += 1;
                        continue;
                    }
                    let tier = Tiers::of(medium.as_ref());
                    self.stored(engine, block_hashes, *parent, token_ids, *lora_id, tier);
                }
                KvEvent::BlockRemoved { block_hashes, medium } => {
                    for h in block_hashes {
                        self.removed(engine, slot, *h, Tiers::of(medium.as_ref()));
                    }
                }
                KvEvent::AllBlocksCleared => self.clear_engine(engine),
                KvEvent::Other(_) => {}
            }
        }
        self.enforce_capacity();
    }

    fn stored(
        &mut self,
        engine: &str,
        hashes: &[BlockHash],
        parent: Option<BlockHash>,
        tokens: &[u32],
        lora: Option<i64>,
        tier: Tiers,
    ) {
        let e = self.engines.get_mut(engine).expect("known engine");
        let slot = e.slot;
        let mut prev = match parent {
            None => first_parent(lora),
            // the parent may be held in any tier: the engine's hashes are the same in all
            Some(p) => match e.hashes.get(&p) {
                Some(entry) => entry.key,
                None => {
                    self.skipped.orphans += 1;
                    return;
                }
            },
        };
        for (h, block) in hashes.iter().zip(tokens.chunks_exact(self.block_size)) {
            let k = key(prev, block);
            prev = k;
            let entry = match e.hashes.get_mut(h) {
                // another tier of a block the engine holds
                Some(entry) if entry.key == k => {
                    entry.tiers.0 |= tier.0;
                    *entry
                }
                // the engine names other tokens by a hash it used before: the old block went
                Some(entry) => {
                    mark(&mut self.holders, entry.key, slot, Tiers::default());
                    *entry = Entry { key: k, tiers: tier };
                    *entry
                }
                None => {
                    let entry = Entry { key: k, tiers: tier };
                    e.hashes.insert(*h, entry);
                    self.entries += 1;
                    self.order.push_back((slot, *h));
                    entry
                }
            };
            mark(&mut self.holders, k, slot, entry.tiers);
        }
    }

    /// Drops `engine`'s copies of block `h` in `tiers`; the entry goes with its last tier.
    fn removed(&mut self, engine: &str, slot: u8, h: BlockHash, tiers: Tiers) {
        let Some(e) = self.engines.get_mut(engine) else { return };
        let Some(entry) = e.hashes.get_mut(&h) else { return };
        entry.tiers.0 &= !tiers.0;
        let Entry { key, tiers: left } = *entry;
        if left == Tiers::default() {
            e.hashes.remove(&h);
            self.entries -= 1;
        }
        mark(&mut self.holders, key, slot, left);
    }

    fn enforce_capacity(&mut self) {
        while self.entries > self.capacity {
            let Some((slot, h)) = self.order.pop_front() else { break };
            let Some(name) = self.engines.iter().find(|(_, e)| e.slot == slot).map(|(n, _)| n.clone()) else {
                continue;
            };
            let before = self.entries;
            self.removed(&name, slot, h, Tiers::ALL);
            if self.entries < before {
                self.skipped.evicted += 1;
            }
        }
        if self.order.len() > 2 * self.capacity {
            // Entries removed by events leave stale queue slots behind: drop those.
            let engines = &self.engines;
            self.order.retain(|(slot, h)| engines.values().any(|e| e.slot == *slot && e.hashes.contains_key(h)));
        }
    }

    /// Forgets everything `engine` holds, in every tier, keeping it followed
    /// (`AllBlocksCleared`, a restart).
    pub fn clear_engine(&mut self, engine: &str) {
        let Some(e) = self.engines.get_mut(engine) else { return };
        for entry in e.hashes.values() {
            mark(&mut self.holders, entry.key, e.slot, Tiers::default());
        }
        self.entries -= e.hashes.len();
        e.hashes.clear();
    }

    /// Stops following `engine` (it left the endpoint table) and drops its entries.
    pub fn remove_engine(&mut self, engine: &str) {
        self.clear_engine(engine);
        let Some(e) = self.engines.remove(engine) else { return };
        // its slot may go to another engine: no speculation of this one may remain
        let bit = 1u64 << e.slot;
        self.spec.retain(|_, m| {
            *m &= !bit;
            *m != 0
        });
        self.spec_until.retain(|(_, s), _| *s != e.slot);
    }

    /// Counts `keys` as held by `engine` until `until` (a request was just routed there).
    pub fn speculate(&mut self, engine: &str, keys: &[u64], now: Instant, until: Instant) {
        self.expire_speculation(now);
        let Some(slot) = self.slot_of(engine) else { return };
        for &k in keys {
            *self.spec.entry(k).or_insert(0) |= 1 << slot;
            self.spec_order.push_back((until, k, slot));
            self.spec_until.insert((k, slot), until);
        }
        while self.spec_order.len() > self.capacity {
            let Some((_, k, slot)) = self.spec_order.pop_front() else { break };
            self.unspeculate(k, slot);
        }
    }

    fn unspeculate(&mut self, k: u64, slot: u8) {
        self.spec_until.remove(&(k, slot));
        if let Some(m) = self.spec.get_mut(&k) {
            *m &= !(1 << slot);
            if *m == 0 {
                self.spec.remove(&k);
            }
        }
    }

    /// Drops speculation whose deadline has passed.
    pub fn expire_speculation(&mut self, now: Instant) {
        while self.spec_order.front().is_some_and(|(until, _, _)| *until <= now) {
            let Some((_, k, slot)) = self.spec_order.pop_front() else { break };
            // a later speculation of the same (key, slot) keeps it
            if self.spec_until.get(&(k, slot)).is_none_or(|u| *u <= now) {
                self.unspeculate(k, slot);
            }
        }
    }

    /// For each of `engines` (in order), what it holds of the leading blocks of the prompt
    /// with these keys: first the run on its GPU (events, or speculation), then the run after
    /// it held in a slower tier, as vLLM reuses them ([`Held`]). An engine the index does not
    /// know holds none.
    pub fn held_by(&self, keys: &[u64], engines: &[&str]) -> Vec<Held> {
        let slots: Vec<Option<u8>> = engines.iter().map(|e| self.engines.get(*e).map(|b| b.slot)).collect();
        let mut out = vec![Held::default(); engines.len()];
        // engines still in their GPU run, and those past it, in their offloaded run
        let mut on_gpu: u64 = slots.iter().flatten().fold(0, |m, s| m | 1 << s);
        let mut offloaded: u64 = 0;
        for (i, k) in keys.iter().enumerate() {
            let real = self.holders.get(k).copied().unwrap_or_default();
            let spec = self.spec.get(k).copied().unwrap_or(0) & !real.gpu;
            let gpu = real.gpu | spec;
            offloaded = (offloaded | (on_gpu & !gpu)) & real.offloaded;
            on_gpu &= gpu;
            if on_gpu | offloaded == 0 {
                break;
            }
            for (j, s) in slots.iter().enumerate() {
                let Some(bit) = s.map(|s| 1u64 << s) else { continue };
                if on_gpu & bit != 0 {
                    out[j].blocks = i + 1;
                    out[j].speculative += usize::from(spec & bit != 0);
                } else if offloaded & bit != 0 {
                    out[j].blocks = i + 1;
                    out[j].offloaded += 1;
                }
            }
        }
        out
    }
}

/// What one engine holds of a prompt's leading blocks ([`KvIndex::held_by`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// Leading blocks the engine can reuse: its GPU run, then its offloaded run.
    pub blocks: usize,
    /// Of `blocks`, those after the GPU run, held in a slower tier (CPU, storage): loaded
    /// rather than computed. The first `blocks - offloaded` are on the GPU.
    pub offloaded: usize,
    /// Of the GPU run, blocks only speculated there (routed, not yet reported).
    pub speculative: usize,
}

/// Events for tests of this index and of the strategies that read it.
#[cfg(test)]
pub(crate) mod test_events {
    use super::*;

    /// A `BlockStored` of `hashes`, each block `tokens.len() / hashes.len()` tokens, on the
    /// GPU (no medium, as vLLM without offloading sends).
    pub fn stored(hashes: &[u64], parent: Option<u64>, tokens: &[u32]) -> KvEvent {
        stored_in(None, hashes, parent, tokens)
    }

    /// [`stored`] in the tier `medium` names.
    pub fn stored_in(medium: Option<Medium>, hashes: &[u64], parent: Option<u64>, tokens: &[u32]) -> KvEvent {
        KvEvent::BlockStored {
            block_hashes: hashes.iter().map(|h| BlockHash(*h)).collect(),
            parent: parent.map(BlockHash),
            token_ids: tokens.to_vec(),
            block_size: (tokens.len() / hashes.len().max(1)) as u32,
            lora_id: None,
            lora_name: None,
            medium,
        }
    }

    /// A `BlockRemoved` of `hashes` from the tier `medium` names.
    pub fn removed(hashes: &[u64], medium: Option<Medium>) -> KvEvent {
        KvEvent::BlockRemoved { block_hashes: hashes.iter().map(|h| BlockHash(*h)).collect(), medium }
    }

    pub fn batch(events: Vec<KvEvent>) -> EventBatch {
        EventBatch { ts: 0.0, events, dp_rank: None }
    }
}

#[cfg(test)]
mod tests {
    use super::test_events::{batch, removed, stored, stored_in};
    use super::*;
    use std::time::Duration;

    /// Every followed engine's leading blocks of the prompt (held or speculated), by name.
    fn held(ix: &KvIndex, keys: &[u64]) -> Vec<(String, usize)> {
        let names: Vec<&str> = ix.engines().collect();
        let mut v: Vec<(String, usize)> =
            names.iter().zip(ix.held_by(keys, &names)).map(|(n, h)| (n.to_string(), h.blocks)).collect();
        v.sort();
        v
    }

    /// (blocks, offloaded, speculative) of each engine, in the order given.
    fn tiers(ix: &KvIndex, keys: &[u64], engines: &[&str]) -> Vec<(usize, usize, usize)> {
        ix.held_by(keys, engines).iter().map(|h| (h.blocks, h.offloaded, h.speculative)).collect()
    }

    #[test]
    fn engines_hash_their_own_way_and_the_index_keys_by_tokens() {
        let mut ix = KvIndex::new(2, 100);
        // Two engines with different hash seeds store the same prefix [1 2 | 3 4]; e2 in two
        // events, the second naming the first block as parent by its own hash.
        assert_eq!(ix.apply("e1", 0, &batch(vec![stored(&[11, 12], None, &[1, 2, 3, 4])])), Sequence::InOrder);
        ix.apply("e2", 0, &batch(vec![stored(&[91], None, &[1, 2])]));
        ix.apply("e2", 1, &batch(vec![stored(&[92], Some(91), &[3, 4])]));
        let prompt = block_keys(&[1, 2, 3, 4, 5, 6, 7], 2, None, 64);
        assert_eq!(prompt.len(), 3, "full blocks only");
        assert_eq!(held(&ix, &prompt), [("e1".into(), 2), ("e2".into(), 2)]);
        // Another prompt sharing one block; an adapter's blocks are keyed apart.
        assert_eq!(held(&ix, &block_keys(&[1, 2, 9, 9], 2, None, 64)), [("e1".into(), 1), ("e2".into(), 1)]);
        assert_eq!(held(&ix, &block_keys(&[1, 2, 3, 4], 2, Some(1), 64)), [("e1".into(), 0), ("e2".into(), 0)]);
        assert_eq!(ix.entries(), 4);
    }

    #[test]
    fn removals_clears_and_departures_drop_entries() {
        let mut ix = KvIndex::new(2, 100);
        ix.apply("e1", 0, &batch(vec![stored(&[11, 12], None, &[1, 2, 3, 4])]));
        ix.apply("e2", 0, &batch(vec![stored(&[21, 22], None, &[1, 2, 3, 4])]));
        let keys = block_keys(&[1, 2, 3, 4], 2, None, 64);
        ix.apply("e1", 1, &batch(vec![removed(&[12], None)]));
        assert_eq!(held(&ix, &keys), [("e1".into(), 1), ("e2".into(), 2)], "e1 lost its second block");
        ix.apply("e2", 1, &batch(vec![KvEvent::AllBlocksCleared]));
        assert_eq!(held(&ix, &keys), [("e1".into(), 1), ("e2".into(), 0)]);
        ix.remove_engine("e1");
        assert_eq!(held(&ix, &keys), [("e2".into(), 0)]);
        assert_eq!((ix.entries(), ix.holders.len()), (0, 0), "nothing left behind");
    }

    #[test]
    fn gaps_duplicates_and_orphans_are_told_apart() {
        let mut ix = KvIndex::new(2, 100);
        assert_eq!(ix.apply("e1", 5, &batch(vec![])), Sequence::InOrder, "the first seen starts the count");
        assert_eq!(ix.apply("e1", 5, &batch(vec![])), Sequence::Duplicate);
        assert_eq!((ix.gap("e1", 6), ix.gap("e1", 8), ix.gap("e9", 8)), (None, Some(6), None));
        assert_eq!(ix.apply("e1", 8, &batch(vec![stored(&[12], Some(11), &[3, 4])])), Sequence::Gap { from: 6 });
        assert_eq!(ix.skipped().orphans, 1, "a parent never seen: not indexed");
        assert_eq!(ix.entries(), 0);
        let wrong = stored(&[13], None, &[1, 2, 3, 4]); // one block of 4 tokens
        ix.apply("e1", 9, &batch(vec![wrong]));
        assert_eq!(ix.skipped().block_size, 1);
    }

    #[test]
    fn a_restarted_engine_numbering_from_zero_starts_over() {
        let mut ix = KvIndex::new(2, 100);
        ix.apply("e1", 0, &batch(vec![stored(&[11], None, &[1, 2])]));
        ix.apply("e1", 1, &batch(vec![stored(&[12], Some(11), &[3, 4])]));
        assert_eq!(ix.entries(), 2);
        // the restarted engine's first batch: what it held before is gone
        assert_eq!(ix.apply("e1", 0, &batch(vec![stored(&[55], None, &[9, 9])])), Sequence::Restarted);
        assert_eq!(held(&ix, &block_keys(&[1, 2, 3, 4], 2, None, 8)), [("e1".into(), 0)]);
        assert_eq!(held(&ix, &block_keys(&[9, 9], 2, None, 8)), [("e1".into(), 1)]);
        assert_eq!(ix.apply("e1", 1, &batch(vec![])), Sequence::InOrder);
    }

    #[test]
    fn capacity_drops_the_oldest_and_engines_are_bounded() {
        let mut ix = KvIndex::new(1, 3);
        ix.apply("e1", 0, &batch(vec![stored(&[1, 2, 3, 4, 5], None, &[1, 2, 3, 4, 5])]));
        assert_eq!((ix.entries(), ix.skipped().evicted), (3, 2));
        // The first two blocks went: the chain from the start no longer matches.
        assert_eq!(held(&ix, &block_keys(&[1, 2, 3, 4, 5], 1, None, 64)), [("e1".into(), 0)]);
        let mut ix = KvIndex::new(1, 10_000);
        for i in 0..MAX_ENGINES + 3 {
            ix.apply(&format!("e{i}"), 0, &batch(vec![stored(&[1], None, &[7])]));
        }
        assert_eq!((ix.engines().count(), ix.skipped().engines), (MAX_ENGINES, 3));
        assert!(held(&ix, &block_keys(&[7], 1, None, 4)).iter().all(|(_, b)| *b == 1));
    }

    #[test]
    fn speculation_extends_what_events_say_until_its_deadline() {
        let mut ix = KvIndex::new(16, 100);
        let t0 = Instant::now();
        // the first event adopts the engines' block size
        ix.apply("e1", 0, &batch(vec![stored(&[1], None, &[1, 2])]));
        assert_eq!(ix.block_size(), 2);
        let keys = block_keys(&[1, 2, 3, 4, 5, 6], 2, None, 64);
        assert_eq!(tiers(&ix, &keys, &["e1", "e2", "nobody"]), [(1, 0, 0), (0, 0, 0), (0, 0, 0)]);
        ix.speculate("e1", &keys, t0, t0 + Duration::from_secs(2));
        ix.speculate("e2", &keys[..2], t0, t0 + Duration::from_secs(4));
        assert_eq!(tiers(&ix, &keys, &["e1", "e2"]), [(3, 0, 2), (2, 0, 2)], "(held, offloaded, speculative)");
        ix.expire_speculation(t0 + Duration::from_secs(3));
        assert_eq!(tiers(&ix, &keys, &["e1", "e2"]), [(1, 0, 0), (2, 0, 2)], "e1's guess expired, its event stays");
        // a renewed guess outlives the first one's deadline
        ix.speculate("e2", &keys[..1], t0, t0 + Duration::from_secs(10));
        ix.expire_speculation(t0 + Duration::from_secs(5));
        assert_eq!(tiers(&ix, &keys, &["e2"]), [(1, 0, 1)]);
        ix.remove_engine("e2");
        assert_eq!((ix.spec.len(), ix.spec_until.len()), (0, 0), "nothing of e2 left for the next in its slot");
    }

    #[test]
    fn speculation_is_bounded_by_the_capacity() {
        let mut ix = KvIndex::new(1, 10);
        let t0 = Instant::now();
        let keys = block_keys(&(0..50).collect::<Vec<u32>>(), 1, None, 64);
        ix.speculate("e1", &keys, t0, t0 + Duration::from_secs(60));
        assert!(ix.spec_order.len() <= 10 && ix.spec.len() <= 10);
        assert_eq!(ix.held_by(&keys, &["e1"]), [Held::default()], "the first blocks went first");
        assert!(ix.approx_bytes() > 0);
    }

    #[test]
    fn a_cpu_copy_comes_and_goes_beside_the_gpu_copy() {
        let mut ix = KvIndex::new(2, 100);
        let keys = block_keys(&[1, 2, 3, 4], 2, None, 64);
        ix.apply("e1", 0, &batch(vec![stored(&[11, 12], None, &[1, 2, 3, 4])]));
        // offloading copies both blocks to host memory: the same hashes, medium CPU
        ix.apply("e1", 1, &batch(vec![stored_in(Some(Medium::Cpu), &[11, 12], None, &[1, 2, 3, 4])]));
        assert_eq!(ix.entries(), 2, "one entry per (engine, block), whatever its tiers");
        assert_eq!(tiers(&ix, &keys, &["e1"]), [(2, 0, 0)], "on the GPU: no offloaded part");
        // the CPU copy is evicted: the GPU copy stays
        ix.apply("e1", 2, &batch(vec![removed(&[12], Some(Medium::Cpu))]));
        assert_eq!(tiers(&ix, &keys, &["e1"]), [(2, 0, 0)]);
        assert_eq!(ix.entries(), 2);
        // a CPU-only store of a block the engine does not hold adds it in that tier alone
        ix.apply("e1", 3, &batch(vec![stored_in(Some(Medium::Cpu), &[13], Some(12), &[5, 6])]));
        let longer = block_keys(&[1, 2, 3, 4, 5, 6], 2, None, 64);
        assert_eq!(tiers(&ix, &longer, &["e1"]), [(3, 1, 0)]);
        // removing a tier the block is not in changes nothing
        ix.apply("e1", 4, &batch(vec![removed(&[13], None)]));
        assert_eq!(tiers(&ix, &longer, &["e1"]), [(3, 1, 0)]);
        ix.apply("e1", 5, &batch(vec![removed(&[13], Some(Medium::Cpu))]));
        assert_eq!((tiers(&ix, &longer, &["e1"]), ix.entries()), (vec![(2, 0, 0)], 2), "its last tier: gone");
    }

    #[test]
    fn a_block_evicted_from_the_gpu_but_kept_offloaded_counts_as_offloaded() {
        let mut ix = KvIndex::new(2, 100);
        let keys = block_keys(&[1, 2, 3, 4, 5, 6], 2, None, 64);
        ix.apply("e1", 0, &batch(vec![stored(&[11, 12, 13], None, &[1, 2, 3, 4, 5, 6])]));
        ix.apply("e1", 1, &batch(vec![stored_in(Some(Medium::Cpu), &[11, 12, 13], None, &[1, 2, 3, 4, 5, 6])]));
        ix.apply("e2", 0, &batch(vec![stored(&[21, 22, 23], None, &[1, 2, 3, 4, 5, 6])]));
        // the GPU evicts the prompt's tail (vLLM frees a request's blocks last to first)
        ix.apply("e1", 2, &batch(vec![removed(&[13, 12], Some(Medium::Gpu))]));
        ix.apply("e2", 1, &batch(vec![removed(&[23, 22], None)]));
        assert_eq!(tiers(&ix, &keys, &["e1", "e2"]), [(3, 2, 0), (1, 0, 0)], "e1: 1 on the GPU, 2 loaded");
        // a storage tier, or a medium the index does not know, is offloaded too
        ix.apply("e2", 2, &batch(vec![stored_in(Some(Medium::Storage), &[22], Some(21), &[3, 4])]));
        ix.apply("e2", 3, &batch(vec![stored_in(Some(Medium::Other("disk".into())), &[23], Some(22), &[5, 6])]));
        assert_eq!(tiers(&ix, &keys, &["e2"]), [(3, 2, 0)]);
        // a block in two slow tiers loses one copy at a time
        ix.apply("e2", 4, &batch(vec![stored_in(Some(Medium::Cpu), &[22], Some(21), &[3, 4])]));
        ix.apply("e2", 5, &batch(vec![removed(&[22], Some(Medium::Storage))]));
        assert_eq!(tiers(&ix, &keys, &["e2"]), [(3, 2, 0)]);
        ix.apply("e2", 6, &batch(vec![removed(&[22], Some(Medium::Cpu))]));
        assert_eq!(tiers(&ix, &keys, &["e2"]), [(1, 0, 0)], "the run stops at the block no tier holds");
    }

    #[test]
    fn the_offloaded_run_follows_the_gpu_run_as_vllm_reuses_them() {
        let mut ix = KvIndex::new(1, 100);
        let t0 = Instant::now();
        let keys = block_keys(&[1, 2, 3, 4], 1, None, 64);
        // e1: GPU, CPU only, GPU only, GPU and CPU. vLLM takes its GPU prefix (block 0), then
        // the offloading connector loads the contiguous run it holds (block 1); block 2 is on
        // neither: the GPU copy after the gap is not reused.
        ix.apply("e1", 0, &batch(vec![stored(&[1, 2, 3, 4], None, &[1, 2, 3, 4])]));
        ix.apply("e1", 1, &batch(vec![stored_in(Some(Medium::Cpu), &[2], Some(1), &[2])]));
        ix.apply("e1", 2, &batch(vec![stored_in(Some(Medium::Cpu), &[4], Some(3), &[4])]));
        ix.apply("e1", 3, &batch(vec![removed(&[2], None)]));
        assert_eq!(tiers(&ix, &keys, &["e1"]), [(2, 1, 0)]);
        // a block both on the GPU and offloaded, after the GPU run, is loaded too
        ix.apply("e1", 4, &batch(vec![stored_in(Some(Medium::Cpu), &[3], Some(2), &[3])]));
        assert_eq!(tiers(&ix, &keys, &["e1"]), [(4, 3, 0)]);
        // a request routed there will hold the prompt on the GPU: speculation is GPU
        ix.speculate("e1", &keys, t0, t0 + Duration::from_secs(5));
        assert_eq!(tiers(&ix, &keys, &["e1"]), [(4, 0, 1)], "block 1 only speculated onto the GPU");
    }

    #[test]
    fn clears_capacity_and_restarts_drop_every_tier() {
        let mut ix = KvIndex::new(1, 3);
        let keys = block_keys(&[1, 2], 1, None, 64);
        ix.apply("e1", 0, &batch(vec![stored(&[1, 2], None, &[1, 2])]));
        ix.apply("e1", 1, &batch(vec![stored_in(Some(Medium::Cpu), &[1, 2], None, &[1, 2])]));
        ix.apply("e1", 2, &batch(vec![removed(&[1, 2], None)]));
        assert_eq!(tiers(&ix, &keys, &["e1"]), [(2, 2, 0)], "only the CPU copies are left");
        // vLLM's AllBlocksCleared has no medium; the CPU copies go too (module doc)
        ix.apply("e1", 3, &batch(vec![KvEvent::AllBlocksCleared]));
        assert_eq!((tiers(&ix, &keys, &["e1"]), ix.entries(), ix.holders.len()), (vec![(0, 0, 0)], 0, 0));
        // capacity: an entry goes with all its tiers
        ix.apply("e1", 4, &batch(vec![stored_in(Some(Medium::Cpu), &[1, 2], None, &[1, 2])]));
        ix.apply("e1", 5, &batch(vec![stored(&[1, 2], None, &[1, 2]), stored(&[3, 4], None, &[7, 8])]));
        assert_eq!((ix.entries(), ix.skipped().evicted), (3, 1));
        assert_eq!(tiers(&ix, &keys, &["e1"]), [(0, 0, 0)], "the oldest block went from both tiers");
        assert_eq!(ix.apply("e1", 0, &batch(vec![])), Sequence::Restarted);
        assert_eq!((ix.entries(), ix.holders.len()), (0, 0));
    }
}
