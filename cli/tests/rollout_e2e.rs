//! Rolling updates with real processes: 3 servers, 2 agents with 4 simulated GPUs each, a
//! gateway, and streaming clients. Changing a model's engine arguments replaces its 4
//! replicas make-before-break with no failed request and never fewer than 4 Ready; `flotilla
//! rollout status|history|undo|pause|resume` drive and report it; a lost node is hedged.
mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use flotilla_testkit::manifests::model_manifest;
use tokio::time::Instant;

fn manifest_with_args(name: &str, replicas: u32, args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    format!("{}  engine_args: [{}]\n", model_manifest(name, replicas, 1), args.join(", "))
}

/// `flotilla --server S rollout ARGS…`: (exit code, stdout, stderr).
fn rollout(servers: &[String], args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(["--server", &servers.join(","), "rollout"])
        .args(args)
        .output()
        .expect("run flotilla rollout");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// `flotilla --server S events ARGS…`: stdout (the command must succeed).
fn events(servers: &[String], args: &[&str]) -> String {
    let out = Command::new(BIN).args(["--server", &servers.join(","), "events"]).args(args).output().expect("run");
    assert!(out.status.success(), "events: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Streaming chat requests through the gateway until `stop`, each checked to end with
/// `[DONE]` and no error chunk: (ok, failures as "status: body").
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(gateway: &str, model: &str, clients: usize) -> Load {
        Self::start_with(gateway, model, clients, 0, 64)
    }

    /// Prompts of about `prompt_tokens` more tokens, each new to the prefix cache (a counter
    /// leads it), so that the engine's prefill dominates TTFT rather than the machine's noise.
    fn start_with(gateway: &str, model: &str, clients: usize, prompt_tokens: usize, max_tokens: u32) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let deadline = Instant::now() + Duration::from_secs(240);
        let tasks = (0..clients)
            .map(|i| {
                let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
                let (gateway, model) = (gateway.to_owned(), model.to_owned());
                tokio::spawn(async move {
                    let padding = " and more".repeat(prompt_tokens / 2);
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        n += 1;
                        let body = serde_json::json!({
                            "model": model, "stream": true, "max_tokens": max_tokens,
                            "messages": [{"role": "user", "content": format!("{n} client {i} says hello{padding}")}],
                        })
                        .to_string();
                        match raw_http::http_request(&gateway, "POST", "/v1/chat/completions", &body).await {
                            Some((200, text)) if text.contains("data: [DONE]") && !text.contains("\"error\"") => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Some((status, text)) => failures.lock().unwrap().push(format!("{status}: {text}")),
                            None => failures.lock().unwrap().push("no answer".into()),
                        }
                    }
                })
            })
            .collect();
        Load { stop, ok, failures, tasks }
    }

    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        (self.ok.load(Ordering::Relaxed), self.failures.lock().unwrap().clone())
    }
}

/// Samples the replicas every 100 ms until `stop`: (fewest Ready, most live). A sample above
/// the surge counts unless the model's events show a replica hedged (the model actor's
/// `NodeNotReady` event: a replica on a node that missed its heartbeats stops
/// counting and is replaced at once, by design, so a loaded machine may show one more).
fn watch_counts(servers: Vec<String>, model: &str, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(usize, usize)> {
    let model = model.to_owned();
    tokio::spawn(async move {
        let (mut min_ready, mut max_live) = (usize::MAX, 0);
        while !stop.load(Ordering::Relaxed) {
            let r = replicas(&servers, &model).await;
            if !r.is_empty() {
                min_ready = min_ready.min(ready(&r));
                // live as the rollout counts it (actors::rollout): a replica on its way out
                // (Draining, then Stopped until it is deleted) or Failed is not
                let live = |x: &&ReplicaView| !matches!(x.phase.as_str(), "Draining" | "Stopped" | "Failed");
                let mut n = r.iter().filter(live).count();
                if n > 5 {
                    let out =
                        std::process::Command::new(BIN).args(["--server", &servers[0], "events"]).output().unwrap();
                    let events = String::from_utf8_lossy(&out.stdout);
                    let phases: Vec<_> = r.iter().map(|x| (&x.name, &x.phase, &x.node)).collect();
                    if events.lines().any(|l| l.contains("NodeNotReady") && l.contains(&model)) {
                        eprintln!("above the surge while a node was not ready (hedged, allowed): {phases:?}");
                        n = 5;
                    } else {
                        eprintln!("above the surge: {phases:?}\n{events}");
                    }
                }
                max_live = max_live.max(n);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (min_ready, max_live)
    })
}

async fn args_of_replicas(servers: &[String], model: &str) -> Vec<Vec<String>> {
    use flotilla_api::pb::object_service_client::ObjectServiceClient;
    let mut c = ObjectServiceClient::new(channel(&servers[0], Duration::from_secs(5)));
    let req = flotilla_api::pb::ListRequest {
        kind: "replica".into(),
        label_selector: format!("model={model}"),
        stale: false,
    };
    let objects = c.list(req).await.unwrap().into_inner().objects;
    objects
        .iter()
        .map(|o| {
            let spec: serde_json::Value = serde_json::from_str(&o.spec_json).unwrap();
            spec["engine_args"].as_array().into_iter().flatten().filter_map(|a| a.as_str().map(String::from)).collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_argument_change_rolls_under_load_without_a_failed_request_and_undo_rolls_back() {
    let fleet = Fleet::start(2, 4).await;
    let s = fleet.addrs.clone();
    apply(&s, model_manifest("roll", 4, 1)).await;
    wait_replicas(&s, "roll", 60, "4 ready", |r| r.len() == 4 && ready(r) == 4).await;
    let gateway = GatewayProc::start(&s.join(","), &[]);
    for _ in 0..300 {
        if raw_http::http_get(&gateway.addr, "/health").await.is_some_and(|(c, _)| c == 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let load = Load::start(&gateway.addr, "roll", 4);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The change: every replica is replaced, one surge replica at a time.
    let stop = Arc::new(AtomicBool::new(false));
    let counts = watch_counts(s.clone(), "roll", stop.clone());
    let t0 = Instant::now();
    apply(&s, manifest_with_args("roll", 4, &["--max-num-seqs", "64"])).await;
    let (code, out, err) = rollout(&s, &["status", "model", "roll", "--timeout", "120s"]);
    assert_eq!(code, 0, "rollout status: {out}\n{err}");
    assert!(out.lines().last().unwrap_or_default().contains("Complete"), "{out}");
    eprintln!("rolled 4 replicas in {:.1} s", t0.elapsed().as_secs_f64());
    wait_replicas(&s, "roll", 60, "4 ready, no draining", |r| r.len() == 4 && ready(r) == 4).await;
    stop.store(true, Ordering::Relaxed);
    let (min_ready, max_live) = counts.await.unwrap();
    assert!(min_ready >= 4, "ready fell to {min_ready} (max_unavailable 0)");
    assert!(max_live <= 5, "{max_live} live replicas (max_surge 25% of 4 = 1)");
    for args in args_of_replicas(&s, "roll").await {
        assert_eq!(args, vec!["--max-num-seqs", "64"]);
    }
    let (ok, failures) = load.finish().await;
    assert!(failures.is_empty(), "{} of {} requests failed: {:?}", failures.len(), ok + failures.len(), failures);
    assert!(ok > 20, "the load ran ({ok} requests)");

    let log = events(&s, &["--for", "model/roll"]);
    for reason in ["RolloutStarted", "RolloutStep", "RolloutComplete"] {
        assert!(log.contains(reason), "no {reason} event: {log}");
    }

    // History and undo.
    let (code, out, _) = rollout(&s, &["history", "model", "roll"]);
    assert_eq!(code, 0);
    assert!(out.contains("2 (current)") && out.contains("--max-num-seqs 64"), "{out}");
    let (code, out, err) = rollout(&s, &["undo", "model", "roll"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("rolled back to revision 1"), "{out}");
    let (code, out, err) = rollout(&s, &["status", "model", "roll", "--timeout", "120s"]);
    assert_eq!(code, 0, "{out}{err}");
    wait_replicas(&s, "roll", 60, "4 ready after undo", |r| r.len() == 4 && ready(r) == 4).await;
    assert!(args_of_replicas(&s, "roll").await.iter().all(Vec::is_empty), "back to no engine args");
    let (_, out, _) = rollout(&s, &["history", "model", "roll"]);
    assert!(out.contains("3 (current)") && !out.lines().any(|l| l.starts_with("1 ")), "undo renumbers: {out}");

    // Pause holds a change; resume lets it roll. Apply replaces the whole spec, so the
    // manifest says `paused: true` to keep the pause (as `rollout pause` tells the operator).
    let (code, out, _) = rollout(&s, &["pause", "model", "roll"]);
    assert_eq!(code, 0);
    assert!(out.contains("rollout.paused: true"), "{out}");
    let paused = format!("{}  rollout: {{paused: true}}\n", manifest_with_args("roll", 4, &["--max-num-seqs", "32"]));
    apply(&s, paused).await;
    let (code, out, _) = rollout(&s, &["status", "model", "roll", "--watch=false"]);
    assert_eq!(code, 0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(args_of_replicas(&s, "roll").await.iter().all(Vec::is_empty), "paused: nothing replaced ({out})");
    let (code, ..) = rollout(&s, &["resume", "model", "roll"]);
    assert_eq!(code, 0);
    let (code, out, err) = rollout(&s, &["status", "model", "roll", "--timeout", "120s"]);
    assert_eq!(code, 0, "{out}{err}");
    // Bad input: exit 2, nothing written.
    let (code, _, err) = rollout(&s, &["undo", "model", "roll", "--to-revision", "99"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("revision 99 is not in the history"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_node_is_hedged_within_ttl_plus_start_and_the_surplus_goes_when_it_returns() {
    let fleet = Fleet::start(2, 4).await;
    let s = fleet.addrs.clone();
    apply(&s, "kind: Model\nmetadata:\n  name: hedge\n  labels: {flotilla.io/placement: spread}\nspec:\n  engine: sim\n  source: file:///models/hedge\n  replicas: 2\n  gpus: 1\n".into()).await;
    let r = wait_replicas(&s, "hedge", 60, "2 ready", |r| r.len() == 2 && ready(r) == 2).await;
    let victim = r[0].node.clone().unwrap();
    let idx = fleet.agents.iter().position(|a| a.name == victim).unwrap();
    // SIGSTOP: the agent stops heartbeating, its engines keep running (a network cut).
    let pid = fleet.agents[idx].pid();
    flotilla_testkit::procs::signal(pid, Signal::STOP);
    let t0 = Instant::now();
    let other = fleet.agents[1 - idx].name.clone();
    wait_replicas(&s, "hedge", 30, "2 ready on the other node", |r| {
        r.iter().filter(|x| x.phase == "Ready" && x.node.as_deref() == Some(other.as_str())).count() == 2
    })
    .await;
    let healed = t0.elapsed();
    eprintln!("node loss healed in {:.1} s", healed.as_secs_f64());
    assert!(healed < Duration::from_secs(14), "hedged within TTL (5 s) + start, not TTL + grace (15 s+): {healed:?}");
    let log = events(&s, &["--for", "model/hedge"]);
    assert!(log.contains("NodeNotReady") && log.contains(&victim), "{log}");
    // The node comes back before the grace ends: one replica too many, drained.
    flotilla_testkit::procs::signal(pid, Signal::CONT);
    wait_replicas(&s, "hedge", 60, "back to 2 replicas", |r| r.len() == 2 && ready(r) == 2).await;
}

/// A canary rollout of 2 steps of 3 s, rolled back when its TTFT p95 exceeds `ratio` times
/// the old template's.
fn canary_manifest(name: &str, args: &[&str], ratio: u32) -> String {
    format!(
        "{}  rollout:\n    canary: {{steps: [50, 100], interval: 3s, min_requests: 5, max_ttft_p95_ratio: {ratio}}}\n",
        manifest_with_args(name, 2, args)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_canary_is_rolled_back_with_the_reason_and_a_healthy_one_is_promoted() {
    let fleet = Fleet::start(2, 4).await;
    let s = fleet.addrs.clone();
    // Engines 2x faster than a real A100 (the fleet's sims run 50x): with 1,000-token prompts
    // the old template's TTFT is tens of ms of simulated prefill, well above this machine's
    // noise, so a healthy canary's ratio stays near 1 even on a loaded host.
    apply(&s, canary_manifest("can", &["--speedup", "2"], 3)).await;
    wait_replicas(&s, "can", 60, "2 ready", |r| r.len() == 2 && ready(r) == 2).await;
    let gateway = GatewayProc::start(&s.join(","), &[]);
    for _ in 0..300 {
        if raw_http::http_get(&gateway.addr, "/health").await.is_some_and(|(c, _)| c == 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let load = Load::start_with(&gateway.addr, "can", 4, 1000, 16);

    // 10x slower engines (the sim's --speedup, last value wins as in vLLM): the first
    // step's analysis finds the TTFT p95 far above 3x the old template's.
    apply(&s, canary_manifest("can", &["--speedup", "0.2"], 3)).await;
    let (code, out, err) = rollout(&s, &["status", "model", "can", "--timeout", "90s"]);
    assert_eq!(code, 1, "a rolled-back canary fails `rollout status`: {out}{err}");
    assert!(err.contains("canary rolled back") && err.contains("TTFT p95"), "{err}");
    let (_, history, _) = rollout(&s, &["history", "model", "can"]);
    assert!(history.contains("canary rolled back: TTFT p95"), "{history}");
    eprintln!("{history}");
    wait_replicas(&s, "can", 60, "the canary replicas gone", |r| r.len() == 2 && ready(r) == 2).await;
    for args in args_of_replicas(&s, "can").await {
        assert_eq!(args, vec!["--speedup", "2"], "the old template serves");
    }

    // A healthy template walks both steps and replaces the old replicas.
    // A bound of 8 here: a 3 s step sees 10-30 requests, and on a 2-core host shared with
    // other test binaries a healthy canary's p95 once measured 4.04x the old one's (316 vs
    // 78 ms) and was rolled back; the slow canary above (10x) is caught at 3.
    apply(&s, canary_manifest("can", &["--speedup", "2", "--max-num-seqs", "64"], 8)).await;
    let (code, out, err) = rollout(&s, &["status", "model", "can", "--timeout", "90s"]);
    assert_eq!(code, 0, "{out}{err}");
    wait_replicas(&s, "can", 60, "2 ready", |r| r.len() == 2 && ready(r) == 2).await;
    for args in args_of_replicas(&s, "can").await {
        assert_eq!(args, vec!["--speedup", "2", "--max-num-seqs", "64"]);
    }
    let log = events(&s, &["--for", "model/can"]);
    for reason in ["CanaryRolledBack", "CanaryStep", "CanaryPromoted"] {
        assert!(log.contains(reason), "no {reason}: {log}");
    }
    let (ok, failures) = load.finish().await;
    assert!(failures.is_empty(), "{} of {} requests failed: {:?}", failures.len(), ok + failures.len(), failures);
}
