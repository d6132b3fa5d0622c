//! `flotilla tenant key create|list|revoke`: API keys for a tenant, made by the server
//! (256 random bits), printed once; the tenant keeps only each key's id and hash
//! (docs/security.md). Needs an admin.
use clap::Subcommand;
use flotilla_api::pb::tenant_key_service_client::TenantKeyServiceClient;
use flotilla_api::pb::{CreateTenantKeyRequest, GetRequest, RevokeTenantKeyRequest};
use flotilla_api::spec::TenantSpec;

use crate::client::Client;
use crate::error::CliError;
use crate::output::{self, Format};

#[derive(Subcommand, Debug)]
pub(crate) enum TenantCommand {
    /// API keys of a tenant.
    #[command(subcommand)]
    Key(KeyCommand),
}

#[derive(Subcommand, Debug)]
pub(crate) enum KeyCommand {
    /// Make a key for TENANT and print it (once: only its id and hash are kept).
    ///
    /// Example: flotilla tenant key create team-search
    Create { tenant: String },
    /// The ids and creation times of TENANT's keys (never the keys or their hashes).
    List { tenant: String },
    /// Revoke TENANT's key ID; gateways refuse it once they see the change (about a second).
    ///
    /// Example: flotilla tenant key revoke team-search 3f2a9c01d4e5b6a7
    Revoke { tenant: String, id: String },
}

pub(crate) async fn run(client: &Client, c: TenantCommand, format: Format) -> Result<(), CliError> {
    let TenantCommand::Key(c) = c;
    match c {
        KeyCommand::Create { tenant } => {
            let made = client
                .call(|ch| {
                    let req = CreateTenantKeyRequest { tenant: tenant.clone() };
                    async move { TenantKeyServiceClient::new(ch).create_key(req).await }
                })
                .await?
                .into_inner();
            match format {
                Format::Table => {
                    println!("{}", made.key);
                    eprintln!(
                        "key {} for tenant {tenant}; shown once: give it to the tenant now (Authorization: Bearer KEY), revoke with `flotilla tenant key revoke {tenant} {}`",
                        made.id, made.id
                    );
                }
                _ => output::print_doc(&serde_json::json!({"key": made.key, "id": made.id, "tenant": tenant}), format),
            }
        }
        KeyCommand::List { tenant } => {
            let object = client
                .objects(|mut c| {
                    let req = GetRequest { kind: "Tenant".into(), name: tenant.clone(), stale: false };
                    async move { c.get(req).await }
                })
                .await?
                .into_inner()
                .object
                .ok_or_else(|| CliError::runtime(format!("tenant {tenant} not found")))?;
            let spec: TenantSpec = serde_json::from_str(&object.spec_json)
                .map_err(|e| CliError::runtime(format!("tenant {tenant}'s spec: {e}")))?;
            if format != Format::Table {
                let keys: Vec<_> =
                    spec.keys.iter().map(|k| serde_json::json!({"id": k.id, "created_at": k.created_at})).collect();
                output::print_doc(
                    &serde_json::json!({"tenant": tenant, "keys": keys, "written_keys": spec.api_keys.len()}),
                    format,
                );
                return Ok(());
            }
            let mut rows = vec![vec!["ID".to_string(), "CREATED (UNIX)".to_string()]];
            rows.extend(spec.keys.iter().map(|k| vec![k.id.clone(), k.created_at.to_string()]));
            output::print_table(&rows);
            if !spec.api_keys.is_empty() {
                eprintln!("and {} key(s) written in the spec's api_keys", spec.api_keys.len());
            }
        }
        KeyCommand::Revoke { tenant, id } => {
            client
                .call(|ch| {
                    let req = RevokeTenantKeyRequest { tenant: tenant.clone(), id: id.clone() };
                    async move { TenantKeyServiceClient::new(ch).revoke_key(req).await }
                })
                .await?;
            eprintln!("key {id} of tenant {tenant} revoked");
        }
    }
    Ok(())
}
