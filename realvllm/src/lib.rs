//! Helpers for the real-engine test tier (`tests/real_vllm.rs`): where the real vLLM is
//! installed, and shape comparison of what a client or the control plane observes.
