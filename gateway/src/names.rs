//! The names requests are routed by, each its own type so that a model's name cannot be
//! passed where an adapter's is meant:
//!
//! ```text
//! request body "model": ServedName ──EndpointSet::resolve──> ModelName (the base model:
//!                                                             routing, demand, holds)
//!                                                           + AdapterName (a LoRA adapter:
//!                                                             on-demand loads, usage, overlay)
//! ```
//!
//! The gateway does not validate names: engines and `--backend` flags may serve names that
//! are not `Model` object names (DNS labels), and a client may ask for anything (404). All
//! three are cheap to clone (`Arc<str>`), look up by `&str` in maps ([`Borrow<str>`]), and
//! read and write as plain strings (Display, Debug, FromStr, serde). Lookups
//! (`EndpointSet::resolve`, `Directory::model`, `Gateway::needs_hold`, ...) take `&str`:
//! a name being looked up is not yet known to be one or the other.

use std::borrow::Borrow;
use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        /// As the string (`"llama"`): messages quote names with `{:?}`.
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl $name {
            pub fn new(s: &str) -> Self {
                $name(Arc::from(s))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = Infallible;
            fn from_str(s: &str) -> Result<Self, Infallible> {
                Ok($name::new(s))
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name::new(s)
            }
        }

        impl From<&String> for $name {
            fn from(s: &String) -> Self {
                $name::new(s)
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                $name(Arc::from(s))
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                &*self.0 == *other
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d).map($name::from)
            }
        }
    };
}

name_type! {
    /// A base model's name: the `Model` object, the key of the endpoint table, the unit of
    /// routing strategies, demand reports and held requests.
    ModelName
}

name_type! {
    /// A LoRA adapter's name: the `Adapter` object, what engines list as loaded, the unit of
    /// on-demand loads, usage reports and the overlay.
    AdapterName
}

name_type! {
    /// What a request asks for in its `model` field: a base model's or an adapter's name
    /// (engines serve both in one namespace), until [`crate::table::EndpointSet::resolve`]
    /// tells which. The key of the QoS queues.
    ServedName
}

impl From<&ModelName> for ServedName {
    fn from(m: &ModelName) -> Self {
        ServedName(m.0.clone())
    }
}

impl From<&AdapterName> for ServedName {
    fn from(a: &AdapterName) -> Self {
        ServedName(a.0.clone())
    }
}

impl ServedName {
    /// This name as an adapter's, once resolving it found an adapter.
    pub fn as_adapter(&self) -> AdapterName {
        AdapterName(self.0.clone())
    }

    /// This name as a base model's, once resolving it found a model.
    pub fn as_model(&self) -> ModelName {
        ModelName(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn names_read_and_write_as_plain_strings() {
        let cases = ["llama-3-8b", "Sql_LoRA", "", "a/b:c"];
        for s in cases {
            let m: ModelName = s.parse().unwrap();
            let a: AdapterName = s.parse().unwrap();
            let n: ServedName = s.parse().unwrap();
            assert_eq!((m.to_string(), a.to_string(), n.to_string()), (s.into(), s.into(), s.into()));
            assert_eq!(format!("{m:?} {a:?} {n:?}"), format!("{s:?} {s:?} {s:?}"));
            assert_eq!((m.as_str(), a.as_ref(), n.as_str()), (s, s, s));
            assert!(m == s && a == *s && n == ServedName::from(s.to_string()));
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(json, serde_json::to_string(s).unwrap());
            assert_eq!(serde_json::from_str::<AdapterName>(&json).unwrap(), a);
        }
    }

    #[test]
    fn served_names_become_models_or_adapters_and_back() {
        let cases = [("llama", true), ("sql", false)];
        for (s, is_model) in cases {
            let n = ServedName::new(s);
            if is_model {
                let m = n.as_model();
                assert_eq!((m.as_str(), ServedName::from(&m)), (s, n));
            } else {
                let a = n.as_adapter();
                assert_eq!((a.as_str(), ServedName::from(&a)), (s, n));
            }
        }
    }

    #[test]
    fn maps_keyed_by_names_look_up_by_str() {
        let m: HashMap<ModelName, u32> = [(ModelName::new("a"), 1), (ModelName::new("b"), 2)].into_iter().collect();
        let cases = [("a", Some(1)), ("b", Some(2)), ("c", None)];
        for (k, want) in cases {
            assert_eq!(m.get(k).copied(), want, "{k}");
        }
        let mut v = vec![AdapterName::new("b"), AdapterName::new("a")];
        v.sort();
        assert_eq!(v, ["a", "b"].map(AdapterName::new));
    }
}
