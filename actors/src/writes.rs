//! Executing the commands a decision returned, with the one policy for uncertain writes
//! (STYLE.md): a write that certainly failed (a compare conflict, not found, not the leader)
//! is reported as `Ok(Outcome{refused})` and retried from fresh state at the next
//! reconcile; a write that may have committed (timeout, Raft error) returns
//! `Err(ActorsError::Uncertain)`, and the calling actor stops so the supervisor rebuilds it
//! from the state machine.
use flotilla_cluster::ClusterError;
use flotilla_storage::{Command, CommandResult};

use crate::metrics::{Controller, Proposal};
use crate::shared::Ctx;
use crate::ActorsError;

/// What a batch of writes did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub applied: usize,
    /// Certainly not applied (conflict, not found, not leader).
    pub refused: usize,
}

/// Proposes each command in order, on behalf of `by` (a metric label).
pub async fn execute(ctx: &Ctx, by: Controller, cmds: Vec<Command>) -> Result<Outcome, ActorsError> {
    let mut out = Outcome::default();
    let now_ms = flotilla_api::civil::unix_ms();
    for mut cmd in cmds {
        // Notes are stamped as they are proposed (the decisions that make them are pure).
        if let Command::Recorded { notes, .. } = &mut cmd {
            for n in notes.iter_mut().filter(|n| n.at_ms == 0) {
                n.at_ms = now_ms;
            }
        }
        let m = &ctx.metrics;
        match ctx.handle.propose(cmd).await {
            Ok(CommandResult::Conflict { key, expected, actual }) => {
                m.proposed(by, Proposal::Conflict);
                tracing::debug!(%key, expected, actual, "write refused by compare; retrying with fresh state");
                out.refused += 1;
            }
            Ok(CommandResult::NotFound { key }) => {
                m.proposed(by, Proposal::Conflict);
                tracing::debug!(%key, "write refused: object gone");
                out.refused += 1;
            }
            Ok(_) => {
                m.proposed(by, Proposal::Applied);
                out.applied += 1;
            }
            Err(e @ (ClusterError::NotLeader(_) | ClusterError::NoLeader)) => {
                m.proposed(by, Proposal::NotLeader);
                tracing::info!(error = %e, "write refused: leadership lost");
                out.refused += 1;
            }
            Err(e) => {
                let e = ActorsError::from_propose(e);
                if e.is_uncertain() {
                    m.proposed(by, Proposal::Uncertain);
                    m.reconcile_failed(by);
                    return Err(e);
                }
                m.proposed(by, Proposal::Error);
                tracing::warn!(error = %e, "write refused");
                out.refused += 1;
            }
        }
    }
    Ok(out)
}
