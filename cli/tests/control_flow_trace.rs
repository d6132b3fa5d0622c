//! One trace from an apply to a Ready engine, across three processes: a Model applied
//! through a follower (`server.apply`, forwarded), the leader's apply and Raft commit, the
//! Model controller's decision (`controller.model`), the scheduler's binding
//! (`controller.bind`) and, in the agent, the replica's start (`agent.replica` with its
//! `agent.engine_start`) until the engine is Ready, all exported over OTLP to one collector
//! and linked parent to child.
mod common;

use std::time::Duration;

use common::*;
use flotilla_testkit::otlp::{attr, hex, Collector, Received, Value};

fn named<'a>(spans: &'a [Received], name: &str) -> Vec<&'a Received> {
    spans.iter().filter(|r| r.span.name == name).collect()
}

fn text(r: &Received, key: &str) -> Option<String> {
    match attr(&r.span, key)? {
        Value::StringValue(s) => Some(s),
        _ => None,
    }
}

fn child_of<'a>(spans: &'a [Received], name: &str, parent: &Received) -> Option<&'a Received> {
    spans.iter().find(|r| r.span.name == name && r.span.parent_span_id == parent.span.span_id)
}

/// The chain, if every link has arrived: (follower apply, leader apply, decision, bind,
/// agent start, engine start).
fn chain(spans: &[Received]) -> Option<[Received; 6]> {
    let first = named(spans, "server.apply").into_iter().find(|r| {
        text(r, "name").as_deref() == Some("traced") && attr(&r.span, "forwarded") == Some(Value::BoolValue(false))
    })?;
    let leader = child_of(spans, "server.apply", first)?;
    let decision = child_of(spans, "controller.model", leader)?;
    let bind = child_of(spans, "controller.bind", decision)?;
    let start = child_of(spans, "agent.replica", decision)?;
    let engine = child_of(spans, "agent.engine_start", start)?;
    Some([first, leader, decision, bind, start, engine].map(Clone::clone))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_is_one_trace_from_the_follower_to_the_ready_engine() {
    let otlp = Collector::start().await;
    let ep = otlp.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let s1 = ServerProc::start(1, &dir.path().join("s1"), "127.0.0.1:0", &["--bootstrap", "--otlp-endpoint", &ep]);
    let seed = s1.grpc.clone();
    let s2 = ServerProc::start(2, &dir.path().join("s2"), "127.0.0.1:0", &["--join", &seed, "--otlp-endpoint", &ep]);
    let s3 = ServerProc::start(3, &dir.path().join("s3"), "127.0.0.1:0", &["--join", &seed, "--otlp-endpoint", &ep]);
    let servers = [s1, s2, s3];
    let leader = wait_voters(&servers[0].grpc, 3).await;
    let addrs: Vec<String> = servers.iter().map(|s| s.grpc.clone()).collect();
    let marker = marker();
    let mut agent = AgentProc::start_with(
        "node-1",
        &dir.path().join("agent"),
        &addrs.join(","),
        2,
        marker,
        &[],
        &["--otlp-endpoint", &ep],
    );
    wait_nodes_ready(&addrs, 1).await;

    // through a follower, so the apply is forwarded to the leader
    let follower = servers.iter().find(|s| s.id != leader).expect("a follower");
    apply(std::slice::from_ref(&follower.grpc), model("traced")).await;
    let r = wait_replicas(&addrs, "traced", 60, "a Ready replica", |r| ready(r) == 1).await;
    let replica = r[0].name.clone();

    // each role exports every second
    let mut found = None;
    for _ in 0..150 {
        found = chain(&otlp.spans());
        if found.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let names: Vec<String> = otlp.spans().iter().map(|r| format!("{}:{}", r.service, r.span.name)).collect();
    let [first, leader_apply, decision, bind, start, engine] =
        found.unwrap_or_else(|| panic!("no linked apply → decision → bind → agent start among {names:?}"));

    let trace = hex(&first.span.trace_id);
    for r in [&leader_apply, &decision, &bind, &start, &engine] {
        assert_eq!(hex(&r.span.trace_id), trace, "{} is in another trace", r.span.name);
    }
    assert_eq!(first.service, "flotilla-server");
    assert_eq!(attr(&leader_apply.span, "forwarded"), Some(Value::BoolValue(true)));
    assert!(
        named(&otlp.spans(), "server.raft_commit").iter().any(|c| c.span.parent_span_id == leader_apply.span.span_id
            && text(c, "outcome").as_deref() == Some("committed")),
        "the leader's apply has its committed Raft round"
    );
    assert_eq!(decision.service, "flotilla-server");
    assert_eq!(text(&decision, "model").as_deref(), Some("traced"));
    assert_eq!(attr(&decision.span, "replicas_created"), Some(Value::IntValue(1)));
    assert_eq!(text(&bind, "replica").as_deref(), Some(replica.as_str()));
    assert_eq!(text(&bind, "node").as_deref(), Some("node-1"));
    assert_eq!(text(&bind, "outcome").as_deref(), Some("bound"));
    assert_eq!(start.service, "flotilla-agent");
    assert_eq!(text(&start, "replica").as_deref(), Some(replica.as_str()));
    assert_eq!(text(&start, "node").as_deref(), Some("node-1"));
    assert_eq!(text(&start, "outcome").as_deref(), Some("ready"));
    assert_eq!(text(&engine, "outcome").as_deref(), Some("ready"));
    assert!(
        start.span.end_time_unix_nano >= engine.span.end_time_unix_nano
            && decision.span.start_time_unix_nano <= start.span.start_time_unix_nano,
        "the start ends with its engine's Ready, after the decision began"
    );

    agent.kill();
    kill_engines(marker);
}
