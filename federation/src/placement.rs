//! How many replicas of a FederatedModel each member cluster runs. Pure: the controller
//! gives the selected clusters, what it knows of each (available or not, how many replicas
//! it can take) and the policy; [`spread`] answers with a count per cluster and what could
//! not be placed.
//!
//! The rule (docs/federation.md, "Placement"):
//! 1. Only *available* clusters take replicas: reachable, or unreachable for less than the
//!    grace (a short partition moves nothing). A cluster's limit is its `max`, lowered to
//!    what it can take when it has left replicas Pending past the grace.
//! 2. The total is split by weight (largest remainder; a cluster not named weighs 1). A share
//!    below a cluster's `min` is raised to it, one above its limit lowered to it, and the rest
//!    is split again among the others, until no bound is crossed.
//! 3. What is left (every weighted cluster full, or all weights 0) goes to the `spillover`
//!    clusters in order, then to any other available cluster by name, up to their limits.
//! 4. Whatever still has no room is *unplaced* and reported.
//!
//! Ties in the largest-remainder split go to the cluster earlier in `spillover`, then by
//! name, so the answer is a function of its inputs alone.
use std::collections::BTreeMap;

/// What the controller knows of one selected cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    /// Reachable, or unreachable for less than the grace.
    pub available: bool,
    /// At most this many (its Pending replicas past the grace say it cannot take more);
    /// None: no limit seen.
    pub capacity: Option<u32>,
}

/// The policy's numbers for [`spread`] (from `spec.placement`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub weights: BTreeMap<String, u32>,
    pub min: BTreeMap<String, u32>,
    pub max: BTreeMap<String, u32>,
    pub spillover: Vec<String>,
}

/// [`spread`]'s answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spread {
    /// Replicas per available cluster (unavailable ones are absent: they keep whatever they
    /// run until they are reachable again).
    pub counts: BTreeMap<String, u32>,
    /// Replicas no available cluster had room for.
    pub unplaced: u32,
}

/// Spreads `total` replicas over `clusters` by `policy` (the module doc's rule).
pub fn spread(total: u32, clusters: &[Candidate], policy: &Policy) -> Spread {
    let mut rank: Vec<&Candidate> = clusters.iter().filter(|c| c.available).collect();
    rank.sort_by_key(|c| (tie_rank(policy, &c.name), c.name.clone()));
    let limit = |c: &Candidate| {
        let max = policy.max.get(&c.name).copied().unwrap_or(u32::MAX);
        c.capacity.map_or(max, |cap| cap.min(max))
    };
    let weight = |c: &Candidate| policy.weights.get(&c.name).copied().unwrap_or(1);
    let floor = |c: &Candidate| policy.min.get(&c.name).copied().unwrap_or(0).min(limit(c));

    // 2. weighted split, pinning clusters whose share crosses a bound
    let mut pinned: BTreeMap<&str, u32> = BTreeMap::new();
    let mut shares: BTreeMap<&str, u32>;
    loop {
        let free: Vec<&Candidate> = rank.iter().copied().filter(|c| !pinned.contains_key(c.name.as_str())).collect();
        let left = total.saturating_sub(pinned.values().sum());
        shares = largest_remainder(left, &free.iter().map(|c| (c.name.as_str(), weight(c))).collect::<Vec<_>>());
        let mut crossed = false;
        for c in &free {
            let got = shares.get(c.name.as_str()).copied().unwrap_or(0);
            let bound = if got < floor(c) {
                Some(floor(c))
            } else if got > limit(c) {
                Some(limit(c))
            } else {
                None
            };
            if let Some(b) = bound {
                pinned.insert(c.name.as_str(), b);
                crossed = true;
            }
        }
        if !crossed {
            break;
        }
    }
    let mut counts: BTreeMap<String, u32> = rank.iter().map(|c| (c.name.clone(), 0)).collect();
    for (name, n) in pinned.iter().chain(shares.iter()) {
        *counts.get_mut(*name).expect("a ranked cluster") = *n;
    }
    // Pinning floors can overshoot the total when the floors alone exceed it (validated
    // against, but unavailable clusters change the sums): trim from the back of the rank.
    let mut placed: u32 = counts.values().sum();
    for c in rank.iter().rev() {
        while placed > total && counts[&c.name] > 0 {
            *counts.get_mut(&c.name).expect("ranked") -= 1;
            placed -= 1;
        }
    }

    // 3. spillover: in its order, then the rest by name
    let mut order: Vec<&Candidate> = Vec::new();
    for name in &policy.spillover {
        order.extend(rank.iter().copied().filter(|c| &c.name == name));
    }
    let mut rest: Vec<&Candidate> = rank.iter().copied().filter(|c| !policy.spillover.contains(&c.name)).collect();
    rest.sort_by(|a, b| a.name.cmp(&b.name));
    order.extend(rest);
    let mut left = total - placed;
    for c in order {
        let room = limit(c).saturating_sub(counts[&c.name]);
        let take = room.min(left);
        *counts.get_mut(&c.name).expect("ranked") += take;
        left -= take;
    }
    Spread { counts, unplaced: left }
}

/// Where `name` stands among ties: its position in `spillover`, or after all of them.
fn tie_rank(policy: &Policy, name: &str) -> usize {
    policy.spillover.iter().position(|s| s == name).unwrap_or(policy.spillover.len())
}

/// `total` split in proportion to the weights (Hamilton's method): each gets the whole part
/// of its quota, and the remainders in order of their fractional parts (ties by the order
/// given). All weights 0: nothing is split.
fn largest_remainder<'a>(total: u32, weights: &[(&'a str, u32)]) -> BTreeMap<&'a str, u32> {
    let sum: u64 = weights.iter().map(|(_, w)| u64::from(*w)).sum();
    let mut out: BTreeMap<&str, u32> = weights.iter().map(|(n, _)| (*n, 0)).collect();
    if sum == 0 || total == 0 {
        return out;
    }
    let mut fractions: Vec<(u64, usize)> = Vec::new();
    let mut given: u64 = 0;
    for (i, (name, w)) in weights.iter().enumerate() {
        let quota = u64::from(total) * u64::from(*w);
        let whole = quota / sum;
        given += whole;
        out.insert(name, whole as u32);
        fractions.push((quota % sum, i));
    }
    // largest fraction first; equal fractions keep the given order
    fractions.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    // every fraction is below `sum`, so the leftover is fewer than the non-zero fractions
    for (_, i) in fractions.into_iter().take((u64::from(total) - given) as usize) {
        *out.get_mut(weights[i].0).expect("named") += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn up(names: &[&str]) -> Vec<Candidate> {
        names.iter().map(|n| Candidate { name: n.to_string(), available: true, capacity: None }).collect()
    }

    fn map(pairs: &[(&str, u32)]) -> BTreeMap<String, u32> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn policy(weights: &[(&str, u32)]) -> Policy {
        Policy { weights: map(weights), ..Policy::default() }
    }

    #[test]
    fn weights_split_the_total_in_proportion() {
        let s = spread(6, &up(&["a", "b", "c"]), &policy(&[("a", 3), ("b", 2), ("c", 1)]));
        assert_eq!(s, Spread { counts: map(&[("a", 3), ("b", 2), ("c", 1)]), unplaced: 0 });
        // 7 by 3/2/1: quotas 3.5, 2.33, 1.17 → the largest remainder (a) takes the 7th
        assert_eq!(spread(7, &up(&["a", "b", "c"]), &policy(&[("a", 3), ("b", 2), ("c", 1)])).counts["a"], 4);
        // unnamed clusters weigh 1
        assert_eq!(spread(4, &up(&["a", "b"]), &Policy::default()).counts, map(&[("a", 2), ("b", 2)]));
    }

    #[test]
    fn an_unavailable_clusters_share_goes_to_the_others() {
        let mut c = up(&["a", "b", "c"]);
        c[2].available = false;
        let s = spread(6, &c, &policy(&[("a", 3), ("b", 2), ("c", 1)]));
        assert_eq!(s.counts, map(&[("a", 4), ("b", 2)]), "c is absent, its share re-split 3:2");
        assert_eq!(s.unplaced, 0);
    }

    #[test]
    fn bounds_pin_a_share_and_the_rest_is_split_again() {
        let p = Policy {
            weights: map(&[("a", 3), ("b", 2), ("c", 1)]),
            min: map(&[("c", 2)]),
            max: map(&[("a", 2)]),
            ..Policy::default()
        };
        let s = spread(6, &up(&["a", "b", "c"]), &p);
        assert_eq!(s.counts, map(&[("a", 2), ("b", 2), ("c", 2)]), "a capped, c floored; b takes the rest");
        // min = max fixes a count outside the weights
        let p = Policy { min: map(&[("c", 1)]), max: map(&[("c", 1)]), ..policy(&[("a", 1), ("b", 1)]) };
        assert_eq!(spread(5, &up(&["a", "b", "c"]), &p).counts, map(&[("a", 2), ("b", 2), ("c", 1)]));
    }

    #[test]
    fn what_weighted_clusters_cannot_take_spills_over_in_order_then_is_unplaced() {
        let mut c = up(&["a", "b", "c"]);
        c[0].capacity = Some(1); // a's replicas stay Pending beyond 1
        let p = Policy {
            weights: map(&[("a", 1), ("b", 0), ("c", 0)]),
            max: map(&[("c", 2)]),
            spillover: vec!["c".into(), "b".into()],
            ..Policy::default()
        };
        let s = spread(5, &c, &p);
        assert_eq!(s.counts, map(&[("a", 1), ("b", 2), ("c", 2)]), "c first up to its max, then b");
        assert_eq!(s.unplaced, 0);
        let p = Policy { max: map(&[("b", 1), ("c", 1)]), ..p };
        assert_eq!(spread(5, &c, &p), Spread { counts: map(&[("a", 1), ("b", 1), ("c", 1)]), unplaced: 2 });
        assert_eq!(spread(3, &[], &Policy::default()), Spread { counts: BTreeMap::new(), unplaced: 3 });
    }

    proptest! {
        /// Whatever the inputs: counts only for available clusters, never above a limit,
        /// and placed + unplaced = the total.
        #[test]
        fn spread_places_everything_within_bounds(
            total in 0u32..40,
            avail in proptest::collection::vec(any::<bool>(), 1..6),
            weights in proptest::collection::vec(0u32..5, 6),
            maxes in proptest::collection::vec(proptest::option::of(0u32..8), 6),
            mins in proptest::collection::vec(0u32..3, 6),
            caps in proptest::collection::vec(proptest::option::of(0u32..8), 6),
        ) {
            let names = ["a", "b", "c", "d", "e", "f"];
            let clusters: Vec<Candidate> = avail.iter().enumerate().map(|(i, a)| Candidate {
                name: names[i].into(), available: *a, capacity: caps[i],
            }).collect();
            let mut p = Policy::default();
            for (i, c) in clusters.iter().enumerate() {
                p.weights.insert(c.name.clone(), weights[i]);
                if let Some(m) = maxes[i] { p.max.insert(c.name.clone(), m); }
                p.min.insert(c.name.clone(), mins[i].min(maxes[i].unwrap_or(u32::MAX)));
            }
            let s = spread(total, &clusters, &p);
            prop_assert_eq!(s.counts.values().sum::<u32>() + s.unplaced, total);
            for c in &clusters {
                match s.counts.get(&c.name) {
                    None => prop_assert!(!c.available),
                    Some(n) => {
                        prop_assert!(c.available);
                        prop_assert!(*n <= p.max.get(&c.name).copied().unwrap_or(u32::MAX));
                        prop_assert!(*n <= c.capacity.unwrap_or(u32::MAX));
                    }
                }
            }
            // nothing is unplaced while an available cluster has room
            if s.unplaced > 0 {
                for c in clusters.iter().filter(|c| c.available) {
                    let lim = p.max.get(&c.name).copied().unwrap_or(u32::MAX).min(c.capacity.unwrap_or(u32::MAX));
                    prop_assert_eq!(s.counts[&c.name], lim);
                }
            }
        }
    }
}
