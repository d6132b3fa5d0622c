//! Forwarding to engines: sends the original bytes to the leased endpoint (with the
//! engine's API key as a bearer token when the endpoint table gives one; over https, to the
//! certificate the table pins, when it gives a pin: an engine showing another certificate
//! gets nothing and counts as a failed upstream), retries on a
//! connect failure, transport error or 5xx before the first byte on another endpoint
//! (bounded), feeds outlier ejection, and wraps the upstream body in [`ObservedBody`],
//! which streams frames through as they arrive while measuring TTFT/TPOT, reading usage
//! and releasing the lease when the response ends or the client goes away (dropping the
//! upstream body closes its connection, which cancels the engine's request).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};
use tracing::Instrument as _;

use crate::admission::{select, Lease, PickCtx};
use crate::demand::{Finished, GaugeGuard};
use crate::error::{ApiCode, ApiError};
use crate::metrics::{EndpointLabels, ModelLabels, RequestLabels, TenantTokenLabels, TokenLabels};
use crate::names::{ModelName, ServedName};
use crate::qos::correction;
use crate::request::ApiKind;
use crate::sse::{usage_of_body, SseScanner, Usage};
use crate::state::Gateway;
use crate::table::EndpointId;

/// Headers copied from the client to the engine (never its `Authorization`: the engine's
/// own key replaces it).
const FORWARD_HEADERS: [&str; 3] = ["content-type", "accept", "x-request-id"];
/// Response headers not copied back (hop-by-hop or recomputed).
const DROP_HEADERS: [&str; 4] = ["connection", "keep-alive", "transfer-encoding", "content-length"];

/// The outcome of forwarding: the upstream response head and body with the lease that
/// holds its endpoint.
pub struct Upstream {
    pub response: Response<Incoming>,
    pub lease: Lease,
}

fn build(
    lease: &Lease,
    kind: ApiKind,
    body: &Bytes,
    headers: &HeaderMap,
    span: &tracing::Span,
) -> Result<Request<Full<Bytes>>, ApiError> {
    let uri = lease.endpoint.url(kind.path());
    let mut b = Request::post(uri);
    for name in FORWARD_HEADERS {
        if let Some(v) = headers.get(name) {
            b = b.header(name, v.clone());
        }
    }
    // W3C trace context: this attempt's span, or the client's as it came (`crate::trace`)
    for (name, v) in flotilla_telemetry::propagation::outgoing(span, headers) {
        b = b.header(name, v);
    }
    if !headers.contains_key("content-type") {
        b = b.header("content-type", "application/json");
    }
    if let Some(key) = &lease.endpoint.api_key {
        b = b.header(http::header::AUTHORIZATION, key.bearer());
    }
    b.body(Full::new(body.clone())).map_err(|e| ApiError::bad_gateway(format!("cannot build upstream request: {e}")))
}

fn failure(gw: &Gateway, lease: &Lease) {
    let ejected = lease.stats.outlier.lock().unwrap_or_else(|e| e.into_inner()).on_failure(
        Instant::now(),
        gw.cfg.eject_after_failures,
        gw.cfg.eject_base,
    );
    if ejected {
        tracing::warn!(endpoint = %lease.endpoint.id, "endpoint ejected after consecutive failures");
        gw.metrics
            .ejections
            .get_or_create(&EndpointLabels {
                model: lease.endpoint.model.to_string(),
                endpoint: lease.endpoint.id.to_string(),
            })
            .inc();
    }
}

pub fn success(lease: &Lease) {
    let mut o = lease.stats.outlier.lock().unwrap_or_else(|e| e.into_inner());
    if o.consecutive_failures > 0 || o.ejected_until.is_some() || o.probing {
        o.on_success();
    }
}

/// Sends the request, moving to another endpoint on failures before the first byte, at
/// most `retries` times (`gw.cfg.max_retries` for a plain request).
pub async fn forward(
    gw: &Arc<Gateway>,
    ctx: &PickCtx,
    mut lease: Lease,
    kind: ApiKind,
    body: Bytes,
    headers: &HeaderMap,
    retries: u32,
) -> Result<Upstream, ApiError> {
    let mut tried: Vec<EndpointId> = Vec::new();
    loop {
        let span = tracing::debug_span!(
            "gateway.upstream",
            otel.kind = "client",
            endpoint = %lease.endpoint.id,
            attempt = tried.len() as i64 + 1,
            http.response.status_code = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        let req = build(&lease, kind, &body, headers, &span)?;
        let res = tokio::time::timeout(gw.cfg.upstream_timeout, gw.client.request(req)).instrument(span.clone()).await;
        if !span.is_disabled() {
            match &res {
                Ok(Ok(r)) => span.record("http.response.status_code", i64::from(r.status().as_u16())),
                Ok(Err(e)) => span.record("error", tracing::field::display(e)),
                Err(_) => span.record("error", "timeout"),
            };
        }
        drop(span);
        let retryable = match res {
            Err(_) => {
                failure(gw, &lease);
                return Err(ApiError::new(
                    ApiCode::UpstreamTimeout,
                    format!(
                        "engine {} did not answer within {} s",
                        lease.endpoint.id,
                        gw.cfg.upstream_timeout.as_secs()
                    ),
                ));
            }
            Ok(Ok(resp)) if !resp.status().is_server_error() => {
                success(&lease);
                return Ok(Upstream { response: resp, lease });
            }
            Ok(Ok(resp)) => {
                failure(gw, &lease);
                if tried.len() as u32 >= retries {
                    return Ok(Upstream { response: resp, lease });
                }
                format!("status {}", resp.status())
            }
            Ok(Err(e)) => {
                failure(gw, &lease);
                let why = match flotilla_engine::tls::pin_mismatch(&e) {
                    Some(m) => m.to_string(),
                    None => {
                        format!("{e}: {}", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default())
                    }
                };
                if tried.len() as u32 >= retries {
                    return Err(ApiError::bad_gateway(format!("engine {} failed: {why}", lease.endpoint.id)));
                }
                why
            }
        };
        tracing::debug!(endpoint = %lease.endpoint.id, why = %retryable, "retrying on another endpoint");
        gw.metrics
            .retries
            .get_or_create(&EndpointLabels {
                model: lease.endpoint.model.to_string(),
                endpoint: lease.endpoint.id.to_string(),
            })
            .inc();
        tried.push(lease.endpoint.id.clone());
        match select(gw, ctx, &tried, false) {
            Some(next) => lease = next,
            None => {
                return Err(ApiError::bad_gateway(format!(
                    "engine {} failed ({retryable}) and no other endpoint of {:?} is available",
                    lease.endpoint.id, ctx.model
                )))
            }
        }
    }
}

/// Per-request accounting, settled once when the response ends or is dropped.
pub struct Tracker {
    /// `gateway.stream`: response head to stream end (`Span::none()` when not traced).
    pub span: tracing::Span,
    /// `gateway.request`, which ends with the stream too.
    pub request_span: tracing::Span,
    pub gw: Arc<Gateway>,
    pub lease: Option<Lease>,
    /// The requested name (metric labels).
    pub model: ServedName,
    pub tenant: String,
    /// The QoS queue the request waited in.
    pub queue_model: ServedName,
    pub cost_estimate: u64,
    pub status: StatusCode,
    pub start: Instant,
    pub first_token: Option<Instant>,
    pub last_token: Option<Instant>,
    pub usage: Option<Usage>,
    pub completed: bool,
    /// The base model, for demand reports.
    pub base_model: ModelName,
    /// Time the request was held for a cold start: not part of its TTFT and TPOT.
    pub held: std::time::Duration,
    pub queue_wait: std::time::Duration,
    /// Keeps the base model's in-flight demand gauge up until settled.
    pub demand: Option<GaugeGuard>,
    /// The gateway ended the response itself (`--max-stream-duration`).
    pub cut: Option<ApiCode>,
    /// Counts the request in flight for its adapter on its engine until settled.
    pub adapter_use: Option<crate::ondemand::AdapterUse>,
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.settle();
    }
}

impl Tracker {
    /// Records metrics, usage and fair-share charges once, and releases the lease.
    pub fn settle(&mut self) {
        let Some(lease) = self.lease.take() else { return };
        // latency figures start when the request stopped being held for a cold start
        let served = self.start + self.held;
        let error = self.cut.is_some() || !self.completed || self.status.is_server_error();
        let revision = lease.endpoint.revision;
        let mut finished = Finished { queue_wait: self.queue_wait, revision, error, ..Finished::default() };
        let endpoint = lease.endpoint.id.to_string();
        let m = &self.gw.metrics;
        let el = EndpointLabels { model: self.model.to_string(), endpoint: endpoint.clone() };
        let code = match self.cut {
            Some(c) => c.status().as_u16().to_string(),
            None if self.completed => self.status.as_u16().to_string(),
            None => "499".to_string(),
        };
        m.requests.get_or_create(&RequestLabels { model: self.model.to_string(), endpoint, code: code.clone() }).inc();
        if let Some(c) = self.cut {
            m.error(self.model.as_str(), c.as_str());
        } else if !self.completed || !self.status.is_success() {
            m.error(self.model.as_str(), &code);
        }
        m.e2e.get_or_create(&el).observe(self.start.elapsed().as_secs_f64());
        if let Some(ft) = self.first_token {
            let ttft = ft.saturating_duration_since(served);
            m.ttft.get_or_create(&el).observe(ttft.as_secs_f64());
            lease.stats.record_ttft(ttft);
            finished.ttft = Some(ttft);
        }
        if let Some(u) = self.usage {
            match (self.first_token, self.last_token) {
                (Some(ft), Some(lt)) if u.completion_tokens > 1 && lt > ft => {
                    let tpot = lt.duration_since(ft) / u32::try_from(u.completion_tokens - 1).unwrap_or(u32::MAX);
                    m.tpot.get_or_create(&el).observe(tpot.as_secs_f64());
                    lease.stats.record_tpot(tpot);
                    finished.tpot = Some(tpot);
                }
                (None, _) if self.completed && u.completion_tokens > 0 => {
                    // a whole JSON answer: its latency per output token feeds least-latency
                    lease.stats.record_tpot(served.elapsed() / u.completion_tokens.min(u32::MAX as u64) as u32);
                }
                _ => {}
            }
            let tok = |d: &str| TokenLabels {
                model: self.model.to_string(),
                endpoint: el.endpoint.clone(),
                direction: d.into(),
            };
            m.tokens.get_or_create(&tok("in")).inc_by(u.prompt_tokens);
            m.tokens.get_or_create(&tok("out")).inc_by(u.completion_tokens);
            let tt = |d: &str| TenantTokenLabels { tenant: self.tenant.clone(), direction: d.into() };
            m.tenant_tokens.get_or_create(&tt("in")).inc_by(u.prompt_tokens);
            m.tenant_tokens.get_or_create(&tt("out")).inc_by(u.completion_tokens);
            let total = u.total();
            self.gw.limits.record_tokens(&self.tenant, total, Instant::now());
            self.gw.admission.charge(&self.queue_model, &self.tenant, correction(total, self.cost_estimate));
        }
        self.gw.demand.finished(&self.base_model, finished);
        self.demand.take();
        drop(lease);
        if !self.span.is_disabled() {
            if let Some(u) = self.usage {
                // i64: tracing-opentelemetry exports a u64 as a string
                self.span.record("tokens_in", i64::try_from(u.prompt_tokens).unwrap_or(i64::MAX));
                self.span.record("tokens_out", i64::try_from(u.completion_tokens).unwrap_or(i64::MAX));
            }
            if let Some(ft) = self.first_token {
                self.span.record("ttft_ms", ft.saturating_duration_since(served).as_secs_f64() * 1e3);
            }
            self.span.record("outcome", code.as_str());
            // the stream ends here, not when hyper drops the body; a span's end is its last
            // exit, and the request's was when the handler returned the response head
            self.span = tracing::Span::none();
            self.request_span.in_scope(|| {});
            self.request_span = tracing::Span::none();
        }
    }
}

/// The response body sent to the client: upstream frames as they arrive. A stream that
/// lasts `--max-stream-duration` gets a last SSE event with the error
/// `stream_duration_exceeded` and ends; the upstream body is dropped at once, which closes
/// its connection and so cancels the engine's request.
pub struct ObservedBody {
    /// None once the gateway ended the stream.
    inner: Option<Incoming>,
    tracker: Tracker,
    /// SSE scanner for streams; None for JSON bodies (kept in `copy` for usage).
    sse: Option<SseScanner>,
    copy: BytesMut,
    idle: Pin<Box<Sleep>>,
    idle_timeout: std::time::Duration,
    /// When an SSE stream is ended, and the bound it enforces.
    cap: Option<(Pin<Box<Sleep>>, std::time::Duration)>,
    ended: bool,
    /// The first body bytes came (the `first byte` span event was sent).
    first_byte: bool,
}

/// Largest JSON response copied to read its usage.
const MAX_COPY: usize = 4 << 20;

impl ObservedBody {
    /// `max_duration` bounds SSE streams only (a JSON answer's head already came within
    /// `--upstream-timeout-s`, and its body follows at once).
    pub fn new(
        inner: Incoming,
        tracker: Tracker,
        sse: Option<SseScanner>,
        idle_timeout: std::time::Duration,
        max_duration: Option<std::time::Duration>,
    ) -> Self {
        let cap = max_duration.filter(|_| sse.is_some()).map(|d| (Box::pin(tokio::time::sleep(d)), d));
        ObservedBody {
            inner: Some(inner),
            tracker,
            sse,
            copy: BytesMut::new(),
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            idle_timeout,
            cap,
            ended: false,
            first_byte: false,
        }
    }

    /// Ends the stream at `--max-stream-duration`: drops the upstream body (cancelling the
    /// engine's request), settles the tracker and returns the last event for the client.
    fn cut(&mut self, bound: std::time::Duration) -> Bytes {
        self.ended = true;
        self.inner = None;
        let code = ApiCode::StreamDurationExceeded;
        self.tracker.cut = Some(code);
        let model = self.tracker.model.to_string();
        self.tracker.gw.metrics.stream_duration_exceeded.get_or_create(&ModelLabels { model }).inc();
        tracing::info!(model = %self.tracker.model, tenant = %self.tracker.tenant, bound_s = bound.as_secs_f64(), "stream ended at --max-stream-duration");
        self.tracker.settle();
        stream_cut_event(bound)
    }

    fn finish(&mut self) -> Option<Bytes> {
        self.ended = true;
        self.tracker.completed = true;
        let rest = match &mut self.sse {
            Some(s) => {
                self.tracker.usage = s.usage;
                let rest = s.finish();
                (!rest.is_empty()).then_some(rest)
            }
            None => {
                self.tracker.usage = usage_of_body(&self.copy);
                None
            }
        };
        if self.tracker.status.is_success() {
            if let Some(l) = &self.tracker.lease {
                success(l);
            }
        }
        // settle now rather than when hyper drops the body
        self.tracker.settle();
        rest
    }
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if let Some((cap, bound)) = &mut this.cap {
            if cap.as_mut().poll(cx).is_ready() {
                let bound = *bound;
                return Poll::Ready(Some(Ok(Frame::data(this.cut(bound)))));
            }
        }
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        loop {
            match Pin::new(&mut *inner).poll_frame(cx) {
                Poll::Pending => {
                    if this.idle.as_mut().poll(cx).is_ready() {
                        this.ended = true;
                        return Poll::Ready(Some(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "engine stream idle timeout",
                        ))));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(None) => {
                    return Poll::Ready(this.finish().map(|b| Ok(Frame::data(b))));
                }
                Poll::Ready(Some(Err(e))) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(std::io::Error::other(e))));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let deadline = Instant::now() + this.idle_timeout;
                    this.idle.as_mut().reset(deadline);
                    let Ok(data) = frame.into_data() else { continue };
                    if !this.first_byte {
                        this.first_byte = true;
                        if let Some(lease) = this.tracker.lease.as_mut() {
                            lease.prefill_started();
                        }
                        let tracker = &this.tracker;
                        tracing::debug!(parent: &tracker.span, bytes = data.len() as i64, "first byte");
                    }
                    let now = Instant::now();
                    let out = match &mut this.sse {
                        Some(s) => {
                            let (out, content) = s.feed(&data);
                            if content {
                                this.tracker.first_token.get_or_insert(now);
                                this.tracker.last_token = Some(now);
                            }
                            out
                        }
                        None => {
                            // a JSON answer arrives whole: no TTFT/TPOT samples from it
                            if this.copy.len() + data.len() <= MAX_COPY {
                                this.copy.extend_from_slice(&data);
                            }
                            data
                        }
                    };
                    if out.is_empty() {
                        continue;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
            }
        }
    }
}

use std::future::Future as _;

/// The SSE event that ends a stream cut at `bound`: OpenAI's error shape, as vLLM sends
/// an error inside a stream (the status was 200 already); no `[DONE]` follows.
pub fn stream_cut_event(bound: std::time::Duration) -> Bytes {
    let e = ApiError::new(
        ApiCode::StreamDurationExceeded,
        format!(
            "the stream was ended after {} s, the gateway's --max-stream-duration; ask for fewer tokens or resume in a new request",
            bound.as_secs_f64()
        ),
    );
    let mut out = BytesMut::from(&b"data: "[..]);
    out.extend_from_slice(&e.body());
    out.extend_from_slice(b"\n\n");
    out.freeze()
}

/// Copies the upstream response head for the client.
pub fn response_head(up: &Response<Incoming>, endpoint: &EndpointId) -> http::response::Builder {
    let mut b = Response::builder().status(up.status());
    for (k, v) in up.headers() {
        if !DROP_HEADERS.contains(&k.as_str()) {
            b = b.header(k, v.clone());
        }
    }
    if let Ok(v) = HeaderValue::from_str(endpoint.as_str()) {
        b = b.header("x-flotilla-endpoint", v);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_stream_ends_with_one_error_event() {
        let ev = stream_cut_event(std::time::Duration::from_secs(90));
        let text = std::str::from_utf8(&ev).unwrap();
        let json = text.strip_prefix("data: ").and_then(|t| t.strip_suffix("\n\n")).expect(text);
        assert!(!json.contains('\n'), "one line: {text:?}");
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["error"]["code"], "stream_duration_exceeded");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("90 s"), "{v}");
    }
}
