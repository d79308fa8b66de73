//! Which HandshakeInits a responder spends a signature verification on: the cheap gate
//! in front of the expensive step (an Ed25519 verification, then an X25519 key pair, a
//! signature and an agreement for the response, about 130 µs in all).
//!
//! In order, every init that is for this node:
//! 1. counts towards the load meter (inits per second over `load_threshold`, the
//!    caller's load signal, or a recently exhausted budget make the node "loaded");
//! 2. with a valid cookie: is charged to what the cookie proves, the underlay address it
//!    came from (the *cookie* bucket of that last hop). The cookie reply goes back to
//!    where the init came from, so a host sending directly earns a cookie for any
//!    overlay source it claims: a cookie says nothing about the overlay source;
//! 3. without one: gets a CookieReply instead when loaded, or when its last hop has
//!    used up its cookieless share (the *source* bucket), and stops there; cookie
//!    replies to one last hop are themselves bounded (the *cookie reply* bucket), so a
//!    flood of inits, replayed or spoofed, cannot make the node answer each one;
//! 4. is charged to its initiator, the pair (last hop, claimed overlay /64), so that
//!    initiators behind one relay do not share one bucket;
//! 5. takes a token from the global verification budget; when that runs dry the node is
//!    loaded for a second (cookies for everyone, which spoofers cannot echo).
//!
//! Every bucket table fails closed when full (see [`RateLimiter`]), so an attacker with
//! more addresses than the table holds gets no fresh bursts by cycling through them. The
//! global budget bounds the verification work per second whatever the attacker holds.

use std::{
    net::{Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use myconet_common::addr::{NODE_PREFIX_LEN, mask};
use ring::rand::SecureRandom;

use super::{
    Config, ConfigError, CookieChecker, HandshakeError, RateLimiter, msg::COOKIE_LEN,
    ratelimit::source_prefix,
};

/// How long the node stays loaded after the verification budget ran dry.
const BUDGET_LOAD_HOLD: Duration = Duration::from_secs(1);

/// What the gate decided for one init.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Verify it.
    Verify,
    /// Answer with this cookie and nothing else.
    Cookie([u8; COOKIE_LEN]),
    /// Refuse it: over this limit.
    Limited(Limit),
}

/// Which limit refused an init.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    /// The initiator's own bucket (last hop, overlay /64).
    Initiator,
    /// The last hop's share of cookie-bearing inits.
    CookieSender,
    /// The node's verification budget.
    Budget,
    /// The last hop has had its share of cookie replies: the init is dropped unanswered.
    CookieReplies,
}

/// Counts inits per second, the built-in load signal.
#[derive(Debug)]
struct LoadMeter {
    window_start: Instant,
    count: u32,
}

/// The responder's admission state: cookie secrets, buckets, budget, load.
#[derive(Debug)]
pub(crate) struct InitGate {
    cookies: CookieChecker,
    /// Per (last hop, overlay /64) initiator; see [`Config::rate_limit`].
    initiators: RateLimiter<(std::net::IpAddr, Ipv6Addr)>,
    /// Per last hop, inits without a valid cookie; see [`Config::source_rate_limit`].
    cookieless: RateLimiter,
    /// Per last hop, inits with a valid cookie; see [`Config::cookie_rate_limit`].
    cookie_bearing: RateLimiter,
    /// Per last hop, cookie replies sent; see [`Config::cookie_reply_rate_limit`].
    cookie_replies: RateLimiter,
    /// The whole node's verifications; see [`Config::verify_budget`].
    budget: RateLimiter<()>,
    budget_dry_until: Option<Instant>,
    load: LoadMeter,
    load_threshold: u32,
    under_load: bool,
}

impl InitGate {
    /// A gate configured from `config`; `now` starts the cookie clock.
    pub(crate) fn new(config: &Config, now: Instant) -> Result<Self, ConfigError> {
        Ok(Self {
            cookies: CookieChecker::new(config.cookie_rotation, now),
            initiators: RateLimiter::new(config.rate_limit)?,
            cookieless: RateLimiter::new(config.source_rate_limit)?,
            cookie_bearing: RateLimiter::new(config.cookie_rate_limit)?,
            cookie_replies: RateLimiter::new(config.cookie_reply_rate_limit)?,
            budget: RateLimiter::new(config.verify_budget)?,
            budget_dry_until: None,
            load: LoadMeter {
                window_start: now,
                count: 0,
            },
            load_threshold: config.load_threshold,
            under_load: false,
        })
    }

    /// The caller's load signal.
    pub(crate) fn set_under_load(&mut self, under_load: bool) {
        self.under_load = under_load;
    }

    /// Counts an init; true if cookies are required now.
    fn loaded(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.load.window_start) >= Duration::from_secs(1) {
            self.load.window_start = now;
            self.load.count = 0;
        }
        self.load.count = self.load.count.saturating_add(1);
        self.under_load
            || self.load.count > self.load_threshold
            || self.budget_dry_until.is_some_and(|until| now < until)
    }

    /// Decides on an init from underlay `from` claiming overlay source `src`, carrying
    /// `cookie`. Takes the tokens it passes through.
    pub(crate) fn admit(
        &mut self,
        from: SocketAddr,
        src: Ipv6Addr,
        cookie: Option<&[u8; COOKIE_LEN]>,
        now: Instant,
        rng: &dyn SecureRandom,
    ) -> Result<Verdict, HandshakeError> {
        let loaded = self.loaded(now);
        let cookie_valid = cookie.is_some_and(|c| self.cookies.verify(c, from, src, now));
        if cookie_valid {
            if !self.cookie_bearing.allow(from.ip(), now) {
                return Ok(Verdict::Limited(Limit::CookieSender));
            }
        } else if loaded || !self.cookieless.allow(from.ip(), now) {
            if !self.cookie_replies.allow(from.ip(), now) {
                return Ok(Verdict::Limited(Limit::CookieReplies));
            }
            let cookie = self
                .cookies
                .make(from, src, now, rng)
                .map_err(|_| HandshakeError::Random)?;
            return Ok(Verdict::Cookie(cookie));
        }
        let initiator = (
            source_prefix(from.ip(), self.initiators.prefix_len()),
            mask(src, NODE_PREFIX_LEN),
        );
        if !self.initiators.allow_key(initiator, now) {
            return Ok(Verdict::Limited(Limit::Initiator));
        }
        if !self.budget.allow_key((), now) {
            self.budget_dry_until = now.checked_add(BUDGET_LOAD_HOLD);
            return Ok(Verdict::Limited(Limit::Budget));
        }
        Ok(Verdict::Verify)
    }
}
