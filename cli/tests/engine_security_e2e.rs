//! Engines that cannot be turned against their nodes, end to end, with a server, an agent
//! whose environment holds download credentials, and a gateway as real processes:
//! - a Model asking for `--trust-remote-code` ends Failed, and `flotilla get replicas`
//!   shows the reason naming the flag;
//! - the engine's `/proc/PID/environ` holds none of the agent's credentials, only its key;
//! - a request straight to the engine's `/v1` API without the key gets 401, with it 200,
//!   and through the gateway (which learns the key from WatchEndpoints) 200;
//! - the key shows in no Get, List or Watch of the replica, nor in `flotilla get -o json|yaml`.
mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use flotilla_api::pb::object_service_client::ObjectServiceClient;
use flotilla_api::pb::{ApplyRequest, GetRequest, WatchRequest};
use flotilla_testkit::manifests::model_manifest;

const SECRETS: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "AKIAFLOTILLATEST"),
    ("AWS_SECRET_ACCESS_KEY", "aws-secret-the-engine-must-not-see"),
    ("HF_TOKEN", "hf_secret_the_engine_must_not_see"),
];

async fn apply(server: &str, manifest: String) {
    let mut c = ObjectServiceClient::new(channel(server, Duration::from_secs(5)));
    c.apply(ApplyRequest { manifest, expected_revision: None }).await.expect("apply");
}

/// `flotilla ARGS --server S`: its stdout (the command must succeed).
fn cli(server: &str, args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).args(["--server", server]).output().expect("run flotilla");
    assert!(out.status.success(), "flotilla {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_keep_the_agents_secrets_and_answer_only_with_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(1, &dir.path().join("s1"), "127.0.0.1:0", &["--bootstrap"]);
    let s = vec![server.grpc.clone()];
    wait_voters(&s[0], 1).await;
    let marker = marker();
    let _agent = AgentProc::start_with_env("node-1", &dir.path().join("agent"), &s[0], 2, marker, &SECRETS);
    let gateway = GatewayProc::start(&s[0], &[]);

    // A Model that asks for remote code: refused by the agent's default policy.
    let trusting = "kind: Model\nmetadata:\n  name: trusting\nspec:\n  engine: sim\n  source: file:///models/t\n  \
                    replicas: 1\n  gpus: 1\n  engine_args: [\"--trust-remote-code\"]\n";
    apply(&s[0], trusting.to_string()).await;
    apply(&s[0], model_manifest("safe", 1, 1)).await;
    let r = wait_replicas(&s, "trusting", 60, "the trusting replica Failed", |r| {
        r.iter().any(|x| x.phase == "Failed" && x.reason.contains("--trust-remote-code"))
    })
    .await;
    let failed = r.iter().find(|x| x.phase == "Failed").unwrap();
    assert!(failed.endpoint.is_none(), "no engine was started: {failed:?}");
    let mut table = String::new();
    for _ in 0..50 {
        table = cli(&s[0], &["get", "replicas", "-l", "model=trusting"]);
        if table.contains("--trust-remote-code") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(table.contains("Failed") && table.contains("--trust-remote-code"), "get replicas shows why:\n{table}");

    // The safe Model runs; its engine has its key and none of the agent's credentials.
    let r = wait_replicas(&s, "safe", 60, "the safe replica Ready", |r| ready(r) == 1).await;
    let (name, endpoint) = (r[0].name.clone(), r[0].endpoint.clone().unwrap());
    let key = engine_keys(&s).await.remove(&name).expect("the endpoint table has the replica");
    assert_eq!(key.len(), 64, "a 256-bit hex key");
    let pids = engine_pids(marker);
    assert_eq!(pids.len(), 1, "one engine: the refused one never started");
    let environ = flotilla_testkit::proc_fs::split_nul(&flotilla_testkit::proc_fs::environ(pids[0]).unwrap());
    for (name, value) in SECRETS {
        assert!(!environ.iter().any(|kv| kv.starts_with(&format!("{name}=")) || kv.contains(value)), "{name} leaked");
    }
    assert!(environ.contains(&format!("VLLM_API_KEY={key}")), "the engine holds the key the gateways get");
    let cmdline = flotilla_testkit::proc_fs::args(pids[0]);
    assert!(!cmdline.iter().any(|a| a.contains(&key)), "the key is not on the command line: {cmdline:?}");

    // Straight to the engine: no key, no API; /health stays open.
    let chat = r#"{"model":"safe","messages":[{"role":"user","content":"hello"}],"max_tokens":4}"#;
    let (code, body) = engine_call(&endpoint, "POST", "/v1/chat/completions", chat, "");
    assert_eq!((code, body.as_str()), (401, r#"{"error":"Unauthorized"}"#));
    assert_eq!(engine_call(&endpoint, "POST", "/v1/chat/completions", chat, "wrong").0, 401);
    assert_eq!(engine_call(&endpoint, "GET", "/health", "", "").0, 200);
    assert!(chat_ok(&endpoint, "safe", &key));
    // Through the gateway, which has the key from the endpoint table.
    let mut last = (0, String::new());
    for _ in 0..100 {
        last = engine_call(&gateway.addr, "POST", "/v1/chat/completions", chat, "");
        if last.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last.0, 200, "through the gateway: {}", last.1);

    // No read path shows the key.
    for args in [
        &["get", "replica", name.as_str(), "-o", "json"][..],
        &["get", "replica", name.as_str(), "-o", "yaml"],
        &["get", "replicas", "-o", "json"],
        &["get", "replicas"],
    ] {
        let out = cli(&s[0], args);
        assert!(out.contains(&endpoint), "flotilla {args:?} shows the replica: {out}");
        assert!(!out.contains(&key) && !out.contains("api_key"), "flotilla {args:?} shows the key: {out}");
    }
    let mut c = ObjectServiceClient::new(channel(&s[0], Duration::from_secs(5)));
    let got = c.get(GetRequest { kind: "replica".into(), name: name.clone(), stale: false }).await.unwrap();
    let got = got.into_inner().object.unwrap();
    assert!(got.status_json.contains(&endpoint) && !got.status_json.contains(&key), "{}", got.status_json);
    let mut watch = c.watch(WatchRequest { kind: "replica".into(), after_revision: 0 }).await.unwrap().into_inner();
    let mut saw_endpoint = false;
    while !saw_endpoint {
        let e = tokio::time::timeout(Duration::from_secs(10), watch.message()).await.unwrap().unwrap().unwrap();
        let status = e.object.map(|o| o.status_json).unwrap_or_default();
        assert!(!status.contains(&key), "a watch event shows the key: {status}");
        saw_endpoint = status.contains(&endpoint);
    }
    drop(gateway);
    kill_engines(marker);
}
