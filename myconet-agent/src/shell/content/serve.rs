//! The serving side of one content connection: requests read and admitted, responses
//! written one stream at a time, paced by the per-node upload limit.
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

use std::{
    collections::HashMap,
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
    sync::mpsc,
};
use tracing::{debug, warn};

use super::{
    counters::Counters,
    error::ContentError,
    frames::{DATA_PREFIX, finish_data, start_data},
    store::StoreAccess,
};

/// Most encoded bytes made in one blocking batch (and written in one go).
pub const BATCH_BYTES: usize = 1 << 20;
/// Payload asked of the encoder per data frame: `fill` may overshoot by one 16 KiB
/// group and its proof pairs, and a frame carries at most `MAX_DATA_BYTES`.
const DATA_FILL: usize = MAX_DATA_BYTES - (16 << 10) - 64;
/// A connection with no request in progress that sends nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Refusals (and other short answers) queued per connection before its reader waits.
const CTRL_QUEUE: usize = 32;

/// What every connection shares: the store, the per-node limits, the counters.
pub struct ServeCtx {
    /// The store.
    pub store: StoreAccess,
    /// Admission and pacing per requesting node (its /64).
    pub limits: Mutex<Server<u64>>,
    /// Counters.
    pub counters: Arc<Counters>,
    /// Test only: flip a byte in every data frame.
    pub fault_corrupt: bool,
    /// Ids handed to `limits`: requests are admitted under ids unique across this
    /// node's connections, so two downloads of one node on two connections (each
    /// numbering its requests from 1) never collide there.
    next_internal: AtomicU32,
}

impl ServeCtx {
    /// A context over `store` with `limits`.
    pub fn new(
        store: StoreAccess,
        limits: Server<u64>,
        counters: Arc<Counters>,
        fault_corrupt: bool,
    ) -> Self {
        Self {
            store,
            limits: Mutex::new(limits),
            counters,
            fault_corrupt,
            next_internal: AtomicU32::new(1),
        }
    }

    fn limits(&self) -> std::sync::MutexGuard<'_, Server<u64>> {
        self.limits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets idle nodes whose allowance has refilled (run now and then).
    pub fn handle_timeout(&self) {
        self.limits().handle_timeout(Instant::now());
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
/// whether the requester cancelled them.
#[derive(Default)]
struct Active(Mutex<HashMap<u32, Entry>>);

#[derive(Clone, Copy)]
struct Entry {
    internal: u32,
    cancelled: bool,
}

impl Active {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Entry>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn cancelled(&self, id: u32) -> bool {
        self.lock().get(&id).is_some_and(|e| e.cancelled)
    }
}

/// Serves one connection from node `peer` (its /64) until it closes, fails or idles.
pub async fn serve_connection(ctx: Arc<ServeCtx>, stream: TcpStream, peer: u64) {
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    let active = Active::default();
    let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
    let (ctrl_tx, ctrl_rx) = mpsc::channel(CTRL_QUEUE);
    let reader = read_requests(&ctx, r, peer, &active, jobs_tx, ctrl_tx);
    let writer = write_responses(&ctx, w, peer, &active, jobs_rx, ctrl_rx);
    tokio::pin!(reader, writer);
    tokio::select! {
        read = &mut reader => {
            // A requester that closed its half after its requests still gets the
            // answers; a broken stream gets nothing more.
            if read.is_ok() {
                let _ = writer.await;
            }
        }
        _ = &mut writer => {}
    }
    let now = Instant::now();
    let left: Vec<Entry> = active.lock().drain().map(|(_, e)| e).collect();
    let mut limits = ctx.limits();
    for e in left {
        limits.finish(now, &peer, e.internal);
    }
}

/// Reads and admits requests until the stream ends (`Ok`) or breaks (`Err`).
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
    loop {
        let n = match tokio::time::timeout(IDLE_TIMEOUT, r.read(&mut buf)).await {
            Err(_) if active.lock().is_empty() => return Ok(()),
            Err(_) => continue,
            Ok(Ok(0)) => return Ok(()),
            Ok(Ok(n)) => n,
            Ok(Err(_)) => return Err(()),
        };
        let mut input = &buf[..n];
        loop {
            let frame = match deframer.next_frame(&mut input) {
                Ok(Some(f)) => f,
                Ok(None) => break,
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
                    if let Some(e) = active.lock().get_mut(&id) {
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

/// Admits request `id` of `peer` under a fresh internal id, or says why not.
fn admit(ctx: &ServeCtx, peer: u64, id: u32, active: &Active) -> Result<u32, (ErrorCode, u32)> {
    let mut act = active.lock();
    if act.contains_key(&id) {
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
                act.insert(
                    id,
                    Entry {
                        internal,
                        cancelled: false,
                    },
                );
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

/// Writes refusals at once and answers admitted requests in order, one stream at a time.
async fn write_responses(
    ctx: &ServeCtx,
    mut w: OwnedWriteHalf,
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
                Some(f) => w.write_all(&f).await?,
                None => ctrl_open = false,
            },
            j = jobs.recv() => match j {
                Some(job) => {
                    let (id, internal) = (job.id, job.internal);
                    let r = answer(ctx, &mut w, peer, active, &mut ctrl, job).await;
                    active.lock().remove(&id);
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
    w: &mut OwnedWriteHalf,
    ctrl: &mut mpsc::Receiver<Vec<u8>>,
) -> std::io::Result<()> {
    while let Ok(f) = ctrl.try_recv() {
        w.write_all(&f).await?;
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
    w: &mut OwnedWriteHalf,
    peer: u64,
    bytes: &[u8],
) -> std::io::Result<()> {
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = pace(ctx, peer, rest.len()).await.min(rest.len());
        w.write_all(&rest[..n]).await?;
        ctx.limits().consume(&peer, n);
        Counters::add(&ctx.counters.serve_bytes, n as u64);
        rest = &rest[n..];
    }
    Ok(())
}

/// Answers one admitted request.
async fn answer(
    ctx: &ServeCtx,
    w: &mut OwnedWriteHalf,
    peer: u64,
    active: &Active,
    ctrl: &mut mpsc::Receiver<Vec<u8>>,
    job: Job,
) -> std::io::Result<()> {
    let id = job.id;
    if active.cancelled(id) {
        Counters::inc(&ctx.counters.serve_cancelled);
        return w.write_all(&error_frame(id, ErrorCode::Cancelled)).await;
    }
    match job.kind {
        JobKind::Manifest(package) => {
            let bytes = ctx.store.run(move |s| Ok(s.manifest(&package)?)).await;
            match bytes {
                Ok(Some(bytes)) => {
                    Counters::inc(&ctx.counters.serve_manifests);
                    let frame = Message::Manifest { id, bytes: &bytes }.to_bytes();
                    send_paced(ctx, w, peer, &frame).await
                }
                Ok(None) => {
                    Counters::inc(&ctx.counters.serve_not_found);
                    w.write_all(&error_frame(id, ErrorCode::NotFound)).await
                }
                Err(e) => {
                    warn!(error = %e, "content: reading a manifest to serve failed");
                    Counters::inc(&ctx.counters.serve_local_errors);
                    w.write_all(&error_frame(id, ErrorCode::Unavailable)).await
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
            w.write_all(&frame).await
        }
        JobKind::Groups { blob, size, groups } => {
            stream_groups(ctx, w, peer, active, ctrl, id, blob, size, groups).await
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

#[allow(clippy::too_many_arguments)]
async fn stream_groups(
    ctx: &ServeCtx,
    w: &mut OwnedWriteHalf,
    peer: u64,
    active: &Active,
    ctrl: &mut mpsc::Receiver<Vec<u8>>,
    id: u32,
    blob: Hash,
    size: u64,
    groups: GroupSet,
) -> std::io::Result<()> {
    let src = match ctx.store.run(move |s| Ok(s.source(&blob)?)).await {
        Ok(src) => src,
        Err(ContentError::Store(StoreError::UnknownBlob(_))) => {
            Counters::inc(&ctx.counters.serve_not_found);
            return w.write_all(&error_frame(id, ErrorCode::NotFound)).await;
        }
        Err(e) => {
            warn!(error = %e, %blob, "content: opening a blob to serve failed");
            Counters::inc(&ctx.counters.serve_local_errors);
            return w.write_all(&error_frame(id, ErrorCode::Unavailable)).await;
        }
    };
    let offered = match plan_groups(size, &groups, Some((src.size, &src.verified))) {
        Ok(g) => g,
        Err(code) => {
            Counters::inc(&ctx.counters.serve_not_found);
            return w.write_all(&error_frame(id, code)).await;
        }
    };
    let Ok(encoder) = Encoder::new(blob, src.size, &offered) else {
        return w.write_all(&error_frame(id, ErrorCode::BadRequest)).await;
    };
    Counters::inc(&ctx.counters.serve_groups_requests);
    let data_bytes = groups_byte_len(src.size, &offered);
    let total = encoded_len(src.size, &offered).unwrap_or(data_bytes);
    send_paced(
        ctx,
        w,
        peer,
        &Message::Groups {
            id,
            groups: offered,
        }
        .to_bytes(),
    )
    .await?;
    let mut state = Some((encoder, src));
    loop {
        drain_ctrl(w, ctrl).await?;
        if active.cancelled(id) {
            Counters::inc(&ctx.counters.serve_cancelled);
            return w.write_all(&error_frame(id, ErrorCode::Cancelled)).await;
        }
        let allowed = pace(ctx, peer, BATCH_BYTES).await;
        let Some((encoder, src)) = state.take() else {
            return Ok(());
        };
        let fault = ctx.fault_corrupt;
        let batch =
            tokio::task::spawn_blocking(move || encode_batch(encoder, src, id, allowed, fault))
                .await;
        let Ok(batch) = batch else {
            return w.write_all(&error_frame(id, ErrorCode::Unavailable)).await;
        };
        w.write_all(&batch.frames).await?;
        ctx.limits().consume(&peer, batch.frames.len());
        Counters::add(&ctx.counters.serve_bytes, batch.frames.len() as u64);
        match batch.outcome {
            Ok(true) => {
                Counters::add(&ctx.counters.serve_data_bytes, data_bytes);
                Counters::add(
                    &ctx.counters.serve_proof_bytes,
                    total.saturating_sub(data_bytes),
                );
                return Ok(());
            }
            Ok(false) => state = Some((batch.encoder, batch.src)),
            Err(e) => {
                // The encoder checks our own copy against its root as it reads: a
                // corrupt or unreadable copy is never sent.
                warn!(%blob, error = %e, "content: this node's copy failed while serving; run `myconet-ctl content verify`");
                Counters::inc(&ctx.counters.serve_local_errors);
                return w.write_all(&error_frame(id, ErrorCode::Unavailable)).await;
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

/// Encodes data frames of request `id` until about `allowed` bytes are made or the
/// encoding ends (blocking: reads the blob).
fn encode_batch(
    mut encoder: Encoder,
    src: BlobSource,
    id: u32,
    allowed: usize,
    fault: bool,
) -> Batch {
    let mut frames = Vec::with_capacity(allowed.min(BATCH_BYTES) + MAX_DATA_BYTES + DATA_PREFIX);
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
