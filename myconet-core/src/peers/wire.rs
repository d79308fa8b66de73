//! Plaintext of link-level control messages, in the `Repr` style of `myconet_common::wire`:
//! a parsed value that checks every length on the way in and emits into a caller's buffer.
//!
//! Hello, hello-ack and keepalive travel between authenticated neighbours as the payload
//! of Myconet packets of type `Control` (header `session_id` = the link session's
//! receiver index); the session layer seals and opens them, this module only defines the
//! bytes inside. Discovery beacons travel in the clear on link-local multicast and carry
//! their own Ed25519 signature instead.
//!
//! Every message starts with the same 4-byte header:
//!
//! ```text
//!  0      version        u8   (LINK_MESSAGE_VERSION)
//!  1      kind           u8   (Kind)
//!  2..4   body length    u16  big-endian, exactly the kind's fixed body length in v1
//!  4..    body
//! ```
//!
//! Bodies (all integers big-endian):
//!
//! ```text
//! Hello (62):      0..32 sender's node public key   32..36 sequence
//!                  36..44 send time, µs of the sender's monotonic clock
//!                  44..60 the receiver's underlay address as the sender sees it
//!                  60..62 the receiver's underlay port as the sender sees it
//! HelloAck (16):   0..4 echoed sequence   4..12 echoed send time   12..16 ack delay µs
//! Keepalive (0):   empty
//! Beacon (122):    0..32 node public key   32..48 overlay address   48..50 data port
//!                  50..58 timestamp, µs since the Unix epoch (strictly increasing)
//!                  58..122 Ed25519 signature over BEACON_SIGNING_CONTEXT || bytes 0..62
//!                          of the message (header and body up to the signature)
//! ```
//!
//! The hello-ack echoes the sender's own timestamp, so the sender computes the RTT from
//! its own clock alone; the clocks of the two neighbours never need to agree.

use std::net::Ipv6Addr;

use myconet_common::addr::key_owns;
use ring::signature::{ED25519, UnparsedPublicKey};

use crate::id::{NodeKey, PUBLIC_KEY_LEN, Signer};

/// The only control-message version this code speaks.
pub const LINK_MESSAGE_VERSION: u8 = 1;

/// Length of the common header in front of every body.
pub const LINK_HEADER_LEN: usize = 4;

/// Body length of a [`Hello`].
pub const HELLO_BODY_LEN: usize = PUBLIC_KEY_LEN + 4 + 8 + 16 + 2;

/// Body length of a [`HelloAck`].
pub const HELLO_ACK_BODY_LEN: usize = 4 + 8 + 4;

/// Body length of a keepalive.
pub const KEEPALIVE_BODY_LEN: usize = 0;

/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// Body length of a beacon without its signature (what the signature covers).
pub const BEACON_UNSIGNED_BODY_LEN: usize = PUBLIC_KEY_LEN + 16 + 2 + 8;

/// Body length of a [`SignedBeacon`].
pub const BEACON_BODY_LEN: usize = BEACON_UNSIGNED_BODY_LEN + SIGNATURE_LEN;

/// Longest control message this version defines; receive buffers need no more.
pub const MAX_LINK_MESSAGE_LEN: usize = LINK_HEADER_LEN + BEACON_BODY_LEN;

/// Domain separation for beacon signatures. The node key also signs handshakes and
/// route announcements; the context makes a beacon signature useless as anything else
/// and vice versa. Versioned like the address derivation context.
pub const BEACON_SIGNING_CONTEXT: &[u8] = b"myconet 2026-11 discovery beacon v1\0";

/// Length of what a beacon signature covers.
const SIGNED_LEN: usize = BEACON_SIGNING_CONTEXT.len() + LINK_HEADER_LEN + BEACON_UNSIGNED_BODY_LEN;

/// Kind byte of a routing frame: the routing core's payload (`crate::routing`), variable
/// length, carried in the same 4-byte header as the fixed-size control messages.
pub const KIND_ROUTING: u8 = 5;

/// Frames a routing payload for a link session; `None` if it exceeds the 16-bit length.
pub fn frame_routing(payload: &[u8]) -> Option<Vec<u8>> {
    let len = u16::try_from(payload.len()).ok()?;
    let mut out = Vec::with_capacity(LINK_HEADER_LEN + payload.len());
    out.extend_from_slice(&[LINK_MESSAGE_VERSION, KIND_ROUTING]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Some(out)
}

/// The routing payload if `bytes` is a routing frame: `None` for other kinds,
/// `Some(Err)` for a routing frame whose header is wrong.
pub fn routing_payload(bytes: &[u8]) -> Option<Result<&[u8], LinkMessageError>> {
    let (header, body) = bytes.split_first_chunk::<LINK_HEADER_LEN>()?;
    let [version, kind, len_hi, len_lo] = *header;
    if kind != KIND_ROUTING {
        return None;
    }
    if version != LINK_MESSAGE_VERSION {
        return Some(Err(LinkMessageError::BadVersion(version)));
    }
    let declared = usize::from(u16::from_be_bytes([len_hi, len_lo]));
    Some(match declared.cmp(&body.len()) {
        std::cmp::Ordering::Equal => Ok(body),
        std::cmp::Ordering::Less => Err(LinkMessageError::Trailing(body.len() - declared)),
        std::cmp::Ordering::Greater => Err(LinkMessageError::Truncated {
            len: bytes.len(),
            need: LINK_HEADER_LEN + declared,
        }),
    })
}

/// Which control message a buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Liveness and RTT probe between authenticated neighbours.
    Hello = 1,
    /// Answer to a hello, echoing its sequence and timestamp.
    HelloAck = 2,
    /// Empty liveness signal; also confirms a fresh link session to the responder.
    Keepalive = 3,
    /// Signed link-local discovery announcement, sent in the clear.
    Beacon = 4,
}

impl Kind {
    /// Maps a wire byte to a kind; `None` for values this version does not define
    /// (routing messages will take new values).
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Hello),
            2 => Some(Self::HelloAck),
            3 => Some(Self::Keepalive),
            4 => Some(Self::Beacon),
            _ => None,
        }
    }

    /// The fixed body length of this kind in version 1.
    pub const fn body_len(self) -> usize {
        match self {
            Self::Hello => HELLO_BODY_LEN,
            Self::HelloAck => HELLO_ACK_BODY_LEN,
            Self::Keepalive => KEEPALIVE_BODY_LEN,
            Self::Beacon => BEACON_BODY_LEN,
        }
    }
}

/// Why bytes are not a valid control message, or a buffer too small to emit into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkMessageError {
    /// Shorter than the header plus the body length the header declares.
    #[error("truncated control message: {len} bytes, need {need}")]
    Truncated {
        /// Bytes present.
        len: usize,
        /// Bytes required.
        need: usize,
    },
    /// A version this code does not speak.
    #[error("unsupported control message version {0}")]
    BadVersion(u8),
    /// A kind this version does not define.
    #[error("unknown control message kind {0}")]
    UnknownKind(u8),
    /// The declared body length is not the kind's fixed length.
    #[error("{kind:?} body must be {expected} bytes, header says {declared}")]
    BadLength {
        /// The message kind.
        kind: Kind,
        /// Length in the header.
        declared: usize,
        /// Length the kind requires.
        expected: usize,
    },
    /// Bytes after the declared body (a v1 message is exactly header plus body).
    #[error("{0} trailing bytes after the control message")]
    Trailing(usize),
    /// The output buffer cannot hold the message.
    #[error("buffer of {have} bytes cannot hold a {need}-byte control message")]
    BufferTooSmall {
        /// Bytes available.
        have: usize,
        /// Bytes required.
        need: usize,
    },
}

/// Why a well-formed beacon is not believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BeaconError {
    /// The announced overlay address does not lie in the /64 the announced key owns.
    #[error("beacon key does not own the announced overlay address")]
    WrongAddress,
    /// The signature does not verify under the announced key.
    #[error("beacon signature does not verify")]
    BadSignature,
}

/// Liveness and RTT probe. The receiver answers with a [`HelloAck`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hello {
    /// The sender's node key; must match the key the link session authenticated.
    pub node_key: NodeKey,
    /// Per-neighbour sequence number, echoed by the ack to match it to this hello.
    pub sequence: u32,
    /// Send time in µs of the sender's own monotonic clock, echoed by the ack.
    pub timestamp_us: u64,
    /// The receiver's underlay address as the sender sees it (tells a node how its
    /// neighbours reach it, e.g. behind address translation or with several addresses).
    pub observed_addr: Ipv6Addr,
    /// The receiver's underlay port as the sender sees it.
    pub observed_port: u16,
}

/// Answer to a [`Hello`]: everything needed to compute an RTT on the hello's sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HelloAck {
    /// The hello's sequence number.
    pub sequence: u32,
    /// The hello's timestamp, unchanged.
    pub echoed_timestamp_us: u64,
    /// How long the acker held the hello before answering, subtracted from the RTT
    /// sample so a slow agent does not look like a slow link.
    pub ack_delay_us: u32,
}

/// A discovery announcement, unsigned: who is on this link and where to reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Beacon {
    /// The announcing node's key.
    pub node_key: NodeKey,
    /// The node's overlay address; must lie in the /64 the key owns.
    pub overlay_addr: Ipv6Addr,
    /// The node's Myconet data port (the beacon's own UDP port is the discovery port).
    pub port: u16,
    /// Microseconds since the Unix epoch on the sender, strictly increasing per key, so
    /// receivers can reject replays of older beacons.
    pub timestamp_us: u64,
}

/// A beacon as it travels: the announcement plus the node's signature over it.
///
/// Parsing does not verify; [`SignedBeacon::verify`] does, and nothing should use the
/// contents before it succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SignedBeacon {
    /// The announcement as sent.
    pub beacon: Beacon,
    /// Ed25519 signature over [`BEACON_SIGNING_CONTEXT`] and the encoded announcement.
    pub signature: [u8; SIGNATURE_LEN],
}

/// One parsed control message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkMessage {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`HelloAck`].
    HelloAck(HelloAck),
    /// Empty liveness signal.
    Keepalive,
    /// See [`SignedBeacon`].
    Beacon(SignedBeacon),
}

/// A cursor over a body whose length was checked before, so reads cannot run past it.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        // Lengths were checked against the kind's fixed body length before any read,
        // so `split_at_checked` never fails; if it ever did, zeros are read rather than
        // panicking on peer-controlled input.
        if let Some((head, rest)) = self.bytes.split_at_checked(N) {
            out.copy_from_slice(head);
            self.bytes = rest;
        }
        out
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.take())
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.take())
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.take())
    }

    fn addr(&mut self) -> Ipv6Addr {
        Ipv6Addr::from(self.take::<16>())
    }

    fn key(&mut self) -> NodeKey {
        NodeKey(self.take())
    }
}

/// Appends fields to a buffer whose length was checked before.
struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        let end = self.pos + bytes.len();
        if let Some(dst) = self.buf.get_mut(self.pos..end) {
            dst.copy_from_slice(bytes);
        }
        self.pos = end;
    }
}

impl Beacon {
    /// The announcement a node makes about itself: its key, the address that key owns
    /// and its data port. Deriving both from the key pair means a node cannot announce
    /// anything its own verification would reject.
    pub fn for_key(key: &dyn Signer, port: u16, timestamp_us: u64) -> Option<Self> {
        let node_key = NodeKey::from_slice(key.public_key())?;
        Some(Self {
            node_key,
            overlay_addr: node_key.node_address(),
            port,
            timestamp_us,
        })
    }

    /// The exact bytes the signature covers: the context, then the message header and
    /// the body up to the signature.
    fn signed_bytes(&self) -> [u8; SIGNED_LEN] {
        let mut out = [0u8; SIGNED_LEN];
        let mut w = Writer {
            buf: &mut out,
            pos: 0,
        };
        w.put(BEACON_SIGNING_CONTEXT);
        write_header(&mut w, Kind::Beacon);
        self.write_unsigned(&mut w);
        out
    }

    fn write_unsigned(&self, w: &mut Writer<'_>) {
        w.put(self.node_key.as_bytes());
        w.put(&self.overlay_addr.octets());
        w.put(&self.port.to_be_bytes());
        w.put(&self.timestamp_us.to_be_bytes());
    }

    /// Signs the announcement with `key`. Signing does not check that `key` matches
    /// `node_key`; a mismatch simply fails verification everywhere.
    pub fn sign(&self, key: &dyn Signer) -> SignedBeacon {
        let sig = key.sign(&self.signed_bytes());
        let mut signature = [0u8; SIGNATURE_LEN];
        // Ed25519 signatures are always 64 bytes; copy defensively all the same.
        let n = sig.len().min(SIGNATURE_LEN);
        signature[..n].copy_from_slice(&sig[..n]);
        SignedBeacon {
            beacon: *self,
            signature,
        }
    }
}

impl SignedBeacon {
    /// Checks that the key owns the announced overlay address (cheap, first) and that
    /// the signature verifies under it; returns the announcement only then.
    pub fn verify(&self) -> Result<&Beacon, BeaconError> {
        let b = &self.beacon;
        if !key_owns(b.node_key.as_bytes(), &b.overlay_addr) {
            return Err(BeaconError::WrongAddress);
        }
        UnparsedPublicKey::new(&ED25519, b.node_key.as_bytes())
            .verify(&b.signed_bytes(), &self.signature)
            .map_err(|_| BeaconError::BadSignature)?;
        Ok(b)
    }
}

fn write_header(w: &mut Writer<'_>, kind: Kind) {
    w.put(&[LINK_MESSAGE_VERSION, kind as u8]);
    // Body lengths are small constants, far below u16::MAX.
    w.put(&(kind.body_len() as u16).to_be_bytes());
}

impl LinkMessage {
    /// What kind of message this is.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Hello(_) => Kind::Hello,
            Self::HelloAck(_) => Kind::HelloAck,
            Self::Keepalive => Kind::Keepalive,
            Self::Beacon(_) => Kind::Beacon,
        }
    }

    /// Bytes [`LinkMessage::emit`] writes.
    pub fn buffer_len(&self) -> usize {
        LINK_HEADER_LEN + self.kind().body_len()
    }

    /// Parses one message that fills `bytes` exactly. Every length is checked before a
    /// field is read, so arbitrary input yields an error, never a panic.
    pub fn parse(bytes: &[u8]) -> Result<Self, LinkMessageError> {
        let Some((header, body)) = bytes.split_first_chunk::<LINK_HEADER_LEN>() else {
            return Err(LinkMessageError::Truncated {
                len: bytes.len(),
                need: LINK_HEADER_LEN,
            });
        };
        let [version, kind, len_hi, len_lo] = *header;
        if version != LINK_MESSAGE_VERSION {
            return Err(LinkMessageError::BadVersion(version));
        }
        let kind = Kind::from_u8(kind).ok_or(LinkMessageError::UnknownKind(kind))?;
        let declared = usize::from(u16::from_be_bytes([len_hi, len_lo]));
        let expected = kind.body_len();
        if declared != expected {
            return Err(LinkMessageError::BadLength {
                kind,
                declared,
                expected,
            });
        }
        if body.len() < expected {
            return Err(LinkMessageError::Truncated {
                len: bytes.len(),
                need: LINK_HEADER_LEN + expected,
            });
        }
        if body.len() > expected {
            return Err(LinkMessageError::Trailing(body.len() - expected));
        }
        let mut r = Reader { bytes: body };
        Ok(match kind {
            Kind::Hello => Self::Hello(Hello {
                node_key: r.key(),
                sequence: r.u32(),
                timestamp_us: r.u64(),
                observed_addr: r.addr(),
                observed_port: r.u16(),
            }),
            Kind::HelloAck => Self::HelloAck(HelloAck {
                sequence: r.u32(),
                echoed_timestamp_us: r.u64(),
                ack_delay_us: r.u32(),
            }),
            Kind::Keepalive => Self::Keepalive,
            Kind::Beacon => Self::Beacon(SignedBeacon {
                beacon: Beacon {
                    node_key: r.key(),
                    overlay_addr: r.addr(),
                    port: r.u16(),
                    timestamp_us: r.u64(),
                },
                signature: r.take(),
            }),
        })
    }

    /// Writes the message to the start of `buf` and returns its length.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize, LinkMessageError> {
        let need = self.buffer_len();
        let Some(buf) = buf.get_mut(..need) else {
            return Err(LinkMessageError::BufferTooSmall {
                have: buf.len(),
                need,
            });
        };
        let mut w = Writer { buf, pos: 0 };
        write_header(&mut w, self.kind());
        match self {
            Self::Hello(h) => {
                w.put(h.node_key.as_bytes());
                w.put(&h.sequence.to_be_bytes());
                w.put(&h.timestamp_us.to_be_bytes());
                w.put(&h.observed_addr.octets());
                w.put(&h.observed_port.to_be_bytes());
            }
            Self::HelloAck(a) => {
                w.put(&a.sequence.to_be_bytes());
                w.put(&a.echoed_timestamp_us.to_be_bytes());
                w.put(&a.ack_delay_us.to_be_bytes());
            }
            Self::Keepalive => {}
            Self::Beacon(s) => {
                s.beacon.write_unsigned(&mut w);
                w.put(&s.signature);
            }
        }
        Ok(need)
    }

    /// The message as a fresh buffer of exactly [`LinkMessage::buffer_len`] bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.buffer_len()];
        // The buffer has exactly the required length, so emit cannot fail.
        let _ = self.emit(&mut out);
        out
    }
}

#[cfg(test)]
mod routing_frame_tests {
    use super::*;

    #[test]
    fn routing_frames_round_trip_and_reject_bad_lengths() {
        let framed = frame_routing(b"abc").unwrap();
        assert_eq!(routing_payload(&framed), Some(Ok(&b"abc"[..])));
        assert!(matches!(
            routing_payload(&framed[..5]),
            Some(Err(LinkMessageError::Truncated { .. }))
        ));
        let mut long = framed.clone();
        long.push(0);
        assert_eq!(
            routing_payload(&long),
            Some(Err(LinkMessageError::Trailing(1)))
        );
        let mut v2 = framed;
        v2[0] = 2;
        assert_eq!(
            routing_payload(&v2),
            Some(Err(LinkMessageError::BadVersion(2)))
        );
        // Other kinds are not routing frames.
        assert_eq!(routing_payload(&LinkMessage::Keepalive.to_vec()), None);
        assert_eq!(routing_payload(&[1, 5]), None);
        assert!(frame_routing(&vec![0u8; 70_000]).is_none());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use ring::{rand::SystemRandom, signature::Ed25519KeyPair};

    fn key_pair() -> Ed25519KeyPair {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    fn addr() -> impl Strategy<Value = Ipv6Addr> {
        any::<[u8; 16]>().prop_map(Ipv6Addr::from)
    }

    fn message() -> impl Strategy<Value = LinkMessage> {
        let hello = (
            any::<[u8; 32]>(),
            any::<u32>(),
            any::<u64>(),
            addr(),
            any::<u16>(),
        )
            .prop_map(
                |(k, sequence, timestamp_us, observed_addr, observed_port)| {
                    LinkMessage::Hello(Hello {
                        node_key: NodeKey(k),
                        sequence,
                        timestamp_us,
                        observed_addr,
                        observed_port,
                    })
                },
            );
        let ack = (any::<u32>(), any::<u64>(), any::<u32>()).prop_map(|(s, t, d)| {
            LinkMessage::HelloAck(HelloAck {
                sequence: s,
                echoed_timestamp_us: t,
                ack_delay_us: d,
            })
        });
        let beacon = (
            any::<[u8; 32]>(),
            addr(),
            any::<u16>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), SIGNATURE_LEN),
        )
            .prop_map(|(k, overlay_addr, port, timestamp_us, sig)| {
                let mut signature = [0u8; SIGNATURE_LEN];
                signature.copy_from_slice(&sig);
                LinkMessage::Beacon(SignedBeacon {
                    beacon: Beacon {
                        node_key: NodeKey(k),
                        overlay_addr,
                        port,
                        timestamp_us,
                    },
                    signature,
                })
            });
        prop_oneof![hello, ack, Just(LinkMessage::Keepalive), beacon]
    }

    proptest! {
        #[test]
        fn peers_control_parse_emit_roundtrip(msg in message()) {
            let bytes = msg.to_vec();
            prop_assert_eq!(bytes.len(), msg.buffer_len());
            prop_assert_eq!(LinkMessage::parse(&bytes), Ok(msg));
        }

        #[test]
        fn peers_control_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..160)) {
            if let Ok(msg) = LinkMessage::parse(&bytes) {
                // Whatever parses is canonical: it re-emits to the same bytes.
                prop_assert_eq!(msg.to_vec(), bytes);
            }
        }

        #[test]
        fn peers_control_mutated_messages_never_panic(
            msg in message(), pos in any::<prop::sample::Index>(), val: u8, cut in 0usize..8,
        ) {
            let mut bytes = msg.to_vec();
            let i = pos.index(bytes.len());
            bytes[i] = val;
            bytes.truncate(bytes.len().saturating_sub(cut));
            let _ = LinkMessage::parse(&bytes);
        }

        #[test]
        fn peers_control_truncation_and_trailing_are_rejected(msg in message(), extra in 1usize..4) {
            let bytes = msg.to_vec();
            for cut in 0..bytes.len() {
                prop_assert!(LinkMessage::parse(&bytes[..cut]).is_err());
            }
            let mut longer = bytes.clone();
            longer.extend(std::iter::repeat_n(0u8, extra));
            prop_assert_eq!(LinkMessage::parse(&longer), Err(LinkMessageError::Trailing(extra)));
        }
    }

    #[test]
    fn peers_control_header_errors_are_named() {
        let ka = LinkMessage::Keepalive.to_vec();
        assert_eq!(ka, vec![LINK_MESSAGE_VERSION, Kind::Keepalive as u8, 0, 0]);
        assert_eq!(
            LinkMessage::parse(&[2, 3, 0, 0]),
            Err(LinkMessageError::BadVersion(2))
        );
        assert_eq!(
            LinkMessage::parse(&[1, 99, 0, 0]),
            Err(LinkMessageError::UnknownKind(99))
        );
        assert_eq!(
            LinkMessage::parse(&[1, 3, 0, 1, 0]),
            Err(LinkMessageError::BadLength {
                kind: Kind::Keepalive,
                declared: 1,
                expected: 0
            })
        );
        assert_eq!(
            LinkMessage::parse(&[1, 2, 0]),
            Err(LinkMessageError::Truncated { len: 3, need: 4 })
        );
        let mut small = [0u8; 10];
        assert_eq!(
            LinkMessage::Keepalive.emit(&mut small[..3]),
            Err(LinkMessageError::BufferTooSmall { have: 3, need: 4 })
        );
        let hello = LinkMessage::Hello(Hello {
            node_key: NodeKey([1; 32]),
            sequence: 1,
            timestamp_us: 2,
            observed_addr: Ipv6Addr::LOCALHOST,
            observed_port: 3,
        });
        assert!(matches!(
            hello.emit(&mut small),
            Err(LinkMessageError::BufferTooSmall { have: 10, need: 66 })
        ));
        assert_eq!(MAX_LINK_MESSAGE_LEN, 126);
    }

    #[test]
    fn peers_beacon_sign_verify_and_forgeries() {
        let key = key_pair();
        let beacon = Beacon::for_key(&key, 9651, 1_700_000_000_000_000).unwrap();
        let signed = beacon.sign(&key);
        assert_eq!(signed.verify(), Ok(&beacon));

        // Survives the wire.
        let bytes = LinkMessage::Beacon(signed).to_vec();
        let LinkMessage::Beacon(parsed) = LinkMessage::parse(&bytes).unwrap() else {
            panic!("not a beacon");
        };
        assert_eq!(parsed.verify(), Ok(&beacon));

        // Any changed field breaks the signature.
        let mut tampered = signed;
        tampered.beacon.port = 1;
        assert_eq!(tampered.verify(), Err(BeaconError::BadSignature));
        let mut tampered = signed;
        tampered.beacon.timestamp_us += 1;
        assert_eq!(tampered.verify(), Err(BeaconError::BadSignature));
        let mut tampered = signed;
        tampered.signature[0] ^= 1;
        assert_eq!(tampered.verify(), Err(BeaconError::BadSignature));

        // Correctly signed, but announcing an address the key does not own.
        let mut wrong = beacon;
        wrong.overlay_addr = "fd6d:1:2:3::1".parse().unwrap();
        assert_eq!(wrong.sign(&key).verify(), Err(BeaconError::WrongAddress));

        // Someone else's key and address, signed by us.
        let other = key_pair();
        let theirs = Beacon::for_key(&other, 9651, 5).unwrap();
        assert_eq!(theirs.sign(&key).verify(), Err(BeaconError::BadSignature));
    }
}
