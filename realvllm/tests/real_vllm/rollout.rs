//! A rolling update on real vLLM: the `tiny` Model's engine arguments change (one replica,
//! surge 1), the agent starts a second real engine with the new arguments, and only once it
//! is Ready does the old one drain and stop. Requests sent through a cluster-watching
//! gateway the whole time all succeed.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context as _};
use serde_json::json;
use tokio::time::Instant;

use flotilla_testkit::http;
use flotilla_testkit::proc_fs::{args as cmdline, find_process};

use crate::cluster;
use crate::install::RealVllm;

/// Changes `--max-num-seqs` on the running `tiny` Model and follows the rollout; returns
/// how long it took.
pub async fn engine_argument_change_rolls_without_a_failed_request(
    bin: &Path,
    grpc: &str,
    install: &RealVllm,
    dir: &Path,
) -> anyhow::Result<String> {
    let gw = cluster::gateway(grpc).await?;
    let addr = gw.local_addr().to_string();
    // The gateway learns the endpoint from the leader before the change.
    let t0 = Instant::now();
    loop {
        let r = http::post(&addr, "/v1/completions", json!({"model": "tiny", "prompt": "hi", "max_tokens": 2})).await;
        if r.is_ok_and(|r| r.status == 200) {
            break;
        }
        ensure!(t0.elapsed() < Duration::from_secs(30), "the gateway never served tiny");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(Vec::<String>::new())));
    let load = {
        let (stop, ok, failures, addr) = (stop.clone(), ok.clone(), failures.clone(), addr.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(420);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let body = json!({"model": "tiny", "prompt": "roll", "max_tokens": 4, "stream": true});
                match http::post(&addr, "/v1/completions", body).await {
                    Ok(r) if r.status == 200 && r.sse().last().map(String::as_str) == Some("[DONE]") => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures.lock().unwrap().push(format!("{}: {}", r.status, r.text())),
                    Err(e) => failures.lock().unwrap().push(format!("transport: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let manifest = dir.join("tiny-v2.yaml");
    let changed =
        cluster::model_manifest(install).replace("engine_args: [", "engine_args: [\"--max-num-seqs\", \"8\", ");
    std::fs::write(&manifest, changed)?;
    let started = Instant::now();
    cluster::cli(bin, grpc, &["apply", "-f", &manifest.display().to_string()], None)?;
    let (bin2, grpc2) = (bin.to_owned(), grpc.to_owned());
    let status = tokio::task::spawn_blocking(move || {
        cluster::cli(&bin2, &grpc2, &["rollout", "status", "model", "tiny", "--timeout", "300s"], None)
    })
    .await?;
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = load.await;
    gw.shutdown().await;
    let status = status.context("rollout status")?;
    ensure!(status.contains("Complete"), "rollout status: {status}");
    let failures = failures.lock().unwrap().clone();
    let ok = ok.load(Ordering::Relaxed);
    ensure!(failures.is_empty(), "{} of {} requests failed: {failures:?}", failures.len(), ok + failures.len());
    ensure!(ok > 10, "the requests ran ({ok})");

    let r = cluster::wait_replicas(grpc, "tiny", Duration::from_secs(60), "one Ready replica", |r| {
        r.len() == 1 && r[0].phase == "Ready"
    })
    .await?;
    let endpoint = r[0].endpoint.clone().context("an endpoint")?;
    let port = endpoint.rsplit(':').next().unwrap_or_default().to_string();
    let pid = find_process(&["serve", "--port", &port]).context("the new engine process")?;
    let argv = cmdline(pid);
    ensure!(argv.windows(2).any(|w| w[0] == "--max-num-seqs" && w[1] == "8"), "new engine's arguments: {argv:?}");
    Ok(format!("{:.1} s for 1 replica, {ok} requests, 0 failed", took.as_secs_f64()))
}
