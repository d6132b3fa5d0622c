//! `flotilla gateway`: the gateway's own flags ([`flotilla_gateway::GatewayArgs`]) plus
//! where it fetches Models' tokenizer files from: the agent's downloader and cache
//! ([`flotilla_agent::download`]) restricted to the tokenizer files, under the same source
//! flags and policy as agents. Lives in the binary because it joins the two crates.
//!
//! With `--federation SERVERS` (flattened into the gateway's flags,
//! [`flotilla_gateway::federation::FederationArgs`]) the same command runs the global gateway
//! of a federation instead: it routes to member clusters' gateways and fetches no tokenizers.

use std::path::PathBuf;
use std::sync::Arc;

use flotilla_agent::download::sources::SourceArgs;
use flotilla_agent::download::{Downloader, FileSet};
use flotilla_gateway::source_tokenizers::{Fetch, FetchTokenizer, TokenizerFetcher, TOKENIZER_FILES};

use crate::error::CliError;

/// The files of a model source a gateway fetches.
pub const TOKENIZER_SET: FileSet =
    FileSet { name: "tokenizer", keep: |p| TOKENIZER_FILES.iter().any(|f| p.to_str() == Some(*f)) };

#[derive(clap::Args, Debug)]
pub(crate) struct GatewayCmd {
    #[command(flatten)]
    pub gateway: flotilla_gateway::GatewayArgs,
    /// Directory caching the tokenizer files of Models routed on token ids (`kv-aware`,
    /// `auto`), fetched from each Model's own source (never its weights). Default:
    /// $CACHE_DIRECTORY (systemd's CacheDirectory=), else $XDG_CACHE_HOME/flotilla/tokenizers,
    /// else ~/.cache/flotilla/tokenizers.
    #[arg(long, env = "FLOTILLA_TOKENIZER_CACHE", value_name = "DIR")]
    pub tokenizer_cache: Option<PathBuf>,
    /// Do not fetch tokenizers from Models' sources: only `--tokenizer` and sim engines key
    /// prompts with token ids; other models are keyed approximately.
    #[arg(long)]
    pub no_fetch_tokenizers: bool,
    /// Where tokenizer files may come from: `--source-policy`, `--hf-endpoint`, `--s3-endpoint`.
    #[command(flatten)]
    pub sources: SourceArgs,
}

impl GatewayCmd {
    /// The gateway's args with the tokenizer fetcher filled in (unless turned off).
    pub fn into_args(self) -> Result<flotilla_gateway::GatewayArgs, CliError> {
        let mut args = self.gateway;
        // the global gateway keys no prompts: its upstreams are gateways, not engines
        let global = args.federation.federation.is_some();
        if !self.no_fetch_tokenizers && !global {
            let loopback = args.listen.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip().is_loopback());
            let cache = self.tokenizer_cache.unwrap_or_else(default_cache);
            args.tokenizer_fetcher = Some(fetcher(&self.sources, cache, loopback)?);
        }
        Ok(args)
    }
}

/// The default `--tokenizer-cache`.
fn default_cache() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("CACHE_DIRECTORY")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("flotilla/tokenizers")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/flotilla/tokenizers")))
        .unwrap_or_else(|| PathBuf::from(".flotilla-tokenizers"))
}

/// A fetcher of tokenizer files into `cache`, under `sources`' policy. The directory is
/// made (private) when the first fetch needs it.
pub fn fetcher(sources: &SourceArgs, cache: PathBuf, loopback: bool) -> Result<TokenizerFetcher, CliError> {
    let flag = |(flag, e): (&str, String)| CliError::usage(format!("--{flag}: {e}"));
    let policy = sources.policy(loopback, &cache).map_err(flag)?;
    let downloader = Arc::new(sources.downloader(cache.clone(), policy).map_err(flag)?);
    Ok(TokenizerFetcher(Arc::new(SourceFetcher { downloader, cache })))
}

struct SourceFetcher {
    downloader: Arc<Downloader>,
    cache: PathBuf,
}

impl FetchTokenizer for SourceFetcher {
    fn fetch(&self, source: String) -> Fetch {
        let (d, cache) = (self.downloader.clone(), self.cache.clone());
        Box::pin(async move {
            flotilla_security::private_dir::ensure(&cache).map_err(|e| format!("{}: {e}", cache.display()))?;
            d.fetch_files(&source, &TOKENIZER_SET, &|_| {}).await
        })
    }
    fn shown(&self, source: &str) -> String {
        flotilla_agent::source_policy::url::shown(source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_set_is_the_tokenizer_files_at_the_top() {
        let keep = |p: &str| (TOKENIZER_SET.keep)(std::path::Path::new(p));
        assert!(keep("tokenizer.json") && keep("tokenizer_config.json") && keep("chat_template.jinja"));
        assert!(!keep("model.safetensors") && !keep("sub/tokenizer.json") && !keep("config.json"));
    }
}
