//! Pure mapping from an agent's engine report to the replica's stored status. Only changes
//! of phase, endpoint (with the engine's API key and certificate pin), reason, restart count,
//! or a 10 % step of download progress (with the bytes and rate as of that step) produce a
//! write; load figures stay in the leader's memory. The key is stored with the endpoint, in
//! Raft, so a new leader can give it to gateways before the agent's next heartbeat, or while
//! the agent is down; clients never see it (`flotilla_api::Kind::secret_status_fields`).
use std::collections::{BTreeMap, HashMap};

use flotilla_api::pb::EngineReport;
use flotilla_api::spec::{ReplicaPhase, ReplicaStatus};
use flotilla_api::ObjectName;
use flotilla_storage::{Command, TxnOp};

use crate::objects::{release, txn, NodeView, ReplicaView};

/// The one transaction a heartbeat causes: status changes of the node's replicas, Failed
/// replicas' GPUs freed, and Draining replicas the agent no longer runs deleted (GPUs
/// freed). `replicas` are the node's reported and Draining replicas; every write is fenced
/// by the revisions it was computed from.
///
/// Multi-node replicas (gangs): the head's report (rank 0, `spec.node`) drives the phase and
/// carries the rendezvous address the workers need; a worker's report matters only when it
/// failed, which fails the gang. A Failed gang frees the GPUs of every member's node at once
/// (`others` holds the views of the other nodes the node's gangs bind, compared too). A
/// Draining gang frees each member's GPUs as that member's agent stops it, and is deleted by
/// the heartbeat that finds no other member's node still holding GPUs for it.
pub fn heartbeat_txn(
    node: &NodeView,
    replicas: &[ReplicaView],
    reports: &HashMap<String, EngineReport>,
    others: &HashMap<ObjectName, NodeView>,
) -> Option<Command> {
    let (mut compares, mut ops) = (Vec::new(), Vec::new());
    let mut freed: Vec<&ObjectName> = Vec::new();
    let mut freed_elsewhere: BTreeMap<&ObjectName, Vec<&ObjectName>> = BTreeMap::new();
    for r in replicas {
        let Some(rank) = r.rank_on(&node.name) else { continue };
        let bindings = r.spec.bindings();
        let elsewhere = || bindings.iter().map(|(n, _)| *n).filter(|n| **n != node.name);
        let report = reports.get(r.name.as_str());
        if r.phase() == ReplicaPhase::Draining {
            if report.is_none_or(|e| e.state == "stopped") {
                freed.push(&r.name);
                if r.held_elsewhere(&node.name, others).is_empty() {
                    compares.push(r.compare());
                    compares.extend(elsewhere().filter_map(|n| others.get(n)).map(NodeView::compare));
                    ops.push(TxnOp::Delete { key: r.key() });
                }
            }
            continue;
        }
        let Some(report) = report else { continue };
        let next = match (rank, r.spec.members.is_empty()) {
            (_, true) => next_status(&r.status, report),
            (0, false) => head_status(&r.status, report),
            (rank, false) => worker_status(&r.status, report, rank, &node.name),
        };
        let Some(next) = next else { continue };
        if next.phase == ReplicaPhase::Failed {
            freed.push(&r.name);
            for n in elsewhere() {
                freed_elsewhere.entry(n).or_default().push(&r.name);
            }
        }
        compares.push(r.compare());
        ops.push(r.status_op(&next));
    }
    let mut status = node.status.clone();
    if release(&mut status, &freed) {
        compares.push(node.compare());
        ops.push(node.status_op(&status));
    }
    for (n, names) in freed_elsewhere {
        let Some(view) = others.get(n) else { continue };
        let mut status = view.status.clone();
        if release(&mut status, &names) {
            compares.push(view.compare());
            ops.push(view.status_op(&status));
        }
    }
    txn(compares, ops)
}

/// A gang head's report: as a one-node replica's, plus the rendezvous address its agent
/// allocated (written when it changes; the workers' assignments follow it).
fn head_status(current: &ReplicaStatus, report: &EngineReport) -> Option<ReplicaStatus> {
    let mut next = next_status(current, report).unwrap_or_else(|| current.clone());
    let running = matches!(next.phase, ReplicaPhase::Scheduled | ReplicaPhase::Starting | ReplicaPhase::Ready);
    if running && !report.rendezvous.is_empty() {
        next.rendezvous = Some(report.rendezvous.clone());
        next.gang_token = Some(report.gang_token.clone()).filter(|t| !t.is_empty());
    }
    (next != *current).then_some(next)
}

/// A gang worker's report: only its end counts. A worker that exited (`crashed`, even one
/// its agent would restart) or gave up (`failed`) fails the whole gang: a restarted rank
/// cannot rejoin a running head, and vLLM's head neither notices a lost rank nor fails its
/// `/health` until a request times out (docs/real-vllm.md, "Multi-node"). The Model
/// controller replaces the gang whole. A worker that runs or waits changes nothing.
fn worker_status(
    current: &ReplicaStatus,
    report: &EngineReport,
    rank: usize,
    node: &ObjectName,
) -> Option<ReplicaStatus> {
    let what = match report.state.as_str() {
        "crashed" => "exited",
        "failed" => "failed",
        _ => return None,
    };
    let why = if report.reason.is_empty() { "engine failed" } else { &report.reason };
    let failed = EngineReport {
        state: "failed".into(),
        reason: format!("rank {rank} on node {node} {what}: {why}"),
        ..report.clone()
    };
    next_status(current, &failed)
}

/// The status `current` should move to after `report`, or `None` if nothing worth a Raft
/// write changed. Replicas that are not running by the controllers' intent (Pending,
/// Draining, Stopped) or already Failed ignore reports.
pub fn next_status(current: &ReplicaStatus, report: &EngineReport) -> Option<ReplicaStatus> {
    if !matches!(current.phase, ReplicaPhase::Scheduled | ReplicaPhase::Starting | ReplicaPhase::Ready) {
        return None;
    }
    let mut next = current.clone();
    next.restarts = report.restarts.max(current.restarts);
    match report.state.as_str() {
        "downloading" => {
            next.phase = ReplicaPhase::Starting;
            next.reason = String::new();
            let step = Some((report.download_progress.clamp(0.0, 1.0) * 10.0).floor() / 10.0);
            let bytes = (report.download_bytes > 0).then_some(report.download_bytes);
            // Bytes and rate ride along with each 10 % step (and the first report that has
            // them), so a download costs about ten writes however long it takes.
            if step != current.download_progress || (current.download_bytes.is_none() && bytes.is_some()) {
                next.download_bytes = bytes;
                next.download_total_bytes = (report.download_total_bytes > 0).then_some(report.download_total_bytes);
                next.download_bytes_per_second = (report.download_bytes_per_second.is_finite()
                    && report.download_bytes_per_second > 0.0)
                    .then_some(report.download_bytes_per_second);
            }
            next.download_progress = step;
        }
        "starting" => {
            next.phase = ReplicaPhase::Starting;
            next.reason = String::new();
            clear_download(&mut next);
        }
        "ready" if !report.endpoint.is_empty() => {
            next.phase = ReplicaPhase::Ready;
            next.reason = String::new();
            next.endpoint = Some(report.endpoint.clone());
            next.api_key = (!report.api_key.is_empty()).then(|| report.api_key.clone());
            next.engine_cert_sha256 =
                (!report.engine_cert_sha256.is_empty()).then(|| report.engine_cert_sha256.clone());
            clear_download(&mut next);
        }
        "ready" => {
            next.phase = ReplicaPhase::Starting;
            next.reason = "engine reports ready without an endpoint".into();
        }
        "crashed" => {
            next.phase = ReplicaPhase::Starting;
            next.reason = format!("engine crashed, restarting: {}", report.reason);
            next.endpoint = None;
            next.api_key = None;
            next.engine_cert_sha256 = None;
        }
        "failed" => {
            next.phase = ReplicaPhase::Failed;
            next.reason = if report.reason.is_empty() { "engine failed".into() } else { report.reason.clone() };
            next.endpoint = None;
            next.api_key = None;
            next.engine_cert_sha256 = None;
            clear_download(&mut next);
        }
        // "stopping" / "stopped" / unknown: the agent is acting on an older Assign.
        _ => return None,
    }
    (next != *current).then_some(next)
}

/// A replica past its download shows none.
fn clear_download(s: &mut ReplicaStatus) {
    s.download_progress = None;
    s.download_bytes = None;
    s.download_total_bytes = None;
    s.download_bytes_per_second = None;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(state: &str) -> EngineReport {
        EngineReport { replica: "m-1".into(), state: state.into(), ..Default::default() }
    }

    fn at(phase: ReplicaPhase) -> ReplicaStatus {
        ReplicaStatus { phase, ..Default::default() }
    }

    #[test]
    fn phases_follow_reports() {
        let s = next_status(&at(ReplicaPhase::Scheduled), &report("starting")).unwrap();
        assert_eq!(s.phase, ReplicaPhase::Starting);
        let mut r = report("ready");
        r.endpoint = "127.0.0.1:9000".into();
        let s = next_status(&s, &r).unwrap();
        assert_eq!((s.phase, s.endpoint.as_deref()), (ReplicaPhase::Ready, Some("127.0.0.1:9000")));
        assert_eq!(next_status(&s, &r), None, "a steady heartbeat writes nothing");
        let mut c = report("crashed");
        c.restarts = 1;
        c.reason = "exit status 1".into();
        let s = next_status(&s, &c).unwrap();
        assert_eq!((s.phase, s.restarts), (ReplicaPhase::Starting, 1));
        assert_eq!(s.reason, "engine crashed, restarting: exit status 1");
        let mut f = report("failed");
        f.reason = "crashed 5 times".into();
        let s = next_status(&s, &f).unwrap();
        assert_eq!((s.phase, s.reason.as_str()), (ReplicaPhase::Failed, "crashed 5 times"));
        assert_eq!(next_status(&s, &r), None, "failed is terminal");
    }

    #[test]
    fn the_engine_key_is_stored_with_the_endpoint_and_goes_with_it() {
        let mut r = report("ready");
        r.endpoint = "10.0.0.1:20000".into();
        r.api_key = "k1".into();
        let s = next_status(&at(ReplicaPhase::Starting), &r).unwrap();
        assert_eq!((s.endpoint.as_deref(), s.api_key.as_deref()), (Some("10.0.0.1:20000"), Some("k1")));
        r.api_key = "k2".into();
        let s = next_status(&s, &r).expect("a new key is a write");
        assert_eq!(s.api_key.as_deref(), Some("k2"));
        let crashed = next_status(&s, &report("crashed")).unwrap();
        assert_eq!((crashed.endpoint, crashed.api_key), (None, None));
        let failed = next_status(&s, &report("failed")).unwrap();
        assert_eq!((failed.endpoint, failed.api_key), (None, None));
        r.api_key.clear();
        let keyless = next_status(&at(ReplicaPhase::Starting), &r).unwrap();
        assert_eq!(keyless.api_key, None, "an engine started without a key (an older agent's)");
    }

    #[test]
    fn the_certificate_pin_is_stored_with_the_endpoint_and_goes_with_it() {
        let pin = "ab".repeat(32);
        let mut r = report("ready");
        r.endpoint = "10.0.0.1:20000".into();
        r.engine_cert_sha256 = pin.clone();
        let s = next_status(&at(ReplicaPhase::Starting), &r).unwrap();
        assert_eq!(s.engine_cert_sha256.as_deref(), Some(pin.as_str()));
        assert_eq!(next_status(&s, &r), None, "a steady pin writes nothing");
        r.engine_cert_sha256 = "cd".repeat(32);
        assert_eq!(next_status(&s, &r).expect("a new pin is a write").engine_cert_sha256, Some("cd".repeat(32)));
        assert_eq!(next_status(&s, &report("crashed")).unwrap().engine_cert_sha256, None);
        assert_eq!(next_status(&s, &report("failed")).unwrap().engine_cert_sha256, None);
        r.engine_cert_sha256.clear();
        assert_eq!(next_status(&s, &r).unwrap().engine_cert_sha256, None, "plain HTTP now");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["engine_cert_sha256"], pin.as_str(), "stored, and not a secret field");
        assert!(!flotilla_api::Kind::Replica.secret_status_fields().contains(&"engine_cert_sha256"));
    }

    #[test]
    fn heartbeat_deletes_stopped_draining_replicas_and_frees_failed_gpus() {
        use crate::testkit::World;
        let mut w = World::default();
        w.node("a", 4, "A");
        w.replica("m-1", "m", 1, ReplicaPhase::Draining, Some(("a", vec![0])));
        w.replica("m-2", "m", 1, ReplicaPhase::Draining, Some(("a", vec![1])));
        w.replica("m-3", "m", 1, ReplicaPhase::Ready, Some(("a", vec![2])));
        w.replica("m-4", "m", 1, ReplicaPhase::Scheduled, Some(("a", vec![3])));
        let mut reports = HashMap::new();
        reports.insert("m-2".to_string(), report("stopping"));
        let mut f = report("failed");
        f.reason = "download failed: sha256 mismatch".into();
        reports.insert("m-3".to_string(), f);
        let cmd = heartbeat_txn(&w.get_node("a"), &w.replicas(), &reports, &HashMap::new()).unwrap();
        w.apply_all(&[cmd]);
        let left: Vec<(String, ReplicaPhase)> = w.replicas().iter().map(|r| (r.name.to_string(), r.phase())).collect();
        assert_eq!(
            left,
            vec![
                ("m-2".into(), ReplicaPhase::Draining),
                ("m-3".into(), ReplicaPhase::Failed),
                ("m-4".into(), ReplicaPhase::Scheduled)
            ]
        );
        let alloc: Vec<u32> = w.get_node("a").status.allocations.keys().copied().collect();
        assert_eq!(alloc, vec![1, 3]);
        w.assert_consistent();
    }

    #[test]
    fn download_progress_is_written_in_steps_and_draining_ignores_reports() {
        let mut d = report("downloading");
        d.download_progress = 0.42;
        let s = next_status(&at(ReplicaPhase::Scheduled), &d).unwrap();
        assert_eq!(s.download_progress, Some(0.4));
        d.download_progress = 0.49;
        assert_eq!(next_status(&s, &d), None);
        assert_eq!(next_status(&at(ReplicaPhase::Draining), &report("ready")), None);
        // Bytes and rate are written with the next step, not with every report.
        d.download_bytes = 1 << 30;
        d.download_total_bytes = 3 << 30;
        d.download_bytes_per_second = 85e6;
        let s = next_status(&s, &d).unwrap();
        assert_eq!((s.download_bytes, s.download_total_bytes), (Some(1 << 30), Some(3 << 30)), "first bytes seen");
        d.download_bytes += 1 << 20;
        d.download_bytes_per_second = f64::NAN;
        assert_eq!(next_status(&s, &d), None, "same step: no write");
        d.download_progress = 0.51;
        let s = next_status(&s, &d).unwrap();
        assert_eq!((s.download_progress, s.download_bytes_per_second), (Some(0.5), None), "a rate that is no number");
        let mut started = report("starting");
        started.restarts = 0;
        let s = next_status(&s, &started).unwrap();
        assert_eq!((s.download_progress, s.download_bytes, s.download_total_bytes), (None, None, None));
        assert_eq!(next_status(&at(ReplicaPhase::Ready), &report("stopping")), None);
    }

    fn others(w: &crate::testkit::World, me: &str) -> HashMap<ObjectName, NodeView> {
        w.nodes().into_iter().filter(|n| n.name.as_str() != me).map(|n| (n.name.clone(), n)).collect()
    }

    #[test]
    fn a_gang_head_reports_its_rendezvous_and_readiness_for_the_gang() {
        use crate::testkit::World;
        let mut w = World::default();
        w.node("a", 2, "A");
        w.node("b", 2, "A");
        w.gang("g-1", "m", ReplicaPhase::Scheduled, &[("a", vec![0, 1]), ("b", vec![0, 1])]);
        let mut head = report("starting");
        head.replica = "g-1".into();
        head.rendezvous = "10.0.0.1:29500".into();
        head.gang_token = "ab".repeat(32);
        let reports = HashMap::from([("g-1".to_string(), head.clone())]);
        w.apply_all(&[heartbeat_txn(&w.get_node("a"), &w.replicas(), &reports, &others(&w, "a")).unwrap()]);
        let g = &w.replicas()[0];
        assert_eq!((g.phase(), g.status.rendezvous.as_deref()), (ReplicaPhase::Starting, Some("10.0.0.1:29500")));
        assert_eq!(g.status.gang_token, Some("ab".repeat(32)), "kept for the workers");
        assert_eq!(heartbeat_txn(&w.get_node("a"), &w.replicas(), &reports, &others(&w, "a")), None, "steady");
        // a worker that runs or waits for the head changes nothing
        let worker = HashMap::from([("g-1".to_string(), EngineReport { replica: "g-1".into(), ..report("starting") })]);
        assert_eq!(heartbeat_txn(&w.get_node("b"), &w.replicas(), &worker, &others(&w, "b")), None);
        head.state = "ready".into();
        head.endpoint = "10.0.0.1:20000".into();
        let reports = HashMap::from([("g-1".to_string(), head)]);
        w.apply_all(&[heartbeat_txn(&w.get_node("a"), &w.replicas(), &reports, &others(&w, "a")).unwrap()]);
        let g = &w.replicas()[0];
        assert_eq!((g.phase(), g.status.endpoint.as_deref()), (ReplicaPhase::Ready, Some("10.0.0.1:20000")));
        w.assert_consistent();
    }

    #[test]
    fn a_failed_worker_fails_the_gang_and_frees_every_members_gpus() {
        use crate::testkit::World;
        let mut w = World::default();
        for n in ["a", "b", "c"] {
            w.node(n, 1, "A");
        }
        w.gang("g-1", "m", ReplicaPhase::Ready, &[("a", vec![0]), ("b", vec![0]), ("c", vec![0])]);
        let mut f = report("failed");
        f.replica = "g-1".into();
        f.reason = "crashed 5 times".into();
        let reports = HashMap::from([("g-1".to_string(), f)]);
        w.apply_all(&[heartbeat_txn(&w.get_node("c"), &w.replicas(), &reports, &others(&w, "c")).unwrap()]);
        let g = &w.replicas()[0];
        assert_eq!(g.phase(), ReplicaPhase::Failed);
        assert_eq!(g.status.reason, "rank 2 on node c failed: crashed 5 times");
        assert_eq!(g.status.endpoint, None);
        assert!(w.nodes().iter().all(|n| n.status.allocations.is_empty()), "all members' GPUs freed at once");
        // a stale view of another member's node refuses the whole write
        let mut w2 = World::default();
        w2.node("a", 1, "A");
        w2.node("b", 1, "A");
        w2.gang("g-1", "m", ReplicaPhase::Ready, &[("a", vec![0]), ("b", vec![0])]);
        // an exited worker fails the gang too (a restarted rank cannot rejoin the head)
        let mut w3 = World::default();
        w3.node("a", 1, "A");
        w3.node("b", 1, "A");
        w3.gang("g-1", "m", ReplicaPhase::Ready, &[("a", vec![0]), ("b", vec![0])]);
        let mut c = report("crashed");
        c.replica = "g-1".into();
        c.reason = "exit status 1".into();
        let crashed = HashMap::from([("g-1".to_string(), c)]);
        w3.apply_all(&[heartbeat_txn(&w3.get_node("b"), &w3.replicas(), &crashed, &others(&w3, "b")).unwrap()]);
        let g = &w3.replicas()[0];
        assert_eq!(
            (g.phase(), g.status.reason.as_str()),
            (ReplicaPhase::Failed, "rank 1 on node b exited: exit status 1")
        );
        let stale = others(&w2, "b");
        w2.set_node("a", |spec, _| spec.cordoned = true);
        let cmd = heartbeat_txn(&w2.get_node("b"), &w2.replicas(), &reports, &stale).unwrap();
        assert!(!w2.apply_all_ok(&[cmd]), "compared against a's revision");
        assert_eq!(w2.replicas()[0].phase(), ReplicaPhase::Ready);
    }
}

#[cfg(test)]
#[path = "gang_lifecycle_tests.rs"]
mod gang_lifecycle_tests;
