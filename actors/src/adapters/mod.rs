//! LoRA adapters on the leader, one controller per base model: the pure placement
//! decision (`decide`), the controller actor that reads the store and memory, decides and
//! writes (`actor`), and the `AdapterService` that on-demand loads and usage reports come
//! through (`service`). See `docs/lora.md`.
//!
//! ```text
//!  AdapterService ─Demand─> Supervisor ─> actor ── refresh ─> decide (pure) ─> Raft writes
//! ```
pub mod actor;
mod decide;
pub mod service;

pub use decide::{
    decide, note_failures, AdapterState, AdapterView, Blocked, Demand, Failure, Plan, Unplaced, FAILURE_BACKOFF,
    MIN_RESIDENCY,
};
