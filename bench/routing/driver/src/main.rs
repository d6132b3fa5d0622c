//! Load driver of the KV-aware routing benchmark (bench/routing/run.sh runs it once per
//! point). Sends the seeded request sequence of `workload.rs` to one router as streaming
//! `/v1/completions`, open loop (Poisson arrivals, each request its own task), and prints
//! one JSON line: client-side TTFT (first streamed event with content) p50/p90/p99, ITL
//! (gaps between content events) p50/p99, end-to-end latency, completed requests and output
//! tokens per second, failures by kind, the engines' prefix-cache hit rate (deltas of
//! `vllm:prefix_cache_{hits,queries}_total` summed over `--sims`, scraped before and after)
//! and the computed oracle hit rate.
//!
//! Bounded: arrivals stop at `--max-duration-s` (the rest count as `not_sent`), each request
//! gives up after `--request-timeout-s`.
//!
//! ```text
//! routing-driver --url http://127.0.0.1:8080 --sims http://127.0.0.1:9001,... \
//!   --requests 2000 --rate 40 --header x-flotilla-routing:prefix-cache --label flotilla:prefix-cache
//! ```

mod stream;
mod workload;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

#[derive(Parser, Debug)]
struct Args {
    /// The router's base URL.
    #[arg(long)]
    url: String,
    /// The engines' base URLs, comma-separated (metrics before and after; `/tokenize` check).
    #[arg(long, value_delimiter = ',')]
    sims: Vec<String>,
    /// Served model name.
    #[arg(long, default_value = "m")]
    model: String,
    /// Extra request header `NAME:VALUE` (repeatable), e.g. `x-flotilla-routing:prefix-cache`.
    #[arg(long)]
    header: Vec<String>,
    /// Label copied into the output line.
    #[arg(long, default_value = "")]
    label: String,
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Offered load, requests per second (Poisson).
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 60)]
    prefixes: usize,
    /// Words (= sim tokens) per shared prefix.
    #[arg(long, default_value_t = 4000)]
    prefix_tokens: usize,
    /// Words (= sim tokens) of each request's unique suffix.
    #[arg(long, default_value_t = 32)]
    suffix_tokens: usize,
    /// Zipf exponent of prefix popularity.
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    /// The engines' KV block size in tokens (for the oracle).
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// No request is sent after this many seconds from the start.
    #[arg(long, default_value_t = 600)]
    max_duration_s: u64,
    #[arg(long, default_value_t = 120)]
    request_timeout_s: u64,
    /// A JSON object merged into the output line (run number, commit, sizing).
    #[arg(long, default_value = "{}")]
    extra: String,
    /// Print the oracle and workload figures and exit without sending anything.
    #[arg(long)]
    dry_run: bool,
}

async fn get(client: &HttpClient, url: &str) -> Option<String> {
    let req = hyper::Request::get(url).body(Full::new(Bytes::new())).ok()?;
    let r = tokio::time::timeout(Duration::from_secs(10), client.request(req)).await.ok()?.ok()?;
    let b = r.into_body().collect().await.ok()?.to_bytes();
    Some(String::from_utf8_lossy(&b).into_owned())
}

/// (hits, queries) summed over the engines; None when one of them did not answer.
async fn prefix_counters(client: &HttpClient, sims: &[String]) -> Option<(f64, f64)> {
    let (mut hits, mut queries) = (0.0, 0.0);
    for s in sims {
        let text = get(client, &format!("{s}/metrics")).await?;
        for line in text.lines() {
            let v = line.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()).unwrap_or(0.0);
            if line.starts_with("vllm:prefix_cache_hits_total") {
                hits += v;
            } else if line.starts_with("vllm:prefix_cache_queries_total") {
                queries += v;
            }
        }
    }
    Some((hits, queries))
}

/// The engine's token count for `prompt` (its `/tokenize`).
async fn engine_count(client: &HttpClient, sim: &str, model: &str, prompt: &str) -> Option<usize> {
    let body = serde_json::json!({"model": model, "prompt": prompt}).to_string();
    let req = hyper::Request::post(format!("{sim}/tokenize"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .ok()?;
    let r = client.request(req).await.ok()?;
    let b = r.into_body().collect().await.ok()?.to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&b).ok()?;
    v.get("count").and_then(|c| c.as_u64()).map(|c| c as usize)
}

fn pct(v: &mut [f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

fn ms(v: Option<f64>) -> serde_json::Value {
    v.map_or(serde_json::Value::Null, |s| serde_json::json!((s * 1e5).round() / 1e2))
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let spec = workload::Spec {
        seed: args.seed,
        requests: args.requests,
        rate: args.rate,
        prefixes: args.prefixes,
        prefix_tokens: args.prefix_tokens,
        suffix_tokens: args.suffix_tokens,
        zipf: args.zipf,
        block_size: args.block_size,
    };
    let reqs = workload::generate(&spec);
    let (oh, oq) = workload::oracle(&reqs, spec.block_size);
    let prompt_tokens = reqs[0].tokens.len();
    let mut out = serde_json::json!({
        "label": args.label, "url": args.url, "seed": args.seed, "requests": args.requests,
        "rate": args.rate, "prefixes": args.prefixes, "prefix_tokens": args.prefix_tokens,
        "suffix_tokens": args.suffix_tokens, "zipf": args.zipf, "max_tokens": args.max_tokens,
        "prompt_tokens": prompt_tokens, "engines": args.sims.len(),
        "oracle_hit_rate": oh as f64 / oq.max(1) as f64,
        "distinct_prefixes_used": reqs.iter().map(|r| r.prefix).collect::<std::collections::HashSet<_>>().len(),
    });
    let extra: serde_json::Value = serde_json::from_str(&args.extra).expect("--extra: a JSON object");
    if let (Some(o), Some(e)) = (out.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    if args.dry_run {
        println!("{out}");
        return;
    }
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(connector);
    if let Some(sim) = args.sims.first() {
        match engine_count(&client, sim, &args.model, &reqs[0].prompt).await {
            Some(n) if n == prompt_tokens => {}
            other => {
                eprintln!("routing-driver: the engine counts {other:?} tokens in request 0, the workload {prompt_tokens}; the oracle would be wrong");
                std::process::exit(1);
            }
        }
    }
    let before = prefix_counters(&client, &args.sims).await;
    let headers: Vec<(String, String)> = args
        .header
        .iter()
        .map(|h| {
            let (k, v) = h.split_once(':').expect("--header NAME:VALUE");
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let results = Arc::new(Mutex::new(Vec::with_capacity(reqs.len())));
    let timeout = Duration::from_secs(args.request_timeout_s);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.max_duration_s);
    let url = format!("{}/v1/completions", args.url.trim_end_matches('/'));
    let mut tasks = Vec::with_capacity(reqs.len());
    let mut not_sent = 0usize;
    let mut lag = Vec::new();
    for r in reqs {
        let at = start + Duration::from_secs_f64(r.at);
        if at > deadline {
            not_sent += 1;
            continue;
        }
        tokio::time::sleep_until(at).await;
        lag.push(at.elapsed().as_secs_f64());
        let body = serde_json::json!({"model": args.model, "prompt": r.prompt, "max_tokens": args.max_tokens,
            "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}, "temperature": 0})
        .to_string();
        let mut req = hyper::Request::post(url.as_str()).header("content-type", "application/json");
        for (k, v) in &headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req.body(Full::new(Bytes::from(body))).expect("request");
        let (client, results) = (client.clone(), results.clone());
        tasks.push(tokio::spawn(async move {
            let res = stream::send(&client, req, timeout).await;
            results.lock().unwrap().push(res);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let after = prefix_counters(&client, &args.sims).await;
    let results = std::mem::take(&mut *results.lock().unwrap());
    let (mut ttft, mut itl, mut e2e) = (Vec::new(), Vec::new(), Vec::new());
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    let mut tokens = 0u64;
    for r in results {
        match r {
            Ok(s) => {
                ttft.push(s.ttft);
                e2e.push(s.e2e);
                itl.extend(s.itl);
                tokens += s.tokens;
            }
            Err(kind) => *failures.entry(kind).or_default() += 1,
        }
    }
    let ok = ttft.len();
    let failed: usize = failures.values().sum();
    let o = out.as_object_mut().expect("object");
    o.insert("ok".into(), ok.into());
    o.insert("failed".into(), (failed + not_sent).into());
    o.insert("failures".into(), serde_json::json!(failures));
    o.insert("not_sent".into(), not_sent.into());
    o.insert("elapsed_s".into(), serde_json::json!((elapsed * 1e3).round() / 1e3));
    o.insert("req_per_s".into(), serde_json::json!(ok as f64 / elapsed));
    o.insert("output_tok_per_s".into(), serde_json::json!(tokens as f64 / elapsed));
    o.insert("ttft_p50_ms".into(), ms(pct(&mut ttft, 0.5)));
    o.insert("ttft_p90_ms".into(), ms(pct(&mut ttft, 0.9)));
    o.insert("ttft_p99_ms".into(), ms(pct(&mut ttft, 0.99)));
    o.insert("itl_p50_ms".into(), ms(pct(&mut itl, 0.5)));
    o.insert("itl_p99_ms".into(), ms(pct(&mut itl, 0.99)));
    o.insert("e2e_p99_ms".into(), ms(pct(&mut e2e, 0.99)));
    o.insert("send_lag_p99_ms".into(), ms(pct(&mut lag, 0.99)));
    let hit = match (before, after) {
        (Some((h0, q0)), Some((h1, q1))) if q1 > q0 => serde_json::json!((h1 - h0) / (q1 - q0)),
        _ => serde_json::Value::Null,
    };
    o.insert("engine_hit_rate".into(), hit);
    println!("{out}");
}
