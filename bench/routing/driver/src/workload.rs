//! The request sequence: many tenants sharing long system prompts. `prefixes` prefixes of
//! `prefix_tokens` words each, chosen per request with Zipf popularity (exponent `zipf`),
//! then a newline and a unique suffix of `suffix_tokens` words; arrival gaps are
//! exponential (Poisson at `rate`). Everything comes from one seeded generator, so every
//! target gets the same prompts in the same order at the same offsets.
//!
//! Every word is 3-6 lowercase letters, which the sim's tokenizer (sim/src/tokenizer.rs)
//! makes exactly one token (a letter run with its leading space, ceil(len / 6) tokens), so
//! a prompt is `1 (begin-of-text) + prefix_tokens + 1 (newline) + suffix_tokens` tokens and
//! its token sequence is known here without the tokenizer: the driver checks the count
//! against the engine's `/tokenize` before it starts.
//!
//! The oracle hit rate replays the sequence through one cache of unbounded size shared by
//! all engines: the tokens each request could reuse (vLLM's rule: whole blocks of the
//! longest cached prefix, at most `len - 1` tokens) over all prompt tokens. It ignores
//! capacity and load, so it is an upper bound for any router, computed, not measured.

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};

/// splitmix64: small, seedable and stable across crate versions.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5851_F42D_4C95_7F2D)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

pub struct Spec {
    pub seed: u64,
    pub requests: usize,
    pub rate: f64,
    pub prefixes: usize,
    pub prefix_tokens: usize,
    pub suffix_tokens: usize,
    pub zipf: f64,
    pub block_size: usize,
}

pub struct Request {
    /// Seconds after the start at which it is sent.
    pub at: f64,
    pub prefix: usize,
    pub prompt: String,
    /// Token keys (one per token; equal keys = equal token ids in the sim).
    pub tokens: Vec<u64>,
}

const BOS: u64 = u64::MAX - 1;
const NEWLINE: u64 = u64::MAX - 2;
const VOCAB: usize = 4096;

fn vocabulary() -> Vec<String> {
    let mut rng = Rng::new(0xF107_111A);
    let mut seen = HashSet::new();
    let mut words = Vec::with_capacity(VOCAB);
    while words.len() < VOCAB {
        let len = 3 + rng.below(4);
        let w: String = (0..len).map(|_| (b'a' + rng.below(26) as u8) as char).collect();
        if seen.insert(w.clone()) {
            words.push(w);
        }
    }
    words
}

/// Words `n` words long; a word's key is its index times two, plus one when it follows a
/// space (" word" and "word" are different tokens).
fn words(rng: &mut Rng, vocab: &[String], n: usize, text: &mut String, keys: &mut Vec<u64>) {
    for i in 0..n {
        let w = rng.below(vocab.len());
        if i > 0 {
            text.push(' ');
        }
        text.push_str(&vocab[w]);
        keys.push(w as u64 * 2 + u64::from(i > 0));
    }
}

pub fn generate(spec: &Spec) -> Vec<Request> {
    let vocab = vocabulary();
    let mut rng = Rng::new(spec.seed);
    let prefixes: Vec<(String, Vec<u64>)> = (0..spec.prefixes)
        .map(|_| {
            let (mut t, mut k) = (String::new(), vec![BOS]);
            words(&mut rng, &vocab, spec.prefix_tokens, &mut t, &mut k);
            (t, k)
        })
        .collect();
    // Zipf: P(rank k) proportional to 1 / (k + 1)^s.
    let mut cdf: Vec<f64> = (0..spec.prefixes).map(|k| 1.0 / ((k + 1) as f64).powf(spec.zipf)).collect();
    let total: f64 = cdf.iter().sum();
    let mut acc = 0.0;
    for c in cdf.iter_mut() {
        acc += *c / total;
        *c = acc;
    }
    let mut at = 0.0;
    (0..spec.requests)
        .map(|_| {
            at += -(1.0 - rng.unit()).ln() / spec.rate;
            let u = rng.unit();
            let prefix = cdf.partition_point(|c| *c < u).min(spec.prefixes - 1);
            let (pt, pk) = &prefixes[prefix];
            let mut prompt = String::with_capacity(pt.len() + 8 * spec.suffix_tokens);
            prompt.push_str(pt);
            prompt.push('\n');
            let mut tokens = pk.clone();
            tokens.push(NEWLINE);
            words(&mut rng, &vocab, spec.suffix_tokens, &mut prompt, &mut tokens);
            Request { at, prefix, prompt, tokens }
        })
        .collect()
}

/// (hit tokens, prompt tokens) of an unbounded cache shared by every engine.
pub fn oracle(reqs: &[Request], block_size: usize) -> (u64, u64) {
    let mut cached: HashSet<u64> = HashSet::new();
    let (mut hits, mut queries) = (0u64, 0u64);
    for r in reqs {
        let n = r.tokens.len();
        queries += n as u64;
        let max_hit_blocks = (n - 1) / block_size;
        let mut parent = 0u64;
        let mut matching = true;
        for (b, block) in r.tokens.chunks_exact(block_size).enumerate() {
            let mut h = DefaultHasher::new();
            (parent, block).hash(&mut h);
            parent = h.finish();
            if matching && b < max_hit_blocks && cached.contains(&parent) {
                hits += block_size as u64;
            } else {
                matching = false;
            }
            cached.insert(parent);
        }
    }
    (hits, queries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        Spec { seed: 7, requests: 200, rate: 10.0, prefixes: 5, prefix_tokens: 64, suffix_tokens: 8, zipf: 1.0, block_size: 16 }
    }

    #[test]
    fn same_seed_same_sequence() {
        let (a, b) = (generate(&spec()), generate(&spec()));
        assert!(a.iter().zip(&b).all(|(x, y)| x.prompt == y.prompt && x.at == y.at));
        assert_eq!(a[0].tokens.len(), 1 + 64 + 1 + 8);
    }

    #[test]
    fn oracle_hits_the_prefix_blocks_of_every_repeat() {
        let reqs = generate(&spec());
        let distinct: HashSet<usize> = reqs.iter().map(|r| r.prefix).collect();
        let (hits, queries) = oracle(&reqs, 16);
        // 66 shared tokens = 4 whole blocks for every request but the first of each prefix.
        assert_eq!(hits, 64 * (reqs.len() - distinct.len()) as u64);
        assert_eq!(queries, 74 * reqs.len() as u64);
    }
}
