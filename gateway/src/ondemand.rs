//! On-demand LoRA adapters (cluster endpoints only): `AdapterService.EnsureLoaded` on the
//! leader when a request names an adapter that no endpoint holds, or only saturated ones,
//! and again when an engine answers 404 for an adapter it just evicted; usage reports for
//! the leader's LRU eviction, with the requests in flight per adapter and engine (never
//! evicted; changes reported within [`URGENT_SPACING`]).
//!
//! ```text
//! request for adapter A ─ holders? ─ none ──> Loader::ensure(A) ─┐ one flight per adapter
//!                            │                  (single-flight)   │ (spawned: outlives the
//!                            ├ all saturated ─> ensure(A, avoid) ─┤  request that started it)
//!                            v                                    v
//!                     QoS queue of A <── pump ── learn_loaded(A, endpoints) <── EnsureLoaded
//!                            │                                          (follows not_leader)
//!                            v
//!                   forward ─ 404 ─> forget_loaded(A, endpoint), ensure(A), retry once
//! ```
//!
//! A cold request waits in the normal QoS queue of its adapter while the load runs, so the
//! class deadline, priorities and shedding apply as for any request; it fails only when
//! the load fails and no endpoint holds the adapter (503, see [`LoadError::to_api`]), or
//! at its deadline. The leader answers at once when it cannot place the adapter (503
//! `adapter_no_slot`, 429 `adapter_busy`, with its reason), so no request waits for a
//! load that is not happening. The load itself is bounded by `--adapter-load-timeout-ms`. The calls
//! to the leader and their errors are in `leader`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use flotilla_api::pb;
use http::HeaderMap;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::admission::{saturated, select, Lease, PickCtx};
use crate::config::Config;
use crate::error::{ApiCode, ApiError};
use crate::leader::{LeaderLink, LoadError};
use crate::load::Availability;
use crate::lora::UsageBook;
use crate::metrics::{AdapterLabels, ReasonLabels};
use crate::names::{AdapterName, ModelName, ServedName};
use crate::proxy::{forward, Upstream};
use crate::request::ApiKind;
use crate::state::Gateway;
use crate::table::{endpoint_of, Endpoint, EndpointId};

/// A completed load's outcome is reused this long: errors (but `adapter_busy`, a capacity
/// wait that ends with any request), so a burst for a broken adapter makes one call;
/// successes only for scale-out requests (saturated holders).
const RECENT: Duration = Duration::from_secs(2);
/// Usage reports go to the leader this often (and while requests are in flight, as their
/// keep-alive).
pub const REPORT_EVERY: Duration = Duration::from_secs(2);
/// A change of the in-flight pairs (an adapter's first request in flight on an engine, or
/// its last one ending) is reported at once, at most this often: the leader evicts only
/// adapters with nothing in flight, so it must hear of both soon.
pub const URGENT_SPACING: Duration = Duration::from_millis(20);
/// Extra time the gateway gives the leader past the load timeout it asked for, so the
/// leader's own DEADLINE_EXCEEDED (with its message) arrives first.
const RPC_GRACE: Duration = Duration::from_secs(1);

/// A successful `EnsureLoaded`.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub endpoints: Vec<Endpoint>,
    pub cold: bool,
}

type Outcome = Result<Loaded, LoadError>;

/// One load in progress (or recently done), shared by every request that needs it.
#[derive(Debug, Clone)]
pub struct Flight {
    id: u64,
    /// Started for saturated holders (rather than for none).
    scale_out: bool,
    rx: watch::Receiver<Option<Outcome>>,
    done: Option<Instant>,
}

impl Flight {
    /// The outcome, once the load ends.
    pub async fn wait(&mut self) -> Outcome {
        match self.rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or_else(|| Err(LoadError::Other("no outcome".into()))),
            Err(_) => Err(LoadError::Other("the load was abandoned".into())),
        }
    }

    fn succeeded(&self) -> bool {
        matches!(&*self.rx.borrow(), Some(Ok(_)))
    }

    /// A capacity wait (`adapter_busy`): over as soon as a request ends, so never reused.
    fn busy(&self) -> bool {
        matches!(&*self.rx.borrow(), Some(Err(LoadError::Busy(_))))
    }
}

/// Single-flight `EnsureLoaded` per adapter, and the usage book.
pub struct Loader {
    enabled: bool,
    timeout: Duration,
    pub(crate) link: LeaderLink,
    flights: Mutex<HashMap<AdapterName, Flight>>,
    next_id: AtomicU64,
    usage: Mutex<UsageBook>,
    /// Wakes the report loop for an in-flight change.
    wake: Arc<Notify>,
    /// `EnsureLoaded` calls made.
    pub calls: AtomicU64,
}

/// A request for an adapter in flight on an engine, counted in the usage book until
/// dropped (with the response's end).
pub struct AdapterUse {
    gw: Arc<Gateway>,
    adapter: AdapterName,
    address: String,
}

impl Drop for AdapterUse {
    fn drop(&mut self) {
        let last = self.gw.loader.book().end(&self.adapter, &self.address);
        if last {
            self.gw.loader.wake.notify_one();
        }
    }
}

impl Loader {
    pub fn new(cfg: &Config) -> Self {
        Loader {
            enabled: cfg.backends.is_empty() && !cfg.servers.is_empty(),
            timeout: cfg.adapter_load_timeout,
            link: LeaderLink::new(cfg.servers.clone(), cfg.tls.clone()),
            flights: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            usage: Mutex::new(UsageBook::default()),
            wake: Arc::new(Notify::new()),
            calls: AtomicU64::new(0),
        }
    }

    /// On-demand loading is on: endpoints come from the cluster.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Counts one request for `adapter` on the engine `address`.
    pub fn record(&self, adapter: &AdapterName, address: &str) {
        if self.enabled && !self.usage.lock().unwrap_or_else(|e| e.into_inner()).record(adapter, address) {
            tracing::debug!(adapter = %adapter, address, "usage book full; request not counted");
        }
    }

    fn book(&self) -> std::sync::MutexGuard<'_, UsageBook> {
        self.usage.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a request for `adapter` in flight on the engine `address` until the guard
    /// drops; None when on-demand loading is off.
    pub fn begin(gw: &Arc<Gateway>, adapter: &AdapterName, address: &str) -> Option<AdapterUse> {
        if !gw.loader.enabled {
            return None;
        }
        if gw.loader.book().begin(adapter, address) {
            gw.loader.wake.notify_one();
        }
        Some(AdapterUse { gw: gw.clone(), adapter: adapter.clone(), address: address.to_string() })
    }

    /// What to report now: the usage and in-flight pairs, and whether the in-flight set
    /// changed since the last report (then even an empty report is sent: it clears).
    fn take_usage(&self) -> (Vec<pb::AdapterUsage>, bool) {
        let mut book = self.book();
        let changed = book.urgent();
        (book.take(), changed)
    }

    async fn ensure_loaded(&self, adapter: &AdapterName, avoid: Vec<String>) -> Outcome {
        let until = Instant::now() + self.timeout;
        let r = self
            .link
            .call(until + RPC_GRACE, |mut c| {
                let timeout_ms = until.saturating_duration_since(Instant::now()).as_millis().clamp(1, 120_000) as u32;
                let req =
                    pb::EnsureLoadedRequest { adapter: adapter.to_string(), timeout_ms, avoid_replicas: avoid.clone() };
                async move { c.ensure_loaded(req).await }
            })
            .await?;
        let endpoints: Vec<Endpoint> = r.endpoints.iter().filter_map(endpoint_of).collect();
        if endpoints.is_empty() {
            return Err(LoadError::Other("the leader named no endpoint holding it".into()));
        }
        Ok(Loaded { endpoints, cold: r.cold })
    }
}

impl Gateway {
    /// Joins the load of `adapter` in flight, or a recent failed one, or, for a
    /// `scale_out` (saturated holders), a recent successful scale-out; else starts one
    /// (see [`RECENT`]).
    pub fn ensure_adapter(self: &Arc<Self>, adapter: &AdapterName, avoid: Vec<String>, scale_out: bool) -> Flight {
        let now = Instant::now();
        let mut map = self.loader.flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = map.get(adapter) {
            match f.done {
                None => return f.clone(),
                Some(t)
                    if now.saturating_duration_since(t) < RECENT
                        && (!f.succeeded() && !f.busy() || scale_out && f.scale_out) =>
                {
                    return f.clone()
                }
                _ => {}
            }
        }
        map.retain(|_, f| f.done.is_none_or(|t| now.saturating_duration_since(t) < RECENT));
        let id = self.loader.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        let flight = Flight { id, scale_out, rx, done: None };
        map.insert(adapter.clone(), flight.clone());
        drop(map);
        self.loader.calls.fetch_add(1, Ordering::Relaxed);
        tracing::info!(adapter = %adapter, avoid = ?avoid, "ensuring adapter is loaded");
        tokio::spawn(run_flight(self.clone(), adapter.clone(), avoid, id, tx));
        flight
    }

    /// After every endpoint holding `ctx.model` failed at the connection level (its engine or
    /// node died): asks for a load on another replica (the failed holders avoided, and
    /// hidden from this gateway's table for the adapter) and forwards once more there.
    pub async fn reload_elsewhere(
        self: &Arc<Self>,
        ctx: &PickCtx,
        kind: ApiKind,
        body: Bytes,
        headers: &HeaderMap,
    ) -> Result<Upstream, ApiError> {
        let adapter = ctx.model.as_adapter();
        let holders = self.dir.endpoints().resolve(adapter.as_str()).map(|r| r.endpoints).unwrap_or_default();
        let avoid: Vec<String> = holders.iter().filter(|e| !e.replica.is_empty()).map(|e| e.replica.clone()).collect();
        let failed: Vec<EndpointId> = holders.iter().map(|e| e.id.clone()).collect();
        tracing::warn!(adapter = %ctx.model, failed = ?failed, "every holder of the adapter failed; loading it elsewhere");
        for id in &failed {
            self.dir.forget_loaded(&adapter, id);
        }
        self.load_then_forward(
            ctx,
            avoid,
            &failed,
            "lost its engines and was not loaded elsewhere",
            kind,
            body,
            headers,
        )
        .await
    }

    /// The base model of `name` when it is a known adapter that may be loaded on demand.
    pub fn on_demand_base(&self, name: &str) -> Option<ModelName> {
        if !self.loader.enabled || self.dir.endpoints().by_model.contains_key(name) {
            return None;
        }
        self.dir.adapter(name).map(|a| a.base_model)
    }

    /// Starts a scale-out load when every holder of `adapter` is saturated or ejected.
    pub fn scale_out_if_busy(self: &Arc<Self>, adapter: &AdapterName, holders: &[Arc<Endpoint>]) {
        if self.on_demand_base(adapter.as_str()).is_none() || holders.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut avoid = Vec::new();
        for e in holders {
            let stats = self.book.get(&e.id);
            if !saturated(&stats.load(e.engine), &self.cfg.saturation)
                && stats.availability(now) != Availability::Ejected
            {
                return;
            }
            if !e.replica.is_empty() {
                avoid.push(e.replica.clone());
            }
        }
        drop(self.ensure_adapter(adapter, avoid, true));
    }

    /// A lease for an adapter no endpoint holds: waits in its QoS queue while the load
    /// runs (the load's success pumps the queue).
    pub async fn acquire_cold(self: &Arc<Self>, ctx: &PickCtx) -> Result<(Lease, Duration), ApiError> {
        let start = Instant::now();
        let adapter = ctx.model.as_adapter();
        let mut flight = self.ensure_adapter(&adapter, Vec::new(), false);
        let acquire = self.acquire_ctx(ctx);
        tokio::pin!(acquire);
        let mut outcome: Option<Outcome> = None;
        loop {
            tokio::select! {
                r = &mut acquire => {
                    return match r {
                        Ok(x) => {
                            self.metrics.adapter_cold_load_seconds.observe(start.elapsed().as_secs_f64());
                            Ok(x)
                        }
                        Err(e) if e.code == ApiCode::QueueTimeout => Err(match outcome {
                            Some(Err(le)) => le.to_api(&adapter),
                            Some(Ok(_)) => e,
                            None => ApiError::new(
                                ApiCode::AdapterLoadTimeout,
                                format!(
                                    "adapter {:?} is being loaded and was not ready within the {} ms {} deadline",
                                    ctx.model,
                                    self.cfg.deadlines.of(ctx.class).as_millis(),
                                    crate::admission::class_name(ctx.class)
                                ),
                            )
                            .retry_after(5),
                        }),
                        Err(e) => Err(e),
                    };
                }
                o = flight.wait(), if outcome.is_none() => {
                    match &o {
                        Ok(_) => self.pump(&ctx.model),
                        Err(e) if self.dir.endpoints().resolve(adapter.as_str()).is_none_or(|r| r.endpoints.is_empty()) => {
                            return Err(e.to_api(&adapter));
                        }
                        Err(_) => {} // someone holds it after all: keep waiting in the queue
                    }
                    outcome = Some(o);
                }
            }
        }
    }

    /// The engine answered 404 for the adapter: it was evicted there. Routes it elsewhere,
    /// ensures it is loaded and forwards once more. When that answer is a 404 again — the
    /// leader still had the evicting engine's older report and named it as a holder, so
    /// nothing was loaded and the request went back to it (bench/lora at 4× overload: 4 of
    /// 606 requests got the engine's 404) — the adapter is loaded on another replica, those
    /// engines excluded.
    pub async fn reload_and_retry(
        self: &Arc<Self>,
        ctx: &PickCtx,
        up: Upstream,
        kind: ApiKind,
        body: Bytes,
        headers: &HeaderMap,
    ) -> Result<Upstream, ApiError> {
        let adapter = ctx.model.as_adapter();
        let gone = up.lease.endpoint.clone();
        drop(up);
        tracing::info!(adapter = %ctx.model, endpoint = %gone.id, "engine no longer holds the adapter; reloading");
        self.dir.forget_loaded(&adapter, &gone.id);
        let exclude = [gone.id.clone()];
        let what = "was evicted and not reloaded";
        let up = self.load_then_forward(ctx, Vec::new(), &exclude, what, kind, body.clone(), headers).await?;
        if up.response.status() != http::StatusCode::NOT_FOUND {
            return Ok(up);
        }
        let again = up.lease.endpoint.clone();
        drop(up);
        tracing::warn!(adapter = %ctx.model, endpoint = %again.id, "a stale holder answered 404 again; loading the adapter elsewhere");
        self.dir.forget_loaded(&adapter, &again.id);
        let mut avoid: Vec<String> =
            [&gone, &again].iter().map(|e| e.replica.clone()).filter(|r| !r.is_empty()).collect();
        avoid.dedup();
        let exclude = [gone.id.clone(), again.id.clone()];
        self.load_then_forward(ctx, avoid, &exclude, "was evicted and not reloaded elsewhere", kind, body, headers)
            .await
    }

    /// Asks for a load of `ctx.model` (avoiding `avoid` replicas) and waits for it, bounded
    /// by the load timeout and the request's class deadline; then forwards to a holder,
    /// preferring one not in `exclude` (engines that just failed the request).
    #[allow(clippy::too_many_arguments)]
    async fn load_then_forward(
        self: &Arc<Self>,
        ctx: &PickCtx,
        avoid: Vec<String>,
        exclude: &[EndpointId],
        what: &str,
        kind: ApiKind,
        body: Bytes,
        headers: &HeaderMap,
    ) -> Result<Upstream, ApiError> {
        let adapter = ctx.model.as_adapter();
        let mut flight = self.ensure_adapter(&adapter, avoid, false);
        let wait = self.cfg.adapter_load_timeout.min(self.cfg.deadlines.of(ctx.class));
        match tokio::time::timeout(wait, flight.wait()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.to_api(&adapter)),
            Err(_) => {
                return Err(ApiError::new(
                    ApiCode::AdapterLoadTimeout,
                    format!("adapter {:?} {what} within {} ms", ctx.model, wait.as_millis()),
                )
                .retry_after(5))
            }
        }
        let lease = select(self, ctx, exclude, false).or_else(|| select(self, ctx, &[], false));
        let Some(lease) = lease else {
            return Err(ApiError::new(
                ApiCode::AdapterUnavailable,
                format!("adapter {:?} was loaded but no endpoint holding it is available", ctx.model),
            )
            .retry_after(1));
        };
        forward(self, ctx, lease, kind, body, headers, self.cfg.max_retries).await
    }
}

async fn run_flight(
    gw: Arc<Gateway>,
    adapter: AdapterName,
    avoid: Vec<String>,
    id: u64,
    tx: watch::Sender<Option<Outcome>>,
) {
    let start = Instant::now();
    let outcome = gw.loader.ensure_loaded(&adapter, avoid).await;
    match &outcome {
        Ok(l) => {
            if l.cold {
                gw.metrics.adapter_cold_loads.get_or_create(&AdapterLabels { adapter: adapter.to_string() }).inc();
            }
            let at: Vec<&str> = l.endpoints.iter().map(|e| e.id.as_str()).collect();
            tracing::info!(adapter = %adapter, cold = l.cold, endpoints = ?at, ms = start.elapsed().as_millis() as u64, "adapter loaded");
            gw.dir.learn_loaded(&adapter, l.endpoints.clone());
        }
        Err(e) => {
            gw.metrics.adapter_load_errors.get_or_create(&ReasonLabels { reason: e.reason().into() }).inc();
            tracing::warn!(adapter = %adapter, reason = e.reason(), error = %e.message(), "adapter load failed");
        }
    }
    tx.send_replace(Some(outcome));
    if let Some(f) = gw.loader.flights.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&adapter) {
        if f.id == id {
            f.done = Some(Instant::now());
        }
    }
    gw.pump(&ServedName::from(&adapter));
}

/// Sends the usage counted since the last report and the pairs in flight to the leader
/// every [`REPORT_EVERY`], and within [`URGENT_SPACING`] of an in-flight change; a report
/// that fails is dropped (the next one carries the whole in-flight set again).
pub async fn report_loop(gw: Weak<Gateway>) {
    let Some(wake) = gw.upgrade().map(|g| g.loader.wake.clone()) else { return };
    let mut tick = tokio::time::interval(REPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = wake.notified() => tokio::time::sleep_until(last + URGENT_SPACING).await,
        }
        let Some(gw) = gw.upgrade() else { return };
        let (usage, changed) = gw.loader.take_usage();
        if usage.is_empty() && !changed {
            continue;
        }
        last = Instant::now();
        let n = usage.len();
        let gateway_id = gw.demand.gateway_id().to_string();
        let r = gw
            .loader
            .link
            .call(Instant::now() + REPORT_EVERY, |mut c| {
                let req = pb::ReportUsageRequest { usage: usage.clone(), gateway_id: gateway_id.clone() };
                async move { c.report_usage(req).await }
            })
            .await;
        if let Err(e) = r {
            tracing::debug!(pairs = n, reason = e.reason(), error = %e.message(), "usage report dropped");
        }
    }
}
