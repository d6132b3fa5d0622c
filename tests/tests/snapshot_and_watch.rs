//! Log compaction and recovery: a member added after the log was compacted is caught up by
//! snapshot install, and a watch resumed from a revision after a server restart misses no
//! change and repeats none.
use std::time::Duration;

use flotilla_api::pb::{ApplyRequest, ListRequest, WatchRequest};
use flotilla_cluster::ServerConfig;
use flotilla_testkit::cluster::{fast, model, TestCluster};
use futures::StreamExt;

fn compact_often(c: &mut ServerConfig) {
    fast(c);
    c.snapshot_every = 20;
    c.keep_logs = 0;
}

async fn write_models(cluster: &TestCluster, via: u64, range: std::ops::Range<u32>) {
    let mut c = cluster.objects(via).await;
    for i in range {
        c.apply(ApplyRequest { manifest: model(&format!("m-{i}"), 1), expected_revision: None }).await.unwrap();
    }
}

async fn local_names(cluster: &TestCluster, id: u64) -> Vec<String> {
    let mut c = cluster.objects(id).await;
    let list = c.list(ListRequest { kind: "model".into(), label_selector: String::new(), stale: true }).await.unwrap();
    list.into_inner().objects.into_iter().map(|o| o.name).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_added_after_compaction_is_caught_up_by_snapshot() {
    let mut cluster = TestCluster::start(1, compact_often).await;
    write_models(&cluster, 1, 0..100).await;
    // Wait for the leader to snapshot and purge its log.
    let mut purged = 0;
    for _ in 0..100 {
        purged = cluster.status(1).await.purged_index;
        if purged > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(purged > 0, "leader never compacted its log");

    cluster.add_server(2).await;
    cluster.wait_voters(2).await;
    // The new member's metrics show the installed snapshot shortly after it is a voter.
    let mut status = cluster.status(2).await;
    for _ in 0..100 {
        if status.snapshot_index > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        status = cluster.status(2).await;
    }
    assert!(status.snapshot_index > 0, "new member got no snapshot: {status:?}");
    let mut names = Vec::new();
    for _ in 0..100 {
        names = local_names(&cluster, 2).await;
        if names.len() == 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(names.len(), 100);
    // And it keeps following the log after the snapshot.
    write_models(&cluster, 2, 100..105).await;
    for _ in 0..100 {
        if local_names(&cluster, 2).await.len() == 105 {
            cluster.shutdown().await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("new member stopped following the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumed_after_server_restart_misses_nothing() {
    let mut cluster = TestCluster::start(3, fast).await;
    let watched = 3;
    let mut received: Vec<u64> = Vec::new();
    {
        let mut stream = cluster
            .objects(watched)
            .await
            .watch(WatchRequest { kind: "Model".into(), after_revision: 0 })
            .await
            .unwrap()
            .into_inner();
        write_models(&cluster, 1, 0..20).await;
        while received.len() < 10 {
            let ev = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap().unwrap().unwrap();
            received.push(ev.revision);
        }
    }
    // The watched server goes down; writes continue through the others.
    cluster.stop(watched).await;
    write_models(&cluster, 1, 20..40).await;
    cluster.restart(watched).await;
    write_models(&cluster, 2, 40..50).await;

    let resume_from = *received.last().unwrap();
    let mut stream = None;
    for _ in 0..100 {
        let mut c = cluster.objects(watched).await;
        if let Ok(s) = c.watch(WatchRequest { kind: "Model".into(), after_revision: resume_from }).await {
            stream = Some(s.into_inner());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut stream = stream.expect("watch reconnects after restart");
    while received.len() < 50 {
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("event in time")
            .unwrap()
            .unwrap();
        received.push(ev.revision);
    }
    assert_eq!(received, (1..=50).collect::<Vec<u64>>(), "gap or duplicate in the watch");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_a_compacted_revision_is_out_of_range() {
    fn short_history(c: &mut ServerConfig) {
        fast(c);
        c.watch_history = 5;
    }
    let cluster = TestCluster::start(1, short_history).await;
    write_models(&cluster, 1, 0..10).await;
    let mut c = cluster.objects(1).await;
    let e = c.watch(WatchRequest { kind: "Model".into(), after_revision: 1 }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
    let ok = c.watch(WatchRequest { kind: "Model".into(), after_revision: 5 }).await;
    assert!(ok.is_ok());
    cluster.shutdown().await;
}
