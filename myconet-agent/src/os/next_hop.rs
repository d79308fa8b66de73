//! What the kernel's routing table says about a next hop: the source address it would
//! pick and the path MTU it knows, asked of a connected UDP socket (which sends
//! nothing). The OS side of [`myconet_core::rib::NextHop`].

use std::net::Ipv6Addr;

use myconet_core::rib::NextHop;

/// The source address the kernel picks for packets to this next hop (a connected
/// UDP socket sends nothing; it only asks the routing table), or `None` when there
/// is no route to it yet.
pub fn underlay_source(next_hop: &NextHop) -> Option<Ipv6Addr> {
    let socket = std::net::UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).ok()?;
    socket.connect(next_hop.socket_addr()).ok()?;
    match socket.local_addr().ok()? {
        std::net::SocketAddr::V6(a) if !a.ip().is_unspecified() => Some(*a.ip()),
        _ => None,
    }
}

/// The largest IPv6 packet the kernel sends towards this next hop now: its route's
/// MTU, lowered by what underlay routers reported (asked of a connected UDP socket,
/// `IPV6_MTU`), or `None` when there is no route to it.
pub fn path_mtu(next_hop: &NextHop) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let socket = std::net::UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).ok()?;
    socket.connect(next_hop.socket_addr()).ok()?;
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid fd; `mtu` and `len` are live and sized as the kernel expects.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU,
            (&mut mtu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    u32::try_from(mtu).ok().filter(|m| *m > 0)
}
