//! Deterministic generated text: output token `i` of a request with seed `s` is a word
//! picked by a hash of `(s, i)`, so the same seed always yields the same completion, and
//! each word is exactly one token of [`crate::tokenizer`] (so a reply pasted back into a
//! prompt re-tokenizes to the same ids). Also the seeded natural length (end-of-sequence).

use crate::tokenizer;

/// Words the simulated model writes, each with its leading space, each one token.
pub const WORDS: [&str; 64] = [
    " the", " of", " and", " to", " in", " is", " that", " for", " it", " as", " with", " was", " on", " be", " at",
    " by", " this", " had", " not", " are", " but", " from", " or", " have", " an", " they", " which", " one", " you",
    " were", " all", " we", " when", " there", " can", " data", " model", " token", " cache", " batch", " engine",
    " queue", " block", " fleet", " route", " node", " shard", " graph", " value", " store", " time", " space",
    " layer", " state", " point", " vector", " signal", " memory", " kernel", " stream", " result", " cost", " order",
    " path",
];

/// splitmix64: a fast, well-mixed 64-bit hash step.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Output token `index` of a request seeded with `seed`: its text and token id.
pub fn token(seed: u64, index: u32) -> (&'static str, u32) {
    let h = mix(seed ^ mix(u64::from(index).wrapping_add(0x5151)));
    let word = WORDS[(h % WORDS.len() as u64) as usize];
    (word, tokenizer::piece_id(word, 0))
}

/// The number of tokens after which a request seeded with `seed` ends by itself, uniform
/// in `[min, max]`.
pub fn natural_length(seed: u64, min: u32, max: u32) -> u32 {
    let span = u64::from(max - min) + 1;
    min + (mix(seed ^ 0xE05E_E05E) % span) as u32
}

/// The seed of a request that brought none: a hash of its prompt and the engine seed, so
/// identical prompts give identical text (like temperature 0).
pub fn seed_from_prompt(engine_seed: u64, prompt: &[u32]) -> u64 {
    let mut h = mix(engine_seed);
    for t in prompt {
        h = mix(h ^ u64::from(*t));
    }
    h
}

/// A deterministic English-like prompt of `words` words, distinct per `salt` (xorshift over
/// a 12-word vocabulary). Tests and benchmarks use it to build long, shared or unique
/// prefixes without shipping text files.
pub fn synthetic_prompt(words: usize, salt: u64) -> String {
    const W: [&str; 12] =
        ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima"];
    let mut s = String::with_capacity(words * 7);
    let mut x = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for _ in 0..words {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(W[(x % 12) as usize]);
        s.push(' ');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_text_other_seed_other_text() {
        let a: Vec<_> = (0..32).map(|i| token(7, i).0).collect();
        let b: Vec<_> = (0..32).map(|i| token(7, i).0).collect();
        let c: Vec<_> = (0..32).map(|i| token(8, i).0).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn every_word_is_one_token_with_the_same_id() {
        for w in WORDS {
            let mut ids = Vec::new();
            tokenizer::encode(w, &mut ids);
            assert_eq!(ids, vec![tokenizer::piece_id(w, 0)], "{w:?}");
        }
    }

    #[test]
    fn natural_length_stays_in_range() {
        for s in 0..1000 {
            let n = natural_length(s, 16, 20);
            assert!((16..=20).contains(&n));
        }
        assert_eq!(natural_length(3, 5, 5), 5);
    }
}
