//! Rendering of API answers as tables (for people) or JSON/YAML (for scripts).
use clap::ValueEnum;
use flotilla_api::pb;
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    Table,
    Json,
    Yaml,
}

/// An object as operators see it: `kind`, `metadata`, `spec`, `status`, `revision`. Output
/// of `get -o yaml` can be edited and applied again.
pub(crate) fn object_doc(o: &pb::Object) -> Value {
    let parse = |s: &str| serde_json::from_str::<Value>(s).unwrap_or(Value::Null);
    json!({
        "kind": o.kind,
        "metadata": {
            "name": o.name,
            "labels": o.labels.iter().collect::<std::collections::BTreeMap<_, _>>(),
            "uid": o.uid,
            "create_revision": o.create_revision,
        },
        "spec": parse(&o.spec_json),
        "status": parse(&o.status_json),
        "revision": o.revision,
    })
}

/// Prints a JSON value as JSON or YAML.
pub(crate) fn print_doc(value: &Value, format: Format) {
    match format {
        Format::Yaml => print!("{}", serde_yaml::to_string(value).unwrap_or_default()),
        _ => println!("{}", serde_json::to_string_pretty(value).unwrap_or_default()),
    }
}

pub(crate) fn print_objects(objects: &[pb::Object], format: Format, single: bool) {
    match format {
        Format::Table if single && objects.len() == 1 && objects[0].kind == "Adapter" => {
            print_table(&object_rows(objects));
            println!();
            print_table(&adapter_placement_rows(&object_doc(&objects[0])));
        }
        Format::Table if single && objects.len() == 1 && objects[0].kind == "Model" => {
            print_table(&object_rows(objects));
            let doc = object_doc(&objects[0]);
            println!();
            println!("{}", routing_line(&doc["spec"]));
            if !doc["spec"]["disaggregation"].is_null() {
                println!();
                print_table(&role_rows(&doc));
            }
            if !doc["spec"]["autoscaling"].is_null() {
                println!();
                for rows in autoscaling_rows(&doc) {
                    print_table(&rows);
                    println!();
                }
            }
        }
        Format::Table if single && objects.len() == 1 && objects[0].kind.starts_with("Federated") => {
            print_table(&object_rows(objects));
            println!();
            print_table(&federated_cluster_rows(&object_doc(&objects[0])));
        }
        Format::Table => print_table(&object_rows(objects)),
        _ if single && objects.len() == 1 => print_doc(&object_doc(&objects[0]), format),
        _ => print_doc(&Value::Array(objects.iter().map(object_doc).collect()), format),
    }
}

fn field(v: &Value, path: &str) -> String {
    let mut cur = v;
    for p in path.split('.') {
        cur = &cur[p];
    }
    match cur {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The column computed from a replica's download fields rather than read from one path.
const DOWNLOAD: &str = "(download)";
const NODES: &str = "(nodes)";
/// A Model's desired replicas: `spec.replicas`, or for a disaggregated Model (which runs
/// none itself) its roles' sum from `status.desired_replicas`.
const MODEL_DESIRED: &str = "(model desired)";

/// A replica's node, or a gang's member nodes in rank order (the head first).
fn nodes_cell(spec: &Value) -> String {
    match spec["members"].as_array().filter(|m| !m.is_empty()) {
        Some(members) => members.iter().filter_map(|m| m["node"].as_str()).collect::<Vec<_>>().join(","),
        None => field(spec, "node"),
    }
}

/// A replica's download progress while it downloads, `-` otherwise.
fn download_cell(status: &Value) -> String {
    match status["download_progress"].as_f64() {
        Some(f) => download_text(
            f,
            status["download_bytes"].as_u64(),
            status["download_total_bytes"].as_u64(),
            status["download_bytes_per_second"].as_f64(),
        ),
        None => "-".into(),
    }
}

/// Download progress as people read it: `42% 1.2 GiB/2.9 GiB 85 MiB/s` (the parts not
/// known are left out).
pub(crate) fn download_text(fraction: f64, bytes: Option<u64>, total: Option<u64>, rate: Option<f64>) -> String {
    let percent = (fraction.clamp(0.0, 1.0) * 100.0).floor();
    let mut text = format!("{percent}%");
    match (bytes, total) {
        (Some(b), Some(t)) => text.push_str(&format!(" {}/{}", human_bytes(b as f64), human_bytes(t as f64))),
        (Some(b), None) => text.push_str(&format!(" {}", human_bytes(b as f64))),
        _ => {}
    }
    if let Some(r) = rate.filter(|r| r.is_finite() && *r >= 0.0) {
        text.push_str(&format!(" {}/s", human_bytes(r)));
    }
    text
}

/// Bytes in binary units, rounded: `512 B`, `1.2 GiB`, `85 MiB` (one decimal below 10).
pub(crate) fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n.max(0.0);
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 || v >= 9.95 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn object_rows(objects: &[pb::Object]) -> Vec<Vec<String>> {
    let kind = objects.first().map(|o| o.kind.as_str()).unwrap_or("");
    let columns: &[(&str, &str)] = match kind {
        "Model" => &[
            ("ENGINE", "spec.engine"),
            ("DESIRED", MODEL_DESIRED),
            ("READY", "status.ready_replicas"),
            ("GPUS", "spec.gpus"),
            ("SOURCE", "spec.source"),
        ],
        "Adapter" => &[
            ("BASE-MODEL", "spec.base_model"),
            ("PHASE", "status.phase"),
            ("DESIRED", "spec.replicas"),
            ("LOADED", "status.loaded_replicas"),
            ("LOAD-MS", "status.load_latency_ms"),
            ("REASON", "status.reason"),
        ],
        "Tenant" => &[("PRIORITY", "spec.priority"), ("RPM", "spec.rpm"), ("TPM", "spec.tpm")],
        "Token" => &[("ROLE", "spec.role"), ("IDENTITY", "spec.identity"), ("EXPIRES-AT", "spec.expires_at")],
        "Replica" => &[
            ("MODEL", "spec.model"),
            ("NODE", NODES),
            ("GPUS", "spec.gpus"),
            ("PHASE", "status.phase"),
            ("ENDPOINT", "status.endpoint"),
            ("RESTARTS", "status.restarts"),
            ("DOWNLOAD", DOWNLOAD),
            ("REASON", "status.reason"),
        ],
        "Node" => &[("ADDRESS", "spec.address"), ("STATE", "status.state"), ("CORDONED", "spec.cordoned")],
        "Cluster" => &[
            ("REGION", "metadata.labels.region"),
            ("REACHABLE", "status.reachable"),
            ("FEDERATED", "status.federated_models"),
            ("GATEWAY", "spec.gateway"),
            ("MESSAGE", "status.message"),
        ],
        "FederatedAdapter" => &[("BASE-MODEL", "spec.template.base_model"), ("MESSAGE", "status.message")],
        "FederatedModel" => &[
            ("DESIRED", "spec.replicas"),
            ("PLACED", "status.placed"),
            ("READY", "status.ready"),
            ("MESSAGE", "status.message"),
        ],
        _ => &[],
    };
    let mut rows = vec![std::iter::once("NAME")
        .chain(columns.iter().map(|c| c.0))
        .chain(["REVISION"])
        .map(String::from)
        .collect()];
    for o in objects {
        let doc = object_doc(o);
        let mut row = vec![o.name.clone()];
        row.extend(columns.iter().map(|(_, path)| match *path {
            DOWNLOAD => download_cell(&doc["status"]),
            NODES => nodes_cell(&doc["spec"]),
            MODEL_DESIRED if !doc["spec"]["disaggregation"].is_null() => field(&doc, "status.desired_replicas"),
            MODEL_DESIRED => field(&doc, "spec.replicas"),
            path => field(&doc, path),
        }));
        row.push(o.revision.to_string());
        rows.push(row);
    }
    rows
}

/// One row per base replica of an adapter: where it is loaded, and why not elsewhere.
fn adapter_placement_rows(doc: &Value) -> Vec<Vec<String>> {
    let mut rows = vec![["REPLICA", "NODE", "STATE", "PINNED", "REASON"].map(String::from).to_vec()];
    for r in doc["status"]["replicas"].as_array().into_iter().flatten() {
        rows.push(vec![
            field(r, "replica"),
            field(r, "node"),
            field(r, "state"),
            if r["pinned"].as_bool() == Some(true) { "yes".into() } else { "-".into() },
            field(r, "reason"),
        ]);
    }
    if rows.len() == 1 {
        rows.push(vec!["(no replica of the base model)".into()]);
    }
    rows
}

/// How gateways route a Model's requests, and with what they key its prompts (the KV-aware
/// strategies need the model's tokenizer; docs/gateway.md).
fn routing_line(spec: &Value) -> String {
    let routing = spec["routing"].as_str().unwrap_or("auto");
    let how = match routing {
        "auto" => "auto: kv-aware once the engines publish KV events (agent --kv-events), least-request until then",
        "kv-aware" => "kv-aware",
        other => return format!("Routing: {other}"),
    };
    let source = spec["source"].as_str().unwrap_or_default();
    let keys = if spec["engine"].as_str() == Some("sim") {
        "prompts keyed with token ids (the sim's tokenizer)"
    } else if source.starts_with("http://") || source.starts_with("https://") {
        "prompts keyed approximately: a single-file source has no tokenizer files"
    } else {
        "prompts keyed with token ids from the source's tokenizer files, which each gateway \
         fetches (approximately where it cannot: metric flotilla_gateway_kv_token_exact)"
    };
    format!("Routing: {how}; {keys}")
}

/// A FederatedModel's clusters: its share of each, what the cluster's member Model asks
/// and has Ready, and why it is not as desired.
fn federated_cluster_rows(doc: &Value) -> Vec<Vec<String>> {
    let mut rows = vec![["CLUSTER", "DESIRED", "REPLICAS", "READY", "STATE", "MESSAGE"].map(String::from).to_vec()];
    for c in doc["status"]["clusters"].as_array().into_iter().flatten() {
        rows.push(vec![
            field(c, "name"),
            field(c, "desired"),
            field(c, "replicas"),
            field(c, "ready"),
            field(c, "state"),
            field(c, "message"),
        ]);
    }
    if rows.len() == 1 {
        rows.push(vec!["(no cluster selected yet)".into()]);
    }
    rows
}

/// A disaggregated Model's roles: the member Model serving each, its pool and counts.
fn role_rows(doc: &Value) -> Vec<Vec<String>> {
    let d = &doc["spec"]["disaggregation"];
    let mut rows = vec![["ROLE", "MODEL", "CONNECTOR", "DESIRED", "READY"].map(String::from).to_vec()];
    for role in ["prefill", "decode"] {
        let status = doc["status"]["roles"].as_array().into_iter().flatten().find(|r| r["role"] == role);
        let (model, desired, ready) = match status {
            Some(r) => (field(r, "model"), field(r, "desired_replicas"), field(r, "ready_replicas")),
            None => ("(not created yet)".into(), field(d, &format!("{role}.replicas")), "-".into()),
        };
        rows.push(vec![role.into(), model, field(d, "connector"), desired, ready]);
    }
    rows
}

/// A model's autoscaling, like `kubectl get hpa`: bounds and desired count, each metric
/// against its target, and the last scaling decisions (newest first).
fn autoscaling_rows(doc: &Value) -> Vec<Vec<Vec<String>>> {
    let spec = &doc["spec"]["autoscaling"];
    let st = &doc["status"]["autoscaling"];
    let summary = vec![
        ["STRATEGY", "MIN", "MAX", "CURRENT", "DESIRED", "REASON"].map(String::from).to_vec(),
        vec![
            field(spec, "strategy"),
            field(spec, "min"),
            field(spec, "max"),
            field(&doc["status"], "ready_replicas"),
            field(st, "desired_replicas"),
            field(st, "reason"),
        ],
    ];
    let mut metrics = vec![["METRIC", "VALUE", "TARGET"].map(String::from).to_vec()];
    for m in st["metrics"].as_array().into_iter().flatten() {
        let value = match m["value"].as_f64() {
            Some(v) => format!("{v:.2}"),
            None => "<unknown>".into(),
        };
        metrics.push(vec![field(m, "name"), value, field(m, "target")]);
    }
    let mut history = vec![["WHEN", "FROM", "TO", "REASON"].map(String::from).to_vec()];
    let now_ms = flotilla_api::civil::unix_ms();
    for e in st["history"].as_array().into_iter().flatten().rev() {
        let ago = now_ms.saturating_sub(e["at_ms"].as_u64().unwrap_or(0)) / 1000;
        history.push(vec![format!("{ago}s ago"), field(e, "from"), field(e, "to"), field(e, "reason")]);
    }
    if history.len() == 1 {
        history.push(vec!["(no scaling yet)".into()]);
    }
    vec![summary, metrics, history]
}

/// Prints rows as left-aligned columns separated by three spaces.
pub(crate) fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    for row in rows {
        let line: Vec<String> = row.iter().enumerate().map(|(i, cell)| format!("{cell:<w$}", w = widths[i])).collect();
        println!("{}", line.join("   ").trim_end());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_routing_line_says_how_prompts_are_keyed() {
        let line = |v: Value| routing_line(&v);
        assert_eq!(line(serde_json::json!({"routing": "round-robin", "source": "hf://o/m"})), "Routing: round-robin");
        let sim = line(serde_json::json!({"engine": "sim", "source": "hf://o/m"}));
        assert!(sim.starts_with("Routing: auto: kv-aware once") && sim.ends_with("(the sim's tokenizer)"), "{sim}");
        let gguf = line(serde_json::json!({"routing": "kv-aware", "source": "https://h/m.gguf"}));
        assert_eq!(gguf, "Routing: kv-aware; prompts keyed approximately: a single-file source has no tokenizer files");
        let hf = line(serde_json::json!({"routing": "kv-aware", "source": "hf://o/m"}));
        assert!(hf.contains("from the source's tokenizer files, which each gateway fetches"), "{hf}");
    }

    #[test]
    fn a_disaggregated_model_shows_its_roles() {
        let doc = serde_json::json!({
            "spec": {"replicas": 1, "disaggregation": {"connector": "nixl", "prefill": {"replicas": 2}, "decode": {"replicas": 3}}},
            "status": {"desired_replicas": 5, "roles": [
                {"role": "prefill", "model": "chat-prefill", "desired_replicas": 2, "ready_replicas": 1}
            ]}
        });
        let rows = role_rows(&doc);
        assert_eq!(rows[1], ["prefill", "chat-prefill", "nixl", "2", "1"]);
        assert_eq!(rows[2], ["decode", "(not created yet)", "nixl", "3", "-"]);
    }

    #[test]
    fn download_progress_reads_as_percent_bytes_and_rate() {
        let gib = 1u64 << 30;
        assert_eq!(
            download_text(0.42, Some(gib + gib / 5), Some(2 * gib + gib * 9 / 10), Some(85.0 * 1048576.0)),
            "42% 1.2 GiB/2.9 GiB 85 MiB/s"
        );
        assert_eq!(download_text(0.4, None, None, None), "40%");
        assert_eq!(download_text(1.7, Some(300), None, Some(0.0)), "100% 300 B 0 B/s");
        assert_eq!(download_text(0.0, Some(5 << 20), None, Some(f64::NAN)), "0% 5.0 MiB");
        assert_eq!(human_bytes(1023.0), "1023 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes(9.99 * 1048576.0), "10 MiB");
        assert_eq!(human_bytes(140.0 * (1u64 << 40) as f64), "140 TiB");
    }

    #[test]
    fn a_gang_shows_its_member_nodes_head_first() {
        let gang = json!({"node": "n1", "members": [{"node": "n1", "gpus": [0]}, {"node": "n3", "gpus": [1]}]});
        assert_eq!(nodes_cell(&gang), "n1,n3");
        assert_eq!(nodes_cell(&json!({"node": "n2", "members": []})), "n2");
        assert_eq!(nodes_cell(&json!({})), "-", "not bound yet");
    }

    #[test]
    fn replicas_show_their_download_while_downloading() {
        let o = |status: Value| pb::Object {
            kind: "Replica".into(),
            name: "chat-1".into(),
            spec_json: json!({"model": "chat"}).to_string(),
            status_json: status.to_string(),
            ..Default::default()
        };
        let rows = object_rows(&[
            o(
                json!({"phase": "Starting", "download_progress": 0.5, "download_bytes": 1u64 << 30, "download_total_bytes": 2u64 << 30}),
            ),
            o(json!({"phase": "Ready"})),
        ]);
        let col = rows[0].iter().position(|c| c == "DOWNLOAD").unwrap();
        assert_eq!(rows[1][col], "50% 1.0 GiB/2.0 GiB");
        assert_eq!(rows[2][col], "-");
    }
}
