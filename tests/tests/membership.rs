//! Membership changes through the API, and durability across a restart of every server.
use std::time::Duration;

use flotilla_api::pb::cluster_service_client::ClusterServiceClient;
use flotilla_api::pb::{AddMemberRequest, ApplyRequest, ListRequest, RemoveMemberRequest, StatusRequest};
use flotilla_cluster::ServerConfig;
use flotilla_testkit::cluster::{channel, fast, model, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_member_then_add_a_new_one_as_learner_and_voter() {
    let cluster = TestCluster::start(3, fast).await;
    let mut admin = ClusterServiceClient::new(channel(cluster.addr(2)));
    let leader = cluster.leader(1).await;
    let victim = (1..=3).find(|id| *id != leader).unwrap();

    let after = admin.remove_member(RemoveMemberRequest { id: victim }).await.unwrap().into_inner().status.unwrap();
    assert_eq!(after.members.iter().filter(|m| m.voter).count(), 2, "{after:?}");
    assert!(after.members.iter().all(|m| m.id != victim));
    // The two remaining voters still commit writes.
    let keep = (1..=3).find(|id| *id != victim).unwrap();
    let mut c = cluster.objects(keep).await;
    c.apply(ApplyRequest { manifest: model("after-remove", 1), expected_revision: None }).await.unwrap();

    // A fresh server, started without --join, is added by an operator: learner first.
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig {
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        ..ServerConfig::new(4, dir.path())
    };
    fast(&mut config);
    let four = flotilla_cluster::start(config).await.unwrap();
    let addr = four.grpc_addr.to_string();
    let s = admin.add_member(AddMemberRequest { id: 4, addr: addr.clone(), learner_only: true }).await.unwrap();
    let m4 = s.into_inner().status.unwrap().members.into_iter().find(|m| m.id == 4).unwrap();
    assert!(!m4.voter, "added as a learner");
    let s = admin.add_member(AddMemberRequest { id: 4, addr, learner_only: false }).await.unwrap();
    let m4 = s.into_inner().status.unwrap().members.into_iter().find(|m| m.id == 4).unwrap();
    assert!(m4.voter, "promoted to voter");
    // The new member holds the data.
    let mut c4 = flotilla_api::pb::object_service_client::ObjectServiceClient::new(channel(four.grpc_addr));
    let mut names = Vec::new();
    for _ in 0..100 {
        let list =
            c4.list(ListRequest { kind: "model".into(), label_selector: String::new(), stale: true }).await.unwrap();
        names = list.into_inner().objects.into_iter().map(|o| o.name).collect();
        if !names.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(names, ["after-remove"]);

    // Bad membership requests are rejected.
    let e = admin.add_member(AddMemberRequest { id: 0, addr: "x:1".into(), learner_only: false }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = admin.remove_member(RemoveMemberRequest { id: 99 }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let full = admin.status(StatusRequest { local: false }).await.unwrap().into_inner();
    assert_eq!(full.members.iter().filter(|m| m.reachable).count(), 3, "{full:?}");
    // The audit log holds the changes that were made (not the refused ones), in order: the
    // joins of servers 2 and 3 as the cluster formed, then this test's three.
    let audit = ClusterServiceClient::new(channel(cluster.addr(keep)))
        .audit(flotilla_api::pb::AuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    let changes: Vec<_> = audit
        .entries
        .iter()
        .filter(|e| e.method != "Apply")
        .map(|e| (e.method.as_str(), e.target.clone(), e.result.as_str()))
        .collect();
    let victim_target = format!("member/{victim}");
    let joins = [("AddMember", "member/2".to_string(), "applied"), ("AddMember", "member/3".to_string(), "applied")];
    assert!(changes.len() == 5 && joins.iter().all(|j| changes[..2].contains(j)), "{audit:?}");
    assert_eq!(
        changes[2..],
        [
            ("RemoveMember", victim_target, "applied"),
            ("AddMember", "member/4".to_string(), "applied"),
            ("AddMember", "member/4".to_string(), "applied")
        ],
        "{audit:?}"
    );
    four.shutdown().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_restart_keeps_every_object() {
    let mut cluster = TestCluster::start(3, fast).await;
    let mut c = cluster.objects(1).await;
    for i in 0..30 {
        c.apply(ApplyRequest { manifest: model(&format!("m-{i}"), 1), expected_revision: None }).await.unwrap();
    }
    for id in 1..=3 {
        cluster.stop(id).await;
    }
    for id in 1..=3 {
        cluster.restart(id).await;
    }
    cluster.leader(1).await;
    let mut c = cluster.objects(2).await;
    let list = c.list(ListRequest { kind: "model".into(), label_selector: String::new(), stale: false }).await.unwrap();
    let list = list.into_inner();
    assert_eq!(list.objects.len(), 30);
    assert_eq!(list.store_revision, 30);
    cluster.shutdown().await;
}
