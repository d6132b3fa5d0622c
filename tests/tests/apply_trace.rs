//! An apply is traced on the server that takes it: a `server.apply` span naming the
//! object's kind, name and committed revision, with its Raft round (`server.raft_commit`,
//! outcome `committed`) as a child, exported over OTLP as `flotilla-server`.
use std::time::Duration;

use flotilla_api::pb::ApplyRequest;
use flotilla_testkit::cluster::{fast, model, TestCluster};
use flotilla_testkit::otlp::{attr, hex, Collector, Received, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_is_traced_through_its_raft_commit() {
    let otlp = Collector::start().await;
    let guard =
        std::sync::Arc::new(flotilla_telemetry::init("flotilla-server", Some(&otlp.endpoint()), "warn").unwrap());
    let cluster = TestCluster::start(1, fast).await;
    let leader = cluster.leader(1).await;
    let mut c = cluster.objects(leader).await;
    let applied = c.apply(ApplyRequest { manifest: model("traced", 1), expected_revision: None }).await.unwrap();
    let revision = applied.into_inner().object.unwrap().revision;

    let find = |spans: &[Received]| {
        let apply = spans.iter().find(|r| {
            r.span.name == "server.apply" && attr(&r.span, "name") == Some(Value::StringValue("traced".into()))
        })?;
        let commit = spans
            .iter()
            .find(|r| r.span.name == "server.raft_commit" && r.span.parent_span_id == apply.span.span_id)?;
        Some((apply.clone(), commit.clone()))
    };
    let mut found = None;
    for _ in 0..100 {
        let g = guard.clone();
        tokio::task::spawn_blocking(move || g.flush()).await.unwrap();
        found = find(&otlp.spans());
        if found.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let names: Vec<String> = otlp.spans().into_iter().map(|r| r.span.name).collect();
    let (apply, commit) = found.unwrap_or_else(|| panic!("no server.apply with its raft commit among {names:?}"));
    assert_eq!(apply.service, "flotilla-server");
    assert_eq!(attr(&apply.span, "kind"), Some(Value::StringValue("Model".into())));
    assert_eq!(attr(&apply.span, "revision"), Some(Value::IntValue(revision as i64)));
    assert_eq!(attr(&apply.span, "created"), Some(Value::BoolValue(true)));
    assert_eq!(attr(&apply.span, "forwarded"), Some(Value::BoolValue(false)));
    assert_eq!(attr(&commit.span, "outcome"), Some(Value::StringValue("committed".into())));
    assert_eq!(hex(&commit.span.trace_id), hex(&apply.span.trace_id));
    cluster.shutdown().await;
}
