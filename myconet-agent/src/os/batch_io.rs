//! Batched UDP I/O on the underlay socket: `recvmmsg`/`sendmmsg` move up to
//! [`BATCH`] datagrams per system call, which is most of what the userspace relay path
//! spends per packet otherwise.
//!
//! On top of that, UDP segmentation offloads: with `UDP_GRO` on the socket the kernel
//! hands over runs of same-sized datagrams of one sender as one buffer plus a segment
//! size ([`RecvBatch::segment_size`], split with [`segments`]), and [`send_gso_batch`]
//! sends runs of same-sized datagrams to one destination as one message with a
//! `UDP_SEGMENT` size, so the stack below the socket runs once per run, not per
//! datagram. On the wire nothing changes: every datagram is still its own packet, so
//! relays (XDP or userspace) see exactly what they saw before.
//!
//! Both calls run inside tokio's readiness protocol (`UdpSocket::try_io`), so the socket
//! stays an ordinary tokio socket for everything else.

use std::{
    io,
    mem::MaybeUninit,
    net::{Ipv6Addr, SocketAddr, SocketAddrV6},
    ops::Range,
    os::fd::AsRawFd,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use tokio::{io::Interest, net::UdpSocket};
use tracing::{info, warn};

/// Datagrams per system call.
pub const BATCH: usize = 64;

/// Largest datagram accepted.
pub const MAX_DATAGRAM: usize = 65_535;

/// `setsockopt` level and options of UDP segmentation offload (`linux/udp.h`); spelled
/// out because not every libc target exports them.
const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

/// Most segments one `UDP_SEGMENT` send may carry (`UDP_MAX_SEGMENTS` before Linux 6.9,
/// which raised it to 128).
pub const MAX_GSO_SEGMENTS: usize = 64;

/// Most bytes of payload one `UDP_SEGMENT` send may carry: what fits one UDP length
/// field (65535 minus the 8-byte UDP header).
pub const MAX_GSO_BYTES: usize = u16::MAX as usize - 8;

/// Room for one `cmsghdr` with a 4-byte value, 8-byte aligned (`CMSG_SPACE(4)` is 24 on
/// 64-bit Linux; 32 leaves slack on every ABI).
type CmsgBuf = [u64; 4];

/// Room for what a send may carry: a `UDP_SEGMENT` size (`CMSG_SPACE(2)`, 24 bytes) and
/// an `IPV6_PKTINFO` (`CMSG_SPACE(20)`, 40 bytes), 8-byte aligned.
type SendCmsgBuf = [u64; 8];

/// Reusable receive buffers for one `recvmmsg` call.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    addrs: Vec<libc::sockaddr_in6>,
    lens: Vec<usize>,
    /// `UDP_GRO` segment size per slot, 0 when the slot holds one datagram.
    segs: Vec<usize>,
    ctrl: Vec<CmsgBuf>,
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
            segs: vec![0; slots],
            ctrl: vec![[0; 4]; slots],
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

    /// The `UDP_GRO` segment size of slot `i` when it holds several datagrams coalesced
    /// by the kernel (see [`segments`]), `None` when it holds one.
    pub fn segment_size(&self, i: usize) -> Option<usize> {
        if i >= self.count {
            return None;
        }
        let seg = self.segs[i];
        (seg > 0 && seg < self.lens[i]).then_some(seg)
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
            m.msg_hdr.msg_control = batch.ctrl[i].as_mut_ptr().cast();
            m.msg_hdr.msg_controllen = std::mem::size_of::<CmsgBuf>() as _;
            m
        })
        .collect();
    // SAFETY: msgs points at `slots` initialised headers whose buffers, address and
    // control slots stay alive and unaliased for the duration of the call.
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
        batch.segs[i] = gro_segment_size(&m.msg_hdr);
    }
    batch.count = n;
    Ok(n)
}

/// The `UDP_GRO` segment size in a received message's control data, 0 if there is none.
fn gro_segment_size(hdr: &libc::msghdr) -> usize {
    // SAFETY: the kernel filled `msg_control` with `msg_controllen` bytes of cmsgs; the
    // CMSG_* helpers stay within them, and the value is read unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
                let value = libc::CMSG_DATA(cmsg).cast::<libc::c_int>().read_unaligned();
                return usize::try_from(value).unwrap_or(0);
            }
            cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
        }
    }
    0
}

/// Where each datagram lies in a buffer of `len` bytes received with `UDP_GRO` segment
/// size `segment` (`None`: one datagram): consecutive `segment`-byte pieces, the last
/// possibly shorter, which is how the kernel coalesces them.
pub fn segments(len: usize, segment: Option<usize>) -> impl Iterator<Item = Range<usize>> {
    let step = match segment {
        Some(s) if s > 0 => s,
        _ => len.max(1),
    };
    (0..len)
        .step_by(step)
        .map(move |start| start..(start + step).min(len))
}

/// Turns on `UDP_GRO` for `socket`, so runs of datagrams arrive as one buffer (see
/// [`RecvBatch::segment_size`]). Fails on kernels without it (before 5.0); the socket
/// then keeps receiving datagram by datagram.
pub fn enable_gro(socket: &impl AsRawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: valid fd; the option value points at a live c_int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            SOL_UDP,
            UDP_GRO,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `UDP_SEGMENT` sends are still tried; cleared for the process the first time
/// the kernel refuses one (old kernel, or a route whose device cannot do it).
static GSO_ENABLED: AtomicBool = AtomicBool::new(true);

/// Runs of datagrams that had to be re-sent one by one because the kernel refused GSO.
static GSO_FALLBACKS: AtomicU64 = AtomicU64::new(0);

/// How many times a GSO send was refused and its datagrams re-sent one by one.
pub fn gso_fallbacks() -> u64 {
    GSO_FALLBACKS.load(Ordering::Relaxed)
}

/// Whether `UDP_SEGMENT` sends are in use (false after the kernel refused one).
pub fn gso_enabled() -> bool {
    GSO_ENABLED.load(Ordering::Relaxed)
}

/// Groups `datagrams` (length and destination, in sending order) into runs one
/// `UDP_SEGMENT` message can carry: consecutive, same destination, every member as long
/// as the first except the last, which may be shorter (and then ends the run), at most
/// `max_segments` members and [`MAX_GSO_BYTES`] bytes. Order is kept, so datagrams of
/// one flow never overtake each other.
pub fn plan_gso(datagrams: &[(usize, SocketAddr)], max_segments: usize) -> Vec<Range<usize>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    let mut start = 0;
    while start < datagrams.len() {
        let (size, to) = datagrams[start];
        let mut end = start + 1;
        let mut bytes = size;
        if size > 0 {
            while end < datagrams.len() && end - start < max_segments {
                let (len, dest) = datagrams[end];
                if dest != to || len > size || len == 0 || bytes + len > MAX_GSO_BYTES {
                    break;
                }
                bytes += len;
                end += 1;
                if len < size {
                    break;
                }
            }
        }
        runs.push(start..end);
        start = end;
    }
    runs
}

/// Sends every datagram to its destination, in order, like [`send_batch`], but each run
/// of [`plan_gso`] as one `UDP_SEGMENT` message (all of them in one `sendmmsg` where
/// possible). If the kernel refuses GSO (`EIO`, `EINVAL`: old kernel, unsupported
/// route), the run is re-sent datagram by datagram, GSO is switched off for the process
/// (logged once) and counted ([`gso_fallbacks`]). Returns the indices of datagrams that
/// could not be sent.
pub async fn send_gso_batch(socket: &UdpSocket, datagrams: &[(&[u8], SocketAddr)]) -> Vec<usize> {
    if datagrams.len() < 2 || !gso_enabled() {
        return send_batch(socket, datagrams).await;
    }
    let shape: Vec<(usize, SocketAddr)> = datagrams.iter().map(|(d, to)| (d.len(), *to)).collect();
    let runs = plan_gso(&shape, MAX_GSO_SEGMENTS);
    if runs.len() == datagrams.len() {
        return send_batch(socket, datagrams).await;
    }
    let mut failed = Vec::new();
    let mut next = 0;
    while next < runs.len() {
        if socket.writable().await.is_err() {
            failed.extend(runs[next].start..datagrams.len());
            break;
        }
        match socket.try_io(Interest::WRITABLE, || {
            sendmmsg_gso(socket, datagrams, &runs[next..])
        }) {
            Ok(0) => {
                failed.extend(runs[next].start..datagrams.len());
                break;
            }
            Ok(n) => next += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e)
                if runs[next].len() > 1
                    && matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EINVAL)) =>
            {
                GSO_FALLBACKS.fetch_add(1, Ordering::Relaxed);
                if GSO_ENABLED.swap(false, Ordering::Relaxed) {
                    warn!(error = %e, "the kernel refused a UDP GSO send: sending datagram by datagram from now on");
                }
                let rest = runs[next].start;
                failed.extend(
                    send_batch(socket, &datagrams[rest..])
                        .await
                        .into_iter()
                        .map(|i| i + rest),
                );
                return failed;
            }
            // sendmmsg reports the error of the first message it could not send.
            Err(_) => {
                failed.extend(runs[next].clone());
                next += 1;
            }
        }
    }
    failed
}

/// One `sendmmsg` of up to [`BATCH`] runs, each a message with one iovec per datagram
/// and a `UDP_SEGMENT` control message when it has more than one.
fn sendmmsg_gso(
    socket: &UdpSocket,
    datagrams: &[(&[u8], SocketAddr)],
    runs: &[Range<usize>],
) -> io::Result<usize> {
    let runs = &runs[..runs.len().min(BATCH)];
    let mut addrs: Vec<libc::sockaddr_in6> = Vec::with_capacity(runs.len());
    let mut ctrl: Vec<SendCmsgBuf> = vec![[0; 8]; runs.len()];
    let iovecs: Vec<libc::iovec> = runs
        .iter()
        .flat_map(|r| datagrams[r.clone()].iter())
        .map(|(data, _)| libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        })
        .collect();
    for r in runs {
        addrs.push(sockaddr(&datagrams[r.start].1)?);
    }
    let mut msgs: Vec<libc::mmsghdr> = Vec::with_capacity(runs.len());
    let mut iov_at = 0;
    for (i, r) in runs.iter().enumerate() {
        // SAFETY: plain data; pointers set below.
        let mut m: libc::mmsghdr = unsafe { MaybeUninit::zeroed().assume_init() };
        m.msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in6).cast();
        m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as u32;
        m.msg_hdr.msg_iov = iovecs[iov_at..].as_ptr() as *mut libc::iovec;
        m.msg_hdr.msg_iovlen = r.len() as _;
        iov_at += r.len();
        let segment = (r.len() > 1).then(|| datagrams[r.start].0.len() as u16);
        set_send_cmsgs(&mut m.msg_hdr, &mut ctrl[i], segment, &datagrams[r.start].1);
        msgs.push(m);
    }
    // SAFETY: every header points at live iovecs, addresses and control buffers that
    // outlive the call; the datagrams are only read.
    let n = unsafe {
        libc::sendmmsg(
            socket.as_raw_fd(),
            msgs.as_mut_ptr(),
            msgs.len() as u32,
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The interface a datagram to `to` must leave by, when the kernel would not honour
/// it from the address alone: a non-zero scope id on an address that needs no scope
/// (global, ULA). For link-local destinations `sin6_scope_id` already binds the
/// interface; for the others the kernel ignores it, so a route's egress interface is
/// passed as `IPV6_PKTINFO` instead, which is what the XDP program's FIB lookup with
/// the route's interface does too.
fn pktinfo_ifindex(to: &SocketAddr) -> Option<u32> {
    match to {
        SocketAddr::V6(v6) if v6.scope_id() != 0 && !v6.ip().is_unicast_link_local() => {
            Some(v6.scope_id())
        }
        _ => None,
    }
}

/// Fills `buf` with the control messages of one send (a `UDP_SEGMENT` size, an
/// `IPV6_PKTINFO` egress interface, either or both) and points `hdr` at them; leaves
/// `hdr` without control data when there is none.
fn set_send_cmsgs(
    hdr: &mut libc::msghdr,
    buf: &mut SendCmsgBuf,
    segment: Option<u16>,
    to: &SocketAddr,
) {
    let ifindex = pktinfo_ifindex(to);
    // SAFETY: CMSG_SPACE of both values (24 + 40 on 64-bit Linux) fits the 64-byte,
    // 8-aligned buffer; CMSG_FIRSTHDR/NXTHDR stay within `msg_controllen`, which covers
    // exactly the messages written; values are written unaligned.
    unsafe {
        let mut space = 0;
        if segment.is_some() {
            space += libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32);
        }
        if ifindex.is_some() {
            space += libc::CMSG_SPACE(std::mem::size_of::<libc::in6_pktinfo>() as u32);
        }
        if space == 0 {
            return;
        }
        hdr.msg_control = buf.as_mut_ptr().cast();
        hdr.msg_controllen = space as _;
        let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
        if let Some(segment) = segment {
            (*cmsg).cmsg_level = SOL_UDP;
            (*cmsg).cmsg_type = UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
            libc::CMSG_DATA(cmsg).cast::<u16>().write_unaligned(segment);
            cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
        }
        if let Some(ifindex) = ifindex {
            (*cmsg).cmsg_level = libc::IPPROTO_IPV6;
            (*cmsg).cmsg_type = libc::IPV6_PKTINFO;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::in6_pktinfo>() as u32) as _;
            let info = libc::in6_pktinfo {
                // Unspecified: the kernel picks the source for that interface.
                ipi6_addr: libc::in6_addr { s6_addr: [0; 16] },
                ipi6_ifindex: ifindex,
            };
            libc::CMSG_DATA(cmsg)
                .cast::<libc::in6_pktinfo>()
                .write_unaligned(info);
        }
    }
}

fn sockaddr(to: &SocketAddr) -> io::Result<libc::sockaddr_in6> {
    let mut sa = zeroed_sockaddr();
    sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    match to {
        SocketAddr::V6(v6) => {
            sa.sin6_port = v6.port().to_be();
            sa.sin6_addr.s6_addr = v6.ip().octets();
            sa.sin6_scope_id = v6.scope_id();
            Ok(sa)
        }
        SocketAddr::V4(_) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the Myconet underlay is IPv6-only",
        )),
    }
}

/// Logs once which UDP offloads the underlay socket got.
pub fn log_offloads(gro: &io::Result<()>) {
    match gro {
        Ok(()) => info!("UDP GRO on the underlay socket; UDP GSO sends enabled"),
        Err(e) => {
            warn!(error = %e, "UDP GRO unavailable on the underlay socket: receiving datagram by datagram")
        }
    }
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
        addrs.push(sockaddr(to)?);
        iovecs.push(libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        });
    }
    let mut ctrl: Vec<SendCmsgBuf> = vec![[0; 8]; count];
    let mut msgs: Vec<libc::mmsghdr> = Vec::with_capacity(count);
    for (i, (_, to)) in datagrams[..count].iter().enumerate() {
        // SAFETY: plain data; pointers set below.
        let mut m: libc::mmsghdr = unsafe { MaybeUninit::zeroed().assume_init() };
        m.msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in6).cast();
        m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as u32;
        m.msg_hdr.msg_iov = &mut iovecs[i];
        m.msg_hdr.msg_iovlen = 1;
        set_send_cmsgs(&mut m.msg_hdr, &mut ctrl[i], None, to);
        msgs.push(m);
    }
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

    /// Interface index and MAC address of `dev` in `ns`, from the kernel.
    fn link_info(ns: &myconet_testbed::Netns, dev: &str) -> anyhow::Result<(u32, String)> {
        let out = ns.ip(["-j", "link", "show", "dev", dev])?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let ifindex = v[0]["ifindex"].as_u64().and_then(|i| u32::try_from(i).ok());
        let mac = v[0]["address"].as_str().map(str::to_owned);
        ifindex
            .zip(mac)
            .ok_or_else(|| anyhow::anyhow!("no ifindex or address for {dev}: {v}"))
    }

    /// Two interfaces both route the next hop's prefix; the FIB prefers `d0`. A next hop
    /// naming `d1` as its interface (scope id on a ULA address, which the kernel ignores
    /// in `sin6_scope_id`) must leave by `d1`, as the XDP path's FIB lookup with the
    /// route's interface would send it, in plain and in GSO sends alike. Counted where
    /// the frames arrive, at the far ends `p0` and `p1` of the two veth pairs.
    #[test]
    fn a_next_hops_interface_is_honoured_for_global_addresses() -> anyhow::Result<()> {
        use myconet_testbed::{Capture, Netns, netns::unique_name};
        const PORT: u16 = 9651;
        let ns = Netns::create(&unique_name("egress"))?;
        for (i, addr) in ["fd00:a::1/64", "fd00:b::1/64"].iter().enumerate() {
            let (dev, peer) = (format!("d{i}"), format!("p{i}"));
            ns.ip(["link", "add", &dev, "type", "veth", "peer", "name", &peer])?;
            ns.ip(["link", "set", &dev, "up"])?;
            ns.ip(["link", "set", &peer, "up"])?;
            ns.ip(["-6", "addr", "add", addr, "dev", &dev, "nodad"])?;
            // Each far end answers for the next hop, so nothing waits for discovery.
            let (_, mac) = link_info(&ns, &peer)?;
            let neigh = [
                "-6",
                "neigh",
                "replace",
                "fd00:9::5",
                "lladdr",
                &mac,
                "dev",
                &dev,
            ];
            ns.ip(neigh.iter().copied().chain(["nud", "permanent"]))?;
        }
        ns.ip([
            "-6",
            "route",
            "add",
            "fd00:9::/64",
            "dev",
            "d0",
            "metric",
            "10",
        ])?;
        ns.ip([
            "-6",
            "route",
            "add",
            "fd00:9::/64",
            "dev",
            "d1",
            "metric",
            "20",
        ])?;
        // Segment GSO sends before the veth, so captures count wire packets.
        ns.exec(
            myconet_testbed::util::tool("ethtool"),
            ["-K", "d1", "tx-udp-segmentation", "off"],
        )?;
        let (d1, _) = link_info(&ns, "d1")?;
        let at_p0 = Capture::udp_port(&ns, "p0", PORT)?;
        let at_p1 = Capture::udp_port(&ns, "p1", PORT)?;
        ns.run_in(|| -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let socket = UdpSocket::bind("[::]:0").await?;
                let plain = SocketAddr::V6(SocketAddrV6::new("fd00:9::5".parse()?, PORT, 0, 0));
                let scoped = SocketAddr::V6(SocketAddrV6::new("fd00:9::5".parse()?, PORT, 0, d1));
                let data: &[u8] = &[7u8; 100];
                // 3 to the FIB's choice; 3 one by one and 4 as one GSO run via d1.
                let one_by_one: &[(&[u8], SocketAddr)] = &[
                    (data, plain),
                    (data, scoped),
                    (&data[..50], plain),
                    (data, scoped),
                    (data, plain),
                    (data, scoped),
                ];
                assert!(send_batch(&socket, one_by_one).await.is_empty());
                assert!(
                    send_gso_batch(&socket, &[(data, scoped); 4])
                        .await
                        .is_empty()
                );
                Ok(())
            })
        })??;
        let limit = std::time::Duration::from_secs(5);
        assert!(at_p1.wait_for(7, limit), "p1 got {} of 7", at_p1.count());
        assert!(at_p0.wait_for(3, limit), "p0 got {} of 3", at_p0.count());
        // Nothing more trickles in on either side.
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(at_p0.stop()?.len(), 3, "d0: the FIB's choice");
        assert_eq!(at_p1.stop()?.len(), 7, "d1: the next hop's interface");
        Ok(())
    }

    #[test]
    fn gro_buffers_split_at_the_segment_size() {
        let split = |len, seg| segments(len, seg).collect::<Vec<_>>();
        assert_eq!(
            split(4000, Some(1500)),
            vec![0..1500, 1500..3000, 3000..4000]
        );
        assert_eq!(split(3000, Some(1500)), vec![0..1500, 1500..3000]);
        assert_eq!(split(1400, None), vec![0..1400]);
        assert_eq!(split(1400, Some(0)), vec![0..1400], "no GRO cmsg");
        assert_eq!(split(1400, Some(9000)), vec![0..1400], "one short segment");
        assert_eq!(split(0, None), Vec::<Range<usize>>::new());
        assert_eq!(split(1, Some(1)), vec![0..1]);
    }

    #[test]
    fn gso_runs_are_same_size_same_destination_and_ordered() {
        let x: SocketAddr = "[2001:db8::1]:9651".parse().unwrap();
        let y: SocketAddr = "[2001:db8::2]:9651".parse().unwrap();
        let plan = |d: &[(usize, SocketAddr)]| plan_gso(d, 4);
        // Equal sizes, the last shorter: one run.
        assert_eq!(plan(&[(1500, x), (1500, x), (900, x)]), vec![0..3]);
        // A shorter datagram ends the run; a longer one starts a new run.
        assert_eq!(
            plan(&[(1500, x), (900, x), (1500, x), (1600, x)]),
            vec![0..2, 2..3, 3..4]
        );
        // Another destination starts a new run, and order is kept (no regrouping).
        assert_eq!(
            plan(&[(100, x), (100, y), (100, x), (100, x)]),
            vec![0..1, 1..2, 2..4]
        );
        // At most `max_segments` per run.
        assert_eq!(plan(&[(10, x); 9]), vec![0..4, 4..8, 8..9]);
        // Never more bytes than one UDP datagram can carry.
        let big = [(20_000, x); 4];
        assert_eq!(plan(&big), vec![0..3, 3..4]);
        assert!(
            plan_gso(&big, 64)
                .iter()
                .all(|r| r.len() * 20_000 <= MAX_GSO_BYTES)
        );
        // Empty datagrams go alone.
        assert_eq!(plan(&[(0, x), (0, x)]), vec![0..1, 1..2]);
        assert!(plan(&[]).is_empty());
    }

    #[tokio::test]
    async fn gso_and_gro_round_trip_on_loopback() {
        let rx = UdpSocket::bind("[::1]:0").await.unwrap();
        let gro = enable_gro(&rx).is_ok();
        let tx = UdpSocket::bind("[::1]:0").await.unwrap();
        let to = rx.local_addr().unwrap();
        // Runs of equal sizes with a shorter tail, some singles, and a size change.
        let sizes: Vec<usize> = (0..150)
            .map(|i| match i % 50 {
                49 => 300,
                40..=44 => 700,
                _ => 1200,
            })
            .collect();
        let payloads: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| vec![i as u8; n])
            .collect();
        let list: Vec<(&[u8], SocketAddr)> = payloads.iter().map(|p| (&p[..], to)).collect();
        assert!(send_gso_batch(&tx, &list).await.is_empty(), "all sent");
        let mut got = Vec::new();
        let mut batch = RecvBatch::new(8, MAX_DATAGRAM);
        while got.len() < payloads.len() {
            let n = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                recv_batch(&rx, &mut batch),
            )
            .await
            .expect("datagrams arrive")
            .unwrap();
            for i in 0..n {
                let seg = batch.segment_size(i);
                if !gro {
                    assert_eq!(seg, None);
                }
                let (data, _) = batch.get(i).unwrap();
                for r in segments(data.len(), seg) {
                    got.push(data[r].to_vec());
                }
            }
        }
        assert_eq!(
            got, payloads,
            "every datagram, intact, in order, split right"
        );
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
