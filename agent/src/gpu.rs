//! The node's GPU inventory behind one trait: [`SimulatedGpus`] built from flags (with
//! failure injection for tests) and [`NvmlGpus`] reading NVIDIA's NVML on real machines.
//! The agent registers `gpus()` once and sends `probe()` with every heartbeat.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use flotilla_api::pb;

use crate::config::GpuSource;
use crate::error::AgentError;

/// A GPU as the agent reports it (the protocol's type).
pub type GpuInfo = pb::GpuInfo;

/// The node's GPUs.
pub trait GpuInventory: Send + Sync + std::fmt::Debug {
    /// Every GPU with its static facts (index, type, memory) and current health.
    fn gpus(&self) -> Vec<GpuInfo>;
    /// Re-checks every GPU and returns the same list with fresh health.
    fn probe(&self) -> Vec<GpuInfo> {
        self.gpus()
    }
}

/// Builds the inventory the config asks for.
pub fn from_source(source: &GpuSource) -> Result<Arc<dyn GpuInventory>, AgentError> {
    match source {
        GpuSource::Simulated { count, gpu_type, memory_mib } => {
            Ok(Arc::new(SimulatedGpus::new(*count, gpu_type, *memory_mib)))
        }
        GpuSource::Nvidia => Ok(Arc::new(NvmlGpus::init()?)),
    }
}

/// GPUs simulated from flags. Failures can be injected (and cleared) at run time.
#[derive(Debug, Clone)]
pub struct SimulatedGpus {
    gpus: Vec<GpuInfo>,
    failures: Arc<Mutex<BTreeMap<u32, String>>>,
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
                health_reason: String::new(),
            })
            .collect();
        SimulatedGpus { gpus, failures: Arc::default() }
    }

    /// Marks GPU `index` unhealthy with `reason` (e.g. "xid 79: fallen off the bus").
    pub fn inject_failure(&self, index: u32, reason: &str) {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).insert(index, reason.to_string());
    }

    /// Clears an injected failure.
    pub fn heal(&self, index: u32) {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).remove(&index);
    }
}

impl GpuInventory for SimulatedGpus {
    fn gpus(&self) -> Vec<GpuInfo> {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        self.gpus
            .iter()
            .map(|g| match failures.get(&g.index) {
                Some(reason) => GpuInfo { healthy: false, health_reason: reason.clone(), ..g.clone() },
                None => g.clone(),
            })
            .collect()
    }
}

/// GPUs read from NVML (`libnvidia-ml.so`, loaded at run time: the crate builds without it).
///
/// Indices are NVML's, which follow PCI bus order; the vLLM driver sets
/// `CUDA_DEVICE_ORDER=PCI_BUS_ID` so that `CUDA_VISIBLE_DEVICES` means the same devices.
pub struct NvmlGpus {
    nvml: nvml_wrapper::Nvml,
    gpus: Vec<GpuInfo>,
}

impl std::fmt::Debug for NvmlGpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlGpus").field("gpus", &self.gpus).finish()
    }
}

impl NvmlGpus {
    /// Loads NVML and reads every device, or says why it cannot.
    pub fn init() -> Result<Self, AgentError> {
        let nvml = nvml_wrapper::Nvml::init()
            .map_err(|e| AgentError::Gpu(format!("cannot load NVML (is the NVIDIA driver installed?): {e}")))?;
        let count = nvml.device_count().map_err(|e| AgentError::Gpu(format!("NVML device count: {e}")))?;
        let mut gpus = Vec::new();
        for index in 0..count {
            let dev = nvml.device_by_index(index).map_err(|e| AgentError::Gpu(format!("NVML device {index}: {e}")))?;
            let name = dev.name().unwrap_or_else(|_| "unknown".into());
            let memory_mib = dev.memory_info().map(|m| m.total / (1024 * 1024)).unwrap_or(0);
            gpus.push(GpuInfo {
                index,
                gpu_type: gpu_type_name(&name, memory_mib),
                memory_mib,
                healthy: true,
                health_reason: String::new(),
            });
        }
        Ok(NvmlGpus { nvml, gpus })
    }
}

impl GpuInventory for NvmlGpus {
    fn gpus(&self) -> Vec<GpuInfo> {
        self.gpus.clone()
    }

    /// A device that no longer answers NVML (fallen off the bus) or reports uncorrected
    /// volatile ECC errors is unhealthy.
    fn probe(&self) -> Vec<GpuInfo> {
        use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError};
        self.gpus
            .iter()
            .map(|g| {
                let health = match self.nvml.device_by_index(g.index) {
                    Err(e) => Err(format!("nvml cannot reach the device: {e}")),
                    Ok(dev) => match dev.memory_info() {
                        Err(e) => Err(format!("nvml memory query failed: {e}")),
                        Ok(_) => match dev.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile) {
                            Ok(n) if n > 0 => Err(format!("{n} uncorrected ECC errors")),
                            _ => Ok(()),
                        },
                    },
                };
                match health {
                    Ok(()) => g.clone(),
                    Err(reason) => GpuInfo { healthy: false, health_reason: reason, ..g.clone() },
                }
            })
            .collect()
    }
}

/// "NVIDIA A100-SXM4-80GB" → "A100-SXM4-80GB"; adds the memory when the name has none.
pub fn gpu_type_name(nvml_name: &str, memory_mib: u64) -> String {
    let base = nvml_name.trim().trim_start_matches("NVIDIA").trim().replace(' ', "-");
    if base.to_ascii_uppercase().ends_with("GB") || memory_mib == 0 {
        base
    } else {
        format!("{base}-{}GB", (memory_mib + 512) / 1024)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulated_gpus_report_injected_failures() {
        let g = SimulatedGpus::new(2, "A100-80GB", 81920);
        assert_eq!(g.gpus().len(), 2);
        assert!(g.probe().iter().all(|g| g.healthy));
        g.inject_failure(1, "xid 79");
        let p = g.probe();
        assert!(p[0].healthy);
        assert!(!p[1].healthy);
        assert_eq!(p[1].health_reason, "xid 79");
        g.heal(1);
        assert!(g.probe()[1].healthy);
    }

    #[test]
    fn from_flags() {
        let inv =
            from_source(&GpuSource::Simulated { count: 3, gpu_type: "L4-24GB".into(), memory_mib: 24576 }).unwrap();
        let gpus = inv.gpus();
        assert_eq!(gpus.iter().map(|g| g.index).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!(gpus.iter().all(|g| g.gpu_type == "L4-24GB" && g.memory_mib == 24576));
    }

    #[test]
    fn nvml_without_a_driver_is_a_clear_error() {
        // These machines have no NVIDIA driver; on one that has, init succeeds.
        if let Err(e) = NvmlGpus::init() {
            assert!(e.to_string().contains("NVML"), "{e}");
        }
    }

    #[test]
    fn nvml_names_become_types() {
        assert_eq!(gpu_type_name("NVIDIA A100-SXM4-80GB", 81920), "A100-SXM4-80GB");
        assert_eq!(gpu_type_name("NVIDIA H100 PCIe", 81559), "H100-PCIe-80GB");
        assert_eq!(gpu_type_name("Tesla T4", 15360), "Tesla-T4-15GB");
    }
}
