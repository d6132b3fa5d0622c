//! Prefill/decode connectors: what the engine of a P/D member replica (an assignment with
//! `kv_transfer`, from the Model's `spec.disaggregation`) is started with. Pure: [`plan`]
//! reads the Model's `engine_args` and says how many consecutive ports the connector needs
//! beside the engine's API port; the engine task allocates them from `--engine-port-range`
//! with the API port (and releases them with it, when the process ends); [`launch`] gives
//! the engine arguments, environment and files. The same words go to vLLM and to
//! `flotilla sim`.
//!
//! | connector | role | `--kv-transfer-config` | environment | ports (P consecutive) | file |
//! |---|---|---|---|---|---|
//! | nixl | prefill / decode | `NixlConnector`, `kv_producer` / `kv_consumer`, `engine_id` | `VLLM_NIXL_SIDE_CHANNEL_HOST/PORT`, `--ucx-env` | DP ranks (side channel + DP index) | |
//! | lmcache | prefill | `LMCacheConnectorV1`, `kv_producer` | `LMCACHE_CONFIG_FILE`, `PYTHONHASHSEED=0`, `--ucx-env` | 1 (`pd_proxy_port`) | `lmcache.yaml`, `pd_role: sender` |
//! | lmcache | decode | `LMCacheConnectorV1`, `kv_consumer` | same | 2 × TP (`pd_peer_init_port`, `pd_peer_alloc_port` per TP rank) | `lmcache.yaml`, `pd_role: receiver` |
//! | p2p-nccl | prefill / decode | `P2pNcclConnector`, `kv_producer` / `kv_consumer`, `kv_port` | `VLLM_HOST_IP`, `--ucx-env` | TP (`kv_port` + rank) | |
//!
//! **Multi-node members** (a gang, `spec.topology`, [`crate::gang`]) take NIXL only, as
//! vLLM runs it there: the connector's scheduler side (the side channel every decode engine
//! handshakes with) runs with the engine core, its workers (one NIXL agent per GPU, UCX) on
//! every node.
//!
//! | layout | head (rank 0) | member of rank R > 0 |
//! |---|---|---|
//! | tp-pp | config, side channel (1 port) | the same config (its workers build their connector from their own flags), UCX; no side channel: the head's serves every rank |
//! | data-parallel | config, side channel (1 port) | config, side channel (1 port): each rank runs its own engine core, whose side channel is `VLLM_NIXL_SIDE_CHANNEL_PORT` + R, so the variable is the allocated port − R |
//! | ray | config after the ray-member's `--`, side channel, UCX for the Ray node | UCX only, for its Ray node (the head's driver hands the workers its config) |
//!
//! Every member of a gang names the same `engine_id`, the replica's name: the head's
//! workers on other nodes must present the engine id the head's side channel announces, and
//! a gang never outlives a process of its own (a lost rank fails the whole gang and the
//! controller replaces it under a new name, docs/actors.md "Multi-node replicas"), so the
//! name is unique per incarnation as `<replica>.<restarts>` is for a one-node engine.
//!
//! Refused (the replica fails with the reason): an unknown connector or role, lmcache or
//! p2p-nccl on a gang (their ports are per TP rank, which a gang spreads over nodes), data
//! parallelism with lmcache or p2p-nccl (every DP engine would bind the same ports), and
//! unreadable parallelism flags.

use std::path::{Path, PathBuf};

use flotilla_api::pb::{GangAssignment, KvTransferAssignment};
use flotilla_api::spec::{EngineRole, KvConnector};

/// `--ucx-env`: at most this many variables.
pub const MAX_UCX_ENV: usize = 32;
/// `--ucx-env`: longest name, in bytes.
pub const MAX_UCX_NAME: usize = 64;
/// `--ucx-env`: longest value, in bytes.
pub const MAX_UCX_VALUE: usize = 512;

/// The most ports one engine's connector may take (a DP or TP size beyond any real node).
pub const MAX_CONNECTOR_PORTS: u16 = 64;

/// A member's connector and role, parsed from its assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvTransfer {
    pub connector: KvConnector,
    pub role: EngineRole,
}

impl KvTransfer {
    /// From the assignment's words (the spec's kebab-case names); an unknown one is an
    /// error naming it.
    pub fn parse(a: &KvTransferAssignment) -> Result<KvTransfer, String> {
        let connector = match a.connector.as_str() {
            "nixl" => KvConnector::Nixl,
            "lmcache" => KvConnector::Lmcache,
            "p2p-nccl" => KvConnector::P2pNccl,
            other => {
                return Err(format!(
                    "unknown kv_transfer connector {other:?}; this agent starts nixl, lmcache and p2p-nccl engines"
                ))
            }
        };
        let role = match a.role.as_str() {
            "prefill" => EngineRole::Prefill,
            "decode" => EngineRole::Decode,
            other => return Err(format!("unknown kv_transfer role {other:?}; prefill or decode")),
        };
        Ok(KvTransfer { connector, role })
    }
}

/// What [`plan`] read from the engine arguments and the gang.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Consecutive ports the connector needs (0 for a gang member that runs no engine core).
    pub ports: u16,
    /// `--tensor-parallel-size` (1 when not given).
    pub tp: u16,
    /// `--data-parallel-size` (1 when not given).
    pub dp: u16,
    /// What part of a multi-node replica this engine is (None: a one-node replica).
    pub gang: Option<GangPart>,
}

/// The part a gang member's engine plays for the connector (the module's layout table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GangPart {
    /// Runs an engine core: the head of any layout, or a data-parallel rank (its global DP
    /// index, which vLLM adds to the side channel port).
    EngineCore { dp_index: u16 },
    /// A tp-pp rank > 0: workers only, started with the same config.
    Workers,
    /// A ray rank > 0: a Ray node; only its environment reaches the workers Ray places there.
    RayNode,
}

/// The last value of an integer flag (`--name N`, `--name=N`, underscores for dashes, or a
/// short alias), as vLLM's parser keeps the last; None when absent.
fn int_flag(args: &[String], long: &str, short: &str) -> Result<Option<u16>, String> {
    let mut found = None;
    let mut words = args.iter().peekable();
    while let Some(w) = words.next() {
        let (name, inline) = match w.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (w.as_str(), None),
        };
        let normalized = match name.strip_prefix("--") {
            Some(rest) => format!("--{}", rest.replace('_', "-")),
            None => name.to_string(),
        };
        if normalized != long && normalized != short {
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None => words.next().cloned().ok_or_else(|| format!("{long} ({w}) has no value"))?,
        };
        let n: u16 = value.trim().parse().ok().filter(|n| (1..=MAX_CONNECTOR_PORTS).contains(n)).ok_or_else(|| {
            format!("{long} {value:?} is not a size between 1 and {MAX_CONNECTOR_PORTS} this agent can start a connector for")
        })?;
        found = Some(n);
    }
    Ok(found)
}

/// The ports `kv`'s connector needs for an engine started with `engine_args` as the member
/// `gang` of a multi-node replica (None: a one-node replica), or why it cannot be started.
pub fn plan(kv: &KvTransfer, engine_args: &[String], gang: Option<&GangAssignment>) -> Result<Plan, String> {
    let tp = int_flag(engine_args, "--tensor-parallel-size", "-tp")?.unwrap_or(1);
    let dp = int_flag(engine_args, "--data-parallel-size", "-dp")?.unwrap_or(1);
    if let Some(g) = gang {
        return gang_plan(kv, g, tp, dp);
    }
    let ports = match (kv.connector, kv.role) {
        // vLLM's side channel: VLLM_NIXL_SIDE_CHANNEL_PORT + the DP rank's index
        // (nixl/base_scheduler.py, side_channel_port); one listener serves all TP workers.
        (KvConnector::Nixl, _) => dp,
        (_, _) if dp > 1 => {
            return Err(format!(
            "{} with --data-parallel-size {dp} is not supported: every DP engine would bind the same connector ports",
            kv.connector.vllm_name()
        ))
        }
        // the sender's pd_proxy_port
        (KvConnector::Lmcache, EngineRole::Prefill) => 1,
        // the receiver's pd_peer_init_port and pd_peer_alloc_port, one per TP rank each
        (KvConnector::Lmcache, EngineRole::Decode) => 2 * tp,
        // kv_port + the worker's rank (P2pNcclEngine's port_offset)
        (KvConnector::P2pNccl, _) => tp,
    };
    if ports > MAX_CONNECTOR_PORTS {
        return Err(format!("{} needs {ports} ports; at most {MAX_CONNECTOR_PORTS}", kv.connector.vllm_name()));
    }
    Ok(Plan { ports, tp, dp, gang: None })
}

/// [`plan`] for a gang member (the module's layout table).
fn gang_plan(kv: &KvTransfer, g: &GangAssignment, tp: u16, dp: u16) -> Result<Plan, String> {
    use crate::gang::Layout;
    if kv.connector != KvConnector::Nixl {
        return Err(format!(
            "{} on a multi-node replica is not supported: its ports are per TP rank, which a gang spreads over nodes; use nixl",
            kv.connector.vllm_name()
        ));
    }
    let part = match (Layout::parse(&g.layout), g.rank) {
        (_, 0) => GangPart::EngineCore { dp_index: 0 },
        (Some(Layout::DataParallel), r) => GangPart::EngineCore {
            dp_index: u16::try_from(r)
                .ok()
                .filter(|r| *r < MAX_CONNECTOR_PORTS)
                .ok_or_else(|| format!("data-parallel rank {r} is beyond what this agent starts a connector for"))?,
        },
        (Some(Layout::TpPp), _) => GangPart::Workers,
        (Some(Layout::Ray), _) => GangPart::RayNode,
        (None, _) => return Err(format!("unknown gang layout {:?}", g.layout)),
    };
    let ports = u16::from(matches!(part, GangPart::EngineCore { .. }));
    Ok(Plan { ports, tp, dp, gang: Some(part) })
}

/// NIXL's `engine_id` for a replica's engine after `restarts` restarts: one per engine
/// process, or the replica's name for every member of a gang (the module doc says why).
pub fn engine_id(replica: &str, restarts: u32, gang: bool) -> String {
    match gang {
        true => replica.to_string(),
        false => format!("{replica}.{restarts}"),
    }
}

/// Where one engine's connector runs.
#[derive(Debug, Clone)]
pub struct Site<'a> {
    /// The replica (LMCache's `lmcache_rpc_port` name, unique on the node).
    pub replica: &'a str,
    /// NIXL's `engine_id`: unique per engine process (the replica and its restart count),
    /// so decode engines never reuse the handshake of a previous prefill process.
    pub engine_id: &'a str,
    /// The node's `--address`: what the connector binds and advertises.
    pub address: &'a str,
    /// The engine's API port.
    pub engine_port: u16,
    /// The first of the [`Plan::ports`] consecutive ports allocated for the connector (0
    /// when it needs none).
    pub first_port: u16,
    /// `<data-dir>/engines/<replica>`, where its files go.
    pub engine_dir: &'a Path,
    /// `--ucx-env`, for every connector engine.
    pub ucx_env: &'a [(String, String)],
}

/// The connector's part of an engine's start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectorLaunch {
    /// Appended to the engine's arguments.
    pub args: Vec<String>,
    /// Laid over the engine's environment.
    pub env: Vec<(String, String)>,
    /// Written before the engine starts (path, contents), in the engine's directory.
    pub files: Vec<(PathBuf, String)>,
}

/// LMCache's config file name in the engine's directory.
pub const LMCACHE_FILE: &str = "lmcache.yaml";

/// The engine's arguments, environment and files for `kv` on `site`.
pub fn launch(kv: &KvTransfer, plan: &Plan, site: &Site<'_>) -> ConnectorLaunch {
    let mut out = ConnectorLaunch::default();
    if plan.gang == Some(GangPart::RayNode) {
        out.env.extend(site.ucx_env.iter().cloned());
        return out;
    }
    let config = match kv.connector {
        KvConnector::Nixl => {
            if let Some(dp_index) = side_channel_index(plan) {
                // vLLM binds VLLM_NIXL_SIDE_CHANNEL_PORT + the engine core's DP index: the
                // variable is set so that the sum is the allocated port (engine ports are
                // at least 1024 and DP indexes below MAX_CONNECTOR_PORTS: no underflow)
                out.env.push(("VLLM_NIXL_SIDE_CHANNEL_HOST".into(), site.address.to_string()));
                let base = site.first_port.saturating_sub(dp_index);
                out.env.push(("VLLM_NIXL_SIDE_CHANNEL_PORT".into(), base.to_string()));
            }
            // kv_producer / kv_consumer: vLLM 0.32 warns that `kv_both` with the
            // NixlConnector "is deprecated and will be removed in a future release"; a
            // consumer still computes a prompt sent without kv_transfer_params (the
            // gateway's decode-only fallback)
            serde_json::json!({
                "kv_connector": kv.connector.vllm_name(),
                "kv_role": role_word(kv.role),
                "engine_id": site.engine_id,
                "kv_connector_extra_config": {"backends": ["UCX"]},
            })
        }
        KvConnector::Lmcache => {
            let file = site.engine_dir.join(LMCACHE_FILE);
            out.env.push(("LMCACHE_CONFIG_FILE".into(), file.display().to_string()));
            // LMCache hashes tokens into chunk keys with Python's hash(): every engine of
            // the pair must use the same seed (the example exports PYTHONHASHSEED=0).
            out.env.push(("PYTHONHASHSEED".into(), "0".into()));
            out.files.push((file, lmcache_config(kv.role, plan, site)));
            let mut extra = serde_json::json!({"discard_partial_chunks": false, "lmcache_rpc_port": site.replica});
            if kv.role == EngineRole::Decode {
                extra["skip_last_n_tokens"] = 1.into();
            }
            serde_json::json!({
                "kv_connector": kv.connector.vllm_name(),
                "kv_role": role_word(kv.role),
                "kv_connector_extra_config": extra,
            })
        }
        KvConnector::P2pNccl => {
            // P2pNcclEngine binds and advertises get_ip():kv_port+rank.
            out.env.push(("VLLM_HOST_IP".into(), site.address.to_string()));
            serde_json::json!({
                "kv_connector": kv.connector.vllm_name(),
                "kv_role": role_word(kv.role),
                // the docs' sizes: a prefill engine receives nothing (PUT_ASYNC), a decode
                // engine buffers what it receives in GPU memory (8 GB of an 80 GB GPU)
                "kv_buffer_size": if kv.role == EngineRole::Prefill { "1e1" } else { "8e9" },
                "kv_port": site.first_port.to_string(),
                // no proxy_ip/proxy_port: the gateway is not vLLM's demo proxy; without
                // them the engine registers with nobody (and needs no http_port, given anyway)
                "kv_connector_extra_config": {
                    "http_port": site.engine_port.to_string(),
                    "send_type": "PUT_ASYNC",
                },
            })
        }
    };
    out.args.push("--kv-transfer-config".into());
    out.args.push(config.to_string());
    out.env.extend(site.ucx_env.iter().cloned());
    out
}

/// The DP index vLLM adds to the side channel port of this engine's first engine core, or
/// None when it runs no engine core (a tp-pp worker rank).
fn side_channel_index(plan: &Plan) -> Option<u16> {
    match plan.gang {
        None => Some(0),
        Some(GangPart::EngineCore { dp_index }) => Some(dp_index),
        Some(GangPart::Workers | GangPart::RayNode) => None,
    }
}

fn role_word(role: EngineRole) -> &'static str {
    match role {
        EngineRole::Prefill => "kv_producer",
        EngineRole::Decode => "kv_consumer",
    }
}

/// LMCache's config for `role`: the keys of LMCache's examples/disagg_prefill/xpyd
/// (configs/lmcache-prefiller-config.yaml and lmcache-decoder-1-config.yaml, LMCache
/// 0.3.x), with this node's address and the allocated ports instead of `localhost`, 7500,
/// 7300 and 7400. The receiver's ports are lists, one per TP rank (LMCache's PD backend
/// takes `pd_peer_init_port[tp_rank]`).
fn lmcache_config(role: EngineRole, plan: &Plan, site: &Site<'_>) -> String {
    let first = site.first_port;
    let value = match role {
        EngineRole::Prefill => serde_json::json!({
            "local_cpu": false,
            "max_local_cpu_size": 0,
            "max_local_disk_size": 0,
            "enable_pd": true,
            "transfer_channel": "nixl",
            "pd_role": "sender",
            "pd_proxy_host": site.address,
            "pd_proxy_port": first,
            "pd_buffer_size": 1u64 << 30,
            "pd_buffer_device": "cuda",
            "nixl_backends": ["UCX"],
        }),
        EngineRole::Decode => serde_json::json!({
            "local_cpu": false,
            "max_local_cpu_size": 0,
            "enable_pd": true,
            "transfer_channel": "nixl",
            "pd_role": "receiver",
            "pd_peer_host": site.address,
            "pd_peer_init_port": (first..first + plan.tp).collect::<Vec<u16>>(),
            "pd_peer_alloc_port": (first + plan.tp..first + 2 * plan.tp).collect::<Vec<u16>>(),
            "pd_buffer_size": 2u64 << 30,
            "pd_buffer_device": "cuda",
            "nixl_backends": ["UCX"],
        }),
    };
    serde_yaml::to_string(&value).unwrap_or_default()
}

/// `--ucx-env KEY=VALUE` entries, checked: `UCX_` names (upper-case letters, digits, `_`),
/// at most [`MAX_UCX_ENV`] of them, no name twice, names of at most [`MAX_UCX_NAME`] bytes
/// and values of at most [`MAX_UCX_VALUE`] printable ASCII bytes.
pub fn parse_ucx_env(entries: &[String]) -> Result<Vec<(String, String)>, String> {
    let entries: Vec<&str> = entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()).collect();
    if entries.len() > MAX_UCX_ENV {
        return Err(format!("{} variables; at most {MAX_UCX_ENV}", entries.len()));
    }
    let mut out: Vec<(String, String)> = Vec::new();
    for e in entries {
        let Some((k, v)) = e.split_once('=') else { return Err(format!("{e:?} is not KEY=VALUE")) };
        let name_ok = k.len() > "UCX_".len()
            && k.starts_with("UCX_")
            && k.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if !name_ok {
            return Err(format!("{k:?} is not a UCX_* variable name (upper-case letters, digits and _)"));
        }
        if k.len() > MAX_UCX_NAME {
            return Err(format!("{k:?} is longer than {MAX_UCX_NAME} bytes"));
        }
        if v.len() > MAX_UCX_VALUE || !v.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(format!("{k}: the value must be at most {MAX_UCX_VALUE} printable ASCII bytes"));
        }
        if out.iter().any(|(o, _)| o == k) {
            return Err(format!("{k} is given twice"));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
#[path = "kv_transfer_tests.rs"]
mod tests;
