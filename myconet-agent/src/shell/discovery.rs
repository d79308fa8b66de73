//! The tokio shell of link-local discovery: sends this node's signed beacon to the
//! Myconet discovery group on every opted-in interface and hands whatever arrives to the
//! agent, which feeds it to [`PeerManager::on_beacon`] (the sans-IO core in
//! `myconet_core::peers`).
//!
//! Sockets: one per interface, IPv6-only, bound to `[::]:<discovery port>` and pinned to
//! its interface (`SO_BINDTOIFINDEX`), joined to [`DISCOVERY_GROUP`] there, with
//! `IPV6_MULTICAST_IF` set to it, a multicast hop limit of 1 (beacons never leave the
//! link), multicast loopback off and `IPV6_MULTICAST_ALL` off (only the joined group is
//! delivered). The discovery port is separate from the data port on purpose: the agent's
//! data socket is bound to `[::]:<port>`, and a second socket on that port with
//! `SO_REUSEADDR` would take a share of the data packets. It defaults to data port + 1.
//!
//! Nothing received here is trusted: the [`ReceivedBeacon`] is raw bytes plus where they
//! came from, and the sans-IO manager rate-limits, parses and verifies them.

use std::{
    net::{Ipv6Addr, SocketAddr, SocketAddrV6},
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::{net::UdpSocket, sync::mpsc, task::JoinSet};
use tracing::{debug, warn};

use myconet_core::id::Signer;
use myconet_core::peers::{
    BeaconOutcome, BeaconReject, PeerManager,
    wire::{Beacon, LinkMessage, MAX_LINK_MESSAGE_LEN},
};

/// The Myconet discovery group, `ff02::6d:1`: link-local scope (`ff02::/16`, never
/// routed), `6d` for 'm' as in the overlay prefix. Not IANA-assigned; chosen outside the
/// assigned `ff02::1:*`/`ff02::1:ff00:0/104` ranges.
pub const DISCOVERY_GROUP: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0x6d, 1);

/// Default time between beacons (jittered by ±25%).
pub const DEFAULT_BEACON_INTERVAL: Duration = Duration::from_secs(5);

/// The default discovery port for a data port: the next one up (or the one below for
/// 65535), so it never equals the data port.
pub const fn default_discovery_port(data_port: u16) -> u16 {
    match data_port.checked_add(1) {
        Some(p) => p,
        None => data_port - 1,
    }
}

/// Why discovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// A setting discovery cannot work with.
    #[error("invalid discovery configuration: {0}")]
    InvalidConfig(&'static str),
    /// Interface index 0 is not an interface.
    #[error("interface index 0 is not an interface")]
    NoInterface,
    /// A socket call failed for an interface.
    #[error("discovery socket on interface {ifindex}: {what}: {source}")]
    Socket {
        /// The interface.
        ifindex: u32,
        /// The step that failed.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The node key is not a 32-byte Ed25519 key (cannot happen with ring's keys).
    #[error("node key is not an Ed25519 public key")]
    BadKey,
}

/// Where and how often to beacon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryConfig {
    /// Multicast group, link-local scope.
    pub group: Ipv6Addr,
    /// UDP port beacons are sent to and received on; must differ from `data_port`.
    pub port: u16,
    /// This node's Myconet data port, announced in the beacon.
    pub data_port: u16,
    /// Time between beacons, jittered by ±25%.
    pub interval: Duration,
}

impl DiscoveryConfig {
    /// The defaults for a node whose data port is `data_port`.
    pub fn new(data_port: u16) -> Self {
        Self {
            group: DISCOVERY_GROUP,
            port: default_discovery_port(data_port),
            data_port,
            interval: DEFAULT_BEACON_INTERVAL,
        }
    }

    /// Rejects settings that would steal data packets or leak beacons off the link.
    pub fn validate(&self) -> Result<(), DiscoveryError> {
        let bad = |what| Err(DiscoveryError::InvalidConfig(what));
        let o = self.group.octets();
        // ffX2::/16 with any flags: link-local scope.
        if o[0] != 0xff || o[1] & 0x0f != 0x02 {
            return bad("group must be a link-local-scope multicast address (ff02::/16)");
        }
        if self.port == 0 || self.data_port == 0 {
            return bad("ports must not be 0");
        }
        if self.port == self.data_port {
            return bad("discovery port must differ from the data port");
        }
        if self.interval < Duration::from_millis(10) {
            return bad("beacon interval must be at least 10 ms");
        }
        Ok(())
    }
}

/// A datagram that arrived on a discovery socket, not yet checked in any way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedBeacon {
    /// Source address and port; the scope id is the arrival interface for link-local.
    pub from: SocketAddrV6,
    /// The interface the socket is pinned to, i.e. where it arrived.
    pub ifindex: u32,
    /// The datagram.
    pub datagram: Vec<u8>,
    /// Monotonic arrival time.
    pub at: Instant,
    /// Wall-clock arrival time, for the freshness check.
    pub wall: SystemTime,
}

impl ReceivedBeacon {
    /// Hands the beacon to the manager (the one call the agent's peer task makes per
    /// received beacon).
    pub fn deliver(&self, manager: &mut PeerManager) -> Result<BeaconOutcome, BeaconReject> {
        manager.on_beacon(self.from, self.ifindex, &self.datagram, self.at, self.wall)
    }
}

/// Counters of the discovery shell.
#[derive(Debug, Default)]
pub struct DiscoveryStats {
    /// Beacons sent (one per interface per round).
    pub sent: AtomicU64,
    /// Sends that failed.
    pub send_errors: AtomicU64,
    /// Datagrams received and passed on.
    pub received: AtomicU64,
    /// Datagrams dropped before the manager: too long, not IPv6, or the queue was full.
    pub dropped: AtomicU64,
}

#[derive(Debug)]
struct IfaceSocket {
    ifindex: u32,
    socket: Arc<UdpSocket>,
}

/// Beacon sender and receiver on a set of interfaces; see the module documentation.
#[derive(Debug)]
pub struct Beaconer {
    config: DiscoveryConfig,
    sockets: Vec<IfaceSocket>,
    stats: Arc<DiscoveryStats>,
}

fn open_socket(config: &DiscoveryConfig, ifindex: u32) -> Result<UdpSocket, DiscoveryError> {
    let index = NonZeroU32::new(ifindex).ok_or(DiscoveryError::NoInterface)?;
    let err = |what| {
        move |source| DiscoveryError::Socket {
            ifindex,
            what,
            source,
        }
    };
    let socket = socket2::Socket::new(
        socket2::Domain::IPV6,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(err("socket"))?;
    socket.set_only_v6(true).map_err(err("IPV6_V6ONLY"))?;
    // One socket per interface on the same port; multicast goes to each of them.
    socket
        .set_reuse_address(true)
        .map_err(err("SO_REUSEADDR"))?;
    socket
        .bind_device_by_index_v6(Some(index))
        .map_err(err("SO_BINDTOIFINDEX"))?;
    socket
        .set_multicast_all_v6(false)
        .map_err(err("IPV6_MULTICAST_ALL"))?;
    socket
        .set_multicast_if_v6(ifindex)
        .map_err(err("IPV6_MULTICAST_IF"))?;
    socket
        .set_multicast_hops_v6(1)
        .map_err(err("IPV6_MULTICAST_HOPS"))?;
    socket
        .set_multicast_loop_v6(false)
        .map_err(err("IPV6_MULTICAST_LOOP"))?;
    socket.set_nonblocking(true).map_err(err("O_NONBLOCK"))?;
    let bind = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, config.port, 0, 0));
    socket.bind(&bind.into()).map_err(err("bind"))?;
    socket
        .join_multicast_v6(&config.group, ifindex)
        .map_err(err("IPV6_JOIN_GROUP"))?;
    UdpSocket::from_std(socket.into()).map_err(err("register with tokio"))
}

fn unix_micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

impl Beaconer {
    /// Opens a socket on every interface in `ifindexes` (duplicates ignored). Must run
    /// inside a tokio runtime, in the network namespace the interfaces live in. Needs
    /// `CAP_NET_RAW` for the interface binding, which the agent has anyway.
    pub fn bind(config: DiscoveryConfig, ifindexes: &[u32]) -> Result<Self, DiscoveryError> {
        config.validate()?;
        let mut sockets: Vec<IfaceSocket> = Vec::with_capacity(ifindexes.len());
        for &ifindex in ifindexes {
            if sockets.iter().any(|s| s.ifindex == ifindex) {
                continue;
            }
            let socket = Arc::new(open_socket(&config, ifindex)?);
            sockets.push(IfaceSocket { ifindex, socket });
        }
        Ok(Self {
            config,
            sockets,
            stats: Arc::new(DiscoveryStats::default()),
        })
    }

    /// The interfaces beacons go out on (enable discovery on exactly these in the
    /// manager).
    pub fn interfaces(&self) -> Vec<u32> {
        self.sockets.iter().map(|s| s.ifindex).collect()
    }

    /// Counters, shared with the running task.
    pub fn stats(&self) -> Arc<DiscoveryStats> {
        Arc::clone(&self.stats)
    }

    /// The configuration in force.
    pub fn config(&self) -> &DiscoveryConfig {
        &self.config
    }

    /// Signs one beacon stamped `timestamp_us` and sends it on every interface; returns
    /// how many sends succeeded. A failing interface (down, removed) is logged and
    /// skipped so the others keep beaconing.
    pub async fn send_beacon(
        &self,
        key: &dyn Signer,
        timestamp_us: u64,
    ) -> Result<usize, DiscoveryError> {
        let beacon = Beacon::for_key(key, self.config.data_port, timestamp_us)
            .ok_or(DiscoveryError::BadKey)?;
        let bytes = LinkMessage::Beacon(beacon.sign(key)).to_vec();
        let mut sent = 0;
        for s in &self.sockets {
            let to = SocketAddrV6::new(self.config.group, self.config.port, 0, s.ifindex);
            match s.socket.send_to(&bytes, SocketAddr::V6(to)).await {
                Ok(_) => {
                    sent += 1;
                    self.stats.sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    self.stats.send_errors.fetch_add(1, Ordering::Relaxed);
                    debug!(ifindex = s.ifindex, error = %e, "beacon send failed");
                }
            }
        }
        Ok(sent)
    }

    /// Beacons every interval (the first at once) and forwards every received datagram
    /// to `sink` until `sink` is closed; then returns. Received datagrams are offered
    /// with `try_send`: when the agent falls behind they are dropped and counted, never
    /// queued without bound and never allowed to delay the beacons.
    pub async fn run(
        self,
        signer: Arc<dyn Signer>,
        sink: mpsc::Sender<ReceivedBeacon>,
    ) -> Result<(), DiscoveryError> {
        let mut receivers = JoinSet::new();
        for s in &self.sockets {
            receivers.spawn(receive_loop(
                s.ifindex,
                Arc::clone(&s.socket),
                sink.clone(),
                Arc::clone(&self.stats),
            ));
        }
        let mut rng = super::jitter_seed();
        let mut last_timestamp = 0u64;
        loop {
            // Strictly increasing even if the wall clock steps back, so receivers that
            // saw an earlier beacon do not take the next one for a replay.
            let timestamp = unix_micros(SystemTime::now()).max(last_timestamp.saturating_add(1));
            last_timestamp = timestamp;
            if self.send_beacon(signer.as_ref(), timestamp).await? == 0 && !self.sockets.is_empty()
            {
                warn!("discovery beacon could not be sent on any interface");
            }
            let sleep = jittered(self.config.interval, &mut rng);
            tokio::select! {
                () = tokio::time::sleep(sleep) => {}
                () = sink.closed() => return Ok(()),
            }
        }
    }
}

/// `interval` × a uniform factor in [0.75, 1.25), from a xorshift step of `state`.
fn jittered(interval: Duration, state: &mut u64) -> Duration {
    let mut x = *state | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    let us = u64::try_from(interval.as_micros()).unwrap_or(u64::MAX / 2);
    let quarter = us / 4;
    let offset = x % quarter.saturating_mul(2).max(1);
    Duration::from_micros(us - quarter + offset)
}

async fn receive_loop(
    ifindex: u32,
    socket: Arc<UdpSocket>,
    sink: mpsc::Sender<ReceivedBeacon>,
    stats: Arc<DiscoveryStats>,
) {
    // Room for one byte more than the longest message, so an oversized datagram is
    // recognised rather than silently truncated into something that might parse.
    let mut buf = [0u8; MAX_LINK_MESSAGE_LEN + 1];
    loop {
        let (len, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                debug!(ifindex, error = %e, "discovery receive error");
                // Errors such as ICMP reports are transient; do not spin on a hard one.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let SocketAddr::V6(from) = from else {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let Some(datagram) = buf.get(..len).filter(|_| len <= MAX_LINK_MESSAGE_LEN) else {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let beacon = ReceivedBeacon {
            from,
            ifindex,
            datagram: datagram.to_vec(),
            at: Instant::now(),
            wall: SystemTime::now(),
        };
        match sink.try_send(beacon) {
            Ok(()) => {
                stats.received.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_discovery_config_defaults_and_validation() {
        let c = DiscoveryConfig::new(9651);
        assert_eq!(c.port, 9652);
        assert_eq!(c.group, "ff02::6d:1".parse::<Ipv6Addr>().unwrap());
        assert!(c.validate().is_ok());
        assert_eq!(default_discovery_port(65535), 65534);
        let mut bad = c.clone();
        bad.port = 9651;
        assert!(bad.validate().is_err());
        let mut bad = c.clone();
        bad.group = "ff05::6d:1".parse().unwrap();
        assert!(bad.validate().is_err());
        let mut bad = c;
        bad.interval = Duration::ZERO;
        assert!(bad.validate().is_err());
    }

    #[test]
    fn peers_discovery_jitter_stays_in_range() {
        let mut s = 42;
        let base = Duration::from_secs(4);
        for _ in 0..1000 {
            let d = jittered(base, &mut s);
            assert!(
                d >= Duration::from_secs(3) && d < Duration::from_secs(5),
                "{d:?}"
            );
        }
        assert!(jittered(Duration::from_micros(1), &mut s) <= Duration::from_micros(2));
    }
}

/// The privileged test: two namespaces joined by a veth, a beaconer on each end, real
/// link-local multicast. Needs root (CI runs as root).
#[cfg(test)]
mod netns_tests {
    use std::sync::atomic::AtomicUsize;

    use anyhow::{Context, Result, bail, ensure};
    use myconet_testbed::topology::{Chain, Node};
    use ring::{rand::SystemRandom, signature::Ed25519KeyPair};

    use super::*;
    use myconet_core::id::{LinkEndpoint, NodeKey};
    use myconet_core::peers::{Action, PeerConfig, PeerManager};

    const DATA_PORT: u16 = 19651;
    const LIMIT: Duration = Duration::from_secs(15);

    fn key_pair() -> Ed25519KeyPair {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    fn link_local(node: &Node, ifname: &str) -> Result<Ipv6Addr> {
        let out = node
            .netns()
            .ip(["-6", "-o", "addr", "show", "dev", ifname, "scope", "link"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        while let Some(w) = words.next() {
            if w == "inet6" {
                let cidr = words.next().context("inet6 without address")?;
                let addr = cidr.split('/').next().unwrap_or(cidr);
                return Ok(addr.parse()?);
            }
        }
        bail!(
            "no link-local address on {ifname} in {}: {text}",
            node.ns_name()
        )
    }

    /// Beacons on `ifindex` until this side found `want` and the other side found us
    /// (`found` counts both), then returns where `want` was found and how fast.
    fn discover(
        ifindex: u32,
        key: Ed25519KeyPair,
        want: NodeKey,
        found: &AtomicUsize,
    ) -> Result<(LinkEndpoint, Duration)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut config = DiscoveryConfig::new(DATA_PORT);
            config.interval = Duration::from_millis(200);
            let beaconer = Beaconer::bind(config, &[ifindex])?;
            let stats = beaconer.stats();
            let local = NodeKey::from_slice(key.public_key()).context("key")?;
            let start = Instant::now();
            let mut manager = PeerManager::new(PeerConfig::default(), local, start, 1)?;
            manager.enable_discovery(ifindex);
            let (tx, mut rx) = mpsc::channel(64);
            let task = tokio::spawn(beaconer.run(Arc::new(key), tx));
            let mut result = None;
            while start.elapsed() < LIMIT {
                if result.is_some() && found.load(Ordering::SeqCst) >= 2 {
                    break;
                }
                tokio::select! {
                    msg = rx.recv() => {
                        let Some(msg) = msg else { break };
                        let _ = msg.deliver(&mut manager);
                    }
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                while let Some(action) = manager.poll_action() {
                    if let Action::StartLinkHandshake {
                        endpoint,
                        expected_key: Some(k),
                    } = action
                        && k == want
                        && result.is_none()
                    {
                        result = Some((endpoint, start.elapsed()));
                        found.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            drop(rx);
            task.await??;
            let stats = format!(
                "sent {} received {} dropped {}; manager {:?}",
                stats.sent.load(Ordering::Relaxed),
                stats.received.load(Ordering::Relaxed),
                stats.dropped.load(Ordering::Relaxed),
                manager.stats()
            );
            result.with_context(|| format!("peer not discovered within {LIMIT:?} ({stats})"))
        })
    }

    #[test]
    fn peers_discovery_beaconers_find_each_other_over_veth() -> Result<()> {
        let topo = Chain::new(2).tag("disc").build()?;
        let (a, b) = (topo.node(0), topo.node(1));
        let a_if = a.iface_to(1)?.clone();
        let b_if = b.iface_to(0)?.clone();
        let a_ll = link_local(a, &a_if.name)?;
        let b_ll = link_local(b, &b_if.name)?;
        let (ka, kb) = (key_pair(), key_pair());
        let a_key = NodeKey::from_slice(ka.public_key()).context("key")?;
        let b_key = NodeKey::from_slice(kb.public_key()).context("key")?;
        let found = AtomicUsize::new(0);
        let (ra, rb) = std::thread::scope(|s| {
            let ha = s.spawn(|| {
                a.netns()
                    .run_in(|| discover(a_if.ifindex, ka, b_key, &found))
            });
            let hb = s.spawn(|| {
                b.netns()
                    .run_in(|| discover(b_if.ifindex, kb, a_key, &found))
            });
            (ha.join(), hb.join())
        });
        let (Ok(ra), Ok(rb)) = (ra, rb) else {
            bail!("a discovery thread panicked");
        };
        let (a_found, a_time) = ra??;
        let (b_found, b_time) = rb??;
        // a found b at b's link-local address on a's interface, with b's data port.
        assert_eq!(a_found, LinkEndpoint::new(b_ll, DATA_PORT, a_if.ifindex));
        assert_eq!(b_found, LinkEndpoint::new(a_ll, DATA_PORT, b_if.ifindex));
        ensure!(a_found.validate().is_ok() && b_found.validate().is_ok());
        // The first beacons go out at once; allow for one lost to the start-up race.
        ensure!(
            a_time < Duration::from_secs(5) && b_time < Duration::from_secs(5),
            "discovery took {a_time:?} / {b_time:?}"
        );
        eprintln!("discovered in {a_time:?} (a) and {b_time:?} (b)");
        Ok(())
    }
}
