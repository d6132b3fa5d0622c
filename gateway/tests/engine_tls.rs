//! Engines serving TLS, learned through the endpoint watch with their certificate pin: the
//! gateway calls them over https on kept-alive connections (completions and streams); when
//! the table pins another certificate, or gives no pin (plain http), the engine gets no
//! request: the client sees 502 naming the reason and the endpoint is ejected as any failed
//! upstream.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::fake_cp::FakeCp;
use common::*;
use flotilla_engine::{CertFingerprint, EngineClient};
use flotilla_sim::SimHandle;
use flotilla_testkit::proxy::counting_proxy;

/// A sim on 127.0.0.1 serving TLS with a fresh self-signed certificate; its pin.
async fn tls_sim(dir: &Path) -> (SimHandle, CertFingerprint) {
    let pair = flotilla_security::certs::self_signed("127.0.0.1", 1).unwrap();
    std::fs::write(dir.join("cert.pem"), &pair.cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &pair.key_pem).unwrap();
    let args = flotilla_sim::SimArgs {
        ssl_certfile: Some(dir.join("cert.pem")),
        ssl_keyfile: Some(dir.join("key.pem")),
        ..sim_args(50.0)
    };
    (flotilla_sim::start(args).await.expect("sim starts with TLS"), CertFingerprint::of_der(&pair.cert_der))
}

/// Requests the engine finished, read over https with its pin.
async fn finished(engine: &SimHandle, pin: CertFingerprint) -> f64 {
    let client = EngineClient::new();
    let _hold = client.pins().hold("127.0.0.1", pin).unwrap();
    client.with_tls(true).metrics(&engine.local_addr().to_string()).await.expect("engine metrics").requests_finished
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_engine_is_reached_over_https_with_its_pin_and_a_wrong_pin_gets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, pin) = tls_sim(dir.path()).await;
    let (via, connections) = counting_proxy(engine.local_addr()).await;
    let cp = FakeCp::new(None);
    cp.put("Model", MODEL, serde_json::json!({"source": "hf://x/y"}));
    cp.set_pinned_endpoints(&[(MODEL, via, pin.hex().as_str())]);
    let (cp_addr, stop) = cp.clone().serve().await;
    let args = flotilla_gateway::GatewayArgs { eject_after_failures: 2, ..cluster_gw_args(cp_addr) };
    let gw = gateway(args).await;
    let addr = gw.local_addr();
    eventually(|| async { get(addr, "/readyz").await.status == 200 }).await;

    for i in 0..10 {
        let r = complete(addr, &format!("hello {i}"), 4, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.endpoint(), via.to_string());
    }
    let body =
        serde_json::json!({"model": MODEL, "prompt": "stream", "max_tokens": 4, "stream": true, "ignore_eos": true});
    let r = post(addr, "/v1/completions", body, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("data: [DONE]"), "{}", r.text());
    assert_eq!(connections.load(Ordering::SeqCst), 1, "sequential requests share one kept-alive TLS connection");
    let served = finished(&engine, pin).await;
    assert_eq!(served, 11.0);

    // The table pins another certificate: the engine gets no request, the client a 502.
    let other = CertFingerprint::of_der(b"some other certificate");
    cp.set_pinned_endpoints(&[(MODEL, via, other.hex().as_str())]);
    let mut last = None;
    // Requests answered before the gateway has the new table still reach the engine (200).
    let mut before_the_new_table = 0.0;
    for _ in 0..100 {
        let r = complete(addr, "secret prompt", 4, &[]).await;
        if r.status == 502 {
            last = Some(r);
            break;
        }
        if r.status == 200 {
            before_the_new_table += 1.0;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = last.expect("a 502 once the table pins another certificate");
    let text = r.text();
    assert!(text.contains("is not the one pinned for it") && text.contains(&pin.hex()), "{text}");
    let served = served + before_the_new_table;
    assert_eq!(finished(&engine, pin).await, served, "the refused request reached the engine");
    assert_eq!(complete(addr, "secret prompt", 4, &[]).await.status, 502);
    let ejected = metric_sum(addr, "flotilla_gateway_ejections_total", &[&via.to_string()]).await;
    assert!(ejected >= 1.0, "a pin mismatch is a failed upstream, ejected as any");

    // No pin at all: plain http to a TLS engine fails as well.
    cp.set_pinned_endpoints(&[(MODEL, engine.local_addr(), "")]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = complete(addr, "plain", 4, &[]).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(finished(&engine, pin).await, served);

    // The right pin again: served again.
    cp.set_pinned_endpoints(&[(MODEL, engine.local_addr(), pin.hex().as_str())]);
    let mut ok = false;
    for _ in 0..200 {
        if complete(addr, "again", 4, &[]).await.status == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "the engine is served again once the table pins its certificate");
    let _ = stop.send(());
    gw.shutdown().await;
}

async fn eventually<F, Fut>(mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("condition not met within 5 s");
}
