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

/// A compare-and-set update of a model's spec: reads the model, lets `change` edit the
/// spec (it may read the status; an error stops with nothing written), validates and
/// writes it fenced by the revision read, and reads again when someone else wrote in
/// between. Returns the stored object and what `change` returned.
pub(crate) async fn update_model<R>(
    client: &Client,
    name: &ObjectName,
    mut change: impl FnMut(&mut ModelSpec, &serde_json::Value) -> Result<R, CliError>,
) -> Result<(flotilla_api::pb::Object, R), CliError> {
    for _ in 0..ATTEMPTS {
        let current = get_model(client, name).await?;
        let mut spec: ModelSpec = serde_json::from_str(&current.spec_json)
            .map_err(|e| CliError::runtime(format!("model/{name} has a spec this CLI cannot read: {e}")))?;
        let status = serde_json::from_str(&current.status_json).unwrap_or(serde_json::Value::Null);
        let out = change(&mut spec, &status)?;
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
            Ok(r) => return Ok((r.into_inner().object.unwrap_or_default(), out)),
            // Someone else changed the model between our read and write: read again.
            Err(e) if e.message.contains("cluster.conflict") => continue,
            Err(e) => return Err(e),
        }
    }
    Err(CliError::runtime(format!("model/{name} kept changing; gave up after {ATTEMPTS} attempts")))
}

/// The stored model `name` (NOT_FOUND becomes the server's error).
pub(crate) async fn get_model(client: &Client, name: &ObjectName) -> Result<flotilla_api::pb::Object, CliError> {
    get_object(client, "Model", name).await
}

/// The stored object `kind`/`name`, read linearizably ("model/NAME not found" when absent).
pub(crate) async fn get_object(
    client: &Client,
    kind: &str,
    name: &ObjectName,
) -> Result<flotilla_api::pb::Object, CliError> {
    let get = GetRequest { kind: kind.into(), name: name.to_string(), stale: false };
    let object = client
        .objects(|mut c| {
            let get = get.clone();
            async move { c.get(get).await }
        })
        .await?
        .into_inner()
        .object;
    object.ok_or_else(|| CliError::runtime(format!("{}/{name} not found", kind.to_lowercase())))
}

pub(crate) async fn run(client: &Client, args: ScaleArgs, format: Format) -> Result<(), CliError> {
    let ScaleKind::Model = args.kind;
    let name: ObjectName = args.name.parse()?;
    let (object, from) =
        update_model(client, &name, |spec, _| Ok(std::mem::replace(&mut spec.replicas, args.replicas))).await?;
    match format {
        Format::Table => {
            println!("model/{name} scaled from {from} to {} replicas (revision {})", args.replicas, object.revision)
        }
        _ => output::print_objects(&[object], format, true),
    }
    Ok(())
}
