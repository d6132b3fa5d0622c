//! The stream to the leader: connect to a server (the `--server` list in order, or the
//! address a non-leader names), send `Register`, wait for `Registered`, then send a
//! `Heartbeat` every interval while applying each `Assign`. A lost stream reconnects with
//! backoff; engines keep running meanwhile (static stability). Refusals that retrying
//! cannot fix (a duplicate node name) end the agent. An engine task can ask for an early
//! heartbeat (its engine turned ready, an adapter finished loading or failed): it goes out at once, at most one
//! per [`EARLY_HEARTBEAT_GAP`] after the previous heartbeat.
//!
//! ```text
//!  servers[i] ──Session──> FAILED_PRECONDITION "cluster.not_leader: leader=X" ──> X
//!      │                   UNAVAILABLE / transport error ──> servers[i+1] (backoff per round)
//!      └──> Registered ──> loop { tick or early request: Heartbeat | msg: Assign -> manager.apply }
//! ```

use std::sync::Arc;
use std::time::Duration;

use flotilla_api::pb::{self, agent_message::Msg, agent_service_client::AgentServiceClient, server_message};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;
use tonic::{Code, Status};

use crate::config::AgentConfig;
use crate::engines::EngineManager;
use crate::error::AgentError;
use crate::gpu::GpuInventory;

/// Least time between a heartbeat and an early one.
pub const EARLY_HEARTBEAT_GAP: Duration = Duration::from_millis(50);

/// What to do after a failed connection or a lost stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Connect to this address next (a leader hint).
    Redirect(String),
    /// Try the next server of the list.
    NextServer,
    /// Give up: the server refused us for good.
    Fatal(FatalKind),
}

/// Why the agent gives up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FatalKind {
    /// Another live agent has the node name.
    Duplicate,
    /// Invalid registration or no permission.
    Refused,
}

/// Classifies a gRPC status from a server (pure).
pub fn classify(status: &Status) -> Next {
    match status.code() {
        Code::FailedPrecondition => match leader_hint(status.message()) {
            Some(addr) => Next::Redirect(addr),
            None => Next::NextServer,
        },
        Code::AlreadyExists => Next::Fatal(FatalKind::Duplicate),
        Code::InvalidArgument | Code::PermissionDenied | Code::Unauthenticated | Code::Unimplemented => {
            Next::Fatal(FatalKind::Refused)
        }
        _ => Next::NextServer,
    }
}

/// `cluster.not_leader: leader=10.0.0.2:7070` → `http://10.0.0.2:7070`.
pub fn leader_hint(message: &str) -> Option<String> {
    let rest = message.split("leader=").nth(1)?;
    let addr = rest.split(|c: char| c.is_whitespace() || c == ',' || c == ';').next()?.trim();
    crate::config::server_url(addr).ok()
}

/// Runs the connection loop until `shutdown` turns true (Ok) or a fatal refusal (Err).
pub async fn run(
    cfg: Arc<AgentConfig>,
    agent_id: String,
    gpus: Arc<dyn GpuInventory>,
    manager: Arc<EngineManager>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    if cfg.servers.is_empty() {
        return Err(AgentError::invalid("server", "is empty; give at least one host:port"));
    }
    let mut index = 0usize;
    let mut redirect: Option<String> = None;
    let mut failures_this_round = 0usize;
    let mut backoff = Duration::from_millis(100);
    loop {
        let server = redirect.take().unwrap_or_else(|| cfg.servers[index % cfg.servers.len()].clone());
        let session = Session { cfg: &cfg, agent_id: &agent_id, gpus: gpus.as_ref(), manager: &manager };
        let result = tokio::select! {
            r = session.run(&server) => r,
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        };
        let (status, was_registered) = result;
        if was_registered {
            backoff = Duration::from_millis(100);
            failures_this_round = 0;
        }
        match classify(&status) {
            Next::Fatal(kind) => {
                tracing::error!(server = %server, code = ?status.code(), message = %status.message(), "registration refused");
                return Err(match kind {
                    FatalKind::Duplicate => {
                        AgentError::DuplicateNode { node: cfg.node_name.clone(), message: status.message().to_string() }
                    }
                    FatalKind::Refused => {
                        AgentError::Refused { server, message: format!("{:?}: {}", status.code(), status.message()) }
                    }
                });
            }
            Next::Redirect(leader) if leader != server => {
                tracing::info!(server = %server, leader = %leader, "following leader hint");
                redirect = Some(leader);
                failures_this_round += 1;
                if failures_this_round <= 2 * cfg.servers.len() + 2 {
                    continue;
                }
            }
            _ => {
                tracing::warn!(server = %server, code = ?status.code(), message = %status.message(), "server unavailable; trying the next one");
                index += 1;
                failures_this_round += 1;
            }
        }
        if failures_this_round >= cfg.servers.len() {
            failures_this_round = 0;
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.wait_for(|s| *s) => return Ok(()),
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

struct Session<'a> {
    cfg: &'a AgentConfig,
    agent_id: &'a str,
    gpus: &'a dyn GpuInventory,
    manager: &'a EngineManager,
}

impl Session<'_> {
    /// One connection, from connect to loss. Returns why it ended and whether it got as
    /// far as `Registered`.
    async fn run(&self, server: &str) -> (Status, bool) {
        let endpoint = match tonic::transport::Endpoint::from_shared(flotilla_api::dial::dial_address(server)) {
            // HTTP/2 pings find a server that stopped answering (paused, partitioned, its
            // host gone) within 0.75 s; without them the session stalls silently on a dead
            // TCP connection while another server leads.
            Ok(e) => e
                .connect_timeout(Duration::from_secs(3))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(flotilla_api::dial::LEADER_PING_INTERVAL)
                .keep_alive_timeout(flotilla_api::dial::LEADER_PING_TIMEOUT)
                .keep_alive_while_idle(true),
            Err(e) => return (Status::unavailable(format!("bad server address {server}: {e}")), false),
        };
        let channel = match flotilla_security::connect::connect(endpoint, self.cfg.tls.as_ref(), server).await {
            Ok(c) => c,
            Err(e) => return (Status::unavailable(format!("cannot connect: {}", crate::http::error_chain(&e))), false),
        };
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(16);
        let register = pb::Register {
            node_name: self.cfg.node_name.clone(),
            agent_id: self.agent_id.to_string(),
            address: self.cfg.address.clone(),
            labels: self.cfg.labels.clone().into_iter().collect(),
            gpus: self.gpus.probe(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            engine_ports: Some(pb::PortRange {
                low: u32::from(*self.cfg.ports.start()),
                high: u32::from(*self.cfg.ports.end()),
            }),
        };
        if tx.send(pb::AgentMessage { msg: Some(Msg::Register(register)) }).await.is_err() {
            return (Status::internal("outgoing stream closed"), false);
        }
        let mut client = AgentServiceClient::new(channel);
        let mut inbound = match client.session(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(s) => return (s, false),
        };
        let mut interval = self.cfg.heartbeat_interval;
        match tokio::time::timeout(Duration::from_secs(10), inbound.next()).await {
            Ok(Some(Ok(pb::ServerMessage { msg: Some(server_message::Msg::Registered(r)) }))) => {
                if r.heartbeat_interval_ms > 0 {
                    interval = Duration::from_millis(r.heartbeat_interval_ms);
                }
                println!(
                    "flotilla agent {} registered with {} ({} GPUs)",
                    self.cfg.node_name,
                    display_addr(server),
                    self.gpus.gpus().len()
                );
                tracing::info!(node = %self.cfg.node_name, server = %server, heartbeat_ms = interval.as_millis() as u64, "registered");
            }
            Ok(Some(Ok(other))) => {
                return (Status::internal(format!("expected Registered first, got {other:?}")), false)
            }
            Ok(Some(Err(s))) => return (s, false),
            Ok(None) => return (Status::unavailable("stream closed before Registered"), false),
            Err(_) => return (Status::unavailable("no Registered within 10s"), false),
        }
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sent = Instant::now();
        // An early heartbeat waiting out the gap.
        let mut early: Option<Instant> = None;
        loop {
            let send = tokio::select! {
                _ = tick.tick() => true,
                _ = self.manager.heartbeat_wanted(), if early.is_none() => {
                    let at = last_sent + EARLY_HEARTBEAT_GAP;
                    if Instant::now() >= at {
                        true
                    } else {
                        early = Some(at);
                        false
                    }
                }
                _ = tokio::time::sleep_until(early.unwrap_or_else(Instant::now)), if early.is_some() => true,
                msg = inbound.next() => match msg {
                    Some(Ok(pb::ServerMessage { msg: Some(server_message::Msg::Assign(a)) })) => {
                        tracing::debug!(replicas = a.replicas.len(), "assign received");
                        self.manager.apply(&a.replicas);
                        false
                    }
                    Some(Ok(_)) => false,
                    Some(Err(s)) => return (s, true),
                    None => return (Status::unavailable("server closed the stream"), true),
                }
            };
            if send {
                let hb = pb::Heartbeat { engines: self.manager.reports(), gpus: self.gpus.probe() };
                if tx.send(pb::AgentMessage { msg: Some(Msg::Heartbeat(hb)) }).await.is_err() {
                    return (Status::unavailable("outgoing stream closed"), true);
                }
                last_sent = Instant::now();
                early = None;
            }
        }
    }
}

fn display_addr(url: &str) -> &str {
    url.strip_prefix("http://").unwrap_or(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        let s = Status::failed_precondition("cluster.not_leader: leader=10.0.0.2:7070");
        assert_eq!(classify(&s), Next::Redirect("http://10.0.0.2:7070".into()));
        assert_eq!(classify(&Status::failed_precondition("cluster.not_leader: leader=")), Next::NextServer);
        assert_eq!(classify(&Status::unavailable("cluster.no_leader")), Next::NextServer);
        assert_eq!(classify(&Status::already_exists("node n1")), Next::Fatal(FatalKind::Duplicate));
        assert_eq!(classify(&Status::invalid_argument("bad name")), Next::Fatal(FatalKind::Refused));
        assert_eq!(classify(&Status::internal("boom")), Next::NextServer);
        assert_eq!(leader_hint("cluster.not_leader: leader=http://h:1 extra"), Some("http://h:1".into()));
    }
}
