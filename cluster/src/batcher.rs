//! Write batching on the leader: writes that arrive while earlier batches are in flight are
//! proposed together as one `Command::Batch` log entry (one append, one fsync, one
//! replication round), each with its own result. openraft 0.9 makes one log entry per
//! `client_write`, so without this every write pays its own fsync.
use std::sync::Arc;

use flotilla_storage::{Command, CommandResult, Raft};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// A write waiting to ride in the next batch; `None` back means "propose it alone".
pub(crate) type BatchTx = mpsc::UnboundedSender<(Command, oneshot::Sender<Option<CommandResult>>)>;

/// Most batches in flight at once: while they are, new writes queue and form the next one.
const BATCHES_IN_FLIGHT: usize = 2;
/// Most writes in one batch.
const MAX_BATCH: usize = 256;

/// Starts the batcher task for `raft` and returns its queue.
pub(crate) fn spawn_batcher(raft: Raft) -> BatchTx {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Command, oneshot::Sender<Option<CommandResult>>)>();
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else { return };
            let Some(first) = rx.recv().await else { return };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(w) => batch.push(w),
                    Err(_) => break,
                }
            }
            let raft = raft.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let (mut cmds, txs): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                let cmd = if cmds.len() == 1 { cmds.remove(0) } else { Command::Batch(cmds) };
                let results = match raft.client_write(cmd).await {
                    Ok(resp) => match resp.data {
                        CommandResult::Batch(results) if results.len() == txs.len() => {
                            results.into_iter().map(Some).collect()
                        }
                        r if txs.len() == 1 => vec![Some(r)],
                        _ => vec![None; txs.len()],
                    },
                    // Not the leader any more, or shutting down: each caller proposes alone,
                    // which forwards to the new leader or reports the error.
                    Err(_) => vec![None; txs.len()],
                };
                for (tx, r) in txs.into_iter().zip(results) {
                    let _ = tx.send(r);
                }
            });
        }
    });
    tx
}
