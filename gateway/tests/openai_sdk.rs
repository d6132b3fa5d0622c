//! The official `openai` Python SDK works unchanged through the gateway (completions,
//! chat, streaming with and without usage, error classes), two sims behind it — and
//! through a disaggregated model (`--pd`), every prompt prefilled on one sim and decoded on
//! the other. Needs
//! `<repo>/.venv/bin/python` with `openai` (or FLOTILLA_PYTHON).

mod common;

use std::path::PathBuf;
use std::process::Command;

fn python_with_openai() -> PathBuf {
    let py = flotilla_testkit::python::require_python();
    let probe = Command::new(&py).args(["-c", "import openai"]).output().expect("run python");
    assert!(
        probe.status.success(),
        "the Python at {} has no `openai` module (run `bash .ci/sim-deps.sh`): {}",
        py.display(),
        String::from_utf8_lossy(&probe.stderr)
    );
    py
}

/// Runs tests/openai_sdk.py against `gw`; panics with its output when a check fails.
async fn run_sdk_script(py: PathBuf, gw: &flotilla_gateway::GatewayHandle) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_sdk.py");
    let base = gw.base_url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(py).arg(script).env("GW_BASE_URL", base).env("GW_MODEL", common::MODEL).output()
    })
    .await
    .unwrap()
    .expect("run the SDK script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openai SDK checks failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
    assert!(stdout.contains("all openai sdk checks passed"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_works_through_the_gateway() {
    let py = python_with_openai();
    let sims = common::sims(2, 50.0).await;
    let gw = common::gateway(common::gw_args(&sims)).await;
    run_sdk_script(py, &gw).await;
    // the streamed requests' tokens were counted even when the client did not ask for usage
    // (a stream is counted as the gateway finishes it, which may be just after the client
    // read its last event: polled)
    let mut out_tokens = 0.0;
    for _ in 0..50 {
        out_tokens = common::metric_sum(gw.local_addr(), "flotilla_gateway_tokens_total", &["direction=\"out\""]).await;
        if out_tokens >= 7.0 + 2.0 + 5.0 + 6.0 + 4.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(out_tokens >= 7.0 + 2.0 + 5.0 + 6.0 + 4.0, "tokens out {out_tokens}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_works_through_a_disaggregated_model() {
    let py = python_with_openai();
    let role = |r: &str| flotilla_sim::SimArgs {
        kv_transfer_config: Some(format!(r#"{{"kv_connector":"NixlConnector","kv_role":"{r}"}}"#)),
        kv_side_channel_port: 0,
        ..common::sim_args(50.0)
    };
    let p = flotilla_sim::start(role("kv_producer")).await.expect("prefill sim");
    let d = flotilla_sim::start(role("kv_consumer")).await.expect("decode sim");
    let args = flotilla_gateway::GatewayArgs {
        backends: vec![
            format!("{}-prefill=http://{}", common::MODEL, p.local_addr()),
            format!("{}-decode=http://{}", common::MODEL, d.local_addr()),
        ],
        pd: vec![common::MODEL.into()],
        // every prompt, however short, goes prefill -> decode
        pd_min_remote_prefill_tokens: 0,
        ..common::gw_args(&[])
    };
    let gw = common::gateway(args).await;
    run_sdk_script(py, &gw).await;
    let remote = common::metric_sum(gw.local_addr(), "flotilla_gateway_pd_requests_total", &["split=\"remote\""]).await;
    assert!(remote >= 5.0, "the SDK's five good requests went prefill -> decode: {remote}");
    let fallback =
        common::metric_sum(gw.local_addr(), "flotilla_gateway_pd_requests_total", &["split=\"fallback\""]).await;
    assert_eq!(fallback, 0.0);
    gw.shutdown().await;
}
