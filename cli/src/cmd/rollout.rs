//! `rollout status|history|undo|pause|resume model NAME`, as `kubectl rollout`: reads the
//! rollout part of a model's status (written by the leader's model actor) and changes the
//! spec with a compare-and-set (`undo` writes an earlier template back, `pause`/`resume`
//! set `spec.rollout.paused`). No new RPC: each is a Get or an Apply, allowed to the same
//! roles (and scoped operators) as `apply`.
use std::time::Duration;

use tokio::time::Instant;

use clap::{Args, Subcommand, ValueEnum};
use flotilla_actors::objects::ModelStatus;
use flotilla_actors::rollout::TemplateRecord;
use flotilla_api::ObjectName;

use super::scale::{get_model, update_model};
use crate::client::Client;
use crate::error::CliError;
use crate::output::{self, Format};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum RolloutKind {
    Model,
}

#[derive(Args, Debug)]
pub(crate) struct Target {
    /// What rolls (only `model`).
    kind: RolloutKind,
    /// Name of the model.
    name: String,
}

#[derive(Subcommand, Debug)]
pub(crate) enum RolloutCommand {
    /// Show the rollout of the current template; by default wait until it completes.
    ///
    /// Exit code 0 once every replica runs the current template and is Ready, 1 on
    /// timeout. Example: flotilla rollout status model llama --timeout 15m
    Status {
        #[command(flatten)]
        target: Target,
        /// Wait for the rollout to complete, printing each change (`--watch=false`: once).
        #[arg(long, short, default_value_t = true, action = clap::ArgAction::Set)]
        watch: bool,
        /// Give up waiting after this long (e.g. 90s, 10m).
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// The templates the model has run (newest last, the current one marked).
    History(Target),
    /// Roll back to the previous template, or to `--to-revision N` from `history`.
    Undo {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        to_revision: Option<u64>,
    },
    /// Stop the rollout where it is: nothing more is replaced (scaling still works).
    Pause(Target),
    /// Continue a paused rollout.
    Resume(Target),
}

/// A duration such as `90s`, `10m`, `2h` (a bare number is seconds).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration such as 90s or 10m"))?;
    match unit {
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: the unit must be s, m or h")),
    }
}

/// A [`parse_duration`] that is not zero: how long to wait for something.
pub(crate) fn parse_timeout(s: &str) -> Result<Duration, String> {
    if s.trim_start().starts_with('-') {
        return Err(format!("{s:?}: a timeout must be longer than zero"));
    }
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("{s:?}: a timeout must be longer than zero")),
        d => Ok(d),
    }
}

pub(crate) async fn run(client: &Client, cmd: RolloutCommand, format: Format) -> Result<(), CliError> {
    match cmd {
        RolloutCommand::Status { target, watch, timeout } => {
            status(client, &name(&target)?, watch, timeout, format).await
        }
        RolloutCommand::History(target) => history(client, &name(&target)?, format).await,
        RolloutCommand::Undo { target, to_revision } => undo(client, &name(&target)?, to_revision).await,
        RolloutCommand::Pause(target) => set_paused(client, &name(&target)?, true).await,
        RolloutCommand::Resume(target) => set_paused(client, &name(&target)?, false).await,
    }
}

fn name(t: &Target) -> Result<ObjectName, CliError> {
    let RolloutKind::Model = t.kind;
    Ok(t.name.parse()?)
}

fn status_of(o: &flotilla_api::pb::Object) -> ModelStatus {
    serde_json::from_str(&o.status_json).unwrap_or_default()
}

async fn status(
    client: &Client,
    name: &ObjectName,
    watch: bool,
    timeout: Duration,
    format: Format,
) -> Result<(), CliError> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        let model = get_model(client, name).await?;
        let st = status_of(&model);
        let spec: Option<flotilla_api::spec::ModelSpec> = serde_json::from_str(&model.spec_json).ok();
        let want = spec.map(|s| s.template().hash()).unwrap_or_default();
        let Some(mut roll) = st.rollout else {
            return Err(CliError::runtime(format!(
                "model/{name} has no rollout status yet (no leader has reconciled it since it was applied)"
            )));
        };
        // The status may still describe the template before the last apply: until the
        // leader's model actor has seen the change, the rollout has not started.
        if roll.hash != want {
            roll = flotilla_actors::rollout::RolloutStatus {
                hash: want,
                state: "Pending".into(),
                message: format!("the controllers have not seen model revision {} yet", model.revision),
                ..Default::default()
            };
        }
        if last.as_ref() != Some(&roll) {
            match format {
                Format::Table => {
                    println!("model/{name} revision {} ({}): {}: {}", roll.number, roll.hash, roll.state, roll.message)
                }
                _ => output::print_doc(&serde_json::to_value(&roll).unwrap_or_default(), format),
            }
        }
        if roll.rolled_back() {
            return Err(CliError::runtime(format!(
                "model/{name}: {} (`flotilla rollout undo` or a new apply moves on)",
                roll.message
            )));
        }
        if roll.complete() || !watch {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(CliError::runtime(format!(
                "model/{name}: rollout not complete after {} s: {}",
                timeout.as_secs(),
                roll.message
            )));
        }
        last = Some(roll);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn history(client: &Client, name: &ObjectName, format: Format) -> Result<(), CliError> {
    let st = status_of(&get_model(client, name).await?);
    if format != Format::Table {
        output::print_doc(&serde_json::to_value(&st.templates).unwrap_or_default(), format);
        return Ok(());
    }
    let current = st.rollout.as_ref().map(|r| r.hash.clone()).unwrap_or_default();
    let mut rows = vec![["REVISION", "HASH", "APPLIED-AT", "ENGINE", "GPUS", "SOURCE", "ENGINE-ARGS", "NOTE"]
        .map(String::from)
        .to_vec()];
    for t in &st.templates {
        let mark = if t.hash == current { " (current)" } else { "" };
        rows.push(vec![
            format!("{}{mark}", t.number),
            t.hash.clone(),
            t.model_revision.to_string(),
            serde_json::to_value(t.template.engine).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
            t.template.gpus.to_string(),
            t.template.source.clone(),
            t.template.engine_args.join(" "),
            if t.rolled_back.is_empty() { String::new() } else { format!("canary rolled back: {}", t.rolled_back) },
        ]);
    }
    if rows.len() == 1 {
        rows.push(vec!["(no history yet)".into()]);
    }
    output::print_table(&rows);
    Ok(())
}

/// The record `undo` goes back to: `to`, or the newest one before the current template.
fn undo_target(templates: &[TemplateRecord], current: &str, to: Option<u64>) -> Result<TemplateRecord, CliError> {
    let numbers = || templates.iter().map(|t| t.number.to_string()).collect::<Vec<_>>().join(", ");
    match to {
        Some(n) => templates
            .iter()
            .find(|t| t.number == n)
            .cloned()
            .ok_or_else(|| CliError::usage(format!("revision {n} is not in the history (kept: {})", numbers()))),
        None => templates
            .iter()
            .filter(|t| t.hash != current)
            .max_by_key(|t| t.number)
            .cloned()
            .ok_or_else(|| CliError::usage("no earlier template to roll back to (see `flotilla rollout history`)")),
    }
}

async fn undo(client: &Client, name: &ObjectName, to: Option<u64>) -> Result<(), CliError> {
    let (object, target) = update_model(client, name, |spec, status| {
        let st: ModelStatus = serde_json::from_value(status.clone()).unwrap_or_default();
        let target = undo_target(&st.templates, &spec.template().hash(), to)?;
        spec.set_template(target.template.clone());
        Ok(target)
    })
    .await?;
    println!(
        "model/{name} rolled back to revision {} ({}); the rollout starts now (revision {})",
        target.number, target.hash, object.revision
    );
    Ok(())
}

async fn set_paused(client: &Client, name: &ObjectName, paused: bool) -> Result<(), CliError> {
    let (_, was) =
        update_model(client, name, |spec, _| Ok(std::mem::replace(&mut spec.rollout.paused, paused))).await?;
    let word = if paused { "paused" } else { "resumed" };
    if was == paused {
        println!("model/{name} rollout was already {word}");
    } else {
        println!("model/{name} rollout {word}");
    }
    if paused {
        // Apply replaces a spec whole: a manifest without the flag would resume the rollout.
        println!("note: `flotilla apply` replaces the whole spec; keep `rollout.paused: true` in the manifest to stay paused");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use flotilla_api::spec::{EngineKind, ReplicaTemplate};

    use super::*;

    fn record(number: u64, source: &str) -> TemplateRecord {
        let template = ReplicaTemplate {
            engine_image: Default::default(),
            topology: None,
            kv_transfer: None,
            engine: EngineKind::Sim,
            source: source.into(),
            engine_args: vec![],
            gpus: 1,
            gpu_types: vec![],
        };
        TemplateRecord {
            number,
            hash: template.hash(),
            template,
            model_revision: number * 10,
            rolled_back: String::new(),
        }
    }

    #[test]
    fn undo_goes_to_the_newest_other_template_or_the_one_named() {
        let h = vec![record(1, "a"), record(2, "b"), record(3, "c")];
        assert_eq!(undo_target(&h, &h[2].hash, None).unwrap().number, 2);
        assert_eq!(undo_target(&h, &h[2].hash, Some(1)).unwrap().number, 1);
        let e = undo_target(&h, &h[2].hash, Some(7)).unwrap_err();
        assert_eq!(e.exit_code, 2);
        assert!(e.message.contains("kept: 1, 2, 3"), "{}", e.message);
        let e = undo_target(&h[..1], &h[0].hash, None).unwrap_err();
        assert!(e.message.contains("no earlier template"), "{}", e.message);
    }

    #[test]
    fn durations_parse_with_units_and_name_bad_input() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("10d").unwrap_err().contains("s, m or h"));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1").is_err());
        assert!(parse_timeout("0s").unwrap_err().contains("longer than zero"));
        assert!(parse_timeout("-1").unwrap_err().contains("longer than zero"));
        assert_eq!(parse_timeout("3s").unwrap(), Duration::from_secs(3));
    }
}
