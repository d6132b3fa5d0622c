//! OpenAI-shaped errors as vLLM writes them:
//! `{"error":{"message":..,"type":"BadRequestError","param":..,"code":400}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// One sentence naming the field or value at fault.
    pub message: String,
    /// The request parameter at fault, if one.
    pub param: Option<&'static str>,
}

impl ApiError {
    /// 400 BadRequestError.
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into(), param }
    }

    /// 404 NotFoundError.
    pub fn not_found(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError { status: StatusCode::NOT_FOUND, message: message.into(), param }
    }

    /// Any status.
    pub fn with_status(status: StatusCode, message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError { status, message: message.into(), param }
    }

    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            400 | 413 | 422 => "BadRequestError",
            401 => "AuthenticationError",
            403 => "PermissionDeniedError",
            404 => "NotFoundError",
            429 => "RateLimitError",
            _ => "InternalServerError",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.status.as_u16(),
            }
        });
        (self.status, axum::Json(body)).into_response()
    }
}
