//! Prefill/decode disaggregation on the real engine: two `vllm serve` of the tiny model with
//! the NixlConnector as the agent configures it (`kv_producer` / `kv_consumer`, UCX; NIXL
//! from PyPI's `nixl` + `nixl-cu13`, which `.ci/real-vllm.sh` installs into the venv; on a
//! CPU the KV cache is in host memory and UCX moves it over TCP/shared memory), P and D,
//! behind `flotilla gateway --pd tiny`. Completions and chats, streamed and not, go prefill→decode; D must pull
//! every prompt token and compute none, and the texts must be those of P alone
//! (temperature 0); D, a consumer, must still compute a prompt sent to it alone (the
//! gateway's decode-only fallback).
//!
//! ```text
//!  client ─> flotilla gateway --pd tiny ─(prefill leg)─> P :p  (side channel :ps)
//!                                       └(decode leg)──> D :d ── NIXL pull from :ps
//! ```

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use serde_json::{json, Value};
use tokio::time::Instant;

use flotilla_testkit::http;
use flotilla_testkit::ports::free_port;
use flotilla_testkit::procs::{log_tail, Group};

use crate::install::{RealVllm, SERVE_FLAGS};

/// The agent's NixlConnector configs (agent/src/kv_transfer.rs), less their `engine_id`:
/// prefill engines produce, decode engines consume.
const KV_PREFILL: &str =
    r#"{"kv_connector":"NixlConnector","kv_role":"kv_producer","kv_connector_extra_config":{"backends":["UCX"]}}"#;
const KV_DECODE: &str =
    r#"{"kv_connector":"NixlConnector","kv_role":"kv_consumer","kv_connector_extra_config":{"backends":["UCX"]}}"#;

/// Whether the install's Python has NIXL (`import nixl._api`, as vLLM does); why not if not.
pub fn nixl_missing(install: &RealVllm) -> Option<String> {
    let py = install.dir.join("venv/bin/python");
    let out = Command::new(&py).args(["-c", "import nixl._api"]).output();
    match out {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "NIXL is not importable in {} (bash .ci/real-vllm.sh installs it): {}",
            py.display(),
            String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or_default()
        )),
        Err(e) => Some(format!("cannot run {}: {e}", py.display())),
    }
}

/// `vllm serve` of the tiny model with the NixlConnector config `kv`, its side channel on `side`.
fn start_engine(install: &RealVllm, kv: &str, port: u16, side: u16, log: &Path) -> Group {
    let mut cmd = Command::new(install.vllm());
    cmd.arg("serve").arg(install.model());
    cmd.args(["--host", "127.0.0.1", "--port", &port.to_string(), "--served-model-name", "tiny"]);
    cmd.args(SERVE_FLAGS).args(["--kv-transfer-config", kv]).envs(install.env());
    cmd.env("VLLM_NIXL_SIDE_CHANNEL_HOST", "127.0.0.1").env("VLLM_NIXL_SIDE_CHANNEL_PORT", side.to_string());
    Group::spawn("vllm", cmd, log)
}

/// `flotilla gateway --pd tiny` over P and D; returns it and its address (from its banner).
async fn start_gateway(bin: &Path, p: &str, d: &str, dir: &Path) -> anyhow::Result<(Group, String)> {
    let log = dir.join("pd-gateway.log");
    let mut cmd = Command::new(bin);
    cmd.args(["gateway", "--no-auth", "--listen", "127.0.0.1:0", "--pd", "tiny"])
        // every prompt goes remote, however short (the default keeps < 256 tokens local)
        .args(["--pd-min-remote-prefill-tokens", "1"])
        .args(["--backend", &format!("tiny-prefill=http://{p}"), "--backend", &format!("tiny-decode=http://{d}")])
        .env("RUST_LOG", "warn");
    let g = Group::spawn("flotilla gateway", cmd, &log);
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(addr) = text.lines().find_map(|l| l.strip_prefix("flotilla gateway listening on http://")) {
            return Ok((g, addr.trim().to_string()));
        }
        ensure!(t0.elapsed() < Duration::from_secs(20), "no gateway banner:\n{}", log_tail(&log, 20));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The generated text and prompt tokens of an answer, streamed (`data:` chunks, usage at
/// the end) or not.
fn text_and_prompt(r: &http::Resp, stream: bool) -> anyhow::Result<(String, u64)> {
    ensure!(r.status == 200, "{} {}", r.status, r.text());
    let piece = |c: &Value| {
        let c = &c["choices"][0];
        c["text"].as_str().or(c["message"]["content"].as_str()).or(c["delta"]["content"].as_str()).map(str::to_owned)
    };
    if !stream {
        let v = r.json()?;
        let tokens = v["usage"]["prompt_tokens"].as_u64().context("usage.prompt_tokens")?;
        return Ok((piece(&v).context("no text")?, tokens));
    }
    let (mut text, mut tokens) = (String::new(), None);
    for data in r.sse().iter().filter(|d| *d != "[DONE]") {
        let v: Value = serde_json::from_str(data).with_context(|| format!("chunk {data}"))?;
        text.push_str(&piece(&v).unwrap_or_default());
        tokens = tokens.or(v["usage"]["prompt_tokens"].as_u64());
    }
    Ok((text, tokens.context("no usage chunk")?))
}

/// The value of the first sample of `family` whose line contains `label` ("" for any).
fn sample(scrape: &str, family: &str, label: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| l.starts_with(family) && l[family.len()..].starts_with(['{', ' ']) && l.contains(label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The check: returns its timing line.
pub async fn requests_through_the_gateway_pull_their_prompt(
    install: &RealVllm,
    bin: &Path,
    dir: &Path,
    start_timeout: Duration,
) -> anyhow::Result<String> {
    let port = || free_port().context("a free port");
    let (p, d) = (format!("127.0.0.1:{}", port()?), format!("127.0.0.1:{}", port()?));
    let (p_log, d_log) = (dir.join("pd-prefill.log"), dir.join("pd-decode.log"));
    let t0 = Instant::now();
    let mut engines = [
        start_engine(install, KV_PREFILL, p.rsplit(':').next().unwrap().parse()?, port()?, &p_log),
        start_engine(install, KV_DECODE, d.rsplit(':').next().unwrap().parse()?, port()?, &d_log),
    ];
    let result = async {
        for (addr, log) in [(&p, &p_log), (&d, &d_log)] {
            http::wait_healthy(addr, start_timeout).await.with_context(|| format!("{addr}:\n{}", log_tail(log, 30)))?;
        }
        let ready = t0.elapsed();
        let (mut gw, gw_addr) = start_gateway(bin, &p, &d, dir).await?;
        let r = requests(&gw_addr, &p, &d).await;
        gw.stop(Duration::from_secs(5));
        let served = r.with_context(|| format!("gateway log:\n{}", log_tail(&dir.join("pd-gateway.log"), 20)))?;
        Ok::<_, anyhow::Error>(format!("P and D /health in {:.1} s (started together); {served}", ready.as_secs_f64()))
    }
    .await;
    let mut stops = Vec::new();
    for e in &mut engines {
        let pgid = e.pid();
        let took = e.stop(Duration::from_secs(20));
        crate::checks::group_gone(pgid).await?;
        stops.push(format!("{:.1} s", took.as_secs_f64()));
    }
    let line = result.with_context(|| format!("decode engine log:\n{}", log_tail(&d_log, 20)))?;
    Ok(format!("{line}; SIGTERM to exit: P {}, D {}", stops[0], stops[1]))
}

/// Four requests through the gateway, then D's and the gateway's counters, then the same
/// requests on P alone for the reference texts.
async fn requests(gw: &str, p: &str, d: &str) -> anyhow::Result<String> {
    let prompt = |i: usize| (0..90).map(|w| format!("w{i}x{w}")).collect::<Vec<_>>().join(" ");
    let chat = |i: usize| json!({"messages": [{"role": "user", "content": prompt(i)}]});
    let asks = [
        ("/v1/completions", json!({"prompt": prompt(0)}), false),
        ("/v1/completions", json!({"prompt": prompt(1)}), true),
        ("/v1/chat/completions", chat(2), false),
        ("/v1/chat/completions", chat(3), true),
    ];
    let body = |mut b: Value, stream: bool| {
        b["model"] = json!("tiny");
        b["max_tokens"] = json!(12);
        b["temperature"] = json!(0);
        b["ignore_eos"] = json!(true);
        if stream {
            b["stream"] = json!(true);
            b["stream_options"] = json!({"include_usage": true});
        }
        b
    };
    let (mut got, mut prompt_tokens) = (Vec::new(), 0);
    let t0 = Instant::now();
    for (path, b, stream) in &asks {
        let r = http::post(gw, path, body(b.clone(), *stream)).await?;
        let (text, tokens) = text_and_prompt(&r, *stream).with_context(|| format!("{path} stream={stream}"))?;
        ensure!(r.header("x-flotilla-endpoint").is_some_and(|e| e.ends_with(d)), "not decoded on D: {:?}", r.headers);
        got.push(text);
        prompt_tokens += tokens;
    }
    let took = t0.elapsed();

    let scrape = http::get(d, "/metrics").await?.text();
    let by_source = |s: &str| sample(&scrape, "vllm:prompt_tokens_by_source_total", &format!("source=\"{s}\""));
    let (computed, pulled) = (by_source("local_compute"), by_source("external_kv_transfer"));
    let pulls = sample(&scrape, "vllm:nixl_xfer_time_seconds_count", "");
    let failed = sample(&scrape, "vllm:nixl_num_failed_transfers_total", "");
    println!("  D: prompt tokens computed {computed}, pulled {pulled} (of {prompt_tokens}); NIXL pulls {pulls}, failed {failed}");
    ensure!(computed == 0.0, "the decode engine computed {computed} prompt tokens itself");
    ensure!(pulled == prompt_tokens as f64, "the decode engine pulled {pulled} prompt tokens of {prompt_tokens}");
    ensure!(pulls == asks.len() as f64 && failed == 0.0, "NIXL pulls {pulls}, failed {failed}");
    let gw_scrape = http::get(gw, "/metrics").await?.text();
    let remote = sample(&gw_scrape, "flotilla_gateway_pd_requests_total", "split=\"remote\"");
    ensure!(remote == asks.len() as f64, "gateway pd_requests_total{{split=remote}} {remote}");

    for ((path, b, _), via_pd) in asks.iter().zip(&got) {
        let r = http::post(p, path, body(b.clone(), false)).await?;
        let (alone, _) = text_and_prompt(&r, false)?;
        ensure!(&alone == via_pd, "{path}: disaggregated {via_pd:?}, P alone {alone:?}");
    }
    // The decode-only fallback: D, a kv_consumer, computes a new prompt sent to it without
    // kv_transfer_params itself, with P's answer.
    let fresh = body(json!({"prompt": prompt(4)}), false);
    let (on_d, tokens) = text_and_prompt(&http::post(d, "/v1/completions", fresh.clone()).await?, false)?;
    let (on_p, _) = text_and_prompt(&http::post(p, "/v1/completions", fresh).await?, false)?;
    ensure!(on_d == on_p, "a prompt on D alone {on_d:?}, on P alone {on_p:?}");
    let scrape = http::get(d, "/metrics").await?.text();
    let by_source = |s: &str| sample(&scrape, "vllm:prompt_tokens_by_source_total", &format!("source=\"{s}\""));
    let computed_alone = by_source("local_compute") + by_source("local_cache_hit");
    ensure!(computed_alone == tokens as f64, "D alone took {computed_alone} prompt tokens locally of {tokens}");
    Ok(format!(
        "{} requests prefill→decode in {:.1} s, {pulled} prompt tokens pulled, none computed on D; D alone computed its prompt",
        asks.len(),
        took.as_secs_f64()
    ))
}
