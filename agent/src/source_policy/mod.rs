//! The download source policy: which model and adapter sources an agent fetches. Whoever
//! may write a Model or an Adapter names its source; that must not let them make the node
//! read its own files, reach the services on its network (a cloud's metadata endpoint, an
//! internal admin API), or fill its disk. Pure: [`Policy::check`] reads a source,
//! [`Policy::check_redirect`] a redirect's target, [`Policy::check_addresses`] what a host
//! resolved to, [`Policy::check_size`] and [`Policy::check_space`] sizes. The I/O (DNS,
//! `statvfs`, counters) is in [`crate::download::guard`].
//!
//! ```text
//!  source ──check──> scheme? host? path prefix? not the agent's data dir?
//!    │  request (each hop) ── resolve host ──check_addresses──> every address public or allowed?
//!    │  3xx ──check_redirect──> https? host?   (then its addresses, as above)
//!    └─ sizes ──check_size / check_space──> under max_bytes? room on the data dir's disk?
//! ```
//!
//! Rules are named after the policy file's fields ([`Rule::label`]); a refusal names its
//! rule, fails the replica (never retried) and counts in the rule's metric.
//!
//! Defaults (no `--source-policy`, or a field left out): schemes `file`, `https`, `hf`,
//! `s3`; any host; any path; no private networks; 200 GiB per source; 1 GiB free-space
//! margin. An agent whose `--address` is loopback (dev, tests, one machine) also allows
//! `http` and loopback targets by default, so `flotilla dev` can fetch from a local server.
//! The `--hf-endpoint` and `--s3-endpoint` the operator configured are trusted: their hosts
//! count as allowed hosts, and their addresses are not checked.

pub mod addr;
pub mod url;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;

pub use addr::{classify, AddressClass};
pub use url::{Scheme, Target};

/// The default cap on one source's total bytes.
pub const DEFAULT_MAX_BYTES: u64 = 200 << 30;
/// The default free space left on the data dir's filesystem after a download.
pub const DEFAULT_FREE_SPACE_MARGIN: u64 = 1 << 30;

/// Why a source was refused; each has a bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rule {
    /// Not a URL the policy can read.
    Url,
    /// A scheme not in `schemes`.
    Schemes,
    /// `user:password@` in a URL.
    Userinfo,
    /// A `..` segment, or an encoded separator.
    Traversal,
    /// A host not in `hosts`.
    Hosts,
    /// A path under none of `paths` for its scheme.
    Paths,
    /// A `file://` path in the agent's own data dir.
    AgentData,
    /// A host resolving to an address on a network `private_networks` does not allow.
    PrivateNetworks,
    /// A redirect to anything but https.
    RedirectHttps,
    /// More bytes than `max_bytes`.
    MaxBytes,
    /// Less free space than the download needs plus `free_space_margin`.
    FreeSpace,
}

impl Rule {
    /// Every rule (the metric's label values).
    pub const ALL: [Rule; 11] = [
        Rule::Url,
        Rule::Schemes,
        Rule::Userinfo,
        Rule::Traversal,
        Rule::Hosts,
        Rule::Paths,
        Rule::AgentData,
        Rule::PrivateNetworks,
        Rule::RedirectHttps,
        Rule::MaxBytes,
        Rule::FreeSpace,
    ];

    /// The rule's name: the policy file field that governs it, where there is one.
    pub fn label(self) -> &'static str {
        match self {
            Rule::Url => "url",
            Rule::Schemes => "schemes",
            Rule::Userinfo => "userinfo",
            Rule::Traversal => "traversal",
            Rule::Hosts => "hosts",
            Rule::Paths => "paths",
            Rule::AgentData => "agent_data",
            Rule::PrivateNetworks => "private_networks",
            Rule::RedirectHttps => "redirect_https",
            Rule::MaxBytes => "max_bytes",
            Rule::FreeSpace => "free_space_margin",
        }
    }

    /// The position of the rule in [`Rule::ALL`].
    pub fn index(self) -> usize {
        Rule::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// A refused download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The rule that refused it.
    pub rule: Rule,
    /// The URL refused, as it may be shown ([`url::shown`]).
    pub url: String,
    /// What about it the rule refuses.
    pub detail: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "refused by the download source policy, rule {}: {}: {}", self.rule.label(), self.url, self.detail)
    }
}

/// The operator's `--source-policy` file. Every field is optional; one left out keeps its
/// default (see the module docs).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Schemes sources may use: `file`, `http`, `https`, `hf`, `s3`.
    pub schemes: Option<Vec<String>>,
    /// Hosts http(s) sources and redirects may name: exact, or `*.suffix`.
    pub hosts: Option<Vec<String>>,
    /// Per scheme, the path prefixes sources must be under.
    #[serde(default)]
    pub paths: BTreeMap<String, Vec<String>>,
    /// Non-public networks downloads may reach: `loopback`, `private`, `link_local`,
    /// `unique_local`.
    pub private_networks: Option<Vec<String>>,
    /// Most bytes one source may have (an integer, or `200GiB`, `500MB`, ...).
    pub max_bytes: Option<serde_yaml::Value>,
    /// Free space to leave on the data dir's filesystem (same forms).
    pub free_space_margin: Option<serde_yaml::Value>,
}

impl PolicyFile {
    /// Parses the YAML text; unknown fields are errors naming the field.
    pub fn parse(text: &str) -> Result<PolicyFile, String> {
        if text.trim().is_empty() {
            return Ok(PolicyFile::default());
        }
        serde_yaml::from_str(text).map_err(|e| e.to_string())
    }
}

/// What the policy needs to know of the agent it guards.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// The agent's `--address` is loopback: allow `http` and loopback targets by default.
    pub loopback: bool,
    /// The operator's endpoints (`--hf-endpoint`, `--s3-endpoint`) as (scheme, host, port).
    pub endpoints: Vec<(Scheme, String, u16)>,
    /// The agent's data dir, absolute: `file://` sources there are refused.
    pub data_dir: Option<String>,
}

impl Context {
    /// Reads an endpoint URL (`https://host[:port]`) into an origin.
    pub fn endpoint(url: &str) -> Result<(Scheme, String, u16), String> {
        let t = url::parse(url).map_err(|r| r.detail)?;
        match (t.scheme, t.host, t.port) {
            (s @ (Scheme::Http | Scheme::Https), Some(h), Some(p)) => Ok((s, h, p)),
            _ => Err(format!("{url:?} is not http(s)://host[:port]")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    /// `*.example.com` → `.example.com`: any host ending with it.
    Suffix(String),
}

impl HostPattern {
    fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == host,
            HostPattern::Suffix(s) => host.ends_with(s.as_str()) && host.len() > s.len(),
        }
    }

    fn shown(&self) -> String {
        match self {
            HostPattern::Exact(h) => h.clone(),
            HostPattern::Suffix(s) => format!("*{s}"),
        }
    }
}

/// The rules an agent checks download sources against.
#[derive(Debug, Clone)]
pub struct Policy {
    schemes: BTreeSet<Scheme>,
    /// None: any host.
    hosts: Option<Vec<HostPattern>>,
    paths: BTreeMap<Scheme, Vec<String>>,
    networks: BTreeSet<AddressClass>,
    max_bytes: u64,
    margin: u64,
    endpoints: Vec<(Scheme, String, u16)>,
    data_dir: Option<String>,
}

impl Policy {
    /// The defaults with `file`'s fields. Errors name the field and the entry at fault.
    pub fn new(file: &PolicyFile, ctx: &Context) -> Result<Policy, String> {
        let schemes = match &file.schemes {
            None => {
                let mut s: BTreeSet<Scheme> = [Scheme::File, Scheme::Https, Scheme::Hf, Scheme::S3].into();
                if ctx.loopback {
                    s.insert(Scheme::Http);
                }
                s
            }
            Some(list) => list
                .iter()
                .map(|s| {
                    Scheme::parse(s.trim())
                        .ok_or_else(|| format!("schemes: {s:?} is not one of file, http, https, hf, s3"))
                })
                .collect::<Result<_, _>>()?,
        };
        let hosts = match &file.hosts {
            None => None,
            Some(list) => Some(list.iter().map(|h| host_pattern(h)).collect::<Result<_, _>>()?),
        };
        let mut paths = BTreeMap::new();
        for (scheme, prefixes) in &file.paths {
            let s = Scheme::parse(scheme.trim())
                .ok_or_else(|| format!("paths: {scheme:?} is not one of file, http, https, hf, s3"))?;
            let list = prefixes.iter().map(|p| path_prefix(s, p)).collect::<Result<Vec<_>, _>>()?;
            paths.insert(s, list);
        }
        let networks = match &file.private_networks {
            None if ctx.loopback => [AddressClass::Loopback].into(),
            None => BTreeSet::new(),
            Some(list) => list
                .iter()
                .map(|n| {
                    AddressClass::parse(n.trim()).ok_or_else(|| {
                        format!("private_networks: {n:?} is not one of loopback, private, link_local, unique_local")
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let max_bytes = match &file.max_bytes {
            None => DEFAULT_MAX_BYTES,
            Some(v) => size_value(v).map_err(|e| format!("max_bytes: {e}"))?,
        };
        if max_bytes == 0 {
            return Err("max_bytes: must be positive".into());
        }
        let margin = match &file.free_space_margin {
            None => DEFAULT_FREE_SPACE_MARGIN,
            Some(v) => size_value(v).map_err(|e| format!("free_space_margin: {e}"))?,
        };
        let data_dir = ctx.data_dir.as_deref().map(|d| d.trim_end_matches('/').to_string()).filter(|d| !d.is_empty());
        Ok(Policy { schemes, hosts, paths, networks, max_bytes, margin, endpoints: ctx.endpoints.clone(), data_dir })
    }

    /// The defaults for an agent in `ctx`.
    pub fn defaults(ctx: &Context) -> Policy {
        Policy::new(&PolicyFile::default(), ctx).expect("the defaults are valid")
    }

    /// The cap on one source's bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Checks a source as a Model or Adapter names it (a `#sha256=` fragment is ignored).
    pub fn check(&self, source: &str) -> Result<Target, Refusal> {
        let t = url::parse(source)?;
        let refuse = |rule, detail: String| Refusal { rule, url: url::shown(source), detail };
        if !self.schemes.contains(&t.scheme) {
            let allowed: Vec<&str> = self.schemes.iter().map(|s| s.name()).collect();
            return Err(refuse(
                Rule::Schemes,
                format!("scheme {} is not allowed (schemes: {})", t.scheme, allowed.join(", ")),
            ));
        }
        if t.scheme == Scheme::File {
            if let Some(dir) = &self.data_dir {
                if url::under(&t.path, dir) {
                    return Err(refuse(
                        Rule::AgentData,
                        format!("{} is in the agent's data dir {dir}, which no policy allows", t.path),
                    ));
                }
            }
        }
        self.check_host(&t).map_err(|d| refuse(Rule::Hosts, d))?;
        if let Some(prefixes) = self.paths.get(&t.scheme) {
            if !prefixes.iter().any(|p| url::under(&t.path, p)) {
                return Err(refuse(
                    Rule::Paths,
                    format!("{} is under none of the {} paths allowed ({})", t.path, t.scheme, prefixes.join(", ")),
                ));
            }
        }
        Ok(t)
    }

    /// Checks the target of a redirect: https only, to an allowed host, unless it stays on
    /// one of the operator's endpoints. Path prefixes do not apply (Hugging Face redirects
    /// files to its CDN's own paths).
    pub fn check_redirect(&self, to: &str) -> Result<Target, Refusal> {
        let t = url::parse(to)?;
        let refuse = |rule, detail: String| Refusal { rule, url: url::shown(to), detail };
        if self.is_endpoint(&t) {
            // Within one of the operator's endpoints (a mirror sending /resolve to its cache).
            return Ok(t);
        }
        if t.scheme != Scheme::Https {
            return Err(refuse(
                Rule::RedirectHttps,
                format!("a redirect to {} is not followed, only to https", t.scheme),
            ));
        }
        self.check_host(&t).map_err(|d| refuse(Rule::Hosts, d))?;
        Ok(t)
    }

    fn check_host(&self, t: &Target) -> Result<(), String> {
        let (Some(host), Some(hosts)) = (&t.host, &self.hosts) else { return Ok(()) };
        if hosts.iter().any(|p| p.matches(host)) || self.endpoints.iter().any(|(_, h, _)| h == host) {
            return Ok(());
        }
        let mut allowed: Vec<String> = hosts.iter().map(HostPattern::shown).collect();
        allowed.extend(self.endpoints.iter().map(|(_, h, _)| h.clone()));
        Err(format!("host {host} is not allowed (hosts: {})", allowed.join(", ")))
    }

    /// Whether a request to `t` goes to an endpoint the operator configured (whose
    /// addresses are not checked).
    pub fn is_endpoint(&self, t: &Target) -> bool {
        self.endpoints.iter().any(|(s, h, p)| *s == t.scheme && t.host.as_ref() == Some(h) && t.port == Some(*p))
    }

    /// Whether `host` is the host of one of the operator's endpoints.
    pub fn is_endpoint_host(&self, host: &str) -> bool {
        self.endpoints.iter().any(|(_, h, _)| h == host)
    }

    /// Whether the addresses of `t` must be checked before connecting: an http(s) URL that
    /// is not one of the operator's endpoints.
    pub fn needs_address_check(&self, t: &Target) -> bool {
        t.scheme.has_host() && !self.is_endpoint(t)
    }

    /// Whether a connection to `ip` is allowed (public, or on an allowed network).
    pub fn address_allowed(&self, ip: IpAddr) -> bool {
        let class = classify(ip);
        class == AddressClass::Public || self.networks.contains(&class)
    }

    /// Checks every address `url`'s host resolved to; one on a network not allowed refuses
    /// the URL (a host with a public and a private address could be either).
    pub fn check_addresses(&self, url: &str, host: &str, addrs: &[IpAddr]) -> Result<(), Refusal> {
        for ip in addrs {
            if self.address_allowed(*ip) {
                continue;
            }
            let class = classify(*ip);
            let why = if AddressClass::ALLOWABLE.contains(&class) {
                format!("a {} address, not in private_networks", class.name())
            } else {
                format!("a {} address, which no policy allows", class.name())
            };
            let detail = if host.parse::<IpAddr>().is_ok() {
                format!("{ip} is {why}")
            } else {
                format!("host {host} resolves to {ip}, {why}")
            };
            return Err(Refusal { rule: Rule::PrivateNetworks, url: url::shown(url), detail });
        }
        Ok(())
    }

    /// Checks a source's size, once known (listed sizes, `Content-Length`, or bytes
    /// received so far).
    pub fn check_size(&self, url: &str, bytes: u64) -> Result<(), Refusal> {
        if bytes <= self.max_bytes {
            return Ok(());
        }
        Err(Refusal {
            rule: Rule::MaxBytes,
            url: url::shown(url),
            detail: format!("{} is more than max_bytes {}", show_size(bytes), show_size(self.max_bytes)),
        })
    }

    /// Checks that `need` more bytes fit on a filesystem with `free` bytes available,
    /// leaving the margin.
    pub fn check_space(&self, url: &str, need: u64, free: u64, dir: &Path) -> Result<(), Refusal> {
        if need.checked_add(self.margin).is_some_and(|n| n <= free) {
            return Ok(());
        }
        Err(Refusal {
            rule: Rule::FreeSpace,
            url: url::shown(url),
            detail: format!(
                "needs {} plus free_space_margin {}, and the filesystem of {} has {} free",
                show_size(need),
                show_size(self.margin),
                dir.display(),
                show_size(free)
            ),
        })
    }
}

/// A `hosts` entry: a DNS name or IP, or `*.` and a DNS name.
fn host_pattern(entry: &str) -> Result<HostPattern, String> {
    let e = entry.trim();
    let bad = |why: &str| format!("hosts: {entry:?} {why}");
    if e.contains("://") || e.contains('/') {
        return Err(bad("is not a host name (no scheme or path: huggingface.co, *.hf.co)"));
    }
    let (suffix, name) = match e.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, e),
    };
    if name.contains('*') {
        return Err(bad("may have a * only as its first label (*.example.com)"));
    }
    let name = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(name);
    let host = if name.parse::<std::net::Ipv6Addr>().is_ok() {
        name.to_ascii_lowercase()
    } else {
        let (host, port) = url::split_authority(name).map_err(|_| bad("is not a host name or IP address"))?;
        if port.is_some() {
            return Err(bad("names a port; hosts are matched without ports"));
        }
        host
    };
    Ok(if suffix { HostPattern::Suffix(format!(".{host}")) } else { HostPattern::Exact(host) })
}

/// A `paths` entry: normalised as the scheme's URLs are.
fn path_prefix(scheme: Scheme, entry: &str) -> Result<String, String> {
    let bad = |why: String| format!("paths.{scheme}: {entry:?} {why}");
    let e = entry.trim();
    let url = match scheme {
        Scheme::File if e.starts_with('/') => format!("file://{e}"),
        Scheme::File => return Err(bad("is not an absolute path".into())),
        Scheme::Http | Scheme::Https => format!("{scheme}://h/{}", e.trim_start_matches('/')),
        Scheme::Hf | Scheme::S3 => format!("{scheme}://{}", e.trim_start_matches('/')),
    };
    url::parse(&url).map(|t| t.path).map_err(|r| bad(r.detail))
}

/// A size: a YAML integer, or a string `N[B|KB|MB|GB|TB|KiB|MiB|GiB|TiB]`.
fn size_value(v: &serde_yaml::Value) -> Result<u64, String> {
    match v {
        serde_yaml::Value::Number(n) => n.as_u64().ok_or_else(|| format!("{n} is not a whole number of bytes")),
        serde_yaml::Value::String(s) => parse_size(s),
        other => Err(format!("{other:?} is not a size (an integer, or like 200GiB)")),
    }
}

/// `200GiB` → 200 × 2^30.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size (an integer, or like 200GiB)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "PiB" => 1 << 50,
        u => return Err(format!("{s:?}: unit {u:?} is not B, KB, MB, GB, TB, KiB, MiB, GiB, TiB or PiB")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

/// Bytes for messages: `1234 bytes (1.2 KiB)` style, exact first.
fn show_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = None;
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = Some(u);
    }
    match unit {
        None => format!("{n} bytes"),
        Some(u) => format!("{n} bytes ({v:.1} {u})"),
    }
}

#[cfg(test)]
mod tests;
