//! Batched UDP I/O on the underlay socket: `recvmmsg`/`sendmmsg` move up to
//! [`BATCH`] datagrams per system call, which is most of what the userspace relay path
//! spends per packet otherwise.
//!
//! Both calls run inside tokio's readiness protocol (`UdpSocket::try_io`), so the socket
//! stays an ordinary tokio socket for everything else.

use std::{
    io,
    mem::MaybeUninit,
    net::{Ipv6Addr, SocketAddr, SocketAddrV6},
    os::fd::AsRawFd,
};

use tokio::{io::Interest, net::UdpSocket};

/// Datagrams per system call.
pub const BATCH: usize = 64;

/// Largest datagram accepted.
pub const MAX_DATAGRAM: usize = 65_535;

/// Reusable receive buffers for one `recvmmsg` call.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    addrs: Vec<libc::sockaddr_in6>,
    lens: Vec<usize>,
    count: usize,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("count", &self.count)
            .finish()
    }
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new(BATCH, MAX_DATAGRAM)
    }
}

fn zeroed_sockaddr() -> libc::sockaddr_in6 {
    // SAFETY: sockaddr_in6 is plain data; all-zero is a valid (unspecified) value.
    unsafe { MaybeUninit::zeroed().assume_init() }
}

impl RecvBatch {
    /// `slots` datagrams of up to `size` bytes each.
    pub fn new(slots: usize, size: usize) -> Self {
        let slots = slots.max(1);
        Self {
            bufs: (0..slots).map(|_| vec![0u8; size]).collect(),
            addrs: vec![zeroed_sockaddr(); slots],
            lens: vec![0; slots],
            count: 0,
        }
    }

    /// Datagrams received by the last call.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the last call received nothing.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Datagram `i` (mutable: relays rewrite the hop limit in place) and its sender, or
    /// `None` when the sender is not an IPv6 endpoint.
    pub fn get_mut(&mut self, i: usize) -> Option<(&mut [u8], SocketAddrV6)> {
        let from = self.sender(i)?;
        let len = self.lens[i];
        Some((&mut self.bufs[i][..len], from))
    }

    /// Datagram `i` and its sender, as [`RecvBatch::get_mut`].
    pub fn get(&self, i: usize) -> Option<(&[u8], SocketAddrV6)> {
        let from = self.sender(i)?;
        Some((&self.bufs[i][..self.lens[i]], from))
    }

    fn sender(&self, i: usize) -> Option<SocketAddrV6> {
        if i >= self.count {
            return None;
        }
        let sa = &self.addrs[i];
        if i32::from(sa.sin6_family) != libc::AF_INET6 {
            return None;
        }
        Some(SocketAddrV6::new(
            Ipv6Addr::from(sa.sin6_addr.s6_addr),
            u16::from_be(sa.sin6_port),
            u32::from_be(sa.sin6_flowinfo),
            sa.sin6_scope_id,
        ))
    }
}

/// Waits for and receives up to a batch of datagrams.
pub async fn recv_batch(socket: &UdpSocket, batch: &mut RecvBatch) -> io::Result<usize> {
    loop {
        socket.readable().await?;
        match socket.try_io(Interest::READABLE, || recvmmsg(socket, batch)) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

fn recvmmsg(socket: &UdpSocket, batch: &mut RecvBatch) -> io::Result<usize> {
    let slots = batch.bufs.len();
    let mut iovecs: Vec<libc::iovec> = batch
        .bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = (0..slots)
        .map(|i| {
            // SAFETY: mmsghdr is plain data; every pointer we need is set below.
            let mut m: libc::mmsghdr = unsafe { MaybeUninit::zeroed().assume_init() };
            m.msg_hdr.msg_name = (&mut batch.addrs[i] as *mut libc::sockaddr_in6).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as u32;
            m.msg_hdr.msg_iov = &mut iovecs[i];
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    // SAFETY: msgs points at `slots` initialised headers whose buffers and address
    // slots stay alive and unaliased for the duration of the call.
    let n = unsafe {
        libc::recvmmsg(
            socket.as_raw_fd(),
            msgs.as_mut_ptr(),
            slots as u32,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        batch.count = 0;
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    for (i, m) in msgs.iter().take(n).enumerate() {
        batch.lens[i] = m.msg_len as usize;
    }
    batch.count = n;
    Ok(n)
}

/// Sends every datagram to its destination, in order, in as few system calls as the
/// kernel allows. Returns the indices of the datagrams that could not be sent: one bad
/// destination (say, an unreachable next hop) is skipped rather than stalling the rest.
pub async fn send_batch(socket: &UdpSocket, datagrams: &[(&[u8], SocketAddr)]) -> Vec<usize> {
    let mut failed = Vec::new();
    let mut next = 0;
    while next < datagrams.len() {
        if socket.writable().await.is_err() {
            failed.extend(next..datagrams.len());
            break;
        }
        match socket.try_io(Interest::WRITABLE, || sendmmsg(socket, &datagrams[next..])) {
            Ok(0) => {
                failed.extend(next..datagrams.len());
                break;
            }
            Ok(n) => next += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            // sendmmsg reports the error of the first datagram it could not send.
            Err(_) => {
                failed.push(next);
                next += 1;
            }
        }
    }
    failed
}

fn sendmmsg(socket: &UdpSocket, datagrams: &[(&[u8], SocketAddr)]) -> io::Result<usize> {
    let count = datagrams.len().min(BATCH);
    let mut addrs: Vec<libc::sockaddr_in6> = Vec::with_capacity(count);
    let mut iovecs: Vec<libc::iovec> = Vec::with_capacity(count);
    for (data, to) in &datagrams[..count] {
        let mut sa = zeroed_sockaddr();
        sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        match to {
            SocketAddr::V6(v6) => {
                sa.sin6_port = v6.port().to_be();
                sa.sin6_addr.s6_addr = v6.ip().octets();
                sa.sin6_scope_id = v6.scope_id();
            }
            SocketAddr::V4(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the Myconet underlay is IPv6-only",
                ));
            }
        }
        addrs.push(sa);
        iovecs.push(libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        });
    }
    let mut msgs: Vec<libc::mmsghdr> = (0..count)
        .map(|i| {
            // SAFETY: plain data; pointers set below.
            let mut m: libc::mmsghdr = unsafe { MaybeUninit::zeroed().assume_init() };
            m.msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in6).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as u32;
            m.msg_hdr.msg_iov = &mut iovecs[i];
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    // SAFETY: msgs points at `count` initialised headers; buffers are only read.
    let n = unsafe {
        libc::sendmmsg(
            socket.as_raw_fd(),
            msgs.as_mut_ptr(),
            count as u32,
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batches_round_trip_on_loopback() {
        let rx = UdpSocket::bind("[::1]:0").await.unwrap();
        let tx = UdpSocket::bind("[::1]:0").await.unwrap();
        let to = rx.local_addr().unwrap();
        let payloads: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; 10 + usize::from(i)]).collect();
        let list: Vec<(&[u8], SocketAddr)> = payloads.iter().map(|p| (&p[..], to)).collect();
        assert!(send_batch(&tx, &list).await.is_empty(), "all 100 sent");
        let mut got = Vec::new();
        let mut batch = RecvBatch::new(16, 2048);
        while got.len() < 100 {
            let n = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                recv_batch(&rx, &mut batch),
            )
            .await
            .expect("datagrams arrive")
            .unwrap();
            assert!(n <= 16);
            for i in 0..n {
                let (data, from) = batch.get_mut(i).unwrap();
                assert_eq!(SocketAddr::V6(from), tx.local_addr().unwrap());
                got.push(data.to_vec());
            }
        }
        assert_eq!(got, payloads, "every datagram, intact and in order");
        assert!(batch.get_mut(batch.len()).is_none());
    }

    #[tokio::test]
    async fn ipv4_destinations_are_refused() {
        let tx = UdpSocket::bind("[::1]:0").await.unwrap();
        let v4: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let ok: SocketAddr = tx.local_addr().unwrap();
        assert_eq!(
            send_batch(&tx, &[(&b"x"[..], v4), (&b"y"[..], ok)]).await,
            vec![0],
            "the IPv4 destination fails alone; the next datagram still goes"
        );
    }
}
