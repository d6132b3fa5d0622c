//! The Model actor: one per model name. It keeps the model's replicas at `spec.replicas`
//! (creating Pending replicas for the scheduler, draining the newest and least ready first
//! on scale-down, moving replicas off draining nodes and Failed GPUs surge-first), drains everything when
//! the model is deleted, and writes the model's status (`desired_replicas`,
//! `ready_replicas`, `Ready`/`Progressing` conditions with reasons).
//!
//! ```text
//!  Changed(replica?) ─┐                      ┌─> Txn create Pending replicas
//!  Tick ──────────────┼─> decide(state) ──────┼─> Txn mark Draining / delete unbound
//!  Resync ────────────┘                      └─> PutStatus model status
//! ```
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use flotilla_api::spec::ReplicaPhase;
use flotilla_api::{Kind, LabelSelector, ObjectName};
use flotilla_storage::{Command, Compare, TxnOp};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::canary::{self, CanaryStatus};
use crate::config::ActorsConfig;
use crate::disaggregation::{member_writes, parent_status, Members};
use crate::facts::BoundNodes;
use crate::metrics::Controller;
use crate::objects::{
    self, key, new_replica_op, txn, Condition, Fresh, ModelStatus, ModelView, RandomFresh, ReplicaView,
};
use crate::rollout::{self, RolloutStatus};
use crate::shared::Ctx;
use crate::writes::execute;

/// What a model's decision sees.
#[derive(Debug, Clone)]
pub struct ModelState {
    pub name: ObjectName,
    /// `None`: the model was deleted (or never existed): drain everything.
    pub model: Option<ModelView>,
    pub replicas: BTreeMap<ObjectName, ReplicaView>,
    /// Nodes being drained: their replicas are replaced elsewhere first.
    pub draining_nodes: BTreeSet<ObjectName>,
    /// Nodes not Ready: their replicas do not count as ready.
    pub down_nodes: BTreeSet<ObjectName>,
    /// Failed GPUs by node: replicas bound to them are replaced elsewhere first.
    pub failed_gpus: BTreeMap<ObjectName, BTreeSet<u32>>,
    /// When this actor first saw each Failed replica.
    pub failed_since: HashMap<ObjectName, Instant>,
    pub now: Instant,
    /// Adapters of this base model kept loaded (`replicas: N`), by name: read only while
    /// a rollout runs (its old Ready replicas wait for them on the updated ones).
    pub pinned_adapters: BTreeMap<ObjectName, u32>,
    /// Adapters each replica's engine reports loaded (from the agents' heartbeats).
    pub loaded_adapters: HashMap<ObjectName, BTreeSet<String>>,
    /// Wall-clock time (unix ms): canary steps are timed in it.
    pub now_ms: u64,
    /// A running canary's figures since its step began: (new template, the others).
    pub canary_stats: (canary::RevisionStats, canary::RevisionStats),
    /// The Models stored under this model's member names (`<name>-prefill`, `-decode`).
    pub members: Members,
}

impl ModelState {
    /// Whether some live replica runs another template than the model's (a rollout).
    pub fn rolling(&self) -> bool {
        let Some(model) = &self.model else { return false };
        let current = model.spec.template().hash();
        self.replicas.values().any(|r| {
            !matches!(r.phase(), ReplicaPhase::Draining | ReplicaPhase::Stopped | ReplicaPhase::Failed)
                && r.spec.template_hash() != current
        })
    }
}

fn phase_rank(p: ReplicaPhase) -> u8 {
    match p {
        ReplicaPhase::Pending => 0,
        ReplicaPhase::Scheduled => 1,
        ReplicaPhase::Starting => 2,
        _ => 3,
    }
}

/// Marks `r` Draining (bound) or deletes it (never bound: no GPUs, nothing runs).
fn retire(r: &ReplicaView, reason: &str, compares: &mut Vec<Compare>, ops: &mut Vec<TxnOp>) {
    compares.push(r.compare());
    if r.spec.node.is_none() || r.phase() == ReplicaPhase::Failed {
        ops.push(TxnOp::Delete { key: r.key() });
    } else {
        let status = flotilla_api::spec::ReplicaStatus {
            phase: ReplicaPhase::Draining,
            reason: reason.to_owned(),
            ..r.status.clone()
        };
        ops.push(r.status_op(&status));
    }
}

/// Retires every replica of the model not already Draining or Stopped, for `reason`.
fn retire_live(s: &ModelState, reason: &str, compares: &mut Vec<Compare>, ops: &mut Vec<TxnOp>) {
    for r in s.replicas.values() {
        if !matches!(r.phase(), ReplicaPhase::Draining | ReplicaPhase::Stopped) {
            retire(r, reason, compares, ops);
        }
    }
}

/// The model's reconcile decision: the Raft commands that move it toward its spec.
pub fn decide(s: &ModelState, cfg: &ActorsConfig, fresh: &mut dyn Fresh) -> Vec<Command> {
    let (mut compares, mut ops) = (Vec::new(), Vec::new());
    let (members, problems) = member_writes(&s.name, s.model.as_ref(), &s.members, &mut || fresh.uid());
    let Some(model) = &s.model else {
        retire_live(s, "model deleted", &mut compares, &mut ops);
        return txn(compares, ops).into_iter().chain(members).collect();
    };
    if model.spec.disaggregation.is_some() {
        return decide_disaggregated(s, model, members, &problems);
    }
    let stored = ModelStatus::of(model);
    let desired = desired_replicas(model, stored.autoscaling.as_ref()) as usize;
    let backoff = ActorsConfig::ms(cfg.failed_replace_backoff_ms);
    // A gang is on a draining or down node when any of its members is: it moves whole.
    let on_any = |r: &ReplicaView, set: &BTreeSet<ObjectName>| r.spec.bindings().iter().any(|(n, _)| set.contains(*n));
    let on_draining = |r: &ReplicaView| on_any(r, &s.draining_nodes);
    let on_down = |r: &ReplicaView| on_any(r, &s.down_nodes);
    let is_ready = |r: &ReplicaView| r.phase() == ReplicaPhase::Ready && r.spec.node.is_some() && !on_down(r);
    let mut active: Vec<&ReplicaView> = Vec::new();
    let mut moving: Vec<&ReplicaView> = Vec::new();
    let mut failed: Vec<&ReplicaView> = Vec::new();
    let mut hedged: Vec<&ReplicaView> = Vec::new();
    for r in s.replicas.values() {
        match r.phase() {
            ReplicaPhase::Draining | ReplicaPhase::Stopped => {}
            ReplicaPhase::Failed => failed.push(r),
            // Hedged healing: a replica on a node that stopped heartbeating stays bound and
            // routable (the gateways eject it if it fails) but no longer counts, so its
            // replacement starts now. If the node returns, the surplus is scaled down; if not,
            // the node actor unbinds it after the grace.
            _ if on_down(r) => hedged.push(r),
            _ if on_draining(r) || BoundNodes::on_failed_gpu(&s.failed_gpus, r) => moving.push(r),
            _ => active.push(r),
        }
    }
    // Failed replicas hold their slot during the backoff; beyond `failed_keep` they go.
    let holding = failed
        .iter()
        .filter(|r| s.failed_since.get(&r.name).is_none_or(|t| s.now.saturating_duration_since(*t) < backoff))
        .count();
    failed.sort_by_key(|r| std::cmp::Reverse(r.create_revision));
    for r in failed.iter().skip(cfg.failed_keep) {
        retire(r, "", &mut compares, &mut ops);
    }
    let counted = active.len() + holding;
    let current = model.spec.template().hash();
    let (updated, old): (Vec<&ReplicaView>, Vec<&ReplicaView>) =
        active.iter().partition(|r| r.spec.template_hash() == current);
    let mut writes = Vec::new();
    let mut create = 0;
    let mut waiting = None;
    let mut notes = Vec::new();
    let object = format!("model/{}", model.name);
    let history = rollout::record_template(&stored.templates, &model.spec.template(), model.revision);
    if let (Some(h), false) = (&history, stored.templates.is_empty()) {
        let newest = h.last().map_or(0, |t| t.number);
        let message = format!("template {newest} ({current}) applied at model revision {}", model.revision);
        notes.push(objects::note(object.clone(), "RolloutStarted", message));
    }
    let canary = match (&model.spec.rollout.canary, old.is_empty()) {
        (Some(spec), false) => {
            let stored_canary = stored.rollout.as_ref().and_then(|r| r.canary.as_ref());
            let next = canary::advance(spec, stored_canary, &current, s.now_ms, s.canary_stats);
            if let Some(n) = canary_note(stored_canary, &next, spec.steps.len()) {
                notes.push(objects::note(object.clone(), n.0, n.1));
            }
            Some(next)
        }
        _ => None,
    };
    if let Some(c) = canary.as_ref().filter(|c| c.running()) {
        // A running canary: the new template's share of replicas, the old ones kept whole.
        let (old_live, paused) = (old.len() + holding, model.spec.rollout.paused);
        let mut extra: Vec<&&ReplicaView> = old.iter().collect();
        extra.sort_by_key(|r| (is_ready(r), phase_rank(r.phase()), std::cmp::Reverse(r.create_revision)));
        for r in extra.into_iter().take(old_live.saturating_sub(desired)) {
            retire(r, "scaled down", &mut compares, &mut ops);
        }
        if !paused {
            create = canary::canary_replicas(desired, c.weight).saturating_sub(updated.len());
        }
    } else if canary.as_ref().is_some_and(CanaryStatus::rolled_back) {
        for r in &updated {
            retire(r, "canary rolled back", &mut compares, &mut ops);
        }
    } else if !old.is_empty() {
        // An updated replica serves its share once its bound adapters are loaded too.
        let loaded = |r: &ReplicaView| {
            r.spec.adapters.iter().all(|b| s.loaded_adapters.get(&r.name).is_some_and(|l| l.contains(b.name.as_str())))
        };
        let rollout_ready = |r: &ReplicaView| is_ready(r) && (r.spec.template_hash() != current || loaded(r));
        let updated_ready: Vec<&ReplicaView> = updated.iter().copied().filter(|r| rollout_ready(r)).collect();
        let hold = rollout::adapter_hold(&s.pinned_adapters, &s.loaded_adapters, &updated_ready);
        let step = rollout::step(desired, holding, &updated, &old, &model.spec.rollout, &rollout_ready, hold);
        for (r, why) in &step.retire {
            retire(r, why, &mut compares, &mut ops);
        }
        if step.create > 0 || !step.retire.is_empty() {
            let retiring: Vec<String> = step.retire.iter().map(|(r, why)| format!("{} ({why})", r.name)).collect();
            let message = format!(
                "template {current}: creating {} updated replica(s); retiring {}",
                step.create,
                if retiring.is_empty() { "none".to_string() } else { retiring.join(", ") }
            );
            notes.push(objects::note(object.clone(), "RolloutStep", message));
        }
        create = step.create;
        waiting = step.waiting;
    } else if counted < desired {
        create = desired - counted;
    } else if counted > desired {
        // Least ready first, newest first within a phase.
        active.sort_by_key(|r| (phase_rank(r.phase()), std::cmp::Reverse(r.create_revision)));
        for r in active.iter().take((counted - desired).min(active.len())) {
            retire(r, "scaled down", &mut compares, &mut ops);
        }
    }
    if create > 0 && !hedged.is_empty() {
        let lost: BTreeSet<String> = hedged
            .iter()
            .map(|r| format!("{} on {}", r.name, r.spec.node.as_ref().map_or("", |n| n.as_str())))
            .collect();
        let message = format!(
            "creating {create} replica(s) while {} stop(s) counting: node not ready",
            lost.into_iter().collect::<Vec<_>>().join(", ")
        );
        notes.push(objects::note(object.clone(), "NodeNotReady", message));
    }
    if create > 0 {
        let create_ops = (0..create).map(|_| new_replica_op(model, &fresh.suffix(), fresh.uid()).1).collect();
        let model_cmp = Compare { key: key(Kind::Model, &model.name), revision: model.revision };
        writes.extend(txn(vec![model_cmp], create_ops).map(|c| objects::recorded(c, std::mem::take(&mut notes))));
    }
    // Surge drain: replicas on draining nodes go once enough replacements are Ready.
    let ready_active = active.iter().filter(|r| is_ready(r)).count();
    let ready_moving = moving.iter().filter(|r| is_ready(r)).count();
    let mut may_drain_ready = (ready_active + ready_moving).saturating_sub(desired);
    for r in &moving {
        let why = if on_draining(r) { "node draining" } else { "GPU failed" };
        if !is_ready(r) {
            retire(r, why, &mut compares, &mut ops);
        } else if may_drain_ready > 0 || ready_active >= desired {
            may_drain_ready = may_drain_ready.saturating_sub(1);
            retire(r, why, &mut compares, &mut ops);
        }
    }
    // The status describes the state these writes lead to.
    let mut projected = s.clone();
    for op in ops.iter().chain(writes.iter().flat_map(objects::txn_ops)) {
        match op {
            TxnOp::Delete { key } => drop(projected.replicas.remove(&key.name)),
            TxnOp::PutStatus { key, .. } => {
                if let Some(r) = projected.replicas.get_mut(&key.name) {
                    r.status.phase = ReplicaPhase::Draining;
                }
            }
            TxnOp::Put { key, spec, .. } => {
                if let Ok(spec) = serde_json::from_value(spec.clone()) {
                    let r = ReplicaView {
                        name: key.name.clone(),
                        revision: 0,
                        create_revision: u64::MAX,
                        uid: String::new(),
                        labels: Default::default(),
                        spec,
                        status: Default::default(),
                    };
                    projected.replicas.insert(key.name.clone(), r);
                }
            }
        }
    }
    // Retirements go first: a reader between the two entries (the scheduler, a client)
    // must never see the new replicas beside the old ones they replace, above the surge.
    if let Some(c) = txn(compares, ops) {
        writes.insert(0, objects::recorded(c, std::mem::take(&mut notes)));
    }
    let ready = projected
        .replicas
        .values()
        .filter(|r| r.phase() == ReplicaPhase::Ready && r.spec.node.as_ref().is_some_and(|n| !s.down_nodes.contains(n)))
        .count();
    let mut status = model_status(&projected, desired, ready);
    status.autoscaling = stored.autoscaling;
    status.templates = history.unwrap_or(stored.templates);
    if let Some(c) = canary.as_ref().filter(|c| c.rolled_back()) {
        for t in status.templates.iter_mut().filter(|t| t.hash == c.hash && t.rolled_back.is_empty()) {
            t.rolled_back = c.reason.clone();
        }
    }
    // Notes no write of this round carried go with the status.
    let mut status_notes = notes;
    let mut roll = rollout_status(&projected, model, desired, &current, &status.templates, &is_ready, waiting);
    if let Some(c) = &canary {
        if c.running() {
            let steps = model.spec.rollout.canary.as_ref().map_or(0, |s| s.steps.len());
            roll.state = "Progressing".into();
            roll.message = format!("canary step {} of {steps} at {}%: {}", c.step + 1, c.weight, c.reason);
        } else if c.rolled_back() {
            roll.state = "RolledBack".into();
            roll.message = format!("canary rolled back: {}", c.reason);
        }
    }
    roll.canary = canary;
    if roll.old_replicas > 0 {
        let reason = if roll.state == "Paused" { "RolloutPaused" } else { "RollingUpdate" };
        status.conditions[1] = cond("Progressing", roll.state != "Paused", reason, roll.message.clone());
    }
    let was_complete = stored.rollout.as_ref().is_none_or(|r| r.complete() && r.hash == roll.hash);
    if roll.complete() && !was_complete && status.templates.len() > 1 {
        let message = format!("every replica runs template {} ({})", roll.number, roll.hash);
        status_notes.push(objects::note(object.clone(), "RolloutComplete", message));
    }
    status.rollout = Some(roll);
    if model.status != status.to_json() {
        let put = Command::PutStatus {
            key: key(Kind::Model, &model.name),
            status: status.to_json(),
            expected_revision: Some(model.revision),
        };
        writes.push(objects::recorded(put, status_notes));
    }
    writes
}

/// A disaggregated model's decision: its members kept as its spec says (`members`), no
/// replica of its own (any left from before it was disaggregated drain), its members'
/// counts as its status.
fn decide_disaggregated(s: &ModelState, model: &ModelView, members: Vec<Command>, problems: &[String]) -> Vec<Command> {
    let (mut compares, mut ops) = (Vec::new(), Vec::new());
    retire_live(s, "model disaggregated: its member models serve it", &mut compares, &mut ops);
    let mut writes: Vec<Command> = txn(compares, ops).into_iter().chain(members).collect();
    let status = parent_status(&model.name, &s.members, problems);
    if model.status != status.to_json() {
        let key = key(Kind::Model, &model.name);
        writes.push(Command::PutStatus { key, status: status.to_json(), expected_revision: Some(model.revision) });
    }
    writes
}

/// The replica count a model should have: the autoscaler's decision when it autoscales
/// (before the first decision, `spec.replicas` within the autoscaling bounds), else
/// `spec.replicas`.
pub fn desired_replicas(model: &ModelView, autoscaling: Option<&crate::objects::AutoscalingStatus>) -> u32 {
    match (&model.spec.autoscaling, autoscaling) {
        (Some(_), Some(a)) => a.desired_replicas,
        (Some(a), None) => model.spec.replicas.clamp(a.min, a.max.max(a.min)),
        (None, _) => model.spec.replicas,
    }
}

/// The rollout part of a model's status, over the state the round's writes lead to.
fn rollout_status(
    s: &ModelState,
    model: &ModelView,
    desired: usize,
    current: &str,
    templates: &[rollout::TemplateRecord],
    is_ready: &dyn Fn(&ReplicaView) -> bool,
    waiting: Option<String>,
) -> RolloutStatus {
    let live = s
        .replicas
        .values()
        .filter(|r| !matches!(r.phase(), ReplicaPhase::Draining | ReplicaPhase::Stopped | ReplicaPhase::Failed));
    let (updated, old): (Vec<&ReplicaView>, Vec<&ReplicaView>) = live.partition(|r| r.spec.template_hash() == current);
    let updated_ready = updated.iter().filter(|r| is_ready(r)).count() as u32;
    let number = templates.iter().find(|t| t.hash == current).map_or(0, |t| t.number);
    let desired = desired as u32;
    let old_draining = s
        .replicas
        .values()
        .filter(|r| r.phase() == ReplicaPhase::Draining && r.spec.template_hash() != current)
        .count();
    let (state, message) = if old.is_empty() && old_draining > 0 {
        ("Progressing", format!("{old_draining} old replica(s) draining"))
    } else if old.is_empty() {
        let done = updated_ready >= desired;
        let state = if done { "Complete" } else { "Progressing" };
        (state, format!("{updated_ready} of {} updated replica(s) ready", updated.len()))
    } else if model.spec.rollout.paused {
        ("Paused", format!("{} of {} replicas updated; paused", updated.len(), updated.len() + old.len()))
    } else if let Some(w) = waiting {
        ("Waiting", format!("{} old replica(s) wait: {w}", old.len()))
    } else {
        ("Progressing", format!("{} updated ({updated_ready} ready), {} old replica(s) left", updated.len(), old.len()))
    };
    RolloutStatus {
        hash: current.to_owned(),
        number,
        updated_replicas: updated.len() as u32,
        updated_ready,
        old_replicas: old.len() as u32,
        state: state.into(),
        message,
        canary: None,
    }
}

/// The event for a canary's change between two rounds: a step passed, a promotion or a
/// rollback (none while it waits).
fn canary_note(before: Option<&CanaryStatus>, after: &CanaryStatus, steps: usize) -> Option<(&'static str, String)> {
    let same = before.is_some_and(|b| b.hash == after.hash && b.step == after.step && b.state == after.state);
    if same {
        return None;
    }
    Some(match after.state.as_str() {
        "RolledBack" => ("CanaryRolledBack", format!("template {}: {}", after.hash, after.reason)),
        "Promoted" => ("CanaryPromoted", format!("template {}: {}", after.hash, after.reason)),
        _ => (
            "CanaryStep",
            format!(
                "template {}: step {} of {steps} at {}%: {}",
                after.hash,
                after.step + 1,
                after.weight,
                after.reason
            ),
        ),
    })
}

fn cond(t: &str, ok: bool, reason: &str, message: String) -> Condition {
    Condition { type_: t.into(), status: if ok { "True" } else { "False" }.into(), reason: reason.into(), message }
}

/// The status document: counts, and conditions naming what holds the model back.
pub fn model_status(s: &ModelState, desired: usize, ready: usize) -> ModelStatus {
    let live = |p: ReplicaPhase| !matches!(p, ReplicaPhase::Draining | ReplicaPhase::Stopped | ReplicaPhase::Failed);
    let pending: Vec<&ReplicaView> =
        s.replicas.values().filter(|r| r.phase() == ReplicaPhase::Pending && live(r.phase())).collect();
    let failed: Vec<&ReplicaView> = s.replicas.values().filter(|r| r.phase() == ReplicaPhase::Failed).collect();
    let starting =
        s.replicas.values().filter(|r| matches!(r.phase(), ReplicaPhase::Scheduled | ReplicaPhase::Starting)).count();
    let draining = s.replicas.values().filter(|r| r.phase() == ReplicaPhase::Draining).count();
    let ready_msg = format!("{ready}/{desired} replicas ready");
    let (reason, message) = if let Some(p) = pending.iter().find(|r| !r.status.reason.is_empty()) {
        ("Unschedulable", format!("{} replica(s) pending: {}", pending.len(), p.status.reason))
    } else if let Some(f) = failed.first() {
        ("ReplicaFailed", format!("replica {} failed: {}", f.name, f.status.reason))
    } else if !pending.is_empty() || starting > 0 {
        ("Starting", format!("{} pending, {starting} starting", pending.len()))
    } else if draining > 0 {
        ("Draining", format!("{draining} replica(s) draining"))
    } else {
        ("Stable", ready_msg.clone())
    };
    let progressing = !pending.is_empty() || starting > 0 || draining > 0;
    let all_ready = ready >= desired;
    ModelStatus {
        autoscaling: None,
        roles: Vec::new(),
        rollout: None,
        templates: Vec::new(),
        desired_replicas: desired as u32,
        ready_replicas: ready as u32,
        conditions: vec![
            cond(
                "Ready",
                all_ready,
                if all_ready { "AllReplicasReady" } else { reason },
                if all_ready { ready_msg } else { message.clone() },
            ),
            cond("Progressing", progressing, reason, message),
        ],
    }
}

/// Messages of a model actor.
#[derive(Debug, PartialEq)]
pub enum ModelMsg {
    /// The model (`None`) or one of its replicas changed in the store.
    Changed(Option<ObjectName>),
    /// Re-read everything from the store.
    Resync,
    /// Run a reconcile (self-scheduled, coalesced).
    Reconcile,
    Tick,
}

pub struct ModelActor;

/// The names `model`'s member Models would have, by role.
fn member_names(model: &ObjectName) -> impl Iterator<Item = (flotilla_api::spec::EngineRole, ObjectName)> + '_ {
    flotilla_api::spec::EngineRole::ALL
        .into_iter()
        .filter_map(move |role| flotilla_api::spec::member_name(model, role).ok().map(|n| (role, n)))
}

pub struct ModelArgs {
    pub ctx: Arc<Ctx>,
    pub name: ObjectName,
    /// The model's replicas as the supervisor listed them.
    pub replicas: Vec<ReplicaView>,
}

pub struct ModelActorState {
    ctx: Arc<Ctx>,
    s: ModelState,
    queued: bool,
    /// The inputs' fingerprint ([`ModelActorState::inputs_fingerprint`]) of the last
    /// decision that wrote nothing: a tick with the same inputs and no clock in play skips
    /// deciding again. A leader with 6,400 idle Models spent 44% of a core on these ticks.
    quiet: Option<u64>,
}

impl ModelActorState {
    /// The span of this reconcile when it acts on a traced apply (one that left its trace
    /// context on this leader: `flotilla_cluster::trace_links`), else a disabled span.
    fn traced_span(&self) -> tracing::Span {
        let Some(model) = &self.s.model else { return tracing::Span::none() };
        let links = self.ctx.handle.trace_links();
        if links.is_empty() {
            return tracing::Span::none();
        }
        let Some(tp) = links.take(&key(Kind::Model, &self.s.name), model.revision) else {
            return tracing::Span::none();
        };
        let span = tracing::debug_span!(
            "controller.model",
            model = %self.s.name,
            revision = i64::try_from(model.revision).unwrap_or(i64::MAX),
            replicas_created = tracing::field::Empty,
            writes = tracing::field::Empty,
        );
        flotilla_telemetry::propagation::set_parent_traceparent(&span, &tp);
        span
    }

    /// What a decision of this model reads from the store, as revisions: the model, its
    /// replicas, its member Models and the nodes its replicas are bound to. No object is
    /// parsed; equal fingerprints mean equal stored inputs.
    fn inputs_fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut keys = vec![key(Kind::Model, &self.s.name)];
        keys.extend(member_names(&self.s.name).map(|(_, member)| key(Kind::Model, &member)));
        let nodes: BTreeSet<&ObjectName> =
            self.s.replicas.values().flat_map(|r| r.spec.bindings().into_iter().map(|(n, _)| n)).collect();
        keys.extend(nodes.into_iter().map(|n| key(Kind::Node, n)));
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for (k, revision) in keys.iter().zip(self.ctx.handle.reader().revisions(&keys)) {
            (k, revision).hash(&mut h);
        }
        for (name, r) in &self.s.replicas {
            (name, r.revision).hash(&mut h);
        }
        h.finish()
    }

    /// Whether a decision depends on more than the stored inputs: the clock (a Failed
    /// replica waits out its replacement backoff; a canary step its interval) or what the
    /// agents report in memory (a rollout reads the adapters each engine has loaded).
    fn reads_more_than_the_store(&self) -> bool {
        self.s.rolling() || self.s.replicas.values().any(|r| r.phase() == ReplicaPhase::Failed)
    }

    fn refresh_model(&mut self) {
        let (o, _) = self.ctx.handle.reader().get(&key(Kind::Model, &self.s.name));
        self.s.model = o.and_then(|o| ModelView::from_stored(&o).map_err(|e| tracing::warn!(error = %e)).ok());
    }

    /// The Models under this model's member names (two reads: a member changed by someone
    /// else is seen at the next tick).
    fn refresh_members(&mut self) {
        self.s.members.clear();
        for (role, name) in member_names(&self.s.name) {
            let (o, _) = self.ctx.handle.reader().get(&key(Kind::Model, &name));
            if let Some(m) = o.and_then(|o| ModelView::from_stored(&o).ok()) {
                self.s.members.insert(role, m);
            }
        }
    }

    fn refresh_replica(&mut self, name: &ObjectName) {
        let (o, _) = self.ctx.handle.reader().get(&key(Kind::Replica, name));
        match o.and_then(|o| ReplicaView::from_stored(&o).ok()) {
            Some(r) => {
                self.s.replicas.insert(name.clone(), r);
            }
            None => {
                self.s.replicas.remove(name);
            }
        }
    }

    fn resync(&mut self) {
        self.refresh_model();
        let sel = LabelSelector::for_model(&self.s.name);
        let (list, _) = self.ctx.handle.reader().list(Kind::Replica, &sel);
        self.s.replicas =
            list.iter().filter_map(|o| ReplicaView::from_stored(o).ok()).map(|r| (r.name.clone(), r)).collect();
    }

    /// Node facts the decision needs, read fresh for the nodes this model uses.
    fn refresh_nodes(&mut self) {
        let nodes = BoundNodes::read(&self.ctx.handle.reader(), self.s.replicas.values());
        self.s.draining_nodes = nodes.draining;
        self.s.down_nodes = nodes.down;
        self.s.failed_gpus = nodes.failed_gpus;
        let now = Instant::now();
        self.s.now = now;
        let failed: BTreeSet<&ObjectName> =
            self.s.replicas.values().filter(|r| r.phase() == ReplicaPhase::Failed).map(|r| &r.name).collect();
        self.s.failed_since.retain(|n, _| failed.contains(n));
        for n in failed {
            self.s.failed_since.entry(n.clone()).or_insert(now);
        }
        // Rollout-only facts: a steady model costs no adapter scan or canary lookup.
        let rolling = self.s.rolling();
        self.refresh_adapters(rolling);
        self.refresh_canary(rolling);
    }

    /// The wall clock, and a canary's figures since its step began (only while one runs).
    fn refresh_canary(&mut self, rolling: bool) {
        self.s.now_ms = flotilla_api::civil::unix_ms();
        self.s.canary_stats = Default::default();
        let Some(model) = self.s.model.as_ref().filter(|m| rolling && m.spec.rollout.canary.is_some()) else { return };
        let current = model.spec.template().hash();
        let stored = ModelStatus::of(model).rollout.and_then(|r| r.canary).filter(|c| c.hash == current);
        let since = stored.map_or(self.s.now_ms, |c| c.step_started_ms);
        let book = crate::shared::lock(&self.ctx.canary);
        self.s.canary_stats =
            (book.stats(&self.s.name, &current, false, since), book.stats(&self.s.name, &current, true, since));
    }

    /// The pinned adapters of this base model and what each engine reports loaded: read
    /// only while a rollout runs, so a steady model costs no adapter scan.
    fn refresh_adapters(&mut self, rolling: bool) {
        self.s.pinned_adapters.clear();
        self.s.loaded_adapters.clear();
        if !rolling {
            return;
        }
        let (list, _) = self.ctx.handle.reader().list(Kind::Adapter, &LabelSelector::default());
        for o in &list {
            let Ok(a) = crate::adapters::AdapterView::from_stored(o) else { continue };
            let pinned = a.spec.replicas.pinned();
            if a.spec.base_model == self.s.name && pinned > 0 {
                self.s.pinned_adapters.insert(a.name, pinned);
            }
        }
        let live = crate::shared::lock(&self.ctx.live);
        for r in self.s.replicas.values() {
            let report = r.spec.node.as_ref().and_then(|n| live.get(n)).and_then(|l| l.engines.get(r.name.as_str()));
            if let Some(e) = report {
                self.s.loaded_adapters.insert(r.name.clone(), e.loaded_adapters.iter().cloned().collect());
            }
        }
    }
}

impl Actor for ModelActor {
    type Msg = ModelMsg;
    type State = ModelActorState;
    type Arguments = ModelArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ModelMsg>,
        args: ModelArgs,
    ) -> Result<ModelActorState, ActorProcessingErr> {
        let s = ModelState {
            name: args.name,
            model: None,
            replicas: args.replicas.into_iter().map(|r| (r.name.clone(), r)).collect(),
            draining_nodes: BTreeSet::new(),
            down_nodes: BTreeSet::new(),
            failed_gpus: BTreeMap::new(),
            failed_since: HashMap::new(),
            now: Instant::now(),
            pinned_adapters: BTreeMap::new(),
            loaded_adapters: HashMap::new(),
            now_ms: 0,
            canary_stats: Default::default(),
            members: Members::new(),
        };
        let mut st = ModelActorState { ctx: args.ctx, s, queued: true, quiet: None };
        st.refresh_model();
        myself.send_interval(ActorsConfig::ms(st.ctx.config.reconcile_interval_ms), || ModelMsg::Tick);
        myself.send_message(ModelMsg::Reconcile)?;
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<ModelMsg>,
        msg: ModelMsg,
        st: &mut ModelActorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ModelMsg::Changed(None) => st.refresh_model(),
            ModelMsg::Changed(Some(r)) => st.refresh_replica(&r),
            ModelMsg::Resync => st.resync(),
            ModelMsg::Tick => {
                // Periodic decisions catch what no event announces (a node's facts, the
                // clock); with the same stored inputs as a decision that wrote nothing and
                // no clock in play, this one would decide the same nothing.
                if st.quiet.is_some() && !st.reads_more_than_the_store() && st.quiet == Some(st.inputs_fingerprint()) {
                    return Ok(());
                }
            }
            ModelMsg::Reconcile => {
                st.queued = false;
                let inputs = st.inputs_fingerprint();
                st.refresh_nodes();
                st.refresh_members();
                let span = st.traced_span();
                let mut cmds = decide(&st.s, &st.ctx.config, &mut RandomFresh);
                st.ctx.metrics.reconciled(Controller::Model);
                if let Some(tp) = flotilla_telemetry::propagation::traceparent(&span) {
                    // the scheduler's binding and the agent's start continue this trace
                    objects::label_traced(&mut cmds, &tp);
                }
                st.quiet = cmds.is_empty().then_some(inputs);
                if cmds.is_empty() {
                    if st.s.model.is_none() && st.s.replicas.is_empty() {
                        tracing::info!(model = %st.s.name, "model deleted and drained; actor stops");
                        myself.stop(None);
                    }
                    return Ok(());
                }
                let creates: u64 = cmds
                    .iter()
                    .map(|c| objects::txn_ops(c).iter().filter(|o| matches!(o, TxnOp::Put { .. })).count() as u64)
                    .sum();
                if !span.is_disabled() {
                    span.record("replicas_created", creates as i64);
                    span.record("writes", cmds.len() as i64);
                }
                let out = execute(&st.ctx, Controller::Model, cmds).instrument(span).await.map_err(|e| {
                    tracing::warn!(model = %st.s.name, error = %e, "uncertain write; stopping for a rebuild");
                    Box::new(e) as ActorProcessingErr
                })?;
                if out.refused == 0 {
                    st.ctx.metrics.replicas_created.inc_by(creates);
                }
                // Our own writes are applied locally by now: read them back before deciding again.
                st.resync();
                if out.refused > 0 {
                    st.queued = true;
                    myself.send_after(ActorsConfig::ms(20), || ModelMsg::Reconcile);
                }
                return Ok(());
            }
        }
        if !st.queued {
            st.queued = true;
            myself.send_message(ModelMsg::Reconcile)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
