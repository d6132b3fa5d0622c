//! Unit tests of the pure scheduler: batching, chunked prefill, prefix reuse, preemption,
//! LoRA slot deferral. No runtime.

use super::*;

fn limits(seqs: usize, tokens: usize, loras: usize) -> Limits {
    Limits { max_num_seqs: seqs, max_num_batched_tokens: tokens, max_loras: loras, max_model_len: 4096 }
}

fn seq(id: SeqId, prompt_len: u32, max_tokens: u32) -> NewSeq {
    NewSeq {
        id,
        prompt: (0..prompt_len).map(|t| t + id as u32 * 10_000).collect(),
        max_tokens,
        eos_after: None,
        seed: id,
        lora: None,
        external_tokens: 0,
        hold_kv: false,
    }
}

/// Runs steps until idle or `max_steps`; returns (steps, outputs, preemptions seen).
fn drain(s: &mut Scheduler, max_steps: usize) -> (usize, Vec<Output>, usize) {
    let mut plan = StepPlan::default();
    let mut out = Vec::new();
    let mut preempted = 0;
    for step in 0..max_steps {
        if s.is_idle() {
            return (step, out, preempted);
        }
        s.schedule(&mut plan);
        assert!(!plan.is_empty(), "a busy scheduler always makes progress");
        preempted += plan.preempted.len();
        s.complete(&plan, &mut out);
    }
    (max_steps, out, preempted)
}

fn finished(out: &[Output]) -> Vec<(SeqId, FinishReason, Summary)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Finished { id, reason, summary } => Some((*id, *reason, *summary)),
            _ => None,
        })
        .collect()
}

#[test]
fn decode_batches_all_running_sequences_in_one_step() {
    let mut s = Scheduler::new(limits(8, 4096, 1), BlockManager::new(100, 16, true));
    for id in 0..4 {
        s.add(seq(id, 20, 3));
    }
    let mut plan = StepPlan::default();
    let mut out = Vec::new();
    s.schedule(&mut plan);
    assert_eq!(plan.shape.prefill_tokens, 80);
    assert_eq!(plan.shape.decode_seqs, 0);
    s.complete(&plan, &mut out);
    assert_eq!(out.len(), 4, "prefill completes and samples the first token");
    s.schedule(&mut plan);
    assert_eq!(plan.shape.decode_seqs, 4);
    assert_eq!(plan.shape.prefill_tokens, 0);
    let (_, out, _) = drain(&mut s, 10);
    let f = finished(&out);
    assert_eq!(f.len(), 4);
    assert!(f.iter().all(|(_, r, sm)| *r == FinishReason::Length && sm.output_tokens == 3));
}

#[test]
fn long_prompts_are_chunked_by_the_token_budget() {
    let mut s = Scheduler::new(limits(8, 64, 1), BlockManager::new(100, 16, true));
    s.add(seq(1, 150, 1));
    let mut plan = StepPlan::default();
    let mut out = Vec::new();
    let mut chunks = Vec::new();
    while !s.is_idle() {
        s.schedule(&mut plan);
        chunks.push(plan.scheduled[0].tokens);
        s.complete(&plan, &mut out);
    }
    assert_eq!(chunks, vec![64, 64, 22]);
    assert_eq!(out.iter().filter(|o| matches!(o, Output::Token { .. })).count(), 1);
}

#[test]
fn max_num_seqs_keeps_the_rest_waiting() {
    let mut s = Scheduler::new(limits(2, 4096, 1), BlockManager::new(100, 16, true));
    for id in 0..5 {
        s.add(seq(id, 10, 5));
    }
    let mut plan = StepPlan::default();
    s.schedule(&mut plan);
    assert_eq!(s.num_running(), 2);
    assert_eq!(s.num_waiting(), 3);
    let (_, out, _) = drain(&mut s, 100);
    assert_eq!(finished(&out).len(), 5);
}

#[test]
fn repeated_prefix_is_served_from_cache() {
    let mut s = Scheduler::new(limits(8, 4096, 1), BlockManager::new(100, 16, true));
    let prompt: Vec<u32> = (0..100).collect();
    let mk = |id| NewSeq {
        id,
        prompt: prompt.clone(),
        max_tokens: 2,
        eos_after: None,
        seed: 1,
        lora: None,
        external_tokens: 0,
        hold_kv: false,
    };
    s.add(mk(1));
    drain(&mut s, 10);
    s.add(mk(2));
    let mut plan = StepPlan::default();
    s.schedule(&mut plan);
    assert_eq!(plan.prefix_queries, 100);
    assert_eq!(plan.prefix_hits, 96, "six full blocks of 16");
    assert_eq!(plan.shape.prefill_tokens, 4);
    let mut out = Vec::new();
    s.complete(&plan, &mut out);
    let (_, out, _) = drain(&mut s, 10);
    assert_eq!(finished(&out)[0].2.cached_tokens, 96);
}

#[test]
fn kv_exhaustion_preempts_the_newest_and_everyone_finishes() {
    // 12 blocks of 16 = 192 tokens; four requests that grow to 16 + 48 = 64 tokens each
    let mut s = Scheduler::new(limits(8, 4096, 1), BlockManager::new(12, 16, true));
    for id in 0..4 {
        s.add(seq(id, 16, 48));
    }
    let (steps, out, preempted) = drain(&mut s, 10_000);
    assert!(steps < 10_000);
    assert!(preempted > 0, "growth past the pool must preempt");
    let f = finished(&out);
    assert_eq!(f.len(), 4);
    assert!(f.iter().all(|(_, r, sm)| *r == FinishReason::Length && sm.output_tokens == 48));
    assert!(f.iter().any(|(_, _, sm)| sm.preemptions > 0));
    assert_eq!(s.kv().free(), 12, "all blocks back");
}

#[test]
fn preempted_output_is_identical_to_unpreempted() {
    let run = |blocks| {
        let mut s = Scheduler::new(limits(8, 4096, 1), BlockManager::new(blocks, 16, true));
        for id in 0..4 {
            s.add(seq(id, 16, 48));
        }
        let (_, out, preempted) = drain(&mut s, 10_000);
        let mut toks: Vec<_> = out
            .into_iter()
            .filter_map(|o| match o {
                Output::Token { id, index, piece } => Some((id, index, piece)),
                _ => None,
            })
            .collect();
        toks.sort();
        (toks, preempted)
    };
    let (a, pa) = run(12);
    let (b, pb) = run(100);
    assert!(pa > 0 && pb == 0);
    assert_eq!(a, b);
}

#[test]
fn more_adapters_than_slots_wait_instead_of_failing() {
    let mut s = Scheduler::new(limits(8, 4096, 1), BlockManager::new(100, 16, true));
    for id in 0..3 {
        let mut n = seq(id, 10, 4);
        n.lora = Some(id as u32 + 1);
        s.add(n);
    }
    let mut plan = StepPlan::default();
    s.schedule(&mut plan);
    assert_eq!(plan.scheduled.len(), 1, "one slot: one adapter per batch");
    assert_eq!(plan.deferred, 2);
    assert_eq!(s.num_deferred(), 2);
    assert_eq!(plan.shape.loras, 1);
    assert_eq!(s.batch_loras(), &[1]);
    let (_, out, _) = drain(&mut s, 100);
    let order: Vec<_> = finished(&out).iter().map(|f| f.0).collect();
    assert_eq!(order.len(), 3);
}

#[test]
fn same_adapter_requests_share_a_slot() {
    let mut s = Scheduler::new(limits(8, 4096, 1), BlockManager::new(100, 16, true));
    for id in 0..3 {
        let mut n = seq(id, 10, 4);
        n.lora = Some(7);
        s.add(n);
    }
    s.add(seq(9, 10, 4));
    let mut plan = StepPlan::default();
    s.schedule(&mut plan);
    assert_eq!(plan.scheduled.len(), 4);
}

#[test]
fn eos_ends_with_stop_and_abort_releases_blocks() {
    let mut s = Scheduler::new(limits(8, 4096, 1), BlockManager::new(100, 16, true));
    let mut n = seq(1, 10, 100);
    n.eos_after = Some(5);
    s.add(n);
    s.add(seq(2, 40, 100));
    let mut plan = StepPlan::default();
    let mut out = Vec::new();
    s.schedule(&mut plan);
    s.complete(&plan, &mut out);
    let before = s.kv().free();
    let sm = s.abort(2).unwrap();
    assert_eq!(sm.output_tokens, 1);
    assert!(s.kv().free() > before);
    let (_, out, _) = drain(&mut s, 100);
    let f = finished(&out);
    assert_eq!(
        f,
        vec![(
            1,
            FinishReason::Stop,
            Summary { prompt_tokens: 10, output_tokens: 5, cached_tokens: 0, external_tokens: 0, preemptions: 0 }
        )]
    );
}

#[test]
fn held_kv_outlives_the_sequence_until_released() {
    let mut s = Scheduler::new(limits(8, 4096, 1), BlockManager::new(16, 4, true));
    s.add(NewSeq { hold_kv: true, ..seq(1, 10, 1) });
    let (_, out, _) = drain(&mut s, 10);
    assert!(matches!(out.last(), Some(Output::Finished { id: 1, reason: FinishReason::Length, .. })));
    assert!(s.is_idle());
    let held = s.held(1).expect("held after finishing");
    assert_eq!(held.tokens, seq(1, 10, 1).prompt, "the computed tokens: the prompt");
    assert_eq!(held.block_ids().len(), 3);
    assert_eq!(s.kv().free(), 13, "held blocks are not free, so not evictable");
    assert!(s.release_held(1));
    assert!(!s.release_held(1));
    assert_eq!(s.kv().free(), 16);
}

#[test]
fn external_tokens_are_computed_at_admission_but_the_last_prompt_token() {
    let mut s = Scheduler::new(limits(8, 4096, 1), BlockManager::new(16, 4, true));
    s.add(NewSeq { external_tokens: 10, ..seq(1, 10, 1) });
    let mut plan = StepPlan::default();
    s.schedule(&mut plan);
    assert_eq!(plan.scheduled, [Scheduled { id: 1, tokens: 1 }], "only the last prompt token is computed");
    // counted as vLLM counts them: the whole prompt came from the transfer
    assert_eq!((plan.external_queries, plan.external_hits), (10, 10));
    let mut out = Vec::new();
    s.complete(&plan, &mut out);
    let Some(Output::Finished { summary, .. }) = out.last() else { panic!("{out:?}") };
    assert_eq!((summary.cached_tokens, summary.external_tokens), (10, 10));
}
