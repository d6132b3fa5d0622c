//! Pure mapping from an agent's engine report to the replica's stored status. Only changes
//! of phase, endpoint (with the engine's API key and certificate pin), reason, restart count,
//! or a 10 % step of download progress (with the bytes and rate as of that step) produce a
//! write; load figures stay in the leader's memory. The key is stored with the endpoint, in
//! Raft, so a new leader can give it to gateways before the agent's next heartbeat, or while
//! the agent is down; clients never see it (`flotilla_api::Kind::secret_status_fields`).
use std::collections::HashMap;

use flotilla_api::pb::EngineReport;
use flotilla_api::spec::{ReplicaPhase, ReplicaStatus};
use flotilla_api::ObjectName;
use flotilla_storage::{Command, TxnOp};

use crate::objects::{release, txn, NodeView, ReplicaView};

/// The one transaction a heartbeat causes: status changes of the node's replicas, Failed
/// replicas' GPUs freed, and Draining replicas the agent no longer runs deleted (GPUs
/// freed). `replicas` are the node's reported and Draining replicas; every write is fenced
/// by the revisions it was computed from.
pub fn heartbeat_txn(
    node: &NodeView,
    replicas: &[ReplicaView],
    reports: &HashMap<String, EngineReport>,
) -> Option<Command> {
    let (mut compares, mut ops) = (Vec::new(), Vec::new());
    let mut freed: Vec<&ObjectName> = Vec::new();
    for r in replicas.iter().filter(|r| r.spec.node.as_ref() == Some(&node.name)) {
        let report = reports.get(r.name.as_str());
        if r.phase() == ReplicaPhase::Draining {
            if report.is_none_or(|e| e.state == "stopped") {
                compares.push(r.compare());
                ops.push(TxnOp::Delete { key: r.key() });
                freed.push(&r.name);
            }
            continue;
        }
        let Some(next) = report.and_then(|e| next_status(&r.status, e)) else { continue };
        if next.phase == ReplicaPhase::Failed {
            freed.push(&r.name);
        }
        compares.push(r.compare());
        ops.push(r.status_op(&next));
    }
    let mut status = node.status.clone();
    if release(&mut status, &freed) {
        compares.push(node.compare());
        ops.push(node.status_op(&status));
    }
    txn(compares, ops)
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
        let cmd = heartbeat_txn(&w.get_node("a"), &w.replicas(), &reports).unwrap();
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
}
