//! The cleartext Myconet header, in smoltcp's wire style: a checked [`Packet`] view over a
//! byte buffer and a [`Repr`] that parses from and emits into it.
//!
//! Layout (all multi-byte fields big-endian, fixed offsets so the XDP program can parse
//! it with one bounds check):
//!
//! ```text
//!  0      version        u8   (VERSION)
//!  1      packet type    u8   (PacketType)
//!  2      hop limit      u8   decremented by every relay; not authenticated
//!  3      flags          u8   carried unchanged by relays
//!  4..8   session id     u32  receiver's session index, 0 outside a session
//!  8..16  counter        u64  AEAD nonce counter, strictly increasing per key
//! 16..32  destination    overlay IPv6 address
//! 32..48  source         overlay IPv6 address
//! 48..    payload        AEAD ciphertext and tag (opaque to relays)
//! ```

use core::net::Ipv6Addr;

/// The only header version this code speaks.
pub const VERSION: u8 = 1;

/// Length of the fixed header in bytes.
pub const HEADER_LEN: usize = 48;

/// Hop limit a sender puts on a fresh packet.
pub const DEFAULT_HOP_LIMIT: u8 = 64;

/// Default underlay UDP port.
pub const DEFAULT_PORT: u16 = 9651;

/// Byte offsets of every header field, shared with the XDP program.
pub mod field {
    use core::ops::Range;
    /// Header version.
    pub const VERSION: usize = 0;
    /// Packet type.
    pub const TYPE: usize = 1;
    /// Hop limit (the one byte relays change).
    pub const HOP_LIMIT: usize = 2;
    /// Flags.
    pub const FLAGS: usize = 3;
    /// Session id.
    pub const SESSION: Range<usize> = 4..8;
    /// Nonce counter.
    pub const COUNTER: Range<usize> = 8..16;
    /// Destination overlay address.
    pub const DST: Range<usize> = 16..32;
    /// Source overlay address.
    pub const SRC: Range<usize> = 32..48;
    /// Start of the payload.
    pub const PAYLOAD: usize = 48;
}

/// What a packet carries; relays fast-path only [`PacketType::Data`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PacketType {
    /// End-to-end encrypted overlay traffic; the only type relayed in the kernel.
    Data = 1,
    /// First handshake message (initiator to responder).
    HandshakeInit = 2,
    /// Second handshake message (responder to initiator).
    HandshakeResponse = 3,
    /// Stateless cookie a loaded responder sends instead of a response.
    CookieReply = 4,
    /// Link-level control between authenticated neighbours (hello, routing, keepalive).
    Control = 5,
    /// A relay's signed report that a `Data` packet was too big for its next link
    /// ([`crate::too_big`]); travels end to end to the packet's source, relayed by
    /// agents like handshakes.
    TooBig = 6,
}

impl PacketType {
    /// Maps a wire byte to a type; `None` for values this version does not define.
    #[inline(always)]
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Data),
            2 => Some(Self::HandshakeInit),
            3 => Some(Self::HandshakeResponse),
            4 => Some(Self::CookieReply),
            5 => Some(Self::Control),
            6 => Some(Self::TooBig),
            _ => None,
        }
    }
}

/// Why a buffer is not a valid Myconet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Shorter than [`HEADER_LEN`].
    #[error("truncated Myconet header: {0} bytes, need {HEADER_LEN}")]
    Truncated(usize),
    /// A version this code does not speak.
    #[error("unsupported Myconet header version {0}")]
    BadVersion(u8),
    /// A packet type this version does not define.
    #[error("unknown Myconet packet type {0}")]
    UnknownType(u8),
}

/// A read/write view of a Myconet header at the start of a buffer.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking its length; accessors may panic on a short one.
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wraps a buffer after checking it holds a whole header.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Ensures every accessor stays in bounds.
    pub fn check_len(&self) -> Result<(), WireError> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            Err(WireError::Truncated(len))
        } else {
            Ok(())
        }
    }

    /// Gives the buffer back.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Header version byte.
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VERSION]
    }

    /// Raw packet type byte.
    pub fn packet_type(&self) -> u8 {
        self.buffer.as_ref()[field::TYPE]
    }

    /// Remaining relay hops.
    pub fn hop_limit(&self) -> u8 {
        self.buffer.as_ref()[field::HOP_LIMIT]
    }

    /// Flag bits.
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    /// Receiver's session index.
    pub fn session_id(&self) -> u32 {
        let b = &self.buffer.as_ref()[field::SESSION];
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }

    /// AEAD nonce counter.
    pub fn counter(&self) -> u64 {
        let mut out = [0u8; 8];
        out.copy_from_slice(&self.buffer.as_ref()[field::COUNTER]);
        u64::from_be_bytes(out)
    }

    /// Destination overlay address.
    pub fn dst_addr(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.addr_bytes(field::DST.start))
    }

    /// Source overlay address.
    pub fn src_addr(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.addr_bytes(field::SRC.start))
    }

    /// Bytes after the header.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::PAYLOAD..]
    }

    /// The associated data an AEAD seals with: the header with the hop limit zeroed,
    /// because relays rewrite that byte and everything else must reach the receiver unchanged.
    pub fn associated_data(&self) -> [u8; HEADER_LEN] {
        let mut aad = [0u8; HEADER_LEN];
        aad.copy_from_slice(&self.buffer.as_ref()[..HEADER_LEN]);
        aad[field::HOP_LIMIT] = 0;
        aad
    }

    fn addr_bytes(&self, start: usize) -> [u8; 16] {
        let mut out = [0u8; 16];
        out.copy_from_slice(&self.buffer.as_ref()[start..start + 16]);
        out
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the version byte.
    pub fn set_version(&mut self, value: u8) {
        self.buffer.as_mut()[field::VERSION] = value;
    }

    /// Sets the packet type byte.
    pub fn set_packet_type(&mut self, value: u8) {
        self.buffer.as_mut()[field::TYPE] = value;
    }

    /// Sets the hop limit.
    pub fn set_hop_limit(&mut self, value: u8) {
        self.buffer.as_mut()[field::HOP_LIMIT] = value;
    }

    /// Sets the flags.
    pub fn set_flags(&mut self, value: u8) {
        self.buffer.as_mut()[field::FLAGS] = value;
    }

    /// Sets the session id.
    pub fn set_session_id(&mut self, value: u32) {
        self.buffer.as_mut()[field::SESSION].copy_from_slice(&value.to_be_bytes());
    }

    /// Sets the nonce counter.
    pub fn set_counter(&mut self, value: u64) {
        self.buffer.as_mut()[field::COUNTER].copy_from_slice(&value.to_be_bytes());
    }

    /// Sets the destination overlay address.
    pub fn set_dst_addr(&mut self, addr: Ipv6Addr) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&addr.octets());
    }

    /// Sets the source overlay address.
    pub fn set_src_addr(&mut self, addr: Ipv6Addr) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&addr.octets());
    }

    /// Mutable bytes after the header.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::PAYLOAD..]
    }
}

/// A parsed, validated Myconet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Repr {
    /// What the packet carries.
    pub packet_type: PacketType,
    /// Remaining relay hops.
    pub hop_limit: u8,
    /// Flag bits (none defined in version 1; carried unchanged).
    pub flags: u8,
    /// Receiver's session index.
    pub session_id: u32,
    /// AEAD nonce counter.
    pub counter: u64,
    /// Destination overlay address.
    pub dst_addr: Ipv6Addr,
    /// Source overlay address.
    pub src_addr: Ipv6Addr,
}

impl Repr {
    /// Parses and validates a header.
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<Self, WireError> {
        packet.check_len()?;
        if packet.version() != VERSION {
            return Err(WireError::BadVersion(packet.version()));
        }
        let packet_type = PacketType::from_u8(packet.packet_type())
            .ok_or(WireError::UnknownType(packet.packet_type()))?;
        Ok(Self {
            packet_type,
            hop_limit: packet.hop_limit(),
            flags: packet.flags(),
            session_id: packet.session_id(),
            counter: packet.counter(),
            dst_addr: packet.dst_addr(),
            src_addr: packet.src_addr(),
        })
    }

    /// Bytes [`Repr::emit`] writes.
    pub const fn header_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes the header into the first [`HEADER_LEN`] bytes of the packet.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        packet.set_version(VERSION);
        packet.set_packet_type(self.packet_type as u8);
        packet.set_hop_limit(self.hop_limit);
        packet.set_flags(self.flags);
        packet.set_session_id(self.session_id);
        packet.set_counter(self.counter);
        packet.set_dst_addr(self.dst_addr);
        packet.set_src_addr(self.src_addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn packet_type() -> impl Strategy<Value = PacketType> {
        prop_oneof![
            Just(PacketType::Data),
            Just(PacketType::HandshakeInit),
            Just(PacketType::HandshakeResponse),
            Just(PacketType::CookieReply),
            Just(PacketType::Control),
            Just(PacketType::TooBig),
        ]
    }

    prop_compose! {
        fn repr()(packet_type in packet_type(), hop_limit: u8, flags: u8, session_id: u32,
                  counter: u64, dst: [u8; 16], src: [u8; 16]) -> Repr {
            Repr { packet_type, hop_limit, flags, session_id, counter,
                   dst_addr: Ipv6Addr::from(dst), src_addr: Ipv6Addr::from(src) }
        }
    }

    proptest! {
        #[test]
        fn parse_emit_roundtrip(repr in repr(), payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut buf = vec![0u8; HEADER_LEN + payload.len()];
            buf[HEADER_LEN..].copy_from_slice(&payload);
            let mut packet = Packet::new_checked(&mut buf[..]).unwrap();
            repr.emit(&mut packet);
            let packet = Packet::new_checked(&buf[..]).unwrap();
            prop_assert_eq!(Repr::parse(&packet).unwrap(), repr);
            prop_assert_eq!(packet.payload(), &payload[..]);
        }

        #[test]
        fn truncated_is_rejected(repr in repr(), cut in 0usize..HEADER_LEN) {
            let mut buf = [0u8; HEADER_LEN];
            repr.emit(&mut Packet::new_unchecked(&mut buf[..]));
            prop_assert_eq!(Packet::new_checked(&buf[..cut]).unwrap_err(), WireError::Truncated(cut));
            prop_assert!(Repr::parse(&Packet::new_unchecked(&buf[..cut])).is_err());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let packet = Packet::new_unchecked(&bytes[..]);
            match Repr::parse(&packet) {
                Ok(repr) => {
                    // Whatever parses re-emits to the same header bytes.
                    let mut out = [0u8; HEADER_LEN];
                    repr.emit(&mut Packet::new_unchecked(&mut out[..]));
                    prop_assert_eq!(&out[..], &bytes[..HEADER_LEN]);
                }
                Err(WireError::Truncated(n)) => prop_assert!(n < HEADER_LEN),
                Err(WireError::BadVersion(v)) => prop_assert_ne!(v, VERSION),
                Err(WireError::UnknownType(t)) => prop_assert!(PacketType::from_u8(t).is_none()),
            }
        }

        #[test]
        fn associated_data_ignores_hop_limit(repr in repr(), other_hops: u8) {
            let mut a = [0u8; HEADER_LEN];
            repr.emit(&mut Packet::new_unchecked(&mut a[..]));
            let mut b = a;
            b[field::HOP_LIMIT] = other_hops;
            prop_assert_eq!(Packet::new_unchecked(&a[..]).associated_data(),
                            Packet::new_unchecked(&b[..]).associated_data());
        }
    }

    #[test]
    fn bad_version_and_type_are_named() {
        let mut buf = [0u8; HEADER_LEN];
        buf[field::VERSION] = 2;
        buf[field::TYPE] = 1;
        assert_eq!(
            Repr::parse(&Packet::new_unchecked(&buf[..])),
            Err(WireError::BadVersion(2))
        );
        buf[field::VERSION] = VERSION;
        buf[field::TYPE] = 0xee;
        assert_eq!(
            Repr::parse(&Packet::new_unchecked(&buf[..])),
            Err(WireError::UnknownType(0xee))
        );
    }

    #[test]
    fn associated_data_covers_everything_else() {
        let a = [0u8; HEADER_LEN];
        for i in 0..HEADER_LEN {
            if i == field::HOP_LIMIT {
                continue;
            }
            let mut b = a;
            b[i] ^= 0x80;
            assert_ne!(
                Packet::new_unchecked(&a[..]).associated_data(),
                Packet::new_unchecked(&b[..]).associated_data(),
                "byte {i} must be authenticated"
            );
        }
    }
}
