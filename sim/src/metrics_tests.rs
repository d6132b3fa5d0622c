//! Checks the exposition against a real vLLM 0.32 scrape: every family we emit exists
//! there with the same TYPE, and every sample's label-name set appears there too.

use super::*;
use std::collections::{BTreeSet, HashMap};

type Families = HashMap<String, (String, BTreeSet<Vec<String>>)>;

/// name -> (type, set of label-name lists of its samples, keyed by sample name suffix)
fn parse(text: &str) -> Families {
    let mut fams: Families = HashMap::new();
    let mut types: HashMap<String, String> = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            types.insert(name.to_string(), kind.to_string());
            fams.entry(name.to_string()).or_insert_with(|| (kind.to_string(), BTreeSet::new()));
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, _) = line.rsplit_once(' ').unwrap();
        let (sample, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| {
                sample.strip_suffix(s).filter(|f| types.get(*f).is_some_and(|t| t == "histogram" || t == "summary"))
            })
            .unwrap_or(sample);
        let mut names: Vec<String> = split_labels(labels).into_iter().map(|(k, _)| k).collect();
        names.sort();
        let suffix = &sample[family.len()..];
        names.insert(0, suffix.to_string());
        fams.get_mut(family).unwrap_or_else(|| panic!("sample {sample} without TYPE")).1.insert(names);
    }
    fams
}

fn split_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some((k, v)) = rest.split_once("=\"") {
        let mut end = 0;
        let bytes = v.as_bytes();
        while end < bytes.len() && !(bytes[end] == b'"' && (end == 0 || bytes[end - 1] != b'\\')) {
            end += 1;
        }
        out.push((k.trim_start_matches(',').to_string(), v[..end].to_string()));
        rest = &v[(end + 1).min(v.len())..];
    }
    out
}

fn real(file: &str) -> Families {
    let path = format!("{}/../../shared/real-vllm/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    parse(&text)
}

fn busy_metrics() -> Metrics {
    let mut m = Metrics::new("demo \"x\"", 8192, Some(2));
    m.running = 3;
    m.waiting = 2;
    m.deferred = 1;
    m.success[1] = 4;
    m.h_ttft.observe(0.05);
    m.lora = Some((2, "a,b".into(), "c".into()));
    m.set_cache_config(&CacheInfo {
        block_size: 16,
        num_gpu_blocks: 100,
        num_gpu_blocks_override: None,
        prefix_caching: true,
        max_model_len: 8192,
        kv_bytes_per_token: 131_072,
    });
    m
}

#[test]
fn every_emitted_family_matches_real_vllm_name_type_and_labels() {
    let mut reference = real("metrics-vllm-0.32.0.txt");
    reference.extend(real("samples/metrics-with-lora.txt"));
    let ours = parse(&busy_metrics().render(1.0));
    assert!(ours.len() >= 25, "only {} families", ours.len());
    for (name, (kind, label_sets)) in &ours {
        let (real_kind, real_sets) = reference.get(name).unwrap_or_else(|| panic!("{name} is not a real vLLM metric"));
        assert_eq!(kind, real_kind, "TYPE of {name}");
        for set in label_sets {
            assert!(real_sets.contains(set), "{name}: labels {set:?} not among real {real_sets:?}");
        }
    }
}

#[test]
fn the_metrics_a_control_plane_reads_are_all_there() {
    let ours = parse(&busy_metrics().render(1.0));
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:num_preemptions_total",
        "vllm:request_success_total",
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:request_time_per_output_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:lora_requests_info",
        "vllm:cache_config_info",
    ] {
        assert!(ours.contains_key(name), "missing {name}");
    }
}

#[test]
fn latency_buckets_equal_real_vllm_buckets() {
    let path = format!("{}/../../shared/real-vllm/metrics-vllm-0.32.0.txt", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(path).unwrap();
    let ours = Metrics::new("tiny", 512, None).render(0.0);
    for fam in [
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
        "iteration_tokens_total",
        "request_prompt_tokens",
    ] {
        let les = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| l.starts_with(&format!("vllm:{fam}_bucket")))
                .map(|l| split_labels(l).into_iter().find(|(k, _)| k == "le").unwrap().1)
                .collect()
        };
        assert_eq!(les(&ours), les(&text), "{fam}");
    }
}

#[test]
fn histogram_is_cumulative_and_label_values_escaped() {
    let mut m = Metrics::new("m", 8192, None);
    m.h_ttft.observe(0.003);
    m.h_ttft.observe(0.5);
    m.h_ttft.observe(1e9);
    let t = m.render(0.0);
    assert!(t.contains("vllm:time_to_first_token_seconds_bucket{engine=\"0\",le=\"0.005\",model_name=\"m\"} 1.0"));
    assert!(t.contains("vllm:time_to_first_token_seconds_bucket{engine=\"0\",le=\"0.5\",model_name=\"m\"} 2.0"));
    assert!(t.contains("vllm:time_to_first_token_seconds_bucket{engine=\"0\",le=\"+Inf\",model_name=\"m\"} 3.0"));
    assert!(!t.contains("lora_requests_info"));
    assert!(busy_metrics().render(0.0).contains("model_name=\"demo \\\"x\\\"\""));
}
