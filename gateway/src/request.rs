//! What routing needs from a request body, parsed without building a full JSON tree of it:
//! model, stream flags, max_tokens and the prompt text (for prefix hashing and token
//! estimates). The original bytes are forwarded; [`with_include_usage`] is the one edit.

use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{ApiCode, ApiError};

/// The engine endpoints the gateway proxies: OpenAI's, and vLLM's tokenizer pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKind {
    Chat,
    Completions,
    Embeddings,
    Tokenize,
    Detokenize,
}

impl ApiKind {
    pub fn path(self) -> &'static str {
        match self {
            ApiKind::Chat => "/v1/chat/completions",
            ApiKind::Completions => "/v1/completions",
            ApiKind::Embeddings => "/v1/embeddings",
            ApiKind::Tokenize => "/tokenize",
            ApiKind::Detokenize => "/detokenize",
        }
    }
}

/// The routing-relevant features of one request.
#[derive(Debug, Clone, Default)]
pub struct RequestFeatures {
    /// The body's `model` as sent (the proxy handler names it a [`crate::names::ServedName`]).
    pub model: String,
    pub stream: bool,
    /// The client asked for `stream_options.include_usage`.
    pub include_usage: bool,
    /// `stream_options` is present (so adding include_usage needs a rewrite).
    pub has_stream_options: bool,
    pub max_tokens: Option<u64>,
    /// Prompt text (messages' contents concatenated with role markers).
    pub prompt: String,
    /// `x-session-id`, if any.
    pub session: Option<String>,
    /// The prompt's token ids under the model's tokenizer (`kv-aware` routing only; see
    /// [`crate::prompt_tokens`]).
    pub tokens: Option<std::sync::Arc<[u32]>>,
    /// `x-flotilla-explain-route: true`: answer with `x-flotilla-route`, the routing's terms.
    pub explain_route: bool,
}

impl RequestFeatures {
    /// A rough prompt size in tokens (4 characters each), for fair-share costs.
    pub fn prompt_tokens_estimate(&self) -> u64 {
        (self.prompt.len() as u64 / 4).max(1)
    }
}

#[derive(Deserialize)]
struct Body {
    model: Option<serde_json::Value>,
    #[serde(default)]
    stream: Option<serde_json::Value>,
    /// `Some(None)` when present but null: still a key [`with_include_usage`] must replace.
    #[serde(default, deserialize_with = "present")]
    stream_options: Option<Option<StreamOptions>>,
    max_tokens: Option<serde_json::Value>,
    max_completion_tokens: Option<serde_json::Value>,
    prompt: Option<serde_json::Value>,
    input: Option<serde_json::Value>,
    messages: Option<Vec<Message>>,
}

/// Deserializes a field that is present (even as null) to `Some`.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct Message {
    role: Option<IgnoredRole>,
    content: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum IgnoredRole {
    S(String),
    #[allow(dead_code)]
    Other(IgnoredAny),
}

fn push_text(out: &mut String, v: &serde_json::Value) {
    match v {
        serde_json::Value::String(s) => out.push_str(s),
        serde_json::Value::Array(items) => {
            for i in items {
                match i {
                    serde_json::Value::Object(o) => {
                        if let Some(serde_json::Value::String(t)) = o.get("text") {
                            out.push_str(t);
                        }
                    }
                    other => push_text(out, other),
                }
            }
        }
        serde_json::Value::Number(n) => {
            out.push_str(&n.to_string());
            out.push(' ');
        }
        _ => {}
    }
}

/// Parses the features of `body` for endpoint `kind`.
pub fn parse(kind: ApiKind, body: &[u8]) -> Result<RequestFeatures, ApiError> {
    // serde_json skips ignored fields without checking their UTF-8; JSON text must be UTF-8,
    // and the include_usage rewrite re-parses the body whole.
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::new(ApiCode::InvalidJson, format!("request body is not valid UTF-8: {e}")))?;
    let b: Body = serde_json::from_str(text)
        .map_err(|e| ApiError::new(ApiCode::InvalidJson, format!("request body is not a valid JSON object: {e}")))?;
    let model = match b.model {
        Some(serde_json::Value::String(m)) if !m.is_empty() => m,
        Some(serde_json::Value::String(_)) | None => {
            return Err(ApiError::new(ApiCode::MissingModel, "you must provide a model parameter").param("model"))
        }
        Some(_) => return Err(ApiError::new(ApiCode::InvalidModel, "model must be a string").param("model")),
    };
    let stream = match b.stream {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Bool(s)) => s,
        Some(_) => return Err(ApiError::new(ApiCode::InvalidStream, "stream must be a boolean").param("stream")),
    };
    let tokens = |v: Option<serde_json::Value>, name: &'static str| -> Result<Option<u64>, ApiError> {
        match v {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64()),
            Some(_) => {
                Err(ApiError::new(ApiCode::InvalidMaxTokens, format!("{name} must be a non-negative integer"))
                    .param(name))
            }
        }
    };
    let max_tokens = tokens(b.max_tokens, "max_tokens")?.or(tokens(b.max_completion_tokens, "max_completion_tokens")?);
    let mut prompt = String::new();
    match kind {
        ApiKind::Chat => {
            let Some(messages) = b.messages else {
                return Err(ApiError::new(ApiCode::MissingMessages, "messages is required").param("messages"));
            };
            for m in &messages {
                if let Some(IgnoredRole::S(r)) = &m.role {
                    prompt.push_str(r);
                    prompt.push_str(": ");
                }
                if let Some(c) = &m.content {
                    push_text(&mut prompt, c);
                }
                prompt.push('\n');
            }
        }
        ApiKind::Completions => match &b.prompt {
            Some(p) => push_text(&mut prompt, p),
            None => return Err(ApiError::new(ApiCode::MissingPrompt, "prompt is required").param("prompt")),
        },
        ApiKind::Embeddings => match &b.input {
            Some(p) => push_text(&mut prompt, p),
            None => return Err(ApiError::new(ApiCode::MissingInput, "input is required").param("input")),
        },
        // the engine checks the rest of a tokenizer request; routing needs only the model
        ApiKind::Tokenize | ApiKind::Detokenize => {}
    }
    let (include_usage, has_stream_options) = match &b.stream_options {
        Some(o) => (o.as_ref().and_then(|o| o.include_usage).unwrap_or(false), true),
        None => (false, false),
    };
    Ok(RequestFeatures {
        model,
        stream,
        include_usage,
        has_stream_options,
        max_tokens,
        prompt,
        session: None,
        tokens: None,
        explain_route: false,
    })
}

/// The body to send upstream for a stream whose client did not ask for usage: the same
/// bytes with `"stream_options":{"include_usage":true}` added, so the gateway can count
/// tokens (the extra usage chunk is stripped on the way back). Only when `stream_options`
/// already exists is the body re-serialized.
pub fn with_include_usage(body: &[u8], f: &RequestFeatures) -> Option<Vec<u8>> {
    if !f.stream || f.include_usage {
        return None;
    }
    if !f.has_stream_options {
        let start = body.iter().position(|b| !b.is_ascii_whitespace())?;
        if body[start] != b'{' {
            return None;
        }
        let mut out = Vec::with_capacity(body.len() + 48);
        out.extend_from_slice(&body[..=start]);
        out.extend_from_slice(br#""stream_options":{"include_usage":true},"#);
        out.extend_from_slice(&body[start + 1..]);
        return Some(out);
    }
    // Values stay raw JSON text: a `serde_json::Value` refuses numbers beyond f64 (`1e999`)
    // that `parse` (and the engine) accept, and a refused rewrite would leave the request
    // uncounted by TPM limits.
    type Raw = std::collections::BTreeMap<String, Box<RawValue>>;
    let mut top: Raw = serde_json::from_slice(body).ok()?;
    let mut so: Raw = top.get("stream_options").and_then(|v| serde_json::from_str(v.get()).ok()).unwrap_or_default();
    so.insert("include_usage".into(), RawValue::from_string("true".into()).ok()?);
    top.insert("stream_options".into(), serde_json::value::to_raw_value(&so).ok()?);
    serde_json::to_vec(&top).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_features() {
        let f = parse(
            ApiKind::Chat,
            br#"{"model":"m","stream":true,"max_tokens":5,"messages":[{"role":"system","content":"be nice"},{"role":"user","content":[{"type":"text","text":"hi"}]}],"temperature":0.1}"#,
        )
        .unwrap();
        assert_eq!(f.model, "m");
        assert!(f.stream && !f.include_usage);
        assert_eq!(f.max_tokens, Some(5));
        assert_eq!(f.prompt, "system: be nice\nuser: hi\n");
    }

    #[test]
    fn bad_bodies_are_400_with_codes() {
        let code = |k, b: &[u8]| parse(k, b).unwrap_err().code;
        assert_eq!(code(ApiKind::Chat, b"{not json"), "invalid_json");
        assert_eq!(code(ApiKind::Chat, b"[1]"), "invalid_json");
        assert_eq!(code(ApiKind::Chat, br#"{"messages":[]}"#), "missing_model");
        assert_eq!(code(ApiKind::Chat, br#"{"model":3,"messages":[]}"#), "invalid_model");
        assert_eq!(code(ApiKind::Chat, br#"{"model":"m"}"#), "missing_messages");
        assert_eq!(code(ApiKind::Completions, br#"{"model":"m","prompt":"x","max_tokens":-1}"#), "invalid_max_tokens");
        assert_eq!(code(ApiKind::Completions, br#"{"model":"m","prompt":"x","stream":"yes"}"#), "invalid_stream");
        assert_eq!(parse(ApiKind::Completions, br#"{"model":"m","prompt":["a","b"]}"#).unwrap().prompt, "ab");
    }

    #[test]
    fn include_usage_is_spliced_without_reserializing() {
        let body = br#" {"model":"m","stream":true,"prompt":"x"}"#;
        let f = parse(ApiKind::Completions, body).unwrap();
        let out = with_include_usage(body, &f).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#" {"stream_options":{"include_usage":true},"model":"m","stream":true,"prompt":"x"}"#
        );
        let body = br#"{"model":"m","stream":true,"prompt":"x","stream_options":{"include_usage":false}}"#;
        let f = parse(ApiKind::Completions, body).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&with_include_usage(body, &f).unwrap()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        let body = br#"{"model":"m","stream":true,"prompt":"x","stream_options":{"include_usage":true}}"#;
        assert!(with_include_usage(body, &parse(ApiKind::Completions, body).unwrap()).is_none());
    }

    /// Found by the `gateway_request` fuzz target: invalid UTF-8 in a field the gateway
    /// ignores was accepted, and the include_usage rewrite (which parses the whole body)
    /// then silently did nothing.
    #[test]
    fn invalid_utf8_is_refused_even_in_ignored_fields() {
        let body = b"{\"model\":\"m\",\"stream\":true,\"stream_options\":{},\"prompt\":\"x\",\"user\":\"\xc3T\"}";
        assert_eq!(parse(ApiKind::Completions, body).unwrap_err().code, "invalid_json");
    }

    /// Found by the `gateway_request` fuzz target: a number beyond f64 anywhere in a body
    /// with `stream_options` made the rewrite give up, so a tenant could stream uncounted
    /// by its TPM limit.
    #[test]
    fn include_usage_is_added_whatever_the_numbers() {
        let body =
            br#"{"model":"m","stream":true,"prompt":"x","n":1e999,"stream_options":{"continuous_usage_stats":false}}"#;
        let f = parse(ApiKind::Completions, body).unwrap();
        let out = with_include_usage(body, &f).expect("rewritten");
        let text = std::str::from_utf8(&out).unwrap();
        assert!(text.contains(r#""n":1e999"#) && text.contains(r#""continuous_usage_stats":false"#), "{text}");
        assert!(parse(ApiKind::Completions, &out).unwrap().include_usage, "{text}");
    }

    /// Found by `gateway/tests/proptest_request.rs`: `"stream_options": null` counted as
    /// absent, so the splice added a second `stream_options` key; the engine (last key
    /// wins) saw null and sent no usage, and the gateway's own parse refused the body.
    #[test]
    fn null_stream_options_are_replaced_not_duplicated() {
        let body = br#"{"model":"m","stream":true,"prompt":"x","stream_options":null}"#;
        let f = parse(ApiKind::Completions, body).unwrap();
        assert!(f.has_stream_options && !f.include_usage);
        let out = with_include_usage(body, &f).unwrap();
        let again = parse(ApiKind::Completions, &out).unwrap();
        assert!(again.include_usage);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
    }
}
