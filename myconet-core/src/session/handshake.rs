//! The signed ephemeral-X25519 handshake (two messages, plus an optional cookie round).
//!
//! ```text
//! initiator I                                         responder R
//! HandshakeInit { idx_i, S_i, E_i, suites, ts, ep_r, cookie, sig_i = Sign_i(h1) }  ->
//!                 R: ts newer than any seen from S_i, (cookie ok if loaded), S_i owns
//!                    src addr, sig_i ok; link: ep_r is R's own endpoint
//!            <-  HandshakeResponse { idx_r, S_r, E_r, suite, ep_i, sig_r = Sign_r(h2) }
//! I: S_r owns the dialled addr, sig_r ok; link: ep_i is I's own endpoint
//! h1 = SHA-256("myconet v2 handshake init" || init without signature, hop limit 0)
//! h2 = SHA-256("myconet v2 handshake response" || h1 || sig_i || response without
//!      signature, hop limit 0)
//! prk = HKDF-Extract(salt = h2, X25519(E_i, E_r));  i2r, r2i = HKDF-Expand(prk, labels)
//! ```
//!
//! h1 covers both overlay addresses, `S_i`, `E_i`, `idx_i`, the suite offer, the
//! initiator's timestamp, the endpoint a link init was sent to and the cookie; h2 adds
//! `S_r`, `E_r`, `idx_r` (and, through the header's session id, `idx_i` again), the chosen
//! suite and the endpoint a link init came from. R signs the whole transcript; I signs what exists when it speaks, and
//! its first `Data` packet (a keepalive if nothing else) proves it derived the same keys
//! from h2, i.e. confirms the whole transcript. Session keys are salted with h2, so any
//! disagreement about any transcript byte yields unrelated keys.

use std::{net::Ipv6Addr, time::Instant};

use myconet_common::{
    addr::{LINK_ADDRESS, key_owns},
    wire::{HEADER_LEN, PacketType},
};
use ring::{
    agreement, digest, hkdf,
    rand::SecureRandom,
    signature::{self, UnparsedPublicKey},
};

use super::{
    HandshakeError, PUBLIC_KEY_LEN, Role, SIGNATURE_LEN, Signer, SignerError, Suite,
    msg::{
        COOKIE_LEN, CookieReplyMsg, ECHO_LEN, InitMsg, ResponseMsg, WireEndpoint, init, new_header,
        put_signature, response,
    },
    transport::{Len32, Session, SessionParams, TransportConfig},
};

const LABEL_H1: &[u8] = b"myconet v2 handshake init";
const LABEL_H2: &[u8] = b"myconet v2 handshake response";
const LABEL_ECHO: &[u8] = b"myconet v2 cookie echo";
/// Signature contexts: the identity key also signs other things (route announcements),
/// so every signature names what it is for.
const SIG_CONTEXT_INIT: &[u8] = b"myconet v2 handshake init signature\0";
const SIG_CONTEXT_RESPONSE: &[u8] = b"myconet v2 handshake response signature\0";
const LABEL_I2R: &[u8] = b"myconet v2 initiator to responder";
const LABEL_R2I: &[u8] = b"myconet v2 responder to initiator";

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Transcript hash after the init.
pub(crate) fn h1(signed_init: &[u8]) -> [u8; 32] {
    sha256(&[LABEL_H1, signed_init])
}

/// Transcript hash after the response.
pub(crate) fn h2(h1: &[u8; 32], sig_i: &[u8; SIGNATURE_LEN], signed_response: &[u8]) -> [u8; 32] {
    sha256(&[LABEL_H2, h1, sig_i, signed_response])
}

/// What a cookie reply echoes: unguessable without having seen the init (it hashes the
/// random ephemeral), and the same for every retransmission of one initiation.
pub(crate) fn echo(ephemeral: &[u8; 32]) -> [u8; ECHO_LEN] {
    let digest = sha256(&[LABEL_ECHO, ephemeral]);
    let mut out = [0u8; ECHO_LEN];
    out.copy_from_slice(&digest[..ECHO_LEN]);
    out
}

fn sign(
    signer: &dyn Signer,
    context: &[u8],
    hash: &[u8; 32],
) -> Result<[u8; SIGNATURE_LEN], HandshakeError> {
    let sig = signer.sign(&[context, hash].concat());
    <[u8; SIGNATURE_LEN]>::try_from(sig.as_slice())
        .map_err(|_| SignerError::SignatureLength(sig.len()).into())
}

fn verify(
    key: &[u8; PUBLIC_KEY_LEN],
    context: &[u8],
    hash: &[u8; 32],
    sig: &[u8; SIGNATURE_LEN],
) -> Result<(), HandshakeError> {
    UnparsedPublicKey::new(&signature::ED25519, key)
        .verify(&[context, hash].concat(), sig)
        .map_err(|_| HandshakeError::BadSignature)
}

/// Both directions' phase-0 chain secrets from the X25519 output and the transcript.
fn derive(shared: &[u8], h2: &[u8; 32]) -> Option<([u8; 32], [u8; 32])> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, h2).extract(shared);
    let mut i2r = [0u8; 32];
    let mut r2i = [0u8; 32];
    prk.expand(&[LABEL_I2R], Len32).ok()?.fill(&mut i2r).ok()?;
    prk.expand(&[LABEL_R2I], Len32).ok()?.fill(&mut r2i).ok()?;
    Some((i2r, r2i))
}

fn ephemeral(
    rng: &dyn SecureRandom,
) -> Result<(agreement::EphemeralPrivateKey, [u8; 32]), HandshakeError> {
    let private = agreement::EphemeralPrivateKey::generate(&agreement::X25519, rng)
        .map_err(|_| HandshakeError::Random)?;
    let public = private
        .compute_public_key()
        .map_err(|_| HandshakeError::Random)?;
    let public = <[u8; 32]>::try_from(public.as_ref()).map_err(|_| HandshakeError::KeyAgreement)?;
    Ok((private, public))
}

/// Secrets from our ephemeral and the peer's public value, salted with `h2`.
fn agree(
    private: agreement::EphemeralPrivateKey,
    peer: &[u8; 32],
    h2: &[u8; 32],
) -> Result<([u8; 32], [u8; 32]), HandshakeError> {
    let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, peer);
    agreement::agree_ephemeral(private, &peer, |shared| derive(shared, h2))
        .ok()
        .flatten()
        .ok_or(HandshakeError::KeyAgreement)
}

/// Encodes a suite offer: our preference order, 0 for an empty slot.
pub(crate) fn offer(suites: &[Suite]) -> [u8; 2] {
    let mut out = [0u8; 2];
    for (slot, suite) in out.iter_mut().zip(suites) {
        *slot = *suite as u8;
    }
    out
}

/// The responder's pick: the initiator's first offered suite the responder also allows.
/// Unknown ids are skipped so a newer initiator can offer suites this version lacks.
pub(crate) fn choose_suite(offer: [u8; 2], allowed: &[Suite]) -> Option<Suite> {
    offer
        .into_iter()
        .filter_map(Suite::from_u8)
        .find(|s| allowed.contains(s))
}

/// An initiator's outstanding handshake: the ephemeral secret and the init it keeps
/// retransmitting (identical bytes, so the responder can recognise duplicates).
pub(crate) struct Initiation {
    pub local_index: u32,
    pub local_addr: Ipv6Addr,
    pub remote_addr: Ipv6Addr,
    local_key: [u8; PUBLIC_KEY_LEN],
    pub expected_key: Option<[u8; PUBLIC_KEY_LEN]>,
    ephemeral: agreement::EphemeralPrivateKey,
    ephemeral_public: [u8; 32],
    suites: [u8; 2],
    /// When the initiation was made (see [`InitMsg::timestamp`]); retransmissions and
    /// cookie re-signs keep it, so they are the same initiation to the responder.
    timestamp: u64,
    /// Link handshakes: the endpoint dialled, which the responder must own.
    endpoint: Option<WireEndpoint>,
    cookie: Option<[u8; COOKIE_LEN]>,
    message: Vec<u8>,
    h1: [u8; 32],
    signature: [u8; SIGNATURE_LEN],
}

/// A response that passed every check; only the key agreement is left.
pub(crate) struct VerifiedResponse {
    suite: Suite,
    remote_index: u32,
    remote_key: [u8; PUBLIC_KEY_LEN],
    ephemeral: [u8; 32],
    h2: [u8; 32],
}

/// Where the responder says a link init came from (signed); the initiator compares it
/// with its own endpoint before trusting the response.
pub(crate) fn observed_endpoint(msg: &ResponseMsg) -> Option<WireEndpoint> {
    msg.endpoint
}

impl Initiation {
    /// Draws an ephemeral and builds the signed init from `local_addr` to the dialled
    /// `remote_addr`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        signer: &dyn Signer,
        local_key: [u8; PUBLIC_KEY_LEN],
        local_addr: Ipv6Addr,
        remote_addr: Ipv6Addr,
        local_index: u32,
        expected_key: Option<[u8; PUBLIC_KEY_LEN]>,
        suites: &[Suite],
        timestamp: u64,
        endpoint: Option<WireEndpoint>,
        rng: &dyn SecureRandom,
    ) -> Result<Self, HandshakeError> {
        let (ephemeral, ephemeral_public) = ephemeral(rng)?;
        let mut this = Self {
            local_index,
            local_addr,
            remote_addr,
            local_key,
            expected_key,
            ephemeral,
            ephemeral_public,
            suites: offer(suites),
            timestamp,
            endpoint,
            cookie: None,
            message: Vec::new(),
            h1: [0; 32],
            signature: [0; SIGNATURE_LEN],
        };
        this.build(signer)?;
        Ok(this)
    }

    fn build(&mut self, signer: &dyn Signer) -> Result<(), HandshakeError> {
        let header = new_header(
            PacketType::HandshakeInit,
            0,
            self.remote_addr,
            self.local_addr,
        );
        let (mut buf, signed) = InitMsg::emit_unsigned(
            &header,
            self.local_index,
            &self.local_key,
            &self.ephemeral_public,
            self.suites,
            self.timestamp,
            self.endpoint,
            self.cookie.as_ref(),
        );
        let h1 = h1(&signed);
        let signature = sign(signer, SIG_CONTEXT_INIT, &h1)?;
        put_signature(&mut buf, init::SIGNATURE, &signature);
        self.message = buf;
        self.h1 = h1;
        self.signature = signature;
        Ok(())
    }

    /// The init to (re)transmit.
    pub(crate) fn message(&self) -> &[u8] {
        &self.message
    }

    /// The cookie being sent, if any.
    pub(crate) fn cookie(&self) -> Option<&[u8; COOKIE_LEN]> {
        self.cookie.as_ref()
    }

    /// Replaces the cookie (or drops it with `None`) and re-signs the init; the ephemeral
    /// and index stay, so the responder still sees the same initiation.
    pub(crate) fn set_cookie(
        &mut self,
        cookie: Option<[u8; COOKIE_LEN]>,
        signer: &dyn Signer,
    ) -> Result<(), HandshakeError> {
        self.cookie = cookie;
        self.build(signer)
    }

    /// Checks a cookie reply answers this initiation and returns its cookie.
    pub(crate) fn check_cookie_reply(
        &self,
        msg: &CookieReplyMsg,
    ) -> Result<[u8; COOKIE_LEN], HandshakeError> {
        if msg.header.session_id != self.local_index
            || msg.header.dst_addr != self.local_addr
            || msg.header.src_addr != self.remote_addr
            || msg.echo != echo(&self.ephemeral_public)
        {
            return Err(HandshakeError::Mismatch);
        }
        Ok(msg.cookie)
    }

    /// Every check on a response except the key agreement (which consumes the
    /// ephemeral): addresses, the responder's key owning the dialled address, the pinned
    /// key, the signature over h2 and the suite. Leaves the initiation untouched, so a
    /// forged response cannot abort it.
    pub(crate) fn verify_response(
        &self,
        msg: &ResponseMsg,
    ) -> Result<VerifiedResponse, HandshakeError> {
        if msg.header.session_id != self.local_index
            || msg.header.dst_addr != self.local_addr
            || msg.header.src_addr != self.remote_addr
        {
            return Err(HandshakeError::Mismatch);
        }
        // A link handshake dials whoever answers at the endpoint: any key may, unless
        // one is pinned (below). Otherwise the key must own the dialled address.
        if self.remote_addr != LINK_ADDRESS && !key_owns(&msg.static_key, &self.remote_addr) {
            return Err(HandshakeError::ResponderIdentity(self.remote_addr));
        }
        if self.expected_key.is_some_and(|k| k != msg.static_key) {
            return Err(HandshakeError::UnexpectedKey(self.remote_addr));
        }
        let h2 = h2(&self.h1, &self.signature, &msg.signed);
        verify(&msg.static_key, SIG_CONTEXT_RESPONSE, &h2, &msg.signature)?;
        let suite = Suite::from_u8(msg.suite)
            .filter(|s| self.suites.contains(&(*s as u8)))
            .ok_or(HandshakeError::NoCommonSuite)?;
        Ok(VerifiedResponse {
            suite,
            remote_index: msg.sender_index,
            remote_key: msg.static_key,
            ephemeral: msg.ephemeral,
            h2,
        })
    }

    /// Finishes with a verified response: X25519, key schedule, a confirmed session.
    pub(crate) fn complete(
        self,
        verified: VerifiedResponse,
        config: TransportConfig,
        now: Instant,
    ) -> Result<Session, HandshakeError> {
        let (i2r, r2i) = agree(self.ephemeral, &verified.ephemeral, &verified.h2)?;
        Session::new(
            SessionParams {
                role: Role::Initiator,
                suite: verified.suite,
                local_index: self.local_index,
                remote_index: verified.remote_index,
                local_addr: self.local_addr,
                remote_addr: self.remote_addr,
                remote_key: verified.remote_key,
                send_secret: i2r,
                recv_secret: r2i,
            },
            config,
            now,
        )
        .ok_or(HandshakeError::KeyAgreement)
    }
}

/// An init whose identity and signature checked out.
#[derive(Debug, Clone)]
pub(crate) struct VerifiedInit {
    pub msg: InitMsg,
    pub h1: [u8; 32],
}

/// The responder's expensive checks: the initiator's key owns its source address and
/// signed h1. Nothing is stored; the caller decides what to keep.
pub(crate) fn verify_init(msg: InitMsg) -> Result<VerifiedInit, HandshakeError> {
    if !key_owns(&msg.static_key, &msg.header.src_addr) {
        return Err(HandshakeError::InitiatorIdentity(msg.header.src_addr));
    }
    let h1 = h1(&msg.signed);
    verify(&msg.static_key, SIG_CONTEXT_INIT, &h1, &msg.signature)?;
    Ok(VerifiedInit { msg, h1 })
}

/// The responder's answer to a verified init: the signed response and the (not yet
/// confirmed) session. The response's source is the address the initiator dialled, which
/// the caller has checked lies in this node's /64; `observed` is where a link init came
/// from (none end to end).
#[allow(clippy::too_many_arguments)]
pub(crate) fn respond(
    signer: &dyn Signer,
    local_key: &[u8; PUBLIC_KEY_LEN],
    init: &VerifiedInit,
    local_index: u32,
    suite: Suite,
    observed: Option<WireEndpoint>,
    config: TransportConfig,
    now: Instant,
    rng: &dyn SecureRandom,
) -> Result<(Vec<u8>, Session), HandshakeError> {
    let (private, public) = ephemeral(rng)?;
    let m = &init.msg;
    let header = new_header(
        PacketType::HandshakeResponse,
        m.sender_index,
        m.header.src_addr,
        m.header.dst_addr,
    );
    let (mut buf, signed) = ResponseMsg::emit_unsigned(
        &header,
        local_index,
        local_key,
        &public,
        suite as u8,
        observed,
    );
    let h2 = h2(&init.h1, &m.signature, &signed);
    let signature = sign(signer, SIG_CONTEXT_RESPONSE, &h2)?;
    put_signature(&mut buf, response::SIGNATURE, &signature);
    let (i2r, r2i) = agree(private, &m.ephemeral, &h2)?;
    let session = Session::new(
        SessionParams {
            role: Role::Responder,
            suite,
            local_index,
            remote_index: m.sender_index,
            local_addr: m.header.dst_addr,
            remote_addr: m.header.src_addr,
            remote_key: m.static_key,
            send_secret: r2i,
            recv_secret: i2r,
        },
        config,
        now,
    )
    .ok_or(HandshakeError::KeyAgreement)?;
    Ok((buf, session))
}

/// A cookie reply to `init`, sent back to where it came from.
pub(crate) fn cookie_reply(init: &InitMsg, cookie: &[u8; COOKIE_LEN]) -> Vec<u8> {
    let header = new_header(
        PacketType::CookieReply,
        init.sender_index,
        init.header.src_addr,
        init.header.dst_addr,
    );
    CookieReplyMsg::emit(&header, &echo(&init.ephemeral), cookie)
}

/// Compile-time reminder that handshake payloads start right after the header.
const _: () = assert!(init::SENDER_INDEX.start == HEADER_LEN);
