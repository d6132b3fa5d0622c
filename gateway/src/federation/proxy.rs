//! Forwarding one request across member clusters: the clusters [`Members::candidates`]
//! orders are tried in turn with the buffered body; an attempt that fails before its
//! response head (connect error, transport error, timeout) or answers 429, 503 (saturated:
//! spill over; not a 429 for the tenant's own RPM/TPM/concurrency limit, which is the
//! answer), 500, 502, 504 or 404 (the model is not there) moves to the next cluster.
//! Nothing was sent to the client yet, so failing over is invisible to it. The first other
//! answer is relayed, its body streamed through frame by frame ([`RelayBody`]: SSE is never
//! buffered); once its head is sent nothing is retried.
//!
//! ```text
//! candidates ─> attempt 1 ──connect error/timeout──> member down (poller probes) ─┐
//!                  │ 429/503/queue wait: spill     5xx/404: fail over             │
//!                  v                                                             v
//!               attempt 2 ... ─> other status: relay ─> client     all failed: the last
//!                                                                  answer, else 502
//! ```
//!
//! [`Members::candidates`]: super::members::Members::candidates

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::members::{InFlight, Member, NoCandidate};
use super::metrics::{ClusterLabels, ReasonLabels};
use super::Federation;
use crate::error::{ApiCode, ApiError};

/// Why an attempt moved to the next cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The member's gateway refused the connection or did not accept it in time.
    ConnectError,
    /// No response head within `--upstream-timeout-s`.
    Timeout,
    /// The connection broke before the response head.
    TransportError,
    /// A streamed request got no response head within `--spill-after-ms`: queued there.
    QueueWait,
    Status429,
    Status503,
    /// 500, 502 or 504.
    Status5xx,
    /// 404: the member does not serve the model (any more).
    ModelNotFound,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ConnectError => "connect_error",
            Reason::Timeout => "timeout",
            Reason::TransportError => "transport_error",
            Reason::QueueWait => "queue_wait",
            Reason::Status429 => "status_429",
            Reason::Status503 => "status_503",
            Reason::Status5xx => "status_5xx",
            Reason::ModelNotFound => "model_not_found",
        }
    }

    /// Saturation (counted as a spillover), not a failure (a failover).
    pub fn is_spill(self) -> bool {
        matches!(self, Reason::Status429 | Reason::Status503 | Reason::QueueWait)
    }
}

/// The reason an answer with `status` moves to the next cluster, if it does (pure).
pub fn classify(status: StatusCode) -> Option<Reason> {
    match status.as_u16() {
        429 => Some(Reason::Status429),
        503 => Some(Reason::Status503),
        500 | 502 | 504 => Some(Reason::Status5xx),
        404 => Some(Reason::ModelNotFound),
        _ => None,
    }
}

/// A member's 429 that is the tenant's own limit (pure): relayed, never spilled over, so
/// that a tenant does not get another cluster's share of its limit for asking too much.
pub fn tenant_limited(body: &[u8]) -> bool {
    let code = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error")?.get("code")?.as_str().map(str::to_string));
    matches!(code.as_deref(), Some("rpm_limit_exceeded" | "tpm_limit_exceeded" | "concurrency_limit_exceeded"))
}

/// Request and response headers not passed on: hop-by-hop ones, and those the connection
/// recomputes.
const NOT_FORWARDED: [&str; 11] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

/// The response header naming the member cluster that answered.
pub const CLUSTER_HEADER: &str = "x-flotilla-cluster";

/// Largest error answer kept to relay when every cluster failed.
const MAX_ERROR_BODY: usize = 64 << 10;
/// Longest wait for an error answer's body.
const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(2);

/// An error and its causes, on one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// A request in flight on a member: its count and gauge, until dropped.
struct Lease {
    fed: Arc<Federation>,
    member: Arc<Member>,
    in_flight: Option<InFlight>,
}

impl Lease {
    fn new(fed: &Arc<Federation>, member: &Arc<Member>) -> Lease {
        let in_flight = Some(member.begin());
        let l = Lease { fed: fed.clone(), member: member.clone(), in_flight };
        l.gauge();
        l
    }

    fn gauge(&self) {
        let labels = ClusterLabels { cluster: self.member.info.name.to_string() };
        self.fed.metrics.member_in_flight.get_or_create(&labels).set(i64::from(self.member.in_flight()));
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.in_flight.take();
        self.gauge();
    }
}

/// An answer kept whole (an error from a cluster that was left).
struct Buffered {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

async fn buffer(resp: http::Response<Incoming>) -> Buffered {
    let (parts, body) = resp.into_parts();
    let body = match tokio::time::timeout(ERROR_BODY_TIMEOUT, Limited::new(body, MAX_ERROR_BODY).collect()).await {
        Ok(Ok(c)) => c.to_bytes(),
        _ => Bytes::new(),
    };
    Buffered { status: parts.status, headers: parts.headers, body }
}

fn head(status: StatusCode, headers: &HeaderMap, cluster: &str) -> http::response::Builder {
    let mut b = http::Response::builder().status(status);
    for (k, v) in headers {
        if !NOT_FORWARDED.contains(&k.as_str()) {
            b = b.header(k, v.clone());
        }
    }
    if let Ok(v) = HeaderValue::from_str(cluster) {
        b = b.header(CLUSTER_HEADER, v);
    }
    b
}

fn build(
    member: &Member,
    path_and_query: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, ApiError> {
    let uri = member
        .info
        .gateway
        .uri(path_and_query)
        .map_err(|e| ApiError::new(ApiCode::Internal, format!("cannot build the member's URI: {e}")))?;
    let mut b = Request::post(uri);
    for (k, v) in headers {
        if !NOT_FORWARDED.contains(&k.as_str()) {
            b = b.header(k, v.clone());
        }
    }
    b.body(Full::new(body)).map_err(|e| ApiError::new(ApiCode::Internal, format!("cannot build the request: {e}")))
}

/// An answer of the global gateway itself (no cluster), counted.
pub fn own_error(fed: &Federation, e: ApiError) -> Response {
    fed.metrics.request("none", "unknown", e.code.as_str());
    if e.status().is_server_error() {
        tracing::warn!(code = %e.code, error = %e.message, "request failed");
    }
    e.into_response()
}

/// What a request asks for, as routing reads it.
pub struct Ask<'a> {
    /// The path and query sent to the member (the client's own).
    pub path_and_query: &'a str,
    pub headers: &'a HeaderMap,
    pub body: Bytes,
    pub model: &'a str,
    pub stream: bool,
    pub region: Option<&'a str>,
    /// When the request arrived.
    pub start: Instant,
}

/// Tries the candidate clusters in turn and answers.
pub async fn forward(fed: &Arc<Federation>, ask: Ask<'_>) -> Response {
    let cfg = &fed.cfg;
    let candidates = match fed.members.candidates(ask.model, ask.region, cfg.max_clusters) {
        Ok(c) => c,
        Err(NoCandidate::NoList) => {
            let e = ApiError::new(
                ApiCode::NoEndpointTable,
                "the global gateway has not received the federation's Cluster list yet",
            );
            return own_error(fed, e.retry_after(1));
        }
        Err(NoCandidate::NoneAnswered) => {
            let e =
                ApiError::new(ApiCode::NoEndpoints, "no member cluster's gateway has answered the global gateway yet");
            return own_error(fed, e.retry_after(2));
        }
        Err(NoCandidate::UnknownModel) => {
            let e =
                ApiError::new(ApiCode::ModelNotFound, format!("no member cluster serves the model {:?}", ask.model))
                    .param("model");
            return own_error(fed, e);
        }
    };
    let model = ask.model;
    let upstream_timeout = cfg.base.upstream_timeout;
    let mut tried: Vec<String> = Vec::new();
    let mut last_answer: Option<(Arc<Member>, Buffered)> = None;
    for (i, m) in candidates.iter().enumerate() {
        let last = i + 1 == candidates.len();
        let spill = cfg.spill_after.filter(|s| ask.stream && !last && *s < upstream_timeout);
        let req = match build(m, ask.path_and_query, ask.headers, ask.body.clone()) {
            Ok(r) => r,
            Err(e) => return own_error(fed, e),
        };
        let lease = Lease::new(fed, m);
        let t0 = Instant::now();
        let res = tokio::time::timeout(spill.unwrap_or(upstream_timeout), fed.client.request(req)).await;
        let (reason, why) = match res {
            Err(_) if spill.is_some() => {
                (Reason::QueueWait, format!("no response head within {} ms", t0.elapsed().as_millis()))
            }
            Err(_) => {
                m.request_failed(Instant::now(), cfg.down_backoff);
                (Reason::Timeout, format!("no response head within {} s", upstream_timeout.as_secs()))
            }
            Ok(Err(e)) => {
                let why = error_chain(&e);
                if e.is_connect() {
                    m.request_failed(Instant::now(), cfg.down_backoff);
                    (Reason::ConnectError, why)
                } else {
                    (Reason::TransportError, why)
                }
            }
            Ok(Ok(resp)) => {
                match classify(resp.status()) {
                    None => {
                        // a quick refusal (429, 503) is no measure of how fast it serves
                        m.record_latency(t0.elapsed());
                        return relay(fed, m, lease, resp, model, ask.start, ask.stream);
                    }
                    Some(reason) => {
                        if reason == Reason::ModelNotFound && m.model_missing(model) {
                            tracing::info!(cluster = %m.info.name, model, "member answered 404: model removed there until its next poll");
                        }
                        let status = resp.status();
                        let b = buffer(resp).await;
                        if reason == Reason::Status429 && tenant_limited(&b.body) {
                            drop(lease);
                            return answer(fed, m, b, model, ask.start);
                        }
                        last_answer = Some((m.clone(), b));
                        (reason, format!("status {status}"))
                    }
                }
            }
        };
        drop(lease);
        tried.push(format!("{} ({why})", m.info.name));
        if last {
            break;
        }
        let labels = ReasonLabels { cluster: m.info.name.to_string(), reason: reason.as_str().into() };
        if reason.is_spill() {
            fed.metrics.spillovers.get_or_create(&labels).inc();
        } else {
            fed.metrics.failovers.get_or_create(&labels).inc();
        }
        tracing::debug!(cluster = %m.info.name, model, reason = reason.as_str(), why = %why, "trying the next cluster");
    }
    match last_answer {
        Some((m, b)) => answer(fed, &m, b, model, ask.start),
        None => {
            observe(fed, "none", ask.start);
            let e = ApiError::bad_gateway(format!(
                "no member cluster answered for model {model:?}; tried {}",
                tried.join(", ")
            ));
            fed.metrics.request("none", model, e.code.as_str());
            tracing::warn!(model, tried = ?tried, "every cluster tried failed");
            e.into_response()
        }
    }
}

/// Answers with a member's kept answer, counted.
fn answer(fed: &Federation, m: &Member, b: Buffered, model: &str, start: Instant) -> Response {
    fed.metrics.request(m.info.name.as_str(), model, b.status.as_str());
    observe(fed, m.info.name.as_str(), start);
    head(b.status, &b.headers, m.info.name.as_str())
        .body(Body::from(b.body))
        .unwrap_or_else(|e| ApiError::new(ApiCode::Internal, e.to_string()).into_response())
}

fn observe(fed: &Federation, cluster: &str, start: Instant) {
    fed.metrics
        .request_duration
        .get_or_create(&ClusterLabels { cluster: cluster.into() })
        .observe(start.elapsed().as_secs_f64());
}

/// Relays an answer: its head now, its body as it comes.
fn relay(
    fed: &Arc<Federation>,
    m: &Arc<Member>,
    lease: Lease,
    resp: http::Response<Incoming>,
    model: &str,
    start: Instant,
    stream: bool,
) -> Response {
    let (parts, body) = resp.into_parts();
    let settle = Settle {
        fed: fed.clone(),
        cluster: m.info.name.to_string(),
        model: model.to_string(),
        status: parts.status,
        start,
        completed: false,
        _lease: lease,
    };
    let idle = fed.cfg.base.stream_idle_timeout;
    let body =
        RelayBody { inner: body, idle: Box::pin(tokio::time::sleep(idle)), idle_timeout: idle, settle: Some(settle) };
    tracing::debug!(cluster = %m.info.name, model, status = parts.status.as_u16(), stream, "relaying");
    head(parts.status, &parts.headers, m.info.name.as_str())
        .body(Body::new(body))
        .unwrap_or_else(|e| ApiError::new(ApiCode::Internal, e.to_string()).into_response())
}

/// Counts a relayed request once, when its body ends or the client leaves (`499`).
struct Settle {
    fed: Arc<Federation>,
    cluster: String,
    model: String,
    status: StatusCode,
    start: Instant,
    completed: bool,
    _lease: Lease,
}

impl Drop for Settle {
    fn drop(&mut self) {
        let outcome = if self.completed { self.status.as_str().to_string() } else { "499".to_string() };
        self.fed.metrics.request(&self.cluster, &self.model, &outcome);
        observe(&self.fed, &self.cluster, self.start);
    }
}

/// A member's response body passed through frame by frame (nothing is buffered), with the
/// cluster gateway's idle bound between frames (`--stream-idle-timeout-s`). Dropping it (the
/// client left) closes the member's connection, which cancels the request there.
struct RelayBody {
    inner: Incoming,
    idle: Pin<Box<Sleep>>,
    idle_timeout: Duration,
    /// None once the body ended.
    settle: Option<Settle>,
}

impl http_body::Body for RelayBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.settle.is_none() {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {
                if this.idle.as_mut().poll(cx).is_ready() {
                    this.settle = None;
                    return Poll::Ready(Some(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "member stream idle timeout",
                    ))));
                }
                Poll::Pending
            }
            Poll::Ready(None) => {
                if let Some(mut s) = this.settle.take() {
                    s.completed = true;
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.settle = None;
                Poll::Ready(Some(Err(std::io::Error::other(e))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let deadline = Instant::now() + this.idle_timeout;
                this.idle.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.settle.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for RelayBody {
    fn drop(&mut self) {
        // hyper stops polling a body whose length it knows once that much came: it ended
        if let Some(mut s) = self.settle.take() {
            s.completed = http_body::Body::is_end_stream(&self.inner);
        }
    }
}

use std::future::Future as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saturation_spills_failures_fail_over_and_answers_pass() {
        let cases = [
            (429, Some(Reason::Status429), true),
            (503, Some(Reason::Status503), true),
            (500, Some(Reason::Status5xx), false),
            (502, Some(Reason::Status5xx), false),
            (504, Some(Reason::Status5xx), false),
            (404, Some(Reason::ModelNotFound), false),
        ];
        for (code, want, spill) in cases {
            let r = classify(StatusCode::from_u16(code).unwrap());
            assert_eq!(r, want, "{code}");
            assert_eq!(r.unwrap().is_spill(), spill, "{code}");
        }
        for code in [200, 201, 400, 401, 403, 408, 413, 422, 501] {
            assert_eq!(classify(StatusCode::from_u16(code).unwrap()), None, "{code} is the answer");
        }
        assert!(Reason::QueueWait.is_spill() && !Reason::ConnectError.is_spill());
    }

    #[test]
    fn a_tenant_over_its_own_limit_is_answered_not_spilled() {
        let body = |code: &str| format!(r#"{{"error":{{"message":"m","type":"rate_limit_error","code":"{code}"}}}}"#);
        for code in ["rpm_limit_exceeded", "tpm_limit_exceeded", "concurrency_limit_exceeded"] {
            assert!(tenant_limited(body(code).as_bytes()), "{code}");
        }
        for code in ["adapter_busy", "queue_full"] {
            assert!(!tenant_limited(body(code).as_bytes()), "{code}: saturation spills");
        }
        assert!(!tenant_limited(b"Too Many Requests") && !tenant_limited(b""));
    }

    #[test]
    fn hop_by_hop_headers_stay_and_the_cluster_is_named() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive".parse().unwrap());
        h.insert("content-length", "5".parse().unwrap());
        h.insert("content-type", "text/event-stream".parse().unwrap());
        h.insert("x-flotilla-endpoint", "10.0.0.5:8000".parse().unwrap());
        let r = head(StatusCode::OK, &h, "us-east").body(()).unwrap();
        assert!(r.headers().get("connection").is_none() && r.headers().get("content-length").is_none());
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        assert_eq!(r.headers()["x-flotilla-endpoint"], "10.0.0.5:8000");
        assert_eq!(r.headers()[CLUSTER_HEADER], "us-east");
    }
}
