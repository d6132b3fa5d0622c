//! Randomized tests: histories recorded from a real sequential store under simulated
//! concurrency, latency and lost answers must pass; corrupting one read must be caught.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use tokio::time::Instant;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

use super::*;

pub(super) struct Sim {
    pub clients: u32,
    pub ops_per_client: usize,
    pub keys: usize,
    /// Chance that an op gets no answer (it then takes effect in time, late, or never).
    pub p_unanswered: f64,
    /// Draw values from a few strings (repeats) instead of unique ones.
    pub few_values: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// A client sends its next op.
    Invoke(u32),
    /// An op takes effect in the store.
    Effect(usize),
    /// An op's answer reaches its client.
    Answer(usize),
}

/// Runs `sim` against one sequential store with a global revision counter, as a discrete-event
/// simulation: each client issues ops one after another (a CAS usually expects the revision the
/// client last saw for the key, sometimes a guess); each op takes effect at a random instant
/// between its invocation and its answer, or, unanswered, in time, late or never.
pub(super) fn simulate(sim: &Sim, rng: &mut StdRng) -> Vec<Op> {
    let mut history: Vec<Op> = Vec::new();
    let mut queue: BinaryHeap<Reverse<(u64, u64, Event)>> = BinaryHeap::new();
    let mut seq = 0;
    let mut schedule = |queue: &mut BinaryHeap<_>, at: u64, event: Event| {
        seq += 1;
        queue.push(Reverse((at, seq, event)));
    };
    for client in 0..sim.clients {
        schedule(&mut queue, rng.random_range(0..20), Event::Invoke(client));
    }
    let mut issued = vec![0; sim.clients as usize];
    let mut seen: Vec<HashMap<String, u64>> = vec![HashMap::new(); sim.clients as usize];
    let mut store: HashMap<String, Versioned> = HashMap::new();
    let mut revision = 0;
    while let Some(Reverse((now, _, event))) = queue.pop() {
        match event {
            Event::Invoke(client) => {
                let c = client as usize;
                if issued[c] == sim.ops_per_client {
                    continue;
                }
                issued[c] += 1;
                let key = format!("k{}", rng.random_range(0..sim.keys));
                let value = match sim.few_values {
                    true => ["x", "y", "z"].choose(rng).unwrap().to_string(),
                    false => format!("c{client}-{}", issued[c]),
                };
                let known = seen[c].get(&key).copied().unwrap_or(0);
                let call = match rng.random_range(0..10) {
                    0..4 => Call::Read,
                    4..7 => Call::Write { value },
                    7..9 if rng.random_bool(0.8) => Call::Cas { expected_revision: known, value },
                    7..9 => Call::Cas { expected_revision: rng.random_range(0..=revision + 1), value },
                    _ => Call::Delete,
                };
                let op = history.len();
                let at = now + rng.random_range(0..=60);
                let answered_at = at + rng.random_range(0..=60);
                let answered = !rng.random_bool(sim.p_unanswered);
                history.push(Op { client, key, call, ret: Ret::Indeterminate, invoke: now, complete: None });
                if answered {
                    schedule(&mut queue, at, Event::Effect(op));
                    schedule(&mut queue, answered_at, Event::Answer(op));
                } else {
                    match rng.random_range(0..3) {
                        0 => schedule(&mut queue, at, Event::Effect(op)),
                        1 => schedule(&mut queue, now + rng.random_range(500..5000), Event::Effect(op)),
                        _ => {} // never
                    }
                    schedule(&mut queue, now + 200, Event::Invoke(client)); // the client's timeout
                }
            }
            Event::Effect(op) => {
                let op = &mut history[op];
                let current = store.get(&op.key).map_or(0, |v| v.revision);
                op.ret = match &op.call {
                    Call::Read => Ret::Read(store.get(&op.key).cloned()),
                    Call::Write { value } => {
                        revision += 1;
                        store.insert(op.key.clone(), Versioned { value: value.clone(), revision });
                        Ret::Written(revision)
                    }
                    Call::Cas { expected_revision, value } if *expected_revision == current => {
                        revision += 1;
                        store.insert(op.key.clone(), Versioned { value: value.clone(), revision });
                        Ret::CasOk(revision)
                    }
                    Call::Cas { .. } => Ret::CasConflict,
                    Call::Delete => {
                        revision += 1; // like etcd; the checker does not assume either way
                        store.remove(&op.key);
                        Ret::Deleted
                    }
                };
            }
            Event::Answer(op) => {
                let op = &mut history[op];
                op.complete = Some(now);
                let c = op.client as usize;
                match &op.ret {
                    Ret::Read(seen_value) => {
                        seen[c].insert(op.key.clone(), seen_value.as_ref().map_or(0, |v| v.revision));
                    }
                    Ret::Written(rev) | Ret::CasOk(rev) => {
                        seen[c].insert(op.key.clone(), *rev);
                    }
                    Ret::Deleted => {
                        seen[c].insert(op.key.clone(), 0);
                    }
                    Ret::CasConflict | Ret::Indeterminate => {}
                }
                schedule(&mut queue, now + rng.random_range(0..30), Event::Invoke(op.client));
            }
        }
    }
    for op in &mut history {
        if op.complete.is_none() {
            op.ret = Ret::Indeterminate;
        }
    }
    history
}

/// Makes one answered read return a value that an acknowledged later write had already
/// replaced before the read began; returns the read's index, or `None` if no read qualifies.
fn corrupt_one_read(history: &mut [Op], rng: &mut StdRng) -> Option<usize> {
    let mut choices = Vec::new();
    for (r, read) in history.iter().enumerate() {
        let (Call::Read, Some(_)) = (&read.call, read.complete) else { continue };
        let newest_before = history
            .iter()
            .filter(|w| w.key == read.key && w.complete.is_some_and(|c| c < read.invoke))
            .filter_map(|w| w.acknowledged_write().map(|v| v.revision))
            .max();
        let Some(newest_before) = newest_before else { continue };
        for w in history.iter().filter(|w| w.key == read.key) {
            if let Some(old) = w.acknowledged_write().filter(|v| v.revision < newest_before) {
                choices.push((r, old));
            }
        }
    }
    let (r, old) = choices.choose(rng)?.clone();
    history[r].ret = Ret::Read(Some(old));
    Some(r)
}

/// Makes one answered read that found a value find the key absent instead, where an
/// acknowledged write finished before the read began and no delete can fall in between.
/// Revisions say nothing about absence, so only the search can catch this.
fn vanish_one_read(history: &mut [Op], rng: &mut StdRng) -> Option<usize> {
    let same_key = |a: &Op, b: &Op| a.key == b.key;
    let choices: Vec<usize> = (0..history.len())
        .filter(|&r| {
            let read = &history[r];
            matches!((&read.call, &read.ret, read.complete), (Call::Read, Ret::Read(Some(_)), Some(_)))
                && history.iter().any(|w| {
                    same_key(w, read)
                        && w.acknowledged_write().is_some()
                        && w.complete.is_some_and(|c| c < read.invoke)
                        && !history.iter().any(|d| {
                            same_key(d, read)
                                && d.call == Call::Delete
                                && d.invoke <= read.complete.unwrap()
                                && d.complete.is_none_or(|c| c >= w.invoke)
                        })
                })
        })
        .collect();
    let r = *choices.choose(rng)?;
    history[r].ret = Ret::Read(None);
    Some(r)
}

#[test]
fn histories_of_a_real_register_are_linearizable_and_a_corrupted_read_is_not() {
    let (mut stale, mut vanished) = (0, 0);
    for seed in 0..40 {
        let mut rng = StdRng::seed_from_u64(seed);
        let sim = Sim {
            clients: rng.random_range(2..6),
            ops_per_client: rng.random_range(10..40),
            keys: rng.random_range(1..4),
            p_unanswered: [0.0, 0.05, 0.2].choose(&mut rng).copied().unwrap(),
            few_values: rng.random_bool(0.3),
        };
        let history = simulate(&sim, &mut rng);
        let result = check(&history);
        assert!(result.ok, "seed {seed}: {result}\n{}", serde_json::to_string(&history).unwrap());
        let lost = lost_writes(&history);
        assert!(lost.is_empty(), "seed {seed}: {lost:?}");

        for (kind, corrupt) in
            [("stale", corrupt_one_read as fn(&mut [Op], &mut StdRng) -> _), ("vanished", vanish_one_read)]
        {
            let mut history = history.clone();
            let Some(r) = corrupt(&mut history, &mut rng) else { continue };
            let result = check(&history);
            assert!(!result.ok, "seed {seed}: {kind} read #{r} went unnoticed");
            assert_eq!(result.anomalies.len(), 1, "seed {seed}: {result}");
            assert!(result.anomalies[0].is_violation(), "seed {seed}: {result}");
            assert_eq!(result.anomalies[0].key(), history[r].key, "seed {seed}");
            assert!(!lost_writes(&history).is_empty(), "seed {seed}: {kind} read #{r} shows a lost write");
            let Anomaly::NotLinearizable { explanation, .. } = &result.anomalies[0] else { unreachable!() };
            match kind {
                "stale" => {
                    stale += 1;
                    assert!(explanation.starts_with(&format!("#{r} read")), "seed {seed}: {result}");
                }
                _ => {
                    vanished += 1;
                    assert!(explanation.starts_with("no order of its ops"), "seed {seed}: {result}");
                }
            }
            if seed < 2 {
                println!("seed {seed}, {kind} read #{r}:\n{result}");
            }
        }
    }
    assert!(stale >= 30 && vanished >= 20, "too few reads to corrupt: {stale} stale, {vanished} vanished");
}

#[test]
fn eight_clients_two_hundred_ops_five_keys_check_quickly() {
    // Bounded by the step budget either way; the times are printed, not asserted.
    for p_unanswered in [0.0, 0.05, 0.2] {
        let mut rng = StdRng::seed_from_u64(7);
        let sim = Sim { clients: 8, ops_per_client: 200, keys: 5, p_unanswered, few_values: false };
        let history = simulate(&sim, &mut rng);
        let started = Instant::now();
        let result = check(&history);
        let unanswered = history.iter().filter(|op| op.is_indeterminate()).count();
        println!(
            "checked {} ops ({unanswered} unanswered) on {} keys in {:?}",
            result.ops_checked,
            result.keys_checked,
            started.elapsed()
        );
        assert!(result.ok, "{result}");
        assert_eq!(result.keys_checked, 5);
    }
}
