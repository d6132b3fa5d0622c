//! Admission: turns a parsed request into a [`Lease`] on one endpoint. Candidates are the
//! model's (or adapter's) endpoints minus ejected ones and, for first attempts, minus
//! saturated ones; the strategy picks among them. When none is free the request waits in
//! the model's [`FairQueue`] until a lease ends (or a periodic pump finds room), or its
//! class deadline passes (503 + Retry-After); sheddable requests are shed first when the
//! queue is full.
//!
//! ```text
//! acquire ──queue empty & free endpoint──> Lease ──(response ends)──> drop: in_flight-1, pump
//!    └──otherwise──> FairQueue ──pump: pop + select──> oneshot ──> Lease
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use flotilla_api::spec::{PriorityClass, RoutingStrategy};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::config::Saturation;
use crate::error::{ApiCode, ApiError};
use crate::load::{Availability, EndpointLoad, EndpointStats};
use crate::metrics::{EndpointLabels, ModelLabels};
use crate::names::ServedName;
use crate::qos::{FairQueue, Waiter};
use crate::request::RequestFeatures;
use crate::state::Gateway;
use crate::table::{Endpoint, EndpointId};

/// What selecting an endpoint for a request needs.
#[derive(Debug)]
pub struct PickCtx {
    /// The requested model or adapter name (the queue key).
    pub model: ServedName,
    pub features: RequestFeatures,
    pub strategy: RoutingStrategy,
    pub class: PriorityClass,
    pub tenant: String,
    /// The side of a running canary this request takes (None: no canary).
    pub split: Option<crate::canary::Split>,
    /// The request's span (`gateway.request`): the parent of its routing decisions, which
    /// may be taken while another request's code runs (a lease handed on from the queue).
    /// `Span::none()` when tracing is off.
    pub span: tracing::Span,
}

/// Is an endpoint too busy for a new request?
pub fn saturated(load: &EndpointLoad, s: &Saturation) -> bool {
    load.in_flight >= s.max_in_flight
        || (s.max_engine_waiting > 0 && load.engine.waiting >= s.max_engine_waiting as f64)
        || (s.max_kv_cache_usage > 0.0 && load.engine.kv_cache_usage >= s.max_kv_cache_usage)
}

/// A request's claim on one endpoint; dropping it ends the claim and lets a queued
/// request in.
pub struct Lease {
    pub endpoint: Arc<Endpoint>,
    pub stats: Arc<EndpointStats>,
    pub probe: bool,
    /// `x-flotilla-route`: how the endpoint was chosen (when the request asked).
    pub route: Option<String>,
    /// Prompt tokens the engine is expected to compute, counted in its
    /// `prefill_pending` until the first byte comes back ([`Lease::prefill_started`]).
    prefill_tokens: u64,
    /// Prompt tokens kv-aware predicted cached on the engine (0: none, or not known).
    cached_tokens: u64,
    gw: Arc<Gateway>,
    model: ServedName,
    pump: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("endpoint", &self.endpoint.id).field("probe", &self.probe).finish()
    }
}

impl Lease {
    /// Prompt tokens kv-aware's index says the engine holds (0: none, unknown, or another
    /// strategy chose it).
    pub fn predicted_cached(&self) -> u64 {
        self.cached_tokens
    }

    /// The engine began answering: its prompt is no longer work queued ahead there.
    pub fn prefill_started(&mut self) {
        if self.prefill_tokens > 0 {
            self.stats.prefill_pending.fetch_sub(self.prefill_tokens, Ordering::Relaxed);
            self.prefill_tokens = 0;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.prefill_started();
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.gw
            .metrics
            .in_flight
            .get_or_create(&EndpointLabels {
                model: self.endpoint.model.to_string(),
                endpoint: self.endpoint.id.to_string(),
            })
            .dec();
        if self.probe {
            // a probe that ended without a verdict lets the next one through
            self.stats.outlier.lock().unwrap_or_else(|e| e.into_inner()).probing = false;
        }
        if self.pump {
            self.gw.pump(&self.model);
        }
    }
}

/// Picks an endpoint and takes a lease on it, or None when no candidate is free.
pub fn select(gw: &Arc<Gateway>, ctx: &PickCtx, exclude: &[EndpointId], respect_saturation: bool) -> Option<Lease> {
    let set = gw.dir.endpoints();
    let resolved = set.resolve(ctx.model.as_str())?;
    let now = Instant::now();
    let mut eps = Vec::with_capacity(resolved.endpoints.len());
    let mut loads = Vec::with_capacity(resolved.endpoints.len());
    let mut ejected = Vec::new();
    let mut any_saturated = false;
    // A canary's side, unless it has no endpoint at all (then either side serves).
    let split = ctx.split.filter(|s| resolved.endpoints.iter().any(|e| s.admits(e.revision)));
    for e in &resolved.endpoints {
        if exclude.contains(&e.id) || split.is_some_and(|s| !s.admits(e.revision)) {
            continue;
        }
        let stats = gw.book.get(&e.id);
        let load = stats.load(e.engine);
        if stats.availability(now) == Availability::Ejected {
            ejected.push((e.clone(), load));
            continue;
        }
        if respect_saturation && saturated(&load, &gw.cfg.saturation) {
            any_saturated = true;
            continue;
        }
        eps.push(e.clone());
        loads.push(load);
    }
    if eps.is_empty() && !any_saturated {
        // every remaining endpoint is ejected: better to try one than to fail
        for (e, l) in ejected {
            eps.push(e);
            loads.push(l);
        }
    }
    let route = tracing::debug_span!(
        parent: &ctx.span,
        "gateway.route",
        strategy = ?ctx.strategy,
        candidates = eps.len() as i64,
        excluded = exclude.len() as i64,
        endpoint = tracing::field::Empty,
    );
    let (id, explanation, prefill_tokens, cached_tokens) = if ctx.strategy == RoutingStrategy::KvAware {
        let d = gw.router.kv_aware.decide(&ctx.features, &eps, &loads, now)?;
        if d.prompt_tokens > 0 {
            let labels = ModelLabels { model: eps[0].model.to_string() };
            gw.metrics.kv_prompt_tokens.get_or_create(&labels).inc_by(d.prompt_tokens);
            gw.metrics.kv_predicted_hit_tokens.get_or_create(&labels).inc_by(d.predicted_hit_tokens);
        }
        (d.id, d.explanation, d.prefill_tokens, d.predicted_hit_tokens)
    } else {
        let id = gw.router.strategy(ctx.strategy).pick(&ctx.features, &eps, &loads)?;
        let explanation = ctx.features.explain_route.then(|| ctx.strategy.as_str().to_string());
        (id, explanation, 0, 0)
    };
    route.record("endpoint", id.as_str());
    drop(route);
    let endpoint = eps.into_iter().find(|e| e.id == id)?;
    let stats = gw.book.get(&id);
    let probe = {
        let mut o = stats.outlier.lock().unwrap_or_else(|e| e.into_inner());
        let probe = o.availability(now) == Availability::Probe;
        if probe {
            o.probing = true;
        }
        probe
    };
    stats.in_flight.fetch_add(1, Ordering::Relaxed);
    stats.prefill_pending.fetch_add(prefill_tokens, Ordering::Relaxed);
    gw.metrics
        .in_flight
        .get_or_create(&EndpointLabels { model: endpoint.model.to_string(), endpoint: id.to_string() })
        .inc();
    Some(Lease {
        endpoint,
        stats,
        probe,
        route: explanation,
        prefill_tokens,
        cached_tokens,
        gw: gw.clone(),
        model: ctx.model.clone(),
        pump: true,
    })
}

type Queue = Arc<Mutex<FairQueue<Pending>>>;

/// A queued request.
pub struct Pending {
    ctx: Arc<PickCtx>,
    tx: oneshot::Sender<Lease>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").field("model", &self.ctx.model).finish()
    }
}

/// The waiting queues, one per requested model name.
#[derive(Default)]
pub struct Admission {
    queues: Mutex<HashMap<ServedName, Queue>>,
    ids: AtomicU64,
}

impl Admission {
    fn queue(&self, model: &ServedName) -> Queue {
        let mut m = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(q) = m.get(model) {
            return q.clone();
        }
        m.entry(model.clone()).or_default().clone()
    }

    /// Models with requests waiting.
    pub fn busy_models(&self) -> Vec<ServedName> {
        let m = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .filter(|(_, q)| !q.lock().unwrap_or_else(|e| e.into_inner()).is_empty())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Requests waiting for a model.
    pub fn depth(&self, model: &ServedName) -> usize {
        self.queue(model).lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Corrects a tenant's fair-share counter with the real token count.
    pub fn charge(&self, model: &ServedName, tenant: &str, delta: i64) {
        self.queue(model).lock().unwrap_or_else(|e| e.into_inner()).charge(tenant, delta);
    }
}

/// Estimated token cost of a request for fair sharing.
pub fn cost_estimate(f: &RequestFeatures) -> u64 {
    f.prompt_tokens_estimate() + f.max_tokens.unwrap_or(256).min(8192)
}

impl Gateway {
    /// Waits for a lease for `ctx` (see the module docs).
    pub async fn acquire(self: &Arc<Self>, ctx: PickCtx) -> Result<(Lease, std::time::Duration), ApiError> {
        let start = Instant::now();
        let ctx = Arc::new(ctx);
        let q = self.admission.queue(&ctx.model);
        let id = self.admission.ids.fetch_add(1, Ordering::Relaxed);
        let rx = {
            let mut guard = q.lock().unwrap_or_else(|e| e.into_inner());
            if guard.is_empty() {
                if let Some(lease) = select(self, &ctx, &[], true) {
                    return Ok((lease, start.elapsed()));
                }
            }
            if guard.len() >= self.cfg.max_queue {
                match guard.shed_below(ctx.class) {
                    Some(shed) => drop(shed), // its waiter sees a closed channel: shed
                    None => {
                        return Err(ApiError::new(
                            ApiCode::QueueFull,
                            format!(
                                "model {:?} is saturated and its queue is full ({} waiting)",
                                ctx.model,
                                guard.len()
                            ),
                        )
                        .retry_after(1))
                    }
                }
            }
            let (tx, rx) = oneshot::channel();
            let cost = cost_estimate(&ctx.features);
            guard.push(Waiter {
                id,
                class: ctx.class,
                tenant: ctx.tenant.clone(),
                cost,
                payload: Pending { ctx: ctx.clone(), tx },
            });
            rx
        };
        // a lease may have ended between our check and the push
        self.pump(&ctx.model);
        let deadline = self.cfg.deadlines.of(ctx.class);
        let mut rx = rx;
        match tokio::time::timeout(deadline, &mut rx).await {
            Ok(Ok(lease)) => Ok((lease, start.elapsed())),
            Ok(Err(_)) => Err(ApiError::new(
                ApiCode::Shed,
                format!("request shed: model {:?} is saturated and higher-priority requests are waiting", ctx.model),
            )
            .retry_after(1)),
            Err(_) => {
                let removed = q.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
                if removed.is_none() {
                    if let Ok(lease) = rx.try_recv() {
                        return Ok((lease, start.elapsed()));
                    }
                }
                Err(ApiError::new(
                    ApiCode::QueueTimeout,
                    format!(
                        "model {:?} is saturated: no endpoint freed up within the {} ms {} queue deadline",
                        ctx.model,
                        deadline.as_millis(),
                        class_name(ctx.class)
                    ),
                )
                .retry_after(1))
            }
        }
    }

    /// Hands free endpoints to queued requests of `model`, best first.
    pub fn pump(self: &Arc<Self>, model: &ServedName) {
        let q = self.admission.queue(model);
        let mut guard = q.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let Some(next) = guard.peek() else { return };
            if next.payload.tx.is_closed() {
                let id = next.id;
                guard.remove(id);
                continue;
            }
            let Some(mut lease) = select(self, &next.payload.ctx, &[], true) else { return };
            let Some(w) = guard.pop() else { return };
            if let Err(mut back) = w.payload.tx.send(lease) {
                back.pump = false;
                lease = back;
                drop(lease);
            }
        }
    }
}

pub fn class_name(c: PriorityClass) -> &'static str {
    match c {
        PriorityClass::Critical => "critical",
        PriorityClass::Standard => "standard",
        PriorityClass::Sheddable => "sheddable",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::EngineLoad;

    #[test]
    fn saturation_thresholds() {
        let s = Saturation { max_in_flight: 4, max_engine_waiting: 8, max_kv_cache_usage: 0.9 };
        let l = |in_flight, waiting, kv| EndpointLoad {
            in_flight,
            engine: EngineLoad { running: 0.0, waiting, kv_cache_usage: kv },
            ..Default::default()
        };
        assert!(!saturated(&l(3, 7.0, 0.5), &s));
        assert!(saturated(&l(4, 0.0, 0.0), &s));
        assert!(saturated(&l(0, 8.0, 0.0), &s));
        assert!(saturated(&l(0, 0.0, 0.95), &s));
        let off = Saturation { max_in_flight: 4, max_engine_waiting: 0, max_kv_cache_usage: 0.0 };
        assert!(!saturated(&l(0, 100.0, 1.0), &off));
    }
}
