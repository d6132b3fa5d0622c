//! Tests of `parallel.rs`: the flags' checks and the latency model's scaling with the gang.

use super::*;
use crate::latency::profile;

fn lay(tp: u32, pp: u32, dp: u32, nnodes: u32) -> Layout {
    Layout { tp, pp, dp, nnodes }
}

fn flag_of(a: GangArgs) -> &'static str {
    match a.validate() {
        Err(SimError::InvalidConfig { flag, .. }) => flag,
        other => panic!("expected invalid config, got {other:?}"),
    }
}

fn nodes(rank: u32, n: u32) -> GangArgs {
    GangArgs {
        tensor_parallel_size: 8,
        pipeline_parallel_size: n,
        nnodes: n,
        node_rank: rank,
        master_addr: Some("10.0.0.1".into()),
        master_port: Some(29501),
        headless: rank > 0,
        ..GangArgs::default()
    }
}

#[test]
fn single_layout_is_the_profile_unchanged() {
    let p = profile("a100-llama3-8b").unwrap();
    for shape in [
        StepShape::default(),
        StepShape { prefill_tokens: 512, decode_seqs: 7, kv_blocks: 300, loras: 2 },
        StepShape { decode_seqs: 1, kv_blocks: 70, ..StepShape::default() },
    ] {
        assert_eq!(Layout::SINGLE.step_time(p, shape, 16).to_bits(), p.step_time(shape, 16).to_bits());
    }
    assert_eq!(Layout::SINGLE.kv_cache_bytes(p), p.kv_cache_bytes);
    assert_eq!(GangArgs::default().validate().unwrap(), (Layout::SINGLE, GangRole::Single));
}

#[test]
fn tensor_parallel_divides_compute_and_pays_all_reduces() {
    let p = profile("a100-llama3-8b").unwrap();
    let decode = StepShape { decode_seqs: 1, kv_blocks: 70, ..StepShape::default() };
    let t1 = p.step_time(decode, 16);
    let t2 = lay(2, 1, 1, 1).step_time(p, decode, 16);
    let t4 = lay(4, 1, 1, 1).step_time(p, decode, 16);
    // one stream: 12.5 ms / 2 + 64 all-reduces of ~10 us ~= 6.9 ms: faster, but not 2x
    assert!(t2 < t1 && t2 > t1 / 2.0, "tp2 {t2} vs {t1}");
    assert!(t4 < t2 && t4 > t2 / 2.0, "tp4 {t4} vs {t2}");
    assert!((t2 - (t1 - 0.0125 / 2.0 - (t1 - 0.0125) / 2.0) - 64.0 * 10e-6).abs() < 1e-5, "tp2 {t2}");
    // a big prefill: the all-reduce bytes grow with the tokens
    let prefill = StepShape { prefill_tokens: 2048, ..StepShape::default() };
    let ar = lay(2, 1, 1, 1).step_time(p, prefill, 16) - (0.0125 + 2048.0 * 60e-6) / 2.0;
    let expect = 64.0 * (10e-6 + 2048.0 * 4096.0 * 2.0 * 2.0 * 0.5 / 150e9);
    assert!((ar - expect).abs() < 1e-9, "all-reduce {ar} vs {expect}");
    // a TP group spanning two nodes all-reduces over the network: slower than inside one
    assert!(lay(16, 1, 1, 2).step_time(p, decode, 16) > lay(16, 1, 1, 1).step_time(p, decode, 16));
}

#[test]
fn pipeline_parallel_adds_hops_and_scales_batch_throughput() {
    let p = profile("h100-llama3-8b").unwrap();
    let one = StepShape { decode_seqs: 1, kv_blocks: 70, ..StepShape::default() };
    let big = StepShape { decode_seqs: 256, kv_blocks: 256 * 70, ..StepShape::default() };
    // a lone stream pays the stage hops: never faster than one GPU by more than its varying terms
    let hop_inter = 30e-6 + 4096.0 * 2.0 / 20e9;
    let t = lay(1, 2, 1, 2).step_time(p, one, 16);
    assert!(t > p.base_s + hop_inter, "pp2 lone stream {t}");
    // a full batch: tokens per second grow with the stages
    let tput = |l: Layout| 256.0 / l.step_time(p, big, 16);
    let (t1, t2, t4) = (tput(Layout::SINGLE), tput(lay(1, 2, 1, 2)), tput(lay(1, 4, 1, 2)));
    assert!(t2 > 1.2 * t1 && t4 > 1.2 * t2, "throughput {t1} {t2} {t4}");
    // stages inside one node hop over NVLink: cheaper than across nodes
    assert!(lay(1, 2, 1, 1).step_time(p, one, 16) < lay(1, 2, 1, 2).step_time(p, one, 16));
    // tp 8 x pp 2 over two nodes: exactly one network hop, all-reduces over NVLink
    let t = lay(8, 2, 1, 2).step_time(p, one, 16);
    let ar = 64.0 * (10e-6 + 4096.0 * 2.0 * 2.0 * 7.0 / 8.0 / 150e9);
    let varying = 50e-6 + 0.63e-6 / 16.0 * 16.0 * 70.0;
    let expect = p.base_s / 8.0 + varying / 16.0 + ar + hop_inter;
    assert!((t - expect).abs() < 1e-12, "{t} vs {expect}");
}

#[test]
fn data_parallel_splits_the_batch_and_multiplies_the_kv_pool() {
    let p = profile("a100-llama3-8b").unwrap();
    let big = StepShape { prefill_tokens: 1024, decode_seqs: 128, kv_blocks: 8000, ..StepShape::default() };
    let t = lay(1, 1, 4, 1).step_time(p, big, 16);
    let single = p.step_time(big, 16);
    assert!((t - (p.base_s + (single - p.base_s) / 4.0)).abs() < 1e-12, "{t}");
    assert_eq!(lay(1, 1, 4, 1).kv_cache_bytes(p), 4 * p.kv_cache_bytes);
    // TP 2: two GPUs' KV memory plus the half of the weights each no longer holds
    assert_eq!(lay(2, 1, 1, 1).kv_cache_bytes(p), 2 * p.kv_cache_bytes + LLAMA3_8B_WEIGHT_BYTES);
}

#[test]
fn node_ranks_become_head_and_workers() {
    let (layout, head) = nodes(0, 2).validate().unwrap();
    assert_eq!(layout, lay(8, 2, 1, 2));
    assert_eq!(layout.gpus_per_node(), 8);
    assert!(matches!(
        head,
        GangRole::Head { kind: GangKind::Nodes, ref listen, world: 2, own: 1, .. } if listen == "10.0.0.1:29501"
    ));
    let (_, worker) = nodes(1, 2).validate().unwrap();
    assert!(matches!(worker, GangRole::Worker { first: 1, count: 1, world: 2, .. }));
    let dp = |start: u32, headless: bool| GangArgs {
        data_parallel_size: 4,
        data_parallel_size_local: Some(2),
        data_parallel_start_rank: Some(start),
        data_parallel_address: Some("::1".into()),
        data_parallel_rpc_port: Some(13345),
        headless,
        ..GangArgs::default()
    };
    let (layout, head) = dp(0, false).validate().unwrap();
    assert_eq!(layout, lay(1, 1, 4, 1));
    assert!(
        matches!(head, GangRole::Head { kind: GangKind::DataParallel, ref listen, world: 4, own: 2, .. } if listen == "[::1]:13345")
    );
    let (_, worker) = dp(2, true).validate().unwrap();
    assert!(matches!(worker, GangRole::Worker { kind: GangKind::DataParallel, first: 2, count: 2, world: 4, .. }));
    assert_eq!(flag_of(dp(3, true)), "data-parallel-start-rank");
    assert_eq!(flag_of(dp(2, false)), "headless");
    assert_eq!(flag_of(GangArgs { data_parallel_address: None, ..dp(0, false) }), "data-parallel-address");
    assert_eq!(flag_of(GangArgs { data_parallel_rpc_port: None, ..dp(2, true) }), "data-parallel-rpc-port");
    assert_eq!(flag_of(GangArgs { data_parallel_size_local: Some(5), ..dp(0, false) }), "data-parallel-size-local");
    assert_eq!(
        flag_of(GangArgs { nnodes: 2, master_addr: Some("h".into()), master_port: Some(1), ..dp(0, false) }),
        "nnodes"
    );
}

#[test]
fn bad_combinations_name_the_flag() {
    let d = GangArgs::default;
    assert_eq!(flag_of(GangArgs { node_rank: 2, ..nodes(0, 2) }), "node-rank");
    assert_eq!(flag_of(GangArgs { node_rank: 1, ..d() }), "node-rank");
    assert_eq!(flag_of(GangArgs { headless: true, ..nodes(0, 2) }), "headless");
    assert_eq!(flag_of(GangArgs { headless: false, ..nodes(1, 2) }), "headless");
    assert_eq!(flag_of(GangArgs { headless: true, ..d() }), "headless");
    assert_eq!(flag_of(GangArgs { master_addr: None, ..nodes(1, 2) }), "master-addr");
    assert_eq!(flag_of(GangArgs { master_addr: Some(" ".into()), ..nodes(0, 2) }), "master-addr");
    assert_eq!(flag_of(GangArgs { master_port: None, ..nodes(0, 2) }), "master-port");
    assert_eq!(flag_of(GangArgs { master_port: Some(0), ..nodes(1, 2) }), "master-port");
    assert_eq!(flag_of(GangArgs { tensor_parallel_size: 3, pipeline_parallel_size: 1, ..nodes(0, 2) }), "nnodes");
    assert_eq!(flag_of(GangArgs { tensor_parallel_size: 0, ..d() }), "tensor-parallel-size");
    assert_eq!(flag_of(GangArgs { pipeline_parallel_size: 0, ..d() }), "pipeline-parallel-size");
    assert_eq!(flag_of(GangArgs { data_parallel_size: 0, ..d() }), "data-parallel-size");
    assert_eq!(flag_of(GangArgs { nnodes: 0, ..d() }), "nnodes");
    assert_eq!(
        flag_of(GangArgs { data_parallel_start_rank: Some(1), data_parallel_size: 2, ..d() }),
        "data-parallel-start-rank"
    );
    assert_eq!(flag_of(GangArgs { rendezvous_timeout_seconds: 0.0, ..d() }), "rendezvous-timeout-seconds");
    // master port 0 on the head: pick a free port
    assert!(matches!(GangArgs { master_port: Some(0), ..nodes(0, 2) }.validate(), Ok((_, GangRole::Head { .. }))));
    let err = GangArgs { headless: false, ..nodes(1, 3) }.validate().unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("--headless"), "{err}");
}
