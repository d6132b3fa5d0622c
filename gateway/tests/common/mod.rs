//! Shared helpers for the gateway's integration tests: in-process sims as engines, a
//! gateway on a free port, a small HTTP client (hyper), and a fake control plane
//! (FleetService + ObjectService, and a leader's AdapterService and AutoscaleService) for
//! the watch path.
#![allow(dead_code)]

pub mod fake_autoscale;
pub mod fake_cp;
pub mod fake_leader;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use flotilla_gateway::{GatewayArgs, GatewayHandle};
use flotilla_sim::{SimArgs, SimHandle};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub const MODEL: &str = "demo";

pub fn sim_args(speedup: f64) -> SimArgs {
    SimArgs { port: 0, model: MODEL.into(), speedup, max_model_len: 8192, allow_faults: true, ..SimArgs::default() }
}

pub async fn sim(speedup: f64) -> SimHandle {
    flotilla_sim::start(sim_args(speedup)).await.expect("sim starts")
}

pub async fn sims(n: usize, speedup: f64) -> Vec<SimHandle> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(sim(speedup).await);
    }
    v
}

/// Gateway args routing `demo` to the given sims, auth off.
pub fn gw_args(sims: &[SimHandle]) -> GatewayArgs {
    GatewayArgs {
        listen: "127.0.0.1:0".into(),
        backends: sims.iter().map(|s| format!("{MODEL}=http://{}", s.local_addr())).collect(),
        no_auth: true,
        scrape_interval_ms: 100,
        ..GatewayArgs::default()
    }
}

/// Gateway args following the control plane at `server` (its endpoint table and objects),
/// auth off.
pub fn cluster_gw_args(server: impl ToString) -> GatewayArgs {
    GatewayArgs {
        listen: "127.0.0.1:0".into(),
        no_auth: true,
        server: vec![server.to_string()],
        ..GatewayArgs::default()
    }
}

pub async fn gateway(args: GatewayArgs) -> GatewayHandle {
    flotilla_gateway::start(args).await.expect("gateway starts")
}

/// A whole response (`flotilla_testkit::http::Resp`), with the gateway tests' panicking JSON
/// and the headers and error fields they look at.
#[derive(Debug)]
pub struct Resp(pub flotilla_testkit::http::Resp);

impl std::ops::Deref for Resp {
    type Target = flotilla_testkit::http::Resp;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        self.0.json().unwrap_or_else(|e| panic!("{e}"))
    }
    pub fn endpoint(&self) -> String {
        self.header("x-flotilla-endpoint")
            .unwrap_or_else(|| panic!("no x-flotilla-endpoint: {} {}", self.status, self.text()))
    }
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"].as_str().unwrap_or_default().to_string()
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// One request (a JSON content type, whatever the body), whole response, 60 s bound.
pub async fn send(addr: SocketAddr, method: &str, path: &str, body: &[u8], headers: &[(&str, &str)]) -> Resp {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    let body = Bytes::copy_from_slice(body);
    let authority = addr.to_string();
    let fut = flotilla_testkit::http::send_bytes(method, &authority, path, body, &all);
    match tokio::time::timeout(Duration::from_secs(60), fut).await {
        Ok(r) => Resp(r.unwrap_or_else(|e| panic!("{method} {path}: {e}"))),
        Err(_) => panic!("{method} {path} timed out"),
    }
}

pub async fn post(addr: SocketAddr, path: &str, body: serde_json::Value, headers: &[(&str, &str)]) -> Resp {
    send(addr, "POST", path, body.to_string().as_bytes(), headers).await
}

pub async fn get(addr: SocketAddr, path: &str) -> Resp {
    send(addr, "GET", path, b"", &[]).await
}

/// A completion of exactly `max_tokens` tokens.
pub async fn complete(addr: SocketAddr, prompt: &str, max_tokens: u32, headers: &[(&str, &str)]) -> Resp {
    post(
        addr,
        "/v1/completions",
        serde_json::json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true}),
        headers,
    )
    .await
}

/// A long English-like text of about `words` words, distinct per `salt`.
pub fn text(words: usize, salt: u64) -> String {
    flotilla_sim::text::synthetic_prompt(words, salt)
}

/// Sum of a gateway metric over the series whose text contains every `filter`.
pub async fn metric_sum(addr: SocketAddr, name: &str, filters: &[&str]) -> f64 {
    let r = get(addr, "/metrics").await;
    r.text()
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| filters.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}
