//! Prometheus text 0.0.4 from the OpenMetrics text `prometheus-client` writes: what every
//! role serves on `/metrics`. `promtool check metrics` and Prometheus's 0.0.4 parser read a
//! counter's `# TYPE` as naming its `_total` series, and know no `# UNIT` or `# EOF` lines;
//! served as OpenMetrics under a 0.0.4 content type, counters would be read as untyped.

/// OpenMetrics text (what prometheus-client writes) as Prometheus text 0.0.4, the format
/// `promtool check metrics` and every Prometheus read: a counter's HELP and TYPE name its
/// `_total` series, and the OpenMetrics-only `# UNIT` and `# EOF` lines go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::BTreeSet<&str> =
        openmetrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_counters_are_named_by_their_total_series() {
        let om = "# HELP x_starts Starts.\n# TYPE x_starts counter\nx_starts_total 3\n\
                  # HELP x_wait Wait.\n# TYPE x_wait histogram\n# UNIT x_wait seconds\nx_wait_count 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP x_starts_total Starts.\n# TYPE x_starts_total counter\nx_starts_total 3\n\
             # HELP x_wait Wait.\n# TYPE x_wait histogram\nx_wait_count 1\n"
        );
    }
}
