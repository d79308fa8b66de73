//! A deterministic discrete-event simulator that drives many independent [`Router`]s
//! over modelled links, to check convergence, loop-freedom and reachability at scale.
//!
//! Determinism: one seeded [`SplitMix`] makes every choice (topology, link latencies,
//! losses, failures, router seeds); events are ordered by (time, insertion sequence) in a
//! calendar queue (`EventQueue`: the order of one binary heap, at O(1) cost per event);
//! routers see a simulated clock (`base + offset`). The same configuration therefore
//! produces the same run, bit for bit, which is what makes a failing scale test
//! debuggable.
//!
//! Model: each node is a [`Router<u32>`]. A link has a latency, a loss probability applied
//! to each routing payload, and a base cost. Neighbour sessions come up after one RTT and
//! are declared down `detect_delay` after a failure (the agent's hello timeout); in
//! between, payloads over a dead link are lost. With `measure_rtt`, the link's RTT and
//! loss are fed to `neighbour_measurement` when the neighbour comes up.
//!
//! Scale: all routers share one [`VerifyCache`], so each distinct announcement is
//! verified once per run rather than once per node and neighbour (a real node verifies
//! each one once too, through its own cache; sharing only removes the repetition across
//! simulated nodes). Broadcast payloads are shared between the deliveries (`Rc<[u8]>`).

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::signature::Ed25519KeyPair;

use super::cache::{SharedVerifyCache, SignedOrigin, VerifyCache, owned_prefix};
use super::router::{Router, RoutingConfig, prefix_addr};
use super::util::SplitMix;
use super::wire;
use super::{Admission, RoutingStats, TransmitTo};

/// Shape of the generated network.
#[derive(Debug, Clone, PartialEq)]
pub enum Topology {
    /// A uniformly random spanning tree (so the graph is connected) plus uniformly random
    /// extra links up to the given average degree.
    Random {
        /// Target average degree.
        avg_degree: f64,
    },
    /// Barabási–Albert preferential attachment: each new node links to `m` existing nodes
    /// chosen with probability proportional to degree (hubs emerge, as on the Internet).
    ScaleFree {
        /// Links per new node.
        m: usize,
    },
    /// Exactly these links: (a, b, latency, loss, base cost).
    Explicit(Vec<(u32, u32, Duration, f64, u16)>),
}

/// Simulation parameters.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Number of nodes.
    pub nodes: usize,
    /// Network shape.
    pub topology: Topology,
    /// Seed of every random choice.
    pub seed: u64,
    /// Generated links get a latency uniform in this range.
    pub latency: (Duration, Duration),
    /// Loss probability of each payload on generated links.
    pub loss: f64,
    /// Time from a failure to the neighbour being declared down.
    pub detect_delay: Duration,
    /// Feed modelled RTT (2 × latency) and loss into the link cost.
    pub measure_rtt: bool,
    /// Routing configuration of every node. Simulated keys are made without the
    /// identity proof of work (a second each at 10,000 nodes would be hours), so the
    /// default accepts them (`min_identity_work` 0).
    pub routing: RoutingConfig,
    /// Share one verification cache among all routers (see module docs).
    pub share_cache: bool,
    /// Sample this many random destinations for transient loops every
    /// `loop_sample_interval` (0 disables sampling).
    pub loop_sample_destinations: usize,
    /// Interval of transient-loop sampling.
    pub loop_sample_interval: Duration,
    /// How often a [`Scenario`] phase checks whether every reachable pair is routed and
    /// loop-free, for its "all routed" time (zero: not measured). Only destinations whose
    /// routes changed are walked again, so a short interval is cheap.
    pub routed_check_interval: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            nodes: 100,
            topology: Topology::Random { avg_degree: 4.0 },
            seed: 1,
            latency: (Duration::from_millis(2), Duration::from_millis(40)),
            loss: 0.0,
            detect_delay: Duration::from_millis(1500),
            measure_rtt: true,
            routing: RoutingConfig {
                min_identity_work: 0,
                ..RoutingConfig::default()
            },
            share_cache: true,
            loop_sample_destinations: 8,
            loop_sample_interval: Duration::from_millis(100),
            routed_check_interval: Duration::from_millis(100),
        }
    }
}

#[derive(Debug, Clone)]
struct Link {
    latency: Duration,
    loss: f64,
    cost: u16,
    up: bool,
}

#[derive(Debug)]
enum Ev {
    Deliver {
        to: u32,
        from: u32,
        inc: u32,
        payload: Rc<[u8]>,
    },
    Timer {
        node: u32,
        inc: u32,
    },
    NbrUp {
        node: u32,
        peer: u32,
    },
    NbrDown {
        node: u32,
        peer: u32,
    },
    Sample,
    /// A table-fill attacker re-sends its announcements (see [`Sim::add_table_filler`]).
    AttackRefresh {
        attacker: usize,
    },
}

/// A host that is no simulated node, attached to one as a neighbour nobody configured,
/// announcing prefixes of keys it made (adversarial finding 4).
struct TableFiller {
    at: u32,
    id: u32,
    key: [u8; 32],
    admission: Admission,
    /// The node's incarnation it is attached to (re-attached after a restart).
    inc: u32,
    payloads: Vec<Rc<[u8]>>,
    prefixes: HashSet<u64>,
}

struct Node {
    router: Option<Router<u32>>,
    key: Arc<Ed25519KeyPair>,
    pubkey: [u8; 32],
    prefix: u64,
    inc: u32,
    timer: Option<u64>,
    up: Vec<u32>,
    retired: RoutingStats,
    /// First seqno of the next run: the agent's reservation in its state directory
    /// (`seqno_store`), modelled exactly (above the last seqno the node announced).
    next_seqno: u32,
}

/// A queued event with its ordering key.
#[derive(Debug)]
struct Queued {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}

impl Eq for Queued {}

impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

impl Ord for Queued {
    /// Reversed (time, sequence), so `BinaryHeap` pops the earliest, first-pushed event.
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// log2 of a calendar bucket's width in nanoseconds (about 1 ms: link latencies are
/// 2–40 ms and the triggered delay 20 ms, so most events land a few buckets ahead).
const BUCKET_SHIFT: u32 = 20;
/// Buckets in the ring (about 69 s ahead); later events (hold and GC timers) wait in a
/// heap.
const RING: u64 = 1 << 16;

/// A calendar queue giving exactly the order of one binary heap on (time, sequence),
/// which keeps runs bit-for-bit reproducible, at O(1) amortised cost per event.
///
/// Why not one heap: at 10,000 nodes millions of deliveries are queued at once and every
/// pop walked the whole depth of a heap far larger than the CPU caches. Here only the
/// current ~1 ms bucket is a heap; later buckets are plain vectors appended to in order,
/// made into a heap when their turn comes.
///
/// Invariant: `near` holds every event whose bucket is ≤ `cur`; `ring` holds events
/// with bucket in (`cur`, `cur` + `RING`) at slot bucket mod `RING`; `far` holds the
/// rest (events pushed ≥ `RING` buckets ahead, possibly now within the ring's range:
/// they are merged when `cur` reaches their bucket). Everything outside `near` is
/// therefore strictly later than everything in it.
struct EventQueue {
    near: BinaryHeap<Queued>,
    cur: u64,
    ring: Vec<Vec<Queued>>,
    in_ring: usize,
    far: BinaryHeap<Queued>,
}

impl EventQueue {
    fn new() -> Self {
        EventQueue {
            near: BinaryHeap::new(),
            cur: 0,
            ring: (0..RING).map(|_| Vec::new()).collect(),
            in_ring: 0,
            far: BinaryHeap::new(),
        }
    }

    fn len(&self) -> usize {
        self.near.len() + self.in_ring + self.far.len()
    }

    fn push(&mut self, q: Queued) {
        let b = q.at >> BUCKET_SHIFT;
        if b <= self.cur {
            self.near.push(q);
        } else if b < self.cur + RING {
            self.ring[(b % RING) as usize].push(q);
            self.in_ring += 1;
        } else {
            self.far.push(q);
        }
    }

    /// Moves the next non-empty bucket into `near`; false when nothing is queued.
    fn advance(&mut self) -> bool {
        let far_next = self.far.peek().map(|q| q.at >> BUCKET_SHIFT);
        let ring_next = (self.in_ring > 0).then(|| {
            let mut b = self.cur + 1;
            while self.ring[(b % RING) as usize].is_empty() {
                b += 1;
            }
            b
        });
        let next = match (ring_next, far_next) {
            (Some(r), Some(f)) => r.min(f),
            (Some(r), None) => r,
            (None, Some(f)) => f,
            (None, None) => return false,
        };
        self.cur = next;
        let slot = (next % RING) as usize;
        let bucket = std::mem::take(&mut self.ring[slot]);
        self.in_ring -= bucket.len();
        // The emptied heap's allocation is dropped, not kept for the slot: a slot is next
        // used a whole ring later, and keeping cold start's large buckets alive for
        // that long cost more memory than the allocations it saves.
        self.near = BinaryHeap::from(bucket);
        while self
            .far
            .peek()
            .is_some_and(|q| q.at >> BUCKET_SHIFT <= self.cur)
        {
            if let Some(q) = self.far.pop() {
                self.near.push(q);
            }
        }
        true
    }

    /// Removes and returns the earliest event if it is due at or before `end`.
    fn pop_until(&mut self, end: u64) -> Option<Queued> {
        loop {
            if let Some(q) = self.near.peek() {
                if q.at > end {
                    return None;
                }
                return self.near.pop();
            }
            if !self.advance() {
                return None;
            }
        }
    }
}

/// Totals across the run, for rates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Payloads put on links (a broadcast counts once per neighbour).
    pub packets: u64,
    /// Bytes put on links.
    pub bytes: u64,
    /// Payloads lost on links (modelled loss or dead links).
    pub lost: u64,
    /// Route events (installs, changes, removals) at all nodes.
    pub route_events: u64,
}

/// Outcome of a global check of every node's tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Check {
    /// (source, destination) pairs whose next-hop chain revisits a node.
    pub loops: usize,
    /// Pairs in the same component where the chain does not reach the destination.
    pub unrouted: usize,
    /// Pairs in different components (or dead destinations) still holding a route.
    pub stale: usize,
    /// Pairs checked.
    pub pairs: usize,
    /// Up to 5 examples, for failure messages.
    pub examples: Vec<String>,
}

impl Check {
    /// No loops, nothing unrouted, nothing stale.
    pub fn is_clean(&self) -> bool {
        self.loops == 0 && self.unrouted == 0 && self.stale == 0
    }
}

/// The simulator.
pub struct Sim {
    cfg: SimConfig,
    base: Instant,
    now: u64,
    seq: u64,
    queue: EventQueue,
    /// Reused by `drain` for the router's output (no allocation per delivery).
    out_buf: Vec<super::RoutingTransmit<u32>>,
    rng: SplitMix,
    nodes: Vec<Node>,
    links: HashMap<(u32, u32), Link>,
    adj: Vec<Vec<u32>>,
    cache: Option<SharedVerifyCache>,
    /// Totals so far.
    pub counters: Counters,
    last_route_event: u64,
    /// Payload bytes held by queued deliveries now (a broadcast's shared copy once).
    in_flight: u64,
    /// Most payload bytes queued at once (the simulator's own transient memory).
    pub peak_in_flight: u64,
    /// Most events queued at once.
    pub peak_events: usize,
    /// When set, every route event is appended as (time since start, node, event)
    /// (diagnostics: which routes still change late in a phase, and how).
    pub event_log: Option<Vec<(Duration, u32, super::RouteEvent<u32>)>>,
    /// Transient loops seen by sampling: (sim time, source, destination).
    pub transient_loops: Vec<(Duration, u32, u32)>,
    /// Samples taken.
    pub loop_samples: u64,
    sampling: bool,
    /// When set, (start, counts): route events per simulated second since `start` (a
    /// phase's profile: when its changes happen, e.g. in bursts one update interval
    /// apart).
    pub event_seconds: Option<(Duration, Vec<u64>)>,
    /// Node owning each prefix (to map route events to destinations).
    owner: HashMap<u64, u32>,
    watch: Option<RoutedWatch>,
    /// When set, (prefix, log): every routing TLV about that prefix put on a link
    /// (diagnostics: how a starvation is resolved, or why it is not).
    pub trace: Option<(u64, Vec<Traced>)>,
    fillers: Vec<TableFiller>,
}

/// A routing TLV about a traced prefix put on a link ([`Sim::trace`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Traced {
    /// Send time since the start.
    pub at: Duration,
    /// Sender.
    pub from: u32,
    /// Receiver.
    pub to: u32,
    /// Lost on the link (modelled loss or link down).
    pub lost: bool,
    /// The TLV, in words.
    pub tlv: String,
}

/// Incremental form of the reachability part of [`Sim::check`]: whether every reachable
/// (source, destination) pair is routed and loop-free right now.
///
/// Why incremental: a full check walks every node's next hop to every destination
/// (N² lookups), too slow to repeat every 100 ms at 10,000 nodes. Links and nodes only
/// change at a phase's start, where every destination starts as "failing, to walk".
/// After that, a destination's next-hop graph only changes through route events. A
/// destination known to be fully routed stays so after changes at nodes X iff every
/// node of X still reaches it (any other node's chain is unchanged up to its first node
/// of X), so a route event costs one path walk from its node. A failing destination is
/// walked in full again only once it had route events and no other destination is known
/// to fail.
struct RoutedWatch {
    interval: u64,
    next: u64,
    comp: Vec<u32>,
    /// Per destination: failing (or not yet known to be routed everywhere).
    failing: Vec<bool>,
    failing_count: usize,
    /// Failing destinations with route events since their last full walk.
    dirty: Vec<bool>,
    dirty_list: Vec<u32>,
    /// (destination, node) route events at routed destinations since the last check.
    changed: Vec<(u32, u32)>,
    state: Vec<u8>,
    /// First check time since which every check found everything routed.
    since: Option<u64>,
}

impl RoutedWatch {
    /// Node `x`'s route to destination `d` changed.
    fn mark(&mut self, d: u32, x: u32) {
        if !self.failing[d as usize] {
            self.changed.push((d, x));
        } else if !self.dirty[d as usize] {
            self.dirty[d as usize] = true;
            self.dirty_list.push(d);
        }
    }
}

fn key_of(a: u32, b: u32) -> (u32, u32) {
    if a < b { (a, b) } else { (b, a) }
}

impl Sim {
    /// Builds the topology and starts every node at time 0 with all links up.
    pub fn new(cfg: SimConfig) -> Self {
        let mut rng = SplitMix::new(cfg.seed);
        let n = cfg.nodes;
        let cache = cfg.share_cache.then(|| {
            VerifyCache::shared(4 * n + 1024, cfg.routing.min_identity_work, rng.next_u64())
        });
        let mut nodes = Vec::with_capacity(n);
        for _ in 0..n {
            let mut seed = [0u8; 32];
            for c in seed.chunks_mut(8) {
                c.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
            let Ok(kp) = Ed25519KeyPair::from_seed_unchecked(&seed) else {
                unreachable!("any 32 bytes are an Ed25519 seed")
            };
            let pubkey: [u8; 32] = ring::signature::KeyPair::public_key(&kp)
                .as_ref()
                .try_into()
                .unwrap_or([0; 32]);
            nodes.push(Node {
                router: None,
                key: Arc::new(kp),
                prefix: owned_prefix(&pubkey),
                pubkey,
                inc: 0,
                timer: None,
                up: Vec::new(),
                retired: RoutingStats::default(),
                next_seqno: 1,
            });
        }
        let mut sim = Sim {
            base: Instant::now(),
            now: 0,
            seq: 0,
            queue: EventQueue::new(),
            out_buf: Vec::new(),
            nodes,
            links: HashMap::new(),
            adj: vec![Vec::new(); n],
            cache,
            counters: Counters::default(),
            last_route_event: 0,
            in_flight: 0,
            peak_in_flight: 0,
            peak_events: 0,
            event_log: None,
            transient_loops: Vec::new(),
            loop_samples: 0,
            sampling: false,
            event_seconds: None,
            owner: HashMap::new(),
            watch: None,
            trace: None,
            fillers: Vec::new(),
            rng,
            cfg,
        };
        sim.owner = (0..n as u32)
            .map(|i| (sim.nodes[i as usize].prefix, i))
            .collect();
        sim.build_topology();
        for i in 0..n as u32 {
            sim.start_router(i);
        }
        let pairs: Vec<(u32, u32)> = sim.links.keys().copied().collect();
        let mut pairs = pairs;
        pairs.sort_unstable();
        for (a, b) in pairs {
            sim.push(0, Ev::NbrUp { node: a, peer: b });
            sim.push(0, Ev::NbrUp { node: b, peer: a });
        }
        if sim.cfg.loop_sample_destinations > 0 {
            sim.sampling = true;
            let t = sim.cfg.loop_sample_interval.as_nanos() as u64;
            sim.push(t, Ev::Sample);
        }
        sim
    }

    fn add_link(&mut self, a: u32, b: u32, latency: Duration, loss: f64, cost: u16) -> bool {
        if a == b || self.links.contains_key(&key_of(a, b)) {
            return false;
        }
        self.links.insert(
            key_of(a, b),
            Link {
                latency,
                loss,
                cost,
                up: true,
            },
        );
        self.adj[a as usize].push(b);
        self.adj[b as usize].push(a);
        true
    }

    fn random_latency(&mut self) -> Duration {
        let (lo, hi) = self.cfg.latency;
        let span = hi.saturating_sub(lo).as_nanos() as u64;
        lo + Duration::from_nanos(self.rng.below(span + 1))
    }

    fn build_topology(&mut self) {
        let n = self.cfg.nodes as u64;
        let base = self.cfg.routing.cost.default_base;
        let loss = self.cfg.loss;
        match self.cfg.topology.clone() {
            Topology::Explicit(links) => {
                for (a, b, lat, loss, cost) in links {
                    self.add_link(a, b, lat, loss, cost);
                }
            }
            Topology::Random { avg_degree } => {
                for i in 1..n {
                    let j = self.rng.below(i);
                    let lat = self.random_latency();
                    self.add_link(i as u32, j as u32, lat, loss, base);
                }
                let target = ((avg_degree * n as f64) / 2.0) as usize;
                let mut tries = 0;
                while self.links.len() < target && tries < 20 * target {
                    tries += 1;
                    let a = self.rng.below(n) as u32;
                    let b = self.rng.below(n) as u32;
                    let lat = self.random_latency();
                    self.add_link(a, b, lat, loss, base);
                }
            }
            Topology::ScaleFree { m } => {
                let m = m.max(1) as u64;
                let mut ends: Vec<u32> = Vec::new();
                // Seed: a chain of m + 1 nodes.
                for i in 1..=m.min(n.saturating_sub(1)) {
                    let lat = self.random_latency();
                    self.add_link(i as u32, (i - 1) as u32, lat, loss, base);
                    ends.push(i as u32);
                    ends.push((i - 1) as u32);
                }
                for i in (m + 1)..n {
                    let mut chosen = HashSet::new();
                    while (chosen.len() as u64) < m {
                        let t = ends[self.rng.below(ends.len() as u64) as usize];
                        chosen.insert(t);
                    }
                    let mut chosen: Vec<u32> = chosen.into_iter().collect();
                    chosen.sort_unstable();
                    for t in chosen {
                        let lat = self.random_latency();
                        if self.add_link(i as u32, t, lat, loss, base) {
                            ends.push(i as u32);
                            ends.push(t);
                        }
                    }
                }
            }
        }
    }

    fn start_router(&mut self, i: u32) {
        let seed = self.rng.next_u64();
        let now = self.instant();
        let node = &mut self.nodes[i as usize];
        let signer: Arc<dyn crate::id::Signer> = node.key.clone();
        let seqno = node.next_seqno;
        let cfg = self.cfg.routing.clone();
        let r = match &self.cache {
            Some(c) => Router::with_cache(signer, cfg, seed, seqno, now, c.clone()),
            None => Router::new(signer, cfg, seed, seqno, now),
        };
        node.router = r.ok();
        node.inc += 1;
        node.timer = None;
        node.up.clear();
        self.reschedule(i);
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_nanos(self.now)
    }

    /// The simulated clock as the routers see it (for queries such as `explain`).
    pub fn clock(&self) -> Instant {
        self.instant()
    }

    /// Current simulated time since the start.
    pub fn now(&self) -> Duration {
        Duration::from_nanos(self.now)
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Queued {
            at: at.max(self.now),
            seq: self.seq,
            ev,
        });
        self.peak_events = self.peak_events.max(self.queue.len());
    }

    fn reschedule(&mut self, i: u32) {
        let node = &self.nodes[i as usize];
        let Some(r) = &node.router else { return };
        let Some(t) = r.poll_timeout() else { return };
        let at = (t.saturating_duration_since(self.base).as_nanos() as u64).max(self.now);
        if node.timer.is_some_and(|x| x <= at) {
            return;
        }
        let inc = node.inc;
        self.nodes[i as usize].timer = Some(at);
        self.push(at, Ev::Timer { node: i, inc });
    }

    /// Sends what router `i` produced and records its route events.
    fn drain(&mut self, i: u32) {
        let mut out = std::mem::take(&mut self.out_buf);
        let mut events = 0;
        if let Some(r) = self.nodes[i as usize].router.as_mut() {
            while let Some(t) = r.poll_transmit() {
                out.push(t);
            }
            while let Some(ev) = r.poll_event() {
                events += 1;
                if let Some(w) = self.watch.as_mut() {
                    let (super::RouteEvent::Installed { prefix, .. }
                    | super::RouteEvent::Changed { prefix, .. }
                    | super::RouteEvent::Removed { prefix, .. }) = &ev;
                    if let Some(&d) = self.owner.get(&super::router::prefix_bits(*prefix)) {
                        w.mark(d, i);
                    }
                }
                if let Some(log) = self.event_log.as_mut() {
                    log.push((Duration::from_nanos(self.now), i, ev));
                }
            }
        }
        if events > 0 {
            self.counters.route_events += events;
            self.last_route_event = self.now;
            if let Some((start, counts)) = self.event_seconds.as_mut() {
                let sec = Duration::from_nanos(self.now)
                    .saturating_sub(*start)
                    .as_secs() as usize;
                if counts.len() <= sec {
                    counts.resize(sec + 1, 0);
                }
                counts[sec] += events;
            }
        }
        // The sender's neighbour list, borrowed out of its node for the loop (nothing
        // below changes it; it is put back afterwards).
        let up = std::mem::take(&mut self.nodes[i as usize].up);
        for t in out.drain(..) {
            let payload: Rc<[u8]> = Rc::from(t.payload);
            let one = [match t.to {
                TransmitTo::Neighbour(n) => n,
                TransmitTo::AllNeighbours => 0,
            }];
            let targets: &[u32] = match t.to {
                TransmitTo::Neighbour(_) => &one,
                TransmitTo::AllNeighbours => &up,
            };
            for &to in targets {
                let Some(link) = self.links.get(&key_of(i, to)) else {
                    continue;
                };
                self.counters.packets += 1;
                self.counters.bytes += payload.len() as u64;
                let (lat, loss, up) = (link.latency, link.loss, link.up);
                let lost = !up || (loss > 0.0 && self.rng.next_f64() < loss);
                if let Some((p, log)) = self.trace.as_mut() {
                    trace_payload(
                        *p,
                        &payload,
                        Duration::from_nanos(self.now),
                        i,
                        to,
                        lost,
                        log,
                    );
                }
                if lost {
                    self.counters.lost += 1;
                    continue;
                }
                let inc = self.nodes[to as usize].inc;
                let at = self.now + lat.as_nanos() as u64;
                if Rc::strong_count(&payload) == 1 {
                    // First delivery of this payload: it now lives in the queue.
                    self.in_flight += payload.len() as u64;
                    self.peak_in_flight = self.peak_in_flight.max(self.in_flight);
                }
                self.push(
                    at,
                    Ev::Deliver {
                        to,
                        from: i,
                        inc,
                        payload: payload.clone(),
                    },
                );
            }
        }
        self.nodes[i as usize].up = up;
        self.out_buf = out;
        self.reschedule(i);
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver {
                to,
                from,
                inc,
                payload,
            } => {
                let now = self.instant();
                let link_up = self.links.get(&key_of(to, from)).is_some_and(|l| l.up);
                let node = &mut self.nodes[to as usize];
                if node.inc != inc || !link_up {
                    self.counters.lost += 1;
                    return;
                }
                if let Some(r) = node.router.as_mut() {
                    let _ = r.handle_message(from, &payload, now);
                    self.drain(to);
                }
            }
            Ev::Timer { node, inc } => {
                let now = self.instant();
                let at = self.now;
                let n = &mut self.nodes[node as usize];
                if n.inc != inc || n.timer != Some(at) {
                    return;
                }
                n.timer = None;
                if let Some(r) = n.router.as_mut() {
                    r.handle_timeout(now);
                    self.drain(node);
                }
            }
            Ev::NbrUp { node, peer } => {
                let now = self.instant();
                let Some(link) = self.links.get(&key_of(node, peer)).cloned() else {
                    return;
                };
                if !link.up
                    || self.nodes[peer as usize].router.is_none()
                    || self.nodes[node as usize].router.is_none()
                {
                    return;
                }
                let key = self.nodes[peer as usize].pubkey;
                let measure = self.cfg.measure_rtt;
                let default_base = self.cfg.routing.cost.default_base;
                let n = &mut self.nodes[node as usize];
                let Some(r) = n.router.as_mut() else { return };
                if link.cost != default_base {
                    r.set_neighbour_cost(peer, link.cost);
                }
                r.neighbour_up(peer, key, Admission::Configured, now);
                if measure {
                    r.neighbour_measurement(peer, Some(link.latency * 2), Some(link.loss), now);
                }
                if !n.up.contains(&peer) {
                    n.up.push(peer);
                }
                self.drain(node);
            }
            Ev::NbrDown { node, peer } => {
                let now = self.instant();
                let n = &mut self.nodes[node as usize];
                let Some(pos) = n.up.iter().position(|p| *p == peer) else {
                    return;
                };
                // Still connected (the failure was repaired before detection)?
                let link_up = self.links.get(&key_of(node, peer)).is_some_and(|l| l.up);
                let peer_alive = self.nodes[peer as usize].router.is_some();
                if link_up && peer_alive {
                    return;
                }
                let n = &mut self.nodes[node as usize];
                n.up.swap_remove(pos);
                if let Some(r) = n.router.as_mut() {
                    r.neighbour_down(peer, now);
                    self.drain(node);
                }
            }
            Ev::Sample => {
                self.sample_loops();
                if self.sampling {
                    let t = self.now + self.cfg.loop_sample_interval.as_nanos() as u64;
                    self.push(t, Ev::Sample);
                }
            }
            Ev::AttackRefresh { attacker } => self.refresh_filler(attacker),
        }
    }

    /// Attaches a table-fill attacker to node `at` (adversarial finding 4): a host that is
    /// not a simulated node becomes `at`'s neighbour with `admission` (what it would be
    /// in the agent: `SelfAdmitted` for a discovered or inbound neighbour) and announces
    /// `junk` prefixes, each validly signed by a key made for it (from `seed`), ten per
    /// payload, again every update interval as a real sender would. What `at` accepts it
    /// re-advertises to the simulated network like any route.
    pub fn add_table_filler(&mut self, at: u32, admission: Admission, junk: usize, seed: u64) {
        let mut rng = SplitMix::new(seed);
        let mut keypair = || {
            let mut s = [0u8; 32];
            for c in s.chunks_mut(8) {
                c.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
            Ed25519KeyPair::from_seed_unchecked(&s).ok()
        };
        let key: [u8; 32] = keypair()
            .and_then(|k| {
                ring::signature::KeyPair::public_key(&k)
                    .as_ref()
                    .try_into()
                    .ok()
            })
            .unwrap_or([0; 32]);
        let mut payloads = Vec::new();
        let mut prefixes = HashSet::new();
        let mut p = vec![wire::VERSION, 0];
        for _ in 0..junk {
            let Some(s) = keypair().and_then(|k| SignedOrigin::sign(&k, 1)) else {
                continue;
            };
            if p.len() + wire::UPDATE_TLV_LEN > wire::MAX_PAYLOAD {
                payloads.push(Rc::from(std::mem::replace(&mut p, vec![wire::VERSION, 0])));
            }
            wire::put_signed_update(&mut p, &s, 0);
            prefixes.insert(s.prefix);
        }
        if p.len() > 2 {
            payloads.push(Rc::from(p));
        }
        // An id no simulated node has; what `at` sends it is dropped (no link).
        let id = u32::MAX - self.fillers.len() as u32;
        self.fillers.push(TableFiller {
            at,
            id,
            key,
            admission,
            inc: 0,
            payloads,
            prefixes,
        });
        self.refresh_filler(self.fillers.len() - 1);
    }

    fn refresh_filler(&mut self, i: usize) {
        let now = self.instant();
        let Some(f) = self.fillers.get_mut(i) else {
            return;
        };
        let node = &mut self.nodes[f.at as usize];
        if let Some(r) = node.router.as_mut() {
            if f.inc != node.inc {
                f.inc = node.inc;
                r.neighbour_up(f.id, f.key, f.admission, now);
            }
            for p in &f.payloads {
                let _ = r.handle_message(f.id, p, now);
            }
            let at = f.at;
            self.drain(at);
        }
        let t = self.now + self.cfg.routing.update_interval.as_nanos() as u64;
        self.push(t, Ev::AttackRefresh { attacker: i });
    }

    /// Prefixes node `x` holds that table-fill attackers announced.
    pub fn junk_held(&self, x: u32) -> usize {
        let Some(r) = self.nodes[x as usize].router.as_ref() else {
            return 0;
        };
        r.held_prefixes()
            .filter(|p| self.fillers.iter().any(|f| f.prefixes.contains(p)))
            .count()
    }

    /// Runs events until simulated time `t` (since start).
    pub fn run_until(&mut self, t: Duration) {
        let end = t.as_nanos() as u64;
        loop {
            // With a routed watch, stop at each of its check times (after every event
            // due at or before it) to check; the watch touches no event or random state.
            let check_at = self.watch.as_ref().map(|w| w.next).filter(|t| *t <= end);
            match self.queue.pop_until(check_at.unwrap_or(end)) {
                Some(q) => {
                    self.now = q.at;
                    if let Ev::Deliver { payload, .. } = &q.ev
                        && Rc::strong_count(payload) == 1
                    {
                        self.in_flight = self.in_flight.saturating_sub(payload.len() as u64);
                    }
                    self.step(q.ev);
                }
                None => match check_at {
                    Some(t) => {
                        self.now = self.now.max(t);
                        self.watch_check();
                    }
                    None => break,
                },
            }
        }
        self.now = self.now.max(end);
    }

    /// Starts measuring when every reachable pair is routed and loop-free (call after
    /// changing links or nodes; every destination is walked at the first check).
    pub fn watch_routed(&mut self, interval: Duration) {
        let n = self.nodes.len();
        self.watch = Some(RoutedWatch {
            interval: (interval.as_nanos() as u64).max(1),
            next: self.now,
            comp: self.components(),
            failing: vec![true; n],
            failing_count: n,
            dirty: vec![true; n],
            dirty_list: (0..n as u32).rev().collect(),
            changed: Vec::new(),
            state: vec![0; n],
            since: None,
        });
    }

    /// Destinations the watch currently finds not routed everywhere (diagnostics).
    pub fn routed_failing(&self) -> Vec<u32> {
        let Some(w) = &self.watch else {
            return Vec::new();
        };
        (0..w.failing.len() as u32)
            .filter(|d| w.failing[*d as usize])
            .collect()
    }

    /// Stops the watch: after a last check now, the time since which every check found
    /// everything routed and loop-free (`None`: not routed now). Relative to `start`.
    pub fn unwatch_routed(&mut self, start: Duration) -> Option<Duration> {
        self.watch.as_ref()?;
        self.watch_check();
        let w = self.watch.take()?;
        let start = start.as_nanos() as u64;
        w.since
            .map(|t| Duration::from_nanos(t.saturating_sub(start)))
    }

    fn watch_check(&mut self) {
        let Some(mut w) = self.watch.take() else {
            return;
        };
        // Destinations known to be routed: walk from each node whose route changed.
        for (d, x) in std::mem::take(&mut w.changed) {
            if !w.failing[d as usize] && !self.reaches(&w.comp, x, d) {
                w.failing[d as usize] = true;
                w.failing_count += 1;
            }
        }
        // While every failing destination had route events since its last walk, walk
        // them in full until one still fails. One that did not change still fails, so
        // nothing needs walking then.
        while w.failing_count == w.dirty_list.len()
            && let Some(d) = w.dirty_list.pop()
        {
            w.dirty[d as usize] = false;
            let mut looped = false;
            let failing = self.walk_all(d, &mut w.state, &mut |_| looped = true);
            let bad = looped
                || (self.alive(d)
                    && failing
                        .iter()
                        .any(|s| *s != d && w.comp[*s as usize] == w.comp[d as usize]));
            if !bad {
                w.failing[d as usize] = false;
                w.failing_count -= 1;
            }
        }
        if w.failing_count > 0 {
            w.since = None;
        } else if w.since.is_none() {
            w.since = Some(self.now);
        }
        while w.next <= self.now {
            w.next += w.interval;
        }
        self.watch = Some(w);
    }

    /// `v`'s next hop towards `prefix` when a packet could actually take it: the next
    /// hop is alive and the link to it is up.
    fn live_next_hop(&self, v: u32, prefix: u64) -> Option<u32> {
        let nh = self.nodes[v as usize]
            .router
            .as_ref()
            .and_then(|r| r.next_hop_bits(prefix))?;
        (self.alive(nh) && self.links.get(&key_of(v, nh)).is_some_and(|l| l.up)).then_some(nh)
    }

    /// Whether `x`'s next-hop chain towards `d` arrives without a loop, or `x` need not
    /// reach `d` (dead, or in another component) and its chain does not loop.
    fn reaches(&self, comp: &[u32], x: u32, d: u32) -> bool {
        let prefix = self.nodes[d as usize].prefix;
        let need = self.alive(x) && self.alive(d) && comp[x as usize] == comp[d as usize];
        let mut v = x;
        for _ in 0..=self.nodes.len() {
            if v == d {
                return true;
            }
            match self.live_next_hop(v, prefix) {
                Some(nh) => v = nh,
                None => return !need,
            }
        }
        false
    }

    /// Runs until no route has changed anywhere for `quiet`, or until `max` from now.
    /// Returns the time of the last route change (measured from the call) when quiet was
    /// reached, `None` on timeout.
    pub fn run_until_quiet(&mut self, quiet: Duration, max: Duration) -> Option<Duration> {
        let start = self.now;
        let deadline = start + max.as_nanos() as u64;
        let q = quiet.as_nanos() as u64;
        self.last_route_event = self.last_route_event.max(start);
        let step = (q / 4).max(1_000_000);
        loop {
            let t = (self.now + step).min(deadline);
            self.run_until(Duration::from_nanos(t));
            if self.now >= self.last_route_event + q {
                return Some(Duration::from_nanos(self.last_route_event - start));
            }
            if self.now >= deadline {
                return None;
            }
        }
    }

    /// Takes a link down (both ends notice after `detect_delay`).
    pub fn fail_link(&mut self, a: u32, b: u32) {
        if let Some(l) = self.links.get_mut(&key_of(a, b)) {
            l.up = false;
            let t = self.now + self.cfg.detect_delay.as_nanos() as u64;
            self.push(t, Ev::NbrDown { node: a, peer: b });
            self.push(t, Ev::NbrDown { node: b, peer: a });
        }
    }

    /// Brings a link back (the session comes up after one RTT).
    pub fn restore_link(&mut self, a: u32, b: u32) {
        if let Some(l) = self.links.get_mut(&key_of(a, b)) {
            l.up = true;
            let t = self.now + 2 * l.latency.as_nanos() as u64;
            self.push(t, Ev::NbrUp { node: a, peer: b });
            self.push(t, Ev::NbrUp { node: b, peer: a });
        }
    }

    /// Stops a node: its state is lost, its neighbours notice after `detect_delay`.
    pub fn fail_node(&mut self, x: u32) {
        let n = &mut self.nodes[x as usize];
        if let Some(r) = n.router.take() {
            let s = r.stats().clone();
            add_stats(&mut n.retired, &s);
            n.next_seqno = r.own_seqno().saturating_add(1);
        }
        n.inc += 1;
        n.up.clear();
        n.timer = None;
        let t = self.now + self.cfg.detect_delay.as_nanos() as u64;
        for y in self.adj[x as usize].clone() {
            self.push(t, Ev::NbrDown { node: y, peer: x });
        }
    }

    /// Restarts a failed node with fresh state (same key, new seed; its sequence numbers
    /// continue above the last one it announced, as the agent's reservation makes them).
    pub fn restore_node(&mut self, x: u32) {
        if self.nodes[x as usize].router.is_some() {
            return;
        }
        self.start_router(x);
        for y in self.adj[x as usize].clone() {
            let Some(l) = self.links.get(&key_of(x, y)) else {
                continue;
            };
            if !l.up || self.nodes[y as usize].router.is_none() {
                continue;
            }
            let t = self.now + 2 * l.latency.as_nanos() as u64;
            self.push(t, Ev::NbrUp { node: x, peer: y });
            self.push(t, Ev::NbrUp { node: y, peer: x });
        }
    }

    /// Whether a node is running.
    pub fn alive(&self, x: u32) -> bool {
        self.nodes[x as usize].router.is_some()
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the simulation has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Links as (a, b), sorted.
    pub fn links(&self) -> Vec<(u32, u32)> {
        let mut v: Vec<_> = self.links.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Degree of a node in the generated graph.
    pub fn degree(&self, x: u32) -> usize {
        self.adj[x as usize].len()
    }

    /// Node `x`'s router, if running.
    pub fn router(&self, x: u32) -> Option<&Router<u32>> {
        self.nodes[x as usize].router.as_ref()
    }

    /// Node `x`'s router, mutably (e.g. to inject messages in tests).
    pub fn router_mut(&mut self, x: u32) -> Option<&mut Router<u32>> {
        self.nodes[x as usize].router.as_mut()
    }

    /// Node `x`'s /64 as an address.
    pub fn prefix_of(&self, x: u32) -> std::net::Ipv6Addr {
        prefix_addr(self.nodes[x as usize].prefix)
    }

    /// Next hop of `x` towards `dest`'s prefix.
    pub fn next_hop(&self, x: u32, dest: u32) -> Option<u32> {
        self.nodes[x as usize]
            .router
            .as_ref()?
            .next_hop_bits(self.nodes[dest as usize].prefix)
    }

    /// Metric of `x`'s selected route to `dest`.
    pub fn metric(&self, x: u32, dest: u32) -> Option<u16> {
        self.nodes[x as usize]
            .router
            .as_ref()?
            .selected_bits(self.nodes[dest as usize].prefix)
            .map(|s| s.1)
    }

    /// The path a packet from `src` to `dst` takes now: `Ok(path)` when it arrives,
    /// `Err(path)` when it is dropped (no route, dead link/node) or loops.
    pub fn path(&self, src: u32, dst: u32) -> Result<Vec<u32>, Vec<u32>> {
        let mut path = vec![src];
        let mut seen = HashSet::new();
        let mut v = src;
        seen.insert(v);
        while v != dst {
            if !self.alive(v) {
                return Err(path);
            }
            let Some(nh) = self.next_hop(v, dst) else {
                return Err(path);
            };
            let up = self.links.get(&key_of(v, nh)).is_some_and(|l| l.up);
            path.push(nh);
            if !up || !self.alive(nh) || !seen.insert(nh) {
                return Err(path);
            }
            v = nh;
        }
        Ok(path)
    }

    fn components(&self) -> Vec<u32> {
        let n = self.nodes.len();
        let mut comp = vec![u32::MAX; n];
        let mut c = 0;
        let mut stack = Vec::new();
        for s in 0..n {
            if comp[s] != u32::MAX || !self.alive(s as u32) {
                continue;
            }
            comp[s] = c;
            stack.push(s as u32);
            while let Some(v) = stack.pop() {
                for &w in &self.adj[v as usize] {
                    if comp[w as usize] == u32::MAX
                        && self.alive(w)
                        && self.links.get(&key_of(v, w)).is_some_and(|l| l.up)
                    {
                        comp[w as usize] = c;
                        stack.push(w);
                    }
                }
            }
            c += 1;
        }
        comp
    }

    /// Walks every node's next-hop chain towards `dest`; returns (loops, sources whose
    /// chain ends somewhere other than `dest`, with the end).
    fn walk_all(&self, dest: u32, state: &mut [u8], on_loop: &mut dyn FnMut(u32)) -> Vec<u32> {
        // state: 0 unvisited, 1 on current walk, 2 reaches dest, 3 does not reach
        state.fill(0);
        let prefix = self.nodes[dest as usize].prefix;
        state[dest as usize] = 2;
        let mut stack = Vec::new();
        let mut failing = Vec::new();
        let n = self.nodes.len();
        for s in 0..n as u32 {
            // Touch the tables of the nodes a few steps ahead (each walk's first lookup
            // is independent of this one), so their cache misses overlap.
            for (ahead, level) in [(16, 0), (8, 1)] {
                if let Some(Some(r)) = self.nodes.get(s as usize + ahead).map(|n| &n.router) {
                    r.touch_route(prefix, level);
                }
            }
            if state[s as usize] != 0 || !self.alive(s) {
                continue;
            }
            let mut v = s;
            let outcome = loop {
                match state[v as usize] {
                    2 => break 2,
                    3 => break 3,
                    1 => {
                        on_loop(s);
                        break 3;
                    }
                    _ => {}
                }
                state[v as usize] = 1;
                stack.push(v);
                match self.live_next_hop(v, prefix) {
                    Some(nh) => v = nh,
                    _ => break 3,
                }
            };
            for w in stack.drain(..) {
                state[w as usize] = outcome;
            }
            if outcome == 3 {
                failing.push(s);
            }
        }
        failing
    }

    /// Checks every (source, destination) pair: no loops; routed iff reachable.
    pub fn check(&self) -> Check {
        let comp = self.components();
        let mut out = Check::default();
        let mut state = vec![0u8; self.nodes.len()];
        for d in 0..self.nodes.len() as u32 {
            let mut loops = Vec::new();
            let failing = self.walk_all(d, &mut state, &mut |s| loops.push(s));
            out.loops += loops.len();
            for s in loops.iter().take(2) {
                if out.examples.len() < 5 {
                    out.examples
                        .push(format!("loop from {s} to {d}: {:?}", self.path(*s, d)));
                }
            }
            let d_alive = self.alive(d);
            for s in 0..self.nodes.len() as u32 {
                if s == d || !self.alive(s) {
                    continue;
                }
                out.pairs += 1;
                let reachable = d_alive && comp[s as usize] == comp[d as usize];
                // Whether an unreachable destination is still routed (only asked then:
                // a lookup per pair is most of the check's cost at scale).
                let routed = || self.next_hop(s, d).is_some();
                if reachable && failing.binary_search(&s).is_ok() && !loops.contains(&s) {
                    out.unrouted += 1;
                    if out.examples.len() < 5 {
                        out.examples
                            .push(format!("unrouted {s} -> {d}: {:?}", self.path(s, d)));
                    }
                } else if !reachable && routed() {
                    out.stale += 1;
                    if out.examples.len() < 5 {
                        out.examples.push(format!(
                            "stale route {s} -> {d} via {:?}",
                            self.next_hop(s, d)
                        ));
                    }
                }
            }
        }
        out
    }

    /// Every reachable (source, destination) pair whose next-hop chain does not arrive
    /// (diagnostics: what to trace when a check finds unrouted pairs).
    pub fn unrouted_pairs(&self) -> Vec<(u32, u32)> {
        let comp = self.components();
        let mut state = vec![0u8; self.nodes.len()];
        let mut out = Vec::new();
        for d in 0..self.nodes.len() as u32 {
            if !self.alive(d) {
                continue;
            }
            for s in self.walk_all(d, &mut state, &mut |_| {}) {
                if s != d && comp[s as usize] == comp[d as usize] {
                    out.push((s, d));
                }
            }
        }
        out
    }

    /// Checks `k` random destinations for loops right now (transient-loop sampling).
    pub fn sample_loops(&mut self) {
        let n = self.nodes.len() as u64;
        let k = self.cfg.loop_sample_destinations;
        let mut state = vec![0u8; self.nodes.len()];
        for _ in 0..k {
            let d = self.rng.below(n) as u32;
            let mut loops = Vec::new();
            self.walk_all(d, &mut state, &mut |s| loops.push(s));
            self.loop_samples += 1;
            let t = self.now();
            for s in loops {
                if self.transient_loops.len() < 1000 {
                    self.transient_loops.push((t, s, d));
                }
            }
        }
    }

    /// Stops (or resumes) transient-loop sampling.
    pub fn set_sampling(&mut self, on: bool) {
        if on && !self.sampling && self.cfg.loop_sample_destinations > 0 {
            let t = self.now + self.cfg.loop_sample_interval.as_nanos() as u64;
            self.push(t, Ev::Sample);
        }
        self.sampling = on;
    }

    /// Sends `attacker`'s neighbours forged announcements of `victim`'s prefix: one signed
    /// by the attacker's own key (valid signature, but the key does not own the prefix)
    /// and one carrying the victim's key with a signature the victim never made. Both
    /// claim metric 0 so they would win if accepted.
    pub fn inject_hijack(&mut self, attacker: u32, victim: u32) {
        let a = &self.nodes[attacker as usize];
        let victim_prefix = self.nodes[victim as usize].prefix;
        let victim_key = self.nodes[victim as usize].pubkey;
        let seqno = self.nodes[victim as usize]
            .router
            .as_ref()
            .map_or(0, |r| r.own_seqno())
            .wrapping_add(100);
        let msg = wire::signing_message(&a.pubkey, victim_prefix, 64, seqno);
        let own_sig = a.key.sign(&msg);
        let own_sig: [u8; 64] = own_sig.as_ref().try_into().unwrap_or([0; 64]);
        let msg2 = wire::signing_message(&victim_key, victim_prefix, 64, seqno);
        let forged: [u8; 64] = a.key.sign(&msg2).as_ref().try_into().unwrap_or([0; 64]);
        let mut p = vec![wire::VERSION, 0];
        wire::put_update(&mut p, 64, seqno, 0, victim_prefix, &a.pubkey, &own_sig);
        wire::put_update(&mut p, 64, seqno, 0, victim_prefix, &victim_key, &forged);
        let payload: Rc<[u8]> = Rc::from(p.into_boxed_slice());
        for to in a.up.clone() {
            let inc = self.nodes[to as usize].inc;
            let lat = self
                .links
                .get(&key_of(attacker, to))
                .map_or(Duration::ZERO, |l| l.latency);
            self.push(
                self.now + lat.as_nanos() as u64,
                Ev::Deliver {
                    to,
                    from: attacker,
                    inc,
                    payload: payload.clone(),
                },
            );
        }
    }

    /// Sum of all routers' counters (including stopped incarnations).
    pub fn total_stats(&self) -> RoutingStats {
        let mut s = RoutingStats::default();
        for n in &self.nodes {
            add_stats(&mut s, &n.retired);
            if let Some(r) = &n.router {
                add_stats(&mut s, r.stats());
            }
        }
        s
    }

    /// (router bytes, routes held, candidate routes, shared-cache bytes).
    pub fn memory(&self) -> (usize, usize, usize, usize) {
        let mut bytes = 0;
        let mut routes = 0;
        let mut cands = 0;
        for r in self.nodes.iter().filter_map(|n| n.router.as_ref()) {
            bytes += r.memory_bytes();
            routes += r.prefix_count();
            cands += r.candidate_count();
        }
        let cache = match &self.cache {
            Some(c) => c.lock().map(|c| c.memory_bytes()).unwrap_or(0),
            None => self
                .nodes
                .iter()
                .filter_map(|n| n.router.as_ref())
                .map(|r| {
                    r.verify_cache()
                        .lock()
                        .map(|c| c.memory_bytes())
                        .unwrap_or(0)
                })
                .sum(),
        };
        (bytes, routes, cands, cache)
    }

    /// A random live link.
    pub fn random_live_link(&mut self) -> Option<(u32, u32)> {
        let links = self.links();
        for _ in 0..64 {
            let (a, b) = links[self.rng.below(links.len() as u64) as usize];
            if self.links[&(a, b)].up && self.alive(a) && self.alive(b) {
                return Some((a, b));
            }
        }
        None
    }

    /// A random live node.
    pub fn random_live_node(&mut self) -> Option<u32> {
        for _ in 0..64 {
            let x = self.rng.below(self.nodes.len() as u64) as u32;
            if self.alive(x) {
                return Some(x);
            }
        }
        None
    }

    /// Signs an announcement of node `x`'s prefix with `x`'s key (for tests).
    pub fn sign_for(&self, x: u32, seqno: u32) -> Option<SignedOrigin> {
        SignedOrigin::sign(self.nodes[x as usize].key.as_ref(), seqno)
    }
}

/// Appends the TLVs of `payload` about prefix `p` to a trace.
fn trace_payload(
    p: u64,
    payload: &[u8],
    t: Duration,
    from: u32,
    to: u32,
    lost: bool,
    log: &mut Vec<Traced>,
) {
    let Ok(body) = wire::parse_header(payload) else {
        return;
    };
    for tlv in wire::Tlvs::new(body) {
        let s = match tlv {
            Ok(wire::Tlv::Update {
                seqno,
                metric,
                prefix,
                ..
            }) if prefix == p => format!("update seqno {seqno} metric {metric}"),
            Ok(wire::Tlv::Retraction { prefix, .. }) if prefix == p => "retraction".into(),
            Ok(wire::Tlv::RouteRequest { prefix, plen }) if prefix == p || plen == 0 => {
                format!("route request plen {plen}")
            }
            Ok(wire::Tlv::SeqnoRequest {
                hops,
                seqno,
                prefix,
                ..
            }) if prefix == p => format!("seqno request {seqno} hops {hops}"),
            _ => continue,
        };
        log.push(Traced {
            at: t,
            from,
            to,
            lost,
            tlv: s,
        });
    }
}

fn add_stats(a: &mut RoutingStats, b: &RoutingStats) {
    a.add(b);
}

// ----- scenarios --------------------------------------------------------------------

/// A standard run: cold start, then rounds of random link and node failures followed by
/// recovery, each phase run to quiescence and checked; then an optional steady-state
/// window for message rates.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The network.
    pub sim: SimConfig,
    /// Failure/recovery rounds.
    pub rounds: usize,
    /// Links failed per round.
    pub link_failures: usize,
    /// Nodes failed per round.
    pub node_failures: usize,
    /// A phase is converged after this long without any route change.
    pub quiet: Duration,
    /// Give up on a phase after this long.
    pub max_phase: Duration,
    /// Simulated time to measure steady-state traffic (one update interval is enough;
    /// zero skips it).
    pub steady_window: Duration,
    /// Run the full all-pairs check after each phase (O(N²)).
    pub full_checks: bool,
    /// A table-fill attack (adversarial finding 4) started after cold start, as its own
    /// phase, at the node with the most links, and kept up for the rest of the run.
    pub table_fill: Option<TableFill>,
}

/// A table-fill attacker for a [`Scenario`] (see [`Sim::add_table_filler`]).
#[derive(Debug, Clone, Copy)]
pub struct TableFill {
    /// Prefixes it announces (each of a key it made).
    pub junk: usize,
    /// What the node it attaches to takes it for.
    pub admission: Admission,
}

/// Figures of one phase.
#[derive(Debug, Clone, Default)]
pub struct PhaseReport {
    /// Phase name.
    pub name: String,
    /// Simulated time from the phase's start to its last route change (`None`: did not
    /// go quiet within `max_phase`).
    pub convergence: Option<Duration>,
    /// Simulated time from the phase's start after which every reachable pair was
    /// routed and loop-free at every check (`SimConfig::routed_check_interval` apart)
    /// through the end of the phase; `None` if not measured or not routed at the end.
    /// Reachability comes back before the last route change, which includes moves to
    /// better paths.
    pub all_routed: Option<Duration>,
    /// Payloads per live node per simulated minute over the phase (up to quiescence).
    pub packets_per_node_min: f64,
    /// Bytes per live node per simulated minute.
    pub bytes_per_node_min: f64,
    /// Total payloads in the phase.
    pub packets: u64,
    /// Route events (installs, next-hop changes, removals) in each simulated second of
    /// the phase.
    pub route_events_per_s: Vec<u64>,
    /// Result of the global check at the end (if run).
    pub check: Option<Check>,
    /// Wall time of the phase.
    pub wall: Duration,
}

/// The outcome of a [`Scenario`].
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Nodes.
    pub nodes: usize,
    /// Links.
    pub links: usize,
    /// Largest degree.
    pub max_degree: usize,
    /// Topology description.
    pub topology: String,
    /// Seed.
    pub seed: u64,
    /// Phases in order.
    pub phases: Vec<PhaseReport>,
    /// Steady-state payloads per node per minute.
    pub steady_packets_per_node_min: f64,
    /// Steady-state bytes per node per minute.
    pub steady_bytes_per_node_min: f64,
    /// Router bytes per route held (tables, candidates, queues).
    pub bytes_per_route: f64,
    /// Shared announcement cache bytes per route held.
    pub cache_bytes_per_route: f64,
    /// Most events the simulator had queued at once.
    pub peak_events: usize,
    /// Most payload bytes held by queued deliveries at once (shared copies once).
    pub peak_in_flight_bytes: u64,
    /// Total routes held at the end.
    pub routes: usize,
    /// Candidate routes held at the end.
    pub candidates: usize,
    /// Transient loops seen by sampling.
    pub transient_loops: usize,
    /// Destinations sampled for transient loops.
    pub loop_samples: u64,
    /// Signature verifications in the run (shared cache: once per announcement).
    pub signature_verifications: u64,
    /// All routers' counters summed over the run (including stopped incarnations):
    /// among them the bounds that were hit (`requests_dropped_limit`,
    /// `candidates_dropped`, `rejected_table_full`, `rejected_neighbour_limit`).
    pub stats: RoutingStats,
    /// Table-fill attack: (prefixes announced, admission, most of them held by one node,
    /// held by all nodes together) at the end of the run.
    pub table_fill: Option<(usize, Admission, usize, usize)>,
    /// Simulated time of the whole run.
    pub simulated: Duration,
    /// Wall time of the whole run.
    pub wall: Duration,
}

impl Report {
    /// Whether every phase converged and every check was clean.
    pub fn ok(&self) -> bool {
        self.phases
            .iter()
            .all(|p| p.convergence.is_some() && p.check.as_ref().is_none_or(|c| c.is_clean()))
    }

    /// The report as JSON (hand-written: the agent has no JSON dependency).
    pub fn to_json(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "{{\"nodes\":{},\"links\":{},\"max_degree\":{},\"topology\":\"{}\",\"seed\":{},",
            self.nodes, self.links, self.max_degree, self.topology, self.seed
        );
        s.push_str("\"phases\":[");
        for (i, p) in self.phases.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let conv = p
                .convergence
                .map_or("null".to_string(), |c| format!("{:.3}", c.as_secs_f64()));
            let routed = p
                .all_routed
                .map_or("null".to_string(), |c| format!("{:.3}", c.as_secs_f64()));
            let _ = write!(
                s,
                "{{\"name\":\"{}\",\"convergence_s\":{},\"all_routed_s\":{},\"packets_per_node_min\":{:.1},\"bytes_per_node_min\":{:.1},\"packets\":{},\"wall_s\":{:.3}",
                p.name,
                conv,
                routed,
                p.packets_per_node_min,
                p.bytes_per_node_min,
                p.packets,
                p.wall.as_secs_f64()
            );
            let _ = write!(s, ",\"route_events_per_s\":{:?}", p.route_events_per_s);
            if let Some(c) = &p.check {
                let _ = write!(
                    s,
                    ",\"check\":{{\"pairs\":{},\"loops\":{},\"unrouted\":{},\"stale\":{}}}",
                    c.pairs, c.loops, c.unrouted, c.stale
                );
            }
            s.push('}');
        }
        let _ = write!(
            s,
            "],\"steady_packets_per_node_min\":{:.1},\"steady_bytes_per_node_min\":{:.1},\"bytes_per_route\":{:.1},\"cache_bytes_per_route\":{:.2},\"peak_events\":{},\"peak_in_flight_bytes\":{},\"routes\":{},\"candidates\":{},\"transient_loops\":{},\"loop_samples\":{},\"signature_verifications\":{},\"requests_dropped_limit\":{},\"candidates_dropped\":{},\"seqno_bumps\":{},\"urgent_repeats\":{},\"simulated_s\":{:.3},\"wall_s\":{:.3},\"ok\":{}}}",
            self.steady_packets_per_node_min,
            self.steady_bytes_per_node_min,
            self.bytes_per_route,
            self.cache_bytes_per_route,
            self.peak_events,
            self.peak_in_flight_bytes,
            self.routes,
            self.candidates,
            self.transient_loops,
            self.loop_samples,
            self.signature_verifications,
            self.stats.requests_dropped_limit,
            self.stats.candidates_dropped,
            self.stats.seqno_bumps,
            self.stats.urgent_repeats,
            self.simulated.as_secs_f64(),
            self.wall.as_secs_f64(),
            self.ok()
        );
        if let Some((junk, admission, max, total)) = self.table_fill {
            s.pop();
            let st = &self.stats;
            let _ = write!(
                s,
                ",\"table_fill\":{{\"junk\":{junk},\"admission\":\"{admission:?}\",\"held_max\":{max},\"held_total\":{total},\"rejected_origin_quota\":{},\"rejected_origin_rate\":{},\"origins_evicted\":{},\"rejected_table_full\":{}}}}}",
                st.rejected_origin_quota,
                st.rejected_origin_rate,
                st.origins_evicted,
                st.rejected_table_full
            );
        }
        s
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} nodes, {} links (max degree {}), {}, seed {}",
            self.nodes, self.links, self.max_degree, self.topology, self.seed
        )?;
        for p in &self.phases {
            write!(
                f,
                "  {:<22} converged {:>9} all routed {:>8} | {:>8.0} pkts/node/min {:>10.0} B/node/min | wall {:>7.2}s",
                p.name,
                p.convergence
                    .map_or("NO".into(), |c| format!("{:.3}s", c.as_secs_f64())),
                p.all_routed
                    .map_or("-".into(), |c| format!("{:.1}s", c.as_secs_f64())),
                p.packets_per_node_min,
                p.bytes_per_node_min,
                p.wall.as_secs_f64()
            )?;
            if let Some(c) = &p.check {
                write!(
                    f,
                    " | pairs {} loops {} unrouted {} stale {}",
                    c.pairs, c.loops, c.unrouted, c.stale
                )?;
            }
            writeln!(f)?;
        }
        writeln!(
            f,
            "  steady state: {:.0} pkts/node/min, {:.0} B/node/min",
            self.steady_packets_per_node_min, self.steady_bytes_per_node_min
        )?;
        writeln!(
            f,
            "  memory: {:.1} B/route in routers + {:.2} B/route shared announcements ({} routes, {} candidates)",
            self.bytes_per_route, self.cache_bytes_per_route, self.routes, self.candidates
        )?;
        writeln!(
            f,
            "  simulator queue peak: {} events, {:.1} MB of payloads in flight",
            self.peak_events,
            self.peak_in_flight_bytes as f64 / 1e6
        )?;
        writeln!(
            f,
            "  transient loops: {} in {} sampled destinations; signature verifications: {}",
            self.transient_loops, self.loop_samples, self.signature_verifications
        )?;
        let st = &self.stats;
        writeln!(
            f,
            "  protocol: {} seqno bumps, {} seqno and {} route requests sent, {} urgent repeats; bounds hit: {} requests dropped, {} candidates dropped, {} table full, {} neighbour limit",
            st.seqno_bumps,
            st.seqno_requests_sent,
            st.route_requests_sent,
            st.urgent_repeats,
            st.requests_dropped_limit,
            st.candidates_dropped,
            st.rejected_table_full,
            st.rejected_neighbour_limit
        )?;
        if let Some((junk, admission, max, total)) = self.table_fill {
            writeln!(
                f,
                "  table-fill attack: {junk} prefixes announced by a {admission:?} neighbour of the hub; held: at most {max} by one node, {total} by all; refused: {} over quota, {} over rate; {} pushed out",
                st.rejected_origin_quota, st.rejected_origin_rate, st.origins_evicted
            )?;
        }
        write!(
            f,
            "  simulated {:.1}s in {:.2}s wall: {}",
            self.simulated.as_secs_f64(),
            self.wall.as_secs_f64(),
            if self.ok() { "OK" } else { "FAILED" }
        )
    }
}

impl Scenario {
    /// Runs the scenario.
    pub fn run(&self) -> Report {
        let wall0 = Instant::now();
        let mut sim = Sim::new(self.sim.clone());
        let mut report = Report {
            nodes: sim.len(),
            links: sim.links.len(),
            max_degree: (0..sim.len() as u32)
                .map(|x| sim.degree(x))
                .max()
                .unwrap_or(0),
            topology: format!("{:?}", self.sim.topology)
                .chars()
                .take(60)
                .filter(|c| *c != '"')
                .collect(),
            seed: self.sim.seed,
            ..Report::default()
        };
        report
            .phases
            .push(self.phase(&mut sim, "cold start", |_| {}));
        if let Some(attack) = self.table_fill {
            let hub = (0..sim.len() as u32)
                .max_by_key(|x| (sim.degree(*x), Reverse(*x)))
                .unwrap_or(0);
            report
                .phases
                .push(self.phase(&mut sim, "table-fill attack", |s| {
                    s.add_table_filler(hub, attack.admission, attack.junk, self.sim.seed ^ 0xf111)
                }));
        }
        for r in 0..self.rounds {
            let mut failed_links = Vec::new();
            let mut failed_nodes = Vec::new();
            let (lf, nf) = (self.link_failures, self.node_failures);
            report
                .phases
                .push(self.phase(&mut sim, &format!("failures {}", r + 1), |s| {
                    for _ in 0..lf {
                        if let Some((a, b)) = s.random_live_link() {
                            s.fail_link(a, b);
                            failed_links.push((a, b));
                        }
                    }
                    for _ in 0..nf {
                        if let Some(x) = s.random_live_node() {
                            s.fail_node(x);
                            failed_nodes.push(x);
                        }
                    }
                }));
            report
                .phases
                .push(self.phase(&mut sim, &format!("recovery {}", r + 1), |s| {
                    for (a, b) in &failed_links {
                        s.restore_link(*a, *b);
                    }
                    for x in &failed_nodes {
                        s.restore_node(*x);
                    }
                }));
        }
        if !self.steady_window.is_zero() {
            sim.set_sampling(false);
            let c0 = sim.counters;
            let t0 = sim.now();
            sim.run_until(t0 + self.steady_window);
            let live = (0..sim.len() as u32)
                .filter(|x| sim.alive(*x))
                .count()
                .max(1);
            let mins = self.steady_window.as_secs_f64() / 60.0;
            report.steady_packets_per_node_min =
                (sim.counters.packets - c0.packets) as f64 / live as f64 / mins;
            report.steady_bytes_per_node_min =
                (sim.counters.bytes - c0.bytes) as f64 / live as f64 / mins;
        }
        let (bytes, routes, cands, cache) = sim.memory();
        report.routes = routes;
        report.candidates = cands;
        report.bytes_per_route = bytes as f64 / routes.max(1) as f64;
        report.cache_bytes_per_route = cache as f64 / routes.max(1) as f64;
        report.transient_loops = sim.transient_loops.len();
        report.peak_events = sim.peak_events;
        report.peak_in_flight_bytes = sim.peak_in_flight;
        report.loop_samples = sim.loop_samples;
        report.signature_verifications = match &sim.cache {
            Some(c) => c.lock().map(|c| c.verifications).unwrap_or(0),
            None => sim.total_stats().signature_verifications,
        };
        report.stats = sim.total_stats();
        report.table_fill = self.table_fill.map(|a| {
            let held: Vec<usize> = (0..sim.len() as u32).map(|x| sim.junk_held(x)).collect();
            let max = held.iter().copied().max().unwrap_or(0);
            (a.junk, a.admission, max, held.iter().sum())
        });
        report.simulated = sim.now();
        report.wall = wall0.elapsed();
        report
    }

    /// Runs one phase; its figures also go to stderr as soon as it ends, so a long run
    /// (an hour at 10,000 nodes) shows its progress and leaves partial results if stopped.
    fn phase(&self, sim: &mut Sim, name: &str, act: impl FnOnce(&mut Sim)) -> PhaseReport {
        let wall0 = Instant::now();
        let c0 = sim.counters;
        let t0 = sim.now();
        act(sim);
        sim.event_seconds = Some((t0, Vec::new()));
        let interval = self.sim.routed_check_interval;
        let watch = self.full_checks && !interval.is_zero();
        if watch {
            sim.watch_routed(interval);
        }
        let conv = sim.run_until_quiet(self.quiet, self.max_phase);
        let all_routed = if watch { sim.unwatch_routed(t0) } else { None };
        let live = (0..sim.len() as u32)
            .filter(|x| sim.alive(*x))
            .count()
            .max(1);
        // Rates over the active part of the phase (until the last route change, at
        // least one second) so the quiet tail does not dilute them.
        let active = conv
            .unwrap_or(self.max_phase)
            .max(Duration::from_secs(1))
            .min(sim.now() - t0);
        let mins = active.as_secs_f64() / 60.0;
        let packets = sim.counters.packets - c0.packets;
        let report = PhaseReport {
            name: name.to_string(),
            convergence: conv,
            all_routed,
            route_events_per_s: sim.event_seconds.take().map(|e| e.1).unwrap_or_default(),
            packets_per_node_min: packets as f64 / live as f64 / mins,
            bytes_per_node_min: (sim.counters.bytes - c0.bytes) as f64 / live as f64 / mins,
            packets,
            check: self.full_checks.then(|| sim.check()),
            wall: wall0.elapsed(),
        };
        eprintln!(
            "phase {name}: last route change {:?}, all routed {:?}, {} payloads, check {:?}, wall {:.1}s, simulated {:.1}s, route events per s {:?}",
            report.convergence,
            report.all_routed,
            report.packets,
            report
                .check
                .as_ref()
                .map(|c| (c.pairs, c.loops, c.unrouted, c.stale)),
            report.wall.as_secs_f64(),
            sim.now().as_secs_f64(),
            report.route_events_per_s
        );
        report
    }
}
