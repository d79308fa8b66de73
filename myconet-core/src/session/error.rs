//! Typed errors for every way a peer's input or a local call can be refused, so the agent
//! can count each cause separately and never has to parse messages.

use std::net::{IpAddr, Ipv6Addr};

use myconet_common::wire::WireError;

use super::{replay::ReplayError, transport::ExpiryReason};

/// A [`super::Config`] the state machines cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// No AEAD suite configured: nothing could ever be negotiated.
    #[error("no AEAD suite configured")]
    NoSuites,
    /// More than two suites, or the same one twice (the init has two offer slots).
    #[error("suite list must hold one or two distinct suites")]
    BadSuiteList,
    /// A period that must be positive is zero.
    #[error("{0} must be positive")]
    ZeroDuration(&'static str),
    /// A count that must be positive is zero.
    #[error("{0} must be positive")]
    ZeroCount(&'static str),
    /// More packets per key than one key phase can number (2^32).
    #[error("rekey_after_packets must be between 1 and 2^32")]
    RekeyPackets,
    /// The rehandshake margin is not shorter than the session lifetime.
    #[error("rehandshake_before must be shorter than max_lifetime")]
    RehandshakeMargin,
    /// A peer with nothing to say sends a keepalive after `keepalive_after`; the silence
    /// rule must wait longer than that.
    #[error("rehandshake_after_silence must be longer than keepalive_after")]
    SilenceMargin,
    /// An IPv6 prefix length over 128.
    #[error("ipv6_prefix_len must be at most 128")]
    PrefixLen,
    /// The signer's public key or signatures do not have Ed25519 sizes.
    #[error("signer: {0}")]
    Signer(#[from] SignerError),
}

/// The local [`super::Signer`] produced something that is not Ed25519-shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignerError {
    /// The public key is not 32 bytes.
    #[error("public key is {0} bytes, expected 32")]
    PublicKeyLength(usize),
    /// A signature is not 64 bytes.
    #[error("signature is {0} bytes, expected 64")]
    SignatureLength(usize),
}

/// Why a handshake message was refused. Every variant leaves the receiver's state as it
/// was, so an attacker's message can at worst be dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// Wrong length or a field that must be zero is not.
    #[error("malformed handshake message: {0}")]
    Malformed(&'static str),
    /// The init is addressed outside this node's /64.
    #[error("handshake addressed to {0}, which this node does not own")]
    NotForUs(Ipv6Addr),
    /// The init comes from or goes to an address no handshake may use: the reserved
    /// link /64 as a source, or a link handshake over IPv4.
    #[error("handshake uses reserved address {0}")]
    ReservedAddress(Ipv6Addr),
    /// The initiator's static key does not own the source address it claims.
    #[error("initiator key does not own its source address {0}")]
    InitiatorIdentity(Ipv6Addr),
    /// The responder's static key does not own the address the initiator dialled.
    #[error("responder key does not own the dialled address {0}")]
    ResponderIdentity(Ipv6Addr),
    /// The peer's key owns the address but is not the key this node expected (pinned).
    #[error("peer {0} presented a key other than the expected one")]
    UnexpectedKey(Ipv6Addr),
    /// The Ed25519 signature over the transcript does not verify.
    #[error("handshake signature does not verify")]
    BadSignature,
    /// No AEAD suite both sides accept, or the responder chose one that was not offered.
    #[error("no common AEAD suite")]
    NoCommonSuite,
    /// A response or cookie reply does not match the init this node sent.
    #[error("reply does not match the outstanding init")]
    Mismatch,
    /// The init's timestamp is not newer than one already accepted from that initiator:
    /// a replay (or a re-send of an init already handled). Refused before any signature
    /// work, and it disturbs nothing.
    #[error("init is not newer than one already accepted from that initiator")]
    Replayed,
    /// A link handshake names an underlay endpoint that is not this node's own: the init
    /// was sent to someone else (who passed it on), or the response says it heard the
    /// init from somewhere this node did not send it from. Answering would bind the
    /// session to an endpoint the peer is not at, making whoever forwarded it an
    /// invisible relay both sides admit.
    #[error("link handshake bound to {0}, which is not this node's endpoint")]
    EndpointMismatch(String),
    /// X25519 failed (e.g. a low-order point from a signed but broken peer).
    #[error("key agreement failed")]
    KeyAgreement,
    /// The node would be talking to itself.
    #[error("handshake with this node's own address")]
    SelfHandshake,
    /// The responder holds `max_sessions` confirmed sessions and refuses new ones.
    #[error("session table full")]
    TableFull,
    /// The local signer misbehaved.
    #[error("local signer: {0}")]
    Signer(#[from] SignerError),
    /// The random generator failed.
    #[error("randomness unavailable")]
    Random,
}

/// Why a `Data` packet did not open. The session survives every one of these: nothing in
/// it changes unless a packet authenticates.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Not a parseable Myconet header.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A header of another packet type.
    #[error("not a data packet (type {0})")]
    NotData(u8),
    /// The header names another receiver index.
    #[error("packet for receiver index {got}, session is {expected}")]
    WrongSession {
        /// This session's receiver index.
        expected: u32,
        /// The index in the header.
        got: u32,
    },
    /// Payload shorter than the AEAD tag.
    #[error("payload of {0} bytes cannot hold a tag")]
    Truncated(usize),
    /// Source or destination outside the two /64s of the session.
    #[error("addresses do not belong to this session")]
    AddressMismatch,
    /// Seen before or older than the window.
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// A key phase older than the one kept for the grace period.
    #[error("key phase {0} is retired")]
    StaleKeyPhase(u32),
    /// A key phase further ahead than [`super::MAX_PHASE_SKIP`].
    #[error("key phase {0} is too far ahead")]
    KeyPhaseTooFar(u32),
    /// The AEAD tag does not verify: tampered, truncated or forged.
    #[error("authentication failed")]
    Authentication,
    /// The session is past its idle timeout or lifetime.
    #[error("session expired ({0:?})")]
    Expired(ExpiryReason),
}

/// Why [`super::Session::seal`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The session is past its idle timeout or lifetime.
    #[error("session expired ({0:?})")]
    Expired(ExpiryReason),
    /// Header addresses outside the session's two /64s.
    #[error("header addresses outside the session's prefixes")]
    AddressMismatch,
    /// The datagram would not fit in one UDP payload.
    #[error("plaintext of {0} bytes is too large")]
    TooLarge(usize),
    /// A buffer given to [`super::Session::seal_in_place`] has no room for the header
    /// and tag (its length).
    #[error("buffer of {0} bytes cannot hold a header and a tag")]
    NoRoom(usize),
    /// Every key phase and counter of this session is used up; a new handshake is due.
    #[error("session exhausted its nonce space")]
    Exhausted,
    /// ring refused to seal (cannot happen with valid keys; kept typed, never a panic).
    #[error("AEAD seal failed")]
    Crypto,
}

/// Why [`super::SessionTable::send`] or [`super::SessionTable::connect`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The destination is not inside `fd6d::/16`.
    #[error("{0} is not an overlay address")]
    NotOverlay(Ipv6Addr),
    /// The destination is inside this node's own /64.
    #[error("{0} belongs to this node")]
    SelfAddress(Ipv6Addr),
    /// A pinned key was given that does not own the destination.
    #[error("the expected key does not own {0}")]
    KeyDoesNotOwn(Ipv6Addr),
    /// The plaintext would not fit in one datagram.
    #[error("plaintext of {0} bytes is too large")]
    TooLarge(usize),
    /// A handshake would be needed, but this node may not start another one now (too
    /// many under way, or new ones over their rate); the plaintext was dropped.
    #[error("too many handshakes under way or starting; dropped")]
    Throttled,
    /// Starting the handshake failed.
    #[error("starting a handshake: {0}")]
    Handshake(#[from] HandshakeError),
}

/// Why [`super::SessionTable::handle_datagram`] refused a datagram; the caller counts these
/// by variant (e.g. identity mismatches separately from forgeries).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InboundError {
    /// Not a parseable Myconet header.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A link-session packet from another underlay endpoint than the neighbour's.
    #[error("link packet from {0}, not from the neighbour's endpoint")]
    WrongEndpoint(std::net::SocketAddr),
    /// No session or pending handshake uses this receiver index.
    #[error("no session or handshake with receiver index {0}")]
    UnknownIndex(u32),
    /// The source is over its handshake rate (or the node over its verification budget).
    #[error("handshake from {0} rate limited")]
    RateLimited(IpAddr),
    /// A handshake message was refused.
    #[error("handshake rejected: {0}")]
    Handshake(#[from] HandshakeError),
    /// A data packet was refused.
    #[error("data packet rejected: {0}")]
    Open(#[from] OpenError),
    /// A packet type the session layer does not handle.
    #[error("packet type {0} is not session traffic")]
    NotSessionTraffic(u8),
}
