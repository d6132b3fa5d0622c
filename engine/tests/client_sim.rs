//! `EngineClient` against an in-process `flotilla sim` on a free port (and against sockets
//! that refuse or never answer): health, load while a request is in flight, models, LoRA
//! load/unload with vLLM's error statuses, transport failures; and the standardization of
//! the sim's own `/metrics` rendering.

use std::net::SocketAddr;
use std::time::Duration;

use flotilla_engine::{adapters, EngineClient, EngineClientConfig, EngineError, EngineFlavor, EngineMetrics};
use flotilla_sim::{SimArgs, SimHandle};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

const MODEL: &str = "demo";

async fn sim(args: SimArgs) -> SimHandle {
    flotilla_sim::start(SimArgs { port: 0, model: MODEL.into(), ..args }).await.expect("sim starts")
}

fn endpoint(s: &SimHandle) -> String {
    s.local_addr().to_string()
}

/// Starts a completion of `max_tokens` tokens and leaves it running (the socket is held
/// by the returned task until the sim stops).
fn long_completion(addr: SocketAddr, max_tokens: u32) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let body = serde_json::json!({"model": MODEL, "prompt": "tell a long story", "max_tokens": max_tokens, "ignore_eos": true})
            .to_string();
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let head = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.expect("write head");
        s.write_all(body.as_bytes()).await.expect("write body");
        let mut buf = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf).await;
    })
}

#[tokio::test]
async fn health_metrics_and_models_of_a_sim() {
    let s = sim(SimArgs { speedup: 1.0, ..SimArgs::default() }).await;
    let c = EngineClient::new();
    let ep = endpoint(&s);
    assert!(c.health(&ep).await);

    let idle = c.metrics(&ep).await.expect("metrics");
    assert_eq!(idle.flavor, EngineFlavor::Vllm);
    assert_eq!((idle.running, idle.waiting), (0.0, 0.0));

    let req = long_completion(s.local_addr(), 4000);
    let deadline = Instant::now() + Duration::from_secs(10);
    let busy = loop {
        let m = c.metrics(&ep).await.expect("metrics");
        if m.running > 0.0 {
            break m;
        }
        assert!(Instant::now() < deadline, "running never rose above 0: {m:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(busy.running, 1.0);
    assert!(busy.kv_cache_usage > 0.0 && busy.kv_cache_usage <= 1.0, "{busy:?}");
    assert_eq!(busy.lora.as_ref().and_then(|l| l.max_lora), Some(1), "{busy:?}");

    let cards = c.models(&ep).await.expect("models");
    assert_eq!(cards.len(), 1);
    assert_eq!((cards[0].id.as_str(), cards[0].parent.as_deref()), (MODEL, None));
    assert_eq!(cards[0].max_model_len, Some(8192));
    s.shutdown().await.expect("sim stops");
    req.abort();
}

#[tokio::test]
async fn lora_load_unload_and_vllm_error_statuses() {
    let s = sim(SimArgs::default()).await;
    let c = EngineClient::new();
    let ep = endpoint(&s);

    c.load_lora(&ep, "sql", "sim://sql").await.expect("first load");
    let cards = c.models(&ep).await.expect("models");
    assert_eq!(adapters(&cards), ["sql"]);
    let card = cards.iter().find(|m| m.id == "sql").expect("adapter listed");
    assert_eq!((card.parent.as_deref(), card.root.as_deref()), (Some(MODEL), Some("sim://sql")));

    let twice = c.load_lora(&ep, "sql", "sim://sql").await.expect_err("second load");
    assert_eq!(twice.status(), Some(400), "{twice}");
    assert!(!twice.is_transport());
    assert!(twice.engine_message().is_some_and(|m| m.contains("already been loaded")), "{twice}");

    let missing = c.load_lora(&ep, "ghost", "/no/such/adapter").await.expect_err("bad path");
    assert_eq!(missing.status(), Some(404), "{missing}");
    assert!(missing.engine_message().is_some_and(|m| m.contains("/no/such/adapter")), "{missing}");

    c.unload_lora(&ep, "sql").await.expect("unload");
    assert!(adapters(&c.models(&ep).await.expect("models")).is_empty());
    let unknown = c.unload_lora(&ep, "sql").await.expect_err("unload twice");
    assert_eq!(unknown.status(), Some(404), "{unknown}");
    s.shutdown().await.expect("sim stops");

    let off = sim(SimArgs { disable_lora: true, ..SimArgs::default() }).await;
    let e = c.load_lora(&endpoint(&off), "sql", "sim://sql").await.expect_err("lora disabled");
    assert_eq!(e.status(), Some(500), "{e}");
    assert_eq!(e.code(), "engine.http_status");
    off.shutdown().await.expect("sim stops");
}

#[tokio::test]
async fn a_keyed_client_passes_a_keyed_engine_and_probes_need_no_key() {
    let key = "9c1d5e7a0b3f4c2d8e6a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e";
    let s = sim(SimArgs { api_key: Some(key.into()), ..SimArgs::default() }).await;
    let ep = endpoint(&s);
    let plain = EngineClient::new();
    assert!(plain.health(&ep).await, "/health is not guarded");
    assert!(plain.metrics(&ep).await.expect("/metrics is not guarded").is_known());
    let e = plain.models(&ep).await.expect_err("/v1/models without the key");
    assert_eq!(e.status(), Some(401), "{e}");
    let wrong = plain.with_key(flotilla_engine::EngineKey::new("not-the-key"));
    assert_eq!(wrong.load_lora(&ep, "sql", "sim://sql").await.expect_err("wrong key").status(), Some(401));

    let c = plain.with_key(flotilla_engine::EngineKey::new(key));
    c.load_lora(&ep, "sql", "sim://sql").await.expect("load with the key");
    assert_eq!(adapters(&c.models(&ep).await.expect("models with the key")), ["sql"]);
    c.unload_lora(&ep, "sql").await.expect("unload with the key");
    assert!(c.health(&ep).await && c.metrics(&ep).await.is_ok());
    assert!(!format!("{c:?}").contains(key), "the client's Debug hides the key");
    s.shutdown().await.expect("sim stops");
}

#[tokio::test]
async fn a_dead_endpoint_is_a_quick_transport_error() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr").port()
    };
    let ep = format!("127.0.0.1:{port}");
    let c = EngineClient::new();
    let started = Instant::now();
    let e = c.metrics(&ep).await.expect_err("refused");
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
    assert!(matches!(e, EngineError::Unreachable { .. }), "{e}");
    assert!(e.is_transport());
    assert!(!c.health(&ep).await);
    let e = c.load_lora(&ep, "a", "sim://a").await.expect_err("refused");
    assert_eq!(e.code(), "engine.unreachable");
}

#[tokio::test]
async fn a_silent_endpoint_times_out_and_big_bodies_are_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let ep = listener.local_addr().expect("addr").to_string();
    // Accepts connections and never answers.
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let cfg = EngineClientConfig { timeout: Duration::from_millis(200), ..EngineClientConfig::default() };
    let c = EngineClient::with_config(cfg);
    let started = Instant::now();
    let e = c.models(&ep).await.expect_err("silent");
    assert!(matches!(e, EngineError::Timeout { after, .. } if after == Duration::from_millis(200)), "{e}");
    assert!(e.is_transport());
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(!c.health(&ep).await);
    hold.abort();

    let s = sim(SimArgs::default()).await;
    let small = EngineClient::with_config(EngineClientConfig { max_body_bytes: 1024, ..EngineClientConfig::default() });
    let e = small.metrics(&endpoint(&s)).await.expect_err("metrics page is larger than 1 KiB");
    assert_eq!(e.code(), "engine.body_too_large", "{e}");
    assert!(small.health(&endpoint(&s)).await, "an empty body is within any cap");
    s.shutdown().await.expect("sim stops");
}

#[test]
fn the_sims_metrics_page_standardizes() {
    let mut m = flotilla_sim::metrics::Metrics::new("demo \"x\", y", 8192, Some(2));
    m.running = 3;
    m.waiting = 2;
    m.kv_usage = 0.5;
    m.prefix_queries = 100;
    m.prefix_hits = 25;
    m.preemptions = 1;
    m.prompt_tokens = 120;
    m.generation_tokens = 64;
    m.success = [1, 2, 0, 0, 0];
    m.lora = Some((2, "a,b".into(), "c".into()));
    let got = EngineMetrics::parse(&m.render(1.7e9));
    assert_eq!(
        got,
        EngineMetrics {
            flavor: EngineFlavor::Vllm,
            running: 3.0,
            waiting: 2.0,
            kv_cache_usage: 0.5,
            prompt_tokens: 120.0,
            generation_tokens: 64.0,
            prefix_cache_queries: 100.0,
            prefix_cache_hits: 25.0,
            preemptions: 1.0,
            requests_finished: 3.0,
            lora: Some(flotilla_engine::LoraInfo {
                max_lora: Some(2),
                running: vec!["a".into(), "b".into()],
                waiting: vec!["c".into()],
            }),
        }
    );
}
