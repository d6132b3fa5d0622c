//! Property tests of manifest parsing and validation (`Manifest::parse`, `parse_all`, the
//! per-kind specs): arbitrary input never panics and fails with a message that names a field
//! or a position; every valid Model, Adapter and Tenant round-trips through YAML and JSON;
//! one invalid field in an otherwise valid manifest is reported by its name.
//!
//! ```text
//!  strategies ──> valid spec ──to_yaml / to_json──> text ──parse──> equal spec
//!                     └──mutate one field──> text ──parse──> Err naming that field
//!  any bytes / mangled manifests ──parse──> Ok | Err(message with field or line)
//! ```
use std::collections::BTreeMap;

use flotilla_api::spec::{
    AdapterSpec, AutoscalingSpec, EngineKind, MetricKind, MetricTarget, ModelSpec, PriorityClass, RoutingStrategy,
    ScalingStrategy, SloTarget, TenantSpec,
};
use flotilla_api::{ApiError, Manifest, Metadata, ObjectName, Spec, MAX_MANIFEST_BYTES};
use proptest::prelude::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------
// Strategies for valid specs.

fn name() -> impl Strategy<Value = ObjectName> {
    "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?".prop_map(|s| s.parse().expect("the regex yields DNS labels"))
}

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    // Values are any text without ',' or '=' (control characters and non-ASCII included).
    prop::collection::btree_map("[A-Za-z0-9._/-]{1,20}", "[^,=]{0,24}", 0..4)
}

fn source() -> impl Strategy<Value = String> {
    let scheme = prop::sample::select(vec!["file://", "http://", "https://", "s3://", "hf://"]);
    (scheme, "[^\\s]{1,8}.{0,30}").prop_map(|(s, rest)| format!("{s}{rest}"))
}

fn engine() -> impl Strategy<Value = EngineKind> {
    prop::sample::select(vec![EngineKind::Vllm, EngineKind::Sim])
}

fn routing() -> impl Strategy<Value = RoutingStrategy> {
    prop::sample::select(RoutingStrategy::ALL.to_vec())
}

fn priority() -> impl Strategy<Value = PriorityClass> {
    prop::sample::select(vec![PriorityClass::Critical, PriorityClass::Standard, PriorityClass::Sheddable])
}

fn positive_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        (1u32..10_000).prop_map(f64::from),
        prop::num::f64::POSITIVE | prop::num::f64::NORMAL | prop::num::f64::SUBNORMAL,
    ]
    .prop_filter("finite and positive", |f| f.is_finite() && *f > 0.0)
}

fn autoscaling() -> impl Strategy<Value = AutoscalingSpec> {
    let strategy = prop::sample::select(vec![
        ScalingStrategy::Kpa,
        ScalingStrategy::Apa,
        ScalingStrategy::Slo,
        ScalingStrategy::Hpa,
    ]);
    let kind = prop::sample::select(MetricKind::ALL.to_vec());
    (0u32..=1000, 0u32..=1000, strategy, kind, positive_f64()).prop_map(|(a, b, strategy, kind, target)| {
        let target = if kind == MetricKind::KvCacheUsage { target.min(1.0) } else { target };
        let metric = MetricTarget { source: kind.source(), name: kind.name().to_string(), target };
        let (metric, slo) = match strategy {
            ScalingStrategy::Slo => (None, Some(SloTarget { ttft_p95_ms: Some(target), tpot_p95_ms: None })),
            _ => (Some(metric), None),
        };
        AutoscalingSpec { min: a.min(b), max: a.max(b), strategy, metric, slo, ..AutoscalingSpec::default() }
    })
}

fn model_spec() -> impl Strategy<Value = ModelSpec> {
    (
        engine(),
        source(),
        0u32..=1000,
        0u32..=64,
        prop::collection::vec("[^\\s]{1,10}( [^\\s]{1,10})?", 0..4),
        prop::collection::vec(".{0,16}", 0..4),
        routing(),
        prop::option::of(autoscaling().prop_map(Box::new)),
    )
        .prop_map(|(engine, source, replicas, gpus, gpu_types, engine_args, routing, autoscaling)| ModelSpec {
            engine_image: Default::default(),
            topology: None,
            disaggregation: None,
            kv_transfer: None,
            engine,
            source,
            replicas,
            gpus,
            gpu_types,
            engine_args,
            routing,
            autoscaling,
            rollout: Default::default(),
        })
}

fn adapter_spec() -> impl Strategy<Value = AdapterSpec> {
    use flotilla_api::spec::{AdapterPlacement, AdapterReplicas};
    let replicas = prop_oneof![(0u32..=1000).prop_map(AdapterReplicas::Count), Just(AdapterReplicas::OnDemand)];
    let placement = prop_oneof![
        Just(AdapterPlacement::LeastAdapters),
        Just(AdapterPlacement::BinPack),
        Just(AdapterPlacement::LeastLoad)
    ];
    let tenants = prop::collection::btree_set(name(), 0..4).prop_map(|s| s.into_iter().collect::<Vec<_>>());
    (name(), source(), replicas, placement, proptest::option::of(1u32..=512), tenants).prop_map(
        |(base_model, source, replicas, placement, rank, tenants)| AdapterSpec {
            base_model,
            source,
            rank,
            replicas,
            placement,
            tenants,
        },
    )
}

fn tenant_spec() -> impl Strategy<Value = TenantSpec> {
    (
        0u64..=100_000_000,
        0u64..=100_000_000_000,
        priority(),
        prop::collection::vec(name(), 0..4),
        prop::collection::vec("\\S{8,40}", 0..3),
        proptest::option::of(0u32..=1_000_000),
    )
        .prop_map(|(rpm, tpm, priority, models, api_keys, max_concurrent_requests)| TenantSpec {
            rpm,
            tpm,
            priority,
            models,
            api_keys,
            keys: vec![],
            max_concurrent_requests,
        })
}

fn spec() -> impl Strategy<Value = Spec> {
    prop_oneof![
        model_spec().prop_map(Spec::Model),
        adapter_spec().prop_map(Spec::Adapter),
        tenant_spec().prop_map(Spec::Tenant),
    ]
}

fn manifest() -> impl Strategy<Value = Manifest> {
    (name(), labels(), spec()).prop_map(|(name, labels, spec)| Manifest { metadata: Metadata { name, labels }, spec })
}

/// What parsing a valid manifest yields: the same, with plain-text API keys hashed.
fn as_parsed(m: &Manifest) -> Manifest {
    let mut out = m.clone();
    if let Spec::Tenant(t) = &mut out.spec {
        t.hash_keys();
    }
    out
}

/// The manifest as a JSON document (`kind`, `metadata`, `spec`).
fn to_json(m: &Manifest) -> Value {
    json!({ "kind": m.kind().as_str(), "metadata": m.metadata, "spec": m.spec.to_json() })
}

// ---------------------------------------------------------------------------------------
// What an error must look like.

/// Words that place an error: a field path, a position, or the whole document.
const PLACES: [&str; 16] = [
    "spec",
    "metadata",
    "kind",
    "apiVersion",
    "status",
    "revision",
    "line ",
    "column ",
    "position ",
    "empty or truncated",
    "holds no manifest",
    "unknown field",
    "missing field",
    "document ",
    "over the limit",
    "invalid type",
];

fn assert_placed(e: &ApiError, input: &str) {
    let msg = e.to_string();
    assert!(!msg.trim().is_empty(), "empty error message for {input:?}");
    assert!(PLACES.iter().any(|p| msg.contains(p)), "error {msg:?} names no field or position (input {input:?})");
    assert!(!e.code().is_empty());
}

fn parse_checked(text: &str) {
    match Manifest::parse(text) {
        Ok(m) => {
            // Whatever parses is valid and re-parses from its canonical YAML.
            m.spec.validate().expect("a parsed manifest is valid");
            assert_eq!(Manifest::parse(&m.to_yaml()).expect("canonical YAML parses"), m, "input {text:?}");
        }
        Err(e) => assert_placed(&e, text),
    }
    match Manifest::parse_all(text) {
        Ok(all) => assert!(!all.is_empty()),
        Err(e) => assert_placed(&e, text),
    }
}

/// A valid manifest text with `edits` byte-level edits (insert, delete, replace), so the
/// parser is driven past the first few characters.
fn mangled() -> impl Strategy<Value = String> {
    let edit =
        (any::<prop::sample::Index>(), 0u8..3, prop::sample::select(b": -[]{}\"'#\n\t,0a-zZ\\&*!|>%@`".to_vec()));
    (manifest(), prop::bool::ANY, prop::collection::vec(edit, 1..4)).prop_map(|(m, as_json, edits)| {
        let mut bytes =
            if as_json { serde_json::to_vec(&to_json(&m)).expect("json") } else { m.to_yaml().into_bytes() };
        for (at, op, b) in edits {
            let i = at.index(bytes.len() + 1);
            match op {
                0 => bytes.insert(i, b),
                1 if i < bytes.len() => {
                    bytes.remove(i);
                }
                _ if i < bytes.len() => bytes[i] = b,
                _ => bytes.push(b),
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

// ---------------------------------------------------------------------------------------
// Mutations that make exactly one field invalid.

/// One invalid value for a field of a Model spec, and the name its error must carry.
fn model_mutation() -> impl Strategy<Value = (&'static str, Value, &'static str)> {
    prop_oneof![
        (i64::MIN..0).prop_map(|v| ("replicas", json!(v), "replicas")),
        (1001u64..).prop_map(|v| ("replicas", json!(v), "replicas")),
        (65u64..).prop_map(|v| ("gpus", json!(v), "gpus")),
        (i64::MIN..0).prop_map(|v| ("gpus", json!(v), "gpus")),
        "[a-z]{1,10}".prop_filter("not an engine", |s| s != "vllm" && s != "sim").prop_map(|s| (
            "engine",
            json!(s),
            "engine"
        )),
        "[a-z-]{1,16}".prop_filter("not a routing strategy", |s| s.parse::<RoutingStrategy>().is_err()).prop_map(|s| (
            "routing",
            json!(s),
            "routing"
        )),
        bad_source().prop_map(|s| ("source", json!(s), "source")),
        Just(("source", json!(""), "source")),
        Just(("gpu_types", json!(["ok", " "]), "gpu_types[1]")),
        Just(("replicas", json!("two"), "replicas")),
        Just(("autoscaling", json!({"min": 3, "max": 2, "metric": {"name": "m", "target": 1}}), "autoscaling.min")),
        Just(("autoscaling", json!({"max": 2, "metric": {"name": "m", "target": -1.0}}), "autoscaling.metric.target")),
        Just(("autoscaling", json!({"max": 2, "metric": {"name": " ", "target": 1}}), "autoscaling.metric.name")),
        Just(("autoscaling", json!({"max": 1001, "metric": {"name": "m", "target": 1}}), "autoscaling.max")),
        Just(("autoscaling", json!({"max": 2, "strategy": "magic", "metric": {"name": "m", "target": 1}}), "strategy")),
    ]
}

fn bad_source() -> impl Strategy<Value = String> {
    ("[a-z0-9+.]{1,8}", "[a-z/]{1,10}")
        .prop_filter("unsupported scheme", |(s, _)| !["file", "http", "https", "s3", "hf"].contains(&s.as_str()))
        .prop_map(|(s, rest)| format!("{s}://{rest}"))
}

fn tenant_mutation() -> impl Strategy<Value = (&'static str, Value, &'static str)> {
    prop_oneof![
        (100_000_001u64..).prop_map(|v| ("rpm", json!(v), "rpm")),
        (i64::MIN..0).prop_map(|v| ("rpm", json!(v), "rpm")),
        (100_000_000_001u64..).prop_map(|v| ("tpm", json!(v), "tpm")),
        "[a-z]{1,10}".prop_filter("not a class", |s| s.parse::<PriorityClass>().is_err()).prop_map(|s| (
            "priority",
            json!(s),
            "priority"
        )),
        // Too short (the limit counts bytes, so ASCII here).
        "[!-~]{0,7}".prop_map(|k| ("api_keys", json!([k]), "api_keys[0]")),
        Just(("api_keys", json!(["has a space in it"]), "api_keys[0]")),
        "[A-Z_.]{1,8}".prop_map(|n| ("models", json!([n]), "models")),
    ]
}

fn adapter_mutation() -> impl Strategy<Value = (&'static str, Value, &'static str)> {
    prop_oneof![
        bad_source().prop_map(|s| ("source", json!(s), "source")),
        (1001u64..).prop_map(|v| ("replicas", json!(v), "replicas")),
        "[A-Z_.]{1,8}".prop_map(|n| ("base_model", json!(n), "base_model")),
        Just(("base_model", json!(""), "base_model")),
    ]
}

/// Sets `spec.<field>` of a JSON manifest document.
fn with_field(doc: &Value, field: &str, v: Value) -> Value {
    let mut doc = doc.clone();
    doc["spec"][field] = v;
    doc
}

/// Parses `doc` as JSON and as YAML, expecting both to fail naming `must_name` (and not
/// `metadata`, unless the fault is there).
fn assert_rejected(doc: &Value, must_name: &str) -> Result<(), TestCaseError> {
    assert_rejected_in(doc, must_name, must_name.contains("metadata"))
}

fn assert_rejected_in(doc: &Value, must_name: &str, in_metadata: bool) -> Result<(), TestCaseError> {
    let as_json = serde_json::to_string(doc).expect("json");
    let as_yaml = serde_yaml::to_string(doc).expect("yaml");
    for text in [as_json, as_yaml] {
        match Manifest::parse(&text) {
            Ok(m) => return Err(TestCaseError::fail(format!("accepted {text:?} as {m:?}"))),
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.contains(must_name), "error {msg:?} does not name {must_name:?} (input {text:?})");
                // A spec field is not reported as a metadata one.
                prop_assert!(in_metadata || !msg.contains("metadata"), "error {msg:?} names metadata (input {text:?})");
            }
        }
    }
    Ok(())
}

/// Text made of manifest words and YAML punctuation.
const YAML_SHAPED: &str = concat!(
    "((kind|metadata|spec|name|labels|replicas|apiVersion|status",
    "|- |  |\\{|\\}|\\[|\\]|: |, |---\n|\n|[a-zA-Z0-9\"'#&*!|>-]{1,6})){0,60}",
);

proptest! {
    // 256 cases unless PROPTEST_CASES says otherwise.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        parse_checked(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn arbitrary_text_never_panics(text in "(.|\n){0,256}") {
        parse_checked(&text);
    }

    #[test]
    fn yaml_shaped_text_never_panics(text in YAML_SHAPED) {
        parse_checked(&text);
    }

    #[test]
    fn mangled_manifests_never_panic(text in mangled()) {
        parse_checked(&text);
    }

    #[test]
    fn valid_manifests_round_trip_through_yaml(m in manifest()) {
        let parsed = Manifest::parse(&m.to_yaml());
        prop_assert_eq!(parsed, Ok(as_parsed(&m)));
    }

    #[test]
    fn valid_manifests_round_trip_through_json(m in manifest()) {
        let text = serde_json::to_string(&to_json(&m)).expect("json");
        prop_assert_eq!(Manifest::parse(&text), Ok(as_parsed(&m)));
        let pretty = serde_json::to_string_pretty(&to_json(&m)).expect("json");
        prop_assert_eq!(Manifest::parse(&pretty), Ok(as_parsed(&m)));
    }

    #[test]
    fn flow_style_yaml_parses_like_json(m in manifest()) {
        // JSON with unquoted top-level keys is YAML, not JSON; all but printable ASCII is
        // escaped, as YAML refuses some characters (DEL, C1 controls) that JSON holds raw.
        let mut text = String::new();
        for c in serde_json::to_string(&to_json(&m)).expect("json").chars() {
            if (' '..='~').contains(&c) {
                text.push(c);
            } else {
                // YAML's 32-bit escape (it does not join UTF-16 surrogate pairs).
                text.push_str(&format!("\\U{:08x}", u32::from(c)));
            }
        }
        let text = text.replacen("\"kind\":", "kind: ", 1).replacen("\"metadata\":", "metadata: ", 1);
        prop_assert_eq!(Manifest::parse(&text), Ok(as_parsed(&m)), "input {}", text);
    }

    #[test]
    fn multi_document_files_keep_every_manifest(ms in prop::collection::vec(manifest(), 1..4)) {
        let text: Vec<String> = ms.iter().map(Manifest::to_yaml).collect();
        let all = Manifest::parse_all(&text.join("---\n"));
        prop_assert_eq!(all, Ok(ms.iter().map(as_parsed).collect::<Vec<_>>()));
    }

    #[test]
    fn one_bad_model_field_is_named(s in model_spec(), n in name(), (field, v, must) in model_mutation()) {
        let m = Manifest { metadata: Metadata { name: n, labels: BTreeMap::new() }, spec: Spec::Model(s) };
        assert_rejected(&with_field(&to_json(&m), field, v), must)?;
    }

    #[test]
    fn one_bad_tenant_field_is_named(s in tenant_spec(), n in name(), (field, v, must) in tenant_mutation()) {
        let m = Manifest { metadata: Metadata { name: n, labels: BTreeMap::new() }, spec: Spec::Tenant(s) };
        assert_rejected(&with_field(&to_json(&m), field, v), must)?;
    }

    #[test]
    fn one_bad_adapter_field_is_named(s in adapter_spec(), n in name(), (field, v, must) in adapter_mutation()) {
        let m = Manifest { metadata: Metadata { name: n, labels: BTreeMap::new() }, spec: Spec::Adapter(s) };
        assert_rejected(&with_field(&to_json(&m), field, v), must)?;
    }

    #[test]
    fn unknown_fields_are_named(m in manifest(), field in "[a-z_]{1,12}", place in 0u8..3) {
        let known = [
            "engine", "source", "replicas", "gpus", "gpu_types", "engine_args", "routing", "autoscaling",
            "base_model", "rpm", "tpm", "priority", "models", "api_keys", "name", "labels", "kind", "spec",
            "metadata", "status", "revision",
        ];
        prop_assume!(!known.contains(&field.as_str()));
        let mut doc = to_json(&m);
        match place {
            0 => doc["spec"][&field] = json!(1),
            1 => doc["metadata"][&field] = json!("x"),
            _ => doc[&field] = json!({}),
        }
        assert_rejected_in(&doc, &format!("unknown field `{field}`"), place != 0)?;
    }

    #[test]
    fn bad_names_and_labels_are_named(m in manifest(), bad in "[A-Z_.]{1,5}|-[a-z]{0,3}|[a-z]{64,70}") {
        let mut doc = to_json(&m);
        doc["metadata"]["name"] = json!(bad);
        assert_rejected(&doc, "metadata.name")?;
        let mut doc = to_json(&m);
        doc["metadata"]["labels"] = json!({ "ok": "a=b" });
        assert_rejected(&doc, "metadata.labels.ok")?;
    }

    #[test]
    fn kinds_and_api_versions_are_checked(m in manifest(), kind in "[A-Za-z]{1,10}", version in "[a-z/0-9]{1,12}") {
        prop_assume!(kind.parse::<flotilla_api::Kind>().is_err());
        prop_assume!(version != "flotilla/v1");
        let mut doc = to_json(&m);
        doc["kind"] = json!(kind);
        assert_rejected(&doc, &kind)?;
        let mut doc = to_json(&m);
        doc["apiVersion"] = json!(version);
        assert_rejected(&doc, "apiVersion")?;
    }
}

#[test]
fn oversized_manifests_are_refused_before_parsing() {
    let text = format!("kind: Model\n#{}", "x".repeat(MAX_MANIFEST_BYTES));
    assert!(matches!(Manifest::parse(&text), Err(ApiError::TooLarge { .. })));
}
