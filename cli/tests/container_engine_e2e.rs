//! Engines in containers, end to end with a real server, agent and gateway. Containers
//! cannot run on these machines, so the agent's `--container-cli` is a stand-in `docker`
//! (a shell script) that records every call and, for `run`, executes the `--entrypoint`
//! with the arguments after the image, as a runtime would inside the container. What is
//! proven is the agent's side: the command line it builds, that the engine it supervises
//! through the client serves through the gateway, that the key stays off the command line,
//! that only allowed images run, and that the container is removed when the replica goes.
mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;

const IMAGE: &str = "registry.test/flotilla/sim:1";

/// A `docker` that logs its arguments (one call a line) to `log` and runs the entrypoint.
fn fake_docker(dir: &std::path::Path, log: &std::path::Path) -> std::path::PathBuf {
    let script = format!(
        r#"#!/bin/bash
echo "$*" >> '{log}'
case "$1" in
  rm) exit 0 ;;
  run)
    shift
    while [ $# -gt 0 ]; do
      case "$1" in
        --entrypoint) prog="$2"; shift 3; break ;;
        *) shift ;;
      esac
    done
    exec "$prog" "$@" ;;
  *) echo "unexpected: $*" >&2; exit 125 ;;
esac
"#,
        log = log.display()
    );
    let path = dir.join("docker");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn model(name: &str, image: &str) -> String {
    format!(
        "kind: Model\nmetadata:\n  name: {name}\nspec:\n  engine: sim\n  source: file:///models/{name}\n  \
         replicas: 1\n  gpus: 1\n  engine_image: {image}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_image_runs_through_the_container_runtime_and_only_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("docker.log");
    let docker = fake_docker(dir.path(), &log);
    let server = ServerProc::start(1, &dir.path().join("s1"), "127.0.0.1:0", &["--bootstrap"]);
    let s = vec![server.grpc.clone()];
    wait_voters(&s[0], 1).await;
    let marker = marker();
    let cli = docker.display().to_string();
    let _agent = AgentProc::start_with(
        "node-1",
        &dir.path().join("agent"),
        &s[0],
        2,
        marker,
        &[],
        &["--container-runtime", "docker", "--container-cli", &cli, "--engine-image", "registry.test/flotilla/"],
    );
    let gateway = GatewayProc::start(&s[0], &[]);

    apply(&s, model("boxed", IMAGE)).await;
    apply(&s, model("stranger", "elsewhere.test/miner:latest")).await;
    let r = wait_replicas(&s, "boxed", 60, "the boxed replica Ready", |r| ready(r) == 1).await;
    let replica = r[0].name.clone();
    let failed =
        wait_replicas(&s, "stranger", 30, "the stranger replica Failed", |r| r.iter().any(|x| x.phase == "Failed"))
            .await;
    assert!(
        failed[0].reason.contains("--engine-image") && failed[0].reason.contains("elsewhere.test/miner:latest"),
        "the reason names the image and the flag: {failed:?}"
    );
    assert!(failed[0].endpoint.is_none(), "no engine started for a refused image");

    // The gateway serves the containerised engine like any other.
    let body = r#"{"model":"boxed","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#;
    let mut status = 0;
    for _ in 0..100 {
        status = engine_call(&gateway.addr, "POST", "/v1/chat/completions", body, "").0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "through the gateway");

    let calls = std::fs::read_to_string(&log).unwrap();
    let run = calls.lines().find(|l| l.starts_with("run ")).unwrap_or_else(|| panic!("no docker run: {calls}"));
    let endpoint = r[0].endpoint.clone().unwrap();
    let port = endpoint.rsplit(':').next().unwrap();
    for want in [
        format!("--name flotilla-{replica} "),
        "--network host".into(),
        "--gpus \"device=".into(),
        "-e VLLM_API_KEY".into(),
        format!("--entrypoint {BIN} {IMAGE} sim --host 127.0.0.1 --port {port} "),
    ] {
        assert!(run.contains(&want), "{want:?} in {run}");
    }
    let keys = engine_keys(&s).await;
    let key = keys.get(&replica).expect("the replica's key");
    assert!(!key.is_empty() && !calls.contains(key.as_str()), "the key is never on the runtime's command line");
    assert!(
        calls.lines().any(|l| l == format!("rm -f flotilla-{replica}")),
        "the name is freed before the start: {calls}"
    );
    assert!(!calls.contains("miner"), "a refused image is never run: {calls}");

    // Deleting the model stops the client and removes the container.
    let before = calls.lines().filter(|l| *l == format!("rm -f flotilla-{replica}")).count();
    let out = std::process::Command::new(BIN).args(["--server", &s[0], "delete", "model", "boxed"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let calls = std::fs::read_to_string(&log).unwrap();
        if calls.lines().filter(|l| *l == format!("rm -f flotilla-{replica}")).count() > before {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no rm after the delete: {calls}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(engine_pids(marker).is_empty(), "the engine behind the client is gone: {:?}", engine_pids(marker));
}
