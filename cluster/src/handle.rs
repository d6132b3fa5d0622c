//! The handle other layers (the controller actors, the agent and endpoint services) use to
//! read the replicated state, propose changes on the leader, and follow leadership.
use flotilla_storage::{Command, CommandResult, StoreReader};
use tokio::sync::watch;

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

    /// A receiver whose value is `true` while this server is the leader. Its state machine
    /// may still lag the commit index at that moment: a caller that needs current state
    /// first commits a write (a barrier) and reads after it.
    pub fn leadership(&self) -> watch::Receiver<bool> {
        let mut metrics = self.node.raft.metrics();
        let id = self.node.id;
        let leading_now = move |m: &openraft::RaftMetrics<u64, openraft::BasicNode>| {
            m.current_leader == Some(id) && m.state.is_leader()
        };
        // Start from the current state: a receiver must never report a leader as lost
        // merely because the watcher task has not run yet.
        let (tx, rx) = watch::channel(leading_now(&metrics.borrow_and_update()));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = metrics.changed() => if r.is_err() { let _ = tx.send(false); return },
                    _ = tx.closed() => return,
                }
                let leading = leading_now(&metrics.borrow_and_update());
                tx.send_if_modified(|v| std::mem::replace(v, leading) != leading);
            }
        });
        rx
    }
}
