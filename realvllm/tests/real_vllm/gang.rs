//! A multi-node replica of real vLLM: two agents on this machine (one simulated GPU each)
//! run one `tiny` replica as a tp-pp gang of two ranks (vLLM's native `--nnodes 2`, the
//! multiprocessing executor, gloo over loopback); it serves through the gateway, and a
//! killed worker rank fails the gang, which the control plane places and starts again.
//!
//! Opt-in (`FLOTILLA_REAL_VLLM_GANG=1`): two ranks take ~6 GB and, since pipeline
//! parallelism on the CPU build needs compile mode (docs/real-vllm.md, "Multi-node"),
//! 1.5-3 minutes per start; CI runs the rest of the tier without it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use serde_json::json;
use tokio::time::Instant;

use flotilla_testkit::http;
use flotilla_testkit::proc_fs::{args as cmdline, pids};
use flotilla_testkit::procs::{log_tail, signal_group, Group, Signal};

use crate::cluster;
use crate::install::RealVllm;

/// Whether the gang check runs (`FLOTILLA_REAL_VLLM_GANG=1`).
pub fn enabled() -> bool {
    std::env::var("FLOTILLA_REAL_VLLM_GANG").as_deref() == Ok("1")
}

const START_TIMEOUT: Duration = Duration::from_secs(420);

/// The vLLM template of the gang's agents: the tier's flags without `--enforce-eager`
/// (pipeline parallelism on CPU needs compile mode) and without `uni` (members get `mp`).
fn template(install: &RealVllm) -> String {
    format!(
        "{} serve {{source}} --host {{host}} --port {{port}} --served-model-name {{model}} \
         --max-model-len 512 --dtype float32 {{args}}",
        install.vllm().display()
    )
}

/// A gang agent: one simulated GPU, its own node name and engine ports.
fn start_agent(bin: &Path, install: &RealVllm, server: &str, dir: &Path, node: &str, ports: &str) -> Group {
    let mut cmd = Command::new(bin);
    cmd.args(["agent", "--server", server, "--node-name", node, "--gpus", "1", "--gpu-type", "CPU-24GB"])
        .arg("--stop-engines-on-exit")
        .args(["--heartbeat-interval-ms", "250", "--stop-grace-ms", "10000", "--engine-port-range", ports])
        .args(["--engine-start-timeout-s", "400"])
        .arg("--data-dir")
        .arg(dir.join(node))
        .arg("--vllm-command")
        .arg(template(install))
        // One engine process per rank, as vLLM runs on GPUs (the tier's in-process engine
        // core is for its one-process engines).
        .envs(install.env().into_iter().filter(|(k, _)| k != "VLLM_ENABLE_V1_MULTIPROCESSING"))
        .env("RUST_LOG", "info");
    Group::spawn("flotilla agent", cmd, &dir.join(format!("{node}.log")))
}

fn manifest(install: &RealVllm) -> String {
    format!(
        "kind: Model\nmetadata:\n  name: tiny-gang\nspec:\n  engine: vllm\n  source: file://{}\n  replicas: 1\n  \
         gpus: 2\n  gpu_types: [CPU-24GB]\n  topology: {{nodes: 2, gpus_per_node: 1, layout: tp-pp}}\n",
        install.model().display()
    )
}

/// The `vllm serve` of a gang member: the worker (`--headless`) or the head.
fn member(headless: bool) -> Option<u32> {
    pids().find(|pid| {
        let args = cmdline(*pid);
        let has = |w: &str| args.iter().any(|a| a == w);
        has("serve") && has("--nnodes") && has("--headless") == headless
    })
}

async fn chat(gw: &str) -> anyhow::Result<u16> {
    let body = json!({"model": "tiny-gang", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    Ok(http::post(gw, "/v1/chat/completions", body).await.map(|r| r.status).unwrap_or(0))
}

/// The check; returns its timings.
pub async fn two_ranks_serve_and_restart_as_one(
    bin: &Path,
    grpc: &str,
    install: &RealVllm,
    dir: &Path,
) -> anyhow::Result<String> {
    let logs = || {
        format!(
            "gang-a:\n{}\ngang-b:\n{}",
            log_tail(&dir.join("gang-a.log"), 20),
            log_tail(&dir.join("gang-b.log"), 20)
        )
    };
    // The tier's `tiny` Model would land on these agents once its own agent is gone.
    let _ = cluster::cli(bin, grpc, &["delete", "model", "tiny"], None);
    let mut a = start_agent(bin, install, grpc, dir, "gang-a", "23000-23099");
    let mut b = start_agent(bin, install, grpc, dir, "gang-b", "24000-24099");
    let file = dir.join("tiny-gang.yaml");
    std::fs::write(&file, manifest(install))?;
    let applied = Instant::now();
    cluster::cli(bin, grpc, &["apply", "-f", &file.display().to_string()], None)?;
    let ready = cluster::wait_replicas(grpc, "tiny-gang", START_TIMEOUT, "the gang Ready", |r| {
        r.iter().any(|r| r.phase == "Ready")
    })
    .await
    .with_context(logs)?;
    let first_ready = applied.elapsed();
    let name = ready.iter().find(|r| r.phase == "Ready").map(|r| r.name.clone()).unwrap_or_default();
    let (head, worker) =
        (member(false).context("the head's vllm serve")?, member(true).context("the worker's vllm serve")?);
    let (h, w) = (cmdline(head).join(" "), cmdline(worker).join(" "));
    for flag in ["--pipeline-parallel-size 2", "--nnodes 2", "--distributed-executor-backend mp"] {
        ensure!(h.contains(flag) && w.contains(flag), "{flag} missing: head {h} / worker {w}");
    }

    let gw = cluster::gateway(grpc).await?;
    let addr = gw.local_addr().to_string();
    let t0 = Instant::now();
    while chat(&addr).await? != 200 {
        ensure!(t0.elapsed() < Duration::from_secs(30), "the gateway never served the gang's head");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A lost rank: vLLM's head does not notice by itself (docs/real-vllm.md); flotilla fails
    // the whole gang on the worker's exit and places it again.
    let killed = Instant::now();
    signal_group(worker, Signal::KILL);
    let again = cluster::wait_replicas(grpc, "tiny-gang", START_TIMEOUT, "the gang placed and Ready again", |r| {
        r.iter().any(|r| r.phase == "Ready" && r.name != name)
    })
    .await
    .with_context(logs)?;
    let recovered = killed.elapsed();
    ensure!(again.iter().filter(|r| r.phase == "Ready").count() == 1, "one gang: {again:?}");
    let t1 = Instant::now();
    while chat(&addr).await? != 200 {
        ensure!(t1.elapsed() < Duration::from_secs(30), "the new gang does not serve through the gateway");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster::cli(bin, grpc, &["delete", "model", "tiny-gang"], None)?;
    a.stop(Duration::from_secs(15));
    b.stop(Duration::from_secs(15));
    Ok(format!(
        "apply to Ready {:.1} s; worker SIGKILL to a new gang Ready {:.1} s",
        first_ready.as_secs_f64(),
        recovered.as_secs_f64()
    ))
}
