//! The waiting queue of one model when every endpoint is saturated (pure, no I/O):
//! strict priority between classes (critical, standard, sheddable), and within a class a
//! virtual token counter (VTC) per tenant: the tenant with the lowest counter goes next
//! and is charged the request's token cost, so a heavy tenant cannot starve a light one.
//! A tenant that comes back from idle is lifted to the lowest counter of the tenants
//! waiting, so idling banks no credit. When full, the newest request of the lowest class
//! below the arrival's is shed first.

use std::collections::{BTreeMap, HashMap, VecDeque};

use flotilla_api::spec::PriorityClass;

fn class_index(c: PriorityClass) -> usize {
    match c {
        PriorityClass::Critical => 0,
        PriorityClass::Standard => 1,
        PriorityClass::Sheddable => 2,
    }
}

/// The counter correction once a request's real token count is known: `actual - estimate`,
/// saturating (an engine may report absurd usage).
pub fn correction(actual: u64, estimate: u64) -> i64 {
    let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    as_i64(actual).saturating_sub(as_i64(estimate))
}

/// One queued request.
#[derive(Debug)]
pub struct Waiter<T> {
    pub id: u64,
    pub class: PriorityClass,
    pub tenant: String,
    /// Estimated tokens (prompt + expected output), charged at dispatch.
    pub cost: u64,
    pub payload: T,
}

/// Priority classes of per-tenant FIFOs with VTC counters.
#[derive(Debug)]
pub struct FairQueue<T> {
    classes: [BTreeMap<String, VecDeque<Waiter<T>>>; 3],
    counters: HashMap<String, i64>,
    len: usize,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        FairQueue { classes: Default::default(), counters: HashMap::new(), len: 0 }
    }
}

impl<T> FairQueue<T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn waiting_tenant(&self, t: &str) -> bool {
        self.classes.iter().any(|c| c.get(t).is_some_and(|q| !q.is_empty()))
    }

    /// The VTC counter of a tenant.
    pub fn counter(&self, tenant: &str) -> i64 {
        self.counters.get(tenant).copied().unwrap_or(0)
    }

    pub fn push(&mut self, w: Waiter<T>) {
        if !self.waiting_tenant(&w.tenant) {
            let min_active = self
                .classes
                .iter()
                .flat_map(|c| c.iter().filter(|(_, q)| !q.is_empty()).map(|(t, _)| self.counter(t)))
                .min();
            if let Some(m) = min_active {
                let c = self.counters.entry(w.tenant.clone()).or_insert(0);
                *c = (*c).max(m);
            }
        }
        self.len += 1;
        self.classes[class_index(w.class)].entry(w.tenant.clone()).or_default().push_back(w);
    }

    /// The request that goes next: highest class, then lowest tenant counter.
    pub fn peek(&self) -> Option<&Waiter<T>> {
        let (c, t) = self.next_key()?;
        self.classes[c].get(&t)?.front()
    }

    fn next_key(&self) -> Option<(usize, String)> {
        for (ci, class) in self.classes.iter().enumerate() {
            let best = class.iter().filter(|(_, q)| !q.is_empty()).min_by_key(|(t, _)| (self.counter(t), (*t).clone()));
            if let Some((t, _)) = best {
                return Some((ci, t.clone()));
            }
        }
        None
    }

    /// Removes the next request and charges its tenant.
    pub fn pop(&mut self) -> Option<Waiter<T>> {
        let (c, t) = self.next_key()?;
        let q = self.classes[c].get_mut(&t)?;
        let w = q.pop_front()?;
        if q.is_empty() {
            self.classes[c].remove(&t);
        }
        self.len -= 1;
        // Saturating: costs and corrections come from request bodies and engine reports.
        let c = self.counters.entry(t).or_insert(0);
        *c = c.saturating_add(i64::try_from(w.cost).unwrap_or(i64::MAX));
        Some(w)
    }

    /// Corrects a tenant's counter once the real token count is known.
    pub fn charge(&mut self, tenant: &str, delta: i64) {
        if let Some(c) = self.counters.get_mut(tenant) {
            *c = c.saturating_add(delta);
        }
    }

    /// Removes a request (its deadline passed).
    pub fn remove(&mut self, id: u64) -> Option<Waiter<T>> {
        for class in &mut self.classes {
            for (t, q) in class.iter_mut() {
                if let Some(pos) = q.iter().position(|w| w.id == id) {
                    let w = q.remove(pos);
                    let t = t.clone();
                    if q.is_empty() {
                        class.remove(&t);
                    }
                    self.len -= 1;
                    return w;
                }
            }
        }
        None
    }

    /// Sheds the newest request of the lowest class strictly below `class`.
    pub fn shed_below(&mut self, class: PriorityClass) -> Option<Waiter<T>> {
        for ci in (class_index(class) + 1..3).rev() {
            let newest = self.classes[ci].values().filter_map(|q| q.back()).max_by_key(|w| w.id).map(|w| w.id);
            if let Some(id) = newest {
                return self.remove(id);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PriorityClass::*;

    fn w(id: u64, class: PriorityClass, tenant: &str, cost: u64) -> Waiter<()> {
        Waiter { id, class, tenant: tenant.into(), cost, payload: () }
    }

    #[test]
    fn strict_priority_between_classes() {
        let mut q = FairQueue::default();
        q.push(w(1, Sheddable, "a", 1));
        q.push(w(2, Standard, "a", 1));
        q.push(w(3, Critical, "b", 1));
        let order: Vec<u64> = std::iter::from_fn(|| q.pop().map(|w| w.id)).collect();
        assert_eq!(order, [3, 2, 1]);
        assert!(q.is_empty());
    }

    #[test]
    fn vtc_alternates_tenants_by_tokens_not_requests() {
        let mut q = FairQueue::default();
        for i in 0..20 {
            q.push(w(i, Standard, "heavy", 100));
        }
        for i in 100..104 {
            q.push(w(i, Standard, "light", 100));
        }
        let first8: Vec<String> = (0..8).map(|_| q.pop().unwrap().tenant).collect();
        assert_eq!(first8.iter().filter(|t| *t == "light").count(), 4, "{first8:?}");
    }

    #[test]
    fn returning_tenant_banks_no_credit() {
        let mut q = FairQueue::default();
        for i in 0..10 {
            q.push(w(i, Standard, "heavy", 10));
        }
        for _ in 0..5 {
            q.pop();
        }
        assert_eq!(q.counter("heavy"), 50);
        q.push(w(50, Standard, "light", 10));
        assert_eq!(q.counter("light"), 50);
        q.charge("light", -5);
        assert_eq!(q.counter("light"), 45);
    }

    /// Found by `gateway/tests/proptest_qos.rs`: a huge cost or correction (an engine
    /// reporting absurd usage) overflowed the counter: a panic in debug builds, and in
    /// release a wrapped, very negative counter that put the tenant first for good.
    #[test]
    fn counters_saturate_instead_of_overflowing() {
        let mut q = FairQueue::default();
        q.push(w(1, Standard, "a", u64::MAX));
        q.pop();
        assert_eq!(q.counter("a"), i64::MAX);
        q.push(w(2, Standard, "a", 1));
        q.pop();
        q.charge("a", i64::MAX);
        assert_eq!(q.counter("a"), i64::MAX);
        q.charge("a", i64::MIN);
        q.charge("a", i64::MIN);
        assert_eq!(q.counter("a"), i64::MIN);
        assert_eq!(correction(u64::MAX, 10), i64::MAX - 10);
        assert_eq!(correction(0, u64::MAX), -i64::MAX);
        assert_eq!(correction(300, 256), 44);
    }

    #[test]
    fn shedding_takes_the_newest_lowest_class_and_remove_works() {
        let mut q = FairQueue::default();
        q.push(w(1, Sheddable, "a", 1));
        q.push(w(2, Sheddable, "b", 1));
        q.push(w(3, Standard, "a", 1));
        assert!(q.shed_below(Sheddable).is_none());
        assert_eq!(q.shed_below(Critical).unwrap().id, 2);
        assert_eq!(q.shed_below(Standard).unwrap().id, 1);
        assert!(q.shed_below(Standard).is_none());
        assert_eq!(q.remove(3).unwrap().id, 3);
        assert!(q.remove(3).is_none());
        assert_eq!(q.len(), 0);
        assert!(q.peek().is_none());
    }
}
