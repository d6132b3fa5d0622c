//! The cluster under test: `flotilla server`s, `flotilla agent`s running sim engines and a
//! `flotilla gateway`, real processes of the binary under test on loopback, each in its own
//! directory under the run directory. Every link a process dials to a server goes through
//! its own fault proxy ([`crate::proxy`]): process X's `FLOTILLA_DIAL_MAP` maps each server's
//! advertised address to the proxy of link X→server, so faults can cut, delay or blackhole
//! any directed link without privileges. Workload clients dial servers directly.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use flotilla_api::pb::cluster_service_client::ClusterServiceClient;
use flotilla_api::pb::object_service_client::ObjectServiceClient;
use flotilla_api::pb::{ApplyRequest, ListRequest, StatusRequest};
use flotilla_testkit::ports::free_port;
use flotilla_testkit::procs::log_tail;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::dial::Dialer;
use crate::procs::{Launch, Proc, State};
use crate::proxy::{Network, Proxy};
use crate::scenario::Topology;

/// One server.
#[derive(Debug)]
pub struct Server {
    pub id: u64,
    pub proc: Proc,
    /// Its real gRPC address (also the advertised one).
    pub grpc: String,
    pub data_dir: PathBuf,
    /// Mounted as a small tmpfs (disk-full faults).
    pub small_disk: bool,
}

/// The running cluster.
pub struct Cluster {
    pub run_id: String,
    pub dir: PathBuf,
    pub servers: Vec<Server>,
    pub agents: Vec<Proc>,
    pub gateway: Option<(Proc, String)>,
    /// The fault proxies, one per directed link (they stop when it is dropped).
    pub net: Network,
    /// How the harness dials the servers (with the run's admin certificate under TLS).
    pub dialer: Dialer,
}

impl Cluster {
    async fn channel(&self, addr: &str) -> Option<Channel> {
        self.dialer.channel(addr, Duration::from_millis(300), Duration::from_secs(1)).await
    }
}

/// `RUST_LOG` for every process of the run: `FLOTILLA_CHAOS_LOG`, default `warn`.
fn log_level() -> String {
    std::env::var("FLOTILLA_CHAOS_LOG").unwrap_or_else(|_| "warn".into())
}

/// Server-side timing for quick scenarios: faster node-loss detection than the defaults.
const SERVER_FLAGS: &[&str] =
    &["--node-ttl-ms", "4000", "--reschedule-grace-ms", "3000", "--agent-heartbeat-ms", "250"];

impl Cluster {
    /// Starts everything `topo` describes and waits until the servers have a leader with
    /// every member a voter, and each agent has registered.
    pub async fn start(bin: &Path, dir: &Path, run_id: &str, topo: &Topology) -> anyhow::Result<Cluster> {
        let n = topo.servers as u64;
        let mut grpc = Vec::new();
        for _ in 0..n {
            grpc.push(format!("127.0.0.1:{}", free_port()?));
        }
        let server_names: Vec<String> = (1..=n).map(|i| format!("s{i}")).collect();
        let agent_names: Vec<String> = (1..=topo.agents).map(|i| format!("a{i}")).collect();
        let mut dialers: Vec<String> = server_names.clone();
        dialers.extend(agent_names.iter().cloned());
        if topo.gateway {
            dialers.push("gw".into());
        }
        // One proxy per directed link dialer -> server.
        let mut net = Network::new();
        let mut maps: std::collections::HashMap<String, Vec<String>> = Default::default();
        for from in &dialers {
            for (j, to) in server_names.iter().enumerate() {
                if from == to {
                    continue;
                }
                let target = grpc[j].parse().context("server address")?;
                let p = Proxy::start(&format!("{from}->{to}"), "127.0.0.1:0".parse()?, target).await?;
                maps.entry(from.clone()).or_default().push(format!("{}={}", grpc[j], p.local_addr()));
                net.insert(from, to, p);
            }
        }
        let dial_map = |name: &str| -> (String, String) {
            ("FLOTILLA_DIAL_MAP".to_string(), maps.get(name).map(|m| m.join(",")).unwrap_or_default())
        };
        // With TLS, every process gets a certificate naming it, made for this run.
        let certs = if topo.tls { Some(RunCerts::make(&dir.join("tls"), n, &agent_names)?) } else { None };
        let tls_flags = |who: &str| certs.as_ref().map(|c| c.flags(who)).unwrap_or_default();
        let mut servers = Vec::new();
        for i in 0..n {
            let name = &server_names[i as usize];
            let data_dir = dir.join(name);
            std::fs::create_dir_all(&data_dir)?;
            let small_disk = topo.small_disks && mount_tmpfs(&data_dir)?;
            let mut args: Vec<String> = ["server", "--id", &(i + 1).to_string(), "--grpc-addr", &grpc[i as usize]]
                .iter()
                .map(|s| s.to_string())
                .collect();
            args.extend(["--http-addr".into(), "127.0.0.1:0".into(), "--data-dir".into()]);
            args.push(data_dir.join("data").display().to_string());
            args.extend(SERVER_FLAGS.iter().map(|s| s.to_string()));
            args.extend(topo.raft.map(|r| r.flags()).unwrap_or_default());
            args.extend(tls_flags(name));
            if i == 0 {
                args.push("--bootstrap".into());
            } else {
                args.extend(["--join".into(), grpc[0].clone()]);
            }
            let launch = Launch {
                program: bin.to_path_buf(),
                args,
                env: vec![dial_map(name), ("RUST_LOG".into(), log_level())],
                log: dir.join(format!("{name}.log")),
            };
            servers.push(Server {
                id: i + 1,
                proc: Proc::new(name, launch),
                grpc: grpc[i as usize].clone(),
                data_dir,
                small_disk,
            });
        }
        let mut cluster = Cluster {
            run_id: run_id.to_string(),
            dir: dir.to_path_buf(),
            servers,
            agents: Vec::new(),
            gateway: None,
            net,
            dialer: Dialer::new(certs.as_ref().map(|c| c.admin.clone())),
        };
        for i in 0..cluster.servers.len() {
            cluster.servers[i].proc.start(run_id)?;
            if i == 0 {
                cluster.wait_leader(Duration::from_secs(20)).await?;
            }
        }
        cluster.wait_voters(n as usize, Duration::from_secs(30)).await?;
        let server_list = grpc.join(",");
        for name in &agent_names {
            let data_dir = dir.join(name);
            std::fs::create_dir_all(&data_dir)?;
            let args = vec![
                "agent".into(),
                "--server".into(),
                server_list.clone(),
                "--node-name".into(),
                name.clone(),
                "--gpus".into(),
                topo.gpus_per_agent.to_string(),
                "--gpu-type".into(),
                "A100-80GB".into(),
                "--heartbeat-interval-ms".into(),
                "250".into(),
                "--data-dir".into(),
                data_dir.display().to_string(),
                "--sim-args=--speedup 20 --allow-faults".into(),
            ];
            let args = [args, tls_flags(name)].concat();
            let launch = Launch {
                program: bin.to_path_buf(),
                args,
                env: vec![dial_map(name), ("RUST_LOG".into(), log_level())],
                log: dir.join(format!("{name}.log")),
            };
            let mut p = Proc::new(name, launch);
            p.start(run_id)?;
            cluster.agents.push(p);
        }
        if topo.gateway {
            let listen = format!("127.0.0.1:{}", free_port()?);
            let args = vec![
                "gateway".into(),
                "--server".into(),
                server_list.clone(),
                "--listen".into(),
                listen.clone(),
                "--no-auth".into(),
            ];
            let args = [args, tls_flags("gw")].concat();
            let launch = Launch {
                program: bin.to_path_buf(),
                args,
                env: vec![dial_map("gw"), ("RUST_LOG".into(), log_level())],
                log: dir.join("gw.log"),
            };
            let mut p = Proc::new("gw", launch);
            p.start(run_id)?;
            cluster.gateway = Some((p, listen));
        }
        Ok(cluster)
    }

    /// The servers' gRPC addresses.
    pub fn server_addrs(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.grpc.clone()).collect()
    }

    /// The leader's id as a running (not paused) server reports it, if any.
    pub async fn leader(&mut self) -> Option<u64> {
        let live: Vec<String> = self
            .servers
            .iter_mut()
            .filter_map(|s| (s.proc.state() == State::Running).then(|| s.grpc.clone()))
            .collect();
        for addr in live {
            if let Some(ch) = self.channel(&addr).await {
                if let Ok(r) = ClusterServiceClient::new(ch).status(StatusRequest { local: true }).await {
                    let id = r.into_inner().leader_id;
                    if id != 0 {
                        return Some(id);
                    }
                }
            }
        }
        None
    }

    /// Waits until some server reports a leader.
    pub async fn wait_leader(&mut self, timeout: Duration) -> anyhow::Result<u64> {
        let t0 = Instant::now();
        loop {
            if let Some(id) = self.leader().await {
                return Ok(id);
            }
            if t0.elapsed() > timeout {
                bail!("no leader after {timeout:?}; s1 log:\n{}", log_tail(&self.dir.join("s1.log"), 20));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_voters(&mut self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let t0 = Instant::now();
        loop {
            if let Some(ch) = self.channel(&self.servers[0].grpc).await {
                if let Ok(r) = ClusterServiceClient::new(ch).status(StatusRequest { local: true }).await {
                    let r = r.into_inner();
                    if r.members.iter().filter(|m| m.voter).count() >= n && r.leader_id != 0 {
                        return Ok(());
                    }
                }
            }
            if t0.elapsed() > timeout {
                bail!("the cluster did not reach {n} voters in {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An object-service client of any server that answers.
    pub async fn objects(&self) -> Option<ObjectServiceClient<Channel>> {
        for s in &self.servers {
            if let Some(ch) = self.channel(&s.grpc).await {
                return Some(ObjectServiceClient::new(ch));
            }
        }
        None
    }

    /// Applies a sim Model with `replicas` replicas (retrying through elections).
    pub async fn apply_model(&self, name: &str, replicas: u32, gpus: u32) -> anyhow::Result<()> {
        let manifest = format!(
            "kind: Model\nmetadata:\n  name: {name}\nspec:\n  engine: sim\n  source: file:///models/{name}\n  replicas: {replicas}\n  gpus: {gpus}\n"
        );
        let t0 = Instant::now();
        loop {
            for s in &self.servers {
                if let Some(ch) = self.channel(&s.grpc).await {
                    let req = ApplyRequest { manifest: manifest.clone(), expected_revision: None };
                    if ObjectServiceClient::new(ch).apply(req).await.is_ok() {
                        return Ok(());
                    }
                }
            }
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("could not apply model {name}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Ready replicas of `model` and their engine endpoints (a linearizable read).
    pub async fn ready_replicas(&self, model: &str) -> Option<Vec<String>> {
        let mut c = self.objects().await?;
        let req = ListRequest { kind: "replica".into(), label_selector: format!("model={model}"), stale: false };
        let objs = c.list(req).await.ok()?.into_inner().objects;
        Some(
            objs.iter()
                .filter_map(|o| {
                    let st: serde_json::Value = serde_json::from_str(&o.status_json).ok()?;
                    (st["phase"] == "Ready").then(|| st["endpoint"].as_str().map(str::to_string))?
                })
                .collect(),
        )
    }

    /// A process by name (`s1`, `a2`, `gw`).
    pub fn proc_mut(&mut self, name: &str) -> Option<&mut Proc> {
        if let Some(s) = self.servers.iter_mut().find(|s| s.proc.name == name) {
            return Some(&mut s.proc);
        }
        if let Some(a) = self.agents.iter_mut().find(|a| a.name == name) {
            return Some(a);
        }
        self.gateway.as_mut().filter(|(g, _)| g.name == name).map(|(g, _)| g)
    }

    /// Stops everything (gateway, agents, servers), kills every engine the run started,
    /// and unmounts small disks.
    pub async fn shutdown(&mut self) {
        if let Some((g, _)) = self.gateway.as_mut() {
            g.kill().await;
        }
        for a in &mut self.agents {
            a.kill().await;
        }
        for s in &mut self.servers {
            s.proc.kill().await;
            if s.small_disk {
                let _ = tokio::process::Command::new("umount").arg("-l").arg(&s.data_dir).status().await;
            }
        }
        crate::procs::cleanup(crate::procs::Runs::One(&self.run_id)).await;
    }
}

/// Mounts a 64 MiB tmpfs on `dir` (root only). False, with a note, when not root.
fn mount_tmpfs(dir: &Path) -> anyhow::Result<bool> {
    if !rustix::process::geteuid().is_root() {
        bail!("topology.small_disks needs root (a tmpfs is mounted on each server's data dir)");
    }
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(dir)
        .status()
        .context("run mount")?
        .success();
    if !ok {
        bail!("mount -t tmpfs on {} failed", dir.display());
    }
    Ok(true)
}

/// The certificates of one TLS run: a CA, servers `s1..sN` (peers, on 127.0.0.1), agents by
/// node name, the gateway `gw`, and the harness itself as admin `chaos`.
struct RunCerts {
    dir: std::path::PathBuf,
    admin: std::sync::Arc<flotilla_security::Tls>,
}

impl RunCerts {
    fn make(dir: &Path, servers: u64, agents: &[String]) -> anyhow::Result<RunCerts> {
        use flotilla_security::certs::{create_ca, issue, CertRequest};
        use flotilla_security::{Identity, Role};
        std::fs::create_dir_all(dir)?;
        let ca = create_ca("flotilla chaos CA", 2).map_err(|e| anyhow::anyhow!("CA: {e}"))?;
        std::fs::write(dir.join("ca.pem"), &ca.cert_pem)?;
        let mut who: Vec<(String, Role)> = (1..=servers).map(|i| (format!("s{i}"), Role::Peer)).collect();
        who.extend(agents.iter().map(|a| (a.clone(), Role::Agent)));
        who.push(("gw".into(), Role::Gateway));
        who.push(("chaos".into(), Role::Admin));
        for (name, role) in who {
            let req = CertRequest {
                identity: Some(Identity::new(role, &name).map_err(|e| anyhow::anyhow!("{name}: {e}"))?),
                dns: vec!["localhost".into()],
                ips: vec![std::net::IpAddr::from([127, 0, 0, 1])],
                days: 2,
            };
            let leaf = issue(&ca, &req).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            std::fs::write(dir.join(format!("{name}.pem")), leaf.cert_pem)?;
            std::fs::write(dir.join(format!("{name}-key.pem")), leaf.key_pem)?;
        }
        let admin = flotilla_security::Tls::load(Self::files(dir, "chaos")).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(RunCerts { dir: dir.to_path_buf(), admin })
    }

    fn files(dir: &Path, who: &str) -> flotilla_security::TlsFiles {
        flotilla_security::TlsFiles {
            cert: dir.join(format!("{who}.pem")),
            key: dir.join(format!("{who}-key.pem")),
            ca: dir.join("ca.pem"),
        }
    }

    /// `--tls-cert/--tls-key/--tls-ca` for process `who`.
    fn flags(&self, who: &str) -> Vec<String> {
        let f = Self::files(&self.dir, who);
        let p = |p: std::path::PathBuf| p.display().to_string();
        vec!["--tls-cert".into(), p(f.cert), "--tls-key".into(), p(f.key), "--tls-ca".into(), p(f.ca)]
    }
}
