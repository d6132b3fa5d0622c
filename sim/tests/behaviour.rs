//! Behaviour that a control plane relies on, checked against an in-process sim over real
//! HTTP: latency grows with queueing, prefix caching pays off, KV exhaustion preempts and
//! recovers, LoRA slots queue, metrics agree with what was served.

mod common;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttft_rises_with_queue_depth() {
    let sim = start(flotilla_sim::SimArgs { max_num_seqs: 4, ..args() }).await;
    let a = sim.local_addr();
    let before = metrics(a).await;
    complete(a, "demo", &text(50, 1), 32).await;
    let alone = metrics(a).await;
    let ttft_alone = mean_delta(&before, &alone, "vllm:time_to_first_token_seconds");

    let tasks: Vec<_> =
        (0..32).map(|i| tokio::spawn(async move { complete(a, "demo", &text(50, 100 + i), 32).await })).collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().status, 200);
    }
    let loaded = metrics(a).await;
    let ttft_queued = mean_delta(&alone, &loaded, "vllm:time_to_first_token_seconds");
    let queue = mean_delta(&alone, &loaded, "vllm:request_queue_time_seconds");
    assert!(ttft_queued > 3.0 * ttft_alone, "ttft alone {ttft_alone:.4}s vs queued {ttft_queued:.4}s");
    assert!(queue > 0.1, "mean queue time {queue}");
    sim.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_long_prefix_hits_cache_and_lowers_ttft() {
    let sim = start(args()).await;
    let a = sim.local_addr();
    let shared = text(1500, 7);
    let m0 = metrics(a).await;
    for i in 0..6 {
        let r = complete(a, "demo", &format!("{shared} question {i}"), 4).await;
        assert_eq!(r.status, 200);
    }
    let m1 = metrics(a).await;
    for i in 0..6 {
        let r = complete(a, "demo", &format!("{} question {i}", text(1500, 1000 + i)), 4).await;
        assert_eq!(r.status, 200);
    }
    let m2 = metrics(a).await;
    let rate = |x: &std::collections::HashMap<String, f64>, y: &std::collections::HashMap<String, f64>| {
        (m(y, "vllm:prefix_cache_hits_total") - m(x, "vllm:prefix_cache_hits_total"))
            / (m(y, "vllm:prefix_cache_queries_total") - m(x, "vllm:prefix_cache_queries_total"))
    };
    let (shared_rate, unique_rate) = (rate(&m0, &m1), rate(&m1, &m2));
    assert!(shared_rate > 0.7, "shared prefix hit rate {shared_rate}");
    assert!(unique_rate < 0.05, "unique prefix hit rate {unique_rate}");
    let (ttft_shared, ttft_unique) = (
        mean_delta(&m0, &m1, "vllm:time_to_first_token_seconds"),
        mean_delta(&m1, &m2, "vllm:time_to_first_token_seconds"),
    );
    assert!(ttft_shared < 0.6 * ttft_unique, "ttft shared {ttft_shared} vs unique {ttft_unique}");
    assert!(ml(&m2, "vllm:prompt_tokens_by_source_total", "source", "local_cache_hit") > 0.0);
    sim.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_exhaustion_preempts_and_recovers() {
    // speedup 50, not faster: the peak is sampled every 5 ms, and with other test binaries
    // on the same cores a faster run could end before a sample caught it (seen at 200: 0.797)
    let sim =
        start(flotilla_sim::SimArgs { num_gpu_blocks: Some(64), max_model_len: 512, speedup: 50.0, ..args() }).await;
    let a = sim.local_addr();
    // 8 requests growing to ~100 + 200 tokens each need ~150 blocks; the pool has 64
    let tasks: Vec<_> =
        (0..8).map(|i| tokio::spawn(async move { complete(a, "demo", &text(80, i), 200).await })).collect();
    let mut peak_usage: f64 = 0.0;
    while !tasks.iter().all(|t| t.is_finished()) {
        peak_usage = peak_usage.max(m(&metrics(a).await, "vllm:kv_cache_usage_perc"));
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["usage"]["completion_tokens"], 200);
    }
    wait_idle(a).await;
    let mm = metrics(a).await;
    assert!(m(&mm, "vllm:num_preemptions_total") > 0.0, "no preemption with 64 blocks");
    assert!(peak_usage > 0.8, "peak KV usage {peak_usage}");
    assert_eq!(m(&mm, "vllm:kv_cache_usage_perc"), 0.0, "blocks leak after recovery");
    assert_eq!(ml(&mm, "vllm:request_success_total", "finished_reason", "length"), 8.0);
    // and the engine still serves
    assert_eq!(complete(a, "demo", "after the storm", 4).await.status, 200);
    sim.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_is_404_before_load_and_served_after() {
    let sim = start(args()).await;
    let a = sim.local_addr();
    let r = complete(a, "sql-lora", "select", 4).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["type"], "NotFoundError");
    let r =
        post(a, "/v1/load_lora_adapter", json!({"lora_name": "sql-lora", "lora_path": "sim://sql-lora?rank=8"})).await;
    assert_eq!((r.status, r.body.as_str()), (200, "Success: LoRA adapter 'sql-lora' added successfully."));
    assert_eq!(
        post(a, "/v1/load_lora_adapter", json!({"lora_name": "sql-lora", "lora_path": "sim://x"})).await.status,
        400
    );
    assert_eq!(
        post(a, "/v1/load_lora_adapter", json!({"lora_name": "other", "lora_path": "/no/such/dir"})).await.status,
        404
    );
    let r = complete(a, "sql-lora", "select", 4).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["model"], "sql-lora");
    let models = get(a, "/v1/models").await.json();
    let ids: Vec<_> =
        models["data"].as_array().unwrap().iter().map(|m| (m["id"].clone(), m["parent"].clone())).collect();
    assert_eq!(ids, vec![(json!("demo"), json!(null)), (json!("sql-lora"), json!("demo"))]);
    assert_eq!(post(a, "/v1/unload_lora_adapter", json!({"lora_name": "sql-lora"})).await.status, 200);
    assert_eq!(post(a, "/v1/unload_lora_adapter", json!({"lora_name": "sql-lora"})).await.status, 404);
    assert_eq!(complete(a, "sql-lora", "select", 4).await.status, 404);
    sim.shutdown().await.unwrap();
}

/// `--lora-modules` (static multi-LoRA): every adapter is loaded before the API answers,
/// in both of vLLM's forms, listed and servable at once; a bad module stops the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_modules_are_loaded_before_the_api_answers() {
    let modules = vec!["sql=sim://sql?rank=8".to_string(), r#"{"name": "chat", "path": "sim://chat"}"#.to_string()];
    let sim =
        start(flotilla_sim::SimArgs { enable_lora: true, max_cpu_loras: Some(4), lora_modules: modules, ..args() })
            .await;
    let a = sim.local_addr();
    let models = get(a, "/v1/models").await.json();
    let ids: Vec<_> = models["data"].as_array().unwrap().iter().map(|m| m["id"].clone()).collect();
    assert_eq!(ids, vec![json!("demo"), json!("sql"), json!("chat")]);
    for name in ["sql", "chat"] {
        let r = complete(a, name, "select", 4).await;
        assert_eq!((r.status, r.json()["model"].clone()), (200, json!(name)), "{}", r.body);
    }
    sim.shutdown().await.unwrap();
    for (bad, why) in [
        (vec!["x=/no/such/dir".to_string()], "No adapter found"),
        (vec!["x".to_string()], "NAME=PATH"),
        (vec!["x=sim://a".to_string(), "x=sim://b".to_string()], "twice"),
        (vec!["big=sim://big?rank=64".to_string()], "rank"),
    ] {
        let Err(e) =
            flotilla_sim::start(flotilla_sim::SimArgs { enable_lora: true, lora_modules: bad, ..args() }).await
        else {
            panic!("a bad module stops the start");
        };
        let e = e.to_string();
        assert!(e.contains("lora-modules") && e.contains(why), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_adapters_than_max_loras_queue_rather_than_fail() {
    let sim = start(flotilla_sim::SimArgs { max_loras: 1, speedup: 20.0, ..args() }).await;
    let a = sim.local_addr();
    for name in ["a1", "a2", "a3"] {
        assert_eq!(
            post(a, "/v1/load_lora_adapter", json!({"lora_name": name, "lora_path": format!("sim://{name}")}))
                .await
                .status,
            200
        );
    }
    let tasks: Vec<_> = ["a1", "a2", "a3"]
        .into_iter()
        .map(|n| tokio::spawn(async move { complete(a, n, "hello adapters", 40).await }))
        .collect();
    let mut max_deferred: f64 = 0.0;
    let mut max_running: f64 = 0.0;
    let mut lora_info_seen = false;
    while !tasks.iter().all(|t| t.is_finished()) {
        let mm = metrics(a).await;
        max_deferred = max_deferred.max(ml(&mm, "vllm:num_requests_waiting_by_reason", "reason", "deferred"));
        max_running = max_running.max(m(&mm, "vllm:num_requests_running"));
        lora_info_seen |=
            mm.keys().any(|k| k.starts_with("vllm:lora_requests_info{max_lora=\"1\",running_lora_adapters=\"a"));
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert!(max_deferred >= 1.0, "no request waited for a LoRA slot");
    assert_eq!(max_running, 1.0, "one slot means one adapter's requests at a time");
    assert!(lora_info_seen, "vllm:lora_requests_info never named a running adapter");
    sim.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_consistently_with_requests_served() {
    let sim = start(args()).await;
    let a = sim.local_addr();
    let m0 = metrics(a).await;
    let tasks: Vec<_> = (0..10)
        .map(|i| tokio::spawn(async move { complete(a, "demo", &text(20 + i as usize, i), 12).await }))
        .collect();
    let mut prompt_tokens = 0.0;
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        let u = &r.json()["usage"];
        assert_eq!(u["completion_tokens"], 12);
        prompt_tokens += u["prompt_tokens"].as_f64().unwrap();
    }
    let m1 = metrics(a).await;
    let d = |name: &str| m(&m1, name) - m(&m0, name);
    assert_eq!(ml(&m1, "vllm:request_success_total", "finished_reason", "length"), 10.0);
    assert_eq!(d("vllm:generation_tokens_total"), 120.0);
    assert_eq!(d("vllm:prompt_tokens_total"), prompt_tokens);
    assert_eq!(d("vllm:time_to_first_token_seconds_count"), 10.0);
    assert_eq!(d("vllm:e2e_request_latency_seconds_count"), 10.0);
    assert_eq!(d("vllm:inter_token_latency_seconds_count"), 110.0);
    assert_eq!(d("vllm:request_generation_tokens_sum"), 120.0);
    assert_eq!(m(&m1, "vllm:num_requests_running"), 0.0);
    assert_eq!(m(&m1, "vllm:num_requests_waiting"), 0.0);
    assert!(
        mean_delta(&m0, &m1, "vllm:e2e_request_latency_seconds")
            > mean_delta(&m0, &m1, "vllm:time_to_first_token_seconds")
    );
    sim.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_same_text_and_stop_strings_end_with_stop() {
    let sim = start(args()).await;
    let a = sim.local_addr();
    let body = json!({"model": "demo", "prompt": "tell me", "max_tokens": 20, "seed": 42, "ignore_eos": true});
    let t1 = post(a, "/v1/completions", body.clone()).await.json()["choices"][0]["text"].clone();
    let t2 = post(a, "/v1/completions", body).await.json()["choices"][0]["text"].clone();
    assert_eq!(t1, t2);
    let t3 = post(
        a,
        "/v1/completions",
        json!({"model": "demo", "prompt": "tell me", "max_tokens": 20, "seed": 43, "ignore_eos": true}),
    )
    .await
    .json();
    assert_ne!(t1, t3["choices"][0]["text"]);
    // stop on the third word of the seeded text
    let words: Vec<&str> = t1.as_str().unwrap().split_inclusive(' ').collect();
    let stop = words[3].trim().to_string();
    let r = post(a, "/v1/completions", json!({"model": "demo", "prompt": "tell me", "max_tokens": 20, "seed": 42, "ignore_eos": true, "stop": [stop.clone()]})).await.json();
    assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");
    assert_eq!(r["choices"][0]["stop_reason"], stop.as_str(), "vLLM names the stop string: {r}");
    assert!(!r["choices"][0]["text"].as_str().unwrap().contains(&stop));
    // streamed: the finish chunk names it too, and carries the fingerprint as no usage chunk follows
    let body = json!({"model": "demo", "prompt": "tell me", "max_tokens": 20, "seed": 42, "ignore_eos": true, "stop": [stop.clone()], "stream": true});
    let events = post(a, "/v1/completions", body).await.sse();
    let last: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(
        (&last["choices"][0]["finish_reason"], &last["choices"][0]["stop_reason"]),
        (&json!("stop"), &json!(stop))
    );
    assert!(last["system_fingerprint"].is_string(), "{last}");
    assert!(last["choices"][0].as_object().unwrap().contains_key("prompt_token_ids"), "{last}");
    sim.shutdown().await.unwrap();
}

/// `POST /tokenize` (vLLM's tokenizer endpoint, which vllm-router's `cache_aware` calls)
/// gives the same token count the engine charges for the prompt, for text and chat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_agrees_with_prompt_tokens() {
    let sim = start(args()).await;
    let a = sim.local_addr();
    let prompt = text(40, 7);
    let t = post(a, "/tokenize", json!({"model": "demo", "prompt": prompt})).await;
    assert_eq!(t.status, 200, "{}", t.body);
    let t = t.json();
    let tokens = t["tokens"].as_array().unwrap();
    assert_eq!(t["count"], tokens.len());
    assert_eq!(t["max_model_len"], 8192);
    let r = complete(a, "demo", &prompt, 2).await;
    assert_eq!(r.json()["usage"]["prompt_tokens"], tokens.len());
    assert_eq!(post(a, "/tokenize", json!({"prompt": prompt})).await.json()["tokens"], t["tokens"], "same ids again");

    let messages = json!([{"role": "user", "content": "hello there"}]);
    let t = post(a, "/tokenize", json!({"model": "demo", "messages": messages})).await;
    assert_eq!(t.status, 200, "{}", t.body);
    let r = post(a, "/v1/chat/completions", json!({"model": "demo", "messages": messages, "max_tokens": 2})).await;
    assert_eq!(r.json()["usage"]["prompt_tokens"], t.json()["count"]);

    assert_eq!(post(a, "/tokenize", json!({"model": "demo"})).await.status, 400);
    assert_eq!(post(a, "/tokenize", json!({"model": "nope", "prompt": "x"})).await.status, 404);
    sim.shutdown().await.unwrap();
}

/// `POST /detokenize` inverts `/tokenize` (a prefix of the ids gives a prefix of the text:
/// what `vllm bench serve` does to align its prompts to the server's tokenizer), decodes
/// ids it never produced (as vLLM decodes any id below its vocabulary size) and names an
/// id out of range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detokenize_inverts_tokenize() {
    let sim = start(args()).await;
    let a = sim.local_addr();
    let prompt = "Routing 1500 requests across internationalization layers!\n\nDone.";
    let t = post(a, "/tokenize", json!({"model": "demo", "prompt": prompt, "return_token_strs": true})).await.json();
    let strs: Vec<String> = serde_json::from_value(t["token_strs"].clone()).unwrap();
    assert_eq!(strs.concat(), format!("<|begin_of_text|>{prompt}"), "vLLM's default adds the BOS token");
    let body = json!({"model": "demo", "prompt": prompt, "return_token_strs": true, "add_special_tokens": false});
    let t = post(a, "/tokenize", body).await.json();
    let strs: Vec<String> = serde_json::from_value(t["token_strs"].clone()).unwrap();
    assert_eq!(strs.concat(), prompt, "token_strs concatenate to the prompt");
    let ids = t["tokens"].as_array().unwrap().clone();
    let d = post(a, "/detokenize", json!({"model": "demo", "tokens": ids})).await;
    assert_eq!(d.status, 200, "{}", d.body);
    assert_eq!(d.json()["prompt"], prompt);
    let d = post(a, "/detokenize", json!({"tokens": ids[..3]})).await.json();
    assert_eq!(d["prompt"], strs[..3].concat());
    assert!(prompt.starts_with(d["prompt"].as_str().unwrap()));

    // an id it never produced decodes too (vLLM decodes any id below its vocabulary size)
    let d = post(a, "/detokenize", json!({"tokens": [17, 4242]})).await;
    assert_eq!(d.status, 200, "{}", d.body);
    let bad = post(a, "/detokenize", json!({"tokens": [128_256]})).await;
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("128256"), "{}", bad.body);
    let t = post(a, "/tokenize", json!({"prompt": 5})).await;
    assert_eq!(t.status, 400, "{}", t.body);
    assert_eq!(post(a, "/detokenize", json!({"model": "demo"})).await.status, 400, "tokens is required");
    assert_eq!(post(a, "/detokenize", json!({"model": "nope", "tokens": [1]})).await.status, 404);
    sim.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_loads_take_time_and_an_evicted_adapter_is_reloaded_not_refused() {
    let sim = start(flotilla_sim::SimArgs { max_loras: 1, max_cpu_loras: Some(1), speedup: 10.0, ..args() }).await;
    let a = sim.local_addr();
    // a100, rank 16 (80 MiB): 20 ms + 80 MiB / 2 GB/s from disk, + 80 MiB / 20 GB/s to the GPU
    let load_s = 0.020 + 83_886_080.0 / 2e9 + 83_886_080.0 / 20e9;
    let t0 = tokio::time::Instant::now();
    let r = post(a, "/v1/load_lora_adapter", json!({"lora_name": "a", "lora_path": "sim://a"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(t0.elapsed().as_secs_f64() >= load_s / 10.0, "answered before the load's simulated time");
    let r = post(a, "/v1/load_lora_adapter", json!({"lora_name": "b", "lora_path": "sim://b"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let names: Vec<_> = get(a, "/v1/models").await.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["demo", "a", "b"], "registered adapters stay listed beyond --max-cpu-loras");
    let before = metrics(a).await;
    let r = complete(a, "a", "evicted from the cpu cache by b", 2).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ttft = mean_delta(&before, &metrics(a).await, "vllm:time_to_first_token_seconds");
    assert!(ttft >= load_s, "ttft {ttft} does not include the {load_s} s reload");
    sim.shutdown().await.unwrap();
}
