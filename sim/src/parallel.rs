//! Parallel and multi-node flags (vLLM's `--tensor-parallel-size`, `--pipeline-parallel-size`,
//! `--data-parallel-*`, `--nnodes`, `--node-rank`, `--master-addr`, `--master-port`,
//! `--headless`), checked into a [`Layout`] (how the latency model and the KV pool scale with
//! the gang's GPUs) and a [`GangRole`] (what this process does in the gang's rendezvous,
//! `rendezvous.rs`). Absent flags give `Layout::SINGLE` and `GangRole::Single`, under which
//! every formula is the single-GPU one, unchanged.
//!
//! ```text
//! t = base/TP + (a*P + b*S + c*K)/(TP*PP*DP) + d*L + allreduce + hops
//! allreduce = 2 * layers * (lat + tokens * hidden * 2 B * 2(TP-1)/TP / bw)   (TP > 1)
//! hops      = sum over the PP-1 stage boundaries of (lat + tokens * hidden * 2 B / bw)
//! tokens    = (P + S) / DP   (what one data-parallel rank computes in the step)
//! ```
//!
//! The link is NVLink inside a node and the network across nodes: a TP group larger than a
//! node's GPUs all-reduces over the network; of the PP-1 stage boundaries, `nnodes-1` cross
//! nodes (at most), the rest stay inside one.

use std::time::Duration;

use crate::error::SimError;
use crate::latency::{Profile, StepShape};

/// Llama-3-8B transformer layers (two all-reduces each under tensor parallelism).
pub const LLAMA3_8B_LAYERS: u32 = 32;
/// Llama-3-8B hidden size (activation elements per token crossing a link).
pub const LLAMA3_8B_HIDDEN: u32 = 4096;
/// Llama-3-8B weights in BF16 (bytes), freed per GPU as the model is split over more GPUs.
pub const LLAMA3_8B_WEIGHT_BYTES: u64 = 16_060_000_000;

/// A link's cost for one collective or transfer: a fixed latency plus bytes over bandwidth.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    /// Seconds per operation whatever its size (launch, synchronisation, wire latency).
    pub latency_s: f64,
    /// Effective bytes per second an operation moves.
    pub bytes_per_s: f64,
}

/// NVLink inside a node: NCCL / vLLM custom all-reduce of small messages ~10 us; ~150 GB/s
/// effective bus bandwidth (A100 NVLink 3 is 300 GB/s per direction, H100 450).
pub const NVLINK: Link = Link { latency_s: 10e-6, bytes_per_s: 150e9 };
/// The network between nodes: 200 Gb/s InfiniBand or RoCE, ~20 GB/s effective, ~30 us per op.
pub const NETWORK: Link = Link { latency_s: 30e-6, bytes_per_s: 20e9 };

/// How one replica's model is split: TP x PP GPUs per model copy, DP copies, over `nnodes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Tensor-parallel GPUs (vLLM --tensor-parallel-size).
    pub tp: u32,
    /// Pipeline stages (vLLM --pipeline-parallel-size).
    pub pp: u32,
    /// Data-parallel ranks, each an engine with TP x PP GPUs (vLLM --data-parallel-size).
    pub dp: u32,
    /// Nodes one model copy spans (vLLM --nnodes); 1 for data-parallel layouts.
    pub nnodes: u32,
}

impl Layout {
    /// One GPU, one node: the profiles as calibrated.
    pub const SINGLE: Layout = Layout { tp: 1, pp: 1, dp: 1, nnodes: 1 };

    /// GPUs of one model copy.
    pub fn world(&self) -> u32 {
        self.tp * self.pp
    }

    /// GPUs of one model copy on each node.
    pub fn gpus_per_node(&self) -> u32 {
        self.world() / self.nnodes.max(1)
    }

    /// Simulated seconds one step of `shape` takes on this layout (before `--speedup` and
    /// faults). Exactly `profile.step_time` for [`Layout::SINGLE`].
    pub fn step_time(&self, p: &Profile, shape: StepShape, block_size: u32) -> f64 {
        if *self == Layout::SINGLE {
            return p.step_time(shape, block_size);
        }
        let split = f64::from(self.tp * self.pp * self.dp);
        let varying = p.prefill_token_s * f64::from(shape.prefill_tokens)
            + p.decode_seq_s * f64::from(shape.decode_seqs)
            + p.kv_token_s * f64::from(block_size) * f64::from(shape.kv_blocks);
        let tokens = f64::from(shape.prefill_tokens + shape.decode_seqs) / f64::from(self.dp);
        let act_bytes = tokens * f64::from(LLAMA3_8B_HIDDEN) * 2.0;
        let mut t = p.base_s / f64::from(self.tp) + varying / split + p.lora_adapter_s * f64::from(shape.loras);
        if self.tp > 1 {
            let link = if self.tp > self.gpus_per_node() { NETWORK } else { NVLINK };
            let tp = f64::from(self.tp);
            let per_op = link.latency_s + act_bytes * 2.0 * (tp - 1.0) / tp / link.bytes_per_s;
            t += 2.0 * f64::from(LLAMA3_8B_LAYERS) * per_op;
        }
        if self.pp > 1 {
            let across = (self.nnodes - 1).min(self.pp - 1);
            let inside = self.pp - 1 - across;
            let hop = |l: Link| l.latency_s + act_bytes / l.bytes_per_s;
            t += f64::from(across) * hop(NETWORK) + f64::from(inside) * hop(NVLINK);
        }
        t
    }

    /// KV-cache bytes over all GPUs of the layout: each of the `world` GPUs of a copy holds
    /// 1/world of the weights, so it frees `weights * (1 - 1/world)` for KV; DP copies each
    /// have their own. Exactly `profile.kv_cache_bytes` for [`Layout::SINGLE`].
    pub fn kv_cache_bytes(&self, p: &Profile) -> u64 {
        let world = u64::from(self.world());
        u64::from(self.dp) * (world * p.kv_cache_bytes + LLAMA3_8B_WEIGHT_BYTES * (world - 1))
    }
}

/// Which flags name the rendezvous, and so what a rank counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GangKind {
    /// `--nnodes`: one model copy over nodes; a member is one node rank.
    Nodes,
    /// `--data-parallel-size` beyond `--data-parallel-size-local`: a member holds
    /// `--data-parallel-size-local` data-parallel ranks from `--data-parallel-start-rank`.
    DataParallel,
}

impl GangKind {
    /// The protocol's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            GangKind::Nodes => "nodes",
            GangKind::DataParallel => "dp",
        }
    }
}

/// This process's part in a gang.
#[derive(Debug, Clone, PartialEq)]
pub enum GangRole {
    /// No gang: serve at once, as ever.
    Single,
    /// Rank 0: serves the API once ranks `own..world` have all joined on `listen`.
    Head {
        /// What ranks are.
        kind: GangKind,
        /// `host:port` to accept workers on (`--master-addr:--master-port`, or the DP address and RPC port).
        listen: String,
        /// Ranks in the gang.
        world: u32,
        /// Ranks this process holds itself (`0..own`).
        own: u32,
        /// Wall time the gang may take to form before the head gives up.
        timeout: Duration,
    },
    /// A headless member: holds ranks `first..first+count`, joins the head at `head`.
    Worker {
        /// What ranks are.
        kind: GangKind,
        /// `host:port` of the head's rendezvous.
        head: String,
        /// First rank held.
        first: u32,
        /// Ranks held.
        count: u32,
        /// Ranks in the gang.
        world: u32,
        /// Wall time to keep retrying the head before giving up.
        timeout: Duration,
    },
}

/// The multi-node and parallel flags, flattened into `flotilla sim`'s.
#[derive(clap::Args, Debug, Clone)]
pub struct GangArgs {
    /// GPUs each layer is split across (vLLM --tensor-parallel-size); scales the latency
    /// model (docs/sim.md, "Gangs").
    #[arg(long, default_value_t = 1)]
    pub tensor_parallel_size: u32,
    /// Pipeline stages the layers are split into (vLLM --pipeline-parallel-size).
    #[arg(long, default_value_t = 1)]
    pub pipeline_parallel_size: u32,
    /// Data-parallel engine ranks in the replica (vLLM --data-parallel-size).
    #[arg(long, default_value_t = 1)]
    pub data_parallel_size: u32,
    /// Data-parallel ranks on this node (vLLM --data-parallel-size-local); default all of them.
    #[arg(long)]
    pub data_parallel_size_local: Option<u32>,
    /// First data-parallel rank on this node (vLLM --data-parallel-start-rank); > 0 needs --headless.
    #[arg(long)]
    pub data_parallel_start_rank: Option<u32>,
    /// Address of the data-parallel head (vLLM --data-parallel-address); the head listens on it.
    #[arg(long)]
    pub data_parallel_address: Option<String>,
    /// Port of the data-parallel head's rendezvous (vLLM --data-parallel-rpc-port).
    #[arg(long)]
    pub data_parallel_rpc_port: Option<u16>,
    /// Nodes one model copy spans (vLLM --nnodes); > 1 needs --master-addr and --master-port.
    #[arg(long, default_value_t = 1)]
    pub nnodes: u32,
    /// This node's rank, 0..nnodes (vLLM --node-rank); rank 0 serves the API, others need --headless.
    #[arg(long, default_value_t = 0)]
    pub node_rank: u32,
    /// Address of rank 0 (vLLM --master-addr): the head listens on it, workers connect to it.
    #[arg(long)]
    pub master_addr: Option<String>,
    /// Port of rank 0's rendezvous (vLLM --master-port); 0 on the head picks a free one (logged).
    #[arg(long)]
    pub master_port: Option<u16>,
    /// Run as a worker without the API server (vLLM --headless): join the head and hold the
    /// connection; exit non-zero when it drops.
    #[arg(long)]
    pub headless: bool,
    /// Wall seconds a worker keeps retrying the head, and the head waits for every rank,
    /// before giving up with exit code 1 (sim only; vLLM's distributed init timeout).
    #[arg(long, default_value_t = 600.0)]
    pub rendezvous_timeout_seconds: f64,
}

impl Default for GangArgs {
    fn default() -> Self {
        GangArgs {
            tensor_parallel_size: 1,
            pipeline_parallel_size: 1,
            data_parallel_size: 1,
            data_parallel_size_local: None,
            data_parallel_start_rank: None,
            data_parallel_address: None,
            data_parallel_rpc_port: None,
            nnodes: 1,
            node_rank: 0,
            master_addr: None,
            master_port: None,
            headless: false,
            rendezvous_timeout_seconds: 600.0,
        }
    }
}

fn at_least_one(flag: &'static str, v: u32) -> Result<(), SimError> {
    if v == 0 {
        return Err(SimError::invalid(flag, "must be at least 1, got 0"));
    }
    Ok(())
}

fn required<'a>(flag: &'static str, v: &'a Option<String>, why: &str) -> Result<&'a str, SimError> {
    match v.as_deref().map(str::trim) {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(SimError::invalid(flag, format!("not given; {why}"))),
    }
}

fn endpoint(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl GangArgs {
    /// Checks the flags together; the error names the flag at fault (exit code 2).
    pub fn validate(&self) -> Result<(Layout, GangRole), SimError> {
        at_least_one("tensor-parallel-size", self.tensor_parallel_size)?;
        at_least_one("pipeline-parallel-size", self.pipeline_parallel_size)?;
        at_least_one("data-parallel-size", self.data_parallel_size)?;
        at_least_one("nnodes", self.nnodes)?;
        let t = self.rendezvous_timeout_seconds;
        if !(t.is_finite() && t > 0.0 && t <= 86_400.0) {
            return Err(SimError::invalid(
                "rendezvous-timeout-seconds",
                format!("must be above 0 and at most 86400, got {t}"),
            ));
        }
        let timeout = Duration::from_secs_f64(t);
        let dp = self.data_parallel_size;
        let dp_local = self.data_parallel_size_local.unwrap_or(dp);
        let dp_start = self.data_parallel_start_rank.unwrap_or(0);
        at_least_one("data-parallel-size-local", dp_local)?;
        if dp_local > dp {
            return Err(SimError::invalid(
                "data-parallel-size-local",
                format!("{dp_local} is above --data-parallel-size {dp}"),
            ));
        }
        if dp_start + dp_local > dp {
            return Err(SimError::invalid(
                "data-parallel-start-rank",
                format!("ranks {dp_start}..{} run past --data-parallel-size {dp}", dp_start + dp_local),
            ));
        }
        if self.node_rank >= self.nnodes {
            return Err(SimError::invalid(
                "node-rank",
                format!("{} is not below --nnodes {}", self.node_rank, self.nnodes),
            ));
        }
        let world = self.tensor_parallel_size * self.pipeline_parallel_size;
        if !world.is_multiple_of(self.nnodes) {
            return Err(SimError::invalid(
                "nnodes",
                format!("{} nodes cannot split tensor-parallel x pipeline-parallel = {world} GPUs evenly", self.nnodes),
            ));
        }
        let dp_across = dp_local < dp;
        if self.nnodes > 1 && dp_across {
            return Err(SimError::invalid(
                "nnodes",
                "spanning nodes with --nnodes and with --data-parallel-size-local below \
                 --data-parallel-size together is not modelled; use one or the other",
            ));
        }
        let layout = Layout { tp: self.tensor_parallel_size, pp: self.pipeline_parallel_size, dp, nnodes: self.nnodes };
        let role = if self.nnodes > 1 {
            let addr = required("master-addr", &self.master_addr, "--nnodes above 1 needs the head's address")?;
            let Some(port) = self.master_port else {
                return Err(SimError::invalid("master-port", "not given; --nnodes above 1 needs the head's port"));
            };
            self.role(GangKind::Nodes, addr, port, self.node_rank, 1, self.nnodes, timeout)?
        } else if dp_across {
            let addr = required(
                "data-parallel-address",
                &self.data_parallel_address,
                "--data-parallel-size-local below --data-parallel-size needs the head's address",
            )?;
            let Some(port) = self.data_parallel_rpc_port else {
                return Err(SimError::invalid(
                    "data-parallel-rpc-port",
                    "not given; --data-parallel-size-local below --data-parallel-size needs the head's port",
                ));
            };
            self.role(GangKind::DataParallel, addr, port, dp_start, dp_local, dp, timeout)?
        } else {
            if self.headless {
                return Err(SimError::invalid(
                    "headless",
                    "a single-node engine has no head to join; give --nnodes, or --data-parallel-size-local below --data-parallel-size",
                ));
            }
            if dp_start != 0 {
                return Err(SimError::invalid(
                    "data-parallel-start-rank",
                    format!("{dp_start} leaves ranks 0..{dp_start} to no node when every rank is local"),
                ));
            }
            GangRole::Single
        };
        Ok((layout, role))
    }

    #[allow(clippy::too_many_arguments)]
    fn role(
        &self,
        kind: GangKind,
        addr: &str,
        port: u16,
        first: u32,
        count: u32,
        world: u32,
        timeout: Duration,
    ) -> Result<GangRole, SimError> {
        let rank_flag = match kind {
            GangKind::Nodes => "node-rank",
            GangKind::DataParallel => "data-parallel-start-rank",
        };
        if first == 0 {
            if self.headless {
                return Err(SimError::invalid(
                    "headless",
                    format!("--{rank_flag} 0 is the head, which serves the API; only ranks above 0 run headless"),
                ));
            }
            return Ok(GangRole::Head { kind, listen: endpoint(addr, port), world, own: count, timeout });
        }
        if !self.headless {
            return Err(SimError::invalid(
                "headless",
                format!("not given; --{rank_flag} {first} is a worker, and only rank 0 serves the API"),
            ));
        }
        if port == 0 {
            let flag = match kind {
                GangKind::Nodes => "master-port",
                GangKind::DataParallel => "data-parallel-rpc-port",
            };
            return Err(SimError::invalid(
                flag,
                "0 only lets the head pick a port; a worker needs the head's real port",
            ));
        }
        Ok(GangRole::Worker { kind, head: endpoint(addr, port), first, count, world, timeout })
    }
}

#[cfg(test)]
#[path = "parallel_tests.rs"]
mod tests;
