//! `flotilla sim` as a process: it prints its address, serves the OpenAI surface, stops
//! cleanly on SIGTERM, and rejects bad flags with exit code 2.
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use flotilla_testkit::procs::{signal, Signal};
use flotilla_testkit::raw_http::send_blocking;

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

fn http_get(addr: &str, path: &str) -> String {
    send_blocking(addr, "GET", path, "", Duration::from_secs(60)).expect("the sim answers")
}

#[test]
fn sim_prints_its_address_serves_and_stops_on_sigterm() {
    let mut child = Command::new(BIN)
        .args(["sim", "--port", "0", "--model", "demo", "--speedup", "50"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("flotilla sim listening on http://127.0.0.1:") && line.contains("model=demo"), "{line}");
    let addr = line.split("http://").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
    let models = http_get(&addr, "/v1/models");
    assert!(models.starts_with("HTTP/1.1 200") && models.contains("\"demo\""), "{models}");
    let metrics = http_get(&addr, "/metrics");
    assert!(metrics.contains("vllm:num_requests_running"), "{metrics}");
    assert!(signal(child.id(), Signal::TERM), "SIGTERM to the sim");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn sim_rejects_bad_flags_with_exit_2() {
    let o = Command::new(BIN).args(["sim", "--port", "0", "--num-gpu-blocks", "0"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--num-gpu-blocks"));
    let o = Command::new(BIN).args(["sim", "--profile", "tpu-v9"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
}
