//! Bad input gets a clear 4xx in OpenAI's error shape and changes nothing: the engine
//! keeps serving afterwards.

mod common;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_4xx_and_the_engine_keeps_serving() {
    // strict mode, so the unknown-field case below gets its 400
    let sim = start(flotilla_sim::SimArgs { max_model_len: 256, reject_unknown_fields: true, ..args() }).await;
    let a = sim.local_addr();
    let long = text(400, 3);
    let huge = vec![b'x'; 5 * 1024 * 1024];
    let cases: Vec<(&str, Vec<u8>, u16, Option<&str>)> = vec![
        ("malformed json", b"{\"model\": \"demo\", \"prompt\": ".to_vec(), 400, None),
        ("not json at all", b"hello".to_vec(), 400, None),
        (
            "negative max_tokens",
            json!({"model": "demo", "prompt": "x", "max_tokens": -1}).to_string().into_bytes(),
            400,
            Some("max_tokens"),
        ),
        (
            "zero max_tokens",
            json!({"model": "demo", "prompt": "x", "max_tokens": 0}).to_string().into_bytes(),
            400,
            Some("max_tokens"),
        ),
        (
            "max_tokens of the wrong type",
            json!({"model": "demo", "prompt": "x", "max_tokens": "ten"}).to_string().into_bytes(),
            400,
            None,
        ),
        (
            "unknown field",
            json!({"model": "demo", "prompt": "x", "frobnicate": true}).to_string().into_bytes(),
            400,
            None,
        ),
        ("n of 2", json!({"model": "demo", "prompt": "x", "n": 2}).to_string().into_bytes(), 400, Some("n")),
        ("missing prompt", json!({"model": "demo"}).to_string().into_bytes(), 400, None),
        ("empty prompt", json!({"model": "demo", "prompt": ""}).to_string().into_bytes(), 400, Some("prompt")),
        ("unknown model", json!({"model": "gpt-17", "prompt": "x"}).to_string().into_bytes(), 404, Some("model")),
        (
            "prompt beyond max-model-len",
            json!({"model": "demo", "prompt": long}).to_string().into_bytes(),
            413,
            Some("prompt"),
        ),
        (
            "prompt plus max_tokens beyond max-model-len",
            json!({"model": "demo", "prompt": "x", "max_tokens": 1000}).to_string().into_bytes(),
            400,
            Some("max_tokens"),
        ),
        (
            "stream_options without stream",
            json!({"model": "demo", "prompt": "x", "stream_options": {"include_usage": true}}).to_string().into_bytes(),
            400,
            Some("stream_options"),
        ),
        ("huge body", huge, 413, None),
    ];
    for (what, body, status, param) in cases {
        let r = request(a, "POST", "/v1/completions", Some(&body)).await;
        assert_eq!(r.status, status, "{what}: {}", r.body);
        let err = &r.json()["error"];
        assert_eq!(err["code"], status, "{what}");
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}");
        if let Some(p) = param {
            assert_eq!(err["param"], p, "{what}");
        }
    }
    let chat_cases = [
        json!({"model": "demo", "messages": []}),
        json!({"model": "demo", "messages": "hi"}),
        json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -5}),
        json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}),
    ];
    for body in chat_cases {
        let r = post(a, "/v1/chat/completions", body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
    }
    assert_eq!(post(a, "/v1/load_lora_adapter", json!({"lora_name": "x"})).await.status, 400);
    assert_eq!(get(a, "/v1/nope").await.status, 404);
    assert_eq!(post(a, "/sim/faults", json!({"stall": true})).await.status, 403, "faults need --allow-faults");

    // nothing was queued or counted, and a good request still works
    let mm = metrics(a).await;
    assert_eq!(m(&mm, "vllm:prompt_tokens_total"), 0.0);
    assert_eq!(m(&mm, "vllm:num_requests_waiting"), 0.0);
    assert_eq!(get(a, "/health").await.status, 200);
    let r = complete(a, "demo", "still alive?", 5).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["usage"]["completion_tokens"], 5);
    sim.shutdown().await.unwrap();
}

/// Without `--reject-unknown-fields` the sim ignores fields it does not know, as vLLM does
/// (routers such as vllm-router add their own, e.g. `no_stop_trim`); type errors in known
/// fields still get 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_ignored_by_default() {
    let sim = start(args()).await;
    let a = sim.local_addr();
    let r = post(
        a,
        "/v1/completions",
        json!({"model": "demo", "prompt": "x", "max_tokens": 3, "frobnicate": true,
        "no_stop_trim": false}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["usage"]["completion_tokens"], 3);
    let r = post(
        a,
        "/v1/completions",
        json!({"model": "demo", "prompt": "x", "max_tokens": 2, "stream": true,
        "no_stop_trim": false}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("data: [DONE]"), "{}", r.body);
    let r = post(
        a,
        "/v1/chat/completions",
        json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2, "bogus": {"nested": 1}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(a, "/v1/completions", json!({"model": "demo", "prompt": "x", "max_tokens": "ten", "bogus": 1})).await;
    assert_eq!(r.status, 400, "{}", r.body);
    sim.shutdown().await.unwrap();
}

#[tokio::test]
async fn invalid_flags_are_usage_errors_naming_the_flag() {
    let err = flotilla_sim::start(flotilla_sim::SimArgs { num_gpu_blocks: Some(0), ..args() }).await.unwrap_err();
    assert!(err.is_usage());
    assert!(err.to_string().contains("--num-gpu-blocks"), "{err}");
    let err = flotilla_sim::start(flotilla_sim::SimArgs { profile: "tpu-v9".into(), ..args() }).await.unwrap_err();
    assert!(err.to_string().contains("--profile") && err.to_string().contains("tpu-v9"), "{err}");
    let err = flotilla_sim::start(flotilla_sim::SimArgs { host: "256.1.1.1".into(), ..args() }).await.unwrap_err();
    assert!(!err.is_usage(), "{err}");
    assert_eq!(err.exit_code(), 1);
}

#[tokio::test]
async fn ssl_files_go_together_and_bad_ones_are_usage_errors_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let pair = flotilla_security::certs::self_signed("127.0.0.1", 1).unwrap();
    std::fs::write(&cert, &pair.cert_pem).unwrap();
    std::fs::write(&key, &pair.key_pem).unwrap();
    let only_cert = flotilla_sim::SimArgs { ssl_certfile: Some(cert.clone()), ..args() };
    let err = flotilla_sim::start(only_cert).await.unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("--ssl-keyfile") && err.to_string().contains("both or neither"), "{err}");
    let only_key = flotilla_sim::SimArgs { ssl_keyfile: Some(key.clone()), ..args() };
    assert!(flotilla_sim::start(only_key).await.unwrap_err().to_string().contains("--ssl-certfile"));
    let missing = dir.path().join("missing.pem");
    let err = flotilla_sim::start(flotilla_sim::SimArgs {
        ssl_certfile: Some(missing.clone()),
        ssl_keyfile: Some(key.clone()),
        ..args()
    })
    .await
    .unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("--ssl-certfile") && err.to_string().contains("missing.pem"), "{err}");
    // A key that is not the certificate's.
    let other = flotilla_security::certs::self_signed("127.0.0.1", 1).unwrap();
    std::fs::write(&key, &other.key_pem).unwrap();
    let err = flotilla_sim::start(flotilla_sim::SimArgs { ssl_certfile: Some(cert), ssl_keyfile: Some(key), ..args() })
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("--ssl-keyfile"), "{err}");
}
