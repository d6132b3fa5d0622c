//! `flotilla snapshot save FILE`, `inspect FILE` and `restore FILE --data-dir D --id N`: a
//! backup of the whole replicated state as the answering server holds it at one store
//! revision (admin only: it holds every secret the store does), written atomically with mode
//! 0600 and checked on read (`flotilla_storage::backup`); restore checks it and lays it into
//! an empty data dir that seeds a new cluster at its first start (`flotilla_storage::seed`).
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use flotilla_api::pb::SnapshotRequest;
use flotilla_storage::backup::{self, Header};
use serde_json::json;

use crate::client::Client;
use crate::error::CliError;
use crate::output::{self, Format};

/// Largest backup accepted from a server (the store is held in memory; this is far above it).
const MAX_BYTES: u64 = 16 << 30;

#[derive(Subcommand, Debug)]
pub(crate) enum SnapshotCommand {
    /// Save the cluster's state (as the server answering holds it) to FILE, checksummed.
    ///
    /// Example: flotilla snapshot save /var/backups/flotilla-$(date +%F).snap
    Save { file: PathBuf },
    /// Check a saved snapshot and show its revision and objects per kind.
    Inspect { file: PathBuf },
    /// Seed a NEW cluster's first server from a saved snapshot (as `etcdctl snapshot
    /// restore`). The file is verified and written into DATA_DIR, which must be empty or
    /// absent; nothing is written if any check fails. Then start `flotilla server --id N
    /// --data-dir DATA_DIR` (with or without --bootstrap, never --join): it comes up as the
    /// only member of a new cluster holding every object at the snapshot's revisions, and
    /// the other servers join it with --join as usual (they receive the state as a Raft
    /// snapshot). Give the new servers fresh data dirs; keep the old cluster's servers down.
    ///
    /// Example: flotilla snapshot restore backup.snap --data-dir /var/lib/flotilla/server --id 1
    Restore {
        file: PathBuf,
        /// The new server's data dir (created 0700 if absent; must be empty).
        #[arg(long)]
        data_dir: PathBuf,
        /// The Raft ID of the server that will start on DATA_DIR.
        #[arg(long)]
        id: u64,
    },
}

pub(crate) async fn run(client: &Client, cmd: SnapshotCommand, format: Format) -> Result<(), CliError> {
    match cmd {
        SnapshotCommand::Save { file } => save(client, &file, format).await,
        SnapshotCommand::Inspect { file } => inspect(&file, format),
        SnapshotCommand::Restore { file, data_dir, id } => restore(&file, &data_dir, id, format),
    }
}

async fn save(client: &Client, file: &Path, format: Format) -> Result<(), CliError> {
    let mut stream = client.cluster(|mut c| async move { c.snapshot(SnapshotRequest {}).await }).await?.into_inner();
    let mut data = Vec::new();
    let mut header = None;
    while let Some(chunk) = stream.message().await.map_err(CliError::from)? {
        if header.is_none() {
            if chunk.total_bytes > MAX_BYTES {
                return Err(CliError::runtime(format!(
                    "the server offers {} bytes, above {MAX_BYTES}",
                    chunk.total_bytes
                )));
            }
            header = Some((chunk.revision, chunk.total_bytes, chunk.sha256.clone(), chunk.answered_by));
        }
        data.extend_from_slice(&chunk.data);
        if data.len() as u64 > MAX_BYTES {
            return Err(CliError::runtime("the snapshot stream is larger than it said"));
        }
    }
    let (revision, total, sha256, answered_by) = header.ok_or_else(|| CliError::runtime("the server sent no data"))?;
    if data.len() as u64 != total || backup::sha256(&data) != sha256 {
        return Err(CliError::runtime(format!(
            "the snapshot arrived damaged: {} of {total} bytes, sha256 {} (server said {sha256})",
            data.len(),
            backup::sha256(&data)
        )));
    }
    let created_at_ms = flotilla_api::civil::unix_ms();
    let header = Header { revision, bytes: 0, sha256: String::new(), created_at_ms, answered_by, format: 0 };
    write_atomically(file, &backup::encode(header, &data))?;
    let kinds = backup::kinds(&data).map_err(|e| CliError::runtime(e.to_string()))?;
    match format {
        Format::Table => println!(
            "saved {} ({} bytes) at store revision {revision} from server {answered_by}: {}",
            file.display(),
            data.len(),
            summary(&kinds)
        ),
        _ => output::print_doc(
            &json!({"file": file, "revision": revision, "bytes": data.len(), "answered_by": answered_by, "objects": kinds}),
            format,
        ),
    }
    Ok(())
}

fn summary(kinds: &std::collections::BTreeMap<String, usize>) -> String {
    if kinds.is_empty() {
        return "no objects".into();
    }
    kinds.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ")
}

/// Writes `bytes` to a temporary file beside `file` (0600), fsyncs it and renames it into place.
fn write_atomically(file: &Path, bytes: &[u8]) -> Result<(), CliError> {
    let err = |what: &str, e: std::io::Error| CliError::runtime(format!("cannot {what} {}: {e}", file.display()));
    let tmp = file.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| err("create", e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| err("write", e))?;
    std::fs::rename(&tmp, file).map_err(|e| err("rename into", e))
}

/// Checks the backup (exit 2 naming the file if it is unreadable, damaged or of a newer
/// format) and the data dir (exit 2 if not empty), then lays the backup into it.
fn restore(file: &Path, data_dir: &Path, id: u64, format: Format) -> Result<(), CliError> {
    let bytes = std::fs::read(file).map_err(|e| CliError::usage(format!("cannot read {}: {e}", file.display())))?;
    let b = backup::decode(&bytes).map_err(|e| CliError::usage(format!("{}: {e}", file.display())))?;
    let kinds = backup::kinds(&b.data).map_err(|e| CliError::usage(format!("{}: {e}", file.display())))?;
    // The file is checked above; what is left to refuse is the data dir or the id.
    let revision = flotilla_storage::seed::prepare_restore(data_dir, id, &bytes).map_err(|e| {
        if e.is_usage() {
            CliError::usage(e.to_string())
        } else {
            CliError::runtime(e.to_string())
        }
    })?;
    match format {
        Format::Table => println!(
            "restored {} (store revision {revision}: {}) into {} for server {id}; start it with \
             `flotilla server --id {id} --data-dir {}` and join the other servers to it",
            file.display(),
            summary(&kinds),
            data_dir.display(),
            data_dir.display()
        ),
        _ => output::print_doc(
            &json!({"file": file, "data_dir": data_dir, "id": id, "revision": revision, "objects": kinds}),
            format,
        ),
    }
    Ok(())
}

fn inspect(file: &Path, format: Format) -> Result<(), CliError> {
    let bytes = std::fs::read(file).map_err(|e| CliError::runtime(format!("cannot read {}: {e}", file.display())))?;
    let b = backup::decode(&bytes).map_err(|e| CliError::runtime(format!("{}: {e}", file.display())))?;
    let kinds = backup::kinds(&b.data).map_err(|e| CliError::runtime(format!("{}: {e}", file.display())))?;
    let h = &b.header;
    match format {
        Format::Table => println!(
            "{}: store revision {}, {} bytes, sha256 {} (verified), from server {}, taken at {} UTC: {}",
            file.display(),
            h.revision,
            h.bytes,
            h.sha256,
            h.answered_by,
            crate::cmd::audit::utc(h.created_at_ms),
            summary(&kinds)
        ),
        _ => output::print_doc(&json!({"header": h, "objects": kinds}), format),
    }
    Ok(())
}
