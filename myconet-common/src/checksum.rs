//! Internet checksum arithmetic (RFC 1071) and incremental update (RFC 1624, eqn. 3).
//!
//! Relays rewrite addresses, ports and the hop limit; recomputing the UDP checksum over
//! the whole payload would cost a pass over every byte, so the XDP program patches it
//! incrementally with [`Incremental`], which the tests check against [`udp_ipv6`].

/// Running one's-complement update of an existing checksum.
#[derive(Debug, Clone, Copy)]
pub struct Incremental {
    sum: u32,
}

impl Incremental {
    /// Starts from the checksum as found in the packet (network byte order value).
    #[inline(always)]
    pub const fn new(old_checksum: u16) -> Self {
        Self {
            sum: (!old_checksum) as u32,
        }
    }

    /// Accounts for a 16-bit word changing from `old` to `new`.
    #[inline(always)]
    pub fn replace_u16(&mut self, old: u16, new: u16) {
        self.sum += (!old) as u32;
        self.sum += new as u32;
        self.sum = (self.sum & 0xffff) + (self.sum >> 16);
    }

    /// Accounts for a 32-bit word (two 16-bit words, host order value) changing.
    #[inline(always)]
    pub fn replace_u32(&mut self, old: u32, new: u32) {
        self.replace_u16((old >> 16) as u16, (new >> 16) as u16);
        self.replace_u16(old as u16, new as u16);
    }

    /// Accounts for an IPv6 address (8 words) changing.
    #[inline(always)]
    pub fn replace_addr(&mut self, old: &[u8; 16], new: &[u8; 16]) {
        let mut i = 0;
        while i < 16 {
            self.replace_u16(
                u16::from_be_bytes([old[i], old[i + 1]]),
                u16::from_be_bytes([new[i], new[i + 1]]),
            );
            i += 2;
        }
    }

    /// The checksum to store. A UDP-over-IPv6 checksum may not be zero, so zero becomes
    /// `0xffff` (the same value in one's complement).
    #[inline(always)]
    pub const fn finish_udp(self) -> u16 {
        let folded = fold(self.sum);
        let c = !folded;
        if c == 0 { 0xffff } else { c }
    }
}

/// One's-complement sum over words as the machine loads them (native byte order).
///
/// RFC 1071 sums are byte-order independent: summing byte-swapped words gives the
/// byte-swapped sum. So the relay path can load addresses as two 64-bit words and the
/// checksum field as it lies in memory, and store the result back the same way, with no
/// byte swapping at all. A 64-bit word counts as its two 32-bit halves (2^16 ≡ 1 modulo
/// 0xffff, so a 32-bit value is congruent to the sum of its 16-bit halves), and removing
/// a word is adding its complement. The accumulator cannot overflow for fewer than 2^31
/// words.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WordSum(u64);

impl WordSum {
    /// An empty sum.
    #[inline(always)]
    pub const fn new() -> Self {
        Self(0)
    }

    /// Adds a 64-bit word.
    #[inline(always)]
    pub const fn add64(self, w: u64) -> Self {
        Self(self.0 + (w & 0xffff_ffff) + (w >> 32))
    }

    /// Removes a 64-bit word.
    #[inline(always)]
    pub const fn sub64(self, w: u64) -> Self {
        self.add64(!w)
    }

    /// Adds a 16-bit word.
    #[inline(always)]
    pub const fn add16(self, w: u16) -> Self {
        Self(self.0 + w as u64)
    }

    /// Removes a 16-bit word.
    #[inline(always)]
    pub const fn sub16(self, w: u16) -> Self {
        self.add16(!w)
    }

    /// The sum folded to 16 bits (never 0 unless nothing non-zero was added: 0xffff and
    /// 0 are the same value in one's complement).
    #[inline(always)]
    pub const fn fold(self) -> u16 {
        let mut s = (self.0 & 0xffff_ffff) + (self.0 >> 32);
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        s as u16
    }

    /// The UDP checksum after adding this sum of changes to a packet whose checksum was
    /// `old` (both in the same byte order): zero becomes 0xffff, as UDP over IPv6 needs.
    #[inline(always)]
    pub const fn patch_udp(self, old: u16) -> u16 {
        let c = !self.add16(!old).fold();
        if c == 0 { 0xffff } else { c }
    }
}

/// Folds carries into 16 bits.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// One's-complement sum of `data` as big-endian words (odd tail padded with zero).
pub fn sum_bytes(data: &[u8]) -> u32 {
    let mut sum: u64 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u32
}

/// The checksum of an IPv6 upper-layer `segment` (its checksum field zeroed) of protocol
/// `next_header` sent from `src` to `dst`: one's complement of the pseudo-header
/// (RFC 8200 §8.1) and segment sum. UDP and ICMPv6 share it.
pub fn ipv6_upper_layer(src: &[u8; 16], dst: &[u8; 16], next_header: u8, segment: &[u8]) -> u16 {
    let len = segment.len() as u32;
    let pseudo =
        sum_bytes(src) + sum_bytes(dst) + (len >> 16) + (len & 0xffff) + u32::from(next_header);
    !fold(pseudo + sum_bytes(segment))
}

/// The UDP checksum of `segment` (UDP header with its checksum field zeroed, plus
/// payload) sent from `src` to `dst` over IPv6.
pub fn udp_ipv6(src: &[u8; 16], dst: &[u8; 16], segment: &[u8]) -> u16 {
    let c = ipv6_upper_layer(src, dst, 17, segment);
    // Zero means "no checksum" in UDP, so a computed zero is sent as all ones.
    if c == 0 { 0xffff } else { c }
}

/// What a sender's kernel leaves in the UDP checksum field of a datagram of `len` bytes
/// from `src` to `dst` when it transmits with TX checksum offload (`CHECKSUM_PARTIAL`):
/// the folded pseudo-header sum, which the NIC (or, on a veth, the receiver's trust in
/// the skb's state) completes over the datagram.
pub fn udp_ipv6_partial(src: &[u8; 16], dst: &[u8; 16], len: u16) -> u16 {
    let pseudo = sum_bytes(src) + sum_bytes(dst) + u32::from(len) + 17;
    fold(pseudo)
}

/// Whether `segment` (UDP header with its checksum in place, plus payload) carries a
/// valid checksum for `src` → `dst`.
pub fn udp_ipv6_valid(src: &[u8; 16], dst: &[u8; 16], segment: &[u8]) -> bool {
    let len = segment.len() as u32;
    let pseudo = sum_bytes(src) + sum_bytes(dst) + (len >> 16) + (len & 0xffff) + 17;
    fold(pseudo + sum_bytes(segment)) == 0xffff
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn segment(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut s = Vec::with_capacity(8 + payload.len());
        s.extend_from_slice(&sport.to_be_bytes());
        s.extend_from_slice(&dport.to_be_bytes());
        s.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        s.extend_from_slice(&[0, 0]);
        s.extend_from_slice(payload);
        s
    }

    proptest! {
        #[test]
        fn incremental_matches_recompute(
            src: [u8; 16], dst: [u8; 16], nsrc: [u8; 16], ndst: [u8; 16],
            sport: u16, dport: u16, nsport: u16, ndport: u16,
            payload in proptest::collection::vec(any::<u8>(), 4..200),
            new_word: u16,
        ) {
            let mut seg = segment(sport, dport, &payload);
            let c = udp_ipv6(&src, &dst, &seg);
            seg[6..8].copy_from_slice(&c.to_be_bytes());
            prop_assert!(udp_ipv6_valid(&src, &dst, &seg));

            let old_word = u16::from_be_bytes([seg[10], seg[11]]);
            let mut inc = Incremental::new(c);
            inc.replace_addr(&src, &nsrc);
            inc.replace_addr(&dst, &ndst);
            inc.replace_u16(sport, nsport);
            inc.replace_u16(dport, ndport);
            inc.replace_u16(old_word, new_word);
            seg[0..2].copy_from_slice(&nsport.to_be_bytes());
            seg[2..4].copy_from_slice(&ndport.to_be_bytes());
            seg[10..12].copy_from_slice(&new_word.to_be_bytes());
            seg[6..8].copy_from_slice(&inc.finish_udp().to_be_bytes());
            prop_assert!(udp_ipv6_valid(&nsrc, &ndst, &seg));
        }
    }

    proptest! {
        /// The relay path's native-order word arithmetic gives the same checksum as a
        /// recomputation, whatever the byte order of the words.
        #[test]
        fn word_sum_patch_matches_recompute(
            src: [u8; 16], dst: [u8; 16], nsrc: [u8; 16], ndst: [u8; 16],
            sport: u16, nsport: u16, ndport: u16,
            payload in proptest::collection::vec(any::<u8>(), 4..200),
            new_word: u16,
        ) {
            let mut seg = segment(sport, 9651, &payload);
            let c = udp_ipv6(&src, &dst, &seg);
            seg[6..8].copy_from_slice(&c.to_be_bytes());
            let ne64 = |a: &[u8; 16], i: usize| u64::from_ne_bytes(a[i..i + 8].try_into().unwrap());
            let ne16 = |b: &[u8]| u16::from_ne_bytes([b[0], b[1]]);
            let old_ports = [ne16(&seg[0..2]), ne16(&seg[2..4])];
            let old_word = ne16(&seg[10..12]);
            let old_csum = ne16(&seg[6..8]);
            seg[0..2].copy_from_slice(&nsport.to_be_bytes());
            seg[2..4].copy_from_slice(&ndport.to_be_bytes());
            seg[10..12].copy_from_slice(&new_word.to_be_bytes());
            let sum = WordSum::new()
                .sub64(ne64(&src, 0)).sub64(ne64(&src, 8))
                .sub64(ne64(&dst, 0)).sub64(ne64(&dst, 8))
                .add64(ne64(&nsrc, 0)).add64(ne64(&nsrc, 8))
                .add64(ne64(&ndst, 0)).add64(ne64(&ndst, 8))
                .sub16(old_ports[0]).sub16(old_ports[1])
                .add16(ne16(&seg[0..2])).add16(ne16(&seg[2..4]))
                .sub16(old_word).add16(ne16(&seg[10..12]));
            let patched = sum.patch_udp(old_csum);
            seg[6..8].copy_from_slice(&patched.to_ne_bytes());
            prop_assert!(udp_ipv6_valid(&nsrc, &ndst, &seg));
        }
    }

    #[test]
    fn zero_checksum_is_sent_as_ffff() {
        // Search a payload whose checksum folds to zero and check the rule holds.
        let src = [0u8; 16];
        let dst = [0u8; 16];
        for w in 0..=u16::MAX {
            let seg = segment(1, 2, &w.to_be_bytes());
            let c = udp_ipv6(&src, &dst, &seg);
            assert_ne!(c, 0);
            let mut s = seg.clone();
            s[6..8].copy_from_slice(&c.to_be_bytes());
            assert!(udp_ipv6_valid(&src, &dst, &s));
        }
    }
}
