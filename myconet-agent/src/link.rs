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
//! table:   Expired/Failed     ─► manager.on_link_lost / retry      ─► PeerDown ─► map entry gone
//! ```
//!
//! Only `PeerUp` puts an endpoint into the peer map, so no unauthenticated neighbour can
//! relay through this node, and every control message a neighbour sends is authenticated
//! by its link session.
//!
//! Lock order: the session table's lock (held by the caller of [`Links::apply_actions`])
//! before the manager's; nothing here takes the table's lock itself.

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use ring::rand::SecureRandom;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::{
    node::{AgentStat, Node},
    peers::{
        Action, ControlMessage, LinkEndpoint, NodeKey, PeerConfig, PeerError, PeerManager,
        PeerSnapshot, PeerStats,
    },
    session::{Event, FailReason, SessionTable},
};

/// The node's neighbours: who they are, whether their link is authenticated, and what
/// their link measured (RTT, loss).
pub struct Links {
    manager: Mutex<PeerManager>,
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
    /// The neighbour layer of `node`; `seed` jitters hello timers (use fresh randomness).
    pub fn new(
        node: Arc<Node>,
        config: PeerConfig,
        now: Instant,
        seed: u64,
    ) -> Result<Self, PeerError> {
        let key = NodeKey::from_slice(node.identity().public_key())
            .ok_or(PeerError::InvalidConfig("identity key is not 32 bytes"))?;
        Ok(Self {
            manager: Mutex::new(PeerManager::new(config, key, now, seed)?),
            node,
            kick: Notify::new(),
        })
    }

    fn manager(&self) -> MutexGuard<'_, PeerManager> {
        self.manager.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a configured neighbour; it becomes a relay peer once its link handshake
    /// completes. `false` if it was already configured.
    pub fn add_static(&self, endpoint: LinkEndpoint) -> Result<bool, PeerError> {
        let added = self.manager().add_static(endpoint, Instant::now())?;
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

    /// When hellos, retries or dead intervals are next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.manager().poll_timeout()
    }

    /// Runs due hellos, retries and dead-interval checks.
    pub fn handle_timeout(&self, now: Instant) {
        self.manager().handle_timeout(now);
    }

    /// Feeds a session-table event about a link session to the manager; end-to-end
    /// events are ignored.
    pub fn on_session_event(&self, event: &Event, now: Instant) {
        match event {
            Event::Established {
                link: Some(endpoint),
                remote_key,
                ..
            } => {
                let key = NodeKey(*remote_key);
                match self.manager().on_link_authenticated(*endpoint, key, now) {
                    Ok(()) => debug!(%endpoint, node_key = %key, "link authenticated"),
                    Err(e) => {
                        self.node.count(AgentStat::LinkRefused, 0);
                        warn!(%endpoint, error = %e, "link refused");
                    }
                }
            }
            Event::Expired {
                link: Some(endpoint),
                ..
            }
            | Event::Failed {
                link: Some(endpoint),
                reason: FailReason::Timeout | FailReason::Handshake(_),
                ..
            } => self.manager().on_link_lost(*endpoint, now),
            _ => {}
        }
    }

    /// A control message that opened under the link session with `endpoint`. Every
    /// such packet (an empty one included) proves the neighbour alive.
    pub fn on_control(&self, endpoint: LinkEndpoint, payload: &[u8], now: Instant) {
        let mut manager = self.manager();
        manager.on_any_packet_from(endpoint, now);
        if payload.is_empty() {
            return;
        }
        match ControlMessage::parse(payload) {
            Ok(message) => {
                if let Err(e) = manager.handle_control(endpoint, &message, now) {
                    debug!(%endpoint, error = %e, "control message ignored");
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
        loop {
            let Some(action) = self.manager().poll_action() else {
                return applied;
            };
            applied += 1;
            self.apply(action, table, now, rng);
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
            Action::PeerUp { node_key, .. } => {
                let (addr, port) = endpoint.underlay();
                match self.node.add_peer(addr, port) {
                    Ok(()) => {
                        info!(%endpoint, %node_key, "neighbour up: may relay through this node")
                    }
                    // Link-local neighbours stay control-plane only until the peer map
                    // carries an interface scope.
                    Err(e) => {
                        warn!(%endpoint, error = %e, "neighbour up, not in the relay peer map")
                    }
                }
            }
            Action::PeerDown { .. } => {
                let (addr, port) = endpoint.underlay();
                match self.node.remove_peer(addr, port) {
                    Ok(_) => info!(%endpoint, "neighbour down: removed from the relay peer map"),
                    Err(e) => {
                        warn!(%endpoint, error = %e, "cannot remove neighbour from the peer map")
                    }
                }
            }
            Action::CloseLink(_) => table.close_link(endpoint),
            Action::SendHello(..) | Action::SendHelloAck(..) | Action::SendKeepalive(_) => {}
        }
    }
}
