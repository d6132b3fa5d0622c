//! Unit tests of the exposition parser and the name table, on hand-written pages and on
//! real vLLM 0.32 scrapes (copied into `engine/tests/data/`).

use super::*;

const REAL_SCRAPE: &str = include_str!("../tests/data/metrics-vllm-0.32.0.txt");
const REAL_LORA: &str = include_str!("../tests/data/metrics-with-lora-excerpt.txt");

fn one(line: &str) -> Sample<'_> {
    parse_line(line).unwrap_or_else(|| panic!("does not parse: {line}"))
}

#[test]
fn parses_names_labels_values_and_timestamps() {
    let s = one("vllm:num_requests_running 3");
    assert_eq!((s.name, s.labels.len(), s.value, s.timestamp), ("vllm:num_requests_running", 0, 3.0, None));
    let s = one("  m{a=\"1\",b=\"x\"}\t1.7956868231075003e+09 1700000000000\r");
    assert_eq!(s.name, "m");
    assert_eq!((s.label("a"), s.label("b"), s.label("c")), (Some("1"), Some("x"), None));
    assert_eq!(s.value, 1.7956868231075003e9);
    assert_eq!(s.timestamp, Some(1.7e12));
    assert_eq!(one("m{} -2.5E-3").value, -0.0025);
    assert_eq!(one("m{a=\"1\",} 1").label("a"), Some("1"), "trailing comma");
    assert_eq!(one("m{ a = \"1\" , b=\"2\" } 1").label("b"), Some("2"), "spaces around labels");
    assert_eq!(one("m 1 # {trace_id=\"x\"} 2").value, 1.0, "exemplar ignored");
}

#[test]
fn label_values_may_hold_spaces_commas_braces_and_escapes() {
    let s = one(r#"info{model_name="a b, c} {d=\"e\"}",path="C:\\x\\y",note="l1\nl2",odd="\q"} 4"#);
    assert_eq!(s.label("model_name"), Some(r#"a b, c} {d="e"}"#));
    assert_eq!(s.label("path"), Some(r"C:\x\y"));
    assert_eq!(s.label("note"), Some("l1\nl2"));
    assert_eq!(s.label("odd"), Some(r"\q"), "unknown escapes kept");
    assert_eq!(s.value, 4.0);
    assert!(matches!(s.labels[0].1, Cow::Owned(_)));
    assert!(matches!(one("m{a=\"plain\"} 1").labels[0].1, Cow::Borrowed(_)));
    assert_eq!(one("m{a=\"é, ü\"} 1").label("a"), Some("é, ü"));
}

#[test]
fn comments_blank_malformed_and_non_finite_lines_are_skipped() {
    for bad in [
        "",
        "   ",
        "# HELP vllm:num_requests_running Number of requests.",
        "# TYPE vllm:num_requests_running gauge",
        "m",
        "m{a=\"1\"}",
        "m{a=\"unterminated} 1",
        "m{a=1} 1",
        "m{9a=\"1\"} 1",
        "m{a=\"1\" b=\"2\"} 1",
        "9m 1",
        "m one",
        "m 1 2 3",
        "m 1 notatime",
    ] {
        assert_eq!(parse_line(bad), None, "{bad:?}");
    }
    assert!(parse_line("m NaN").is_some_and(|s| s.value.is_nan()));
    let text = "a NaN\nb +Inf\nc -Inf\nd Inf\ne 1\n";
    assert_eq!(samples(text).map(|s| s.name).collect::<Vec<_>>(), ["e"]);
}

#[test]
fn vllm_v1_requests_and_counters_sum_and_kv_is_the_max() {
    let text = "# HELP vllm:num_requests_running Number of requests.\n\
        # TYPE vllm:num_requests_running gauge\n\
        vllm:num_requests_running{engine=\"0\",model_name=\"tiny\"} 3.0\n\
        vllm:num_requests_running{engine=\"1\",model_name=\"tiny\"} 2.0\n\
        vllm:num_requests_waiting{engine=\"0\",model_name=\"a b\"} 7\n\
        vllm:kv_cache_usage_perc{engine=\"0\"} 0.25\n\
        vllm:kv_cache_usage_perc{engine=\"1\"} 0.75\n\
        vllm:prompt_tokens_total{engine=\"0\"} 10\n\
        vllm:prompt_tokens_total{engine=\"1\"} 5\n\
        vllm:prompt_tokens_created{engine=\"0\"} 1.7e9\n\
        vllm:generation_tokens_total 8\n\
        vllm:prefix_cache_queries_total 100\n\
        vllm:prefix_cache_hits_total 40\n\
        vllm:num_preemptions_total 1\n\
        vllm:request_success_total{finished_reason=\"stop\"} 4\n\
        vllm:request_success_total{finished_reason=\"length\"} 2\n\
        vllm:num_requests_waiting_total 99\n\
        vllm:kv_cache_usage_perc_other 5\n";
    let m = EngineMetrics::parse(text);
    assert_eq!(
        m,
        EngineMetrics {
            flavor: EngineFlavor::Vllm,
            running: 5.0,
            waiting: 7.0,
            kv_cache_usage: 0.75,
            prompt_tokens: 15.0,
            generation_tokens: 8.0,
            prefix_cache_queries: 100.0,
            prefix_cache_hits: 40.0,
            preemptions: 1.0,
            requests_finished: 6.0,
            lora: None,
        }
    );
    assert_eq!(m.prefix_cache_hit_rate(), Some(0.4));
}

#[test]
fn legacy_vllm_names_are_read_and_v1_names_win() {
    let legacy = "vllm:num_requests_running 1\nvllm:gpu_cache_usage_perc 0.5\n\
        vllm:gpu_prefix_cache_queries_total 10\nvllm:gpu_prefix_cache_hits_total 3\n";
    let m = EngineMetrics::parse(legacy);
    assert_eq!(m.flavor, EngineFlavor::VllmLegacy);
    assert_eq!((m.running, m.kv_cache_usage, m.prefix_cache_queries, m.prefix_cache_hits), (1.0, 0.5, 10.0, 3.0));
    assert_eq!(EngineMetrics::parse("vllm:gpu_prefix_cache_queries 7").prefix_cache_queries, 7.0);
    let both = "vllm:gpu_cache_usage_perc 0.9\nvllm:kv_cache_usage_perc 0.2\n";
    let m = EngineMetrics::parse(both);
    assert_eq!((m.flavor, m.kv_cache_usage), (EngineFlavor::Vllm, 0.2));
}

#[test]
fn sglang_names_are_read() {
    let text = "sglang:num_running_reqs{model_name=\"m\",tp_rank=\"0\"} 4\n\
        sglang:num_running_reqs{model_name=\"m\",tp_rank=\"1\"} 2\n\
        sglang:num_queue_reqs{model_name=\"m\"} 3\n\
        sglang:token_usage{model_name=\"m\"} 0.4\n\
        sglang:prompt_tokens_total 12\nsglang:generation_tokens_total 34\n";
    let m = EngineMetrics::parse(text);
    assert_eq!(m.flavor, EngineFlavor::Sglang);
    assert_eq!((m.running, m.waiting, m.kv_cache_usage), (6.0, 3.0, 0.4));
    assert_eq!((m.prompt_tokens, m.generation_tokens), (12.0, 34.0));
}

#[test]
fn unknown_pages_are_distinguishable_from_zero_load() {
    let m = EngineMetrics::parse("process_cpu_seconds_total 3\n# only comments\n");
    assert_eq!(m.flavor, EngineFlavor::Unknown);
    assert!(!m.is_known());
    let idle = EngineMetrics::parse("vllm:num_requests_running 0\n");
    assert!(idle.is_known() && idle.running == 0.0);
    assert_eq!(EngineMetrics::parse("vllm:num_requests_running NaN").running, 0.0);
    assert_eq!(EngineMetrics::parse("vllm:kv_cache_usage_perc 1.5").kv_cache_usage, 1.0, "clamped");
    assert_eq!(EngineMetrics::parse("").prefix_cache_hit_rate(), None);
}

#[test]
fn lora_info_is_the_newest_sample() {
    let text = "vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"} 1.0e9\n\
        vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"a,b\",waiting_lora_adapters=\"c\"} 1.5e9\n\
        vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"old\",waiting_lora_adapters=\"\"} 1.2e9\n";
    let lora = EngineMetrics::parse(text).lora.expect("lora info");
    assert_eq!(lora, LoraInfo { max_lora: Some(4), running: vec!["a".into(), "b".into()], waiting: vec!["c".into()] });
}

#[test]
fn real_vllm_0_32_scrape() {
    let data_lines = REAL_SCRAPE.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).count();
    let parsed = REAL_SCRAPE.lines().filter_map(parse_line).count();
    assert_eq!(parsed, data_lines, "every sample line of a real scrape parses");
    let m = EngineMetrics::parse(REAL_SCRAPE);
    assert_eq!(
        m,
        EngineMetrics {
            flavor: EngineFlavor::Vllm,
            running: 0.0,
            waiting: 0.0,
            kv_cache_usage: 0.0,
            prompt_tokens: 19.0,
            generation_tokens: 24.0,
            prefix_cache_queries: 19.0,
            prefix_cache_hits: 0.0,
            preemptions: 0.0,
            requests_finished: 2.0,
            lora: None,
        }
    );
    let cache = samples(REAL_SCRAPE).find(|s| s.name == "vllm:cache_config_info").expect("cache_config_info");
    assert_eq!(cache.label("enable_prefix_caching"), Some("True"));
}

#[test]
fn real_vllm_lora_scrape() {
    let m = EngineMetrics::parse(REAL_LORA);
    assert_eq!(
        (m.flavor, m.prompt_tokens, m.generation_tokens, m.requests_finished),
        (EngineFlavor::Vllm, 51.0, 48.0, 6.0)
    );
    // Two series: the older one saw `ad1` running; the newest (larger timestamp) is idle.
    assert_eq!(m.lora, Some(LoraInfo { max_lora: Some(2), running: vec![], waiting: vec![] }));
}

#[test]
#[ignore = "timing; run with --release --ignored --nocapture"]
fn parse_time_of_a_real_scrape() {
    let n = 1000;
    let started = tokio::time::Instant::now();
    for _ in 0..n {
        std::hint::black_box(EngineMetrics::parse(std::hint::black_box(REAL_SCRAPE)));
    }
    println!("EngineMetrics::parse of a {} byte page: {:?}", REAL_SCRAPE.len(), started.elapsed() / n);
}
