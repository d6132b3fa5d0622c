//! Follows one engine's KV cache event stream into its model's [`KvIndex`]: asks the engine
//! where it publishes (`GET /kv_event_sources`), subscribes to that ZMQ PUB socket (the
//! `zeromq` crate: ZMTP in Rust on tokio, so gateways need no libzmq), decodes each batch
//! ([`flotilla_engine::kv_events`]) and applies it. A sequence gap is filled from the
//! engine's replay socket when it has one, and when the replay cannot fill it (or the
//! engine has none) the engine's entries are dropped, since a missed `BlockRemoved` would
//! leave entries that lie. The task ends when `stop` fires or the engine's stream breaks;
//! either way the engine's entries leave the index with it.
//!
//! ```text
//! engine ──PUB [topic, seq, batch]──> follow() ──apply──> KvIndex (per model)
//!        <─ROUTER [start] ── gap? ───┘  replayed batches ─┘
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use flotilla_engine::kv_events::{decode_batch, decode_seq, Sources};
use tokio::sync::watch;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::routing::kv_index::{KvIndex, Sequence};

/// How long a replay may take before the engine's entries are dropped instead.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why following stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    Stopped,
    Broken(String),
}

fn lock(index: &Mutex<KvIndex>) -> std::sync::MutexGuard<'_, KvIndex> {
    index.lock().unwrap_or_else(|p| p.into_inner())
}

/// Follows `engine` (the index's name for it) at `sources` until `stop` turns true.
pub async fn follow(
    engine: String,
    sources: Sources,
    index: Arc<Mutex<KvIndex>>,
    mut stop: watch::Receiver<bool>,
) -> Ended {
    let ended = run(&engine, &sources, &index, &mut stop).await;
    lock(&index).remove_engine(&engine);
    if let Ended::Broken(why) = &ended {
        tracing::warn!(engine = %engine, endpoint = %sources.endpoint, reason = %why, "stopped following KV events");
    }
    ended
}

async fn run(engine: &str, sources: &Sources, index: &Mutex<KvIndex>, stop: &mut watch::Receiver<bool>) -> Ended {
    let mut sub = zeromq::SubSocket::new();
    if let Err(e) = sub.connect(&sources.endpoint).await {
        return Ended::Broken(format!("connect {}: {e}", sources.endpoint));
    }
    if let Err(e) = sub.subscribe(&sources.topic).await {
        return Ended::Broken(format!("subscribe: {e}"));
    }
    tracing::info!(engine, endpoint = %sources.endpoint, "following KV events");
    // What the engine already holds: every batch its replay socket still keeps. A history
    // that starts late only leaves blocks unindexed (their parents unknown), never wrong.
    if let Some(r) = &sources.replay_endpoint {
        let synced = tokio::time::timeout(REPLAY_TIMEOUT, replay(engine, r, 0, None, index)).await.unwrap_or(false);
        if !synced {
            tracing::debug!(engine, "no KV event history replayed; indexing from the live stream on");
        }
    }
    loop {
        let msg = tokio::select! {
            _ = stop.wait_for(|s| *s) => return Ended::Stopped,
            m = sub.recv() => match m {
                Ok(m) => m,
                Err(e) => return Ended::Broken(format!("receive: {e}")),
            },
        };
        let frames = msg.into_vec();
        let (Some(seq), Some(payload)) = (frames.get(1), frames.get(2)) else { continue };
        let (Ok(seq), Ok(batch)) = (decode_seq(seq), decode_batch(payload)) else {
            tracing::debug!(engine, "undecodable KV event batch skipped");
            continue;
        };
        // Missed batches first (they come in order, so each applies as the next), then this one.
        let gap = lock(index).gap(engine, seq);
        if let Some(from) = gap {
            let filled = match &sources.replay_endpoint {
                Some(r) => tokio::time::timeout(REPLAY_TIMEOUT, replay(engine, r, from, Some(seq), index))
                    .await
                    .unwrap_or(false),
                None => false,
            };
            if !filled {
                tracing::warn!(
                    engine,
                    from,
                    to = seq,
                    "KV event gap not replayed: the engine's index entries are dropped"
                );
                lock(index).clear_engine(engine);
            }
        }
        lock(index).apply(engine, seq, &batch);
    }
}

/// Asks the replay socket for batches `from..until` and applies them in order; true when
/// they all came. `until: None` is the first sync: every batch kept, from wherever the
/// engine's history starts.
async fn replay(engine: &str, endpoint: &str, from: i64, until: Option<i64>, index: &Mutex<KvIndex>) -> bool {
    let mut dealer = zeromq::DealerSocket::new();
    if dealer.connect(endpoint).await.is_err() {
        return false;
    }
    let Ok(req) = ZmqMessage::try_from(vec![Bytes::new(), Bytes::copy_from_slice(&from.to_be_bytes())]) else {
        return false;
    };
    if dealer.send(req).await.is_err() {
        return false;
    }
    let mut next = from;
    loop {
        let Ok(m) = dealer.recv().await else { return false };
        let f = m.into_vec();
        let (Some(seq), Some(payload)) = (f.get(2), f.get(3)) else { return false };
        let Ok(seq) = decode_seq(seq) else { return false };
        if seq == -1 {
            return until.is_none_or(|u| next >= u);
        }
        if until.is_some_and(|u| seq >= u) {
            continue;
        }
        if until.is_none() && next == from {
            next = seq; // the first sync starts where the kept history does
        }
        if seq != next {
            return false; // the engine no longer keeps the start of the gap
        }
        let Ok(batch) = decode_batch(payload) else { return false };
        if !matches!(lock(index).apply(engine, seq, &batch), Sequence::InOrder | Sequence::Restarted) {
            return false;
        }
        next += 1;
    }
}
