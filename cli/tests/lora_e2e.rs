//! High-density LoRA end to end, real processes on loopback: 3 servers, 2 agents running
//! sim engines, and a gateway. Twenty adapters on two base replicas with 16 slots between
//! them are served through the gateway on demand (evicting the least recently used and
//! reloading them, with no failed request), a deleted adapter is unloaded, and a pinned
//! adapter whose node dies is loaded elsewhere while requests keep succeeding.
mod common;

use std::time::Duration;

use tokio::time::Instant;

use common::*;
use flotilla_api::pb::object_service_client::ObjectServiceClient;
use flotilla_api::pb::DeleteRequest;

const BASE_ARGS: &str = "[--max-loras, '4', --max-cpu-loras, '8']";

fn base_manifest(replicas: u32) -> String {
    format!(
        "kind: Model\nmetadata: {{name: base, labels: {{flotilla.io/placement: spread}}}}\nspec: {{engine: sim, source: 'file:///models/base', replicas: {replicas}, gpus: 1, engine_args: {BASE_ARGS}}}\n"
    )
}

/// One HTTP request; (status code, body).
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    match raw_http::send_blocking(addr, method, path, body, Duration::from_secs(60)) {
        Some(out) => (raw_http::status_code(&out).unwrap_or(0), raw_http::body_of(&out).to_owned()),
        None => (0, String::new()),
    }
}

fn complete(gateway: &str, model: &str) -> (u16, String) {
    let body = format!(r#"{{"model":"{model}","prompt":"hello there","max_tokens":4}}"#);
    http(gateway, "POST", "/v1/completions", &body)
}

/// The fleet (3 servers, 2 agents) and a gateway in front of it.
struct Setup {
    fleet: Fleet,
    gateway: GatewayProc,
}

impl Setup {
    async fn start(gpus_per_agent: u32) -> Setup {
        let fleet = Fleet::start(2, gpus_per_agent).await;
        let gateway = GatewayProc::start(&fleet.addrs.join(","), &[]);
        Setup { fleet, gateway }
    }
}

/// Sends requests for `model` until one succeeds (the gateway's table may not have the base
/// model yet); panics after `secs`.
async fn first_success(gateway: &str, model: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (code, body) = complete(gateway, model);
        if code == 200 {
            return;
        }
        assert!(Instant::now() < deadline, "no answer for {model}: {code} {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_adapters_on_two_replicas_load_on_demand_evict_and_unload() {
    let setup = Setup::start(1).await;
    let (s, gw) = (&setup.fleet.addrs, setup.gateway.addr.clone());
    apply(s, base_manifest(2)).await;
    wait_replicas(s, "base", 60, "2 ready base replicas", |r| r.len() == 2 && ready(r) == 2).await;
    let names: Vec<String> = (0..20).map(|i| format!("lora-{i:02}")).collect();
    for n in &names {
        apply(s, adapter_manifest(n, "on-demand")).await;
    }
    first_success(&gw, "base", 30).await;
    // Every adapter answers through the gateway; the first requests find nothing loaded.
    for round in 0..2 {
        for n in &names {
            let gw = gw.clone();
            let n2 = n.clone();
            let (code, body) = tokio::task::spawn_blocking(move || complete(&gw, &n2)).await.unwrap();
            assert_eq!(code, 200, "round {round}, adapter {n}: {body}");
            assert!(body.contains(&format!("\"model\":\"{n}\"")), "{body}");
        }
        // Never more adapters on a replica than its --max-cpu-loras.
        let b = bindings(s).await;
        assert!(b.values().all(|v| v.len() <= 8), "over the slots: {b:?}");
    }
    let b = bindings(s).await;
    assert_eq!(b.values().map(Vec::len).sum::<usize>(), 16, "20 adapters fill all 16 slots: {b:?}");
    // `/v1/models` on the gateway lists adapters with their base model.
    let (code, models) = http(&gw, "GET", "/v1/models", "");
    assert_eq!(code, 200);
    let models: serde_json::Value = serde_json::from_str(&models).unwrap();
    let listed = models["data"].as_array().unwrap();
    assert!(listed.iter().any(|m| m["id"] == "lora-00" && m["parent"] == "base"), "{models}");

    // Deleting a loaded adapter unloads it from its engine.
    let loaded = b.values().flatten().next().unwrap().clone();
    let (holder_endpoint, holder_key) = {
        let r = replicas(s, "base").await;
        let holder = b.iter().find(|(_, v)| v.contains(&loaded)).unwrap().0.clone();
        let key = engine_keys(s).await.remove(&holder).unwrap_or_default();
        (r.into_iter().find(|x| x.name == holder).unwrap().endpoint.unwrap(), key)
    };
    let mut c = ObjectServiceClient::new(channel(&s[0], Duration::from_secs(5)));
    c.delete(DeleteRequest { kind: "adapter".into(), name: loaded.clone(), expected_revision: None }).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = engine_call(&holder_endpoint, "GET", "/v1/models", "", &holder_key);
        assert!(code == 200 || code == 0, "the engine's own /v1/models, with its key: {code} {body}");
        if !body.is_empty() && !body.contains(&format!("\"{loaded}\"")) {
            break;
        }
        assert!(Instant::now() < deadline, "{loaded} still loaded on {holder_endpoint}: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!bindings(s).await.values().flatten().any(|n| n == &loaded));
    let (code, _) = complete(&gw, &loaded);
    assert_eq!(code, 404, "a deleted adapter is an unknown model");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_adapter_moves_when_its_node_dies_and_requests_keep_succeeding() {
    let mut setup = Setup::start(2).await;
    let (s, gw) = (setup.fleet.addrs.clone(), setup.gateway.addr.clone());
    apply(&s, base_manifest(2)).await;
    let r = wait_replicas(&s, "base", 60, "2 ready base replicas", |r| r.len() == 2 && ready(r) == 2).await;
    assert_ne!(r[0].node, r[1].node, "one replica per node (spread by free GPUs)");
    apply(&s, adapter_manifest("pinned", "1")).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while adapter_status(&s, "pinned").await["phase"] != "Ready" {
        assert!(Instant::now() < deadline, "pinned never Ready: {}", adapter_status(&s, "pinned").await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    first_success(&gw, "pinned", 30).await;
    let b = bindings(&s).await;
    let holder = b.iter().find(|(_, v)| v.contains(&"pinned".to_string())).unwrap().0.clone();
    let holder = r.iter().find(|x| x.name == holder).unwrap().clone();
    let node = holder.node.clone().unwrap();
    // The node dies: its agent and its engine.
    let agent = setup.fleet.agents.iter_mut().find(|a| a.name == node).unwrap();
    agent.kill();
    let port = holder.endpoint.as_deref().unwrap().rsplit(':').next().unwrap().to_owned();
    for pid in engine_pids(setup.fleet.marker) {
        let cmdline = flotilla_testkit::proc_fs::cmdline(pid).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&format!("--port\0{port}\0")) {
            flotilla_testkit::procs::signal(pid, Signal::KILL);
        }
    }
    // Requests keep succeeding (the gateway waits for the load elsewhere), and the adapter
    // ends up loaded on the other replica.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ok = 0;
    loop {
        let gw2 = gw.clone();
        let (code, body) = tokio::task::spawn_blocking(move || complete(&gw2, "pinned")).await.unwrap();
        assert_eq!(code, 200, "request {ok} after the node died: {body}");
        ok += 1;
        let st = adapter_status(&s, "pinned").await;
        let on_other = st["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|x| x["state"] == "Loaded" && x["node"] != node.as_str());
        if on_other && ok >= 5 {
            break;
        }
        assert!(Instant::now() < deadline, "pinned not moved off {node}: {st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
