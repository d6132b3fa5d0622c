//! Runs the official `openai` Python SDK against an in-process sim
//! (`sim/tests/openai_conformance.py`): completions, chat, streaming with usage, and the
//! SDK's exception classes for our error answers. Needs a Python with `openai`: the one in
//! `FLOTILLA_PYTHON`, else `<repo>/.venv/bin/python` (made by `.ci/sim-deps.sh`).

mod common;

use std::path::PathBuf;
use std::process::Command;

use flotilla_testkit::python::require_python;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_conformance() {
    let py = require_python();
    let probe = Command::new(&py).args(["-c", "import openai"]).output().expect("run python");
    assert!(
        probe.status.success(),
        "the Python at {} has no `openai` module (run `bash .ci/sim-deps.sh`): {}",
        py.display(),
        String::from_utf8_lossy(&probe.stderr)
    );
    // strict mode: the script checks that an unknown field raises BadRequestError
    let sim =
        common::start(flotilla_sim::SimArgs { max_model_len: 2048, reject_unknown_fields: true, ..common::args() })
            .await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_conformance.py");
    let base = sim.base_url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(py).arg(script).env("SIM_BASE_URL", base).env("SIM_MODEL", "demo").output()
    })
    .await
    .unwrap()
    .expect("run the conformance script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openai SDK conformance failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
    assert!(stdout.contains("all openai sdk checks passed"), "{stdout}");
    sim.shutdown().await.unwrap();
}
