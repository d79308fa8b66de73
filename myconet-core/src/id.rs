//! The basic types every core shares, defined once: a node's key ([`NodeKey`],
//! [`PUBLIC_KEY_LEN`]), the [`Signer`] that lends the node's private key to a core, and
//! a neighbour's underlay endpoint ([`LinkEndpoint`]).

use std::{
    fmt,
    net::{Ipv6Addr, SocketAddrV6},
    str::FromStr,
};

use myconet_common::addr::is_overlay;
use ring::signature::{Ed25519KeyPair, KeyPair};

/// Length of an Ed25519 public key: a node's static identity on the wire, in routing
/// and in every neighbour table.
pub const PUBLIC_KEY_LEN: usize = 32;

/// A node's Ed25519 public key.
///
/// A newtype rather than a bare array so that it prints as hex (logs, the control API)
/// and cannot be confused with the other 32-byte values around (X25519 keys, digests).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeKey(pub [u8; PUBLIC_KEY_LEN]);

impl NodeKey {
    /// Takes a key from a slice; `None` unless it is exactly [`PUBLIC_KEY_LEN`] bytes, so
    /// callers holding a `&[u8]` (ring's `public_key().as_ref()`) need no panicking copy.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; PUBLIC_KEY_LEN]>::try_from(bytes).ok().map(Self)
    }

    /// The raw key bytes, for signature verification and address derivation.
    pub fn as_bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.0
    }

    /// Lowercase hex, the form the control API and the CLI show keys in.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The overlay address this key owns, to compare with what a beacon announces.
    pub fn node_address(&self) -> Ipv6Addr {
        myconet_common::addr::node_address(&self.0)
    }
}

impl From<[u8; PUBLIC_KEY_LEN]> for NodeKey {
    fn from(bytes: [u8; PUBLIC_KEY_LEN]) -> Self {
        Self(bytes)
    }
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey({})", self.to_hex())
    }
}

impl fmt::Display for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Why a string is not a [`NodeKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NodeKeyError {
    /// Not `2 * PUBLIC_KEY_LEN` ASCII characters (the length found).
    #[error("a node key is {digits} hex digits, not {0} characters", digits = 2 * PUBLIC_KEY_LEN)]
    Length(usize),
    /// A pair of characters that is not a hex byte.
    #[error("not a hex digit pair at offset {0}")]
    Digit(usize),
}

impl FromStr for NodeKey {
    type Err = NodeKeyError;

    /// Parses the 64-digit hex form [`NodeKey`] displays as (either case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 2 * PUBLIC_KEY_LEN || !s.is_ascii() {
            return Err(NodeKeyError::Length(s.len()));
        }
        let mut key = [0u8; PUBLIC_KEY_LEN];
        for (i, b) in key.iter_mut().enumerate() {
            let pair = s.get(2 * i..2 * i + 2).ok_or(NodeKeyError::Digit(2 * i))?;
            *b = u8::from_str_radix(pair, 16).map_err(|_| NodeKeyError::Digit(2 * i))?;
        }
        Ok(Self(key))
    }
}

/// Why an underlay endpoint cannot be a neighbour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// `::`, a multicast address or an IPv4-mapped one cannot be a unicast IPv6 peer.
    #[error("{0} is not a unicast IPv6 address")]
    NotUnicast(Ipv6Addr),
    /// Overlay addresses are reached through Myconet, never used as its underlay.
    #[error("{0} is an overlay address, not an underlay one")]
    Overlay(Ipv6Addr),
    /// Port 0 cannot be sent to.
    #[error("port must not be 0")]
    ZeroPort,
    /// A link-local address means nothing without the interface it lives on.
    #[error("link-local address {0} needs a scope id (interface index)")]
    MissingScope(Ipv6Addr),
}

/// A neighbour's underlay UDP endpoint: address, port and, for link-local addresses, the
/// interface (scope id) it is reachable on.
///
/// The manager keys neighbours by this value, so it is normalised on construction: the
/// scope id is kept only for link-local unicast addresses, where it is part of the
/// address, and dropped elsewhere (the kernel reports 0 there anyway), and flow labels
/// are never part of it. Two reports of the same neighbour therefore always compare
/// equal, whichever socket call produced them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkEndpoint {
    addr: Ipv6Addr,
    port: u16,
    scope_id: u32,
}

impl LinkEndpoint {
    /// Builds a normalised endpoint (see the type documentation).
    pub fn new(addr: Ipv6Addr, port: u16, scope_id: u32) -> Self {
        let scope_id = if addr.is_unicast_link_local() {
            scope_id
        } else {
            0
        };
        Self {
            addr,
            port,
            scope_id,
        }
    }

    /// The underlay address.
    pub fn addr(&self) -> Ipv6Addr {
        self.addr
    }

    /// The underlay UDP port (the neighbour's Myconet data port).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Interface index for link-local addresses, 0 otherwise.
    pub fn scope_id(&self) -> u32 {
        self.scope_id
    }

    /// The socket address to send to (the scope id picks the interface for link-local).
    pub fn socket_addr(&self) -> SocketAddrV6 {
        SocketAddrV6::new(self.addr, self.port, 0, self.scope_id)
    }

    /// The key the XDP peer map holds for this endpoint: address, port and, for a
    /// link-local address, the interface, which the program compares with the one a
    /// packet came in on.
    pub fn peer_key(&self) -> myconet_common::maps::PeerKey {
        myconet_common::maps::PeerKey::new(self.addr.octets(), self.port, self.scope_id)
    }

    /// The endpoint a peer-map key stands for (the inverse of [`LinkEndpoint::peer_key`]).
    pub fn from_peer_key(key: &myconet_common::maps::PeerKey) -> Self {
        Self::new(Ipv6Addr::from(key.addr), key.port, key.ifindex)
    }

    /// Checks that this endpoint can be a neighbour at all, so nonsense from the config
    /// file or the control API is refused before it costs handshakes.
    pub fn validate(&self) -> Result<(), EndpointError> {
        let addr = self.addr;
        if addr.is_unspecified() || addr.is_multicast() || addr.to_ipv4_mapped().is_some() {
            return Err(EndpointError::NotUnicast(addr));
        }
        if is_overlay(&addr) {
            return Err(EndpointError::Overlay(addr));
        }
        if self.port == 0 {
            return Err(EndpointError::ZeroPort);
        }
        if addr.is_unicast_link_local() && self.scope_id == 0 {
            return Err(EndpointError::MissingScope(addr));
        }
        Ok(())
    }
}

impl From<SocketAddrV6> for LinkEndpoint {
    fn from(sa: SocketAddrV6) -> Self {
        Self::new(*sa.ip(), sa.port(), sa.scope_id())
    }
}

impl fmt::Display for LinkEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.scope_id == 0 {
            write!(f, "[{}]:{}", self.addr, self.port)
        } else {
            write!(f, "[{}%{}]:{}", self.addr, self.scope_id, self.port)
        }
    }
}

impl fmt::Debug for LinkEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The node's long-term Ed25519 key as every core needs it: the public key to announce
/// and signatures (handshake transcripts, routing origins, too-big reports, discovery
/// beacons). A trait so no core owns the agent's identity (the shell keeps it and
/// implements this) and tests can use fixed keys.
pub trait Signer: Send + Sync {
    /// The raw 32-byte Ed25519 public key.
    fn public_key(&self) -> &[u8];
    /// An Ed25519 signature over `message`.
    fn sign(&self, message: &[u8]) -> Vec<u8>;
}

impl Signer for Ed25519KeyPair {
    fn public_key(&self) -> &[u8] {
        KeyPair::public_key(self).as_ref()
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        Ed25519KeyPair::sign(self, message).as_ref().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_key_prints_and_parses_back() {
        let key = NodeKey([0xa5; PUBLIC_KEY_LEN]);
        let text = key.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<NodeKey>(), Ok(key));
        assert_eq!(text.to_uppercase().parse::<NodeKey>(), Ok(key));
        assert_eq!("ab".parse::<NodeKey>(), Err(NodeKeyError::Length(2)));
        let bad = format!("{}zz", &text[..62]);
        assert_eq!(bad.parse::<NodeKey>(), Err(NodeKeyError::Digit(62)));
    }
}
