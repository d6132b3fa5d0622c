//! Adapter ownership (`Adapter.spec.tenants`) through the gateway, against sims and a fake
//! leader whose `EnsureLoaded` really loads adapters: a tenant not listed cannot use,
//! tokenize with, list or trigger a load of another tenant's adapter, and every refusal
//! reads exactly as a name that does not exist; the owner can; an adapter without
//! `tenants` stays open to every tenant.

mod common;

use std::time::Duration;

use common::fake_cp::FakeCp;
use common::fake_leader::{Engine, FakeAdapters};
use common::*;

const ALPHA: &str = "Bearer key-alpha-1";
const BETA: &str = "Bearer key-beta-01";

async fn ask(addr: std::net::SocketAddr, key: &str, model: &str) -> Resp {
    let body = serde_json::json!({"model": model, "prompt": "hello there", "max_tokens": 2, "ignore_eos": true});
    post(addr, "/v1/completions", body, &[("authorization", key)]).await
}

async fn chat(addr: std::net::SocketAddr, key: &str, model: &str) -> Resp {
    let body = serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    post(addr, "/v1/chat/completions", body, &[("authorization", key)]).await
}

async fn tokenize(addr: std::net::SocketAddr, key: &str, model: &str) -> Resp {
    post(addr, "/tokenize", serde_json::json!({"model": model, "prompt": "hello"}), &[("authorization", key)]).await
}

async fn detokenize(addr: std::net::SocketAddr, key: &str, model: &str) -> Resp {
    post(addr, "/detokenize", serde_json::json!({"model": model, "tokens": [1, 2, 3]}), &[("authorization", key)]).await
}

async fn model_ids(addr: std::net::SocketAddr, key: &str) -> Vec<String> {
    let r = send(addr, "GET", "/v1/models", b"", &[("authorization", key)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mut ids: Vec<String> =
        r.json()["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect();
    ids.sort();
    ids
}

/// The refusal of `owned` must read as the answer for `unknown`, name aside.
fn assert_reads_as_unknown(refused: &Resp, unknown: &Resp, owned: &str, what: &str) {
    assert_eq!(refused.status, 404, "{what}: {}", refused.text());
    assert_eq!((refused.status, refused.error_code()), (unknown.status, unknown.error_code()), "{what}");
    let mut body = refused.json();
    let message = body["error"]["message"].as_str().unwrap().replace(owned, "no-such-adapter");
    body["error"]["message"] = message.into();
    assert_eq!(body, unknown.json(), "{what}: the refusal differs from an unknown name's answer");
    for h in ["retry-after", "content-type", "x-ratelimit-limit-requests"] {
        assert_eq!(refused.header(h), unknown.header(h), "{what}: header {h}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_use_tokenize_with_list_or_load_another_tenants_adapter() {
    let sims = sims(2, 50.0).await;
    let engines = sims
        .iter()
        .enumerate()
        .map(|(i, s)| Engine { replica: format!("r{i}"), model: MODEL.into(), addr: s.local_addr() })
        .collect();
    let leader = FakeAdapters::new(engines);
    let cp = FakeCp::new(None);
    cp.put("Model", MODEL, serde_json::json!({"source": "hf://x/y"}));
    for (name, key) in [("alpha", "key-alpha-1"), ("beta", "key-beta-01")] {
        cp.put("Tenant", name, serde_json::json!({"rpm": 1000, "api_keys": [flotilla_api::spec::hash_api_key(key)]}));
    }
    let adapters = [("beta-only", Some(vec!["beta"])), ("shared", None), ("both", Some(vec!["alpha", "beta"]))];
    for (name, tenants) in &adapters {
        leader.state.lock().unwrap().known.insert(name.to_string(), MODEL.into());
        let mut spec =
            serde_json::json!({"base_model": MODEL, "source": format!("sim://{name}"), "replicas": "on-demand"});
        if let Some(t) = tenants {
            spec["tenants"] = serde_json::json!(t);
        }
        cp.put_with_status("Adapter", name, spec, serde_json::json!({"phase": "Pending"}));
    }
    cp.endpoints.send_replace(leader.snapshot());
    let (server, _stop) = leader.clone().serve(cp.clone()).await;
    let args = flotilla_gateway::GatewayArgs {
        listen: "127.0.0.1:0".into(),
        server: vec![server.to_string()],
        ..flotilla_gateway::GatewayArgs::default()
    };
    let gw = gateway(args).await;
    let addr = gw.local_addr();
    let mut ready = false;
    for _ in 0..200 {
        let st = gw.state();
        if st.dir.synced()
            && !st.dir.endpoints().is_empty()
            && st.dir.tenants().by_key.len() == 2
            && adapters.iter().all(|(n, _)| st.dir.adapter(n).is_some())
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ready, "no endpoint table, tenants or adapters from the control plane");

    // not loaded anywhere yet: alpha's request for beta's adapter reads as an unknown name
    // and triggers no load
    let unknown = ask(addr, ALPHA, "no-such-adapter").await;
    assert_eq!((unknown.status, unknown.error_code().as_str()), (404, "model_not_found"), "{}", unknown.text());
    assert_reads_as_unknown(&ask(addr, ALPHA, "beta-only").await, &unknown, "beta-only", "cold completion");
    let unknown_chat = chat(addr, ALPHA, "no-such-adapter").await;
    assert_reads_as_unknown(&chat(addr, ALPHA, "beta-only").await, &unknown_chat, "beta-only", "cold chat");
    assert_eq!(leader.calls_for("beta-only"), 0, "a tenant not listed triggers no load");

    // tokenizer calls: alpha is refused as for an unknown name, loaded or not
    let unknown_tok = tokenize(addr, ALPHA, "no-such-adapter").await;
    assert_reads_as_unknown(&tokenize(addr, ALPHA, "beta-only").await, &unknown_tok, "beta-only", "cold tokenize");
    let unknown_detok = detokenize(addr, ALPHA, "no-such-adapter").await;
    let refused = detokenize(addr, ALPHA, "beta-only").await;
    assert_reads_as_unknown(&refused, &unknown_detok, "beta-only", "cold detokenize");
    assert_eq!(tokenize(addr, BETA, "beta-only").await.status, 200, "the owner tokenizes with it");

    // the owner loads and uses it
    let r = ask(addr, BETA, "beta-only").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(leader.calls_for("beta-only"), 1);
    cp.endpoints.send_replace(leader.snapshot()); // the snapshot shows it loaded too
    let mut loaded = false;
    for _ in 0..100 {
        if gw.state().dir.endpoints().resolve("beta-only").is_some_and(|r| !r.endpoints.is_empty()) {
            loaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(loaded, "the gateway never saw the adapter loaded");

    // loaded now: still refused to alpha on every path, still as an unknown name
    assert_reads_as_unknown(&ask(addr, ALPHA, "beta-only").await, &unknown, "beta-only", "warm completion");
    assert_reads_as_unknown(&chat(addr, ALPHA, "beta-only").await, &unknown_chat, "beta-only", "warm chat");
    assert_reads_as_unknown(&tokenize(addr, ALPHA, "beta-only").await, &unknown_tok, "beta-only", "warm tokenize");
    let refused = detokenize(addr, ALPHA, "beta-only").await;
    assert_reads_as_unknown(&refused, &unknown_detok, "beta-only", "warm detokenize");
    assert_eq!(leader.calls_for("beta-only"), 1, "still no load on alpha's behalf");
    for _ in 0..2 {
        let r = ask(addr, BETA, "beta-only").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(chat(addr, BETA, "beta-only").await.status, 200);
        assert_eq!(tokenize(addr, BETA, "beta-only").await.status, 200);
    }

    // adapters without tenants, or listing both, serve both
    for key in [ALPHA, BETA] {
        for a in ["shared", "both"] {
            let r = ask(addr, key, a).await;
            assert_eq!(r.status, 200, "{key} {a}: {}", r.text());
        }
    }

    // /v1/models differs per tenant
    assert_eq!(model_ids(addr, ALPHA).await, ["both", MODEL, "shared"]);
    assert_eq!(model_ids(addr, BETA).await, ["beta-only", "both", MODEL, "shared"]);

    // the metrics do not tell the hidden adapter from an unknown name either
    let text = get(addr, "/metrics").await.text();
    for line in text.lines().filter(|l| l.starts_with("flotilla_gateway_errors_total")) {
        assert!(!line.contains("beta-only") && !line.contains("no-such-adapter"), "{line}");
    }
    let unknown_errors =
        metric_sum(addr, "flotilla_gateway_errors_total", &["model=\"unknown\"", "code=\"model_not_found\""]).await;
    assert_eq!(unknown_errors, 12.0, "every 404 above, refusals and unknown names alike");
    gw.shutdown().await;
}
