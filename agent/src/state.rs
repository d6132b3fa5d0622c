//! What the agent keeps in its data dir across restarts: its stable `agent_id`
//! (`<data-dir>/agent-id`) and the engines it started (`<data-dir>/engines.json`: replica,
//! assignment with its LoRA adapters, pid, process start time, port, API key, certificate
//! pin), so a
//! restarted agent adopts its engines (and reconciles their adapters, with the engine's
//! key) instead of starting them twice.
//!
//! Writes are atomic ([`write_atomic`]: a temp file in the same dir, fsync'd, renamed into
//! place, the dir fsync'd) and the files are mode 0600: `engines.json` holds the engines' keys.
//!
//! `engines.json` carries a format version ([`STATE_FORMAT`]): `{"format": 2, "engines":
//! {...}}`. Version 1, written before the field existed, is the bare map of engines; it is
//! read as such and rewritten as version 2 at the next change. A file of a newer version
//! than this binary knows stops the agent with an error naming the file, the version found
//! and the one supported (`flotilla_api::format`), rather than being misread.
//!
//! A corrupt `engines.json` at start stops the agent with an error naming the file and
//! saying what to do, rather than starting without adoption: the engines it lists may still
//! be running and holding their GPUs and ports, and an agent that forgot them would start a
//! second engine on the same GPUs (out of memory, or a port conflict) while the first runs
//! unsupervised. The operator stops those engines (their pids are in the file, or in
//! `ps`), moves the file aside, and starts the agent again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use flotilla_api::pb::{AdapterAssignment, GangAssignment, KvTransferAssignment, ReplicaAssignment};
use serde::{Deserialize, Serialize};

use crate::engines::process::ProcessIdentity;
use crate::error::AgentError;

/// The assignment an engine was started with (serializable mirror of the proto).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedAssignment {
    /// Replica.
    pub replica: String,
    /// Model.
    pub model: String,
    /// Engine kind.
    pub engine: String,
    /// Source URI.
    pub source: String,
    /// Engine args.
    pub engine_args: Vec<String>,
    /// GPU indices.
    pub gpus: Vec<u32>,
    /// LoRA adapters the engine must hold (the last desired list; absent in files written
    /// before adapters existed).
    #[serde(default)]
    pub adapters: Vec<SavedAdapter>,
    /// The container image it runs in (absent: a process, and in files written before
    /// images existed).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub engine_image: String,
    /// Its member of a multi-node replica (absent: a one-node replica, and in files written
    /// before gangs existed). Part of the engine's identity: an adopted member is kept only
    /// when its gang is unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gang: Option<SavedGang>,
    /// A P/D member's connector and role (absent: not one, and in files written before
    /// disaggregation existed). Part of the engine's identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_transfer: Option<SavedKvTransfer>,
}

/// A P/D member's role (serializable mirror of the proto's `KvTransferAssignment`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedKvTransfer {
    /// `nixl`, `lmcache` or `p2p-nccl`.
    pub connector: String,
    /// `prefill` or `decode`.
    pub role: String,
}

/// A gang member's place (serializable mirror of the proto's `GangAssignment`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedGang {
    /// Members.
    pub size: u32,
    /// This member's rank (0: the head).
    pub rank: u32,
    /// `tp-pp` or `data-parallel`.
    pub layout: String,
    /// GPUs per member.
    pub gpus_per_node: u32,
    /// The head's rendezvous address (a worker's; empty for the head).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub head_address: String,
    /// A `ray` worker's copy of its gang's token (a secret; this file is mode 0600).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
}

/// One assigned LoRA adapter (serializable mirror of the proto).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedAdapter {
    /// Adapter name.
    pub name: String,
    /// Source URI.
    pub source: String,
}

/// The serializable form of an adapter list.
pub fn saved_adapters(adapters: &[AdapterAssignment]) -> Vec<SavedAdapter> {
    adapters.iter().map(|a| SavedAdapter { name: a.name.clone(), source: a.source.clone() }).collect()
}

impl From<&ReplicaAssignment> for SavedAssignment {
    fn from(a: &ReplicaAssignment) -> Self {
        SavedAssignment {
            replica: a.replica.clone(),
            model: a.model.clone(),
            engine: a.engine.clone(),
            source: a.source.clone(),
            engine_args: a.engine_args.clone(),
            gpus: a.gpus.clone(),
            adapters: saved_adapters(&a.adapters),
            engine_image: a.engine_image.clone(),
            gang: a.gang.as_ref().map(|g| SavedGang {
                size: g.size,
                rank: g.rank,
                layout: g.layout.clone(),
                gpus_per_node: g.gpus_per_node,
                head_address: g.head_address.clone(),
                token: g.token.clone(),
            }),
            kv_transfer: a
                .kv_transfer
                .as_ref()
                .map(|k| SavedKvTransfer { connector: k.connector.clone(), role: k.role.clone() }),
        }
    }
}

impl From<SavedAssignment> for ReplicaAssignment {
    fn from(s: SavedAssignment) -> Self {
        ReplicaAssignment {
            replica: s.replica,
            model: s.model,
            engine: s.engine,
            source: s.source,
            engine_args: s.engine_args,
            gpus: s.gpus,
            engine_image: s.engine_image,
            adapters: s.adapters.into_iter().map(|a| AdapterAssignment { name: a.name, source: a.source }).collect(),
            // a start is traced once, by the agent that made it
            traceparent: String::new(),
            gang: s.gang.map(|g| GangAssignment {
                size: g.size,
                rank: g.rank,
                layout: g.layout,
                gpus_per_node: g.gpus_per_node,
                head_address: g.head_address,
                token: g.token,
            }),
            kv_transfer: s.kv_transfer.map(|k| KvTransferAssignment { connector: k.connector, role: k.role }),
        }
    }
}

/// One engine process the agent started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedEngine {
    /// What it runs.
    pub assignment: SavedAssignment,
    /// The process (group leader) and its start time.
    pub process: ProcessIdentity,
    /// Its port.
    pub port: u16,
    /// Restarts so far.
    pub restarts: u32,
    /// The key the engine requires (`VLLM_API_KEY`); absent for engines started before keys
    /// existed, which run without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// The SHA-256 (hex) of the certificate the engine serves TLS with (its files are in
    /// `<data-dir>/engines/<replica>/`); absent for an engine serving plain HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_cert_sha256: Option<String>,
    /// A gang head's rendezvous port (reserved again on adoption; the workers were told
    /// it); absent for every other engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rendezvous_port: Option<u16>,
    /// A `ray` head's gang token (Ray's auth token, reported as `gang_token`), kept so an
    /// adopted head's workers still get in; absent for every other engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gang_token: Option<String>,
    /// A P/D member's connector ports, `(first, count)` consecutive ones (reserved again on
    /// adoption; released when the process ends); absent for every other engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connector_ports: Option<(u16, u16)>,
}

/// The `engines.json` format this binary writes (and the newest it reads).
pub const STATE_FORMAT: u32 = 2;

/// `engines.json` as written since version 2.
#[derive(Serialize)]
struct StateFile<'a> {
    format: u32,
    engines: &'a BTreeMap<String, SavedEngine>,
}

/// Parses `engines.json`: version 1 (a bare map of engines: no `format` number at the top)
/// or a versioned file up to [`STATE_FORMAT`]. Errors are reasons, without the file name.
fn decode_state(bytes: &[u8]) -> Result<BTreeMap<String, SavedEngine>, String> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format!("corrupt state file ({e})"))?;
    let found = match value.get("format") {
        Some(serde_json::Value::Number(n)) => Some(n.as_u64().and_then(|v| u32::try_from(v).ok()).unwrap_or(u32::MAX)),
        _ => None,
    };
    let version = flotilla_api::format::check("state file", "", found, STATE_FORMAT).map_err(|_| {
        format!(
            "written in state format version {}; this binary supports up to version {STATE_FORMAT}: run a newer flotilla agent",
            found.unwrap_or(1)
        )
    })?;
    let engines = if version == 1 { value } else { value.get("engines").cloned().unwrap_or_default() };
    serde_json::from_value(engines).map_err(|e| format!("corrupt state file ({e})"))
}

/// `<data-dir>/engines.json`, read once at start-up and rewritten on every change.
#[derive(Debug)]
pub struct StateStore {
    path: PathBuf,
    engines: Mutex<BTreeMap<String, SavedEngine>>,
}

impl StateStore {
    /// Loads the state file (a missing file is an empty state; a corrupt one is an error
    /// naming the file, since ignoring it could orphan engines: see the module doc).
    pub fn load(data_dir: &Path) -> Result<Self, AgentError> {
        let path = data_dir.join("engines.json");
        let engines = match std::fs::read(&path) {
            Ok(bytes) => decode_state(&bytes).map_err(|e| {
                let reason = if e.starts_with("written in state format") {
                    e
                } else {
                    format!(
                        "{e}; the engines it lists cannot be adopted: stop any engine this \
                         agent started, move the file aside, and start the agent again"
                    )
                };
                AgentError::io(&path, std::io::Error::new(std::io::ErrorKind::InvalidData, reason))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(AgentError::io(&path, e)),
        };
        Ok(StateStore { path, engines: Mutex::new(engines) })
    }

    /// Every saved engine.
    pub fn engines(&self) -> BTreeMap<String, SavedEngine> {
        self.lock().clone()
    }

    /// Records (or replaces) an engine and writes the file.
    pub fn put(&self, engine: SavedEngine) -> Result<(), AgentError> {
        let mut g = self.lock();
        g.insert(engine.assignment.replica.clone(), engine);
        self.write(&g)
    }

    /// Replaces the adapter list of a recorded engine and writes the file; nothing when the
    /// engine is not recorded (not started yet) or the list is unchanged.
    pub fn set_adapters(&self, replica: &str, adapters: &[AdapterAssignment]) -> Result<(), AgentError> {
        let mut g = self.lock();
        let new = saved_adapters(adapters);
        match g.get_mut(replica) {
            Some(e) if e.assignment.adapters != new => {
                e.assignment.adapters = new;
                self.write(&g)
            }
            _ => Ok(()),
        }
    }

    /// Forgets an engine and writes the file.
    pub fn remove(&self, replica: &str) -> Result<(), AgentError> {
        let mut g = self.lock();
        if g.remove(replica).is_some() {
            self.write(&g)?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, SavedEngine>> {
        self.engines.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self, engines: &BTreeMap<String, SavedEngine>) -> Result<(), AgentError> {
        let bytes = serde_json::to_vec_pretty(&StateFile { format: STATE_FORMAT, engines })
            .map_err(|e| AgentError::io(&self.path, std::io::Error::other(e.to_string())))?;
        write_atomic(&self.path, &bytes)
    }
}

/// Writes `bytes` to `path` atomically, mode 0600: into a temp file in the same dir
/// (`.<name>.tmp`), fsync'd, renamed over `path`, then the dir fsync'd so the rename
/// survives a crash. A crash leaves the old content or the new, never a partial file; a
/// failed write removes its temp file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AgentError> {
    let Some(name) = path.file_name() else {
        return Err(AgentError::io(path, std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path")));
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let written = write_synced(&tmp, bytes)
        .map_err(|e| AgentError::io(&tmp, e))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| AgentError::io(path, e)));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| AgentError::io(dir, e))
}

/// Creates (or truncates) `path` mode 0600, writes `bytes` and fsyncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(flotilla_security::private_dir::FILE_MODE)
        .open(path)?;
    flotilla_security::private_dir::restrict(&f)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Takes `<data-dir>/agent.lock` (flock, released when the returned file is dropped or
/// the process exits), so two agents never share a data dir and adopt the same engines.
pub fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File, AgentError> {
    let path = data_dir.join("agent.lock");
    let file = open_lock_file(&path).map_err(|e| AgentError::io(&path, e))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|e| {
        AgentError::io(
            &path,
            std::io::Error::new(std::io::ErrorKind::WouldBlock, format!("another agent uses this data dir ({e})")),
        )
    })?;
    Ok(file)
}

/// Opens (creating, owner-only) a file to `flock`; its content is never written.
pub fn open_lock_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(flotilla_security::private_dir::FILE_MODE)
        .open(path)
        .and_then(|f| flotilla_security::private_dir::restrict(&f).map(|()| f))
}

/// Reads `<data-dir>/agent-id`, creating it with a new UUID the first time.
pub fn agent_id(data_dir: &Path) -> Result<String, AgentError> {
    let path = data_dir.join("agent-id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Ok(_) => new_agent_id(&path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => new_agent_id(&path),
        Err(e) => Err(AgentError::io(&path, e)),
    }
}

fn new_agent_id(path: &Path) -> Result<String, AgentError> {
    let id = uuid::Uuid::new_v4().to_string();
    write_atomic(path, id.as_bytes())?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_agent_id_is_stable() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::load(dir.path()).unwrap();
        assert!(s.engines().is_empty());
        let a = ReplicaAssignment {
            replica: "r1".into(),
            model: "m".into(),
            gpus: vec![1],
            adapters: vec![AdapterAssignment { name: "sql".into(), source: "sim://sql".into() }],
            kv_transfer: Some(KvTransferAssignment { connector: "nixl".into(), role: "decode".into() }),
            ..Default::default()
        };
        let e = SavedEngine {
            assignment: (&a).into(),
            process: ProcessIdentity { pid: 42, start_ticks: Some(7) },
            port: 20000,
            restarts: 2,
            api_key: Some("k".repeat(64)),
            engine_cert_sha256: Some("ab".repeat(32)),
            rendezvous_port: None,
            gang_token: None,
            connector_ports: Some((20001, 2)),
        };
        s.put(e.clone()).unwrap();
        let again = StateStore::load(dir.path()).unwrap();
        assert_eq!(again.engines().get("r1"), Some(&e));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("engines.json")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the state file holds engine keys");
        assert_eq!(ReplicaAssignment::from(e.assignment.clone()), a);
        let more = vec![a.adapters[0].clone(), AdapterAssignment { name: "b".into(), source: "file:///b".into() }];
        again.set_adapters("r1", &more).unwrap();
        again.set_adapters("nope", &more).unwrap();
        let reread = StateStore::load(dir.path()).unwrap().engines();
        assert_eq!(ReplicaAssignment::from(reread["r1"].assignment.clone()).adapters, more);
        assert!(!reread.contains_key("nope"));
        again.remove("r1").unwrap();
        assert!(StateStore::load(dir.path()).unwrap().engines().is_empty());

        let lock = lock_data_dir(dir.path()).unwrap();
        assert!(lock_data_dir(dir.path()).unwrap_err().to_string().contains("another agent"));
        drop(lock);
        assert!(lock_data_dir(dir.path()).is_ok());

        let id = agent_id(dir.path()).unwrap();
        assert_eq!(agent_id(dir.path()).unwrap(), id);
        std::fs::write(dir.path().join("engines.json"), b"{nope").unwrap();
        assert!(StateStore::load(dir.path()).unwrap_err().to_string().contains("engines.json"));
    }

    #[test]
    fn writes_are_atomic_private_and_leave_no_temp_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engines.json");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let listing = || {
            let mut names: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into())
                .collect();
            names.sort();
            names
        };
        // A stale temp file of a crashed write, world-readable: overwritten, then gone.
        std::fs::write(dir.path().join(".engines.json.tmp"), b"partial").unwrap();
        std::fs::set_permissions(dir.path().join(".engines.json.tmp"), std::fs::Permissions::from_mode(0o644)).unwrap();
        write_atomic(&path, b"{\"a\": 1}").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"a\": 1}");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(listing(), ["engines.json"]);
        write_atomic(&path, b"{}").unwrap();
        assert_eq!((std::fs::read(&path).unwrap(), listing()), (b"{}".to_vec(), vec!["engines.json".to_string()]));

        // A write that cannot land (the target is a directory) names it and cleans up.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir(&blocked).unwrap();
        let e = write_atomic(&blocked, b"x").unwrap_err().to_string();
        assert!(e.contains(&blocked.display().to_string()), "{e}");
        assert_eq!(listing(), ["blocked", "engines.json"], "no temp file left behind");
        let e = write_atomic(&dir.path().join("missing/engines.json"), b"x").unwrap_err().to_string();
        assert!(e.contains("missing/.engines.json.tmp"), "{e}");

        let _lock = lock_data_dir(dir.path()).unwrap();
        let id = agent_id(dir.path()).unwrap();
        assert!(!id.is_empty());
        assert_eq!((mode(&dir.path().join("agent.lock")), mode(&dir.path().join("agent-id"))), (0o600, 0o600));
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_naming_it_and_saying_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [&b"{nope"[..], b"", b"[1, 2]", b"{\"r1\": {\"port\": \"x\"}}", &[0xff, 0xfe, 0x00]] {
            std::fs::write(dir.path().join("engines.json"), bad).unwrap();
            let e = StateStore::load(dir.path()).unwrap_err().to_string();
            assert!(e.contains("engines.json") && e.contains("corrupt state file"), "{bad:?}: {e}");
            assert!(e.contains("move the file aside"), "{e}");
        }
    }

    #[test]
    fn a_gang_member_and_its_rendezvous_port_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::load(dir.path()).unwrap();
        let member = |rank: u32, head_address: &str| ReplicaAssignment {
            replica: "big-0".into(),
            model: "big".into(),
            engine: "vllm".into(),
            gpus: vec![0, 1],
            gang: Some(GangAssignment {
                size: 2,
                rank,
                layout: "tp-pp".into(),
                gpus_per_node: 2,
                head_address: head_address.into(),
                token: String::new(),
            }),
            ..Default::default()
        };
        let engine = |a: &ReplicaAssignment, rendezvous_port| SavedEngine {
            assignment: a.into(),
            process: ProcessIdentity { pid: 42, start_ticks: Some(7) },
            port: 30000,
            restarts: 0,
            api_key: None,
            engine_cert_sha256: None,
            rendezvous_port,
            gang_token: None,
            connector_ports: None,
        };
        let head = member(0, "");
        s.put(engine(&head, Some(30001))).unwrap();
        let saved = StateStore::load(dir.path()).unwrap().engines()["big-0"].clone();
        assert_eq!(saved.rendezvous_port, Some(30001), "an adopted head reserves its rendezvous port again");
        let back = ReplicaAssignment::from(saved.assignment);
        assert_eq!(back, head);
        assert!(crate::reconcile::same_engine(&back, &head), "an adopted member is kept, not replaced");

        let worker = member(1, "[fd00::5]:30001");
        s.put(engine(&worker, None)).unwrap();
        let text = std::fs::read_to_string(dir.path().join("engines.json")).unwrap();
        assert!(text.contains("[fd00::5]:30001"), "{text}");
        assert!(!text.contains("rendezvous_port"), "absent for a worker: {text}");
        let back = ReplicaAssignment::from(StateStore::load(dir.path()).unwrap().engines()["big-0"].assignment.clone());
        assert_eq!(back.gang, worker.gang);
    }

    #[test]
    fn state_files_written_before_adapters_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let old = r#"{"r1": {"assignment": {"replica": "r1", "model": "m", "engine": "sim", "source": "file:///m",
            "engine_args": [], "gpus": [0]}, "process": {"pid": 42, "start_ticks": 7}, "port": 20000, "restarts": 0}}"#;
        std::fs::write(dir.path().join("engines.json"), old).unwrap();
        let engines = StateStore::load(dir.path()).unwrap().engines();
        assert!(engines["r1"].assignment.adapters.is_empty());
        assert_eq!(engines["r1"].port, 20000, "a version 1 file (the bare map) is read");
        assert_eq!(engines["r1"].api_key, None, "an engine started before keys runs without one");
        assert_eq!(engines["r1"].engine_cert_sha256, None, "nor TLS");
        assert_eq!((engines["r1"].assignment.gang.as_ref(), engines["r1"].rendezvous_port), (None, None), "nor a gang");
    }

    #[test]
    fn the_state_file_carries_its_format_and_a_newer_one_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engines.json");
        std::fs::write(&path, b"{}").unwrap();
        let s = StateStore::load(dir.path()).unwrap();
        s.remove("nothing").unwrap();
        let e = SavedEngine {
            assignment: (&ReplicaAssignment { replica: "r1".into(), ..Default::default() }).into(),
            process: ProcessIdentity { pid: 42, start_ticks: Some(7) },
            port: 20000,
            restarts: 0,
            api_key: None,
            engine_cert_sha256: None,
            rendezvous_port: None,
            gang_token: None,
            connector_ports: None,
        };
        s.put(e.clone()).unwrap();
        let written: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(written["format"], STATE_FORMAT, "{written}");
        assert_eq!(StateStore::load(dir.path()).unwrap().engines()["r1"], e);

        std::fs::write(&path, format!(r#"{{"format": {}, "engines": {{}}}}"#, STATE_FORMAT + 1)).unwrap();
        let err = StateStore::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("engines.json") && err.contains("version 3") && err.contains("up to version 2"), "{err}");
        std::fs::write(&path, r#"{"format": "two", "engines": {}}"#).unwrap();
        assert!(StateStore::load(dir.path()).unwrap_err().to_string().contains("corrupt state file"));
    }
}
