//! One package download: the `fetch::Fetch` core driven with one TCP connection per
//! provider and the store, on a thread of its own.
//!
//! Why a thread: every verified group goes to the store (`write_group`), which writes
//! and now and then commits with fsync; that must never stall the runtime's workers,
//! which carry the overlay. The core and the store calls share the thread, so events
//! reach the store in the order the core made them (proof pairs before the groups they
//! prove) with no hand-off per group. Connections are tokio tasks; frames come to the
//! thread through one bounded channel (the download's memory: at most
//! [`INPUT_QUEUE`] frames of at most 64 KiB), and a ticker task wakes the thread for
//! the core's timers and for progress reports.

use std::{
    collections::HashMap,
    net::SocketAddrV6,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use myconet_content::{
    Mri, PackageId, SignedManifest,
    fetch::{DropReason, Event, Fetch, FetchConfig},
    wire::{Frame, Message, Role},
};
use myconet_proto::content::v1 as pb;
use myconet_store::{Hold, Store};
use tokio::{
    runtime::Handle,
    sync::{broadcast, mpsc},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use super::{counters::Counters, store::StoreAccess};

/// Frames queued between the connections and the driver.
pub const INPUT_QUEUE: usize = 16;
/// How often the driver wakes for timers and progress.
pub const TICK: Duration = Duration::from_millis(100);
/// How often progress is reported while nothing else happens.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Progress messages kept for a slow subscriber (older ones are skipped).
const PROGRESS_QUEUE: usize = 64;

/// What the driver reacts to.
#[derive(Debug)]
pub enum Input {
    /// A frame from a provider's connection.
    Frame {
        /// The provider.
        provider: SocketAddrV6,
        /// Which connection to it.
        generation: u64,
        /// The frame.
        frame: Vec<u8>,
    },
    /// A provider's connection ended.
    Closed {
        /// The provider.
        provider: SocketAddrV6,
        /// Which connection to it.
        generation: u64,
        /// Why, if it failed.
        error: Option<String>,
    },
    /// More providers (a second `get` of the same package).
    AddProviders(Vec<SocketAddrV6>),
    /// Stop the download.
    Cancel(String),
    /// Timer tick.
    Tick,
}

/// A running download, shared by the `Get` calls that follow it.
pub struct DownloadHandle {
    /// The package.
    pub id: PackageId,
    input: mpsc::Sender<Input>,
    progress: broadcast::Sender<pb::Progress>,
    latest: Mutex<pb::Progress>,
}

impl DownloadHandle {
    /// The latest progress and a receiver of what follows.
    pub fn subscribe(&self) -> (pb::Progress, broadcast::Receiver<pb::Progress>) {
        let rx = self.progress.subscribe();
        let latest = self
            .latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        (latest, rx)
    }

    /// Adds providers to the download.
    pub fn add_providers(&self, providers: Vec<SocketAddrV6>) {
        if !providers.is_empty() {
            let _ = self.input.try_send(Input::AddProviders(providers));
        }
    }

    /// Asks the download to stop (it reports `failed` with `why`).
    pub async fn cancel(&self, why: &str) {
        let _ = self.input.send(Input::Cancel(why.to_owned())).await;
    }

    fn publish(&self, p: pb::Progress, global: &broadcast::Sender<pb::Progress>) {
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = p.clone();
        let _ = self.progress.send(p.clone());
        let _ = global.send(p);
    }
}

/// True for a progress state after which nothing follows.
pub fn is_final(state: &str) -> bool {
    matches!(state, "complete" | "failed" | "done")
}

/// What a driver needs from the service.
#[derive(Clone)]
pub struct DriverCtx {
    /// The store.
    pub store: StoreAccess,
    /// Counters.
    pub counters: Arc<Counters>,
    /// The runtime the connections run on.
    pub runtime: Handle,
    /// Every download's progress (the `Watch` call).
    pub global: broadcast::Sender<pb::Progress>,
    /// Tuning of the core.
    pub config: FetchConfig,
}

/// Starts downloading `id` from `providers` on a thread of its own; `finished` runs on
/// that thread when it ends (the service forgets the download there).
pub fn start(
    ctx: DriverCtx,
    id: PackageId,
    providers: Vec<SocketAddrV6>,
    pin: bool,
    finished: impl FnOnce() + Send + 'static,
) -> std::io::Result<Arc<DownloadHandle>> {
    let (tx, rx) = mpsc::channel(INPUT_QUEUE);
    let (progress, _) = broadcast::channel(PROGRESS_QUEUE);
    let handle = Arc::new(DownloadHandle {
        id,
        input: tx.clone(),
        progress,
        latest: Mutex::new(pb::Progress {
            mri: Mri::package(id).to_string(),
            state: "starting".into(),
            ..pb::Progress::default()
        }),
    });
    let h = handle.clone();
    std::thread::Builder::new()
        .name("content-fetch".into())
        .spawn(move || {
            let mut d = Driver::new(ctx, h, tx, pin);
            d.run(rx, providers);
            finished();
        })?;
    Ok(handle)
}

struct Conn {
    generation: u64,
    out: mpsc::UnboundedSender<Vec<u8>>,
    task: JoinHandle<()>,
}

struct Driver {
    ctx: DriverCtx,
    handle: Arc<DownloadHandle>,
    input: mpsc::Sender<Input>,
    holds: Vec<Hold>,
    conns: HashMap<SocketAddrV6, Conn>,
    next_generation: u64,
    started: Instant,
    resumed: u64,
    last_report: Instant,
    /// The last failure of each provider's connection, for the error message.
    last_errors: HashMap<SocketAddrV6, String>,
    /// Received bytes already added to the `fetch_bytes` counter.
    counted_bytes: u64,
    /// When the first verified group was stored, seconds after the start.
    first_byte: Option<f64>,
}

/// How a download ended.
enum End {
    Complete,
    Failed(String),
}

impl Driver {
    fn new(
        ctx: DriverCtx,
        handle: Arc<DownloadHandle>,
        input: mpsc::Sender<Input>,
        pin: bool,
    ) -> Self {
        let now = Instant::now();
        Self {
            ctx,
            handle,
            input,
            holds: if pin { vec![Hold::Pin] } else { Vec::new() },
            conns: HashMap::new(),
            next_generation: 1,
            started: now,
            resumed: 0,
            last_report: now,
            last_errors: HashMap::new(),
            counted_bytes: 0,
            first_byte: None,
        }
    }

    fn store(&self) -> &dyn Store {
        self.ctx.store.blocking()
    }

    fn run(&mut self, mut rx: mpsc::Receiver<Input>, providers: Vec<SocketAddrV6>) {
        Counters::inc(&self.ctx.counters.fetch_started);
        let ticker = {
            let tx = self.input.clone();
            self.ctx.runtime.spawn(async move {
                let mut t = tokio::time::interval(TICK);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    t.tick().await;
                    if tx.send(Input::Tick).await.is_err() {
                        break;
                    }
                }
            })
        };
        let mut fetch = None;
        let end = self.drive(&mut rx, providers, &mut fetch);
        ticker.abort();
        for (_, c) in self.conns.drain() {
            c.task.abort();
        }
        if let Err(e) = self.store().flush() {
            warn!(error = %e, "content: flushing the store after a download failed");
        }
        let id = self.handle.id;
        match end {
            End::Complete => {
                Counters::inc(&self.ctx.counters.fetch_completed);
                info!(package = %Mri::package(id), "content: download complete");
                self.report(fetch.as_ref(), "complete", String::new(), String::new());
            }
            End::Failed(e) => {
                Counters::inc(&self.ctx.counters.fetch_failed);
                info!(package = %Mri::package(id), error = %e, "content: download failed");
                self.report(fetch.as_ref(), "failed", String::new(), e);
            }
        }
    }

    fn drive(
        &mut self,
        rx: &mut mpsc::Receiver<Input>,
        providers: Vec<SocketAddrV6>,
        slot: &mut Option<Fetch<SocketAddrV6>>,
    ) -> End {
        let id = self.handle.id;
        let now = Instant::now();
        // What the store has already: a manifest means resume (or nothing to do).
        let manifest = match self.store().manifest(&id) {
            Ok(m) => m,
            Err(e) => return End::Failed(e.to_string()),
        };
        let fetch = match manifest {
            Some(bytes) => {
                let m = match SignedManifest::parse(&bytes) {
                    Ok(m) => m,
                    Err(e) => return End::Failed(format!("the stored manifest is invalid: {e}")),
                };
                if let Err(e) = self.store().put_manifest(&m, &self.holds) {
                    return End::Failed(e.to_string());
                }
                let mut f = Fetch::with_manifest(now, m, self.ctx.config.clone());
                match self.store().have(&id) {
                    Ok(have) => f.handle_local(now, &have),
                    Err(e) => return End::Failed(e.to_string()),
                }
                f
            }
            None => Fetch::new(now, id, self.ctx.config.clone()),
        };
        let fetch = slot.insert(fetch);
        self.resumed = fetch.progress().verified_bytes;
        Counters::add(&self.ctx.counters.fetch_resumed_bytes, self.resumed);
        if fetch.manifest().is_none() && providers.is_empty() {
            return End::Failed(format!(
                "{} is not in the store and no provider was named (--from ADDR)",
                Mri::package(id)
            ));
        }
        for p in providers {
            fetch.add_provider(now, p);
        }
        loop {
            if let Some(end) = self.pump(fetch) {
                return end;
            }
            let Some(input) = rx.blocking_recv() else {
                return End::Failed("the agent is shutting down".into());
            };
            let now = Instant::now();
            match input {
                Input::Frame {
                    provider,
                    generation,
                    frame,
                } => {
                    if self
                        .conns
                        .get(&provider)
                        .is_some_and(|c| c.generation == generation)
                    {
                        self.on_frame(fetch, now, provider, &frame);
                    }
                }
                Input::Closed {
                    provider,
                    generation,
                    error,
                } => {
                    if self
                        .conns
                        .get(&provider)
                        .is_some_and(|c| c.generation == generation)
                    {
                        self.conns.remove(&provider);
                        if let Some(e) = error {
                            debug!(%provider, error = %e, "content: provider connection ended");
                            if e.starts_with("connecting") {
                                Counters::inc(&self.ctx.counters.fetch_connect_failures);
                            }
                            self.last_errors.insert(provider, e);
                        }
                        fetch.handle_closed(now, &provider);
                    }
                }
                Input::AddProviders(list) => {
                    for p in list {
                        fetch.add_provider(now, p);
                    }
                }
                Input::Cancel(why) => return End::Failed(why),
                Input::Tick => fetch.handle_timeout(now),
            }
            if now.duration_since(self.last_report) >= PROGRESS_EVERY {
                self.report(Some(fetch), "downloading", String::new(), String::new());
            }
        }
    }

    fn on_frame(
        &mut self,
        fetch: &mut Fetch<SocketAddrV6>,
        now: Instant,
        provider: SocketAddrV6,
        frame: &[u8],
    ) {
        let parsed = Frame::new_checked(frame)
            .map_err(|e| e.to_string())
            .and_then(|f| Message::parse(&f, Role::Requester).map_err(|e| e.to_string()));
        match parsed {
            Ok(msg) => fetch.handle_message(now, &provider, &msg),
            Err(e) => {
                // A malformed frame breaks the stream: close and let the core count it
                // as a lost connection (three and the provider is dropped).
                Counters::inc(&self.ctx.counters.fetch_providers_protocol);
                self.last_errors
                    .insert(provider, format!("sent a malformed frame: {e}"));
                if let Some(c) = self.conns.remove(&provider) {
                    c.task.abort();
                }
                fetch.handle_closed(now, &provider);
            }
        }
    }

    /// Sends what the core wants sent and acts on its events; `Some` when it ended.
    fn pump(&mut self, fetch: &mut Fetch<SocketAddrV6>) -> Option<End> {
        loop {
            let mut idle = true;
            while let Some(t) = fetch.poll_transmit() {
                idle = false;
                self.send(t.provider, t.message.to_bytes());
            }
            while let Some(ev) = fetch.poll_event() {
                idle = false;
                if let Some(end) = self.on_event(fetch, ev) {
                    return Some(end);
                }
            }
            if idle {
                return None;
            }
        }
    }

    fn on_event(
        &mut self,
        fetch: &mut Fetch<SocketAddrV6>,
        ev: Event<SocketAddrV6>,
    ) -> Option<End> {
        let store = self.ctx.store.clone();
        let store = store.blocking();
        match ev {
            Event::Manifest(m) => {
                if let Err(e) = store.put_manifest(&m, &self.holds) {
                    return Some(End::Failed(e.to_string()));
                }
                let now = Instant::now();
                match store.have(&m.id()) {
                    Ok(have) => fetch.handle_local(now, &have),
                    Err(e) => return Some(End::Failed(e.to_string())),
                }
                self.resumed = fetch.progress().verified_bytes;
                self.report(
                    Some(fetch),
                    "downloading",
                    "manifest verified".into(),
                    String::new(),
                );
            }
            Event::Parent { blob, parent } => {
                if let Err(e) = store.write_parent(&blob, &parent) {
                    return Some(End::Failed(e.to_string()));
                }
            }
            Event::Group {
                blob, group, data, ..
            } => {
                if let Err(e) = store.write_group(&blob, group, &data) {
                    return Some(End::Failed(e.to_string()));
                }
                Counters::add(&self.ctx.counters.fetch_data_bytes, data.len() as u64);
                if self.first_byte.is_none() {
                    self.first_byte = Some(self.started.elapsed().as_secs_f64());
                }
            }
            Event::BlobComplete(_) => {}
            Event::ProviderDropped { provider, reason } => {
                let c = &self.ctx.counters;
                match &reason {
                    DropReason::Corrupt => Counters::inc(&c.fetch_providers_corrupt),
                    DropReason::Protocol(_) => Counters::inc(&c.fetch_providers_protocol),
                    DropReason::Unresponsive => Counters::inc(&c.fetch_providers_unresponsive),
                }
                warn!(%provider, %reason, "content: provider dropped");
                if let Some(conn) = self.conns.remove(&provider) {
                    conn.task.abort();
                }
                let event = format!("provider {provider} dropped: {reason}");
                self.last_errors.insert(provider, reason.to_string());
                self.report(Some(fetch), "downloading", event, String::new());
            }
            Event::Done => return Some(End::Complete),
            Event::Failed(e) => {
                let mut why = e.to_string();
                if !self.last_errors.is_empty() {
                    let mut list: Vec<String> = self
                        .last_errors
                        .iter()
                        .map(|(p, e)| format!("{p}: {e}"))
                        .collect();
                    list.sort();
                    why = format!("{why} ({})", list.join("; "));
                }
                return Some(End::Failed(why));
            }
        }
        None
    }

    /// Writes `frame` on `provider`'s connection, opening one if there is none.
    fn send(&mut self, provider: SocketAddrV6, frame: Vec<u8>) {
        if let Some(c) = self.conns.get(&provider) {
            // If its task has ended, its `Closed` is on the way: the core then takes
            // back every request of that connection, this one included.
            let _ = c.out.send(frame);
            return;
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        let (out, out_rx) = mpsc::unbounded_channel();
        let _ = out.send(frame);
        let input = self.input.clone();
        let task = self
            .ctx
            .runtime
            .spawn(super::provider::run(provider, generation, out_rx, input));
        self.conns.insert(
            provider,
            Conn {
                generation,
                out,
                task,
            },
        );
    }

    fn report(
        &mut self,
        fetch: Option<&Fetch<SocketAddrV6>>,
        state: &str,
        event: String,
        error: String,
    ) {
        self.last_report = Instant::now();
        let elapsed = self.started.elapsed().as_secs_f64();
        let mut p = pb::Progress {
            mri: Mri::package(self.handle.id).to_string(),
            state: state.to_owned(),
            resumed_bytes: self.resumed,
            event,
            error,
            elapsed_seconds: elapsed,
            first_byte_seconds: self.first_byte.unwrap_or(0.0),
            ..pb::Progress::default()
        };
        if let Some(f) = fetch {
            let pr = f.progress();
            p.total_bytes = pr.total_bytes;
            p.verified_bytes = pr.verified_bytes;
            p.received_bytes = f.stats().bytes_received;
            if elapsed > 0.0 {
                p.rate = pr.verified_bytes.saturating_sub(self.resumed) as f64 / elapsed;
            }
            p.providers = pr
                .providers
                .into_iter()
                .map(|pp| pb::ProviderProgress {
                    address: pp.provider.to_string(),
                    delivered_bytes: pp.delivered,
                    rate: pp.rate,
                    in_flight: u32::try_from(pp.in_flight).unwrap_or(u32::MAX),
                    dropped: pp.dropped.map(|d| d.to_string()).unwrap_or_default(),
                })
                .collect();
            let received = f.stats().bytes_received;
            Counters::add(
                &self.ctx.counters.fetch_bytes,
                received.saturating_sub(self.counted_bytes),
            );
            self.counted_bytes = received;
        }
        self.handle.publish(p, &self.ctx.global);
    }
}
