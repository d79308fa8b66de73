//! Token buckets that bound how many discovery beacons reach signature verification.
//!
//! Beacons arrive in the clear from anyone on the link and each costs an Ed25519 verify,
//! so every source (address and interface) gets `burst` beacons at once and `per_second`
//! after that, and all sources together share one global bucket. The per-source table is
//! bounded: a new source evicts the oldest-created bucket, which only resets that source
//! to a full bucket (fail-open per source), while the global bucket is never reset, so
//! however many addresses an attacker spoofs, the verification rate stays bounded.

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
    time::Instant,
};

/// One token in micro-tokens: refills are computed in integer microseconds.
const TOKEN: u64 = 1_000_000;

/// Rate and burst of one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rate {
    /// Tokens added per second.
    pub per_second: u32,
    /// Bucket capacity in tokens.
    pub burst: u32,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    micro_tokens: u64,
    refilled: Instant,
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Self {
        Self {
            micro_tokens: u64::from(rate.burst).saturating_mul(TOKEN),
            refilled: now,
        }
    }

    fn take(&mut self, rate: Rate, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled);
        let elapsed_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let cap = u64::from(rate.burst).saturating_mul(TOKEN);
        let added = elapsed_us.saturating_mul(u64::from(rate.per_second));
        self.micro_tokens = self.micro_tokens.saturating_add(added).min(cap);
        // Only move the refill mark forward: a clock that steps back must not mint tokens.
        if now > self.refilled {
            self.refilled = now;
        }
        if self.micro_tokens >= TOKEN {
            self.micro_tokens -= TOKEN;
            true
        } else {
            false
        }
    }
}

/// Per-source buckets plus a global one, bounded to `max_sources` entries.
#[derive(Debug)]
pub(crate) struct SourceLimiter<K> {
    per_source: Rate,
    max_sources: usize,
    buckets: HashMap<K, Bucket>,
    order: VecDeque<K>,
    global_rate: Rate,
    global: Bucket,
}

impl<K: Hash + Eq + Copy> SourceLimiter<K> {
    pub(crate) fn new(per_source: Rate, global: Rate, max_sources: usize, now: Instant) -> Self {
        Self {
            per_source,
            max_sources: max_sources.max(1),
            buckets: HashMap::new(),
            order: VecDeque::new(),
            global_rate: global,
            global: Bucket::full(global, now),
        }
    }

    /// Whether one more beacon from `source` may be processed now.
    pub(crate) fn allow(&mut self, source: K, now: Instant) -> bool {
        let rate = self.per_source;
        let allowed = match self.buckets.get_mut(&source) {
            Some(bucket) => bucket.take(rate, now),
            None => {
                while self.buckets.len() >= self.max_sources {
                    let Some(oldest) = self.order.pop_front() else {
                        break;
                    };
                    self.buckets.remove(&oldest);
                }
                let mut bucket = Bucket::full(rate, now);
                let ok = bucket.take(rate, now);
                self.buckets.insert(source, bucket);
                self.order.push_back(source);
                ok
            }
        };
        allowed && self.global.take(self.global_rate, now)
    }

    /// Number of tracked sources (for tests of the memory bound).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn peers_limit_burst_then_rate_and_bounded() {
        let t0 = Instant::now();
        let per = Rate {
            per_second: 2,
            burst: 3,
        };
        let global = Rate {
            per_second: 1000,
            burst: 1000,
        };
        let mut l = SourceLimiter::new(per, global, 4, t0);
        assert!((0..3).all(|_| l.allow(1u32, t0)));
        assert!(!l.allow(1, t0));
        // Half a second refills one token at 2/s.
        assert!(l.allow(1, t0 + Duration::from_millis(500)));
        assert!(!l.allow(1, t0 + Duration::from_millis(500)));
        for s in 2..100u32 {
            l.allow(s, t0);
        }
        assert!(l.len() <= 4);
    }

    #[test]
    fn peers_limit_global_bucket_bounds_spoofed_sources() {
        let t0 = Instant::now();
        let per = Rate {
            per_second: 1,
            burst: 1,
        };
        let global = Rate {
            per_second: 1,
            burst: 5,
        };
        let mut l = SourceLimiter::new(per, global, 2, t0);
        let allowed = (0..1000u32).filter(|&s| l.allow(s, t0)).count();
        assert_eq!(allowed, 5);
    }
}
