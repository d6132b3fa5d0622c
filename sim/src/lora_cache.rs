//! Where loaded LoRA adapters live, as vLLM 0.32's worker keeps them
//! (`LRUCacheWorkerLoRAManager` over `LRUCacheLoRAModelManager`), and what moving them costs.
//! Pure: no clock; each operation returns the simulated seconds it takes and the engine adds
//! them to its clock.
//!
//! ```text
//!   disk --load: fixed + bytes / disk bw--> CPU cache --copy: bytes / PCIe bw--> GPU slots
//!                                           (LRU, --max-cpu-loras)               (LRU, --max-loras)
//! ```
//!
//! * [`LoraCache::load`] is the engine's `add_lora` (`POST /v1/load_lora_adapter`): the
//!   adapter is read from disk (again, with `load_inplace`), enters the CPU cache (evicting
//!   the least recently used one when full) and is activated into a GPU slot.
//! * [`LoraCache::apply`] is the model runner's `_apply_adapters` before every step: for each
//!   distinct adapter of the batch, in batch order, one not in the CPU cache is loaded from
//!   disk (evicting the LRU one), one not in a GPU slot is copied in (evicting the LRU slot);
//!   either way it becomes the most recently used.
//! * Leaving the CPU cache also frees the adapter's GPU slot (vLLM's `deactivate_fn`).
//! * Unloading an adapter by name does not touch this cache: vLLM 0.32's
//!   `unload_lora_adapter` only forgets the name; the entry ages out by LRU.

use std::collections::HashMap;

use crate::latency::Profile;

/// What one operation did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Moves {
    /// Adapters read from disk.
    pub disk_loads: u32,
    /// Adapters copied into a GPU slot.
    pub gpu_copies: u32,
    /// Simulated seconds those took.
    pub seconds: f64,
}

/// The CPU cache and GPU slots of one engine.
#[derive(Debug)]
pub struct LoraCache {
    profile: &'static Profile,
    max_cpu: usize,
    max_gpu: usize,
    /// Adapter ids in the CPU cache, least recently used first.
    cpu: Vec<u32>,
    /// Adapter ids in GPU slots, least recently used first.
    gpu: Vec<u32>,
    /// Rank of every adapter id seen, to price reloads after eviction.
    ranks: HashMap<u32, u32>,
}

/// Moves `id` to the most recently used end; false when absent.
fn touch(lru: &mut [u32], id: u32) -> bool {
    match lru.iter().position(|x| *x == id) {
        Some(p) => {
            lru[p..].rotate_left(1);
            true
        }
        None => false,
    }
}

impl LoraCache {
    /// An empty cache of `max_cpu` adapters over `max_gpu` slots, priced by `profile`.
    pub fn new(profile: &'static Profile, max_cpu: u32, max_gpu: u32) -> Self {
        let (max_cpu, max_gpu) = (max_cpu.max(1) as usize, max_gpu.max(1) as usize);
        LoraCache {
            profile,
            max_cpu,
            max_gpu,
            cpu: Vec::with_capacity(max_cpu + 1),
            gpu: Vec::with_capacity(max_gpu + 1),
            ranks: HashMap::new(),
        }
    }

    /// Records the rank of an adapter a request uses (its id may have left the cache).
    pub fn note(&mut self, id: u32, rank: u32) {
        if self.ranks.get(&id) != Some(&rank) {
            self.ranks.insert(id, rank);
        }
    }

    /// Adapter ids in the CPU cache, least recently used first.
    pub fn cpu(&self) -> &[u32] {
        &self.cpu
    }

    /// Adapter ids in GPU slots, least recently used first.
    pub fn gpu(&self) -> &[u32] {
        &self.gpu
    }

    /// `add_lora`: loads `id` of `rank` from disk (always for a new id or with `inplace`),
    /// caches it and activates it into a GPU slot.
    pub fn load(&mut self, id: u32, rank: u32, inplace: bool) -> Moves {
        self.note(id, rank);
        let mut m = Moves::default();
        if inplace {
            self.remove(id);
        }
        self.ensure(id, &mut m);
        m
    }

    /// `_apply_adapters` for a step whose batch uses `batch` (distinct ids, in batch order).
    pub fn apply(&mut self, batch: &[u32]) -> Moves {
        let mut m = Moves::default();
        for id in batch {
            self.ensure(*id, &mut m);
        }
        m
    }

    /// Drops `id` from the CPU cache and its GPU slot.
    pub fn remove(&mut self, id: u32) {
        self.cpu.retain(|x| *x != id);
        self.gpu.retain(|x| *x != id);
    }

    fn ensure(&mut self, id: u32, m: &mut Moves) {
        let rank = self.ranks.get(&id).copied().unwrap_or(0);
        if !touch(&mut self.cpu, id) {
            if self.cpu.len() >= self.max_cpu {
                let old = self.cpu.remove(0);
                self.gpu.retain(|x| *x != old);
            }
            self.cpu.push(id);
            m.disk_loads += 1;
            m.seconds += self.profile.lora_load_s(rank);
        }
        if !touch(&mut self.gpu, id) {
            if self.gpu.len() >= self.max_gpu {
                self.gpu.remove(0);
            }
            self.gpu.push(id);
            m.gpu_copies += 1;
            m.seconds += self.profile.lora_copy_s(rank);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::latency::PROFILES;

    fn cache(cpu: u32, gpu: u32) -> LoraCache {
        LoraCache::new(&PROFILES[0], cpu, gpu)
    }

    #[test]
    fn load_pays_disk_and_copy_and_evicts_the_least_recently_used() {
        let p = &PROFILES[0];
        let mut c = cache(2, 1);
        let m = c.load(1, 16, false);
        assert_eq!((m.disk_loads, m.gpu_copies), (1, 1));
        assert!((m.seconds - (p.lora_load_s(16) + p.lora_copy_s(16))).abs() < 1e-12);
        c.load(2, 8, false);
        assert_eq!((c.cpu(), c.gpu()), (&[1, 2][..], &[2][..]));
        // using 1 makes 2 the least recently used: loading 3 evicts 2, not 1
        let m = c.apply(&[1]);
        assert_eq!((m.disk_loads, m.gpu_copies), (0, 1), "in CPU, not in the GPU slot");
        assert!((m.seconds - p.lora_copy_s(16)).abs() < 1e-12);
        c.load(3, 16, false);
        assert_eq!((c.cpu(), c.gpu()), (&[1, 3][..], &[3][..]));
        // 2 was evicted: a step using it reloads it from disk, evicting 1
        let m = c.apply(&[2]);
        assert_eq!((m.disk_loads, m.gpu_copies), (1, 1));
        assert!((m.seconds - (p.lora_load_s(8) + p.lora_copy_s(8))).abs() < 1e-12);
        assert_eq!(c.cpu(), &[3, 2]);
        // resident and active: free
        assert_eq!(c.apply(&[2]), Moves::default());
    }

    #[test]
    fn cpu_eviction_frees_the_gpu_slot_and_inplace_reloads() {
        let mut c = cache(2, 2);
        c.load(1, 16, false);
        c.load(2, 16, false);
        assert_eq!(c.apply(&[1, 2]), Moves::default());
        c.load(3, 16, false); // evicts 1 from the CPU cache, and so from its GPU slot
        assert_eq!((c.cpu(), c.gpu()), (&[2, 3][..], &[2, 3][..]));
        let again = c.load(3, 16, true);
        assert_eq!((again.disk_loads, again.gpu_copies), (1, 1), "load_inplace reads the disk again");
        assert_eq!(c.cpu(), &[2, 3]);
    }

    #[test]
    fn loading_one_adapter_of_a_batch_can_evict_the_next_as_in_vllm() {
        let mut c = cache(3, 2);
        for id in 1..=3 {
            c.load(id, 4, false);
        }
        c.note(9, 4);
        // 9 is loaded first and evicts 1 (the LRU), which the same step then reloads
        let m = c.apply(&[9, 1]);
        assert_eq!((m.disk_loads, m.gpu_copies), (2, 2));
        assert_eq!(c.cpu(), &[3, 9, 1]);
        assert_eq!(c.gpu(), &[9, 1]);
    }
}
