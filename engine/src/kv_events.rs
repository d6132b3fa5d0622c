//! vLLM's KV cache events, as its ZMQ publisher sends them (`--kv-events-config
//! '{"enable_kv_cache_events": true, "publisher": "zmq", ...}'`): decoded into
//! [`EventBatch`] for the gateway's index, and encoded the way vLLM 0.32 does for the sim.
//! Pure: no sockets here.
//!
//! One message is three frames: the topic, the batch's sequence number (8 bytes, big
//! endian, signed: the replay socket ends a replay with -1) and a msgpack payload. The
//! payload is a batch, always a positional array `[ts, events, dp_rank?]`. Each event is
//! either a **tagged map** (vLLM ≥ 0.10, msgspec `tag=True`: `{"type": "BlockStored",
//! "block_hashes": [...], ...}`) or, in older vLLMs, a **positional array** whose first item
//! is the tag (`["BlockStored", block_hashes, parent_block_hash, token_ids, block_size,
//! lora_id, medium]`, `["BlockRemoved", block_hashes, medium]`, `["AllBlocksCleared"]`).
//! Both decode to the same [`KvEvent`]. Fields a newer vLLM adds are ignored; an event type
//! this module does not know decodes to [`KvEvent::Other`], so a new vLLM does not break
//! the index, it only goes unused for that event.
//!
//! Block hashes (`ExternalBlockHash`: an int, or bytes for sha256-based hashing) are only
//! names the engine uses for its blocks: [`BlockHash`] folds them to 64 bits, enough to
//! match a `BlockRemoved` to the `BlockStored` it undoes. The gateway keys its index by its
//! own hashes of the token ids, which `BlockStored` carries.
//!
//! vLLM's KV offloading connector announces blocks stored on its tiers (`medium: CPU`) with
//! `block_size: 0` and no token ids unless its `self_describing_kv_events` is on: such a
//! placeholder decodes to [`KvEvent::Other`] (`"BlockStored placeholder"`), so it is skipped
//! rather than failing its whole batch (which made followers replay and drop the engine).
//!
//! Bounds: a payload over [`MAX_PAYLOAD`] bytes, nesting deeper than 16 (rmpv counts its own way), a `BlockStored`
//! whose token ids are not `block_size` per block, or more than [`MAX_BLOCKS_PER_EVENT`]
//! blocks in one event is refused with an error naming what is wrong.

use rmpv::Value;

/// The largest payload decoded (vLLM batches one scheduler step's events: far below this).
pub const MAX_PAYLOAD: usize = 16 << 20;
/// The most blocks one event may name.
pub const MAX_BLOCKS_PER_EVENT: usize = 65_536;
/// Nesting depth: batch > events > event > field > item.
const MAX_DEPTH: usize = 16;

/// An engine's name for one of its KV blocks, folded to 64 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u64);

impl BlockHash {
    /// From an int hash (two's complement for negative ones, as Python's `hash()` gives) or
    /// the first 8 bytes of a byte hash (zero-padded when shorter).
    fn from_value(v: &Value) -> Option<BlockHash> {
        match v {
            Value::Integer(i) => i.as_u64().or_else(|| i.as_i64().map(|s| s as u64)).map(BlockHash),
            Value::Binary(b) => {
                let mut buf = [0u8; 8];
                let n = b.len().min(8);
                buf[..n].copy_from_slice(&b[..n]);
                Some(BlockHash(u64::from_be_bytes(buf)))
            }
            _ => None,
        }
    }
}

/// Where the blocks live (vLLM's `medium`); None from engines that do not say (GPU).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Medium {
    Gpu,
    Cpu,
    Storage,
    Other(String),
}

impl Medium {
    fn parse(v: &Value) -> Result<Option<Medium>, String> {
        match v {
            Value::Nil => Ok(None),
            Value::String(s) => Ok(Some(match s.as_str().unwrap_or_default() {
                "GPU" => Medium::Gpu,
                "CPU" => Medium::Cpu,
                "STORAGE" => Medium::Storage,
                other => Medium::Other(other.chars().take(32).collect()),
            })),
            other => Err(format!("medium is {}, not a string", kind(other))),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            Medium::Gpu => "GPU",
            Medium::Cpu => "CPU",
            Medium::Storage => "STORAGE",
            Medium::Other(s) => s,
        }
    }
}

/// One KV cache event.
#[derive(Debug, Clone, PartialEq)]
pub enum KvEvent {
    /// Full blocks now cached: `token_ids` holds `block_size` ids per block, in order;
    /// `parent` is the block before the first (None at the start of a sequence).
    BlockStored {
        block_hashes: Vec<BlockHash>,
        parent: Option<BlockHash>,
        token_ids: Vec<u32>,
        block_size: u32,
        lora_id: Option<i64>,
        lora_name: Option<String>,
        medium: Option<Medium>,
    },
    /// Blocks evicted from `medium`.
    BlockRemoved { block_hashes: Vec<BlockHash>, medium: Option<Medium> },
    /// The engine dropped every cached block (a reset of the prefix cache).
    AllBlocksCleared,
    /// An event type this module does not know (its tag).
    Other(String),
}

/// One published batch.
#[derive(Debug, Clone, PartialEq)]
pub struct EventBatch {
    /// The engine's wall clock when it made the batch (seconds since the epoch).
    pub ts: f64,
    pub events: Vec<KvEvent>,
    /// The publishing data-parallel rank, when the engine has several.
    pub dp_rank: Option<u32>,
}

/// Where an engine publishes its KV events: rank 0's entry of `GET /kv_event_sources`
/// (`{"0": {"endpoint": "tcp://10.0.0.5:41234", "replay_endpoint": ..., "topic": ...}}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources {
    /// The PUB socket to subscribe to.
    pub endpoint: String,
    /// The ROUTER socket that replays missed batches, if any.
    pub replay_endpoint: Option<String>,
    pub topic: String,
}

impl Sources {
    /// From the endpoint's JSON; None when the engine publishes nothing (`{}`, events off,
    /// or an endpoint it connects out to rather than binds: nothing to subscribe to).
    pub fn parse(body: &[u8]) -> Result<Option<Sources>, String> {
        let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
        let Some(rank0) = v.get("0") else { return Ok(None) };
        let field = |k: &str| rank0.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let Some(endpoint) = field("endpoint").filter(|e| e.starts_with("tcp://") && !e.contains('*')) else {
            return Ok(None);
        };
        if endpoint.len() > 256 {
            return Err("endpoint is over 256 bytes".into());
        }
        let replay_endpoint =
            field("replay_endpoint").filter(|e| e.starts_with("tcp://") && !e.contains('*') && e.len() <= 256);
        let topic = field("topic").unwrap_or_default().chars().take(256).collect();
        Ok(Some(Sources { endpoint, replay_endpoint, topic }))
    }
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("KV event batch: {0}")]
pub struct DecodeError(pub String);

fn err<T>(what: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(what.into()))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Boolean(_) => "a boolean",
        Value::Integer(_) => "an integer",
        Value::F32(_) | Value::F64(_) => "a float",
        Value::String(_) => "a string",
        Value::Binary(_) => "bytes",
        Value::Array(_) => "an array",
        Value::Map(_) => "a map",
        Value::Ext(..) => "an extension",
    }
}

/// The sequence number frame: 8 bytes, big endian, signed.
pub fn decode_seq(frame: &[u8]) -> Result<i64, DecodeError> {
    let bytes: [u8; 8] =
        frame.try_into().or_else(|_| err(format!("sequence frame of {} bytes, not 8", frame.len())))?;
    Ok(i64::from_be_bytes(bytes))
}

/// A batch payload, either encoding of its events.
pub fn decode_batch(payload: &[u8]) -> Result<EventBatch, DecodeError> {
    if payload.len() > MAX_PAYLOAD {
        return err(format!("payload of {} bytes is over {MAX_PAYLOAD}", payload.len()));
    }
    let mut rd = payload;
    let v =
        rmpv::decode::read_value_with_max_depth(&mut rd, MAX_DEPTH).or_else(|e| err(format!("not msgpack: {e}")))?;
    if !rd.is_empty() {
        return err(format!("{} bytes after the batch", rd.len()));
    }
    let Value::Array(items) = v else { return err(format!("a batch is an array, got {}", kind(&v))) };
    let ts = match items.first() {
        Some(Value::F64(f)) => *f,
        Some(Value::F32(f)) => f64::from(*f),
        Some(Value::Integer(i)) => i.as_f64().unwrap_or(0.0),
        other => return err(format!("batch ts is {}", other.map_or("missing", kind))),
    };
    let Some(Value::Array(raw)) = items.get(1) else { return err("batch events are not an array") };
    let dp_rank = match items.get(2) {
        None | Some(Value::Nil) => None,
        Some(Value::Integer(i)) => Some(
            i.as_u64().and_then(|r| u32::try_from(r).ok()).ok_or_else(|| DecodeError("dp_rank out of range".into()))?,
        ),
        Some(other) => return err(format!("dp_rank is {}", kind(other))),
    };
    let events = raw
        .iter()
        .enumerate()
        .map(|(i, e)| decode_event(e).map_err(|m| DecodeError(format!("event {i}: {m}"))))
        .collect::<Result<_, _>>()?;
    Ok(EventBatch { ts, events, dp_rank })
}

/// The fields of one event, from either encoding.
enum Fields<'a> {
    /// `{"type": TAG, name: value, ...}`
    Tagged(&'a [(Value, Value)]),
    /// `[TAG, value, ...]` with the field names in order.
    Positional(&'a [Value], &'static [&'static str]),
}

impl<'a> Fields<'a> {
    /// The event's tag and its fields.
    fn of(v: &'a Value) -> Result<(&'a str, Fields<'a>), String> {
        match v {
            Value::Map(entries) => {
                let tag = entries
                    .iter()
                    .find(|(k, _)| k.as_str() == Some("type"))
                    .and_then(|(_, t)| t.as_str())
                    .ok_or("a tagged event has no \"type\" string")?;
                Ok((tag, Fields::Tagged(entries)))
            }
            Value::Array(items) => {
                let tag =
                    items.first().and_then(Value::as_str).ok_or("a positional event does not start with its type")?;
                let order: &'static [&'static str] = match tag {
                    "BlockStored" => &[
                        "block_hashes",
                        "parent_block_hash",
                        "token_ids",
                        "block_size",
                        "lora_id",
                        "medium",
                        "lora_name",
                    ],
                    "BlockRemoved" => &["block_hashes", "medium"],
                    _ => &[],
                };
                Ok((tag, Fields::Positional(&items[1..], order)))
            }
            other => Err(format!("an event is a map or an array, got {}", kind(other))),
        }
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        match self {
            Fields::Tagged(entries) => entries.iter().find(|(k, _)| k.as_str() == Some(name)).map(|(_, v)| v),
            Fields::Positional(items, order) => order.iter().position(|f| *f == name).and_then(|i| items.get(i)),
        }
    }
}

fn hashes(v: Option<&Value>) -> Result<Vec<BlockHash>, String> {
    let Some(Value::Array(items)) = v else { return Err("block_hashes is not an array".into()) };
    if items.len() > MAX_BLOCKS_PER_EVENT {
        return Err(format!("{} blocks in one event, over {MAX_BLOCKS_PER_EVENT}", items.len()));
    }
    items.iter().map(|h| BlockHash::from_value(h).ok_or_else(|| format!("a block hash is {}", kind(h)))).collect()
}

fn opt_int(v: Option<&Value>, name: &str) -> Result<Option<i64>, String> {
    match v {
        None | Some(Value::Nil) => Ok(None),
        Some(Value::Integer(i)) => i.as_i64().map(Some).ok_or_else(|| format!("{name} out of range")),
        Some(other) => Err(format!("{name} is {}", kind(other))),
    }
}

fn decode_event(v: &Value) -> Result<KvEvent, String> {
    let (tag, f) = Fields::of(v)?;
    let medium = || Medium::parse(f.get("medium").unwrap_or(&Value::Nil));
    match tag {
        "BlockStored" => {
            let block_hashes = hashes(f.get("block_hashes"))?;
            let parent = match f.get("parent_block_hash") {
                None | Some(Value::Nil) => None,
                Some(h) => Some(BlockHash::from_value(h).ok_or_else(|| format!("parent_block_hash is {}", kind(h)))?),
            };
            let Some(Value::Array(ids)) = f.get("token_ids") else { return Err("token_ids is not an array".into()) };
            if ids.is_empty() && opt_int(f.get("block_size"), "block_size")? == Some(0) {
                return Ok(KvEvent::Other("BlockStored placeholder".into()));
            }
            let block_size = match opt_int(f.get("block_size"), "block_size")? {
                Some(b) if b > 0 && b <= 1 << 20 => b as u32,
                other => return Err(format!("block_size {other:?} is not a block size")),
            };
            if ids.len() != block_hashes.len() * block_size as usize {
                return Err(format!("{} token ids for {} blocks of {block_size}", ids.len(), block_hashes.len()));
            }
            let token_ids = ids
                .iter()
                .map(|t| {
                    t.as_u64().and_then(|t| u32::try_from(t).ok()).ok_or_else(|| format!("a token id is {}", kind(t)))
                })
                .collect::<Result<_, _>>()?;
            let lora_name = match f.get("lora_name") {
                None | Some(Value::Nil) => None,
                Some(Value::String(s)) => s.as_str().map(|s| s.chars().take(256).collect()),
                Some(other) => return Err(format!("lora_name is {}", kind(other))),
            };
            Ok(KvEvent::BlockStored {
                block_hashes,
                parent,
                token_ids,
                block_size,
                lora_id: opt_int(f.get("lora_id"), "lora_id")?,
                lora_name,
                medium: medium()?,
            })
        }
        "BlockRemoved" => Ok(KvEvent::BlockRemoved { block_hashes: hashes(f.get("block_hashes"))?, medium: medium()? }),
        "AllBlocksCleared" => Ok(KvEvent::AllBlocksCleared),
        other => Ok(KvEvent::Other(other.chars().take(64).collect())),
    }
}

fn s(v: &str) -> Value {
    Value::from(v)
}

fn hash_value(h: BlockHash) -> Value {
    Value::from(h.0)
}

fn opt<T>(v: &Option<T>, f: impl Fn(&T) -> Value) -> Value {
    v.as_ref().map_or(Value::Nil, f)
}

/// A batch as vLLM 0.32 encodes it: `[ts, [events as tagged maps], dp_rank]`, int hashes,
/// with the fields 0.32 adds for one full-attention KV cache group (`extra_keys: [nil per
/// block]`, `group_idx: 0`, `kv_cache_spec_kind: "full_attention"`). The sim publishes this.
pub fn encode_batch(batch: &EventBatch) -> Vec<u8> {
    let events = batch
        .events
        .iter()
        .map(|e| {
            let map: Vec<(Value, Value)> = match e {
                KvEvent::BlockStored { block_hashes, parent, token_ids, block_size, lora_id, lora_name, medium } => {
                    vec![
                        (s("type"), s("BlockStored")),
                        (s("block_hashes"), Value::Array(block_hashes.iter().copied().map(hash_value).collect())),
                        (s("parent_block_hash"), opt(parent, |h| hash_value(*h))),
                        (s("token_ids"), Value::Array(token_ids.iter().map(|t| Value::from(*t)).collect())),
                        (s("block_size"), Value::from(*block_size)),
                        (s("lora_id"), opt(lora_id, |l| Value::from(*l))),
                        (s("medium"), opt(medium, |m| s(m.as_str()))),
                        (s("lora_name"), opt(lora_name, |n| s(n))),
                        (s("extra_keys"), Value::Array(vec![Value::Nil; block_hashes.len()])),
                        (s("group_idx"), Value::from(0)),
                        (s("kv_cache_spec_kind"), s("full_attention")),
                    ]
                }
                KvEvent::BlockRemoved { block_hashes, medium } => vec![
                    (s("type"), s("BlockRemoved")),
                    (s("block_hashes"), Value::Array(block_hashes.iter().copied().map(hash_value).collect())),
                    (s("medium"), opt(medium, |m| s(m.as_str()))),
                    (s("group_idx"), Value::from(0)),
                ],
                KvEvent::AllBlocksCleared => vec![(s("type"), s("AllBlocksCleared"))],
                KvEvent::Other(tag) => vec![(s("type"), s(tag))],
            };
            Value::Map(map)
        })
        .collect();
    let mut items = vec![Value::F64(batch.ts), Value::Array(events)];
    if let Some(r) = batch.dp_rank {
        items.push(Value::from(r));
    }
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &Value::Array(items)).expect("writing to a Vec cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).unwrap();
        out
    }

    fn stored() -> KvEvent {
        KvEvent::BlockStored {
            block_hashes: vec![BlockHash(11), BlockHash(12)],
            parent: Some(BlockHash(10)),
            token_ids: vec![1, 2, 3, 4],
            block_size: 2,
            lora_id: None,
            lora_name: None,
            medium: Some(Medium::Gpu),
        }
    }

    /// The real CPU vLLM's events (realvllm/record_kv_events.py): a prompt, the same again,
    /// a longer one sharing its prefix, then distinct prompts that evict.
    #[test]
    fn recorded_real_vllm_events_decode() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../realvllm/tests/data/kv-events");
        let index = std::fs::read_to_string(dir.join("index.txt")).unwrap();
        let (mut stored, mut removed, mut parents, mut seqs) = (0, 0, 0, Vec::new());
        for line in index.lines().filter(|l| !l.starts_with('#')) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let batch =
                decode_batch(&std::fs::read(dir.join(f[0])).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", f[0]));
            assert!(batch.ts > 1.7e9, "a wall-clock time: {}", batch.ts);
            assert_eq!(batch.dp_rank, Some(0));
            seqs.push(f[2].parse::<i64>().unwrap());
            for e in batch.events {
                match e {
                    KvEvent::BlockStored { block_hashes, parent, token_ids, block_size, medium, .. } => {
                        assert_eq!((block_size, medium), (32, Some(Medium::Gpu)));
                        assert_eq!(token_ids.len(), block_hashes.len() * 32);
                        stored += block_hashes.len();
                        parents += usize::from(parent.is_some());
                    }
                    KvEvent::BlockRemoved { block_hashes, .. } => removed += block_hashes.len(),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!(seqs, (0..seqs.len() as i64).collect::<Vec<_>>(), "sequence numbers count up from 0");
        assert!(stored > 64 && removed > 0, "stored {stored}, removed {removed}: 64 blocks make the engine evict");
        assert!(parents > 0, "a prompt sharing a cached prefix names its parent block");
    }

    /// The encoding the sim publishes has the real engine's shape: the same keys in the same
    /// order, and the batch's three positions.
    #[test]
    fn encoded_events_have_the_recorded_real_shape() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../realvllm/tests/data/kv-events");
        let shape = |bytes: &[u8]| -> Vec<(usize, String, Vec<String>)> {
            let Value::Array(batch) = rmpv::decode::read_value(&mut &bytes[..]).unwrap() else { panic!("batch") };
            let Value::Array(events) = &batch[1] else { panic!("events") };
            events
                .iter()
                .map(|e| {
                    let Value::Map(m) = e else { panic!("a tagged map") };
                    let tag = m[0].1.as_str().unwrap().to_string();
                    (batch.len(), tag, m.iter().map(|(k, _)| k.as_str().unwrap().to_string()).collect())
                })
                .collect()
        };
        let mut real = Vec::new();
        for n in 0..16 {
            real.extend(shape(&std::fs::read(dir.join(format!("{n:03}.msgpack"))).unwrap()));
        }
        let ours = shape(&encode_batch(&EventBatch {
            ts: 1.0,
            events: vec![
                stored(),
                KvEvent::BlockRemoved { block_hashes: vec![BlockHash(1)], medium: Some(Medium::Gpu) },
            ],
            dp_rank: Some(0),
        }));
        for o in &ours {
            let r = real.iter().find(|r| r.1 == o.1).unwrap_or_else(|| panic!("no recorded {}", o.1));
            assert_eq!(o, r, "the real engine's {} shape", o.1);
        }
    }

    #[test]
    fn sources_are_read_from_the_recorded_answer() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../realvllm/tests/data/kv-events");
        let s = Sources::parse(&std::fs::read(dir.join("kv_event_sources.json")).unwrap()).unwrap().unwrap();
        assert_eq!(s.endpoint, "tcp://127.0.0.1:37053");
        assert_eq!((s.replay_endpoint.as_deref(), s.topic.as_str()), (Some("tcp://127.0.0.1:36213"), "kv@tiny"));
        assert_eq!(Sources::parse(b"{}"), Ok(None));
        assert_eq!(Sources::parse(br#"{"0": {"endpoint": "tcp://*:5557"}}"#), Ok(None), "unresolved wildcard");
        assert!(Sources::parse(b"nope").is_err());
    }

    #[test]
    fn tagged_maps_round_trip() {
        let batch = EventBatch {
            ts: 1.5,
            events: vec![
                stored(),
                KvEvent::BlockRemoved { block_hashes: vec![BlockHash(11)], medium: None },
                KvEvent::AllBlocksCleared,
            ],
            dp_rank: Some(0),
        };
        assert_eq!(decode_batch(&encode_batch(&batch)).unwrap(), batch);
    }

    #[test]
    fn positional_arrays_of_older_vllms_decode_the_same() {
        let old = Value::Array(vec![
            Value::F64(1.5),
            Value::Array(vec![
                Value::Array(vec![
                    s("BlockStored"),
                    Value::Array(vec![Value::from(11), Value::from(12)]),
                    Value::from(10),
                    Value::Array((1..=4).map(Value::from).collect()),
                    Value::from(2),
                    Value::Nil,
                    s("GPU"),
                ]),
                Value::Array(vec![s("BlockRemoved"), Value::Array(vec![Value::from(11)]), Value::Nil]),
                Value::Array(vec![s("AllBlocksCleared")]),
            ]),
        ]);
        let b = decode_batch(&encode(&old)).unwrap();
        assert_eq!(b.events[0], stored());
        assert_eq!(b.events[1], KvEvent::BlockRemoved { block_hashes: vec![BlockHash(11)], medium: None });
        assert_eq!((b.events[2].clone(), b.dp_rank), (KvEvent::AllBlocksCleared, None));
    }

    #[test]
    fn byte_and_negative_hashes_fold_to_64_bits_and_new_fields_are_ignored() {
        let ev = Value::Map(vec![
            (s("type"), s("BlockRemoved")),
            (
                s("block_hashes"),
                Value::Array(vec![Value::Binary(vec![0xAB; 32]), Value::from(-1), Value::Binary(vec![1])]),
            ),
            (s("medium"), s("CPU")),
            (s("group_idx"), Value::from(0)),
            (s("locality"), s("LOCAL")),
        ]);
        let b = decode_batch(&encode(&Value::Array(vec![Value::F64(0.0), Value::Array(vec![ev])]))).unwrap();
        assert_eq!(
            b.events[0],
            KvEvent::BlockRemoved {
                block_hashes: vec![BlockHash(0xABAB_ABAB_ABAB_ABAB), BlockHash(u64::MAX), BlockHash(1 << 56)],
                medium: Some(Medium::Cpu)
            }
        );
    }

    #[test]
    fn unknown_events_pass_and_malformed_ones_are_named() {
        let batch = |ev: Value| encode(&Value::Array(vec![Value::F64(0.0), Value::Array(vec![ev])]));
        let other = Value::Map(vec![(s("type"), s("BlockPinned"))]);
        assert_eq!(decode_batch(&batch(other)).unwrap().events, [KvEvent::Other("BlockPinned".into())]);
        // the offloading connector's placeholder (no token ids, block_size 0) is skipped, not an error
        let placeholder = Value::Array(vec![
            s("BlockStored"),
            Value::Array(vec![Value::from(7)]),
            Value::Nil,
            Value::Array(vec![]),
            Value::from(0),
            Value::Nil,
            s("CPU"),
        ]);
        assert_eq!(
            decode_batch(&batch(placeholder)).unwrap().events,
            [KvEvent::Other("BlockStored placeholder".into())]
        );
        let short = Value::Map(vec![
            (s("type"), s("BlockStored")),
            (s("block_hashes"), Value::Array(vec![Value::from(1)])),
            (s("token_ids"), Value::Array(vec![Value::from(1)])),
            (s("block_size"), Value::from(16)),
        ]);
        assert!(decode_batch(&batch(short)).unwrap_err().0.contains("event 0: 1 token ids for 1 blocks of 16"));
        let untagged = Value::Map(vec![(s("block_hashes"), Value::Array(vec![]))]);
        assert!(decode_batch(&batch(untagged)).unwrap_err().0.contains("no \"type\""));
        assert!(decode_batch(b"\x93").unwrap_err().0.contains("not msgpack"));
        let deep = (0..200).fold(Value::Nil, |v, _| Value::Array(vec![v]));
        assert!(decode_batch(&encode(&deep)).unwrap_err().0.contains("depth"), "nesting is bounded");
        assert!(decode_batch(&encode(&Value::from(3))).unwrap_err().0.contains("a batch is an array"));
        let mut trailing = encode_batch(&EventBatch { ts: 0.0, events: vec![], dp_rank: None });
        trailing.push(0);
        assert!(decode_batch(&trailing).unwrap_err().0.contains("1 bytes after"));
        assert_eq!(decode_seq(&7i64.to_be_bytes()), Ok(7));
        assert_eq!(decode_seq(&(-1i64).to_be_bytes()), Ok(-1));
        assert!(decode_seq(b"\x01").is_err());
    }
}
