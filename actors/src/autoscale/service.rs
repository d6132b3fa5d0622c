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

/// Every gateway's latest report, per model, and when each gateway last reported at all
/// (a gateway reports every interval, listing only the models it saw: a model missing from
/// a fresh report had no traffic there, which is known idle, not unknown).
#[derive(Debug, Default)]
pub struct DemandBook {
    by_model: HashMap<ObjectName, HashMap<String, GatewayDemand>>,
    gateways: HashMap<String, Instant>,
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
        if self.gateways.len() >= MAX_GATEWAYS && !self.gateways.contains_key(gateway) {
            return;
        }
        self.gateways.insert(gateway.to_owned(), now);
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

    /// The summed demand on `model` over the gateways that reported within [`DEMAND_TTL`]
    /// (their latest reports only); `None` when no gateway reported lately (unknown, not
    /// zero).
    pub fn demand(&self, model: &ObjectName, now: Instant) -> Option<Demand> {
        let fresh: HashMap<&String, &Instant> =
            self.gateways.iter().filter(|(_, at)| now.saturating_duration_since(**at) < DEMAND_TTL).collect();
        if fresh.is_empty() {
            return None;
        }
        let mut out = Demand { gateways: fresh.len(), ..Demand::default() };
        let Some(per) = self.by_model.get(model) else { return Some(out) };
        for (_, g) in per.iter().filter(|(gw, g)| fresh.get(gw).is_some_and(|at| **at == g.at)) {
            let d = &g.demand;
            let secs = g.interval_ms as f64 / 1000.0;
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
        Some(out)
    }

    /// Forgets reports older than the TTL.
    pub fn prune(&mut self, now: Instant) {
        for per in self.by_model.values_mut() {
            per.retain(|_, g| now.saturating_duration_since(g.at) < DEMAND_TTL);
        }
        self.by_model.retain(|_, per| !per.is_empty());
        self.gateways.retain(|_, at| now.saturating_duration_since(*at) < DEMAND_TTL);
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
        if req.gateway_id.trim().is_empty() || req.gateway_id.len() > crate::agent_bounds::MAX_SHORT {
            return Err(ActorsError::InvalidArgument("gateway_id must be 1 to 128 characters".into()).into());
        }
        let held: Vec<ObjectName> =
            req.models.iter().filter(|m| m.held > 0).filter_map(|m| m.model.parse().ok()).collect();
        let now = Instant::now();
        {
            let now_ms = flotilla_api::civil::unix_ms();
            let mut canary = lock(&self.ctx.canary);
            for m in &req.models {
                if let Ok(model) = m.model.parse::<ObjectName>() {
                    canary.record(&model, &m.revisions, now_ms);
                }
            }
        }
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
        // A fresh report that no longer lists the model: known idle, not unknown.
        book.record("g1", 1000, vec![], t0 + Duration::from_secs(6));
        let idle = book.demand(&m, t0 + Duration::from_secs(7)).unwrap();
        assert_eq!((idle.gateways, idle.in_flight, idle.arrivals_per_s), (1, 0.0, 0.0));
        book.prune(t0 + DEMAND_TTL * 3);
        assert_eq!(book.demand(&m, t0 + DEMAND_TTL * 3), None);
    }
}
