//! `flotilla tls ca create` and `flotilla tls cert create`: a working set of certificates for
//! a secure cluster, as `nomad tls` and `consul tls` make them (docs/security.md). Files are
//! written to the current directory (or `--dir`), keys 0600, and never overwritten.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use flotilla_security::certs::{self, CertRequest, Issued};
use flotilla_security::{Identity, Role};

use crate::error::CliError;

#[derive(Subcommand, Debug)]
pub(crate) enum TlsCommand {
    /// Certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Certificates signed by the CA.
    #[command(subcommand)]
    Cert(CertCommand),
}

#[derive(Subcommand, Debug)]
pub(crate) enum CaCommand {
    /// Create a CA: DIR/ca.pem and DIR/ca-key.pem (keep the key offline).
    ///
    /// Example: flotilla tls ca create --dir /etc/flotilla/tls
    Create(CaCreateArgs),
}

#[derive(Subcommand, Debug)]
pub(crate) enum CertCommand {
    /// Create a certificate for a role: DIR/ROLE-NAME.pem and DIR/ROLE-NAME-key.pem.
    ///
    /// Roles: server (a cluster member: serves and dials peers), agent (NAME = its node
    /// name), gateway, and for people and tools admin, operator, viewer (`client` = admin).
    ///
    /// Example: flotilla tls cert create --role server --name s1 --dns s1.internal --ip 10.0.0.1
    Create(CertCreateArgs),
}

#[derive(Args, Debug)]
pub(crate) struct CaCreateArgs {
    /// Directory to write into.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// The CA's common name.
    #[arg(long, default_value = "flotilla CA")]
    name: String,
    /// Days the CA is valid.
    #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(u32).range(1..=36500))]
    days: u32,
}

#[derive(Args, Debug)]
pub(crate) struct CertCreateArgs {
    /// server, agent, gateway, admin, operator, viewer or client (= admin).
    #[arg(long)]
    role: String,
    /// The identity's name: the node name for an agent, a server's name, a person's or tool's.
    #[arg(long)]
    name: String,
    /// DNS names the holder is dialled at (servers, gateways); repeatable.
    #[arg(long)]
    dns: Vec<String>,
    /// IP addresses the holder is dialled at; repeatable.
    #[arg(long)]
    ip: Vec<IpAddr>,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
    days: u32,
    /// Directory holding ca.pem and ca-key.pem.
    #[arg(long, default_value = ".")]
    ca_dir: PathBuf,
    /// Directory to write into.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
}

/// The certificate role for a `--role` word.
fn role_of(word: &str) -> Result<Role, CliError> {
    match word {
        "server" => Ok(Role::Peer),
        "client" => Ok(Role::Admin),
        "peer" => Err(CliError::usage("--role peer: say --role server")),
        w => Role::parse(w).ok_or_else(|| {
            CliError::usage(format!(
                "--role {w:?} is not one of server, agent, gateway, admin, operator, viewer, client"
            ))
        }),
    }
}

/// Writes `text` to a new file (never over an existing one), mode `mode`.
fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), CliError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            CliError::usage(format!("{} exists; remove it or write elsewhere with --dir", path.display()))
        } else {
            CliError::runtime(format!("cannot create {}: {e}", path.display()))
        }
    })?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| CliError::runtime(format!("{}: {e}", path.display())))
}

fn write_pair(dir: &Path, stem: &str, issued: &Issued) -> Result<(PathBuf, PathBuf), CliError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| CliError::runtime(format!("cannot create {}: {e}", dir.display())))?;
    let (cert, key) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}-key.pem")));
    if cert.exists() {
        return Err(CliError::usage(format!("{} exists; remove it or write elsewhere with --dir", cert.display())));
    }
    write_new(&key, &issued.key_pem, 0o600)?;
    write_new(&cert, &issued.cert_pem, 0o644)?;
    Ok((cert, key))
}

pub(crate) fn run(c: TlsCommand) -> Result<(), CliError> {
    match c {
        TlsCommand::Ca(CaCommand::Create(a)) => {
            let ca = certs::create_ca(&a.name, i64::from(a.days)).map_err(|e| CliError::runtime(e.to_string()))?;
            let (cert, key) = write_pair(&a.dir, "ca", &ca)?;
            println!("wrote {} and {} (keep the key off the cluster's machines)", cert.display(), key.display());
            Ok(())
        }
        TlsCommand::Cert(CertCommand::Create(a)) => {
            let role = role_of(&a.role)?;
            let identity = Identity::new(role, &a.name).map_err(|_| {
                CliError::usage(format!(
                    "--name {:?}: 1-63 of a-z, 0-9, '-', '.', '_', starting with a letter or digit",
                    a.name
                ))
            })?;
            let read = |f: &str| {
                let p = a.ca_dir.join(f);
                std::fs::read_to_string(&p).map_err(|e| {
                    CliError::usage(format!(
                        "cannot read {} ({e}); create a CA with `flotilla tls ca create`",
                        p.display()
                    ))
                })
            };
            let ca = Issued { cert_pem: read("ca.pem")?, key_pem: read("ca-key.pem")? };
            let uri = identity.uri();
            let req = CertRequest { identity: Some(identity), dns: a.dns, ips: a.ip, days: i64::from(a.days) };
            let issued = certs::issue(&ca, &req).map_err(|e| match e {
                certs::CertError::Invalid(m) => CliError::usage(m),
                e => CliError::runtime(e.to_string()),
            })?;
            let stem = format!("{}-{}", a.role, a.name);
            let (cert, key) = write_pair(&a.dir, &stem, &issued)?;
            println!("wrote {} and {} for {uri}", cert.display(), key.display());
            Ok(())
        }
    }
}

/// The files of one identity in `dir`: `STEM.pem`, `STEM-key.pem`, `ca.pem`.
fn files(dir: &Path, stem: &str) -> flotilla_security::TlsFiles {
    flotilla_security::TlsFiles {
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}-key.pem")),
        ca: dir.join("ca.pem"),
    }
}

/// The certificates `flotilla dev --secure` runs with, in `dir` (made once, reused after).
pub(crate) struct DevSet {
    pub(crate) server: flotilla_security::TlsFiles,
    pub(crate) agent: flotilla_security::TlsFiles,
    pub(crate) gateway: flotilla_security::TlsFiles,
    pub(crate) admin: flotilla_security::TlsFiles,
}

/// Makes (or finds) a CA and the dev stack's certificates in `dir`: server `s1` and gateway
/// `dev-gateway` on 127.0.0.1/localhost, agent `node` (the dev node's name), admin `dev-admin`.
pub(crate) fn dev_set(dir: &Path, node: &str) -> Result<DevSet, CliError> {
    let ca = if dir.join("ca.pem").exists() {
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .map_err(|e| CliError::runtime(format!("{}: {e}", dir.join(f).display())))
        };
        Issued { cert_pem: read("ca.pem")?, key_pem: read("ca-key.pem")? }
    } else {
        let ca = certs::create_ca("flotilla dev CA", 3650).map_err(|e| CliError::runtime(e.to_string()))?;
        write_pair(dir, "ca", &ca)?;
        ca
    };
    let make = |role: Role, name: &str, stem: &str| -> Result<flotilla_security::TlsFiles, CliError> {
        if !dir.join(format!("{stem}.pem")).exists() {
            let identity = Identity::new(role, name).map_err(|e| CliError::runtime(e.to_string()))?;
            let req = CertRequest {
                identity: Some(identity),
                dns: vec!["localhost".into()],
                ips: vec![IpAddr::from([127, 0, 0, 1])],
                days: 365,
            };
            let issued = certs::issue(&ca, &req).map_err(|e| CliError::runtime(e.to_string()))?;
            write_pair(dir, stem, &issued)?;
        }
        Ok(files(dir, stem))
    };
    Ok(DevSet {
        server: make(Role::Peer, "s1", "server-s1")?,
        agent: make(Role::Agent, node, &format!("agent-{node}"))?,
        gateway: make(Role::Gateway, "dev-gateway", "gateway-dev-gateway")?,
        admin: make(Role::Admin, "dev-admin", "admin-dev-admin")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_words_map_to_roles() {
        assert_eq!(role_of("server").unwrap(), Role::Peer);
        assert_eq!(role_of("client").unwrap(), Role::Admin);
        assert_eq!(role_of("viewer").unwrap(), Role::Viewer);
        assert_eq!(role_of("root").unwrap_err().exit_code, 2);
        assert_eq!(role_of("peer").unwrap_err().exit_code, 2);
    }
}
