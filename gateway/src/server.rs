//! The HTTP front door: routes, the request pipeline of the proxied OpenAI endpoints, and
//! the accept loop (hyper HTTP/1.1 with a header-read timeout against slowloris clients,
//! graceful shutdown).
//!
//! ```text
//! layers: trace -> auth -> policy -> body -> limits (see `trace`, `layers`)
//!   -> proxy: resolve model/adapter (a model without endpoints: held until one appears,
//!      see `hold`; an adapter no endpoint holds: on-demand load, see `ondemand`)
//!      -> QoS acquire (lease) -> forward with retries (an adapter's 404: reload and
//!      retry once); demand (arrivals, gauges, rejections, latencies) counted per base
//!      model for the leader's autoscaler (see `demand`)
//!   -> ObservedBody (stream through, usage, metrics) -> client
//! ```
//! vLLM's `/tokenize` and `/detokenize` take a shorter path (see `tokenizer`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::field::Empty;
use tracing::Instrument as _;

use crate::admission::{cost_estimate, PickCtx};
use crate::demand::GaugeKind;
use crate::error::{ApiCode, ApiError};
use crate::layers::{self, Caller, Parsed, Policy};
use crate::limits::Remaining;
use crate::metrics::QueueLabels;
use crate::names::{AdapterName, ModelName, ServedName};
use crate::ondemand::Loader;
use crate::proxy::{forward, response_head, ObservedBody, Tracker};
use crate::request;
use crate::sse::SseScanner;
use crate::state::Gateway;

/// The public router: the OpenAI API, `/healthz`, `/readyz`, and `/metrics` unless
/// `--metrics-listen` moves it to [`metrics_router`].
pub fn router(gw: Arc<Gateway>) -> Router {
    use axum::middleware::from_fn_with_state as layer;
    let proxied = Router::new()
        .route("/v1/chat/completions", post(proxy))
        .route("/v1/completions", post(proxy))
        .route("/v1/embeddings", post(proxy))
        .route_layer(
            tower::ServiceBuilder::new()
                .layer(axum::middleware::from_fn(crate::trace::request))
                .layer(layer(gw.clone(), layers::auth))
                .layer(layer(gw.clone(), layers::policy))
                .layer(layer(gw.clone(), layers::body))
                .layer(layer(gw.clone(), layers::limits)),
        );
    let tokenizer = Router::new()
        .route("/tokenize", post(crate::tokenizer::handle))
        .route("/detokenize", post(crate::tokenizer::handle))
        .route_layer(
            tower::ServiceBuilder::new().layer(layer(gw.clone(), layers::auth)).layer(layer(gw.clone(), layers::body)),
        );
    let mut app = Router::new().merge(proxied).merge(tokenizer).route("/v1/models", get(models));
    if gw.cfg.metrics_listen.is_none() {
        app = app.route("/metrics", get(metrics));
    }
    app.route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(gw)
}

/// The `--metrics-listen` router: `/metrics` only.
pub fn metrics_router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(gw)
}

/// The warning logged at start when `/metrics` is served on a listener that is not on
/// loopback (pure): tenants who reach the API can read it.
pub fn metrics_exposure_warning(listen: SocketAddr, metrics_listen: bool) -> Option<String> {
    (!metrics_listen && !listen.ip().is_loopback()).then(|| {
        format!(
            "/metrics is served on the public listener {listen}: anyone who reaches it, tenants included, \
             can read every model, adapter and tenant name and their traffic; give --metrics-listen \
             127.0.0.1:9090 (or a private address) to serve it there only"
        )
    })
}

async fn not_found(req: Request) -> Response {
    ApiError::new(ApiCode::NotFound, format!("no route for {}", req.uri().path())).into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    ApiError::new(ApiCode::MethodNotAllowed, format!("{} is not allowed on {}", req.method(), req.uri().path()))
        .into_response()
}

async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    let body = flotilla_api::metrics_text::to_prometheus_text(&gw.metrics.encode());
    ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    let n = gw.dir.endpoints().len();
    if n > 0 {
        (StatusCode::OK, format!("ready: {n} endpoints\n")).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: no endpoints known\n").into_response()
    }
}

async fn models(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let tenant = match layers::authenticate(&gw, &headers) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let set = gw.dir.endpoints();
    let name = tenant.as_ref().map(|t| t.name.as_str());
    let disaggregated = gw.pd_models(&set).into_iter().map(|m| (ServedName::from(m.as_str()), None));
    let data: Vec<serde_json::Value> = crate::lora::listing(&set, &gw.dir.adapters())
        .into_iter()
        .chain(disaggregated)
        .filter(|(id, _)| layers::visible(tenant.as_deref(), id.as_str()) && gw.may_use(name, id.as_str()))
        .map(|(id, parent)| {
            serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "flotilla", "root": id, "parent": parent})
        })
        .collect();
    axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

fn limit_headers(mut b: http::response::Builder, r: &Remaining) -> http::response::Builder {
    if let Some((limit, left)) = r.rpm {
        b = b.header("x-ratelimit-limit-requests", limit).header("x-ratelimit-remaining-requests", left);
    }
    if let Some((limit, left)) = r.tpm {
        b = b.header("x-ratelimit-limit-tokens", limit).header("x-ratelimit-remaining-tokens", left);
    }
    b
}

/// The innermost stage: resolve the model, wait in the QoS queue for a lease, forward
/// with retries, stream the answer back through [`ObservedBody`].
async fn proxy(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let start = Instant::now();
    let ext = req.extensions();
    let (Some(caller), Some(policy), Some(parsed)) =
        (ext.get::<Caller>().cloned(), ext.get::<Policy>().cloned(), ext.get::<Parsed>().cloned())
    else {
        return ApiError::new(ApiCode::Internal, "request layers missing").into_response();
    };
    let remaining = ext.get::<Remaining>().cloned().unwrap_or_default();
    let headers = req.headers().clone();
    let model = parsed.features.model.clone();
    let mut counted = None;
    match forward_request(&gw, caller, policy, parsed, remaining, &headers, start, &mut counted).await {
        Ok(r) => r,
        Err(e) => {
            if let Some(base) = counted {
                if matches!(e.status(), StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) {
                    gw.demand.rejected(&base);
                } else {
                    gw.demand.finished(&base, Default::default());
                }
            }
            gw.metrics.error(&gw.model_label(&model, Some(e.code)), e.code.as_str());
            if e.status().is_server_error() {
                tracing::warn!(model = %model, code = %e.code, error = %e.message, "request failed");
            }
            e.into_response()
        }
    }
}

/// Counts the request's arrival for its base model, once.
fn arrived(gw: &Gateway, counted: &mut Option<ModelName>, base: &ModelName) {
    if counted.is_none() {
        gw.demand.arrival(base);
        *counted = Some(base.clone());
    }
}

/// Resolves, holds, admits and forwards one request; `counted` names the base model its
/// arrival was counted for (demand reports).
#[allow(clippy::too_many_arguments)]
async fn forward_request(
    gw: &Arc<Gateway>,
    caller: Caller,
    policy: Policy,
    parsed: Parsed,
    remaining: Remaining,
    h: &HeaderMap,
    start: Instant,
    counted: &mut Option<ModelName>,
) -> Result<Response, ApiError> {
    let Parsed { kind, bytes, mut features } = parsed;
    let name = ServedName::from(features.model.as_str());
    // A disaggregated model is served by its decode member, which streams the answer; the
    // prefill leg goes to its prefill member (`crate::pd`).
    let pd = gw.pd_route(name.as_str());
    let name = pd.as_ref().map_or(name, |r| r.decode.clone());
    let hold_deadline = start + gw.cfg.hold_deadline(policy.class);
    let mut held = std::time::Duration::ZERO;
    // A request queued for an adapter counts in flight on every holder until forwarded: the
    // leader does not evict an adapter a request waits for.
    let mut queued_uses = Vec::new();
    // the base model, the adapter when the name is one, and whether it must be loaded first
    let (base_model, adapter, cold): (ModelName, Option<AdapterName>, bool) = loop {
        let set = gw.dir.endpoints();
        // another tenant's adapter resolves as a name that does not exist (`ownership`)
        let hidden = !gw.may_use(caller.tenant_name(), name.as_str());
        let resolved = set.resolve(name.as_str()).filter(|r| !r.endpoints.is_empty() && !hidden);
        // an adapter no endpoint holds is loaded on demand (cluster endpoints only)
        let cold_base = if resolved.is_none() && !hidden { gw.on_demand_base(name.as_str()) } else { None };
        // a model (or an adapter's base model) without endpoints waits for one
        let wait_for = match (&resolved, &cold_base) {
            (Some(_), _) => None,
            (None, Some(base)) => Some(base.clone()),
            (None, None) => Some(name.as_model()),
        }
        .filter(|m| gw.needs_hold(m.as_str()));
        if let Some(m) = wait_for {
            drop(set);
            arrived(gw, counted, &m);
            let t = Instant::now();
            gw.hold_until_ready(&m, policy.class, hold_deadline)
                .instrument(tracing::debug_span!("gateway.hold", model = %m))
                .await?;
            held += t.elapsed();
            continue;
        }
        break match (resolved, cold_base) {
            (_, Some(base)) => (base, Some(name.as_adapter()), true),
            (Some(r), None) => {
                if let Some(adapter) = &r.adapter {
                    gw.scale_out_if_busy(adapter, &r.endpoints);
                    // A request waiting in the queue keeps its adapter in use (LRU clock):
                    // counting it only when forwarded let a long queue wait look idle.
                    for e in &r.endpoints {
                        gw.loader.record(adapter, e.id.as_str());
                        queued_uses.extend(Loader::begin(gw, adapter, e.id.as_str()));
                    }
                }
                (r.base_model, r.adapter, false)
            }
            (None, None) => {
                if set.by_model.get(name.as_str()).is_some_and(|v| v.is_empty()) {
                    return Err(ApiError::new(
                        ApiCode::NoEndpoints,
                        format!("model {:?} has no ready endpoint", features.model),
                    )
                    .retry_after(5));
                }
                if set.is_empty() && !gw.dir.synced() {
                    return Err(ApiError::new(
                        ApiCode::NoEndpointTable,
                        "the gateway has not received its endpoint table yet",
                    )
                    .retry_after(1));
                }
                return Err(ApiError::model_not_found(&features.model));
            }
        };
    };
    arrived(gw, counted, &base_model);
    let span = tracing::Span::current();
    if !span.is_disabled() {
        span.record("model", name.as_str());
        span.record("tenant", caller.name.as_str());
    }
    let strategy = gw.resolve_routing(
        policy.routing.unwrap_or_else(|| gw.configured_routing(base_model.as_str())),
        base_model.as_str(),
    );
    if strategy == flotilla_api::spec::RoutingStrategy::KvAware && adapter.is_none() {
        // an adapter's blocks are keyed by the engine's adapter id: routed without them
        features.tokens = gw.prompt_tokens(base_model.as_str(), kind, &bytes).map(Into::into);
    }

    // ask for usage on streams so TPM and metrics see tokens; the extra chunk is stripped
    let strip_usage = features.stream && !features.include_usage;
    let upstream_body = match request::with_include_usage(&bytes, &features) {
        Some(b) => Bytes::from(b),
        None => bytes,
    };
    let cost = cost_estimate(&features);
    let stream = features.stream;
    let split = gw.dir.canary_of(base_model.as_str()).map(|c| crate::canary::choose(c, features.session.as_deref()));
    let ctx =
        PickCtx { model: name, features, strategy, class: policy.class, tenant: caller.name.clone(), split, span };
    let queued = gw.demand.gauge(&base_model, GaugeKind::Queued);
    let queue_span = tracing::debug_span!(
        "gateway.queue",
        class = crate::admission::class_name(policy.class),
        cold,
        waited_ms = Empty,
        error = Empty,
    );
    let acquired = if cold {
        gw.acquire_cold(&ctx).instrument(queue_span.clone()).await
    } else {
        gw.acquire_ctx(&ctx).instrument(queue_span.clone()).await
    };
    drop(queued);
    let (lease, waited) = match acquired {
        Ok(x) => x,
        Err(e) => {
            queue_span.record("error", e.code.as_str());
            gw.metrics.reject(&caller.name, e.code.as_str());
            return Err(e);
        }
    };
    queue_span.record("waited_ms", waited.as_secs_f64() * 1e3);
    drop(queue_span);
    let in_flight = gw.demand.gauge(&base_model, GaugeKind::InFlight);
    gw.metrics
        .queue_wait
        .get_or_create(&QueueLabels {
            model: ctx.model.to_string(),
            priority: crate::admission::class_name(policy.class).into(),
        })
        .observe(waited.as_secs_f64());
    let on_demand = adapter.as_ref().filter(|_| gw.loader.enabled());
    // In flight from here to the response's end: the leader does not evict the adapter there.
    let mut adapter_use = on_demand.and_then(|a| Loader::begin(gw, a, lease.endpoint.id.as_str()));
    drop(queued_uses);
    let forwarded = match &pd {
        Some(route) => crate::pd::forward_pd(gw, &ctx, route, lease, kind, upstream_body.clone(), h).await,
        None => forward(gw, &ctx, lease, kind, upstream_body.clone(), h, gw.cfg.max_retries).await,
    };
    let mut up = match forwarded {
        // every engine holding the adapter is unreachable: load it on another replica
        Err(e) if on_demand.is_some() && e.status() == StatusCode::BAD_GATEWAY => {
            gw.reload_elsewhere(&ctx, kind, upstream_body.clone(), h).await?
        }
        r => r?,
    };
    if on_demand.is_some() && up.response.status() == StatusCode::NOT_FOUND {
        // the engine evicted the adapter since the last snapshot: never fail for that
        up = gw.reload_and_retry(&ctx, up, kind, upstream_body, h).await?;
    }
    if let Some(adapter) = on_demand {
        gw.loader.record(adapter, up.lease.endpoint.id.as_str());
        // A retry may have gone to another engine: count it there (then drop the first).
        adapter_use = Loader::begin(gw, adapter, up.lease.endpoint.id.as_str()).or(adapter_use);
    }
    let mut head = limit_headers(response_head(&up.response, &up.lease.endpoint.id), &remaining);
    if let Some(v) = up.lease.route.as_deref().and_then(|r| http::HeaderValue::from_str(r).ok()) {
        head = head.header("x-flotilla-route", v);
    }
    let status = up.response.status();
    let is_sse = stream
        && status.is_success()
        && up
            .response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
    let stream_span = tracing::debug_span!(
        "gateway.stream",
        endpoint = %up.lease.endpoint.id,
        http.response.status_code = i64::from(status.as_u16()),
        sse = is_sse,
        tokens_in = Empty,
        tokens_out = Empty,
        ttft_ms = Empty,
        outcome = Empty,
    );
    let tracker = Tracker {
        span: stream_span,
        request_span: tracing::Span::current(),
        gw: gw.clone(),
        // a disaggregated model's requests count under its own name
        model: pd.map_or_else(|| ctx.model.clone(), |r| ServedName::from(r.model.as_str())),
        tenant: caller.name,
        queue_model: ctx.model.clone(),
        cost_estimate: cost,
        status,
        start,
        first_token: None,
        last_token: None,
        usage: None,
        completed: false,
        lease: Some(up.lease),
        base_model,
        held,
        queue_wait: waited,
        demand: Some(in_flight),
        cut: None,
        adapter_use,
    };
    let sse = is_sse.then(|| SseScanner::new(strip_usage));
    let body = ObservedBody::new(
        up.response.into_body(),
        tracker,
        sse,
        gw.cfg.stream_idle_timeout,
        gw.cfg.max_stream_duration,
    );
    head.body(Body::new(body)).map_err(|e| ApiError::bad_gateway(format!("cannot build response: {e}")))
}

impl Gateway {
    /// [`Gateway::acquire`] for a borrowed context (the context stays with the caller for
    /// retries).
    pub async fn acquire_ctx(
        self: &Arc<Self>,
        ctx: &PickCtx,
    ) -> Result<(crate::admission::Lease, std::time::Duration), ApiError> {
        self.acquire(PickCtx {
            model: ctx.model.clone(),
            features: ctx.features.clone(),
            strategy: ctx.strategy,
            class: ctx.class,
            tenant: ctx.tenant.clone(),
            split: ctx.split,
            span: ctx.span.clone(),
        })
        .await
    }
}

/// Waits until a gateway that follows servers has its first view of the cluster
/// ([`Directory::first_view`]), at most `limit`, so that a gateway just (re)started does not answer the traffic a
/// balancer sends it at once with `no_endpoint_table`: until then the listener is bound but
/// not accepting, and connections wait in its backlog. False if `stop` turned true first.
///
/// [`Directory::first_view`]: crate::table::Directory::first_view
pub async fn await_first_view(gw: &Gateway, limit: std::time::Duration, stop: &mut watch::Receiver<bool>) -> bool {
    // With static backends the table is local; the servers (if any) are not waited for.
    let objects = gw.cfg.backends.is_empty() && !gw.cfg.servers.is_empty();
    let t0 = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(10));
    loop {
        if *stop.borrow() {
            return false;
        }
        if gw.dir.first_view(objects) {
            tracing::debug!(waited_ms = t0.elapsed().as_millis() as u64, "first view of the cluster; accepting");
            return true;
        }
        if t0.elapsed() >= limit {
            tracing::warn!(
                waited_s = limit.as_secs(),
                "no endpoint table from the servers yet; accepting anyway (requests get no_endpoint_table)"
            );
            return true;
        }
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => {}
        }
    }
}

/// Accepts connections for `app` until `stop` turns true, then closes the listener and
/// lets the connections finish their requests (at most `--shutdown-grace-s`).
/// With `https`, each connection's TLS handshake runs in its own task (a slow client cannot
/// stall the accept loop) and a failed one is counted and dropped.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    gw: Arc<Gateway>,
    stop: watch::Receiver<bool>,
    https: Option<Arc<flotilla_security::https::HttpsCert>>,
) {
    let opts = ServeOptions {
        header_timeout: gw.cfg.header_timeout,
        shutdown_grace: gw.cfg.shutdown_grace,
        tls_handshake_failures: gw.metrics.tls_handshake_failures.clone(),
    };
    serve_with(listener, app, opts, stop, https).await
}

/// For `flotilla gateway` (cluster or global): prints `flotilla gateway listening on
/// http(s)://ADDR` (and the metrics address) and waits for SIGINT or SIGTERM.
pub(crate) async fn announce_and_wait(
    https: bool,
    addr: SocketAddr,
    metrics: Option<SocketAddr>,
) -> std::io::Result<()> {
    // Listen for signals before announcing the address: a supervisor may send SIGTERM as soon
    // as it reads the line, and tokio registers a listener only when it is created.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let scheme = if https { "https" } else { "http" };
    let mut banner = format!("flotilla gateway listening on {scheme}://{addr}\n");
    if let Some(m) = metrics {
        banner.push_str(&format!("flotilla gateway metrics on http://{m}/metrics\n"));
    }
    // One write, its error ignored: a supervisor that reads the first line and closes the
    // pipe must not make a later line kill the gateway (println! panics on EPIPE).
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(banner.as_bytes()).and_then(|()| out.flush());
    }
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// A running gateway's tasks (the cluster gateway's or the global one's): the stop signal
/// its accept loops watch, the loops themselves and its background tasks. Dropping it stops
/// everything at once; [`ServerTasks::shutdown`] lets requests in flight finish first.
pub(crate) struct ServerTasks {
    pub(crate) stop: watch::Sender<bool>,
    pub(crate) server: Option<tokio::task::JoinHandle<()>>,
    pub(crate) metrics_server: Option<tokio::task::JoinHandle<()>>,
    pub(crate) background: Vec<tokio::task::JoinHandle<()>>,
}

impl ServerTasks {
    /// Stops accepting, lets requests in flight finish (at most `--shutdown-grace-s`) and
    /// stops the background tasks.
    pub(crate) async fn shutdown(&mut self) {
        let _ = self.stop.send(true);
        for s in [self.server.take(), self.metrics_server.take()].into_iter().flatten() {
            let _ = s.await;
        }
        for b in self.background.drain(..) {
            b.abort();
        }
    }
}

impl Drop for ServerTasks {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for b in &self.background {
            b.abort();
        }
    }
}

/// What the accept loop needs of a gateway (the cluster gateway's or the global one's).
#[derive(Clone)]
pub struct ServeOptions {
    /// Time a client has to send its request headers (slowloris guard).
    pub header_timeout: std::time::Duration,
    /// How long requests in flight may take to finish once stopping.
    pub shutdown_grace: std::time::Duration,
    /// Counts failed TLS handshakes on an HTTPS listener.
    pub tls_handshake_failures: prometheus_client::metrics::counter::Counter,
}

/// [`serve`] with its options given.
pub async fn serve_with(
    listener: TcpListener,
    app: Router,
    opts: ServeOptions,
    mut stop: watch::Receiver<bool>,
    https: Option<Arc<flotilla_security::https::HttpsCert>>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // The connections' tasks, so those still open after the grace can be closed.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer): (tokio::net::TcpStream, SocketAddr) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let svc = hyper_util::service::TowerToHyperService::new(app.clone());
                let http = {
                    let mut b = hyper::server::conn::http1::Builder::new();
                    b.timer(TokioTimer::new()).header_read_timeout(opts.header_timeout).keep_alive(true);
                    b
                };
                let watcher = graceful.watcher();
                let (https, failures) = (https.clone(), opts.tls_handshake_failures.clone());
                connections.spawn(async move {
                    let ended = match https {
                        None => watcher.watch(http.serve_connection(TokioIo::new(stream), svc)).await,
                        Some(cert) => match cert.accept(stream).await {
                            Ok(tls) => watcher.watch(http.serve_connection(TokioIo::new(tls), svc)).await,
                            Err(e) => {
                                failures.inc();
                                tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                                return;
                            }
                        },
                    };
                    if let Err(e) = ended {
                        tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                    }
                });
            }
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    let grace = opts.shutdown_grace;
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            grace_s = grace.as_secs(),
            open = connections.len(),
            "requests still in flight after the shutdown grace; closing them"
        );
        connections.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_on_a_public_listener_are_warned_about() {
        let cases = [
            ("127.0.0.1:8080", false, false),
            ("[::1]:8080", false, false),
            ("0.0.0.0:8080", false, true),
            ("10.0.0.5:8080", false, true),
            ("[::]:8080", false, true),
            ("0.0.0.0:8080", true, false),
        ];
        for (listen, separate, warned) in cases {
            let w = metrics_exposure_warning(listen.parse().unwrap(), separate);
            assert_eq!(w.is_some(), warned, "{listen} {separate}");
            if let Some(w) = w {
                assert!(w.contains("--metrics-listen") && w.contains(listen), "{w}");
            }
        }
    }
}
