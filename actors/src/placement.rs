//! Placement, pure: filter the nodes that can take a replica (Ready, not cordoned or
//! draining, enough free healthy GPUs of one allowed type), score them (bin-pack or spread),
//! and turn the bindings into few Raft transactions. Each transaction compares the revision
//! of every node and replica it writes, so a binding computed from stale state never
//! applies, and a GPU is never bound twice.
//!
//! ```text
//!  nodes + pending replicas --place()--> bindings --group by node--> Txn{compares, ops}*
//!                                      \-> unplaceable (reason) --> Txn{PutStatus reason}
//! ```
use std::collections::{BTreeMap, BTreeSet, HashMap};

use flotilla_api::spec::{NodeState, ReplicaPhase, ReplicaSpec, ReplicaStatus};
use flotilla_api::ObjectName;
use flotilla_storage::Command;

use crate::config::PlacementStrategy;
use crate::objects::{txn, NodeView, ReplicaView};

/// One node's free capacity, as placement consumes it.
struct Slot {
    schedulable: bool,
    /// Free healthy GPU indices by type, ascending.
    free: BTreeMap<String, Vec<u32>>,
    total_free: usize,
    /// Replicas per model on this node (for spread).
    per_model: HashMap<ObjectName, u32>,
}

/// Whether the scheduler may place new replicas on `n`.
pub fn schedulable(n: &NodeView) -> bool {
    n.status.state == NodeState::Ready && !n.spec.cordoned && !n.spec.draining
}

/// Free capacity of a set of nodes, consumed as replicas are placed.
pub struct Placer {
    slots: Vec<Slot>,
}

impl Placer {
    pub fn new(nodes: &[NodeView], replicas: &[ReplicaView]) -> Placer {
        let index: HashMap<&ObjectName, usize> = nodes.iter().enumerate().map(|(i, n)| (&n.name, i)).collect();
        let mut slots: Vec<Slot> = nodes
            .iter()
            .map(|n| {
                let mut free: BTreeMap<String, Vec<u32>> = BTreeMap::new();
                for g in n.status.free_gpus(&n.spec) {
                    free.entry(g.gpu_type.clone()).or_default().push(g.index);
                }
                free.values_mut().for_each(|v| v.sort_unstable());
                let total_free = free.values().map(Vec::len).sum();
                Slot { schedulable: schedulable(n), free, total_free, per_model: HashMap::new() }
            })
            .collect();
        for r in replicas {
            if let Some(i) = r.spec.node.as_ref().and_then(|n| index.get(n)) {
                *slots[*i].per_model.entry(r.spec.model.clone()).or_default() += 1;
            }
        }
        Placer { slots }
    }

    /// Picks a node (by index into the `nodes` given to [`Placer::new`]) and GPUs for `r`,
    /// and takes them; or says why no node fits.
    pub fn place(&mut self, r: &ReplicaSpec, strategy: PlacementStrategy) -> Result<(usize, Vec<u32>), String> {
        let n = r.gpus_needed as usize;
        let allowed = |t: &str| r.gpu_types.is_empty() || r.gpu_types.iter().any(|a| a == t);
        let mut best: Option<(usize, Option<String>, (i64, i64))> = None;
        for (i, s) in self.slots.iter().enumerate() {
            if !s.schedulable || s.total_free < n {
                continue;
            }
            let group = if n == 0 {
                None
            } else {
                // The allowed type with the fewest free GPUs that still fits (pack within a node).
                match s.free.iter().filter(|(t, v)| allowed(t) && v.len() >= n).min_by_key(|(_, v)| v.len()) {
                    Some((t, _)) => Some(t.clone()),
                    None => continue,
                }
            };
            let after = (s.total_free - n) as i64;
            let same = i64::from(s.per_model.get(&r.model).copied().unwrap_or(0));
            let score = match strategy {
                PlacementStrategy::BinPack => (after, same),
                PlacementStrategy::Spread => (same, -after),
            };
            if best.as_ref().is_none_or(|(_, _, b)| score < *b) {
                best = Some((i, group, score));
            }
        }
        let Some((i, group, _)) = best else { return Err(unplaceable_reason(r)) };
        let s = &mut self.slots[i];
        let gpus = match group {
            Some(t) => {
                let v = s.free.get_mut(&t).map(|v| v.drain(..n).collect()).unwrap_or_default();
                s.total_free -= n;
                v
            }
            None => Vec::new(),
        };
        *s.per_model.entry(r.model.clone()).or_default() += 1;
        Ok((i, gpus))
    }
}

/// "no node has 2 free GPUs of type H100-80GB" (types joined with " or ").
pub fn unplaceable_reason(r: &ReplicaSpec) -> String {
    let plural = if r.gpus_needed == 1 { "GPU" } else { "GPUs" };
    if r.gpu_types.is_empty() {
        if r.gpus_needed == 0 {
            return "no node is Ready and schedulable".into();
        }
        format!("no node has {} free {plural}", r.gpus_needed)
    } else {
        format!("no node has {} free {plural} of type {}", r.gpus_needed, r.gpu_types.join(" or "))
    }
}

/// What one scheduling round writes.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Binding transactions; each node appears in at most one of them.
    pub binds: Vec<Command>,
    /// Replicas bound by `binds`.
    pub bound: usize,
    /// A transaction recording why the others could not be placed (only changed reasons).
    pub reasons: Option<Command>,
    pub unplaceable: usize,
}

/// Places every Pending replica of `replicas` on `nodes`. `spread` names the models that
/// asked for spread placement; the others use `default`. Bigger replicas go first.
pub fn plan(
    nodes: &[NodeView],
    replicas: &[ReplicaView],
    default: PlacementStrategy,
    spread: &BTreeSet<ObjectName>,
    batch: usize,
) -> Plan {
    let mut placer = Placer::new(nodes, replicas);
    let mut pending: Vec<&ReplicaView> =
        replicas.iter().filter(|r| r.phase() == ReplicaPhase::Pending && r.spec.node.is_none()).collect();
    pending.sort_by_key(|r| (std::cmp::Reverse(r.spec.gpus_needed), r.create_revision));
    let mut by_node: BTreeMap<usize, Vec<(&ReplicaView, Vec<u32>)>> = BTreeMap::new();
    let mut reasons = Vec::new();
    let mut plan = Plan::default();
    for r in pending {
        let strategy = if spread.contains(&r.spec.model) { PlacementStrategy::Spread } else { default };
        match placer.place(&r.spec, strategy) {
            Ok((i, gpus)) => by_node.entry(i).or_default().push((r, gpus)),
            Err(reason) => {
                plan.unplaceable += 1;
                if r.status.reason != reason {
                    let status = ReplicaStatus { reason, ..r.status.clone() };
                    reasons.push((r.compare(), r.status_op(&status)));
                }
            }
        }
    }
    let (mut compares, mut ops, mut in_batch) = (Vec::new(), Vec::new(), 0usize);
    for (i, binds) in by_node {
        let node = &nodes[i];
        let mut status = node.status.clone();
        compares.push(node.compare());
        for (r, gpus) in binds {
            for g in &gpus {
                status.allocations.insert(*g, r.name.clone());
            }
            let spec = ReplicaSpec { node: Some(node.name.clone()), gpus, ..r.spec.clone() };
            let rstatus = ReplicaStatus { phase: ReplicaPhase::Scheduled, reason: String::new(), ..r.status.clone() };
            compares.push(r.compare());
            ops.push(r.put_op(&spec, &rstatus));
            in_batch += 1;
            plan.bound += 1;
        }
        ops.push(node.status_op(&status));
        if in_batch >= batch {
            plan.binds.extend(txn(std::mem::take(&mut compares), std::mem::take(&mut ops)));
            in_batch = 0;
        }
    }
    plan.binds.extend(txn(compares, ops));
    let (c, o): (Vec<_>, Vec<_>) = reasons.into_iter().unzip();
    plan.reasons = txn(c, o);
    plan
}

#[cfg(test)]
#[path = "placement_tests.rs"]
mod tests;
