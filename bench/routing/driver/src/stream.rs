//! One streaming request: send, read the server-sent events as they arrive, time the first
//! event carrying text (TTFT) and the gaps between text events (ITL). Events that arrive in
//! the same read count as arriving together (a gap of 0), as a client sees them.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;

use crate::HttpClient;

pub struct Stats {
    pub ttft: f64,
    pub e2e: f64,
    pub itl: Vec<f64>,
    /// Output tokens: the final usage chunk's `completion_tokens`, else text events.
    pub tokens: u64,
}

/// The request's timings, or the kind of failure (`http_503`, `connect`, `timeout`,
/// `stream_error`, `no_content`, `error_event`).
pub async fn send(client: &HttpClient, req: hyper::Request<Full<Bytes>>, timeout: Duration) -> Result<Stats, String> {
    let t0 = Instant::now();
    match tokio::time::timeout(timeout, run(client, req, t0)).await {
        Ok(r) => r,
        Err(_) => Err("timeout".into()),
    }
}

async fn run(client: &HttpClient, req: hyper::Request<Full<Bytes>>, t0: Instant) -> Result<Stats, String> {
    let resp = client.request(req).await.map_err(|_| "connect".to_string())?;
    if !resp.status().is_success() {
        return Err(format!("http_{}", resp.status().as_u16()));
    }
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    let (mut first, mut last) = (None::<f64>, None::<f64>);
    let mut itl = Vec::new();
    let (mut events, mut usage) = (0u64, None::<u64>);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| "stream_error".to_string())?;
        let Some(data) = frame.data_ref() else { continue };
        let now = t0.elapsed().as_secs_f64();
        buf.extend_from_slice(data);
        while let Some(end) = find(&buf, b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            for line in event.split(|b| *b == b'\n') {
                let Some(payload) = line.strip_prefix(b"data:") else { continue };
                let payload = payload.trim_ascii();
                if payload == b"[DONE]" {
                    continue;
                }
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else { continue };
                if v.get("error").is_some() {
                    return Err("error_event".into());
                }
                if let Some(n) = v.pointer("/usage/completion_tokens").and_then(|n| n.as_u64()) {
                    usage = Some(n);
                }
                let text = v
                    .pointer("/choices/0/text")
                    .or_else(|| v.pointer("/choices/0/delta/content"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("");
                if !text.is_empty() {
                    events += 1;
                    if first.is_none() {
                        first = Some(now);
                    }
                    if let Some(l) = last {
                        itl.push(now - l);
                    }
                    last = Some(now);
                }
            }
        }
    }
    let ttft = first.ok_or_else(|| "no_content".to_string())?;
    Ok(Stats { ttft, e2e: t0.elapsed().as_secs_f64(), itl, tokens: usage.unwrap_or(events) })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
