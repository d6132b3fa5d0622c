//! The autoscaler end to end, real processes on loopback: one server, one agent running
//! sim engines on 4 simulated GPUs, and a gateway reporting demand. Load ramps up (the
//! replicas follow, within max), stops (the model scales down to zero after the delay),
//! and the first request after that is held at the gateway, scales the model from zero and
//! succeeds.
mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use common::*;
use flotilla_api::pb::object_service_client::ObjectServiceClient;
use flotilla_api::pb::{ApplyRequest, GetRequest};

const MODEL: &str = "kind: Model
metadata: {name: auto}
spec:
  engine: sim
  source: file:///models/auto
  replicas: 1
  gpus: 1
  autoscaling:
    min: 0
    max: 3
    strategy: kpa
    metrics: [{source: gateway, name: concurrency, target: 2}]
    stable_window: 6s
    panic_window: 2s
    scale_down_delay: 4s
";

/// One completion through the gateway; the status code.
fn complete(gateway: &str, max_tokens: u32) -> u16 {
    let body = format!(r#"{{"model":"auto","prompt":"hello there","max_tokens":{max_tokens},"ignore_eos":true}}"#);
    raw_http::send_blocking(gateway, "POST", "/v1/completions", &body, Duration::from_secs(120))
        .and_then(|out| raw_http::status_code(&out))
        .unwrap_or(0)
}

/// The model's status document.
async fn status(server: &str) -> serde_json::Value {
    let mut c = ObjectServiceClient::new(channel(server, Duration::from_secs(3)));
    match c.get(GetRequest { kind: "model".into(), name: "auto".into(), stale: false }).await {
        Ok(r) => serde_json::from_str(&r.into_inner().object.unwrap_or_default().status_json).unwrap_or_default(),
        Err(_) => serde_json::Value::Null,
    }
}

async fn wait_ready(server: &str, what: &str, secs: u64, pred: impl Fn(usize) -> bool) -> usize {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let r = replicas(&[server.to_string()], "auto").await;
        let n = ready(&r);
        let live = r.iter().filter(|x| x.phase != "Draining" && x.phase != "Stopped").count();
        if pred(n) && (n == live) {
            return n;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {r:#?}\nstatus: {}", status(server).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Stack {
    _dir: tempfile::TempDir,
    _server: ServerProc,
    _agent: AgentProc,
    _gateway: GatewayProc,
    marker: u64,
}

impl Drop for Stack {
    fn drop(&mut self) {
        self._agent.kill();
        kill_engines(self.marker);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_follow_load_scale_to_zero_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(1, &dir.path().join("s1"), "127.0.0.1:0", &["--bootstrap"]);
    wait_voters(&server.grpc, 1).await;
    let grpc = server.grpc.clone();
    let marker = marker();
    let agent = AgentProc::start("node-1", &dir.path().join("agent"), &grpc, 4, marker);
    let gateway = GatewayProc::start(&grpc, &["--demand-report-interval-ms", "500"]);
    let gw = gateway.addr.clone();
    let _stack = Stack { _dir: dir, _server: server, _agent: agent, _gateway: gateway, marker };
    let mut c = ObjectServiceClient::new(channel(&grpc, Duration::from_secs(5)));
    c.apply(ApplyRequest { manifest: MODEL.into(), expected_revision: None }).await.unwrap();
    wait_ready(&grpc, "the first replica", 60, |n| n == 1).await;

    // Load: 8 concurrent long requests for ~15 s, concurrency target 2 per replica -> max 3.
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (gw, stop) = (gw.clone(), stop.clone());
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let mut codes = Vec::new();
                while !stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(60) {
                    codes.push(complete(&gw, 400));
                }
                codes
            })
        })
        .collect();
    let up = wait_ready(&grpc, "scale-up to max under load", 60, |n| n == 3).await;
    assert_eq!(up, 3);
    let st = status(&grpc).await;
    let history = st["autoscaling"]["history"].as_array().cloned().unwrap_or_default();
    assert!(history.iter().any(|e| e["to"].as_u64() > e["from"].as_u64()), "a scale-up is in the history: {st}");
    // The operator's view, like `kubectl get hpa`.
    let out = Command::new(BIN).args(["--server", &grpc, "get", "model", "auto"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for want in ["STRATEGY", "kpa", "METRIC", "concurrency", "WHEN", "panic"] {
        assert!(text.contains(want), "`get model auto` lacks {want}:\n{text}");
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let codes = w.join().unwrap();
        assert!(codes.iter().all(|c| *c == 200), "every request under load succeeds: {codes:?}");
    }

    // Idle: down to zero after the delay, and the gateway drops the endpoints.
    wait_ready(&grpc, "scale to zero when idle", 90, |n| n == 0).await;
    let st = status(&grpc).await;
    assert_eq!(st["autoscaling"]["desired_replicas"], 0, "{st}");
    // Zero Ready replicas is not yet zero engines: draining ones finish first, and the
    // gateway learns of the change from the leader's stream a moment later. A request sent
    // in that moment was served by a draining engine (seen once under a loaded test run), so
    // wait until no engine runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !engine_pids(marker).is_empty() {
        assert!(Instant::now() < deadline, "engines still running 30 s after scale to zero: {:?}", engine_pids(marker));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The first request after that is held, scales the model from zero, and succeeds.
    let t0 = Instant::now();
    let gw2 = gw.clone();
    let code = tokio::task::spawn_blocking(move || complete(&gw2, 8)).await.unwrap();
    assert_eq!(code, 200, "the first request after scale-to-zero");
    assert!(t0.elapsed() < Duration::from_secs(60));
    let st = status(&grpc).await;
    let last = st["autoscaling"]["history"].as_array().and_then(|h| h.last().cloned()).unwrap_or_default();
    assert_eq!((last["from"].as_u64(), last["to"].as_u64()), (Some(0), Some(1)), "{st}");
}
