//! `--api-key` (or `VLLM_API_KEY`): the check vLLM's `AuthenticationMiddleware`
//! (`vllm/entrypoints/serve/middleware/authenticate.py`) makes, mirrored. With a key set,
//! a request whose path starts with `/v1`, `/v2`, `/inference` or `/cohere` (a plain
//! string prefix) and whose method is not OPTIONS needs `Authorization: Bearer KEY` (the
//! scheme in any case); otherwise it gets 401 with vLLM's body `{"error":"Unauthorized"}`.
//! Every other path (`/health`, `/metrics`, `/version`, `/tokenize`, `/sim/faults`) stays
//! open, as in vLLM. Keys are compared in constant time.
//!
//! [`authorized`] is the pure decision; [`layer`] applies it as an axum middleware.

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq as _;

use super::AppState;

/// Path prefixes vLLM guards.
const GUARDED_PREFIXES: [&str; 4] = ["/v1", "/v2", "/inference", "/cohere"];

/// The engine's API key; its `Debug` form hides it.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// `key`, or None when empty (vLLM ignores an empty key).
    pub fn new(key: &str) -> Option<ApiKey> {
        (!key.is_empty()).then(|| ApiKey(key.to_string()))
    }

    /// True when `presented` is the key (constant time for keys of equal length).
    fn matches(&self, presented: &str) -> bool {
        bool::from(self.0.as_bytes().ct_eq(presented.as_bytes()))
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Whether a request may pass: no key set, an unguarded path or OPTIONS, or an
/// `Authorization` value `<bearer in any case> <key>`.
pub fn authorized(key: Option<&ApiKey>, method: &Method, path: &str, authorization: Option<&[u8]>) -> bool {
    let Some(key) = key else { return true };
    if method == Method::OPTIONS || !GUARDED_PREFIXES.iter().any(|p| path.starts_with(p)) {
        return true;
    }
    let Some(value) = authorization.and_then(|v| std::str::from_utf8(v).ok()) else { return false };
    // Python's str.partition(" "): the scheme before the first space, the token after it.
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    scheme.eq_ignore_ascii_case("bearer") && key.matches(token)
}

/// The middleware: 401 `{"error":"Unauthorized"}` for a request [`authorized`] refuses.
pub async fn layer(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let auth = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
    if authorized(st.cfg.api_key.as_ref(), req.method(), req.uri().path(), auth) {
        return next.run(req).await;
    }
    (StatusCode::UNAUTHORIZED, axum::Json(serde_json::json!({"error": "Unauthorized"}))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_key_guards_and_what_it_accepts() {
        let key = ApiKey::new("k3y").unwrap();
        let k = Some(&key);
        let (get, post, options) = (Method::GET, Method::POST, Method::OPTIONS);
        let bearer: &[u8] = b"Bearer k3y";
        for (key, method, path, auth, want) in [
            (None, &post, "/v1/completions", None, true),
            (k, &post, "/v1/completions", Some(bearer), true),
            (k, &post, "/v1/completions", Some(b"bearer k3y".as_slice()), true),
            (k, &post, "/v1/completions", Some(b"BEARER k3y".as_slice()), true),
            (k, &post, "/v1/completions", None, false),
            (k, &post, "/v1/completions", Some(b"Bearer wrong".as_slice()), false),
            (k, &post, "/v1/completions", Some(b"Bearer k3y ".as_slice()), false),
            (k, &post, "/v1/completions", Some(b"Bearer  k3y".as_slice()), false),
            (k, &post, "/v1/completions", Some(b"Basic k3y".as_slice()), false),
            (k, &post, "/v1/completions", Some(b"k3y".as_slice()), false),
            (k, &post, "/v1/completions", Some(b"Bearer".as_slice()), false),
            (k, &post, "/v1/completions", Some(b"Bearer \xff".as_slice()), false),
            (k, &get, "/v1/models", None, false),
            (k, &post, "/v1/load_lora_adapter", None, false),
            (k, &get, "/v1/no-such-route", None, false),
            (k, &get, "/v1x", None, false),
            (k, &post, "/v2/rerank", None, false),
            (k, &post, "/inference/v1/generate", None, false),
            (k, &post, "/cohere/v2/chat", None, false),
            (k, &options, "/v1/completions", None, true),
            (k, &get, "/health", None, true),
            (k, &get, "/metrics", None, true),
            (k, &get, "/version", None, true),
            (k, &post, "/tokenize", None, true),
            (k, &post, "/sim/faults", None, true),
        ] {
            assert_eq!(authorized(key, method, path, auth), want, "{method} {path} {auth:?}");
        }
    }

    #[test]
    fn empty_keys_are_no_keys_and_debug_hides_the_key() {
        assert!(ApiKey::new("").is_none());
        assert!(!format!("{:?}", ApiKey::new("s3cret").unwrap()).contains("s3cret"));
    }
}
