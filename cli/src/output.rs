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
            if !doc["spec"]["autoscaling"].is_null() {
                println!();
                for rows in autoscaling_rows(&doc) {
                    print_table(&rows);
                    println!();
                }
            }
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

fn object_rows(objects: &[pb::Object]) -> Vec<Vec<String>> {
    let kind = objects.first().map(|o| o.kind.as_str()).unwrap_or("");
    let columns: &[(&str, &str)] = match kind {
        "Model" => &[
            ("ENGINE", "spec.engine"),
            ("DESIRED", "spec.replicas"),
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
            ("NODE", "spec.node"),
            ("GPUS", "spec.gpus"),
            ("PHASE", "status.phase"),
            ("ENDPOINT", "status.endpoint"),
            ("RESTARTS", "status.restarts"),
            ("REASON", "status.reason"),
        ],
        "Node" => &[("ADDRESS", "spec.address"), ("STATE", "status.state"), ("CORDONED", "spec.cordoned")],
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
        row.extend(columns.iter().map(|(_, path)| field(&doc, path)));
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
