//! The Supervisor: started when this server becomes leader, stopped when it loses
//! leadership. It rebuilds every controller from the state machine (one Model actor per
//! model, one Node actor per node, the Scheduler), follows the store's change events and
//! routes each to the actors it concerns (and to the assignment hub), and rebuilds any
//! actor that stopped on an uncertain write. What to start and whom to tell is decided by
//! the pure `route` / `on_message` / `sync` (`route.rs`); this actor reads the store,
//! calls them and executes the commands, starting every kind of child through one helper.
//!
//! ```text
//!  StoreReader ──revision──> forwarder ──StoreChanged──> Supervisor
//!                                                          │ events_after
//!                                                          v
//!         route / on_message / sync (pure) ──Commands──> execute ─┬─> Model, Node actors
//!                                                                  ├─> adapter controllers, autoscalers
//!                                                                  ├─> Scheduler
//!                                                                  └─> Hub (Assign)
//! ```
mod route;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use flotilla_api::{Kind, LabelSelector, ObjectName};
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::adapters::actor::{AdapterActor, AdapterArgs, AdapterMsg};
use crate::adapters::Demand;
use crate::autoscale::actor::{AutoscalerActor, AutoscalerArgs, AutoscalerMsg};
use crate::config::ActorsConfig;
use crate::model::{ModelActor, ModelArgs, ModelMsg};
use crate::node::{NodeActor, NodeArgs, NodeMsg};
use crate::objects::{key, NodeView, ReplicaView};
use crate::scheduler::{Scheduler, SchedulerMsg};
use crate::shared::Ctx;
pub use route::{base_of, model_of, on_message, route, sync, Child, Command, Running, Snapshot};

/// Events read per batch.
const EVENT_BATCH: usize = 4096;

#[derive(Debug, PartialEq)]
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

pub struct Supervisor;

/// The running children, by kind, and which child each actor id is.
#[derive(Default)]
struct Children {
    scheduler: Option<ActorRef<SchedulerMsg>>,
    models: HashMap<ObjectName, ActorRef<ModelMsg>>,
    nodes: HashMap<ObjectName, ActorRef<NodeMsg>>,
    adapters: HashMap<ObjectName, ActorRef<AdapterMsg>>,
    autoscalers: HashMap<ObjectName, ActorRef<AutoscalerMsg>>,
    ids: HashMap<ActorId, Child>,
}

impl Running for Children {
    fn runs(&self, child: &Child) -> bool {
        match child {
            Child::Scheduler => self.scheduler.is_some(),
            Child::Model(m) => self.models.contains_key(m),
            Child::Node(n) => self.nodes.contains_key(n),
            Child::Adapters(b) => self.adapters.contains_key(b),
            Child::Autoscaler(m) => self.autoscalers.contains_key(m),
        }
    }
}

impl Children {
    /// Forgets a child that stopped.
    fn remove(&mut self, child: &Child) {
        match child {
            Child::Scheduler => self.scheduler = None,
            Child::Model(m) => drop(self.models.remove(m)),
            Child::Node(n) => drop(self.nodes.remove(n)),
            Child::Adapters(b) => drop(self.adapters.remove(b)),
            Child::Autoscaler(m) => drop(self.autoscalers.remove(m)),
        }
    }
}

pub struct SupervisorState {
    ctx: Arc<Ctx>,
    after: u64,
    pending: Arc<AtomicBool>,
    forwarder: Option<tokio::task::JoinHandle<()>>,
    children: Children,
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

/// Starts one child actor linked to the supervisor; `None` (logged) if it cannot start.
async fn start<A: Actor>(me: &ActorCell, child: &Child, actor: A, args: A::Arguments) -> Option<ActorRef<A::Msg>> {
    match Actor::spawn_linked(None, actor, args, me.clone()).await {
        Ok((a, _)) => Some(a),
        Err(e) => {
            tracing::error!(child = ?child, error = %e, "cannot start a controller");
            None
        }
    }
}

/// Delivers `msg` to `to` if the child runs (a send to a stopping actor is dropped too).
fn tell<M: ractor::Message>(to: Option<&ActorRef<M>>, msg: M) {
    if let Some(a) = to {
        let _ = a.send_message(msg);
    }
}

/// The stored replicas `f` selects.
fn replicas_where(ctx: &Ctx, selector: &LabelSelector, f: impl Fn(&ReplicaView) -> bool) -> Vec<ReplicaView> {
    let (list, _) = ctx.handle.reader().list(Kind::Replica, selector);
    list.iter().filter_map(|o| ReplicaView::from_stored(o).ok()).filter(|r| f(r)).collect()
}

impl SupervisorState {
    /// Starts `child` with its arguments read from the store (or `replicas`, if given).
    async fn spawn(&mut self, me: &ActorCell, child: Child, replicas: Option<Vec<ReplicaView>>) {
        let ctx = self.ctx.clone();
        let c = &mut self.children;
        let id = match &child {
            Child::Scheduler => start(me, &child, Scheduler, ctx).await.map(|a| {
                c.scheduler = Some(a.clone());
                a.get_id()
            }),
            Child::Model(name) => {
                let replicas =
                    replicas.unwrap_or_else(|| replicas_where(&ctx, &LabelSelector::for_model(name), |_| true));
                let args = ModelArgs { ctx, name: name.clone(), replicas };
                start(me, &child, ModelActor, args).await.map(|a| {
                    c.models.insert(name.clone(), a.clone());
                    a.get_id()
                })
            }
            Child::Adapters(base) => {
                let args = AdapterArgs { ctx, base: base.clone() };
                start(me, &child, AdapterActor, args).await.map(|a| {
                    c.adapters.insert(base.clone(), a.clone());
                    a.get_id()
                })
            }
            Child::Autoscaler(model) => {
                let args = AutoscalerArgs { ctx, model: model.clone() };
                start(me, &child, AutoscalerActor, args).await.map(|a| {
                    c.autoscalers.insert(model.clone(), a.clone());
                    a.get_id()
                })
            }
            Child::Node(name) => {
                let (o, _) = ctx.handle.reader().get(&key(Kind::Node, name));
                let Some(node) = o.and_then(|o| NodeView::from_stored(&o).ok()) else { return };
                let all = LabelSelector::default();
                let replicas = replicas.unwrap_or_else(|| replicas_where(&ctx, &all, |r| r.binds(name)));
                let args = NodeArgs { ctx, node, replicas };
                start(me, &child, NodeActor, args).await.map(|a| {
                    c.nodes.insert(name.clone(), a.clone());
                    a.get_id()
                })
            }
        };
        if let Some(id) = id {
            c.ids.insert(id, child);
        }
    }

    /// Executes routing commands in order.
    async fn execute(&mut self, me: &ActorCell, cmds: Vec<Command>) {
        for cmd in cmds {
            let c = &self.children;
            match cmd {
                Command::Spawn(child, replicas) => self.spawn(me, child, replicas).await,
                Command::Model(m, msg) => tell(c.models.get(&m), msg),
                Command::Node(n, msg) => tell(c.nodes.get(&n), msg),
                Command::Adapters(b, msg) => tell(c.adapters.get(&b), msg),
                Command::Autoscaler(m, msg) => tell(c.autoscalers.get(&m), msg),
                Command::Scheduler(msg) => tell(c.scheduler.as_ref(), msg),
                Command::Assign(r, view) => self.ctx.hub.update(&r, view.as_deref()),
                Command::ResetHub(replicas) => self.ctx.hub.reset(&replicas),
            }
        }
    }

    /// Lists everything, resets the hub, starts missing actors and re-syncs running ones.
    async fn full_sync(&mut self, me: &ActorCell) {
        let reader = self.ctx.handle.reader();
        self.after = reader.revision();
        let all = LabelSelector::default();
        let snapshot = Snapshot {
            replicas: reader
                .list(Kind::Replica, &all)
                .0
                .iter()
                .filter_map(|o| ReplicaView::from_stored(o).ok())
                .collect(),
            models: reader.list(Kind::Model, &all).0,
            nodes: reader.list(Kind::Node, &all).0,
            adapters: reader.list(Kind::Adapter, &all).0,
        };
        let cmds = sync(&self.children, &snapshot);
        self.execute(me, cmds).await;
    }

    async fn catch_up(&mut self, me: &ActorCell) {
        self.pending.store(false, Ordering::SeqCst);
        let reader = self.ctx.handle.reader();
        loop {
            match reader.events_after(None, self.after, EVENT_BATCH) {
                Ok((events, scanned)) => {
                    for ev in &events {
                        let cmds = route(&self.children, ev);
                        self.execute(me, cmds).await;
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
            children: Children::default(),
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
        tracing::info!(models = st.children.models.len(), nodes = st.children.nodes.len(), "controllers started");
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
            msg => {
                let cmds = on_message(&st.children, msg);
                st.execute(&me, cmds).await;
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
        let Some(child) = st.children.ids.remove(&cell.get_id()) else { return Ok(()) };
        st.children.remove(&child);
        let delay = match failed {
            Some(e) => {
                tracing::warn!(child = ?child, error = %e, "controller failed; rebuilding it from the store");
                st.ctx.metrics.actor_restarts.inc();
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
