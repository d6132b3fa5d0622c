//! W3C trace context (`traceparent`, `tracestate`) in and out of HTTP headers.
//!
//! In: [`set_parent`] makes a server span the child of the caller's `traceparent` (a
//! malformed one is ignored: the span starts a new trace). Out: [`outgoing`] gives the
//! headers for a request to the next hop: the span's own context when spans are exported,
//! so the next hop's spans hang under ours; otherwise the incoming `traceparent` and
//! `tracestate` unchanged, so a client that traces still sees the engine's spans in its
//! trace when this process exports nothing.

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The two header values the propagator writes.
#[derive(Default)]
struct Out {
    traceparent: Option<HeaderValue>,
    tracestate: Option<HeaderValue>,
}

impl Injector for Out {
    fn set(&mut self, key: &str, value: String) {
        let Ok(v) = HeaderValue::from_str(&value) else { return };
        match key {
            "traceparent" => self.traceparent = Some(v),
            "tracestate" if !value.is_empty() => self.tracestate = Some(v),
            _ => {}
        }
    }
}

/// Makes `span` a child of the trace context in `headers`, if any. Does nothing for a
/// span that is not recorded (no exporter, or filtered out), so the caller need not check.
pub fn set_parent(span: &tracing::Span, headers: &HeaderMap) {
    if span.is_disabled() || !headers.contains_key(TRACEPARENT) {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&Headers(headers));
    if cx.span().span_context().is_valid() {
        // fails only when the span is not an OpenTelemetry one or already started
        let _ = span.set_parent(cx);
    }
}

/// The trace-context headers for a request made inside `span` on behalf of a request
/// that came with `incoming` headers: `span`'s context when it is exported, else the
/// incoming ones as they came (see the module docs). Empty when neither has one.
pub fn outgoing(span: &tracing::Span, incoming: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::new();
    if !span.is_disabled() {
        let cx = span.context();
        if cx.span().span_context().is_valid() {
            let mut o = Out::default();
            TraceContextPropagator::new().inject_context(&cx, &mut o);
            if let Some(v) = o.traceparent {
                out.push((HeaderName::from_static(TRACEPARENT), v));
                if let Some(s) = o.tracestate {
                    out.push((HeaderName::from_static(TRACESTATE), s));
                }
                return out;
            }
        }
    }
    if let Some(v) = incoming.get(TRACEPARENT) {
        out.push((HeaderName::from_static(TRACEPARENT), v.clone()));
        if let Some(s) = incoming.get(TRACESTATE) {
            out.push((HeaderName::from_static(TRACESTATE), s.clone()));
        }
    }
    out
}

/// The W3C `traceparent` of `span` when it is exported (its own context, so whoever
/// continues the trace from it hangs under it); None for a span that is not recorded.
/// For links that cross a store write or an agent assignment rather than an HTTP hop.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut o = Out::default();
    TraceContextPropagator::new().inject_context(&cx, &mut o);
    o.traceparent.and_then(|v| v.to_str().ok().map(str::to_owned))
}

/// Makes `span` a child of the context a [`traceparent`] value names. A malformed value
/// is ignored (the span starts a new trace), as is a span that is not recorded.
pub fn set_parent_traceparent(span: &tracing::Span, traceparent: &str) {
    if span.is_disabled() || traceparent.is_empty() {
        return;
    }
    let Ok(v) = HeaderValue::from_str(traceparent) else { return };
    let mut h = HeaderMap::new();
    h.insert(TRACEPARENT, v);
    set_parent(span, &h);
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn without_an_exporter_the_incoming_context_passes_unchanged() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(TP));
        h.insert(TRACESTATE, HeaderValue::from_static("congo=t61rcWkgMzE"));
        let span = tracing::Span::none();
        set_parent(&span, &h);
        let out = outgoing(&span, &h);
        assert_eq!(
            out,
            vec![
                (HeaderName::from_static(TRACEPARENT), HeaderValue::from_static(TP)),
                (HeaderName::from_static(TRACESTATE), HeaderValue::from_static("congo=t61rcWkgMzE"))
            ]
        );
        assert!(outgoing(&span, &HeaderMap::new()).is_empty());
    }

    #[test]
    fn an_exported_span_sends_its_own_context_in_the_incoming_trace() {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt as _;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("t")));
        tracing::subscriber::with_default(subscriber, || {
            let mut h = HeaderMap::new();
            h.insert(TRACEPARENT, HeaderValue::from_static(TP));
            let span = tracing::info_span!("req");
            set_parent(&span, &h);
            let out = outgoing(&span, &h);
            assert_eq!(out.len(), 1, "{out:?}");
            let tp = out[0].1.to_str().unwrap();
            let parts: Vec<&str> = tp.split('-').collect();
            assert_eq!(parts[0], "00");
            assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736", "same trace: {tp}");
            assert_ne!(parts[2], "00f067aa0ba902b7", "our own span id: {tp}");
            assert_eq!(parts[3], "01");

            // a malformed traceparent starts a new trace
            let mut bad = HeaderMap::new();
            bad.insert(TRACEPARENT, HeaderValue::from_static("00-zz-00f067aa0ba902b7-01"));
            let span = tracing::info_span!("req2");
            set_parent(&span, &bad);
            let out = outgoing(&span, &bad);
            assert_eq!(out.len(), 1);
            assert!(!out[0].1.to_str().unwrap().contains("4bf92f3577b34da6a3ce929d0e0e4736"));
        });
    }

    #[test]
    fn a_traceparent_string_links_a_span_across_a_store_write() {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt as _;
        assert_eq!(traceparent(&tracing::Span::none()), None);
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("t")));
        tracing::subscriber::with_default(subscriber, || {
            let parent = tracing::info_span!("apply");
            let tp = traceparent(&parent).expect("an exported span has a traceparent");
            let child = tracing::info_span!(parent: None, "controller");
            set_parent_traceparent(&child, &tp);
            let out = traceparent(&child).unwrap();
            assert_eq!(out.split('-').nth(1), tp.split('-').nth(1), "same trace: {out} vs {tp}");
            assert_ne!(out.split('-').nth(2), tp.split('-').nth(2), "its own span: {out}");

            let stray = tracing::info_span!(parent: None, "stray");
            set_parent_traceparent(&stray, "garbage");
            assert_ne!(traceparent(&stray).unwrap().split('-').nth(1), tp.split('-').nth(1));
        });
    }
}
