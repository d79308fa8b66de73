//! The session table's timers: one min-heap of deadlines, so the I/O shell's
//! `poll_timeout` after every batch is O(1) and a timer firing costs O(log n), instead
//! of a walk over every session and peer each time.
//!
//! Deletion is lazy. Each peer and session records the deadline of the heap entry it
//! is armed with; an entry whose deadline no longer matches is stale and skipped when
//! it comes up. A deadline that moves later (a session's idle timer on every packet)
//! pushes nothing: the earlier entry fires, the owner finds nothing due and re-arms at
//! its real deadline. Only a deadline that moves earlier pushes a new entry, so the
//! heap holds about one entry per owner; [`Timers::compact`] drops stale entries when
//! it grows well beyond that.

use std::{cmp::Ordering, collections::BinaryHeap, time::Instant};

use super::sessions::RemoteId;

/// Whose deadline an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum TimerKey {
    /// Per-peer work: retransmission, cookie expiry, keepalive, retiring the previous
    /// session, dropping an unconfirmed one.
    Peer(RemoteId),
    /// Per-session work: expiry and retiring an old receive key.
    Session(u32),
}

#[derive(Debug)]
struct Entry {
    at: Instant,
    /// Insertion order, so equal deadlines pop first-in first-out.
    seq: u64,
    key: TimerKey,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at && self.seq == other.seq
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    /// Reversed, so the std max-heap pops the earliest deadline.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// A min-heap of (deadline, owner).
#[derive(Debug, Default)]
pub(crate) struct Timers {
    heap: BinaryHeap<Entry>,
    seq: u64,
}

impl Timers {
    /// Adds an entry; the caller records `at` as the owner's armed deadline.
    pub(crate) fn push(&mut self, at: Instant, key: TimerKey) {
        self.seq = self.seq.wrapping_add(1);
        self.heap.push(Entry {
            at,
            seq: self.seq,
            key,
        });
    }

    /// The earliest deadline held (possibly a stale entry: then the owner finds nothing
    /// due when it fires, which is harmless).
    pub(crate) fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|e| e.at)
    }

    /// Removes and returns the earliest entry if it is due at `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<(Instant, TimerKey)> {
        if self.heap.peek()?.at > now {
            return None;
        }
        self.heap.pop().map(|e| (e.at, e.key))
    }

    /// Entries held, stale ones included.
    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }

    /// Keeps only the entries `armed` says their owner is still armed with.
    pub(crate) fn compact(&mut self, armed: impl Fn(TimerKey, Instant) -> bool) {
        let entries = std::mem::take(&mut self.heap).into_vec();
        self.heap = entries.into_iter().filter(|e| armed(e.key, e.at)).collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pops_in_deadline_order_and_only_when_due() {
        let t0 = Instant::now();
        let mut t = Timers::default();
        t.push(t0 + Duration::from_secs(3), TimerKey::Session(3));
        t.push(t0 + Duration::from_secs(1), TimerKey::Session(1));
        t.push(t0 + Duration::from_secs(2), TimerKey::Session(2));
        t.push(t0 + Duration::from_secs(1), TimerKey::Session(4));
        assert_eq!(t.next(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(t.pop_due(t0), None);
        let due: Vec<TimerKey> =
            std::iter::from_fn(|| t.pop_due(t0 + Duration::from_secs(2)).map(|(_, k)| k)).collect();
        assert_eq!(
            due,
            vec![
                TimerKey::Session(1),
                TimerKey::Session(4),
                TimerKey::Session(2)
            ]
        );
        t.compact(|_, _| false);
        assert_eq!(t.len(), 0);
        assert_eq!(t.next(), None);
    }
}
