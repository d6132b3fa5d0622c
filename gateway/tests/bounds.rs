//! The gateway's bounds: a tenant's concurrent requests (429 naming the limit, held until
//! the response body ends), the longest stream (`--max-stream-duration`: an SSE error
//! event, the stream closed, the engine's request cancelled), metric label values bounded
//! to known names, and `/metrics` moved to `--metrics-listen`.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::fake_cp::FakeCp;
use common::*;
use http_body_util::{BodyExt, Full};

/// A streamed completion that lasts long (speedup 1, many tokens); the response head only.
async fn open_stream(addr: std::net::SocketAddr, key: Option<&str>) -> http::Response<hyper::body::Incoming> {
    let body =
        serde_json::json!({"model": MODEL, "prompt": "go on", "max_tokens": 4000, "ignore_eos": true, "stream": true});
    let mut b = http::Request::post(format!("http://{addr}/v1/completions")).header("content-type", "application/json");
    if let Some(k) = key {
        b = b.header("authorization", k);
    }
    let req = b.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    tokio::time::timeout(Duration::from_secs(30), client().request(req)).await.expect("head in time").unwrap()
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what}: not within 5 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_at_its_concurrency_limit_gets_429_until_a_request_ends() {
    let sims = sims(1, 1.0).await;
    let cp = FakeCp::new(None);
    let key = |k: &str| flotilla_api::spec::hash_api_key(k);
    cp.put("Tenant", "tight", serde_json::json!({"max_concurrent_requests": 2, "api_keys": [key("key-tight-1")]}));
    cp.put("Tenant", "roomy", serde_json::json!({"api_keys": [key("key-roomy-1")]}));
    cp.put("Tenant", "models", serde_json::json!({"models": [MODEL], "api_keys": [key("key-models-1")]}));
    let (cp_addr, _stop) = cp.clone().serve().await;
    let mut args = gw_args(&sims);
    args.no_auth = false;
    args.server = vec![cp_addr.to_string()];
    args.tenant_max_concurrency = 1; // the default, for tenants without their own
    let gw = gateway(args).await;
    let addr = gw.local_addr();
    let st = gw.state().clone();
    wait_for("tenants", || st.dir.tenants().by_key.len() == 3).await;

    let tight = Some("Bearer key-tight-1");
    let a = open_stream(addr, tight).await;
    let b = open_stream(addr, tight).await;
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    assert_eq!(st.in_flight.count("tight"), 2);
    let r = complete(addr, "x", 1, &[("authorization", "Bearer key-tight-1")]).await;
    assert_eq!((r.status, r.error_code().as_str()), (429, "concurrency_limit_exceeded"), "{}", r.text());
    assert!(r.text().contains("limit of 2 concurrent requests"), "{}", r.text());
    assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");

    // the default bounds the others; each tenant on its own
    let roomy = open_stream(addr, Some("Bearer key-roomy-1")).await;
    assert_eq!(roomy.status(), 200);
    let r = complete(addr, "x", 1, &[("authorization", "Bearer key-roomy-1")]).await;
    assert_eq!((r.status, r.error_code().as_str()), (429, "concurrency_limit_exceeded"), "{}", r.text());
    assert!(r.text().contains("limit of 1 concurrent"), "{}", r.text());
    let r = complete(addr, "x", 1, &[("authorization", "Bearer key-models-1")]).await;
    assert_eq!(r.status, 200, "{}", r.text());

    for t in ["tenant=\"tight\"", "tenant=\"roomy\""] {
        let rejected =
            metric_sum(addr, "flotilla_gateway_tenant_rejections_total", &[t, "reason=\"concurrency\""]).await;
        assert_eq!(rejected, 1.0, "{t}");
    }
    let gauge = metric_sum(addr, "flotilla_gateway_tenant_in_flight_requests", &["tenant=\"tight\""]).await;
    assert_eq!(gauge, 2.0);

    // a stream whose client leaves frees its place
    drop(a);
    wait_for("the dropped stream's place", || st.in_flight.count("tight") == 1).await;
    let r = complete(addr, "x", 1, &[("authorization", "Bearer key-tight-1")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    drop((b, roomy));
    wait_for("every place", || st.in_flight.count("tight") + st.in_flight.count("roomy") == 0).await;
    let r = complete(addr, "x", 1, &[("authorization", "Bearer key-roomy-1")]).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // made-up model names are not label values (403 for a tenant with `models`, 404 otherwise)
    for i in 0..5 {
        let name = format!("made-up-{i}");
        let body = serde_json::json!({"model": name, "prompt": "x", "max_tokens": 1});
        let r = post(addr, "/v1/completions", body.clone(), &[("authorization", "Bearer key-models-1")]).await;
        assert_eq!(r.status, 403, "{}", r.text());
        let r = post(addr, "/v1/completions", body, &[("authorization", "Bearer key-roomy-1")]).await;
        assert_eq!(r.status, 404, "{}", r.text());
    }
    let text = get(addr, "/metrics").await.text();
    assert!(!text.contains("made-up"), "a client's names became label values");
    assert_eq!(metric_sum(addr, "flotilla_gateway_errors_total", &["model=\"unknown\""]).await, 10.0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_past_its_duration_gets_an_error_event_and_the_engine_request_ends() {
    let sims = sims(1, 1.0).await;
    let mut args = gw_args(&sims);
    args.max_stream_duration = "400ms".into();
    let gw = gateway(args).await;
    let addr = gw.local_addr();

    let start = tokio::time::Instant::now();
    let resp = open_stream(addr, None).await;
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(30), resp.into_body().collect())
        .await
        .expect("the stream ends")
        .expect("a clean end, not a reset")
        .to_bytes();
    let elapsed = start.elapsed();
    assert!(elapsed < Duration::from_secs(20), "4000 tokens at speedup 1 take far longer: {elapsed:?}");
    let text = String::from_utf8(body.to_vec()).unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.trim().is_empty()).collect();
    assert!(events.len() >= 2, "some tokens, then the error: {text}");
    let last: serde_json::Value = serde_json::from_str(events.last().unwrap().strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "stream_duration_exceeded", "{last}");
    assert!(last["error"]["message"].as_str().unwrap().contains("--max-stream-duration"), "{last}");
    assert!(!text.contains("[DONE]"), "the stream did not complete");
    assert!(events[..events.len() - 1].iter().all(|e| e.starts_with("data: {")), "{text}");

    // the engine's request was cancelled
    let sim = sims[0].local_addr();
    let mut running = f64::NAN;
    for _ in 0..200 {
        running = metric_sum(sim, "vllm:num_requests_running", &[]).await;
        if running == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(running, 0.0, "the engine still runs the request");
    let cut = metric_sum(addr, "flotilla_gateway_stream_duration_exceeded_total", &["model=\"demo\""]).await;
    assert_eq!(cut, 1.0);
    let err = "code=\"stream_duration_exceeded\"";
    assert_eq!(metric_sum(addr, "flotilla_gateway_errors_total", &[err]).await, 1.0);
    assert_eq!(metric_sum(addr, "flotilla_gateway_requests_total", &["code=\"408\""]).await, 1.0);
    assert_eq!(metric_sum(addr, "flotilla_gateway_in_flight_requests", &[]).await, 0.0, "the lease is released");

    // short streams and JSON answers are untouched
    let body = serde_json::json!({"model": MODEL, "prompt": "x", "max_tokens": 2, "stream": true});
    let r = post(addr, "/v1/completions", body, &[]).await;
    assert!(r.status == 200 && r.text().contains("[DONE]"), "{}", r.text());
    assert_eq!(complete(addr, "x", 2, &[]).await.status, 200);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_to_their_own_listener_when_asked() {
    let sims = sims(1, 50.0).await;
    // default: on the main listener
    let gw = gateway(gw_args(&sims)).await;
    assert_eq!(gw.metrics_addr(), None);
    let r = get(gw.local_addr(), "/metrics").await;
    assert!(r.status == 200 && r.text().contains("flotilla_gateway_"), "{}", r.status);
    gw.shutdown().await;

    let mut args = gw_args(&sims);
    args.metrics_listen = Some("127.0.0.1:0".into());
    let gw = gateway(args).await;
    let (addr, metrics) = (gw.local_addr(), gw.metrics_addr().expect("a metrics listener"));
    assert_ne!(addr, metrics);
    assert_eq!(complete(addr, "x", 2, &[]).await.status, 200);
    let r = get(addr, "/metrics").await;
    assert_eq!((r.status, r.error_code().as_str()), (404, "not_found"), "not on the public listener");
    let r = get(metrics, "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("flotilla_gateway_requests_total"), "{}", r.text());
    assert_eq!(metric_sum(metrics, "flotilla_gateway_requests_total", &["code=\"200\""]).await, 1.0);
    // Prometheus text 0.0.4, as the content type says: what promtool (and Prometheus) read.
    let (code, lint) = flotilla_testkit::promtool::check_metrics(&r.text());
    assert_eq!(code, 0, "promtool check metrics on the gateway's scrape:\n{lint}");
    for path in ["/v1/models", "/healthz"] {
        assert_eq!(get(metrics, path).await.status, 404, "{path}: only /metrics there");
    }
    assert_eq!(get(addr, "/healthz").await.status, 200);
    gw.shutdown().await;
}
