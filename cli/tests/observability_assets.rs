//! The dashboards (deploy/grafana/*.json) and alert rules (deploy/prometheus/alerts.yml)
//! against real scrapes: every role runs (a server, an agent with a sim engine, a gateway),
//! traffic goes through, each role's `/metrics` is scraped and linted by `promtool check
//! metrics` (the engine's vllm:* names are sim/tests/promtool.rs's business), and every metric a panel or a rule names must be exported by some role. The
//! rules also pass `promtool check rules` and their unit tests (`promtool test rules`), and
//! the scrape configuration `promtool check config`.
mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_owned()
}

/// Metric names in a PromQL expression: identifiers starting `flotilla_`, `flotilla:` or
/// `vllm:` outside quoted strings (label values are not names).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut unquoted = String::new();
    let mut quote = None;
    for c in expr.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' || c == '`' => quote = Some(c),
            None => unquoted.push(c),
        }
    }
    unquoted
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| ["flotilla_", "flotilla:", "vllm:"].iter().any(|p| t.starts_with(p)))
        .map(str::to_owned)
        .collect()
}

/// Every PromQL expression of the dashboards, with where it is.
fn dashboard_exprs() -> Vec<(String, String)> {
    let dir = repo().join("deploy/grafana");
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir).expect("deploy/grafana").flatten().map(|e| e.path()).collect();
    files.sort();
    for path in files.into_iter().filter(|p| p.extension().is_some_and(|e| e == "json")) {
        let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for panel in d["panels"].as_array().expect("panels") {
            for t in panel["targets"].as_array().expect("targets") {
                let at = format!("{} / {}", path.file_name().unwrap().to_string_lossy(), panel["title"]);
                out.push((at, t["expr"].as_str().expect("expr").to_owned()));
            }
        }
    }
    out
}

/// (alert or record name, expr) of every rule, and the recorded names.
fn rules() -> (Vec<(String, String)>, BTreeSet<String>) {
    let text = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let (mut exprs, mut recorded) = (Vec::new(), BTreeSet::new());
    for g in doc["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            let name = r["alert"].as_str().or(r["record"].as_str()).expect("alert or record").to_owned();
            if r["record"].is_string() {
                recorded.insert(name.clone());
            }
            exprs.push((name, r["expr"].as_str().expect("expr").to_owned()));
        }
    }
    (exprs, recorded)
}

/// Names a scrape exports: declared families (with a histogram's series) and samples.
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (Some(name), Some(kind)) = (it.next(), it.next()) else { continue };
            names.insert(name.to_owned());
            if kind == "histogram" {
                for s in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{s}"));
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

fn promtool(args: &[&str]) -> (bool, String) {
    let (code, out) = flotilla_testkit::promtool::run(args, &repo());
    (code == 0, out)
}

fn scrape(addr: &str) -> String {
    let out = raw_http::send_blocking_with(addr, "GET", "/metrics", "", Duration::from_secs(10), &[])
        .unwrap_or_else(|| panic!("no answer from {addr}/metrics"));
    assert_eq!(raw_http::status_code(&out), Some(200), "{addr}/metrics: {out}");
    raw_http::body_of(&out).to_owned()
}

#[test]
fn metric_names_are_read_from_promql() {
    let got = metric_names(
        r#"sum by (le) (rate(flotilla_x_bucket{code=~"vllm:no|flotilla_no"}[5m])) / flotilla:ratio + vllm:kv"#,
    );
    assert_eq!(got, ["flotilla:ratio", "flotilla_x_bucket", "vllm:kv"].map(String::from).into());
}

#[test]
fn rules_and_scrape_config_pass_promtool() {
    let (ok, out) = promtool(&["check", "rules", "deploy/prometheus/alerts.yml"]);
    assert!(ok, "promtool check rules:\n{out}");
    let (ok, out) = promtool(&["test", "rules", "deploy/prometheus/alerts_test.yml"]);
    assert!(ok, "promtool test rules:\n{out}");
    let (ok, out) = promtool(&["check", "config", "deploy/prometheus/prometheus.yml"]);
    assert!(ok, "promtool check config:\n{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_of_every_dashboard_and_alert_is_exported_by_a_role() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(1, &dir.path().join("s1"), "127.0.0.1:0", &["--bootstrap"]);
    let servers = vec![server.grpc.clone()];
    let agent_metrics = format!("127.0.0.1:{}", flotilla_testkit::ports::free_port().unwrap());
    let marker = marker();
    let _agent = AgentProc::start_with(
        "obs-node",
        &dir.path().join("agent"),
        &server.grpc,
        2,
        marker,
        &[],
        &["--metrics-listen", &agent_metrics],
    );
    let gw_metrics = format!("127.0.0.1:{}", flotilla_testkit::ports::free_port().unwrap());
    let gw = GatewayProc::start(&server.grpc, &["--metrics-listen", &gw_metrics]);
    wait_nodes_ready(&servers, 1).await;
    apply(&servers, model("obs")).await;
    let r = wait_replicas(&servers, "obs", 60, "a Ready replica", |r| ready(r) == 1).await;
    let engine = r[0].endpoint.clone().expect("endpoint");

    // Traffic: a streamed chat (time to first token), a completion, an unknown model.
    let chat = r#"{"model":"obs","messages":[{"role":"user","content":"hi"}],"max_tokens":4,"stream":true}"#;
    let gw_addr = gw.addr.clone();
    tokio::task::spawn_blocking(move || {
        for (path, body) in [
            ("/v1/chat/completions", chat),
            ("/v1/completions", r#"{"model":"obs","prompt":"hi","max_tokens":4}"#),
            ("/v1/completions", r#"{"model":"nope","prompt":"hi","max_tokens":4}"#),
        ] {
            raw_http::send_blocking_with(&gw_addr, "POST", path, body, Duration::from_secs(30), &[])
                .expect("the gateway answers");
        }
    })
    .await
    .unwrap();

    let mut all = BTreeSet::new();
    for (role, addr) in
        [("server", &server.http), ("agent", &agent_metrics), ("gateway", &gw_metrics), ("engine", &engine)]
    {
        let text = scrape(addr);
        // The engine's vllm:* names carry the lint problems real vLLM's have (sim/tests/promtool.rs)
        if role != "engine" {
            let (code, lint) = flotilla_testkit::promtool::check_metrics(&text);
            assert_eq!(code, 0, "promtool check metrics on the {role}'s scrape:\n{lint}");
        }
        all.extend(exported(&text));
    }
    let (rule_exprs, recorded) = rules();
    let mut missing = Vec::new();
    for (at, expr) in dashboard_exprs().into_iter().chain(rule_exprs) {
        for name in metric_names(&expr) {
            let known = if name.starts_with("flotilla:") { recorded.contains(&name) } else { all.contains(&name) };
            if !known {
                missing.push(format!("{name} (in {at})"));
            }
        }
    }
    assert!(missing.is_empty(), "used by a dashboard or rule but exported by no role:\n{}", missing.join("\n"));
    assert!(dashboard_exprs().len() > 50, "the dashboards were read");
    kill_engines(marker);
}
