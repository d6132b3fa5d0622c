//! The control-plane feed: `FleetService.WatchEndpoints` (full snapshots of ready
//! endpoints, leader only: a follower's `cluster.not_leader: leader=ADDR` is followed, any
//! other failure moves to the next server) and `ObjectService.List`+`Watch` of `Model`
//! (routing strategy, `status.desired_replicas`), `Tenant` and `Adapter` (base model,
//! phase) objects, resumed after
//! the last revision seen.
//! Static stability: on any failure the last known table stays in force; nothing here
//! ever clears it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_api::pb;
use flotilla_api::spec::{RoutingStrategy, TenantSpec};
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint as TonicEndpoint};

use crate::lora::{adapter_info, AdapterInfo};
use crate::names::{AdapterName, ModelName};
use crate::state::Gateway;
use crate::table::{endpoint_of, EndpointSet, ModelInfo, Tenant, Tenants};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

pub(crate) fn uri(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

pub(crate) async fn connect(
    addr: &str,
    tls: Option<&std::sync::Arc<flotilla_security::Tls>>,
) -> Result<Channel, String> {
    let ep = TonicEndpoint::from_shared(uri(&flotilla_api::dial::dial_address(addr)))
        .map_err(|e| format!("bad server address {addr:?}: {e}"))?;
    // HTTP/2 pings find a server that stopped answering (paused, partitioned) within
    // 0.75 s; meanwhile the gateway keeps routing on its last table.
    let ep = ep
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(flotilla_api::dial::LEADER_PING_INTERVAL)
        .keep_alive_timeout(flotilla_api::dial::LEADER_PING_TIMEOUT)
        .keep_alive_while_idle(true);
    flotilla_security::connect::connect(ep, tls, addr).await.map_err(|e| {
        let why = std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| format!("{e}: {s}"));
        format!("connect {addr}: {why}")
    })
}

/// The leader named in a `cluster.not_leader: leader=ADDR` status, if any.
pub fn leader_hint(status: &tonic::Status) -> Option<String> {
    if status.code() != tonic::Code::FailedPrecondition {
        return None;
    }
    let m = status.message();
    let i = m.find("leader=")?;
    let addr = m[i + 7..].split(|c: char| c.is_whitespace() || c == ',' || c == ';').next()?;
    (!addr.is_empty() && addr != "unknown" && addr != "none").then(|| addr.to_string())
}

/// Converts a snapshot into the routing table.
pub fn endpoint_set(set: &pb::EndpointSet) -> EndpointSet {
    EndpointSet::from_endpoints(set.endpoints.iter().filter_map(endpoint_of))
}

/// Rotates through the servers, preferring a leader hint.
struct Targets {
    servers: Vec<String>,
    next: usize,
    hint: Option<String>,
}

impl Targets {
    fn pick(&mut self) -> String {
        if let Some(h) = self.hint.take() {
            return h;
        }
        let s = self.servers[self.next % self.servers.len()].clone();
        self.next += 1;
        s
    }
}

/// Follows the endpoint stream forever.
pub async fn watch_endpoints(gw: Arc<Gateway>, servers: Vec<String>) {
    let mut t = Targets { servers, next: 0, hint: None };
    let mut backoff = BACKOFF_MIN;
    loop {
        let addr = t.pick();
        match endpoints_once(&gw, &addr).await {
            Ok(()) => backoff = BACKOFF_MIN,
            Err((status, why)) => {
                if let Some(h) = status.as_ref().and_then(leader_hint) {
                    tracing::info!(server = %addr, leader = %h, "following leader hint");
                    t.hint = Some(h);
                    continue;
                }
                tracing::warn!(server = %addr, error = %why, "endpoint watch failed; keeping the last table");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn endpoints_once(gw: &Gateway, addr: &str) -> Result<(), (Option<tonic::Status>, String)> {
    let ch = connect(addr, gw.cfg.tls.as_ref()).await.map_err(|e| (None, e))?;
    let mut client = pb::fleet_service_client::FleetServiceClient::new(ch);
    let mut stream = client
        .watch_endpoints(pb::WatchEndpointsRequest { model: String::new() })
        .await
        .map_err(|s| (Some(s.clone()), s.to_string()))?
        .into_inner();
    while let Some(msg) = stream.next().await {
        let set = msg.map_err(|s| (Some(s.clone()), s.to_string()))?;
        tracing::debug!(server = %addr, endpoints = set.endpoints.len(), revision = set.store_revision, "endpoint snapshot");
        gw.dir.set_cluster_endpoints(endpoint_set(&set));
    }
    Err((None, "stream ended".into()))
}

/// What the object watch keeps.
#[derive(Default)]
struct Objects {
    models: HashMap<ModelName, ModelInfo>,
    tenants: HashMap<String, Tenant>,
    adapters: HashMap<AdapterName, AdapterInfo>,
}

fn model_routing(spec: &serde_json::Value) -> RoutingStrategy {
    spec.get("routing").cloned().and_then(|r| serde_json::from_value(r).ok()).unwrap_or_default()
}

/// Reads a `Model` object leniently: the spec's routing and the status's
/// `desired_replicas` (written by the leader; None until then or when unreadable).
pub fn model_info(spec_json: &str, status_json: &str) -> ModelInfo {
    let status = serde_json::from_str::<serde_json::Value>(status_json).unwrap_or_default();
    let desired_replicas = status
        .get("desired_replicas")
        .and_then(serde_json::Value::as_u64)
        .map(|d| u32::try_from(d).unwrap_or(u32::MAX));
    let spec = serde_json::from_str::<serde_json::Value>(spec_json).unwrap_or_default();
    ModelInfo {
        routing: model_routing(&spec),
        desired_replicas,
        canary: crate::canary::canary_of(&status),
        sim_engine: spec.get("engine").and_then(serde_json::Value::as_str) == Some("sim"),
        pd: spec
            .get("disaggregation")
            .and_then(|d| serde_json::from_value::<flotilla_api::spec::DisaggregationSpec>(d.clone()).ok())
            .map(|d| d.decider),
        source: spec.get("source").and_then(serde_json::Value::as_str).map(std::sync::Arc::from),
    }
}

impl Objects {
    fn put(&mut self, o: &pb::Object) {
        match o.kind.as_str() {
            "Model" => {
                self.models.insert(ModelName::new(&o.name), model_info(&o.spec_json, &o.status_json));
            }
            "Tenant" => match serde_json::from_str::<TenantSpec>(&o.spec_json) {
                Ok(spec) => {
                    self.tenants.insert(o.name.clone(), Tenant { name: o.name.clone(), spec });
                }
                Err(e) => tracing::warn!(tenant = %o.name, error = %e, "ignoring unreadable tenant spec"),
            },
            "Adapter" => match adapter_info(&o.spec_json, &o.status_json) {
                Some(a) => {
                    self.adapters.insert(AdapterName::new(&o.name), a);
                }
                None => tracing::warn!(adapter = %o.name, "ignoring an adapter spec without base_model"),
            },
            _ => {}
        }
    }
    fn delete(&mut self, o: &pb::Object) {
        match o.kind.as_str() {
            "Model" => {
                self.models.remove(o.name.as_str());
            }
            "Tenant" => {
                self.tenants.remove(&o.name);
            }
            "Adapter" => {
                self.adapters.remove(o.name.as_str());
            }
            _ => {}
        }
    }
    fn publish(&self, gw: &Gateway, kind: &str) {
        match kind {
            "Model" => gw.dir.set_models(self.models.clone()),
            "Adapter" => gw.dir.set_adapters(self.adapters.clone()),
            _ => gw.dir.set_tenants(Tenants::from_tenants(self.tenants.values().cloned())),
        }
    }
}

/// Follows `Model`, `Tenant` or `Adapter` objects forever (one List + Watch per kind).
pub async fn watch_objects(gw: Arc<Gateway>, servers: Vec<String>, kind: &'static str) {
    let mut t = Targets { servers, next: 0, hint: None };
    let mut backoff = BACKOFF_MIN;
    let mut state = Objects::default();
    let mut after: Option<u64> = None;
    loop {
        let addr = t.pick();
        match objects_once(&gw, &addr, kind, &mut state, &mut after).await {
            Ok(()) => backoff = BACKOFF_MIN,
            Err((status, why)) => {
                if let Some(s) = &status {
                    if s.code() == tonic::Code::OutOfRange {
                        after = None; // compacted: list again
                    }
                    if let Some(h) = leader_hint(s) {
                        t.hint = Some(h);
                        continue;
                    }
                }
                tracing::warn!(server = %addr, kind, error = %why, "object watch failed; keeping the last view");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn objects_once(
    gw: &Gateway,
    addr: &str,
    kind: &'static str,
    state: &mut Objects,
    after: &mut Option<u64>,
) -> Result<(), (Option<tonic::Status>, String)> {
    let err = |s: tonic::Status| (Some(s.clone()), s.to_string());
    let ch = connect(addr, gw.cfg.tls.as_ref()).await.map_err(|e| (None, e))?;
    let mut client = pb::object_service_client::ObjectServiceClient::new(ch);
    if after.is_none() {
        let list = client
            .list(pb::ListRequest { kind: kind.into(), label_selector: String::new(), stale: false })
            .await
            .map_err(err)?
            .into_inner();
        *state = Objects::default();
        for o in &list.objects {
            state.put(o);
        }
        state.publish(gw, kind);
        *after = Some(list.store_revision);
    }
    let mut stream = client
        .watch(pb::WatchRequest { kind: kind.into(), after_revision: after.unwrap_or(0) })
        .await
        .map_err(err)?
        .into_inner();
    while let Some(ev) = stream.next().await {
        let ev = ev.map_err(err)?;
        if let Some(o) = &ev.object {
            if ev.r#type == pb::watch_event::Type::Delete as i32 {
                state.delete(o);
            } else {
                state.put(o);
            }
            state.publish(gw, kind);
        }
        *after = Some(ev.revision);
    }
    Err((None, "stream ended".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_hints_are_read_from_not_leader_statuses() {
        let s = tonic::Status::failed_precondition("cluster.not_leader: leader=10.0.0.2:7000");
        assert_eq!(leader_hint(&s).as_deref(), Some("10.0.0.2:7000"));
        assert_eq!(leader_hint(&tonic::Status::failed_precondition("cluster.not_leader: leader=unknown")), None);
        assert_eq!(leader_hint(&tonic::Status::unavailable("leader=x")), None);
    }

    #[test]
    fn model_specs_give_their_routing_and_engine() {
        let m = model_info(r#"{"source":"hf://x","routing":"kv-aware","engine":"sim"}"#, "{}");
        assert_eq!((m.routing, m.sim_engine), (RoutingStrategy::KvAware, true));
        let m = model_info(r#"{"source":"hf://x","engine":"vllm"}"#, "{}");
        assert_eq!((m.routing, m.sim_engine), (RoutingStrategy::Auto, false));
        assert_eq!(model_info("not json", "{}").routing, RoutingStrategy::Auto);
    }

    #[test]
    fn model_statuses_give_their_desired_replicas() {
        let spec = r#"{"source":"hf://x","routing":"round-robin"}"#;
        let m = model_info(spec, r#"{"desired_replicas":0,"ready_replicas":1,"conditions":[]}"#);
        assert_eq!((m.routing, m.desired_replicas), (RoutingStrategy::RoundRobin, Some(0)));
        assert!(m.scaled_to_zero());
        assert_eq!(model_info(spec, r#"{"desired_replicas":3}"#).desired_replicas, Some(3));
        for status in ["{}", "", "null", r#"{"desired_replicas":"x"}"#, r#"{"desired_replicas":-1}"#] {
            let m = model_info(spec, status);
            assert_eq!(m.desired_replicas, None, "{status:?}");
            assert!(!m.scaled_to_zero());
        }
    }
}
