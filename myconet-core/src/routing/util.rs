//! Small deterministic helpers: a seeded splitmix64 generator for jitter and a keyed
//! hasher for the route tables.
//!
//! The hasher is keyed from the caller's seed so that table layout is reproducible in the
//! simulator yet not predictable by a peer. Prefixes are blake3 outputs of keys the peer
//! must own and sign for, so flooding one bucket would need both the secret hash key and
//! a key grind; the per-neighbour route limit bounds the damage either way.

use std::hash::{BuildHasher, Hasher};

/// splitmix64's output function: a cheap bijective mixer with full avalanche.
pub(crate) fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A splitmix64 generator: deterministic, seedable, good enough for timer jitter and the
/// simulator's choices (never for keys).
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    /// A generator whose whole output is determined by `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[0, n)` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
        }
    }
}

/// Builds [`KeyedHasher`]s sharing one secret key.
#[derive(Debug, Clone, Copy)]
pub struct KeyedState(u64);

impl KeyedState {
    /// A hasher family keyed by `key`.
    pub fn new(key: u64) -> Self {
        KeyedState(mix64(key ^ 0x6d79_636f_6e65_7421))
    }
}

impl BuildHasher for KeyedState {
    type Hasher = KeyedHasher;
    fn build_hasher(&self) -> KeyedHasher {
        KeyedHasher(self.0)
    }
}

/// A keyed multiply-xorshift hasher, much cheaper than SipHash for the u64 keys that
/// dominate routing (and it matters in unoptimised test builds).
#[derive(Debug, Clone)]
pub struct KeyedHasher(u64);

impl Hasher for KeyedHasher {
    fn finish(&self) -> u64 {
        mix64(self.0)
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.write_u64(u64::from(i));
    }
    fn write_u16(&mut self, i: u16) {
        self.write_u64(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = mix64(self.0 ^ i).wrapping_add(0x9e37_79b9_7f4a_7c15);
    }
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
}
