//! Everything per remote node: sessions by receiver index, pending handshakes with
//! retransmission, plaintext queued until a session is up, timers and events.
//!
//! The I/O shell's loop is:
//!
//! ```text
//! on datagram from the UDP socket:  table.handle_datagram(from, bytes, now, &rng)
//! on plaintext from the TUN device: table.send(dst, bytes, now, &rng)
//! on timer:                         table.handle_timeout(now)
//! then:  while let Some(t) = table.poll_transmit() { send t.datagram }
//!        while let Some(e) = table.poll_event()    { react to e }
//!        arm the timer at table.poll_timeout()
//! ```
//!
//! Per remote /64 the table keeps at most three sessions, in the spirit of WireGuard's
//! keypair slots: `current` (sends and receives), `previous` (receive only, for
//! `rekey_grace` after a newer session took over, so in-flight packets still open) and
//! `next` (a responder session the initiator has not yet confirmed by sending on it: a
//! replayed init must not displace a working session). Plus at most one outstanding
//! initiation of our own.
//!
//! Simultaneous initiation: when a verified init arrives from a peer we are ourselves
//! initiating to, the handshake started by the node with the numerically smaller static
//! public key wins. The smaller node ignores the peer's init (its own will be answered);
//! the larger node abandons its initiation and answers. Both end with one session pair.
//! A node also never starts an initiation while it holds an unconfirmed `next` from that
//! peer: the peer is already handshaking and will confirm shortly.

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use myconet_common::{
    addr::{
        LINK_ADDRESS, NODE_PREFIX_LEN, is_link_reserved, is_overlay, key_owns, mask, node_address,
    },
    wire::{self, Packet, PacketType, Repr},
};
use ring::rand::SecureRandom;

use crate::peers::LinkEndpoint;

use super::{
    Config, ConfigError, DataHeader, ExpiryReason, HandshakeError, InboundError, PUBLIC_KEY_LEN,
    RateLimiter, Role, SendError, Session, Signer, SignerError,
    cookie::CookieChecker,
    handshake::{self, Initiation},
    msg::{CookieReplyMsg, InitMsg, ResponseMsg},
    ratelimit::source_prefix,
};

/// Largest plaintext [`SessionTable::send`] accepts (one UDP datagram's worth).
const MAX_PLAINTEXT: usize = u16::MAX as usize - 8 - wire::HEADER_LEN - super::TAG_LEN;

/// A datagram for the I/O shell to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Overlay destination (the header's destination address); route on it when
    /// `underlay` is `None`.
    pub destination: Ipv6Addr,
    /// Send straight back to this underlay endpoint: set for handshake responses and
    /// cookie replies, which must go to where the init came from (not to a possibly
    /// spoofed overlay source) so they cannot be reflected elsewhere.
    pub underlay: Option<SocketAddr>,
    /// The complete Myconet datagram, header included.
    pub datagram: Vec<u8>,
}

/// Whom a session is with. End-to-end sessions belong to a remote node's /64 and their
/// packets are routed; link sessions belong to a neighbour's underlay endpoint (whoever
/// proves a key there) and their packets go straight to it. Both kinds share one table,
/// so one receiver-index space, one rate limiter and one cookie clock guard them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RemoteId {
    /// A remote node, by its /64.
    Node(Ipv6Addr),
    /// A neighbour, by its underlay endpoint.
    Link(LinkEndpoint),
}

impl RemoteId {
    /// The neighbour's endpoint for link sessions.
    pub fn link(&self) -> Option<LinkEndpoint> {
        match self {
            Self::Link(e) => Some(*e),
            Self::Node(_) => None,
        }
    }

    /// Where this remote's packets must go regardless of routes (link sessions only).
    fn underlay(&self) -> Option<SocketAddr> {
        self.link().map(|e| SocketAddr::V6(e.socket_addr()))
    }
}

/// Why an initiation gave up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailReason {
    /// Every retransmission went unanswered (or only forged answers came back).
    Timeout,
    /// The peer's signed response could not be turned into keys.
    Handshake(HandshakeError),
}

/// Something the agent should know about; drained with [`SessionTable::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A session with `remote` is up (as initiator: response verified; as responder: the
    /// initiator confirmed by sending on it). Queued plaintext has been sealed.
    Established {
        /// The peer's overlay address from the handshake.
        remote: Ipv6Addr,
        /// The peer's verified Ed25519 key.
        remote_key: [u8; PUBLIC_KEY_LEN],
        /// Our side of the handshake.
        role: Role,
        /// Our receiver index for the new session.
        local_index: u32,
        /// The neighbour's endpoint if this is a link session.
        link: Option<LinkEndpoint>,
    },
    /// An initiation to `remote` failed; `dropped` queued packets were discarded.
    Failed {
        /// The dialled address ([`LINK_ADDRESS`] for link handshakes).
        remote: Ipv6Addr,
        /// The neighbour's endpoint if this was a link handshake.
        link: Option<LinkEndpoint>,
        /// Why.
        reason: FailReason,
        /// Queued plaintext packets discarded.
        dropped: usize,
    },
    /// A session was removed; its receiver index is free again. On its own this says
    /// nothing about reachability: most removals are of sessions a newer handshake
    /// already replaced ([`ExpiryReason::Replaced`]) or of unconfirmed duplicates
    /// ([`ExpiryReason::Unconfirmed`]). [`Event::Lost`] follows when it mattered.
    Expired {
        /// The peer's overlay address.
        remote: Ipv6Addr,
        /// The removed session's receiver index.
        local_index: u32,
        /// Why.
        reason: ExpiryReason,
        /// The neighbour's endpoint if this was a link session.
        link: Option<LinkEndpoint>,
    },
    /// The remote has no session left that can send: the one in use was removed (idle,
    /// lifetime, closed) and no newer one had taken over. Follows the session's
    /// [`Event::Expired`]. The neighbour layer takes a link down on this event only, so
    /// a double handshake (a restarted neighbour, a simultaneous open, a rekey) never
    /// looks like a lost link.
    Lost {
        /// The peer's overlay address.
        remote: Ipv6Addr,
        /// Why the session in use was removed.
        reason: ExpiryReason,
        /// The neighbour's endpoint if this was a link session.
        link: Option<LinkEndpoint>,
    },
}

/// What an accepted datagram turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// Decrypted overlay traffic from `remote` (the authenticated header source).
    Data {
        /// Source overlay address.
        remote: Ipv6Addr,
        /// The plaintext.
        payload: Vec<u8>,
    },
    /// An authenticated empty packet: keeps the session alive, nothing to deliver.
    Keepalive {
        /// Source overlay address.
        remote: Ipv6Addr,
    },
    /// A link-session packet from a neighbour: a control message for the peer layer (an
    /// empty payload is a keepalive; it still proves the neighbour alive).
    Control {
        /// The neighbour's underlay endpoint (checked against the session's).
        endpoint: LinkEndpoint,
        /// The key the link handshake proved.
        remote_key: [u8; PUBLIC_KEY_LEN],
        /// The plaintext control message.
        payload: Vec<u8>,
    },
    /// A handshake message was consumed.
    Handshake(HandshakeProgress),
}

/// What a consumed handshake message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeProgress {
    /// A verified init was answered; the session waits for the initiator's first packet.
    Responded,
    /// A retransmitted init: the cached response was resent (or the session is already
    /// confirmed); no new state.
    DuplicateInit,
    /// Loaded: a cookie reply was sent instead; nothing was stored.
    CookieSent,
    /// Our own initiation to this peer wins the tie-break; its init was ignored.
    SimultaneousIgnored,
    /// A cookie reply for our initiation: the init was re-sent carrying the cookie.
    CookieAccepted,
    /// Our initiation completed.
    Established,
}

/// What [`SessionTable::send`] did with the plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendStatus {
    /// Sealed and queued for transmission.
    Sent,
    /// Held until a session is up.
    Queued {
        /// Whether this call started the handshake.
        handshake_started: bool,
    },
}

/// Counters the agent can export; error causes are returned to it typed instead.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Initiations started.
    pub handshakes_initiated: u64,
    /// Sessions established (both roles).
    pub handshakes_completed: u64,
    /// Initiations that failed.
    pub handshakes_failed: u64,
    /// HandshakeInit retransmissions.
    pub retransmissions: u64,
    /// Responses sent to verified inits (duplicates included).
    pub responses_sent: u64,
    /// Cookie replies sent.
    pub cookies_sent: u64,
    /// Inits refused by the rate limiter.
    pub rate_limited: u64,
    /// Inits ignored by the simultaneous-open tie-break.
    pub simultaneous_ignored: u64,
    /// Queued plaintext dropped (queue full, or the handshake failed).
    pub queue_dropped: u64,
    /// Keepalives sent.
    pub keepalives_sent: u64,
    /// Sessions removed.
    pub sessions_expired: u64,
}

struct Slot {
    /// Whom the session is with.
    peer: RemoteId,
    session: Session,
    /// Responder sessions: the initiator's ephemeral, to recognise duplicate inits.
    init_ephemeral: Option<[u8; 32]>,
    /// Unconfirmed responder sessions: the response, resent for duplicate inits.
    response: Option<Vec<u8>>,
}

struct Pending {
    initiation: Initiation,
    /// Transmissions so far, the first included.
    attempts: u32,
    retransmit_at: Instant,
    cookie_expires: Option<Instant>,
}

#[derive(Default)]
struct Peer {
    current: Option<u32>,
    /// Receive-only, until the instant.
    previous: Option<(u32, Instant)>,
    /// Unconfirmed responder session, dropped at the instant.
    next: Option<(u32, Instant)>,
    pending: Option<Pending>,
    pinned: Option<[u8; PUBLIC_KEY_LEN]>,
    queue: VecDeque<(Ipv6Addr, Vec<u8>)>,
    keepalive_due: Option<Instant>,
}

impl Peer {
    fn is_empty(&self) -> bool {
        self.current.is_none()
            && self.previous.is_none()
            && self.next.is_none()
            && self.pending.is_none()
            && self.queue.is_empty()
    }
}

/// Counts inits per second, the built-in load signal.
struct LoadMeter {
    window_start: Instant,
    count: u32,
}

/// All sessions and handshakes of one node. Pure state: feed it datagrams, plaintext and
/// time, drain transmits and events.
pub struct SessionTable {
    signer: Arc<dyn Signer>,
    local_key: [u8; PUBLIC_KEY_LEN],
    local_addr: Ipv6Addr,
    config: Config,
    peers: HashMap<RemoteId, Peer>,
    sessions: HashMap<u32, Slot>,
    pending_index: HashMap<u32, RemoteId>,
    cookies: CookieChecker,
    /// Per (last hop, overlay /64) initiator; see [`Config::rate_limit`].
    limiter: RateLimiter<(IpAddr, Ipv6Addr)>,
    /// Per last hop; see [`Config::source_rate_limit`].
    source_limiter: RateLimiter,
    load: LoadMeter,
    under_load: bool,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    stats: Stats,
}

impl std::fmt::Debug for SessionTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionTable")
            .field("local_addr", &self.local_addr)
            .field("sessions", &self.sessions.len())
            .field("peers", &self.peers.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl SessionTable {
    /// A table for the node whose identity `signer` holds; `now` starts the cookie clock.
    pub fn new(signer: Arc<dyn Signer>, config: Config, now: Instant) -> Result<Self, ConfigError> {
        config.validate()?;
        let key = signer.public_key();
        let local_key = <[u8; PUBLIC_KEY_LEN]>::try_from(key)
            .map_err(|_| SignerError::PublicKeyLength(key.len()))?;
        Ok(Self {
            signer,
            local_key,
            local_addr: node_address(&local_key),
            cookies: CookieChecker::new(config.cookie_rotation, now),
            limiter: RateLimiter::new(config.rate_limit)?,
            source_limiter: RateLimiter::new(config.source_rate_limit)?,
            config,
            peers: HashMap::new(),
            sessions: HashMap::new(),
            pending_index: HashMap::new(),
            load: LoadMeter {
                window_start: now,
                count: 0,
            },
            under_load: false,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
        })
    }

    /// This node's overlay address (source of its initiations).
    pub fn local_addr(&self) -> Ipv6Addr {
        self.local_addr
    }

    /// This node's static public key.
    pub fn local_key(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.local_key
    }

    /// The caller's load signal (e.g. a busy receive queue): while set, every init must
    /// carry a valid cookie before it costs a signature check.
    pub fn set_under_load(&mut self, under_load: bool) {
        self.under_load = under_load;
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Sessions held, all slots counted.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Handshake state held: our outstanding initiations plus unconfirmed responder
    /// sessions. A flood of unverified inits must leave this at zero.
    pub fn pending_handshakes(&self) -> usize {
        self.peers
            .values()
            .map(|p| usize::from(p.pending.is_some()) + usize::from(p.next.is_some()))
            .sum()
    }

    /// The session used for sending to `remote`'s /64, if one is up.
    pub fn current_session(&self, remote: Ipv6Addr) -> Option<&Session> {
        let peer = self
            .peers
            .get(&RemoteId::Node(mask(remote, NODE_PREFIX_LEN)))?;
        self.sessions.get(&peer.current?).map(|s| &s.session)
    }

    /// The link session with the neighbour at `endpoint`, if one is up.
    pub fn link_session(&self, endpoint: LinkEndpoint) -> Option<&Session> {
        let peer = self.peers.get(&RemoteId::Link(endpoint))?;
        self.sessions.get(&peer.current?).map(|s| &s.session)
    }

    /// The session with receiver index `index`, whatever its slot.
    pub fn session_by_index(&self, index: u32) -> Option<&Session> {
        self.sessions.get(&index).map(|s| &s.session)
    }

    /// Next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn node_id(&self, remote: Ipv6Addr) -> Result<RemoteId, SendError> {
        if !is_overlay(&remote) || is_link_reserved(&remote) {
            return Err(SendError::NotOverlay(remote));
        }
        if key_owns(&self.local_key, &remote) {
            return Err(SendError::SelfAddress(remote));
        }
        Ok(RemoteId::Node(mask(remote, NODE_PREFIX_LEN)))
    }

    /// Starts a handshake with `remote` now (if none is up or under way), optionally
    /// pinning the key it must present. `send` does this implicitly; call it to warm up a
    /// session or to pin a configured peer key.
    pub fn connect(
        &mut self,
        remote: Ipv6Addr,
        expected_key: Option<[u8; PUBLIC_KEY_LEN]>,
        now: Instant,
        rng: &dyn SecureRandom,
    ) -> Result<(), SendError> {
        let id = self.node_id(remote)?;
        if let Some(key) = expected_key {
            if !key_owns(&key, &remote) {
                return Err(SendError::KeyDoesNotOwn(remote));
            }
            self.peers.entry(id).or_default().pinned = Some(key);
        }
        self.connect_id(id, remote, now, rng)
    }

    /// Starts a handshake with `id` unless a usable session exists or one is under way.
    fn connect_id(
        &mut self,
        id: RemoteId,
        dialled: Ipv6Addr,
        now: Instant,
        rng: &dyn SecureRandom,
    ) -> Result<(), SendError> {
        if self.usable_current(id, now).is_none() {
            self.ensure_handshake(id, dialled, now, rng)?;
        }
        Ok(())
    }

    /// Starts a link handshake with the neighbour at `endpoint` unless one is under way
    /// (ours, or the neighbour's awaiting its confirmation). `expected_key` pins the key
    /// it must prove (a beacon announced it); `None` accepts whichever key answers there,
    /// which the [`Event::Established`] reports.
    ///
    /// Unlike [`SessionTable::connect`], a link session already up does not stop it: the
    /// neighbour layer asks only when it does not hold the link working (new, found
    /// dead, or retrying), and a session the neighbour may long have forgotten (it
    /// restarted) proves nothing. The old session keeps carrying packets
    /// until the new one replaces it.
    pub fn connect_link(
        &mut self,
        endpoint: LinkEndpoint,
        expected_key: Option<[u8; PUBLIC_KEY_LEN]>,
        now: Instant,
        rng: &dyn SecureRandom,
    ) -> Result<(), SendError> {
        let id = RemoteId::Link(endpoint);
        self.peers.entry(id).or_default().pinned = expected_key;
        self.ensure_handshake(id, LINK_ADDRESS, now, rng)?;
        Ok(())
    }

    /// Seals a control message for the neighbour at `endpoint` on its link session, or
    /// queues it and starts a link handshake.
    pub fn send_link(
        &mut self,
        endpoint: LinkEndpoint,
        plaintext: Vec<u8>,
        now: Instant,
        rng: &dyn SecureRandom,
    ) -> Result<SendStatus, SendError> {
        self.send_on(RemoteId::Link(endpoint), LINK_ADDRESS, plaintext, now, rng)
    }

    /// Forgets everything about the neighbour at `endpoint`: its link sessions (reported
    /// as expired, [`ExpiryReason::Closed`]), any link handshake and queued messages.
    pub fn close_link(&mut self, endpoint: LinkEndpoint) {
        let id = RemoteId::Link(endpoint);
        let indexes: Vec<u32> = self
            .sessions
            .iter()
            .filter(|(_, slot)| slot.peer == id)
            .map(|(i, _)| *i)
            .collect();
        for index in indexes {
            self.remove_session(index, ExpiryReason::Closed);
        }
        if let Some(peer) = self.peers.remove(&id)
            && let Some(pending) = peer.pending
        {
            self.pending_index.remove(&pending.initiation.local_index);
        }
    }

    /// Seals `plaintext` for `remote` if a session is up, else queues it (bounded, oldest
    /// dropped) and starts a handshake. Also starts a fresh handshake when the session in
    /// use nears its hard lifetime, so traffic moves over before it dies.
    pub fn send(
        &mut self,
        remote: Ipv6Addr,
        plaintext: Vec<u8>,
        now: Instant,
        rng: &dyn SecureRandom,
    ) -> Result<SendStatus, SendError> {
        let id = self.node_id(remote)?;
        self.send_on(id, remote, plaintext, now, rng)
    }

    fn send_on(
        &mut self,
        id: RemoteId,
        remote: Ipv6Addr,
        plaintext: Vec<u8>,
        now: Instant,
        rng: &dyn SecureRandom,
    ) -> Result<SendStatus, SendError> {
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(SendError::TooLarge(plaintext.len()));
        }
        if let Some(index) = self.usable_current(id, now)
            && self.seal_to(id, index, remote, &plaintext, now)
        {
            self.maybe_rehandshake(id, index, now, rng);
            return Ok(SendStatus::Sent);
        }
        let peer = self.peers.entry(id).or_default();
        if peer.queue.len() >= self.config.max_queued {
            peer.queue.pop_front();
            self.stats.queue_dropped += 1;
        }
        peer.queue.push_back((remote, plaintext));
        let handshake_started = self.ensure_handshake(id, remote, now, rng)?;
        Ok(SendStatus::Queued { handshake_started })
    }

    /// The current session's index if it can still send.
    fn usable_current(&self, id: RemoteId, now: Instant) -> Option<u32> {
        let index = self.peers.get(&id)?.current?;
        let slot = self.sessions.get(&index)?;
        slot.session.expiry(now).is_none().then_some(index)
    }

    /// Seals onto session `index` and queues the datagram; false if the session refused.
    /// Link sessions always address the neighbour as the handshake named it.
    fn seal_to(
        &mut self,
        id: RemoteId,
        index: u32,
        dst: Ipv6Addr,
        plaintext: &[u8],
        now: Instant,
    ) -> bool {
        let Some(slot) = self.sessions.get_mut(&index) else {
            return false;
        };
        let dst = match id {
            RemoteId::Link(_) => slot.session.remote_addr(),
            RemoteId::Node(_) => dst,
        };
        let header = DataHeader {
            hop_limit: wire::DEFAULT_HOP_LIMIT,
            src_addr: slot.session.local_addr(),
            dst_addr: dst,
        };
        match slot.session.seal(plaintext, &header, now) {
            Ok(datagram) => {
                self.transmits.push_back(Transmit {
                    destination: dst,
                    underlay: id.underlay(),
                    datagram,
                });
                if let Some(peer) = self.peers.get_mut(&id) {
                    peer.keepalive_due = None;
                }
                true
            }
            Err(_) => false,
        }
    }

    fn maybe_rehandshake(
        &mut self,
        id: RemoteId,
        index: u32,
        now: Instant,
        rng: &dyn SecureRandom,
    ) {
        let Some(slot) = self.sessions.get(&index) else {
            return;
        };
        let age = now.saturating_duration_since(slot.session.created());
        let due = self
            .config
            .transport
            .max_lifetime
            .saturating_sub(self.config.rehandshake_before);
        if age >= due {
            let remote = slot.session.remote_addr();
            // A failure (no randomness) is retried on the next send; the packet went out.
            let _ = self.ensure_handshake(id, remote, now, rng);
        }
    }

    /// Starts an initiation unless one is under way or the peer is mid-handshake with us.
    fn ensure_handshake(
        &mut self,
        id: RemoteId,
        dialled: Ipv6Addr,
        now: Instant,
        rng: &dyn SecureRandom,
    ) -> Result<bool, HandshakeError> {
        // Link sessions always dial the endpoint, never an address the session had.
        let dialled = match id {
            RemoteId::Link(_) => LINK_ADDRESS,
            RemoteId::Node(_) => dialled,
        };
        if let Some(peer) = self.peers.get(&id)
            && (peer.pending.is_some() || peer.next.is_some())
        {
            return Ok(false);
        }
        let index = self.fresh_index(rng)?;
        let pinned = self.peers.get(&id).and_then(|p| p.pinned);
        let initiation = Initiation::new(
            &*self.signer,
            self.local_key,
            self.local_addr,
            dialled,
            index,
            pinned,
            &self.config.suites,
            rng,
        )?;
        self.transmits.push_back(Transmit {
            destination: dialled,
            underlay: id.underlay(),
            datagram: initiation.message().to_vec(),
        });
        let retransmit_at = self.deadline(now, self.config.handshake_timeout);
        self.peers.entry(id).or_default().pending = Some(Pending {
            initiation,
            attempts: 1,
            retransmit_at,
            cookie_expires: None,
        });
        self.pending_index.insert(index, id);
        self.stats.handshakes_initiated += 1;
        Ok(true)
    }

    /// A random nonzero receiver index not in use here.
    fn fresh_index(&self, rng: &dyn SecureRandom) -> Result<u32, HandshakeError> {
        for _ in 0..16 {
            let mut b = [0u8; 4];
            rng.fill(&mut b).map_err(|_| HandshakeError::Random)?;
            let index = u32::from_be_bytes(b);
            if index != 0
                && !self.sessions.contains_key(&index)
                && !self.pending_index.contains_key(&index)
            {
                return Ok(index);
            }
        }
        Err(HandshakeError::Random)
    }

    fn deadline(&self, now: Instant, after: Duration) -> Instant {
        now.checked_add(after).unwrap_or(now)
    }

    /// Processes one datagram that arrived on the Myconet port from underlay endpoint
    /// `from`. Errors are typed so the caller can count each cause; none of them changes
    /// any session.
    pub fn handle_datagram(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        rng: &dyn SecureRandom,
    ) -> Result<Inbound, InboundError> {
        let packet = Packet::new_checked(datagram)?;
        let repr = Repr::parse(&packet)?;
        match repr.packet_type {
            // The session's own packet type is checked when it opens: a Data packet
            // never opens on a link session, nor Control on an end-to-end one.
            PacketType::Data | PacketType::Control => {
                self.handle_sealed(from, &repr, datagram, now)
            }
            PacketType::HandshakeInit => self.handle_init(from, datagram, now, rng),
            PacketType::HandshakeResponse => self.handle_response(datagram, now),
            PacketType::CookieReply => self.handle_cookie_reply(datagram, now),
            // Too-big reports are the path MTU layer's (`pmtu`), never a session's.
            PacketType::TooBig => Err(InboundError::NotSessionTraffic(PacketType::TooBig as u8)),
        }
    }

    fn handle_sealed(
        &mut self,
        from: SocketAddr,
        repr: &Repr,
        datagram: &[u8],
        now: Instant,
    ) -> Result<Inbound, InboundError> {
        let index = repr.session_id;
        let slot = self
            .sessions
            .get_mut(&index)
            .ok_or(InboundError::UnknownIndex(index))?;
        // A link session is bound to the neighbour's endpoint: what the peer layer
        // learns (liveness, RTT) must be about that endpoint, not wherever a copy came from.
        if let RemoteId::Link(endpoint) = slot.peer {
            let matches = match from {
                SocketAddr::V6(a) => LinkEndpoint::from(a) == endpoint,
                SocketAddr::V4(_) => false,
            };
            if !matches {
                return Err(InboundError::WrongEndpoint(from));
            }
        }
        let payload = slot.session.open(datagram, now)?;
        let remote_key = *slot.session.remote_key();
        let id = slot.peer;
        let remote = repr.src_addr;
        self.after_open(id, index, !payload.is_empty(), now);
        Ok(match id {
            RemoteId::Link(endpoint) => Inbound::Control {
                endpoint,
                remote_key,
                payload,
            },
            RemoteId::Node(_) if payload.is_empty() => Inbound::Keepalive { remote },
            RemoteId::Node(_) => Inbound::Data { remote, payload },
        })
    }

    /// Bookkeeping after a packet authenticated on session `index` of `id`: traffic
    /// (non-empty) arms a keepalive so the sender learns we are alive, and the first
    /// packet on an unconfirmed responder session makes it current.
    fn after_open(&mut self, id: RemoteId, index: u32, traffic: bool, now: Instant) {
        let keepalive_due = self.deadline(now, self.config.keepalive_after);
        let confirms = self
            .peers
            .get(&id)
            .is_some_and(|p| p.next.is_some_and(|(n, _)| n == index));
        if let Some(peer) = self.peers.get_mut(&id)
            && traffic
            && peer.keepalive_due.is_none()
        {
            peer.keepalive_due = Some(keepalive_due);
        }
        if confirms {
            self.install_current(id, index, now);
        }
    }

    /// Makes session `index` the one that sends to `id`: the old current becomes
    /// previous (receive-only for `rekey_grace`), the old previous goes. Then seals
    /// whatever was queued.
    fn install_current(&mut self, id: RemoteId, index: u32, now: Instant) -> usize {
        let retire = self.deadline(now, self.config.transport.rekey_grace);
        let Some(peer) = self.peers.get_mut(&id) else {
            return 0;
        };
        if peer.next.is_some_and(|(n, _)| n == index) {
            peer.next = None;
        }
        let old_previous = peer.previous.take().map(|(i, _)| i);
        if let Some(old) = peer.current.replace(index) {
            peer.previous = Some((old, retire));
        }
        if let Some(old) = old_previous {
            self.remove_session(old, ExpiryReason::Replaced);
        }
        let Some(slot) = self.sessions.get_mut(&index) else {
            return 0;
        };
        slot.response = None;
        self.stats.handshakes_completed += 1;
        self.events.push_back(Event::Established {
            remote: slot.session.remote_addr(),
            remote_key: *slot.session.remote_key(),
            role: slot.session.role(),
            local_index: index,
            link: id.link(),
        });
        self.flush_queue(id, index, now)
    }

    fn flush_queue(&mut self, id: RemoteId, index: u32, now: Instant) -> usize {
        let queued = match self.peers.get_mut(&id) {
            Some(peer) => std::mem::take(&mut peer.queue),
            None => return 0,
        };
        let mut sent = 0;
        for (dst, plaintext) in queued {
            if self.seal_to(id, index, dst, &plaintext, now) {
                sent += 1;
            } else {
                self.stats.queue_dropped += 1;
            }
        }
        sent
    }

    /// Removes a session from the table and its peer's slots, reporting it.
    fn remove_session(&mut self, index: u32, reason: ExpiryReason) {
        let Some(slot) = self.sessions.remove(&index) else {
            return;
        };
        let mut lost = false;
        if let Some(peer) = self.peers.get_mut(&slot.peer) {
            if peer.current == Some(index) {
                peer.current = None;
                lost = true;
            }
            if peer.previous.is_some_and(|(i, _)| i == index) {
                peer.previous = None;
            }
            if peer.next.is_some_and(|(i, _)| i == index) {
                peer.next = None;
            }
        }
        self.stats.sessions_expired += 1;
        let remote = slot.session.remote_addr();
        let link = slot.peer.link();
        self.events.push_back(Event::Expired {
            remote,
            local_index: index,
            reason,
            link,
        });
        if lost {
            self.events.push_back(Event::Lost {
                remote,
                reason,
                link,
            });
        }
    }

    /// Counts an init against the built-in load meter; true if cookies are required.
    fn loaded(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.load.window_start) >= Duration::from_secs(1) {
            self.load.window_start = now;
            self.load.count = 0;
        }
        self.load.count = self.load.count.saturating_add(1);
        self.under_load || self.load.count > self.config.load_threshold
    }

    fn handle_init(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        rng: &dyn SecureRandom,
    ) -> Result<Inbound, InboundError> {
        // Cheap checks first: structure, addressing, cookie, rate. No state before the
        // signature verifies.
        let msg = InitMsg::parse(datagram)?;
        let src = msg.header.src_addr;
        let dst = msg.header.dst_addr;
        if is_link_reserved(&src) {
            return Err(HandshakeError::ReservedAddress(src).into());
        }
        let id = if dst == LINK_ADDRESS {
            match from {
                SocketAddr::V6(a) => RemoteId::Link(LinkEndpoint::from(a)),
                SocketAddr::V4(_) => return Err(HandshakeError::ReservedAddress(dst).into()),
            }
        } else if key_owns(&self.local_key, &dst) {
            RemoteId::Node(mask(src, NODE_PREFIX_LEN))
        } else {
            return Err(HandshakeError::NotForUs(dst).into());
        };
        if msg.static_key == self.local_key || key_owns(&self.local_key, &src) {
            return Err(HandshakeError::SelfHandshake.into());
        }
        let loaded = self.loaded(now);
        let cookie_valid = msg
            .cookie
            .is_some_and(|c| self.cookies.verify(&c, from, src, now));
        // A valid cookie proves the sender receives at `src`, so it is not charged to
        // the last hop's shared bucket; without one, a last hop over its share must
        // have its initiators prove that first.
        if !cookie_valid && (loaded || !self.source_limiter.allow(from.ip(), now)) {
            let cookie = self
                .cookies
                .make(from, src, now, rng)
                .map_err(|_| HandshakeError::Random)?;
            self.transmits.push_back(Transmit {
                destination: src,
                underlay: Some(from),
                datagram: handshake::cookie_reply(&msg, &cookie),
            });
            self.stats.cookies_sent += 1;
            return Ok(Inbound::Handshake(HandshakeProgress::CookieSent));
        }
        let initiator = (
            source_prefix(from.ip(), self.limiter.prefix_len()),
            mask(src, NODE_PREFIX_LEN),
        );
        if !self.limiter.allow_key(initiator, now) {
            self.stats.rate_limited += 1;
            return Err(InboundError::RateLimited(from.ip()));
        }
        let verified = handshake::verify_init(msg)?;

        // Verified: the initiator holds the key that owns `src`.
        let m = &verified.msg;
        if let Some(peer) = self.peers.get(&id)
            && peer.pinned.is_some_and(|k| k != m.static_key)
        {
            return Err(HandshakeError::UnexpectedKey(src).into());
        }
        let suite = handshake::choose_suite(m.suites, &self.config.suites)
            .ok_or(HandshakeError::NoCommonSuite)?;
        if let Some(progress) = self.duplicate_init(id, &m.ephemeral, from) {
            return Ok(Inbound::Handshake(progress));
        }
        if let Some(peer) = self.peers.get_mut(&id)
            && let Some(pending) = &peer.pending
        {
            // Simultaneous initiation: the smaller static key's handshake wins.
            if self.local_key < m.static_key {
                self.stats.simultaneous_ignored += 1;
                return Ok(Inbound::Handshake(HandshakeProgress::SimultaneousIgnored));
            }
            self.pending_index.remove(&pending.initiation.local_index);
            peer.pending = None;
        }
        if self.sessions.len() >= self.config.max_sessions && !self.evict_unconfirmed() {
            return Err(HandshakeError::TableFull.into());
        }
        let index = self.fresh_index(rng)?;
        let (response, session) = handshake::respond(
            &*self.signer,
            &self.local_key,
            &verified,
            index,
            suite,
            self.config.transport,
            now,
            rng,
        )?;
        let session = match id {
            RemoteId::Link(_) => session.into_link(),
            RemoteId::Node(_) => session,
        };
        let old_next = self.peers.get(&id).and_then(|p| p.next).map(|(i, _)| i);
        if let Some(old) = old_next {
            self.remove_session(old, ExpiryReason::Unconfirmed);
        }
        self.sessions.insert(
            index,
            Slot {
                peer: id,
                session,
                init_ephemeral: Some(verified.msg.ephemeral),
                response: Some(response.clone()),
            },
        );
        let drop_at = self.deadline(now, self.config.unconfirmed_timeout);
        self.peers.entry(id).or_default().next = Some((index, drop_at));
        self.transmits.push_back(Transmit {
            destination: src,
            underlay: Some(from),
            datagram: response,
        });
        self.stats.responses_sent += 1;
        Ok(Inbound::Handshake(HandshakeProgress::Responded))
    }

    /// A verified init whose ephemeral we already answered: resend the response while the
    /// session is unconfirmed, otherwise just ignore it. Never new state.
    fn duplicate_init(
        &mut self,
        id: RemoteId,
        ephemeral: &[u8; 32],
        from: SocketAddr,
    ) -> Option<HandshakeProgress> {
        let peer = self.peers.get(&id)?;
        let slots = [
            peer.next.map(|(i, _)| i),
            peer.current,
            peer.previous.map(|(i, _)| i),
        ];
        let slot = slots
            .into_iter()
            .flatten()
            .filter_map(|i| self.sessions.get(&i))
            .find(|s| s.init_ephemeral.as_ref() == Some(ephemeral))?;
        if let Some(response) = &slot.response {
            self.transmits.push_back(Transmit {
                destination: slot.session.remote_addr(),
                underlay: Some(from),
                datagram: response.clone(),
            });
            self.stats.responses_sent += 1;
        }
        Some(HandshakeProgress::DuplicateInit)
    }

    /// Frees room by dropping the oldest unconfirmed responder session; false if none.
    fn evict_unconfirmed(&mut self) -> bool {
        let oldest = self
            .peers
            .values()
            .filter_map(|p| p.next)
            .min_by_key(|(_, at)| *at)
            .map(|(i, _)| i);
        match oldest {
            Some(index) => {
                self.remove_session(index, ExpiryReason::Unconfirmed);
                true
            }
            None => false,
        }
    }

    fn handle_response(&mut self, datagram: &[u8], now: Instant) -> Result<Inbound, InboundError> {
        let msg = ResponseMsg::parse(datagram)?;
        let index = msg.header.session_id;
        let id = *self
            .pending_index
            .get(&index)
            .ok_or(InboundError::UnknownIndex(index))?;
        let peer = self
            .peers
            .get_mut(&id)
            .ok_or(InboundError::UnknownIndex(index))?;
        let pending = peer
            .pending
            .as_ref()
            .ok_or(InboundError::UnknownIndex(index))?;
        let verified = pending.initiation.verify_response(&msg)?;
        // Authentic: the initiation is over either way.
        self.pending_index.remove(&index);
        let Some(pending) = peer.pending.take() else {
            return Err(InboundError::UnknownIndex(index));
        };
        let remote = pending.initiation.remote_addr;
        match pending
            .initiation
            .complete(verified, self.config.transport, now)
        {
            Ok(session) => {
                let session = match id {
                    RemoteId::Link(_) => session.into_link(),
                    RemoteId::Node(_) => session,
                };
                self.sessions.insert(
                    index,
                    Slot {
                        peer: id,
                        session,
                        init_ephemeral: None,
                        response: None,
                    },
                );
                let flushed = self.install_current(id, index, now);
                if flushed == 0 {
                    // Confirm the session to the responder right away.
                    if self.seal_to(id, index, remote, &[], now) {
                        self.stats.keepalives_sent += 1;
                    }
                }
                Ok(Inbound::Handshake(HandshakeProgress::Established))
            }
            Err(e) => {
                self.fail(id, remote, FailReason::Handshake(e.clone()));
                Err(e.into())
            }
        }
    }

    fn fail(&mut self, id: RemoteId, remote: Ipv6Addr, reason: FailReason) {
        let dropped = match self.peers.get_mut(&id) {
            Some(peer) => {
                let n = peer.queue.len();
                peer.queue.clear();
                n
            }
            None => 0,
        };
        self.stats.queue_dropped += dropped as u64;
        self.stats.handshakes_failed += 1;
        self.events.push_back(Event::Failed {
            remote,
            link: id.link(),
            reason,
            dropped,
        });
    }

    fn handle_cookie_reply(
        &mut self,
        datagram: &[u8],
        now: Instant,
    ) -> Result<Inbound, InboundError> {
        let msg = CookieReplyMsg::parse(datagram)?;
        let index = msg.header.session_id;
        let id = *self
            .pending_index
            .get(&index)
            .ok_or(InboundError::UnknownIndex(index))?;
        let cookie_expires = self.deadline(now, self.config.cookie_rotation);
        let retransmit_after = self.config.handshake_timeout;
        let peer = self
            .peers
            .get_mut(&id)
            .ok_or(InboundError::UnknownIndex(index))?;
        let pending = peer
            .pending
            .as_mut()
            .ok_or(InboundError::UnknownIndex(index))?;
        let cookie = pending.initiation.check_cookie_reply(&msg)?;
        if pending.initiation.cookie() == Some(&cookie) {
            // Already carrying this cookie: repeated replies must not make us resend.
            return Ok(Inbound::Handshake(HandshakeProgress::CookieAccepted));
        }
        pending.initiation.set_cookie(Some(cookie), &*self.signer)?;
        pending.cookie_expires = Some(cookie_expires);
        pending.retransmit_at = now.checked_add(retransmit_after).unwrap_or(now);
        let remote = pending.initiation.remote_addr;
        let datagram = pending.initiation.message().to_vec();
        self.transmits.push_back(Transmit {
            destination: remote,
            underlay: id.underlay(),
            datagram,
        });
        Ok(Inbound::Handshake(HandshakeProgress::CookieAccepted))
    }

    /// The earliest instant [`SessionTable::handle_timeout`] has work: a retransmission,
    /// cookie expiry, keepalive, key retirement or session expiry. O(sessions).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let peers = self.peers.values().flat_map(|p| {
            [
                p.pending.as_ref().map(|x| x.retransmit_at),
                p.pending.as_ref().and_then(|x| x.cookie_expires),
                p.previous.map(|(_, at)| at),
                p.next.map(|(_, at)| at),
                p.keepalive_due,
            ]
        });
        let sessions = self.sessions.values().map(|s| s.session.next_timeout());
        peers.chain(sessions).flatten().min()
    }

    /// Does everything due at `now`: retransmits or fails initiations (exponential
    /// backoff, bounded attempts), drops stale cookies, sends keepalives, retires old
    /// keys and removes expired sessions (reported as [`Event::Expired`]).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.pending_timeouts(now);
        self.keepalives(now);

        let mut expired: Vec<(u32, ExpiryReason)> = Vec::new();
        for (index, slot) in &mut self.sessions {
            slot.session.handle_timeout(now);
            if let Some(reason) = slot.session.expiry(now) {
                // A session already superseded ends as replaced, whatever ran out first.
                let reason = match self.peers.get(&slot.peer) {
                    Some(p) if p.previous.is_some_and(|(i, _)| i == *index) => {
                        ExpiryReason::Replaced
                    }
                    Some(p) if p.next.is_some_and(|(i, _)| i == *index) => {
                        ExpiryReason::Unconfirmed
                    }
                    _ => reason,
                };
                expired.push((*index, reason));
            }
        }
        for peer in self.peers.values() {
            if let Some((index, at)) = peer.previous
                && now >= at
            {
                expired.push((index, ExpiryReason::Replaced));
            }
            if let Some((index, at)) = peer.next
                && now >= at
            {
                expired.push((index, ExpiryReason::Unconfirmed));
            }
        }
        expired.sort_unstable_by_key(|(i, _)| *i);
        expired.dedup_by_key(|(i, _)| *i);
        for (index, reason) in expired {
            self.remove_session(index, reason);
        }
        self.peers
            .retain(|_, p| !p.is_empty() || p.pinned.is_some());
    }

    fn pending_timeouts(&mut self, now: Instant) {
        let mut failed = Vec::new();
        for (id, peer) in &mut self.peers {
            let Some(pending) = &mut peer.pending else {
                continue;
            };
            if pending.cookie_expires.is_some_and(|at| now >= at) {
                pending.cookie_expires = None;
                // Re-signing cannot fail with a working signer; if it does, keep the old
                // (merely stale) cookie rather than lose the initiation.
                let _ = pending.initiation.set_cookie(None, &*self.signer);
            }
            if now < pending.retransmit_at {
                continue;
            }
            if pending.attempts >= self.config.handshake_attempts {
                failed.push((
                    *id,
                    pending.initiation.remote_addr,
                    pending.initiation.local_index,
                ));
                continue;
            }
            let backoff = self
                .config
                .handshake_timeout
                .saturating_mul(1u32 << pending.attempts.min(16))
                .min(self.config.handshake_max_timeout);
            pending.attempts += 1;
            pending.retransmit_at = now.checked_add(backoff).unwrap_or(now);
            self.stats.retransmissions += 1;
            self.transmits.push_back(Transmit {
                destination: pending.initiation.remote_addr,
                underlay: id.underlay(),
                datagram: pending.initiation.message().to_vec(),
            });
        }
        for (id, remote, index) in failed {
            self.pending_index.remove(&index);
            if let Some(peer) = self.peers.get_mut(&id) {
                peer.pending = None;
            }
            self.fail(id, remote, FailReason::Timeout);
        }
    }

    fn keepalives(&mut self, now: Instant) {
        let due: Vec<RemoteId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.keepalive_due.is_some_and(|at| now >= at))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            if let Some(peer) = self.peers.get_mut(&id) {
                peer.keepalive_due = None;
            }
            let Some(index) = self.usable_current(id, now) else {
                continue;
            };
            let Some(remote) = self.sessions.get(&index).map(|s| s.session.remote_addr()) else {
                continue;
            };
            if self.seal_to(id, index, remote, &[], now) {
                self.stats.keepalives_sent += 1;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The batched data path: the TUN and underlay loops hand over whole batches (a TCP
// superpacket's segments, a recvmmsg/GRO batch) under one lock, sealed and opened in the
// callers' buffers, so the hot path neither allocates nor looks the session up per packet.
// ---------------------------------------------------------------------------------------

impl SessionTable {
    /// Seals, in place and in order, packets for `remote` on its current session, looked
    /// up once for the whole run: each buffer is a datagram to be, with the plaintext at
    /// `HEADER_LEN..len - TAG_LEN` (see [`Session::seal_in_place`]).
    ///
    /// Returns how many buffers, from the front, were sealed. Fewer than all (0 when no
    /// session is up) means the rest must go through [`SessionTable::send`], which
    /// queues them and starts a handshake; nothing is queued here. Like `send`, it starts
    /// a fresh handshake when the session nears its hard lifetime.
    pub fn seal_in_place_batch<'a, I>(
        &mut self,
        remote: Ipv6Addr,
        bufs: I,
        now: Instant,
        rng: &dyn SecureRandom,
    ) -> Result<usize, SendError>
    where
        I: IntoIterator<Item = &'a mut [u8]>,
    {
        let id = self.node_id(remote)?;
        let Some(index) = self.usable_current(id, now) else {
            return Ok(0);
        };
        let Some(slot) = self.sessions.get_mut(&index) else {
            return Ok(0);
        };
        let header = DataHeader {
            hop_limit: wire::DEFAULT_HOP_LIMIT,
            src_addr: slot.session.local_addr(),
            dst_addr: remote,
        };
        let mut sealed = 0;
        for buf in bufs {
            if slot.session.seal_in_place(buf, &header, now).is_err() {
                break;
            }
            sealed += 1;
        }
        if sealed > 0 {
            if let Some(peer) = self.peers.get_mut(&id) {
                peer.keepalive_due = None;
            }
            self.maybe_rehandshake(id, index, now, rng);
        }
        Ok(sealed)
    }

    /// [`SessionTable::handle_datagram`] for one `Data` datagram, decrypted where it lies:
    /// returns the authenticated remote (the header's source) and where the plaintext now
    /// is in `datagram`; an empty range is a keepalive. Same checks, errors and state
    /// changes (replay window, keepalive timer, confirming a responder session).
    pub fn open_in_place(
        &mut self,
        datagram: &mut [u8],
        now: Instant,
    ) -> Result<(Ipv6Addr, std::ops::Range<usize>), InboundError> {
        let repr = Repr::parse(&Packet::new_checked(&*datagram)?)?;
        if repr.packet_type != PacketType::Data {
            return Err(InboundError::Open(super::OpenError::NotData(
                repr.packet_type as u8,
            )));
        }
        let index = repr.session_id;
        let slot = self
            .sessions
            .get_mut(&index)
            .ok_or(InboundError::UnknownIndex(index))?;
        let range = slot.session.open_in_place(datagram, now)?;
        let id = slot.peer;
        self.after_open(id, index, !range.is_empty(), now);
        Ok((repr.src_addr, range))
    }
}

// ---------------------------------------------------------------------------------------
// Path MTU: what a too-big report may quote.
// ---------------------------------------------------------------------------------------

impl SessionTable {
    /// Whether a `Data` packet with this session index (the remote's receiver index, as
    /// in the header) and counter left this node recently on its current or previous
    /// session to `remote`'s /64: a too-big report must quote such a packet (`pmtu`),
    /// and only the path it took has seen one.
    pub fn sent_recently(&self, remote: Ipv6Addr, session_id: u32, counter: u64) -> bool {
        let Some(peer) = self
            .peers
            .get(&RemoteId::Node(mask(remote, NODE_PREFIX_LEN)))
        else {
            return false;
        };
        [peer.current, peer.previous.map(|(index, _)| index)]
            .into_iter()
            .flatten()
            .filter_map(|index| self.sessions.get(&index))
            .any(|slot| {
                !slot.session.is_link()
                    && slot.session.remote_index() == session_id
                    && slot.session.sent_recently(counter)
            })
    }
}
