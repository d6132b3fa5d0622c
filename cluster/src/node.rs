//! The server's handle on its Raft member: proposing writes, linearizing reads, and finding
//! the leader to forward to. Shared by the object and cluster services.
use std::time::Duration;

use flotilla_storage::{Command, CommandResult, Raft, StoreReader};
use openraft::error::{CheckIsLeaderError, ClientWriteError, ForwardToLeader, RaftError};
use openraft::{BasicNode, RaftMetrics};
use tokio::time::Instant;

use crate::batcher::BatchTx;
use crate::metrics::Metrics;
use crate::peers::Peers;
use crate::ClusterError;

/// Where a request must go: it was served here, or it belongs to the leader at `addr`.
pub(crate) enum Route<T> {
    Done(T),
    Leader(String),
}

#[derive(Clone)]
pub(crate) struct Node {
    pub(crate) id: u64,
    pub(crate) raft: Raft,
    pub(crate) reader: StoreReader,
    pub(crate) peers: Peers,
    pub(crate) metrics: Metrics,
    pub(crate) request_timeout: Duration,
    pub(crate) batcher: BatchTx,
    /// The term in which this process committed its read barrier ([`Node::linearize`]).
    pub(crate) read_barrier_term: std::sync::Arc<std::sync::Mutex<Option<u64>>>,
    /// The shared leadership watch ([`crate::ClusterHandle::leadership`]), started on first use.
    pub(crate) leadership: std::sync::Arc<std::sync::OnceLock<tokio::sync::watch::Receiver<bool>>>,
    /// Applies' trace contexts for the controllers that act on them ([`crate::trace_links`]).
    pub(crate) trace_links: std::sync::Arc<crate::trace_links::TraceLinks>,
    /// A federation server ([`crate::ServerConfig::federation`]).
    pub(crate) federation: bool,
}

/// The code of a forward abandoned by [`Node::forward`].
pub(crate) const LEADER_CHANGED: &str = "cluster.leader_changed";

/// Retry pause while a leader is being elected.
const LEADER_POLL: Duration = Duration::from_millis(25);

impl Node {
    pub(crate) fn deadline(&self) -> Instant {
        Instant::now() + self.request_timeout
    }

    /// Proposes `cmd`. Returns its result once committed and applied here (the leader), or
    /// the leader's address. Waits out elections until `deadline`.
    pub(crate) async fn propose(&self, cmd: Command, deadline: Instant) -> Result<Route<CommandResult>, ClusterError> {
        let start = Instant::now();
        // Fast path on the leader: ride in a batch. Anything but a result (not the leader,
        // an election) falls back to proposing alone, which forwards or waits as before.
        if self.raft.metrics().borrow().current_leader == Some(self.id) {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if self.batcher.send((cmd.clone(), tx)).is_ok() {
                match tokio::time::timeout_at(deadline, rx).await {
                    Err(_) => return Err(ClusterError::Timeout(self.request_timeout)),
                    Ok(Ok(Some(result))) => {
                        self.metrics.observe_apply(start);
                        return Ok(Route::Done(result));
                    }
                    Ok(_) => {}
                }
            }
        }
        loop {
            let write = tokio::time::timeout_at(deadline, self.raft.client_write(cmd.clone()));
            match write.await {
                Err(_) => return Err(ClusterError::Timeout(self.request_timeout)),
                Ok(Ok(resp)) => {
                    self.metrics.observe_apply(start);
                    return Ok(Route::Done(resp.data));
                }
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                    if let Some(addr) = self.leader_or_wait(f, deadline).await? {
                        return Ok(Route::Leader(addr));
                    }
                }
                Ok(Err(e)) => return Err(ClusterError::Raft(e.to_string())),
            }
        }
    }

    /// Makes a read linearizable: on the leader, confirms leadership with a quorum and waits
    /// until the state machine has applied the read index. Elsewhere, names the leader.
    pub(crate) async fn linearize(&self, deadline: Instant) -> Result<Route<()>, ClusterError> {
        loop {
            match tokio::time::timeout_at(deadline, self.raft.ensure_linearizable()).await {
                Err(_) => return Err(ClusterError::Timeout(self.request_timeout)),
                Ok(Ok(_)) if self.has_read_barrier() => return Ok(Route::Done(())),
                Ok(Ok(_)) => self.commit_read_barrier(deadline).await?,
                Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                    if let Some(addr) = self.leader_or_wait(f, deadline).await? {
                        return Ok(Route::Leader(addr));
                    }
                }
                Ok(Err(e)) => return Err(ClusterError::Raft(e.to_string())),
            }
        }
    }

    /// Whether this process has committed an entry in the current term as leader.
    fn has_read_barrier(&self) -> bool {
        let term = self.raft.metrics().borrow().current_term;
        *self.read_barrier_term.lock().unwrap_or_else(|p| p.into_inner()) == Some(term)
    }

    /// Commits an empty transaction before the first linearizable read of a leadership
    /// (Raft §8: a leader serves reads only once it has committed an entry of its term).
    /// openraft's read index is `max(first log of this leader, committed)`, and a leader
    /// restarted within its term (openraft restores it as leader at once, without a new
    /// entry) may have recovered a `committed` older than what it had acknowledged before
    /// the crash (the committed index rides on the next log flush): the chaos harness saw a
    /// read return revision 264 after a write of revision 265 was acknowledged, in a rolling
    /// restart. Once this barrier is applied, every entry before it is too.
    async fn commit_read_barrier(&self, deadline: Instant) -> Result<(), ClusterError> {
        let term = self.raft.metrics().borrow().current_term;
        let barrier = Command::Txn { compares: vec![], ops: vec![] };
        match tokio::time::timeout_at(deadline, self.raft.client_write(barrier)).await {
            Err(_) => Err(ClusterError::Timeout(self.request_timeout)),
            Ok(Ok(resp)) => {
                if resp.log_id.leader_id.term == term {
                    *self.read_barrier_term.lock().unwrap_or_else(|p| p.into_inner()) = Some(term);
                }
                Ok(())
            }
            // Leadership moved: the next ensure_linearizable names the new leader.
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => Ok(()),
            Ok(Err(e)) => Err(ClusterError::Raft(e.to_string())),
        }
    }

    /// The leader's address if known and not this server; `None` means "try again here"
    /// (an election is under way, or this server just became leader).
    async fn leader_or_wait(
        &self,
        f: ForwardToLeader<u64, BasicNode>,
        deadline: Instant,
    ) -> Result<Option<String>, ClusterError> {
        match (f.leader_id, f.leader_node) {
            (Some(id), Some(node)) if id != self.id => Ok(Some(node.addr)),
            _ => {
                if Instant::now() + LEADER_POLL >= deadline {
                    return Err(ClusterError::NoLeader);
                }
                tokio::time::sleep(LEADER_POLL).await;
                Ok(None)
            }
        }
    }

    /// This server's view of who leads: (term, leader). It changes when this server stops
    /// hearing from the leader (its election timer fires and it stands, or it votes for a
    /// candidate) and when a new leader is known.
    pub(crate) fn leader_view(&self) -> (u64, Option<u64>) {
        let m = self.raft.metrics();
        let m = m.borrow();
        (m.current_term, m.current_leader)
    }

    /// Runs `call`, a request forwarded to the leader at `leader_addr`, and abandons it the
    /// moment this server's view of the leader moves away from that leader — its own election
    /// timer fired, it voted for a candidate, or it follows another leader — answering
    /// UNAVAILABLE `cluster.leader_changed` (the forwarding loops retry it at once against the
    /// leader then known, or serve it here). A leader that was cut off stops answering without
    /// closing anything: without this the forward would sit until the connection's keep-alive
    /// gave up, while the majority elected a successor within an election timeout.
    ///
    /// Only a view that names no leader or another one counts: openraft publishes its metrics
    /// after the fact, so the view read when the forward starts may lag the state that named
    /// the leader, and its catching up (to the very leader forwarded to) is no change. An
    /// abandoned forward to a live leader would turn a committed compare-and-set into a
    /// conflict on retry (a test caught exactly that at start-up before this rule).
    ///
    /// A write the old leader did commit before it went silent is found applied on retry: a
    /// write is forwarded with its request id, the same on every retry, and the state machine
    /// answers a repeat of an id with the first attempt's result instead of applying it again
    /// (`flotilla_storage::Command::Once`). Without that, a committed compare-and-set came
    /// back as a definite conflict (the chaos harness caught it in a majority partition).
    pub(crate) async fn forward<T>(
        &self,
        leader_addr: &str,
        call: impl std::future::Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        let seen = self.leader_view();
        let target = self.member_at(leader_addr);
        tokio::select! {
            r = call => r,
            () = self.view_leaves(seen, target) => {
                self.metrics.forward_abandoned();
                Err(tonic::Status::unavailable(format!(
                    "{LEADER_CHANGED}: abandoned a forward to {leader_addr} (leader {target:?}): this server's view of the leader moved on from term {}",
                    seen.0
                )))
            }
        }
    }

    /// The member whose advertised address is `addr`.
    fn member_at(&self, addr: &str) -> Option<u64> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let id = m.membership_config.nodes().find(|(_, n)| n.addr == addr).map(|(id, _)| *id);
        id
    }

    /// Resolves once [`Node::leader_view`] differs from `seen` and names a leader other than
    /// `target` (or none), or Raft has shut down.
    async fn view_leaves(&self, seen: (u64, Option<u64>), target: Option<u64>) {
        let mut metrics = self.raft.metrics();
        loop {
            {
                let m = metrics.borrow_and_update();
                let now = (m.current_term, m.current_leader);
                if left_leader(seen, now, target) {
                    return;
                }
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
    }

    /// Pauses before retrying a forward that failed because the leader went away; false
    /// when the deadline leaves no time for another try.
    pub(crate) async fn backoff(&self, deadline: Instant) -> bool {
        if Instant::now() + LEADER_POLL * 2 >= deadline {
            return false;
        }
        tokio::time::sleep(LEADER_POLL * 2).await;
        true
    }

    pub(crate) fn raft_metrics(&self) -> RaftMetrics<u64, BasicNode> {
        self.raft.metrics().borrow().clone()
    }
}

/// Whether a view of the leader `now` has left the leader `target` a forward went to: it
/// differs from the view `seen` when the forward started, and names no leader or another.
pub(crate) fn left_leader(seen: (u64, Option<u64>), now: (u64, Option<u64>), target: Option<u64>) -> bool {
    now != seen && (now.1.is_none() || now.1 != target)
}

/// The commit index as the leader sees it: the highest index matched by a majority of
/// voters. `None` on a non-leader.
pub(crate) fn commit_index(m: &RaftMetrics<u64, BasicNode>) -> Option<u64> {
    let replication = m.replication.as_ref()?;
    let mut matched: Vec<u64> = m
        .membership_config
        .voter_ids()
        .map(|id| replication.get(&id).copied().flatten().map_or(0, |l| l.index))
        .collect();
    if matched.is_empty() {
        return None;
    }
    matched.sort_unstable_by(|a, b| b.cmp(a));
    Some(matched[matched.len() / 2])
}

#[cfg(test)]
mod tests {
    use super::left_leader;

    #[test]
    fn a_forward_is_abandoned_only_when_the_view_leaves_its_leader() {
        // (seen at the start, now, the leader forwarded to, abandon?)
        let table = [
            ((5, Some(1)), (5, Some(1)), Some(1), false), // nothing moved
            ((4, None), (5, Some(1)), Some(1), false),    // lagging metrics catch up to the target
            ((5, Some(1)), (6, Some(1)), Some(1), false), // the same leader, re-elected
            ((5, Some(1)), (6, None), Some(1), true),     // this server stands or voted: leader gone
            ((5, Some(1)), (6, Some(2)), Some(1), true),  // another leader
            ((5, None), (5, None), Some(1), false),       // no change at all
            ((5, Some(1)), (6, Some(2)), None, true),     // a target that is not a member
        ];
        for (i, (seen, now, target, want)) in table.into_iter().enumerate() {
            assert_eq!(left_leader(seen, now, target), want, "row {i}");
        }
    }
}
