//! The neighbour layer's shell: connects the sans-IO [`PeerManager`] to the session table
//! (link handshakes and sealed control messages) and to the node (the XDP peer map).
//!
//! Flow, all driven from the overlay's receive path and timer task:
//!
//! ```text
//! manager: StartLinkHandshake ─► table.connect_link(endpoint)      (signed handshake)
//! table:   Established{link}  ─► manager.on_link_authenticated     ─► PeerUp ─► XDP peer map
//! manager: SendHello/Ack/...  ─► table.send_link (sealed Control)  ─► neighbour
//! table:   Inbound::Control   ─► manager.handle_control            (RTT, liveness)
//! table:   Lost               ─► manager.on_link_lost              ─► PeerDown ─► map entry gone
//! table:   Established again  ─► manager (same key, still up)      ─► LinkRenewed ─► full routing dump
//! ```
//!
//! Only `PeerUp` puts an endpoint into the peer map, so no unauthenticated neighbour can
//! relay through this node, and every control message a neighbour sends is authenticated
//! by its link session.
//!
//! The routing core ([`Router`]) rides on the same links: a neighbour that comes up is a
//! routing neighbour, its measured RTT and loss set the link cost, routing payloads
//! travel as routing frames under the link session, and the routes it selects are
//! installed in the node's RIB and kernel route map (one in-place replace per change).
//!
//! Lock order: the session table's lock (held by the caller of [`Links::apply_actions`])
//! before the manager's, the manager's before the router's; nothing here takes the
//! table's lock itself.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use ring::rand::SecureRandom;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::os::seqno_store::SeqnoStore;
use crate::shell::node::{AgentStat, Node};
use myconet_core::{
    id::{LinkEndpoint, NodeKey},
    peers::{
        Action, LinkMessage, Origin, PeerConfig, PeerError, PeerManager, PeerSnapshot, PeerStats,
        wire::{frame_routing, routing_payload},
    },
    pins::{self, SharedPins},
    rib::{NextHop, Prefix},
    routing::{
        Admission, Explanation, RouteEvent, RouteSnapshot, Router, RoutingConfig, RoutingStats,
        TransmitTo,
    },
    session::{Event, SessionTable},
};

#[cfg(test)]
mod tests;

/// The routing core, the neighbours it may send to (those up), and the reservation of
/// its sequence numbers.
struct Routing {
    router: Router<LinkEndpoint>,
    up: BTreeSet<LinkEndpoint>,
    seqnos: SeqnoStore,
}

/// The node's neighbours: who they are, whether their link is authenticated, and what
/// their link measured (RTT, loss).
pub struct Links {
    manager: Mutex<PeerManager>,
    routing: Mutex<Routing>,
    /// Keys pinned per /64, shared by the routing core and the session table.
    pins: SharedPins,
    node: Arc<Node>,
    kick: Notify,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("peers", &self.manager().len())
            .finish_non_exhaustive()
    }
}

impl Links {
    /// The neighbour layer of `node` with its routing core; `seed` jitters hello and
    /// update timers (use fresh randomness); `seqnos` is where the routing core's
    /// sequence numbers start and are reserved; `pins` the keys pinned per /64.
    pub fn new(
        node: Arc<Node>,
        config: PeerConfig,
        routing: RoutingConfig,
        seqnos: SeqnoStore,
        pins: SharedPins,
        now: Instant,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let key = NodeKey::from_slice(node.identity().public_key())
            .ok_or(PeerError::InvalidConfig("identity key is not 32 bytes"))?;
        let mut router = Router::new(
            node.identity_arc(),
            routing,
            seed.rotate_left(17),
            seqnos.first(),
            now,
        )?;
        router.set_pins(pins.clone());
        Ok(Self {
            manager: Mutex::new(PeerManager::new(config, key, now, seed)?),
            pins,
            routing: Mutex::new(Routing {
                router,
                up: BTreeSet::new(),
                seqnos,
            }),
            node,
            kick: Notify::new(),
        })
    }

    fn manager(&self) -> MutexGuard<'_, PeerManager> {
        self.manager.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn routing(&self) -> MutexGuard<'_, Routing> {
        self.routing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The keys pinned per /64 (the session table checks them too).
    pub fn pins(&self) -> &SharedPins {
        &self.pins
    }

    /// Pins `key` for its /64 as the operator's choice; routes to that /64 under any
    /// other key go at once. Returns the /64.
    pub fn pin_key(&self, key: [u8; 32], now: Instant) -> std::net::Ipv6Addr {
        let prefix = pins::lock(&self.pins).set_operator(&key);
        let addr = std::net::Ipv6Addr::from(u128::from(prefix) << 64);
        self.routing().router.drop_routes(addr, Some(key), now);
        self.kick.notify_one();
        addr
    }

    /// Forgets the pin of the /64 of `addr`, and the routes to it, so the next key heard
    /// owning it is taken (and pinned). Returns whether there was a pin.
    pub fn forget_pin(&self, addr: std::net::Ipv6Addr, now: Instant) -> bool {
        let had = pins::lock(&self.pins).forget((u128::from(addr) >> 64) as u64);
        self.routing().router.drop_routes(addr, None, now);
        self.kick.notify_one();
        had
    }

    /// Every candidate route the routing core holds, for `ListRoutes`.
    pub fn route_snapshot(&self, now: Instant) -> Vec<RouteSnapshot<LinkEndpoint>> {
        self.routing().router.routes(now)
    }

    /// Which route carries `addr` and why, for `route get`.
    pub fn explain(&self, addr: std::net::Ipv6Addr, now: Instant) -> Explanation<LinkEndpoint> {
        self.routing().router.explain(addr, now)
    }

    /// The routing core's counters (messages, bytes, rejections by reason).
    pub fn routing_stats(&self) -> RoutingStats {
        self.routing().router.stats().clone()
    }

    /// The key the routing table holds for the /64 of `addr` (this node's own too):
    /// whose signature a too-big report from `addr` must carry (`pmtu`).
    pub fn origin_key(&self, addr: std::net::Ipv6Addr) -> Option<[u8; 32]> {
        self.routing().router.origin_of(addr)
    }

    /// The routing counters by stable name, for `GetStats`.
    pub fn routing_counters(&self) -> Vec<(&'static str, u64)> {
        self.routing().router.stats().counters()
    }

    /// Sets the configured base cost of the link to `endpoint` (Babel's per-interface
    /// cost; `None`: the default), so an operator can prefer or avoid a link whatever
    /// its measurements say. Kept while the neighbour goes down and up; a change of
    /// route it causes is applied by the timer task, woken here.
    pub fn set_link_cost(&self, endpoint: LinkEndpoint, base: Option<u16>) {
        {
            let mut routing = self.routing();
            let base = base.unwrap_or(routing.router.config().cost.default_base);
            routing.router.set_neighbour_cost(endpoint, base);
        }
        self.kick.notify_one();
    }

    /// The link cost the routing core applies to `endpoint` now (base cost and
    /// measurements), if it is an up neighbour.
    pub fn link_cost(&self, endpoint: LinkEndpoint) -> Option<u16> {
        self.routing().router.neighbour_cost(endpoint)
    }

    /// Adds a configured neighbour; it becomes a relay peer once its link handshake
    /// completes. `false` if it was already configured.
    pub fn add_static(&self, endpoint: LinkEndpoint) -> Result<bool, PeerError> {
        let added = self.manager().add_static(endpoint, Instant::now())?;
        // An inbound or discovered neighbour that is up becomes a configured one.
        self.routing()
            .router
            .set_neighbour_admission(endpoint, Admission::Configured);
        self.kick.notify_one();
        Ok(added)
    }

    /// Forgets a neighbour of any origin (its peer-map entry and link session go).
    pub fn remove(&self, endpoint: LinkEndpoint) -> bool {
        let removed = self.manager().remove(endpoint);
        self.kick.notify_one();
        removed
    }

    /// Accepts discovery beacons on `ifindex`.
    pub fn enable_discovery(&self, ifindex: u32) {
        self.manager().enable_discovery(ifindex);
    }

    /// Runs `f` on the manager and wakes the timer task for whatever it queued (beacon
    /// intake, for the discovery receiver).
    pub fn with_manager<R>(&self, f: impl FnOnce(&mut PeerManager) -> R) -> R {
        let r = f(&mut self.manager());
        self.kick.notify_one();
        r
    }

    /// Every neighbour's state, for `ListPeers`.
    pub fn snapshot(&self, now: Instant) -> Vec<PeerSnapshot> {
        self.manager().snapshot(now)
    }

    /// The manager's counters.
    pub fn stats(&self) -> PeerStats {
        self.manager().stats().clone()
    }

    /// Resolves when an operation queued actions that the timer task must apply.
    pub async fn kicked(&self) {
        self.kick.notified().await;
    }

    /// When hellos, retries, dead intervals or routing updates are next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let peers = self.manager().poll_timeout();
        let routing = self.routing().router.poll_timeout();
        peers.into_iter().chain(routing).min()
    }

    /// Runs due hellos, retries, dead-interval checks and routing timers.
    pub fn handle_timeout(&self, now: Instant) {
        self.manager().handle_timeout(now);
        self.routing().router.handle_timeout(now);
    }

    /// Feeds a session-table event about a link session to the manager; end-to-end
    /// events are ignored.
    pub fn on_session_event(&self, event: &Event, now: Instant) {
        match feed_manager(&mut self.manager(), event, now) {
            Ok(Some(Event::Established {
                link: Some(endpoint),
                remote_key,
                ..
            })) => debug!(%endpoint, node_key = %NodeKey(*remote_key), "link authenticated"),
            Ok(_) => {}
            Err((endpoint, e)) => {
                self.node.count(AgentStat::LinkRefused, 0);
                warn!(%endpoint, error = %e, "link refused");
            }
        }
    }

    /// A control message that opened under the link session with `endpoint`. Every
    /// such packet (an empty one included) proves the neighbour alive. Called without
    /// the session table's lock: a routing payload's signature checks must not stall
    /// the data path.
    pub fn on_control(&self, endpoint: LinkEndpoint, payload: &[u8], now: Instant) {
        let mut manager = self.manager();
        manager.on_any_packet_from(endpoint, now);
        if payload.is_empty() {
            return;
        }
        match routing_payload(payload) {
            Some(Ok(message)) => {
                drop(manager);
                // Rejections (unowned prefixes, bad signatures...) are counted inside.
                if let Err(e) = self.routing().router.handle_message(endpoint, message, now) {
                    debug!(%endpoint, error = %e, "routing message refused");
                }
                return;
            }
            Some(Err(e)) => {
                self.node.count(AgentStat::RxMalformed, payload.len());
                debug!(%endpoint, error = %e, "malformed routing frame");
                return;
            }
            None => {}
        }
        match LinkMessage::parse(payload) {
            Ok(message) => {
                if let Err(e) = manager.handle_control(endpoint, &message, now) {
                    debug!(%endpoint, error = %e, "control message ignored");
                }
                // A hello-ack is an RTT sample: let the routing core re-cost the link.
                if matches!(message, LinkMessage::HelloAck(_))
                    && let Some(peer) = manager.peer(endpoint, now)
                {
                    drop(manager);
                    self.routing()
                        .router
                        .neighbour_measurement(endpoint, peer.srtt, peer.loss, now);
                }
            }
            Err(e) => {
                self.node.count(AgentStat::RxMalformed, payload.len());
                debug!(%endpoint, error = %e, "malformed control message");
            }
        }
    }

    /// Carries out what the manager decided: link handshakes and control messages go to
    /// the session table, peer-map changes to the node. Returns how many actions ran, so
    /// the caller can loop until events and actions settle.
    pub fn apply_actions(
        &self,
        table: &mut SessionTable,
        now: Instant,
        rng: &dyn SecureRandom,
    ) -> usize {
        let mut applied = 0;
        while let Some(action) = self.manager().poll_action() {
            applied += 1;
            self.apply(action, table, now, rng);
        }
        applied + self.apply_routing(table, now, rng)
    }

    /// Sends what the routing core wants sent and installs what it selected.
    fn apply_routing(
        &self,
        table: &mut SessionTable,
        now: Instant,
        rng: &dyn SecureRandom,
    ) -> usize {
        let mut routing = self.routing();
        // A re-signed announcement is about to leave: its seqno must be reserved first.
        let seqno = routing.router.own_seqno();
        routing.seqnos.cover(seqno);
        let mut applied = 0;
        while let Some(t) = routing.router.poll_transmit() {
            applied += 1;
            let Some(frame) = frame_routing(&t.payload) else {
                continue;
            };
            let targets: Vec<LinkEndpoint> = match t.to {
                TransmitTo::Neighbour(n) => vec![n],
                TransmitTo::AllNeighbours => routing.up.iter().copied().collect(),
            };
            for n in targets {
                if let Err(e) = table.send_link(n, frame.clone(), now, rng) {
                    debug!(endpoint = %n, error = %e, "cannot send routing message");
                }
            }
        }
        while let Some(event) = routing.router.poll_event() {
            applied += 1;
            let result = match event {
                RouteEvent::Installed {
                    prefix,
                    plen,
                    next_hop,
                    ..
                }
                | RouteEvent::Changed {
                    prefix,
                    plen,
                    next_hop,
                    ..
                } => Prefix::new(prefix, plen)
                    .map_err(|e| anyhow::anyhow!("{e}"))
                    .and_then(|p| Ok(self.node.set_routed(p, next_hop_of(next_hop))?)),
                RouteEvent::Removed { prefix, plen, .. } => Prefix::new(prefix, plen)
                    .map_err(|e| anyhow::anyhow!("{e}"))
                    .and_then(|p| Ok(self.node.unset_routed(p)?)),
            };
            match result {
                Ok(()) => debug!(?event, "route change applied"),
                Err(e) => warn!(?event, error = %e, "route change not applied"),
            }
        }
        applied
    }

    /// Tells the routing core a neighbour is gone (once: PeerDown and CloseLink can both
    /// report the same loss).
    fn routing_neighbour_down(&self, endpoint: LinkEndpoint, now: Instant) {
        let mut routing = self.routing();
        if routing.up.remove(&endpoint) {
            routing.router.neighbour_down(endpoint, now);
        }
    }

    fn apply(
        &self,
        action: Action,
        table: &mut SessionTable,
        now: Instant,
        rng: &dyn SecureRandom,
    ) {
        let endpoint = action.endpoint();
        match action {
            Action::PeerUp {
                node_key, origin, ..
            } => {
                // The routing core may only route over a neighbour whose packets this
                // node will relay: one that is in the relay peer set (XDP map and the
                // userspace path's set alike).
                match self.node.add_peer(endpoint) {
                    Ok(()) => {
                        let mut routing = self.routing();
                        routing.up.insert(endpoint);
                        let admission = match origin {
                            Origin::Static => Admission::Configured,
                            Origin::Discovered | Origin::Inbound => Admission::SelfAdmitted,
                        };
                        routing
                            .router
                            .neighbour_up(endpoint, node_key.0, admission, now);
                        info!(%endpoint, %node_key, "neighbour up: may relay through this node")
                    }
                    Err(e) => {
                        self.node.count(AgentStat::PeerNotAdmitted, 0);
                        warn!(
                            %endpoint,
                            error = %e,
                            "neighbour authenticated but not admitted to the relay peer map: not routed over"
                        )
                    }
                }
            }
            Action::PeerDown { .. } => {
                self.routing_neighbour_down(endpoint, now);
                match self.node.remove_peer(endpoint) {
                    Ok(_) => info!(%endpoint, "neighbour down: removed from the relay peer map"),
                    Err(e) => {
                        warn!(%endpoint, error = %e, "cannot remove neighbour from the peer map")
                    }
                }
            }
            Action::CloseLink(_) => {
                self.routing_neighbour_down(endpoint, now);
                apply_to_table(&action, table, now, rng);
            }
            Action::LinkRenewed(_) => {
                let mut routing = self.routing();
                if routing.up.contains(&endpoint) {
                    routing.router.neighbour_renewed(endpoint, now);
                    debug!(%endpoint, "link renewed: the neighbour gets the routing table again");
                }
            }
            Action::StartLinkHandshake { .. }
            | Action::SendHello(..)
            | Action::SendHelloAck(..)
            | Action::SendKeepalive(_) => {
                apply_to_table(&action, table, now, rng);
            }
        }
    }
}

/// What a session-table event tells the neighbour manager: an authenticated link
/// handshake, or a link session lost. Returns the event if the manager took it (`None`
/// for events it has no business with) and the endpoint with the reason if the manager
/// refused an authenticated link. Shared by [`Links`] and the tests that drive a
/// manager and a table together.
pub(crate) fn feed_manager<'e>(
    manager: &mut PeerManager,
    event: &'e Event,
    now: Instant,
) -> Result<Option<&'e Event>, (LinkEndpoint, PeerError)> {
    match event {
        Event::Established {
            link: Some(endpoint),
            remote_key,
            ..
        } => {
            let key = NodeKey(*remote_key);
            manager
                .on_link_authenticated(*endpoint, key, now)
                .map_err(|e| (*endpoint, e))?;
            Ok(Some(event))
        }
        // Only the loss of the session in use is a lost link. A session replaced by a
        // newer handshake, an unconfirmed duplicate dropped, or a handshake that failed
        // while the link works (a rekey) are not: the manager's own dead interval and
        // retries cover a neighbour that really went away.
        Event::Lost {
            link: Some(endpoint),
            ..
        } => {
            manager.on_link_lost(*endpoint, now);
            Ok(Some(event))
        }
        Event::Established { link: None, .. }
        | Event::Lost { link: None, .. }
        | Event::Expired { .. }
        | Event::Failed { .. } => Ok(None),
    }
}

/// The session table's part of a manager action: link handshakes, sealed control
/// messages, closing a link. Actions that are not the table's (peer-map changes) are
/// left alone. Shared by [`Links`] and the tests that drive a manager and a table
/// together.
pub(crate) fn apply_to_table(
    action: &Action,
    table: &mut SessionTable,
    now: Instant,
    rng: &dyn SecureRandom,
) {
    let endpoint = action.endpoint();
    if let Some(message) = action.control_message() {
        if let Err(e) = table.send_link(endpoint, message.to_vec(), now, rng) {
            debug!(%endpoint, error = %e, "cannot send control message");
        }
        return;
    }
    match action {
        Action::StartLinkHandshake { expected_key, .. } => {
            let expected = expected_key.map(|k| k.0);
            if let Err(e) = table.connect_link(endpoint, expected, now, rng) {
                warn!(%endpoint, error = %e, "cannot start link handshake");
            }
        }
        Action::CloseLink(_) => table.close_link(endpoint),
        Action::PeerUp { .. }
        | Action::PeerDown { .. }
        | Action::LinkRenewed(_)
        | Action::SendHello(..)
        | Action::SendHelloAck(..)
        | Action::SendKeepalive(_) => {}
    }
}

/// Where traffic for a route through neighbour `n` goes: its underlay endpoint (with the
/// interface for link-local neighbours).
fn next_hop_of(n: LinkEndpoint) -> NextHop {
    NextHop {
        addr: n.addr(),
        port: n.port(),
        ifindex: n.scope_id(),
    }
}
