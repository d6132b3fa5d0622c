//! The sim held to the live real vLLM: the same requests go to an in-process sim started
//! like the real server (`tiny`, max length 512, LoRA on, two slots of rank 8) and to S,
//! and what a client or the control plane can observe is compared by shape with
//! `flotilla_realvllm::shape`. Only the sim's `KNOWN_DIFFERENCES` may differ; any other
//! difference is listed in the failure, one per line.

use std::path::Path;

use flotilla_realvllm::shape::{self, Difference, KNOWN_DIFFERENCES};
use serde_json::{json, Value};

use flotilla_testkit::http::{self, Resp};

/// How an answer is compared.
#[derive(Clone, Copy)]
enum Compare {
    /// 200 with JSON of the same shape.
    Json,
    /// 200 with an SSE stream of the same structure.
    Sse,
    /// An error: same status, same error JSON shape and `type`/`param`/`code`.
    Error,
    /// Same status and exactly the same text (LoRA load/unload answers).
    Text,
}

fn chat(model: &str, extra: Value) -> Value {
    let mut v = json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                       "ignore_eos": true});
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    v
}

fn completion(extra: Value) -> Value {
    let mut v = json!({"model": "tiny", "prompt": "def f(", "max_tokens": 5, "ignore_eos": true});
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    v
}

/// The cases, in order (LoRA cases depend on the ones before them).
fn cases(adapter: &Path) -> Vec<(&'static str, &'static str, &'static str, Option<Value>, Compare)> {
    let usage = json!({"stream": true, "stream_options": {"include_usage": true}});
    let lora = |name: &str| json!({"lora_name": name, "lora_path": adapter.display().to_string()});
    vec![
        ("models without adapters", "GET", "/v1/models", None, Compare::Json),
        ("completion", "POST", "/v1/completions", Some(completion(json!({}))), Compare::Json),
        ("chat completion", "POST", "/v1/chat/completions", Some(chat("tiny", json!({}))), Compare::Json),
        ("completion stream with usage", "POST", "/v1/completions", Some(completion(usage.clone())), Compare::Sse),
        ("chat stream with usage", "POST", "/v1/chat/completions", Some(chat("tiny", usage)), Compare::Sse),
        (
            "chat stream without usage",
            "POST",
            "/v1/chat/completions",
            Some(chat("tiny", json!({"stream": true}))),
            Compare::Sse,
        ),
        ("tokenize", "POST", "/tokenize", Some(json!({"model": "tiny", "prompt": "hello world"})), Compare::Json),
        ("unknown model", "POST", "/v1/chat/completions", Some(chat("nope", json!({}))), Compare::Error),
        ("max_tokens -1", "POST", "/v1/completions", Some(completion(json!({"max_tokens": -1}))), Compare::Error),
        ("messages missing", "POST", "/v1/chat/completions", Some(json!({"model": "tiny"})), Compare::Error),
        ("load adapter", "POST", "/v1/load_lora_adapter", Some(lora("ad1")), Compare::Text),
        ("load adapter twice", "POST", "/v1/load_lora_adapter", Some(lora("ad1")), Compare::Error),
        (
            "load from a bad path",
            "POST",
            "/v1/load_lora_adapter",
            Some(json!({"lora_name": "ad2", "lora_path": "/definitely/not/here"})),
            Compare::Error,
        ),
        ("models with an adapter", "GET", "/v1/models", None, Compare::Json),
        ("chat to the adapter", "POST", "/v1/chat/completions", Some(chat("ad1", json!({}))), Compare::Json),
        ("unload adapter", "POST", "/v1/unload_lora_adapter", Some(json!({"lora_name": "ad1"})), Compare::Text),
        ("unload it again", "POST", "/v1/unload_lora_adapter", Some(json!({"lora_name": "ad1"})), Compare::Error),
        ("chat to the unloaded adapter", "POST", "/v1/chat/completions", Some(chat("ad1", json!({}))), Compare::Error),
    ]
}

fn diff(compare: Compare, sim: &Resp, real: &Resp) -> Vec<Difference> {
    let status = |want: u16| -> Vec<Difference> {
        [(sim.status, "sim"), (real.status, "real vLLM")]
            .into_iter()
            .filter(|(s, _)| *s != want)
            .map(|(s, who)| Difference { path: "status".into(), what: format!("{who} answered {s}, not {want}") })
            .collect()
    };
    let parse = |r: &Resp| serde_json::from_slice::<Value>(&r.body).unwrap_or(Value::Null);
    match compare {
        Compare::Json => {
            let mut d = status(200);
            d.extend(shape::json_shape_diff("$", &parse(sim), &parse(real), KNOWN_DIFFERENCES));
            d
        }
        Compare::Sse => {
            let mut d = status(200);
            d.extend(shape::sse_diff(&sim.text(), &real.text(), KNOWN_DIFFERENCES));
            d
        }
        Compare::Error => shape::error_diff(sim.status, &sim.text(), real.status, &real.text()),
        Compare::Text if (sim.status, sim.text()) == (real.status, real.text()) => Vec::new(),
        Compare::Text => vec![Difference {
            path: "body".into(),
            what: format!("sim {} {:?}, real vLLM {} {:?}", sim.status, sim.text(), real.status, real.text()),
        }],
    }
}

/// Runs every case against both and compares `/metrics` after the traffic.
pub async fn sim_matches_real(s: &str, adapter: &Path) -> anyhow::Result<()> {
    let args = flotilla_sim::SimArgs {
        port: 0,
        model: "tiny".into(),
        max_model_len: 512,
        max_loras: 2,
        max_lora_rank: 8,
        speedup: 1000.0,
        ..flotilla_sim::SimArgs::default()
    };
    let sim = flotilla_sim::start(args).await.map_err(|e| anyhow::anyhow!("sim: {e}"))?;
    let sim_addr = sim.local_addr().to_string();
    let mut found = Vec::new();
    for (name, method, path, body, compare) in cases(adapter) {
        let a = http::send(method, &sim_addr, path, body.as_ref(), &[]).await?;
        let b = http::send(method, s, path, body.as_ref(), &[]).await?;
        found.extend(diff(compare, &a, &b).into_iter().map(|d| format!("{name}: {d}")));
    }
    let (sm, rm) = (http::get(&sim_addr, "/metrics").await?, http::get(s, "/metrics").await?);
    let mut families: Vec<String> = shape::CONTROL_PLANE_FAMILIES.iter().map(|f| f.to_string()).collect();
    families.extend(shape::family_names(&sm.text()));
    let names: Vec<&str> = families.iter().map(String::as_str).collect();
    found.extend(
        shape::metrics_diff(&sm.text(), &rm.text(), &names, KNOWN_DIFFERENCES)
            .into_iter()
            .map(|d| format!("/metrics: {d}")),
    );
    let missing: Vec<String> = shape::missing_families(&sm.text(), &rm.text())
        .into_iter()
        .filter(|f| shape::known(&format!("metric:{f}"), KNOWN_DIFFERENCES).is_none())
        .collect();
    if !missing.is_empty() {
        found.push(format!("/metrics: families the sim lacks with no known difference: {missing:?}"));
    }
    anyhow::ensure!(found.is_empty(), "the sim differs from real vLLM:\n  {}", found.join("\n  "));
    Ok(())
}

/// Streams on S and on a sim at speedup 1: each stream's shape (its events in order and what
/// each carries: `role | token×3 | token+finish | usage | done`) must be the same on both,
/// and the real engine's must match the recording the stored-sample suite holds the sim to
/// (`FLOTILLA_RECORD_SAMPLES=1` rewrites it); and on both the role chunk comes with the first
/// token, not ahead of prefill (its arrival at least half the time to the first token).
pub async fn stream_timing_matches_real(s: &str) -> anyhow::Result<()> {
    use flotilla_realvllm::streams::{self, RECORDING};
    use flotilla_testkit::sse_timeline::{coalesced_from, record, role_lead, shape};
    let args = flotilla_sim::SimArgs {
        port: 0,
        model: "tiny".into(),
        max_model_len: 512,
        speedup: 1.0,
        ..flotilla_sim::SimArgs::default()
    };
    let sim = flotilla_sim::start(args).await.map_err(|e| anyhow::anyhow!("sim: {e}"))?;
    let sim_addr = sim.local_addr().to_string();
    let recording_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(RECORDING);
    let recorded = streams::parse_recording(&std::fs::read_to_string(&recording_path).unwrap_or_default());
    let mut rewrite = String::from(
        "# Chunk timing shapes of real vLLM 0.32 (CPU, tiny-llama served as `tiny`), recorded by the\n\
         # real-engine tier with FLOTILLA_RECORD_SAMPLES=1: the events in order, what each carries\n\
         # (see flotilla_testkit::sse_timeline::shape). `# ms` lines give each event's arrival after the request was sent.\n",
    );
    let mut failures = Vec::new();
    let mut rewrite_ok = true;
    for (name, path, body) in streams::streams("tiny") {
        let _warm = record(s, path, &body).await;
        let real = record(s, path, &body).await;
        let simulated = record(&sim_addr, path, &body).await;
        let (real_shape, sim_shape) = (shape(&real), shape(&simulated));
        let ms = |t: &[flotilla_testkit::sse_timeline::Arrival]| {
            t.iter().map(|a| format!("{:.1}", a.at.as_secs_f64() * 1000.0)).collect::<Vec<_>>().join(" ")
        };
        println!("  {name}: real vLLM {real_shape} ({} ms); sim {sim_shape} ({} ms)", ms(&real), ms(&simulated));
        rewrite.push_str(&format!("{name}: {real_shape}\n# ms {}\n", ms(&real)));
        if !coalesced_from(&sim_shape, &real_shape) {
            failures.push(format!("{name}: real vLLM {real_shape:?}, sim {sim_shape:?}"));
        } else if real_shape != sim_shape {
            // vLLM merged token deltas (a loaded machine); a recording must not keep that
            println!("  {name}: real vLLM merged token deltas this time ({real_shape} for {sim_shape})");
            rewrite_ok = false;
        }
        for (who, t) in [("real vLLM", &real), ("sim", &simulated)] {
            if role_lead(t).is_some_and(|lead| lead < 0.5) {
                failures.push(format!("{name}: {who}'s role chunk came ahead of prefill: {}", ms(t)));
            }
        }
        match recorded.iter().find(|(n, _)| n == name) {
            Some((_, r)) if coalesced_from(r, &real_shape) => {}
            other => failures.push(format!(
                "{name}: real vLLM's shape {real_shape:?} is not the recording's {:?} in {RECORDING} \
                 (rerun the tier with FLOTILLA_RECORD_SAMPLES=1 to record it)",
                other.map(|(_, r)| r.as_str())
            )),
        }
    }
    let _ = sim.shutdown().await;
    if std::env::var("FLOTILLA_RECORD_SAMPLES").is_ok_and(|v| v == "1") {
        anyhow::ensure!(rewrite_ok, "not recording {RECORDING}: vLLM merged token deltas; record on an idle machine");
        std::fs::write(&recording_path, rewrite)?;
        println!("  recorded {}", recording_path.display());
        failures.retain(|f| !f.contains("recording"));
    }
    anyhow::ensure!(failures.is_empty(), "stream timing differs:\n{}", failures.join("\n"));
    Ok(())
}
