//! The gang's rendezvous over TCP, standing in for vLLM's torch.distributed / ZMQ start-up:
//! the head (rank 0) accepts its workers on `--master-addr:--master-port` (or the
//! data-parallel address and RPC port), each worker connects (retrying with backoff),
//! says which ranks it holds, and stays connected. The head serves once every rank has
//! joined; a rank that leaves after that loses the gang.
//!
//! ```text
//! worker -> head:  flotilla-sim-gang v1 kind=nodes first=R count=C world=W\n
//! head -> worker:  ok\n                     (then the socket stays open, silent)
//!                  error REASON\n           (then the head closes it)
//! ```
//!
//! State on the head ([`GangState`]): Forming (some ranks missing) -> Formed -> Lost. A
//! worker that leaves before the gang formed frees its ranks; after, the gang is Lost for
//! good (vLLM cannot lose a rank). A worker ends when its socket to the head closes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::error::SimError;
use crate::parallel::GangKind;

/// The hello line's first words.
const MAGIC: &str = "flotilla-sim-gang v1";
/// Longest hello line accepted (bytes).
const MAX_LINE: u64 = 256;
/// How long the head waits for a connection's hello, and a worker for a connection or the
/// head's answer.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// First and longest wait between a worker's connection attempts.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(1));

/// The gang as the head sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GangState {
    /// Not every rank has joined; `missing` lists those that have not.
    Forming {
        /// Ranks not yet held by the head or a connected worker.
        missing: Vec<u32>,
    },
    /// Every rank is connected: the head serves.
    Formed,
    /// A worker's connection dropped after the gang formed: the head is failing.
    Lost {
        /// First rank of the worker that left.
        rank: u32,
    },
}

impl GangState {
    /// Why the head cannot serve, for 503 bodies; None when formed.
    pub fn unavailable(&self) -> Option<String> {
        match self {
            GangState::Formed => None,
            GangState::Forming { missing } => Some(format!(
                "the engine is starting: waiting for ranks {} of the gang to connect",
                missing.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
            )),
            GangState::Lost { rank } => {
                Some(format!("the engine is dead: rank {rank} of the gang disconnected; shutting down"))
            }
        }
    }
}

/// What the head expects.
#[derive(Debug, Clone, Copy)]
pub struct HeadSpec {
    /// What ranks count.
    pub kind: GangKind,
    /// Ranks in the gang.
    pub world: u32,
    /// Ranks the head holds itself (`0..own`).
    pub own: u32,
}

struct Members {
    spec: HeadSpec,
    /// first rank -> (count, connection id)
    joined: BTreeMap<u32, (u32, u64)>,
    next_conn: u64,
}

impl Members {
    fn missing(&self) -> Vec<u32> {
        (self.spec.own..self.spec.world)
            .filter(|r| !self.joined.iter().any(|(f, (c, _))| (*f..f + c).contains(r)))
            .collect()
    }

    /// Checks a hello line; the ranks it claims, or why it is refused.
    fn admit(&mut self, line: &str) -> Result<(u32, u64), String> {
        let rest = line.trim_end().strip_prefix(MAGIC).ok_or_else(|| format!("not a gang hello: {line:.60?}"))?;
        let mut kind = None;
        let (mut first, mut count, mut world) = (None, None, None);
        for word in rest.split_whitespace() {
            let (k, v) = word.split_once('=').ok_or_else(|| format!("malformed field {word:.40?}"))?;
            let num = || v.parse::<u32>().map_err(|_| format!("{k} is not a number: {v:.20?}"));
            match k {
                "kind" => kind = Some(v.to_owned()),
                "first" => first = Some(num()?),
                "count" => count = Some(num()?),
                "world" => world = Some(num()?),
                _ => return Err(format!("unknown field {k:.20?}")),
            }
        }
        let (Some(kind), Some(first), Some(count), Some(world)) = (kind, first, count, world) else {
            return Err("hello lacks kind, first, count or world".into());
        };
        let spec = self.spec;
        if kind != spec.kind.as_str() {
            return Err(format!("kind {kind} does not match the head's {}", spec.kind.as_str()));
        }
        if world != spec.world {
            return Err(format!("world {world} does not match the head's {}", spec.world));
        }
        if count == 0 || first < spec.own || first.saturating_add(count) > spec.world {
            return Err(format!(
                "ranks {first}..{} out of range: workers hold ranks {}..{}",
                first.saturating_add(count),
                spec.own,
                spec.world
            ));
        }
        if let Some((f, _)) = self.joined.iter().find(|(f, (c, _))| first < **f + *c && **f < first + count) {
            return Err(format!("duplicate rank: ranks from {f} are already connected"));
        }
        self.next_conn += 1;
        self.joined.insert(first, (count, self.next_conn));
        Ok((first, self.next_conn))
    }
}

/// Accepts workers on `listener` until dropped (aborting this future closes every worker's
/// socket), publishing the gang's state on `state`.
pub async fn serve_head(listener: TcpListener, spec: HeadSpec, state: watch::Sender<GangState>) {
    let members = Arc::new(Mutex::new(Members { spec, joined: BTreeMap::new(), next_conn: 0 }));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((sock, peer)) => {
                    let _ = sock.set_nodelay(true);
                    conns.spawn(serve_worker(sock, peer, members.clone(), state.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "gang rendezvous accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_worker(
    sock: TcpStream,
    peer: std::net::SocketAddr,
    members: Arc<Mutex<Members>>,
    state: watch::Sender<GangState>,
) {
    let (rd, mut wr) = sock.into_split();
    let mut rd = BufReader::new(rd.take(MAX_LINE));
    let mut line = String::new();
    let got = tokio::time::timeout(HELLO_TIMEOUT, rd.read_line(&mut line)).await;
    let admitted = match got {
        Ok(Ok(_)) if line.ends_with('\n') => {
            let mut m = members.lock().unwrap_or_else(|p| p.into_inner());
            let r = m.admit(&line);
            if r.is_ok() {
                let missing = m.missing();
                state.send_if_modified(|s| {
                    if matches!(s, GangState::Lost { .. }) {
                        return false;
                    }
                    *s = if missing.is_empty() { GangState::Formed } else { GangState::Forming { missing } };
                    true
                });
            }
            r
        }
        Ok(Ok(_)) => Err("no complete hello line (too long, or closed early)".into()),
        Ok(Err(e)) => Err(format!("reading the hello failed: {e}")),
        Err(_) => Err(format!("no hello within {HELLO_TIMEOUT:?}")),
    };
    let (first, conn) = match admitted {
        Ok(a) => a,
        Err(reason) => {
            tracing::warn!(peer = %peer, reason = %reason, "gang rendezvous refused a connection");
            let _ = wr.write_all(format!("error {reason}\n").as_bytes()).await;
            let _ = wr.shutdown().await;
            return;
        }
    };
    if wr.write_all(b"ok\n").await.is_err() {
        tracing::warn!(peer = %peer, rank = first, "gang worker left before its answer");
    } else {
        tracing::info!(peer = %peer, rank = first, state = ?*state.borrow(), "gang worker joined");
        // Workers send nothing more; EOF or an error is the worker gone.
        let mut rd = rd.into_inner().into_inner();
        let mut buf = [0u8; 64];
        while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {}
    }
    let mut m = members.lock().unwrap_or_else(|p| p.into_inner());
    if m.joined.get(&first).is_some_and(|(_, c)| *c == conn) {
        m.joined.remove(&first);
    }
    let missing = m.missing();
    drop(m);
    state.send_if_modified(|s| match s {
        GangState::Formed => {
            tracing::error!(peer = %peer, rank = first, "gang worker disconnected after the gang formed; the head fails");
            *s = GangState::Lost { rank: first };
            true
        }
        GangState::Forming { .. } => {
            tracing::warn!(peer = %peer, rank = first, "gang worker left before the gang formed");
            *s = GangState::Forming { missing };
            true
        }
        GangState::Lost { .. } => false,
    });
}

/// What a worker says it holds.
#[derive(Debug, Clone, Copy)]
pub struct WorkerSpec {
    /// What ranks count.
    pub kind: GangKind,
    /// First rank held.
    pub first: u32,
    /// Ranks held.
    pub count: u32,
    /// Ranks in the gang.
    pub world: u32,
}

/// Connects to the head at `head`, retrying with backoff until `deadline`, and says
/// `spec`; the connected socket once the head answered `ok`.
pub async fn join(head: &str, spec: WorkerSpec, deadline: Instant) -> Result<TcpStream, SimError> {
    let mut wait = BACKOFF.0;
    loop {
        let last = match try_join(head, spec).await {
            Ok(Ok(sock)) => return Ok(sock),
            Ok(Err(refused)) => {
                return Err(SimError::Gang(format!("the head at {head} refused rank {}: {refused}", spec.first)))
            }
            Err(e) => e,
        };
        if Instant::now() + wait > deadline {
            return Err(SimError::Gang(format!("could not join the head at {head} in time; last error: {last}")));
        }
        tracing::debug!(head, error = %last, retry_in = ?wait, "gang head not reachable yet");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(BACKOFF.1);
    }
}

/// Outer error: retry (not reachable, no answer); inner error: the head refused us.
async fn try_join(head: &str, spec: WorkerSpec) -> Result<Result<TcpStream, String>, String> {
    let mut sock = tokio::time::timeout(HELLO_TIMEOUT, TcpStream::connect(head))
        .await
        .map_err(|_| "connecting timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let _ = sock.set_nodelay(true);
    let hello =
        format!("{MAGIC} kind={} first={} count={} world={}\n", spec.kind.as_str(), spec.first, spec.count, spec.world);
    sock.write_all(hello.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    let read = async {
        let mut byte = [0u8; 1];
        while answer.len() < MAX_LINE as usize {
            match sock.read(&mut byte).await {
                Ok(1) if byte[0] == b'\n' => return Ok(()),
                Ok(1) => answer.push(byte[0]),
                Ok(_) => return Err("the head closed the connection without an answer".to_owned()),
                Err(e) => return Err(e.to_string()),
            }
        }
        Err("the head's answer is too long".to_owned())
    };
    tokio::time::timeout(HELLO_TIMEOUT, read).await.map_err(|_| "no answer from the head".to_owned())??;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    if answer == "ok" {
        return Ok(Ok(sock));
    }
    match answer.strip_prefix("error ") {
        Some(reason) => Ok(Err(reason.to_owned())),
        None => Err(format!("unexpected answer {answer:.60?}")),
    }
}

/// Holds a joined worker's socket until the head closes it (or it fails): the error to exit with.
pub async fn hold(mut sock: TcpStream, head: &str) -> SimError {
    let mut buf = [0u8; 64];
    loop {
        match sock.read(&mut buf).await {
            Ok(0) => return SimError::Gang(format!("lost the connection to the head at {head}")),
            Ok(_) => {}
            Err(e) => return SimError::Gang(format!("lost the connection to the head at {head}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(own: u32, world: u32) -> Members {
        Members { spec: HeadSpec { kind: GangKind::Nodes, world, own }, joined: BTreeMap::new(), next_conn: 0 }
    }

    #[test]
    fn hello_lines_are_checked() {
        let mut m = members(1, 3);
        assert_eq!(m.missing(), vec![1, 2]);
        assert!(m.admit("flotilla-sim-gang v1 kind=nodes first=1 count=1 world=3\n").is_ok());
        assert_eq!(m.missing(), vec![2]);
        let dup = m.admit("flotilla-sim-gang v1 kind=nodes first=1 count=1 world=3\n").unwrap_err();
        assert!(dup.contains("duplicate"), "{dup}");
        for (line, why) in [
            ("GET / HTTP/1.1\r\n", "not a gang hello"),
            ("flotilla-sim-gang v1 kind=nodes first=3 count=1 world=3", "out of range"),
            ("flotilla-sim-gang v1 kind=nodes first=0 count=1 world=3", "out of range"),
            ("flotilla-sim-gang v1 kind=nodes first=2 count=0 world=3", "out of range"),
            ("flotilla-sim-gang v1 kind=nodes first=2 count=1 world=4", "world 4"),
            ("flotilla-sim-gang v1 kind=dp first=2 count=1 world=3", "kind dp"),
            ("flotilla-sim-gang v1 kind=nodes first=x count=1 world=3", "not a number"),
            ("flotilla-sim-gang v1 kind=nodes first=2 world=3", "lacks"),
            ("flotilla-sim-gang v1 kind=nodes first=2 count=1 world=3 x=1", "unknown field"),
            ("flotilla-sim-gang v1 junk", "malformed"),
        ] {
            let e = m.admit(line).unwrap_err();
            assert!(e.contains(why), "{line}: {e}");
        }
        assert!(m.admit("flotilla-sim-gang v1 kind=nodes first=2 count=1 world=3").is_ok());
        assert!(m.missing().is_empty());
    }

    #[test]
    fn data_parallel_ranges_must_not_overlap() {
        let mut m = Members { spec: HeadSpec { kind: GangKind::DataParallel, world: 6, own: 2 }, ..members(0, 0) };
        assert!(m.admit("flotilla-sim-gang v1 kind=dp first=2 count=2 world=6").is_ok());
        assert!(m.admit("flotilla-sim-gang v1 kind=dp first=3 count=2 world=6").unwrap_err().contains("duplicate"));
        assert!(m.admit("flotilla-sim-gang v1 kind=dp first=5 count=2 world=6").unwrap_err().contains("out of range"));
        assert_eq!(m.missing(), vec![4, 5]);
        assert!(m.admit("flotilla-sim-gang v1 kind=dp first=4 count=2 world=6").is_ok());
        assert!(m.missing().is_empty());
        assert!(GangState::Forming { missing: vec![4, 5] }.unavailable().unwrap().contains("4, 5"));
        assert!(GangState::Formed.unavailable().is_none());
    }
}
