//! The hand-assembled chunks held to serde: every chunk [`SseStream`] writes must equal, byte
//! for byte, the chunk serde_json writes from a struct with vLLM's field order, for text with
//! quotes, backslashes, control characters and non-ASCII.

use std::borrow::Cow;
use std::task::{Context, Poll, Waker};

use serde::Serialize;

use super::*;
use crate::scheduler::{FinishReason, Summary};

/// Texts a token or a stop string could carry.
const TEXTS: &[&str] = &[
    " the",
    "",
    "\"quoted\"",
    "back\\slash\\",
    "line\nfeed\r\ntab\tbell\u{7}nul\0bs\u{8}ff\u{c}esc\u{1b}us\u{1f}del\u{7f}",
    "é日本語🦀",
    "\u{2028}\u{2029}\u{fffd}",
    "</script>&<>'",
    "\\u0000 \\\" \"\\",
];

#[derive(Serialize)]
struct Chunk<'a, C> {
    id: &'a str,
    object: &'a str,
    created: u64,
    model: &'a str,
    choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_fingerprint: Option<&'a str>,
}

#[derive(Serialize)]
struct CompletionChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: Option<()>,
    finish_reason: Option<&'a str>,
    stop_reason: Option<&'a str>,
    prompt_token_ids: Option<()>,
    token_ids: Option<()>,
}

#[derive(Serialize)]
struct Delta<'a> {
    content: &'a str,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'a str>,
    /// Only on the last chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_reason: Option<Option<&'a str>>,
    token_ids: Option<()>,
}

const ID: &str = "cmpl-00000000000000ff";
const CREATED: u64 = 1_765_000_000;

/// The serde-built chunk of `text`; `finish` is the finish and stop reason of a last chunk.
fn reference(kind: Kind, model: &str, text: &str, finish: Option<(&str, Option<&str>)>, usage_follows: bool) -> String {
    let fingerprint = (finish.is_some() && !usage_follows).then_some(crate::http::FINGERPRINT);
    let json = match kind {
        Kind::Completion => serde_json::to_string(&Chunk {
            id: ID,
            object: "text_completion",
            created: CREATED,
            model,
            choices: vec![CompletionChoice {
                index: 0,
                text,
                logprobs: None,
                finish_reason: finish.map(|f| f.0),
                stop_reason: finish.and_then(|f| f.1),
                prompt_token_ids: None,
                token_ids: None,
            }],
            system_fingerprint: fingerprint,
        }),
        Kind::Chat => serde_json::to_string(&Chunk {
            id: ID,
            object: "chat.completion.chunk",
            created: CREATED,
            model,
            choices: vec![ChatChoice {
                index: 0,
                delta: Delta { content: text },
                logprobs: None,
                finish_reason: finish.map(|f| f.0),
                stop_reason: finish.map(|f| f.1),
                token_ids: None,
            }],
            system_fingerprint: fingerprint,
        }),
    };
    format!("data: {}\n\n", json.unwrap())
}

fn stream(kind: Kind, model: &str, include_usage: bool) -> (mailbox::Sender<Event>, SseStream) {
    let (tx, rx) = mailbox::channel();
    (tx, SseStream::new(rx, kind, ID, CREATED, model, include_usage))
}

fn text_of(b: &Bytes) -> &str {
    std::str::from_utf8(b).unwrap()
}

#[test]
fn json_str_writes_what_serde_json_writes() {
    let every_ascii: String = (0u8..=0x7f).map(char::from).collect();
    for s in TEXTS.iter().copied().chain([every_ascii.as_str()]) {
        let mut out = BytesMut::new();
        json_str(&mut out, s);
        assert_eq!(text_of(&out.freeze()), serde_json::to_string(s).unwrap(), "{s:?}");
    }
}

#[test]
fn token_chunks_equal_the_serde_built_chunks() {
    for kind in [Kind::Completion, Kind::Chat] {
        for model in ["tiny", "org/\"odd\" \\ model é"] {
            let (_tx, mut s) = stream(kind, model, false);
            for text in TEXTS {
                s.token_chunk(text);
                assert_eq!(text_of(&s.take()), reference(kind, model, text, None, false), "{kind:?} {text:?}");
            }
        }
    }
}

#[test]
fn last_chunks_equal_the_serde_built_chunks() {
    for kind in [Kind::Completion, Kind::Chat] {
        for usage in [false, true] {
            for text in TEXTS {
                for (reason, stop) in [("length", None), ("stop", Some(*text)), ("stop", None)] {
                    let (_tx, mut s) = stream(kind, "tiny", usage);
                    s.finish_chunk(text, reason, stop);
                    assert_eq!(
                        text_of(&s.take()),
                        reference(kind, "tiny", text, Some((reason, stop)), usage),
                        "{kind:?} usage={usage} {text:?} {reason} {stop:?}"
                    );
                }
            }
        }
    }
}

/// Polls `s` until it ends (every event must already be queued).
fn drain(s: &mut SseStream) -> Vec<String> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut writes = Vec::new();
    loop {
        match Pin::new(&mut *s).poll_next(&mut cx) {
            Poll::Ready(Some(Ok(b))) => writes.push(text_of(&b).to_string()),
            Poll::Ready(None) => return writes,
            Poll::Pending => panic!("stream waits with everything queued"),
        }
    }
}

#[test]
fn a_whole_stream_is_role_tokens_last_usage_done_and_queued_events_share_a_write() {
    let summary = Summary { prompt_tokens: 7, output_tokens: 3, cached_tokens: 0, external_tokens: 0, preemptions: 0 };
    let (tx, mut s) = stream(Kind::Chat, "tiny", true);
    tx.send(Event::Token(Cow::Borrowed(" a\"b"))).unwrap();
    let mut cx = Context::from_waker(Waker::noop());
    let Poll::Ready(Some(Ok(first))) = Pin::new(&mut s).poll_next(&mut cx) else { panic!("no first write") };
    let role = r#"data: {"id":"cmpl-00000000000000ff","object":"chat.completion.chunk","created":1765000000,"model":"tiny","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}"#;
    assert_eq!(text_of(&first), format!("{role}\n\n{}", reference(Kind::Chat, "tiny", " a\"b", None, true)));
    assert!(Pin::new(&mut s).poll_next(&mut cx).is_pending());
    tx.send(Event::Token(Cow::Borrowed(" c"))).unwrap();
    let done = Done { reason: FinishReason::Length, text: "\u{1}d".into(), stop_reason: None, summary, held: None };
    tx.send(Event::Done(Box::new(done))).unwrap();
    let usage = format!(
        r#"data: {{"id":"cmpl-00000000000000ff","object":"chat.completion.chunk","created":1765000000,"model":"tiny","choices":[],"usage":{{"prompt_tokens":7,"total_tokens":10,"completion_tokens":3}},"system_fingerprint":"{}"}}"#,
        crate::http::FINGERPRINT
    );
    let rest = [
        reference(Kind::Chat, "tiny", " c", None, true),
        reference(Kind::Chat, "tiny", "\u{1}d", Some(("length", None)), true),
        format!("{usage}\n\n"),
        "data: [DONE]\n\n".to_string(),
    ];
    assert_eq!(drain(&mut s), vec![rest.concat()]);
}

#[test]
fn an_engine_gone_without_an_end_closes_the_stream_with_done() {
    let (tx, mut s) = stream(Kind::Completion, "tiny", false);
    drop(tx);
    assert_eq!(drain(&mut s), vec!["data: [DONE]\n\n".to_string()]);
}
