//! HTTPS on the gateway's listener (`--https-cert`/`--https-key`): a client that trusts the
//! certificate's CA completes requests; a plain-HTTP client gets nowhere and is counted; a
//! renewed certificate is served without a restart.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use flotilla_security::certs::{self, CertRequest, Issued};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn leaf(ca: &Issued) -> Issued {
    // a gateway certificate carries serverAuth (what `flotilla tls cert create --role gateway` makes)
    let identity = Some(flotilla_security::Identity::new(flotilla_security::Role::Gateway, "gw").unwrap());
    certs::issue(
        ca,
        &CertRequest { identity, dns: vec!["localhost".into()], ips: vec!["127.0.0.1".parse().unwrap()], days: 1 },
    )
    .unwrap()
}

/// One HTTP/1.1 request over TLS trusting `ca`; the whole response text and the server's
/// certificate.
async fn https_call(addr: std::net::SocketAddr, ca: &Issued, request: &str) -> (String, Vec<u8>) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.expect("handshake");
    let served = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), tls.read_to_end(&mut out)).await.expect("answer in time").ok();
    (String::from_utf8_lossy(&out).into_owned(), served)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_https_and_follows_a_renewed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = certs::create_ca("test public CA", 1).unwrap();
    let (cert, key) = (dir.path().join("gw.pem"), dir.path().join("gw-key.pem"));
    let first = leaf(&ca);
    std::fs::write(&cert, &first.cert_pem).unwrap();
    std::fs::write(&key, &first.key_pem).unwrap();
    let sims = sims(1, 50.0).await;
    let mut args = gw_args(&sims);
    args.https_cert = Some(cert.clone());
    args.https_key = Some(key.clone());
    let gw = gateway(args).await;
    let addr = gw.local_addr();

    let body = serde_json::json!({"model": MODEL, "prompt": "hello", "max_tokens": 3}).to_string();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let (answer, served) = https_call(addr, &ca, &request).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"choices\""), "{answer}");
    assert_eq!(served, CertificateDer::from_pem_slice(first.cert_pem.as_bytes()).unwrap().to_vec());

    // plain HTTP to the HTTPS listener: no answer, a counted handshake failure
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200"), "plain HTTP got an answer");
    let metrics = gw.state().metrics.encode();
    assert!(metrics.contains("tls_handshake_failures_total 1"), "{metrics}");

    // a renewed certificate in place of the old: the next connection gets it
    tokio::time::sleep(Duration::from_millis(20)).await; // a different mtime
    let second = leaf(&ca);
    std::fs::write(&key, &second.key_pem).unwrap();
    std::fs::write(&cert, &second.cert_pem).unwrap();
    let health = "GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n";
    let (answer, served) = https_call(addr, &ca, health).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(served, CertificateDer::from_pem_slice(second.cert_pem.as_bytes()).unwrap().to_vec());
}

#[test]
fn half_given_or_unreadable_https_files_are_usage_errors() {
    let args = flotilla_gateway::GatewayArgs {
        https_cert: Some("/nonexistent/cert.pem".into()),
        https_key: Some("/nonexistent/key.pem".into()),
        ..gw_args(&[])
    };
    let e = args.validate().expect_err("refused").to_string();
    assert!(e.contains("--https-cert") && e.contains("/nonexistent/cert.pem"), "{e}");
    let args = flotilla_gateway::GatewayArgs { https_cert: Some("/x.pem".into()), ..gw_args(&[]) };
    let e = args.validate().expect_err("refused").to_string();
    assert!(e.contains("go together"), "{e}");
}
