//! One resumable HTTP(S) file download: `Range` requests continue a partial file after a
//! cut connection, the final size is checked against `Content-Length`/`Content-Range`,
//! redirects are followed (Hugging Face answers `resolve` URLs with one), and progress is
//! reported as bytes arrive. Every hop is checked by the source policy first
//! ([`Guard`]): the first one's addresses, each redirect's scheme, host and addresses; a
//! size over the cap (announced, or counted as bytes arrive) stops the download. URLs in
//! messages are shown without their query ([`url::shown`]).

use std::path::Path;
use std::time::Duration;

use http::header::{CONTENT_LENGTH, CONTENT_RANGE, LOCATION, RANGE};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;

use super::guard::{FetchError, Guard};
use crate::http::HttpClient;
use crate::source_policy::url;

/// Attempts per file (a cut connection resumes in the next attempt).
const ATTEMPTS: u32 = 6;
const REDIRECTS: u32 = 5;
const TIMEOUT: Duration = Duration::from_secs(60);

/// What the policy allows one file.
pub struct Limits<'a> {
    /// The policy.
    pub guard: &'a Guard,
    /// Bytes this file may have: the source's cap less what its earlier files took.
    pub max_bytes: u64,
    /// When the listing gave no size: the dir whose filesystem must have room for the
    /// size the response announces.
    pub space_dir: Option<&'a Path>,
}

/// Downloads `url` into `dest`, resuming from whatever `dest` already holds. `headers`
/// builds the request headers per attempt (S3 signs each). `progress(done, total)`.
pub async fn fetch_file(
    client: &HttpClient,
    url: &str,
    headers: &(dyn Fn(&str) -> HeaderMap + Send + Sync),
    dest: &Path,
    progress: &(dyn Fn(u64, Option<u64>) + Send + Sync),
    limits: &Limits<'_>,
) -> Result<u64, FetchError> {
    let mut last_err = String::new();
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempt - 1).min(20))).await;
            tracing::info!(url = %url::shown(url), attempt, error = %last_err, "retrying download");
        }
        match attempt_once(client, url, headers, dest, progress, limits).await {
            Ok(n) => return Ok(n),
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::Retry(e)) => last_err = e,
        }
    }
    Err(FetchError::Failed(format!("gave up after {ATTEMPTS} attempts: {last_err}")))
}

enum Attempt {
    Retry(String),
    Fatal(FetchError),
}

impl Attempt {
    fn fatal(m: String) -> Attempt {
        Attempt::Fatal(FetchError::Failed(m))
    }
}

async fn attempt_once(
    client: &HttpClient,
    url: &str,
    headers: &(dyn Fn(&str) -> HeaderMap + Send + Sync),
    dest: &Path,
    progress: &(dyn Fn(u64, Option<u64>) + Send + Sync),
    limits: &Limits<'_>,
) -> Result<u64, Attempt> {
    let shown = url::shown(url);
    let have = tokio::fs::metadata(dest).await.map(|m| m.len()).unwrap_or(0);
    let mut current = url.to_string();
    let mut resp = None;
    for hop in 0..=REDIRECTS {
        let checked = match hop {
            0 => limits.guard.request(&current).await,
            _ => limits.guard.redirect(&current).await,
        };
        checked.map_err(Attempt::Fatal)?;
        let mut h = headers(&current);
        if current != url && host_of(&current) != host_of(url) {
            h.remove(http::header::AUTHORIZATION);
        }
        if have > 0 {
            h.insert(
                RANGE,
                HeaderValue::from_str(&format!("bytes={have}-")).map_err(|e| Attempt::fatal(e.to_string()))?,
            );
        }
        let r = client.send(Method::GET, &current, &h, TIMEOUT).await.map_err(Attempt::Retry)?;
        if r.status().is_redirection() {
            let loc = r.headers().get(LOCATION).and_then(|v| v.to_str().ok()).unwrap_or_default();
            current = resolve(&current, loc);
            continue;
        }
        resp = Some(r);
        break;
    }
    let resp = resp.ok_or_else(|| Attempt::fatal(format!("{shown}: more than {REDIRECTS} redirects")))?;
    let status = resp.status();
    let (mut offset, total) = match status {
        StatusCode::PARTIAL_CONTENT => {
            let (start, total) = parse_content_range(resp.headers())
                .ok_or_else(|| Attempt::Retry(format!("{shown}: 206 without a usable Content-Range")))?;
            if start != have {
                return Err(Attempt::Retry(format!("{shown}: asked for bytes from {have}, got from {start}")));
            }
            (have, total)
        }
        StatusCode::OK => (0, content_length(resp.headers())),
        StatusCode::RANGE_NOT_SATISFIABLE if have > 0 => {
            // The partial file is as long as (or longer than) the object: start over.
            let _ = tokio::fs::remove_file(dest).await;
            return Err(Attempt::Retry(format!("{shown}: range {have}- not satisfiable; restarting")));
        }
        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
            return Err(Attempt::Retry(format!("{shown}: server answered {s}")))
        }
        s => return Err(Attempt::fatal(format!("{shown}: server answered {s}"))),
    };
    if let Some(t) = total {
        if t > limits.max_bytes {
            return Err(Attempt::Fatal(refuse_size(limits, url, t)));
        }
        if let Some(dir) = limits.space_dir {
            limits.guard.space(url, dir, t.saturating_sub(offset)).map_err(Attempt::Fatal)?;
        }
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(offset > 0)
        .truncate(offset == 0)
        .open(dest)
        .await
        .map_err(|e| Attempt::fatal(format!("cannot write {}: {e}", dest.display())))?;
    progress(offset, total);
    let mut body = resp.into_body();
    loop {
        let frame = match tokio::time::timeout(TIMEOUT, body.frame()).await {
            Err(_) => return Err(Attempt::Retry(format!("{shown}: no data for {TIMEOUT:?}"))),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                let _ = file.flush().await;
                return Err(Attempt::Retry(format!("{shown}: connection lost after {offset} bytes: {e}")));
            }
            Ok(Some(Ok(f))) => f,
        };
        if let Some(data) = frame.data_ref() {
            let after = offset + data.len() as u64;
            if after > limits.max_bytes {
                // No announced size, or more than announced: the cap holds as bytes arrive.
                drop(file);
                let _ = tokio::fs::remove_file(dest).await;
                return Err(Attempt::Fatal(refuse_size(limits, url, after)));
            }
            file.write_all(data).await.map_err(|e| Attempt::fatal(format!("cannot write {}: {e}", dest.display())))?;
            offset += data.len() as u64;
            progress(offset, total);
        }
    }
    file.flush().await.map_err(|e| Attempt::fatal(format!("cannot write {}: {e}", dest.display())))?;
    file.sync_all().await.map_err(|e| Attempt::fatal(format!("cannot sync {}: {e}", dest.display())))?;
    match total {
        Some(t) if offset < t => Err(Attempt::Retry(format!("{shown}: connection closed at {offset} of {t} bytes"))),
        Some(t) if offset > t => {
            let _ = tokio::fs::remove_file(dest).await;
            Err(Attempt::fatal(format!("{shown}: got {offset} bytes, more than the announced {t}")))
        }
        _ => Ok(offset),
    }
}

/// The size refusal for a file that would reach `bytes`, worded for the whole source when
/// earlier files took part of the cap.
fn refuse_size(limits: &Limits<'_>, url: &str, bytes: u64) -> FetchError {
    let cap = limits.guard.policy().max_bytes();
    let whole = bytes.saturating_add(cap.saturating_sub(limits.max_bytes));
    match limits.guard.size(url, whole) {
        Err(e) => e,
        // Unreachable (bytes > max_bytes), but never let a download past the cap.
        Ok(()) => FetchError::Refused(format!("{}: more than max_bytes", url::shown(url))),
    }
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// `bytes 100-199/1000` → (100, Some(1000)); `/*` → unknown total.
fn parse_content_range(h: &HeaderMap) -> Option<(u64, Option<u64>)> {
    let v = h.get(CONTENT_RANGE)?.to_str().ok()?.trim().strip_prefix("bytes ")?;
    let (range, total) = v.split_once('/')?;
    let start = range.split_once('-')?.0.trim().parse().ok()?;
    Some((start, total.trim().parse().ok()))
}

fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.split('/').next().unwrap_or(rest)
}

/// Resolves a `Location` against the URL that answered it.
fn resolve(base: &str, loc: &str) -> String {
    if loc.contains("://") {
        return loc.to_string();
    }
    let scheme = base.split_once("://").map(|(s, _)| s).unwrap_or("http");
    if loc.starts_with('/') {
        format!("{scheme}://{}{loc}", host_of(base))
    } else {
        let dir = base.rsplit_once('/').map(|(d, _)| d).unwrap_or(base);
        format!("{dir}/{loc}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_and_redirects() {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_RANGE, HeaderValue::from_static("bytes 100-199/1000"));
        assert_eq!(parse_content_range(&h), Some((100, Some(1000))));
        h.insert(CONTENT_RANGE, HeaderValue::from_static("bytes 5-9/*"));
        assert_eq!(parse_content_range(&h), Some((5, None)));
        assert_eq!(resolve("https://hf.co/org/m/resolve/main/x", "/api/x?y"), "https://hf.co/api/x?y");
        assert_eq!(resolve("https://hf.co/a/b", "https://cdn.example/z"), "https://cdn.example/z");
        assert_eq!(resolve("http://h:1/a/b", "c"), "http://h:1/a/c");
        assert_eq!(host_of("http://h:1/a/b"), "h:1");
    }
}
