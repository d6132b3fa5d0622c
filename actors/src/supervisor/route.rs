//! The Supervisor's routing, pure: from what is running and one input (a store change
//! event, a message, or a full snapshot of the store) the commands that start controllers,
//! tell running ones what changed, and keep the assignment hub current. The supervisor
//! executes them in order; a message to a child that does not run (its start failed) is
//! dropped.
//!
//! ```text
//!  Model event   ─> Adapters(m) Changed? · Spawn Autoscaler(m)? · Model(m) Changed / Spawn
//!  Node event    ─> Node(n) Changed / Spawn · Scheduler Nudge
//!  Replica event ─> Assign · Adapters(m) Changed / Spawn · Model(m) Changed(r) / Spawn
//!                   · Node(n) Changed(r) · Scheduler Nudge (deleted, Pending, Failed)
//!  Adapter event ─> Adapters(base) Changed / Spawn
//!  Snapshot      ─> ResetHub · Spawn or resync every model, node, adapter controller · Nudge
//! ```
use std::collections::{BTreeMap, BTreeSet, HashSet};

use flotilla_api::spec::ReplicaPhase;
use flotilla_api::{EventType, Kind, ObjectName, StoredObject, WatchEvent};

use super::SupervisorMsg;
use crate::adapters::actor::AdapterMsg;
use crate::autoscale::actor::AutoscalerMsg;
use crate::model::ModelMsg;
use crate::node::NodeMsg;
use crate::objects::{ReplicaView, MODEL_LABEL};
use crate::scheduler::SchedulerMsg;

/// Which controller a child actor is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Child {
    Scheduler,
    Model(ObjectName),
    Node(ObjectName),
    /// The adapter controller of a base model.
    Adapters(ObjectName),
    /// The autoscaler of a model with `spec.autoscaling`.
    Autoscaler(ObjectName),
}

/// What the supervisor does, in order.
#[derive(Debug, PartialEq)]
pub enum Command {
    /// Start a child; `Some` replicas: those it starts with, already read (else it reads
    /// them). A node child starts only if its node is stored.
    Spawn(Child, Option<Vec<ReplicaView>>),
    /// Deliver a message to the model actor of this name, if it runs.
    Model(ObjectName, ModelMsg),
    /// ... to the node actor of this name, if it runs.
    Node(ObjectName, NodeMsg),
    /// ... to the adapter controller of this base model, if it runs.
    Adapters(ObjectName, AdapterMsg),
    /// ... to the autoscaler of this model, if it runs.
    Autoscaler(ObjectName, AutoscalerMsg),
    /// ... to the scheduler, if it runs.
    Scheduler(SchedulerMsg),
    /// Tell the assignment hub this replica changed (`None`: deleted).
    Assign(ObjectName, Option<Box<ReplicaView>>),
    /// Reset the assignment hub to these replicas.
    ResetHub(Vec<ReplicaView>),
}

/// What the supervisor has running.
pub trait Running {
    fn runs(&self, child: &Child) -> bool;
}

impl Running for HashSet<Child> {
    fn runs(&self, child: &Child) -> bool {
        self.contains(child)
    }
}

/// The base model an `Adapter` object names (also for the object as it was at deletion).
pub fn base_of(o: &StoredObject) -> Option<ObjectName> {
    o.spec.get("base_model").and_then(|b| b.as_str()).and_then(|b| b.parse().ok())
}

/// The model a replica serves: its label, else its spec.
pub fn model_of(r: &ReplicaView) -> ObjectName {
    r.labels.get(MODEL_LABEL).and_then(|m| m.parse().ok()).unwrap_or_else(|| r.spec.model.clone())
}

fn autoscaling(o: &StoredObject) -> bool {
    !o.spec["autoscaling"].is_null()
}

/// Tell the scheduler something placement depends on changed.
fn nudge(running: &impl Running, out: &mut Vec<Command>) {
    if running.runs(&Child::Scheduler) {
        out.push(Command::Scheduler(SchedulerMsg::Nudge));
    }
}

/// Tell the adapter controller of `base` something changed, starting it if `start`.
fn adapters_changed(running: &impl Running, base: &ObjectName, start: bool, out: &mut Vec<Command>) {
    let child = Child::Adapters(base.clone());
    if running.runs(&child) {
        out.push(Command::Adapters(base.clone(), AdapterMsg::Changed));
    } else if start {
        out.push(Command::Spawn(child, None));
    }
}

/// Tell the model actor `model` something changed, or start it unless `deleted`.
fn model_changed(
    running: &impl Running,
    model: &ObjectName,
    what: Option<ObjectName>,
    deleted: bool,
) -> Option<Command> {
    let child = Child::Model(model.clone());
    if running.runs(&child) {
        Some(Command::Model(model.clone(), ModelMsg::Changed(what)))
    } else {
        (!deleted).then_some(Command::Spawn(child, None))
    }
}

/// The commands for one store change event.
pub fn route(running: &impl Running, ev: &WatchEvent) -> Vec<Command> {
    let name = ev.object.key.name.clone();
    let deleted = ev.event_type == EventType::Delete;
    let mut out = Vec::new();
    match ev.object.key.kind {
        Kind::Model => {
            adapters_changed(running, &name, false, &mut out);
            let autoscaler = Child::Autoscaler(name.clone());
            if !deleted && autoscaling(&ev.object) && !running.runs(&autoscaler) {
                out.push(Command::Spawn(autoscaler, None));
            }
            out.extend(model_changed(running, &name, None, deleted));
        }
        Kind::Node => {
            if running.runs(&Child::Node(name.clone())) {
                out.push(Command::Node(name, NodeMsg::Changed(None)));
            } else if !deleted {
                out.push(Command::Spawn(Child::Node(name), None));
            }
            nudge(running, &mut out);
        }
        Kind::Replica => {
            let Ok(r) = ReplicaView::from_stored(&ev.object) else { return out };
            out.push(Command::Assign(name.clone(), (!deleted).then(|| Box::new(r.clone()))));
            let model = model_of(&r);
            adapters_changed(running, &model, !r.spec.adapters.is_empty(), &mut out);
            out.extend(model_changed(running, &model, Some(name.clone()), deleted));
            // every node it binds: a gang's members' too
            for (n, _) in r.spec.bindings().into_iter().filter(|(n, _)| running.runs(&Child::Node((*n).clone()))) {
                out.push(Command::Node(n.clone(), NodeMsg::Changed(Some(name.clone()))));
            }
            if deleted || matches!(r.phase(), ReplicaPhase::Pending | ReplicaPhase::Failed) {
                nudge(running, &mut out);
            }
        }
        Kind::Adapter => {
            if let Some(base) = base_of(&ev.object) {
                adapters_changed(running, &base, !deleted, &mut out);
            }
        }
        Kind::Tenant | Kind::Token | Kind::Cluster | Kind::FederatedModel | Kind::FederatedAdapter => {}
    }
    out
}

/// The commands for a message other than `StoreChanged` (which reads events to route).
pub fn on_message(running: &impl Running, msg: SupervisorMsg) -> Vec<Command> {
    match msg {
        SupervisorMsg::StoreChanged => Vec::new(),
        SupervisorMsg::Heard(node) => {
            let heard = running.runs(&Child::Node(node.clone()));
            heard.then_some(Command::Node(node, NodeMsg::Heard)).into_iter().collect()
        }
        SupervisorMsg::Wake(model) => {
            let wake = running.runs(&Child::Autoscaler(model.clone()));
            wake.then_some(Command::Autoscaler(model, AutoscalerMsg::Wake)).into_iter().collect()
        }
        SupervisorMsg::Demand { base, adapter, demand } => {
            let child = Child::Adapters(base.clone());
            let start = (!running.runs(&child)).then_some(Command::Spawn(child, None));
            start.into_iter().chain([Command::Adapters(base, AdapterMsg::Demand(adapter, demand))]).collect()
        }
        SupervisorMsg::Respawn(child) => {
            (!running.runs(&child)).then_some(Command::Spawn(child, None)).into_iter().collect()
        }
    }
}

/// Everything stored that the controllers follow, read at once.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub replicas: Vec<ReplicaView>,
    pub models: Vec<StoredObject>,
    pub nodes: Vec<StoredObject>,
    pub adapters: Vec<StoredObject>,
}

/// The commands that bring the running children in line with a snapshot: the hub reset,
/// missing controllers started with their replicas, running ones told to re-read.
pub fn sync(running: &impl Running, s: &Snapshot) -> Vec<Command> {
    let mut out = vec![Command::ResetHub(s.replicas.clone())];
    let mut by_model: BTreeMap<ObjectName, Vec<ReplicaView>> = BTreeMap::new();
    let mut by_node: BTreeMap<ObjectName, Vec<ReplicaView>> = BTreeMap::new();
    for r in &s.replicas {
        by_model.entry(model_of(r)).or_default().push(r.clone());
        for (n, _) in r.spec.bindings() {
            by_node.entry(n.clone()).or_default().push(r.clone());
        }
    }
    for m in &s.models {
        by_model.entry(m.key.name.clone()).or_default();
        let autoscaler = Child::Autoscaler(m.key.name.clone());
        if autoscaling(m) && !running.runs(&autoscaler) {
            out.push(Command::Spawn(autoscaler, None));
        }
    }
    for n in &s.nodes {
        let name = n.key.name.clone();
        if running.runs(&Child::Node(name.clone())) {
            out.push(Command::Node(name, NodeMsg::Changed(None)));
        } else {
            let replicas = by_node.remove(&name).unwrap_or_default();
            out.push(Command::Spawn(Child::Node(name), Some(replicas)));
        }
    }
    for (name, replicas) in by_model {
        if running.runs(&Child::Model(name.clone())) {
            out.push(Command::Model(name, ModelMsg::Resync));
        } else {
            out.push(Command::Spawn(Child::Model(name), Some(replicas)));
        }
    }
    let mut bases: BTreeSet<ObjectName> = s.adapters.iter().filter_map(base_of).collect();
    bases.extend(s.replicas.iter().filter(|r| !r.spec.adapters.is_empty()).map(model_of));
    for base in bases {
        adapters_changed(running, &base, true, &mut out);
    }
    if !running.runs(&Child::Scheduler) {
        out.push(Command::Spawn(Child::Scheduler, None));
    }
    // Running now, or just started by the command before.
    out.push(Command::Scheduler(SchedulerMsg::Nudge));
    out
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
