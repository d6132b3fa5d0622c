//! The GPUs this agent may use when a scheduler reserved some for it: Nomad's NVIDIA device
//! plugin (and container runtimes) name them in `NVIDIA_VISIBLE_DEVICES` (UUIDs or indices),
//! others in `CUDA_VISIBLE_DEVICES`. Unset or `all`: every GPU NVML sees; `none`, `void` or
//! empty: none. Indices are NVML's (PCI bus order). Pure: the NVML backend asks
//! [`Visible::admits`] for each device.

/// A device named in a visible-devices list.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Selector {
    Index(u32),
    /// A `GPU-…` UUID (or a MIG `MIG-…` one), compared as written.
    Uuid(String),
}

/// The visible set, if one is imposed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Visible {
    /// Which variable it came from (for the log line and errors).
    pub from: &'static str,
    selectors: Vec<Selector>,
}

impl Visible {
    /// From `NVIDIA_VISIBLE_DEVICES`, else `CUDA_VISIBLE_DEVICES` (`env` looks a variable
    /// up); `None` when neither limits the GPUs.
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Option<Visible> {
        for var in ["NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"] {
            let Some(v) = env(var) else { continue };
            let v = v.trim();
            if v == "all" {
                return None;
            }
            let selectors = match v {
                "" | "none" | "void" | "NoDevFiles" => Vec::new(),
                _ => v
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| s.parse().map_or_else(|_| Selector::Uuid(s.to_owned()), Selector::Index))
                    .collect(),
            };
            return Some(Visible { from: var, selectors });
        }
        None
    }

    /// Whether the device with NVML `index` and `uuid` is in the set.
    pub fn admits(&self, index: u32, uuid: &str) -> bool {
        self.selectors.iter().any(|s| match s {
            Selector::Index(i) => *i == index,
            Selector::Uuid(u) => u == uuid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Option<Visible> {
        Visible::from_env(&|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()))
    }

    #[test]
    fn nomad_uuids_indices_all_and_none() {
        assert_eq!(env(&[]), None);
        assert_eq!(env(&[("NVIDIA_VISIBLE_DEVICES", "all")]), None);
        let v = env(&[("NVIDIA_VISIBLE_DEVICES", "GPU-aaa, GPU-bbb"), ("CUDA_VISIBLE_DEVICES", "0")]).unwrap();
        assert_eq!(v.from, "NVIDIA_VISIBLE_DEVICES", "the device plugin's variable first");
        assert!(v.admits(5, "GPU-bbb") && !v.admits(0, "GPU-ccc"));
        let v = env(&[("CUDA_VISIBLE_DEVICES", "2,3")]).unwrap();
        assert!(v.admits(3, "GPU-x") && !v.admits(1, "GPU-x"));
        let none = env(&[("NVIDIA_VISIBLE_DEVICES", "void")]).unwrap();
        assert!(!none.admits(0, "GPU-aaa"));
        assert!(!env(&[("CUDA_VISIBLE_DEVICES", "")]).unwrap().admits(0, ""));
    }
}
