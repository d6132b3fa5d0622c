//! `Adapter` objects on a real vLLM: the agent brings `tiny-lora` (a `file://` source) into
//! its node cache and loads it through `/v1/load_lora_adapter` when a request through a
//! cluster-fed gateway asks for it; with `--max-loras 2` (two slots) a third adapter evicts
//! the least recently used one, which reloads on its next request; delete unloads; a rank
//! above the engine's `--max-lora-rank` is refused at apply; an unreachable source fails the
//! adapter with the agent's message while the base replica keeps serving.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use serde_json::json;
use tokio::time::Instant;

use flotilla_testkit::http;

use crate::cluster;

fn manifest(name: &str, source: &str, extra: &str) -> String {
    format!("kind: Adapter\nmetadata: {{name: {name}}}\nspec: {{base_model: tiny, source: '{source}', replicas: on-demand{extra}}}\n")
}

fn apply(bin: &Path, grpc: &str, dir: &Path, name: &str, text: &str) -> anyhow::Result<String> {
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, text)?;
    cluster::cli(bin, grpc, &["apply", "-f", &file.display().to_string()], None)
}

/// Adapters the engine at `v` lists (entries of `/v1/models` with a parent), asked with
/// its API key.
async fn engine_adapters(v: &str, key: &str) -> anyhow::Result<Vec<String>> {
    let r = crate::engine_key::get_with_key(v, "/v1/models", key).await?;
    ensure!(r.status == 200, "/v1/models of {v}: {} {}", r.status, r.text());
    let doc = r.json()?;
    Ok(doc["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| !m["parent"].is_null())
        .filter_map(|m| m["id"].as_str().map(str::to_owned))
        .collect())
}

async fn ask(gw: &str, model: &str) -> anyhow::Result<Duration> {
    let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    let t0 = Instant::now();
    let r = http::post(gw, "/v1/chat/completions", body).await?;
    ensure!(r.status == 200, "{model} through the gateway: {} {}", r.status, r.text());
    ensure!(r.json()?["model"] == model, "{}", r.text());
    Ok(t0.elapsed())
}

pub async fn adapter_objects(bin: &Path, grpc: &str, v: &str, adapter: &Path, dir: &Path) -> anyhow::Result<String> {
    ensure!(!v.is_empty(), "no agent-run engine");
    let key = crate::engine_key::engine_key(grpc, v).await?;
    let source = format!("file://{}", adapter.display());
    for n in ["lora-a", "lora-b", "lora-c"] {
        apply(bin, grpc, dir, n, &manifest(n, &source, ""))?;
    }
    let gw = cluster::gateway(grpc).await?;
    let addr = gw.local_addr().to_string();
    // The gateway learns the base model's endpoint from the cluster.
    let t0 = Instant::now();
    while http::post(
        &addr,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    )
    .await
    .map(|r| r.status)
    .unwrap_or(0)
        != 200
    {
        ensure!(t0.elapsed() < Duration::from_secs(30), "the gateway never routed the base model");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cold = ask(&addr, "lora-a").await.context("cold lora-a")?;
    ask(&addr, "lora-b").await.context("cold lora-b")?;
    let mut loaded = engine_adapters(v, &key).await?;
    loaded.sort();
    ensure!(loaded == ["lora-a", "lora-b"], "two slots, two adapters: {loaded:?}");
    // lora-b used again; lora-a idles past the eviction grace, then lora-c needs a slot.
    tokio::time::sleep(Duration::from_secs(6)).await;
    ask(&addr, "lora-b").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ask(&addr, "lora-c").await.context("lora-c evicting the least recently used")?;
    let t1 = Instant::now();
    loop {
        let mut now = engine_adapters(v, &key).await?;
        now.sort();
        if now == ["lora-b", "lora-c"] {
            break;
        }
        ensure!(t1.elapsed() < Duration::from_secs(20), "lora-a (least recently used) not evicted: {now:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    let reload = ask(&addr, "lora-a").await.context("lora-a reloads after eviction")?;
    // Delete unloads it from the engine.
    cluster::cli(bin, grpc, &["delete", "adapter", "lora-a"], None)?;
    let t2 = Instant::now();
    while engine_adapters(v, &key).await?.iter().any(|a| a == "lora-a") {
        ensure!(t2.elapsed() < Duration::from_secs(20), "lora-a still loaded after delete");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Bad input: rank above --max-lora-rank 8 is refused; an unreachable source fails.
    let refused = apply(bin, grpc, dir, "too-big", &manifest("too-big", &source, ", rank: 16"));
    let why = refused.expect_err("rank 16 over --max-lora-rank 8 is refused").to_string();
    ensure!(why.contains("spec.rank"), "{why}");
    apply(bin, grpc, dir, "nowhere", &manifest("nowhere", "file:///does/not/exist/lora", ""))?;
    let body = json!({"model": "nowhere", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let r = http::post(&addr, "/v1/chat/completions", body).await?;
    ensure!(r.status == 503, "an adapter that cannot load: {} {}", r.status, r.text());
    ensure!(r.text().contains("nowhere"), "{}", r.text());
    ask(&addr, "tiny").await.context("the base replica still serves")?;
    for n in ["lora-b", "lora-c", "nowhere"] {
        cluster::cli(bin, grpc, &["delete", "adapter", n], None)?;
    }
    gw.shutdown().await;
    Ok(format!(
        "cold load through the gateway {:.2} s, reload after eviction {:.2} s",
        cold.as_secs_f64(),
        reload.as_secs_f64()
    ))
}
