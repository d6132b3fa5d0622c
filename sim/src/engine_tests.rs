//! Tests of the step loop on tokio's paused clock: stop strings, the simulated clock, and
//! what LoRA loads and reloads cost in simulated time.

use super::*;
use crate::config::SimArgs;
use crate::latency::StepShape;

#[test]
fn stop_strings_match_across_pieces_and_utf8() {
    let stops = vec![" of the".to_string()];
    assert_eq!(stop_match("and of the cat", &stops, 0), Some(3));
    assert_eq!(stop_match("nothing", &stops, 0), None);
    assert_eq!(stop_match("é of the", &stops, 1), Some(2));
}

#[test]
fn clock_maps_simulated_seconds_with_speedup() {
    let c = SimClock::new(10.0);
    let t = c.instant(5.0);
    assert!((c.at(t) - 5.0).abs() < 1e-6);
}

struct Running {
    tx: mpsc::UnboundedSender<Command>,
    metrics: Arc<Mutex<Metrics>>,
    cfg: EngineConfig,
}

fn spawn(args: SimArgs) -> Running {
    let cfg = args.validate().unwrap();
    let metrics = Arc::new(Mutex::new(Metrics::new(&cfg.model, cfg.max_model_len, Some(cfg.max_loras))));
    let registry = Arc::new(Registry::new(true, cfg.max_lora_rank));
    let engine = Engine::new(cfg.clone(), metrics.clone(), registry, Arc::new(Faults::new()));
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(engine.run(rx));
    Running { tx, metrics, cfg }
}

impl Running {
    async fn load(&self, id: u32, rank: u32, inplace: bool) {
        let (done, loaded) = oneshot::channel();
        self.tx.send(Command::LoadLora { lora: LoraRef { id, rank }, inplace, done }).unwrap();
        loaded.await.unwrap();
    }

    /// Runs one request of `prompt` with `lora` to its end; its TTFT in simulated seconds.
    async fn ttft(&self, id: SeqId, lora: Option<LoraRef>, prompt: Vec<u32>) -> f64 {
        let before = self.metrics.lock().unwrap().h_ttft.sum();
        let (reply, mut rx) = crate::mailbox::channel();
        let sub = Submission {
            id,
            prompt,
            max_tokens: 1,
            ignore_eos: true,
            seed: Some(1),
            lora,
            stop: Vec::new(),
            stream: false,
            reply,
            received: Instant::now(),
            external_tokens: 0,
            hold: None,
        };
        self.tx.send(Command::Submit(Box::new(sub))).unwrap();
        while let Some(ev) = rx.recv().await {
            if let Event::Done(d) = ev {
                assert_eq!(d.reason, FinishReason::Length);
                break;
            }
        }
        self.metrics.lock().unwrap().h_ttft.sum() - before
    }
}

fn args(speedup: f64, max_loras: u32, max_cpu_loras: u32) -> SimArgs {
    SimArgs { speedup, max_loras, max_cpu_loras: Some(max_cpu_loras), ..SimArgs::default() }
}

#[tokio::test(start_paused = true)]
async fn load_takes_the_modelled_time_divided_by_speedup() {
    for speedup in [1.0, 10.0] {
        let e = spawn(args(speedup, 1, 2));
        let p = e.cfg.profile;
        let t0 = Instant::now();
        e.load(1, 16, false).await;
        let took = t0.elapsed().as_secs_f64();
        let want = (p.lora_load_s(16) + p.lora_copy_s(16)) / speedup;
        assert!((took - want).abs() < 0.002, "speedup {speedup}: took {took}, want {want}");
        // an in-place reload reads the disk again
        let t1 = Instant::now();
        e.load(1, 16, true).await;
        assert!((t1.elapsed().as_secs_f64() - want).abs() < 0.002);
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_for_an_evicted_adapter_succeeds_and_its_ttft_includes_the_reload() {
    let e = spawn(args(1.0, 1, 2));
    let p = e.cfg.profile;
    for id in 1..=3 {
        e.load(id, 16, false).await; // CPU cache ends as [2, 3]: adapter 1 was evicted
    }
    let a = Some(LoraRef { id: 1, rank: 16 });
    let evicted = e.ttft(1, a, vec![7; 32]).await;
    let cached = e.ttft(2, a, vec![8; 32]).await;
    let step = p.step_time(StepShape { prefill_tokens: 32, kv_blocks: 2, loras: 1, ..StepShape::default() }, 16);
    assert!((cached - step).abs() < 1e-6, "cached {cached}, step {step}");
    let reload = p.lora_load_s(16) + p.lora_copy_s(16);
    assert!((evicted - (step + reload)).abs() < 1e-6, "evicted {evicted}, want {}", step + reload);
    // 1's reload evicted 2 from the CPU cache and took 3's GPU slot: 3 pays the copy only
    let b = Some(LoraRef { id: 3, rank: 16 });
    let copied = e.ttft(3, b, vec![9; 32]).await;
    assert!((copied - (step + p.lora_copy_s(16))).abs() < 1e-6, "copied {copied}");
}

#[tokio::test(start_paused = true)]
async fn requests_without_adapters_pay_nothing() {
    let e = spawn(args(1.0, 1, 1));
    e.load(1, 16, false).await;
    let base = e.ttft(1, None, vec![5; 32]).await;
    let step = e.cfg.profile.step_time(StepShape { prefill_tokens: 32, kv_blocks: 2, ..StepShape::default() }, 16);
    assert!((base - step).abs() < 1e-6, "{base} vs {step}");
}
