//! Response inspection without buffering: splits a server-sent-event stream at event
//! boundaries, reads `usage` and counts content chunks, and optionally drops the
//! usage-only chunk the gateway asked for on the client's behalf. Also reads `usage`
//! from a complete JSON response.

use bytes::{Bytes, BytesMut};
use serde::Deserialize;

/// Token counts reported by the engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

impl Usage {
    /// Prompt plus completion tokens (saturating: the numbers come from the engine).
    pub fn total(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<serde::de::IgnoredAny>,
    usage: Option<Usage>,
}

/// Reads `usage` from a whole JSON body.
pub fn usage_of_body(body: &[u8]) -> Option<Usage> {
    serde_json::from_slice::<Chunk>(body).ok()?.usage
}

/// Largest partial event held back before passing bytes through unparsed.
const MAX_PENDING: usize = 1 << 20;

/// Stateful scanner of one SSE stream.
#[derive(Debug, Default)]
pub struct SseScanner {
    pending: BytesMut,
    /// Drop chunks with no choices that carry usage (the client did not ask for them).
    pub strip_usage_chunk: bool,
    pub usage: Option<Usage>,
    /// Chunks with at least one choice.
    pub content_chunks: u64,
    pub done: bool,
}

impl SseScanner {
    pub fn new(strip_usage_chunk: bool) -> Self {
        SseScanner { strip_usage_chunk, ..Default::default() }
    }

    /// Feeds bytes from upstream; returns what to send to the client now and whether a
    /// content chunk was seen in them.
    pub fn feed(&mut self, data: &[u8]) -> (Bytes, bool) {
        self.pending.extend_from_slice(data);
        let mut out = BytesMut::new();
        let mut content = false;
        while let Some(pos) = find_boundary(&self.pending) {
            let event = self.pending.split_to(pos);
            let (keep, has_content) = self.inspect(&event);
            content |= has_content;
            if keep {
                out.extend_from_slice(&event);
            }
        }
        if self.pending.len() > MAX_PENDING {
            out.extend_from_slice(&self.pending.split());
        }
        (out.freeze(), content)
    }

    /// Whatever is left when the upstream ends.
    pub fn finish(&mut self) -> Bytes {
        self.pending.split().freeze()
    }

    fn inspect(&mut self, event: &[u8]) -> (bool, bool) {
        let mut keep = true;
        let mut content = false;
        for line in event.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(data) = line.strip_prefix(b"data:") else { continue };
            let data = data.strip_prefix(b" ").unwrap_or(data);
            if data == b"[DONE]" {
                self.done = true;
                continue;
            }
            if let Ok(c) = serde_json::from_slice::<Chunk>(data) {
                if let Some(u) = c.usage {
                    self.usage = Some(u);
                    if c.choices.is_empty() && self.strip_usage_chunk {
                        keep = false;
                    }
                }
                if !c.choices.is_empty() {
                    self.content_chunks += 1;
                    content = true;
                }
            }
        }
        (keep, content)
    }
}

/// End (exclusive, including the blank line) of the first complete event.
fn find_boundary(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\
data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}],\"usage\":null}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n\
data: [DONE]\n\n";

    #[test]
    fn strips_usage_chunk_across_arbitrary_splits() {
        for split in 1..STREAM.len() {
            let mut s = SseScanner::new(true);
            let (a, _) = s.feed(&STREAM.as_bytes()[..split]);
            let (b, _) = s.feed(&STREAM.as_bytes()[split..]);
            let mut out = a.to_vec();
            out.extend_from_slice(&b);
            out.extend_from_slice(&s.finish());
            let text = String::from_utf8(out).unwrap();
            assert!(!text.contains("prompt_tokens"), "{text}");
            assert!(text.ends_with("data: [DONE]\n\n"));
            assert_eq!(s.usage, Some(Usage { prompt_tokens: 3, completion_tokens: 2 }));
            assert_eq!(s.content_chunks, 2);
            assert!(s.done);
        }
    }

    #[test]
    fn keeps_everything_when_the_client_asked() {
        let mut s = SseScanner::new(false);
        let (out, content) = s.feed(STREAM.as_bytes());
        assert_eq!(out, STREAM.as_bytes());
        assert!(content);
        assert_eq!(s.usage.unwrap().completion_tokens, 2);
    }

    #[test]
    fn body_usage() {
        assert_eq!(
            usage_of_body(
                br#"{"id":"x","choices":[{}],"usage":{"prompt_tokens":4,"completion_tokens":1,"total_tokens":5}}"#
            ),
            Some(Usage { prompt_tokens: 4, completion_tokens: 1 })
        );
        assert_eq!(usage_of_body(b"not json"), None);
        // Found while writing gateway/tests/proptest_qos.rs: the sum overflowed (a panic
        // in a Drop in debug builds) for an engine reporting absurd usage.
        let huge = usage_of_body(br#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":2}}"#);
        assert_eq!(huge.map(|u| u.total()), Some(u64::MAX));
    }
}
