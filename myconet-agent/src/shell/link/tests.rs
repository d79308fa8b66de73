//! Deterministic tests of the neighbour layer as the agent runs it: each simulated node
//! has a real session table and a real peer manager, glued by the same functions
//! [`super::Links`] uses ([`feed_manager`], [`apply_to_table`]), and the nodes exchange
//! datagrams through an in-memory network under a simulated clock. Nothing sleeps;
//! time moves only from timer to timer.
//!
//! These are the double-handshake cases that used to cut a neighbour off for minutes: a
//! restarted node, a simultaneous open, a neighbour removed and added again, and a link
//! that went down while its session was still alive.

use std::{
    net::{Ipv6Addr, SocketAddr, SocketAddrV6},
    sync::Arc,
    time::{Duration, Instant},
};

use ring::{rand::SystemRandom, signature::Ed25519KeyPair};

use super::{apply_to_table, feed_manager};
use myconet_core::{
    id::{LinkEndpoint, NodeKey, Signer},
    peers::{Action, LinkMessage, PeerConfig, PeerManager, PeerState},
    session::{Config, Inbound, SessionTable, Transmit},
};

/// The agent's default neighbour timers (`config::peer_config` with no flag).
fn peer_config() -> PeerConfig {
    let hello = Duration::from_secs(1);
    PeerConfig {
        hello_interval: hello,
        hello_loss_timeout: hello,
        dead_interval: hello * 7 / 2,
        ..PeerConfig::default()
    }
}

struct SimNode {
    key: Arc<Ed25519KeyPair>,
    table: SessionTable,
    manager: PeerManager,
    underlay: SocketAddrV6,
    /// Every `PeerUp`, `PeerDown` and `LinkRenewed` with the time it was emitted.
    transitions: Vec<(Instant, Action)>,
    /// Datagrams this node put on the wire.
    sent: u64,
}

impl SimNode {
    fn endpoint(&self) -> LinkEndpoint {
        LinkEndpoint::from(self.underlay)
    }
}

struct Sim {
    nodes: Vec<SimNode>,
    now: Instant,
    rng: SystemRandom,
    /// While set, every datagram is lost (a cable pulled, a crashed node).
    cut: bool,
}

impl Sim {
    /// Nodes with fixed identities (seeds), nobody configured yet.
    fn new(seeds: &[u8]) -> Self {
        let now = Instant::now();
        let mut sim = Self {
            nodes: Vec::new(),
            now,
            rng: SystemRandom::new(),
            cut: false,
        };
        for (i, seed) in seeds.iter().enumerate() {
            let key = Arc::new(Ed25519KeyPair::from_seed_unchecked(&[*seed; 32]).unwrap());
            let underlay = SocketAddrV6::new(
                Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i as u16 + 1),
                9651,
                0,
                0,
            );
            let (table, manager) = Self::fresh_state(&key, underlay, now, u64::from(*seed));
            sim.nodes.push(SimNode {
                key,
                table,
                manager,
                underlay,
                transitions: Vec::new(),
                sent: 0,
            });
        }
        sim
    }

    fn fresh_state(
        key: &Arc<Ed25519KeyPair>,
        underlay: SocketAddrV6,
        now: Instant,
        seed: u64,
    ) -> (SessionTable, PeerManager) {
        let signer: Arc<dyn Signer> = key.clone();
        let mut table = SessionTable::new(signer, Config::default(), now).unwrap();
        // Link handshakes are bound to both ends' underlay endpoints.
        table.set_local_underlay(underlay.port(), [*underlay.ip()]);
        let node_key = NodeKey::from_slice(Signer::public_key(key.as_ref())).unwrap();
        let manager = PeerManager::new(peer_config(), node_key, now, seed).unwrap();
        (table, manager)
    }

    fn key(&self, i: usize) -> NodeKey {
        NodeKey::from_slice(Signer::public_key(self.nodes[i].key.as_ref())).unwrap()
    }

    /// Node `i` configures node `j` as a static peer.
    fn add(&mut self, i: usize, j: usize) {
        let ep = self.nodes[j].endpoint();
        let now = self.now;
        assert!(self.nodes[i].manager.add_static(ep, now).unwrap());
        self.settle(i);
    }

    /// Node `i` forgets node `j`.
    fn remove(&mut self, i: usize, j: usize) {
        let ep = self.nodes[j].endpoint();
        assert!(self.nodes[i].manager.remove(ep));
        self.settle(i);
    }

    /// Node `i` restarts with the same identity: every session and every neighbour
    /// forgotten, then it configures `peers` again.
    fn restart(&mut self, i: usize, peers: &[usize]) {
        let seed = u64::from(Signer::public_key(self.nodes[i].key.as_ref())[0]) + 1000;
        let (table, manager) =
            Self::fresh_state(&self.nodes[i].key, self.nodes[i].underlay, self.now, seed);
        self.nodes[i].table = table;
        self.nodes[i].manager = manager;
        for &j in peers {
            self.add(i, j);
        }
    }

    /// Passes node `i`'s session events to its manager and its actions to its table
    /// until both settle, as `Overlay::drain` does.
    fn settle(&mut self, i: usize) {
        let now = self.now;
        let node = &mut self.nodes[i];
        for _ in 0..64 {
            let mut moved = 0;
            while let Some(event) = node.table.poll_event() {
                moved += 1;
                let _ = feed_manager(&mut node.manager, &event, now);
            }
            while let Some(action) = node.manager.poll_action() {
                moved += 1;
                if matches!(
                    action,
                    Action::PeerUp { .. } | Action::PeerDown { .. } | Action::LinkRenewed(_)
                ) {
                    node.transitions.push((now, action.clone()));
                }
                apply_to_table(&action, &mut node.table, now, &self.rng);
            }
            if moved == 0 {
                return;
            }
        }
        panic!("node {i} did not settle");
    }

    /// Takes node `i`'s transmits off the wire (they are counted as sent).
    fn take(&mut self, i: usize) -> Vec<Transmit> {
        let out: Vec<Transmit> =
            std::iter::from_fn(|| self.nodes[i].table.poll_transmit()).collect();
        self.nodes[i].sent += out.len() as u64;
        out
    }

    /// Hands a datagram from node `from` to node `to`, as the agent's receive path does.
    fn deliver(&mut self, from: usize, to: usize, datagram: &[u8]) {
        let src = SocketAddr::V6(self.nodes[from].underlay);
        let now = self.now;
        let node = &mut self.nodes[to];
        if let Ok(Inbound::Control {
            endpoint, payload, ..
        }) = node.table.handle_datagram(src, datagram, now, &self.rng)
        {
            node.manager.on_any_packet_from(endpoint, now);
            if let Ok(message) = LinkMessage::parse(&payload)
                && !payload.is_empty()
            {
                let _ = node.manager.handle_control(endpoint, &message, now);
            }
        }
        self.settle(to);
    }

    /// Delivers everything in flight (or loses it while cut) until the network is quiet.
    fn pump(&mut self) {
        for _ in 0..1000 {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                for t in self.take(i) {
                    moved = true;
                    if self.cut {
                        continue;
                    }
                    let target = t.underlay.and_then(|u| {
                        self.nodes
                            .iter()
                            .position(|n| SocketAddr::V6(n.underlay) == u)
                    });
                    if let Some(j) = target {
                        self.deliver(i, j, &t.datagram);
                    }
                }
            }
            if !moved {
                return;
            }
        }
        panic!("network did not settle");
    }

    /// Runs every node's timers, in order, until `until`.
    fn run_until(&mut self, until: Instant) {
        self.pump();
        loop {
            let next = self
                .nodes
                .iter()
                .flat_map(|n| [n.table.poll_timeout(), n.manager.poll_timeout()])
                .flatten()
                .min();
            let at = match next {
                Some(t) if t <= until => t.max(self.now),
                _ => until,
            };
            self.now = at;
            for i in 0..self.nodes.len() {
                self.nodes[i].table.handle_timeout(at);
                self.nodes[i].manager.handle_timeout(at);
                self.settle(i);
            }
            self.pump();
            if at >= until {
                return;
            }
        }
    }

    fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    /// Whether node `i` has node `j` up.
    fn is_up(&self, i: usize, j: usize) -> bool {
        let ep = self.nodes[j].endpoint();
        self.nodes[i]
            .manager
            .peer(ep, self.now)
            .is_some_and(|p| p.state == PeerState::Up && p.node_key == Some(self.key(j)))
    }

    /// Runs until node `i` and node `j` both have each other up; returns how long that
    /// took, or panics with both sides' view after `limit`.
    fn until_linked(&mut self, i: usize, j: usize, limit: Duration) -> Duration {
        let start = self.now;
        while !(self.is_up(i, j) && self.is_up(j, i)) {
            assert!(
                self.now < start + limit,
                "link {i}–{j} not up {limit:?} after t+{:?}: {i} sees {:?}, {j} sees {:?}",
                start - self.t0(),
                self.nodes[i]
                    .manager
                    .peer(self.nodes[j].endpoint(), self.now),
                self.nodes[j]
                    .manager
                    .peer(self.nodes[i].endpoint(), self.now),
            );
            self.run_for(Duration::from_millis(50));
        }
        self.now - start
    }

    /// Runs for `d`, requiring the link between `i` and `j` up on both sides at every
    /// step and no `PeerDown` for it on either side.
    fn stays_linked(&mut self, i: usize, j: usize, d: Duration) {
        let start = self.now;
        let downs = |sim: &Sim| (sim.downs(i, j), sim.downs(j, i));
        let before = downs(self);
        while self.now < start + d {
            self.run_for(Duration::from_millis(250));
            assert!(
                self.is_up(i, j) && self.is_up(j, i) && downs(self) == before,
                "link {i}–{j} went down {:?} into the window (t+{:?}): {i} sees {:?}, {j} sees {:?}",
                self.now - start,
                self.now - self.t0(),
                self.nodes[i]
                    .manager
                    .peer(self.nodes[j].endpoint(), self.now),
                self.nodes[j]
                    .manager
                    .peer(self.nodes[i].endpoint(), self.now),
            );
        }
    }

    /// `PeerDown`s node `i` emitted for node `j`.
    fn downs(&self, i: usize, j: usize) -> usize {
        let ep = self.nodes[j].endpoint();
        self.nodes[i]
            .transitions
            .iter()
            .filter(|(_, a)| *a == Action::PeerDown { endpoint: ep })
            .count()
    }

    fn t0(&self) -> Instant {
        self.nodes
            .iter()
            .flat_map(|n| n.transitions.first().map(|(t, _)| *t))
            .min()
            .unwrap_or(self.now)
    }
}

/// Long enough for every session-table timer that once took a link down (the 15 s grace
/// of a replaced session, the 15 s wait for an unconfirmed one) and the handshake
/// retransmissions (31 s) to have run out, with margin.
const STAYS_UP: Duration = Duration::from_secs(60);
/// "A few hello intervals" at the default 1 s hello.
const FEW_HELLOS: Duration = Duration::from_secs(4);

/// Two nodes that configure each other, linked.
fn linked_pair() -> Sim {
    let mut sim = Sim::new(&[1, 2]);
    sim.add(0, 1);
    sim.add(1, 0);
    sim.until_linked(0, 1, FEW_HELLOS);
    sim.run_for(Duration::from_secs(5));
    sim
}

#[test]
fn a_quickly_restarted_neighbour_is_never_taken_down() {
    let mut sim = linked_pair();
    // The restarted node dials at once; its neighbour never notices an outage.
    sim.restart(1, &[0]);
    let took = sim.until_linked(0, 1, FEW_HELLOS);
    assert!(took < Duration::from_secs(1), "relinked after {took:?}");
    sim.stays_linked(0, 1, STAYS_UP);
    assert_eq!(sim.downs(0, 1), 0, "node 0 never took its neighbour down");
    // ...but it learned that the link was renewed, so it resends its routing table
    // to the neighbour that lost it.
    let renewed = Action::LinkRenewed(sim.nodes[1].endpoint());
    assert!(sim.nodes[0].transitions.iter().any(|(_, a)| *a == renewed));
}

#[test]
fn a_neighbour_restarted_after_the_dead_interval_relinks_at_once() {
    let mut sim = linked_pair();
    sim.cut = true;
    sim.run_for(Duration::from_secs(10));
    assert!(!sim.is_up(0, 1), "the silent neighbour went down");
    sim.cut = false;
    sim.restart(1, &[0]);
    sim.until_linked(0, 1, FEW_HELLOS);
    sim.stays_linked(0, 1, STAYS_UP);
}

#[test]
fn a_restarted_neighbour_that_does_not_dial_is_redialled_within_a_few_hellos() {
    // Only node 0 configures the link; node 1 accepts it as inbound. After node 1
    // restarts, only node 0 can bring the link back, by noticing the silence and dialling.
    let mut sim = Sim::new(&[1, 2]);
    sim.add(0, 1);
    sim.until_linked(0, 1, FEW_HELLOS);
    sim.run_for(Duration::from_secs(5));
    sim.restart(1, &[]);
    let dead = peer_config().dead_interval;
    sim.until_linked(0, 1, dead + FEW_HELLOS);
    sim.stays_linked(0, 1, STAYS_UP);
}

#[test]
fn a_link_that_went_down_with_its_session_alive_comes_back_when_the_path_does() {
    let mut sim = linked_pair();
    // A cut longer than the dead interval: both sides go down while their link sessions
    // (idle timeout 180 s) live on in the tables.
    sim.cut = true;
    let cut_at = sim.now;
    while sim.is_up(0, 1) || sim.is_up(1, 0) {
        assert!(
            sim.now < cut_at + Duration::from_secs(10),
            "the cut is noticed"
        );
        sim.run_for(Duration::from_millis(50));
    }
    let quiet = (sim.nodes[0].sent, sim.nodes[1].sent);
    sim.run_for(Duration::from_secs(5));
    assert!(
        sim.nodes[0].sent + sim.nodes[1].sent > quiet.0 + quiet.1,
        "a down neighbour is being redialled: packets leave"
    );
    sim.cut = false;
    sim.until_linked(0, 1, FEW_HELLOS + Duration::from_secs(4));
    sim.stays_linked(0, 1, STAYS_UP);
}

#[test]
fn a_simultaneous_open_with_a_late_init_keeps_the_link_up() {
    for seeds in [[1u8, 2], [2, 1]] {
        let mut sim = Sim::new(&seeds);
        sim.add(0, 1);
        sim.add(1, 0);
        let (init0, init1) = (sim.take(0), sim.take(1));
        assert_eq!((init0.len(), init1.len()), (1, 1), "both sides dial");
        // The smaller key's handshake wins: the larger side abandons its own initiation
        // and answers. Its init arrives at the winner only after the winner's handshake
        // completed, so the winner answers it too, with a session nobody will confirm.
        let small = if sim.key(0) < sim.key(1) { 0 } else { 1 };
        let large = 1 - small;
        let (from_small, from_large) = if small == 0 {
            (init0, init1)
        } else {
            (init1, init0)
        };
        sim.deliver(small, large, &from_small[0].datagram);
        sim.pump();
        assert!(sim.is_up(small, large) && sim.is_up(large, small));
        sim.deliver(large, small, &from_large[0].datagram);
        sim.stays_linked(0, 1, STAYS_UP);
    }
}

#[test]
fn removing_and_re_adding_a_neighbour_keeps_the_other_side_up() {
    let mut sim = linked_pair();
    sim.remove(0, 1);
    sim.add(0, 1);
    sim.until_linked(0, 1, FEW_HELLOS);
    sim.stays_linked(0, 1, STAYS_UP);
    assert_eq!(
        sim.downs(1, 0),
        0,
        "the other side never took the link down"
    );
}

#[test]
fn a_link_stays_up_across_session_lifetimes() {
    // Link sessions are replaced before their 600 s hard lifetime; each replacement
    // retires the old session 15 s later, which must not look like a lost link.
    let mut sim = linked_pair();
    sim.stays_linked(0, 1, Duration::from_secs(1300));
}

// ---- The session-table contract the neighbour layer relies on ----

/// Node `i`'s session events so far.
fn events(sim: &mut Sim, i: usize) -> Vec<myconet_core::session::Event> {
    std::iter::from_fn(|| sim.nodes[i].table.poll_event()).collect()
}

/// Two tables only (no managers) with a link session between them, node 0 initiating.
fn linked_tables() -> Sim {
    let mut sim = Sim::new(&[1, 2]);
    let (ep1, now) = (sim.nodes[1].endpoint(), sim.now);
    sim.nodes[0]
        .table
        .connect_link(ep1, None, now, &sim.rng)
        .unwrap();
    pump_tables(&mut sim);
    assert!(sim.nodes[0].table.link_session(ep1).is_some());
    sim
}

/// Delivers table traffic without running the managers.
fn pump_tables(sim: &mut Sim) {
    for _ in 0..100 {
        let mut moved = false;
        for i in 0..2 {
            for t in std::iter::from_fn(|| sim.nodes[i].table.poll_transmit()).collect::<Vec<_>>() {
                moved = true;
                let src = SocketAddr::V6(sim.nodes[i].underlay);
                let _ = sim.nodes[1 - i]
                    .table
                    .handle_datagram(src, &t.datagram, sim.now, &sim.rng);
            }
        }
        if !moved {
            return;
        }
    }
}

#[test]
fn a_replaced_link_session_expires_without_being_lost() {
    use myconet_core::session::{Event, ExpiryReason};
    let mut sim = linked_tables();
    let (ep0, ep1) = (sim.nodes[0].endpoint(), sim.nodes[1].endpoint());
    events(&mut sim, 0);
    events(&mut sim, 1);
    // Node 1 restarts its side of the link: a second handshake replaces the session on
    // both ends.
    let now = sim.now;
    sim.nodes[1]
        .table
        .connect_link(ep0, None, now, &sim.rng)
        .unwrap();
    pump_tables(&mut sim);
    sim.now += Duration::from_secs(20);
    let now = sim.now;
    for i in 0..2 {
        sim.nodes[i].table.handle_timeout(now);
        let evs = events(&mut sim, i);
        assert!(
            evs.iter().any(|e| matches!(
                e,
                Event::Expired {
                    reason: ExpiryReason::Replaced,
                    ..
                }
            )),
            "node {i}: the old session is retired: {evs:?}"
        );
        assert!(
            !evs.iter().any(|e| matches!(e, Event::Lost { .. })),
            "node {i}: a replaced session is no lost link: {evs:?}"
        );
    }
    assert!(sim.nodes[0].table.link_session(ep1).is_some());
    assert!(sim.nodes[1].table.link_session(ep0).is_some());
}

#[test]
fn an_idle_link_session_is_lost_and_so_is_a_closed_one() {
    use myconet_core::session::{Event, ExpiryReason};
    let mut sim = linked_tables();
    let (ep0, ep1) = (sim.nodes[0].endpoint(), sim.nodes[1].endpoint());
    events(&mut sim, 0);
    sim.now += Duration::from_secs(200);
    let now = sim.now;
    sim.nodes[0].table.handle_timeout(now);
    let evs = events(&mut sim, 0);
    assert!(
        evs.iter().any(|e| matches!(
            e,
            Event::Lost {
                reason: ExpiryReason::Idle,
                link: Some(ep),
                ..
            } if *ep == ep1
        )),
        "{evs:?}"
    );
    sim.nodes[1].table.close_link(ep0);
    let evs = events(&mut sim, 1);
    assert!(
        evs.iter().any(|e| matches!(
            e,
            Event::Lost {
                reason: ExpiryReason::Closed,
                link: Some(ep),
                ..
            } if *ep == ep0
        )),
        "{evs:?}"
    );
}

#[test]
fn connect_link_handshakes_even_while_a_session_is_up_but_never_twice_at_once() {
    let mut sim = linked_tables();
    let ep1 = sim.nodes[1].endpoint();
    let now = sim.now;
    for _ in 0..3 {
        sim.nodes[0]
            .table
            .connect_link(ep1, None, now, &sim.rng)
            .unwrap();
    }
    let sent: Vec<Transmit> = std::iter::from_fn(|| sim.nodes[0].table.poll_transmit()).collect();
    assert_eq!(sent.len(), 1, "one init while one is under way: {sent:?}");
    assert_eq!(
        myconet_common::wire::Repr::parse(
            &myconet_common::wire::Packet::new_checked(&sent[0].datagram[..]).unwrap()
        )
        .unwrap()
        .packet_type,
        myconet_common::wire::PacketType::HandshakeInit
    );
    // The old session still sends until the new one replaces it.
    assert!(sim.nodes[0].table.link_session(ep1).is_some());
}
