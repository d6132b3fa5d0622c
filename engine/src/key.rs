//! [`EngineKey`]: the API key an engine requires on its OpenAI API, which the agent generates
//! for each engine it starts (vLLM reads it from `VLLM_API_KEY`, the sim mirrors that) and
//! which gateways and the agent send as `Authorization: Bearer KEY`. vLLM's check (its
//! `AuthenticationMiddleware`) guards only the paths [`guarded`] names; `/health` and
//! `/metrics` stay open, so probes and scrapes need no key.
//!
//! The key is a secret: its `Debug` form hides it, and its header value is marked sensitive
//! (not written by HTTP debug logs, not indexed by HPACK).

use std::fmt;
use std::sync::Arc;

use http::HeaderValue;

/// Path prefixes vLLM's `--api-key` protects (`GUARDED_PREFIX` in
/// `vllm/entrypoints/serve/middleware/authenticate.py`; a plain string prefix, so `/v1x` is
/// guarded too).
pub const GUARDED_PREFIXES: [&str; 4] = ["/v1", "/v2", "/inference", "/cohere"];

/// Whether an engine with a key requires it on `path`.
pub fn guarded(path: &str) -> bool {
    GUARDED_PREFIXES.iter().any(|p| path.starts_with(p))
}

/// An engine's API key: non-empty visible ASCII (so it always makes a header value).
#[derive(Clone, PartialEq, Eq)]
pub struct EngineKey(Arc<str>);

impl EngineKey {
    /// The key `s`, or None when it is empty or holds a character a header cannot carry.
    pub fn new(s: &str) -> Option<EngineKey> {
        let ok = !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
        ok.then(|| EngineKey(Arc::from(s)))
    }

    /// The secret itself (for the engine's environment, the agent's state file and the
    /// endpoint table); never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `Bearer KEY`, marked sensitive.
    pub fn bearer(&self) -> HeaderValue {
        let mut v =
            HeaderValue::from_str(&format!("Bearer {}", self.0)).expect("visible ASCII is a valid header value");
        v.set_sensitive(true);
        v
    }
}

impl fmt::Debug for EngineKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EngineKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_header_safe_and_hidden_from_debug() {
        for bad in ["", "a b", "tab\tkey", "nl\n", "é"] {
            assert!(EngineKey::new(bad).is_none(), "{bad:?}");
        }
        let k = EngineKey::new("0123abcd").unwrap();
        assert_eq!(k.expose(), "0123abcd");
        assert_eq!(k.bearer(), "Bearer 0123abcd");
        assert!(k.bearer().is_sensitive());
        assert!(!format!("{k:?}").contains("0123abcd"));
    }

    #[test]
    fn the_paths_vllm_guards() {
        for (path, want) in [
            ("/v1/completions", true),
            ("/v1/models", true),
            ("/v1/load_lora_adapter", true),
            ("/v2/rerank", true),
            ("/inference/v1/generate", true),
            ("/cohere/v2/chat", true),
            ("/v1x", true),
            ("/health", false),
            ("/metrics", false),
            ("/tokenize", false),
            ("/version", false),
            ("/invocations", false),
            ("/", false),
        ] {
            assert_eq!(guarded(path), want, "{path}");
        }
    }
}
