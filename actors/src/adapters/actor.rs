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

use super::{decide, note_failures, AdapterState, AdapterView, Demand, Plan};
use crate::config::ActorsConfig;
use crate::facts::BoundNodes;
use crate::metrics::Controller;
use crate::objects::{key, ModelView, ReplicaView};
use crate::shared::{lock, Ctx, FLIGHTS_TTL};
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
        let now = self.s.now;
        let flights = self.ctx.adapter_flights.borrow();
        let fresh = flights.values().filter(|g| g.at.is_some_and(|t| now.saturating_duration_since(t) < FLIGHTS_TTL));
        self.s.in_flight.clear();
        self.s.gateways_count = false;
        for g in fresh {
            self.s.gateways_count = true;
            let ours =
                g.pairs.iter().filter(|(a, r)| self.s.adapters.contains_key(a) && self.s.replicas.contains_key(r));
            self.s.in_flight.extend(ours.cloned());
        }
        drop(flights);
        let replicas = &self.s.replicas;
        self.s.last_used.retain(|(_, r), _| replicas.contains_key(r));
        // The thrash guard's clock: bindings first seen now count as made now.
        let bound: BTreeSet<(ObjectName, ObjectName)> =
            replicas.values().flat_map(|r| r.spec.adapters.iter().map(|b| (b.name.clone(), r.name.clone()))).collect();
        self.s.bound_at.retain(|p, _| bound.contains(p));
        for p in bound {
            self.s.bound_at.entry(p).or_insert(now);
        }
    }

    /// Publishes the verdicts on demands this decision could not place (and clears the
    /// ones it placed or that ended), for the `EnsureLoaded` calls that wait on them.
    fn publish_unplaced(&self, plan: &Plan) {
        let now = self.s.now;
        let adapters = &self.s.adapters;
        let demands = &self.s.demands;
        self.ctx.adapter_unplaced.send_if_modified(|book| {
            let before = book.len();
            book.retain(|a, _| !adapters.contains_key(a) || (demands.contains_key(a) && plan.unplaced.contains_key(a)));
            let mut changed = book.len() != before;
            for (a, u) in &plan.unplaced {
                if book.get(a).is_none_or(|(_, old)| old != u) {
                    changed = true;
                }
                book.insert(a.clone(), (now, u.clone()));
            }
            changed || !plan.unplaced.is_empty()
        });
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
            bound_at: HashMap::new(),
            in_flight: BTreeSet::new(),
            gateways_count: false,
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
                st.publish_unplaced(&plan);
                if let Some(at) = plan.wake_at {
                    // A waiting demand's slot passes the thrash guard then: decide again.
                    let after = at.saturating_duration_since(Instant::now()) + std::time::Duration::from_millis(5);
                    myself.send_after(after, || AdapterMsg::Reconcile);
                }
                if plan.commands.is_empty() {
                    if st.idle() {
                        tracing::info!(base = %st.s.base, "no adapters left on this base model; controller stops");
                        myself.stop(None);
                    }
                    return Ok(());
                }
                let now = Instant::now();
                for (victim, replica, by) in &plan.evictions {
                    let pair = (victim.clone(), replica.clone());
                    let idle_ms =
                        st.s.last_used.get(&pair).map(|t| now.saturating_duration_since(*t).as_millis() as u64);
                    tracing::info!(base = %st.s.base, adapter = %victim, replica = %replica, for_adapter = %by, idle_ms = ?idle_ms, "adapter evicted");
                }
                for (adapter, replica) in &plan.bound {
                    tracing::info!(base = %st.s.base, adapter = %adapter, replica = %replica, "adapter assigned");
                    st.s.last_used.insert((adapter.clone(), replica.clone()), now);
                    st.s.bound_at.insert((adapter.clone(), replica.clone()), now);
                }
                st.ctx.metrics.adapter_bindings.inc_by(plan.bound.len() as u64);
                st.ctx.metrics.adapter_evictions.inc_by(plan.evictions.len() as u64);
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
