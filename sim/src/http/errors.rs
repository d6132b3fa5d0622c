//! OpenAI-shaped errors as vLLM writes them:
//! `{"error":{"message":..,"type":"BadRequestError","param":..,"code":400}}`.

use std::borrow::Cow;

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
    /// The request parameter at fault, if one (`body.messages` style for validation errors).
    pub param: Option<Cow<'static, str>>,
    /// The `type` vLLM writes when it is not the status's usual one (e.g. `InvalidUserInput`).
    pub err_type: Option<&'static str>,
}

impl ApiError {
    /// 400 BadRequestError.
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: param.map(Cow::Borrowed),
            err_type: None,
        }
    }

    /// 400 for a body that does not decode into the request type, written like vLLM's
    /// (FastAPI/pydantic) request validation error: `type` "Bad Request", `param` the
    /// location (`body.messages`, `body.messages.0.role`; `body.<offset>` for bad JSON).
    pub fn validation(err: &serde_path_to_error::Error<serde_json::Error>) -> Self {
        let inner = err.inner();
        let msg = inner.to_string();
        let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
        let (kind, loc) = if inner.is_syntax() || inner.is_eof() {
            ("json_invalid", format!("body.{}", inner.column().saturating_sub(1)))
        } else {
            let mut loc = String::from("body");
            for seg in err.path().iter() {
                use serde_path_to_error::Segment;
                match seg {
                    Segment::Seq { index } => loc.push_str(&format!(".{index}")),
                    Segment::Map { key } | Segment::Enum { variant: key } => loc.push_str(&format!(".{key}")),
                    Segment::Unknown => {}
                }
            }
            // serde reports a missing field at its parent; pydantic at the field.
            match msg.strip_prefix("missing field `").and_then(|r| r.strip_suffix('`')) {
                Some(field) => {
                    loc.push('.');
                    loc.push_str(field);
                    ("missing", loc)
                }
                None => ("invalid_type", loc),
            }
        };
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!("1 validation error:\n  {{'type': '{kind}', 'loc': '{loc}', 'msg': '{msg}'}}"),
            param: Some(Cow::Owned(loc)),
            err_type: Some("Bad Request"),
        }
    }

    /// 404 NotFoundError.
    pub fn not_found(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            param: param.map(Cow::Borrowed),
            err_type: None,
        }
    }

    /// Any status.
    pub fn with_status(status: StatusCode, message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError { status, message: message.into(), param: param.map(Cow::Borrowed), err_type: None }
    }

    /// The same error with vLLM's `type` set explicitly.
    pub fn typed(mut self, kind: &'static str) -> Self {
        self.err_type = Some(kind);
        self
    }

    fn kind(&self) -> &'static str {
        if let Some(k) = self.err_type {
            return k;
        }
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
