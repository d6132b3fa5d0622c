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
//!  Tick / Wake ─> read: model, replicas, down nodes (store), reports (ctx.live), demand
//!                 sample::{serving, engine_sample, gateway_sample} ─> Signals
//!                 decide(spec, signals, current, ready, state, now) ─> Decision
//!                 status::should_write? ─> PutStatus model.status.autoscaling (next_status)
//! ```
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use flotilla_api::{Kind, LabelSelector, ObjectName};
use flotilla_storage::Command;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::time::Instant;

use super::sample::{engine_sample, gateway_sample, serving, TokenMark};
use super::status::{next_status, should_write};
use super::{decide, retention_ms, ScalerState, Signals};
use crate::config::ActorsConfig;
use crate::facts::BoundNodes;
use crate::metrics::Controller;
use crate::model::desired_replicas;
use crate::objects::{key, ModelStatus, ModelView, ReplicaView};
use crate::shared::{lock, Ctx};
use crate::writes::execute;

#[derive(Debug, PartialEq)]
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
    /// Per replica: the generation tokens counter last sampled, for the rate.
    tokens: HashMap<ObjectName, TokenMark>,
    last_written_ms: Option<u64>,
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl AutoscalerState {
    /// One evaluation (read, decide, write); false when the model no longer autoscales
    /// (the actor stops).
    async fn evaluate(&mut self) -> Result<bool, ActorProcessingErr> {
        let reader = self.ctx.handle.reader();
        let Some(model) = reader.get(&key(Kind::Model, &self.model)).0.and_then(|o| ModelView::from_stored(&o).ok())
        else {
            return Ok(false);
        };
        let Some(spec) = model.spec.autoscaling.clone() else { return Ok(false) };
        let now = Instant::now();
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let wall_unix_ms = unix_ms();
        let signals = self.signals.get_or_insert_with(|| Signals::for_spec(&spec));
        signals.set_retention(retention_ms(&spec));

        let replicas: Vec<ReplicaView> = reader
            .list(Kind::Replica, &LabelSelector::for_model(&self.model))
            .0
            .iter()
            .filter_map(|o| ReplicaView::from_stored(o).ok())
            .collect();
        let down = BoundNodes::read(&reader, &replicas).down;
        let ready = serving(&replicas, &down);
        let samples: Vec<_> = {
            let live = lock(&self.ctx.live);
            ready
                .iter()
                .map(|r| {
                    let report =
                        r.spec.node.as_ref().and_then(|n| live.get(n)).and_then(|l| l.engines.get(r.name.as_str()));
                    engine_sample(report, self.tokens.get(&r.name).copied(), now_ms)
                })
                .collect()
        };
        for (r, (sample, mark)) in ready.iter().zip(samples) {
            if let Some(mark) = mark {
                self.tokens.insert(r.name.clone(), mark);
            }
            signals.record_engine(&r.name, now_ms, sample);
        }
        let ready_names: BTreeSet<ObjectName> = ready.iter().map(|r| r.name.clone()).collect();
        signals.retain_replicas(now_ms, |r| ready_names.contains(r));
        self.tokens.retain(|r, _| ready_names.contains(r));
        let demand = lock(&self.ctx.demand).demand(&self.model, now);
        if let Some(d) = demand {
            signals.record_gateway(now_ms, gateway_sample(&d));
        }

        let stored = ModelStatus::of(&model);
        let current = desired_replicas(&model, stored.autoscaling.as_ref());
        let decision = decide(&spec, signals, current, ready.len() as u32, &mut self.scaler, now_ms, wall_unix_ms);
        self.ctx.metrics.reconciled(Controller::Autoscaler);
        if !should_write(stored.autoscaling.as_ref(), current, &decision, self.last_written_ms, now_ms) {
            return Ok(true);
        }
        if decision.desired != current {
            tracing::info!(model = %self.model, from = current, to = decision.desired, reason = %decision.reason, "autoscaling");
            self.ctx.metrics.scaled(decision.desired > current);
        }
        let next = next_status(stored.autoscaling.as_ref(), current, &decision, wall_unix_ms);
        let status = ModelStatus { autoscaling: Some(next), ..stored };
        let cmd = Command::PutStatus {
            key: key(Kind::Model, &self.model),
            status: status.to_json(),
            expected_revision: Some(model.revision),
        };
        let out = execute(&self.ctx, Controller::Autoscaler, vec![cmd]).await.map_err(|e| {
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
