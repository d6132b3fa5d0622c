//! `vllm bench serve`, vLLM's own load client (a third party to flotilla), through the
//! gateway: to a `flotilla sim` process and to the real vLLM. Both of its OpenAI backends
//! run (`openai-chat` on /v1/chat/completions, `openai` on /v1/completions) with the random
//! dataset and the tiny model's tokenizer, one request at a time. Against the sim the
//! client's tokenizer differs from the server's, so it aligns its prompts through the
//! gateway's `/tokenize` and `/detokenize` first.
//!
//! Each run must finish with every request completed and none failed, and the client's
//! mean TTFT must agree with what the others measured of the same requests:
//! - with the gateway's own TTFT metric: the gateway sees the first token before the client
//!   does, at most [`CLIENT_SLACK_MS`] + [`CLIENT_SLACK_REL`] earlier;
//! - with the engine's TTFT metric (`vllm:time_to_first_token_seconds`), by the same slack;
//! - on the sim, the engine's TTFT with its profile: one prefill step for the prompt
//!   lengths it saw, within [`PROFILE_TOLERANCE`] (speedup 1, one request at a time, so
//!   nothing else shares the step).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use flotilla_engine::metrics::samples;
use flotilla_sim::latency::{self, StepShape};
use flotilla_testkit::http;
use flotilla_testkit::ports::free_port;
use flotilla_testkit::procs::{log_tail, Group};

use crate::install::RealVllm;

/// The client may see the first token this much later than the gateway (the Python
/// client's own parsing, one more hop)...
const CLIENT_SLACK_MS: f64 = 5.0;
/// ...plus this share of its TTFT.
const CLIENT_SLACK_REL: f64 = 0.10;
/// The sim's mean TTFT against its profile's prefill step.
const PROFILE_TOLERANCE: f64 = 0.20;
/// The sim's profile.
const PROFILE: &str = "a100-llama3-8b";
/// A bench run's wall-clock bound (the client imports vLLM: ~10 s before it sends).
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// What one run measured, for the tier's timing summary.
pub struct Measured {
    pub client_ttft_ms: f64,
    pub gateway_ttft_ms: f64,
    pub engine_ttft_ms: f64,
}

impl std::fmt::Display for Measured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "mean TTFT client {:.1} ms, gateway {:.1} ms, engine {:.1} ms",
            self.client_ttft_ms, self.gateway_ttft_ms, self.engine_ttft_ms
        )
    }
}

/// Sums of the samples named `name` (any labels) in a scrape of `authority`.
async fn metric(authority: &str, name: &str) -> anyhow::Result<f64> {
    let text = http::get(authority, "/metrics").await?.text();
    Ok(samples(&text).filter(|s| s.name == name).map(|s| s.value).sum())
}

/// (sum, count) of a histogram.
async fn histogram(authority: &str, name: &str) -> anyhow::Result<(f64, f64)> {
    Ok((metric(authority, &format!("{name}_sum")).await?, metric(authority, &format!("{name}_count")).await?))
}

/// Runs `vllm bench serve` against `base` and returns its result file.
async fn bench(
    install: &RealVllm,
    dir: &Path,
    base: &str,
    backend: &str,
    input_len: u32,
    output_len: u32,
    prompts: u32,
) -> anyhow::Result<serde_json::Value> {
    let (endpoint, name) = match backend {
        "openai-chat" => ("/v1/chat/completions", "chat"),
        _ => ("/v1/completions", "completions"),
    };
    let result = format!("bench-{name}-{}.json", base.replace([':', '.', '/'], "_"));
    let log = dir.join(result.replace(".json", ".log"));
    let mut cmd = tokio::process::Command::new(install.vllm());
    cmd.args(["bench", "serve", "--backend", backend, "--endpoint", endpoint, "--base-url"])
        .arg(format!("http://{base}"))
        .args(["--model", "tiny", "--tokenizer"])
        .arg(install.model())
        .args(["--dataset-name", "random", "--random-input-len", &input_len.to_string()])
        .args(["--random-output-len", &output_len.to_string(), "--num-prompts", &prompts.to_string()])
        .args(["--max-concurrency", "1", "--ignore-eos", "--temperature", "0", "--seed", "7"])
        .args(["--save-result", "--result-dir"])
        .arg(dir)
        .args(["--result-filename", &result])
        .envs(install.env())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(&log)?.try_clone()?)
        .kill_on_drop(true);
    let status = tokio::time::timeout(RUN_TIMEOUT, cmd.status())
        .await
        .with_context(|| format!("vllm bench serve ran over {RUN_TIMEOUT:?}:\n{}", log_tail(&log, 30)))??;
    ensure!(status.success(), "vllm bench serve failed ({status}):\n{}", log_tail(&log, 40));
    let text = std::fs::read_to_string(dir.join(&result))
        .with_context(|| format!("no result file {result}:\n{}", log_tail(&log, 30)))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    ensure!(
        v["completed"] == prompts && v["failed"] == 0,
        "{backend}: completed {} of {prompts}, failed {}:\n{}",
        v["completed"],
        v["failed"],
        log_tail(&log, 30)
    );
    Ok(v)
}

/// One bench run through the gateway at `gw` to the engine at `engine`, with the TTFT
/// agreement checks; returns the three means.
async fn run_and_compare(
    install: &RealVllm,
    dir: &Path,
    gw: &str,
    engine: &str,
    backend: &str,
    lens: (u32, u32, u32),
) -> anyhow::Result<(Measured, f64)> {
    const GW_TTFT: &str = "flotilla_gateway_time_to_first_token_seconds";
    const ENGINE_TTFT: &str = "vllm:time_to_first_token_seconds";
    let (gw0, engine0) = (histogram(gw, GW_TTFT).await?, histogram(engine, ENGINE_TTFT).await?);
    let prompt0 = metric(engine, "vllm:prompt_tokens_total").await?;
    let v = bench(install, dir, gw, backend, lens.0, lens.1, lens.2).await?;
    let (gw1, engine1) = (histogram(gw, GW_TTFT).await?, histogram(engine, ENGINE_TTFT).await?);
    let prompt1 = metric(engine, "vllm:prompt_tokens_total").await?;
    let mean = |a: (f64, f64), b: (f64, f64)| 1000.0 * (b.0 - a.0) / (b.1 - a.1).max(1.0);
    let m = Measured {
        client_ttft_ms: v["mean_ttft_ms"].as_f64().context("mean_ttft_ms")?,
        gateway_ttft_ms: mean(gw0, gw1),
        engine_ttft_ms: mean(engine0, engine1),
    };
    ensure!(gw1.1 - gw0.1 >= f64::from(lens.2), "{backend}: the gateway timed {} requests", gw1.1 - gw0.1);
    let slack = CLIENT_SLACK_MS + CLIENT_SLACK_REL * m.client_ttft_ms;
    ensure!(
        m.gateway_ttft_ms <= m.client_ttft_ms + 1.0 && m.client_ttft_ms - m.gateway_ttft_ms <= slack,
        "{backend}: the client's TTFT disagrees with the gateway's (slack {slack:.1} ms): {m}"
    );
    ensure!(
        m.engine_ttft_ms <= m.gateway_ttft_ms + 1.0 && m.gateway_ttft_ms - m.engine_ttft_ms <= slack,
        "{backend}: the gateway's TTFT disagrees with the engine's (slack {slack:.1} ms): {m}"
    );
    let mean_prompt = (prompt1 - prompt0) / (engine1.1 - engine0.1).max(1.0);
    Ok((m, mean_prompt))
}

/// Both backends through a static gateway to a `flotilla sim` process of the a100 profile.
pub async fn to_the_sim(install: &RealVllm, bin: &Path, dir: &Path) -> anyhow::Result<String> {
    let port = free_port()?;
    let sim_addr = format!("127.0.0.1:{port}");
    let mut cmd = std::process::Command::new(bin);
    cmd.args(["sim", "--port", &port.to_string(), "--model", "tiny", "--profile", PROFILE]).env("RUST_LOG", "warn");
    let log = dir.join("bench-sim.log");
    let mut sim = Group::spawn("flotilla sim", cmd, &log);
    http::wait_healthy(&sim_addr, Duration::from_secs(30)).await.with_context(|| log_tail(&log, 20))?;
    let gw = crate::checks::gateway(&[&sim_addr]).await?;
    let gw_addr = gw.local_addr().to_string();
    let profile = latency::profile(PROFILE).context("the profile")?;
    let mut out = Vec::new();
    for backend in ["openai-chat", "openai"] {
        let (m, prompt) = run_and_compare(install, dir, &gw_addr, &sim_addr, backend, (200, 16, 20)).await?;
        let p = prompt.round() as u32;
        let step =
            profile.step_time(StepShape { prefill_tokens: p, kv_blocks: p.div_ceil(16), ..Default::default() }, 16);
        let expected = 1000.0 * step;
        ensure!(
            (m.engine_ttft_ms - expected).abs() <= PROFILE_TOLERANCE * expected,
            "{backend}: the sim's TTFT is not its profile's prefill step of {p} tokens ({expected:.1} ms ± {:.0}%): {m}",
            PROFILE_TOLERANCE * 100.0
        );
        out.push(format!("{backend}: {m}, profile {expected:.1} ms for {p} tokens"));
    }
    gw.shutdown().await;
    sim.stop(Duration::from_secs(5));
    Ok(out.join("; "))
}

/// Both backends through a static gateway to the real vLLM at `real`.
pub async fn to_real_vllm(install: &RealVllm, dir: &Path, real: &str) -> anyhow::Result<String> {
    let gw = crate::checks::gateway(&[real]).await?;
    let gw_addr = gw.local_addr().to_string();
    let mut out = Vec::new();
    for backend in ["openai-chat", "openai"] {
        let (m, _) = run_and_compare(install, dir, &gw_addr, real, backend, (64, 8, 8)).await?;
        out.push(format!("{backend}: {m}"));
    }
    gw.shutdown().await;
    Ok(out.join("; "))
}
