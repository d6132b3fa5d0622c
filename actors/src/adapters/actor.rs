//! The adapter controller of one base model: gathers the base model, its adapters and
//! replicas from the store, the engines' adapter reports from the agents' heartbeats and
//! the gateways' usage reports from memory, runs [`super::decide`] and writes
//! the plan (replica bindings, adapter statuses) through Raft. It reconciles on store
//! changes, on demands from `AdapterService.EnsureLoaded`, and every reconcile interval
//! (heartbeats carry load progress). It stops once no adapter names its base model and no
//! replica holds a binding.
//!
//! ```text
//!  Changed ──┐                                   ┌─> Txn replica.spec.adapters (fenced)
//!  Demand ───┼─> refresh ─> note_failures ─> decide ─┤
//!  Tick ─────┘                                   └─> PutStatus adapter status (fenced)
//! ```
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use flotilla_api::{Kind, LabelSelector, ObjectName};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::time::Instant;

use super::{decide, note_failures, AdapterState, AdapterView, Demand};
use crate::config::ActorsConfig;
use crate::facts::BoundNodes;
use crate::metrics::Controller;
use crate::objects::{key, ModelView, ReplicaView};
use crate::shared::{lock, Ctx};
use crate::writes::execute;

#[derive(Debug, PartialEq)]
pub enum AdapterMsg {
    /// Something in the store concerning this base model changed.
    Changed,
    /// A caller waits for `adapter` to be loaded.
    Demand(ObjectName, Demand),
    Tick,
    Reconcile,
}

pub struct AdapterActor;

pub struct AdapterArgs {
    pub ctx: Arc<Ctx>,
    pub base: ObjectName,
}

pub struct AdapterActorState {
    ctx: Arc<Ctx>,
    s: AdapterState,
    queued: bool,
}

impl AdapterActorState {
    fn refresh(&mut self) {
        let reader = self.ctx.handle.reader();
        let base = self.s.base.clone();
        self.s.model = reader.get(&key(Kind::Model, &base)).0.and_then(|o| ModelView::from_stored(&o).ok());
        let all = LabelSelector::default();
        self.s.adapters = reader
            .list(Kind::Adapter, &all)
            .0
            .iter()
            .filter_map(|o| AdapterView::from_stored(o).ok())
            .filter(|a| a.spec.base_model == base)
            .map(|a| (a.name.clone(), a))
            .collect();
        let sel = LabelSelector::for_model(&base);
        self.s.replicas = reader
            .list(Kind::Replica, &sel)
            .0
            .iter()
            .filter_map(|o| ReplicaView::from_stored(o).ok())
            .map(|r| (r.name.clone(), r))
            .collect();
        self.s.down_nodes = BoundNodes::read(&reader, self.s.replicas.values()).down;
        let live = lock(&self.ctx.live);
        self.s.reports = HashMap::new();
        for r in self.s.replicas.values() {
            let report = r.spec.node.as_ref().and_then(|n| live.get(n)).and_then(|l| l.engines.get(r.name.as_str()));
            if let Some(e) = report {
                self.s.reports.insert(r.name.clone(), e.clone());
            }
        }
        drop(live);
        for ((adapter, replica), at) in lock(&self.ctx.adapter_usage).iter() {
            if self.s.adapters.contains_key(adapter) {
                let e = self.s.last_used.entry((adapter.clone(), replica.clone())).or_insert(*at);
                *e = (*e).max(*at);
            }
        }
        self.s.now = Instant::now();
        let replicas = &self.s.replicas;
        self.s.last_used.retain(|(_, r), _| replicas.contains_key(r));
    }

    fn idle(&self) -> bool {
        self.s.adapters.is_empty() && self.s.replicas.values().all(|r| r.spec.adapters.is_empty())
    }
}

impl Actor for AdapterActor {
    type Msg = AdapterMsg;
    type State = AdapterActorState;
    type Arguments = AdapterArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<AdapterMsg>,
        args: AdapterArgs,
    ) -> Result<AdapterActorState, ActorProcessingErr> {
        let s = AdapterState {
            base: args.base,
            model: None,
            adapters: BTreeMap::new(),
            replicas: BTreeMap::new(),
            down_nodes: BTreeSet::new(),
            reports: HashMap::new(),
            last_used: HashMap::new(),
            demands: BTreeMap::new(),
            failures: HashMap::new(),
            now: Instant::now(),
        };
        let st = AdapterActorState { ctx: args.ctx, s, queued: true };
        myself.send_interval(ActorsConfig::ms(st.ctx.config.reconcile_interval_ms), || AdapterMsg::Tick);
        myself.send_message(AdapterMsg::Reconcile)?;
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<AdapterMsg>,
        msg: AdapterMsg,
        st: &mut AdapterActorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AdapterMsg::Changed | AdapterMsg::Tick => {}
            AdapterMsg::Demand(name, d) => {
                let e = st.s.demands.entry(name).or_insert_with(|| d.clone());
                e.until = e.until.max(d.until);
                e.avoid.clone_from(&d.avoid);
            }
            AdapterMsg::Reconcile => {
                st.queued = false;
                st.refresh();
                note_failures(&mut st.s);
                let plan = decide(&st.s);
                st.ctx.metrics.reconciled(Controller::Adapters);
                if plan.commands.is_empty() {
                    if st.idle() {
                        tracing::info!(base = %st.s.base, "no adapters left on this base model; controller stops");
                        myself.stop(None);
                    }
                    return Ok(());
                }
                let now = Instant::now();
                for (adapter, replica) in &plan.bound {
                    tracing::info!(base = %st.s.base, adapter = %adapter, replica = %replica, "adapter assigned");
                    st.s.last_used.insert((adapter.clone(), replica.clone()), now);
                }
                st.ctx.metrics.adapter_bindings.inc_by(plan.bound.len() as u64);
                st.ctx.metrics.adapter_evictions.inc_by(plan.evicted as u64);
                let out = execute(&st.ctx, Controller::Adapters, plan.commands).await.map_err(|e| {
                    tracing::warn!(base = %st.s.base, error = %e, "uncertain write; stopping for a rebuild");
                    Box::new(e) as ActorProcessingErr
                })?;
                if out.refused > 0 {
                    st.queued = true;
                    myself.send_after(ActorsConfig::ms(20), || AdapterMsg::Reconcile);
                }
                return Ok(());
            }
        }
        if !st.queued {
            st.queued = true;
            myself.send_message(AdapterMsg::Reconcile)?;
        }
        Ok(())
    }
}
