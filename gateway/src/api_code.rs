//! [`ApiCode`]: every error the gateway answers to clients, in one table. Each row gives the
//! HTTP status, the OpenAI error `type`, the stable `code` string (in the body, and the
//! `code` label of `errors_total`) and what it means. Clients and tests match on the code
//! strings: never change one. docs/gateway.md's error list is rendered from this table
//! ([`markdown_table`]; `gateway/tests/error_docs.rs` checks it).

use std::fmt;

use http::StatusCode;

/// OpenAI's error `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorType {
    /// The request is malformed, names nothing known, or cannot be served as sent.
    InvalidRequest,
    /// No valid API key.
    Authentication,
    /// The tenant may not do this.
    Permission,
    /// The tenant is over a limit.
    RateLimit,
    /// The fleet cannot serve it now.
    Server,
}

impl ErrorType {
    /// The `type` string of the error body.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorType::InvalidRequest => "invalid_request_error",
            ErrorType::Authentication => "authentication_error",
            ErrorType::Permission => "permission_error",
            ErrorType::RateLimit => "rate_limit_error",
            ErrorType::Server => "server_error",
        }
    }
}

impl fmt::Display for ErrorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of the table.
struct Row {
    status: StatusCode,
    kind: ErrorType,
    code: &'static str,
    meaning: &'static str,
}

/// Declares [`ApiCode`], its rows and [`ApiCode::ALL`] from one list, so no code can lack
/// a row or be missing from the docs.
macro_rules! api_codes {
    ($($variant:ident => ($status:ident, $kind:ident, $code:literal, $meaning:literal),)*) => {
        /// A stable error code the gateway answers with (see the module docs).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ApiCode {
            $(#[doc = $meaning] $variant,)*
        }

        impl ApiCode {
            /// Every code, in the table's order.
            pub const ALL: &'static [ApiCode] = &[$(ApiCode::$variant,)*];

            fn row(self) -> Row {
                match self {
                    $(ApiCode::$variant => Row {
                        status: StatusCode::$status,
                        kind: ErrorType::$kind,
                        code: $code,
                        meaning: $meaning,
                    },)*
                }
            }
        }
    };
}

api_codes! {
    // the request's headers and body (layers, request)
    InvalidApiKey => (UNAUTHORIZED, Authentication, "invalid_api_key",
        "missing, malformed or unknown `Authorization: Bearer` key"),
    InvalidHeader => (BAD_REQUEST, InvalidRequest, "invalid_header",
        "a header the gateway reads is not visible ASCII"),
    InvalidPriority => (BAD_REQUEST, InvalidRequest, "invalid_priority",
        "`x-flotilla-priority` is not critical, standard or sheddable"),
    InvalidRouting => (BAD_REQUEST, InvalidRequest, "invalid_routing",
        "`x-flotilla-routing` names no routing strategy"),
    BodyTimeout => (REQUEST_TIMEOUT, InvalidRequest, "body_timeout",
        "the body did not arrive within `--body-timeout-ms`"),
    BodyTooLarge => (PAYLOAD_TOO_LARGE, InvalidRequest, "body_too_large",
        "the body exceeds `--max-body-bytes`"),
    BodyReadError => (BAD_REQUEST, InvalidRequest, "body_read_error",
        "the body could not be read"),
    InvalidJson => (BAD_REQUEST, InvalidRequest, "invalid_json",
        "the body is not a UTF-8 JSON object"),
    MissingModel => (BAD_REQUEST, InvalidRequest, "missing_model",
        "the body has no `model`"),
    InvalidModel => (BAD_REQUEST, InvalidRequest, "invalid_model",
        "`model` is not a string"),
    InvalidStream => (BAD_REQUEST, InvalidRequest, "invalid_stream",
        "`stream` is not a boolean"),
    InvalidMaxTokens => (BAD_REQUEST, InvalidRequest, "invalid_max_tokens",
        "`max_tokens` or `max_completion_tokens` is not a non-negative integer"),
    MissingMessages => (BAD_REQUEST, InvalidRequest, "missing_messages",
        "a chat completion has no `messages`"),
    MissingPrompt => (BAD_REQUEST, InvalidRequest, "missing_prompt",
        "a completion has no `prompt`"),
    MissingInput => (BAD_REQUEST, InvalidRequest, "missing_input",
        "an embedding request has no `input`"),
    // the tenant (layers)
    ModelNotAllowed => (FORBIDDEN, Permission, "model_not_allowed",
        "the tenant's `models` do not include the requested model or adapter"),
    RpmLimitExceeded => (TOO_MANY_REQUESTS, RateLimit, "rpm_limit_exceeded",
        "the tenant is over its requests per minute (Retry-After, `x-ratelimit-*`)"),
    TpmLimitExceeded => (TOO_MANY_REQUESTS, RateLimit, "tpm_limit_exceeded",
        "the tenant is over its tokens per minute (Retry-After, `x-ratelimit-*`)"),
    ConcurrencyLimitExceeded => (TOO_MANY_REQUESTS, RateLimit, "concurrency_limit_exceeded",
        "the tenant has its `max_concurrent_requests` (else `--tenant-max-concurrency`) requests in flight (Retry-After 1)"),
    // routes (server)
    NotFound => (NOT_FOUND, InvalidRequest, "not_found",
        "no such path"),
    MethodNotAllowed => (METHOD_NOT_ALLOWED, InvalidRequest, "method_not_allowed",
        "the path does not take this method"),
    // resolving the model (server, hold)
    ModelNotFound => (NOT_FOUND, InvalidRequest, "model_not_found",
        "no such model or adapter, or the leader does not know the adapter"),
    NoEndpoints => (SERVICE_UNAVAILABLE, Server, "no_endpoints",
        "the model has no ready endpoint (Retry-After 5)"),
    NoEndpointTable => (SERVICE_UNAVAILABLE, Server, "no_endpoint_table",
        "the gateway has not received its endpoint table yet (Retry-After 1)"),
    ColdStartFull => (SERVICE_UNAVAILABLE, Server, "cold_start_full",
        "`--max-held-per-model` requests already wait for the model's first endpoint (Retry-After 5)"),
    ColdStartTimeout => (SERVICE_UNAVAILABLE, Server, "cold_start_timeout",
        "no endpoint of the model came up within the hold deadline (Retry-After 10)"),
    // on-demand adapters (ondemand, leader)
    AdapterUnavailable => (SERVICE_UNAVAILABLE, Server, "adapter_unavailable",
        "the leader refuses to load the adapter (no Retry-After), or it was loaded but no holder is free (Retry-After 1)"),
    AdapterNoSlot => (SERVICE_UNAVAILABLE, Server, "adapter_no_slot",
        "no replica has a free slot for the adapter and none can be freed (every slot pinned); the message carries the reason `flotilla get adapter` shows (Retry-After 5)"),
    AdapterBusy => (TOO_MANY_REQUESTS, RateLimit, "adapter_busy",
        "no replica has a free slot for the adapter now: every evictable adapter has requests in flight (Retry-After 1)"),
    AdapterLoadTimeout => (SERVICE_UNAVAILABLE, Server, "adapter_load_timeout",
        "the adapter was not loaded within the load timeout or the request's deadline (Retry-After 5)"),
    AdapterLoadUnavailable => (SERVICE_UNAVAILABLE, Server, "adapter_load_unavailable",
        "the adapter is not loaded and no leader is reachable to load it (Retry-After 2)"),
    AdapterLoadError => (SERVICE_UNAVAILABLE, Server, "adapter_load_error",
        "loading the adapter failed otherwise (Retry-After 2)"),
    // admission (admission)
    QueueFull => (SERVICE_UNAVAILABLE, Server, "queue_full",
        "the model is saturated and its queue holds `--max-queue` requests (Retry-After 1)"),
    Shed => (SERVICE_UNAVAILABLE, Server, "shed",
        "dropped from the full queue for a higher-priority request (Retry-After 1)"),
    QueueTimeout => (SERVICE_UNAVAILABLE, Server, "queue_timeout",
        "no endpoint freed up within the class's queue deadline (Retry-After 1)"),
    // forwarding (proxy, server)
    UpstreamError => (BAD_GATEWAY, Server, "upstream_error",
        "every engine tried failed before answering, or the answer could not be relayed"),
    UpstreamTimeout => (GATEWAY_TIMEOUT, Server, "upstream_timeout",
        "the engine sent no response head within `--upstream-timeout-s`"),
    StreamDurationExceeded => (REQUEST_TIMEOUT, InvalidRequest, "stream_duration_exceeded",
        "a streamed response lasted `--max-stream-duration`: sent as the stream's last SSE event (the status was already 200)"),
    Internal => (INTERNAL_SERVER_ERROR, Server, "internal",
        "a bug in the gateway"),
}

impl ApiCode {
    /// The HTTP status answered.
    pub fn status(self) -> StatusCode {
        self.row().status
    }

    /// OpenAI's error `type`.
    pub fn kind(self) -> ErrorType {
        self.row().kind
    }

    /// The stable code string.
    pub fn as_str(self) -> &'static str {
        self.row().code
    }

    /// What it means, one line.
    pub fn meaning(self) -> &'static str {
        self.row().meaning
    }
}

impl fmt::Display for ApiCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A code equals its stable string (`e.code == "queue_timeout"`).
impl PartialEq<&str> for ApiCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// The table as markdown (docs/gateway.md's error list), one row per code in `codes`.
pub fn markdown_table(codes: &[ApiCode]) -> String {
    let mut out = String::from("| code | HTTP | type | meaning |\n| --- | --- | --- | --- |\n");
    for c in codes {
        out.push_str(&format!("| `{}` | {} | `{}` | {} |\n", c.as_str(), c.status().as_u16(), c.kind(), c.meaning()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case_and_their_type_fits_their_status() {
        let mut seen = std::collections::HashSet::new();
        for c in ApiCode::ALL {
            let s = c.as_str();
            assert!(seen.insert(s), "{s} twice");
            assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{s}");
            assert!(!c.meaning().is_empty() && !c.meaning().contains('\n') && !c.meaning().contains('|'), "{s}");
            let server = c.status().is_server_error();
            assert_eq!(server, c.kind() == ErrorType::Server, "{s}: {} with {}", c.status(), c.kind());
            assert!(c.status().is_client_error() || server, "{s}");
        }
    }

    #[test]
    fn rows_hold_the_status_type_and_code_clients_see() {
        let cases = [
            (ApiCode::InvalidApiKey, 401, "authentication_error", "invalid_api_key"),
            (ApiCode::InvalidJson, 400, "invalid_request_error", "invalid_json"),
            (ApiCode::BodyTimeout, 408, "invalid_request_error", "body_timeout"),
            (ApiCode::BodyTooLarge, 413, "invalid_request_error", "body_too_large"),
            (ApiCode::ModelNotAllowed, 403, "permission_error", "model_not_allowed"),
            (ApiCode::TpmLimitExceeded, 429, "rate_limit_error", "tpm_limit_exceeded"),
            (ApiCode::MethodNotAllowed, 405, "invalid_request_error", "method_not_allowed"),
            (ApiCode::ModelNotFound, 404, "invalid_request_error", "model_not_found"),
            (ApiCode::Shed, 503, "server_error", "shed"),
            (ApiCode::AdapterNoSlot, 503, "server_error", "adapter_no_slot"),
            (ApiCode::AdapterBusy, 429, "rate_limit_error", "adapter_busy"),
            (ApiCode::UpstreamError, 502, "server_error", "upstream_error"),
            (ApiCode::UpstreamTimeout, 504, "server_error", "upstream_timeout"),
            (ApiCode::Internal, 500, "server_error", "internal"),
        ];
        for (c, status, kind, code) in cases {
            assert_eq!((c.status().as_u16(), c.kind().as_str(), c.as_str()), (status, kind, code));
            assert_eq!(c.to_string(), code);
        }
    }

    #[test]
    fn the_markdown_table_has_a_header_and_one_row_per_code() {
        let cases: [(&[ApiCode], &str); 2] = [
            (&[], "| code | HTTP | type | meaning |\n| --- | --- | --- | --- |\n"),
            (
                &[ApiCode::Shed],
                "| code | HTTP | type | meaning |\n| --- | --- | --- | --- |\n\
                 | `shed` | 503 | `server_error` | dropped from the full queue for a higher-priority request (Retry-After 1) |\n",
            ),
        ];
        for (codes, want) in cases {
            assert_eq!(markdown_table(codes), want);
        }
        assert_eq!(markdown_table(ApiCode::ALL).lines().count(), 2 + ApiCode::ALL.len());
    }
}
