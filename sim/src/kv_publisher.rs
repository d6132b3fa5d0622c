//! The sim's KV cache event publisher, as vLLM's `ZmqEventPublisher` runs it
//! (`--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq", ...}'`): each
//! engine step's events ([`crate::kv`]) go out on a ZMQ PUB socket as three frames — the
//! topic, the batch's sequence number (8 bytes, big endian, from 0) and the msgpack batch
//! ([`flotilla_engine::kv_events::encode_batch`], vLLM 0.32's encoding) — and the last
//! `buffer_steps` batches are kept for the ROUTER replay socket: a request `[id, "", START]`
//! (START: 8-byte big-endian sequence number) is answered with every kept batch from START
//! on, `[id, "", topic, seq, payload]` each, then `[id, "", "", -1, ""]`.
//!
//! Endpoints as vLLM treats them: one with `*` (or `::`, `ipc://`) is bound, `*` meaning
//! the sim's `--host`, port 0 a free port; any other PUB endpoint is connected to (the
//! subscriber binds). The replay endpoint is always bound. `GET /kv_event_sources` answers
//! the bound endpoints (`{"0": {"endpoint": ..., "replay_endpoint": ..., "topic": ...}}`).
//! A batch the publisher cannot keep up with is dropped and counted, never blocking the
//! engine.

use std::collections::VecDeque;

use bytes::Bytes;
use flotilla_engine::kv_events::{encode_batch, EventBatch, KvEvent};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::error::SimError;

/// Batches waiting for the publisher task before new ones are dropped.
const QUEUE: usize = 4096;

/// `--kv-events-config`, vLLM's `KVEventsConfig` fields.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KvEventsConfig {
    #[serde(default)]
    pub enable_kv_cache_events: bool,
    #[serde(default = "default_publisher")]
    pub publisher: String,
    #[serde(default = "default_endpoint")]
    pub endpoint: String,
    #[serde(default)]
    pub replay_endpoint: Option<String>,
    #[serde(default = "default_buffer_steps")]
    pub buffer_steps: usize,
    /// Accepted for vLLM's sake; the sim's PUB queue is its own.
    #[serde(default = "default_hwm")]
    pub hwm: u64,
    #[serde(default = "default_hwm")]
    pub max_queue_size: u64,
    #[serde(default)]
    pub topic: String,
}

fn default_publisher() -> String {
    "null".into()
}
fn default_endpoint() -> String {
    "tcp://*:5557".into()
}
fn default_buffer_steps() -> usize {
    10_000
}
fn default_hwm() -> u64 {
    100_000
}

impl KvEventsConfig {
    /// From the flag's JSON; None when events are off. Errors name the field.
    pub fn parse(json: &str) -> Result<Option<KvEventsConfig>, SimError> {
        let c: KvEventsConfig =
            serde_json::from_str(json).map_err(|e| SimError::invalid("kv-events-config", format!("{json:?}: {e}")))?;
        if !c.enable_kv_cache_events || c.publisher == "null" {
            return Ok(None);
        }
        if c.publisher != "zmq" {
            return Err(SimError::invalid(
                "kv-events-config",
                format!("publisher {:?}: the sim has zmq and null", c.publisher),
            ));
        }
        if !c.endpoint.starts_with("tcp://") || c.replay_endpoint.as_deref().is_some_and(|r| !r.starts_with("tcp://")) {
            return Err(SimError::invalid("kv-events-config", "the sim publishes over tcp:// endpoints only"));
        }
        if c.buffer_steps == 0 || c.buffer_steps > 1_000_000 {
            return Err(SimError::invalid("kv-events-config", "buffer_steps must be between 1 and 1000000"));
        }
        Ok(Some(c))
    }
}

/// vLLM's rule: wildcard, IPv6-any and ipc/inproc endpoints bind; the rest connect.
fn binds(endpoint: &str) -> bool {
    endpoint.contains('*')
        || endpoint.contains("::")
        || endpoint.starts_with("ipc://")
        || endpoint.starts_with("inproc://")
}

/// `tcp://*:P` → `tcp://HOST:P` (IPv6 hosts in brackets).
fn on_host(endpoint: &str, host: &str) -> String {
    let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
    endpoint.replacen('*', &host, 1)
}

/// The running publisher: where the engine sends each step's events.
#[derive(Debug, Clone)]
pub struct KvPublisher {
    tx: mpsc::Sender<Vec<KvEvent>>,
    /// What `GET /kv_event_sources` answers.
    pub sources: KvEventsConfig,
}

impl KvPublisher {
    /// Queues one step's events; false when the queue is full (the batch is dropped).
    pub fn publish(&self, events: Vec<KvEvent>) -> bool {
        events.is_empty() || self.tx.try_send(events).is_ok()
    }
}

/// Binds (or connects) the sockets and starts the publisher task.
pub async fn start(cfg: KvEventsConfig, host: &str) -> Result<KvPublisher, SimError> {
    let bind_err = |what: &str, e: zeromq::ZmqError| SimError::invalid("kv-events-config", format!("{what}: {e}"));
    let mut pubs = zeromq::PubSocket::new();
    let endpoint = if binds(&cfg.endpoint) {
        let at = on_host(&cfg.endpoint, host);
        pubs.bind(&at).await.map_err(|e| bind_err(&at, e))?.to_string()
    } else {
        pubs.connect(&cfg.endpoint).await.map_err(|e| bind_err(&cfg.endpoint, e))?;
        cfg.endpoint.clone()
    };
    let mut replay = None;
    let replay_endpoint = match &cfg.replay_endpoint {
        None => None,
        Some(r) => {
            let at = on_host(r, host);
            let mut router = zeromq::RouterSocket::new();
            let bound = router.bind(&at).await.map_err(|e| bind_err(&at, e))?.to_string();
            replay = Some(router);
            Some(bound)
        }
    };
    let sources = KvEventsConfig { endpoint, replay_endpoint, ..cfg.clone() };
    tracing::info!(endpoint = %sources.endpoint, replay = ?sources.replay_endpoint, topic = %cfg.topic, "publishing KV cache events");
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(run(pubs, replay, rx, Bytes::from(cfg.topic.clone().into_bytes()), cfg.buffer_steps));
    Ok(KvPublisher { tx, sources })
}

fn message(frames: Vec<Bytes>) -> ZmqMessage {
    ZmqMessage::try_from(frames).expect("frames are never empty")
}

/// Publishes until every sender is gone.
async fn run(
    mut pubs: zeromq::PubSocket,
    mut replay: Option<zeromq::RouterSocket>,
    mut rx: mpsc::Receiver<Vec<KvEvent>>,
    topic: Bytes,
    buffer_steps: usize,
) {
    let mut seq: i64 = 0;
    let mut kept: VecDeque<(i64, Bytes)> = VecDeque::new();
    loop {
        let request = async {
            match replay.as_mut() {
                Some(r) => r.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            events = rx.recv() => {
                let Some(events) = events else { return };
                let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
                let payload = Bytes::from(encode_batch(&EventBatch { ts, events, dp_rank: Some(0) }));
                let frames = vec![topic.clone(), Bytes::copy_from_slice(&seq.to_be_bytes()), payload.clone()];
                if let Err(e) = pubs.send(message(frames)).await {
                    tracing::debug!(error = %e, "KV event batch not sent");
                }
                kept.push_back((seq, payload));
                if kept.len() > buffer_steps {
                    kept.pop_front();
                }
                seq += 1;
            }
            req = request => {
                let Ok(req) = req else { continue };
                let frames = req.into_vec();
                let [id, _, start] = frames.as_slice() else {
                    tracing::debug!(frames = frames.len(), "invalid KV event replay request");
                    continue;
                };
                let Ok(start) = flotilla_engine::kv_events::decode_seq(start) else { continue };
                let Some(router) = replay.as_mut() else { continue };
                for (s, payload) in kept.iter().filter(|(s, _)| *s >= start) {
                    let frames = vec![id.clone(), Bytes::new(), topic.clone(), Bytes::copy_from_slice(&s.to_be_bytes()), payload.clone()];
                    if router.send(message(frames)).await.is_err() {
                        break;
                    }
                }
                let end = vec![id.clone(), Bytes::new(), Bytes::new(), Bytes::copy_from_slice(&(-1i64).to_be_bytes()), Bytes::new()];
                let _ = router.send(message(end)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_is_checked_like_vllms() {
        assert_eq!(KvEventsConfig::parse(r#"{"enable_kv_cache_events": false, "publisher": "zmq"}"#).unwrap(), None);
        assert_eq!(KvEventsConfig::parse(r#"{"enable_kv_cache_events": true}"#).unwrap(), None, "publisher null");
        let c = KvEventsConfig::parse(
            r#"{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:0", "replay_endpoint": "tcp://*:0", "topic": "kv"}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!((c.buffer_steps, c.topic.as_str()), (10_000, "kv"));
        let err = |j: &str| KvEventsConfig::parse(j).unwrap_err().to_string();
        assert!(err(r#"{"enable_kv_cache_events": true, "publisher": "kafka"}"#).contains("publisher \"kafka\""));
        assert!(err(r#"{"enable_kv_cache_events": true, "bogus": 1}"#).contains("bogus"));
        assert!(err("not json").contains("kv-events-config"));
        assert!(err(r#"{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "ipc:///tmp/x"}"#)
            .contains("tcp://"));
        assert!(binds("tcp://*:5557") && binds("tcp://[::]:1") && !binds("tcp://10.0.0.5:5557"));
        assert_eq!(on_host("tcp://*:0", "127.0.0.1"), "tcp://127.0.0.1:0");
        assert_eq!(on_host("tcp://*:0", "::1"), "tcp://[::1]:0");
    }
}
