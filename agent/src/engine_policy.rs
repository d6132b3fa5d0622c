//! The engine-argument policy: which of a Model's `engine_args` an agent refuses to put on
//! an engine's command line. Whoever may write a Model should not thereby run code on the
//! node, read its files, or take the engine's listener, key or name away from the agent.
//! [`check`] is pure; a refused replica is reported `failed` with the [`Refusal`] as its
//! reason (the engine is never started).
//!
//! Rules come from three places ([`Policy::new`]):
//! - [`AGENT_CONTROLLED`]: what the agent sets itself. Always refused.
//! - [`DEFAULT_REFUSED`]: flags that load code or plugins, read or write files the Model
//!   names, or open the node to API clients. Refused unless the policy file allows them.
//! - the operator's `--engine-policy FILE` (YAML): `allow: [flags]` lifts default refusals
//!   (a node whose operator trusts a model repository may allow `--trust-remote-code`);
//!   `deny: [flags]` adds refusals (a trailing `*` matches a prefix: `--enable-*`).
//!
//! A P/D member's engine (an assignment with `kv_transfer`) gets `--kv-transfer-config`
//! from the agent ([`crate::kv_transfer`]): there the flag is refused in every spelling
//! whatever the policy file allows ([`check_kv_transfer_member`], [`KV_TRANSFER_CONTROLLED`]),
//! as the agent's own flags are. Elsewhere it is a default refusal, like
//! `--kv-events-config`, which the agent likewise sets itself (`--kv-events`).
//!
//! Words are read as vLLM's argument parser reads them: `--flag value` and `--flag=value`,
//! underscores for dashes in the name (`--trust_remote_code`), vLLM's dotted JSON keys
//! (`--kv-transfer-config.kv_connector_module_path=x` is `--kv-transfer-config`), and
//! argparse's abbreviations (`--trust-remote` is `--trust-remote-code`), so a prefix of a
//! refused flag is refused too, unless it is itself a flag ([`NOT_ABBREVIATIONS`], or one
//! the file allows). The same check applies to `flotilla sim` engines, whose flags share
//! vLLM's names where both have one; their parser (clap) expands no abbreviations, so for
//! them only whole names count (the sim's `--profile` is not vLLM's `--profiler-config`).
//!
//! Considered and not refused: `--hf-overrides` (it changes values of the model's config;
//! without `--trust-remote-code` it can only pick among the model classes vLLM ships);
//! `--distributed-executor-backend` (vLLM's parser limits it to mp, ray, uni and
//! external_launcher); `--chat-template`, `--tokenizer`, `--revision` (data, not code);
//! `--download-dir` (a cache location the engine's user can write anyway).

use std::collections::BTreeSet;
use std::fmt;

use serde::Deserialize;

/// A refused flag and why.
#[derive(Debug, Clone, Copy)]
pub struct FlagRule {
    /// The flag, dashes and all; a trailing `*` matches every flag with that prefix.
    pub flag: &'static str,
    /// Why, completing "FLAG ...".
    pub reason: &'static str,
}

const fn rule(flag: &'static str, reason: &'static str) -> FlagRule {
    FlagRule { flag, reason }
}

/// What the agent sets on every engine: a Model may not override it, and no policy file
/// may allow it.
pub const AGENT_CONTROLLED: [FlagRule; 10] = [
    rule("--host", "is set by the agent: engines listen on the node's --address"),
    rule("--port", "is set by the agent, which picks each engine's port"),
    rule("--uds", "is set by the agent, which reaches engines over TCP"),
    rule(
        "--api-key",
        "is set by the agent (VLLM_API_KEY); a flag would replace the engine's key, locking the gateways out",
    ),
    rule(
        "--ssl-*",
        "is set by the agent (--engine-tls): engines serve TLS with the certificate whose pin gateways check",
    ),
    rule("--enable-ssl-refresh", "is set by the agent (--engine-tls): engines keep the certificate their pin names"),
    rule("--grpc", "is set by the agent: engines serve the HTTP API the agent and the gateways use"),
    rule("--grpc-port", "is set by the agent: a second listener the agent does not manage"),
    rule("--served-model-name", "is set by the agent: the model's name, which the gateways route by"),
    rule("--model", "is set by the agent: the model it downloaded from the Model's source"),
];

/// Refused unless the policy file allows them: each runs code the Model names, reads or
/// writes files the Model names, or opens the node to the engine's API clients.
pub const DEFAULT_REFUSED: [FlagRule; 25] = [
    rule("--trust-remote-code", "runs Python code shipped with the model repository"),
    rule("--worker-cls", "imports a Python class named by path into every worker"),
    rule("--worker-extension-cls", "imports a Python class named by path into every worker"),
    rule("--scheduler-cls", "imports a scheduler class named by path"),
    rule("--logits-processors", "imports logits processor classes named by path"),
    rule("--model-class-overrides", "registers model classes from module:class targets"),
    rule("--tool-parser-plugin", "imports a Python file as a tool parser"),
    rule("--reasoning-parser-plugin", "imports a Python file as a reasoning parser"),
    rule("--io-processor-plugin", "loads an IO processor plugin at start-up"),
    rule("--middleware", "imports ASGI middleware named by path into the API server"),
    rule("--kv-transfer-config", "imports the module its kv_connector_module_path names"),
    rule("--ec-transfer-config", "imports the module its ec_connector_module_path names"),
    rule("--ec-manager-config", "imports the class its encoder_cache_manager_cls names"),
    rule("--compilation-config", "imports the class its backend names"),
    rule("-cc", "(--compilation-config) imports the class its backend names"),
    rule("--speculative-config", "imports its model as a module path with method custom_class"),
    rule("-sc", "(--speculative-config) imports its model as a module path with method custom_class"),
    rule("--logging-config", "builds whatever classes a Python logging config names, and names files to read"),
    rule("--log-config-file", "builds whatever classes a Python logging config names"),
    rule("--config", "reads more flags from a file on the node, out of this check's sight"),
    rule("--tool-server", "connects the engine to tool servers; `demo` runs code the model writes"),
    rule("--allowed-local-media-path", "lets API clients read the node's files through file:// URLs"),
    rule("--trust-request-chat-template", "renders chat templates that API clients send"),
    rule("--profiler-config", "writes traces where it says and opens /start_profile, which no key guards"),
    rule(
        "--kv-events-config",
        "publishes every prompt's token ids to the endpoint it names (connecting out to a host:port) over ZMQ, which no key guards",
    ),
];

/// vLLM flags that are a prefix of a refused one: argparse takes an exact name as itself,
/// so these are not abbreviations (`--reasoning-parser` is not `--reasoning-parser-plugin`).
pub const NOT_ABBREVIATIONS: [&str; 1] = ["--reasoning-parser"];

/// The operator's `--engine-policy` file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Default refusals to lift (exact flags).
    #[serde(default)]
    pub allow: Vec<String>,
    /// More flags to refuse (a trailing `*` matches a prefix).
    #[serde(default)]
    pub deny: Vec<String>,
}

impl PolicyFile {
    /// Parses the YAML text; unknown fields are errors naming the field.
    pub fn parse(text: &str) -> Result<PolicyFile, String> {
        if text.trim().is_empty() {
            return Ok(PolicyFile::default());
        }
        serde_yaml::from_str(text).map_err(|e| e.to_string())
    }
}

/// Where a rule came from, for the refusal's wording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Agent,
    Default,
    File,
}

#[derive(Debug, Clone)]
struct Rule {
    /// Normalized flag; for a prefix rule, the text before the `*`.
    flag: String,
    prefix: bool,
    reason: String,
    origin: Origin,
}

impl Rule {
    fn from(r: &FlagRule, origin: Origin) -> Rule {
        let (flag, prefix) = split_glob(r.flag);
        Rule { flag: flag.to_string(), prefix, reason: r.reason.to_string(), origin }
    }

    /// Whether the flag word `name` (normalized) is this rule's flag, under it (prefix
    /// rules), or an argparse abbreviation of it (unless `exact`: a flag taken as itself).
    fn matches(&self, name: &str, exact: bool) -> bool {
        name == self.flag
            || (self.prefix && name.starts_with(self.flag.as_str()))
            || (!exact && self.flag.starts_with(name))
    }

    fn shown(&self) -> String {
        if self.prefix {
            format!("{}*", self.flag)
        } else {
            self.flag.clone()
        }
    }
}

fn split_glob(flag: &str) -> (&str, bool) {
    match flag.strip_suffix('*') {
        Some(p) => (p, true),
        None => (flag, false),
    }
}

/// The rules an agent checks engine arguments against.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<Rule>,
    /// Flags taken as themselves, never as an abbreviation of a refused one.
    exact: BTreeSet<String>,
}

impl Default for Policy {
    /// The built-in rules, no file.
    fn default() -> Self {
        Policy::new(&PolicyFile::default()).expect("the built-in rules are valid")
    }
}

impl Policy {
    /// The built-in rules with `file`'s changes. Errors name the entry at fault: one that
    /// is not a flag, an allowed flag the agent controls, a glob in `allow`, or a flag both
    /// allowed and denied.
    pub fn new(file: &PolicyFile) -> Result<Policy, String> {
        let mut allowed = BTreeSet::new();
        for a in &file.allow {
            let flag = normalize_entry(a, "allow")?;
            if flag.ends_with('*') {
                return Err(format!("allow: {a:?}: globs are for deny; allow names exact flags"));
            }
            let agent = AGENT_CONTROLLED.iter().map(|r| Rule::from(r, Origin::Agent));
            if let Some(r) = agent.into_iter().find(|r| r.matches(&flag, false)) {
                return Err(format!("allow: {a:?}: {} {}; no policy can allow it", r.shown(), r.reason));
            }
            allowed.insert(flag);
        }
        let mut rules: Vec<Rule> = AGENT_CONTROLLED.iter().map(|r| Rule::from(r, Origin::Agent)).collect();
        rules.extend(
            DEFAULT_REFUSED.iter().filter(|r| !allowed.contains(r.flag)).map(|r| Rule::from(r, Origin::Default)),
        );
        for d in &file.deny {
            let flag = normalize_entry(d, "deny")?;
            if allowed.contains(&flag) {
                return Err(format!("deny: {d:?} is also in allow"));
            }
            let (name, prefix) = split_glob(&flag);
            rules.push(Rule {
                flag: name.to_string(),
                prefix,
                reason: "is denied by this node's engine policy".into(),
                origin: Origin::File,
            });
        }
        let mut exact: BTreeSet<String> = NOT_ABBREVIATIONS.iter().map(|s| s.to_string()).collect();
        exact.extend(allowed);
        Ok(Policy { rules, exact })
    }
}

/// A policy file entry: a flag (`--name` or `-x`: letters, digits, `-` and `_`), read
/// with underscores as dashes, with an optional trailing `*`.
fn normalize_entry(entry: &str, field: &str) -> Result<String, String> {
    let (body, glob) = split_glob(entry.trim());
    let name = body.trim_start_matches('-');
    let dashes = body.len() - name.len();
    let ok = (dashes == 1 || dashes == 2)
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        return Err(format!("{field}: {entry:?} is not a flag (like --trust-remote-code, or --enable-* in deny)"));
    }
    let flag = normalize_name(body);
    Ok(if glob { format!("{flag}*") } else { flag })
}

fn normalize_name(word: &str) -> String {
    match word.strip_prefix("--") {
        Some(rest) => format!("--{}", rest.replace('_', "-")),
        None => word.to_string(),
    }
}

/// The flag a command-line word names, as vLLM's parser reads it: the text before any `=`
/// and before any `.`, with underscores read as dashes after `--`. None for values
/// (words not starting with `-`, negative numbers, a lone `-` or `--`).
fn flag_name(word: &str) -> Option<String> {
    let rest = word.strip_prefix('-')?;
    if rest.is_empty() || rest == "-" || rest.starts_with(|c: char| c.is_ascii_digit() || c == '.') {
        return None;
    }
    let key = word.split('=').next().unwrap_or(word);
    let key = key.split('.').next().unwrap_or(key);
    Some(normalize_name(key))
}

/// Why an engine argument is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The word as the Model wrote it.
    pub arg: String,
    /// The refused flag it names.
    pub flag: String,
    /// Why that flag is refused.
    pub reason: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "engine argument {:?} refused: {} {}", self.arg, self.flag, self.reason)
    }
}

/// How an engine's parser reads a flag name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parser {
    /// Python's argparse (vLLM): a unique prefix of a flag is that flag.
    Argparse,
    /// clap (`flotilla sim`): whole names only.
    Clap,
}

impl Parser {
    /// The parser of an engine kind (`sim` or `vllm`).
    pub fn of(engine: &str) -> Parser {
        if engine == "sim" {
            Parser::Clap
        } else {
            Parser::Argparse
        }
    }
}

/// What the agent sets on a P/D member's engine: refused in its Model's `engine_args`,
/// whatever the policy file allows (a second `--kv-transfer-config`, or a dotted key of it,
/// would override or extend the connector the agent configured).
pub const KV_TRANSFER_CONTROLLED: FlagRule = rule(
    "--kv-transfer-config",
    "is set by the agent from the replica's kv_transfer role (spec.disaggregation); no policy can allow it on a P/D member",
);

/// The first of `args` that names `--kv-transfer-config` (in any of vLLM's spellings), for
/// the engine of a P/D member: checked besides [`check`].
pub fn check_kv_transfer_member(parser: Parser, args: &[String]) -> Result<(), Refusal> {
    let policy = Policy {
        rules: vec![Rule::from(&KV_TRANSFER_CONTROLLED, Origin::Agent)],
        exact: NOT_ABBREVIATIONS.iter().map(|s| s.to_string()).collect(),
    };
    check(&policy, parser, args)
}

/// The first of `args` that `policy` refuses, if any, for an engine whose flags `parser`
/// reads.
pub fn check(policy: &Policy, parser: Parser, args: &[String]) -> Result<(), Refusal> {
    for arg in args {
        let Some(name) = flag_name(arg) else { continue };
        let exact = parser == Parser::Clap || policy.exact.contains(&name);
        let hit = policy.rules.iter().find(|r| r.matches(&name, exact));
        if let Some(r) = hit {
            let mut reason = r.reason.clone();
            if r.origin == Origin::Default {
                reason.push_str(" (an --engine-policy file can allow it)");
            }
            return Err(Refusal { arg: arg.clone(), flag: r.shown(), reason });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    fn refused(policy: &Policy, words: &[&str]) -> Option<String> {
        check(policy, Parser::Argparse, &args(words)).err().map(|r| r.flag)
    }

    #[test]
    fn the_default_policy_in_every_spelling() {
        let p = Policy::default();
        for (words, want) in [
            (&["--max-model-len", "8192", "--enable-lora"][..], None),
            (&["--trust-remote-code"], Some("--trust-remote-code")),
            (&["--trust_remote_code"], Some("--trust-remote-code")),
            (&["--trust-remote-code=true"], Some("--trust-remote-code")),
            (&["--trust-remote"], Some("--trust-remote-code")),
            (&["--max-model-len=512", "--worker_extension_cls", "m.C"], Some("--worker-extension-cls")),
            (&["--kv-transfer-config.kv_connector_module_path=evil"], Some("--kv-transfer-config")),
            (&["--kv_transfer_config.kv_connector", "X"], Some("--kv-transfer-config")),
            (&["-cc.backend=evil.Backend"], Some("-cc")),
            (&["-sc", "{}"], Some("-sc")),
            (&["-s", "{}"], Some("-sc")),
            (&["--logits-processors", "a.B", "c.D"], Some("--logits-processors")),
            (&["--port", "9999"], Some("--port")),
            (&["--port=9999"], Some("--port")),
            (&["--host", "0.0.0.0"], Some("--host")),
            (&["--api-key", "mine"], Some("--api-key")),
            (&["--api_key=mine"], Some("--api-key")),
            (&["--ssl-keyfile", "/k"], Some("--ssl-*")),
            (&["--ssl_certfile=/c"], Some("--ssl-*")),
            (&["--served-model-name", "other"], Some("--served-model-name")),
            (&["--model", "org/other"], Some("--model")),
            (&["--uds", "/tmp/s"], Some("--uds")),
            (&["--config", "/etc/x.yaml"], Some("--config")),
            (&["--allowed-local-media-path", "/"], Some("--allowed-local-media-path")),
            (&["--tool-server", "demo"], Some("--tool-server")),
            (
                &["--kv-events-config", "{\"publisher\": \"zmq\", \"endpoint\": \"tcp://evil:5557\"}"],
                Some("--kv-events-config"),
            ),
            // Values are not flags; exact flags are not abbreviations.
            (&["--chat-template", "x--trust-remote-code"], None),
            (&["--seed", "-1"], None),
            (&["--reasoning-parser", "deepseek_r1"], None),
            (&["--reasoning-parser-plugin", "/p.py"], Some("--reasoning-parser-plugin")),
            (&["--hf-overrides", "{\"max_position_embeddings\": 4096}"], None),
            (&["--no-trust-remote-code"], None),
            (&["-tp", "2", "-O3", "--", "-"], None),
        ] {
            assert_eq!(refused(&p, words).as_deref(), want, "{words:?}");
        }
    }

    #[test]
    fn refusals_name_the_word_the_flag_and_the_way_out() {
        let r =
            check(&Policy::default(), Parser::Argparse, &args(&["--enable-lora", "--trust_remote_code"])).unwrap_err();
        assert_eq!(r.arg, "--trust_remote_code");
        let text = r.to_string();
        assert!(text.contains("\"--trust_remote_code\"") && text.contains("--trust-remote-code"), "{text}");
        assert!(text.contains("--engine-policy"), "{text}");
        let port = check(&Policy::default(), Parser::Argparse, &args(&["--port=1"])).unwrap_err().to_string();
        assert!(port.contains("set by the agent") && !port.contains("--engine-policy"), "{port}");
    }

    #[test]
    fn the_sims_parser_expands_no_abbreviations() {
        let p = Policy::default();
        let sim = |words: &[&str]| check(&p, Parser::of("sim"), &args(words)).err().map(|r| r.flag);
        assert_eq!(sim(&["--profile", "h100-llama3-8b", "--speedup", "10"]), None);
        assert_eq!(refused(&p, &["--profile", "{}"]).as_deref(), Some("--profiler-config"), "vLLM reads --profile so");
        assert_eq!(sim(&["--port", "1"]).as_deref(), Some("--port"));
        assert_eq!(sim(&["--api_key=k"]).as_deref(), Some("--api-key"));
        assert_eq!(sim(&["--served-model-name", "x"]).as_deref(), Some("--served-model-name"));
        assert_eq!(sim(&["--ssl-keyfile", "/k"]).as_deref(), Some("--ssl-*"));
        assert_eq!(Parser::of("vllm"), Parser::Argparse);
    }

    #[test]
    fn a_policy_file_allows_and_denies() {
        let file = PolicyFile::parse(
            "allow: [--trust-remote-code, --worker_extension_cls]\ndeny: [--enable-sleep-mode, --enable-log-*]\n",
        )
        .unwrap();
        let p = Policy::new(&file).unwrap();
        for (words, want) in [
            (&["--trust-remote-code"][..], None),
            (&["--trust_remote_code"], None),
            (&["--trust-remote"], None),
            (&["--worker-extension-cls", "m.C"], None),
            (&["--worker-cls", "m.C"], Some("--worker-cls")),
            (&["--enable-sleep-mode"], Some("--enable-sleep-mode")),
            (&["--enable-log-requests"], Some("--enable-log-*")),
            (&["--enable-lora"], None),
            (&["--port", "1"], Some("--port")),
        ] {
            assert_eq!(refused(&p, words).as_deref(), want, "{words:?}");
        }
        let r = check(&p, Parser::Argparse, &args(&["--enable-sleep-mode"])).unwrap_err().to_string();
        assert!(r.contains("denied by this node's engine policy"), "{r}");
    }

    #[test]
    fn a_pd_members_connector_is_the_agents_whatever_the_file_allows() {
        let file = PolicyFile::parse("allow: [--kv-transfer-config]\n").unwrap();
        let p = Policy::new(&file).unwrap();
        let own = args(&["--kv-transfer-config", "{\"kv_connector\":\"NixlConnector\"}"]);
        assert!(check(&p, Parser::Argparse, &own).is_ok(), "allowed on an ordinary engine");
        for words in [
            &["--kv-transfer-config", "{}"][..],
            &["--kv_transfer_config={}"],
            &["--kv-transfer-config.kv_connector_module_path=evil"],
            &["--kv-transfer", "{}"],
            &["--max-model-len", "4096", "--kv-transfer-config.engine_id", "x"],
        ] {
            let r = check_kv_transfer_member(Parser::Argparse, &args(words)).unwrap_err();
            assert_eq!(r.flag, "--kv-transfer-config", "{words:?}");
            assert!(r.to_string().contains("no policy can allow it"), "{r}");
        }
        assert!(check_kv_transfer_member(Parser::Clap, &args(&["--kv-transfer-config", "{}"])).is_err());
        assert!(check_kv_transfer_member(Parser::Clap, &args(&["--kv-transfer", "{}"])).is_ok(), "clap: whole names");
        assert!(check_kv_transfer_member(Parser::Argparse, &args(&["--kv-events-config", "{}"])).is_ok());
        assert!(check_kv_transfer_member(Parser::Argparse, &args(&["--max-model-len", "8192"])).is_ok());
    }

    #[test]
    fn bad_policy_files_are_errors_naming_the_entry() {
        for (text, needle) in [
            ("alow: [--trust-remote-code]\n", "unknown field `alow`"),
            ("allow: [--trust-remote-code]\nextra: 1\n", "unknown field `extra`"),
            ("allow: --trust-remote-code\n", "allow"),
            ("allow: [trust-remote-code]\n", "\"trust-remote-code\" is not a flag"),
            ("allow: [--port]\n", "no policy can allow it"),
            ("allow: [--ssl-keyfile]\n", "no policy can allow it"),
            ("allow: [--trust-*]\n", "globs are for deny"),
            ("deny: [\"*\"]\n", "is not a flag"),
            ("deny: [--a=b]\n", "is not a flag"),
            ("allow: [--config]\ndeny: [--config]\n", "also in allow"),
        ] {
            let err = PolicyFile::parse(text).and_then(|f| Policy::new(&f)).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
        assert!(Policy::new(&PolicyFile::parse("").unwrap()).is_ok(), "an empty file is the default policy");
        assert!(Policy::new(&PolicyFile::parse("allow: []\ndeny: []\n").unwrap()).is_ok());
    }
}
