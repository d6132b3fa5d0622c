//! Maps keyed by a request's [`SeqId`], with a cheap hash. Request ids are the sim's own
//! counter (`AppState::next_id`), never chosen by a client, so they need no DoS-resistant
//! hash; the default SipHash cost ~140 instructions a lookup, and the scheduler and the
//! engine look a request up several times per generated token (a tenth of the sim's own CPU
//! per token at 64 running requests). One splitmix64 round spreads an id instead.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::scheduler::SeqId;
use crate::text::mix;

/// A map keyed by request id.
pub type IdMap<V> = HashMap<SeqId, V, BuildHasherDefault<IdHasher>>;

/// Hashes a [`SeqId`] with one splitmix64 round.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // only u64 keys reach this map; any other input still hashes, byte by byte
        for b in bytes {
            self.0 = mix(self.0 ^ u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = mix(self.0 ^ n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_ids_spread_over_buckets() {
        let mut low = std::collections::HashSet::new();
        for id in 0..1024u64 {
            let mut h = IdHasher::default();
            h.write_u64(id);
            low.insert(h.finish() & 0xff);
        }
        assert!(low.len() > 200, "256 buckets, {} used", low.len());
        let mut m: IdMap<u64> = IdMap::default();
        m.extend((0..100).map(|i| (i, i * 2)));
        assert_eq!(m.get(&42), Some(&84));
    }
}
