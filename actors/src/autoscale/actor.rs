//! The Autoscaler actor: one per model with `spec.autoscaling`, on the leader. Every
//! `autoscale_interval_ms` it samples the model's signals from memory (the engines' load
//! from the agents' heartbeats, the gateways' demand reports), runs the pure
//! [`super::decide`], and when the desired count changes writes it with a
//! scaling-history entry into the model's status through Raft (fenced by the model's
//! revision). The model actor then creates or drains replicas toward it. Signals and the
//! scaler's memory live only here: a new leader starts with empty windows, and an empty
//! window is unknown, which never scales down.
//!
//! ```text
//!  Tick / Wake ─> sample ctx.live (engines) + ctx.demand (gateways) ─> Signals
//!                 decide(spec, signals, current, ready, state, now) ─> Decision
//!                 desired changed ─> PutStatus model.status.autoscaling (+ history)
//! ```
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use flotilla_api::spec::ReplicaPhase;
use flotilla_api::{Kind, LabelSelector, ObjectName};
use flotilla_storage::Command;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::time::Instant;

use super::{decide, EngineSample, GatewaySample, ScalerState, Signals};
use crate::config::ActorsConfig;
use crate::facts::BoundNodes;
use crate::model::desired_replicas;
use crate::objects::{key, MetricStatus, ModelStatus, ModelView, ReplicaView, ScalingEvent, SCALING_HISTORY};
use crate::shared::{lock, Ctx};
use crate::writes::execute;

/// The metrics shown in the status are refreshed at most this often when the desired
/// count does not change (each refresh is a Raft write).
const DISPLAY_REFRESH_MS: u64 = 15_000;

#[derive(Debug)]
pub enum AutoscalerMsg {
    Tick,
    /// Requests are held for this model at a gateway: decide now.
    Wake,
}

pub struct AutoscalerActor;

pub struct AutoscalerArgs {
    pub ctx: Arc<Ctx>,
    pub model: ObjectName,
}

pub struct AutoscalerState {
    ctx: Arc<Ctx>,
    model: ObjectName,
    epoch: Instant,
    signals: Option<Signals>,
    scaler: ScalerState,
    /// Per replica: (sample time ms, generation tokens counter) for the rate.
    tokens: HashMap<ObjectName, (u64, f64)>,
    last_written_ms: Option<u64>,
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl AutoscalerState {
    /// One evaluation; false when the model no longer autoscales (the actor stops).
    async fn evaluate(&mut self) -> Result<bool, ActorProcessingErr> {
        let reader = self.ctx.handle.reader();
        let Some(model) = reader.get(&key(Kind::Model, &self.model)).0.and_then(|o| ModelView::from_stored(&o).ok())
        else {
            return Ok(false);
        };
        let Some(spec) = model.spec.autoscaling.clone() else { return Ok(false) };
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        let signals = self.signals.get_or_insert_with(|| Signals::for_spec(&spec));
        signals.set_retention(super::retention_ms(&spec));

        let sel = LabelSelector::for_model(&self.model);
        let replicas: Vec<ReplicaView> =
            reader.list(Kind::Replica, &sel).0.iter().filter_map(|o| ReplicaView::from_stored(o).ok()).collect();
        let down = BoundNodes::read(&reader, &replicas).down;
        let ready: Vec<&ReplicaView> = replicas
            .iter()
            .filter(|r| r.phase() == ReplicaPhase::Ready && r.spec.node.as_ref().is_some_and(|n| !down.contains(n)))
            .collect();
        {
            let live = lock(&self.ctx.live);
            for r in &ready {
                let report =
                    r.spec.node.as_ref().and_then(|n| live.get(n)).and_then(|l| l.engines.get(r.name.as_str()));
                let sample = match report.filter(|e| e.metrics_known) {
                    Some(e) => {
                        let rate = match self.tokens.get(&r.name) {
                            Some((t, total)) if now_ms > *t && e.generation_tokens_total >= *total => {
                                Some((e.generation_tokens_total - total) * 1000.0 / (now_ms - t) as f64)
                            }
                            _ => None,
                        };
                        self.tokens.insert(r.name.clone(), (now_ms, e.generation_tokens_total));
                        EngineSample {
                            running: Some(e.num_requests_running),
                            waiting: Some(e.num_requests_waiting),
                            kv_cache_usage: Some(e.kv_cache_usage),
                            generation_tokens_per_s: rate,
                        }
                    }
                    // No report, or one without known figures: unknown, never idle.
                    None => EngineSample::default(),
                };
                signals.record_engine(&r.name, now_ms, sample);
            }
        }
        let ready_names: BTreeSet<ObjectName> = ready.iter().map(|r| r.name.clone()).collect();
        signals.retain_replicas(now_ms, |r| ready_names.contains(r));
        self.tokens.retain(|r, _| ready_names.contains(r));
        let demand = lock(&self.ctx.demand).demand(&self.model, Instant::now());
        if let Some(d) = demand {
            let some = |v: f64| (v > 0.0).then_some(v);
            signals.record_gateway(
                now_ms,
                GatewaySample {
                    in_flight: d.in_flight,
                    queued: d.queued,
                    held: d.held,
                    arrivals_per_s: d.arrivals_per_s,
                    completed_per_s: d.completed_per_s,
                    ttft_p95_ms: some(d.ttft_p95_ms),
                    tpot_p95_ms: some(d.tpot_p95_ms),
                    queue_wait_p95_ms: some(d.queue_wait_p95_ms),
                },
            );
        }

        let stored = ModelStatus::of(&model);
        let current = desired_replicas(&model, stored.autoscaling.as_ref());
        let decision = decide(&spec, signals, current, ready.len() as u32, &mut self.scaler, now_ms, unix_ms());
        let changed = decision.desired != current || stored.autoscaling.is_none();
        let stale_display = self.last_written_ms.is_none_or(|t| now_ms.saturating_sub(t) >= DISPLAY_REFRESH_MS);
        let metrics: Vec<MetricStatus> = decision
            .metrics
            .iter()
            .map(|m| MetricStatus { name: m.name.clone(), value: m.value, target: m.target })
            .collect();
        let mut next = stored.autoscaling.clone().unwrap_or_default();
        let display_moved = next.metrics != metrics || next.reason != decision.reason;
        if !(changed || stale_display && display_moved) {
            return Ok(true);
        }
        if decision.desired != current {
            tracing::info!(model = %self.model, from = current, to = decision.desired, reason = %decision.reason, "autoscaling");
            next.history.push(ScalingEvent {
                at_ms: unix_ms().max(0) as u64,
                from: current,
                to: decision.desired,
                reason: decision.reason.clone(),
            });
            let over = next.history.len().saturating_sub(SCALING_HISTORY);
            next.history.drain(..over);
            crate::metrics::Metrics::add(&self.ctx.metrics.scaling_events, 1);
        }
        next.desired_replicas = decision.desired;
        next.reason = decision.reason;
        next.metrics = metrics;
        next.evaluated_at_ms = unix_ms().max(0) as u64;
        let status = ModelStatus { autoscaling: Some(next), ..stored };
        let cmd = Command::PutStatus {
            key: key(Kind::Model, &self.model),
            status: status.to_json(),
            expected_revision: Some(model.revision),
        };
        let out = execute(&self.ctx, vec![cmd]).await.map_err(|e| {
            tracing::warn!(model = %self.model, error = %e, "uncertain autoscaling write; stopping for a rebuild");
            Box::new(e) as ActorProcessingErr
        })?;
        if out.applied > 0 {
            self.last_written_ms = Some(now_ms);
        }
        Ok(true)
    }
}

impl Actor for AutoscalerActor {
    type Msg = AutoscalerMsg;
    type State = AutoscalerState;
    type Arguments = AutoscalerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<AutoscalerMsg>,
        args: AutoscalerArgs,
    ) -> Result<AutoscalerState, ActorProcessingErr> {
        myself.send_interval(ActorsConfig::ms(args.ctx.config.autoscale_interval_ms), || AutoscalerMsg::Tick);
        tracing::info!(model = %args.model, "autoscaler started");
        Ok(AutoscalerState {
            ctx: args.ctx,
            model: args.model,
            epoch: Instant::now(),
            signals: None,
            scaler: ScalerState::new(),
            tokens: HashMap::new(),
            last_written_ms: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<AutoscalerMsg>,
        _msg: AutoscalerMsg,
        st: &mut AutoscalerState,
    ) -> Result<(), ActorProcessingErr> {
        if !st.evaluate().await? {
            tracing::info!(model = %st.model, "model no longer autoscales; autoscaler stops");
            myself.stop(None);
        }
        Ok(())
    }
}
