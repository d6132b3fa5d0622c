//! The official `openai` Python SDK works unchanged through the gateway (completions,
//! chat, streaming with and without usage, error classes), two sims behind it. Needs
//! `<repo>/.venv/bin/python` with `openai` (or FLOTILLA_PYTHON).

mod common;

use std::path::PathBuf;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_works_through_the_gateway() {
    let py = flotilla_testkit::python::require_python();
    let probe = Command::new(&py).args(["-c", "import openai"]).output().expect("run python");
    assert!(
        probe.status.success(),
        "the Python at {} has no `openai` module (run `bash .ci/sim-deps.sh`): {}",
        py.display(),
        String::from_utf8_lossy(&probe.stderr)
    );
    let sims = common::sims(2, 50.0).await;
    let gw = common::gateway(common::gw_args(&sims)).await;
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
    // the streamed requests' tokens were counted even when the client did not ask for usage
    let out_tokens = common::metric_sum(gw.local_addr(), "flotilla_gateway_tokens_total", &["direction=\"out\""]).await;
    assert!(out_tokens >= 7.0 + 2.0 + 5.0 + 6.0 + 4.0, "tokens out {out_tokens}");
    gw.shutdown().await;
}
