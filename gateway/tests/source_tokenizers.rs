//! Tokenizers from Models' own sources, and the `auto` routing default: a cluster Model with
//! no `routing` and no `--tokenizer` gets its tokenizer through the gateway's fetcher (here a
//! fake handing out the tiny model's files; the real one, the agent's downloader, is tested
//! in agent/tests/source_policy.rs and cli/tests), is routed least-request until its engines'
//! KV events arrive, then kv-aware with the fetched tokenizer's token ids. A source that
//! cannot be fetched leaves the model keyed approximately, served, and counted.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use flotilla_gateway::source_tokenizers::{Fetch, FetchTokenizer, TokenizerFetcher};
use serde_json::json;

const EVENTS: &str = r#"{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:0",
    "replay_endpoint": "tcp://*:0", "topic": "kv"}"#;

fn tiny_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-llama-tokenizer")
}

/// Hands out the tiny model's tokenizer for `hf://org/tiny` and fails every other source.
struct FakeFetcher {
    calls: Arc<AtomicUsize>,
}

impl FetchTokenizer for FakeFetcher {
    fn fetch(&self, source: String) -> Fetch {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            match source.as_str() {
                "hf://org/tiny" => Ok(tiny_dir()),
                other => Err(format!("{other}: server answered 404 Not Found")),
            }
        })
    }
    fn shown(&self, source: &str) -> String {
        source.to_string()
    }
}

fn args(cp: std::net::SocketAddr, calls: &Arc<AtomicUsize>) -> flotilla_gateway::GatewayArgs {
    let mut a = cluster_gw_args(cp);
    a.tokenizer_fetcher = Some(TokenizerFetcher(Arc::new(FakeFetcher { calls: calls.clone() })));
    a
}

async fn metric_line(gw: std::net::SocketAddr, want: &str) -> bool {
    for _ in 0..100 {
        if get(gw, "/metrics").await.text().contains(want) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A chat completion asking for the routing's explanation.
async fn explained(gw: std::net::SocketAddr, text: &str) -> String {
    for _ in 0..100 {
        let r = post(
            gw,
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 2}),
            &[("x-flotilla-explain-route", "true")],
        )
        .await;
        if r.status == 200 {
            return r.header("x-flotilla-route").expect("x-flotilla-route");
        }
        assert_eq!(r.status, 503, "{}", r.text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetched_tokenizer_keys_prompts_and_auto_turns_kv_aware_once_engines_publish() {
    let mut sims = Vec::new();
    for _ in 0..2 {
        let a = flotilla_sim::SimArgs { kv_events_config: Some(EVENTS.into()), ..sim_args(20.0) };
        sims.push(flotilla_sim::start(a).await.expect("sim starts"));
    }
    let cp = common::fake_cp::FakeCp::new(None);
    // no routing: auto; a vLLM engine: no built-in tokenizer
    cp.put("Model", MODEL, json!({"source": "hf://org/tiny", "engine": "vllm"}));
    cp.set_endpoints(&[(MODEL, sims[0].local_addr()), (MODEL, sims[1].local_addr())]);
    let (cp_addr, stop) = cp.clone().serve().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let gw = gateway(args(cp_addr, &calls)).await;
    let a = gw.local_addr();
    assert!(
        metric_line(a, &format!("flotilla_gateway_kv_token_exact{{model=\"{MODEL}\"}} 1")).await,
        "the tokenizer was fetched and loaded"
    );
    assert!(metric_line(a, "flotilla_gateway_tokenizer_fetches_total{result=\"ok\"} 1").await);
    // the engines have published nothing yet: least-request
    let first = explained(a, "hello there").await;
    assert_eq!(first, "least-request", "auto before any KV event");
    // their events arrive: kv-aware, keyed with the fetched tokenizer's ids
    let text = "the same long prompt ".repeat(20);
    let mut x = String::new();
    for _ in 0..100 {
        x = explained(a, &text).await;
        if x.starts_with("kv-aware") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tok = flotilla_gateway::hf_tokenizer::HfTokenizer::load(&tiny_dir()).unwrap();
    let ids = tok.encode_chat(&[("user".to_string(), text.clone())]).unwrap();
    assert!(x.starts_with(&format!("kv-aware tokens={} ", ids.len())), "{x}");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "fetched once");
    gw.shutdown().await;
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_cannot_be_fetched_leaves_the_model_served_and_keyed_approximately() {
    let sim = flotilla_sim::start(sim_args(20.0)).await.expect("sim starts");
    let cp = common::fake_cp::FakeCp::new(None);
    cp.put("Model", MODEL, json!({"source": "hf://org/gone", "engine": "vllm", "routing": "kv-aware"}));
    cp.set_endpoints(&[(MODEL, sim.local_addr())]);
    let (cp_addr, stop) = cp.clone().serve().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let gw = gateway(args(cp_addr, &calls)).await;
    let a = gw.local_addr();
    assert!(metric_line(a, "flotilla_gateway_tokenizer_fetches_total{result=\"error\"} 1").await);
    assert!(metric_line(a, &format!("flotilla_gateway_kv_token_exact{{model=\"{MODEL}\"}} 0")).await);
    let x = explained(a, "hello").await;
    assert!(x.starts_with("prefix-cache"), "kv-aware without token ids: {x}");
    // not asked again before its backoff
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    gw.shutdown().await;
    let _ = stop.send(());
}
