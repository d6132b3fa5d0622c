//! LoRA adapter placement, pure: one base model's adapters, its replicas (with the adapters
//! each must hold, `ReplicaSpec.adapters`), what the engines report, usage recency and
//! pending on-demand requests → replica writes (bindings, fenced by the replica's revision,
//! so a replica never holds more than its `--max-cpu-loras` slots) and adapter statuses.
//!
//! Rules, in order:
//! 1. Bindings of adapters that are gone, moved to another base, or whose load failed on
//!    that replica are removed; a source change rewrites the binding (the agent reloads).
//! 2. Each adapter keeps `replicas: N` pinned bindings on replicas that run; missing ones
//!    are added (never on a replica whose load of it failed within `FAILURE_BACKOFF`).
//! 3. An on-demand request (`EnsureLoaded`) adds one binding on a Ready replica not in its
//!    avoid list, unless one is already loaded or loading there.
//! 4. A new binding takes a free slot chosen by the adapter's placement policy; with none
//!    free, it evicts at once a binding that is safe to evict, on the least loaded
//!    candidate replica (running + waiting requests) and there the least recently used:
//!    unpinned, not demanded, no request in flight there (the gateways' counts, else the
//!    engine's running adapters) and bound at least `MIN_RESIDENCY` ago (the thrash
//!    guard). A demand that finds nothing evictable is reported in `Plan::unplaced` with
//!    why ([`Blocked`]), so the caller is answered at once rather than at its deadline.
//!
//! Why one controller per base model rather than one actor per adapter (DESIGN.md): the
//! slots of a replica are shared by every adapter of its base model, and eviction must
//! compare adapters; a single decision over all of them needs no cross-actor protocol and
//! makes no conflicting writes, like the Scheduler for GPUs.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use flotilla_api::pb::EngineReport;
use flotilla_api::spec::{
    AdapterBinding, AdapterOnReplica, AdapterPhase, AdapterPlacement, AdapterReplicaState, AdapterSpec, AdapterStatus,
    ReplicaPhase,
};
use flotilla_api::{Kind, ObjectName, StoredObject};
use flotilla_storage::Command;
use tokio::time::Instant;

use crate::objects::{key, ModelView, ReplicaView};
use crate::ActorsError;

/// A replica whose load of an adapter failed is not tried again for it before this.
pub const FAILURE_BACKOFF: Duration = Duration::from_secs(30);
/// The thrash guard: a binding made less than this ago is not evicted (its load may
/// still run, and the request that asked for it may not have reached the engine yet).
/// It bounds loads to one per slot per `MIN_RESIDENCY` (2 per second per slot) however
/// many hot adapters share the slots. An adapter with requests in flight is never
/// evicted, whatever its age.
pub const MIN_RESIDENCY: Duration = Duration::from_millis(500);
/// A demand waiting on a slot whose load for another demand outlasts `MIN_RESIDENCY` is
/// decided again this often.
const RECHECK: Duration = Duration::from_millis(100);

/// An `Adapter` as the controller sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterView {
    pub name: ObjectName,
    pub revision: u64,
    pub spec: AdapterSpec,
    pub status: Option<AdapterStatus>,
}

impl AdapterView {
    pub fn from_stored(o: &StoredObject) -> Result<AdapterView, ActorsError> {
        let bad = |why: String| ActorsError::Malformed { key: o.key.to_string(), why };
        let spec = serde_json::from_value(o.spec.clone()).map_err(|e| bad(format!("spec: {e}")))?;
        let status = if o.status.is_null() { None } else { serde_json::from_value(o.status.clone()).ok() };
        Ok(AdapterView { name: o.key.name.clone(), revision: o.revision, spec, status })
    }
}

/// An on-demand load request.
#[derive(Debug, Clone, PartialEq)]
pub struct Demand {
    /// Replicas the caller found saturated.
    pub avoid: BTreeSet<ObjectName>,
    /// Dropped after this.
    pub until: Instant,
}

/// A failed load of an adapter on a replica.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub at: Instant,
    pub reason: String,
}

/// Everything one decision needs.
#[derive(Debug, Clone)]
pub struct AdapterState {
    pub base: ObjectName,
    pub model: Option<ModelView>,
    /// Adapters whose `base_model` is `base`.
    pub adapters: BTreeMap<ObjectName, AdapterView>,
    /// Replicas of the base model.
    pub replicas: BTreeMap<ObjectName, ReplicaView>,
    /// Nodes the leader lost contact with (NotReady) or that are gone: adapters there are
    /// placed again elsewhere without waiting for their replicas to be rescheduled.
    pub down_nodes: BTreeSet<ObjectName>,
    /// Latest engine report per replica.
    pub reports: HashMap<ObjectName, EngineReport>,
    /// Last request routed to (adapter, replica), or when it was bound there.
    pub last_used: HashMap<(ObjectName, ObjectName), Instant>,
    /// When each (adapter, replica) binding was made (first seen, for bindings made
    /// before this controller started); the thrash guard counts from it. The actor
    /// records every binding; one missing here is not guarded.
    pub bound_at: HashMap<(ObjectName, ObjectName), Instant>,
    /// (adapter, replica) pairs with requests in flight per the gateways' latest reports.
    pub in_flight: BTreeSet<(ObjectName, ObjectName)>,
    /// Some gateway reports in-flight counts: they are the truth. Without them the
    /// engines' running and waiting adapters (`EngineReport.active_adapters`, as fresh as
    /// the last heartbeat) stand in.
    pub gateways_count: bool,
    pub demands: BTreeMap<ObjectName, Demand>,
    pub failures: HashMap<(ObjectName, ObjectName), Failure>,
    pub now: Instant,
}

/// Why a demand found no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Blocked {
    /// A slot frees within `MIN_RESIDENCY`: a binding younger than the thrash guard, or
    /// one whose load runs for another waiting request. The demand stays and is decided
    /// again then ([`Plan::wake_at`]).
    Fresh,
    /// Every evictable binding has requests in flight: a capacity wait, retry shortly.
    InUse,
    /// Nothing can be evicted (every slot pinned): it waits for an operator
    /// (more replicas or slots, fewer pinned adapters).
    Full,
    /// No Ready replica may take it now (none Ready, or it failed or is avoided on each,
    /// or every slot is pinned but another replica is starting): the demand waits for one
    /// (a replica starting, the failure backoff passing).
    NoReplica,
}

/// A demand the decision could not place, and the reason `flotilla get adapter` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaced {
    pub blocked: Blocked,
    pub reason: String,
}

/// What a decision wants done.
#[derive(Debug, Default)]
pub struct Plan {
    pub commands: Vec<Command>,
    /// New (adapter, replica) bindings, for the usage clock.
    pub bound: Vec<(ObjectName, ObjectName)>,
    /// Bindings removed to free a slot for a waiting adapter: (evicted adapter, replica, the
    /// adapter that takes its slot).
    pub evictions: Vec<(ObjectName, ObjectName, ObjectName)>,
    /// Demanded adapters left without a binding, and why.
    pub unplaced: BTreeMap<ObjectName, Unplaced>,
    /// Decide again at this instant: a binding then passes the thrash guard for a demand
    /// that waits ([`Blocked::Fresh`]).
    pub wake_at: Option<Instant>,
}

/// How an adapter stands on a replica per the engine's report.
fn reported(report: Option<&EngineReport>, adapter: &str) -> Option<(AdapterReplicaState, String)> {
    let r = report?;
    if r.loaded_adapters.iter().any(|a| a == adapter) {
        return Some((AdapterReplicaState::Loaded, String::new()));
    }
    let a = r.adapters.iter().find(|a| a.name == adapter)?;
    let state = match a.state.as_str() {
        "downloading" => AdapterReplicaState::Downloading,
        "loading" => AdapterReplicaState::Loading,
        "loaded" => AdapterReplicaState::Loaded,
        "failed" => AdapterReplicaState::Failed,
        _ => return None,
    };
    Some((state, a.reason.clone()))
}

/// Records failed loads from the reports (kept for `FAILURE_BACKOFF`) and forgets old ones.
pub fn note_failures(s: &mut AdapterState) {
    let now = s.now;
    s.failures.retain(|_, f| now.saturating_duration_since(f.at) < FAILURE_BACKOFF);
    for r in s.replicas.values() {
        for b in &r.spec.adapters {
            if let Some((AdapterReplicaState::Failed, reason)) = reported(s.reports.get(&r.name), b.name.as_str()) {
                s.failures.entry((b.name.clone(), r.name.clone())).or_insert(Failure { at: now, reason });
            }
        }
    }
    // A demand ends when its deadline passes or an engine it may use reports the adapter
    // loaded; a satisfied demand left in place would shield the adapter from eviction.
    let satisfied = |name: &ObjectName, d: &Demand| {
        s.replicas.values().any(|r| {
            s.ready(r)
                && !d.avoid.contains(&r.name)
                && matches!(reported(s.reports.get(&r.name), name.as_str()), Some((AdapterReplicaState::Loaded, _)))
        })
    };
    let done: Vec<ObjectName> =
        s.demands.iter().filter(|(n, d)| d.until <= now || satisfied(n, d)).map(|(n, _)| n.clone()).collect();
    for n in done {
        s.demands.remove(&n);
    }
}

impl AdapterState {
    fn node_up(&self, r: &ReplicaView) -> bool {
        r.spec.node.as_ref().is_some_and(|n| !self.down_nodes.contains(n))
    }

    /// Runs (or is about to) on a live node: counts for pinned adapters.
    fn serving(&self, r: &ReplicaView) -> bool {
        r.assigned() && self.node_up(r)
    }

    /// Why a replica does not count (not serving).
    fn why_not(&self, r: &ReplicaView) -> String {
        match &r.spec.node {
            Some(n) if self.down_nodes.contains(n) => format!("node {n} is not ready"),
            _ => format!("replica is {:?}", r.phase()),
        }
    }

    /// Serves requests now: on-demand loads go here.
    fn ready(&self, r: &ReplicaView) -> bool {
        r.phase() == ReplicaPhase::Ready && self.node_up(r)
    }

    /// Requests for `adapter` are in flight on `replica`: the gateways' counts when they
    /// report them, else the engine's running and waiting adapters.
    fn in_use(&self, adapter: &ObjectName, replica: &ObjectName) -> bool {
        if self.gateways_count {
            return self.in_flight.contains(&(adapter.clone(), replica.clone()));
        }
        self.reports.get(replica).is_some_and(|e| e.active_adapters.iter().any(|a| a == adapter.as_str()))
    }
}

/// The decision. Call [`note_failures`] first.
pub fn decide(s: &AdapterState) -> Plan {
    let mut plan = Plan::default();
    // The replicas that run the model's current template (all of them outside a rollout),
    // hashed once per decision rather than at every comparison below.
    let template = s.model.as_ref().map(|m| m.spec.template().hash());
    let current_set: BTreeSet<&ObjectName> = s
        .replicas
        .values()
        .filter(|r| template.as_ref().is_none_or(|h| r.spec.template_hash() == *h))
        .map(|r| &r.name)
        .collect();
    let current = |r: &ReplicaView| current_set.contains(&r.name);
    let lora = s.model.as_ref().map(|m| m.spec.lora());
    let capacity = match &lora {
        Some(Ok(l)) if l.enabled => l.max_cpu_loras as usize,
        _ => 0,
    };
    // 1. Current bindings, cleaned.
    let mut bindings: BTreeMap<ObjectName, Vec<AdapterBinding>> = BTreeMap::new();
    for r in s.replicas.values() {
        let kept: Vec<AdapterBinding> = r
            .spec
            .adapters
            .iter()
            .filter_map(|b| {
                let a = s.adapters.get(&b.name)?;
                if capacity == 0 || s.failures.contains_key(&(b.name.clone(), r.name.clone())) {
                    return None;
                }
                Some(AdapterBinding { name: b.name.clone(), source: a.spec.source.clone() })
            })
            .collect();
        bindings.insert(r.name.clone(), kept);
    }
    let holds = |b: &BTreeMap<ObjectName, Vec<AdapterBinding>>, a: &ObjectName, r: &ObjectName| {
        b.get(r).is_some_and(|v| v.iter().any(|x| &x.name == a))
    };
    // Which bindings are pinned: per adapter, its first N on running replicas (loaded first).
    let pinned_of = |b: &BTreeMap<ObjectName, Vec<AdapterBinding>>| -> BTreeSet<(ObjectName, ObjectName)> {
        let mut out = BTreeSet::new();
        for (name, a) in &s.adapters {
            let mut on: Vec<&ReplicaView> =
                s.replicas.values().filter(|r| s.serving(r) && holds(b, name, &r.name)).collect();
            on.sort_by_key(|r| {
                let loaded =
                    matches!(reported(s.reports.get(&r.name), name.as_str()), Some((AdapterReplicaState::Loaded, _)));
                (!current(r), !loaded, r.name.clone())
            });
            for r in on.into_iter().take(a.spec.replicas.pinned() as usize) {
                out.insert((name.clone(), r.name.clone()));
            }
        }
        out
    };
    if capacity > 0 {
        // 2 and 3: wanted new bindings, pinned first, in name order. During a rollout the
        // pinned bindings move to the current template's replicas: each adapter is bound
        // on min(N, running current replicas) of them before the old holders retire (the
        // model actor waits for that), the old bindings turning unpinned.
        let mut wants: Vec<(ObjectName, bool, BTreeSet<ObjectName>, bool)> = Vec::new();
        for (name, a) in &s.adapters {
            let n = a.spec.replicas.pinned();
            let serving_holders = s.replicas.values().filter(|r| s.serving(r) && holds(&bindings, name, &r.name));
            let (on, on_current) =
                serving_holders.fold((0u32, 0u32), |(all, cur), r| (all + 1, cur + u32::from(current(r))));
            let current_room = s
                .replicas
                .values()
                .filter(|r| s.serving(r) && current(r) && !s.failures.contains_key(&(name.clone(), r.name.clone())))
                .count() as u32;
            let missing = n.saturating_sub(on);
            let moving = n.min(current_room).saturating_sub(on_current).saturating_sub(missing);
            for _ in 0..missing {
                wants.push((name.clone(), true, BTreeSet::new(), false));
            }
            for _ in 0..moving {
                wants.push((name.clone(), true, BTreeSet::new(), true));
            }
        }
        for (name, d) in &s.demands {
            if !s.adapters.contains_key(name) {
                continue;
            }
            let covered = s
                .replicas
                .values()
                .any(|r| s.ready(r) && !d.avoid.contains(&r.name) && holds(&bindings, name, &r.name));
            if !covered {
                wants.push((name.clone(), false, d.avoid.clone(), false));
            }
        }
        for (name, pinned, avoid, current_only) in wants {
            let a = &s.adapters[&name];
            let pinned_now = pinned_of(&bindings);
            let candidates: Vec<&ReplicaView> = s
                .replicas
                .values()
                .filter(|r| if pinned { s.serving(r) } else { s.ready(r) })
                .filter(|r| !avoid.contains(&r.name) && !holds(&bindings, &name, &r.name))
                .filter(|r| !current_only || current(r))
                .filter(|r| !s.failures.contains_key(&(name.clone(), r.name.clone())))
                .collect();
            let used = |r: &ObjectName| bindings.get(r).map_or(0, Vec::len);
            let free: Vec<&&ReplicaView> = candidates.iter().filter(|r| used(&r.name) < capacity).collect();
            let load = |r: &ReplicaView| {
                s.reports.get(&r.name).map_or(0.0, |e| e.num_requests_running + e.num_requests_waiting)
            };
            // The current template's replicas first, Ready ones before starting ones, then
            // the placement policy, then the name.
            let pick = free
                .iter()
                .min_by(|x, y| {
                    let by_policy = match a.spec.placement {
                        AdapterPlacement::LeastAdapters => used(&x.name).cmp(&used(&y.name)),
                        AdapterPlacement::BinPack => used(&y.name).cmp(&used(&x.name)),
                        AdapterPlacement::LeastLoad => load(x).total_cmp(&load(y)),
                    };
                    (!current(x), !s.ready(x))
                        .cmp(&(!current(y), !s.ready(y)))
                        .then(by_policy)
                        .then(x.name.cmp(&y.name))
                })
                .map(|r| (r.name.clone(), None));
            // No free slot: the least recently used binding among the candidates that is
            // safe to evict (see the module docs); else why there is none.
            let mut blocked = if candidates.is_empty() { Blocked::NoReplica } else { Blocked::Full };
            let mut fresh_until: Option<Instant> = None;
            let mut busy: Vec<String> = Vec::new();
            let pick = pick.or_else(|| {
                let mut best: Option<((u64, Instant), ObjectName, ObjectName)> = None;
                for r in &candidates {
                    // The least loaded replica's slot first: the new adapter brings its
                    // traffic to the replica that has room for it (LRU within it).
                    let busy_now = load(r).max(0.0).round() as u64;
                    for b in bindings.get(&r.name).into_iter().flatten() {
                        let pair = (b.name.clone(), r.name.clone());
                        if pinned_now.contains(&pair) {
                            continue;
                        }
                        let since = s.bound_at.get(&pair).copied();
                        if s.demands.contains_key(&b.name) {
                            // Its load runs for a waiting request: the slot frees once that
                            // is served (the demand ends when the engine reports it loaded)
                            // and the guard passes.
                            blocked = Blocked::Fresh;
                            let free_at = since.map_or(s.now, |t| t + MIN_RESIDENCY).max(s.now + RECHECK);
                            fresh_until = Some(fresh_until.map_or(free_at, |w| w.min(free_at)));
                            continue;
                        }
                        if s.in_use(&b.name, &r.name) {
                            blocked = blocked.min(Blocked::InUse);
                            busy.push(format!("{} on {}", b.name, r.name));
                            continue;
                        }
                        if let Some(t) = since.filter(|t| s.now.saturating_duration_since(*t) < MIN_RESIDENCY) {
                            blocked = Blocked::Fresh;
                            let free_at = t + MIN_RESIDENCY;
                            fresh_until = Some(fresh_until.map_or(free_at, |w| w.min(free_at)));
                            continue;
                        }
                        let last = s.last_used.get(&pair).copied().or(since).unwrap_or(s.now);
                        if best.as_ref().is_none_or(|(k, _, _)| (busy_now, last) < *k) {
                            best = Some(((busy_now, last), r.name.clone(), b.name.clone()));
                        }
                    }
                }
                best.map(|(_, r, victim)| (r, Some(victim)))
            });
            let Some((replica, victim)) = pick else {
                if blocked == Blocked::Full && s.replicas.values().any(|r| s.serving(r) && !s.ready(r) && current(r)) {
                    // A replica still starting will have free slots: wait for it.
                    blocked = Blocked::NoReplica;
                }
                if !pinned {
                    if let Some(t) = fresh_until {
                        plan.wake_at = Some(plan.wake_at.map_or(t, |w| w.min(t)));
                    }
                    let reason = unplaced_reason(s, &candidates, &bindings, capacity, blocked, &busy);
                    plan.unplaced.insert(name, Unplaced { blocked, reason });
                }
                continue;
            };
            let list = bindings.entry(replica.clone()).or_default();
            if let Some(v) = victim {
                list.retain(|b| b.name != v);
                plan.evictions.push((v, replica.clone(), name.clone()));
            }
            list.push(AdapterBinding { name: name.clone(), source: a.spec.source.clone() });
            list.sort();
            plan.bound.push((name, replica));
        }
    }
    // Replica writes.
    for r in s.replicas.values() {
        let mut want = bindings.remove(&r.name).unwrap_or_default();
        want.sort();
        let mut have = r.spec.adapters.clone();
        have.sort();
        if want != have {
            let mut spec = r.spec.clone();
            spec.adapters = want.clone();
            plan.commands.push(Command::Txn { compares: vec![r.compare()], ops: vec![r.put_op(&spec, &r.status)] });
            bindings.insert(r.name.clone(), want);
        } else {
            bindings.insert(r.name.clone(), have);
        }
    }
    // Statuses.
    let pinned = pinned_of(&bindings);
    for (name, a) in &s.adapters {
        let status = status_of(s, a, &bindings, &pinned, capacity);
        if a.status.as_ref() != Some(&status) {
            plan.commands.push(Command::PutStatus {
                key: key(Kind::Adapter, name),
                status: serde_json::to_value(&status).unwrap_or_default(),
                expected_revision: Some(a.revision),
            });
        }
    }
    plan
}

/// Why a demand found no slot, in the words of `flotilla get adapter`.
fn unplaced_reason(
    s: &AdapterState,
    candidates: &[&ReplicaView],
    bindings: &BTreeMap<ObjectName, Vec<AdapterBinding>>,
    capacity: usize,
    blocked: Blocked,
    busy: &[String],
) -> String {
    if candidates.is_empty() {
        return if s.replicas.values().any(|r| s.ready(r)) {
            "no ready replica of the base model can take it (failed there recently, or avoided)".into()
        } else {
            format!("base model {} has no ready replica", s.base)
        };
    }
    let used = candidates.iter().map(|r| bindings.get(&r.name).map_or(0, Vec::len)).max().unwrap_or(0);
    let slots = format!("no free slot: {used} of {capacity} (--max-cpu-loras) in use");
    match blocked {
        Blocked::Fresh => format!("{slots}; a slot frees within {} ms", MIN_RESIDENCY.as_millis()),
        Blocked::InUse => format!("{slots}; every evictable adapter has requests in flight ({})", busy.join(", ")),
        Blocked::Full => format!("{slots}; every slot holds a pinned adapter"),
        Blocked::NoReplica => slots,
    }
}

fn status_of(
    s: &AdapterState,
    a: &AdapterView,
    bindings: &BTreeMap<ObjectName, Vec<AdapterBinding>>,
    pinned: &BTreeSet<(ObjectName, ObjectName)>,
    capacity: usize,
) -> AdapterStatus {
    let desired = a.spec.replicas.pinned();
    let mut st = AdapterStatus { desired_replicas: desired, ..AdapterStatus::default() };
    let base = &a.spec.base_model;
    let broken = match &s.model {
        None => Some(format!("base model {base} does not exist")),
        Some(m) => a.spec.check_base(&m.spec).err().map(|e| e.to_string()),
    };
    if let Some(why) = broken {
        st.phase = AdapterPhase::Failed;
        st.reason = why;
        return st;
    }
    let mut loading = (false, false);
    let mut last_failure: Option<&Failure> = None;
    for r in s.replicas.values() {
        let bound = bindings.get(&r.name).is_some_and(|v| v.iter().any(|b| b.name == a.name));
        let report = s.reports.get(&r.name);
        let node = r.spec.node.as_ref().map(|n| n.to_string()).unwrap_or_default();
        let failure = s.failures.get(&(a.name.clone(), r.name.clone()));
        let (state, reason) = if bound {
            match reported(report, a.name.as_str()) {
                Some((AdapterReplicaState::Loaded, _)) if s.serving(r) => {
                    st.loaded_replicas += 1;
                    if let Some(ms) = report.and_then(|e| e.adapters.iter().find(|x| x.name == a.name.as_str())) {
                        if ms.load_ms > 0 {
                            st.load_latency_ms = Some(st.load_latency_ms.unwrap_or(0).max(ms.load_ms));
                        }
                    }
                    (AdapterReplicaState::Loaded, String::new())
                }
                Some((AdapterReplicaState::Downloading, _)) => {
                    loading.0 = true;
                    (AdapterReplicaState::Downloading, String::new())
                }
                Some((AdapterReplicaState::Loading, _)) => {
                    loading.1 = true;
                    (AdapterReplicaState::Loading, String::new())
                }
                _ if !s.serving(r) => (AdapterReplicaState::Assigned, s.why_not(r)),
                _ => {
                    loading.1 = true;
                    (AdapterReplicaState::Assigned, "waiting for the agent".into())
                }
            }
        } else if let Some(f) = failure {
            if last_failure.is_none_or(|l| f.at > l.at) {
                last_failure = Some(f);
            }
            (AdapterReplicaState::Failed, f.reason.clone())
        } else if !s.ready(r) {
            (AdapterReplicaState::NotLoaded, s.why_not(r))
        } else {
            let used = bindings.get(&r.name).map_or(0, Vec::len);
            let why = if used >= capacity {
                format!("no free slot: {used} of {capacity} (--max-cpu-loras) in use")
            } else if desired == 0 {
                "on-demand: loaded when requested".to_string()
            } else {
                format!("not needed: pinned on {desired} replica(s)")
            };
            (AdapterReplicaState::NotLoaded, why)
        };
        if !bound && state == AdapterReplicaState::NotLoaded && !s.serving(r) && r.phase() != ReplicaPhase::Pending {
            continue; // Draining, Stopped, Failed replicas are not worth a line
        }
        st.replicas.push(AdapterOnReplica {
            replica: r.name.clone(),
            node,
            state,
            reason,
            pinned: pinned.contains(&(a.name.clone(), r.name.clone())),
        });
    }
    let enough = st.loaded_replicas >= desired.max(1);
    st.phase = if enough {
        AdapterPhase::Ready
    } else if loading.0 {
        AdapterPhase::Downloading
    } else if loading.1 {
        AdapterPhase::Loading
    } else if let Some(f) = last_failure.filter(|_| st.loaded_replicas == 0) {
        st.reason = f.reason.clone();
        AdapterPhase::Failed
    } else {
        AdapterPhase::Pending
    };
    if st.phase == AdapterPhase::Pending && st.reason.is_empty() {
        st.reason = if !s.replicas.values().any(|r| s.ready(r)) {
            format!("base model {base} has no ready replica")
        } else if desired == 0 && st.loaded_replicas == 0 {
            "on-demand: loads on the first request".into()
        } else if st.loaded_replicas < desired {
            // Pending for want of a slot: say so at the adapter's level too (the reason a
            // request for it is refused with).
            let full = st.replicas.iter().find(|r| r.reason.starts_with("no free slot"));
            match full {
                Some(r) => format!("loaded on {} of {desired} replicas; {}", st.loaded_replicas, r.reason),
                None => format!("loaded on {} of {desired} replicas", st.loaded_replicas),
            }
        } else {
            String::new()
        };
    }
    st
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
