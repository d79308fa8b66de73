//! Pure functions of the protocol: sequence-number order, the feasibility condition,
//! metric addition and the link cost derived from measured RTT and loss. Kept free of
//! state so each can be tested exhaustively and reasoned about on its own.

use std::time::Duration;

/// The infinite metric: a route with this metric is a retraction / unusable.
pub const INFINITY: u16 = 0xFFFF;

/// `a` is newer than `b`. Sequence numbers are 32-bit and never wrap, so this is plain
/// `>`, not Babel's 16-bit serial order (RFC 8966 §3.2.1).
///
/// Why: announcements are signed and can be replayed by anyone who kept one. In a
/// wrapping space an old announcement becomes "newer" again once the origin has moved
/// half the space on, and seqno requests (which nobody signs) could move it there in two
/// steps. Here an origin raises its seqno by one per request, at most once per
/// `seqno_bump_min_interval`, and starts every run above everything it announced before
/// (the agent keeps a reservation in its state directory), so 2^32 lasts about 68 years
/// of back-to-back bumps and an archived announcement stays older for good.
pub fn seqno_newer(a: u32, b: u32) -> bool {
    a > b
}

/// Feasibility distance: the best (seqno, metric) this node has advertised for a source.
/// Updates are only accepted when strictly better, which is what makes routing loop-free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fd {
    /// Sequence number of the advertisement.
    pub seqno: u32,
    /// Metric of the advertisement.
    pub metric: u16,
}

/// RFC 8966 §3.5.1: an advertisement (seqno, metric) is feasible when there is no
/// source entry, it is a retraction, its seqno is newer, or the seqno is equal and the
/// metric strictly smaller than the feasibility distance. A neighbour whose metric is not
/// below ours may be routing through us, so taking its route could close a loop.
pub fn is_feasible(fd: Option<Fd>, seqno: u32, metric: u16) -> bool {
    if metric == INFINITY {
        return true;
    }
    match fd {
        None => true,
        Some(fd) => seqno_newer(seqno, fd.seqno) || (seqno == fd.seqno && metric < fd.metric),
    }
}

/// Saturating metric addition: anything at or beyond [`INFINITY`] is infinite, so a long
/// path can never wrap around to a small metric.
pub fn add_metric(a: u16, b: u16) -> u16 {
    if a == INFINITY || b == INFINITY {
        return INFINITY;
    }
    let s = u32::from(a) + u32::from(b);
    if s >= u32::from(INFINITY) {
        INFINITY
    } else {
        s as u16
    }
}

/// Parameters of the link cost function. Defaults follow Babel: base cost 96 (wired
/// interfaces), and the RTT extension's rtt-min 10 ms, rtt-max 120 ms, max penalty 150
/// (RFC 9616 §3.3).
#[derive(Debug, Clone, PartialEq)]
pub struct CostParams {
    /// Cost of a loss-free, fast link when nothing else is configured for the neighbour.
    pub default_base: u16,
    /// RTT at or below which no penalty is added (LAN-scale jitter is free).
    pub rtt_min: Duration,
    /// RTT at or above which the full penalty is added.
    pub rtt_max: Duration,
    /// The RTT penalty at `rtt_max` and beyond.
    pub max_rtt_penalty: u16,
    /// Loss fraction at or above which the link is unusable (infinite cost): beyond it
    /// hello/ack exchanges are too unreliable to keep a route over the link.
    pub max_loss: f64,
    /// Smoothing of measured costs: the new value moves 1/`smoothing` of the way towards
    /// each raw measurement, so one slow hello does not move the metric.
    pub smoothing: u16,
    /// A smoothed cost replaces the current one only when it differs by at least this
    /// much (and by at least `current / deadband_div`), so jitter never reaches the routes.
    pub deadband_abs: u16,
    /// Relative part of the deadband (see `deadband_abs`).
    pub deadband_div: u16,
}

impl Default for CostParams {
    fn default() -> Self {
        CostParams {
            default_base: 96,
            rtt_min: Duration::from_millis(10),
            rtt_max: Duration::from_millis(120),
            max_rtt_penalty: 150,
            max_loss: 0.9,
            smoothing: 4,
            deadband_abs: 8,
            deadband_div: 8,
        }
    }
}

/// The cost of one link, a pure function of its base cost and measurements:
/// `base / (1 - loss)` (ETX-style: expected transmissions of a hello/ack round trip)
/// plus an RTT penalty, zero below `rtt_min`, linear up to `max_rtt_penalty` at
/// `rtt_max`. Unknown RTT or loss contributes nothing, so a new link starts at its base
/// cost. Never 0 (a zero-cost hop would break the strict metric increase loop-freedom
/// relies on) and never above `INFINITY`.
pub fn link_cost(p: &CostParams, base: u16, rtt: Option<Duration>, loss: Option<f64>) -> u16 {
    if base == INFINITY {
        return INFINITY;
    }
    let loss = loss
        .filter(|l| l.is_finite())
        .unwrap_or(0.0)
        .clamp(0.0, 1.0);
    if loss >= p.max_loss {
        return INFINITY;
    }
    let etx = f64::from(base) / (1.0 - loss);
    let penalty = match rtt {
        None => 0.0,
        Some(r) if r <= p.rtt_min => 0.0,
        Some(r) if r >= p.rtt_max || p.rtt_max <= p.rtt_min => f64::from(p.max_rtt_penalty),
        Some(r) => {
            let span = (p.rtt_max - p.rtt_min).as_secs_f64();
            f64::from(p.max_rtt_penalty) * (r - p.rtt_min).as_secs_f64() / span
        }
    };
    let c = (etx + penalty).round();
    if c >= f64::from(INFINITY - 1) {
        INFINITY - 1
    } else if c < 1.0 {
        1
    } else {
        c as u16
    }
}

/// Whether `new` differs enough from `old` to matter: at least `abs` and `old / div`.
/// Used both for link-cost deadbands and for deciding that a metric change is worth a
/// triggered update.
pub fn significant(old: u16, new: u16, abs: u16, div: u16) -> bool {
    if old == new {
        return false;
    }
    if old == INFINITY || new == INFINITY {
        return true;
    }
    let d = old.abs_diff(new);
    d >= abs.max(old / div.max(1))
}
