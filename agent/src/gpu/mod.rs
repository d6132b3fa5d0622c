//! The node's GPU inventory behind one trait: [`SimulatedGpus`] built from flags (with
//! fault injection for tests: `--gpu-faults FILE`) and [`NvmlGpus`] reading NVIDIA's NVML
//! on real machines. Both read the same [`GpuSignals`]; [`GpuMonitor`] classifies them with
//! each GPU's history. The agent registers `gpus()` once and sends `probe()` with every
//! heartbeat.
//!
//! ```text
//!  SimulatedGpus (flags + fault file) ─┐
//!                                      ├─ signals() ─> GpuMonitor ─ classify::Track::step ─> GpuInfo{state, evidence}
//!  NvmlGpus (NVML + XID event thread) ─┘
//! ```

pub mod classify;
pub mod faults;
pub mod monitor;
pub mod nvml;
pub mod signals;
pub mod visible;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use flotilla_api::civil::unix_ms;
use flotilla_api::pb;

use crate::config::GpuSource;
use crate::error::AgentError;

pub use faults::Fault;
pub use monitor::GpuMonitor;
pub use nvml::{gpu_type_name, NvmlGpus};
pub use signals::GpuSignals;

/// A GPU as the agent reports it (the protocol's type).
pub type GpuInfo = pb::GpuInfo;

/// What a GPU is doing now, where the inventory can tell (NVML); each figure None when it
/// cannot. For `/metrics` only: never in heartbeats (it changes every read).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuUsage {
    pub index: u32,
    /// Fraction of the last sample period a kernel ran, in [0, 1].
    pub utilization: Option<f64>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub temperature_celsius: Option<f64>,
    pub power_watts: Option<f64>,
}

/// The node's GPUs.
pub trait GpuInventory: Send + Sync + std::fmt::Debug {
    /// Every GPU with its static facts (index, type, memory), reported healthy.
    fn gpus(&self) -> Vec<GpuInfo>;
    /// Reads every GPU's signals now, one per entry of `gpus()`, in the same order.
    fn signals(&self) -> Vec<GpuSignals>;
    /// Every GPU with its health now. This default judges one probe alone; [`GpuMonitor`]
    /// keeps each GPU's history (recovery, flap guard): the agent probes through it.
    fn probe(&self) -> Vec<GpuInfo> {
        GpuMonitor::classify_once(&self.gpus(), &self.signals())
    }
    /// Utilisation, memory, temperature and power of each GPU, where known (none for
    /// simulated GPUs).
    fn usage(&self) -> Vec<GpuUsage> {
        Vec::new()
    }
}

/// Builds the inventory the config asks for (`faults`: a `--gpu-faults` file, simulated
/// GPUs only).
pub fn from_source(source: &GpuSource, faults: Option<&Path>) -> Result<Arc<dyn GpuInventory>, AgentError> {
    match source {
        GpuSource::Simulated { count, gpu_type, memory_mib } => {
            let g = SimulatedGpus::new(*count, gpu_type, *memory_mib);
            if let Some(path) = faults {
                g.watch_faults(path)?;
            }
            Ok(Arc::new(g))
        }
        GpuSource::Nvidia => Ok(Arc::new(NvmlGpus::init()?)),
    }
}

/// Reads and checks a fault file for `count` GPUs (the error names the file and field).
pub fn load_faults(path: &Path, count: u32) -> Result<Vec<Fault>, AgentError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(AgentError::invalid("gpu-faults", format!("cannot read {}: {e}", path.display()))),
    };
    faults::parse(&text, count).map_err(|e| AgentError::invalid("gpu-faults", format!("{}: {e}", path.display())))
}

/// Injected faults and where they come from.
#[derive(Debug, Default)]
struct FaultState {
    /// The watched file, re-read on every probe (a missing file: no faults).
    path: Option<PathBuf>,
    /// Its text at the last read, to notice changes.
    text: String,
    faults: Vec<Fault>,
    /// When each entry of `faults` first appeared (stamps XID events).
    first_seen: Vec<u64>,
    probes: u64,
}

impl FaultState {
    /// Replaces the faults, keeping the first-seen time of entries that stay.
    fn set(&mut self, faults: Vec<Fault>) {
        let now = unix_ms();
        let first_seen = faults
            .iter()
            .map(|f| self.faults.iter().position(|o| o == f).map_or(now, |i| self.first_seen[i]))
            .collect();
        self.faults = faults;
        self.first_seen = first_seen;
    }

    /// Re-reads the file if it changed; a bad file keeps the previous faults (logged once).
    fn reload(&mut self, count: u32) {
        let Some(path) = &self.path else { return };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read the GPU fault file; faults kept");
                return;
            }
        };
        if text == self.text {
            return;
        }
        let parsed = faults::parse(&text, count);
        let file = path.display().to_string();
        self.text = text;
        match parsed {
            Ok(f) => {
                tracing::info!(file = %file, faults = f.len(), "GPU fault file changed");
                self.set(f);
            }
            Err(e) => tracing::warn!(file = %file, error = %e, "bad GPU fault file; the previous faults stay"),
        }
    }
}

/// GPUs simulated from flags. Faults come from a watched file ([`faults`] has the format)
/// or [`SimulatedGpus::set_faults`]; [`SimulatedGpus::inject_failure`] marks a GPU Failed
/// with a free-text reason.
#[derive(Debug, Clone)]
pub struct SimulatedGpus {
    gpus: Vec<GpuInfo>,
    failures: Arc<Mutex<BTreeMap<u32, String>>>,
    faults: Arc<Mutex<FaultState>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SimulatedGpus {
    /// `count` GPUs of `gpu_type`, indices 0..count.
    pub fn new(count: u32, gpu_type: &str, memory_mib: u64) -> Self {
        let gpus = (0..count)
            .map(|index| GpuInfo {
                index,
                gpu_type: gpu_type.to_string(),
                memory_mib,
                healthy: true,
                state: "healthy".into(),
                ..Default::default()
            })
            .collect();
        SimulatedGpus { gpus, failures: Arc::default(), faults: Arc::default() }
    }

    fn count(&self) -> u32 {
        self.gpus.len() as u32
    }

    /// Watches `path` for faults: read now (a bad file is an error naming the field), and
    /// again whenever its content changes.
    pub fn watch_faults(&self, path: &Path) -> Result<(), AgentError> {
        let faults = load_faults(path, self.count())?;
        let mut st = lock(&self.faults);
        st.path = Some(path.to_path_buf());
        st.text = std::fs::read_to_string(path).unwrap_or_default();
        st.set(faults);
        Ok(())
    }

    /// Replaces the injected faults (in-process tests; a watched file overrides them when it
    /// changes).
    pub fn set_faults(&self, faults: Vec<Fault>) {
        lock(&self.faults).set(faults);
    }

    /// Marks GPU `index` Failed with `reason` (e.g. "xid 79: fallen off the bus").
    pub fn inject_failure(&self, index: u32, reason: &str) {
        lock(&self.failures).insert(index, reason.to_string());
    }

    /// Clears an injected failure.
    pub fn heal(&self, index: u32) {
        lock(&self.failures).remove(&index);
    }
}

impl GpuInventory for SimulatedGpus {
    fn gpus(&self) -> Vec<GpuInfo> {
        self.gpus.clone()
    }

    fn signals(&self) -> Vec<GpuSignals> {
        let mut st = lock(&self.faults);
        st.reload(self.count());
        st.probes += 1;
        let first_seen = st.first_seen.clone();
        let mut out = faults::signals(self.count(), &st.faults, |i| first_seen[i], st.probes);
        drop(st);
        let failures = lock(&self.failures);
        for s in &mut out {
            s.injected = failures.get(&s.index).cloned();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulated_gpus_report_injected_failures() {
        let g = SimulatedGpus::new(2, "A100-80GB", 81920);
        assert_eq!(g.gpus().len(), 2);
        assert!(g.probe().iter().all(|g| g.healthy && g.state == "healthy"));
        g.inject_failure(1, "xid 79");
        let p = g.probe();
        assert!(p[0].healthy);
        assert!(!p[1].healthy);
        assert_eq!(p[1].state, "failed");
        assert_eq!(p[1].health_reason, "xid 79");
        assert_eq!(p[1].evidence, vec!["xid 79"]);
        g.heal(1);
        assert!(g.probe()[1].healthy);
    }

    #[test]
    fn from_flags() {
        let inv = from_source(&GpuSource::Simulated { count: 3, gpu_type: "L4-24GB".into(), memory_mib: 24576 }, None)
            .unwrap();
        let gpus = inv.gpus();
        assert_eq!(gpus.iter().map(|g| g.index).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!(gpus.iter().all(|g| g.gpu_type == "L4-24GB" && g.memory_mib == 24576));
    }

    #[test]
    fn the_fault_file_is_reread_when_it_changes_and_a_bad_edit_keeps_the_faults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("faults.yaml");
        let g = SimulatedGpus::new(4, "A100-80GB", 81920);
        g.watch_faults(&path).expect("a missing file is no faults");
        assert!(g.probe().iter().all(|g| g.healthy));
        std::fs::write(&path, "- {gpu: 1, fault: xid, code: 79}\n- {gpu: 0, fault: throttle, reason: thermal}\n")
            .unwrap();
        let p = g.probe();
        assert_eq!((p[1].state.as_str(), p[1].healthy), ("failed", false));
        assert!(p[1].evidence[0].starts_with("xid 79 (fallen off the bus) at "), "{:?}", p[1].evidence);
        assert_eq!((p[0].state.as_str(), p[0].healthy), ("degraded", true));
        let stamp = p[1].evidence.clone();
        std::fs::write(&path, "- {gpu: 1, fault: xid, code: 79}\n- {gpu: 0, fault: throttle, reason: hot}\n").unwrap();
        let p = g.probe();
        assert_eq!(p[0].state, "degraded", "a bad edit keeps the previous faults");
        assert_eq!(p[1].evidence, stamp, "an XID that stays keeps its time");
        std::fs::remove_file(&path).unwrap();
        assert!(g.probe().iter().all(|g| g.healthy && g.state == "healthy"));
        let e = SimulatedGpus::new(2, "A", 1).watch_faults(&{
            std::fs::write(&path, "- {gpu: 2, fault: missing}").unwrap();
            path.clone()
        });
        let e = e.unwrap_err();
        assert!(e.is_usage(), "{e}");
        assert!(e.to_string().contains("[0].gpu: 2 is not a GPU of this node"), "{e}");
    }
}
