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

use flotilla_api::spec::{GangMember, NodeState, NodeStatus, ReplicaPhase, ReplicaSpec, ReplicaStatus};
use flotilla_api::ObjectName;
use flotilla_storage::{Command, Compare, TxnOp};

use crate::config::PlacementStrategy;
use crate::gang_placement::GangBinding;
use crate::objects::{txn, NodeView, ReplicaView};

/// One node's free capacity, as placement consumes it.
pub(crate) struct Slot {
    /// Why placement may not use this node ("not Ready", "cordoned", "draining"), if it may not.
    pub(crate) unschedulable: Option<&'static str>,
    /// Free healthy GPU indices by type, ascending.
    pub(crate) free: BTreeMap<String, Vec<u32>>,
    pub(crate) total_free: usize,
    /// Replicas per model on this node (for spread).
    pub(crate) per_model: HashMap<ObjectName, u32>,
    /// The node's name and labels (topology domains of gangs).
    pub(crate) name: ObjectName,
    pub(crate) labels: BTreeMap<String, String>,
}

impl Slot {
    /// Takes `n` free GPUs of type `t` (the caller checked there are).
    pub(crate) fn take(&mut self, t: &str, n: usize) -> Vec<u32> {
        let v = self.free.get_mut(t).map(|v| v.drain(..n).collect()).unwrap_or_default();
        self.total_free -= n;
        v
    }
}

/// Whether the scheduler may place new replicas on `n`.
pub fn schedulable(n: &NodeView) -> bool {
    unschedulable(n).is_none()
}

/// Why the scheduler may not place new replicas on `n`, if it may not.
fn unschedulable(n: &NodeView) -> Option<&'static str> {
    if n.status.state != NodeState::Ready {
        Some("not Ready")
    } else if n.spec.cordoned {
        Some("cordoned")
    } else if n.spec.draining {
        Some("draining")
    } else {
        None
    }
}

/// Why a replica could not be placed: a stable code (a metric label, and for docs) and the
/// sentence written to its status, which counts the nodes by what ruled each out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaceable {
    pub code: UnplaceableCode,
    pub message: String,
}

/// The bounded set of reasons a replica stays Pending for placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UnplaceableCode {
    /// No node has joined the cluster.
    NoNodes,
    /// Every node is not Ready, cordoned or draining.
    NoSchedulableNode,
    /// A schedulable node has enough free GPUs, but none of an allowed type.
    GpuType,
    /// No schedulable node has enough free GPUs.
    InsufficientGpus,
    /// A multi-node replica needs more nodes than the cluster has.
    GangTooLarge,
    /// Fewer schedulable nodes than a gang's members have its GPUs free (of one type).
    GangInsufficientNodes,
    /// Enough nodes, but not in the topology domains the gang's placement asks for.
    GangDomains,
}

impl UnplaceableCode {
    pub const ALL: [UnplaceableCode; 7] = [
        UnplaceableCode::NoNodes,
        UnplaceableCode::NoSchedulableNode,
        UnplaceableCode::GpuType,
        UnplaceableCode::InsufficientGpus,
        UnplaceableCode::GangTooLarge,
        UnplaceableCode::GangInsufficientNodes,
        UnplaceableCode::GangDomains,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UnplaceableCode::NoNodes => "no_nodes",
            UnplaceableCode::NoSchedulableNode => "no_schedulable_node",
            UnplaceableCode::GpuType => "gpu_type",
            UnplaceableCode::InsufficientGpus => "insufficient_gpus",
            UnplaceableCode::GangTooLarge => "gang_too_large",
            UnplaceableCode::GangInsufficientNodes => "gang_insufficient_nodes",
            UnplaceableCode::GangDomains => "gang_domains",
        }
    }
}

/// A node's score for a replica, lowest best: (away from the other P/D role's domains,
/// then the strategy's two terms).
type Score = (i64, i64, i64);

/// Free capacity of a set of nodes, consumed as replicas are placed.
pub struct Placer {
    pub(crate) slots: Vec<Slot>,
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
                Slot {
                    unschedulable: unschedulable(n),
                    free,
                    total_free,
                    per_model: HashMap::new(),
                    name: n.name.clone(),
                    labels: n.labels.clone(),
                }
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
    pub fn place(&mut self, r: &ReplicaSpec, strategy: PlacementStrategy) -> Result<(usize, Vec<u32>), Unplaceable> {
        let n = r.gpus_needed as usize;
        let allowed = |t: &str| r.gpu_types.is_empty() || r.gpu_types.iter().any(|a| a == t);
        let near = self.sibling_domains(r);
        let mut best: Option<(usize, Option<String>, Score)> = None;
        for (i, s) in self.slots.iter().enumerate() {
            if s.unschedulable.is_some() || s.total_free < n {
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
            // a P/D member asked to colocate prefers the other role's domains first
            let away = match &near {
                Some((key, domains)) if !domains.is_empty() => {
                    i64::from(!s.labels.get(key.as_str()).is_some_and(|v| domains.contains(v)))
                }
                _ => 0,
            };
            let score = match strategy {
                PlacementStrategy::BinPack => (away, after, same),
                PlacementStrategy::Spread => (away, same, -after),
            };
            if best.as_ref().is_none_or(|(_, _, b)| score < *b) {
                best = Some((i, group, score));
            }
        }
        let Some((i, group, _)) = best else { return Err(self.why_not(r)) };
        let s = &mut self.slots[i];
        let gpus = match group {
            Some(t) => s.take(&t, n),
            None => Vec::new(),
        };
        *s.per_model.entry(r.model.clone()).or_default() += 1;
        Ok((i, gpus))
    }

    /// For a P/D member with `colocate`: the label key and the domains (its values) where
    /// the other role's member has replicas now.
    fn sibling_domains(&self, r: &ReplicaSpec) -> Option<(String, BTreeSet<String>)> {
        let k = r.kv_transfer.as_ref()?;
        let key = k.colocate.clone()?;
        let sibling: ObjectName = k.sibling(r.model.as_str())?.parse().ok()?;
        let domains = self
            .slots
            .iter()
            .filter(|s| s.per_model.get(&sibling).is_some_and(|n| *n > 0))
            .filter_map(|s| s.labels.get(&key).cloned())
            .collect();
        Some((key, domains))
    }

    /// Why no node fits `r`: [`unplaceable_reason`] followed by a count of the nodes by what
    /// ruled each out, e.g. "no node has 2 free GPUs of type A100: 3 have at most 1 free,
    /// 1 is cordoned", against the capacity left now.
    pub fn why_not(&self, r: &ReplicaSpec) -> Unplaceable {
        let n = r.gpus_needed as usize;
        let allowed = |t: &str| r.gpu_types.is_empty() || r.gpu_types.iter().any(|a| a == t);
        // Schedulable nodes: too few free GPUs; enough only of types not allowed; enough
        // only across types (a replica's GPUs share one type).
        let (mut short, mut other_type, mut split, mut most_free) = (0usize, 0usize, 0usize, 0usize);
        for s in self.slots.iter().filter(|s| s.unschedulable.is_none()) {
            let fits: Vec<usize> = s.free.iter().filter(|(t, _)| allowed(t)).map(|(_, v)| v.len()).collect();
            if s.free.values().any(|v| v.len() >= n) {
                other_type += 1;
            } else if fits.iter().sum::<usize>() >= n {
                split += 1;
            } else {
                short += 1;
                most_free = most_free.max(fits.iter().copied().max().unwrap_or(0));
            }
        }
        let plural = |k: usize, one: &str, many: &str| if k == 1 { one.to_string() } else { many.to_string() };
        let mut parts = Vec::new();
        if short > 0 {
            let some = if short == 1 || most_free == 0 { "" } else { "at most " };
            parts.push(format!("{short} {} {some}{most_free} free", plural(short, "has", "have")));
        }
        if other_type > 0 {
            parts.push(format!("{other_type} {} enough only of another type", plural(other_type, "has", "have")));
        }
        if split > 0 {
            parts.push(format!("{split} {} enough only across GPU types", plural(split, "has", "have")));
        }
        parts.extend(self.unschedulable_counts());
        let census = if self.slots.is_empty() { "the cluster has no nodes".to_string() } else { parts.join(", ") };
        let code = if self.slots.is_empty() {
            UnplaceableCode::NoNodes
        } else if short + other_type + split == 0 {
            UnplaceableCode::NoSchedulableNode
        } else if other_type > 0 {
            UnplaceableCode::GpuType
        } else {
            UnplaceableCode::InsufficientGpus
        };
        Unplaceable { code, message: format!("{}: {census}", unplaceable_reason(r)) }
    }
}

impl Placer {
    /// "1 is not Ready", "2 are cordoned", "1 is draining": the nodes placement may not use,
    /// counted by why, in that order (the end of every Pending reason's census).
    pub(crate) fn unschedulable_counts(&self) -> Vec<String> {
        ["not Ready", "cordoned", "draining"]
            .into_iter()
            .filter_map(|why| {
                let k = self.slots.iter().filter(|s| s.unschedulable == Some(why)).count();
                (k > 0).then(|| format!("{k} {} {why}", if k == 1 { "is" } else { "are" }))
            })
            .collect()
    }
}

/// "no node has 2 free GPUs of type H100-80GB" (types joined with " or "): the first half
/// of the reason a Pending replica shows (the second counts the nodes).
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
    /// The replicas `binds` binds.
    pub placed: Vec<ObjectName>,
    /// The replicas left Pending, with why.
    pub unplaced: Vec<(ObjectName, UnplaceableCode)>,
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
    // Biggest first: a gang's GPUs are its members' together.
    let size = |r: &ReplicaView| r.spec.gpus_needed * r.spec.topology.as_ref().map_or(1, |t| t.nodes);
    pending.sort_by_key(|r| (std::cmp::Reverse(size(r)), r.create_revision));
    let mut by_node: BTreeMap<usize, Vec<(&ReplicaView, Vec<u32>)>> = BTreeMap::new();
    let mut gangs: Vec<(&ReplicaView, GangBinding)> = Vec::new();
    let mut left = Vec::new();
    let mut plan = Plan::default();
    for r in pending {
        let strategy = if spread.contains(&r.spec.model) { PlacementStrategy::Spread } else { default };
        let placed = match &r.spec.topology {
            Some(t) => placer.place_gang(&r.spec, t).map(|b| gangs.push((r, b))),
            None => placer.place(&r.spec, strategy).map(|(i, gpus)| by_node.entry(i).or_default().push((r, gpus))),
        };
        if placed.is_err() {
            left.push(r);
        }
    }
    // Reasons count the capacity left after the whole round (not at each replica's turn), so
    // the next round, seeing these bindings applied, writes the same words and nothing more.
    let mut reasons = Vec::new();
    for r in left {
        let why = match &r.spec.topology {
            Some(t) => placer.why_not_gang(&r.spec, t),
            None => placer.why_not(&r.spec),
        };
        let Unplaceable { code, message: reason } = why;
        plan.unplaceable += 1;
        plan.unplaced.push((r.name.clone(), code));
        if r.status.reason != reason {
            let status = ReplicaStatus { reason, ..r.status.clone() };
            reasons.push((r.compare(), r.status_op(&status)));
        }
    }
    if !gangs.is_empty() {
        let bound = gang_txn(nodes, gangs, &mut by_node, &mut plan);
        plan.binds.extend(bound);
    }
    let (mut compares, mut ops, mut in_batch) = (Vec::new(), Vec::new(), 0usize);
    for (i, binds) in by_node {
        let node = &nodes[i];
        let mut status = node.status.clone();
        compares.push(node.compare());
        for (r, gpus) in binds {
            bind(r, &node.name, gpus, &mut status, &mut compares, &mut ops);
            in_batch += 1;
            plan.bound += 1;
            plan.placed.push(r.name.clone());
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

/// Binds `r` to `node`'s `gpus`: the allocations into `status`, the compare and the write of
/// the Scheduled replica.
fn bind(
    r: &ReplicaView,
    node: &ObjectName,
    gpus: Vec<u32>,
    status: &mut NodeStatus,
    compares: &mut Vec<Compare>,
    ops: &mut Vec<TxnOp>,
) {
    for g in &gpus {
        status.allocations.insert(*g, r.name.clone());
    }
    let spec = ReplicaSpec { node: Some(node.clone()), gpus, ..r.spec.clone() };
    let rstatus = ReplicaStatus { phase: ReplicaPhase::Scheduled, reason: String::new(), ..r.status.clone() };
    compares.push(r.compare());
    ops.push(r.put_op(&spec, &rstatus));
}

/// One transaction binding every gang of the round, with the one-node replicas placed on any
/// of the gangs' nodes (taken out of `by_node`, so no node is in two transactions): it compares
/// every node it touches, so a gang is bound whole or not at all.
fn gang_txn(
    nodes: &[NodeView],
    gangs: Vec<(&ReplicaView, GangBinding)>,
    by_node: &mut BTreeMap<usize, Vec<(&ReplicaView, Vec<u32>)>>,
    plan: &mut Plan,
) -> Option<Command> {
    let touched: BTreeSet<usize> = gangs.iter().flat_map(|(_, b)| b.iter().map(|(i, _)| *i)).collect();
    let mut statuses: BTreeMap<usize, NodeStatus> = touched.iter().map(|&i| (i, nodes[i].status.clone())).collect();
    let mut compares: Vec<Compare> = touched.iter().map(|&i| nodes[i].compare()).collect();
    let mut ops = Vec::new();
    for (r, binding) in gangs {
        let members: Vec<GangMember> =
            binding.iter().map(|(i, gpus)| GangMember { node: nodes[*i].name.clone(), gpus: gpus.clone() }).collect();
        for (i, gpus) in &binding {
            let status = statuses.get_mut(i).expect("a touched node");
            status.allocations.extend(gpus.iter().map(|g| (*g, r.name.clone())));
        }
        let head = members[0].clone();
        let spec = ReplicaSpec { node: Some(head.node), gpus: head.gpus, members, ..r.spec.clone() };
        let rstatus = ReplicaStatus { phase: ReplicaPhase::Scheduled, reason: String::new(), ..r.status.clone() };
        compares.push(r.compare());
        ops.push(r.put_op(&spec, &rstatus));
        plan.bound += 1;
        plan.placed.push(r.name.clone());
    }
    for (&i, status) in statuses.iter_mut() {
        for (r, gpus) in by_node.remove(&i).unwrap_or_default() {
            bind(r, &nodes[i].name, gpus, status, &mut compares, &mut ops);
            plan.bound += 1;
            plan.placed.push(r.name.clone());
        }
    }
    ops.extend(statuses.iter().map(|(&i, status)| nodes[i].status_op(status)));
    txn(compares, ops)
}

#[cfg(test)]
#[path = "placement_tests.rs"]
mod tests;
