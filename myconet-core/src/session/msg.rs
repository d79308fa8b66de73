//! Byte layouts of the three handshake messages behind the 48-byte Myconet header, with
//! fixed offsets (see `docs/handshake.md`; this is handshake version 2). Parsing only
//! checks structure; every cryptographic check is in `handshake`.
//!
//! Messages have exact lengths, and every message a responder sends is shorter than the
//! init that caused it, so a spoofed init can never be amplified.

use std::{
    net::{Ipv6Addr, SocketAddr, SocketAddrV6},
    ops::Range,
};

use myconet_common::wire::{DEFAULT_HOP_LIMIT, Packet, PacketType, Repr};

use super::{HandshakeError, PUBLIC_KEY_LEN, SIGNATURE_LEN};

/// Length of a cookie: a full HMAC-SHA256 tag, so ring's constant-time verify applies.
pub(crate) const COOKIE_LEN: usize = 32;

/// Length of the init digest a cookie reply echoes.
pub(crate) const ECHO_LEN: usize = 16;

/// Length of an underlay endpoint on the wire: IPv6 address and port.
pub(crate) const ENDPOINT_LEN: usize = 18;

/// An underlay endpoint as a link handshake names it: the address and port, without the
/// scope (an interface index means nothing on the other host). All zero on the wire
/// means "none" (end-to-end handshakes, which cross relays, name none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WireEndpoint {
    /// The IPv6 address.
    pub addr: Ipv6Addr,
    /// The UDP port.
    pub port: u16,
}

impl WireEndpoint {
    /// The endpoint of a socket address; IPv4 is never a Myconet underlay.
    pub fn of(addr: SocketAddr) -> Option<Self> {
        match addr {
            SocketAddr::V6(a) => Some(Self::from(a)),
            SocketAddr::V4(_) => None,
        }
    }

    fn to_bytes(self) -> [u8; ENDPOINT_LEN] {
        let mut out = [0u8; ENDPOINT_LEN];
        out[..16].copy_from_slice(&self.addr.octets());
        out[16..].copy_from_slice(&self.port.to_be_bytes());
        out
    }

    fn from_bytes(bytes: [u8; ENDPOINT_LEN]) -> Option<Self> {
        if bytes == [0; ENDPOINT_LEN] {
            return None;
        }
        let mut addr = [0u8; 16];
        addr.copy_from_slice(&bytes[..16]);
        Some(Self {
            addr: Ipv6Addr::from(addr),
            port: u16::from_be_bytes([bytes[16], bytes[17]]),
        })
    }
}

impl From<SocketAddrV6> for WireEndpoint {
    fn from(a: SocketAddrV6) -> Self {
        Self {
            addr: *a.ip(),
            port: a.port(),
        }
    }
}

impl std::fmt::Display for WireEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}]:{}", self.addr, self.port)
    }
}

/// The on-wire bytes of an optional endpoint (all zero for none).
pub(crate) fn endpoint_bytes(endpoint: Option<WireEndpoint>) -> [u8; ENDPOINT_LEN] {
    endpoint.map_or([0; ENDPOINT_LEN], WireEndpoint::to_bytes)
}

/// HandshakeInit payload offsets (from the start of the datagram).
pub(crate) mod init {
    use super::Range;
    /// Initiator's receiver index.
    pub(crate) const SENDER_INDEX: Range<usize> = 48..52;
    /// Initiator's Ed25519 public key.
    pub(crate) const STATIC_KEY: Range<usize> = 52..84;
    /// Initiator's X25519 ephemeral public key.
    pub(crate) const EPHEMERAL: Range<usize> = 84..116;
    /// Offered suites, preference order, 0 = empty slot.
    pub(crate) const SUITES: Range<usize> = 116..118;
    /// Initiator's timestamp: nanoseconds since the Unix epoch on its clock, strictly
    /// increasing per initiator (the responder refuses one that is not newer).
    pub(crate) const TIMESTAMP: Range<usize> = 118..126;
    /// The underlay endpoint a link handshake was sent to; zero end to end.
    pub(crate) const ENDPOINT: Range<usize> = 126..144;
    /// Cookie from a CookieReply, all zero when none.
    pub(crate) const COOKIE: Range<usize> = 144..176;
    /// Signature over h1.
    pub(crate) const SIGNATURE: Range<usize> = 176..240;
    /// Total length.
    pub(crate) const LEN: usize = 240;
}

/// HandshakeResponse payload offsets.
pub(crate) mod response {
    use super::Range;
    /// Responder's receiver index.
    pub(crate) const SENDER_INDEX: Range<usize> = 48..52;
    /// Responder's Ed25519 public key.
    pub(crate) const STATIC_KEY: Range<usize> = 52..84;
    /// Responder's X25519 ephemeral public key.
    pub(crate) const EPHEMERAL: Range<usize> = 84..116;
    /// Chosen suite.
    pub(crate) const SUITE: usize = 116;
    /// The underlay endpoint a link init came from, as the responder saw it; zero end to
    /// end.
    pub(crate) const ENDPOINT: Range<usize> = 117..135;
    /// Signature over h2.
    pub(crate) const SIGNATURE: Range<usize> = 135..199;
    /// Total length.
    pub(crate) const LEN: usize = 199;
}

/// CookieReply payload offsets.
pub(crate) mod cookie_reply {
    use super::Range;
    /// First 16 bytes of SHA-256 over the init being answered.
    pub(crate) const ECHO: Range<usize> = 48..64;
    /// The cookie.
    pub(crate) const COOKIE: Range<usize> = 64..96;
    /// Total length.
    pub(crate) const LEN: usize = 96;
}

/// A structurally valid HandshakeInit.
#[derive(Debug, Clone)]
pub(crate) struct InitMsg {
    pub header: Repr,
    pub sender_index: u32,
    pub static_key: [u8; PUBLIC_KEY_LEN],
    pub ephemeral: [u8; 32],
    pub suites: [u8; 2],
    pub timestamp: u64,
    pub endpoint: Option<WireEndpoint>,
    pub cookie: Option<[u8; COOKIE_LEN]>,
    pub signature: [u8; SIGNATURE_LEN],
    /// The message without its signature, hop limit zeroed: what is signed and hashed.
    pub signed: Vec<u8>,
}

/// A structurally valid HandshakeResponse.
#[derive(Debug, Clone)]
pub(crate) struct ResponseMsg {
    pub header: Repr,
    pub sender_index: u32,
    pub static_key: [u8; PUBLIC_KEY_LEN],
    pub ephemeral: [u8; 32],
    pub suite: u8,
    pub endpoint: Option<WireEndpoint>,
    pub signature: [u8; SIGNATURE_LEN],
    /// The message without the signature, hop limit zeroed.
    pub signed: Vec<u8>,
}

/// A structurally valid CookieReply.
#[derive(Debug, Clone)]
pub(crate) struct CookieReplyMsg {
    pub header: Repr,
    pub echo: [u8; ECHO_LEN],
    pub cookie: [u8; COOKIE_LEN],
}

fn array<const N: usize>(buf: &[u8], range: Range<usize>) -> Result<[u8; N], HandshakeError> {
    buf.get(range)
        .and_then(|s| <[u8; N]>::try_from(s).ok())
        .ok_or(HandshakeError::Malformed("field out of bounds"))
}

fn u32_at(buf: &[u8], range: Range<usize>) -> Result<u32, HandshakeError> {
    array::<4>(buf, range).map(u32::from_be_bytes)
}

/// Parses the header and checks type and exact length.
fn header(buf: &[u8], ty: PacketType, len: usize) -> Result<Repr, HandshakeError> {
    let packet = Packet::new_checked(buf).map_err(|_| HandshakeError::Malformed("header"))?;
    let repr = Repr::parse(&packet).map_err(|_| HandshakeError::Malformed("header"))?;
    if repr.packet_type != ty {
        return Err(HandshakeError::Malformed("packet type"));
    }
    if buf.len() != len {
        return Err(HandshakeError::Malformed("length"));
    }
    if repr.counter != 0 {
        return Err(HandshakeError::Malformed("counter must be zero"));
    }
    Ok(repr)
}

/// The first `end` bytes of `buf` with the hop limit zeroed: what signatures cover.
fn signed_part(buf: &[u8], end: usize) -> Vec<u8> {
    let mut out = buf.get(..end).unwrap_or(buf).to_vec();
    if let Some(b) = out.get_mut(myconet_common::wire::field::HOP_LIMIT) {
        *b = 0;
    }
    out
}

/// A fresh handshake header; the hop limit is the only field relays may change.
pub(crate) fn new_header(ty: PacketType, session_id: u32, dst: Ipv6Addr, src: Ipv6Addr) -> Repr {
    Repr {
        packet_type: ty,
        hop_limit: DEFAULT_HOP_LIMIT,
        flags: 0,
        session_id,
        counter: 0,
        dst_addr: dst,
        src_addr: src,
    }
}

impl InitMsg {
    /// Parses a HandshakeInit; its header must carry session id 0 and counter 0.
    pub(crate) fn parse(buf: &[u8]) -> Result<Self, HandshakeError> {
        let header = header(buf, PacketType::HandshakeInit, init::LEN)?;
        if header.session_id != 0 {
            return Err(HandshakeError::Malformed("init session id must be zero"));
        }
        let sender_index = u32_at(buf, init::SENDER_INDEX)?;
        if sender_index == 0 {
            return Err(HandshakeError::Malformed("zero sender index"));
        }
        let cookie: [u8; COOKIE_LEN] = array(buf, init::COOKIE)?;
        Ok(Self {
            header,
            sender_index,
            static_key: array(buf, init::STATIC_KEY)?,
            ephemeral: array(buf, init::EPHEMERAL)?,
            suites: array(buf, init::SUITES)?,
            timestamp: array(buf, init::TIMESTAMP).map(u64::from_be_bytes)?,
            endpoint: WireEndpoint::from_bytes(array(buf, init::ENDPOINT)?),
            cookie: (cookie != [0; COOKIE_LEN]).then_some(cookie),
            signature: array(buf, init::SIGNATURE)?,
            signed: signed_part(buf, init::SIGNATURE.start),
        })
    }

    /// Writes everything but the signature; returns the buffer and its signed part.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn emit_unsigned(
        header: &Repr,
        sender_index: u32,
        static_key: &[u8; PUBLIC_KEY_LEN],
        ephemeral: &[u8; 32],
        suites: [u8; 2],
        timestamp: u64,
        endpoint: Option<WireEndpoint>,
        cookie: Option<&[u8; COOKIE_LEN]>,
    ) -> (Vec<u8>, Vec<u8>) {
        let mut buf = vec![0u8; init::LEN];
        header.emit(&mut Packet::new_unchecked(&mut buf[..]));
        buf[init::SENDER_INDEX].copy_from_slice(&sender_index.to_be_bytes());
        buf[init::STATIC_KEY].copy_from_slice(static_key);
        buf[init::EPHEMERAL].copy_from_slice(ephemeral);
        buf[init::SUITES].copy_from_slice(&suites);
        buf[init::TIMESTAMP].copy_from_slice(&timestamp.to_be_bytes());
        buf[init::ENDPOINT].copy_from_slice(&endpoint_bytes(endpoint));
        if let Some(cookie) = cookie {
            buf[init::COOKIE].copy_from_slice(cookie);
        }
        let signed = signed_part(&buf, init::SIGNATURE.start);
        (buf, signed)
    }
}

impl ResponseMsg {
    /// Parses a HandshakeResponse.
    pub(crate) fn parse(buf: &[u8]) -> Result<Self, HandshakeError> {
        let header = header(buf, PacketType::HandshakeResponse, response::LEN)?;
        let sender_index = u32_at(buf, response::SENDER_INDEX)?;
        if sender_index == 0 {
            return Err(HandshakeError::Malformed("zero sender index"));
        }
        Ok(Self {
            header,
            sender_index,
            static_key: array(buf, response::STATIC_KEY)?,
            ephemeral: array(buf, response::EPHEMERAL)?,
            suite: buf
                .get(response::SUITE)
                .copied()
                .ok_or(HandshakeError::Malformed("suite"))?,
            endpoint: WireEndpoint::from_bytes(array(buf, response::ENDPOINT)?),
            signature: array(buf, response::SIGNATURE)?,
            signed: signed_part(buf, response::SIGNATURE.start),
        })
    }

    /// Writes everything but the signature; returns the buffer and its signed part.
    pub(crate) fn emit_unsigned(
        header: &Repr,
        sender_index: u32,
        static_key: &[u8; PUBLIC_KEY_LEN],
        ephemeral: &[u8; 32],
        suite: u8,
        endpoint: Option<WireEndpoint>,
    ) -> (Vec<u8>, Vec<u8>) {
        let mut buf = vec![0u8; response::LEN];
        header.emit(&mut Packet::new_unchecked(&mut buf[..]));
        buf[response::SENDER_INDEX].copy_from_slice(&sender_index.to_be_bytes());
        buf[response::STATIC_KEY].copy_from_slice(static_key);
        buf[response::EPHEMERAL].copy_from_slice(ephemeral);
        buf[response::SUITE] = suite;
        buf[response::ENDPOINT].copy_from_slice(&endpoint_bytes(endpoint));
        let signed = signed_part(&buf, response::SIGNATURE.start);
        (buf, signed)
    }
}

impl CookieReplyMsg {
    /// Parses a CookieReply.
    pub(crate) fn parse(buf: &[u8]) -> Result<Self, HandshakeError> {
        let header = header(buf, PacketType::CookieReply, cookie_reply::LEN)?;
        Ok(Self {
            header,
            echo: array(buf, cookie_reply::ECHO)?,
            cookie: array(buf, cookie_reply::COOKIE)?,
        })
    }

    /// Writes a complete CookieReply.
    pub(crate) fn emit(header: &Repr, echo: &[u8; ECHO_LEN], cookie: &[u8; COOKIE_LEN]) -> Vec<u8> {
        let mut buf = vec![0u8; cookie_reply::LEN];
        header.emit(&mut Packet::new_unchecked(&mut buf[..]));
        buf[cookie_reply::ECHO].copy_from_slice(echo);
        buf[cookie_reply::COOKIE].copy_from_slice(cookie);
        buf
    }
}

/// Writes a signature into its slot of a message built by `emit_unsigned`.
pub(crate) fn put_signature(buf: &mut [u8], range: Range<usize>, signature: &[u8; SIGNATURE_LEN]) {
    if let Some(slot) = buf.get_mut(range) {
        slot.copy_from_slice(signature);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use myconet_common::wire::HEADER_LEN;

    #[test]
    fn layouts_are_contiguous_and_never_amplify() {
        assert_eq!(init::SENDER_INDEX.start, HEADER_LEN);
        assert_eq!(init::STATIC_KEY.start, init::SENDER_INDEX.end);
        assert_eq!(init::EPHEMERAL.start, init::STATIC_KEY.end);
        assert_eq!(init::SUITES.start, init::EPHEMERAL.end);
        assert_eq!(init::TIMESTAMP.start, init::SUITES.end);
        assert_eq!(init::ENDPOINT.start, init::TIMESTAMP.end);
        assert_eq!(init::ENDPOINT.len(), ENDPOINT_LEN);
        assert_eq!(init::COOKIE.start, init::ENDPOINT.end);
        assert_eq!(init::SIGNATURE.start, init::COOKIE.end);
        // The XDP program's handshake gate reads the cookie at the same place.
        assert_eq!(init::COOKIE.start, myconet_common::maps::INIT_COOKIE_OFFSET);
        assert_eq!(init::COOKIE.len(), myconet_common::maps::INIT_COOKIE_LEN);
        assert_eq!(init::LEN, init::SIGNATURE.end);
        assert_eq!(response::SENDER_INDEX.start, HEADER_LEN);
        assert_eq!(response::STATIC_KEY.start, response::SENDER_INDEX.end);
        assert_eq!(response::EPHEMERAL.start, response::STATIC_KEY.end);
        assert_eq!(response::SUITE, response::EPHEMERAL.end);
        assert_eq!(response::ENDPOINT.start, response::SUITE + 1);
        assert_eq!(response::ENDPOINT.len(), ENDPOINT_LEN);
        assert_eq!(response::SIGNATURE.start, response::ENDPOINT.end);
        assert_eq!(response::LEN, response::SIGNATURE.end);
        assert_eq!(cookie_reply::ECHO.start, HEADER_LEN);
        assert_eq!(cookie_reply::COOKIE.start, cookie_reply::ECHO.end);
        assert_eq!(cookie_reply::LEN, cookie_reply::COOKIE.end);
        const { assert!(response::LEN < init::LEN) };
        const { assert!(cookie_reply::LEN < init::LEN) };
    }
}
