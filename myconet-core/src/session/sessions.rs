//! Everything per remote node: sessions by receiver index, pending handshakes with
//! retransmission, plaintext queued until a session is up, timers and events.
//!
//! The I/O shell's loop is:
//!
//! ```text
//! on datagram from the UDP socket:  table.handle_datagram(from, bytes, now, &rng)
//!   (or, for HandshakeInits, screen_init under the lock, InitJob::run outside it,
//!    finish_init under it again: the signature work never holds up the data path)
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
//! public key wins. The smaller node ignores the peer's init (its own will be answered)
//! unless its own has gone unanswered for a retransmission timeout (then it was likely
//! lost, and it answers instead); the larger node holds its initiation back (no
//! retransmission for a timeout) and answers. When the peer confirms the session it
//! was answered with, the held-back initiation is dropped; if nobody confirms (the init
//! was a replay), it goes on. Likewise a node holding an unconfirmed `next` from a peer
//! waits a retransmission timeout for its confirmation before initiating itself.
//!
//! Half-open sessions (the peer restarted or dropped its half) are found two ways: a
//! sender that has sent data and authenticated nothing back for
//! `rehandshake_after_silence` starts a new handshake (the peer, given data, answers
//! within `keepalive_after`), and a node receiving `Data` for a session index it does
//! not have starts a handshake towards the packet's source itself (rate limited; the
//! handshake, not the packet, is what the sender trusts).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::{Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use myconet_common::{
    addr::{
        LINK_ADDRESS, NODE_PREFIX_LEN, is_link_reserved, is_overlay, key_owns, key_owns_prefix,
        mask, node_address,
    },
    wire::{self, Packet, PacketType, Repr},
};
use ring::{digest, rand::SecureRandom};

use crate::id::LinkEndpoint;
use crate::pins::{self, PinCheck, SharedPins};

use super::{
    Config, ConfigError, DataHeader, ExpiryReason, HandshakeError, InboundError, PUBLIC_KEY_LEN,
    RateLimiter, Role, SendError, Session, Signer, SignerError, Suite,
    admission::{InitGate, Limit, Verdict},
    freshness::{InitClock, InitiatorClocks, RejectedInits},
    handshake::{self, Initiation, VerifiedInit},
    msg::{CookieReplyMsg, InitMsg, ResponseMsg, WireEndpoint, init},
    timers::{TimerKey, Timers},
    transport::TransportConfig,
};

/// Largest plaintext [`SessionTable::send`] accepts (one UDP datagram's worth).
const MAX_PLAINTEXT: usize = u16::MAX as usize - 8 - wire::HEADER_LEN - super::TAG_LEN;

/// Digests of forged inits remembered, so identical copies cost no second check.
const REJECTED_INITS: usize = 4096;

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
    /// Inits refused by a rate limit or the verification budget.
    pub rate_limited: u64,
    /// Of those, refused by the node's verification budget.
    pub budget_exhausted: u64,
    /// Of those, dropped unanswered because their last hop had its share of cookie
    /// replies.
    pub cookie_replies_withheld: u64,
    /// Inits whose signature this node checked (the expensive step a flood aims at).
    pub inits_verified: u64,
    /// Inits refused because they were not newer than one already accepted from that
    /// initiator (replays), without a signature check.
    pub inits_replayed: u64,
    /// Copies of inits already found forged, refused without a second check.
    pub inits_known_bad: u64,
    /// Inits ignored by the simultaneous-open tie-break.
    pub simultaneous_ignored: u64,
    /// Queued plaintext dropped (queue full, or the handshake failed).
    pub queue_dropped: u64,
    /// Keepalives sent.
    pub keepalives_sent: u64,
    /// Sessions removed.
    pub sessions_expired: u64,
    /// Handshakes started because data went out and nothing came back for
    /// `rehandshake_after_silence`.
    pub silence_rehandshakes: u64,
    /// Handshakes started towards the source of a `Data` packet for an unknown session.
    pub unknown_session_prompts: u64,
    /// Initiations refused: too many under way, or new ones over their rate.
    pub initiations_throttled: u64,
}

struct Slot {
    /// Whom the session is with.
    peer: RemoteId,
    session: Session,
    /// Responder sessions: the initiator's ephemeral, to recognise duplicate inits.
    init_ephemeral: Option<[u8; 32]>,
    /// Unconfirmed responder sessions: the response, resent for duplicate inits.
    response: Option<Vec<u8>>,
    /// How many more times the response may be resent: as often as an initiator
    /// retransmits, so copies of one init cannot make this node a reflector.
    resends_left: u32,
    /// The deadline this session is armed with in the timer heap.
    timer: Option<Instant>,
}

struct Pending {
    initiation: Initiation,
    /// Transmissions so far, the first included; 0 while held back (see `held`).
    attempts: u32,
    /// When the init is next (re)sent.
    retransmit_at: Instant,
    /// When the init first went out; `None` while it never has.
    first_sent: Option<Instant>,
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
    /// Since when data has been sent to this peer with nothing authenticated back.
    unanswered_since: Option<Instant>,
    /// The deadline this peer is armed with in the timer heap.
    timer: Option<Instant>,
}

impl Peer {
    fn is_empty(&self) -> bool {
        self.current.is_none()
            && self.previous.is_none()
            && self.next.is_none()
            && self.pending.is_none()
            && self.queue.is_empty()
    }

    /// The earliest instant something is due for this peer.
    fn deadline(&self) -> Option<Instant> {
        [
            self.pending.as_ref().map(|x| x.retransmit_at),
            self.pending.as_ref().and_then(|x| x.cookie_expires),
            self.previous.map(|(_, at)| at),
            self.next.map(|(_, at)| at),
            self.keepalive_due,
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// An init that passed every cheap check and now needs the expensive ones: its
/// signature verified and, if that holds, the response and session built. That work
/// needs none of the table's state, so [`InitJob::run`] does it wherever the caller
/// likes (the agent: outside the lock its data path takes); [`SessionTable::finish_init`]
/// then applies the outcome, re-checking whatever may have changed meanwhile.
pub struct InitJob {
    msg: InitMsg,
    id: RemoteId,
    from: SocketAddr,
    digest: [u8; 32],
    suite: Suite,
    signer: Arc<dyn Signer>,
    local_key: [u8; PUBLIC_KEY_LEN],
    transport: TransportConfig,
    now: Instant,
}

impl std::fmt::Debug for InitJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitJob")
            .field("id", &self.id)
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

/// What [`InitJob::run`] produced, for [`SessionTable::finish_init`].
pub struct InitOutcome {
    id: RemoteId,
    from: SocketAddr,
    digest: [u8; 32],
    result: Result<Answer, HandshakeError>,
}

impl std::fmt::Debug for InitOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitOutcome")
            .field("id", &self.id)
            .field("from", &self.from)
            .field("ok", &self.result.is_ok())
            .finish_non_exhaustive()
    }
}

/// A verified init and the response built for it.
struct Answer {
    init: VerifiedInit,
    index: u32,
    response: Vec<u8>,
    session: Session,
}

impl InitJob {
    /// Verifies the init's identity and signature and, if they hold, builds the signed
    /// response and the unconfirmed session under a random receiver index (checked for
    /// uniqueness when applied). Pure computation: about 130 µs of it.
    pub fn run(self, rng: &dyn SecureRandom) -> InitOutcome {
        let result = (|| {
            let init = handshake::verify_init(self.msg)?;
            let mut index = [0u8; 4];
            rng.fill(&mut index).map_err(|_| HandshakeError::Random)?;
            let index = u32::from_be_bytes(index).max(1);
            let observed = match self.id {
                RemoteId::Link(_) => WireEndpoint::of(self.from),
                RemoteId::Node(_) => None,
            };
            let (response, session) = handshake::respond(
                &*self.signer,
                &self.local_key,
                &init,
                index,
                self.suite,
                observed,
                self.transport,
                self.now,
                rng,
            )?;
            let session = match self.id {
                RemoteId::Link(_) => session.into_link(),
                RemoteId::Node(_) => session,
            };
            Ok(Answer {
                init,
                index,
                response,
                session,
            })
        })();
        InitOutcome {
            id: self.id,
            from: self.from,
            digest: self.digest,
            result,
        }
    }
}

/// What [`SessionTable::screen_init`] decided.
#[derive(Debug)]
pub enum Screened {
    /// Handled without signature work (a cookie reply, a duplicate, an ignored init).
    Done(Inbound),
    /// Worth verifying: run the job, then hand its outcome to
    /// [`SessionTable::finish_init`]. Boxed: the job carries the whole init.
    Verify(Box<InitJob>),
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
    timers: Timers,
    /// What decides which inits are verified (cookies, buckets, budget, load).
    gate: InitGate,
    /// This node's init timestamps.
    clock: InitClock,
    /// The newest timestamp accepted per initiator.
    initiators: InitiatorClocks,
    /// Inits already found forged.
    rejected: RejectedInits,
    /// This node's underlay port and addresses, which link handshakes are bound to;
    /// `None` until the I/O shell says, and then link handshakes are refused.
    local_underlay: Option<(u16, HashSet<Ipv6Addr>)>,
    /// New end-to-end initiations; see [`Config::initiation_rate`].
    initiation_rate: RateLimiter<()>,
    /// Prompts by unknown session indexes, per remote /64 and overall.
    prompts: RateLimiter<Ipv6Addr>,
    prompt_budget: RateLimiter<()>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    stats: Stats,
    /// Keys pinned per /64 (`crate::pins`), shared with routing; see [`pin_allows`].
    pins: Option<SharedPins>,
}

/// Whether `key`, which proved it owns the address `remote` in full, may also have the
/// /64 of `remote`: no other key is pinned for it (the key is then pinned). Sessions are
/// keyed by /64, so without this a second key owning the same /64 (the identity proof of
/// work makes that 2^64 trials) could take over the session of a node already known.
/// Link dials (`LINK_ADDRESS`) name no overlay address and are not pinned here.
fn pin_allows(pins: &Option<SharedPins>, remote: Ipv6Addr, key: &[u8; PUBLIC_KEY_LEN]) -> bool {
    let Some(pins) = pins else {
        return true;
    };
    remote == LINK_ADDRESS
        || pins::lock(pins).check((u128::from(remote) >> 64) as u64, key) != PinCheck::Conflict
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
    /// A table for the node whose identity `signer` holds; `now` starts the cookie clock
    /// and anchors the system clock, which the timestamps of this node's inits follow.
    pub fn new(signer: Arc<dyn Signer>, config: Config, now: Instant) -> Result<Self, ConfigError> {
        let unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Self::with_unix_time(signer, config, now, unix)
    }

    /// [`SessionTable::new`] with the wall clock given: `unix` is the time since the Unix
    /// epoch at `now` (tests simulate clocks with it).
    pub fn with_unix_time(
        signer: Arc<dyn Signer>,
        config: Config,
        now: Instant,
        unix: Duration,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let key = signer.public_key();
        let local_key = <[u8; PUBLIC_KEY_LEN]>::try_from(key)
            .map_err(|_| SignerError::PublicKeyLength(key.len()))?;
        Ok(Self {
            signer,
            local_key,
            local_addr: node_address(&local_key),
            gate: InitGate::new(&config, now)?,
            clock: InitClock::new(now, unix),
            initiators: InitiatorClocks::new(config.max_initiator_clocks),
            rejected: RejectedInits::new(REJECTED_INITS),
            local_underlay: None,
            initiation_rate: RateLimiter::new(config.initiation_rate)?,
            prompts: RateLimiter::new(config.prompt_rate_limit)?,
            prompt_budget: RateLimiter::new(config.prompt_budget)?,
            config,
            peers: HashMap::new(),
            sessions: HashMap::new(),
            pending_index: HashMap::new(),
            timers: Timers::default(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
            pins: None,
        })
    }

    /// This node's underlay port and addresses (from the I/O shell's view of its
    /// interfaces). A link handshake is only answered when the endpoint it was sent to
    /// is one of these, and only completed when the responder heard it from one of
    /// these: see [`HandshakeError::EndpointMismatch`].
    pub fn set_local_underlay(&mut self, port: u16, addrs: impl IntoIterator<Item = Ipv6Addr>) {
        self.local_underlay = Some((port, addrs.into_iter().collect()));
    }

    fn owns_endpoint(&self, endpoint: Option<WireEndpoint>) -> Result<(), HandshakeError> {
        let owned = match (&self.local_underlay, endpoint) {
            (Some((port, addrs)), Some(ep)) => ep.port == *port && addrs.contains(&ep.addr),
            _ => false,
        };
        if owned {
            Ok(())
        } else {
            Err(HandshakeError::EndpointMismatch(endpoint.map_or_else(
                || "no endpoint".to_string(),
                |e| e.to_string(),
            )))
        }
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
        self.gate.set_under_load(under_load);
    }

    /// Re-anchors the wall clock the timestamps of this node's inits follow: `unix` is
    /// the time since the Unix epoch at `now`. Timestamps never go back because of it.
    pub fn set_unix_time(&mut self, now: Instant, unix: Duration) {
        self.clock.set(now, unix);
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

    /// Pins remote keys per /64 through `pins` from now on (see [`pin_allows`]).
    pub fn set_pins(&mut self, pins: SharedPins) {
        self.pins = Some(pins);
    }

    /// Whether anything waits in [`SessionTable::poll_transmit`] or
    /// [`SessionTable::poll_event`]: a caller that finds nothing need not drain (an init
    /// refused or answered silently from the cache produced nothing).
    pub fn has_output(&self) -> bool {
        !self.transmits.is_empty() || !self.events.is_empty()
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
        if key_owns_prefix(&self.local_key, &remote) {
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
    /// use nears its hard lifetime, or when it seems half-open (data sent, nothing heard
    /// back for `rehandshake_after_silence`), so traffic moves over before it is lost.
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
        // Start (or join) the handshake before queuing, so a throttled one queues nothing.
        let handshake_started = self.ensure_handshake(id, remote, now, rng)?;
        let peer = self.peers.entry(id).or_default();
        if peer.queue.len() >= self.config.max_queued {
            peer.queue.pop_front();
            self.stats.queue_dropped += 1;
        }
        peer.queue.push_back((remote, plaintext));
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
                self.note_sent(id, !plaintext.is_empty(), now);
                true
            }
            Err(_) => false,
        }
    }

    /// Bookkeeping after sealing onto a session of `id`: whatever was sent replaces a
    /// keepalive, and traffic starts the silence clock unless it is already running.
    fn note_sent(&mut self, id: RemoteId, traffic: bool, now: Instant) {
        if let Some(peer) = self.peers.get_mut(&id) {
            peer.keepalive_due = None;
            if traffic && matches!(id, RemoteId::Node(_)) && peer.unanswered_since.is_none() {
                peer.unanswered_since = Some(now);
            }
        }
    }

    /// After a send on session `index`: starts a fresh handshake when the session nears
    /// its hard lifetime, or when data has gone out for `rehandshake_after_silence` with
    /// nothing authenticated back (the peer has most likely lost its half).
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
        let remote = slot.session.remote_addr();
        let age = now.saturating_duration_since(slot.session.created());
        let due = self
            .config
            .transport
            .max_lifetime
            .saturating_sub(self.config.rehandshake_before);
        let silent = self
            .peers
            .get(&id)
            .and_then(|p| p.unanswered_since)
            .is_some_and(|since| {
                now.saturating_duration_since(since) >= self.config.rehandshake_after_silence
            });
        if silent {
            // Once per silence period: the handshake runs its own retransmissions.
            if let Some(peer) = self.peers.get_mut(&id) {
                peer.unanswered_since = Some(now);
            }
            if matches!(self.ensure_handshake(id, remote, now, rng), Ok(true)) {
                self.stats.silence_rehandshakes += 1;
            }
        } else if age >= due {
            // A failure (throttled, no randomness) is retried on the next send; the
            // packet went out.
            let _ = self.ensure_handshake(id, remote, now, rng);
        }
    }

    /// Starts an initiation unless one is under way; true if it started one. While the
    /// peer is mid-handshake with us (an unconfirmed `next` younger than a retransmission
    /// timeout) the new init is held back until that timeout: if the peer confirms
    /// first, it is dropped unsent. End-to-end initiations are capped and rate limited
    /// ([`Config::max_pending_initiations`], [`Config::initiation_rate`]).
    fn ensure_handshake(
        &mut self,
        id: RemoteId,
        dialled: Ipv6Addr,
        now: Instant,
        rng: &dyn SecureRandom,
    ) -> Result<bool, SendError> {
        // Link sessions always dial the endpoint, never an address the session had.
        let (dialled, endpoint) = match id {
            RemoteId::Link(e) => (LINK_ADDRESS, Some(WireEndpoint::from(e.socket_addr()))),
            RemoteId::Node(_) => (dialled, None),
        };
        let peer = self.peers.get(&id);
        if peer.is_some_and(|p| p.pending.is_some()) {
            return Ok(false);
        }
        if matches!(id, RemoteId::Node(_))
            && (self.pending_index.len() >= self.config.max_pending_initiations
                || !self.initiation_rate.allow_key((), now))
        {
            self.stats.initiations_throttled += 1;
            return Err(SendError::Throttled);
        }
        let held_until = peer
            .and_then(|p| p.next)
            .and_then(|(_, drop_at)| drop_at.checked_sub(self.config.unconfirmed_timeout))
            .and_then(|since| since.checked_add(self.config.handshake_timeout))
            .filter(|until| now < *until);
        let index = self.fresh_index(rng)?;
        let pinned = self.peers.get(&id).and_then(|p| p.pinned);
        let timestamp = self.clock.next(now);
        let initiation = Initiation::new(
            &*self.signer,
            self.local_key,
            self.local_addr,
            dialled,
            index,
            pinned,
            &self.config.suites,
            timestamp,
            endpoint,
            rng,
        )?;
        let pending = match held_until {
            Some(until) => Pending {
                initiation,
                attempts: 0,
                retransmit_at: until,
                first_sent: None,
                cookie_expires: None,
            },
            None => {
                self.transmits.push_back(Transmit {
                    destination: dialled,
                    underlay: id.underlay(),
                    datagram: initiation.message().to_vec(),
                });
                Pending {
                    initiation,
                    attempts: 1,
                    retransmit_at: self.deadline(now, self.config.handshake_timeout),
                    first_sent: Some(now),
                    cookie_expires: None,
                }
            }
        };
        self.peers.entry(id).or_default().pending = Some(pending);
        self.pending_index.insert(index, id);
        self.stats.handshakes_initiated += 1;
        self.reschedule_peer(id);
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
    /// any session. An init is screened, verified and applied in one go here; the I/O
    /// shell can split that to keep the signature work outside its lock
    /// ([`SessionTable::screen_init`]).
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
                self.handle_sealed(from, &repr, datagram, now, rng)
            }
            PacketType::HandshakeInit => match self.screen_init(from, datagram, now, rng)? {
                Screened::Done(inbound) => Ok(inbound),
                Screened::Verify(job) => {
                    let outcome = job.run(rng);
                    self.finish_init(outcome, now)
                }
            },
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
        rng: &dyn SecureRandom,
    ) -> Result<Inbound, InboundError> {
        let index = repr.session_id;
        let Some(slot) = self.sessions.get_mut(&index) else {
            if repr.packet_type == PacketType::Data {
                self.prompt_unknown_session(repr.src_addr, datagram.len(), now, rng);
            }
            return Err(InboundError::UnknownIndex(index));
        };
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
        let phase = slot.session.recv_phase();
        let payload = slot.session.open(datagram, now)?;
        let rekeyed = slot.session.recv_phase() != phase;
        let remote_key = *slot.session.remote_key();
        let id = slot.peer;
        let remote = repr.src_addr;
        self.after_open(id, index, !payload.is_empty(), rekeyed, now);
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

    /// A `Data` packet of `len` bytes claiming to come from `src` named a session index
    /// this node does not have: most likely the sender holds a session this node lost
    /// (it restarted, or dropped an idle one) and is sealing into the void. Start a
    /// handshake towards `src`, so the sender gets a new session within a round trip
    /// instead of after its silence timeout.
    ///
    /// The packet proves nothing (anyone can send one with any source), so what it can
    /// make this node do is bounded: only when nothing is up or under way with that /64,
    /// once a second per /64 and `prompt_budget` overall, and only for packets at least
    /// as large as the init that answers them, so spoofed packets cannot turn this node
    /// into an amplifier. The sender trusts the handshake, never this packet.
    fn prompt_unknown_session(
        &mut self,
        src: Ipv6Addr,
        len: usize,
        now: Instant,
        rng: &dyn SecureRandom,
    ) {
        if len < init::LEN {
            return;
        }
        let Ok(id) = self.node_id(src) else {
            return;
        };
        if let Some(peer) = self.peers.get(&id)
            && (peer.current.is_some() || peer.pending.is_some() || peer.next.is_some())
        {
            return;
        }
        let RemoteId::Node(prefix) = id else {
            return;
        };
        if !self.prompts.allow_key(prefix, now) || !self.prompt_budget.allow_key((), now) {
            return;
        }
        if matches!(self.ensure_handshake(id, src, now, rng), Ok(true)) {
            self.stats.unknown_session_prompts += 1;
        }
    }

    /// Bookkeeping after a packet authenticated on session `index` of `id`: the peer is
    /// alive (the silence clock stops), traffic (non-empty) arms a keepalive so the
    /// sender learns we are alive, a packet in a new key phase (`rekeyed`) starts the
    /// old key's grace period, and the first packet on an unconfirmed responder session
    /// makes it current.
    fn after_open(&mut self, id: RemoteId, index: u32, traffic: bool, rekeyed: bool, now: Instant) {
        let keepalive_due = self.deadline(now, self.config.keepalive_after);
        let mut armed = false;
        let mut confirms = false;
        if let Some(peer) = self.peers.get_mut(&id) {
            peer.unanswered_since = None;
            confirms = peer.next.is_some_and(|(n, _)| n == index);
            if traffic && peer.keepalive_due.is_none() {
                peer.keepalive_due = Some(keepalive_due);
                armed = peer.timer.is_none_or(|t| keepalive_due < t);
            }
        }
        if armed {
            self.schedule(TimerKey::Peer(id), keepalive_due);
        }
        if rekeyed {
            self.reschedule_session(index);
        }
        if confirms {
            self.install_current(id, index, now);
        }
    }

    /// Makes session `index` the one that sends to `id`: the old current becomes
    /// previous (receive-only for `rekey_grace`), the old previous goes. A responder
    /// session confirmed by the peer also ends any initiation of ours to it (held back
    /// while the peer's handshake ran). Then seals whatever was queued.
    fn install_current(&mut self, id: RemoteId, index: u32, now: Instant) -> usize {
        let retire = self.deadline(now, self.config.transport.rekey_grace);
        let responder = self
            .sessions
            .get(&index)
            .is_some_and(|s| s.session.role() == Role::Responder);
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
        if responder && let Some(pending) = peer.pending.take() {
            self.pending_index.remove(&pending.initiation.local_index);
        }
        if let Some(old) = old_previous {
            self.remove_session(old, ExpiryReason::Replaced);
        }
        self.reschedule_peer(id);
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

    /// The cheap part of handling a HandshakeInit, everything before the signature:
    /// structure and addressing, the endpoint a link init was sent to, duplicates (a
    /// re-sent init is answered from the cache), freshness (an init not newer than one
    /// already accepted from its initiator is a replay), inits already found forged, the
    /// pinned key, the suite offer, the simultaneous-open tie-break, and the admission
    /// gate (cookies, per-sender and per-initiator buckets, the verification budget).
    /// Nothing here verifies a signature or stores anything about the initiator.
    pub fn screen_init(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        rng: &dyn SecureRandom,
    ) -> Result<Screened, InboundError> {
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
        if msg.static_key == self.local_key || key_owns_prefix(&self.local_key, &src) {
            return Err(HandshakeError::SelfHandshake.into());
        }
        match id {
            RemoteId::Link(_) => self.owns_endpoint(msg.endpoint)?,
            RemoteId::Node(_) if msg.endpoint.is_some() => {
                return Err(HandshakeError::Malformed("endpoint in an end-to-end init").into());
            }
            RemoteId::Node(_) => {}
        }
        if let Some(progress) = self.duplicate_init(id, &msg.ephemeral, from) {
            return Ok(Screened::Done(Inbound::Handshake(progress)));
        }
        if !self
            .initiators
            .is_fresh(&(msg.static_key, msg.endpoint), msg.timestamp)
        {
            self.stats.inits_replayed += 1;
            return Err(HandshakeError::Replayed.into());
        }
        if !self.rejected.is_empty() && self.rejected.contains(&init_digest(datagram)) {
            self.stats.inits_known_bad += 1;
            return Err(HandshakeError::BadSignature.into());
        }
        if let Some(peer) = self.peers.get(&id)
            && peer.pinned.is_some_and(|k| k != msg.static_key)
        {
            return Err(HandshakeError::UnexpectedKey(src).into());
        }
        let suite = handshake::choose_suite(msg.suites, &self.config.suites)
            .ok_or(HandshakeError::NoCommonSuite)?;
        if self.ignores_for_own_initiation(id, &msg.static_key, now) {
            self.stats.simultaneous_ignored += 1;
            return Ok(Screened::Done(Inbound::Handshake(
                HandshakeProgress::SimultaneousIgnored,
            )));
        }
        if self.sessions.len() >= self.config.max_sessions && !self.has_unconfirmed() {
            return Err(HandshakeError::TableFull.into());
        }
        match self.gate.admit(from, src, msg.cookie.as_ref(), now, rng)? {
            Verdict::Verify => {}
            Verdict::Cookie(cookie) => {
                self.transmits.push_back(Transmit {
                    destination: src,
                    underlay: Some(from),
                    datagram: handshake::cookie_reply(&msg, &cookie),
                });
                self.stats.cookies_sent += 1;
                return Ok(Screened::Done(Inbound::Handshake(
                    HandshakeProgress::CookieSent,
                )));
            }
            Verdict::Limited(limit) => {
                self.stats.rate_limited += 1;
                match limit {
                    Limit::Budget => self.stats.budget_exhausted += 1,
                    Limit::CookieReplies => self.stats.cookie_replies_withheld += 1,
                    Limit::Initiator | Limit::CookieSender => {}
                }
                return Err(InboundError::RateLimited(from.ip()));
            }
        }
        self.stats.inits_verified += 1;
        Ok(Screened::Verify(Box::new(InitJob {
            msg,
            id,
            from,
            digest: init_digest(datagram),
            suite,
            signer: self.signer.clone(),
            local_key: self.local_key,
            transport: self.config.transport,
            now,
        })))
    }

    /// Whether an init from `static_key` to `id` loses the simultaneous-open tie-break
    /// against our own initiation: ours is under way, went out less than a
    /// retransmission timeout ago (an older one was probably lost, and then waiting for
    /// it would stall both sides) and our key is the smaller.
    fn ignores_for_own_initiation(
        &self,
        id: RemoteId,
        static_key: &[u8; PUBLIC_KEY_LEN],
        now: Instant,
    ) -> bool {
        let Some(pending) = self.peers.get(&id).and_then(|p| p.pending.as_ref()) else {
            return false;
        };
        let recent = pending
            .first_sent
            .is_some_and(|at| now.saturating_duration_since(at) < self.config.handshake_timeout);
        recent && self.local_key < *static_key
    }

    /// Applies what [`InitJob::run`] produced: a forged init is remembered (its copies
    /// cost no second check); a verified one is answered with an unconfirmed session
    /// unless, meanwhile, a copy was answered or a newer init from that initiator
    /// accepted. A verified init always holds back our own initiation to that peer
    /// rather than drop it (see the module docs), so even a replay this node could not
    /// recognise cannot stop it from connecting.
    pub fn finish_init(
        &mut self,
        outcome: InitOutcome,
        now: Instant,
    ) -> Result<Inbound, InboundError> {
        let InitOutcome {
            id,
            from,
            digest,
            result,
        } = outcome;
        let answer = match result {
            Ok(answer) => answer,
            Err(e) => {
                if matches!(
                    e,
                    HandshakeError::BadSignature | HandshakeError::InitiatorIdentity(_)
                ) {
                    self.rejected.insert(digest);
                }
                return Err(e.into());
            }
        };
        let m = &answer.init.msg;
        if let Some(progress) = self.duplicate_init(id, &m.ephemeral, from) {
            return Ok(Inbound::Handshake(progress));
        }
        let clock = (m.static_key, m.endpoint);
        if !self.initiators.is_fresh(&clock, m.timestamp) {
            self.stats.inits_replayed += 1;
            return Err(HandshakeError::Replayed.into());
        }
        // Verified: the initiator holds the key that owns its address in full, so it may
        // now be pinned for the /64 (never before the signature check: an unverified
        // key must not take a /64's pin).
        if !pin_allows(&self.pins, m.header.src_addr, &m.static_key) {
            return Err(HandshakeError::UnexpectedKey(m.header.src_addr).into());
        }
        if self
            .peers
            .get(&id)
            .is_some_and(|p| p.pinned.is_some_and(|k| k != m.static_key))
        {
            return Err(HandshakeError::UnexpectedKey(m.header.src_addr).into());
        }
        if self.ignores_for_own_initiation(id, &m.static_key, now) {
            self.stats.simultaneous_ignored += 1;
            return Ok(Inbound::Handshake(HandshakeProgress::SimultaneousIgnored));
        }
        let index = answer.index;
        if self.sessions.contains_key(&index) || self.pending_index.contains_key(&index) {
            // A 2^-32 collision: drop it, the initiator's retransmission gets another.
            return Err(HandshakeError::Random.into());
        }
        if self.sessions.len() >= self.config.max_sessions && !self.evict_unconfirmed() {
            return Err(HandshakeError::TableFull.into());
        }
        self.initiators.record(clock, m.timestamp);
        let src = m.header.src_addr;
        let ephemeral = m.ephemeral;
        // Our own initiation to this peer, if any, waits a retransmission timeout: if the
        // peer confirms this session it is dropped, if not (a replay) it goes on.
        let hold_until = self.deadline(now, self.config.handshake_timeout);
        if let Some(pending) = self.peers.get_mut(&id).and_then(|p| p.pending.as_mut()) {
            pending.retransmit_at = pending.retransmit_at.max(hold_until);
        }
        let old_next = self.peers.get(&id).and_then(|p| p.next).map(|(i, _)| i);
        if let Some(old) = old_next {
            self.remove_session(old, ExpiryReason::Unconfirmed);
        }
        self.sessions.insert(
            index,
            Slot {
                peer: id,
                session: answer.session,
                init_ephemeral: Some(ephemeral),
                response: Some(answer.response.clone()),
                resends_left: self.config.handshake_attempts,
                timer: None,
            },
        );
        self.reschedule_session(index);
        let drop_at = self.deadline(now, self.config.unconfirmed_timeout);
        self.peers.entry(id).or_default().next = Some((index, drop_at));
        self.reschedule_peer(id);
        self.transmits.push_back(Transmit {
            destination: src,
            underlay: Some(from),
            datagram: answer.response,
        });
        self.stats.responses_sent += 1;
        Ok(Inbound::Handshake(HandshakeProgress::Responded))
    }

    /// An init whose ephemeral we already answered (a retransmission, or a copy): resend
    /// the response while the session is unconfirmed, otherwise just ignore it. Never
    /// new state, and no signature check: the cached response was made for the init
    /// that carried this ephemeral, so whoever sends a copy learns nothing new from it.
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
        let index = slots.into_iter().flatten().find(|i| {
            self.sessions
                .get(i)
                .is_some_and(|s| s.init_ephemeral.as_ref() == Some(ephemeral))
        })?;
        let slot = self.sessions.get_mut(&index)?;
        if let Some(response) = &slot.response
            && slot.resends_left > 0
        {
            slot.resends_left -= 1;
            self.transmits.push_back(Transmit {
                destination: slot.session.remote_addr(),
                underlay: Some(from),
                datagram: response.clone(),
            });
            self.stats.responses_sent += 1;
        }
        Some(HandshakeProgress::DuplicateInit)
    }

    fn has_unconfirmed(&self) -> bool {
        self.peers.values().any(|p| p.next.is_some())
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
        // Link handshakes are bound to both ends' endpoints: the responder says where it
        // heard our init from, which must be us. End to end, relays are in between and
        // no endpoint is named.
        match id {
            RemoteId::Link(_) => self.owns_endpoint(handshake::observed_endpoint(&msg))?,
            RemoteId::Node(_) if msg.endpoint.is_some() => {
                return Err(HandshakeError::Malformed("endpoint in an end-to-end response").into());
            }
            RemoteId::Node(_) => {}
        }
        let peer = self
            .peers
            .get_mut(&id)
            .ok_or(InboundError::UnknownIndex(index))?;
        let pending = peer
            .pending
            .as_ref()
            .ok_or(InboundError::UnknownIndex(index))?;
        let verified = pending.initiation.verify_response(&msg)?;
        let dialled = pending.initiation.remote_addr;
        if !pin_allows(&self.pins, dialled, &msg.static_key) {
            return Err(HandshakeError::UnexpectedKey(dialled).into());
        }
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
                        resends_left: 0,
                        timer: None,
                    },
                );
                self.reschedule_session(index);
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
                self.forget_if_empty(id);
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
        self.reschedule_peer(id);
        Ok(Inbound::Handshake(HandshakeProgress::CookieAccepted))
    }

    // ---- Timers ----

    /// Arms `key` at `at` unless it is already armed at or before it.
    fn schedule(&mut self, key: TimerKey, at: Instant) {
        let armed = match key {
            TimerKey::Peer(id) => self.peers.get_mut(&id).map(|p| &mut p.timer),
            TimerKey::Session(i) => self.sessions.get_mut(&i).map(|s| &mut s.timer),
        };
        let Some(armed) = armed else {
            return;
        };
        if armed.is_some_and(|t| t <= at) {
            return;
        }
        *armed = Some(at);
        self.timers.push(at, key);
        let owners = self.peers.len() + self.sessions.len();
        if self.timers.len() > 4 * owners + 1024 {
            let (peers, sessions) = (&self.peers, &self.sessions);
            self.timers.compact(|key, at| match key {
                TimerKey::Peer(id) => peers.get(&id).is_some_and(|p| p.timer == Some(at)),
                TimerKey::Session(i) => sessions.get(&i).is_some_and(|s| s.timer == Some(at)),
            });
        }
    }

    fn reschedule_peer(&mut self, id: RemoteId) {
        if let Some(at) = self.peers.get(&id).and_then(Peer::deadline) {
            self.schedule(TimerKey::Peer(id), at);
        }
    }

    fn reschedule_session(&mut self, index: u32) {
        if let Some(at) = self
            .sessions
            .get(&index)
            .and_then(|s| s.session.next_timeout())
        {
            self.schedule(TimerKey::Session(index), at);
        }
    }

    /// Drops a peer that holds nothing any more (and no pinned key).
    fn forget_if_empty(&mut self, id: RemoteId) {
        if self
            .peers
            .get(&id)
            .is_some_and(|p| p.is_empty() && p.pinned.is_none())
        {
            self.peers.remove(&id);
        }
    }

    /// The earliest deadline of any peer or session, found by walking them all: what
    /// [`SessionTable::poll_timeout`] must never be later than.
    #[cfg(test)]
    pub(crate) fn earliest_deadline_by_walking(&self) -> Option<Instant> {
        let peers = self.peers.values().filter_map(Peer::deadline);
        let sessions = self
            .sessions
            .values()
            .filter_map(|s| s.session.next_timeout());
        peers.chain(sessions).min()
    }

    /// The earliest instant [`SessionTable::handle_timeout`] may have work: a
    /// retransmission, cookie expiry, keepalive, key retirement or session expiry. O(1):
    /// the top of the timer heap.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// Does everything due at `now`: retransmits or fails initiations (exponential
    /// backoff, bounded attempts), drops stale cookies, sends keepalives, retires old
    /// keys and removes expired sessions (reported as [`Event::Expired`]). O(k log n)
    /// for k timers due.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut due = Vec::new();
        while let Some((at, key)) = self.timers.pop_due(now) {
            let armed = match key {
                TimerKey::Peer(id) => self.peers.get_mut(&id).map(|p| &mut p.timer),
                TimerKey::Session(i) => self.sessions.get_mut(&i).map(|s| &mut s.timer),
            };
            // Stale entries (their owner re-armed earlier, or is gone) are skipped.
            if let Some(armed) = armed
                && *armed == Some(at)
            {
                *armed = None;
                due.push(key);
            }
        }
        // Sessions first, so a peer's timers see its expired sessions gone.
        due.sort_by_key(|k| matches!(k, TimerKey::Peer(_)));
        for key in due {
            match key {
                TimerKey::Session(index) => self.session_timeout(index, now),
                TimerKey::Peer(id) => self.peer_timeout(id, now),
            }
        }
    }

    fn session_timeout(&mut self, index: u32, now: Instant) {
        let Some(slot) = self.sessions.get_mut(&index) else {
            return;
        };
        slot.session.handle_timeout(now);
        let Some(reason) = slot.session.expiry(now) else {
            self.reschedule_session(index);
            return;
        };
        let id = slot.peer;
        // A session already superseded ends as replaced, whatever ran out first.
        let reason = match self.peers.get(&id) {
            Some(p) if p.previous.is_some_and(|(i, _)| i == index) => ExpiryReason::Replaced,
            Some(p) if p.next.is_some_and(|(i, _)| i == index) => ExpiryReason::Unconfirmed,
            _ => reason,
        };
        self.remove_session(index, reason);
        self.forget_if_empty(id);
    }

    fn peer_timeout(&mut self, id: RemoteId, now: Instant) {
        self.pending_timeout(id, now);
        self.keepalive_timeout(id, now);
        let (previous, next) = match self.peers.get(&id) {
            Some(p) => (p.previous, p.next),
            None => return,
        };
        if let Some((index, at)) = previous
            && now >= at
        {
            self.remove_session(index, ExpiryReason::Replaced);
        }
        if let Some((index, at)) = next
            && now >= at
        {
            self.remove_session(index, ExpiryReason::Unconfirmed);
        }
        self.reschedule_peer(id);
        self.forget_if_empty(id);
    }

    fn pending_timeout(&mut self, id: RemoteId, now: Instant) {
        let Some(pending) = self.peers.get_mut(&id).and_then(|p| p.pending.as_mut()) else {
            return;
        };
        if pending.cookie_expires.is_some_and(|at| now >= at) {
            pending.cookie_expires = None;
            // Re-signing cannot fail with a working signer; if it does, keep the old
            // (merely stale) cookie rather than lose the initiation.
            let _ = pending.initiation.set_cookie(None, &*self.signer);
        }
        if now < pending.retransmit_at {
            return;
        }
        if pending.attempts >= self.config.handshake_attempts {
            let (remote, index) = (
                pending.initiation.remote_addr,
                pending.initiation.local_index,
            );
            self.pending_index.remove(&index);
            if let Some(peer) = self.peers.get_mut(&id) {
                peer.pending = None;
            }
            self.fail(id, remote, FailReason::Timeout);
            return;
        }
        let backoff = self
            .config
            .handshake_timeout
            .saturating_mul(1u32 << pending.attempts.min(16))
            .min(self.config.handshake_max_timeout);
        if pending.attempts > 0 {
            self.stats.retransmissions += 1;
        }
        pending.attempts += 1;
        pending.first_sent.get_or_insert(now);
        pending.retransmit_at = now.checked_add(backoff).unwrap_or(now);
        self.transmits.push_back(Transmit {
            destination: pending.initiation.remote_addr,
            underlay: id.underlay(),
            datagram: pending.initiation.message().to_vec(),
        });
    }

    fn keepalive_timeout(&mut self, id: RemoteId, now: Instant) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        if peer.keepalive_due.is_none_or(|at| now < at) {
            return;
        }
        peer.keepalive_due = None;
        let Some(index) = self.usable_current(id, now) else {
            return;
        };
        let Some(remote) = self.sessions.get(&index).map(|s| s.session.remote_addr()) else {
            return;
        };
        if self.seal_to(id, index, remote, &[], now) {
            self.stats.keepalives_sent += 1;
        }
    }
}

/// What identifies an init byte for byte (the hop limit, which relays change, aside).
fn init_digest(datagram: &[u8]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let hop = wire::field::HOP_LIMIT;
    ctx.update(datagram.get(..hop).unwrap_or(datagram));
    ctx.update(&[0]);
    ctx.update(datagram.get(hop + 1..).unwrap_or(&[]));
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
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
            self.note_sent(id, true, now);
            self.maybe_rehandshake(id, index, now, rng);
        }
        Ok(sealed)
    }

    /// [`SessionTable::handle_datagram`] for one `Data` datagram, decrypted where it lies:
    /// returns the authenticated remote (the header's source) and where the plaintext now
    /// is in `datagram`; an empty range is a keepalive. Same checks, errors and state
    /// changes (replay window, keepalive timer, confirming a responder session, a
    /// handshake prompted by an unknown session index).
    pub fn open_in_place(
        &mut self,
        datagram: &mut [u8],
        now: Instant,
        rng: &dyn SecureRandom,
    ) -> Result<(Ipv6Addr, std::ops::Range<usize>), InboundError> {
        let repr = Repr::parse(&Packet::new_checked(&*datagram)?)?;
        if repr.packet_type != PacketType::Data {
            return Err(InboundError::Open(super::OpenError::NotData(
                repr.packet_type as u8,
            )));
        }
        let index = repr.session_id;
        let Some(slot) = self.sessions.get_mut(&index) else {
            self.prompt_unknown_session(repr.src_addr, datagram.len(), now, rng);
            return Err(InboundError::UnknownIndex(index));
        };
        let phase = slot.session.recv_phase();
        let range = slot.session.open_in_place(datagram, now)?;
        let rekeyed = slot.session.recv_phase() != phase;
        let id = slot.peer;
        self.after_open(id, index, !range.is_empty(), rekeyed, now);
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
