//! [`GroupSet`]: a set of chunk-group indices of one blob, kept as sorted disjoint ranges.
//!
//! Chunk groups (16 KiB, see [`crate::verified`]) are the unit in which blobs are
//! verified, stored as partial, requested and served. The store keeps the set of verified
//! groups of every partial blob, the wire carries the groups asked for and the groups a
//! node has, and the download core schedules work in them. One type serves all three,
//! with one canonical byte encoding.

use std::{fmt, ops::Range};

/// A set of chunk-group indices, as sorted, disjoint, non-adjacent half-open ranges.
///
/// The invariant makes the representation canonical: two equal sets have equal ranges
/// and equal encodings.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct GroupSet {
    ranges: Vec<Range<u64>>,
}

/// Why bytes are not a canonical [`GroupSet`] encoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupSetError {
    /// Fewer bytes than the encoding needs.
    #[error("group set truncated: {have} bytes, need {need}")]
    Truncated {
        /// Bytes available.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
    /// More ranges than the caller allows.
    #[error("group set has {count} ranges, at most {max} allowed")]
    TooManyRanges {
        /// Ranges announced.
        count: usize,
        /// The caller's limit.
        max: usize,
    },
    /// A range that is empty, overlaps or touches the previous one, or is out of order.
    #[error(
        "group set range {index} ({start}..{end}) is empty, out of order or touches the previous one"
    )]
    NotCanonical {
        /// Zero-based index of the offending range.
        index: usize,
        /// Its start.
        start: u64,
        /// Its end.
        end: u64,
    },
    /// Bytes left after the last range.
    #[error("{0} bytes after the group set")]
    TrailingBytes(usize),
}

impl GroupSet {
    /// Bytes of the count prefix in the encoding.
    pub const COUNT_LEN: usize = 4;
    /// Bytes one range takes in the encoding (start and end, u64 big-endian each).
    pub const RANGE_LEN: usize = 16;

    /// The empty set.
    pub const fn new() -> Self {
        Self { ranges: Vec::new() }
    }

    /// The groups `range` (empty if the range is).
    pub fn from_range(range: Range<u64>) -> Self {
        let mut s = Self::new();
        s.insert_range(range);
        s
    }

    /// Every group of a blob with `count` groups.
    pub fn all(count: u64) -> Self {
        Self::from_range(0..count)
    }

    /// True if no group is in the set.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Number of groups in the set.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// The ranges, sorted, disjoint and non-adjacent.
    pub fn ranges(&self) -> &[Range<u64>] {
        &self.ranges
    }

    /// Every group in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges.iter().flat_map(|r| r.clone())
    }

    /// The smallest group, if any.
    pub fn first(&self) -> Option<u64> {
        self.ranges.first().map(|r| r.start)
    }

    /// One past the largest group (0 for the empty set).
    pub fn end(&self) -> u64 {
        self.ranges.last().map_or(0, |r| r.end)
    }

    /// True if `group` is in the set.
    pub fn contains(&self, group: u64) -> bool {
        let i = self.ranges.partition_point(|r| r.end <= group);
        self.ranges.get(i).is_some_and(|r| r.start <= group)
    }

    /// True if every group of `other` is in `self`.
    pub fn is_superset(&self, other: &GroupSet) -> bool {
        other.difference(self).is_empty()
    }

    /// Adds one group.
    pub fn insert(&mut self, group: u64) {
        if let Some(end) = group.checked_add(1) {
            self.insert_range(group..end);
        }
    }

    /// Adds every group of `range`.
    pub fn insert_range(&mut self, range: Range<u64>) {
        if range.start >= range.end {
            return;
        }
        // First range that ends at or after the new start (touching counts: we merge).
        let lo = self.ranges.partition_point(|r| r.end < range.start);
        // First range that starts after the new end (touching counts again).
        let hi = self.ranges.partition_point(|r| r.start <= range.end);
        if lo == hi {
            self.ranges.insert(lo, range);
            return;
        }
        let start = range.start.min(self.ranges[lo].start);
        let end = range.end.max(self.ranges[hi - 1].end);
        self.ranges.splice(lo..hi, std::iter::once(start..end));
    }

    /// Removes every group of `range`.
    pub fn remove_range(&mut self, range: Range<u64>) {
        if range.start >= range.end {
            return;
        }
        let mut out = Vec::with_capacity(self.ranges.len() + 1);
        for r in self.ranges.drain(..) {
            if r.end <= range.start || r.start >= range.end {
                out.push(r);
                continue;
            }
            if r.start < range.start {
                out.push(r.start..range.start);
            }
            if r.end > range.end {
                out.push(range.end..r.end);
            }
        }
        self.ranges = out;
    }

    /// Groups in `self` or `other`.
    pub fn union(&self, other: &GroupSet) -> GroupSet {
        let mut out = self.clone();
        for r in &other.ranges {
            out.insert_range(r.clone());
        }
        out
    }

    /// Groups in `self` and not in `other`.
    pub fn difference(&self, other: &GroupSet) -> GroupSet {
        let mut out = Vec::new();
        let mut j = 0;
        for r in &self.ranges {
            let mut start = r.start;
            while j < other.ranges.len() && other.ranges[j].end <= start {
                j += 1;
            }
            let mut k = j;
            while start < r.end {
                match other.ranges.get(k) {
                    Some(o) if o.start < r.end => {
                        if o.start > start {
                            out.push(start..o.start);
                        }
                        start = start.max(o.end);
                        k += 1;
                    }
                    _ => {
                        out.push(start..r.end);
                        break;
                    }
                }
            }
        }
        GroupSet { ranges: out }
    }

    /// Groups in both `self` and `other`.
    pub fn intersection(&self, other: &GroupSet) -> GroupSet {
        self.difference(&self.difference(other))
    }

    /// The first `max` groups of the set (all of it if it holds fewer).
    pub fn take_first(&self, max: u64) -> GroupSet {
        let mut left = max;
        let mut out = Vec::new();
        for r in &self.ranges {
            if left == 0 {
                break;
            }
            let n = (r.end - r.start).min(left);
            out.push(r.start..r.start + n);
            left -= n;
        }
        GroupSet { ranges: out }
    }

    /// The groups of the first `max` ranges of the set.
    pub fn first_ranges(&self, max: usize) -> GroupSet {
        GroupSet {
            ranges: self.ranges.iter().take(max).cloned().collect(),
        }
    }

    /// Bytes [`GroupSet::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        Self::COUNT_LEN + self.ranges.len() * Self::RANGE_LEN
    }

    /// Appends the canonical encoding: a u32 range count, then each range's start and
    /// end as u64, all big-endian.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.ranges.len() as u32).to_be_bytes());
        for r in &self.ranges {
            out.extend_from_slice(&r.start.to_be_bytes());
            out.extend_from_slice(&r.end.to_be_bytes());
        }
    }

    /// The canonical encoding as a new vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode(&mut out);
        out
    }

    /// Parses an encoding at the start of `bytes`, allowing at most `max_ranges` ranges
    /// (checked before anything is allocated). Returns the set and the bytes it used.
    pub fn decode_prefix(bytes: &[u8], max_ranges: usize) -> Result<(Self, usize), GroupSetError> {
        let count_bytes: [u8; 4] = bytes
            .get(..Self::COUNT_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or(GroupSetError::Truncated {
                have: bytes.len(),
                need: Self::COUNT_LEN,
            })?;
        let count = u32::from_be_bytes(count_bytes) as usize;
        if count > max_ranges {
            return Err(GroupSetError::TooManyRanges {
                count,
                max: max_ranges,
            });
        }
        let need = Self::COUNT_LEN + count * Self::RANGE_LEN;
        if bytes.len() < need {
            return Err(GroupSetError::Truncated {
                have: bytes.len(),
                need,
            });
        }
        let mut ranges = Vec::with_capacity(count);
        let mut prev_end = None;
        for index in 0..count {
            let at = Self::COUNT_LEN + index * Self::RANGE_LEN;
            let start = be_u64(&bytes[at..at + 8]);
            let end = be_u64(&bytes[at + 8..at + 16]);
            // Non-empty, and strictly after the previous range with a gap (touching
            // ranges would have been merged by the encoder).
            if start >= end || prev_end.is_some_and(|p| start <= p) {
                return Err(GroupSetError::NotCanonical { index, start, end });
            }
            prev_end = Some(end);
            ranges.push(start..end);
        }
        Ok((GroupSet { ranges }, need))
    }

    /// Parses exactly one canonical encoding, with at most `max_ranges` ranges.
    pub fn decode(bytes: &[u8], max_ranges: usize) -> Result<Self, GroupSetError> {
        let (set, used) = Self::decode_prefix(bytes, max_ranges)?;
        if used != bytes.len() {
            return Err(GroupSetError::TrailingBytes(bytes.len() - used));
        }
        Ok(set)
    }
}

pub(crate) fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

impl FromIterator<u64> for GroupSet {
    fn from_iter<I: IntoIterator<Item = u64>>(iter: I) -> Self {
        let mut s = GroupSet::new();
        for g in iter {
            s.insert(g);
        }
        s
    }
}

impl From<Range<u64>> for GroupSet {
    fn from(range: Range<u64>) -> Self {
        Self::from_range(range)
    }
}

impl fmt::Display for GroupSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, r) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if r.end - r.start == 1 {
                write!(f, "{}", r.start)?;
            } else {
                write!(f, "{}..{}", r.start, r.end)?;
            }
        }
        f.write_str("}")
    }
}

impl fmt::Debug for GroupSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GroupSet{self}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn model(s: &GroupSet) -> BTreeSet<u64> {
        s.iter().collect()
    }

    fn set() -> impl Strategy<Value = GroupSet> {
        proptest::collection::vec((0u64..200, 0u64..20), 0..12).prop_map(|v| {
            let mut s = GroupSet::new();
            for (a, n) in v {
                s.insert_range(a..a + n);
            }
            s
        })
    }

    fn canonical(s: &GroupSet) -> bool {
        s.ranges.iter().all(|r| r.start < r.end)
            && s.ranges.windows(2).all(|w| w[0].end < w[1].start)
    }

    proptest! {
        #[test]
        fn operations_match_a_set_model(a in set(), b in set(), r in (0u64..220, 0u64..40)) {
            prop_assert!(canonical(&a) && canonical(&b));
            let (ma, mb) = (model(&a), model(&b));
            prop_assert_eq!(model(&a.union(&b)), ma.union(&mb).copied().collect::<BTreeSet<_>>());
            prop_assert_eq!(model(&a.difference(&b)), ma.difference(&mb).copied().collect::<BTreeSet<_>>());
            prop_assert_eq!(model(&a.intersection(&b)), ma.intersection(&mb).copied().collect::<BTreeSet<_>>());
            prop_assert!(canonical(&a.union(&b)) && canonical(&a.difference(&b)) && canonical(&a.intersection(&b)));
            prop_assert_eq!(a.len(), ma.len() as u64);
            prop_assert_eq!(a.is_superset(&b), mb.is_subset(&ma));
            for g in 0..230 {
                prop_assert_eq!(a.contains(g), ma.contains(&g));
            }
            let mut removed = a.clone();
            removed.remove_range(r.0..r.0 + r.1);
            prop_assert!(canonical(&removed));
            let expect: BTreeSet<u64> = ma.iter().copied().filter(|g| !(r.0..r.0 + r.1).contains(g)).collect();
            prop_assert_eq!(model(&removed), expect);
            let first = a.take_first(r.1);
            prop_assert_eq!(model(&first), ma.iter().copied().take(r.1 as usize).collect::<BTreeSet<_>>());
        }

        #[test]
        fn encode_decode_round_trip(a in set()) {
            let bytes = a.to_bytes();
            prop_assert_eq!(bytes.len(), a.encoded_len());
            prop_assert_eq!(GroupSet::decode(&bytes, 64).unwrap(), a);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(s) = GroupSet::decode(&bytes, 8) {
                prop_assert!(canonical(&s));
                prop_assert_eq!(s.to_bytes(), bytes);
            }
        }
    }

    #[test]
    fn decode_names_what_is_wrong() {
        let mut b = GroupSet::from_range(3..5).to_bytes();
        b.push(0);
        assert_eq!(
            GroupSet::decode(&b, 4),
            Err(GroupSetError::TrailingBytes(1))
        );
        assert_eq!(
            GroupSet::decode(&b[..10], 4),
            Err(GroupSetError::Truncated { have: 10, need: 20 })
        );
        let many = [0, 0, 1, 0];
        assert_eq!(
            GroupSet::decode(&many, 4),
            Err(GroupSetError::TooManyRanges { count: 256, max: 4 })
        );
        // Two touching ranges are not canonical (the encoder merges them).
        let mut touching = 2u32.to_be_bytes().to_vec();
        for (s, e) in [(0u64, 2u64), (2, 4)] {
            touching.extend_from_slice(&s.to_be_bytes());
            touching.extend_from_slice(&e.to_be_bytes());
        }
        assert_eq!(
            GroupSet::decode(&touching, 4),
            Err(GroupSetError::NotCanonical {
                index: 1,
                start: 2,
                end: 4
            })
        );
        assert_eq!(GroupSet::from_iter([1, 2, 3, 7]).to_string(), "{1..4,7}");
    }
}
