//! The fuzz targets' bodies, called by the libFuzzer entries in `fuzz_targets/*.rs` (run by
//! `cargo fuzz`, see `.ci/fuzz-smoke.sh`). Each takes arbitrary bytes, feeds them to one
//! parser of untrusted input, and panics when a property fails; a parser's own panic is the
//! other finding.
//!
//! ```text
//!  bytes ─> spec_parse       Manifest::parse / parse_all, LabelSelector, Kind   (user YAML/JSON)
//!        ─> gateway_request  request::parse, with_include_usage, cost_estimate   (client bodies)
//!        ─> prometheus_text  EngineMetrics::parse, samples, parse_models         (engine output)
//!        ─> sse_stream       SseScanner split anywhere, usage_of_body            (engine output)
//!        ─> kv_events        kv_events::decode_batch, decode_seq                 (engine ZMQ events)
//! ```
#![forbid(unsafe_code)]

use flotilla_api::{Kind, LabelSelector, Manifest};
use flotilla_engine::metrics::samples;
use flotilla_engine::{parse_models, EngineMetrics};
use flotilla_gateway::admission::cost_estimate;
use flotilla_gateway::request::{parse, with_include_usage, ApiKind};
use flotilla_gateway::sse::{usage_of_body, SseScanner};

/// A manifest parses to a valid spec that re-parses equal from its canonical YAML and its
/// JSON form, or fails with a coded, non-empty message; selectors and kinds never panic.
pub fn spec_parse(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match Manifest::parse(&text) {
        Ok(m) => {
            m.spec.validate().expect("a parsed manifest is valid");
            let yaml = m.to_yaml();
            assert_eq!(Manifest::parse(&yaml).as_ref(), Ok(&m), "canonical YAML re-parses equal: {yaml}");
            let json = serde_json::json!({ "kind": m.kind(), "metadata": m.metadata, "spec": m.spec.to_json() });
            assert_eq!(Manifest::parse(&json.to_string()).as_ref(), Ok(&m), "JSON re-parses equal: {json}");
        }
        Err(e) => assert!(!e.to_string().trim().is_empty() && !e.code().is_empty(), "empty error {e:?}"),
    }
    if let Ok(all) = Manifest::parse_all(&text) {
        assert!(!all.is_empty());
    }
    let _ = LabelSelector::parse(&text);
    let _ = text.parse::<Kind>();
}

/// A client body yields features or a 400 with a code; a stream without usage is rewritten
/// to a body with the same features and usage on, and a second rewrite changes nothing.
pub fn gateway_request(data: &[u8]) {
    for kind in [ApiKind::Chat, ApiKind::Completions, ApiKind::Embeddings] {
        let f = match parse(kind, data) {
            Ok(f) => f,
            Err(e) => {
                assert_eq!(e.status().as_u16(), 400, "{e:?}");
                assert!(!e.code.as_str().is_empty() && !e.message.is_empty());
                continue;
            }
        };
        assert!(!f.model.is_empty());
        assert!(cost_estimate(&f) >= 1);
        match with_include_usage(data, &f) {
            None => assert!(!f.stream || f.include_usage, "a stream without usage is not rewritten"),
            Some(out) => {
                let g = parse(kind, &out).unwrap_or_else(|e| panic!("rewritten body refused: {e:?}"));
                assert!(g.stream && g.include_usage && g.has_stream_options);
                assert_eq!((&g.model, g.max_tokens, &g.prompt), (&f.model, f.max_tokens, &f.prompt));
                assert!(with_include_usage(&out, &g).is_none());
            }
        }
    }
}

/// Engine metrics standardize to numbers that are never NaN, with KV-cache usage in [0, 1];
/// every sample read is finite; a `/v1/models` body never panics.
pub fn prometheus_text(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let m = EngineMetrics::parse(&text);
    let fields = [
        m.running,
        m.waiting,
        m.kv_cache_usage,
        m.prompt_tokens,
        m.generation_tokens,
        m.prefix_cache_queries,
        m.prefix_cache_hits,
        m.preemptions,
        m.requests_finished,
    ];
    assert!(fields.iter().all(|v| !v.is_nan()), "{m:?}");
    assert!((0.0..=1.0).contains(&m.kv_cache_usage), "{m:?}");
    assert!(m.is_known() || m == EngineMetrics::default(), "{m:?}");
    assert!(samples(&text).all(|s| s.value.is_finite()));
    let _ = m.prefix_cache_hit_rate();
    if let Ok(cards) = parse_models(data) {
        let _ = flotilla_engine::adapters(&cards);
    }
}

/// An SSE stream scans the same however it is split (the first byte picks the splits and
/// whether usage-only chunks are stripped); without stripping, every byte passes through.
pub fn sse_stream(data: &[u8]) {
    let Some((&control, body)) = data.split_first() else { return };
    let strip = control & 1 == 1;
    let step = usize::from(control >> 1) + 1;
    let scan = |cuts: &mut dyn Iterator<Item = &[u8]>| {
        let mut s = SseScanner::new(strip);
        let mut out = Vec::new();
        for piece in cuts {
            out.extend_from_slice(&s.feed(piece).0);
        }
        out.extend_from_slice(&s.finish());
        (out, s.usage, s.content_chunks, s.done)
    };
    let whole = scan(&mut std::iter::once(body));
    let split = scan(&mut body.chunks(step));
    assert_eq!(whole, split, "split every {step} bytes");
    if !strip {
        assert_eq!(whole.0, body, "without stripping the stream passes unchanged");
    }
    if let Some(u) = usage_of_body(body) {
        let _ = u.total();
    }
}

/// A KV event payload decodes or fails with a message; a decoded batch re-encodes (vLLM
/// 0.32's encoding) to one that decodes equal, and its `BlockStored` events hold
/// `block_size` token ids per block.
pub fn kv_events(data: &[u8]) {
    use flotilla_engine::kv_events::{decode_batch, decode_seq, encode_batch, KvEvent};
    let _ = decode_seq(data);
    match decode_batch(data) {
        Ok(b) => {
            for e in &b.events {
                if let KvEvent::BlockStored { block_hashes, token_ids, block_size, .. } = e {
                    assert_eq!(token_ids.len(), block_hashes.len() * *block_size as usize);
                }
            }
            // NaN ts cannot compare equal: compare the rest.
            let again = decode_batch(&encode_batch(&b)).expect("an encoded batch decodes");
            assert_eq!((&again.events, again.dp_rank), (&b.events, b.dp_rank));
        }
        Err(e) => assert!(!e.0.is_empty()),
    }
}

/// A client's body rewritten for the P/D legs never panics; a prefill leg's body is a JSON
/// object asking for one token kept for a remote decode, with every other field of the
/// client's as it was; transfer parameters read from an answer go into the decode leg as
/// they came.
pub fn pd_bodies(data: &[u8]) {
    use flotilla_gateway::pd::{decode_body, params_of, prefill_body};
    let params = params_of(data);
    let Some(leg) = prefill_body(data) else { return };
    let leg: serde_json::Map<String, serde_json::Value> = match serde_json::from_slice(&leg) {
        Ok(v) => v,
        // a client's value serde_json keeps as raw text but cannot hold as a Value (1e999)
        Err(_) => return,
    };
    assert_eq!(leg["kv_transfer_params"]["do_remote_decode"], true);
    assert_eq!((&leg["stream"], &leg["max_tokens"]), (&serde_json::json!(false), &serde_json::json!(1)));
    assert!(!leg.contains_key("stream_options") && !leg.contains_key("min_tokens"));
    if let Ok(client) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(data) {
        const REWRITTEN: [&str; 6] =
            ["kv_transfer_params", "stream", "max_tokens", "max_completion_tokens", "stream_options", "min_tokens"];
        for (k, v) in client.iter().filter(|(k, _)| !REWRITTEN.contains(&k.as_str())) {
            assert_eq!(leg.get(k), Some(v), "{k} kept");
        }
    }
    if let Some(p) = params {
        let decode: serde_json::Value = serde_json::from_slice(&decode_body(data, &p).expect("an object")).unwrap();
        let sent: serde_json::Value = serde_json::from_str(p.get()).unwrap();
        assert_eq!(decode["kv_transfer_params"], sent);
    }
}
