//! The download source policy against real loopback HTTP servers: a redirect chain that
//! leaves the allowed hosts, goes to plain http or to a private address is refused before
//! the target is contacted; a source over the size cap (announced or not) is refused and
//! nothing of it is promoted into the cache; an allowed source downloads; a refused model
//! source fails its replica with the rule's name, once, and counts in the metric; the
//! download credentials appear in no error and no log line.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use flotilla_agent::download::{s3::S3Config, Downloader};
use flotilla_agent::http::HttpClient;
use flotilla_agent::source_policy::{Context, Policy, PolicyFile};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How a route of [`server`] answers.
#[derive(Clone)]
enum Answer {
    /// 302 to this Location.
    Redirect(String),
    /// 200 with these bytes and a Content-Length.
    Body(Vec<u8>),
    /// 200 with these bytes, no Content-Length (the body ends when the connection closes).
    Unsized(Vec<u8>),
}

/// A loopback HTTP/1.1 server answering `routes` by path (404 otherwise); counts requests
/// and keeps the request heads.
struct Server {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
}

async fn server(routes: Vec<(&str, Answer)>) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let routes: Arc<Vec<(String, Answer)>> = Arc::new(routes.into_iter().map(|(p, a)| (p.to_string(), a)).collect());
    let hits = Arc::new(AtomicUsize::new(0));
    let heads = Arc::new(Mutex::new(Vec::new()));
    let (h, hd) = (hits.clone(), heads.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (routes, h, hd) = (routes.clone(), h.clone(), hd.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut n = 0;
                while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => n += k,
                    }
                }
                h.fetch_add(1, Ordering::SeqCst);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                hd.lock().unwrap().push(head.clone());
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                let answer = routes.iter().find(|(p, _)| *p == path).map(|(_, a)| a.clone());
                let (head, body) = match answer {
                    Some(Answer::Redirect(to)) => {
                        (format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\n"), vec![])
                    }
                    Some(Answer::Body(b)) => (format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n", b.len()), b),
                    Some(Answer::Unsized(b)) => ("HTTP/1.1 200 OK\r\n".to_string(), b),
                    None => ("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n".to_string(), vec![]),
                };
                let _ = s.write_all(format!("{head}Connection: close\r\n\r\n").as_bytes()).await;
                let _ = s.write_all(&body).await;
                let _ = s.flush().await;
            });
        }
    });
    Server { addr, hits, heads }
}

fn downloader(root: PathBuf, hf_endpoint: &str, yaml: &str, loopback: bool) -> Downloader {
    let s3 = S3Config {
        endpoint: "http://127.0.0.1:1".into(),
        region: "us-east-1".into(),
        access_key: "AKIDTEST".into(),
        secret_key: "s3-secret-never-shown".into(),
        session_token: None,
    };
    let ctx = Context {
        loopback,
        endpoints: vec![Context::endpoint(hf_endpoint).unwrap(), Context::endpoint(&s3.endpoint).unwrap()],
        data_dir: None,
    };
    let policy = Policy::new(&PolicyFile::parse(yaml).unwrap(), &ctx).unwrap();
    Downloader::new(root, HttpClient::new().unwrap(), hf_endpoint, s3, policy)
}

/// Nothing of `source` in the cache: no finished entry, no marker, no partial download.
fn nothing_cached(models: &Path, source: &str) {
    let key = Downloader::key(source);
    for name in [key.clone(), format!("{key}.json"), format!("{key}.partial")] {
        assert!(!models.join(&name).exists(), "{name} left in the cache for {source}");
    }
}

/// Captures this thread's log lines (current-thread tests: the server tasks log here too).
fn capture_logs() -> (Arc<Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
    #[derive(Clone)]
    struct W(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for W {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Arc::new(Mutex::new(Vec::new()));
    let w = W(buf.clone());
    let sub = tracing_subscriber::fmt().with_writer(move || w.clone()).with_ansi(false).finish();
    (buf, tracing::subscriber::set_default(sub))
}

#[tokio::test]
async fn a_redirect_chain_off_the_allowed_hosts_to_http_or_to_a_private_address_is_refused() {
    std::env::set_var("HF_TOKEN", "hf_token_never_shown");
    let (logs, _guard) = capture_logs();
    // Where the redirects point: counts any request that reaches it.
    let target = server(vec![("/w.bin", Answer::Body(b"weights".to_vec()))]).await;
    let t = target.addr.port();
    // A Hugging Face mirror (the operator's --hf-endpoint, so trusted): its resolve URL
    // redirects to its own cache path (followed: it stays on the endpoint), which
    // redirects away.
    let listing = |f: &str| Answer::Body(format!(r#"{{"siblings":[{{"rfilename":"{f}"}}]}}"#).into_bytes());
    let hf = server(vec![
        ("/api/models/org/off-hosts", listing("a.bin")),
        ("/org/off-hosts/resolve/main/a.bin", Answer::Redirect("/cache/a.bin".into())),
        ("/cache/a.bin", Answer::Redirect(format!("https://evil.example:{t}/w.bin?sig=xyz"))),
        ("/api/models/org/to-http", listing("b.bin")),
        ("/org/to-http/resolve/main/b.bin", Answer::Redirect(format!("http://127.0.0.1:{t}/w.bin"))),
        ("/api/models/org/to-private", listing("c.bin")),
        ("/org/to-private/resolve/main/c.bin", Answer::Redirect(format!("https://localhost:{t}/w.bin"))),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let d = downloader(models.clone(), &format!("http://{}", hf.addr), "hosts: [localhost, cdn.example]", false);

    for (source, rule, names) in [
        ("hf://org/off-hosts", "rule hosts", "host evil.example is not allowed"),
        ("hf://org/to-http", "rule redirect_https", "a redirect to http is not followed"),
        ("hf://org/to-private", "rule private_networks", "host localhost resolves to"),
    ] {
        let err = tokio::time::timeout(Duration::from_secs(20), d.fetch(source, &|_| {})).await.unwrap().unwrap_err();
        assert!(err.contains(rule) && err.contains(names), "{source}: {err}");
        assert!(!err.contains("sig=xyz"), "signed query strings are not shown: {err}");
        nothing_cached(&models, source);
    }
    assert_eq!(target.hits.load(Ordering::SeqCst), 0, "no refused redirect target was contacted");
    // The mirror got the token (it is the endpoint); the chain was followed on it.
    let heads = hf.heads.lock().unwrap().join("\n").to_ascii_lowercase();
    assert!(heads.contains("get /cache/a.bin") && heads.contains("authorization: bearer"), "{heads}");
    let counts: std::collections::BTreeMap<_, _> = d.guard().refusals().into_iter().collect();
    assert_eq!((counts["hosts"], counts["redirect_https"], counts["private_networks"]), (1, 1, 1));

    let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("download refused by the source policy") && logs.contains("rule=\"hosts\""), "{logs}");
    for secret in ["hf_token_never_shown", "s3-secret-never-shown", "sig=xyz"] {
        assert!(!logs.contains(secret), "{secret} logged: {logs}");
    }
}

#[tokio::test]
async fn a_source_over_the_size_cap_is_refused_and_nothing_is_promoted() {
    let blob: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let srv = server(vec![
        ("/sized.bin", Answer::Body(blob.clone())),
        ("/unsized.bin", Answer::Unsized(blob.clone())),
        ("/small.bin", Answer::Body(blob[..4000].to_vec())),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let d = downloader(models.clone(), "https://huggingface.co", "max_bytes: 4096", true);

    // Announced by Content-Length: refused before a byte is written.
    let sized = format!("http://{}/sized.bin", srv.addr);
    let err = d.fetch(&sized, &|_| {}).await.unwrap_err();
    assert!(
        err.contains("rule max_bytes") && err.contains("10000 bytes (9.8 KiB) is more than max_bytes 4096"),
        "{err}"
    );
    nothing_cached(&models, &sized);
    // Not announced: counted as bytes arrive, refused when they pass the cap.
    let streamed = format!("http://{}/unsized.bin", srv.addr);
    let err = d.fetch(&streamed, &|_| {}).await.unwrap_err();
    assert!(err.contains("rule max_bytes") && err.contains("more than max_bytes 4096"), "{err}");
    nothing_cached(&models, &streamed);
    // Under the cap: downloaded.
    let small = format!("http://{}/small.bin", srv.addr);
    let path = d.fetch(&small, &|_| {}).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), &blob[..4000]);
    // A local tree over the cap is refused from its listing.
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("a"), &blob[..3000]).unwrap();
    std::fs::write(tree.join("b"), &blob[..3000]).unwrap();
    let local = format!("file://{}", tree.display());
    let err = d.fetch(&local, &|_| {}).await.unwrap_err();
    assert!(err.contains("rule max_bytes") && err.contains("6000 bytes"), "{err}");
    nothing_cached(&models, &local);
    // No room on the data dir's disk (a margin no disk has): refused before writing.
    let full = downloader(models.clone(), "https://huggingface.co", "free_space_margin: 16000PiB", true);
    let err = full.fetch(&small.replace("small", "sized"), &|_| {}).await.unwrap_err();
    assert!(err.contains("rule free_space_margin") && err.contains("10000 bytes"), "{err}");
    nothing_cached(&models, &small.replace("small", "sized"));
}

#[tokio::test]
async fn the_policy_applies_before_the_cache_and_allowed_sources_download() {
    let srv = server(vec![("/m.bin", Answer::Body(b"model".to_vec()))]).await;
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let src = format!("http://{}/m.bin", srv.addr);
    let open = downloader(models.clone(), "https://huggingface.co", "", true);
    let path = open.fetch(&src, &|_| {}).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"model");
    // The same cache under a policy without loopback: the cached copy is not handed out.
    let strict = downloader(models.clone(), "https://huggingface.co", "schemes: [https]", true);
    let err = strict.fetch(&src, &|_| {}).await.unwrap_err();
    assert!(err.contains("rule schemes") && err.contains("scheme http is not allowed"), "{err}");
    let remote = downloader(models, "https://huggingface.co", "schemes: [http]", false);
    let err = remote.fetch(&src, &|_| {}).await.unwrap_err();
    assert!(err.contains("rule private_networks") && err.contains("127.0.0.1 is a loopback address"), "{err}");
    assert_eq!(srv.hits.load(Ordering::SeqCst), 1, "refused sources were never requested");
}

/// The agent end to end: a Model whose source the node's policy refuses fails its replica
/// with the rule in the reason, is not retried, and counts in the refusal metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_model_source_fails_the_replica_naming_the_rule() {
    let srv = server(vec![("/m.bin", Answer::Body(b"model".to_vec()))]).await;
    let fake = FakeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("source-policy.yaml");
    std::fs::write(&policy, "schemes: [https, file]\nhosts: [models.example.com]\npaths: {file: [/models]}\n").unwrap();
    let template = "/bin/false {source} --host {host} --port {port}";
    let args = agent_args(
        &[fake.addr],
        &dir.path().join("agent"),
        "node-src",
        &["--vllm-command", template, "--source-policy", policy.to_str().unwrap()],
    );
    let agent = TestAgent::start(args).await;
    let replica = |name: &str, source: String| flotilla_api::pb::ReplicaAssignment {
        engine_image: Default::default(),
        traceparent: String::new(),
        gang: None,
        kv_transfer: None,
        replica: name.into(),
        model: "m".into(),
        engine: "vllm".into(),
        source,
        engine_args: vec![],
        gpus: vec![],
        adapters: vec![],
    };
    fake.assign(vec![
        replica("v-0", format!("http://{}/m.bin", srv.addr)),
        replica("v-1", "https://evil.example/m.bin".into()),
        replica("v-2", "file:///etc/passwd".into()),
    ]);
    for (name, rule) in [("v-0", "rule schemes"), ("v-1", "rule hosts"), ("v-2", "rule paths")] {
        let failed = eventually(30, &format!("{name} failed"), || {
            let _ = agent.reports();
            fake.engines().into_iter().find(|e| e.replica == name && e.state == "failed")
        })
        .await;
        assert!(failed.reason.contains("download of") && failed.reason.contains(rule), "{name}: {}", failed.reason);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts: std::collections::BTreeMap<_, _> = agent.handle().download_refusals().into_iter().collect();
    assert_eq!((counts["schemes"], counts["hosts"], counts["paths"]), (1, 1, 1), "refused once each, not retried");
    assert_eq!(srv.hits.load(Ordering::SeqCst), 0);
    drop(agent);
}

/// An engine adopted from a previous run skips the download, so the next agent checks its
/// source against its own policy: refused, the engine is stopped, its replica failed naming
/// the rule, and the state file forgets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_engine_whose_source_the_new_policy_refuses_is_stopped_and_failed() {
    let fake = FakeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("weights.bin");
    std::fs::write(&weights, b"weights").unwrap();
    // a "vllm" engine that is the simulator, so it needs (and downloads) its weights
    let (sim, sub) = sim_binary();
    let template = format!("{} {sub} --host {{host}} --port {{port}} --model {{model}} --speedup 50", sim.display());
    fake.assign(vec![flotilla_api::pb::ReplicaAssignment {
        engine_image: Default::default(),
        traceparent: String::new(),
        gang: None,
        kv_transfer: None,
        replica: "v-0".into(),
        model: "m".into(),
        engine: "vllm".into(),
        source: format!("file://{}", weights.display()),
        engine_args: vec![],
        gpus: vec![],
        adapters: vec![],
    }]);
    let data = dir.path().join("agent");
    let mut first =
        TestAgent::start(agent_args(&[fake.addr], &data, "node-readopt", &["--vllm-command", &template])).await;
    let pid = eventually(60, "engine ready", || {
        first.reports().into_iter().find(|e| e.replica == "v-0" && e.state == "ready").map(|e| e.pid)
    })
    .await;
    first.shutdown(false).await;
    assert!(alive(pid), "left running for the next agent");

    let policy = dir.path().join("source-policy.yaml");
    std::fs::write(&policy, "paths: {file: [/models]}\n").unwrap();
    let extra = ["--vllm-command", template.as_str(), "--source-policy", policy.to_str().unwrap()];
    let second = TestAgent::start(agent_args(&[fake.addr], &data, "node-readopt", &extra)).await;
    second.pids.lock().unwrap().insert(pid);
    let failed = eventually(30, "the adopted engine failed", || {
        second.reports().into_iter().find(|e| e.replica == "v-0" && e.state == "failed")
    })
    .await;
    assert!(failed.reason.contains("rule paths"), "{}", failed.reason);
    eventually(20, "the refused engine stopped", || (!alive(pid)).then_some(())).await;
    let state = std::fs::read_to_string(data.join("engines.json")).unwrap_or_default();
    assert!(!state.contains("v-0"), "forgotten by the state file: {state}");
    drop(second);
}

/// A file set (a gateway's tokenizer files) of a hub repository and of a directory: only its
/// files are requested and cached, apart from the whole source; a source without any fails.
#[tokio::test]
async fn a_file_set_fetches_only_its_files_and_is_cached_apart() {
    use flotilla_agent::download::FileSet;
    const TOKENIZER: FileSet = FileSet { name: "tokenizer", keep: |p| p.to_str() == Some("tokenizer.json") };
    let listing = r#"{"siblings":[{"rfilename":"tokenizer.json"},{"rfilename":"model.safetensors"}]}"#;
    let hf = server(vec![
        ("/api/models/org/m", Answer::Body(listing.as_bytes().to_vec())),
        ("/org/m/resolve/main/tokenizer.json", Answer::Body(b"{\"tok\":1}".to_vec())),
        ("/org/m/resolve/main/model.safetensors", Answer::Body(vec![0; 4096])),
        ("/api/models/org/weights-only", Answer::Body(br#"{"siblings":[{"rfilename":"w.bin"}]}"#.to_vec())),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("cache");
    std::fs::create_dir_all(&models).unwrap();
    let d = downloader(models.clone(), &format!("http://{}", hf.addr), "", true);
    let got = d.fetch_files("hf://org/m", &TOKENIZER, &|_| {}).await.unwrap();
    assert_eq!(std::fs::read(got.join("tokenizer.json")).unwrap(), b"{\"tok\":1}");
    assert!(!got.join("model.safetensors").exists());
    let heads = hf.heads.lock().unwrap().join("\n");
    assert!(!heads.contains("model.safetensors"), "the weights were requested: {heads}");
    assert_eq!(got, models.join(Downloader::files_key("hf://org/m", &TOKENIZER)));
    assert_ne!(Downloader::files_key("hf://org/m", &TOKENIZER), Downloader::key("hf://org/m"));
    let before = hf.hits.load(Ordering::SeqCst);
    d.fetch_files("hf://org/m", &TOKENIZER, &|_| {}).await.unwrap();
    assert_eq!(hf.hits.load(Ordering::SeqCst), before, "cached: nothing requested again");
    let err = d.fetch_files("hf://org/weights-only", &TOKENIZER, &|_| {}).await.unwrap_err();
    assert!(err.contains("has no tokenizer files"), "{err}");

    let src_dir = dir.path().join("model");
    std::fs::create_dir_all(src_dir.join("sub")).unwrap();
    std::fs::write(src_dir.join("tokenizer.json"), "{}").unwrap();
    std::fs::write(src_dir.join("w.bin"), "weights").unwrap();
    let local = d.fetch_files(&format!("file://{}", src_dir.display()), &TOKENIZER, &|_| {}).await.unwrap();
    let names: Vec<_> = std::fs::read_dir(&local).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["tokenizer.json"]);
    let single = d.fetch_files(&format!("file://{}/w.bin", src_dir.display()), &TOKENIZER, &|_| {}).await;
    assert!(single.unwrap_err().contains("has no tokenizer files"));
}
