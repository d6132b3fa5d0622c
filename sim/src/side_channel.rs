//! The P/D side channel: where a decode sim pulls a finished prefill's KV from the prefill
//! sim (vLLM's NIXL handshake plus RDMA read, reduced to one request and one answer).
//! Plain TCP, as vLLM's NIXL side channel (ZMQ) is plain, even when the API serves TLS.
//!
//! ```text
//! frame  = length (u32, big-endian) | JSON (UTF-8), one request then one answer per connection
//! ask    = {"engine_id": "...", "request_id": "...", "block_ids": [3, 4]}
//! answer = {"ok": true, "num_tokens": 20, "token_ids": [...]}
//!        | {"ok": false, "code": "unknown_request" | "lease_expired" | "already_pulled"
//!                              | "engine_id_mismatch" | "block_ids_mismatch" | "bad_request"
//!                              | "frame_too_large" | "engine_stopped", "message": "..."}
//! ```
//!
//! Every read is bounded: an ask over [`MAX_ASK_BYTES`] is answered `frame_too_large`
//! without reading it, each read must come within [`IO_TIMEOUT`], at most
//! [`MAX_CONNECTIONS`] are served at once (the rest wait in the kernel's backlog).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::engine::Command;

/// Largest ask accepted.
pub const MAX_ASK_BYTES: u32 = 64 * 1024;
/// Largest answer a client reads (token ids of the longest context, with room).
pub const MAX_ANSWER_BYTES: u32 = 16 * 1024 * 1024;
/// Time allowed for each read and write, and for the engine's answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

/// A pull request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ask {
    /// The engine the asker believes it talks to (`remote_engine_id`).
    pub engine_id: String,
    /// `remote_request_id`.
    pub request_id: String,
    /// `remote_block_ids`, flattened.
    pub block_ids: Vec<u32>,
}

/// The wire answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// Whether the KV was handed over.
    pub ok: bool,
    /// Tokens handed over (ok).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_tokens: Option<u32>,
    /// Their token ids (ok).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    /// Why not (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// A sentence saying why (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Why the engine will not hand over KV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// A stable code (see the module doc).
    pub code: &'static str,
    /// One sentence naming the offending value.
    pub message: String,
}

impl Answer {
    fn refused(code: &str, message: impl Into<String>) -> Self {
        Answer { ok: false, num_tokens: None, token_ids: None, code: Some(code.into()), message: Some(message.into()) }
    }

    fn from_engine(r: Result<Vec<u32>, Refusal>) -> Self {
        match r {
            Ok(tokens) => Answer {
                ok: true,
                num_tokens: Some(tokens.len() as u32),
                token_ids: Some(tokens),
                code: None,
                message: None,
            },
            Err(r) => Answer::refused(r.code, r.message),
        }
    }
}

/// Serves pulls on `listener` until the task is aborted; asks go to the engine.
pub async fn serve(listener: TcpListener, engine: mpsc::UnboundedSender<Command>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let (sock, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "side channel accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let engine = engine.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = answer_one(sock, &engine).await {
                tracing::debug!(peer = %peer, error = %e, "side channel connection ended");
            }
        });
    }
}

async fn answer_one(mut sock: TcpStream, engine: &mpsc::UnboundedSender<Command>) -> std::io::Result<()> {
    let answer = match read_frame(&mut sock, MAX_ASK_BYTES).await {
        Err(FrameError::TooLarge(n)) => {
            Answer::refused("frame_too_large", format!("an ask of {n} bytes exceeds the {MAX_ASK_BYTES}-byte limit"))
        }
        Err(FrameError::Io(e)) => return Err(e),
        Ok(body) => match serde_json::from_slice::<Ask>(&body) {
            Err(e) => Answer::refused("bad_request", format!("not a pull request: {e}")),
            Ok(ask) => {
                let (tx, rx) = oneshot::channel();
                let stopped = || Answer::refused("engine_stopped", "the engine is shutting down");
                if engine.send(Command::Pull { ask, reply: tx }).is_err() {
                    stopped()
                } else {
                    match tokio::time::timeout(IO_TIMEOUT, rx).await {
                        Ok(Ok(r)) => Answer::from_engine(r),
                        _ => stopped(),
                    }
                }
            }
        },
    };
    let body = serde_json::to_vec(&answer).map_err(std::io::Error::other)?;
    write_frame(&mut sock, &body).await?;
    let _ = sock.shutdown().await;
    Ok(())
}

/// Why a frame could not be read.
#[derive(Debug)]
pub enum FrameError {
    /// The announced length is over the limit (nothing more was read).
    TooLarge(u32),
    /// The socket failed, closed early or timed out.
    Io(std::io::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge(n) => write!(f, "a frame of {n} bytes is over the limit"),
            FrameError::Io(e) => write!(f, "{e}"),
        }
    }
}

async fn timed<T>(f: impl std::future::Future<Output = std::io::Result<T>>) -> Result<T, FrameError> {
    match tokio::time::timeout(IO_TIMEOUT, f).await {
        Ok(r) => r.map_err(FrameError::Io),
        Err(_) => Err(FrameError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "side channel read timed out"))),
    }
}

/// Reads one length-prefixed frame of at most `max` bytes.
pub async fn read_frame(sock: &mut TcpStream, max: u32) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    timed(sock.read_exact(&mut len)).await?;
    let n = u32::from_be_bytes(len);
    if n > max {
        return Err(FrameError::TooLarge(n));
    }
    let mut body = vec![0u8; n as usize];
    timed(sock.read_exact(&mut body)).await?;
    Ok(body)
}

/// Writes one length-prefixed frame.
pub async fn write_frame(sock: &mut TcpStream, body: &[u8]) -> std::io::Result<()> {
    let n = u32::try_from(body.len()).map_err(std::io::Error::other)?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&n.to_be_bytes());
    frame.extend_from_slice(body);
    match tokio::time::timeout(IO_TIMEOUT, sock.write_all(&frame)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "side channel write timed out")),
    }
}

/// Why a pull failed, from the decode side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullError {
    /// The prefill engine could not be reached or broke off.
    Unreachable(String),
    /// It answered no.
    Refused {
        /// Its code.
        code: String,
        /// Its message.
        message: String,
    },
}

impl std::fmt::Display for PullError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PullError::Unreachable(e) => write!(f, "the prefill engine's side channel is unreachable: {e}"),
            PullError::Refused { code, message } => {
                write!(f, "the prefill engine refused the pull ({code}): {message}")
            }
        }
    }
}

/// Pulls `ask` from the side channel at `host:port`; the token ids handed over.
pub async fn pull(host: &str, port: u16, ask: &Ask) -> Result<Vec<u32>, PullError> {
    let addr = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let un = |e: &dyn std::fmt::Display| PullError::Unreachable(format!("{addr}: {e}"));
    let mut sock = match tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(&addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(un(&e)),
        Err(_) => return Err(un(&"connect timed out")),
    };
    let body = serde_json::to_vec(ask).map_err(|e| un(&e))?;
    write_frame(&mut sock, &body).await.map_err(|e| un(&e))?;
    let answer = read_frame(&mut sock, MAX_ANSWER_BYTES).await.map_err(|e| un(&e))?;
    let answer: Answer = serde_json::from_slice(&answer).map_err(|e| un(&e))?;
    match (answer.ok, answer.token_ids) {
        (true, Some(tokens)) => Ok(tokens),
        _ => Err(PullError::Refused {
            code: answer.code.unwrap_or_else(|| "unknown".into()),
            message: answer.message.unwrap_or_default(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A side channel whose engine answers every ask with `tokens`.
    async fn server(tokens: Vec<u32>) -> (u16, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(cmd) = rx.recv().await {
                if let Command::Pull { ask, reply } = cmd {
                    let r = if ask.request_id == "known" {
                        Ok(tokens.clone())
                    } else {
                        Err(Refusal { code: "unknown_request", message: ask.request_id })
                    };
                    let _ = reply.send(r);
                }
            }
        });
        (port, tokio::spawn(serve(l, tx)))
    }

    fn ask(id: &str) -> Ask {
        Ask { engine_id: "e".into(), request_id: id.into(), block_ids: vec![1] }
    }

    #[tokio::test]
    async fn pulls_and_refusals_round_trip() {
        let (port, _s) = server(vec![7, 8, 9]).await;
        assert_eq!(pull("127.0.0.1", port, &ask("known")).await, Ok(vec![7, 8, 9]));
        assert_eq!(
            pull("127.0.0.1", port, &ask("other")).await,
            Err(PullError::Refused { code: "unknown_request".into(), message: "other".into() })
        );
        let free = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
        assert!(matches!(pull("127.0.0.1", free, &ask("known")).await, Err(PullError::Unreachable(_))));
    }

    async fn raw(port: u16, bytes: &[u8]) -> Option<Answer> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let _ = s.shutdown().await;
        let body = read_frame(&mut s, MAX_ANSWER_BYTES).await.ok()?;
        Some(serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn garbage_gets_an_error_answer_or_a_closed_connection_and_the_server_lives() {
        let (port, server) = server(vec![1]).await;
        // an HTTP request: its first four bytes announce a 1.2 GB frame, never allocated
        let a = raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        assert_eq!(a.code.as_deref(), Some("frame_too_large"), "{a:?}");
        // a well-framed body that is not an ask
        let mut f = 5u32.to_be_bytes().to_vec();
        f.extend_from_slice(b"\xff\x00{]x");
        assert_eq!(raw(port, &f).await.unwrap().code.as_deref(), Some("bad_request"));
        let mut f = 2u32.to_be_bytes().to_vec();
        f.extend_from_slice(b"{}");
        assert_eq!(raw(port, &f).await.unwrap().code.as_deref(), Some("bad_request"));
        // a short frame, then the peer closes: the connection is dropped without an answer
        let mut f = 100u32.to_be_bytes().to_vec();
        f.extend_from_slice(b"{\"engine");
        assert_eq!(raw(port, &f).await, None);
        assert_eq!(raw(port, b"\x00\x01").await, None);
        // still serving
        assert_eq!(pull("127.0.0.1", port, &ask("known")).await, Ok(vec![1]));
        assert!(!server.is_finished());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_dropped_after_the_read_timeout() {
        let (port, _s) = server(vec![1]).await;
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(&10u32.to_be_bytes()).await.unwrap();
        let mut buf = [0u8; 1];
        // the paused clock jumps past IO_TIMEOUT once every task waits
        let n = tokio::time::timeout(IO_TIMEOUT * 3, s.read(&mut buf)).await.expect("closed before our own timeout");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }
}
