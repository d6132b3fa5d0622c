//! Prompt token ids at the gateway, for KV-aware routing: a request's prompt (completion
//! text, token ids, or chat messages) turned into the ids the engine will compute, through
//! the model's tokenizer — the sim's (`sim`) or a Hugging Face model directory
//! (tokenizer.json and chat template, [`crate::hf_tokenizer`]). Chosen per model with
//! `--tokenizer MODEL=sim|DIR`; a model without one is routed on its approximate prefix
//! index instead (docs/gateway.md).
//!
//! ```text
//! body ──prompt_of──> Prompt::{Text, Ids, Chat} ──encode_with(model's tokenizer)──> [u32] ──> block keys
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use crate::names::ModelName;
use crate::request::ApiKind;

/// Most prompt tokens keyed: longer prompts are keyed on their first this many tokens.
pub const MAX_PROMPT_TOKENS: usize = 1 << 17;

/// A single prompt as the engine receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// A completion prompt's text (the tokenizer adds its special tokens, as vLLM does).
    Text(String),
    /// A completion prompt given as token ids: used as is.
    Ids(Vec<u32>),
    /// Chat messages `(role, text)`, rendered by the model's chat template.
    Chat(Vec<(String, String)>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type", default)]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: Option<Content>,
}

#[derive(Deserialize)]
struct Body {
    prompt: Option<PromptField>,
    messages: Option<Vec<Message>>,
}

/// The prompt of a completions or chat body; None when there is no single prompt to key
/// (a batch of prompts, embeddings, a body the engine will refuse): such requests are
/// routed without cache knowledge.
pub fn prompt_of(kind: ApiKind, body: &[u8]) -> Option<Prompt> {
    let b: Body = serde_json::from_slice(body).ok()?;
    match kind {
        ApiKind::Completions => match b.prompt? {
            PromptField::Text(t) => Some(Prompt::Text(t)),
            PromptField::Ids(ids) => Some(Prompt::Ids(ids)),
            PromptField::Texts(mut v) if v.len() == 1 => Some(Prompt::Text(v.remove(0))),
            PromptField::IdLists(mut v) if v.len() == 1 => Some(Prompt::Ids(v.remove(0))),
            _ => None,
        },
        ApiKind::Chat => {
            let messages = b.messages?.into_iter().map(|m| {
                let text = match m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t,
                    Some(Content::Parts(parts)) => {
                        parts.into_iter().filter(|p| p.kind == "text").filter_map(|p| p.text).collect()
                    }
                };
                (m.role, text)
            });
            Some(Prompt::Chat(messages.collect()))
        }
        _ => None,
    }
}

/// Turns prompts into the engine's token ids.
pub trait PromptTokenizer: Send + Sync {
    fn encode(&self, prompt: &Prompt) -> Result<Vec<u32>, String>;
    /// What it is, for `get model` and logs: `sim` or `hf`.
    fn kind(&self) -> &'static str;
}

/// `flotilla sim`'s tokenizer: the very ids a sim charges.
#[derive(Debug, Default, Clone, Copy)]
pub struct SimTokenizer;

impl PromptTokenizer for SimTokenizer {
    fn encode(&self, prompt: &Prompt) -> Result<Vec<u32>, String> {
        use flotilla_engine::sim_tokenizer as t;
        let mut out = Vec::new();
        match prompt {
            Prompt::Text(s) => t::encode_prompt(s, &mut out),
            Prompt::Ids(ids) => out.clone_from(ids),
            Prompt::Chat(m) => t::encode_chat(m.iter().map(|(r, c)| (r.as_str(), c.as_str())), &mut out),
        }
        Ok(out)
    }
    fn kind(&self) -> &'static str {
        "sim"
    }
}

impl PromptTokenizer for crate::hf_tokenizer::HfTokenizer {
    fn encode(&self, prompt: &Prompt) -> Result<Vec<u32>, String> {
        match prompt {
            Prompt::Text(s) => self.encode_text(s),
            Prompt::Ids(ids) => Ok(ids.clone()),
            Prompt::Chat(m) => self.encode_chat(m),
        }
    }
    fn kind(&self) -> &'static str {
        "hf"
    }
}

/// Where a model's tokenizer comes from (`--tokenizer MODEL=SOURCE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    Sim,
    /// A model directory with tokenizer.json (and tokenizer_config.json, a chat template).
    Dir(PathBuf),
}

/// Parses `MODEL=sim` or `MODEL=DIR`.
pub fn parse_tokenizer_flag(s: &str) -> Result<(ModelName, TokenizerSource), String> {
    let bad = |why: &str| format!("--tokenizer {s:?}: {why} (expected MODEL=sim or MODEL=DIR)");
    let (model, source) = s.split_once('=').ok_or_else(|| bad("no '='"))?;
    if model.is_empty() || source.is_empty() {
        return Err(bad("empty model or source"));
    }
    let source = match source {
        "sim" => TokenizerSource::Sim,
        dir => TokenizerSource::Dir(PathBuf::from(dir)),
    };
    Ok((ModelName::from(model), source))
}

/// The tokenizers of the models that have one.
#[derive(Default, Clone)]
pub struct Tokenizers {
    by_model: HashMap<ModelName, Arc<dyn PromptTokenizer>>,
}

impl std::fmt::Debug for Tokenizers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.by_model.iter().map(|(m, t)| (m, t.kind()))).finish()
    }
}

impl Tokenizers {
    /// Loads every source (a directory's files are read and checked now, so a bad one
    /// stops the gateway at start with its reason).
    pub fn load(sources: &[(ModelName, TokenizerSource)]) -> Result<Self, String> {
        let mut by_model: HashMap<ModelName, Arc<dyn PromptTokenizer>> = HashMap::new();
        for (model, source) in sources {
            let t: Arc<dyn PromptTokenizer> = match source {
                TokenizerSource::Sim => Arc::new(SimTokenizer),
                TokenizerSource::Dir(d) => Arc::new(
                    crate::hf_tokenizer::HfTokenizer::load(d).map_err(|e| format!("--tokenizer {model}: {e}"))?,
                ),
            };
            if by_model.insert(model.clone(), t).is_some() {
                return Err(format!("--tokenizer {model} given twice"));
            }
        }
        Ok(Tokenizers { by_model })
    }

    pub fn get(&self, model: &str) -> Option<&Arc<dyn PromptTokenizer>> {
        self.by_model.get(model)
    }
}

/// The body's prompt under `t`, at most [`MAX_PROMPT_TOKENS`] (None: no single prompt, or
/// the tokenizer failed, which is logged — routing then goes without cache knowledge).
pub fn encode_with(t: &dyn PromptTokenizer, kind: ApiKind, body: &[u8]) -> Option<Vec<u32>> {
    match t.encode(&prompt_of(kind, body)?) {
        Ok(mut ids) => {
            ids.truncate(MAX_PROMPT_TOKENS);
            Some(ids)
        }
        Err(e) => {
            tracing::debug!(tokenizer = t.kind(), error = %e, "cannot tokenize the prompt; routing without cache knowledge");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_come_out_of_bodies_as_the_engine_reads_them() {
        let p = |k, b: &str| prompt_of(k, b.as_bytes());
        assert_eq!(p(ApiKind::Completions, r#"{"prompt":"hi"}"#), Some(Prompt::Text("hi".into())));
        assert_eq!(p(ApiKind::Completions, r#"{"prompt":["hi"]}"#), Some(Prompt::Text("hi".into())));
        assert_eq!(p(ApiKind::Completions, r#"{"prompt":[1,2]}"#), Some(Prompt::Ids(vec![1, 2])));
        assert_eq!(p(ApiKind::Completions, r#"{"prompt":[[1,2]]}"#), Some(Prompt::Ids(vec![1, 2])));
        assert_eq!(p(ApiKind::Completions, r#"{"prompt":["a","b"]}"#), None, "a batch has no one prefix");
        assert_eq!(p(ApiKind::Completions, r#"{"prompt":-1}"#), None);
        let chat = r#"{"messages":[{"role":"system","content":"be brief"},
            {"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url"},{"type":"text","text":"b"}]},
            {"role":"assistant"}]}"#;
        let want =
            vec![("system".into(), "be brief".into()), ("user".into(), "ab".into()), ("assistant".into(), "".into())];
        assert_eq!(p(ApiKind::Chat, chat), Some(Prompt::Chat(want)));
        assert_eq!(p(ApiKind::Chat, r#"{"messages":[{"content":"x"}]}"#), None, "a message needs a role");
        assert_eq!(p(ApiKind::Embeddings, r#"{"input":"x"}"#), None);
        assert_eq!(p(ApiKind::Chat, "not json"), None);
    }

    #[test]
    fn the_sim_tokenizer_gives_the_sims_ids() {
        let t = SimTokenizer;
        let mut want = Vec::new();
        flotilla_engine::sim_tokenizer::encode_prompt("hello world", &mut want);
        assert_eq!(t.encode(&Prompt::Text("hello world".into())).unwrap(), want);
        let mut chat = Vec::new();
        flotilla_engine::sim_tokenizer::encode_chat([("user", "hi")], &mut chat);
        assert_eq!(t.encode(&Prompt::Chat(vec![("user".into(), "hi".into())])).unwrap(), chat);
        assert_eq!(t.encode(&Prompt::Ids(vec![7, 8])).unwrap(), vec![7, 8]);
    }

    #[test]
    fn tokenizer_flags_parse_and_refuse_what_is_wrong() {
        assert_eq!(parse_tokenizer_flag("m=sim").unwrap(), (ModelName::from("m"), TokenizerSource::Sim));
        assert_eq!(parse_tokenizer_flag("m=/x/y").unwrap().1, TokenizerSource::Dir("/x/y".into()));
        for bad in ["m", "=sim", "m="] {
            assert!(parse_tokenizer_flag(bad).unwrap_err().contains("expected MODEL=sim"), "{bad}");
        }
        let twice = [(ModelName::from("m"), TokenizerSource::Sim), (ModelName::from("m"), TokenizerSource::Sim)];
        assert!(Tokenizers::load(&twice).err().unwrap().contains("twice"));
        let missing = [(ModelName::from("m"), TokenizerSource::Dir("/nonexistent/dir".into()))];
        assert!(Tokenizers::load(&missing).err().unwrap().starts_with("--tokenizer m: "));
    }
}

#[cfg(test)]
mod hf_tests {
    use super::*;

    #[test]
    fn a_model_directory_loads_as_an_hf_tokenizer() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-llama-tokenizer");
        let t = Tokenizers::load(&[(ModelName::from("tiny"), TokenizerSource::Dir(dir))]).unwrap();
        assert_eq!(t.get("tiny").unwrap().kind(), "hf");
        let body = br#"{"model":"tiny","messages":[{"role":"user","content":"hello there"}]}"#;
        let hf = t.get("tiny").unwrap().as_ref();
        let chat = encode_with(hf, ApiKind::Chat, body).unwrap();
        let text = encode_with(hf, ApiKind::Completions, br#"{"model":"tiny","prompt":"hello there"}"#).unwrap();
        assert!(chat.len() > text.len(), "the template adds its markers: {chat:?} {text:?}");
        assert!(t.get("other").is_none(), "no tokenizer for that model");
    }
}
