//! Prefill/decode disaggregation with real processes: a server, an agent with simulated GPUs
//! and a gateway. Applying a Model with `spec.disaggregation` creates its two member Models,
//! whose replicas the agent starts as sims with the NIXL connector (the agent's
//! `--kv-transfer-config` and side channel); requests for the Model's own name go through the
//! gateway's P/D protocol — the decode engine pulls each long prompt from the prefill engine
//! instead of computing it — and the Model's status counts its roles. Deleting the Model
//! takes its members and their engines along; a malformed disaggregation is refused. A
//! disaggregated Model whose replicas span two nodes (`spec.topology`) runs both roles as
//! gangs and serves the same way, the decode heads pulling from the prefill head.
mod common;

use std::time::Duration;

use common::*;
use flotilla_api::pb::object_service_client::ObjectServiceClient;
use flotilla_api::pb::{ApplyRequest, DeleteRequest, GetRequest};
use tokio::time::Instant;

const MODEL: &str = "kind: Model
metadata: {name: chat}
spec:
  engine: sim
  source: file:///models/chat
  gpus: 1
  disaggregation:
    connector: nixl
    prefill: {replicas: 1}
    decode: {replicas: 2, engine_args: ['--max-num-seqs', '64']}
";

async fn object(server: &str, kind: &str, name: &str) -> Option<flotilla_api::pb::Object> {
    let mut c = ObjectServiceClient::new(channel(server, Duration::from_secs(3)));
    let req = GetRequest { kind: kind.into(), name: name.into(), stale: false };
    c.get(req).await.ok().and_then(|r| r.into_inner().object)
}

async fn status(server: &str, name: &str) -> serde_json::Value {
    let o = object(server, "model", name).await.unwrap_or_default();
    serde_json::from_str(&o.status_json).unwrap_or_default()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// A completion of a ~1,500-token prompt new to every cache, through the gateway.
fn complete(gateway: &str, model: &str, n: u32, stream: bool) -> (u16, String) {
    let prompt = format!("{n} {}", "tell me about the ships of the line ".repeat(200));
    let body = serde_json::json!({"model": model, "prompt": prompt, "max_tokens": 8, "stream": stream}).to_string();
    let out =
        raw_http::send_blocking(gateway, "POST", "/v1/completions", &body, Duration::from_secs(60)).unwrap_or_default();
    (raw_http::status_code(&out).unwrap_or(0), out)
}

/// Six completions through the gateway (alternately streamed), once it serves the model.
#[allow(clippy::disallowed_methods)] // runs on a blocking thread: no tokio worker to block
fn six_completions(gateway: &str, model: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut answers = Vec::new();
    let mut n = 0;
    while answers.len() < 6 {
        n += 1;
        let (status, out) = complete(gateway, model, n, n % 2 == 0);
        if status == 200 {
            answers.push(out);
        } else {
            assert!(Instant::now() < deadline, "no completion through the gateway: {out}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    answers
}

/// Six completions of `model` through the gateway, each prefilled remotely: the gateway
/// counts them so and the decode members' engines pulled the prompts with no failed
/// transfer.
async fn six_disaggregated(gateway: &str, servers: &[String], model: &str) {
    let (gw, m) = (gateway.to_string(), model.to_string());
    let answers = tokio::task::spawn_blocking(move || six_completions(&gw, &m)).await.unwrap();
    let named = format!("\"model\":\"{model}\"");
    assert!(answers.iter().all(|a| a.contains(&named)), "member engines serve the Model's name");
    let gw_metrics = raw_http::send_blocking(gateway, "GET", "/metrics", "", Duration::from_secs(5)).unwrap();
    let remote = format!("flotilla_gateway_pd_requests_total{{model=\"{model}\",split=\"remote\"}}");
    assert!(metric(&gw_metrics, &remote) >= 6.0, "{gw_metrics}");
    let mut pulled = 0.0;
    let keys = engine_keys(servers).await;
    for r in replicas(servers, &format!("{model}-decode")).await {
        let endpoint = r.endpoint.clone().expect("a Ready replica has an endpoint");
        let (_, text) = engine_call(&endpoint, "GET", "/metrics", "", keys.get(&r.name).map_or("", String::as_str));
        pulled += metric(&text, "vllm:external_prefix_cache_hits_total");
        assert_eq!(metric(&text, "vllm:nixl_num_failed_transfers_total"), 0.0);
    }
    eprintln!("the decode engines pulled {pulled} prompt tokens over 6 requests");
    assert!(pulled >= 6.0 * 1000.0, "the decode engines pulled the prompts: {pulled} tokens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disaggregated_model_of_two_node_replicas_serves_through_the_pd_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(1, &dir.path().join("s1"), "127.0.0.1:0", &["--bootstrap"]);
    wait_voters(&server.grpc, 1).await;
    let grpc = server.grpc.clone();
    let marker = marker();
    let mut agents: Vec<AgentProc> =
        ["node-1", "node-2"].iter().map(|n| AgentProc::start(n, &dir.path().join(n), &grpc, 2, marker)).collect();
    let gateway = GatewayProc::start(&grpc, &[]);
    let model = "kind: Model
metadata: {name: wide}
spec:
  engine: sim
  source: file:///models/wide
  gpus: 2
  topology: {nodes: 2, gpus_per_node: 1}
  disaggregation:
    connector: nixl
    prefill: {replicas: 1}
    decode: {replicas: 1}
";
    let mut c = ObjectServiceClient::new(channel(&grpc, Duration::from_secs(5)));
    c.apply(ApplyRequest { manifest: model.into(), expected_revision: None }).await.unwrap();
    let servers = [grpc.clone()];
    for member in ["wide-prefill", "wide-decode"] {
        wait_replicas(&servers, member, 90, "a Ready two-node replica", |r| ready(r) == 1).await;
        let gangs = list_objects(&servers, "replica", &format!("model={member}")).await;
        let spec: serde_json::Value = serde_json::from_str(&gangs[0].spec_json).unwrap();
        let nodes: Vec<&str> = spec["members"]
            .as_array()
            .map(|m| m.iter().filter_map(|x| x["node"].as_str()).collect())
            .unwrap_or_default();
        assert!(nodes.len() == 2 && nodes[0] != nodes[1], "{member} spans both nodes: {spec}");
    }
    six_disaggregated(&gateway.addr, &servers, "wide").await;
    for a in &mut agents {
        a.kill();
    }
    kill_engines(marker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disaggregated_model_runs_its_pools_and_serves_through_the_pd_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(1, &dir.path().join("s1"), "127.0.0.1:0", &["--bootstrap"]);
    wait_voters(&server.grpc, 1).await;
    let grpc = server.grpc.clone();
    let marker = marker();
    let mut agent = AgentProc::start("node-1", &dir.path().join("agent"), &grpc, 4, marker);
    let gateway = GatewayProc::start(&grpc, &[]);
    let mut c = ObjectServiceClient::new(channel(&grpc, Duration::from_secs(5)));

    // bad input changes nothing
    let bad = MODEL.replace("connector: nixl", "connector: rdma");
    let e = c.apply(ApplyRequest { manifest: bad, expected_revision: None }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(object(&grpc, "model", "chat").await.is_none());

    c.apply(ApplyRequest { manifest: MODEL.into(), expected_revision: None }).await.unwrap();
    let servers = [grpc.clone()];
    wait_replicas(&servers, "chat-prefill", 90, "one Ready prefill replica", |r| ready(r) == 1).await;
    wait_replicas(&servers, "chat-decode", 90, "two Ready decode replicas", |r| ready(r) == 2).await;
    assert!(replicas(&servers, "chat").await.is_empty(), "the disaggregated Model runs no replica itself");
    let member = object(&grpc, "model", "chat-decode").await.expect("the decode member exists");
    assert_eq!(member.labels.get("flotilla.io/member-of").map(String::as_str), Some("chat"));
    let spec: serde_json::Value = serde_json::from_str(&member.spec_json).unwrap();
    assert_eq!(spec["kv_transfer"], serde_json::json!({"connector": "nixl", "role": "decode"}));
    assert_eq!(spec["engine_args"], serde_json::json!(["--max-num-seqs", "64"]));

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = status(&grpc, "chat").await;
        if st["ready_replicas"] == 3 && st["conditions"][0]["status"] == "True" {
            assert_eq!(st["roles"].as_array().map(Vec::len), Some(2), "{st}");
            break;
        }
        assert!(Instant::now() < deadline, "the Model's status never counted its roles: {st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // the operator's view
    let out = std::process::Command::new(BIN).args(["--server", &grpc, "get", "model", "chat"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for want in ["ROLE", "chat-prefill", "chat-decode", "nixl"] {
        assert!(text.contains(want), "`get model chat` lacks {want}:\n{text}");
    }

    // requests for `chat` itself: prefilled on chat-prefill, pulled and decoded on chat-decode
    six_disaggregated(&gateway.addr, &servers, "chat").await;

    // deleting the Model takes its members and their engines along
    c.delete(DeleteRequest { kind: "model".into(), name: "chat".into(), expected_revision: None }).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while object(&grpc, "model", "chat-prefill").await.is_some()
        || object(&grpc, "model", "chat-decode").await.is_some()
        || !engine_pids(marker).is_empty()
    {
        assert!(Instant::now() < deadline, "members or engines outlived their Model: {:?}", engine_pids(marker));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    agent.kill();
    kill_engines(marker);
}
