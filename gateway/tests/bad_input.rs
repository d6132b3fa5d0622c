//! Bad input gets a 4xx in OpenAI's error shape and the gateway keeps serving: malformed
//! JSON, missing or unknown model, oversized body, slowloris headers and bodies, invalid
//! header values, wrong methods and paths.

mod common;

use std::time::Duration;

use tokio::time::Instant;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_4xx_and_the_gateway_keeps_serving() {
    let sims = sims(1, 50.0).await;
    let mut args = gw_args(&sims);
    args.max_body_bytes = 4096;
    args.header_timeout_ms = 300;
    args.body_timeout_ms = 300;
    let gw = gateway(args).await;
    let addr = gw.local_addr();

    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("/v1/completions", b"{not json".to_vec(), 400, "invalid_json"),
        ("/v1/chat/completions", br#"{"messages":[{"role":"user","content":"x"}]}"#.to_vec(), 400, "missing_model"),
        ("/v1/completions", br#"{"model":"nope","prompt":"x"}"#.to_vec(), 404, "model_not_found"),
        ("/v1/completions", br#"{"model":"demo"}"#.to_vec(), 400, "missing_prompt"),
        (
            "/v1/completions",
            br#"{"model":"demo","prompt":"x","max_tokens":"many"}"#.to_vec(),
            400,
            "invalid_max_tokens",
        ),
        (
            "/v1/completions",
            format!(r#"{{"model":"demo","prompt":"{}"}}"#, "x".repeat(5000)).into_bytes(),
            413,
            "body_too_large",
        ),
    ];
    for (path, body, status, code) in cases {
        let r = send(addr, "POST", path, &body, &[]).await;
        assert_eq!(r.status, status, "{path}: {}", r.text());
        let v = r.json();
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(v["error"]["message"].is_string() && v["error"]["type"].is_string(), "{v}");
    }
    let r = complete(addr, "x", 1, &[("x-flotilla-priority", "urgent")]).await;
    assert_eq!((r.status, r.error_code().as_str()), (400, "invalid_priority"));
    let r = send(addr, "GET", "/v1/completions", b"", &[]).await;
    assert_eq!(r.status, 405);
    let r = send(addr, "GET", "/v2/whatever", b"", &[]).await;
    assert_eq!((r.status, r.error_code().as_str()), (404, "not_found"));

    // a header value with non-ASCII bytes
    let body = br#"{"model":"demo","prompt":"x","max_tokens":1}"#;
    let mut req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nx-session-id: ",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(b"caf\xe9\r\n\r\n");
    req.extend_from_slice(body);
    let out = raw(addr, &req).await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("invalid_header"), "{out}");

    // slowloris: headers never finish; the connection is closed, others are served
    let t = Instant::now();
    let slow =
        tokio::spawn(async move { raw(addr, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n").await });
    let r = complete(addr, "still serving", 2, &[]).await;
    assert_eq!(r.status, 200);
    let _ = slow.await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "slow header connection held for {:?}", t.elapsed());

    // slow body: 408
    let out = raw(addr, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"").await;
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");

    let r = complete(addr, "after all that", 2, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let health = get(addr, "/healthz").await;
    assert_eq!(health.status, 200);
    assert_eq!(get(addr, "/readyz").await.status, 200);
    let errors = metric_sum(addr, "flotilla_gateway_errors_total", &[]).await;
    assert!(errors >= 8.0, "errors counted: {errors}");
    gw.shutdown().await;
}
