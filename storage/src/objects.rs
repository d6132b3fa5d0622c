//! The state machine's objects by key, and a derived index of each kind's objects by the
//! value of their `model` label ([`MODEL_LABEL`]), so that `list` with a selector naming a
//! model (a model's replicas: [`LabelSelector::for_model`]) visits that model's objects
//! only, not every object of the kind.
//!
//! ```text
//!  map:      ObjectKey ──> Arc<StoredObject>       (the data; snapshots carry it as a list)
//!  by_model: Kind ──> model label value ──> {ObjectKey}   (derived, never serialized)
//! ```
//!
//! The index is kept by [`Objects::insert`] and [`Objects::remove`], the only ways to
//! change the map, and rebuilt by [`FromIterator`], the only way to build one (loading a
//! snapshot or the legacy tree, installing a snapshot): it cannot drift from the map.
//!
//! Objects are kept behind `Arc` so that a reader listing many of them (the scheduler
//! reads every replica each round) copies pointers under the state machine's read lock,
//! not objects, and parses them after releasing it ([`Objects::list_shared`]).
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use flotilla_api::selector::MODEL_LABEL;
use flotilla_api::{Kind, LabelSelector, ObjectKey, StoredObject};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Objects by key, indexed by kind and model label. Equality is the map's: the index is
/// derived from it.
#[derive(Clone, Default)]
pub(crate) struct Objects {
    map: BTreeMap<ObjectKey, Arc<StoredObject>>,
    by_model: BTreeMap<Kind, BTreeMap<String, BTreeSet<ObjectKey>>>,
}

impl Objects {
    pub(crate) fn get(&self, key: &ObjectKey) -> Option<&StoredObject> {
        self.map.get(key).map(|o| &**o)
    }

    pub(crate) fn contains_key(&self, key: &ObjectKey) -> bool {
        self.map.contains_key(key)
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &StoredObject> {
        self.map.values().map(|o| &**o)
    }

    /// Inserts or replaces `object` (under its own key); returns the one it replaced.
    pub(crate) fn insert(&mut self, object: StoredObject) -> Option<Arc<StoredObject>> {
        self.index(&object);
        let old = self.map.insert(object.key.clone(), Arc::new(object));
        if let Some(old) = &old {
            if old.labels.get(MODEL_LABEL) != self.map[&old.key].labels.get(MODEL_LABEL) {
                self.unindex(old);
            }
        }
        old
    }

    pub(crate) fn remove(&mut self, key: &ObjectKey) -> Option<Arc<StoredObject>> {
        let old = self.map.remove(key)?;
        self.unindex(&old);
        Some(old)
    }

    /// The objects of `kind` that `selector` matches, in key order. A selector with an
    /// equality on [`MODEL_LABEL`] visits that model's objects only.
    pub(crate) fn list(&self, kind: Kind, selector: &LabelSelector) -> Vec<StoredObject> {
        self.matching(kind, selector).map(|o| (**o).clone()).collect()
    }

    /// [`Objects::list`], sharing the objects instead of copying them.
    pub(crate) fn list_shared(&self, kind: Kind, selector: &LabelSelector) -> Vec<Arc<StoredObject>> {
        self.matching(kind, selector).cloned().collect()
    }

    fn matching<'a>(
        &'a self,
        kind: Kind,
        selector: &'a LabelSelector,
    ) -> Box<dyn Iterator<Item = &'a Arc<StoredObject>> + 'a> {
        let matches = |o: &&Arc<StoredObject>| selector.matches(&o.labels);
        if let Some(model) = selector.value_of(MODEL_LABEL) {
            let keys = self.by_model.get(&kind).and_then(|m| m.get(model)).into_iter().flatten();
            return Box::new(keys.filter_map(|k| self.map.get(k)).filter(matches));
        }
        // keys order by kind first: visit that kind's objects only, not every object
        Box::new(
            self.map
                .range(ObjectKey::first_of(kind)..)
                .map(|(_, o)| o)
                .take_while(move |o| o.key.kind == kind)
                .filter(matches),
        )
    }

    fn index(&mut self, o: &StoredObject) {
        if let Some(m) = o.labels.get(MODEL_LABEL) {
            self.by_model.entry(o.key.kind).or_default().entry(m.clone()).or_default().insert(o.key.clone());
        }
    }

    fn unindex(&mut self, o: &StoredObject) {
        let Some(m) = o.labels.get(MODEL_LABEL) else { return };
        let Some(by) = self.by_model.get_mut(&o.key.kind) else { return };
        if let Some(keys) = by.get_mut(m.as_str()) {
            keys.remove(&o.key);
            if keys.is_empty() {
                by.remove(m.as_str());
            }
        }
        if by.is_empty() {
            self.by_model.remove(&o.key.kind);
        }
    }

    /// Whether the index is exactly the one rebuilt from the map.
    #[cfg(test)]
    pub(crate) fn index_is_derived(&self) -> bool {
        let rebuilt: Objects = self.values().cloned().collect();
        rebuilt.by_model == self.by_model
    }
}

impl FromIterator<StoredObject> for Objects {
    fn from_iter<I: IntoIterator<Item = StoredObject>>(iter: I) -> Objects {
        let mut objects = Objects::default();
        for o in iter {
            objects.insert(o);
        }
        objects
    }
}

impl PartialEq for Objects {
    fn eq(&self, other: &Objects) -> bool {
        self.map == other.map
    }
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.map.fmt(f)
    }
}

/// JSON maps need string keys; objects carry their key, so they travel as a list (the
/// snapshot format), and the index is rebuilt on the way in.
impl Serialize for Objects {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.values())
    }
}

impl<'de> Deserialize<'de> for Objects {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Objects, D::Error> {
        Ok(Vec::<StoredObject>::deserialize(d)?.into_iter().collect())
    }
}
