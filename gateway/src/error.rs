//! Errors: [`GatewayError`] for start-up and serving failures, [`ApiError`] for answers to
//! clients in OpenAI's JSON shape `{"error":{"message","type","param","code"}}`, its
//! status, type and code taken from the [`ApiCode`] table.

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, StatusCode};

pub use crate::api_code::{ApiCode, ErrorType};

/// Why the gateway could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A flag is invalid (exit code 2).
    #[error("gateway.usage: {0}")]
    Usage(String),
    /// The listen address could not be bound.
    #[error("gateway.bind: cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    /// Serving failed.
    #[error("gateway.io: {0}")]
    Io(#[from] std::io::Error),
}

impl GatewayError {
    /// True for invalid input (exit code 2 rather than 1).
    pub fn is_usage(&self) -> bool {
        matches!(self, GatewayError::Usage(_))
    }

    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::Usage(_) => "gateway.usage",
            GatewayError::Bind { .. } => "gateway.bind",
            GatewayError::Io(_) => "gateway.io",
        }
    }
}

/// An error answered to a client: its [`ApiCode`] gives the status, type and code.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// Stable code, also the `code` metric label.
    pub code: ApiCode,
    pub message: String,
    pub param: Option<&'static str>,
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    pub fn new(code: ApiCode, message: impl Into<String>) -> Self {
        ApiError { code, message: message.into(), param: None, headers: Vec::new() }
    }
    /// The HTTP status, from the code.
    pub fn status(&self) -> StatusCode {
        self.code.status()
    }
    pub fn param(mut self, p: &'static str) -> Self {
        self.param = Some(p);
        self
    }
    pub fn header(mut self, name: &'static str, value: impl ToString) -> Self {
        self.headers.push((name, value.to_string()));
        self
    }
    /// `Retry-After: retry_after_s` (at least 1).
    pub fn retry_after(self, retry_after_s: u64) -> Self {
        self.header("retry-after", retry_after_s.max(1))
    }
    pub fn model_not_found(model: &str) -> Self {
        Self::new(ApiCode::ModelNotFound, format!("the model {model:?} does not exist or has no ready endpoint"))
            .param("model")
    }
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(ApiCode::UpstreamError, message)
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        let v = serde_json::json!({"error": {
            "message": self.message, "type": self.code.kind().as_str(), "param": self.param, "code": self.code.as_str(),
        }});
        Bytes::from(v.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = Response::new(axum::body::Body::from(self.body()));
        *r.status_mut() = self.status();
        let h = r.headers_mut();
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (k, v) in &self.headers {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.insert(*k, v);
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_has_openai_shape() {
        let e = ApiError::model_not_found("x");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["param"], "model");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("\"x\""));
        assert_eq!(e.status(), 404);
    }
}
