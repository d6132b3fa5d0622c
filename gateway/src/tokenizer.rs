//! vLLM's tokenizer endpoints, `POST /tokenize` and `POST /detokenize`, routed like the
//! inference endpoints — by model, and to an engine holding the adapter for an adapter
//! name — but outside the request path's economy: no QoS queue, no RPM/TPM charge, no
//! autoscaler demand (a tokenize call costs the engine no GPU time). Tools that align
//! prompts to the server's tokenizer call them (`vllm bench serve` does, before a run).
//!
//! ```text
//! layers: auth -> body -> handle: tenant may use the model (403)
//!   -> target: a served name with endpoints, else an adapter's base model (LoRA adapters
//!      share their base model's tokenizer; the body's `model` is rewritten), else 503/404
//!   -> least-request pick (no saturation check) -> forward with retries -> client
//! ```
//! A model scaled to zero answers 503 at once rather than being held: a tokenize call is
//! not demand and does not wake it.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use flotilla_api::spec::{PriorityClass, RoutingStrategy};
use http::HeaderMap;

use crate::admission::{select, PickCtx};
use crate::error::{ApiCode, ApiError};
use crate::layers::{self, Caller, Parsed};
use crate::metrics::TokenizerLabels;
use crate::names::{ModelName, ServedName};
use crate::proxy::{forward, response_head};
use crate::state::Gateway;
use crate::table::EndpointSet;

/// Where a tokenizer request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The endpoints serving this name (a model, or engines holding the adapter); the
    /// body goes unchanged.
    Served(ServedName),
    /// An adapter no endpoint holds: its base model's endpoints, `model` rewritten.
    Base(ModelName),
}

/// Resolves `name` (pure): `adapter_base` is the base model when the name is a known
/// `Adapter`; `synced` whether the gateway has received its endpoint table; `hidden` that
/// the name is an adapter the caller may not use, resolved as a name that does not exist
/// (`ownership`).
pub fn target(
    set: &EndpointSet,
    adapter_base: Option<ModelName>,
    synced: bool,
    hidden: bool,
    name: &str,
) -> Result<Target, ApiError> {
    let adapter_base = adapter_base.filter(|_| !hidden);
    if !hidden && set.resolve(name).is_some_and(|r| !r.endpoints.is_empty()) {
        return Ok(Target::Served(ServedName::from(name)));
    }
    let model = adapter_base.as_ref().map_or(name, ModelName::as_str);
    match (set.by_model.get(model), &adapter_base) {
        (Some(eps), _) if !eps.is_empty() => Ok(Target::Base(adapter_base.unwrap_or_else(|| ModelName::from(name)))),
        // a known model without endpoints, or an adapter whose base model has none
        (Some(_), _) | (None, Some(_)) => {
            Err(ApiError::new(ApiCode::NoEndpoints, format!("model {model:?} has no ready endpoint")).retry_after(5))
        }
        (None, None) if set.is_empty() && !synced => {
            Err(ApiError::new(ApiCode::NoEndpointTable, "the gateway has not received its endpoint table yet")
                .retry_after(1))
        }
        (None, None) => Err(ApiError::model_not_found(name)),
    }
}

/// The body with its `model` replaced.
fn with_model(body: &[u8], model: &str) -> Result<Bytes, ApiError> {
    let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(ApiCode::InvalidJson, format!("request body is not a valid JSON object: {e}")))?;
    v.insert("model".into(), model.into());
    serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(|e| ApiError::new(ApiCode::Internal, format!("cannot rewrite the body: {e}")))
}

/// `POST /tokenize` and `POST /detokenize`.
pub async fn handle(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let ext = req.extensions();
    let (Some(caller), Some(parsed)) = (ext.get::<Caller>().cloned(), ext.get::<Parsed>().cloned()) else {
        return ApiError::new(ApiCode::Internal, "request layers missing").into_response();
    };
    let path = parsed.kind.path();
    let model = parsed.features.model.clone();
    let (label, response) = match route(&gw, &caller, parsed, req.headers()).await {
        Ok(r) => (gw.model_label(&model, None), r),
        Err(e) => {
            // an unknown name is not a label value (bounded labels)
            let label = gw.model_label(&model, Some(e.code));
            gw.metrics.error(&label, e.code.as_str());
            (label, e.into_response())
        }
    };
    gw.metrics
        .tokenizer_requests
        .get_or_create(&TokenizerLabels {
            model: label,
            path: path.to_string(),
            code: response.status().as_u16().to_string(),
        })
        .inc();
    response
}

async fn route(gw: &Arc<Gateway>, caller: &Caller, parsed: Parsed, h: &HeaderMap) -> Result<Response, ApiError> {
    let Parsed { kind, bytes, features } = parsed;
    layers::check_allowed(gw, caller, &features.model)?;
    let adapter_base = gw.dir.adapter(&features.model).map(|a| a.base_model);
    let hidden = !gw.may_use(caller.tenant_name(), &features.model);
    let (name, body) = match target(&gw.dir.endpoints(), adapter_base, gw.dir.synced(), hidden, &features.model)? {
        Target::Served(name) => (name, bytes),
        Target::Base(base) => (ServedName::from(&base), with_model(&bytes, base.as_str())?),
    };
    let ctx = PickCtx {
        model: name,
        features,
        strategy: RoutingStrategy::LeastRequest,
        class: PriorityClass::Standard,
        tenant: caller.name.clone(),
        split: None,
        span: tracing::Span::current(),
    };
    let lease = select(gw, &ctx, &[], false).ok_or_else(|| {
        ApiError::new(ApiCode::NoEndpoints, format!("{:?} has no ready endpoint", ctx.model)).retry_after(5)
    })?;
    let up = forward(gw, &ctx, lease, kind, body, h, gw.cfg.max_retries).await?;
    let head = response_head(&up.response, &up.lease.endpoint.id);
    head.body(Body::new(up.response.into_body()))
        .map_err(|e| ApiError::bad_gateway(format!("cannot build response: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::AdapterName;
    use crate::table::Endpoint;

    fn set() -> EndpointSet {
        let mut a = Endpoint::new("llama", "127.0.0.1:1".parse().unwrap());
        a.adapters = vec![AdapterName::from("sql")];
        let b = Endpoint::new("llama", "127.0.0.1:2".parse().unwrap());
        let mut s = EndpointSet::from_endpoints([a, b]);
        s.by_model.insert(ModelName::from("cold"), Vec::new());
        s
    }

    #[test]
    fn names_resolve_to_their_servers_or_their_base_model() {
        let s = set();
        let base = || Some(ModelName::from("llama"));
        let served = |n: &str| Some(Target::Served(ServedName::from(n)));
        assert_eq!(target(&s, None, true, false, "llama").ok(), served("llama"));
        assert_eq!(target(&s, base(), true, false, "sql").ok(), served("sql"), "a loaded adapter goes to its holder");
        let cold = target(&s, base(), true, false, "chat").ok();
        assert_eq!(cold, Some(Target::Base(ModelName::from("llama"))), "a cold one to its base");
        let code = |r: Result<Target, ApiError>| r.unwrap_err().code;
        assert_eq!(code(target(&s, None, true, false, "cold")), ApiCode::NoEndpoints);
        assert_eq!(code(target(&s, Some(ModelName::from("cold")), true, false, "x")), ApiCode::NoEndpoints);
        assert_eq!(code(target(&s, Some(ModelName::from("gone")), true, false, "x")), ApiCode::NoEndpoints);
        assert_eq!(code(target(&s, None, true, false, "nope")), ApiCode::ModelNotFound);
        assert_eq!(code(target(&EndpointSet::default(), None, false, false, "llama")), ApiCode::NoEndpointTable);
        assert_eq!(code(target(&EndpointSet::default(), None, true, false, "llama")), ApiCode::ModelNotFound);
        // a hidden adapter is a name that does not exist, loaded or not
        assert_eq!(code(target(&s, base(), true, true, "sql")), ApiCode::ModelNotFound);
        assert_eq!(code(target(&s, base(), true, true, "chat")), ApiCode::ModelNotFound);
        assert_eq!(code(target(&EndpointSet::default(), base(), false, true, "sql")), ApiCode::NoEndpointTable);
    }

    #[test]
    fn the_rewrite_changes_only_the_model() {
        let b = with_model(br#"{"model":"chat","prompt":"hi","add_special_tokens":false}"#, "llama").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v, serde_json::json!({"model": "llama", "prompt": "hi", "add_special_tokens": false}));
        assert_eq!(with_model(b"[1]", "x").unwrap_err().code, ApiCode::InvalidJson);
    }
}
