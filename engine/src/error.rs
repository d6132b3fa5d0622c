//! [`EngineError`], the one error of this crate, with a stable code per variant, and
//! [`engine_message`], which pulls the human message out of an engine's error body.
//!
//! Transport failures (refused, reset, timed out: the engine may be down; a certificate that
//! is not the pinned one) are told apart from HTTP errors (the engine answered and refused:
//! it is up, the request was wrong).

use std::time::Duration;

/// Longest raw body kept as the message when an error body is not vLLM's JSON.
const RAW_MESSAGE_CHARS: usize = 300;

/// Why a call to an engine failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// The endpoint is not a usable `host:port`.
    #[error("invalid engine endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// As given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No connection, or it broke (refused, reset, unresolvable host).
    #[error("{url}: engine unreachable: {reason}")]
    Unreachable {
        /// The URL called.
        url: String,
        /// The transport error chain.
        reason: String,
    },
    /// The engine's TLS certificate is not the one pinned for it: nothing was sent.
    #[error("{url}: {reason}")]
    CertificateMismatch {
        /// The URL called.
        url: String,
        /// The host, the certificate's fingerprint and the pinned ones.
        reason: String,
    },
    /// No complete answer within the call's timeout.
    #[error("{url}: no answer within {after:?}")]
    Timeout {
        /// The URL called.
        url: String,
        /// The timeout.
        after: Duration,
    },
    /// The engine answered with a non-2xx status.
    #[error("{url}: engine answered {status}: {message}")]
    Http {
        /// The URL called.
        url: String,
        /// HTTP status code.
        status: u16,
        /// The engine's message (see [`engine_message`]).
        message: String,
    },
    /// The answer's body exceeded the client's cap.
    #[error("{url}: body larger than {limit} bytes")]
    BodyTooLarge {
        /// The URL called.
        url: String,
        /// The cap in bytes.
        limit: usize,
    },
    /// A 2xx answer whose body is not what the endpoint returns.
    #[error("{url}: {reason}")]
    InvalidBody {
        /// The URL called (the path alone from the pure parsers).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl EngineError {
    /// Stable code for logs, metrics labels and reports.
    pub fn code(&self) -> &'static str {
        match self {
            EngineError::InvalidEndpoint { .. } => "engine.invalid_endpoint",
            EngineError::Unreachable { .. } => "engine.unreachable",
            EngineError::CertificateMismatch { .. } => "engine.certificate_mismatch",
            EngineError::Timeout { .. } => "engine.timeout",
            EngineError::Http { .. } => "engine.http_status",
            EngineError::BodyTooLarge { .. } => "engine.body_too_large",
            EngineError::InvalidBody { .. } => "engine.invalid_body",
        }
    }

    /// True when the engine could not be reached (or not trusted: its certificate is not
    /// pinned) or did not answer in time (it may be down), as opposed to an answer it gave.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            EngineError::Unreachable { .. } | EngineError::Timeout { .. } | EngineError::CertificateMismatch { .. }
        )
    }

    /// The HTTP status of an engine's error answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            EngineError::Http { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The engine's own message of an HTTP error.
    pub fn engine_message(&self) -> Option<&str> {
        match self {
            EngineError::Http { message, .. } => Some(message),
            _ => None,
        }
    }
}

/// The message of an engine's error body: vLLM's `{"error":{"message":..}}`, older vLLM's
/// `{"object":"error","message":..}`, FastAPI's `{"detail":..}`; otherwise the raw body,
/// trimmed and cut to 300 characters. Empty when the body is empty.
pub fn engine_message(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        let found =
            [v.pointer("/error/message"), v.get("error").filter(|e| e.is_string()), v.get("message"), v.get("detail")]
                .into_iter()
                .flatten()
                .next();
        match found {
            Some(serde_json::Value::String(s)) => return s.clone(),
            Some(other) if !other.is_null() => return other.to_string(),
            _ => {}
        }
    }
    let raw = String::from_utf8_lossy(body);
    let raw = raw.trim();
    match raw.char_indices().nth(RAW_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}…", &raw[..cut]),
        None => raw.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_from_every_error_shape() {
        let v1 = br#"{"error":{"message":"The lora adapter 'x' has already been loaded.","type":"BadRequestError","param":null,"code":400}}"#;
        assert_eq!(engine_message(v1), "The lora adapter 'x' has already been loaded.");
        let old = br#"{"object":"error","message":"No adapter found for /nope","type":"NotFoundError","param":null,"code":404}"#;
        assert_eq!(engine_message(old), "No adapter found for /nope");
        assert_eq!(engine_message(br#"{"detail":"Not Found"}"#), "Not Found");
        assert_eq!(engine_message(br#"{"error":"plain"}"#), "plain");
        assert_eq!(engine_message(br#"{"detail":[{"loc":["body"]}]}"#), r#"[{"loc":["body"]}]"#);
        assert_eq!(engine_message(b"  Internal Server Error\n"), "Internal Server Error");
        assert_eq!(engine_message(b""), "");
        assert_eq!(engine_message(b"{\"other\":1}"), "{\"other\":1}");
        let long = "é".repeat(1000);
        let cut = engine_message(long.as_bytes());
        assert_eq!(cut.chars().count(), RAW_MESSAGE_CHARS + 1);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn codes_and_classes() {
        let t = EngineError::Timeout { url: "http://h:1/health".into(), after: Duration::from_secs(2) };
        assert!(t.is_transport());
        assert_eq!((t.code(), t.status()), ("engine.timeout", None));
        let h = EngineError::Http { url: "u".into(), status: 404, message: "gone".into() };
        assert!(!h.is_transport());
        assert_eq!((h.code(), h.status(), h.engine_message()), ("engine.http_status", Some(404), Some("gone")));
        assert_eq!(h.to_string(), "u: engine answered 404: gone");
    }
}
