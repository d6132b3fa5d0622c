//! The environment an engine process starts with. It is not the agent's: the agent holds
//! credentials for its downloads (`AWS_*`, `HF_TOKEN`) and its own settings (`FLOTILLA_*`),
//! which an engine, running code chosen by whoever wrote the Model, must not see. The
//! engine's environment is cleared and rebuilt from the agent's with only the names of
//! [`DEFAULT_ALLOWED`] and those the operator lists with `--engine-env NAME[,NAME...]`
//! (exact names or `PREFIX_*` globs); the variables the agent sets for the engine itself
//! (`CUDA_VISIBLE_DEVICES`, `CUDA_DEVICE_ORDER`, `VLLM_API_KEY`) are laid over that with
//! [`overlay`]. Pure: the caller passes the agent's environment in.

/// Names every engine gets from the agent's environment (a trailing `*` is a prefix glob):
/// the basics of a process (PATH, HOME, locale, time zone, temp dir, user), the GPU stack
/// (CUDA, NCCL, NVIDIA container settings, and LD_LIBRARY_PATH, where CUDA installs often
/// put their libraries), vLLM's own settings, the Hugging Face cache and offline switches,
/// OpenMP threads, and the DO_NOT_TRACK telemetry opt-out. Not HF_TOKEN or any `AWS_*`.
pub const DEFAULT_ALLOWED: [&str; 17] = [
    "PATH",
    "HOME",
    "LANG",
    "LC_*",
    "TZ",
    "TMPDIR",
    "USER",
    "CUDA_*",
    "NCCL_*",
    "NVIDIA_*",
    "LD_LIBRARY_PATH",
    "VLLM_*",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "OMP_*",
    "DO_NOT_TRACK",
];

/// Names never inherited, whatever the allowlists say (a trailing `*` is a prefix glob):
/// the agent sets them itself, or they are not an engine's to have. An engine started
/// without a key must not pick up one the gateways do not know; the P/D connectors' side
/// channel (`VLLM_NIXL_*`) and LMCache's config file (`LMCACHE_CONFIG_FILE`) come from the
/// replica's `kv_transfer` role ([`crate::kv_transfer`]) or not at all, never from the
/// agent's environment or `--engine-env`.
pub const NEVER_INHERITED: [&str; 3] = ["VLLM_API_KEY", "VLLM_NIXL_*", "LMCACHE_CONFIG_FILE"];

fn never_inherited(name: &str) -> bool {
    NEVER_INHERITED.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == *p,
    })
}

/// A variable name an engine may inherit: exact, or every name with a prefix (`NAME_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvPattern {
    /// This name only.
    Exact(String),
    /// Every name starting with this (the text before the `*`).
    Prefix(String),
}

impl EnvPattern {
    /// `NAME` or `PREFIX*`: letters, digits and `_`, not starting with a digit; `*` only
    /// at the end, after at least one character (a lone `*` would pass everything).
    pub fn parse(s: &str) -> Result<EnvPattern, String> {
        let s = s.trim();
        let (name, glob) = match s.strip_suffix('*') {
            Some(p) => (p, true),
            None => (s, false),
        };
        let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(format!(
                "{s:?} is not a variable name or NAME_* glob (letters, digits and _, a * only at the end)"
            ));
        }
        Ok(if glob { EnvPattern::Prefix(name.to_string()) } else { EnvPattern::Exact(name.to_string()) })
    }

    /// Whether `name` passes.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            EnvPattern::Exact(n) => name == n,
            EnvPattern::Prefix(p) => name.starts_with(p.as_str()),
        }
    }
}

/// The variables of `parent` an engine inherits: those [`DEFAULT_ALLOWED`] or `extra_allowed`
/// names, except [`NEVER_INHERITED`], sorted by name.
pub fn engine_env(
    parent: impl Iterator<Item = (String, String)>,
    extra_allowed: &[EnvPattern],
) -> Vec<(String, String)> {
    let defaults: Vec<EnvPattern> =
        DEFAULT_ALLOWED.iter().map(|p| EnvPattern::parse(p).expect("the default allowlist is valid")).collect();
    let mut out: Vec<(String, String)> = parent
        .filter(|(k, _)| !never_inherited(k))
        .filter(|(k, _)| defaults.iter().chain(extra_allowed).any(|p| p.matches(k)))
        .collect();
    out.sort();
    out
}

/// `base` with `explicit` laid over it: an explicit variable replaces an inherited one of
/// the same name.
pub fn overlay(mut base: Vec<(String, String)>, explicit: &[(String, String)]) -> Vec<(String, String)> {
    base.retain(|(k, _)| !explicit.iter().any(|(e, _)| e == k));
    base.extend(explicit.iter().cloned());
    base
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn names(env: &[(String, String)]) -> Vec<&str> {
        env.iter().map(|(k, _)| k.as_str()).collect()
    }

    #[test]
    fn only_allowed_names_reach_the_engine() {
        let parent = vars(&[
            ("PATH", "/usr/bin"),
            ("HOME", "/home/a"),
            ("LC_ALL", "C.UTF-8"),
            ("CUDA_HOME", "/usr/local/cuda"),
            ("NCCL_DEBUG", "INFO"),
            ("VLLM_CPU_KVCACHE_SPACE", "1"),
            ("HF_HUB_OFFLINE", "1"),
            ("TRANSFORMERS_OFFLINE", "1"),
            ("OMP_NUM_THREADS", "4"),
            ("AWS_ACCESS_KEY_ID", "AKIA"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
            ("HF_TOKEN", "hf_secret"),
            ("HF_ENDPOINT", "https://hf.example"),
            ("FLOTILLA_S3_ENDPOINT", "https://s3.example"),
            ("MY_SETTING", "x"),
            ("VLLMX", "not a VLLM_ name"),
            ("VLLM_API_KEY", "the agent's own, not the engine's"),
            ("path", "lower case is another name"),
        ]);
        let env = engine_env(parent.into_iter(), &[]);
        assert_eq!(
            names(&env),
            [
                "CUDA_HOME",
                "HF_HUB_OFFLINE",
                "HOME",
                "LC_ALL",
                "NCCL_DEBUG",
                "OMP_NUM_THREADS",
                "PATH",
                "TRANSFORMERS_OFFLINE",
                "VLLM_CPU_KVCACHE_SPACE"
            ]
        );
        assert!(env.contains(&("VLLM_CPU_KVCACHE_SPACE".into(), "1".into())), "values pass unchanged");
    }

    #[test]
    fn the_operator_can_let_more_through() {
        let parent = vars(&[("HF_TOKEN", "t"), ("MY_A", "1"), ("MY_B", "2"), ("MYC", "3"), ("AWS_REGION", "eu")]);
        let extra = [EnvPattern::parse("HF_TOKEN").unwrap(), EnvPattern::parse("MY_*").unwrap()];
        assert_eq!(names(&engine_env(parent.into_iter(), &extra)), ["HF_TOKEN", "MY_A", "MY_B"]);
        let key = vars(&[("VLLM_API_KEY", "k")]);
        let listed = [EnvPattern::parse("VLLM_API_KEY").unwrap()];
        assert!(engine_env(key.into_iter(), &listed).is_empty(), "only the agent sets an engine's key");
        let pd = vars(&[
            ("VLLM_NIXL_SIDE_CHANNEL_HOST", "10.9.9.9"),
            ("VLLM_NIXL_SIDE_CHANNEL_PORT", "5600"),
            ("LMCACHE_CONFIG_FILE", "/tmp/evil.yaml"),
            ("VLLM_NIXLX", "not under VLLM_NIXL_"),
        ]);
        let listed = [
            EnvPattern::parse("VLLM_NIXL_SIDE_CHANNEL_HOST").unwrap(),
            EnvPattern::parse("LMCACHE_*").unwrap(),
            EnvPattern::parse("VLLM_*").unwrap(),
        ];
        assert_eq!(
            names(&engine_env(pd.into_iter(), &listed)),
            ["VLLM_NIXLX"],
            "connector settings come from the replica's role only"
        );
    }

    #[test]
    fn patterns_parse_or_say_why_not() {
        for (text, want) in [
            ("HF_TOKEN", Ok(EnvPattern::Exact("HF_TOKEN".into()))),
            (" MY_* ", Ok(EnvPattern::Prefix("MY_".into()))),
            ("_X", Ok(EnvPattern::Exact("_X".into()))),
            ("*", Err(())),
            ("", Err(())),
            ("1ABC", Err(())),
            ("A*B", Err(())),
            ("A-B", Err(())),
            ("A=B", Err(())),
        ] {
            assert_eq!(EnvPattern::parse(text).map_err(|_| ()), want, "{text:?}");
        }
        assert!(EnvPattern::parse("A*B").unwrap_err().contains("\"A*B\""));
    }

    #[test]
    fn explicit_variables_replace_inherited_ones() {
        let base = vars(&[("PATH", "/bin"), ("VLLM_API_KEY", "from the agent's environment")]);
        let env = overlay(base, &vars(&[("VLLM_API_KEY", "k"), ("CUDA_VISIBLE_DEVICES", "0,1")]));
        assert_eq!(env, vars(&[("PATH", "/bin"), ("VLLM_API_KEY", "k"), ("CUDA_VISIBLE_DEVICES", "0,1")]));
    }
}
