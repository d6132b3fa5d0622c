//! `kv-aware` routing end to end: sims publishing their KV events, gateways with the sims'
//! tokenizer following them. A repeated long prompt goes to the engine whose own events say
//! it holds the prompt (not a guess: the explanation shows the cached tokens came from the
//! index, not speculation); a burst of a new prefix computes it at most once per engine
//! (speculation: the engines' events come too late to tell); two
//! gateways make the same decision for the same state; without a tokenizer the model is
//! routed by the approximate prefix index and says so.

mod common;

use std::time::Duration;

use common::*;
use flotilla_gateway::routing::kv_aware::explained_terms;
use flotilla_sim::SimHandle;
use serde_json::json;

const EVENTS: &str = r#"{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:0",
    "replay_endpoint": "tcp://*:0", "topic": "kv"}"#;

async fn publishing_sims(n: usize) -> Vec<SimHandle> {
    let mut v = Vec::new();
    for _ in 0..n {
        let args = flotilla_sim::SimArgs { kv_events_config: Some(EVENTS.into()), ..sim_args(20.0) };
        v.push(flotilla_sim::start(args).await.expect("sim starts"));
    }
    v
}

fn kv_args(sims: &[SimHandle], tokenizer: bool) -> flotilla_gateway::GatewayArgs {
    let mut a = gw_args(sims);
    a.routing = vec![format!("{MODEL}=kv-aware")];
    if tokenizer {
        a.tokenizer = vec![format!("{MODEL}=sim")];
    }
    a
}

fn long_prompt(tag: &str, words: usize) -> String {
    (0..words).map(|i| format!("{tag}{i}")).collect::<Vec<_>>().join(" ")
}

/// Sends a completion asking for the routing's explanation; (endpoint, explanation).
async fn routed(gw: std::net::SocketAddr, prompt: &str) -> (String, String) {
    let r = post(
        gw,
        "/v1/completions",
        json!({"model": MODEL, "prompt": prompt, "max_tokens": 2}),
        &[("x-flotilla-explain-route", "true")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    (r.endpoint(), r.header("x-flotilla-route").expect("x-flotilla-route"))
}

/// The explanation's `cached=` and `speculative=` for `endpoint`.
fn terms(explanation: &str, endpoint: &str) -> (usize, usize) {
    explained_terms(explanation, endpoint).unwrap_or_else(|| panic!("{endpoint} in {explanation}"))
}

/// Polls until the gateway follows `n` engines of the model.
async fn following(gw: std::net::SocketAddr, n: usize) {
    let want = format!("flotilla_gateway_kv_followers{{model=\"{MODEL}\"}} {n}");
    for _ in 0..100 {
        if get(gw, "/metrics").await.text().contains(&want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not following {n} engines");
}

/// Polls until the gateway's index holds entries, so later decisions rest on events.
async fn index_filled(gw: std::net::SocketAddr) {
    for _ in 0..100 {
        let m = get(gw, "/metrics").await.text();
        let entries = m
            .lines()
            .find(|l| l.starts_with("flotilla_gateway_kv_index_entries{"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if entries > 0.0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = get(gw, "/metrics").await.text();
    let kv: Vec<&str> = m.lines().filter(|l| l.contains("_kv_")).collect();
    panic!("the KV index stayed empty: {kv:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_prompt_goes_where_the_engines_events_say_it_is_cached() {
    let sims = publishing_sims(3).await;
    let gw = gateway(kv_args(&sims, true)).await;
    let a = gw.local_addr();
    tokio::time::sleep(Duration::from_millis(1500)).await; // followers subscribed

    let system = long_prompt("sys", 300);
    let (first, x) = routed(a, &format!("{system} question one")).await;
    assert!(x.starts_with("kv-aware tokens="), "{x}");
    assert_eq!(terms(&x, &first), (0, 0), "nothing cached anywhere yet: {x}");
    index_filled(a).await;
    tokio::time::sleep(Duration::from_secs(6)).await; // past --kv-speculate-ms: events alone

    for q in ["two", "three", "four"] {
        let (ep, x) = routed(a, &format!("{system} question {q}")).await;
        assert_eq!(ep, first, "{x}");
        let (cached, speculative) = terms(&x, &ep);
        assert!(cached >= 256, "most of the 300-word prefix is cached there: {x}");
        assert_eq!(speculative, 0, "known from the engine's own events: {x}");
        for s in &sims {
            let other = s.local_addr().to_string();
            if other != ep {
                assert_eq!(terms(&x, &other).0, 0, "{x}");
            }
        }
    }

    // A second gateway on the same engines decides the same once it has followed them.
    let gw2 = gateway(kv_args(&sims, true)).await;
    index_filled(gw2.local_addr()).await;
    let probe = format!("{system} question five");
    let (e1, x1) = routed(a, &probe).await;
    let (e2, x2) = routed(gw2.local_addr(), &probe).await;
    assert_eq!((e1.as_str(), terms(&x1, &e1).0), (e2.as_str(), terms(&x2, &e2).0), "{x1}\n{x2}");

    let m = get(a, "/metrics").await.text();
    for name in ["kv_prompt_tokens_total", "kv_predicted_hit_tokens_total", "kv_index_bytes", "kv_followers"] {
        assert!(m.contains(&format!("flotilla_gateway_{name}{{model=\"{MODEL}\"}}")), "{name} missing:\n{m}");
    }
    assert!(m.contains(&format!("flotilla_gateway_kv_followers{{model=\"{MODEL}\"}} 3")), "{m}");
    gw2.shutdown().await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_a_new_prefix_computes_it_at_most_once_per_engine() {
    let sims = publishing_sims(3).await;
    let gw = gateway(kv_args(&sims, true)).await;
    let a = gw.local_addr();
    following(a, sims.len()).await;
    let system = long_prompt("burst", 200);
    // all at once: no engine event can have come back before the later ones are routed
    let sends: Vec<_> = (0..6)
        .map(|i| {
            let p = format!("{system} q{i}");
            tokio::spawn(async move { routed(a, &p).await })
        })
        .collect();
    let mut got = Vec::new();
    for s in sends {
        got.push(s.await.unwrap());
    }
    // Without speculation all six would find nothing cached (no event is back yet) and
    // least-request would compute the prefix twice on every engine.
    let cold = got.iter().filter(|(ep, x)| terms(x, ep).0 == 0).count();
    assert!(cold <= sims.len(), "the prefix computed {cold} times: {got:#?}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_tokenizer_kv_aware_routes_on_the_approximate_index_and_says_so() {
    let sims = publishing_sims(2).await;
    let gw = gateway(kv_args(&sims, false)).await;
    let (_, x) = routed(gw.local_addr(), &long_prompt("x", 50)).await;
    assert_eq!(x, "prefix-cache (no token ids or no KV index)");
    // any other strategy names itself
    let r = post(
        gw.local_addr(),
        "/v1/completions",
        json!({"model": MODEL, "prompt": "hi", "max_tokens": 1}),
        &[("x-flotilla-explain-route", "true"), ("x-flotilla-routing", "round-robin")],
    )
    .await;
    assert_eq!(r.header("x-flotilla-route").as_deref(), Some("round-robin"));
    let bad = post(
        gw.local_addr(),
        "/v1/completions",
        json!({"model": MODEL, "prompt": "hi", "max_tokens": 1}),
        &[("x-flotilla-explain-route", "maybe")],
    )
    .await;
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert!(bad.text().contains("x-flotilla-explain-route"), "{}", bad.text());
    gw.shutdown().await;
}

/// From the cluster: a `routing: kv-aware` Model of `engine: sim` is keyed with the sim's
/// tokenizer without any flag; an endpoint that leaves the table takes its index entries
/// (and its follower) along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_models_of_sims_are_keyed_exactly_and_departed_engines_leave_the_index() {
    let sims = publishing_sims(2).await;
    let cp = common::fake_cp::FakeCp::new(None);
    cp.put("Model", MODEL, json!({"source": "hf://x/y", "engine": "sim", "routing": "kv-aware"}));
    cp.set_endpoints(&[(MODEL, sims[0].local_addr()), (MODEL, sims[1].local_addr())]);
    let (cp_addr, stop) = cp.clone().serve().await;
    let gw = gateway(cluster_gw_args(cp_addr)).await;
    let a = gw.local_addr();
    let (mut x, mut holder) = (String::new(), String::new());
    for _ in 0..100 {
        let r = post(
            a,
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": long_prompt("c", 100)}], "max_tokens": 2}),
            &[("x-flotilla-explain-route", "true")],
        )
        .await;
        if r.status == 200 {
            x = r.header("x-flotilla-route").unwrap_or_default();
            holder = r.endpoint();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(x.starts_with("kv-aware tokens="), "keyed with the sim's tokenizer: {x:?}");
    index_filled(a).await;

    // The engine that holds the prompt leaves the table: its blocks leave the index.
    let stays = sims.iter().find(|s| s.local_addr().to_string() != holder).expect("another sim");
    cp.set_endpoints(&[(MODEL, stays.local_addr())]);
    following(a, 1).await;
    let empty = format!("flotilla_gateway_kv_index_entries{{model=\"{MODEL}\"}} 0");
    let mut m = String::new();
    for _ in 0..50 {
        m = get(a, "/metrics").await.text();
        if m.contains(&empty) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(m.contains(&empty), "the departed engine's entries are gone: {m}");
    gw.shutdown().await;
    let _ = stop.send(());
}
