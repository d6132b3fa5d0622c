//! Prometheus text format: families by TYPE line with their samples' label-name sets and
//! histogram buckets, and their comparison.

use std::collections::{BTreeMap, BTreeSet};

use super::{diff, known, Difference, KnownDifference};

/// One metric family of a scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Family {
    /// `counter`, `gauge`, `histogram`, `summary` or `untyped`.
    pub kind: String,
    /// Each sample's name suffix (`""`, `_bucket`, `_sum`, ...) with its sorted label names.
    pub label_sets: BTreeSet<(String, Vec<String>)>,
    /// The `le` values of `_bucket` samples, normalised (`1.0`, `+Inf`).
    pub buckets: BTreeSet<String>,
}

/// A scrape's families by TYPE-line name.
pub type Scrape = BTreeMap<String, Family>;

/// Label names and values of `k="v",...` (escapes kept).
fn labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while let Some((k, v)) = rest.split_once("=\"") {
        let bytes = v.as_bytes();
        let mut end = 0;
        while end < bytes.len() && bytes[end] != b'"' {
            end += if bytes[end] == b'\\' { 2 } else { 1 };
        }
        let end = end.min(v.len());
        out.push((k.trim().trim_start_matches(',').trim().to_string(), v[..end].to_string()));
        rest = v.get(end + 1..).unwrap_or("");
    }
    out
}

fn normalise_le(le: &str) -> String {
    match le.parse::<f64>() {
        Ok(f) if f.is_infinite() => "+Inf".to_string(),
        Ok(f) => format!("{f:?}"),
        Err(_) => le.to_string(),
    }
}

/// Parses Prometheus text format: `# TYPE` lines and samples (HELP and comments skipped).
/// A sample belongs to the family of its own name, or of its name less `_bucket`, `_count`,
/// `_sum` (histograms, summaries), or `_total`; samples with no TYPE are `untyped`.
pub fn parse_metrics(text: &str) -> Scrape {
    let mut fams = Scrape::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (it.next(), it.next()) {
                fams.entry(name.to_string()).or_default().kind = kind.to_string();
            }
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let series = match line.rfind('}') {
            Some(close) => &line[..=close],
            None => line.split_whitespace().next().unwrap_or(line),
        };
        let (sample, label_text) = match series.split_once('{') {
            Some((n, l)) => (n, l.strip_suffix('}').unwrap_or(l)),
            None => (series, ""),
        };
        let family = ["", "_bucket", "_count", "_sum", "_total"].iter().find_map(|suffix| {
            let f = sample.strip_suffix(suffix)?;
            fams.contains_key(f).then(|| (f.to_string(), suffix.to_string()))
        });
        let (family, suffix) = family.unwrap_or_else(|| (sample.to_string(), String::new()));
        let pairs = labels(label_text);
        let fam = fams.entry(family).or_insert_with(|| Family { kind: "untyped".into(), ..Family::default() });
        if suffix == "_bucket" {
            if let Some((_, le)) = pairs.iter().find(|(k, _)| k == "le") {
                fam.buckets.insert(normalise_le(le));
            }
        }
        let mut names: Vec<String> = pairs.into_iter().map(|(k, _)| k).collect();
        names.sort();
        fam.label_sets.insert((suffix, names));
    }
    fams
}

/// The family names of a scrape.
pub fn family_names(text: &str) -> Vec<String> {
    parse_metrics(text).into_keys().collect()
}

fn resolve<'a>(scrape: &'a Scrape, name: &str) -> Option<(String, &'a Family)> {
    [name.to_string(), format!("{name}_total")].into_iter().find_map(|n| scrape.get(&n).map(|f| (n, f)))
}

fn show_set(sets: &[&(String, Vec<String>)]) -> String {
    sets.iter().map(|(suffix, names)| format!("{suffix}{{{}}}", names.join(","))).collect::<Vec<_>>().join(" ")
}

/// Compares the named families of two scrapes: present in both, same TYPE, the same
/// label-name sets per sample suffix, and for histograms the same bucket `le` set. A name
/// may omit a counter's `_total`. Families a known difference (`metric:NAME`) covers are
/// skipped.
pub fn metrics_diff(
    sim_text: &str,
    real_text: &str,
    families: &[&str],
    ignored: &[KnownDifference],
) -> Vec<Difference> {
    let (sim, real) = (parse_metrics(sim_text), parse_metrics(real_text));
    let mut out = Vec::new();
    for name in families {
        let path = format!("metric:{name}");
        if known(&path, ignored).is_some() {
            continue;
        }
        let (s, r) = (resolve(&sim, name), resolve(&real, name));
        let ((sname, s), (_, r)) = match (s, r) {
            (Some(s), Some(r)) => (s, r),
            (None, Some(_)) => {
                out.push(diff(path, "real vLLM has this family, sim does not"));
                continue;
            }
            (Some(_), None) => {
                out.push(diff(path, "sim has this family, real vLLM does not"));
                continue;
            }
            (None, None) => {
                out.push(diff(path, "in neither scrape (renamed in this vLLM version?)"));
                continue;
            }
        };
        let path = format!("metric:{sname}");
        if s.kind != r.kind {
            out.push(diff(&path, format!("sim's TYPE is {}, real vLLM's {}", s.kind, r.kind)));
        }
        let only_sim: Vec<_> = s.label_sets.difference(&r.label_sets).collect();
        let only_real: Vec<_> = r.label_sets.difference(&s.label_sets).collect();
        if !only_sim.is_empty() {
            out.push(diff(&path, format!("label names only the sim writes: {}", show_set(&only_sim))));
        }
        if !only_real.is_empty() {
            out.push(diff(&path, format!("label names only real vLLM writes: {}", show_set(&only_real))));
        }
        if s.kind == "histogram" && s.buckets != r.buckets {
            let extra: Vec<_> = s.buckets.difference(&r.buckets).cloned().collect();
            let missing: Vec<_> = r.buckets.difference(&s.buckets).cloned().collect();
            out.push(diff(
                &path,
                format!("bucket bounds differ: only sim le={extra:?}, only real vLLM le={missing:?}"),
            ));
        }
    }
    out
}

/// Real vLLM's families that the sim does not emit at all (informational; compare with
/// [`KNOWN_DIFFERENCES`] to see which are deliberate).
pub fn missing_families(sim_text: &str, real_text: &str) -> Vec<String> {
    let sim = parse_metrics(sim_text);
    parse_metrics(real_text).into_keys().filter(|n| !sim.contains_key(n)).collect()
}
