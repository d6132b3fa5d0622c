//! The sim's reverse vocabulary, for `/detokenize` and `token_strs`: its tokenizer hashes
//! pieces of text to ids (see [`crate::tokenizer`]), so an id decodes only to a piece the
//! sim has seen. It knows the chat template's special tokens and every word the simulated
//! model writes from the start, and learns the pieces of every text sent to `/tokenize`
//! (what clients that align prompts through `/tokenize` + `/detokenize` need, as `vllm
//! bench serve` does). Bounded by the vocabulary size: ids are below [`tokenizer::VOCAB`].
//! Two pieces hashing to one id: the one learned last wins.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::{text, tokenizer};

/// Why an id list does not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// At or above the vocabulary size (vLLM refuses these too).
    OutOfRange(u32),
    /// Never produced by this sim's tokenizer or model.
    Unknown(u32),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::OutOfRange(id) => {
                write!(f, "token id {id} is out of vocabulary (size {})", tokenizer::VOCAB)
            }
            DecodeError::Unknown(id) => write!(
                f,
                "token id {id} was never produced by this simulator (it decodes ids it wrote or \
                 returned from /tokenize)"
            ),
        }
    }
}

/// Id → piece text.
#[derive(Debug)]
pub struct Vocabulary {
    pieces: Mutex<HashMap<u32, Box<str>>>,
}

impl Default for Vocabulary {
    fn default() -> Self {
        let mut pieces: HashMap<u32, Box<str>> = HashMap::new();
        for (id, t) in tokenizer::SPECIAL {
            pieces.insert(id, t.into());
        }
        for word in text::WORDS {
            tokenizer::for_each_token(word, |id, t| {
                pieces.insert(id, t.into());
            });
        }
        Vocabulary { pieces: Mutex::new(pieces) }
    }
}

impl Vocabulary {
    /// Remembers the pieces of `text`.
    pub fn learn(&self, text: &str) {
        let mut pieces = self.pieces.lock().unwrap_or_else(|e| e.into_inner());
        tokenizer::for_each_token(text, |id, t| {
            if pieces.get(&id).is_none_or(|p| **p != *t) {
                pieces.insert(id, t.into());
            }
        });
    }

    /// Each id's text.
    pub fn pieces(&self, ids: &[u32]) -> Result<Vec<String>, DecodeError> {
        let pieces = self.pieces.lock().unwrap_or_else(|e| e.into_inner());
        ids.iter()
            .map(|&id| {
                if id >= tokenizer::VOCAB {
                    return Err(DecodeError::OutOfRange(id));
                }
                pieces.get(&id).map(|p| p.to_string()).ok_or(DecodeError::Unknown(id))
            })
            .collect()
    }

    /// The text of `ids`.
    pub fn decode(&self, ids: &[u32]) -> Result<String, DecodeError> {
        Ok(self.pieces(ids)?.concat())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learned_text_and_generated_words_decode_back() {
        let v = Vocabulary::default();
        let text = "Flotilla routes 12345 requests\n\nquickly!";
        let mut ids = Vec::new();
        tokenizer::encode(text, &mut ids);
        assert!(matches!(v.decode(&ids), Err(DecodeError::Unknown(_))), "not learned yet");
        v.learn(text);
        assert_eq!(v.decode(&ids).unwrap(), text);
        // a prefix of the ids decodes to a prefix of the text
        assert_eq!(v.decode(&ids[..3]).unwrap(), "Flotilla routes", "Flotil|la| routes");
        let (word, id) = text::token(7, 3);
        assert_eq!(v.decode(&[id]).unwrap(), word, "the model's words are known from the start");
        assert_eq!(v.decode(&[128_000]).unwrap(), "<|begin_of_text|>");
    }

    #[test]
    fn out_of_range_and_unknown_ids_are_named() {
        let v = Vocabulary::default();
        assert_eq!(v.decode(&[tokenizer::VOCAB]), Err(DecodeError::OutOfRange(tokenizer::VOCAB)));
        let mut ids = Vec::new();
        tokenizer::encode("zyzzyva", &mut ids);
        assert_eq!(v.decode(&ids), Err(DecodeError::Unknown(ids[0])));
        assert!(DecodeError::Unknown(5).to_string().contains("5"));
    }
}
