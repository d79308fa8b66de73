//! Deterministic multi-node tests of the download core against serving nodes, on a
//! simulated clock: one requester running `fetch::Fetch`, providers running
//! `serve::Server` with an `verified::Encoder` over in-memory blobs, links with a
//! bandwidth and a latency. Only the crate's public API is used, the way the agent's
//! shell will use it: frames are emitted, split by the `wire::Deframer`, parsed and
//! handed over.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, VecDeque},
    time::{Duration, Instant},
};

use myconet_content::{
    GroupSet, Hash, Manifest, PackagePath, SignedManifest,
    fetch::{DropReason, Event, Fetch, FetchConfig, FetchError},
    manifest::{AuthorKey, FileEntry, Metadata},
    mri::PackageId,
    serve::{Allowance, ServeConfig, Server, plan_groups},
    verified::{Encoder, Outboard, group_count},
    wire::{Deframer, ErrorCode, Frame, HaveState, HaveTarget, MAX_DATA_BYTES, Message, Role},
};
use ring::signature::Ed25519KeyPair;

fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A package of a few files: empty, tiny, odd-sized, several MiB, and a duplicate.
fn package(total_mib: usize) -> (SignedManifest, HashMap<Hash, Vec<u8>>) {
    let key = Ed25519KeyPair::from_seed_unchecked(&[9; 32]).unwrap();
    let mut files = Vec::new();
    let mut blobs = HashMap::new();
    let mut add = |path: &str, data: Vec<u8>| {
        files.push(FileEntry {
            path: PackagePath::new(path).unwrap(),
            size: data.len() as u64,
            executable: false,
            root: Hash::of(&data),
        });
        blobs.insert(Hash::of(&data), data);
    };
    add("empty", Vec::new());
    add("site/index.html", b"<html>hello</html>".to_vec());
    add("site/style.css", bytes(40_001, 1));
    add("bin/big", bytes(total_mib << 20, 2));
    add("bin/copy-of-css", bytes(40_001, 1));
    let m = Manifest::new(AuthorKey::of(&key), 1, Metadata::default(), files).unwrap();
    (m.sign(&key).unwrap(), blobs)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Behaviour {
    Honest,
    /// Flips a bit in the first data frame of every response.
    Corrupt,
    /// Takes requests and never answers.
    Silent,
    /// Holds nothing.
    Empty,
    /// Answers the manifest request with other bytes.
    WrongManifest,
}

struct Job {
    id: u32,
    header: Option<Message<'static>>,
    blob: Hash,
    encoder: Option<Encoder>,
    done: bool,
    cancelled: bool,
    frames_sent: u32,
    queued_error: Option<Message<'static>>,
}

struct Provider {
    addr: u8,
    behaviour: Behaviour,
    /// Link provider -> requester, bytes per second.
    rate: f64,
    server: Server<u8>,
    blobs: HashMap<Hash, (Vec<u8>, Outboard<Vec<u8>>)>,
    manifest: Vec<u8>,
    package: PackageId,
    jobs: VecDeque<Job>,
    link_free: Instant,
    sending: bool,
    deframer: Deframer,
}

enum Ev {
    ToProvider(u8, Vec<u8>),
    ToRequester(u8, Vec<u8>),
    ProviderSend(u8),
    Wake,
}

struct Sim {
    now: Instant,
    queue: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    events: HashMap<usize, Ev>,
    seq: u64,
    latency: Duration,
    providers: Vec<Provider>,
    fetch: Fetch<u8>,
    requester_deframers: HashMap<u8, Deframer>,
    /// The requester's store: verified groups and bytes.
    store: HashMap<Hash, (Vec<u8>, GroupSet)>,
    sizes: HashMap<Hash, u64>,
    finished: Option<Result<(), FetchError>>,
    dropped: Vec<(u8, DropReason)>,
    data_bytes_in: u64,
    wake_at: Option<Instant>,
}

impl Sim {
    fn new(fetch: Fetch<u8>, latency: Duration, start: Instant) -> Self {
        Self {
            now: start,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            seq: 0,
            latency,
            providers: Vec::new(),
            fetch,
            requester_deframers: HashMap::new(),
            store: HashMap::new(),
            sizes: HashMap::new(),
            finished: None,
            dropped: Vec::new(),
            data_bytes_in: 0,
            wake_at: None,
        }
    }

    fn at(&mut self, t: Instant, ev: Ev) {
        self.seq += 1;
        let k = self.seq as usize;
        self.events.insert(k, ev);
        self.queue.push(Reverse((t, self.seq, k)));
    }

    fn add_provider(
        &mut self,
        addr: u8,
        behaviour: Behaviour,
        rate_mbps: f64,
        signed: &SignedManifest,
        blobs: &HashMap<Hash, Vec<u8>>,
        serve: ServeConfig,
    ) {
        let held = if behaviour == Behaviour::Empty {
            HashMap::new()
        } else {
            blobs
                .iter()
                .map(|(h, d)| (*h, (d.clone(), Outboard::create(d))))
                .collect()
        };
        self.providers.push(Provider {
            addr,
            behaviour,
            rate: rate_mbps * 1e6 / 8.0,
            server: Server::new(serve),
            blobs: held,
            manifest: signed.bytes().to_vec(),
            package: signed.id(),
            jobs: VecDeque::new(),
            link_free: self.now,
            sending: false,
            deframer: Deframer::new(Role::Provider),
        });
        self.fetch.add_provider(self.now, addr);
        self.pump_fetch();
    }

    /// Moves the fetch core's output into the network and the store.
    fn pump_fetch(&mut self) {
        loop {
            let mut idle = true;
            while let Some(t) = self.fetch.poll_transmit() {
                idle = false;
                let at = self.now + self.latency;
                self.at(at, Ev::ToProvider(t.provider, t.message.to_bytes()));
            }
            if let Some(ev) = self.fetch.poll_event() {
                idle = false;
                self.on_fetch_event(ev);
            }
            if idle {
                break;
            }
        }
        if let Some(t) = self.fetch.poll_timeout()
            && self.wake_at != Some(t)
        {
            self.wake_at = Some(t);
            self.at(t, Ev::Wake);
        }
    }

    fn on_fetch_event(&mut self, ev: Event<u8>) {
        {
            match ev {
                Event::Manifest(m) => {
                    for (h, s) in m.manifest().blobs() {
                        self.sizes.insert(h, s);
                    }
                    let have: Vec<(Hash, GroupSet)> = self
                        .store
                        .iter()
                        .map(|(h, (_, g))| (*h, g.clone()))
                        .collect();
                    self.fetch.handle_local(self.now, &have);
                }
                Event::Parent { .. } => {}
                Event::Group {
                    blob,
                    group,
                    offset,
                    data,
                } => {
                    let size = self.sizes[&blob] as usize;
                    let e = self
                        .store
                        .entry(blob)
                        .or_insert_with(|| (vec![0; size], GroupSet::new()));
                    assert!(!e.1.contains(group), "group {group} handed out twice");
                    e.0[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
                    e.1.insert(group);
                    self.data_bytes_in += data.len() as u64;
                }
                Event::BlobComplete(_) => {}
                Event::ProviderDropped { provider, reason } => {
                    self.dropped.push((provider, reason))
                }
                Event::Done => self.finished = Some(Ok(())),
                Event::Failed(e) => self.finished = Some(Err(e)),
            }
        }
    }

    fn provider(&mut self, addr: u8) -> &mut Provider {
        self.providers.iter_mut().find(|p| p.addr == addr).unwrap()
    }

    fn on_provider_bytes(&mut self, addr: u8, frame_bytes: Vec<u8>) {
        let now = self.now;
        let p = self.provider(addr);
        let mut input = &frame_bytes[..];
        let mut out: Vec<Message<'static>> = Vec::new();
        while let Some(frame) = p.deframer.next_frame(&mut input).unwrap() {
            let frame = Frame::new_checked(frame).unwrap();
            let msg = Message::parse(&frame, Role::Provider).unwrap();
            if p.behaviour == Behaviour::Silent {
                continue;
            }
            match msg {
                Message::GetManifest { id, package } => {
                    let bytes = if p.behaviour == Behaviour::WrongManifest {
                        b"not the manifest".to_vec()
                    } else if package == p.package {
                        p.manifest.clone()
                    } else {
                        out.push(error(id, ErrorCode::NotFound, 0));
                        continue;
                    };
                    out.push(Message::Manifest {
                        id,
                        bytes: Box::leak(bytes.into_boxed_slice()),
                    });
                }
                Message::GetGroups {
                    id,
                    blob,
                    size,
                    groups,
                } => {
                    if let Err(r) = p.server.admit(now, &0, id) {
                        out.push(error(id, r.code, r.retry_after_ms));
                        continue;
                    }
                    let local = p
                        .blobs
                        .get(&blob)
                        .map(|(d, _)| (d.len() as u64, GroupSet::all(group_count(d.len() as u64))));
                    match plan_groups(size, &groups, local.as_ref().map(|(s, g)| (*s, g))) {
                        Err(code) => {
                            p.server.finish(now, &0, id);
                            out.push(error(id, code, 0));
                        }
                        Ok(send) => {
                            let ob = &p.blobs[&blob].1;
                            p.jobs.push_back(Job {
                                id,
                                header: Some(Message::Groups {
                                    id,
                                    groups: send.clone(),
                                }),
                                blob,
                                encoder: Some(Encoder::new(ob.root(), ob.size(), &send).unwrap()),
                                done: false,
                                cancelled: false,
                                frames_sent: 0,
                                queued_error: None,
                            });
                        }
                    }
                }
                Message::GetHave { id, target } => {
                    let state = match target {
                        HaveTarget::Blob { hash, .. } if p.blobs.contains_key(&hash) => {
                            HaveState::Complete
                        }
                        HaveTarget::Package(pk) if pk == p.package && !p.blobs.is_empty() => {
                            HaveState::Complete
                        }
                        _ => HaveState::None,
                    };
                    out.push(Message::Have {
                        id,
                        state,
                        groups: GroupSet::new(),
                    });
                }
                Message::Cancel { id } => {
                    if let Some(j) = p.jobs.iter_mut().find(|j| j.id == id && !j.done) {
                        j.cancelled = true;
                    }
                }
                other => panic!("provider got {other}"),
            }
        }
        // Small answers jump the queue of streams (they are tiny); streams go in order.
        for m in out.into_iter().rev() {
            p.jobs.push_front(Job {
                id: m.id(),
                header: None,
                blob: Hash::of(b""),
                encoder: None,
                done: false,
                cancelled: false,
                frames_sent: 0,
                queued_error: Some(m),
            });
        }
        self.kick(addr);
    }

    fn kick(&mut self, addr: u8) {
        let now = self.now;
        let p = self.provider(addr);
        if !p.sending && !p.jobs.is_empty() {
            p.sending = true;
            let t = p.link_free.max(now);
            self.at(t, Ev::ProviderSend(addr));
        }
    }

    /// The provider's link is free: send its next frame.
    fn provider_send(&mut self, addr: u8) {
        let now = self.now;
        let latency = self.latency;
        let p = self.provider(addr);
        p.sending = false;
        let Some(job) = p.jobs.front_mut() else {
            return;
        };
        let mut frame = Vec::new();
        let mut finished = false;
        if let Some(m) = job.queued_error.take() {
            m.emit(&mut frame);
            finished = true;
        } else if job.cancelled {
            error(job.id, ErrorCode::Cancelled, 0).emit(&mut frame);
            finished = true;
        } else if let Some(h) = job.header.take() {
            h.emit(&mut frame);
        } else {
            let (data, ob) = &p.blobs[&job.blob];
            let mut chunk = Vec::new();
            let enc = job.encoder.as_mut().unwrap();
            let mut complete = enc
                .fill(&data[..], ob, &mut chunk, MAX_DATA_BYTES - 16_384 - 64)
                .unwrap();
            if chunk.len() > MAX_DATA_BYTES {
                // fill may overshoot by one item; keep frames within the limit.
                unreachable!("chunk {}", chunk.len());
            }
            if chunk.is_empty() {
                complete = true;
            } else {
                if p.behaviour == Behaviour::Corrupt && job.frames_sent == 0 {
                    let i = chunk.len() / 2;
                    chunk[i] ^= 0x40;
                }
                job.frames_sent += 1;
                Message::Data {
                    id: job.id,
                    bytes: &chunk,
                }
                .emit(&mut frame);
            }
            finished = complete;
        }
        if finished {
            let job = p.jobs.pop_front().unwrap();
            p.server.finish(now, &0, job.id);
        }
        if frame.is_empty() {
            self.kick(addr);
            return;
        }
        // Pace by the server's upload limit, then by the link.
        let wait = match p.server.allowance(now, &0, frame.len()) {
            Allowance::Now(_) => None,
            Allowance::At(t) => Some(t),
        };
        p.server.consume(&0, frame.len());
        let start = wait.unwrap_or(now).max(p.link_free);
        let tx = Duration::from_secs_f64(frame.len() as f64 / p.rate);
        p.link_free = start + tx;
        let arrive = p.link_free + latency;
        self.at(arrive, Ev::ToRequester(addr, frame));
        self.kick(addr);
    }

    fn on_requester_bytes(&mut self, addr: u8, frame_bytes: Vec<u8>) {
        let d = self
            .requester_deframers
            .entry(addr)
            .or_insert_with(|| Deframer::new(Role::Requester));
        let mut input = &frame_bytes[..];
        let mut msgs = Vec::new();
        while let Some(frame) = d.next_frame(&mut input).unwrap() {
            msgs.push(frame.to_vec());
        }
        for raw in msgs {
            let frame = Frame::new_checked(&raw[..]).unwrap();
            let msg = Message::parse(&frame, Role::Requester).unwrap();
            self.fetch.handle_message(self.now, &addr, &msg);
        }
        self.pump_fetch();
    }

    /// Runs until the download ends, the clock passes `limit`, or `stop` says so.
    fn run(&mut self, limit: Duration, mut stop: impl FnMut(&Sim) -> bool) {
        let end = self.now + limit;
        while self.finished.is_none() && !stop(self) {
            let Some(Reverse((t, _, k))) = self.queue.pop() else {
                break;
            };
            if t > end {
                break;
            }
            self.now = self.now.max(t);
            match self.events.remove(&k).unwrap() {
                Ev::ToProvider(a, b) => self.on_provider_bytes(a, b),
                Ev::ToRequester(a, b) => self.on_requester_bytes(a, b),
                Ev::ProviderSend(a) => self.provider_send(a),
                Ev::Wake => {
                    if self.wake_at == Some(t) {
                        self.wake_at = None;
                    }
                    self.fetch.handle_timeout(self.now);
                    self.pump_fetch();
                }
            }
        }
    }

    fn assert_complete(&self, blobs: &HashMap<Hash, Vec<u8>>) {
        assert_eq!(self.finished, Some(Ok(())));
        for (h, data) in blobs {
            if data.is_empty() {
                continue;
            }
            let (got, groups) = &self.store[h];
            assert_eq!(groups.len(), group_count(data.len() as u64));
            assert!(got == data, "blob {h} differs");
        }
    }

    fn delivered(&self, addr: u8) -> u64 {
        self.fetch
            .progress()
            .providers
            .iter()
            .find(|p| p.provider == addr)
            .unwrap()
            .delivered
    }
}

fn error(id: u32, code: ErrorCode, retry_after_ms: u32) -> Message<'static> {
    Message::Error {
        id,
        code,
        retry_after_ms,
    }
}

fn start() -> Instant {
    Instant::now()
}

const LAT: Duration = Duration::from_millis(5);

#[test]
fn two_honest_providers_share_the_work() {
    let (signed, blobs) = package(8);
    let mut sim = Sim::new(
        Fetch::new(start(), signed.id(), FetchConfig::default()),
        LAT,
        start(),
    );
    sim.add_provider(
        1,
        Behaviour::Honest,
        100.0,
        &signed,
        &blobs,
        ServeConfig::default(),
    );
    sim.add_provider(
        2,
        Behaviour::Honest,
        100.0,
        &signed,
        &blobs,
        ServeConfig::default(),
    );
    sim.run(Duration::from_secs(60), |_| false);
    sim.assert_complete(&blobs);
    let (a, b) = (sim.delivered(1), sim.delivered(2));
    let total = a + b;
    println!("provider 1 delivered {a}, provider 2 {b}");
    assert!(a * 3 > total && b * 3 > total, "shares {a} / {b}");
    assert!(sim.fetch.stats().duplicate_groups * 16384 <= total / 100);
}

#[test]
fn work_moves_away_from_a_slow_provider() {
    let (signed, blobs) = package(8);
    // The fast provider alone.
    let t0 = start();
    let mut alone = Sim::new(Fetch::new(t0, signed.id(), FetchConfig::default()), LAT, t0);
    alone.add_provider(
        1,
        Behaviour::Honest,
        100.0,
        &signed,
        &blobs,
        ServeConfig::default(),
    );
    alone.run(Duration::from_secs(60), |_| false);
    alone.assert_complete(&blobs);
    let t_alone = alone.now - t0;
    // Fast plus a provider ten times slower.
    let mut both = Sim::new(Fetch::new(t0, signed.id(), FetchConfig::default()), LAT, t0);
    both.add_provider(
        1,
        Behaviour::Honest,
        100.0,
        &signed,
        &blobs,
        ServeConfig::default(),
    );
    both.add_provider(
        2,
        Behaviour::Honest,
        10.0,
        &signed,
        &blobs,
        ServeConfig::default(),
    );
    both.run(Duration::from_secs(60), |_| false);
    both.assert_complete(&blobs);
    let t_both = both.now - t0;
    let (fast, slow) = (both.delivered(1), both.delivered(2));
    println!("alone {t_alone:?}, with a slow helper {t_both:?}; fast {fast} slow {slow}");
    // The slow provider never holds the download back.
    assert!(
        t_both <= t_alone + t_alone / 10,
        "{t_both:?} vs {t_alone:?}"
    );
    assert!(fast > 4 * slow, "fast {fast} slow {slow}");
}

#[test]
fn a_corrupt_provider_is_dropped_and_counted() {
    let (signed, blobs) = package(4);
    let mut sim = Sim::new(
        Fetch::new(start(), signed.id(), FetchConfig::default()),
        LAT,
        start(),
    );
    sim.add_provider(
        1,
        Behaviour::Honest,
        100.0,
        &signed,
        &blobs,
        ServeConfig::default(),
    );
    sim.add_provider(
        2,
        Behaviour::Corrupt,
        100.0,
        &signed,
        &blobs,
        ServeConfig::default(),
    );
    sim.run(Duration::from_secs(60), |_| false);
    sim.assert_complete(&blobs);
    assert_eq!(sim.dropped, vec![(2, DropReason::Corrupt)]);
    assert_eq!(sim.fetch.stats().corrupt_providers, 1);
    // Nothing the corrupt provider sent was handed to the store as data.
    assert_eq!(sim.delivered(2), 0);
}

#[test]
fn only_corrupt_providers_fail_the_download() {
    let (signed, blobs) = package(1);
    let mut sim = Sim::new(
        Fetch::new(start(), signed.id(), FetchConfig::default()),
        LAT,
        start(),
    );
    sim.add_provider(
        1,
        Behaviour::Corrupt,
        100.0,
        &signed,
        &blobs,
        ServeConfig::default(),
    );
    sim.run(Duration::from_secs(60), |_| false);
    assert!(matches!(
        sim.finished,
        Some(Err(FetchError::Unavailable { .. }))
    ));
    // No corrupt group ever reached the store: whatever it holds is the true data.
    for (h, (got, groups)) in &sim.store {
        for g in groups.iter() {
            let r = myconet_content::verified::group_bytes(got.len() as u64, g);
            assert_eq!(
                got[r.start as usize..r.end as usize],
                blobs[h][r.start as usize..r.end as usize]
            );
        }
    }
}

#[test]
fn resume_refetches_nothing_that_was_verified() {
    let (signed, blobs) = package(8);
    let t0 = start();
    let mut first = Sim::new(Fetch::new(t0, signed.id(), FetchConfig::default()), LAT, t0);
    first.add_provider(
        1,
        Behaviour::Honest,
        100.0,
        &signed,
        &blobs,
        ServeConfig::default(),
    );
    // Interrupt half way (the agent killed, say).
    let total: u64 = signed.manifest().blobs().iter().map(|b| b.1).sum();
    first.run(Duration::from_secs(60), |s| s.data_bytes_in * 2 >= total);
    assert!(first.finished.is_none());
    let kept = first.store.clone();
    let had = first.data_bytes_in;
    // Restart with what the store verified.
    let fetch = Fetch::with_manifest(first.now, signed.clone(), FetchConfig::default());
    let mut second = Sim::new(fetch, LAT, first.now);
    second.store = kept;
    second.sizes = signed.manifest().blobs().into_iter().collect();
    let have: Vec<(Hash, GroupSet)> = second
        .store
        .iter()
        .map(|(h, (_, g))| (*h, g.clone()))
        .collect();
    second.fetch.handle_local(second.now, &have);
    second.add_provider(
        1,
        Behaviour::Honest,
        100.0,
        &signed,
        &blobs,
        ServeConfig::default(),
    );
    second.run(Duration::from_secs(60), |_| false);
    second.assert_complete(&blobs);
    let refetched = had + second.data_bytes_in - total;
    println!(
        "first run {had} bytes, second {} bytes, re-fetched {refetched}",
        second.data_bytes_in
    );
    assert_eq!(refetched, 0);
    // Wire bytes of the second run: the rest plus proofs, nothing more than 1 % over.
    let rest = total - had;
    assert!(second.fetch.stats().bytes_received <= rest + rest / 100 + 4096);
}

#[test]
fn a_silent_provider_stalls_and_its_work_moves() {
    let (signed, blobs) = package(4);
    let config = FetchConfig {
        stall_timeout: Duration::from_secs(2),
        ..FetchConfig::default()
    };
    let mut sim = Sim::new(Fetch::new(start(), signed.id(), config), LAT, start());
    // The silent one first, so it is asked for the manifest and for units.
    sim.add_provider(
        1,
        Behaviour::Silent,
        100.0,
        &signed,
        &blobs,
        ServeConfig::default(),
    );
    sim.add_provider(
        2,
        Behaviour::Honest,
        100.0,
        &signed,
        &blobs,
        ServeConfig::default(),
    );
    sim.run(Duration::from_secs(120), |_| false);
    sim.assert_complete(&blobs);
    assert!(sim.fetch.stats().stalls >= 1);
    assert_eq!(sim.delivered(1), 0);
}

#[test]
fn refusals_are_remembered_and_busy_backs_off() {
    let (signed, blobs) = package(4);
    let mut sim = Sim::new(
        Fetch::new(start(), signed.id(), FetchConfig::default()),
        LAT,
        start(),
    );
    sim.add_provider(
        1,
        Behaviour::Empty,
        100.0,
        &signed,
        &blobs,
        ServeConfig::default(),
    );
    // Admits one request at a time while the core pipelines four.
    let tight = ServeConfig {
        max_concurrent: 1,
        ..ServeConfig::default()
    };
    sim.add_provider(2, Behaviour::Honest, 100.0, &signed, &blobs, tight);
    sim.run(Duration::from_secs(120), |_| false);
    sim.assert_complete(&blobs);
    assert!(sim.fetch.stats().busy >= 1);
    assert_eq!(sim.delivered(1), 0);
}

#[test]
fn upload_rate_limit_holds() {
    let (signed, blobs) = package(2);
    let t0 = start();
    let mut sim = Sim::new(Fetch::new(t0, signed.id(), FetchConfig::default()), LAT, t0);
    let limited = ServeConfig {
        rate: 1_000_000,
        burst: 256 << 10,
        ..ServeConfig::default()
    };
    sim.add_provider(1, Behaviour::Honest, 1000.0, &signed, &blobs, limited);
    sim.run(Duration::from_secs(60), |_| false);
    sim.assert_complete(&blobs);
    let sent = sim.fetch.stats().bytes_received as f64;
    let secs = (sim.now - t0).as_secs_f64();
    println!("{sent} bytes in {secs:.2} s at a 1 MB/s limit");
    assert!(sent <= 1e6 * secs + (256 << 10) as f64 + 70_000.0);
}

#[test]
fn a_wrong_manifest_drops_its_provider_and_another_answers() {
    let (signed, blobs) = package(1);
    let mut sim = Sim::new(
        Fetch::new(start(), signed.id(), FetchConfig::default()),
        LAT,
        start(),
    );
    sim.add_provider(
        1,
        Behaviour::WrongManifest,
        100.0,
        &signed,
        &blobs,
        ServeConfig::default(),
    );
    sim.add_provider(
        2,
        Behaviour::Honest,
        100.0,
        &signed,
        &blobs,
        ServeConfig::default(),
    );
    sim.run(Duration::from_secs(60), |_| false);
    sim.assert_complete(&blobs);
    assert_eq!(sim.dropped, vec![(1, DropReason::Corrupt)]);
}

#[test]
fn unsolicited_and_malformed_responses_drop_the_provider() {
    let (signed, _) = package(1);
    let t = start();
    let mut f = Fetch::<u8>::with_manifest(t, signed.clone(), FetchConfig::default());
    f.handle_local(t, &[]);
    f.add_provider(t, 1);
    f.add_provider(t, 2);
    f.add_provider(t, 3);
    // Data for a request never made.
    f.handle_message(
        t,
        &1,
        &Message::Data {
            id: 999,
            bytes: b"x",
        },
    );
    // Groups not asked for.
    let sent: Vec<_> = std::iter::from_fn(|| f.poll_transmit()).collect();
    let to2 = sent.iter().find(|t| t.provider == 2).unwrap();
    let Message::GetGroups { id, groups, .. } = &to2.message else {
        panic!()
    };
    let mut more = groups.clone();
    more.insert(groups.end() + 1000);
    f.handle_message(
        t,
        &2,
        &Message::Groups {
            id: *id,
            groups: more,
        },
    );
    // A have nobody asked for.
    f.handle_message(
        t,
        &3,
        &Message::Have {
            id: 1,
            state: HaveState::None,
            groups: GroupSet::new(),
        },
    );
    let dropped: Vec<_> = std::iter::from_fn(|| f.poll_event())
        .filter_map(|e| match e {
            Event::ProviderDropped {
                provider,
                reason: DropReason::Protocol(_),
            } => Some(provider),
            _ => None,
        })
        .collect();
    assert_eq!(dropped, vec![1, 2, 3]);
    assert_eq!(f.stats().protocol_violations, 3);
}

#[test]
fn an_invalid_manifest_under_its_own_hash_fails_the_download() {
    // The MRI of bytes that hash right but are no valid manifest: the package itself
    // is bad, so the download fails with that reason instead of trying providers.
    let junk = b"junk that is not a manifest".to_vec();
    let id = PackageId::of_signed_manifest(&junk);
    let t = start();
    let mut f = Fetch::<u8>::new(t, id, FetchConfig::default());
    f.add_provider(t, 1);
    let req = f.poll_transmit().unwrap();
    let Message::GetManifest { id: rid, .. } = req.message else {
        panic!()
    };
    f.handle_message(
        t,
        &1,
        &Message::Manifest {
            id: rid,
            bytes: &junk,
        },
    );
    assert!(matches!(
        std::iter::from_fn(|| f.poll_event()).last(),
        Some(Event::Failed(FetchError::InvalidManifest(_)))
    ));
}

// ----- hostile providers, driven frame by frame ---------------------------------------

/// What the core asked of each provider since the last call.
fn sent(f: &mut Fetch<u8>) -> Vec<(u8, Message<'static>)> {
    std::iter::from_fn(|| f.poll_transmit())
        .map(|t| (t.provider, t.message))
        .collect()
}

fn events(f: &mut Fetch<u8>) -> Vec<Event<u8>> {
    std::iter::from_fn(|| f.poll_event()).collect()
}

/// The groups requests among `sent`: (id, blob, groups).
fn groups_requests(sent: &[(u8, Message<'static>)]) -> Vec<(u32, Hash, GroupSet)> {
    sent.iter()
        .filter_map(|(_, m)| match m {
            Message::GetGroups {
                id, blob, groups, ..
            } => Some((*id, *blob, groups.clone())),
            _ => None,
        })
        .collect()
}

/// The true encoding of `groups` of `data`.
fn encoding(data: &[u8], groups: &GroupSet) -> Vec<u8> {
    let mut out = Vec::new();
    myconet_content::verified::encode_groups(data, &Outboard::create(data), groups, &mut out)
        .unwrap();
    out
}

fn downloading(
    config: FetchConfig,
    providers: &[u8],
) -> (Fetch<u8>, HashMap<Hash, Vec<u8>>, Instant) {
    let (signed, blobs) = package(1);
    let t0 = start();
    let mut f = Fetch::<u8>::with_manifest(t0, signed, config);
    f.handle_local(t0, &[]);
    for p in providers {
        f.add_provider(t0, *p);
    }
    (f, blobs, t0)
}

/// A provider that announces a stream and then sends, once a second, one byte of a
/// request the requester cancelled (as late frames of a cancelled stream look), while it
/// never answers its new requests. Late frames of cancelled requests are not progress:
/// the new requests stall, and the provider is dropped instead of holding the download
/// forever.
#[test]
fn late_frames_of_cancelled_requests_do_not_hide_a_stall() {
    let config = FetchConfig {
        stall_timeout: Duration::from_secs(2),
        ..FetchConfig::default()
    };
    let (mut f, _, t0) = downloading(config, &[1]);
    let (id, _, groups) = groups_requests(&sent(&mut f))[0].clone();
    f.handle_message(t0, &1, &Message::Groups { id, groups });
    let mut now = t0;
    let mut cancelled = false;
    let mut log = Vec::new();
    while now < t0 + Duration::from_secs(600) && !f.is_finished() {
        now += Duration::from_secs(1);
        if cancelled {
            f.handle_message(now, &1, &Message::Data { id, bytes: &[0] });
        }
        f.handle_timeout(now);
        cancelled |= sent(&mut f)
            .iter()
            .any(|(_, m)| *m == Message::Cancel { id });
        log.extend(events(&mut f));
    }
    assert!(f.is_finished(), "the download still hangs after 600 s");
    assert!(log.contains(&Event::ProviderDropped {
        provider: 1,
        reason: DropReason::Unresponsive
    }));
    assert!(matches!(
        log.last(),
        Some(Event::Failed(FetchError::Unavailable { .. }))
    ));
}

/// A cancelled stream may still bring what its encoding holds, no more: a provider that
/// keeps sending under a cancelled id is breaking the protocol.
#[test]
fn a_cancelled_stream_carries_at_most_its_encoding() {
    let config = FetchConfig {
        stall_timeout: Duration::from_secs(2),
        ..FetchConfig::default()
    };
    let (mut f, blobs, t0) = downloading(config, &[1]);
    let (id, blob, groups) = groups_requests(&sent(&mut f))[0].clone();
    f.handle_message(
        t0,
        &1,
        &Message::Groups {
            id,
            groups: groups.clone(),
        },
    );
    let now = t0 + Duration::from_secs(3);
    f.handle_timeout(now);
    assert!(
        sent(&mut f)
            .iter()
            .any(|(_, m)| *m == Message::Cancel { id })
    );
    // The whole true encoding, late: ignored, no blame.
    let enc = encoding(&blobs[&blob], &groups);
    for piece in enc.chunks(MAX_DATA_BYTES) {
        f.handle_message(now, &1, &Message::Data { id, bytes: piece });
    }
    assert_eq!(f.stats().protocol_violations, 0);
    // One byte more: a violation.
    f.handle_message(now, &1, &Message::Data { id, bytes: &[0] });
    assert_eq!(f.stats().protocol_violations, 1);
    assert!(events(&mut f).iter().any(|e| matches!(
        e,
        Event::ProviderDropped {
            provider: 1,
            reason: DropReason::Protocol(_)
        }
    )));
}

/// An honest but slow provider answers every request in full, one stall late (after the
/// requester gave up on it), round after round. The requester must not forget which
/// requests it cancelled while their streams are still coming, and never blame it for
/// frames of its own cancelled requests, however long this goes on.
#[test]
fn a_provider_finishing_cancelled_streams_late_is_never_blamed() {
    let config = FetchConfig {
        unit_groups: 1,
        stall_timeout: Duration::from_secs(1),
        max_failures: u32::MAX,
        backoff: Duration::ZERO,
        ..FetchConfig::default()
    };
    let (mut f, blobs, t0) = downloading(config, &[1]);
    let mut now = t0;
    let mut late: Vec<(u32, Hash, GroupSet)> = Vec::new();
    for round in 0..1100 {
        let asked = groups_requests(&sent(&mut f));
        assert!(!asked.is_empty());
        now += Duration::from_secs(2);
        f.handle_timeout(now);
        // Last round's requests, answered in full now that they were cancelled.
        for (id, blob, groups) in late.drain(..) {
            f.handle_message(
                now,
                &1,
                &Message::Groups {
                    id,
                    groups: groups.clone(),
                },
            );
            let enc = encoding(&blobs[&blob], &groups);
            f.handle_message(now, &1, &Message::Data { id, bytes: &enc });
        }
        late = asked;
        assert_eq!(
            f.stats().protocol_violations,
            0,
            "an honest provider was blamed in round {round}"
        );
        events(&mut f);
    }
}

/// A provider that answers with true bytes, one every five seconds: never silent for the
/// stall timeout, yet a 1 MiB request would take two months. Progress is a verified
/// group (or a request answered), not a frame: it stalls, and is dropped after its
/// failures instead of holding the download.
#[test]
fn a_provider_trickling_true_bytes_stalls() {
    let (mut f, blobs, t0) = downloading(FetchConfig::default(), &[1]);
    let mut now = t0;
    // The one stream it trickles: id, true encoding, bytes sent.
    let mut stream: Option<(u32, Vec<u8>, usize)> = None;
    let mut log = Vec::new();
    while now < t0 + Duration::from_secs(3600) && !f.is_finished() {
        for (_, m) in sent(&mut f) {
            match m {
                Message::Cancel { id } if stream.as_ref().is_some_and(|s| s.0 == id) => {
                    stream = None
                }
                Message::GetGroups {
                    id, blob, groups, ..
                } if stream.is_none() => {
                    f.handle_message(
                        now,
                        &1,
                        &Message::Groups {
                            id,
                            groups: groups.clone(),
                        },
                    );
                    stream = Some((id, encoding(&blobs[&blob], &groups), 0));
                }
                _ => {}
            }
        }
        now += Duration::from_secs(5);
        if let Some((id, enc, at)) = &mut stream {
            f.handle_message(
                now,
                &1,
                &Message::Data {
                    id: *id,
                    bytes: &enc[*at..*at + 1],
                },
            );
            *at += 1;
        }
        f.handle_timeout(now);
        log.extend(events(&mut f));
    }
    assert!(f.is_finished(), "the download still hangs after an hour");
    assert!(log.contains(&Event::ProviderDropped {
        provider: 1,
        reason: DropReason::Unresponsive
    }));
}

/// "Cancelled" answers only a cancel. A provider that answers every request with it at
/// once would otherwise get the same units back at once, forever: the download neither
/// progresses nor fails. Taken as "cannot serve these groups", it ends.
#[test]
fn unasked_cancelled_answers_do_not_loop_forever() {
    let (mut f, _, t0) = downloading(FetchConfig::default(), &[1]);
    let mut rounds = 0;
    while !f.is_finished() && rounds < 1000 {
        rounds += 1;
        for (id, _, _) in groups_requests(&sent(&mut f)) {
            f.handle_message(t0, &1, &error(id, ErrorCode::Cancelled, 0));
        }
    }
    assert!(f.is_finished(), "still asking after {rounds} rounds");
    assert!(matches!(
        events(&mut f).last(),
        Some(Event::Failed(FetchError::Unavailable { .. }))
    ));
}

/// A busy provider names its retry delay, but one frame must not park a download for
/// 49 days (u32::MAX ms): the delay honoured is capped.
#[test]
fn a_busy_delay_is_capped() {
    let (mut f, _, t0) = downloading(FetchConfig::default(), &[1]);
    let asked = groups_requests(&sent(&mut f));
    for (id, _, _) in &asked {
        f.handle_message(t0, &1, &error(*id, ErrorCode::Busy, u32::MAX));
    }
    let next = f.poll_timeout().expect("a retry is scheduled");
    assert!(
        next <= t0 + myconet_content::fetch::MAX_BUSY_DELAY,
        "retry in {:?}",
        next - t0
    );
    f.handle_timeout(next);
    assert!(!groups_requests(&sent(&mut f)).is_empty(), "asked again");
}

/// A site of MAX_FILES small files (what the manifest allows) downloads in time linear
/// in the files: scheduling once walked every file for every request, and 100,000 files
/// took hours of CPU (on main this test does not finish in 10 minutes). Resuming it
/// (the store reports every file but the last) is linear too.
#[test]
fn a_package_of_max_files_downloads_in_linear_time() {
    use myconet_content::manifest::MAX_FILES;
    let key = Ed25519KeyPair::from_seed_unchecked(&[9; 32]).unwrap();
    let mut files = Vec::with_capacity(MAX_FILES);
    let mut data = HashMap::with_capacity(MAX_FILES);
    for i in 0..MAX_FILES {
        let d = format!("page {i}").into_bytes();
        files.push(FileEntry {
            path: PackagePath::new(format!("site/{i:06}.html")).unwrap(),
            size: d.len() as u64,
            executable: false,
            root: Hash::of(&d),
        });
        data.insert(Hash::of(&d), d);
    }
    let m = Manifest::new(AuthorKey::of(&key), 1, Metadata::default(), files).unwrap();
    let signed = m.sign(&key).unwrap();
    let t = start();
    // An honest provider answering everything at once.
    let serve = |f: &mut Fetch<u8>| -> usize {
        let mut groups_out = 0;
        loop {
            let asked = groups_requests(&sent(f));
            if asked.is_empty() {
                return groups_out;
            }
            for (id, blob, groups) in asked {
                f.handle_message(
                    t,
                    &1,
                    &Message::Groups {
                        id,
                        groups: groups.clone(),
                    },
                );
                let enc = encoding(&data[&blob], &groups);
                f.handle_message(t, &1, &Message::Data { id, bytes: &enc });
                groups_out += groups.len() as usize;
            }
            events(f);
        }
    };
    let mut f = Fetch::<u8>::with_manifest(t, signed.clone(), FetchConfig::default());
    f.handle_local(t, &[]);
    f.add_provider(t, 1);
    assert_eq!(serve(&mut f), MAX_FILES);
    assert!(f.is_finished());
    let p = f.progress();
    assert_eq!(p.verified_bytes, p.total_bytes);
    // Resume with all but the last file verified.
    let have: Vec<(Hash, GroupSet)> = m.files[..MAX_FILES - 1]
        .iter()
        .map(|f| (f.root, GroupSet::all(1)))
        .collect();
    let mut f = Fetch::<u8>::with_manifest(t, signed, FetchConfig::default());
    f.handle_local(t, &have);
    f.add_provider(t, 1);
    assert_eq!(serve(&mut f), 1);
    assert!(f.is_finished());
}

/// A hostile provider answers "size mismatch" for one blob and then gets itself dropped
/// (corrupt data for another). Its mismatch answer must leave with it: the honest
/// provider holds the blob, and the download completes from it instead of failing
/// with "every provider disagrees with the manifest".
#[test]
fn a_dropped_providers_size_mismatch_does_not_fail_the_download() {
    let (mut f, blobs, t0) = downloading(FetchConfig::default(), &[1, 2]);
    let mut answered_1 = 0;
    let mut log = Vec::new();
    for _ in 0..100 {
        if f.is_finished() {
            break;
        }
        for (to, m) in sent(&mut f) {
            let Message::GetGroups {
                id, blob, groups, ..
            } = m
            else {
                continue;
            };
            let mut enc = encoding(&blobs[&blob], &groups);
            if to == 1 {
                answered_1 += 1;
                if answered_1 == 1 {
                    f.handle_message(t0, &1, &error(id, ErrorCode::SizeMismatch, 0));
                    continue;
                }
                enc[0] ^= 1;
            }
            f.handle_message(t0, &to, &Message::Groups { id, groups });
            f.handle_message(t0, &to, &Message::Data { id, bytes: &enc });
        }
        log.extend(events(&mut f));
    }
    log.extend(events(&mut f));
    assert!(log.contains(&Event::ProviderDropped {
        provider: 1,
        reason: DropReason::Corrupt
    }));
    assert_eq!(log.last(), Some(&Event::Done), "{:?}", log.last());
}

// ----- property: whatever providers send, only true bytes come out ---------------------

mod fuzz {
    use super::*;
    use myconet_content::verified::{GROUP_BYTES, group_bytes};
    use proptest::{prelude::*, sample::Index};

    /// A 7-group file (last group short), a 3-group file, a tiny one and an empty one.
    fn small_package() -> (SignedManifest, HashMap<Hash, Vec<u8>>) {
        let key = Ed25519KeyPair::from_seed_unchecked(&[5; 32]).unwrap();
        let mut files = Vec::new();
        let mut blobs = HashMap::new();
        for (path, data) in [
            ("a/big", bytes(6 * 16384 + 1000, 11)),
            ("a/mid", bytes(40_001, 12)),
            ("b/tiny", b"tiny".to_vec()),
            ("b/empty", Vec::new()),
        ] {
            files.push(FileEntry {
                path: PackagePath::new(path).unwrap(),
                size: data.len() as u64,
                executable: false,
                root: Hash::of(&data),
            });
            blobs.insert(Hash::of(&data), data);
        }
        let m = Manifest::new(AuthorKey::of(&key), 1, Metadata::default(), files).unwrap();
        (m.sign(&key).unwrap(), blobs)
    }

    #[derive(Debug, Clone)]
    enum Act {
        /// Answer one of the requests sent to `p` (any, stale ones included) with true
        /// bytes: a header offering all or half of what was asked, then the encoding in
        /// pieces, possibly with a bit flipped, cut short, or with junk after it.
        Answer {
            p: u8,
            which: Index,
            half: bool,
            piece: usize,
            flip: Option<(Index, u8)>,
            cut: Option<Index>,
            junk: bool,
        },
        /// Any message from `p` under a recent or arbitrary id.
        Raw {
            p: u8,
            kind: u8,
            id: Result<Index, u32>,
            groups: Vec<(u64, u64)>,
            bytes: Vec<u8>,
            code: u8,
            retry: u32,
        },
        /// Time passes.
        Tick(u16),
        /// The connection to `p` closes.
        Close(u8),
    }

    fn act() -> impl Strategy<Value = Act> {
        let p = 1u8..=4; // 4 was never added
        prop_oneof![
            24 => (
                p.clone(),
                any::<Index>(),
                any::<bool>(),
                1usize..40_000,
                proptest::option::weighted(0.04, (any::<Index>(), 0u8..8)),
                proptest::option::weighted(0.04, any::<Index>()),
                proptest::bool::weighted(0.04),
            )
                .prop_map(|(p, which, half, piece, flip, cut, junk)| Act::Answer {
                    p,
                    which,
                    half,
                    piece,
                    flip,
                    cut,
                    junk,
                }),
            1 => (
                p.clone(),
                0u8..6,
                prop_oneof![any::<Index>().prop_map(Ok), any::<u32>().prop_map(Err)],
                proptest::collection::vec((0u64..12, 1u64..4), 0..3),
                proptest::collection::vec(any::<u8>(), 1..200),
                0u8..8,
                any::<u32>(),
            )
                .prop_map(|(p, kind, id, groups, bytes, code, retry)| Act::Raw {
                    p,
                    kind,
                    id,
                    groups,
                    bytes,
                    code,
                    retry,
                }),
            1 => (0u16..12).prop_map(Act::Tick),
            1 => p.prop_map(Act::Close),
        ]
    }

    struct World {
        f: Fetch<u8>,
        now: Instant,
        signed: SignedManifest,
        blobs: HashMap<Hash, Vec<u8>>,
        outboards: HashMap<Hash, Vec<u8>>,
        /// Every request sent, per provider, in order.
        asked: HashMap<u8, Vec<Message<'static>>>,
        ids: Vec<u32>,
        answered: std::collections::HashSet<u32>,
        delivered: HashMap<Hash, GroupSet>,
        ended: bool,
    }

    impl World {
        fn pump(&mut self) -> Result<(), TestCaseError> {
            for (to, m) in sent(&mut self.f) {
                self.ids.push(m.id());
                self.asked.entry(to).or_default().push(m);
            }
            while let Some(e) = self.f.poll_event() {
                match e {
                    Event::Manifest(m) => {
                        prop_assert_eq!(m.bytes(), self.signed.bytes());
                        self.f.handle_local(self.now, &[]);
                    }
                    Event::Parent { blob, parent } => {
                        let ob = &self.outboards[&blob];
                        let at = parent.offset as usize;
                        prop_assert_eq!(&parent.pair[..], &ob[at..at + 64], "a false proof pair");
                    }
                    Event::Group {
                        blob,
                        group,
                        offset,
                        data,
                    } => {
                        prop_assert!(!self.ended, "data after the end");
                        let truth = &self.blobs[&blob];
                        let r = group_bytes(truth.len() as u64, group);
                        prop_assert_eq!(offset, group * GROUP_BYTES);
                        prop_assert!(
                            data == truth[r.start as usize..r.end as usize],
                            "false data"
                        );
                        let d = self.delivered.entry(blob).or_default();
                        prop_assert!(!d.contains(group), "group {} handed out twice", group);
                        d.insert(group);
                    }
                    Event::BlobComplete(h) => {
                        let n = group_count(self.blobs[&h].len() as u64);
                        prop_assert_eq!(self.delivered.get(&h).map_or(0, GroupSet::len), n);
                    }
                    Event::Done => {
                        for (h, d) in &self.blobs {
                            let n = group_count(d.len() as u64);
                            prop_assert_eq!(self.delivered.get(h).map_or(0, GroupSet::len), n);
                        }
                        self.ended = true;
                    }
                    Event::Failed(_) => self.ended = true,
                    Event::ProviderDropped { .. } => {}
                }
            }
            Ok(())
        }

        /// Carries out an [`Act::Answer`].
        fn answer(&mut self, act: &Act) {
            let &Act::Answer {
                p,
                which,
                half,
                piece,
                flip,
                cut,
                junk,
            } = act
            else {
                return;
            };
            let Some(list) = self.asked.get(&p).filter(|l| !l.is_empty()) else {
                return;
            };
            // Mostly the oldest request not answered yet (as a provider works), now and
            // then any request at all (answered, cancelled or stale).
            let open: Vec<usize> = (0..list.len())
                .filter(|&i| !self.answered.contains(&list[i].id()))
                .collect();
            let pick = which.index(5 * list.len());
            let i = match open.first() {
                Some(&i) if pick >= list.len() => i,
                _ => pick % list.len(),
            };
            let msg = list[i].clone();
            self.answered.insert(msg.id());
            match msg {
                Message::GetManifest { id, .. } => {
                    let mut bytes = self.signed.bytes().to_vec();
                    if let Some((at, bit)) = flip {
                        let i = at.index(bytes.len());
                        bytes[i] ^= 1 << bit;
                    }
                    self.f
                        .handle_message(self.now, &p, &Message::Manifest { id, bytes: &bytes });
                }
                Message::GetGroups {
                    id, blob, groups, ..
                } => {
                    let offered = if half && groups.len() > 1 {
                        groups.take_first(groups.len() / 2)
                    } else {
                        groups
                    };
                    let mut enc = encoding(&self.blobs[&blob], &offered);
                    if let Some((at, bit)) = flip {
                        let i = at.index(enc.len());
                        enc[i] ^= 1 << bit;
                    }
                    if let Some(at) = cut {
                        enc.truncate(at.index(enc.len()));
                    }
                    if junk {
                        enc.extend_from_slice(b"junk");
                    }
                    self.f.handle_message(
                        self.now,
                        &p,
                        &Message::Groups {
                            id,
                            groups: offered,
                        },
                    );
                    for chunk in enc.chunks(piece.min(MAX_DATA_BYTES)) {
                        self.f
                            .handle_message(self.now, &p, &Message::Data { id, bytes: chunk });
                    }
                }
                _ => {}
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// Providers sending anything at all, honest, corrupt, cut, replayed, unsolicited
        /// or out of order, with time passing and connections closing: the download core
        /// never panics, never hands out a byte or a proof pair that is not the true one,
        /// never hands out a group twice, and says done only when every group arrived.
        #[test]
        fn only_true_bytes_come_out(acts in proptest::collection::vec(act(), 1..80)) {
            let (signed, blobs) = small_package();
            let outboards = blobs
                .iter()
                .map(|(h, d)| (*h, Outboard::create(d).into_data()))
                .collect();
            let t0 = start();
            let mut w = World {
                f: Fetch::new(t0, signed.id(), FetchConfig {
                    unit_groups: 2,
                    stall_timeout: Duration::from_secs(20),
                    ..FetchConfig::default()
                }),
                now: t0,
                signed,
                blobs,
                outboards,
                asked: HashMap::new(),
                ids: Vec::new(),
                answered: std::collections::HashSet::new(),
                delivered: HashMap::new(),
                ended: false,
            };
            for p in 1..=3 {
                w.f.add_provider(t0, p);
            }
            w.pump()?;
            for a in acts {
                match a {
                    Act::Answer { .. } => w.answer(&a),
                    Act::Raw { p, kind, id, groups, bytes, code, retry } => {
                        let id = match id {
                            Ok(i) if !w.ids.is_empty() => w.ids[i.index(w.ids.len())],
                            Ok(_) => 1,
                            Err(id) => id,
                        };
                        let mut set = GroupSet::new();
                        for (s, n) in groups {
                            set.insert_range(s..s + n);
                        }
                        let code = [
                            ErrorCode::NotFound,
                            ErrorCode::Busy,
                            ErrorCode::BadRequest,
                            ErrorCode::SizeMismatch,
                            ErrorCode::TooLarge,
                            ErrorCode::Unavailable,
                            ErrorCode::Cancelled,
                        ][code as usize % 7];
                        let msg = match kind {
                            0 => Message::Groups { id, groups: set },
                            1 => Message::Data { id, bytes: &bytes },
                            2 => Message::Error { id, code, retry_after_ms: retry % 100_000 },
                            3 => Message::Manifest { id, bytes: &bytes },
                            4 => Message::Have { id, state: HaveState::None, groups: GroupSet::new() },
                            _ => Message::Cancel { id },
                        };
                        w.f.handle_message(w.now, &p, &msg);
                    }
                    Act::Tick(s) => {
                        w.now += Duration::from_secs(s.into());
                        w.f.handle_timeout(w.now);
                    }
                    Act::Close(p) => w.f.handle_closed(w.now, &p),
                }
                w.pump()?;
                let _ = w.f.progress();
                let _ = w.f.poll_timeout();
            }
        }
    }
}

/// Whatever the configuration and whatever the store already holds, every request the
/// core sends is one a provider accepts: at most MAX_REQUEST_GROUPS groups in at most
/// MAX_REQUEST_RANGES ranges. (A unit of 8,192 groups, or one of 4,096 over a blob held
/// every other group, was a request the provider's deframer refuses, closing the
/// connection: every download with that setting failed.)
#[test]
fn requests_fit_the_wire_whatever_the_configuration() {
    use myconet_content::wire::{MAX_REQUEST_GROUPS, MAX_REQUEST_RANGES};
    let key = Ed25519KeyPair::from_seed_unchecked(&[4; 32]).unwrap();
    let size = 3 * 8192 * 16384u64; // 24,576 groups
    let root = Hash::of(b"not checked here");
    let m = Manifest::new(
        AuthorKey::of(&key),
        1,
        Metadata::default(),
        vec![FileEntry {
            path: PackagePath::new("big").unwrap(),
            size,
            executable: false,
            root,
        }],
    )
    .unwrap();
    let signed = m.sign(&key).unwrap();
    let every_other: GroupSet = (0..group_count(size)).step_by(2).collect();
    for (unit_groups, held) in [(4096, every_other), (8192, GroupSet::new())] {
        let t = start();
        let config = FetchConfig {
            unit_groups,
            ..FetchConfig::default()
        };
        let mut f = Fetch::<u8>::with_manifest(t, signed.clone(), config);
        f.handle_local(t, &[(root, held)]);
        f.add_provider(t, 1);
        let asked = sent(&mut f);
        assert!(!asked.is_empty());
        for (_, m) in asked {
            let bytes = m.to_bytes();
            let parsed = Frame::new_checked(&bytes[..])
                .and_then(|fr| Message::parse(&fr, Role::Provider).map(|_| ()));
            assert!(
                parsed.is_ok(),
                "unit {unit_groups}: {} refused: {parsed:?}",
                m.message_type()
            );
            if let Message::GetGroups { groups, .. } = m {
                assert!(groups.len() <= MAX_REQUEST_GROUPS);
                assert!(groups.ranges().len() <= MAX_REQUEST_RANGES);
            }
        }
    }
}
