//! The CLI's contract: exit 0 on success, 2 on bad usage or invalid input (with one clear
//! sentence on stderr), 1 on runtime failure.
mod common;

use std::process::{Command, Output};

use common::*;

fn flotilla(server: &str, args: &[&str]) -> Output {
    Command::new(BIN).arg("--server").arg(server).args(args).output().expect("run flotilla")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn invalid_input_exits_2_before_any_network_call() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, model("x").replace("spec:\n", "spec:\n  replicas: -2\n")).unwrap();
    let nobody = "127.0.0.1:1";
    let o = flotilla(nobody, &["apply", "-f", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("spec.replicas"), "{}", stderr(&o));

    let o = flotilla(nobody, &["get", "gizmos"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("gizmos"), "{}", stderr(&o));

    let o = flotilla(nobody, &["apply", "-f", "/nonexistent/file.yaml"]);
    assert_eq!(o.status.code(), Some(2));

    let o = flotilla(nobody, &["server", "--id", "1"]);
    assert_eq!(o.status.code(), Some(2), "missing --data-dir is a usage error");

    // Valid input, unreachable server: a runtime failure.
    let o = flotilla(nobody, &["get", "models"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("127.0.0.1:1"), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_get_delete_against_a_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(1, &dir.path().join("s1"), "127.0.0.1:0", &["--bootstrap"]);
    wait_voters(&s.grpc, 1).await;
    let file = dir.path().join("m.yaml");
    std::fs::write(&file, format!("{}---\n{}", model("one"), model("two"))).unwrap();
    let grpc = s.grpc.clone();
    let run = move |args: Vec<String>| {
        let grpc = grpc.clone();
        std::thread::spawn(move || flotilla(&grpc, &args.iter().map(String::as_str).collect::<Vec<_>>()))
            .join()
            .unwrap()
    };
    let o = run(vec!["apply".into(), "-f".into(), file.to_string_lossy().into()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("model/one created") && out.contains("model/two created"), "{out}");

    let o = run(vec!["get".into(), "model".into(), "one".into(), "-o".into(), "json".into()]);
    assert_eq!(o.status.code(), Some(0));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["spec"]["engine"], "sim");
    assert_eq!(doc["metadata"]["name"], "one");
    // Controllers write the model's status too, so its revision may have moved on.
    assert!(doc["revision"].as_u64().unwrap() >= doc["metadata"]["create_revision"].as_u64().unwrap());

    let o = run(vec!["delete".into(), "model".into(), "missing".into()]);
    assert_eq!(o.status.code(), Some(1), "not found is a runtime failure");
    assert!(stderr(&o).contains("not found"), "{}", stderr(&o));

    let o = run(vec!["delete".into(), "model".into(), "two".into()]);
    assert_eq!(o.status.code(), Some(0));
    let o = run(vec!["get".into(), "models".into(), "-o".into(), "json".into()]);
    let docs: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(docs.as_array().unwrap().len(), 1);

    let o = run(vec!["cluster".into(), "status".into(), "-o".into(), "json".into()]);
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["leader_id"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_are_checked_against_their_base_model_at_apply() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(1, &dir.path().join("s1"), "127.0.0.1:0", &["--bootstrap"]);
    wait_voters(&s.grpc, 1).await;
    let grpc = s.grpc.clone();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    };
    let run = move |args: Vec<String>| {
        let grpc = grpc.clone();
        std::thread::spawn(move || flotilla(&grpc, &args.iter().map(String::as_str).collect::<Vec<_>>()))
            .join()
            .unwrap()
    };
    let adapter = |base: &str, rank: u32| {
        format!(
            "kind: Adapter\nmetadata: {{name: sql}}\nspec: {{base_model: {base}, source: 'sim://sql', rank: {rank}}}\n"
        )
    };
    let base = format!("{}  engine_args: [--max-lora-rank, '8']\n", model("base"));
    let o = run(vec!["apply".into(), "-f".into(), write("base.yaml", &base)]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    let o = run(vec!["apply".into(), "-f".into(), write("a1.yaml", &adapter("nobase", 8))]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("spec.base_model") && stderr(&o).contains("nobase"), "{}", stderr(&o));
    let o = run(vec!["apply".into(), "-f".into(), write("a2.yaml", &adapter("base", 16))]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("spec.rank") && stderr(&o).contains("--max-lora-rank 8"), "{}", stderr(&o));
    let o = run(vec!["get".into(), "adapters".into(), "-o".into(), "json".into()]);
    let docs: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(docs.as_array().map(Vec::len), Some(0), "a refused apply changes nothing");

    let o = run(vec!["apply".into(), "-f".into(), write("a3.yaml", &adapter("base", 8))]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = run(vec!["apply".into(), "-f".into(), write("a3.yaml", &adapter("base", 8))]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("unchanged"), "{}", String::from_utf8_lossy(&o.stdout));
    // No agent runs: the adapter waits, and `get adapter` says why per replica.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let o = run(vec!["get".into(), "adapter".into(), "sql".into()]);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        if out.contains("REPLICA") && out.contains("Pending") {
            assert!(out.contains("BASE-MODEL") && out.contains("base"), "{out}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no adapter status: {out}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
