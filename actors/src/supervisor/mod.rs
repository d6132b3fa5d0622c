//! The Supervisor: started when this server becomes leader, stopped when it loses
//! leadership. It rebuilds every controller from the state machine (one Model actor per
//! model, one Node actor per node, the Scheduler), follows the store's change events and
//! routes each to the actors it concerns (and to the assignment hub), and rebuilds any
//! actor that stopped on an uncertain write.
//!
//! ```text
//!  StoreReader ──revision──> forwarder ──StoreChanged──> Supervisor ─┬─> Model actors
//!                                                       events_after  ├─> Node actors
//!                                                                     ├─> Scheduler
//!                                                                     └─> Hub (Assign)
//! ```
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use flotilla_api::spec::ReplicaPhase;
use flotilla_api::{EventType, Kind, LabelSelector, ObjectName, WatchEvent};
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::adapters::actor::{AdapterActor, AdapterArgs, AdapterMsg};
use crate::adapters::Demand;
use crate::autoscale::actor::{AutoscalerActor, AutoscalerArgs, AutoscalerMsg};
use crate::config::ActorsConfig;
use crate::metrics::Metrics;
use crate::model::{ModelActor, ModelArgs, ModelMsg};
use crate::node::{NodeActor, NodeArgs, NodeMsg};
use crate::objects::{key, NodeView, ReplicaView, MODEL_LABEL};
use crate::scheduler::{Scheduler, SchedulerMsg};
use crate::shared::Ctx;

/// Events read per batch.
const EVENT_BATCH: usize = 4096;

#[derive(Debug)]
pub enum SupervisorMsg {
    /// The store revision moved: read and route the new events.
    StoreChanged,
    /// An agent was heard from (after registering or a silence).
    Heard(ObjectName),
    /// Rebuild a child that stopped, if the store still calls for it.
    Respawn(Child),
    /// Requests wait at a gateway for this model (at zero replicas): evaluate it now.
    Wake(ObjectName),
    /// `AdapterService.EnsureLoaded` waits for an adapter of this base model.
    Demand { base: ObjectName, adapter: ObjectName, demand: Demand },
}

/// Which controller a child actor is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Child {
    Scheduler,
    Model(ObjectName),
    Node(ObjectName),
    /// The adapter controller of a base model.
    Adapters(ObjectName),
    /// The autoscaler of a model with `spec.autoscaling`.
    Autoscaler(ObjectName),
}

pub struct Supervisor;

pub struct SupervisorState {
    ctx: Arc<Ctx>,
    after: u64,
    pending: Arc<AtomicBool>,
    forwarder: Option<tokio::task::JoinHandle<()>>,
    scheduler: Option<ActorRef<SchedulerMsg>>,
    models: HashMap<ObjectName, ActorRef<ModelMsg>>,
    nodes: HashMap<ObjectName, ActorRef<NodeMsg>>,
    adapters: HashMap<ObjectName, ActorRef<AdapterMsg>>,
    autoscalers: HashMap<ObjectName, ActorRef<AutoscalerMsg>>,
    children: HashMap<ActorId, Child>,
}

/// The base model an `Adapter` object names (also for the object as it was at deletion).
fn base_of(o: &flotilla_api::StoredObject) -> Option<ObjectName> {
    o.spec.get("base_model").and_then(|b| b.as_str()).and_then(|b| b.parse().ok())
}

/// Whether the adapter controller of `base` has work: an adapter names it, or one of its
/// replicas still holds a binding.
fn adapters_wanted(ctx: &Ctx, base: &ObjectName) -> bool {
    let reader = ctx.handle.reader();
    let all = LabelSelector::default();
    reader.list(Kind::Adapter, &all).0.iter().any(|o| base_of(o).as_ref() == Some(base))
        || reader
            .list(Kind::Replica, &LabelSelector::for_model(base))
            .0
            .iter()
            .filter_map(|o| ReplicaView::from_stored(o).ok())
            .any(|r| !r.spec.adapters.is_empty())
}

/// Whether the stored model `name` asks for autoscaling.
fn autoscales(ctx: &Ctx, name: &ObjectName) -> bool {
    ctx.handle.reader().get(&key(Kind::Model, name)).0.is_some_and(|o| !o.spec["autoscaling"].is_null())
}

fn model_of(r: &ReplicaView) -> ObjectName {
    r.labels.get(MODEL_LABEL).and_then(|m| m.parse().ok()).unwrap_or_else(|| r.spec.model.clone())
}

impl SupervisorState {
    fn replicas_where(&self, f: impl Fn(&ReplicaView) -> bool) -> Vec<ReplicaView> {
        let (list, _) = self.ctx.handle.reader().list(Kind::Replica, &LabelSelector::default());
        list.iter().filter_map(|o| ReplicaView::from_stored(o).ok()).filter(|r| f(r)).collect()
    }

    async fn spawn(&mut self, me: &ActorCell, child: Child, replicas: Option<Vec<ReplicaView>>) {
        let ctx = self.ctx.clone();
        let id = match &child {
            Child::Scheduler => match Actor::spawn_linked(None, Scheduler, ctx, me.clone()).await {
                Ok((a, _)) => {
                    self.scheduler = Some(a.clone());
                    Some(a.get_id())
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the scheduler");
                    None
                }
            },
            Child::Model(name) => {
                let replicas = replicas.unwrap_or_else(|| {
                    let sel = LabelSelector::for_model(name);
                    let (list, _) = self.ctx.handle.reader().list(Kind::Replica, &sel);
                    list.iter().filter_map(|o| ReplicaView::from_stored(o).ok()).collect()
                });
                let args = ModelArgs { ctx, name: name.clone(), replicas };
                match Actor::spawn_linked(None, ModelActor, args, me.clone()).await {
                    Ok((a, _)) => {
                        self.models.insert(name.clone(), a.clone());
                        Some(a.get_id())
                    }
                    Err(e) => {
                        tracing::error!(model = %name, error = %e, "cannot start a model actor");
                        None
                    }
                }
            }
            Child::Adapters(base) => {
                let args = AdapterArgs { ctx, base: base.clone() };
                match Actor::spawn_linked(None, AdapterActor, args, me.clone()).await {
                    Ok((a, _)) => {
                        self.adapters.insert(base.clone(), a.clone());
                        Some(a.get_id())
                    }
                    Err(e) => {
                        tracing::error!(base = %base, error = %e, "cannot start an adapter controller");
                        None
                    }
                }
            }
            Child::Autoscaler(model) => {
                let args = AutoscalerArgs { ctx, model: model.clone() };
                match Actor::spawn_linked(None, AutoscalerActor, args, me.clone()).await {
                    Ok((a, _)) => {
                        self.autoscalers.insert(model.clone(), a.clone());
                        Some(a.get_id())
                    }
                    Err(e) => {
                        tracing::error!(model = %model, error = %e, "cannot start an autoscaler");
                        None
                    }
                }
            }
            Child::Node(name) => {
                let (o, _) = self.ctx.handle.reader().get(&key(Kind::Node, name));
                let Some(node) = o.and_then(|o| NodeView::from_stored(&o).ok()) else { return };
                let replicas = replicas.unwrap_or_else(|| self.replicas_where(|r| r.spec.node.as_ref() == Some(name)));
                let args = NodeArgs { ctx, node, replicas };
                match Actor::spawn_linked(None, NodeActor, args, me.clone()).await {
                    Ok((a, _)) => {
                        self.nodes.insert(name.clone(), a.clone());
                        Some(a.get_id())
                    }
                    Err(e) => {
                        tracing::error!(node = %name, error = %e, "cannot start a node actor");
                        None
                    }
                }
            }
        };
        if let Some(id) = id {
            self.children.insert(id, child);
        }
    }

    /// Lists everything, resets the hub, starts missing actors and re-syncs running ones.
    async fn full_sync(&mut self, me: &ActorCell) {
        let reader = self.ctx.handle.reader();
        self.after = reader.revision();
        let all = LabelSelector::default();
        let replicas: Vec<ReplicaView> =
            reader.list(Kind::Replica, &all).0.iter().filter_map(|o| ReplicaView::from_stored(o).ok()).collect();
        self.ctx.hub.reset(&replicas);
        let mut by_model: BTreeMap<ObjectName, Vec<ReplicaView>> = BTreeMap::new();
        let mut by_node: BTreeMap<ObjectName, Vec<ReplicaView>> = BTreeMap::new();
        for r in &replicas {
            by_model.entry(model_of(r)).or_default().push(r.clone());
            if let Some(n) = &r.spec.node {
                by_node.entry(n.clone()).or_default().push(r.clone());
            }
        }
        for m in reader.list(Kind::Model, &all).0 {
            by_model.entry(m.key.name.clone()).or_default();
            if !m.spec["autoscaling"].is_null() && !self.autoscalers.contains_key(&m.key.name) {
                self.spawn(me, Child::Autoscaler(m.key.name.clone()), None).await;
            }
        }
        for n in reader.list(Kind::Node, &all).0 {
            let name = n.key.name.clone();
            match self.nodes.get(&name) {
                Some(a) => drop(a.send_message(NodeMsg::Changed(None))),
                None => {
                    self.spawn(me, Child::Node(name.clone()), Some(by_node.remove(&name).unwrap_or_default())).await
                }
            }
        }
        for (name, reps) in by_model {
            match self.models.get(&name) {
                Some(a) => drop(a.send_message(ModelMsg::Resync)),
                None => self.spawn(me, Child::Model(name), Some(reps)).await,
            }
        }
        let mut bases: std::collections::BTreeSet<ObjectName> =
            reader.list(Kind::Adapter, &all).0.iter().filter_map(base_of).collect();
        bases.extend(replicas.iter().filter(|r| !r.spec.adapters.is_empty()).map(model_of));
        for base in bases {
            match self.adapters.get(&base) {
                Some(a) => drop(a.send_message(AdapterMsg::Changed)),
                None => self.spawn(me, Child::Adapters(base), None).await,
            }
        }
        if self.scheduler.is_none() {
            self.spawn(me, Child::Scheduler, None).await;
        }
        self.nudge_scheduler();
    }

    /// Tells the adapter controller of `base` that something changed, starting it if
    /// `start` and it is not running.
    async fn adapters_changed(&mut self, me: &ActorCell, base: &ObjectName, start: bool) {
        match self.adapters.get(base) {
            Some(a) => drop(a.send_message(AdapterMsg::Changed)),
            None if start => self.spawn(me, Child::Adapters(base.clone()), None).await,
            None => {}
        }
    }

    fn nudge_scheduler(&self) {
        if let Some(s) = &self.scheduler {
            let _ = s.send_message(SchedulerMsg::Nudge);
        }
    }

    async fn route(&mut self, me: &ActorCell, ev: &WatchEvent) {
        let name = ev.object.key.name.clone();
        let deleted = ev.event_type == EventType::Delete;
        match ev.object.key.kind {
            Kind::Model => {
                self.adapters_changed(me, &name, false).await;
                if !deleted && !ev.object.spec["autoscaling"].is_null() && !self.autoscalers.contains_key(&name) {
                    self.spawn(me, Child::Autoscaler(name.clone()), None).await;
                }
                match self.models.get(&name) {
                    Some(a) => drop(a.send_message(ModelMsg::Changed(None))),
                    None if !deleted => self.spawn(me, Child::Model(name), None).await,
                    None => {}
                }
            }
            Kind::Node => {
                match self.nodes.get(&name) {
                    Some(a) => drop(a.send_message(NodeMsg::Changed(None))),
                    None if !deleted => self.spawn(me, Child::Node(name), None).await,
                    None => {}
                }
                self.nudge_scheduler();
            }
            Kind::Replica => {
                let Ok(r) = ReplicaView::from_stored(&ev.object) else { return };
                self.ctx.hub.update(&name, if deleted { None } else { Some(&r) });
                let model = model_of(&r);
                self.adapters_changed(me, &model, !r.spec.adapters.is_empty()).await;
                match self.models.get(&model) {
                    Some(a) => drop(a.send_message(ModelMsg::Changed(Some(name.clone())))),
                    None if !deleted => self.spawn(me, Child::Model(model), None).await,
                    None => {}
                }
                if let Some(a) = r.spec.node.as_ref().and_then(|n| self.nodes.get(n)) {
                    let _ = a.send_message(NodeMsg::Changed(Some(name)));
                }
                if deleted || matches!(r.phase(), ReplicaPhase::Pending | ReplicaPhase::Failed) {
                    self.nudge_scheduler();
                }
            }
            Kind::Adapter => {
                if let Some(base) = base_of(&ev.object) {
                    self.adapters_changed(me, &base, !deleted).await;
                }
            }
            Kind::Tenant => {}
        }
    }

    async fn catch_up(&mut self, me: &ActorCell) {
        self.pending.store(false, Ordering::SeqCst);
        let reader = self.ctx.handle.reader();
        loop {
            match reader.events_after(None, self.after, EVENT_BATCH) {
                Ok((events, scanned)) => {
                    for ev in &events {
                        self.route(me, ev).await;
                    }
                    self.after = scanned;
                    if events.len() < EVENT_BATCH {
                        return;
                    }
                }
                Err(c) => {
                    tracing::warn!(
                        after = self.after,
                        compacted = c.compacted,
                        "fell behind the event history; full resync"
                    );
                    self.full_sync(me).await;
                    return;
                }
            }
        }
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = Arc<Ctx>;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        ctx: Arc<Ctx>,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let pending = Arc::new(AtomicBool::new(false));
        let mut st = SupervisorState {
            ctx: ctx.clone(),
            after: 0,
            pending: pending.clone(),
            forwarder: None,
            scheduler: None,
            models: HashMap::new(),
            nodes: HashMap::new(),
            adapters: HashMap::new(),
            autoscalers: HashMap::new(),
            children: HashMap::new(),
        };
        st.full_sync(&myself.get_cell()).await;
        let mut rx = ctx.handle.reader().subscribe();
        let me = myself.clone();
        st.forwarder = Some(tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                if !pending.swap(true, Ordering::SeqCst) && me.send_message(SupervisorMsg::StoreChanged).is_err() {
                    return;
                }
            }
        }));
        myself.send_message(SupervisorMsg::StoreChanged)?;
        tracing::info!(models = st.models.len(), nodes = st.nodes.len(), "controllers started");
        Ok(st)
    }

    async fn post_stop(
        &self,
        myself: ActorRef<SupervisorMsg>,
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(f) = st.forwarder.take() {
            f.abort();
        }
        myself.stop_children_and_wait(None, Some(ActorsConfig::ms(5_000))).await;
        tracing::info!("controllers stopped");
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let me = myself.get_cell();
        match msg {
            SupervisorMsg::StoreChanged => st.catch_up(&me).await,
            SupervisorMsg::Heard(node) => {
                if let Some(a) = st.nodes.get(&node) {
                    let _ = a.send_message(NodeMsg::Heard);
                }
            }
            SupervisorMsg::Wake(model) => {
                if let Some(a) = st.autoscalers.get(&model) {
                    let _ = a.send_message(AutoscalerMsg::Wake);
                }
            }
            SupervisorMsg::Demand { base, adapter, demand } => {
                if !st.adapters.contains_key(&base) {
                    st.spawn(&me, Child::Adapters(base.clone()), None).await;
                }
                if let Some(a) = st.adapters.get(&base) {
                    let _ = a.send_message(AdapterMsg::Demand(adapter, demand));
                }
            }
            SupervisorMsg::Respawn(child) => {
                let wanted = match &child {
                    Child::Scheduler => st.scheduler.is_none(),
                    Child::Model(m) => !st.models.contains_key(m),
                    Child::Node(n) => !st.nodes.contains_key(n),
                    Child::Adapters(b) => !st.adapters.contains_key(b),
                    Child::Autoscaler(m) => !st.autoscalers.contains_key(m),
                };
                if wanted {
                    st.spawn(&me, child, None).await;
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failed) = match evt {
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, None),
            SupervisionEvent::ActorFailed(cell, e) => (cell, Some(e.to_string())),
            _ => return Ok(()),
        };
        let Some(child) = st.children.remove(&cell.get_id()) else { return Ok(()) };
        match &child {
            Child::Scheduler => st.scheduler = None,
            Child::Model(m) => drop(st.models.remove(m)),
            Child::Node(n) => drop(st.nodes.remove(n)),
            Child::Adapters(b) => drop(st.adapters.remove(b)),
            Child::Autoscaler(m) => drop(st.autoscalers.remove(m)),
        }
        let delay = match failed {
            Some(e) => {
                tracing::warn!(child = ?child, error = %e, "controller failed; rebuilding it from the store");
                Metrics::add(&st.ctx.metrics.actor_restarts, 1);
                st.ctx.config.restart_delay_ms
            }
            None => 0,
        };
        // A model actor that finished draining is not rebuilt unless its model is back.
        let wanted = match &child {
            Child::Scheduler => true,
            Child::Model(m) => {
                let reader = st.ctx.handle.reader();
                reader.get(&key(Kind::Model, m)).0.is_some()
                    || !reader.list(Kind::Replica, &LabelSelector::for_model(m)).0.is_empty()
            }
            Child::Node(n) => st.ctx.handle.reader().get(&key(Kind::Node, n)).0.is_some(),
            Child::Adapters(b) => adapters_wanted(&st.ctx, b),
            Child::Autoscaler(m) => autoscales(&st.ctx, m),
        };
        if wanted {
            myself.send_after(ActorsConfig::ms(delay), move || SupervisorMsg::Respawn(child));
        }
        Ok(())
    }
}
