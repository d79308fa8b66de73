//! The sans-IO end-to-end security core: handshake, transport sessions and their DoS
//! defences, written as pure state machines in the style of quinn-proto.
//!
//! Nothing here touches a socket or a clock. Time comes in as [`std::time::Instant`] on
//! every call, randomness as a [`ring::rand::SecureRandom`] on the calls that need it, and
//! datagrams go in and out as byte buffers that already carry the 48-byte Myconet header
//! (`myconet_common::wire`), so the agent's I/O shell can put them straight on UDP. That
//! keeps every protocol decision testable deterministically with a simulated clock.
//!
//! Layers, bottom up:
//! - [`ReplayWindow`]: the sliding anti-replay bitmap of one receive key.
//! - [`Session`]: one authenticated session with a peer: sealing and opening `Data`
//!   packets, key phases (in-session rekey), idle and lifetime expiry.
//! - `handshake` (crate-private): the signed X25519 handshake that creates sessions.
//! - [`CookieChecker`] and [`RateLimiter`]: what a loaded responder uses so that an
//!   unverified initiator costs it no state; `admission` puts them in order in front
//!   of every signature verification, with a global budget behind them.
//! - `freshness` (crate-private): init timestamps, so a replayed init is refused before
//!   any signature work; `timers`: the table's deadline heap.
//! - [`SessionTable`]: everything per remote node: sessions by receiver index, pending
//!   handshakes with retransmission, queued plaintext, timers and events. This is what the
//!   I/O shell drives.
//!
//! The protocol itself (message layouts with byte offsets, key schedule, cookie, replay
//! window, rekey, timers, threat model) is documented in `docs/handshake.md`.

mod admission;
mod cookie;
mod error;
#[doc(hidden)]
pub mod forge;
mod freshness;
mod handshake;
mod msg;
mod ratelimit;
mod replay;
mod sessions;
mod timers;
mod transport;

#[cfg(test)]
mod tests;

use std::time::Duration;

use ring::aead;

// The shared identity types, under the names the session modules use.
use crate::id::{PUBLIC_KEY_LEN, Signer};

pub use cookie::CookieChecker;
pub use error::{
    ConfigError, HandshakeError, InboundError, OpenError, SealError, SendError, SignerError,
};
pub use msg::WireEndpoint;
pub use ratelimit::{RateLimitConfig, RateLimiter, source_prefix};
pub use replay::{REPLAY_WINDOW, ReplayError, ReplayWindow};
pub use sessions::{
    Event, FailReason, HandshakeProgress, Inbound, InitJob, InitOutcome, RemoteId, Screened,
    SendStatus, SessionTable, Stats, Transmit,
};
pub use transport::{
    DataHeader, ExpiryReason, MAX_PHASE_SKIP, PHASE_SHIFT, Session, TransportConfig,
};

/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// Length of the AEAD tag of every supported suite; fixed so the overhead is known up front.
pub const TAG_LEN: usize = 16;

/// Which side of the handshake created a session; decides which derived key sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Sent the HandshakeInit.
    Initiator,
    /// Answered it with a HandshakeResponse.
    Responder,
}

/// An AEAD suite for `Data` packets. Both have 256-bit keys and 16-byte tags, so the
/// header, overhead and key schedule are the same whichever is negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Suite {
    /// ChaCha20-Poly1305 (RFC 8439): the default, fast everywhere without AES hardware.
    ChaCha20Poly1305 = 1,
    /// AES-256-GCM: selectable for hosts with AES-NI / ARMv8 crypto extensions.
    Aes256Gcm = 2,
}

impl Suite {
    /// Maps a wire byte to a suite; `None` for ids this version does not know (ignored in
    /// offers, so a future suite can be offered to an old responder).
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::ChaCha20Poly1305),
            2 => Some(Self::Aes256Gcm),
            _ => None,
        }
    }

    /// The ring AEAD algorithm behind this suite.
    pub fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Self::ChaCha20Poly1305 => &aead::CHACHA20_POLY1305,
            Self::Aes256Gcm => &aead::AES_256_GCM,
        }
    }
}

/// Everything tunable about handshakes, sessions and DoS defences. One value configures a
/// whole [`SessionTable`]; [`Config::default`] is what production should use, tests shrink
/// the packet counts and timers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// AEAD suites in preference order. The initiator offers them (at most two); the
    /// responder picks the first offered suite it also lists. Must not be empty.
    pub suites: Vec<Suite>,
    /// Per-session transport limits: rekey, grace, idle and hard lifetime.
    pub transport: TransportConfig,
    /// Start a fresh handshake when the current session is this close to its hard
    /// lifetime and still in use, so traffic moves to new keys before the old ones die.
    pub rehandshake_before: Duration,
    /// After receiving data and sending nothing for this long, send an empty keepalive so
    /// the peer's session does not go idle (one-way flows keep both ends alive), and so a
    /// sender hears within this long that its peer still opens what it sends.
    pub keepalive_after: Duration,
    /// After sending data and authenticating nothing from the peer for this long, start
    /// a new handshake (the next send does): the peer has most likely lost the session
    /// (restarted, or dropped its half), and everything sealed onto it is lost until a
    /// new one is up. Must exceed `keepalive_after`, which is how long a live peer with
    /// nothing to say may stay silent, by a round trip or a lost keepalive.
    pub rehandshake_after_silence: Duration,
    /// First HandshakeInit retransmission timeout; doubles on every retry.
    pub handshake_timeout: Duration,
    /// Cap on the doubled retransmission timeout.
    pub handshake_max_timeout: Duration,
    /// Transmissions of one HandshakeInit (first send included) before giving up.
    pub handshake_attempts: u32,
    /// How long a responder keeps a session the initiator has not yet confirmed by sending
    /// on it, and how long it holds back its own initiation while waiting for that.
    pub unconfirmed_timeout: Duration,
    /// Cookie secret rotation period; a cookie is accepted for one to two periods.
    pub cookie_rotation: Duration,
    /// HandshakeInits per second above which the responder demands cookies even if the
    /// caller has not signalled load.
    pub load_threshold: u32,
    /// Token bucket per initiator for handshake processing: keyed by the underlay sender
    /// (last hop) and the claimed overlay /64, so initiators reaching us through one
    /// relay do not share a bucket. Over it, an init is refused (`RateLimited`).
    pub rate_limit: RateLimitConfig,
    /// Token bucket per underlay sender (last hop), over all the initiators it brings:
    /// over it, inits without a valid cookie get a CookieReply instead of a signature
    /// check, so overlay sources spoofed from behind one neighbour cannot exhaust the
    /// initiators' buckets, and real initiators behind it still get through by echoing
    /// the cookie (which the relay routes to the owner of the overlay source).
    pub source_rate_limit: RateLimitConfig,
    /// Token bucket per underlay sender (last hop) over the inits that carry a valid
    /// cookie. A cookie proves that the sender receives at that underlay address and
    /// nothing more (a host sending directly gets the cookie for any overlay source it
    /// claims), so that is what such inits are charged to.
    pub cookie_rate_limit: RateLimitConfig,
    /// Token bucket per underlay sender (last hop) over the cookie replies sent to it:
    /// over it, an init that would get one is dropped unanswered (its initiator's next
    /// retransmission gets one). A flood of inits, replayed or from spoofed sources,
    /// would otherwise cost a reply (a send) each.
    pub cookie_reply_rate_limit: RateLimitConfig,
    /// The whole node's signature verifications of inits (`burst` at once, then
    /// `per_second`); `max_sources` is unused. When it runs dry the node demands cookies
    /// for a second.
    pub verify_budget: RateLimitConfig,
    /// Initiators (key, and for link handshakes the endpoint dialled) whose newest init
    /// timestamp is remembered; beyond it the oldest is forgotten.
    pub max_initiator_clocks: usize,
    /// Initiations of our own under way at once; more are refused (counted) until some
    /// complete or fail. Bounds what local applications sending to many destinations
    /// can make the node hold and sign.
    pub max_pending_initiations: usize,
    /// New end-to-end initiations per second (`max_sources` unused); over it a send
    /// that would start one is refused (counted).
    pub initiation_rate: RateLimitConfig,
    /// Per remote /64: how often a `Data` packet for a session this node does not have
    /// may make it start a handshake towards the packet's source (the sender then gets
    /// a fresh session at once instead of after its silence timeout).
    pub prompt_rate_limit: RateLimitConfig,
    /// The same over all sources (`max_sources` unused): the packet's source is not
    /// authenticated, so this bounds the inits spoofed packets can make the node send.
    pub prompt_budget: RateLimitConfig,
    /// Sessions a remote may make this node create (responder side); beyond it the oldest
    /// unconfirmed one is evicted, and if none is unconfirmed the init is refused.
    pub max_sessions: usize,
    /// Plaintext packets queued per remote while a handshake runs; the oldest is dropped
    /// (and counted) when full.
    pub max_queued: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            suites: vec![Suite::ChaCha20Poly1305, Suite::Aes256Gcm],
            transport: TransportConfig::default(),
            rehandshake_before: Duration::from_secs(60),
            keepalive_after: Duration::from_secs(2),
            rehandshake_after_silence: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(1),
            handshake_max_timeout: Duration::from_secs(8),
            handshake_attempts: 6,
            unconfirmed_timeout: Duration::from_secs(15),
            cookie_rotation: Duration::from_secs(120),
            load_threshold: 1000,
            rate_limit: RateLimitConfig {
                max_sources: 16_384,
                ..RateLimitConfig::default()
            },
            source_rate_limit: RateLimitConfig {
                burst: 64,
                per_second: 32,
                max_sources: 16_384,
                ..RateLimitConfig::default()
            },
            cookie_rate_limit: RateLimitConfig {
                burst: 64,
                per_second: 32,
                max_sources: 16_384,
                ..RateLimitConfig::default()
            },
            cookie_reply_rate_limit: RateLimitConfig {
                burst: 128,
                per_second: 64,
                max_sources: 16_384,
                ..RateLimitConfig::default()
            },
            verify_budget: RateLimitConfig {
                burst: 256,
                per_second: 512,
                max_sources: 1,
                ..RateLimitConfig::default()
            },
            max_initiator_clocks: 16_384,
            max_pending_initiations: 512,
            initiation_rate: RateLimitConfig {
                burst: 128,
                per_second: 64,
                max_sources: 1,
                ..RateLimitConfig::default()
            },
            prompt_rate_limit: RateLimitConfig {
                burst: 1,
                per_second: 1,
                max_sources: 1024,
                ..RateLimitConfig::default()
            },
            prompt_budget: RateLimitConfig {
                burst: 8,
                per_second: 4,
                max_sources: 1,
                ..RateLimitConfig::default()
            },
            max_sessions: 65_536,
            max_queued: 64,
        }
    }
}

impl Config {
    /// Rejects settings the state machines cannot honour (zero periods, empty lists, a
    /// rekey count beyond what one key phase can number), so they fail at start-up
    /// instead of misbehaving later.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.suites.is_empty() {
            return Err(ConfigError::NoSuites);
        }
        if self.suites.len() > 2 || (self.suites.len() == 2 && self.suites[0] == self.suites[1]) {
            return Err(ConfigError::BadSuiteList);
        }
        self.transport.validate()?;
        for limit in [
            &self.rate_limit,
            &self.source_rate_limit,
            &self.cookie_rate_limit,
            &self.cookie_reply_rate_limit,
            &self.verify_budget,
            &self.initiation_rate,
            &self.prompt_rate_limit,
            &self.prompt_budget,
        ] {
            limit.validate()?;
        }
        for (name, value) in [
            ("keepalive_after", self.keepalive_after),
            ("rehandshake_after_silence", self.rehandshake_after_silence),
            ("handshake_timeout", self.handshake_timeout),
            ("handshake_max_timeout", self.handshake_max_timeout),
            ("unconfirmed_timeout", self.unconfirmed_timeout),
            ("cookie_rotation", self.cookie_rotation),
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroDuration(name));
            }
        }
        if self.rehandshake_before >= self.transport.max_lifetime {
            return Err(ConfigError::RehandshakeMargin);
        }
        if self.rehandshake_after_silence <= self.keepalive_after {
            return Err(ConfigError::SilenceMargin);
        }
        if self.handshake_attempts == 0 {
            return Err(ConfigError::ZeroCount("handshake_attempts"));
        }
        if self.max_sessions == 0 {
            return Err(ConfigError::ZeroCount("max_sessions"));
        }
        if self.max_queued == 0 {
            return Err(ConfigError::ZeroCount("max_queued"));
        }
        if self.max_initiator_clocks == 0 {
            return Err(ConfigError::ZeroCount("max_initiator_clocks"));
        }
        if self.max_pending_initiations == 0 {
            return Err(ConfigError::ZeroCount("max_pending_initiations"));
        }
        Ok(())
    }
}
