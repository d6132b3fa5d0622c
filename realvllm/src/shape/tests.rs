//! Unit tests of the comparison functions: each kind of difference is found, and only
//! those (values never count, known differences are dropped).

use super::*;
use serde_json::json;

fn paths(d: &[Difference]) -> Vec<&str> {
    d.iter().map(|d| d.path.as_str()).collect()
}

#[test]
fn patterns_cover_their_sub_paths_and_use_star() {
    assert!(covers("$.a", "$.a"));
    assert!(covers("$.a", "$.a.b"));
    assert!(covers("$.a", "$.a[].b"));
    assert!(!covers("$.a", "$.ab"));
    assert!(covers("metric:*_created", "metric:vllm:prompt_tokens_created"));
    assert!(covers("metric:vllm:estimated_*_per_gpu_total", "metric:vllm:estimated_flops_per_gpu_total"));
    assert!(!covers("metric:http_*", "metric:vllm:http_x"));
}

#[test]
fn json_shape_ignores_values_but_not_keys_or_types() {
    let real = json!({"id": "a", "n": 1.5, "x": null, "list": [{"k": 1}], "only_real": true});
    let same = json!({"id": "b", "n": 7, "x": null, "list": [{"k": 2}], "only_real": false});
    assert_eq!(json_shape_diff("$", &same, &real, &[]), vec![]);
    let other = json!({"id": 3, "n": 1, "x": "s", "list": [{"k": 1, "extra": []}], "only_sim": 1});
    let d = json_shape_diff("$", &other, &real, &[]);
    assert_eq!(paths(&d), ["$.id", "$.list[].extra", "$.only_real", "$.only_sim", "$.x"], "{d:#?}");
    assert!(d[0].what.contains("sim has number") && d[0].what.contains("real vLLM has string"), "{}", d[0]);
}

#[test]
fn arrays_compare_pairwise_or_against_the_first_element() {
    let real = json!([{"parent": null}, {"parent": "tiny"}]);
    assert_eq!(json_shape_diff("$", &json!([{"parent": null}, {"parent": "t"}]), &real, &[]), vec![]);
    let d = json_shape_diff("$", &json!([{"parent": "x"}, {"parent": "t"}]), &real, &[]);
    assert_eq!(paths(&d), ["$[].parent"]);
    let d = json_shape_diff("$", &json!([{"a": 1}, {"a": 2}, {"b": 3}]), &json!([{"a": 0}]), &[]);
    assert_eq!(paths(&d), ["$[].a", "$[].b"], "{d:#?}");
    assert_eq!(json_shape_diff("$", &json!([]), &json!([{"a": 1}]), &[]), vec![]);
}

#[test]
fn known_differences_are_skipped_with_their_sub_paths() {
    let ignored = [KnownDifference { path: "$.choices[].extra", reason: "test" }];
    let d = json_shape_diff("$", &json!({"choices": [{"extra": {"deep": 1}}]}), &json!({"choices": [{}]}), &ignored);
    assert_eq!(d, vec![]);
    let all = vec![diff("$.choices[].extra.x", "a"), diff("$.other", "b")];
    assert_eq!(paths(&without_known(all, &ignored)), ["$.other"]);
}

const REAL_STREAM: &str = concat!(
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" a\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" b\"},\"finish_reason\":\"length\",\"stop_reason\":null}]}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":3}}\n\n",
    "data: [DONE]\n\n",
);

#[test]
fn sse_structure_and_chunk_shapes() {
    assert_eq!(sse_diff(REAL_STREAM, REAL_STREAM, &[]), vec![]);
    let kinds: Vec<ChunkKind> = parse_sse(REAL_STREAM).iter().map(chunk_kind).collect();
    use ChunkKind::*;
    assert_eq!(kinds, [Role, Content, Finish, Usage, Done]);
    // more content chunks, CRLF line ends and other ids are fine
    let content = REAL_STREAM.split("\n\n").nth(1).unwrap();
    let longer = REAL_STREAM.replacen(content, &format!("{content}\n\n{}", content.replace(" a", " z")), 1);
    assert_eq!(parse_sse(&longer).len(), 6);
    assert_eq!(sse_diff(&longer.replace("\n", "\r\n"), REAL_STREAM, &[]), vec![]);
    assert_eq!(sse_diff(&longer.replace("c1", "c2"), REAL_STREAM, &[]), vec![]);
}

#[test]
fn sse_differences_are_found() {
    let no_usage: String = REAL_STREAM.lines().filter(|l| !l.contains("usage")).map(|l| format!("{l}\n")).collect();
    let d = sse_diff(&no_usage, REAL_STREAM, &[]);
    assert_eq!(paths(&d), ["sse"]);
    assert!(d[0].what.contains("[role, content+, finish, done]"), "{}", d[0]);
    let no_done = REAL_STREAM.replace("data: [DONE]\n\n", "");
    assert_eq!(paths(&sse_diff(&no_done, REAL_STREAM, &[])), ["sse"]);
    let no_stop_reason = REAL_STREAM.replace(",\"stop_reason\":null", "");
    let d = sse_diff(&no_stop_reason, REAL_STREAM, &[]);
    assert_eq!(paths(&d), ["sse[finish] $.choices[].stop_reason"], "{d:#?}");
    let ignored = [KnownDifference { path: "sse[finish] $.choices[].stop_reason", reason: "test" }];
    assert_eq!(sse_diff(&no_stop_reason, REAL_STREAM, &ignored), vec![]);
    let wrong_object = REAL_STREAM.replace("chat.completion.chunk", "text_completion");
    assert!(paths(&sse_diff(&wrong_object, REAL_STREAM, &[])).contains(&"sse[role] $.object"));
    let many_ids = REAL_STREAM.replacen("\"c1\"", "\"c9\"", 1);
    assert_eq!(paths(&sse_diff(&many_ids, REAL_STREAM, &[])), ["sse $.id"]);
}

const REAL_METRICS: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 0.0
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="tiny"} 19.0
# TYPE vllm:prompt_tokens_created gauge
vllm:prompt_tokens_created{engine="0",model_name="tiny"} 1.7e+09
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="tiny"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="1.0",model_name="tiny"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="tiny"} 1.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="tiny"} 1.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="tiny"} 0.2
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b",waiting_lora_adapters="\"x\""} 1.7e+09
"#;

#[test]
fn metrics_parse_types_labels_and_buckets() {
    let m = parse_metrics(REAL_METRICS);
    assert_eq!(m.len(), 5);
    let ttft = &m["vllm:time_to_first_token_seconds"];
    assert_eq!(ttft.kind, "histogram");
    assert_eq!(ttft.buckets, ["+Inf", "0.001", "1.0"].iter().map(|s| s.to_string()).collect());
    assert!(ttft.label_sets.contains(&("_bucket".into(), vec!["engine".into(), "le".into(), "model_name".into()])));
    let lora = &m["vllm:lora_requests_info"];
    let names = vec!["max_lora".to_string(), "running_lora_adapters".into(), "waiting_lora_adapters".into()];
    assert_eq!(lora.label_sets, [(String::new(), names)].into_iter().collect());
    let fams = [
        "vllm:num_requests_running",
        "vllm:prompt_tokens",
        "vllm:time_to_first_token_seconds",
        "vllm:lora_requests_info",
    ];
    assert_eq!(metrics_diff(REAL_METRICS, REAL_METRICS, &fams, &[]), vec![]);
    assert_eq!(missing_families(REAL_METRICS, REAL_METRICS), Vec::<String>::new());
}

#[test]
fn metrics_differences_are_found() {
    let fams = ["vllm:num_requests_running", "vllm:prompt_tokens_total", "vllm:time_to_first_token_seconds"];
    let sim = REAL_METRICS
        .replace("# TYPE vllm:num_requests_running gauge", "# TYPE vllm:num_requests_running counter")
        .replace("le=\"0.001\",", "le=\"0.002\",")
        .replace("vllm:prompt_tokens_total{engine=\"0\",", "vllm:prompt_tokens_total{");
    let d = metrics_diff(&sim, REAL_METRICS, &fams, &[]);
    let text: Vec<String> = d.iter().map(ToString::to_string).collect();
    assert_eq!(d.len(), 4, "{text:#?}");
    assert!(text[0].contains("num_requests_running: sim's TYPE is counter, real vLLM's gauge"));
    assert!(text[1].contains("only the sim writes: {model_name}"));
    assert!(text[2].contains("only real vLLM writes: {engine,model_name}"));
    assert!(text[3].contains("only sim le=[\"0.002\"], only real vLLM le=[\"0.001\"]"));
    let without: String = REAL_METRICS.lines().filter(|l| !l.contains("created")).map(|l| format!("{l}\n")).collect();
    assert_eq!(missing_families(&without, REAL_METRICS), ["vllm:prompt_tokens_created"]);
    let d = metrics_diff(&without, REAL_METRICS, &["vllm:prompt_tokens_created", "vllm:nope"], &[]);
    assert_eq!(
        d.iter().map(|d| d.what.as_str()).collect::<Vec<_>>(),
        ["real vLLM has this family, sim does not", "in neither scrape (renamed in this vLLM version?)"]
    );
    assert_eq!(metrics_diff(&without, REAL_METRICS, &["vllm:prompt_tokens_created"], KNOWN_DIFFERENCES), vec![]);
}

#[test]
fn error_answers_compare_status_shape_type_param_and_code() {
    let real =
        r#"{"error":{"message":"The model `nope` does not exist.","type":"NotFoundError","param":"model","code":404}}"#;
    let sim = r#"{"error":{"message":"other words","type":"NotFoundError","param":"model","code":404}}"#;
    assert_eq!(error_diff(404, sim, 404, real), vec![]);
    let d = error_diff(400, r#"{"error":{"message":"m","type":"BadRequestError","param":null,"code":404}}"#, 404, real);
    assert_eq!(paths(&d), ["$.error.code", "$.error.param", "$.error.type", "status"], "{d:#?}");
    assert_eq!(
        paths(&error_diff(404, r#"{"detail":"Not Found"}"#, 404, real)),
        ["$.detail", "$.error", "$.error.code", "$.error.param", "$.error.type"]
    );
    assert_eq!(paths(&error_diff(404, "oops", 404, real)), ["$"]);
    assert_eq!(error_diff(200, "Success: a", 200, "Success: b"), vec![]);
}
