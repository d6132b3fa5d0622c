//! The arrival timeline of a streamed completion, as a client reading the bytes as they come
//! sees it: each SSE event classified ([`Chunk`]: role, token, finish, usage, `[DONE]`) with
//! the time its line was complete. Two things are compared between engines: the *shape* —
//! the events in order, what each carries (vLLM 0.32: `role | token×3 | token+finish | usage
//! | done`) — and the *role lead* ([`role_lead`]): when the role chunk arrives, as a share of
//! the time to the first token (1.0: with it; vLLM sends it after prefill). Grouping by time
//! was tried and dropped: the tiny CPU model decodes a token in under a millisecond, as fast
//! as two writes of one step. Classification reads vLLM's compact JSON by substring, so this
//! module needs no JSON parser (the crate's default build stays light).

use std::fmt::Write as _;
use std::time::Duration;

/// What one SSE event carries (an event may carry several: vLLM's last chunk holds the last
/// token and the finish reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Chunk {
    /// `delta.role` (chat's first chunk).
    Role,
    /// Generated text (`delta.content` or `text`, non-empty).
    Token,
    /// A non-null `finish_reason`.
    Finish,
    /// The usage-only chunk (`choices: []`).
    Usage,
    /// `data: [DONE]`.
    Done,
}

impl Chunk {
    fn name(self) -> &'static str {
        match self {
            Chunk::Role => "role",
            Chunk::Token => "token",
            Chunk::Finish => "finish",
            Chunk::Usage => "usage",
            Chunk::Done => "done",
        }
    }
}

/// One classified event and when its line was complete, from the request's send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    pub at: Duration,
    pub chunk: Chunk,
    /// Which SSE event (data line) of the stream carried it, from 0.
    pub event: usize,
}

/// Whether `line` holds `"key":"` followed by at least one character before the closing quote.
fn non_empty_string(line: &str, key: &str) -> bool {
    let pat = format!("\"{key}\":\"");
    line.match_indices(&pat).any(|(i, _)| !line[i + pat.len()..].starts_with('"'))
}

/// The chunks of one `data:` payload, in the order a client would act on them.
pub fn classify(data: &str) -> Vec<Chunk> {
    let data = data.trim();
    if data == "[DONE]" {
        return vec![Chunk::Done];
    }
    let mut out = Vec::new();
    if data.contains("\"choices\":[]") && data.contains("\"usage\":{") {
        out.push(Chunk::Usage);
        return out;
    }
    if data.contains("\"role\":\"assistant\"") {
        out.push(Chunk::Role);
    }
    if non_empty_string(data, "content") || non_empty_string(data, "text") {
        out.push(Chunk::Token);
    }
    if data.contains("\"finish_reason\":\"") {
        out.push(Chunk::Finish);
    }
    out
}

/// Every event of a raw answer's body, each stamped with `at`: feed it the bytes read so
/// far and it returns the complete events not yet returned (a line split across reads waits
/// for its end).
#[derive(Debug, Default)]
pub struct Reader {
    pending: String,
    in_body: bool,
    events: usize,
}

impl Reader {
    pub fn feed(&mut self, bytes: &[u8], at: Duration, out: &mut Vec<Arrival>) {
        self.pending.push_str(&String::from_utf8_lossy(bytes));
        if !self.in_body {
            match self.pending.find("\r\n\r\n") {
                Some(i) => {
                    self.pending.drain(..i + 4);
                    self.in_body = true;
                }
                None => return,
            }
        }
        while let Some(end) = self.pending.find('\n') {
            let line: String = self.pending.drain(..=end).collect();
            if let Some(data) = line.trim_end().strip_prefix("data:") {
                let event = self.events;
                self.events += 1;
                out.extend(classify(data).into_iter().map(|chunk| Arrival { at, chunk, event }));
            }
        }
    }
}

/// The shape of a timeline: its events in order, each written as the chunks it carries
/// joined by `+`, events separated by ` | `, a run of identical events written once with `×n`.
pub fn shape(timeline: &[Arrival]) -> String {
    let mut events: Vec<Vec<Chunk>> = Vec::new();
    let mut last = None;
    for a in timeline {
        match events.last_mut() {
            Some(e) if last == Some(a.event) => e.push(a.chunk),
            _ => events.push(vec![a.chunk]),
        }
        last = Some(a.event);
    }
    let mut out = String::new();
    let mut i = 0;
    while i < events.len() {
        let run = events[i..].iter().take_while(|e| **e == events[i]).count();
        if !out.is_empty() {
            out.push_str(" | ");
        }
        out.push_str(&events[i].iter().map(|c| c.name()).collect::<Vec<_>>().join("+"));
        if run > 1 {
            let _ = write!(out, "×{run}");
        }
        i += run;
    }
    out
}

/// Whether `got` is `expected` with some plain token events merged: real vLLM's output
/// processor folds the deltas of several engine steps into one chunk when it falls behind
/// (a loaded machine turns `token×3` into `token×2`, or drops the run into the last event).
/// Every other event must match in order; each run of plain `token` events in `got` may only
/// be shorter than (or absent where) `expected` has one.
pub fn coalesced_from(expected: &str, got: &str) -> bool {
    /// The shape's events with plain-token runs taken out: the others in order, and the
    /// token count in the gap before each of them (plus one after the last).
    fn split(shape: &str) -> Option<(Vec<&str>, Vec<usize>)> {
        let (mut others, mut gaps, mut run) = (Vec::new(), Vec::new(), 0usize);
        for event in shape.split(" | ").filter(|e| !e.is_empty()) {
            let (name, n) = match event.split_once('×') {
                Some((name, n)) => (name, n.parse().ok()?),
                None => (event, 1),
            };
            if name == "token" {
                run += n;
            } else {
                gaps.push(std::mem::take(&mut run));
                others.extend(std::iter::repeat_n(name, n));
                gaps.extend(std::iter::repeat_n(0, n - 1));
            }
        }
        gaps.push(run);
        Some((others, gaps))
    }
    match (split(expected), split(got)) {
        (Some((want, want_gaps)), Some((have, have_gaps))) => {
            want == have && want_gaps.iter().zip(&have_gaps).all(|(w, h)| h <= w)
        }
        _ => false,
    }
}

/// When the role chunk arrived as a share of the time to the first token (None without
/// either): about 1 when it comes with the first token, near 0 when it is sent on arrival,
/// ahead of prefill.
pub fn role_lead(timeline: &[Arrival]) -> Option<f64> {
    let (role, token) = (first(timeline, Chunk::Role)?, first(timeline, Chunk::Token)?);
    Some(role.as_secs_f64() / token.as_secs_f64().max(1e-9))
}

/// Sends `body` to `path` on one new connection and records the stream's events until the
/// server closes it (at most 60 s between reads).
pub async fn record(addr: &str, path: &str, body: &str) -> Vec<Arrival> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut out = Vec::new();
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return out };
    let _ = s.set_nodelay(true);
    if s.write_all(crate::raw_http::request_text(addr, "POST", path, body).as_bytes()).await.is_err() {
        return out;
    }
    let t0 = tokio::time::Instant::now();
    let mut reader = Reader::default();
    let mut buf = vec![0u8; 1 << 16];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(60), s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        reader.feed(&buf[..n], t0.elapsed(), &mut out);
    }
    out
}

/// When the first event of `kind` arrived.
pub fn first(timeline: &[Arrival], kind: Chunk) -> Option<Duration> {
    timeline.iter().find(|a| a.chunk == kind).map(|a| a.at)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLE: &str =
        r#"{"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
    const TOKEN: &str = r#"{"id":"c","choices":[{"index":0,"delta":{"content":" header"},"finish_reason":null}]}"#;
    const LAST: &str = r#"{"id":"c","choices":[{"index":0,"delta":{"content":" when"},"finish_reason":"length"}]}"#;
    const USAGE: &str = r#"{"id":"c","choices":[],"usage":{"prompt_tokens":13}}"#;
    const TEXT: &str = r#"{"id":"c","choices":[{"index":0,"text":" x","finish_reason":null}]}"#;

    #[test]
    fn events_are_classified_like_a_client_reads_them() {
        let table: &[(&str, &[Chunk])] = &[
            (ROLE, &[Chunk::Role]),
            (TOKEN, &[Chunk::Token]),
            (LAST, &[Chunk::Token, Chunk::Finish]),
            (USAGE, &[Chunk::Usage]),
            (" [DONE]", &[Chunk::Done]),
            (TEXT, &[Chunk::Token]),
            (r#"{"choices":[{"text":"","finish_reason":"stop"}]}"#, &[Chunk::Finish]),
        ];
        for (data, want) in table {
            assert_eq!(classify(data), *want, "{data}");
        }
    }

    #[test]
    fn lines_split_across_reads_wait_for_their_end() {
        let ms = Duration::from_millis;
        let mut r = Reader::default();
        let mut out = Vec::new();
        r.feed(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n", ms(1), &mut out);
        r.feed(format!("data: {ROLE}\n\ndata: {}", &TOKEN[..10]).as_bytes(), ms(50), &mut out);
        r.feed(format!("{}\n\n", &TOKEN[10..]).as_bytes(), ms(51), &mut out);
        r.feed(format!("data: {LAST}\n\ndata: {USAGE}\n\ndata: [DONE]\n\n").as_bytes(), ms(90), &mut out);
        let kinds: Vec<(u64, Chunk, usize)> = out.iter().map(|a| (a.at.as_millis() as u64, a.chunk, a.event)).collect();
        assert_eq!(
            kinds,
            [
                (50, Chunk::Role, 0),
                (51, Chunk::Token, 1),
                (90, Chunk::Token, 2),
                (90, Chunk::Finish, 2),
                (90, Chunk::Usage, 3),
                (90, Chunk::Done, 4)
            ]
        );
        assert_eq!(shape(&out), "role | token | token+finish | usage | done");
        assert!((role_lead(&out).unwrap() - 50.0 / 51.0).abs() < 1e-9);
    }

    #[test]
    fn merged_token_deltas_still_match_but_other_differences_do_not() {
        let want = "role | token×3 | token+finish | usage | done";
        assert!(coalesced_from(want, want));
        assert!(coalesced_from(want, "role | token×2 | token+finish | usage | done"));
        assert!(coalesced_from(want, "role | token+finish | usage | done"));
        // more tokens than expected, a lost event, or a reordering is a real difference
        assert!(!coalesced_from(want, "role | token×4 | token+finish | usage | done"));
        assert!(!coalesced_from(want, "role | token×3 | token+finish | done"));
        assert!(!coalesced_from(want, "token×3 | role | token+finish | usage | done"));
        assert!(!coalesced_from(want, "role | token×3 | token | finish | usage | done"));
        assert!(!coalesced_from("role | token×3 | token+finish", "role | token | token+finish | token"));
        assert!(!coalesced_from(want, "role | token×x | token+finish | usage | done"));
    }

    #[test]
    fn shapes_follow_the_events_and_the_role_lead_its_timing() {
        let at = |ms: u64, chunk, event| Arrival { at: Duration::from_millis(ms), chunk, event };
        use Chunk::*;
        let t = [
            at(50, Role, 0),
            at(50, Token, 1),
            at(51, Token, 2),
            at(52, Token, 3),
            at(53, Token, 4),
            at(53, Finish, 4),
            at(53, Usage, 5),
            at(53, Done, 6),
        ];
        assert_eq!(shape(&t), "role | token×3 | token+finish | usage | done");
        assert_eq!(role_lead(&t), Some(1.0));
        // a role chunk sent on arrival, before a long prefill
        let early = [at(1, Role, 0), at(60, Token, 1), at(72, Token, 2), at(72, Done, 3)];
        assert!(role_lead(&early).unwrap() < 0.05);
        assert_eq!(first(&early, Done), Some(Duration::from_millis(72)));
        assert_eq!(role_lead(&[at(5, Token, 0)]), None);
        assert_eq!(shape(&[]), "");
    }
}
