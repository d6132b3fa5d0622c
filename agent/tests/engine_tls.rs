//! `--engine-tls on`: the agent starts a sim engine with its own self-signed certificate
//! (`--ssl-certfile`/`--ssl-keyfile` in the engine's private directory), reports the pin with
//! the endpoint, and the engine serves https only; an agent restarted (with TLS off) adopts
//! the engine with its pin and keeps probing it over https, while a new engine of that agent
//! (loopback, `auto`) serves plain HTTP. A Model may not set `--ssl-*` itself.

mod common;

use std::os::unix::fs::PermissionsExt;

use rustls::pki_types::pem::PemObject as _;

use common::*;
use flotilla_api::pb;
use flotilla_engine::{CertFingerprint, EngineClient};

fn ready<'a>(engines: &'a [pb::EngineReport], name: &str) -> Option<&'a pb::EngineReport> {
    engines.iter().find(|e| e.replica == name && e.state == "ready")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_serves_https_only_with_the_reported_pin_and_keeps_it_when_adopted() {
    let server = FakeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    server.assign(vec![sim_replica("t-0", "demo", &[])]);
    let mut first = TestAgent::start(agent_args(&[server.addr], dir.path(), "node-tls", &["--engine-tls", "on"])).await;
    let engine = eventually(30, "a ready engine with a pin", || {
        ready(&first.reports(), "t-0").filter(|e| !e.engine_cert_sha256.is_empty()).cloned()
    })
    .await;
    let pin: CertFingerprint = engine.engine_cert_sha256.parse().expect("a SHA-256 in hex");
    eventually(10, "the pin in a heartbeat", || {
        ready(&server.engines(), "t-0").filter(|e| e.engine_cert_sha256 == engine.engine_cert_sha256).map(|_| ())
    })
    .await;

    // The files: private, and the pin is the certificate's.
    let files = dir.path().join("engines/t-0");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode(&files), mode(&files.join("tls-key.pem"))), (0o700, 0o600));
    let pem = std::fs::read(files.join("tls-cert.pem")).unwrap();
    let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
    assert_eq!(CertFingerprint::of_der(&der), pin);
    let argv = flotilla_testkit::proc_fs::args(engine.pid);
    let cert_arg = files.join("tls-cert.pem").display().to_string();
    assert!(argv.windows(2).any(|w| w[0] == "--ssl-certfile" && w[1] == cert_arg), "{argv:?}");
    let state = std::fs::read_to_string(dir.path().join("engines.json")).unwrap();
    assert!(state.contains(&engine.engine_cert_sha256), "the state file keeps the pin: {state}");

    // https with the pin answers; plain http and a wrong pin get nothing.
    let client = EngineClient::new();
    let _hold = client.pins().hold("127.0.0.1", pin).unwrap();
    let https = client.with_tls(true);
    assert!(https.health(&engine.endpoint).await, "https with the reported pin");
    assert!(http_get(&engine.endpoint, "/health").await.is_none(), "plain http is not answered");
    let stranger = EngineClient::new();
    let _wrong = stranger.pins().hold("127.0.0.1", CertFingerprint::of_der(b"another certificate")).unwrap();
    let e = stranger.with_tls(true).metrics(&engine.endpoint).await.unwrap_err();
    assert_eq!(e.code(), "engine.certificate_mismatch", "{e}");

    // Restarted with TLS off: the adopted engine keeps its certificate, and the new agent's
    // probes reach it over https (it is ready); a new engine is plain HTTP.
    first.shutdown(false).await;
    let mut second = TestAgent::start(agent_args(&[server.addr], dir.path(), "node-tls", &[])).await;
    second.pids.lock().unwrap().insert(engine.pid);
    server.assign(vec![sim_replica("t-0", "demo", &[]), sim_replica("p-0", "demo", &[])]);
    let (adopted, plain) = eventually(30, "the adopted and the new engine ready", || {
        let r = second.reports();
        Some((ready(&r, "t-0")?.clone(), ready(&r, "p-0")?.clone()))
    })
    .await;
    assert_eq!((adopted.pid, &adopted.endpoint), (engine.pid, &engine.endpoint), "adopted, not restarted");
    assert_eq!(adopted.engine_cert_sha256, engine.engine_cert_sha256, "the adopted engine keeps its pin");
    assert!(plain.engine_cert_sha256.is_empty(), "auto on loopback: plain HTTP");
    assert_eq!(http_get(&plain.endpoint, "/health").await.map(|(s, _)| s), Some(200));
    assert!(!dir.path().join("engines/p-0").exists(), "no certificate for a plain engine");

    // Stopped for good: its certificate goes with it.
    server.assign(vec![sim_replica("p-0", "demo", &[])]);
    eventually(20, "the TLS engine stopped", || (!alive(engine.pid)).then_some(())).await;
    eventually(10, "its files removed", || (!files.exists()).then_some(())).await;
    second.shutdown(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_cannot_set_the_engines_tls_files() {
    let server = FakeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(agent_args(&[server.addr], dir.path(), "node-ssl", &["--engine-tls", "on"])).await;
    let mut own = sim_replica("s-0", "demo", &[]);
    own.engine_args = vec!["--ssl-keyfile".into(), "/tmp/mine.pem".into()];
    server.assign(vec![own]);
    let r = eventually(30, "the replica failed", || {
        agent.reports().into_iter().find(|e| e.replica == "s-0" && e.state == "failed")
    })
    .await;
    assert!(r.reason.contains("--ssl-keyfile") && r.reason.contains("--engine-tls"), "{}", r.reason);
    assert_eq!((r.pid, r.engine_cert_sha256.as_str()), (0, ""), "nothing started, no certificate");
    assert!(!dir.path().join("engines/s-0").exists());
}
