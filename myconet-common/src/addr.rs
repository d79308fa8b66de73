//! Overlay addressing: every node owns one /64 inside `fd6d::/16`, derived from its
//! public key with blake3, so anyone holding the key can check the address belongs to it.
//!
//! `fd6d::/16` sits in the unique-local range (fc00::/7), far from Yggdrasil's `200::/7`
//! and Mycelium's `400::/7`, so nodes can run all three side by side.

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

/// The /64 a public key owns: `fd6d` followed by the first 48 bits of
/// `blake3::derive_key(NODE_PREFIX_CONTEXT, public_key)`.
#[cfg(feature = "std")]
pub fn node_prefix(public_key: &[u8]) -> Ipv6Addr {
    let digest = blake3::derive_key(NODE_PREFIX_CONTEXT, public_key);
    let mut o = [0u8; 16];
    o[..2].copy_from_slice(&OVERLAY_PREFIX);
    o[2..8].copy_from_slice(&digest[..6]);
    Ipv6Addr::from(o)
}

/// The node's own address: its /64 with interface identifier `::1`.
#[cfg(feature = "std")]
pub fn node_address(public_key: &[u8]) -> Ipv6Addr {
    let mut o = node_prefix(public_key).octets();
    o[15] = 1;
    Ipv6Addr::from(o)
}

/// Whether `addr` lies in the /64 that `public_key` owns.
#[cfg(feature = "std")]
pub fn key_owns(public_key: &[u8], addr: &Ipv6Addr) -> bool {
    prefix_contains(node_prefix(public_key), NODE_PREFIX_LEN, *addr)
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
