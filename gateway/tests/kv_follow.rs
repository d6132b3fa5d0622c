//! The gateway follows a sim's KV events into its index: after a completion, the index says
//! the engine holds every full block of the prompt (keyed from the prompt's token ids, which
//! the sim's /tokenize gives); after eviction it holds none; a stopped follower leaves no
//! entry behind.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_engine::EngineClient;
use flotilla_gateway::kv_follow::{follow, Ended};
use flotilla_gateway::routing::kv_index::{block_keys, KvIndex};
use serde_json::json;

const CONFIG: &str = r#"{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:0",
    "replay_endpoint": "tcp://*:0", "topic": "kv"}"#;

async fn post(addr: &str, path: &str, body: serde_json::Value) -> serde_json::Value {
    let r = flotilla_testkit::http::post(addr, path, body).await.unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    serde_json::from_slice(&r.body).unwrap()
}

/// A fast sim of `blocks` KV blocks (16 tokens each) publishing its KV events.
async fn publishing_sim(blocks: u32) -> flotilla_sim::SimHandle {
    flotilla_sim::start(flotilla_sim::SimArgs {
        port: 0,
        model: "demo".into(),
        speedup: 50.0,
        block_size: 16,
        num_gpu_blocks: Some(blocks),
        max_model_len: 256,
        kv_events_config: Some(CONFIG.into()),
        ..flotilla_sim::SimArgs::default()
    })
    .await
    .unwrap()
}

async fn held(index: &Mutex<KvIndex>, keys: &[u64], want: usize) -> usize {
    let mut got = 0;
    for _ in 0..100 {
        got = {
            let ix = index.lock().unwrap();
            let engines: Vec<&str> = ix.engines().collect();
            ix.held_by(keys, &engines).iter().map(|h| h.blocks).max().unwrap_or(0)
        };
        if got == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_follows_what_the_engine_caches_and_evicts() {
    let sim = publishing_sim(16).await;
    let addr = sim.local_addr().to_string();
    let sources = EngineClient::new().kv_event_sources(&addr).await.unwrap().expect("the sim publishes");
    let index = Arc::new(Mutex::new(KvIndex::new(16, 10_000)));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(follow(addr.clone(), sources, index.clone(), stopped));
    tokio::time::sleep(Duration::from_millis(300)).await; // subscribed

    let prompt = (0..50).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
    let ids: Vec<u32> = post(&addr, "/tokenize", json!({"model": "demo", "prompt": prompt})).await["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    post(&addr, "/v1/completions", json!({"model": "demo", "prompt": prompt, "max_tokens": 1})).await;
    let keys = block_keys(&ids, 16, None, 64);
    assert!(keys.len() >= 2);
    assert_eq!(
        held(&index, &keys, keys.len()).await,
        keys.len(),
        "every full block of the prompt, keyed by its tokens"
    );

    // Other long prompts take the whole pool: the first prompt's blocks are gone.
    for k in 0..4 {
        let other = (0..60).map(|i| format!("p{k}x{i}")).collect::<Vec<_>>().join(" ");
        post(&addr, "/v1/completions", json!({"model": "demo", "prompt": other, "max_tokens": 1})).await;
    }
    assert_eq!(held(&index, &keys, 0).await, 0, "evicted blocks leave the index");
    assert!(index.lock().unwrap().entries() > 0);

    stop.send(true).unwrap();
    assert_eq!(task.await.unwrap(), Ended::Stopped);
    assert_eq!(index.lock().unwrap().entries(), 0, "a stopped follower takes its engine's entries along");
    sim.shutdown().await.unwrap();
}

/// A fake engine's publisher skips sequence numbers 1 and 2; the follower asks its replay
/// socket for them and indexes what they stored. Without a replay socket the gap drops the
/// engine's entries instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_is_filled_from_the_replay_socket_or_drops_the_engine() {
    use bytes::Bytes;
    use flotilla_engine::kv_events::{encode_batch, BlockHash, EventBatch, KvEvent, Sources};
    use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

    let stored = |h: u64, parent: Option<u64>, tokens: [u32; 2]| EventBatch {
        ts: 0.0,
        events: vec![KvEvent::BlockStored {
            block_hashes: vec![BlockHash(h)],
            parent: parent.map(BlockHash),
            token_ids: tokens.to_vec(),
            block_size: 2,
            lora_id: None,
            lora_name: None,
            medium: None,
        }],
        dp_rank: Some(0),
    };
    // Four batches storing the chain [1 2][3 4][5 6][7 8], one block each.
    let batches =
        [stored(1, None, [1, 2]), stored(2, Some(1), [3, 4]), stored(3, Some(2), [5, 6]), stored(4, Some(3), [7, 8])];
    let frames = |seq: i64, b: &EventBatch| {
        vec![Bytes::from_static(b"kv"), Bytes::copy_from_slice(&seq.to_be_bytes()), Bytes::from(encode_batch(b))]
    };
    let keys = block_keys(&[1, 2, 3, 4, 5, 6, 7, 8], 2, None, 8);

    for with_replay in [true, false] {
        let mut pubs = zeromq::PubSocket::new();
        let pub_at = pubs.bind("tcp://127.0.0.1:0").await.unwrap().to_string();
        let mut router = zeromq::RouterSocket::new();
        let replay_at = router.bind("tcp://127.0.0.1:0").await.unwrap().to_string();
        let replayed = batches.clone();
        let replayer = tokio::spawn(async move {
            let end = |id: Bytes| {
                vec![id, Bytes::new(), Bytes::new(), Bytes::copy_from_slice(&(-1i64).to_be_bytes()), Bytes::new()]
            };
            // The first sync asks for the whole history: none yet.
            let req = router.recv().await.unwrap().into_vec();
            assert_eq!(flotilla_engine::kv_events::decode_seq(&req[2]).unwrap(), 0, "the first sync asks from 0");
            router.send(ZmqMessage::try_from(end(req[0].clone())).unwrap()).await.unwrap();
            let req = router.recv().await.unwrap().into_vec();
            let id = req[0].clone();
            assert_eq!(flotilla_engine::kv_events::decode_seq(&req[2]).unwrap(), 1, "asks from the first missed batch");
            for seq in 1..=2i64 {
                let mut f = vec![id.clone(), Bytes::new()];
                f.extend(frames(seq, &replayed[seq as usize]));
                router.send(ZmqMessage::try_from(f).unwrap()).await.unwrap();
            }
            router.send(ZmqMessage::try_from(end(id)).unwrap()).await.unwrap();
        });
        let sources =
            Sources { endpoint: pub_at, replay_endpoint: with_replay.then_some(replay_at), topic: "kv".into() };
        let index = Arc::new(Mutex::new(KvIndex::new(2, 100)));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(follow("fake".into(), sources, index.clone(), stopped));
        // Publish seq 0 until the subscription is up, then jump to seq 3.
        for _ in 0..100 {
            pubs.send(ZmqMessage::try_from(frames(0, &batches[0])).unwrap()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            if index.lock().unwrap().entries() == 1 {
                break;
            }
        }
        pubs.send(ZmqMessage::try_from(frames(3, &batches[3])).unwrap()).await.unwrap();
        if with_replay {
            assert_eq!(held(&index, &keys, 4).await, 4, "batches 1 and 2 replayed before batch 3 chains on them");
            tokio::time::timeout(Duration::from_secs(5), replayer).await.unwrap().unwrap();
        } else {
            assert_eq!(held(&index, &keys, 0).await, 0, "no replay: the engine's entries are dropped");
            replayer.abort();
        }
        stop.send(true).unwrap();
        task.await.unwrap();
    }
}

/// A follower that starts after the engine cached a prompt still knows it: its first sync
/// replays the engine's kept history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_follower_learns_what_the_engine_already_holds() {
    let sim = publishing_sim(64).await;
    let addr = sim.local_addr().to_string();
    let prompt = (0..50).map(|i| format!("early{i}")).collect::<Vec<_>>().join(" ");
    post(&addr, "/v1/completions", json!({"model": "demo", "prompt": prompt, "max_tokens": 1})).await;
    let mut ids = Vec::new();
    flotilla_engine::sim_tokenizer::encode_prompt(&prompt, &mut ids);
    let keys = block_keys(&ids, 16, None, 64);

    let sources = EngineClient::new().kv_event_sources(&addr).await.unwrap().expect("the sim publishes");
    let index = Arc::new(Mutex::new(KvIndex::new(16, 10_000)));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(follow(addr.clone(), sources, index.clone(), stopped));
    assert_eq!(held(&index, &keys, keys.len()).await, keys.len(), "known from the replayed history");
    stop.send(true).unwrap();
    task.await.unwrap();
    sim.shutdown().await.unwrap();
}
