//! The spans of a proxied request (exported over OTLP when the process has an endpoint,
//! see `flotilla_telemetry`), and W3C trace context in and out.
//!
//! ```text
//! gateway.request            the whole request, child of the client's `traceparent`
//! ├─ gateway.admission       auth, policy, body read and parse, tenant limits
//! ├─ gateway.hold            waiting for a model with no endpoint (cold start), if any
//! ├─ gateway.queue           waiting in the QoS queue for a lease
//! ├─ gateway.route           the routing decision (strategy, candidates, endpoint)
//! ├─ gateway.upstream        one attempt: connect, send, response head (retries: more)
//! │  └─ gateway.connect      a new connection to the engine (none when one is pooled)
//! └─ gateway.stream          response head to stream end; event `first byte`
//! ```
//!
//! Numbers are recorded as `i64`: tracing-opentelemetry exports a `u64` as a string.
//! The spans are DEBUG, so a gateway that exports nothing and logs at INFO does not
//! build them (one level check per site). The engine gets the `gateway.upstream` span as
//! its parent in `traceparent`; with no exporter, the client's own `traceparent` and
//! `tracestate` go to the engine unchanged.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use tracing::field::Empty;
use tracing::Instrument as _;

/// The `gateway.admission` span, in the request's extensions from [`request`] until the
/// last admission layer (`limits`) lets the request through (or it is rejected and
/// dropped).
#[derive(Clone)]
pub struct AdmissionSpan(pub tracing::Span);

/// The outermost layer of the proxied endpoints: opens `gateway.request` (a child of the
/// incoming `traceparent`, if any) and `gateway.admission`.
pub async fn request(mut req: Request, next: Next) -> Response {
    let span = tracing::debug_span!(
        "gateway.request",
        otel.kind = "server",
        url.path = req.uri().path(),
        model = Empty,
        tenant = Empty,
        http.response.status_code = Empty,
    );
    if span.is_disabled() {
        return next.run(req).await;
    }
    flotilla_telemetry::propagation::set_parent(&span, req.headers());
    let admission = tracing::debug_span!(parent: &span, "gateway.admission");
    req.extensions_mut().insert(AdmissionSpan(admission));
    let resp = next.run(req).instrument(span.clone()).await;
    span.record("http.response.status_code", i64::from(resp.status().as_u16()));
    resp
}

/// Ends `gateway.admission`: the request passed every admission layer.
pub fn admitted(req: &mut Request) {
    req.extensions_mut().remove::<AdmissionSpan>();
}

/// The upstream client's connector with a `gateway.connect` span around each new
/// connection to an engine (TCP, and TLS for `https://` engines): a child of the
/// `gateway.upstream` attempt that needed it. A pooled connection makes no span.
#[derive(Clone, Debug)]
pub struct TracedConnector<C>(pub C);

impl<C> tower::Service<http::Uri> for TracedConnector<C>
where
    C: tower::Service<http::Uri>,
{
    type Response = C::Response;
    type Error = C::Error;
    type Future = tracing::instrument::Instrumented<C::Future>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let span = tracing::debug_span!("gateway.connect", server.address = uri.authority().map(|a| a.as_str()));
        self.0.call(uri).instrument(span)
    }
}
