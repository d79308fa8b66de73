//! Token buckets for handshake processing, sans-IO and bounded in memory.
//!
//! Every HandshakeInit that reaches signature verification costs the responder an
//! Ed25519 verify and an X25519 agreement, so each source gets `burst` of them at once
//! and `per_second` after that. What a "source" is depends on the caller: the session
//! table keys one limiter by the underlay sender (the last hop) and one by (last hop,
//! claimed overlay /64), so initiators behind one relay do not share a bucket; the
//! userspace relay keys one by the neighbour that hands it handshakes. IPv6 addresses
//! are masked with [`source_prefix`] (default /64, because one host usually controls a
//! whole /64; IPv4 sources are kept whole).
//!
//! At most `max_sources` buckets exist. When the table is full, buckets that have
//! refilled completely are dropped (a full bucket says nothing a missing one does not);
//! if none has, the new source is refused (fail closed). Evicting a bucket that still
//! holds a debt would hand its source a fresh burst: with enough addresses an attacker
//! could then cycle through its sources and never be slowed at all. Refusing instead
//! means a flood from more sources than the table holds locks out new sources until
//! buckets refill, which callers must allow for (the session table answers a refused
//! cookieless init with a cookie, and keeps a global verification budget behind all of
//! it). The sweep is O(sources) and runs at most once per half refill period, so a full
//! table cannot make every new source cost a sweep.

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
    net::IpAddr,
    time::{Duration, Instant},
};

use myconet_common::addr::mask;

use super::ConfigError;

/// Token-bucket parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Handshakes a source may start back to back.
    pub burst: u32,
    /// Sustained handshakes per second per source.
    pub per_second: u32,
    /// Buckets kept at most (memory bound).
    pub max_sources: usize,
    /// IPv6 sources sharing this many leading bits share a bucket.
    pub ipv6_prefix_len: u8,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            burst: 10,
            per_second: 5,
            max_sources: 4096,
            ipv6_prefix_len: 64,
        }
    }
}

impl RateLimitConfig {
    /// Rejects zero rates or capacity and impossible prefix lengths.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.burst == 0 {
            return Err(ConfigError::ZeroCount("rate_limit.burst"));
        }
        if self.per_second == 0 {
            return Err(ConfigError::ZeroCount("rate_limit.per_second"));
        }
        if self.max_sources == 0 {
            return Err(ConfigError::ZeroCount("rate_limit.max_sources"));
        }
        if self.ipv6_prefix_len > 128 {
            return Err(ConfigError::PrefixLen);
        }
        Ok(())
    }
}

/// The bucket key of an underlay address: IPv6 masked to `prefix_len` bits, IPv4 (also
/// when IPv4-mapped) whole.
pub fn source_prefix(source: IpAddr, prefix_len: u8) -> IpAddr {
    match source {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(mask(v6, prefix_len)),
        },
        v4 @ IpAddr::V4(_) => v4,
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Accumulated time credit; one handshake costs `interval`.
    credit: Duration,
    last: Instant,
}

/// Token buckets keyed by `K` (an underlay prefix by default; see the module docs).
#[derive(Debug, Clone)]
pub struct RateLimiter<K = IpAddr> {
    config: RateLimitConfig,
    interval: Duration,
    capacity: Duration,
    buckets: HashMap<K, Bucket>,
    order: VecDeque<K>,
    /// When a full table was last swept for refilled buckets.
    last_sweep: Option<Instant>,
    /// New sources refused because the table was full of sources still in debt.
    refused_full: u64,
}

impl<K: Copy + Eq + Hash> RateLimiter<K> {
    /// A limiter with no buckets yet.
    pub fn new(config: RateLimitConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let interval = Duration::from_secs(1) / config.per_second;
        Ok(Self {
            config,
            interval,
            capacity: interval.saturating_mul(config.burst),
            buckets: HashMap::new(),
            order: VecDeque::new(),
            last_sweep: None,
            refused_full: 0,
        })
    }

    /// New sources refused so far because every bucket was still in use (fail closed).
    pub fn refused_full(&self) -> u64 {
        self.refused_full
    }

    /// Drops the buckets that have refilled completely by `now`, if the last sweep is
    /// at least half a refill period old; true if there is room afterwards.
    fn make_room(&mut self, now: Instant) -> bool {
        let due = self
            .last_sweep
            .is_none_or(|at| now.saturating_duration_since(at) >= self.capacity / 2);
        if due {
            self.last_sweep = Some(now);
            let capacity = self.capacity;
            self.buckets.retain(|_, b| {
                b.credit
                    .saturating_add(now.saturating_duration_since(b.last))
                    < capacity
            });
            let buckets = &self.buckets;
            self.order.retain(|k| buckets.contains_key(k));
        }
        self.buckets.len() < self.config.max_sources
    }

    /// The configured prefix length callers mask IPv6 sources to.
    pub fn prefix_len(&self) -> u8 {
        self.config.ipv6_prefix_len
    }

    /// Whether `key` may have one more handshake processed at `now`; takes a token if
    /// so. Times that go backwards refill nothing.
    pub fn allow_key(&mut self, key: K, now: Instant) -> bool {
        if let Some(bucket) = self.buckets.get_mut(&key) {
            let elapsed = now.saturating_duration_since(bucket.last);
            bucket.last = bucket.last.max(now);
            bucket.credit = bucket.credit.saturating_add(elapsed).min(self.capacity);
            return match bucket.credit.checked_sub(self.interval) {
                Some(rest) => {
                    bucket.credit = rest;
                    true
                }
                None => false,
            };
        }
        if self.buckets.len() >= self.config.max_sources && !self.make_room(now) {
            self.refused_full += 1;
            return false;
        }
        self.buckets.insert(
            key,
            Bucket {
                credit: self.capacity.saturating_sub(self.interval),
                last: now,
            },
        );
        self.order.push_back(key);
        true
    }

    /// Buckets currently held (never more than `max_sources`).
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

impl RateLimiter<IpAddr> {
    /// [`RateLimiter::allow_key`] for an underlay address, masked to the configured
    /// prefix.
    pub fn allow(&mut self, source: IpAddr, now: Instant) -> bool {
        let key = source_prefix(source, self.config.ipv6_prefix_len);
        self.allow_key(key, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn limiter(burst: u32, per_second: u32, max_sources: usize) -> RateLimiter {
        RateLimiter::new(RateLimitConfig {
            burst,
            per_second,
            max_sources,
            ipv6_prefix_len: 64,
        })
        .unwrap()
    }

    #[test]
    fn burst_then_refill_at_rate() {
        let mut l = limiter(3, 2, 16);
        let t0 = Instant::now();
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        assert!((0..3).all(|_| l.allow(a, t0)));
        assert!(!l.allow(a, t0));
        // 2/s: one token every 500 ms.
        assert!(!l.allow(a, t0 + Duration::from_millis(499)));
        assert!(l.allow(a, t0 + Duration::from_millis(500)));
        assert!(!l.allow(a, t0 + Duration::from_millis(500)));
        // Over a long idle period the bucket refills to the burst only.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!((0..10).filter(|_| l.allow(a, later)).count(), 3);
        // Same /64 shares the bucket, another /64 does not.
        assert!(!l.allow("2001:db8::ffff".parse().unwrap(), later));
        assert!(l.allow("2001:db8:0:1::1".parse().unwrap(), later));
        // Time going backwards grants nothing.
        assert!(!l.allow(a, t0));
    }

    #[test]
    fn total_over_time_is_bounded() {
        let mut l = limiter(5, 10, 16);
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        // 10 s of attempts every millisecond: at most burst + 10/s * 10 s.
        let allowed = (0..10_000u64)
            .filter(|ms| l.allow(a, t0 + Duration::from_millis(*ms)))
            .count();
        assert!(allowed <= 5 + 100, "{allowed}");
        assert!(allowed >= 100, "{allowed}");
    }

    /// Finding 1 (issue 12): a full table used to evict the oldest bucket, handing any
    /// source a fresh burst once the attacker had cycled through enough others.
    #[test]
    fn a_full_table_fails_closed_and_frees_only_refilled_buckets() {
        let mut l = limiter(2, 1, 100);
        let t0 = Instant::now();
        let src = |i: u32| {
            IpAddr::V6(Ipv6Addr::new(
                0x2001,
                0xdb8,
                (i >> 16) as u16,
                i as u16,
                0,
                0,
                0,
                1,
            ))
        };
        for i in 0..100 {
            assert!(l.allow(src(i), t0));
        }
        // Every bucket is in debt: new sources are refused, the old ones keep theirs.
        for i in 100..10_000 {
            assert!(!l.allow(src(i), t0));
            assert!(l.len() <= 100);
        }
        assert_eq!(l.refused_full(), 9_900);
        assert!(
            l.allow(src(0), t0),
            "source 0 keeps its bucket (one token left)"
        );
        assert!(!l.allow(src(0), t0), "and it is not reset to a fresh burst");
        // Once buckets have refilled they carry no information and make room.
        let later = t0 + Duration::from_secs(5);
        assert!(l.allow(src(20_000), later));
        assert_eq!(l.len(), 1);
        assert_eq!(l.order.len(), 1);
    }

    #[test]
    fn rejects_bad_config() {
        for bad in [
            RateLimitConfig {
                burst: 0,
                ..Default::default()
            },
            RateLimitConfig {
                per_second: 0,
                ..Default::default()
            },
            RateLimitConfig {
                max_sources: 0,
                ..Default::default()
            },
            RateLimitConfig {
                ipv6_prefix_len: 129,
                ..Default::default()
            },
        ] {
            assert!(RateLimiter::<IpAddr>::new(bad).is_err());
        }
    }
}
