//! Server-sent events in OpenAI's exact chunk format (as a real vLLM 0.32 writes them):
//! a role chunk first (chat, written with the first token, after prefill, as vLLM does), one
//! chunk per token, the last token's chunk with
//! `finish_reason` (and `system_fingerprint` when no usage chunk follows), an optional
//! `usage` chunk with `choices: []`, then `data: [DONE]`.
//!
//! A token chunk is the hot path (one per generated token, each its own socket write at
//! `--speedup 1`), so it is three copies: the request's pre-serialised `open` template
//! (`data: {"id":..,"choices":[{"index":0,"text":`), the token as a JSON string
//! ([`json_str`], byte for byte what serde_json writes), and a fixed `close`. Chunks are
//! written into one buffer per stream whose allocation is reclaimed once the socket has
//! taken the previous chunk: no per-token allocation. The last chunks (finish reason,
//! usage, `[DONE]`) come once per request and are assembled field by field.
//!
//! ```text
//! data: {"id":"cmpl-..","object":"text_completion","created":..,"model":"m","choices":[{"index":0,"text":  <- open
//! " the"                                                                                            <- json_str
//! ,"logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]}\n\n <- close
//! ```

use std::fmt::Write as _;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Bytes;
use bytes::{BufMut, BytesMut};
use tokio_stream::Stream;

use crate::engine::{Done, Event};
use crate::mailbox;

/// Which endpoint's chunk shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `text_completion` chunks with `text`.
    Completion,
    /// `chat.completion.chunk` with `delta`.
    Chat,
}

/// What follows the text of a token chunk that does not finish its request.
const CLOSE_COMPLETION: &str =
    ",\"logprobs\":null,\"finish_reason\":null,\"stop_reason\":null,\"prompt_token_ids\":null,\"token_ids\":null}]}\n\n";
const CLOSE_CHAT: &str = "},\"logprobs\":null,\"finish_reason\":null,\"token_ids\":null}]}\n\n";

/// The first allocation of a stream's chunk buffer: a role chunk, a token chunk and the
/// final chunks of a typical request fit.
const BUF_START: usize = 2048;

/// Room for the events of one poll (a step sends one per request; the last step two).
const EVENTS_PER_POLL: usize = 4;

/// The SSE body of one streaming request.
pub struct SseStream {
    rx: mailbox::Receiver<Event>,
    kind: Kind,
    /// `data: {"id":...,"choices":[`, shared by every chunk.
    head: String,
    /// `head` and the opening of the choice, up to the token's text.
    open: String,
    /// The rest of a token chunk that does not finish the request.
    close: &'static str,
    include_usage: bool,
    started: bool,
    done: bool,
    /// Chunks being assembled; split off (not copied) for each write.
    buf: BytesMut,
    /// Events received in one poll (reused).
    events: Vec<Event>,
}

impl SseStream {
    /// A stream over the engine's events for request `id`.
    pub fn new(
        rx: mailbox::Receiver<Event>,
        kind: Kind,
        id: &str,
        created: u64,
        model: &str,
        include_usage: bool,
    ) -> Self {
        let (object, choice, close) = match kind {
            Kind::Completion => ("text_completion", r#"{"index":0,"text":"#, CLOSE_COMPLETION),
            Kind::Chat => ("chat.completion.chunk", r#"{"index":0,"delta":{"content":"#, CLOSE_CHAT),
        };
        let mut model_json = BytesMut::new();
        json_str(&mut model_json, model);
        let model = String::from_utf8_lossy(&model_json);
        let head =
            format!(r#"data: {{"id":"{id}","object":"{object}","created":{created},"model":{model},"choices":["#);
        let open = format!("{head}{choice}");
        SseStream {
            rx,
            kind,
            head,
            open,
            close,
            include_usage,
            started: false,
            done: false,
            buf: BytesMut::with_capacity(BUF_START),
            events: Vec::with_capacity(EVENTS_PER_POLL),
        }
    }

    /// The chunk of a token that does not end its request: templates around the text.
    fn token_chunk(&mut self, piece: &str) {
        let out = &mut self.buf;
        out.reserve(self.open.len() + piece.len() + 8 + self.close.len());
        out.put_slice(self.open.as_bytes());
        json_str(out, piece);
        out.put_slice(self.close.as_bytes());
    }

    /// The last token's chunk, with its finish reason and stop reason.
    fn finish_chunk(&mut self, piece: &str, reason: &str, stop: Option<&str>) {
        let (kind, include_usage, out) = (self.kind, self.include_usage, &mut self.buf);
        out.put_slice(self.head.as_bytes());
        match kind {
            Kind::Chat => out.put_slice(br#"{"index":0,"delta":{"content":"#),
            Kind::Completion => out.put_slice(br#"{"index":0,"text":"#),
        }
        json_str(out, piece);
        if kind == Kind::Chat {
            out.put_u8(b'}');
        }
        out.put_slice(br#","logprobs":null,"finish_reason":""#);
        out.put_slice(reason.as_bytes());
        out.put_slice(br#"","stop_reason":"#);
        match stop {
            Some(s) => json_str(out, s),
            None => out.put_slice(b"null"),
        }
        match kind {
            // vLLM sets stop_reason, prompt_token_ids and token_ids on every completion chunk
            Kind::Completion => out.put_slice(br#","prompt_token_ids":null,"token_ids":null}]"#),
            Kind::Chat => out.put_slice(br#","token_ids":null}]"#),
        }
        // the terminal chunk carries the fingerprint unless a usage chunk follows
        if !include_usage {
            out.put_slice(br#","system_fingerprint":""#);
            out.put_slice(super::FINGERPRINT.as_bytes());
            out.put_u8(b'"');
        }
        out.put_slice(b"}\n\n");
    }

    fn final_chunks(&mut self, done: &Done) {
        self.finish_chunk(&done.text, done.reason.as_str(), done.stop_reason.as_deref());
        if self.include_usage {
            let s = &done.summary;
            self.buf.put_slice(self.head.as_bytes());
            let _ = write!(
                self.buf,
                r#"],"usage":{{"prompt_tokens":{},"total_tokens":{},"completion_tokens":{}}},"system_fingerprint":"{}"}}"#,
                s.prompt_tokens,
                s.prompt_tokens + s.output_tokens,
                s.output_tokens,
                super::FINGERPRINT
            );
            self.buf.put_slice(b"\n\n");
        }
        self.buf.put_slice(b"data: [DONE]\n\n");
    }

    /// The chat role chunk, once, in the same write as the first token: vLLM sends it with the
    /// first generated token, after prefill (measured on the CPU vLLM: both at 408 ms cold, 55 ms
    /// warm), so a client timing the first chunk sees the modelled time to first token.
    fn start(&mut self) {
        if self.started {
            return;
        }
        self.started = true;
        if self.kind == Kind::Chat {
            self.buf.put_slice(self.head.as_bytes());
            self.buf.put_slice(br#"{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}"#);
            self.buf.put_slice(b"\n\n");
        }
    }

    fn push_event(&mut self, ev: &Event) {
        match ev {
            Event::Token(piece) => self.token_chunk(piece),
            Event::Done(done) => {
                self.final_chunks(done);
                self.done = true;
            }
        }
    }

    /// What was assembled, as one write; the buffer's allocation is reused once the
    /// written bytes are dropped.
    fn take(&mut self) -> Bytes {
        self.buf.split().freeze()
    }
}

impl Stream for SseStream {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let this = &mut *self;
        // everything already queued (a token and the end, say) goes into one write
        match this.rx.poll_recv_many(cx, &mut this.events) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(0) => {
                // engine gone without a Done: end the stream as vLLM does on abort
                this.done = true;
                this.start();
                this.buf.put_slice(b"data: [DONE]\n\n");
                Poll::Ready(Some(Ok(this.take())))
            }
            Poll::Ready(_) => {
                this.start();
                let mut events = std::mem::take(&mut this.events);
                for ev in &events {
                    if this.done {
                        break;
                    }
                    this.push_event(ev);
                }
                events.clear();
                this.events = events;
                Poll::Ready(Some(Ok(this.take())))
            }
        }
    }
}

/// Writes `s` as a JSON string literal exactly as `serde_json` does: `"` and `\` escaped,
/// `\b \f \n \r \t` short, other control characters as `\u00xx` (lower-case hex), the rest
/// (DEL and all non-ASCII) as is.
pub fn json_str(out: &mut BytesMut, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.put_u8(b'"');
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.put_slice(&bytes[start..i]);
        if short.is_empty() {
            out.put_slice(&[b'\\', b'u', b'0', b'0', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        } else {
            out.put_slice(short);
        }
        start = i + 1;
    }
    out.put_slice(&bytes[start..]);
    out.put_u8(b'"');
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
