//! Placement of a multi-node replica (a gang, `spec.topology`): every member or none. Pure,
//! on the [`Placer`]'s free capacity. Each member goes on a schedulable node of its own with
//! `gpus_per_node` free healthy GPUs, all members on one GPU type; the nodes are chosen by the
//! gang's placement over the topology domains (the values of the node label `domain_label`;
//! a node without it is a domain of its own), as Ray's placement groups do:
//!
//! | placement | members go |
//! |---|---|
//! | pack | into the fewest domains: one if any has room, else the largest first |
//! | strict-pack | into one domain, or the gang stays Pending |
//! | spread | one per domain round-robin, sharing domains only when they are short |
//! | strict-spread | each into a domain of its own, or Pending |
//!
//! Within a domain, nodes are taken bin-pack (fewest free GPUs left after, then by name).
//! Rank 0, the head, is the first member chosen. When nothing fits, the reason names the
//! constraint that failed and counts the nodes.
use std::collections::BTreeMap;

use flotilla_api::spec::{GangPlacement, ReplicaSpec, Topology};

use crate::placement::{Placer, Unplaceable, UnplaceableCode};

/// Where a gang's members go, by rank: (index into the Placer's nodes, GPU indices there).
pub type GangBinding = Vec<(usize, Vec<u32>)>;

impl Placer {
    /// Picks nodes and GPUs for every member of `r` (shaped by `t`) and takes them all, or
    /// takes nothing and says why.
    pub fn place_gang(&mut self, r: &ReplicaSpec, t: &Topology) -> Result<GangBinding, Unplaceable> {
        let g = t.gpus_per_node as usize;
        for ty in self.gpu_types_for(r) {
            let domains = self.domains(&ty, g, &t.domain_label);
            if let Some(chosen) = choose(&domains, t.nodes as usize, t.placement) {
                let binding: GangBinding = chosen.iter().map(|&i| (i, self.slots[i].take(&ty, g))).collect();
                for &i in &chosen {
                    *self.slots[i].per_model.entry(r.model.clone()).or_default() += 1;
                }
                return Ok(binding);
            }
        }
        Err(self.why_not_gang(r, t))
    }

    /// The allowed GPU types any node has free, in name order.
    fn gpu_types_for(&self, r: &ReplicaSpec) -> Vec<String> {
        let mut types: Vec<String> = self
            .slots
            .iter()
            .flat_map(|s| s.free.keys())
            .filter(|t| r.gpu_types.is_empty() || r.gpu_types.contains(t))
            .cloned()
            .collect();
        types.sort();
        types.dedup();
        types
    }

    /// The schedulable nodes with `g` free GPUs of type `ty`, by domain (in name order),
    /// each domain's nodes bin-pack first.
    fn domains(&self, ty: &str, g: usize, label: &str) -> Vec<Vec<usize>> {
        let mut by: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, s) in self.slots.iter().enumerate() {
            if s.unschedulable.is_none() && s.free.get(ty).is_some_and(|v| v.len() >= g) {
                // A node without the label is a domain of its own; no label value holds NUL.
                let d = s.labels.get(label).cloned().unwrap_or_else(|| format!("\0{}", s.name));
                by.entry(d).or_default().push(i);
            }
        }
        let score = |i: &usize| (self.slots[*i].total_free - g, self.slots[*i].name.clone());
        by.into_values()
            .map(|mut v| {
                v.sort_by_key(score);
                v
            })
            .collect()
    }

    /// Why no set of nodes fits the gang `r`, against the capacity left now.
    pub fn why_not_gang(&self, r: &ReplicaSpec, t: &Topology) -> Unplaceable {
        let (n, g) = (t.nodes as usize, t.gpus_per_node as usize);
        if self.slots.len() < n {
            let message = format!(
                "a replica of {n} nodes cannot be placed: the cluster has {} node{}",
                self.slots.len(),
                if self.slots.len() == 1 { "" } else { "s" }
            );
            return Unplaceable { code: UnplaceableCode::GangTooLarge, message };
        }
        let of_type = if r.gpu_types.is_empty() {
            "of one type".to_owned()
        } else {
            format!("of type {}", r.gpu_types.join(" or "))
        };
        // The GPU type with the most fitting nodes, and how they spread over domains.
        let best = self
            .gpu_types_for(r)
            .into_iter()
            .map(|ty| self.domains(&ty, g, &t.domain_label))
            .max_by_key(|d| (d.iter().map(Vec::len).sum::<usize>(), d.len()))
            .unwrap_or_default();
        let fitting: usize = best.iter().map(Vec::len).sum();
        let free = if g == 1 { "1 free GPU".to_owned() } else { format!("{g} free GPUs") };
        if fitting < n {
            let mut parts = vec![format!("{fitting} {}", if fitting == 1 { "does" } else { "do" })];
            parts.extend(self.unschedulable_counts());
            let message = format!("no {n} nodes have {free} {of_type}: {}", parts.join(", "));
            return Unplaceable { code: UnplaceableCode::GangInsufficientNodes, message };
        }
        let label = &t.domain_label;
        let message = match t.placement {
            GangPlacement::StrictSpread => format!(
                "strict-spread needs {n} nodes with {free} {of_type} in {n} different {label} domains: \
                 they are in {}",
                best.len()
            ),
            _ => format!(
                "strict-pack needs {n} nodes with {free} {of_type} in one {label} domain: the most in one is {}",
                best.iter().map(Vec::len).max().unwrap_or(0)
            ),
        };
        Unplaceable { code: UnplaceableCode::GangDomains, message }
    }
}

/// `n` nodes from `domains` (each a list of node indices, best first) by `placement`, or None.
fn choose(domains: &[Vec<usize>], n: usize, placement: GangPlacement) -> Option<Vec<usize>> {
    let total: usize = domains.iter().map(Vec::len).sum();
    if total < n {
        return None;
    }
    // The tightest domain that holds them all (fewest fitting nodes, then name order).
    let one_domain = || domains.iter().filter(|d| d.len() >= n).min_by_key(|d| d.len()).map(|d| d[..n].to_vec());
    match placement {
        GangPlacement::StrictPack => one_domain(),
        GangPlacement::Pack => one_domain().or_else(|| {
            let mut by_size: Vec<&Vec<usize>> = domains.iter().collect();
            by_size.sort_by_key(|d| std::cmp::Reverse(d.len())); // stable: name order among equals
            Some(by_size.into_iter().flatten().copied().take(n).collect())
        }),
        GangPlacement::StrictSpread => (domains.len() >= n).then(|| domains.iter().take(n).map(|d| d[0]).collect()),
        GangPlacement::Spread => {
            let mut out = Vec::with_capacity(n);
            for k in 0.. {
                for d in domains {
                    if let Some(i) = d.get(k) {
                        out.push(*i);
                        if out.len() == n {
                            return Some(out);
                        }
                    }
                }
            }
            unreachable!("total >= n")
        }
    }
}

#[cfg(test)]
#[path = "gang_placement_tests.rs"]
mod tests;
