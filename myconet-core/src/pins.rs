//! Keys pinned per /64: the first key a node sees owning a prefix is the one it accepts
//! for that prefix from then on (trust on first use), in routing and in end-to-end
//! handshakes, across restarts; an operator can pin a key or forget a pin.
//!
//! Why: routing binds an announcement to its key by the /64 (48 bits of the key's digest
//! plus the identity proof of work), so a second key owning someone's /64 is expensive
//! but not impossible, and without pins routing took whichever key it heard first *each
//! time the prefix was new to it* (after a restart, or after the prefix had been gone
//! for three minutes). A pin makes the first binding stick. What it cannot do is tell
//! which key was first in the world: a collision announced before the real node was
//! ever heard is pinned instead; that is what the operator override is for.
//!
//! This module is the pin set and its text form; the routing core and the session table
//! consult it through a [`SharedPins`], and the agent persists it in the state directory
//! (its `pin_store`: `pins`, written when changed, at most once a minute, and at
//! shutdown).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::Ipv6Addr;
use std::sync::{Arc, Mutex, MutexGuard};

use myconet_common::addr::node_prefix;

use crate::id::NodeKey;

/// Most pins kept by default: the routing table's size plus room for peers talked to
/// directly. Beyond it the least recently confirmed learned pins are dropped first.
pub const DEFAULT_CAPACITY: usize = 262_144;

const HEADER: &str = "# myconet key pins v1: prefix key learned|operator last-confirmed";

/// Where a pin came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinSource {
    /// The first key seen owning the prefix (a verified announcement or handshake).
    Learned,
    /// Set by the operator (configuration or `myconet-ctl pins set`): never replaced or
    /// dropped for room.
    Operator,
}

impl PinSource {
    /// Stable name (the file and the control API use it).
    pub fn name(self) -> &'static str {
        match self {
            PinSource::Learned => "learned",
            PinSource::Operator => "operator",
        }
    }
}

/// One pinned key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin {
    /// The Ed25519 key the prefix is pinned to.
    pub key: [u8; 32],
    /// Where it came from.
    pub source: PinSource,
    /// When it was last confirmed, on the set's own clock (a counter of confirmations):
    /// what decides which learned pins go when the set is full.
    pub confirmed: u64,
}

/// Outcome of [`Pins::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinCheck {
    /// The key is the pinned one (the pin is refreshed).
    Matches,
    /// Nothing was pinned; the key is now.
    Learned,
    /// Another key is pinned for the prefix: refuse.
    Conflict,
}

/// The pin set. See the module documentation.
#[derive(Debug)]
pub struct Pins {
    map: HashMap<u64, Pin>,
    capacity: usize,
    clock: u64,
    dirty: bool,
}

/// The pin set shared by the routing core, the session table, the control API and the
/// task that persists it. Its lock is a leaf: held only for one lookup or update.
pub type SharedPins = Arc<Mutex<Pins>>;

/// Locks a shared pin set (a panic elsewhere does not make the pins unusable).
pub fn lock(pins: &SharedPins) -> MutexGuard<'_, Pins> {
    pins.lock().unwrap_or_else(|e| e.into_inner())
}

/// Upper 64 bits of the /64 a key owns.
pub fn prefix_of(key: &[u8; 32]) -> u64 {
    (u128::from(node_prefix(key)) >> 64) as u64
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .fold(String::with_capacity(2 * b.len()), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

/// Parses a 64-digit hex Ed25519 public key (surrounding white space ignored).
pub fn parse_key(s: &str) -> Option<[u8; 32]> {
    s.trim().parse::<NodeKey>().ok().map(|k| k.0)
}

impl Pins {
    /// An empty set holding at most `capacity` pins.
    pub fn new(capacity: usize) -> Self {
        Pins {
            map: HashMap::new(),
            capacity: capacity.max(1),
            clock: 0,
            dirty: false,
        }
    }

    /// Wrapped for sharing.
    pub fn shared(self) -> SharedPins {
        Arc::new(Mutex::new(self))
    }

    /// Checks `key` against the pin of `prefix` and learns it if there is none. Call it
    /// only with a key that proved it owns the prefix (a verified announcement or
    /// handshake).
    pub fn check(&mut self, prefix: u64, key: &[u8; 32]) -> PinCheck {
        self.clock += 1;
        let clock = self.clock;
        if let Some(p) = self.map.get_mut(&prefix) {
            if p.key != *key {
                return PinCheck::Conflict;
            }
            p.confirmed = clock;
            return PinCheck::Matches;
        }
        self.make_room();
        self.map.insert(
            prefix,
            Pin {
                key: *key,
                source: PinSource::Learned,
                confirmed: clock,
            },
        );
        self.dirty = true;
        PinCheck::Learned
    }

    /// Whether `key` may own `prefix` (no pin, or the pinned one), without learning.
    pub fn allows(&self, prefix: u64, key: &[u8; 32]) -> bool {
        self.map.get(&prefix).is_none_or(|p| p.key == *key)
    }

    /// Pins `key` for its own /64 as the operator's choice, replacing any other pin of
    /// that prefix. Returns the prefix.
    pub fn set_operator(&mut self, key: &[u8; 32]) -> u64 {
        let prefix = prefix_of(key);
        self.clock += 1;
        if !self.map.contains_key(&prefix) {
            self.make_room();
        }
        self.map.insert(
            prefix,
            Pin {
                key: *key,
                source: PinSource::Operator,
                confirmed: self.clock,
            },
        );
        self.dirty = true;
        prefix
    }

    /// Drops the pin of `prefix` (either source): the next key seen owning it is
    /// learned. Returns whether there was one.
    pub fn forget(&mut self, prefix: u64) -> bool {
        let gone = self.map.remove(&prefix).is_some();
        self.dirty |= gone;
        gone
    }

    /// The pin of `prefix`.
    pub fn get(&self, prefix: u64) -> Option<Pin> {
        self.map.get(&prefix).copied()
    }

    /// Every pin, by prefix.
    pub fn list(&self) -> Vec<(u64, Pin)> {
        let mut v: Vec<_> = self.map.iter().map(|(p, pin)| (*p, *pin)).collect();
        v.sort_unstable_by_key(|(p, _)| *p);
        v
    }

    /// Pins held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no pin is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Whether something changed since the last call (what the persisting task asks).
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Marks the set as changed again, after a write of it failed, so the next save
    /// tries again.
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// When full, drops the least recently confirmed eighth of the learned pins (one
    /// sort per eighth of the capacity, not one scan per new pin).
    fn make_room(&mut self) {
        if self.map.len() < self.capacity {
            return;
        }
        let mut learned: Vec<(u64, u64)> = self
            .map
            .iter()
            .filter(|(_, p)| p.source == PinSource::Learned)
            .map(|(k, p)| (p.confirmed, *k))
            .collect();
        let n = (self.capacity / 8).max(1).min(learned.len());
        if n == 0 {
            return;
        }
        learned.select_nth_unstable(n - 1);
        for (_, k) in &learned[..n] {
            self.map.remove(k);
        }
        self.dirty = true;
    }

    /// The text form: a header line, then one pin per line.
    pub fn to_text(&self) -> String {
        let mut s = String::with_capacity(40 + self.map.len() * 120);
        s.push_str(HEADER);
        s.push('\n');
        for (p, pin) in self.list() {
            let _ = writeln!(
                s,
                "{}/64 {} {} {}",
                Ipv6Addr::from(u128::from(p) << 64),
                hex(&pin.key),
                pin.source.name(),
                pin.confirmed
            );
        }
        s
    }

    /// Reads the text form into an empty set of `capacity`. Lines that do not parse, or
    /// whose key does not own their prefix, are skipped and counted (second value).
    pub fn from_text(text: &str, capacity: usize) -> (Self, usize) {
        let mut pins = Pins::new(capacity);
        let mut skipped = 0;
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut f = line.split_whitespace();
            let parsed = (|| {
                let prefix: Ipv6Addr = f.next()?.strip_suffix("/64")?.parse().ok()?;
                let key = parse_key(f.next()?)?;
                let source = match f.next()? {
                    "learned" => PinSource::Learned,
                    "operator" => PinSource::Operator,
                    _ => return None,
                };
                let confirmed: u64 = f.next()?.parse().ok()?;
                let prefix = (u128::from(prefix) >> 64) as u64;
                (prefix_of(&key) == prefix).then_some((prefix, key, source, confirmed))
            })();
            match parsed {
                Some((prefix, key, source, confirmed)) if pins.map.len() < pins.capacity => {
                    pins.clock = pins.clock.max(confirmed);
                    pins.map.insert(
                        prefix,
                        Pin {
                            key,
                            source,
                            confirmed,
                        },
                    );
                }
                _ => skipped += 1,
            }
        }
        (pins, skipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u8) -> [u8; 32] {
        [i; 32]
    }

    #[test]
    fn the_first_key_sticks_until_the_operator_says_otherwise() {
        let mut p = Pins::new(10);
        let (a, b) = (key(1), key(2));
        let prefix = prefix_of(&a);
        assert_eq!(p.check(prefix, &a), PinCheck::Learned);
        assert_eq!(p.check(prefix, &a), PinCheck::Matches);
        // Another key claiming the same /64 (a collision, in real life 2^64 work).
        assert_eq!(p.check(prefix, &b), PinCheck::Conflict);
        assert!(!p.allows(prefix, &b));
        assert!(p.forget(prefix));
        assert_eq!(p.check(prefix, &b), PinCheck::Learned);
        // The operator's pin replaces a learned one.
        p.set_operator(&a);
        assert_eq!(p.get(prefix).map(|x| x.key), Some(a));
        assert_eq!(p.get(prefix).map(|x| x.source), Some(PinSource::Operator));
    }

    #[test]
    fn survives_its_text_form_and_skips_what_does_not_bind() {
        let mut p = Pins::new(10);
        for i in 1..=3 {
            p.check(prefix_of(&key(i)), &key(i));
        }
        p.set_operator(&key(9));
        let text = p.to_text();
        let (q, skipped) = Pins::from_text(&text, 10);
        assert_eq!(skipped, 0);
        assert_eq!(q.list(), p.list());
        // A line whose key does not own its prefix, and garbage, are skipped.
        let bad = format!(
            "{text}{}/64 {} learned 1\nnonsense\n",
            Ipv6Addr::from(u128::from(prefix_of(&key(1))) << 64),
            hex(&key(5))
        );
        let (q, skipped) = Pins::from_text(&bad, 10);
        assert_eq!(skipped, 2);
        assert_eq!(q.len(), 4);
    }

    #[test]
    fn a_full_set_drops_the_least_recently_confirmed_learned_pins() {
        let mut p = Pins::new(8);
        p.set_operator(&key(100));
        for i in 1..=7 {
            p.check(prefix_of(&key(i)), &key(i));
        }
        // Confirm all but key 1.
        for i in 2..=7 {
            p.check(prefix_of(&key(i)), &key(i));
        }
        assert_eq!(p.check(prefix_of(&key(50)), &key(50)), PinCheck::Learned);
        assert_eq!(p.len(), 8);
        assert!(
            p.get(prefix_of(&key(1))).is_none(),
            "the stalest learned pin went"
        );
        assert!(p.get(prefix_of(&key(100))).is_some(), "operator pins stay");
    }
}
