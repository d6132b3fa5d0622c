//! Property tests of the gateway's pure QoS decisions: the per-model [`FairQueue`] (strict
//! priority between classes, per-tenant FIFO, virtual token counter fairness, shedding) and
//! the tenant [`Limits`] (sliding-window RPM and TPM), for arbitrary arrival sequences.
//!
//! ```text
//!  ops (push/pop/remove/shed/charge) ──> FairQueue  ═ compared step by step ═  plain model
//!  arrivals over time ──> Limits::admit/record_tokens ──> counts per window ≤ bounds
//! ```
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use flotilla_api::spec::{PriorityClass, TenantSpec};
use flotilla_gateway::limits::Limits;
use flotilla_gateway::qos::{FairQueue, Waiter};
use proptest::prelude::*;
use tokio::time::Instant;

const TENANTS: [&str; 5] = ["a", "b", "c", "d", "e"];

fn class() -> impl Strategy<Value = PriorityClass> {
    prop::sample::select(vec![PriorityClass::Critical, PriorityClass::Standard, PriorityClass::Sheddable])
}

fn rank(c: PriorityClass) -> usize {
    match c {
        PriorityClass::Critical => 0,
        PriorityClass::Standard => 1,
        PriorityClass::Sheddable => 2,
    }
}

#[derive(Debug, Clone)]
enum Op {
    Push {
        class: PriorityClass,
        tenant: usize,
        cost: u64,
    },
    Pop,
    /// Remove the n-th (modulo) request still queued.
    Remove(usize),
    Shed(PriorityClass),
    Charge {
        tenant: usize,
        delta: i64,
    },
}

fn cost() -> impl Strategy<Value = u64> {
    prop_oneof![8 => 1u64..2000, 1 => Just(0u64), 1 => any::<u64>()]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (class(), 0..TENANTS.len(), cost()).prop_map(|(class, tenant, cost)| Op::Push { class, tenant, cost }),
        4 => Just(Op::Pop),
        1 => any::<usize>().prop_map(Op::Remove),
        1 => class().prop_map(Op::Shed),
        1 => (0..TENANTS.len(), prop_oneof![-500i64..500, any::<i64>()])
            .prop_map(|(tenant, delta)| Op::Charge { tenant, delta }),
    ]
}

/// What the queue holds, kept by the test: (id, class, tenant) in arrival order.
#[derive(Default)]
struct Model {
    queued: Vec<(u64, PriorityClass, String)>,
}

impl Model {
    fn waiting_in(&self, class: PriorityClass) -> impl Iterator<Item = &(u64, PriorityClass, String)> {
        self.queued.iter().filter(move |(_, c, _)| *c == class)
    }
    fn best_class(&self) -> Option<PriorityClass> {
        self.queued.iter().map(|(_, c, _)| *c).min_by_key(|c| rank(*c))
    }
    fn take(&mut self, id: u64) -> (u64, PriorityClass, String) {
        let at = self.queued.iter().position(|(i, _, _)| *i == id).expect("the model holds it");
        self.queued.remove(at)
    }
}

proptest! {
    // 256 cases unless PROPTEST_CASES says otherwise.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// Every step agrees with the rules: strict priority, FIFO per tenant and class, the
    /// lowest counter next, no credit for idling, shedding the newest of the lowest class,
    /// nothing lost or duplicated, no panic (costs and charges up to the integer limits).
    #[test]
    fn fair_queue_follows_its_rules(ops in prop::collection::vec(op(), 0..200)) {
        let mut q: FairQueue<u64> = FairQueue::default();
        let mut m = Model::default();
        let mut next_id = 0u64;
        for op in ops {
            match op {
                Op::Push { class, tenant, cost } => {
                    let t = TENANTS[tenant].to_owned();
                    let idle = !m.queued.iter().any(|(_, _, x)| *x == t);
                    let min_waiting = m.queued.iter().map(|(_, _, x)| q.counter(x)).min();
                    let before = q.counter(&t);
                    q.push(Waiter { id: next_id, class, tenant: t.clone(), cost, payload: next_id });
                    if idle {
                        // Coming back from idle lifts the counter to the lowest one waiting.
                        prop_assert_eq!(q.counter(&t), min_waiting.map_or(before, |m| m.max(before)));
                    } else {
                        prop_assert_eq!(q.counter(&t), before);
                    }
                    m.queued.push((next_id, class, t));
                    next_id += 1;
                }
                Op::Pop => {
                    let peeked = q.peek().map(|w| w.id);
                    let counters: BTreeMap<String, i64> =
                        TENANTS.iter().map(|t| (t.to_string(), q.counter(t))).collect();
                    let got = q.pop();
                    prop_assert_eq!(got.as_ref().map(|w| w.id), peeked);
                    let Some(w) = got else {
                        prop_assert!(m.queued.is_empty());
                        continue;
                    };
                    prop_assert_eq!(w.payload, w.id);
                    // Strict priority: nothing of a higher class was waiting.
                    prop_assert_eq!(Some(w.class), m.best_class());
                    // The tenant with the lowest counter in the class goes (ties by name)...
                    let best = m.waiting_in(w.class).map(|(_, _, t)| (counters[t], t.clone())).min().expect("waiting");
                    prop_assert_eq!(&best.1, &w.tenant);
                    // ...with its oldest request of that class, and is charged its cost.
                    let oldest = m.waiting_in(w.class).find(|(_, _, t)| *t == w.tenant).map(|(i, _, _)| *i);
                    prop_assert_eq!(Some(w.id), oldest);
                    let cost = i64::try_from(w.cost).unwrap_or(i64::MAX);
                    prop_assert_eq!(q.counter(&w.tenant), counters[&w.tenant].saturating_add(cost));
                    m.take(w.id);
                }
                Op::Remove(n) => {
                    if m.queued.is_empty() {
                        prop_assert!(q.remove(n as u64 + next_id).is_none());
                        continue;
                    }
                    let id = m.queued[n % m.queued.len()].0;
                    prop_assert_eq!(q.remove(id).map(|w| w.id), Some(id));
                    prop_assert!(q.remove(id).is_none());
                    m.take(id);
                }
                Op::Shed(below) => {
                    let below_it = m.queued.iter().filter(|(_, c, _)| rank(*c) > rank(below));
                    let lowest = below_it.map(|(_, c, _)| rank(*c)).max();
                    let newest_of = |r| m.queued.iter().filter(|(_, c, _)| rank(*c) == r).map(|(i, _, _)| *i).max();
                    let expect = lowest.and_then(newest_of);
                    let shed = q.shed_below(below);
                    prop_assert_eq!(shed.as_ref().map(|w| w.id), expect);
                    if let Some(w) = shed {
                        prop_assert!(rank(w.class) > rank(below));
                        m.take(w.id);
                    }
                }
                Op::Charge { tenant, delta } => {
                    let before = q.counter(TENANTS[tenant]);
                    q.charge(TENANTS[tenant], delta);
                    let after = q.counter(TENANTS[tenant]);
                    prop_assert!(after == before || after == before.saturating_add(delta));
                }
            }
            prop_assert_eq!(q.len(), m.queued.len());
            prop_assert_eq!(q.is_empty(), m.queued.is_empty());
        }
        // Draining returns exactly what is left, each once.
        let mut left: BTreeSet<u64> = m.queued.iter().map(|(i, _, _)| *i).collect();
        while let Some(w) = q.pop() {
            prop_assert!(left.remove(&w.id), "{} popped but not queued", w.id);
        }
        prop_assert!(left.is_empty());
    }

    /// Tenants backlogged from the start in one class are served within one request's cost
    /// of each other (in tokens), whatever the mix of request sizes.
    #[test]
    fn backlogged_tenants_share_tokens_within_one_request(
        backlogs in prop::collection::vec(prop::collection::vec(1u64..=1000, 1..30), 2..5),
        class in class(),
    ) {
        let max_cost = backlogs.iter().flatten().copied().max().unwrap_or(1) as i64;
        let mut q: FairQueue<()> = FairQueue::default();
        let mut id = 0;
        for (t, costs) in backlogs.iter().enumerate() {
            for &cost in costs {
                q.push(Waiter { id, class, tenant: TENANTS[t].into(), cost, payload: () });
                id += 1;
            }
        }
        let mut remaining: Vec<usize> = backlogs.iter().map(Vec::len).collect();
        let mut served = vec![0i64; backlogs.len()];
        while remaining.iter().all(|r| *r > 0) {
            let w = q.pop().expect("backlogged");
            let t = TENANTS.iter().position(|x| *x == w.tenant).expect("known tenant");
            served[t] += w.cost as i64;
            remaining[t] -= 1;
            let (lo, hi) = (served.iter().min().unwrap(), served.iter().max().unwrap());
            prop_assert!(hi - lo <= max_cost, "served {:?}, max cost {}", served, max_cost);
        }
    }

    /// A tenant arriving at a busy queue (one class, costs of at least one token, no
    /// corrections) is served within one request of every other waiting tenant.
    #[test]
    fn a_newcomer_waits_at_most_one_turn_per_tenant(
        backlogs in prop::collection::vec(prop::collection::vec(1u64..=1000, 1..20), 1..4),
        served_first in 0usize..40,
        newcomer_cost in 1u64..=1000,
        class in class(),
    ) {
        let mut q: FairQueue<()> = FairQueue::default();
        let mut id = 0;
        for (t, costs) in backlogs.iter().enumerate() {
            for &cost in costs {
                q.push(Waiter { id, class, tenant: TENANTS[t].into(), cost, payload: () });
                id += 1;
            }
        }
        for _ in 0..served_first {
            q.pop();
        }
        let others = backlogs.len();
        q.push(Waiter { id: u64::MAX, class, tenant: "newcomer".into(), cost: newcomer_cost, payload: () });
        let mut turns = 0;
        loop {
            let w = q.pop().expect("the newcomer is still queued");
            if w.id == u64::MAX {
                break;
            }
            turns += 1;
            prop_assert!(turns <= others, "the newcomer waited {} turns behind {} tenants", turns, others);
        }
    }

    /// Critical requests are never served after a sheddable one that was queued with them.
    #[test]
    fn sheddable_never_overtakes_critical(
        arrivals in prop::collection::vec((class(), 0..TENANTS.len(), cost()), 1..60),
    ) {
        let mut q: FairQueue<()> = FairQueue::default();
        for (id, (class, tenant, cost)) in arrivals.iter().enumerate() {
            q.push(Waiter { id: id as u64, class: *class, tenant: TENANTS[*tenant].into(), cost: *cost, payload: () });
        }
        let order: Vec<PriorityClass> = std::iter::from_fn(|| q.pop().map(|w| w.class)).collect();
        prop_assert_eq!(order.len(), arrivals.len());
        prop_assert!(order.windows(2).all(|p| rank(p[0]) <= rank(p[1])), "{:?}", order);
    }
}

// ---------------------------------------------------------------------------------------
// Limits.

#[derive(Debug, Clone)]
enum Arrival {
    /// After `gap_ms`, a request of tenant `t`.
    Request { gap_ms: u64, t: usize },
    /// After `gap_ms`, tenant `t` finished a response of `tokens` tokens.
    Tokens { gap_ms: u64, t: usize, tokens: u64 },
}

fn arrival() -> impl Strategy<Value = Arrival> {
    let gap = prop_oneof![6 => 0u64..2_000, 2 => 0u64..70_000, 1 => 0u64..200_000];
    prop_oneof![
        6 => (gap.clone(), 0usize..2).prop_map(|(gap_ms, t)| Arrival::Request { gap_ms, t }),
        1 => (gap, 0usize..2, prop_oneof![0u64..500, any::<u64>()])
            .prop_map(|(gap_ms, t, tokens)| Arrival::Tokens { gap_ms, t, tokens }),
    ]
}

fn spec(rpm: u64, tpm: u64) -> TenantSpec {
    TenantSpec {
        rpm,
        tpm,
        priority: PriorityClass::Standard,
        models: vec![],
        api_keys: vec![],
        max_concurrent_requests: None,
        keys: vec![],
    }
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// Admissions stay within the sliding-window bound: at most `limit` per fixed minute, so
    /// at most twice the limit in any 60 s, and at most `(k + 1) * limit` in any k minutes.
    /// A denial names the limit that applied and a retry in 1-60 s; nothing panics.
    #[test]
    fn rpm_is_never_exceeded(
        rpm in 1u64..40,
        replicas in 0u32..4,
        arrivals in prop::collection::vec(arrival(), 1..300),
    ) {
        let limits = Limits::new(replicas);
        let share = (rpm / u64::from(replicas.max(1))).max(1);
        let t0 = Instant::now();
        let mut now = t0;
        let mut admitted: [VecDeque<Duration>; 2] = Default::default();
        let mut all: [Vec<Duration>; 2] = Default::default();
        for a in &arrivals {
            match *a {
                Arrival::Request { gap_ms, t } => {
                    now += Duration::from_millis(gap_ms);
                    match limits.admit(TENANTS[t], &spec(rpm, 0), now) {
                        Ok(rem) => {
                            let (limit, left) = rem.rpm.expect("an rpm limit is set");
                            prop_assert_eq!(limit, share);
                            prop_assert!(left < share);
                            prop_assert!(rem.tpm.is_none());
                            let at = now - t0;
                            admitted[t].push_back(at);
                            all[t].push(at);
                            while admitted[t].front().is_some_and(|x| at - *x >= Duration::from_secs(60)) {
                                admitted[t].pop_front();
                            }
                            let n = admitted[t].len();
                            prop_assert!(n as u64 <= 2 * share, "{} admitted in 60 s, limit {}", n, share);
                        }
                        Err(d) => {
                            prop_assert_eq!((d.limit_name, d.limit), ("rpm", share));
                            prop_assert!((1..=60).contains(&d.retry_after_s));
                        }
                    }
                }
                Arrival::Tokens { gap_ms, t, tokens } => {
                    now += Duration::from_millis(gap_ms);
                    limits.record_tokens(TENANTS[t], tokens, now);
                }
            }
        }
        for times in &all {
            for (i, start) in times.iter().enumerate() {
                for k in 1..=3u32 {
                    let n = times[i..].iter().take_while(|x| **x - *start < Duration::from_secs(60) * k).count();
                    let bound = (u64::from(k) + 1) * share;
                    prop_assert!(n as u64 <= bound, "{} admitted in {} min, limit {}", n, k, share);
                }
            }
        }
    }

    /// A tenant idle for two minutes is admitted again; one whose recorded tokens reach the
    /// TPM limit is refused by it at once, whatever it recorded before.
    #[test]
    fn tpm_refuses_at_the_limit_and_idling_resets(
        tpm in 1u64..10_000,
        arrivals in prop::collection::vec(arrival(), 0..100),
    ) {
        let limits = Limits::new(1);
        let mut now = Instant::now();
        for a in &arrivals {
            match *a {
                Arrival::Request { gap_ms, t } => {
                    now += Duration::from_millis(gap_ms);
                    if let Ok(rem) = limits.admit(TENANTS[t], &spec(0, tpm), now) {
                        let (limit, left) = rem.tpm.expect("a tpm limit is set");
                        prop_assert!(limit == tpm && left <= tpm);
                    }
                }
                Arrival::Tokens { gap_ms, t, tokens } => {
                    now += Duration::from_millis(gap_ms);
                    limits.record_tokens(TENANTS[t], tokens, now);
                }
            }
        }
        now += Duration::from_secs(120);
        prop_assert!(limits.admit("a", &spec(0, tpm), now).is_ok(), "two idle minutes clear the window");
        limits.record_tokens("a", tpm, now);
        let d = limits.admit("a", &spec(0, tpm), now).expect_err("at the limit");
        prop_assert_eq!((d.limit_name, d.limit), ("tpm", tpm));
        prop_assert!((1..=60).contains(&d.retry_after_s));
    }
}
