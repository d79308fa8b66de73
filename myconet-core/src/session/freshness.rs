//! Freshness of HandshakeInits: the timestamp this node puts in its own, the newest one
//! it has accepted from each initiator, and the inits it has already found forged.
//!
//! The idea is WireGuard's TAI64N timestamp. Every init carries the initiator's clock
//! (nanoseconds since the Unix epoch) under its signature, strictly increasing per
//! initiator. A responder keeps the newest it has accepted from each initiator and
//! refuses anything not newer, before any signature work. So a recorded init can be
//! replayed only to a responder that has never accepted a newer one from that
//! initiator. No clock synchronisation is needed: only the initiator's own clock must
//! not run backwards across its restarts (as in WireGuard; a clock stepped back makes
//! a responder that remembers a later timestamp refuse that initiator's inits until
//! its clock passes it or the responder forgets).
//!
//! Memory is bounded. The newest timestamps are kept for at most `capacity`
//! initiators, oldest-recorded forgotten first. Forgetting an initiator lets one old
//! init of it through once more (as "new"). The session table makes sure such an init
//! cannot take a working session away or hold back this node's own handshakes for more
//! than a retransmission timeout.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    time::{Duration, Instant},
};

use super::{PUBLIC_KEY_LEN, msg::WireEndpoint};

/// The timestamps of this node's own inits: a wall-clock reading taken once, advanced by
/// the monotonic clock the table is driven with, and forced strictly increasing.
#[derive(Debug, Clone)]
pub(crate) struct InitClock {
    anchor: Instant,
    anchor_unix: Duration,
    last: u64,
}

impl InitClock {
    /// A clock reading `unix` (time since the Unix epoch) at `now`.
    pub(crate) fn new(now: Instant, unix: Duration) -> Self {
        Self {
            anchor: now,
            anchor_unix: unix,
            last: 0,
        }
    }

    /// Re-anchors the wall clock (the I/O shell, or a test simulating one); never makes
    /// later timestamps smaller than ones already issued.
    pub(crate) fn set(&mut self, now: Instant, unix: Duration) {
        self.anchor = now;
        self.anchor_unix = unix;
    }

    /// The timestamp for an init made at `now`.
    pub(crate) fn next(&mut self, now: Instant) -> u64 {
        let unix = self
            .anchor_unix
            .saturating_add(now.saturating_duration_since(self.anchor));
        let ns = u64::try_from(unix.as_nanos()).unwrap_or(u64::MAX);
        self.last = ns.max(self.last.saturating_add(1));
        self.last
    }
}

/// Whose timestamps form one increasing sequence: an initiator key, and for link
/// handshakes the endpoint it dialled. An initiator runs one handshake at a time per
/// peer, so each of these sequences is sent in order, while its link and end-to-end
/// handshakes with this node (or link handshakes on two links) may overlap.
pub(crate) type ClockKey = ([u8; PUBLIC_KEY_LEN], Option<WireEndpoint>);

/// The newest init timestamp accepted per initiator, for at most `capacity` of them.
#[derive(Debug)]
pub(crate) struct InitiatorClocks {
    newest: HashMap<ClockKey, u64>,
    order: VecDeque<ClockKey>,
    capacity: usize,
}

impl InitiatorClocks {
    /// Remembers at most `capacity` initiators (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            newest: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Whether `timestamp` is newer than anything accepted from `key` (true for an
    /// initiator not remembered).
    pub(crate) fn is_fresh(&self, key: &ClockKey, timestamp: u64) -> bool {
        self.newest.get(key).is_none_or(|t| timestamp > *t)
    }

    /// Records an accepted init's timestamp.
    pub(crate) fn record(&mut self, key: ClockKey, timestamp: u64) {
        if let Some(t) = self.newest.get_mut(&key) {
            *t = (*t).max(timestamp);
            return;
        }
        while self.newest.len() >= self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.newest.remove(&old);
                }
                None => break,
            }
        }
        self.newest.insert(key, timestamp);
        self.order.push_back(key);
    }

    /// Initiators remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.newest.len()
    }
}

/// Digests of inits whose signature (or identity) check failed, so that byte-identical
/// copies are refused without checking again; at most `capacity`, oldest forgotten.
#[derive(Debug)]
pub(crate) struct RejectedInits {
    digests: HashSet<[u8; 32]>,
    order: VecDeque<[u8; 32]>,
    capacity: usize,
}

impl RejectedInits {
    /// Remembers at most `capacity` digests (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            digests: HashSet::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Whether no failed init is remembered (then nobody need hash an init to ask).
    pub(crate) fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether this exact init failed before.
    pub(crate) fn contains(&self, digest: &[u8; 32]) -> bool {
        self.digests.contains(digest)
    }

    /// Remembers a failed init.
    pub(crate) fn insert(&mut self, digest: [u8; 32]) {
        if !self.digests.insert(digest) {
            return;
        }
        self.order.push_back(digest);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.digests.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_timestamps_follow_the_wall_clock_and_never_repeat() {
        let t0 = Instant::now();
        let mut clock = InitClock::new(t0, Duration::from_secs(1_000));
        let a = clock.next(t0);
        let b = clock.next(t0);
        assert_eq!(a, 1_000_000_000_000);
        assert_eq!(b, a + 1, "two inits at one instant still increase");
        let c = clock.next(t0 + Duration::from_secs(5));
        assert_eq!(c, 1_005_000_000_000);
        // A wall clock set back does not make timestamps go back.
        clock.set(t0 + Duration::from_secs(5), Duration::from_secs(10));
        assert_eq!(clock.next(t0 + Duration::from_secs(5)), c + 1);
    }

    #[test]
    fn initiator_clocks_accept_only_newer_and_stay_bounded() {
        let mut clocks = InitiatorClocks::new(2);
        let k = |b: u8| ([b; PUBLIC_KEY_LEN], None);
        assert!(clocks.is_fresh(&k(1), 5));
        clocks.record(k(1), 5);
        assert!(!clocks.is_fresh(&k(1), 5));
        assert!(!clocks.is_fresh(&k(1), 4));
        assert!(clocks.is_fresh(&k(1), 6));
        // Each link endpoint an initiator dials is its own sequence.
        let link = (
            [1; PUBLIC_KEY_LEN],
            Some(WireEndpoint {
                addr: "fe80::1".parse().unwrap(),
                port: 9651,
            }),
        );
        assert!(clocks.is_fresh(&link, 1));
        clocks.record(link, 1);
        clocks.record(k(2), 9);
        assert_eq!(clocks.len(), 2);
        assert!(clocks.is_fresh(&k(1), 1), "the oldest was forgotten");
    }

    #[test]
    fn rejected_inits_are_bounded() {
        let mut r = RejectedInits::new(3);
        for i in 0..10u8 {
            r.insert([i; 32]);
        }
        assert!(r.contains(&[9; 32]) && r.contains(&[7; 32]));
        assert!(!r.contains(&[6; 32]));
        assert_eq!(r.order.len(), 3);
    }
}
