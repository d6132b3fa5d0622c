//! An in-process 3-server cluster: apply, get, list, watch through any member; compare-and-
//! set conflicts; and bad input that must be rejected without changing state.
use std::time::Duration;

use flotilla_api::pb::{ApplyRequest, DeleteRequest, GetRequest, ListRequest, WatchRequest};
use flotilla_testkit::cluster::{fast, model, TestCluster};
use futures::StreamExt;
use tonic::Code;

fn apply(manifest: String, expected_revision: Option<u64>) -> ApplyRequest {
    ApplyRequest { manifest, expected_revision }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_apply_get_list_watch_through_any_member() {
    let cluster = TestCluster::start(3, fast).await;
    let leader = cluster.leader(1).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();

    // Watch from a follower before any write.
    let mut watch = cluster
        .objects(follower)
        .await
        .watch(WatchRequest { kind: "Model".into(), after_revision: 0 })
        .await
        .unwrap()
        .into_inner();

    // Writes through a follower are forwarded to the leader.
    let mut c = cluster.objects(follower).await;
    let a = c.apply(apply(model("alpha", 1), None)).await.unwrap().into_inner();
    assert!(a.created && !a.unchanged);
    let alpha = a.object.unwrap();
    assert_eq!((alpha.name.as_str(), alpha.revision), ("alpha", 1));
    let b = c.apply(apply(model("beta", 2), None)).await.unwrap().into_inner();
    assert_eq!(b.object.unwrap().revision, 2);
    // Re-applying the same spec is a no-op.
    let again = c.apply(apply(model("alpha", 1), None)).await.unwrap().into_inner();
    assert!(again.unchanged && !again.created);
    assert_eq!(again.object.unwrap().revision, 1);
    let updated = c.apply(apply(model("alpha", 3), None)).await.unwrap().into_inner().object.unwrap();
    assert_eq!((updated.revision, updated.create_revision, updated.uid.as_str()), (3, 1, alpha.uid.as_str()));

    // Linearizable reads from every member see every acknowledged write.
    for id in 1..=3 {
        let mut c = cluster.objects(id).await;
        let got =
            c.get(GetRequest { kind: "model".into(), name: "alpha".into(), stale: false }).await.unwrap().into_inner();
        assert!(got.object.unwrap().spec_json.contains("\"replicas\":3"), "server {id}");
        let list = c
            .list(ListRequest { kind: "models".into(), label_selector: String::new(), stale: false })
            .await
            .unwrap()
            .into_inner();
        let names: Vec<_> = list.objects.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["alpha", "beta"], "server {id}");
        assert_eq!(list.store_revision, 3);
    }

    let deleted = c
        .delete(DeleteRequest { kind: "model".into(), name: "beta".into(), expected_revision: None })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.revision, 4);
    let e = c.get(GetRequest { kind: "model".into(), name: "beta".into(), stale: false }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // The watch saw every change, in order.
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let ev =
            tokio::time::timeout(Duration::from_secs(5), watch.next()).await.expect("watch event").unwrap().unwrap();
        seen.push((ev.revision, ev.r#type, ev.object.unwrap().name));
    }
    assert_eq!(seen, [(1, 0, "alpha".into()), (2, 0, "beta".into()), (3, 0, "alpha".into()), (4, 1, "beta".into())]);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set_conflict_is_failed_precondition_and_changes_nothing() {
    let cluster = TestCluster::start(3, fast).await;
    let mut c = cluster.objects(2).await;
    let created = c.apply(apply(model("m", 1), Some(0))).await.unwrap().into_inner().object.unwrap();
    // Creating again with "must not exist" conflicts.
    let e = c.apply(apply(model("m", 5), Some(0))).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("cluster.conflict") && e.message().contains("revision 1"), "{}", e.message());
    // A stale expected revision conflicts too.
    let e = c.apply(apply(model("m", 5), Some(7))).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = c
        .delete(DeleteRequest { kind: "model".into(), name: "m".into(), expected_revision: Some(9) })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let got = c.get(GetRequest { kind: "model".into(), name: "m".into(), stale: false }).await.unwrap().into_inner();
    assert_eq!(got.object.unwrap(), created);
    assert_eq!(got.store_revision, 1);
    // The right revision succeeds.
    let next = c.apply(apply(model("m", 5), Some(created.revision))).await.unwrap().into_inner().object.unwrap();
    assert_eq!(next.revision, 2);
    cluster.shutdown().await;
}

/// Writes made through the API are in the audit log of every server, once each, with the
/// caller's address rather than the forwarding server's; a retried forward adds no entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_writes_are_audited_on_every_server_once() {
    use flotilla_api::pb::cluster_service_client::ClusterServiceClient;
    use flotilla_api::pb::AuditRequest;
    let cluster = TestCluster::start(3, fast).await;
    let leader = cluster.leader(1).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let mut via_follower = cluster.objects(follower).await;
    via_follower.apply(apply(model("audited", 1), None)).await.unwrap();
    via_follower.apply(apply(model("audited", 1), Some(0))).await.unwrap_err();
    let mut via_leader = cluster.objects(leader).await;
    let id = "000000000000000000000000000000e5";
    via_leader
        .delete(forwarded(DeleteRequest { kind: "model".into(), name: "audited".into(), expected_revision: None }, id))
        .await
        .unwrap();
    via_leader
        .delete(forwarded(DeleteRequest { kind: "model".into(), name: "audited".into(), expected_revision: None }, id))
        .await
        .unwrap();

    let want = [("Apply", "created"), ("Apply", "conflict"), ("Delete", "deleted")];
    for server in 1..=3 {
        let mut c = ClusterServiceClient::new(flotilla_testkit::cluster::channel(cluster.addr(server)));
        let mut got = vec![];
        for _ in 0..100 {
            // the joins of servers 2 and 3 are in the log too (AddMember)
            got = c.audit(AuditRequest::default()).await.unwrap().into_inner().entries;
            got.retain(|e| e.target == "Model/audited");
            if got.len() >= want.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seen: Vec<_> = got.iter().map(|e| (e.method.as_str(), e.result.as_str())).collect();
        assert_eq!(seen, want, "server {server}");
        assert!(got.iter().all(|e| e.who == "anonymous" && e.target == "Model/audited"), "{got:?}");
        // The follower forwarded the applies: the entries carry its caller's address, which
        // is where the deletes came from too (this test), not a server's listening address.
        let servers: Vec<String> = (1..=3).map(|i| cluster.addr(i).to_string()).collect();
        assert!(got.iter().all(|e| e.from.starts_with("127.0.0.1:") && !servers.contains(&e.from)), "{got:?}");
    }
    cluster.shutdown().await;
}

/// A request as a server forwards it to the leader: marked forwarded, with its request id.
fn forwarded<T>(msg: T, id: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(flotilla_cluster::FORWARDED_HEADER, "1".parse().unwrap());
    req.metadata_mut().insert(flotilla_cluster::REQUEST_ID_HEADER, id.parse().unwrap());
    req
}

/// A server forwards a write to the leader and retries it when the leader goes away
/// mid-call; the first attempt may have committed. The retry must answer what the first
/// attempt did — never a conflict against its own write, never a second application.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_write_retried_after_it_committed_answers_its_first_result() {
    let cluster = TestCluster::start(3, fast).await;
    let leader = cluster.leader(1).await;
    let mut c = cluster.objects(leader).await;
    let (id, other) = ("000000000000000000000000000000a1", "000000000000000000000000000000b2");

    // A create-if-absent, repeated: the same success, not a conflict.
    let first = c.apply(forwarded(apply(model("m", 1), Some(0)), id)).await.unwrap().into_inner();
    let again = c.apply(forwarded(apply(model("m", 1), Some(0)), id)).await.unwrap().into_inner();
    assert_eq!(again, first, "the retry answers the first result");
    // Another writer moves on; the repeat still answers its own result and writes nothing.
    c.apply(apply(model("m", 2), None)).await.unwrap();
    let again = c.apply(forwarded(apply(model("m", 1), Some(0)), id)).await.unwrap().into_inner();
    assert_eq!(again, first);
    let got = c.get(GetRequest { kind: "model".into(), name: "m".into(), stale: false }).await.unwrap().into_inner();
    assert!(got.object.unwrap().spec_json.contains("\"replicas\":2"), "the repeat did not write again");
    assert_eq!(got.store_revision, 2);
    // A different request is a different request: it conflicts.
    let e = c.apply(forwarded(apply(model("m", 1), Some(0)), other)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // A delete, repeated: the same answer, not "not found".
    let del =
        |id: &str| forwarded(DeleteRequest { kind: "model".into(), name: "m".into(), expected_revision: None }, id);
    let deleted = c.delete(del("000000000000000000000000000000c3")).await.unwrap().into_inner();
    assert_eq!(c.delete(del("000000000000000000000000000000c3")).await.unwrap().into_inner(), deleted);

    // An adapter (a transaction fenced by its base model) with compare-and-set, repeated.
    let base = format!("{}  engine_args: [--max-lora-rank, '8']\n", model("base", 1));
    c.apply(apply(base, None)).await.unwrap();
    let adapter = "kind: Adapter\nmetadata: {name: sql}\nspec: {base_model: base, source: 'sim://sql', rank: 8}\n";
    let aid = "000000000000000000000000000000d4";
    let first = c.apply(forwarded(apply(adapter.into(), Some(0)), aid)).await.unwrap().into_inner();
    let again = c.apply(forwarded(apply(adapter.into(), Some(0)), aid)).await.unwrap().into_inner();
    assert_eq!(again.object, first.object, "the adapter's retry answers its write, not a conflict");
    let e = c.apply(forwarded(apply(adapter.into(), Some(0)), other)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_invalid_argument_and_changes_nothing() {
    let cluster = TestCluster::start(1, fast).await;
    let mut c = cluster.objects(1).await;
    c.apply(apply(model("good", 1), None)).await.unwrap();
    let cases = [
        ("malformed yaml", "kind: Model\nmetadata: {name: x\nspec: [".to_owned(), ""),
        ("unknown field", model("x", 1) + "  colour: red\n", "unknown field `colour`"),
        ("negative replicas", model("x", 1).replace("replicas: 1", "replicas: -3"), "spec.replicas"),
        ("absurd replicas", model("x", 1).replace("replicas: 1", "replicas: 99999"), "spec.replicas"),
        ("unknown kind", model("x", 1).replace("kind: Model", "kind: Gizmo"), "Gizmo"),
        ("bad name", model("Bad_Name", 1), "metadata.name"),
        ("empty source", model("x", 1).replace("file:///models/x", "\"\""), "spec.source"),
        ("oversized manifest", model("x", 1) + &format!("# {}\n", "x".repeat(300 * 1024)), "over the limit"),
        ("empty", String::new(), ""),
    ];
    for (what, manifest, needle) in cases {
        let e = c.apply(apply(manifest, None)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert!(e.message().contains(needle), "{what}: {}", e.message());
    }
    // A request over the transport limit is refused before it is read.
    let e = c.apply(apply("x".repeat(2 << 20), None)).await.unwrap_err();
    assert_ne!(e.code(), Code::Ok, "{e:?}");
    for (kind, name) in [("gizmo", "a"), ("model", "NOT_A_NAME")] {
        let e = c.get(GetRequest { kind: kind.into(), name: name.into(), stale: false }).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{kind}/{name}");
    }
    let e =
        c.list(ListRequest { kind: "model".into(), label_selector: "novalue".into(), stale: false }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Garbage bytes on the gRPC port: the connection is dropped, the server keeps serving.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(cluster.addr(1)).await.unwrap();
    sock.write_all(b"\x16\x03\x01\x02\x00garbage that is not HTTP/2 at all\r\n\r\n\x00\xff").await.unwrap();
    let mut buf = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await;
    drop(sock);

    let list = c
        .list(ListRequest { kind: "model".into(), label_selector: String::new(), stale: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.objects.len(), 1);
    assert_eq!(list.store_revision, 1, "no bad request changed the store");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_selectors_filter_lists() {
    let cluster = TestCluster::start(1, fast).await;
    let mut c = cluster.objects(1).await;
    let labelled = model("a", 1).replace("  name: a\n", "  name: a\n  labels: {team: search}\n");
    c.apply(apply(labelled, None)).await.unwrap();
    c.apply(apply(model("b", 1), None)).await.unwrap();
    let list = c
        .list(ListRequest { kind: "model".into(), label_selector: "team=search".into(), stale: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.objects.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["a"]);
    cluster.shutdown().await;
}
