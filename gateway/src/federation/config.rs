//! The global gateway's own flags ([`FederationArgs`], flattened into `flotilla gateway`'s)
//! and its validated [`FedConfig`]: the federation servers, the default region, the member
//! key and CA, and the intervals and bounds of polling, failover and spillover. The flags it
//! shares with the cluster gateway (`--listen`, `--no-auth`, body and timeout bounds, HTTPS,
//! `--metrics-listen`) are validated by [`GatewayArgs::validate`] as there.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, GatewayArgs};
use crate::error::GatewayError;

/// `flotilla gateway --federation SERVERS ...`: the global gateway tier.
#[derive(Debug, Clone, clap::Args)]
pub struct FederationArgs {
    /// Run the global gateway of a federation: route each request to a member cluster's
    /// gateway (the `spec.gateway` of the federation's `Cluster` objects) by model, health,
    /// region and latency, failing over and spilling over between clusters. SERVERS is a
    /// comma-separated list of federation servers' gRPC addresses (`flotilla server
    /// --federation`), e.g. `10.0.0.1:7070,10.0.0.2:7070`; Clusters are listed from any of
    /// them, and the last list stays in force while none answers. Not with `--backend` or the
    /// global `--server` (a cluster's servers).
    #[arg(
        long = "federation",
        value_name = "SERVERS",
        env = "FLOTILLA_GATEWAY_FEDERATION",
        conflicts_with = "backends"
    )]
    pub federation: Option<String>,
    /// Federation: the region requests prefer when they send no `x-flotilla-region` header,
    /// matched against the `region` label of the Clusters (e.g. `us-east`). Other regions
    /// still serve when the region's clusters are down, saturated or lack the model.
    #[arg(long, value_name = "REGION", env = "FLOTILLA_GATEWAY_REGION")]
    pub region: Option<String>,
    /// Federation: a file holding an API key of the member clusters' gateways, sent as the
    /// bearer token on the global gateway's own `GET /v1/models` polls (which models each
    /// member serves); its tenant should be allowed every model. Clients' requests carry
    /// their own `Authorization`, passed through unchanged: a tenant must exist with the same
    /// key in every member cluster. Without it the polls carry no key (members with
    /// `--no-auth`).
    #[arg(long, value_name = "FILE", env = "FLOTILLA_GATEWAY_MEMBER_KEY_FILE")]
    pub member_key_file: Option<PathBuf>,
    /// Federation: a CA bundle (PEM) to verify `https://` member gateways with, instead of
    /// the built-in Mozilla roots (a company CA).
    #[arg(long, value_name = "FILE", env = "FLOTILLA_GATEWAY_MEMBER_CA_FILE")]
    pub member_ca_file: Option<PathBuf>,
    /// Federation: how often the Clusters are listed from the federation servers, in
    /// milliseconds (100 to 600000).
    #[arg(long, default_value_t = 2_000, value_name = "MS")]
    pub cluster_list_interval_ms: u64,
    /// Federation: how often each member gateway's `GET /v1/models` is polled (its models,
    /// health and latency), in milliseconds (100 to 600000).
    #[arg(long, default_value_t = 2_000, value_name = "MS")]
    pub member_poll_interval_ms: u64,
    /// Federation: longest wait for a member's `/v1/models` answer (a poll, or a client's
    /// merged `/v1/models`), in milliseconds (100 to 60000).
    #[arg(long, default_value_t = 2_000, value_name = "MS")]
    pub member_poll_timeout_ms: u64,
    /// Federation: a member whose gateway refuses connections or times out is down and
    /// probed again after this many milliseconds, doubling on each failed probe up to 16x
    /// (10 to 60000); it is back as soon as a probe answers.
    #[arg(long, default_value_t = 500, value_name = "MS")]
    pub member_down_backoff_ms: u64,
    /// Federation: a streamed request whose cluster has not sent its response head after
    /// this many milliseconds (it is queued there) spills over to the next cluster, closing
    /// the first attempt; the last cluster tried waits up to --upstream-timeout-s. 0: never
    /// (at most 3600000). Not for non-streamed requests, whose head comes with the whole
    /// answer.
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    pub spill_after_ms: u64,
    /// Federation: most clusters one request is tried on (1 to 16).
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub max_clusters_per_request: u32,
}

/// The validated configuration of the global gateway.
#[derive(Clone)]
pub struct FedConfig {
    /// The shared flags (listen, auth, bounds, timeouts, HTTPS, metrics listener).
    pub base: Config,
    /// Federation servers' gRPC addresses.
    pub servers: Vec<String>,
    pub region: Option<String>,
    /// `Bearer KEY` for the member polls.
    pub member_key: Option<String>,
    /// TLS to `https://` member gateways.
    pub member_tls: Arc<rustls::ClientConfig>,
    pub list_interval: Duration,
    pub poll_interval: Duration,
    pub poll_timeout: Duration,
    pub down_backoff: Duration,
    /// None: no spillover on queue wait.
    pub spill_after: Option<Duration>,
    pub max_clusters: usize,
}

impl std::fmt::Debug for FedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FedConfig")
            .field("listen", &self.base.listen)
            .field("servers", &self.servers)
            .field("region", &self.region)
            .field("member_key", &self.member_key.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// The binary's `--server` default, which it passes when the flag is not given.
const CLI_DEFAULT_SERVER: &str = "127.0.0.1:7070";

/// The longest region name (a DNS label's length).
pub const MAX_REGION: usize = 63;

/// Parses `--federation`: comma-separated `host:port` or `http(s)://host:port`, at least one.
pub fn parse_servers(s: &str) -> Result<Vec<String>, GatewayError> {
    let bad = |why: String| {
        GatewayError::Usage(format!(
            "--federation {s:?}: {why} (expected the federation servers' gRPC addresses, comma-separated, e.g. 10.0.0.1:7070,10.0.0.2:7070)"
        ))
    };
    let mut out = Vec::new();
    for part in s.split(',') {
        let a = part.trim();
        if a.is_empty() {
            return Err(bad("an empty address".into()));
        }
        let rest = a.strip_prefix("https://").or_else(|| a.strip_prefix("http://")).unwrap_or(a);
        let rest = rest.trim_end_matches('/');
        let ok = !a.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
            && rest.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
        if !ok {
            return Err(bad(format!("{a:?} is not HOST:PORT")));
        }
        if out.iter().any(|o| o == a) {
            return Err(bad(format!("{a:?} is given twice")));
        }
        out.push(a.to_string());
    }
    Ok(out)
}

/// Checks a region name (the flag's or a request header's): 1 to 63 visible ASCII
/// characters without spaces or commas.
pub fn check_region(r: &str) -> Result<(), String> {
    if r.is_empty() || r.len() > MAX_REGION || !r.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
        return Err(format!("{r:?} is not a region name (1-{MAX_REGION} visible ASCII characters, no commas)"));
    }
    Ok(())
}

fn in_range(flag: &str, v: u64, lo: u64, hi: u64) -> Result<(), GatewayError> {
    if !(lo..=hi).contains(&v) {
        return Err(GatewayError::Usage(format!("{flag} {v} is not within {lo}..={hi}")));
    }
    Ok(())
}

/// Reads `--member-key-file`: one printable ASCII token (surrounding whitespace ignored).
fn read_key(path: &std::path::Path) -> Result<String, GatewayError> {
    let bad = |why: String| GatewayError::Usage(format!("--member-key-file {}: {why}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let key = text.trim();
    if key.is_empty() || key.len() > 4096 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("not one API key (printable ASCII, no spaces)".into()));
    }
    Ok(key.to_string())
}

/// The TLS client configuration for `https://` members: the Mozilla roots, or the CA file's.
fn member_tls(ca: Option<&std::path::Path>) -> Result<rustls::ClientConfig, GatewayError> {
    use hyper_rustls::ConfigBuilderExt as _;
    use rustls_pki_types::pem::PemObject as _;
    let builder = rustls::ClientConfig::builder_with_provider(flotilla_security::crypto::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| GatewayError::Usage(format!("TLS: {e}")))?;
    let Some(path) = ca else { return Ok(builder.with_webpki_roots().with_no_client_auth()) };
    let bad = |why: String| GatewayError::Usage(format!("--member-ca-file {}: {why}", path.display()));
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("not PEM certificates: {e}")))?;
        roots.add(cert).map_err(|e| bad(format!("a certificate is not a CA rustls accepts: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

impl FedConfig {
    /// Validates `args` for the global gateway (`args.federation.federation` is set).
    pub fn from_args(args: &GatewayArgs) -> Result<FedConfig, GatewayError> {
        let f = &args.federation;
        let Some(list) = &f.federation else {
            return Err(GatewayError::Usage("the global gateway needs --federation SERVERS".into()));
        };
        let servers = parse_servers(list)?;
        if !args.backends.is_empty() {
            return Err(GatewayError::Usage(
                "--federation and --backend do not go together: the global gateway's upstreams are the member clusters' gateways".into(),
            ));
        }
        // The binary fills `server` from its global `--server` (its default when not given):
        // a cluster's servers mean nothing to the global gateway, so naming some is a mistake.
        if !args.server.is_empty() && args.server != [CLI_DEFAULT_SERVER] {
            return Err(GatewayError::Usage(format!(
                "--server {:?} names a cluster's servers; the global gateway lists the member clusters from the federation servers given to --federation",
                args.server.join(",")
            )));
        }
        if let Some(r) = &f.region {
            check_region(r).map_err(|e| GatewayError::Usage(format!("--region {e}")))?;
        }
        in_range("--cluster-list-interval-ms", f.cluster_list_interval_ms, 100, 600_000)?;
        in_range("--member-poll-interval-ms", f.member_poll_interval_ms, 100, 600_000)?;
        in_range("--member-poll-timeout-ms", f.member_poll_timeout_ms, 100, 60_000)?;
        in_range("--member-down-backoff-ms", f.member_down_backoff_ms, 10, 60_000)?;
        in_range("--spill-after-ms", f.spill_after_ms, 0, 3_600_000)?;
        in_range("--max-clusters-per-request", u64::from(f.max_clusters_per_request), 1, 16)?;
        let member_key = f.member_key_file.as_deref().map(read_key).transpose()?;
        let member_tls = member_tls(f.member_ca_file.as_deref())?;
        // the shared flags, checked as the cluster gateway checks them (the servers stand
        // in for the endpoint source it requires)
        let base = GatewayArgs { server: servers.clone(), ..args.clone() }.validate()?;
        let ms = Duration::from_millis;
        Ok(FedConfig {
            base,
            servers,
            region: f.region.clone(),
            member_key,
            member_tls: Arc::new(member_tls),
            list_interval: ms(f.cluster_list_interval_ms),
            poll_interval: ms(f.member_poll_interval_ms),
            poll_timeout: ms(f.member_poll_timeout_ms),
            down_backoff: ms(f.member_down_backoff_ms),
            spill_after: (f.spill_after_ms > 0).then(|| ms(f.spill_after_ms)),
            max_clusters: f.max_clusters_per_request as usize,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(fed: &str) -> GatewayArgs {
        let mut a = GatewayArgs::default();
        a.federation.federation = Some(fed.into());
        a
    }

    #[test]
    fn federation_servers_parse_or_name_the_fault() {
        assert_eq!(parse_servers("10.0.0.1:7070").unwrap(), ["10.0.0.1:7070"]);
        assert_eq!(parse_servers("a:1, http://b:2,https://c:3/").unwrap(), ["a:1", "http://b:2", "https://c:3/"]);
        for (bad, want) in [
            ("", "an empty address"),
            ("a:1,,b:2", "an empty address"),
            ("nonsense", "\"nonsense\" is not HOST:PORT"),
            ("a:0", "is not HOST:PORT"),
            ("a:70000", "is not HOST:PORT"),
            ("a b:1", "is not HOST:PORT"),
            ("http://a/x:1", "is not HOST:PORT"),
            ("a:1,a:1", "given twice"),
        ] {
            let e = parse_servers(bad).unwrap_err();
            assert!(
                e.is_usage() && e.to_string().contains(want) && e.to_string().contains("--federation"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn the_config_takes_the_shared_flags_and_checks_its_own() {
        let mut a = args("127.0.0.1:7070");
        a.server = vec![CLI_DEFAULT_SERVER.into()];
        let c = FedConfig::from_args(&a).unwrap();
        assert_eq!(c.servers, ["127.0.0.1:7070"]);
        assert_eq!((c.list_interval, c.poll_interval), (Duration::from_secs(2), Duration::from_secs(2)));
        assert_eq!((c.spill_after, c.max_clusters), (Some(Duration::from_secs(10)), 3));
        assert!(c.base.auth, "auth is on by default");
        assert_eq!(c.base.max_body_bytes, 4 * 1024 * 1024);
        let mut a = args("127.0.0.1:7070");
        a.federation.spill_after_ms = 0;
        assert_eq!(FedConfig::from_args(&a).unwrap().spill_after, None);
        type Edit = Box<dyn Fn(&mut GatewayArgs)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|a| a.federation.region = Some("us east".into())), "--region"),
            (Box::new(|a| a.federation.region = Some(String::new())), "--region"),
            (Box::new(|a| a.federation.max_clusters_per_request = 0), "--max-clusters-per-request"),
            (Box::new(|a| a.federation.member_poll_interval_ms = 10), "--member-poll-interval-ms"),
            (Box::new(|a| a.federation.spill_after_ms = 4_000_000), "--spill-after-ms"),
            (Box::new(|a| a.backends = vec!["m=127.0.0.1:1".into()]), "--backend"),
            (Box::new(|a| a.federation.member_key_file = Some("/nonexistent/key".into())), "--member-key-file"),
            (Box::new(|a| a.federation.member_ca_file = Some("/nonexistent/ca".into())), "--member-ca-file"),
            (Box::new(|a| a.max_body_bytes = 10), "--max-body-bytes"),
            (
                Box::new(|a| a.server = vec!["10.0.0.1:7070".into()]),
                "--server \"10.0.0.1:7070\" names a cluster's servers",
            ),
        ];
        for (edit, want) in cases {
            let mut a = args("127.0.0.1:7070");
            edit(&mut a);
            let e = FedConfig::from_args(&a).err().unwrap_or_else(|| panic!("{want}: accepted"));
            assert!(e.is_usage() && e.to_string().contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn the_member_key_is_read_from_its_file_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        std::fs::write(&p, "  sk-member-1\n").unwrap();
        let mut a = args("127.0.0.1:7070");
        a.federation.member_key_file = Some(p.clone());
        let c = FedConfig::from_args(&a).unwrap();
        assert_eq!(c.member_key.as_deref(), Some("sk-member-1"));
        assert!(!format!("{c:?}").contains("sk-member-1"));
        std::fs::write(&p, "two words").unwrap();
        assert!(FedConfig::from_args(&a).unwrap_err().to_string().contains("not one API key"));
    }

    #[test]
    fn regions_are_bounded_names() {
        assert!(check_region("us-east-1").is_ok());
        for bad in ["", "a b", "a,b", &"r".repeat(64), "é"] {
            assert!(check_region(bad).is_err(), "{bad:?}");
        }
    }
}
