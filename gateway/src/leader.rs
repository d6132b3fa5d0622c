//! Calls to the leader (`AdapterService`, `AutoscaleService`) and what their failures mean
//! for clients:
//! [`LeaderLink`] tries the server that answered last, then the configured ones in order,
//! follows `cluster.not_leader: leader=ADDR` hints (like the watches in `cluster`), and
//! looks for a leader for a few seconds (an election) before giving up;
//! [`LoadError`] maps the leader's answers onto the gateway's client errors.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use flotilla_api::pb::adapter_service_client::AdapterServiceClient;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::cluster::{connect, leader_hint};
use crate::error::{ApiCode, ApiError};
use crate::names::AdapterName;

/// How long to keep looking for a leader (an election) before giving up.
const LEADER_SEARCH: Duration = Duration::from_secs(3);
/// Most `not_leader` hints followed in one call.
const MAX_HOPS: usize = 4;

/// Why `EnsureLoaded` failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadError {
    /// NOT_FOUND: no such adapter.
    NotFound(String),
    /// FAILED_PRECONDITION: the adapter is Failed, or its base model has no ready replica.
    Refused(String),
    /// FAILED_PRECONDITION `actors.adapter_no_slot`: no slot can be freed for it.
    NoSlot(String),
    /// RESOURCE_EXHAUSTED `actors.adapter_busy`: every evictable slot has requests in flight.
    Busy(String),
    /// DEADLINE_EXCEEDED, or no answer within the load timeout.
    Timeout(String),
    /// No server answered as leader.
    NoLeader(String),
    /// Anything else.
    Other(String),
}

impl LoadError {
    /// The `reason` label of `adapter_load_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            LoadError::NotFound(_) => "not_found",
            LoadError::Refused(_) => "failed_precondition",
            LoadError::NoSlot(_) => "no_slot",
            LoadError::Busy(_) => "busy",
            LoadError::Timeout(_) => "deadline_exceeded",
            LoadError::NoLeader(_) => "no_leader",
            LoadError::Other(_) => "other",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            LoadError::NotFound(m)
            | LoadError::Refused(m)
            | LoadError::NoSlot(m)
            | LoadError::Busy(m)
            | LoadError::Timeout(m)
            | LoadError::NoLeader(m)
            | LoadError::Other(m) => m,
        }
    }

    /// Reads a leader's answer.
    pub fn from_status(s: &tonic::Status) -> Self {
        let m = s.message().to_string();
        match s.code() {
            tonic::Code::NotFound => LoadError::NotFound(m),
            tonic::Code::FailedPrecondition if m.starts_with("actors.adapter_no_slot") => LoadError::NoSlot(m),
            tonic::Code::FailedPrecondition => LoadError::Refused(m),
            tonic::Code::ResourceExhausted => LoadError::Busy(m),
            tonic::Code::DeadlineExceeded => LoadError::Timeout(m),
            _ => LoadError::Other(format!("{:?}: {m}", s.code())),
        }
    }

    /// The client's answer: 404 for an unknown adapter, 503 with the leader's message when
    /// it refuses (nothing to retry soon), 503 with Retry-After otherwise.
    pub fn to_api(&self, adapter: &AdapterName) -> ApiError {
        let m = self.message();
        match self {
            LoadError::NotFound(_) => ApiError::model_not_found(adapter.as_str()),
            LoadError::Refused(_) => {
                ApiError::new(ApiCode::AdapterUnavailable, format!("adapter {adapter:?} cannot be loaded: {m}"))
            }
            LoadError::NoSlot(_) => {
                ApiError::new(ApiCode::AdapterNoSlot, format!("adapter {adapter:?} cannot be loaded now: {m}"))
                    .retry_after(5)
            }
            LoadError::Busy(_) => {
                ApiError::new(ApiCode::AdapterBusy, format!("adapter {adapter:?} cannot be loaded now: {m}"))
                    .retry_after(1)
            }
            LoadError::Timeout(_) => {
                ApiError::new(ApiCode::AdapterLoadTimeout, format!("adapter {adapter:?} was not loaded in time: {m}"))
                    .retry_after(5)
            }
            LoadError::NoLeader(_) => ApiError::new(
                ApiCode::AdapterLoadUnavailable,
                format!("adapter {adapter:?} is not loaded and no leader is reachable to load it: {m}"),
            )
            .retry_after(2),
            LoadError::Other(_) => {
                ApiError::new(ApiCode::AdapterLoadError, format!("adapter {adapter:?} could not be loaded: {m}"))
                    .retry_after(2)
            }
        }
    }
}

/// Calls to whichever server leads: the last one that answered, then the configured servers
/// in order; `cluster.not_leader: leader=ADDR` hints are followed.
pub struct LeaderLink {
    servers: Vec<String>,
    tls: Option<std::sync::Arc<flotilla_security::Tls>>,
    current: Mutex<Option<(String, Channel)>>,
}

fn not_leader(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::FailedPrecondition && s.message().starts_with("cluster.not_leader")
}

impl LeaderLink {
    pub fn new(servers: Vec<String>, tls: Option<std::sync::Arc<flotilla_security::Tls>>) -> Self {
        LeaderLink { servers, tls, current: Mutex::new(None) }
    }

    fn cached(&self) -> Option<(String, Channel)> {
        self.current.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, v: Option<(String, Channel)>) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = v;
    }

    /// Calls `f` with an `AdapterService` client on the leader within `deadline`.
    pub async fn call<T, F, Fut>(&self, deadline: Instant, mut f: F) -> Result<T, LoadError>
    where
        F: FnMut(AdapterServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_on(deadline, move |ch| f(AdapterServiceClient::new(ch))).await
    }

    /// Calls `f` with a channel to the leader (any service) within `deadline`.
    pub async fn call_on<T, F, Fut>(&self, deadline: Instant, mut f: F) -> Result<T, LoadError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let search_until = (Instant::now() + LEADER_SEARCH).min(deadline);
        let mut cached = self.cached();
        let mut queue: VecDeque<String> = cached.iter().map(|(a, _)| a.clone()).collect();
        queue.extend(self.servers.iter().filter(|s| !queue.contains(s)).cloned().collect::<Vec<_>>());
        let mut hops = 0;
        let mut last = "no server configured".to_string();
        loop {
            if queue.is_empty() {
                // every server tried: a leader may be being elected; look again briefly
                if Instant::now() + Duration::from_millis(200) >= search_until {
                    return Err(LoadError::NoLeader(last));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                queue.extend(self.servers.iter().cloned());
                if queue.is_empty() {
                    return Err(LoadError::NoLeader(last));
                }
            }
            let Some(addr) = queue.pop_front() else { continue };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LoadError::Timeout(format!("no answer from the leader in time ({last})")));
            }
            let ch = match cached.take().filter(|(a, _)| *a == addr) {
                Some((_, ch)) => ch,
                None => match tokio::time::timeout(left, connect(&addr, self.tls.as_ref())).await {
                    Ok(Ok(ch)) => ch,
                    Ok(Err(e)) => {
                        last = e;
                        continue;
                    }
                    Err(_) => {
                        last = format!("connect {addr}: timed out");
                        continue;
                    }
                },
            };
            match tokio::time::timeout(left, f(ch.clone())).await {
                Err(_) => {
                    return Err(LoadError::Timeout(format!(
                        "server {addr} did not answer within {} ms",
                        left.as_millis()
                    )))
                }
                Ok(Ok(r)) => {
                    self.set(Some((addr, ch)));
                    return Ok(r.into_inner());
                }
                Ok(Err(s)) if not_leader(&s) => {
                    self.set(None);
                    last = format!("{addr}: {}", s.message());
                    if let Some(h) = leader_hint(&s).filter(|_| hops < MAX_HOPS) {
                        hops += 1;
                        queue.retain(|a| *a != h);
                        queue.push_front(h);
                    }
                }
                Ok(Err(s))
                    if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled) =>
                {
                    self.set(None);
                    last = format!("{addr}: {s}");
                }
                Ok(Err(s)) => {
                    // the leader answered (with a refusal)
                    self.set(Some((addr, ch)));
                    return Err(LoadError::from_status(&s));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_answers_map_to_client_errors() {
        let refused = LoadError::from_status(&tonic::Status::failed_precondition("adapter a is Failed: rank 64 > 16"));
        assert_eq!(refused.reason(), "failed_precondition");
        let e = refused.to_api(&"a".into());
        assert_eq!((e.status().as_u16(), e.code.as_str()), (503, "adapter_unavailable"));
        assert!(e.message.contains("rank 64 > 16"), "{}", e.message);
        assert!(e.headers.is_empty(), "nothing to retry soon");
        let e = LoadError::from_status(&tonic::Status::not_found("no adapter a")).to_api(&"a".into());
        assert_eq!((e.status().as_u16(), e.code.as_str()), (404, "model_not_found"));
        for le in [
            LoadError::from_status(&tonic::Status::deadline_exceeded("not loaded in 30000 ms")),
            LoadError::NoLeader("x".into()),
            LoadError::from_status(&tonic::Status::internal("boom")),
        ] {
            let e = le.to_api(&"a".into());
            assert_eq!(e.status().as_u16(), 503, "{le:?}");
            assert!(e.headers.iter().any(|(k, _)| *k == "retry-after"), "{le:?}");
        }
        let no_slot = tonic::Status::failed_precondition(
            "actors.adapter_no_slot: adapter a cannot be placed now: no free slot: 1 of 1 (--max-cpu-loras) in use; every slot holds a pinned adapter",
        );
        let e = LoadError::from_status(&no_slot).to_api(&"a".into());
        assert_eq!((e.status().as_u16(), e.code.as_str()), (503, "adapter_no_slot"));
        assert!(e.message.contains("no free slot: 1 of 1"), "the controller's reason: {}", e.message);
        assert!(e.headers.iter().any(|(k, v)| *k == "retry-after" && v == "5"), "{:?}", e.headers);
        let busy = tonic::Status::resource_exhausted("actors.adapter_busy: adapter a cannot be placed now: in flight");
        let e = LoadError::from_status(&busy).to_api(&"a".into());
        assert_eq!((e.status().as_u16(), e.code.as_str()), (429, "adapter_busy"));
        assert!(e.headers.iter().any(|(k, v)| *k == "retry-after" && v == "1"), "{:?}", e.headers);
        assert!(not_leader(&tonic::Status::failed_precondition("cluster.not_leader: leader=unknown")));
        assert!(!not_leader(&tonic::Status::failed_precondition("adapter a is Failed")));
    }
}
