//! The engine client: health, standardized metrics, models and LoRA adapters of one
//! engine (real vLLM or `flotilla sim`), shared by the agent and the gateway.
