//! The stored form of an object and of a change event, as the state machine keeps them, and
//! their conversion to the wire types.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{pb, Kind, ObjectName};

/// Key of an object in the store: kind and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectKey {
    pub kind: Kind,
    pub name: ObjectName,
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
            status_json: if o.status.is_null() { "{}".into() } else { o.status.to_string() },
            revision: o.revision,
            create_revision: o.create_revision,
            uid: o.uid.clone(),
        }
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
