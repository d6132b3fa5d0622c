//! `flotilla snapshot save|inspect` against a real 3-server cluster: a backup taken from a
//! follower while writes go on holds every object acknowledged before it at its revision,
//! verifies, and a damaged copy is refused naming the checksum.
mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn flotilla(server: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(["--server", server]).args(args).output().expect("run flotilla");
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), s(&out.stdout), s(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_writes_holds_every_acknowledged_object_and_damage_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let servers = start_three(dir.path());
    let leader = wait_voters(&servers[0].grpc, 3).await;
    let addrs: Vec<String> = servers.iter().map(|s| s.grpc.clone()).collect();
    for i in 0..20 {
        apply(&addrs, flotilla_testkit::manifests::model_manifest(&format!("m{i}"), 0, 1)).await;
    }
    // Writes keep going while the backup is taken.
    let writer = {
        let addrs = addrs.clone();
        tokio::spawn(async move {
            for i in 20..60 {
                apply(&addrs, flotilla_testkit::manifests::model_manifest(&format!("m{i}"), 0, 1)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let follower = servers.iter().find(|s| s.id != leader).unwrap().grpc.clone();
    let file = dir.path().join("backup.snap");
    let (code, out, err) = flotilla(&follower, &["-o", "json", "snapshot", "save", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let saved: serde_json::Value = serde_json::from_str(&out).unwrap();
    let models = saved["objects"]["Model"].as_u64().unwrap();
    assert!(models >= 20, "every model acknowledged before the backup: {saved}");
    assert!(saved["revision"].as_u64().unwrap() >= models, "{saved}");
    writer.await.unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600, "it holds secrets");

    let (code, out, err) = flotilla(&follower, &["snapshot", "inspect", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("(verified)") && out.contains(&format!("{models} Model")), "{out}");
    // A flipped byte is refused, naming the checksum.
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x20;
    let bad = dir.path().join("bad.snap");
    std::fs::write(&bad, bytes).unwrap();
    let (code, _, err) = flotilla(&follower, &["snapshot", "inspect", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("checksum mismatch"), "{err}");
}
