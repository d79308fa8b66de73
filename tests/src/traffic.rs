//! Traffic sources and sinks inside namespaces: a batched UDP sender and an AF_PACKET
//! capture.
//!
//! Both open their sockets inside the namespace (through [`Netns::run_in`]) and then use
//! them from ordinary threads: a socket keeps the namespace it was created in. Every
//! loop here is bounded by a count or a duration.

use std::mem;
use std::net::{SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::netns::Netns;
use crate::packet;

/// Upper bound for [`UdpSender::send`] and [`UdpSender::send_datagrams`]; a test that
/// needs longer is stuck, not slow.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Datagrams per `sendmmsg` call unless [`UdpSender::batch`] says otherwise.
pub const DEFAULT_BATCH: usize = 64;

/// Binds a UDP socket to `addr` inside `netns`, for tests that receive datagrams or send
/// a few by hand.
pub fn bind_udp(netns: &Netns, addr: SocketAddr) -> Result<UdpSocket> {
    netns
        .run_in(move || UdpSocket::bind(addr))?
        .with_context(|| format!("failed to bind UDP {addr} in {}", netns.name()))
}

/// What a sender managed to send.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SendReport {
    /// Datagrams the kernel accepted.
    pub packets: u64,
    /// UDP payload bytes the kernel accepted.
    pub bytes: u64,
    /// Send calls that failed with back-pressure (`ENOBUFS`, `EAGAIN`); the datagrams
    /// they carried are not counted in `packets`.
    pub backpressure: u64,
    /// Wall time spent sending.
    pub elapsed: Duration,
}

impl SendReport {
    /// Datagrams per second.
    pub fn packets_per_sec(&self) -> f64 {
        self.packets as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Payload bits per second.
    pub fn bits_per_sec(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// An IPv6 UDP socket bound inside a namespace that sends to one destination, in
/// `sendmmsg` batches so one core can approach line rate on a veth.
#[derive(Debug)]
pub struct UdpSender {
    socket: SenderSocket,
    dst: SocketAddrV6,
    batch: usize,
}

/// A plain UDP socket, or a raw one that writes its own UDP header (see
/// [`UdpSender::spoofing`]).
#[derive(Debug)]
enum SenderSocket {
    Udp(UdpSocket),
    Raw { fd: OwnedFd, local: SocketAddrV6 },
}

impl SenderSocket {
    fn fd(&self) -> RawFd {
        match self {
            Self::Udp(s) => s.as_raw_fd(),
            Self::Raw { fd, .. } => fd.as_raw_fd(),
        }
    }

    /// Source and destination ports when this side writes the UDP header itself.
    fn udp_ports(&self, dst: &SocketAddrV6) -> Option<(u16, u16)> {
        match self {
            Self::Udp(_) => None,
            Self::Raw { local, .. } => Some((local.port(), dst.port())),
        }
    }
}

impl UdpSender {
    /// Binds to `local` inside `netns` and targets `dst`. The socket stays unconnected so
    /// ICMP errors from the far side cannot make later sends fail.
    pub fn bind(netns: &Netns, local: SocketAddrV6, dst: SocketAddrV6) -> Result<Self> {
        let socket = bind_udp(netns, SocketAddr::V6(local))?;
        // Bounded blocking: a full send buffer must not stall a test forever.
        socket
            .set_write_timeout(Some(Duration::from_secs(1)))
            .context("failed to set SO_SNDTIMEO")?;
        Ok(Self {
            socket: SenderSocket::Udp(socket),
            dst,
            batch: DEFAULT_BATCH,
        })
    }

    /// Sends from `local` (address and port) through a raw IPv6 socket inside `netns`
    /// that writes the UDP header itself, so the datagrams carry `local`'s port even
    /// while another process (the node's agent) owns it. The relay tests use this to
    /// send as an authenticated neighbour's endpoint: the relay's peer check is by
    /// address and port, exactly what an on-path sender could forge, which is why only
    /// the destination's end-to-end authentication decides what a packet is worth. The
    /// kernel fills in the UDP checksum (`IPV6_CHECKSUM`).
    pub fn spoofing(netns: &Netns, local: SocketAddrV6, dst: SocketAddrV6) -> Result<Self> {
        let fd = netns
            .run_in(move || open_raw_udp(local))?
            .with_context(|| {
                format!(
                    "failed to open a raw UDP socket on {local} in {}",
                    netns.name()
                )
            })?;
        Ok(Self {
            socket: SenderSocket::Raw { fd, local },
            dst,
            batch: DEFAULT_BATCH,
        })
    }

    /// Sets the number of datagrams per `sendmmsg` call (1..=1024).
    pub fn batch(mut self, batch: usize) -> Self {
        self.batch = batch.clamp(1, 1024);
        self
    }

    /// The bound local address (useful after binding port 0).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        match &self.socket {
            SenderSocket::Udp(s) => s.local_addr().context("getsockname failed"),
            SenderSocket::Raw { local, .. } => Ok(SocketAddr::V6(*local)),
        }
    }

    /// The destination.
    pub fn dst(&self) -> SocketAddrV6 {
        self.dst
    }

    /// Sends `payload` exactly `count` times, retrying after back-pressure, within
    /// [`SEND_TIMEOUT`].
    pub fn send(&self, payload: &[u8], count: u64) -> Result<SendReport> {
        let start = Instant::now();
        let mut report = SendReport::default();
        let mut remaining = count;
        let batch: Vec<&[u8]> = vec![payload; self.batch];
        while remaining > 0 {
            let n = usize::try_from(remaining)
                .unwrap_or(usize::MAX)
                .min(self.batch);
            self.send_all(&batch[..n], start, &mut report)?;
            remaining -= n as u64;
        }
        report.elapsed = start.elapsed();
        Ok(report)
    }

    /// Sends every datagram once, in order, retrying after back-pressure, within
    /// [`SEND_TIMEOUT`].
    pub fn send_datagrams<D: AsRef<[u8]>>(&self, datagrams: &[D]) -> Result<SendReport> {
        let start = Instant::now();
        let mut report = SendReport::default();
        for chunk in datagrams.chunks(self.batch) {
            let slices: Vec<&[u8]> = chunk.iter().map(AsRef::as_ref).collect();
            self.send_all(&slices, start, &mut report)?;
        }
        report.elapsed = start.elapsed();
        Ok(report)
    }

    /// Sends `payload` as fast as the kernel takes it until `duration` has passed.
    /// Back-pressure is counted, not retried, so the report shows what got through.
    pub fn blast(&self, payload: &[u8], duration: Duration) -> Result<SendReport> {
        let start = Instant::now();
        let mut report = SendReport::default();
        let batch: Vec<&[u8]> = vec![payload; self.batch];
        let mut msgs = Batch::new(&self.dst, &batch, self.socket.udp_ports(&self.dst));
        while start.elapsed() < duration {
            match msgs.send(self.socket.fd(), 0) {
                Ok(sent) => {
                    report.packets += sent as u64;
                    report.bytes += (sent * payload.len()) as u64;
                }
                Err(e) if is_backpressure(&e) => report.backpressure += 1,
                Err(e) => return Err(e).context("sendmmsg failed"),
            }
        }
        report.elapsed = start.elapsed();
        Ok(report)
    }

    fn send_all(&self, datagrams: &[&[u8]], start: Instant, report: &mut SendReport) -> Result<()> {
        let mut msgs = Batch::new(&self.dst, datagrams, self.socket.udp_ports(&self.dst));
        let mut offset = 0;
        while offset < datagrams.len() {
            if start.elapsed() > SEND_TIMEOUT {
                bail!(
                    "sending to {} did not finish within {SEND_TIMEOUT:?} ({} sent)",
                    self.dst,
                    report.packets
                );
            }
            match msgs.send(self.socket.fd(), offset) {
                Ok(sent) => {
                    report.packets += sent as u64;
                    report.bytes += datagrams[offset..offset + sent]
                        .iter()
                        .map(|d| d.len() as u64)
                        .sum::<u64>();
                    offset += sent;
                }
                Err(e) if is_backpressure(&e) => {
                    report.backpressure += 1;
                    thread::sleep(Duration::from_millis(1));
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("sendmmsg to {} failed", self.dst));
                }
            }
        }
        Ok(())
    }
}

fn is_backpressure(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOBUFS) | Some(libc::EAGAIN) | Some(libc::EINTR)
    )
}

/// The `mmsghdr`/`iovec` arrays for one `sendmmsg` batch. The raw pointers inside point
/// into `addr` and the borrowed datagrams, which outlive the batch.
struct Batch<'a> {
    // Held only so the pointers in `hdrs` stay valid.
    _addr: Box<libc::sockaddr_in6>,
    _udp_headers: Vec<[u8; 8]>,
    _iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    _data: std::marker::PhantomData<&'a [u8]>,
}

impl<'a> Batch<'a> {
    /// `udp_ports` is set for raw sockets: each message then starts with a UDP header
    /// built here, and the destination's port in the address must be 0.
    fn new(dst: &SocketAddrV6, datagrams: &[&'a [u8]], udp_ports: Option<(u16, u16)>) -> Self {
        let mut target = *dst;
        if udp_ports.is_some() {
            target.set_port(0);
        }
        let mut addr = Box::new(sockaddr_in6(&target));
        let udp_headers: Vec<[u8; 8]> = match udp_ports {
            Some((src, dst)) => datagrams
                .iter()
                .map(|d| {
                    let len = u16::try_from(d.len() + 8).unwrap_or(u16::MAX);
                    let mut h = [0u8; 8];
                    h[0..2].copy_from_slice(&src.to_be_bytes());
                    h[2..4].copy_from_slice(&dst.to_be_bytes());
                    h[4..6].copy_from_slice(&len.to_be_bytes());
                    h
                })
                .collect(),
            None => Vec::new(),
        };
        let per_message = if udp_ports.is_some() { 2 } else { 1 };
        let mut iovs: Vec<libc::iovec> = Vec::with_capacity(datagrams.len() * per_message);
        for (i, d) in datagrams.iter().enumerate() {
            if let Some(h) = udp_headers.get(i) {
                iovs.push(libc::iovec {
                    iov_base: h.as_ptr() as *mut libc::c_void,
                    iov_len: h.len(),
                });
            }
            iovs.push(libc::iovec {
                iov_base: d.as_ptr() as *mut libc::c_void,
                iov_len: d.len(),
            });
        }
        let mut hdrs = Vec::with_capacity(datagrams.len());
        let name: *mut libc::sockaddr_in6 = &mut *addr;
        for chunk in iovs.chunks(per_message) {
            // SAFETY: mmsghdr is plain data; all-zero is a valid (empty) value.
            let mut h: libc::mmsghdr = unsafe { mem::zeroed() };
            h.msg_hdr.msg_name = name.cast();
            h.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            h.msg_hdr.msg_iov = chunk.as_ptr().cast_mut();
            h.msg_hdr.msg_iovlen = chunk.len();
            hdrs.push(h);
        }
        Self {
            _addr: addr,
            _udp_headers: udp_headers,
            _iovs: iovs,
            hdrs,
            _data: std::marker::PhantomData,
        }
    }

    /// Sends messages `from..`; returns how many the kernel took (at least one).
    fn send(&mut self, fd: RawFd, from: usize) -> std::io::Result<usize> {
        let rest = &mut self.hdrs[from..];
        let len = libc::c_uint::try_from(rest.len()).unwrap_or(libc::c_uint::MAX);
        // SAFETY: every header points at a live iovec in `_iovs`, at `_addr`, and
        // at datagram bytes borrowed for 'a; `len` does not exceed the slice.
        let rc = unsafe { libc::sendmmsg(fd, rest.as_mut_ptr(), len, 0) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        usize::try_from(rc).map_err(|_| std::io::Error::other("negative sendmmsg count"))
    }
}

/// A raw IPv6 socket for UDP bound to `local`'s address, with the kernel computing the
/// UDP checksum at offset 6 of what we write.
fn open_raw_udp(local: SocketAddrV6) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_INET6,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_UDP,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let offset: libc::c_int = 6;
    // SAFETY: the option value is a live c_int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_CHECKSUM,
            (&offset as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut bind_to = local;
    bind_to.set_port(0);
    let sa = sockaddr_in6(&bind_to);
    // SAFETY: `sa` is a valid sockaddr_in6 of the size passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in6).cast(),
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: the option value is a live timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&timeout as *const libc::timeval).cast(),
            mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn sockaddr_in6(addr: &SocketAddrV6) -> libc::sockaddr_in6 {
    // SAFETY: sockaddr_in6 is plain data; all-zero is valid.
    let mut sa: libc::sockaddr_in6 = unsafe { mem::zeroed() };
    sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    sa.sin6_port = addr.port().to_be();
    sa.sin6_flowinfo = addr.flowinfo().to_be();
    sa.sin6_addr = libc::in6_addr {
        s6_addr: addr.ip().octets(),
    };
    sa.sin6_scope_id = addr.scope_id();
    sa
}

/// Which frames a [`Capture`] keeps, by direction on its interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Frames the interface received.
    Incoming,
    /// Frames the stack sent out of the interface (not frames XDP redirected or sent
    /// back: those bypass the packet taps).
    Outgoing,
    /// Both.
    Any,
}

/// What a [`Capture`] keeps and for how long it runs.
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// Keep only Ethernet/IPv6/UDP frames to this destination port (`None`: keep all).
    pub udp_dst_port: Option<u16>,
    /// Keep only frames in this direction.
    pub direction: Direction,
    /// Stop after this many kept frames.
    pub max_frames: usize,
    /// Stop after this long in any case.
    pub max_duration: Duration,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        Self {
            udp_dst_port: None,
            direction: Direction::Any,
            max_frames: 100_000,
            max_duration: Duration::from_secs(30),
        }
    }
}

/// One captured frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedFrame {
    /// The whole frame from the Ethernet header on.
    pub data: Vec<u8>,
    /// Whether the frame was leaving the interface.
    pub outgoing: bool,
    /// When it arrived, relative to the start of the capture.
    pub at: Duration,
    /// The kernel marked its UDP checksum partial (`VIRTIO_NET_HDR_F_NEEDS_CSUM`): the
    /// field holds only the pseudo-header sum and the receiving stack trusts the mark
    /// (a frame sent through a socket on a veth with TX offload, e.g. by an agent's
    /// userspace relay path).
    pub needs_csum: bool,
}

impl CapturedFrame {
    /// Parses the frame as Ethernet/IPv6/UDP.
    pub fn parse(&self) -> Result<packet::ParsedFrame> {
        packet::parse_frame(&self.data)
    }
}

#[derive(Debug, Default)]
struct Shared {
    frames: Mutex<Vec<CapturedFrame>>,
    stop: AtomicBool,
    finished: AtomicBool,
    /// Frames the kernel dropped because the socket's queue was full (what tcpdump
    /// reports as "dropped by kernel"), read when the capture ends.
    kernel_drops: AtomicU64,
    /// Whether the capture ended at its frame limit (frames after it were not kept).
    hit_limit: AtomicBool,
}

impl Shared {
    fn frames(&self) -> MutexGuard<'_, Vec<CapturedFrame>> {
        // Pushing a frame cannot leave the vector inconsistent, so poison is harmless.
        self.frames
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Frames seen on one interface inside a namespace, collected by a background thread
/// from an AF_PACKET socket.
///
/// It sees what the kernel stack sees: incoming frames after XDP let them pass, and
/// frames the stack transmits; frames an XDP program drops, redirects or bounces are
/// invisible on that interface (capture them where they arrive). A UDP GSO superpacket
/// (one skb carrying many datagrams, which a stock veth passes whole) is kept as the
/// datagrams the receiving stack cuts it into, so counts are datagrams, not skbs.
#[derive(Debug)]
pub struct Capture {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<Result<()>>>,
    interface: String,
}

impl Capture {
    /// Opens the socket on `ifname` inside `netns` and starts collecting. Frames that
    /// arrive after this returns are captured.
    pub fn start(netns: &Netns, ifname: &str, options: CaptureOptions) -> Result<Self> {
        let name = ifname.to_owned();
        let fd = netns
            .run_in(move || open_packet_socket(&name))?
            .with_context(|| format!("failed to open a capture on {ifname} in {}", netns.name()))?;
        let shared = Arc::new(Shared::default());
        let worker_shared = Arc::clone(&shared);
        let worker = thread::Builder::new()
            .name(format!("capture-{ifname}"))
            .spawn(move || capture_loop(fd, &options, &worker_shared))
            .context("failed to spawn the capture thread")?;
        Ok(Self {
            shared,
            worker: Some(worker),
            interface: format!("{}:{ifname}", netns.name()),
        })
    }

    /// Captures incoming UDP frames to `port` on `ifname` (up to 30 s, 100 000 frames).
    pub fn udp_port(netns: &Netns, ifname: &str, port: u16) -> Result<Self> {
        Self::start(
            netns,
            ifname,
            CaptureOptions {
                udp_dst_port: Some(port),
                direction: Direction::Incoming,
                ..CaptureOptions::default()
            },
        )
    }

    /// Frames kept so far.
    pub fn count(&self) -> usize {
        self.shared.frames().len()
    }

    /// A copy of the frames kept so far; the capture goes on.
    pub fn snapshot(&self) -> Vec<CapturedFrame> {
        self.shared.frames().clone()
    }

    /// Whether the capture stopped by itself (limit reached or error).
    pub fn is_finished(&self) -> bool {
        self.shared.finished.load(Ordering::Acquire)
    }

    /// Waits up to `timeout` until at least `n` frames were kept; returns whether they
    /// were.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.count() >= n {
                return true;
            }
            if Instant::now() >= deadline || self.is_finished() {
                return self.count() >= n;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the capture now and returns everything kept.
    pub fn stop(mut self) -> Result<Vec<CapturedFrame>> {
        self.shared.stop.store(true, Ordering::Release);
        self.finish()
    }

    /// Stops the capture now and returns everything kept, failing if it is incomplete:
    /// the kernel dropped frames because the capture fell behind, or the frame limit
    /// was reached. A test that asserts on what did not appear on a wire needs this.
    pub fn stop_complete(mut self) -> Result<Vec<CapturedFrame>> {
        self.shared.stop.store(true, Ordering::Release);
        let frames = self.finish()?;
        let drops = self.shared.kernel_drops.load(Ordering::Acquire);
        ensure!(
            drops == 0,
            "the capture on {} is incomplete: the kernel dropped {drops} frames",
            self.interface
        );
        ensure!(
            !self.shared.hit_limit.load(Ordering::Acquire),
            "the capture on {} is incomplete: it stopped at its limit of {} frames",
            self.interface,
            frames.len()
        );
        Ok(frames)
    }

    /// Lets the capture run to its frame or time limit, then returns everything kept.
    pub fn wait(mut self) -> Result<Vec<CapturedFrame>> {
        self.finish()
    }

    fn finish(&mut self) -> Result<Vec<CapturedFrame>> {
        if let Some(worker) = self.worker.take() {
            match worker.join() {
                Ok(result) => {
                    result.with_context(|| format!("capture on {} failed", self.interface))?
                }
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        Ok(mem::take(&mut *self.shared.frames()))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// Receive timeout of the capture socket: how quickly the loop notices a stop request.
const CAPTURE_POLL: Duration = Duration::from_millis(50);

fn open_packet_socket(ifname: &str) -> Result<OwnedFd> {
    let cname = std::ffi::CString::new(ifname).context("interface name contains NUL")?;
    // SAFETY: cname is a valid C string for the call.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("no interface {ifname}"));
    }
    // Protocol 0 until bind: the socket receives nothing from other interfaces meanwhile.
    // SAFETY: plain socket(2) call.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET) failed");
    }
    // SAFETY: raw is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };

    // Room for bursts: the collecting thread may fall behind a sendmmsg blast.
    let rcvbuf: libc::c_int = 8 << 20;
    if setsockopt(&fd, libc::SO_RCVBUFFORCE, &rcvbuf).is_err() {
        setsockopt(&fd, libc::SO_RCVBUF, &rcvbuf).context("SO_RCVBUF failed")?;
    }
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: CAPTURE_POLL.as_micros() as libc::suseconds_t,
    };
    setsockopt(&fd, libc::SO_RCVTIMEO, &tv).context("SO_RCVTIMEO failed")?;
    // Each frame comes with its virtio_net_hdr: a UDP GSO superpacket (a stock veth
    // carries them whole into a namespace without XDP) is split into its datagrams.
    let on: libc::c_int = 1;
    setsockopt_level(&fd, libc::SOL_PACKET, PACKET_VNET_HDR, &on)
        .context("PACKET_VNET_HDR failed")?;

    // SAFETY: sockaddr_ll is plain data; all-zero is valid.
    let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    sll.sll_ifindex = libc::c_int::try_from(ifindex).context("ifindex out of range")?;
    // SAFETY: sll is a valid sockaddr_ll and the length matches it.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("bind(AF_PACKET) to {ifname} failed"));
    }
    Ok(fd)
}

/// `PACKET_VNET_HDR` (linux/if_packet.h).
const PACKET_VNET_HDR: libc::c_int = 15;
/// Length of the `virtio_net_hdr` a `PACKET_VNET_HDR` socket puts before each frame.
const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum is partial.
const VNET_F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_UDP_L4` (the ECN bit masked off).
const VNET_GSO_UDP_L4: u8 = 5;

fn setsockopt<T>(fd: &OwnedFd, option: libc::c_int, value: &T) -> std::io::Result<()> {
    setsockopt_level(fd, libc::SOL_SOCKET, option, value)
}

fn setsockopt_level<T>(
    fd: &OwnedFd,
    level: libc::c_int,
    option: libc::c_int,
    value: &T,
) -> std::io::Result<()> {
    // SAFETY: value points at a live T and the length is its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            option,
            (value as *const T).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn capture_loop(fd: OwnedFd, options: &CaptureOptions, shared: &Shared) -> Result<()> {
    let result = capture_frames(&fd, options, shared);
    match packet_drops(&fd) {
        Ok(drops) => shared.kernel_drops.store(drops, Ordering::Release),
        // Unknown counts as incomplete.
        Err(_) => shared.kernel_drops.store(u64::MAX, Ordering::Release),
    }
    shared.finished.store(true, Ordering::Release);
    result
}

/// Frames the kernel dropped on this packet socket since it was opened
/// (`PACKET_STATISTICS`, read once: reading resets it).
fn packet_drops(fd: &OwnedFd) -> std::io::Result<u64> {
    // SAFETY: tpacket_stats is plain data; all-zero is valid.
    let mut stats: libc::tpacket_stats = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: stats is live and writable and len is its size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            (&mut stats as *mut libc::tpacket_stats).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(u64::from(stats.tp_drops))
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn capture_frames(fd: &OwnedFd, options: &CaptureOptions, shared: &Shared) -> Result<()> {
    let start = Instant::now();
    // A virtio_net_hdr and up to a 64 KiB IPv6 packet with its Ethernet header.
    let mut buf = vec![0u8; VNET_HDR_LEN + 14 + 40 + 65_536];
    let mut kept = 0usize;
    while !shared.stop.load(Ordering::Acquire)
        && kept < options.max_frames
        && start.elapsed() < options.max_duration
    {
        // SAFETY: sockaddr_ll is plain data; all-zero is valid.
        let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
        let mut sll_len = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: buf and sll are live, writable and their lengths are passed along.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut sll as *mut libc::sockaddr_ll).cast(),
                &mut sll_len,
            )
        };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                _ => return Err(err).context("recvfrom(AF_PACKET) failed"),
            }
        }
        let len = usize::try_from(n).unwrap_or(0).min(buf.len());
        if len < VNET_HDR_LEN {
            continue;
        }
        let (vnet, frame) = buf[..len].split_at(VNET_HDR_LEN);
        let outgoing = sll.sll_pkttype == libc::PACKET_OUTGOING;
        let direction_ok = match options.direction {
            Direction::Incoming => !outgoing,
            Direction::Outgoing => outgoing,
            Direction::Any => true,
        };
        if !direction_ok {
            continue;
        }
        let gso_size = usize::from(u16::from_ne_bytes([vnet[4], vnet[5]]));
        let segments = if vnet[1] & 0x7f == VNET_GSO_UDP_L4 {
            packet::split_udp_gso(frame, gso_size, vnet[0] & VNET_F_NEEDS_CSUM != 0)
                .unwrap_or_else(|| vec![frame.to_vec()])
        } else {
            vec![frame.to_vec()]
        };
        let at = start.elapsed();
        let needs_csum = vnet[0] & VNET_F_NEEDS_CSUM != 0;
        let mut frames = shared.frames();
        for data in segments {
            let port_ok = options
                .udp_dst_port
                .is_none_or(|port| packet::udp_dst_port(&data) == Some(port));
            if port_ok && kept < options.max_frames {
                frames.push(CapturedFrame {
                    data,
                    outgoing,
                    at,
                    needs_csum,
                });
                kept += 1;
            }
        }
    }
    if kept >= options.max_frames {
        shared.hit_limit.store(true, Ordering::Release);
    }
    Ok(())
}
