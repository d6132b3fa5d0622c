//! Label selectors: `key=value,key2=value2`, matching objects whose labels hold every pair.
//! Code that selects by a known label builds the selector with [`LabelSelector::label_eq`]
//! or [`LabelSelector::for_model`], which cannot fail: parsing a formatted string and
//! falling back to the empty selector on error would match every object (fail open).
use std::collections::BTreeMap;

use crate::{ApiError, ObjectName};

/// Label naming the model a replica serves.
pub const MODEL_LABEL: &str = "model";

/// A parsed equality-based label selector. The empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<(String, String)>);

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut pairs = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| ApiError::invalid("label_selector", format!("{part:?} is not of the form key=value")))?;
            if k.trim().is_empty() {
                return Err(ApiError::invalid("label_selector", format!("{part:?} has an empty key")));
            }
            pairs.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        Ok(LabelSelector(pairs))
    }

    /// The selector of objects whose label `key` is exactly `value` (taken verbatim: a `,`
    /// or `=` in it is part of the value, never another pair).
    pub fn label_eq(key: &str, value: &str) -> Self {
        LabelSelector(vec![(key.to_owned(), value.to_owned())])
    }

    /// The selector of the replicas of `model` (their [`MODEL_LABEL`]).
    pub fn for_model(model: &ObjectName) -> Self {
        LabelSelector::label_eq(MODEL_LABEL, model.as_str())
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    /// The value the selector requires of label `key` (its first equality on it), if any:
    /// every object it matches has it (stores index by it, e.g. [`MODEL_LABEL`]).
    pub fn value_of(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_all_pairs() {
        let labels = BTreeMap::from([("team".into(), "search".into()), ("tier".into(), "gold".into())]);
        assert!(LabelSelector::parse("").unwrap().matches(&labels));
        assert!(LabelSelector::parse("team=search").unwrap().matches(&labels));
        assert!(LabelSelector::parse("team=search, tier=gold").unwrap().matches(&labels));
        assert!(!LabelSelector::parse("team=ads").unwrap().matches(&labels));
        assert!(LabelSelector::parse("team").is_err());
        assert!(LabelSelector::parse("=x").is_err());
    }

    fn replica_of(model: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(MODEL_LABEL.to_owned(), model.to_owned()), ("tier".to_owned(), "gold".to_owned())])
    }

    #[test]
    fn a_model_selector_never_matches_another_models_replica() {
        let a: ObjectName = "a".parse().unwrap();
        let sel = LabelSelector::for_model(&a);
        assert!(sel.matches(&replica_of("a")));
        assert!(sel != LabelSelector::default(), "never the empty selector");
        // (replica's model, matches a selector for model `a`)
        let cases = [("b", false), ("a-1", false), ("A", false), ("", false), ("a,b", false), ("a", true)];
        for (model, want) in cases {
            assert_eq!(sel.matches(&replica_of(model)), want, "replica of {model:?}");
        }
        assert!(!sel.matches(&BTreeMap::new()), "an unlabelled object is no replica of a");
    }

    #[test]
    fn label_eq_takes_the_value_verbatim() {
        // What `parse(&format!(..)).unwrap_or_default()` turned into the match-all selector.
        for value in ["a,b", "x=y", " spaced ", ","] {
            let sel = LabelSelector::label_eq("model", value);
            assert!(sel.matches(&BTreeMap::from([("model".to_owned(), value.to_owned())])), "{value:?}");
            assert!(!sel.matches(&replica_of("b")), "{value:?} must not match model b");
        }
    }
}
