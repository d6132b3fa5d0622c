//! The Scheduler actor: the one place that binds replicas to nodes. A round reads every
//! Node and Replica from the leader's state machine (shared, not copied, under its lock),
//! runs the pure [`crate::placement::plan`], and proposes its transactions. A transaction whose compares fail (a node or replica
//! changed since the read) changes nothing; the round is retried with fresh state. Nudges
//! from the supervisor coalesce into one round; a periodic tick catches anything missed.
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use flotilla_api::{Kind, LabelSelector, ObjectName};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::time::Instant;

use crate::config::{ActorsConfig, PlacementStrategy};
use crate::metrics::Controller;
use crate::objects::{ModelView, NodeView, ReplicaView, PLACEMENT_LABEL, TRACE_LABEL};
use crate::placement::plan;
use crate::shared::Ctx;
use crate::writes::execute;

#[derive(Debug, PartialEq)]
pub enum SchedulerMsg {
    /// Something placement depends on changed.
    Nudge,
    Run,
    Tick,
}

pub struct Scheduler;

pub struct SchedulerState {
    ctx: Arc<Ctx>,
    queued: bool,
    /// Whether the last round left replicas unplaceable (ticks retry only then).
    stuck: bool,
    /// When this scheduler first saw each replica still unplaced (placement latency; a new
    /// leader starts counting afresh).
    waiting: HashMap<ObjectName, Instant>,
}

/// Reads what a round needs from the local state machine (current on the leader).
fn snapshot(ctx: &Ctx) -> (Vec<NodeView>, Vec<ReplicaView>, BTreeSet<ObjectName>) {
    let reader = ctx.handle.reader();
    let all = LabelSelector::default();
    // Shared, not copied: the read lock (which the state machine's apply waits for) is held
    // while pointers are copied; every replica is parsed after it is released.
    let nodes = reader.list_shared(Kind::Node, &all).0.iter().filter_map(|o| NodeView::from_stored(o).ok()).collect();
    let replicas =
        reader.list_shared(Kind::Replica, &all).0.iter().filter_map(|o| ReplicaView::from_stored(o).ok()).collect();
    // Only the models that ask for spread are read (and copied), not every model.
    let spread = reader
        .list(Kind::Model, &LabelSelector::label_eq(PLACEMENT_LABEL, "spread"))
        .0
        .iter()
        .filter_map(|o| ModelView::from_stored(o).ok().map(|m| m.name))
        .collect();
    (nodes, replicas, spread)
}

/// The traceparents of unbound replicas whose creation was traced ([`TRACE_LABEL`]).
fn traced_pending(replicas: &[ReplicaView]) -> HashMap<ObjectName, String> {
    replicas
        .iter()
        .filter(|r| r.spec.node.is_none())
        .filter_map(|r| r.labels.get(TRACE_LABEL).map(|tp| (r.name.clone(), tp.clone())))
        .collect()
}

/// A `controller.bind` span, in the trace that created it, for each traced replica the
/// round's writes bind; each covers the Raft write of its binding.
fn bind_spans(
    cmds: &[flotilla_storage::Command],
    traced: &HashMap<ObjectName, String>,
    waiting: &HashMap<ObjectName, Instant>,
) -> Vec<tracing::Span> {
    if traced.is_empty() {
        return Vec::new();
    }
    let mut spans = Vec::new();
    for op in cmds.iter().flat_map(crate::objects::txn_ops) {
        let flotilla_storage::TxnOp::Put { key, spec, .. } = op else { continue };
        let Some(tp) = traced.get(&key.name).filter(|_| key.kind == Kind::Replica) else { continue };
        let waited = waiting.get(&key.name).map_or(0, |t| t.elapsed().as_millis() as i64);
        let span = tracing::debug_span!(
            "controller.bind",
            replica = %key.name,
            node = spec.get("node").and_then(|n| n.as_str()).unwrap_or_default(),
            gpus = %spec.get("gpus").map(|g| g.to_string()).unwrap_or_default(),
            pending_ms = waited,
            outcome = tracing::field::Empty,
        );
        flotilla_telemetry::propagation::set_parent_traceparent(&span, tp);
        spans.push(span);
    }
    spans
}

impl Actor for Scheduler {
    type Msg = SchedulerMsg;
    type State = SchedulerState;
    type Arguments = Arc<Ctx>;

    async fn pre_start(
        &self,
        myself: ActorRef<SchedulerMsg>,
        ctx: Arc<Ctx>,
    ) -> Result<SchedulerState, ActorProcessingErr> {
        myself.send_interval(ActorsConfig::ms(ctx.config.reconcile_interval_ms), || SchedulerMsg::Tick);
        myself.send_message(SchedulerMsg::Run)?;
        Ok(SchedulerState { ctx, queued: true, stuck: false, waiting: HashMap::new() })
    }

    async fn handle(
        &self,
        myself: ActorRef<SchedulerMsg>,
        msg: SchedulerMsg,
        st: &mut SchedulerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SchedulerMsg::Nudge | SchedulerMsg::Tick => {
                if matches!(msg, SchedulerMsg::Tick) && !st.stuck {
                    return Ok(());
                }
                if !st.queued {
                    st.queued = true;
                    myself.send_message(SchedulerMsg::Run)?;
                }
            }
            SchedulerMsg::Run => {
                st.queued = false;
                let ctx = st.ctx.clone();
                let strategy: PlacementStrategy = ctx.config.placement;
                let batch = ctx.config.bind_batch;
                // Planning thousands of replicas is CPU work: keep it off the async workers.
                let (p, traced) = tokio::task::spawn_blocking(move || {
                    let (nodes, replicas, spread) = snapshot(&ctx);
                    (plan(&nodes, &replicas, strategy, &spread, batch), traced_pending(&replicas))
                })
                .await?;
                let m = &st.ctx.metrics;
                m.schedule_rounds.inc();
                m.reconciled(Controller::Scheduler);
                m.set_pending(p.unplaced.iter().map(|(_, code)| *code));
                let now = Instant::now();
                let seen: BTreeSet<&ObjectName> = p.unplaced.iter().map(|(r, _)| r).chain(&p.placed).collect();
                st.waiting.retain(|r, _| seen.contains(r));
                for r in seen {
                    st.waiting.entry(r.clone()).or_insert(now);
                }
                st.stuck = p.unplaceable > 0;
                if p.binds.is_empty() && p.reasons.is_none() {
                    return Ok(());
                }
                tracing::debug!(bound = p.bound, txns = p.binds.len(), unplaceable = p.unplaceable, "scheduling round");
                let bound = p.bound;
                let txns = p.binds.len();
                let mut cmds = p.binds;
                cmds.extend(p.reasons);
                let placed = p.placed;
                let spans = bind_spans(&cmds, &traced, &st.waiting);
                let out = execute(&st.ctx, Controller::Scheduler, cmds).await.map_err(|e| {
                    tracing::warn!(error = %e, "uncertain write; scheduler stops for a rebuild");
                    Box::new(e) as ActorProcessingErr
                })?;
                for span in spans {
                    span.record("outcome", if out.refused == 0 { "bound" } else { "refused" });
                }
                if out.refused == 0 {
                    st.ctx.metrics.bindings.inc_by(bound as u64);
                    for r in placed {
                        if let Some(since) = st.waiting.remove(&r) {
                            st.ctx.metrics.placement_seconds.observe(since.elapsed().as_secs_f64());
                        }
                    }
                } else if !st.queued {
                    tracing::debug!(refused = out.refused, txns, "bindings refused; retrying with fresh state");
                    st.queued = true;
                    myself.send_after(ActorsConfig::ms(10), || SchedulerMsg::Run);
                }
            }
        }
        Ok(())
    }
}
