//! Model downloads into the content-addressed cache: file:// linked or copied, http:// resumed
//! after a cut connection, sha256 verified, cached on the second fetch, and a failed
//! download failing the engine with a clear reason.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use flotilla_agent::download::{s3::S3Config, Downloader};
use flotilla_agent::http::HttpClient;
use flotilla_agent::source_policy::{Context, Policy};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A tiny HTTP/1.1 file server: serves `blob` at any path, honours `Range: bytes=N-`, and
/// cuts the first `cuts` full responses halfway.
struct BlobServer {
    addr: std::net::SocketAddr,
    requests: Arc<AtomicUsize>,
    ranges: Arc<Mutex<Vec<String>>>,
}

async fn blob_server(blob: Vec<u8>, cuts: usize) -> BlobServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let blob = Arc::new(blob);
    let cuts = Arc::new(AtomicUsize::new(cuts));
    let (req_count, seen_ranges) = (requests.clone(), ranges.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (blob, cuts, req_count, seen_ranges) =
                (blob.clone(), cuts.clone(), req_count.clone(), seen_ranges.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut n = 0;
                while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => n += k,
                    }
                }
                req_count.fetch_add(1, Ordering::SeqCst);
                let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
                let start: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("range: bytes="))
                    .and_then(|r| r.trim().trim_end_matches('-').parse().ok())
                    .unwrap_or(0);
                if start > 0 {
                    seen_ranges.lock().unwrap().push(format!("bytes={start}-"));
                }
                let len = blob.len();
                let header = if start > 0 {
                    format!("HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{len}\r\nConnection: close\r\n\r\n", len - start, len - 1)
                } else {
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
                };
                let _ = s.write_all(header.as_bytes()).await;
                let body = &blob[start..];
                let cut =
                    start == 0 && cuts.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1)).is_ok();
                let send = if cut { &body[..body.len() / 2] } else { body };
                let _ = s.write_all(send).await;
                let _ = s.flush().await;
                // Dropping the socket closes it (mid-body when cut).
            });
        }
    });
    BlobServer { addr, requests, ranges }
}

fn downloader(root: PathBuf) -> Downloader {
    let s3 = S3Config {
        endpoint: "http://127.0.0.1:1".into(),
        region: "us-east-1".into(),
        access_key: String::new(),
        secret_key: String::new(),
        session_token: None,
    };
    // The defaults of an agent on loopback: http and loopback hosts allowed.
    let ctx = Context { loopback: true, ..Context::default() };
    Downloader::new(root, HttpClient::new().unwrap(), "http://127.0.0.1:1", s3, Policy::defaults(&ctx))
}

fn blob(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[tokio::test]
async fn file_sources_are_brought_into_the_cache_and_refreshed_when_changed() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-llama");
    std::fs::create_dir_all(model.join("sub")).unwrap();
    std::fs::write(model.join("config.json"), b"{}").unwrap();
    std::fs::write(model.join("sub/model.safetensors"), b"weights").unwrap();
    let d = downloader(dir.path().join("models"));
    let source = format!("file://{}", model.display());
    let got = d.fetch(&source, &|_| {}).await.unwrap();
    assert!(got.starts_with(dir.path().join("models")), "{}", got.display());
    assert_eq!(std::fs::read(got.join("sub/model.safetensors")).unwrap(), b"weights");
    assert_eq!(d.fetch(&source, &|_| {}).await.unwrap(), got, "cached");

    // Changed in place (a bigger file): fetched again, never served stale.
    std::fs::remove_file(model.join("sub/model.safetensors")).unwrap();
    std::fs::write(model.join("sub/model.safetensors"), b"new weights").unwrap();
    let again = d.fetch(&source, &|_| {}).await.unwrap();
    assert_eq!(std::fs::read(again.join("sub/model.safetensors")).unwrap(), b"new weights");

    // A single file, with a checksum.
    let file = dir.path().join("m.gguf");
    std::fs::write(&file, b"gguf").unwrap();
    let sha = hex::encode(Sha256::digest(b"gguf"));
    let one = d.fetch(&format!("file://{}#sha256={sha}", file.display()), &|_| {}).await.unwrap();
    assert_eq!(one.file_name().unwrap(), "m.gguf");
    let bad = d.fetch(&format!("file://{}#sha256={}", file.display(), "0".repeat(64)), &|_| {}).await.unwrap_err();
    assert!(bad.contains("sha256 mismatch"), "{bad}");

    let err = d.fetch("file:///definitely/not/here", &|_| {}).await.unwrap_err();
    assert!(err.contains("/definitely/not/here"), "{err}");
}

#[tokio::test]
async fn http_download_resumes_after_a_cut_connection_and_verifies_sha256() {
    let data = blob(300_000);
    let sha = hex::encode(Sha256::digest(&data));
    let server = blob_server(data.clone(), 1).await;
    let dir = tempfile::tempdir().unwrap();
    let d = downloader(dir.path().join("models"));
    let progress = Arc::new(Mutex::new(Vec::<f64>::new()));
    let p = progress.clone();
    let url = format!("http://{}/org/model.gguf#sha256={sha}", server.addr);
    let path =
        tokio::time::timeout(Duration::from_secs(30), d.fetch(&url, &move |f| p.lock().unwrap().push(f.fraction)))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(path.file_name().unwrap(), "model.gguf");
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert_eq!(server.ranges.lock().unwrap().as_slice(), &["bytes=150000-".to_string()], "resumed from the cut");
    let prog = progress.lock().unwrap().clone();
    assert!(prog.iter().any(|f| *f > 0.0 && *f < 1.0) && prog.last() == Some(&1.0), "{prog:?}");
    assert!(!dir.path().join("models").join(format!("{}.partial", Downloader::key(&url))).exists());

    // Cached: a second fetch asks the server nothing.
    let before = server.requests.load(Ordering::SeqCst);
    assert_eq!(d.fetch(&url, &|_| {}).await.unwrap(), path);
    assert_eq!(server.requests.load(Ordering::SeqCst), before);
}

#[tokio::test]
async fn sha256_mismatch_fails_and_is_never_cached() {
    let server = blob_server(blob(10_000), 0).await;
    let dir = tempfile::tempdir().unwrap();
    let d = downloader(dir.path().join("models"));
    let url = format!("http://{}/m.bin#sha256={}", server.addr, "0".repeat(64));
    let err = d.fetch(&url, &|_| {}).await.unwrap_err();
    assert!(err.contains("sha256 mismatch"), "{err}");
    let key = Downloader::key(&url);
    assert!(!dir.path().join("models").join(format!("{key}.json")).exists());
    assert!(!dir.path().join("models").join(&key).exists());
    let err = d.fetch(&format!("http://{}/m.bin#md5=00", server.addr), &|_| {}).await.unwrap_err();
    assert!(err.contains("sha256="), "{err}");
}

/// The vLLM driver end to end, with the simulator standing in for `vllm serve` through the
/// command template: a model downloaded over HTTP, then a corrupt one failing the replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_engine_downloads_then_starts_and_a_corrupt_download_fails_the_replica() {
    let data = blob(50_000);
    let server = blob_server(data.clone(), 0).await;
    let fake = FakeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (bin, sub) = sim_binary();
    // The sim ignores {source}; we check the path it was given through the log.
    let template = format!(
        "{} {sub} --host {{host}} --port {{port}} --model {{model}} --speedup 50 --seed 0 {{args}}",
        bin.display()
    );
    let args = agent_args(&[fake.addr], dir.path(), "node-vllm", &["--vllm-command", &template]);
    let agent = TestAgent::start(args).await;
    let good = flotilla_api::pb::ReplicaAssignment {
        engine_image: Default::default(),
        traceparent: String::new(),
        gang: None,
        kv_transfer: None,
        replica: "v-0".into(),
        model: "tiny".into(),
        engine: "vllm".into(),
        source: format!("http://{}/tiny.bin#sha256={}", server.addr, hex::encode(Sha256::digest(&data))),
        engine_args: vec![],
        gpus: vec![],
        adapters: vec![],
    };
    let corrupt = flotilla_api::pb::ReplicaAssignment {
        replica: "v-1".into(),
        source: format!("http://{}/other.bin#sha256={}", server.addr, "1".repeat(64)),
        ..good.clone()
    };
    fake.assign(vec![good, corrupt]);
    let failed = eventually(30, "corrupt download fails v-1", || {
        let _ = agent.reports();
        fake.engines().into_iter().find(|e| e.replica == "v-1" && e.state == "failed")
    })
    .await;
    assert!(failed.reason.contains("download") && failed.reason.contains("sha256 mismatch"), "{}", failed.reason);
    let ready = eventually(30, "v-0 ready", || {
        let _ = agent.reports();
        fake.engines().into_iter().find(|e| e.replica == "v-0" && e.state == "ready")
    })
    .await;
    assert_eq!(ready.download_progress, 1.0);
    assert_eq!((ready.download_bytes, ready.download_total_bytes), (50_000, 50_000), "bytes reported");
    let (status, body) = http_request_with_key(&ready.endpoint, "GET", "/v1/models", "", &ready.api_key).await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("tiny"), "{body}");
    let (status, _) = http_get(&ready.endpoint, "/v1/models").await.unwrap();
    assert_eq!(status, 401, "the vLLM driver's engine got its key through VLLM_API_KEY");
    drop(agent);
}

#[tokio::test]
async fn cache_usage_counts_finished_models_and_each_file_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = downloader(dir.path().join("models"));
    assert_eq!(d.usage(), Default::default(), "no cache directory yet");
    let model = dir.path().join("m");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("config.json"), b"{}").unwrap();
    std::fs::write(model.join("weights.bin"), vec![7u8; 10_000]).unwrap();
    let got = d.fetch(&format!("file://{}", model.display()), &|_| {}).await.unwrap();
    let usage = d.usage();
    assert_eq!(usage.models, 1);
    assert!((10_002..10_002 + 4096).contains(&usage.bytes), "the files and the marker: {usage:?}");
    // A second name for the same file adds nothing (file:// sources are hard-linked in).
    std::fs::hard_link(got.join("weights.bin"), got.join("again.bin")).unwrap();
    assert_eq!(d.usage(), usage);
    // A partial download counts its bytes but is no model.
    let partial = dir.path().join("models/abc.partial");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("part"), vec![1u8; 500]).unwrap();
    assert_eq!(d.usage().models, 1);
    assert_eq!(d.usage().bytes, usage.bytes + 500);
}
