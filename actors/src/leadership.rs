//! Follows this server's leadership: on becoming leader (once its state machine has
//! applied everything of earlier terms) it starts the Supervisor; on losing leadership, or
//! if the supervisor dies, it stops the controllers and forgets the in-memory liveness.
use std::sync::Arc;
use std::time::Duration;

use flotilla_storage::Command;
use ractor::Actor;
use tokio::time::Instant;

use crate::shared::{lock, Ctx};
use crate::supervisor::Supervisor;

/// Runs until the server's Raft member shuts down.
pub async fn run(ctx: Arc<Ctx>) {
    let mut leading = ctx.handle.leadership();
    loop {
        if leading.wait_for(|l| *l).await.is_err() {
            return;
        }
        // A barrier: once an entry of this term is applied, the local state machine holds
        // every committed change, so the controllers are rebuilt from current state.
        if let Err(e) = ctx.handle.propose(Command::Txn { compares: vec![], ops: vec![] }).await {
            tracing::warn!(error = %e, "leader barrier write failed; retrying");
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        if !*leading.borrow() {
            continue;
        }
        lock(&ctx.live).clear();
        *lock(&ctx.leading) = Some(Instant::now());
        let (sup, mut join) = match Actor::spawn(None, Supervisor, ctx.clone()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the supervisor; retrying");
                *lock(&ctx.leading) = None;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        *lock(&ctx.supervisor) = Some(sup.clone());
        ctx.metrics.leading.set(1);
        tracing::info!(server = ctx.handle.id(), "leading: controllers running");
        let closed = tokio::select! {
            r = leading.wait_for(|l| !*l) => r.is_err(),
            _ = &mut join => {
                tracing::error!("supervisor stopped on its own; restarting the controllers");
                false
            }
        };
        *lock(&ctx.supervisor) = None;
        *lock(&ctx.leading) = None;
        ctx.hub.clear();
        let _ = sup.stop_and_wait(None, Some(Duration::from_secs(10))).await;
        lock(&ctx.live).clear();
        ctx.metrics.leading.set(0);
        ctx.metrics.set_pending([]);
        tracing::info!(server = ctx.handle.id(), "not leading: controllers stopped");
        if closed {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
