//! The LoRA adapter decision for one engine (pure): the adapters assigned to it × the
//! adapters the engine holds (its `/v1/models`) × the agent's own progress → steps. The
//! engine task's adapter worker ([`crate::engines::lora_worker`]) executes them and
//! reports; this module also decides what the report says ([`report`]) and how a scrape
//! merges with newer local knowledge ([`merge_scrape`]).
//!
//! ```text
//!  desired, engine lacks it, not tried      → Load   (≤ MAX_CONCURRENT_LOADS in flight)
//!  desired, loaded from that source         → —
//!  desired, engine lost it                  → Load
//!  desired, loaded from another source      → Unload, then Load
//!  desired, engine holds it, not ours       → Adopt  (recorded as loaded; no engine call)
//!  desired, failed for that source          → —      (not retried: the control plane
//!                                                      moves it; a new process retries)
//!  not desired, engine holds it             → Unload (the control plane owns the set)
//!  not desired, failed or gone              → Forget
//!  download / load / unload in flight       → —      (wait for it)
//! ```

use std::collections::{BTreeMap, BTreeSet};

use flotilla_api::pb::{AdapterAssignment, AdapterReport};
use tokio::time::Instant;

/// Most adapter loads (download + engine load) in flight per engine.
pub const MAX_CONCURRENT_LOADS: usize = 4;

/// Where one adapter stands on the current engine process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Fetching its source into the node cache.
    Downloading,
    /// `POST /v1/load_lora_adapter` in flight.
    Loading,
    /// The engine holds it.
    Loaded,
    /// The download or the engine refused; the reason. Not retried for this source.
    Failed(String),
    /// `POST /v1/unload_lora_adapter` in flight.
    Unloading,
}

impl Phase {
    /// The report's word for it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Phase::Downloading => "downloading",
            Phase::Loading => "loading",
            Phase::Loaded => "loaded",
            Phase::Failed(_) => "failed",
            Phase::Unloading => "unloading",
        }
    }

    /// A download or load in flight (counts against [`MAX_CONCURRENT_LOADS`]).
    pub fn is_load(&self) -> bool {
        matches!(self, Phase::Downloading | Phase::Loading)
    }

    /// Any engine or download call in flight.
    pub fn in_flight(&self) -> bool {
        self.is_load() || *self == Phase::Unloading
    }
}

/// The agent's knowledge of one adapter name on the current engine process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracked {
    /// The source it was (or is being) loaded from; for `Unloading`, the old one.
    pub source: String,
    /// Where it stands.
    pub phase: Phase,
}

impl Tracked {
    /// A tracked entry.
    pub fn new(source: &str, phase: Phase) -> Self {
        Tracked { source: source.to_string(), phase }
    }
}

/// What to do about one adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Fetch the source, then load it into the engine under the name.
    Load {
        /// Adapter name.
        name: String,
        /// Source URI.
        source: String,
    },
    /// Unload it from the engine.
    Unload {
        /// Adapter name.
        name: String,
    },
    /// The engine already holds it (an adopted engine, or loaded by someone else): record
    /// it as loaded from `source` without calling the engine.
    Adopt {
        /// Adapter name.
        name: String,
        /// Source URI.
        source: String,
    },
    /// Drop what is tracked about it (failed, or gone, and no longer desired).
    Forget {
        /// Adapter name.
        name: String,
    },
}

/// The desired list with each name once (the first entry wins), in order.
pub fn dedup(desired: &[AdapterAssignment]) -> Vec<&AdapterAssignment> {
    let mut seen = BTreeSet::new();
    desired.iter().filter(|a| seen.insert(a.name.as_str())).collect()
}

/// The steps toward `desired`, given the names the engine holds (`engine`: the last
/// scrape merged with newer local results) and what is `tracked`. Unloads, adoptions and
/// forgets come first, in name order; then loads in desired order, so many that at most
/// `max_loads` downloads and loads are in flight.
pub fn decide(
    desired: &[AdapterAssignment],
    engine: &BTreeSet<String>,
    tracked: &BTreeMap<String, Tracked>,
    max_loads: usize,
) -> Vec<Step> {
    let wanted: BTreeMap<&str, &str> =
        dedup(desired).into_iter().map(|a| (a.name.as_str(), a.source.as_str())).collect();
    let names: BTreeSet<&str> = wanted
        .keys()
        .copied()
        .chain(engine.iter().map(String::as_str))
        .chain(tracked.keys().map(String::as_str))
        .collect();
    let mut steps = Vec::new();
    let mut loads = BTreeSet::new();
    for name in names {
        let held = engine.contains(name);
        let t = tracked.get(name);
        if t.is_some_and(|t| t.phase.in_flight()) {
            continue;
        }
        let step = match (wanted.get(name), t) {
            (Some(_), None) if held => Some(adopt(name, wanted[name])),
            (Some(_), None) => {
                loads.insert(name);
                None
            }
            (Some(src), Some(t)) => match (&t.phase, t.source == *src, held) {
                (Phase::Loaded, true, true) | (Phase::Failed(_), true, _) => None,
                (_, false, true) => Some(Step::Unload { name: name.to_string() }),
                _ => {
                    loads.insert(name);
                    None
                }
            },
            (None, _) if held => Some(Step::Unload { name: name.to_string() }),
            (None, Some(_)) => Some(Step::Forget { name: name.to_string() }),
            (None, None) => None,
        };
        steps.extend(step);
    }
    let busy = tracked.values().filter(|t| t.phase.is_load()).count();
    let room = max_loads.saturating_sub(busy);
    steps.extend(
        dedup(desired)
            .into_iter()
            .filter(|a| loads.contains(a.name.as_str()))
            .take(room)
            .map(|a| Step::Load { name: a.name.clone(), source: a.source.clone() }),
    );
    steps
}

fn adopt(name: &str, source: &str) -> Step {
    Step::Adopt { name: name.to_string(), source: source.to_string() }
}

/// The report: one entry per desired adapter (in desired order), then the ones being
/// unloaded. A desired adapter not started yet (waiting for the engine, for room, or for
/// its old version to unload) reads `loading`. `load_ms` is the last successful load's.
pub fn report(
    desired: &[AdapterAssignment],
    tracked: &BTreeMap<String, Tracked>,
    load_ms: &BTreeMap<String, u64>,
) -> Vec<AdapterReport> {
    let mut out: Vec<AdapterReport> = dedup(desired)
        .into_iter()
        .map(|a| {
            let (state, reason) = match tracked.get(&a.name) {
                Some(t) if t.source == a.source && t.phase != Phase::Unloading => match &t.phase {
                    Phase::Failed(why) => ("failed", why.clone()),
                    p => (p.as_str(), String::new()),
                },
                _ => ("loading", String::new()),
            };
            AdapterReport {
                name: a.name.clone(),
                state: state.into(),
                reason,
                load_ms: load_ms.get(&a.name).copied().unwrap_or(0),
            }
        })
        .collect();
    for (name, t) in tracked {
        if t.phase == Phase::Unloading && !out.iter().any(|r| r.name == *name) {
            out.push(AdapterReport { name: name.clone(), state: "unloading".into(), ..Default::default() });
        }
    }
    out
}

/// The engine's adapters after a scrape of `/v1/models` that started at `started`: the
/// scraped list, except for names whose load or unload finished after the scrape started
/// (`touched`: name → when), where the current view (`current`) is newer. Keeps the
/// scrape's order, newer loads at the end.
pub fn merge_scrape(
    current: &[String],
    scraped: &[String],
    started: Instant,
    touched: &BTreeMap<String, Instant>,
) -> Vec<String> {
    let newer = |name: &String| touched.get(name).is_some_and(|at| *at > started);
    let mut out: Vec<String> = scraped.iter().filter(|n| !newer(n) || current.contains(n)).cloned().collect();
    for n in current {
        if newer(n) && !out.contains(n) {
            out.push(n.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ad(name: &str, source: &str) -> AdapterAssignment {
        AdapterAssignment { name: name.into(), source: source.into() }
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn tracked(items: &[(&str, &str, Phase)]) -> BTreeMap<String, Tracked> {
        items.iter().map(|(n, s, p)| (n.to_string(), Tracked::new(s, p.clone()))).collect()
    }

    fn load(name: &str, source: &str) -> Step {
        Step::Load { name: name.into(), source: source.into() }
    }

    fn unload(name: &str) -> Step {
        Step::Unload { name: name.into() }
    }

    #[test]
    fn fresh_engine_loads_everything_desired_in_order() {
        let want = [ad("b", "sim://b"), ad("a", "sim://a"), ad("b", "sim://other")];
        let got = decide(&want, &set(&[]), &BTreeMap::new(), MAX_CONCURRENT_LOADS);
        assert_eq!(got, vec![load("b", "sim://b"), load("a", "sim://a")]);
    }

    #[test]
    fn loads_are_capped_counting_those_in_flight() {
        let want: Vec<_> = (0..6).map(|i| ad(&format!("a{i}"), &format!("sim://a{i}"))).collect();
        let got = decide(&want, &set(&[]), &BTreeMap::new(), 4);
        assert_eq!(got, (0..4).map(|i| load(&format!("a{i}"), &format!("sim://a{i}"))).collect::<Vec<_>>());
        let busy = tracked(&[("a0", "sim://a0", Phase::Downloading), ("a1", "sim://a1", Phase::Loading)]);
        let got = decide(&want, &set(&[]), &busy, 4);
        assert_eq!(got, vec![load("a2", "sim://a2"), load("a3", "sim://a3")]);
        // Unloads do not count against the cap.
        let unloading = tracked(&[("old", "sim://old", Phase::Unloading)]);
        assert_eq!(decide(&want, &set(&["old"]), &unloading, 4).len(), 4);
    }

    #[test]
    fn loaded_adapters_are_kept_and_undesired_ones_unloaded() {
        let t = tracked(&[("a", "sim://a", Phase::Loaded), ("b", "sim://b", Phase::Loaded)]);
        let want = [ad("b", "sim://b"), ad("c", "sim://c")];
        let got = decide(&want, &set(&["a", "b"]), &t, 4);
        assert_eq!(got, vec![unload("a"), load("c", "sim://c")]);
        // Something the engine holds that nobody assigned is unloaded too.
        assert_eq!(decide(&[], &set(&["stray"]), &BTreeMap::new(), 4), vec![unload("stray")]);
    }

    #[test]
    fn a_source_change_is_unload_then_load() {
        let t = tracked(&[("a", "sim://a", Phase::Loaded)]);
        let want = [ad("a", "sim://a?rank=8")];
        assert_eq!(decide(&want, &set(&["a"]), &t, 4), vec![unload("a")]);
        // Once unloaded (untracked, not held) it loads from the new source.
        assert_eq!(decide(&want, &set(&[]), &BTreeMap::new(), 4), vec![load("a", "sim://a?rank=8")]);
    }

    #[test]
    fn failures_are_not_retried_for_the_same_source() {
        let failed = tracked(&[("a", "file:///x", Phase::Failed("404".into()))]);
        assert_eq!(decide(&[ad("a", "file:///x")], &set(&[]), &failed, 4), vec![]);
        // A new source for the name is a new assignment: load it.
        assert_eq!(decide(&[ad("a", "file:///y")], &set(&[]), &failed, 4), vec![load("a", "file:///y")]);
        // Unassigned: forgotten, or unloaded if the engine holds it after all.
        assert_eq!(decide(&[], &set(&[]), &failed, 4), vec![Step::Forget { name: "a".into() }]);
        assert_eq!(decide(&[], &set(&["a"]), &failed, 4), vec![unload("a")]);
        // Failed stays failed even if the engine lists the name (a timed-out load, or an old
        // version that would not unload): the report must not call it loaded.
        assert_eq!(decide(&[ad("a", "file:///x")], &set(&["a"]), &failed, 4), vec![]);
        // Failed for an old source, held, new source wanted: unload first.
        assert_eq!(decide(&[ad("a", "file:///y")], &set(&["a"]), &failed, 4), vec![unload("a")]);
    }

    #[test]
    fn adapters_the_engine_already_holds_are_adopted_and_lost_ones_reloaded() {
        let want = [ad("a", "sim://a"), ad("b", "sim://b")];
        let got = decide(&want, &set(&["a"]), &BTreeMap::new(), 4);
        assert_eq!(got, vec![Step::Adopt { name: "a".into(), source: "sim://a".into() }, load("b", "sim://b")]);
        // Recorded as loaded, but a newer scrape says the engine lost it: load again.
        let t = tracked(&[("a", "sim://a", Phase::Loaded)]);
        assert_eq!(decide(&want[..1], &set(&[]), &t, 4), vec![load("a", "sim://a")]);
        // Recorded as loaded, gone, and no longer wanted: forgotten.
        assert_eq!(decide(&[], &set(&[]), &t, 4), vec![Step::Forget { name: "a".into() }]);
    }

    #[test]
    fn work_in_flight_is_waited_for() {
        let t = tracked(&[
            ("a", "sim://a", Phase::Loading),
            ("b", "sim://b", Phase::Unloading),
            ("c", "sim://c", Phase::Downloading),
        ]);
        assert_eq!(decide(&[ad("b", "sim://b2")], &set(&["a", "b"]), &t, 4), vec![]);
    }

    #[test]
    fn reports_cover_desired_and_unloading_adapters() {
        let t = tracked(&[
            ("a", "sim://a", Phase::Loaded),
            ("b", "file:///b", Phase::Failed("download of file:///b failed: not found".into())),
            ("c", "s3://x/c", Phase::Downloading),
            ("old", "sim://old", Phase::Unloading),
            ("moved", "sim://v1", Phase::Unloading),
        ]);
        let want = [
            ad("a", "sim://a"),
            ad("b", "file:///b"),
            ad("c", "s3://x/c"),
            ad("moved", "sim://v2"),
            ad("d", "sim://d"),
        ];
        let ms = BTreeMap::from([("a".to_string(), 12)]);
        let got = report(&want, &t, &ms);
        let brief: Vec<(&str, &str, u64)> =
            got.iter().map(|r| (r.name.as_str(), r.state.as_str(), r.load_ms)).collect();
        assert_eq!(
            brief,
            [
                ("a", "loaded", 12),
                ("b", "failed", 0),
                ("c", "downloading", 0),
                ("moved", "loading", 0),
                ("d", "loading", 0),
                ("old", "unloading", 0)
            ]
        );
        assert!(got[1].reason.contains("not found"));
        assert!(got.iter().filter(|r| r.state != "failed").all(|r| r.reason.is_empty()));
    }

    #[test]
    fn a_scrape_older_than_a_local_result_does_not_undo_it() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_millis(10);
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // "c" loaded and "a" unloaded after the scrape started: the local view wins for them.
        let touched = BTreeMap::from([("c".to_string(), later), ("a".to_string(), later), ("b".to_string(), t0)]);
        let got = merge_scrape(&names(&["b", "c"]), &names(&["x", "a", "b"]), t0, &touched);
        assert_eq!(got, names(&["x", "b", "c"]));
        // A scrape after those results is authoritative ("b" was unloaded behind our back).
        let got = merge_scrape(&names(&["b", "c"]), &names(&["c"]), later + Duration::from_millis(1), &touched);
        assert_eq!(got, names(&["c"]));
    }
}
