//! `spec.autoscaling`: parsing (original and extended shapes, durations, schedules),
//! canonical JSON round trips, one test per validation error (each names its field), and
//! schedule bounds by local time across a DST change.
use super::*;
use crate::{Kind, Spec};

const WAITING: &str = "{name: 'vllm:num_requests_waiting', target: 4}";

/// Parses `autoscaling: <flow>` inside a minimal Model spec, as `flotilla apply` does.
fn parse(flow: &str) -> Result<AutoscalingSpec, String> {
    let text = format!("source: hf://m\nautoscaling: {flow}\n");
    let value: serde_yaml::Value = serde_yaml::from_str(&text).expect("test YAML");
    match Spec::from_yaml(Kind::Model, value) {
        Ok(Spec::Model(m)) => Ok(*m.autoscaling.expect("autoscaling")),
        Ok(_) => unreachable!(),
        Err(e) => Err(e.to_string()),
    }
}

fn err(flow: &str) -> String {
    parse(flow).expect_err(flow)
}

/// Asserts the error starts with `field` (its path) and contains each of `words`.
fn assert_err(flow: &str, field: &str, words: &[&str]) {
    let e = err(flow);
    assert!(e.starts_with(&format!("{field}:")), "{flow}: {e}");
    for w in words {
        assert!(e.contains(w), "{flow}: {e} lacks {w:?}");
    }
}

fn round_trip(a: &AutoscalingSpec) {
    let json = serde_json::to_value(a).unwrap();
    let back: AutoscalingSpec = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(&back, a);
    assert_eq!(serde_json::to_value(&back).unwrap(), json, "canonical JSON is stable");
    let yaml = serde_yaml::to_string(a).unwrap();
    assert_eq!(&serde_yaml::from_str::<AutoscalingSpec>(&yaml).unwrap(), a);
}

#[test]
fn original_shape_parses_and_stores_the_same_json() {
    let a = parse(&format!("{{min: 0, max: 8, strategy: kpa, metric: {WAITING}}}")).unwrap();
    assert_eq!(a.metric_targets().count(), 1);
    assert_eq!(a.metric_targets().next().unwrap().kind(), Some(MetricKind::RequestsWaiting));
    assert_eq!((a.stable_window.as_millis(), a.panic_window.as_millis()), (180_000, 60_000));
    assert_eq!((a.panic_threshold, a.scale_up_tolerance, a.max_scale_down_rate), (2.0, 0.1, 2.0));
    assert_eq!(a.scale_down_delay, SpecDuration::from_secs(300));
    let json = serde_json::to_value(&a).unwrap();
    let before = serde_json::json!({"min": 0, "max": 8, "strategy": "kpa",
        "metric": {"name": "vllm:num_requests_waiting", "target": 4.0}});
    assert_eq!(json, before);
    round_trip(&a);
}

#[test]
fn full_shape_round_trips() {
    let a = parse(
        "{min: 1, max: 20, strategy: apa,
          metrics: [{source: engine, name: 'vllm:kv_cache_usage_perc', target: 0.8},
                    {source: gateway, name: concurrency, target: 16},
                    {source: gateway, name: queue_wait_p95_ms, target: 500}],
          stable_window: 5m, panic_window: 30, panic_threshold: 3, scale_up_tolerance: 0.05,
          scale_down_tolerance: 0.2, max_scale_up_rate: 4, max_scale_down_rate: 1.5,
          scale_down_delay: 1m30s,
          schedules: [{days: [mon, tue, wed, thu, fri], start: '08:00', end: '18:00',
                       time_zone: Europe/Berlin, min: 4},
                      {start: '22:00', end: '06:00', max: 2}]}",
    )
    .unwrap();
    assert_eq!(a.metrics.len(), 3);
    assert_eq!(a.metrics[1].kind(), Some(MetricKind::Concurrency));
    assert_eq!(a.stable_window.as_millis(), 300_000);
    assert_eq!(a.panic_window.as_millis(), 30_000);
    assert_eq!(a.scale_down_delay.as_millis(), 90_000);
    assert_eq!(a.schedules[1].time_zone, "UTC");
    let json = serde_json::to_value(&a).unwrap();
    assert_eq!(json["stable_window"], "300s");
    assert_eq!(json["scale_down_delay"], "90s");
    assert_eq!(json["schedules"][0]["start"], "08:00");
    assert!(json["metrics"][0].get("source").is_none(), "engine is the default source: {json}");
    round_trip(&a);

    let slo = parse("{max: 4, strategy: slo, slo: {ttft_p95_ms: 800}}").unwrap();
    assert_eq!(slo.slo.as_ref().unwrap().ttft_p95_ms, Some(800.0));
    round_trip(&slo);
    let hpa = parse(&format!("{{max: 4, strategy: hpa, metric: {WAITING}}}")).unwrap();
    assert_eq!(hpa.strategy, ScalingStrategy::Hpa);
}

#[test]
fn durations() {
    let d = |s: &str| s.parse::<SpecDuration>().map(SpecDuration::as_millis);
    assert_eq!(d("180"), Ok(180_000));
    assert_eq!(d("180s"), Ok(180_000));
    assert_eq!(d("5m"), Ok(300_000));
    assert_eq!(d("1h"), Ok(3_600_000));
    assert_eq!(d("1m30s"), Ok(90_000));
    assert_eq!(d("500ms"), Ok(500));
    for bad in ["", "s", "5", "5x", "-5s", "1.5s", "5 m", "99999999999999999999s"] {
        if bad != "5" {
            assert!(d(bad).is_err(), "{bad:?}");
        }
    }
    assert_eq!(SpecDuration::from_millis(1500).to_string(), "1500ms");
    assert_eq!(SpecDuration::from_secs(300).to_string(), "300s");
    let m = format!("metric: {WAITING}");
    assert_err(&format!("{{max: 2, {m}, stable_window: 3x}}"), "spec.autoscaling.stable_window", &["\"3x\""]);
    assert_err(&format!("{{max: 2, {m}, stable_window: -3}}"), "spec.autoscaling.stable_window", &["negative"]);
    assert_err(&format!("{{max: 2, {m}, panic_window: 1.5}}"), "spec.autoscaling.panic_window", &["whole seconds"]);
    assert_eq!(
        parse(&format!("{{max: 2, {m}, stable_window: 500ms, panic_window: 500ms}}")).err().unwrap(),
        "spec.autoscaling.stable_window: 500ms is outside 1s to 3600s"
    );
}

#[test]
fn bounds_and_windows_errors_name_the_field() {
    let m = format!("metric: {WAITING}");
    assert_err(&format!("{{min: 3, max: 2, {m}}}"), "spec.autoscaling.min", &["3", "max 2"]);
    assert_err(&format!("{{max: 1001, {m}}}"), "spec.autoscaling.max", &["1000"]);
    assert_err(&format!("{{max: 2, {m}, panic_window: 5m}}"), "spec.autoscaling.panic_window", &["stable_window"]);
    assert_err(&format!("{{max: 2, {m}, stable_window: 2h}}"), "spec.autoscaling.stable_window", &["7200s"]);
    assert_err(&format!("{{max: 2, {m}, scale_down_delay: 25h}}"), "spec.autoscaling.scale_down_delay", &[]);
    assert_err(
        &format!("{{max: 2, {m}, panic_threshold: 1}}"),
        "spec.autoscaling.panic_threshold",
        &["greater than 1"],
    );
    assert_err(&format!("{{max: 2, {m}, max_scale_up_rate: 0.5}}"), "spec.autoscaling.max_scale_up_rate", &["0.5"]);
    assert_err(&format!("{{max: 2, {m}, max_scale_down_rate: 1}}"), "spec.autoscaling.max_scale_down_rate", &[]);
    assert_err(&format!("{{max: 2, {m}, max_scale_up_rate: .inf}}"), "spec.autoscaling.max_scale_up_rate", &["inf"]);
    assert_err(&format!("{{max: 2, {m}, scale_up_tolerance: 1}}"), "spec.autoscaling.scale_up_tolerance", &["below 1"]);
    assert_err(&format!("{{max: 2, {m}, scale_down_tolerance: -0.1}}"), "spec.autoscaling.scale_down_tolerance", &[]);
    // Zero delay and zero tolerances are allowed.
    parse(&format!("{{max: 2, {m}, scale_down_delay: 0, scale_up_tolerance: 0}}")).unwrap();
}

#[test]
fn metric_errors_name_the_field() {
    assert_err(
        "{max: 2, metric: {name: 'vllm:foo', target: 4}}",
        "spec.autoscaling.metric.name",
        &["\"vllm:foo\"", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:generation_tokens_total"],
    );
    assert_err(
        "{max: 2, metrics: [{source: gateway, name: 'vllm:num_requests_waiting', target: 4}]}",
        "spec.autoscaling.metrics[0].name",
        &["gateway metric", "concurrency", "queue_depth", "queue_wait_p95_ms", "requests_per_second"],
    );
    assert_err("{max: 2, metrics: [{source: disk, name: x, target: 4}]}", "spec.autoscaling.metrics[0].source", &[]);
    assert_err(
        "{max: 2, metric: {name: 'vllm:num_requests_waiting', target: 0}}",
        "spec.autoscaling.metric.target",
        &["positive"],
    );
    assert_err(
        "{max: 2, metrics: [{source: gateway, name: concurrency, target: 8}, {name: 'vllm:num_requests_waiting', target: .nan}]}",
        "spec.autoscaling.metrics[1].target",
        &["NaN"],
    );
    assert_err(
        "{max: 2, metrics: [{name: 'vllm:kv_cache_usage_perc', target: 80}]}",
        "spec.autoscaling.metrics[0].target",
        &["fraction"],
    );
    assert_err(
        "{max: 2, metrics: [{source: gateway, name: concurrency, target: 8}, {source: gateway, name: concurrency, target: 4}]}",
        "spec.autoscaling.metrics[1].name",
        &["twice"],
    );
    assert_err(
        &format!("{{max: 2, metric: {WAITING}, metrics: [{WAITING}]}}"),
        "spec.autoscaling.metric",
        &["not both"],
    );
    assert_err("{max: 2, strategy: apa}", "spec.autoscaling.metrics", &["apa needs a metric"]);
    assert_err("{max: 2, metric: {name: x}}", "spec.autoscaling.metric", &["target"]);
}

#[test]
fn strategy_and_slo_errors_name_the_field() {
    assert_err("{max: 2, strategy: magic}", "spec.autoscaling.strategy", &["kpa"]);
    assert_err("{max: 2, strategy: slo}", "spec.autoscaling.slo", &["strategy slo needs slo"]);
    assert_err("{max: 2, strategy: slo, slo: {}}", "spec.autoscaling.slo", &["neither"]);
    assert_err("{max: 2, strategy: slo, slo: {ttft_p95_ms: -1}}", "spec.autoscaling.slo.ttft_p95_ms", &["-1"]);
    assert_err("{max: 2, strategy: slo, slo: {tpot_p95_ms: 0}}", "spec.autoscaling.slo.tpot_p95_ms", &[]);
    assert_err("{max: 2, strategy: slo, slo: {ttft_ms: 5}}", "spec.autoscaling.slo.ttft_ms", &["ttft_p95_ms"]);
    assert_err(
        &format!("{{max: 2, strategy: slo, slo: {{ttft_p95_ms: 500}}, metric: {WAITING}}}"),
        "spec.autoscaling.metric",
        &["slo only"],
    );
    assert_err(
        &format!("{{max: 2, metric: {WAITING}, slo: {{ttft_p95_ms: 500}}}}"),
        "spec.autoscaling.slo",
        &["strategy is kpa"],
    );
    assert_err(
        &format!("{{max: 2, metric: {WAITING}, windw: 5}}"),
        "spec.autoscaling.windw",
        &["unknown field", "stable_window"],
    );
}

#[test]
fn schedule_errors_name_the_field() {
    let s = |sched: &str| format!("{{min: 1, max: 4, metric: {WAITING}, schedules: [{sched}]}}");
    let at = "spec.autoscaling.schedules[0]";
    assert_err(&s("{start: '25:00', end: '18:00', max: 2}"), &format!("{at}.start"), &["\"25:00\"", "HH:MM"]);
    assert_err(&s("{start: '8', end: '18:00', max: 2}"), &format!("{at}.start"), &[]);
    assert_err(&s("{start: '08:00', end: '18:60', max: 2}"), &format!("{at}.end"), &[]);
    assert_err(&s("{start: '08:00', end: '08:00', max: 2}"), &format!("{at}.end"), &["empty"]);
    assert_err(&s("{start: '24:00', end: '08:00', max: 2}"), &format!("{at}.start"), &["only valid as an end"]);
    assert_err(
        &s("{start: '08:00', end: '18:00', max: 2, time_zone: Mars/Olympus}"),
        &format!("{at}.time_zone"),
        &["\"Mars/Olympus\"", "IANA"],
    );
    assert_err(&s("{start: '08:00', end: '18:00'}"), at, &["neither min nor max"]);
    assert_err(&s("{days: [funday], start: '08:00', end: '18:00', max: 2}"), &format!("{at}.days[0]"), &["funday"]);
    assert_err(&s("{days: [mon, mon], start: '08:00', end: '18:00', max: 2}"), &format!("{at}.days"), &["twice"]);
    assert_err(&s("{start: '08:00', end: '18:00', min: 5, max: 3}"), &format!("{at}.min"), &["5", "max 3"]);
    assert_err(&s("{start: '08:00', end: '18:00', min: 5}"), &format!("{at}.min"), &["spec's max 4"]);
    assert_err(&s("{start: '08:00', end: '18:00', max: 0}"), &format!("{at}.max"), &["spec's min 1"]);
    assert_err(&s("{start: '08:00', end: '18:00', max: 5000}"), &format!("{at}.max"), &["1000"]);
    // A schedule may raise max above the spec's, and end at 24:00.
    parse(&s("{start: '08:00', end: '24:00', min: 6, max: 10}")).unwrap();
}

// 2026-01-14 (Wed, CET = UTC+1) and 2026-07-15 (Wed, CEST = UTC+2).
const WINTER_0730_UTC: i64 = 1_768_375_800_000; // 08:30 in Berlin
const WINTER_0630_UTC: i64 = 1_768_372_200_000; // 07:30 in Berlin
const SUMMER_0630_UTC: i64 = 1_784_097_000_000; // 08:30 in Berlin
const SUMMER_0530_UTC: i64 = 1_784_093_400_000; // 07:30 in Berlin
const WINTER_1730_UTC: i64 = 1_768_411_800_000; // 18:30 in Berlin
const SUMMER_1630_UTC: i64 = 1_784_133_000_000; // 18:30 in Berlin
const SATURDAY_0730_UTC: i64 = 1_768_635_000_000; // Sat 2026-01-17, 08:30 in Berlin
const HOUR: i64 = 3_600_000;

#[test]
fn schedules_follow_local_time_across_dst() {
    let a = parse(&format!(
        "{{min: 0, max: 4, metric: {WAITING}, schedules: [
            {{days: [mon, tue, wed, thu, fri], start: '08:00', end: '18:00', time_zone: Europe/Berlin, min: 2, max: 10}},
            {{start: '22:00', end: '06:00', time_zone: Europe/Berlin, max: 1}}]}}"
    ))
    .unwrap();
    let office = Bounds { min: 2, max: 10, schedule: Some(0) };
    let plain = Bounds { min: 0, max: 4, schedule: None };
    let night = Bounds { min: 0, max: 1, schedule: Some(1) };
    // 08:30 local is inside the window in winter and in summer, though UTC differs by an hour.
    assert_eq!(a.bounds_at(WINTER_0730_UTC), office);
    assert_eq!(a.bounds_at(SUMMER_0630_UTC), office);
    assert_eq!(a.bounds_at(WINTER_0630_UTC), plain);
    assert_eq!(a.bounds_at(SUMMER_0530_UTC), plain);
    assert_eq!(a.bounds_at(WINTER_1730_UTC), plain);
    assert_eq!(a.bounds_at(SUMMER_1630_UTC), plain);
    assert_eq!(a.bounds_at(SUMMER_1630_UTC - HOUR + 1), office, "17:59:59.001 local is still inside");
    assert_eq!(a.bounds_at(SATURDAY_0730_UTC), plain, "weekends are not listed");
    // The overnight window: 23:30 Wednesday and 05:30 Thursday local, not 06:30.
    assert_eq!(a.bounds_at(WINTER_1730_UTC + 5 * HOUR), night);
    assert_eq!(a.bounds_at(WINTER_1730_UTC + 11 * HOUR), night);
    assert_eq!(a.bounds_at(WINTER_1730_UTC + 12 * HOUR), plain);
    assert_eq!(plain.clamp(7), 4);
    assert_eq!(office.clamp(0), 2);
}

#[test]
fn overnight_windows_belong_to_their_start_day() {
    let s = Schedule {
        days: vec![Weekday::Fri],
        start: "22:00".parse().unwrap(),
        end: "06:00".parse().unwrap(),
        time_zone: "UTC".into(),
        min: None,
        max: Some(1),
    };
    let fri_2330 = SATURDAY_0730_UTC - 8 * HOUR; // 2026-01-16 23:30 UTC
    assert!(s.is_active(fri_2330));
    assert!(s.is_active(fri_2330 + 6 * HOUR), "05:30 Saturday continues Friday's window");
    assert!(!s.is_active(fri_2330 + 24 * HOUR), "23:30 Saturday is not listed");
    assert!(!s.is_active(fri_2330 - 24 * HOUR + 6 * HOUR), "05:30 Friday continues Thursday's window");
}
