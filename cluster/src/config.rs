//! Configuration of one server, validated once at start-up.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::ClusterError;

/// Everything a server needs to start. Durations are in milliseconds where named `_ms`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// This server's Raft ID (non-zero, unique in the cluster).
    pub id: u64,
    /// Where the Raft log, state machine and snapshots live.
    pub data_dir: PathBuf,
    /// gRPC listen address (the API; also the Raft transport unless `peer_addr` is set).
    /// Port 0 picks a free port.
    pub grpc_addr: SocketAddr,
    /// The gRPC address other servers and clients use to reach this one; defaults to the
    /// bound `grpc_addr`. Ignored for members when `peer_addr` is set.
    pub advertise_addr: Option<String>,
    /// A listener of its own for server-to-server traffic: Raft and the writes and reads a
    /// follower forwards to the leader. With TLS it accepts only peer identities, and the
    /// API listener then serves no Raft method. Members know each other by this address.
    pub peer_addr: Option<SocketAddr>,
    /// The peer address other servers dial; defaults to the bound `peer_addr`.
    pub advertise_peer_addr: Option<String>,
    /// HTTP listen address for /metrics, /healthz, /readyz. Port 0 picks a free port.
    pub http_addr: SocketAddr,
    /// Initialise a new single-member cluster if this data dir holds none.
    pub bootstrap: bool,
    /// Join the cluster that serves at this address (any member).
    pub join: Option<String>,
    /// Recover a group that lost its majority for good: keep this data dir's state (every
    /// entry in its log applied), rewrite the membership to this server alone and lead
    /// (`flotilla_storage::seed`). Others join afterwards.
    pub force_new_cluster: bool,
    /// Leader heartbeat interval.
    pub heartbeat_ms: u64,
    /// A follower starts an election after a random timeout in [min, max].
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and compact the log) every this many applied entries.
    pub snapshot_every: u64,
    /// Log entries to keep after a snapshot (helps lagging followers avoid a snapshot).
    pub keep_logs: u64,
    /// Change events kept for resuming watches.
    pub watch_history: usize,
    /// How long a write or linearizable read may wait for the Raft group.
    pub request_timeout: Duration,
    /// TLS on the gRPC listener and on links to other servers; with it, every call is
    /// checked against the role table (`flotilla_security::authz`).
    pub tls: Option<std::sync::Arc<flotilla_security::Tls>>,
    /// Allow a non-loopback gRPC address without TLS (a network the operator trusts).
    pub insecure: bool,
    /// Largest snapshot accepted from a leader, in bytes: an InstallSnapshot chunk ending
    /// beyond it is refused (INVALID_ARGUMENT).
    pub max_snapshot_bytes: u64,
    /// A federation server (`flotilla server --federation`): it holds Clusters and
    /// FederatedModels (and tokens) and refuses the kinds a cluster runs; a cluster's server
    /// refuses those two.
    pub federation: bool,
}

impl ServerConfig {
    /// A config with the documented defaults for `id` and `data_dir`.
    pub fn new(id: u64, data_dir: impl Into<PathBuf>) -> ServerConfig {
        ServerConfig {
            id,
            data_dir: data_dir.into(),
            grpc_addr: ([127, 0, 0, 1], 7070).into(),
            advertise_addr: None,
            peer_addr: None,
            advertise_peer_addr: None,
            http_addr: ([127, 0, 0, 1], 7071).into(),
            bootstrap: false,
            join: None,
            force_new_cluster: false,
            heartbeat_ms: 50,
            election_timeout_min_ms: 200,
            election_timeout_max_ms: 400,
            snapshot_every: 10_000,
            keep_logs: 1_000,
            watch_history: flotilla_storage::DEFAULT_EVENT_RETENTION,
            request_timeout: Duration::from_secs(10),
            tls: None,
            insecure: false,
            max_snapshot_bytes: crate::snapshot_chunks::DEFAULT_MAX_SNAPSHOT_BYTES,
            federation: false,
        }
    }

    pub fn validate(&self) -> Result<(), ClusterError> {
        let bad = |m: String| Err(ClusterError::InvalidArgument(m));
        if self.id == 0 {
            return bad("--id must be a positive integer; 0 is reserved".into());
        }
        if self.bootstrap && self.join.is_some() {
            return bad("--bootstrap and --join exclude each other: bootstrap starts a new cluster, join enters an existing one".into());
        }
        if self.force_new_cluster && self.join.is_some() {
            return bad("--force-new-cluster and --join exclude each other: the forced server is the new cluster, the others join it".into());
        }
        if self.heartbeat_ms == 0 {
            return bad("--heartbeat-ms must be positive".into());
        }
        if self.election_timeout_min_ms <= self.heartbeat_ms * 2 {
            return bad(format!(
                "--election-timeout-min-ms {} must be more than twice --heartbeat-ms {}",
                self.election_timeout_min_ms, self.heartbeat_ms
            ));
        }
        if self.election_timeout_max_ms <= self.election_timeout_min_ms {
            return bad(format!(
                "--election-timeout-max-ms {} must be greater than --election-timeout-min-ms {}",
                self.election_timeout_max_ms, self.election_timeout_min_ms
            ));
        }
        if self.snapshot_every == 0 {
            return bad("--snapshot-every must be positive".into());
        }
        if self.watch_history == 0 {
            return bad("--watch-history must be positive".into());
        }
        if self.tls.is_none() && !self.insecure && !self.grpc_addr.ip().is_loopback() {
            return bad(format!(
                "--grpc-addr {} is not a loopback address and TLS is off: anyone who can reach it could \
                 write objects, join the cluster and send Raft messages. Give --tls-cert, --tls-key and \
                 --tls-ca (see `flotilla tls`), or --insecure on a network you trust",
                self.grpc_addr
            ));
        }
        if let Some(peer) = self.peer_addr.filter(|p| self.tls.is_none() && !self.insecure && !p.ip().is_loopback()) {
            return bad(format!(
                "--peer-addr {peer} is not a loopback address and TLS is off: anyone who can reach it could \
                 send Raft messages. Give --tls-cert, --tls-key and --tls-ca, or --insecure on a network you trust"
            ));
        }
        if self.peer_addr.is_some_and(|p| p == self.grpc_addr && p.port() != 0) {
            return bad(format!("--peer-addr {} is --grpc-addr too; give it a port of its own", self.grpc_addr));
        }
        if self.advertise_peer_addr.is_some() && self.peer_addr.is_none() {
            return bad("--advertise-peer-addr needs --peer-addr".into());
        }
        if self.max_snapshot_bytes == 0 {
            return bad("--max-snapshot-bytes must be positive".into());
        }
        Ok(())
    }

    pub(crate) fn raft_config(&self) -> Result<openraft::Config, ClusterError> {
        let c = openraft::Config {
            cluster_name: "flotilla".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.keep_logs,
            install_snapshot_timeout: 2_000,
            ..Default::default()
        };
        c.validate().map_err(|e| ClusterError::InvalidArgument(format!("raft config: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_nonsense() {
        let ok = ServerConfig::new(1, "/tmp/x");
        assert!(ok.validate().is_ok());
        assert!(ok.raft_config().is_ok());
        let e = ServerConfig { id: 0, ..ok.clone() }.validate().unwrap_err().to_string();
        assert!(e.contains("--id"), "{e}");
        let e =
            ServerConfig { bootstrap: true, join: Some("x".into()), ..ok.clone() }.validate().unwrap_err().to_string();
        assert!(e.contains("--join"), "{e}");
        let e = ServerConfig { force_new_cluster: true, join: Some("x".into()), ..ok.clone() }
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--force-new-cluster"), "{e}");
        let e = ServerConfig { election_timeout_min_ms: 100, ..ok.clone() }.validate().unwrap_err().to_string();
        assert!(e.contains("--election-timeout-min-ms"), "{e}");
        let e = ServerConfig { max_snapshot_bytes: 0, ..ok.clone() }.validate().unwrap_err().to_string();
        assert!(e.contains("--max-snapshot-bytes"), "{e}");
        assert!(ServerConfig { election_timeout_max_ms: 200, ..ok.clone() }.validate().is_err());
        let open = ServerConfig { grpc_addr: "0.0.0.0:7070".parse().unwrap(), ..ok.clone() };
        let e = open.validate().unwrap_err().to_string();
        assert!(e.contains("--grpc-addr 0.0.0.0:7070 is not a loopback address") && e.contains("--insecure"), "{e}");
        assert!(ServerConfig { insecure: true, ..open }.validate().is_ok());
        let peer = ServerConfig { peer_addr: Some("10.0.0.1:7072".parse().unwrap()), ..ok.clone() };
        assert!(peer.validate().unwrap_err().to_string().contains("--peer-addr 10.0.0.1:7072 is not a loopback"));
        let same = ServerConfig { peer_addr: Some(ok.grpc_addr), ..ok.clone() };
        assert!(same.validate().unwrap_err().to_string().contains("port of its own"));
        let adv = ServerConfig { advertise_peer_addr: Some("x:1".into()), ..ok.clone() };
        assert!(adv.validate().unwrap_err().to_string().contains("needs --peer-addr"));
    }
}
