//! The "too big" message (packet type 6), in smoltcp's wire style like [`crate::wire`]:
//! a relay that cannot send a `Data` packet on, because it is larger than the next
//! link's MTU, tells the packet's source so, signed with its node key. The source
//! checks the signature against the key its routing table holds for the relay's /64 and
//! the quote against the packets it really sent, and only then lowers its path MTU
//! towards the destination (the agent's `pmtu` module; `docs/protocol.md`).
//!
//! Layout of the whole datagram (multi-byte fields big-endian):
//!
//! ```text
//!   0..48   Myconet header   type 6, flags 0, session id 0, counter 0;
//!                            destination = the offending packet's source,
//!                            source = the relay's node address
//!  48..50   max datagram     largest Myconet datagram the relay can send on
//!  50..52   quoted length    the offending datagram's length (> max datagram)
//!  52..100  quoted header    the offending packet's Myconet header, hop limit zeroed
//! 100..164  signature        Ed25519 by the relay's node key over SIGNING_CONTEXT
//!                            followed by bytes 0..100 with the hop limit zeroed
//! ```
//!
//! Parsing checks structure only; the signature, the quote and the MTU floor are the
//! receiver's policy.

use core::{fmt, net::Ipv6Addr, ops::Range};

use crate::wire::{self, HEADER_LEN, PacketType, WireError};

/// Exact length of a too-big datagram.
pub const LEN: usize = 164;

/// Length of the Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// Domain separation for the signature: no other signed Myconet message starts so.
pub const SIGNING_CONTEXT: &[u8] = b"myconet 2026-11 too big v1\0";

/// Length of [`Packet::signing_message`].
pub const SIGNING_MESSAGE_LEN: usize = SIGNING_CONTEXT.len() + field::SIGNATURE.start;

/// Byte offsets of the fields after the Myconet header.
pub mod field {
    use super::Range;
    /// Largest Myconet datagram the relay can send on.
    pub const MAX_DATAGRAM: Range<usize> = 48..50;
    /// Length of the offending datagram.
    pub const QUOTED_LEN: Range<usize> = 50..52;
    /// The offending packet's header, hop limit zeroed.
    pub const QUOTED: Range<usize> = 52..100;
    /// Ed25519 signature over the signing context and bytes `..SIGNATURE.start`.
    pub const SIGNATURE: Range<usize> = 100..164;
}

/// Why a buffer is not a structurally valid too-big message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TooBigError {
    /// Not exactly [`LEN`] bytes.
    #[error("too-big message of {0} bytes, must be {LEN}")]
    Length(usize),
    /// The Myconet header (or the quoted one) does not parse.
    #[error("too-big header: {0}")]
    Header(#[from] WireError),
    /// The header's type is not [`PacketType::TooBig`].
    #[error("packet type {0} is not a too-big message")]
    WrongType(u8),
    /// Flags, session id or counter are not zero.
    #[error("too-big header fields that must be zero are not")]
    NonZeroHeader,
    /// The quoted packet is not a `Data` packet, or its hop limit is not zeroed.
    #[error("the quoted packet is not a data packet header")]
    QuotedNotData,
    /// The message is not addressed to the quoted packet's source.
    #[error("too-big message not addressed to the quoted packet's source")]
    WrongDestination,
    /// The quoted length is not larger than the maximum, or shorter than a header.
    #[error("quoted length {quoted} is not too big for {max}")]
    NotTooBig {
        /// The quoted datagram length.
        quoted: u16,
        /// The maximum the relay announced.
        max: u16,
    },
}

/// A read/write view of a too-big datagram.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking its length; accessors may panic on a short one.
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wraps a buffer after checking it is exactly [`LEN`] bytes.
    pub fn new_checked(buffer: T) -> Result<Self, TooBigError> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Ensures every accessor stays in bounds (and nothing trails the message).
    pub fn check_len(&self) -> Result<(), TooBigError> {
        let len = self.buffer.as_ref().len();
        if len == LEN {
            Ok(())
        } else {
            Err(TooBigError::Length(len))
        }
    }

    /// Gives the buffer back.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The Myconet header.
    pub fn header(&self) -> wire::Packet<&[u8]> {
        wire::Packet::new_unchecked(&self.buffer.as_ref()[..HEADER_LEN])
    }

    /// Largest Myconet datagram the relay can send on.
    pub fn max_datagram(&self) -> u16 {
        self.u16_at(field::MAX_DATAGRAM.start)
    }

    /// Length of the offending datagram.
    pub fn quoted_len(&self) -> u16 {
        self.u16_at(field::QUOTED_LEN.start)
    }

    /// The offending packet's header.
    pub fn quoted(&self) -> wire::Packet<&[u8]> {
        wire::Packet::new_unchecked(&self.buffer.as_ref()[field::QUOTED])
    }

    /// The signature bytes.
    pub fn signature(&self) -> &[u8] {
        &self.buffer.as_ref()[field::SIGNATURE]
    }

    /// What the signature covers: [`SIGNING_CONTEXT`], then everything before the
    /// signature with the hop limit (the one byte relays change) zeroed.
    pub fn signing_message(&self) -> [u8; SIGNING_MESSAGE_LEN] {
        let mut out = [0u8; SIGNING_MESSAGE_LEN];
        let (context, signed) = out.split_at_mut(SIGNING_CONTEXT.len());
        context.copy_from_slice(SIGNING_CONTEXT);
        signed.copy_from_slice(&self.buffer.as_ref()[..field::SIGNATURE.start]);
        signed[wire::field::HOP_LIMIT] = 0;
        out
    }

    fn u16_at(&self, at: usize) -> u16 {
        let b = self.buffer.as_ref();
        u16::from_be_bytes([b[at], b[at + 1]])
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// The Myconet header, writable.
    pub fn header_mut(&mut self) -> wire::Packet<&mut [u8]> {
        wire::Packet::new_unchecked(&mut self.buffer.as_mut()[..HEADER_LEN])
    }

    /// Sets the largest datagram the relay can send on.
    pub fn set_max_datagram(&mut self, value: u16) {
        self.buffer.as_mut()[field::MAX_DATAGRAM].copy_from_slice(&value.to_be_bytes());
    }

    /// Sets the offending datagram's length.
    pub fn set_quoted_len(&mut self, value: u16) {
        self.buffer.as_mut()[field::QUOTED_LEN].copy_from_slice(&value.to_be_bytes());
    }

    /// The quoted header, writable.
    pub fn quoted_mut(&mut self) -> wire::Packet<&mut [u8]> {
        wire::Packet::new_unchecked(&mut self.buffer.as_mut()[field::QUOTED])
    }

    /// Sets the signature.
    pub fn set_signature(&mut self, signature: &[u8; SIGNATURE_LEN]) {
        self.buffer.as_mut()[field::SIGNATURE].copy_from_slice(signature);
    }
}

/// A parsed, structurally valid too-big message (signature not yet checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    /// Remaining relay hops of the message itself.
    pub hop_limit: u8,
    /// The relay that could not send the packet on (the header's source).
    pub reporter: Ipv6Addr,
    /// The offending packet's source, to whom the message goes (the header's
    /// destination).
    pub source: Ipv6Addr,
    /// Largest Myconet datagram (header and payload) the relay can send on.
    pub max_datagram: u16,
    /// Length of the offending datagram.
    pub quoted_len: u16,
    /// The offending packet's header (hop limit zero).
    pub quoted: wire::Repr,
    /// The relay's Ed25519 signature.
    pub signature: [u8; SIGNATURE_LEN],
}

impl Repr {
    /// Parses and checks the structure of a too-big message.
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<Self, TooBigError> {
        packet.check_len()?;
        let header = wire::Repr::parse(&packet.header())?;
        if header.packet_type != PacketType::TooBig {
            return Err(TooBigError::WrongType(header.packet_type as u8));
        }
        if header.flags != 0 || header.session_id != 0 || header.counter != 0 {
            return Err(TooBigError::NonZeroHeader);
        }
        let quoted = wire::Repr::parse(&packet.quoted())?;
        if quoted.packet_type != PacketType::Data || quoted.hop_limit != 0 {
            return Err(TooBigError::QuotedNotData);
        }
        if quoted.src_addr != header.dst_addr {
            return Err(TooBigError::WrongDestination);
        }
        let (max, quoted_len) = (packet.max_datagram(), packet.quoted_len());
        if quoted_len <= max || usize::from(quoted_len) < HEADER_LEN {
            return Err(TooBigError::NotTooBig {
                quoted: quoted_len,
                max,
            });
        }
        let mut signature = [0u8; SIGNATURE_LEN];
        signature.copy_from_slice(packet.signature());
        Ok(Self {
            hop_limit: header.hop_limit,
            reporter: header.src_addr,
            source: header.dst_addr,
            max_datagram: max,
            quoted_len,
            quoted,
            signature,
        })
    }

    /// Bytes [`Repr::emit`] writes: always [`LEN`].
    pub const fn buffer_len(&self) -> usize {
        LEN
    }

    /// Writes the whole message (the quoted hop limit zeroed) into a [`LEN`]-byte buffer.
    /// A sender emits with any signature, signs [`Packet::signing_message`] and sets the
    /// signature.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        wire::Repr {
            packet_type: PacketType::TooBig,
            hop_limit: self.hop_limit,
            flags: 0,
            session_id: 0,
            counter: 0,
            dst_addr: self.source,
            src_addr: self.reporter,
        }
        .emit(&mut packet.header_mut());
        packet.set_max_datagram(self.max_datagram);
        packet.set_quoted_len(self.quoted_len);
        wire::Repr {
            hop_limit: 0,
            ..self.quoted
        }
        .emit(&mut packet.quoted_mut());
        packet.set_signature(&self.signature);
    }
}

impl fmt::Display for Repr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "too big from {} to {}: {}-byte datagram to {} (session {:#010x}, counter {}) over a {}-byte maximum",
            self.reporter,
            self.source,
            self.quoted_len,
            self.quoted.dst_addr,
            self.quoted.session_id,
            self.quoted.counter,
            self.max_datagram
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn quoted(counter: u64) -> wire::Repr {
        wire::Repr {
            packet_type: PacketType::Data,
            hop_limit: 0,
            flags: 0,
            session_id: 0x1234_5678,
            counter,
            dst_addr: "fd6d:c::1".parse().unwrap(),
            src_addr: "fd6d:a::1".parse().unwrap(),
        }
    }

    fn sample() -> Repr {
        Repr {
            hop_limit: 64,
            reporter: "fd6d:b::1".parse().unwrap(),
            source: "fd6d:a::1".parse().unwrap(),
            max_datagram: 1372,
            quoted_len: 1448,
            quoted: quoted(7),
            signature: [0x5a; SIGNATURE_LEN],
        }
    }

    fn emitted(repr: &Repr) -> [u8; LEN] {
        let mut buf = [0u8; LEN];
        repr.emit(&mut Packet::new_unchecked(&mut buf[..]));
        buf
    }

    #[test]
    fn emit_writes_the_documented_layout() {
        let buf = emitted(&sample());
        assert_eq!(buf[wire::field::TYPE], 6);
        assert_eq!(buf[wire::field::HOP_LIMIT], 64);
        assert_eq!(&buf[4..16], &[0u8; 12], "session id and counter are zero");
        assert_eq!(&buf[field::MAX_DATAGRAM], &1372u16.to_be_bytes());
        assert_eq!(&buf[field::QUOTED_LEN], &1448u16.to_be_bytes());
        assert_eq!(buf[field::QUOTED.start + wire::field::TYPE], 1);
        assert_eq!(
            &buf[field::QUOTED.start + 4..field::QUOTED.start + 8],
            &0x1234_5678u32.to_be_bytes()
        );
        assert_eq!(&buf[field::SIGNATURE], &[0x5a; SIGNATURE_LEN]);
        let repr = Repr::parse(&Packet::new_checked(&buf[..]).unwrap()).unwrap();
        assert_eq!(repr, sample());
        assert_eq!(
            repr.to_string(),
            "too big from fd6d:b::1 to fd6d:a::1: 1448-byte datagram to fd6d:c::1 \
             (session 0x12345678, counter 7) over a 1372-byte maximum"
        );
    }

    #[test]
    fn the_signing_message_ignores_the_hop_limit_and_nothing_else() {
        let a = emitted(&sample());
        let message = Packet::new_unchecked(&a[..]).signing_message();
        assert!(message.starts_with(SIGNING_CONTEXT));
        let mut b = a;
        b[wire::field::HOP_LIMIT] = 3;
        assert_eq!(Packet::new_unchecked(&b[..]).signing_message(), message);
        for i in 0..field::SIGNATURE.start {
            if i == wire::field::HOP_LIMIT {
                continue;
            }
            let mut c = a;
            c[i] ^= 0x01;
            assert_ne!(
                Packet::new_unchecked(&c[..]).signing_message(),
                message,
                "byte {i} must be signed"
            );
        }
    }

    #[test]
    fn structural_errors_are_named() {
        let good = emitted(&sample());
        let parse = |buf: &[u8]| Repr::parse(&Packet::new_unchecked(buf));
        assert_eq!(parse(&good[..LEN - 1]), Err(TooBigError::Length(LEN - 1)));
        let mut long = [0u8; LEN + 1];
        long[..LEN].copy_from_slice(&good);
        assert_eq!(parse(&long), Err(TooBigError::Length(LEN + 1)));

        let mut b = good;
        b[wire::field::TYPE] = PacketType::Data as u8;
        assert_eq!(parse(&b), Err(TooBigError::WrongType(1)));
        let mut b = good;
        b[wire::field::VERSION] = 9;
        assert_eq!(
            parse(&b),
            Err(TooBigError::Header(WireError::BadVersion(9)))
        );
        for at in [wire::field::FLAGS, 4, 15] {
            let mut b = good;
            b[at] = 1;
            assert_eq!(parse(&b), Err(TooBigError::NonZeroHeader), "byte {at}");
        }
        let mut b = good;
        b[field::QUOTED.start + wire::field::TYPE] = PacketType::Control as u8;
        assert_eq!(parse(&b), Err(TooBigError::QuotedNotData));
        let mut b = good;
        b[field::QUOTED.start + wire::field::HOP_LIMIT] = 1;
        assert_eq!(parse(&b), Err(TooBigError::QuotedNotData));
        let mut b = good;
        b[field::QUOTED.start + wire::field::SRC.start + 3] ^= 1;
        assert_eq!(parse(&b), Err(TooBigError::WrongDestination));

        let mut r = sample();
        r.quoted_len = r.max_datagram;
        assert_eq!(
            parse(&emitted(&r)),
            Err(TooBigError::NotTooBig {
                quoted: 1372,
                max: 1372
            })
        );
    }

    proptest! {
        #[test]
        fn parse_emit_roundtrip(hop_limit: u8, max in 0u16..u16::MAX, extra in 1u16..1000,
                                session_id: u32, counter: u64, signature: [u8; 32]) {
            let mut r = sample();
            r.hop_limit = hop_limit;
            r.max_datagram = max;
            r.quoted_len = max.saturating_add(extra).max(HEADER_LEN as u16);
            prop_assume!(r.quoted_len > max);
            r.quoted.session_id = session_id;
            r.quoted.counter = counter;
            r.signature[..32].copy_from_slice(&signature);
            let buf = emitted(&r);
            prop_assert_eq!(Repr::parse(&Packet::new_checked(&buf[..]).unwrap()), Ok(r));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(repr) = Repr::parse(&Packet::new_unchecked(&bytes[..])) {
                // Whatever parses re-emits to the same bytes.
                prop_assert_eq!(&emitted(&repr)[..], &bytes[..]);
            }
        }
    }
}
