//! `scale model NAME N`: a compare-and-set update of the model's desired replica count.
use clap::{Args, ValueEnum};
use flotilla_api::pb::{ApplyRequest, GetRequest};
use flotilla_api::spec::ModelSpec;
use flotilla_api::{Manifest, Metadata, ObjectName, Spec};

use crate::client::Client;
use crate::error::CliError;
use crate::output::{self, Format};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum ScaleKind {
    Model,
}

#[derive(Args, Debug)]
pub(crate) struct ScaleArgs {
    /// What to scale (only `model` for now).
    kind: ScaleKind,
    /// Name of the model.
    name: String,
    /// Desired number of replicas.
    replicas: u32,
}

/// Attempts before giving up when the model keeps changing under us.
const ATTEMPTS: usize = 5;

pub(crate) async fn run(client: &Client, args: ScaleArgs, format: Format) -> Result<(), CliError> {
    let ScaleKind::Model = args.kind;
    let name: ObjectName = args.name.parse()?;
    for _ in 0..ATTEMPTS {
        let get = GetRequest { kind: "Model".into(), name: name.to_string(), stale: false };
        let current = client
            .objects(|mut c| {
                let get = get.clone();
                async move { c.get(get).await }
            })
            .await?
            .into_inner()
            .object
            .unwrap_or_default();
        let mut spec: ModelSpec = serde_json::from_str(&current.spec_json)
            .map_err(|e| CliError::runtime(format!("model/{name} has a spec this CLI cannot read: {e}")))?;
        let from = spec.replicas;
        spec.replicas = args.replicas;
        let manifest = Manifest {
            metadata: Metadata { name: name.clone(), labels: current.labels.clone().into_iter().collect() },
            spec: Spec::Model(spec),
        };
        manifest.spec.validate()?;
        let req = ApplyRequest { manifest: manifest.to_yaml(), expected_revision: Some(current.revision) };
        let id = crate::client::new_request_id();
        let result = client
            .objects(|mut c| {
                let req = crate::client::write_request(req.clone(), id);
                async move { c.apply(req).await }
            })
            .await;
        match result {
            Ok(r) => {
                let object = r.into_inner().object.unwrap_or_default();
                match format {
                    Format::Table => println!(
                        "model/{name} scaled from {from} to {} replicas (revision {})",
                        args.replicas, object.revision
                    ),
                    _ => output::print_objects(&[object], format, true),
                }
                return Ok(());
            }
            // Someone else changed the model between our read and write: read again.
            Err(e) if e.message.contains("cluster.conflict") => continue,
            Err(e) => return Err(e),
        }
    }
    Err(CliError::runtime(format!("model/{name} kept changing; gave up after {ATTEMPTS} attempts")))
}
