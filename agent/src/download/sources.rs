//! The download flags (`--source-policy`, `--hf-endpoint`, `--s3-endpoint`) and what they
//! build: the source [`Policy`] and a [`Downloader`]. Shared by the agent (model weights,
//! adapters) and the gateway (a Model's tokenizer files for `kv-aware` routing), so both
//! read sources under the same rules and an operator writes one policy file for both.

use std::path::{Path, PathBuf};

use super::{s3, Downloader};
use crate::http::HttpClient;
use crate::source_policy::{Context, Policy, PolicyFile};

/// The flags of a process that downloads from Model and Adapter sources.
#[derive(clap::Args, Debug, Clone)]
pub struct SourceArgs {
    /// YAML file saying which model and adapter sources this process downloads: `schemes`,
    /// `hosts` (exact or `*.suffix`), `paths` per scheme, `private_networks` allowed,
    /// `max_bytes` per source, `free_space_margin`. Unknown fields are refused. Default:
    /// file, https, hf and s3 from any public host, 200GiB per source; a process whose
    /// address is loopback also allows http and loopback hosts. See docs/security.md.
    #[arg(long)]
    pub source_policy: Option<PathBuf>,
    /// Hugging Face endpoint for hf:// sources (token from HF_TOKEN).
    #[arg(long, env = "HF_ENDPOINT", default_value = "https://huggingface.co")]
    pub hf_endpoint: String,
    /// S3-compatible endpoint for s3:// sources (credentials from AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY, region from AWS_REGION, default us-east-1).
    #[arg(long, env = "FLOTILLA_S3_ENDPOINT", default_value = "https://s3.amazonaws.com")]
    pub s3_endpoint: String,
}

/// A flag and why its value is refused.
pub type FlagError = (&'static str, String);

impl SourceArgs {
    /// The source policy: `--source-policy`'s file, or the defaults. `loopback`: the process
    /// serves on a loopback address (dev, tests), which also allows http and loopback
    /// targets by default; `data_dir`: the cache a `file://` source may never name.
    pub fn policy(&self, loopback: bool, data_dir: &Path) -> Result<Policy, FlagError> {
        let mut endpoints = Vec::new();
        for (flag, url) in [("hf-endpoint", &self.hf_endpoint), ("s3-endpoint", &self.s3_endpoint)] {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err((flag, format!("{url:?} must start with http:// or https://")));
            }
            endpoints.push(Context::endpoint(url.trim_end_matches('/')).map_err(|e| (flag, e))?);
        }
        let ctx = Context { loopback, endpoints, data_dir: absolute(data_dir) };
        let Some(path) = &self.source_policy else { return Ok(Policy::defaults(&ctx)) };
        let text = std::fs::read_to_string(path)
            .map_err(|e| ("source-policy", format!("cannot read {}: {e}", path.display())))?;
        PolicyFile::parse(&text)
            .and_then(|f| Policy::new(&f, &ctx))
            .map_err(|e| ("source-policy", format!("{}: {e}", path.display())))
    }

    /// A downloader caching under `root`, fetching what `policy` allows.
    pub fn downloader(&self, root: PathBuf, policy: Policy) -> Result<Downloader, FlagError> {
        let http = HttpClient::guarded(policy.clone()).map_err(|e| ("hf-endpoint", e))?;
        let s3 = s3::S3Config::from_env(self.s3_endpoint.trim_end_matches('/'));
        Ok(Downloader::new(root, http, self.hf_endpoint.trim_end_matches('/'), s3, policy))
    }
}

/// `dir` made absolute against the working directory, `.` and `..` resolved lexically.
pub fn absolute(dir: &Path) -> Option<String> {
    use std::path::Component;
    let abs = std::path::absolute(dir).ok()?;
    let mut parts: Vec<String> = Vec::new();
    for c in abs.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str()?.to_string()),
            Component::ParentDir => {
                parts.pop();
            }
            _ => {}
        }
    }
    Some(format!("/{}", parts.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(policy: Option<PathBuf>, hf: &str) -> SourceArgs {
        SourceArgs { source_policy: policy, hf_endpoint: hf.into(), s3_endpoint: "https://s3.amazonaws.com".into() }
    }

    #[test]
    fn bad_flags_are_named_and_a_policy_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(args(None, "ftp://x").policy(false, dir.path()).unwrap_err().0, "hf-endpoint");
        let missing = args(Some(dir.path().join("nope.yaml")), "https://huggingface.co");
        assert_eq!(missing.policy(false, dir.path()).unwrap_err().0, "source-policy");
        let file = dir.path().join("p.yaml");
        std::fs::write(&file, "schemes: [hf]\n").unwrap();
        let p = args(Some(file.clone()), "https://huggingface.co").policy(false, dir.path()).unwrap();
        assert!(p.check("hf://org/m").is_ok());
        assert!(p.check("file:///models/m").is_err(), "the file's schemes rule");
        std::fs::write(&file, "schemes: [hf]\nbogus: 1\n").unwrap();
        let e = args(Some(file), "https://huggingface.co").policy(false, dir.path()).unwrap_err();
        assert!(e.1.contains("bogus"), "{e:?}");
        // the cache itself is never a file:// source
        let defaults = args(None, "https://huggingface.co").policy(false, dir.path()).unwrap();
        assert!(defaults.check(&format!("file://{}/x", dir.path().display())).is_err());
    }

    #[test]
    fn absolute_resolves_dots() {
        assert_eq!(absolute(Path::new("/a/b/../c/./d")).as_deref(), Some("/a/c/d"));
    }
}
