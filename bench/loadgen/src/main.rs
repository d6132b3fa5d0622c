//! Load generator for bench/store: drives N concurrent clients writing to a flotilla or an
//! etcd v3 cluster over gRPC (same Rust client stack, tonic/hyper/HTTP2, for both), records
//! the latency of every request and prints writes/s and percentiles as one JSON line.
//!
//! Subcommands:
//! - `load`       N clients for a fixed time (bounded), JSON result on stdout.
//! - `wait-ready` until the cluster has a leader and every member is a caught-up voter.
//! - `failover`   write continuously, kill -9 the leader's pid, time the next successful
//!   write (trying the endpoints in order), JSON result on stdout.
//! - `ports`      print N free loopback TCP ports.
//! - `propagation` change a FederatedModel on a federation server and time until every
//!   member cluster holds the change (bench/federation), JSON result on stdout.
//!
//! etcd is spoken with hand-written prost messages for `etcdserverpb.KV/Put` and
//! `etcdserverpb.Maintenance/Status` through tonic's generic client, so no etcd proto
//! files or Go tooling are needed.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use flotilla_api::pb::cluster_service_client::ClusterServiceClient;
use flotilla_api::pb::object_service_client::ObjectServiceClient;
use flotilla_api::pb::{ApplyRequest, StatusRequest as FlStatusRequest};
use serde_json::json;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};

/// Minimal etcd v3 messages (api/etcdserverpb/rpc.proto, etcd 3.4), only the fields used.
mod etcdpb {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResponseHeader {
        #[prost(uint64, tag = "1")]
        pub cluster_id: u64,
        #[prost(uint64, tag = "2")]
        pub member_id: u64,
        #[prost(int64, tag = "3")]
        pub revision: i64,
        #[prost(uint64, tag = "4")]
        pub raft_term: u64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
        #[prost(int64, tag = "3")]
        pub lease: i64,
        #[prost(bool, tag = "4")]
        pub prev_kv: bool,
        #[prost(bool, tag = "5")]
        pub ignore_value: bool,
        #[prost(bool, tag = "6")]
        pub ignore_lease: bool,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutResponse {
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatusRequest {}
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatusResponse {
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
        #[prost(string, tag = "2")]
        pub version: String,
        #[prost(int64, tag = "3")]
        pub db_size: i64,
        #[prost(uint64, tag = "4")]
        pub leader: u64,
        #[prost(uint64, tag = "5")]
        pub raft_index: u64,
        #[prost(uint64, tag = "6")]
        pub raft_term: u64,
        #[prost(uint64, tag = "7")]
        pub raft_applied_index: u64,
        #[prost(string, repeated, tag = "8")]
        pub errors: Vec<String>,
        #[prost(int64, tag = "9")]
        pub db_size_in_use: i64,
        #[prost(bool, tag = "10")]
        pub is_learner: bool,
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum System {
    Flotilla,
    Etcd,
}

/// What a flotilla write stores (etcd always stores an opaque value).
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum WriteKind {
    /// `Tenant` manifests: no leader controller reacts to them (gateways watch tenants;
    /// none runs in the benchmark), so this measures the store.
    Tenant,
    /// `Model` manifests (engine sim, 1 replica, a fixed source) whose label changes every
    /// write: the controllers run for each (a model actor per model, its Replica created
    /// once, scheduler rounds), as a realistic control-plane write mix.
    Model,
}

#[derive(Parser)]
#[command(about = "flotilla vs etcd write benchmark client")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Load(LoadArgs),
    WaitReady(ReadyArgs),
    Failover(FailoverArgs),
    Propagation(PropagationArgs),
    Ports {
        #[arg(long, default_value_t = 1)]
        n: usize,
    },
}

#[derive(clap::Args)]
struct LoadArgs {
    #[arg(long, value_enum)]
    system: System,
    /// host:port of the server to write to (the leader).
    #[arg(long)]
    endpoint: String,
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// HTTP/2 connections, clients are spread over them round-robin (default: one each).
    #[arg(long)]
    conns: Option<usize>,
    /// Measured phase length.
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// Unmeasured warm-up before it (same clients, same load).
    #[arg(long, default_value_t = 2.0)]
    warmup_s: f64,
    /// Hard cap on measured requests (bounds memory and run time).
    #[arg(long, default_value_t = 2_000_000)]
    max_requests: u64,
    /// Bytes per write: the etcd value, or the whole flotilla manifest text.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// What the flotilla writes store (ignored for etcd).
    #[arg(long, value_enum, default_value_t = WriteKind::Tenant)]
    kind: WriteKind,
    /// Distinct keys each client cycles through.
    #[arg(long, default_value_t = 100)]
    keys_per_client: u64,
    /// Per-request timeout.
    #[arg(long, default_value_t = 10.0)]
    timeout_s: f64,
    /// Free-form label copied into the JSON output.
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(clap::Args)]
struct ReadyArgs {
    #[arg(long, value_enum)]
    system: System,
    /// Comma-separated host:port list of all members.
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    #[arg(long, default_value_t = 60.0)]
    timeout_s: f64,
}

#[derive(clap::Args)]
struct PropagationArgs {
    /// host:port of a federation server.
    #[arg(long)]
    federation: String,
    /// Comma-separated host:port of one server of each member cluster.
    #[arg(long, value_delimiter = ',')]
    members: Vec<String>,
    /// The FederatedModel's name (created by the first trial).
    #[arg(long, default_value = "prop")]
    name: String,
    #[arg(long, default_value_t = 10)]
    trials: u32,
    /// Give up on a trial after this long.
    #[arg(long, default_value_t = 30.0)]
    timeout_s: f64,
}

#[derive(clap::Args)]
struct FailoverArgs {
    #[arg(long, value_enum)]
    system: System,
    /// Comma-separated host:port list of all members, in the order they are tried.
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    /// Comma-separated pids of the members, aligned with --endpoints.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<i32>,
    /// Seconds of successful writes before the kill.
    #[arg(long, default_value_t = 1.0)]
    warmup_s: f64,
    /// Give up if no write succeeds this long after the kill.
    #[arg(long, default_value_t = 30.0)]
    give_up_s: f64,
    /// Per-attempt timeout of the in-order client while failing over.
    #[arg(long, default_value_t = 1.0)]
    request_timeout_s: f64,
    /// A new probe write to every member this often after the kill.
    #[arg(long, default_value_t = 20)]
    probe_interval_ms: u64,
    /// Timeout of each probe write.
    #[arg(long, default_value_t = 1.0)]
    probe_timeout_s: f64,
    #[arg(long, default_value_t = 256)]
    value_size: usize,
}

/// TLS for every connection, from `FLOTILLA_TLS_CERT`/`_KEY`/`_CA` as the CLI reads them
/// (bench/security runs the store benchmark with it on and off).
fn tls() -> Option<&'static std::sync::Arc<flotilla_security::Tls>> {
    static TLS: std::sync::OnceLock<Option<std::sync::Arc<flotilla_security::Tls>>> = std::sync::OnceLock::new();
    TLS.get_or_init(|| {
        let var = |k: &str| std::env::var_os(k).map(std::path::PathBuf::from);
        let args = flotilla_security::TlsArgs {
            tls_cert: var("FLOTILLA_TLS_CERT"),
            tls_key: var("FLOTILLA_TLS_KEY"),
            tls_ca: var("FLOTILLA_TLS_CA"),
        };
        flotilla_security::Tls::from_args(&args).expect("FLOTILLA_TLS_* name readable files")
    })
    .as_ref()
}

/// A lazily connected channel to `addr`, with TLS when configured.
fn lazy(ep: Endpoint, addr: &str) -> Channel {
    flotilla_security::connect::connect_lazy(ep, tls(), strip_scheme(addr))
}

fn endpoint(addr: &str, connect_timeout: Duration) -> Result<Endpoint> {
    let url = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    Ok(Endpoint::from_shared(url)?.connect_timeout(connect_timeout).tcp_nodelay(true))
}

fn strip_scheme(a: &str) -> &str {
    a.split("://").last().unwrap_or(a)
}

/// One writer: a flotilla ObjectService client (writing manifests of one kind) or an etcd
/// KV client on one channel.
#[derive(Clone)]
enum Writer {
    Flotilla(ObjectServiceClient<Channel>, WriteKind),
    Etcd(tonic::client::Grpc<Channel>),
}

impl Writer {
    fn new(system: System, kind: WriteKind, ch: Channel) -> Writer {
        match system {
            System::Flotilla => Writer::Flotilla(ObjectServiceClient::new(ch), kind),
            System::Etcd => Writer::Etcd(tonic::client::Grpc::new(ch)),
        }
    }

    /// Writes key number `key` of client `client` with a payload that differs for every
    /// `seq`, so no write is a no-op. The payload is exactly `size` bytes.
    async fn write(&mut self, client: usize, key: u64, seq: u64, size: usize, timeout: Duration) -> Result<()> {
        match self {
            Writer::Flotilla(c, kind) => {
                let mut req = tonic::Request::new(ApplyRequest {
                    manifest: manifest(*kind, client, key, seq, size),
                    expected_revision: None,
                });
                req.set_timeout(timeout);
                let resp = c.apply(req).await?.into_inner();
                if resp.unchanged {
                    bail!("apply was a no-op: every benchmark write must change the object");
                }
            }
            Writer::Etcd(g) => {
                let mut req = tonic::Request::new(etcdpb::PutRequest {
                    key: format!("bench/c{client}/k{key}").into_bytes(),
                    value: etcd_value(client, seq, size),
                    ..Default::default()
                });
                req.set_timeout(timeout);
                g.ready().await.map_err(|e| anyhow!("etcd channel not ready: {e}"))?;
                let codec = tonic_prost::ProstCodec::<etcdpb::PutRequest, etcdpb::PutResponse>::default();
                g.unary(req, PathAndQuery::from_static("/etcdserverpb.KV/Put"), codec).await?;
            }
        }
        Ok(())
    }
}

/// A manifest of `kind` named `b-<client>-<key>`, of exactly `size` bytes (when size
/// exceeds the bare manifest), whose content changes with every `seq`: labels `p0`, `p1`, ...
/// (values of at most 200 bytes, as label validation allows) carry `<seq>-` and the
/// padding. A Tenant's `spec.rpm` changes too; a Model's spec stays the same (engine sim,
/// 1 replica, a fixed source), so its replica template is stable and a write is no
/// rollout: only the label changes.
fn manifest(kind: WriteKind, client: usize, key: u64, seq: u64, size: usize) -> String {
    let (k, spec) = match kind {
        // rpm is at most 100_000_000; consecutive writes of one key differ by
        // keys_per_client, so the spec changes too.
        WriteKind::Tenant => ("Tenant", format!(r#"{{"rpm":{}}}"#, seq % 100_000_000)),
        WriteKind::Model => ("Model", r#"{"engine":"sim","source":"file:///models/bench","replicas":1}"#.to_string()),
    };
    let head = format!(r#"{{"kind":"{k}","metadata":{{"name":"b-{client}-{key}","labels":{{"#);
    let tail = format!(r#"}}}},"spec":{spec}}}"#);
    let first = format!("{seq}-");
    let labels = pad_labels(&first, size.saturating_sub(head.len() + tail.len()));
    let mut s = String::with_capacity(size.max(head.len() + tail.len() + labels.len()));
    s.push_str(&head);
    s.push_str(&labels);
    s.push_str(&tail);
    s
}

/// `"p0":"<first>xx..","p1":"xx.."...` of `want` bytes (or just `"p0":"<first>"` when that
/// is longer), each value at most 200 bytes (labels allow 256).
fn pad_labels(first: &str, want: usize) -> String {
    const MAX: usize = 200;
    let mut values = vec![first.to_string()];
    let len = |vs: &[String]| {
        vs.iter().enumerate().map(|(i, v)| format!(r#""p{i}":"""#).len() + v.len()).sum::<usize>() + vs.len() - 1
    };
    while len(&values) < want {
        let i = values.len() - 1;
        let missing = want - len(&values);
        if values[i].len() < MAX {
            let grow = missing.min(MAX - values[i].len());
            values[i].extend(std::iter::repeat_n('x', grow));
        } else if missing > format!(r#","p{}":"""#, i + 1).len() {
            values.push(String::new());
        } else {
            // Too few bytes left for another label: shorten this one and start another.
            let keep = values[i].len() - 16.min(values[i].len() - first.len().min(values[i].len()));
            values[i].truncate(keep);
            values.push(String::new());
        }
    }
    values.iter().enumerate().map(|(i, v)| format!(r#""p{i}":"{v}""#)).collect::<Vec<_>>().join(",")
}

fn etcd_value(client: usize, seq: u64, size: usize) -> Vec<u8> {
    let mut v = format!("{client}-{seq}-").into_bytes();
    v.resize(size.max(v.len()), b'x');
    v
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1].as_secs_f64() * 1e3
}

async fn load(a: LoadArgs) -> Result<()> {
    let conns = a.conns.unwrap_or(a.clients).clamp(1, a.clients.max(1));
    let mut channels = Vec::with_capacity(conns);
    for _ in 0..conns {
        let ep = endpoint(&a.endpoint, Duration::from_secs(2))?;
        let ch = flotilla_security::connect::connect(ep, tls(), strip_scheme(&a.endpoint))
            .await
            .with_context(|| format!("connecting to {}", a.endpoint))?;
        channels.push(ch);
    }
    let timeout = Duration::from_secs_f64(a.timeout_s);
    // Payloads never repeat across runs against the same cluster: no write is a no-op.
    let seq_base = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as u64;
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let measured = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let mut tasks = Vec::new();
    for c in 0..a.clients {
        let mut w = Writer::new(a.system, a.kind, channels[c % conns].clone());
        let (measuring, stop, measured, errors, first_error) =
            (measuring.clone(), stop.clone(), measured.clone(), errors.clone(), first_error.clone());
        let (size, keys, max) = (a.value_size, a.keys_per_client.max(1), a.max_requests);
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<Duration> = Vec::with_capacity(16 * 1024);
            let mut seq: u64 = seq_base;
            while !stop.load(Ordering::Relaxed) {
                let on = measuring.load(Ordering::Relaxed);
                if on && measured.fetch_add(1, Ordering::Relaxed) >= max {
                    break;
                }
                let t = Instant::now();
                let r = w.write(c, seq % keys, seq, size, timeout).await;
                let d = t.elapsed();
                seq += 1;
                match r {
                    Ok(()) if on => lat.push(d),
                    Ok(()) => {}
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().unwrap().get_or_insert_with(|| format!("{e:#}"));
                        if on {
                            measured.fetch_sub(1, Ordering::Relaxed);
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(a.warmup_s)).await;
    let warm_errors = errors.swap(0, Ordering::Relaxed);
    let start = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    let deadline = start + Duration::from_secs_f64(a.duration_s);
    while Instant::now() < deadline && measured.load(Ordering::Relaxed) < a.max_requests {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await?);
    }
    // Requests in flight at the stop are counted; the window ends when the last one returns.
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let n = lat.len();
    let mean = if n == 0 { f64::NAN } else { lat.iter().map(|d| d.as_secs_f64()).sum::<f64>() / n as f64 * 1e3 };
    let out = json!({
        "label": a.label,
        "system": format!("{:?}", a.system).to_lowercase(),
        "endpoint": a.endpoint,
        "clients": a.clients,
        "conns": conns,
        "value_size": a.value_size,
        "kind": match (a.system, a.kind) {
            (System::Etcd, _) => "value",
            (_, WriteKind::Tenant) => "tenant",
            (_, WriteKind::Model) => "model",
        },
        "duration_s": elapsed,
        "writes": n,
        "errors": errors.load(Ordering::Relaxed),
        "warmup_errors": warm_errors,
        "first_error": first_error.lock().unwrap().clone(),
        "writes_per_s": n as f64 / elapsed,
        "p50_ms": percentile(&lat, 50.0),
        "p90_ms": percentile(&lat, 90.0),
        "p99_ms": percentile(&lat, 99.0),
        "max_ms": lat.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
        "mean_ms": mean,
    });
    println!("{out}");
    if n == 0 {
        bail!("no successful writes");
    }
    Ok(())
}

/// Index in `endpoints` of the leader, if the cluster is healthy: a leader, every member a
/// voter that answers and has applied everything committed.
async fn leader_index(system: System, endpoints: &[String]) -> Result<usize> {
    let t = Duration::from_millis(500);
    match system {
        System::Flotilla => {
            let mut last_err = anyhow!("no endpoint answered");
            for ep in endpoints {
                let ch = lazy(endpoint(ep, t)?.timeout(Duration::from_secs(2)), ep);
                let st = match ClusterServiceClient::new(ch).status(FlStatusRequest { local: false }).await {
                    Ok(r) => r.into_inner(),
                    Err(e) => {
                        last_err = anyhow!("{ep}: {}", e.message());
                        continue;
                    }
                };
                if st.leader_id == 0 {
                    bail!("no leader yet");
                }
                if st.members.len() != endpoints.len() {
                    bail!("{} members, want {}", st.members.len(), endpoints.len());
                }
                for m in &st.members {
                    if !m.voter || !m.reachable || m.applied_index < st.commit_index {
                        bail!(
                            "member {} not ready (voter={} reachable={} applied={} commit={})",
                            m.id,
                            m.voter,
                            m.reachable,
                            m.applied_index,
                            st.commit_index
                        );
                    }
                }
                let leader =
                    st.members.iter().find(|m| m.id == st.leader_id).ok_or_else(|| anyhow!("leader not a member"))?;
                return endpoints
                    .iter()
                    .position(|e| strip_scheme(e) == strip_scheme(&leader.addr))
                    .ok_or_else(|| anyhow!("leader addr {} not in --endpoints", leader.addr));
            }
            Err(last_err)
        }
        System::Etcd => {
            let mut sts = Vec::new();
            for ep in endpoints {
                let ch = lazy(endpoint(ep, t)?.timeout(Duration::from_secs(2)), ep);
                let mut g = tonic::client::Grpc::new(ch);
                g.ready().await.map_err(|e| anyhow!("{ep}: {e}"))?;
                let codec = tonic_prost::ProstCodec::<etcdpb::StatusRequest, etcdpb::StatusResponse>::default();
                let st = g
                    .unary(
                        tonic::Request::new(etcdpb::StatusRequest {}),
                        PathAndQuery::from_static("/etcdserverpb.Maintenance/Status"),
                        codec,
                    )
                    .await
                    .map_err(|e| anyhow!("{ep}: {}", e.message()))?
                    .into_inner();
                sts.push(st);
            }
            let leader = sts[0].leader;
            let max_index = sts.iter().map(|s| s.raft_index).max().unwrap_or(0);
            for s in &sts {
                if leader == 0
                    || s.leader != leader
                    || s.is_learner
                    || !s.errors.is_empty()
                    || s.raft_applied_index + 2 < max_index
                {
                    bail!(
                        "etcd not ready: leader={} member leader={} learner={} applied={} max={}",
                        leader,
                        s.leader,
                        s.is_learner,
                        s.raft_applied_index,
                        max_index
                    );
                }
            }
            sts.iter()
                .position(|s| s.header.as_ref().is_some_and(|h| h.member_id == leader))
                .ok_or_else(|| anyhow!("leader {leader:x} not among endpoints"))
        }
    }
}

/// Polls until two polls in a row find the cluster ready with the same leader.
async fn ready_leader(system: System, endpoints: &[String], timeout: Duration) -> Result<usize> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        match leader_index(system, endpoints).await {
            Ok(i) if last == Some(i) => return Ok(i),
            Ok(i) => last = Some(i),
            Err(e) if Instant::now() >= deadline => bail!("not ready after {}s: {e:#}", timeout.as_secs_f64()),
            Err(_) => last = None,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_ready(a: ReadyArgs) -> Result<()> {
    let i = ready_leader(a.system, &a.endpoints, Duration::from_secs_f64(a.timeout_s)).await?;
    println!("{}", json!({"leader_index": i, "leader": a.endpoints[i]}));
    Ok(())
}

async fn failover(a: FailoverArgs) -> Result<()> {
    if a.pids.len() != a.endpoints.len() {
        bail!("--pids and --endpoints differ in length");
    }
    let leader = ready_leader(a.system, &a.endpoints, Duration::from_secs(30)).await.context("cluster not ready")?;
    let rt = Duration::from_secs_f64(a.request_timeout_s);
    let give_up = Duration::from_secs_f64(a.give_up_s);
    let mk = |ep: &String| -> Result<Writer> {
        Ok(Writer::new(a.system, WriteKind::Tenant, lazy(endpoint(ep, Duration::from_millis(200))?, ep)))
    };
    // Keys of its own ("b-10000-*" ...), and a seq that never repeats across trials, so no
    // write is a no-op.
    let mut seq = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as u64;
    // The in-order client: writes to the leader, as a client that found it would.
    let mut writers = a.endpoints.iter().map(mk).collect::<Result<Vec<_>>>()?;
    let warm_end = Instant::now() + Duration::from_secs_f64(a.warmup_s);
    let mut warm_ok = 0u64;
    while Instant::now() < warm_end {
        seq += 1;
        if writers[leader].write(10_000, seq % 100, seq, a.value_size, rt).await.is_ok() {
            warm_ok += 1;
        }
    }
    if warm_ok == 0 {
        bail!("no successful write before the kill");
    }
    // Probe clients, one channel per member, ready before the kill.
    let probes = a.endpoints.iter().map(mk).collect::<Result<Vec<_>>>()?;
    let pid = a.pids[leader];
    let t0 = Instant::now();
    if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
        bail!("kill -9 {pid}: {}", std::io::Error::last_os_error());
    }
    let deadline = t0 + give_up;

    // (1) Probes: every --probe-interval-ms, a new write to each member, each bounded by
    // --probe-timeout-s; the first success anywhere ends it. Measures when the cluster
    // accepts writes again, to within the interval, whatever a server does with a request
    // it cannot serve (etcd holds it until its own 7 s timeout, flotilla forwards it once
    // a leader is known).
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(usize, f64)>(64);
    let done = Arc::new(AtomicBool::new(false));
    let probe_every = Duration::from_millis(a.probe_interval_ms.max(1));
    let probe_timeout = Duration::from_secs_f64(a.probe_timeout_s);
    let prober = {
        let (done, size) = (done.clone(), a.value_size);
        tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            let mut s = seq;
            let mut tick = tokio::time::interval(probe_every);
            while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                tick.tick().await;
                for (i, w) in probes.iter().enumerate() {
                    s += 1;
                    let (mut w, tx, s) = (w.clone(), tx.clone(), s);
                    tasks.spawn(async move {
                        if w.write(10_001 + i, s % 100, s, size, probe_timeout).await.is_ok() {
                            let _ = tx.try_send((i, t0.elapsed().as_secs_f64() * 1e3));
                        }
                    });
                }
                while tasks.try_join_next().is_some() {}
            }
            tasks.abort_all();
        })
    };

    // (2) In order: the client that was writing goes on, trying the members in order on
    // failure, each attempt bounded by --request-timeout-s.
    let system = a.system;
    let endpoints = a.endpoints.clone();
    let size = a.value_size;
    let in_order = tokio::spawn(async move {
        let mut cur = leader;
        let mut attempts = 0u64;
        let mut errs: Vec<String> = Vec::new();
        while Instant::now() < deadline {
            seq += 1;
            attempts += 1;
            match writers[cur].write(10_000, seq % 100, seq, size, rt).await {
                Ok(()) => return (Some(t0.elapsed().as_secs_f64() * 1e3), cur, attempts, errs),
                Err(e) => {
                    if errs.len() < 6 {
                        errs.push(format!(
                            "{}@{:.0}ms: {}",
                            endpoints[cur],
                            t0.elapsed().as_secs_f64() * 1e3,
                            short(&e)
                        ));
                    }
                    cur = (cur + 1) % writers.len();
                    if cur == leader {
                        // A full round failed: pause a little before the next one.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }
        (None, cur, attempts, errs)
    });

    let hedged = tokio::time::timeout_at(deadline, rx.recv()).await.ok().flatten();
    done.store(true, Ordering::Relaxed);
    let (in_order_ms, served_by, attempts, errs) = in_order.await?;
    prober.abort();
    let Some((hedged_by, hedged_ms)) = hedged else {
        bail!("no successful write {}s after the kill; in-order errors: {errs:?}", a.give_up_s);
    };
    println!(
        "{}",
        json!({
            "system": format!("{:?}", system).to_lowercase(),
            "killed_index": leader,
            "killed_pid": pid,
            "failover_ms": hedged_ms,
            "failover_served_by_index": hedged_by,
            "probe_interval_ms": probe_every.as_secs_f64() * 1e3,
            "in_order_ms": in_order_ms,
            "in_order_served_by_index": served_by,
            "in_order_attempts": attempts,
            "in_order_attempt_timeout_ms": rt.as_secs_f64() * 1e3,
            "in_order_errors": errs,
            "warmup_writes": warm_ok,
        })
    );
    Ok(())
}

fn short(e: &anyhow::Error) -> String {
    if let Some(s) = e.downcast_ref::<tonic::Status>() {
        return format!("{:?}: {}", s.code(), s.message().chars().take(120).collect::<String>());
    }
    format!("{e:#}").chars().take(160).collect()
}

fn ports(n: usize) -> Result<()> {
    // Hold all listeners until every port is chosen so they are distinct.
    let ls: Vec<_> = (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
    let ps: Vec<String> = ls.iter().map(|l| l.local_addr().map(|a| a.port().to_string())).collect::<Result<_, _>>()?;
    println!("{}", ps.join(" "));
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Load(a) => load(a).await,
        Cmd::WaitReady(a) => wait_ready(a).await,
        Cmd::Failover(a) => failover(a).await,
        Cmd::Propagation(a) => propagation(a).await,
        Cmd::Ports { n } => ports(n),
    }
}

/// Per trial: apply the FederatedModel with a new `--max-num-seqs` in its template, then
/// poll every member (a local read each 5 ms) until its Model carries it; the time to the
/// first and to the last member.
async fn propagation(a: PropagationArgs) -> Result<()> {
    use flotilla_api::pb::GetRequest;
    let fed = ObjectServiceClient::new(lazy(endpoint(&a.federation, Duration::from_secs(2))?, &a.federation));
    let members: Vec<ObjectServiceClient<Channel>> = a
        .members
        .iter()
        .map(|m| Ok(ObjectServiceClient::new(lazy(endpoint(m, Duration::from_secs(2))?, m))))
        .collect::<Result<_>>()?;
    let n = members.len();
    let mut trials = Vec::new();
    for t in 0..=a.trials {
        let seqs = 100 + t;
        let manifest = format!(
            "kind: FederatedModel\nmetadata: {{name: {}}}\nspec:\n  replicas: {n}\n  template: {{engine: sim, source: file:///m, engine_args: ['--max-num-seqs', '{seqs}']}}\n",
            a.name
        );
        let marker = format!("\"{seqs}\"");
        let t0 = Instant::now();
        fed.clone().apply(ApplyRequest { manifest, expected_revision: None }).await?;
        let applied_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let timeout = Duration::from_secs_f64(a.timeout_s);
        let waits = members.iter().map(|c| {
            let (mut c, name, marker) = (c.clone(), a.name.clone(), marker.clone());
            tokio::spawn(async move {
                let deadline = t0 + timeout;
                while Instant::now() < deadline {
                    let req = GetRequest { kind: "model".into(), name: name.clone(), stale: true };
                    if let Ok(r) = c.get(req).await {
                        if r.into_inner().object.is_some_and(|o| o.spec_json.contains(&marker)) {
                            return Some(t0.elapsed().as_secs_f64() * 1000.0);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                None
            })
        });
        let mut got: Vec<Option<f64>> = Vec::new();
        for w in waits.collect::<Vec<_>>() {
            got.push(w.await?);
        }
        if t == 0 {
            continue; // the create: members come and go with it, not measured
        }
        let done: Vec<f64> = got.iter().flatten().copied().collect();
        let first = done.iter().copied().fold(f64::INFINITY, f64::min);
        let last = done.iter().copied().fold(0.0, f64::max);
        trials.push(json!({"trial": t, "apply_ms": applied_ms, "first_ms": first, "last_ms": last, "reached": done.len(), "members": n}));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut lasts: Vec<f64> = trials.iter().filter_map(|t| t["last_ms"].as_f64()).collect();
    lasts.sort_by(f64::total_cmp);
    let pct = |p: f64| lasts.get(((lasts.len() as f64 - 1.0) * p).round() as usize).copied();
    println!(
        "{}",
        json!({"members": n, "trials": trials, "all_members_p50_ms": pct(0.5), "all_members_max_ms": pct(1.0)})
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_have_the_asked_size_and_parse() {
        for kind in [WriteKind::Tenant, WriteKind::Model] {
            for size in [0, 100, 150, 256, 300, 411, 412, 413, 420, 1000, 4096] {
                for seq in [1, 1_765_000_000_000_000] {
                    let m = manifest(kind, 63, 99, seq, size);
                    let v: serde_json::Value = serde_json::from_str(&m).unwrap();
                    if size > 200 {
                        assert_eq!(m.len(), size, "{kind:?} {size} {seq}: {m}");
                    }
                    let labels = v["metadata"]["labels"].as_object().unwrap();
                    assert!(labels.values().all(|l| l.as_str().unwrap().len() <= 200));
                    assert!(labels["p0"].as_str().unwrap().starts_with(&format!("{seq}-")));
                    assert!(v["spec"]["rpm"].as_u64().is_none_or(|r| r <= 100_000_000));
                }
            }
        }
    }
}
