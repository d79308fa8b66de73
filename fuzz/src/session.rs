//! Datagrams a peer (or anyone on the path) can send to the session core: handshake
//! inits and responses, cookie replies, sealed data and control, garbage. They enter
//! through `SessionTable::handle_datagram`, the one call the agent makes per datagram.
//!
//! Input layout: one mode byte, then the datagram.
//! - bit 0: the responder is under load (cookies demanded);
//! - bits 1–2: overwrite the header's session id with 1 = the receiver index of the
//!   responder's established session, 2 = the index of its own pending initiation, so
//!   the fuzzer reaches the states behind those indices although they are random;
//! - bit 3: the datagram comes from the established peer's underlay endpoint instead of
//!   a stranger's.
//!
//! Properties checked on every input:
//! 1. a datagram the table rejects changes no session, no pending handshake, and
//!    queues nothing to send and no event;
//! 2. nothing the table sends back to the datagram's sender is larger than the
//!    datagram (no amplification);
//! 3. whatever the datagram was, the established session still carries data both ways.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use myconet_common::wire::field;
use myconet_core::id::Signer;
use myconet_core::session::{Config, Inbound, SessionTable};
use ring::{rand::SystemRandom, signature::Ed25519KeyPair};

/// A fixed identity, so every run takes the same tie-break branches.
pub fn keypair(seed: u8) -> Arc<Ed25519KeyPair> {
    Arc::new(Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).expect("32-byte seed"))
}

/// The underlay endpoint of node `i` in the fuzz scenario.
pub fn underlay(i: u16) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, i, 0, 0, 0, 1)),
        9651,
    )
}

fn table(seed: u8, now: Instant) -> SessionTable {
    let signer: Arc<dyn Signer> = keypair(seed);
    SessionTable::new(signer, Config::default(), now).expect("default config is valid")
}

/// Responder `b` with an established session from `a` and its own initiation to a third
/// node under way, as every input finds it.
pub struct Scenario {
    /// The established peer (initiator of the session with `b`).
    pub a: SessionTable,
    /// The node under test.
    pub b: SessionTable,
    /// `b`'s receiver index of its session with `a`.
    pub b_session_index: u32,
    /// `b`'s receiver index of its pending initiation to the third node.
    pub b_pending_index: u32,
    /// The init `b` sent to the third node.
    pub b_init: Vec<u8>,
    /// The clock every call uses.
    pub now: Instant,
    rng: SystemRandom,
}

fn drain(t: &mut SessionTable) {
    while t.poll_transmit().is_some() {}
    while t.poll_event().is_some() {}
}

impl Scenario {
    /// Builds the scenario with real handshakes.
    pub fn new() -> Self {
        let rng = SystemRandom::new();
        let now = Instant::now();
        let mut a = table(1, now);
        let mut b = table(2, now);
        let c_addr = table(3, now).local_addr();
        a.connect(b.local_addr(), None, now, &rng).expect("connect");
        let init = a.poll_transmit().expect("init").datagram;
        b.handle_datagram(underlay(1), &init, now, &rng)
            .expect("b answers a's init");
        let response = b.poll_transmit().expect("response").datagram;
        a.handle_datagram(underlay(2), &response, now, &rng)
            .expect("a completes");
        drain(&mut a);
        let mut s = Self {
            a,
            b,
            b_session_index: 0,
            b_pending_index: 0,
            b_init: Vec::new(),
            now,
            rng,
        };
        s.assert_a_to_b(b"confirm");
        drain(&mut s.b);
        s.b_session_index =
            s.b.current_session(s.a.local_addr())
                .expect("b's session with a")
                .local_index();
        s.b.connect(c_addr, None, now, &s.rng).expect("connect c");
        let b_init = s.b.poll_transmit().expect("b's init").datagram;
        s.b_pending_index = u32::from_be_bytes(
            b_init[field::PAYLOAD..field::PAYLOAD + 4]
                .try_into()
                .expect("sender index"),
        );
        s.b_init = b_init;
        drain(&mut s.b);
        s
    }

    /// `a` seals `payload` for `b`, and `b` opens exactly that.
    pub fn assert_a_to_b(&mut self, payload: &[u8]) {
        let b_addr = self.b.local_addr();
        self.a
            .send(b_addr, payload.to_vec(), self.now, &self.rng)
            .expect("a sends");
        let sealed = self.a.poll_transmit().expect("a's data").datagram;
        match self
            .b
            .handle_datagram(underlay(1), &sealed, self.now, &self.rng)
        {
            Ok(Inbound::Data { remote, payload: p }) => {
                assert_eq!(remote, self.a.local_addr());
                assert_eq!(p, payload);
            }
            other => panic!("the established session a → b no longer carries data: {other:?}"),
        }
    }

    /// `b` seals `payload` for `a`, and `a` opens exactly that.
    pub fn assert_b_to_a(&mut self, payload: &[u8]) {
        let a_addr = self.a.local_addr();
        self.b
            .send(a_addr, payload.to_vec(), self.now, &self.rng)
            .expect("b sends");
        let sealed = loop {
            let t = self.b.poll_transmit().expect("b's data to a");
            if t.destination == a_addr {
                break t.datagram;
            }
        };
        match self
            .a
            .handle_datagram(underlay(2), &sealed, self.now, &self.rng)
        {
            Ok(Inbound::Data { payload: p, .. }) => assert_eq!(p, payload),
            other => panic!("the established session b → a no longer carries data: {other:?}"),
        }
    }
}

impl Default for Scenario {
    fn default() -> Self {
        Self::new()
    }
}

/// The fuzz target; see the module documentation.
pub fn run(data: &[u8]) {
    let Some((&mode, datagram)) = data.split_first() else {
        return;
    };
    let mut s = Scenario::new();
    let mut datagram = datagram.to_vec();
    let patch = match (mode >> 1) & 3 {
        1 => Some(s.b_session_index),
        2 => Some(s.b_pending_index),
        _ => None,
    };
    if let (Some(index), Some(slot)) = (patch, datagram.get_mut(field::SESSION)) {
        slot.copy_from_slice(&index.to_be_bytes());
    }
    let from = if mode & 8 != 0 {
        underlay(1)
    } else {
        underlay(9)
    };
    s.b.set_under_load(mode & 1 != 0);
    // Later in time than the setup, so timers may fire, but within every lifetime.
    s.now += Duration::from_millis(u64::from(mode >> 4) * 100);

    let sessions = s.b.session_count();
    let pending = s.b.pending_handshakes();
    match s.b.handle_datagram(from, &datagram, s.now, &s.rng) {
        Ok(_) => {
            while let Some(t) = s.b.poll_transmit() {
                if t.underlay == Some(from) {
                    assert!(
                        t.datagram.len() <= datagram.len(),
                        "a {}-byte datagram made b send {} bytes back to its sender",
                        datagram.len(),
                        t.datagram.len()
                    );
                }
            }
            while s.b.poll_event().is_some() {}
        }
        Err(e) => {
            assert_eq!(
                s.b.session_count(),
                sessions,
                "rejected ({e}) yet sessions changed"
            );
            assert_eq!(
                s.b.pending_handshakes(),
                pending,
                "rejected ({e}) yet pending handshakes changed"
            );
            if let Some(t) = s.b.poll_transmit() {
                panic!("rejected ({e}) yet queued a transmit: {t:?}");
            }
            if let Some(ev) = s.b.poll_event() {
                panic!("rejected ({e}) yet queued an event: {ev:?}");
            }
        }
    }
    s.assert_a_to_b(b"after");
    s.assert_b_to_a(b"reply");
}
