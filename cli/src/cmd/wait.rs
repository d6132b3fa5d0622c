//! `apply --wait`: follows the applied Models and Adapters until each is Ready (exit 0) or
//! has failed (exit 1, with the reason the status carries), or the timeout passes (exit 1,
//! naming what is still pending and why).
//!
//! ```text
//!  poll (Get model, List its replicas; Get adapter) every 500 ms, through any server
//!        │
//!  judge_model / judge_adapter (pure) ──► Verdict + one line per replica
//!        │
//!  Progress: a terminal redraws the lines in place; anything else gets a plain line
//!            for each line that changed (no escape codes)
//! ```
//!
//! Polling rather than a watch: each round is a linearizable read through whichever server
//! answers, so a leader change costs at most a round, and a read that fails is retried until
//! the deadline. A model is Ready when as many replicas of its current template as it wants
//! are Ready; a replica of that template that fails while it waits fails the wait (the agent
//! gives up on a crash-looping engine after `--max-crashes`, and on a failed download at
//! once). Replicas already Failed at the first read are history: the wait follows the
//! model's next attempt (a replacement after the controllers' backoff).
use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use flotilla_actors::objects::ModelStatus;
use flotilla_api::pb::{self, ListRequest};
use flotilla_api::spec::{
    AdapterPhase, AdapterSpec, AdapterStatus, ModelSpec, ReplicaPhase, ReplicaSpec, ReplicaStatus,
};
use flotilla_api::{Kind, ObjectName};
use tokio::time::Instant;

use crate::client::Client;
use crate::error::CliError;
use crate::output::download_text;

/// How often the objects are read again.
const POLL: Duration = Duration::from_millis(500);

/// Where an object stands.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    /// Done; the summary says what is ready.
    Ready(String),
    /// Will not become Ready without a change: the reason.
    Failed(String),
    /// Still on its way: what it waits for.
    Waiting(String),
}

/// One object's state for the progress display: a verdict and a line per replica.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Judged {
    pub(crate) verdict: Verdict,
    pub(crate) replicas: Vec<String>,
}

fn status<T: serde::de::DeserializeOwned + Default>(o: &pb::Object) -> T {
    serde_json::from_str(&o.status_json).unwrap_or_default()
}

/// What one replica is doing, in a few words.
pub(crate) fn replica_line(name: &str, spec: Option<&ReplicaSpec>, st: &ReplicaStatus) -> String {
    let node = spec.and_then(|s| s.node.as_ref()).map(|n| format!(" on {n}")).unwrap_or_default();
    let detail = match st.phase {
        ReplicaPhase::Pending if st.reason.is_empty() => "waiting for a node".to_owned(),
        ReplicaPhase::Pending => st.reason.clone(),
        ReplicaPhase::Scheduled => format!("placed{node}, waiting for its agent"),
        ReplicaPhase::Starting => match st.download_progress {
            Some(f) => format!(
                "downloading {}",
                download_text(f, st.download_bytes, st.download_total_bytes, st.download_bytes_per_second)
            ),
            None if st.reason.is_empty() => format!("engine starting{node}"),
            None => st.reason.clone(),
        },
        ReplicaPhase::Ready => format!("ready{node} at {}", st.endpoint.as_deref().unwrap_or("-")),
        ReplicaPhase::Draining => "draining".to_owned(),
        ReplicaPhase::Stopped => "stopped".to_owned(),
        ReplicaPhase::Failed if st.reason.is_empty() => "failed".to_owned(),
        ReplicaPhase::Failed => st.reason.clone(),
    };
    let restarts = if st.restarts > 0 { format!(" ({} restarts)", st.restarts) } else { String::new() };
    format!("  replica/{name} {:?}: {detail}{restarts}", st.phase)
}

/// The replicas in phase Failed: taken at the first read, they are history (kept a while
/// after failing) rather than this wait's failure, which the model's next attempt decides.
pub(crate) fn failed_names(replicas: &[pb::Object]) -> BTreeSet<String> {
    replicas
        .iter()
        .filter(|o| status::<ReplicaStatus>(o).phase == ReplicaPhase::Failed)
        .map(|o| o.name.clone())
        .collect()
}

/// A model against its replicas (those labelled with it, any template); replicas named in
/// `earlier` failed before the wait began and do not fail it.
pub(crate) fn judge_model(model: &pb::Object, replicas: &[pb::Object], earlier: &BTreeSet<String>) -> Judged {
    let name = &model.name;
    let Ok(spec) = serde_json::from_str::<ModelSpec>(&model.spec_json) else {
        let why = format!("model/{name} has a spec this CLI cannot read");
        return Judged { verdict: Verdict::Failed(why), replicas: vec![] };
    };
    let st: ModelStatus = status(model);
    let desired = match (&spec.autoscaling, &st.autoscaling) {
        (Some(_), Some(a)) => a.desired_replicas,
        _ => spec.replicas,
    };
    let hash = spec.template().hash();
    let mut current: Vec<(&pb::Object, Option<ReplicaSpec>, ReplicaStatus)> = replicas
        .iter()
        .map(|o| (o, serde_json::from_str::<ReplicaSpec>(&o.spec_json).ok(), status::<ReplicaStatus>(o)))
        .filter(|(_, s, st)| {
            s.as_ref().is_some_and(|s| s.template_hash() == hash)
                && !matches!(st.phase, ReplicaPhase::Draining | ReplicaPhase::Stopped)
        })
        .collect();
    // what still waits first: on a short terminal it is what stays in view
    current.sort_by(|a, b| {
        ((a.2.phase == ReplicaPhase::Ready), &a.0.name).cmp(&((b.2.phase == ReplicaPhase::Ready), &b.0.name))
    });
    let lines = current.iter().map(|(o, s, st)| replica_line(&o.name, s.as_ref(), st)).collect();
    let ready = current.iter().filter(|(_, _, st)| st.phase == ReplicaPhase::Ready).count() as u32;
    let verdict = if ready >= desired {
        Verdict::Ready(format!("model/{name}: {ready}/{desired} replicas ready"))
    } else if let Some((o, _, st)) =
        current.iter().find(|(o, _, st)| st.phase == ReplicaPhase::Failed && !earlier.contains(&o.name))
    {
        let why = if st.reason.is_empty() { "no reason given" } else { &st.reason };
        Verdict::Failed(format!("model/{name}: replica {} failed: {why}", o.name))
    } else {
        let waiting: Vec<&(&pb::Object, Option<ReplicaSpec>, ReplicaStatus)> =
            current.iter().filter(|(_, _, st)| st.phase != ReplicaPhase::Ready).collect();
        let why = match waiting.iter().find(|(_, _, st)| st.phase == ReplicaPhase::Pending && !st.reason.is_empty()) {
            Some((o, _, st)) => format!("replica {} Pending: {}", o.name, st.reason),
            None if waiting.iter().all(|(_, _, st)| st.phase == ReplicaPhase::Failed) && !waiting.is_empty() => {
                let (o, _, st) = waiting[0];
                format!(
                    "replica {} failed before this wait began ({}); a replacement follows the controllers' backoff",
                    o.name, st.reason
                )
            }
            None if waiting.is_empty() => {
                format!("the controllers have not yet made its replicas (model revision {})", model.revision)
            }
            None => {
                let phases: Vec<String> =
                    waiting.iter().map(|(o, _, st)| format!("{} {:?}", o.name, st.phase)).collect();
                phases.join(", ")
            }
        };
        Verdict::Waiting(format!("model/{name}: {ready}/{desired} replicas ready; {why}"))
    };
    Judged { verdict, replicas: lines }
}

/// An adapter by its phase. One loaded on demand (no pinned replicas) is done once
/// applied: it loads on its first request.
pub(crate) fn judge_adapter(adapter: &pb::Object) -> Judged {
    let name = &adapter.name;
    let st: AdapterStatus = status(adapter);
    // a spec this CLI cannot read counts as pinned: wait for the controllers' phase
    let pinned = serde_json::from_str::<AdapterSpec>(&adapter.spec_json).map_or(1, |s| s.replicas.pinned());
    let reason = if st.reason.is_empty() { String::new() } else { format!(": {}", st.reason) };
    let verdict = match st.phase {
        AdapterPhase::Ready => {
            Verdict::Ready(format!("adapter/{name}: loaded on {}/{} replicas", st.loaded_replicas, st.desired_replicas))
        }
        _ if pinned == 0 => Verdict::Ready(format!("adapter/{name}: on demand, loads with its first request")),
        AdapterPhase::Failed => Verdict::Failed(format!("adapter/{name} failed{reason}")),
        phase => Verdict::Waiting(format!(
            "adapter/{name} {phase:?}: loaded on {}/{pinned} replicas{reason}",
            st.loaded_replicas
        )),
    };
    Judged { verdict, replicas: vec![] }
}

/// Prints the progress: redrawn in place on a terminal, one plain line per change elsewhere.
struct Progress {
    out: Box<dyn Write + Send>,
    to_stderr: bool,
    terminal: bool,
    /// Lines drawn last (terminal) or last printed per key (plain).
    drawn: usize,
    printed: std::collections::BTreeMap<String, String>,
    frame: usize,
}

impl Progress {
    /// Progress on stdout, or on stderr when stdout carries JSON or YAML.
    fn new(to_stderr: bool) -> Progress {
        let (out, terminal): (Box<dyn Write + Send>, bool) = if to_stderr {
            (Box::new(std::io::stderr()), std::io::stderr().is_terminal())
        } else {
            (Box::new(std::io::stdout()), std::io::stdout().is_terminal())
        };
        Progress { out, to_stderr, terminal, drawn: 0, printed: Default::default(), frame: 0 }
    }

    /// Shows each object's summary line and its replicas' lines.
    fn show(&mut self, objects: &[(String, Judged)]) {
        if self.terminal {
            self.redraw(objects);
        } else {
            for (key, j) in objects {
                let summary = summary(&j.verdict, None);
                let mut lines = vec![(key.clone(), summary)];
                for l in &j.replicas {
                    let replica = l.split_whitespace().next().unwrap_or(l).to_owned();
                    lines.push((format!("{key} {replica}"), l.clone()));
                }
                for (k, line) in lines {
                    if self.printed.get(&k) != Some(&line) {
                        let _ = writeln!(self.out, "{line}");
                        self.printed.insert(k, line);
                    }
                }
            }
        }
        let _ = self.out.flush();
    }

    fn redraw(&mut self, objects: &[(String, Judged)]) {
        const SPIN: [char; 4] = ['|', '/', '-', '\\'];
        self.frame += 1;
        let (width, height) = terminal_size(self.to_stderr);
        let width = width.saturating_sub(1).max(20);
        let spin = SPIN[self.frame % SPIN.len()];
        let mut lines = Vec::new();
        for (_, j) in objects {
            lines.push(summary(&j.verdict, Some(spin)));
            lines.extend(j.replicas.iter().cloned());
        }
        // the cursor cannot go back above the screen's top: what does not fit is counted
        let room = height.saturating_sub(1).max(2);
        if lines.len() > room {
            let more = lines.len() - (room - 1);
            lines.truncate(room - 1);
            lines.push(format!("  ... and {more} more lines"));
        }
        let mut text = String::new();
        if self.drawn > 0 {
            // back to the first line drawn, then draw over it
            text.push_str(&format!("\x1b[{}F", self.drawn));
        }
        for l in &lines {
            let cut: String = l.chars().take(width).collect();
            text.push_str(&format!("\x1b[2K{cut}\n"));
        }
        text.push_str("\x1b[J");
        let _ = write!(self.out, "{text}");
        self.drawn = lines.len();
    }
}

/// An object's summary line (with a spinner on a terminal while it waits).
fn summary(v: &Verdict, spin: Option<char>) -> String {
    match (v, spin) {
        (Verdict::Ready(s), _) => format!("{s} (done)"),
        (Verdict::Failed(s), _) => format!("{s} (failed)"),
        (Verdict::Waiting(s), Some(c)) => format!("{c} {s}"),
        (Verdict::Waiting(s), None) => s.clone(),
    }
}

/// A timeout as given: `90s`, `10m`, `1h`.
fn show(d: Duration) -> String {
    match d.as_secs() {
        s if s > 0 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s > 0 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Columns and rows of the terminal on stdout or stderr (80 x 24 where unknown).
fn terminal_size(stderr: bool) -> (usize, usize) {
    let size = if stderr {
        rustix::termios::tcgetwinsize(std::io::stderr()).ok()
    } else {
        rustix::termios::tcgetwinsize(std::io::stdout()).ok()
    };
    let cols = size.map(|w| usize::from(w.ws_col)).filter(|c| *c > 0).unwrap_or(80);
    let rows = size.map(|w| usize::from(w.ws_row)).filter(|r| *r > 0).unwrap_or(24);
    (cols, rows)
}

/// Reads a model and its replicas; `earlier` is set from the first read ([`failed_names`]).
async fn read_model(
    client: &Client,
    name: &ObjectName,
    earlier: &mut Option<BTreeSet<String>>,
) -> Result<Judged, CliError> {
    let model = super::scale::get_model(client, name).await?;
    let req = ListRequest {
        kind: Kind::Replica.to_string(),
        label_selector: format!("{}={name}", flotilla_api::selector::MODEL_LABEL),
        stale: false,
    };
    let replicas = client
        .objects(|mut c| {
            let req = req.clone();
            async move { c.list(req).await }
        })
        .await?
        .into_inner()
        .objects;
    let earlier = earlier.get_or_insert_with(|| failed_names(&replicas));
    Ok(judge_model(&model, &replicas, earlier))
}

async fn read_adapter(client: &Client, name: &ObjectName) -> Result<Judged, CliError> {
    let object = super::scale::get_object(client, "Adapter", name).await?;
    Ok(judge_adapter(&object))
}

/// Follows `targets` (Models and Adapters) until all are Ready, one has failed, or
/// `timeout` passes. `to_stderr`: progress goes to stderr (stdout carries JSON or YAML).
pub(crate) async fn follow(
    client: &Client,
    targets: &[(Kind, ObjectName)],
    timeout: Duration,
    to_stderr: bool,
) -> Result<(), CliError> {
    let deadline = Instant::now() + timeout;
    let mut progress = Progress::new(to_stderr);
    let mut last: Vec<(String, Judged)> = targets
        .iter()
        .map(|(k, n)| {
            let key = format!("{}/{n}", k.as_str().to_lowercase());
            (key.clone(), Judged { verdict: Verdict::Waiting(format!("{key}: not read yet")), replicas: vec![] })
        })
        .collect();
    let mut earlier: Vec<Option<BTreeSet<String>>> = vec![None; targets.len()];
    loop {
        for (((kind, name), (key, judged)), earlier) in targets.iter().zip(last.iter_mut()).zip(earlier.iter_mut()) {
            if matches!(judged.verdict, Verdict::Ready(_)) {
                continue; // done stays done: a later scale-down is not this apply's business
            }
            let read = match kind {
                Kind::Adapter => read_adapter(client, name).await,
                _ => read_model(client, name, earlier).await,
            };
            match read {
                Ok(j) => *judged = j,
                Err(e) if e.message.contains("not_found") || e.message.ends_with("not found") => {
                    return Err(CliError::runtime(format!("{key} was deleted while waiting for it")))
                }
                // a server or leader change: keep what was seen, say why, read again next round
                Err(e) => {
                    judged.verdict = Verdict::Waiting(format!("{key}: cannot read it now: {}", e.message));
                }
            }
        }
        progress.show(&last);
        if let Some(why) = last.iter().find_map(|(_, j)| match &j.verdict {
            Verdict::Failed(why) => Some(why.clone()),
            _ => None,
        }) {
            return Err(CliError::runtime(why));
        }
        let pending: Vec<&str> = last
            .iter()
            .filter_map(|(_, j)| match &j.verdict {
                Verdict::Waiting(why) => Some(why.as_str()),
                _ => None,
            })
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(CliError::runtime(format!("timed out after {}: {}", show(timeout), pending.join("; "))));
        }
        tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(kind: &str, name: &str, spec: serde_json::Value, status: serde_json::Value) -> pb::Object {
        pb::Object {
            kind: kind.into(),
            name: name.into(),
            spec_json: spec.to_string(),
            status_json: status.to_string(),
            revision: 7,
            ..Default::default()
        }
    }

    fn none_before() -> BTreeSet<String> {
        BTreeSet::new()
    }

    fn model(replicas: u32) -> pb::Object {
        let spec = serde_json::json!({"engine": "sim", "source": "file:///m", "replicas": replicas, "gpus": 1});
        object("Model", "chat", spec, serde_json::json!({}))
    }

    fn replica(name: &str, m: &pb::Object, status: serde_json::Value) -> pb::Object {
        let spec: ModelSpec = serde_json::from_str(&m.spec_json).unwrap();
        let t = spec.template();
        let spec = serde_json::json!({
            "model": "chat", "engine": "sim", "source": t.source, "gpus_needed": t.gpus,
            "template_hash": t.hash(), "node": "n1",
        });
        object("Replica", name, spec, status)
    }

    #[test]
    fn a_model_is_ready_failed_or_waiting_with_the_reason_its_replicas_carry() {
        let m = model(2);
        let none = judge_model(&m, &[], &none_before());
        assert!(
            matches!(&none.verdict, Verdict::Waiting(w) if w.contains("0/2 replicas ready; the controllers have not yet")),
            "{none:?}"
        );
        let pending = replica(
            "chat-a",
            &m,
            serde_json::json!({"phase": "Pending", "reason": "no node has 8 free GPUs: 1 has 4 free"}),
        );
        let dl = replica(
            "chat-b",
            &m,
            serde_json::json!({"phase": "Starting", "download_progress": 0.4, "download_bytes": 1288490189u64,
                               "download_total_bytes": 3113851290u64, "download_bytes_per_second": 89128960.0}),
        );
        let j = judge_model(&m, &[dl.clone(), pending.clone()], &none_before());
        assert_eq!(
            j.verdict,
            Verdict::Waiting(
                "model/chat: 0/2 replicas ready; replica chat-a Pending: no node has 8 free GPUs: 1 has 4 free".into()
            )
        );
        assert_eq!(
            j.replicas,
            vec![
                "  replica/chat-a Pending: no node has 8 free GPUs: 1 has 4 free".to_owned(),
                "  replica/chat-b Starting: downloading 40% 1.2 GiB/2.9 GiB 85 MiB/s".to_owned(),
            ]
        );
        let failed = replica(
            "chat-c",
            &m,
            serde_json::json!({"phase": "Failed", "reason": "download of file:///m failed: no such file", "restarts": 0}),
        );
        let j = judge_model(&m, &[dl.clone(), failed.clone()], &none_before());
        assert_eq!(
            j.verdict,
            Verdict::Failed("model/chat: replica chat-c failed: download of file:///m failed: no such file".into())
        );
        // failed before the wait began: history, not this wait's failure
        let before = failed_names(&[dl.clone(), failed.clone()]);
        assert_eq!(before, BTreeSet::from(["chat-c".to_owned()]));
        let j = judge_model(&model(1), &[failed], &before);
        assert_eq!(
            j.verdict,
            Verdict::Waiting("model/chat: 0/1 replicas ready; replica chat-c failed before this wait began (download of file:///m failed: no such file); a replacement follows the controllers' backoff".into())
        );
        let ready = |n: &str| replica(n, &m, serde_json::json!({"phase": "Ready", "endpoint": "127.0.0.1:9"}));
        let j = judge_model(&m, &[ready("chat-d"), ready("chat-e")], &none_before());
        assert_eq!(j.verdict, Verdict::Ready("model/chat: 2/2 replicas ready".into()));
        assert_eq!(j.replicas[0], "  replica/chat-d Ready: ready on n1 at 127.0.0.1:9");
        // replicas of another template do not count
        let old = object(
            "Replica",
            "chat-old",
            serde_json::json!({"model": "chat", "engine": "sim", "source": "file:///old", "gpus_needed": 1}),
            serde_json::json!({"phase": "Ready"}),
        );
        assert!(matches!(judge_model(&model(1), &[old], &none_before()).verdict, Verdict::Waiting(_)));
        assert!(
            matches!(judge_model(&model(0), &[], &none_before()).verdict, Verdict::Ready(_)),
            "nothing wanted: done"
        );
    }

    #[test]
    fn adapters_follow_their_phase_and_on_demand_ones_are_done_at_once() {
        let a = |replicas: serde_json::Value, status: serde_json::Value| {
            let spec = serde_json::json!({"base_model": "chat", "source": "file:///a", "replicas": replicas});
            object("Adapter", "sql", spec, status)
        };
        let two = || serde_json::json!(2);
        let st = |phase: &str| serde_json::json!({"phase": phase, "reason": "bad source", "desired_replicas": 2, "loaded_replicas": 1});
        assert_eq!(
            judge_adapter(&a(two(), st("Failed"))).verdict,
            Verdict::Failed("adapter/sql failed: bad source".into())
        );
        assert!(
            matches!(judge_adapter(&a(two(), st("Loading"))).verdict, Verdict::Waiting(w) if w.contains("Loading: loaded on 1/2"))
        );
        assert!(matches!(judge_adapter(&a(two(), st("Ready"))).verdict, Verdict::Ready(_)));
        assert!(
            matches!(judge_adapter(&a(serde_json::json!("on-demand"), st("Pending"))).verdict, Verdict::Ready(r) if r.contains("on demand"))
        );
    }
}
