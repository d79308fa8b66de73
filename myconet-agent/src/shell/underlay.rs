//! The agent's underlay UDP socket: everything the XDP program passes up arrives here.
//!
//! Data, handshake and cookie packets for this node go to the end-to-end layer
//! (`overlay`); those for others that the kernel did not relay (handshakes always, data
//! when the next hop's neighbour entry is missing or XDP is unavailable) are relayed here
//! with the XDP program's exact semantics. Control packets belong to the peer layer.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6},
    ops::Range,
    sync::Arc,
};

use std::time::Instant;

use myconet_common::wire::{Packet, PacketType, Repr, field};
use tokio::net::UdpSocket;
use tracing::debug;

use crate::os::batch_io::{self, BATCH, RecvBatch, recv_batch, send_batch, send_gso_batch};
use crate::shell::{
    node::{AgentStat, Node},
    overlay::Overlay,
};
use myconet_core::{
    forward::{Decision, DropReason},
    id::LinkEndpoint,
    pmtu::{self, EgressMtus, TooBigReporter},
    rib::NextHop,
    session::{RateLimitConfig, RateLimiter},
};

/// How many handshake and cookie packets one neighbour may have this node relay: every
/// one goes up to this agent (XDP passes them) and on to the next hop's, so a neighbour
/// must not be able to make relays do that without bound. Generous, because one
/// neighbour can stand for many initiators; the responder limits each of them.
/// Keyed by the neighbour's full address.
pub const RELAY_HANDSHAKE_LIMIT: RateLimitConfig = RateLimitConfig {
    burst: 256,
    per_second: 128,
    max_sources: 4096,
    ipv6_prefix_len: 128,
};

/// Receive buffer of the underlay socket. Data for this node, handshakes and control
/// all queue here, so it must absorb the agent being off the CPU for a while at full
/// rate (at ~3 Gbit/s of 1,400-byte datagrams, each costing ~2.3 KB of buffer, 4 MiB
/// lasted about 7 ms) and a handshake flood on top (every init that XDP passes up
/// queues here before the agent can refuse it): when it overflows, the kernel drops
/// data and TCP backs off. 32 MiB.
const RECEIVE_BUFFER: usize = 32 << 20;

/// Sets the socket's receive buffer to `bytes`: with `SO_RCVBUFFORCE` when the agent
/// may (CAP_NET_ADMIN, which it has to attach XDP), so `net.core.rmem_max` (often
/// 208 KiB) does not silently cap it, else with `SO_RCVBUF` up to that cap.
fn set_receive_buffer(socket: &socket2::Socket, bytes: usize) {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: valid fd, option value points at a live c_int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let _ = socket.set_recv_buffer_size(bytes);
    }
    debug!(
        requested = bytes,
        granted = socket.recv_buffer_size().unwrap_or(0),
        "underlay receive buffer"
    );
}

/// Binds the IPv6-only underlay socket on `[::]:port`.
pub fn bind(port: u16) -> std::io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV6,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_only_v6(true)?;
    // Only multicast groups this socket joins: with the Linux default, datagrams sent to
    // ff02::1 on our port would reach every relay on the link and be relayed N times.
    const IPV6_MULTICAST_ALL: libc::c_int = 29;
    let off: libc::c_int = 0;
    // SAFETY: valid fd, option value points at a live c_int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::IPPROTO_IPV6,
            IPV6_MULTICAST_ALL,
            (&off as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.set_nonblocking(true)?;
    set_receive_buffer(&socket, RECEIVE_BUFFER);
    // Runs of datagrams from one sender arrive as one buffer; `run` splits them.
    batch_io::log_offloads(&batch_io::enable_gro(&socket));
    let addr = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Receives and handles datagrams until the task is cancelled; what is for this node
/// goes to `overlay`. Datagrams arrive in batches (`recvmmsg`, each slot possibly a
/// `UDP_GRO` run of several datagrams, split here so every datagram gets its own
/// decision); data for this node is opened and delivered a batch at a time; relayed
/// ones are rewritten in place and sent in batches (`sendmmsg`, runs for one next hop
/// with `UDP_SEGMENT` at the size they arrived with), one wire packet per datagram as
/// before.
pub async fn run(node: Arc<Node>, socket: Arc<UdpSocket>, overlay: Arc<Overlay>) {
    let mut batch = RecvBatch::default();
    let mut relays: Vec<(usize, Range<usize>, Relay)> = Vec::with_capacity(BATCH);
    let mut local: Vec<(usize, Range<usize>, SocketAddrV6)> = Vec::with_capacity(BATCH);
    let mut scratch = overlay.rx_scratch();
    // A constant, checked by `relay_handshake_limit_is_valid`.
    let mut relay_limiter =
        RateLimiter::new(RELAY_HANDSHAKE_LIMIT).expect("RELAY_HANDSHAKE_LIMIT is valid");
    let mut mtu = RelayMtu::default();
    loop {
        let n = match recv_batch(&socket, &mut batch).await {
            Ok(n) => n,
            Err(e) => {
                // ICMP errors surface here as ECONNREFUSED etc.; keep serving.
                debug!(error = %e, "underlay receive error");
                continue;
            }
        };
        relays.clear();
        local.clear();
        // One clock read per batch for the egress MTU cache, not one per packet.
        mtu.now = Instant::now();
        for i in 0..n {
            let segment = batch.segment_size(i);
            let Some((buf, from)) = batch.get_mut(i) else {
                continue;
            };
            for range in batch_io::segments(buf.len(), segment) {
                let Some(datagram) = buf.get_mut(range.clone()) else {
                    continue;
                };
                match handle(
                    &node,
                    &overlay,
                    &mut relay_limiter,
                    &mut mtu,
                    datagram,
                    from,
                )
                .await
                {
                    Action::Relay(relay) => relays.push((i, range, relay)),
                    Action::Deliver => local.push((i, range, from)),
                    Action::Done => {}
                }
            }
        }
        if !local.is_empty() {
            overlay
                .deliver_datagrams(&mut batch, &local, &mut scratch)
                .await;
        }
        mtu.send_reports(&node, &socket).await;
        if relays.is_empty() {
            continue;
        }
        let out: Vec<(&[u8], SocketAddr)> = relays
            .iter()
            .filter_map(|(i, range, r)| Some((batch.get(*i)?.0.get(range.clone())?, r.to)))
            .collect();
        let failed = send_gso_batch(&socket, &out).await;
        for (i, ((datagram, to), (_, _, relay))) in out.iter().zip(&relays).enumerate() {
            let stat = if failed.contains(&i) {
                debug!(%to, "userspace relay send failed");
                AgentStat::TxError
            } else {
                relay.stat
            };
            node.count(stat, datagram.len());
        }
    }
}

/// What [`handle`] decided for one datagram.
enum Action {
    /// Relay it (already rewritten).
    Relay(Relay),
    /// A `Data` packet for this node: open it with the rest of the batch.
    Deliver,
    /// Handled (handshake, control) or dropped and counted.
    Done,
}

/// A datagram to relay: where to, and what to count once it is sent.
struct Relay {
    to: SocketAddr,
    stat: AgentStat,
}

/// Handles one datagram; returns where to relay it (already rewritten) if it is to be
/// relayed, or that it is data for this node.
async fn handle(
    node: &Node,
    overlay: &Overlay,
    relay_limiter: &mut RateLimiter,
    mtu: &mut RelayMtu,
    datagram: &mut [u8],
    from: SocketAddrV6,
) -> Action {
    let len = datagram.len();
    let header = match Repr::parse(&Packet::new_unchecked(&*datagram)) {
        Ok(h) => h,
        Err(e) => {
            debug!(%from, error = %e, "malformed datagram");
            node.count(AgentStat::RxMalformed, len);
            return Action::Done;
        }
    };
    let is_data = header.packet_type == PacketType::Data;
    match header.packet_type {
        PacketType::Control => {
            // Link-level: opened (or refused) under the neighbour's link session.
            node.count(AgentStat::RxControl, len);
            overlay.on_datagram(SocketAddr::V6(from), datagram).await;
            return Action::Done;
        }
        PacketType::Data => node.count(AgentStat::RxData, len),
        _ => {}
    }
    match node.decide(LinkEndpoint::from(from), &header) {
        Decision::Deliver if header.packet_type == PacketType::TooBig => {
            overlay.on_too_big(datagram);
            Action::Done
        }
        Decision::Deliver => {
            if is_data {
                return Action::Deliver;
            }
            node.count(AgentStat::RxHandshake, len);
            overlay.on_datagram(SocketAddr::V6(from), datagram).await;
            Action::Done
        }
        Decision::Forward { .. }
            if !is_data && !relay_limiter.allow(IpAddr::V6(*from.ip()), Instant::now()) =>
        {
            node.count(AgentStat::RxHandshakeRelayLimited, len);
            Action::Done
        }
        Decision::Forward { next_hop, .. } if is_data && mtu.exceeds(node, datagram, next_hop) => {
            Action::Done
        }
        Decision::Forward {
            next_hop,
            hop_limit,
        } => {
            datagram[field::HOP_LIMIT] = hop_limit;
            Action::Relay(Relay {
                to: SocketAddr::V6(next_hop.socket_addr()),
                stat: if is_data {
                    AgentStat::RxDataRelayed
                } else {
                    AgentStat::RxHandshakeRelayed
                },
            })
        }
        Decision::Drop(_) if !is_data => {
            node.count(AgentStat::RxHandshakeDropped, len);
            Action::Done
        }
        Decision::Drop(reason) => {
            node.count(
                match reason {
                    DropReason::UnknownPeer => AgentStat::RxDataUnknownPeer,
                    DropReason::NoRoute => AgentStat::RxDataNoRoute,
                    DropReason::HopLimit => AgentStat::RxDataHopLimit,
                    DropReason::NotRelayable => AgentStat::RxMalformed,
                },
                len,
            );
            Action::Done
        }
    }
}

/// The relay's path-MTU duties (`pmtu`): a data packet larger than its next link takes
/// is dropped, never handed to the kernel to fragment or refuse, and its source gets a
/// signed too-big report within the reporter's rates.
struct RelayMtu {
    egress: EgressMtus<NextHop>,
    reporter: TooBigReporter,
    /// Reports to send after the batch, with the next hop towards their destination.
    reports: Vec<(Vec<u8>, SocketAddr)>,
    /// When the current receive batch arrived.
    now: Instant,
}

impl Default for RelayMtu {
    fn default() -> Self {
        Self {
            egress: EgressMtus::default(),
            reporter: TooBigReporter::default(),
            reports: Vec::new(),
            now: Instant::now(),
        }
    }
}

impl RelayMtu {
    /// Whether `datagram`, a data packet to relay to `next_hop`, exceeds the path to
    /// it; if so it is counted and a report for its source is queued.
    fn exceeds(&mut self, node: &Node, datagram: &[u8], next_hop: NextHop) -> bool {
        let now = self.now;
        let len = datagram.len();
        if len <= pmtu::ALWAYS_FITS {
            return false;
        }
        let Some(mtu) = self
            .egress
            .get(next_hop, now, || crate::os::next_hop::path_mtu(&next_hop))
        else {
            return false;
        };
        if len + pmtu::OUTER_HEADERS <= mtu as usize {
            return false;
        }
        node.count(AgentStat::RxDataTooBig, len);
        let identity = node.identity();
        match self
            .reporter
            .report(identity, identity.node_address(), datagram, mtu, now)
        {
            Ok(report) => {
                let source = Packet::new_unchecked(datagram).src_addr();
                match node.next_hop_for(source) {
                    Some(back) => self
                        .reports
                        .push((report, SocketAddr::V6(back.socket_addr()))),
                    None => node.count(AgentStat::TxNoRoute, report.len()),
                }
            }
            Err(e) => {
                node.count(AgentStat::TooBigSuppressed, len);
                debug!(error = %e, next_hop = %next_hop.socket_addr(), mtu, "oversized packet not reported");
            }
        }
        true
    }

    /// Sends the queued reports.
    async fn send_reports(&mut self, node: &Node, socket: &UdpSocket) {
        if self.reports.is_empty() {
            return;
        }
        let out: Vec<(&[u8], SocketAddr)> = self
            .reports
            .iter()
            .map(|(report, to)| (report.as_slice(), *to))
            .collect();
        let failed = send_batch(socket, &out).await;
        for (i, (report, to)) in out.iter().enumerate() {
            if failed.contains(&i) {
                debug!(%to, "too-big report send failed");
                node.count(AgentStat::TxError, report.len());
            } else {
                node.count(AgentStat::TooBigSent, report.len());
            }
        }
        self.reports.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_handshake_limit_is_valid() {
        assert!(RELAY_HANDSHAKE_LIMIT.validate().is_ok());
    }
}
