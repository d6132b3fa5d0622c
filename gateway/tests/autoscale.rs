//! Scale from zero and demand reports against a fake leader that records
//! `AutoscaleService.ReportDemand`: reports carry what the gateway saw (arrivals,
//! completions, gauges back to zero, TTFT samples) through a follower's hint; requests for a
//! model without endpoints are held, reported at once and all served when an endpoint (a
//! real sim) appears; a hold past its deadline is a 503 with Retry-After; a model scaled to
//! zero on purpose keeps no carried-over endpoints.

mod common;

use std::time::Duration;

use common::fake_autoscale::FakeAutoscale;
use common::fake_cp::FakeCp;
use common::*;
use flotilla_gateway::{GatewayArgs, GatewayHandle};
use flotilla_sim::SimHandle;
use serde_json::json;
use tokio::sync::oneshot;
use tokio::time::Instant;

struct Env {
    sim: SimHandle,
    cp: FakeCp,
    scaler: FakeAutoscale,
    gw: GatewayHandle,
    _stops: Vec<oneshot::Sender<()>>,
}

fn model_spec() -> serde_json::Value {
    json!({"source": "hf://x/y"})
}

fn status(desired: u32) -> serde_json::Value {
    json!({"desired_replicas": desired, "ready_replicas": 0, "conditions": []})
}

impl Env {
    /// The leader writes the Model's `desired_replicas`.
    fn scale(&self, desired: u32) {
        self.cp.put_with_status("Model", MODEL, model_spec(), status(desired));
    }
    fn publish(&self, with_endpoint: bool) {
        match with_endpoint {
            true => self.cp.set_endpoints(&[(MODEL, self.sim.local_addr())]),
            false => self.cp.set_endpoints(&[]),
        }
    }
    fn addr(&self) -> std::net::SocketAddr {
        self.gw.local_addr()
    }
}

/// One sim of `demo`, its Model at `desired` replicas and, with `endpoint`, in the snapshot;
/// with `via_follower` the gateway is given only a follower that answers not_leader.
async fn env(
    speedup: f64,
    desired: u32,
    endpoint: bool,
    via_follower: bool,
    args: impl FnOnce(&mut GatewayArgs),
) -> Env {
    let sim = sim(speedup).await;
    let cp = FakeCp::new(None);
    cp.put_with_status("Model", MODEL, model_spec(), status(desired));
    if endpoint {
        cp.set_endpoints(&[(MODEL, sim.local_addr())]);
    }
    let scaler = FakeAutoscale::default();
    let (leader, stop) = scaler.clone().serve(cp.clone()).await;
    let mut stops = vec![stop];
    let server = if via_follower {
        let follower_cp = FakeCp::new(Some(leader.to_string()));
        follower_cp.put_with_status("Model", MODEL, model_spec(), status(desired));
        let (addr, stop) = FakeAutoscale::follower(leader).serve(follower_cp).await;
        stops.push(stop);
        addr
    } else {
        leader
    };
    let mut a = cluster_gw_args(server);
    args(&mut a);
    let gw = gateway(a).await;
    let st = gw.state().clone();
    wait_until("the endpoint table and the Model from the control plane", || {
        st.dir.synced() && st.dir.model(MODEL).is_some() && st.dir.endpoints().is_empty() != endpoint
    })
    .await;
    Env { sim, cp, scaler, gw, _stops: stops }
}

/// Polls `f` every 20 ms for at most 10 s.
/// Waits until `f` holds (10 s at most).
async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    flotilla_testkit::wait::eventually(10, what, || f().then_some(())).await;
}

/// Waits until the gateway metric `name{filters}` sums to `want` (10 s at most).
async fn wait_metric(addr: std::net::SocketAddr, name: &str, filters: &[&str], want: f64) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let got = metric_sum(addr, name, filters).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < until, "{name}{filters:?} is {got}, want {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ask(addr: std::net::SocketAddr, model: &str, priority: &str, stream: bool) -> Resp {
    post(
        addr,
        "/v1/completions",
        json!({"model": model, "prompt": "hello there", "max_tokens": 30, "ignore_eos": true, "stream": stream}),
        &[("x-flotilla-priority", priority)],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demand_reports_reach_the_leader_with_what_the_gateway_saw() {
    let e = env(1.0, 1, true, true, |a| a.demand_report_interval_ms = 100).await;
    let addr = e.addr();
    let tasks: Vec<_> =
        (0..10).map(|i| tokio::spawn(async move { ask(addr, MODEL, "standard", i % 2 == 0).await })).collect();
    wait_until("a report with requests in flight", || e.scaler.of(MODEL).iter().any(|(_, m)| m.in_flight > 0)).await;
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(ask(addr, "nope", "standard", false).await.status, 404);
    wait_until("every completion reported, then nothing in flight", || {
        let of = e.scaler.of(MODEL);
        e.scaler.sum(MODEL, |m| m.completed) == 10 && of.last().is_some_and(|(_, m)| m.in_flight == 0 && m.queued == 0)
    })
    .await;
    let s = |f: fn(&flotilla_api::pb::ModelDemand) -> u32| e.scaler.sum(MODEL, f);
    assert_eq!((s(|m| m.arrivals), s(|m| m.rejected), s(|m| m.held)), (10, 0, 0));
    assert_eq!(s(|m| m.ttft_samples), 5, "the 5 streams measured their TTFT");
    let of = e.scaler.of(MODEL);
    assert!(of.iter().any(|(_, m)| m.ttft_p95_ms > 0.0 && m.tpot_p95_ms > 0.0), "{of:?}");
    assert!(of.iter().all(|(_, m)| m.ttft_samples > 0 || m.ttft_p95_ms == 0.0));
    let reports = e.scaler.reports();
    let id = reports[0].gateway_id.clone();
    assert_eq!(id.len(), 36, "a uuid: {id}");
    assert!(reports.iter().all(|r| r.gateway_id == id), "one id per gateway process");
    assert!(reports.iter().all(|r| (20..5_000).contains(&r.interval_ms)), "intervals near 100 ms");
    assert!(reports.iter().all(|r| r.models.iter().all(|m| m.model == MODEL)), "unknown models are not reported");
    // idle: the model leaves the reports
    let n = reports.len();
    wait_until("more reports", || e.scaler.reports().len() >= n + 3).await;
    assert!(e.scaler.reports().last().unwrap().models.is_empty());
    assert!(metric_sum(addr, "flotilla_gateway_demand_reports_total", &["result=\"ok\""]).await >= 3.0);
    e.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_wait_for_the_first_endpoint_and_then_all_succeed() {
    // reports every 10 s: only the immediate report of the first hold can be prompt
    let e = env(50.0, 0, false, false, |a| a.demand_report_interval_ms = 10_000).await;
    let addr = e.addr();
    let t0 = Instant::now();
    let tasks: Vec<_> = ["critical", "standard", "sheddable", "standard", "critical"]
        .into_iter()
        .map(|p| tokio::spawn(async move { ask(addr, MODEL, p, false).await }))
        .collect();
    wait_until("a report of the held requests", || e.scaler.of(MODEL).iter().any(|(_, m)| m.held > 0)).await;
    let (at, first) = e.scaler.of(MODEL).into_iter().find(|(_, m)| m.held > 0).unwrap();
    assert!(at - t0 < Duration::from_secs(2), "reported {:?} after the first request", at - t0);
    assert!(first.arrivals >= 1 && first.held <= 5, "{first:?}");
    wait_metric(addr, "flotilla_gateway_held_requests", &["model=\"demo\""], 5.0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(tasks.iter().all(|t| !t.is_finished()), "held, not answered (sheddable too: its class deadline is 2 s)");

    // the leader scales the model up: its status, then a ready endpoint
    e.scale(1);
    e.publish(true);
    let t1 = Instant::now();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.endpoint(), e.sim.local_addr().to_string());
    }
    assert!(t1.elapsed() < Duration::from_secs(5), "released at once: {:?}", t1.elapsed());
    wait_metric(addr, "flotilla_gateway_held_requests", &["model=\"demo\""], 0.0).await;
    assert_eq!(metric_sum(addr, "flotilla_gateway_cold_start_seconds_count", &[]).await, 5.0);
    assert!(metric_sum(addr, "flotilla_gateway_cold_start_seconds_sum", &[]).await >= 5.0 * 0.3);
    assert_eq!(metric_sum(addr, "flotilla_gateway_held_timeouts_total", &[]).await, 0.0);
    e.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_past_its_deadline_gets_503_with_retry_after() {
    let e = env(50.0, 0, false, false, |a| {
        a.cold_start_timeout_ms = 400;
        a.queue_deadline_standard_ms = 100; // the hold is the longer of the two: 400 ms
        a.max_held_per_model = 1;
        a.demand_report_interval_ms = 100;
    })
    .await;
    let addr = e.addr();
    let t0 = Instant::now();
    let first = tokio::spawn(async move { ask(addr, MODEL, "standard", false).await });
    wait_metric(addr, "flotilla_gateway_held_requests", &["model=\"demo\""], 1.0).await;
    let full = ask(addr, MODEL, "standard", false).await;
    assert_eq!((full.status, full.error_code().as_str()), (503, "cold_start_full"), "{}", full.text());
    assert!(full.header("retry-after").is_some());
    let r = first.await.unwrap();
    let waited = t0.elapsed();
    assert_eq!((r.status, r.error_code().as_str()), (503, "cold_start_timeout"), "{}", r.text());
    assert_eq!(r.header("retry-after").as_deref(), Some("10"));
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("\"demo\"") && msg.contains("400 ms"), "{msg}");
    assert!(waited >= Duration::from_millis(400) && waited < Duration::from_secs(5), "{waited:?}");
    // an unknown name is not held
    let unknown = ask(addr, "nope", "standard", false).await;
    assert_eq!((unknown.status, unknown.error_code().as_str()), (404, "model_not_found"));
    assert_eq!(metric_sum(addr, "flotilla_gateway_held_timeouts_total", &["model=\"demo\""]).await, 1.0);
    assert_eq!(metric_sum(addr, "flotilla_gateway_held_requests", &["model=\"demo\""]).await, 0.0);
    wait_until("both rejections reported", || e.scaler.sum(MODEL, |m| m.rejected) == 2).await;
    assert_eq!(e.scaler.sum(MODEL, |m| m.arrivals), 2);
    e.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_scaled_to_zero_on_purpose_keeps_no_stale_endpoints() {
    let e = env(50.0, 1, true, false, |a| {
        a.cold_start_timeout_ms = 300;
        a.queue_deadline_standard_ms = 100;
    })
    .await;
    let addr = e.addr();
    let st = e.gw.state().clone();
    assert_eq!(ask(addr, MODEL, "standard", false).await.status, 200);
    // the snapshot loses every endpoint (say, a partition): they are carried over
    e.publish(false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = ask(addr, MODEL, "standard", false).await;
    assert_eq!(r.status, 200, "static stability: {}", r.text());
    // the leader scales the model to zero: the carried-over endpoints go at once
    e.scale(0);
    wait_until("the carried-over endpoints dropped", || st.dir.endpoints().is_empty()).await;
    let r = ask(addr, MODEL, "standard", false).await;
    assert_eq!((r.status, r.error_code().as_str()), (503, "cold_start_timeout"), "held: {}", r.text());

    // the other order: desired 0 first (endpoints still listed serve), then the snapshot
    e.scale(1);
    e.publish(true);
    wait_until("the endpoint back", || !st.dir.endpoints().is_empty()).await;
    e.scale(0);
    wait_until("desired 0 seen", || st.dir.model(MODEL).is_some_and(|m| m.desired_replicas == Some(0))).await;
    assert_eq!(ask(addr, MODEL, "standard", false).await.status, 200, "still in the snapshot");
    e.publish(false);
    wait_until("no carry-over", || st.dir.endpoints().is_empty()).await;
    let r = ask(addr, MODEL, "standard", false).await;
    assert_eq!((r.status, r.error_code().as_str()), (503, "cold_start_timeout"), "held: {}", r.text());
    e.gw.shutdown().await;
}
