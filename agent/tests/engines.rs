//! Multi-process tests of the agent against a fake server: real `sim` engine processes,
//! real crashes (the sim's fault injection), real agent restarts.

mod common;

use std::time::Duration;

use common::*;
use flotilla_api::pb;

fn by_name<'a>(engines: &'a [pb::EngineReport], name: &str) -> Option<&'a pb::EngineReport> {
    engines.iter().find(|e| e.replica == name)
}

fn ready_endpoint(engines: &[pb::EngineReport], name: &str) -> Option<(String, u32)> {
    by_name(engines, name).filter(|e| e.state == "ready").map(|e| (e.endpoint.clone(), e.pid))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_gpus_runs_assigned_engines_and_stops_unassigned_ones() {
    let server = FakeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let args = agent_args(
        &[server.addr],
        dir.path(),
        "node-a",
        &["--gpus", "2", "--gpu-type", "A100-80GB", "--labels", "zone=z1"],
    );
    let mut agent = TestAgent::start(args).await;

    let reg = eventually(20, "registration", || server.registrations().first().cloned()).await;
    assert_eq!(reg.node_name, "node-a");
    assert_eq!(reg.gpus.len(), 2);
    assert!(reg.gpus.iter().all(|g| g.gpu_type == "A100-80GB" && g.memory_mib == 81920 && g.healthy));
    assert_eq!(reg.labels.get("zone").map(String::as_str), Some("z1"));
    assert!(!reg.agent_id.is_empty());

    server.assign(vec![sim_replica("demo-0", "demo", &[0]), sim_replica("demo-1", "demo", &[1])]);
    let (a, b) = eventually(30, "both engines ready in a heartbeat", || {
        let e = server.engines();
        let _ = agent.reports();
        Some((ready_endpoint(&e, "demo-0")?, ready_endpoint(&e, "demo-1")?))
    })
    .await;
    assert_ne!(a.0, b.0, "distinct endpoints");
    let engines = server.engines();
    let keys: Vec<String> =
        ["demo-0", "demo-1"].iter().map(|n| by_name(&engines, n).unwrap().api_key.clone()).collect();
    assert!(keys.iter().all(|k| k.len() == 64) && keys[0] != keys[1], "a key of its own per engine");
    for ((endpoint, pid), key) in [&a, &b].into_iter().zip(&keys) {
        assert!(alive(*pid));
        let (status, body) =
            http_request_with_key(endpoint, "GET", "/v1/models", "", key).await.expect("engine answers");
        assert_eq!(status, 200);
        assert!(body.contains("\"demo\""), "{body}");
        let (status, body) = http_get(endpoint, "/v1/models").await.expect("engine answers");
        assert_eq!((status, body.as_str()), (401, r#"{"error":"Unauthorized"}"#), "no key, no API");
        assert_eq!(http_get(endpoint, "/health").await.map(|r| r.0), Some(200), "/health needs no key");
    }

    server.assign(vec![sim_replica("demo-0", "demo", &[0])]);
    eventually(20, "demo-1 gone from heartbeats and its process dead", || {
        let e = server.engines();
        (by_name(&e, "demo-1").is_none() && !alive(b.1)).then_some(())
    })
    .await;
    assert_eq!(ready_endpoint(&server.engines(), "demo-0"), Some(a.clone()), "the kept engine was not restarted");

    agent.shutdown(true).await;
    eventually(10, "engines stopped on shutdown(stop_engines=true)", || (!alive(a.1)).then_some(())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_engine_is_restarted_and_repeated_crashes_fail_it() {
    let server = FakeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let args = agent_args(
        &[server.addr],
        dir.path(),
        "node-crash",
        &[
            "--sim-args=--speedup 50 --allow-faults",
            "--restart-backoff-initial-ms",
            "100",
            "--restart-backoff-max-ms",
            "400",
            "--max-crashes",
            "3",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let agent = TestAgent::start(args).await;
    server.assign(vec![sim_replica("r0", "m", &[])]);

    let mut last_pid = 0;
    for crash in 1..=3u32 {
        let (endpoint, pid) = eventually(30, "engine ready", || {
            let _ = agent.reports();
            ready_endpoint(&server.engines(), "r0").filter(|(_, p)| *p != last_pid)
        })
        .await;
        let (status, _) =
            http_request(&endpoint, "POST", "/sim/faults", r#"{"crash": true}"#).await.unwrap_or((0, String::new()));
        assert!(status == 200 || status == 0, "fault injection answered {status}");
        last_pid = pid;
        if crash < 3 {
            eventually(30, "restart counted", || {
                by_name(&server.engines(), "r0").filter(|e| e.restarts == crash).map(|_| ())
            })
            .await;
        }
    }
    let failed = eventually(30, "engine failed after 3 crashes", || {
        by_name(&server.engines(), "r0").filter(|e| e.state == "failed").cloned()
    })
    .await;
    assert!(failed.reason.contains("crashed 3 times") && failed.reason.contains("exit status 1"), "{}", failed.reason);
    assert_eq!(failed.restarts, 2);
    assert!(!alive(last_pid));

    // The agent's /metrics counted all of it.
    let addr = agent.handle().metrics_addr().expect("--metrics-listen").to_string();
    let (status, text) = http_request(&addr, "GET", "/metrics", "").await.expect("scrape");
    assert_eq!(status, 200);
    for line in [
        "flotilla_agent_engine_starts_total{engine=\"sim\"} 3",
        "flotilla_agent_engine_crashes_total{engine=\"sim\"} 3",
        "flotilla_agent_engine_failures_total{engine=\"sim\"} 1",
        "flotilla_agent_engine_start_seconds_count{engine=\"sim\"} 3",
        "flotilla_agent_engines{state=\"failed\"} 1",
        "flotilla_agent_engines{state=\"ready\"} 0",
        "flotilla_agent_engine_restarts 2",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
    let (code, problems) = flotilla_testkit::promtool::check_metrics(&text);
    assert_eq!(code, 0, "promtool check metrics: {problems}");
    assert_eq!(http_request(&addr, "GET", "/other", "").await.map(|r| r.0), Some(404));
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_agent_adopts_its_engines_without_starting_them_twice() {
    let server = FakeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let replicas = vec![sim_replica("a-0", "adopt", &[]), sim_replica("a-1", "adopt", &[])];
    server.assign(replicas.clone());

    let mut first = TestAgent::start(agent_args(&[server.addr], dir.path(), "node-adopt", &[])).await;
    let before = eventually(30, "both ready", || {
        let _ = first.reports();
        let e = server.engines();
        Some([ready_endpoint(&e, "a-0")?, ready_endpoint(&e, "a-1")?])
    })
    .await;
    first.shutdown(false).await;
    for (_, pid) in &before {
        assert!(alive(*pid), "agent exit must leave engines running");
    }

    // Keep the first agent's pids for cleanup if the rest fails.
    let mut second = TestAgent::start(agent_args(&[server.addr], dir.path(), "node-adopt", &[])).await;
    second.pids.lock().unwrap().extend(before.iter().map(|(_, p)| *p));
    eventually(20, "second registration", || (server.registrations().len() >= 2).then_some(())).await;
    let after = eventually(30, "adopted engines ready", || {
        let r = second.reports();
        Some([ready_endpoint(&r, "a-0")?, ready_endpoint(&r, "a-1")?])
    })
    .await;
    assert_eq!(after, before, "same processes and endpoints: adopted, not restarted");
    // Several heartbeats later, still the same processes (no double start).
    tokio::time::sleep(Duration::from_millis(600)).await;
    let reports = second.reports();
    let now: Vec<_> = reports.iter().map(|e| e.pid).collect();
    // The whole reports on failure: a pid 0 here once came with no clue to its state.
    assert!(now.iter().all(|p| before.iter().any(|(_, b)| b == p)), "{now:?} vs {before:?}; reports: {reports:?}");

    // An engine not in the next Assign is stopped.
    server.assign(vec![replicas[0].clone()]);
    eventually(20, "unassigned adopted engine stopped", || (!alive(before[1].1)).then_some(())).await;
    assert!(alive(before[0].1));
    second.shutdown(true).await;
    eventually(10, "stopped", || (!alive(before[0].1)).then_some(())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_leader_hint_of_a_follower() {
    let leader = FakeServer::start().await;
    let follower =
        FakeServer::rejecting(tonic::Code::FailedPrecondition, &format!("cluster.not_leader: leader={}", leader.addr))
            .await;
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(agent_args(&[follower.addr], dir.path(), "node-hint", &[])).await;
    let reg = eventually(20, "registered with the leader", || leader.registrations().first().cloned()).await;
    assert_eq!(reg.node_name, "node-hint");
    eventually(10, "heartbeats reach the leader", || (leader.heartbeats() >= 2).then_some(())).await;
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tries_the_next_server_when_one_is_down() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let live = FakeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(agent_args(&[dead, live.addr], dir.path(), "node-list", &[])).await;
    eventually(20, "registered with the second server", || live.registrations().first().cloned()).await;
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_node_name_ends_the_agent_with_an_error() {
    let server =
        FakeServer::rejecting(tonic::Code::AlreadyExists, "node.duplicate: node-dup is registered by agent 1234").await;
    let dir = tempfile::tempdir().unwrap();
    let args = agent_args(&[server.addr], dir.path(), "node-dup", &[]);
    let err = tokio::time::timeout(Duration::from_secs(20), flotilla_agent::run(args))
        .await
        .expect("run returns")
        .expect_err("duplicate name is fatal");
    assert!(matches!(err, flotilla_agent::AgentError::DuplicateNode { .. }), "{err:?}");
    assert_eq!(err.exit_code(), 1);
    assert!(err.to_string().contains("node-dup"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_keep_running_while_the_server_is_gone_and_reconcile_on_return() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start().await;
    let addr = server.addr;
    server.assign(vec![sim_replica("s-0", "stable", &[])]);
    let agent = TestAgent::start(agent_args(&[addr], dir.path(), "node-stable", &[])).await;
    let (_, pid) = eventually(30, "ready", || {
        let _ = agent.reports();
        ready_endpoint(&server.engines(), "s-0")
    })
    .await;
    drop(server);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(alive(pid), "engine survives the loss of the server");
    assert_eq!(ready_endpoint(&agent.reports(), "s-0").map(|e| e.1), Some(pid));
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_engine_is_reported_not_ready_then_restarted() {
    let server = FakeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let args = agent_args(
        &[server.addr],
        dir.path(),
        "node-hang",
        &[
            "--sim-args=--speedup 50 --allow-faults",
            "--engine-liveness-timeout-s",
            "3",
            "--restart-backoff-initial-ms",
            "100",
        ],
    );
    let agent = TestAgent::start(args).await;
    server.assign(vec![sim_replica("h-0", "m", &[])]);
    let (endpoint, pid) = eventually(30, "ready", || {
        let _ = agent.reports();
        ready_endpoint(&server.engines(), "h-0")
    })
    .await;
    let (status, _) = http_request(&endpoint, "POST", "/sim/faults", r#"{"hang": true}"#).await.unwrap();
    assert_eq!(status, 200);
    let not_ready = eventually(15, "reported not ready", || {
        by_name(&server.engines(), "h-0").filter(|e| e.state == "starting").cloned()
    })
    .await;
    assert!(not_ready.reason.contains("/health failing"), "{}", not_ready.reason);
    let (_, new_pid) = eventually(30, "restarted and ready again", || {
        let _ = agent.reports();
        ready_endpoint(&server.engines(), "h-0").filter(|(_, p)| *p != pid)
    })
    .await;
    assert!(!alive(pid) && alive(new_pid));
    assert_eq!(by_name(&server.engines(), "h-0").map(|e| e.restarts), Some(1));
    drop(agent);
}

/// Starts one sim engine (real time: streams last seconds) under an agent with `drain_ms`,
/// opens a streamed completion on it, unassigns the replica while the stream runs and
/// returns (the stream's body, whether the engine was reported `draining`).
async fn unassign_during_a_stream(drain_ms: &str) -> (String, bool) {
    let server = FakeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let extra = ["--gpus", "1", "--gpu-type", "A100-80GB", "--sim-args=--speedup 1", "--drain-timeout-ms", drain_ms];
    let mut agent = TestAgent::start(agent_args(&[server.addr], dir.path(), "node-a", &extra)).await;
    server.assign(vec![sim_replica("demo-0", "demo", &[0])]);
    let (endpoint, pid) = eventually(30, "engine ready", || ready_endpoint(&server.engines(), "demo-0")).await;
    let key = by_name(&server.engines(), "demo-0").unwrap().api_key.clone();

    // ~150 decode steps: about 2 s of streaming at speedup 1.
    let body = r#"{"model":"demo","prompt":"tell me a long story","max_tokens":150,"ignore_eos":true,"stream":true}"#;
    let stream =
        tokio::spawn(async move { http_request_with_key(&endpoint, "POST", "/v1/completions", body, &key).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.assign(vec![]);
    let mut saw_draining = false;
    eventually(20, "engine gone from heartbeats", || {
        let e = server.engines();
        saw_draining |= by_name(&e, "demo-0").is_some_and(|r| r.state == "draining");
        by_name(&e, "demo-0").is_none().then_some(())
    })
    .await;
    let (status, text) = stream.await.unwrap().expect("the engine answered");
    assert_eq!(status, 200, "{text}");
    assert!(!alive(pid), "stopped after the drain");
    agent.shutdown(true).await;
    (text, saw_draining)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unassigned_engine_finishes_its_streams_before_it_is_stopped() {
    let (text, saw_draining) = unassign_during_a_stream("20000").await;
    assert!(text.contains("data: [DONE]"), "stream cut by the stop: {text}");
    assert!(saw_draining, "heartbeats showed the engine draining");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_outlasts_its_timeout_is_cut() {
    let (text, _) = unassign_during_a_stream("200").await;
    assert!(!text.contains("data: [DONE]"), "a 200 ms drain cannot outlast a 2 s stream: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dir_is_private_after_start_and_a_corrupt_state_file_stops_the_next_start() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let server = FakeServer::start().await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("agent");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let args = || agent_args(&[server.addr], &dir, "node-p", &["--gpus", "1", "--gpu-type", "A100-80GB"]);
    let mut agent = TestAgent::start(args()).await;
    let reg = eventually(20, "registration", || server.registrations().first().cloned()).await;
    let ports = reg.engine_ports.expect("the agent tells its engine port range");
    assert!(ports.low >= 30000 && ports.high == ports.low + 49, "{ports:?}");

    server.assign(vec![sim_replica("p-0", "demo", &[0])]);
    eventually(30, "engine ready", || ready_endpoint(&server.engines(), "p-0")).await;
    assert_eq!(mode(&dir), 0o700, "an open data dir is tightened at start");
    for d in ["logs", "models"] {
        assert_eq!(mode(&dir.join(d)), 0o700, "{d}");
    }
    for f in ["agent-id", "agent.lock", "engines.json", "logs/p-0.log"] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    let leftovers: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    agent.shutdown(true).await;

    std::fs::write(dir.join("engines.json"), b"{\"p-0\": {\"process\": ").unwrap();
    let e = match flotilla_agent::start(args()).await {
        Ok(_) => panic!("an agent started on a corrupt state file"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains(&dir.join("engines.json").display().to_string()) && e.contains("corrupt state file"), "{e}");
}

/// The names in `/proc/PID/environ`.
fn environ_names(pid: u32) -> Vec<String> {
    let raw = flotilla_testkit::proc_fs::environ(pid).expect("read the engine's environ");
    flotilla_testkit::proc_fs::split_nul(&raw)
        .into_iter()
        .map(|kv| kv.split_once('=').map_or(kv.clone(), |(k, _)| k.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_engine_args_fail_the_replica_naming_the_flag() {
    let server = FakeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(agent_args(&[server.addr], dir.path(), "node-policy", &[])).await;
    let mut trusting = sim_replica("t-0", "demo", &[]);
    trusting.engine_args = vec!["--max-model-len".into(), "4096".into(), "--trust_remote_code".into()];
    let mut moved = sim_replica("p-0", "demo", &[]);
    moved.engine_args = vec!["--port=9".into()];
    server.assign(vec![trusting, moved, sim_replica("ok-0", "demo", &[])]);
    let (t, p) = eventually(30, "both refused replicas failed", || {
        let e = agent.reports();
        Some((
            by_name(&e, "t-0").filter(|r| r.state == "failed")?.clone(),
            by_name(&e, "p-0").filter(|r| r.state == "failed")?.clone(),
        ))
    })
    .await;
    assert!(t.reason.contains("--trust_remote_code") && t.reason.contains("--trust-remote-code"), "{}", t.reason);
    assert!(t.reason.contains("--engine-policy"), "says how to allow it: {}", t.reason);
    assert!(p.reason.contains("--port") && p.reason.contains("set by the agent"), "{}", p.reason);
    assert_eq!((t.pid, p.pid), (0, 0), "no process was started");
    eventually(30, "the allowed replica runs", || ready_endpoint(&agent.reports(), "ok-0")).await;
    drop(agent);

    // The node's policy file is read: a flag the sim accepts, denied there, is refused.
    let server = FakeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "allow: [--trust-remote-code]\ndeny: [--no-enable-*]\n").unwrap();
    let extra = ["--engine-policy", policy.to_str().unwrap()];
    let agent = TestAgent::start(agent_args(&[server.addr], dir.path(), "node-strict", &extra)).await;
    let mut denied = sim_replica("d-0", "demo", &[]);
    denied.engine_args = vec!["--no-enable-prefix-caching".into()];
    server.assign(vec![denied]);
    let d = eventually(30, "the denied replica failed", || {
        by_name(&agent.reports(), "d-0").filter(|r| r.state == "failed").cloned()
    })
    .await;
    assert!(d.reason.contains("--no-enable-*") && d.reason.contains("engine policy"), "{}", d.reason);
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_engine_the_new_policy_refuses_is_stopped_and_failed() {
    let server = FakeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut r = sim_replica("old-0", "demo", &[]);
    r.engine_args = vec!["--no-enable-prefix-caching".into()];
    server.assign(vec![r]);
    let mut first = TestAgent::start(agent_args(&[server.addr], dir.path(), "node-repolicy", &[])).await;
    let (_, pid) = eventually(30, "engine ready", || ready_endpoint(&first.reports(), "old-0")).await;
    first.shutdown(false).await;
    assert!(alive(pid), "left running for the next agent");

    // The next agent on this node runs under a stricter policy.
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "deny: [--no-enable-prefix-caching]\n").unwrap();
    let extra = ["--engine-policy", policy.to_str().unwrap()];
    let second = TestAgent::start(agent_args(&[server.addr], dir.path(), "node-repolicy", &extra)).await;
    second.pids.lock().unwrap().insert(pid);
    let failed = eventually(30, "the adopted engine failed", || {
        by_name(&second.reports(), "old-0").filter(|e| e.state == "failed").cloned()
    })
    .await;
    assert!(failed.reason.contains("--no-enable-prefix-caching"), "{}", failed.reason);
    eventually(20, "the refused engine stopped", || (!alive(pid)).then_some(())).await;
    let state = std::fs::read_to_string(dir.path().join("engines.json")).unwrap_or_default();
    assert!(!state.contains("old-0"), "forgotten by the state file: {state}");
    drop(second);
}

/// The environment of the engine `agent_extra` gives an agent for one sim replica.
async fn engine_environ(agent_extra: &[&str]) -> (Vec<String>, Vec<String>, String) {
    let server = FakeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut agent = TestAgent::start(agent_args(&[server.addr], dir.path(), "node-env", agent_extra)).await;
    server.assign(vec![sim_replica("env-0", "demo", &[])]);
    let (_, pid) = eventually(30, "engine ready", || ready_endpoint(&agent.reports(), "env-0")).await;
    let key = by_name(&agent.reports(), "env-0").unwrap().api_key.clone();
    let out = (environ_names(pid), flotilla_testkit::proc_fs::args(pid), key);
    agent.shutdown(true).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_get_only_allowed_environment_variables() {
    // Cargo sets CARGO_* variables for this test process, and so for the in-process agent.
    assert!(std::env::var("CARGO_PKG_NAME").is_ok(), "run under cargo");
    let (names, args, key) = engine_environ(&["--engine-env", "CARGO_PKG_*,NO_SUCH_VAR"]).await;
    let allowed = |n: &str| {
        n.starts_with("CARGO_PKG_")
            || flotilla_agent::engine_env::DEFAULT_ALLOWED.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => n.starts_with(prefix),
                None => n == *p,
            })
    };
    let strays: Vec<&String> = names.iter().filter(|n| !allowed(n)).collect();
    assert!(strays.is_empty(), "the engine got variables nobody allowed: {strays:?}");
    assert!(names.iter().any(|n| n == "CARGO_PKG_NAME"), "--engine-env lets CARGO_PKG_* through: {names:?}");
    assert!(names.iter().any(|n| n == "VLLM_API_KEY"), "the agent gives the key: {names:?}");
    assert!(!names.iter().any(|n| n == "CARGO_MANIFEST_DIR"), "{names:?}");
    assert!(!args.iter().any(|a| a.contains(&key)), "the key is not on the command line: {args:?}");

    let (names, _, _) = engine_environ(&[]).await;
    assert!(!names.iter().any(|n| n.starts_with("CARGO_")), "no --engine-env, no CARGO_*: {names:?}");
}

/// `--kv-events`: each engine publishes its KV cache events on the node address, and says
/// where at `GET /kv_event_sources`, with a topic of its own; without the flag it publishes none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_events_are_published_on_the_node_address_when_asked() {
    for on in [true, false] {
        let server = FakeServer::start().await;
        let dir = tempfile::tempdir().unwrap();
        let mut extra = vec!["--gpus", "1", "--gpu-type", "A100-80GB"];
        if on {
            extra.push("--kv-events");
        }
        let agent = TestAgent::start(agent_args(&[server.addr], dir.path(), "node-kv", &extra)).await;
        server.assign(vec![sim_replica("kv-0", "demo", &[0])]);
        let (endpoint, _) = eventually(30, "the engine ready", || {
            let _ = agent.reports();
            ready_endpoint(&server.engines(), "kv-0")
        })
        .await;
        let sources = flotilla_engine::EngineClient::new().kv_event_sources(&endpoint).await.unwrap();
        match (on, sources) {
            (true, Some(s)) => {
                assert!(s.endpoint.starts_with("tcp://127.0.0.1:"), "on the agent's address: {s:?}");
                assert!(s.replay_endpoint.as_deref().is_some_and(|r| r.starts_with("tcp://127.0.0.1:")), "{s:?}");
                assert_eq!(s.topic, "kv@kv-0");
            }
            (false, None) => {}
            (on, other) => panic!("--kv-events {on}: {other:?}"),
        }
        drop(agent);
    }
}
