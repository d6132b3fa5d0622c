//! Prefill/decode disaggregation (`--kv-transfer-config`): two in-process sims on free
//! ports, a prefill sim holding KV under a lease and a decode sim pulling it over the
//! side channel, as vLLM's toy P/D proxy drives two NixlConnector engines.

mod common;

use std::time::Duration;

use common::*;
use flotilla_sim::side_channel::{self, PullError};
use flotilla_sim::SimArgs;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

/// Llama-3-8B's KV bytes per token (every profile's model).
const KV_BYTES: f64 = 131_072.0;

fn pd_args(role: &str, engine_id: &str, extra: &str) -> SimArgs {
    SimArgs {
        // L4: a slow prefill (190 us a token) against a 100 Gb/s link
        profile: "l4-llama3-8b".into(),
        kv_transfer_config: Some(format!(
            r#"{{"kv_connector":"NixlConnector","kv_role":"{role}","engine_id":"{engine_id}"{extra}}}"#
        )),
        kv_side_channel_host: Some("127.0.0.1".into()),
        kv_side_channel_port: 0,
        ..args()
    }
}

/// The proxy's prefill request: the client's request with max_tokens 1, stream false.
async fn prefill(p: std::net::SocketAddr, prompt: &str) -> Value {
    let r = post(
        p,
        "/v1/completions",
        json!({"model": "demo", "prompt": prompt, "max_tokens": 1, "stream": false,
               "kv_transfer_params": {"do_remote_decode": true, "do_remote_prefill": false,
                 "remote_engine_id": null, "remote_block_ids": null, "remote_host": null, "remote_port": null}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn decode_body(prompt: &str, params: &Value, stream: bool) -> Value {
    json!({"model": "demo", "prompt": prompt, "max_tokens": 5, "ignore_eos": true, "stream": stream,
           "kv_transfer_params": params})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_sim_pulls_the_prefill_sims_kv_instead_of_recomputing_it() {
    let psim = start(pd_args("kv_producer", "p0", "")).await;
    let dsim = start(pd_args("kv_consumer", "d0", "")).await;
    let (p, d) = (psim.local_addr(), dsim.local_addr());
    let side = psim.side_channel_addr().expect("a side channel");
    assert_ne!(side.port(), 0);

    let prompt = text(1500, 1);
    let pre = prefill(p, &prompt).await;
    let params = &pre["kv_transfer_params"];
    let prompt_tokens = pre["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 1000, "{prompt_tokens}");
    let keys: Vec<&str> = params.as_object().expect("kv_transfer_params").keys().map(String::as_str).collect();
    for k in [
        "do_remote_prefill",
        "do_remote_decode",
        "remote_block_ids",
        "remote_engine_id",
        "remote_request_id",
        "remote_host",
        "remote_port",
        "tp_size",
        "remote_num_tokens",
    ] {
        assert!(keys.contains(&k), "{k} missing from {params}");
    }
    assert_eq!(params["do_remote_prefill"], true);
    assert_eq!(params["do_remote_decode"], false);
    assert_eq!(params["remote_engine_id"], "p0");
    assert_eq!(params["remote_request_id"], pre["id"]);
    assert_eq!(params["remote_host"], "127.0.0.1");
    assert_eq!(params["remote_port"], side.port());
    assert_eq!(params["tp_size"], 1);
    assert_eq!(params["remote_num_tokens"], prompt_tokens);
    let blocks = params["remote_block_ids"][0].as_array().expect("one list per KV cache group");
    assert_eq!(blocks.len() as u64, prompt_tokens.div_ceil(16));
    // the held blocks occupy the prefill sim's cache
    let pm = metrics(p).await;
    assert!(m(&pm, "vllm:kv_cache_usage_perc") > 0.0, "held KV counts as used");

    // decode, streaming: the pulled KV is installed, only the last prompt token is computed
    let before = metrics(d).await;
    let r = post(d, "/v1/completions", decode_body(&prompt, params, true)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let chunks = r.sse();
    assert_eq!(chunks.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(chunks.len(), 6, "five tokens then [DONE]: {chunks:?}");
    let after = metrics(d).await;
    // (the last prompt token is computed again, but vLLM counts the whole prompt as pulled)
    let pulled = prompt_tokens;
    assert_eq!(m(&after, "vllm:external_prefix_cache_hits_total"), pulled as f64);
    assert_eq!(ml(&after, "vllm:prompt_tokens_by_source_total", "source", "external_kv_transfer"), pulled as f64);
    assert_eq!(ml(&after, "vllm:prompt_tokens_by_source_total", "source", "local_compute"), 0.0);
    assert_eq!(m(&after, "vllm:nixl_xfer_time_seconds_count"), 1.0);
    assert_eq!(m(&after, "vllm:nixl_bytes_transferred_sum"), prompt_tokens as f64 * KV_BYTES);
    assert_eq!(m(&after, "vllm:nixl_num_failed_transfers_total"), 0.0);
    let xfer = m(&after, "vllm:nixl_xfer_time_seconds_sum");
    let want = prompt_tokens as f64 * KV_BYTES * 8.0 / 100e9;
    assert!((xfer - want).abs() < 1e-9, "transfer time {xfer} != bytes / 100 Gb/s {want}");
    let pulled_ttft = mean_delta(&before, &after, "vllm:time_to_first_token_seconds");
    // the prefill sim freed the blocks once pulled
    assert_eq!(m(&metrics(p).await, "vllm:kv_cache_usage_perc"), 0.0);

    // the same prompt length prefilled locally on the decode sim takes far longer
    let before = metrics(d).await;
    let r = complete(d, "demo", &text(1500, 2), 5).await;
    assert_eq!(r.status, 200);
    let local_ttft = mean_delta(&before, &metrics(d).await, "vllm:time_to_first_token_seconds");
    assert!(pulled_ttft >= xfer, "TTFT {pulled_ttft} includes the transfer {xfer}");
    assert!(pulled_ttft * 3.0 < local_ttft, "pulled TTFT {pulled_ttft} vs local prefill {local_ttft}");

    // a second pull of the same blocks is refused, on the wire and for a request
    let ask = side_channel::Ask {
        engine_id: "p0".into(),
        request_id: params["remote_request_id"].as_str().unwrap().into(),
        block_ids: blocks.iter().map(|b| b.as_u64().unwrap() as u32).collect(),
    };
    match side_channel::pull("127.0.0.1", side.port(), &ask).await {
        Err(PullError::Refused { code, .. }) => assert_eq!(code, "already_pulled"),
        other => panic!("a second pull must be refused: {other:?}"),
    }
    let r = post(d, "/v1/completions", decode_body(&prompt, params, false)).await;
    assert_eq!(r.status, 500, "{}", r.body);
    assert_eq!(r.json()["error"]["type"], "InternalServerError");
    assert_eq!(m(&metrics(d).await, "vllm:nixl_num_failed_transfers_total"), 1.0);

    // chat, non-streaming, both legs
    let chat = |params: Value| {
        json!({"model": "demo", "messages": [{"role": "user", "content": text(300, 3)}], "max_tokens": 1,
               "kv_transfer_params": params})
    };
    let r = post(p, "/v1/chat/completions", chat(json!({"do_remote_decode": true}))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let params = r.json()["kv_transfer_params"].clone();
    assert!(params["remote_request_id"].as_str().unwrap().starts_with("chatcmpl-"), "{params}");
    let mut body = chat(params);
    body["max_tokens"] = json!(3);
    let r = post(d, "/v1/chat/completions", body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["usage"]["completion_tokens"], 3);
    assert_eq!(m(&metrics(d).await, "vllm:nixl_xfer_time_seconds_count"), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_fails_the_decode_or_recomputes_by_policy() {
    // 1 simulated second at speedup 50: 20 ms of wall time
    let psim = start(pd_args("kv_both", "p1", r#","kv_connector_extra_config":{"kv_lease_duration":1}"#)).await;
    let fail = start(pd_args("kv_both", "d1", "")).await;
    let recompute = start(pd_args("kv_both", "d2", r#","kv_load_failure_policy":"recompute""#)).await;
    let p = psim.local_addr();
    let prompt = text(400, 4);
    let pre = prefill(p, &prompt).await;
    let params = pre["kv_transfer_params"].clone();
    assert!(m(&metrics(p).await, "vllm:kv_cache_usage_perc") > 0.0);
    // the idle prefill sim frees the blocks by itself when the lease runs out
    let mut expired = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let pm = metrics(p).await;
        if m(&pm, "vllm:nixl_num_kv_expired_reqs_total") == 1.0 {
            assert_eq!(m(&pm, "vllm:kv_cache_usage_perc"), 0.0);
            expired = true;
            break;
        }
    }
    assert!(expired, "the lease never expired");

    let r = post(fail.local_addr(), "/v1/completions", decode_body(&prompt, &params, true)).await;
    assert_eq!(r.status, 500, "policy fail: an error before any body byte: {}", r.body);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("lease_expired"), "{}", r.body);
    assert_eq!(m(&metrics(fail.local_addr()).await, "vllm:nixl_num_failed_transfers_total"), 1.0);

    let r = post(recompute.local_addr(), "/v1/completions", decode_body(&prompt, &params, false)).await;
    assert_eq!(r.status, 200, "policy recompute: prefilled locally: {}", r.body);
    let dm = metrics(recompute.local_addr()).await;
    assert_eq!(m(&dm, "vllm:nixl_num_failed_transfers_total"), 1.0);
    assert_eq!(m(&dm, "vllm:external_prefix_cache_hits_total"), 0.0);
    assert_eq!(
        ml(&dm, "vllm:prompt_tokens_by_source_total", "source", "local_compute"),
        m(&dm, "vllm:prompt_tokens_total")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_side_channel_survives_garbage_and_refuses_strangers() {
    let psim = start(pd_args("kv_producer", "p2", "")).await;
    let port = psim.side_channel_addr().unwrap().port();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage garbage").await.unwrap();
    let answer = side_channel::read_frame(&mut s, side_channel::MAX_ANSWER_BYTES).await;
    let answer: Value = serde_json::from_slice(&answer.expect("an error answer")).unwrap();
    assert_eq!(answer["code"], "frame_too_large");
    for junk in [&b"\x00\x00\x00\x03}{]"[..], b"\x00\x00", b""] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(junk).await.unwrap();
        s.shutdown().await.unwrap();
        let _ = side_channel::read_frame(&mut s, side_channel::MAX_ANSWER_BYTES).await;
    }
    let pre = prefill(psim.local_addr(), &text(50, 5)).await;
    let ids: Vec<u32> = pre["kv_transfer_params"]["remote_block_ids"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap() as u32)
        .collect();
    let rid = pre["id"].as_str().unwrap().to_string();
    let ask = |engine: &str, id: &str, blocks: Vec<u32>| side_channel::Ask {
        engine_id: engine.into(),
        request_id: id.into(),
        block_ids: blocks,
    };
    let code = |r: Result<Vec<u32>, PullError>| match r {
        Err(PullError::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(
        code(side_channel::pull("127.0.0.1", port, &ask("other", &rid, ids.clone())).await),
        "engine_id_mismatch"
    );
    assert_eq!(
        code(side_channel::pull("127.0.0.1", port, &ask("p2", "cmpl-nope", ids.clone())).await),
        "unknown_request"
    );
    assert_eq!(code(side_channel::pull("127.0.0.1", port, &ask("p2", &rid, vec![9999])).await), "block_ids_mismatch");
    let tokens = side_channel::pull("127.0.0.1", port, &ask("p2", &rid, ids)).await.expect("the real ask succeeds");
    assert_eq!(tokens.len() as u64, pre["usage"]["prompt_tokens"].as_u64().unwrap());
    assert_eq!(get(psim.local_addr(), "/health").await.status, 200);
}

#[tokio::test]
async fn requests_without_a_connector_ignore_kv_transfer_params() {
    let sim = start(args()).await;
    let r = post(
        sim.local_addr(),
        "/v1/completions",
        json!({"model": "demo", "prompt": "hello", "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": true}}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["kv_transfer_params"], Value::Null);
    assert!(!get(sim.local_addr(), "/metrics").await.body.contains("nixl"));
}

#[test]
fn a_bad_kv_transfer_config_stops_the_binary_with_exit_code_2() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla-sim"))
        .args(["--port", "0", "--kv-transfer-config", r#"{"kv_connector":"NixlConnector"}"#])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--kv-transfer-config") && err.contains("kv_role"), "{err}");
}
