//! `AutoscaleService`, served by the leader: gateways report per-model demand about once a
//! second; the latest report of each gateway is kept in memory (never in Raft: a new
//! leader rebuilds it from the next reports) for the autoscalers to sample. A report with
//! requests held for a model at zero replicas wakes that model's autoscaler at once.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_api::pb::autoscale_service_server::AutoscaleService;
use flotilla_api::pb::{ModelDemand, ReportDemandRequest, ReportDemandResponse};
use flotilla_api::ObjectName;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::shared::{lock, Ctx};
use crate::supervisor::SupervisorMsg;
use crate::ActorsError;

/// A gateway's report older than this no longer counts.
pub const DEMAND_TTL: Duration = Duration::from_secs(5);
/// Gateways remembered per model at most.
const MAX_GATEWAYS: usize = 1024;

/// The latest report of one gateway about one model.
#[derive(Debug, Clone)]
pub struct GatewayDemand {
    pub at: Instant,
    pub interval_ms: u64,
    pub demand: ModelDemand,
}

/// Every gateway's latest report, per model.
#[derive(Debug, Default)]
pub struct DemandBook {
    by_model: HashMap<ObjectName, HashMap<String, GatewayDemand>>,
}

/// The demand on one model summed over the gateways that reported lately.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Demand {
    pub gateways: usize,
    pub in_flight: f64,
    pub queued: f64,
    pub held: f64,
    /// Requests per second arriving, completed, rejected.
    pub arrivals_per_s: f64,
    pub completed_per_s: f64,
    pub rejected_per_s: f64,
    /// Highest p95 any gateway saw over its last interval (0: no completions).
    pub ttft_p95_ms: f64,
    pub tpot_p95_ms: f64,
    pub queue_wait_p95_ms: f64,
}

impl DemandBook {
    pub fn record(&mut self, gateway: &str, interval_ms: u64, models: Vec<ModelDemand>, now: Instant) {
        for d in models {
            let Ok(model) = d.model.parse::<ObjectName>() else { continue };
            let per = self.by_model.entry(model).or_default();
            if per.len() >= MAX_GATEWAYS && !per.contains_key(gateway) {
                per.retain(|_, g| now.saturating_duration_since(g.at) < DEMAND_TTL);
                if per.len() >= MAX_GATEWAYS {
                    continue;
                }
            }
            per.insert(gateway.to_owned(), GatewayDemand { at: now, interval_ms: interval_ms.max(1), demand: d });
        }
    }

    /// The summed demand on `model` from reports fresher than [`DEMAND_TTL`]; `None` when
    /// no gateway reported lately (unknown, not zero).
    pub fn demand(&self, model: &ObjectName, now: Instant) -> Option<Demand> {
        let per = self.by_model.get(model)?;
        let mut out = Demand::default();
        for g in per.values().filter(|g| now.saturating_duration_since(g.at) < DEMAND_TTL) {
            let d = &g.demand;
            let secs = g.interval_ms as f64 / 1000.0;
            out.gateways += 1;
            out.in_flight += f64::from(d.in_flight);
            out.queued += f64::from(d.queued);
            out.held += f64::from(d.held);
            out.arrivals_per_s += f64::from(d.arrivals) / secs;
            out.completed_per_s += f64::from(d.completed) / secs;
            out.rejected_per_s += f64::from(d.rejected) / secs;
            out.ttft_p95_ms = out.ttft_p95_ms.max(d.ttft_p95_ms);
            out.tpot_p95_ms = out.tpot_p95_ms.max(d.tpot_p95_ms);
            out.queue_wait_p95_ms = out.queue_wait_p95_ms.max(d.queue_wait_p95_ms);
        }
        (out.gateways > 0).then_some(out)
    }

    /// Forgets reports older than the TTL.
    pub fn prune(&mut self, now: Instant) {
        for per in self.by_model.values_mut() {
            per.retain(|_, g| now.saturating_duration_since(g.at) < DEMAND_TTL);
        }
        self.by_model.retain(|_, per| !per.is_empty());
    }
}

pub struct AutoscaleServiceImpl {
    pub(crate) ctx: Arc<Ctx>,
}

#[tonic::async_trait]
impl AutoscaleService for AutoscaleServiceImpl {
    async fn report_demand(&self, req: Request<ReportDemandRequest>) -> Result<Response<ReportDemandResponse>, Status> {
        self.ctx.ensure_leader()?;
        let req = req.into_inner();
        if req.gateway_id.trim().is_empty() || req.gateway_id.len() > 128 {
            return Err(ActorsError::InvalidArgument("gateway_id must be 1 to 128 characters".into()).into());
        }
        let held: Vec<ObjectName> =
            req.models.iter().filter(|m| m.held > 0).filter_map(|m| m.model.parse().ok()).collect();
        let now = Instant::now();
        {
            let mut book = lock(&self.ctx.demand);
            book.prune(now);
            book.record(&req.gateway_id, req.interval_ms, req.models, now);
        }
        if let Some(sup) = self.ctx.supervisor() {
            for model in held {
                let _ = sup.send_message(SupervisorMsg::Wake(model));
            }
        }
        Ok(Response::new(ReportDemandResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(model: &str, in_flight: u32, arrivals: u32, ttft: f64) -> ModelDemand {
        ModelDemand { model: model.into(), in_flight, arrivals, ttft_p95_ms: ttft, ..Default::default() }
    }

    #[test]
    fn demand_sums_fresh_gateways_and_unknown_is_not_zero() {
        let t0 = Instant::now();
        let mut book = DemandBook::default();
        let m: ObjectName = "m".parse().unwrap();
        assert_eq!(book.demand(&m, t0), None, "never reported: unknown");
        book.record("g1", 1000, vec![d("m", 3, 10, 120.0)], t0);
        book.record("g2", 2000, vec![d("m", 1, 10, 300.0), d("bad name!", 1, 1, 1.0)], t0);
        let got = book.demand(&m, t0 + Duration::from_secs(1)).unwrap();
        assert_eq!((got.gateways, got.in_flight, got.arrivals_per_s, got.ttft_p95_ms), (2, 4.0, 15.0, 300.0));
        book.record("g1", 1000, vec![d("m", 0, 0, 0.0)], t0 + Duration::from_secs(4));
        let later = book.demand(&m, t0 + DEMAND_TTL + Duration::from_secs(1)).unwrap();
        assert_eq!((later.gateways, later.in_flight), (1, 0.0), "g2's report expired; g1 reports idle");
        book.prune(t0 + DEMAND_TTL * 3);
        assert_eq!(book.demand(&m, t0 + DEMAND_TTL * 3), None);
    }
}
