//! `POST /v1/completions` and `POST /v1/chat/completions`: parse strictly, validate like
//! vLLM (model, max_tokens, n, context length), tokenize, hand to the engine, then answer
//! with one JSON body or a server-sent-event stream.

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::json;

use super::errors::ApiError;
use super::stream::{Kind, SseStream};
use super::types::{
    ChatRequest, CompletionRequest, Content, DetokenizeRequest, Message, Prompt, Sampling, TokenizeRequest, IGNORED,
};
use super::{unix_now, AppState, FINGERPRINT};
use crate::engine::{Command, Event, Submission};
use crate::lora::LoraRef;
use crate::pd::{self, Ask};
use crate::{side_channel, tokenizer};

/// Parses a JSON body, mapping every failure to vLLM's 400 (or 413 for a huge body).
pub fn parse_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| {
        ApiError::with_status(r.status(), format!("could not read the request body: {}", r.body_text()), None)
    })?;
    serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(&bytes))
        .map_err(|e| ApiError::validation(&e))
}

/// Fields outside the known set: 400 under `--reject-unknown-fields`, else ignored with a
/// debug line, as vLLM's request models (`extra="allow"`) accept them and log them.
fn check_unknown(st: &AppState, rest: &serde_json::Map<String, serde_json::Value>) -> Result<(), ApiError> {
    let mut unknown = rest.keys().filter(|k| !IGNORED.contains(&k.as_str())).peekable();
    let Some(first) = unknown.peek() else {
        return Ok(());
    };
    if st.cfg.reject_unknown_fields {
        return Err(ApiError::bad_request(format!("unknown field `{first}` in the request body"), None));
    }
    let fields: Vec<&str> = unknown.map(String::as_str).collect();
    tracing::debug!(fields = ?fields, "the following fields were present in the request but ignored");
    Ok(())
}

/// What both endpoints resolve a request into.
struct Prepared {
    model: String,
    lora: Option<LoraRef>,
    prompt: Vec<u32>,
    max_tokens: u32,
    stream: bool,
    include_usage: bool,
    seed: Option<u64>,
    stop: Vec<String>,
    ignore_eos: bool,
    /// What `kv_transfer_params` asks (P/D); `Nothing` without a KV connector.
    kv: pd::Ask,
}

fn resolve_model(st: &AppState, model: Option<String>) -> Result<(String, Option<LoraRef>), ApiError> {
    let name = model.unwrap_or_else(|| st.cfg.model.clone());
    if name == st.cfg.model {
        return Ok((name, None));
    }
    match st.lora.resolve(&name) {
        Some(l) => Ok((name, Some(l))),
        None => {
            let mut valid = vec![st.cfg.model.clone()];
            valid.extend(st.lora.list().into_iter().map(|a| a.name));
            Err(ApiError::not_found(
                format!("The model `{name}` does not exist. Valid aliases: {}.", valid.join(", ")),
                Some("model"),
            ))
        }
    }
}

fn prepare(
    st: &AppState,
    model: Option<String>,
    prompt: Vec<u32>,
    max_tokens: Option<i64>,
    s: Sampling,
) -> Result<Prepared, ApiError> {
    let (model, lora) = resolve_model(st, model)?;
    if let Some(m) = max_tokens {
        if m < 1 {
            return Err(ApiError::bad_request(
                format!("max_tokens must be at least 1, got {m}. (parameter=max_tokens, value={m})"),
                Some("max_tokens"),
            ));
        }
    }
    if let Some(n) = s.n {
        if n != 1 {
            return Err(ApiError::bad_request(
                format!("n must be 1 on the simulator, got {n}. (parameter=n, value={n})"),
                Some("n"),
            ));
        }
    }
    if let Some(t) = s.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::bad_request(format!("temperature must be in [0, 2], got {t}."), Some("temperature")));
        }
    }
    if let Some(p) = s.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::bad_request(format!("top_p must be in (0, 1], got {p}."), Some("top_p")));
        }
    }
    let stream = s.stream.unwrap_or(false);
    if s.stream_options.is_some() && !stream {
        return Err(ApiError::bad_request(
            "Stream options can only be defined when `stream=True`.",
            Some("stream_options"),
        ));
    }
    if prompt.is_empty() {
        return Err(ApiError::bad_request("The prompt cannot be empty.", Some("prompt")));
    }
    let limit = st.cfg.max_model_len as usize;
    if prompt.len() > limit {
        return Err(ApiError::with_status(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "This model's maximum context length is {limit} tokens. However, your prompt has {} tokens.",
                prompt.len()
            ),
            Some("prompt"),
        ));
    }
    let room = (limit - prompt.len()) as i64;
    let max_tokens = match max_tokens {
        Some(m) if m > room => {
            return Err(ApiError::bad_request(
                format!(
                    "This model's maximum context length is {limit} tokens. However, you requested {} tokens ({} in the prompt, {m} in the completion). Please reduce the length of the prompt or completion.",
                    prompt.len() as i64 + m,
                    prompt.len()
                ),
                Some("max_tokens"),
            ))
        }
        Some(m) => m as u32,
        None => room.max(1) as u32,
    };
    if room == 0 {
        return Err(ApiError::bad_request(
            format!("The prompt fills the model's {limit}-token context; nothing can be generated."),
            Some("prompt"),
        ));
    }
    Ok(Prepared {
        model,
        lora,
        prompt,
        max_tokens,
        stream,
        include_usage: s.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
        seed: s.seed.map(|v| v as u64),
        stop: s.stop.map(|s| s.into_vec()).unwrap_or_default().into_iter().filter(|s| !s.is_empty()).collect(),
        ignore_eos: s.ignore_eos.unwrap_or(false),
        kv: Ask::Nothing,
    })
}

/// Reads `kv_transfer_params` when this engine has a KV connector whose role takes the
/// ask; ignored otherwise, as vLLM without a connector ignores it.
fn kv_ask(st: &AppState, rest: &serde_json::Map<String, serde_json::Value>) -> Result<Ask, ApiError> {
    let Some(k) = &st.cfg.kv_transfer else { return Ok(Ask::Nothing) };
    let ask = pd::parse_params(rest.get("kv_transfer_params"))
        .map_err(|m| ApiError::bad_request(m, Some("kv_transfer_params")))?;
    Ok(match ask {
        Ask::HoldForDecode if !k.role.produces() => Ask::Nothing,
        Ask::Pull(_) if !k.role.consumes() => Ask::Nothing,
        a => a,
    })
}

/// P/D decode: pulls the remote prefill's KV and waits its transfer time; the number of
/// leading prompt tokens it covers (0 when recomputing after a failure) and the simulated
/// transfer seconds, or the 500 of `kv_load_failure_policy: fail`.
async fn pull_remote(st: &AppState, r: &pd::Remote, prompt: &[u32]) -> Result<(usize, f64), Response> {
    let Some(k) = &st.cfg.kv_transfer else { return Ok((0, 0.0)) };
    let ask = side_channel::Ask {
        engine_id: r.engine_id.clone(),
        request_id: r.request_id.clone(),
        block_ids: r.block_ids.clone(),
    };
    match side_channel::pull(&r.host, r.port, &ask).await {
        Ok(tokens) => {
            // only the KV of this prompt's own prefix is usable
            let n = tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count().min(r.num_tokens as usize);
            let bytes = n as u64 * st.cfg.profile.kv_bytes_per_token;
            let secs = pd::transfer_seconds(bytes, k.link_gbps);
            pd::sleep_sim(secs, st.cfg.speedup).await;
            let mut m = st.metrics.lock().unwrap_or_else(|p| p.into_inner());
            m.nixl.xfer_time.observe(secs);
            m.nixl.bytes.observe(bytes as f64);
            tracing::debug!(remote_request_id = %r.request_id, tokens = n, seconds = secs, "P/D KV pulled");
            Ok((n, secs))
        }
        Err(e) => {
            st.metrics.lock().unwrap_or_else(|p| p.into_inner()).nixl.failed += 1;
            tracing::warn!(remote_request_id = %r.request_id, error = %e, policy = ?k.load_failure_policy, "P/D KV transfer failed");
            match k.load_failure_policy {
                pd::LoadFailurePolicy::Recompute => Ok((0, 0.0)),
                pd::LoadFailurePolicy::Fail => Err(ApiError::with_status(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("KV load failed (kv_load_failure_policy fail): {e}"),
                    None,
                )
                .into_response()),
            }
        }
    }
}

/// `POST /v1/completions`.
pub async fn completions(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let req: CompletionRequest = match parse_body(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = check_unknown(&st, &req.rest) {
        return e.into_response();
    }
    let mut tokens = Vec::new();
    match req.prompt {
        Prompt::Text(t) => tokenizer::encode_prompt(&t, &mut tokens),
        Prompt::Tokens(t) => tokens = t,
        Prompt::Texts(mut v) if v.len() == 1 => tokenizer::encode_prompt(&v.remove(0), &mut tokens),
        Prompt::TokenLists(mut v) if v.len() == 1 => tokens = v.remove(0),
        _ => {
            return ApiError::bad_request(
                "batched prompts are not supported by the simulator; send one prompt per request",
                Some("prompt"),
            )
            .into_response()
        }
    }
    let max_tokens = req.sampling.max_tokens.or(Some(16)); // OpenAI's completions default
    let prepared = kv_ask(&st, &req.rest)
        .and_then(|kv| prepare(&st, req.model, tokens, max_tokens, req.sampling).map(|p| Prepared { kv, ..p }));
    match prepared {
        Ok(p) => run(st, p, Kind::Completion).await,
        Err(e) => e.into_response(),
    }
}

/// The text of each message (text parts only, joined).
fn message_texts(messages: &[Message]) -> Vec<String> {
    messages
        .iter()
        .map(|m| match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                parts.iter().filter(|p| p.kind == "text").filter_map(|p| p.text.as_deref()).collect()
            }
        })
        .collect()
}

/// Token ids of a conversation under the chat template (text parts only).
fn encode_messages(messages: &[Message]) -> Vec<u32> {
    let texts = message_texts(messages);
    let mut tokens = Vec::new();
    tokenizer::encode_chat(messages.iter().map(|m| m.role.as_str()).zip(texts.iter().map(String::as_str)), &mut tokens);
    tokens
}

/// `POST /tokenize`: vLLM's tokenizer endpoint (routers such as vllm-router's `cache_aware`
/// call it to route on token ids): `{"count", "max_model_len", "tokens", "token_strs"}`.
pub async fn tokenize(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let req: TokenizeRequest = match parse_body(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = check_unknown(&st, &req.rest) {
        return e.into_response();
    }
    if let Err(e) = resolve_model(&st, req.model) {
        return e.into_response();
    }
    let mut tokens = Vec::new();
    let special = req.add_special_tokens != Some(false);
    let learn_and_encode = |t: &str, tokens: &mut Vec<u32>| {
        st.vocab.learn(t);
        if special {
            tokenizer::encode_prompt(t, tokens)
        } else {
            tokenizer::encode(t, tokens)
        }
    };
    match (req.prompt, req.messages) {
        (Some(Prompt::Text(t)), None) => learn_and_encode(&t, &mut tokens),
        (Some(Prompt::Tokens(t)), None) => tokens = t,
        (Some(Prompt::Texts(mut v)), None) if v.len() == 1 => learn_and_encode(&v.remove(0), &mut tokens),
        (Some(Prompt::TokenLists(mut v)), None) if v.len() == 1 => tokens = v.remove(0),
        (None, Some(m)) => {
            tokens = encode_messages(&m);
            learn_messages(&st, &m);
        }
        (None, None) => {
            return ApiError::bad_request("either `prompt` or `messages` is required", Some("prompt")).into_response()
        }
        (Some(_), Some(_)) => {
            return ApiError::bad_request("give either `prompt` or `messages`, not both", Some("prompt"))
                .into_response()
        }
        (Some(_), None) => {
            return ApiError::bad_request("batched prompts are not supported by the simulator", Some("prompt"))
                .into_response()
        }
    }
    // vLLM answers `token_strs` only when asked; the sim can for every id it knows
    let token_strs = match req.return_token_strs {
        Some(true) => match st.vocab.pieces(&tokens) {
            Ok(p) => Some(p),
            Err(e) => return ApiError::bad_request(e.to_string(), Some("prompt")).into_response(),
        },
        _ => None,
    };
    axum::Json(json!({
        "count": tokens.len(),
        "max_model_len": st.cfg.max_model_len,
        "tokens": tokens,
        "token_strs": token_strs,
    }))
    .into_response()
}

/// Teaches the vocabulary the texts a chat prompt's template is made of.
fn learn_messages(st: &AppState, messages: &[Message]) {
    for (m, text) in messages.iter().zip(message_texts(messages)) {
        st.vocab.learn(&m.role);
        st.vocab.learn(&text);
    }
    st.vocab.learn("\n\nassistant");
}

/// `POST /detokenize`: vLLM's inverse of `/tokenize`, `{"model"?, "tokens"}` → `{"prompt"}`.
/// Ids the sim has produced decode to their text, others to a stand-in word (see
/// [`crate::vocab`]); an id at or above the vocabulary size is a 400 that names it.
pub async fn detokenize(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let req: DetokenizeRequest = match parse_body(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = check_unknown(&st, &req.rest) {
        return e.into_response();
    }
    if let Err(e) = resolve_model(&st, req.model) {
        return e.into_response();
    }
    match st.vocab.decode(&req.tokens) {
        Ok(prompt) => axum::Json(json!({ "prompt": prompt })).into_response(),
        Err(e) => ApiError::bad_request(e.to_string(), Some("tokens")).into_response(),
    }
}

/// `POST /v1/chat/completions`.
pub async fn chat(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let req: ChatRequest = match parse_body(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = check_unknown(&st, &req.rest) {
        return e.into_response();
    }
    if req.messages.is_empty() {
        return ApiError::bad_request("messages must contain at least one message", Some("messages")).into_response();
    }
    let tokens = encode_messages(&req.messages);
    let max_tokens = req.max_completion_tokens.or(req.sampling.max_tokens);
    let prepared = kv_ask(&st, &req.rest)
        .and_then(|kv| prepare(&st, req.model, tokens, max_tokens, req.sampling).map(|p| Prepared { kv, ..p }));
    match prepared {
        Ok(p) => run(st, p, Kind::Chat).await,
        Err(e) => e.into_response(),
    }
}

async fn run(st: AppState, mut p: Prepared, kind: Kind) -> Response {
    let mut received = tokio::time::Instant::now();
    let id = st.next_id();
    let prefix = if kind == Kind::Chat { "chatcmpl" } else { "cmpl" };
    let rid = format!("{prefix}-{:016x}", crate::text::mix(id ^ st.id_salt));
    let (external_tokens, hold) = match std::mem::replace(&mut p.kv, Ask::Nothing) {
        Ask::Nothing => (0, None),
        Ask::HoldForDecode => (0, Some(rid.clone())),
        Ask::Pull(remote) => match pull_remote(&st, &remote, &p.prompt).await {
            Ok((n, secs)) => {
                // The request's clock (TTFT, queue time) counts the modelled transfer, not
                // the wall time of the sim's own side-channel round trip (which --speedup
                // would magnify).
                let wall = pd::sim_wall(secs, st.cfg.speedup);
                let now = tokio::time::Instant::now();
                received = now.checked_sub(wall).unwrap_or(now);
                (n, None)
            }
            Err(resp) => return resp,
        },
    };
    let (tx, mut rx) = crate::mailbox::channel();
    let sub = Submission {
        id,
        prompt: p.prompt,
        max_tokens: p.max_tokens,
        ignore_eos: p.ignore_eos,
        seed: p.seed,
        lora: p.lora,
        stop: p.stop,
        stream: p.stream,
        reply: tx,
        received,
        external_tokens,
        hold,
    };
    if st.engine.send(Command::Submit(Box::new(sub))).is_err() {
        return ApiError::with_status(StatusCode::SERVICE_UNAVAILABLE, "the engine is shutting down", None)
            .into_response();
    }
    let created = unix_now();
    tracing::debug!(request_id = %rid, model = %p.model, stream = p.stream, max_tokens = p.max_tokens, "request accepted");
    if p.stream {
        let body = SseStream::new(rx, kind, &rid, created, &p.model, p.include_usage);
        return Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Body::from_stream(body))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    let done = loop {
        match rx.recv().await {
            Some(Event::Done(d)) => break *d,
            Some(Event::Token(_)) => continue,
            None => {
                return ApiError::with_status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the engine stopped before the request finished",
                    None,
                )
                .into_response()
            }
        }
    };
    let s = done.summary;
    // Field sets of vLLM 0.32's ChatCompletionResponse / CompletionResponse (nulls included,
    // as vLLM serialises them); see `realvllm/tests/samples.rs`.
    let usage = json!({
        "prompt_tokens": s.prompt_tokens,
        "total_tokens": s.prompt_tokens + s.output_tokens,
        "completion_tokens": s.output_tokens,
        "prompt_tokens_details": null,
        "completion_tokens_details": null,
    });
    let reason = done.reason.as_str();
    let stop_reason = done.stop_reason;
    let kv_transfer_params = match (&st.cfg.kv_transfer, st.side_channel_port, &done.held) {
        (Some(k), Some(port), Some(held)) => pd::response_params(k, port, &rid, held, s.cached_tokens),
        _ => serde_json::Value::Null,
    };
    let body = match kind {
        Kind::Chat => json!({
            "id": rid, "object": "chat.completion", "created": created, "model": p.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": done.text, "refusal": null, "annotations": null, "audio": null, "function_call": null, "reasoning": null},
                "logprobs": null, "finish_reason": reason, "stop_reason": stop_reason, "token_ids": null, "routed_experts": null,
            }],
            "service_tier": null, "system_fingerprint": FINGERPRINT, "usage": usage,
            "prompt_logprobs": null, "prompt_token_ids": null, "prompt_text": null,
            "kv_transfer_params": kv_transfer_params, "ec_transfer_params": null, "metrics": null,
        }),
        Kind::Completion => json!({
            "id": rid, "object": "text_completion", "created": created, "model": p.model,
            "choices": [{
                "index": 0, "text": done.text, "logprobs": null, "finish_reason": reason, "stop_reason": stop_reason,
                "token_ids": null, "prompt_logprobs": null, "prompt_token_ids": null, "routed_experts": null,
            }],
            "service_tier": null, "system_fingerprint": FINGERPRINT, "usage": usage,
            "kv_transfer_params": kv_transfer_params, "ec_transfer_params": null, "metrics": null,
        }),
    };
    axum::Json(body).into_response()
}
