//! The streams whose chunk timing the sim is held to (see `flotilla_testkit::sse_timeline`):
//! chat and completions, with and without `stream_options.include_usage`, four tokens each
//! (`ignore_eos`), and the recorded shapes of real vLLM's answers
//! (`tests/data/stream-timelines.txt`, written by the real-engine tier with
//! `FLOTILLA_RECORD_SAMPLES=1`). The tier compares the live real engine and the sim; the
//! stored-sample suite holds the sim to the recording without a real engine.

use serde_json::json;

/// Where the recording lives, relative to the crate.
pub const RECORDING: &str = "tests/data/stream-timelines.txt";

/// (name, path, body) of each compared stream, for a server serving `model`.
pub fn streams(model: &str) -> Vec<(&'static str, &'static str, String)> {
    let prompt = "the quick brown fox jumps over the lazy dog ".repeat(10);
    let usage = json!({"include_usage": true});
    let chat = |with_usage: bool| {
        let mut b = json!({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 4,
                           "ignore_eos": true, "stream": true});
        if with_usage {
            b["stream_options"] = usage.clone();
        }
        b.to_string()
    };
    let completion = |with_usage: bool| {
        let mut b = json!({"model": model, "prompt": prompt, "max_tokens": 4, "ignore_eos": true, "stream": true});
        if with_usage {
            b["stream_options"] = usage.clone();
        }
        b.to_string()
    };
    vec![
        ("chat", "/v1/chat/completions", chat(true)),
        ("chat-no-usage", "/v1/chat/completions", chat(false)),
        ("completions", "/v1/completions", completion(true)),
        ("completions-no-usage", "/v1/completions", completion(false)),
    ]
}

/// `name: shape` lines of a recording (`#` lines are comments).
pub fn parse_recording(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(": ").map(|(n, s)| (n.trim().to_string(), s.trim().to_string())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recordings_parse_and_every_stream_has_a_body() {
        let r = parse_recording("# vLLM\nchat: role+token | token×2\n\n# ms: 1 2\ncompletions: token\n");
        assert_eq!(r, [("chat".into(), "role+token | token×2".into()), ("completions".into(), "token".into())]);
        let s = streams("tiny");
        assert_eq!(s.len(), 4);
        assert!(s.iter().all(|(_, _, b)| b.contains("\"tiny\"") && b.contains("\"stream\":true")));
        assert_eq!(s.iter().filter(|(_, _, b)| b.contains("include_usage")).count(), 2);
    }
}
