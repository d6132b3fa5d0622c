//! Server-sent-event streams: parsing `data:` events, classifying OpenAI chunks (role,
//! content, finish, usage, `[DONE]`) and comparing stream structure and chunk shapes.

use std::collections::BTreeSet;

use serde_json::Value;

use super::{diff, json_shape_diff, known, Difference, KnownDifference};

/// One event of a server-sent-event body.
#[derive(Debug, Clone, PartialEq)]
pub enum SseEvent {
    /// `data: [DONE]`.
    Done,
    /// A JSON chunk.
    Chunk(Value),
    /// A `data:` payload that is not JSON.
    Invalid(String),
}

/// The `data:` payloads of an SSE body, one per event (multi-line data joined by `\n`).
pub fn parse_sse(text: &str) -> Vec<SseEvent> {
    let mut events = Vec::new();
    let mut data: Vec<&str> = Vec::new();
    let mut flush = |data: &mut Vec<&str>| {
        if data.is_empty() {
            return;
        }
        let payload = data.join("\n");
        data.clear();
        events.push(if payload.trim() == "[DONE]" {
            SseEvent::Done
        } else {
            match serde_json::from_str(&payload) {
                Ok(v) => SseEvent::Chunk(v),
                Err(_) => SseEvent::Invalid(payload),
            }
        });
    };
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            flush(&mut data);
        } else if let Some(d) = line.strip_prefix("data:") {
            data.push(d.strip_prefix(' ').unwrap_or(d));
        }
    }
    flush(&mut data);
    events
}

/// What role an event plays in an OpenAI stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChunkKind {
    /// The first chat chunk: `delta.role` set.
    Role,
    /// A token chunk.
    Content,
    /// The chunk with `finish_reason` set.
    Finish,
    /// `choices: []` with a `usage` object.
    Usage,
    /// An `{"error": ...}` chunk.
    Error,
    /// `[DONE]`.
    Done,
    /// Not JSON.
    Invalid,
}

impl ChunkKind {
    fn name(self) -> &'static str {
        match self {
            ChunkKind::Role => "role",
            ChunkKind::Content => "content",
            ChunkKind::Finish => "finish",
            ChunkKind::Usage => "usage",
            ChunkKind::Error => "error",
            ChunkKind::Done => "done",
            ChunkKind::Invalid => "invalid",
        }
    }
}

/// The kind of one event.
pub fn chunk_kind(e: &SseEvent) -> ChunkKind {
    let v = match e {
        SseEvent::Done => return ChunkKind::Done,
        SseEvent::Invalid(_) => return ChunkKind::Invalid,
        SseEvent::Chunk(v) => v,
    };
    if v.get("error").is_some() {
        return ChunkKind::Error;
    }
    let choices = v.get("choices").and_then(Value::as_array);
    match choices.and_then(|c| c.first()) {
        None if v.get("usage").is_some_and(Value::is_object) => ChunkKind::Usage,
        None => ChunkKind::Content,
        Some(c) if c.get("finish_reason").is_some_and(|f| !f.is_null()) => ChunkKind::Finish,
        Some(c) if c.pointer("/delta/role").is_some_and(|r| !r.is_null()) => ChunkKind::Role,
        Some(_) => ChunkKind::Content,
    }
}

/// Kinds in order, runs of content chunks collapsed to one `content+`.
fn structure(events: &[SseEvent]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in events {
        let k = chunk_kind(e);
        let name = if k == ChunkKind::Content { "content+".to_string() } else { k.name().to_string() };
        if name == "content+" && out.last().is_some_and(|l| l == "content+") {
            continue;
        }
        out.push(name);
    }
    out
}

/// Compares two OpenAI SSE bodies: the event structure (role chunk, content chunks, the
/// finish chunk, the usage chunk, `[DONE]` last and once), each sim chunk's JSON shape
/// against the real chunk of the same kind, the `object` value, and one `id` per stream.
pub fn sse_diff(sim_text: &str, real_text: &str, ignored: &[KnownDifference]) -> Vec<Difference> {
    let (sim, real) = (parse_sse(sim_text), parse_sse(real_text));
    let mut out = Vec::new();
    let (ss, rs) = (structure(&sim), structure(&real));
    if ss != rs {
        out.push(diff(
            "sse",
            format!("event sequence differs: sim [{}], real vLLM [{}]", ss.join(", "), rs.join(", ")),
        ));
    }
    for (i, e) in sim.iter().enumerate() {
        if let SseEvent::Invalid(p) = e {
            out.push(diff(format!("sse[{i}]"), format!("sim sent a data line that is not JSON: {p:.60}")));
        }
    }
    let first_of = |events: &[SseEvent], kind: ChunkKind| -> Option<Value> {
        events.iter().find(|e| chunk_kind(e) == kind).and_then(|e| match e {
            SseEvent::Chunk(v) => Some(v.clone()),
            _ => None,
        })
    };
    for e in &sim {
        let SseEvent::Chunk(sv) = e else { continue };
        let kind = chunk_kind(e);
        let Some(rv) = first_of(&real, kind) else { continue };
        let prefix = format!("sse[{}]", kind.name());
        for d in json_shape_diff("$", sv, &rv, ignored) {
            let full = format!("{prefix} {}", d.path);
            if known(&full, ignored).is_none() {
                out.push(diff(full, d.what));
            }
        }
        if let (Some(so), Some(ro)) = (sv.get("object"), rv.get("object")) {
            if so != ro {
                out.push(diff(format!("{prefix} $.object"), format!("sim says {so}, real vLLM says {ro}")));
            }
        }
    }
    let ids = |events: &[SseEvent]| -> BTreeSet<String> {
        events
            .iter()
            .filter_map(|e| match e {
                SseEvent::Chunk(v) => v.get("id").map(Value::to_string),
                _ => None,
            })
            .collect()
    };
    if ids(&sim).len() > 1 && ids(&real).len() <= 1 {
        out.push(diff("sse $.id", format!("sim's chunks carry {} different ids, real vLLM's one", ids(&sim).len())));
    }
    out.sort();
    out.dedup();
    out
}
