//! Disaster recovery with real `flotilla server` processes: a backup saved under write load
//! restores into a fresh 3-server group (one restored, two joined) holding every object at
//! its revision; `--force-new-cluster` turns the last survivor of a group that lost two of
//! three servers into a working one-server cluster that kept every acknowledged write; a
//! damaged backup and a data dir of a future format are refused with exit code 2, naming the
//! file or dir, and nothing is written.
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use flotilla_api::pb::object_service_client::ObjectServiceClient;
use flotilla_api::pb::ListRequest;

fn flotilla(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run flotilla");
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), s(&out.stdout), s(&out.stderr))
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// (kind/name -> (revision, create_revision, uid)) of every object in a backup file.
fn backup_objects(file: &Path) -> (u64, BTreeMap<String, (u64, u64, String)>) {
    let b = flotilla_storage::backup::decode(&std::fs::read(file).unwrap()).unwrap();
    let store: flotilla_storage::Store = serde_json::from_slice(&b.data).unwrap();
    let objects = store
        .objects()
        .map(|o| (format!("{}/{}", o.key.kind, o.key.name), (o.revision, o.create_revision, o.uid.clone())))
        .collect();
    (b.header.revision, objects)
}

/// The same map as the server at `addr` holds it locally (a stale read of its own replica).
async fn local_objects(addr: &str) -> BTreeMap<String, (u64, u64, String)> {
    let mut c = ObjectServiceClient::new(channel(addr, Duration::from_secs(3)));
    let mut out = BTreeMap::new();
    for kind in ["model", "tenant"] {
        let r = c.list(ListRequest { kind: kind.into(), label_selector: String::new(), stale: true }).await;
        for o in r.expect("list").into_inner().objects {
            out.insert(format!("{}/{}", o.kind, o.name), (o.revision, o.create_revision, o.uid));
        }
    }
    out
}

/// Waits until the server at `addr` has applied store revision `want` and holds `objects`.
async fn wait_holds(addr: &str, want: u64, objects: &BTreeMap<String, (u64, u64, String)>) {
    let mut last = (0, BTreeMap::new());
    for _ in 0..200 {
        let rev = status(addr).await.map_or(0, |s| s.store_revision);
        if rev == want {
            last = (rev, local_objects(addr).await);
            if &last.1 == objects {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last.1, *objects, "server {addr} at revision {} (want {want})", last.0);
    panic!("server {addr} did not reach revision {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_saved_under_writes_restores_into_a_fresh_three_server_group_with_every_revision() {
    let dir = tempfile::tempdir().unwrap();
    let old = start_three(&dir.path().join("old"));
    let leader = wait_voters(&old[0].grpc, 3).await;
    let addrs: Vec<String> = old.iter().map(|s| s.grpc.clone()).collect();
    // Tenants: no controller writes to them, so the restored cluster's revisions stay put
    // until the test writes.
    let tenant = |name: String, rpm: u32| format!("kind: Tenant\nmetadata:\n  name: {name}\nspec: {{rpm: {rpm}}}\n");
    for i in 0..10 {
        apply(&addrs, tenant(format!("t{i}"), 1)).await;
    }
    // A bounded writer keeps creating and updating objects while the backup is taken.
    let writer = {
        let addrs = addrs.clone();
        tokio::spawn(async move {
            for i in 10..60 {
                apply(&addrs, tenant(format!("t{i}"), 1)).await;
                apply(&addrs, tenant(format!("t{}", i % 5), i)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let file = dir.path().join("backup.snap");
    let via = &old.iter().find(|s| s.id == leader).unwrap().grpc;
    let (code, out, err) = flotilla(&["--server", via, "snapshot", "save", p(&file)]);
    assert_eq!(code, 0, "{out}{err}");
    writer.await.unwrap();
    let (revision, objects) = backup_objects(&file);
    assert!(objects.len() > 10, "the backup holds what was written before it: {objects:?}");
    assert!(objects.values().any(|(rev, create, _)| rev != create), "and updates: {objects:?}");
    drop(old); // the old cluster is gone (killed); the backup is all that is left

    let new = dir.path().join("new");
    let (code, out, err) =
        flotilla(&["-o", "json", "snapshot", "restore", p(&file), "--data-dir", p(&new.join("s1")), "--id", "1"]);
    assert_eq!(code, 0, "{out}{err}");
    let restored: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(restored["revision"], revision, "{restored}");
    let s1 = ServerProc::start(1, &new.join("s1"), "127.0.0.1:0", &["--bootstrap"]);
    let s2 = ServerProc::start(2, &new.join("s2"), "127.0.0.1:0", &["--join", &s1.grpc]);
    let s3 = ServerProc::start(3, &new.join("s3"), "127.0.0.1:0", &["--join", &s1.grpc]);
    wait_voters(&s1.grpc, 3).await;
    for s in [&s1, &s2, &s3] {
        wait_holds(&s.grpc, revision, &objects).await;
    }
    // Revisions go on from the backup's: watches and --since keep their meaning.
    let new_addrs = vec![s1.grpc.clone(), s2.grpc.clone(), s3.grpc.clone()];
    apply(&new_addrs, tenant("after-restore".into(), 1)).await;
    let after = local_objects(&s1.grpc).await;
    let (rev, create, _) = &after["Tenant/after-restore"];
    assert!(*rev > revision && *create > revision, "new writes continue after revision {revision}: {rev}");
    assert!(!new.join("s1/restore").exists(), "the pending restore is consumed at first start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_new_cluster_on_the_last_survivor_serves_writes_and_keeps_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut servers = start_three(dir.path());
    wait_voters(&servers[0].grpc, 3).await;
    let acks = Arc::new(Mutex::new(Vec::new()));
    let writer = tokio::spawn(write_tenants("t".into(), servers[0].grpc.clone(), acks.clone()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    writer.abort();
    let _ = writer.await;
    let addrs: Vec<String> = servers.iter().map(|s| s.grpc.clone()).collect();
    let leader = settled_leader(&addrs, Duration::from_secs(10)).await;
    let acks = acks.lock().unwrap().clone();
    assert!(acks.len() > 5, "the writer got answers: {}", acks.len());

    // Two servers, the leader among them, are lost for good; a follower survives.
    let survivor = servers.iter().position(|s| s.id != leader).unwrap();
    for (i, s) in servers.iter_mut().enumerate() {
        if i != survivor {
            s.kill();
        }
    }
    let mut old = servers.swap_remove(survivor);
    let (id, data_dir) = (old.id, old.data_dir.clone());
    old.kill();
    let forced = ServerProc::start(id, &data_dir, "127.0.0.1:0", &["--force-new-cluster"]);
    assert_eq!(wait_voters(&forced.grpc, 1).await, id, "the survivor leads a group of one");
    assert_all_present(&forced.grpc, &acks).await;
    apply(std::slice::from_ref(&forced.grpc), model("after-force")).await;

    // A fresh server joins it and receives the state.
    let s4 = ServerProc::start(4, &dir.path().join("s4"), "127.0.0.1:0", &["--join", &forced.grpc]);
    wait_voters(&forced.grpc, 2).await;
    let want: Vec<String> = vec!["after-force".into()];
    assert!(wait_holds_all(&s4.grpc, &want).await.is_empty(), "the joined server holds the state");
    assert_all_present(&s4.grpc, &acks).await;
}

/// A valid backup file's bytes: an empty store, as server 1 would answer.
fn empty_backup() -> Vec<u8> {
    let header = flotilla_storage::backup::Header {
        revision: 0,
        bytes: 0,
        sha256: String::new(),
        created_at_ms: 0,
        answered_by: 1,
        format: 0,
    };
    let data = serde_json::to_vec(&flotilla_storage::Store::new(10)).unwrap();
    flotilla_storage::backup::encode(header, &data)
}

#[test]
fn a_damaged_backup_or_a_used_data_dir_is_refused_with_exit_2_and_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let good = empty_backup();
    let file = dir.path().join("good.snap");
    std::fs::write(&file, &good).unwrap();

    let mut bad = good.clone();
    let last = bad.len() - 2;
    bad[last] ^= 0x20;
    let bad_file = dir.path().join("bad.snap");
    std::fs::write(&bad_file, &bad).unwrap();
    let target = dir.path().join("data");
    let (code, _, err) = flotilla(&["snapshot", "restore", p(&bad_file), "--data-dir", p(&target), "--id", "1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(p(&bad_file)) && err.contains("checksum mismatch"), "{err}");
    assert!(!target.exists(), "nothing written");

    let (code, _, err) = flotilla(&["snapshot", "restore", p(&file), "--data-dir", p(dir.path()), "--id", "1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not empty"), "{err}");

    // A good file seeds the dir; the server it is for must start with its id and not join.
    let (code, _, err) = flotilla(&["snapshot", "restore", p(&file), "--data-dir", p(&target), "--id", "3"]);
    assert_eq!(code, 0, "{err}");
    let server = |extra: &[&str]| {
        let mut args = vec!["server", "--data-dir", p(&target), "--grpc-addr", "127.0.0.1:0"];
        args.extend_from_slice(&["--http-addr", "127.0.0.1:0"]);
        args.extend_from_slice(extra);
        flotilla(&args)
    };
    let (code, _, err) = server(&["--id", "1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("restored for server 3") && err.contains("--id 3"), "{err}");
    let (code, _, err) = server(&["--id", "3", "--join", "127.0.0.1:1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("without --join"), "{err}");
}

#[test]
fn a_data_dir_or_backup_of_a_future_format_is_refused_naming_the_versions() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    std::fs::create_dir(&data_dir).unwrap();
    std::fs::write(data_dir.join("FORMAT"), "99\n").unwrap();
    let (code, _, err) = flotilla(&[
        "server",
        "--id",
        "1",
        "--bootstrap",
        "--data-dir",
        p(&data_dir),
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(p(&data_dir)) && err.contains("version 99") && err.contains("up to version 1"), "{err}");
    assert!(!data_dir.join("db").exists(), "nothing opened");

    let good = empty_backup();
    // The same file with the header's format raised to 2.
    let len = u64::from_be_bytes(good[8..16].try_into().unwrap()) as usize;
    let mut h: serde_json::Value = serde_json::from_slice(&good[16..16 + len]).unwrap();
    h["format"] = 2.into();
    let h = serde_json::to_vec(&h).unwrap();
    let mut newer = b"FLOTBAK1".to_vec();
    newer.extend_from_slice(&(h.len() as u64).to_be_bytes());
    newer.extend_from_slice(&h);
    newer.extend_from_slice(&good[16 + len..]);
    let file = dir.path().join("newer.snap");
    std::fs::write(&file, newer).unwrap();
    let target = dir.path().join("restored");
    let (code, _, err) = flotilla(&["snapshot", "restore", p(&file), "--data-dir", p(&target), "--id", "1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(p(&file)) && err.contains("version 2"), "{err}");
    assert!(!target.exists(), "nothing written");
}
