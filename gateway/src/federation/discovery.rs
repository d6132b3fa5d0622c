//! The member list: `ObjectService.List{kind: Cluster, stale: true}` on the federation
//! servers every `--cluster-list-interval-ms` (any server answers a stale read, a follower
//! cut off from its leader included), one server after another until one answers. Static
//! stability: a failed round changes nothing, the last list stays in force for as long as
//! no server answers (the federation is never on the request path). Each list replaces the
//! member table ([`Members::apply`]) and starts or stops the members' pollers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_api::pb;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use super::members::{ClusterInfo, ClusterName, MemberUrl};
use super::metrics::{ClusterLabels, ResultLabels};
use super::Federation;

/// Longest wait for one server's list.
const LIST_TIMEOUT: Duration = Duration::from_secs(3);

/// The members of a list of `Cluster` objects (pure): those with a `spec.gateway` that
/// parses; the others are named in the second vector with the reason.
pub fn members_of(objects: &[pb::Object]) -> (Vec<ClusterInfo>, Vec<(String, String)>) {
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for o in objects {
        let spec: serde_json::Value = serde_json::from_str(&o.spec_json).unwrap_or_default();
        let Some(gw) = spec.get("gateway").and_then(serde_json::Value::as_str) else {
            continue; // a Cluster without a gateway takes no traffic from here
        };
        match MemberUrl::parse(gw) {
            Ok(gateway) => out.push(ClusterInfo {
                name: ClusterName::new(&o.name),
                gateway,
                region: o.labels.get("region").cloned(),
            }),
            Err(e) => skipped.push((o.name.clone(), format!("spec.gateway {e}"))),
        }
    }
    (out, skipped)
}

/// Lists Clusters forever and keeps the member pollers in step with the list.
pub async fn run(fed: Arc<Federation>) {
    let servers = fed.cfg.servers.clone();
    let mut channels: Vec<Option<Channel>> = vec![None; servers.len()];
    let mut next = 0usize;
    let mut pollers: HashMap<ClusterName, JoinHandle<()>> = HashMap::new();
    let mut failing = false;
    let mut tick = tokio::time::interval(fed.cfg.list_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut listed = None;
        let mut errors = Vec::new();
        for i in 0..servers.len() {
            let at = (next + i) % servers.len();
            match list_once(&fed, &servers[at], &mut channels[at]).await {
                Ok(objects) => {
                    next = at;
                    listed = Some(objects);
                    break;
                }
                Err(e) => {
                    channels[at] = None;
                    errors.push(format!("{}: {e}", servers[at]));
                }
            }
        }
        let result = if listed.is_some() { "ok" } else { "error" };
        fed.metrics.cluster_lists.get_or_create(&ResultLabels { result: result.into() }).inc();
        let Some(objects) = listed else {
            if !failing {
                tracing::warn!(errors = ?errors, "no federation server answered the Cluster list; routing on the last list");
                failing = true;
            }
            continue;
        };
        if failing {
            tracing::info!("federation servers answer again");
            failing = false;
        }
        let (infos, skipped) = members_of(&objects);
        for (name, why) in skipped {
            tracing::warn!(cluster = %name, error = %why, "Cluster ignored");
        }
        fed.metrics.clusters.set(infos.len() as i64);
        let changes = fed.members.apply(infos);
        for name in &changes.removed {
            if let Some(h) = pollers.remove(name) {
                h.abort();
            }
            fed.metrics.forget(name.as_str());
            tracing::info!(cluster = %name, "member left (or changed)");
        }
        for m in changes.added {
            tracing::info!(cluster = %m.info.name, gateway = %m.info.gateway, region = ?m.info.region, "member joined");
            fed.metrics.member_up.get_or_create(&ClusterLabels { cluster: m.info.name.to_string() }).set(0);
            let h = tokio::spawn(super::poll::run(Arc::downgrade(&fed), m.clone()));
            pollers.insert(m.info.name.clone(), h);
        }
    }
}

async fn list_once(fed: &Federation, addr: &str, ch: &mut Option<Channel>) -> Result<Vec<pb::Object>, String> {
    let channel = match ch {
        Some(c) => c.clone(),
        None => {
            let c = tokio::time::timeout(LIST_TIMEOUT, crate::cluster::connect(addr, fed.cfg.base.tls.as_ref()))
                .await
                .map_err(|_| "connect timed out".to_string())??;
            *ch = Some(c.clone());
            c
        }
    };
    let mut client = pb::object_service_client::ObjectServiceClient::new(channel);
    let req =
        pb::ListRequest { kind: flotilla_api::Kind::Cluster.to_string(), label_selector: String::new(), stale: true };
    match tokio::time::timeout(LIST_TIMEOUT, client.list(req)).await {
        Err(_) => Err("list timed out".into()),
        Ok(Err(s)) => Err(format!("{}: {}", s.code(), s.message())),
        Ok(Ok(r)) => Ok(r.into_inner().objects),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(name: &str, spec: &str, region: Option<&str>) -> pb::Object {
        pb::Object {
            kind: "Cluster".into(),
            name: name.into(),
            labels: region.map(|r| [("region".to_string(), r.to_string())].into()).unwrap_or_default(),
            spec_json: spec.into(),
            ..Default::default()
        }
    }

    #[test]
    fn clusters_without_a_gateway_are_ignored_and_bad_ones_named() {
        let objects = [
            cluster("us-east", r#"{"servers":["10.0.0.1:7070"],"gateway":"http://10.0.0.9:8080"}"#, Some("us-east")),
            cluster("eu-west", r#"{"servers":["10.1.0.1:7070"]}"#, Some("eu-west")),
            cluster("ap", r#"{"servers":["10.2.0.1:7070"],"gateway":"ftp://x:1"}"#, None),
            cluster("odd", "not json", None),
        ];
        let (infos, skipped) = members_of(&objects);
        assert_eq!(infos.len(), 1);
        assert_eq!(infos[0].name.as_str(), "us-east");
        assert_eq!(infos[0].region.as_deref(), Some("us-east"));
        assert_eq!(infos[0].gateway.to_string(), "http://10.0.0.9:8080");
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].0 == "ap" && skipped[0].1.contains("spec.gateway"), "{skipped:?}");
    }
}
