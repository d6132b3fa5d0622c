//! Prefill/decode disaggregation: a request for a disaggregated model (`spec.disaggregation`)
//! is prefilled on its `<name>-prefill` member and decoded on its `<name>-decode` member,
//! with the protocol of vLLM's P/D examples (`toy_proxy_server.py`, NixlConnector):
//!
//! ```text
//!  client ──> gateway: decode endpoint leased like any request (queue, limits, routing)
//!             decider: prompt short, or the decode engine caches most of it ─> decode only
//!             prefill leg: body + kv_transfer_params {do_remote_decode: true}, stream false,
//!                          max_tokens 1 ─> a prefill engine (its own routing) ─> JSON answer
//!                          with kv_transfer_params {remote_engine_id, remote_block_ids,
//!                          remote_host, remote_port, ...}
//!             decode leg:  the client's body + those kv_transfer_params ─> the decode engine,
//!                          which pulls the blocks and streams to the client
//! ```
//!
//! Failures before the first byte never reach the client: a failed prefill is tried on
//! another prefill engine and, when none answers, the decode engine computes the prompt
//! itself (`split="fallback"`); a decode that fails before its first byte is retried on
//! another decode engine with a fresh prefill (its blocks may have been pulled already).
//! Blocks a prefill engine holds for a request that never decodes are freed by the engine's
//! own lease (vLLM's `kv_lease_duration`, 30 s).
//!
//! Demand (arrivals, requests in flight, completions) is reported for each member: the decode
//! member's as any request's; the prefill member's for every request the decider sends to it
//! — its TTFT is the prefill leg's time, a failed leg an error — also when
//! no prefill endpoint is up — a prefill pool scaled to zero wakes from the requests that fell
//! back while it slept. Requests held for a service at zero count as held for both members
//! (`held_by_service`): the service wakes whole.
//!
//! Member engines serve the disaggregated model's name (the agent starts them with it), so
//! the body's `model` goes through unchanged.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use flotilla_api::spec::{EngineRole, PdDecider};
use http::HeaderMap;
use http_body_util::BodyExt as _;
use serde_json::value::RawValue;
use tokio::time::Instant;

use crate::admission::{select, Lease, PickCtx};
use crate::error::ApiError;
use crate::metrics::{ModelLabels, PdLabels};
use crate::names::{ModelName, ServedName};
use crate::proxy::{forward, Upstream};
use crate::request::ApiKind;
use crate::state::Gateway;
use crate::table::EndpointId;

/// Most bytes of a prefill engine's answer read (one token and the transfer parameters).
const MAX_PREFILL_ANSWER: usize = 1 << 20;

/// A disaggregated model's pools: the member models that serve each role.
#[derive(Debug, Clone)]
pub struct PdRoute {
    /// The disaggregated model's name (metrics).
    pub model: String,
    pub prefill: ServedName,
    pub decode: ServedName,
    pub decider: PdDecider,
}

impl Gateway {
    /// The pools of `name` when it names a disaggregated Model (or a `--pd` model).
    pub fn pd_route(&self, name: &str) -> Option<PdRoute> {
        let decider = match self.cfg.pd.iter().find(|(m, _)| m.as_str() == name) {
            Some((_, d)) => *d,
            None => self.dir.model(name)?.pd?,
        };
        let parent: flotilla_api::ObjectName = name.parse().ok()?;
        let member = |role| flotilla_api::spec::member_name(&parent, role).ok().map(|n| ServedName::from(n.as_str()));
        Some(PdRoute {
            model: name.to_owned(),
            prefill: member(EngineRole::Prefill)?,
            decode: member(EngineRole::Decode)?,
            decider,
        })
    }

    /// The disaggregated models `/v1/models` lists: those whose decode member has an
    /// endpoint in `set` (the name is served as soon as its answers can be streamed).
    pub fn pd_models(&self, set: &crate::table::EndpointSet) -> Vec<String> {
        let cluster = self.dir.models();
        let names = self
            .cfg
            .pd
            .iter()
            .map(|(m, _)| m.as_str())
            .chain(cluster.iter().filter(|(_, info)| info.pd.is_some()).map(|(m, _)| m.as_str()));
        let mut out: Vec<String> = names
            .filter(|m| {
                self.pd_route(m).is_some_and(|r| set.by_model.get(r.decode.as_str()).is_some_and(|e| !e.is_empty()))
            })
            .map(str::to_owned)
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Held requests by model as the demand report sends them: a disaggregated service's
    /// requests are held for its decode member (it streams the answers), and are counted
    /// for its prefill member too, so a service scaled to zero wakes whole — both pools at
    /// once, each `held > 0` waking its autoscaler — instead of decode first and prefill
    /// only later, from the requests that fell back to decode-only meanwhile.
    pub fn held_by_service(&self, mut held: HashMap<ModelName, u32>) -> HashMap<ModelName, u32> {
        let prefill: Vec<(ModelName, u32)> = held
            .iter()
            .filter_map(|(model, &n)| {
                let parent = flotilla_api::spec::served_name(model.as_str(), Some(EngineRole::Decode));
                let route = self.pd_route(parent).filter(|r| r.decode.as_str() == model.as_str())?;
                Some((route.prefill.as_model(), n))
            })
            .collect();
        for (model, n) in prefill {
            *held.entry(model).or_default() += n;
        }
        held
    }

    /// Requests in flight on the least busy endpoint of `model` (None: it has none).
    fn least_in_flight(&self, model: &ServedName) -> Option<u32> {
        let set = self.dir.endpoints();
        let eps = set.resolve(model.as_str())?.endpoints;
        eps.iter().map(|e| self.book.get(&e.id).in_flight.load(std::sync::atomic::Ordering::Relaxed)).min()
    }
}

/// Where a request's prompt is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// On a prefill engine, its KV then pulled by the decode engine.
    Remote,
    /// On the decode engine: the prompt is too short for a transfer to pay.
    LocalShort,
    /// On the decode engine: it already caches most of the prompt.
    LocalCached,
    /// On the decode engine: every prefill engine is busy (`max_prefill_queue`).
    LocalBusy,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Remote => "remote",
            Split::LocalShort => "local-short",
            Split::LocalCached => "local-cached",
            Split::LocalBusy => "local-busy",
        }
    }
}

/// The decider (pure): `prompt` tokens, of which `cached` the chosen decode engine is known
/// to hold (0 when unknown); `prefill_queue`: requests in flight on the least busy prefill
/// engine (None: the pool has no endpoint).
pub fn decide(prompt: u64, cached: u64, prefill_queue: Option<u32>, d: &PdDecider) -> Split {
    if prompt < u64::from(d.min_remote_prefill_tokens) {
        Split::LocalShort
    } else if prompt > 0 && cached as f64 >= d.skip_when_cached * prompt as f64 {
        Split::LocalCached
    } else if d.max_prefill_queue > 0 && prefill_queue.is_some_and(|q| q >= d.max_prefill_queue) {
        Split::LocalBusy
    } else {
        Split::Remote
    }
}

type Raw = serde_json::Map<String, serde_json::Value>;

fn top_level(body: &[u8]) -> Option<std::collections::BTreeMap<String, Box<RawValue>>> {
    serde_json::from_slice(body).ok()
}

fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned()).expect("a JSON literal")
}

/// The prefill leg's body (pure): the client's, asking for the KV to be kept for a remote
/// decode, one token, no stream — as vLLM's `toy_proxy_server.py` sends it. Values other
/// than those rewritten stay the client's raw JSON text. None: not a JSON object.
pub fn prefill_body(body: &[u8]) -> Option<Vec<u8>> {
    let mut top = top_level(body)?;
    top.insert(
        "kv_transfer_params".into(),
        raw(r#"{"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,"remote_block_ids":null,"remote_host":null,"remote_port":null}"#),
    );
    top.insert("stream".into(), raw("false"));
    top.remove("stream_options");
    top.remove("min_tokens");
    top.insert("max_tokens".into(), raw("1"));
    if top.contains_key("max_completion_tokens") {
        top.insert("max_completion_tokens".into(), raw("1"));
    }
    serde_json::to_vec(&top).ok()
}

/// The decode leg's body (pure): the client's with the prefill engine's `params`.
pub fn decode_body(body: &[u8], params: &RawValue) -> Option<Vec<u8>> {
    let mut top = top_level(body)?;
    top.insert("kv_transfer_params".into(), params.to_owned());
    serde_json::to_vec(&top).ok()
}

/// The `kv_transfer_params` of a prefill engine's JSON answer, when it holds blocks for a
/// remote decode (`do_remote_prefill: true`).
pub fn params_of(answer: &[u8]) -> Option<Box<RawValue>> {
    let top = top_level(answer)?;
    let params = top.get("kv_transfer_params")?;
    let parsed: Raw = serde_json::from_str(params.get()).ok()?;
    (parsed.get("do_remote_prefill") == Some(&serde_json::Value::Bool(true))).then(|| params.clone())
}

/// Sends the request through `route`: the decider, the prefill leg, the decode leg on
/// `lease` (the decode endpoint), and the retries before the first byte.
pub async fn forward_pd(
    gw: &Arc<Gateway>,
    ctx: &PickCtx,
    route: &PdRoute,
    mut lease: Lease,
    kind: ApiKind,
    body: Bytes,
    headers: &HeaderMap,
) -> Result<Upstream, ApiError> {
    let f = &ctx.features;
    let prompt = f.tokens.as_ref().map_or_else(|| f.prompt_tokens_estimate(), |t| t.len() as u64);
    let mut tried: Vec<EndpointId> = Vec::new();
    // prefill engines that failed, or whose blocks a decode engine could not use
    let mut avoid_prefill: Vec<EndpointId> = Vec::new();
    let mut dead: Vec<EndpointId> = Vec::new();
    let model = ModelLabels { model: route.model.clone() };
    for attempt in 0.. {
        // what the decode engine holds is known from the KV index only (kv-aware, token ids)
        let cached = lease.predicted_cached();
        let queue = (route.decider.max_prefill_queue > 0).then(|| gw.least_in_flight(&route.prefill)).flatten();
        let split = decide(prompt, cached, queue, &route.decider);
        let prefilled = match split {
            Split::Remote => prefill_leg(gw, ctx, route, kind, &body, headers, &mut avoid_prefill).await,
            _ => None,
        };
        let (params, prefilled_on) = prefilled.unzip();
        if attempt == 0 {
            let split = match (split, &params) {
                (Split::Remote, None) => "fallback",
                (s, _) => s.as_str(),
            };
            gw.metrics.pd_requests.get_or_create(&PdLabels { model: route.model.clone(), split: split.into() }).inc();
        }
        let leg = match params.as_deref().and_then(|p| decode_body(&body, p)) {
            Some(b) => Bytes::from(b),
            None => body.clone(),
        };
        let id = lease.endpoint.id.clone();
        let last = attempt >= gw.cfg.max_retries;
        match forward(gw, ctx, lease, kind, leg, headers, 0).await {
            Ok(up) if last || !up.response.status().is_server_error() => return Ok(up),
            Err(e) if last => return Err(e),
            // the engine answered 5xx: perhaps only for want of its blocks (an expired lease):
            // the next attempt prefills elsewhere if it can
            Ok(_) => {
                tried.push(id.clone());
                avoid_prefill.extend(prefilled_on);
            }
            // unreachable, or its connection broke: not tried again for this request
            Err(_) => dead.push(id.clone()),
        }
        gw.metrics.pd_decode_retries.get_or_create(&model).inc();
        tracing::debug!(endpoint = %id, "decode failed before its first byte; again with a fresh prefill");
        // another decode engine if there is one, else one that answered 5xx again: a decode
        // that failed for want of its blocks (an expired lease, a dead prefill engine) is no
        // fault of the decode engine, and the fresh prefill brings new ones
        let avoid: Vec<EndpointId> = dead.iter().chain(&tried).cloned().collect();
        lease = select(gw, ctx, &avoid, false).or_else(|| select(gw, ctx, &dead, false)).ok_or_else(|| {
            ApiError::bad_gateway(format!(
                "decode engine {id} failed and no other decode endpoint of {:?} is available",
                route.model
            ))
        })?;
    }
    unreachable!("the loop returns on its last attempt")
}

/// The prefill leg: the transfer parameters of the first prefill engine that answers with
/// them, None when none does (the decode engine then computes the prompt).
async fn prefill_leg(
    gw: &Arc<Gateway>,
    ctx: &PickCtx,
    route: &PdRoute,
    kind: ApiKind,
    body: &[u8],
    headers: &HeaderMap,
    avoid: &mut Vec<EndpointId>,
) -> Option<(Box<RawValue>, EndpointId)> {
    let leg = Bytes::from(prefill_body(body)?);
    // The prefill member's demand, counted before an endpoint is sought: a pool scaled to
    // zero is woken by the requests it misses (they are decoded alone meanwhile).
    let member = route.prefill.as_model();
    gw.demand.arrival(&member);
    let _in_flight = gw.demand.gauge(&member, crate::demand::GaugeKind::InFlight);
    let pctx = PickCtx {
        model: route.prefill.clone(),
        features: ctx.features.clone(),
        strategy: gw.routing_of(route.prefill.as_str()),
        class: ctx.class,
        tenant: ctx.tenant.clone(),
        split: None,
        span: ctx.span.clone(),
    };
    let model = ModelLabels { model: route.model.clone() };
    let mut tried: Vec<EndpointId> = Vec::new();
    for _ in 0..=gw.cfg.max_retries {
        // engines that failed this request before come last (`avoid` holds this leg's
        // failures too, `tried` only them: those are never asked again)
        let lease = select(gw, &pctx, avoid, true).or_else(|| select(gw, &pctx, &tried, true))?;
        let (id, revision) = (lease.endpoint.id.clone(), lease.endpoint.revision);
        let t = Instant::now();
        // the prefill leg's time is the prefill member's TTFT (its SLO autoscaling, canaries)
        let finished = |ttft: Option<std::time::Duration>| crate::demand::Finished {
            ttft,
            tpot: None,
            queue_wait: std::time::Duration::ZERO,
            revision,
            error: ttft.is_none(),
        };
        if let Ok(up) = forward(gw, &pctx, lease, kind, leg.clone(), headers, 0).await {
            if up.response.status().is_success() {
                let answer = http_body_util::Limited::new(up.response.into_body(), MAX_PREFILL_ANSWER);
                let read = tokio::time::timeout(gw.cfg.upstream_timeout, answer.collect()).await;
                if let Some(p) = read.ok().and_then(Result::ok).and_then(|b| params_of(&b.to_bytes())) {
                    gw.metrics.pd_prefill_seconds.get_or_create(&model).observe(t.elapsed().as_secs_f64());
                    gw.demand.finished(&member, finished(Some(t.elapsed())));
                    return Some((p, id));
                }
            }
        }
        gw.demand.finished(&member, finished(None));
        gw.metrics.pd_prefill_failures.get_or_create(&model).inc();
        tracing::debug!(endpoint = %id, "prefill failed; another prefill engine or the decode engine alone");
        avoid.push(id.clone());
        tried.push(id);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(b: &[u8]) -> serde_json::Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn the_decider_keeps_short_and_cached_prompts_on_the_decode_engine() {
        let d = PdDecider { min_remote_prefill_tokens: 256, skip_when_cached: 0.8, max_prefill_queue: 0 };
        assert_eq!(decide(100, 0, None, &d), Split::LocalShort);
        assert_eq!(decide(4000, 0, None, &d), Split::Remote);
        assert_eq!(decide(4000, 3199, Some(50), &d), Split::Remote, "no queue bound");
        assert_eq!(decide(4000, 3200, None, &d), Split::LocalCached);
        let always = PdDecider { min_remote_prefill_tokens: 0, skip_when_cached: 1.0, max_prefill_queue: 0 };
        assert_eq!(decide(1, 0, None, &always), Split::Remote);
        assert_eq!(decide(10, 10, None, &always), Split::LocalCached, "all cached: nothing to transfer");
        let bounded = PdDecider { max_prefill_queue: 3, ..d };
        assert_eq!(decide(4000, 0, Some(2), &bounded), Split::Remote);
        assert_eq!(decide(4000, 0, Some(3), &bounded), Split::LocalBusy, "every prefill engine has 3 in flight");
        assert_eq!(decide(4000, 0, None, &bounded), Split::Remote, "no prefill endpoint: the leg wakes the pool");
    }

    #[test]
    fn the_prefill_leg_asks_for_one_token_kept_for_a_remote_decode() {
        let client = br#"{"model":"llama","prompt":"hi","stream":true,"stream_options":{"include_usage":true},"max_tokens":200,"max_completion_tokens":200,"min_tokens":5}"#;
        let leg = prefill_body(client).unwrap();
        let v = json(&leg);
        assert_eq!(v["kv_transfer_params"]["do_remote_decode"], true);
        assert_eq!(v["kv_transfer_params"]["do_remote_prefill"], false);
        assert!(v["kv_transfer_params"]["remote_host"].is_null());
        assert_eq!((v["stream"].clone(), v["max_tokens"].clone()), (false.into(), 1.into()));
        assert_eq!(v["max_completion_tokens"], 1);
        assert!(v.get("stream_options").is_none() && v.get("min_tokens").is_none());
        assert_eq!((v["model"].as_str(), v["prompt"].as_str()), (Some("llama"), Some("hi")));
        // the client's raw values travel as written (1e999 is no f64: a Value would refuse it)
        let odd = prefill_body(br#"{"model":"m","prompt":"p","temperature":1e999}"#).unwrap();
        assert!(String::from_utf8_lossy(&odd).contains(r#""temperature":1e999"#));
        assert!(prefill_body(b"[1]").is_none() && prefill_body(b"not json").is_none());
        let chat = json(&prefill_body(br#"{"model":"m","messages":[]}"#).unwrap());
        assert!(chat.get("max_completion_tokens").is_none(), "not added when the client did not send it");
    }

    #[test]
    fn transfer_params_go_from_the_prefill_answer_to_the_decode_leg() {
        let answer = br#"{"id":"cmpl-1","choices":[{"text":"x"}],"kv_transfer_params":{"do_remote_prefill":true,"do_remote_decode":false,"remote_block_ids":[1,2,3],"remote_engine_id":"e1","remote_request_id":"r1","remote_host":"10.0.0.5","remote_port":5600,"tp_size":1}}"#;
        let params = params_of(answer).unwrap();
        let client = br#"{"model":"llama","prompt":"hi","stream":true,"max_tokens":200}"#;
        let v = json(&decode_body(client, &params).unwrap());
        assert_eq!(v["kv_transfer_params"]["remote_block_ids"], serde_json::json!([1, 2, 3]));
        assert_eq!(v["kv_transfer_params"]["remote_port"], 5600);
        assert_eq!((v["stream"].clone(), v["max_tokens"].clone()), (true.into(), 200.into()), "the client's own");
        // an engine that is no P/D producer, or a broken answer, gives nothing to pass on
        assert!(params_of(br#"{"choices":[]}"#).is_none());
        assert!(params_of(br#"{"kv_transfer_params":{"do_remote_prefill":false}}"#).is_none());
        assert!(params_of(br#"{"kv_transfer_params":null}"#).is_none());
        assert!(params_of(b"garbage").is_none());
    }
}
