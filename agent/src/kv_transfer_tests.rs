//! Table tests of [`super`]: each connector × role against the documented example it follows.
use super::*;
use serde_json::Value;

fn kv(connector: &str, role: &str) -> KvTransfer {
    KvTransfer::parse(&KvTransferAssignment { connector: connector.into(), role: role.into() }).unwrap()
}

fn args(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

fn site<'a>(dir: &'a Path, ucx: &'a [(String, String)]) -> Site<'a> {
    Site {
        replica: "llama-prefill-x7k2q",
        engine_id: "llama-prefill-x7k2q.0",
        address: "10.0.0.5",
        engine_port: 20001,
        first_port: 20100,
        engine_dir: dir,
        ucx_env: ucx,
    }
}

/// The `--kv-transfer-config` JSON of a launch, parsed.
fn config(l: &ConnectorLaunch) -> Value {
    assert_eq!(l.args.len(), 2, "{:?}", l.args);
    assert_eq!(l.args[0], "--kv-transfer-config");
    serde_json::from_str(&l.args[1]).expect("the config is JSON")
}

fn env<'a>(l: &'a ConnectorLaunch, name: &str) -> Option<&'a str> {
    l.env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// The object `json` (from a documented example) with `changes` applied: the fields this
/// agent sets differently (the node's own ports and names), each said why in the caller.
fn example(json: &str, changes: &[(&str, Value)]) -> Value {
    let mut v: Value = serde_json::from_str(json).expect("the quoted example is JSON");
    for (path, new) in changes {
        let mut at = &mut v;
        let keys: Vec<&str> = path.split('.').collect();
        for k in &keys[..keys.len() - 1] {
            at = &mut at[*k];
        }
        match new {
            Value::Null => {
                at.as_object_mut().unwrap().remove(keys[keys.len() - 1]);
            }
            _ => at[keys[keys.len() - 1]] = new.clone(),
        }
    }
    v
}

/// Field by field, naming the first that differs.
fn same_fields(got: &Value, want: &Value, what: &str) {
    let (g, w) = (got.as_object().unwrap(), want.as_object().unwrap());
    for (k, wv) in w {
        match (g.get(k), wv) {
            (Some(gv @ Value::Object(_)), Value::Object(_)) => same_fields(gv, wv, &format!("{what}.{k}")),
            (gv, _) => assert_eq!(gv, Some(wv), "{what}.{k}"),
        }
    }
    for k in g.keys() {
        assert!(w.contains_key(k), "{what}.{k} is not in the example: {got}");
    }
}

#[test]
fn nixl_follows_vllms_usage_guide() {
    // vLLM docs/features/nixl_connector_usage.md (v0.12 - v0.32), "Basic Usage":
    //   VLLM_NIXL_SIDE_CHANNEL_PORT=5600 vllm serve Qwen/Qwen3-0.6B --port 8100 --enforce-eager \
    //     --kv-transfer-config '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'
    // (the decoder the same with port 8200 and side channel 5601; VLLM_NIXL_SIDE_CHANNEL_HOST
    // for other hosts), and "Selecting a NIXL transport backend":
    //   "kv_connector_extra_config":{"backends":["UCX"]}
    // The role: vLLM 0.32's NixlConnector warns "Using kv_role='kv_both' with NixlConnector is
    // deprecated and will be removed in a future release. Please set kv_role='kv_producer' for
    // prefill instances and kv_role='kv_consumer' for decode instances."
    let doc = |role: &str| {
        format!(
            r#"{{"kv_connector":"NixlConnector","kv_role":"{role}","kv_connector_extra_config":{{"backends":["UCX"]}}}}"#
        )
    };
    let dir = PathBuf::from("/d/engines/r");
    let ucx = vec![("UCX_TLS".to_string(), "rc,cuda_ipc,cuda_copy".to_string())];
    for (role, kv_role) in [("prefill", "kv_producer"), ("decode", "kv_consumer")] {
        let k = kv("nixl", role);
        let p = plan(&k, &[], None).unwrap();
        assert_eq!(p.ports, 1, "one side channel without DP");
        let l = launch(&k, &p, &site(&dir, &ucx));
        // engine_id: the example leaves it to vLLM (a random uuid); ours names the process
        let want = example(&doc(kv_role), &[("engine_id", "llama-prefill-x7k2q.0".into())]);
        same_fields(&config(&l), &want, &format!("nixl {role}"));
        assert_eq!(env(&l, "VLLM_NIXL_SIDE_CHANNEL_HOST"), Some("10.0.0.5"));
        assert_eq!(env(&l, "VLLM_NIXL_SIDE_CHANNEL_PORT"), Some("20100"));
        assert_eq!(env(&l, "UCX_TLS"), Some("rc,cuda_ipc,cuda_copy"), "--ucx-env reaches the engine");
        assert!(l.files.is_empty());
    }
}

#[test]
fn nixl_reserves_a_side_channel_per_data_parallel_rank() {
    // vllm/distributed/kv_transfer/kv_connector/v1/nixl/base_scheduler.py (vLLM 0.32):
    //   self.side_channel_port = envs.VLLM_NIXL_SIDE_CHANNEL_PORT + parallel_config.data_parallel_index
    let k = kv("nixl", "decode");
    for (words, ports) in [
        (&["--data-parallel-size", "4"][..], 4),
        (&["--data_parallel_size=2"], 2),
        (&["-dp", "8", "--tensor-parallel-size", "2"], 8),
        (&["--data-parallel-size", "2", "--data-parallel-size", "3"], 3),
        (&["--data-parallel-size-local", "2"], 1),
        (&["--max-model-len", "4096"], 1),
    ] {
        assert_eq!(plan(&k, &args(words), None).unwrap().ports, ports, "{words:?}");
    }
    for bad in [&["--data-parallel-size", "0"][..], &["-dp", "x"], &["-dp"], &["-dp", "65"]] {
        let e = plan(&k, &args(bad), None).unwrap_err();
        assert!(e.contains("--data-parallel-size"), "{bad:?}: {e}");
    }
}

#[test]
fn lmcache_follows_lmcaches_xpyd_example() {
    // LMCache examples/disagg_prefill/xpyd/disagg_vllm_launcher.sh (LMCache 0.3.x):
    //   prefiller: LMCACHE_CONFIG_FILE=configs/lmcache-prefiller-config.yaml vllm serve $MODEL --port 7100 ...
    //     --kv-transfer-config '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_producer",
    //       "kv_connector_extra_config": {"discard_partial_chunks": false, "lmcache_rpc_port": "producer1"}}'
    //   decoder:   LMCACHE_CONFIG_FILE=configs/lmcache-decoder-1-config.yaml ... --port 7200 ...
    //     --kv-transfer-config '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_consumer",
    //       "kv_connector_extra_config": {"discard_partial_chunks": false, "lmcache_rpc_port": "consumer1",
    //       "skip_last_n_tokens": 1}}'
    //   and `export PYTHONHASHSEED=0` for all of them.
    let producer = r#"{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_producer","kv_connector_extra_config": {"discard_partial_chunks": false, "lmcache_rpc_port": "producer1"}}"#;
    let consumer = r#"{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_consumer","kv_connector_extra_config": {"discard_partial_chunks": false, "lmcache_rpc_port": "consumer1", "skip_last_n_tokens": 1}}"#;
    // configs/lmcache-prefiller-config.yaml and configs/lmcache-decoder-1-config.yaml:
    let sender = "local_cpu: False\nmax_local_cpu_size: 0\nmax_local_disk_size: 0\n\nenable_pd: True\n\
        transfer_channel: \"nixl\"\npd_role: \"sender\"\npd_proxy_host: \"localhost\"\npd_proxy_port: 7500\n\
        pd_buffer_size: 1073741824 # 1GB\npd_buffer_device: \"cuda\"\nnixl_backends: [UCX]\n";
    let receiver = "local_cpu: False\nmax_local_cpu_size: 0\n\nenable_pd: True\ntransfer_channel: \"nixl\"\n\
        pd_role: \"receiver\"\npd_peer_host: \"localhost\"\npd_peer_init_port: 7300\npd_peer_alloc_port: 7400\n\
        pd_buffer_size: 2147483648 # 2GB\npd_buffer_device: \"cuda\"\nnixl_backends: [UCX]\n";
    let dir = PathBuf::from("/d/engines/llama-prefill-x7k2q");
    let yaml = |s: &str| -> Value { serde_yaml::from_str(s).unwrap() };
    for (role, cfg, file, tp, changes) in [
        (
            "prefill",
            producer,
            sender,
            1,
            // our node's address and an allocated port instead of localhost:7500
            vec![("pd_proxy_host", Value::from("10.0.0.5")), ("pd_proxy_port", 20100.into())],
        ),
        (
            "decode",
            consumer,
            receiver,
            2,
            // per TP rank, as LMCache's PD backend indexes them (pd_peer_init_port[tp_rank])
            vec![
                ("pd_peer_host", Value::from("10.0.0.5")),
                ("pd_peer_init_port", serde_json::json!([20100, 20101])),
                ("pd_peer_alloc_port", serde_json::json!([20102, 20103])),
            ],
        ),
    ] {
        let k = kv("lmcache", role);
        let p = plan(&k, &args(&["--tensor-parallel-size", &tp.to_string()]), None).unwrap();
        assert_eq!(p.ports, if role == "prefill" { 1 } else { 4 });
        let l = launch(&k, &p, &site(&dir, &[]));
        // lmcache_rpc_port names an IPC socket: unique per engine on the node (the replica)
        let want = example(cfg, &[("kv_connector_extra_config.lmcache_rpc_port", "llama-prefill-x7k2q".into())]);
        same_fields(&config(&l), &want, &format!("lmcache {role}"));
        let path = dir.join("lmcache.yaml");
        assert_eq!(env(&l, "LMCACHE_CONFIG_FILE"), Some(path.to_str().unwrap()));
        assert_eq!(env(&l, "PYTHONHASHSEED"), Some("0"));
        assert_eq!(l.files.len(), 1);
        assert_eq!(l.files[0].0, path);
        let mut want = yaml(file);
        for (key, v) in changes {
            want[key] = v;
        }
        same_fields(&yaml(&l.files[0].1), &want, &format!("lmcache.yaml {role}"));
    }
}

#[test]
fn p2p_nccl_follows_vllms_design_doc() {
    // vLLM docs/design/p2p_nccl_connector.md (vLLM 0.9.2 - 0.1x), "Run 1P3D":
    //   Prefill1: vllm serve ... --port 20001 ... --kv-transfer-config
    //     '{"kv_connector":"P2pNcclConnector","kv_role":"kv_producer","kv_buffer_size":"1e1","kv_port":"21001",
    //       "kv_connector_extra_config":{"proxy_ip":"10.0.1.1","proxy_port":"30001","http_port":"20001"}}'
    //   Decode1:  ... --port 20002 ... '{"kv_connector":"P2pNcclConnector","kv_role":"kv_consumer",
    //       "kv_buffer_size":"8e9","kv_port":"22001","kv_connector_extra_config":{"proxy_ip":"10.0.1.1",
    //       "proxy_port":"30001","http_port":"20002"}}'
    let producer = r#"{"kv_connector":"P2pNcclConnector","kv_role":"kv_producer","kv_buffer_size":"1e1","kv_port":"21001","kv_connector_extra_config":{"proxy_ip":"10.0.1.1","proxy_port":"30001","http_port":"20001"}}"#;
    let consumer = r#"{"kv_connector":"P2pNcclConnector","kv_role":"kv_consumer","kv_buffer_size":"8e9","kv_port":"22001","kv_connector_extra_config":{"proxy_ip":"10.0.1.1","proxy_port":"30001","http_port":"20002"}}"#;
    let dir = PathBuf::from("/d");
    for (role, doc) in [("prefill", producer), ("decode", consumer)] {
        let k = kv("p2p-nccl", role);
        let p = plan(&k, &args(&["-tp", "2"]), None).unwrap();
        assert_eq!(p.ports, 2, "kv_port + each worker's rank");
        let l = launch(&k, &p, &site(&dir, &[]));
        let want = example(
            doc,
            &[
                ("kv_port", "20100".into()),
                ("kv_connector_extra_config.http_port", "20001".into()),
                // no demo proxy: the gateway routes (the engines then register with nobody)
                ("kv_connector_extra_config.proxy_ip", Value::Null),
                ("kv_connector_extra_config.proxy_port", Value::Null),
                // the doc's recommended mode, named rather than left to the default
                ("kv_connector_extra_config.send_type", "PUT_ASYNC".into()),
            ],
        );
        same_fields(&config(&l), &want, &format!("p2p-nccl {role}"));
        assert_eq!(env(&l, "VLLM_HOST_IP"), Some("10.0.0.5"), "the ZMQ address it binds and advertises");
        assert!(l.files.is_empty());
    }
}

#[test]
fn refusals_name_the_value() {
    for (c, r, needle) in [
        ("rdma", "prefill", "\"rdma\""),
        ("NixlConnector", "decode", "\"NixlConnector\""),
        ("", "decode", "connector \"\""),
        ("nixl", "both", "\"both\""),
        ("nixl", "", "role \"\""),
    ] {
        let e = KvTransfer::parse(&KvTransferAssignment { connector: c.into(), role: r.into() }).unwrap_err();
        assert!(e.contains(needle), "{c}/{r}: {e}");
    }
    for c in ["lmcache", "p2p-nccl"] {
        let e = plan(&kv(c, "decode"), &args(&["--data-parallel-size", "2"]), None).unwrap_err();
        assert!(e.contains("--data-parallel-size 2"), "{e}");
    }
    for c in ["lmcache", "p2p-nccl"] {
        let e = plan(&kv(c, "prefill"), &[], Some(&gang("tp-pp", 0))).unwrap_err();
        assert!(e.contains("multi-node") && e.contains("use nixl"), "{e}");
    }
    let e = plan(&kv("nixl", "prefill"), &[], Some(&gang("mesh", 1))).unwrap_err();
    assert!(e.contains("\"mesh\""), "{e}");
    let e = plan(&kv("lmcache", "decode"), &args(&["-tp", "64"]), None).unwrap_err();
    assert!(e.contains("128 ports"), "{e}");
}

#[test]
fn the_agents_names_are_the_specs() {
    // The control plane writes the spec's serde names (actors/src/shared.rs): each parses.
    for c in [KvConnector::Nixl, KvConnector::Lmcache, KvConnector::P2pNccl] {
        let word = serde_json::to_value(c).unwrap().as_str().unwrap().to_string();
        for r in EngineRole::ALL {
            let a = KvTransferAssignment { connector: word.clone(), role: r.as_str().into() };
            assert_eq!(KvTransfer::parse(&a), Ok(KvTransfer { connector: c, role: r }));
        }
    }
}

#[test]
fn ucx_env_is_bounded() {
    let ok = parse_ucx_env(&args(&["UCX_TLS=rc,cuda_ipc", " UCX_NET_DEVICES=mlx5_0:1 ", ""])).unwrap();
    assert_eq!(ok, vec![("UCX_TLS".into(), "rc,cuda_ipc".into()), ("UCX_NET_DEVICES".into(), "mlx5_0:1".into())]);
    assert_eq!(parse_ucx_env(&args(&["UCX_X="])).unwrap(), vec![("UCX_X".into(), String::new())]);
    let long_name = format!("UCX_{}=1", "A".repeat(MAX_UCX_NAME));
    let long_value = format!("UCX_TLS={}", "a".repeat(MAX_UCX_VALUE + 1));
    let many: Vec<String> = (0..=MAX_UCX_ENV).map(|i| format!("UCX_V{i}=1")).collect();
    for (entries, needle) in [
        (args(&["LD_PRELOAD=/tmp/x.so"]), "\"LD_PRELOAD\" is not a UCX_*"),
        (args(&["UCX_"]), "not KEY=VALUE"),
        (args(&["UCX_=1"]), "\"UCX_\" is not"),
        (args(&["ucx_tls=rc"]), "\"ucx_tls\""),
        (args(&["UCX_TLS"]), "not KEY=VALUE"),
        (args(&["UCX-TLS=rc"]), "\"UCX-TLS\""),
        (args(&["UCX_TLS=a\nb"]), "printable"),
        (args(&["UCX_TLS=rc", "UCX_TLS=tcp"]), "twice"),
        (vec![long_name], "longer than"),
        (vec![long_value], "at most 512"),
        (many, "33 variables"),
    ] {
        let e = parse_ucx_env(&entries).unwrap_err();
        assert!(e.contains(needle), "{entries:?}: {e}");
    }
    let max: Vec<String> = (0..MAX_UCX_ENV).map(|i| format!("UCX_V{i}={}", "v".repeat(MAX_UCX_VALUE))).collect();
    assert_eq!(parse_ucx_env(&max).unwrap().len(), MAX_UCX_ENV);
}

fn gang(layout: &str, rank: u32) -> GangAssignment {
    GangAssignment { size: 3, rank, layout: layout.into(), gpus_per_node: 8, ..Default::default() }
}

/// A NIXL member of each layout and rank against the module's table: who runs a side
/// channel (and on which port), who gets the config, and that every member names the same
/// engine id.
#[test]
fn nixl_gang_members_split_the_connector_as_vllm_runs_it() {
    let dir = tempfile::tempdir().unwrap();
    let ucx = vec![("UCX_TLS".to_string(), "rc,cuda_ipc".to_string())];
    let k = kv("nixl", "decode");
    // (layout, rank, ports, config given, side channel port variable)
    for (layout, rank, ports, configured, side) in [
        ("tp-pp", 0, 1, true, Some("20100")),
        ("tp-pp", 2, 0, true, None),
        ("data-parallel", 0, 1, true, Some("20100")),
        // rank 2's engine core binds the variable + its DP index 2: the allocated port
        ("data-parallel", 2, 1, true, Some("20098")),
        ("ray", 0, 1, true, Some("20100")),
        ("ray", 1, 0, false, None),
    ] {
        let what = format!("{layout} rank {rank}");
        let p = plan(&k, &args(&["-tp", "8"]), Some(&gang(layout, rank))).unwrap();
        assert_eq!(p.ports, ports, "{what}");
        let id = engine_id("llama-decode-x7k2q", 3, true);
        let mut s = site(dir.path(), &ucx);
        s.engine_id = &id;
        s.first_port = if ports == 0 { 0 } else { 20100 };
        let l = launch(&k, &p, &s);
        assert_eq!(env(&l, "VLLM_NIXL_SIDE_CHANNEL_PORT"), side, "{what}");
        assert_eq!(env(&l, "VLLM_NIXL_SIDE_CHANNEL_HOST"), side.map(|_| "10.0.0.5"), "{what}");
        assert_eq!(env(&l, "UCX_TLS"), Some("rc,cuda_ipc"), "{what}: every node's NIXL agents use UCX");
        match configured {
            true => {
                let c = config(&l);
                assert_eq!(c["engine_id"], "llama-decode-x7k2q", "{what}: one engine id for the gang");
                assert_eq!(c["kv_role"], "kv_consumer", "{what}");
            }
            false => assert!(l.args.is_empty(), "{what}: a Ray node takes no engine flags: {:?}", l.args),
        }
    }
    assert_eq!(engine_id("llama-decode-x7k2q", 3, false), "llama-decode-x7k2q.3", "one-node: per process");
}
