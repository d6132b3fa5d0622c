//! A `flotilla server` process keeps its data private and refuses forged Raft input: the
//! data dir is 0700 (an open one tightened at start) and the snapshot file 0600; a forged
//! InstallSnapshot chunk with a huge offset is INVALID_ARGUMENT, one out of sequence gets
//! openraft's `SnapshotMismatch`, the server's memory stays flat and it keeps serving.
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::{channel, status, ServerProc};
use flotilla_api::pb::object_service_client::ObjectServiceClient;
use flotilla_api::pb::raft_service_client::RaftServiceClient;
use flotilla_api::pb::{ApplyRequest, RaftPayload};
use flotilla_storage::TypeConfig;
use flotilla_testkit::proc_fs::rss_kib;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{InstallSnapshotRequest, InstallSnapshotResponse};
use openraft::{SnapshotMeta, Vote};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o7777
}

/// Waits for a single bootstrapped server to lead; returns its term.
async fn leading_term(addr: &str) -> u64 {
    for _ in 0..200 {
        if let Some(s) = status(addr).await.filter(|s| s.leader_id != 0) {
            return s.term;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no leader at {addr}");
}

async fn apply(addr: &str, name: &str) {
    let mut c = ObjectServiceClient::new(channel(addr, Duration::from_secs(5)));
    let manifest = format!("kind: Tenant\nmetadata:\n  name: {name}\nspec: {{}}\n");
    c.apply(ApplyRequest { manifest, expected_revision: None }).await.unwrap_or_else(|e| panic!("apply {name}: {e}"));
}

#[tokio::test]
async fn the_data_dir_is_private_and_an_open_one_is_tightened_at_start() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("s1");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let s = ServerProc::start(1, &dir, "127.0.0.1:0", &["--bootstrap", "--snapshot-every", "5"]);
    assert_eq!(mode(&dir), 0o700, "an open data dir is tightened at start");
    leading_term(&s.grpc).await;
    for i in 0..8 {
        apply(&s.grpc, &format!("t{i}")).await;
    }
    let snapshot = dir.join("snapshot/current");
    for _ in 0..100 {
        if snapshot.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!((mode(&dir.join("snapshot")), mode(&snapshot)), (0o700, 0o600));

    let fresh = root.path().join("new/s2");
    let _s2 = ServerProc::start(2, &fresh, "127.0.0.1:0", &["--bootstrap"]);
    assert_eq!((mode(&fresh), mode(&root.path().join("new"))), (0o700, 0o700), "created 0700");
}

type SnapshotResult = Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>;

#[tokio::test]
async fn forged_install_snapshot_chunks_are_refused_and_memory_stays_flat() {
    let root = tempfile::tempdir().expect("tempdir");
    let s = ServerProc::start(1, &root.path().join("s1"), "127.0.0.1:0", &["--bootstrap"]);
    let term = leading_term(&s.grpc).await;
    let mut raft = RaftServiceClient::new(channel(&s.grpc, Duration::from_secs(10)))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    // The leader's own vote: openraft's vote check passes it, so only the chunk checks stand
    // between the forged offset and the snapshot buffer.
    let chunk = |id: &str, offset: u64, data: Vec<u8>| {
        let meta = SnapshotMeta { snapshot_id: id.into(), ..Default::default() };
        let req = InstallSnapshotRequest::<TypeConfig> {
            vote: Vote::new_committed(term, 1),
            meta,
            offset,
            data,
            done: false,
        };
        RaftPayload { data: serde_json::to_vec(&req).expect("encode") }
    };
    let rss_before = rss_kib(s.pid()).expect("rss");

    // A fresh stream at a huge offset, and a huge offset after a good first chunk.
    let e = raft.install_snapshot(chunk("forged-1", 1 << 40, vec![7])).await.expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("cluster.snapshot_too_large"), "{}", e.message());
    let ok = raft.install_snapshot(chunk("forged-2", 0, vec![1; 16])).await.expect("a first chunk is admitted");
    let r: SnapshotResult = serde_json::from_slice(&ok.into_inner().data).expect("decode");
    assert!(r.is_ok(), "{r:?}");
    let e = raft.install_snapshot(chunk("forged-2", 1 << 40, vec![7])).await.expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = raft.install_snapshot(chunk("forged-2", (4 << 30) - 1, vec![7, 7])).await.expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "just past the 4 GiB default bound: {e:?}");

    // Within the bound but not where the stream is: openraft's SnapshotMismatch.
    let gap = raft.install_snapshot(chunk("forged-2", 64 << 20, vec![7])).await.expect("answered");
    let r: SnapshotResult = serde_json::from_slice(&gap.into_inner().data).expect("decode");
    match r {
        Err(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(m))) => {
            assert_eq!((m.expect.offset, m.got.offset), (16, 64 << 20));
        }
        other => panic!("expected SnapshotMismatch, got {other:?}"),
    }

    let rss_after = rss_kib(s.pid()).expect("the server is alive");
    assert!(
        rss_after < rss_before + 8 * 1024,
        "the server grew from {rss_before} KiB to {rss_after} KiB on forged chunks"
    );
    apply(&s.grpc, "after-forgery").await;
    assert!(status(&s.grpc).await.is_some_and(|st| st.leader_id == 1), "the server keeps serving");
}
