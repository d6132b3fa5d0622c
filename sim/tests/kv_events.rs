//! `--kv-events-config`: the sim publishes its prefix cache's KV events over ZMQ as vLLM
//! does, and a subscriber (the `zeromq` crate here, as a gateway would) reads
//! `BlockStored` with the prompt's own token ids, `BlockRemoved` once the pool is reused,
//! in sequence, and gets missed batches back from the replay socket.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use flotilla_engine::kv_events::{decode_batch, decode_seq, BlockHash, KvEvent};
use serde_json::json;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

const CONFIG: &str = r#"{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:0",
    "replay_endpoint": "tcp://*:0", "topic": "kv@demo"}"#;

async fn next(sub: &mut zeromq::SubSocket) -> (i64, Vec<KvEvent>) {
    let m = tokio::time::timeout(Duration::from_secs(10), sub.recv()).await.expect("an event batch").unwrap();
    let frames = m.into_vec();
    assert_eq!(frames.len(), 3, "topic, sequence, payload");
    assert_eq!(&frames[0][..], b"kv@demo");
    (decode_seq(&frames[1]).unwrap(), decode_batch(&frames[2]).unwrap().events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_sees_stored_and_removed_blocks_and_replays_what_it_missed() {
    // 16 blocks of 16 tokens: a few long prompts fill the pool and evict.
    let sim = start(flotilla_sim::SimArgs {
        kv_events_config: Some(CONFIG.into()),
        block_size: 16,
        num_gpu_blocks: Some(16),
        max_model_len: 256,
        ..args()
    })
    .await;
    let a = sim.local_addr();
    let sources = get(a, "/kv_event_sources").await.json();
    let endpoint = sources["0"]["endpoint"].as_str().expect("the bound endpoint").to_string();
    let replay = sources["0"]["replay_endpoint"].as_str().expect("the replay endpoint").to_string();
    assert!(endpoint.starts_with("tcp://127.0.0.1:") && !endpoint.ends_with(":0"), "{endpoint}");
    let mut sub = zeromq::SubSocket::new();
    sub.connect(&endpoint).await.unwrap();
    sub.subscribe("").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // the subscription reaches the publisher

    let prompt = (0..40).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
    let ids: Vec<u32> = post(a, "/tokenize", json!({"model": "demo", "prompt": prompt})).await.json()["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    assert!(ids.len() >= 32, "two full blocks at least: {}", ids.len());
    assert_eq!(complete(a, "demo", &prompt, 1).await.status, 200);
    let (seq0, events) = next(&mut sub).await;
    let KvEvent::BlockStored { block_hashes, parent, token_ids, block_size, .. } = &events[0] else {
        panic!("not a BlockStored: {events:?}")
    };
    assert_eq!((*block_size, parent), (16, &None));
    assert_eq!(token_ids[..], ids[..block_hashes.len() * 16], "the blocks hold the prompt's own tokens");
    let first: Vec<BlockHash> = block_hashes.clone();

    // Distinct long prompts reuse the pool: the first prompt's blocks are removed.
    let mut removed = Vec::new();
    let mut last = seq0;
    for k in 0..4 {
        let other = (0..60).map(|i| format!("p{k}x{i}")).collect::<Vec<_>>().join(" ");
        assert_eq!(complete(a, "demo", &other, 1).await.status, 200);
    }
    while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(500), sub.recv()).await {
        let frames = m.into_vec();
        let seq = decode_seq(&frames[1]).unwrap();
        assert_eq!(seq, last + 1, "no gap");
        last = seq;
        for e in decode_batch(&frames[2]).unwrap().events {
            if let KvEvent::BlockRemoved { block_hashes, .. } = e {
                removed.extend(block_hashes);
            }
        }
    }
    assert!(first.iter().all(|h| removed.contains(h)), "evicted: {first:?} in {removed:?}");

    // Replay from the first batch: every kept batch in order, then the end marker.
    let mut dealer = zeromq::DealerSocket::new();
    dealer.connect(&replay).await.unwrap();
    let request = ZmqMessage::try_from(vec![Bytes::new(), Bytes::copy_from_slice(&seq0.to_be_bytes())]).unwrap();
    dealer.send(request).await.unwrap();
    let mut replayed = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), dealer.recv()).await.expect("a replay answer").unwrap();
        let f = m.into_vec();
        assert_eq!(f.len(), 4, "empty delimiter, topic, sequence, payload");
        let seq = decode_seq(&f[2]).unwrap();
        if seq == -1 {
            break;
        }
        decode_batch(&f[3]).unwrap();
        replayed.push(seq);
    }
    assert_eq!(replayed, (seq0..=last).collect::<Vec<_>>());
    sim.shutdown().await.unwrap();
}

#[tokio::test]
async fn without_the_flag_there_are_no_sources_and_a_bad_flag_is_refused() {
    let sim = start(args()).await;
    assert_eq!(get(sim.local_addr(), "/kv_event_sources").await.json(), json!({}));
    sim.shutdown().await.unwrap();
    let bad = flotilla_sim::SimArgs {
        kv_events_config: Some(r#"{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": 5}"#.into()),
        ..args()
    };
    let Err(err) = flotilla_sim::start(bad).await else { panic!("a bad --kv-events-config was accepted") };
    let err = err.to_string();
    assert!(err.contains("kv-events-config"), "{err}");
}
