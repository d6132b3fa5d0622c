//! The request-path layers of the proxied OpenAI endpoints, pushed one at a time onto the
//! service stack (outermost first); each reads what the previous ones put into the
//! request's extensions and either adds its own or answers with an [`ApiError`]:
//!
//! ```text
//! auth ──Caller──> policy ──Policy──> body ──Parsed──> limits ──Remaining──> proxy handler
//! (key->tenant)   (priority,       (size, timeout,    (in flight,            (QoS queue, routing,
//!                  routing,         parse features)    allowed model,         retries, stream)
//!                  session)                            RPM/TPM)
//! ```

use std::str::FromStr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use flotilla_api::spec::{PriorityClass, RoutingStrategy};
use http::HeaderMap;
use http_body_util::{BodyExt, Limited};
use tokio::time::Instant;

use crate::concurrency::{self, Permit};
use crate::error::{ApiCode, ApiError};
use crate::limits::Remaining;
use crate::metrics::TenantLabels;
use crate::request::{self, ApiKind, RequestFeatures};
use crate::routing::parse_override;
use crate::state::Gateway;
use crate::table::Tenant;

/// The tenant of requests when auth is off.
pub const ANONYMOUS: &str = "anonymous";

/// Who is calling (set by [`auth`]).
#[derive(Debug, Clone)]
pub struct Caller {
    /// None when auth is off.
    pub tenant: Option<Arc<Tenant>>,
    pub name: String,
}

impl Caller {
    /// The tenant's name; None when auth is off.
    pub fn tenant_name(&self) -> Option<&str> {
        self.tenant.as_ref().map(|t| t.name.as_str())
    }
}

/// Per-request choices from headers (set by [`policy`]).
#[derive(Debug, Clone)]
pub struct Policy {
    pub class: PriorityClass,
    pub routing: Option<RoutingStrategy>,
    pub session: Option<String>,
    /// `x-flotilla-explain-route: true`: answer with `x-flotilla-route`.
    pub explain_route: bool,
}

/// The body and what routing needs of it (set by [`body`]).
#[derive(Debug, Clone)]
pub struct Parsed {
    pub kind: ApiKind,
    pub bytes: Bytes,
    pub features: RequestFeatures,
}

fn fail(gw: &Gateway, model: &str, e: ApiError) -> Response {
    gw.metrics.error(model, e.code.as_str());
    e.into_response()
}

fn header_str<'a>(h: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, ApiError> {
    match h.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| ApiError::new(ApiCode::InvalidHeader, format!("header {name} is not visible ASCII"))),
    }
}

/// Resolves the caller's tenant from `Authorization: Bearer KEY` (None when auth is off).
pub fn authenticate(gw: &Gateway, h: &HeaderMap) -> Result<Option<Arc<Tenant>>, ApiError> {
    if !gw.cfg.auth {
        return Ok(None);
    }
    let unauthorized = |m: &str| ApiError::new(ApiCode::InvalidApiKey, m);
    let v = header_str(h, "authorization").map_err(|_| unauthorized("the Authorization header is not valid text"))?;
    let Some(v) = v else {
        return Err(unauthorized("missing Authorization: Bearer API key"));
    };
    let key = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).map(str::trim).unwrap_or("");
    if key.is_empty() {
        return Err(unauthorized("the Authorization header must be 'Bearer API_KEY'"));
    }
    gw.dir.tenants().lookup(key).map(Some).ok_or_else(|| unauthorized("incorrect API key provided"))
}

/// Layer 1: API key -> tenant (401 when unknown).
pub async fn auth(State(gw): State<Arc<Gateway>>, mut req: Request, next: Next) -> Response {
    match authenticate(&gw, req.headers()) {
        Ok(tenant) => {
            let name = tenant.as_ref().map_or(ANONYMOUS.to_string(), |t| t.name.clone());
            req.extensions_mut().insert(Caller { tenant, name });
            next.run(req).await
        }
        Err(e) => fail(&gw, "unknown", e),
    }
}

/// Parses the policy headers (pure).
pub fn parse_policy(h: &HeaderMap, caller: Option<&Caller>) -> Result<Policy, ApiError> {
    let class = match header_str(h, "x-flotilla-priority")? {
        Some(p) => PriorityClass::from_str(p.trim()).map_err(|_| {
            ApiError::new(
                ApiCode::InvalidPriority,
                format!("x-flotilla-priority {p:?} is not one of critical, standard, sheddable"),
            )
        })?,
        None => caller.and_then(|c| c.tenant.as_ref()).map_or(PriorityClass::Standard, |t| t.spec.priority),
    };
    // a tenant may lower its priority but not raise it above its own class
    let class = match caller.and_then(|c| c.tenant.as_ref()) {
        Some(t) => class.max(t.spec.priority),
        None => class,
    };
    let routing = match header_str(h, "x-flotilla-routing")? {
        Some(r) => Some(parse_override(r).map_err(|m| ApiError::new(ApiCode::InvalidRouting, m))?),
        None => None,
    };
    let session = header_str(h, "x-session-id")?.map(str::to_string);
    let explain_route = match header_str(h, "x-flotilla-explain-route")?.map(str::trim) {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(v) => {
            return Err(ApiError::new(
                ApiCode::InvalidRouting,
                format!("x-flotilla-explain-route {v:?} is not one of true, false"),
            ))
        }
    };
    Ok(Policy { class, routing, session, explain_route })
}

/// Layer 2: `x-flotilla-priority` (else the tenant's default; never above the tenant's
/// class), `x-flotilla-routing`,
/// `x-session-id` (400 on invalid values).
pub async fn policy(State(gw): State<Arc<Gateway>>, mut req: Request, next: Next) -> Response {
    match parse_policy(req.headers(), req.extensions().get::<Caller>()) {
        Ok(p) => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Err(e) => fail(&gw, "unknown", e),
    }
}

pub(crate) fn kind_of(path: &str) -> Option<ApiKind> {
    [ApiKind::Chat, ApiKind::Completions, ApiKind::Embeddings, ApiKind::Tokenize, ApiKind::Detokenize]
        .into_iter()
        .find(|k| k.path() == path)
}

/// Reads a request body of at most `max_bytes` (413 `body_too_large`) within `timeout`
/// (408 `body_timeout`).
pub async fn collect_body(
    body: axum::body::Body,
    max_bytes: usize,
    timeout: std::time::Duration,
) -> Result<Bytes, ApiError> {
    let limited = Limited::new(body, max_bytes);
    match tokio::time::timeout(timeout, limited.collect()).await {
        Err(_) => Err(ApiError::new(
            ApiCode::BodyTimeout,
            format!("request body not received within {} ms", timeout.as_millis()),
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::new(ApiCode::BodyTooLarge, format!("request body exceeds {max_bytes} bytes")))
        }
        Ok(Err(e)) => Err(ApiError::new(ApiCode::BodyReadError, format!("cannot read request body: {e}"))),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// Layer 3: reads the body within the size limit (413) and the body timeout (408), and
/// parses the routing features (400). The bytes travel on unchanged.
pub async fn body(State(gw): State<Arc<Gateway>>, req: Request, next: Next) -> Response {
    let Some(kind) = kind_of(req.uri().path()) else {
        return next.run(req).await;
    };
    let (mut parts, body) = req.into_parts();
    let bytes = match collect_body(body, gw.cfg.max_body_bytes, gw.cfg.body_timeout).await {
        Ok(b) => b,
        Err(e) => return fail(&gw, "unknown", e),
    };
    let mut features = match request::parse(kind, &bytes) {
        Ok(f) => f,
        Err(e) => return fail(&gw, "unknown", e),
    };
    if let Some(p) = parts.extensions.get::<Policy>() {
        features.session = p.session.clone();
        features.explain_route = p.explain_route;
    }
    parts.extensions.insert(Parsed { kind, bytes, features });
    next.run(Request::from_parts(parts, axum::body::Body::empty())).await
}

fn allowed(t: &Tenant, model: &str) -> bool {
    t.spec.models.is_empty() || t.spec.models.iter().any(|m| m.as_str() == model)
}

/// The tenant may use the model (403 otherwise).
pub fn check_allowed(gw: &Gateway, caller: &Caller, model: &str) -> Result<(), ApiError> {
    match &caller.tenant {
        Some(t) if !allowed(t, model) => {
            gw.metrics.reject(&t.name, ApiCode::ModelNotAllowed.as_str());
            Err(ApiError::new(ApiCode::ModelNotAllowed, format!("tenant {:?} may not use model {model:?}", t.name))
                .param("model"))
        }
        _ => Ok(()),
    }
}

/// The tenant's allowed models and RPM/TPM (pure apart from the limit counters).
pub fn check_tenant(gw: &Gateway, caller: &Caller, model: &str) -> Result<Remaining, ApiError> {
    check_allowed(gw, caller, model)?;
    let Some(t) = &caller.tenant else { return Ok(Remaining::default()) };
    gw.limits.admit(&t.name, &t.spec, Instant::now()).map_err(|d| {
        gw.metrics.reject(&t.name, d.limit_name);
        let rpm = d.limit_name == "rpm";
        let e = ApiError::new(
            if rpm { ApiCode::RpmLimitExceeded } else { ApiCode::TpmLimitExceeded },
            format!(
                "tenant {:?} is over its {} limit of {} {} per minute",
                t.name,
                d.limit_name,
                d.limit,
                if rpm { "requests" } else { "tokens" }
            ),
        )
        .retry_after(d.retry_after_s);
        if rpm {
            e.header("x-ratelimit-limit-requests", d.limit).header("x-ratelimit-remaining-requests", 0)
        } else {
            e.header("x-ratelimit-limit-tokens", d.limit).header("x-ratelimit-remaining-tokens", 0)
        }
    })
}

/// The tenant's place among its requests in flight (`concurrency`): None when auth is off
/// (429 at the bound, before RPM counts the request).
pub fn check_concurrency(gw: &Gateway, caller: &Caller) -> Result<Option<Permit>, ApiError> {
    let Some(t) = &caller.tenant else { return Ok(None) };
    let limit =
        concurrency::limit_for(t.spec.max_concurrent_requests, gw.cfg.tenant_max_concurrency, gw.cfg.gateway_replicas);
    gw.in_flight.acquire(&t.name, limit).map(Some).map_err(|busy| {
        gw.metrics.reject(&t.name, "concurrency");
        ApiError::new(
            ApiCode::ConcurrencyLimitExceeded,
            format!(
                "tenant {:?} is at its limit of {} concurrent requests (max_concurrent_requests); retry when one ends",
                t.name, busy.limit
            ),
        )
        .retry_after(1)
    })
}

/// Layer 4: the tenant is within its concurrent requests (429), may use the model (403)
/// and is within its RPM/TPM (429). The concurrency permit is held by the response body,
/// so a stream keeps its place until it ends or the client leaves.
pub async fn limits(State(gw): State<Arc<Gateway>>, mut req: Request, next: Next) -> Response {
    let (Some(caller), Some(parsed)) = (req.extensions().get::<Caller>(), req.extensions().get::<Parsed>()) else {
        return next.run(req).await;
    };
    let model = parsed.features.model.clone();
    let permit = match check_concurrency(&gw, caller) {
        Ok(p) => p,
        Err(e) => return fail(&gw, &gw.model_label(&model, Some(e.code)), e),
    };
    match check_tenant(&gw, caller, &model) {
        Ok(remaining) => {
            gw.metrics.tenant_requests.get_or_create(&TenantLabels { tenant: caller.name.clone() }).inc();
            req.extensions_mut().insert(remaining);
            crate::trace::admitted(&mut req);
            let resp = next.run(req).await;
            match permit {
                // the closure owns the permit: it is released when the body is dropped
                Some(permit) => resp.map(|b| {
                    axum::body::Body::new(b.map_frame(move |f| {
                        let _held = &permit;
                        f
                    }))
                }),
                None => resp,
            }
        }
        Err(e) => fail(&gw, &gw.model_label(&model, Some(e.code)), e),
    }
}

/// `/v1/models` filtered to what the caller may use.
pub fn visible(caller: Option<&Tenant>, model: &str) -> bool {
    caller.is_none_or(|t| allowed(t, model))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::post;
    use axum::Router;
    use tower::ServiceExt;

    fn gw(auth: bool) -> Arc<Gateway> {
        let args = crate::GatewayArgs {
            backends: vec!["m=127.0.0.1:1".into()],
            no_auth: !auth,
            max_body_bytes: 2048,
            ..Default::default()
        };
        let gw = Gateway::new(args.validate().unwrap());
        let spec = |rpm| flotilla_api::spec::TenantSpec {
            rpm,
            tpm: 0,
            priority: PriorityClass::Critical,
            models: vec![],
            api_keys: vec!["key-tenant-1".into()],
            keys: vec![],
            max_concurrent_requests: None,
        };
        gw.dir.set_tenants(crate::table::Tenants::from_tenants([Tenant { name: "t".into(), spec: spec(1) }]));
        Arc::new(gw)
    }

    /// The stack under test, with a handler that echoes what the layers found.
    fn app(gw: Arc<Gateway>) -> Router {
        async fn echo(req: Request) -> String {
            let e = req.extensions();
            format!(
                "{}|{:?}|{}|{}",
                e.get::<Caller>().map_or("-".into(), |c| c.name.clone()),
                e.get::<Policy>().map(|p| p.class),
                e.get::<Parsed>().map_or("-".into(), |p| p.features.model.clone()),
                e.get::<Remaining>().is_some()
            )
        }
        use axum::middleware::from_fn_with_state as mw;
        Router::new().route("/v1/completions", post(echo)).layer(
            tower::ServiceBuilder::new()
                .layer(mw(gw.clone(), auth))
                .layer(mw(gw.clone(), policy))
                .layer(mw(gw.clone(), body))
                .layer(mw(gw, limits)),
        )
    }

    async fn call(app: &Router, headers: &[(&str, &str)], body: &str) -> (u16, String) {
        let mut b = http::Request::post("/v1/completions");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = app.clone().oneshot(b.body(axum::body::Body::from(body.to_string())).unwrap()).await.unwrap();
        let status = resp.status().as_u16();
        let text = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
        (status, text)
    }

    #[tokio::test]
    async fn layers_fill_extensions_in_order() {
        let app = app(gw(true));
        let key = [("authorization", "Bearer key-tenant-1")];
        let ok = r#"{"model":"m","prompt":"x"}"#;
        assert_eq!(call(&app, &key, ok).await, (200, "t|Some(Critical)|m|true".into()));
        // rpm 1: the second is refused by the limits layer
        let (s, body) = call(&app, &key, ok).await;
        assert_eq!(s, 429, "{body}");
        assert!(body.contains("rpm_limit_exceeded"));
    }

    #[tokio::test]
    async fn each_layer_rejects_its_own_bad_input() {
        let app = app(gw(true));
        let ok = r#"{"model":"m","prompt":"x"}"#;
        assert_eq!(call(&app, &[], ok).await.0, 401);
        assert_eq!(call(&app, &[("authorization", "Bearer nope-nope-1")], ok).await.0, 401);
        let key = ("authorization", "Bearer key-tenant-1");
        let (s, b) = call(&app, &[key, ("x-flotilla-priority", "vip")], ok).await;
        assert_eq!(s, 400);
        assert!(b.contains("invalid_priority"));
        let (s, b) = call(&app, &[key], &"x".repeat(4096)).await;
        assert_eq!(s, 413);
        assert!(b.contains("body_too_large"));
        let (s, b) = call(&app, &[key], "{").await;
        assert_eq!(s, 400);
        assert!(b.contains("invalid_json"));
    }

    #[test]
    fn tenants_cannot_raise_their_priority() {
        let t = |p| Caller {
            tenant: Some(Arc::new(Tenant {
                name: "t".into(),
                spec: flotilla_api::spec::TenantSpec {
                    rpm: 0,
                    tpm: 0,
                    priority: p,
                    models: vec![],
                    api_keys: vec![],
                    keys: vec![],
                    max_concurrent_requests: None,
                },
            })),
            name: "t".into(),
        };
        let mut h = HeaderMap::new();
        h.insert("x-flotilla-priority", "critical".parse().unwrap());
        let std = t(PriorityClass::Standard);
        assert_eq!(parse_policy(&h, Some(&std)).unwrap().class, PriorityClass::Standard);
        assert_eq!(parse_policy(&h, Some(&t(PriorityClass::Critical))).unwrap().class, PriorityClass::Critical);
        assert_eq!(parse_policy(&h, None).unwrap().class, PriorityClass::Critical, "auth off: as asked");
        h.insert("x-flotilla-priority", "sheddable".parse().unwrap());
        assert_eq!(parse_policy(&h, Some(&std)).unwrap().class, PriorityClass::Sheddable);
        assert_eq!(parse_policy(&HeaderMap::new(), Some(&std)).unwrap().class, PriorityClass::Standard);
    }

    #[tokio::test]
    async fn auth_off_is_anonymous_without_limits() {
        let app = app(gw(false));
        let (s, b) = call(&app, &[("x-flotilla-priority", "sheddable")], r#"{"model":"m","prompt":"x"}"#).await;
        assert_eq!((s, b.as_str()), (200, "anonymous|Some(Sheddable)|m|true"));
    }
}
