//! The routing state machine: neighbours, the route table with feasibility distances,
//! route selection, timers and the messages they produce. See the module docs in
//! `mod.rs` for the contract and `docs/routing.md` for the protocol.

use std::cmp::Reverse;
use std::collections::{HashMap, VecDeque};
use std::fmt::Debug;
use std::hash::Hash;
use std::mem::size_of;
use std::net::Ipv6Addr;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use myconet_common::addr::NODE_PREFIX_LEN;

use super::cache::{OriginReject, SharedVerifyCache, SignedOrigin, VerifyCache, owned_prefix};
use super::metric::{
    CostParams, Fd, INFINITY, add_metric, is_feasible, link_cost, seqno_newer, significant,
};
use super::routes::{Cand, Entry, EntryRef, RouteTable};
use super::util::{KeyedState, SplitMix};
use super::wire::{self, MAX_PAYLOAD, Tlv, Tlvs};
use super::{
    Admission, Explanation, NotChosen, RouteEvent, RouteSnapshot, RoutingError, RoutingStats,
    Selection, TransmitTo,
};
use crate::id::Signer;
use crate::pins::{self, PinCheck, SharedPins};

/// Everything tunable about the routing core. [`RoutingConfig::default`] is what a node
/// should run; tests shrink timers.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingConfig {
    /// Mean interval between full-table updates to all neighbours. Periodic updates are
    /// what repairs lost triggered updates, so this bounds how long a loss can linger.
    pub update_interval: Duration,
    /// A route not refreshed for this long is dropped (Babel: 3.5 × update interval), so
    /// a neighbour that silently stops advertising cannot hold our traffic forever.
    pub hold_time: Duration,
    /// How long a feasibility distance outlives its last route. Forgetting it earlier
    /// would let old, possibly looping routes back in.
    pub source_gc_time: Duration,
    /// Triggered updates are batched for this long, so a burst of changes (e.g. a
    /// neighbour's whole table arriving) leaves as a few full payloads, not many small ones.
    pub triggered_delay: Duration,
    /// How often hold and garbage-collection timers are checked. Expiry is a safety net
    /// (neighbour loss is reported directly), so coarse sweeps are enough and cheap.
    pub sweep_interval: Duration,
    /// How long our own seqno or route request is remembered (forwarded requests are
    /// remembered for one `request_resend_interval`, so a lost one is retried).
    pub request_timeout: Duration,
    /// Interval between resends of our own unanswered seqno requests.
    pub request_resend_interval: Duration,
    /// How many times our own seqno request is resent before giving up.
    pub request_resends: u8,
    /// Hop count a seqno request starts with: it is forwarded towards the origin at most
    /// this many times.
    pub request_hops: u8,
    /// Minimum interval between two sequence-number bumps of our own prefix, so
    /// neighbours cannot make us re-sign (and flood the network) at will. A seqno request
    /// raises our seqno by one, never further (as babeld does): requests are not signed,
    /// and a request that could move us far ahead could also move us through the whole
    /// space (see [`seqno_newer`]).
    pub seqno_bump_min_interval: Duration,
    /// Route selection hysteresis, absolute part: a feasible route replaces the selected
    /// one only when better by at least this much (and by `selected / hysteresis_div`).
    pub hysteresis_abs: u16,
    /// Relative part of the selection hysteresis.
    pub hysteresis_div: u16,
    /// A selected metric change is announced at once only when at least this much (and
    /// `old / significant_div`); smaller changes wait for the periodic update.
    pub significant_abs: u16,
    /// Relative part of the triggered-update threshold.
    pub significant_div: u16,
    /// Most prefixes held in total (each costs a table entry); new prefixes beyond it
    /// are dropped and counted.
    pub max_routes: usize,
    /// Most routes one neighbour can have us hold.
    pub max_routes_per_neighbour: u32,
    /// Most prefixes one self-admitted neighbour may introduce: prefixes it was the
    /// first to announce and that no configured neighbour has offered since (see
    /// [`Admission`]). Beyond it its new prefixes are refused before their signature is
    /// checked (`rejected_origin_quota`). A self-admitted neighbour that is the only
    /// way to more nodes than this must be configured (on this side) instead.
    pub self_admitted_origin_quota: u32,
    /// Most prefixes held that no configured neighbour has offered, all self-admitted
    /// neighbours together (a host can bring many identities). Beyond it a new one
    /// pushes out one of the neighbour that introduced the most, if that one holds
    /// more than the newcomer, and is refused otherwise.
    pub max_self_admitted_origins: usize,
    /// New prefixes per second all self-admitted neighbours together may introduce
    /// (a token bucket of `self_admitted_origin_burst`): bounds the signature checks
    /// and the churn a host cycling through identities can cause.
    pub self_admitted_origin_rate: f64,
    /// Burst of the rate above (what a whole set of inbound neighbours brings at once
    /// when this node starts).
    pub self_admitted_origin_burst: u32,
    /// Most candidate routes kept per prefix: the selected one plus the best feasible
    /// alternatives. Alternatives make failover instant, but beyond a few they only cost
    /// memory (a hub would hold one per neighbour and prefix); a worse offer is dropped
    /// and counted, and comes back with the neighbour's next periodic update.
    pub max_candidates: u8,
    /// Most requests remembered (own and forwarded) and most queued request/unicast
    /// replies; beyond it requests are dropped and counted. Requests are remembered
    /// per prefix held, so this is at most the table size anyway; it must not be
    /// smaller than the number of prefixes a node may starve for at once (nearly its
    /// whole table when its main neighbour dies): a dropped request leaves its prefix
    /// starving until a periodic update (at 10,000 nodes a limit of 4,096 left 2,884
    /// pairs unrouted).
    pub max_pending_requests: usize,
    /// How many times (at most 3) an urgent update is repeated: a retraction, a new
    /// seqno, the first announcement of a prefix (a route gained or regained), our own
    /// re-signed prefix, and the full table sent to a neighbour that came up. Updates
    /// are not acknowledged; without repeats a lost retraction leaves stale routes and
    /// a lost first announcement or new seqno leaves neighbours without a route until
    /// the next periodic update (RFC 8966 §3.7.2). The current state is repeated, not
    /// the old message.
    pub urgent_repeats: u8,
    /// Mean delay between repeats (jittered to [0.5, 1.5] ×).
    pub urgent_repeat_delay: Duration,
    /// Capacity of each generation of the signature-verification cache.
    pub verify_cache_capacity: usize,
    /// Identity proof of work an origin key must have (`addr::identity_work`); its
    /// announcements are refused otherwise (`rejected_insufficient_work`). The network's
    /// [`myconet_common::addr::IDENTITY_WORK_BITS`]; the simulator, whose keys are made
    /// without it, uses 0.
    pub min_identity_work: u32,
    /// Link cost function parameters.
    pub cost: CostParams,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            update_interval: Duration::from_secs(30),
            hold_time: Duration::from_secs(105),
            source_gc_time: Duration::from_secs(180),
            triggered_delay: Duration::from_millis(20),
            sweep_interval: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            request_resend_interval: Duration::from_secs(2),
            request_resends: 5,
            request_hops: 64,
            seqno_bump_min_interval: Duration::from_millis(500),
            hysteresis_abs: 16,
            hysteresis_div: 8,
            significant_abs: 16,
            significant_div: 8,
            max_routes: 200_000,
            max_routes_per_neighbour: 100_000,
            self_admitted_origin_quota: 256,
            max_self_admitted_origins: 16_384,
            self_admitted_origin_rate: 64.0,
            self_admitted_origin_burst: 4096,
            max_candidates: 3,
            max_pending_requests: 200_000,
            urgent_repeats: 2,
            urgent_repeat_delay: Duration::from_millis(500),
            verify_cache_capacity: 65_536,
            min_identity_work: myconet_common::addr::IDENTITY_WORK_BITS,
            cost: CostParams::default(),
        }
    }
}

/// Units of the compact timestamps stored per route: 100 ms, so a u32 lasts 13 years.
const TICK_MS: u64 = 100;
/// "No neighbour" in the compact neighbour-index fields.
pub(super) const NONE: u16 = u16::MAX;

const F_HAS_FD: u8 = 1;
const F_QUEUED: u8 = 2;
/// Our last broadcast of the prefix was a retraction.
const F_RETRACTED: u8 = 4;
/// Repeats of an urgent update still to send (0–3), in bits 4–5.
const REP_SHIFT: u8 = 4;
const F_REP_MASK: u8 = 3 << REP_SHIFT;
/// The repeats were scheduled just before a repeat round: skip that round, so that a
/// repeat never follows its original within a fraction of the repeat delay.
const F_REP_NEW: u8 = 64;
/// A configured neighbour has offered the prefix: it is charged to nobody and is not
/// pushed out for another (see [`Admission`]).
const F_VOUCHED: u8 = 128;
/// Most repeats the flags can count.
const MAX_REPEATS: u8 = 3;

fn fd_of(e: &Entry) -> Option<Fd> {
    (e.flags & F_HAS_FD != 0).then_some(Fd {
        seqno: e.fd_seqno,
        metric: e.fd_metric,
    })
}

#[derive(Debug, Clone)]
struct Nbr<N> {
    id: N,
    key: [u8; 32],
    base: u16,
    rtt: Option<Duration>,
    loss: Option<f64>,
    smoothed: f64,
    cost: u16,
    /// Whether a measurement has arrived (the first one applies without smoothing).
    measured: bool,
    routes: u32,
    admission: Admission,
    /// Prefixes charged to it as their introducer (self-admitted neighbours only).
    introduced: u32,
}

/// A request we sent or forwarded, remembered to suppress duplicates, resend ours, pass
/// the answer back and prefer it in route selection.
#[derive(Debug, Clone)]
struct Pending {
    /// `None` for a route request, else the requested seqno.
    seqno: Option<u32>,
    /// We starve for it ourselves: resent while we have no route.
    own: bool,
    /// Some neighbour is waiting for the answer (we forwarded its request, or suppressed
    /// its duplicate): broadcast the route as soon as the request is satisfied.
    wanted: bool,
    /// Until then the request is live: a route carrying its seqno is selected as soon as
    /// one arrives (so the new seqno propagates), and it covers duplicates.
    expires: Instant,
    resends_left: u8,
    next_resend: Instant,
    /// When it last went out. A duplicate goes out again only after half a resend
    /// interval: a request that was lost further on must not block the requester's
    /// resend, which arrives about one resend interval after the original.
    sent: Instant,
}

/// A queued request TLV (a seqno request, or a shorter route request padded with zeros:
/// `wire::tlv_len` reads its real length).
type RequestTlv = [u8; wire::SEQNO_REQUEST_TLV_LEN];

/// Where a queued request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Dest {
    Nbr(u16),
    All,
}

/// What a router emits: one payload for one neighbour or for every neighbour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingTransmit<N> {
    /// Recipient(s).
    pub to: TransmitTo<N>,
    /// The routing payload (≤ [`MAX_PAYLOAD`] bytes), to be sent inside an
    /// authenticated link-level control packet.
    pub payload: Vec<u8>,
}

/// The sans-IO routing core of one node. See the module documentation.
pub struct Router<N> {
    signer: Arc<dyn Signer>,
    config: RoutingConfig,
    epoch: Instant,
    now: Instant,
    tick: u32,
    rng: SplitMix,
    own: Arc<SignedOrigin>,
    own_queued: bool,
    last_bump: Option<Instant>,
    bump_at: Option<Instant>,
    nbrs: Vec<Option<Nbr<N>>>,
    nbr_index: HashMap<N, u16, KeyedState>,
    configured_cost: HashMap<N, u16, KeyedState>,
    table: RouteTable,
    /// Prefixes held that no configured neighbour has offered (not `F_VOUCHED`).
    unvouched: usize,
    /// Token bucket of new prefixes from self-admitted neighbours: tokens, last refill.
    origin_tokens: (f64, Instant),
    /// Prefixes pushed out for others whose retraction has not gone out yet.
    evicted: Vec<u64>,
    /// Where the search for an entry to push out resumes (a round-robin cursor).
    evict_cursor: usize,
    cache: SharedVerifyCache,
    /// Keys pinned per prefix (`crate::pins`); `None`: no pinning (the simulator).
    pins: Option<SharedPins>,
    pending: HashMap<u64, Pending, KeyedState>,
    pending_bcast: Vec<u64>,
    dump_all: bool,
    pending_dumps: Vec<u16>,
    pending_unicast: Vec<(u16, u64)>,
    pending_requests: Vec<(Dest, RequestTlv)>,
    flush_at: Option<Instant>,
    /// Next round of urgent repeats: every prefix with repeats left in its flags, our
    /// own prefix and the repeated dumps go out together, in few full payloads. Flags
    /// rather than a list of scheduled repeats: at cold start every prefix is a first
    /// announcement, and a list entry per prefix and node would cost more memory than
    /// the route table.
    next_repeat: Option<Instant>,
    /// Entries with repeats left (recounted at each round).
    repeat_count: usize,
    /// Repeats left of our own prefix, and whether they skip the next round.
    own_repeats: (u8, bool),
    /// Full-table dumps to repeat: (neighbour slot, repeats left, skips the next round).
    dump_repeats: Vec<(u16, u8, bool)>,
    next_periodic: Instant,
    next_sweep: Instant,
    next_resend: Option<Instant>,
    transmits: VecDeque<RoutingTransmit<N>>,
    events: VecDeque<RouteEvent<N>>,
    stats: RoutingStats,
}

impl<N> Debug for Router<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("prefix", &prefix_addr(self.own.prefix))
            .field("seqno", &self.own.seqno)
            .field("routes", &self.table.len())
            .finish_non_exhaustive()
    }
}

/// The /64 as an address.
pub(crate) fn prefix_addr(p: u64) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(p) << 64)
}

/// Upper 64 bits of an address.
pub(crate) fn prefix_bits(a: Ipv6Addr) -> u64 {
    (u128::from(a) >> 64) as u64
}

const OVERLAY_TOP: u64 = 0xfd6d;

fn lock(cache: &SharedVerifyCache) -> MutexGuard<'_, VerifyCache> {
    cache.lock().unwrap_or_else(|e| e.into_inner())
}

impl<N: Copy + Eq + Hash + Ord + Debug> Router<N> {
    /// A router for the node whose key `signer` holds, with its own verification cache.
    /// `seed` drives jitter and table hashing, so two runs with the same inputs behave
    /// identically. `seqno` is the first sequence number of this run: it must be above
    /// every seqno the node announced in earlier runs (the agent reserves them in its
    /// state directory), or its announcements stay unfeasible wherever an older
    /// feasibility distance is still held, until it hears one of them and jumps past it.
    pub fn new(
        signer: Arc<dyn Signer>,
        config: RoutingConfig,
        seed: u64,
        seqno: u32,
        now: Instant,
    ) -> Result<Self, RoutingError> {
        let cache = VerifyCache::shared(
            config.verify_cache_capacity,
            config.min_identity_work,
            seed ^ 0x5eed,
        );
        Self::with_cache(signer, config, seed, seqno, now, cache)
    }

    /// Like [`Router::new`] but verifying through a caller-supplied cache. The simulator
    /// shares one cache among all its routers so that each distinct announcement is
    /// verified once per run instead of once per node; results are identical because the
    /// cache only ever holds announcements that verified.
    pub fn with_cache(
        signer: Arc<dyn Signer>,
        config: RoutingConfig,
        seed: u64,
        seqno: u32,
        now: Instant,
        cache: SharedVerifyCache,
    ) -> Result<Self, RoutingError> {
        let mut rng = SplitMix::new(seed);
        let own = Arc::new(
            SignedOrigin::sign(signer.as_ref(), seqno).ok_or(RoutingError::InvalidSigner)?,
        );
        lock(&cache).insert(own.clone());
        let hs = KeyedState::new(rng.next_u64());
        let first = config.update_interval.mul_f64(0.5 + 0.5 * rng.next_f64());
        Ok(Router {
            signer,
            epoch: now,
            now,
            tick: 0,
            own,
            own_queued: false,
            last_bump: None,
            bump_at: None,
            nbrs: Vec::new(),
            nbr_index: HashMap::with_hasher(hs),
            configured_cost: HashMap::with_hasher(hs),
            table: RouteTable::new(seed ^ 0x7ab1e),
            unvouched: 0,
            origin_tokens: (f64::from(config.self_admitted_origin_burst), now),
            evicted: Vec::new(),
            evict_cursor: 0,
            cache,
            pins: None,
            pending: HashMap::with_hasher(hs),
            pending_bcast: Vec::new(),
            dump_all: false,
            pending_dumps: Vec::new(),
            pending_unicast: Vec::new(),
            pending_requests: Vec::new(),
            flush_at: None,
            next_repeat: None,
            repeat_count: 0,
            own_repeats: (0, false),
            dump_repeats: Vec::new(),
            next_periodic: now + first,
            next_sweep: now + config.sweep_interval,
            next_resend: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: RoutingStats::default(),
            config,
            rng,
        })
    }

    /// This node's own /64 (originated automatically, never in the route events).
    pub fn own_prefix(&self) -> Ipv6Addr {
        prefix_addr(self.own.prefix)
    }

    /// This node's current sequence number.
    pub fn own_seqno(&self) -> u32 {
        self.own.seqno
    }

    /// Counters: traffic, rejections by reason, protocol activity.
    pub fn stats(&self) -> &RoutingStats {
        &self.stats
    }

    /// The configuration in force.
    pub fn config(&self) -> &RoutingConfig {
        &self.config
    }

    fn set_now(&mut self, now: Instant) {
        if now > self.now {
            self.now = now;
        }
        let ms = self.now.saturating_duration_since(self.epoch).as_millis() as u64;
        self.tick = u32::try_from(ms / TICK_MS).unwrap_or(u32::MAX);
    }

    fn ticks(&self, d: Duration) -> u32 {
        u32::try_from(d.as_millis() as u64 / TICK_MS).unwrap_or(u32::MAX)
    }

    fn arm_flush(&mut self) {
        if self.flush_at.is_none() {
            self.flush_at = Some(self.now + self.config.triggered_delay);
        }
    }

    fn cost_of(nbrs: &[Option<Nbr<N>>], ni: u16) -> u16 {
        nbrs.get(usize::from(ni))
            .and_then(|n| n.as_ref())
            .map_or(INFINITY, |n| n.cost)
    }

    // ----- neighbours -------------------------------------------------------------

    /// A neighbour's link session came up: it may now send us routes, and it gets our
    /// whole table at the next flush. `node_key` is its authenticated identity, shown in
    /// the operator view; `admission` how much it may add to the table ([`Admission`]).
    /// Calling it again for an up neighbour resets it (a new session means the peer may
    /// have restarted and forgotten what we told it).
    pub fn neighbour_up(&mut self, n: N, node_key: [u8; 32], admission: Admission, now: Instant) {
        self.set_now(now);
        if self.nbr_index.contains_key(&n) {
            self.neighbour_down(n, now);
        }
        if self.nbr_index.len() >= usize::from(NONE) {
            self.stats.rejected_neighbour_limit += 1;
            return;
        }
        let base = self
            .configured_cost
            .get(&n)
            .copied()
            .unwrap_or(self.config.cost.default_base);
        let nb = Nbr {
            id: n,
            key: node_key,
            base,
            rtt: None,
            loss: None,
            smoothed: f64::from(base),
            cost: link_cost(&self.config.cost, base, None, None),
            measured: false,
            routes: 0,
            admission,
            introduced: 0,
        };
        let slot = match self.nbrs.iter().position(|s| s.is_none()) {
            Some(i) => {
                self.nbrs[i] = Some(nb);
                i
            }
            None => {
                self.nbrs.push(Some(nb));
                self.nbrs.len() - 1
            }
        } as u16;
        self.nbr_index.insert(n, slot);
        self.stats.neighbours_up += 1;
        self.pending_dumps.push(slot);
        // A lost payload of this dump would leave the neighbour without those routes
        // until our next periodic update: repeat it like an urgent update. (With an
        // empty table, as at cold start, every route it will need comes later as a
        // first announcement, which is repeated anyway.)
        let n = self.config.urgent_repeats.min(MAX_REPEATS);
        if n > 0 && self.table.len() > 0 {
            let skip = self.join_repeat_round();
            self.dump_repeats.push((slot, n, skip));
        } else {
            // Our own prefix, the one thing in that dump, is repeated by broadcast.
            self.schedule_own_repeat();
        }
        self.arm_flush();
    }

    /// The link to `n` was renewed by a new handshake while it stayed up: the neighbour
    /// may have restarted and lost every route, so it gets the full table again, as it
    /// would by asking with a wildcard route request. Routes learned through it stay
    /// (a rekey changes nothing about them; a restarted neighbour re-announces what it
    /// still carries, and its seqno protection covers its own prefix).
    pub fn neighbour_renewed(&mut self, n: N, now: Instant) {
        self.set_now(now);
        if let Some(&slot) = self.nbr_index.get(&n) {
            self.on_route_request(slot, 0, 0);
        }
    }

    /// The neighbour's link went down: every route through it is dropped now (not at
    /// hold expiry), alternatives are selected or the routes retracted.
    pub fn neighbour_down(&mut self, n: N, now: Instant) {
        self.set_now(now);
        let Some(slot) = self.nbr_index.remove(&n) else {
            return;
        };
        if let Some(Some(nb)) = self.nbrs.get_mut(usize::from(slot)) {
            nb.cost = INFINITY;
        }
        let tick = self.tick;
        let mut affected = Vec::new();
        self.table.for_each_mut(|mut e| {
            // Its introductions stay unvouched, charged to nobody: the next
            // self-admitted neighbour to offer one is charged with it.
            if e.intro == slot {
                e.intro = NONE;
            }
            if e.remove(slot, tick).is_some() {
                affected.push(e.prefix);
            }
        });
        for k in affected {
            self.reselect(k);
        }
        self.nbrs[usize::from(slot)] = None;
        self.pending_dumps.retain(|s| *s != slot);
        self.dump_repeats.retain(|d| d.0 != slot);
        self.pending_unicast.retain(|(s, _)| *s != slot);
        self.pending_requests.retain(|(d, _)| *d != Dest::Nbr(slot));
        self.stats.neighbours_down += 1;
    }

    /// Sets the configured base cost of a neighbour (per-interface/per-peer cost in Babel
    /// terms): the operator's way to prefer or avoid a link regardless of measurements.
    /// Kept across the neighbour going down and up again.
    pub fn set_neighbour_cost(&mut self, n: N, base_cost: u16) {
        self.configured_cost.insert(n, base_cost);
        let Some(&slot) = self.nbr_index.get(&n) else {
            return;
        };
        let Some(Some(nb)) = self.nbrs.get_mut(usize::from(slot)) else {
            return;
        };
        nb.base = base_cost;
        let c = link_cost(&self.config.cost, base_cost, nb.rtt, nb.loss);
        nb.smoothed = f64::from(c);
        if c != nb.cost {
            nb.cost = c;
            self.cost_changed(slot);
        }
    }

    /// Pins origin keys per prefix through `pins` from now on: a prefix new to the table
    /// takes only the key pinned for it, and pins the key it takes (see `crate::pins`).
    pub fn set_pins(&mut self, pins: SharedPins) {
        self.pins = Some(pins);
    }

    /// Drops every route to the /64 of `addr` whose origin key is not `keep` (all of
    /// them with `None`), selecting again among what is left: how an operator's pin
    /// (or forgetting one) takes effect at once. Returns how many routes went.
    pub fn drop_routes(&mut self, addr: Ipv6Addr, keep: Option<[u8; 32]>, now: Instant) -> usize {
        self.set_now(now);
        let p = prefix_bits(addr);
        let tick = self.tick;
        let nbrs = &mut self.nbrs;
        let Some(mut e) = self.table.get_mut(p) else {
            return 0;
        };
        let n = e.retain(tick, |c| {
            let stay = keep.is_some_and(|k| k == c.signed.key);
            if !stay && let Some(Some(nb)) = nbrs.get_mut(usize::from(c.nbr)) {
                nb.routes = nb.routes.saturating_sub(1);
            }
            stay
        });
        if n > 0 {
            self.reselect(p);
        }
        n
    }

    /// Changes how a neighbour that is up was admitted (an operator configured a
    /// neighbour that had come by itself): from then on its prefixes are taken as a
    /// configured neighbour's, and those charged to it stop being charged.
    pub fn set_neighbour_admission(&mut self, n: N, admission: Admission) {
        let Some(&slot) = self.nbr_index.get(&n) else {
            return;
        };
        let Some(Some(nb)) = self.nbrs.get_mut(usize::from(slot)) else {
            return;
        };
        let was = std::mem::replace(&mut nb.admission, admission);
        if was == admission || admission == Admission::SelfAdmitted {
            return;
        }
        nb.introduced = 0;
        let mut vouched = 0;
        self.table.for_each_mut(|mut e| {
            if e.flags & F_VOUCHED == 0 && e.intro == slot {
                e.intro = NONE;
                e.flags |= F_VOUCHED;
                vouched += 1;
            }
        });
        self.unvouched = self.unvouched.saturating_sub(vouched);
    }

    /// Feeds the agent's smoothed RTT and hello loss for a neighbour. The link cost is
    /// recomputed ([`link_cost`]), smoothed further and only applied when it leaves a
    /// deadband, so measurement jitter does not reach route selection.
    pub fn neighbour_measurement(
        &mut self,
        n: N,
        rtt: Option<Duration>,
        loss: Option<f64>,
        now: Instant,
    ) {
        self.set_now(now);
        let Some(&slot) = self.nbr_index.get(&n) else {
            return;
        };
        let p = &self.config.cost;
        let Some(Some(nb)) = self.nbrs.get_mut(usize::from(slot)) else {
            return;
        };
        if rtt.is_some() {
            nb.rtt = rtt;
        }
        if loss.is_some() {
            nb.loss = loss;
        }
        let raw = link_cost(p, nb.base, nb.rtt, nb.loss);
        let first = !nb.measured;
        nb.measured = true;
        let new = if first || raw == INFINITY || nb.cost == INFINITY {
            nb.smoothed = f64::from(raw);
            raw
        } else {
            nb.smoothed += (f64::from(raw) - nb.smoothed) / f64::from(p.smoothing.max(1));
            let cand = nb.smoothed.round().clamp(1.0, f64::from(INFINITY - 1)) as u16;
            if significant(nb.cost, cand, p.deadband_abs, p.deadband_div) {
                cand
            } else {
                nb.cost
            }
        };
        if new != nb.cost {
            nb.cost = new;
            self.cost_changed(slot);
        }
    }

    /// The cost currently applied to a neighbour's link, if it is up.
    pub fn neighbour_cost(&self, n: N) -> Option<u16> {
        let slot = *self.nbr_index.get(&n)?;
        Some(Self::cost_of(&self.nbrs, slot))
    }

    fn cost_changed(&mut self, slot: u16) {
        self.stats.link_cost_changes += 1;
        let keys: Vec<u64> = self
            .table
            .iter()
            .filter(|e| e.cand(slot).is_some())
            .map(|e| e.prefix)
            .collect();
        for k in keys {
            self.reselect(k);
        }
    }

    // ----- input ------------------------------------------------------------------

    /// Processes a routing payload from an authenticated neighbour. Records are applied
    /// one by one: each rejected record is counted in [`RoutingStats`] and skipped; a
    /// framing error stops the payload (earlier records keep their effect) and is
    /// returned.
    pub fn handle_message(
        &mut self,
        from: N,
        payload: &[u8],
        now: Instant,
    ) -> Result<(), RoutingError> {
        self.set_now(now);
        let Some(&slot) = self.nbr_index.get(&from) else {
            self.stats.rejected_unknown_neighbour += 1;
            return Err(RoutingError::UnknownNeighbour);
        };
        self.stats.messages_received += 1;
        self.stats.bytes_received += payload.len() as u64;
        let body = match wire::parse_header(payload) {
            Ok(b) => b,
            Err(e) => {
                match e {
                    wire::WireError::Version(_) => self.stats.rejected_version += 1,
                    _ => self.stats.rejected_malformed += 1,
                }
                return Err(e.into());
            }
        };
        // Touch the table slots, then the entries, of every prefix in the payload before
        // processing it: independent loads overlap their cache misses (at 10,000 routes
        // per node each update's lookup otherwise waits for two misses in turn).
        for level in 0..2 {
            for tlv in Tlvs::new(body) {
                match tlv {
                    Ok(Tlv::Update { prefix, .. }) | Ok(Tlv::Retraction { prefix, .. }) => {
                        self.table.touch(prefix, level)
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
        let cache = self.cache.clone();
        let mut cache = lock(&cache);
        let mut seqno_requests = Vec::new();
        for tlv in Tlvs::new(body) {
            match tlv {
                Err(e) => {
                    self.stats.rejected_malformed += 1;
                    return Err(e.into());
                }
                Ok(Tlv::Update {
                    plen,
                    seqno,
                    metric,
                    prefix,
                    key,
                    signature,
                }) => {
                    self.stats.updates_received += 1;
                    if metric == INFINITY {
                        self.on_retraction(slot, plen, prefix);
                    } else {
                        self.on_update(
                            slot, &mut cache, plen, seqno, metric, prefix, key, signature,
                        );
                    }
                }
                Ok(Tlv::Retraction { plen, prefix }) => {
                    self.stats.retractions_received += 1;
                    self.on_retraction(slot, plen, prefix);
                }
                Ok(Tlv::RouteRequest { plen, prefix }) => {
                    self.stats.route_requests_received += 1;
                    self.on_route_request(slot, plen, prefix);
                }
                Ok(Tlv::SeqnoRequest {
                    plen,
                    hops,
                    seqno,
                    prefix,
                }) => {
                    self.stats.seqno_requests_received += 1;
                    // Answered after the loop: answering may re-sign our own prefix,
                    // which takes the verification cache this loop holds.
                    seqno_requests.push((plen, hops, seqno, prefix));
                }
                Ok(Tlv::Unknown(_)) => self.stats.unknown_tlvs += 1,
            }
        }
        drop(cache);
        for (plen, hops, seqno, prefix) in seqno_requests {
            self.on_seqno_request(slot, plen, hops, seqno, prefix);
        }
        Ok(())
    }

    fn valid_prefix(&mut self, plen: u8, prefix: u64) -> bool {
        if plen != NODE_PREFIX_LEN || prefix >> 48 != OVERLAY_TOP {
            self.stats.rejected_bad_prefix += 1;
            return false;
        }
        true
    }

    #[allow(clippy::too_many_arguments)]
    fn on_update(
        &mut self,
        slot: u16,
        cache: &mut VerifyCache,
        plen: u8,
        seqno: u32,
        metric: u16,
        prefix: u64,
        key: &[u8; 32],
        signature: &[u8; 64],
    ) {
        if !self.valid_prefix(plen, prefix) {
            return;
        }
        if prefix == self.own.prefix {
            self.stats.own_prefix_ignored += 1;
            // An older incarnation of us announced a newer seqno than we now have (its
            // reservation was lost): catch up, or our announcements would be unfeasible
            // everywhere. Safe to follow however far ahead: only we can sign it.
            if *key == self.own.key && seqno_newer(seqno, self.own.seqno) {
                let before = cache.verifications;
                if cache.check(key, prefix, seqno, signature).is_ok() {
                    self.bump_own(Some(seqno));
                }
                self.stats.signature_verifications += cache.verifications - before;
            }
            return;
        }
        // A self-admitted neighbour would be charged with this prefix (it is new, or held
        // but charged to nobody): refused before its signature is checked when the
        // neighbour's quota or the rate of new prefixes is spent, so announcements
        // beyond them cost a lookup, not a verification.
        let admission = self.admission_of(slot);
        let (exists, orphan) = match self.table.get(prefix) {
            None => (false, false),
            Some(e) => (true, e.flags & F_VOUCHED == 0 && e.intro == NONE),
        };
        if admission == Admission::SelfAdmitted && (!exists || orphan) {
            let introduced = self.nbr(slot).map_or(0, |n| n.introduced);
            if introduced >= self.config.self_admitted_origin_quota {
                self.stats.rejected_origin_quota += 1;
                return;
            }
            if !exists && self.origin_tokens() < 1.0 {
                self.stats.rejected_origin_rate += 1;
                return;
            }
        }
        // A periodic refresh repeats exactly the announcement this neighbour's candidate
        // already carries (verified when it was stored): reuse it and skip the cache
        // lookup, which at scale costs a cache miss per update. Counted as a cache hit.
        let known = self.table.get(prefix).and_then(|e| {
            e.cand(slot)
                .filter(|c| {
                    c.signed.seqno == seqno
                        && c.signed.key == *key
                        && c.signed.signature == *signature
                })
                .map(|c| c.signed.clone())
        });
        let checked = match known {
            Some(s) => {
                cache.hits += 1;
                self.stats.verify_cache_hits += 1;
                Ok(s)
            }
            None => {
                let before = cache.verifications;
                let checked = cache.check(key, prefix, seqno, signature);
                let verified = cache.verifications - before;
                self.stats.signature_verifications += verified;
                if verified == 0 {
                    self.stats.verify_cache_hits += 1;
                }
                checked
            }
        };
        let signed = match checked {
            Ok(s) => s,
            Err(OriginReject::UnownedPrefix) => {
                self.stats.rejected_unowned_prefix += 1;
                return;
            }
            Err(OriginReject::BadSignature) => {
                self.stats.rejected_bad_signature += 1;
                return;
            }
            Err(OriginReject::InsufficientWork) => {
                self.stats.rejected_insufficient_work += 1;
                return;
            }
        };
        let tick = self.tick;
        let max_per = self.config.max_routes_per_neighbour;
        let request_hops = self.config.request_hops;
        let mut request: Option<u32> = None;
        match self.table.get_mut(prefix) {
            Some(mut e) => {
                // The origin is whichever key our candidates carry (all the same); an
                // idle entry (no candidate, feasibility distance kept) takes any owner.
                if e.cands().next().is_some_and(|c| c.signed.key != signed.key) {
                    self.stats.rejected_conflicting_origin += 1;
                    return;
                }
                // An idle entry takes any owner the pin allows (and learns it).
                if e.cands().next().is_none()
                    && let Some(p) = &self.pins
                    && pins::lock(p).check(prefix, &signed.key) == PinCheck::Conflict
                {
                    self.stats.rejected_pinned_key += 1;
                    return;
                }
                let feasible = is_feasible(fd_of(&e), seqno, metric);
                if e.flags & F_VOUCHED == 0 {
                    match admission {
                        // A configured neighbour offers it, on a path that does not run
                        // through us (feasible: an unfeasible offer may be our own
                        // re-advertisement coming back): nobody is charged any more.
                        Admission::Configured if feasible => {
                            if let Some(Some(n)) = self.nbrs.get_mut(usize::from(e.intro)) {
                                n.introduced = n.introduced.saturating_sub(1);
                            }
                            e.intro = NONE;
                            e.flags |= F_VOUCHED;
                            self.unvouched = self.unvouched.saturating_sub(1);
                        }
                        // Its introducer went away: this neighbour carries it now.
                        Admission::SelfAdmitted if e.intro == NONE => {
                            if let Some(Some(n)) = self.nbrs.get_mut(usize::from(slot)) {
                                n.introduced += 1;
                                e.intro = slot;
                            }
                        }
                        Admission::Configured | Admission::SelfAdmitted => {}
                    }
                }
                // An unfeasible offer we would take if it were feasible (we are
                // starving, or it beats the selected route by the hysteresis margin)
                // asks for a newer seqno (RFC 8966 §3.8.2.2): typically a link came
                // back and the neighbour still carries an older seqno than our
                // feasibility distance, and without the request the better route would
                // wait for periodic updates. Requests are deduplicated.
                let offer = add_metric(metric, Self::cost_of(&self.nbrs, slot));
                let better = e.cand(e.sel).is_some_and(|c| {
                    let m = add_metric(c.metric, Self::cost_of(&self.nbrs, c.nbr));
                    let cfg = &self.config;
                    let margin = cfg.hysteresis_abs.max(m / cfg.hysteresis_div.max(1));
                    c.nbr != slot && u32::from(offer) + u32::from(margin) < u32::from(m)
                });
                let starving = (e.sel == NONE || better).then(|| e.fd_seqno.saturating_add(1));
                let selected = e.sel == slot;
                let next_seqno = e.fd_seqno.saturating_add(1);
                match e.cand_mut(slot) {
                    // An unfeasible update of the selected route (its metric grew past
                    // our feasibility distance, typically an increase the neighbour
                    // did not announce at once) is ignored, as RFC 8966 §3.5.4 allows
                    // for the same origin: the route stays loop-free (the neighbour's
                    // own feasibility distance is still below ours) and keeps
                    // carrying traffic at its last feasible metric, while a newer
                    // seqno is requested so that the real metric can be accepted.
                    // Taking the update would leave us, and everyone routing through
                    // us, starving until that request is answered.
                    Some(_) if selected && !feasible => {
                        self.stats.unfeasible_updates += 1;
                        request = Some(next_seqno);
                    }
                    Some(c) => {
                        c.signed = signed;
                        c.metric = metric;
                        c.updated = tick;
                        if !feasible {
                            self.stats.unfeasible_updates += 1;
                            request = starving;
                        }
                    }
                    None if !feasible => {
                        self.stats.unfeasible_updates += 1;
                        request = starving;
                    }
                    None => {
                        let Some(Some(nb)) = self.nbrs.get(usize::from(slot)) else {
                            return;
                        };
                        if nb.routes >= max_per {
                            self.stats.rejected_neighbour_limit += 1;
                            return;
                        }
                        if e.cands().count() >= usize::from(self.config.max_candidates.max(1)) {
                            // Full: replace the worst unselected candidate (unfeasible
                            // first, then highest metric) if the offer beats it.
                            let fd = fd_of(&e);
                            let rank = |c: &Cand| {
                                let m = add_metric(c.metric, Self::cost_of(&self.nbrs, c.nbr));
                                (is_feasible(fd, c.signed.seqno, c.metric), Reverse(m), c.nbr)
                            };
                            let new_m = add_metric(metric, Self::cost_of(&self.nbrs, slot));
                            let worst =
                                e.cands().filter(|c| c.nbr != e.sel).min_by_key(|c| rank(c));
                            let evict = worst
                                .filter(|w| {
                                    let (feasible, Reverse(m), _) = rank(w);
                                    !feasible || m > new_m
                                })
                                .map(|w| w.nbr);
                            let Some(victim) = evict else {
                                self.stats.candidates_dropped += 1;
                                return;
                            };
                            e.remove(victim, tick);
                            if let Some(Some(v)) = self.nbrs.get_mut(usize::from(victim)) {
                                v.routes = v.routes.saturating_sub(1);
                            }
                            self.stats.candidates_dropped += 1;
                        }
                        let Some(Some(nb)) = self.nbrs.get_mut(usize::from(slot)) else {
                            return;
                        };
                        nb.routes += 1;
                        e.push(Cand {
                            signed,
                            nbr: slot,
                            metric,
                            updated: tick,
                        });
                    }
                }
            }
            None => {
                if self.nbr(slot).is_none_or(|nb| nb.routes >= max_per) {
                    self.stats.rejected_neighbour_limit += 1;
                    return;
                }
                if let Some(p) = &self.pins
                    && !pins::lock(p).allows(prefix, &signed.key)
                {
                    self.stats.rejected_pinned_key += 1;
                    return;
                }
                let self_admitted = admission == Admission::SelfAdmitted;
                let requester = self_admitted.then_some(slot);
                if self_admitted
                    && self.unvouched >= self.config.max_self_admitted_origins
                    && !self.evict_for(requester)
                {
                    self.stats.rejected_origin_quota += 1;
                    return;
                }
                // Full: a configured neighbour's new prefix pushes out a self-admitted
                // one (a self-admitted neighbour's only one of a neighbour holding more
                // than it); what configured neighbours brought is first come.
                if self.table.len() >= self.config.max_routes && !self.evict_for(requester) {
                    self.stats.rejected_table_full += 1;
                    return;
                }
                let Some(Some(nb)) = self.nbrs.get_mut(usize::from(slot)) else {
                    return;
                };
                nb.routes += 1;
                let c = Cand {
                    signed,
                    nbr: slot,
                    metric,
                    updated: tick,
                };
                if let Some(p) = &self.pins {
                    pins::lock(p).check(prefix, &c.signed.key);
                }
                let mut e = Entry::new(prefix, c, NONE, INFINITY);
                if self_admitted {
                    nb.introduced += 1;
                    e.intro = slot;
                    self.unvouched += 1;
                    self.origin_tokens.0 -= 1.0;
                } else {
                    e.flags |= F_VOUCHED;
                }
                self.table.insert(e);
            }
        }
        self.reselect(prefix);
        if let Some(s) = request {
            self.send_seqno_request(prefix, s, request_hops, Dest::Nbr(slot), true);
        }
    }

    fn nbr(&self, slot: u16) -> Option<&Nbr<N>> {
        self.nbrs.get(usize::from(slot)).and_then(|n| n.as_ref())
    }

    fn admission_of(&self, slot: u16) -> Admission {
        self.nbr(slot)
            .map_or(Admission::SelfAdmitted, |n| n.admission)
    }

    /// New-prefix tokens of self-admitted neighbours now (refilled, not consumed).
    fn origin_tokens(&mut self) -> f64 {
        let (tokens, at) = self.origin_tokens;
        let burst = f64::from(self.config.self_admitted_origin_burst);
        let elapsed = self.now.saturating_duration_since(at).as_secs_f64();
        let refilled = (tokens + elapsed * self.config.self_admitted_origin_rate).min(burst);
        self.origin_tokens = (refilled, self.now);
        refilled
    }

    /// Pushes out one prefix no configured neighbour has offered, to make room for a
    /// new one from the self-admitted neighbour `requester` or (`None`) from a
    /// configured one: one charged to nobody (its introducer went away) first, else one
    /// charged to the self-admitted neighbour holding the most, which for a
    /// self-admitted requester must hold at least two more than it (fair share: no one
    /// grows past another by pushing out its prefixes). Returns whether it did.
    ///
    /// The prefix goes with its feasibility distance (keeping it would keep the
    /// memory); its retraction is broadcast at the next flush. A later offer of it is
    /// a new prefix again.
    fn evict_for(&mut self, requester: Option<u16>) -> bool {
        if self.unvouched == 0 {
            return false;
        }
        let charged: u64 = self
            .nbrs
            .iter()
            .flatten()
            .map(|n| u64::from(n.introduced))
            .sum();
        let target = if self.unvouched as u64 > charged {
            NONE
        } else {
            let Some((top, count)) = self
                .nbrs
                .iter()
                .enumerate()
                .filter_map(|(i, n)| n.as_ref().map(|n| (i as u16, n.introduced)))
                .max_by_key(|&(i, c)| (c, Reverse(i)))
            else {
                return false;
            };
            if let Some(r) = requester {
                let mine = self.nbr(r).map_or(0, |n| n.introduced);
                if top == r || count < mine.saturating_add(2) {
                    return false;
                }
            }
            top
        };
        let n = self.table.len();
        for k in 0..n {
            let i = (self.evict_cursor + k) % n;
            let Some(e) = self.table.get_at(i) else {
                continue;
            };
            if e.flags & F_VOUCHED == 0 && e.intro == target {
                self.evict_cursor = i;
                let p = e.prefix;
                self.evict(p);
                return true;
            }
        }
        false
    }

    /// Drops prefix `p` from the table now (see [`Router::evict_for`]).
    fn evict(&mut self, p: u64) {
        let Some(e) = self.table.get(p) else {
            return;
        };
        let (sel, intro, flags, adv) = (e.sel, e.intro, e.flags, e.adv_metric);
        let offered: Vec<u16> = e.cands().map(|c| c.nbr).collect();
        for n in offered {
            if let Some(Some(nb)) = self.nbrs.get_mut(usize::from(n)) {
                nb.routes = nb.routes.saturating_sub(1);
            }
        }
        if let Some(prev) = self.nbr(sel).map(|n| n.id) {
            self.events.push_back(RouteEvent::Removed {
                prefix: prefix_addr(p),
                plen: NODE_PREFIX_LEN,
                previous: prev,
            });
            self.stats.route_changes += 1;
        }
        if adv != INFINITY && self.evicted.len() < self.config.max_pending_requests {
            self.evicted.push(p);
            self.arm_flush();
        }
        if flags & F_VOUCHED == 0 {
            self.unvouched = self.unvouched.saturating_sub(1);
            if let Some(Some(n)) = self.nbrs.get_mut(usize::from(intro)) {
                n.introduced = n.introduced.saturating_sub(1);
            }
        }
        self.pending.remove(&p);
        self.table.remove(p);
        self.stats.origins_evicted += 1;
    }

    fn on_retraction(&mut self, slot: u16, plen: u8, prefix: u64) {
        if !self.valid_prefix(plen, prefix) {
            return;
        }
        let tick = self.tick;
        let Some(mut e) = self.table.get_mut(prefix) else {
            return;
        };
        if e.remove(slot, tick).is_some() {
            if let Some(Some(nb)) = self.nbrs.get_mut(usize::from(slot)) {
                nb.routes = nb.routes.saturating_sub(1);
            }
            self.reselect(prefix);
        }
    }

    fn on_route_request(&mut self, slot: u16, plen: u8, prefix: u64) {
        if plen == 0 {
            if !self.pending_dumps.contains(&slot) {
                self.pending_dumps.push(slot);
            }
        } else {
            if !self.valid_prefix(plen, prefix) {
                return;
            }
            self.queue_unicast(slot, prefix);
        }
        self.arm_flush();
    }

    fn on_seqno_request(&mut self, slot: u16, plen: u8, hops: u8, seqno: u32, prefix: u64) {
        if !self.valid_prefix(plen, prefix) {
            return;
        }
        if prefix == self.own.prefix {
            if seqno_newer(seqno, self.own.seqno) {
                self.request_bump();
            } else {
                self.queue_unicast(slot, prefix);
            }
            return;
        }
        let Some(e) = self.table.get(prefix) else {
            // No route and nowhere to forward: say so (a retraction), so that a
            // neighbour still routing through us after our retraction was lost finds
            // out now, not at hold expiry.
            self.queue_unicast(slot, prefix);
            return;
        };
        if let Some(c) = e.cand(e.sel)
            && !seqno_newer(seqno, c.signed.seqno)
        {
            self.queue_unicast(slot, prefix);
            return;
        }
        // A feasible candidate already carries the requested seqno (the selected route
        // is older, kept by hysteresis): switch to it, so the newer seqno propagates,
        // and answer.
        let fd = fd_of(&e);
        let newer = e.cands().any(|c| {
            !seqno_newer(seqno, c.signed.seqno) && is_feasible(fd, c.signed.seqno, c.metric)
        });
        if newer {
            self.reselect_with(prefix, Some(seqno));
            if let Some(e) = self.table.get(prefix)
                && let Some(c) = e.cand(e.sel)
                && !seqno_newer(seqno, c.signed.seqno)
            {
                self.queue_unicast(slot, prefix);
                return;
            }
        }
        let Some(e) = self.table.get(prefix) else {
            return;
        };
        // Forward towards the origin: our selected next hop, else our best (unfeasible)
        // candidate, never back to the requester.
        let target = if e.sel != NONE && e.sel != slot {
            Some(e.sel)
        } else {
            e.cands()
                .filter(|c| c.nbr != slot)
                .min_by_key(|c| (c.metric, c.nbr))
                .map(|c| c.nbr)
        };
        let Some(target) = target else {
            if e.sel == NONE {
                // As above: we have nothing, the requester gets a retraction.
                self.queue_unicast(slot, prefix);
            } else {
                // Our only route is through the requester.
                self.stats.seqno_requests_dropped += 1;
            }
            return;
        };
        if hops < 2 {
            self.stats.seqno_requests_dropped += 1;
            return;
        }
        if self.send_seqno_request(prefix, seqno, hops - 1, Dest::Nbr(target), false) {
            self.stats.seqno_requests_forwarded += 1;
        } else {
            self.stats.seqno_requests_dropped += 1;
        }
    }

    // ----- origin -----------------------------------------------------------------

    /// A seqno request for something newer than our own: one bump by one, now or (rate
    /// limited) at the next allowed instant; requests meanwhile join that one bump.
    fn request_bump(&mut self) {
        let due = self
            .last_bump
            .map(|t| t + self.config.seqno_bump_min_interval);
        match due {
            Some(d) if d > self.now => {
                self.bump_at = Some(d);
                self.stats.seqno_bumps_deferred += 1;
            }
            _ => self.bump_own(None),
        }
    }

    /// Re-signs our prefix with the next seqno, or with the one after `past` (a newer
    /// seqno of ours, signed by us in an earlier run).
    fn bump_own(&mut self, past: Option<u32>) {
        let base = past.map_or(self.own.seqno, |p| p.max(self.own.seqno));
        let next = base.saturating_add(1);
        if let Some(s) = SignedOrigin::sign(self.signer.as_ref(), next) {
            // Not inserted into the verify cache: `handle_message` may hold its lock, and
            // nobody routes our own prefix back to us anyway.
            self.own = Arc::new(s);
            self.stats.seqno_bumps += 1;
        }
        self.last_bump = Some(self.now);
        self.bump_at = None;
        self.own_queued = true;
        self.arm_flush();
    }

    // ----- selection ----------------------------------------------------------------

    fn reselect(&mut self, key: u64) {
        self.reselect_with(key, None);
    }

    /// Route selection. `want_seqno`: a seqno request is waiting for this seqno (by
    /// default the live pending one); a feasible route carrying it wins regardless of
    /// metric and hysteresis.
    fn reselect_with(&mut self, key: u64, want_seqno: Option<u32>) {
        // A live seqno request (ours or forwarded) wants its answer selected as soon as
        // it arrives, even if an older-seqno route has a lower metric: otherwise the new
        // seqno stops here and whoever asked keeps starving until the next resend.
        let now = self.now;
        let want_seqno = want_seqno.or_else(|| {
            self.pending
                .get(&key)
                .filter(|p| p.expires > now)
                .and_then(|p| p.seqno)
        });
        let nbrs = &self.nbrs;
        let cfg = &self.config;
        let Some(mut e) = self.table.get_mut(key) else {
            return;
        };
        let fd = fd_of(&e);
        let mut best: Option<(u16, u16)> = None;
        let mut cur: Option<(u16, u16)> = None;
        let mut best_unfeasible: Option<(u16, u16)> = None;
        let mut best_wanted: Option<(u16, u16)> = None;
        for c in e.cands() {
            let m = add_metric(c.metric, Self::cost_of(nbrs, c.nbr));
            if m == INFINITY {
                continue;
            }
            if !is_feasible(fd, c.signed.seqno, c.metric) {
                if best_unfeasible.is_none_or(|b| (m, c.nbr) < b) {
                    best_unfeasible = Some((m, c.nbr));
                }
                continue;
            }
            if c.nbr == e.sel {
                cur = Some((m, c.nbr));
            }
            if best.is_none_or(|b| (m, c.nbr) < b) {
                best = Some((m, c.nbr));
            }
            if want_seqno.is_some_and(|w| !seqno_newer(w, c.signed.seqno))
                && best_wanted.is_none_or(|b| (m, c.nbr) < b)
            {
                best_wanted = Some((m, c.nbr));
            }
        }
        let new = match (cur, best) {
            _ if best_wanted.is_some() => best_wanted,
            (Some(c), Some(b)) => {
                let margin = cfg.hysteresis_abs.max(c.0 / cfg.hysteresis_div.max(1));
                if u32::from(b.0) + u32::from(margin) < u32::from(c.0) {
                    Some(b)
                } else {
                    Some(c)
                }
            }
            (_, b) => b,
        };
        let old = e.sel;
        let old_hop = (old != NONE)
            .then(|| nbrs.get(usize::from(old)).and_then(|n| n.as_ref()))
            .flatten()
            .map(|n| n.id);
        let prefix = prefix_addr(key);
        let mut queue = false;
        let mut starving = None;
        match new {
            Some((m, ni)) => {
                e.sel = ni;
                let seqno = e.cand(ni).map_or(0, |c| c.signed.seqno);
                let better = match fd_of(&e) {
                    None => true,
                    Some(fd) => {
                        seqno_newer(seqno, fd.seqno) || (seqno == fd.seqno && m < fd.metric)
                    }
                };
                if better {
                    e.fd_seqno = seqno;
                    e.fd_metric = m;
                    e.flags |= F_HAS_FD;
                }
                let Some(hop) = nbrs.get(usize::from(ni)).and_then(|n| n.as_ref()) else {
                    return;
                };
                match old_hop {
                    None => self.events.push_back(RouteEvent::Installed {
                        prefix,
                        plen: NODE_PREFIX_LEN,
                        next_hop: hop.id,
                        metric: m,
                    }),
                    Some(prev) if old != ni => self.events.push_back(RouteEvent::Changed {
                        prefix,
                        plen: NODE_PREFIX_LEN,
                        next_hop: hop.id,
                        previous: prev,
                        metric: m,
                    }),
                    Some(_) => {}
                }
                if e.adv_metric == INFINITY
                    || significant(e.adv_metric, m, cfg.significant_abs, cfg.significant_div)
                {
                    queue = true;
                }
                if let Some(p) = self.pending.get(&key)
                    && p.seqno.is_none_or(|s| !seqno_newer(s, seqno))
                {
                    let satisfied_forward = p.wanted;
                    self.pending.remove(&key);
                    if satisfied_forward && seqno != e.adv_seqno {
                        queue = true;
                    }
                }
            }
            None => {
                e.sel = NONE;
                if let Some(prev) = old_hop {
                    self.events.push_back(RouteEvent::Removed {
                        prefix,
                        plen: NODE_PREFIX_LEN,
                        previous: prev,
                    });
                }
                if e.adv_metric != INFINITY {
                    queue = true;
                }
                if old != NONE {
                    starving = Some(match best_unfeasible {
                        Some((_, ni)) => Some((ni, e.fd_seqno.saturating_add(1))),
                        None => None,
                    });
                }
            }
        }
        if old != e.sel {
            self.stats.route_changes += 1;
        }
        if queue && e.flags & F_QUEUED == 0 {
            e.flags |= F_QUEUED;
            self.pending_bcast.push(key);
            self.arm_flush();
        }
        match starving {
            Some(Some((ni, s))) => {
                let hops = self.config.request_hops;
                self.send_seqno_request(key, s, hops, Dest::Nbr(ni), true);
            }
            Some(None) => self.send_route_request(key),
            None => {}
        }
    }

    // ----- requests -----------------------------------------------------------------

    /// Duplicate window of requests: half a resend interval (see [`Pending::sent`]).
    fn request_window(&self) -> Duration {
        self.config.request_resend_interval / 2
    }

    /// Records a seqno request for `key` and queues it to `to`, unless a live request
    /// for at least `seqno` went out within the duplicate window. `own`: we starve for
    /// it (resent while we do); otherwise it is forwarded for a neighbour, who waits for
    /// the answer. Returns whether it was queued.
    fn send_seqno_request(&mut self, key: u64, seqno: u32, hops: u8, to: Dest, own: bool) -> bool {
        let now = self.now;
        let window = self.request_window();
        let cfg = &self.config;
        let interval = cfg.request_resend_interval;
        let lifetime = cfg.request_timeout;
        let mut seqno = seqno;
        let mut schedule_resend = own;
        match self.pending.get_mut(&key) {
            Some(p) if p.expires > now && p.seqno.is_some_and(|s| !seqno_newer(seqno, s)) => {
                // A live request for this or a newer seqno covers it: remember who waits,
                // and send it again only if it has not just gone out.
                p.wanted |= !own;
                p.expires = p.expires.max(now + lifetime);
                if own && !p.own {
                    p.own = true;
                    p.resends_left = cfg.request_resends;
                    p.next_resend = now + interval;
                } else {
                    schedule_resend = false;
                }
                seqno = p.seqno.unwrap_or(seqno);
                if now < p.sent + window {
                    if schedule_resend {
                        self.arm_resend(now + interval);
                    }
                    return false;
                }
                p.sent = now;
            }
            old => {
                let live = old.as_ref().filter(|p| p.expires > now);
                let wanted = !own || live.is_some_and(|p| p.wanted);
                let was_own = live.is_some_and(|p| p.own);
                if old.is_none() && self.pending.len() >= cfg.max_pending_requests {
                    self.stats.requests_dropped_limit += 1;
                    return false;
                }
                let own = own || was_own;
                schedule_resend = own;
                let p = Pending {
                    seqno: Some(seqno),
                    own,
                    wanted,
                    expires: now + lifetime,
                    resends_left: if own { cfg.request_resends } else { 0 },
                    next_resend: now + interval,
                    sent: now,
                };
                self.pending.insert(key, p);
            }
        }
        if schedule_resend {
            self.arm_resend(now + interval);
        }
        self.queue_request(to, hops, seqno, key)
    }

    fn arm_resend(&mut self, at: Instant) {
        self.next_resend = Some(self.next_resend.map_or(at, |t| t.min(at)));
    }

    /// Queues a seqno request TLV for the next flush; false if the queue is full.
    fn queue_request(&mut self, to: Dest, hops: u8, seqno: u32, key: u64) -> bool {
        if self.pending_requests.len() >= self.config.max_pending_requests {
            self.stats.requests_dropped_limit += 1;
            return false;
        }
        let mut tlv: RequestTlv = [0; wire::SEQNO_REQUEST_TLV_LEN];
        let mut v = Vec::with_capacity(tlv.len());
        wire::put_seqno_request(&mut v, NODE_PREFIX_LEN, hops, seqno, key);
        tlv.copy_from_slice(&v);
        self.pending_requests.push((to, tlv));
        self.stats.seqno_requests_sent += 1;
        self.arm_flush();
        true
    }

    /// Broadcasts a route request for `key` (we lost every route to it), unless a
    /// request for it went out within the duplicate window; it is resent while we
    /// starve. A live seqno request is kept (its seqno and waiting neighbours still
    /// matter) and becomes ours.
    fn send_route_request(&mut self, key: u64) {
        let now = self.now;
        let window = self.request_window();
        let interval = self.config.request_resend_interval;
        let resends = self.config.request_resends;
        match self.pending.get_mut(&key) {
            Some(p) if p.expires > now => {
                let adopt = !p.own;
                if adopt {
                    p.own = true;
                    p.resends_left = resends;
                    p.next_resend = now + interval;
                }
                let recent = now < p.sent + window;
                if !recent {
                    p.sent = now;
                }
                if adopt {
                    self.arm_resend(now + interval);
                }
                if recent {
                    return;
                }
            }
            old => {
                if old.is_none() && self.pending.len() >= self.config.max_pending_requests {
                    self.stats.requests_dropped_limit += 1;
                    return;
                }
                let p = Pending {
                    seqno: None,
                    own: true,
                    wanted: false,
                    expires: now + self.config.request_timeout,
                    resends_left: resends,
                    next_resend: now + interval,
                    sent: now,
                };
                self.pending.insert(key, p);
                self.arm_resend(now + interval);
            }
        }
        self.queue_route_request(key);
    }

    /// Queues a route request TLV to every neighbour for the next flush.
    fn queue_route_request(&mut self, key: u64) {
        if self.pending_requests.len() >= self.config.max_pending_requests {
            self.stats.requests_dropped_limit += 1;
            return;
        }
        let mut tlv: RequestTlv = [0; wire::SEQNO_REQUEST_TLV_LEN];
        let mut v = Vec::with_capacity(tlv.len());
        wire::put_route_request(&mut v, NODE_PREFIX_LEN, key);
        tlv[..v.len()].copy_from_slice(&v);
        self.pending_requests.push((Dest::All, tlv));
        self.stats.route_requests_sent += 1;
        self.arm_flush();
    }

    fn queue_unicast(&mut self, slot: u16, prefix: u64) {
        if self.pending_unicast.len() >= self.config.max_pending_requests {
            self.stats.requests_dropped_limit += 1;
            return;
        }
        self.pending_unicast.push((slot, prefix));
        self.arm_flush();
    }

    // ----- timers -------------------------------------------------------------------

    /// The next instant [`Router::handle_timeout`] must be called at.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = self.next_periodic.min(self.next_sweep);
        for x in [
            self.flush_at,
            self.bump_at,
            self.next_resend,
            self.next_repeat,
        ]
        .into_iter()
        .flatten()
        {
            t = t.min(x);
        }
        Some(t)
    }

    /// Runs every timer due at `now`: deferred seqno bumps, hold expiry and source
    /// garbage collection, request resends, periodic updates and the flush of batched
    /// triggered updates.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.set_now(now);
        if self.bump_at.is_some_and(|t| t <= now) {
            self.bump_own(None);
        }
        if self.next_sweep <= now {
            self.sweep();
            self.next_sweep = now + self.config.sweep_interval;
        }
        if self.next_resend.is_some_and(|t| t <= now) {
            self.resend_requests();
        }
        if self.next_repeat.is_some_and(|t| t <= now) {
            self.send_repeats();
        }
        if self.next_periodic <= now {
            self.dump_all = true;
            self.flush_at = Some(now);
            let i = self.config.update_interval;
            self.next_periodic = now + i.mul_f64(0.75 + 0.25 * self.rng.next_f64());
        }
        if self.flush_at.is_some_and(|t| t <= now) {
            self.flush_at = None;
            self.flush();
        }
    }

    fn sweep(&mut self) {
        let now_tick = self.tick;
        let hold = self.ticks(self.config.hold_time);
        let gc = self.ticks(self.config.source_gc_time);
        let mut expired = Vec::new();
        let nbrs = &mut self.nbrs;
        let mut dropped = 0u64;
        self.table.for_each_mut(|mut e| {
            let n = e.retain(now_tick, |c| {
                let keep = now_tick.saturating_sub(c.updated) < hold;
                if !keep && let Some(Some(nb)) = nbrs.get_mut(usize::from(c.nbr)) {
                    nb.routes = nb.routes.saturating_sub(1);
                }
                keep
            });
            if n > 0 {
                dropped += n as u64;
                expired.push(e.prefix);
            }
        });
        self.stats.routes_expired += dropped;
        for k in expired {
            self.reselect(k);
        }
        let nbrs = &mut self.nbrs;
        let unvouched = &mut self.unvouched;
        let collected = self.table.retain(|e| {
            let keep = !(e.sel == NONE
                && e.flags & F_QUEUED == 0
                && e.idle_since()
                    .is_some_and(|t| now_tick.saturating_sub(t) >= gc));
            if !keep && e.flags & F_VOUCHED == 0 {
                *unvouched = unvouched.saturating_sub(1);
                if let Some(Some(n)) = nbrs.get_mut(usize::from(e.intro)) {
                    n.introduced = n.introduced.saturating_sub(1);
                }
            }
            keep
        });
        self.stats.sources_collected += collected as u64;
        let now = self.now;
        self.pending.retain(|_, p| p.expires > now);
        // A mass starvation may have grown it to a whole table: give the memory back.
        if self.pending.capacity() > 4 * self.pending.len() + 64 {
            self.pending.shrink_to_fit();
        }
    }

    fn resend_requests(&mut self) {
        let now = self.now;
        let interval = self.config.request_resend_interval;
        let hops = self.config.request_hops;
        let mut resend = Vec::new();
        let mut next: Option<Instant> = None;
        for (k, p) in self.pending.iter_mut() {
            if !p.own || p.resends_left == 0 {
                continue;
            }
            if p.next_resend <= now {
                p.resends_left -= 1;
                p.next_resend = now + interval;
                p.expires = p.expires.max(now + interval);
                resend.push((*k, p.seqno));
            }
            if p.resends_left > 0 {
                next = Some(next.map_or(p.next_resend, |t| t.min(p.next_resend)));
            }
        }
        self.next_resend = next;
        for (k, s) in resend {
            let Some(e) = self.table.get(k) else {
                continue;
            };
            if e.sel != NONE {
                continue;
            }
            if let Some(p) = self.pending.get_mut(&k) {
                p.sent = now;
            }
            let Some(s) = s else {
                // A route request (we have no route at all): its answers may have
                // been lost, or nobody had a route yet.
                self.queue_route_request(k);
                continue;
            };
            let target = e
                .cands()
                .filter(|c| c.metric != INFINITY)
                .min_by_key(|c| {
                    (
                        add_metric(c.metric, Self::cost_of(&self.nbrs, c.nbr)),
                        c.nbr,
                    )
                })
                .map(|c| Dest::Nbr(c.nbr))
                .unwrap_or(Dest::All);
            let mut tlv: RequestTlv = [0; wire::SEQNO_REQUEST_TLV_LEN];
            let mut v = Vec::with_capacity(tlv.len());
            wire::put_seqno_request(&mut v, NODE_PREFIX_LEN, hops, s, k);
            tlv.copy_from_slice(&v);
            if self.pending_requests.len() < self.config.max_pending_requests {
                self.pending_requests.push((target, tlv));
                self.stats.seqno_requests_sent += 1;
                self.arm_flush();
            }
        }
    }

    // ----- output -------------------------------------------------------------------

    fn selected_update(&self, e: &EntryRef<'_>, out: &mut Vec<u8>) -> Option<(u32, u16)> {
        let c = e.cand(e.sel)?;
        let m = add_metric(c.metric, Self::cost_of(&self.nbrs, c.nbr));
        if m == INFINITY {
            return None;
        }
        wire::put_signed_update(out, &c.signed, m);
        Some((c.signed.seqno, m))
    }

    fn own_update(&self, out: &mut Vec<u8>) {
        wire::put_signed_update(out, &self.own, 0);
    }

    fn flush(&mut self) {
        let any_nbr = !self.nbr_index.is_empty();
        let mut w = Writer::default();
        let mut tlv = Vec::with_capacity(wire::UPDATE_TLV_LEN);
        // Broadcast: periodic dump or triggered changes.
        if self.dump_all || self.own_queued {
            tlv.clear();
            self.own_update(&mut tlv);
            w.push(&tlv, &mut self.stats);
            if self.own_queued {
                self.schedule_own_repeat();
            }
        }
        // Urgent updates (retractions, first announcements, new seqnos) are repeated,
        // also when a queued one goes out in a periodic dump. The rest of a dump is
        // not: it is itself the repeat of the last one (in particular a new seqno that
        // arrived without a triggered update spreads with the periodic updates, as it
        // did before, not with three copies per hop).
        let dump_all = self.dump_all;
        let repeats = self.config.urgent_repeats.min(MAX_REPEATS);
        let skip = repeats > 0 && self.join_repeat_round();
        let rep_flags = (repeats << REP_SHIFT) | if skip { F_REP_NEW } else { 0 };
        let mut newly_repeated = 0;
        // A periodic dump walks the entries in table order by index (nothing in this
        // loop inserts or removes entries); triggered keys are looked up once each.
        // Either way the order is the one `prefixes()` gives, so the payloads are the
        // same as with a lookup per key.
        let keys: Vec<u64> = if dump_all {
            self.pending_bcast.clear();
            Vec::new()
        } else {
            std::mem::take(&mut self.pending_bcast)
        };
        let count = if dump_all {
            self.table.len()
        } else {
            keys.len()
        };
        for i in 0..count {
            let at = if dump_all {
                Some(i)
            } else {
                keys.get(i).and_then(|k| self.table.index_of(*k))
            };
            let Some(e) = at.and_then(|at| self.table.get_at(at)) else {
                continue;
            };
            let k = e.prefix;
            tlv.clear();
            let adv = self.selected_update(&e, &mut tlv);
            let was = e.adv_metric;
            let retract = adv.is_none() && was != INFINITY;
            if retract {
                wire::put_retraction(&mut tlv, NODE_PREFIX_LEN, k);
            }
            // A retraction; a first announcement, or a route regained after a
            // retraction (nothing advertised before); or a new seqno.
            let urgent = (!dump_all || e.flags & F_QUEUED != 0)
                && match adv {
                    None => retract,
                    Some((s, _)) => was == INFINITY || s != e.adv_seqno,
                };
            if let Some(mut e) = at.and_then(|at| self.table.get_at_mut(at)) {
                e.flags &= !F_QUEUED;
                if urgent && repeats > 0 {
                    if e.flags & (F_REP_MASK | F_REP_NEW) == 0 {
                        newly_repeated += 1;
                    }
                    e.flags = (e.flags & !(F_REP_MASK | F_REP_NEW)) | rep_flags;
                }
                match adv {
                    Some((s, m)) => {
                        e.adv_seqno = s;
                        e.adv_metric = m;
                        e.flags &= !F_RETRACTED;
                    }
                    None => {
                        e.adv_metric = INFINITY;
                        if retract {
                            e.flags |= F_RETRACTED;
                        }
                    }
                }
            }
            if !tlv.is_empty() {
                w.push(&tlv, &mut self.stats);
            }
        }
        for p in std::mem::take(&mut self.evicted) {
            if self.table.get(p).is_none() {
                tlv.clear();
                wire::put_retraction(&mut tlv, NODE_PREFIX_LEN, p);
                w.push(&tlv, &mut self.stats);
            }
        }
        self.repeat_count += newly_repeated;
        self.disarm_idle_repeats();
        self.dump_all = false;
        self.own_queued = false;
        if any_nbr {
            for payload in w.finish() {
                self.emit(TransmitTo::AllNeighbours, payload);
            }
        }
        // Full tables to neighbours that just came up or asked.
        let dumps = std::mem::take(&mut self.pending_dumps);
        for slot in dumps {
            let Some(id) = self.nbr_id(slot) else {
                continue;
            };
            let mut w = Writer::default();
            tlv.clear();
            self.own_update(&mut tlv);
            w.push(&tlv, &mut self.stats);
            for e in self.table.iter() {
                tlv.clear();
                if self.selected_update(&e, &mut tlv).is_some() {
                    w.push(&tlv, &mut self.stats);
                }
            }
            for payload in w.finish() {
                self.emit(TransmitTo::Neighbour(id), payload);
            }
        }
        // Unicast answers and requests, grouped per destination.
        let mut uni = std::mem::take(&mut self.pending_unicast);
        uni.sort_unstable();
        uni.dedup();
        let mut reqs = std::mem::take(&mut self.pending_requests);
        reqs.sort_unstable_by_key(|r| r.0);
        let mut dests: Vec<Dest> = uni
            .iter()
            .map(|u| Dest::Nbr(u.0))
            .chain(reqs.iter().map(|r| r.0))
            .collect();
        dests.sort_unstable();
        dests.dedup();
        for d in dests {
            let to = match d {
                Dest::All if any_nbr => TransmitTo::AllNeighbours,
                Dest::All => continue,
                Dest::Nbr(s) => match self.nbr_id(s) {
                    Some(id) => TransmitTo::Neighbour(id),
                    None => continue,
                },
            };
            let mut w = Writer::default();
            for (_, k) in uni.iter().filter(|u| Dest::Nbr(u.0) == d) {
                tlv.clear();
                if *k == self.own.prefix {
                    self.own_update(&mut tlv);
                } else if let Some(e) = self.table.get(*k) {
                    if self.selected_update(&e, &mut tlv).is_none() {
                        wire::put_retraction(&mut tlv, NODE_PREFIX_LEN, *k);
                    }
                } else {
                    wire::put_retraction(&mut tlv, NODE_PREFIX_LEN, *k);
                }
                w.push(&tlv, &mut self.stats);
            }
            for (_, r) in reqs.iter().filter(|r| r.0 == d) {
                let l = wire::tlv_len(r);
                w.push(&r[..l], &mut self.stats);
            }
            for payload in w.finish() {
                self.emit(to, payload);
            }
        }
    }

    /// Arms the next repeat round if none is, and says whether something scheduled now
    /// must skip that round: it is due so soon that the repeat would follow its original
    /// almost at once (a burst loss would take both).
    fn join_repeat_round(&mut self) -> bool {
        match self.next_repeat {
            Some(t) => t < self.now + self.config.urgent_repeat_delay / 4,
            None => {
                self.next_repeat = Some(self.now + self.repeat_delay());
                false
            }
        }
    }

    /// Drops a repeat round armed by `join_repeat_round` when nothing is scheduled.
    fn disarm_idle_repeats(&mut self) {
        if self.repeat_count == 0 && self.own_repeats.0 == 0 && self.dump_repeats.is_empty() {
            self.next_repeat = None;
        }
    }

    /// Schedules the repeats of our own (re-signed) announcement.
    fn schedule_own_repeat(&mut self) {
        let n = self.config.urgent_repeats.min(MAX_REPEATS);
        if n > 0 {
            let skip = self.join_repeat_round();
            self.own_repeats = (n, skip);
        }
    }

    fn repeat_delay(&mut self) -> Duration {
        self.config
            .urgent_repeat_delay
            .mul_f64(0.5 + self.rng.next_f64())
    }

    /// A repeat round: broadcasts the current state of every prefix with repeats left
    /// (its selected route, or a retraction if it is still retracted; nothing if it
    /// changed since and is queued anyway), and queues the repeated dumps.
    fn send_repeats(&mut self) {
        let mut w = Writer::default();
        let mut tlv = Vec::with_capacity(wire::UPDATE_TLV_LEN);
        let mut sent = 0u64;
        match self.own_repeats {
            (0, _) => {}
            (n, true) => self.own_repeats = (n, false),
            (n, false) => {
                self.own_update(&mut tlv);
                w.push(&tlv, &mut self.stats);
                sent += 1;
                self.own_repeats = (n - 1, false);
            }
        }
        let mut left_after = 0;
        if self.repeat_count > 0 {
            for i in 0..self.table.len() {
                let Some(e) = self.table.get_at(i) else {
                    continue;
                };
                let f = e.flags;
                if f & (F_REP_MASK | F_REP_NEW) == 0 {
                    continue;
                }
                let left = (f & F_REP_MASK) >> REP_SHIFT;
                let (left, new) = if f & F_REP_NEW != 0 {
                    (left, 0)
                } else {
                    tlv.clear();
                    if f & F_QUEUED == 0
                        && self.selected_update(&e, &mut tlv).is_none()
                        && f & F_RETRACTED != 0
                    {
                        wire::put_retraction(&mut tlv, NODE_PREFIX_LEN, e.prefix);
                    }
                    if !tlv.is_empty() {
                        w.push(&tlv, &mut self.stats);
                        sent += 1;
                    }
                    (left.saturating_sub(1), 0)
                };
                if left > 0 {
                    left_after += 1;
                }
                if let Some(mut e) = self.table.get_at_mut(i) {
                    e.flags = (e.flags & !(F_REP_MASK | F_REP_NEW)) | (left << REP_SHIFT) | new;
                }
            }
        }
        self.repeat_count = left_after;
        self.stats.urgent_repeats += sent;
        let mut dumps = std::mem::take(&mut self.dump_repeats);
        for d in dumps.iter_mut() {
            if d.2 {
                d.2 = false;
            } else {
                d.1 -= 1;
                if !self.pending_dumps.contains(&d.0) {
                    self.pending_dumps.push(d.0);
                    self.arm_flush();
                }
            }
        }
        dumps.retain(|d| d.1 > 0);
        self.dump_repeats = dumps;
        self.next_repeat = None;
        if self.repeat_count > 0 || self.own_repeats.0 > 0 || !self.dump_repeats.is_empty() {
            self.next_repeat = Some(self.now + self.repeat_delay());
        }
        if !self.nbr_index.is_empty() {
            for payload in w.finish() {
                self.emit(TransmitTo::AllNeighbours, payload);
            }
        }
    }

    fn nbr_id(&self, slot: u16) -> Option<N> {
        self.nbrs
            .get(usize::from(slot))
            .and_then(|n| n.as_ref())
            .map(|n| n.id)
    }

    fn emit(&mut self, to: TransmitTo<N>, payload: Vec<u8>) {
        self.stats.messages_sent += 1;
        self.stats.bytes_sent += payload.len() as u64;
        self.transmits.push_back(RoutingTransmit { to, payload });
    }

    /// The next payload to send. Call until `None` after every input.
    pub fn poll_transmit(&mut self) -> Option<RoutingTransmit<N>> {
        self.transmits.pop_front()
    }

    /// The next change the agent must apply to its forwarding tables. Every change of
    /// next hop is a single [`RouteEvent::Changed`] (a replace), never a removal followed
    /// by an insertion, so the prefix stays routable throughout.
    pub fn poll_event(&mut self) -> Option<RouteEvent<N>> {
        self.events.pop_front()
    }

    // ----- queries ------------------------------------------------------------------

    /// Selected next hop for the /64 containing `addr` (`None`: local or no route).
    pub fn next_hop(&self, addr: Ipv6Addr) -> Option<N> {
        self.next_hop_bits(prefix_bits(addr))
    }

    /// Loads the memory a lookup of prefix `p` reads (level 0: the table slot, 1: the
    /// entry) without using it, so the simulator's all-pairs walks can overlap their
    /// cache misses across nodes. Changes nothing.
    #[cfg(any(test, feature = "sim"))]
    pub(crate) fn touch_route(&self, p: u64, level: u8) {
        self.table.touch(p, level);
    }

    pub(crate) fn next_hop_bits(&self, p: u64) -> Option<N> {
        let e = self.table.get(p)?;
        self.nbr_id(e.sel)
    }

    /// Selected (next hop, metric) for a prefix, for tests and the simulator.
    #[cfg(any(test, feature = "sim"))]
    pub(crate) fn selected_bits(&self, p: u64) -> Option<(N, u16)> {
        let e = self.table.get(p)?;
        let c = e.cand(e.sel)?;
        Some((
            self.nbr_id(e.sel)?,
            add_metric(c.metric, Self::cost_of(&self.nbrs, c.nbr)),
        ))
    }

    fn snapshot(&self, e: &Entry, c: &Cand) -> RouteSnapshot<N> {
        let cost = Self::cost_of(&self.nbrs, c.nbr);
        let age_ticks = self.tick.saturating_sub(c.updated);
        RouteSnapshot {
            prefix: prefix_addr(c.signed.prefix),
            plen: NODE_PREFIX_LEN,
            origin: c.signed.key,
            next_hop: self.nbr_id(c.nbr),
            next_hop_key: self
                .nbrs
                .get(usize::from(c.nbr))
                .and_then(|n| n.as_ref())
                .map(|n| n.key),
            metric: add_metric(c.metric, cost),
            advertised_metric: c.metric,
            link_cost: cost,
            seqno: c.signed.seqno,
            feasible: is_feasible(fd_of(e), c.signed.seqno, c.metric),
            feasibility_distance: fd_of(e),
            age: Duration::from_millis(u64::from(age_ticks) * TICK_MS),
            selected: e.sel == c.nbr,
        }
    }

    fn own_snapshot(&self) -> RouteSnapshot<N> {
        RouteSnapshot {
            prefix: prefix_addr(self.own.prefix),
            plen: NODE_PREFIX_LEN,
            origin: self.own.key,
            next_hop: None,
            next_hop_key: None,
            metric: 0,
            advertised_metric: 0,
            link_cost: 0,
            seqno: self.own.seqno,
            feasible: true,
            feasibility_distance: None,
            age: Duration::ZERO,
            selected: true,
        }
    }

    /// Every candidate route, per prefix (own prefix first, then by prefix, selected
    /// first), for the operator view. `now` only ages the entries.
    pub fn routes(&mut self, now: Instant) -> Vec<RouteSnapshot<N>> {
        self.set_now(now);
        let mut v = vec![self.own_snapshot()];
        let mut keys: Vec<u64> = self.table.prefixes().collect();
        keys.sort_unstable();
        for k in keys {
            let Some(e) = self.table.get(k) else {
                continue;
            };
            let mut rs: Vec<_> = e.cands().map(|c| self.snapshot(&e, c)).collect();
            rs.sort_by_key(|r| (!r.selected, r.metric, r.next_hop));
            v.extend(rs);
        }
        v
    }

    /// Which route carries `addr` and why. Every announced prefix is a node's /64, so the
    /// longest match is the /64 of `addr` (or nothing).
    pub fn explain(&mut self, addr: Ipv6Addr, now: Instant) -> Explanation<N> {
        self.set_now(now);
        let p = prefix_bits(addr);
        let mut ex = Explanation {
            addr,
            prefix: None,
            selection: Selection::NoRoute,
            selected: None,
            alternatives: Vec::new(),
        };
        if p >> 48 != OVERLAY_TOP {
            ex.selection = Selection::NotOverlay;
            return ex;
        }
        if p == self.own.prefix {
            ex.prefix = Some((prefix_addr(p), NODE_PREFIX_LEN));
            ex.selection = Selection::Local;
            ex.selected = Some(self.own_snapshot());
            return ex;
        }
        let Some(e) = self.table.get(p) else {
            return ex;
        };
        ex.prefix = Some((prefix_addr(p), NODE_PREFIX_LEN));
        let snaps: Vec<_> = e.cands().map(|c| self.snapshot(&e, c)).collect();
        let sel = snaps.iter().find(|s| s.selected).cloned();
        let best_other = snaps
            .iter()
            .filter(|s| !s.selected && s.feasible && s.metric != INFINITY)
            .map(|s| s.metric)
            .min();
        ex.selection = match (&sel, best_other) {
            (None, _) => Selection::NoRoute,
            (Some(_), None) => Selection::OnlyFeasible,
            (Some(s), Some(b)) if b < s.metric => Selection::Hysteresis {
                best_alternative: b,
                margin: self
                    .config
                    .hysteresis_abs
                    .max(s.metric / self.config.hysteresis_div.max(1)),
            },
            (Some(_), Some(_)) => Selection::LowestMetric,
        };
        for s in snaps {
            if s.selected {
                continue;
            }
            let why = if s.metric == INFINITY {
                NotChosen::InfiniteMetric
            } else if !s.feasible {
                NotChosen::Unfeasible
            } else if sel.as_ref().is_some_and(|x| s.metric < x.metric) {
                NotChosen::WithinHysteresis
            } else {
                NotChosen::HigherMetric
            };
            ex.alternatives.push((s, why));
        }
        ex.alternatives.sort_by_key(|(s, _)| (s.metric, s.next_hop));
        ex.selected = sel;
        ex
    }

    /// Every prefix held (upper 64 bits), for the simulator's attack reports.
    #[cfg(any(test, feature = "sim"))]
    pub(crate) fn held_prefixes(&self) -> impl Iterator<Item = u64> + '_ {
        self.table.prefixes()
    }

    /// Number of prefixes held (selected or not), excluding our own.
    pub fn prefix_count(&self) -> usize {
        self.table.len()
    }

    /// Number of candidate routes held.
    pub fn candidate_count(&self) -> usize {
        self.table.candidate_count()
    }

    /// Bytes this router's state occupies, honestly accounted: the route table's index,
    /// entries and candidate pool at their allocated capacities, the neighbour and
    /// request tables and queues. Announcements (`SignedOrigin`) live in the
    /// verification cache and are accounted there ([`VerifyCache::memory_bytes`]);
    /// routes only hold pointers to them.
    pub fn memory_bytes(&self) -> usize {
        let table = self.table.memory_bytes();
        let nbrs = self.nbrs.capacity() * size_of::<Option<Nbr<N>>>()
            + self.nbr_index.capacity() * (size_of::<(N, u16)>() + 1);
        let pending = self.pending.capacity() * (size_of::<(u64, Pending)>() + 1)
            + self.pending_bcast.capacity() * 8
            + self.pending_unicast.capacity() * size_of::<(u16, u64)>()
            + self.pending_requests.capacity() * size_of::<(Dest, RequestTlv)>()
            + self.dump_repeats.capacity() * size_of::<(u16, u8, bool)>();
        size_of::<Self>() + table + nbrs + pending + self.evicted.capacity() * 8
    }

    /// The cache this router verifies through.
    pub fn verify_cache(&self) -> &SharedVerifyCache {
        &self.cache
    }

    /// Whether `key` is the owner of the prefix we hold for it (operator sanity check).
    pub fn origin_of(&self, addr: Ipv6Addr) -> Option<[u8; 32]> {
        let p = prefix_bits(addr);
        if p == self.own.prefix {
            return Some(self.own.key);
        }
        let e = self.table.get(p)?;
        let key = e.cands().next()?.signed.key;
        debug_assert_eq!(owned_prefix(&key), p);
        Some(key)
    }
}

/// Packs TLVs into payloads of at most [`MAX_PAYLOAD`] bytes.
#[derive(Default)]
struct Writer {
    cur: Vec<u8>,
    done: Vec<Vec<u8>>,
}

impl Writer {
    fn push(&mut self, tlv: &[u8], stats: &mut RoutingStats) {
        if !self.cur.is_empty() && self.cur.len() + tlv.len() > MAX_PAYLOAD {
            self.done.push(std::mem::take(&mut self.cur));
        }
        if self.cur.is_empty() {
            self.cur.reserve(MAX_PAYLOAD);
            self.cur.extend_from_slice(&[wire::VERSION, 0]);
        }
        self.cur.extend_from_slice(tlv);
        match tlv.first() {
            Some(&wire::TLV_UPDATE) => stats.updates_sent += 1,
            Some(&wire::TLV_RETRACTION) => stats.retractions_sent += 1,
            _ => {}
        }
    }

    fn finish(mut self) -> Vec<Vec<u8>> {
        if !self.cur.is_empty() {
            self.done.push(self.cur);
        }
        self.done
    }
}
