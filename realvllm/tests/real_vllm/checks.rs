//! The checks, in the order they run. Two vLLM servers at most: `S`, a standalone
//! `vllm serve` this file starts, and `V`, the engine the agent starts for the `tiny` Model
//! (after S stops, the rollout check runs V and its replacement).

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{ensure, Context as _};
use serde_json::json;

use flotilla_testkit::http;
use flotilla_testkit::ports::free_port;
use flotilla_testkit::proc_fs::{self, args as cmdline, find_process, group_members};
use flotilla_testkit::procs::{log_tail, signal, Signal};
use flotilla_testkit::python::python;

use crate::procs;
use crate::{cluster, Tier};

const START_TIMEOUT: Duration = Duration::from_secs(240);

pub async fn run(mut t: Tier) -> Tier {
    let dir = t.dir.path().to_path_buf();
    let install = t.install.clone();
    let bin = t.bin.clone();
    let adapter = install.adapter();
    let agent_dir = dir.join("agent");

    let s_port = free_port().expect("a free port");
    let s = format!("127.0.0.1:{s_port}");
    let s_started = Instant::now();
    let mut vllm = procs::start_vllm(&install, s_port, &dir.join("vllm.log"));
    let (mut server, grpc) = procs::start_server(&bin, &dir);
    let mut agent = procs::start_agent(&bin, &install, &grpc, &dir, &["--kv-events"]);
    let manifest = dir.join("tiny.yaml");
    std::fs::write(&manifest, cluster::model_manifest(&install)).expect("write manifest");
    let applied = Instant::now();
    let apply = cluster::cli(&bin, &grpc, &["apply", "-f", &manifest.display().to_string()], None);

    let s_ready = t
        .setup("standalone_vllm_becomes_healthy", || async {
            http::wait_healthy(&s, START_TIMEOUT)
                .await
                .with_context(|| format!("vllm serve log:\n{}", log_tail(&dir.join("vllm.log"), 30)))?;
            Ok(())
        })
        .await;
    if s_ready {
        t.timing("standalone vllm serve: spawn to /health 200", format!("{:.1} s", s_started.elapsed().as_secs_f64()));
    }

    t.check("engine_client_reads_real_vllm", || engine_client(&s, &adapter)).await;
    t.check("sim_conforms_to_real_vllm", || crate::conformance::sim_matches_real(&s, &adapter)).await;
    t.check("stream_chunk_timing_matches_real_vllm", || crate::conformance::stream_timing_matches_real(&s)).await;
    t.check("gateway_serves_real_vllm_to_the_openai_sdk", || openai_sdk(&s)).await;
    t.check("gateway_tokenizer_matches_real_vllm_tokenize", || {
        crate::hf_tokenizer::matches_live_tokenize(&s, &install)
    })
    .await;
    let mut bench = String::new();
    if t.check("vllm_bench_serve_through_the_gateway_to_the_sim", || async {
        bench = crate::bench_serve::to_the_sim(&install, &bin, &dir).await?;
        Ok(())
    })
    .await
    {
        t.timing("vllm bench serve via the gateway, sim a100 (200 in, 16 out, 1 at a time)", bench.clone());
    }
    if t.check("vllm_bench_serve_through_the_gateway_to_real_vllm", || async {
        bench = crate::bench_serve::to_real_vllm(&install, &dir, &s).await?;
        Ok(())
    })
    .await
    {
        t.timing("vllm bench serve via the gateway, real vLLM (64 in, 8 out, 1 at a time)", bench);
    }

    // V: the agent downloads (links) the model into its cache and starts vLLM.
    let mut v = String::new();
    let v_ready = t
        .setup("agent_starts_vllm_from_a_file_source", || async {
            apply?;
            let r = cluster::wait_replicas(&grpc, "tiny", START_TIMEOUT, "the tiny replica Ready", |r| {
                r.len() == 1 && r[0].phase == "Ready"
            })
            .await
            .with_context(|| format!("agent log:\n{}", log_tail(&dir.join("agent.log"), 30)))?;
            v = r[0].endpoint.clone().context("a Ready replica has an endpoint")?;
            let port = v.rsplit(':').next().unwrap_or_default().to_string();
            let pid = find_process(&["serve", "--port", &port]).context("the engine process")?;
            let args = cmdline(pid);
            let cache = dir.join("agent");
            ensure!(
                args.iter().any(|a| Path::new(a).starts_with(&cache)),
                "the engine was not given a path in the node cache {}: {args:?}",
                cache.display()
            );
            Ok(())
        })
        .await;
    if v_ready {
        t.timing("vllm through the agent: apply to replica Ready", format!("{:.1} s", applied.elapsed().as_secs_f64()));
    }

    t.check("direct_request_to_the_agents_engine_needs_its_key", || {
        crate::engine_key::direct_request_needs_the_engine_key(&grpc, &v)
    })
    .await;
    t.check("agent_reports_the_real_engines_load", || agent_reports_load(&grpc, &v)).await;
    t.check("routing_decisions_use_real_engine_numbers", || routing_from_real_numbers(&grpc, &s, &v)).await;
    let mut kv = String::new();
    if t.check("kv_aware_routes_a_repeated_prompt_to_the_real_engine_holding_it", || async {
        kv = crate::kv_aware::repeated_prompt_goes_to_its_holder(&grpc, &s, &v, &install).await?;
        Ok(())
    })
    .await
    {
        t.timing("kv-aware on real vLLM (S and the agent's V)", kv);
    }

    // On S: the agent's engine V belongs to the control plane, whose agent unloads any
    // adapter no `Adapter` object assigns (adapter objects on V are the next check).
    t.check("lora_loaded_by_hand_is_routed_to_by_a_static_gateway", || lora_through_gateway(&s, &adapter)).await;

    let mut lora_timing = String::new();
    let ok = t
        .check("adapter_objects_load_evict_reload_and_delete_on_real_vllm", || async {
            lora_timing = crate::adapters::adapter_objects(&bin, &grpc, &v, &adapter, &dir).await?;
            Ok(())
        })
        .await;
    if ok {
        t.timing("adapters on real vllm", lora_timing);
    }

    let t0 = Instant::now();
    if t.check("agent_restarts_vllm_after_sigkill", || agent_restarts_after_kill(&grpc, &v)).await {
        t.timing("vllm through the agent: SIGKILL to Ready again", format!("{:.1} s", t0.elapsed().as_secs_f64()));
    }

    t.check("standalone_vllm_stops_on_sigterm_leaving_no_process", || async {
        let pgid = vllm.pid();
        let took = vllm.stop(Duration::from_secs(20));
        group_gone(pgid).await?;
        ensure!(took < Duration::from_secs(20), "ignored SIGTERM for {took:?}");
        Ok(())
    })
    .await;

    // With S gone, a rollout may run two agent engines at once (the old and the new).
    let mut rolled = String::new();
    if t.check("engine_argument_change_rolls_on_real_vllm_without_a_failed_request", || async {
        rolled =
            crate::rollout::engine_argument_change_rolls_without_a_failed_request(&bin, &grpc, &install, &dir).await?;
        Ok(())
    })
    .await
    {
        t.timing("rolling update on real vllm (surge 1)", rolled);
    }

    t.check("agent_stops_vllm_with_its_whole_process_tree", || agent_stops_cleanly(&bin, &grpc, &agent_dir)).await;

    // The agent again, with --engine-tls on: its engine V' serves TLS with a pinned certificate.
    t.check("agents_vllm_serves_tls_through_the_gateway", || async {
        agent.stop(Duration::from_secs(10));
        agent = procs::start_agent(&bin, &install, &grpc, &dir, &["--engine-tls", "on"]);
        crate::engine_tls::agents_vllm_serves_tls(&bin, &grpc, &manifest, &agent_dir, START_TIMEOUT).await
    })
    .await;
    agent.stop(Duration::from_secs(10));

    // P/D: two more engines with the NixlConnector behind `flotilla gateway --pd`, alone
    // (S is gone already unless its stop check was filtered out).
    vllm.stop(Duration::from_secs(20));
    let pd_check = "disaggregated_requests_through_the_gateway_pull_every_prompt_on_real_vllm";
    let nixl_missing = crate::pd::nixl_missing(&install);
    match nixl_missing {
        Some(why) if !crate::required() => println!("test {pd_check} ... SKIPPED: {why}"),
        _ => {
            let mut pd = String::new();
            if t.check(pd_check, || async {
                if let Some(why) = nixl_missing {
                    anyhow::bail!(why);
                }
                pd = crate::pd::requests_through_the_gateway_pull_their_prompt(&install, &bin, &dir, START_TIMEOUT)
                    .await?;
                Ok(())
            })
            .await
            {
                t.timing("P/D on real vLLM (NixlConnector, CPU)", pd);
            }
        }
    }

    // Opt-in (FLOTILLA_REAL_VLLM_GANG=1): a two-rank gang through two more agents, alone.
    if crate::gang::enabled() {
        let mut gang = String::new();
        if t.check("a_two_rank_vllm_gang_serves_and_is_placed_again_after_a_lost_rank", || async {
            gang = crate::gang::two_ranks_serve_and_restart_as_one(&bin, &grpc, &install, &dir).await?;
            Ok(())
        })
        .await
        {
            t.timing("two-rank tp-pp vLLM gang through two agents", gang);
        }
    }
    server.stop(Duration::from_secs(5));
    t
}

/// Waits (at most 10 s) until the process group `pgid` has no live member: its leader is
/// reaped when `stop` returns, but workers SIGKILLed with the group may take a moment to
/// leave /proc (a check without the wait failed with "left behind: []").
pub async fn group_gone(pgid: u32) -> anyhow::Result<()> {
    let t = Instant::now();
    while !group_members(pgid).is_empty() && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(group_members(pgid).is_empty(), "left behind: {:?}", group_members(pgid));
    Ok(())
}

/// Starts an in-process gateway with static backends `tiny=http://<addr>`.
pub async fn gateway(backends: &[&str]) -> anyhow::Result<flotilla_gateway::GatewayHandle> {
    gateway_with_key(backends, None).await
}

/// [`gateway`] whose static backends get `key` (`FLOTILLA_BACKEND_API_KEY`).
pub async fn gateway_with_key(
    backends: &[&str],
    key: Option<String>,
) -> anyhow::Result<flotilla_gateway::GatewayHandle> {
    gateway_with(backends, key, |_| {}).await
}

/// [`gateway_with_key`] with more settings.
pub async fn gateway_with(
    backends: &[&str],
    key: Option<String>,
    more: impl FnOnce(&mut flotilla_gateway::GatewayArgs),
) -> anyhow::Result<flotilla_gateway::GatewayHandle> {
    let mut args = flotilla_gateway::GatewayArgs {
        backend_api_key: key,
        listen: "127.0.0.1:0".into(),
        backends: backends.iter().map(|b| format!("tiny=http://{b}")).collect(),
        no_auth: true,
        scrape_interval_ms: 200,
        ..flotilla_gateway::GatewayArgs::default()
    };
    more(&mut args);
    flotilla_gateway::start(args).await.map_err(|e| anyhow::anyhow!("gateway: {e}"))
}

/// The same `openai` SDK script the sim-backed gateway test runs, against real vLLM.
async fn openai_sdk(s: &str) -> anyhow::Result<()> {
    let gw = gateway(&[s]).await?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway/tests/openai_sdk.py");
    let base = format!("http://{}", gw.local_addr());
    let py = python();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&py).arg(script).env("GW_BASE_URL", base).env("GW_MODEL", "tiny").output()
    })
    .await?
    .context("run the openai SDK script (bash .ci/sim-deps.sh makes the venv)")?;
    gw.shutdown().await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && stdout.contains("all openai sdk checks passed"),
        "openai SDK checks failed\n--- stdout\n{stdout}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

async fn finish(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(60), t).await;
    }
}

/// The engine client (the code the agent and the gateway use) on real vLLM: health,
/// standardized metrics, models, LoRA load/unload and vLLM's error answers.
async fn engine_client(s: &str, adapter: &Path) -> anyhow::Result<()> {
    use flotilla_engine::{EngineClient, EngineFlavor};
    let c = EngineClient::new();
    ensure!(c.health(s).await, "/health");
    ensure!(!c.health("127.0.0.1:1").await, "a dead endpoint is not healthy");
    let m = c.metrics(s).await?;
    ensure!(m.flavor == EngineFlavor::Vllm && m.is_known(), "not recognised as vLLM: {m:?}");
    let before = m.generation_tokens;
    let body = json!({"model": "tiny", "prompt": "count", "max_tokens": 5, "ignore_eos": true});
    ensure!(http::post(s, "/v1/completions", body).await?.status == 200);
    let m = c.metrics(s).await?;
    ensure!(m.generation_tokens >= before + 5.0, "generation tokens {before} -> {}", m.generation_tokens);
    ensure!(m.requests_finished >= 1.0 && m.prompt_tokens >= 1.0, "{m:?}");
    ensure!(m.lora.as_ref().and_then(|l| l.max_lora) == Some(2), "LoRA info (--max-loras 2): {:?}", m.lora);

    let models = c.models(s).await?;
    let base = models.iter().find(|m| m.id == "tiny").context("tiny in /v1/models")?;
    ensure!(base.parent.is_none() && base.max_model_len == Some(512), "{base:?}");
    let path = adapter.display().to_string();
    c.load_lora(s, "ad1", &path).await.context("load ad1")?;
    let twice = c.load_lora(s, "ad1", &path).await.expect_err("a second load of the same name fails");
    ensure!(twice.status() == Some(400) && twice.engine_message().is_some_and(|m| m.contains("ad1")), "{twice}");
    let bad = c.load_lora(s, "ad2", "/definitely/not/here").await.expect_err("a bad path fails");
    ensure!(bad.status() == Some(404), "{bad}");
    let models = c.models(s).await?;
    let ad = models.iter().find(|m| m.id == "ad1").context("ad1 listed after load")?;
    ensure!(ad.parent.as_deref() == Some("tiny") && ad.is_adapter(), "{ad:?}");
    ensure!(!models.iter().any(|m| m.id == "ad2"), "a failed load is not listed");
    c.unload_lora(s, "ad1").await.context("unload ad1")?;
    ensure!(!c.models(s).await?.iter().any(|m| m.id == "ad1"), "ad1 still listed after unload");
    let again = c.unload_lora(s, "ad1").await.expect_err("unloading an unloaded adapter fails");
    ensure!(matches!(again.status(), Some(400..=404)), "{again}");
    Ok(())
}

/// LoRA loaded by hand through the engine client; a static gateway (which reads each
/// engine's `/v1/models`) routes the adapter's name there; after unload it answers 404.
async fn lora_through_gateway(v: &str, adapter: &Path) -> anyhow::Result<()> {
    let c = flotilla_engine::EngineClient::new();
    c.load_lora(v, "tiny-lora", &adapter.display().to_string()).await.context("load tiny-lora")?;
    let gw = gateway(&[v]).await?;
    let addr = gw.local_addr().to_string();
    let body = json!({"model": "tiny-lora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    let t0 = tokio::time::Instant::now();
    let r = loop {
        let r = http::post(&addr, "/v1/chat/completions", body.clone()).await?;
        if r.status == 200 || t0.elapsed() > Duration::from_secs(5) {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(r.status == 200, "adapter request through the gateway: {} {}", r.status, r.text());
    ensure!(r.json()?["model"] == "tiny-lora", "{}", r.text());
    // vLLM's tokenizer endpoints through the gateway, for the adapter and its base model
    let tok = |model: &str| json!({"model": model, "prompt": "def fib(n): return n"});
    let base = http::post(&addr, "/tokenize", tok("tiny")).await?;
    let lora = http::post(&addr, "/tokenize", tok("tiny-lora")).await?;
    ensure!(
        base.status == 200 && lora.status == 200,
        "/tokenize: {} {}; {} {}",
        base.status,
        base.text(),
        lora.status,
        lora.text()
    );
    ensure!(base.json()?["tokens"] == lora.json()?["tokens"], "the adapter shares its base model's tokenizer");
    let ids = base.json()?["tokens"].clone();
    let d = http::post(&addr, "/detokenize", json!({"model": "tiny-lora", "tokens": ids})).await?;
    // (vLLM's /tokenize adds the BOS token unless `add_special_tokens: false`)
    let text = d.json()?["prompt"].as_str().unwrap_or_default().to_string();
    ensure!(d.status == 200 && text.ends_with("def fib(n): return n"), "/detokenize: {} {}", d.status, d.text());
    c.unload_lora(v, "tiny-lora").await.context("unload tiny-lora")?;
    let direct = http::post(v, "/v1/chat/completions", body.clone()).await?;
    ensure!(direct.status == 404, "the engine still serves an unloaded adapter: {}", direct.status);
    gw.shutdown().await;
    Ok(())
}

/// `n` workers that keep one long completion each in flight on `addr` until `stop` is set
/// (or 60 s pass).
fn sustained_load(addr: &str, key: Option<&str>, n: usize, stop: &Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|i| {
            let (addr, stop) = (addr.to_string(), stop.clone());
            let auth = key.map(|k| format!("Bearer {k}"));
            tokio::spawn(async move {
                let t0 = tokio::time::Instant::now();
                while !stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(60) {
                    // Lengths differ per worker so they never all finish (and leave the
                    // engine idle for a scrape) at the same moment.
                    let max_tokens = 250 + 29 * i;
                    let body = json!({"model": "tiny", "prompt": format!("busy {i}: def f("), "max_tokens": max_tokens,
                                      "ignore_eos": true});
                    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
                    if http::send("POST", &addr, "/v1/completions", Some(&body), &headers).await.is_err() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            })
        })
        .collect()
}

/// The agent scrapes the engine and reports its load; the leader streams it to gateways
/// (on every change of the set, and every `endpoints_refresh_ms`, 2 s, with fresh figures).
async fn agent_reports_load(grpc: &str, v: &str) -> anyhow::Result<()> {
    ensure!(!v.is_empty(), "no agent-run engine");
    let stop = Arc::new(AtomicBool::new(false));
    let key = crate::engine_key::engine_key(grpc, v).await?;
    let busy = sustained_load(v, Some(&key), 4, &stop);
    let mut stream = cluster::watch_endpoints(grpc).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let result = loop {
        let next = tokio::time::timeout_at(deadline, stream.message()).await;
        let Ok(Ok(Some(set))) = next else {
            break Err(anyhow::anyhow!("no endpoint report with running requests in 20 s; saw {seen:?}"));
        };
        if let Some(e) = set.endpoints.iter().find(|e| e.address.ends_with(v)) {
            seen.push((e.num_requests_running, e.num_requests_waiting, e.kv_cache_usage));
            if e.num_requests_running + e.num_requests_waiting >= 1.0 && e.kv_cache_usage > 0.0 {
                println!(
                    "  agent report for {v}: running {} waiting {} kv_cache_usage {:.5}",
                    e.num_requests_running, e.num_requests_waiting, e.kv_cache_usage
                );
                break Ok(());
            }
        }
    };
    stop.store(true, Ordering::Relaxed);
    finish(busy).await;
    result
}

/// The engine's running+waiting requests and KV usage, from its own `/metrics`.
async fn engine_load(addr: &str) -> anyhow::Result<flotilla_engine::EngineMetrics> {
    flotilla_engine::EngineClient::new().metrics(addr).await.map_err(|e| anyhow::anyhow!("scrape {addr}: {e}"))
}

/// With S busy (loaded directly, not through the gateway, so the gateway's own in-flight
/// counts are zero for both), least-request and least-kv-cache must pick V: the only
/// difference the gateway can see is the engines' scraped numbers.
async fn routing_from_real_numbers(grpc: &str, s: &str, v: &str) -> anyhow::Result<()> {
    ensure!(!v.is_empty(), "no agent-run engine");
    // V is the agent's engine, started with a key of its own: the static gateway sends it
    // (S has none and ignores it)
    let key = crate::engine_key::engine_key(grpc, v).await?;
    let gw = gateway_with_key(&[s, v], Some(key)).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let busy = sustained_load(s, None, 6, &stop);
    let t0 = tokio::time::Instant::now();
    loop {
        let m = engine_load(s).await?;
        if m.running + m.waiting >= 3.0 && m.kv_cache_usage > 0.0 {
            println!(
                "  S under load: running {} waiting {} kv_cache_usage {:.5}",
                m.running, m.waiting, m.kv_cache_usage
            );
            break;
        }
        ensure!(t0.elapsed() < Duration::from_secs(20), "S never showed load: {m:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Two scrape intervals: the gateway has read S's numbers.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let idle = engine_load(v).await?;
    println!("  V idle: running {} waiting {} kv_cache_usage {:.5}", idle.running, idle.waiting, idle.kv_cache_usage);
    let mut picks = Vec::new();
    for strategy in ["least-request", "least-kv-cache"] {
        for _ in 0..3 {
            let body = json!({"model": "tiny", "prompt": "pick", "max_tokens": 2});
            let r = http::send(
                "POST",
                &gw.local_addr().to_string(),
                "/v1/completions",
                Some(&body),
                &[("x-flotilla-routing", strategy)],
            )
            .await?;
            ensure!(r.status == 200, "{strategy}: {} {}", r.status, r.text());
            picks.push((strategy, r.header("x-flotilla-endpoint").unwrap_or_default()));
        }
    }
    let still = engine_load(s).await?;
    stop.store(true, Ordering::Relaxed);
    finish(busy).await;
    gw.shutdown().await;
    ensure!(still.running + still.waiting >= 1.0, "S went idle during the test: {still:?}");
    ensure!(picks.iter().all(|(_, e)| e.ends_with(v)), "busy S was picked: {picks:?} (V is {v})");
    Ok(())
}

/// SIGKILL of the engine's main process: the agent kills the leftover workers, restarts
/// it (fresh port), and the replica is Ready again with `restarts` counted.
async fn agent_restarts_after_kill(grpc: &str, v: &str) -> anyhow::Result<()> {
    ensure!(!v.is_empty(), "no agent-run engine");
    let port = v.rsplit(':').next().unwrap_or_default().to_string();
    let pid = find_process(&["serve", "--port", &port]).context("the engine process")?;
    let group_before = group_members(pid);
    ensure!(group_before.len() >= 2, "expected vLLM's engine-core worker in the group: {group_before:?}");
    ensure!(signal(pid, Signal::KILL), "SIGKILL to the engine {pid}");
    let r = cluster::wait_replicas(grpc, "tiny", START_TIMEOUT, "the replica restarted and Ready", |r| {
        r.len() == 1 && r[0].phase == "Ready" && r[0].restarts >= 1
    })
    .await?;
    ensure!(group_members(pid).is_empty(), "workers of the killed engine live on: {:?}", group_members(pid));
    let endpoint = r[0].endpoint.clone().context("endpoint")?;
    let body = json!({"model": "tiny", "prompt": "again", "max_tokens": 3, "ignore_eos": true});
    let key = crate::engine_key::engine_key(grpc, &endpoint).await?;
    let resp = crate::engine_key::post_with_key(&endpoint, "/v1/completions", body, &key).await?;
    ensure!(resp.status == 200, "the restarted engine answered {} {}", resp.status, resp.text());
    Ok(())
}

/// Deleting the Model stops the engine: SIGTERM to its group, nothing left running.
async fn agent_stops_cleanly(bin: &Path, grpc: &str, agent_dir: &Path) -> anyhow::Result<()> {
    let r = cluster::replicas(grpc, "tiny").await?;
    let endpoint = r.first().and_then(|r| r.endpoint.clone()).context("a running replica")?;
    let port = endpoint.rsplit(':').next().unwrap_or_default().to_string();
    let pid = find_process(&["serve", "--port", &port]).context("the engine process")?;
    cluster::cli(bin, grpc, &["delete", "model", "tiny"], None)?;
    let t0 = tokio::time::Instant::now();
    while !group_members(pid).is_empty() {
        ensure!(t0.elapsed() < Duration::from_secs(30), "engine group still alive: {:?}", group_members(pid));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cache = agent_dir.display().to_string();
    let stray: Vec<u32> =
        proc_fs::pids().filter(|p| cmdline(*p).iter().any(|a| a.starts_with(&cache) && a.contains("models"))).collect();
    ensure!(stray.is_empty(), "processes still using the node cache: {stray:?}");
    println!("  engine group {pid} gone {:.1} s after delete", t0.elapsed().as_secs_f64());
    Ok(())
}
