//! The HTTP surface of `vllm serve`: the router, the shared state handlers see, the
//! fault-injection layer (hang, error rate), the API key check ([`auth`]) and the 404
//! fallback.
//!
//! ```text
//! request -> fault layer (hang / 5xx) -> api key (401) -> startup (503 while loading or the gang is not formed) -> body limit -> route -> handler -> engine channel
//! ```

pub mod admin;
pub mod auth;
pub mod errors;
pub mod inference;
pub mod serve;
pub mod stream;
pub mod types;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::mpsc;

use crate::config::EngineConfig;
use crate::engine::Command;
use crate::faults::Faults;
use crate::lora::Registry;
use crate::metrics::Metrics;

/// `system_fingerprint` of every response.
pub const FINGERPRINT: &str = concat!("flotilla-sim-", env!("CARGO_PKG_VERSION"));

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// Validated configuration.
    pub cfg: Arc<EngineConfig>,
    /// The engine task's inbox.
    pub engine: mpsc::UnboundedSender<Command>,
    /// Metrics written by the engine.
    pub metrics: Arc<Mutex<Metrics>>,
    /// Loaded adapters.
    pub lora: Arc<Registry>,
    /// Fault switches.
    pub faults: Arc<Faults>,
    /// Request id counter.
    pub ids: Arc<AtomicU64>,
    /// Makes response ids differ between servers.
    pub id_salt: u64,
    /// Until this instant the engine is "loading weights" (--startup-seconds): /health and
    /// the inference endpoints answer 503.
    pub ready_at: tokio::time::Instant,
    /// Token id → text, for `/detokenize` and `token_strs`.
    pub vocab: Arc<crate::vocab::Vocabulary>,
    /// A gang head's view of its gang: /health and the inference endpoints answer 503
    /// unless it is formed (None: no gang).
    pub gang: Option<tokio::sync::watch::Receiver<crate::rendezvous::GangState>>,
    /// The KV event publisher's bound endpoints (`GET /kv_event_sources`); None: off.
    pub kv_event_sources: Option<crate::kv_publisher::KvEventsConfig>,
    /// The P/D side channel's bound port (named in `kv_transfer_params`); None: no connector.
    pub side_channel_port: Option<u16>,
}

impl AppState {
    /// A fresh request id.
    pub fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }
}

/// Seconds since the Unix epoch (for `created` fields).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Paths that answer before the engine finished starting, or while a gang is forming or
/// lost (the rest get 503 then).
const SERVED_WHILE_STARTING: [&str; 3] = ["/metrics", "/version", "/sim/faults"];

async fn startup_layer(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let gang_down = st.gang.as_ref().and_then(|g| g.borrow().unavailable());
    if let Some(why) = gang_down {
        if !SERVED_WHILE_STARTING.contains(&req.uri().path()) {
            return errors::ApiError::with_status(StatusCode::SERVICE_UNAVAILABLE, why, None).into_response();
        }
    }
    if tokio::time::Instant::now() < st.ready_at && !SERVED_WHILE_STARTING.contains(&req.uri().path()) {
        return errors::ApiError::with_status(
            StatusCode::SERVICE_UNAVAILABLE,
            "the engine is starting (loading model weights)",
            None,
        )
        .into_response();
    }
    next.run(req).await
}

async fn fault_layer(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if st.cfg.allow_faults && req.uri().path() != "/sim/faults" {
        if st.faults.hang() {
            tracing::debug!(path = %req.uri().path(), "hang fault: request will never be answered");
            std::future::pending::<()>().await;
        }
        let inference = matches!(req.uri().path(), "/v1/completions" | "/v1/chat/completions");
        if inference && st.faults.should_fail() {
            return errors::ApiError::with_status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "simulated engine error (fault injection)",
                None,
            )
            .into_response();
        }
    }
    next.run(req).await
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, axum::Json(serde_json::json!({"detail": "Not Found"}))).into_response()
}

/// The router over `state`.
pub fn router(state: AppState) -> Router {
    let limit = state.cfg.max_body_bytes;
    Router::new()
        .route("/v1/completions", post(inference::completions))
        .route("/v1/chat/completions", post(inference::chat))
        .route("/tokenize", post(inference::tokenize))
        .route("/detokenize", post(inference::detokenize))
        .route("/v1/models", get(admin::models))
        .route("/health", get(admin::health))
        .route("/version", get(admin::version))
        .route("/metrics", get(admin::metrics))
        .route("/kv_event_sources", get(admin::kv_event_sources))
        .route("/v1/load_lora_adapter", post(admin::load_lora))
        .route("/v1/unload_lora_adapter", post(admin::unload_lora))
        .route("/sim/faults", get(admin::get_faults).post(admin::post_faults).delete(admin::clear_faults))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), startup_layer))
        .layer(middleware::from_fn_with_state(state.clone(), auth::layer))
        .layer(middleware::from_fn_with_state(state.clone(), fault_layer))
        .with_state(state)
}
