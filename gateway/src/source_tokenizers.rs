//! Tokenizers fetched from each cluster Model's own `source`, so `kv-aware` (and `auto`)
//! routing keys prompts with the engine's own token ids without a `--tokenizer` flag per
//! model. The binary hands the gateway a [`FetchTokenizer`]: the agent's downloader and
//! cache restricted to [`TOKENIZER_FILES`] (the weights are never fetched) under the same
//! source policy as the agents. This module decides which models need one, fetches each
//! source once (models sharing a source share its tokenizer), retries a failure with
//! backoff, and forgets sources no model names any more.
//!
//! ```text
//! Directory (Models: routing, engine, source) ─> wanted(): kv-aware or auto, not sim,
//!   no --tokenizer ─> per source: Fetching ─fetch + HfTokenizer::load─> Ready
//!                                              └─ error (logged, counted) ─> Failed ─backoff─> again
//! ```
//!
//! Until a model's tokenizer is Ready its requests are keyed on the approximate prefix
//! index (`x-flotilla-route` says so) and `flotilla_gateway_kv_token_exact{model}` is 0.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use flotilla_api::spec::RoutingStrategy;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::metrics::{FetchLabels, ModelLabels};
use crate::names::ModelName;
use crate::prompt_tokens::PromptTokenizer;
use crate::state::Gateway;
use crate::table::ModelInfo;

/// The files of a model directory the gateway's tokenizer reads ([`crate::hf_tokenizer`]).
pub const TOKENIZER_FILES: [&str; 4] =
    ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"];

/// First wait before a failed source is fetched again (doubling up to [`MAX_BACKOFF`]).
pub const FIRST_BACKOFF: Duration = Duration::from_secs(30);
/// Longest wait between two tries of a failing source.
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// Sources fetched at once.
const CONCURRENT_FETCHES: usize = 2;

/// A fetch in progress: the local directory holding the files, or why not.
pub type Fetch = std::pin::Pin<Box<dyn std::future::Future<Output = Result<PathBuf, String>> + Send>>;

/// Fetches a source's [`TOKENIZER_FILES`] into a local directory.
pub trait FetchTokenizer: Send + Sync {
    fn fetch(&self, source: String) -> Fetch;
    /// `source` as logs may show it (no credentials, no signed query string).
    fn shown(&self, source: &str) -> String;
}

/// The fetcher the binary wires in (`flotilla gateway`'s `--tokenizer-cache` and source flags).
#[derive(Clone)]
pub struct TokenizerFetcher(pub Arc<dyn FetchTokenizer>);

impl std::fmt::Debug for TokenizerFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenizerFetcher")
    }
}

/// Where one source's tokenizer stands.
#[derive(Clone)]
enum SourceState {
    /// Being fetched; the wait after the failure before, if any.
    Fetching {
        last_backoff: Option<Duration>,
    },
    Ready(Arc<dyn PromptTokenizer>),
    /// Failed (the reason is logged and counted); fetched again at `retry_at`.
    Failed {
        retry_at: Instant,
        backoff: Duration,
    },
}

#[derive(Default)]
struct Inner {
    by_source: HashMap<Arc<str>, SourceState>,
    /// The models that want a fetched tokenizer, and their source.
    model_source: HashMap<ModelName, Arc<str>>,
}

/// The fetched tokenizers, by model.
#[derive(Default)]
pub struct SourceTokenizers {
    inner: RwLock<Inner>,
}

impl SourceTokenizers {
    /// `model`'s tokenizer, once its source's is ready.
    pub fn get(&self, model: &str) -> Option<Arc<dyn PromptTokenizer>> {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        match g.by_source.get(g.model_source.get(model)?)? {
            SourceState::Ready(t) => Some(t.clone()),
            _ => None,
        }
    }
}

/// Whether a model is routed on token ids, so its tokenizer is wanted.
pub fn keyed_by_tokens(routing: RoutingStrategy) -> bool {
    matches!(routing, RoutingStrategy::KvAware | RoutingStrategy::Auto)
}

/// The models whose tokenizer is fetched from their source (pure): routed on token ids
/// (`routing` gives the effective configured strategy), not sims (the sim's tokenizer is
/// built in), not given a `--tokenizer`, with a source.
pub fn wanted(
    models: &HashMap<ModelName, ModelInfo>,
    routing: impl Fn(&str) -> RoutingStrategy,
    has_flag: impl Fn(&str) -> bool,
) -> BTreeMap<ModelName, Arc<str>> {
    models
        .iter()
        .filter(|(name, m)| !m.sim_engine && keyed_by_tokens(routing(name.as_str())) && !has_flag(name.as_str()))
        .filter_map(|(name, m)| Some((name.clone(), m.source.clone()?)))
        .collect()
}

/// Runs until the gateway is gone: fetches what [`wanted`] names.
pub async fn run(gw: Weak<Gateway>, fetcher: TokenizerFetcher) {
    let Some(mut changes) = gw.upgrade().map(|g| g.dir.changes()) else { return };
    let permits = Arc::new(Semaphore::new(CONCURRENT_FETCHES));
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
        }
        let Some(g) = gw.upgrade() else { return };
        let want = wanted(&g.dir.models(), |m| g.configured_routing(m), |m| g.cfg.tokenizers.get(m).is_some());
        for source in reconcile(&g.fetched_tokenizers, want, Instant::now()) {
            tokio::spawn(fetch_one(Arc::downgrade(&g), fetcher.clone(), source, permits.clone()));
        }
        export(&g);
    }
}

/// Records what is wanted and returns the sources to fetch now (marked Fetching).
fn reconcile(t: &SourceTokenizers, want: BTreeMap<ModelName, Arc<str>>, now: Instant) -> Vec<Arc<str>> {
    let mut g = t.inner.write().unwrap_or_else(|p| p.into_inner());
    g.by_source.retain(|s, _| want.values().any(|w| w == s));
    let mut start = Vec::new();
    for source in want.values() {
        let last_backoff = match g.by_source.get(source) {
            None => None,
            Some(SourceState::Failed { retry_at, backoff, .. }) if *retry_at <= now => Some(*backoff),
            Some(_) => continue,
        };
        g.by_source.insert(source.clone(), SourceState::Fetching { last_backoff });
        start.push(source.clone());
    }
    g.model_source = want.into_iter().collect();
    start
}

/// The wait after a failure: [`FIRST_BACKOFF`], then twice the last, at most [`MAX_BACKOFF`].
fn next_backoff(last: Option<Duration>) -> Duration {
    last.map_or(FIRST_BACKOFF, |b| (b * 2).min(MAX_BACKOFF))
}

async fn fetch_one(gw: Weak<Gateway>, fetcher: TokenizerFetcher, source: Arc<str>, permits: Arc<Semaphore>) {
    let Ok(_permit) = permits.acquire_owned().await else { return };
    let shown = fetcher.0.shown(&source);
    tracing::info!(source = %shown, "fetching a model's tokenizer files for kv-aware routing");
    let loaded = match fetcher.0.fetch(source.to_string()).await {
        Ok(dir) => tokio::task::spawn_blocking(move || crate::hf_tokenizer::HfTokenizer::load(&dir))
            .await
            .unwrap_or_else(|e| Err(format!("loading panicked: {e}"))),
        Err(e) => Err(e),
    };
    let Some(g) = gw.upgrade() else { return };
    let result = if loaded.is_ok() { "ok" } else { "error" };
    g.metrics.tokenizer_fetches.get_or_create(&FetchLabels { result: result.into() }).inc();
    let mut inner = g.fetched_tokenizers.inner.write().unwrap_or_else(|p| p.into_inner());
    let Some(SourceState::Fetching { last_backoff }) = inner.by_source.get(&source) else {
        return; // no model wants it any more
    };
    let state = match loaded {
        Ok(t) => {
            tracing::info!(source = %shown, "tokenizer ready: prompts are keyed with the engine's token ids");
            SourceState::Ready(Arc::new(t))
        }
        Err(reason) => {
            let backoff = next_backoff(*last_backoff);
            tracing::warn!(source = %shown, error = %reason, retry_in = ?backoff,
                "cannot fetch the model's tokenizer; kv-aware routing keys its prompts approximately meanwhile");
            SourceState::Failed { retry_at: Instant::now() + backoff, backoff }
        }
    };
    inner.by_source.insert(source, state);
}

/// `kv_token_exact{model}`: 1 where the gateway keys the model's prompts with token ids.
fn export(g: &Gateway) {
    for name in g.dir.models().keys() {
        if !keyed_by_tokens(g.configured_routing(name.as_str())) {
            continue;
        }
        let exact = g.token_exact(name.as_str());
        g.metrics.kv_token_exact.get_or_create(&ModelLabels { model: name.to_string() }).set(i64::from(exact));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(source: Option<&str>, sim: bool) -> ModelInfo {
        ModelInfo { source: source.map(Arc::from), sim_engine: sim, ..ModelInfo::default() }
    }

    #[test]
    fn wanted_are_token_keyed_models_with_a_source_and_no_other_tokenizer() {
        let models: HashMap<ModelName, ModelInfo> = [
            ("auto", model(Some("hf://o/a"), false)),
            ("kv", model(Some("hf://o/a"), false)),
            ("rr", model(Some("hf://o/r"), false)),
            ("sim", model(Some("hf://o/s"), true)),
            ("flag", model(Some("hf://o/f"), false)),
            ("nosource", model(None, false)),
        ]
        .into_iter()
        .map(|(n, m)| (ModelName::from(n), m))
        .collect();
        let routing = |m: &str| match m {
            "kv" => RoutingStrategy::KvAware,
            "rr" => RoutingStrategy::RoundRobin,
            _ => RoutingStrategy::Auto,
        };
        let got = wanted(&models, routing, |m| m == "flag");
        let names: Vec<&str> = got.keys().map(|m| m.as_str()).collect();
        assert_eq!(names, ["auto", "kv"]);
        assert_eq!(got[&ModelName::from("kv")].as_ref(), "hf://o/a");
    }

    /// Where the tokenizer of `model`'s source stands (None: the model wants none).
    fn state_of(t: &SourceTokenizers, model: &str) -> Option<String> {
        let g = t.inner.read().unwrap();
        Some(match g.by_source.get(g.model_source.get(model)?)? {
            SourceState::Ready(_) => "ready".into(),
            SourceState::Fetching { .. } => "fetching".into(),
            SourceState::Failed { .. } => "failed".into(),
        })
    }

    #[test]
    fn each_source_is_fetched_once_and_a_failure_again_after_its_backoff() {
        let t = SourceTokenizers::default();
        let t0 = Instant::now();
        let want = |pairs: &[(&str, &str)]| -> BTreeMap<ModelName, Arc<str>> {
            pairs.iter().map(|(m, s)| (ModelName::from(*m), Arc::from(*s))).collect()
        };
        // two models share a source: one fetch
        let start = reconcile(&t, want(&[("a", "hf://o/x"), ("b", "hf://o/x")]), t0);
        assert_eq!(start, [Arc::<str>::from("hf://o/x")]);
        assert!(reconcile(&t, want(&[("a", "hf://o/x")]), t0).is_empty(), "already being fetched");
        assert_eq!(state_of(&t, "a").as_deref(), Some("fetching"));
        assert_eq!(state_of(&t, "b"), None, "b no longer wants one");
        // it failed: not again before its backoff, then again with a doubled one
        t.inner
            .write()
            .unwrap()
            .by_source
            .insert("hf://o/x".into(), SourceState::Failed { retry_at: t0 + FIRST_BACKOFF, backoff: FIRST_BACKOFF });
        assert_eq!(state_of(&t, "a").as_deref(), Some("failed"));
        assert!(reconcile(&t, want(&[("a", "hf://o/x")]), t0 + FIRST_BACKOFF / 2).is_empty());
        assert_eq!(reconcile(&t, want(&[("a", "hf://o/x")]), t0 + FIRST_BACKOFF).len(), 1);
        let g = t.inner.read().unwrap();
        let Some(SourceState::Fetching { last_backoff }) = g.by_source.get("hf://o/x") else { panic!("not fetching") };
        assert_eq!(next_backoff(*last_backoff), FIRST_BACKOFF * 2);
        drop(g);
        assert_eq!(next_backoff(None), FIRST_BACKOFF);
        assert_eq!(next_backoff(Some(MAX_BACKOFF)), MAX_BACKOFF);
        // a source no model names any more is forgotten
        assert!(reconcile(&t, BTreeMap::new(), t0).is_empty());
        assert!(t.inner.read().unwrap().by_source.is_empty());
        assert_eq!(t.get("a").map(|_| ()), None);
    }
}
