//! `GET /v1/models`, parsed: the base model and the LoRA adapters an engine serves. vLLM
//! lists the base model with `"parent": null` and each loaded adapter with `parent` set to
//! the base model and `root` to the path it was loaded from. Pure; unit-tested against a
//! real vLLM 0.32 answer (`engine/tests/data/v1-models-with-adapter.json`).

use serde::Deserialize;

use crate::error::EngineError;

/// One entry of `/v1/models`; fields other engines may omit are optional.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ModelCard {
    /// The name requests use as `model`.
    pub id: String,
    /// The base model, for a LoRA adapter.
    #[serde(default)]
    pub parent: Option<String>,
    /// Where the weights came from (a path or hub id).
    #[serde(default)]
    pub root: Option<String>,
    /// Longest prompt plus output, in tokens (base models).
    #[serde(default)]
    pub max_model_len: Option<u64>,
}

impl ModelCard {
    /// True for a LoRA adapter (an entry whose `parent` is set).
    pub fn is_adapter(&self) -> bool {
        self.parent.is_some()
    }
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<ModelCard>,
}

/// Parses a `/v1/models` body (`{"object":"list","data":[...]}`). Errors on anything that
/// is not such a list.
pub fn parse_models(body: &[u8]) -> Result<Vec<ModelCard>, EngineError> {
    serde_json::from_slice::<ModelList>(body)
        .map(|l| l.data)
        .map_err(|e| EngineError::InvalidBody { url: "/v1/models".into(), reason: format!("not a model list: {e}") })
}

/// The ids of the LoRA adapters among `cards`, in listed order.
pub fn adapters(cards: &[ModelCard]) -> Vec<String> {
    cards.iter().filter(|c| c.is_adapter()).map(|c| c.id.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_vllm_answer_with_an_adapter() {
        let cards = parse_models(include_bytes!("../tests/data/v1-models-with-adapter.json")).expect("parses");
        assert_eq!(
            cards,
            [
                ModelCard {
                    id: "tiny".into(),
                    parent: None,
                    root: Some("DIR/models/tiny-llama".into()),
                    max_model_len: Some(512),
                },
                ModelCard {
                    id: "ad1".into(),
                    parent: Some("tiny".into()),
                    root: Some("DIR/models/tiny-lora".into()),
                    max_model_len: None,
                },
            ]
        );
        assert_eq!(adapters(&cards), ["ad1"]);
    }

    #[test]
    fn minimal_entries_and_empty_lists_parse() {
        let cards = parse_models(br#"{"data":[{"id":"m"},{"id":"a","parent":"m"}]}"#).expect("parses");
        assert_eq!(cards[0], ModelCard { id: "m".into(), parent: None, root: None, max_model_len: None });
        assert_eq!(adapters(&cards), ["a"]);
        assert_eq!(parse_models(br#"{"object":"list","data":[]}"#).expect("parses"), []);
    }

    #[test]
    fn non_lists_are_errors() {
        for body in [
            &b"not json"[..],
            b"[]",
            b"{}",
            br#"{"data":{}}"#,
            br#"{"data":[{"parent":"m"}]}"#,
            br#"{"error":{"message":"x"}}"#,
        ] {
            let e = parse_models(body).expect_err(&String::from_utf8_lossy(body));
            assert_eq!(e.code(), "engine.invalid_body", "{e}");
        }
    }
}
