//! Property tests of what the gateway reads from bodies: request features
//! (`request::parse`), the `include_usage` rewrite (`request::with_include_usage`) and the
//! SSE scanner (`sse::SseScanner`). Arbitrary bytes never panic and fail with a 400 and a
//! code; generated OpenAI bodies yield the features they hold; a rewritten body parses to
//! the same features with usage on; a stream split anywhere is scanned the same.
//!
//! ```text
//!  bytes / generated bodies ──parse──> RequestFeatures ──with_include_usage──> parse again
//!  SSE events ──split at random points──> SseScanner::feed* + finish ══ one feed
//! ```
use flotilla_gateway::admission::cost_estimate;
use flotilla_gateway::request::{parse, with_include_usage, ApiKind, RequestFeatures};
use flotilla_gateway::sse::{SseScanner, Usage};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

const KINDS: [ApiKind; 3] = [ApiKind::Chat, ApiKind::Completions, ApiKind::Embeddings];

/// Checks what holds for any body: no panic, a 400 with a code on error, sane features and
/// a rewrite that parses to the same features with usage on.
fn check_any(body: &[u8]) -> Result<(), TestCaseError> {
    for kind in KINDS {
        match parse(kind, body) {
            Err(e) => {
                prop_assert_eq!(e.status().as_u16(), 400);
                prop_assert!(!e.code.as_str().is_empty() && !e.message.is_empty());
            }
            Ok(f) => {
                prop_assert!(!f.model.is_empty());
                let cost = cost_estimate(&f);
                prop_assert!(cost >= 1 && cost <= body.len() as u64 / 4 + 8192 + 1, "cost {}", cost);
                check_rewrite(kind, body, &f)?;
            }
        }
    }
    Ok(())
}

fn check_rewrite(kind: ApiKind, body: &[u8], f: &RequestFeatures) -> Result<(), TestCaseError> {
    let Some(out) = with_include_usage(body, f) else {
        prop_assert!(!f.stream || f.include_usage, "a stream without usage is rewritten");
        return Ok(());
    };
    prop_assert!(f.stream && !f.include_usage);
    let g = parse(kind, &out).map_err(|e| TestCaseError::fail(format!("rewritten body refused: {e:?}")))?;
    prop_assert!(g.include_usage && g.has_stream_options && g.stream);
    prop_assert_eq!((&g.model, g.max_tokens, &g.prompt), (&f.model, f.max_tokens, &f.prompt));
    prop_assert!(with_include_usage(&out, &g).is_none(), "a second rewrite changes nothing");
    Ok(())
}

fn text() -> impl Strategy<Value = String> {
    ".{0,12}"
}

/// A JSON value of any shape, small.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn content() -> impl Strategy<Value = Value> {
    prop_oneof![
        text().prop_map(Value::String),
        prop::collection::vec(text().prop_map(|t| json!({"type": "text", "text": t})), 0..3).prop_map(Value::Array),
        any_json(),
    ]
}

/// An OpenAI-shaped body: the fields the gateway reads, each usually well-typed, sometimes
/// missing, null or of another type; plus unrelated fields.
fn body() -> impl Strategy<Value = Value> {
    let maybe = |s: BoxedStrategy<Value>| {
        prop_oneof![
            6 => s.prop_map(Some),
            1 => Just(None),
            1 => Just(Some(Value::Null)),
            1 => any_json().prop_map(Some),
        ]
    };
    let messages = prop::collection::vec(
        (prop::sample::select(vec!["system", "user", "assistant"]), content())
            .prop_map(|(role, content)| json!({"role": role, "content": content})),
        0..4,
    )
    .prop_map(Value::Array);
    (
        maybe("[a-z0-9./-]{1,12}".prop_map(Value::String).boxed()),
        maybe(any::<bool>().prop_map(Value::Bool).boxed()),
        maybe(
            prop::option::of(any::<bool>()).prop_map(|b| b.map_or(json!({}), |b| json!({"include_usage": b}))).boxed(),
        ),
        maybe((0u64..100_000).prop_map(|n| json!(n)).boxed()),
        maybe((0u64..100_000).prop_map(|n| json!(n)).boxed()),
        maybe(messages.boxed()),
        maybe(content().boxed()),
        maybe(content().boxed()),
        prop::collection::btree_map("[a-z]{1,6}", any_json(), 0..3),
    )
        .prop_map(|(model, stream, so, max_tokens, max_completion, messages, prompt, input, extra)| {
            let mut m: Map<String, Value> = extra.into_iter().collect();
            for (k, v) in [
                ("model", model),
                ("stream", stream),
                ("stream_options", so),
                ("max_tokens", max_tokens),
                ("max_completion_tokens", max_completion),
                ("messages", messages),
                ("prompt", prompt),
                ("input", input),
            ] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            Value::Object(m)
        })
}

proptest! {
    // 256 cases unless PROPTEST_CASES says otherwise.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check_any(&bytes)?;
    }

    #[test]
    fn arbitrary_json_never_panics(v in any_json(), ws in "[ \t\r\n]{0,2}") {
        check_any(format!("{ws}{v}").as_bytes())?;
    }

    #[test]
    fn openai_bodies_yield_their_features(v in body(), ws in "[ \t\r\n]{0,2}", pretty in any::<bool>()) {
        let text = if pretty { serde_json::to_string_pretty(&v).unwrap() } else { v.to_string() };
        let bytes = format!("{ws}{text}").into_bytes();
        check_any(&bytes)?;
        for kind in KINDS {
            let Ok(f) = parse(kind, &bytes) else { continue };
            prop_assert_eq!(Some(f.model.as_str()), v["model"].as_str());
            prop_assert_eq!(f.stream, v["stream"].as_bool().unwrap_or(false));
            let expect_max = v["max_tokens"].as_u64().or(v["max_completion_tokens"].as_u64());
            prop_assert_eq!(f.max_tokens, expect_max);
            prop_assert_eq!(f.has_stream_options, v.get("stream_options").is_some());
            // (serde also reads a struct from an array, `[true]`; the engine refuses that.)
            if !v["stream_options"].is_array() {
                prop_assert_eq!(f.include_usage, v["stream_options"]["include_usage"].as_bool().unwrap_or(false));
            }
            if kind == ApiKind::Chat {
                for m in v["messages"].as_array().expect("chat needs messages") {
                    if let Some(t) = m["content"].as_str() {
                        prop_assert!(f.prompt.contains(t), "{:?} lacks {:?}", f.prompt, t);
                    }
                }
            }
        }
    }

    #[test]
    fn sse_streams_scan_the_same_however_split(
        events in prop::collection::vec(sse_event(), 0..8),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        strip in any::<bool>(),
        crlf in any::<bool>(),
    ) {
        let sep = if crlf { "\r\n\r\n" } else { "\n\n" };
        let stream: String = events.iter().map(|(e, _)| format!("{e}{sep}")).collect();
        let bytes = stream.as_bytes();
        let whole = scan(bytes, &[], strip);
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        at.sort_unstable();
        prop_assert_eq!(&scan(bytes, &at, strip), &whole);
        let (out, usage, chunks) = whole;
        // Usage-only events are dropped when asked, everything else passes unchanged.
        let kept: String = events
            .iter()
            .filter(|(_, kind)| !(strip && *kind == EventKind::UsageOnly))
            .map(|(e, _)| format!("{e}{sep}"))
            .collect();
        prop_assert_eq!(out, kept.into_bytes());
        let last_usage = events.iter().filter(|(_, k)| *k != EventKind::Content && *k != EventKind::Other).count();
        prop_assert_eq!(usage.is_some(), last_usage > 0);
        let content = events.iter().filter(|(_, k)| matches!(k, EventKind::Content | EventKind::ContentAndUsage));
        prop_assert_eq!(chunks, content.count() as u64);
    }

    #[test]
    fn sse_scanner_never_panics_on_garbage(
        data in prop::collection::vec(any::<u8>(), 0..512),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..4),
    ) {
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(data.len() + 1)).collect();
        at.sort_unstable();
        let (out, _, _) = scan(&data, &at, false);
        prop_assert_eq!(out, data);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventKind {
    /// A chunk with choices (and no usage).
    Content,
    /// A chunk with no choices and a usage.
    UsageOnly,
    /// A chunk with choices and a usage.
    ContentAndUsage,
    /// `[DONE]`, comments, non-JSON data.
    Other,
}

fn sse_event() -> impl Strategy<Value = (String, EventKind)> {
    let usage = (0u64..1000, 0u64..1000).prop_map(|(p, c)| json!({"prompt_tokens": p, "completion_tokens": c}));
    prop_oneof![
        "[a-z ]{0,8}"
            .prop_map(|t| (format!("data: {}", json!({"choices": [{"delta": {"content": t}}]})), EventKind::Content)),
        usage.clone().prop_map(|u| (format!("data: {}", json!({"choices": [], "usage": u})), EventKind::UsageOnly)),
        usage.prop_map(|u| (format!("data:{}", json!({"choices": [{}], "usage": u})), EventKind::ContentAndUsage)),
        Just(("data: [DONE]".to_owned(), EventKind::Other)),
        "[a-z ]{0,8}".prop_map(|t| (format!(": {t}"), EventKind::Other)),
        "[a-z{}]{0,8}".prop_map(|t| (format!("data: {t}"), EventKind::Other)),
    ]
}

/// Feeds `bytes` cut at `at` (ascending) and returns the output, the usage and the count
/// of content chunks.
fn scan(bytes: &[u8], at: &[usize], strip: bool) -> (Vec<u8>, Option<Usage>, u64) {
    let mut s = SseScanner::new(strip);
    let mut out = Vec::new();
    let mut from = 0;
    for &to in at.iter().chain(std::iter::once(&bytes.len())) {
        out.extend_from_slice(&s.feed(&bytes[from..to]).0);
        from = to;
    }
    out.extend_from_slice(&s.finish());
    (out, s.usage, s.content_chunks)
}
