//! Tenants from the control plane's `Tenant` objects: API keys (hashed) map to tenants,
//! unknown keys get 401, RPM and TPM limits answer 429 naming the limit with rate-limit
//! headers (TPM counts streamed usage the client did not ask for), allowed models hold.

mod common;

use std::time::Duration;

use common::fake_cp::FakeCp;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rpm_and_tpm_limits_are_enforced() {
    let sims = sims(1, 50.0).await;
    let cp = FakeCp::new(None);
    cp.put(
        "Tenant",
        "alpha",
        serde_json::json!({"rpm": 3, "api_keys": [flotilla_api::spec::hash_api_key("key-alpha-1")]}),
    );
    cp.put(
        "Tenant",
        "beta",
        serde_json::json!({"tpm": 50, "api_keys": [flotilla_api::spec::hash_api_key("key-beta-01")]}),
    );
    cp.put(
        "Tenant",
        "gamma",
        serde_json::json!({"models": ["other"], "api_keys": [flotilla_api::spec::hash_api_key("key-gamma-1")]}),
    );
    let (cp_addr, _stop) = cp.clone().serve().await;
    let mut args = gw_args(&sims);
    args.no_auth = false;
    args.server = vec![cp_addr.to_string()];
    let gw = gateway(args).await;
    let addr = gw.local_addr();
    let alpha = [("authorization", "Bearer key-alpha-1")];
    // wait for the tenant list (the first probe counts against alpha's RPM, so use gamma)
    let mut loaded = false;
    for _ in 0..100 {
        if get_models(addr, "key-gamma-1").await == 200 {
            loaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(loaded, "tenants never loaded");

    let r = complete(addr, "x", 1, &[]).await;
    assert_eq!((r.status, r.error_code().as_str()), (401, "invalid_api_key"));
    let r = complete(addr, "x", 1, &[("authorization", "Bearer wrong-key-123")]).await;
    assert_eq!((r.status, r.error_code().as_str()), (401, "invalid_api_key"));
    let r = complete(addr, "x", 1, &[("authorization", "Bearer key-gamma-1")]).await;
    assert_eq!((r.status, r.error_code().as_str()), (403, "model_not_allowed"));

    for left in [2, 1, 0] {
        let r = complete(addr, "x", 1, &alpha).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some(left.to_string()));
        assert_eq!(r.header("x-ratelimit-limit-requests").as_deref(), Some("3"));
    }
    let r = complete(addr, "x", 1, &alpha).await;
    assert_eq!((r.status, r.error_code().as_str()), (429, "rpm_limit_exceeded"));
    assert!(r.text().contains("rpm limit of 3"), "{}", r.text());
    assert!(r.header("retry-after").is_some_and(|v| v.parse::<u64>().unwrap() >= 1));
    assert_eq!(r.header("x-ratelimit-remaining-requests").as_deref(), Some("0"));

    // TPM: a stream whose client did not ask for usage still counts its tokens
    let beta = [("authorization", "Bearer key-beta-01")];
    let body = serde_json::json!({"model": MODEL, "prompt": "count to forty", "max_tokens": 40, "ignore_eos": true, "stream": true});
    let r = post(addr, "/v1/completions", body, &beta).await;
    assert_eq!(r.status, 200);
    assert!(!r.text().contains("\"usage\":{"), "usage chunk leaked: {}", r.text());
    let r = complete(addr, "x", 10, &beta).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = complete(addr, "x", 10, &beta).await;
    assert_eq!((r.status, r.error_code().as_str()), (429, "tpm_limit_exceeded"), "{}", r.text());
    assert!(r.text().contains("tpm limit of 50"), "{}", r.text());
    assert_eq!(r.header("x-ratelimit-limit-tokens").as_deref(), Some("50"));
    assert!(r.header("retry-after").is_some());

    let rej =
        metric_sum(addr, "flotilla_gateway_tenant_rejections_total", &["tenant=\"alpha\"", "reason=\"rpm\""]).await;
    assert_eq!(rej, 1.0);
    let used =
        metric_sum(addr, "flotilla_gateway_tenant_tokens_total", &["tenant=\"beta\"", "direction=\"out\""]).await;
    assert_eq!(used, 50.0);
    gw.shutdown().await;
}

async fn get_models(addr: std::net::SocketAddr, key: &str) -> u16 {
    let auth = format!("Bearer {key}");
    send(addr, "GET", "/v1/models", b"", &[("authorization", &auth)]).await.status
}
