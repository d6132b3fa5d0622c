//! `flotilla events`: what the controllers did and why (rollout steps, replacements for lost
//! nodes, completed rollouts), as `kubectl get events` shows. Read from the answering
//! server's state machine; `-w` keeps polling for new ones.
use std::time::Duration;

use clap::Args;
use flotilla_api::pb::{Event, EventsRequest};
use serde_json::json;

use crate::client::Client;
use crate::cmd::audit::utc;
use crate::error::CliError;
use crate::output::{self, Format};

#[derive(Args, Debug)]
pub(crate) struct EventsArgs {
    /// Only events about this object, `kind/name` (e.g. model/llama).
    #[arg(long = "for", value_name = "KIND/NAME", value_parser = parse_object)]
    object: Option<String>,
    /// Only events at or after this store revision.
    #[arg(long, default_value_t = 0)]
    since: u64,
    /// At most this many, the newest (1 to 5000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=5_000))]
    limit: u32,
    /// Keep watching: print new events as they are recorded (Ctrl-C stops).
    #[arg(long, short)]
    watch: bool,
}

/// `kind/name` with a known kind, lower-cased as the controllers write it.
fn parse_object(s: &str) -> Result<String, String> {
    let (kind, name) = s.split_once('/').ok_or_else(|| format!("{s:?} is not kind/name (e.g. model/llama)"))?;
    let kind: flotilla_api::Kind = kind.parse().map_err(|e: flotilla_api::ApiError| e.to_string())?;
    let name: flotilla_api::ObjectName = name.parse().map_err(|e: flotilla_api::ApiError| e.to_string())?;
    Ok(format!("{}/{name}", kind.as_str().to_ascii_lowercase()))
}

pub(crate) async fn run(client: &Client, a: EventsArgs, format: Format) -> Result<(), CliError> {
    let mut since = a.since;
    let mut header = format == Format::Table;
    loop {
        let req = EventsRequest { since_revision: since, object: a.object.clone().unwrap_or_default(), limit: a.limit };
        let r = client
            .cluster(|mut c| {
                let req = req.clone();
                async move { c.events(req).await }
            })
            .await?
            .into_inner();
        if format != Format::Table {
            for e in &r.events {
                output::print_doc(&event_doc(e), Format::Json);
            }
        } else {
            let mut rows = Vec::new();
            if header {
                rows.push(["REVISION", "TIME (UTC)", "OBJECT", "REASON", "BY", "MESSAGE"].map(String::from).to_vec());
                header = false;
            }
            for e in &r.events {
                rows.push(vec![
                    e.revision.to_string(),
                    utc(e.at_ms),
                    e.object.clone(),
                    e.reason.clone(),
                    e.by.clone(),
                    e.message.clone(),
                ]);
            }
            if !rows.is_empty() {
                output::print_table(&rows);
            }
        }
        if since > 0 && since < r.oldest_revision {
            eprintln!(
                "note: events before revision {} were dropped (the log keeps the newest 5000)",
                r.oldest_revision
            );
        }
        if !a.watch {
            return Ok(());
        }
        since = r.events.last().map_or(since, |e| e.revision + 1).max(since);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn event_doc(e: &Event) -> serde_json::Value {
    json!({"revision": e.revision, "at_ms": e.at_ms, "object": e.object, "reason": e.reason, "by": e.by, "message": e.message})
}

#[cfg(test)]
mod tests {
    #[test]
    fn objects_are_kind_slash_name() {
        assert_eq!(super::parse_object("Model/llama").unwrap(), "model/llama");
        assert!(super::parse_object("llama").unwrap_err().contains("kind/name"));
        assert!(super::parse_object("widget/x").is_err());
        assert!(super::parse_object("model/Not_A_Name").is_err());
    }
}
