//! The `--gpu-faults FILE` format (pure): faults for simulated GPUs, written by a test as an
//! operator's admin call would, and how they turn into probe [`GpuSignals`].
//!
//! ```yaml
//! - {gpu: 1, fault: xid, code: 79}              # an XID event (critical or not)
//! - {gpu: 0, fault: throttle, reason: thermal}  # thermal | power
//! - {gpu: 2, fault: ecc, uncorrected: 5}        # and/or corrected: N (added every probe)
//! - {gpu: 3, fault: missing}                    # not visible (fewer GPUs than registered)
//! - {gpu: 3, fault: unreachable}                # fallen off the bus
//! - {gpu: 0, fault: pcie, gen: 3, width: 8}     # the link runs below gen 4 x16
//! - {gpu: 0, fault: retired_pages, count: 70, pending: true}
//! - {gpu: 0, fault: remap, failed: true}        # and/or pending: true
//! ```
//!
//! An empty file (or `[]`) means no faults. Unknown fields and bad values are errors naming
//! the entry and the field.
use serde::Deserialize;

use super::signals::{GpuSignals, PcieLink, Throttle, XidEvent};

/// Simulated links run at gen 4 x16 at most.
pub const SIM_PCIE: PcieLink = PcieLink { gen: 4, width: 16, max_gen: 4, max_width: 16 };

/// A throttle reason as written in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThrottleReason {
    Thermal,
    Power,
}

/// One fault of one GPU.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "fault", rename_all = "snake_case", deny_unknown_fields)]
pub enum Fault {
    Xid {
        gpu: u32,
        code: u64,
    },
    Throttle {
        gpu: u32,
        reason: ThrottleReason,
    },
    Ecc {
        gpu: u32,
        #[serde(default)]
        uncorrected: u64,
        #[serde(default)]
        corrected: u64,
    },
    Missing {
        gpu: u32,
    },
    Unreachable {
        gpu: u32,
    },
    Pcie {
        gpu: u32,
        gen: u32,
        width: u32,
    },
    RetiredPages {
        gpu: u32,
        #[serde(default)]
        count: u64,
        #[serde(default)]
        pending: bool,
    },
    Remap {
        gpu: u32,
        #[serde(default)]
        failed: bool,
        #[serde(default)]
        pending: bool,
    },
}

impl Fault {
    /// The GPU it applies to.
    pub fn gpu(&self) -> u32 {
        match self {
            Fault::Xid { gpu, .. }
            | Fault::Throttle { gpu, .. }
            | Fault::Ecc { gpu, .. }
            | Fault::Missing { gpu }
            | Fault::Unreachable { gpu }
            | Fault::Pcie { gpu, .. }
            | Fault::RetiredPages { gpu, .. }
            | Fault::Remap { gpu, .. } => *gpu,
        }
    }
}

/// Parses a fault file for a node with `gpus` GPUs; the error names the entry and field.
pub fn parse(text: &str, gpus: u32) -> Result<Vec<Fault>, String> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let faults: Option<Vec<Fault>> = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let faults = faults.unwrap_or_default();
    for (i, f) in faults.iter().enumerate() {
        if f.gpu() >= gpus {
            return Err(format!(
                "[{i}].gpu: {} is not a GPU of this node (it has {gpus}: 0-{})",
                f.gpu(),
                gpus.max(1) - 1
            ));
        }
        match f {
            Fault::Pcie { gen, width, .. } if *gen == 0 || *gen > SIM_PCIE.max_gen => {
                return Err(format!("[{i}].gen: must be 1-{}, got {gen}; width {width}", SIM_PCIE.max_gen))
            }
            Fault::Pcie { width, .. } if ![1, 2, 4, 8, 16].contains(width) => {
                return Err(format!("[{i}].width: must be 1, 2, 4, 8 or 16, got {width}"))
            }
            Fault::Ecc { uncorrected: 0, corrected: 0, .. } => {
                return Err(format!("[{i}]: an ecc fault needs uncorrected or corrected above 0"))
            }
            Fault::Remap { failed: false, pending: false, .. } => {
                return Err(format!("[{i}]: a remap fault needs failed or pending"))
            }
            _ => {}
        }
    }
    Ok(faults)
}

/// The signals of `count` simulated GPUs under `faults`. `first_seen_ms(i)` is when entry
/// `i` appeared (it stamps XID events); `probes` counts this GPU set's probes (correctable
/// ECC errors grow by `corrected` each probe).
pub fn signals(count: u32, faults: &[Fault], first_seen_ms: impl Fn(usize) -> u64, probes: u64) -> Vec<GpuSignals> {
    let mut out: Vec<GpuSignals> = (0..count).map(GpuSignals::clean).collect();
    let missing = faults.iter().filter(|f| matches!(f, Fault::Missing { .. })).map(Fault::gpu);
    let visible = count - missing.collect::<std::collections::BTreeSet<u32>>().len() as u32;
    for s in &mut out {
        s.pcie = Some(SIM_PCIE);
    }
    for (i, f) in faults.iter().enumerate() {
        let Some(s) = out.get_mut(f.gpu() as usize) else { continue };
        match *f {
            Fault::Xid { code, .. } => s.xids.push(XidEvent { code, at_ms: first_seen_ms(i) }),
            Fault::Throttle { reason, .. } => {
                let t = match reason {
                    ThrottleReason::Thermal => Throttle::Thermal,
                    ThrottleReason::Power => Throttle::Power,
                };
                if !s.throttle.contains(&t) {
                    s.throttle.push(t);
                }
            }
            Fault::Ecc { uncorrected, corrected, .. } => {
                s.ecc_volatile_uncorrected += uncorrected;
                s.ecc_aggregate_uncorrected += uncorrected;
                s.ecc_volatile_corrected += corrected.saturating_mul(probes);
            }
            Fault::Missing { .. } => {
                s.missing = true;
                s.visible = Some((visible, count));
            }
            Fault::Unreachable { .. } => s.unreachable = Some("fallen off the bus (simulated)".into()),
            Fault::Pcie { gen, width, .. } => s.pcie = Some(PcieLink { gen, width, ..SIM_PCIE }),
            Fault::RetiredPages { count, pending, .. } => {
                s.retired_pages += count;
                s.retirement_pending |= pending;
            }
            Fault::Remap { failed, pending, .. } => {
                s.remap_failed |= failed;
                s.remap_pending |= pending;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_examples_parse() {
        let text = "
- {gpu: 1, fault: xid, code: 79}
- {gpu: 0, fault: throttle, reason: thermal}
- {gpu: 2, fault: ecc, uncorrected: 5}
- {fault: missing, gpu: 3}
- {gpu: 3, fault: unreachable}
- {gpu: 0, fault: pcie, gen: 3, width: 8}
- {gpu: 0, fault: retired_pages, count: 70, pending: true}
- {gpu: 0, fault: remap, failed: true}
";
        let f = parse(text, 4).unwrap();
        assert_eq!(f.len(), 8);
        assert_eq!(f[0], Fault::Xid { gpu: 1, code: 79 });
        assert_eq!(f[1], Fault::Throttle { gpu: 0, reason: ThrottleReason::Thermal });
        assert_eq!(f[2], Fault::Ecc { gpu: 2, uncorrected: 5, corrected: 0 });
        assert_eq!(f[3], Fault::Missing { gpu: 3 });
        assert_eq!(parse("", 4).unwrap(), vec![]);
        assert_eq!(parse("[]", 4).unwrap(), vec![]);
        assert_eq!(parse("# nothing\n", 4).unwrap(), vec![]);
    }

    #[test]
    fn bad_files_name_the_field() {
        let cases = [
            ("- {gpu: 1, fault: xid, cod: 79}", "unknown field `cod`"),
            ("- {gpu: 1, fault: xid}", "missing field `code`"),
            ("- {gpu: 1, fault: fire}", "unknown variant `fire`"),
            ("- {gpu: 1}", "missing field `fault`"),
            ("- {gpu: 0, fault: throttle, reason: hot}", "unknown variant `hot`, expected `thermal` or `power`"),
            ("- {gpu: -1, fault: missing}", "invalid value"),
            ("- {gpu: 9, fault: missing}", "[0].gpu: 9 is not a GPU of this node (it has 4: 0-3)"),
            ("- {gpu: 0, fault: pcie, gen: 5, width: 16}", "[0].gen: must be 1-4"),
            ("- {gpu: 0, fault: pcie, gen: 3, width: 3}", "[0].width"),
            ("- {gpu: 0, fault: ecc}", "[0]: an ecc fault needs"),
            ("- {gpu: 0, fault: remap}", "[0]: a remap fault needs"),
            ("gpu: 0", "invalid type"),
        ];
        for (text, want) in cases {
            let e = parse(text, 4).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn faults_become_signals() {
        let f = parse(
            "[{gpu: 1, fault: xid, code: 79}, {gpu: 3, fault: missing}, {gpu: 2, fault: ecc, corrected: 7},
              {gpu: 0, fault: throttle, reason: power}, {gpu: 0, fault: pcie, gen: 2, width: 16}]",
            4,
        )
        .unwrap();
        let s = signals(4, &f, |i| 1000 + i as u64, 3);
        assert_eq!(s[1].xids, vec![XidEvent { code: 79, at_ms: 1000 }]);
        assert!(s[3].missing);
        assert_eq!(s[3].visible, Some((3, 4)));
        assert_eq!(s[2].ecc_volatile_corrected, 21);
        assert_eq!(s[0].throttle, vec![Throttle::Power]);
        assert_eq!(s[0].pcie, Some(PcieLink { gen: 2, width: 16, max_gen: 4, max_width: 16 }));
        assert_eq!(s[2].pcie, Some(SIM_PCIE));
        assert!(!s[2].missing && s[2].xids.is_empty());
    }
}
