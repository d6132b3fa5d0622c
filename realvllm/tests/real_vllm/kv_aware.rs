//! `kv-aware` routing on real vLLM: S (standalone, `--kv-events-config`) and V (the agent's
//! engine, started with the agent's `--kv-events`) publish their KV cache events; a static
//! gateway with the model's own tokenizer.json and chat template follows both. The first
//! long prompt goes anywhere; the engines' events reach the gateway's index; the same
//! prompt with new endings then goes to the engine whose events say it holds the prefix
//! (once speculation has expired, so the events alone decide).

use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use serde_json::json;
use tokio::time::Instant;

use flotilla_gateway::hf_tokenizer::HfTokenizer;
use flotilla_gateway::routing::kv_aware::explained_terms;
use flotilla_testkit::http;

use crate::install::RealVllm;

/// The explanation's `cached=` and `speculative=` for `endpoint`.
fn terms(explanation: &str, endpoint: &str) -> anyhow::Result<(usize, usize)> {
    explained_terms(explanation, endpoint).with_context(|| format!("{endpoint} not in {explanation}"))
}

async fn routed(gw: &str, prompt: &str) -> anyhow::Result<(String, String)> {
    let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0});
    let r = http::send("POST", gw, "/v1/completions", Some(&body), &[("x-flotilla-explain-route", "true")]).await?;
    ensure!(r.status == 200, "{} {}", r.status, r.text());
    let ep = r.header("x-flotilla-endpoint").context("x-flotilla-endpoint")?;
    Ok((ep, r.header("x-flotilla-route").context("x-flotilla-route")?))
}

async fn index_entries(gw: &str) -> anyhow::Result<f64> {
    let m = http::get(gw, "/metrics").await?.text();
    Ok(m.lines()
        .find(|l| l.starts_with("flotilla_gateway_kv_index_entries{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0))
}

pub async fn repeated_prompt_goes_to_its_holder(
    grpc: &str,
    s: &str,
    v: &str,
    install: &RealVllm,
) -> anyhow::Result<String> {
    ensure!(!v.is_empty(), "no agent-run engine");
    let key = crate::engine_key::engine_key(grpc, v).await?;
    let model = install.model();
    let gw = crate::checks::gateway_with(&[s, v], Some(key), |a| {
        a.routing = vec!["tiny=kv-aware".into()];
        a.tokenizer = vec![format!("tiny={}", model.display())];
        a.kv_speculate_ms = 500;
    })
    .await?;
    let addr = gw.local_addr().to_string();

    // A prefix of about 300 of the tiny model's tokens (it takes 512 in all).
    let tok = HfTokenizer::load(&install.model()).map_err(anyhow::Error::msg)?;
    let mut prefix = String::new();
    let mut i = 0;
    while tok.encode_text(&prefix).map_err(anyhow::Error::msg)?.len() < 300 {
        prefix.push_str(&format!(" word{i} of the shared system prompt,"));
        i += 1;
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // followers subscribed
    let t0 = Instant::now();
    let (holder, first) = routed(&addr, &format!("{prefix} question zero")).await?;
    ensure!(first.starts_with("kv-aware tokens="), "routed without token ids: {first}");
    loop {
        if index_entries(&addr).await? > 0.0 {
            break;
        }
        if t0.elapsed() > Duration::from_secs(15) {
            bail!("no KV event from the real engine reached the index in 15 s ({first})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let indexed_after = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(700)).await; // past --kv-speculate-ms
    let other = if holder == s { v } else { s };
    let mut cached = 0;
    for q in ["one", "two", "three"] {
        let (ep, x) = routed(&addr, &format!("{prefix} question {q}")).await?;
        ensure!(ep == holder, "went to {ep}, not {holder} which holds the prefix: {x}");
        let (c, spec) = terms(&x, &ep)?;
        ensure!(c >= 128 && spec == 0, "the holder's cached tokens come from its events: {x}");
        ensure!(terms(&x, other)?.0 == 0, "the other engine never saw the prefix: {x}");
        cached = c;
    }
    gw.shutdown().await;
    Ok(format!(
        "first request to its events in the index {:.0} ms; repeats routed to the holder with {cached} prompt tokens cached",
        indexed_after.as_secs_f64() * 1e3
    ))
}
