//! The data-plane workload: a bounded, paced stream of completions through the gateway,
//! each outcome recorded with its time span, and the attribution rule: a failed request
//! is *attributed* when its span overlaps a window in which an engine was faulted (crashed,
//! hung, erroring) — those are bounded and reported — and *unattributed* otherwise: a
//! request whose engine stayed up must not fail, whatever happens to servers or agents.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

/// One request's outcome.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Offsets from the start of the fault phase.
    pub start: Duration,
    pub end: Duration,
    /// HTTP status, or None for a transport failure / timeout.
    pub status: Option<u16>,
    pub detail: String,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.status == Some(200)
    }
}

/// Summary of the data plane.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DataSummary {
    pub requests: usize,
    pub ok: usize,
    pub attributed_failures: usize,
    pub unattributed_failures: usize,
    /// Examples of unattributed failures (at most 5).
    pub examples: Vec<String>,
    /// Longest stretch with no successful request while requests were being sent.
    pub longest_outage: Duration,
}

/// Classifies outcomes against the engine-fault windows (offsets, inclusive).
pub fn summarize(outcomes: &[Outcome], engine_fault_windows: &[(Duration, Duration)]) -> DataSummary {
    let mut s = DataSummary { requests: outcomes.len(), ..DataSummary::default() };
    for o in outcomes {
        if o.ok() {
            s.ok += 1;
        } else if engine_fault_windows.iter().any(|(a, b)| o.start <= *b && o.end >= *a) {
            s.attributed_failures += 1;
        } else {
            s.unattributed_failures += 1;
            if s.examples.len() < 5 {
                s.examples.push(format!(
                    "{:.1}s-{:.1}s: {} {}",
                    o.start.as_secs_f64(),
                    o.end.as_secs_f64(),
                    o.status.map_or("transport".to_string(), |c| c.to_string()),
                    o.detail
                ));
            }
        }
    }
    let mut ends: Vec<Duration> = outcomes.iter().filter(|o| o.ok()).map(|o| o.end).collect();
    ends.sort();
    let first = outcomes.iter().map(|o| o.start).min().unwrap_or_default();
    let last = outcomes.iter().map(|o| o.end).max().unwrap_or_default();
    let mut prev = first;
    for e in ends.iter().copied().chain([last]) {
        s.longest_outage = s.longest_outage.max(e.saturating_sub(prev));
        prev = prev.max(e);
    }
    s
}

/// Sends `rps` completions per second for `model` to `gateway` (host:port) until
/// `duration` has passed; returns every outcome (requests in flight at the end are awaited,
/// bounded by the request timeout).
pub async fn run(
    gateway: String,
    model: String,
    rps: u32,
    tokens: u32,
    t0: Instant,
    duration: Duration,
) -> Vec<Outcome> {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rps.max(1) as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut tasks = Vec::new();
    let mut n = 0u64;
    while t0.elapsed() < duration {
        tick.tick().await;
        n += 1;
        let body = serde_json::json!({"model": model, "prompt": format!("chaos request {n}"), "max_tokens": tokens,
                                      "ignore_eos": true})
        .to_string();
        let (client, url) = (client.clone(), format!("http://{gateway}/v1/completions"));
        tasks.push(tokio::spawn(async move {
            let start = t0.elapsed();
            let req =
                http::Request::post(url).header("content-type", "application/json").body(Full::new(Bytes::from(body)));
            let fut = async {
                let resp = client.request(req.map_err(|e| e.to_string())?).await.map_err(|e| e.to_string())?;
                let status = resp.status().as_u16();
                let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
                Ok::<_, String>((status, String::from_utf8_lossy(&body).chars().take(200).collect::<String>()))
            };
            let (status, detail) = match tokio::time::timeout(Duration::from_secs(30), fut).await {
                Ok(Ok((s, body))) => (Some(s), if s == 200 { String::new() } else { body }),
                Ok(Err(e)) => (None, e),
                Err(_) => (None, "timed out after 30 s".to_string()),
            };
            Outcome { start, end: t0.elapsed(), status, detail }
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        if let Ok(o) = t.await {
            out.push(o);
        }
    }
    out
}

/// `POST http://addr/path` with a JSON body (the sim's fault API); Ok when 2xx.
pub async fn post_json(addr: &str, path: &str, body: &serde_json::Value) -> Result<(), String> {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let req = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(3), client.request(req)).await {
        Ok(Ok(r)) if r.status().is_success() => Ok(()),
        Ok(Ok(r)) => Err(format!("answered {}", r.status())),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(start: u64, end: u64, status: Option<u16>) -> Outcome {
        Outcome { start: Duration::from_secs(start), end: Duration::from_secs(end), status, detail: String::new() }
    }

    #[test]
    fn failures_inside_engine_fault_windows_are_attributed() {
        let outcomes = [o(0, 1, Some(200)), o(4, 6, Some(502)), o(9, 10, None), o(12, 13, Some(200))];
        let s = summarize(&outcomes, &[(Duration::from_secs(5), Duration::from_secs(7))]);
        assert_eq!((s.requests, s.ok, s.attributed_failures, s.unattributed_failures), (4, 2, 1, 1));
        assert!(s.examples[0].starts_with("9.0s-10.0s: transport"), "{:?}", s.examples);
        assert_eq!(s.longest_outage, Duration::from_secs(12), "from 1 s to 13 s no request succeeded");
    }
}
