//! The global gateway's HTTP surface: the OpenAI paths the cluster gateway serves
//! (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings` forwarded to a member by
//! [`super::proxy::forward`]; `/v1/models` merged across the members that are up, asked with
//! the caller's own key so each member filters what its tenant may see), `/metrics`,
//! `/healthz`, `/readyz`. The request pipeline: auth stance, region header, bounded body,
//! the fields routing reads, forward.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use tokio::time::Instant;

use super::config::check_region;
use super::proxy::{own_error, Ask, CLUSTER_HEADER};
use super::Federation;
use crate::error::{ApiCode, ApiError};

/// The request header naming the region a request prefers.
pub const REGION_HEADER: &str = "x-flotilla-region";

/// The public router (and `/metrics` unless `--metrics-listen` moves it).
pub fn router(fed: Arc<Federation>) -> Router {
    let mut app = Router::new()
        .route("/v1/chat/completions", post(proxy))
        .route("/v1/completions", post(proxy))
        .route("/v1/embeddings", post(proxy))
        .route("/v1/models", get(models));
    if fed.cfg.base.metrics_listen.is_none() {
        app = app.route("/metrics", get(metrics));
    }
    app.route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(fed)
}

/// The `--metrics-listen` router: `/metrics` only.
pub fn metrics_router(fed: Arc<Federation>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(fed)
}

async fn not_found(req: Request) -> Response {
    ApiError::new(ApiCode::NotFound, format!("no route for {}", req.uri().path())).into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    ApiError::new(ApiCode::MethodNotAllowed, format!("{} is not allowed on {}", req.method(), req.uri().path()))
        .into_response()
}

async fn metrics(State(fed): State<Arc<Federation>>) -> Response {
    ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], fed.metrics.encode()).into_response()
}

async fn readyz(State(fed): State<Arc<Federation>>) -> Response {
    let t = fed.members.snapshot();
    let up = t.values().filter(|m| m.is_up()).count();
    if up > 0 {
        (StatusCode::OK, format!("ready: {up} of {} member clusters up\n", t.len())).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: none of {} member clusters up\n", t.len()))
            .into_response()
    }
}

/// The auth stance (pure): with auth on, a request must carry `Authorization: Bearer KEY`,
/// which the members check (the global gateway holds no tenants); it is passed on unchanged.
pub fn check_auth(auth: bool, h: &HeaderMap) -> Result<(), ApiError> {
    if !auth {
        return Ok(());
    }
    let bad = |m: &str| ApiError::new(ApiCode::InvalidApiKey, m);
    let Some(v) = h.get(http::header::AUTHORIZATION) else {
        return Err(bad("missing Authorization: Bearer API key (the member clusters check it)"));
    };
    let v = v.to_str().map_err(|_| bad("the Authorization header is not valid text"))?;
    let key = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).map(str::trim).unwrap_or("");
    if key.is_empty() {
        return Err(bad("the Authorization header must be 'Bearer API_KEY'"));
    }
    Ok(())
}

/// The region a request prefers (pure): its `x-flotilla-region`, else `default`.
pub fn region_of(h: &HeaderMap, default: Option<&str>) -> Result<Option<String>, ApiError> {
    match h.get(REGION_HEADER) {
        None => Ok(default.map(str::to_string)),
        Some(v) => {
            let r = v.to_str().ok().map(str::trim).ok_or_else(|| {
                ApiError::new(ApiCode::InvalidHeader, format!("header {REGION_HEADER} is not visible ASCII"))
            })?;
            check_region(r)
                .map_err(|e| ApiError::new(ApiCode::InvalidHeader, format!("header {REGION_HEADER}: {e}")))?;
            Ok(Some(r.to_string()))
        }
    }
}

async fn proxy(State(fed): State<Arc<Federation>>, req: Request) -> Response {
    let start = Instant::now();
    let Some(kind) = crate::layers::kind_of(req.uri().path()) else {
        return own_error(&fed, ApiError::new(ApiCode::NotFound, format!("no route for {}", req.uri().path())));
    };
    if let Err(e) = check_auth(fed.cfg.base.auth, req.headers()) {
        return own_error(&fed, e);
    }
    let region = match region_of(req.headers(), fed.cfg.region.as_deref()) {
        Ok(r) => r,
        Err(e) => return own_error(&fed, e),
    };
    let (parts, body) = req.into_parts();
    let bytes = match crate::layers::collect_body(body, fed.cfg.base.max_body_bytes, fed.cfg.base.body_timeout).await {
        Ok(b) => b,
        Err(e) => return own_error(&fed, e),
    };
    let features = match crate::request::parse(kind, &bytes) {
        Ok(f) => f,
        Err(e) => return own_error(&fed, e),
    };
    let path_and_query = parts.uri.path_and_query().map_or(kind.path(), |p| p.as_str());
    let ask = Ask {
        path_and_query,
        headers: &parts.headers,
        body: bytes,
        model: &features.model,
        stream: features.stream,
        region: region.as_deref(),
        start,
    };
    super::proxy::forward(&fed, ask).await
}

/// Headers of a client's `/v1/models` passed to the members.
const MODELS_HEADERS: [&str; 3] = ["authorization", "accept", "x-request-id"];

/// One member's `/v1/models` answer to the client's own key.
async fn ask_models(
    fed: &Federation,
    m: &super::members::Member,
    h: &HeaderMap,
) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let uri = m.info.gateway.uri("/v1/models").map_err(|e| e.to_string())?;
    let mut b = http::Request::get(uri);
    for name in MODELS_HEADERS {
        if let Some(v) = h.get(name) {
            b = b.header(name, v.clone());
        }
    }
    let req = b.body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
    let fetch = async {
        let resp = fed.client.request(req).await.map_err(|e| super::proxy::error_chain(&e))?;
        let (parts, body) = resp.into_parts();
        let body =
            Limited::new(body, super::poll::MAX_MODELS_BODY).collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((parts.status, parts.headers, body))
    };
    tokio::time::timeout(fed.cfg.poll_timeout, fetch).await.map_err(|_| "timed out".to_string())?
}

/// Merges members' `/v1/models` lists (pure): every entry once, by `id`, in order.
pub fn merge_models(lists: &[Bytes]) -> serde_json::Value {
    let mut seen = BTreeSet::new();
    let mut data = Vec::new();
    for body in lists {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else { continue };
        for entry in v.get("data").and_then(serde_json::Value::as_array).into_iter().flatten() {
            if let Some(id) = entry.get("id").and_then(serde_json::Value::as_str) {
                if seen.insert(id.to_string()) {
                    data.push(entry.clone());
                }
            }
        }
    }
    serde_json::json!({"object": "list", "data": data})
}

/// `GET /v1/models`: the models of every member that is up, asked with the caller's key
/// (each member lists what the caller's tenant may use there), merged.
async fn models(State(fed): State<Arc<Federation>>, headers: HeaderMap) -> Response {
    if let Err(e) = check_auth(fed.cfg.base.auth, &headers) {
        return own_error(&fed, e);
    }
    let t = fed.members.snapshot();
    let mut members: Vec<_> = t.values().filter(|m| m.is_up()).cloned().collect();
    if members.is_empty() {
        members = t.values().cloned().collect();
    }
    let mut set = tokio::task::JoinSet::new();
    for (i, m) in members.into_iter().enumerate() {
        let (fed, headers) = (fed.clone(), headers.clone());
        set.spawn(async move { (i, m.info.name.to_string(), ask_models(&fed, &m, &headers).await) });
    }
    let mut answers = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(a) = r {
            answers.push(a);
        }
    }
    answers.sort_by_key(|(i, _, _)| *i);
    let ok: Vec<Bytes> = answers
        .iter()
        .filter_map(|(_, _, r)| r.as_ref().ok().filter(|(s, _, _)| *s == StatusCode::OK).map(|(_, _, b)| b.clone()))
        .collect();
    if !ok.is_empty() {
        fed.metrics.request("none", "unknown", "200");
        return axum::Json(merge_models(&ok)).into_response();
    }
    // no list: a member's own answer (a 401 for an unknown key), else 503
    if let Some((_, cluster, Ok((status, h, body)))) = answers.into_iter().find(|(_, _, r)| r.is_ok()) {
        fed.metrics.request(&cluster, "unknown", status.as_str());
        let mut b = http::Response::builder().status(status).header(CLUSTER_HEADER, cluster);
        if let Some(ct) = h.get(http::header::CONTENT_TYPE) {
            b = b.header(http::header::CONTENT_TYPE, ct.clone());
        }
        return b
            .body(Body::from(body))
            .unwrap_or_else(|e| ApiError::new(ApiCode::Internal, e.to_string()).into_response());
    }
    own_error(&fed, ApiError::new(ApiCode::NoEndpoints, "no member cluster's gateway answered").retry_after(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn auth_needs_a_bearer_key_unless_off() {
        assert!(check_auth(true, &headers(&[("authorization", "Bearer sk-1")])).is_ok());
        assert!(check_auth(false, &headers(&[])).is_ok());
        for h in [headers(&[]), headers(&[("authorization", "Basic x")]), headers(&[("authorization", "Bearer  ")])] {
            let e = check_auth(true, &h).unwrap_err();
            assert_eq!((e.code, e.status()), (ApiCode::InvalidApiKey, StatusCode::UNAUTHORIZED));
        }
    }

    #[test]
    fn the_region_header_wins_over_the_default() {
        assert_eq!(region_of(&headers(&[]), Some("us")).unwrap().as_deref(), Some("us"));
        assert_eq!(region_of(&headers(&[]), None).unwrap(), None);
        assert_eq!(region_of(&headers(&[(REGION_HEADER, "eu")]), Some("us")).unwrap().as_deref(), Some("eu"));
        let e = region_of(&headers(&[(REGION_HEADER, "a,b")]), None).unwrap_err();
        assert_eq!(e.code, ApiCode::InvalidHeader);
        assert!(e.message.contains(REGION_HEADER));
    }

    #[test]
    fn model_lists_merge_by_id() {
        let a = Bytes::from_static(br#"{"object":"list","data":[{"id":"llama","owned_by":"a"},{"id":"sql"}]}"#);
        let b = Bytes::from_static(br#"{"object":"list","data":[{"id":"llama","owned_by":"b"},{"id":"qwen"}]}"#);
        let v = merge_models(&[a, Bytes::from_static(b"junk"), b]);
        let ids: Vec<&str> = v["data"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["llama", "sql", "qwen"]);
        assert_eq!(v["data"][0]["owned_by"], "a");
        assert_eq!(v["object"], "list");
    }
}
