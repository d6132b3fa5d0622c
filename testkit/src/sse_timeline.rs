//! The arrival timeline of a streamed completion, as a client reading the bytes as they come
//! sees it: each SSE event classified ([`Chunk`]: role, token, finish, usage, `[DONE]`) with
//! the time its line was complete, and its *shape* — the events grouped by the decode step
//! they came with — which is what the sim is held to against the real vLLM (vLLM 0.32:
//! `role+token | token | … | token+finish+usage+done`). Classification reads vLLM's compact
//! JSON by substring, so this module needs no JSON parser (the crate's default build stays
//! light).

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
                out.extend(classify(data).into_iter().map(|chunk| Arrival { at, chunk }));
            }
        }
    }
}

/// The shape of a timeline: its events split into one burst per generated token — at the
/// stream's (tokens − 1) largest gaps, so each event goes with the decode step it came in,
/// however long a step took on that machine — bursts separated by ` | `, events in a burst
/// by `+`; a run of identical bursts is written once with `×n`. A role chunk sent ahead of
/// prefill makes the prefill gap one of the largest and shows as `role | token×2 | token+token…`.
pub fn shape(timeline: &[Arrival]) -> String {
    let tokens = timeline.iter().filter(|a| a.chunk == Chunk::Token).count();
    let mut gaps: Vec<(Duration, usize)> =
        timeline.windows(2).enumerate().map(|(i, w)| (w[1].at.saturating_sub(w[0].at), i + 1)).collect();
    // largest first; among equal gaps the earlier one
    gaps.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut splits: Vec<usize> = gaps.iter().take(tokens.saturating_sub(1)).map(|g| g.1).collect();
    splits.sort_unstable();
    let mut bursts: Vec<Vec<Chunk>> = Vec::new();
    for (i, a) in timeline.iter().enumerate() {
        match bursts.last_mut() {
            Some(b) if splits.binary_search(&i).is_err() => b.push(a.chunk),
            _ => bursts.push(vec![a.chunk]),
        }
    }
    let mut out = String::new();
    let mut i = 0;
    while i < bursts.len() {
        let run = bursts[i..].iter().take_while(|b| **b == bursts[i]).count();
        if !out.is_empty() {
            out.push_str(" | ");
        }
        out.push_str(&bursts[i].iter().map(|c| c.name()).collect::<Vec<_>>().join("+"));
        if run > 1 {
            let _ = write!(out, "×{run}");
        }
        i += run;
    }
    out
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
        let kinds: Vec<(u64, Chunk)> = out.iter().map(|a| (a.at.as_millis() as u64, a.chunk)).collect();
        assert_eq!(
            kinds,
            [
                (50, Chunk::Role),
                (51, Chunk::Token),
                (90, Chunk::Token),
                (90, Chunk::Finish),
                (90, Chunk::Usage),
                (90, Chunk::Done)
            ]
        );
        assert_eq!(shape(&out), "role+token | token+finish+usage+done");
    }

    #[test]
    fn bursts_follow_the_decode_steps_whatever_their_length() {
        let at = |ms: u64, chunk| Arrival { at: Duration::from_millis(ms), chunk };
        use Chunk::*;
        // vLLM's order on a fast and on a slow machine: the same shape
        for step in [3, 100] {
            let t = [
                at(50, Role),
                at(50, Token),
                at(50 + step, Token),
                at(50 + 2 * step, Token),
                at(50 + 3 * step, Token),
                at(50 + 3 * step, Finish),
                at(51 + 3 * step, Usage),
                at(51 + 3 * step, Done),
            ];
            assert_eq!(shape(&t), "role+token | token×2 | token+finish+usage+done", "step {step} ms");
        }
        // a role chunk sent on arrival, before a long prefill
        let early = [at(1, Role), at(60, Token), at(72, Token), at(84, Token), at(96, Token), at(96, Done)];
        assert_eq!(shape(&early), "role | token×2 | token+token+done");
        let t = [at(10, Token), at(20, Token), at(30, Token), at(40, Token), at(40, Done)];
        assert_eq!(shape(&t), "token×3 | token+done");
        assert_eq!(first(&t, Done), Some(Duration::from_millis(40)));
        assert_eq!(first(&t, Role), None);
        assert_eq!(shape(&[]), "");
    }
}
