//! Step-time model and the named hardware profiles it is calibrated with.
//!
//! One engine step (one forward pass of the whole batch) takes
//!
//! ```text
//! t = base + a * prefill_tokens + b * decode_seqs + c * kv_blocks_in_use + d * active_loras
//! ```
//!
//! * `base`  — reading the weights once per step (decode is memory-bound): model bytes /
//!   HBM bandwidth, divided by the bandwidth efficiency vLLM reaches, plus CPU overhead.
//! * `a`     — compute per prompt token: 2 x parameters FLOPs at the GPU's dense BF16 peak
//!   times an achieved-utilisation factor.
//! * `b`     — per decoding sequence: its share of the GEMMs, sampling and output handling.
//! * `c`     — attention reads each in-use KV block once per step: block bytes / bandwidth.
//! * `d`     — punica/SGMV LoRA kernels: a small fixed cost per distinct adapter in the batch
//!   (an estimate; vLLM publishes no per-adapter figure).
//!
//! Moving a LoRA adapter (see `lora_cache.rs`) adds to the step (or the load call) that does it:
//!
//! ```text
//! disk -> CPU cache: lora_load_fixed_s + rank * lora_bytes_per_rank / lora_disk_bytes_per_s
//! CPU  -> GPU slot:  rank * lora_bytes_per_rank / lora_copy_bytes_per_s
//! ```
//!
//! * Disk load (vLLM's `LoRAModel.from_local_checkpoint`: `safetensors.safe_open` reads every
//!   tensor, each is cast and copied into pinned memory, then ~450 per-module weight objects
//!   are built in Python): ~2 GB/s effective (local NVMe reads at 3-7 GB/s or the page cache
//!   faster; the pinned copy and per-tensor Python work roughly halve it) plus ~20 ms fixed
//!   (config parsing, PEFT checks, module-name matching). An estimate, not a measurement; it
//!   is a property of the host, so all profiles share it. Rank 16 Llama-3-8B (80 MiB): 62 ms.
//! * GPU copy (`activate_adapter`: one `copy_` per module into the slot's stacked buffers):
//!   pinned host-to-device at ~80% of the link, less per-copy overhead: ~20 GB/s on PCIe Gen4
//!   x16 (A100, L4), ~40 GB/s on Gen5 (H100). Rank 16: 4.2 ms on A100, 2.1 ms on H100.
//!
//! Published anchors (also in docs/sim.md and the fidelity table in bench/sim/RESULTS.md):
//! * A100: johnmusgrave.com, "vLLM throughput-latency sweep on NVIDIA A100" — vLLM 0.23,
//!   Llama-3.1-8B-Instruct BF16 on one A100 40GB, 1024-token prompts, 128 output tokens:
//!   one stream decodes at ~75 tokens/s (TPOT ~13.3 ms, ~77% of the memory roofline) and
//!   concurrency 8 gives 6.6x the throughput of concurrency 1.
//! * H200 (cross-check for the H100 profile): vLLM's nightly performance benchmark
//!   (buildkite vllm/performance-benchmark build 9515), `latency_llama8B_tp1`:
//!   32-token prompts, 128 output tokens, batch 8, mean end-to-end 833 ms (~6.5 ms/step).
//! * Datasheets: A100 40GB 1,555 GB/s and 312 TFLOPS BF16; H100 SXM 3,350 GB/s and
//!   989 TFLOPS; L4 300 GB/s and 121 TFLOPS. Llama-3-8B: 8.03 B parameters (16.06 GB
//!   BF16), 32 layers x 8 KV heads x 128 dims x K,V x 2 bytes = 128 KiB of KV per token.

/// KV bytes per token for Llama-3-8B in BF16 (32 layers * 8 heads * 128 dims * 2 * 2 bytes).
pub const LLAMA3_8B_KV_BYTES_PER_TOKEN: u64 = 131_072;
/// LoRA weight bytes per unit of rank for Llama-3-8B with all seven projections targeted:
/// per layer rank * (in + out) summed over q,k,v,o,gate,up,down = 81,920 * rank params,
/// times 32 layers, times 2 bytes = 5 MiB per rank.
pub const LLAMA3_8B_LORA_BYTES_PER_RANK: u64 = 5 * 1024 * 1024;
/// Fixed part of loading one adapter from disk (seconds): config, PEFT checks, module matching.
pub const LORA_LOAD_FIXED_S: f64 = 0.020;
/// Effective safetensors read + cast + pin bandwidth from local NVMe (bytes/s).
pub const LORA_DISK_BYTES_PER_S: f64 = 2.0e9;
/// Effective pinned host-to-device copy over PCIe Gen4 x16 (bytes/s).
pub const PCIE_GEN4_BYTES_PER_S: f64 = 20.0e9;
/// Effective pinned host-to-device copy over PCIe Gen5 x16 (bytes/s).
pub const PCIE_GEN5_BYTES_PER_S: f64 = 40.0e9;

/// One calibrated engine: a GPU and a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// The name given to `--profile`.
    pub name: &'static str,
    /// One line for `--help` and docs.
    pub summary: &'static str,
    /// Fixed cost of a step in seconds.
    pub base_s: f64,
    /// Seconds per prompt token computed in a step.
    pub prefill_token_s: f64,
    /// Seconds per sequence decoding one token in a step.
    pub decode_seq_s: f64,
    /// Seconds per KV token held by running sequences (times block size = per block).
    pub kv_token_s: f64,
    /// Seconds per distinct LoRA adapter active in a step.
    pub lora_adapter_s: f64,
    /// Bytes of GPU memory left for the KV cache after weights and activations
    /// at vLLM's default `--gpu-memory-utilization 0.9`.
    pub kv_cache_bytes: u64,
    /// KV bytes per token of the model.
    pub kv_bytes_per_token: u64,
    /// LoRA slot bytes per unit of rank.
    pub lora_bytes_per_rank: u64,
    /// Fixed seconds of loading one adapter from disk into the CPU cache.
    pub lora_load_fixed_s: f64,
    /// Bytes per second of loading an adapter from disk (read, cast, pin).
    pub lora_disk_bytes_per_s: f64,
    /// Bytes per second of copying an adapter from the CPU cache into a GPU slot.
    pub lora_copy_bytes_per_s: f64,
    /// vLLM's default `--max-num-batched-tokens` for this GPU class (8192 at >= 70 GiB).
    pub default_max_num_batched_tokens: u32,
    /// Gigabits per second of the link a P/D KV transfer (NIXL/UCX RDMA read) crosses
    /// between two engines of this class: the GPU's own NIC (`pd.rs`, docs/sim.md).
    pub kv_link_gbps: f64,
}

const GIB: u64 = 1024 * 1024 * 1024;

/// The named profiles, first is the default.
pub const PROFILES: &[Profile] = &[
    // A100 40GB, Llama-3-8B. Roofline weights read: 16.06 GB / 1,555 GB/s = 10.3 ms; the
    // published single-stream TPOT is ~13.3 ms at ~1.1k tokens of context, so base =
    // 13.3 ms - b - c * 70 blocks ~= 12.5 ms. a: 16 GFLOP / 312 TFLOPS = 51 us at 100%,
    // taken at ~85% in mixed batches -> 60 us. c: 2 MiB block / 1,555 GB/s = 1.35 us.
    // KV memory: 40 GiB * 0.9 - 14.96 GiB weights - ~2.5 GiB activations ~= 18.5 GiB.
    Profile {
        name: "a100-llama3-8b",
        summary: "NVIDIA A100 40GB, Llama-3-8B BF16 (anchored on a published vLLM 0.23 sweep)",
        base_s: 0.0125,
        prefill_token_s: 60e-6,
        decode_seq_s: 100e-6,
        kv_token_s: 1.35e-6 / 16.0,
        lora_adapter_s: 300e-6,
        kv_cache_bytes: 37 * GIB / 2,
        kv_bytes_per_token: LLAMA3_8B_KV_BYTES_PER_TOKEN,
        lora_bytes_per_rank: LLAMA3_8B_LORA_BYTES_PER_RANK,
        lora_load_fixed_s: LORA_LOAD_FIXED_S,
        lora_disk_bytes_per_s: LORA_DISK_BYTES_PER_S,
        lora_copy_bytes_per_s: PCIE_GEN4_BYTES_PER_S,
        default_max_num_batched_tokens: 2048,
        kv_link_gbps: 200.0,
    },
    // H100 SXM 80GB. Roofline 16.06 GB / 3,350 GB/s = 4.8 ms; vLLM's CPU overhead for an
    // 8B model is significant (vLLM v0.6.0 blog) and the nightly H200 run shows ~6.5 ms
    // per step at batch 8 on a faster part, so base = 6.8 ms. a: 16 GFLOP / 989 TFLOPS at
    // ~70% -> 22 us. c: 2 MiB / 3,350 GB/s = 0.63 us. KV: 72 GiB - 15 - 3 ~= 54 GiB.
    Profile {
        name: "h100-llama3-8b",
        summary: "NVIDIA H100 SXM 80GB, Llama-3-8B BF16 (roofline, cross-checked on vLLM nightly H200)",
        base_s: 0.0068,
        prefill_token_s: 22e-6,
        decode_seq_s: 50e-6,
        kv_token_s: 0.63e-6 / 16.0,
        lora_adapter_s: 150e-6,
        kv_cache_bytes: 54 * GIB,
        kv_bytes_per_token: LLAMA3_8B_KV_BYTES_PER_TOKEN,
        lora_bytes_per_rank: LLAMA3_8B_LORA_BYTES_PER_RANK,
        lora_load_fixed_s: LORA_LOAD_FIXED_S,
        lora_disk_bytes_per_s: LORA_DISK_BYTES_PER_S,
        lora_copy_bytes_per_s: PCIE_GEN5_BYTES_PER_S,
        default_max_num_batched_tokens: 8192,
        kv_link_gbps: 400.0,
    },
    // L4 24GB. Roofline 16.06 GB / 300 GB/s = 53.5 ms, at the ~77% efficiency measured on
    // A100 -> 69 ms. a: 16 GFLOP / 121 TFLOPS at ~70% -> 190 us. c: 2 MiB / 300 GB/s = 7 us.
    // KV: 21.6 GiB - 15 - 1.5 ~= 5 GiB. No published vLLM figure anchors this profile.
    Profile {
        name: "l4-llama3-8b",
        summary: "NVIDIA L4 24GB, Llama-3-8B BF16 (roofline estimate only)",
        base_s: 0.069,
        prefill_token_s: 190e-6,
        decode_seq_s: 300e-6,
        kv_token_s: 7.0e-6 / 16.0,
        lora_adapter_s: 1e-3,
        kv_cache_bytes: 5 * GIB,
        kv_bytes_per_token: LLAMA3_8B_KV_BYTES_PER_TOKEN,
        lora_bytes_per_rank: LLAMA3_8B_LORA_BYTES_PER_RANK,
        lora_load_fixed_s: LORA_LOAD_FIXED_S,
        lora_disk_bytes_per_s: LORA_DISK_BYTES_PER_S,
        lora_copy_bytes_per_s: PCIE_GEN4_BYTES_PER_S,
        default_max_num_batched_tokens: 2048,
        kv_link_gbps: 100.0,
    },
];

/// Looks a profile up by name.
pub fn profile(name: &str) -> Option<&'static Profile> {
    PROFILES.iter().find(|p| p.name == name)
}

/// The names of all profiles, comma-separated, for error messages.
pub fn profile_names() -> String {
    PROFILES.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
}

/// What one step does, as the latency model sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepShape {
    /// Prompt (or recomputed) tokens processed this step.
    pub prefill_tokens: u32,
    /// Sequences producing one token by decode this step.
    pub decode_seqs: u32,
    /// KV blocks held by scheduled sequences.
    pub kv_blocks: u32,
    /// Distinct LoRA adapters in the batch.
    pub loras: u32,
}

impl Profile {
    /// Simulated seconds one step of this shape takes (before `--speedup` and faults).
    pub fn step_time(&self, shape: StepShape, block_size: u32) -> f64 {
        self.base_s
            + self.prefill_token_s * f64::from(shape.prefill_tokens)
            + self.decode_seq_s * f64::from(shape.decode_seqs)
            + self.kv_token_s * f64::from(block_size) * f64::from(shape.kv_blocks)
            + self.lora_adapter_s * f64::from(shape.loras)
    }

    /// KV blocks this profile's GPU holds at `block_size` tokens per block.
    pub fn default_num_blocks(&self, block_size: u32) -> u64 {
        self.kv_cache_bytes / (self.kv_bytes_per_token * u64::from(block_size))
    }

    /// Bytes of one adapter of `rank`.
    pub fn lora_bytes(&self, rank: u32) -> u64 {
        self.lora_bytes_per_rank * u64::from(rank)
    }

    /// Simulated seconds loading an adapter of `rank` from disk into the CPU cache takes.
    pub fn lora_load_s(&self, rank: u32) -> f64 {
        self.lora_load_fixed_s + self.lora_bytes(rank) as f64 / self.lora_disk_bytes_per_s
    }

    /// Simulated seconds copying an adapter of `rank` from the CPU cache into a GPU slot takes.
    pub fn lora_copy_s(&self, rank: u32) -> f64 {
        self.lora_bytes(rank) as f64 / self.lora_copy_bytes_per_s
    }

    /// KV blocks one LoRA slot of `rank` displaces (vLLM pre-allocates every slot).
    pub fn lora_slot_blocks(&self, rank: u32, block_size: u32) -> u64 {
        let block_bytes = self.kv_bytes_per_token * u64::from(block_size);
        (self.lora_bytes_per_rank * u64::from(rank)).div_ceil(block_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a100_single_stream_tpot_is_near_published_13ms() {
        let p = profile("a100-llama3-8b").unwrap();
        // one sequence with ~1,100 tokens of context decoding one token
        let shape = StepShape { decode_seqs: 1, kv_blocks: 70, ..StepShape::default() };
        let t = p.step_time(shape, 16);
        assert!((t - 0.0133).abs() < 0.0013, "tpot {t}");
    }

    #[test]
    fn step_time_grows_with_every_term() {
        let p = &PROFILES[0];
        let base = p.step_time(StepShape::default(), 16);
        for shape in [
            StepShape { prefill_tokens: 100, ..Default::default() },
            StepShape { decode_seqs: 10, ..Default::default() },
            StepShape { kv_blocks: 100, ..Default::default() },
            StepShape { loras: 1, ..Default::default() },
        ] {
            assert!(p.step_time(shape, 16) > base, "{shape:?}");
        }
    }

    #[test]
    fn default_blocks_match_memory_budget() {
        let p = profile("a100-llama3-8b").unwrap();
        assert_eq!(p.default_num_blocks(16), 9472);
        assert_eq!(p.lora_slot_blocks(16, 16), 40);
        assert!(profile("h100-llama3-8b").unwrap().default_num_blocks(16) > 27_000);
        assert!(profile("nope").is_none());
    }

    #[test]
    fn lora_moves_cost_tens_of_ms_from_disk_and_ms_over_pcie() {
        let a100 = profile("a100-llama3-8b").unwrap();
        // rank 16 = 80 MiB: 20 ms + 83.9 MB / 2 GB/s = 61.9 ms; 83.9 MB / 20 GB/s = 4.2 ms
        assert!((a100.lora_load_s(16) - 0.0619).abs() < 0.0005, "{}", a100.lora_load_s(16));
        assert!((a100.lora_copy_s(16) - 0.0042).abs() < 0.0001, "{}", a100.lora_copy_s(16));
        let h100 = profile("h100-llama3-8b").unwrap();
        assert!(h100.lora_copy_s(16) < a100.lora_copy_s(16));
        assert!(a100.lora_load_s(64) > a100.lora_load_s(8));
    }
}
