//! Rolling updates, pure: when a model's replica template changes, which replicas of the
//! new template to create and which old ones to retire this round, Kubernetes Deployment
//! style (`max_surge` above the desired count, `max_unavailable` below it), and the
//! bounded history of templates that `flotilla rollout history|undo` reads.
//!
//! One round, given the live replicas (not Draining, Stopped or Failed) split into
//! *updated* (the model's current template) and *old*:
//! 1. More live than `desired + surge` (the model was scaled down mid-rollout): retire the
//!    excess, old before updated, least ready first.
//! 2. Retire old replicas that are not Ready at once (they serve nothing).
//! 3. Retire old Ready ones only while the Ready count stays at `desired - unavailable`
//!    or more, oldest first. An updated
//!    replica counts as Ready once its engine reports every adapter bound to it loaded,
//!    and old Ready replicas wait while a pinned adapter is not yet loaded on the updated
//!    replicas ([`adapter_hold`]), so no request for it loses its last holder.
//! 4. Create updated replicas up to `desired + surge` live and `desired` updated.
//!
//! A paused rollout does step 1 only. Draining replicas stop taking new requests at once
//! and drain before they stop (the agent's drain-before-stop), so with the default
//! `max_unavailable: 0` the model never has fewer than `desired` Ready replicas serving.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use flotilla_api::spec::{ReplicaPhase, ReplicaTemplate, RolloutSpec};
use flotilla_api::ObjectName;
use serde::{Deserialize, Serialize};

use crate::objects::ReplicaView;

/// Templates kept in a model's status for `rollout history` and `undo`.
pub const TEMPLATE_HISTORY: usize = 10;

/// What one round does.
#[derive(Debug, Default, PartialEq)]
pub struct Step<'a> {
    /// Updated replicas to create.
    pub create: usize,
    /// Replicas to retire (mark Draining, or delete if never bound), with the reason.
    pub retire: Vec<(&'a ReplicaView, &'static str)>,
    /// Why old Ready replicas are held this round, if they are.
    pub waiting: Option<String>,
}

/// A pinned adapter not yet loaded on enough updated Ready replicas: old Ready replicas
/// wait for it.
pub fn adapter_hold(
    pinned: &BTreeMap<ObjectName, u32>,
    loaded: &HashMap<ObjectName, BTreeSet<String>>,
    updated_ready: &[&ReplicaView],
) -> Option<String> {
    for (adapter, n) in pinned {
        let want = (*n as usize).min(updated_ready.len());
        let have = updated_ready.iter().filter(|r| loaded.get(&r.name).is_some_and(|l| l.contains(adapter.as_str())));
        let have = have.count();
        if have < want {
            return Some(format!("adapter {adapter} loaded on {have} of {want} updated replica(s)"));
        }
    }
    None
}

fn readiness_order(r: &ReplicaView, ready: &dyn Fn(&ReplicaView) -> bool) -> (bool, u8, std::cmp::Reverse<u64>) {
    let rank = match r.phase() {
        ReplicaPhase::Pending => 0,
        ReplicaPhase::Scheduled => 1,
        ReplicaPhase::Starting => 2,
        _ => 3,
    };
    (ready(r), rank, std::cmp::Reverse(r.create_revision))
}

/// One round of a rollout. `holding`: Failed replicas that still hold a slot (they count
/// toward the live total). `ready`: serves requests now (for an updated replica, with its
/// adapters loaded). `hold`: a reason old Ready replicas must wait ([`adapter_hold`]).
#[allow(clippy::too_many_arguments)]
pub fn step<'a>(
    desired: usize,
    holding: usize,
    updated: &[&'a ReplicaView],
    old: &[&'a ReplicaView],
    spec: &RolloutSpec,
    ready: &dyn Fn(&ReplicaView) -> bool,
    hold: Option<String>,
) -> Step<'a> {
    let (surge, unavailable) = spec.resolve(desired as u32);
    let max_total = desired + surge as usize;
    let mut out = Step::default();
    let mut gone: BTreeSet<&ObjectName> = BTreeSet::new();
    // 1. Excess: old before updated, least ready and newest first.
    let live = updated.len() + old.len() + holding;
    if live > max_total {
        let mut by_order: Vec<&'a ReplicaView> = old.to_vec();
        by_order.sort_by_key(|r| readiness_order(r, ready));
        let mut updated_sorted: Vec<&'a ReplicaView> = updated.to_vec();
        updated_sorted.sort_by_key(|r| readiness_order(r, ready));
        by_order.extend(updated_sorted);
        for r in by_order.into_iter().take(live - max_total) {
            gone.insert(&r.name);
            out.retire.push((r, "scaled down"));
        }
    }
    if spec.paused {
        return out;
    }
    // 2. Old replicas that serve nothing go at once.
    let mut old_ready: Vec<&'a ReplicaView> = Vec::new();
    for r in old.iter().copied().filter(|r| !gone.contains(&r.name)) {
        if ready(r) {
            old_ready.push(r);
        } else {
            out.retire.push((r, "replaced by the new template"));
        }
    }
    // 3. Ready old ones within the availability budget, oldest first.
    let updated_ready = updated.iter().filter(|r| !gone.contains(&r.name) && ready(r)).count();
    let mut budget = (updated_ready + old_ready.len()).saturating_sub(desired.saturating_sub(unavailable as usize));
    if budget > 0 && !old_ready.is_empty() && hold.is_some() {
        out.waiting = hold;
        budget = 0;
    }
    old_ready.sort_by_key(|r| r.create_revision);
    for r in old_ready.into_iter().take(budget) {
        out.retire.push((r, "replaced by the new template"));
    }
    // 4. Updated replicas up to the surge and the desired count.
    let live = live - out.retire.len();
    let updated_live = updated.iter().filter(|r| !gone.contains(&r.name)).count();
    out.create = max_total.saturating_sub(live).min(desired.saturating_sub(updated_live));
    out
}

/// One template a model has run, for `rollout history` and `undo`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateRecord {
    /// 1, 2, 3… in the order the templates were first (or again) applied.
    pub number: u64,
    pub hash: String,
    pub template: ReplicaTemplate,
    /// The store revision of the model write that applied it (see `flotilla audit`).
    pub model_revision: u64,
    /// Why its canary was rolled back, if it was.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rolled_back: String,
}

/// `history` with `current` as its newest record: a template seen before moves to the
/// newest number (as `kubectl rollout undo` does); at most [`TEMPLATE_HISTORY`] are kept.
/// `None`: unchanged.
pub fn record_template(
    history: &[TemplateRecord],
    current: &ReplicaTemplate,
    model_revision: u64,
) -> Option<Vec<TemplateRecord>> {
    let hash = current.hash();
    let newest = history.iter().max_by_key(|r| r.number);
    if newest.is_some_and(|r| r.hash == hash) {
        return None;
    }
    let number = newest.map_or(1, |r| r.number + 1);
    let mut out: Vec<TemplateRecord> = history.iter().filter(|r| r.hash != hash).cloned().collect();
    out.push(TemplateRecord { number, hash, template: current.clone(), model_revision, rolled_back: String::new() });
    out.sort_by_key(|r| r.number);
    let excess = out.len().saturating_sub(TEMPLATE_HISTORY);
    out.drain(..excess);
    Some(out)
}

/// A model's rollout as its status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RolloutStatus {
    /// The current template's hash and history number.
    pub hash: String,
    pub number: u64,
    /// Live replicas of the current template, and how many of them are Ready.
    pub updated_replicas: u32,
    pub updated_ready: u32,
    /// Live replicas of older templates.
    pub old_replicas: u32,
    /// `Complete`, `Progressing`, `Paused`, `Waiting` (old replicas held; see message) or
    /// `RolledBack` (the canary failed its analysis).
    pub state: String,
    pub message: String,
    /// The canary of the current template, when `spec.rollout.canary` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<crate::canary::CanaryStatus>,
}

impl RolloutStatus {
    pub fn complete(&self) -> bool {
        self.state == "Complete"
    }

    pub fn rolled_back(&self) -> bool {
        self.state == "RolledBack"
    }
}

#[cfg(test)]
mod tests {
    use flotilla_api::spec::{EngineKind, IntOrPercent};

    use super::*;
    use crate::testkit::World;

    fn template(source: &str) -> ReplicaTemplate {
        ReplicaTemplate {
            kv_transfer: None,
            engine_image: Default::default(),
            topology: None,
            engine: EngineKind::Sim,
            source: source.into(),
            engine_args: vec![],
            gpus: 1,
            gpu_types: vec![],
        }
    }

    /// Replicas named by phase letter: R(eady), S(tarting), P(ending).
    fn replicas(w: &mut World, prefix: &str, phases: &str) -> Vec<ReplicaView> {
        if !w.nodes().iter().any(|n| n.name.as_str() == "a") {
            w.node("a", 64, "A");
        }
        for (i, c) in phases.chars().enumerate() {
            let phase = match c {
                'R' => ReplicaPhase::Ready,
                'S' => ReplicaPhase::Starting,
                _ => ReplicaPhase::Pending,
            };
            let node = (phase != ReplicaPhase::Pending).then(|| ("a", vec![0]));
            w.replica(&format!("{prefix}-{i}"), "m", 1, phase, node);
        }
        w.replicas().into_iter().filter(|r| r.name.as_str().starts_with(prefix)).collect()
    }

    fn ready(r: &ReplicaView) -> bool {
        r.phase() == ReplicaPhase::Ready
    }

    fn names(s: &Step) -> Vec<String> {
        s.retire.iter().map(|(r, _)| r.name.to_string()).collect()
    }

    #[test]
    fn default_surge_creates_one_then_retires_one_old_per_ready_new() {
        let mut w = World::default();
        let old = replicas(&mut w, "old", "RRRR");
        let old: Vec<&ReplicaView> = old.iter().collect();
        let spec = RolloutSpec::default();
        let s = step(4, 0, &[], &old, &spec, &ready, None);
        assert_eq!((s.create, names(&s)), (1, vec![]), "surge 1, nothing ready to spare");
        let new = replicas(&mut w, "new", "S");
        let new: Vec<&ReplicaView> = new.iter().collect();
        let s = step(4, 0, &new, &old, &spec, &ready, None);
        assert_eq!((s.create, names(&s)), (0, vec![]), "the new one is starting: no old may go");
        let new = replicas(&mut w, "nex", "R");
        let new: Vec<&ReplicaView> = new.iter().collect();
        let s = step(4, 0, &new, &old, &spec, &ready, None);
        assert_eq!((s.create, names(&s)), (1, vec!["old-0".to_string()]), "one Ready new frees one old");
    }

    #[test]
    fn unavailability_without_surge_retires_first() {
        let mut w = World::default();
        let old = replicas(&mut w, "old", "RRRR");
        let old: Vec<&ReplicaView> = old.iter().collect();
        let spec = RolloutSpec {
            max_surge: IntOrPercent::Count(0),
            max_unavailable: IntOrPercent::Count(2),
            ..RolloutSpec::default()
        };
        let s = step(4, 0, &[], &old, &spec, &ready, None);
        assert_eq!((s.create, s.retire.len()), (2, 2), "two may be unavailable, none may surge");
    }

    #[test]
    fn old_replicas_not_ready_go_at_once_and_ready_ones_wait_for_adapters() {
        let mut w = World::default();
        let old = replicas(&mut w, "old", "RSP");
        let old: Vec<&ReplicaView> = old.iter().collect();
        let new = replicas(&mut w, "new", "R");
        let new: Vec<&ReplicaView> = new.iter().collect();
        let spec = RolloutSpec::default();
        let s = step(3, 0, &new, &old, &spec, &ready, None);
        assert_eq!(names(&s), vec!["old-1", "old-2"], "starting and pending old ones go at once");
        assert_eq!(s.create, 2, "and updated ones take their places");
        let old = replicas(&mut w, "odd", "RR");
        let old: Vec<&ReplicaView> = old.iter().collect();
        let new = replicas(&mut w, "nev", "RR");
        let new: Vec<&ReplicaView> = new.iter().collect();
        let held = step(3, 0, &new, &old, &spec, &ready, Some("adapter a loaded on 0 of 2".into()));
        assert_eq!(names(&held), Vec::<String>::new(), "4 ready of 3: one old could go, but an adapter holds it");
        assert_eq!(held.waiting.as_deref(), Some("adapter a loaded on 0 of 2"));
        let s = step(3, 0, &new, &old, &spec, &ready, None);
        assert_eq!((names(&s), s.create), (vec!["odd-0".to_string()], 1));
    }

    #[test]
    fn paused_and_scaled_down_mid_rollout() {
        let mut w = World::default();
        let old = replicas(&mut w, "old", "RRR");
        let old: Vec<&ReplicaView> = old.iter().collect();
        let new = replicas(&mut w, "new", "RS");
        let new: Vec<&ReplicaView> = new.iter().collect();
        let paused = RolloutSpec { paused: true, ..RolloutSpec::default() };
        let s = step(3, 0, &new, &old, &paused, &ready, None);
        assert_eq!((names(&s), s.create), (vec!["old-2".to_string()], 0), "paused: only the excess over surge goes");
        let s = step(1, 0, &new, &old, &paused, &ready, None);
        assert_eq!(names(&s), vec!["old-2", "old-1", "old-0"], "scale-down takes old first, newest first");
        let s = step(1, 0, &new, &old, &RolloutSpec::default(), &ready, None);
        assert_eq!((s.retire.len(), s.create), (3, 0), "5 live, 1 desired + 1 surge: 3 go");
    }

    #[test]
    fn adapter_hold_asks_as_many_holders_as_updated_ready_replicas_allow() {
        let mut w = World::default();
        let new = replicas(&mut w, "new", "RR");
        let new: Vec<&ReplicaView> = new.iter().collect();
        let pinned = BTreeMap::from([(crate::testkit::name("a"), 3)]);
        let mut loaded = HashMap::new();
        assert!(adapter_hold(&pinned, &loaded, &new).unwrap().contains("0 of 2"));
        loaded.insert(new[0].name.clone(), BTreeSet::from(["a".to_string()]));
        assert!(adapter_hold(&pinned, &loaded, &new).unwrap().contains("1 of 2"));
        loaded.insert(new[1].name.clone(), BTreeSet::from(["a".to_string()]));
        assert_eq!(adapter_hold(&pinned, &loaded, &new), None);
        assert_eq!(adapter_hold(&pinned, &HashMap::new(), &[]), None, "no updated ready replica: nothing to ask");
    }

    #[test]
    fn history_is_bounded_and_a_reapplied_template_moves_to_the_top() {
        let mut h = Vec::new();
        for i in 0..12 {
            h = record_template(&h, &template(&format!("file:///{i}")), 100 + i).unwrap();
        }
        assert_eq!(h.len(), TEMPLATE_HISTORY);
        assert_eq!((h[0].number, h.last().unwrap().number), (3, 12));
        assert_eq!(record_template(&h, &template("file:///11"), 999), None, "unchanged");
        let h = record_template(&h, &template("file:///5"), 200).unwrap();
        let last = h.last().unwrap();
        assert_eq!((last.number, last.model_revision, h.len()), (13, 200, TEMPLATE_HISTORY));
        assert_eq!(h.iter().filter(|r| r.hash == last.hash).count(), 1, "its older record is gone");
    }
}
