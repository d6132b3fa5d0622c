//! On-demand LoRA adapters against a fake leader whose `EnsureLoaded` really loads the
//! adapter on a sim engine: a cold request waits for the load and succeeds, concurrent cold
//! requests make one call, saturated holders make the leader load it elsewhere, an engine
//! that evicted the adapter (404) costs a reload and a retry but never a failed request,
//! a Failed adapter is a 503 with the leader's message, a follower's hint is followed,
//! and usage reports reach the leader.

mod common;

use std::time::Duration;

use common::fake_cp::FakeCp;
use common::fake_leader::{Engine, FakeAdapters};
use common::*;
use flotilla_gateway::GatewayHandle;
use flotilla_sim::SimHandle;
use tokio::sync::oneshot;

struct Fleet {
    sims: Vec<SimHandle>,
    leader: FakeAdapters,
    cp: FakeCp,
    gw: GatewayHandle,
    _stops: Vec<oneshot::Sender<()>>,
}

impl Fleet {
    fn addr(&self, i: usize) -> String {
        self.sims[i].local_addr().to_string()
    }
    /// Publishes the endpoint snapshot the fake leader believes in.
    fn publish(&self) {
        self.cp.endpoints.send_replace(self.leader.snapshot());
    }
}

/// `n` sims of `demo`, adapters `names` declared (on-demand) on a fake leader; with
/// `via_follower` the gateway is given only a follower that answers not_leader.
async fn fleet(
    n: usize,
    speedup: f64,
    names: &[&str],
    via_follower: bool,
    args: impl FnOnce(&mut flotilla_gateway::GatewayArgs),
) -> Fleet {
    let sims = sims(n, speedup).await;
    let engines = sims
        .iter()
        .enumerate()
        .map(|(i, s)| Engine { replica: format!("r{i}"), model: MODEL.into(), addr: s.local_addr() })
        .collect();
    let leader = FakeAdapters::new(engines);
    let cp = FakeCp::new(None);
    cp.put("Model", MODEL, serde_json::json!({"source": "hf://x/y"}));
    for a in names {
        leader.state.lock().unwrap().known.insert(a.to_string(), MODEL.into());
        cp.put_with_status(
            "Adapter",
            a,
            serde_json::json!({"base_model": MODEL, "source": format!("sim://{a}"), "replicas": "on-demand"}),
            serde_json::json!({"phase": "Pending", "desired_replicas": 0, "loaded_replicas": 0}),
        );
    }
    cp.endpoints.send_replace(leader.snapshot());
    let (leader_addr, stop) = leader.clone().serve(cp.clone()).await;
    let mut stops = vec![stop];
    let server = if via_follower {
        let follower_cp = FakeCp::new(Some(leader_addr.to_string()));
        follower_cp.put("Model", MODEL, serde_json::json!({"source": "hf://x/y"}));
        for a in names {
            follower_cp.put("Adapter", a, serde_json::json!({"base_model": MODEL, "source": format!("sim://{a}")}));
        }
        let (addr, stop) = FakeAdapters::follower(leader_addr).serve(follower_cp).await;
        stops.push(stop);
        addr
    } else {
        leader_addr
    };
    let mut a = cluster_gw_args(server);
    args(&mut a);
    let gw = gateway(a).await;
    let mut ready = false;
    for _ in 0..200 {
        let st = gw.state();
        if st.dir.synced() && !st.dir.endpoints().is_empty() && names.iter().all(|n| st.dir.adapter(n).is_some()) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ready, "no endpoint table or adapters from the control plane");
    Fleet { sims, leader, cp, gw, _stops: stops }
}

async fn ask(addr: std::net::SocketAddr, model: &str, max_tokens: u32) -> Resp {
    post(
        addr,
        "/v1/completions",
        serde_json::json!({"model": model, "prompt": "hello there", "max_tokens": max_tokens, "ignore_eos": true}),
        &[],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_requests_share_one_load_and_succeed() {
    let f = fleet(2, 50.0, &["cold", "idle"], false, |_| {}).await;
    f.leader.state.lock().unwrap().delay = Duration::from_millis(400);
    let addr = f.gw.local_addr();
    let tasks: Vec<_> = (0..8).map(|_| tokio::spawn(async move { ask(addr, "cold", 4).await })).collect();
    let mut at = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        at.push(r.endpoint());
    }
    assert_eq!(f.leader.calls_for("cold"), 1, "one EnsureLoaded for the whole burst");
    assert!(at.iter().all(|e| *e == at[0]), "all went to the one engine that loaded it: {at:?}");
    assert_eq!(metric_sum(addr, "flotilla_gateway_adapter_cold_loads_total", &["adapter=\"cold\""]).await, 1.0);
    assert_eq!(metric_sum(addr, "flotilla_gateway_adapter_cold_load_seconds_count", &[]).await, 8.0);
    let waited = metric_sum(addr, "flotilla_gateway_adapter_cold_load_seconds_sum", &[]).await;
    assert!(waited >= 8.0 * 0.3, "each request waited for the load: {waited}");

    // warm now: no further call
    assert_eq!(ask(addr, "cold", 2).await.status, 200);
    assert_eq!(f.leader.calls_for("cold"), 1);

    // /v1/models: loaded and declared adapters, with their base model as parent
    let models = get(addr, "/v1/models").await.json();
    let data = models["data"].as_array().unwrap();
    let card =
        |id: &str| data.iter().find(|m| m["id"] == id).cloned().unwrap_or_else(|| panic!("{id} missing: {models}"));
    assert_eq!(card(MODEL)["parent"], serde_json::Value::Null);
    for a in ["cold", "idle"] {
        let c = card(a);
        assert_eq!((c["parent"].as_str(), c["object"].as_str()), (Some(MODEL), Some("model")), "{c}");
    }

    // usage reports reach the leader: 9 requests on the engine that holds it (a request that
    // finds the adapter loaded counts on arrival too, so it stays recent while queued)
    let key = ("cold".to_string(), at[0].clone());
    let mut reported = 0;
    for _ in 0..60 {
        reported = f.leader.usage().get(&key).copied().unwrap_or(0);
        if reported >= 9 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!((9..=18).contains(&reported), "usage reported: {:?}", f.leader.usage());
    f.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_evicted_under_the_gateway_is_reloaded_and_the_request_retried() {
    let f = fleet(1, 50.0, &["hot"], false, |_| {}).await;
    let addr = f.gw.local_addr();
    assert_eq!(ask(addr, "hot", 2).await.status, 200);
    f.publish(); // the snapshot now shows it loaded too
    tokio::time::sleep(Duration::from_millis(100)).await;
    // the engine drops it (an eviction the gateway has not seen yet)
    let r = post(f.sims[0].local_addr(), "/v1/unload_lora_adapter", serde_json::json!({"lora_name": "hot"}), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    f.leader.state.lock().unwrap().loaded.clear();
    assert_eq!(ask(f.sims[0].local_addr(), "hot", 2).await.status, 404, "the engine no longer has it");
    for i in 0..3 {
        let r = ask(addr, "hot", 2).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.endpoint(), f.addr(0));
    }
    assert_eq!(f.leader.calls_for("hot"), 2, "one cold load, one reload after the 404");
    let errors = metric_sum(addr, "flotilla_gateway_errors_total", &["model=\"hot\""]).await;
    assert_eq!(errors, 0.0, "no request failed");
    f.gw.shutdown().await;
}

/// The leader still has the evicting engine's older report: its answer names that engine as
/// the holder and loads nothing, so the retry meets the same 404 (bench/lora at 4× overload:
/// 4 of 606 requests got the engine's 404). The adapter is then loaded on another replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eviction_the_leader_has_not_seen_loads_the_adapter_on_another_replica() {
    let f = fleet(2, 50.0, &["hot"], false, |_| {}).await;
    let addr = f.gw.local_addr();
    let first = ask(addr, "hot", 2).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let holder = first.endpoint();
    let (holder_sim, holder_replica) = if holder == f.addr(0) { (0, "r0") } else { (1, "r1") };
    f.publish();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // the engine drops it; the leader's view still has it there (not cleared: stale)
    let unload = serde_json::json!({"lora_name": "hot"});
    let r = post(f.sims[holder_sim].local_addr(), "/v1/unload_lora_adapter", unload, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = ask(addr, "hot", 2).await;
    assert_eq!(r.status, 200, "the client never sees the engine's 404: {}", r.text());
    assert_ne!(r.endpoint(), holder, "served by the replica it was loaded on");
    let calls = f.leader.state.lock().unwrap().calls.clone();
    assert_eq!(calls.len(), 3, "cold load, the stale answer, the load elsewhere: {calls:?}");
    assert_eq!(calls[2].avoid_replicas, [holder_replica], "the evicting replica is avoided");
    let errors = metric_sum(addr, "flotilla_gateway_errors_total", &["model=\"hot\""]).await;
    assert_eq!(errors, 0.0, "no request failed");
    f.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_holders_make_the_leader_load_the_adapter_elsewhere() {
    let f = fleet(2, 5.0, &["busy"], false, |a| a.max_in_flight_per_endpoint = 1).await;
    let addr = f.gw.local_addr();
    let first = ask(addr, "busy", 1).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let holder = first.endpoint();
    // a long request saturates the only holder
    let long = tokio::spawn(async move { ask(addr, "busy", 4000).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = ask(addr, "busy", 1).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_ne!(r.endpoint(), holder, "served by the newly loaded replica, not after the long request");
    let calls = f.leader.state.lock().unwrap().calls.clone();
    assert_eq!(calls.len(), 2, "{calls:?}");
    let holder_replica = if holder == f.addr(0) { "r0" } else { "r1" };
    assert_eq!(calls[1].avoid_replicas, [holder_replica], "the saturated holder is avoided");
    long.abort();
    f.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_unknown_adapters_are_clear_errors_through_a_follower() {
    let f = fleet(1, 50.0, &["ok", "broken"], true, |a| a.adapter_load_timeout_ms = 5_000).await;
    f.leader
        .state
        .lock()
        .unwrap()
        .failing
        .insert("broken".into(), "adapter broken is Failed: rank 64 is above --max-lora-rank 16".into());
    let addr = f.gw.local_addr();
    // the follower's not_leader hint is followed
    let r = ask(addr, "ok", 2).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = ask(addr, "broken", 2).await;
    assert_eq!((r.status, r.error_code().as_str()), (503, "adapter_unavailable"), "{}", r.text());
    assert!(r.text().contains("rank 64 is above --max-lora-rank 16"), "{}", r.text());
    let r = ask(addr, "no-such-adapter", 2).await;
    assert_eq!((r.status, r.error_code().as_str()), (404, "model_not_found"), "{}", r.text());
    assert_eq!(f.leader.calls_for("no-such-adapter"), 0, "unknown names never reach the leader");
    let errs =
        metric_sum(addr, "flotilla_gateway_adapter_load_errors_total", &["reason=\"failed_precondition\""]).await;
    assert_eq!(errs, 1.0);
    f.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_slot_and_busy_answers_come_at_once_with_the_reason_and_retry_after() {
    let f = fleet(1, 50.0, &["ok", "pinned", "busy"], false, |_| {}).await;
    let why = "no free slot: 1 of 1 (--max-cpu-loras) in use; every slot holds a pinned adapter";
    {
        let mut st = f.leader.state.lock().unwrap();
        st.failing
            .insert("pinned".into(), format!("actors.adapter_no_slot: adapter pinned cannot be placed now: {why}"));
        st.busy.insert("busy".into(), "actors.adapter_busy: adapter busy cannot be placed now: in flight".into());
    }
    let addr = f.gw.local_addr();
    assert_eq!(ask(addr, "ok", 2).await.status, 200);
    let t = tokio::time::Instant::now();
    let r = ask(addr, "pinned", 2).await;
    let took = t.elapsed();
    assert_eq!((r.status, r.error_code().as_str()), (503, "adapter_no_slot"), "{}", r.text());
    assert!(r.text().contains(why), "{}", r.text());
    assert_eq!(r.header("retry-after").as_deref(), Some("5"));
    assert!(took < Duration::from_millis(100), "{took:?}");
    // A capacity wait: 429, and each request asks again (the answer is not reused).
    for _ in 0..2 {
        let r = ask(addr, "busy", 2).await;
        assert_eq!((r.status, r.error_code().as_str()), (429, "adapter_busy"), "{}", r.text());
        assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    }
    assert_eq!(f.leader.calls_for("busy"), 2);
    f.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_are_reported_at_once_and_cleared_when_they_end() {
    let f = fleet(1, 1.0, &["long"], false, |_| {}).await;
    let addr = f.gw.local_addr();
    let first = ask(addr, "long", 2).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let reports = |f: &Fleet| f.leader.state.lock().unwrap().reports.clone();
    let busy =
        |r: &flotilla_api::pb::ReportUsageRequest| r.usage.iter().any(|u| u.adapter == "long" && u.in_flight > 0);
    // The first request's reports are told and forgotten.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(reports(&f).last().is_none_or(|r| !busy(r)), "{:?}", reports(&f));
    f.leader.state.lock().unwrap().reports.clear();
    // A request of about a second: its pair is reported in flight well before it ends
    // (not at the 2 s tick), with this gateway's id.
    let task = tokio::spawn(async move { ask(addr, "long", 60).await });
    let t = tokio::time::Instant::now();
    while !reports(&f).iter().any(busy) {
        assert!(!task.is_finished() && t.elapsed() < Duration::from_secs(2), "never reported in flight");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!task.is_finished(), "reported while in flight");
    assert!(reports(&f).iter().filter(|r| busy(r)).all(|r| r.gateway_id.len() == 36), "{:?}", reports(&f));
    assert_eq!(task.await.unwrap().status, 200);
    // Its end is reported at once too: a later report without it in flight.
    let t = tokio::time::Instant::now();
    while reports(&f).last().is_none_or(busy) {
        assert!(t.elapsed() < Duration::from_millis(500), "the end was not reported at once");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reachable_leader_is_a_503_with_retry_after() {
    let f = fleet(1, 50.0, &["lonely"], false, |a| a.adapter_load_timeout_ms = 2_000).await;
    drop(f._stops); // every server goes away; the gateway keeps its table
    tokio::time::sleep(Duration::from_millis(200)).await;
    let addr = f.gw.local_addr();
    assert_eq!(complete(addr, "x", 2, &[]).await.status, 200, "base model traffic is unaffected");
    let start = tokio::time::Instant::now();
    let r = ask(addr, "lonely", 2).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
    assert!(start.elapsed() < Duration::from_secs(10), "bounded wait: {:?}", start.elapsed());
    f.gw.shutdown().await;
}

/// vLLM's `/tokenize` and `/detokenize` go through the gateway by name: a model to any of
/// its engines, a loaded adapter to an engine holding it, an adapter no engine holds to its
/// base model's tokenizer without loading it; none of it counts as an inference request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenizer_calls_route_by_model_and_adapter_without_loading_or_counting() {
    let f = fleet(2, 50.0, &["warm", "cold"], false, |_| {}).await;
    let addr = f.gw.local_addr();
    let r = ask(addr, "warm", 2).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let holder = r.endpoint();
    f.publish();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let requests = metric_sum(addr, "flotilla_gateway_requests_total", &[]).await;
    let tokenize =
        |model: &str, prompt: &str| post(addr, "/tokenize", serde_json::json!({"model": model, "prompt": prompt}), &[]);
    let prompt = "Route these tokens through 3 gateways, please.";

    let direct = post(f.sims[0].local_addr(), "/tokenize", serde_json::json!({"prompt": prompt}), &[]).await.json();
    let r = tokenize(MODEL, prompt).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["tokens"], direct["tokens"]);
    for _ in 0..4 {
        let r = tokenize("warm", prompt).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.endpoint(), holder, "an adapter's tokenizer call goes to an engine holding it");
    }
    let r = tokenize("cold", prompt).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["tokens"], direct["tokens"], "the base model's tokenizer");
    assert_eq!(f.leader.calls_for("cold"), 0, "a tokenizer call loads no adapter");

    let ids = r.json()["tokens"].as_array().unwrap()[1..6].to_vec(); // past the BOS token
    let d = post(addr, "/detokenize", serde_json::json!({"model": "cold", "tokens": ids}), &[]).await;
    assert_eq!(d.status, 200, "{}", d.text());
    let text = d.json()["prompt"].as_str().unwrap().to_string();
    let again =
        post(addr, "/tokenize", serde_json::json!({"model": MODEL, "prompt": text, "add_special_tokens": false}), &[]);
    assert_eq!(again.await.json()["count"], 5, "5 ids decode to a 5-token prompt: {text:?}");

    let r = tokenize("no-such-model", prompt).await;
    assert_eq!((r.status, r.error_code().as_str()), (404, "model_not_found"), "{}", r.text());
    let r = post(addr, "/tokenize", serde_json::json!({"prompt": prompt}), &[]).await;
    assert_eq!((r.status, r.error_code().as_str()), (400, "missing_model"), "{}", r.text());
    let r = send(addr, "GET", "/tokenize", b"", &[]).await;
    assert_eq!(r.status, 405);

    assert_eq!(metric_sum(addr, "flotilla_gateway_requests_total", &[]).await, requests, "not inference requests");
    let counted = metric_sum(addr, "flotilla_gateway_tokenizer_requests_total", &["code=\"200\""]).await;
    assert_eq!(counted, 8.0);
    assert_eq!(
        metric_sum(addr, "flotilla_gateway_tokenizer_requests_total", &["model=\"unknown\"", "code=\"404\""]).await,
        1.0,
        "unknown names are not label values"
    );
    f.gw.shutdown().await;
}
