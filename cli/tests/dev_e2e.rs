//! `flotilla dev`, the README's main command: it starts a server, an agent with simulated
//! GPUs, the gateway and the demo model; a chat completion through the gateway answers;
//! SIGTERM stops everything, engines included.
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use common::*;

fn chat_via(addr: &str) -> Option<String> {
    let body = r#"{"model":"demo","messages":[{"role":"user","content":"hello"}],"max_tokens":4}"#;
    raw_http::send_blocking(addr, "POST", "/v1/chat/completions", body, Duration::from_secs(10))
}

#[test]
fn dev_serves_the_demo_model_through_the_gateway_and_stops_cleanly() {
    dev_stack(false);
}

/// `flotilla dev --secure`: the same stack with TLS on every link and roles enforced (the
/// agent's session and the gateway's watches work with their certificates); the CLI works
/// with the admin certificate dev made and cannot talk to the server without TLS.
#[test]
fn dev_secure_runs_the_stack_with_tls_and_roles() {
    dev_stack(true);
}

#[allow(clippy::disallowed_methods)] // a plain synchronous test: no tokio worker to block
fn dev_stack(secure: bool) {
    let dir = tempfile::tempdir().unwrap();
    let marker = marker();
    let mut child = Command::new(BIN)
        .current_dir(dir.path())
        .args(["dev", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--gateway-addr", "127.0.0.1:0"])
        .args(secure.then_some("--secure"))
        .arg(format!("--sim-args=--speedup 20 --seed {marker}"))
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = loop {
        let line = lines.next().expect("dev printed its ready line").unwrap();
        if line.starts_with("flotilla dev ready:") {
            break line;
        }
    };
    let gateway = ready.split("gateway=http://").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
    assert!(dir.path().join(".flotilla").is_dir(), "data lives in ./.flotilla");
    // The gateway learns the endpoints from the server's watch; allow it a moment.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = chat_via(&gateway).unwrap_or_default();
        if answer.starts_with("HTTP/1.1 200") {
            assert!(answer.contains("\"choices\""), "{answer}");
            assert!(answer.to_lowercase().contains("x-flotilla-endpoint"), "{answer}");
            break;
        }
        assert!(Instant::now() < deadline, "no completion through the gateway: {answer}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(engine_pids(marker).len(), 2, "two demo engines");
    if secure {
        let grpc = ready.split("grpc=").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
        let tls = dir.path().join(".flotilla/tls");
        let get = |with_tls: bool| {
            let mut c = Command::new(BIN);
            c.current_dir(dir.path()).args(["--server", &grpc, "get", "models"]);
            if with_tls {
                c.env("FLOTILLA_TLS_CERT", tls.join("admin-dev-admin.pem"))
                    .env("FLOTILLA_TLS_KEY", tls.join("admin-dev-admin-key.pem"))
                    .env("FLOTILLA_TLS_CA", tls.join("ca.pem"));
            }
            c.output().unwrap()
        };
        let out = get(true);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("demo"));
        assert_eq!(get(false).status.code(), Some(1), "no TLS: the server cannot be reached");
    }
    assert!(flotilla_testkit::procs::signal(child.id(), Signal::TERM), "SIGTERM to flotilla dev");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let deadline = Instant::now() + Duration::from_secs(15);
    while !engine_pids(marker).is_empty() {
        assert!(Instant::now() < deadline, "engines left running after dev stopped");
        std::thread::sleep(Duration::from_millis(100));
    }
}
