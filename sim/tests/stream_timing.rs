//! The timing of a chat stream's chunks, as a client that times the first chunk sees it. vLLM
//! sends the role chunk (`delta: {role: "assistant", content: ""}`) together with the first
//! generated token, after prefill (measured on the CPU vLLM: both at 408 ms cold, 55 ms warm);
//! a sim that sent it on arrival looked 10–50× faster to first token to `vllm bench serve`.

mod common;

use common::*;
use flotilla_testkit::sse_timeline::{first, record, Chunk};
use serde_json::json;
use tokio::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_role_chunk_comes_with_the_first_token_after_prefill() {
    let sim = start(flotilla_sim::SimArgs { speedup: 1.0, ..args() }).await;
    let a = sim.local_addr();
    let before = metrics(a).await;
    let body = json!({"model": "demo", "messages": [{"role": "user", "content": text(1500, 11)}], "max_tokens": 4, "stream": true});
    let timeline = record(&a.to_string(), "/v1/chat/completions", &body.to_string()).await;
    let role = first(&timeline, Chunk::Role).expect("a role chunk");
    let token = first(&timeline, Chunk::Token).expect("a first token");
    let ttft = mean_delta(&before, &metrics(a).await, "vllm:time_to_first_token_seconds");
    assert!(ttft > 0.01, "a 1,500-word prompt should take a measurable prefill on the a100 profile: {ttft} s");
    assert!(
        role.as_secs_f64() >= ttft * 0.9,
        "the role chunk arrived after {role:?}, before the modelled first token ({ttft:.3} s)"
    );
    assert!(token.saturating_sub(role) <= Duration::from_millis(5), "role at {role:?}, first token at {token:?}");
    sim.shutdown().await.unwrap();
}
