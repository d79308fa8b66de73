//! The serving side's decisions, sans-IO: which requests are admitted, per-peer limits
//! on concurrent requests and on upload rate, and what part of a groups request is sent.
//!
//! The shell owns the connections and the store; for every request it asks
//! [`Server::admit`], answers the request (for groups: [`plan_groups`], then an
//! [`crate::verified::Encoder`] paced by [`Server::allowance`]), and calls
//! [`Server::finish`] when the response ends.
//!
//! **Who is a peer.** The overlay authenticates a node's routed /64, not each address
//! in it, so `P` must be that identity (the node key or its /64), never the full source
//! address: a node owns 2^64 addresses and would otherwise get 2^64 sets of limits.
//!
//! **What a peer can make us spend.** At most `max_concurrent` requests in progress
//! (queued or streaming) per peer, bytes at most at `rate` per peer after a `burst`,
//! one request at most [`crate::wire::MAX_REQUEST_GROUPS`] groups, state for at most
//! `max_peers` peers (an idle peer is forgotten after `idle_timeout` once its token
//! bucket has refilled, so forgetting never hands out a fresh burst; when the table is
//! full the least recently seen idle peer makes room, and when all are busy a new peer
//! is refused with busy). Every refusal is an error message with a
//! retry delay and a counter.

use std::{
    collections::{HashMap, HashSet},
    hash::Hash as StdHash,
    time::{Duration, Instant},
};

use crate::{
    GroupSet,
    verified::group_count,
    wire::{ErrorCode, MAX_REQUEST_GROUPS, MAX_REQUEST_RANGES},
};

/// Limits of the serving side (the `content` section of the agent's configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    /// Requests in progress per peer.
    pub max_concurrent: usize,
    /// Upload rate per peer in bytes per second (0: unlimited).
    pub rate: u64,
    /// Bytes a peer may receive at once above the rate.
    pub burst: u64,
    /// Peers tracked at once.
    pub max_peers: usize,
    /// Idle peers are forgotten after this long.
    pub idle_timeout: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 8,
            rate: 0,
            burst: 4 << 20,
            max_peers: 4096,
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// A refused request: the error to send and when the peer may retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The error code.
    pub code: ErrorCode,
    /// Retry delay for busy refusals, in milliseconds.
    pub retry_after_ms: u32,
}

/// May the shell send now?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowance {
    /// Send up to this many bytes now (then call [`Server::consume`]).
    Now(usize),
    /// Wait until this instant.
    At(Instant),
}

/// Counters of the serving side.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServeStats {
    /// Requests admitted.
    pub admitted: u64,
    /// Refused: the peer's concurrent-request limit.
    pub refused_concurrency: u64,
    /// Refused: the peer table was full of busy peers.
    pub refused_peers: u64,
    /// Refused: a request id the peer already has in progress (a replay or a bug).
    pub refused_duplicate_id: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Times a send waited for the rate limit.
    pub rate_limited: u64,
    /// Idle peers forgotten.
    pub peers_forgotten: u64,
}

#[derive(Debug)]
struct Peer {
    active: HashSet<u32>,
    tokens: f64,
    refilled: Instant,
    seen: Instant,
}

impl Peer {
    /// When its token bucket is full again (`None`: not within the clock's range).
    /// Until then the peer is remembered even when idle: forgetting it would hand it a
    /// fresh burst on its next request.
    fn full_at(&self, config: &ServeConfig) -> Option<Instant> {
        let burst = config.burst.max(1) as f64;
        if config.rate == 0 || self.tokens >= burst {
            return Some(self.refilled);
        }
        let secs = (burst - self.tokens) / config.rate as f64;
        self.refilled
            .checked_add(Duration::try_from_secs_f64(secs).ok()?)
    }
}

/// Per-peer admission and pacing for the content protocol's serving side.
#[derive(Debug)]
pub struct Server<P> {
    config: ServeConfig,
    peers: HashMap<P, Peer>,
    stats: ServeStats,
}

impl<P: Clone + Eq + StdHash> Server<P> {
    /// A server with `config`.
    pub fn new(config: ServeConfig) -> Self {
        Self {
            config,
            peers: HashMap::new(),
            stats: ServeStats::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &ServeStats {
        &self.stats
    }

    /// Requests `peer` has in progress.
    pub fn active(&self, peer: &P) -> usize {
        self.peers.get(peer).map_or(0, |p| p.active.len())
    }

    /// A request `id` arrived from `peer`: admit it (it counts against the peer's
    /// concurrency until [`Server::finish`]) or refuse it.
    pub fn admit(&mut self, now: Instant, peer: &P, id: u32) -> Result<(), Refusal> {
        if !self.peers.contains_key(peer) {
            if self.peers.len() >= self.config.max_peers && !self.forget_one_idle() {
                self.stats.refused_peers += 1;
                return Err(Refusal {
                    code: ErrorCode::Busy,
                    retry_after_ms: 1000,
                });
            }
            self.peers.insert(
                peer.clone(),
                Peer {
                    active: HashSet::new(),
                    tokens: self.config.burst as f64,
                    refilled: now,
                    seen: now,
                },
            );
        }
        let max = self.config.max_concurrent;
        let Some(p) = self.peers.get_mut(peer) else {
            return Err(Refusal {
                code: ErrorCode::Busy,
                retry_after_ms: 1000,
            });
        };
        p.seen = now;
        if p.active.contains(&id) {
            self.stats.refused_duplicate_id += 1;
            return Err(Refusal {
                code: ErrorCode::BadRequest,
                retry_after_ms: 0,
            });
        }
        if p.active.len() >= max {
            self.stats.refused_concurrency += 1;
            return Err(Refusal {
                code: ErrorCode::Busy,
                retry_after_ms: 100,
            });
        }
        p.active.insert(id);
        self.stats.admitted += 1;
        Ok(())
    }

    /// The response to request `id` of `peer` ended (sent, failed or cancelled).
    pub fn finish(&mut self, now: Instant, peer: &P, id: u32) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.active.remove(&id);
            p.seen = now;
        }
    }

    /// How many of `want` bytes may go to `peer` now, or when to ask again.
    pub fn allowance(&mut self, now: Instant, peer: &P, want: usize) -> Allowance {
        let rate = self.config.rate;
        let burst = self.config.burst.max(1) as f64;
        let Some(p) = self.peers.get_mut(peer) else {
            return Allowance::Now(want);
        };
        if rate == 0 {
            return Allowance::Now(want);
        }
        let dt = now.saturating_duration_since(p.refilled).as_secs_f64();
        p.tokens = (p.tokens + dt * rate as f64).min(burst);
        p.refilled = now;
        // Send in pieces of at most the burst; wait until at least a piece (or the
        // whole, if smaller) is covered, so sends are not split into slivers.
        let piece = (want as f64).min(burst);
        if p.tokens >= piece {
            return Allowance::Now(piece as usize);
        }
        self.stats.rate_limited += 1;
        let wait = (piece - p.tokens) / rate as f64;
        Allowance::At(now + Duration::from_secs_f64(wait))
    }

    /// `bytes` were sent to `peer`.
    pub fn consume(&mut self, peer: &P, bytes: usize) {
        self.stats.bytes_sent += bytes as u64;
        if let Some(p) = self.peers.get_mut(peer) {
            p.tokens -= bytes as f64;
        }
    }

    /// Forgets peers idle for the idle timeout whose token bucket has refilled.
    pub fn handle_timeout(&mut self, now: Instant) {
        let config = &self.config;
        let before = self.peers.len();
        self.peers.retain(|_, p| {
            !p.active.is_empty()
                || now.saturating_duration_since(p.seen) < config.idle_timeout
                || p.full_at(config).is_none_or(|t| now < t)
        });
        self.stats.peers_forgotten += (before - self.peers.len()) as u64;
    }

    /// When [`Server::handle_timeout`] should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.peers
            .values()
            .filter(|p| p.active.is_empty())
            .filter_map(|p| Some((p.seen + self.config.idle_timeout).max(p.full_at(&self.config)?)))
            .min()
    }

    fn forget_one_idle(&mut self) -> bool {
        let victim = self
            .peers
            .iter()
            .filter(|(_, p)| p.active.is_empty())
            .min_by_key(|(_, p)| p.seen)
            .map(|(k, _)| k.clone());
        match victim {
            Some(k) => {
                self.peers.remove(&k);
                self.stats.peers_forgotten += 1;
                true
            }
            None => false,
        }
    }
}

/// What to send for a groups request: the requested groups this node holds (at most
/// [`MAX_REQUEST_RANGES`] ranges of them, what a groups header carries), or why none. `local` is the blob's size and verified groups here (`None`: not held).
pub fn plan_groups(
    requested_size: u64,
    requested: &GroupSet,
    local: Option<(u64, &GroupSet)>,
) -> Result<GroupSet, ErrorCode> {
    let Some((size, have)) = local else {
        return Err(ErrorCode::NotFound);
    };
    if size != requested_size {
        return Err(ErrorCode::SizeMismatch);
    }
    if requested.is_empty() || requested.end() > group_count(size) {
        return Err(ErrorCode::BadRequest);
    }
    if requested.len() > MAX_REQUEST_GROUPS {
        return Err(ErrorCode::TooLarge);
    }
    let send = requested.intersection(have);
    if send.is_empty() {
        return Err(ErrorCode::NotFound);
    }
    // Holes in what is held can split a one-range request into more ranges than a
    // groups header may carry; send the first ones (the requester takes the rest as
    // not held here) rather than a header the requester must refuse.
    Ok(send.first_ranges(MAX_REQUEST_RANGES))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn concurrency_is_limited_per_peer_and_replayed_ids_refused() {
        let now = t0();
        let mut s = Server::new(ServeConfig {
            max_concurrent: 2,
            ..ServeConfig::default()
        });
        assert!(s.admit(now, &1u8, 10).is_ok());
        assert_eq!(
            s.admit(now, &1, 10).unwrap_err().code,
            ErrorCode::BadRequest
        );
        assert!(s.admit(now, &1, 11).is_ok());
        assert_eq!(s.admit(now, &1, 12).unwrap_err().code, ErrorCode::Busy);
        // Another peer is not affected.
        assert!(s.admit(now, &2, 12).is_ok());
        s.finish(now, &1, 10);
        assert!(s.admit(now, &1, 12).is_ok());
        assert_eq!(s.stats().refused_concurrency, 1);
        assert_eq!(s.stats().refused_duplicate_id, 1);
    }

    #[test]
    fn upload_rate_is_a_token_bucket() {
        let now = t0();
        let mut s = Server::new(ServeConfig {
            rate: 1_000_000,
            burst: 100_000,
            ..ServeConfig::default()
        });
        s.admit(now, &1u8, 1).unwrap();
        // The burst goes at once, in pieces of at most the burst.
        assert_eq!(s.allowance(now, &1, 250_000), Allowance::Now(100_000));
        s.consume(&1, 100_000);
        // Then 100 kB needs 100 ms at 1 MB/s.
        match s.allowance(now, &1, 100_000) {
            Allowance::At(t) => assert_eq!(t - now, Duration::from_millis(100)),
            other => panic!("{other:?}"),
        }
        let later = now + Duration::from_millis(100);
        assert_eq!(s.allowance(later, &1, 100_000), Allowance::Now(100_000));
        s.consume(&1, 100_000);
        // Over a simulated second, at most rate + burst bytes go out.
        let mut t = later;
        let mut sent = 0usize;
        while t < later + Duration::from_secs(1) {
            match s.allowance(t, &1, 16_384) {
                Allowance::Now(n) => {
                    s.consume(&1, n);
                    sent += n;
                }
                Allowance::At(at) => t = at,
            }
        }
        assert!(sent <= 1_000_000 + 16_384, "{sent}");
        assert!(sent >= 900_000, "{sent}");
    }

    #[test]
    fn peer_table_is_bounded() {
        let now = t0();
        let mut s = Server::new(ServeConfig {
            max_peers: 2,
            ..ServeConfig::default()
        });
        s.admit(now, &1u8, 1).unwrap();
        s.admit(now, &2u8, 1).unwrap();
        // Both busy: a third peer is refused.
        assert_eq!(s.admit(now, &3, 1).unwrap_err().code, ErrorCode::Busy);
        assert_eq!(s.stats().refused_peers, 1);
        // Once one is idle, it is forgotten for the newcomer.
        s.finish(now, &1, 1);
        assert!(s.admit(now, &3, 1).is_ok());
        assert_eq!(s.active(&1), 0);
        s.finish(now, &2, 1);
        s.handle_timeout(now + Duration::from_secs(200));
        assert!(s.poll_timeout().is_none() || s.peers.len() == 1);
    }

    /// Forgetting an idle peer must not hand it a fresh burst: a peer that drains its
    /// bucket, idles past the idle timeout and comes back gets what the rate refilled,
    /// so over any stretch it receives at most burst + rate x time.
    #[test]
    fn forgetting_an_idle_peer_does_not_refill_its_bucket() {
        let t0 = t0();
        let (rate, burst) = (1_000u64, 1_000_000u64);
        let mut s = Server::new(ServeConfig {
            rate,
            burst,
            idle_timeout: Duration::from_secs(120),
            ..ServeConfig::default()
        });
        let mut now = t0;
        let mut sent = 0u64;
        for round in 0..5u32 {
            s.admit(now, &1u8, round).unwrap();
            // Take whatever the bucket gives now.
            while let Allowance::Now(n) = s.allowance(now, &1, burst as usize) {
                s.consume(&1, n);
                sent += n as u64;
            }
            s.finish(now, &1, round);
            now += Duration::from_secs(121);
            s.handle_timeout(now);
        }
        let elapsed = (now - t0).as_secs();
        assert!(
            sent <= burst + rate * elapsed,
            "{sent} bytes in {elapsed} s at {rate} B/s with a {burst} B burst"
        );
        // The peer is forgotten once its bucket is full again: idle state is bounded.
        now += Duration::from_secs(burst / rate + 1);
        s.handle_timeout(now);
        assert_eq!(s.peers.len(), 0);
        assert!(s.poll_timeout().is_none());
    }

    /// A groups answer must fit the wire's limit on ranges, or the honest provider's
    /// own header is refused by the requester (and the provider dropped): a request of
    /// one range over a blob held every other group intersects to thousands of ranges.
    #[test]
    fn the_groups_answer_fits_the_wire() {
        let size = MAX_REQUEST_GROUPS * 16384;
        let have: GroupSet = (0..MAX_REQUEST_GROUPS).step_by(2).collect();
        let send = plan_groups(
            size,
            &GroupSet::all(MAX_REQUEST_GROUPS),
            Some((size, &have)),
        )
        .unwrap();
        let frame = crate::wire::Message::Groups {
            id: 1,
            groups: send.clone(),
        }
        .to_bytes();
        let parsed = crate::wire::Frame::new_checked(&frame[..])
            .and_then(|f| crate::wire::Message::parse(&f, crate::wire::Role::Requester));
        assert!(parsed.is_ok(), "{parsed:?}");
        assert!(have.is_superset(&send) && !send.is_empty());
    }

    #[test]
    fn groups_requests_are_checked_against_what_is_held() {
        let have = GroupSet::from_range(0..10);
        let ask = GroupSet::from_range(5..20);
        assert_eq!(
            plan_groups(20 * 16384, &ask, None),
            Err(ErrorCode::NotFound)
        );
        assert_eq!(
            plan_groups(20 * 16384, &ask, Some((20 * 16384 + 1, &have))),
            Err(ErrorCode::SizeMismatch)
        );
        assert_eq!(
            plan_groups(20 * 16384, &ask, Some((20 * 16384, &have))),
            Ok(GroupSet::from_range(5..10))
        );
        assert_eq!(
            plan_groups(10 * 16384, &ask, Some((10 * 16384, &have))),
            Err(ErrorCode::BadRequest)
        );
        let huge = GroupSet::from_range(0..MAX_REQUEST_GROUPS + 1);
        let size = (MAX_REQUEST_GROUPS + 1) * 16384;
        assert_eq!(
            plan_groups(size, &huge, Some((size, &huge))),
            Err(ErrorCode::TooLarge)
        );
        assert_eq!(
            plan_groups(
                20 * 16384,
                &GroupSet::from_range(15..20),
                Some((20 * 16384, &have))
            ),
            Err(ErrorCode::NotFound)
        );
    }
}
