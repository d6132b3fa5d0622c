//! HfTokenizer against the real vLLM's `POST /tokenize` ids (recorded by
//! realvllm/record_tokenize.py into tests/data/tiny-llama-tokenizer), and its bad input.

use std::path::{Path, PathBuf};

use flotilla_gateway::hf_tokenizer::HfTokenizer;

fn tiny_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-llama-tokenizer")
}

fn samples() -> serde_json::Value {
    let text = std::fs::read_to_string(tiny_dir().join("tokenize-samples.json")).expect("samples");
    serde_json::from_str(&text).expect("samples json")
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    serde_json::from_value(v["tokens"].clone()).expect("tokens")
}

fn messages(v: &serde_json::Value) -> Vec<(String, String)> {
    serde_json::from_value(v["messages"].clone()).expect("messages")
}

#[test]
fn completion_prompts_match_the_engine() {
    let tok = HfTokenizer::load(&tiny_dir()).expect("load");
    let samples = samples();
    let prompts = samples["prompts"].as_array().expect("prompts");
    assert!(prompts.len() >= 40);
    let mut mismatches = Vec::new();
    for s in prompts {
        let prompt = s["prompt"].as_str().expect("prompt");
        let got = tok.encode_text(prompt).expect("encode");
        if got != ids(s) {
            mismatches.push(format!("{prompt:?}: engine {:?}, ours {got:?}", ids(s)));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn chat_prompts_match_the_engine() {
    let tok = HfTokenizer::load(&tiny_dir()).expect("load");
    assert!(tok.has_chat_template());
    let samples = samples();
    let chats = samples["chats"].as_array().expect("chats");
    assert!(chats.len() >= 10);
    let mut mismatches = Vec::new();
    for s in chats {
        let msgs = messages(s);
        let got = tok.encode_chat(&msgs).expect("encode");
        if got != ids(s) {
            mismatches.push(format!("{msgs:?}: engine {:?}, ours {got:?}", ids(s)));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn the_chat_template_is_rendered_as_transformers_does() {
    let tok = HfTokenizer::load(&tiny_dir()).expect("load");
    let msgs = vec![("user".to_owned(), "Hello!".to_owned())];
    // trim_blocks: no newline after `{% endfor %}`; the generation prompt is added.
    assert_eq!(tok.render_chat(&msgs).expect("render"), "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n");
}

/// A model directory made of the tiny model's tokenizer.json and the given other files.
fn model_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(tiny_dir().join("tokenizer.json"), dir.path().join("tokenizer.json")).expect("copy");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("write");
    }
    dir
}

const BOS_EOS: &str =
    r#""bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|end_of_text|>", "special": true}"#;

fn user(text: &str) -> Vec<(String, String)> {
    vec![("user".to_owned(), text.to_owned())]
}

#[test]
fn a_template_in_tokenizer_config_is_used_and_the_jinja_file_wins() {
    let cfg = format!(
        r#"{{{BOS_EOS}, "chat_template": "{{{{ bos_token }}}}[{{{{ messages[0].content }}}}]{{{{ eos_token }}}}"}}"#
    );
    let dir = model_dir(&[("tokenizer_config.json", &cfg)]);
    let tok = HfTokenizer::load(dir.path()).expect("load");
    assert_eq!(tok.render_chat(&user("hi")).expect("render"), "<|begin_of_text|>[hi]<|end_of_text|>");
    // The template placed BOS; none is added on top.
    let chat = tok.encode_chat(&user("hi")).expect("encode");
    assert_eq!(chat.iter().filter(|&&id| id == 0).count(), 1);

    std::fs::write(dir.path().join("chat_template.jinja"), "J:{{ messages[0].content }}").expect("write");
    let tok = HfTokenizer::load(dir.path()).expect("load");
    assert_eq!(tok.render_chat(&user("hi")).expect("render"), "J:hi");
}

#[test]
fn named_templates_use_the_default_one() {
    let cfg = format!(
        r#"{{{BOS_EOS}, "chat_template": [{{"name": "tool_use", "template": "T"}}, {{"name": "default", "template": "D{{{{ messages|length }}}}"}}]}}"#
    );
    let dir = model_dir(&[("tokenizer_config.json", &cfg)]);
    let tok = HfTokenizer::load(dir.path()).expect("load");
    assert_eq!(tok.render_chat(&user("x")).expect("render"), "D1");

    let cfg = format!(r#"{{{BOS_EOS}, "chat_template": [{{"name": "tool_use", "template": "T"}}]}}"#);
    let dir = model_dir(&[("tokenizer_config.json", &cfg)]);
    let tok = HfTokenizer::load(dir.path()).expect("load");
    assert!(!tok.has_chat_template());
    let err = tok.encode_chat(&user("x")).expect_err("no default");
    assert!(err.contains("default"), "{err}");
}

#[test]
fn add_bos_token_false_rebuilds_the_post_processor() {
    let with_bos = HfTokenizer::load(&tiny_dir()).expect("load").encode_text("hello").expect("encode");
    assert_eq!(with_bos[0], 0);
    let cfg = format!(r#"{{{BOS_EOS}, "add_bos_token": false, "add_eos_token": true}}"#);
    let dir = model_dir(&[("tokenizer_config.json", &cfg)]);
    let tok = HfTokenizer::load(dir.path()).expect("load");
    let got = tok.encode_text("hello").expect("encode");
    assert_eq!(got[..got.len() - 1], with_bos[1..]);
    assert_eq!(got.last(), Some(&1));
}

#[test]
fn a_model_without_a_template_encodes_text_but_not_chat() {
    let dir = model_dir(&[]);
    let tok = HfTokenizer::load(dir.path()).expect("load");
    assert!(!tok.has_chat_template());
    // tokenizer.json's own post-processor still adds BOS.
    assert_eq!(tok.encode_text("a").expect("encode")[0], 0);
    let err = tok.encode_chat(&user("x")).expect_err("no template");
    assert!(err.contains("no chat template"), "{err}");
}

#[test]
fn developer_turns_become_one_system_turn_unless_the_template_knows_the_role() {
    let tpl = "{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}";
    let dir = model_dir(&[("chat_template.jinja", tpl)]);
    let tok = HfTokenizer::load(dir.path()).expect("load");
    let msgs: Vec<(String, String)> = [("system", "s"), ("user", "u"), ("developer", "d")]
        .iter()
        .map(|(r, c)| (r.to_string(), c.to_string()))
        .collect();
    assert_eq!(tok.render_chat(&msgs).expect("render"), "[system:s\n\nd][user:u]");

    let tpl = format!("{{% if messages[0].role == 'developer' %}}D{{% endif %}}{tpl}");
    let dir = model_dir(&[("chat_template.jinja", &tpl)]);
    let tok = HfTokenizer::load(dir.path()).expect("load");
    assert_eq!(tok.render_chat(&msgs).expect("render"), "[system:s][user:u][developer:d]");
}

#[test]
fn hf_template_helpers_work() {
    let tpl = concat!(
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}",
        "{{ m.content.strip().upper() }}|{{ m.content.startswith(' a') }}|",
        "{{ {'k': [1, 'é', none, true], 'h': '<x>'} | tojson }}|",
        "{{ {'k': 1} | tojson(indent=2) }}|{{ strftime_now('%Y') | length }}",
        "{% endfor %}"
    );
    let dir = model_dir(&[("chat_template.jinja", tpl)]);
    let tok = HfTokenizer::load(dir.path()).expect("load");
    let msgs = vec![("user".to_owned(), " ab ".to_owned()), ("user".to_owned(), "z".to_owned())];
    assert_eq!(
        tok.render_chat(&msgs).expect("render"),
        "AB|True|{\"k\": [1, \"é\", null, true], \"h\": \"<x>\"}|{\n  \"k\": 1\n}|4"
    );
}

#[test]
fn bad_input_is_an_error_naming_the_file() {
    let missing = HfTokenizer::load(Path::new("/nonexistent/model")).expect_err("missing");
    assert!(missing.contains("tokenizer.json") && missing.contains("cannot read"), "{missing}");

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": 3").expect("write");
    let err = HfTokenizer::load(dir.path()).expect_err("malformed");
    assert!(err.contains("tokenizer.json") && err.contains("not a tokenizer"), "{err}");

    let dir = model_dir(&[("tokenizer_config.json", "[1, 2")]);
    let err = HfTokenizer::load(dir.path()).expect_err("malformed config");
    assert!(err.contains("tokenizer_config.json") && err.contains("malformed JSON"), "{err}");

    let dir = model_dir(&[("tokenizer_config.json", r#"{"add_bos_token": "yes"}"#)]);
    let err = HfTokenizer::load(dir.path()).expect_err("bad flag");
    assert!(err.contains("add_bos_token must be a boolean"), "{err}");

    let dir = model_dir(&[("chat_template.jinja", "{% for m in messages %}{{ m.content }")]);
    let err = HfTokenizer::load(dir.path()).expect_err("syntax");
    assert!(err.contains("chat_template.jinja") && err.contains("syntax error"), "{err}");
}

#[test]
fn a_template_that_fails_is_an_error_not_a_panic() {
    let tpl = "{% if messages[0].role != 'system' %}{{ raise_exception('first turn must be system') }}{% endif %}ok";
    let dir = model_dir(&[("chat_template.jinja", tpl)]);
    let tok = HfTokenizer::load(dir.path()).expect("load");
    let err = tok.encode_chat(&user("x")).expect_err("raised");
    assert!(err.contains("first turn must be system"), "{err}");

    // Unbounded work runs out of fuel.
    let tpl = "{% for a in range(10000) %}{% for b in range(10000) %}{{ a }}{% endfor %}{% endfor %}";
    let dir = model_dir(&[("chat_template.jinja", tpl)]);
    let tok = HfTokenizer::load(dir.path()).expect("load");
    let err = tok.encode_chat(&user("x")).expect_err("fuel");
    assert!(err.contains("fuel"), "{err}");

    // Unbounded recursion hits the recursion limit.
    let tpl = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}";
    let dir = model_dir(&[("chat_template.jinja", tpl)]);
    let tok = HfTokenizer::load(dir.path()).expect("load");
    assert!(tok.encode_chat(&user("x")).is_err());

    let dir = model_dir(&[("chat_template.jinja", "{{ strftime_now('%Q') }}")]);
    let tok = HfTokenizer::load(dir.path()).expect("load");
    let err = tok.encode_chat(&user("x")).expect_err("directive");
    assert!(err.contains("unsupported directive %Q"), "{err}");
}
