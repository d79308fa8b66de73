//! Deterministic tests of the peer manager with a simulated clock: every `Instant` is
//! `t0 + offset`, nothing sleeps, and the jitter seed is fixed.

use std::{
    net::{Ipv6Addr, SocketAddrV6},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use ring::{rand::SystemRandom, signature::Ed25519KeyPair};

use crate::id::{EndpointError, LinkEndpoint, NodeKey};

use super::{
    manager::{
        Action, BeaconOutcome, BeaconReject, Origin, PeerConfig, PeerError, PeerManager, PeerState,
    },
    wire::{Beacon, Hello, HelloAck, LinkMessage},
};

const SEED: u64 = 7;
const IFACE: u32 = 3;
const DATA_PORT: u16 = 9651;

fn key_pair() -> Ed25519KeyPair {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
}

fn key_of(kp: &Ed25519KeyPair) -> NodeKey {
    use ring::signature::KeyPair;
    NodeKey::from_slice(kp.public_key().as_ref()).unwrap()
}

fn manager(t0: Instant) -> PeerManager {
    manager_with(PeerConfig::default(), t0)
}

fn manager_with(config: PeerConfig, t0: Instant) -> PeerManager {
    PeerManager::new(config, NodeKey([0xaa; 32]), t0, SEED).unwrap()
}

fn ep(last: u16) -> LinkEndpoint {
    LinkEndpoint::new(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, last), DATA_PORT, 0)
}

fn drain(m: &mut PeerManager) -> Vec<Action> {
    std::iter::from_fn(|| m.poll_action()).collect()
}

/// Advances the simulated clock through every timer up to `until`, returning all actions.
fn run_until(m: &mut PeerManager, until: Instant) -> Vec<Action> {
    let mut out = Vec::new();
    while let Some(t) = m.poll_timeout() {
        if t > until {
            break;
        }
        m.handle_timeout(t);
        out.extend(drain(m));
    }
    m.handle_timeout(until);
    out.extend(drain(m));
    out
}

/// A static peer brought Up; returns its endpoint and key.
fn up_peer(m: &mut PeerManager, t: Instant) -> (LinkEndpoint, NodeKey) {
    let e = ep(2);
    let k = NodeKey([0x11; 32]);
    assert!(m.add_static(e, t).unwrap());
    m.on_link_authenticated(e, k, t).unwrap();
    drain(m);
    (e, k)
}

/// The acks a well-behaved neighbour sends for every hello in `actions`.
fn acks_for(actions: &[Action]) -> Vec<(LinkEndpoint, HelloAck)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendHello(e, h) => Some((
                *e,
                HelloAck {
                    sequence: h.sequence,
                    echoed_timestamp_us: h.timestamp_us,
                    ack_delay_us: 0,
                },
            )),
            _ => None,
        })
        .collect()
}

fn wall(t_us: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(t_us)
}

const WALL_US: u64 = 1_800_000_000_000_000;

fn beacon_bytes(kp: &Ed25519KeyPair, port: u16, ts: u64) -> Vec<u8> {
    let b = Beacon::for_key(kp, port, ts).unwrap();
    LinkMessage::Beacon(b.sign(kp)).to_vec()
}

fn ll(last: u16) -> SocketAddrV6 {
    SocketAddrV6::new(
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, last),
        DATA_PORT + 1,
        0,
        IFACE,
    )
}

#[test]
fn peers_static_peer_connects_then_goes_up_only_after_authentication() {
    let t0 = Instant::now();
    let mut m = manager(t0);
    let e = ep(2);
    assert!(m.add_static(e, t0).unwrap());
    assert!(!m.add_static(e, t0).unwrap(), "second add is a no-op");
    assert_eq!(
        drain(&mut m),
        vec![Action::StartLinkHandshake {
            endpoint: e,
            expected_key: None
        }]
    );
    let snap = m.peer(e, t0).unwrap();
    assert_eq!(snap.state, PeerState::Connecting);
    assert_eq!(snap.state_name(), "connecting");
    assert!(snap.is_static());

    // Hellos and keepalives from a peer that is not authenticated change nothing.
    let hello = Hello {
        node_key: NodeKey([1; 32]),
        sequence: 0,
        timestamp_us: 0,
        observed_addr: Ipv6Addr::LOCALHOST,
        observed_port: 1,
    };
    assert_eq!(m.on_hello(e, &hello, t0), Err(PeerError::NotUp(e)));
    assert!(!m.on_any_packet_from(e, t0));
    assert!(drain(&mut m).is_empty());

    // Retries back off: after ~2 s, ~4 s, ~8 s (±20%), the next only after 24 s.
    let acts = run_until(&mut m, t0 + Duration::from_secs(20));
    let starts = acts
        .iter()
        .filter(|a| matches!(a, Action::StartLinkHandshake { .. }))
        .count();
    assert_eq!(starts, 3, "{acts:?}");
    assert!(!acts.iter().any(|a| matches!(a, Action::PeerUp { .. })));

    let t1 = t0 + Duration::from_secs(20);
    let k = NodeKey([0x11; 32]);
    m.on_link_authenticated(e, k, t1).unwrap();
    assert_eq!(
        drain(&mut m),
        vec![
            Action::PeerUp {
                endpoint: e,
                node_key: k,
                origin: Origin::Static,
            },
            Action::SendKeepalive(e)
        ]
    );
    let snap = m.peer(e, t1).unwrap();
    assert_eq!(snap.state_name(), "up");
    assert_eq!(snap.node_key_hex(), Some("11".repeat(32)));
    assert_eq!(m.stats().peer_ups, 1);
    // A repeated authentication (rekey, or the neighbour restarted) is not a second
    // PeerUp, but the shell hears of it to resend what the neighbour may have lost.
    m.on_link_authenticated(e, k, t1).unwrap();
    assert_eq!(drain(&mut m), vec![Action::LinkRenewed(e)]);
    assert_eq!(m.stats().peer_ups, 1);
}

#[test]
fn peers_rtt_estimate_converges_with_controlled_clock() {
    let t0 = Instant::now();
    let mut m = manager(t0);
    let (e, _) = up_peer(&mut m, t0);
    let rtt = Duration::from_millis(40);
    let mut t = t0;
    for _ in 0..40 {
        let next = m.poll_timeout().unwrap();
        t = next;
        m.handle_timeout(t);
        let acts = drain(&mut m);
        for (e2, ack) in acks_for(&acts) {
            assert_eq!(e2, e);
            m.on_hello_ack(e, &ack, t + rtt).unwrap();
        }
    }
    let snap = m.peer(e, t + rtt).unwrap();
    assert_eq!(snap.srtt, Some(rtt));
    assert!(snap.rttvar.unwrap() < Duration::from_millis(1), "{snap:?}");
    assert_eq!(snap.loss, Some(0.0));
    assert_eq!(snap.state, PeerState::Up);
    assert_eq!(m.stats().acks_received, 40);

    // Now the link slows to 100 ms: srtt moves towards it (1/8 per sample).
    for _ in 0..40 {
        t = m.poll_timeout().unwrap();
        m.handle_timeout(t);
        let acts = drain(&mut m);
        for (_, ack) in acks_for(&acts) {
            m.on_hello_ack(e, &ack, t + Duration::from_millis(100))
                .unwrap();
        }
    }
    let srtt = m.peer(e, t).unwrap().srtt.unwrap();
    assert!(
        srtt > Duration::from_millis(99) && srtt <= Duration::from_millis(100),
        "{srtt:?}"
    );

    // The acker's reported delay is taken out of the sample.
    t = m.poll_timeout().unwrap();
    m.handle_timeout(t);
    let acts = drain(&mut m);
    let (_, mut ack) = acks_for(&acts)[0];
    ack.ack_delay_us = 60_000;
    m.on_hello_ack(e, &ack, t + Duration::from_millis(160))
        .unwrap();
    // Counted as a 100 ms sample (srtt barely moves), not 160 ms (+7.5 ms).
    let srtt2 = m.peer(e, t).unwrap().srtt.unwrap();
    assert!(
        srtt2 < srtt + Duration::from_millis(1),
        "{srtt2:?} vs {srtt:?}"
    );

    // Duplicate and forged acks give no sample.
    assert!(matches!(
        m.on_hello_ack(e, &ack, t + Duration::from_millis(170)),
        Err(PeerError::UnmatchedAck { .. })
    ));
    let forged = HelloAck {
        sequence: 9999,
        echoed_timestamp_us: 1,
        ack_delay_us: 0,
    };
    assert!(m.on_hello_ack(e, &forged, t).is_err());
    assert_eq!(m.stats().acks_unmatched, 2);
}

#[test]
fn peers_loss_estimate_over_recent_hellos() {
    let t0 = Instant::now();
    let config = PeerConfig {
        // Long dead interval and no probing, so unanswered hellos do not take the link
        // down.
        dead_interval: Duration::from_secs(3600),
        probe_count: 0,
        loss_window: 10,
        ..PeerConfig::default()
    };
    let mut m = manager_with(config, t0);
    let (e, _) = up_peer(&mut m, t0);
    let mut t = t0;
    // 20 hellos, every fourth unanswered; the window covers the last 10.
    let mut n = 0;
    while n < 20 {
        t = m.poll_timeout().unwrap();
        m.handle_timeout(t);
        for (_, ack) in acks_for(&drain(&mut m)) {
            if n % 4 != 3 {
                m.on_hello_ack(e, &ack, t + Duration::from_millis(10))
                    .unwrap();
            }
            n += 1;
        }
    }
    // Long after the last hello, every unanswered one in the window is decided.
    let later = t + Duration::from_secs(10);
    let loss = m.peer(e, later).unwrap().loss.unwrap();
    // Hellos 10..20: numbers 11, 15, 19 unanswered.
    assert!((loss - 0.3).abs() < 1e-9, "{loss}");
    // Right after sending, a not-yet-answered hello is not counted as lost.
    let fresh = m.peer(e, t).unwrap().loss.unwrap();
    assert!(fresh < loss, "{fresh} vs {loss}");
}

#[test]
fn peers_dead_interval_takes_peer_down_and_recovery_brings_it_up() {
    let t0 = Instant::now();
    // The dead interval alone (probing has its own tests below).
    let mut m = manager_with(
        PeerConfig {
            probe_count: 0,
            ..PeerConfig::default()
        },
        t0,
    );
    let (e, k) = up_peer(&mut m, t0);
    let dead = m.config().dead_interval;

    // The peer answers for a while: stays Up.
    let mut t = t0;
    while t < t0 + Duration::from_secs(20) {
        t = m.poll_timeout().unwrap();
        m.handle_timeout(t);
        for (_, ack) in acks_for(&drain(&mut m)) {
            m.on_hello_ack(e, &ack, t + Duration::from_millis(5))
                .unwrap();
        }
    }
    assert_eq!(m.peer(e, t).unwrap().state, PeerState::Up);
    let last_ack = t + Duration::from_millis(5);

    // Then silence: hellos go out but nothing comes back.
    let acts = run_until(&mut m, last_ack + dead + Duration::from_millis(1));
    let down_at = acts
        .iter()
        .position(|a| *a == Action::PeerDown { endpoint: e })
        .expect("PeerDown after the dead interval");
    assert!(
        acts[..down_at]
            .iter()
            .all(|a| matches!(a, Action::SendHello(..)))
    );
    // Retrying starts right away.
    assert_eq!(
        acts[down_at + 1],
        Action::StartLinkHandshake {
            endpoint: e,
            expected_key: None
        }
    );
    let snap = m.peer(e, last_ack + dead).unwrap();
    assert_eq!(snap.state_name(), "down");
    assert_eq!(m.stats().peer_downs, 1);
    // Not down a moment before the dead interval: the last sighting is what counts.
    assert!(snap.last_seen_age.unwrap() >= dead);

    // Still down and retrying with backoff a minute later, no duplicate PeerDown.
    let t2 = last_ack + dead + Duration::from_secs(60);
    let acts = run_until(&mut m, t2);
    assert!(!acts.iter().any(|a| matches!(a, Action::PeerDown { .. })));
    let retries = acts
        .iter()
        .filter(|a| matches!(a, Action::StartLinkHandshake { .. }))
        .count();
    assert!((3..=6).contains(&retries), "{retries} retries in a minute");

    // A new link handshake succeeds: Up again, PeerUp again.
    m.on_link_authenticated(e, k, t2).unwrap();
    assert_eq!(
        drain(&mut m),
        vec![
            Action::PeerUp {
                endpoint: e,
                node_key: k,
                origin: Origin::Static,
            },
            Action::SendKeepalive(e)
        ]
    );
    assert_eq!(m.peer(e, t2).unwrap().connect_attempts, 0);
}

#[test]
fn peers_link_lost_and_hellos_keep_or_end_liveness() {
    let t0 = Instant::now();
    let mut m = manager(t0);
    let (e, k) = up_peer(&mut m, t0);
    let dead = m.config().dead_interval;

    // The neighbour's own hellos keep it alive even if our acks are never answered.
    let mut t = t0;
    for i in 0..20u32 {
        t = t0 + Duration::from_secs(u64::from(i) * 2);
        let hello = Hello {
            node_key: k,
            sequence: i,
            timestamp_us: u64::from(i),
            observed_addr: "fd00::1".parse().unwrap(),
            observed_port: DATA_PORT,
        };
        m.on_hello(e, &hello, t).unwrap();
        m.handle_timeout(t);
    }
    let acts = drain(&mut m);
    assert!(!acts.iter().any(|a| matches!(a, Action::PeerDown { .. })));
    assert!(acts.contains(&Action::SendHelloAck(
        e,
        HelloAck {
            sequence: 19,
            echoed_timestamp_us: 19,
            ack_delay_us: 0
        }
    )));
    let snap = m.peer(e, t).unwrap();
    assert_eq!(
        snap.observed_by_peer,
        Some(("fd00::1".parse().unwrap(), DATA_PORT))
    );

    // A hello claiming another key is ignored (and does not refresh liveness).
    let liar = Hello {
        node_key: NodeKey([0x22; 32]),
        sequence: 0,
        timestamp_us: 0,
        observed_addr: Ipv6Addr::LOCALHOST,
        observed_port: 1,
    };
    assert!(matches!(
        m.on_hello(e, &liar, t + dead / 4),
        Err(PeerError::KeyMismatch { .. })
    ));
    // Authenticated keepalives keep it alive through handle_control too.
    m.handle_control(e, &LinkMessage::Keepalive, t + dead / 2)
        .unwrap();
    m.handle_timeout(t + dead);
    assert!(
        !drain(&mut m)
            .iter()
            .any(|a| matches!(a, Action::PeerDown { .. }))
    );

    // The session layer reports the link session gone: down at once.
    m.on_link_lost(e, t + dead);
    let acts = drain(&mut m);
    assert_eq!(acts[0], Action::PeerDown { endpoint: e });
    assert!(matches!(acts[1], Action::StartLinkHandshake { .. }));
    assert!(matches!(
        m.handle_control(e, &LinkMessage::Keepalive, t + dead),
        Err(PeerError::NotUp(_))
    ));
}

#[test]
fn peers_static_removal_emits_peer_down() {
    let t0 = Instant::now();
    let mut m = manager(t0);
    let (e, _) = up_peer(&mut m, t0);
    assert!(m.remove(e));
    assert_eq!(
        drain(&mut m),
        vec![Action::PeerDown { endpoint: e }, Action::CloseLink(e)]
    );
    assert!(!m.remove(e));
    assert!(m.is_empty());
    assert_eq!(m.poll_timeout(), None);

    // Removing a peer that never came up closes its link attempts but emits no PeerDown.
    let e3 = ep(3);
    m.add_static(e3, t0).unwrap();
    drain(&mut m);
    assert!(m.remove(e3));
    assert_eq!(drain(&mut m), vec![Action::CloseLink(e3)]);
}

#[test]
fn peers_invalid_static_endpoints_are_refused() {
    let t0 = Instant::now();
    let mut m = manager(t0);
    let cases = [
        (
            LinkEndpoint::new(Ipv6Addr::UNSPECIFIED, 1, 0),
            "unspecified",
        ),
        (
            LinkEndpoint::new("ff02::1".parse().unwrap(), 1, 0),
            "multicast",
        ),
        (
            LinkEndpoint::new("::ffff:1.2.3.4".parse().unwrap(), 1, 0),
            "v4",
        ),
        (
            LinkEndpoint::new("fd6d:1::1".parse().unwrap(), 1, 0),
            "overlay",
        ),
        (
            LinkEndpoint::new("fd00::1".parse().unwrap(), 0, 0),
            "port 0",
        ),
        (
            LinkEndpoint::new("fe80::1".parse().unwrap(), 1, 0),
            "no scope",
        ),
    ];
    for (e, what) in cases {
        assert!(
            matches!(m.add_static(e, t0), Err(PeerError::InvalidEndpoint(..))),
            "{what}"
        );
    }
    assert_eq!(
        LinkEndpoint::new("fe80::1".parse().unwrap(), 1, 0).validate(),
        Err(EndpointError::MissingScope("fe80::1".parse().unwrap()))
    );
    // Scope ids are kept only where they mean something.
    let g = LinkEndpoint::new("fd00::1".parse().unwrap(), 5, 9);
    assert_eq!(g.scope_id(), 0);
    assert_eq!(g.to_string(), "[fd00::1]:5");
    let l = LinkEndpoint::from(SocketAddrV6::new("fe80::1".parse().unwrap(), 5, 77, 9));
    assert_eq!(l.scope_id(), 9);
    assert_eq!(l.socket_addr().flowinfo(), 0);
    assert_eq!(l.to_string(), "[fe80::1%9]:5");
    assert!(m.is_empty());
}

#[test]
fn peers_inbound_authenticated_peer_is_accepted_and_forgotten_when_down() {
    let t0 = Instant::now();
    let mut m = manager(t0);
    let e = ep(9);
    let k = NodeKey([0x33; 32]);
    m.on_link_authenticated(e, k, t0).unwrap();
    assert!(matches!(drain(&mut m)[0], Action::PeerUp { .. }));
    assert_eq!(m.peer(e, t0).unwrap().origin, Origin::Inbound);
    let acts = run_until(&mut m, t0 + Duration::from_secs(30));
    let tail: Vec<_> = acts
        .iter()
        .filter(|a| !matches!(a, Action::SendHello(..)))
        .cloned()
        .collect();
    assert_eq!(
        tail,
        vec![Action::PeerDown { endpoint: e }, Action::CloseLink(e)]
    );
    assert!(m.is_empty());

    // Self-links and, when disabled, inbound peers are refused.
    assert_eq!(
        m.on_link_authenticated(e, m.local_key(), t0),
        Err(PeerError::SelfLink(e))
    );
    let config = PeerConfig {
        accept_inbound: false,
        ..PeerConfig::default()
    };
    let mut strict = manager_with(config, t0);
    assert_eq!(
        strict.on_link_authenticated(e, k, t0),
        Err(PeerError::InboundRefused(e))
    );
    assert!(drain(&mut strict).is_empty());
}

#[test]
fn peers_endpoint_taken_over_by_another_key_is_a_new_neighbour() {
    let t0 = Instant::now();
    let mut m = manager(t0);
    let (e, _) = up_peer(&mut m, t0);
    let k2 = NodeKey([0x44; 32]);
    m.on_link_authenticated(e, k2, t0).unwrap();
    assert_eq!(
        drain(&mut m),
        vec![
            Action::PeerDown { endpoint: e },
            Action::PeerUp {
                endpoint: e,
                node_key: k2,
                origin: Origin::Static,
            },
            Action::SendKeepalive(e),
        ]
    );
}

#[test]
fn peers_valid_beacon_discovers_peer_with_expected_key() {
    let t0 = Instant::now();
    let mut m = manager(t0);
    m.enable_discovery(IFACE);
    let kp = key_pair();
    let k = key_of(&kp);
    let from = ll(5);
    let out = m.on_beacon(
        from,
        IFACE,
        &beacon_bytes(&kp, 7000, WALL_US),
        t0,
        wall(WALL_US),
    );
    let e = LinkEndpoint::new(*from.ip(), 7000, IFACE);
    assert_eq!(out, Ok(BeaconOutcome::Added(e)));
    assert_eq!(
        drain(&mut m),
        vec![Action::StartLinkHandshake {
            endpoint: e,
            expected_key: Some(k)
        }]
    );
    let snap = m.peer(e, t0).unwrap();
    assert_eq!(snap.origin.name(), "discovered");
    assert_eq!(snap.announced_key, Some(k));
    assert_eq!(snap.node_key, None);
    assert_eq!(snap.node_key_hex(), Some(k.to_hex()));
    assert_eq!(snap.interface, Some(IFACE));

    // A later beacon refreshes; the link handshake proving another key is refused.
    let t1 = t0 + Duration::from_secs(5);
    assert_eq!(
        m.on_beacon(
            from,
            IFACE,
            &beacon_bytes(&kp, 7000, WALL_US + 1),
            t1,
            wall(WALL_US)
        ),
        Ok(BeaconOutcome::Refreshed(e))
    );
    assert!(matches!(
        m.on_link_authenticated(e, NodeKey([0x55; 32]), t1),
        Err(PeerError::KeyMismatch { .. })
    ));
    assert_eq!(m.peer(e, t1).unwrap().state, PeerState::Connecting);
    m.on_link_authenticated(e, k, t1).unwrap();
    assert!(matches!(drain(&mut m)[0], Action::PeerUp { .. }));

    // Once Up, the same node announcing itself again adds nothing.
    let t2 = t1 + Duration::from_secs(1);
    assert_eq!(
        m.on_beacon(
            from,
            IFACE,
            &beacon_bytes(&kp, 7000, WALL_US + 2),
            t2,
            wall(WALL_US)
        ),
        Ok(BeaconOutcome::AlreadyConnected(e))
    );
    assert!(drain(&mut m).is_empty());
    assert_eq!(m.stats().beacons_accepted, 3);
}

#[test]
fn peers_forged_and_replayed_beacons_are_ignored_and_counted() {
    let t0 = Instant::now();
    let mut m = manager(t0);
    m.enable_discovery(IFACE);
    let kp = key_pair();
    let other = key_pair();
    let now = wall(WALL_US);
    let mut src = 0u16;
    // A fresh source per beacon, so the rate limit does not get in the way here.
    let mut beacon = |m: &mut PeerManager, bytes: &[u8]| {
        src += 1;
        m.on_beacon(ll(src), IFACE, bytes, t0, now)
    };

    // Signed by the right key, but announcing an address that key does not own.
    let mut b = Beacon::for_key(&kp, DATA_PORT, WALL_US).unwrap();
    b.overlay_addr = key_of(&other).node_address();
    let wrong_addr = LinkMessage::Beacon(b.sign(&kp)).to_vec();
    assert_eq!(beacon(&mut m, &wrong_addr), Err(BeaconReject::WrongAddress));

    // Someone else's key and address, signed with ours.
    let b = Beacon::for_key(&other, DATA_PORT, WALL_US).unwrap();
    let wrong_key = LinkMessage::Beacon(b.sign(&kp)).to_vec();
    assert_eq!(beacon(&mut m, &wrong_key), Err(BeaconReject::BadSignature));

    // A flipped bit in the signature.
    let mut bad_sig = beacon_bytes(&kp, DATA_PORT, WALL_US);
    let last = bad_sig.len() - 1;
    bad_sig[last] ^= 1;
    assert_eq!(beacon(&mut m, &bad_sig), Err(BeaconReject::BadSignature));

    // Garbage and a hello are not beacons.
    assert_eq!(
        beacon(&mut m, b"\x01\x04junk"),
        Err(BeaconReject::Malformed)
    );
    assert_eq!(
        beacon(&mut m, &LinkMessage::Keepalive.to_vec()),
        Err(BeaconReject::Malformed)
    );

    // Too old for the wall clock, or from the future.
    let age = m.config().beacon_max_age.unwrap();
    let age_us = u64::try_from(age.as_micros()).unwrap();
    let stale = beacon_bytes(&kp, DATA_PORT, WALL_US - age_us - 1);
    assert_eq!(beacon(&mut m, &stale), Err(BeaconReject::Stale));
    let future = beacon_bytes(&kp, DATA_PORT, WALL_US + age_us + 1);
    assert_eq!(beacon(&mut m, &future), Err(BeaconReject::Stale));

    // Port 0.
    assert_eq!(
        beacon(&mut m, &beacon_bytes(&kp, 0, WALL_US)),
        Err(BeaconReject::BadPort)
    );

    // Our own beacon looped back.
    let mine = Beacon {
        node_key: m.local_key(),
        overlay_addr: m.local_key().node_address(),
        port: DATA_PORT,
        timestamp_us: WALL_US,
    };
    let mine = LinkMessage::Beacon(mine.sign(&kp)).to_vec();
    assert_eq!(beacon(&mut m, &mine), Err(BeaconReject::OwnBeacon));

    // A genuine beacon, then its replay and an older one: only the first counts.
    let genuine = beacon_bytes(&kp, DATA_PORT, WALL_US);
    assert!(matches!(
        beacon(&mut m, &genuine),
        Ok(BeaconOutcome::Added(_))
    ));
    assert_eq!(beacon(&mut m, &genuine), Err(BeaconReject::Replayed));
    let older = beacon_bytes(&kp, DATA_PORT, WALL_US - 1);
    assert_eq!(beacon(&mut m, &older), Err(BeaconReject::Replayed));

    // Discovery disabled on the interface: ignored before anything else.
    assert_eq!(
        m.on_beacon(ll(999), IFACE + 1, &genuine, t0, now),
        Err(BeaconReject::InterfaceDisabled)
    );
    // A multicast source is not a neighbour.
    let mc = SocketAddrV6::new("ff02::1".parse().unwrap(), 1, 0, IFACE);
    assert_eq!(
        m.on_beacon(mc, IFACE, &genuine, t0, now),
        Err(BeaconReject::BadSource)
    );

    let s = m.stats();
    for (reason, n) in [
        (BeaconReject::WrongAddress, 1),
        (BeaconReject::BadSignature, 2),
        (BeaconReject::Malformed, 2),
        (BeaconReject::Stale, 2),
        (BeaconReject::BadPort, 1),
        (BeaconReject::OwnBeacon, 1),
        (BeaconReject::Replayed, 2),
        (BeaconReject::InterfaceDisabled, 1),
        (BeaconReject::BadSource, 1),
    ] {
        assert_eq!(s.rejected(reason), n, "{reason:?}");
    }
    assert_eq!(s.beacons_accepted, 1);
    // Exactly one peer came of all that: the genuine one.
    assert_eq!(m.len(), 1);
    let names: Vec<_> = s.counters().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"beacon_replayed") && names.contains(&"beacon_bad_signature"));
}

#[test]
fn peers_beacon_rate_limit_per_source() {
    let t0 = Instant::now();
    let mut m = manager(t0);
    m.enable_discovery(IFACE);
    let burst = m.config().beacon_source_burst;
    let kp = key_pair();
    let mut ok = 0;
    for i in 0..20u64 {
        let bytes = beacon_bytes(&kp, DATA_PORT, WALL_US + i);
        if m.on_beacon(ll(1), IFACE, &bytes, t0, wall(WALL_US)).is_ok() {
            ok += 1;
        }
    }
    assert_eq!(ok, burst);
    assert_eq!(
        m.stats().rejected(BeaconReject::RateLimited),
        u64::from(20 - burst)
    );
    // Another source is not affected, and the first recovers with time.
    let bytes = beacon_bytes(&kp, DATA_PORT, WALL_US + 100);
    assert!(m.on_beacon(ll(2), IFACE, &bytes, t0, wall(WALL_US)).is_ok());
    let bytes = beacon_bytes(&kp, DATA_PORT, WALL_US + 101);
    let later = t0 + Duration::from_secs(2);
    assert!(
        m.on_beacon(ll(1), IFACE, &bytes, later, wall(WALL_US))
            .is_ok()
    );
}

#[test]
fn peers_discovered_peer_cap_evicts_longest_down() {
    let t0 = Instant::now();
    let config = PeerConfig {
        max_dynamic_peers: 4,
        beacon_source_burst: 100,
        ..PeerConfig::default()
    };
    let mut m = manager_with(config, t0);
    m.enable_discovery(IFACE);
    // A static peer is never counted nor evicted.
    m.add_static(ep(1), t0).unwrap();
    let keys: Vec<_> = (0..7).map(|_| key_pair()).collect();
    let mut endpoints = Vec::new();
    for (i, kp) in keys.iter().enumerate().take(4) {
        let t = t0 + Duration::from_secs(i as u64);
        let out = m.on_beacon(
            ll(10 + i as u16),
            IFACE,
            &beacon_bytes(kp, DATA_PORT, WALL_US),
            t,
            wall(WALL_US),
        );
        let Ok(BeaconOutcome::Added(e)) = out else {
            panic!("{out:?}");
        };
        endpoints.push(e);
    }
    // Bring up the first two; the other two stay Connecting since t0+2 s and t0+3 s.
    for (e, kp) in endpoints.iter().zip(&keys).take(2) {
        m.on_link_authenticated(*e, key_of(kp), t0 + Duration::from_secs(4))
            .unwrap();
    }
    drain(&mut m);

    // A fifth evicts the longest-down (never up, added first): endpoints[2].
    let t5 = t0 + Duration::from_secs(5);
    let out = m.on_beacon(
        ll(20),
        IFACE,
        &beacon_bytes(&keys[4], DATA_PORT, WALL_US),
        t5,
        wall(WALL_US),
    );
    assert!(matches!(out, Ok(BeaconOutcome::Added(_))), "{out:?}");
    assert!(drain(&mut m).contains(&Action::CloseLink(endpoints[2])));
    assert!(m.peer(endpoints[2], t5).is_none());
    assert_eq!(m.stats().evicted, 1);
    assert_eq!(m.len(), 5);

    // One of the Up ones goes down later than the remaining Connecting one was added,
    // so the Connecting one (down since t0+3 s) is evicted next.
    m.on_link_lost(endpoints[0], t5);
    drain(&mut m);
    let out = m.on_beacon(
        ll(21),
        IFACE,
        &beacon_bytes(&keys[5], DATA_PORT, WALL_US),
        t5,
        wall(WALL_US),
    );
    assert!(matches!(out, Ok(BeaconOutcome::Added(_))));
    assert!(m.peer(endpoints[3], t5).is_none());
    assert!(m.peer(endpoints[0], t5).is_some());

    // Fill the table with Up peers: then new beacons are refused, nothing evicted.
    let all: Vec<_> = m
        .snapshot(t5)
        .into_iter()
        .filter(|s| !s.is_static() && s.state != PeerState::Up)
        .map(|s| (s.endpoint, s.announced_key.unwrap()))
        .collect();
    for (e, k) in all {
        m.on_link_authenticated(e, k, t5).unwrap();
    }
    let out = m.on_beacon(
        ll(22),
        IFACE,
        &beacon_bytes(&keys[6], DATA_PORT, WALL_US),
        t5,
        wall(WALL_US),
    );
    assert_eq!(out, Err(BeaconReject::Full));
    assert_eq!(m.len(), 5);
    assert_eq!(
        m.snapshot(t5).iter().filter(|s| !s.is_static()).count(),
        4,
        "the cap holds"
    );
}

#[test]
fn peers_unannounced_discovered_peer_expires_and_disable_forgets() {
    let t0 = Instant::now();
    let mut m = manager(t0);
    m.enable_discovery(IFACE);
    let kp = key_pair();
    let out = m.on_beacon(
        ll(1),
        IFACE,
        &beacon_bytes(&kp, DATA_PORT, WALL_US),
        t0,
        wall(WALL_US),
    );
    let Ok(BeaconOutcome::Added(e)) = out else {
        panic!("{out:?}");
    };
    drain(&mut m);
    let expiry = m.config().discovered_expiry;
    let acts = run_until(&mut m, t0 + expiry + Duration::from_secs(1));
    assert_eq!(acts.last(), Some(&Action::CloseLink(e)));
    assert!(m.is_empty());
    assert_eq!(m.stats().discovered_expired, 1);

    // Discovered and Up, then discovery is switched off on the interface.
    let t1 = t0 + Duration::from_secs(100);
    let out = m.on_beacon(
        ll(1),
        IFACE,
        &beacon_bytes(&kp, DATA_PORT, WALL_US + 1),
        t1,
        wall(WALL_US),
    );
    let Ok(BeaconOutcome::Added(e)) = out else {
        panic!("{out:?}");
    };
    m.on_link_authenticated(e, key_of(&kp), t1).unwrap();
    drain(&mut m);
    assert_eq!(m.disable_discovery(IFACE), 1);
    assert_eq!(
        drain(&mut m),
        vec![Action::PeerDown { endpoint: e }, Action::CloseLink(e)]
    );
    assert!(!m.discovery_enabled(IFACE));
}

#[test]
fn peers_up_and_down_strictly_alternate_under_random_inputs() {
    // A small deterministic fuzz of the public inputs: whatever happens, PeerUp and
    // PeerDown alternate per endpoint, and PeerUp only follows an authentication.
    let t0 = Instant::now();
    let mut m = manager(t0);
    let endpoints: Vec<_> = (1..5).map(ep).collect();
    let keys = [NodeKey([1; 32]), NodeKey([2; 32])];
    let mut up = std::collections::BTreeMap::new();
    let mut rng = 12345u64;
    let mut t = t0;
    for _ in 0..5000 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        t += Duration::from_millis(rng % 1500);
        let e = endpoints[(rng >> 8) as usize % endpoints.len()];
        let authenticated = match (rng >> 16) % 7 {
            0 => {
                let _ = m.add_static(e, t);
                false
            }
            1 => {
                m.remove(e);
                false
            }
            2 => m
                .on_link_authenticated(e, keys[(rng >> 24) as usize % 2], t)
                .is_ok(),
            3 => {
                m.on_link_lost(e, t);
                false
            }
            4 => {
                m.on_any_packet_from(e, t);
                false
            }
            _ => {
                m.handle_timeout(t);
                false
            }
        };
        for a in drain(&mut m) {
            match a {
                Action::PeerUp { endpoint, .. } => {
                    assert!(authenticated, "PeerUp without authentication");
                    assert_ne!(up.insert(endpoint, true), Some(true), "double PeerUp");
                }
                Action::PeerDown { endpoint } => {
                    assert_eq!(
                        up.insert(endpoint, false),
                        Some(true),
                        "PeerDown while down"
                    );
                }
                _ => {}
            }
        }
        for s in m.snapshot(t) {
            let is_up = up.get(&s.endpoint).copied().unwrap_or(false);
            assert_eq!(s.state == PeerState::Up, is_up, "{s:?}");
        }
    }
}

#[test]
fn peers_config_is_validated() {
    let t0 = Instant::now();
    let bad = PeerConfig {
        dead_interval: Duration::from_secs(1),
        hello_interval: Duration::from_secs(2),
        ..PeerConfig::default()
    };
    assert!(matches!(
        PeerManager::new(bad, NodeKey([0; 32]), t0, 0),
        Err(PeerError::InvalidConfig(_))
    ));
    let bad = PeerConfig {
        loss_window: 0,
        ..PeerConfig::default()
    };
    assert!(bad.validate().is_err());
    assert!(PeerConfig::default().validate().is_ok());
}

proptest::proptest! {
    #[test]
    fn peers_manager_arbitrary_peer_input_never_panics(
        datagram in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        src: [u8; 16],
        ifindex in 0u32..4,
        seq: u32,
        ts: u64,
        delay: u32,
        wall_us: u64,
    ) {
        let t0 = Instant::now();
        let mut m = manager(t0);
        m.enable_discovery(1);
        let from = SocketAddrV6::new(Ipv6Addr::from(src), 1, 0, ifindex);
        let _ = m.on_beacon(from, ifindex, &datagram, t0, wall(wall_us));
        if let Ok(msg) = LinkMessage::parse(&datagram) {
            let _ = m.handle_control(ep(1), &msg, t0);
        }
        let (e, _) = up_peer(&mut m, t0);
        let ack = HelloAck { sequence: seq, echoed_timestamp_us: ts, ack_delay_us: delay };
        let _ = m.on_hello_ack(e, &ack, t0);
        m.handle_timeout(t0 + Duration::from_secs(1));
        let _ = m.snapshot(t0 + Duration::from_secs(1));
    }
}

// ---- Fast loss detection: probing after an unanswered hello ----

/// The agent's default timers (1 s hellos, dead after 3.5 s) with default probing.
fn agent_config() -> PeerConfig {
    let hello = Duration::from_secs(1);
    PeerConfig {
        hello_interval: hello,
        hello_loss_timeout: hello,
        dead_interval: hello * 7 / 2,
        ..PeerConfig::default()
    }
}

/// Runs `m` until `until`, answering every hello `rtt` later while `answer(sent_at)`.
fn answering(
    m: &mut PeerManager,
    e: LinkEndpoint,
    from: Instant,
    until: Instant,
    rtt: Duration,
    answer: impl Fn(Instant) -> bool,
) -> Vec<(Instant, Action)> {
    let mut out = Vec::new();
    let mut pending: Vec<(Instant, HelloAck)> = Vec::new();
    let mut t = from;
    loop {
        let next_ack = pending.iter().map(|(at, _)| *at).min();
        let next = [m.poll_timeout(), next_ack].into_iter().flatten().min();
        match next {
            Some(n) if n <= until => t = n.max(t),
            _ => break,
        }
        pending.retain(|(at, ack)| {
            if *at <= t {
                let _ = m.on_hello_ack(e, ack, t);
                false
            } else {
                true
            }
        });
        m.handle_timeout(t);
        for a in drain(m) {
            if let Action::SendHello(_, h) = &a
                && answer(t)
            {
                pending.push((
                    t + rtt,
                    HelloAck {
                        sequence: h.sequence,
                        echoed_timestamp_us: h.timestamp_us,
                        ack_delay_us: 0,
                    },
                ));
            }
            out.push((t, a));
        }
    }
    out
}

#[test]
fn peers_a_silent_neighbour_is_probed_and_down_in_well_under_two_seconds() {
    let config = agent_config();
    let t0 = Instant::now();
    let mut m = manager_with(config.clone(), t0);
    let (e, _) = up_peer(&mut m, t0);
    let rtt = Duration::from_millis(1);
    // Healthy for 30 s: no probe is ever sent, hellos go at the configured rate.
    let healthy = t0 + Duration::from_secs(30);
    let acts = answering(&mut m, e, t0, healthy, rtt, |_| true);
    let hellos = acts
        .iter()
        .filter(|(_, a)| matches!(a, Action::SendHello(..)))
        .count();
    assert!((27..=34).contains(&hellos), "{hellos} hellos in 30 s");
    assert_eq!(m.stats().probes_sent, 0, "a healthy link is never probed");

    // The neighbour dies: from the first unanswered hello on, five probes 100 ms apart
    // (the floor: the link's RTT is 1 ms), then down.
    let later = healthy + Duration::from_secs(10);
    let acts = answering(&mut m, e, healthy, later, rtt, |_| false);
    let down_at = acts
        .iter()
        .find(|(_, a)| *a == Action::PeerDown { endpoint: e })
        .map(|(t, _)| *t)
        .expect("down");
    let first_hello = acts
        .iter()
        .find(|(_, a)| matches!(a, Action::SendHello(..)))
        .map(|(t, _)| *t)
        .expect("a hello after the failure");
    let probes = m.stats().probes_sent;
    assert_eq!(probes, u64::from(config.probe_count));
    let detection = down_at - first_hello;
    assert_eq!(
        detection,
        config.probe_timeout_min * (config.probe_count + 1)
    );
    // Worst case from the failure: a whole (jittered) hello interval before the first
    // unanswered hello, then the probes.
    let worst = config.hello_interval * 11 / 10 + detection;
    assert!(worst < Duration::from_secs(2), "{worst:?}");
    assert_eq!(m.stats().probe_downs, 1);
    assert_eq!(m.stats().peer_downs, 1);
}

#[test]
fn peers_an_answered_probe_keeps_the_link_and_only_regular_hellos_count_as_loss() {
    let config = agent_config();
    let t0 = Instant::now();
    let mut m = manager_with(config, t0);
    let (e, _) = up_peer(&mut m, t0);
    let rtt = Duration::from_millis(1);
    let t1 = t0 + Duration::from_secs(10);
    answering(&mut m, e, t0, t1, rtt, |_| true);
    // The first hello after t1 is lost; the probe after it, and all else, answered.
    let dropped = std::cell::Cell::new(false);
    // Within the loss window (16 regular hellos, ~16 s).
    let t2 = t1 + Duration::from_secs(8);
    answering(&mut m, e, t1, t2, rtt, |_| dropped.replace(true));
    let snap = m.peer(e, t2).unwrap();
    assert_eq!(snap.state, PeerState::Up);
    assert_eq!(m.stats().peer_downs, 0);
    assert!(m.stats().probes_sent >= 1, "the lost hello was probed");
    // The loss window (16 regular hellos) holds the one lost hello, not the probes.
    let loss = snap.loss.unwrap();
    assert!(loss > 0.0 && loss <= 1.0 / 15.0, "{loss}");
}

#[test]
fn peers_a_slow_link_is_probed_by_its_own_rtt_and_kept() {
    let config = agent_config();
    let t0 = Instant::now();
    let mut m = manager_with(config, t0);
    let (e, _) = up_peer(&mut m, t0);
    // A 700 ms round trip: longer than every probe the 100 ms floor would allow.
    let rtt = Duration::from_millis(700);
    let t1 = t0 + Duration::from_secs(120);
    answering(&mut m, e, t0, t1, rtt, |_| true);
    assert_eq!(m.peer(e, t1).unwrap().state, PeerState::Up);
    assert_eq!(m.stats().peer_downs, 0);
}

#[test]
fn peers_before_any_rtt_sample_only_the_dead_interval_applies() {
    let config = agent_config();
    let t0 = Instant::now();
    let mut m = manager_with(config.clone(), t0);
    let (e, _) = up_peer(&mut m, t0);
    let acts = run_until(&mut m, t0 + config.dead_interval * 2);
    let (down, _) = acts
        .iter()
        .enumerate()
        .find(|(_, a)| **a == Action::PeerDown { endpoint: e })
        .expect("down");
    assert_eq!(m.stats().probes_sent, 0);
    assert_eq!(m.stats().probe_downs, 0);
    assert!(down > 0);
    assert!(
        m.peer(e, t0 + config.dead_interval * 2)
            .unwrap()
            .last_seen_age
            .unwrap()
            >= config.dead_interval
    );
}

#[test]
fn peers_probing_settings_are_validated() {
    let bad = PeerConfig {
        probe_timeout_min: Duration::ZERO,
        ..PeerConfig::default()
    };
    assert!(bad.validate().is_err());
    let off = PeerConfig {
        probe_count: 0,
        probe_timeout_min: Duration::ZERO,
        ..PeerConfig::default()
    };
    assert!(off.validate().is_ok());
}

#[test]
fn peers_a_round_trip_that_grows_past_the_probe_timeout_is_probed_not_dropped() {
    let config = agent_config();
    let t0 = Instant::now();
    let mut m = manager_with(config, t0);
    let (e, _) = up_peer(&mut m, t0);
    let t1 = t0 + Duration::from_secs(10);
    answering(&mut m, e, t0, t1, Duration::from_millis(1), |_| true);
    // The round trip jumps to 150 ms: the next hello is probed after 100 ms, its ack
    // ends the episode, and the probe's own late ack still matches (an RTT sample, not
    // an unmatched ack).
    let t2 = t1 + Duration::from_secs(20);
    answering(&mut m, e, t1, t2, Duration::from_millis(150), |_| true);
    assert_eq!(m.peer(e, t2).unwrap().state, PeerState::Up);
    assert!(m.stats().probes_sent >= 1);
    assert_eq!(m.stats().acks_unmatched, 0);
    assert_eq!(m.stats().peer_downs, 0);
    // The estimate caught up: no more probes once the timeout covers the new RTT.
    let probes = m.stats().probes_sent;
    let t3 = t2 + Duration::from_secs(20);
    answering(&mut m, e, t2, t3, Duration::from_millis(150), |_| true);
    assert_eq!(m.stats().probes_sent, probes);
}
