//! Shared helpers for the simulator's integration tests: start an in-process sim on a free
//! port, a minimal HTTP/1.1 client over TCP (no client crate needed), and a metrics reader.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use flotilla_sim::{SimArgs, SimHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Default args for tests: ephemeral port, fast clock.
pub fn args() -> SimArgs {
    SimArgs { port: 0, model: "demo".into(), speedup: 50.0, ..SimArgs::default() }
}

pub async fn start(args: SimArgs) -> SimHandle {
    flotilla_sim::start(args).await.expect("sim starts")
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `data:` payloads of a server-sent-event body.
    pub fn sse(&self) -> Vec<String> {
        self.body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
    }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..eol]).unwrap().trim(), 16).unwrap();
        raw = &raw[eol + 2..];
        if size == 0 {
            break;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
    out
}

/// Sends one request on a fresh connection and reads the whole response.
pub async fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>) -> Resp {
    request_with(addr, method, path, body, &[]).await
}

/// [`request`] with extra header lines (`("Authorization", "Bearer k")`).
pub async fn request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> Resp {
    tokio::time::timeout(Duration::from_secs(60), request_inner(addr, method, path, body, headers))
        .await
        .unwrap_or_else(|_| panic!("{method} {path} timed out"))
}

async fn request_inner(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> Resp {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let body = body.unwrap_or(b"");
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // a refused huge body may close the socket early; that is fine
    let _ = s.write_all(body).await;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("response head");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status: u16 = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &raw[split + 4..];
    let body = if headers.get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Resp { status, headers, body: String::from_utf8_lossy(&body).to_string() }
}

pub async fn post(addr: SocketAddr, path: &str, body: serde_json::Value) -> Resp {
    request(addr, "POST", path, Some(body.to_string().as_bytes())).await
}

pub async fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, "GET", path, None).await
}

/// A completion of `max_tokens` tokens exactly.
pub async fn complete(addr: SocketAddr, model: &str, prompt: &str, max_tokens: u32) -> Resp {
    post(
        addr,
        "/v1/completions",
        serde_json::json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true}),
    )
    .await
}

/// Parsed `/metrics`: series (name plus labels, as written) to value.
pub async fn metrics(addr: SocketAddr) -> HashMap<String, f64> {
    let r = get(addr, "/metrics").await;
    assert_eq!(r.status, 200);
    r.body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(k, v)| (k.to_string(), v.parse::<f64>().unwrap_or(f64::NAN)))
        .collect()
}

/// The value of an unlabelled-extra vLLM series for model `demo`, e.g. `vllm:num_requests_running`.
pub fn m(metrics: &HashMap<String, f64>, name: &str) -> f64 {
    let key = format!("{name}{{engine=\"0\",model_name=\"demo\"}}");
    *metrics.get(&key).unwrap_or_else(|| panic!("no series {key}"))
}

/// A series with one extra label (written before or after model_name as vLLM orders them).
pub fn ml(metrics: &HashMap<String, f64>, name: &str, label: &str, value: &str) -> f64 {
    let a = format!("{name}{{engine=\"0\",{label}=\"{value}\",model_name=\"demo\"}}");
    let b = format!("{name}{{engine=\"0\",model_name=\"demo\",{label}=\"{value}\"}}");
    *metrics.get(&a).or_else(|| metrics.get(&b)).unwrap_or_else(|| panic!("no series {a}"))
}

/// Mean of a histogram between two scrapes.
pub fn mean_delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, hist: &str) -> f64 {
    let sum = m(after, &format!("{hist}_sum")) - m(before, &format!("{hist}_sum"));
    let count = m(after, &format!("{hist}_count")) - m(before, &format!("{hist}_count"));
    assert!(count > 0.0, "no new observations of {hist}");
    sum / count
}

/// Polls until the engine is idle (nothing running or waiting).
pub async fn wait_idle(addr: SocketAddr) {
    for _ in 0..600 {
        let mm = metrics(addr).await;
        if m(&mm, "vllm:num_requests_running") == 0.0 && m(&mm, "vllm:num_requests_waiting") == 0.0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("engine never went idle");
}

/// A long English-like text of about `words` words, distinct per `salt`.
pub fn text(words: usize, salt: u64) -> String {
    flotilla_sim::text::synthetic_prompt(words, salt)
}
