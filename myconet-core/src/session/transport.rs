//! One end-to-end session: sealing and opening `Data` packets with per-direction keys,
//! in-session rekeying by key phase, replay protection and expiry.
//!
//! Nonces: the header's 64-bit `counter` is the nonce (`0u32 || counter`, big-endian, 96
//! bits). Its upper 32 bits are the **key phase** and its lower 32 bits count packets
//! within the phase, so the counter strictly increases per direction and therefore per
//! key, and the receiver reads the phase (the key id) straight off the header. A sender
//! moves to the next phase (a fresh key ratcheted from the previous secret) after
//! `rekey_after_packets` packets or `rekey_after_time`, by jumping its counter to the
//! next multiple of 2^32. The phase is taken from the counter rather than a flag bit
//! because without acknowledgements a one-bit phase becomes ambiguous as soon as a
//! whole phase of packets is lost; the counter never is.
//!
//! The receiver keeps the current phase's key and, for `rekey_grace` after a switch, the
//! previous one, each with its own replay window, so packets in flight across the switch
//! still open. Nothing changes unless a packet authenticates.

use std::{
    net::Ipv6Addr,
    time::{Duration, Instant},
};

use myconet_common::{
    addr::{NODE_PREFIX_LEN, prefix_contains},
    wire::{self, HEADER_LEN, Packet, PacketType, Repr},
};
use ring::{aead, hkdf};

use super::{ConfigError, OpenError, Role, SealError, Suite, TAG_LEN, replay::ReplayWindow};

/// Bits of the counter below the key phase: the phase is `counter >> PHASE_SHIFT`.
pub const PHASE_SHIFT: u32 = 32;

/// How many key phases a receiver derives forward in one step. Phases advance one at a
/// time on the sender, so a larger jump means that many whole phases were lost; the
/// bound caps the work a forged far-ahead counter can cause.
pub const MAX_PHASE_SKIP: u32 = 16;

/// Packets one key phase can number.
const PHASE_CAPACITY: u64 = 1 << PHASE_SHIFT;

/// Largest plaintext that still fits one UDP datagram with header and tag.
const MAX_PLAINTEXT: usize = u16::MAX as usize - 8 - HEADER_LEN - TAG_LEN;

const LABEL_PHASE_KEY: &[u8] = b"myconet v1 phase key";
const LABEL_PHASE_UPDATE: &[u8] = b"myconet v1 phase update";

/// Per-session limits. Both ends may use different values: they are local sender policy
/// (when to rekey) and local receiver policy (how long to keep old keys and sessions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportConfig {
    /// Packets sealed under one key before moving to the next phase (1..=2^32).
    pub rekey_after_packets: u64,
    /// Age of a send key after which the next packet moves to the next phase.
    pub rekey_after_time: Duration,
    /// How long the previous receive key stays usable after the peer switched phase.
    pub rekey_grace: Duration,
    /// A session that has not authenticated a packet for this long is dead.
    pub idle_timeout: Duration,
    /// Hard lifetime: the session is dropped this long after the handshake, so fresh
    /// ephemeral keys (forward secrecy) are negotiated regularly.
    pub max_lifetime: Duration,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            rekey_after_packets: PHASE_CAPACITY,
            rekey_after_time: Duration::from_secs(120),
            rekey_grace: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(180),
            max_lifetime: Duration::from_secs(600),
        }
    }
}

impl TransportConfig {
    /// Rejects zero periods and packet counts one phase cannot number.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.rekey_after_packets == 0 || self.rekey_after_packets > PHASE_CAPACITY {
            return Err(ConfigError::RekeyPackets);
        }
        for (name, value) in [
            ("rekey_after_time", self.rekey_after_time),
            ("rekey_grace", self.rekey_grace),
            ("idle_timeout", self.idle_timeout),
            ("max_lifetime", self.max_lifetime),
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroDuration(name));
            }
        }
        Ok(())
    }
}

/// Why a session ended, reported so the agent can drop its state and count causes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExpiryReason {
    /// No packet authenticated for `idle_timeout`.
    Idle,
    /// `max_lifetime` since the handshake.
    Lifetime,
    /// A newer session took over and the grace period for in-flight packets ended.
    Replaced,
    /// A responder session the initiator never confirmed by sending on it.
    Unconfirmed,
    /// The agent closed it (a link session whose neighbour was removed).
    Closed,
}

/// Header fields the sender chooses for one `Data` packet; everything else (type, session
/// id, counter, flags) belongs to the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    /// Relay hop budget (not authenticated: relays decrement it).
    pub hop_limit: u8,
    /// Source overlay address; must lie in this node's /64.
    pub src_addr: Ipv6Addr,
    /// Destination overlay address; must lie in the peer's /64.
    pub dst_addr: Ipv6Addr,
}

/// A 32-byte HKDF secret from which one direction's phase keys are ratcheted.
#[derive(Clone)]
struct ChainSecret([u8; 32]);

impl ChainSecret {
    fn prk(&self) -> hkdf::Prk {
        hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &self.0)
    }

    /// The AEAD key of this phase.
    fn key(&self, suite: Suite) -> Option<aead::LessSafeKey> {
        let prk = self.prk();
        let okm = prk.expand(&[LABEL_PHASE_KEY], suite.algorithm()).ok()?;
        Some(aead::LessSafeKey::new(aead::UnboundKey::from(okm)))
    }

    /// The secret of the next phase; the old one can then be forgotten (key erasure).
    fn next(&self) -> Option<Self> {
        let mut out = [0u8; 32];
        self.prk()
            .expand(&[LABEL_PHASE_UPDATE], Len32)
            .ok()?
            .fill(&mut out)
            .ok()?;
        Some(Self(out))
    }
}

/// HKDF output length marker for 32-byte secrets.
pub(crate) struct Len32;

impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

struct SendState {
    secret: ChainSecret,
    key: aead::LessSafeKey,
    phase: u32,
    /// Packets sealed in this phase, i.e. the in-phase part of the next counter.
    sent_in_phase: u64,
    phase_started: Instant,
}

struct RecvKey {
    phase: u32,
    key: aead::LessSafeKey,
    window: ReplayWindow,
}

struct RecvState {
    /// Secret of `current.phase`, for deriving later phases.
    secret: ChainSecret,
    current: RecvKey,
    previous: Option<(RecvKey, Instant)>,
}

/// Where an incoming packet's key comes from.
enum KeySlot {
    Current,
    Previous,
    /// Boxed: a derived key is large and this path is rare (once per phase).
    Future(Box<(ChainSecret, aead::LessSafeKey)>),
}

/// One established end-to-end session with a peer node. Created by a completed handshake;
/// the agent only calls [`Session::seal`] and [`Session::open`] (the
/// [`super::SessionTable`] does that for it) and drops it when it expires.
pub struct Session {
    role: Role,
    suite: Suite,
    local_index: u32,
    remote_index: u32,
    local_addr: Ipv6Addr,
    remote_addr: Ipv6Addr,
    remote_key: [u8; 32],
    config: TransportConfig,
    tx: SendState,
    rx: RecvState,
    created: Instant,
    last_rx: Option<Instant>,
    last_tx: Option<Instant>,
    /// `Data` for end-to-end sessions, `Control` for link sessions: the type is in the
    /// associated data, so a packet of one kind can never be opened as the other.
    packet_type: PacketType,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("role", &self.role)
            .field("suite", &self.suite)
            .field("local_index", &self.local_index)
            .field("remote_index", &self.remote_index)
            .field("remote_addr", &self.remote_addr)
            .field("send_phase", &self.tx.phase)
            .field("recv_phase", &self.rx.current.phase)
            .finish_non_exhaustive()
    }
}

/// What the handshake hands to [`Session::new`].
pub(crate) struct SessionParams {
    pub role: Role,
    pub suite: Suite,
    pub local_index: u32,
    pub remote_index: u32,
    pub local_addr: Ipv6Addr,
    pub remote_addr: Ipv6Addr,
    pub remote_key: [u8; 32],
    pub send_secret: [u8; 32],
    pub recv_secret: [u8; 32],
}

fn nonce(counter: u64) -> aead::Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    aead::Nonce::assume_unique_for_key(n)
}

fn phase_of(counter: u64) -> u32 {
    // The shift leaves at most 32 significant bits.
    u32::try_from(counter >> PHASE_SHIFT).unwrap_or(u32::MAX)
}

impl Session {
    /// Builds phase 0 of both directions from the handshake's secrets. `None` only if
    /// ring refuses the key derivation, which valid inputs never cause.
    pub(crate) fn new(p: SessionParams, config: TransportConfig, now: Instant) -> Option<Self> {
        let send_secret = ChainSecret(p.send_secret);
        let recv_secret = ChainSecret(p.recv_secret);
        let tx_key = send_secret.key(p.suite)?;
        let rx_key = recv_secret.key(p.suite)?;
        Some(Self {
            role: p.role,
            suite: p.suite,
            local_index: p.local_index,
            remote_index: p.remote_index,
            local_addr: p.local_addr,
            remote_addr: p.remote_addr,
            remote_key: p.remote_key,
            config,
            tx: SendState {
                secret: send_secret,
                key: tx_key,
                phase: 0,
                sent_in_phase: 0,
                phase_started: now,
            },
            rx: RecvState {
                secret: recv_secret,
                current: RecvKey {
                    phase: 0,
                    key: rx_key,
                    window: ReplayWindow::new(),
                },
                previous: None,
            },
            created: now,
            last_rx: None,
            last_tx: None,
            packet_type: PacketType::Data,
        })
    }

    /// Which side of the handshake this node was.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The negotiated AEAD suite.
    pub fn suite(&self) -> Suite {
        self.suite
    }

    /// The index peers put in the header of packets to this node.
    pub fn local_index(&self) -> u32 {
        self.local_index
    }

    /// The index this node puts in the header of packets to the peer.
    pub fn remote_index(&self) -> u32 {
        self.remote_index
    }

    /// This node's overlay address as used in the handshake.
    pub fn local_addr(&self) -> Ipv6Addr {
        self.local_addr
    }

    /// The peer's overlay address as used in the handshake.
    pub fn remote_addr(&self) -> Ipv6Addr {
        self.remote_addr
    }

    /// The peer's verified Ed25519 public key.
    pub fn remote_key(&self) -> &[u8; 32] {
        &self.remote_key
    }

    /// When the handshake completed.
    pub fn created(&self) -> Instant {
        self.created
    }

    /// When a packet last authenticated, if ever; a responder session that has never
    /// received is still unconfirmed.
    pub fn last_received(&self) -> Option<Instant> {
        self.last_rx
    }

    /// Turns a fresh session into a link session: it seals and opens `Control` packets
    /// only. Called by the session table before the first packet.
    pub(crate) fn into_link(mut self) -> Self {
        self.packet_type = PacketType::Control;
        self
    }

    /// Whether this is a link session (carries neighbour control messages, not traffic).
    pub fn is_link(&self) -> bool {
        self.packet_type == PacketType::Control
    }

    /// When a packet was last sealed, if ever.
    pub fn last_sent(&self) -> Option<Instant> {
        self.last_tx
    }

    /// Current send key phase (upper half of the next counter).
    pub fn send_phase(&self) -> u32 {
        self.tx.phase
    }

    /// Whether this session sealed the packet with `counter` recently: below the next
    /// counter, in the current send key phase or the one before (a phase lasts at most
    /// `rekey_after_time`). A too-big report must quote such a packet (`pmtu`).
    pub fn sent_recently(&self, counter: u64) -> bool {
        let next = (u64::from(self.tx.phase) << PHASE_SHIFT) | self.tx.sent_in_phase;
        counter < next && phase_of(counter).saturating_add(1) >= self.tx.phase
    }

    /// Current receive key phase.
    pub fn recv_phase(&self) -> u32 {
        self.rx.current.phase
    }

    /// The header [`Session::seal`] uses by default: full hop budget, the handshake's
    /// addresses.
    pub fn default_header(&self) -> DataHeader {
        DataHeader {
            hop_limit: wire::DEFAULT_HOP_LIMIT,
            src_addr: self.local_addr,
            dst_addr: self.remote_addr,
        }
    }

    /// Whether the session is dead at `now`, and why. Both ends apply the same rule so
    /// they drop state at about the same time.
    pub fn expiry(&self, now: Instant) -> Option<ExpiryReason> {
        if now.saturating_duration_since(self.created) >= self.config.max_lifetime {
            return Some(ExpiryReason::Lifetime);
        }
        let last = self.last_rx.unwrap_or(self.created);
        if now.saturating_duration_since(last) >= self.config.idle_timeout {
            return Some(ExpiryReason::Idle);
        }
        None
    }

    /// The next instant at which something changes without a packet: expiry, or the
    /// previous receive key retiring.
    pub fn next_timeout(&self) -> Option<Instant> {
        let lifetime = self.created.checked_add(self.config.max_lifetime);
        let idle = self
            .last_rx
            .unwrap_or(self.created)
            .checked_add(self.config.idle_timeout);
        let retire = self.rx.previous.as_ref().map(|(_, at)| *at);
        [lifetime, idle, retire].into_iter().flatten().min()
    }

    /// Forgets the previous receive key once its grace period is over (key erasure).
    pub fn handle_timeout(&mut self, now: Instant) {
        if matches!(&self.rx.previous, Some((_, at)) if now >= *at) {
            self.rx.previous = None;
        }
    }

    /// Encrypts `plaintext` into a complete `Data` datagram (header, ciphertext, tag).
    /// Moves to the next key phase first when the current key has sealed
    /// `rekey_after_packets` packets or is older than `rekey_after_time`. An empty
    /// plaintext makes a keepalive.
    pub fn seal(
        &mut self,
        plaintext: &[u8],
        header: &DataHeader,
        now: Instant,
    ) -> Result<Vec<u8>, SealError> {
        let body_end = HEADER_LEN + plaintext.len();
        let mut buf = vec![0u8; body_end + TAG_LEN];
        buf[HEADER_LEN..body_end].copy_from_slice(plaintext);
        self.seal_in_place(&mut buf, header, now)?;
        Ok(buf)
    }

    /// [`Session::seal`] without allocating: `buf` is the whole datagram to be, with
    /// the plaintext already at `HEADER_LEN..buf.len() - TAG_LEN`; the header is written
    /// in front of it and the tag behind it. The TUN path reads packets into slots laid
    /// out like this, so a packet is sealed where it was read and never copied. Same
    /// checks, key phases and output bytes as [`Session::seal`].
    pub fn seal_in_place(
        &mut self,
        buf: &mut [u8],
        header: &DataHeader,
        now: Instant,
    ) -> Result<(), SealError> {
        let plaintext_len = buf
            .len()
            .checked_sub(HEADER_LEN + TAG_LEN)
            .ok_or(SealError::NoRoom(buf.len()))?;
        if let Some(reason) = self.expiry(now) {
            return Err(SealError::Expired(reason));
        }
        if !prefix_contains(self.local_addr, NODE_PREFIX_LEN, header.src_addr)
            || !prefix_contains(self.remote_addr, NODE_PREFIX_LEN, header.dst_addr)
        {
            return Err(SealError::AddressMismatch);
        }
        if plaintext_len > MAX_PLAINTEXT {
            return Err(SealError::TooLarge(plaintext_len));
        }
        let age = now.saturating_duration_since(self.tx.phase_started);
        if self.tx.sent_in_phase >= self.config.rekey_after_packets
            || self.tx.sent_in_phase >= PHASE_CAPACITY
            || age >= self.config.rekey_after_time
        {
            self.next_send_phase(now)?;
        }
        let counter = (u64::from(self.tx.phase) << PHASE_SHIFT) | self.tx.sent_in_phase;
        let repr = Repr {
            packet_type: self.packet_type,
            hop_limit: header.hop_limit,
            flags: 0,
            session_id: self.remote_index,
            counter,
            dst_addr: header.dst_addr,
            src_addr: header.src_addr,
        };
        let body_end = HEADER_LEN + plaintext_len;
        repr.emit(&mut Packet::new_unchecked(&mut buf[..]));
        let aad = Packet::new_unchecked(&buf[..]).associated_data();
        let tag = self
            .tx
            .key
            .seal_in_place_separate_tag(
                nonce(counter),
                aead::Aad::from(aad),
                &mut buf[HEADER_LEN..body_end],
            )
            .map_err(|_| SealError::Crypto)?;
        buf[body_end..].copy_from_slice(tag.as_ref());
        self.tx.sent_in_phase += 1;
        self.last_tx = Some(now);
        Ok(())
    }

    fn next_send_phase(&mut self, now: Instant) -> Result<(), SealError> {
        let phase = self.tx.phase.checked_add(1).ok_or(SealError::Exhausted)?;
        let secret = self.tx.secret.next().ok_or(SealError::Crypto)?;
        let key = secret.key(self.suite).ok_or(SealError::Crypto)?;
        self.tx = SendState {
            secret,
            key,
            phase,
            sent_in_phase: 0,
            phase_started: now,
        };
        Ok(())
    }

    /// Authenticates and decrypts one `Data` datagram addressed to this session, returning
    /// the plaintext (empty for a keepalive). The header (hop limit aside) is the
    /// associated data, so any changed byte fails. On any error the session is exactly as
    /// before; on success the replay window, key phase and idle timer advance.
    pub fn open(&mut self, datagram: &[u8], now: Instant) -> Result<Vec<u8>, OpenError> {
        let packet = Packet::new_checked(datagram)?;
        let repr = self.check_open(&packet, now)?;
        let aad = packet.associated_data();
        let mut buf = packet.payload().to_vec();
        let len = self.decrypt(&repr, aad, &mut buf, now)?;
        buf.truncate(len);
        Ok(buf)
    }

    /// [`Session::open`] without allocating: decrypts in the datagram's own buffer and
    /// returns where the plaintext now lies in it (after the header, before the old
    /// tag). The receive path opens packets where `recvmmsg` put them. Same checks and
    /// state changes as [`Session::open`]; on error the buffer's payload is unspecified
    /// and the session unchanged.
    pub fn open_in_place(
        &mut self,
        datagram: &mut [u8],
        now: Instant,
    ) -> Result<std::ops::Range<usize>, OpenError> {
        let packet = Packet::new_checked(&*datagram)?;
        let repr = self.check_open(&packet, now)?;
        let aad = packet.associated_data();
        let len = self.decrypt(&repr, aad, &mut datagram[HEADER_LEN..], now)?;
        Ok(HEADER_LEN..HEADER_LEN + len)
    }

    /// Everything [`Session::open`] checks before touching the ciphertext.
    fn check_open(&self, packet: &Packet<&[u8]>, now: Instant) -> Result<Repr, OpenError> {
        let repr = Repr::parse(packet)?;
        if repr.packet_type != self.packet_type {
            return Err(OpenError::NotData(repr.packet_type as u8));
        }
        if repr.session_id != self.local_index {
            return Err(OpenError::WrongSession {
                expected: self.local_index,
                got: repr.session_id,
            });
        }
        if let Some(reason) = self.expiry(now) {
            return Err(OpenError::Expired(reason));
        }
        let payload = packet.payload();
        if payload.len() < TAG_LEN {
            return Err(OpenError::Truncated(payload.len()));
        }
        if !prefix_contains(self.remote_addr, NODE_PREFIX_LEN, repr.src_addr)
            || !prefix_contains(self.local_addr, NODE_PREFIX_LEN, repr.dst_addr)
        {
            return Err(OpenError::AddressMismatch);
        }
        Ok(repr)
    }

    /// Opens `ciphertext` (ciphertext and tag) in place and returns the plaintext length;
    /// only an authenticated packet advances the replay window and key phase.
    fn decrypt(
        &mut self,
        repr: &Repr,
        aad: [u8; HEADER_LEN],
        ciphertext: &mut [u8],
        now: Instant,
    ) -> Result<usize, OpenError> {
        let counter = repr.counter;
        let phase = phase_of(counter);
        let slot = self.key_slot(phase, counter, now)?;
        let key = match &slot {
            KeySlot::Current => &self.rx.current.key,
            KeySlot::Previous => match &self.rx.previous {
                Some((k, _)) => &k.key,
                None => return Err(OpenError::StaleKeyPhase(phase)),
            },
            KeySlot::Future(future) => &future.1,
        };
        let len = key
            .open_in_place(nonce(counter), aead::Aad::from(aad), ciphertext)
            .map_err(|_| OpenError::Authentication)?
            .len();

        // Authenticated: only now may state change.
        match slot {
            KeySlot::Current => self.rx.current.window.accept(counter)?,
            KeySlot::Previous => {
                if let Some((k, _)) = &mut self.rx.previous {
                    k.window.accept(counter)?;
                }
            }
            KeySlot::Future(future) => {
                let (secret, key) = *future;
                let mut window = ReplayWindow::new();
                window.accept(counter)?;
                let retire = now.checked_add(self.config.rekey_grace).unwrap_or(now);
                let old = std::mem::replace(&mut self.rx.current, RecvKey { phase, key, window });
                self.rx.secret = secret;
                self.rx.previous = Some((old, retire));
            }
        }
        self.last_rx = Some(now);
        Ok(len)
    }

    /// Picks the receive key for `phase`, checking the replay window where one exists.
    fn key_slot(&self, phase: u32, counter: u64, now: Instant) -> Result<KeySlot, OpenError> {
        let current = self.rx.current.phase;
        if phase == current {
            self.rx.current.window.check(counter)?;
            return Ok(KeySlot::Current);
        }
        if phase < current {
            return match &self.rx.previous {
                Some((k, retire)) if k.phase == phase && now < *retire => {
                    k.window.check(counter).map_err(OpenError::from)?;
                    Ok(KeySlot::Previous)
                }
                _ => Err(OpenError::StaleKeyPhase(phase)),
            };
        }
        let steps = phase - current;
        if steps > MAX_PHASE_SKIP {
            return Err(OpenError::KeyPhaseTooFar(phase));
        }
        let mut secret = self.rx.secret.clone();
        for _ in 0..steps {
            secret = secret.next().ok_or(OpenError::Authentication)?;
        }
        let key = secret.key(self.suite).ok_or(OpenError::Authentication)?;
        Ok(KeySlot::Future(Box::new((secret, key))))
    }
}

#[cfg(test)]
mod tests {
    use myconet_common::addr::node_address;

    use super::*;

    /// Two sessions built from the same secrets: deterministic, so the allocating and
    /// in-place variants can be compared byte for byte.
    fn twins(role: Role, now: Instant) -> (Session, Session) {
        let make = || {
            let params = SessionParams {
                role,
                suite: Suite::Aes256Gcm,
                local_index: 7,
                remote_index: 9,
                local_addr: node_address(&[1; 32]),
                remote_addr: node_address(&[2; 32]),
                remote_key: [2; 32],
                send_secret: [3; 32],
                recv_secret: [4; 32],
            };
            Session::new(params, TransportConfig::default(), now).expect("session")
        };
        (make(), make())
    }

    /// The receiving side of [`twins`]: its keys are the twins' keys mirrored.
    fn peer(now: Instant) -> Session {
        let params = SessionParams {
            role: Role::Responder,
            suite: Suite::Aes256Gcm,
            local_index: 9,
            remote_index: 7,
            local_addr: node_address(&[2; 32]),
            remote_addr: node_address(&[1; 32]),
            remote_key: [1; 32],
            send_secret: [4; 32],
            recv_secret: [3; 32],
        };
        Session::new(params, TransportConfig::default(), now).expect("session")
    }

    #[test]
    fn seal_in_place_matches_seal_byte_for_byte() {
        let now = Instant::now();
        let (mut a, mut b) = twins(Role::Initiator, now);
        let header = a.default_header();
        for len in [0usize, 1, 15, 16, 17, 1328, 8000] {
            let plaintext: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let sealed = a.seal(&plaintext, &header, now).expect("seal");
            let mut buf = vec![0xa5u8; HEADER_LEN + len + TAG_LEN];
            buf[HEADER_LEN..HEADER_LEN + len].copy_from_slice(&plaintext);
            b.seal_in_place(&mut buf, &header, now)
                .expect("seal in place");
            assert_eq!(sealed, buf, "{len}-byte plaintext");
        }
        assert_eq!(
            b.seal_in_place(&mut [0u8; HEADER_LEN + TAG_LEN - 1], &header, now),
            Err(SealError::NoRoom(HEADER_LEN + TAG_LEN - 1))
        );
    }

    #[test]
    fn open_in_place_matches_open_and_rejects_the_same() {
        let now = Instant::now();
        let (mut a, _) = twins(Role::Initiator, now);
        let mut rx_copy = peer(now);
        let mut rx_in_place = peer(now);
        let header = a.default_header();
        for i in 0..20u32 {
            let plaintext = format!("packet {i}").repeat(i as usize).into_bytes();
            let sealed = a.seal(&plaintext, &header, now).expect("seal");
            let opened = rx_copy.open(&sealed, now).expect("open");
            let mut buf = sealed.clone();
            let range = rx_in_place
                .open_in_place(&mut buf, now)
                .expect("open in place");
            assert_eq!(opened, plaintext);
            assert_eq!(&buf[range], &plaintext[..]);
            // A replay fails both ways, and a tampered byte too.
            let mut replay = sealed.clone();
            assert_eq!(
                rx_in_place.open_in_place(&mut replay, now).err(),
                rx_copy.open(&sealed, now).err()
            );
        }
        let mut tampered = a.seal(b"x", &header, now).expect("seal");
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(rx_copy.open(&tampered, now), Err(OpenError::Authentication));
        assert_eq!(
            rx_in_place.open_in_place(&mut tampered.clone(), now),
            Err(OpenError::Authentication)
        );
        let mut short = vec![0u8; 3];
        assert!(rx_in_place.open_in_place(&mut short, now).is_err());
    }
}
