//! The node's content-addressed model cache, `<data-dir>/models/`:
//!
//! ```text
//!  <key>/            finished download (a file, or a tree for hf:// and s3:// prefixes)
//!  <key>.partial/    in progress (resumed by the next try; never given to an engine)
//!  <key>.json        completion marker, written last: {source, path}
//! ```
//!
//! `key` is the sha256 of the source URI without its fragment. Sources:
//! - `file:///path` — a file or directory on the node (or a shared mount), hard-linked into
//!   the cache when on the same filesystem, copied otherwise ([`local`]); re-fetched when
//!   the source's files, size or newest mtime change.
//! - `http(s)://host/file[#sha256=<hex>]` — resumable, size checked, sha256 checked if given.
//! - `hf://org/name[@revision]` — the files listed by `<hf-endpoint>/api/models/org/name`
//!   (`siblings`), each through the HTTP path from `/org/name/resolve/<rev>/<file>`;
//!   token from `HF_TOKEN`.
//! - `s3://bucket/prefix` — every object under the prefix ([`s3`]).
//!
//! Every source is checked by the node's [`crate::source_policy`] first (a cached copy
//! too: a policy tightened since is obeyed), and every request and redirect as it is made
//! ([`guard`]). A refusal removes what the download had fetched so far.
//!
//! Only engines that need weights (vLLM) download; sim engines skip this entirely.

pub mod guard;
pub mod http;
pub mod local;
pub mod s3;
pub mod sources;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ::http::{HeaderMap, HeaderValue};
use sha2::{Digest, Sha256};

use crate::http::HttpClient;
use crate::source_policy::{url, Policy, Scheme};
use guard::{FetchError, Guard};

/// Downloads models into the cache.
#[derive(Debug)]
pub struct Downloader {
    root: PathBuf,
    client: HttpClient,
    hf_endpoint: String,
    s3: s3::S3Config,
    guard: Guard,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A named subset of a source's files, fetched and cached apart from the whole source
/// ([`Downloader::fetch_files`]): a gateway needs a model's tokenizer files, not its weights.
#[derive(Debug, Clone, Copy)]
pub struct FileSet {
    /// Part of the cache key: two sets of one source are two cache entries.
    pub name: &'static str,
    /// Whether a file (its path relative to the source's root) belongs to the set.
    pub keep: fn(&Path) -> bool,
}

/// Where a download stands, given to [`Downloader::fetch`]'s callback as bytes arrive.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Progress {
    /// Fraction done, in [0, 1] (0 while the total is unknown).
    pub fraction: f64,
    /// Bytes in the cache entry so far (a resumed file's earlier bytes included).
    pub bytes: u64,
    /// Total bytes, 0 while unknown.
    pub total_bytes: u64,
}

impl Progress {
    /// A finished download (a cache hit too: no bytes moved).
    pub fn done(bytes: u64) -> Progress {
        Progress { fraction: 1.0, bytes, total_bytes: bytes }
    }
}

/// A download rate from byte counts sampled over time: bytes per second over the last
/// `window` or more (so one burst does not swing it), `None` until a window has passed.
#[derive(Debug, Clone)]
pub struct RateMeter {
    window: Duration,
    mark: Option<(tokio::time::Instant, u64)>,
    rate: Option<f64>,
}

impl RateMeter {
    pub fn new(window: Duration) -> RateMeter {
        RateMeter { window, mark: None, rate: None }
    }

    /// Records `bytes` seen at `now`; returns the rate as of the last full window.
    pub fn observe(&mut self, now: tokio::time::Instant, bytes: u64) -> Option<f64> {
        match self.mark {
            None => self.mark = Some((now, bytes)),
            // fewer bytes than before: a file restarted from zero; measure afresh
            Some((_, b)) if bytes < b => self.mark = Some((now, bytes)),
            Some((t, b)) => {
                let dt = now.saturating_duration_since(t);
                if dt >= self.window {
                    self.rate = Some((bytes - b) as f64 / dt.as_secs_f64());
                    self.mark = Some((now, bytes));
                }
            }
        }
        self.rate
    }
}

/// One file to fetch.
struct Item {
    url: String,
    rel: PathBuf,
    size: Option<u64>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Marker {
    source: String,
    /// Path inside `<key>/` to hand to the engine ("" = the directory).
    path: String,
    /// For `file://` sources, [`local::stamp`] of the source when it was cached.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    stamp: String,
}

/// The model cache's size ([`Downloader::usage`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheUsage {
    pub models: u64,
    pub bytes: u64,
}

impl Downloader {
    /// A cache rooted at `root`, fetching what `policy` allows.
    pub fn new(root: PathBuf, client: HttpClient, hf_endpoint: &str, s3: s3::S3Config, policy: Policy) -> Self {
        Downloader {
            root,
            client,
            hf_endpoint: hf_endpoint.trim_end_matches('/').into(),
            s3,
            guard: Guard::new(policy),
            locks: Mutex::default(),
        }
    }

    /// The source policy and its refusal counters.
    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// What the cache holds now: finished models (completion markers) and bytes on disk,
    /// partial downloads included, each file counted once however many hard links it has
    /// (`file://` sources are hard-linked in). Walks the tree: for `/metrics`, off the reactor.
    pub fn usage(&self) -> CacheUsage {
        use std::os::unix::fs::MetadataExt as _;
        let mut usage = CacheUsage::default();
        let mut seen = std::collections::HashSet::new();
        let mut dirs = vec![self.root.clone()];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for e in entries.flatten() {
                let Ok(meta) = e.path().symlink_metadata() else { continue };
                if meta.is_dir() {
                    dirs.push(e.path());
                } else if meta.is_file() {
                    if dir == self.root && e.file_name().to_string_lossy().ends_with(".json") {
                        usage.models += 1;
                    }
                    if seen.insert((meta.dev(), meta.ino())) {
                        usage.bytes += meta.len();
                    }
                }
            }
        }
        usage
    }

    /// The cache key of a source.
    pub fn key(source: &str) -> String {
        hex::encode(Sha256::digest(without_fragment(source).as_bytes()))
    }

    /// The cache key of `set`'s files of a source.
    pub fn files_key(source: &str, set: &FileSet) -> String {
        hex::encode(Sha256::digest(format!("{}\0files:{}", without_fragment(source), set.name).as_bytes()))
    }

    /// Returns the local path of `source`, downloading it first if needed.
    /// `progress` gets the fraction done and the bytes so far as they arrive.
    pub async fn fetch(&self, source: &str, progress: &(dyn Fn(Progress) + Send + Sync)) -> Result<PathBuf, String> {
        self.fetch_where(source, None, progress).await
    }

    /// Returns a local directory holding only `set`'s files of `source` (a directory
    /// source: `hf://`, an `s3://` prefix, a `file://` directory), downloading them first if
    /// needed; the other files are never fetched. Fails when the source has none of them.
    pub async fn fetch_files(
        &self,
        source: &str,
        set: &FileSet,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<PathBuf, String> {
        self.fetch_where(source, Some(set), progress).await
    }

    async fn fetch_where(
        &self,
        source: &str,
        set: Option<&FileSet>,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<PathBuf, String> {
        let target = self.guard.source(source).map_err(FetchError::into_message)?;
        if target.scheme.has_host() {
            // Its addresses too, before a cached copy is handed out.
            self.guard.request(source).await.map_err(FetchError::into_message)?;
        }
        let key = match set {
            None => Self::key(source),
            Some(set) => Self::files_key(source, set),
        };
        let lock = {
            let mut g = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            g.entry(key.clone()).or_default().clone()
        };
        let _guard = lock.lock().await;
        let _across = self.lock_across_processes(&key).await?;
        let local = (target.scheme == Scheme::File).then_some(target.path.as_str());
        match self.fetch_locked(source, &key, local, set, progress).await {
            Ok(p) => Ok(p),
            Err(FetchError::Failed(m)) => Err(m),
            Err(FetchError::Refused(m)) => {
                // Refused half-way (a redirect, the size): nothing of it is kept or resumed.
                let _ = tokio::fs::remove_dir_all(self.root.join(format!("{key}.partial"))).await;
                Err(m)
            }
        }
    }

    /// Holds `<root>/<key>.lock` exclusively (flock, released when the file is dropped):
    /// processes sharing one cache (gateways on one host) fetch a source one at a time.
    async fn lock_across_processes(&self, key: &str) -> Result<std::fs::File, String> {
        let (root, path) = (self.root.clone(), self.root.join(format!("{key}.lock")));
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
            let file =
                crate::state::open_lock_file(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
                .map_err(|e| format!("cannot lock {}: {e}", path.display()))?;
            Ok(file)
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// [`Downloader::fetch`] under the source's lock; `local` is a file:// source's
    /// normalised path (the one the policy checked); `set`: only those files.
    async fn fetch_locked(
        &self,
        source: &str,
        key: &str,
        local_path: Option<&str>,
        set: Option<&FileSet>,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<PathBuf, FetchError> {
        let (base, fragment) = source.split_once('#').unwrap_or((source, ""));
        let sha256 = match fragment {
            "" => None,
            f => Some(
                f.strip_prefix("sha256=")
                    .filter(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
                    .ok_or_else(|| format!("fragment {f:?} is not sha256=<64 hex digits>"))?
                    .to_ascii_lowercase(),
            ),
        };
        let done = self.root.join(key);
        let marker_path = self.root.join(format!("{key}.json"));
        let local = match local_path {
            Some(path) => {
                let (mut files, single) = local::list(Path::new(path)).await?;
                if let Some(set) = set {
                    files.retain(|f| !single && (set.keep)(&f.rel));
                    none_of(set, source, files.is_empty())?;
                }
                Some((files, single))
            }
            None => None,
        };
        let stamp = local.as_ref().map(|(files, _)| local::stamp(files)).unwrap_or_default();
        if let Ok(bytes) = tokio::fs::read(&marker_path).await {
            if let Ok(m) = serde_json::from_slice::<Marker>(&bytes) {
                if m.stamp == stamp && tokio::fs::metadata(&done).await.is_ok() {
                    let path = done.join(m.path);
                    // The key ignores the fragment: a checksum asked for now is checked now.
                    if let Some(want) = &sha256 {
                        let got = sha256_file(&path).await?;
                        if &got != want {
                            return Err(format!("sha256 mismatch: expected {want}, got {got} (cached copy)").into());
                        }
                    }
                    progress(Progress::done(0));
                    return Ok(path);
                }
            }
        }
        let partial = self.root.join(format!("{key}.partial"));
        tokio::fs::create_dir_all(&partial).await.map_err(|e| format!("cannot create {}: {e}", partial.display()))?;
        let (items, single) = match &local {
            Some((files, single)) => (
                files
                    .iter()
                    .map(|f| Item { url: f.path.display().to_string(), rel: f.rel.clone(), size: Some(f.size) })
                    .collect(),
                *single,
            ),
            None => {
                let (mut items, single) = self.list(base).await?;
                if let Some(set) = set {
                    items.retain(|i| !single && (set.keep)(&i.rel));
                    none_of(set, source, items.is_empty())?;
                }
                (items, single)
            }
        };
        if sha256.is_some() && items.len() != 1 {
            return Err("a #sha256= fragment needs a single-file source".to_string().into());
        }
        let total: u64 = items.iter().filter_map(|i| i.size).sum();
        self.guard.size(base, total)?;
        // Room for what is known now; files of unknown size are checked as they start.
        let need = match &local {
            Some((files, _)) => local::bytes_to_copy(files, &self.root).await,
            None => total,
        };
        if need > 0 {
            self.guard.space(base, &self.root, need)?;
        }
        let mut finished = 0u64;
        for item in &items {
            let dest = partial.join(&item.rel);
            if let Some(dir) = dest.parent() {
                tokio::fs::create_dir_all(dir).await.map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            }
            let base_done = finished;
            let report = |done: u64, t: Option<u64>| {
                let all = if total > 0 { total } else { t.unwrap_or(0) };
                let bytes = base_done + done;
                let fraction = if all > 0 { (bytes as f64 / all as f64).min(1.0) } else { 0.0 };
                progress(Progress { fraction, bytes, total_bytes: all });
            };
            let n = if local.is_some() {
                let n = local::place(Path::new(&item.url), &dest).await?;
                report(n, None);
                n
            } else {
                let headers = |url: &str| self.headers_for(base, url);
                let limits = http::Limits {
                    guard: &self.guard,
                    max_bytes: self.guard.policy().max_bytes().saturating_sub(finished),
                    space_dir: item.size.is_none().then_some(self.root.as_path()),
                };
                http::fetch_file(&self.client, &item.url, &headers, &dest, &report, &limits).await?
            };
            if let Some(want) = item.size {
                if n != want {
                    return Err(format!("{}: got {n} bytes, the listing says {want}", url::shown(&item.url)).into());
                }
            }
            if let Some(want) = &sha256 {
                let got = sha256_file(&dest).await?;
                if &got != want {
                    let _ = tokio::fs::remove_file(&dest).await;
                    return Err(format!("sha256 mismatch: expected {want}, got {got}").into());
                }
            }
            finished += n;
        }
        let _ = tokio::fs::remove_dir_all(&done).await;
        tokio::fs::rename(&partial, &done)
            .await
            .map_err(|e| format!("cannot move {} into place: {e}", partial.display()))?;
        let rel = match (single, items.first()) {
            (true, Some(item)) => item.rel.display().to_string(),
            _ => String::new(),
        };
        let marker = serde_json::to_vec(&Marker { source: base.to_string(), path: rel.clone(), stamp })
            .map_err(|e| e.to_string())?;
        crate::state::write_atomic(&marker_path, &marker).map_err(|e| e.to_string())?;
        progress(Progress::done(finished));
        tracing::info!(source = %url::shown(base), path = %done.display(), files = items.len(), bytes = finished, "model downloaded");
        Ok(done.join(rel))
    }

    fn headers_for(&self, source: &str, url: &str) -> HeaderMap {
        if source.starts_with("s3://") {
            return self.s3.headers_for(url, SystemTime::now());
        }
        let mut h = HeaderMap::new();
        if source.starts_with("hf://") {
            if let Some(mut v) =
                std::env::var("HF_TOKEN").ok().and_then(|t| HeaderValue::from_str(&format!("Bearer {t}")).ok())
            {
                v.set_sensitive(true);
                h.insert(::http::header::AUTHORIZATION, v);
            }
        }
        h
    }

    /// The files of a source, and whether it is a single file.
    async fn list(&self, source: &str) -> Result<(Vec<Item>, bool), String> {
        if source.starts_with("http://") || source.starts_with("https://") {
            let name = source.rsplit('/').next().filter(|n| !n.is_empty()).unwrap_or("model");
            let name = name.split('?').next().unwrap_or(name);
            return Ok((vec![Item { url: source.to_string(), rel: PathBuf::from(name), size: None }], true));
        }
        if let Some(repo) = source.strip_prefix("hf://") {
            return self.list_hf(source, repo).await.map(|i| (i, false));
        }
        if let Some(rest) = source.strip_prefix("s3://") {
            return self.list_s3(source, rest).await;
        }
        Err(format!("unsupported source {source:?}"))
    }

    async fn list_hf(&self, source: &str, repo: &str) -> Result<Vec<Item>, String> {
        let (repo, rev) = repo.split_once('@').unwrap_or((repo, "main"));
        let url = match rev {
            "main" => format!("{}/api/models/{repo}", self.hf_endpoint),
            rev => format!("{}/api/models/{repo}/revision/{rev}", self.hf_endpoint),
        };
        let (status, body) =
            self.client.get_text(&url, &self.headers_for(source, &url), Duration::from_secs(30), 8 << 20).await?;
        if !status.is_success() {
            return Err(format!("{url}: server answered {status}"));
        }
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{url}: not JSON: {e}"))?;
        let files: Vec<Item> = v
            .get("siblings")
            .and_then(|s| s.as_array())
            .map(|s| s.iter().filter_map(|f| f.get("rfilename")?.as_str()).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .filter(|f| safe_rel(f))
            .map(|f| Item {
                url: format!("{}/{repo}/resolve/{rev}/{f}", self.hf_endpoint),
                rel: PathBuf::from(f),
                size: None,
            })
            .collect();
        if files.is_empty() {
            return Err(format!("{url}: the repository lists no files"));
        }
        Ok(files)
    }

    async fn list_s3(&self, source: &str, rest: &str) -> Result<(Vec<Item>, bool), String> {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let mut objects = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut url = format!("{}/{bucket}?list-type=2&prefix={}", self.s3.endpoint, s3::uri_encode(prefix, true));
            if let Some(t) = &token {
                url.push_str(&format!("&continuation-token={}", s3::uri_encode(t, true)));
            }
            let (status, body) =
                self.client.get_text(&url, &self.headers_for(source, &url), Duration::from_secs(30), 32 << 20).await?;
            if !status.is_success() {
                return Err(format!(
                    "listing {source} failed with {status}: {}",
                    body.chars().take(200).collect::<String>()
                ));
            }
            let (page, next) = s3::parse_list(&body)?;
            objects.extend(page);
            match next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        // The prefix names an object or a "directory": `llama` matches `llama/x`, not `llama2/x`.
        let dir = prefix.trim_end_matches('/');
        objects.retain(|o| {
            !o.key.ends_with('/') && (dir.is_empty() || o.key == prefix || o.key.starts_with(&format!("{dir}/")))
        });
        if objects.is_empty() {
            return Err(format!("no objects under {source}"));
        }
        let single = objects.len() == 1 && objects[0].key == prefix;
        let items: Vec<Item> = objects
            .into_iter()
            .filter_map(|o| {
                let rel = if o.key == prefix {
                    o.key.rsplit('/').next().unwrap_or(&o.key).to_string()
                } else {
                    o.key.strip_prefix(dir)?.trim_start_matches('/').to_string()
                };
                safe_rel(&rel).then(|| Item {
                    url: format!("{}/{bucket}/{}", self.s3.endpoint, s3::uri_encode(&o.key, false)),
                    rel: PathBuf::from(rel),
                    size: Some(o.size),
                })
            })
            .collect();
        if items.is_empty() {
            return Err(format!("no usable object names under {source}"));
        }
        Ok((items, single))
    }
}

/// A source without its `#fragment` (a checksum: not part of what is fetched).
fn without_fragment(source: &str) -> &str {
    source.split_once('#').map_or(source, |(base, _)| base)
}

/// The error when a source has none of `set`'s files.
fn none_of(set: &FileSet, source: &str, empty: bool) -> Result<(), String> {
    match empty {
        true => Err(format!("{} has no {} files", url::shown(source), set.name)),
        false => Ok(()),
    }
}

/// A relative path that stays inside the cache entry.
fn safe_rel(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && Path::new(p).components().all(|c| matches!(c, std::path::Component::Normal(_)))
}

async fn sha256_file(path: &Path) -> Result<String, String> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        Ok(hex::encode(h.finalize()))
    })
    .await
    .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_ignore_the_fragment_and_paths_stay_inside() {
        assert_eq!(Downloader::key("http://h/x#sha256=ab"), Downloader::key("http://h/x"));
        assert_ne!(Downloader::key("http://h/x"), Downloader::key("http://h/y"));
        assert!(safe_rel("a/b.bin"));
        assert!(!safe_rel("../x") && !safe_rel("/etc/passwd") && !safe_rel("a/../../b") && !safe_rel(""));
    }

    #[test]
    fn the_rate_is_measured_over_a_window_and_restarts_with_a_file() {
        let t0 = tokio::time::Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut m = RateMeter::new(Duration::from_secs(1));
        assert_eq!(m.observe(at(0), 0), None);
        assert_eq!(m.observe(at(500), 40 << 20), None, "half a window: not yet");
        assert_eq!(m.observe(at(1000), 80 << 20), Some((80u64 << 20) as f64));
        assert_eq!(m.observe(at(1500), 200 << 20), Some((80u64 << 20) as f64), "kept until the next window");
        assert_eq!(m.observe(at(2000), 10), Some((80u64 << 20) as f64), "bytes went back: a new mark");
        assert_eq!(m.observe(at(4000), 10 + (4 << 20)), Some((2u64 << 20) as f64));
    }
}
