//! Prefill/decode disaggregation as vLLM's KV connectors do it (NixlConnector's pull
//! protocol, vLLM 0.32): the typed `--kv-transfer-config`, a request's `kv_transfer_params`
//! (both directions), and the transfer-time model. The side channel itself is
//! `side_channel.rs`; leases live in the engine, held blocks in the scheduler.
//!
//! ```text
//!  proxy --(do_remote_decode, max_tokens 1)--> P sim: prefill, hold blocks (lease) --> kv_transfer_params
//!  proxy --(do_remote_prefill + remote_*)----> D sim: pull over P's side channel, wait bytes/link,
//!                                                      install as computed KV, decode
//! ```

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::SimError;

/// `kv_lease_duration`'s default in `kv_connector_extra_config` (vLLM's NIXL scheduler).
pub const DEFAULT_LEASE_S: f64 = 30.0;
/// `VLLM_NIXL_SIDE_CHANNEL_PORT`'s default.
pub const DEFAULT_SIDE_CHANNEL_PORT: u16 = 5600;

/// The connectors the sim accepts; all are modelled with the same pull protocol.
pub const CONNECTORS: [&str; 3] = ["NixlConnector", "LMCacheConnectorV1", "P2pNcclConnector"];

/// `kv_role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvRole {
    /// Prefill only: holds KV for others to pull.
    Producer,
    /// Decode only: pulls KV from producers.
    Consumer,
    /// Both.
    Both,
}

impl KvRole {
    /// Honours `do_remote_decode` (holds its KV after a prefill).
    pub fn produces(self) -> bool {
        matches!(self, KvRole::Producer | KvRole::Both)
    }

    /// Honours `do_remote_prefill` (pulls KV before decoding).
    pub fn consumes(self) -> bool {
        matches!(self, KvRole::Consumer | KvRole::Both)
    }
}

/// `kv_load_failure_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadFailurePolicy {
    /// The request fails (vLLM's default): 500 InternalServerError.
    Fail,
    /// The request prefills locally instead.
    Recompute,
}

/// The validated `--kv-transfer-config`.
#[derive(Debug, Clone, PartialEq)]
pub struct KvTransferConfig {
    /// `kv_connector` (one of [`CONNECTORS`]).
    pub connector: String,
    /// `kv_role`.
    pub role: KvRole,
    /// `engine_id`: given, or a random UUID (as vLLM draws one).
    pub engine_id: String,
    /// Simulated seconds a finished prefill's blocks stay held for a pull (`kv_lease_duration`).
    pub lease_s: f64,
    /// `kv_load_failure_policy`.
    pub load_failure_policy: LoadFailurePolicy,
    /// Side channel host (`VLLM_NIXL_SIDE_CHANNEL_HOST`, default `--host`).
    pub side_channel_host: String,
    /// Side channel port (`VLLM_NIXL_SIDE_CHANNEL_PORT`, default 5600; 0 = a free port).
    pub side_channel_port: u16,
    /// Link bandwidth of a transfer in gigabits per second (`--kv-transfer-gbps` or the profile's).
    pub link_gbps: f64,
}

/// vLLM's `KVTransferConfig` fields, all accepted; unknown fields are refused as vLLM's
/// config dataclass refuses them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    kv_connector: Option<String>,
    engine_id: Option<String>,
    #[allow(dead_code)]
    kv_buffer_device: Option<String>,
    kv_role: Option<String>,
    #[allow(dead_code)]
    kv_port: Option<u16>,
    #[serde(default)]
    kv_connector_extra_config: Map<String, Value>,
    #[allow(dead_code)]
    kv_connector_module_path: Option<String>,
    #[allow(dead_code)]
    enable_permute_local_kv: Option<bool>,
    kv_load_failure_policy: Option<String>,
}

const FLAG: &str = "kv-transfer-config";

impl KvTransferConfig {
    /// Parses vLLM's JSON. `Ok(None)` when no connector is named (vLLM then transfers
    /// nothing). Errors name the field at fault.
    pub fn parse(json: &str, side_host: String, side_port: u16, link_gbps: f64) -> Result<Option<Self>, SimError> {
        let raw: Raw = serde_json::from_str(json)
            .map_err(|e| SimError::invalid(FLAG, format!("not a KVTransferConfig JSON object: {e}")))?;
        let role = match raw.kv_role.as_deref() {
            None => None,
            Some("kv_producer") => Some(KvRole::Producer),
            Some("kv_consumer") => Some(KvRole::Consumer),
            Some("kv_both") => Some(KvRole::Both),
            Some(other) => {
                return Err(SimError::invalid(
                    FLAG,
                    format!("kv_role: {other:?} is not one of kv_producer, kv_consumer, kv_both"),
                ))
            }
        };
        let Some(connector) = raw.kv_connector else { return Ok(None) };
        if !CONNECTORS.contains(&connector.as_str()) {
            return Err(SimError::invalid(
                FLAG,
                format!("kv_connector: {connector:?} is not modelled; one of {}", CONNECTORS.join(", ")),
            ));
        }
        let Some(role) = role else {
            return Err(SimError::invalid(FLAG, "kv_role: required when kv_connector is set"));
        };
        let load_failure_policy = match raw.kv_load_failure_policy.as_deref() {
            None | Some("fail") => LoadFailurePolicy::Fail,
            Some("recompute") => LoadFailurePolicy::Recompute,
            Some(other) => {
                return Err(SimError::invalid(
                    FLAG,
                    format!("kv_load_failure_policy: {other:?} is not one of fail, recompute"),
                ))
            }
        };
        let lease_s = match raw.kv_connector_extra_config.get("kv_lease_duration") {
            None => DEFAULT_LEASE_S,
            Some(v) => match v.as_f64() {
                Some(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => s,
                _ => {
                    return Err(SimError::invalid(
                        FLAG,
                        format!("kv_connector_extra_config.kv_lease_duration: must be seconds in (0, 86400], got {v}"),
                    ))
                }
            },
        };
        let engine_id = match raw.engine_id {
            Some(id) if id.trim().is_empty() => return Err(SimError::invalid(FLAG, "engine_id: must not be empty")),
            Some(id) => id,
            None => uuid::Uuid::new_v4().to_string(),
        };
        if !(link_gbps.is_finite() && link_gbps > 0.0) {
            return Err(SimError::invalid("kv-transfer-gbps", format!("must be a positive number, got {link_gbps}")));
        }
        if side_host.trim().is_empty() {
            return Err(SimError::invalid("kv-side-channel-host", "must not be empty"));
        }
        Ok(Some(KvTransferConfig {
            connector,
            role,
            engine_id,
            lease_s,
            load_failure_policy,
            side_channel_host: side_host,
            side_channel_port: side_port,
            link_gbps,
        }))
    }

    /// Simulated seconds to move `tokens` tokens of KV at `kv_bytes_per_token` over the link.
    pub fn transfer_seconds(&self, tokens: u64, kv_bytes_per_token: u64) -> f64 {
        transfer_seconds(tokens * kv_bytes_per_token, self.link_gbps)
    }
}

/// Seconds to move `bytes` over a link of `gbps` gigabits per second (10^9 bit/s).
pub fn transfer_seconds(bytes: u64, gbps: f64) -> f64 {
    bytes as f64 * 8.0 / (gbps * 1e9)
}

/// What a request's `kv_transfer_params` asks of this engine.
#[derive(Debug, Clone, PartialEq)]
pub enum Ask {
    /// `do_remote_decode`: prefill here, hold the KV for a decode engine.
    HoldForDecode,
    /// `do_remote_prefill`: pull the KV from a prefill engine, then decode here.
    Pull(Remote),
    /// Neither (or both false): an ordinary request.
    Nothing,
}

/// The `remote_*` fields of a decode request.
#[derive(Debug, Clone, PartialEq)]
pub struct Remote {
    /// `remote_engine_id`.
    pub engine_id: String,
    /// `remote_request_id`.
    pub request_id: String,
    /// `remote_block_ids`, flattened over KV cache groups.
    pub block_ids: Vec<u32>,
    /// `remote_host`.
    pub host: String,
    /// `remote_port`.
    pub port: u16,
    /// `remote_num_tokens`.
    pub num_tokens: u32,
}

/// Reads a request's `kv_transfer_params` (None or null: [`Ask::Nothing`]). The error
/// names the field, for a 400.
pub fn parse_params(v: Option<&Value>) -> Result<Ask, String> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(Ask::Nothing) };
    let Some(o) = v.as_object() else { return Err("kv_transfer_params must be an object".into()) };
    let flag = |k: &str| o.get(k).and_then(Value::as_bool).unwrap_or(false);
    if flag("do_remote_prefill") {
        let s = |k: &str| {
            o.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| format!("kv_transfer_params.{k} must be a string"))
        };
        let port = o
            .get("remote_port")
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
            .ok_or("kv_transfer_params.remote_port must be a port number")?;
        let num_tokens = o
            .get("remote_num_tokens")
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or("kv_transfer_params.remote_num_tokens must be a token count")?;
        let block_ids = flatten_block_ids(o.get("remote_block_ids"))
            .ok_or("kv_transfer_params.remote_block_ids must be a list of block ids (or of lists of them)")?;
        return Ok(Ask::Pull(Remote {
            engine_id: s("remote_engine_id")?,
            request_id: s("remote_request_id")?,
            block_ids,
            host: s("remote_host")?,
            port,
            num_tokens,
        }));
    }
    if flag("do_remote_decode") {
        return Ok(Ask::HoldForDecode);
    }
    Ok(Ask::Nothing)
}

/// `[1, 2]` or `[[1, 2]]` (vLLM 0.32 sends one list per KV cache group) into `[1, 2]`.
fn flatten_block_ids(v: Option<&Value>) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for item in v?.as_array()? {
        match item {
            Value::Array(group) => {
                for id in group {
                    out.push(u32::try_from(id.as_u64()?).ok()?);
                }
            }
            id => out.push(u32::try_from(id.as_u64()?).ok()?),
        }
    }
    Some(out)
}

/// A finished prefill's held KV, as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldKv {
    /// Block ids holding the request's KV.
    pub block_ids: Vec<u32>,
    /// Computed tokens in them (`remote_num_tokens`).
    pub num_tokens: u32,
}

/// The `kv_transfer_params` of a prefill response, as vLLM's NIXL `request_finished`
/// returns them (one KV cache group: `remote_block_ids` is a list of one list), with the
/// scheduler's `remote_prefill_cached_tokens`: the prompt tokens the prefill engine found in
/// its own prefix cache (`cached_tokens`), which the decode engine reports as its own.
pub fn response_params(
    cfg: &KvTransferConfig,
    port: u16,
    request_id: &str,
    held: &HeldKv,
    cached_tokens: u32,
) -> Value {
    json!({
        "do_remote_prefill": true,
        "do_remote_decode": false,
        "remote_block_ids": [held.block_ids],
        "remote_engine_id": cfg.engine_id,
        "remote_request_id": request_id,
        "remote_host": cfg.side_channel_host,
        "remote_port": port,
        "tp_size": 1,
        "dcp_size": 1,
        "pp_size": 1,
        "remote_num_tokens": held.num_tokens,
        "remote_blocks_expiry_time": null,
        "transfer_mode": "pull",
        "remote_prefill_cached_tokens": cached_tokens,
    })
}

/// The wall time of `sim_s` simulated seconds at `speedup`.
pub fn sim_wall(sim_s: f64, speedup: f64) -> Duration {
    Duration::from_secs_f64((sim_s / speedup).max(0.0))
}

/// Waits `sim_s` simulated seconds at `speedup`.
pub async fn sleep_sim(sim_s: f64, speedup: f64) {
    let wall = sim_wall(sim_s, speedup);
    if !wall.is_zero() {
        tokio::time::sleep(wall).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Option<KvTransferConfig>, SimError> {
        KvTransferConfig::parse(json, "127.0.0.1".into(), 0, 400.0)
    }

    fn reason(json: &str) -> String {
        match parse(json) {
            Err(SimError::InvalidConfig { flag, reason }) => {
                assert_eq!(flag, "kv-transfer-config");
                reason
            }
            other => panic!("expected an error for {json}, got {other:?}"),
        }
    }

    #[test]
    fn vllm_configs_parse_with_defaults() {
        let c = parse(r#"{"kv_connector":"NixlConnector","kv_role":"kv_both"}"#).unwrap().unwrap();
        assert_eq!(c.role, KvRole::Both);
        assert_eq!(c.lease_s, 30.0);
        assert_eq!(c.load_failure_policy, LoadFailurePolicy::Fail);
        assert_eq!(c.engine_id.len(), 36, "a uuid: {}", c.engine_id);
        assert_ne!(
            c.engine_id,
            parse(r#"{"kv_connector":"NixlConnector","kv_role":"kv_both"}"#).unwrap().unwrap().engine_id
        );
        let c = parse(
            r#"{"kv_connector":"P2pNcclConnector","kv_role":"kv_consumer","engine_id":"d0","kv_port":14580,
                "kv_buffer_device":"cuda","kv_connector_extra_config":{"kv_lease_duration":2.5},
                "kv_load_failure_policy":"recompute","enable_permute_local_kv":false}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!((c.role, c.engine_id.as_str(), c.lease_s), (KvRole::Consumer, "d0", 2.5));
        assert_eq!(c.load_failure_policy, LoadFailurePolicy::Recompute);
        assert!(!c.role.produces() && c.role.consumes());
        assert_eq!(parse(r#"{"kv_role":"kv_both"}"#).unwrap(), None, "no connector: nothing transfers");
        assert_eq!(parse("{}").unwrap(), None);
    }

    #[test]
    fn bad_configs_name_the_field() {
        assert!(reason("{not json").contains("not a KVTransferConfig"));
        assert!(reason(r#"{"kv_connector":"NixlConnector"}"#).starts_with("kv_role: required"));
        assert!(reason(r#"{"kv_connector":"NixlConnector","kv_role":"kv_sender"}"#).starts_with("kv_role:"));
        assert!(reason(r#"{"kv_connector":"Mooncake","kv_role":"kv_both"}"#).starts_with("kv_connector:"));
        assert!(reason(r#"{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_load_failure_policy":"retry"}"#)
            .starts_with("kv_load_failure_policy:"));
        assert!(reason(
            r#"{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_connector_extra_config":{"kv_lease_duration":-1}}"#
        )
        .contains("kv_lease_duration"));
        assert!(reason(r#"{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_rolee":1}"#).contains("kv_rolee"));
        let e = KvTransferConfig::parse(r#"{"kv_connector":"NixlConnector","kv_role":"kv_both"}"#, "h".into(), 0, 0.0)
            .unwrap_err();
        assert_eq!((e.exit_code(), e.to_string().contains("--kv-transfer-gbps")), (2, true));
    }

    #[test]
    fn transfer_time_is_bytes_over_link() {
        // 1,000 tokens of Llama-3-8B KV (128 KiB each) over 400 Gb/s: 131 MB * 8 / 400e9 = 2.62 ms
        let t = transfer_seconds(1000 * 131_072, 400.0);
        assert!((t - 0.002_621_44).abs() < 1e-9, "{t}");
        assert!((transfer_seconds(1000 * 131_072, 100.0) - 4.0 * t).abs() < 1e-12);
        assert_eq!(transfer_seconds(0, 400.0), 0.0);
    }

    #[test]
    fn params_parse_both_directions() {
        assert_eq!(parse_params(None), Ok(Ask::Nothing));
        assert_eq!(parse_params(Some(&Value::Null)), Ok(Ask::Nothing));
        assert_eq!(parse_params(Some(&json!({"do_remote_decode": true}))), Ok(Ask::HoldForDecode));
        let c = parse(r#"{"kv_connector":"NixlConnector","kv_role":"kv_both","engine_id":"p0"}"#).unwrap().unwrap();
        let held = HeldKv { block_ids: vec![3, 4], num_tokens: 20 };
        let v = response_params(&c, 5601, "cmpl-1", &held, 16);
        assert_eq!(v["remote_block_ids"], json!([[3, 4]]));
        assert_eq!(v["remote_prefill_cached_tokens"], 16);
        let Ok(Ask::Pull(r)) = parse_params(Some(&v)) else { panic!("{v}") };
        assert_eq!(
            r,
            Remote {
                engine_id: "p0".into(),
                request_id: "cmpl-1".into(),
                block_ids: vec![3, 4],
                host: "127.0.0.1".into(),
                port: 5601,
                num_tokens: 20
            }
        );
        let mut flat = v.clone();
        flat["remote_block_ids"] = json!([3, 4]);
        assert!(matches!(parse_params(Some(&flat)), Ok(Ask::Pull(r)) if r.block_ids == [3, 4]));
        let mut bad = v;
        bad["remote_port"] = json!("x");
        assert!(parse_params(Some(&bad)).unwrap_err().contains("remote_port"));
        assert!(parse_params(Some(&json!([1]))).is_err());
    }
}
