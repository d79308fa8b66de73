//! The serving side of one content connection: requests read and admitted, responses
//! written one stream at a time, paced by the per-node upload limit, under deadlines
//! that a slow or stalled peer cannot stretch.
//!
//! The decisions are the core's (`serve::Server` admits and paces, `serve::plan_groups`
//! says what of a groups request is sent, `verified::Encoder` checks every byte it
//! sends against the blob's root); this drives them with a socket and the store.
//!
//! Who pays what: the reader buffers at most one request frame (the core's `Deframer`);
//! every request is admitted against the requesting node's limits before anything is
//! queued (so queued work per connection is at most `max_concurrent`); refusals go
//! through a bounded queue, so a node that floods requests without reading its answers
//! stops being read. Encoding runs on a blocking thread in batches of at most
//! [`BATCH_BYTES`], each paid for by the node's upload allowance before it is made.
//!
//! What a connection can hold, and for how long ([`Deadlines`]; docs/content.md, "What
//! a connection holds"):
//! - a slot: a new connection must bring its first request within `request`, every
//!   request frame must arrive whole within `request` of its first byte, and a
//!   connection with no request in progress is closed after `idle` (whatever bytes
//!   trickle in meanwhile);
//! - the writer: a write the peer takes no byte of for `write` closes the connection,
//!   and so does a peer that keeps us waiting longer than the bytes it took earn at
//!   `min_rate` (a credit of at most `write`): a trickling reader is closed like a
//!   silent one, an honest slow link earns far more than it spends;
//! - memory: one batch of at most [`BATCH_BYTES`] and one frame; a manifest answer
//!   (up to 16 MiB) only within a node-wide budget ([`MANIFEST_BUDGET`]); unsent bytes
//!   in the kernel at most [`NOTSENT_LOWAT`] (a stalled connection is reset, which frees
//!   what the kernel still held for it);
//! - disk: a blob's files are let go of while a write or the pacing waits longer than
//!   [`SOURCE_HOLD`], and whenever the store removed the blob meanwhile (evicted or
//!   removed: its blocks are no longer counted against the quota); they are opened
//!   again for the next batch, or the stream ends with "not found".
//!
//! Every close for a deadline is counted per reason (`serve_timeouts_*`) and logged at
//! debug.

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use myconet_content::{
    GroupSet, Hash, PackageId,
    serve::{Allowance, Server, plan_groups},
    verified::{Encoder, encoded_len, groups_byte_len},
    wire::{
        Deframer, ErrorCode, Frame, HaveState, HaveTarget, MAX_DATA_BYTES, MAX_HAVE_RANGES,
        Message, Role,
    },
};
use myconet_store::{BlobSource, BlobStatus, Completeness, StoreError};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::{Notify, Semaphore, SemaphorePermit, mpsc},
};
use tracing::{debug, warn};

use super::{
    counters::Counters,
    error::ContentError,
    frames::{DATA_PREFIX, finish_data, manifest_prefix, start_data},
    store::StoreAccess,
};

/// Most encoded bytes made in one blocking batch (and written in one go): what one
/// connection buffers for a peer that does not read, beside one frame.
pub const BATCH_BYTES: usize = 256 << 10;
/// Payload asked of the encoder per data frame: `fill` may overshoot by one 16 KiB
/// group and its proof pairs, and a frame carries at most `MAX_DATA_BYTES`.
const DATA_FILL: usize = MAX_DATA_BYTES - (16 << 10) - 64;
/// Refusals (and other short answers) queued per connection before its reader waits.
const CTRL_QUEUE: usize = 32;
/// Manifest bytes held for answers at once, all connections together (in KiB): a
/// manifest may be 16 MiB, and 256 connections each holding one would be 4 GiB. An
/// answer beyond the budget is refused as busy (the requester retries).
pub const MANIFEST_BUDGET: usize = 64 << 10;
/// Unsent bytes the kernel keeps per connection (`TCP_NOTSENT_LOWAT`): a write blocks
/// once this much waits to be sent, so the write deadline sees a peer that takes
/// nothing at once, and a stalled peer pins at most this (plus what is in flight) in
/// the kernel. 1 MiB keeps a 1 GB/s path busy while the next batch is encoded.
pub const NOTSENT_LOWAT: u32 = 1 << 20;
/// How long a stream keeps a blob's files open while it waits (on a slow write or on
/// the pacing): past this it lets go of them and opens them again for the next batch,
/// so a stalled peer cannot keep the blocks of an evicted blob allocated.
pub const SOURCE_HOLD: Duration = Duration::from_secs(1);
/// Delay a busy manifest refusal asks for.
const MANIFEST_RETRY_MS: u32 = 1000;

/// The deadlines of every connection (the `content` section: `request_timeout_secs`,
/// `idle_timeout_secs`, `write_timeout_secs`, `min_send_rate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// A new connection's first request, and every request frame from its first byte,
    /// must arrive whole within this.
    pub request: Duration,
    /// A connection with no request in progress is closed after this long.
    pub idle: Duration,
    /// A write the peer takes no byte of for this long closes the connection; also
    /// the credit of the minimum rate.
    pub write: Duration,
    /// Bytes per second a peer must take while we wait on it (0: no minimum).
    pub min_rate: u64,
}

impl Default for Deadlines {
    /// 10 s for a request (a request frame is at most ~16 KiB: 0.13 s at 1 Mbit/s),
    /// 30 s idle (a requester opens its connection when it has a request and pipelines
    /// the next before the last ends, so an idle connection is a finished download),
    /// 20 s without a byte taken (several TCP retransmission back-offs), and 4 KiB/s:
    /// a 1 Mbit/s peer takes 30 times that, and a host holding all 256 slots must read
    /// 1 MiB/s from us.
    fn default() -> Self {
        Self {
            request: Duration::from_secs(10),
            idle: Duration::from_secs(30),
            write: Duration::from_secs(20),
            min_rate: 4 << 10,
        }
    }
}

/// Why a connection was closed on a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    /// A request frame (or a new connection's first) did not arrive in time.
    Request,
    /// No request in progress for the idle timeout.
    Idle,
    /// A write the peer took nothing of for the write timeout.
    Write,
    /// The peer took bytes more slowly than the minimum rate for longer than its credit.
    Rate,
}

impl Expired {
    fn what(self) -> &'static str {
        match self {
            Self::Request => "a request did not arrive in time",
            Self::Idle => "idle",
            Self::Write => "the peer took nothing of a write in time",
            Self::Rate => "the peer reads below the minimum rate",
        }
    }
}

/// What every connection shares: the store, the per-node limits, the counters.
pub struct ServeCtx {
    /// The store.
    pub store: StoreAccess,
    /// Admission and pacing per requesting node (its /64).
    pub limits: Mutex<Server<u64>>,
    /// Counters.
    pub counters: Arc<Counters>,
    /// The deadlines of every connection.
    pub deadlines: Deadlines,
    /// Test only: flip a byte in every data frame.
    pub fault_corrupt: bool,
    /// Ids handed to `limits`: requests are admitted under ids unique across this
    /// node's connections, so two downloads of one node on two connections (each
    /// numbering its requests from 1) never collide there.
    next_internal: AtomicU32,
    /// KiB of manifests held for answers ([`MANIFEST_BUDGET`]).
    manifests: Semaphore,
}

impl ServeCtx {
    /// A context over `store` with `limits` and `deadlines`.
    pub fn new(
        store: StoreAccess,
        limits: Server<u64>,
        counters: Arc<Counters>,
        deadlines: Deadlines,
        fault_corrupt: bool,
    ) -> Self {
        Self {
            store,
            limits: Mutex::new(limits),
            counters,
            deadlines,
            fault_corrupt,
            next_internal: AtomicU32::new(1),
            manifests: Semaphore::new(MANIFEST_BUDGET),
        }
    }

    fn limits(&self) -> std::sync::MutexGuard<'_, Server<u64>> {
        self.limits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets idle nodes whose allowance has refilled (run now and then).
    pub fn handle_timeout(&self) {
        self.limits().handle_timeout(Instant::now());
    }

    /// Room for a manifest of `len` bytes in the node-wide budget, if there is some.
    fn manifest_room(&self, len: usize) -> Option<SemaphorePermit<'_>> {
        let kib = u32::try_from(len.div_ceil(1024).max(1)).ok()?;
        self.manifests.try_acquire_many(kib).ok()
    }

    /// Counts and logs a close of `peer`'s connection on a deadline.
    fn expired(&self, peer: u64, why: Expired) {
        let c = &self.counters;
        Counters::inc(match why {
            Expired::Request => &c.serve_timeouts_request,
            Expired::Idle => &c.serve_timeouts_idle,
            Expired::Write => &c.serve_timeouts_write,
            Expired::Rate => &c.serve_timeouts_rate,
        });
        debug!(node = %format_args!("{peer:016x}"), reason = why.what(), "content: connection closed on a deadline");
    }
}

/// A request admitted on one connection.
struct Job {
    id: u32,
    internal: u32,
    kind: JobKind,
}

enum JobKind {
    Manifest(PackageId),
    Groups {
        blob: Hash,
        size: u64,
        groups: GroupSet,
    },
    Have(HaveTarget),
}

/// The requests of one connection in progress (queued or streaming), by wire id, with
/// whether the requester cancelled them, and since when none is (the idle clock).
struct Active {
    state: Mutex<ActiveState>,
    /// Woken when the last request in progress ends (the reader's idle clock starts).
    idle: Notify,
}

struct ActiveState {
    requests: HashMap<u32, Entry>,
    /// When the last request ended (or the connection was accepted).
    idle_since: Instant,
    /// Whether a request was ever admitted (until then the first-request deadline).
    admitted: bool,
}

#[derive(Clone, Copy)]
struct Entry {
    internal: u32,
    cancelled: bool,
}

impl Active {
    fn new() -> Self {
        Self {
            state: Mutex::new(ActiveState {
                requests: HashMap::new(),
                idle_since: Instant::now(),
                admitted: false,
            }),
            idle: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActiveState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cancelled(&self, id: u32) -> bool {
        self.lock().requests.get(&id).is_some_and(|e| e.cancelled)
    }

    /// Request `id` ended; the idle clock starts when it was the last.
    fn finish(&self, id: u32) {
        let mut s = self.lock();
        s.requests.remove(&id);
        if s.requests.is_empty() {
            s.idle_since = Instant::now();
            drop(s);
            self.idle.notify_one();
        }
    }

    /// When the reader must have seen more, and what it is waiting for: a frame begun
    /// at `partial_since` must be whole within the request deadline; with no request
    /// in progress the connection must bring its first request within the request
    /// deadline and later ones within the idle timeout. `None` while requests are in
    /// progress and no frame is begun (the writer's deadlines hold then).
    fn read_deadline(
        &self,
        d: &Deadlines,
        partial_since: Option<Instant>,
    ) -> Option<(Instant, Expired)> {
        let frame = partial_since.map(|t| (t + d.request, Expired::Request));
        let s = self.lock();
        let idle = s.requests.is_empty().then(|| {
            if s.admitted {
                (s.idle_since + d.idle, Expired::Idle)
            } else {
                (s.idle_since + d.request, Expired::Request)
            }
        });
        match (frame, idle) {
            (Some(f), Some(i)) => Some(if i.0 < f.0 { i } else { f }),
            (f, i) => f.or(i),
        }
    }
}

/// Serves one connection from node `peer` (its /64) until it closes, fails or expires.
pub async fn serve_connection(ctx: Arc<ServeCtx>, stream: TcpStream, peer: u64) {
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(&stream).set_tcp_notsent_lowat(NOTSENT_LOWAT);
    let (r, w) = stream.into_split();
    let active = Active::new();
    let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
    let (ctrl_tx, ctrl_rx) = mpsc::channel(CTRL_QUEUE);
    let out = Sender::new(&ctx, w, peer);
    let reader = read_requests(&ctx, r, peer, &active, jobs_tx, ctrl_tx);
    let writer = write_responses(&ctx, out, peer, &active, jobs_rx, ctrl_rx);
    tokio::pin!(reader, writer);
    tokio::select! {
        read = &mut reader => {
            // A requester that closed its half after its requests still gets the
            // answers (under the write deadlines); a broken or expired stream gets
            // nothing more.
            if read.is_ok() {
                let _ = writer.await;
            }
        }
        _ = &mut writer => {}
    }
    let now = Instant::now();
    let left: Vec<Entry> = active.lock().requests.drain().map(|(_, e)| e).collect();
    let mut limits = ctx.limits();
    for e in left {
        limits.finish(now, &peer, e.internal);
    }
}

/// Reads and admits requests until the stream ends (`Ok`), or breaks or expires
/// (`Err`).
async fn read_requests(
    ctx: &ServeCtx,
    mut r: OwnedReadHalf,
    peer: u64,
    active: &Active,
    jobs: mpsc::UnboundedSender<Job>,
    ctrl: mpsc::Sender<Vec<u8>>,
) -> Result<(), ()> {
    let mut deframer = Deframer::new(Role::Provider);
    let mut buf = vec![0u8; 16 << 10];
    // When the first byte of a frame not yet whole arrived.
    let mut partial_since: Option<Instant> = None;
    loop {
        let deadline = active.read_deadline(&ctx.deadlines, partial_since);
        let n = tokio::select! {
            read = r.read(&mut buf) => match read {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(_) => return Err(()),
            },
            // The last request ended: the idle clock runs from now.
            () = active.idle.notified() => continue,
            () = sleep_until(deadline.map(|d| d.0)) => {
                if let Some((_, why)) = deadline {
                    ctx.expired(peer, why);
                }
                return Err(());
            }
        };
        let mut input = &buf[..n];
        loop {
            let had_input = !input.is_empty();
            let frame = match deframer.next_frame(&mut input) {
                Ok(Some(f)) => {
                    partial_since = None;
                    f
                }
                Ok(None) => {
                    if had_input {
                        partial_since.get_or_insert_with(Instant::now);
                    }
                    break;
                }
                Err(e) => {
                    Counters::inc(&ctx.counters.serve_bad_frames);
                    debug!(error = %e, "content: bad frame header; closing");
                    return Err(());
                }
            };
            let parsed = Frame::new_checked(frame)
                .map_err(|e| e.to_string())
                .and_then(|f| Message::parse(&f, Role::Provider).map_err(|e| e.to_string()));
            let msg = match parsed {
                Ok(m) => m,
                Err(e) => {
                    Counters::inc(&ctx.counters.serve_bad_frames);
                    debug!(error = %e, "content: bad request; closing");
                    return Err(());
                }
            };
            let id = msg.id();
            let kind = match msg {
                Message::GetManifest { package, .. } => JobKind::Manifest(package),
                Message::GetGroups {
                    blob, size, groups, ..
                } => JobKind::Groups { blob, size, groups },
                Message::GetHave { target, .. } => JobKind::Have(target),
                Message::Cancel { id } => {
                    // A cancel for a finished or unknown request does nothing.
                    if let Some(e) = active.lock().requests.get_mut(&id) {
                        e.cancelled = true;
                    }
                    continue;
                }
                // The header check lets only requests through on this side.
                _ => return Err(()),
            };
            match admit(ctx, peer, id, active) {
                Ok(internal) => {
                    if jobs.send(Job { id, internal, kind }).is_err() {
                        return Err(());
                    }
                }
                Err((code, retry_after_ms)) => {
                    // A refusal is no activity: it does not hold the connection open.
                    let refusal = Message::Error {
                        id,
                        code,
                        retry_after_ms,
                    };
                    if ctrl.send(refusal.to_bytes()).await.is_err() {
                        return Err(());
                    }
                }
            }
        }
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Admits request `id` of `peer` under a fresh internal id, or says why not.
fn admit(ctx: &ServeCtx, peer: u64, id: u32, active: &Active) -> Result<u32, (ErrorCode, u32)> {
    let mut act = active.lock();
    if act.requests.contains_key(&id) {
        // A replay of a live request cannot double its cost.
        Counters::inc(&ctx.counters.serve_refused_bad);
        return Err((ErrorCode::BadRequest, 0));
    }
    let now = Instant::now();
    let mut limits = ctx.limits();
    // Internal ids wrap after 2^32 requests; one still in progress is skipped.
    for _ in 0..4 {
        let internal = ctx.next_internal.fetch_add(1, Ordering::Relaxed).max(1);
        match limits.admit(now, &peer, internal) {
            Ok(()) => {
                act.requests.insert(
                    id,
                    Entry {
                        internal,
                        cancelled: false,
                    },
                );
                act.admitted = true;
                Counters::inc(&ctx.counters.serve_requests);
                return Ok(internal);
            }
            Err(r) if r.code == ErrorCode::BadRequest => continue,
            Err(r) => {
                Counters::inc(&ctx.counters.serve_refused_busy);
                return Err((r.code, r.retry_after_ms));
            }
        }
    }
    Counters::inc(&ctx.counters.serve_refused_bad);
    Err((ErrorCode::Busy, 100))
}

/// The minimum-rate account of one connection: the time the peer keeps us waiting in
/// writes is paid from a credit of at most `write`, which each byte it takes refills by
/// 1 / `min_rate` seconds. A peer reading at `min_rate` or faster never runs out; one
/// reading at a fraction f of it runs out after about `write` / (1 - f) of waiting.
#[derive(Debug, Clone, Copy)]
struct Credit(Duration);

impl Credit {
    fn new(d: &Deadlines) -> Self {
        Self(d.write)
    }

    /// How long the next write may wait for the peer, and what expires then.
    fn limit(self, d: &Deadlines) -> (Duration, Expired) {
        if d.min_rate > 0 && self.0 < d.write {
            (self.0, Expired::Rate)
        } else {
            (d.write, Expired::Write)
        }
    }

    /// The peer took `n` bytes after keeping us waiting `waited`.
    fn took(&mut self, d: &Deadlines, n: usize, waited: Duration) {
        if d.min_rate > 0 {
            let earned = Duration::from_secs_f64(n as f64 / d.min_rate as f64);
            self.0 = (self.0 + earned).saturating_sub(waited).min(d.write);
        }
    }
}

/// The write half of a connection under its write deadlines: every write must see
/// the peer take a byte within `write`, and the time it waits is paid from the
/// connection's [`Credit`].
struct Sender<'a> {
    w: OwnedWriteHalf,
    ctx: &'a ServeCtx,
    peer: u64,
    credit: Credit,
}

impl<'a> Sender<'a> {
    fn new(ctx: &'a ServeCtx, w: OwnedWriteHalf, peer: u64) -> Self {
        Self {
            w,
            ctx,
            peer,
            credit: Credit::new(&ctx.deadlines),
        }
    }

    /// Writes all of `buf`, or fails (`TimedOut` when a deadline expired: the
    /// connection is then reset, so the kernel drops what it still held for it).
    async fn write_all(&mut self, mut buf: &[u8]) -> std::io::Result<()> {
        let d = self.ctx.deadlines;
        while !buf.is_empty() {
            let (limit, why) = self.credit.limit(&d);
            let start = Instant::now();
            match tokio::time::timeout(limit, self.w.write(buf)).await {
                Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(Ok(n)) => {
                    buf = &buf[n..];
                    self.credit.took(&d, n, start.elapsed());
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    self.ctx.expired(self.peer, why);
                    // Reset rather than close: a close would leave the unsent bytes
                    // (and the socket) to the kernel until the peer reads them.
                    let _ =
                        socket2::SockRef::from(self.w.as_ref()).set_linger(Some(Duration::ZERO));
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
            }
        }
        Ok(())
    }
}

/// Writes refusals at once and answers admitted requests in order, one stream at a time.
async fn write_responses(
    ctx: &ServeCtx,
    mut out: Sender<'_>,
    peer: u64,
    active: &Active,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    mut ctrl: mpsc::Receiver<Vec<u8>>,
) -> std::io::Result<()> {
    let mut ctrl_open = true;
    loop {
        tokio::select! {
            biased;
            f = ctrl.recv(), if ctrl_open => match f {
                Some(f) => out.write_all(&f).await?,
                None => ctrl_open = false,
            },
            j = jobs.recv() => match j {
                Some(job) => {
                    let (id, internal) = (job.id, job.internal);
                    let r = answer(ctx, &mut out, peer, active, &mut ctrl, job).await;
                    active.finish(id);
                    ctx.limits().finish(Instant::now(), &peer, internal);
                    r?;
                }
                None => return Ok(()),
            },
        }
    }
}

/// Sends what is queued in `ctrl` without waiting.
async fn drain_ctrl(
    out: &mut Sender<'_>,
    ctrl: &mut mpsc::Receiver<Vec<u8>>,
) -> std::io::Result<()> {
    while let Ok(f) = ctrl.try_recv() {
        out.write_all(&f).await?;
    }
    Ok(())
}

fn error_frame(id: u32, code: ErrorCode) -> Vec<u8> {
    Message::Error {
        id,
        code,
        retry_after_ms: 0,
    }
    .to_bytes()
}

/// Waits until `peer` may be sent bytes, then returns how many (at most `want`).
async fn pace(ctx: &ServeCtx, peer: u64, want: usize) -> usize {
    loop {
        let a = ctx.limits().allowance(Instant::now(), &peer, want);
        match a {
            Allowance::Now(n) => return n.max(1),
            Allowance::At(t) => {
                Counters::inc(&ctx.counters.serve_rate_waits);
                tokio::time::sleep_until(t.into()).await;
            }
        }
    }
}

/// Writes `bytes` paced by `peer`'s allowance.
async fn send_paced(
    ctx: &ServeCtx,
    out: &mut Sender<'_>,
    peer: u64,
    bytes: &[u8],
) -> std::io::Result<()> {
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = pace(ctx, peer, rest.len()).await.min(rest.len());
        out.write_all(&rest[..n]).await?;
        ctx.limits().consume(&peer, n);
        Counters::add(&ctx.counters.serve_bytes, n as u64);
        rest = &rest[n..];
    }
    Ok(())
}

/// Answers one admitted request.
async fn answer(
    ctx: &ServeCtx,
    out: &mut Sender<'_>,
    peer: u64,
    active: &Active,
    ctrl: &mut mpsc::Receiver<Vec<u8>>,
    job: Job,
) -> std::io::Result<()> {
    let id = job.id;
    if active.cancelled(id) {
        Counters::inc(&ctx.counters.serve_cancelled);
        return out.write_all(&error_frame(id, ErrorCode::Cancelled)).await;
    }
    match job.kind {
        JobKind::Manifest(package) => {
            let bytes = ctx.store.run(move |s| Ok(s.manifest(&package)?)).await;
            match bytes {
                Ok(Some(bytes)) => {
                    let Some(_room) = ctx.manifest_room(bytes.len()) else {
                        drop(bytes);
                        Counters::inc(&ctx.counters.serve_refused_busy);
                        let busy = Message::Error {
                            id,
                            code: ErrorCode::Busy,
                            retry_after_ms: MANIFEST_RETRY_MS,
                        };
                        return out.write_all(&busy.to_bytes()).await;
                    };
                    Counters::inc(&ctx.counters.serve_manifests);
                    // The frame is its prefix and the stored bytes: no second copy.
                    send_paced(ctx, out, peer, &manifest_prefix(id, bytes.len())).await?;
                    send_paced(ctx, out, peer, &bytes).await
                }
                Ok(None) => {
                    Counters::inc(&ctx.counters.serve_not_found);
                    out.write_all(&error_frame(id, ErrorCode::NotFound)).await
                }
                Err(e) => {
                    warn!(error = %e, "content: reading a manifest to serve failed");
                    Counters::inc(&ctx.counters.serve_local_errors);
                    out.write_all(&error_frame(id, ErrorCode::Unavailable))
                        .await
                }
            }
        }
        JobKind::Have(target) => {
            let reply = ctx.store.run(move |s| have(s, id, target)).await;
            let frame = match reply {
                Ok(f) => f,
                Err(e) => {
                    warn!(error = %e, "content: answering a have request failed");
                    error_frame(id, ErrorCode::Unavailable)
                }
            };
            out.write_all(&frame).await
        }
        JobKind::Groups { blob, size, groups } => {
            stream_groups(ctx, out, peer, active, ctrl, id, blob, size, groups).await
        }
    }
}

/// The have reply for `target`: partial sets are cut to what one reply carries.
fn have(
    s: &dyn myconet_store::Store,
    id: u32,
    target: HaveTarget,
) -> Result<Vec<u8>, ContentError> {
    let (state, groups) = match target {
        HaveTarget::Blob { hash, size } => match s.blob_status(&hash)? {
            BlobStatus::Missing => (HaveState::None, GroupSet::new()),
            BlobStatus::Complete { size: have } | BlobStatus::Partial { size: have, .. }
                if have != size =>
            {
                return Ok(error_frame(id, ErrorCode::SizeMismatch));
            }
            BlobStatus::Complete { .. } => (HaveState::Complete, GroupSet::new()),
            BlobStatus::Partial { verified, .. } => {
                (HaveState::Partial, verified.first_ranges(MAX_HAVE_RANGES))
            }
        },
        HaveTarget::Package(p) => match s.package(&p)? {
            None => (HaveState::None, GroupSet::new()),
            Some(info) => match info.completeness {
                Completeness::Complete => (HaveState::Complete, GroupSet::new()),
                Completeness::Partial { .. } => (HaveState::Partial, GroupSet::new()),
            },
        },
    };
    Ok(Message::Have { id, state, groups }.to_bytes())
}

/// Opens `blob` to serve it, or the error frame that ends request `id`.
async fn open_source(ctx: &ServeCtx, id: u32, blob: Hash) -> Result<BlobSource, Vec<u8>> {
    match ctx.store.run(move |s| Ok(s.source(&blob)?)).await {
        Ok(src) => Ok(src),
        Err(ContentError::Store(StoreError::UnknownBlob(_))) => {
            Counters::inc(&ctx.counters.serve_not_found);
            Err(error_frame(id, ErrorCode::NotFound))
        }
        Err(e) => {
            warn!(error = %e, %blob, "content: opening a blob to serve failed");
            Counters::inc(&ctx.counters.serve_local_errors);
            Err(error_frame(id, ErrorCode::Unavailable))
        }
    }
}

/// Runs `fut`, letting go of `src` if it takes longer than [`SOURCE_HOLD`]: a blob's
/// files are held while it is read, not while a slow peer or the pacing keeps us.
async fn release_if_slow<T>(src: &mut Option<BlobSource>, fut: impl Future<Output = T>) -> T {
    tokio::pin!(fut);
    if src.is_some() {
        match tokio::time::timeout(SOURCE_HOLD, &mut fut).await {
            Ok(v) => return v,
            Err(_) => *src = None,
        }
    }
    fut.await
}

#[allow(clippy::too_many_arguments)]
async fn stream_groups(
    ctx: &ServeCtx,
    out: &mut Sender<'_>,
    peer: u64,
    active: &Active,
    ctrl: &mut mpsc::Receiver<Vec<u8>>,
    id: u32,
    blob: Hash,
    size: u64,
    groups: GroupSet,
) -> std::io::Result<()> {
    let src = match open_source(ctx, id, blob).await {
        Ok(src) => src,
        Err(frame) => return out.write_all(&frame).await,
    };
    let offered = match plan_groups(size, &groups, Some((src.size, &src.verified))) {
        Ok(g) => g,
        Err(code) => {
            Counters::inc(&ctx.counters.serve_not_found);
            return out.write_all(&error_frame(id, code)).await;
        }
    };
    let Ok(encoder) = Encoder::new(blob, src.size, &offered) else {
        return out.write_all(&error_frame(id, ErrorCode::BadRequest)).await;
    };
    Counters::inc(&ctx.counters.serve_groups_requests);
    let data_bytes = groups_byte_len(src.size, &offered);
    let total = encoded_len(src.size, &offered).unwrap_or(data_bytes);
    let mut src = Some(src);
    let header = Message::Groups {
        id,
        groups: offered,
    }
    .to_bytes();
    release_if_slow(&mut src, send_paced(ctx, out, peer, &header)).await?;
    let mut encoder = Some(encoder);
    // One buffer per stream, reused batch after batch.
    let mut frames = Vec::new();
    loop {
        release_if_slow(&mut src, drain_ctrl(out, ctrl)).await?;
        if active.cancelled(id) {
            Counters::inc(&ctx.counters.serve_cancelled);
            return out.write_all(&error_frame(id, ErrorCode::Cancelled)).await;
        }
        let allowed = release_if_slow(&mut src, pace(ctx, peer, BATCH_BYTES)).await;
        // A source let go of, or whose blob the store removed meanwhile (its blocks are
        // no longer counted against the quota), is opened again: the stream goes on
        // if the blob is still here, and ends with "not found" if it is not.
        let source = match src.take() {
            Some(s) if !s.is_unlinked() => s,
            _ => match open_source(ctx, id, blob).await {
                Ok(s) => s,
                Err(frame) => return out.write_all(&frame).await,
            },
        };
        let Some(enc) = encoder.take() else {
            return Ok(());
        };
        let fault = ctx.fault_corrupt;
        let buf = std::mem::take(&mut frames);
        let batch =
            tokio::task::spawn_blocking(move || encode_batch(enc, source, buf, id, allowed, fault))
                .await;
        let Ok(batch) = batch else {
            return out
                .write_all(&error_frame(id, ErrorCode::Unavailable))
                .await;
        };
        src = Some(batch.src);
        release_if_slow(&mut src, out.write_all(&batch.frames)).await?;
        ctx.limits().consume(&peer, batch.frames.len());
        Counters::add(&ctx.counters.serve_bytes, batch.frames.len() as u64);
        frames = batch.frames;
        match batch.outcome {
            Ok(true) => {
                Counters::add(&ctx.counters.serve_data_bytes, data_bytes);
                Counters::add(
                    &ctx.counters.serve_proof_bytes,
                    total.saturating_sub(data_bytes),
                );
                return Ok(());
            }
            Ok(false) => encoder = Some(batch.encoder),
            Err(e) => {
                // The encoder checks our own copy against its root as it reads: a
                // corrupt or unreadable copy is never sent.
                warn!(%blob, error = %e, "content: this node's copy failed while serving; run `myconet-ctl content verify`");
                Counters::inc(&ctx.counters.serve_local_errors);
                return out
                    .write_all(&error_frame(id, ErrorCode::Unavailable))
                    .await;
            }
        }
    }
}

struct Batch {
    encoder: Encoder,
    src: BlobSource,
    frames: Vec<u8>,
    /// `Ok(true)` once the encoding is complete.
    outcome: Result<bool, String>,
}

/// Encodes data frames of request `id` into `frames` (emptied first) until about
/// `allowed` bytes are made or the encoding ends (blocking: reads the blob).
fn encode_batch(
    mut encoder: Encoder,
    src: BlobSource,
    mut frames: Vec<u8>,
    id: u32,
    allowed: usize,
    fault: bool,
) -> Batch {
    frames.clear();
    frames.reserve(allowed.min(BATCH_BYTES) + MAX_DATA_BYTES + DATA_PREFIX);
    let outcome = loop {
        let start = start_data(&mut frames, id);
        let r = encoder.fill(&src.data, &src.outboard, &mut frames, DATA_FILL);
        if frames.len() == start + DATA_PREFIX {
            frames.truncate(start);
        } else {
            if fault && let Some(last) = frames.last_mut() {
                *last ^= 0x5a;
            }
            finish_data(&mut frames, start);
        }
        match r {
            Ok(true) => break Ok(true),
            Ok(false) if frames.len() >= allowed => break Ok(false),
            Ok(false) => {}
            Err(e) => {
                break Err(e.to_string());
            }
        }
    };
    Batch {
        encoder,
        src,
        frames,
        outcome,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Feeds `credit` writes of `n` bytes each taking `waited`, up to `max` of them;
    /// returns how many went before a write's wait exceeded its limit, and what expired.
    fn run(d: &Deadlines, n: usize, waited: Duration, max: u32) -> (u32, Option<Expired>) {
        let mut credit = Credit::new(d);
        for i in 0..max {
            let (limit, why) = credit.limit(d);
            if waited > limit {
                return (i, Some(why));
            }
            credit.took(d, n, waited);
        }
        (max, None)
    }

    #[test]
    fn slow_honest_links_keep_their_credit_and_trickles_and_stalls_expire() {
        let d = Deadlines::default();
        // A 1 Mbit/s peer: 64 KiB every 0.52 s, for an hour.
        assert_eq!(run(&d, 64 << 10, 524 * MS, 7_000), (7_000, None));
        // A 64 kbit/s peer (twice the minimum): 8 KiB a second, for an hour.
        assert_eq!(run(&d, 8 << 10, 1000 * MS, 3_600), (3_600, None));
        // A trickle at half the minimum (2 KiB/s) makes progress every second, but
        // runs out of credit in about 2 × 20 s.
        let (went, why) = run(&d, 2 << 10, 1000 * MS, 3_600);
        assert_eq!(why, Some(Expired::Rate));
        assert!((35..=45).contains(&went), "{went}");
        // One byte a second: about 20 s.
        let (went, why) = run(&d, 1, 1000 * MS, 3_600);
        assert_eq!(why, Some(Expired::Rate));
        assert!((18..=21).contains(&went), "{went}");
        // Nothing taken: the write deadline, at once.
        assert_eq!(run(&d, 1, d.write + MS, 10), (0, Some(Expired::Write)));
        // Without a minimum rate only the write deadline holds.
        let no_min = Deadlines { min_rate: 0, ..d };
        assert_eq!(run(&no_min, 1, 19_000 * MS, 1_000), (1_000, None));
    }

    #[test]
    fn the_read_deadline_follows_the_connection_state() {
        let d = Deadlines::default();
        let active = Active::new();
        let accepted = active.lock().idle_since;
        // A new connection: its first request within the request deadline.
        assert_eq!(
            active.read_deadline(&d, None),
            Some((accepted + d.request, Expired::Request))
        );
        {
            let mut s = active.lock();
            s.admitted = true;
            s.requests.insert(
                7,
                Entry {
                    internal: 1,
                    cancelled: false,
                },
            );
        }
        // A request in progress and no frame begun: the writer's deadlines hold.
        assert_eq!(active.read_deadline(&d, None), None);
        // A frame begun meanwhile must be whole in time whatever is in progress.
        let begun = Instant::now();
        assert_eq!(
            active.read_deadline(&d, Some(begun)),
            Some((begun + d.request, Expired::Request))
        );
        active.finish(7);
        let idle = active.lock().idle_since;
        assert!(idle >= accepted);
        assert_eq!(
            active.read_deadline(&d, None),
            Some((idle + d.idle, Expired::Idle))
        );
        // A begun frame's deadline comes first when it is the earlier one.
        assert_eq!(
            active.read_deadline(&d, Some(begun)),
            Some((begun + d.request, Expired::Request))
        );
    }
}
