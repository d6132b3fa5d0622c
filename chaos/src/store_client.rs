//! The control-plane workload: concurrent clients doing reads, blind writes and
//! compare-and-set updates on a few registers (Tenant objects whose label `v` is the
//! value), recording every invocation and completion for the linearizability and
//! lost-write checks.
//!
//! What an answer means: OK is definite; `FAILED_PRECONDITION cluster.conflict` is a
//! definite CAS failure; `NOT_FOUND` is a definite "absent" read. Anything else —
//! timeouts, `UNAVAILABLE`, `cluster.not_leader` (a leader that stepped down may still see
//! its entry committed by its successor) — is indeterminate for a write, which may take
//! effect at any later time or never, and dropped for a read. Values are unique per
//! client and sequence number, so a write never answers "unchanged".

use std::time::Duration;

use flotilla_api::pb::object_service_client::ObjectServiceClient;
use flotilla_api::pb::{ApplyRequest, GetRequest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::dial::Dialer;
use tonic::Code;

use crate::linearizability::{Call, Op, Ret, Versioned};

/// The object kind the registers are.
pub const KIND: &str = "tenant";

/// The register's object name.
pub fn key_name(i: u32) -> String {
    format!("chaos-reg-{i}")
}

fn manifest(key: &str, value: &str) -> String {
    format!("kind: Tenant\nmetadata:\n  name: {key}\n  labels:\n    v: {value}\nspec: {{}}\n")
}

async fn connect(dialer: &Dialer, addr: &str) -> Option<ObjectServiceClient<Channel>> {
    let ch = dialer.channel(addr, Duration::from_millis(500), Duration::from_secs(3)).await?;
    Some(ObjectServiceClient::new(ch))
}

/// How one attempt ended.
enum Answer {
    Done(Ret),
    /// Not applied for sure (could not connect).
    NotSent,
    /// May or may not have been applied.
    Unknown,
}

/// One client: runs until `duration` has passed since `t0`, then returns its history.
/// `servers` are the servers' gRPC addresses (dialed directly: clients are not behind the
/// fault proxies, so a client of a partitioned server sees what a real client would).
pub async fn client(
    id: u32,
    dialer: Dialer,
    servers: Vec<String>,
    keys: u32,
    seed: u64,
    t0: Instant,
    duration: Duration,
) -> Vec<Op> {
    let mut rng = StdRng::seed_from_u64(seed ^ (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut history = Vec::new();
    let mut seq = 0u64;
    let mut server = id as usize % servers.len().max(1);
    let mut conn: Option<ObjectServiceClient<Channel>> = None;
    let mut last_seen: Vec<u64> = vec![0; keys as usize];
    while t0.elapsed() < duration {
        let k = rng.random_range(0..keys);
        let key = key_name(k);
        let roll: f64 = rng.random();
        seq += 1;
        let value = format!("c{id}-{seq}");
        let call = if roll < 0.4 {
            Call::Read
        } else if roll < 0.6 {
            Call::Write { value }
        } else {
            Call::Cas { expected_revision: last_seen[k as usize], value }
        };
        if conn.is_none() {
            conn = connect(&dialer, &servers[server]).await;
        }
        let invoke = t0.elapsed().as_nanos() as u64;
        let answer = match conn.as_mut() {
            None => Answer::NotSent,
            Some(c) => attempt(c, &key, &call).await,
        };
        let complete = t0.elapsed().as_nanos() as u64;
        match answer {
            Answer::Done(ret) => {
                match &ret {
                    Ret::Read(Some(v)) => last_seen[k as usize] = v.revision,
                    Ret::Written(rev) | Ret::CasOk(rev) => last_seen[k as usize] = *rev,
                    Ret::Read(None) => last_seen[k as usize] = 0,
                    _ => {}
                }
                history.push(Op { client: id, key, call, ret, invoke, complete: Some(complete) });
            }
            Answer::Unknown => {
                if !matches!(call, Call::Read) {
                    history.push(Op { client: id, key, call, ret: Ret::Indeterminate, invoke, complete: None });
                }
                conn = None;
                server = (server + 1) % servers.len();
            }
            Answer::NotSent => {
                conn = None;
                server = (server + 1) % servers.len();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..20))).await;
    }
    history
}

async fn attempt(c: &mut ObjectServiceClient<Channel>, key: &str, call: &Call) -> Answer {
    match call {
        Call::Read => match c.get(GetRequest { kind: KIND.into(), name: key.into(), stale: false }).await {
            Ok(r) => match r.into_inner().object {
                Some(o) => Answer::Done(Ret::Read(Some(Versioned {
                    value: o.labels.get("v").cloned().unwrap_or_default(),
                    revision: o.revision,
                }))),
                None => Answer::Done(Ret::Read(None)),
            },
            Err(s) if s.code() == Code::NotFound => Answer::Done(Ret::Read(None)),
            Err(_) => Answer::Unknown,
        },
        Call::Write { value } | Call::Cas { value, .. } => {
            let (expected_revision, cas) = match call {
                Call::Cas { expected_revision, .. } => (Some(*expected_revision), true),
                _ => (None, false),
            };
            let req = ApplyRequest { manifest: manifest(key, value), expected_revision };
            match c.apply(req).await {
                Ok(r) => match r.into_inner().object {
                    Some(o) if cas => Answer::Done(Ret::CasOk(o.revision)),
                    Some(o) => Answer::Done(Ret::Written(o.revision)),
                    None => Answer::Unknown,
                },
                Err(s) if s.code() == Code::FailedPrecondition && s.message().starts_with("cluster.conflict") => {
                    Answer::Done(Ret::CasConflict)
                }
                Err(_) => Answer::Unknown,
            }
        }
        _ => Answer::Unknown,
    }
}

/// A final read of every key (after healing), through any server that answers.
pub async fn final_reads(dialer: &Dialer, servers: &[String], keys: u32, t0: Instant) -> Vec<Op> {
    let mut out = Vec::new();
    for k in 0..keys {
        let key = key_name(k);
        for _attempt in 0..20 {
            let mut done = None;
            for s in servers {
                if let Some(mut c) = connect(dialer, s).await {
                    let invoke = t0.elapsed().as_nanos() as u64;
                    if let Answer::Done(ret) = attempt(&mut c, &key, &Call::Read).await {
                        done = Some(Op {
                            client: u32::MAX,
                            key: key.clone(),
                            call: Call::Read,
                            ret,
                            invoke,
                            complete: Some(t0.elapsed().as_nanos() as u64),
                        });
                        break;
                    }
                }
            }
            if let Some(op) = done {
                out.push(op);
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    out
}
