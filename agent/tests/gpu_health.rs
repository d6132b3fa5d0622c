//! GPU health through a real agent against a fake server: faults written to the
//! `--gpu-faults` file (as an operator's admin call would) show up in the heartbeats'
//! `GpuInfo` with state and evidence; recovery takes three clean probes; a bad file is a
//! usage error naming the field.

mod common;

use clap::Parser;
use common::*;
use flotilla_api::pb;

fn gpus(server: &FakeServer) -> (usize, Vec<pb::GpuInfo>) {
    let s = server.seen.lock().unwrap();
    (s.heartbeats, s.last.as_ref().map(|h| h.gpus.clone()).unwrap_or_default())
}

fn state(g: &[pb::GpuInfo], i: usize) -> String {
    g.get(i).map(|g| g.state.clone()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_faults_are_reported_with_evidence_and_recover_after_three_clean_probes() {
    let server = FakeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let faults = dir.path().join("faults.yaml");
    std::fs::write(&faults, "[]\n").unwrap();
    let data = dir.path().join("data");
    let f = faults.display().to_string();
    let args =
        agent_args(&[server.addr], &data, "node-g", &["--gpus", "3", "--gpu-type", "A100-80GB", "--gpu-faults", &f]);
    let _agent = TestAgent::start(args).await;
    let reg = eventually(20, "registration", || server.registrations().first().cloned()).await;
    assert_eq!(reg.gpus.len(), 3);
    let g = eventually(20, "a heartbeat with healthy GPUs", || Some(gpus(&server).1).filter(|g| g.len() == 3)).await;
    assert!(g.iter().all(|g| g.state == "healthy" && g.healthy && g.evidence.is_empty()), "{g:?}");

    std::fs::write(&faults, "- {gpu: 1, fault: xid, code: 79}\n- {gpu: 0, fault: throttle, reason: thermal}\n")
        .unwrap();
    let g = eventually(20, "gpu 1 failed, gpu 0 degraded", || {
        Some(gpus(&server).1).filter(|g| state(g, 1) == "failed" && state(g, 0) == "degraded")
    })
    .await;
    assert!(!g[1].healthy);
    assert!(g[1].evidence[0].starts_with("xid 79 (fallen off the bus) at "), "{:?}", g[1].evidence);
    assert_eq!(g[1].health_reason, g[1].evidence[0]);
    assert!(g[0].healthy, "Degraded is still healthy for older servers");
    assert_eq!(g[0].evidence, vec!["thermal throttling"]);
    assert_eq!(state(&g, 2), "healthy");

    // The operator resets the GPU: the fault goes; the agent waits for three clean probes.
    std::fs::write(&faults, "- {gpu: 0, fault: throttle, reason: thermal}\n").unwrap();
    let start = gpus(&server).0;
    let (healed_at, g) = eventually(20, "gpu 1 healthy again", || {
        let (n, g) = gpus(&server);
        (state(&g, 1) == "healthy").then_some((n, g))
    })
    .await;
    assert!(healed_at >= start + 3, "recovered after {} heartbeats, not 3 clean probes", healed_at - start);
    assert!(g[1].healthy && g[1].evidence.is_empty());
    assert_eq!(state(&g, 0), "degraded", "its fault stays");

    // A bad edit keeps the faults in force.
    std::fs::write(&faults, "- {gpu: 0, fault: throttle, reason: hot}\n").unwrap();
    let before = gpus(&server).0;
    eventually(20, "more heartbeats", || (gpus(&server).0 >= before + 3).then_some(())).await;
    assert_eq!(state(&gpus(&server).1, 0), "degraded");

    std::fs::write(&faults, "- {gpu: 2, fault: missing}\n").unwrap();
    let g = eventually(20, "gpu 2 missing", || Some(gpus(&server).1).filter(|g| state(g, 2) == "failed")).await;
    assert_eq!(g[2].evidence, vec!["not visible (2 of 3 GPUs visible)"]);
}

#[test]
fn a_bad_fault_file_is_a_usage_error_naming_the_field_and_the_flag_is_documented() {
    let dir = tempfile::tempdir().unwrap();
    let faults = dir.path().join("faults.yaml");
    let f = faults.display().to_string();
    for (text, want) in [
        ("- {gpu: 1, fault: xid, cod: 79}\n", "unknown field `cod`"),
        ("- {gpu: 5, fault: missing}\n", "[0].gpu: 5 is not a GPU of this node"),
        ("- {gpu: 0, fault: throttle, reason: hot}\n", "unknown variant `hot`"),
    ] {
        std::fs::write(&faults, text).unwrap();
        let args = agent_args(
            &["127.0.0.1:1".parse().unwrap()],
            dir.path(),
            "n",
            &["--gpus", "2", "--gpu-type", "A", "--gpu-faults", &f],
        );
        let e = args.validate().unwrap_err();
        assert!(e.is_usage() && e.exit_code() == 2, "{e}");
        let msg = e.to_string();
        assert!(msg.contains("--gpu-faults") && msg.contains("faults.yaml") && msg.contains(want), "{msg}");
    }
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: flotilla_agent::AgentArgs,
    }
    use clap::CommandFactory;
    let help = Cli::command().render_long_help().to_string();
    assert!(help.contains("--gpu-faults"), "{help}");
    let nvidia = Cli::try_parse_from(["agent", "--nvidia", "--gpu-faults", &f]);
    assert!(nvidia.is_err(), "fault files are for simulated GPUs only");
}
