//! Token-exact prompts for real models: the prompt token ids the vLLM engine will compute,
//! from the model directory's own tokenizer files, so the gateway can key its KV index
//! (issue 23) with the engine's ids.
//!
//! ```text
//! completion: text ──tokenizer.json (+ post-processor: BOS…)──────────────────────▶ ids
//! chat: messages ──chat template (Jinja, as transformers renders it)──▶ text ──tokenizer.json,
//!                                               no special tokens added (vLLM's chat path)──▶ ids
//! ```
//! The files are read as vLLM 0.32 / transformers 5 read them: `tokenizer.json`;
//! `tokenizer_config.json` for the special tokens, `add_bos_token`/`add_eos_token` (which,
//! when set, rebuild the post-processor) and `chat_template` (a string, or a list of named
//! templates whose `default` is used); `chat_template.jinja`, when present, wins. Templates
//! are untrusted input: rendering has a fuel budget and minijinja's recursion limit, and every
//! failure is an `Err` naming the file or the template's error.
//! Encoding is CPU work proportional to the prompt: callers on a tokio worker should use
//! `spawn_blocking` for long prompts.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::Tokenizer;

/// Instructions one chat template render may run (minijinja's fuel, also a bound on the
/// memory it allocates, ~64 bytes a unit): ample for real templates on long conversations.
const RENDER_FUEL: u64 = 5_000_000;

/// The name the chat template has in the Jinja environment.
const CHAT: &str = "chat";

/// Named special tokens transformers passes to a chat template (its `special_tokens_map`).
const SPECIAL_TOKEN_NAMES: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// A model directory's tokenizer and chat template, giving the engine's prompt token ids.
pub struct HfTokenizer {
    tokenizer: Tokenizer,
    /// The compiled chat template, or why there is none.
    chat: Result<Environment<'static>, String>,
    /// `bos_token`, `eos_token`, … as strings, for the template.
    special_tokens: BTreeMap<&'static str, String>,
    /// The template names the `developer` role (else vLLM maps it to `system`).
    template_knows_developer: bool,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .field("has_chat_template", &self.chat.is_ok())
            .field("special_tokens", &self.special_tokens)
            .finish()
    }
}

impl HfTokenizer {
    /// Loads a model directory as vLLM does: tokenizer.json, tokenizer_config.json (bos/eos
    /// tokens, add_bos_token, chat_template as a string or a list of named templates), and
    /// chat_template.jinja when present (newer layout; it wins). A template that does not
    /// compile is an error here; a model without one loads, and `encode_chat` says why not.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let tok_path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&tok_path).map_err(|e| format!("{}: cannot read: {e}", tok_path.display()))?;
        let mut tokenizer =
            Tokenizer::from_bytes(&bytes).map_err(|e| format!("{}: not a tokenizer: {e}", tok_path.display()))?;

        let cfg_path = dir.join("tokenizer_config.json");
        let config = read_json_object(&cfg_path)?.unwrap_or_default();
        // Older layouts keep the special tokens in special_tokens_map.json.
        let map_path = dir.join("special_tokens_map.json");
        let legacy_map = read_json_object(&map_path)?.unwrap_or_default();

        let mut special_tokens = BTreeMap::new();
        for name in SPECIAL_TOKEN_NAMES {
            let value = config.get(name).or_else(|| legacy_map.get(name));
            if let Some(token) = value.and_then(token_content) {
                special_tokens.insert(name, token);
            }
        }

        // transformers 5: an explicit add_bos_token / add_eos_token rebuilds the
        // post-processor as `[bos] $A [eos]` (each off unless set), as does a tokenizer.json
        // without one.
        let add_bos = config.get("add_bos_token");
        let add_eos = config.get("add_eos_token");
        if add_bos.is_some() || add_eos.is_some() || tokenizer.get_post_processor().is_none() {
            let flag = |v: Option<&serde_json::Value>, what: &str| match v {
                None | Some(serde_json::Value::Null) => Ok(false),
                Some(serde_json::Value::Bool(b)) => Ok(*b),
                Some(other) => Err(format!("{}: {what} must be a boolean, not {other}", cfg_path.display())),
            };
            let bos = flag(add_bos, "add_bos_token")?;
            let eos = flag(add_eos, "add_eos_token")?;
            let processor = post_processor(
                &tokenizer,
                bos.then(|| special_tokens.get("bos_token")).flatten(),
                eos.then(|| special_tokens.get("eos_token")).flatten(),
            )
            .map_err(|e| format!("{}: {e}", cfg_path.display()))?;
            tokenizer.with_post_processor(Some(processor));
        }

        let jinja_path = dir.join("chat_template.jinja");
        let template = match std::fs::read_to_string(&jinja_path) {
            Ok(source) => Ok((source, jinja_path.display().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                config_template(&config).map(|t| (t, format!("{} chat_template", cfg_path.display())))
            }
            Err(e) => return Err(format!("{}: cannot read: {e}", jinja_path.display())),
        };
        let (chat, template_knows_developer) = match template {
            Ok((source, origin)) => {
                let knows = source.contains("\"developer\"") || source.contains("'developer'");
                (Ok(compile(source).map_err(|e| format!("{origin}: {e}"))?), knows)
            }
            Err(why) => (Err(why), false),
        };
        Ok(HfTokenizer { tokenizer, chat, special_tokens, template_knows_developer })
    }

    /// A completion prompt's ids, as vLLM's /v1/completions and POST /tokenize {"prompt"}
    /// give (add_special_tokens = true).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, String> {
        self.encode(text, true)
    }

    /// A chat request's ids: the chat template rendered with the messages,
    /// add_generation_prompt=true and the special tokens, then tokenized without adding
    /// special tokens (vLLM's chat path: the template places BOS itself). `messages` are
    /// (role, content text); a `developer` turn becomes `system` when the template does not
    /// name that role, as vLLM does.
    pub fn encode_chat(&self, messages: &[(String, String)]) -> Result<Vec<u32>, String> {
        let text = self.render_chat(messages)?;
        self.encode(&text, false)
    }

    /// Whether the model has a chat template (else `encode_chat` fails).
    pub fn has_chat_template(&self) -> bool {
        self.chat.is_ok()
    }

    /// The chat template's text for `messages`, before tokenizing.
    pub fn render_chat(&self, messages: &[(String, String)]) -> Result<String, String> {
        let env = self.chat.as_ref().map_err(Clone::clone)?;
        let messages = if !self.template_knows_developer && messages.iter().any(|(r, _)| r == "developer") {
            developer_as_system(messages)
        } else {
            messages.iter().map(|(r, c)| Message { role: r, content: Cow::Borrowed(c) }).collect()
        };
        let mut ctx: BTreeMap<&str, Value> =
            self.special_tokens.iter().map(|(k, v)| (*k, Value::from(v.as_str()))).collect();
        let messages: Vec<Value> = messages
            .into_iter()
            .map(|m| Value::from_pairs([("role", Value::from(m.role)), ("content", Value::from(m.content.as_ref()))]))
            .collect();
        ctx.insert("messages", Value::from(messages));
        ctx.insert("tools", Value::from(()));
        ctx.insert("documents", Value::from(()));
        ctx.insert("add_generation_prompt", Value::from(true));
        let template = env.get_template(CHAT).map_err(|e| format!("chat template: {e}"))?;
        template.render(ctx).map_err(|e| format!("chat template failed to render: {}", describe(&e)))
    }

    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        self.tokenizer
            .encode_fast(text, add_special_tokens)
            .map(|enc| enc.get_ids().to_vec())
            .map_err(|e| format!("tokenizer: {e}"))
    }
}

struct Message<'a> {
    role: &'a str,
    content: Cow<'a, str>,
}

/// vLLM's handling of `developer` turns for templates without that role: they become
/// `system`, and when a system turn then is not alone at the front, all system turns merge
/// into one first turn (non-empty contents joined by a blank line).
fn developer_as_system(messages: &[(String, String)]) -> Vec<Message<'_>> {
    let converted: Vec<(&str, &str)> =
        messages.iter().map(|(r, c)| (if r == "developer" { "system" } else { r.as_str() }, c.as_str())).collect();
    let systems: Vec<usize> = (0..converted.len()).filter(|&i| converted[i].0 == "system").collect();
    if systems.len() <= 1 && systems.iter().all(|&i| i == 0) {
        return converted
            .into_iter()
            .map(|(role, content)| Message { role, content: Cow::Borrowed(content) })
            .collect();
    }
    let merged: Vec<&str> = systems.iter().map(|&i| converted[i].1).filter(|c| !c.is_empty()).collect();
    std::iter::once(Message { role: "system", content: Cow::Owned(merged.join("\n\n")) })
        .chain(
            converted
                .into_iter()
                .filter(|(r, _)| *r != "system")
                .map(|(role, content)| Message { role, content: Cow::Borrowed(content) }),
        )
        .collect()
}

/// A JSON file's top-level object; `None` when the file does not exist.
fn read_json_object(path: &Path) -> Result<Option<serde_json::Map<String, serde_json::Value>>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: cannot read: {e}", path.display())),
    };
    match serde_json::from_str(&text) {
        Ok(serde_json::Value::Object(map)) => Ok(Some(map)),
        Ok(_) => Err(format!("{}: not a JSON object", path.display())),
        Err(e) => Err(format!("{}: malformed JSON: {e}", path.display())),
    }
}

/// A special token given as a string or as an AddedToken object (`{"content": ...}`).
fn token_content(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// tokenizer_config.json's chat template: a string, or a list of `{name, template}` whose
/// `default` is the one used.
fn config_template(config: &serde_json::Map<String, serde_json::Value>) -> Result<String, String> {
    match config.get("chat_template") {
        None | Some(serde_json::Value::Null) => Err("the model has no chat template".to_owned()),
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str())
            .map(str::to_owned)
            .ok_or_else(|| "the model has named chat templates but none called \"default\"".to_owned()),
        Some(other) => Err(format!("tokenizer_config.json chat_template must be a string or a list, not {other}")),
    }
}

/// `[bos:0] $A:0 [eos:0]` (pair: `… [bos:1] $B:1 [eos:1]`), as transformers builds it.
fn post_processor(
    tokenizer: &Tokenizer,
    bos: Option<&String>,
    eos: Option<&String>,
) -> Result<TemplateProcessing, String> {
    let mut single = Vec::new();
    let mut pair_b = Vec::new();
    let mut specials = Vec::new();
    for token in [bos, eos].into_iter().flatten() {
        let id =
            tokenizer.token_to_id(token).ok_or_else(|| format!("special token {token:?} is not in the vocabulary"))?;
        specials.push((token.clone(), id));
    }
    if let Some(b) = bos {
        single.push(format!("{b}:0"));
        pair_b.push(format!("{b}:1"));
    }
    single.push("$A:0".to_owned());
    pair_b.push("$B:1".to_owned());
    if let Some(e) = eos {
        single.push(format!("{e}:0"));
        pair_b.push(format!("{e}:1"));
    }
    let pair: Vec<String> = single.iter().cloned().chain(pair_b).collect();
    TemplateProcessing::builder()
        .try_single(single.join(" "))
        .and_then(|b| b.try_pair(pair.join(" ")))
        .map_err(|e| format!("post-processor: {e}"))?
        .special_tokens(specials)
        .build()
        .map_err(|e| format!("post-processor: {e}"))
}

/// A Jinja environment holding `source` as transformers compiles chat templates:
/// trim_blocks and lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a
/// `tojson` that writes JSON as Python's `json.dumps` does, and Python's string/dict methods.
fn compile(source: String) -> Result<Environment<'static>, String> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| e.to_string())?;
    env.set_syntax(syntax);
    env.set_fuel(Some(RENDER_FUEL));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<Value, JinjaError> {
        Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |format: String| strftime_utc_now(&format));
    env.add_filter("tojson", tojson);
    env.add_template_owned(CHAT, source).map_err(|e| describe(&e))?;
    Ok(env)
}

/// An error with its line and cause chain, on one line.
fn describe(e: &JinjaError) -> String {
    let mut out = match e.line() {
        Some(line) => format!("{e} (line {line})"),
        None => e.to_string(),
    };
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        out.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    out
}

/// Python's `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, the filter transformers installs (no HTML escaping).
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => return Err(JinjaError::new(ErrorKind::InvalidOperation, "tojson separators must be two strings")),
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(value, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonStyle {
    indent: Option<usize>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl JsonStyle {
    fn write(&self, v: &Value, depth: usize, out: &mut String) -> Result<(), JinjaError> {
        if depth > 64 {
            return Err(JinjaError::new(ErrorKind::InvalidOperation, "tojson: value nested too deeply"));
        }
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => out.push_str(&v.to_string()),
            ValueKind::String => self.string(v.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.container('[', ']', items.len(), depth, out, |i, out| self.write(&items[i], depth + 1, out))?;
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                self.container('{', '}', keys.len(), depth, out, |i, out| {
                    let key = &keys[i];
                    match key.as_str() {
                        Some(s) => self.string(s, out),
                        None => self.string(&key.to_string(), out),
                    }
                    out.push_str(&self.key_sep);
                    self.write(&v.get_item(key)?, depth + 1, out)
                })?;
            }
            _ => self.string(&v.to_string(), out),
        }
        Ok(())
    }

    fn container(
        &self,
        open: char,
        close: char,
        len: usize,
        depth: usize,
        out: &mut String,
        mut item: impl FnMut(usize, &mut String) -> Result<(), JinjaError>,
    ) -> Result<(), JinjaError> {
        out.push(open);
        if len == 0 {
            out.push(close);
            return Ok(());
        }
        for i in 0..len {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            if let Some(n) = self.indent {
                out.push('\n');
                out.push_str(&" ".repeat(n * (depth + 1)));
            }
            item(i, out)?;
        }
        if let Some(n) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
        out.push(close);
        Ok(())
    }

    fn string(&self, s: &str, out: &mut String) {
        // serde_json escapes as Python does (\n, \t, \u00XX for other controls; not '/').
        let quoted = serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned());
        if !self.ensure_ascii {
            out.push_str(&quoted);
            return;
        }
        for ch in quoted.chars() {
            if ch.is_ascii() {
                out.push(ch);
            } else {
                let mut buf = [0u16; 2];
                for unit in ch.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
}

/// Python's `datetime.now().strftime(format)` for the directives chat templates use, in
/// UTC (vLLM renders with the server's local time, UTC in containers).
fn strftime_utc_now(format: &str) -> Result<String, JinjaError> {
    strftime(format, flotilla_api::civil::unix_ms() / 1000)
}

fn strftime(format: &str, unix_secs: u64) -> Result<String, JinjaError> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = (unix_secs / 86_400) as i64;
    let t = flotilla_api::civil::UtcTime::from_unix(unix_secs);
    let (year, month, day) = (t.year, t.month, t.day);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (index 3)
    let yday = days - days_from_civil(year, 1, 1) + 1;
    let (hour, minute, second) = (u64::from(t.hour), u64::from(t.minute), u64::from(t.second));
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        // glibc's `%-d` (no padding) is common in templates.
        let mut next = chars.next();
        let unpadded = next == Some('-');
        if unpadded {
            next = chars.next();
        }
        let num = |n: i64, width: usize| {
            if unpadded {
                n.to_string()
            } else {
                format!("{n:0width$}")
            }
        };
        let piece = match next {
            Some('Y') => year.to_string(),
            Some('y') => num(year.rem_euclid(100), 2),
            Some('m') => num(month as i64, 2),
            Some('d') => num(day as i64, 2),
            Some('e') => format!("{day:>2}"),
            Some('j') => num(yday, 3),
            Some('H') => num(hour as i64, 2),
            Some('I') => num(((hour + 11) % 12 + 1) as i64, 2),
            Some('M') => num(minute as i64, 2),
            Some('S') => num(second as i64, 2),
            Some('p') => (if hour < 12 { "AM" } else { "PM" }).to_owned(),
            Some('B') => MONTHS[month as usize - 1].to_owned(),
            Some('b') | Some('h') => MONTHS[month as usize - 1][..3].to_owned(),
            Some('A') => DAYS[weekday].to_owned(),
            Some('a') => DAYS[weekday][..3].to_owned(),
            Some('%') => "%".to_owned(),
            other => {
                return Err(JinjaError::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported directive %{}", other.map(String::from).unwrap_or_default()),
                ))
            }
        };
        out.push_str(&piece);
    }
    Ok(out)
}

/// Days since 1970-01-01 of a date, proleptic Gregorian (H. Hinnant's days-from-civil).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_matches_python() {
        // datetime.fromtimestamp(1721955723, UTC).strftime(...) in Python.
        let got = strftime("%d %b %Y|%Y-%m-%d %H:%M:%S|%A %a %B %j %y %I %p", 1_721_955_723);
        assert_eq!(got.ok().as_deref(), Some("26 Jul 2024|2024-07-26 01:02:03|Friday Fri July 208 24 01 AM"));
        // 2000-02-29 (a leap day), unpadded.
        assert_eq!(strftime("%-d/%-m/%Y %j", 951_782_400).ok().as_deref(), Some("29/2/2000 060"));
        assert_eq!(strftime("%Y-%m-%d", 0).ok().as_deref(), Some("1970-01-01"));
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let env = compile(
            concat!(
                "{% set x = {'b': 'é😀\\n', 'a': [1, 2.5, none]} %}",
                "{{ x | tojson }}|{{ x | tojson(ensure_ascii=true, sort_keys=true) }}|{{ x | tojson(separators=[',', ':']) }}"
            )
            .to_owned(),
        )
        .expect("compile");
        let got = env.get_template(CHAT).and_then(|t| t.render(()));
        // json.dumps(x, ensure_ascii=False) | (ensure_ascii=True, sort_keys=True) | (separators=(',', ':'))
        assert_eq!(
            got.ok().as_deref(),
            Some(concat!(
                r#"{"b": "é😀\n", "a": [1, 2.5, null]}|"#,
                r#"{"a": [1, 2.5, null], "b": "\u00e9\ud83d\ude00\n"}|"#,
                r#"{"b":"é😀\n","a":[1,2.5,null]}"#
            ))
        );
    }
}
