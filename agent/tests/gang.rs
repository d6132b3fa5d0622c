//! A multi-node replica (a gang) of real `sim` engine processes run by two real agents, each
//! with its own fake server (the leader's part is played by the test): the head reports its
//! rendezvous address, the worker waits for it, then both run; the head serves once the
//! worker joined, and a killed worker takes the head down with it.

mod common;

use common::*;
use flotilla_api::pb;
use flotilla_testkit::procs::{signal_group, Signal};

fn member(rank: u32, head_address: &str) -> pb::ReplicaAssignment {
    pb::ReplicaAssignment {
        gang: Some(pb::GangAssignment {
            size: 2,
            rank,
            layout: "tp-pp".into(),
            gpus_per_node: 1,
            head_address: head_address.into(),
        }),
        ..sim_replica("big-0", "big", &[0])
    }
}

fn report(server: &FakeServer, agent: &TestAgent) -> Option<pb::EngineReport> {
    let _ = agent.reports();
    server.engines().into_iter().find(|e| e.replica == "big-0")
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
    let body = r#"{"model": "big", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}"#;
    let (status, text) =
        http_request_with_key(&ready_head.endpoint, "POST", "/v1/chat/completions", body, &ready_head.api_key)
            .await
            .expect("the head answers");
    assert_eq!(status, 200, "{text}");
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
    assert_eq!(failed.reason, "layout ray is not launched by agents yet");
    assert_eq!((failed.pid, failed.rendezvous.as_str()), (0, ""));
    let mut beyond = member(2, "127.0.0.1:1");
    beyond.replica = "big-1".into();
    server.assign(vec![beyond]);
    let failed = eventually(20, "a rank outside its gang failed", || {
        let _ = agent.reports();
        server.engines().into_iter().find(|e| e.replica == "big-1" && e.state == "failed")
    })
    .await;
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
