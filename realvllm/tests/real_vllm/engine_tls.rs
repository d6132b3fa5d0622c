//! TLS between gateways and an engine the agent starts, on real vLLM: an agent with
//! `--engine-tls on` gives `vllm serve` a self-signed certificate of its own
//! (`--ssl-certfile`, `--ssl-keyfile` in the engine's private directory) and reports its
//! SHA-256 with the endpoint. The replica goes Ready (the agent's own probes reach vLLM over
//! https, pinned), vLLM serves exactly the pinned certificate, a plain-http request gets no
//! answer, a gateway following the leader's endpoint table serves completions from it over
//! https, and the certificate's files go when the engine is deleted.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use serde_json::json;

use flotilla_engine::{CertFingerprint, EngineClient, EngineKey};
use flotilla_testkit::http;
use flotilla_testkit::proc_fs::{args as cmdline, find_process, group_members};

use crate::cluster;

/// The certificate pin and API key of the engine at `v` in the endpoint table.
async fn pin_and_key(grpc: &str, v: &str) -> anyhow::Result<(String, String)> {
    let e = crate::engine_key::endpoint(grpc, v).await?;
    Ok((e.engine_cert_sha256, e.api_key))
}

/// Run with an agent started with `--engine-tls on` (whatever runs of `tiny` before: the
/// Model is deleted and applied again, so its engine is one this agent starts).
pub async fn agents_vllm_serves_tls(
    bin: &Path,
    grpc: &str,
    manifest: &Path,
    agent_dir: &Path,
    start_timeout: Duration,
) -> anyhow::Result<()> {
    let _ = cluster::cli(bin, grpc, &["delete", "model", "tiny"], None);
    cluster::wait_replicas(grpc, "tiny", Duration::from_secs(60), "no tiny replica left", |r| r.is_empty()).await?;
    cluster::cli(bin, grpc, &["apply", "-f", &manifest.display().to_string()], None)?;
    let r = cluster::wait_replicas(grpc, "tiny", start_timeout, "the tiny replica Ready over TLS", |r| {
        r.len() == 1 && r[0].phase == "Ready"
    })
    .await?;
    let v = r[0].endpoint.clone().context("a Ready replica has an endpoint")?;
    let replica = r[0].name.clone();
    let (pin, key) = pin_and_key(grpc, &v).await?;
    let pin: CertFingerprint = pin.parse().map_err(|e| anyhow::anyhow!("the endpoint's pin: {e}"))?;
    let key = EngineKey::new(&key).context("the endpoint's key")?;

    // vLLM was given the agent's certificate files.
    let port = v.rsplit(':').next().unwrap_or_default().to_string();
    let pid = find_process(&["serve", "--port", &port]).context("the engine process")?;
    let words = cmdline(pid);
    let files = agent_dir.join("engines").join(&replica);
    let cert = files.join("tls-cert.pem").display().to_string();
    ensure!(words.windows(2).any(|w| w[0] == "--ssl-certfile" && w[1] == cert), "no --ssl-certfile {cert}: {words:?}");

    // vLLM serves the pinned certificate; any other pin is refused before a request.
    let client = EngineClient::new();
    let hold = client.pins().hold("127.0.0.1", pin).context("hold the pin")?;
    let https = client.with_tls(true).with_key(Some(key.clone()));
    ensure!(https.health(&v).await, "/health over https with the pin");
    let models = https.models(&v).await.context("/v1/models over https with the key")?;
    ensure!(models.iter().any(|m| m.id == "tiny"), "{models:?}");
    drop(hold);
    let stranger = EngineClient::new();
    let _wrong = stranger.pins().hold("127.0.0.1", CertFingerprint::of_der(b"not vLLM's certificate"));
    let refused = stranger.with_tls(true).health(&v).await;
    ensure!(!refused, "a wrong pin was accepted");

    // Plain http gets no answer.
    let plain = http::get(&v, "/health").await;
    ensure!(plain.as_ref().map_or(true, |r| r.status != 200), "plain http answered: {:?}", plain.map(|r| r.status));

    // A gateway following the endpoint table serves it over https.
    let gw = cluster::gateway(grpc).await?;
    let addr = gw.local_addr().to_string();
    let body = json!({"model": "tiny", "prompt": "over TLS", "max_tokens": 4, "ignore_eos": true});
    let t0 = tokio::time::Instant::now();
    let r = loop {
        let r = http::post(&addr, "/v1/completions", body.clone()).await?;
        if r.status == 200 || t0.elapsed() > Duration::from_secs(20) {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    gw.shutdown().await;
    ensure!(r.status == 200, "through the gateway: {} {}", r.status, r.text());
    ensure!(
        r.header("x-flotilla-endpoint").as_deref() == Some(v.as_str()),
        "served by {:?}",
        r.header("x-flotilla-endpoint")
    );
    println!("  {v} served over TLS, pin {}", &pin.hex()[..16]);

    // Deleted: the engine and its certificate go.
    cluster::cli(bin, grpc, &["delete", "model", "tiny"], None)?;
    let t0 = tokio::time::Instant::now();
    while !group_members(pid).is_empty() || files.exists() {
        ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "left after delete: group {:?}, files {}",
            group_members(pid),
            files.exists()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
