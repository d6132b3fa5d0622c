//! The placement invariant, checked on the store's watch stream: at no revision is a GPU
//! bound to two replicas. Pure: feed it every replica event in revision order.

use std::collections::HashMap;

/// A replica's binding as its spec says (`node`, `gpus`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub node: String,
    pub gpus: Vec<u64>,
}

/// Replica bindings at the latest revision seen, and every violation found.
#[derive(Debug, Default)]
pub struct PlacementChecker {
    bound: HashMap<String, Binding>,
    pub events: u64,
    pub violations: Vec<String>,
}

impl PlacementChecker {
    /// A replica was written (`Some(binding)`, or `None` when it is not bound) or deleted
    /// (`None`) at `revision`.
    pub fn apply(&mut self, revision: u64, replica: &str, binding: Option<Binding>) {
        self.events += 1;
        match binding {
            Some(b) if !b.gpus.is_empty() => {
                for (other, ob) in &self.bound {
                    if other != replica && ob.node == b.node {
                        let shared: Vec<u64> = b.gpus.iter().filter(|g| ob.gpus.contains(g)).copied().collect();
                        if !shared.is_empty() {
                            self.violations.push(format!(
                                "revision {revision}: GPUs {shared:?} of node {} bound to both {replica} and {other}",
                                b.node
                            ));
                        }
                    }
                }
                self.bound.insert(replica.to_string(), b);
            }
            _ => {
                self.bound.remove(replica);
            }
        }
    }

    /// The binding in a replica object's spec JSON.
    pub fn binding_of(spec_json: &str) -> Option<Binding> {
        let v: serde_json::Value = serde_json::from_str(spec_json).ok()?;
        let node = v.get("node")?.as_str()?.to_string();
        let gpus = v.get("gpus")?.as_array()?.iter().filter_map(|g| g.as_u64()).collect();
        Some(Binding { node, gpus })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(node: &str, gpus: &[u64]) -> Option<Binding> {
        Some(Binding { node: node.into(), gpus: gpus.to_vec() })
    }

    #[test]
    fn a_gpu_bound_twice_is_a_violation_and_moves_are_not() {
        let mut c = PlacementChecker::default();
        c.apply(1, "r1", b("n1", &[0, 1]));
        c.apply(2, "r2", b("n1", &[2]));
        c.apply(3, "r3", b("n2", &[0]));
        c.apply(4, "r1", b("n1", &[3])); // r1 moved: its old GPUs are free
        c.apply(5, "r4", b("n1", &[0]));
        assert!(c.violations.is_empty(), "{:?}", c.violations);
        c.apply(6, "r5", b("n1", &[2, 5]));
        assert_eq!(c.violations.len(), 1);
        assert!(c.violations[0].contains("[2]") && c.violations[0].contains("r2"), "{:?}", c.violations);
        c.apply(7, "r2", None);
        c.apply(8, "r6", b("n1", &[2]));
        assert_eq!(c.violations.len(), 2, "r5 still holds GPU 2");
    }

    #[test]
    fn reads_the_binding_from_a_spec() {
        let s = r#"{"model":"demo","node":"n1","gpus":[0,3]}"#;
        assert_eq!(PlacementChecker::binding_of(s), b("n1", &[0, 3]));
        assert_eq!(PlacementChecker::binding_of(r#"{"model":"demo"}"#), None);
    }
}
