//! P/D members: an assignment with `kv_transfer` starts a sim engine carrying its
//! connector's `--kv-transfer-config`, environment and files; unknown connectors and a
//! Model's own `--kv-transfer-config` fail the replica, naming the value. A two-node gang
//! of NIXL members splits the connector as vLLM runs it across nodes, and its head answers
//! a prefill naming its side channel and the gang's engine id.
//!
//! The engines run through a wrapper script that records the words the agent spawned them
//! with and then execs the sim (the same pid, the same environment, read from
//! `/proc/PID/environ`); a sim that does not know `--kv-transfer-config` yet gets it
//! removed by the wrapper, so the test checks the agent's side either way.
mod common;

use std::path::{Path, PathBuf};

use common::*;
use flotilla_api::pb;

/// A `--sim-binary` that records its arguments (NUL-separated) in `<dir>/argv-<replica>`
/// and execs the sim.
fn recording_sim(dir: &Path) -> PathBuf {
    let (bin, sub) = sim_binary();
    let script = dir.join("recording-sim.sh");
    let text = format!(
        r#"#!/bin/sh
# record the words by pid ($$ is the engine's pid after exec)
out="{dir}/argv-$$"
printf '%s\0' "$@" > "$out.tmp" && mv "$out.tmp" "$out"
if ! "{bin}" {sub} --help 2>/dev/null | grep -q -- '--kv-transfer-config'; then
  skip=0
  for a in "$@"; do
    shift
    if [ "$skip" = 1 ]; then skip=0; continue; fi
    if [ "$a" = "--kv-transfer-config" ]; then skip=1; continue; fi
    set -- "$@" "$a"
  done
fi
exec "{bin}" "$@"
"#,
        dir = dir.display(),
        bin = bin.display(),
    );
    std::fs::write(&script, text).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

fn member(name: &str, connector: &str, role: &str, engine_args: &[&str]) -> pb::ReplicaAssignment {
    pb::ReplicaAssignment {
        engine_args: engine_args.iter().map(|s| s.to_string()).collect(),
        kv_transfer: Some(pb::KvTransferAssignment { connector: connector.into(), role: role.into() }),
        ..sim_replica(name, "demo", &[])
    }
}

fn environ(pid: u32) -> Vec<(String, String)> {
    let raw = flotilla_testkit::proc_fs::environ(pid).expect("read the engine's environ");
    flotilla_testkit::proc_fs::split_nul(&raw)
        .into_iter()
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

fn var<'a>(env: &'a [(String, String)], name: &str) -> Option<&'a str> {
    env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// The words engine `pid` was spawned with (the wrapper's record; the wrapper execs, so
/// the pid is its own).
fn spawned_args(dir: &Path, pid: u32) -> Vec<String> {
    let raw = std::fs::read(dir.join(format!("argv-{pid}"))).expect("the wrapper recorded the engine's words");
    flotilla_testkit::proc_fs::split_nul(&raw)
}

/// The `--kv-transfer-config` JSON among `args`.
fn kv_config(args: &[String]) -> serde_json::Value {
    let i = args.iter().position(|a| a == "--kv-transfer-config").unwrap_or_else(|| panic!("no connector: {args:?}"));
    serde_json::from_str(&args[i + 1]).expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pd_members_start_with_their_connector_and_bad_roles_fail() {
    let server = FakeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec");
    std::fs::create_dir(&rec).unwrap();
    // A node whose policy file allows --kv-transfer-config: a P/D member still refuses it.
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "allow: [--kv-transfer-config]\n").unwrap();
    let extra = ["--ucx-env", "UCX_TLS=tcp", "--engine-policy", policy.to_str().unwrap()];
    let mut args = agent_args(&[server.addr], &dir.path().join("agent"), "node-pd", &extra);
    args.sim_binary = Some(recording_sim(&rec));
    let agent = TestAgent::start(args).await;
    let data = dir.path().join("agent");
    server.assign(vec![
        member("p-0", "nixl", "prefill", &["--data-parallel-size", "2"]),
        member("d-0", "lmcache", "decode", &[]),
        member("x-0", "rdma", "prefill", &[]),
        member("y-0", "nixl", "decode", &["--kv-transfer-config.kv_connector_module_path=evil"]),
        sim_replica("plain-0", "demo", &[]),
    ]);

    let (x, y) = eventually(30, "the bad members failed", || {
        let e = agent.reports();
        let failed = |n: &str| e.iter().find(|r| r.replica == n && r.state == "failed").cloned();
        Some((failed("x-0")?, failed("y-0")?))
    })
    .await;
    assert!(x.reason.contains("\"rdma\""), "names the connector: {}", x.reason);
    assert!(y.reason.contains("--kv-transfer-config") && y.reason.contains("no policy can allow it"), "{}", y.reason);
    assert_eq!((x.pid, y.pid), (0, 0), "never started");

    let (p_endpoint, p_pid) =
        eventually(30, "the prefill member ready", || ready_endpoint(&agent.reports(), "p-0")).await;
    let (_, d_pid) = eventually(30, "the decode member ready", || ready_endpoint(&agent.reports(), "d-0")).await;
    let (_, plain_pid) =
        eventually(30, "the plain replica ready", || ready_endpoint(&agent.reports(), "plain-0")).await;
    let range = common_port_range(&agent);

    // nixl prefill: its config, and the side channel on the node address, two ports for DP 2
    let config = kv_config(&spawned_args(&rec, p_pid));
    assert_eq!(config["kv_connector"], "NixlConnector");
    assert_eq!(config["kv_role"], "kv_producer", "a prefill member produces");
    assert_eq!(config["engine_id"], "p-0.0", "the replica and its restart count");
    let env = environ(p_pid);
    assert_eq!(var(&env, "VLLM_NIXL_SIDE_CHANNEL_HOST"), Some("127.0.0.1"));
    let side: u16 = var(&env, "VLLM_NIXL_SIDE_CHANNEL_PORT").unwrap().parse().unwrap();
    let api: u16 = p_endpoint.rsplit(':').next().unwrap().parse().unwrap();
    assert!(range.contains(&side) && range.contains(&(side + 1)), "{side} from the engine range {range:?}");
    assert!(api != side && api != side + 1, "the API port is not a side channel");
    assert_eq!(var(&env, "UCX_TLS"), Some("tcp"), "--ucx-env reaches connector engines");
    if std::fs::read(format!("/proc/{p_pid}/cmdline"))
        .is_ok_and(|c| c.windows(20).any(|w| w == b"--kv-transfer-config"))
    {
        // a sim that takes the flag runs with it
        assert_eq!(kv_config(&flotilla_testkit::proc_fs::args(p_pid)), config);
    }

    // lmcache decode: the config file in the engine's directory, named in the environment
    let config = kv_config(&spawned_args(&rec, d_pid));
    assert_eq!(config["kv_connector"], "LMCacheConnectorV1");
    assert_eq!(config["kv_role"], "kv_consumer");
    let env = environ(d_pid);
    let file = data.join("engines/d-0/lmcache.yaml");
    assert_eq!(var(&env, "LMCACHE_CONFIG_FILE"), file.to_str());
    assert_eq!(var(&env, "PYTHONHASHSEED"), Some("0"));
    let yaml: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(yaml["pd_role"], "receiver");
    assert_eq!(yaml["pd_peer_host"], "127.0.0.1");
    let init = yaml["pd_peer_init_port"][0].as_u64().unwrap() as u16;
    let alloc = yaml["pd_peer_alloc_port"][0].as_u64().unwrap() as u16;
    assert_eq!(alloc, init + 1, "one TP rank: init, then alloc");
    assert!(range.contains(&init) && range.contains(&alloc));

    // an ordinary replica gets none of it
    let env = environ(plain_pid);
    assert!(!spawned_args(&rec, plain_pid).iter().any(|a| a == "--kv-transfer-config"));
    for name in ["VLLM_NIXL_SIDE_CHANNEL_HOST", "VLLM_NIXL_SIDE_CHANNEL_PORT", "LMCACHE_CONFIG_FILE", "UCX_TLS"] {
        assert_eq!(var(&env, name), None, "{name}");
    }

    // the connector ports are recorded for adoption, and go with the engine
    let state = std::fs::read_to_string(data.join("engines.json")).unwrap();
    assert!(state.contains("connector_ports"), "{state}");
    server.assign(vec![sim_replica("plain-0", "demo", &[])]);
    eventually(30, "the members stopped", || {
        let e = agent.reports();
        (!e.iter().any(|r| r.replica == "p-0" || r.replica == "d-0")).then_some(())
    })
    .await;
    assert!(!file.exists(), "the engine's directory goes with it");
    let state = std::fs::read_to_string(data.join("engines.json")).unwrap();
    assert!(!state.contains("connector_ports"), "{state}");
    drop(agent);
}

/// Member `rank` of a two-node tp-pp gang `big-0` playing NIXL's prefill role.
fn prefill_gang_member(rank: u32, head_address: &str) -> pb::ReplicaAssignment {
    pb::ReplicaAssignment {
        gang: Some(two_node_gang(rank, head_address)),
        gpus: vec![0],
        ..member("big-0", "nixl", "prefill", &[])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nixl_gang_runs_the_side_channel_on_its_head_and_one_engine_id_everywhere() {
    let (head_server, worker_server) = (FakeServer::start().await, FakeServer::start().await);
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec");
    std::fs::create_dir(&rec).unwrap();
    let start = |server: &FakeServer, node: &str| {
        let extra = ["--gpus", "1", "--gpu-type", "H100-80GB", "--ucx-env", "UCX_TLS=tcp"];
        let mut args = agent_args(&[server.addr], &dir.path().join(node), node, &extra);
        args.sim_binary = Some(recording_sim(&rec));
        TestAgent::start(args)
    };
    let head = start(&head_server, "pd-a").await;
    let worker = start(&worker_server, "pd-b").await;
    head_server.assign(vec![prefill_gang_member(0, "")]);
    worker_server.assign(vec![prefill_gang_member(1, "")]);
    let report = |server: &FakeServer, agent: &TestAgent| {
        let _ = agent.reports();
        server.engines().into_iter().find(|e| e.replica == "big-0")
    };
    let rendezvous = eventually(20, "the head reports its rendezvous address", || {
        report(&head_server, &head).map(|r| r.rendezvous).filter(|r| !r.is_empty())
    })
    .await;
    worker_server.assign(vec![prefill_gang_member(1, &rendezvous)]);
    let ready = |server: &FakeServer, agent: &TestAgent| report(server, agent).filter(|r| r.state == "ready");
    let w = eventually(30, "the worker ready", || ready(&worker_server, &worker)).await;
    let h = eventually(30, "the head ready", || ready(&head_server, &head)).await;

    // The head: the config, and the side channel on its own port from the engine range.
    let head_config = kv_config(&spawned_args(&rec, h.pid));
    assert_eq!(head_config["kv_role"], "kv_producer");
    assert_eq!(head_config["engine_id"], "big-0", "a gang's engine id is the replica's");
    let env = environ(h.pid);
    let side: u16 = var(&env, "VLLM_NIXL_SIDE_CHANNEL_PORT").expect("the head's side channel").parse().unwrap();
    assert!(common_port_range(&head).contains(&side), "{side}");
    assert_eq!(var(&env, "VLLM_NIXL_SIDE_CHANNEL_HOST"), Some("127.0.0.1"));
    // The worker: the same config (its GPUs' NIXL agents announce the head's engine id),
    // UCX, and no side channel of its own.
    assert_eq!(kv_config(&spawned_args(&rec, w.pid)), head_config, "the worker starts with the head's config");
    let env = environ(w.pid);
    assert_eq!(var(&env, "UCX_TLS"), Some("tcp"));
    assert_eq!(var(&env, "VLLM_NIXL_SIDE_CHANNEL_PORT"), None, "the head's side channel serves every rank");
    let state = std::fs::read_to_string(dir.path().join("pd-b/engines.json")).unwrap();
    assert!(!state.contains("connector_ports"), "the worker holds no connector port: {state}");

    // The head answers a remote-decode prefill naming its side channel and the gang's id.
    let body = r#"{"model": "demo", "prompt": "hello gang", "max_tokens": 1,
        "kv_transfer_params": {"do_remote_decode": true, "do_remote_prefill": false}}"#;
    let (status, text) = http_request_with_key(&h.endpoint, "POST", "/v1/completions", body, &h.api_key)
        .await
        .expect("the head answers");
    assert_eq!(status, 200, "{text}");
    let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
    let params = &answer["kv_transfer_params"];
    assert_eq!(params["remote_engine_id"], "big-0", "{text}");
    assert_eq!(params["remote_host"], "127.0.0.1", "{text}");
    assert_eq!(params["remote_port"].as_u64(), Some(u64::from(side)), "{text}");
    drop((head, worker));
}

/// The engine port range `agent_args` gave this agent.
fn common_port_range(agent: &TestAgent) -> std::ops::RangeInclusive<u16> {
    agent.handle().config().ports.clone()
}

fn ready_endpoint(reports: &[pb::EngineReport], name: &str) -> Option<(String, u32)> {
    reports.iter().find(|r| r.replica == name && r.state == "ready").map(|r| (r.endpoint.clone(), r.pid))
}
