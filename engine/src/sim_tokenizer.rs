//! A deterministic approximation of a BPE tokenizer (Llama 3's, ~4 characters a token in
//! English), giving stable token ids so prompt lengths, the prefix-cache hash chain and
//! `usage` counts behave like the real thing without a vocabulary file.
//!
//! Rules, applied left to right:
//! * a run of letters (with one leading space, if any) is `ceil(len / 6)` tokens, so most
//!   English words are one token and long ones two or more;
//! * a run of digits is one token per group of up to 3 digits (Llama 3 splits numbers so);
//! * a run of newlines is one token, other whitespace runs are one token;
//! * every other character (punctuation, symbols, non-Latin letters) is one token.
//!
//! Token ids are an FNV-1a hash of the piece modulo the 128,256-entry vocabulary; chat
//! messages are wrapped in Llama 3's template with its special token ids.

/// Vocabulary size of Llama 3.
pub const VOCAB: u32 = 128_256;
const BEGIN_OF_TEXT: u32 = 128_000;
const START_HEADER: u32 = 128_006;
const END_HEADER: u32 = 128_007;
const EOT: u32 = 128_009;

/// The chat template's special tokens with their text (Llama 3's).
pub const SPECIAL: [(u32, &str); 4] = [
    (BEGIN_OF_TEXT, "<|begin_of_text|>"),
    (START_HEADER, "<|start_header_id|>"),
    (END_HEADER, "<|end_header_id|>"),
    (EOT, "<|eot_id|>"),
];

/// FNV-1a over bytes, continuing from `h`.
pub fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The token id of one piece of text (chunk `part` of it, for pieces split in several).
pub fn piece_id(piece: &str, part: u32) -> u32 {
    let h = fnv1a(fnv1a(FNV_OFFSET, piece.as_bytes()), &part.to_le_bytes());
    (h % u64::from(BEGIN_OF_TEXT)) as u32
}

/// Calls `f(id, text)` for each token of `text`, left to right; the texts concatenate to
/// `text` exactly (a long word's parts are its 6-letter chunks, the first with the leading
/// space; a digit run's parts are its 3-digit groups), so ids decode back (see
/// [`crate::vocab`]).
pub fn for_each_token(text: &str, mut f: impl FnMut(u32, &str)) {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        let b = bytes[i];
        let next_alpha = bytes.get(i + 1).is_some_and(|c| c.is_ascii_alphabetic());
        // (end of the piece, characters per part, where the first part's count starts)
        let (chunk, body) = if b.is_ascii_alphabetic() || (b == b' ' && next_alpha) {
            i += 1;
            while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
                i += 1;
            }
            (6, start + usize::from(b == b' '))
        } else if b.is_ascii_digit() {
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            (3, start)
        } else if b == b'\n' || b == b'\r' {
            while i < bytes.len() && (bytes[i] == b'\n' || bytes[i] == b'\r') {
                i += 1;
            }
            (usize::MAX, start)
        } else if b.is_ascii_whitespace() {
            while i < bytes.len() && bytes[i].is_ascii_whitespace() && bytes[i] != b'\n' {
                i += 1;
            }
            (usize::MAX, start)
        } else {
            // one character, ASCII or not
            i += text[start..].chars().next().map_or(1, char::len_utf8);
            (usize::MAX, start)
        };
        let piece = &text[start..i];
        let parts = (i - body).div_ceil(chunk).max(1);
        for part in 0..parts {
            let from = if part == 0 { start } else { body + part * chunk };
            let to = if part + 1 == parts { i } else { body + (part + 1) * chunk };
            f(piece_id(piece, part as u32), &text[from..to]);
        }
    }
}

/// Appends the token ids of `text` to `out`.
pub fn encode(text: &str, out: &mut Vec<u32>) {
    for_each_token(text, |id, _| out.push(id));
}

/// Appends a completion prompt's ids: the begin-of-text token, then `text` — what vLLM's
/// Llama tokenizer gives a completion prompt (and `/tokenize` unless `add_special_tokens`
/// is false). An empty text stays empty (the engine refuses an empty prompt).
pub fn encode_prompt(text: &str, out: &mut Vec<u32>) {
    if !text.is_empty() {
        out.push(BEGIN_OF_TEXT);
        encode(text, out);
    }
}

/// Number of tokens `text` encodes to.
pub fn count(text: &str) -> usize {
    let mut v = Vec::new();
    encode(text, &mut v);
    v.len()
}

/// Renders chat messages through Llama 3's chat template, ending with the assistant header
/// (`add_generation_prompt`), and appends the token ids to `out`.
pub fn encode_chat<'a>(messages: impl IntoIterator<Item = (&'a str, &'a str)>, out: &mut Vec<u32>) {
    out.push(BEGIN_OF_TEXT);
    for (role, content) in messages {
        out.push(START_HEADER);
        encode(role, out);
        out.push(END_HEADER);
        encode("\n\n", out);
        encode(content, out);
        out.push(EOT);
    }
    out.push(START_HEADER);
    encode("assistant", out);
    out.push(END_HEADER);
    encode("\n\n", out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn english_is_about_four_characters_a_token() {
        let text = "The quick brown fox jumps over the lazy dog, and then it runs away \
                    into the forest where nobody can find it again until tomorrow morning.";
        let n = count(text);
        let ratio = text.len() as f64 / n as f64;
        assert!((3.0..=6.0).contains(&ratio), "{n} tokens, {ratio} chars/token");
    }

    #[test]
    fn encoding_is_deterministic_and_prefix_stable() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        encode("hello world 12345 !!", &mut a);
        encode("hello world 12345 !! and more", &mut b);
        assert_eq!(&b[..a.len()], &a[..]);
        assert_eq!(a.len(), 1 + 1 + 1 + 2 + 1 + 1 + 1);
        assert!(a.iter().all(|t| *t < VOCAB));
    }

    #[test]
    fn chat_template_adds_llama3_overhead() {
        let mut v = Vec::new();
        encode_chat([("user", "hi")], &mut v);
        // bos + (hdr user /hdr \n\n hi eot) + (hdr assi stant /hdr \n\n)
        assert_eq!(v.len(), 1 + 6 + 5);
        assert_eq!(v[0], BEGIN_OF_TEXT);
    }

    #[test]
    fn token_texts_concatenate_to_the_input() {
        for text in ["hello world", " internationalization 1234567 !!\n\n\t x", "日本語 ok", "", "a1b2"] {
            let (mut ids, mut texts) = (Vec::new(), String::new());
            for_each_token(text, |id, t| {
                ids.push(id);
                texts.push_str(t);
            });
            assert_eq!(texts, text);
            let mut encoded = Vec::new();
            encode(text, &mut encoded);
            assert_eq!(ids, encoded, "{text:?}");
        }
        let mut parts = Vec::new();
        for_each_token(" internationalization", |_, t| parts.push(t.to_string()));
        assert_eq!(parts, [" intern", "ationa", "lizati", "on"]);
    }

    #[test]
    fn odd_input_never_panics() {
        for s in ["", " ", "\n\n\r", "日本語のテキスト", "a\u{0}b", "🙂🙂", "   x"] {
            let _ = count(s);
        }
        assert_eq!(count("日本"), 2);
    }
}
