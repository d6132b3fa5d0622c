//! `apply`, `get`, `delete`, `watch`: operator commands on objects.
use std::io::Read;
use std::time::Duration;

use clap::Args;
use flotilla_api::pb::{ApplyRequest, DeleteRequest, GetRequest, ListRequest, WatchRequest};
use flotilla_api::{Kind, Manifest, ObjectName};
use futures::StreamExt;

use crate::client::Client;
use crate::error::CliError;
use crate::output::{self, Format};

#[derive(Args, Debug)]
pub(crate) struct ApplyArgs {
    /// Manifest file (YAML or JSON, several documents separated by `---`); `-` for stdin.
    #[arg(short = 'f', long = "filename")]
    file: String,
    /// Apply only if the object's current revision is this (0: only if it does not exist).
    #[arg(long)]
    expected_revision: Option<u64>,
    /// Then follow each applied Model and Adapter until it is Ready (exit 0) or has failed
    /// (exit 1, with the reason), showing each replica's phase, download and engine start.
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after this long (90s, 10m, 1h), exit 1 naming what is pending.
    #[arg(long, requires = "wait", default_value = "10m", allow_hyphen_values = true,
          value_parser = super::rollout::parse_timeout)]
    timeout: Duration,
}

#[derive(Args, Debug)]
pub(crate) struct GetArgs {
    /// Kind of object: model, adapter, tenant (singular or plural).
    kind: String,
    /// Name of one object; all objects of the kind if absent.
    name: Option<String>,
    /// Label selector, e.g. `team=search,tier=gold`.
    #[arg(short = 'l', long)]
    selector: Option<String>,
    /// Read from the server's local replica without a leader round trip (may be stale).
    #[arg(long)]
    stale: bool,
}

#[derive(Args, Debug)]
pub(crate) struct DeleteArgs {
    kind: String,
    name: String,
    /// Delete only if the object's current revision is this.
    #[arg(long)]
    expected_revision: Option<u64>,
}

#[derive(Args, Debug)]
pub(crate) struct WatchArgs {
    /// Kind to watch; every kind if absent.
    kind: Option<String>,
    /// Stream changes after this store revision (0: all retained history).
    #[arg(long, default_value_t = 0)]
    after: u64,
}

fn read_file(path: &str) -> Result<String, CliError> {
    let mut text = String::new();
    let r = if path == "-" {
        std::io::stdin().read_to_string(&mut text).map(|_| ())
    } else {
        std::fs::read_to_string(path).map(|t| text = t)
    };
    r.map_err(|e| CliError::usage(format!("cannot read {path}: {e}")))?;
    Ok(text)
}

pub(crate) async fn apply(client: &Client, args: ApplyArgs, format: Format) -> Result<(), CliError> {
    let text = read_file(&args.file)?;
    // Validate every document before sending any, so a bad file changes nothing.
    let manifests = Manifest::parse_all(&text).map_err(|e| CliError::usage(format!("{}: {e}", args.file)))?;
    if args.expected_revision.is_some() && manifests.len() > 1 {
        return Err(CliError::usage("--expected-revision needs a file with exactly one manifest"));
    }
    let followed: Vec<(Kind, ObjectName)> = manifests
        .iter()
        .filter(|m| matches!(m.kind(), Kind::Model | Kind::Adapter))
        .map(|m| (m.kind(), m.metadata.name.clone()))
        .collect();
    if args.wait && followed.is_empty() {
        let kinds: Vec<&str> = manifests.iter().map(|m| m.kind().as_str()).collect();
        return Err(CliError::usage(format!(
            "--wait follows Models and Adapters; {} has none ({})",
            args.file,
            kinds.join(", ")
        )));
    }
    let mut applied = Vec::new();
    for m in &manifests {
        let req = ApplyRequest { manifest: m.to_yaml(), expected_revision: args.expected_revision };
        let id = crate::client::new_request_id();
        let resp = client
            .objects(|mut c| {
                let req = crate::client::write_request(req.clone(), id);
                async move { c.apply(req).await }
            })
            .await?
            .into_inner();
        let object = resp.object.unwrap_or_default();
        if format == Format::Table {
            let verb = if resp.created {
                "created"
            } else if resp.unchanged {
                "unchanged"
            } else {
                "configured"
            };
            println!("{}/{} {verb} (revision {})", m.kind().as_str().to_lowercase(), object.name, object.revision);
        }
        applied.push(object);
    }
    if format != Format::Table {
        output::print_objects(&applied, format, true);
    }
    if args.wait {
        super::wait::follow(client, &followed, args.timeout, format != Format::Table).await?;
    }
    Ok(())
}

pub(crate) async fn get(client: &Client, args: GetArgs, format: Format) -> Result<(), CliError> {
    let kind: Kind = args.kind.parse()?;
    if let Some(name) = args.name {
        let name: ObjectName = name.parse()?;
        let req = GetRequest { kind: kind.to_string(), name: name.to_string(), stale: args.stale };
        let resp = client
            .objects(|mut c| {
                let req = req.clone();
                async move { c.get(req).await }
            })
            .await?
            .into_inner();
        output::print_objects(&resp.object.into_iter().collect::<Vec<_>>(), format, true);
    } else {
        let req = ListRequest {
            kind: kind.to_string(),
            label_selector: args.selector.unwrap_or_default(),
            stale: args.stale,
        };
        let resp = client
            .objects(|mut c| {
                let req = req.clone();
                async move { c.list(req).await }
            })
            .await?
            .into_inner();
        if resp.objects.is_empty() && format == Format::Table {
            eprintln!("no {} objects", kind);
            return Ok(());
        }
        output::print_objects(&resp.objects, format, false);
    }
    Ok(())
}

pub(crate) async fn delete(client: &Client, args: DeleteArgs, format: Format) -> Result<(), CliError> {
    let kind: Kind = args.kind.parse()?;
    let name: ObjectName = args.name.parse()?;
    let req =
        DeleteRequest { kind: kind.to_string(), name: name.to_string(), expected_revision: args.expected_revision };
    let id = crate::client::new_request_id();
    let resp = client
        .objects(|mut c| {
            let req = crate::client::write_request(req.clone(), id);
            async move { c.delete(req).await }
        })
        .await?
        .into_inner();
    match format {
        Format::Table => println!("{}/{name} deleted (revision {})", kind.as_str().to_lowercase(), resp.revision),
        _ => output::print_objects(&resp.object.into_iter().collect::<Vec<_>>(), format, true),
    }
    Ok(())
}

pub(crate) async fn watch(client: &Client, args: WatchArgs) -> Result<(), CliError> {
    let kind = match &args.kind {
        Some(k) => k.parse::<Kind>()?.to_string(),
        None => String::new(),
    };
    let req = WatchRequest { kind, after_revision: args.after };
    let mut stream = client
        .objects(|mut c| {
            let req = req.clone();
            async move { c.watch(req).await }
        })
        .await?
        .into_inner();
    while let Some(event) = stream.next().await {
        let event = event?;
        let ty = if event.r#type == 1 { "DELETE" } else { "PUT" };
        let object = event.object.as_ref().map(output::object_doc).unwrap_or_default();
        println!("{}", serde_json::json!({ "type": ty, "revision": event.revision, "object": object }));
    }
    Err(CliError::runtime("the server closed the watch stream"))
}
