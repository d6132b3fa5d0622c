//! TLS between two processes' worth of configuration, over real sockets: identities from
//! certificates, refusals of foreign-CA and expired certificates, server names checked, and
//! rotation of the files without a restart.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use flotilla_security::certs::{create_ca, issue, CertRequest, Issued};
use flotilla_security::incoming::incoming;
use flotilla_security::{Identity, Role, Tls, TlsFiles};
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt;

fn write(dir: &Path, name: &str, ca: &Issued, leaf: &Issued) -> TlsFiles {
    let files = TlsFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
        ca: dir.join(format!("{name}-ca.pem")),
    };
    std::fs::write(&files.cert, &leaf.cert_pem).unwrap();
    std::fs::write(&files.key, &leaf.key_pem).unwrap();
    std::fs::write(&files.ca, &ca.cert_pem).unwrap();
    files
}

fn leaf(ca: &Issued, role: Role, name: &str, days: i64) -> Issued {
    let req = CertRequest {
        identity: Some(Identity::new(role, name).unwrap()),
        dns: vec!["localhost".into()],
        ips: vec!["127.0.0.1".parse().unwrap()],
        days,
    };
    issue(ca, &req).unwrap()
}

/// A TLS server on a free port; each accepted connection's peer identity is sent back.
async fn server(tls: Arc<Tls>) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Option<Identity>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut conns = incoming(listener, tls);
    tokio::spawn(async move {
        let mut open = Vec::new(); // kept open: a dropped stream would reset the client
        while let Some(Ok(stream)) = conns.next().await {
            let (_, session) = stream.get_ref();
            let id = session.peer_certificates().and_then(|c| Identity::from_cert_der(c.first()?).ok());
            let _ = tx.send(id);
            open.push(stream);
        }
    });
    (addr, rx)
}

async fn dial(tls: &Tls, addr: SocketAddr, name: &str) -> std::io::Result<()> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_string()).unwrap();
    let mut s = tokio_rustls::TlsConnector::from(tls.client_config()).connect(name, tcp).await?;
    // TLS 1.3: the server checks the client's certificate after the client's handshake is
    // done; a refusal arrives as an alert on the first read
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"x").await?;
    let mut b = [0u8; 1];
    match tokio::time::timeout(Duration::from_millis(300), s.read(&mut b)).await {
        Ok(Err(e)) => Err(e),
        _ => Ok(()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_refusals_and_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let ca = create_ca("flotilla test CA", 30).unwrap();
    let other_ca = create_ca("someone else's CA", 30).unwrap();
    let server_tls = Tls::load(write(dir.path(), "server", &ca, &leaf(&ca, Role::Peer, "s1", 30))).unwrap();
    assert_eq!(server_tls.own_identity(), Some(Identity::new(Role::Peer, "s1").unwrap()));
    let (addr, mut ids) = server(server_tls.clone()).await;

    // an agent's certificate: the server sees its identity
    let agent = Tls::load(write(dir.path(), "agent", &ca, &leaf(&ca, Role::Agent, "gpu-1", 30))).unwrap();
    dial(&agent, addr, "127.0.0.1").await.expect("the agent connects");
    let id = tokio::time::timeout(Duration::from_secs(5), ids.recv()).await.unwrap().unwrap();
    assert_eq!(id, Some(Identity::new(Role::Agent, "gpu-1").unwrap()));
    dial(&agent, addr, "localhost").await.expect("by its DNS name too");
    ids.recv().await;

    // the server's certificate does not name the address dialled
    let e = dial(&agent, addr, "s2.example").await.expect_err("wrong name");
    assert!(e.to_string().contains("certificate"), "{e}");

    // a certificate from a foreign CA, and an expired one: refused
    let foreign = Tls::load(write(dir.path(), "foreign", &ca, &leaf(&other_ca, Role::Admin, "mallory", 30))).unwrap();
    assert!(dial(&foreign, addr, "127.0.0.1").await.is_err(), "a foreign CA's certificate");
    let expired = Tls::load(write(dir.path(), "expired", &ca, &leaf(&ca, Role::Admin, "old", -1))).unwrap();
    assert!(dial(&expired, addr, "127.0.0.1").await.is_err(), "an expired certificate");
    assert!(ids.try_recv().is_err(), "no refused connection reached the server");

    // rotation: the server moves to the other CA by replacing its files; no restart
    let rotated = leaf(&other_ca, Role::Peer, "s1", 30);
    std::fs::write(&server_tls.files().key, &rotated.key_pem).unwrap();
    std::fs::write(&server_tls.files().cert, &rotated.cert_pem).unwrap();
    std::fs::write(&server_tls.files().ca, &other_ca.cert_pem).unwrap();
    let new_client =
        Tls::load(write(dir.path(), "new", &other_ca, &leaf(&other_ca, Role::Admin, "alice", 30))).unwrap();
    dial(&new_client, addr, "127.0.0.1").await.expect("the new CA's certificates work at once");
    assert_eq!(ids.recv().await.unwrap(), Some(Identity::new(Role::Admin, "alice").unwrap()));
    assert!(dial(&agent, addr, "127.0.0.1").await.is_err(), "the old CA's no longer do");

    // a rotation caught half-written keeps the last good files
    std::fs::write(&server_tls.files().key, "not a key").unwrap();
    dial(&new_client, addr, "127.0.0.1").await.expect("still served with the last good certificate");
}

#[test]
fn partial_flags_and_bad_files_are_named() {
    use flotilla_security::{TlsArgs, TlsError};
    let dir = tempfile::tempdir().unwrap();
    let only_cert = TlsArgs { tls_cert: Some(dir.path().join("c.pem")), ..Default::default() };
    assert_eq!(only_cert.files(), Err(TlsError::Incomplete("--tls-key")));
    assert_eq!(TlsArgs::default().files(), Ok(None));
    let missing =
        TlsFiles { cert: dir.path().join("c.pem"), key: dir.path().join("k.pem"), ca: dir.path().join("ca.pem") };
    let e = Tls::load(missing.clone()).unwrap_err();
    assert!(e.to_string().contains("ca.pem"), "{e}");
    std::fs::write(dir.path().join("ca.pem"), create_ca("t", 1).unwrap().cert_pem).unwrap();
    let e = Tls::load(missing).unwrap_err();
    assert!(e.to_string().contains("c.pem"), "{e}");
    std::fs::write(dir.path().join("c.pem"), "garbage").unwrap();
    let e = Tls::load(TlsFiles {
        cert: dir.path().join("c.pem"),
        key: dir.path().join("k.pem"),
        ca: dir.path().join("ca.pem"),
    })
    .unwrap_err();
    assert!(e.to_string().contains("no PEM certificate"), "{e}");
}
