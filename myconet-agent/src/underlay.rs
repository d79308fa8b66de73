//! The agent's underlay UDP socket: everything the XDP program passes up arrives here.
//!
//! Data, handshake and cookie packets for this node go to the end-to-end layer
//! (`overlay`); those for others that the kernel did not relay (handshakes always, data
//! when the next hop's neighbour entry is missing or XDP is unavailable) are relayed here
//! with the XDP program's exact semantics. Control packets belong to the peer layer.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6},
    sync::Arc,
};

use myconet_common::wire::{Packet, PacketType, Repr, field};
use tokio::net::UdpSocket;
use tracing::{debug, warn};

use crate::{
    forward::{Decision, DropReason},
    node::{AgentStat, Node},
    overlay::Overlay,
};

/// Largest datagram the agent accepts.
const MAX_DATAGRAM: usize = 65_535;

/// Binds the IPv6-only underlay socket on `[::]:port`.
pub fn bind(port: u16) -> std::io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV6,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_only_v6(true)?;
    socket.set_nonblocking(true)?;
    // Room for bursts while the fast path is cold.
    let _ = socket.set_recv_buffer_size(4 << 20);
    let addr = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Receives and handles datagrams until the task is cancelled; what is for this node
/// goes to `overlay`.
pub async fn run(node: Arc<Node>, socket: Arc<UdpSocket>, overlay: Arc<Overlay>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (len, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors surface here as ECONNREFUSED etc.; keep serving.
                debug!(error = %e, "underlay receive error");
                continue;
            }
        };
        let IpAddr::V6(from_addr) = from.ip() else {
            continue;
        };
        handle(
            &node,
            &socket,
            &overlay,
            &mut buf[..len],
            from,
            (from_addr, from.port()),
        )
        .await;
    }
}

async fn handle(
    node: &Node,
    socket: &UdpSocket,
    overlay: &Overlay,
    datagram: &mut [u8],
    from_sa: SocketAddr,
    from: (Ipv6Addr, u16),
) {
    let len = datagram.len();
    let header = match Repr::parse(&Packet::new_unchecked(&*datagram)) {
        Ok(h) => h,
        Err(e) => {
            debug!(?from, error = %e, "malformed datagram");
            node.count(AgentStat::RxMalformed, len);
            return;
        }
    };
    let is_data = header.packet_type == PacketType::Data;
    match header.packet_type {
        PacketType::Control => {
            node.count(AgentStat::RxControl, len);
            return;
        }
        PacketType::Data => node.count(AgentStat::RxData, len),
        _ => {}
    }
    match node.decide(from, &header) {
        Decision::Deliver => {
            if !is_data {
                node.count(AgentStat::RxHandshake, len);
            }
            overlay.on_datagram(from_sa, datagram).await;
        }
        Decision::Forward {
            next_hop,
            hop_limit,
        } => {
            datagram[field::HOP_LIMIT] = hop_limit;
            match socket.send_to(datagram, next_hop.socket_addr()).await {
                Ok(_) if is_data => node.count(AgentStat::RxDataRelayed, len),
                Ok(_) => node.count(AgentStat::RxHandshakeRelayed, len),
                Err(e) => {
                    warn!(next_hop = %next_hop.addr, error = %e, "userspace relay send failed");
                    node.count(AgentStat::TxError, len);
                }
            }
        }
        Decision::Drop(_) if !is_data => node.count(AgentStat::RxHandshakeDropped, len),
        Decision::Drop(reason) => node.count(
            match reason {
                DropReason::UnknownPeer => AgentStat::RxDataUnknownPeer,
                DropReason::NoRoute => AgentStat::RxDataNoRoute,
                DropReason::HopLimit => AgentStat::RxDataHopLimit,
                DropReason::NotRelayable => AgentStat::RxMalformed,
            },
            len,
        ),
    }
}
