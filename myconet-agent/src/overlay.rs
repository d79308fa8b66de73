//! The end-to-end shell around the sans-IO [`SessionTable`]: overlay IPv6 packets from
//! the TUN device are sealed for their destination node and sent towards it; datagrams
//! for this node are opened and written to the TUN device.
//!
//! Relays never get here for traffic that is not theirs: the XDP program (or
//! `forward::decide` on the userspace path) relays it without touching sessions.

use std::{
    net::{Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use myconet_common::addr::{self, NODE_PREFIX_LEN};
use ring::rand::SystemRandom;
use tokio::{net::UdpSocket, sync::Notify};
use tracing::{debug, info, warn};

use crate::{
    link::Links,
    node::{AgentStat, Node},
    session::{Config, Event, Inbound, InboundError, SessionTable, Suite, Transmit},
    tun::Tun,
};

/// Largest packet read from the TUN device.
const MAX_PACKET: usize = 65_535;

/// The node's end-to-end endpoint.
pub struct Overlay {
    node: Arc<Node>,
    socket: Arc<UdpSocket>,
    sessions: Mutex<SessionTable>,
    tun: Option<Tun>,
    links: Arc<Links>,
    rng: SystemRandom,
    timers: Notify,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("tun", &self.tun.as_ref().map(Tun::name))
            .finish_non_exhaustive()
    }
}

/// Session settings for this machine: AES-256-GCM first where the CPU has AES
/// instructions (about 3× faster than ChaCha20-Poly1305 here), ChaCha20-Poly1305 first
/// elsewhere. The responder honours the initiator's order among suites it allows.
pub fn session_config() -> Config {
    let aes_hw = {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("aes")
                && std::arch::is_x86_feature_detected!("pclmulqdq")
        }
        #[cfg(target_arch = "aarch64")]
        {
            std::arch::is_aarch64_feature_detected!("aes")
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            false
        }
    };
    Config {
        suites: if aes_hw {
            vec![Suite::Aes256Gcm, Suite::ChaCha20Poly1305]
        } else {
            vec![Suite::ChaCha20Poly1305, Suite::Aes256Gcm]
        },
        ..Config::default()
    }
}

impl Overlay {
    /// Builds the endpoint; `tun` is `None` on nodes that only relay. `links` is the
    /// neighbour layer whose link sessions live in this endpoint's session table.
    pub fn new(
        node: Arc<Node>,
        socket: Arc<UdpSocket>,
        tun: Option<Tun>,
        links: Arc<Links>,
        config: Config,
    ) -> anyhow::Result<Self> {
        let sessions = SessionTable::new(node.identity_arc(), config, Instant::now())?;
        Ok(Self {
            node,
            socket,
            sessions: Mutex::new(sessions),
            tun,
            links,
            rng: SystemRandom::new(),
            timers: Notify::new(),
        })
    }

    fn sessions(&self) -> MutexGuard<'_, SessionTable> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The neighbour layer.
    pub fn links(&self) -> &Arc<Links> {
        &self.links
    }

    /// Handles a data, control, handshake or cookie datagram addressed to this node.
    pub async fn on_datagram(&self, from: SocketAddr, datagram: &[u8]) {
        let (delivered, transmits) = {
            let mut st = self.sessions();
            let now = Instant::now();
            let result = st.handle_datagram(from, datagram, now, &self.rng);
            let delivered = match result {
                Ok(Inbound::Data { remote, payload }) => Some((remote, payload)),
                Ok(Inbound::Control {
                    endpoint, payload, ..
                }) => {
                    self.links.on_control(endpoint, &payload, now);
                    None
                }
                Ok(Inbound::Keepalive { .. }) | Ok(Inbound::Handshake(_)) => None,
                Err(e) => {
                    self.node.count(stat_for(&e), datagram.len());
                    debug!(%from, error = %e, "datagram rejected");
                    None
                }
            };
            (delivered, self.drain(&mut st))
        };
        self.timers.notify_one();
        if let Some((remote, payload)) = delivered {
            self.deliver(remote, &payload).await;
        }
        self.send_all(transmits).await;
    }

    /// Writes a decrypted packet to the TUN device after checking it really comes from
    /// the authenticated remote's /64 and is for this node: a peer may only speak for
    /// addresses its key owns.
    async fn deliver(&self, remote: Ipv6Addr, packet: &[u8]) {
        let Some(tun) = &self.tun else {
            self.node.count(AgentStat::RxDataLocal, packet.len());
            return;
        };
        let Some((src, dst)) = ipv6_addrs(packet) else {
            self.node.count(AgentStat::RxInnerInvalid, packet.len());
            return;
        };
        let local = self.node.node_prefix();
        if !addr::prefix_contains(remote, NODE_PREFIX_LEN, src) || !local.contains(dst) {
            self.node.count(AgentStat::RxInnerInvalid, packet.len());
            debug!(%remote, %src, %dst, "inner addresses do not match the session");
            return;
        }
        match tun.send(packet).await {
            Ok(_) => self.node.count(AgentStat::RxDataLocal, packet.len()),
            Err(e) => {
                self.node.count(AgentStat::TxError, packet.len());
                debug!(error = %e, "TUN write failed");
            }
        }
    }

    /// Reads the TUN device until the task is cancelled.
    pub async fn run_tun(self: Arc<Self>) {
        let Some(tun) = &self.tun else {
            return;
        };
        let mut buf = vec![0u8; MAX_PACKET];
        loop {
            let n = match tun.recv(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    warn!(error = %e, "TUN read failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            self.on_tun_packet(&buf[..n]).await;
        }
    }

    /// Seals one outbound overlay packet for its destination.
    pub async fn on_tun_packet(&self, packet: &[u8]) {
        self.node.count(AgentStat::TunRx, packet.len());
        let Some((_, dst)) = ipv6_addrs(packet) else {
            self.node.count(AgentStat::TunDropped, packet.len());
            return;
        };
        if !addr::is_overlay(&dst) || self.node.node_prefix().contains(dst) {
            self.node.count(AgentStat::TunDropped, packet.len());
            return;
        }
        let transmits = {
            let mut st = self.sessions();
            if let Err(e) = st.send(dst, packet.to_vec(), Instant::now(), &self.rng) {
                debug!(%dst, error = %e, "cannot send");
                self.node.count(AgentStat::TunDropped, packet.len());
            }
            self.drain(&mut st)
        };
        self.timers.notify_one();
        self.send_all(transmits).await;
    }

    /// Drives retransmissions, rekeys, keepalives, expiry and the neighbour layer's
    /// hellos and retries until cancelled.
    pub async fn run_timers(self: Arc<Self>) {
        loop {
            let deadline = {
                let sessions = self.sessions().poll_timeout();
                let links = self.links.poll_timeout();
                sessions.into_iter().chain(links).min()
            };
            let notified = self.timers.notified();
            let kicked = self.links.kicked();
            match deadline {
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
                        _ = notified => continue,
                        // A peer was added or removed: apply its actions now.
                        _ = kicked => {}
                    }
                }
                None => {
                    tokio::select! {
                        _ = notified => continue,
                        _ = kicked => {}
                    }
                }
            }
            let transmits = {
                let mut st = self.sessions();
                let now = Instant::now();
                st.handle_timeout(now);
                self.links.handle_timeout(now);
                self.drain(&mut st)
            };
            self.send_all(transmits).await;
        }
    }

    /// Passes session events to the neighbour layer and applies its actions until both
    /// settle, then takes every pending transmit.
    fn drain(&self, st: &mut SessionTable) -> Vec<Transmit> {
        let now = Instant::now();
        // Each round either consumes events or actions; a bound keeps a bug from spinning.
        for _ in 0..64 {
            let mut events = 0;
            while let Some(event) = st.poll_event() {
                events += 1;
                self.log_event(&event);
                self.links.on_session_event(&event, now);
            }
            if self.links.apply_actions(st, now, &self.rng) == 0 && events == 0 {
                break;
            }
        }
        std::iter::from_fn(|| st.poll_transmit()).collect()
    }

    fn log_event(&self, event: &Event) {
        match event {
            Event::Established {
                remote,
                role,
                local_index,
                link,
                ..
            } => info!(%remote, ?role, local_index, ?link, "session established"),
            Event::Failed {
                remote,
                reason,
                dropped,
                link,
            } => {
                warn!(%remote, ?link, ?reason, dropped, "handshake failed");
                self.node.count(AgentStat::HandshakeFailed, 0);
            }
            Event::Expired {
                remote,
                reason,
                link,
                ..
            } => debug!(%remote, ?link, ?reason, "session expired"),
        }
    }

    async fn send_all(&self, transmits: Vec<Transmit>) {
        for t in transmits {
            let to = match t.underlay {
                Some(to) => to,
                None => match self.node.next_hop_for(t.destination) {
                    Some(nh) => SocketAddr::V6(nh.socket_addr()),
                    None => {
                        self.node.count(AgentStat::TxNoRoute, t.datagram.len());
                        continue;
                    }
                },
            };
            if let Err(e) = self.socket.send_to(&t.datagram, to).await {
                self.node.count(AgentStat::TxError, t.datagram.len());
                debug!(%to, error = %e, "send failed");
            }
        }
    }
}

fn stat_for(e: &InboundError) -> AgentStat {
    match e {
        InboundError::Open(_) => AgentStat::RxOpenFailed,
        InboundError::UnknownIndex(_) => AgentStat::RxUnknownSession,
        InboundError::RateLimited(_) => AgentStat::HandshakeRateLimited,
        InboundError::Handshake(_) => AgentStat::HandshakeRejected,
        _ => AgentStat::RxMalformed,
    }
}

/// Source and destination of an IPv6 packet, or `None` if it is not one.
fn ipv6_addrs(packet: &[u8]) -> Option<(Ipv6Addr, Ipv6Addr)> {
    if packet.len() < 40 || packet[0] >> 4 != 6 {
        return None;
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&packet[8..24]);
    dst.copy_from_slice(&packet[24..40]);
    Some((Ipv6Addr::from(src), Ipv6Addr::from(dst)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inner_addresses_are_read_only_from_ipv6() {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[8] = 0xfd;
        p[24] = 0xfd;
        let (s, d) = ipv6_addrs(&p).unwrap();
        assert_eq!(s.octets()[0], 0xfd);
        assert_eq!(d.octets()[0], 0xfd);
        p[0] = 0x45;
        assert!(ipv6_addrs(&p).is_none());
        assert!(ipv6_addrs(&p[..39]).is_none());
    }
}
