//! Scenario files (`chaos/scenarios/*.yaml`): the topology, the workload and a timed schedule
//! of faults. Parsing is strict (unknown fields are errors naming their path) and
//! [`Scenario::validate`] checks that each step has what its action needs, so a typo fails
//! before any process starts.
//!
//! ```yaml
//! name: leader-kill-loop
//! topology: {servers: 3, agents: 2, gpus_per_agent: 4, models: [{name: demo, replicas: 3}]}
//! workload: {duration: 40s, cas_clients: 4, keys: 3, requests_per_second: 10}
//! checks: {convergence_within: 30s}
//! schedule:
//!   - {at: 5s, action: kill, target: leader, duration: 2s, every: 8s, until: 30s}
//!   - {at: 12s, action: partition, groups: [[leader], [followers]], duration: 5s}
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A whole scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub topology: Topology,
    pub workload: Workload,
    #[serde(default)]
    pub checks: Checks,
    #[serde(default)]
    pub schedule: Vec<Step>,
}

/// The processes the run starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// Raft servers: 3 or 5.
    pub servers: u32,
    /// Agents (nodes), each with simulated GPUs running sim engines.
    pub agents: u32,
    #[serde(default = "four")]
    pub gpus_per_agent: u32,
    /// Whether a gateway runs (the data-plane workload needs one).
    #[serde(default = "yes")]
    pub gateway: bool,
    /// Models applied before the workload starts.
    #[serde(default)]
    pub models: Vec<ModelSpec>,
    /// Mount a small tmpfs on each server's data dir (root only), for `disk-full` steps.
    #[serde(default)]
    pub small_disks: bool,
    /// Run with security on: TLS on every link, certificates made for the run, the role
    /// table enforced (`flotilla chaos run --tls` turns it on for any scenario).
    #[serde(default)]
    pub tls: bool,
    /// The servers' Raft timings (`--heartbeat-ms`, `--election-timeout-{min,max}-ms`);
    /// absent: the servers' defaults (50 / 150-300 ms, for servers a few ms apart). A
    /// scenario with latency between the servers sets the timings a deployment across that
    /// latency must use (docs/deploy.md, "Servers far apart").
    #[serde(default)]
    pub raft: Option<RaftTimings>,
}

/// Raft timings for the servers, in ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaftTimings {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
}

impl RaftTimings {
    /// The server flags that set them.
    pub fn flags(&self) -> Vec<String> {
        [
            ("--heartbeat-ms", self.heartbeat_ms),
            ("--election-timeout-min-ms", self.election_timeout_min_ms),
            ("--election-timeout-max-ms", self.election_timeout_max_ms),
        ]
        .iter()
        .flat_map(|(f, v)| [f.to_string(), v.to_string()])
        .collect()
    }
}

/// A model to serve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    pub replicas: u32,
    #[serde(default = "one")]
    pub gpus: u32,
}

/// What the clients do while faults happen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// How long the fault phase lasts (the schedule's times are within it).
    #[serde(with = "dur")]
    pub duration: Duration,
    /// Concurrent compare-and-set clients on the store.
    #[serde(default = "four")]
    pub cas_clients: u32,
    /// Registers (objects) they share.
    #[serde(default = "three")]
    pub keys: u32,
    /// Data-plane requests per second through the gateway (0: none).
    #[serde(default)]
    pub requests_per_second: u32,
    /// Output tokens per data-plane request.
    #[serde(default = "sixteen")]
    pub request_tokens: u32,
}

/// Bounds the checkers hold the run to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checks {
    /// After the last fault is healed, every model must have its desired Ready replicas
    /// within this long.
    #[serde(with = "dur", default = "sixty_s")]
    pub convergence_within: Duration,
    /// Data-plane failures allowed outside any engine fault (requests whose engine stayed
    /// up): 0 unless the scenario says otherwise (e.g. a whole-cluster outage with a
    /// gateway that must keep serving stays at 0).
    #[serde(default)]
    pub allowed_unattributed_failures: u32,
    /// Longest stretch without an acknowledged write during the fault phase, if bounded
    /// (a scenario that cuts the leader off holds failover to it).
    #[serde(with = "dur_opt", default)]
    pub max_write_unavailability: Option<Duration>,
}

impl Default for Checks {
    fn default() -> Self {
        Checks { convergence_within: sixty_s(), allowed_unattributed_failures: 0, max_write_unavailability: None }
    }
}

/// The fault actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// SIGKILL; with `duration`, restart after it.
    Kill,
    /// Start a killed process again.
    Restart,
    /// SIGSTOP; with `duration`, SIGCONT after it.
    Pause,
    /// SIGCONT.
    Resume,
    /// Blackhole every link between `groups[0]` and `groups[1]`; with `duration`, heal after.
    Partition,
    /// Blackhole `from` → `to` only.
    OneWay,
    /// Add `latency` (± `jitter`) on `from` → `to` (and back).
    Delay,
    /// Undo every network fault.
    Heal,
    /// Fill the target server's data dir (needs `small_disks` and root); with `duration`,
    /// free it after.
    DiskFull,
    /// Free it.
    DiskFree,
    /// SIGKILL of `count` random sim engines (a crash storm when repeated).
    EngineCrash,
    /// `POST /sim/faults` with `fault` on `count` random engines; with `duration`, reset.
    EngineFault,
    /// SIGKILL every server; with `duration`, restart them all (static stability).
    KillAllServers,
    /// Restart each server in turn (kill, restart, wait for it to catch up).
    RollingRestart,
}

/// One scheduled fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// When (from the start of the fault phase).
    #[serde(with = "dur")]
    pub at: Duration,
    pub action: Action,
    /// `leader`, `follower`, `server`, `agent`, `gateway`, or a process name (`s1`, `a2`).
    #[serde(default)]
    pub target: Option<String>,
    /// Undo after this long (restart, resume, heal, free, reset).
    #[serde(with = "dur_opt", default)]
    pub duration: Option<Duration>,
    /// Repeat every this long ...
    #[serde(with = "dur_opt", default)]
    pub every: Option<Duration>,
    /// ... until this time.
    #[serde(with = "dur_opt", default)]
    pub until: Option<Duration>,
    /// Two groups of process names or roles (`leader`, `followers`, `agents`, `servers`).
    #[serde(default)]
    pub groups: Option<Vec<Vec<String>>>,
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub to: Option<String>,
    #[serde(with = "dur_opt", default)]
    pub latency: Option<Duration>,
    #[serde(with = "dur_opt", default)]
    pub jitter: Option<Duration>,
    /// How many engines (engine faults).
    #[serde(default)]
    pub count: Option<u32>,
    /// The sim fault patch (engine-fault), e.g. `{hang: true}` or `{error_rate: 0.5}`.
    #[serde(default)]
    pub fault: Option<serde_json::Value>,
}

impl Step {
    /// The times this step fires, within `[0, end]`.
    pub fn times(&self, end: Duration) -> Vec<Duration> {
        let mut out = vec![self.at];
        if let Some(every) = self.every.filter(|e| !e.is_zero()) {
            let until = self.until.unwrap_or(end).min(end);
            let mut t = self.at + every;
            while t <= until {
                out.push(t);
                t += every;
            }
        }
        out
    }
}

/// A scenario error: the path of the bad field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {path}: {message}")]
pub struct ScenarioError {
    pub file: String,
    pub path: String,
    pub message: String,
}

impl Scenario {
    /// Parses and validates a scenario file's text.
    pub fn parse(file: &str, text: &str) -> Result<Scenario, ScenarioError> {
        let de = serde_yaml::Deserializer::from_str(text);
        let s: Scenario = serde_path_to_error::deserialize(de).map_err(|e| ScenarioError {
            file: file.to_string(),
            path: e.path().to_string(),
            message: e.inner().to_string(),
        })?;
        s.validate().map_err(|(path, message)| ScenarioError { file: file.to_string(), path, message })?;
        Ok(s)
    }

    /// Checks what serde cannot: counts, times, and each action's required fields.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |path: &str, m: &str| Err((path.to_string(), m.to_string()));
        let t = &self.topology;
        if !(t.servers == 3 || t.servers == 5) {
            return bad("topology.servers", "must be 3 or 5");
        }
        if t.agents > 16 || t.gpus_per_agent == 0 || t.gpus_per_agent > 16 {
            return bad("topology", "agents must be 0..=16 and gpus_per_agent 1..=16");
        }
        if let Some(r) = &t.raft {
            if r.heartbeat_ms == 0 || r.heartbeat_ms >= r.election_timeout_min_ms {
                return bad("topology.raft.heartbeat_ms", "must be above 0 and below election_timeout_min_ms");
            }
            if r.election_timeout_min_ms >= r.election_timeout_max_ms || r.election_timeout_max_ms > 60_000 {
                return bad(
                    "topology.raft.election_timeout_max_ms",
                    "must be above election_timeout_min_ms and at most 60000",
                );
            }
        }
        let gpus: u32 = t.models.iter().map(|m| m.replicas * m.gpus).sum();
        if gpus > t.agents * t.gpus_per_agent {
            return bad("topology.models", "the models need more GPUs than the agents have");
        }
        let w = &self.workload;
        if w.duration.is_zero() || w.duration > Duration::from_secs(3600) {
            return bad("workload.duration", "must be between 1 s and 1 h");
        }
        if w.keys == 0 && w.cas_clients > 0 {
            return bad("workload.keys", "must be at least 1 when there are cas_clients");
        }
        if w.requests_per_second > 0 && !t.gateway {
            return bad("workload.requests_per_second", "needs topology.gateway: true");
        }
        for (i, s) in self.schedule.iter().enumerate() {
            let p = |f: &str| format!("schedule[{i}].{f}");
            if s.at > w.duration {
                return Err((p("at"), format!("{:?} is after workload.duration", s.at)));
            }
            let needs_target = matches!(
                s.action,
                Action::Kill | Action::Restart | Action::Pause | Action::Resume | Action::DiskFull | Action::DiskFree
            );
            if needs_target && s.target.is_none() {
                return Err((p("target"), format!("{:?} needs a target", s.action)));
            }
            match s.action {
                Action::Partition => match &s.groups {
                    Some(g) if g.len() == 2 && g.iter().all(|x| !x.is_empty()) => {}
                    _ => return Err((p("groups"), "partition needs exactly two non-empty groups".into())),
                },
                Action::OneWay | Action::Delay if s.from.is_none() || s.to.is_none() => {
                    return Err((p("from"), format!("{:?} needs from and to", s.action)));
                }
                Action::Delay if s.latency.is_none() => return Err((p("latency"), "delay needs a latency".into())),
                Action::EngineFault if s.fault.is_none() => {
                    return Err((p("fault"), "engine-fault needs a fault patch".into()));
                }
                Action::DiskFull | Action::DiskFree if !t.small_disks => {
                    return Err((p("action"), "disk faults need topology.small_disks: true".into()));
                }
                _ => {}
            }
            if s.every.is_some_and(|e| e.is_zero()) {
                return Err((p("every"), "must be positive".into()));
            }
        }
        Ok(())
    }
}

fn one() -> u32 {
    1
}
fn three() -> u32 {
    3
}
fn four() -> u32 {
    4
}
fn sixteen() -> u32 {
    16
}
fn yes() -> bool {
    true
}
fn sixty_s() -> Duration {
    Duration::from_secs(60)
}

/// Parses `1.5s`, `500ms`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 500ms, 5s, 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unit must be ms, s, m or h")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn format_duration(d: &Duration) -> String {
    format!("{}ms", d.as_millis())
}

mod dur {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(d))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

mod dur_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&super::format_duration(d)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(s) => super::parse_duration(&s).map(Some).map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "name: t\ntopology: {servers: 3, agents: 2, models: [{name: demo, replicas: 2}]}\n\
        workload: {duration: 30s, requests_per_second: 5}\n\
        schedule:\n  - {at: 5s, action: kill, target: leader, duration: 2s, every: 10s, until: 25s}\n  \
        - {at: 1s, action: partition, groups: [[leader], [followers]], duration: 3s}\n";

    #[test]
    fn parses_defaults_and_repetition() {
        let s = Scenario::parse("t.yaml", OK).unwrap();
        assert_eq!(s.topology.gpus_per_agent, 4);
        assert_eq!(s.workload.cas_clients, 4);
        assert_eq!(s.checks.convergence_within, Duration::from_secs(60));
        let times = s.schedule[0].times(s.workload.duration);
        assert_eq!(times, [5, 15, 25].map(Duration::from_secs));
        assert_eq!(s.schedule[1].times(s.workload.duration), [Duration::from_secs(1)]);
    }

    #[test]
    fn errors_name_the_field() {
        let e = Scenario::parse("t.yaml", &OK.replace("servers: 3", "servers: 4")).unwrap_err();
        assert_eq!(e.path, "topology.servers");
        let e = Scenario::parse("t.yaml", &OK.replace("agents: 2", "agents: 2, gpu: 1")).unwrap_err();
        assert!(e.path.starts_with("topology") && e.message.contains("unknown field"), "{e}");
        let e = Scenario::parse("t.yaml", &OK.replace("at: 5s", "at: soon")).unwrap_err();
        assert!(e.path.contains("schedule[0].at") || e.path.contains("schedule[0]"), "{e}");
        let e = Scenario::parse("t.yaml", &OK.replace("action: kill, target: leader", "action: kill")).unwrap_err();
        assert_eq!(e.path, "schedule[0].target");
        let e = Scenario::parse("t.yaml", &OK.replace("[[leader], [followers]]", "[[leader]]")).unwrap_err();
        assert_eq!(e.path, "schedule[1].groups");
        let e = Scenario::parse("t.yaml", &OK.replace("action: kill", "action: nuke")).unwrap_err();
        assert!(e.message.contains("unknown variant"), "{e}");
        let e = Scenario::parse("t.yaml", &OK.replace("replicas: 2", "replicas: 9")).unwrap_err();
        assert_eq!(e.path, "topology.models");
    }

    #[test]
    fn raft_timings_become_server_flags_and_bad_ones_are_named() {
        let with = |r: &str| OK.replace("replicas: 2}]", &format!("replicas: 2}}], raft: {r}"));
        let s = Scenario::parse(
            "t.yaml",
            &with("{heartbeat_ms: 500, election_timeout_min_ms: 2500, election_timeout_max_ms: 5000}"),
        )
        .unwrap();
        assert_eq!(
            s.topology.raft.unwrap().flags().join(" "),
            "--heartbeat-ms 500 --election-timeout-min-ms 2500 --election-timeout-max-ms 5000"
        );
        assert_eq!(Scenario::parse("t.yaml", OK).unwrap().topology.raft, None);
        let e = Scenario::parse(
            "t.yaml",
            &with("{heartbeat_ms: 500, election_timeout_min_ms: 400, election_timeout_max_ms: 5000}"),
        )
        .unwrap_err();
        assert_eq!(e.path, "topology.raft.heartbeat_ms");
        let e = Scenario::parse(
            "t.yaml",
            &with("{heartbeat_ms: 50, election_timeout_min_ms: 400, election_timeout_max_ms: 400}"),
        )
        .unwrap_err();
        assert_eq!(e.path, "topology.raft.election_timeout_max_ms");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("s").is_err());
    }
}
