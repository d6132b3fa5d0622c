//! Reading a download URL the way the policy needs it: scheme, host (lowercase, no port,
//! no trailing dot, IPv6 without brackets), port, and a normalised path to match prefixes
//! against. Pure, and deliberately strict: what cannot be read unambiguously is refused
//! rather than guessed at, since a parser that disagrees with the one that fetches is how
//! prefix checks are bypassed.
//!
//! | scheme | path checked | decoding |
//! |---|---|---|
//! | `file` | the file path (`/models/x`) | none: the agent opens the path as written |
//! | `http`, `https` | the URL path (`/org/x.bin`) | `%XX` decoded once, as servers do; `%2F`, `%5C`, `%00` refused |
//! | `hf` | `org/name[@rev]` | as http: it is pasted into the endpoint's URL |
//! | `s3` | `bucket/key` | none: the agent encodes keys itself |
//!
//! In every scheme a `..` segment is refused (not resolved), `.` and empty segments are
//! dropped, and a URL with a user or password (`user:pw@host`) is refused.

use std::fmt;

use super::{Refusal, Rule};

/// A scheme the agent can download from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scheme {
    /// A path on the node or a shared mount.
    File,
    /// Plain HTTP.
    Http,
    /// HTTPS.
    Https,
    /// A Hugging Face repository, through `--hf-endpoint`.
    Hf,
    /// An S3 bucket, through `--s3-endpoint`.
    S3,
}

impl Scheme {
    /// Every scheme, in the order the docs list them.
    pub const ALL: [Scheme; 5] = [Scheme::File, Scheme::Http, Scheme::Https, Scheme::Hf, Scheme::S3];

    /// The scheme's name as written in URLs and policy files.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::File => "file",
            Scheme::Http => "http",
            Scheme::Https => "https",
            Scheme::Hf => "hf",
            Scheme::S3 => "s3",
        }
    }

    /// The scheme named `s` (case-insensitive).
    pub fn parse(s: &str) -> Option<Scheme> {
        Scheme::ALL.into_iter().find(|k| k.name().eq_ignore_ascii_case(s))
    }

    /// Whether URLs of this scheme name a network host the agent connects to itself.
    pub fn has_host(self) -> bool {
        matches!(self, Scheme::Http | Scheme::Https)
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A URL as the policy reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The scheme.
    pub scheme: Scheme,
    /// For http(s): the host, lowercase, without brackets or a trailing dot.
    pub host: Option<String>,
    /// For http(s): the port, explicit or the scheme's default.
    pub port: Option<u16>,
    /// The normalised path (see the module docs): `/`-separated, no `.`, `..` or empty
    /// segments; absolute (leading `/`) for file and http(s), relative for hf and s3.
    pub path: String,
}

fn refuse(rule: Rule, url: &str, detail: impl Into<String>) -> Refusal {
    Refusal { rule, url: shown(url), detail: detail.into() }
}

/// Reads `url` (a fragment is ignored). Errors name the rule: `scheme` for one the agent
/// does not download from, `userinfo`, `traversal` for `..` and encoded separators, `url`
/// for anything else unreadable.
pub fn parse(url: &str) -> Result<Target, Refusal> {
    let url_no_frag = url.split_once('#').map(|(b, _)| b).unwrap_or(url);
    let Some((scheme_text, rest)) = url_no_frag.split_once("://") else {
        return Err(refuse(Rule::Url, url, "is not scheme://..."));
    };
    let scheme = Scheme::parse(scheme_text).ok_or_else(|| {
        refuse(Rule::Schemes, url, format!("scheme {scheme_text:?} is not one the agent downloads from"))
    })?;
    match scheme {
        Scheme::File => {
            let path = match rest.strip_prefix("localhost") {
                Some(p) if p.starts_with('/') => p,
                _ => rest,
            };
            if !path.starts_with('/') {
                return Err(refuse(Rule::Url, url, "a file:// URL needs an absolute path (file:///models/x)"));
            }
            if path.contains('\0') {
                return Err(refuse(Rule::Url, url, "the path holds a NUL byte"));
            }
            Ok(Target {
                scheme,
                host: None,
                port: None,
                path: normalise(path, true).map_err(|d| refuse(Rule::Traversal, url, d))?,
            })
        }
        Scheme::Http | Scheme::Https => {
            let end = rest.find(['/', '?']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(end);
            if authority.contains('@') {
                return Err(refuse(Rule::Userinfo, url, "a URL may not carry a user or password (user:password@host)"));
            }
            let (host, port) = split_authority(authority).map_err(|d| refuse(Rule::Url, url, d))?;
            let port = port.unwrap_or(if scheme == Scheme::Https { 443 } else { 80 });
            let raw_path = tail.split('?').next().unwrap_or("");
            let decoded = decode_path(raw_path).map_err(|d| refuse(Rule::Traversal, url, d))?;
            let path = normalise(&format!("/{decoded}"), true).map_err(|d| refuse(Rule::Traversal, url, d))?;
            Ok(Target { scheme, host: Some(host), port: Some(port), path })
        }
        Scheme::Hf => {
            if rest.contains(['?', '\\']) || rest.matches('@').count() > 1 {
                return Err(refuse(Rule::Url, url, "an hf:// source is hf://org/name[@revision]"));
            }
            let decoded = decode_path(rest).map_err(|d| refuse(Rule::Traversal, url, d))?;
            let path = normalise(&decoded, false).map_err(|d| refuse(Rule::Traversal, url, d))?;
            if path.is_empty() {
                return Err(refuse(Rule::Url, url, "names no repository"));
            }
            Ok(Target { scheme, host: None, port: None, path })
        }
        Scheme::S3 => {
            let path = normalise(rest, false).map_err(|d| refuse(Rule::Traversal, url, d))?;
            if path.is_empty() {
                return Err(refuse(Rule::Url, url, "names no bucket"));
            }
            Ok(Target { scheme, host: None, port: None, path })
        }
    }
}

/// `host[:port]` → (host, port): lowercase, IPv6 brackets and a trailing dot removed.
pub fn split_authority(authority: &str) -> Result<(String, Option<u16>), String> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or("an IPv6 host without its closing ]")?;
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("[{h}] is not an IPv6 address"));
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or(format!("{after:?} after the host is not :port"))?),
        };
        (h.to_ascii_lowercase(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_ascii_lowercase(), Some(p)),
            None => (authority.to_ascii_lowercase(), None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().map_err(|_| format!("port {p:?} is not a number up to 65535"))?),
    };
    let host = host.strip_suffix('.').unwrap_or(&host).to_string();
    let host_ok = !host.is_empty()
        && (host.contains(':') || host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_'));
    if !host_ok {
        return Err(format!("host {host:?} is not a DNS name or an IP address"));
    }
    Ok((host, port))
}

/// Decodes `%XX` once. Encoded separators (`%2F`, `%5C`) and NUL are refused: servers
/// disagree on them, so no prefix can be checked. A literal backslash likewise.
fn decode_path(raw: &str) -> Result<String, String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\\' {
            return Err("the path holds a backslash".into());
        }
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let v = hex
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "the path holds a % not followed by two hex digits".to_string())?;
            if matches!(v, b'/' | b'\\' | 0) {
                return Err(format!("the path holds an encoded {:?} (%{:02X})", v as char, v));
            }
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b);
        i += 1;
    }
    String::from_utf8(out).map_err(|_| "the decoded path is not UTF-8".to_string())
}

/// Drops `.` and empty segments; refuses `..`.
fn normalise(path: &str, absolute: bool) -> Result<String, String> {
    let mut segs = Vec::new();
    for s in path.split('/') {
        match s {
            "" | "." => {}
            ".." => return Err("the path holds a .. segment".into()),
            s => segs.push(s),
        }
    }
    let joined = segs.join("/");
    Ok(if absolute { format!("/{joined}") } else { joined })
}

/// Whether `path` is `prefix` or below it, segment-wise: `/models` holds `/models/x`, not
/// `/models2`. Both are normalised paths; a prefix's trailing `/` is ignored.
pub fn under(path: &str, prefix: &str) -> bool {
    let p = prefix.trim_end_matches('/');
    if p.is_empty() {
        return true;
    }
    path == p || path.strip_prefix(p).is_some_and(|rest| rest.starts_with('/'))
}

/// A URL as it may be shown in logs and errors: without a user or password and without
/// the query (presigned URLs, and the CDN URLs Hugging Face redirects to, carry
/// signatures there).
pub fn shown(url: &str) -> String {
    let (base, _) = url.split_once('#').unwrap_or((url, ""));
    let (base, query) = match base.split_once('?') {
        Some((b, _)) => (b, "?<redacted>"),
        None => (base, ""),
    };
    let base = match base.split_once("://") {
        Some((scheme, rest)) => {
            let end = rest.find('/').unwrap_or(rest.len());
            match rest[..end].rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://<redacted>@{host}{}", &rest[end..]),
                None => base.to_string(),
            }
        }
        None => base.to_string(),
    };
    format!("{base}{query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(url: &str) -> String {
        parse(url).unwrap_or_else(|r| panic!("{url}: {r}")).path
    }

    fn rule(url: &str) -> Rule {
        parse(url).expect_err(url).rule
    }

    #[test]
    fn schemes_hosts_and_ports() {
        let t = parse("HTTPS://Models.Example.COM./org/m.bin?x=1#sha256=ab").unwrap();
        assert_eq!(t.scheme, Scheme::Https);
        assert_eq!(t.host.as_deref(), Some("models.example.com"));
        assert_eq!(t.port, Some(443));
        assert_eq!(t.path, "/org/m.bin");
        let t = parse("http://[FD00::1]:8080/x").unwrap();
        assert_eq!((t.host.as_deref(), t.port), (Some("fd00::1"), Some(8080)));
        assert_eq!(parse("http://127.0.0.1:9/").unwrap().port, Some(9));
        for (url, r) in [
            ("ftp://h/x", Rule::Schemes),
            ("sim://a", Rule::Schemes),
            ("no-scheme", Rule::Url),
            ("http://h:99999/x", Rule::Url),
            ("http:///x", Rule::Url),
            ("http://[::1/x", Rule::Url),
            ("http://h%2e.com/x", Rule::Url),
            ("http://user:pw@h/x", Rule::Userinfo),
            ("http://allowed.example@evil.example/x", Rule::Userinfo),
            ("file://relative/x", Rule::Url),
            ("hf://", Rule::Url),
            ("s3://", Rule::Url),
        ] {
            assert_eq!(rule(url), r, "{url}");
        }
    }

    #[test]
    fn paths_are_normalised_and_traversal_refused() {
        assert_eq!(path("file:///models//a/./b"), "/models/a/b");
        assert_eq!(path("file://localhost/models/a"), "/models/a");
        assert_eq!(path("file:///models/%2e%2e/etc"), "/models/%2e%2e/etc", "file paths are opened as written");
        assert_eq!(path("https://h/a%20b/c.bin"), "/a b/c.bin");
        assert_eq!(path("https://h"), "/");
        assert_eq!(path("hf://org/name@main"), "org/name@main");
        assert_eq!(path("s3://bucket/llama/"), "bucket/llama");
        for url in [
            "file:///models/../etc/passwd",
            "file:///models/a/..",
            "https://h/models/../secret",
            "https://h/models/%2e%2e/secret",
            "https://h/models/%2E%2E/secret",
            "https://h/models/.%2e/secret",
            "https://h/models%2f..%2fsecret",
            "https://h/models%2Fsecret",
            "https://h/models%5csecret",
            "https://h/models\\..\\secret",
            "https://h/models%00.bin",
            "https://h/models%zz",
            "hf://org/../../api/secret",
            "hf://org/%2e%2e/x",
            "s3://bucket/../other",
        ] {
            assert_eq!(rule(url), Rule::Traversal, "{url}");
        }
    }

    #[test]
    fn prefixes_match_by_segment() {
        assert!(under("/models/a", "/models"));
        assert!(under("/models/a", "/models/"));
        assert!(under("/models", "/models"));
        assert!(!under("/models2/a", "/models"));
        assert!(!under("/", "/models"));
        assert!(under("/anything", "/"));
        assert!(under("bucket/llama/x", "bucket/llama"));
        assert!(!under("bucket/llama2", "bucket/llama"));
    }

    #[test]
    fn shown_urls_carry_no_secrets() {
        assert_eq!(shown("https://u:secret@h/x?X-Amz-Signature=abc#f"), "https://<redacted>@h/x?<redacted>");
        assert_eq!(shown("https://cdn.example/x?Signature=s&Key-Pair-Id=k"), "https://cdn.example/x?<redacted>");
        assert_eq!(shown("file:///models/a"), "file:///models/a");
        assert_eq!(shown("https://h/a@b"), "https://h/a@b");
    }
}
