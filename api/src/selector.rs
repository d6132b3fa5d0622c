//! Label selectors: `key=value,key2=value2`, matching objects whose labels hold every pair.
use std::collections::BTreeMap;

use crate::ApiError;

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

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|(k, v)| labels.get(k) == Some(v))
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
}
