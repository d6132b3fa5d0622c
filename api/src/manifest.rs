//! Manifests: the documents operators write (`kind`, `metadata`, `spec`), in YAML or JSON.
//! Parsing is strict: unknown fields, bad names and out-of-range numbers are errors that
//! name the field, and a multi-document file is split into its documents first.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{ApiError, Kind, ObjectName, Spec};

/// Largest manifest the API accepts, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 256 * 1024;

/// `metadata` of a manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: ObjectName,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// One parsed and validated manifest document.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub metadata: Metadata,
    pub spec: Spec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    #[serde(rename = "apiVersion", default)]
    api_version: Option<String>,
    kind: String,
    metadata: RawMetadata,
    spec: serde_yaml::Value,
    // Accepted so `get -o yaml` output can be re-applied; always ignored.
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<serde_yaml::Value>,
    #[serde(default)]
    #[allow(dead_code)]
    revision: Option<serde_yaml::Value>,
}

/// `metadata` with the name not yet checked, so a bad name is reported as `metadata.name`
/// in JSON and YAML alike (serde would report only the position, or `metadata`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetadata {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

impl Manifest {
    pub fn kind(&self) -> Kind {
        self.spec.kind()
    }

    /// Parses one YAML or JSON document.
    pub fn parse(text: &str) -> Result<Manifest, ApiError> {
        if text.len() > MAX_MANIFEST_BYTES {
            return Err(ApiError::TooLarge { size: text.len(), limit: MAX_MANIFEST_BYTES });
        }
        // JSON is YAML too, but serde_json parses it several times faster. A document that
        // opens with '{' but is not JSON may be flow-style YAML (`{kind: Model, ...}`).
        let yaml = |text: &str| serde_yaml::from_str(text).map_err(|e| ApiError::Parse(clean_yaml_error(e)));
        let raw: RawManifest = if text.trim_start().starts_with('{') {
            match serde_json::from_str(text) {
                Ok(raw) => raw,
                Err(e) if e.is_syntax() => yaml(text).map_err(|_| ApiError::Parse(e.to_string()))?,
                Err(e) => return Err(ApiError::Parse(e.to_string())),
            }
        } else {
            yaml(text)?
        };
        if let Some(v) = raw.api_version.as_deref() {
            if v != "flotilla/v1" {
                return Err(ApiError::invalid("apiVersion", format!("{v:?} is not supported; use flotilla/v1")));
            }
        }
        let kind: Kind = raw.kind.parse()?;
        let metadata = Metadata { name: raw.metadata.name.parse()?, labels: raw.metadata.labels };
        validate_labels("metadata.labels", &metadata.labels)?;
        let spec = Spec::from_yaml(kind, raw.spec)?;
        if let Spec::Model(m) = &spec {
            if m.disaggregation.is_some() && metadata.name.as_str().len() > crate::spec::MAX_DISAGGREGATED_NAME {
                return Err(ApiError::invalid(
                    "metadata.name",
                    format!(
                        "a disaggregated Model's name is at most {} characters (its members are <name>-prefill and <name>-decode)",
                        crate::spec::MAX_DISAGGREGATED_NAME
                    ),
                ));
            }
        }
        Ok(Manifest { metadata, spec })
    }

    /// Splits a file into its documents (`---` separated) and parses each. Empty documents
    /// are skipped; a file with none is an error.
    pub fn parse_all(text: &str) -> Result<Vec<Manifest>, ApiError> {
        let mut out = Vec::new();
        for (i, doc) in split_documents(text).into_iter().enumerate() {
            let m = Manifest::parse(&doc).map_err(|e| match e {
                ApiError::Parse(msg) => ApiError::Parse(format!("document {}: {msg}", i + 1)),
                other => other,
            })?;
            out.push(m);
        }
        if out.is_empty() {
            return Err(ApiError::Parse("the file holds no manifest".into()));
        }
        Ok(out)
    }

    /// The canonical single-document YAML text of this manifest.
    pub fn to_yaml(&self) -> String {
        #[derive(Serialize)]
        struct Out<'a> {
            kind: Kind,
            metadata: &'a Metadata,
            spec: &'a Spec,
        }
        serde_yaml::to_string(&Out { kind: self.kind(), metadata: &self.metadata, spec: &self.spec })
            .expect("manifests serialize to YAML")
    }
}

/// Checks labels (at most 64; keys 1-63 characters of letters, digits, `-_./`; values at
/// most 256 characters without `,` or `=`); errors name `field` (`metadata.labels`, or
/// `register.labels` for the labels an agent gives its node).
pub fn validate_labels(field: &str, labels: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if labels.len() > 64 {
        return Err(ApiError::invalid(field, format!("has {} labels, over the maximum of 64", labels.len())));
    }
    for (k, v) in labels {
        let ok_key =
            !k.is_empty() && k.len() <= 63 && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
        if !ok_key {
            return Err(ApiError::invalid(
                field,
                format!("key {k:?} must be 1-63 characters of letters, digits, '-', '_', '.', '/'"),
            ));
        }
        if v.len() > 256 || v.contains([',', '=']) {
            return Err(ApiError::invalid(
                format!("{field}.{k}"),
                format!("value {v:?} must be at most 256 characters without ',' or '='"),
            ));
        }
    }
    Ok(())
}

/// Splits YAML text at lines that are exactly `---` (document markers).
fn split_documents(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            docs.push(String::new());
        } else {
            let cur = docs.last_mut().expect("never empty");
            cur.push_str(line);
            cur.push('\n');
        }
    }
    docs.into_iter().filter(|d| d.lines().any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))).collect()
}

fn clean_yaml_error(e: serde_yaml::Error) -> String {
    let msg = e.to_string();
    if msg.contains("EOF while parsing") || msg.is_empty() {
        return "the manifest is empty or truncated".into();
    }
    // serde_yaml leaves the position out of some syntax errors at the start of the text
    // ("control characters are not allowed"); say where, unless a field is named.
    match e.location() {
        Some(at) if !msg.contains(" line ") && !msg.contains('`') => {
            format!("{msg} at line {} column {}", at.line(), at.column())
        }
        _ => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = "kind: Model\nmetadata:\n  name: llama\n  labels: {team: search}\nspec:\n  source: hf://meta/llama\n  replicas: 2\n";

    #[test]
    fn parses_model_with_defaults() {
        let m = Manifest::parse(MODEL).unwrap();
        assert_eq!(m.kind(), Kind::Model);
        assert_eq!(m.metadata.name.as_str(), "llama");
        let Spec::Model(s) = &m.spec else { panic!("not a model") };
        assert_eq!((s.replicas, s.gpus), (2, 1));
        assert_eq!(s.routing, crate::spec::RoutingStrategy::Auto);
    }

    #[test]
    fn a_topology_is_checked_and_ray_runs_without_images() {
        let with = |t: &str| format!("{MODEL}  gpus: 16\n  topology: {t}\n");
        let m = Manifest::parse(&with("{nodes: 2, gpus_per_node: 8}")).unwrap();
        let Spec::Model(s) = &m.spec else { panic!("not a model") };
        assert_eq!(s.topology.as_ref().map(|t| (t.nodes, t.gpus_per_node)), Some((2, 8)));
        assert!(Manifest::parse(&with("{nodes: 2, gpus_per_node: 8, layout: data-parallel}")).is_ok());
        assert!(Manifest::parse(&with("{nodes: 2, gpus_per_node: 8, layout: ray}")).is_ok());
        let imaged = with("{nodes: 2, gpus_per_node: 8, layout: ray}") + "  engine_image: vllm/vllm-openai:v0.11.0\n";
        let e = Manifest::parse(&imaged).unwrap_err().to_string();
        assert!(e.contains("spec.engine_image") && e.contains("layout ray"), "{e}");
        let e = Manifest::parse(&with("{nodes: 2, gpus_per_node: 4}")).unwrap_err().to_string();
        assert!(e.contains("spec.gpus") && e.contains("2 nodes x 4 GPUs = 8"), "{e}");
        let e = Manifest::parse(&with("{nodes: 2, gpus_per_node: 8, placement: tight}")).unwrap_err().to_string();
        assert!(e.contains("placement") || e.contains("tight"), "{e}");
    }

    #[test]
    fn json_is_accepted() {
        let j = r#"{"kind":"Model","metadata":{"name":"m"},"spec":{"source":"file:///m","engine":"sim"}}"#;
        assert!(Manifest::parse(j).is_ok());
    }

    fn err(text: &str) -> String {
        Manifest::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_field() {
        let e = err(&MODEL.replace("replicas: 2", "replicas: -1"));
        assert!(e.contains("replicas") && e.contains("-1"), "{e}");
        let e = err(&MODEL.replace("replicas: 2", "replicas: 2\n  colour: red"));
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = err(&MODEL.replace("name: llama", "name: Llama_3"));
        assert!(e.contains("metadata.name") || e.contains("Llama_3"), "{e}");
        let e = err(&MODEL.replace("hf://meta/llama", "\"\""));
        assert!(e.starts_with("spec.source"), "{e}");
        let e = err(&MODEL.replace("kind: Model", "kind: Gadget"));
        assert!(e.contains("Gadget"), "{e}");
        let e = err(&MODEL.replace("replicas: 2", "replicas: 100000"));
        assert!(e.starts_with("spec.replicas") && e.contains("100000"), "{e}");
        let e = err("kind: Model\nmetadata: {name: a}\nspec: [unclosed");
        assert!(!e.is_empty());
        let e = err(&MODEL.replace("metadata:", "metdata:"));
        assert!(e.contains("metdata"), "{e}");
        assert!(matches!(Manifest::parse(&"x".repeat(MAX_MANIFEST_BYTES + 1)), Err(ApiError::TooLarge { .. })));
    }

    /// Found by `api/tests/proptest_specs.rs`: a bad name in `spec.models` or
    /// `spec.base_model` was reported as `metadata.name`, and a bad `metadata.name` in JSON
    /// named no field.
    #[test]
    fn bad_names_are_reported_where_they_are() {
        let e = err(r#"{"kind":"Model","metadata":{"name":"A_B"},"spec":{}}"#);
        assert!(e.starts_with("metadata.name: \"A_B\""), "{e}");
        let e = err("kind: Model\nmetadata: {name: A_B}\nspec: {source: hf://x}\n");
        assert!(e.starts_with("metadata.name: \"A_B\""), "{e}");
        let e = err("kind: Tenant\nmetadata: {name: a}\nspec: {models: [ok, A_B]}\n");
        assert!(e.starts_with("spec.models[1]: \"A_B\"") && !e.contains("metadata"), "{e}");
        let e = err("kind: Adapter\nmetadata: {name: a}\nspec: {base_model: A_B, source: hf://x}\n");
        assert!(e.starts_with("spec.base_model: \"A_B\"") && !e.contains("metadata"), "{e}");
    }

    /// Found by `api/tests/proptest_specs.rs`: a flow-style YAML document (it starts with
    /// '{' but is not JSON) was parsed as JSON only, and refused.
    #[test]
    fn flow_style_yaml_is_yaml() {
        let m = Manifest::parse("{kind: Model, metadata: {name: m}, spec: {source: 'hf://m', replicas: 2}}").unwrap();
        let Spec::Model(s) = &m.spec else { panic!("not a model") };
        assert_eq!((m.metadata.name.as_str(), s.replicas), ("m", 2));
        // Broken JSON still reports the JSON error, with its position.
        let e = err(r#"{"kind": "Model", "metadata": {"name": "m"}, "spec": {"replicas": 2}"#);
        assert!(e.contains("line 1 column"), "{e}");
    }

    /// Found by `api/tests/proptest_specs.rs`: some YAML syntax errors had no position.
    #[test]
    fn syntax_errors_say_where() {
        for text in ["\0", "]", "kind: Model\n\u{1}"] {
            let e = err(text);
            assert!(e.contains("line ") && e.contains("column "), "{text:?}: {e}");
        }
    }

    /// Found by `api/tests/proptest_specs.rs`: JSON numbers were parsed to a neighbouring
    /// f64, so a JSON manifest and its YAML twin stored different autoscaling targets.
    #[test]
    fn json_floats_parse_exactly() {
        let target = 3.56160271553816e123_f64;
        let autoscaling =
            serde_json::json!({"max": 1, "metric": {"name": "vllm:num_requests_waiting", "target": target}});
        let spec = serde_json::json!({"source": "hf://m", "autoscaling": autoscaling});
        let j = serde_json::json!({"kind": "Model", "metadata": {"name": "m"}, "spec": spec});
        let Spec::Model(s) = Manifest::parse(&j.to_string()).unwrap().spec else { panic!("not a model") };
        assert_eq!(s.autoscaling.unwrap().metric.unwrap().target.to_bits(), target.to_bits());
    }

    #[test]
    fn autoscaling_bounds() {
        let base = format!("{MODEL}  autoscaling:\n    min: 3\n    max: 2\n    metric: {{name: m, target: 4}}\n");
        assert!(err(&base).starts_with("spec.autoscaling.min"));
    }

    #[test]
    fn multi_document_files() {
        let text = format!("# models\n---\n{MODEL}---\nkind: Tenant\nmetadata: {{name: acme}}\nspec: {{rpm: 600, priority: critical}}\n");
        let all = Manifest::parse_all(&text).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].kind(), Kind::Tenant);
        assert!(Manifest::parse_all("# nothing\n").is_err());
        let e = Manifest::parse_all(&format!("{MODEL}---\nkind: Tenant\nmetadata: {{name: a}}\nspec: {{rpm: -5}}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("document 2") && e.contains("rpm"), "{e}");
    }

    #[test]
    fn round_trips_through_yaml() {
        let m = Manifest::parse(MODEL).unwrap();
        assert_eq!(Manifest::parse(&m.to_yaml()).unwrap(), m);
    }
}
