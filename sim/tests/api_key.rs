//! `--api-key`: the sim guards its OpenAI API as vLLM's `--api-key` does. Without the key
//! (or with a wrong one) every `/v1` route, unknown ones included, answers 401 with vLLM's
//! exact body; with it, 200; `/health`, `/metrics`, `/version` and `/tokenize` stay open.

mod common;

use common::*;
use serde_json::json;

const KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_needs_the_key_and_the_rest_stays_open() {
    let sim = start(flotilla_sim::SimArgs { api_key: Some(KEY.into()), ..args() }).await;
    let a = sim.local_addr();
    let completion = json!({"model": "demo", "prompt": "hi", "max_tokens": 2}).to_string();
    let good = format!("Bearer {KEY}");
    let wrong = format!("Bearer {}", KEY.replace('0', "1"));
    for (method, path, body) in [
        ("POST", "/v1/completions", Some(completion.as_bytes())),
        ("GET", "/v1/models", None),
        ("POST", "/v1/load_lora_adapter", Some(br#"{"lora_name":"a","lora_path":"/x"}"#.as_slice())),
        ("GET", "/v1/nope", None),
    ] {
        for headers in [vec![], vec![("Authorization", wrong.as_str())], vec![("Authorization", KEY)]] {
            let r = request_with(a, method, path, body, &headers).await;
            assert_eq!(r.status, 401, "{method} {path} {headers:?}: {}", r.body);
            assert_eq!(r.json(), json!({"error": "Unauthorized"}), "vLLM's body");
        }
    }
    let r = request_with(a, "POST", "/v1/completions", Some(completion.as_bytes()), &[("Authorization", &good)]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let lower = format!("bearer {KEY}");
    assert_eq!(request_with(a, "GET", "/v1/models", None, &[("Authorization", &lower)]).await.status, 200);
    for path in ["/health", "/metrics", "/version"] {
        assert_eq!(get(a, path).await.status, 200, "{path} is open, as in vLLM");
    }
    let r = post(a, "/tokenize", json!({"model": "demo", "prompt": "hello"})).await;
    assert_eq!(r.status, 200, "/tokenize is outside /v1: open, as in vLLM: {}", r.body);
    sim.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_key_nothing_is_guarded() {
    let sim = start(flotilla_sim::SimArgs { api_key: Some(String::new()), ..args() }).await;
    let r = complete(sim.local_addr(), "demo", "hi", 2).await;
    assert_eq!(r.status, 200, "an empty key is no key, as in vLLM: {}", r.body);
    sim.shutdown().await.unwrap();
}
