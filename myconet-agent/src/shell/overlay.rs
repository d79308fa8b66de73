//! The end-to-end shell around the sans-IO [`SessionTable`]: overlay IPv6 packets from
//! the TUN device are sealed for their destination node and sent towards it; datagrams
//! for this node are opened and written to the TUN device.
//!
//! Relays never get here for traffic that is not theirs: the XDP program (or
//! `forward::decide` on the userspace path) relays it without touching sessions.

use std::{
    net::{Ipv6Addr, SocketAddr, SocketAddrV6},
    ops::Range,
    os::fd::AsFd,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Instant,
};

use myconet_common::{
    addr,
    wire::{HEADER_LEN, PacketType, field},
};
use ring::rand::SystemRandom;
use tokio::{net::UdpSocket, sync::Notify};
use tracing::{debug, info, warn};

use crate::os::{
    batch_io::{self, RecvBatch},
    tun::{self, Coalescer, PacketBatch, Tun, VNET_HDR_LEN},
};
use crate::shell::{
    link::Links,
    node::{AgentStat, Node},
};
use myconet_core::{
    pmtu::{self, Limit, PathMtu, Rejected},
    session::{
        Config, Event, HandshakeError, Inbound, InboundError, Screened, SendError, SessionTable,
        Suite, TAG_LEN, Transmit,
    },
};

/// Packets the TUN reader gathers into one batch (one lock, one `sendmmsg`) before
/// sending: a 64 KiB superpacket splits into ~50, so this is a couple of them, or a
/// burst of small packets such as ACKs.
const TUN_BATCH_PACKETS: usize = 128;

/// The node's end-to-end endpoint.
pub struct Overlay {
    node: Arc<Node>,
    socket: Arc<UdpSocket>,
    sessions: Mutex<SessionTable>,
    tun: Option<Tun>,
    links: Arc<Links>,
    rng: SystemRandom,
    timers: Notify,
    /// Generation of the node's underlay addresses the session table was last given.
    underlay_generation: AtomicU64,
    /// Path MTUs learned from too-big reports (`pmtu`).
    path_mtu: Mutex<PathMtu>,
    /// Whether `path_mtu` holds anything: until a report is believed, the TUN path
    /// checks no sizes and takes no lock for it.
    path_mtu_known: AtomicBool,
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
        let mut sessions = SessionTable::new(node.identity_arc(), config, Instant::now())?;
        sessions.set_pins(links.pins().clone());
        let (generation, addrs) = node.underlay_addrs();
        sessions.set_local_underlay(node.port(), addrs.iter().copied());
        Ok(Self {
            node,
            socket,
            sessions: Mutex::new(sessions),
            tun,
            links,
            rng: SystemRandom::new(),
            timers: Notify::new(),
            underlay_generation: AtomicU64::new(generation),
            path_mtu: Mutex::new(PathMtu::default()),
            path_mtu_known: AtomicBool::new(false),
        })
    }

    fn sessions(&self) -> MutexGuard<'_, SessionTable> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives the session table the node's current underlay addresses if they changed
    /// since it last got them (link handshakes are bound to them).
    fn refresh_underlay(&self, st: &mut SessionTable) {
        let (generation, addrs) = self.node.underlay_addrs();
        if self.underlay_generation.swap(generation, Ordering::Relaxed) != generation {
            st.set_local_underlay(self.node.port(), addrs.iter().copied());
        }
    }

    /// The neighbour layer.
    pub fn links(&self) -> &Arc<Links> {
        &self.links
    }

    /// Handles a data, control, handshake or cookie datagram addressed to this node.
    pub async fn on_datagram(&self, from: SocketAddr, datagram: &[u8]) {
        if datagram.get(field::TYPE) == Some(&(PacketType::HandshakeInit as u8)) {
            self.on_init(from, datagram).await;
            return;
        }
        let now = Instant::now();
        let (delivered, control, mut transmits) = {
            let mut st = self.sessions();
            self.refresh_underlay(&mut st);
            let result = st.handle_datagram(from, datagram, now, &self.rng);
            let (mut delivered, mut control) = (None, None);
            match result {
                Ok(Inbound::Data { remote, payload }) => delivered = Some((remote, payload)),
                Ok(Inbound::Control {
                    endpoint, payload, ..
                }) => control = Some((endpoint, payload)),
                Ok(Inbound::Keepalive { .. }) | Ok(Inbound::Handshake(_)) => {}
                Err(e) => {
                    self.node.count(stat_for(&e), datagram.len());
                    debug!(%from, error = %e, "datagram rejected");
                }
            };
            (delivered, control, self.drain(&mut st))
        };
        // Routing work (signature checks of a neighbour's announcements) runs without
        // the session table's lock, which the data path needs for every packet; what it
        // queued is sent under the lock again.
        if let Some((endpoint, payload)) = control {
            self.links.on_control(endpoint, &payload, now);
            transmits.extend(self.drain(&mut self.sessions()));
        }
        self.timers.notify_one();
        if let Some((remote, payload)) = delivered {
            self.deliver(remote, &payload).await;
        }
        self.send_all(transmits).await;
    }

    /// Handles a HandshakeInit in three steps, so that the signature work (about 130 µs
    /// with the response) never holds the lock the data path takes: the table screens
    /// it under the lock (cheap checks, cookies, rate limits, verification budget), the
    /// job verifies it and builds the response outside, and the table applies the
    /// outcome under the lock again.
    async fn on_init(&self, from: SocketAddr, datagram: &[u8]) {
        let (job, transmits) = {
            let mut st = self.sessions();
            self.refresh_underlay(&mut st);
            let job = match st.screen_init(from, datagram, Instant::now(), &self.rng) {
                Ok(Screened::Verify(job)) => {
                    self.node
                        .count(AgentStat::HandshakeVerified, datagram.len());
                    Some(job)
                }
                // A copy answered silently from the cache (or ignored) produced
                // nothing: under a flood of replays most inits end here, so this path
                // wakes nobody.
                Ok(Screened::Done(_)) if !st.has_output() => return,
                Ok(Screened::Done(_)) => None,
                Err(e) => {
                    // A refused init changed nothing and sends nothing.
                    drop(st);
                    self.node.count(stat_for(&e), datagram.len());
                    debug!(%from, error = %e, "handshake init rejected");
                    return;
                }
            };
            (job, self.drain(&mut st))
        };
        self.send_all(transmits).await;
        let Some(job) = job else {
            self.timers.notify_one();
            return;
        };
        let outcome = job.run(&self.rng);
        let transmits = {
            let mut st = self.sessions();
            if let Err(e) = st.finish_init(outcome, Instant::now()) {
                self.node.count(stat_for(&e), datagram.len());
                debug!(%from, error = %e, "handshake init rejected");
            }
            self.drain(&mut st)
        };
        self.timers.notify_one();
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
        if !self.inner_ok(remote, packet) {
            return;
        }
        match write_plain(tun, packet).await {
            Ok(_) => self.node.count(AgentStat::RxDataLocal, packet.len()),
            Err(e) => {
                self.node.count(AgentStat::TxError, packet.len());
                debug!(error = %e, "TUN write failed");
            }
        }
    }

    /// Whether an opened packet is an IPv6 packet from `remote` (the session's address,
    /// which the handshake proved the remote's key owns in full) to this node's
    /// address; counts it as invalid if not. A node has exactly one overlay address:
    /// other addresses in a /64 are bound to the key by 48 bits only.
    fn inner_ok(&self, remote: Ipv6Addr, packet: &[u8]) -> bool {
        let Some((src, dst)) = ipv6_addrs(packet) else {
            self.node.count(AgentStat::RxInnerInvalid, packet.len());
            return false;
        };
        if src != remote || dst != self.node.identity().node_address() {
            self.node.count(AgentStat::RxInnerInvalid, packet.len());
            debug!(%remote, %src, %dst, "inner addresses do not match the session");
            return false;
        }
        true
    }

    /// Scratch space for [`Overlay::deliver_datagrams`], kept by the receive loop so the
    /// hot path stops allocating once warm.
    pub fn rx_scratch(&self) -> RxScratch {
        RxScratch::default()
    }

    /// Opens a batch of `Data` datagrams for this node where they lie in `batch` (slot,
    /// byte range in the slot, sender), under one lock of the session table, and writes
    /// what authenticates to the TUN device: on an offloading TUN, consecutive segments
    /// of a TCP flow coalesced into one superpacket per write ([`Coalescer`]), anything
    /// else with an empty `virtio_net_hdr`.
    pub async fn deliver_datagrams(
        &self,
        batch: &mut RecvBatch,
        items: &[(usize, Range<usize>, SocketAddrV6)],
        scratch: &mut RxScratch,
    ) {
        scratch.opened.clear();
        let transmits = {
            let mut st = self.sessions();
            let now = Instant::now();
            for (slot, range, from) in items {
                let Some((buf, _)) = batch.get_mut(*slot) else {
                    continue;
                };
                let Some(datagram) = buf.get_mut(range.clone()) else {
                    continue;
                };
                match st.open_in_place(datagram, now, &self.rng) {
                    Ok((remote, plain)) if !plain.is_empty() => {
                        let start = range.start + plain.start;
                        scratch
                            .opened
                            .push((*slot, start..start + plain.len(), remote));
                    }
                    Ok(_) => {} // keepalive
                    Err(e) => {
                        self.node.count(stat_for(&e), datagram.len());
                        debug!(%from, error = %e, "datagram rejected");
                    }
                }
            }
            self.drain(&mut st)
        };
        self.timers.notify_one();

        let packets: Vec<&[u8]> = scratch
            .opened
            .iter()
            .filter_map(|(slot, range, remote)| {
                let packet = batch.get(*slot)?.0.get(range.clone())?;
                self.inner_ok(*remote, packet).then_some(packet)
            })
            .collect();
        match &self.tun {
            None => {
                for p in &packets {
                    self.node.count(AgentStat::RxDataLocal, p.len());
                }
            }
            Some(tun) if tun.offload().is_some() => {
                scratch.framed.clear();
                scratch.coalescer.coalesce(&packets, &mut scratch.framed);
                for (item, framed) in scratch.framed.iter().enumerate() {
                    let stat = match tun.send(framed).await {
                        Ok(_) => AgentStat::RxDataLocal,
                        Err(e) => {
                            debug!(error = %e, "TUN write failed");
                            AgentStat::TxError
                        }
                    };
                    for member in scratch.coalescer.members(item) {
                        self.node
                            .count(stat, packets.get(member).map_or(0, |p| p.len()));
                    }
                }
            }
            Some(tun) => {
                for p in &packets {
                    match tun.send(p).await {
                        Ok(_) => self.node.count(AgentStat::RxDataLocal, p.len()),
                        Err(e) => {
                            self.node.count(AgentStat::TxError, p.len());
                            debug!(error = %e, "TUN write failed");
                        }
                    }
                }
            }
        }
        self.send_all(transmits).await;
    }

    /// Reads the TUN device until the task is cancelled: a read and whatever else is
    /// already waiting (up to [`TUN_BATCH_PACKETS`] packets) form one batch. With
    /// offload, superpackets are cut into wire-sized packets ([`tun::split_gso`]) in
    /// slots with room for the Myconet header and tag, so they are sealed where they lie.
    ///
    /// Reading and sealing run here, sending in a task of its own ([`SEND_PIPELINE`]
    /// batches deep): a send carries, on the sending thread, whatever the kernel does
    /// inline below the socket (on veth, the next hop's receive path too), so while
    /// one batch is being sent the next is read and sealed on the other core.
    pub async fn run_tun(self: Arc<Self>) {
        let Some(tun) = &self.tun else {
            return;
        };
        let offload = tun.offload().is_some();
        let (to_sender, from_reader) = tokio::sync::mpsc::channel::<SealedBatch>(SEND_PIPELINE);
        let (recycle, mut recycled) = tokio::sync::mpsc::channel::<SealedBatch>(SEND_PIPELINE + 1);
        if let Err(e) = self.clone().spawn_sender(from_reader, recycle) {
            warn!(error = %e, "cannot start the overlay sender thread; TUN traffic is not sent");
            return;
        }
        let mut buf = vec![0u8; tun::RECV_BUFFER_LEN];
        let mut scratch = TxScratch::default();
        loop {
            // At most SEND_PIPELINE + 1 batches exist: the one being filled, the ones
            // queued and the one being sent; each is reused once sent.
            let mut job = recycled.try_recv().unwrap_or_default();
            job.batch.clear();
            let mut n = match tun.recv(&mut buf).await {
                Ok(n) => Some(n),
                Err(e) => {
                    warn!(error = %e, "TUN read failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            while let Some(len) = n {
                self.take_tun_read(&buf[..len], offload, &mut job.batch);
                if job.batch.len() >= TUN_BATCH_PACKETS {
                    break;
                }
                n = match tun.try_recv(&mut buf) {
                    Ok(n) => n,
                    Err(e) => {
                        debug!(error = %e, "TUN read failed");
                        None
                    }
                };
            }
            let transmits = self.seal_batch(&mut job, &mut scratch);
            if !job.to.is_empty() && to_sender.send(job).await.is_err() {
                warn!("the overlay sender stopped; TUN reader stops too");
                return;
            }
            self.send_all(transmits).await;
            self.write_packet_too_big(&mut scratch.ptbs).await;
        }
    }

    /// Starts the thread that sends sealed batches as [`Overlay::run_tun`] hands them
    /// over and hands each back for reuse; it ends when the reader drops its end.
    ///
    /// An OS thread with its own event loop and its own descriptor of the socket, not a
    /// task: a task the reader wakes runs next on the reader's own worker (tokio's LIFO
    /// slot, which the other worker cannot steal), so reading and sending would mostly
    /// take turns on one core instead of overlapping on two.
    fn spawn_sender(
        self: Arc<Self>,
        mut batches: tokio::sync::mpsc::Receiver<SealedBatch>,
        recycle: tokio::sync::mpsc::Sender<SealedBatch>,
    ) -> std::io::Result<()> {
        let socket = std::net::UdpSocket::from(self.socket.as_fd().try_clone_to_owned()?);
        socket.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        std::thread::Builder::new()
            .name("myconet-tx".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let socket = match UdpSocket::from_std(socket) {
                        Ok(socket) => socket,
                        Err(e) => {
                            warn!(error = %e, "overlay sender: cannot register the socket");
                            return;
                        }
                    };
                    while let Some(job) = batches.recv().await {
                        self.send_sealed(&socket, &job).await;
                        // Full only if the reader stopped taking them back: then drop it.
                        let _ = recycle.try_send(job);
                    }
                })
            })?;
        Ok(())
    }

    /// Appends one TUN read to `batch`: cut into wire packets when offload is on.
    fn take_tun_read(&self, read: &[u8], offload: bool, batch: &mut PacketBatch) {
        if !offload {
            batch.push(read);
            return;
        }
        if let Err(e) = tun::split_gso(read, batch) {
            self.node.count(AgentStat::TunDropped, read.len());
            debug!(error = %e, "cannot split a packet from the TUN device");
        }
    }

    /// Seals one outbound overlay packet for its destination and sends it.
    pub async fn on_tun_packet(&self, packet: &[u8]) {
        let mut job = SealedBatch::default();
        job.batch.push(packet);
        let mut scratch = TxScratch::default();
        let transmits = self.seal_batch(&mut job, &mut scratch);
        self.send_sealed(&self.socket, &job).await;
        self.send_all(transmits).await;
        self.write_packet_too_big(&mut scratch.ptbs).await;
    }

    /// Seals every packet of `job.batch` (plain IPv6 packets in slots with header room
    /// and tailroom) for its destination, in place and under one lock, and lists in
    /// `job.to` where each sealed one goes. Packets for a destination without a session
    /// go the slow way: queued in the session table while a handshake runs; what that
    /// makes the table send (handshakes) is returned.
    fn seal_batch(&self, job: &mut SealedBatch, scratch: &mut TxScratch) -> Vec<Transmit> {
        let batch = &mut job.batch;
        job.to.clear();
        scratch.dsts.clear();
        for packet in batch.iter() {
            self.node.count(AgentStat::TunRx, packet.len());
            let dst = match ipv6_addrs(packet) {
                None => {
                    self.node.count(AgentStat::TunDropped, packet.len());
                    None
                }
                Some((_, dst))
                    if !addr::is_overlay(&dst) || self.node.node_prefix().contains(dst) =>
                {
                    self.node.count(AgentStat::TunNotOverlay, packet.len());
                    None
                }
                Some((_, dst)) => Some(dst),
            };
            scratch.dsts.push((dst, false));
        }
        self.enforce_path_mtu(batch, &mut scratch.dsts, &mut scratch.ptbs);
        let transmits = {
            let mut st = self.sessions();
            let now = Instant::now();
            let mut start = 0;
            while start < scratch.dsts.len() {
                let dst = scratch.dsts[start].0;
                let end = start
                    + scratch.dsts[start..]
                        .iter()
                        .take_while(|(d, _)| *d == dst)
                        .count();
                if let Some(dst) = dst {
                    let sealed = match st.seal_in_place_batch(
                        dst,
                        batch.slots_mut(start..end),
                        now,
                        &self.rng,
                    ) {
                        Ok(n) => n,
                        Err(e) => {
                            debug!(%dst, error = %e, "cannot send");
                            0
                        }
                    };
                    for entry in &mut scratch.dsts[start..start + sealed] {
                        entry.1 = true;
                    }
                    for i in start + sealed..end {
                        let Some(packet) = batch.get(i) else { continue };
                        match st.send(dst, packet.to_vec(), now, &self.rng) {
                            Ok(_) => {}
                            Err(SendError::Throttled) => {
                                self.node.count(AgentStat::HandshakeThrottled, packet.len());
                            }
                            Err(e) => {
                                debug!(%dst, error = %e, "cannot send");
                                self.node.count(AgentStat::TunDropped, packet.len());
                            }
                        }
                    }
                }
                start = end;
            }
            self.drain(&mut st)
        };
        self.timers.notify_one();

        let mut route: Option<(Ipv6Addr, Option<SocketAddr>)> = None;
        for (i, (dst, sealed)) in scratch.dsts.iter().enumerate() {
            let (Some(dst), true) = (dst, sealed) else {
                continue;
            };
            let to = match route {
                Some((d, to)) if d == *dst => to,
                _ => {
                    let to = self
                        .node
                        .next_hop_for(*dst)
                        .map(|nh| SocketAddr::V6(nh.socket_addr()));
                    route = Some((*dst, to));
                    to
                }
            };
            match to {
                Some(to) => job.to.push((i, to)),
                None => {
                    let len = batch.slot(i).map_or(0, <[u8]>::len);
                    self.node.count(AgentStat::TxNoRoute, len);
                }
            }
        }
        transmits
    }

    /// Sends what [`Overlay::seal_batch`] sealed with as few system calls as the kernel
    /// allows (`UDP_SEGMENT` runs per next hop).
    async fn send_sealed(&self, socket: &UdpSocket, job: &SealedBatch) {
        let out: Vec<(&[u8], SocketAddr)> = job
            .to
            .iter()
            .filter_map(|(i, to)| Some((job.batch.slot(*i)?, *to)))
            .collect();
        if out.is_empty() {
            return;
        }
        for i in batch_io::send_gso_batch(socket, &out).await {
            let (datagram, to) = out[i];
            self.node.count(AgentStat::TxError, datagram.len());
            debug!(%to, "send failed");
        }
    }

    fn path_mtu(&self) -> MutexGuard<'_, PathMtu> {
        self.path_mtu.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A too-big report addressed to this node (`pmtu`). Believed only after the checks
    /// there, cheapest first: the quote is checked against the sessions, the signature
    /// against the key the routing table holds for the reporting relay, with neither
    /// table locked while it verifies. A believed report lowers the path MTU towards
    /// the quoted destination; the application hears of it at its next oversized
    /// packet ([`Overlay::enforce_path_mtu`]).
    pub fn on_too_big(&self, datagram: &[u8]) {
        let now = Instant::now();
        let local = self.node.node_prefix().addr();
        let screened = self.path_mtu().screen(
            datagram,
            local,
            |quoted| {
                self.sessions()
                    .sent_recently(quoted.dst_addr, quoted.session_id, quoted.counter)
            },
            now,
        );
        let verified = screened.and_then(|s| {
            let key = self.links.origin_key(s.reporter());
            s.verify(key.as_ref())
        });
        match verified {
            Ok(report) => {
                let repr = *report.repr();
                let limit = self.path_mtu().commit(report, now);
                self.path_mtu_known.store(true, Ordering::Relaxed);
                self.node.count(AgentStat::TooBigAccepted, datagram.len());
                info!(
                    destination = %repr.quoted.dst_addr,
                    reporter = %repr.reporter,
                    mtu = limit.inner_mtu,
                    "path MTU lowered by a too-big report"
                );
            }
            Err(e) => {
                self.node.count(too_big_stat(&e), datagram.len());
                debug!(error = %e, "too-big report refused");
            }
        }
    }

    /// Drops the packets of a TUN batch that exceed the path MTU learned towards their
    /// destination (marking them not to be sent), and puts an ICMPv6 Packet Too Big
    /// quoting each (within a rate per destination) into `ptbs` for the TUN device, so
    /// the kernel lowers the destination's PMTU and sends smaller packets. Takes no
    /// lock until a path MTU is known.
    fn enforce_path_mtu(
        &self,
        batch: &PacketBatch,
        dsts: &mut [(Option<Ipv6Addr>, bool)],
        ptbs: &mut Vec<Vec<u8>>,
    ) {
        if !self.path_mtu_known.load(Ordering::Relaxed) {
            return;
        }
        let now = Instant::now();
        let mut paths = self.path_mtu();
        let mut last: Option<(Ipv6Addr, Option<Limit>)> = None;
        for (i, entry) in dsts.iter_mut().enumerate() {
            let Some(dst) = entry.0 else { continue };
            let limit = match last {
                Some((d, limit)) if d == dst => limit,
                _ => {
                    let limit = paths.limit(dst, now);
                    last = Some((dst, limit));
                    limit
                }
            };
            let (Some(limit), Some(packet)) = (limit, batch.get(i)) else {
                continue;
            };
            if packet.len() <= usize::from(limit.inner_mtu) {
                continue;
            }
            entry.0 = None;
            self.node.count(AgentStat::TunTooBig, packet.len());
            if paths.allow_ptb(dst, now)
                && let Some(ptb) = pmtu::packet_too_big(packet, limit.inner_mtu, limit.reporter)
            {
                ptbs.push(ptb);
            }
        }
    }

    /// Writes the ICMPv6 Packet Too Big messages [`Overlay::enforce_path_mtu`] made.
    async fn write_packet_too_big(&self, ptbs: &mut Vec<Vec<u8>>) {
        let Some(tun) = &self.tun else {
            ptbs.clear();
            return;
        };
        for ptb in ptbs.drain(..) {
            if let Err(e) = write_plain(tun, &ptb).await {
                self.node.count(AgentStat::TxError, ptb.len());
                debug!(error = %e, "TUN write of a Packet Too Big failed");
            }
        }
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
            Event::Lost {
                remote,
                reason,
                link,
            } => debug!(%remote, ?link, ?reason, "no session left with the remote"),
        }
    }

    /// Sends handshake, cookie, keepalive and control datagrams (few, but batched like
    /// data so they take the same egress rules: a route's interface is honoured).
    async fn send_all(&self, transmits: Vec<Transmit>) {
        if transmits.is_empty() {
            return;
        }
        let mut out: Vec<(&[u8], SocketAddr)> = Vec::with_capacity(transmits.len());
        for t in &transmits {
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
            out.push((&t.datagram, to));
        }
        for i in batch_io::send_batch(&self.socket, &out).await {
            let (datagram, to) = out[i];
            self.node.count(AgentStat::TxError, datagram.len());
            debug!(%to, "send failed");
        }
    }
}

/// Reusable buffers of the receive loop's delivery to the TUN device.
#[derive(Debug, Default)]
pub struct RxScratch {
    /// Opened packets: receive slot, plaintext range in it, authenticated remote.
    opened: Vec<(usize, Range<usize>, Ipv6Addr)>,
    coalescer: Coalescer,
    /// Coalesced packets with their virtio_net_hdr, one TUN write each.
    framed: PacketBatch,
}

/// Batches handed from the TUN reader to its sender at most: one being sent, this many
/// queued, one being filled.
const SEND_PIPELINE: usize = 2;

/// A batch of sealed datagrams on its way from the TUN reader to the sender.
#[derive(Debug)]
struct SealedBatch {
    /// The datagrams, sealed in place.
    batch: PacketBatch,
    /// Slot of each datagram to send, and its next hop.
    to: Vec<(usize, SocketAddr)>,
}

impl Default for SealedBatch {
    fn default() -> Self {
        Self {
            batch: PacketBatch::with_room(HEADER_LEN, TAG_LEN),
            to: Vec::new(),
        }
    }
}

/// Reusable buffers of the TUN reader.
#[derive(Debug, Default)]
struct TxScratch {
    /// Per packet: its overlay destination if it may be sent, and whether it was sealed.
    dsts: Vec<(Option<Ipv6Addr>, bool)>,
    /// ICMPv6 Packet Too Big messages to write to the TUN device.
    ptbs: Vec<Vec<u8>>,
}

/// Writes one plain packet to the TUN device. An offloading TUN wants a
/// `virtio_net_hdr` on every packet; zero means "a plain packet, checksum complete".
async fn write_plain(tun: &Tun, packet: &[u8]) -> std::io::Result<usize> {
    if tun.offload().is_some() {
        let mut framed = Vec::with_capacity(VNET_HDR_LEN + packet.len());
        framed.resize(VNET_HDR_LEN, 0);
        framed.extend_from_slice(packet);
        tun.send(&framed).await
    } else {
        tun.send(packet).await
    }
}

/// The counter of a refused too-big report.
fn too_big_stat(e: &Rejected) -> AgentStat {
    match e {
        Rejected::Malformed(_) => AgentStat::TooBigMalformed,
        Rejected::NotOurs => AgentStat::TooBigNotOurs,
        Rejected::BelowMinimum(_) => AgentStat::TooBigBelowMinimum,
        Rejected::UnknownQuote => AgentStat::TooBigUnknownQuote,
        Rejected::Replayed => AgentStat::TooBigReplayed,
        Rejected::RateLimited => AgentStat::TooBigRateLimited,
        Rejected::UnknownReporter(_) => AgentStat::TooBigUnknownReporter,
        Rejected::BadSignature => AgentStat::TooBigBadSignature,
    }
}

fn stat_for(e: &InboundError) -> AgentStat {
    match e {
        InboundError::Open(_) => AgentStat::RxOpenFailed,
        InboundError::UnknownIndex(_) => AgentStat::RxUnknownSession,
        InboundError::RateLimited(_) => AgentStat::HandshakeRateLimited,
        InboundError::Handshake(HandshakeError::Replayed) => AgentStat::HandshakeReplayed,
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
