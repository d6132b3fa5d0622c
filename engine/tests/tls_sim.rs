//! `EngineClient` against an in-process `flotilla sim` serving TLS (`--ssl-certfile`,
//! `--ssl-keyfile`, a self-signed certificate as the agent makes): with the certificate's
//! pin it talks https on one kept-alive connection; with a wrong pin (or none) the handshake
//! fails with a clear error and the engine never sees the request; plain http to it fails.

use std::path::Path;
use std::sync::atomic::Ordering;

use flotilla_engine::{adapters, CertFingerprint, EngineClient, EngineError};
use flotilla_sim::{SimArgs, SimHandle};
use flotilla_testkit::proxy::counting_proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Writes a self-signed certificate for 127.0.0.1 into `dir`; returns its pin.
fn certificate(dir: &Path) -> CertFingerprint {
    let pair = flotilla_security::certs::self_signed("127.0.0.1", 1).unwrap();
    std::fs::write(dir.join("cert.pem"), &pair.cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &pair.key_pem).unwrap();
    CertFingerprint::of_der(&pair.cert_der)
}

async fn tls_sim(dir: &Path) -> (SimHandle, CertFingerprint) {
    let pin = certificate(dir);
    let args = SimArgs {
        port: 0,
        model: "demo".into(),
        ssl_certfile: Some(dir.join("cert.pem")),
        ssl_keyfile: Some(dir.join("key.pem")),
        ..SimArgs::default()
    };
    (flotilla_sim::start(args).await.expect("sim starts with TLS"), pin)
}

#[tokio::test]
async fn a_pinned_client_talks_https_to_a_tls_engine_on_one_kept_alive_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, pin) = tls_sim(dir.path()).await;
    assert!(sim.base_url().starts_with("https://"), "{}", sim.base_url());
    let (ep, connections) = counting_proxy(sim.local_addr()).await;
    let ep = ep.to_string();
    let client = EngineClient::new();
    let _hold = client.pins().hold("127.0.0.1", pin).unwrap();
    let c = client.with_tls(true);
    assert!(c.health(&ep).await, "health over https");
    let models = c.models(&ep).await.expect("models over https");
    assert_eq!(models[0].id, "demo");
    c.load_lora(&ep, "sql", "sim://sql").await.expect("a LoRA load over https");
    assert_eq!(adapters(&c.models(&ep).await.unwrap()), ["sql"]);
    assert!(c.metrics(&ep).await.expect("metrics over https").is_known());
    assert_eq!(connections.load(Ordering::SeqCst), 1, "one connection, one handshake, for every call");
    sim.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_wrong_pin_fails_the_handshake_says_why_and_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, pin) = tls_sim(dir.path()).await;
    let ep = sim.local_addr().to_string();
    let elsewhere = dir.path().join("other");
    std::fs::create_dir(&elsewhere).unwrap();
    let other = certificate(&elsewhere);
    assert_ne!(other, pin);
    let client = EngineClient::new();
    let wrong = client.pins().hold("127.0.0.1", other).unwrap();
    let c = client.with_tls(true);
    let e = c.load_lora(&ep, "sql", "sim://sql").await.expect_err("a certificate that is not pinned");
    assert_eq!(e.code(), "engine.certificate_mismatch", "{e}");
    assert!(e.is_transport());
    let text = e.to_string();
    assert!(text.contains(&format!("https://{ep}/v1/load_lora_adapter")), "{text}");
    assert!(text.contains("127.0.0.1") && text.contains(&pin.hex()) && text.contains(&other.hex()), "{text}");
    assert!(text.contains("no request sent"), "{text}");
    assert!(!c.health(&ep).await);
    drop(wrong);
    let none = c.models(&ep).await.expect_err("nothing pinned");
    assert!(
        matches!(&none, EngineError::CertificateMismatch { reason, .. } if reason.contains("none pinned")),
        "{none}"
    );

    // With the right pin: the engine never received the load.
    let _right = client.pins().hold("127.0.0.1", pin).unwrap();
    assert!(adapters(&c.models(&ep).await.unwrap()).is_empty(), "the refused call reached the engine");
    sim.shutdown().await.unwrap();
}

#[tokio::test]
async fn plain_http_to_a_tls_engine_gets_no_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, pin) = tls_sim(dir.path()).await;
    let ep = sim.local_addr().to_string();
    let client = EngineClient::new();
    let _hold = client.pins().hold("127.0.0.1", pin).unwrap();
    assert!(!client.health(&ep).await, "plain http to a TLS engine");
    let e = client.metrics(&ep).await.expect_err("plain http");
    assert_eq!(e.code(), "engine.unreachable", "{e}");
    // On the wire: the request is not answered, the connection is closed.
    let mut s = TcpStream::connect(sim.local_addr()).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(15), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the engine closes a plain HTTP connection");
    assert!(!String::from_utf8_lossy(&buf).contains("HTTP/1.1 200"), "{buf:?}");
    assert!(client.with_tls(true).health(&ep).await, "and keeps serving TLS");
    sim.shutdown().await.unwrap();
}
