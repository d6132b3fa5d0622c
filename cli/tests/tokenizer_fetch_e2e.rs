//! The shipped gateway fetches a Model's tokenizer from the Model's own source: a server and
//! `flotilla gateway --tokenizer-cache DIR --source-policy FILE` (real processes, the agent's
//! downloader): a kv-aware Model whose `file://` source holds a tokenizer and weights gets
//! only the tokenizer files into the cache and is keyed with token ids
//! (`kv_token_exact` 1); a Model whose source the policy refuses stays keyed approximately
//! and the failed fetch is counted; `get model` says how each model's prompts are keyed.
mod common;

use std::time::Duration;

use common::*;
use flotilla_api::pb::object_service_client::ObjectServiceClient;
use flotilla_api::pb::ApplyRequest;
use tokio::time::Instant;

fn model(name: &str, source: &str) -> String {
    format!("kind: Model\nmetadata: {{name: {name}}}\nspec:\n  engine: vllm\n  source: {source}\n  routing: kv-aware\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_fetches_only_the_tokenizer_files_under_its_source_policy() {
    let dir = tempfile::tempdir().unwrap();
    // a model directory: the tiny model's tokenizer files and "weights"
    let allowed = dir.path().join("allowed");
    let src = allowed.join("tiny");
    std::fs::create_dir_all(&src).unwrap();
    let tiny = concat!(env!("CARGO_MANIFEST_DIR"), "/../gateway/tests/data/tiny-llama-tokenizer");
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
        std::fs::copy(format!("{tiny}/{f}"), src.join(f)).unwrap();
    }
    std::fs::write(src.join("model.safetensors"), vec![0u8; 1 << 20]).unwrap();
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::copy(src.join("tokenizer.json"), outside.join("tokenizer.json")).unwrap();
    let policy = dir.path().join("sources.yaml");
    std::fs::write(&policy, format!("schemes: [file]\npaths: {{file: [{}]}}\n", allowed.display())).unwrap();

    let server = ServerProc::start(1, &dir.path().join("s1"), "127.0.0.1:0", &["--bootstrap"]);
    wait_voters(&server.grpc, 1).await;
    let cache = dir.path().join("tokenizers");
    let gateway = GatewayProc::start(
        &server.grpc,
        &["--tokenizer-cache", cache.to_str().unwrap(), "--source-policy", policy.to_str().unwrap()],
    );
    let mut c = ObjectServiceClient::new(channel(&server.grpc, Duration::from_secs(5)));
    for (name, source) in [("tiny", src.display().to_string()), ("elsewhere", outside.display().to_string())] {
        let manifest = model(name, &format!("file://{source}"));
        c.apply(ApplyRequest { manifest, expected_revision: None }).await.unwrap();
    }

    let want = [
        "flotilla_gateway_kv_token_exact{model=\"tiny\"} 1",
        "flotilla_gateway_kv_token_exact{model=\"elsewhere\"} 0",
        "flotilla_gateway_tokenizer_fetches_total{result=\"ok\"} 1",
        "flotilla_gateway_tokenizer_fetches_total{result=\"error\"} 1",
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let addr = gateway.addr.clone();
        let m = tokio::task::spawn_blocking(move || {
            raw_http::send_blocking(&addr, "GET", "/metrics", "", Duration::from_secs(5)).unwrap_or_default()
        })
        .await
        .unwrap();
        if want.iter().all(|w| m.contains(w)) {
            break;
        }
        assert!(Instant::now() < deadline, "the gateway's tokenizer metrics never read {want:?}:\n{m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // only the tokenizer files were brought into the cache
    let mut cached: Vec<String> = Vec::new();
    for e in walk(&cache) {
        cached.push(e.file_name().unwrap().to_string_lossy().into_owned());
    }
    assert!(cached.contains(&"tokenizer.json".to_string()), "{cached:?}");
    assert!(!cached.contains(&"model.safetensors".to_string()), "the weights were fetched: {cached:?}");

    let out =
        std::process::Command::new(BIN).args(["--server", &server.grpc, "get", "model", "tiny"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Routing: kv-aware; prompts keyed with token ids from the source's tokenizer files"),
        "{text}"
    );
    drop(gateway);
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}
