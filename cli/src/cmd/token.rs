//! `flotilla token create|list|revoke`: bearer tokens for the gRPC API, for automation
//! without a certificate (docs/security.md). The secret is made here, on the client; the
//! cluster stores only its SHA-256 (a `Token` object named by the token's public id), and
//! the token is printed once. Creating and revoking needs an admin.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use flotilla_api::pb::{ApplyRequest, DeleteRequest, ListRequest};
use flotilla_api::spec::{hash_api_key, TOKEN_PREFIX, TOKEN_ROLES};

use crate::client::Client;
use crate::error::CliError;
use crate::output::Format;

#[derive(Subcommand, Debug)]
pub(crate) enum TokenCommand {
    /// Create a token for a role and print it (once: only its hash is kept).
    ///
    /// Example: flotilla token create --role operator --name ci-deploy --ttl 30d
    Create(CreateArgs),
    /// List tokens: id, role, identity, expiry (never the secret or its hash).
    List,
    /// Revoke a token by its id (the 16 hex digits after `flt_`).
    Revoke {
        /// The token's id.
        id: String,
    },
}

#[derive(Args, Debug)]
pub(crate) struct CreateArgs {
    /// admin, operator, viewer or gateway.
    #[arg(long)]
    role: String,
    /// Who holds it (a person, a CI job): the identity's name in logs and refusals.
    #[arg(long)]
    name: String,
    /// Lifetime: Ns, Nm, Nh or Nd, or `never`.
    #[arg(long, default_value = "24h")]
    ttl: String,
    /// Operators only: limit the token to objects whose labels match this selector
    /// (`k=v,...`); it may not create, change or delete any other, nor drain nodes.
    ///
    /// Example: --selector team=search
    #[arg(long)]
    selector: Option<String>,
}

/// Parses `--ttl` (None: never expires).
fn ttl(s: &str) -> Result<Option<Duration>, CliError> {
    if s == "never" {
        return Ok(None);
    }
    let bad = || CliError::usage(format!("--ttl {s:?}: give Ns, Nm, Nh or Nd (e.g. 24h, 30d), or never"));
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(bad()),
    };
    if secs == 0 || secs > 10 * 365 * 86_400 {
        return Err(CliError::usage(format!("--ttl {s:?}: between 1 s and 10 years, or never")));
    }
    Ok(Some(Duration::from_secs(secs)))
}

pub(crate) async fn run(client: &Client, c: TokenCommand, format: Format) -> Result<(), CliError> {
    match c {
        TokenCommand::Create(a) => {
            if !TOKEN_ROLES.contains(&a.role.as_str()) {
                return Err(CliError::usage(format!("--role {:?} is not one of {}", a.role, TOKEN_ROLES.join(", "))));
            }
            let ttl = ttl(&a.ttl)?;
            if let Some(sel) = &a.selector {
                if a.role != "operator" {
                    return Err(CliError::usage("--selector limits an operator token; give --role operator"));
                }
                flotilla_api::LabelSelector::parse(sel).map_err(|e| CliError::usage(format!("--selector: {e}")))?;
            }
            let id = flotilla_api::hex(&rand::random::<[u8; 8]>());
            let secret = flotilla_api::hex(&rand::random::<[u8; 32]>());
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|e| CliError::runtime(e.to_string()))?;
            let expires = ttl.map(|t| (now + t).as_secs());
            let mut spec = serde_json::json!({
                "role": a.role, "identity": a.name, "hash": hash_api_key(&secret), "expires_at": expires,
            });
            if let Some(sel) = &a.selector {
                spec["selector"] = serde_json::json!(sel);
            }
            let manifest = serde_json::json!({"kind": "Token", "metadata": {"name": id}, "spec": spec}).to_string();
            let write = crate::client::new_request_id();
            client
                .objects(|mut c| {
                    let req = ApplyRequest { manifest: manifest.clone(), expected_revision: Some(0) };
                    let req = crate::client::write_request(req, write);
                    async move { c.apply(req).await }
                })
                .await?;
            let token = format!("{TOKEN_PREFIX}{id}_{secret}");
            match format {
                Format::Json | Format::Yaml => {
                    let v = serde_json::json!({"token": token, "id": id, "role": a.role, "identity": a.name, "expires_at": expires});
                    println!("{v}");
                }
                Format::Table => {
                    println!("{token}");
                    let until = expires.map_or_else(|| "never expires".to_string(), |e| format!("expires at unix {e}"));
                    eprintln!(
                        "token {id} for {}/{} ({until}); shown once: store it now (FLOTILLA_TOKEN), revoke with `flotilla token revoke {id}`",
                        a.role, a.name
                    );
                }
            }
            Ok(())
        }
        TokenCommand::List => {
            let objects = client
                .objects(|mut c| async move {
                    c.list(ListRequest { kind: "Token".into(), label_selector: String::new(), stale: false }).await
                })
                .await?
                .into_inner()
                .objects;
            crate::output::print_objects(&objects, format, false);
            Ok(())
        }
        TokenCommand::Revoke { id } => {
            let write = crate::client::new_request_id();
            client
                .objects(|mut c| {
                    let req = DeleteRequest { kind: "Token".into(), name: id.clone(), expected_revision: None };
                    let req = crate::client::write_request(req, write);
                    async move { c.delete(req).await }
                })
                .await?;
            eprintln!("token {id} revoked");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_parse_or_say_why_not() {
        assert_eq!(ttl("24h").unwrap(), Some(Duration::from_secs(86_400)));
        assert_eq!(ttl("30d").unwrap(), Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(ttl("never").unwrap(), None);
        for bad in ["", "h", "10", "5y", "0s", "-1h", "99999d"] {
            assert_eq!(ttl(bad).unwrap_err().exit_code, 2, "{bad}");
        }
    }
}
