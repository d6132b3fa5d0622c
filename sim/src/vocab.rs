//! The sim's reverse vocabulary, for `/detokenize` and `token_strs`: its tokenizer hashes
//! pieces of text to ids (see [`crate::tokenizer`]), so an id decodes only to a piece the
//! sim has seen. It knows the chat template's special tokens and every word the simulated
//! model writes from the start, and learns the pieces of every text sent to `/tokenize`
//! (what clients that align prompts through `/tokenize` + `/detokenize` need, as `vllm
//! bench serve` does). Bounded by the vocabulary size: ids are below [`tokenizer::VOCAB`].
//! Two pieces hashing to one id: the one learned last wins.
//!
//! vLLM decodes every id below its vocabulary size, so the sim does too: an id it has not
//! seen (another replica tokenized the text, or the client made the ids up) decodes to a
//! stand-in, one of the model's words picked by the id — one token, so a decoded prompt
//! re-tokenizes to about as many tokens as it had ids, which is what prompt-aligning
//! clients need of it. Only ids at or above the vocabulary size are refused.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::{text, tokenizer};

/// An id at or above the vocabulary size (vLLM refuses these too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfRange(pub u32);

impl std::fmt::Display for OutOfRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "token id {} is out of vocabulary (size {})", self.0, tokenizer::VOCAB)
    }
}

/// The stand-in text of an id the sim has not seen: one of the model's words.
fn stand_in(id: u32) -> &'static str {
    text::WORDS[(text::mix(u64::from(id)) % text::WORDS.len() as u64) as usize]
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

    /// Each id's text (a stand-in for ids not seen).
    pub fn pieces(&self, ids: &[u32]) -> Result<Vec<String>, OutOfRange> {
        let pieces = self.pieces.lock().unwrap_or_else(|e| e.into_inner());
        ids.iter()
            .map(|&id| match pieces.get(&id) {
                _ if id >= tokenizer::VOCAB => Err(OutOfRange(id)),
                Some(p) => Ok(p.to_string()),
                None => Ok(stand_in(id).to_string()),
            })
            .collect()
    }

    /// The text of `ids`.
    pub fn decode(&self, ids: &[u32]) -> Result<String, OutOfRange> {
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
        assert_ne!(v.decode(&ids).unwrap(), text, "not learned yet");
        v.learn(text);
        assert_eq!(v.decode(&ids).unwrap(), text);
        // a prefix of the ids decodes to a prefix of the text
        assert_eq!(v.decode(&ids[..3]).unwrap(), "Flotilla routes", "Flotil|la| routes");
        let (word, id) = text::token(7, 3);
        assert_eq!(v.decode(&[id]).unwrap(), word, "the model's words are known from the start");
        assert_eq!(v.decode(&[128_000]).unwrap(), "<|begin_of_text|>");
    }

    #[test]
    fn unseen_ids_decode_to_one_token_each_and_out_of_range_is_named() {
        let v = Vocabulary::default();
        assert_eq!(v.decode(&[tokenizer::VOCAB]), Err(OutOfRange(tokenizer::VOCAB)));
        assert!(OutOfRange(128_300).to_string().contains("128300"));
        let mut ids = Vec::new();
        tokenizer::encode("zyzzyva quixotic 99 xylophones", &mut ids);
        let text = v.decode(&ids).unwrap();
        assert_eq!(tokenizer::count(&text), ids.len(), "{text:?}");
        assert_eq!(v.decode(&ids).unwrap(), text, "deterministic");
        assert_eq!(Vocabulary::default().decode(&ids).unwrap(), text, "the same on every replica");
    }
}
