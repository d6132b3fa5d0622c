//! The non-inference endpoints: `/health`, `/version`, `/metrics`, `/v1/models`, LoRA
//! loading and unloading (vLLM's plain-text success replies), and `/sim/faults`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::sync::oneshot;

use super::errors::ApiError;
use super::inference::parse_body;
use super::types::LoraRequest;
use super::{unix_now, AppState};
use crate::engine::Command;
use crate::faults::FaultPatch;
use crate::lora::{LoraError, LoraRef};

/// `GET /health`: 200 with an empty body while the engine runs.
pub async fn health(State(st): State<AppState>) -> Response {
    if st.engine.is_closed() {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    StatusCode::OK.into_response()
}

/// `GET /version`.
pub async fn version() -> Response {
    axum::Json(json!({"version": concat!("flotilla-sim-", env!("CARGO_PKG_VERSION"))})).into_response()
}

/// `GET /metrics`.
pub async fn metrics(State(st): State<AppState>) -> Response {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let text = st.metrics.lock().unwrap_or_else(|p| p.into_inner()).render(now);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

fn permission(created: u64, salt: u64) -> serde_json::Value {
    json!([{
        "id": format!("modelperm-{:016x}", crate::text::mix(salt)), "object": "model_permission",
        "created": created, "allow_create_engine": false, "allow_sampling": true, "allow_logprobs": true,
        "allow_search_indices": false, "allow_view": true, "allow_fine_tuning": false,
        "organization": "*", "group": null, "is_blocking": false,
    }])
}

/// `GET /v1/models`: the base model, then loaded adapters with `parent` set.
pub async fn models(State(st): State<AppState>) -> Response {
    let created = unix_now();
    let mut data = vec![json!({
        "id": st.cfg.model, "object": "model", "created": created, "owned_by": "vllm",
        "root": st.cfg.model, "parent": null, "max_model_len": st.cfg.max_model_len,
        "permission": permission(created, 0),
    })];
    for a in st.lora.list() {
        data.push(json!({
            "id": a.name, "object": "model", "created": created, "owned_by": "vllm",
            "root": a.path, "parent": st.cfg.model, "max_model_len": null,
            "permission": permission(created, u64::from(a.id)),
        }));
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

fn lora_error(e: LoraError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    ApiError::with_status(status, e.to_string(), None).typed(e.error_type()).into_response()
}

/// `POST /v1/load_lora_adapter`: checks the request, has the engine load the adapter (which
/// takes the load's simulated time and holds the engine's step loop meanwhile, as vLLM's
/// `add_lora` does), then registers the name and answers.
pub async fn load_lora(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let req: LoraRequest = match parse_body(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let inplace = req.load_inplace.unwrap_or(false);
    let a = match st.lora.prepare(&req.lora_name, req.lora_path.as_deref().unwrap_or(""), inplace) {
        Ok(a) => a,
        Err(e) => return lora_error(e),
    };
    // Finish the load even if the client goes away, as vLLM does, so the name is never
    // left reserved.
    let task = tokio::spawn(async move {
        let (done, loaded) = oneshot::channel();
        let lora = LoraRef { id: a.id, rank: a.rank };
        if st.engine.send(Command::LoadLora { lora, inplace, done }).is_err() || loaded.await.is_err() {
            st.lora.abandon(&a.name);
            return None;
        }
        tracing::info!(adapter = %a.name, rank = a.rank, path = %a.path, inplace, "lora adapter loaded");
        let name = a.name.clone();
        st.lora.commit(a);
        Some(name)
    });
    match task.await {
        Ok(Some(name)) => format!("Success: LoRA adapter '{name}' added successfully.").into_response(),
        _ => {
            ApiError::with_status(StatusCode::SERVICE_UNAVAILABLE, "the engine is shutting down", None).into_response()
        }
    }
}

/// `POST /v1/unload_lora_adapter`.
pub async fn unload_lora(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let req: LoraRequest = match parse_body(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match st.lora.unload(&req.lora_name) {
        Ok(()) => {
            tracing::info!(adapter = %req.lora_name, "lora adapter unloaded");
            format!("Success: LoRA adapter '{}' removed successfully.", req.lora_name).into_response()
        }
        Err(e) => lora_error(e),
    }
}

fn faults_disabled() -> Response {
    ApiError::with_status(
        StatusCode::FORBIDDEN,
        "fault injection is disabled; start the simulator with --allow-faults",
        None,
    )
    .into_response()
}

/// `GET /sim/faults`.
pub async fn get_faults(State(st): State<AppState>) -> Response {
    if !st.cfg.allow_faults {
        return faults_disabled();
    }
    axum::Json(st.faults.spec()).into_response()
}

/// `POST /sim/faults` with a [`FaultPatch`].
pub async fn post_faults(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    if !st.cfg.allow_faults {
        return faults_disabled();
    }
    let patch: FaultPatch = match parse_body(body) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    match st.faults.apply(&patch) {
        Ok(spec) => axum::Json(spec).into_response(),
        Err(msg) => ApiError::bad_request(msg, None).into_response(),
    }
}

/// `DELETE /sim/faults`: clears every fault.
pub async fn clear_faults(State(st): State<AppState>) -> Response {
    if !st.cfg.allow_faults {
        return faults_disabled();
    }
    match st.faults.apply(&FaultPatch { reset: Some(true), ..FaultPatch::default() }) {
        Ok(spec) => axum::Json(spec).into_response(),
        Err(msg) => ApiError::bad_request(msg, None).into_response(),
    }
}

/// `GET /kv_event_sources`: the KV event publisher's endpoints per data-parallel rank, as
/// vLLM answers it (`{"0": {...}}`; `{}` when events are off).
pub async fn kv_event_sources(State(st): State<AppState>) -> Response {
    let body = match &st.kv_event_sources {
        Some(c) => serde_json::json!({ "0": c }),
        None => serde_json::json!({}),
    };
    axum::Json(body).into_response()
}
