//! The step loop: one tokio task per engine that owns the [`Scheduler`], runs one step at a
//! time, sleeps each step's simulated duration (divided by `--speedup`), then hands tokens
//! to the requests' channels ([`crate::mailbox`]) and updates the metrics. It sleeps on its
//! command channel when idle and on the fault switch when stalled; it never busy-waits.
//!
//! ```text
//!  HTTP handlers --Command::Submit--> [ drain | schedule | sleep(dt) | complete | deliver ] --Event--> handlers
//! ```
//!
//! Simulated time runs on a virtual clock advanced by each step's duration; sleeps target
//! `start + sim_time / speedup`, so timer granularity never changes simulated results and
//! the engine catches up after a late wake-up. Metrics are in simulated seconds.
//!
//! LoRA adapters move through [`LoraCache`]: `Command::LoadLora` (vLLM's `add_lora` utility
//! call) runs between steps and holds the loop for its simulated time, as vLLM's engine core
//! runs utility calls in its busy loop; a step whose batch needs an adapter that is not in
//! the CPU cache or not in a GPU slot takes that much longer.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::config::EngineConfig;
use crate::faults::Faults;
use crate::id_map::IdMap;
use crate::kv::BlockManager;
use crate::lora::{LoraRef, Registry};
use crate::lora_cache::LoraCache;
use crate::mailbox;
use crate::metrics::Metrics;
use crate::pd::HeldKv;
use crate::scheduler::{FinishReason, Limits, NewSeq, Output, Scheduler, SeqId, StepPlan, Summary};
use crate::side_channel;
use crate::text;
use leases::Lease;

/// A request handed to the engine.
#[derive(Debug)]
pub struct Submission {
    /// Unique id.
    pub id: SeqId,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// Never end at the model's end-of-sequence.
    pub ignore_eos: bool,
    /// Seed of the text; None derives one from the prompt.
    pub seed: Option<u64>,
    /// Adapter, if any.
    pub lora: Option<LoraRef>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Send each token as it comes (else only the final text).
    pub stream: bool,
    /// Where events go.
    pub reply: mailbox::Sender<Event>,
    /// When the HTTP layer received it.
    pub received: Instant,
    /// Leading prompt tokens whose KV was pulled from a prefill engine (P/D decode).
    pub external_tokens: usize,
    /// P/D prefill: hold the KV when finished, leased under this request id.
    pub hold: Option<String>,
}

/// What a request hears back.
#[derive(Debug)]
pub enum Event {
    /// One more piece of text (streaming only).
    Token(Cow<'static, str>),
    /// The end; carries the final piece (streaming) or the whole text (otherwise). Boxed so
    /// that a channel slot, written once per streamed token, stays small.
    Done(Box<Done>),
}

/// How a request ended.
#[derive(Debug)]
pub struct Done {
    /// Why.
    pub reason: FinishReason,
    /// Streaming: text of the last token, if any; otherwise: the whole text.
    pub text: String,
    /// The stop string that ended the request (vLLM's `stop_reason`), if one did.
    pub stop_reason: Option<String>,
    /// Token counts.
    pub summary: Summary,
    /// P/D prefill: the KV held for a decode engine (its lease runs from now).
    pub held: Option<HeldKv>,
}

/// Messages to the engine task.
#[derive(Debug)]
pub enum Command {
    /// A new request.
    Submit(Box<Submission>),
    /// Load an adapter into the CPU cache and a GPU slot (`add_lora`); `done` is answered
    /// after the load's simulated time.
    LoadLora {
        /// The adapter.
        lora: LoraRef,
        /// Reload even if cached (`load_inplace`).
        inplace: bool,
        /// Answered when loaded.
        done: oneshot::Sender<()>,
    },
    /// A decode engine pulls a held prefill's KV (the side channel): on success the token
    /// ids, and the blocks are freed.
    Pull {
        /// What it asks for.
        ask: side_channel::Ask,
        /// The answer.
        reply: oneshot::Sender<Result<Vec<u32>, side_channel::Refusal>>,
    },
    /// Abort everything and stop.
    Shutdown,
}

/// Simulated time against the tokio clock.
#[derive(Debug, Clone, Copy)]
pub struct SimClock {
    start: Instant,
    speedup: f64,
}

impl SimClock {
    /// A clock starting now.
    pub fn new(speedup: f64) -> Self {
        SimClock { start: Instant::now(), speedup }
    }

    /// Simulated seconds at `t`.
    pub fn at(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.start).as_secs_f64() * self.speedup
    }

    /// The instant simulated second `s` falls on.
    pub fn instant(&self, s: f64) -> Instant {
        self.start + std::time::Duration::from_secs_f64((s / self.speedup).max(0.0))
    }
}

struct Ctx {
    reply: mailbox::Sender<Event>,
    stream: bool,
    stop: Vec<String>,
    stop_reason: Option<String>,
    text: String,
    max_tokens: u32,
    arrival: f64,
    scheduled: Option<f64>,
    first_token: Option<f64>,
    last_token: f64,
    hold: Option<String>,
}

/// The engine task's state.
pub struct Engine {
    cfg: EngineConfig,
    sched: Scheduler,
    ctxs: IdMap<Ctx>,
    metrics: Arc<Mutex<Metrics>>,
    registry: Arc<Registry>,
    faults: Arc<Faults>,
    clock: SimClock,
    now: f64,
    lora_running: Vec<u32>,
    lora_waiting: Vec<u32>,
    lora_seen: (Vec<u32>, Vec<u32>),
    lora_cache: LoraCache,
    dead: Vec<SeqId>,
    /// Where each step's KV cache events go (`--kv-events-config`).
    kv_events: Option<crate::kv_publisher::KvPublisher>,
    /// P/D: held prefills by request id, and recently ended leases with why they ended.
    leases: HashMap<String, Lease>,
    gone: std::collections::VecDeque<(String, &'static str)>,
}

impl Engine {
    /// An idle engine.
    pub fn new(cfg: EngineConfig, metrics: Arc<Mutex<Metrics>>, registry: Arc<Registry>, faults: Arc<Faults>) -> Self {
        let limits = Limits {
            max_num_seqs: cfg.max_num_seqs as usize,
            max_num_batched_tokens: cfg.max_num_batched_tokens as usize,
            max_loras: cfg.max_loras as usize,
            max_model_len: cfg.max_model_len as usize,
        };
        let kv = BlockManager::new(cfg.num_blocks, cfg.block_size, cfg.prefix_caching);
        Engine {
            lora_cache: LoraCache::new(cfg.profile, cfg.max_cpu_loras, cfg.max_loras),
            clock: SimClock::new(cfg.speedup),
            sched: Scheduler::new(limits, kv),
            cfg,
            ctxs: IdMap::default(),
            metrics,
            registry,
            faults,
            now: 0.0,
            lora_running: Vec::new(),
            lora_waiting: Vec::new(),
            lora_seen: (Vec::new(), Vec::new()),
            dead: Vec::new(),
            kv_events: None,
            leases: HashMap::new(),
            gone: std::collections::VecDeque::new(),
        }
    }

    /// Publishes KV cache events through `publisher` (None: records none).
    pub fn with_kv_events(mut self, publisher: Option<crate::kv_publisher::KvPublisher>) -> Self {
        if publisher.is_some() {
            self.sched.kv_mut().enable_events();
        }
        self.kv_events = publisher;
        self
    }

    /// Runs until [`Command::Shutdown`] or until every sender is gone.
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        let mut plan = StepPlan::default();
        let mut outputs = Vec::new();
        loop {
            loop {
                match rx.try_recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd).await {
                            return;
                        }
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return self.abort_all(),
                }
            }
            self.reap_closed();
            self.expire_leases();
            if self.sched.is_idle() || self.faults.stalled() {
                self.publish_gauges();
                let stalled = self.faults.stalled() && !self.sched.is_idle();
                let next_expiry = self.leases.values().map(|l| l.expires).reduce(f64::min);
                tokio::select! {
                    cmd = rx.recv() => match cmd {
                        Some(cmd) => {
                            self.now = self.now.max(self.clock.at(Instant::now()));
                            if !self.handle(cmd).await {
                                return;
                            }
                        }
                        None => return self.abort_all(),
                    },
                    _ = self.faults.wait_unstalled(), if stalled => {}
                    _ = tokio::time::sleep_until(self.clock.instant(next_expiry.unwrap_or(0.0))), if next_expiry.is_some() => {}
                }
                self.now = self.now.max(self.clock.at(Instant::now()));
                continue;
            }
            self.sched.schedule(&mut plan);
            if plan.is_empty() {
                // Cannot happen with validated limits; never spin if it does.
                tracing::error!(waiting = self.sched.num_waiting(), "scheduler made no progress");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
            let lora_s = self.apply_loras();
            let step = self.cfg.layout.step_time(self.cfg.profile, plan.shape, self.cfg.block_size);
            let dt = step * self.faults.slow_factor() + lora_s;
            let step_start = self.now;
            self.now += dt;
            let deadline = self.clock.instant(self.now);
            if deadline > Instant::now() {
                tokio::time::sleep_until(deadline).await;
            } else {
                tokio::task::yield_now().await;
            }
            outputs.clear();
            self.sched.complete(&plan, &mut outputs);
            if let Some(p) = &self.kv_events {
                if !p.publish(self.sched.kv_mut().take_events()) {
                    tracing::warn!("KV event publisher behind: a step's events dropped");
                }
            }
            self.deliver(step_start, &plan, &outputs);
        }
    }

    /// Brings the batch's adapters into the CPU cache and GPU slots; the seconds it takes.
    fn apply_loras(&mut self) -> f64 {
        let batch = self.sched.batch_loras();
        if batch.is_empty() {
            return 0.0;
        }
        let m = self.lora_cache.apply(batch);
        if m.disk_loads > 0 {
            tracing::debug!(
                disk_loads = m.disk_loads,
                gpu_copies = m.gpu_copies,
                seconds = m.seconds,
                "step reloads lora adapters"
            );
        }
        m.seconds
    }

    /// Sleeps until the virtual clock's `now`.
    async fn sleep_to_now(&self) {
        let deadline = self.clock.instant(self.now);
        if deadline > Instant::now() {
            tokio::time::sleep_until(deadline).await;
        }
    }

    async fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Shutdown => {
                self.abort_all();
                false
            }
            Command::LoadLora { lora, inplace, done } => {
                let m = self.lora_cache.load(lora.id, lora.rank, inplace);
                self.now += m.seconds;
                self.sleep_to_now().await;
                let _ = done.send(());
                true
            }
            Command::Pull { ask, reply } => {
                self.expire_leases();
                let _ = reply.send(self.pull(ask));
                self.publish_gauges();
                true
            }
            Command::Submit(sub) => {
                let seed = sub.seed.unwrap_or_else(|| text::seed_from_prompt(self.cfg.seed, &sub.prompt));
                let (lo, hi) = self.cfg.eos_range;
                let eos_after = (!sub.ignore_eos).then(|| text::natural_length(seed, lo, hi));
                let arrival = self.clock.at(sub.received).min(self.now);
                if let Some(l) = sub.lora {
                    self.lora_cache.note(l.id, l.rank);
                }
                self.ctxs.insert(
                    sub.id,
                    Ctx {
                        reply: sub.reply,
                        stream: sub.stream,
                        stop: sub.stop,
                        stop_reason: None,
                        text: String::new(),
                        max_tokens: sub.max_tokens,
                        arrival,
                        scheduled: None,
                        first_token: None,
                        last_token: arrival,
                        hold: sub.hold.clone(),
                    },
                );
                self.sched.add(NewSeq {
                    id: sub.id,
                    prompt: sub.prompt,
                    max_tokens: sub.max_tokens,
                    eos_after,
                    seed,
                    lora: sub.lora.map(|l| l.id),
                    external_tokens: sub.external_tokens,
                    hold_kv: sub.hold.is_some(),
                });
                true
            }
        }
    }

    /// Aborts requests whose client went away.
    fn reap_closed(&mut self) {
        self.dead.clear();
        self.dead.extend(self.ctxs.iter().filter(|(_, c)| c.reply.is_closed()).map(|(id, _)| *id));
        let mut m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        for id in std::mem::take(&mut self.dead) {
            self.ctxs.remove(&id);
            if self.sched.abort(id).is_some() {
                m.success[2] += 1;
                tracing::debug!(seq = id, "client went away; request aborted");
            }
        }
    }

    fn abort_all(&mut self) {
        let mut m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        for (id, ctx) in self.ctxs.drain() {
            if let Some(summary) = self.sched.abort(id) {
                m.success[2] += 1;
                let _ = ctx.reply.send(Event::Done(Box::new(Done {
                    reason: FinishReason::Abort,
                    text: String::new(),
                    stop_reason: None,
                    summary,
                    held: None,
                })));
            }
        }
    }

    fn deliver(&mut self, step_start: f64, plan: &StepPlan, outputs: &[Output]) {
        let now = self.now;
        let metrics = Arc::clone(&self.metrics);
        let mut m = metrics.lock().unwrap_or_else(|p| p.into_inner());
        m.prefix_queries += plan.prefix_queries;
        m.prefix_hits += plan.prefix_hits;
        m.external_queries += plan.external_queries;
        m.external_hits += plan.external_hits;
        m.preemptions += plan.preempted.len() as u64;
        m.h_iteration_tokens.observe(f64::from(plan.shape.prefill_tokens + plan.shape.decode_seqs));
        for (id, _, first) in &plan.admitted {
            if let (true, Some(ctx)) = (*first, self.ctxs.get_mut(id)) {
                ctx.scheduled = Some(step_start);
            }
        }
        for (i, out) in outputs.iter().enumerate() {
            match *out {
                Output::Token { id, index, piece } => {
                    m.generation_tokens += 1;
                    let Some(ctx) = self.ctxs.get_mut(&id) else {
                        continue;
                    };
                    if index == 0 {
                        ctx.first_token = Some(now);
                        m.h_ttft.observe(now - ctx.arrival);
                    } else {
                        m.h_itl.observe(now - ctx.last_token);
                    }
                    ctx.last_token = now;
                    let finishing =
                        matches!(outputs.get(i + 1), Some(Output::Finished { id: next, .. }) if *next == id);
                    let old_len = ctx.text.len();
                    if !ctx.stream || !ctx.stop.is_empty() {
                        ctx.text.push_str(piece);
                    }
                    if let Some(cut) = stop_match(&ctx.text, &ctx.stop, old_len.saturating_sub(max_len(&ctx.stop))) {
                        let visible = if cut > old_len { piece[..cut - old_len].to_string() } else { String::new() };
                        ctx.stop_reason = ctx.stop.iter().find(|s| ctx.text[cut..].starts_with(s.as_str())).cloned();
                        ctx.text.truncate(cut);
                        if let Some(summary) = self.sched.finish(id) {
                            let held = self.lease(id);
                            finish(&mut m, &mut self.ctxs, id, FinishReason::Stop, summary, now, Some(visible), held);
                        }
                        continue;
                    }
                    if ctx.stream && !finishing {
                        // a closed channel is reaped before the next step
                        let _ = ctx.reply.send(Event::Token(Cow::Borrowed(piece)));
                    }
                    if ctx.stream && finishing {
                        ctx.text.clear();
                        ctx.text.push_str(piece);
                    }
                }
                Output::Finished { id, reason, summary } => {
                    let held = self.lease(id);
                    finish(&mut m, &mut self.ctxs, id, reason, summary, now, None, held);
                }
            }
        }
        drop(m);
        self.publish_gauges();
    }

    fn publish_gauges(&mut self) {
        if self.cfg.lora_enabled {
            self.sched.lora_sets(&mut self.lora_running, &mut self.lora_waiting);
        }
        let lora_changed = self.lora_seen.0 != self.lora_running || self.lora_seen.1 != self.lora_waiting;
        let names =
            lora_changed.then(|| (self.registry.names(&self.lora_running), self.registry.names(&self.lora_waiting)));
        let mut m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        m.running = self.sched.num_running() as u64;
        m.waiting = self.sched.num_waiting() as u64;
        m.deferred = self.sched.num_deferred() as u64;
        m.kv_usage = self.sched.kv().usage();
        if let (Some((run, wait)), Some(l)) = (names, m.lora.as_mut()) {
            l.1 = run;
            l.2 = wait;
            self.lora_seen.0.clone_from(&self.lora_running);
            self.lora_seen.1.clone_from(&self.lora_waiting);
        }
    }
}

fn max_len(stops: &[String]) -> usize {
    stops.iter().map(String::len).max().unwrap_or(0)
}

/// The byte offset where the first stop string starts, searching from `from`.
fn stop_match(text: &str, stops: &[String], from: usize) -> Option<usize> {
    let mut from = from.min(text.len());
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text[from..].find(s.as_str()).map(|p| p + from)).min()
}

#[allow(clippy::too_many_arguments)]
fn finish(
    m: &mut Metrics,
    ctxs: &mut IdMap<Ctx>,
    id: SeqId,
    reason: FinishReason,
    summary: Summary,
    now: f64,
    last_piece: Option<String>,
    held: Option<HeldKv>,
) {
    let Some(mut ctx) = ctxs.remove(&id) else {
        return;
    };
    let idx = match reason {
        FinishReason::Stop => 0,
        FinishReason::Length => 1,
        FinishReason::Abort => 2,
    };
    m.success[idx] += 1;
    let scheduled = ctx.scheduled.unwrap_or(ctx.arrival);
    let first = ctx.first_token.unwrap_or(now);
    let prompt = f64::from(summary.prompt_tokens);
    m.prompt_tokens += u64::from(summary.prompt_tokens);
    m.prompt_cached += u64::from(summary.cached_tokens);
    m.prompt_external += u64::from(summary.external_tokens);
    m.h_prompt_tokens.observe(prompt);
    m.h_generation_tokens.observe(f64::from(summary.output_tokens));
    m.h_max_generation_tokens.observe(f64::from(ctx.max_tokens));
    m.h_params_max_tokens.observe(f64::from(ctx.max_tokens));
    m.h_params_n.observe(1.0);
    m.h_e2e.observe(now - ctx.arrival);
    m.h_queue.observe(scheduled - ctx.arrival);
    m.h_inference.observe(now - scheduled);
    m.h_prefill.observe(first - scheduled);
    m.h_decode.observe(now - first);
    if summary.output_tokens > 1 {
        m.h_tpot.observe((ctx.last_token - first) / f64::from(summary.output_tokens - 1));
    }
    m.h_num_preemptions.observe(f64::from(summary.preemptions));
    m.h_prefill_kv_computed.observe(prompt - f64::from(summary.cached_tokens));
    let text = match (ctx.stream, last_piece) {
        (true, Some(piece)) => piece,
        (_, _) => std::mem::take(&mut ctx.text),
    };
    tracing::trace!(seq = id, reason = reason.as_str(), output_tokens = summary.output_tokens, "request finished");
    let stop_reason = ctx.stop_reason.take();
    let _ = ctx.reply.send(Event::Done(Box::new(Done { reason, text, stop_reason, summary, held })));
}

#[path = "engine_leases.rs"]
mod leases;

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
