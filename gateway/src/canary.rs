//! Canary traffic split: while a model's rollout runs a canary (`spec.rollout.canary`, the
//! leader's `status.rollout.canary`), each request goes to the new template's replicas with
//! the canary's weight and to the old ones otherwise. The choice is made once per request,
//! so its retries stay within one template, and a request with `x-session-id` always lands
//! on the same side (session affinity and prefix reuse stay within a template). Pure.

/// A model's running canary as its status shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Canary {
    /// The new template's hash ([`revision_of`]).
    pub revision: u64,
    /// Percent of requests sent to it.
    pub weight: u32,
}

/// Which side of a canary one request takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    pub revision: u64,
    /// True: only endpoints of `revision`; false: only the others.
    pub canary: bool,
}

impl Split {
    /// Whether an endpoint of template `revision` (0: unknown) is on this request's side.
    pub fn admits(&self, revision: u64) -> bool {
        (revision == self.revision) == self.canary
    }
}

/// A template hash (ten hex digits) as a number; 0 for an empty or malformed one.
pub fn revision_of(hash: &str) -> u64 {
    if hash.is_empty() || hash.len() > 16 {
        return 0;
    }
    u64::from_str_radix(hash, 16).unwrap_or(0)
}

/// The running canary in a `Model` status document, if any.
pub fn canary_of(status: &serde_json::Value) -> Option<Canary> {
    let c = status.get("rollout")?.get("canary")?;
    if c.get("state")?.as_str()? != "Running" {
        return None;
    }
    let revision = revision_of(c.get("hash")?.as_str()?);
    let weight = u32::try_from(c.get("weight")?.as_u64()?).ok()?.min(100);
    (revision != 0).then_some(Canary { revision, weight })
}

/// FNV-1a, for a stable side per session.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The side a request takes: by its session id when it has one, else at random.
pub fn choose(c: Canary, session: Option<&str>) -> Split {
    let roll = match session {
        Some(s) => fnv(s) % 100,
        None => rand::random_range(0..100u64),
    };
    Split { revision: c.revision, canary: roll < u64::from(c.weight) }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn reads_only_a_running_canary() {
        let st = |state: &str| json!({"rollout": {"canary": {"hash": "00000000ff", "weight": 10, "state": state}}});
        assert_eq!(canary_of(&st("Running")), Some(Canary { revision: 255, weight: 10 }));
        assert_eq!(canary_of(&st("RolledBack")), None);
        assert_eq!(canary_of(&json!({"rollout": {}})), None);
        assert_eq!(canary_of(&json!({"rollout": {"canary": {"hash": "zz", "weight": 5, "state": "Running"}}})), None);
    }

    #[test]
    fn weights_split_traffic_and_sessions_stick() {
        let c = Canary { revision: 7, weight: 30 };
        let canary = (0..10_000).filter(|_| choose(c, None).canary).count();
        assert!((2_500..3_500).contains(&canary), "about 30%: {canary}");
        let sticky: Vec<bool> = (0..20).map(|_| choose(c, Some("user-42")).canary).collect();
        assert!(sticky.iter().all(|s| *s == sticky[0]), "one side per session");
        let sessions = (0..2_000).filter(|i| choose(c, Some(&format!("s{i}"))).canary).count();
        assert!((400..800).contains(&sessions), "sessions split by weight too: {sessions}");
        assert!(!choose(Canary { revision: 7, weight: 0 }, None).canary);
        assert!(choose(Canary { revision: 7, weight: 100 }, Some("x")).canary);
        let s = Split { revision: 7, canary: true };
        assert!(s.admits(7) && !s.admits(8) && !s.admits(0));
        assert!(Split { revision: 7, canary: false }.admits(0));
    }
}
