//! What a probe reads from one GPU, before any judgement (plain data): XID events, ECC
//! counters, retired and remapped memory, the PCIe link, clock throttling, reachability
//! and visibility. [`SimulatedGpus`](super::SimulatedGpus) and [`NvmlGpus`](super::NvmlGpus)
//! both produce it; [`classify`](super::classify) judges it. Also the XID table: which
//! XIDs are critical and what each means.

/// One XID event (an error the NVIDIA driver logged for the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XidEvent {
    /// The XID number, e.g. 79.
    pub code: u64,
    /// Wall-clock ms since the Unix epoch when it was seen.
    pub at_ms: u64,
}

/// Why clocks are held down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Throttle {
    /// Hardware or software thermal slowdown.
    Thermal,
    /// Hardware slowdown or power brake (not the ordinary software power cap under load).
    Power,
}

impl Throttle {
    pub fn as_str(self) -> &'static str {
        match self {
            Throttle::Thermal => "thermal",
            Throttle::Power => "power",
        }
    }
}

/// A PCIe link: what it runs at now and the most it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcieLink {
    pub gen: u32,
    pub width: u32,
    pub max_gen: u32,
    pub max_width: u32,
}

impl PcieLink {
    /// Below its maximum generation or width.
    pub fn downgraded(&self) -> bool {
        (self.max_gen > 0 && self.gen < self.max_gen) || (self.max_width > 0 && self.width < self.max_width)
    }
}

/// Everything one probe read from one GPU. Counters the source cannot read are 0 / `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuSignals {
    pub index: u32,
    /// The device is not among the visible ones (fewer GPUs than registered).
    pub missing: bool,
    /// The device does not answer (fallen off the bus, NVML errors): why.
    pub unreachable: Option<String>,
    /// XID events still within the source's event window, oldest first.
    pub xids: Vec<XidEvent>,
    /// Uncorrected ECC errors since the last driver load.
    pub ecc_volatile_uncorrected: u64,
    /// Uncorrected ECC errors over the device's life.
    pub ecc_aggregate_uncorrected: u64,
    /// Corrected ECC errors since the last driver load (a rising count is a trend).
    pub ecc_volatile_corrected: u64,
    /// Memory pages retired so far.
    pub retired_pages: u64,
    /// A page retirement waits for a GPU reset.
    pub retirement_pending: bool,
    /// A row remap waits for a GPU reset.
    pub remap_pending: bool,
    /// A row remap failed (no spare rows left).
    pub remap_failed: bool,
    pub pcie: Option<PcieLink>,
    pub throttle: Vec<Throttle>,
    /// Visible GPUs and registered ones, when fewer are visible (for the evidence).
    pub visible: Option<(u32, u32)>,
    /// A failure injected by a test ([`SimulatedGpus::inject_failure`](super::SimulatedGpus::inject_failure)).
    pub injected: Option<String>,
}

impl GpuSignals {
    /// A GPU with nothing to report.
    pub fn clean(index: u32) -> GpuSignals {
        GpuSignals { index, ..Default::default() }
    }
}

/// XIDs that mean the GPU is broken (its replicas must move): double-bit ECC (48), row
/// remapping event and failure (63, 64), NVLink error (74), fallen off the bus (79),
/// high single-bit ECC rate (92), contained and uncontained ECC errors (94, 95), and
/// others NVIDIA documents as needing a GPU reset (119, 120: GSP errors; 140: unrecovered
/// ECC). Any other XID is informational (e.g. 13 and 31 are usually the application's fault).
pub const CRITICAL_XIDS: &[u64] = &[48, 63, 64, 74, 79, 92, 94, 95, 119, 120, 140];

/// Whether `code` is in [`CRITICAL_XIDS`].
pub fn xid_is_critical(code: u64) -> bool {
    CRITICAL_XIDS.contains(&code)
}

/// A short name of an XID, for evidence ("" when unknown).
pub fn xid_name(code: u64) -> &'static str {
    match code {
        13 => "graphics engine exception",
        31 => "GPU memory page fault",
        43 => "GPU stopped processing",
        45 => "preemptive cleanup",
        48 => "double-bit ECC error",
        61 => "internal micro-controller breakpoint",
        62 => "internal micro-controller halt",
        63 => "ECC page retirement or row remapping event",
        64 => "ECC page retirement or row remapping failure",
        68 => "video processor exception",
        74 => "NVLink error",
        79 => "fallen off the bus",
        92 => "high single-bit ECC error rate",
        94 => "contained ECC error",
        95 => "uncontained ECC error",
        119 | 120 => "GSP error",
        140 => "unrecovered ECC error",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_xids_are_critical_and_the_application_ones_are_not() {
        for c in [48, 63, 64, 74, 79, 92, 94, 95] {
            assert!(xid_is_critical(c), "{c}");
            assert!(!xid_name(c).is_empty(), "{c}");
        }
        for c in [13, 31, 43, 45, 0, 9999] {
            assert!(!xid_is_critical(c), "{c}");
        }
        assert_eq!(xid_name(79), "fallen off the bus");
        assert_eq!(xid_name(9999), "");
    }

    #[test]
    fn pcie_downgrade_is_either_generation_or_width() {
        let l = |gen, width| PcieLink { gen, width, max_gen: 4, max_width: 16 };
        assert!(!l(4, 16).downgraded());
        assert!(l(3, 16).downgraded());
        assert!(l(4, 8).downgraded());
        assert!(!PcieLink { gen: 1, width: 1, max_gen: 0, max_width: 0 }.downgraded(), "unknown maximum");
    }
}
