//! A gang of real simulator processes (`flotilla-sim`, or `$FLOTILLA_BIN sim`):
//! killing the worker makes the head's /health 503 and the head exit 1; a bad flag
//! combination exits 2 naming the flag.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// (program, leading args) running the simulator: `$FLOTILLA_BIN sim`, else this crate's
/// `flotilla-sim` binary.
fn sim() -> (PathBuf, Vec<String>) {
    match std::env::var_os("FLOTILLA_BIN") {
        Some(bin) => (PathBuf::from(bin), vec!["sim".into()]),
        None => (PathBuf::from(env!("CARGO_BIN_EXE_flotilla-sim")), vec![]),
    }
}

fn spawn(args: &[String]) -> (Child, String) {
    let (bin, lead) = sim();
    let mut child = Command::new(bin)
        .args(lead)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the sim");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    (child, line)
}

fn gang_flags(rank: u32, port: u16) -> Vec<String> {
    let mut v: Vec<String> = [
        "--model",
        "demo",
        "--speedup",
        "50",
        "--port",
        "0",
        "--pipeline-parallel-size",
        "2",
        "--nnodes",
        "2",
        "--master-addr",
        "127.0.0.1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(["--master-port".into(), port.to_string(), "--node-rank".into(), rank.to_string()]);
    if rank > 0 {
        v.push("--headless".into());
    }
    v
}

/// Waits (bounded) for the child to exit; its exit code.
async fn wait_exit(child: &mut Child, within: Duration) -> Option<i32> {
    let until = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < until {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    panic!("the process did not exit within {within:?}");
}

async fn health_becomes(addr: SocketAddr, want: u16) {
    for _ in 0..500 {
        if get(addr, "/health").await.status == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("/health never answered {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_worker_process_makes_the_head_exit_1() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (mut head, line) = spawn(&gang_flags(0, port));
    assert!(line.starts_with("flotilla sim listening on http://127.0.0.1:"), "{line}");
    let addr: SocketAddr = line.split("http://").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert_eq!(get(addr, "/health").await.status, 503, "no worker yet");

    let (mut worker, line) = spawn(&gang_flags(1, port));
    assert!(line.starts_with("flotilla sim headless ranks 1..2 of 2 joining 127.0.0.1:"), "{line}");
    health_becomes(addr, 200).await;
    assert_eq!(complete(addr, "demo", "hello there", 3).await.status, 200);

    worker.kill().unwrap(); // SIGKILL: the kernel closes its socket
    let _ = worker.wait();
    health_becomes(addr, 503).await;
    assert_eq!(wait_exit(&mut head, Duration::from_secs(10)).await, Some(1));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut head.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("gang failed: rank 1 of the gang disconnected"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_exits_1_when_its_head_is_killed_and_bad_flags_exit_2() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (mut head, line) = spawn(&gang_flags(0, port));
    let addr: SocketAddr = line.split("http://").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    let (mut worker, _) = spawn(&gang_flags(1, port));
    health_becomes(addr, 200).await;
    head.kill().unwrap();
    let _ = head.wait();
    assert_eq!(wait_exit(&mut worker, Duration::from_secs(10)).await, Some(1));

    let mut flags = gang_flags(1, port);
    flags.retain(|f| f != "--headless");
    let (bin, lead) = sim();
    let out = Command::new(bin).args(lead).args(&flags).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--headless"), "{err}");
}
