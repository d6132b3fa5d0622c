//! The member clusters the global gateway routes to: one [`Member`] per `Cluster` object
//! with a `spec.gateway`, its health (a small state machine: unknown, up, down with a
//! doubling probe backoff), the models its last `/v1/models` poll listed (less those a
//! request found missing since), its latency EWMA and its requests in flight; the
//! [`Members`] table swapped whole on each Cluster list; and [`order`], the pure choice of
//! the clusters a request is tried on.
//!
//! ```text
//!             poll ok                     connect error / timeout (request or poll)
//!  Unknown ───────────> Up <──────────────────────────────────┐
//!     │                  │ ────────────────> Down{backoff} ───┘ probe ok
//!     └── poll fails ───────────────────────> (probe after backoff; failed probe: x2, max 16x)
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::Uri;
use tokio::sync::Notify;
use tokio::time::Instant;

/// A member cluster's name (its `Cluster` object's name).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterName(Arc<str>);

impl ClusterName {
    pub fn new(s: &str) -> Self {
        ClusterName(Arc::from(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for ClusterName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// A member gateway's base URL: `http(s)://host:port` (a bare `host:port` is http).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberUrl {
    pub https: bool,
    pub authority: Authority,
}

impl MemberUrl {
    /// Parses a `Cluster`'s `spec.gateway`.
    pub fn parse(s: &str) -> Result<MemberUrl, String> {
        let (https, rest) = match s.split_once("://") {
            Some(("https", r)) => (true, r),
            Some(("http", r)) => (false, r),
            Some((scheme, _)) => return Err(format!("{s:?}: scheme {scheme:?} is not http or https")),
            None => (false, s),
        };
        let rest = rest.trim_end_matches('/');
        let authority: Authority = rest.parse().map_err(|_| format!("{s:?} is not http(s)://HOST:PORT"))?;
        if authority.port_u16().is_none() || authority.as_str().contains('@') {
            return Err(format!("{s:?} is not http(s)://HOST:PORT"));
        }
        Ok(MemberUrl { https, authority })
    }

    /// The URI of `path_and_query` on this gateway.
    pub fn uri(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(if self.https { Scheme::HTTPS } else { Scheme::HTTP })
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }
}

impl fmt::Display for MemberUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", if self.https { "https" } else { "http" }, self.authority)
    }
}

/// What a `Cluster` object says about a member, for routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterInfo {
    pub name: ClusterName,
    pub gateway: MemberUrl,
    /// The `region` label.
    pub region: Option<String>,
}

/// A member's health.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Health {
    /// Not polled yet.
    Unknown,
    Up,
    /// Refused connections or timed out; probed again at `until`, the next failed probe
    /// doubling `backoff`.
    Down {
        until: Instant,
        backoff: Duration,
    },
}

/// The longest probe backoff, as a multiple of the first.
pub const MAX_BACKOFF_FACTOR: u32 = 16;

impl Health {
    /// After a failed request or poll at `now`: down, probed after the first backoff, or
    /// after twice the previous one when already down (at most [`MAX_BACKOFF_FACTOR`]x).
    pub fn on_failure(self, now: Instant, base: Duration) -> Health {
        let backoff = match self {
            Health::Down { backoff, .. } => (backoff * 2).min(base * MAX_BACKOFF_FACTOR),
            _ => base,
        };
        Health::Down { until: now + backoff, backoff }
    }

    /// Whether a request marking it down at `now` changes anything: a member already down
    /// keeps its probe schedule (many requests failing at once do not push it out).
    pub fn is_down(self) -> bool {
        matches!(self, Health::Down { .. })
    }

    /// How long the poller waits before the next poll or probe.
    pub fn next_poll_in(self, now: Instant, interval: Duration) -> Duration {
        match self {
            Health::Down { until, .. } => until.saturating_duration_since(now),
            _ => interval,
        }
    }
}

/// The weight of a new sample in the latency EWMA.
pub const EWMA_ALPHA: f64 = 0.3;

/// `prev` moved toward `sample_ms` ([`EWMA_ALPHA`]); the first sample as it is.
pub fn ewma(prev: Option<f64>, sample_ms: f64) -> f64 {
    match prev {
        Some(p) => p + EWMA_ALPHA * (sample_ms - p),
        None => sample_ms,
    }
}

/// Latencies are compared in steps of 25%: members within a step are equally fast and
/// the one with fewer requests in flight goes first.
pub fn latency_band(ewma_ms: Option<f64>) -> u32 {
    match ewma_ms {
        Some(ms) if ms.is_finite() && ms > 0.0 => ((1.0 + ms).ln() / 1.25f64.ln()) as u32,
        _ => 0,
    }
}

#[derive(Debug)]
struct MemberState {
    health: Health,
    /// Models the last poll listed, less those a request found missing since.
    models: BTreeSet<String>,
    /// EWMA of the time to response headers, in milliseconds.
    ewma_ms: Option<f64>,
    /// A poll or probe finished (whatever its result).
    polled: bool,
}

/// One member cluster.
#[derive(Debug)]
pub struct Member {
    pub info: ClusterInfo,
    state: Mutex<MemberState>,
    in_flight: AtomicU32,
    /// Wakes the poller when a request marked the member down.
    pub wake: Notify,
}

/// A member as [`order`] sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub name: ClusterName,
    pub region: Option<String>,
    pub health: Health,
    pub serves: bool,
    pub ewma_ms: Option<f64>,
    pub in_flight: u32,
}

impl Member {
    pub fn new(info: ClusterInfo) -> Member {
        Member {
            info,
            state: Mutex::new(MemberState {
                health: Health::Unknown,
                models: BTreeSet::new(),
                ewma_ms: None,
                polled: false,
            }),
            in_flight: AtomicU32::new(0),
            wake: Notify::new(),
        }
    }

    /// A member with new `info` and this one's state (a Cluster's labels changed).
    fn with_info(&self, info: ClusterInfo) -> Member {
        let s = self.lock();
        Member {
            info,
            state: Mutex::new(MemberState {
                health: s.health,
                models: s.models.clone(),
                ewma_ms: s.ewma_ms,
                polled: s.polled,
            }),
            in_flight: AtomicU32::new(0),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemberState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn view(&self, model: &str) -> View {
        let s = self.lock();
        View {
            name: self.info.name.clone(),
            region: self.info.region.clone(),
            health: s.health,
            serves: s.models.contains(model),
            ewma_ms: s.ewma_ms,
            in_flight: self.in_flight.load(Ordering::Relaxed),
        }
    }

    pub fn health(&self) -> Health {
        self.lock().health
    }

    pub fn is_up(&self) -> bool {
        self.lock().health == Health::Up
    }

    pub fn polled(&self) -> bool {
        self.lock().polled
    }

    pub fn ewma_ms(&self) -> Option<f64> {
        self.lock().ewma_ms
    }

    pub fn models(&self) -> BTreeSet<String> {
        self.lock().models.clone()
    }

    pub fn serves(&self, model: &str) -> bool {
        self.lock().models.contains(model)
    }

    /// A poll answered with `models` after `rtt`: up, serving exactly those.
    pub fn poll_ok(&self, models: BTreeSet<String>, rtt: Duration) {
        let mut s = self.lock();
        s.health = Health::Up;
        s.models = models;
        s.ewma_ms = Some(ewma(s.ewma_ms, rtt.as_secs_f64() * 1e3));
        s.polled = true;
    }

    /// A poll or probe failed at `now`: down (or down longer). The models are kept: when no
    /// member serving a model is up, the down ones are still tried.
    pub fn poll_failed(&self, now: Instant, base: Duration) {
        let mut s = self.lock();
        s.health = s.health.on_failure(now, base);
        s.polled = true;
    }

    /// A request could not connect or timed out: down unless already (the poller is woken
    /// to probe after the backoff). True when this marked it down.
    pub fn request_failed(&self, now: Instant, base: Duration) -> bool {
        let mut s = self.lock();
        if s.health.is_down() {
            return false;
        }
        s.health = s.health.on_failure(now, base);
        drop(s);
        self.wake.notify_one();
        true
    }

    /// A request's response head came after `d`.
    pub fn record_latency(&self, d: Duration) {
        let mut s = self.lock();
        s.ewma_ms = Some(ewma(s.ewma_ms, d.as_secs_f64() * 1e3));
    }

    /// The member answered 404 for `model`: it does not serve it (until the next poll).
    pub fn model_missing(&self, model: &str) -> bool {
        self.lock().models.remove(model)
    }

    /// Counts a request in flight on this member until the guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// One request in flight on a member.
#[derive(Debug)]
pub struct InFlight(Arc<Member>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The order a request for a model tries clusters in (pure): those up and serving it, the
/// request's region first, then by latency (25% steps, [`latency_band`]), then fewer
/// requests in flight, then by name; when none serving it is up, those down (still serving
/// it at their last poll) in the same order. At most `max`. Indices into `views`.
pub fn order(views: &[View], region: Option<&str>, max: usize) -> Vec<usize> {
    let key = |v: &View| {
        let away = region.is_none_or(|r| v.region.as_deref() != Some(r));
        (away, latency_band(v.ewma_ms), v.in_flight, v.name.clone())
    };
    let pick = |up: bool| {
        let mut idx: Vec<usize> = (0..views.len())
            .filter(|&i| views[i].serves && (views[i].health == Health::Up) == up)
            .filter(|&i| up || views[i].health.is_down())
            .collect();
        idx.sort_by_cached_key(|&i| key(&views[i]));
        idx
    };
    let mut idx = pick(true);
    if idx.is_empty() {
        idx = pick(false);
    }
    idx.truncate(max);
    idx
}

/// The member table, swapped whole on each Cluster list.
#[derive(Debug, Default)]
pub struct Members {
    table: RwLock<Arc<BTreeMap<ClusterName, Arc<Member>>>>,
    /// A Cluster list was received at least once.
    listed: std::sync::atomic::AtomicBool,
}

/// What changed in a [`Members::apply`].
#[derive(Debug, Default)]
pub struct Changes {
    /// New members, or members whose Cluster changed (each needs its poller).
    pub added: Vec<Arc<Member>>,
    /// Members gone or replaced (their pollers stop).
    pub removed: Vec<ClusterName>,
}

/// Why no cluster can take a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoCandidate {
    /// No Cluster list was received yet.
    NoList,
    /// No member has answered a poll yet.
    NoneAnswered,
    /// No member serves the model.
    UnknownModel,
}

impl Members {
    pub fn snapshot(&self) -> Arc<BTreeMap<ClusterName, Arc<Member>>> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn listed(&self) -> bool {
        self.listed.load(Ordering::Acquire)
    }

    /// Replaces the table with `infos`, keeping the state of members whose Cluster is
    /// unchanged (and of those whose labels alone changed).
    pub fn apply(&self, infos: Vec<ClusterInfo>) -> Changes {
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        let mut next = BTreeMap::new();
        let mut changes = Changes::default();
        for info in infos {
            let kept = match t.get(&info.name) {
                Some(m) if m.info == info => m.clone(),
                Some(m) if m.info.gateway == info.gateway => {
                    changes.removed.push(info.name.clone());
                    let m = Arc::new(m.with_info(info.clone()));
                    changes.added.push(m.clone());
                    m
                }
                Some(_) => {
                    changes.removed.push(info.name.clone());
                    let m = Arc::new(Member::new(info.clone()));
                    changes.added.push(m.clone());
                    m
                }
                None => {
                    let m = Arc::new(Member::new(info.clone()));
                    changes.added.push(m.clone());
                    m
                }
            };
            next.insert(info.name, kept);
        }
        changes.removed.extend(t.keys().filter(|n| !next.contains_key(*n)).cloned());
        *t = Arc::new(next);
        self.listed.store(true, Ordering::Release);
        changes
    }

    /// The members a request for `model` is tried on, in order ([`order`]).
    pub fn candidates(&self, model: &str, region: Option<&str>, max: usize) -> Result<Vec<Arc<Member>>, NoCandidate> {
        let t = self.snapshot();
        if !self.listed() {
            return Err(NoCandidate::NoList);
        }
        let members: Vec<&Arc<Member>> = t.values().collect();
        let views: Vec<View> = members.iter().map(|m| m.view(model)).collect();
        let idx = order(&views, region, max);
        if idx.is_empty() {
            let answered = members.iter().any(|m| m.health() == Health::Up);
            return Err(if answered { NoCandidate::UnknownModel } else { NoCandidate::NoneAnswered });
        }
        Ok(idx.into_iter().map(|i| members[i].clone()).collect())
    }

    /// Whether any member serves `model` (bounded metric labels).
    pub fn knows(&self, model: &str) -> bool {
        self.snapshot().values().any(|m| m.serves(model))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(name: &str, region: &str, health: Health, serves: bool, ewma: f64, in_flight: u32) -> View {
        View {
            name: ClusterName::new(name),
            region: (!region.is_empty()).then(|| region.to_string()),
            health,
            serves,
            ewma_ms: (ewma >= 0.0).then_some(ewma),
            in_flight,
        }
    }

    fn names(views: &[View], idx: Vec<usize>) -> Vec<&str> {
        idx.into_iter().map(|i| views[i].name.as_str()).collect()
    }

    #[test]
    fn the_region_goes_first_then_latency_then_load() {
        let down = Health::Down { until: Instant::now(), backoff: Duration::from_millis(500) };
        let up = Health::Up;
        let v = vec![
            view("eu-1", "eu", up, true, 5.0, 0),
            view("us-1", "us", up, true, 50.0, 0),
            view("us-2", "us", up, true, 10.0, 3),
            view("us-3", "us", up, true, 10.5, 1),
            view("us-4", "us", up, false, 1.0, 0),
            view("us-5", "us", down, true, 1.0, 0),
            view("ap-1", "", Health::Unknown, true, -1.0, 0),
        ];
        assert_eq!(names(&v, order(&v, Some("us"), 10)), ["us-3", "us-2", "us-1", "eu-1"]);
        assert_eq!(names(&v, order(&v, Some("eu"), 10)), ["eu-1", "us-3", "us-2", "us-1"]);
        assert_eq!(names(&v, order(&v, None, 10)), ["eu-1", "us-3", "us-2", "us-1"]);
        assert_eq!(names(&v, order(&v, Some("us"), 2)), ["us-3", "us-2"], "at most max");
        assert_eq!(names(&v, order(&v, Some("nowhere"), 10)), ["eu-1", "us-3", "us-2", "us-1"]);
    }

    #[test]
    fn down_members_serve_only_when_no_member_serving_the_model_is_up() {
        let down = Health::Down { until: Instant::now(), backoff: Duration::from_millis(500) };
        let v = vec![
            view("a", "us", down, true, 5.0, 0),
            view("b", "eu", down, true, 1.0, 0),
            view("c", "us", Health::Up, false, 1.0, 0),
            view("d", "us", Health::Unknown, true, -1.0, 0),
        ];
        assert_eq!(names(&v, order(&v, Some("us"), 10)), ["a", "b"]);
        let none: Vec<View> = v.iter().filter(|x| x.name.as_str() == "c").cloned().collect();
        assert!(order(&none, Some("us"), 10).is_empty());
    }

    #[test]
    fn latency_is_compared_in_quarter_steps() {
        assert_eq!(latency_band(None), 0);
        assert_eq!(latency_band(Some(10.0)), latency_band(Some(10.5)));
        assert!(latency_band(Some(10.0)) < latency_band(Some(14.0)));
        assert!(latency_band(Some(100.0)) < latency_band(Some(200.0)));
        assert_eq!(latency_band(Some(f64::NAN)), 0);
        assert_eq!(ewma(None, 8.0), 8.0);
        assert!((ewma(Some(10.0), 20.0) - 13.0).abs() < 1e-9);
    }

    #[test]
    fn health_backs_off_doubling_to_a_bound_and_comes_back_on_an_answer() {
        let base = Duration::from_millis(100);
        let t0 = Instant::now();
        let mut h = Health::Unknown.on_failure(t0, base);
        assert_eq!(h, Health::Down { until: t0 + base, backoff: base });
        for _ in 0..10 {
            h = h.on_failure(t0, base);
        }
        assert_eq!(h, Health::Down { until: t0 + base * 16, backoff: base * 16 });
        assert_eq!(h.next_poll_in(t0, Duration::from_secs(2)), base * 16);
        assert_eq!(Health::Up.next_poll_in(t0, Duration::from_secs(2)), Duration::from_secs(2));
        let m = Member::new(info("a", "http://127.0.0.1:1", None));
        assert!(m.request_failed(t0, base));
        assert!(!m.request_failed(t0, base), "already down: the schedule stays");
        m.poll_ok(["m".to_string()].into(), Duration::from_millis(4));
        assert!(m.is_up() && m.serves("m"));
        assert!(m.model_missing("m") && !m.serves("m"));
    }

    fn info(name: &str, gw: &str, region: Option<&str>) -> ClusterInfo {
        ClusterInfo {
            name: ClusterName::new(name),
            gateway: MemberUrl::parse(gw).unwrap(),
            region: region.map(str::to_string),
        }
    }

    #[test]
    fn a_new_list_keeps_the_state_of_unchanged_members() {
        let t = Members::default();
        assert_eq!(t.candidates("m", None, 3).unwrap_err(), NoCandidate::NoList);
        let c = t.apply(vec![info("a", "http://h:1", Some("us")), info("b", "http://h:2", None)]);
        assert_eq!((c.added.len(), c.removed.len()), (2, 0));
        assert_eq!(t.candidates("m", None, 3).unwrap_err(), NoCandidate::NoneAnswered);
        t.snapshot()["a"].poll_ok(["m".to_string()].into(), Duration::from_millis(1));
        assert_eq!(t.candidates("x", None, 3).unwrap_err(), NoCandidate::UnknownModel);
        let c = t.apply(vec![info("a", "http://h:1", Some("eu")), info("c", "http://h:3", None)]);
        let added: Vec<&str> = c.added.iter().map(|m| m.info.name.as_str()).collect();
        assert_eq!(added, ["a", "c"]);
        assert_eq!(c.removed, [ClusterName::new("a"), ClusterName::new("b")]);
        let a = t.snapshot()["a"].clone();
        assert!(a.is_up() && a.serves("m") && a.info.region.as_deref() == Some("eu"), "labels changed, state kept");
        let c = t.apply(vec![info("a", "http://h:9", Some("eu"))]);
        assert!(!t.snapshot()["a"].serves("m"), "a new gateway starts unknown");
        assert_eq!(c.removed, [ClusterName::new("a"), ClusterName::new("c")]);
        let c = t.apply(vec![info("a", "http://h:9", Some("eu"))]);
        assert!(c.added.is_empty() && c.removed.is_empty());
    }

    #[test]
    fn member_urls_are_http_or_https_host_port() {
        let u = MemberUrl::parse("http://10.0.0.9:8080/").unwrap();
        assert_eq!((u.https, u.authority.as_str()), (false, "10.0.0.9:8080"));
        assert_eq!(u.uri("/v1/models").unwrap().to_string(), "http://10.0.0.9:8080/v1/models");
        assert!(MemberUrl::parse("https://gw.example.com:443").unwrap().https);
        assert!(!MemberUrl::parse("gw:80").unwrap().https);
        for bad in ["ftp://h:1", "http://h", "http://u@h:1", "http://h:1/x", ""] {
            assert!(MemberUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
