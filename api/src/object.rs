//! The stored form of an object and of a change event, as the state machine keeps them, and
//! their conversion to the wire types.
//!
//! The conversion to [`pb::Object`] is the one way a stored object reaches a client (Get,
//! List, Watch, and the Apply and Delete answers all go through it), so it is where secrets
//! are kept in: the status fields [`Kind::secret_status_fields`] names (a replica's engine
//! key) are removed there. The key itself stays in the stored object, so the leader that
//! builds the gateways' endpoint table after a leader change still has it.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{pb, Kind, ObjectName};

/// Key of an object in the store: kind and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectKey {
    pub kind: Kind,
    pub name: ObjectName,
}

impl ObjectKey {
    /// A key that sorts before every key of `kind` (its name is empty, which no object's
    /// is): the start of a range scan over one kind in a map ordered by key.
    pub fn first_of(kind: Kind) -> ObjectKey {
        ObjectKey { kind, name: ObjectName::before_all() }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

/// An object as the state machine stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredObject {
    pub key: ObjectKey,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub spec: serde_json::Value,
    pub status: serde_json::Value,
    pub revision: u64,
    pub create_revision: u64,
}

impl From<&StoredObject> for pb::Object {
    fn from(o: &StoredObject) -> pb::Object {
        pb::Object {
            kind: o.key.kind.to_string(),
            name: o.key.name.to_string(),
            labels: o.labels.clone().into_iter().collect(),
            spec_json: o.spec.to_string(),
            status_json: status_json(o.key.kind, &o.status),
            revision: o.revision,
            create_revision: o.create_revision,
            uid: o.uid.clone(),
        }
    }
}

/// The status as clients see it: without the kind's secret fields.
fn status_json(kind: Kind, status: &serde_json::Value) -> String {
    let secrets = kind.secret_status_fields();
    match status {
        serde_json::Value::Null => "{}".into(),
        serde_json::Value::Object(m) if secrets.iter().any(|f| m.contains_key(*f)) => {
            let mut m = m.clone();
            for f in secrets {
                m.remove(*f);
            }
            serde_json::Value::Object(m).to_string()
        }
        other => other.to_string(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventType {
    Put,
    Delete,
}

/// One change to one object, at one store revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatchEvent {
    pub revision: u64,
    pub event_type: EventType,
    pub object: StoredObject,
}

impl From<&WatchEvent> for pb::WatchEvent {
    fn from(e: &WatchEvent) -> pb::WatchEvent {
        pb::WatchEvent {
            r#type: match e.event_type {
                EventType::Put => pb::watch_event::Type::Put,
                EventType::Delete => pb::watch_event::Type::Delete,
            } as i32,
            object: Some((&e.object).into()),
            revision: e.revision,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(kind: Kind, status: serde_json::Value) -> StoredObject {
        StoredObject {
            key: ObjectKey { kind, name: "m-1".parse().unwrap() },
            uid: "u".into(),
            labels: BTreeMap::new(),
            spec: serde_json::json!({}),
            status,
            revision: 2,
            create_revision: 1,
        }
    }

    #[test]
    fn clients_never_see_a_replicas_engine_key() {
        let status = serde_json::json!({"phase": "Ready", "endpoint": "10.0.0.1:20000", "api_key": "s3cret", "gang_token": "t0ken"});
        let o = stored(Kind::Replica, status.clone());
        let wire = pb::Object::from(&o);
        assert!(!wire.status_json.contains("s3cret") && !wire.status_json.contains("api_key"), "{}", wire.status_json);
        assert!(
            !wire.status_json.contains("t0ken") && !wire.status_json.contains("gang_token"),
            "{}",
            wire.status_json
        );
        let seen: serde_json::Value = serde_json::from_str(&wire.status_json).unwrap();
        assert_eq!(seen, serde_json::json!({"phase": "Ready", "endpoint": "10.0.0.1:20000"}));
        assert_eq!(o.status, status, "the stored object keeps the key");
        let event = WatchEvent { revision: 2, event_type: EventType::Put, object: o };
        let wire = pb::WatchEvent::from(&event);
        assert!(!wire.object.unwrap().status_json.contains("s3cret"));
    }

    #[test]
    fn other_statuses_pass_unchanged() {
        let tenant = stored(Kind::Tenant, serde_json::json!({"api_key": "not a secret field of tenants"}));
        assert!(pb::Object::from(&tenant).status_json.contains("api_key"));
        assert_eq!(pb::Object::from(&stored(Kind::Replica, serde_json::Value::Null)).status_json, "{}");
        let plain = serde_json::json!({"phase": "Pending"});
        assert_eq!(pb::Object::from(&stored(Kind::Replica, plain.clone())).status_json, plain.to_string());
    }
}
