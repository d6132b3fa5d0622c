//! W3C trace context through the gateway and its spans over OTLP: with an exporter, the
//! request's spans reach an in-process OTLP/gRPC collector as one tree under the client's
//! `traceparent`, and the engine gets a `traceparent` in the same trace whose parent is
//! the gateway's upstream span; without one, the client's `traceparent` and `tracestate`
//! reach the engine unchanged.
//!
//! The exporting test installs the process's global subscriber (this binary's only one);
//! the other runs on a current-thread runtime under a scoped plain log subscriber, so its
//! gateway builds no OpenTelemetry spans whatever the order the tests run in.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;
use flotilla_testkit::otlp::{attr, hex, string, Collector, Span, SpanKind, Value};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACESTATE: &str = "congo=t61rcWkgMzE";

/// SSE answer of the fake engine: two content chunks, then usage (5 in, 2 out).
const SSE: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" there\"}}]}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n\
data: [DONE]\n\n";

/// A fake engine answering chat completions (5 tokens in, 2 out; SSE when asked to
/// stream) and recording each request's trace-context headers.
async fn engine() -> (SocketAddr, Arc<Mutex<Vec<(Option<String>, Option<String>)>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(move |h: HeaderMap, body: axum::body::Bytes| {
                let s = s.clone();
                async move {
                    use axum::response::IntoResponse;
                    let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
                    s.lock().unwrap().push((get("traceparent"), get("tracestate")));
                    let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    if req["stream"] == true {
                        return ([(axum::http::header::CONTENT_TYPE, "text/event-stream")], SSE).into_response();
                    }
                    axum::Json(serde_json::json!({
                        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": common::MODEL,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi there"}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
                    }))
                    .into_response()
                }
            }),
        )
        .fallback(|| async { "" });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, seen)
}

fn gw_args(engine: SocketAddr) -> flotilla_gateway::GatewayArgs {
    flotilla_gateway::GatewayArgs {
        listen: "127.0.0.1:0".into(),
        backends: vec![format!("{}=http://{engine}", common::MODEL)],
        no_auth: true,
        ..flotilla_gateway::GatewayArgs::default()
    }
}

async fn chat(gw: SocketAddr) -> common::Resp {
    let body = serde_json::json!({"model": common::MODEL, "messages": [{"role": "user", "content": "hello"}]});
    common::post(gw, "/v1/chat/completions", body, &[("traceparent", TRACEPARENT), ("tracestate", TRACESTATE)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_spans_form_one_tree_under_the_clients_traceparent() {
    let otlp = Collector::start().await;
    let guard = flotilla_telemetry::init("flotilla-gateway", Some(&otlp.endpoint()), "warn").unwrap();
    assert!(guard.exporting());
    let (engine, seen) = engine().await;
    let gw = common::gateway(gw_args(engine)).await;

    let r = chat(gw.local_addr()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["message"]["content"], "hi there");

    // the spans of the request, once all six have been exported
    let names = [
        "gateway.request",
        "gateway.admission",
        "gateway.queue",
        "gateway.route",
        "gateway.upstream",
        "gateway.stream",
    ];
    let guard = Arc::new(guard);
    let mut spans: HashMap<String, Span> = HashMap::new();
    for _ in 0..100 {
        let g = guard.clone();
        tokio::task::spawn_blocking(move || g.flush()).await.unwrap();
        spans = otlp
            .spans()
            .into_iter()
            .filter(|r| hex(&r.span.trace_id) == TRACE_ID)
            .map(|r| {
                assert_eq!(r.service, "flotilla-gateway", "service.name of {}", r.span.name);
                (r.span.name.clone(), r.span)
            })
            .collect();
        if names.iter().all(|n| spans.contains_key(*n)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let missing: Vec<_> = names.iter().filter(|n| !spans.contains_key(**n)).collect();
    assert!(missing.is_empty(), "spans not exported: {missing:?}; got {:?}", spans.keys().collect::<Vec<_>>());

    // the request span is the child of the client's span, in the client's trace
    let req = &spans["gateway.request"];
    assert_eq!(hex(&req.parent_span_id), PARENT_ID);
    assert_eq!(req.kind, SpanKind::Server as i32);
    assert_eq!(attr(req, "model"), Some(Value::StringValue(common::MODEL.into())));
    assert_eq!(attr(req, "tenant"), Some(Value::StringValue("anonymous".into())));
    assert_eq!(attr(req, "http.response.status_code"), Some(Value::IntValue(200)));
    for n in &names[1..] {
        let s = &spans[*n];
        assert_eq!(hex(&s.parent_span_id), hex(&req.span_id), "{n} is a child of gateway.request");
        assert!(
            s.start_time_unix_nano >= req.start_time_unix_nano && s.end_time_unix_nano <= req.end_time_unix_nano,
            "{n} within the request"
        );
    }

    let route = &spans["gateway.route"];
    let strategy = attr(route, "strategy").and_then(|v| string(&v)).unwrap_or_default();
    // the default, auto, resolved: least-request (the engine publishes no KV events)
    assert_eq!(strategy, format!("{:?}", flotilla_api::spec::RoutingStrategy::LeastRequest), "{route:?}");
    assert_eq!(attr(route, "candidates"), Some(Value::IntValue(1)));
    let endpoint = attr(route, "endpoint").and_then(|v| string(&v)).expect("route endpoint");
    assert!(endpoint.contains(&engine.port().to_string()), "{endpoint}");

    let up = &spans["gateway.upstream"];
    assert_eq!(up.kind, SpanKind::Client as i32);
    // the first request to the engine opened a connection, inside the attempt
    let connect = otlp
        .spans()
        .into_iter()
        .find(|r| r.span.name == "gateway.connect" && r.span.parent_span_id == up.span_id)
        .expect("a gateway.connect span under gateway.upstream");
    let address = attr(&connect.span, "server.address").and_then(|v| string(&v)).unwrap_or_default();
    assert_eq!(address, engine.to_string());
    assert_eq!(attr(up, "http.response.status_code"), Some(Value::IntValue(200)));
    assert_eq!(attr(up, "attempt"), Some(Value::IntValue(1)));

    let stream = &spans["gateway.stream"];
    assert_eq!(attr(stream, "tokens_in"), Some(Value::IntValue(5)));
    assert_eq!(attr(stream, "tokens_out"), Some(Value::IntValue(2)));
    assert_eq!(attr(stream, "outcome"), Some(Value::StringValue("200".into())));
    assert!(stream.events.iter().any(|e| e.name == "first byte"), "{:?}", stream.events);

    // the engine's parent is the gateway's upstream span, in the client's trace
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let tp = seen[0].0.clone().expect("the engine got a traceparent");
    assert_eq!(tp, format!("00-{TRACE_ID}-{}-01", hex(&up.span_id)));
    assert_eq!(seen[0].1.as_deref(), Some(TRACESTATE), "tracestate carried on");

    // a stream: its span has the time to first token and the usage read from the stream
    let streamed_trace = "0af7651916cd43dd8448eb211c80319c";
    let body =
        serde_json::json!({"model": common::MODEL, "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let tp = format!("00-{streamed_trace}-b7ad6b7169203331-01");
    let r = common::post(gw.local_addr(), "/v1/chat/completions", body, &[("traceparent", &tp)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains(" there") && !r.text().contains("prompt_tokens"), "usage chunk stripped: {}", r.text());
    let mut stream = None;
    for _ in 0..100 {
        let g = guard.clone();
        tokio::task::spawn_blocking(move || g.flush()).await.unwrap();
        stream = otlp
            .spans()
            .into_iter()
            .find(|r| r.span.name == "gateway.stream" && hex(&r.span.trace_id) == streamed_trace);
        if stream.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stream = stream.expect("the stream's span").span;
    assert_eq!(attr(&stream, "sse"), Some(Value::BoolValue(true)));
    assert_eq!(attr(&stream, "tokens_in"), Some(Value::IntValue(5)));
    assert_eq!(attr(&stream, "tokens_out"), Some(Value::IntValue(2)));
    assert!(matches!(attr(&stream, "ttft_ms"), Some(Value::DoubleValue(ms)) if ms >= 0.0), "{stream:?}");
    assert!(stream.events.iter().any(|e| e.name == "first byte"), "{:?}", stream.events);
    gw.shutdown().await;
}

#[tokio::test]
async fn without_an_exporter_the_clients_trace_context_reaches_the_engine_unchanged() {
    // the roles' subscriber without --otlp-endpoint, on this (only) runtime thread
    let plain = tracing_subscriber::fmt().with_env_filter("info").with_test_writer().finish();
    let _scoped = tracing::subscriber::set_default(plain);
    let (engine, seen) = engine().await;
    let gw = common::gateway(gw_args(engine)).await;
    let r = chat(gw.local_addr()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let plain = common::post(
        gw.local_addr(),
        "/v1/chat/completions",
        serde_json::json!({"model": common::MODEL, "messages": [{"role": "user", "content": "hi"}]}),
        &[],
    )
    .await;
    assert_eq!(plain.status, 200);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![(Some(TRACEPARENT.to_string()), Some(TRACESTATE.to_string())), (None, None)],
        "passed through unchanged; nothing invented for a request without one"
    );
    gw.shutdown().await;
}
