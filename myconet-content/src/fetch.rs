//! The download state machine for one package, sans-IO.
//!
//! Driven like every Myconet core: the shell passes what happened
//! ([`Fetch::handle_message`], [`Fetch::handle_local`], [`Fetch::handle_closed`],
//! [`Fetch::handle_timeout`]) and takes what to do ([`Fetch::poll_transmit`]: requests
//! for a provider's connection; [`Fetch::poll_event`]: verified data to store, progress,
//! the end; [`Fetch::poll_timeout`]).
//!
//! The algorithm, with reasons:
//! 1. **Manifest.** Asked of one provider at a time (the first that answers is enough);
//!    its bytes must hash to the package id, else the provider is dropped as corrupt.
//!    A manifest that hashes right but does not parse fails the download: the MRI
//!    itself names an invalid package.
//! 2. **Local state.** The shell reports the groups its store already verified; they
//!    are never asked for again (resume costs nothing but what was in flight).
//! 3. **Units.** The missing groups of each distinct blob are cut into units of at most
//!    `unit_groups` groups aligned to multiples of it (aligned units share the most
//!    proof: 1 MiB units cost 0.41-0.47 % in proofs), asked in file order so early
//!    files finish early.
//! 4. **Parallel providers.** Every usable provider keeps up to `depth` requests in
//!    flight (pipelined on its connection, so its link never idles between units);
//!    faster providers finish units sooner and so take more of them.
//! 5. **Slow providers.** When no unassigned work is left, an idle provider duplicates
//!    the largest unfinished unit of another provider (endgame); whichever delivers a
//!    group first wins, the other request is cancelled when its unit is done. A
//!    provider that makes no progress (answers no request and delivers no verified
//!    group) for `stall_timeout` while it has requests loses them (cancelled and
//!    reassigned) and backs off; after `max_failures` it is dropped. Bytes alone are
//!    not progress, so a trickle stalls like silence.
//! 6. **Verification.** Every group is checked against the file's root before it is
//!    handed to the shell. A provider whose data or proofs fail is dropped at once and
//!    counted; its unfinished units go back to the others. Protocol violations
//!    (unsolicited or malformed responses, groups not asked for, more data than the
//!    encoding holds) drop it too.
//! 7. **Refusals.** Not found (or a subset offered) is remembered per provider and blob,
//!    busy backs off for the stated delay; a size mismatch from every provider of a
//!    blob fails the download with that reason (the manifest disagrees with the data).
//!
//! Providers are identified by `P` (the shell's overlay address type). Request ids are
//! unique within one `Fetch` (counting from 1): a shell that carries several downloads
//! over one connection to a provider must keep their ids apart (the serving side
//! refuses an id the peer already has in progress).

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    hash::Hash as StdHash,
    time::{Duration, Instant},
};

use crate::{
    GroupSet, Hash, SignedManifest,
    manifest::ManifestError,
    mri::PackageId,
    verified::{Decoder, Verified, VerifiedParent, encoded_len, group_count, groups_byte_len},
    wire::{ErrorCode, MAX_REQUEST_GROUPS, MAX_REQUEST_RANGES, Message},
};

/// Tuning of downloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchConfig {
    /// Groups per request unit (64 = 1 MiB; at most `wire::MAX_REQUEST_GROUPS`, and a
    /// unit over held groups' holes is cut to `wire::MAX_REQUEST_RANGES` ranges).
    pub unit_groups: u64,
    /// Requests in flight per provider.
    pub depth: usize,
    /// A provider with requests that makes no progress (answers no request, delivers no
    /// verified group) for this long has stalled: with 16 KiB groups and 10 s, a
    /// provider slower than 1.6 kB/s.
    pub stall_timeout: Duration,
    /// Stalls and lost connections before a provider is dropped.
    pub max_failures: u32,
    /// Back-off after a stall or a lost connection.
    pub backoff: Duration,
    /// Duplicate slow units near the end.
    pub endgame: bool,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            unit_groups: 64,
            depth: 4,
            stall_timeout: Duration::from_secs(10),
            max_failures: 3,
            backoff: Duration::from_secs(1),
            endgame: true,
        }
    }
}

/// Longest busy delay a provider's `retry after` can impose: one frame must not park a
/// download for days (the field allows 49).
pub const MAX_BUSY_DELAY: Duration = Duration::from_secs(60);

/// The back-off for a busy answer: at least 10 ms, at most [`MAX_BUSY_DELAY`].
fn busy_delay(retry_after_ms: u32) -> Duration {
    Duration::from_millis(retry_after_ms.max(10).into()).min(MAX_BUSY_DELAY)
}

/// Why a provider was dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropReason {
    /// Sent data or proofs that failed verification (or a manifest with the wrong hash).
    Corrupt,
    /// Broke the protocol.
    Protocol(String),
    /// Stalled or lost its connection too often.
    Unresponsive,
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Corrupt => f.write_str("sent data that failed verification"),
            Self::Protocol(w) => write!(f, "protocol violation: {w}"),
            Self::Unresponsive => f.write_str("unresponsive"),
        }
    }
}

/// Why a download failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The manifest the MRI names is invalid.
    #[error("the package's manifest is invalid: {0}")]
    InvalidManifest(ManifestError),
    /// No provider delivered the manifest.
    #[error("no provider has the manifest")]
    NoManifest,
    /// Every provider of a blob holds other data under its hash.
    #[error("file data {blob}: the size in the manifest disagrees with the data providers hold")]
    SizeMismatch {
        /// The blob.
        blob: Hash,
    },
    /// Data is missing and no usable provider has it.
    #[error("no usable provider has the remaining {missing_bytes} bytes")]
    Unavailable {
        /// Bytes still missing.
        missing_bytes: u64,
    },
}

/// Something for the shell to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<P> {
    /// The manifest arrived and verified: store it, then call [`Fetch::handle_local`].
    Manifest(SignedManifest),
    /// A verified proof pair of `blob`: store it in the blob's outboard.
    Parent {
        /// The blob.
        blob: Hash,
        /// The pair and its offset.
        parent: VerifiedParent,
    },
    /// A verified group of `blob`: write it; once written (with the pairs before it), it
    /// is verified data.
    Group {
        /// The blob.
        blob: Hash,
        /// Group index.
        group: u64,
        /// Byte offset in the blob.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Every group of `blob` verified.
    BlobComplete(Hash),
    /// A provider was dropped: close its connection.
    ProviderDropped {
        /// The provider.
        provider: P,
        /// Why.
        reason: DropReason,
    },
    /// Every byte of the package verified.
    Done,
    /// The download failed.
    Failed(FetchError),
}

/// A request to send on a provider's connection (opening it if needed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit<P> {
    /// The provider.
    pub provider: P,
    /// The request (owned).
    pub message: Message<'static>,
}

/// Download counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchStats {
    /// Groups requests sent (duplicates included).
    pub requests: u64,
    /// Endgame duplicates sent.
    pub duplicates: u64,
    /// Groups received that were already verified (duplicate deliveries).
    pub duplicate_groups: u64,
    /// Encoded bytes received (data and proofs).
    pub bytes_received: u64,
    /// Providers dropped for corrupt data.
    pub corrupt_providers: u64,
    /// Providers dropped for protocol violations.
    pub protocol_violations: u64,
    /// Stalls detected.
    pub stalls: u64,
    /// Busy refusals received.
    pub busy: u64,
}

/// Progress of one provider.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderProgress<P> {
    /// The provider.
    pub provider: P,
    /// Data bytes it delivered first (verified and new).
    pub delivered: u64,
    /// Its average rate while it had requests, bytes per second.
    pub rate: f64,
    /// Requests in flight.
    pub in_flight: usize,
    /// Dropped, and why.
    pub dropped: Option<DropReason>,
}

/// Where a download stands.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress<P> {
    /// Bytes in the package's distinct blobs (0 until the manifest is known).
    pub total_bytes: u64,
    /// Bytes verified (from the store at start, or received).
    pub verified_bytes: u64,
    /// Per provider.
    pub providers: Vec<ProviderProgress<P>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Manifest,
    Local,
    Download,
    Done,
    Failed,
}

#[derive(Debug)]
struct ProviderState<P> {
    addr: P,
    dropped: Option<DropReason>,
    backoff_until: Option<Instant>,
    failures: u32,
    in_flight: usize,
    /// When it last made progress: answered a request (a manifest, a groups header, an
    /// error, a stream's end) or delivered a verified group. Bytes alone are not
    /// progress: a trickle would never stall.
    last_activity: Instant,
    delivered: u64,
    received: u64,
    busy_since: Option<Instant>,
    busy_time: Duration,
    /// Groups of blob i this provider does not hold (learned from refusals).
    lacks: HashMap<usize, GroupSet>,
    /// Blobs it can no longer help with, skipped by the scheduler.
    exhausted: Skip,
    tried_manifest: bool,
    /// Requests given up while the connection stayed open: their late frames are
    /// checked against what they may still carry and ignored (not progress, not
    /// violations). An entry ends with the request's error or the last byte of its
    /// encoding, as it does on the provider.
    stale: HashMap<u32, Stale>,
}

/// The blob indices a provider may still help with, in file order. A blob is removed
/// once every group of it not yet verified is one the provider refused: verified groups
/// and refusals only ever grow, so a removal is final, and a union-find next-pointer
/// (with path halving) finds the next candidate in amortised constant time. This keeps
/// scheduling linear in the number of files (a manifest may hold 100,000) instead of a
/// walk over every file for every request.
#[derive(Debug, Default)]
struct Skip {
    /// `next[i] == i` while blob `i` is a candidate; the sentinel `next[n] == n`.
    next: Vec<u32>,
}

impl Skip {
    /// The first candidate at or after `i` (`n` if none), for `n` blobs.
    fn find(&mut self, n: usize, mut i: usize) -> usize {
        if self.next.len() != n + 1 {
            // n <= MAX_FILES, far below u32::MAX.
            self.next = (0..=n as u32).collect();
        }
        while self.next[i] as usize != i {
            let skip = self.next[self.next[i] as usize];
            self.next[i] = skip;
            i = skip as usize;
        }
        i
    }

    /// Blob `i` (a candidate just returned by `find`) is no longer one.
    fn remove(&mut self, i: usize) {
        self.next[i] = i as u32 + 1;
    }
}

/// What a cancelled request may still bring on its connection.
#[derive(Debug)]
enum Stale {
    /// A manifest request: a manifest or an error ends it.
    Manifest,
    /// A groups request whose stream had not started: a groups header (a subset of
    /// `asked`) may still come, or an error.
    Header {
        /// The blob's size.
        size: u64,
        /// The groups asked for.
        asked: GroupSet,
    },
    /// A groups stream under way: at most this many encoded bytes remain.
    Stream(u64),
}

/// Most cancelled requests whose streams may still be arriving on one connection. An
/// honest provider ends each (its stream or an error) in order, so it never has more
/// than what was recently in flight; one that never ends them is dropped.
const MAX_STALE: usize = 1024;

impl<P> ProviderState<P> {
    fn usable(&self, now: Instant) -> bool {
        self.dropped.is_none() && self.backoff_until.is_none_or(|t| t <= now)
    }
    fn rate(&self, now: Instant) -> f64 {
        let t = self.busy_time
            + self
                .busy_since
                .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
        if t.is_zero() {
            0.0
        } else {
            self.received as f64 / t.as_secs_f64()
        }
    }
}

#[derive(Debug)]
struct BlobState {
    hash: Hash,
    size: u64,
    verified: GroupSet,
    assigned: GroupSet,
    mismatch: Vec<usize>,
}

#[derive(Debug)]
struct Request {
    blob: usize,
    asked: GroupSet,
    decoder: Option<Decoder>,
    duplicated: bool,
}

/// One package download.
#[derive(Debug)]
pub struct Fetch<P> {
    package: PackageId,
    config: FetchConfig,
    phase: Phase,
    manifest: Option<SignedManifest>,
    manifest_request: Option<(usize, u32, Instant)>,
    blobs: Vec<BlobState>,
    /// Blobs not yet complete (the download is done at 0).
    incomplete: usize,
    /// Blobs some provider answered size mismatch for (few; checked on every drive).
    mismatched: Vec<usize>,
    providers: Vec<ProviderState<P>>,
    requests: HashMap<(usize, u32), Request>,
    next_id: u32,
    transmits: VecDeque<Transmit<P>>,
    events: VecDeque<Event<P>>,
    stats: FetchStats,
    now: Instant,
}

impl<P: Clone + Eq + StdHash + fmt::Debug> Fetch<P> {
    /// A download of `package` whose manifest must be fetched first.
    pub fn new(now: Instant, package: PackageId, config: FetchConfig) -> Self {
        Self {
            package,
            config,
            phase: Phase::Manifest,
            manifest: None,
            manifest_request: None,
            blobs: Vec::new(),
            incomplete: 0,
            mismatched: Vec::new(),
            providers: Vec::new(),
            requests: HashMap::new(),
            next_id: 1,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: FetchStats::default(),
            now,
        }
    }

    /// A download whose manifest the store already holds: waits for
    /// [`Fetch::handle_local`].
    pub fn with_manifest(now: Instant, manifest: SignedManifest, config: FetchConfig) -> Self {
        let mut f = Self::new(now, manifest.id(), config);
        f.set_manifest(manifest);
        f
    }

    /// The package.
    pub fn package(&self) -> PackageId {
        self.package
    }

    /// The manifest, once known.
    pub fn manifest(&self) -> Option<&SignedManifest> {
        self.manifest.as_ref()
    }

    /// The counters.
    pub fn stats(&self) -> &FetchStats {
        &self.stats
    }

    /// True once done or failed.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Done | Phase::Failed)
    }

    /// Adds a provider (a node the user named, or later one found by placement).
    pub fn add_provider(&mut self, now: Instant, provider: P) {
        self.now = now;
        if self.providers.iter().any(|p| p.addr == provider) {
            return;
        }
        self.providers.push(ProviderState {
            addr: provider,
            dropped: None,
            backoff_until: None,
            failures: 0,
            in_flight: 0,
            last_activity: now,
            delivered: 0,
            received: 0,
            busy_since: None,
            busy_time: Duration::ZERO,
            lacks: HashMap::new(),
            exhausted: Skip::default(),
            tried_manifest: false,
            stale: HashMap::new(),
        });
        self.drive();
    }

    /// The groups the store already verified, per blob (blobs not listed have none).
    pub fn handle_local(&mut self, now: Instant, have: &[(Hash, GroupSet)]) {
        self.now = now;
        if self.phase != Phase::Local {
            return;
        }
        // Blobs are distinct by hash (the manifest refuses one hash at two sizes).
        let index: HashMap<Hash, usize> = self
            .blobs
            .iter()
            .enumerate()
            .map(|(i, b)| (b.hash, i))
            .collect();
        for (hash, groups) in have {
            if let Some(b) = index.get(hash).map(|&i| &mut self.blobs[i]) {
                let all = GroupSet::all(group_count(b.size));
                b.verified = b.verified.union(&groups.intersection(&all));
            }
        }
        self.phase = Phase::Download;
        self.incomplete = 0;
        for i in 0..self.blobs.len() {
            if self.blob_complete(i) {
                self.events
                    .push_back(Event::BlobComplete(self.blobs[i].hash));
            } else {
                self.incomplete += 1;
            }
        }
        self.drive();
    }

    /// A message arrived from `provider` (already deframed and parsed).
    pub fn handle_message(&mut self, now: Instant, provider: &P, msg: &Message<'_>) {
        self.now = now;
        let Some(pi) = self.provider_index(provider) else {
            return;
        };
        if self.providers[pi].dropped.is_some() || self.is_finished() {
            return;
        }
        if self.providers[pi].stale.contains_key(&msg.id()) {
            // A late frame of a request given up on: bounded, and not progress (else a
            // provider could hide a stall behind a trickle of it).
            if let Err(what) = self.on_stale(pi, msg) {
                self.violation(pi, &what);
            }
            self.drive();
            return;
        }
        match msg {
            Message::Manifest { id, bytes } => self.on_manifest(pi, *id, bytes),
            Message::Groups { id, groups } => self.on_groups(pi, *id, groups),
            Message::Data { id, bytes } => self.on_data(pi, *id, bytes),
            Message::Error {
                id,
                code,
                retry_after_ms,
            } => self.on_error(pi, *id, *code, *retry_after_ms),
            Message::Have { .. } => self.violation(pi, "unsolicited have"),
            other => self.violation(
                pi,
                &format!("request {} sent to a requester", other.message_type()),
            ),
        }
        self.drive();
    }

    /// The connection to `provider` closed or failed: its requests go back to the pool.
    pub fn handle_closed(&mut self, now: Instant, provider: &P) {
        self.now = now;
        if let Some(pi) = self.provider_index(provider) {
            let had_manifest = self.manifest_request.is_some_and(|m| m.0 == pi);
            let had_work = self.providers[pi].in_flight > 0 || had_manifest;
            self.release_provider(pi);
            // A new connection carries nothing of the old one.
            self.providers[pi].stale.clear();
            if had_work {
                if had_manifest {
                    self.providers[pi].tried_manifest = false;
                }
                self.fail_provider(pi);
            }
        }
        self.drive();
    }

    /// Runs timers: stalls and back-offs.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        let stall = self.config.stall_timeout;
        for pi in 0..self.providers.len() {
            let p = &self.providers[pi];
            let waiting = p.in_flight > 0 || self.manifest_request.is_some_and(|m| m.0 == pi);
            if p.dropped.is_none()
                && waiting
                && now.saturating_duration_since(p.last_activity) >= stall
            {
                self.stats.stalls += 1;
                if self.manifest_request.is_some_and(|m| m.0 == pi) {
                    self.providers[pi].tried_manifest = false;
                }
                self.cancel_all(pi);
                self.release_provider(pi);
                self.fail_provider(pi);
            }
        }
        self.drive();
    }

    /// When [`Fetch::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_finished() {
            return None;
        }
        let mut t: Option<Instant> = None;
        let mut min = |x: Instant| t = Some(t.map_or(x, |t| t.min(x)));
        for (pi, p) in self.providers.iter().enumerate() {
            if p.dropped.is_some() {
                continue;
            }
            if p.in_flight > 0 || self.manifest_request.is_some_and(|m| m.0 == pi) {
                min(p.last_activity + self.config.stall_timeout);
            }
            if let Some(b) = p.backoff_until.filter(|b| *b > self.now) {
                min(b);
            }
        }
        t
    }

    /// The next request to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit<P>> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event<P>> {
        self.events.pop_front()
    }

    /// Where the download stands.
    pub fn progress(&self) -> Progress<P> {
        let size_of = |b: &BlobState| groups_byte_len(b.size, &b.verified);
        Progress {
            total_bytes: self.blobs.iter().map(|b| b.size).sum(),
            verified_bytes: self.blobs.iter().map(size_of).sum(),
            providers: self
                .providers
                .iter()
                .map(|p| ProviderProgress {
                    provider: p.addr.clone(),
                    delivered: p.delivered,
                    rate: p.rate(self.now),
                    in_flight: p.in_flight,
                    dropped: p.dropped.clone(),
                })
                .collect(),
        }
    }

    // ----- inputs -----------------------------------------------------------------

    fn on_manifest(&mut self, pi: usize, id: u32, bytes: &[u8]) {
        if self
            .manifest_request
            .is_none_or(|(p, i, _)| p != pi || i != id)
        {
            return self.violation(pi, "unsolicited manifest");
        }
        self.manifest_request = None;
        self.providers[pi].last_activity = self.now;
        self.set_idle_if_done(pi);
        if PackageId::of_signed_manifest(bytes) != self.package {
            self.drop_provider(pi, DropReason::Corrupt);
            return;
        }
        match SignedManifest::parse(bytes) {
            Ok(m) => {
                self.events.push_back(Event::Manifest(m.clone()));
                self.set_manifest(m);
            }
            Err(e) => self.fail(FetchError::InvalidManifest(e)),
        }
    }

    fn on_groups(&mut self, pi: usize, id: u32, offered: &GroupSet) {
        let Some(req) = self.requests.get_mut(&(pi, id)) else {
            return self.violation(pi, "groups for an unknown request");
        };
        if req.decoder.is_some() || !req.asked.is_superset(offered) || offered.is_empty() {
            return self.violation(pi, "groups not asked for");
        }
        let b = &self.blobs[req.blob];
        let decoder = match Decoder::new(b.hash, b.size, offered) {
            Ok(d) => d,
            Err(e) => return self.violation(pi, &e.to_string()),
        };
        let missing = req.asked.difference(offered);
        req.asked = offered.clone();
        req.decoder = Some(decoder);
        let blob = req.blob;
        self.providers[pi].last_activity = self.now;
        if !missing.is_empty() {
            let lacks = self.providers[pi].lacks.entry(blob).or_default();
            *lacks = lacks.union(&missing);
            self.recompute_assigned(blob);
        }
    }

    fn on_data(&mut self, pi: usize, id: u32, mut bytes: &[u8]) {
        self.stats.bytes_received += bytes.len() as u64;
        self.providers[pi].received += bytes.len() as u64;
        let Some(req) = self.requests.get_mut(&(pi, id)) else {
            return self.violation(pi, "data for an unknown request");
        };
        let Some(dec) = req.decoder.as_mut() else {
            return self.violation(pi, "data before the groups header");
        };
        if bytes.len() as u64 > dec.remaining() {
            return self.violation(pi, "more data than the encoding holds");
        }
        let blob = req.blob;
        let hash = self.blobs[blob].hash;
        let mut new_bytes = 0u64;
        loop {
            match dec.next(&mut bytes) {
                Ok(Some(Verified::Parent(parent))) => {
                    self.events.push_back(Event::Parent { blob: hash, parent })
                }
                Ok(Some(Verified::Group {
                    group,
                    offset,
                    data,
                })) => {
                    self.providers[pi].last_activity = self.now;
                    let b = &mut self.blobs[blob];
                    if b.verified.contains(group) {
                        self.stats.duplicate_groups += 1;
                        continue;
                    }
                    b.verified.insert(group);
                    new_bytes += data.len() as u64;
                    self.events.push_back(Event::Group {
                        blob: hash,
                        group,
                        offset,
                        data: data.to_vec(),
                    });
                }
                Ok(None) => break,
                Err(_) => {
                    self.drop_provider(pi, DropReason::Corrupt);
                    return;
                }
            }
        }
        self.providers[pi].delivered += new_bytes;
        if req.decoder.as_ref().is_some_and(|d| d.is_done()) {
            self.finish_request(pi, id);
        }
        if new_bytes > 0 {
            // It gained groups, so it was not complete before: this is the one moment.
            if self.blob_complete(blob) {
                self.incomplete -= 1;
                self.events.push_back(Event::BlobComplete(hash));
            }
            self.cancel_covered(blob);
        }
    }

    /// A frame for a cancelled request: checked against what it may still carry.
    fn on_stale(&mut self, pi: usize, msg: &Message<'_>) -> Result<(), String> {
        let stale = &mut self.providers[pi].stale;
        let id = msg.id();
        let Some(entry) = stale.get_mut(&id) else {
            return Ok(());
        };
        match (msg, &*entry) {
            (Message::Error { .. }, _) | (Message::Manifest { .. }, Stale::Manifest) => {
                stale.remove(&id);
            }
            (Message::Groups { groups, .. }, Stale::Header { size, asked })
                if !groups.is_empty() && asked.is_superset(groups) =>
            {
                let len = encoded_len(*size, groups).map_err(|e| e.to_string())?;
                *entry = Stale::Stream(len);
            }
            (Message::Data { bytes, .. }, Stale::Stream(left)) if bytes.len() as u64 <= *left => {
                let left = *left - bytes.len() as u64;
                if left == 0 {
                    stale.remove(&id);
                } else {
                    *entry = Stale::Stream(left);
                }
            }
            (m, _) => {
                return Err(format!(
                    "{} not allowed for cancelled request {id}",
                    m.message_type()
                ));
            }
        }
        Ok(())
    }

    fn on_error(&mut self, pi: usize, id: u32, code: ErrorCode, retry_after_ms: u32) {
        if self
            .manifest_request
            .is_some_and(|(p, i, _)| p == pi && i == id)
        {
            self.manifest_request = None;
            self.providers[pi].last_activity = self.now;
            self.set_idle_if_done(pi);
            if code == ErrorCode::Busy {
                self.stats.busy += 1;
                self.providers[pi].backoff_until = Some(self.now + busy_delay(retry_after_ms));
                self.providers[pi].tried_manifest = false;
            }
            return;
        }
        let Some(req) = self.requests.get(&(pi, id)) else {
            return self.violation(pi, "error for an unknown request");
        };
        let blob = req.blob;
        let asked = req.asked.clone();
        self.providers[pi].last_activity = self.now;
        self.finish_request(pi, id);
        match code {
            ErrorCode::NotFound => {
                let lacks = self.providers[pi].lacks.entry(blob).or_default();
                *lacks = lacks.union(&asked);
            }
            ErrorCode::SizeMismatch => {
                let all = GroupSet::all(group_count(self.blobs[blob].size));
                self.providers[pi].lacks.insert(blob, all);
                if self.blobs[blob].mismatch.is_empty() {
                    self.mismatched.push(blob);
                }
                if !self.blobs[blob].mismatch.contains(&pi) {
                    self.blobs[blob].mismatch.push(pi);
                }
            }
            ErrorCode::Busy => {
                self.stats.busy += 1;
                self.providers[pi].backoff_until = Some(self.now + busy_delay(retry_after_ms));
            }
            // Cancelled answers a cancel, and this request was not cancelled (a
            // cancelled one is stale and never gets here): the provider will not serve
            // it. Forgetting it without a note would hand it the same groups again at
            // once, forever.
            ErrorCode::Cancelled
            | ErrorCode::BadRequest
            | ErrorCode::TooLarge
            | ErrorCode::Unavailable => {
                let lacks = self.providers[pi].lacks.entry(blob).or_default();
                *lacks = lacks.union(&asked);
            }
        }
    }

    // ----- provider bookkeeping ---------------------------------------------------

    fn provider_index(&self, p: &P) -> Option<usize> {
        self.providers.iter().position(|x| x.addr == *p)
    }

    fn violation(&mut self, pi: usize, what: &str) {
        self.stats.protocol_violations += 1;
        self.drop_provider(pi, DropReason::Protocol(what.to_owned()));
    }

    fn drop_provider(&mut self, pi: usize, reason: DropReason) {
        if self.providers[pi].dropped.is_some() {
            return;
        }
        if reason == DropReason::Corrupt {
            self.stats.corrupt_providers += 1;
        }
        self.release_provider(pi);
        self.providers[pi].dropped = Some(reason.clone());
        self.events.push_back(Event::ProviderDropped {
            provider: self.providers[pi].addr.clone(),
            reason,
        });
    }

    /// Forgets every request of provider `pi` (their groups return to the pool).
    fn release_provider(&mut self, pi: usize) {
        let ids: Vec<u32> = self
            .requests
            .keys()
            .filter(|k| k.0 == pi)
            .map(|k| k.1)
            .collect();
        for id in ids {
            self.finish_request(pi, id);
        }
        if self.manifest_request.is_some_and(|m| m.0 == pi) {
            self.manifest_request = None;
        }
        self.set_idle_if_done(pi);
    }

    fn fail_provider(&mut self, pi: usize) {
        let p = &mut self.providers[pi];
        p.failures += 1;
        if p.failures >= self.config.max_failures {
            self.drop_provider(pi, DropReason::Unresponsive);
        } else {
            p.backoff_until = Some(self.now + self.config.backoff * p.failures);
        }
    }

    /// Sends a cancel for every request of `pi` and marks them stale (the caller then
    /// forgets them).
    fn cancel_all(&mut self, pi: usize) {
        let mut ids: Vec<u32> = self
            .requests
            .keys()
            .filter(|k| k.0 == pi)
            .map(|k| k.1)
            .collect();
        if let Some((p, id, _)) = self.manifest_request
            && p == pi
        {
            ids.push(id);
        }
        for id in ids {
            self.cancel(pi, id);
        }
    }

    /// Cancels request `id` of `pi` (a groups request still in `requests`, or the
    /// manifest request): its late frames will be checked against what it may still
    /// carry. The caller then forgets the request.
    fn cancel(&mut self, pi: usize, id: u32) {
        if self.providers[pi].dropped.is_some() {
            return;
        }
        let entry = match self.requests.get(&(pi, id)) {
            Some(r) => match &r.decoder {
                Some(d) => Stale::Stream(d.remaining()),
                None => Stale::Header {
                    size: self.blobs[r.blob].size,
                    asked: r.asked.clone(),
                },
            },
            None => Stale::Manifest,
        };
        if let Stale::Stream(0) = entry {
            // Every byte arrived: nothing can follow.
            return;
        }
        let stale = &mut self.providers[pi].stale;
        stale.insert(id, entry);
        self.send(pi, Message::Cancel { id });
        if self.providers[pi].stale.len() > MAX_STALE {
            self.drop_provider(pi, DropReason::Unresponsive);
        }
    }

    fn set_idle_if_done(&mut self, pi: usize) {
        let busy =
            self.providers[pi].in_flight > 0 || self.manifest_request.is_some_and(|m| m.0 == pi);
        let p = &mut self.providers[pi];
        if !busy && let Some(s) = p.busy_since.take() {
            p.busy_time += self.now.saturating_duration_since(s);
        }
    }

    fn set_busy(&mut self, pi: usize) {
        let p = &mut self.providers[pi];
        if p.busy_since.is_none() {
            p.busy_since = Some(self.now);
            p.last_activity = self.now;
        }
    }

    fn send(&mut self, pi: usize, message: Message<'static>) {
        self.transmits.push_back(Transmit {
            provider: self.providers[pi].addr.clone(),
            message,
        });
    }

    fn alloc_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    // ----- requests ---------------------------------------------------------------

    fn finish_request(&mut self, pi: usize, id: u32) {
        if let Some(req) = self.requests.remove(&(pi, id)) {
            self.providers[pi].in_flight -= 1;
            self.recompute_assigned(req.blob);
            self.set_idle_if_done(pi);
        }
    }

    fn recompute_assigned(&mut self, blob: usize) {
        let mut a = GroupSet::new();
        for r in self.requests.values().filter(|r| r.blob == blob) {
            a = a.union(&r.asked);
        }
        self.blobs[blob].assigned = a;
    }

    fn blob_complete(&self, blob: usize) -> bool {
        let b = &self.blobs[blob];
        b.verified.len() == group_count(b.size)
    }

    /// Cancels requests whose groups are all verified (the losers of the endgame).
    fn cancel_covered(&mut self, blob: usize) {
        let verified = &self.blobs[blob].verified;
        let done: Vec<(usize, u32)> = self
            .requests
            .iter()
            .filter(|(_, r)| r.blob == blob && verified.is_superset(&r.asked))
            .map(|(k, _)| *k)
            .collect();
        for (pi, id) in done {
            // Forgotten at once; its late frames are ignored as stale.
            self.cancel(pi, id);
            self.finish_request(pi, id);
        }
    }

    fn set_manifest(&mut self, m: SignedManifest) {
        self.blobs = m
            .manifest()
            .blobs()
            .into_iter()
            .map(|(hash, size)| BlobState {
                hash,
                size,
                verified: GroupSet::new(),
                assigned: GroupSet::new(),
                mismatch: Vec::new(),
            })
            .collect();
        self.manifest = Some(m);
        self.phase = Phase::Local;
    }

    fn fail(&mut self, e: FetchError) {
        if self.is_finished() {
            return;
        }
        self.phase = Phase::Failed;
        let all: Vec<(usize, u32)> = self.requests.keys().copied().collect();
        for (pi, id) in all {
            self.cancel(pi, id);
            self.finish_request(pi, id);
        }
        self.events.push_back(Event::Failed(e));
    }

    // ----- scheduling -------------------------------------------------------------

    fn drive(&mut self) {
        match self.phase {
            Phase::Manifest => self.drive_manifest(),
            Phase::Download => self.drive_download(),
            _ => {}
        }
    }

    fn drive_manifest(&mut self) {
        if self.manifest_request.is_some() {
            return;
        }
        let now = self.now;
        let next = self
            .providers
            .iter()
            .position(|p| p.usable(now) && !p.tried_manifest);
        match next {
            Some(pi) => {
                let id = self.alloc_id();
                self.providers[pi].tried_manifest = true;
                self.manifest_request = Some((pi, id, now));
                self.set_busy(pi);
                self.send(
                    pi,
                    Message::GetManifest {
                        id,
                        package: self.package,
                    },
                );
            }
            None => {
                let waiting = self.providers.iter().any(|p| {
                    p.dropped.is_none()
                        && (!p.tried_manifest || p.backoff_until.is_some_and(|b| b > now))
                });
                if !waiting && !self.providers.is_empty() {
                    self.fail(FetchError::NoManifest);
                }
            }
        }
    }

    fn drive_download(&mut self) {
        if self.incomplete == 0 {
            self.phase = Phase::Done;
            let all: Vec<(usize, u32)> = self.requests.keys().copied().collect();
            for (pi, id) in all {
                self.cancel(pi, id);
                self.finish_request(pi, id);
            }
            self.events.push_back(Event::Done);
            return;
        }
        let live = self
            .providers
            .iter()
            .filter(|p| p.dropped.is_none())
            .count();
        for &i in &self.mismatched {
            let b = &self.blobs[i];
            // Only answers of providers still in the download count: a dropped one's
            // word (perhaps a lie before it got itself dropped) must not fail a blob
            // that a live provider holds.
            let disagree = b
                .mismatch
                .iter()
                .filter(|&&p| self.providers[p].dropped.is_none())
                .count();
            if disagree > 0 && disagree >= live && !self.blob_complete(i) {
                let blob = b.hash;
                return self.fail(FetchError::SizeMismatch { blob });
            }
        }
        let now = self.now;
        // Fill every usable provider's pipeline with fresh units, fastest first.
        let mut order: Vec<usize> = (0..self.providers.len())
            .filter(|&i| self.providers[i].usable(now))
            .collect();
        order.sort_by(|&a, &b| {
            self.providers[b]
                .rate(now)
                .partial_cmp(&self.providers[a].rate(now))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let mut progress = true;
        while progress {
            progress = false;
            for &pi in &order {
                if self.providers[pi].in_flight < self.config.depth
                    && let Some((blob, unit)) = self.next_unit(pi)
                {
                    self.request(pi, blob, unit, false);
                    progress = true;
                }
            }
        }
        if self.config.endgame {
            for &pi in &order {
                if self.providers[pi].in_flight == 0
                    && let Some((blob, unit, victim)) = self.endgame_unit(pi)
                {
                    if let Some(r) = self.requests.get_mut(&victim) {
                        r.duplicated = true;
                    }
                    self.stats.duplicates += 1;
                    self.request(pi, blob, unit, true);
                }
            }
        }
        // Nothing in flight and nobody can take what is missing: give up.
        if self.requests.is_empty() && !self.providers.is_empty() {
            let waiting = self
                .providers
                .iter()
                .any(|p| p.dropped.is_none() && p.backoff_until.is_some_and(|b| b > now));
            if !waiting {
                let missing_bytes = self
                    .blobs
                    .iter()
                    .map(|b| b.size - groups_byte_len(b.size, &b.verified))
                    .sum();
                self.fail(FetchError::Unavailable { missing_bytes });
            }
        }
    }

    /// The first unassigned unit provider `pi` may hold. Blobs it can no longer help
    /// with are dropped from its candidates for good, so over a download each provider
    /// passes each blob once, plus the blobs with requests in flight on every call.
    fn next_unit(&mut self, pi: usize) -> Option<(usize, GroupSet)> {
        // Whatever the configuration, a unit is a request a provider accepts.
        let u = self.config.unit_groups.clamp(1, MAX_REQUEST_GROUPS);
        let n = self.blobs.len();
        let p = &mut self.providers[pi];
        let mut i = p.exhausted.find(n, 0);
        while i < n {
            let b = &self.blobs[i];
            let mut open = GroupSet::all(group_count(b.size)).difference(&b.verified);
            if let Some(l) = p.lacks.get(&i) {
                open = open.difference(l);
            }
            if open.is_empty() {
                p.exhausted.remove(i);
            } else {
                let free = open.difference(&b.assigned);
                if let Some(first) = free.first() {
                    let start = first / u * u;
                    let unit = free
                        .intersection(&GroupSet::from_range(start..start.saturating_add(u)))
                        .first_ranges(MAX_REQUEST_RANGES);
                    return Some((i, unit));
                }
            }
            i = p.exhausted.find(n, i + 1);
        }
        None
    }

    /// For an idle provider with nothing fresh to do: the largest unfinished request of
    /// another provider that has not been duplicated yet, minus what already arrived.
    fn endgame_unit(&self, pi: usize) -> Option<(usize, GroupSet, (usize, u32))> {
        self.requests
            .iter()
            .filter(|((p, _), r)| *p != pi && !r.duplicated)
            .filter_map(|(k, r)| {
                let mut rest = r.asked.difference(&self.blobs[r.blob].verified);
                if let Some(l) = self.providers[pi].lacks.get(&r.blob) {
                    rest = rest.difference(l);
                }
                let rest = rest.first_ranges(MAX_REQUEST_RANGES);
                (!rest.is_empty()).then_some((r.blob, rest, *k))
            })
            .max_by_key(|(_, rest, k)| (rest.len(), std::cmp::Reverse(*k)))
    }

    fn request(&mut self, pi: usize, blob: usize, groups: GroupSet, duplicated: bool) {
        let id = self.alloc_id();
        let b = &mut self.blobs[blob];
        b.assigned = b.assigned.union(&groups);
        let msg = Message::GetGroups {
            id,
            blob: b.hash,
            size: b.size,
            groups: groups.clone(),
        };
        self.requests.insert(
            (pi, id),
            Request {
                blob,
                asked: groups,
                decoder: None,
                duplicated,
            },
        );
        self.providers[pi].in_flight += 1;
        self.set_busy(pi);
        self.stats.requests += 1;
        self.send(pi, msg);
    }
}
