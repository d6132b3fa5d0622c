//! The global gateway tier (`flotilla gateway --federation`) as real processes on loopback:
//! a federation server holding `Cluster` objects whose gateways are `flotilla sim`
//! processes (and, where a member must saturate, a cluster gateway in front of a sim), and
//! the global gateway in front of them. Each test proves one behaviour of issue 26 by
//! injecting its failure: region affinity and model availability, a member killed under
//! load (no client-visible failure), saturated and failing members (spillover, failover),
//! the federation killed (routing on the last list), streaming, and bad flags.
mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{bin, GatewayProc, ServerProc};
use flotilla_testkit::procs::kill_and_reap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Tests run one at a time: each starts about six processes, and the spillover test reads
/// timing on two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const KEY: &str = "Bearer sk-federation-test";

/// A `flotilla sim` process; killed on drop.
struct Sim {
    addr: String,
    child: Option<Child>,
}

impl Sim {
    fn start(model: &str, extra: &[&str]) -> Sim {
        let mut child = Command::new(bin())
            .args(["sim", "--port", "0", "--model", model, "--speedup", "2"])
            .args(extra)
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn flotilla sim");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("sim banner");
        let addr = line.split("http://").nth(1).and_then(|r| r.split_whitespace().next()).expect("sim address");
        Sim { addr: addr.to_owned(), child: Some(child) }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_and_reap(&mut c);
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The global gateway process; killed on drop.
struct Global {
    addr: String,
    child: Child,
}

impl Global {
    fn start(federation: &str, extra: &[&str]) -> Global {
        let mut child = Command::new(bin())
            .args(["gateway", "--federation", federation, "--listen", "127.0.0.1:0"])
            .args(["--cluster-list-interval-ms", "200", "--member-poll-interval-ms", "200"])
            .args(["--member-down-backoff-ms", "100"])
            .args(extra)
            .env("RUST_LOG", "error")
            .env_remove("FLOTILLA_SERVER")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the global gateway");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("gateway banner");
        let addr = line.split("http://").nth(1).expect("gateway banner").trim().to_owned();
        Global { addr, child }
    }
}

impl Drop for Global {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// One answer, read whole: status, headers (lower-case names), body (chunked decoded).
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
    /// When the first body byte came, from the request's start.
    first_byte: Option<Duration>,
    /// The whole answer's time.
    total: Duration,
}

impl Answer {
    fn cluster(&self) -> &str {
        self.headers.get("x-flotilla-cluster").map_or("", String::as_str)
    }
}

fn dechunk(raw: &str) -> String {
    let mut out = String::new();
    let mut rest = raw;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].strip_prefix("\r\n").unwrap_or(&tail[n..]);
    }
    out
}

/// Sends one request (a fresh connection) and reads the whole answer within 30 s.
async fn call(addr: &str, method: &str, path: &str, body: &str, headers: &[(&str, &str)]) -> Option<Answer> {
    let t0 = Instant::now();
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let text = flotilla_testkit::raw_http::request_text_with(addr, method, path, body, headers);
        s.write_all(text.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 16384];
        let mut first_byte = None;
        let mut head_len = None;
        loop {
            let n = s.read(&mut buf).await.ok()?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
            if head_len.is_none() {
                head_len = raw.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
            }
            if first_byte.is_none() && head_len.is_some_and(|h| raw.len() > h) {
                first_byte = Some(t0.elapsed());
            }
        }
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n")?;
        let mut lines = head.lines();
        let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
        let headers: BTreeMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let body = if headers.get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            dechunk(body)
        } else {
            body.to_owned()
        };
        Some(Answer { status, headers, body, first_byte, total: t0.elapsed() })
    };
    tokio::time::timeout(Duration::from_secs(30), fut).await.ok().flatten()
}

fn chat(model: &str, max_tokens: u32, stream: bool) -> String {
    format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"hello there"}}],"max_tokens":{max_tokens},"stream":{stream}}}"#
    )
}

/// A chat completion through `addr` with the test key and `extra` headers.
async fn ask(addr: &str, model: &str, extra: &[(&str, &str)]) -> Answer {
    let mut h = vec![("Authorization", KEY)];
    h.extend_from_slice(extra);
    call(addr, "POST", "/v1/chat/completions", &chat(model, 4, false), &h).await.expect("an answer")
}

/// The sum of the samples of `name` whose labels include every `label="value"` pair.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn metrics(addr: &str) -> String {
    call(addr, "GET", "/metrics", "", &[]).await.map(|a| a.body).unwrap_or_default()
}

const UP: &str = "flotilla_gateway_federation_member_up";
const FAILOVERS: &str = "flotilla_gateway_federation_failovers_total";
const SPILLOVERS: &str = "flotilla_gateway_federation_spillovers_total";

/// Waits until the global gateway reports each of `clusters` up (1) or down (0).
async fn wait_members(addr: &str, clusters: &[(&str, f64)]) {
    let t0 = Instant::now();
    loop {
        let m = metrics(addr).await;
        if clusters.iter().all(|(c, want)| {
            m.lines().any(|l| l.starts_with(UP) && l.contains(&format!("cluster=\"{c}\"")))
                && metric(&m, UP, &[("cluster", c)]) == *want
        }) {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "members never became {clusters:?}:\n{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A federation server with one Cluster per member (`name`, `region`, gateway address).
struct Federation {
    _dir: tempfile::TempDir,
    server: ServerProc,
}

impl Federation {
    async fn start(members: &[(&str, &str, &str)]) -> Federation {
        let dir = tempfile::tempdir().unwrap();
        let server = ServerProc::start(1, &dir.path().join("fed"), "127.0.0.1:0", &["--federation", "--bootstrap"]);
        let addrs = [server.grpc.clone()];
        // a Cluster without a gateway is ignored by the global gateway
        common::apply(
            &addrs,
            "kind: Cluster\nmetadata: {name: no-gateway}\nspec: {servers: [\"127.0.0.1:1\"]}\n".into(),
        )
        .await;
        for (name, region, gw) in members {
            let manifest = format!(
                "kind: Cluster\nmetadata: {{name: {name}, labels: {{region: {region}}}}}\nspec: {{servers: [\"127.0.0.1:1\"], gateway: \"http://{gw}\"}}\n"
            );
            common::apply(&addrs, manifest).await;
        }
        Federation { _dir: dir, server }
    }
}

/// us-east and eu-west serve `llama`, ap-south alone serves `qwen`.
struct World {
    fed: Federation,
    sims: BTreeMap<&'static str, Sim>,
}

async fn world() -> World {
    let sims: BTreeMap<&'static str, Sim> = [
        ("us-east", Sim::start("llama", &[])),
        ("eu-west", Sim::start("llama", &[])),
        ("ap-south", Sim::start("qwen", &[])),
    ]
    .into();
    let members: Vec<(&str, &str, &str)> = sims.iter().map(|(n, s)| (*n, *n, s.addr.as_str())).collect();
    let fed = Federation::start(&members).await;
    World { fed, sims }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_to_the_region_and_to_the_members_serving_the_model() {
    let _serial = SERIAL.lock().await;
    let w = world().await;
    let g = Global::start(&w.fed.server.grpc, &["--region", "eu-west"]);
    wait_members(&g.addr, &[("us-east", 1.0), ("eu-west", 1.0), ("ap-south", 1.0)]).await;

    // the --region default, then the header: each stays in its region however the two
    // members' latencies move
    for _ in 0..6 {
        let a = ask(&g.addr, "llama", &[]).await;
        assert_eq!((a.status, a.cluster()), (200, "eu-west"), "{a:?}");
        assert!(a.body.contains("chat.completion"), "{a:?}");
    }
    for _ in 0..6 {
        let a = ask(&g.addr, "llama", &[("x-flotilla-region", "us-east")]).await;
        assert_eq!((a.status, a.cluster()), (200, "us-east"), "{a:?}");
    }
    // a region that lacks the model: another region's member serves it
    let a = ask(&g.addr, "llama", &[("x-flotilla-region", "ap-south")]).await;
    assert!(a.status == 200 && ["us-east", "eu-west"].contains(&a.cluster()), "{a:?}");
    // a model one member serves goes there, whatever the region
    for region in ["eu-west", "us-east"] {
        let a = ask(&g.addr, "qwen", &[("x-flotilla-region", region)]).await;
        assert_eq!((a.status, a.cluster()), (200, "ap-south"), "{a:?}");
    }
    // a model no member serves
    let a = ask(&g.addr, "mistral", &[]).await;
    assert_eq!(a.status, 404, "{a:?}");
    assert!(a.body.contains("model_not_found") && a.body.contains("mistral"), "{a:?}");

    // /v1/models is every member's list, merged
    let a = call(&g.addr, "GET", "/v1/models", "", &[("Authorization", KEY)]).await.unwrap();
    assert_eq!(a.status, 200, "{a:?}");
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    let mut ids: Vec<&str> = v["data"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["llama", "qwen"], "{a:?}");

    // secure by default: a request without a key never reaches a member
    let a = call(&g.addr, "POST", "/v1/chat/completions", &chat("llama", 4, false), &[]).await.unwrap();
    assert_eq!(a.status, 401, "{a:?}");
    assert!(a.body.contains("invalid_api_key"), "{a:?}");
    let a = ask(&g.addr, "llama", &[("x-flotilla-region", "a,b")]).await;
    assert_eq!(a.status, 400, "{a:?}");
    assert!(a.body.contains("x-flotilla-region"), "{a:?}");

    let m = metrics(&g.addr).await;
    let req = "flotilla_gateway_federation_requests_total";
    assert!(metric(&m, req, &[("cluster", "eu-west"), ("model", "llama"), ("outcome", "200")]) >= 3.0, "{m}");
    assert!(metric(&m, req, &[("cluster", "ap-south"), ("model", "qwen"), ("outcome", "200")]) >= 2.0, "{m}");
    assert!(!m.contains("no-gateway"), "a Cluster without a gateway is no member:\n{m}");
    assert!(metric(&m, "flotilla_gateway_federation_member_latency_ewma_seconds", &[("cluster", "eu-west")]) > 0.0);
    assert!(metric(&m, "flotilla_gateway_federation_request_duration_seconds_count", &[("cluster", "eu-west")]) >= 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_pass_through_as_they_are_made() {
    let _serial = SERIAL.lock().await;
    let w = world().await;
    let g = Global::start(&w.fed.server.grpc, &["--region", "us-east"]);
    wait_members(&g.addr, &[("us-east", 1.0), ("eu-west", 1.0)]).await;
    let h = [("Authorization", KEY)];
    let a = call(&g.addr, "POST", "/v1/chat/completions", &chat("llama", 120, true), &h).await.expect("an answer");
    assert_eq!((a.status, a.cluster()), (200, "us-east"), "{a:?}");
    assert!(a.headers["content-type"].starts_with("text/event-stream"), "{a:?}");
    let events = a.body.matches("data: ").count();
    assert!(events >= 10 && a.body.contains("data: [DONE]"), "{events} events: {}", a.body);
    // not buffered: the first event came long before the stream ended (120 tokens at about
    // 6 ms each on the sim)
    let first = a.first_byte.expect("a body");
    assert!(first * 3 < a.total, "first byte at {first:?}, stream ended at {:?}", a.total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_member_fails_over_before_the_first_byte() {
    let _serial = SERIAL.lock().await;
    let mut w = world().await;
    let g = Global::start(&w.fed.server.grpc, &["--region", "eu-west"]);
    wait_members(&g.addr, &[("us-east", 1.0), ("eu-west", 1.0)]).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (addr, stop) = (g.addr.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let a =
                    call(&addr, "POST", "/v1/chat/completions", &chat("llama", 16, false), &[("Authorization", KEY)])
                        .await;
                seen.push(a.map(|a| (a.status, a.cluster().to_owned(), a.body)));
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    w.sims.get_mut("eu-west").unwrap().kill();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut per_client = Vec::new();
    for c in clients {
        per_client.push(c.await.unwrap());
    }
    // after the kill every request is served by the other llama member
    for seen in &per_client {
        let tail: Vec<_> = seen.iter().rev().take(3).filter_map(|a| a.as_ref().map(|a| a.1.as_str())).collect();
        assert!(tail.iter().all(|c| *c == "us-east"), "last answers from {tail:?}");
    }
    let all: Vec<_> = per_client.into_iter().flatten().collect();
    let failed: Vec<_> = all.iter().filter(|a| !matches!(a, Some((200, _, _)))).collect();
    assert!(failed.is_empty(), "{} of {} requests failed: {failed:?}", failed.len(), all.len());
    let by = |c: &str| all.iter().filter(|a| a.as_ref().is_some_and(|a| a.1 == c)).count();
    assert!(by("eu-west") > 0 && by("us-east") > 0, "eu-west {} us-east {}", by("eu-west"), by("us-east"));
    let m = metrics(&g.addr).await;
    let moved = metric(&m, FAILOVERS, &[("cluster", "eu-west")]);
    assert!(moved >= 1.0, "no failover counted:\n{m}");
    assert_eq!(metric(&m, UP, &[("cluster", "eu-west")]), 0.0, "{m}");
    assert!(killed.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_and_failing_members_spill_and_fail_over() {
    let _serial = SERIAL.lock().await;
    // eu-west is a cluster gateway over one sim that takes one request at a time and queues
    // one more: past that it answers 503 queue_full
    let eu_sim = Sim::start("llama", &["--allow-faults"]);
    let backend = format!("llama=http://{}", eu_sim.addr);
    let eu_gw = GatewayProc::start(
        "",
        &["--backend", &backend, "--max-in-flight-per-endpoint", "1", "--max-queue", "1", "--start-wait-s", "0"],
    );
    let us_sim = Sim::start("llama", &[]);
    let fed = Federation::start(&[("eu-west", "eu-west", &eu_gw.addr), ("us-east", "us-east", &us_sim.addr)]).await;
    let g = Global::start(&fed.server.grpc, &["--region", "eu-west", "--spill-after-ms", "300"]);
    wait_members(&g.addr, &[("us-east", 1.0), ("eu-west", 1.0)]).await;

    // four long streams at once: one runs on eu-west, one queues there (spills after
    // 300 ms without a response head), two find its queue full (503: spill)
    let mut streams = Vec::new();
    for _ in 0..4 {
        let addr = g.addr.clone();
        streams.push(tokio::spawn(async move {
            call(&addr, "POST", "/v1/chat/completions", &chat("llama", 200, true), &[("Authorization", KEY)]).await
        }));
    }
    let mut clusters = Vec::new();
    for s in streams {
        let a = s.await.unwrap().expect("an answer");
        assert_eq!(a.status, 200, "{a:?}");
        assert!(a.body.contains("data: [DONE]"), "a whole stream: {a:?}");
        clusters.push(a.cluster().to_owned());
    }
    assert!(clusters.iter().any(|c| c == "eu-west") && clusters.iter().any(|c| c == "us-east"), "{clusters:?}");
    let m = metrics(&g.addr).await;
    assert!(metric(&m, SPILLOVERS, &[("cluster", "eu-west"), ("reason", "status_503")]) >= 1.0, "{m}");
    assert!(metric(&m, SPILLOVERS, &[("cluster", "eu-west"), ("reason", "queue_wait")]) >= 1.0, "{m}");

    // eu-west's engine now fails every request: its gateway answers 502, and the global
    // gateway fails over to us-east
    let faults = call(&eu_sim.addr, "POST", "/sim/faults", r#"{"error_rate": 1.0}"#, &[]).await.unwrap();
    assert_eq!(faults.status, 200, "{faults:?}");
    for _ in 0..3 {
        let a = ask(&g.addr, "llama", &[]).await;
        assert_eq!((a.status, a.cluster()), (200, "us-east"), "{a:?}");
    }
    let m = metrics(&g.addr).await;
    assert!(metric(&m, FAILOVERS, &[("cluster", "eu-west"), ("reason", "status_5xx")]) >= 3.0, "{m}");
    // when every member fails, the last answer is the client's
    drop(us_sim);
    wait_members(&g.addr, &[("us-east", 0.0)]).await;
    let a = ask(&g.addr, "llama", &[]).await;
    assert!(a.status >= 500, "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_gateway_routes_on_its_last_list_without_the_federation() {
    let _serial = SERIAL.lock().await;
    let mut w = world().await;
    let g = Global::start(&w.fed.server.grpc, &["--region", "eu-west"]);
    wait_members(&g.addr, &[("us-east", 1.0), ("eu-west", 1.0), ("ap-south", 1.0)]).await;
    w.fed.server.kill();
    // several list rounds fail
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let m = metrics(&g.addr).await;
    assert!(metric(&m, "flotilla_gateway_federation_cluster_lists_total", &[("result", "error")]) >= 3.0, "{m}");
    for _ in 0..3 {
        let a = ask(&g.addr, "llama", &[]).await;
        assert_eq!((a.status, a.cluster()), (200, "eu-west"), "{a:?}");
        let a = ask(&g.addr, "qwen", &[]).await;
        assert_eq!((a.status, a.cluster()), (200, "ap-south"), "{a:?}");
    }
    // members' health is still followed: a member that dies now is failed over too
    w.sims.get_mut("eu-west").unwrap().kill();
    for _ in 0..3 {
        let a = ask(&g.addr, "llama", &[]).await;
        assert_eq!((a.status, a.cluster()), (200, "us-east"), "{a:?}");
    }
    let ready = call(&g.addr, "GET", "/readyz", "", &[]).await.unwrap();
    assert_eq!(ready.status, 200, "{ready:?}");
}

#[test]
fn bad_federation_flags_exit_2_naming_the_flag() {
    let run = |args: &[&str]| {
        let o = Command::new(bin()).args(args).env_remove("FLOTILLA_SERVER").output().unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (code, err) = run(&["gateway", "--federation", "nonsense", "--listen", "127.0.0.1:0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--federation \"nonsense\"") && err.contains("HOST:PORT"), "{err}");
    let (code, err) = run(&["gateway", "--federation", "127.0.0.1:7070,", "--listen", "127.0.0.1:0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("empty address"), "{err}");
    let (code, err) = run(&["gateway", "--federation", "127.0.0.1:7070", "--backend", "m=127.0.0.1:1"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--backend"), "{err}");
    let (code, err) = run(&["--server", "10.0.0.1:7070", "gateway", "--federation", "127.0.0.1:7070"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--server"), "{err}");
    let (code, err) = run(&["gateway", "--federation", "127.0.0.1:7070", "--region", "us east"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--region"), "{err}");
    let (code, out) = {
        let o = Command::new(bin()).args(["gateway", "--help"]).output().unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned())
    };
    assert_eq!(code, Some(0));
    for flag in ["--federation", "--region", "--member-key-file", "--spill-after-ms", "--max-clusters-per-request"] {
        assert!(out.contains(flag), "--help lacks {flag}");
    }
}
