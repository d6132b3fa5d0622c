//! Session affinity: requests with the same `x-session-id` go to the same endpoint while
//! it stays a candidate; when it leaves (or is ejected or saturated) the session moves to
//! the least-request choice and sticks there. Without the header: least-request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::simple::LeastRequest;
use super::Strategy;
use crate::load::EndpointLoad;
use crate::request::RequestFeatures;
use crate::table::{Endpoint, EndpointId};

/// Session id to (endpoint, last use), and the use clock.
type Table = (HashMap<String, (EndpointId, u64)>, u64);

pub struct SessionAffinity {
    sessions: Mutex<Table>,
    capacity: usize,
    fallback: LeastRequest,
}

impl SessionAffinity {
    pub fn new(capacity: usize) -> Self {
        SessionAffinity { sessions: Mutex::new((HashMap::new(), 0)), capacity, fallback: LeastRequest::default() }
    }
}

impl Strategy for SessionAffinity {
    fn pick(&self, req: &RequestFeatures, eps: &[Arc<Endpoint>], load: &[EndpointLoad]) -> Option<EndpointId> {
        let Some(sid) = req.session.as_deref() else {
            return self.fallback.pick(req, eps, load);
        };
        let mut guard = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let (map, clock) = &mut *guard;
        *clock += 1;
        let now = *clock;
        if let Some((ep, stamp)) = map.get_mut(sid) {
            if eps.iter().any(|e| &e.id == ep) {
                *stamp = now;
                return Some(ep.clone());
            }
        }
        let chosen = self.fallback.pick(req, eps, load)?;
        map.insert(sid.to_string(), (chosen.clone(), now));
        if map.len() > self.capacity {
            // forget the older half
            let cut = now.saturating_sub(self.capacity as u64 / 2);
            map.retain(|_, (_, s)| *s > cut);
        }
        Some(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn sticks_then_fails_over_when_its_endpoint_leaves() {
        let s = SessionAffinity::new(100);
        let all = eps(3);
        let mut r = req("x");
        r.session = Some("s1".into());
        let first = s.pick(&r, &all, &loads(&[0, 0, 0])).unwrap();
        for _ in 0..5 {
            assert_eq!(s.pick(&r, &all, &loads(&[0, 9, 9])).unwrap(), first);
        }
        let rest: Vec<_> = all.iter().filter(|e| e.id != first).cloned().collect();
        let moved = s.pick(&r, &rest, &loads(&[0, 0])).unwrap();
        assert_ne!(moved, first);
        // back with everyone: stays on the new endpoint
        assert_eq!(s.pick(&r, &all, &loads(&[0, 0, 0])).unwrap(), moved);
    }

    #[test]
    fn table_is_bounded() {
        let s = SessionAffinity::new(10);
        let all = eps(2);
        for i in 0..100 {
            let mut r = req("x");
            r.session = Some(format!("s{i}"));
            s.pick(&r, &all, &loads(&[0, 0]));
        }
        assert!(s.sessions.lock().unwrap().0.len() <= 11);
    }
}
