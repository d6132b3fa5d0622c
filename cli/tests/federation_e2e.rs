//! Federation end to end with real processes: three member clusters (each a server and an
//! agent with sim engines) and a federation server holding them as Clusters. A
//! FederatedModel of 6 replicas weighted 3/2/1 lands as asked, each cluster's member Model
//! labelled as the federation's, and a FederatedAdapter's Adapter follows it into each; a
//! Model the federation did not create is never touched.
//! With the federation server down the clusters keep serving and take local applies; back
//! up, it changes nothing (no churn). A whole cluster killed: after the grace its share
//! moves to the others; the cluster back: the share returns, with no replica counted twice.
//! Behind the global gateway, a whole cluster killed under load costs no request.
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::*;
use tokio::time::Instant;

/// One member cluster: its server, its agent, its engines' marker.
struct Member {
    name: &'static str,
    server: ServerProc,
    agent: AgentProc,
    marker: u64,
}

impl Member {
    async fn start(name: &'static str, dir: &Path) -> Member {
        Member::with_gpus(name, dir, 6).await
    }

    async fn with_gpus(name: &'static str, dir: &Path, gpus: u32) -> Member {
        let server = ServerProc::start(1, &dir.join(name).join("server"), "127.0.0.1:0", &["--bootstrap"]);
        wait_voters(&server.grpc, 1).await;
        let marker = marker();
        let agent =
            AgentProc::start(&format!("{name}-node"), &dir.join(name).join("agent"), &server.grpc, gpus, marker);
        Member { name, server, agent, marker }
    }

    fn kill(&mut self) {
        self.agent.kill();
        self.server.kill();
        kill_engines(self.marker);
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

fn cluster_manifest(m: &Member, region: &str) -> String {
    format!(
        "kind: Cluster\nmetadata: {{name: {}, labels: {{region: {region}}}}}\nspec:\n  servers: ['{}']\n",
        m.name, m.server.grpc
    )
}

const FED: &str = "kind: FederatedModel
metadata: {name: llm}
spec:
  replicas: 6
  template: {engine: sim, source: file:///models/llm, gpus: 1, engine_args: ['--enable-lora']}
  placement:
    weights: {a: 3, b: 2, c: 1}
    grace: 3s
";

/// The member Model `name` in cluster `server`: (spec.replicas, ready, revision, labels).
#[allow(clippy::type_complexity)]
async fn member_model(server: &str, name: &str) -> Option<(u64, u64, u64, BTreeMap<String, String>)> {
    let o = list_objects(&[server.to_string()], "model", "").await.into_iter().find(|o| o.name == name)?;
    let spec: serde_json::Value = serde_json::from_str(&o.spec_json).ok()?;
    let status: serde_json::Value = serde_json::from_str(&o.status_json).unwrap_or_default();
    let labels = o.labels.into_iter().collect();
    Some((spec["replicas"].as_u64()?, status["ready_replicas"].as_u64().unwrap_or(0), o.revision, labels))
}

/// The sum of a metric's samples in a /metrics text.
fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// The FederatedModel's status on the federation server.
async fn fed_status(fed: &str) -> serde_json::Value {
    let o = list_objects(&[fed.to_string()], "federatedmodel", "").await.into_iter().find(|o| o.name == "llm");
    o.and_then(|o| serde_json::from_str(&o.status_json).ok()).unwrap_or_default()
}

/// Waits until the clusters' member Models ask for `want` replicas (by cluster name) and
/// the FederatedModel's status counts `ready` Ready.
async fn wait_spread(members: &[&Member], fed: &str, want: &[(&str, u64)], ready: u64, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let mut seen = Vec::new();
        for m in members {
            let got = member_model(&m.server.grpc, "llm").await;
            seen.push((m.name, got.as_ref().map(|g| (g.0, g.1))));
        }
        let status = fed_status(fed).await;
        let as_asked = want
            .iter()
            .all(|(name, n)| seen.iter().any(|(m, g)| m == name && g.is_some_and(|(asked, r)| asked == *n && r == *n)));
        if as_asked && status["ready"] == ready {
            return;
        }
        assert!(Instant::now() < deadline, "never spread as {want:?} with {ready} ready: {seen:?}\nstatus {status}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_model_spreads_by_weight_survives_the_federation_and_moves_off_a_dead_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Member::start("a", dir.path()).await;
    let b = Member::start("b", dir.path()).await;
    let mut c = Member::start("c", dir.path()).await;
    let fed_dir = dir.path().join("federation");
    let mut fed = ServerProc::start(1, &fed_dir, "127.0.0.1:0", &["--bootstrap", "--federation"]);
    wait_voters(&fed.grpc, 1).await;
    let feds = [fed.grpc.clone()];
    for (m, region) in [(&a, "us"), (&b, "eu"), (&c, "ap")] {
        apply(&feds, cluster_manifest(m, region)).await;
    }
    // a Model in b that the federation did not create, under a FederatedModel's name
    apply(std::slice::from_ref(&b.server.grpc), model("solo")).await;
    let solo_spec =
        |o: Vec<flotilla_api::pb::Object>| o.into_iter().find(|o| o.name == "solo").map(|o| (o.spec_json, o.labels));
    let solo_before =
        solo_spec(list_objects(std::slice::from_ref(&b.server.grpc), "model", "").await).expect("the local Model");
    apply(&feds, FED.replace("name: llm", "name: solo").replace("weights: {a: 3, b: 2, c: 1}", "clusters: region=eu"))
        .await;
    apply(&feds, FED.into()).await;

    // lands as asked, labelled
    let t0 = Instant::now();
    wait_spread(&[&a, &b, &c], &fed.grpc, &[("a", 3), ("b", 2), ("c", 1)], 6, 90).await;
    eprintln!("6 replicas Ready over 3 clusters {:.1} s after the apply", t0.elapsed().as_secs_f64());
    let (_, _, _, labels) = member_model(&a.server.grpc, "llm").await.unwrap();
    assert_eq!(labels.get("flotilla.io/federated-by").map(String::as_str), Some("llm"));
    let out = std::process::Command::new(BIN).args(["--server", &fed.grpc, "get", "fedmodel", "llm"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for want in ["CLUSTER", "DESIRED", "READY", "6/6 ready in 3 clusters"] {
        assert!(text.contains(want), "`get fedmodel llm` lacks {want}:\n{text}");
    }
    // an adapter of the federated model, kept wherever it runs
    apply(
        &feds,
        "kind: FederatedAdapter\nmetadata: {name: sql}\nspec: {template: {base_model: llm, source: 'sim://sql'}}\n"
            .into(),
    )
    .await;
    for m in [&a, &b, &c] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let adapters = list_objects(std::slice::from_ref(&m.server.grpc), "adapter", "").await;
            let owned = adapters
                .iter()
                .find(|o| o.name == "sql")
                .and_then(|o| o.labels.get("flotilla.io/federated-by").cloned());
            if owned.as_deref() == Some("sql") {
                break;
            }
            assert!(Instant::now() < deadline, "cluster {} never got the federated adapter: {adapters:?}", m.name);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // the local Model was reported as a conflict and left alone
    let solo = list_objects(&feds, "federatedmodel", "").await.into_iter().find(|o| o.name == "solo").unwrap();
    assert!(solo.status_json.contains("Conflict"), "{}", solo.status_json);
    let solo_after = solo_spec(list_objects(std::slice::from_ref(&b.server.grpc), "model", "").await);
    assert_eq!(solo_after, Some(solo_before), "never touched");

    // the federation down: clusters keep serving and take local applies; back: no churn
    fed.kill();
    apply(std::slice::from_ref(&a.server.grpc), model("local-only")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(member_model(&a.server.grpc, "llm").await.map(|m| (m.0, m.1)), Some((3, 3)), "a keeps serving");
    let fed_grpc = fed.grpc.clone();
    fed = ServerProc::start(1, &fed_dir, &fed_grpc, &["--federation"]);
    let back = Instant::now();
    while Instant::now() < back + Duration::from_secs(5) {
        assert_eq!(fed_status(&fed.grpc).await["ready"].as_u64().unwrap_or(6), 6);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    wait_spread(&[&a, &b, &c], &fed.grpc, &[("a", 3), ("b", 2), ("c", 1)], 6, 30).await;
    let metrics = raw_http::send_blocking(&fed.http, "GET", "/metrics", "", Duration::from_secs(5)).unwrap_or_default();
    assert!(sum(&metrics, "flotilla_federation_reconciles_total") >= 3.0, "{metrics}");
    assert_eq!(
        sum(&metrics, "flotilla_federation_member_writes_total"),
        0.0,
        "the returning federation rewrote members already as desired"
    );
    assert!(member_model(&a.server.grpc, "local-only").await.is_some(), "the local apply stands");

    // a whole cluster dies: past the grace (3 s) its share moves to the others, 3:2 → 4 + 2
    let c_grpc = c.server.grpc.clone();
    c.kill();
    let t0 = Instant::now();
    wait_spread(&[&a, &b], &fed.grpc, &[("a", 4), ("b", 2)], 6, 60).await;
    eprintln!("6 replicas Ready again without cluster c {:.1} s after it died", t0.elapsed().as_secs_f64());
    let status = fed_status(&fed.grpc).await;
    assert!(status.to_string().contains("Excluded"), "{status}");

    // c back on its address (its data dir kept its Model at 1): the share returns, 3/2/1
    c.server = ServerProc::start(1, &dir.path().join("c").join("server"), &c_grpc, &[]);
    wait_voters(&c.server.grpc, 1).await;
    c.agent = AgentProc::start("c-node", &dir.path().join("c").join("agent"), &c.server.grpc, 6, c.marker);
    wait_spread(&[&a, &b, &c], &fed.grpc, &[("a", 3), ("b", 2), ("c", 1)], 6, 90).await;
    let status = fed_status(&fed.grpc).await;
    assert_eq!(status["placed"], 6, "no replica counted twice: {status}");
    a.kill();
}

/// Clusters a (6 GPUs) and b (`b_gpus`), a federation server holding them, and a
/// FederatedModel of 4 replicas weighted 1/1 applied to it.
async fn two_clusters(dir: &Path, b_gpus: u32) -> (Member, Member, ServerProc) {
    let a = Member::start("a", dir).await;
    let b = Member::with_gpus("b", dir, b_gpus).await;
    let fed = ServerProc::start(1, &dir.join("federation"), "127.0.0.1:0", &["--bootstrap", "--federation"]);
    wait_voters(&fed.grpc, 1).await;
    let feds = [fed.grpc.clone()];
    for (m, region) in [(&a, "us"), (&b, "eu")] {
        apply(&feds, cluster_manifest(m, region)).await;
    }
    let four =
        FED.replace("replicas: 6", "replicas: 4").replace("weights: {a: 3, b: 2, c: 1}", "weights: {a: 1, b: 1}");
    apply(&feds, four).await;
    (a, b, fed)
}

/// A cluster cut off (its server paused: its engines keep running) and healed: past the
/// grace its share moves to the other cluster, whose count alone is counted Ready (the cut
/// cluster's still-running replicas are not counted twice); healed, the shares return and
/// the total is the FederatedModel's again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_cluster_is_not_counted_twice_and_gets_its_share_back_when_healed() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, fed) = two_clusters(dir.path(), 6).await;
    wait_spread(&[&a, &b], &fed.grpc, &[("a", 2), ("b", 2)], 4, 90).await;

    b.server.signal(Signal::STOP);
    wait_spread(&[&a], &fed.grpc, &[("a", 4)], 4, 60).await;
    let status = fed_status(&fed.grpc).await;
    assert_eq!((status["placed"].as_u64(), status["ready"].as_u64()), (Some(4), Some(4)), "{status}");
    assert!(status.to_string().contains("Excluded"), "{status}");

    b.server.signal(Signal::CONT);
    wait_spread(&[&a, &b], &fed.grpc, &[("a", 2), ("b", 2)], 4, 90).await;
    let status = fed_status(&fed.grpc).await;
    assert_eq!(status["placed"], 4, "{status}");
}

/// A cluster without room for its share (1 GPU for a share of 2): its extra replica stays
/// Pending, and past the grace the cluster is capped at what it placed and the rest spills
/// over to the other cluster; status says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_a_cluster_cannot_place_spills_over_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, fed) = two_clusters(dir.path(), 1).await;
    wait_spread(&[&a, &b], &fed.grpc, &[("a", 3), ("b", 1)], 4, 90).await;
    let status = fed_status(&fed.grpc).await;
    assert!(status.to_string().contains("CapacityLimited"), "{status}");
}

/// One chat completion through `gateway`: its status and the `x-flotilla-cluster` that
/// answered (status 0 when it could not connect).
fn ask_cluster(gateway: &str) -> (u16, String) {
    let body = r#"{"model":"llm","messages":[{"role":"user","content":"hello"}],"max_tokens":4}"#;
    let Some(out) =
        raw_http::send_blocking_with(gateway, "POST", "/v1/chat/completions", body, Duration::from_secs(60), &[])
    else {
        return (0, String::new());
    };
    let head = out.split("\r\n\r\n").next().unwrap_or("");
    let cluster = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("x-flotilla-cluster")))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    (raw_http::status_code(&out).unwrap_or(0), cluster)
}

/// The issue's failover case end to end: two clusters, each with its own gateway, a
/// FederatedModel over both and the global gateway in front (region us: cluster a first).
/// Cluster a is killed whole (engines, agent, server, gateway) while four clients send
/// requests: none fails (the global gateway moves each to b before its first byte), b
/// answers from then on, and past the grace the federation gives b a's share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_cluster_killed_under_load_costs_no_request_at_the_global_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Member::start("a", dir.path()).await;
    let b = Member::start("b", dir.path()).await;
    let mut gateway_a = Some(GatewayProc::start(&a.server.grpc, &[]));
    let gateway_b = GatewayProc::start(&b.server.grpc, &[]);
    let fed = ServerProc::start(1, &dir.path().join("federation"), "127.0.0.1:0", &["--bootstrap", "--federation"]);
    wait_voters(&fed.grpc, 1).await;
    let feds = [fed.grpc.clone()];
    let gateway_of_a = gateway_a.as_ref().map(|g| g.addr.clone()).unwrap_or_default();
    for (m, gateway, region) in [(&a, gateway_of_a.as_str(), "us"), (&b, gateway_b.addr.as_str(), "eu")] {
        apply(&feds, format!("{}  gateway: http://{gateway}\n", cluster_manifest(m, region))).await;
    }
    let two = FED.replace("replicas: 6", "replicas: 2").replace("weights: {a: 3, b: 2, c: 1}", "weights: {a: 1, b: 1}");
    apply(&feds, two).await;
    wait_spread(&[&a, &b], &fed.grpc, &[("a", 1), ("b", 1)], 2, 90).await;

    let global = GatewayProc::spawn(&[
        "gateway",
        "--federation",
        &fed.grpc,
        "--listen",
        "127.0.0.1:0",
        "--no-auth",
        "--region",
        "us",
        "--cluster-list-interval-ms",
        "200",
        "--member-poll-interval-ms",
        "200",
        "--member-down-backoff-ms",
        "100",
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let addr = global.addr.clone();
        let (status, cluster) = tokio::task::spawn_blocking(move || ask_cluster(&addr)).await.unwrap();
        if status == 200 && cluster == "a" {
            break;
        }
        assert!(Instant::now() < deadline, "the global gateway never served llm from cluster a: {status} {cluster:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Four clients, each at most 2,000 requests or until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t0 = Instant::now();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (addr, stop) = (global.addr.clone(), stop.clone());
            tokio::task::spawn_blocking(move || {
                let mut answers = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && answers.len() < 2000 {
                    let sent = t0.elapsed();
                    let (status, cluster) = ask_cluster(&addr);
                    answers.push((sent, status, cluster));
                }
                answers
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = t0.elapsed();
    a.kill();
    drop(gateway_a.take());
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answers = Vec::new();
    for c in clients {
        answers.extend(c.await.unwrap());
    }

    let failed: Vec<_> = answers.iter().filter(|(_, status, _)| *status != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        answers.len(),
        &failed[..failed.len().min(5)]
    );
    let before = answers.iter().filter(|(sent, _, c)| *sent < killed_at && c == "a").count();
    let late = killed_at + Duration::from_secs(1);
    let after: Vec<&str> = answers.iter().filter(|(sent, _, _)| *sent > late).map(|(_, _, c)| c.as_str()).collect();
    assert!(before > 0, "cluster a answered nothing before the kill");
    assert!(!after.is_empty() && after.iter().all(|c| *c == "b"), "after the kill: {after:?}");
    eprintln!(
        "{} requests, 0 failed; {before} answered by a before the kill, {} by b after",
        answers.len(),
        after.len()
    );

    wait_spread(&[&b], &fed.grpc, &[("b", 2)], 2, 60).await;
}
