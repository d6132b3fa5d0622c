//! A multi-node replica (a gang) of real `sim` engine processes run by two real agents, each
//! with its own fake server (the leader's part is played by the test): the head reports its
//! rendezvous address, the worker waits for it, then both run; the head serves once the
//! worker joined, and a killed worker takes the head down with it.

mod common;

use common::*;
use flotilla_api::pb;
use flotilla_testkit::procs::{signal_group, Signal};

fn member(rank: u32, head_address: &str) -> pb::ReplicaAssignment {
    pb::ReplicaAssignment { gang: Some(two_node_gang(rank, head_address)), ..sim_replica("big-0", "big", &[0]) }
}

fn report(server: &FakeServer, agent: &TestAgent) -> Option<pb::EngineReport> {
    let _ = agent.reports();
    server.engines().into_iter().find(|e| e.replica == "big-0")
}

/// A chat completion through a ready head with its key; the body of its 200.
async fn chat(head: &pb::EngineReport) -> String {
    let body = r#"{"model": "big", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}"#;
    let (status, text) = http_request_with_key(&head.endpoint, "POST", "/v1/chat/completions", body, &head.api_key)
        .await
        .expect("the head answers");
    assert_eq!(status, 200, "{text}");
    text
}

/// `replica`'s report once it is `failed`.
async fn failed_report(server: &FakeServer, agent: &TestAgent, replica: &str, what: &str) -> pb::EngineReport {
    eventually(20, what, || {
        let _ = agent.reports();
        server.engines().into_iter().find(|e| e.replica == replica && e.state == "failed")
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_node_gang_forms_serves_and_fails_with_its_worker() {
    let (head_server, worker_server) = (FakeServer::start().await, FakeServer::start().await);
    let (head_dir, worker_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let backoff = [
        "--gpus",
        "1",
        "--gpu-type",
        "H100-80GB",
        "--restart-backoff-initial-ms",
        "200",
        "--restart-backoff-max-ms",
        "400",
    ];
    let head = TestAgent::start(agent_args(&[head_server.addr], head_dir.path(), "gang-a", &backoff)).await;
    let worker = TestAgent::start(agent_args(&[worker_server.addr], worker_dir.path(), "gang-b", &backoff)).await;

    // Both assigned at once, as the leader does: the worker without its head's address.
    head_server.assign(vec![member(0, "")]);
    worker_server.assign(vec![member(1, "")]);
    let waiting = eventually(20, "the worker waits for its head", || {
        report(&worker_server, &worker).filter(|r| r.reason.contains("rendezvous address"))
    })
    .await;
    assert_eq!(waiting.state, "starting");
    assert_eq!(waiting.reason, "waiting for the gang's head (rank 0) to report its rendezvous address");
    assert_eq!((waiting.pid, waiting.endpoint.as_str()), (0, ""), "nothing launched");
    let rendezvous = eventually(20, "the head reports its rendezvous address", || {
        report(&head_server, &head).map(|r| r.rendezvous).filter(|r| !r.is_empty())
    })
    .await;
    assert!(rendezvous.starts_with("127.0.0.1:"), "{rendezvous}");
    // The head runs, and cannot serve while its worker is missing.
    let starting =
        eventually(20, "the head's engine started", || report(&head_server, &head).filter(|r| r.pid > 0)).await;
    assert_ne!(starting.endpoint, rendezvous, "the rendezvous is a port of its own");
    assert_eq!(report(&head_server, &head).unwrap().state, "starting", "no ready head without its worker");
    let mut health = None;
    for _ in 0..100 {
        health = http_get(&starting.endpoint, "/health").await;
        if health.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (status, body) = health.expect("the head answers /health");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("waiting for ranks 1"), "{body}");

    // The leader passes the address on: the worker's assignment changes.
    worker_server.assign(vec![member(1, &rendezvous)]);
    let ready_worker = eventually(30, "the worker ready", || {
        report(&worker_server, &worker).filter(|r| r.state == "ready" && r.pid > 0)
    })
    .await;
    assert_eq!(ready_worker.endpoint, "", "a headless worker serves nothing");
    assert_eq!(ready_worker.rendezvous, "", "only heads report a rendezvous");
    let ready_head =
        eventually(30, "the head ready", || report(&head_server, &head).filter(|r| r.state == "ready")).await;
    assert_eq!((ready_head.endpoint.as_str(), ready_head.pid), (starting.endpoint.as_str(), starting.pid));
    assert_eq!(ready_head.rendezvous, rendezvous, "reported while it runs");
    let text = chat(&ready_head).await;
    assert!(text.contains("\"choices\""), "{text}");
    assert!(alive(ready_worker.pid) && alive(ready_head.pid));

    // A lost rank is fatal to the head, as in vLLM: both agents see their engine crash.
    signal_group(ready_worker.pid, Signal::KILL);
    let crashed = eventually(30, "the head's engine crashed with its worker", || {
        report(&head_server, &head).filter(|r| r.state == "crashed" || r.restarts > 0)
    })
    .await;
    assert!(crashed.restarts > 0 || crashed.reason.contains("exit status 1"), "{crashed:?}");
    eventually(30, "the worker's engine crashed", || {
        report(&worker_server, &worker).filter(|r| r.state == "crashed" || r.restarts > 0)
    })
    .await;
    // Both are restarted (same rendezvous address) and the gang forms again.
    let again = eventually(60, "the gang formed again", || {
        let h = report(&head_server, &head).filter(|r| r.state == "ready" && r.pid != ready_head.pid)?;
        let w = report(&worker_server, &worker).filter(|r| r.state == "ready" && r.pid != ready_worker.pid)?;
        Some((h, w))
    })
    .await;
    assert_eq!(again.0.rendezvous, rendezvous, "the head keeps its rendezvous port across restarts");
    drop((head, worker));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gangs_the_agent_cannot_run_fail_with_the_reason() {
    let server = FakeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(agent_args(&[server.addr], dir.path(), "gang-ray", &[])).await;
    let mut ray = member(0, "");
    ray.gang.as_mut().unwrap().layout = "ray".into();
    server.assign(vec![ray]);
    let failed = eventually(20, "a ray gang failed", || report(&server, &agent).filter(|r| r.state == "failed")).await;
    assert!(failed.reason.starts_with("layout ray needs an agent started with --ray"), "{}", failed.reason);
    assert_eq!((failed.pid, failed.rendezvous.as_str()), (0, ""));
    let mut beyond = member(2, "127.0.0.1:1");
    beyond.replica = "big-1".into();
    server.assign(vec![beyond]);
    let failed = failed_report(&server, &agent, "big-1", "a rank outside its gang failed").await;
    assert!(failed.reason.contains("rank 2 of a gang of 2"), "{}", failed.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_adopts_its_head_with_the_same_rendezvous() {
    let server = FakeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let args = || agent_args(&[server.addr], dir.path(), "gang-adopt", &[]);
    let mut agent = TestAgent::start(args()).await;
    server.assign(vec![member(0, "")]);
    let first = eventually(20, "the head started with a rendezvous", || {
        report(&server, &agent).filter(|r| r.pid > 0 && !r.rendezvous.is_empty())
    })
    .await;
    agent.shutdown(false).await;
    assert!(alive(first.pid), "left running for the next agent");

    let again = TestAgent::start(args()).await;
    let adopted = eventually(20, "the head adopted", || {
        let _ = again.reports();
        again.handle().reports().into_iter().find(|r| r.replica == "big-0" && r.pid == first.pid)
    })
    .await;
    assert_eq!(adopted.rendezvous, first.rendezvous, "its rendezvous port is reserved and reported again");
    // The same gang is assigned: the member is kept, not replaced.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let kept = report(&server, &again).expect("reported");
    assert_eq!((kept.pid, kept.rendezvous.as_str()), (first.pid, first.rendezvous.as_str()), "{kept:?}");
    assert!(alive(first.pid));
    drop(agent);
}

/// A worker assigned before its head has an address fetches the weights while it waits, so
/// that the gang's start after the head is up costs no download on this node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_worker_downloads_its_weights_first() {
    let server = FakeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let models = tempfile::tempdir().unwrap(); // not in the agent's data dir: the policy refuses that
    let weights = models.path().join("weights.bin");
    std::fs::write(&weights, vec![7u8; 30_000]).unwrap();
    let (bin, sub) = sim_binary();
    let template = format!("{} {sub} --host {{host}} --port {{port}} --model {{model}} {{args}}", bin.display());
    let agent = TestAgent::start(agent_args(
        &[server.addr],
        dir.path(),
        "gang-dl",
        &["--gpus", "1", "--gpu-type", "H100-80GB", "--vllm-command", &template],
    ))
    .await;
    let worker = pb::ReplicaAssignment {
        engine: "vllm".into(),
        source: format!("file://{}", weights.display()),
        ..member(1, "")
    };
    server.assign(vec![worker]);
    let waiting = eventually(20, "the worker downloads, then waits for its head", || {
        report(&server, &agent).filter(|r| r.reason.contains("rendezvous address"))
    })
    .await;
    assert_eq!(waiting.state, "starting");
    assert_eq!(waiting.download_progress, 1.0, "the weights came before the wait");
    assert_eq!(waiting.download_total_bytes, 30_000);
    assert_eq!(waiting.pid, 0, "nothing launched");

    // A download that fails fails the member at once, not once its head is up.
    let missing = pb::ReplicaAssignment {
        replica: "big-1".into(),
        engine: "vllm".into(),
        source: "file:///definitely/not/here".into(),
        ..member(1, "")
    };
    server.assign(vec![missing]);
    let failed = failed_report(&server, &agent, "big-1", "the worker's failed download fails it").await;
    assert!(failed.reason.contains("download of file:///definitely/not/here failed"), "{}", failed.reason);
}

/// Ray's CLI for the `ray`-layout test: `FLOTILLA_RAY`, else the real vLLM's venv
/// (`FLOTILLA_REAL_VLLM`, default ~/.cache/flotilla/real-vllm; `.ci/real-vllm.sh` installs
/// Ray there). None when neither exists: the test says SKIPPED, unless
/// `FLOTILLA_REQUIRE_REAL_VLLM=1` (CI), where a missing Ray fails it.
fn ray_program() -> Option<std::path::PathBuf> {
    let explicit = std::env::var_os("FLOTILLA_RAY").map(std::path::PathBuf::from);
    let venv = std::env::var_os("FLOTILLA_REAL_VLLM")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache/flotilla/real-vllm")))
        .map(|d| d.join("venv/bin/ray"));
    let found = explicit.or(venv).filter(|p| p.is_file());
    if found.is_none() && std::env::var("FLOTILLA_REQUIRE_REAL_VLLM").as_deref() == Ok("1") {
        panic!("FLOTILLA_REQUIRE_REAL_VLLM=1 but no Ray CLI: set FLOTILLA_RAY or run .ci/real-vllm.sh");
    }
    found
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Alive Ray nodes of the cluster whose GCS is at `address`, asked through Ray's own client
/// with `token` as its auth token (None: without one). None when the client cannot connect.
fn ray_alive_nodes(ray: &std::path::Path, address: &str, token: Option<&str>) -> Option<usize> {
    let python = ray.with_file_name("python");
    let script = format!(
        "import ray; ray.init(address='{address}', logging_level='ERROR'); \
         print(sum(1 for n in ray.nodes() if n['Alive']))"
    );
    let home = tempfile::tempdir().ok()?; // no ~/.ray/auth_token to fall back on
                                          // (bounded: a refused client gives up after Ray's connect timeouts)
    let mut cmd = std::process::Command::new("timeout");
    cmd.arg("90")
        .arg(python)
        .args(["-c", &script])
        .env("HOME", home.path())
        .env_remove("RAY_AUTH_TOKEN")
        .env_remove("RAY_AUTH_MODE");
    if let Some(t) = token {
        cmd.env("RAY_AUTH_MODE", "token").env("RAY_AUTH_TOKEN", t);
    }
    let out = cmd.output().ok()?;
    String::from_utf8_lossy(&out.stdout).trim().lines().last()?.parse().ok()
}

/// Processes whose command line mentions `needle` (Ray's daemons name the GCS port).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) && !cmd.contains("import ray") {
                found.push(format!("{}: {}", entry.file_name().to_string_lossy(), cmd.trim()));
            }
        }
    }
    found
}

/// A `layout: ray` gang of real Ray nodes (Ray's CLI) with a sim head: the head's
/// `flotilla ray-member` starts Ray's head on the rendezvous port and then the engine, the
/// worker's joins it with no engine; both nodes are in the cluster; a killed worker is a
/// crash; unassigned, every Ray process of the gang goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ray_gang_forms_a_ray_cluster_and_leaves_nothing_behind() {
    let Some(ray) = ray_program() else {
        eprintln!("SKIPPED: no Ray CLI (FLOTILLA_RAY, or FLOTILLA_REAL_VLLM's venv)");
        return;
    };
    let (head_server, worker_server) = (FakeServer::start().await, FakeServer::start().await);
    let (head_dir, worker_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // `flotilla ray-member` is a subcommand of the flotilla binary (scripts/test sets it).
    let Some(bin) = std::env::var_os("FLOTILLA_BIN") else {
        assert_ne!(std::env::var("FLOTILLA_REQUIRE_REAL_VLLM").as_deref(), Ok("1"), "FLOTILLA_BIN is not set");
        eprintln!("SKIPPED: FLOTILLA_BIN (the flotilla binary, for ray-member) is not set");
        return;
    };
    let (ray_flag, bin_flag) = (ray.display().to_string(), bin.to_string_lossy().into_owned());
    // Ray turns 127.0.0.1 into the machine's outward address (services.resolve_ip_for_localhost),
    // where this test may not send: each member gets a loopback address of its own instead.
    let extra = |address: &'static str| {
        vec![
            "--address".to_string(),
            address.into(),
            "--gpus".into(),
            "1".into(),
            "--gpu-type".into(),
            "H100-80GB".into(),
            "--ray".into(),
            ray_flag.clone(),
            "--ray-member-binary".into(),
            bin_flag.clone(),
            "--restart-backoff-initial-ms".into(),
            "200".into(),
            "--restart-backoff-max-ms".into(),
            "400".into(),
        ]
    };
    let (head_extra, worker_extra) = (extra("127.0.0.2"), extra("127.0.0.3"));
    let head = TestAgent::start(agent_args(&[head_server.addr], head_dir.path(), "ray-a", &as_strs(&head_extra))).await;
    let worker =
        TestAgent::start(agent_args(&[worker_server.addr], worker_dir.path(), "ray-b", &as_strs(&worker_extra))).await;
    let ray_member = |rank: u32, head_address: &str| {
        let mut m = member(rank, head_address);
        m.gang.as_mut().unwrap().layout = "ray".into();
        m
    };
    head_server.assign(vec![ray_member(0, "")]);
    worker_server.assign(vec![ray_member(1, "")]);
    let (rendezvous, token) = eventually(20, "the head reports its rendezvous address and gang token", || {
        report(&head_server, &head).map(|r| (r.rendezvous, r.gang_token)).filter(|(r, _)| !r.is_empty())
    })
    .await;
    assert!(token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()), "a 256-bit token: {token:?}");
    // Ray's head takes seconds to start; the engine follows it.
    let ready_head = eventually(90, "the head's Ray node and engine up", || {
        report(&head_server, &head).filter(|r| r.state == "ready")
    })
    .await;
    // A worker without the token is refused before it starts anything.
    worker_server.assign(vec![ray_member(1, &rendezvous)]);
    let refused = eventually(20, "a ray worker without the gang's token fails", || {
        report(&worker_server, &worker).filter(|r| r.state == "failed")
    })
    .await;
    assert!(refused.reason.contains("no gang token"), "{}", refused.reason);
    let mut with_token = ray_member(1, &rendezvous);
    with_token.gang.as_mut().unwrap().token = token.clone();
    worker_server.assign(vec![with_token]);
    let ready_worker = eventually(60, "the worker's Ray node running", || {
        report(&worker_server, &worker).filter(|r| r.state == "ready" && r.pid > 0)
    })
    .await;
    assert_eq!(ready_worker.endpoint, "", "a Ray worker serves nothing");
    let mut nodes = None;
    for _ in 0..30 {
        nodes = ray_alive_nodes(&ray, &rendezvous, Some(&token));
        if nodes == Some(2) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    assert_eq!(nodes, Some(2), "both members' Ray nodes joined the cluster at {rendezvous}");
    assert_eq!(ray_alive_nodes(&ray, &rendezvous, None), None, "Ray refuses a client without the token");
    assert_eq!(ray_alive_nodes(&ray, &rendezvous, Some(&"0".repeat(64))), None, "and one with another token");
    chat(&ready_head).await;

    // The worker's member killed: a crash its agent reports (the leader fails the gang).
    signal_group(ready_worker.pid, Signal::KILL);
    eventually(30, "the worker's member crashed", || {
        report(&worker_server, &worker).filter(|r| r.state == "crashed" || r.restarts > 0)
    })
    .await;

    // Unassigned: each agent stops its member, and every Ray process of this cluster goes.
    head_server.assign(vec![]);
    worker_server.assign(vec![]);
    let port = rendezvous.rsplit_once(':').unwrap().1.to_string();
    let mut left = Vec::new();
    for _ in 0..60 {
        left = processes_mentioning(&port)
            .into_iter()
            .filter(|p| p.contains("ray") || p.contains("gcs_server") || p.contains("raylet"))
            .collect();
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(left.is_empty(), "Ray processes left behind: {left:#?}");
    drop((head, worker));
}
