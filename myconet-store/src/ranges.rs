//! [`ByteRanges`]: the verified part of a partial blob, as sorted disjoint byte ranges,
//! and its encoding in the `blobs.verified` column.

/// Sorted, disjoint, non-adjacent half-open byte ranges `[start, end)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ByteRanges(Vec<(u64, u64)>);

impl ByteRanges {
    /// The ranges, sorted.
    pub(crate) fn as_slice(&self) -> &[(u64, u64)] {
        &self.0
    }

    /// Total bytes covered.
    pub(crate) fn total(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }

    /// Whether `[start, end)` is wholly covered.
    pub(crate) fn contains(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return true;
        }
        let i = self.0.partition_point(|&(_, e)| e <= start);
        self.0.get(i).is_some_and(|&(s, e)| s <= start && end <= e)
    }

    /// Adds `[start, end)`, merging with neighbours.
    pub(crate) fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        // First range that ends at or after `start` (touching counts, to merge).
        let i = self.0.partition_point(|&(_, e)| e < start);
        let mut j = i;
        let (mut s, mut e) = (start, end);
        while j < self.0.len() && self.0[j].0 <= e {
            s = s.min(self.0[j].0);
            e = e.max(self.0[j].1);
            j += 1;
        }
        self.0.splice(i..j, [(s, e)]);
    }

    /// Adds every range of `other`.
    pub(crate) fn extend(&mut self, other: &ByteRanges) {
        for &(s, e) in &other.0 {
            self.insert(s, e);
        }
    }

    /// The column encoding: each boundary as 8 little-endian bytes.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() * 16);
        for &(s, e) in &self.0 {
            out.extend_from_slice(&s.to_le_bytes());
            out.extend_from_slice(&e.to_le_bytes());
        }
        out
    }

    /// Parses the column encoding for a blob of `size` bytes. Anything malformed
    /// (wrong length, unsorted, empty or out-of-bounds ranges) yields `None`: the store
    /// then trusts none of the blob's bytes.
    pub(crate) fn decode(bytes: &[u8], size: u64) -> Option<Self> {
        if bytes.len() % 16 != 0 {
            return None;
        }
        let mut out = Vec::with_capacity(bytes.len() / 16);
        let mut prev_end = None;
        for pair in bytes.chunks_exact(16) {
            let s = u64::from_le_bytes(pair[..8].try_into().ok()?);
            let e = u64::from_le_bytes(pair[8..].try_into().ok()?);
            if s >= e || e > size || prev_end.is_some_and(|p| s <= p) {
                return None;
            }
            prev_end = Some(e);
            out.push((s, e));
        }
        Some(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn insert_merges_touching_and_overlapping() {
        let mut r = ByteRanges::default();
        r.insert(10, 20);
        r.insert(30, 40);
        r.insert(20, 30);
        assert_eq!(r.as_slice(), &[(10, 40)]);
        r.insert(0, 5);
        r.insert(3, 12);
        assert_eq!(r.as_slice(), &[(0, 40)]);
        r.insert(50, 50);
        assert_eq!(r.total(), 40);
        assert!(r.contains(0, 40) && !r.contains(39, 41) && r.contains(7, 7));
    }

    #[test]
    fn decode_refuses_what_encode_never_writes() {
        let r = ByteRanges(vec![(0, 16), (32, 48)]);
        assert_eq!(ByteRanges::decode(&r.encode(), 48), Some(r.clone()));
        assert_eq!(ByteRanges::decode(&r.encode(), 47), None, "past the end");
        assert_eq!(ByteRanges::decode(&r.encode()[..15], 48), None, "ragged");
        let unsorted = ByteRanges(vec![(32, 48), (0, 16)]).encode();
        assert_eq!(ByteRanges::decode(&unsorted, 48), None);
        let adjacent = ByteRanges(vec![(0, 16), (16, 32)]).encode();
        assert_eq!(ByteRanges::decode(&adjacent, 48), None);
        let empty = ByteRanges(vec![(5, 5)]).encode();
        assert_eq!(ByteRanges::decode(&empty, 48), None);
    }

    proptest! {
        #[test]
        fn matches_a_bitmap(ops in proptest::collection::vec((0u64..200, 0u64..40), 0..40)) {
            let mut r = ByteRanges::default();
            let mut bits = [false; 240];
            for (s, len) in ops {
                r.insert(s, s + len);
                for b in &mut bits[s as usize..(s + len) as usize] { *b = true; }
            }
            prop_assert_eq!(r.total(), bits.iter().filter(|b| **b).count() as u64);
            for (i, b) in bits.iter().enumerate() {
                prop_assert_eq!(r.contains(i as u64, i as u64 + 1), *b);
            }
            prop_assert_eq!(ByteRanges::decode(&r.encode(), 240), Some(r));
        }
    }
}
