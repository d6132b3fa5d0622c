//! `flotilla apply --wait` against a real server and agent: exit 0 once the model's replicas
//! are Ready (plain progress lines, with the download, when stdout is not a terminal), 1
//! with the replica's reason when its download fails or its engine crash-loops until the
//! agent gives up, 1 naming the Pending reason on timeout, and 2 on bad flags before
//! anything is applied.
mod common;

use std::process::{Command, Output};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;

/// `flotilla --server S apply -f - ARGS…` with `manifest` on stdin.
fn apply_wait(server: &str, manifest: &str, args: &[&str]) -> Output {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .args(["--server", server, "apply", "-f", "-"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run flotilla apply");
    child.stdin.take().unwrap().write_all(manifest.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// An HTTP server on loopback that answers every GET with `size` bytes, sent in 64 KiB
/// pieces spread over about `over`, so a download is slow enough to watch; its address.
async fn slow_http_file(size: usize, over: Duration) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\nconnection: close\r\n\r\n");
                if conn.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let pieces = size.div_ceil(64 << 10);
                let pause = over / pieces as u32;
                for i in 0..pieces {
                    let n = (64 << 10).min(size - i * (64 << 10));
                    if conn.write_all(&vec![7u8; n]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(pause).await;
                }
            });
        }
    });
    addr
}

fn vllm_model(name: &str, source: &str, replicas: u32) -> String {
    format!(
        "kind: Model\nmetadata:\n  name: {name}\nspec:\n  engine: vllm\n  source: {source}\n  replicas: {replicas}\n  gpus: 1\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_wait_exits_0_when_ready_and_1_with_the_reason_on_failure_or_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(1, &dir.path().join("s1"), "127.0.0.1:0", &["--bootstrap"]);
    wait_voters(&server.grpc, 1).await;
    let addr = server.grpc.clone();
    let marker = marker();
    let _engines = KillEngines(marker);
    // "vLLM" is the simulator started through the command template, so the agent downloads
    // the model's weights first, as it would for vLLM.
    let template =
        format!("{BIN} sim --host {{host}} --port {{port}} --model {{model}} --speedup 50 --seed {marker} {{args}}");
    let _agent = AgentProc::start_with(
        "node-1",
        &dir.path().join("agent"),
        &addr,
        4,
        marker,
        &[],
        &["--vllm-command", &template, "--restart-backoff-initial-ms", "100", "--max-crashes", "3"],
    );
    wait_nodes_ready(std::slice::from_ref(&addr), 1).await;
    let weights = slow_http_file(3 << 20, Duration::from_secs(3)).await;

    // Ready: exit 0; progress lines (the download's too), one per change, no escape codes
    // (stdout is a pipe).
    let ok = vllm_model("ok", &format!("http://{weights}/model.safetensors"), 2);
    let (a, again) = (addr.clone(), ok.clone());
    let out = tokio::task::spawn_blocking(move || apply_wait(&a, &ok, &["--wait", "--timeout", "90s"])).await.unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    println!("apply --wait printed:\n{stdout}");
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.starts_with("model/ok created"), "{stdout}");
    assert!(stdout.contains("model/ok: 2/2 replicas ready (done)"), "{stdout}");
    assert_eq!(stdout.matches(" Ready: ready on node-1 at 127.0.0.1:").count(), 2, "{stdout}");
    assert!(!stdout.contains('\x1b') && !stdout.contains('\r'), "no terminal codes in a pipe: {stdout:?}");
    let downloading: Vec<&str> = stdout.lines().filter(|l| l.contains(" Starting: downloading ")).collect();
    assert!(
        downloading.iter().any(|l| l.contains("% ") && l.ends_with("/3.0 MiB") || l.contains("/3.0 MiB ")),
        "download progress with bytes of the 3 MiB total:\n{stdout}"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    for w in lines.windows(2) {
        assert_ne!(w[0], w[1], "a line is printed when something changed, not each poll:\n{stdout}");
    }

    // Unchanged and Ready: done at once; with -o json stdout keeps the objects, progress
    // goes to stderr.
    let a = addr.clone();
    let out = tokio::task::spawn_blocking(move || apply_wait(&a, &again, &["--wait", "-o", "json"])).await.unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is the applied object, as JSON");
    assert_eq!(doc["metadata"]["name"], "ok");
    assert!(stderr.contains("model/ok: 2/2 replicas ready (done)"), "{stderr}");

    // A download that fails: exit 1 with the replica's reason.
    let missing = vllm_model("gone", "file:///definitely/not/here/weights", 1);
    let a = addr.clone();
    let out =
        tokio::task::spawn_blocking(move || apply_wait(&a, &missing, &["--wait", "--timeout", "60s"])).await.unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stdout:\n{}\nstderr:\n{stderr}", text(&out.stdout));
    assert!(stderr.starts_with("error: model/gone: replica gone-"), "{stderr}");
    assert!(stderr.contains(" failed: download of file:///definitely/not/here/weights failed"), "{stderr}");

    // An engine that cannot start: the agent gives up after --max-crashes; exit 1 with why.
    let crash =
        format!("{}  engine_args: ['--no-such-flag']\n", flotilla_testkit::manifests::model_manifest("crash", 1, 1));
    let a = addr.clone();
    let out =
        tokio::task::spawn_blocking(move || apply_wait(&a, &crash, &["--wait", "--timeout", "60s"])).await.unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    println!("crash-looping engine:\n{stdout}{stderr}");
    assert_eq!(out.status.code(), Some(1), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.starts_with("error: model/crash: replica crash-"), "{stderr}");
    assert!(stderr.contains(" failed: crashed 3 times within 300s; last: exit status 2"), "{stderr}");

    // More GPUs than any node has: Pending until the timeout, whose message says why.
    let big = flotilla_testkit::manifests::model_manifest("big", 1, 8);
    let a = addr.clone();
    let t0 = tokio::time::Instant::now();
    let out = tokio::task::spawn_blocking(move || apply_wait(&a, &big, &["--wait", "--timeout", "3s"])).await.unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stdout:\n{}\nstderr:\n{stderr}", text(&out.stdout));
    assert!(t0.elapsed() < Duration::from_secs(20), "the timeout is kept: {:?}", t0.elapsed());
    assert!(stderr.starts_with("error: timed out after 3s: model/big: 0/1 replicas ready; replica big-"), "{stderr}");
    assert!(stderr.contains(" Pending: no node has 8 free GPUs"), "{stderr}");
}

/// Kills the test's engines when it ends, a failed assertion included (the agent leaves
/// its engines running when it is killed).
struct KillEngines(u64);

impl Drop for KillEngines {
    fn drop(&mut self) {
        kill_engines(self.0);
    }
}

#[test]
fn apply_wait_rejects_bad_flags_and_nothing_to_wait_for_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.yaml");
    std::fs::write(&model, model_manifest_text()).unwrap();
    let tenant = dir.path().join("t.yaml");
    std::fs::write(&tenant, "kind: Tenant\nmetadata:\n  name: search\nspec:\n  rpm: 60\n").unwrap();
    let m = model.to_str().unwrap();
    // nothing listens here: every case must fail before dialling
    let cases: &[(&[&str], &str)] = &[
        (&["apply", "-f", m, "--wait", "--timeout", "-1"], "\"-1\": a timeout must be longer than zero"),
        (&["apply", "-f", m, "--wait", "--timeout", "0s"], "longer than zero"),
        (&["apply", "-f", m, "--wait", "--timeout", "5d"], "s, m or h"),
        (&["apply", "-f", m, "--timeout", "5s"], "--wait"),
        (&["apply", "-f", tenant.to_str().unwrap(), "--wait"], "--wait follows Models and Adapters"),
    ];
    for (args, says) in cases {
        let out = Command::new(BIN).args(["--server", "127.0.0.1:1"]).args(*args).output().unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?} should say {says:?}: {stderr}");
    }
    let help = Command::new(BIN).args(["apply", "--help"]).output().unwrap();
    let help = text(&help.stdout);
    assert!(help.contains("--wait") && help.contains("Example: flotilla apply -f model.yaml --wait"), "{help}");
}

fn model_manifest_text() -> String {
    flotilla_testkit::manifests::model_manifest("m", 1, 1)
}
