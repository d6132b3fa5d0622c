//! A rolling upgrade of every component under streaming load, with real processes: 3
//! servers, 2 agents with simulated GPUs serving a model with 2 replicas (one per node), and
//! two gateways. Clients stream chat completions through both gateways the whole time while
//! each component is restarted, one at a time, in the order docs/deploy.md gives:
//!
//! ```text
//!   servers: followers first, the leader last   (SIGTERM, start, wait: same leader, term,
//!            │                                    3 voters and revision everywhere, and a
//!            │                                    write made now applied on all three)
//!   agents:  one by one                         (SIGTERM, start, wait: registered again; the
//!            │                                    engines are adopted: the same pids)
//!   gateways: one by one                        (SIGTERM with a stream in flight: the
//!                                                 listener closes, streams finish within the
//!                                                 grace, exit 0; the other gateway takes the
//!                                                 traffic; the first request sent to the
//!                                                 restarted one is served)
//! ```
//!
//! Each component stays down 1 s between stop and start (`FLOTILLA_UPGRADE_DOWNTIME_MS`).
//!
//! "Upgrade" here restarts the same binary: there is no older build to start from, so what
//! is proven is the procedure (ordering, waits, hand-overs, adoption, draining), not format
//! compatibility between versions (that is the storage format's own versioning tests).
//!
//! The client behaves as a TCP load balancer in front of the two gateways: a request whose
//! connection is refused, or reset or closed before any byte of the answer came back, is
//! sent again to the other gateway (nothing was served, so nothing is lost); a response
//! that started must run to its `[DONE]`, and every other outcome is a failed request. The
//! test asserts none failed, that streams were in flight across each gateway's stop, and
//! that the cluster's state (objects, replicas, endpoints, engine processes) is unchanged.
//!
//! `FLOTILLA_TEST_BIN=target/release/flotilla` runs it against a release build (the numbers
//! in bench/upgrade/RESULTS.md); the timings of each step are printed either way.
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use flotilla_testkit::ports::free_port;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

const MODEL: &str = "up";
/// Slower engines than the agents' default (`--speedup 50`), so a stream lasts ~0.5 s and
/// some are always in flight when a gateway is stopped.
const MANIFEST: &str = "kind: Model\nmetadata:\n  name: up\n  labels: {flotilla.io/placement: spread}\nspec:\n  engine: sim\n  source: file:///models/up\n  replicas: 2\n  gpus: 1\n  engine_args: ['--speedup', '4']\n";
const TENANT: &str = "kind: Tenant\nmetadata:\n  name: acme\nspec: {rpm: 600, models: [up]}\n";
const CLIENTS: usize = 4;
const GRACE_S: u64 = 10;

/// How long each component stays down between its stop and its start (installing the new
/// binary): 1 s, above the servers' election timeout (250-500 ms here), so the leader's
/// restart is a real hand-over. `FLOTILLA_UPGRADE_DOWNTIME_MS` overrides it.
fn downtime() -> Duration {
    let ms = std::env::var("FLOTILLA_UPGRADE_DOWNTIME_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    Duration::from_millis(ms)
}

/// One agent process whose stdout is read for its "registered" lines.
struct Agent {
    name: String,
    child: Option<Child>,
    registered: Arc<AtomicUsize>,
}

impl Agent {
    fn start(name: &str, dir: &std::path::Path, servers: &str, marker: u64) -> Agent {
        let mut child = Command::new(bin())
            .args(["agent", "--server", servers, "--node-name", name, "--gpus", "2"])
            .args(["--gpu-type", "A100-80GB", "--heartbeat-interval-ms", "200"])
            .arg("--data-dir")
            .arg(dir)
            .arg(format!("--sim-args=--speedup 50 --allow-faults --seed {marker}"))
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn flotilla agent");
        let registered = Arc::new(AtomicUsize::new(0));
        let (out, count) = (child.stdout.take().expect("stdout"), registered.clone());
        // Read until the agent exits: a closed pipe would make its next line fail.
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.contains(" registered with ") {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Agent { name: name.to_owned(), child: Some(child), registered }
    }

    async fn wait_registered(&self, limit: Duration) {
        let t0 = Instant::now();
        while self.registered.load(Ordering::Relaxed) == 0 {
            assert!(t0.elapsed() < limit, "agent {} did not register within {limit:?}", self.name);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM and wait for the exit (the engines stay, for the next agent to adopt).
    async fn terminate(&mut self, limit: Duration) -> Duration {
        let t0 = Instant::now();
        if let Some(mut c) = self.child.take() {
            flotilla_testkit::procs::signal(c.id(), Signal::TERM);
            while !matches!(c.try_wait(), Ok(Some(_))) {
                assert!(t0.elapsed() < limit, "agent {} did not exit within {limit:?} of SIGTERM", self.name);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        t0.elapsed()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How one request through one gateway went.
enum Outcome {
    /// 200, the stream ended with `[DONE]` and carried no error.
    Done,
    /// Refused, or reset or closed before any byte: a balancer sends it elsewhere.
    NotServed(String),
    /// Anything else: a failed request.
    Failed(String),
}

/// A stream as the client saw it, for checking that some spanned a gateway's stop.
#[derive(Clone, Copy)]
struct Span {
    gateway: usize,
    start: Instant,
    end: Instant,
}

/// The answer's body with HTTP/1.1 chunked framing removed (as is, if not chunked).
fn dechunk(head: &str, mut body: &str) -> String {
    if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return body.to_owned();
    }
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// One streamed request to the gateway at `addr`; `streaming` counts it from its first
/// byte back to its end.
async fn one_stream(addr: &str, body: &str, streaming: &AtomicUsize) -> Outcome {
    let request = raw_http::request_text(addr, "POST", "/v1/chat/completions", body);
    let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await else {
        return Outcome::NotServed("not accepting".into());
    };
    if s.write_all(request.as_bytes()).await.is_err() {
        return Outcome::NotServed("reset before the request was written".into());
    }
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    if raw.is_empty() {
                        streaming.fetch_add(1, Ordering::Relaxed);
                    }
                    raw.extend_from_slice(&buf[..n]);
                }
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    if !raw.is_empty() {
        streaming.fetch_sub(1, Ordering::Relaxed);
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    match read {
        Err(_) => return Outcome::Failed(format!("no end within 30 s after {} bytes", raw.len())),
        Ok(Err(_)) | Ok(Ok(_)) if raw.is_empty() => return Outcome::NotServed("closed before any byte".into()),
        Ok(Err(e)) => return Outcome::Failed(format!("cut after {} bytes ({e}): {text}", raw.len())),
        Ok(Ok(_)) => {}
    }
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = dechunk(head, rest);
    match raw_http::status_code(head) {
        Some(200) if body.trim_end().ends_with("data: [DONE]") && !body.contains("\"error\"") => Outcome::Done,
        code => Outcome::Failed(format!("{code:?}: {body}")),
    }
}

/// The clients: each sends one stream after another, starting at alternate gateways.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<[AtomicUsize; 2]>,
    /// Streams whose answer has started and not ended, per gateway.
    streaming: Arc<[AtomicUsize; 2]>,
    moved: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    spans: Arc<Mutex<Vec<Span>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(gateways: [String; 2]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let streaming = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let moved = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let spans = Arc::new(Mutex::new(Vec::new()));
        let deadline = Instant::now() + Duration::from_secs(150);
        let tasks = (0..CLIENTS)
            .map(|i| {
                let (stop, done, moved, streaming) = (stop.clone(), done.clone(), moved.clone(), streaming.clone());
                let (failures, spans, gateways) = (failures.clone(), spans.clone(), gateways.clone());
                tokio::spawn(async move {
                    let body = serde_json::json!({
                        "model": MODEL, "stream": true, "max_tokens": 150, "ignore_eos": true,
                        "messages": [{"role": "user", "content": format!("client {i} says hello")}],
                    })
                    .to_string();
                    let mut next = i % 2;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        // Neither gateway serving for 10 s straight is a failure too.
                        let t0 = Instant::now();
                        loop {
                            let start = Instant::now();
                            match one_stream(&gateways[next], &body, &streaming[next]).await {
                                Outcome::Done => {
                                    done[next].fetch_add(1, Ordering::Relaxed);
                                    spans.lock().unwrap().push(Span { gateway: next, start, end: Instant::now() });
                                    break;
                                }
                                Outcome::Failed(why) => {
                                    failures.lock().unwrap().push(format!("gateway {}: {why}", next + 1));
                                    break;
                                }
                                Outcome::NotServed(_) if t0.elapsed() > Duration::from_secs(10) => {
                                    failures.lock().unwrap().push("neither gateway served for 10 s".into());
                                    break;
                                }
                                Outcome::NotServed(_) => {
                                    moved.fetch_add(1, Ordering::Relaxed);
                                    next = 1 - next;
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                }
                            }
                        }
                        next = 1 - next;
                    }
                })
            })
            .collect();
        Load { stop, done, streaming, moved, failures, spans, tasks }
    }

    fn done(&self, gateway: usize) -> usize {
        self.done[gateway].load(Ordering::Relaxed)
    }

    /// Waits until a stream through `gateway` has started (its first byte came back).
    async fn wait_streaming(&self, gateway: usize) {
        let t0 = Instant::now();
        while self.streaming[gateway].load(Ordering::Relaxed) == 0 {
            assert!(t0.elapsed() < Duration::from_secs(20), "no stream through gateway {} started", gateway + 1);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }

    /// Streams through `gateway` that started before `at` and ended after it.
    fn spanning(&self, gateway: usize, at: Instant) -> usize {
        self.spans.lock().unwrap().iter().filter(|s| s.gateway == gateway && s.start < at && s.end > at).count()
    }

    async fn finish(mut self) -> (usize, usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks.drain(..) {
            t.await.expect("client task");
        }
        let ok = self.done(0) + self.done(1);
        (ok, self.moved.load(Ordering::Relaxed), self.failures())
    }
}

/// What must survive the upgrade: the objects' specs and revisions, the replicas (node,
/// GPUs, phase, endpoint, restarts) and the nodes' states.
async fn state_of(servers: &[String]) -> String {
    use flotilla_api::pb::object_service_client::ObjectServiceClient;
    let mut out = String::new();
    let mut c = ObjectServiceClient::new(channel(&servers[0], Duration::from_secs(5)));
    for kind in ["model", "tenant"] {
        let req = flotilla_api::pb::ListRequest { kind: kind.into(), label_selector: String::new(), stale: false };
        for o in c.list(req).await.expect("list").into_inner().objects {
            if o.name.starts_with("mark-") {
                continue;
            }
            out += &format!("{kind}/{} rev {} {}\n", o.name, o.revision, o.spec_json);
        }
    }
    for r in replicas(servers, MODEL).await {
        out += &format!("replica {} {:?} {:?} {} {:?} {}\n", r.name, r.node, r.gpus, r.phase, r.endpoint, r.restarts);
    }
    out
}

/// Healthy and caught up: a write made now (a Tenant `name`) is applied on every server,
/// the restarted one included — its log follows the current leader's, not only its disk's.
async fn all_apply_a_new_write(servers: &[String], name: &str) {
    use flotilla_api::pb::object_service_client::ObjectServiceClient;
    apply(servers, format!("kind: Tenant\nmetadata:\n  name: {name}\nspec: {{}}\n")).await;
    for addr in servers {
        let mut c = ObjectServiceClient::new(channel(addr, Duration::from_secs(2)));
        let t0 = Instant::now();
        loop {
            let req = flotilla_api::pb::GetRequest { kind: "tenant".into(), name: name.into(), stale: true };
            if c.get(req).await.is_ok_and(|r| r.into_inner().object.is_some()) {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "server {addr} did not apply {name} within 20 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn leader_of(addrs: &[String]) -> u64 {
    for a in addrs {
        if let Some(s) = status(a).await.filter(|s| s.leader_id != 0) {
            return s.leader_id;
        }
    }
    panic!("no server names a leader");
}

async fn start_server(id: u64, data: std::path::PathBuf, grpc: String, extra: Vec<String>) -> ServerProc {
    tokio::task::spawn_blocking(move || {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        ServerProc::start(id, &data, &grpc, &extra)
    })
    .await
    .expect("server start")
}

async fn start_gateway(servers: String, listen: String) -> GatewayProc {
    tokio::task::spawn_blocking(move || {
        GatewayProc::start_on(&servers, &listen, &["--shutdown-grace-s", &GRACE_S.to_string()])
    })
    .await
    .expect("gateway start")
}

/// A short streamed request.
fn probe() -> String {
    serde_json::json!({"model": MODEL, "stream": true, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
}

async fn wait_serving(addr: &str) {
    for _ in 0..300 {
        if let Outcome::Done = one_stream(addr, &probe(), &AtomicUsize::new(0)).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("gateway {addr} never served the model");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_component_restarts_one_at_a_time_under_streaming_load_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let grpc: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port().unwrap())).collect();
    let mut servers = Vec::new();
    for (i, addr) in grpc.iter().enumerate() {
        let extra = if i == 0 { vec!["--bootstrap".to_owned()] } else { vec!["--join".to_owned(), grpc[0].clone()] };
        servers.push(start_server(i as u64 + 1, dir.path().join(format!("s{}", i + 1)), addr.clone(), extra).await);
    }
    wait_voters(&grpc[0], 3).await;
    let list = grpc.join(",");
    let marker = marker();
    let _engines = KillEngines(marker);
    let mut agents: Vec<Agent> =
        (1..=2).map(|i| Agent::start(&format!("node-{i}"), &dir.path().join(format!("a{i}")), &list, marker)).collect();
    wait_nodes_ready(&grpc, 2).await;
    apply(&grpc, MANIFEST.into()).await;
    apply(&grpc, TENANT.into()).await;
    wait_replicas(&grpc, MODEL, 60, "2 ready replicas", |r| r.len() == 2 && ready(r) == 2).await;
    let listen: Vec<String> = (0..2).map(|_| format!("127.0.0.1:{}", free_port().unwrap())).collect();
    let mut gateways = vec![start_gateway(list.clone(), listen[0].clone()).await];
    gateways.push(start_gateway(list.clone(), listen[1].clone()).await);
    for g in &gateways {
        wait_serving(&g.addr).await;
    }
    settled_leader(&grpc, Duration::from_secs(20)).await;
    let before = state_of(&grpc).await;
    let pids = {
        let mut p = engine_pids(marker);
        p.sort_unstable();
        p
    };
    assert_eq!(pids.len(), 2, "one engine per replica");
    let same_engines = || {
        let mut now = engine_pids(marker);
        now.sort_unstable();
        assert_eq!(now, pids, "the engines were restarted, not adopted");
    };

    let load = Load::start([gateways[0].addr.clone(), gateways[1].addr.clone()]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t_all = Instant::now();
    let mut steps: Vec<(String, Duration)> = Vec::new();

    // Servers: followers first, the leader last; each back and caught up before the next.
    let mut restarted = Vec::new();
    while restarted.len() < 3 {
        let leader = leader_of(&grpc).await;
        let id = (1..=3u64).find(|id| !restarted.contains(id) && *id != leader).unwrap_or(leader);
        let t0 = Instant::now();
        let s = &mut servers[id as usize - 1];
        let stopped = s.terminate(Duration::from_secs(10)).await;
        let data = s.data_dir.clone();
        tokio::time::sleep(downtime()).await;
        servers[id as usize - 1] = start_server(id, data, grpc[id as usize - 1].clone(), Vec::new()).await;
        let now = settled_leader(&grpc, Duration::from_secs(30)).await;
        all_apply_a_new_write(&grpc, &format!("mark-{id}")).await;
        let role = if id == leader { "leader" } else { "follower" };
        eprintln!(
            "server {id} ({role}): stopped in {stopped:?}, back and caught up in {:?}; leader now {now}",
            t0.elapsed()
        );
        steps.push((format!("server {id} ({role})"), t0.elapsed()));
        restarted.push(id);
        same_engines();
    }
    wait_nodes_ready(&grpc, 2).await;

    // Agents: one at a time; the engines keep serving and the new agent adopts them.
    for (i, agent) in agents.iter_mut().enumerate() {
        let t0 = Instant::now();
        let name = agent.name.clone();
        let stopped = agent.terminate(Duration::from_secs(10)).await;
        same_engines();
        tokio::time::sleep(downtime()).await;
        *agent = Agent::start(&name, &dir.path().join(format!("a{}", i + 1)), &list, marker);
        agent.wait_registered(Duration::from_secs(20)).await;
        wait_nodes_ready(&grpc, 2).await;
        wait_replicas(&grpc, MODEL, 20, "2 ready replicas", |r| r.len() == 2 && ready(r) == 2).await;
        eprintln!("agent {name}: stopped in {stopped:?}, registered again in {:?}", t0.elapsed());
        steps.push((format!("agent {name}"), t0.elapsed()));
        same_engines();
    }

    // Gateways: one at a time; the other takes the traffic while this one drains.
    for i in 0..gateways.len() {
        let served_before = load.done(i);
        // Stop it with a stream in flight (one has started and not ended), or the drain
        // goes untested.
        load.wait_streaming(i).await;
        let t0 = Instant::now();
        let (took, clean) = gateways[i].terminate(Duration::from_secs(GRACE_S + 5)).await;
        assert!(clean, "gateway {} did not exit cleanly after SIGTERM ({took:?})", i + 1);
        assert!(took < Duration::from_secs(GRACE_S), "gateway {} drained past its grace: {took:?}", i + 1);
        tokio::time::sleep(downtime()).await;
        gateways[i] = start_gateway(list.clone(), listen[i].clone()).await;
        // A balancer sends traffic as soon as the port accepts: the first request served.
        if let Outcome::Failed(why) | Outcome::NotServed(why) =
            one_stream(&gateways[i].addr, &probe(), &AtomicUsize::new(0)).await
        {
            panic!("the restarted gateway {} failed the first request sent to it: {why}", i + 1);
        }
        // The restarted gateway takes client traffic again.
        let t_back = Instant::now();
        while load.done(i) < served_before + 3 {
            assert!(
                t_back.elapsed() < Duration::from_secs(20),
                "gateway {} served no traffic after its restart",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let spanning = load.spanning(i, t0);
        eprintln!(
            "gateway {}: drained in {took:?} ({spanning} streams in flight across the stop), back in {:?}",
            i + 1,
            t0.elapsed()
        );
        steps.push((format!("gateway {}", i + 1), t0.elapsed()));
        assert!(spanning > 0, "no stream was in flight when gateway {} stopped: the drain went untested", i + 1);
    }
    let total = t_all.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ok, moved, failures) = load.finish().await;
    eprintln!(
        "upgrade of 7 components under load: {:.2} s, {ok} streams completed, {} failed, {moved} sent to the other gateway before any byte",
        total.as_secs_f64(),
        failures.len()
    );
    for (what, took) in &steps {
        eprintln!("step {what}: {:.2} s", took.as_secs_f64());
    }
    assert!(failures.is_empty(), "{} of {} requests failed: {failures:#?}", failures.len(), ok + failures.len());
    assert!(ok >= 20, "the load ran ({ok} streams)");

    settled_leader(&grpc, Duration::from_secs(20)).await;
    same_engines();
    let after = state_of(&grpc).await;
    assert_eq!(after, before, "the cluster's state changed across the upgrade");
}

/// Kills this test's engines when it ends (the agents leave them running by design).
struct KillEngines(u64);

impl Drop for KillEngines {
    fn drop(&mut self) {
        kill_engines(self.0);
    }
}
