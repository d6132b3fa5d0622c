//! The engine client: health, standardized metrics, models and LoRA adapters of one
//! engine (real vLLM, older vLLM, SGLang or `flotilla sim`), shared by the agent and the
//! gateway so both read an engine the same way.
//!
//! ```text
//!  agent probe ─┐                          ┌─ metrics: Prometheus text -> EngineMetrics (pure)
//!               ├─> EngineClient ─http(s)─> engine /health /metrics /v1/models /v1/*_lora_adapter
//!  gateway  ────┘   (timeout, body cap)    └─ models: /v1/models JSON -> Vec<ModelCard> (pure)
//! ```
//!
//! [`metrics`] holds the name table mapping each engine family's metric names onto
//! [`EngineMetrics`]; [`error`] the one error type with stable `engine.*` codes; [`key`] the
//! engine's API key, which a client made [`EngineClient::with_key`] sends on `/v1` calls;
//! [`pins`] the SHA-256 pins of engines' self-signed certificates and [`tls`] the verifier and
//! connector that dial `https://` engines against them (no CA); [`kv_events`] vLLM's KV cache
//! events (the ZMQ publisher's msgpack batches), decoded and encoded.
#![forbid(unsafe_code)]

pub mod client;
pub mod error;
pub mod key;
pub mod kv_events;
pub mod metrics;
pub mod models;
pub mod pins;
pub mod sim_tokenizer;
pub mod tls;

pub use client::{error_chain, EngineClient, EngineClientConfig, ENGINE_IDLE_REUSE};
pub use error::{engine_message, EngineError};
pub use key::EngineKey;
pub use metrics::{EngineFlavor, EngineMetrics, LoraInfo};
pub use models::{adapters, parse_models, ModelCard};
pub use pins::{CertFingerprint, EnginePins, PinHold};
pub use tls::{PinMismatch, PinnedConnector};
