//! Request bodies of the OpenAI endpoints, accepting every field the OpenAI SDK and vLLM
//! document (most are ignored by the simulator); other top-level fields are ignored too,
//! as vLLM does, or refused with 400 under `--reject-unknown-fields`.

use serde::Deserialize;
use serde_json::Value;

/// A prompt: text, or token ids, or a one-element list of either.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// Text.
    Text(String),
    /// Several texts (only one is accepted).
    Texts(Vec<String>),
    /// Token ids.
    Tokens(Vec<u32>),
    /// Several token id lists (only one is accepted).
    TokenLists(Vec<Vec<u32>>),
}

/// `stop`: one string or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Stop {
    /// As a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// `stream_options`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a final chunk with `usage`.
    #[serde(default)]
    pub include_usage: Option<bool>,
    /// Accepted, ignored.
    #[serde(default)]
    pub continuous_usage_stats: Option<bool>,
}

/// Fields both endpoints share.
#[derive(Debug, Deserialize, Default)]
pub struct Sampling {
    /// Most tokens to generate.
    pub max_tokens: Option<i64>,
    /// Number of choices; only 1.
    pub n: Option<i64>,
    /// Stream server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Stop strings.
    pub stop: Option<Stop>,
    /// Seed of the generated text.
    pub seed: Option<i64>,
    /// 0..=2.
    pub temperature: Option<f64>,
    /// (0, 1].
    pub top_p: Option<f64>,
    /// vLLM: generate past end-of-sequence.
    pub ignore_eos: Option<bool>,
}

/// Fields accepted and ignored (known, so `--reject-unknown-fields` can refuse the rest).
pub const IGNORED: &[&str] = &[
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "user",
    "best_of",
    "echo",
    "suffix",
    "min_tokens",
    "stop_token_ids",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
    "priority",
    "request_id",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template",
    "chat_template_kwargs",
    "add_special_tokens",
    "metadata",
    "store",
    "service_tier",
    "modalities",
    "prediction",
    "audio",
    "reasoning_effort",
    "web_search_options",
    "functions",
    "function_call",
    "truncate_prompt_tokens",
    "length_penalty",
    "use_beam_search",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
    "cache_salt",
    "return_tokens_as_token_ids",
    "prompt_logprobs",
    "kv_transfer_params",
    "vllm_xargs",
    "documents",
];

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// Model or adapter name (defaults to the served model).
    pub model: Option<String>,
    /// The prompt.
    pub prompt: Prompt,
    /// Sampling fields.
    #[serde(flatten)]
    pub sampling: Sampling,
    /// Everything else; checked against [`IGNORED`].
    #[serde(flatten)]
    pub rest: serde_json::Map<String, Value>,
}

/// Message content: text or a list of parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Parts; text parts are concatenated.
    Parts(Vec<Part>),
}

/// One content part.
#[derive(Debug, Deserialize)]
pub struct Part {
    /// Part type (`text`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// Text of a text part.
    pub text: Option<String>,
}

/// One chat message.
#[derive(Debug, Deserialize)]
pub struct Message {
    /// system, user, assistant, tool, developer.
    pub role: String,
    /// Content, possibly absent for tool calls.
    pub content: Option<Content>,
    /// Accepted, ignored.
    pub name: Option<String>,
    /// Accepted, ignored.
    pub tool_calls: Option<Value>,
    /// Accepted, ignored.
    pub tool_call_id: Option<String>,
    /// Accepted, ignored.
    pub refusal: Option<Value>,
    /// Accepted, ignored.
    pub reasoning_content: Option<Value>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// Model or adapter name (defaults to the served model).
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<Message>,
    /// OpenAI's newer name for max_tokens.
    pub max_completion_tokens: Option<i64>,
    /// Sampling fields.
    #[serde(flatten)]
    pub sampling: Sampling,
    /// Everything else; checked against [`IGNORED`].
    #[serde(flatten)]
    pub rest: serde_json::Map<String, Value>,
}

/// `POST /tokenize`: vLLM's completion form (`prompt`) or chat form (`messages`).
#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    /// Model or adapter name (defaults to the served model).
    pub model: Option<String>,
    /// Completion form.
    pub prompt: Option<Prompt>,
    /// Chat form.
    pub messages: Option<Vec<Message>>,
    /// A completion-form prompt starts with the begin-of-text token unless false (vLLM's
    /// default: true).
    pub add_special_tokens: Option<bool>,
    /// Return each token's text in `token_strs`.
    pub return_token_strs: Option<bool>,
    /// Everything else; checked against [`IGNORED`].
    #[serde(flatten)]
    pub rest: serde_json::Map<String, Value>,
}

/// `POST /detokenize`.
#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    /// Model or adapter name (defaults to the served model).
    pub model: Option<String>,
    /// The ids to decode.
    pub tokens: Vec<u32>,
    /// Everything else; checked against [`IGNORED`].
    #[serde(flatten)]
    pub rest: serde_json::Map<String, Value>,
}

/// `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`.
#[derive(Debug, Deserialize)]
pub struct LoraRequest {
    /// Adapter name.
    #[serde(default)]
    pub lora_name: String,
    /// Adapter path (load only).
    #[serde(default)]
    pub lora_path: Option<String>,
    /// Reload an already loaded name (load only).
    #[serde(default)]
    pub load_inplace: Option<bool>,
    /// Accepted, ignored.
    #[serde(default)]
    pub lora_int_id: Option<i64>,
}
