//! The gateway's tokenizer (`flotilla_gateway::hf_tokenizer`) against the live engine's
//! `POST /tokenize`: the recorded sample inputs plus generated ones, as completion prompts
//! and as chats, loaded from the model directory the engine serves.

use anyhow::{ensure, Context as _};
use serde_json::{json, Value};

use flotilla_gateway::hf_tokenizer::HfTokenizer;
use flotilla_testkit::http;

use crate::install::RealVllm;

pub async fn matches_live_tokenize(s: &str, install: &RealVllm) -> anyhow::Result<()> {
    let tok = HfTokenizer::load(&install.model()).map_err(anyhow::Error::msg)?;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../gateway/tests/data/tiny-llama-tokenizer/tokenize-samples.json");
    let samples: Value = serde_json::from_str(&std::fs::read_to_string(path).context(path)?)?;
    let mut prompts: Vec<String> = samples["prompts"]
        .as_array()
        .context("prompts")?
        .iter()
        .filter_map(|p| p["prompt"].as_str().map(str::to_owned))
        .collect();
    // Generated ones the recording does not hold: mixed scripts, digits, whitespace runs.
    let pieces = ["héllo", " 42", "\n\n", "😀", "  ", "東京", "don't", "x1y2", "\t", "Ωμέγα", "<|im_end|>"];
    for k in 0..20 {
        prompts.push((0..(k * 3 + 1)).map(|i| pieces[(i * 7 + k) % pieces.len()]).collect());
    }
    let mut chats: Vec<Vec<(String, String)>> = samples["chats"]
        .as_array()
        .context("chats")?
        .iter()
        .map(|c| serde_json::from_value(c["messages"].clone()))
        .collect::<Result<_, _>>()?;
    chats.extend(
        prompts
            .iter()
            .take(20)
            .map(|p| vec![("system".to_owned(), "Be brief.".to_owned()), ("user".to_owned(), p.clone())]),
    );

    let mut mismatches = Vec::new();
    for p in &prompts {
        let r = http::post(s, "/tokenize", json!({"model": "tiny", "prompt": p})).await?;
        ensure!(r.status == 200, "/tokenize {p:?}: {} {}", r.status, r.text());
        let engine: Vec<u32> = serde_json::from_value(r.json()?["tokens"].clone())?;
        let ours = tok.encode_text(p).map_err(anyhow::Error::msg)?;
        if engine != ours {
            mismatches.push(format!("prompt {p:?}: engine {engine:?}, ours {ours:?}"));
        }
    }
    for c in &chats {
        let messages: Vec<Value> = c.iter().map(|(role, content)| json!({"role": role, "content": content})).collect();
        let r = http::post(s, "/tokenize", json!({"model": "tiny", "messages": messages})).await?;
        ensure!(r.status == 200, "/tokenize {c:?}: {} {}", r.status, r.text());
        let engine: Vec<u32> = serde_json::from_value(r.json()?["tokens"].clone())?;
        let ours = tok.encode_chat(c).map_err(anyhow::Error::msg)?;
        if engine != ours {
            mismatches.push(format!("chat {c:?}: engine {engine:?}, ours {ours:?}"));
        }
    }
    ensure!(
        mismatches.is_empty(),
        "{} of {} differ:\n{}",
        mismatches.len(),
        prompts.len() + chats.len(),
        mismatches.join("\n")
    );
    Ok(())
}
