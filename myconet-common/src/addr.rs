//! Overlay addressing: every node owns one /64 inside `fd6d::/16` and one address in it,
//! both derived from its public key with blake3, so anyone holding the key can check
//! that an address belongs to it.
//!
//! ```text
//! digest       = blake3::derive_key(NODE_PREFIX_CONTEXT, public key)     32 bytes
//! node prefix  = fd6d : digest[0..6]            /64   (48 key bits: what routing binds)
//! node address = node prefix : digest[6..14]    /128  (112 key bits: what sessions bind)
//! work         = leading zero bits of digest[14..32]  (identity proof of work)
//! ```
//!
//! Why the interface identifier is hashed too: 48 bits are too few to bind an address
//! to a key on their own (a second key with the same /64 costs 2^48 trials; at 10,000
//! nodes, one matching any of them about an hour on one core). Every end-to-end
//! handshake checks the full address ([`key_owns`]), so impersonating a node's address
//! costs 2^112 trials; only routing is per /64 ([`key_owns_prefix`]), where the identity
//! proof of work ([`identity_work`]) and key pinning raise the cost instead
//! (`docs/protocol.md`, "Overlay addresses").
//!
//! `fd6d::/16` sits in the unique-local range (fc00::/7), far from Yggdrasil's `200::/7`
//! and Mycelium's `400::/7`, so nodes can run all three side by side; why it stays
//! there although it overlaps 1/256 of the locally assigned ULA /48s is in
//! `docs/protocol.md`.

use core::net::Ipv6Addr;

/// First two bytes of every overlay address (`fd6d::/16`; 0x6d is 'm').
pub const OVERLAY_PREFIX: [u8; 2] = [0xfd, 0x6d];

/// Length of the overlay prefix in bits.
pub const OVERLAY_PREFIX_LEN: u8 = 16;

/// Length of a node's own prefix in bits.
pub const NODE_PREFIX_LEN: u8 = 64;

/// Key-derivation context for the node prefix (blake3 `derive_key`), versioned so a
/// future scheme cannot collide with this one.
pub const NODE_PREFIX_CONTEXT: &str = "myconet 2026-11 overlay node prefix v1";

/// The overlay prefix as an address.
pub const OVERLAY_NETWORK: Ipv6Addr = Ipv6Addr::new(0xfd6d, 0, 0, 0, 0, 0, 0, 0);

/// Where a link-level handshake is sent: "whichever node answers at this underlay
/// endpoint". A configured neighbour is known by its endpoint only, so the initiator
/// cannot name its overlay address; the responder's key is learned from the (signed)
/// response instead. Its /64 (`fd6d::/64`) is reserved: no key may own it (a key whose
/// derived prefix is all zero is refused, a 2^-48 event), so link and end-to-end
/// handshakes can never be confused, and every node treats the address as local.
pub const LINK_ADDRESS: Ipv6Addr = OVERLAY_NETWORK;

/// Whether `addr` lies in the reserved link /64 (see [`LINK_ADDRESS`]).
pub fn is_link_reserved(addr: &Ipv6Addr) -> bool {
    prefix_contains(LINK_ADDRESS, NODE_PREFIX_LEN, *addr)
}

/// Whether an address lies inside the overlay prefix.
pub const fn is_overlay(addr: &Ipv6Addr) -> bool {
    let o = addr.octets();
    o[0] == OVERLAY_PREFIX[0] && o[1] == OVERLAY_PREFIX[1]
}

/// Zeroes every bit of `addr` after the first `len` bits.
pub fn mask(addr: Ipv6Addr, len: u8) -> Ipv6Addr {
    let bits = u128::from(addr);
    let masked = match len {
        0 => 0,
        1..=127 => bits & (u128::MAX << (128 - u32::from(len))),
        _ => bits,
    };
    Ipv6Addr::from(masked)
}

/// Whether `addr` lies inside `prefix/len`.
pub fn prefix_contains(prefix: Ipv6Addr, len: u8, addr: Ipv6Addr) -> bool {
    mask(prefix, len) == mask(addr, len)
}

/// Leading zero bits the identity proof of work requires of a node key: the bits of
/// [`identity_work`]. Generating a key that has them takes 2^16 key generations on
/// average (1.4 s with two cores here, `identity::generate_pkcs8`); checking it, one
/// blake3. It makes identities cost something (a table-filling or Sybil host pays it
/// per identity) and adds its bits to the cost of a key colliding with another's /64.
pub const IDENTITY_WORK_BITS: u32 = 16;

#[cfg(feature = "std")]
fn digest(public_key: &[u8]) -> [u8; 32] {
    blake3::derive_key(NODE_PREFIX_CONTEXT, public_key)
}

/// The /64 a public key owns: `fd6d` followed by the first 48 bits of
/// `blake3::derive_key(NODE_PREFIX_CONTEXT, public_key)`.
#[cfg(feature = "std")]
pub fn node_prefix(public_key: &[u8]) -> Ipv6Addr {
    let d = digest(public_key);
    let mut o = [0u8; 16];
    o[..2].copy_from_slice(&OVERLAY_PREFIX);
    o[2..8].copy_from_slice(&d[..6]);
    Ipv6Addr::from(o)
}

/// The node's own address: its /64 followed by the next 64 bits of the digest as the
/// interface identifier, so the whole address binds 112 bits of the key.
#[cfg(feature = "std")]
pub fn node_address(public_key: &[u8]) -> Ipv6Addr {
    let d = digest(public_key);
    let mut o = [0u8; 16];
    o[..2].copy_from_slice(&OVERLAY_PREFIX);
    o[2..16].copy_from_slice(&d[..14]);
    Ipv6Addr::from(o)
}

/// Whether `addr` is exactly the address `public_key` owns (all 128 bits): what a
/// handshake checks of the address the initiator dialled and of the initiator's
/// source, and what a discovery beacon's address must be. Each node has that one
/// address; other addresses in its /64 are not its own end to end.
#[cfg(feature = "std")]
pub fn key_owns(public_key: &[u8], addr: &Ipv6Addr) -> bool {
    node_address(public_key) == *addr
}

/// Whether `addr` lies in the /64 that `public_key` owns (48 key bits): what routing
/// checks of an announcement, and what tells whether an address is in this node's
/// own prefix.
#[cfg(feature = "std")]
pub fn key_owns_prefix(public_key: &[u8], addr: &Ipv6Addr) -> bool {
    prefix_contains(node_prefix(public_key), NODE_PREFIX_LEN, *addr)
}

/// The identity proof of work of a key: how many leading zero bits the digest has
/// after the 112 address bits (bytes 14..32). A key is acceptable as a node identity
/// when it has at least [`IDENTITY_WORK_BITS`].
#[cfg(feature = "std")]
pub fn identity_work(public_key: &[u8]) -> u32 {
    let d = digest(public_key);
    let mut bits = 0;
    for b in &d[14..] {
        bits += b.leading_zeros();
        if *b != 0 {
            break;
        }
    }
    bits
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    #[test]
    fn derived_prefix_is_in_overlay_and_stable() {
        let key = [7u8; 32];
        let p = node_prefix(&key);
        assert!(is_overlay(&p));
        assert_eq!(p, node_prefix(&key));
        assert_eq!(mask(p, NODE_PREFIX_LEN), p);
        assert!(key_owns(&key, &node_address(&key)));
        assert!(!key_owns(&[8u8; 32], &node_address(&key)));
    }

    #[test]
    fn the_address_binds_112_key_bits_the_prefix_48() {
        let key = [7u8; 32];
        let d = blake3::derive_key(NODE_PREFIX_CONTEXT, &key);
        let a = node_address(&key);
        assert_eq!(mask(a, NODE_PREFIX_LEN), node_prefix(&key));
        assert_eq!(&a.octets()[2..], &d[..14]);
        // Another address in the same /64 is in the prefix, but not the node's.
        let mut other = a.octets();
        other[15] ^= 1;
        let other = Ipv6Addr::from(other);
        assert!(key_owns_prefix(&key, &other));
        assert!(!key_owns(&key, &other));
        assert!(key_owns_prefix(&key, &a));
    }

    #[test]
    fn identity_work_counts_leading_zero_bits_after_the_address() {
        // Search a few keys and check the count against the digest bytes directly.
        let mut seen_zero_byte = false;
        for i in 0u32..4096 {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_le_bytes());
            let d = blake3::derive_key(NODE_PREFIX_CONTEXT, &key);
            let w = identity_work(&key);
            let bits: u128 = u128::from_be_bytes(d[14..30].try_into().unwrap());
            let expect = if bits == 0 { 128 } else { bits.leading_zeros() };
            assert_eq!(w.min(128), expect.min(128));
            seen_zero_byte |= d[14] == 0;
        }
        assert!(seen_zero_byte, "4096 keys give some with 8+ bits of work");
    }

    #[test]
    fn overlay_avoids_yggdrasil_and_mycelium() {
        let ygg = "200::".parse::<Ipv6Addr>().unwrap();
        let myc = "400::".parse::<Ipv6Addr>().unwrap();
        assert!(!prefix_contains(ygg, 7, OVERLAY_NETWORK));
        assert!(!prefix_contains(myc, 7, OVERLAY_NETWORK));
    }
}

#[cfg(test)]
mod mask_tests {
    use super::*;

    #[test]
    fn mask_edges() {
        let a: Ipv6Addr = "fd6d:1234:5678:9abc:def0:1:2:3".parse().unwrap();
        assert_eq!(mask(a, 0), Ipv6Addr::UNSPECIFIED);
        assert_eq!(mask(a, 128), a);
        assert_eq!(mask(a, 16), OVERLAY_NETWORK);
        assert_eq!(
            mask(a, 64),
            "fd6d:1234:5678:9abc::".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(mask(a, 200), a);
        assert!(prefix_contains(OVERLAY_NETWORK, 16, a));
    }
}
