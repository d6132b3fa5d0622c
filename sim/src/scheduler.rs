//! Pure step decisions, vLLM V1 style: which sequences run in the next step and with how
//! many tokens, and what each step produced. No clock, no I/O: [`Scheduler::schedule`]
//! plans a step, the engine waits the step's simulated time, then
//! [`Scheduler::complete`] applies it and reports tokens and finished sequences.
//!
//! ```text
//!            +--------- preempted (recompute: blocks freed, progress reset) ---------+
//!            v                                                                       |
//! add -> waiting --admit (token budget, max_num_seqs, LoRA slots, KV blocks)--> running --> finished
//!            ^  LoRA-deferred requests keep their place at the queue's head          |
//! ```
//!
//! * Running sequences are served first, in order; each gets its remaining tokens up to the
//!   step's token budget (chunked prefill). When blocks run out, the last running sequence
//!   is preempted (vLLM's recompute policy) until the allocation fits.
//! * Waiting sequences are admitted in FCFS order only in steps without preemption. Their
//!   longest cached prefix of full blocks is reused (prefix caching). A request whose
//!   adapter would exceed `max_loras` distinct adapters in the batch is skipped, not failed.

use std::collections::VecDeque;

use crate::id_map::IdMap;
use crate::kv::{self, BlockManager, SeqBlocks};
use crate::latency::StepShape;
use crate::text;

/// Identity of a sequence (one request, n = 1).
pub type SeqId = u64;

/// Why a sequence ended (the `finished_reason` label of vLLM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence or a stop string.
    Stop,
    /// `max_tokens` or the context limit reached.
    Length,
    /// The client went away or the engine shut down.
    Abort,
}

impl FinishReason {
    /// The OpenAI / vLLM spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// A request as the scheduler needs it.
#[derive(Debug, Clone)]
pub struct NewSeq {
    /// Identity.
    pub id: SeqId,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// Generate this many tokens then end with `stop` (None: never, as with ignore_eos).
    pub eos_after: Option<u32>,
    /// Seed of the generated text.
    pub seed: u64,
    /// LoRA adapter id, if any.
    pub lora: Option<u32>,
    /// Leading prompt tokens whose KV was pulled from a prefill engine (P/D): installed as
    /// computed at first admission, never more than `prompt_len - 1`.
    pub external_tokens: usize,
    /// Keep the KV blocks when the sequence finishes (a P/D prefill): see [`Scheduler::held`].
    pub hold_kv: bool,
}

/// A finished sequence's KV kept for a decode engine to pull (P/D), until released.
#[derive(Debug)]
pub struct Held {
    blocks: SeqBlocks,
    /// Its computed tokens (prompt, as the blocks hold them).
    pub tokens: Vec<u32>,
}

impl Held {
    /// The block ids holding it.
    pub fn block_ids(&self) -> &[u32] {
        &self.blocks.ids
    }
}

#[derive(Debug)]
struct Seq {
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: u32,
    eos_after: Option<u32>,
    seed: u64,
    lora: Option<u32>,
    computed: usize,
    blocks: SeqBlocks,
    hashes: Vec<u64>,
    preemptions: u32,
    cached_tokens: usize,
    external_tokens: usize,
    hold_kv: bool,
    admitted_once: bool,
}

/// Limits the scheduler enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most sequences per batch.
    pub max_num_seqs: usize,
    /// Most tokens per step.
    pub max_num_batched_tokens: usize,
    /// Most distinct adapters per batch.
    pub max_loras: usize,
    /// Context limit.
    pub max_model_len: usize,
}

/// One sequence's part in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    /// Which sequence.
    pub id: SeqId,
    /// Tokens it computes this step.
    pub tokens: usize,
}

/// The decision for one step.
#[derive(Debug, Default, Clone)]
pub struct StepPlan {
    /// Sequences and token counts, in batch order.
    pub scheduled: Vec<Scheduled>,
    /// What the latency model needs.
    pub shape: StepShape,
    /// Sequences admitted from waiting this step, with their prefix-cache hit in tokens;
    /// `true` when it is their first admission (not a resume after preemption).
    pub admitted: Vec<(SeqId, usize, bool)>,
    /// Sequences preempted this step.
    pub preempted: Vec<SeqId>,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_queries: u64,
    /// Of those, tokens found.
    pub prefix_hits: u64,
    /// Prompt tokens of admitted P/D decode requests (the KV connector's queries).
    pub external_queries: u64,
    /// Of those, tokens installed from a KV transfer.
    pub external_hits: u64,
    /// Waiting requests skipped for lack of a LoRA slot.
    pub deferred: usize,
}

impl StepPlan {
    /// True when nothing runs.
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }
}

/// What a finished sequence did, for request metrics and `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub output_tokens: u32,
    /// Prompt tokens served from the prefix cache or a KV transfer at first admission
    /// (vLLM's `num_cached_tokens`).
    pub cached_tokens: u32,
    /// Of those, tokens pulled from a prefill engine (P/D).
    pub external_tokens: u32,
    /// Times preempted.
    pub preemptions: u32,
}

/// What a completed step produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A new token of a sequence (`index` counts from 0).
    Token {
        /// Which sequence.
        id: SeqId,
        /// Output position.
        index: u32,
        /// The token's text.
        piece: &'static str,
    },
    /// A sequence ended; its blocks are released.
    Finished {
        /// Which sequence.
        id: SeqId,
        /// Why.
        reason: FinishReason,
        /// Its counts.
        summary: Summary,
    },
}

/// Waiting and running queues over a block manager.
#[derive(Debug)]
pub struct Scheduler {
    limits: Limits,
    kv: BlockManager,
    seqs: IdMap<Seq>,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    deferred: usize,
    skipped: VecDeque<SeqId>,
    loras: Vec<u32>,
    held: IdMap<Held>,
}

impl Scheduler {
    /// An empty scheduler over `kv`.
    pub fn new(limits: Limits, kv: BlockManager) -> Self {
        Scheduler {
            limits,
            kv,
            seqs: IdMap::default(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            deferred: 0,
            skipped: VecDeque::new(),
            loras: Vec::new(),
            held: IdMap::default(),
        }
    }

    /// Queues a request at the tail of the waiting queue.
    pub fn add(&mut self, new: NewSeq) {
        let prompt_len = new.prompt.len();
        let mut tokens = new.prompt;
        let cap = (prompt_len + new.max_tokens as usize).min(self.limits.max_model_len);
        tokens.reserve_exact(cap.saturating_sub(tokens.len()));
        self.seqs.insert(
            new.id,
            Seq {
                tokens,
                prompt_len,
                max_tokens: new.max_tokens,
                eos_after: new.eos_after,
                seed: new.seed,
                lora: new.lora,
                computed: 0,
                blocks: SeqBlocks::default(),
                hashes: Vec::new(),
                preemptions: 0,
                cached_tokens: 0,
                external_tokens: new.external_tokens,
                hold_kv: new.hold_kv,
                admitted_once: false,
            },
        );
        self.waiting.push_back(new.id);
    }

    /// Removes a sequence wherever it is, releasing its blocks.
    pub fn abort(&mut self, id: SeqId) -> Option<Summary> {
        let mut seq = self.seqs.remove(&id)?;
        self.running.retain(|r| *r != id);
        self.waiting.retain(|w| *w != id);
        self.kv.release(&mut seq.blocks);
        Some(summary(&seq))
    }

    /// Sequences in the batch.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Sequences queued (including preempted ones).
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Waiting sequences skipped in the last step for lack of a LoRA slot.
    pub fn num_deferred(&self) -> usize {
        self.deferred.min(self.waiting.len())
    }

    /// No sequence at all.
    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    /// The block manager, for its events.
    pub fn kv_mut(&mut self) -> &mut BlockManager {
        &mut self.kv
    }

    /// The block manager, for usage figures.
    pub fn kv(&self) -> &BlockManager {
        &self.kv
    }

    /// Distinct adapters of the last planned step, in batch order.
    pub fn batch_loras(&self) -> &[u32] {
        &self.loras
    }

    /// Distinct adapters among running and waiting sequences, in first-seen order.
    pub fn lora_sets(&self, running: &mut Vec<u32>, waiting: &mut Vec<u32>) {
        running.clear();
        waiting.clear();
        let collect = |id: &SeqId, out: &mut Vec<u32>| {
            if let Some(l) = self.seqs.get(id).and_then(|s| s.lora) {
                if !out.contains(&l) {
                    out.push(l);
                }
            }
        };
        self.running.iter().for_each(|id| collect(id, running));
        self.waiting.iter().for_each(|id| collect(id, waiting));
    }

    fn preempt_last(&mut self, plan: &mut StepPlan) -> Option<SeqId> {
        let victim = self.running.pop()?;
        if let Some(seq) = self.seqs.get_mut(&victim) {
            self.kv.release(&mut seq.blocks);
            seq.computed = 0;
            seq.preemptions += 1;
        }
        self.waiting.push_front(victim);
        plan.preempted.push(victim);
        Some(victim)
    }

    /// Plans the next step into `plan` (cleared first).
    pub fn schedule(&mut self, plan: &mut StepPlan) {
        plan.scheduled.clear();
        plan.admitted.clear();
        plan.preempted.clear();
        plan.shape = StepShape::default();
        plan.prefix_queries = 0;
        plan.prefix_hits = 0;
        plan.external_queries = 0;
        plan.external_hits = 0;
        plan.deferred = 0;
        self.loras.clear();
        let mut budget = self.limits.max_num_batched_tokens;

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let Some(seq) = self.seqs.get(&id) else {
                self.running.remove(i);
                continue;
            };
            let n = (seq.tokens.len() - seq.computed).min(budget);
            let mut preempted_self = false;
            while let Some(seq) = self.seqs.get_mut(&id) {
                let want = seq.computed + n;
                if self.kv.allocate(&mut seq.blocks, &[], 0, want) {
                    break;
                }
                if self.preempt_last(plan) == Some(id) || self.running.is_empty() {
                    preempted_self = true;
                    break;
                }
            }
            if preempted_self {
                break;
            }
            self.push_scheduled(id, n, plan);
            budget -= n;
            i += 1;
        }

        if plan.preempted.is_empty() {
            self.admit_waiting(budget, plan);
        }
        self.deferred = plan.deferred;
    }

    fn admit_waiting(&mut self, mut budget: usize, plan: &mut StepPlan) {
        let bs = self.kv.block_size();
        while budget > 0 && self.running.len() < self.limits.max_num_seqs {
            let Some(id) = self.waiting.pop_front() else {
                break;
            };
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue;
            };
            if let Some(l) = seq.lora {
                if self.loras.len() >= self.limits.max_loras && !self.loras.contains(&l) {
                    self.skipped.push_back(id);
                    plan.deferred += 1;
                    continue;
                }
            }
            kv::extend_hashes(&seq.tokens, bs, u64::from(seq.lora.unwrap_or(0)), &mut seq.hashes);
            let hit_blocks = self.kv.cached_prefix(&seq.hashes, seq.tokens.len());
            let hit = hit_blocks * bs;
            // Pulled KV beyond the local hit is installed as computed (vLLM's external
            // tokens), all but the last prompt token: computed again to sample the next one,
            // as vLLM's scheduler does after a load of the whole prompt.
            let (pulled, ext) = if seq.admitted_once {
                (0, 0)
            } else {
                let upto = |n: usize| seq.external_tokens.min(n).saturating_sub(hit);
                (upto(seq.prompt_len), upto(seq.prompt_len.saturating_sub(1)))
            };
            let n = (seq.tokens.len() - hit - ext).min(budget);
            if !self.kv.allocate(&mut seq.blocks, &seq.hashes, hit_blocks, hit + ext + n) {
                self.waiting.push_front(id);
                break;
            }
            seq.computed = hit + ext;
            let first = !seq.admitted_once;
            if first {
                // vLLM's counters (taken at admission) count the whole load as cached and
                // external, the recomputed last token included: a pulled prompt shows no
                // `local_compute` tokens (held to real vLLM by realvllm/tests/samples.rs).
                seq.admitted_once = true;
                seq.cached_tokens = hit + pulled;
                if seq.external_tokens > 0 {
                    plan.external_queries += seq.tokens.len() as u64;
                    plan.external_hits += pulled as u64;
                }
                seq.external_tokens = pulled;
            }
            plan.prefix_queries += seq.tokens.len() as u64;
            plan.prefix_hits += hit as u64;
            plan.admitted.push((id, hit, first));
            self.running.push(id);
            self.push_scheduled(id, n, plan);
            budget -= n;
        }
        while let Some(id) = self.skipped.pop_back() {
            self.waiting.push_front(id);
        }
    }

    fn push_scheduled(&mut self, id: SeqId, n: usize, plan: &mut StepPlan) {
        let Some(seq) = self.seqs.get(&id) else {
            return;
        };
        let decode = n == 1 && seq.computed + 1 == seq.tokens.len() && seq.tokens.len() > seq.prompt_len;
        if decode {
            plan.shape.decode_seqs += 1;
        } else {
            plan.shape.prefill_tokens += n as u32;
        }
        plan.shape.kv_blocks += seq.blocks.ids.len() as u32;
        if let Some(l) = seq.lora {
            if !self.loras.contains(&l) {
                self.loras.push(l);
            }
        }
        plan.shape.loras = self.loras.len() as u32;
        plan.scheduled.push(Scheduled { id, tokens: n });
    }

    /// Applies a planned step: advances progress, samples tokens for sequences whose
    /// tokens are all computed, finishes those at a limit, and appends what happened.
    pub fn complete(&mut self, plan: &StepPlan, out: &mut Vec<Output>) {
        let bs = self.kv.block_size();
        for s in &plan.scheduled {
            let Some(seq) = self.seqs.get_mut(&s.id) else {
                continue;
            };
            seq.computed += s.tokens;
            kv::extend_hashes(&seq.tokens[..seq.computed], bs, u64::from(seq.lora.unwrap_or(0)), &mut seq.hashes);
            self.kv.cache_full_blocks(&mut seq.blocks, &seq.hashes, &seq.tokens, seq.lora, seq.computed);
            if seq.computed < seq.tokens.len() {
                continue; // a prefill chunk: no token yet
            }
            let index = (seq.tokens.len() - seq.prompt_len) as u32;
            let (piece, token_id) = text::token(seq.seed, index);
            seq.tokens.push(token_id);
            out.push(Output::Token { id: s.id, index, piece });
            let produced = index + 1;
            let reason = if seq.eos_after.is_some_and(|n| produced >= n) {
                Some(FinishReason::Stop)
            } else if produced >= seq.max_tokens || seq.tokens.len() >= self.limits.max_model_len {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(reason) = reason {
                if let Some(summary) = self.finish(s.id) {
                    out.push(Output::Finished { id: s.id, reason, summary });
                }
            }
        }
    }

    /// Ends a sequence (at a limit, or a stop string matched): releases its blocks, or
    /// holds them under its id when it asked to (`hold_kv`); returns its counts.
    pub fn finish(&mut self, id: SeqId) -> Option<Summary> {
        if !self.seqs.get(&id).is_some_and(|s| s.hold_kv) {
            return self.abort(id);
        }
        let mut seq = self.seqs.remove(&id)?;
        self.running.retain(|r| *r != id);
        self.waiting.retain(|w| *w != id);
        let s = summary(&seq);
        seq.tokens.truncate(seq.computed);
        self.held.insert(id, Held { blocks: std::mem::take(&mut seq.blocks), tokens: seq.tokens });
        Some(s)
    }

    /// The KV a finished `hold_kv` sequence left behind, until [`Scheduler::release_held`].
    pub fn held(&self, id: SeqId) -> Option<&Held> {
        self.held.get(&id)
    }

    /// Frees held KV (pulled, or its lease expired); false if none is held under `id`.
    pub fn release_held(&mut self, id: SeqId) -> bool {
        match self.held.remove(&id) {
            Some(mut h) => {
                self.kv.release(&mut h.blocks);
                true
            }
            None => false,
        }
    }
}

fn summary(seq: &Seq) -> Summary {
    Summary {
        prompt_tokens: seq.prompt_len as u32,
        output_tokens: (seq.tokens.len() - seq.prompt_len) as u32,
        cached_tokens: seq.cached_tokens as u32,
        external_tokens: if seq.admitted_once { seq.external_tokens as u32 } else { 0 },
        preemptions: seq.preemptions,
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
