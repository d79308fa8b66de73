//! The sliding anti-replay window of one receive key (RFC 6479 style bitmap).
//!
//! Datagrams may be lost, duplicated and reordered by the underlay and by relays. The
//! window accepts every counter at most once, tolerates reordering up to
//! [`REPLAY_WINDOW`] packets, and refuses anything older. It is split into a read-only
//! [`ReplayWindow::check`] and a mutating [`ReplayWindow::accept`] so the caller can check
//! before decrypting and only record the counter once the AEAD tag verified: a forged
//! packet must never move the window.

/// Counters tracked behind the highest one accepted. 2048 tolerates a couple of
/// milliseconds of reordering at line rate on a fast link, for 256 bytes per key.
pub const REPLAY_WINDOW: u64 = 2048;

const WORDS: usize = (REPLAY_WINDOW / 64) as usize;

/// Why a counter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// This counter was already accepted.
    #[error("replayed counter {0}")]
    Duplicate(u64),
    /// The counter is [`REPLAY_WINDOW`] or more behind the highest accepted one, so the
    /// window can no longer tell whether it was seen.
    #[error("counter {0} is older than the replay window")]
    TooOld(u64),
}

/// Which of the last [`REPLAY_WINDOW`] counters have been accepted. Bit `c % REPLAY_WINDOW`
/// stands for counter `c`; bits are cleared as the window slides over them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayWindow {
    highest: Option<u64>,
    bits: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    /// An empty window: every counter is acceptable.
    pub const fn new() -> Self {
        Self {
            highest: None,
            bits: [0; WORDS],
        }
    }

    /// The highest counter accepted so far.
    pub const fn highest(&self) -> Option<u64> {
        self.highest
    }

    /// Whether `counter` would be accepted, without recording it (call before decrypting).
    pub fn check(&self, counter: u64) -> Result<(), ReplayError> {
        match self.highest {
            None => Ok(()),
            Some(highest) if counter > highest => Ok(()),
            Some(highest) if highest - counter >= REPLAY_WINDOW => {
                Err(ReplayError::TooOld(counter))
            }
            Some(_) if self.bit(counter) => Err(ReplayError::Duplicate(counter)),
            Some(_) => Ok(()),
        }
    }

    /// Records `counter` as seen, sliding the window forward if it is the new highest
    /// (call only after the packet authenticated).
    pub fn accept(&mut self, counter: u64) -> Result<(), ReplayError> {
        self.check(counter)?;
        match self.highest {
            Some(highest) if counter <= highest => {}
            Some(highest) => {
                self.clear_between(highest, counter);
                self.highest = Some(counter);
            }
            None => self.highest = Some(counter),
        }
        self.set_bit(counter);
        Ok(())
    }

    /// Clears the bits of every counter in `(from, to]`, which the window is sliding onto.
    fn clear_between(&mut self, from: u64, to: u64) {
        if to - from >= REPLAY_WINDOW {
            self.bits = [0; WORDS];
            return;
        }
        let mut c = from + 1;
        while c <= to {
            let step = if c.is_multiple_of(64) && to - c >= 63 {
                self.bits[Self::word(c)] = 0;
                64
            } else {
                self.bits[Self::word(c)] &= !Self::mask(c);
                1
            };
            match c.checked_add(step) {
                Some(next) => c = next,
                None => break,
            }
        }
    }

    fn word(counter: u64) -> usize {
        // Always < WORDS: the modulus keeps it in range.
        ((counter % REPLAY_WINDOW) / 64) as usize
    }

    fn mask(counter: u64) -> u64 {
        1u64 << (counter % 64)
    }

    fn bit(&self, counter: u64) -> bool {
        self.bits[Self::word(counter)] & Self::mask(counter) != 0
    }

    fn set_bit(&mut self, counter: u64) {
        self.bits[Self::word(counter)] |= Self::mask(counter);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn in_order_reordered_duplicate_and_old() {
        let mut w = ReplayWindow::new();
        for c in 0..10 {
            assert_eq!(w.accept(c), Ok(()));
        }
        assert_eq!(w.accept(5), Err(ReplayError::Duplicate(5)));
        assert_eq!(w.accept(20), Ok(()));
        // 11..20 skipped: each accepted exactly once, in any order.
        for c in (11..20).rev() {
            assert_eq!(w.accept(c), Ok(()));
            assert_eq!(w.accept(c), Err(ReplayError::Duplicate(c)));
        }
        assert_eq!(w.accept(20 + REPLAY_WINDOW), Ok(()));
        assert_eq!(w.check(20), Err(ReplayError::TooOld(20)));
        // Exactly at the window edge: counter highest - (W - 1) is still tracked.
        let edge = 20 + 1;
        assert_eq!(w.accept(edge), Ok(()));
        assert_eq!(w.accept(edge), Err(ReplayError::Duplicate(edge)));
    }

    #[test]
    fn check_does_not_record() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.check(7), Ok(()));
        assert_eq!(w.check(7), Ok(()));
        assert_eq!(w.highest(), None);
        w.accept(7).unwrap();
        assert_eq!(w.check(7), Err(ReplayError::Duplicate(7)));
    }

    #[test]
    fn extremes_do_not_overflow() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.accept(u64::MAX), Ok(()));
        assert_eq!(w.accept(u64::MAX), Err(ReplayError::Duplicate(u64::MAX)));
        assert_eq!(w.accept(0), Err(ReplayError::TooOld(0)));
        assert_eq!(w.accept(u64::MAX - 1), Ok(()));
    }

    proptest! {
        /// Against a model that remembers every counter: the window never accepts a
        /// counter twice, and accepts every fresh one within the window.
        #[test]
        fn matches_model(counters in proptest::collection::vec(0u64..6000, 1..600)) {
            let mut w = ReplayWindow::new();
            let mut seen = BTreeSet::new();
            let mut highest: Option<u64> = None;
            for c in counters {
                let got = w.accept(c);
                let fresh = !seen.contains(&c);
                let in_window = highest.is_none_or(|h| c > h || h - c < REPLAY_WINDOW);
                if fresh && in_window {
                    prop_assert_eq!(got, Ok(()));
                    seen.insert(c);
                    highest = Some(highest.map_or(c, |h| h.max(c)));
                } else {
                    prop_assert!(got.is_err());
                }
            }
        }
    }
}
