//! P/D through the gateway, against fake engines that speak vLLM's side of the protocol
//! (what each receives is recorded; each can be told to fail): a disaggregated Model's
//! long prompts are prefilled on its prefill member and decoded on its decode member with
//! the prefill's transfer parameters; short prompts skip the prefill pool; a failed prefill
//! is tried on another and then falls back to decode-only; a decode failing before its first
//! byte is retried on another decode engine with a fresh prefill. The client sees none of
//! the failures. (The sims' own P/D model is tested in the sim crate and end to end.)

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use common::fake_cp::FakeCp;
use common::{cluster_gw_args, gateway, get, metric_sum, post as post_json};
use serde_json::{json, Value};

const MODEL: &str = "llama";

/// A fake engine: records every body it is sent; fails with 500 while `failing`.
#[derive(Clone)]
struct Fake {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Value>>>,
    failing: Arc<AtomicBool>,
    /// Milliseconds each answer is held back.
    slow_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl Fake {
    fn bodies(&self) -> Vec<Value> {
        self.seen.lock().unwrap().clone()
    }
    fn slow(&self, ms: u64) {
        self.slow_ms.store(ms, Ordering::SeqCst);
    }
    fn fail(&self, on: bool) {
        self.failing.store(on, Ordering::SeqCst);
    }
}

/// The answer of a fake engine of `name` to `req`: a prefill (kv_transfer_params asking for
/// a remote decode) answers with its transfer parameters; anything else is decoded, the text
/// naming the engine and the prefill engine it pulled from.
fn answer(name: &str, req: &Value, chat: bool) -> axum::response::Response {
    if req["kv_transfer_params"]["do_remote_decode"] == true {
        return axum::Json(json!({
            "id": "cmpl-p", "object": "text_completion", "model": MODEL,
            "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 500, "completion_tokens": 1, "total_tokens": 501},
            "kv_transfer_params": {
                "do_remote_prefill": true, "do_remote_decode": false, "remote_block_ids": [1, 2, 3],
                "remote_engine_id": name, "remote_request_id": "req-1", "remote_host": "127.0.0.1",
                "remote_port": 5600, "tp_size": 1
            }
        }))
        .into_response();
    }
    let from = req["kv_transfer_params"]["remote_engine_id"].as_str().unwrap_or("none").to_owned();
    let text = format!("{name} from {from}");
    if req["stream"] == true {
        let delta = if chat { json!({"delta": {"content": text}}) } else { json!({"text": text}) };
        let sse = format!("data: {}\n\ndata: [DONE]\n\n", json!({"choices": [delta]}));
        return ([(axum::http::header::CONTENT_TYPE, "text/event-stream")], sse).into_response();
    }
    let choice = if chat { json!({"message": {"role": "assistant", "content": text}}) } else { json!({"text": text}) };
    axum::Json(json!({"id": "d", "model": MODEL, "choices": [choice]})).into_response()
}

async fn fake(name: &'static str) -> Fake {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let failing = Arc::new(AtomicBool::new(false));
    let slow_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let route = |chat: bool| {
        let (seen, failing, slow_ms) = (seen.clone(), failing.clone(), slow_ms.clone());
        post(move |body: axum::body::Bytes| {
            let (seen, failing, slow_ms) = (seen.clone(), failing.clone(), slow_ms.clone());
            async move {
                let req: Value = serde_json::from_slice(&body).unwrap_or_default();
                seen.lock().unwrap().push(req.clone());
                tokio::time::sleep(Duration::from_millis(slow_ms.load(Ordering::SeqCst))).await;
                if failing.load(Ordering::SeqCst) {
                    return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "engine down").into_response();
                }
                answer(name, &req, chat)
            }
        })
    };
    let app = Router::new()
        .route("/v1/completions", route(false))
        .route("/v1/chat/completions", route(true))
        .fallback(|| async { "" });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Fake { addr, seen, failing, slow_ms }
}

struct Pd {
    prefill: Vec<Fake>,
    decode: Vec<Fake>,
    gw: flotilla_gateway::GatewayHandle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// A disaggregated `llama` with `p` prefill and `d` decode fake engines behind a gateway.
async fn pd(p: usize, d: usize) -> Pd {
    pd_with(p, d, json!({})).await
}

/// [`pd`] with this `decider`.
async fn pd_with(p: usize, d: usize, decider: Value) -> Pd {
    const P: [&str; 2] = ["P0", "P1"];
    const D: [&str; 2] = ["D0", "D1"];
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for name in &P[..p] {
        prefill.push(fake(name).await);
    }
    for name in &D[..d] {
        decode.push(fake(name).await);
    }
    let cp = FakeCp::new(None);
    let spec = json!({"source": "hf://x/y", "routing": "round-robin",
        "disaggregation": {"connector": "nixl", "prefill": {"replicas": p}, "decode": {"replicas": d}, "decider": decider}});
    cp.put("Model", MODEL, spec);
    cp.put("Model", "llama-prefill", json!({"source": "hf://x/y", "routing": "round-robin"}));
    cp.put("Model", "llama-decode", json!({"source": "hf://x/y", "routing": "round-robin"}));
    let eps: Vec<(&str, SocketAddr)> = prefill
        .iter()
        .map(|f| ("llama-prefill", f.addr))
        .chain(decode.iter().map(|f| ("llama-decode", f.addr)))
        .collect();
    cp.set_endpoints(&eps);
    let (cp_addr, stop) = cp.serve().await;
    let mut args = cluster_gw_args(cp_addr);
    args.max_retries = 1;
    let gw = gateway(args).await;
    until_serving(&gw).await;
    Pd { prefill, decode, gw, _stop: stop }
}

/// Waits until `gw` has its endpoint table and knows `llama` is disaggregated.
async fn until_serving(gw: &flotilla_gateway::GatewayHandle) {
    for _ in 0..200 {
        if get(gw.local_addr(), "/readyz").await.status == 200 && gw.state().pd_route(MODEL).is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the gateway never saw the disaggregated model and its endpoints");
}

fn long_prompt() -> String {
    "the quick brown fox jumps over the lazy dog ".repeat(60) // ~2,600 characters
}

async fn completion(addr: SocketAddr, prompt: &str, stream: bool) -> (u16, String) {
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 64, "stream": stream});
    let r = post_json(addr, "/v1/completions", body, &[]).await;
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

async fn pd_requests(addr: SocketAddr, split: &str) -> f64 {
    metric_sum(addr, "flotilla_gateway_pd_requests_total", &[&format!("split=\"{split}\"")]).await
}

#[tokio::test]
async fn a_long_prompt_is_prefilled_remotely_then_decoded_with_the_prefills_transfer_parameters() {
    let t = pd(1, 1).await;
    let addr = t.gw.local_addr();
    for stream in [false, true] {
        let (status, text) = completion(addr, &long_prompt(), stream).await;
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("D0 from P0"), "decoded with P0's blocks: {text}");
    }
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": long_prompt()}], "max_tokens": 64, "stream": true});
    let r = post_json(addr, "/v1/chat/completions", chat, &[]).await;
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).contains("D0 from P0"));

    let prefills = t.prefill[0].bodies();
    assert_eq!(prefills.len(), 3);
    for p in &prefills {
        assert_eq!(p["kv_transfer_params"]["do_remote_decode"], true, "{p}");
        assert_eq!(p["kv_transfer_params"]["do_remote_prefill"], false);
        assert_eq!((p["max_tokens"].clone(), p["stream"].clone()), (json!(1), json!(false)));
        assert!(p.get("stream_options").is_none());
        assert_eq!(p["model"], MODEL, "member engines serve the disaggregated name");
    }
    let decodes = t.decode[0].bodies();
    assert_eq!(decodes.len(), 3);
    for (d, stream) in decodes.iter().zip([false, true, true]) {
        assert_eq!(d["kv_transfer_params"]["remote_engine_id"], "P0", "{d}");
        assert_eq!(d["kv_transfer_params"]["remote_block_ids"], json!([1, 2, 3]));
        assert_eq!((d["max_tokens"].clone(), d["stream"].clone()), (json!(64), json!(stream)), "the client's own");
    }
    assert_eq!(pd_requests(addr, "remote").await, 3.0);
    assert_eq!(metric_sum(addr, "flotilla_gateway_pd_prefill_seconds_count", &[]).await, 3.0);
}

#[tokio::test]
async fn a_short_prompt_skips_the_prefill_pool() {
    let t = pd(1, 1).await;
    let addr = t.gw.local_addr();
    let (status, text) = completion(addr, "hi", false).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("D0 from none"), "{text}");
    assert!(t.prefill[0].bodies().is_empty());
    assert!(t.decode[0].bodies()[0].get("kv_transfer_params").is_none());
    assert_eq!(pd_requests(addr, "local-short").await, 1.0);
}

#[tokio::test]
async fn a_failed_prefill_is_tried_on_another_then_the_decode_engine_computes_the_prompt() {
    let t = pd(2, 1).await;
    let addr = t.gw.local_addr();
    t.prefill[0].fail(true);
    for _ in 0..2 {
        let (status, text) = completion(addr, &long_prompt(), false).await;
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("D0 from P1"), "the live prefill engine's blocks: {text}");
    }
    assert_eq!(pd_requests(addr, "remote").await, 2.0);
    t.prefill[1].fail(true);
    let (status, text) = completion(addr, &long_prompt(), true).await;
    assert_eq!(status, 200, "no prefill engine answers: decode-only, the client sees no error: {text}");
    assert!(text.contains("D0 from none"), "{text}");
    assert!(t.decode[0].bodies().last().unwrap().get("kv_transfer_params").is_none());
    assert_eq!(pd_requests(addr, "fallback").await, 1.0);
    // at least P1 in the last request and P0 once (an ejected P0 is then tried last or not at all)
    assert!(metric_sum(addr, "flotilla_gateway_pd_prefill_failures_total", &[]).await >= 2.0);
}

#[tokio::test]
async fn a_decode_failing_before_its_first_byte_is_retried_elsewhere_with_a_fresh_prefill() {
    let t = pd(1, 2).await;
    let addr = t.gw.local_addr();
    t.decode[0].fail(true);
    for _ in 0..4 {
        let (status, text) = completion(addr, &long_prompt(), true).await;
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("D1 from P0"), "{text}");
    }
    let tried_d0 = t.decode[0].bodies().len();
    assert!(tried_d0 >= 1, "round-robin sends some first attempts to the failing engine");
    // every decode attempt came with a prefill of its own: the blocks of a failed attempt
    // may have been pulled already
    assert_eq!(t.prefill[0].bodies().len(), 4 + tried_d0);
    assert_eq!(metric_sum(addr, "flotilla_gateway_pd_decode_retries_total", &[]).await, tried_d0 as f64);
    // both decode engines down: the client gets the engine's error, not a hang
    t.decode[1].fail(true);
    let (status, _) = completion(addr, &long_prompt(), false).await;
    assert!(status >= 500, "{status}");
}

/// A sim of `role` for the disaggregated `llama` (NIXL, pulled over a side channel on a
/// free port), at a speed where a 2,000-token prefill takes visible time.
async fn pd_sim(role: &str) -> flotilla_sim::SimHandle {
    pd_sim_with(role, "{}").await
}

/// The arguments of a sim of `role` (NIXL, with `extra` as its `kv_connector_extra_config`).
fn pd_sim_args(role: &str, extra: &str) -> flotilla_sim::SimArgs {
    flotilla_sim::SimArgs {
        port: 0,
        model: MODEL.into(),
        speedup: 5.0,
        max_model_len: 8192,
        kv_transfer_config: Some(format!(
            r#"{{"kv_connector":"NixlConnector","kv_role":"{role}","kv_connector_extra_config":{extra}}}"#
        )),
        kv_side_channel_port: 0,
        ..flotilla_sim::SimArgs::default()
    }
}

async fn pd_sim_with(role: &str, extra: &str) -> flotilla_sim::SimHandle {
    flotilla_sim::start(pd_sim_args(role, extra)).await.expect("sim starts")
}

#[tokio::test]
async fn through_real_sims_the_decode_engine_pulls_the_prompt_instead_of_computing_it() {
    let (p, d) = (pd_sim("kv_producer").await, pd_sim("kv_consumer").await);
    let cp = FakeCp::new(None);
    cp.put(
        "Model",
        MODEL,
        json!({"source": "hf://x/y", "engine": "sim",
            "disaggregation": {"connector": "nixl", "prefill": {"replicas": 1}, "decode": {"replicas": 1}}}),
    );
    cp.set_endpoints(&[("llama-prefill", p.local_addr()), ("llama-decode", d.local_addr())]);
    let (cp_addr, _stop) = cp.serve().await;
    let gw = gateway(cluster_gw_args(cp_addr)).await;
    let addr = gw.local_addr();
    until_serving(&gw).await;
    let prompt = common::text(1500, 7);
    for stream in [true, false] {
        let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 8, "stream": stream});
        let r = post_json(addr, "/v1/completions", body, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let chat =
        json!({"model": MODEL, "messages": [{"role": "user", "content": common::text(1500, 8)}], "max_tokens": 8});
    let r = post_json(addr, "/v1/chat/completions", chat, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // the decode sim pulled each prompt rather than computing it
    let pulled = metric_sum(d.local_addr(), "vllm:external_prefix_cache_hits_total", &[]).await;
    assert!(pulled > 3.0 * 1000.0, "decode engine pulled {pulled} tokens");
    assert_eq!(metric_sum(d.local_addr(), "vllm:nixl_num_failed_transfers_total", &[]).await, 0.0);
    assert_eq!(pd_requests(addr, "remote").await, 3.0);
    // the prefill sim computed the prompts and holds nothing once they were pulled
    assert!(metric_sum(p.local_addr(), "vllm:prompt_tokens_total", &[]).await > 3.0 * 1000.0);
    assert_eq!(metric_sum(p.local_addr(), "vllm:kv_cache_usage_perc", &[]).await, 0.0);
}

#[tokio::test]
async fn static_backends_are_served_disaggregated_with_the_pd_flag() {
    let (p, d) = (pd_sim("kv_producer").await, pd_sim("kv_consumer").await);
    let args = flotilla_gateway::GatewayArgs {
        listen: "127.0.0.1:0".into(),
        no_auth: true,
        backends: vec![
            format!("llama-prefill=http://{}", p.local_addr()),
            format!("llama-decode=http://{}", d.local_addr()),
        ],
        pd: vec![MODEL.into()],
        scrape_interval_ms: 100,
        ..flotilla_gateway::GatewayArgs::default()
    };
    let gw = gateway(args).await;
    let body = json!({"model": MODEL, "prompt": common::text(1500, 9), "max_tokens": 4, "stream": true});
    let r = post_json(gw.local_addr(), "/v1/completions", body, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(metric_sum(d.local_addr(), "vllm:external_prefix_cache_hits_total", &[]).await > 1000.0);
    assert_eq!(pd_requests(gw.local_addr(), "remote").await, 1.0);
}

/// A cluster gateway for the disaggregated `llama` (its decode pool at `decode` replicas,
/// its prefill pool at zero) with `endpoints`, reporting demand every 100 ms to a fake
/// autoscaler: the gateway, the control plane (to change endpoints), the autoscaler and
/// the fake server's stop handle.
async fn autoscaled(
    decode: u32,
    endpoints: &[(&str, std::net::SocketAddr)],
) -> (flotilla_gateway::GatewayHandle, FakeCp, common::fake_autoscale::FakeAutoscale, tokio::sync::oneshot::Sender<()>)
{
    let cp = FakeCp::new(None);
    let spec = json!({"source": "hf://x/y",
        "disaggregation": {"connector": "nixl", "prefill": {"replicas": 0}, "decode": {"replicas": decode}}});
    cp.put("Model", MODEL, spec);
    cp.put("Model", "llama-prefill", json!({"source": "hf://x/y"}));
    cp.put("Model", "llama-decode", json!({"source": "hf://x/y"}));
    cp.set_endpoints(endpoints);
    let scaler = common::fake_autoscale::FakeAutoscale::default();
    let (server, stop) = scaler.clone().serve(cp.clone()).await;
    let mut args = cluster_gw_args(server);
    args.demand_report_interval_ms = 100;
    (gateway(args).await, cp, scaler, stop)
}

#[tokio::test]
async fn each_pool_reports_its_own_demand_and_a_prefill_pool_at_zero_is_woken_by_its_fallbacks() {
    let d = fake("D0").await;
    // the prefill pool is at zero
    let (gw, cp_handle, scaler, _stop) = autoscaled(1, &[("llama-decode", d.addr)]).await;
    let addr = gw.local_addr();
    until_serving(&gw).await;
    for _ in 0..3 {
        let (status, text) = completion(addr, &long_prompt(), false).await;
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("D0 from none"), "decoded alone while the prefill pool sleeps: {text}");
    }
    let (status, _) = completion(addr, "hi", false).await;
    assert_eq!(status, 200);
    assert_eq!(pd_requests(addr, "fallback").await, 3.0);
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (p, dd) = (scaler.sum("llama-prefill", |m| m.arrivals), scaler.sum("llama-decode", |m| m.arrivals));
        if (p, dd) == (3, 4) {
            break;
        }
        assert!(tokio::time::Instant::now() < until, "arrivals reported: prefill {p} (want 3), decode {dd} (want 4)");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(scaler.sum(MODEL, |m| m.arrivals), 0, "the disaggregated name runs no replica of its own");

    // the pool woke: its legs complete, their time is its TTFT
    let p = fake("P0").await;
    cp_handle.set_endpoints(&[("llama-prefill", p.addr), ("llama-decode", d.addr)]);
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while !completion(addr, &long_prompt(), false).await.1.contains("D0 from P0") {
        assert!(tokio::time::Instant::now() < until, "the prefill endpoint never came into use");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while scaler.sum("llama-prefill", |m| m.ttft_samples) < 1 || scaler.sum("llama-prefill", |m| m.completed) < 1 {
        assert!(tokio::time::Instant::now() < until, "no prefill completion with a TTFT reported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_service_at_zero_wakes_both_pools_at_once() {
    let (gw, cp_handle, scaler, _stop) = autoscaled(0, &[]).await; // both pools at zero
    let addr = gw.local_addr();
    // no endpoint at all: /readyz stays 503, so wait for the model itself
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while gw.state().pd_route(MODEL).is_none() {
        assert!(tokio::time::Instant::now() < until, "the gateway never saw the disaggregated model");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let request = tokio::spawn(async move { completion(addr, &long_prompt(), false).await });
    // held for the decode member, and counted held for the prefill member in the same reports
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (p, d) = (scaler.sum("llama-prefill", |m| m.held), scaler.sum("llama-decode", |m| m.held));
        if p > 0 && d > 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < until, "held reported: prefill {p}, decode {d} (both should wake)");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(scaler.sum(MODEL, |m| m.held), 0, "the disaggregated name runs no replica of its own");
    // both pools come up: the held request goes prefill -> decode
    let (p, d) = (fake("P0").await, fake("D0").await);
    cp_handle.set_endpoints(&[("llama-prefill", p.addr), ("llama-decode", d.addr)]);
    let (status, text) = tokio::time::timeout(Duration::from_secs(10), request).await.unwrap().unwrap();
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("D0 from P0"), "the woken service disaggregates its first request: {text}");
}

#[tokio::test]
async fn a_prompt_the_decode_engine_already_holds_is_not_prefilled_again() {
    const EVENTS: &str = r#"{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:0",
        "replay_endpoint": "tcp://*:0", "topic": "kv"}"#;
    let p = pd_sim("kv_producer").await;
    let d = flotilla_sim::SimArgs { kv_events_config: Some(EVENTS.into()), ..pd_sim_args("kv_consumer", "{}") };
    let d = flotilla_sim::start(d).await.expect("decode sim");
    let args = flotilla_gateway::GatewayArgs {
        listen: "127.0.0.1:0".into(),
        no_auth: true,
        backends: vec![
            format!("llama-prefill=http://{}", p.local_addr()),
            format!("llama-decode=http://{}", d.local_addr()),
        ],
        pd: vec![MODEL.into()],
        // the decode pool routed kv-aware with the sim's tokenizer: its cache is known
        routing: vec!["llama-decode=kv-aware".into()],
        tokenizer: vec!["llama-decode=sim".into()],
        scrape_interval_ms: 100,
        ..flotilla_gateway::GatewayArgs::default()
    };
    let gw = gateway(args).await;
    let addr = gw.local_addr();
    // a multi-turn chat: the second turn repeats the first's prompt and adds a little
    let first = common::text(1500, 11);
    let body = |prompt: &str| json!({"model": MODEL, "prompt": prompt, "max_tokens": 4});
    let r = post_json(addr, "/v1/completions", body(&first), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let m = get(addr, "/metrics").await.text();
    let pd: Vec<&str> = m.lines().filter(|l| l.contains("pd_")).collect();
    assert_eq!(pd_requests(addr, "remote").await, 1.0, "{pd:#?}");
    let second = format!("{first} and then some more");
    let r = post_json(addr, "/v1/completions", body(&second), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(pd_requests(addr, "local-cached").await, 1.0, "the decode engine holds the first turn");
    assert_eq!(metric_sum(p.local_addr(), "vllm:request_success_total", &[]).await, 1.0, "one prefill only");
}

#[tokio::test]
async fn through_real_sims_a_dead_prefill_a_dead_decode_and_an_expired_lease_stay_invisible() {
    // P0 lets its blocks go almost at once (the decode engine's pull finds them expired)
    let p_expiring = pd_sim_with("kv_producer", r#"{"kv_lease_duration":0.0001}"#).await;
    let p_dead = pd_sim("kv_producer").await;
    let p_good = pd_sim("kv_producer").await;
    let d_dead = pd_sim("kv_consumer").await;
    let d_good = pd_sim("kv_consumer").await;
    let prefill = [&p_expiring, &p_dead, &p_good].map(|s| format!("llama-prefill=http://{}", s.local_addr()));
    let decode = [&d_dead, &d_good].map(|s| format!("llama-decode=http://{}", s.local_addr()));
    let args = flotilla_gateway::GatewayArgs {
        listen: "127.0.0.1:0".into(),
        no_auth: true,
        backends: prefill.into_iter().chain(decode).collect(),
        pd: vec![MODEL.into()],
        routing: vec!["llama-prefill=round-robin".into(), "llama-decode=round-robin".into()],
        max_retries: 3,
        scrape_interval_ms: 100,
        ..flotilla_gateway::GatewayArgs::default()
    };
    let gw = gateway(args).await;
    let addr = gw.local_addr();
    let (dead_p, dead_d) = (p_dead.local_addr(), d_dead.local_addr());
    p_dead.shutdown().await.expect("stops");
    d_dead.shutdown().await.expect("stops");
    for i in 0..8 {
        let body = json!({"model": MODEL, "prompt": common::text(1200, 20 + i), "max_tokens": 4, "stream": i % 2 == 0});
        let r = post_json(addr, "/v1/completions", body, &[]).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    // every path was taken: P0's expired blocks, dead engines on both sides
    assert!(
        metric_sum(d_good.local_addr(), "vllm:nixl_num_failed_transfers_total", &[]).await >= 1.0,
        "an expired pull"
    );
    assert!(metric_sum(addr, "flotilla_gateway_pd_decode_retries_total", &[]).await >= 1.0);
    assert!(metric_sum(addr, "flotilla_gateway_pd_prefill_failures_total", &[]).await >= 1.0);
    assert!(pd_requests(addr, "remote").await >= 6.0, "most requests still prefilled remotely");
    let _ = (dead_p, dead_d);
}

#[tokio::test]
async fn past_the_prefill_pools_queue_bound_the_decode_engine_prefills_itself() {
    let t = pd_with(1, 1, json!({"max_prefill_queue": 1})).await;
    let addr = t.gw.local_addr();
    t.prefill[0].slow(600);
    let first = tokio::spawn(async move { completion(addr, &long_prompt(), false).await });
    // the first request's prefill is in flight on the only prefill engine
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while t.prefill[0].bodies().is_empty() {
        assert!(tokio::time::Instant::now() < until, "the first prefill never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, text) = completion(addr, &long_prompt(), false).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("D0 from none"), "the busy pool was skipped: {text}");
    let (status, text) = first.await.unwrap();
    assert_eq!(status, 200);
    assert!(text.contains("D0 from P0"), "{text}");
    assert_eq!(pd_requests(addr, "local-busy").await, 1.0);
    assert_eq!(pd_requests(addr, "remote").await, 1.0);
    assert_eq!(t.prefill[0].bodies().len(), 1);
}
