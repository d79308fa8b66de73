//! The sans-IO neighbour state machine.
//!
//! Per underlay endpoint:
//!
//! ```text
//!             add_static / beacon / inbound auth
//!                          │
//!                          ▼
//!   ┌──────────── Connecting ◄──────────┐  StartLinkHandshake now, then with
//!   │                  │                │  exponential backoff (jittered)
//!   │   on_link_authenticated           │
//!   │                  ▼                │
//!   │   ┌─────────►   Up   ─────────────┼─ PeerUp on entry; hellos every interval;
//!   │   │              │                │  nothing heard for the dead interval, or
//!   │   │              ▼                │  on_link_lost → PeerDown
//!   │   └─ auth ──   Down  ─────────────┘  keeps retrying with backoff
//!   │
//!   └─ remove / discovered peer unannounced for `discovered_expiry` → CloseLink
//! ```
//!
//! Invariants the agent can rely on: for every endpoint, [`Action::PeerUp`] and
//! [`Action::PeerDown`] strictly alternate, starting with `PeerUp`, and `PeerUp` is only
//! ever emitted from [`PeerManager::on_link_authenticated`], i.e. after the session layer
//! proved the neighbour holds its node key. So an agent that inserts on `PeerUp` and
//! deletes on `PeerDown` keeps exactly the authenticated neighbours in the XDP peer map.
//!
//! Memory is bounded: static peers by `max_static_peers`; discovered and inbound peers
//! together by `max_dynamic_peers`, evicting the one that has been down (or never up)
//! longest; beacon rate-limit buckets and replay timestamps by their own caps.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    net::{Ipv6Addr, SocketAddrV6},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::id::{EndpointError, LinkEndpoint, NodeKey};

use super::{
    limit::{Rate, SourceLimiter},
    wire::{BeaconError, Hello, HelloAck, LinkMessage},
};

/// Timers and limits of the peer layer.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerConfig {
    /// How often an Up neighbour is sent a hello (jittered by ±10%, so that the hellos
    /// of many neighbours do not synchronise).
    pub hello_interval: Duration,
    /// A neighbour that sent nothing authenticated for this long is Down. Defaults to
    /// three hello intervals plus a second, so two lost hellos never take a link down.
    pub dead_interval: Duration,
    /// Fast loss detection: a hello followed by nothing authenticated from the
    /// neighbour for the probe timeout (its smoothed RTT plus four deviations, at least
    /// [`PeerConfig::probe_timeout_min`]) starts probes, one more hello per probe
    /// timeout; when this many probes in a row also went unanswered the neighbour is
    /// Down, long before the dead interval. Healthy links send nothing extra. 0 turns
    /// it off (the dead interval alone decides).
    pub probe_count: u32,
    /// Floor of the probe timeout, so a fast link's probes leave room for a busy
    /// neighbour's scheduling delays.
    pub probe_timeout_min: Duration,
    /// A hello not acknowledged within this long counts as lost in the loss estimate.
    pub hello_loss_timeout: Duration,
    /// Number of most recent hellos the loss estimate covers.
    pub loss_window: usize,
    /// Delay before the second link handshake attempt; doubles per attempt.
    pub retry_initial: Duration,
    /// Upper bound of the retry delay (before ±20% jitter).
    pub retry_max: Duration,
    /// Most static (configured) peers; refuses more rather than growing without bound.
    pub max_static_peers: usize,
    /// Most discovered plus inbound peers; a new one evicts the longest-down.
    pub max_dynamic_peers: usize,
    /// Whether a neighbour this node does not know may peer with it by completing a link
    /// handshake (it is authenticated, so it becomes an inbound peer).
    pub accept_inbound: bool,
    /// A discovered peer that is not Up and has not been announced for this long is
    /// forgotten: it left the link.
    pub discovered_expiry: Duration,
    /// Beacons whose timestamp is further than this from the local wall clock are
    /// rejected as stale (or from the future). `None` turns the check off for nodes
    /// without a trustworthy clock; the per-key monotonic check still applies.
    pub beacon_max_age: Option<Duration>,
    /// Beacons one source (address and interface) may send back to back.
    pub beacon_source_burst: u32,
    /// Sustained beacons per second per source.
    pub beacon_source_per_second: u32,
    /// Beacons all sources together may send back to back.
    pub beacon_global_burst: u32,
    /// Sustained beacons per second from all sources together; bounds the Ed25519
    /// verifications an attacker on the link can cause, however many addresses it uses.
    pub beacon_global_per_second: u32,
    /// Most sources with a rate-limit bucket.
    pub max_beacon_sources: usize,
    /// Most node keys whose last beacon timestamp is remembered for replay detection.
    pub max_beacon_keys: usize,
}

impl Default for PeerConfig {
    fn default() -> Self {
        let hello_interval = Duration::from_secs(2);
        Self {
            hello_interval,
            dead_interval: hello_interval * 3 + Duration::from_secs(1),
            probe_count: 5,
            probe_timeout_min: Duration::from_millis(100),
            hello_loss_timeout: hello_interval,
            loss_window: 16,
            retry_initial: Duration::from_secs(2),
            retry_max: Duration::from_secs(60),
            max_static_peers: 4096,
            max_dynamic_peers: 1024,
            accept_inbound: true,
            discovered_expiry: Duration::from_secs(60),
            beacon_max_age: Some(Duration::from_secs(600)),
            beacon_source_burst: 4,
            beacon_source_per_second: 1,
            beacon_global_burst: 256,
            beacon_global_per_second: 128,
            max_beacon_sources: 4096,
            max_beacon_keys: 4096,
        }
    }
}

impl PeerConfig {
    /// Rejects settings the state machine cannot work with, so a bad config file fails
    /// at start rather than flapping links later.
    pub fn validate(&self) -> Result<(), PeerError> {
        let bad = |what| Err(PeerError::InvalidConfig(what));
        if self.hello_interval.is_zero() {
            return bad("hello_interval must be positive");
        }
        if self.dead_interval <= self.hello_interval {
            return bad("dead_interval must exceed hello_interval");
        }
        if self.probe_count > 0 && self.probe_timeout_min.is_zero() {
            return bad("probe_timeout_min must be positive when probing");
        }
        if self.hello_loss_timeout.is_zero() {
            return bad("hello_loss_timeout must be positive");
        }
        if self.loss_window == 0 || self.loss_window > 1024 {
            return bad("loss_window must be 1..=1024");
        }
        if self.retry_initial.is_zero() || self.retry_max < self.retry_initial {
            return bad("retry_initial must be positive and at most retry_max");
        }
        if self.discovered_expiry.is_zero() {
            return bad("discovered_expiry must be positive");
        }
        if self.beacon_source_burst == 0
            || self.beacon_source_per_second == 0
            || self.beacon_global_burst == 0
            || self.beacon_global_per_second == 0
        {
            return bad("beacon rates and bursts must be positive");
        }
        if self.max_beacon_sources == 0 || self.max_beacon_keys == 0 {
            return bad("max_beacon_sources and max_beacon_keys must be positive");
        }
        Ok(())
    }
}

/// Where a peer came from; decides how it is retried and whether it may be evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// Configured (file, flags, control API): retried forever, never evicted.
    Static,
    /// Learned from a link-local beacon: retried while announced, evictable.
    Discovered,
    /// Completed a link handshake towards us unasked: forgotten once Down, evictable.
    Inbound,
}

impl Origin {
    /// Stable name for the control API.
    pub fn name(self) -> &'static str {
        match self {
            Self::Static => "static",
            Self::Discovered => "discovered",
            Self::Inbound => "inbound",
        }
    }

    fn is_dynamic(self) -> bool {
        self != Self::Static
    }
}

/// Link state of one neighbour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerState {
    /// Never authenticated yet; link handshakes are being attempted.
    Connecting,
    /// Authenticated and heard from within the dead interval; in the XDP peer map.
    Up,
    /// Was Up, then went silent or lost its link session; retrying.
    Down,
}

impl PeerState {
    /// Stable name for the control API: "connecting", "up" or "down".
    pub fn name(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Up => "up",
            Self::Down => "down",
        }
    }
}

/// What the I/O shell must do; drained with [`PeerManager::poll_action`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Ask the session layer for a link handshake with `endpoint`; its outcome comes back
    /// as [`PeerManager::on_link_authenticated`]. `expected_key` is the key a beacon
    /// announced for the endpoint (pass it to the handshake so it can refuse others);
    /// `None` for configured peers, which are known by endpoint only.
    StartLinkHandshake {
        /// Whom to handshake with.
        endpoint: LinkEndpoint,
        /// The key the neighbour is expected to prove, if known.
        expected_key: Option<NodeKey>,
    },
    /// Seal and send this hello to the neighbour under its link session.
    SendHello(LinkEndpoint, Hello),
    /// Seal and send this hello-ack to the neighbour under its link session.
    SendHelloAck(LinkEndpoint, HelloAck),
    /// Seal and send a keepalive. Emitted on entering Up: it is the first packet the
    /// handshake initiator sends on a fresh link session, which confirms the session to
    /// the responder without waiting for the first hello.
    SendKeepalive(LinkEndpoint),
    /// The neighbour is authenticated: insert `endpoint` into the XDP peer map.
    PeerUp {
        /// The neighbour's underlay endpoint.
        endpoint: LinkEndpoint,
        /// The key the link handshake proved.
        node_key: NodeKey,
        /// How it came to be a neighbour (routing limits self-admitted ones).
        origin: Origin,
    },
    /// The neighbour is gone: remove `endpoint` from the XDP peer map.
    PeerDown {
        /// The neighbour's underlay endpoint.
        endpoint: LinkEndpoint,
    },
    /// The manager forgot this endpoint (removed, expired or evicted): the session layer
    /// may drop its link session and any pending link handshake with it.
    CloseLink(LinkEndpoint),
    /// An Up neighbour completed a new link handshake with the same key: a rekey, or the
    /// neighbour restarted (or forgot this node) and dialled again, having lost whatever
    /// it learned over the old session. It stays Up; what was sent to it only once
    /// (the routing table) must be sent again.
    LinkRenewed(LinkEndpoint),
}

impl Action {
    /// The endpoint the action concerns; every action has one.
    pub fn endpoint(&self) -> LinkEndpoint {
        match self {
            Self::StartLinkHandshake { endpoint, .. }
            | Self::PeerUp { endpoint, .. }
            | Self::PeerDown { endpoint } => *endpoint,
            Self::SendHello(e, _)
            | Self::SendHelloAck(e, _)
            | Self::SendKeepalive(e)
            | Self::CloseLink(e)
            | Self::LinkRenewed(e) => *e,
        }
    }

    /// The control message to seal for the send actions, so the shell needs no match
    /// of its own to encode them.
    pub fn control_message(&self) -> Option<LinkMessage> {
        match self {
            Self::SendHello(_, h) => Some(LinkMessage::Hello(*h)),
            Self::SendHelloAck(_, a) => Some(LinkMessage::HelloAck(*a)),
            Self::SendKeepalive(_) => Some(LinkMessage::Keepalive),
            _ => None,
        }
    }
}

/// Why an input was refused. Every variant is about something a peer, an operator or a
/// config file controls, so none of them is a bug; the shell logs and counts them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// A setting the state machine cannot work with.
    #[error("invalid peer configuration: {0}")]
    InvalidConfig(&'static str),
    /// The endpoint cannot be a neighbour.
    #[error("invalid peer endpoint {0}: {1}")]
    InvalidEndpoint(LinkEndpoint, EndpointError),
    /// The peer table is full for this kind of peer.
    #[error("too many {origin} peers (limit {limit})", origin = .origin.name())]
    TooManyPeers {
        /// The kind of peer refused.
        origin: Origin,
        /// The configured limit.
        limit: usize,
    },
    /// No peer with this endpoint.
    #[error("{0} is not a known peer")]
    UnknownPeer(LinkEndpoint),
    /// Hello traffic from a neighbour that is not Up (no authenticated link session).
    #[error("{0} is not up")]
    NotUp(LinkEndpoint),
    /// The link handshake reached this node itself.
    #[error("{0} is this node itself")]
    SelfLink(LinkEndpoint),
    /// The neighbour proved (or claims in a hello) a different key than expected.
    #[error("{endpoint}: expected node key {expected}, got {got}")]
    KeyMismatch {
        /// The neighbour.
        endpoint: LinkEndpoint,
        /// The key a beacon announced or the link session authenticated.
        expected: NodeKey,
        /// The key presented.
        got: NodeKey,
    },
    /// A hello-ack that matches no outstanding hello (duplicate, late past the window,
    /// or a wrong echoed timestamp).
    #[error("{endpoint}: hello-ack {sequence} matches no outstanding hello")]
    UnmatchedAck {
        /// The neighbour.
        endpoint: LinkEndpoint,
        /// The acknowledged sequence.
        sequence: u32,
    },
    /// An unknown neighbour authenticated, but inbound peering is disabled.
    #[error("inbound peering is disabled; refused {0}")]
    InboundRefused(LinkEndpoint),
    /// A beacon arrived inside a link session; beacons only travel on multicast.
    #[error("{0}: discovery beacon inside a link session")]
    UnexpectedBeacon(LinkEndpoint),
}

/// Why a beacon was ignored; each reason has its own counter in [`PeerStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[repr(usize)]
pub enum BeaconReject {
    /// Discovery is not enabled on the interface it arrived on.
    #[error("discovery is disabled on this interface")]
    InterfaceDisabled,
    /// The source address cannot be a neighbour (multicast, unspecified, overlay).
    #[error("unusable source address")]
    BadSource,
    /// Over the per-source or global beacon rate.
    #[error("rate limited")]
    RateLimited,
    /// Not a well-formed beacon.
    #[error("malformed beacon")]
    Malformed,
    /// Our own beacon, looped back.
    #[error("own beacon")]
    OwnBeacon,
    /// The key does not own the announced overlay address.
    #[error("key does not own the announced address")]
    WrongAddress,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// The announced data port is 0.
    #[error("announced port is 0")]
    BadPort,
    /// The timestamp is too far from the local wall clock.
    #[error("stale or future timestamp")]
    Stale,
    /// Not newer than the last beacon accepted for the same key.
    #[error("replayed beacon")]
    Replayed,
    /// The endpoint is Up with a different authenticated key.
    #[error("endpoint is up with a different key")]
    KeyConflict,
    /// The dynamic peer table is full of peers that are Up.
    #[error("discovered peer table full")]
    Full,
}

impl BeaconReject {
    /// Every reason, in counter index order.
    pub const ALL: [BeaconReject; 12] = [
        Self::InterfaceDisabled,
        Self::BadSource,
        Self::RateLimited,
        Self::Malformed,
        Self::OwnBeacon,
        Self::WrongAddress,
        Self::BadSignature,
        Self::BadPort,
        Self::Stale,
        Self::Replayed,
        Self::KeyConflict,
        Self::Full,
    ];

    /// Stable counter name for the control API.
    pub fn name(self) -> &'static str {
        match self {
            Self::InterfaceDisabled => "beacon_interface_disabled",
            Self::BadSource => "beacon_bad_source",
            Self::RateLimited => "beacon_rate_limited",
            Self::Malformed => "beacon_malformed",
            Self::OwnBeacon => "beacon_own",
            Self::WrongAddress => "beacon_wrong_address",
            Self::BadSignature => "beacon_bad_signature",
            Self::BadPort => "beacon_bad_port",
            Self::Stale => "beacon_stale",
            Self::Replayed => "beacon_replayed",
            Self::KeyConflict => "beacon_key_conflict",
            Self::Full => "beacon_table_full",
        }
    }
}

/// What an accepted beacon did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeaconOutcome {
    /// A new discovered peer; a link handshake was started.
    Added(LinkEndpoint),
    /// A peer already known at this endpoint; its announcement was refreshed.
    Refreshed(LinkEndpoint),
    /// The announced node is already Up at this endpoint; nothing else to do.
    AlreadyConnected(LinkEndpoint),
}

/// Counters of the peer layer, for `GetStats`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Transitions into Up.
    pub peer_ups: u64,
    /// Transitions out of Up.
    pub peer_downs: u64,
    /// Link handshakes requested.
    pub handshakes_started: u64,
    /// Authentications refused (wrong key, self, inbound disabled, table full).
    pub auth_rejected: u64,
    /// Hellos sent (probes not included).
    pub hellos_sent: u64,
    /// Probe hellos sent after a hello went unanswered for the probe timeout.
    pub probes_sent: u64,
    /// Transitions out of Up because a hello and every probe after it went unanswered
    /// (also counted in `peer_downs`).
    pub probe_downs: u64,
    /// Hellos accepted (and acknowledged).
    pub hellos_received: u64,
    /// Hello-acks that produced an RTT sample.
    pub acks_received: u64,
    /// Hello-acks that matched no outstanding hello.
    pub acks_unmatched: u64,
    /// Control messages from endpoints that are not Up, or with the wrong key.
    pub control_ignored: u64,
    /// Discovered peers added.
    pub discovered_added: u64,
    /// Dynamic peers evicted to make room.
    pub evicted: u64,
    /// Discovered peers forgotten after their announcements stopped.
    pub discovered_expired: u64,
    /// Beacons accepted.
    pub beacons_accepted: u64,
    /// Beacons rejected, indexed by [`BeaconReject`] discriminant.
    pub beacons_rejected: [u64; BeaconReject::ALL.len()],
}

impl PeerStats {
    /// Beacons rejected for `reason`.
    pub fn rejected(&self, reason: BeaconReject) -> u64 {
        self.beacons_rejected[reason as usize]
    }

    /// Every counter with a stable snake_case name, for the control API.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let mut out = vec![
            ("peer_up", self.peer_ups),
            ("peer_down", self.peer_downs),
            ("link_handshakes_started", self.handshakes_started),
            ("link_auth_rejected", self.auth_rejected),
            ("hello_sent", self.hellos_sent),
            ("hello_probe_sent", self.probes_sent),
            ("peer_down_unanswered", self.probe_downs),
            ("hello_received", self.hellos_received),
            ("hello_ack_received", self.acks_received),
            ("hello_ack_unmatched", self.acks_unmatched),
            ("control_ignored", self.control_ignored),
            ("discovered_added", self.discovered_added),
            ("peer_evicted", self.evicted),
            ("discovered_expired", self.discovered_expired),
            ("beacon_accepted", self.beacons_accepted),
        ];
        out.extend(
            BeaconReject::ALL
                .iter()
                .map(|r| (r.name(), self.rejected(*r))),
        );
        out
    }
}

/// A point-in-time view of one neighbour, for `ListPeers`.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerSnapshot {
    /// The neighbour's underlay endpoint.
    pub endpoint: LinkEndpoint,
    /// Link state.
    pub state: PeerState,
    /// Static, discovered or inbound.
    pub origin: Origin,
    /// The key the last link handshake proved.
    pub node_key: Option<NodeKey>,
    /// The key a beacon announced (discovered peers), not yet proven unless equal to
    /// `node_key`.
    pub announced_key: Option<NodeKey>,
    /// Interface the neighbour was discovered on.
    pub interface: Option<u32>,
    /// Time since the last authenticated packet from the neighbour.
    pub last_seen_age: Option<Duration>,
    /// How long the peer has been in its current state.
    pub state_age: Duration,
    /// Smoothed RTT (RFC 6298) from hello/ack exchanges.
    pub srtt: Option<Duration>,
    /// RTT variation (RFC 6298).
    pub rttvar: Option<Duration>,
    /// Fraction of recent hellos that went unacknowledged, 0.0..=1.0.
    pub loss: Option<f64>,
    /// This node's underlay endpoint as the neighbour reports seeing it.
    pub observed_by_peer: Option<(Ipv6Addr, u16)>,
    /// Link handshakes requested since the peer last came up (or was added).
    pub connect_attempts: u32,
}

impl PeerSnapshot {
    /// "connecting", "up" or "down".
    pub fn state_name(&self) -> &'static str {
        self.state.name()
    }

    /// The neighbour's key as hex: the proven one if any, else the announced one.
    pub fn node_key_hex(&self) -> Option<String> {
        self.node_key.or(self.announced_key).map(|k| k.to_hex())
    }

    /// Whether the peer is configured rather than discovered or inbound.
    pub fn is_static(&self) -> bool {
        self.origin == Origin::Static
    }
}

#[derive(Debug, Clone, Copy)]
struct HelloRecord {
    sequence: u32,
    timestamp_us: u64,
    sent_at: Instant,
    acked: bool,
}

/// RFC 6298 estimator in integer microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rtt {
    srtt_us: u64,
    rttvar_us: u64,
}

impl Rtt {
    fn first(sample_us: u64) -> Self {
        Self {
            srtt_us: sample_us,
            rttvar_us: sample_us / 2,
        }
    }

    fn update(&mut self, sample_us: u64) {
        // RTTVAR <- (1 - 1/4) * RTTVAR + 1/4 * |SRTT - R'|, then
        // SRTT <- (1 - 1/8) * SRTT + 1/8 * R', with the old SRTT in the first.
        let delta = self.srtt_us.abs_diff(sample_us);
        self.rttvar_us = (self.rttvar_us.saturating_mul(3).saturating_add(delta)) / 4;
        self.srtt_us = (self.srtt_us.saturating_mul(7).saturating_add(sample_us)) / 8;
    }
}

#[derive(Debug)]
struct Peer {
    origin: Origin,
    state: PeerState,
    /// When `state` was entered (for Connecting: when the peer was added).
    since: Instant,
    interface: Option<u32>,
    announced_key: Option<NodeKey>,
    node_key: Option<NodeKey>,
    last_seen: Option<Instant>,
    last_beacon: Option<Instant>,
    attempts: u32,
    next_attempt: Option<Instant>,
    next_hello: Option<Instant>,
    next_sequence: u32,
    hellos: VecDeque<HelloRecord>,
    /// The most recent probes (at most `probe_count`), for matching their acks (RTT
    /// samples), late ones included; kept out of `hellos` so the loss estimate stays
    /// about regular hellos.
    probes: VecDeque<HelloRecord>,
    /// When the oldest hello not followed by anything authenticated from the neighbour
    /// was sent: the start of a probe episode.
    unanswered_since: Option<Instant>,
    /// Probes sent in the current episode.
    episode_probes: u32,
    rtt: Option<Rtt>,
    observed_by_peer: Option<(Ipv6Addr, u16)>,
}

impl Peer {
    fn new(origin: Origin, now: Instant) -> Self {
        Self {
            origin,
            state: PeerState::Connecting,
            since: now,
            interface: None,
            announced_key: None,
            node_key: None,
            last_seen: None,
            last_beacon: None,
            attempts: 0,
            next_attempt: None,
            next_hello: None,
            next_sequence: 0,
            hellos: VecDeque::new(),
            probes: VecDeque::new(),
            unanswered_since: None,
            episode_probes: 0,
            rtt: None,
            observed_by_peer: None,
        }
    }

    fn is_up(&self) -> bool {
        self.state == PeerState::Up
    }

    /// Something authenticated arrived from the neighbour: it is alive, any probe
    /// episode is over.
    fn heard(&mut self, now: Instant) {
        self.last_seen = Some(now);
        self.unanswered_since = None;
        self.episode_probes = 0;
    }

    /// How long a hello may go unanswered before the next probe: the RFC 6298 RTO
    /// formula (SRTT + 4 RTTVAR) with [`PeerConfig::probe_timeout_min`] as its floor.
    /// `None` until an RTT sample exists (nothing to judge a late answer by) or with
    /// probing off.
    fn probe_timeout(&self, config: &PeerConfig) -> Option<Duration> {
        if config.probe_count == 0 {
            return None;
        }
        let rtt = self.rtt?;
        let us = rtt.srtt_us.saturating_add(rtt.rttvar_us.saturating_mul(4));
        Some(Duration::from_micros(us).max(config.probe_timeout_min))
    }

    /// When the probe episode next needs attention: the next probe, or, after the
    /// last probe, the verdict.
    fn probe_due(&self, config: &PeerConfig) -> Option<Instant> {
        let since = self.unanswered_since?;
        let timeout = self.probe_timeout(config)?;
        since.checked_add(timeout.saturating_mul(self.episode_probes.saturating_add(1)))
    }

    fn dead_at(&self, config: &PeerConfig) -> Instant {
        self.last_seen.unwrap_or(self.since) + config.dead_interval
    }

    fn expires_at(&self, config: &PeerConfig) -> Option<Instant> {
        (self.origin == Origin::Discovered && !self.is_up())
            .then(|| self.last_beacon.unwrap_or(self.since) + config.discovered_expiry)
    }

    fn deadline(&self, config: &PeerConfig) -> Option<Instant> {
        if self.is_up() {
            let dead = self.dead_at(config);
            let probe = self.probe_due(config).unwrap_or(dead);
            Some(self.next_hello.map_or(dead, |h| h.min(dead)).min(probe))
        } else {
            match (self.next_attempt, self.expires_at(config)) {
                (Some(a), Some(e)) => Some(a.min(e)),
                (a, e) => a.or(e),
            }
        }
    }

    fn loss(&self, now: Instant, timeout: Duration) -> Option<f64> {
        let (mut decided, mut lost) = (0u32, 0u32);
        for r in &self.hellos {
            if r.acked {
                decided += 1;
            } else if now.saturating_duration_since(r.sent_at) >= timeout {
                decided += 1;
                lost += 1;
            }
        }
        (decided > 0).then(|| f64::from(lost) / f64::from(decided))
    }
}

/// Everything but the peer table, so a `&mut Peer` and the shared state can be borrowed
/// at once.
#[derive(Debug)]
struct Core {
    config: PeerConfig,
    local_key: NodeKey,
    epoch: Instant,
    rng: u64,
    actions: VecDeque<Action>,
    stats: PeerStats,
}

impl Core {
    /// Microseconds of the local monotonic clock, the timestamp unit of hellos.
    fn micros(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }

    /// splitmix64: a small, seeded generator for timer jitter only (nothing secret).
    fn next_u64(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `d` scaled by a uniform factor in `[1 - permille/1000, 1 + permille/1000]`.
    fn jitter(&mut self, d: Duration, permille: u64) -> Duration {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 4);
        let span = us.saturating_mul(permille) / 1000;
        let offset = self.next_u64() % span.saturating_mul(2).saturating_add(1);
        Duration::from_micros(us.saturating_sub(span).saturating_add(offset))
    }

    /// Uniform in `[0, d]`.
    fn random_below(&mut self, d: Duration) -> Duration {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX - 1);
        Duration::from_micros(self.next_u64() % us.saturating_add(1))
    }

    /// Delay after attempt number `attempts` (1-based): initial × 2^(attempts-1), capped.
    fn backoff(&mut self, attempts: u32) -> Duration {
        let exp = attempts.saturating_sub(1).min(20);
        let base = self
            .config
            .retry_initial
            .saturating_mul(1u32 << exp)
            .min(self.config.retry_max);
        self.jitter(base, 200)
    }

    fn start_attempt(&mut self, endpoint: LinkEndpoint, peer: &mut Peer, now: Instant) {
        peer.attempts = peer.attempts.saturating_add(1);
        let delay = self.backoff(peer.attempts);
        peer.next_attempt = Some(now + delay);
        self.stats.handshakes_started += 1;
        self.actions.push_back(Action::StartLinkHandshake {
            endpoint,
            expected_key: peer.announced_key,
        });
    }

    fn become_up(&mut self, endpoint: LinkEndpoint, peer: &mut Peer, key: NodeKey, now: Instant) {
        peer.state = PeerState::Up;
        peer.since = now;
        peer.node_key = Some(key);
        peer.heard(now);
        peer.attempts = 0;
        peer.next_attempt = None;
        peer.hellos.clear();
        peer.rtt = None;
        // A random first delay de-synchronises the two sides' hello timers.
        let first = self.random_below(self.config.hello_interval / 4);
        peer.next_hello = Some(now + first);
        self.stats.peer_ups += 1;
        self.actions.push_back(Action::PeerUp {
            endpoint,
            node_key: key,
            origin: peer.origin,
        });
        self.actions.push_back(Action::SendKeepalive(endpoint));
    }

    /// Takes an Up peer down. Returns whether the peer should be forgotten (inbound
    /// peers: it is up to them to come back).
    fn go_down(&mut self, endpoint: LinkEndpoint, peer: &mut Peer, now: Instant) -> bool {
        peer.state = PeerState::Down;
        peer.since = now;
        peer.next_hello = None;
        peer.unanswered_since = None;
        peer.episode_probes = 0;
        peer.probes.clear();
        self.stats.peer_downs += 1;
        self.actions.push_back(Action::PeerDown { endpoint });
        if peer.origin == Origin::Inbound {
            return true;
        }
        peer.attempts = 0;
        self.start_attempt(endpoint, peer, now);
        false
    }

    fn send_hello(&mut self, endpoint: LinkEndpoint, peer: &mut Peer, now: Instant) {
        let record = self.hello_record(peer, now);
        peer.hellos.push_back(record);
        while peer.hellos.len() > self.config.loss_window {
            peer.hellos.pop_front();
        }
        let interval = self.jitter(self.config.hello_interval, 100);
        peer.next_hello = Some(now + interval);
        // Anything authenticated from the neighbour ends the wait (`Peer::heard`).
        peer.unanswered_since.get_or_insert(now);
        self.stats.hellos_sent += 1;
        self.queue_hello(endpoint, record);
    }

    /// One more hello within a probe episode: same message, kept apart from the loss
    /// window, and the regular hello schedule is left alone.
    fn send_probe(&mut self, endpoint: LinkEndpoint, peer: &mut Peer, now: Instant) {
        let record = self.hello_record(peer, now);
        peer.probes.push_back(record);
        while peer.probes.len() > self.config.probe_count as usize {
            peer.probes.pop_front();
        }
        peer.episode_probes = peer.episode_probes.saturating_add(1);
        self.stats.probes_sent += 1;
        self.queue_hello(endpoint, record);
    }

    fn hello_record(&mut self, peer: &mut Peer, now: Instant) -> HelloRecord {
        let sequence = peer.next_sequence;
        peer.next_sequence = sequence.wrapping_add(1);
        HelloRecord {
            sequence,
            timestamp_us: self.micros(now),
            sent_at: now,
            acked: false,
        }
    }

    fn queue_hello(&mut self, endpoint: LinkEndpoint, record: HelloRecord) {
        let HelloRecord {
            sequence,
            timestamp_us,
            ..
        } = record;
        self.actions.push_back(Action::SendHello(
            endpoint,
            Hello {
                node_key: self.local_key,
                sequence,
                timestamp_us,
                observed_addr: endpoint.addr(),
                observed_port: endpoint.port(),
            },
        ));
    }
}

/// The neighbour table and its state machine; see the module documentation.
#[derive(Debug)]
pub struct PeerManager {
    core: Core,
    peers: BTreeMap<LinkEndpoint, Peer>,
    discovery_interfaces: BTreeSet<u32>,
    beacon_limiter: SourceLimiter<(Ipv6Addr, u32)>,
    /// Last accepted beacon timestamp per key, and when it was accepted.
    beacon_clock: HashMap<NodeKey, (u64, Instant)>,
}

impl PeerManager {
    /// A manager for the node with key `local_key`. `now` anchors the hello timestamps;
    /// `seed` seeds the timer jitter (use fresh randomness in the agent, a constant in
    /// tests for reproducible runs).
    pub fn new(
        config: PeerConfig,
        local_key: NodeKey,
        now: Instant,
        seed: u64,
    ) -> Result<Self, PeerError> {
        config.validate()?;
        let beacon_limiter = SourceLimiter::new(
            Rate {
                per_second: config.beacon_source_per_second,
                burst: config.beacon_source_burst,
            },
            Rate {
                per_second: config.beacon_global_per_second,
                burst: config.beacon_global_burst,
            },
            config.max_beacon_sources,
            now,
        );
        Ok(Self {
            core: Core {
                config,
                local_key,
                epoch: now,
                rng: seed,
                actions: VecDeque::new(),
                stats: PeerStats::default(),
            },
            peers: BTreeMap::new(),
            discovery_interfaces: BTreeSet::new(),
            beacon_limiter,
            beacon_clock: HashMap::new(),
        })
    }

    /// This node's key (hellos carry it; its own beacons are recognised by it).
    pub fn local_key(&self) -> NodeKey {
        self.core.local_key
    }

    /// The configuration in force.
    pub fn config(&self) -> &PeerConfig {
        &self.core.config
    }

    /// Counters for the control API.
    pub fn stats(&self) -> &PeerStats {
        &self.core.stats
    }

    /// Number of peers in every state.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether there are no peers at all.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    fn count(&self, pred: impl Fn(Origin) -> bool) -> usize {
        self.peers.values().filter(|p| pred(p.origin)).count()
    }

    /// Adds a configured neighbour and starts connecting at once. Returns `false` if it
    /// was already static; a discovered or inbound peer at the endpoint becomes static
    /// (and keeps its link).
    pub fn add_static(&mut self, endpoint: LinkEndpoint, now: Instant) -> Result<bool, PeerError> {
        endpoint
            .validate()
            .map_err(|e| PeerError::InvalidEndpoint(endpoint, e))?;
        let limit = self.core.config.max_static_peers;
        let full = self.count(|o| o == Origin::Static) >= limit;
        if let Some(peer) = self.peers.get_mut(&endpoint) {
            if peer.origin == Origin::Static {
                return Ok(false);
            }
            if full {
                return Err(PeerError::TooManyPeers {
                    origin: Origin::Static,
                    limit,
                });
            }
            // Configured peers are known by endpoint only; drop a beacon's key pin.
            peer.origin = Origin::Static;
            peer.announced_key = None;
            return Ok(true);
        }
        if full {
            return Err(PeerError::TooManyPeers {
                origin: Origin::Static,
                limit,
            });
        }
        let mut peer = Peer::new(Origin::Static, now);
        self.core.start_attempt(endpoint, &mut peer, now);
        self.peers.insert(endpoint, peer);
        Ok(true)
    }

    /// Forgets a neighbour of any origin: `PeerDown` if it was Up, then `CloseLink`.
    /// Returns whether it existed. (A discovered peer comes back with its next beacon;
    /// disable discovery on the interface to keep it out.)
    pub fn remove(&mut self, endpoint: LinkEndpoint) -> bool {
        let Some(peer) = self.peers.remove(&endpoint) else {
            return false;
        };
        self.forget(endpoint, &peer);
        true
    }

    fn forget(&mut self, endpoint: LinkEndpoint, peer: &Peer) {
        if peer.is_up() {
            self.core.stats.peer_downs += 1;
            self.core.actions.push_back(Action::PeerDown { endpoint });
        }
        self.core.actions.push_back(Action::CloseLink(endpoint));
    }

    /// Accepts beacons arriving on interface `ifindex` from now on.
    pub fn enable_discovery(&mut self, ifindex: u32) {
        self.discovery_interfaces.insert(ifindex);
    }

    /// Stops accepting beacons on `ifindex` and forgets the peers discovered there.
    /// Returns how many were forgotten.
    pub fn disable_discovery(&mut self, ifindex: u32) -> usize {
        self.discovery_interfaces.remove(&ifindex);
        let gone: Vec<LinkEndpoint> = self
            .peers
            .iter()
            .filter(|(_, p)| p.origin == Origin::Discovered && p.interface == Some(ifindex))
            .map(|(e, _)| *e)
            .collect();
        for endpoint in &gone {
            if let Some(peer) = self.peers.remove(endpoint) {
                self.forget(*endpoint, &peer);
            }
        }
        gone.len()
    }

    /// Whether beacons on `ifindex` are accepted.
    pub fn discovery_enabled(&self, ifindex: u32) -> bool {
        self.discovery_interfaces.contains(&ifindex)
    }

    /// Makes room for one more dynamic peer by evicting the one down (or never up)
    /// longest; `false` if every dynamic peer is Up.
    fn make_dynamic_room(&mut self) -> bool {
        let limit = self.core.config.max_dynamic_peers;
        while self.count(Origin::is_dynamic) >= limit {
            let victim = self
                .peers
                .iter()
                .filter(|(_, p)| p.origin.is_dynamic() && !p.is_up())
                .min_by_key(|(_, p)| p.since)
                .map(|(e, _)| *e);
            let Some(victim) = victim else {
                return false;
            };
            if let Some(peer) = self.peers.remove(&victim) {
                self.core.stats.evicted += 1;
                self.forget(victim, &peer);
            }
        }
        true
    }

    /// A discovery beacon arrived: `from` is the datagram's source (its link-local
    /// address; the scope is taken from `ifindex`), `wall` the local wall clock for the
    /// freshness check. Rate limiting comes before parsing and signature verification,
    /// so floods cost little; every rejection is counted by reason.
    pub fn on_beacon(
        &mut self,
        from: SocketAddrV6,
        ifindex: u32,
        datagram: &[u8],
        now: Instant,
        wall: SystemTime,
    ) -> Result<BeaconOutcome, BeaconReject> {
        let result = self.beacon(from, ifindex, datagram, now, wall);
        match result {
            Ok(_) => self.core.stats.beacons_accepted += 1,
            Err(reason) => self.core.stats.beacons_rejected[reason as usize] += 1,
        }
        result
    }

    fn beacon(
        &mut self,
        from: SocketAddrV6,
        ifindex: u32,
        datagram: &[u8],
        now: Instant,
        wall: SystemTime,
    ) -> Result<BeaconOutcome, BeaconReject> {
        if !self.discovery_interfaces.contains(&ifindex) {
            return Err(BeaconReject::InterfaceDisabled);
        }
        let source = *from.ip();
        if source.is_unspecified() || source.is_multicast() {
            return Err(BeaconReject::BadSource);
        }
        if !self.beacon_limiter.allow((source, ifindex), now) {
            return Err(BeaconReject::RateLimited);
        }
        let Ok(LinkMessage::Beacon(signed)) = LinkMessage::parse(datagram) else {
            return Err(BeaconReject::Malformed);
        };
        if signed.beacon.node_key == self.core.local_key {
            return Err(BeaconReject::OwnBeacon);
        }
        let beacon = *signed.verify().map_err(|e| match e {
            BeaconError::WrongAddress => BeaconReject::WrongAddress,
            BeaconError::BadSignature => BeaconReject::BadSignature,
        })?;
        if beacon.port == 0 {
            return Err(BeaconReject::BadPort);
        }
        let endpoint = LinkEndpoint::new(source, beacon.port, ifindex);
        if endpoint.validate().is_err() {
            return Err(BeaconReject::BadSource);
        }
        if let Some(max_age) = self.core.config.beacon_max_age {
            let wall_us = wall
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
            let max_us = u64::try_from(max_age.as_micros()).unwrap_or(u64::MAX);
            if beacon.timestamp_us.abs_diff(wall_us) > max_us {
                return Err(BeaconReject::Stale);
            }
        }
        self.record_beacon_time(beacon.node_key, beacon.timestamp_us, now)?;

        let key = beacon.node_key;
        if let Some(up) = self
            .peers
            .iter()
            .find(|(_, p)| p.is_up() && p.node_key == Some(key))
            .map(|(e, _)| *e)
        {
            if let Some(peer) = self.peers.get_mut(&endpoint) {
                peer.last_beacon = Some(now);
            }
            return Ok(BeaconOutcome::AlreadyConnected(up));
        }
        if let Some(peer) = self.peers.get_mut(&endpoint) {
            if peer.is_up() {
                // Up with another key (same key was handled above): an authenticated
                // link outranks an unauthenticated announcement.
                return Err(BeaconReject::KeyConflict);
            }
            peer.last_beacon = Some(now);
            if peer.origin == Origin::Discovered {
                peer.announced_key = Some(key);
                peer.interface = Some(ifindex);
            }
            return Ok(BeaconOutcome::Refreshed(endpoint));
        }
        if !self.make_dynamic_room() {
            return Err(BeaconReject::Full);
        }
        let mut peer = Peer::new(Origin::Discovered, now);
        peer.interface = Some(ifindex);
        peer.announced_key = Some(key);
        peer.last_beacon = Some(now);
        self.core.start_attempt(endpoint, &mut peer, now);
        self.peers.insert(endpoint, peer);
        self.core.stats.discovered_added += 1;
        Ok(BeaconOutcome::Added(endpoint))
    }

    /// Replay check: a key's beacon timestamps must strictly increase. The table is
    /// bounded; when full, the key updated longest ago is forgotten.
    fn record_beacon_time(
        &mut self,
        key: NodeKey,
        timestamp_us: u64,
        now: Instant,
    ) -> Result<(), BeaconReject> {
        if let Some((last, _)) = self.beacon_clock.get(&key)
            && timestamp_us <= *last
        {
            return Err(BeaconReject::Replayed);
        }
        if !self.beacon_clock.contains_key(&key)
            && self.beacon_clock.len() >= self.core.config.max_beacon_keys
        {
            let oldest = self
                .beacon_clock
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                self.beacon_clock.remove(&oldest);
            }
        }
        self.beacon_clock.insert(key, (timestamp_us, now));
        Ok(())
    }

    /// The session layer completed a link handshake with `endpoint`, proving `node_key`.
    /// This is the only way into Up (and so into the XDP peer map). An endpoint the
    /// manager does not know becomes an inbound peer if `accept_inbound` is set.
    pub fn on_link_authenticated(
        &mut self,
        endpoint: LinkEndpoint,
        node_key: NodeKey,
        now: Instant,
    ) -> Result<(), PeerError> {
        let result = self.authenticated(endpoint, node_key, now);
        if result.is_err() {
            self.core.stats.auth_rejected += 1;
        }
        result
    }

    fn authenticated(
        &mut self,
        endpoint: LinkEndpoint,
        node_key: NodeKey,
        now: Instant,
    ) -> Result<(), PeerError> {
        if node_key == self.core.local_key {
            return Err(PeerError::SelfLink(endpoint));
        }
        if !self.peers.contains_key(&endpoint) {
            if !self.core.config.accept_inbound {
                return Err(PeerError::InboundRefused(endpoint));
            }
            endpoint
                .validate()
                .map_err(|e| PeerError::InvalidEndpoint(endpoint, e))?;
            if !self.make_dynamic_room() {
                return Err(PeerError::TooManyPeers {
                    origin: Origin::Inbound,
                    limit: self.core.config.max_dynamic_peers,
                });
            }
            self.peers.insert(endpoint, Peer::new(Origin::Inbound, now));
        }
        let Some(peer) = self.peers.get_mut(&endpoint) else {
            return Err(PeerError::UnknownPeer(endpoint));
        };
        if let Some(expected) = peer.announced_key
            && expected != node_key
        {
            return Err(PeerError::KeyMismatch {
                endpoint,
                expected,
                got: node_key,
            });
        }
        if peer.is_up() {
            if peer.node_key == Some(node_key) {
                // A rekey or a repeated handshake: same neighbour, still alive, but
                // perhaps restarted with nothing of what it learned from us.
                peer.heard(now);
                self.core.actions.push_back(Action::LinkRenewed(endpoint));
                return Ok(());
            }
            // Another node now answers at this endpoint: it is a different neighbour.
            self.core.stats.peer_downs += 1;
            self.core.actions.push_back(Action::PeerDown { endpoint });
        }
        self.core.become_up(endpoint, peer, node_key, now);
        Ok(())
    }

    /// The session layer lost the link session with `endpoint` (expired, or a handshake
    /// it could not complete). An Up peer goes Down at once instead of waiting for the
    /// dead interval.
    pub fn on_link_lost(&mut self, endpoint: LinkEndpoint, now: Instant) {
        let Some(peer) = self.peers.get_mut(&endpoint) else {
            return;
        };
        if peer.is_up() && self.core.go_down(endpoint, peer, now) {
            self.peers.remove(&endpoint);
            self.core.actions.push_back(Action::CloseLink(endpoint));
        }
    }

    /// A packet from `endpoint` authenticated under its link session. Refreshes an Up
    /// peer's liveness; returns whether it did. Call it only for packets that opened
    /// under the link session: unauthenticated ones are spoofable and would let anyone
    /// keep a dead neighbour in the XDP peer map.
    pub fn on_any_packet_from(&mut self, endpoint: LinkEndpoint, now: Instant) -> bool {
        match self.peers.get_mut(&endpoint) {
            Some(peer) if peer.is_up() => {
                peer.heard(now);
                true
            }
            _ => false,
        }
    }

    fn up_peer(&mut self, endpoint: LinkEndpoint) -> Result<&mut Peer, PeerError> {
        match self.peers.get_mut(&endpoint) {
            None => Err(PeerError::UnknownPeer(endpoint)),
            Some(peer) if !peer.is_up() => Err(PeerError::NotUp(endpoint)),
            Some(peer) => Ok(peer),
        }
    }

    /// A hello from an Up neighbour: refreshes liveness and queues the ack.
    pub fn on_hello(
        &mut self,
        endpoint: LinkEndpoint,
        hello: &Hello,
        now: Instant,
    ) -> Result<(), PeerError> {
        let result = self.hello(endpoint, hello, now);
        match result {
            Ok(()) => self.core.stats.hellos_received += 1,
            Err(_) => self.core.stats.control_ignored += 1,
        }
        result
    }

    fn hello(
        &mut self,
        endpoint: LinkEndpoint,
        hello: &Hello,
        now: Instant,
    ) -> Result<(), PeerError> {
        let peer = self.up_peer(endpoint)?;
        if let Some(expected) = peer.node_key
            && expected != hello.node_key
        {
            return Err(PeerError::KeyMismatch {
                endpoint,
                expected,
                got: hello.node_key,
            });
        }
        peer.heard(now);
        peer.observed_by_peer = Some((hello.observed_addr, hello.observed_port));
        self.core.actions.push_back(Action::SendHelloAck(
            endpoint,
            HelloAck {
                sequence: hello.sequence,
                echoed_timestamp_us: hello.timestamp_us,
                ack_delay_us: 0,
            },
        ));
        Ok(())
    }

    /// A hello-ack from an Up neighbour: one RTT sample, measured on the local clock
    /// only (now minus the echoed send time minus the acker's delay).
    pub fn on_hello_ack(
        &mut self,
        endpoint: LinkEndpoint,
        ack: &HelloAck,
        now: Instant,
    ) -> Result<(), PeerError> {
        let now_us = self.core.micros(now);
        let result = self.hello_ack(endpoint, ack, now, now_us);
        match &result {
            Ok(()) => self.core.stats.acks_received += 1,
            Err(PeerError::UnmatchedAck { .. }) => self.core.stats.acks_unmatched += 1,
            Err(_) => self.core.stats.control_ignored += 1,
        }
        result
    }

    fn hello_ack(
        &mut self,
        endpoint: LinkEndpoint,
        ack: &HelloAck,
        now: Instant,
        now_us: u64,
    ) -> Result<(), PeerError> {
        let peer = self.up_peer(endpoint)?;
        let Some(record) = peer
            .hellos
            .iter_mut()
            .chain(peer.probes.iter_mut())
            .find(|r| {
                r.sequence == ack.sequence && r.timestamp_us == ack.echoed_timestamp_us && !r.acked
            })
        else {
            return Err(PeerError::UnmatchedAck {
                endpoint,
                sequence: ack.sequence,
            });
        };
        record.acked = true;
        let raw = now_us.saturating_sub(ack.echoed_timestamp_us);
        let delay = u64::from(ack.ack_delay_us);
        // An ack delay larger than the whole round trip is nonsense; ignore it then.
        let sample = if delay < raw { raw - delay } else { raw };
        match &mut peer.rtt {
            Some(rtt) => rtt.update(sample),
            None => peer.rtt = Some(Rtt::first(sample)),
        }
        peer.heard(now);
        Ok(())
    }

    /// Dispatches a control message opened under the link session with `endpoint`.
    pub fn handle_control(
        &mut self,
        endpoint: LinkEndpoint,
        message: &LinkMessage,
        now: Instant,
    ) -> Result<(), PeerError> {
        match message {
            LinkMessage::Hello(h) => self.on_hello(endpoint, h, now),
            LinkMessage::HelloAck(a) => self.on_hello_ack(endpoint, a, now),
            LinkMessage::Keepalive => {
                if self.on_any_packet_from(endpoint, now) {
                    Ok(())
                } else {
                    self.core.stats.control_ignored += 1;
                    Err(PeerError::NotUp(endpoint))
                }
            }
            LinkMessage::Beacon(_) => {
                self.core.stats.control_ignored += 1;
                Err(PeerError::UnexpectedBeacon(endpoint))
            }
        }
    }

    /// When [`PeerManager::handle_timeout`] next has work; `None` with no peers.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.peers
            .values()
            .filter_map(|p| p.deadline(&self.core.config))
            .min()
    }

    /// Runs every timer due at `now`: hellos, dead intervals, handshake retries and
    /// discovered-peer expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut forgotten = Vec::new();
        for (&endpoint, peer) in self.peers.iter_mut() {
            let core = &mut self.core;
            if peer.is_up() {
                let dead = now >= peer.dead_at(&core.config);
                let probe_due = peer.probe_due(&core.config).is_some_and(|t| now >= t);
                let unanswered = probe_due && peer.episode_probes >= core.config.probe_count;
                if dead || unanswered {
                    if unanswered && !dead {
                        core.stats.probe_downs += 1;
                    }
                    if core.go_down(endpoint, peer, now) {
                        forgotten.push(endpoint);
                    }
                    continue;
                }
                if probe_due {
                    core.send_probe(endpoint, peer, now);
                }
                if peer.next_hello.is_some_and(|t| now >= t) {
                    core.send_hello(endpoint, peer, now);
                }
                continue;
            }
            if peer.expires_at(&core.config).is_some_and(|t| now >= t) {
                core.stats.discovered_expired += 1;
                forgotten.push(endpoint);
                continue;
            }
            if peer.next_attempt.is_some_and(|t| now >= t) {
                core.start_attempt(endpoint, peer, now);
            }
        }
        for endpoint in forgotten {
            if self.peers.remove(&endpoint).is_some() {
                self.core.actions.push_back(Action::CloseLink(endpoint));
            }
        }
    }

    /// The next thing the shell must do, in the order the manager decided it.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.core.actions.pop_front()
    }

    /// One neighbour's state, for the control API.
    pub fn peer(&self, endpoint: LinkEndpoint, now: Instant) -> Option<PeerSnapshot> {
        self.peers
            .get(&endpoint)
            .map(|p| self.snapshot_of(endpoint, p, now))
    }

    /// Every neighbour's state, ordered by endpoint.
    pub fn snapshot(&self, now: Instant) -> Vec<PeerSnapshot> {
        self.peers
            .iter()
            .map(|(e, p)| self.snapshot_of(*e, p, now))
            .collect()
    }

    fn snapshot_of(&self, endpoint: LinkEndpoint, p: &Peer, now: Instant) -> PeerSnapshot {
        PeerSnapshot {
            endpoint,
            state: p.state,
            origin: p.origin,
            node_key: p.node_key,
            announced_key: p.announced_key,
            interface: p.interface,
            last_seen_age: p.last_seen.map(|t| now.saturating_duration_since(t)),
            state_age: now.saturating_duration_since(p.since),
            srtt: p.rtt.map(|r| Duration::from_micros(r.srtt_us)),
            rttvar: p.rtt.map(|r| Duration::from_micros(r.rttvar_us)),
            loss: p.loss(now, self.core.config.hello_loss_timeout),
            observed_by_peer: p.observed_by_peer,
            connect_attempts: p.attempts,
        }
    }
}
