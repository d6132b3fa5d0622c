//! The LoRA adapter registry behind `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`,
//! with vLLM 0.32's error cases (`vllm/entrypoints/openai/models/serving.py`): a missing
//! name or path (400 `InvalidUserInput`), a name loaded twice without `load_inplace` (400
//! `InvalidUserInput`), a path that does not exist (404 `NotFoundError`), any other load
//! failure such as LoRA disabled or a rank above `--max-lora-rank` (500
//! `InternalServerError`), an unknown name on unload (404). `load_inplace` reloads a
//! loaded name under the same id. A path is an existing local file or directory (its
//! `adapter_config.json` `r` gives the rank) or `sim://NAME[?rank=N]` for a synthetic
//! adapter with no files.
//!
//! A load is two calls around the engine's `add_lora` (which takes simulated time, see
//! `lora_cache.rs`): [`Registry::prepare`] checks the request and reserves the name,
//! [`Registry::commit`] makes it visible once the engine has loaded it (as vLLM registers the
//! name only after `add_lora` returns). Unloading only forgets the name, as in vLLM 0.32.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Mutex;

/// A loaded adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    /// Engine-internal id (>= 1), used for batching and cache salting.
    pub id: u32,
    /// Name requests use as `model`.
    pub name: String,
    /// Where it was loaded from.
    pub path: String,
    /// LoRA rank.
    pub rank: u32,
}

/// What a request needs to know about its adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraRef {
    /// Engine-internal id.
    pub id: u32,
    /// LoRA rank (prices a reload from disk).
    pub rank: u32,
}

/// Why a load or unload failed; each maps to vLLM's status code and error `type`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LoraError {
    /// LoRA is off (`--disable-lora`): 500 (the engine refuses the adapter).
    #[error("LoRA is not enabled on this server; start it without --disable-lora")]
    Disabled,
    /// Missing name or path on load: 400.
    #[error("Both 'lora_name' and 'lora_path' must be provided.")]
    MissingField,
    /// Missing name on unload: 400.
    #[error("'lora_name' needs to be provided to unload a LoRA adapter.")]
    MissingName,
    /// Same name twice without `load_inplace`: 400.
    #[error(
        "The lora adapter '{0}' has already been loaded. If you want to load the adapter in place, set 'load_inplace' to True."
    )]
    Duplicate(String),
    /// Path not found: 404.
    #[error("Loading lora {name} failed: No adapter found for {path}")]
    NotFound {
        /// Adapter name.
        name: String,
        /// The path given.
        path: String,
    },
    /// Rank too high: 500 (vLLM answers every engine-side load failure with 500).
    #[error("LoRA rank {rank} is greater than max_lora_rank {max}.")]
    RankTooHigh {
        /// The adapter's rank.
        rank: u32,
        /// `--max-lora-rank`.
        max: u32,
    },
    /// Unknown name on unload: 404.
    #[error("The lora adapter '{0}' cannot be found.")]
    Unknown(String),
}

impl LoraError {
    /// The HTTP status vLLM answers with.
    pub fn status(&self) -> u16 {
        match self {
            LoraError::MissingField | LoraError::MissingName | LoraError::Duplicate(_) => 400,
            LoraError::NotFound { .. } | LoraError::Unknown(_) => 404,
            LoraError::Disabled | LoraError::RankTooHigh { .. } => 500,
        }
    }

    /// The error `type` vLLM writes.
    pub fn error_type(&self) -> &'static str {
        match self {
            LoraError::MissingField | LoraError::MissingName | LoraError::Duplicate(_) => "InvalidUserInput",
            LoraError::NotFound { .. } | LoraError::Unknown(_) => "NotFoundError",
            LoraError::Disabled | LoraError::RankTooHigh { .. } => "InternalServerError",
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    by_name: BTreeMap<String, Adapter>,
    /// Names whose load is in progress (vLLM holds a per-name lock meanwhile).
    pending: BTreeSet<String>,
    next_id: u32,
}

/// Loaded adapters, shared by the HTTP layer and the engine.
#[derive(Debug)]
pub struct Registry {
    enabled: bool,
    max_rank: u32,
    inner: Mutex<Inner>,
}

fn rank_of(path: &str, default: u32) -> Option<u32> {
    if let Some(rest) = path.strip_prefix("sim://") {
        let rank = rest.split_once("?rank=").and_then(|(_, r)| r.parse().ok()).unwrap_or(default);
        return Some(rank);
    }
    let p = Path::new(path);
    if !p.exists() {
        return None;
    }
    let cfg = std::fs::read_to_string(p.join("adapter_config.json")).ok();
    let rank = cfg
        .and_then(|c| serde_json::from_str::<serde_json::Value>(&c).ok())
        .and_then(|v| v.get("r").and_then(serde_json::Value::as_u64))
        .and_then(|r| u32::try_from(r).ok())
        .unwrap_or(default);
    Some(rank)
}

impl Registry {
    /// An empty registry.
    pub fn new(enabled: bool, max_rank: u32) -> Self {
        let inner = Inner { by_name: BTreeMap::new(), pending: BTreeSet::new(), next_id: 1 };
        Registry { enabled, max_rank, inner: Mutex::new(inner) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether adapters can be loaded.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Loads an adapter at once (no engine); with `inplace`, a loaded name is reloaded.
    pub fn load(&self, name: &str, path: &str, inplace: bool) -> Result<Adapter, LoraError> {
        let a = self.prepare(name, path, inplace)?;
        self.commit(a.clone());
        Ok(a)
    }

    /// Checks a load request and reserves its name until [`Registry::commit`] or
    /// [`Registry::abandon`]; with `inplace`, a loaded name keeps its id. The returned
    /// adapter is not yet visible to requests.
    pub fn prepare(&self, name: &str, path: &str, inplace: bool) -> Result<Adapter, LoraError> {
        if name.is_empty() || path.is_empty() {
            return Err(LoraError::MissingField);
        }
        {
            let inner = self.lock();
            if inner.pending.contains(name) || (!inplace && inner.by_name.contains_key(name)) {
                return Err(LoraError::Duplicate(name.to_string()));
            }
        }
        if !self.enabled {
            return Err(LoraError::Disabled);
        }
        let rank = rank_of(path, self.max_rank)
            .ok_or_else(|| LoraError::NotFound { name: name.to_string(), path: path.to_string() })?;
        if rank > self.max_rank {
            return Err(LoraError::RankTooHigh { rank, max: self.max_rank });
        }
        let mut inner = self.lock();
        if inner.pending.contains(name) {
            return Err(LoraError::Duplicate(name.to_string()));
        }
        let id = match inner.by_name.get(name) {
            Some(old) if inplace => old.id,
            Some(_) => return Err(LoraError::Duplicate(name.to_string())),
            None => {
                inner.next_id += 1;
                inner.next_id - 1
            }
        };
        inner.pending.insert(name.to_string());
        Ok(Adapter { id, name: name.to_string(), path: path.to_string(), rank })
    }

    /// Makes a prepared adapter visible (replacing the old one on an in-place reload).
    pub fn commit(&self, a: Adapter) {
        let mut inner = self.lock();
        inner.pending.remove(&a.name);
        inner.by_name.insert(a.name.clone(), a);
    }

    /// Releases a prepared name whose load did not happen.
    pub fn abandon(&self, name: &str) {
        self.lock().pending.remove(name);
    }

    /// Unloads an adapter; requests already running with it finish.
    pub fn unload(&self, name: &str) -> Result<(), LoraError> {
        if name.is_empty() {
            return Err(LoraError::MissingName);
        }
        self.lock().by_name.remove(name).map(|_| ()).ok_or_else(|| LoraError::Unknown(name.to_string()))
    }

    /// The id and rank of a loaded adapter.
    pub fn resolve(&self, name: &str) -> Option<LoraRef> {
        self.lock().by_name.get(name).map(|a| LoraRef { id: a.id, rank: a.rank })
    }

    /// All loaded adapters, in load order (as vLLM lists them).
    pub fn list(&self) -> Vec<Adapter> {
        let mut all: Vec<Adapter> = self.lock().by_name.values().cloned().collect();
        all.sort_by_key(|a| a.id);
        all
    }

    /// Names of the given adapter ids, comma-joined (unloaded ones are skipped).
    pub fn names(&self, ids: &[u32]) -> String {
        let inner = self.lock();
        let mut out = String::new();
        for id in ids {
            if let Some(a) = inner.by_name.values().find(|a| a.id == *id) {
                if !out.is_empty() {
                    out.push(',');
                }
                out.push_str(&a.name);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_error_cases() {
        let r = Registry::new(true, 16);
        assert_eq!(r.load("a", "sim://a", false).unwrap().id, 1);
        let dup = r.load("a", "sim://a", false).unwrap_err();
        assert_eq!((dup.status(), dup.error_type()), (400, "InvalidUserInput"));
        assert_eq!(r.load("b", "/definitely/not/here", false).unwrap_err().status(), 404);
        let rank = r.load("c", "sim://c?rank=64", false).unwrap_err();
        assert_eq!(rank, LoraError::RankTooHigh { rank: 64, max: 16 });
        assert_eq!(rank.status(), 500);
        assert_eq!(r.load("", "x", false).unwrap_err().status(), 400);
        assert_eq!(r.resolve("a"), Some(LoraRef { id: 1, rank: 16 }));
        assert_eq!(r.names(&[1, 99]), "a");
        r.unload("a").unwrap();
        assert_eq!(r.unload("a").unwrap_err().status(), 404);
        assert_eq!(r.unload("").unwrap_err().status(), 400);
        assert_eq!(r.resolve("a"), None);
        let off = Registry::new(false, 16);
        assert_eq!(off.load("a", "sim://a", false).unwrap_err().status(), 500);
        assert_eq!(off.unload("a").unwrap_err().status(), 404);
    }

    #[test]
    fn load_inplace_keeps_the_id_and_list_is_in_load_order() {
        let r = Registry::new(true, 16);
        r.load("z", "sim://z", false).unwrap();
        r.load("a", "sim://a", false).unwrap();
        let again = r.load("z", "sim://z2?rank=4", true).unwrap();
        assert_eq!((again.id, again.rank), (1, 4));
        let names: Vec<String> = r.list().into_iter().map(|a| a.name).collect();
        assert_eq!(names, ["z", "a"]);
    }

    #[test]
    fn a_prepared_name_is_invisible_and_reserved_until_committed() {
        let r = Registry::new(true, 16);
        let a = r.prepare("a", "sim://a?rank=8", false).unwrap();
        assert_eq!(r.resolve("a"), None, "not visible while the engine loads it");
        assert!(r.list().is_empty());
        assert_eq!(r.prepare("a", "sim://a", false).unwrap_err(), LoraError::Duplicate("a".into()));
        r.commit(a);
        assert_eq!(r.resolve("a"), Some(LoraRef { id: 1, rank: 8 }));
        let b = r.prepare("b", "sim://b", false).unwrap();
        r.abandon(&b.name);
        assert_eq!(r.resolve("b"), None);
        assert_eq!(r.load("b", "sim://b", false).unwrap().id, 3);
    }

    #[test]
    fn rank_is_read_from_adapter_config() {
        let dir = std::env::temp_dir().join(format!("flotilla-sim-lora-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("adapter_config.json"), r#"{"r": 8, "lora_alpha": 16}"#).unwrap();
        let r = Registry::new(true, 16);
        assert_eq!(r.load("x", dir.to_str().unwrap(), false).unwrap().rank, 8);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
