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
