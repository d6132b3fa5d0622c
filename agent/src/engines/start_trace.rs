//! The spans of one engine's start, in the trace of the controller decision that assigned
//! it (the assignment's `traceparent`): `agent.replica` from the assignment until the engine
//! is first Ready (or fails, or is stopped first), with a child per phase,
//! `agent.download` and `agent.engine_start` (one per launch attempt; a crash before Ready
//! ends the attempt with its reason and the next launch opens another).
//!
//! ```text
//! controller.model (server) ─> agent.replica ─┬─ agent.download        source
//!                                             ├─ agent.engine_start    attempt 0: crashed
//!                                             └─ agent.engine_start    attempt 1: ready
//! ```
//!
//! Nothing is traced for an assignment without a traceparent (its apply was not exported),
//! for an engine adopted from a previous agent (it started long ago), or when this agent
//! exports no spans: every method is then a no-op on `None`.

use std::sync::Mutex;

use flotilla_api::pb::ReplicaAssignment;
use tracing::Span;

struct Open {
    root: Span,
    phase: Option<Span>,
}

/// An engine start being traced, or nothing.
#[derive(Default)]
pub struct StartTrace {
    open: Mutex<Option<Open>>,
}

impl StartTrace {
    /// Opens `agent.replica` for `a` on `node`, unless there is nothing to trace.
    pub fn new(a: &ReplicaAssignment, node: &str, adopted: bool) -> StartTrace {
        if a.traceparent.is_empty() || adopted {
            return StartTrace::default();
        }
        let root = tracing::debug_span!(
            "agent.replica",
            replica = %a.replica,
            model = %a.model,
            engine = %a.engine,
            node = %node,
            gpus = ?a.gpus,
            outcome = tracing::field::Empty,
            reason = tracing::field::Empty,
        );
        if root.is_disabled() {
            return StartTrace::default();
        }
        flotilla_telemetry::propagation::set_parent_traceparent(&root, &a.traceparent);
        StartTrace { open: Mutex::new(Some(Open { root, phase: None })) }
    }

    fn with(&self, f: impl FnOnce(&mut Open)) {
        if let Some(o) = self.open.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            f(o);
        }
    }

    /// Starts the download phase (ending the phase before it).
    pub fn download(&self, source: &str) {
        self.with(|o| o.phase = Some(tracing::debug_span!(parent: &o.root, "agent.download", source = %source)));
    }

    /// Starts launch attempt `attempt` (ending the phase before it).
    pub fn engine_start(&self, attempt: u32) {
        self.with(|o| {
            o.phase = Some(tracing::debug_span!(
                parent: &o.root,
                "agent.engine_start",
                attempt = attempt as i64,
                outcome = tracing::field::Empty,
                reason = tracing::field::Empty,
            ))
        });
    }

    /// Ends the current launch attempt without ending the start: it crashed, and the engine
    /// will be launched again.
    pub fn attempt_failed(&self, reason: &str) {
        self.with(|o| {
            if let Some(p) = o.phase.take() {
                p.record("outcome", "crashed");
                p.record("reason", reason);
            }
        });
    }

    /// Ends the start: `ready`, `failed` (with why) or `stopped`. Later calls do nothing.
    pub fn end(&self, outcome: &str, reason: &str) {
        let Some(o) = self.open.lock().unwrap_or_else(|p| p.into_inner()).take() else { return };
        if let Some(p) = o.phase {
            p.record("outcome", outcome);
            if !reason.is_empty() {
                p.record("reason", reason);
            }
        }
        o.root.record("outcome", outcome);
        if !reason.is_empty() {
            o.root.record("reason", reason);
        }
    }
}

impl Drop for StartTrace {
    fn drop(&mut self) {
        // the engine's task ended before Ready (stopped or unassigned meanwhile)
        self.end("stopped", "");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_traced_without_a_traceparent_or_for_an_adopted_engine() {
        let a = ReplicaAssignment { replica: "r".into(), ..Default::default() };
        assert!(StartTrace::new(&a, "n1", false).open.lock().unwrap().is_none());
        let a = ReplicaAssignment {
            replica: "r".into(),
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            ..Default::default()
        };
        assert!(StartTrace::new(&a, "n1", true).open.lock().unwrap().is_none());
        // no subscriber exports spans here: disabled spans open nothing either
        let t = StartTrace::new(&a, "n1", false);
        assert!(t.open.lock().unwrap().is_none());
        t.download("file:///m");
        t.end("ready", "");
    }
}
