//! The sans-IO routing core: a Babel-style (RFC 8966) distance-vector protocol with
//! key-signed origination, plus a deterministic discrete-event simulator that drives many
//! instances of it.
//!
//! Why Babel's design: it needs no leader and no global view, converges after a failure
//! in a few message delays, and its feasibility condition keeps routing loop-free at all
//! times rather than eventually, which matters on an overlay where a loop burns relay CPU
//! on every node in it. What Myconet adds: every announcement of a prefix is signed by the
//! key that owns the prefix (the /64 is derived from that key), so relays can lie about
//! distance but cannot originate or hijack anyone else's address.
//!
//! The [`Router`] is a pure state machine in the style of quinn-proto: time is an
//! argument ([`std::time::Instant`]), randomness comes from a caller-supplied seed, and
//! messages go in and out as byte payloads; the agent's I/O shell moves them inside
//! authenticated link-level control packets and applies [`RouteEvent`]s to its kernel and
//! userspace route tables. The protocol (message layouts, timers, metric, feasibility,
//! security argument and its limits) is specified in `docs/routing.md`.
//!
//! Driving contract: after every call that takes `now`, drain [`Router::poll_transmit`]
//! and [`Router::poll_event`], and call [`Router::handle_timeout`] at
//! [`Router::poll_timeout`].

mod cache;
mod metric;
mod router;
mod routes;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
mod util;
pub mod wire;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::Ipv6Addr;
use std::time::Duration;

use thiserror::Error;

pub use cache::{OriginReject, SharedVerifyCache, SignedOrigin, VerifyCache, owned_prefix};
pub use metric::{
    CostParams, Fd, INFINITY, add_metric, is_feasible, link_cost, seqno_newer, significant,
};
pub use router::{Router, RoutingConfig, RoutingTransmit};
pub use util::SplitMix;
pub use wire::MAX_PAYLOAD;

/// How a neighbour came to be one, which decides how much it may add to the route
/// table.
///
/// Why: a neighbour nobody configured (found by a discovery beacon, or one that dialled
/// us) costs its operator nothing, and every prefix it is the first to announce is
/// stored and re-advertised by every node behind us. Self-made keys own their prefixes,
/// so announcing many of them is cheap; limiting them where they enter (here) is what
/// keeps one such host from filling every node's route table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Admission {
    /// The operator configured it: the prefixes it announces are taken like any
    /// protocol's, and when the table is full they push out self-admitted ones.
    Configured,
    /// It admitted itself (discovered, or inbound): the prefixes it is the first to
    /// announce are limited per neighbour (`self_admitted_origin_quota`), in total
    /// (`max_self_admitted_origins`) and in rate (`self_admitted_origin_rate`), and give
    /// way to a configured neighbour's when the table is full.
    SelfAdmitted,
}

/// Whom a payload is for. `AllNeighbours` lets the core build a full-table update once
/// however many neighbours there are; the agent sends the same bytes on every link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransmitTo<N> {
    /// One neighbour.
    Neighbour(N),
    /// Every neighbour currently up.
    AllNeighbours,
}

/// A change the agent must make to its forwarding tables (kernel route map and
/// userspace table). Only next-hop changes are reported: the kernel map holds no metric,
/// so metric-only changes would be churn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteEvent<N> {
    /// A prefix became routable via `next_hop`.
    Installed {
        /// The /64.
        prefix: Ipv6Addr,
        /// Its length (64).
        plen: u8,
        /// Neighbour to forward to.
        next_hop: N,
        /// Metric of the selected route.
        metric: u16,
    },
    /// The next hop of a routed prefix changed: replace the entry in place (one map
    /// update) so the prefix is never unroutable during the change.
    Changed {
        /// The /64.
        prefix: Ipv6Addr,
        /// Its length (64).
        plen: u8,
        /// New neighbour to forward to.
        next_hop: N,
        /// The neighbour it replaces.
        previous: N,
        /// Metric of the new route.
        metric: u16,
    },
    /// No feasible route is left: remove the prefix.
    Removed {
        /// The /64.
        prefix: Ipv6Addr,
        /// Its length (64).
        plen: u8,
        /// The neighbour it was routed through.
        previous: N,
    },
}

/// Why the router refused a call or a payload as a whole. Individual records inside a
/// payload are never errors: they are counted in [`RoutingStats`] and skipped.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RoutingError {
    /// The signer's public key is not a 32-byte Ed25519 key, or its signature is not 64
    /// bytes: the node could not sign its own announcements.
    #[error("signer does not produce Ed25519 keys and signatures")]
    InvalidSigner,
    /// A payload from a neighbour that is not up: its link is not authenticated (or not
    /// any more), so its routes must not be taken.
    #[error("routing message from a neighbour that is not up")]
    UnknownNeighbour,
    /// The payload could not be parsed.
    #[error("malformed routing message: {0}")]
    Wire(#[from] wire::WireError),
}

/// Counters. Everything a peer can make us do or refuse is counted, by reason, so an
/// operator can tell an attack from a bug from a lossy link.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(missing_docs)] // the names are the documentation; grouped by the comments below
pub struct RoutingStats {
    // traffic
    pub messages_sent: u64,
    pub bytes_sent: u64,
    pub messages_received: u64,
    pub bytes_received: u64,
    pub updates_sent: u64,
    pub retractions_sent: u64,
    pub urgent_repeats: u64,
    pub updates_received: u64,
    pub retractions_received: u64,
    pub route_requests_sent: u64,
    pub route_requests_received: u64,
    pub seqno_requests_sent: u64,
    pub seqno_requests_received: u64,
    pub seqno_requests_forwarded: u64,
    pub seqno_requests_dropped: u64,
    // authentication
    pub signature_verifications: u64,
    pub verify_cache_hits: u64,
    pub rejected_unowned_prefix: u64,
    pub rejected_bad_signature: u64,
    pub rejected_insufficient_work: u64,
    pub rejected_conflicting_origin: u64,
    pub rejected_pinned_key: u64,
    // malformed or unacceptable input
    pub rejected_malformed: u64,
    pub rejected_version: u64,
    pub rejected_bad_prefix: u64,
    pub rejected_unknown_neighbour: u64,
    pub unknown_tlvs: u64,
    pub own_prefix_ignored: u64,
    pub unfeasible_updates: u64,
    // resource limits
    pub rejected_table_full: u64,
    pub rejected_neighbour_limit: u64,
    pub rejected_origin_quota: u64,
    pub rejected_origin_rate: u64,
    pub origins_evicted: u64,
    pub candidates_dropped: u64,
    pub requests_dropped_limit: u64,
    // state changes
    pub route_changes: u64,
    pub routes_expired: u64,
    pub sources_collected: u64,
    pub seqno_bumps: u64,
    pub seqno_bumps_deferred: u64,
    pub link_cost_changes: u64,
    pub neighbours_up: u64,
    pub neighbours_down: u64,
}

/// Calls `$m!` with every [`RoutingStats`] field, so the names are listed once.
macro_rules! with_stat_fields {
    ($m:ident) => {
        $m!(
            messages_sent,
            bytes_sent,
            messages_received,
            bytes_received,
            updates_sent,
            retractions_sent,
            urgent_repeats,
            updates_received,
            retractions_received,
            route_requests_sent,
            route_requests_received,
            seqno_requests_sent,
            seqno_requests_received,
            seqno_requests_forwarded,
            seqno_requests_dropped,
            signature_verifications,
            verify_cache_hits,
            rejected_unowned_prefix,
            rejected_bad_signature,
            rejected_insufficient_work,
            rejected_conflicting_origin,
            rejected_pinned_key,
            rejected_malformed,
            rejected_version,
            rejected_bad_prefix,
            rejected_unknown_neighbour,
            unknown_tlvs,
            own_prefix_ignored,
            unfeasible_updates,
            rejected_table_full,
            rejected_neighbour_limit,
            rejected_origin_quota,
            rejected_origin_rate,
            origins_evicted,
            candidates_dropped,
            requests_dropped_limit,
            route_changes,
            routes_expired,
            sources_collected,
            seqno_bumps,
            seqno_bumps_deferred,
            link_cost_changes,
            neighbours_up,
            neighbours_down
        )
    };
}

impl RoutingStats {
    /// Every counter by its stable snake_case name (the field name), for the control
    /// API and the simulator's reports.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        macro_rules! named {
            ($($f:ident),*) => { vec![$((stringify!($f), self.$f)),*] };
        }
        with_stat_fields!(named)
    }

    /// Adds `other`'s counters to these (totals over many routers).
    pub fn add(&mut self, other: &Self) {
        macro_rules! sum {
            ($($f:ident),*) => {{ $( self.$f = self.$f.saturating_add(other.$f); )* }};
        }
        with_stat_fields!(sum)
    }
}

/// One candidate route as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSnapshot<N> {
    /// The /64.
    pub prefix: Ipv6Addr,
    /// Its length (64).
    pub plen: u8,
    /// Public key of the node that owns and signed the prefix.
    pub origin: [u8; 32],
    /// Neighbour offering the route (`None`: this node's own prefix).
    pub next_hop: Option<N>,
    /// The neighbour's authenticated key.
    pub next_hop_key: Option<[u8; 32]>,
    /// Our metric through this neighbour (advertised + link cost).
    pub metric: u16,
    /// The metric the neighbour advertised.
    pub advertised_metric: u16,
    /// Our current cost of the link to the neighbour.
    pub link_cost: u16,
    /// Origin sequence number carried by the route.
    pub seqno: u32,
    /// Whether the route satisfies the feasibility condition.
    pub feasible: bool,
    /// Our feasibility distance for the prefix.
    pub feasibility_distance: Option<Fd>,
    /// Time since the neighbour last refreshed it.
    pub age: Duration,
    /// Whether this is the route traffic uses.
    pub selected: bool,
}

/// Why the selected route is the selected one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// The address is outside the overlay.
    NotOverlay,
    /// The address is in this node's own prefix.
    Local,
    /// No feasible route: the destination is unreachable from here (for now).
    NoRoute,
    /// The only feasible route.
    OnlyFeasible,
    /// The feasible route with the lowest metric.
    LowestMetric,
    /// Kept although a feasible route is better, because not better by the hysteresis
    /// margin: switching on small differences would make routes flap.
    Hysteresis {
        /// Metric of the best alternative.
        best_alternative: u16,
        /// Improvement needed to switch.
        margin: u16,
    },
}

/// Why an alternative route is not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotChosen {
    /// It fails the feasibility condition: the neighbour may route through us.
    Unfeasible,
    /// Its metric (or its link) is infinite.
    InfiniteMetric,
    /// Its metric is higher than the selected route's.
    HigherMetric,
    /// Better, but not by the hysteresis margin.
    WithinHysteresis,
}

/// The answer to "how does this node reach that address?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation<N> {
    /// The address asked about.
    pub addr: Ipv6Addr,
    /// The longest matching prefix, if any.
    pub prefix: Option<(Ipv6Addr, u8)>,
    /// Why the selected route won (or why there is none).
    pub selection: Selection,
    /// The route carrying the traffic.
    pub selected: Option<RouteSnapshot<N>>,
    /// Every other candidate and why it lost.
    pub alternatives: Vec<(RouteSnapshot<N>, NotChosen)>,
}

impl<N: fmt::Debug> fmt::Display for Explanation<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.addr)?;
        match self.prefix {
            Some((p, l)) => write!(f, "matches {p}/{l}; ")?,
            None => write!(f, "no matching prefix; ")?,
        }
        match self.selection {
            Selection::NotOverlay => write!(f, "not an overlay address")?,
            Selection::Local => write!(f, "local (this node's prefix)")?,
            Selection::NoRoute => write!(f, "no feasible route")?,
            Selection::OnlyFeasible => write!(f, "only feasible route")?,
            Selection::LowestMetric => write!(f, "lowest metric among feasible routes")?,
            Selection::Hysteresis {
                best_alternative,
                margin,
            } => write!(
                f,
                "kept by hysteresis (best alternative {best_alternative}, needs to be better by {margin})"
            )?,
        }
        if let Some(s) = &self.selected
            && let Some(n) = &s.next_hop
        {
            write!(
                f,
                "; via {n:?} metric {} seqno {} age {:?}",
                s.metric, s.seqno, s.age
            )?;
        }
        for (a, why) in &self.alternatives {
            write!(
                f,
                "\n  alternative via {:?} metric {} seqno {}: {why:?}",
                a.next_hop, a.metric, a.seqno
            )?;
        }
        Ok(())
    }
}
