//! Adapter ownership: an `Adapter` whose `spec.tenants` is set may be used only by those
//! tenants. Every path that names an adapter asks [`may_use`] first and treats a refusal as
//! an unknown name, so a tenant cannot tell another tenant's adapter from one that does
//! not exist:
//!
//! ```text
//! inference   resolve(name) ── refused ──> as unknown: 404 model_not_found (no hold,
//!                                          no EnsureLoaded, no usage, no scale-out)
//! /tokenize   target(name)  ── refused ──> as unknown: 404 model_not_found
//! /v1/models  listing       ── refused ──> not listed
//! ```
//!
//! With auth off (`--no-auth`) there is no tenant to check: every caller may use every
//! adapter, as every caller may use every model (`Tenant.models` is not applied either).
//! Pure; the gateway gathers the inputs in `Gateway::may_use`.

use std::sync::Arc;

/// Who may use an adapter, from its spec's `tenants`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Owners {
    /// `tenants` absent or empty: every tenant allowed the base model.
    #[default]
    Anyone,
    /// Only these tenants.
    Only(Arc<[String]>),
    /// `tenants` is present but unreadable: no tenant (fail closed).
    Nobody,
}

impl Owners {
    /// Reads `tenants` from an `Adapter` spec (JSON) leniently: absent, null or an empty
    /// list is [`Owners::Anyone`]; anything but a list of strings is [`Owners::Nobody`].
    pub fn of_spec(spec: &serde_json::Value) -> Owners {
        match spec.get("tenants") {
            None | Some(serde_json::Value::Null) => Owners::Anyone,
            Some(serde_json::Value::Array(a)) if a.is_empty() => Owners::Anyone,
            Some(serde_json::Value::Array(a)) => {
                let names: Option<Vec<String>> = a.iter().map(|v| v.as_str().map(str::to_string)).collect();
                names.map_or(Owners::Nobody, |n| Owners::Only(n.into()))
            }
            Some(_) => Owners::Nobody,
        }
    }
}

/// What the gateway knows of a requested name, for [`may_use`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Named<'a> {
    /// Not an adapter: a model, or nothing at all (other checks answer for it).
    NotAdapter,
    /// An `Adapter` object the gateway watches.
    Declared(&'a Owners),
    /// An engine serves it as an adapter, but the gateway knows no `Adapter` object of that
    /// name. `objects_listed` is false while the gateway watches `Adapter` objects and has
    /// not received their first list (after a start or a reconnect to fresh state): the
    /// object, with owners, may simply not have arrived yet.
    Undeclared { objects_listed: bool },
}

/// May `tenant` (None: auth is off) use the name? A refusal is answered as an unknown name.
pub fn may_use(tenant: Option<&str>, named: Named<'_>) -> bool {
    let Some(tenant) = tenant else { return true };
    match named {
        Named::NotAdapter => true,
        Named::Declared(Owners::Anyone) => true,
        Named::Declared(Owners::Only(names)) => names.iter().any(|n| n == tenant),
        Named::Declared(Owners::Nobody) => false,
        Named::Undeclared { objects_listed } => objects_listed,
    }
}

impl crate::state::Gateway {
    /// May `tenant` (None: auth is off) use `name`? Gathers what the gateway knows of the
    /// name for [`may_use`]: a name the endpoint table has as a model is not an adapter
    /// (models win, as in `EndpointSet::resolve`).
    pub fn may_use(&self, tenant: Option<&str>, name: &str) -> bool {
        if tenant.is_none() {
            return true;
        }
        let set = self.dir.endpoints();
        let adapters = self.dir.adapters();
        let named = if set.by_model.contains_key(name) {
            Named::NotAdapter
        } else if let Some(a) = adapters.get(name) {
            Named::Declared(&a.owners)
        } else if set.resolve(name).is_some_and(|r| r.adapter.is_some()) {
            Named::Undeclared { objects_listed: self.cfg.servers.is_empty() || self.dir.adapters_listed() }
        } else {
            Named::NotAdapter
        };
        may_use(tenant, named)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_tenants_may_use_an_owned_adapter() {
        let only = Owners::Only(vec!["a".to_string(), "b".to_string()].into());
        let cases: [(Option<&str>, Named, bool); 13] = [
            (None, Named::Declared(&only), true),
            (None, Named::Declared(&Owners::Nobody), true),
            (None, Named::Undeclared { objects_listed: false }, true),
            (Some("a"), Named::Declared(&only), true),
            (Some("b"), Named::Declared(&only), true),
            (Some("c"), Named::Declared(&only), false),
            (Some(""), Named::Declared(&only), false),
            (Some("a"), Named::Declared(&Owners::Anyone), true),
            (Some("a"), Named::Declared(&Owners::Nobody), false),
            (Some("a"), Named::NotAdapter, true),
            (Some("a"), Named::Undeclared { objects_listed: true }, true),
            (Some("a"), Named::Undeclared { objects_listed: false }, false),
            (Some("A"), Named::Declared(&only), false),
        ];
        for (tenant, named, want) in cases {
            assert_eq!(may_use(tenant, named), want, "{tenant:?} {named:?}");
        }
    }

    #[test]
    fn owners_are_read_from_the_spec_failing_closed() {
        let only = |n: &[&str]| Owners::Only(n.iter().map(|s| s.to_string()).collect::<Vec<_>>().into());
        let cases = [
            (serde_json::json!({"base_model": "m"}), Owners::Anyone),
            (serde_json::json!({"tenants": null}), Owners::Anyone),
            (serde_json::json!({"tenants": []}), Owners::Anyone),
            (serde_json::json!({"tenants": ["a", "b"]}), only(&["a", "b"])),
            (serde_json::json!({"tenants": ["a", 1]}), Owners::Nobody),
            (serde_json::json!({"tenants": "a"}), Owners::Nobody),
            (serde_json::json!({"tenants": {"a": 1}}), Owners::Nobody),
        ];
        for (spec, want) in cases {
            assert_eq!(Owners::of_spec(&spec), want, "{spec}");
        }
    }
}
