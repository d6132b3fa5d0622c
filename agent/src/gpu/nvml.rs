//! GPUs read from NVIDIA's NVML (`libnvidia-ml.so`, loaded at run time: the agent builds
//! and runs without it). Each probe reads, per registered GPU: whether it is still among
//! the visible devices, whether it answers, ECC counters (volatile and aggregate
//! uncorrected, volatile corrected), retired pages and pending retirement, the PCIe link
//! against its maximum, and clock throttle reasons. A thread waits on NVML's critical-XID
//! events and keeps them for [`XID_WINDOW_MS`]. Row-remapping counters are not exposed by
//! `nvml-wrapper` 0.11: remap events and failures arrive as XIDs 63 and 64.
//!
//! The conversions from NVML readings to [`GpuSignals`] are pure and unit-tested here;
//! only [`NvmlGpus::init`] and the reads need a driver.
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;

use super::signals::{GpuSignals, PcieLink, Throttle, XidEvent};
use flotilla_api::civil::unix_ms;

use super::{GpuInfo, GpuInventory, GpuUsage};
use crate::error::AgentError;

/// How long an XID event keeps counting (a critical one keeps its GPU Failed this long).
pub const XID_WINDOW_MS: u64 = 600_000;
/// Most XID events kept.
const MAX_XIDS: usize = 256;

/// GPUs read from NVML.
///
/// Indices are NVML's, which follow PCI bus order; the vLLM driver sets
/// `CUDA_DEVICE_ORDER=PCI_BUS_ID` so that `CUDA_VISIBLE_DEVICES` means the same devices.
pub struct NvmlGpus {
    /// Leaked once per process: the XID thread's event set borrows it for ever.
    nvml: &'static Nvml,
    gpus: Vec<GpuInfo>,
    /// (GPU index, event), oldest first.
    xids: Arc<Mutex<VecDeque<(u32, XidEvent)>>>,
}

impl std::fmt::Debug for NvmlGpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlGpus").field("gpus", &self.gpus).finish()
    }
}

impl NvmlGpus {
    /// Loads NVML, reads every device and starts the XID watcher, or says why it cannot.
    pub fn init() -> Result<Self, AgentError> {
        let nvml = Nvml::init()
            .map_err(|e| AgentError::Gpu(format!("cannot load NVML (is the NVIDIA driver installed?): {e}")))?;
        let nvml: &'static Nvml = Box::leak(Box::new(nvml));
        let count = nvml.device_count().map_err(|e| AgentError::Gpu(format!("NVML device count: {e}")))?;
        let visible = super::visible::Visible::from_env(&|k| std::env::var(k).ok());
        let mut gpus = Vec::new();
        for index in 0..count {
            let dev = nvml.device_by_index(index).map_err(|e| AgentError::Gpu(format!("NVML device {index}: {e}")))?;
            if let Some(v) = &visible {
                let uuid = dev.uuid().unwrap_or_default();
                if !v.admits(index, &uuid) {
                    tracing::info!(index, %uuid, from = v.from, "GPU not in the visible set; not used");
                    continue;
                }
            }
            let name = dev.name().unwrap_or_else(|_| "unknown".into());
            let memory_mib = dev.memory_info().map(|m| m.total / (1024 * 1024)).unwrap_or(0);
            gpus.push(GpuInfo {
                index,
                gpu_type: gpu_type_name(&name, memory_mib),
                memory_mib,
                healthy: true,
                state: "healthy".into(),
                ..Default::default()
            });
        }
        let xids = Arc::new(Mutex::new(VecDeque::new()));
        let sink = xids.clone();
        let spawned = std::thread::Builder::new().name("nvml-xid".into()).spawn(move || watch_xids(nvml, count, sink));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the NVML XID watcher; XID events are not seen");
        }
        Ok(NvmlGpus { nvml, gpus, xids })
    }
}

/// Waits for critical-XID events of every device, for ever.
fn watch_xids(nvml: &'static Nvml, count: u32, sink: Arc<Mutex<VecDeque<(u32, XidEvent)>>>) {
    use nvml_wrapper::bitmasks::event::EventTypes;
    use nvml_wrapper::enums::event::XidError;
    let mut set = match nvml.create_event_set() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "NVML event sets unavailable; XID events are not seen");
            return;
        }
    };
    for index in 0..count {
        let Ok(dev) = nvml.device_by_index(index) else { continue };
        // A failed registration consumes the set: no XID events then (logged).
        set = match dev.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(gpu = index, error = %e.error, "cannot watch XID events; XID events are not seen");
                return;
            }
        };
    }
    loop {
        match set.wait(1000) {
            Ok(ev) => {
                let code = match ev.event_data {
                    Some(XidError::Value(c)) => c,
                    _ => continue,
                };
                let Ok(index) = ev.device.index() else { continue };
                tracing::warn!(gpu = index, xid = code, "NVML XID event");
                let mut q = sink.lock().unwrap_or_else(|p| p.into_inner());
                q.push_back((index, XidEvent { code, at_ms: unix_ms() }));
                while q.len() > MAX_XIDS {
                    q.pop_front();
                }
            }
            Err(NvmlError::Timeout) => {}
            Err(e) => {
                tracing::warn!(error = %e, "NVML event wait failed; XID watcher stops");
                return;
            }
        }
    }
}

/// What one probe read from one device (the NVML calls' results, `None`: not readable).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Readings {
    /// The device does not answer: the NVML error.
    pub unreachable: Option<String>,
    pub ecc_volatile_uncorrected: Option<u64>,
    pub ecc_aggregate_uncorrected: Option<u64>,
    pub ecc_volatile_corrected: Option<u64>,
    pub retired_pages: Option<u64>,
    pub retirement_pending: Option<bool>,
    /// (gen, width, max gen, max width).
    pub pcie: Option<(u32, u32, u32, u32)>,
    pub throttle_bits: Option<u64>,
}

/// Clock throttle reasons that mean trouble: thermal slowdowns, hardware slowdown and
/// power brake. The software power cap is ordinary under load and is not counted.
pub fn throttles(bits: u64) -> Vec<Throttle> {
    let r = ThrottleReasons::from_bits_truncate(bits);
    let mut out = Vec::new();
    if r.intersects(ThrottleReasons::HW_THERMAL_SLOWDOWN | ThrottleReasons::SW_THERMAL_SLOWDOWN) {
        out.push(Throttle::Thermal);
    }
    if r.intersects(ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN | ThrottleReasons::HW_SLOWDOWN) {
        out.push(Throttle::Power);
    }
    out
}

/// The signals of GPU `index` from its readings (pure). `visible`: NVML's device count;
/// `registered`: the GPUs registered at start; `xids`: every kept event; `now_ms`: drops
/// events older than [`XID_WINDOW_MS`].
pub fn to_signals(
    index: u32,
    r: &Readings,
    visible: u32,
    registered: u32,
    xids: &VecDeque<(u32, XidEvent)>,
    now_ms: u64,
) -> GpuSignals {
    let mut s = GpuSignals::clean(index);
    if index >= visible {
        s.missing = true;
        s.visible = Some((visible, registered));
        return s;
    }
    s.unreachable = r.unreachable.clone();
    s.xids = xids
        .iter()
        .filter(|(i, x)| *i == index && now_ms.saturating_sub(x.at_ms) <= XID_WINDOW_MS)
        .map(|(_, x)| *x)
        .collect();
    s.ecc_volatile_uncorrected = r.ecc_volatile_uncorrected.unwrap_or(0);
    s.ecc_aggregate_uncorrected = r.ecc_aggregate_uncorrected.unwrap_or(0);
    s.ecc_volatile_corrected = r.ecc_volatile_corrected.unwrap_or(0);
    s.retired_pages = r.retired_pages.unwrap_or(0);
    s.retirement_pending = r.retirement_pending.unwrap_or(false);
    // An idle GPU lowers its link generation to save power: only the width counts then.
    let idle =
        r.throttle_bits.is_some_and(|b| ThrottleReasons::from_bits_truncate(b).contains(ThrottleReasons::GPU_IDLE));
    s.pcie = r.pcie.map(|(gen, width, max_gen, max_width)| PcieLink {
        gen: if idle { max_gen } else { gen },
        width,
        max_gen,
        max_width,
    });
    s.throttle = r.throttle_bits.map(throttles).unwrap_or_default();
    s
}

impl NvmlGpus {
    /// Reads one device (NVML calls; a device that is gone reads as unreachable).
    fn read(&self, index: u32) -> Readings {
        use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, RetirementCause};
        let dev = match self.nvml.device_by_index(index) {
            Ok(d) => d,
            Err(e) => {
                return Readings {
                    unreachable: Some(format!("nvml cannot reach the device: {e}")),
                    ..Default::default()
                }
            }
        };
        if let Err(e) = dev.memory_info() {
            return Readings { unreachable: Some(format!("nvml memory query failed: {e}")), ..Default::default() };
        }
        let retired = [RetirementCause::MultipleSingleBitEccErrors, RetirementCause::DoubleBitEccError]
            .into_iter()
            .map(|c| dev.retired_pages(c).map(|p| p.len() as u64))
            .collect::<Result<Vec<u64>, _>>()
            .ok()
            .map(|v| v.iter().sum());
        let pcie = match (
            dev.current_pcie_link_gen(),
            dev.current_pcie_link_width(),
            dev.max_pcie_link_gen(),
            dev.max_pcie_link_width(),
        ) {
            (Ok(g), Ok(w), Ok(mg), Ok(mw)) => Some((g, w, mg, mw)),
            _ => None,
        };
        Readings {
            unreachable: None,
            ecc_volatile_uncorrected: dev.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile).ok(),
            ecc_aggregate_uncorrected: dev.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Aggregate).ok(),
            ecc_volatile_corrected: dev.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile).ok(),
            retired_pages: retired,
            retirement_pending: dev.are_pages_pending_retired().ok(),
            pcie,
            throttle_bits: dev.current_throttle_reasons().ok().map(|r| r.bits()),
        }
    }
}

/// One GPU's usage from NVML's readings (pure): utilisation in percent, memory (used, total)
/// in bytes, temperature in °C, power in milliwatts; a failed read is None.
pub fn to_usage(
    index: u32,
    util_percent: Option<u32>,
    memory: Option<(u64, u64)>,
    temperature: Option<u32>,
    power_mw: Option<u32>,
) -> GpuUsage {
    GpuUsage {
        index,
        utilization: util_percent.map(|p| f64::from(p.min(100)) / 100.0),
        memory_used_bytes: memory.map(|(used, _)| used),
        memory_total_bytes: memory.map(|(_, total)| total),
        temperature_celsius: temperature.map(f64::from),
        power_watts: power_mw.map(|mw| f64::from(mw) / 1000.0),
    }
}

impl GpuInventory for NvmlGpus {
    fn usage(&self) -> Vec<GpuUsage> {
        use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
        self.gpus
            .iter()
            .filter_map(|g| {
                let dev = self.nvml.device_by_index(g.index).ok()?;
                Some(to_usage(
                    g.index,
                    dev.utilization_rates().ok().map(|u| u.gpu),
                    dev.memory_info().ok().map(|m| (m.used, m.total)),
                    dev.temperature(TemperatureSensor::Gpu).ok(),
                    dev.power_usage().ok(),
                ))
            })
            .collect()
    }

    fn gpus(&self) -> Vec<GpuInfo> {
        self.gpus.clone()
    }

    fn signals(&self) -> Vec<GpuSignals> {
        let registered = self.gpus.len() as u32;
        let visible = self.nvml.device_count().unwrap_or(0);
        let now = unix_ms();
        let xids = {
            let mut q = self.xids.lock().unwrap_or_else(|p| p.into_inner());
            while q.front().is_some_and(|(_, x)| now.saturating_sub(x.at_ms) > XID_WINDOW_MS) {
                q.pop_front();
            }
            q.clone()
        };
        self.gpus
            .iter()
            .map(|g| {
                let r = if g.index < visible { self.read(g.index) } else { Readings::default() };
                to_signals(g.index, &r, visible, registered, &xids, now)
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

    #[test]
    fn only_trouble_throttle_reasons_count() {
        let b = |r: ThrottleReasons| r.bits();
        assert_eq!(throttles(b(ThrottleReasons::SW_POWER_CAP | ThrottleReasons::GPU_IDLE)), vec![]);
        assert_eq!(throttles(b(ThrottleReasons::HW_THERMAL_SLOWDOWN)), vec![Throttle::Thermal]);
        assert_eq!(throttles(b(ThrottleReasons::SW_THERMAL_SLOWDOWN)), vec![Throttle::Thermal]);
        assert_eq!(throttles(b(ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN)), vec![Throttle::Power]);
        assert_eq!(
            throttles(b(ThrottleReasons::HW_SLOWDOWN | ThrottleReasons::HW_THERMAL_SLOWDOWN)),
            vec![Throttle::Thermal, Throttle::Power]
        );
    }

    #[test]
    fn usage_readings_are_converted_and_missing_ones_stay_unknown() {
        let u = to_usage(3, Some(87), Some((40 << 30, 80 << 30)), Some(71), Some(312_500));
        assert_eq!(
            u,
            GpuUsage {
                index: 3,
                utilization: Some(0.87),
                memory_used_bytes: Some(40 << 30),
                memory_total_bytes: Some(80 << 30),
                temperature_celsius: Some(71.0),
                power_watts: Some(312.5),
            }
        );
        assert_eq!(to_usage(0, None, None, None, None), GpuUsage { index: 0, ..GpuUsage::default() });
        assert_eq!(to_usage(0, Some(250), None, None, None).utilization, Some(1.0), "clamped");
    }

    #[test]
    fn readings_become_signals() {
        let now = 10_000_000;
        let xids: VecDeque<(u32, XidEvent)> = [
            (1, XidEvent { code: 79, at_ms: now - 1000 }),
            (0, XidEvent { code: 48, at_ms: now - 1000 }),
            (1, XidEvent { code: 94, at_ms: now - XID_WINDOW_MS - 1 }),
        ]
        .into();
        let r = Readings {
            unreachable: None,
            ecc_volatile_uncorrected: Some(2),
            ecc_aggregate_uncorrected: Some(9),
            ecc_volatile_corrected: None,
            retired_pages: Some(3),
            retirement_pending: Some(true),
            pcie: Some((3, 16, 4, 16)),
            throttle_bits: Some(ThrottleReasons::HW_THERMAL_SLOWDOWN.bits()),
        };
        let s = to_signals(1, &r, 4, 4, &xids, now);
        assert_eq!(s.xids, vec![XidEvent { code: 79, at_ms: now - 1000 }], "its own, within the window");
        assert_eq!((s.ecc_volatile_uncorrected, s.ecc_aggregate_uncorrected, s.ecc_volatile_corrected), (2, 9, 0));
        assert_eq!((s.retired_pages, s.retirement_pending), (3, true));
        assert!(s.pcie.unwrap().downgraded());
        assert_eq!(s.throttle, vec![Throttle::Thermal]);
        assert!(!s.missing && s.unreachable.is_none());

        let gone = Readings { unreachable: Some("GPU is lost".into()), ..Default::default() };
        assert_eq!(to_signals(0, &gone, 4, 4, &VecDeque::new(), now).unreachable.as_deref(), Some("GPU is lost"));
        let idle = Readings {
            pcie: Some((1, 16, 4, 16)),
            throttle_bits: Some(ThrottleReasons::GPU_IDLE.bits()),
            ..Default::default()
        };
        assert!(!to_signals(0, &idle, 4, 4, &xids, now).pcie.unwrap().downgraded(), "idle power saving");
        let narrow = Readings { pcie: Some((1, 8, 4, 16)), ..idle };
        assert!(to_signals(0, &narrow, 4, 4, &xids, now).pcie.unwrap().downgraded(), "a lost lane is not power saving");
        let missing = to_signals(3, &Readings::default(), 3, 4, &xids, now);
        assert!(missing.missing);
        assert_eq!(missing.visible, Some((3, 4)));
    }
}
