//! The node: identity, RIB, peers and the kernel data plane behind one lock, with the
//! operations the control API and the packet loop need.
//!
//! Every change goes to the kernel map first and to the RIB only once the kernel took
//! it, so the two never disagree after a failed update. A route change is one map
//! update (BPF_ANY), so a prefix is never unroutable while it changes.

use std::{
    collections::BTreeSet,
    net::Ipv6Addr,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use myconet_common::{
    addr::{LINK_ADDRESS, NODE_PREFIX_LEN, is_overlay},
    maps::{Counter, Stat},
    wire::Repr,
};

use crate::identity::Identity;
use crate::os::{
    dataplane::{AttachedMode, Attachment, DataplaneError, XdpDataplane},
    egress::EgressPolicy,
    sysctl,
};
use myconet_core::{
    forward::{self, Decision},
    id::LinkEndpoint,
    rib::{NextHop, Origin, Prefix, Rib, RibEntry, RouteTarget},
};

/// Why an operation on the node was refused.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The kernel refused a map update.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// The node's own prefix cannot be replaced or removed by hand.
    #[error("{0} is this node's own prefix")]
    OwnPrefix(Prefix),
    /// A next hop that cannot be an underlay neighbour.
    #[error("invalid next hop {0}: {1}")]
    InvalidNextHop(String, &'static str),
    /// A peer endpoint that cannot be an underlay neighbour.
    #[error("invalid peer {0}: {1}")]
    InvalidPeer(String, &'static str),
}

/// Counters of what reached the agent's UDP socket, i.e. what the XDP program passed up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum AgentStat {
    /// Every data packet, whatever became of it.
    RxData,
    /// Data for this node, delivered (to the TUN device when there is one).
    RxDataLocal,
    /// Data relayed by the userspace path.
    RxDataRelayed,
    /// Data dropped: sender not a neighbour.
    RxDataUnknownPeer,
    /// Data dropped: no route.
    RxDataNoRoute,
    /// Data dropped: hop limit.
    RxDataHopLimit,
    /// Handshake and cookie packets for this node.
    RxHandshake,
    /// Handshake, cookie and too-big packets relayed for others.
    RxHandshakeRelayed,
    /// Handshake, cookie and too-big packets dropped by the relay rules.
    RxHandshakeDropped,
    /// Handshake and cookie packets not relayed because the neighbour that handed them
    /// over exceeded its share (see `underlay::RELAY_HANDSHAKE_LIMIT`).
    RxHandshakeRelayLimited,
    /// Link-level control packets.
    RxControl,
    /// Not a valid Myconet header.
    RxMalformed,
    /// Data for this node that failed to open (bad tag, replay, wrong key).
    RxOpenFailed,
    /// Data for a session index this node does not have.
    RxUnknownSession,
    /// Decrypted packets whose inner addresses do not belong to the session.
    RxInnerInvalid,
    /// Handshake messages refused (bad signature, wrong identity, malformed).
    HandshakeRejected,
    /// Handshake messages over the per-source rate or the verification budget.
    HandshakeRateLimited,
    /// HandshakeInits whose signature this node checked: the expensive step (about
    /// 130 µs with the response) that the admission rules bound.
    HandshakeVerified,
    /// HandshakeInits not newer than one already accepted from their initiator
    /// (replays), refused before any signature work.
    HandshakeReplayed,
    /// TUN packets dropped because the handshake they needed could not start: too many
    /// under way, or new ones over their rate.
    HandshakeThrottled,
    /// Initiations that gave up.
    HandshakeFailed,
    /// Authenticated link handshakes the neighbour policy refused (inbound peers not
    /// accepted, a key other than the announced one, too many peers).
    LinkRefused,
    /// Authenticated neighbours the relay peer map refused (invalid endpoint, map
    /// full): they are neither admitted as relay peers nor routed over.
    PeerNotAdmitted,
    /// Packets read from the TUN device.
    TunRx,
    /// TUN packets for the overlay that could not be sent (malformed, no session
    /// possible).
    TunDropped,
    /// TUN packets for a destination outside the overlay, or for this node itself: the
    /// kernel's own chatter on the device (multicast listener reports, router
    /// solicitations), not Myconet's to carry; kept apart so that `tun_dropped` only
    /// counts real losses.
    TunNotOverlay,
    /// Datagrams with no route to their overlay destination.
    TxNoRoute,
    /// Sends that failed.
    TxError,
    /// Data not relayed because it is larger than the next link takes (its source gets
    /// a too-big report, see `pmtu`).
    RxDataTooBig,
    /// Too-big reports this relay sent.
    TooBigSent,
    /// Oversized packets no report was sent for (report rate exceeded, or a next link
    /// too small for the overlay at all).
    TooBigSuppressed,
    /// Too-big reports believed: the path MTU towards a destination was lowered.
    TooBigAccepted,
    /// Too-big reports that are not structurally valid.
    TooBigMalformed,
    /// Too-big reports about packets from addresses this node does not own.
    TooBigNotOurs,
    /// Too-big reports that would lower a path below the IPv6 minimum MTU.
    TooBigBelowMinimum,
    /// Too-big reports quoting no packet this node sent recently.
    TooBigUnknownQuote,
    /// Too-big reports not newer than the last one believed (replays).
    TooBigReplayed,
    /// Too-big reports over the signature-verification budget.
    TooBigRateLimited,
    /// Too-big reports from relays the routing table holds no key for.
    TooBigUnknownReporter,
    /// Too-big reports whose signature does not verify.
    TooBigBadSignature,
    /// TUN packets dropped for exceeding the path MTU towards their destination (each
    /// answered, within a rate, by an ICMPv6 Packet Too Big on the TUN device).
    TunTooBig,
}

impl AgentStat {
    /// Every counter in index order.
    pub const ALL: [AgentStat; 41] = [
        AgentStat::RxData,
        AgentStat::RxDataLocal,
        AgentStat::RxDataRelayed,
        AgentStat::RxDataUnknownPeer,
        AgentStat::RxDataNoRoute,
        AgentStat::RxDataHopLimit,
        AgentStat::RxHandshake,
        AgentStat::RxHandshakeRelayed,
        AgentStat::RxHandshakeDropped,
        AgentStat::RxHandshakeRelayLimited,
        AgentStat::RxControl,
        AgentStat::RxMalformed,
        AgentStat::RxOpenFailed,
        AgentStat::RxUnknownSession,
        AgentStat::RxInnerInvalid,
        AgentStat::HandshakeRejected,
        AgentStat::HandshakeRateLimited,
        AgentStat::HandshakeVerified,
        AgentStat::HandshakeReplayed,
        AgentStat::HandshakeThrottled,
        AgentStat::HandshakeFailed,
        AgentStat::LinkRefused,
        AgentStat::PeerNotAdmitted,
        AgentStat::TunRx,
        AgentStat::TunDropped,
        AgentStat::TunNotOverlay,
        AgentStat::TxNoRoute,
        AgentStat::TxError,
        AgentStat::RxDataTooBig,
        AgentStat::TooBigSent,
        AgentStat::TooBigSuppressed,
        AgentStat::TooBigAccepted,
        AgentStat::TooBigMalformed,
        AgentStat::TooBigNotOurs,
        AgentStat::TooBigBelowMinimum,
        AgentStat::TooBigUnknownQuote,
        AgentStat::TooBigReplayed,
        AgentStat::TooBigRateLimited,
        AgentStat::TooBigUnknownReporter,
        AgentStat::TooBigBadSignature,
        AgentStat::TunTooBig,
    ];

    /// Stable name for the API and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            AgentStat::RxData => "rx_data",
            AgentStat::RxDataLocal => "rx_data_local",
            AgentStat::RxDataRelayed => "rx_data_relayed",
            AgentStat::RxDataUnknownPeer => "rx_data_unknown_peer",
            AgentStat::RxDataNoRoute => "rx_data_no_route",
            AgentStat::RxDataHopLimit => "rx_data_hop_limit",
            AgentStat::RxHandshake => "rx_handshake",
            AgentStat::RxHandshakeRelayed => "rx_handshake_relayed",
            AgentStat::RxHandshakeDropped => "rx_handshake_dropped",
            AgentStat::RxHandshakeRelayLimited => "rx_handshake_relay_limited",
            AgentStat::RxControl => "rx_control",
            AgentStat::RxMalformed => "rx_malformed",
            AgentStat::RxOpenFailed => "rx_open_failed",
            AgentStat::RxUnknownSession => "rx_unknown_session",
            AgentStat::RxInnerInvalid => "rx_inner_invalid",
            AgentStat::HandshakeRejected => "handshake_rejected",
            AgentStat::HandshakeRateLimited => "handshake_rate_limited",
            AgentStat::HandshakeVerified => "handshake_verified",
            AgentStat::HandshakeReplayed => "handshake_replayed",
            AgentStat::HandshakeThrottled => "handshake_throttled",
            AgentStat::HandshakeFailed => "handshake_failed",
            AgentStat::LinkRefused => "link_refused",
            AgentStat::PeerNotAdmitted => "peer_not_admitted",
            AgentStat::TunRx => "tun_rx",
            AgentStat::TunDropped => "tun_dropped",
            AgentStat::TunNotOverlay => "tun_not_overlay",
            AgentStat::TxNoRoute => "tx_no_route",
            AgentStat::TxError => "tx_error",
            AgentStat::RxDataTooBig => "rx_data_too_big",
            AgentStat::TooBigSent => "too_big_sent",
            AgentStat::TooBigSuppressed => "too_big_suppressed",
            AgentStat::TooBigAccepted => "too_big_accepted",
            AgentStat::TooBigMalformed => "too_big_malformed",
            AgentStat::TooBigNotOurs => "too_big_not_ours",
            AgentStat::TooBigBelowMinimum => "too_big_below_minimum",
            AgentStat::TooBigUnknownQuote => "too_big_unknown_quote",
            AgentStat::TooBigReplayed => "too_big_replayed",
            AgentStat::TooBigRateLimited => "too_big_rate_limited",
            AgentStat::TooBigUnknownReporter => "too_big_unknown_reporter",
            AgentStat::TooBigBadSignature => "too_big_bad_signature",
            AgentStat::TunTooBig => "tun_too_big",
        }
    }
}

#[derive(Debug)]
struct AgentCounters {
    packets: [AtomicU64; AgentStat::ALL.len()],
    bytes: [AtomicU64; AgentStat::ALL.len()],
}

// By hand: `Default` is derived for arrays of at most 32 elements.
impl Default for AgentCounters {
    fn default() -> Self {
        Self {
            packets: std::array::from_fn(|_| AtomicU64::new(0)),
            bytes: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// One configured underlay interface as the agent set it up at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfiguredInterface {
    /// Interface name.
    pub name: String,
    /// Kernel interface index.
    pub ifindex: u32,
    /// Why this interface relays on the userspace path (XDP refused, or not asked for);
    /// `None` when XDP was attached.
    pub userspace_reason: Option<String>,
}

/// How one interface relays right now, for `status`: the operator must be able to see
/// which interfaces fell back to the (slower) userspace path and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceStatus {
    /// Interface name.
    pub name: String,
    /// Kernel interface index.
    pub ifindex: u32,
    /// The XDP attach mode, `None` when the agent relays this interface's traffic.
    pub xdp: Option<AttachedMode>,
    /// Why the interface is on the userspace path (empty when `xdp` is set).
    pub userspace_reason: String,
    /// How the program may send frames out of it, when XDP is attached.
    pub policy: Option<EgressPolicy>,
}

/// The data plane a node uses overall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataplaneMode {
    /// XDP on every interface.
    Xdp,
    /// XDP on some interfaces, the userspace path on the others.
    Mixed,
    /// No XDP anywhere: the agent relays everything.
    Userspace,
}

impl DataplaneMode {
    /// Name used by the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            DataplaneMode::Xdp => "xdp",
            DataplaneMode::Mixed => "mixed",
            DataplaneMode::Userspace => "userspace",
        }
    }
}

/// A point-in-time view for `status`.
#[derive(Debug, Clone)]
pub struct StatusSnapshot {
    /// Hex public key.
    pub public_key: String,
    /// The node's /64.
    pub node_prefix: Prefix,
    /// The node's address.
    pub node_address: Ipv6Addr,
    /// Underlay port.
    pub port: u16,
    /// Every configured interface with the path it relays on (XDP attachments the
    /// configuration does not name, e.g. from tests, are listed after them).
    pub interfaces: Vec<InterfaceStatus>,
    /// The data plane in use overall.
    pub dataplane: DataplaneMode,
    /// What the operator asked for (`auto`, `xdp`, `userspace`), empty if not recorded.
    pub dataplane_requested: String,
    /// Seconds since start.
    pub uptime_seconds: u64,
    /// Number of peers.
    pub peer_count: usize,
    /// Number of RIB routes.
    pub route_count: usize,
}

/// One prefix as the agent and the kernel see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRow {
    /// The prefix.
    pub prefix: Prefix,
    /// The agent's entry.
    pub agent: Option<RibEntry>,
    /// The kernel map's entry (`None` if absent or no data plane).
    pub kernel: Option<RouteTarget>,
}

impl RouteRow {
    /// Whether both sides agree.
    pub fn in_sync(&self) -> bool {
        self.agent.map(|e| e.target) == self.kernel
    }
}

struct State {
    rib: Rib,
    /// What the routing protocol selected, kept even where a static route overrides
    /// it, so removing the static route falls back to it at once.
    routed: std::collections::BTreeMap<Prefix, NextHop>,
    peers: BTreeSet<LinkEndpoint>,
    dataplane: Option<XdpDataplane>,
    sysctls: sysctl::Journal,
    /// The underlay source address each next hop's routes carry in the kernel map
    /// (`RouteValue::src`), so a changed address or route re-resolves exactly the
    /// routes whose source moved.
    sources: std::collections::HashMap<NextHop, Option<Ipv6Addr>>,
    /// The interfaces as configured at start, and what was asked for.
    interfaces: Vec<ConfiguredInterface>,
    dataplane_requested: String,
}

/// The running node.
pub struct Node {
    identity: Arc<Identity>,
    node_prefix: Prefix,
    port: u16,
    started: Instant,
    state: Mutex<State>,
    counters: AgentCounters,
    /// This node's underlay addresses (what the watcher last read), with a generation
    /// that moves on every change: link handshakes are bound to them.
    underlay_addrs: Mutex<(u64, Arc<Vec<Ipv6Addr>>)>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node_prefix", &self.node_prefix)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Builds the node and installs its own prefix as a local route.
    pub fn new(
        identity: Identity,
        port: u16,
        dataplane: Option<XdpDataplane>,
        sysctls: sysctl::Journal,
    ) -> Result<Self, NodeError> {
        let node_prefix = Prefix::new(identity.node_prefix(), NODE_PREFIX_LEN)
            .map_err(|_| NodeError::InvalidNextHop("own prefix".into(), "not in overlay"))?;
        let node = Self {
            identity: Arc::new(identity),
            node_prefix,
            port,
            started: Instant::now(),
            state: Mutex::new(State {
                rib: Rib::default(),
                routed: std::collections::BTreeMap::new(),
                peers: BTreeSet::new(),
                dataplane,
                sysctls,
                sources: std::collections::HashMap::new(),
                interfaces: Vec::new(),
                dataplane_requested: String::new(),
            }),
            counters: AgentCounters::default(),
            underlay_addrs: Mutex::new((0, Arc::new(Vec::new()))),
        };
        // Link handshakes and link control packets are addressed to the reserved link
        // address: local on every node, so neither XDP nor the userspace path relays them.
        let link = Prefix::new(LINK_ADDRESS, 128)
            .map_err(|_| NodeError::InvalidNextHop("link address".into(), "not in overlay"))?;
        for prefix in [node_prefix, link] {
            node.install(
                prefix,
                RibEntry {
                    target: RouteTarget::Local,
                    origin: Origin::Local,
                },
            )?;
        }
        Ok(node)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the XDP forwarding caches look every flow and next hop up again (see
    /// [`XdpDataplane::invalidate_caches`]); run every
    /// [`myconet_common::maps::NEXTHOP_REFRESH_INTERVAL_MS`] by [`Node::refresh_nexthops_forever`].
    pub fn refresh_nexthops(&self) {
        if let Some(dp) = self.state().dataplane.as_mut() {
            dp.invalidate_caches();
            // Adopted routes and peers this agent did not confirm in time go.
            dp.expire_adopted(Instant::now());
        }
    }

    /// Bounds how long a neighbour's changed MAC address or a changed underlay route
    /// stays in the XDP forwarding caches: the program reads no clock per packet.
    pub async fn refresh_nexthops_forever(self: Arc<Self>) {
        let period =
            std::time::Duration::from_millis(myconet_common::maps::NEXTHOP_REFRESH_INTERVAL_MS);
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            self.refresh_nexthops();
        }
    }

    fn install(&self, prefix: Prefix, entry: RibEntry) -> Result<(), NodeError> {
        // Resolved before taking the lock: it asks the kernel's routing table.
        let src = Self::resolve_source(&entry);
        Self::install_locked(&mut self.state(), prefix, entry, src)
    }

    /// The underlay source address the kernel picks for a forward entry's next hop
    /// (stored per route, so the program need not ask the FIB per packet).
    fn resolve_source(entry: &RibEntry) -> Option<(NextHop, Option<Ipv6Addr>)> {
        match entry.target {
            RouteTarget::Forward(nh) => Some((nh, crate::os::next_hop::underlay_source(&nh))),
            RouteTarget::Local => None,
        }
    }

    /// [`Node::install`] for callers that already hold the state lock, so a decision and
    /// the install it leads to cannot be separated by another change; `src` is
    /// [`Node::resolve_source`] of `entry`.
    fn install_locked(
        st: &mut State,
        prefix: Prefix,
        entry: RibEntry,
        src: Option<(NextHop, Option<Ipv6Addr>)>,
    ) -> Result<(), NodeError> {
        if let Some(dp) = st.dataplane.as_mut() {
            dp.set_route(
                prefix.addr(),
                prefix.prefix_len(),
                entry
                    .target
                    .to_map_value_with_src(src.and_then(|(_, src)| src)),
            )?;
        }
        if let Some((nh, src)) = src {
            st.sources.insert(nh, src);
        }
        st.rib.insert(prefix, entry);
        Ok(())
    }

    /// The distinct next hops of the routes installed now: the neighbours the relay
    /// path sends to, whose link-layer entries the kernel must keep valid.
    pub fn next_hops_in_use(&self) -> Vec<NextHop> {
        let st = self.state();
        let hops: BTreeSet<(Ipv6Addr, u16, u32)> = st
            .rib
            .iter()
            .filter_map(|(_, e)| match e.target {
                RouteTarget::Forward(nh) => Some((nh.addr, nh.port, nh.ifindex)),
                RouteTarget::Local => None,
            })
            .collect();
        hops.into_iter()
            .map(|(addr, port, ifindex)| NextHop {
                addr,
                port,
                ifindex,
            })
            .collect()
    }

    /// Resolves every next hop's underlay source address afresh and rewrites the kernel
    /// routes whose source changed (an address was added or removed, an underlay route
    /// moved): the per-route source saves the program a FIB source lookup per packet, so
    /// it must follow the kernel. Returns how many routes were rewritten.
    pub fn refresh_route_sources(&self) -> Result<usize, NodeError> {
        let hops = self.next_hops_in_use();
        let resolved: Vec<(NextHop, Option<Ipv6Addr>)> = hops
            .into_iter()
            .map(|nh| (nh, crate::os::next_hop::underlay_source(&nh)))
            .collect();
        let mut st = self.state();
        let st = &mut *st;
        st.sources
            .retain(|nh, _| resolved.iter().any(|(h, _)| h == nh));
        let mut rewritten = 0;
        for (nh, src) in resolved {
            if st.sources.get(&nh) == Some(&src) {
                continue;
            }
            if let Some(dp) = st.dataplane.as_mut() {
                for (prefix, entry) in st.rib.iter() {
                    if entry.target == RouteTarget::Forward(nh) {
                        dp.set_route(
                            prefix.addr(),
                            prefix.prefix_len(),
                            entry.target.to_map_value_with_src(src),
                        )?;
                        rewritten += 1;
                    }
                }
            }
            st.sources.insert(nh, src);
        }
        Ok(rewritten)
    }

    /// The node identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The node identity, shared with the session layer that signs handshakes.
    pub fn identity_arc(&self) -> Arc<Identity> {
        self.identity.clone()
    }

    /// Where packets for overlay address `dst` go next, if this node has a route and
    /// does not own the address.
    pub fn next_hop_for(&self, dst: Ipv6Addr) -> Option<NextHop> {
        match self.state().rib.lookup(dst)?.1.target {
            RouteTarget::Forward(nh) => Some(nh),
            RouteTarget::Local => None,
        }
    }

    /// The node's /64.
    pub fn node_prefix(&self) -> Prefix {
        self.node_prefix
    }

    /// Underlay port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Records the configured interfaces and how each was set up (`requested`: the
    /// `--dataplane` choice), so `status` can show the userspace ones and why.
    pub fn set_interfaces(&self, requested: &str, interfaces: Vec<ConfiguredInterface>) {
        let mut st = self.state();
        st.interfaces = interfaces;
        st.dataplane_requested = requested.to_string();
    }

    /// Every configured interface with the path it relays on now.
    fn interface_status(st: &State) -> Vec<InterfaceStatus> {
        let attached: Vec<Attachment> = st
            .dataplane
            .as_ref()
            .map(XdpDataplane::attachments)
            .unwrap_or_default();
        let mut out: Vec<InterfaceStatus> = st
            .interfaces
            .iter()
            .map(|c| {
                let found = attached.iter().find(|a| a.ifindex == c.ifindex);
                let xdp = found.map(|a| a.mode);
                InterfaceStatus {
                    name: c.name.clone(),
                    ifindex: c.ifindex,
                    xdp,
                    policy: found.map(|a| a.policy),
                    userspace_reason: match xdp {
                        Some(_) => String::new(),
                        None => c
                            .userspace_reason
                            .clone()
                            .unwrap_or_else(|| "XDP not attached".to_string()),
                    },
                }
            })
            .collect();
        for a in attached {
            if !out.iter().any(|i| i.ifindex == a.ifindex) {
                out.push(InterfaceStatus {
                    name: a.name,
                    ifindex: a.ifindex,
                    xdp: Some(a.mode),
                    userspace_reason: String::new(),
                    policy: Some(a.policy),
                });
            }
        }
        out
    }

    /// A snapshot for `status`.
    pub fn status(&self) -> StatusSnapshot {
        let st = self.state();
        let interfaces = Self::interface_status(&st);
        let with_xdp = interfaces.iter().filter(|i| i.xdp.is_some()).count();
        let dataplane = if with_xdp == 0 {
            DataplaneMode::Userspace
        } else if with_xdp == interfaces.len() {
            DataplaneMode::Xdp
        } else {
            DataplaneMode::Mixed
        };
        StatusSnapshot {
            public_key: self.identity.public_key_hex(),
            node_prefix: self.node_prefix,
            node_address: self.identity.node_address(),
            port: self.port,
            interfaces,
            dataplane,
            dataplane_requested: st.dataplane_requested.clone(),
            uptime_seconds: self.started.elapsed().as_secs(),
            peer_count: st.peers.len(),
            route_count: st.rib.len(),
        }
    }

    /// Adds or replaces a static route.
    pub fn add_route(&self, prefix: Prefix, next_hop: NextHop) -> Result<RibEntry, NodeError> {
        let shown = next_hop.addr.to_string();
        if next_hop.addr.is_unspecified() || next_hop.addr.is_multicast() {
            return Err(NodeError::InvalidNextHop(
                shown,
                "must be a unicast address",
            ));
        }
        if is_overlay(&next_hop.addr) {
            return Err(NodeError::InvalidNextHop(
                shown,
                "must be an underlay address, not an overlay one",
            ));
        }
        if next_hop.port == 0 {
            return Err(NodeError::InvalidNextHop(shown, "port must not be 0"));
        }
        if self.is_own(&prefix) {
            return Err(NodeError::OwnPrefix(prefix));
        }
        let entry = RibEntry {
            target: RouteTarget::Forward(next_hop),
            origin: Origin::Static,
        };
        self.install(prefix, entry)?;
        Ok(entry)
    }

    /// Removes a static route; `false` if the agent held none for the prefix.
    pub fn remove_route(&self, prefix: Prefix) -> Result<bool, NodeError> {
        if self.is_own(&prefix) {
            return Err(NodeError::OwnPrefix(prefix));
        }
        // One lock for the decision and the change: the routing protocol must not
        // withdraw or replace its route between the two.
        let mut st = self.state();
        if let Some(next_hop) = st.routed.get(&prefix).copied() {
            // Fall back to what the routing protocol selected: one in-place replace, so
            // the prefix never becomes unroutable.
            let existed = st
                .rib
                .get(&prefix)
                .is_some_and(|e| e.origin == Origin::Static);
            let entry = RibEntry {
                target: RouteTarget::Forward(next_hop),
                origin: Origin::Routing,
            };
            // Under the lock here: the next hop is only known under it (rare path).
            let src = Self::resolve_source(&entry);
            Self::install_locked(&mut st, prefix, entry, src)?;
            return Ok(existed);
        }
        let in_kernel = match st.dataplane.as_mut() {
            Some(dp) => dp.remove_route(prefix.addr(), prefix.prefix_len())?,
            None => false,
        };
        Ok(st.rib.remove(&prefix).is_some() || in_kernel)
    }

    /// Installs (or replaces in place) the routing protocol's choice for `prefix`,
    /// unless an operator's static route overrides it.
    pub fn set_routed(&self, prefix: Prefix, next_hop: NextHop) -> Result<(), NodeError> {
        if self.is_own(&prefix) {
            return Err(NodeError::OwnPrefix(prefix));
        }
        let entry = RibEntry {
            target: RouteTarget::Forward(next_hop),
            origin: Origin::Routing,
        };
        let src = Self::resolve_source(&entry);
        // The static-route check and the install under one lock: a static route added
        // in between would otherwise be overwritten.
        let mut st = self.state();
        st.routed.insert(prefix, next_hop);
        if st
            .rib
            .get(&prefix)
            .is_some_and(|e| e.origin == Origin::Static)
        {
            return Ok(());
        }
        Self::install_locked(&mut st, prefix, entry, src)
    }

    /// Withdraws the routing protocol's route for `prefix` (a static route stays).
    pub fn unset_routed(&self, prefix: Prefix) -> Result<(), NodeError> {
        let mut st = self.state();
        st.routed.remove(&prefix);
        if st
            .rib
            .get(&prefix)
            .is_some_and(|e| e.origin == Origin::Routing)
        {
            if let Some(dp) = st.dataplane.as_mut() {
                dp.remove_route(prefix.addr(), prefix.prefix_len())?;
            }
            st.rib.remove(&prefix);
        }
        Ok(())
    }

    /// The node's /64 and the reserved link address are local by construction.
    fn is_own(&self, prefix: &Prefix) -> bool {
        *prefix == self.node_prefix || (prefix.addr() == LINK_ADDRESS && prefix.prefix_len() == 128)
    }

    /// Every prefix held by the agent or the kernel, side by side.
    pub fn routes(&self) -> Result<Vec<RouteRow>, NodeError> {
        let st = self.state();
        let mut rows: std::collections::BTreeMap<Prefix, RouteRow> = st
            .rib
            .iter()
            .map(|(p, e)| {
                (
                    *p,
                    RouteRow {
                        prefix: *p,
                        agent: Some(*e),
                        kernel: None,
                    },
                )
            })
            .collect();
        if let Some(dp) = st.dataplane.as_ref() {
            for (addr, len, value) in dp.routes()? {
                let target = RouteTarget::from_map_value(&value);
                // The kernel map may hold anything someone wrote there; show what parses.
                let Ok(prefix) = Prefix::new(addr, len) else {
                    continue;
                };
                rows.entry(prefix)
                    .or_insert(RouteRow {
                        prefix,
                        agent: None,
                        kernel: None,
                    })
                    .kernel = target;
            }
        }
        Ok(rows.into_values().collect())
    }

    /// Allows an underlay endpoint to relay through this node. A link-local endpoint
    /// must name its interface: it is admitted only for packets arriving there.
    pub fn add_peer(&self, endpoint: LinkEndpoint) -> Result<(), NodeError> {
        let shown = endpoint.to_string();
        let addr = endpoint.addr();
        if addr.is_unspecified() || addr.is_multicast() {
            return Err(NodeError::InvalidPeer(shown, "must be a unicast address"));
        }
        if is_overlay(&addr) {
            return Err(NodeError::InvalidPeer(shown, "must be an underlay address"));
        }
        if addr.is_unicast_link_local() && endpoint.scope_id() == 0 {
            return Err(NodeError::InvalidPeer(
                shown,
                "a link-local peer needs the interface it is on",
            ));
        }
        if endpoint.port() == 0 {
            return Err(NodeError::InvalidPeer(shown, "port must not be 0"));
        }
        let mut st = self.state();
        if let Some(dp) = st.dataplane.as_mut() {
            dp.add_peer(endpoint.peer_key())?;
        }
        st.peers.insert(endpoint);
        Ok(())
    }

    /// Revokes an endpoint; `false` if it was not a peer.
    pub fn remove_peer(&self, endpoint: LinkEndpoint) -> Result<bool, NodeError> {
        let mut st = self.state();
        let in_kernel = match st.dataplane.as_mut() {
            Some(dp) => dp.remove_peer(endpoint.peer_key())?,
            None => false,
        };
        Ok(st.peers.remove(&endpoint) || in_kernel)
    }

    /// Whether the XDP data plane is attached (otherwise the userspace path relays).
    pub fn has_dataplane(&self) -> bool {
        self.state().dataplane.is_some()
    }

    /// Peers with whether each is in the kernel map.
    pub fn peers(&self) -> Result<Vec<(LinkEndpoint, bool)>, NodeError> {
        let st = self.state();
        let kernel: BTreeSet<LinkEndpoint> = match st.dataplane.as_ref() {
            Some(dp) => dp
                .peers()?
                .iter()
                .map(LinkEndpoint::from_peer_key)
                .collect(),
            None => BTreeSet::new(),
        };
        let mut all: BTreeSet<LinkEndpoint> = st.peers.clone();
        all.extend(kernel.iter().copied());
        Ok(all.into_iter().map(|e| (e, kernel.contains(&e))).collect())
    }

    /// Makes the XDP local-address map hold exactly `addrs`, this node's underlay
    /// addresses (see [`XdpDataplane::sync_local_addrs`]); `false` when nothing changed
    /// or there is no data plane.
    pub fn sync_local_addrs(
        &self,
        addrs: &BTreeSet<myconet_common::maps::LocalAddrKey>,
    ) -> Result<bool, NodeError> {
        {
            let mut list: Vec<Ipv6Addr> = addrs.iter().map(|k| Ipv6Addr::from(k.addr)).collect();
            list.sort_unstable();
            list.dedup();
            let mut held = self
                .underlay_addrs
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if *held.1 != list {
                *held = (held.0 + 1, Arc::new(list));
            }
        }
        match self.state().dataplane.as_mut() {
            Some(dp) => Ok(dp.sync_local_addrs(addrs)?),
            None => Ok(false),
        }
    }

    /// This node's underlay addresses as last read, and their generation (0 before the
    /// first read): the session table binds link handshakes to them.
    pub fn underlay_addrs(&self) -> (u64, Arc<Vec<Ipv6Addr>>) {
        self.underlay_addrs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-checks how frames may leave each attached interface (see
    /// [`XdpDataplane::refresh_egress`]) and logs what changed.
    pub fn refresh_egress(&self) -> Result<(), NodeError> {
        let changed = match self.state().dataplane.as_mut() {
            Some(dp) => dp.refresh_egress()?,
            None => Vec::new(),
        };
        for a in changed {
            if a.policy.redirect {
                tracing::info!(
                    iface = a.name,
                    "egress can take XDP frames again: relayed in the kernel"
                );
            } else {
                tracing::warn!(
                    iface = a.name,
                    xdp_tx = a.policy.tx,
                    "egress cannot take redirected XDP frames (veth far end without XDP or GRO?): relayed on the slow path"
                );
            }
        }
        Ok(())
    }

    /// XDP counters summed over CPUs; empty without a data plane.
    pub fn xdp_stats(&self) -> Result<Vec<(Stat, Counter)>, NodeError> {
        Ok(match self.state().dataplane.as_ref() {
            Some(dp) => dp.stats()?,
            None => Vec::new(),
        })
    }

    /// The agent's own counters.
    pub fn agent_stats(&self) -> Vec<(AgentStat, Counter)> {
        AgentStat::ALL
            .iter()
            .map(|&s| {
                (
                    s,
                    Counter {
                        packets: self.counters.packets[s as usize].load(Ordering::Relaxed),
                        bytes: self.counters.bytes[s as usize].load(Ordering::Relaxed),
                    },
                )
            })
            .collect()
    }

    /// Counts one packet of `len` bytes.
    pub fn count(&self, stat: AgentStat, len: usize) {
        self.counters.packets[stat as usize].fetch_add(1, Ordering::Relaxed);
        self.counters.bytes[stat as usize].fetch_add(len as u64, Ordering::Relaxed);
    }

    /// The userspace forwarding decision for a data packet from `from`.
    pub fn decide(&self, from: LinkEndpoint, header: &Repr) -> Decision {
        let st = self.state();
        forward::decide(&st.rib, &st.peers, from, header)
    }

    /// Detaches XDP, removes its pins and restores sysctls; idempotent. With `hitless`
    /// and a pinned data plane, leaves the program relaying on its pinned maps and the
    /// sysctls as they are, for the next agent on this state directory to adopt.
    pub fn shutdown(&self, hitless: bool) {
        let mut st = self.state();
        let keep = hitless && st.dataplane.as_mut().is_some_and(XdpDataplane::release);
        if keep {
            st.sysctls.keep_for_successor();
            return;
        }
        if hitless {
            tracing::warn!("nothing is pinned: the data plane goes with this agent");
        }
        if let Some(dp) = st.dataplane.as_mut() {
            dp.detach_all();
        }
        st.sysctls.restore_and_clear();
    }
}

/// The discovery task signs beacons with the node's key through the node it is given.
impl myconet_core::id::Signer for Node {
    fn public_key(&self) -> &[u8] {
        self.identity().public_key()
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        myconet_core::id::Signer::sign(self.identity(), message)
    }
}
