//! The handle other layers (the controller actors, the agent and endpoint services) use to
//! read the replicated state, propose changes on the leader, and follow leadership.
use flotilla_storage::{Command, CommandResult, StoreReader};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::node::{Node, Route};
use crate::ClusterError;

/// Read and write access to the replicated store, for code running inside a server.
#[derive(Clone)]
pub struct ClusterHandle {
    pub(crate) node: Node,
}

impl ClusterHandle {
    /// This server's Raft ID.
    pub fn id(&self) -> u64 {
        self.node.id
    }

    /// The local replica of the state machine.
    pub fn reader(&self) -> StoreReader {
        self.node.reader.clone()
    }

    /// Proposes `cmd` on this server, which must be the leader; returns once it is committed
    /// and applied. Off the leader: [`ClusterError::NotLeader`] naming the leader (or
    /// [`ClusterError::NoLeader`]). [`ClusterError::Timeout`] means the outcome is unknown.
    pub async fn propose(&self, cmd: Command) -> Result<CommandResult, ClusterError> {
        match self.node.propose(cmd, self.node.deadline()).await? {
            Route::Done(result) => Ok(result),
            Route::Leader(_) => Err(ClusterError::NotLeader(self.leader().unwrap_or(0))),
        }
    }

    /// Registers metrics of code running inside this server (the controllers) on the
    /// server's `/metrics`; their names get the `flotilla_` prefix.
    pub fn register_metrics(&self, add: impl FnOnce(&mut prometheus_client::registry::Registry)) {
        self.node.metrics.register(add);
    }

    /// The trace contexts applies leave for the controllers that act on them.
    pub fn trace_links(&self) -> &crate::trace_links::TraceLinks {
        &self.node.trace_links
    }

    /// The current leader's ID, if one is known.
    pub fn leader(&self) -> Option<u64> {
        self.node.raft.metrics().borrow().current_leader
    }

    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.node.id)
    }

    /// The gRPC address of the current leader, if known.
    pub fn leader_addr(&self) -> Option<String> {
        let m = self.node.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let addr = m.membership_config.nodes().find(|(i, _)| **i == id).map(|(_, n)| n.addr.clone());
        addr
    }

    /// A receiver whose value is `true` while this server is the leader *and* has heard
    /// from a quorum within the last [`leader_lease`] (three maximum election timeouts). A
    /// leader cut off from its followers keeps believing it leads until it sees a higher
    /// term (Raft has no step-down of its own), and clients that stay with it — agents'
    /// heartbeat sessions, gateways' endpoint watches — would keep following a leader that
    /// can commit nothing while the majority elects another. With the lease, it gives them
    /// up (its controllers stop, its streams end with `cluster.no_leader`) and they go to the
    /// servers that can reach a quorum. Its state machine may still lag the commit index at
    /// that moment: a caller that needs current state first commits a write (a barrier)
    /// and reads after it.
    ///
    /// One watcher per server computes it (on every Raft metrics change and every 100 ms,
    /// for the lease to expire); every caller gets a clone of its receiver.
    pub fn leadership(&self) -> watch::Receiver<bool> {
        self.node.leadership.get_or_init(|| watch_leadership(&self.node.raft, self.node.id)).clone()
    }
}

/// Spawns the task behind [`ClusterHandle::leadership`]; it ends when the Raft member shuts
/// down (reporting `false`).
fn watch_leadership(raft: &flotilla_storage::Raft, id: u64) -> watch::Receiver<bool> {
    let mut metrics = raft.metrics();
    let lease = leader_lease(raft);
    // Start from the current state: a receiver must never report a leader as lost merely
    // because the watcher task has not run yet.
    let (tx, rx) = watch::channel(leading(&metrics.borrow_and_update(), id, lease, Duration::ZERO));
    tokio::spawn(async move {
        let mut received = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                r = metrics.changed() => {
                    if r.is_err() { let _ = tx.send(false); return }
                    received = Instant::now();
                }
                _ = tick.tick() => {}
            }
            let now = leading(&metrics.borrow_and_update(), id, lease, received.elapsed());
            tx.send_if_modified(|v| std::mem::replace(v, now) != now);
        }
    });
    rx
}

/// How long a leader may go without a quorum's acknowledgement before [`ClusterHandle::
/// leadership`] stops reporting it as leading: three maximum election timeouts (1.2 s with
/// the defaults), well past the point where the followers have elected another leader, and
/// far above the heartbeat interval so a busy leader does not flap.
pub fn leader_lease(raft: &flotilla_storage::Raft) -> Duration {
    Duration::from_millis(raft.config().election_timeout_max.saturating_mul(3))
}

/// Pure: whether `m` (received `age` ago) shows server `id` leading with a fresh quorum.
/// A single-voter cluster is its own quorum.
pub fn leading(m: &openraft::RaftMetrics<u64, openraft::BasicNode>, id: u64, lease: Duration, age: Duration) -> bool {
    if m.current_leader != Some(id) || !m.state.is_leader() {
        return false;
    }
    if m.membership_config.membership().voter_ids().count() <= 1 {
        return true;
    }
    m.millis_since_quorum_ack.is_some_and(|ms| Duration::from_millis(ms) + age <= lease)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{BasicNode, Membership, RaftMetrics, ServerState, StoredMembership};

    fn metrics(leader: u64, voters: &[u64], since_ack: Option<u64>) -> RaftMetrics<u64, BasicNode> {
        let mut m = RaftMetrics::new_initial(1);
        m.current_leader = Some(leader);
        m.state = if leader == 1 { ServerState::Leader } else { ServerState::Follower };
        let nodes =
            voters.iter().map(|v| (*v, BasicNode::new(format!("n{v}")))).collect::<std::collections::BTreeMap<_, _>>();
        let membership = Membership::new(vec![voters.iter().copied().collect()], nodes);
        m.membership_config = std::sync::Arc::new(StoredMembership::new(None, membership));
        m.millis_since_quorum_ack = since_ack;
        m
    }

    #[test]
    fn a_leader_without_a_recent_quorum_is_not_leading() {
        let lease = Duration::from_millis(1200);
        assert!(leading(&metrics(1, &[1, 2, 3], Some(60)), 1, lease, Duration::ZERO));
        assert!(
            !leading(&metrics(1, &[1, 2, 3], Some(60)), 1, lease, Duration::from_millis(1500)),
            "metrics went quiet"
        );
        assert!(!leading(&metrics(1, &[1, 2, 3], Some(5000)), 1, lease, Duration::ZERO), "cut off");
        assert!(!leading(&metrics(1, &[1, 2, 3], None), 1, lease, Duration::ZERO), "no ack yet");
        assert!(
            leading(&metrics(1, &[1], None), 1, lease, Duration::from_secs(60)),
            "a single voter is its own quorum"
        );
        assert!(!leading(&metrics(2, &[1, 2, 3], Some(1)), 1, lease, Duration::ZERO), "another leads");
    }
}
