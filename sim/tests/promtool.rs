//! `promtool check metrics` on a busy sim's /metrics: no parse errors, and no lint problem
//! beyond the two that a real vLLM 0.32 scrape has too (`:` in names, which vLLM's naming
//! requires, and `_total` on the `vllm:iteration_tokens_total` histogram). Needs `promtool`
//! on PATH (or `PROMTOOL`); `.ci/sim-deps.sh` installs it.

mod common;

fn promtool(input: &str) -> (i32, String) {
    flotilla_testkit::promtool::check_metrics(input)
}

fn problems(text: &str) -> Vec<String> {
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| l.split_once(' ').map_or(l, |(_, p)| p).to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_like_real_vllm() {
    let real =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/real-vllm/metrics-vllm-0.32.0.txt"))
            .unwrap();
    let (_, real_out) = promtool(&real);
    let allowed = problems(&real_out);
    assert!(!allowed.is_empty() && !real_out.contains("error while linting"), "{real_out}");

    // with a KV connector, so the NIXL families are checked too
    let sim = common::start(flotilla_sim::SimArgs {
        model: "demo".into(),
        kv_transfer_config: Some(r#"{"kv_connector":"NixlConnector","kv_role":"kv_both"}"#.into()),
        kv_side_channel_port: 0,
        ..common::args()
    })
    .await;
    let a = sim.local_addr();
    common::post(a, "/v1/load_lora_adapter", serde_json::json!({"lora_name": "x", "lora_path": "sim://x"})).await;
    for i in 0..4 {
        assert_eq!(
            common::complete(a, if i % 2 == 0 { "demo" } else { "x" }, &common::text(100, i), 8).await.status,
            200
        );
    }
    let body = common::get(a, "/metrics").await.body;
    assert!(body.contains("vllm:nixl_xfer_time_seconds_bucket"), "{body}");
    let (code, out) = promtool(&body);
    assert!(!out.contains("error while linting"), "promtool cannot parse /metrics:\n{out}");
    assert!(code == 0 || code == 3, "promtool exit {code}:\n{out}");
    for p in problems(&out) {
        assert!(allowed.contains(&p), "promtool problem that real vLLM does not have: {p}");
    }
    // and a broken exposition is caught, so this test can fail
    let (_, broken) = promtool("vllm_x{a=\"1\" 1\n");
    assert!(broken.contains("error while linting"), "{broken}");
    sim.shutdown().await.unwrap();
}
