//! Randomized tests: histories recorded from a real sequential store under simulated
//! concurrency, latency and lost answers must pass; corrupting one read must be caught.

use std::collections::HashMap;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

use super::*;

struct Sim {
    clients: u32,
    ops_per_client: usize,
    keys: usize,
    /// Chance that an op gets no answer (it then takes effect in time, late, or never).
    p_unanswered: f64,
    /// Draw values from a few strings (repeats) instead of unique ones.
    few_values: bool,
}

/// Runs `sim` against one sequential store with a global revision counter: each client issues
/// ops one after another; each op takes effect at a random instant between its invocation and
/// its answer (or, unanswered, later or never), and the store applies them in that order.
fn simulate(sim: &Sim, rng: &mut StdRng) -> Vec<Op> {
    let mut history = Vec::new();
    let mut effects: Vec<(u64, usize)> = Vec::new();
    for client in 0..sim.clients {
        let mut now = rng.random_range(0..20);
        for n in 0..sim.ops_per_client {
            let invoke = now + rng.random_range(0..30);
            let at = invoke + rng.random_range(0..=60);
            let complete = at + rng.random_range(0..=60);
            let unanswered = rng.random_bool(sim.p_unanswered);
            let value = match sim.few_values {
                true => ["x", "y", "z"].choose(rng).unwrap().to_string(),
                false => format!("c{client}-{n}"),
            };
            let call = match rng.random_range(0..10) {
                0..4 => Call::Read,
                4..7 => Call::Write { value },
                // The expected revision is filled in when the CAS takes effect.
                7..9 => Call::Cas { expected_revision: rng.random_range(0..3), value },
                _ => Call::Delete,
            };
            let effect = match (unanswered, rng.random_range(0..3)) {
                (false, _) | (true, 0) => Some(at),
                (true, 1) => Some(invoke + rng.random_range(500..5000)),
                (true, _) => None,
            };
            if let Some(effect) = effect {
                effects.push((effect, history.len()));
            }
            let key = format!("k{}", rng.random_range(0..sim.keys));
            history.push(Op { client, key, call, ret: Ret::Indeterminate, invoke, complete: Some(complete) });
            if unanswered {
                history.last_mut().unwrap().complete = None;
                now = invoke + 200; // the client's timeout
            } else {
                now = complete;
            }
        }
    }
    effects.sort_unstable();
    let mut store: HashMap<String, Versioned> = HashMap::new();
    let mut revision = 0;
    for (_, i) in effects {
        let op = &mut history[i];
        let current = store.get(&op.key).map_or(0, |v| v.revision);
        op.ret = match &mut op.call {
            Call::Read => Ret::Read(store.get(&op.key).cloned()),
            Call::Write { value } => {
                revision += 1;
                store.insert(op.key.clone(), Versioned { value: value.clone(), revision });
                Ret::Written(revision)
            }
            Call::Cas { expected_revision, value } => {
                if rng.random_bool(0.6) {
                    *expected_revision = current;
                } else if rng.random_bool(0.5) {
                    *expected_revision = rng.random_range(0..=revision + 1);
                }
                if *expected_revision == current {
                    revision += 1;
                    store.insert(op.key.clone(), Versioned { value: value.clone(), revision });
                    Ret::CasOk(revision)
                } else {
                    Ret::CasConflict
                }
            }
            Call::Delete => {
                revision += 1; // like etcd; the checker does not assume either way
                store.remove(&op.key);
                Ret::Deleted
            }
        };
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
    let mut rng = StdRng::seed_from_u64(7);
    let sim = Sim { clients: 8, ops_per_client: 200, keys: 5, p_unanswered: 0.02, few_values: false };
    let history = simulate(&sim, &mut rng);
    let started = Instant::now();
    let result = check(&history);
    println!("checked {} ops on {} keys in {:?}", result.ops_checked, result.keys_checked, started.elapsed());
    assert!(result.ok, "{result}");
    assert_eq!(result.keys_checked, 5);
}

#[test]
fn tmp_probe() {
    for (p, keys, few) in [(0.05, 5, false), (0.1, 5, false), (0.2, 5, false), (0.1, 1, false), (0.1, 5, true), (0.0, 1, true)] {
        for seed in 0..3 {
            let mut rng = StdRng::seed_from_u64(seed);
            let sim = Sim { clients: 8, ops_per_client: 200, keys, p_unanswered: p, few_values: few };
            let history = simulate(&sim, &mut rng);
            let started = Instant::now();
            let result = check(&history);
            println!("p={p} keys={keys} few={few} seed={seed}: ok={} anomalies={} in {:?}", result.ok, result.anomalies.len(), started.elapsed());
        }
    }
}
