//! Helpers for the real-engine test tier (`tests/real_vllm.rs`): where the real vLLM is
//! installed, and shape comparison of what a client or the control plane observes.
//!
//! [`shape`] compares the sim's answers with real vLLM's (stored samples in
//! `tests/samples.rs`, a live server in `tests/real_vllm.rs`) and holds the list of the
//! sim's deliberate differences, [`shape::KNOWN_DIFFERENCES`].
#![forbid(unsafe_code)]

pub mod shape;
pub mod streams;
