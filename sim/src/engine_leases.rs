//! The engine's side of P/D disaggregation (vLLM's NIXL scheduler, producer side): a
//! finished `do_remote_decode` request's blocks stay held under a lease keyed by its
//! request id; a side-channel pull hands their tokens over and frees them; a lease that
//! runs out (`kv_lease_duration`, simulated seconds) frees them and counts
//! `vllm:nixl_num_kv_expired_reqs`.

use tokio::time::Instant;

use super::Engine;
use crate::pd::HeldKv;
use crate::scheduler::SeqId;
use crate::side_channel::{self, Refusal};

/// A held prefill's KV, pullable until `expires` (simulated seconds).
#[derive(Debug)]
pub(super) struct Lease {
    pub(super) seq: SeqId,
    pub(super) expires: f64,
}

/// Leases remembered after they end, so a late or second pull hears why.
const GONE_LEASES_KEPT: usize = 4096;

impl Engine {
    /// Leases the KV a finished `hold` request left (P/D prefill); what its answer names.
    pub(super) fn lease(&mut self, id: SeqId) -> Option<HeldKv> {
        let key = self.ctxs.get_mut(&id)?.hold.take()?;
        let held = self.sched.held(id)?;
        let kv = HeldKv { block_ids: held.block_ids().to_vec(), num_tokens: held.tokens.len() as u32 };
        let lease_s = self.cfg.kv_transfer.as_ref().map_or(crate::pd::DEFAULT_LEASE_S, |k| k.lease_s);
        if let Some(old) = self.leases.insert(key, Lease { seq: id, expires: self.now + lease_s }) {
            self.sched.release_held(old.seq); // a reused request id: the older KV goes
        }
        Some(kv)
    }

    /// Frees held KV whose lease has run out (vLLM's `vllm:nixl_num_kv_expired_reqs`).
    pub(super) fn expire_leases(&mut self) {
        if self.leases.is_empty() {
            return;
        }
        let now = self.now.max(self.clock.at(Instant::now()));
        let expired: Vec<String> =
            self.leases.iter().filter(|(_, l)| l.expires <= now).map(|(k, _)| k.clone()).collect();
        for key in expired {
            if let Some(l) = self.leases.remove(&key) {
                self.sched.release_held(l.seq);
                tracing::debug!(request_id = %key, "P/D lease expired; held KV freed");
                self.metrics.lock().unwrap_or_else(|p| p.into_inner()).nixl.kv_expired += 1;
                self.remember_gone(key, "lease_expired");
            }
        }
    }

    fn remember_gone(&mut self, key: String, why: &'static str) {
        if self.gone.len() >= GONE_LEASES_KEPT {
            self.gone.pop_front();
        }
        self.gone.push_back((key, why));
    }

    /// Answers a side-channel pull: the held tokens (and frees their blocks) or why not.
    pub(super) fn pull(&mut self, ask: side_channel::Ask) -> Result<Vec<u32>, Refusal> {
        let own = self.cfg.kv_transfer.as_ref().map(|k| k.engine_id.as_str());
        if own != Some(ask.engine_id.as_str()) {
            return Err(Refusal {
                code: "engine_id_mismatch",
                message: format!("this engine is {:?}, not {:?}", own.unwrap_or(""), ask.engine_id),
            });
        }
        let Some(lease) = self.leases.get(&ask.request_id) else {
            let why = self.gone.iter().rev().find(|(k, _)| *k == ask.request_id).map(|(_, w)| *w);
            return Err(match why {
                Some(code) => {
                    Refusal { code, message: format!("request {:?}: {}", ask.request_id, code.replace('_', " ")) }
                }
                None => Refusal {
                    code: "unknown_request",
                    message: format!("no KV is held for request {:?}", ask.request_id),
                },
            });
        };
        let seq = lease.seq;
        let Some(held) = self.sched.held(seq) else {
            self.leases.remove(&ask.request_id);
            return Err(Refusal {
                code: "unknown_request",
                message: format!("no KV is held for request {:?}", ask.request_id),
            });
        };
        if held.block_ids() != ask.block_ids.as_slice() {
            return Err(Refusal {
                code: "block_ids_mismatch",
                message: format!(
                    "request {:?} holds blocks {:?}, not {:?}",
                    ask.request_id,
                    held.block_ids(),
                    ask.block_ids
                ),
            });
        }
        let tokens = held.tokens.clone();
        self.leases.remove(&ask.request_id);
        self.sched.release_held(seq);
        self.remember_gone(ask.request_id, "already_pulled");
        Ok(tokens)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::sync::{mpsc, oneshot};

    use crate::config::SimArgs;
    use crate::engine::{Command, Engine, Event, Submission};
    use crate::faults::Faults;
    use crate::lora::Registry;
    use crate::metrics::Metrics;
    use crate::side_channel::{Ask, Refusal};

    async fn pull(tx: &mpsc::UnboundedSender<Command>, ask: Ask) -> Result<Vec<u32>, Refusal> {
        let (reply, rx) = oneshot::channel();
        tx.send(Command::Pull { ask, reply }).unwrap();
        rx.await.unwrap()
    }

    /// A held prefill's lease: pullable once before it runs out, then refused as expired.
    #[tokio::test(start_paused = true)]
    async fn a_lease_frees_the_held_kv_when_it_runs_out() {
        let cfg = SimArgs {
            kv_transfer_config: Some(
                r#"{"kv_connector":"NixlConnector","kv_role":"kv_both","engine_id":"e",
                    "kv_connector_extra_config":{"kv_lease_duration":10}}"#
                    .into(),
            ),
            speedup: 2.0,
            ..SimArgs::default()
        }
        .validate()
        .unwrap();
        let metrics = Arc::new(Mutex::new(Metrics::new(&cfg.model, cfg.max_model_len, None)));
        let engine =
            Engine::new(cfg.clone(), metrics.clone(), Arc::new(Registry::new(true, 16)), Arc::new(Faults::new()));
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(engine.run(rx));
        let mut held = Vec::new();
        for id in ["a", "b"] {
            let (reply, mut events) = crate::mailbox::channel();
            let sub = Submission {
                id: u64::from(id.as_bytes()[0]),
                prompt: (0..40).collect(),
                max_tokens: 1,
                ignore_eos: true,
                seed: Some(1),
                lora: None,
                stop: Vec::new(),
                stream: false,
                reply,
                received: tokio::time::Instant::now(),
                external_tokens: 0,
                hold: Some(id.into()),
            };
            tx.send(Command::Submit(Box::new(sub))).unwrap();
            let Some(Event::Done(done)) = events.recv().await else { panic!("no answer") };
            let kv = done.held.expect("held KV");
            assert_eq!((kv.num_tokens, kv.block_ids.len()), (40, 3));
            held.push(kv);
        }
        let ask =
            |id: &str, blocks: &[u32]| Ask { engine_id: "e".into(), request_id: id.into(), block_ids: blocks.to_vec() };
        let usage = || metrics.lock().unwrap().kv_usage;
        assert!(usage() > 0.0);
        // "a" is pulled at once: its tokens, then refused as already pulled
        assert_eq!(pull(&tx, ask("a", &held[0].block_ids)).await.unwrap(), (0..40).collect::<Vec<u32>>());
        assert_eq!(pull(&tx, ask("a", &held[0].block_ids)).await.unwrap_err().code, "already_pulled");
        // "b" waits: 4.9 wall seconds (9.8 simulated) in, still held
        tokio::time::sleep(std::time::Duration::from_millis(4900)).await;
        assert_eq!(metrics.lock().unwrap().nixl.kv_expired, 0);
        assert!(usage() > 0.0);
        // past 10 simulated seconds the idle engine frees it by itself
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(metrics.lock().unwrap().nixl.kv_expired, 1);
        assert_eq!(usage(), 0.0);
        assert_eq!(pull(&tx, ask("b", &held[1].block_ids)).await.unwrap_err().code, "lease_expired");
        let _ = tx.send(Command::Shutdown);
    }
}
