//! Routing quality benchmark (issue 6, benchmark 2): 4 in-process sim engines with a KV
//! cache too small to hold every shared prefix, many users sharing long system prompts
//! (P prefixes of about T tokens), Poisson arrivals at a fixed rate, streaming completions;
//! the same offered load for each router. Reports TTFT p50/p99, throughput and the
//! engines' prefix-cache hit rate. Fresh engines for every target.
//!
//! ```text
//! cargo run --release -p flotilla-gateway --example routing_bench -- \
//!   --targets flotilla:prefix-cache,flotilla:least-request,vllm-router:cache_aware
//! ```
//! External routers come from `$BENCH_VENV/bin/{vllm-router,sglang-router}` (default
//! `/tmp/benchvenv/venv`), started with `--worker-urls` of the same 4 sims and `--policy`;
//! their logs go to `$TMPDIR/{router}.log`. The sims run in their default vLLM-like mode
//! (unknown request fields such as the routers' `no_stop_trim` are ignored; `/tokenize` is
//! served for vllm-router's `cache_aware`). Every target gets the same request sequence
//! (same `--seed`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use flotilla_testkit::ports::free_port;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

#[derive(Parser, Debug)]
struct Args {
    /// `flotilla:STRATEGY`, `vllm-router:POLICY` or `sglang-router:POLICY`, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "flotilla:prefix-cache,flotilla:least-request,flotilla:round-robin"
    )]
    targets: Vec<String>,
    #[arg(long, default_value_t = 20)]
    duration_s: u64,
    /// Offered load, requests per second (Poisson).
    #[arg(long, default_value_t = 40.0)]
    rate: f64,
    #[arg(long, default_value_t = 2.0)]
    speedup: f64,
    /// KV blocks (16 tokens) per engine.
    #[arg(long, default_value_t = 1500)]
    blocks: u32,
    #[arg(long, default_value_t = 20)]
    prefixes: usize,
    #[arg(long, default_value_t = 2000)]
    prefix_tokens: usize,
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// A long English-like text of about `words` words, distinct per `salt`.
fn text(words: usize, salt: u64) -> String {
    flotilla_sim::text::synthetic_prompt(words, salt)
}

fn prefix_of_tokens(tokens: usize, salt: u64) -> String {
    let mut words = tokens / 2;
    loop {
        let t = text(words, salt);
        if flotilla_sim::tokenizer::count(&t) >= tokens {
            return t;
        }
        words += words / 10 + 1;
    }
}

async fn wait_ready(addr: SocketAddr) -> bool {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    for _ in 0..300 {
        let body = serde_json::json!({"model": "demo", "prompt": "ready?", "max_tokens": 1}).to_string();
        let req = http::Request::post(format!("http://{addr}/v1/completions"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), client.request(req)).await {
            if r.status().is_success() {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn prefix_hits(sims: &[flotilla_sim::SimHandle]) -> (f64, f64) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let (mut hits, mut queries) = (0.0, 0.0);
    for s in sims {
        let req = http::Request::get(format!("{}/metrics", s.base_url())).body(Full::new(Bytes::new())).unwrap();
        let body = client.request(req).await.unwrap().into_body().collect().await.unwrap().to_bytes();
        for line in String::from_utf8_lossy(&body).lines() {
            let v = line.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()).unwrap_or(0.0);
            if line.starts_with("vllm:prefix_cache_hits_total") {
                hits += v;
            } else if line.starts_with("vllm:prefix_cache_queries_total") {
                queries += v;
            }
        }
    }
    (hits, queries)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let prefixes: Vec<String> =
        (0..args.prefixes).map(|i| prefix_of_tokens(args.prefix_tokens, 1000 + i as u64)).collect();
    println!(
        "# 4 sims (speedup {}, {} KV blocks = {} tokens each), {} prefixes x {} tokens, {} req/s Poisson for {} s, max_tokens {}",
        args.speedup,
        args.blocks,
        args.blocks * 16,
        args.prefixes,
        args.prefix_tokens,
        args.rate,
        args.duration_s,
        args.max_tokens
    );
    println!(
        "{:<28} {:>6} {:>6} {:>9} {:>9} {:>9} {:>9}",
        "target", "ok", "failed", "req/s", "ttft p50", "ttft p99", "hit rate"
    );
    for target in &args.targets {
        let (kind, strategy) = target.split_once(':').expect("target KIND:STRATEGY");
        let mut sims = Vec::new();
        for _ in 0..4 {
            let a = flotilla_sim::SimArgs {
                port: 0,
                model: "demo".into(),
                speedup: args.speedup,
                num_gpu_blocks: Some(args.blocks),
                max_model_len: 8192,
                ..flotilla_sim::SimArgs::default()
            };
            sims.push(flotilla_sim::start(a).await.expect("sim"));
        }
        let urls: Vec<String> = sims.iter().map(|s| s.base_url()).collect();
        let mut child = None;
        let mut gw = None;
        let (addr, header) = match kind {
            "flotilla" => {
                let g = flotilla_gateway::start(flotilla_gateway::GatewayArgs {
                    listen: "127.0.0.1:0".into(),
                    backends: urls.iter().map(|u| format!("demo={u}")).collect(),
                    no_auth: true,
                    scrape_interval_ms: 250,
                    ..flotilla_gateway::GatewayArgs::default()
                })
                .await
                .expect("gateway");
                let a = g.local_addr();
                gw = Some(g);
                (a, Some(strategy.to_string()))
            }
            router => {
                let venv = std::env::var("BENCH_VENV").unwrap_or_else(|_| "/tmp/benchvenv/venv".into());
                let port = free_port().expect("a free port");
                let mut cmd = std::process::Command::new(format!("{venv}/bin/{router}"));
                if router == "sglang-router" {
                    cmd.arg("launch");
                }
                let level = if router == "sglang-router" { "warn" } else { "warning" };
                cmd.args([
                    "--host",
                    "127.0.0.1",
                    "--port",
                    &port.to_string(),
                    "--policy",
                    strategy,
                    "--log-level",
                    level,
                ])
                .args(["--prometheus-port", &free_port().expect("a free port").to_string(), "--worker-urls"])
                .args(&urls)
                .stdout(std::fs::File::create(std::env::temp_dir().join(format!("{router}.out"))).expect("log file"))
                .stderr(std::fs::File::create(std::env::temp_dir().join(format!("{router}.log"))).expect("log file"));
                child = Some(cmd.spawn().expect("router binary (set BENCH_VENV)"));
                (SocketAddr::from(([127, 0, 0, 1], port)), None)
            }
        };
        if !wait_ready(addr).await {
            println!("{target:<28} never answered a completion (see its log in the temp dir)");
            if let Some(mut c) = child {
                let _ = c.kill();
                let _ = c.wait();
            }
            continue;
        }
        let (h0, q0) = prefix_hits(&sims).await;
        let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).build_http::<Full<Bytes>>();
        let ttfts = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(0u64));
        let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
        let start = Instant::now();
        let end = start + Duration::from_secs(args.duration_s);
        let mut next = start;
        let mut tasks = Vec::new();
        let mut user = 0u64;
        while next < end {
            tokio::time::sleep_until(next).await;
            let gap: f64 = -(1.0 - rng.random::<f64>()).ln() / args.rate;
            next += Duration::from_secs_f64(gap);
            let p = &prefixes[rng.random_range(0..prefixes.len())];
            user += 1;
            let prompt = format!("{p}\nuser {user}: {}", text(30, 1_000_000 + user));
            let body = serde_json::json!({"model": "demo", "prompt": prompt, "max_tokens": args.max_tokens,
                "ignore_eos": true, "stream": true})
            .to_string();
            let mut req =
                http::Request::post(format!("http://{addr}/v1/completions")).header("content-type", "application/json");
            if let Some(h) = &header {
                req = req.header("x-flotilla-routing", h.as_str());
            }
            let req = req.body(Full::new(Bytes::from(body))).unwrap();
            let (client, ttfts, failed) = (client.clone(), ttfts.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                let t = Instant::now();
                let ok = async {
                    let r = client.request(req).await.ok()?;
                    if !r.status().is_success() {
                        return None;
                    }
                    let mut body = r.into_body();
                    let mut first = None;
                    while let Some(f) = body.frame().await {
                        let f = f.ok()?;
                        if f.data_ref().is_some_and(|d| !d.is_empty()) && first.is_none() {
                            first = Some(t.elapsed().as_secs_f64());
                        }
                    }
                    first
                };
                match tokio::time::timeout(Duration::from_secs(120), ok).await {
                    Ok(Some(ttft)) => ttfts.lock().unwrap().push(ttft),
                    _ => *failed.lock().unwrap() += 1,
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let (h1, q1) = prefix_hits(&sims).await;
        let mut v = ttfts.lock().unwrap().clone();
        let ok = v.len();
        let failed = *failed.lock().unwrap();
        println!(
            "{target:<28} {ok:>6} {failed:>6} {:>9.1} {:>8.0}ms {:>8.0}ms {:>8.1}%",
            ok as f64 / elapsed,
            pct(&mut v, 0.5) * 1e3,
            pct(&mut v, 0.99) * 1e3,
            100.0 * (h1 - h0) / (q1 - q0).max(1.0)
        );
        if let Some(mut c) = child {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(g) = gw {
            g.shutdown().await;
        }
        for s in sims {
            let _ = s.shutdown().await;
        }
    }
}
