//! `flotilla audit`: the cluster's audit log, who made which write through the API and how
//! it ended (docs/security.md). Needs an admin.
use clap::Args;
use flotilla_api::pb::{AuditEntry, AuditRequest};
use serde_json::json;

use crate::client::Client;
use crate::error::CliError;
use crate::output::{self, Format};

#[derive(Args, Debug)]
pub(crate) struct AuditArgs {
    /// Only entries at or after this store revision.
    #[arg(long, default_value_t = 0)]
    since: u64,
    /// Only callers whose identity (role/name) contains this.
    #[arg(long, default_value = "")]
    who: String,
    /// At most this many entries, the newest (1 to 10000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    limit: u32,
}

pub(crate) async fn run(client: &Client, a: AuditArgs, format: Format) -> Result<(), CliError> {
    let req = AuditRequest { since_revision: a.since, who: a.who, limit: a.limit };
    let r = client
        .cluster(|mut c| {
            let req = req.clone();
            async move { c.audit(req).await }
        })
        .await?
        .into_inner();
    if format != Format::Table {
        let entries: Vec<_> = r.entries.iter().map(entry_doc).collect();
        let doc = json!({"oldest_revision": r.oldest_revision, "store_revision": r.store_revision, "answered_by": r.answered_by, "entries": entries});
        output::print_doc(&doc, format);
        return Ok(());
    }
    let mut rows =
        vec![["REVISION", "TIME (UTC)", "WHO", "FROM", "METHOD", "TARGET", "RESULT"].map(String::from).to_vec()];
    for e in &r.entries {
        rows.push(vec![
            e.revision.to_string(),
            utc(e.at_ms),
            e.who.clone(),
            e.from.clone(),
            e.method.clone(),
            e.target.clone(),
            e.result.clone(),
        ]);
    }
    output::print_table(&rows);
    if a.since > 0 && a.since < r.oldest_revision {
        eprintln!("note: entries before revision {} were dropped (the log keeps the newest 10000)", r.oldest_revision);
    }
    Ok(())
}

fn entry_doc(e: &AuditEntry) -> serde_json::Value {
    json!({"revision": e.revision, "at_ms": e.at_ms, "who": e.who, "from": e.from, "method": e.method, "target": e.target, "result": e.result})
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) for milliseconds since the Unix epoch.
pub(crate) fn utc(ms: u64) -> String {
    let t = flotilla_api::civil::UtcTime::from_unix(ms / 1000);
    format!("{:04}-{:02}-{:02} {:02}:{:02}:{:02}", t.year, t.month, t.day, t.hour, t.minute, t.second)
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_renders_civil_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(super::utc(1_796_563_845_000), "2026-12-06 13:30:45");
    }
}
