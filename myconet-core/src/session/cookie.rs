//! Stateless cookies: how a loaded responder makes an initiator prove it can receive at
//! its source endpoint before spending a signature verification or any memory on it.
//!
//! cookie = HMAC-SHA256(secret, label || slot || underlay source IP || port || overlay
//! source), where `slot = floor((now - epoch) / rotation)` and `secret` is the random key
//! of that slot. Secrets rotate every `rotation` and the previous one is still accepted,
//! so a cookie is valid for one to two periods and a leaked cookie soon stops working. The
//! responder stores nothing per initiator: checking is recomputing.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use ring::{hmac, rand::SecureRandom};

use super::msg::COOKIE_LEN;

const COOKIE_LABEL: &[u8] = b"myconet v2 cookie";

/// The responder's rotating cookie secrets.
pub struct CookieChecker {
    rotation: Duration,
    epoch: Instant,
    current: Option<(u64, hmac::Key)>,
    previous: Option<(u64, hmac::Key)>,
}

impl std::fmt::Debug for CookieChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CookieChecker")
            .field("rotation", &self.rotation)
            .field("current_slot", &self.current.as_ref().map(|(s, _)| *s))
            .finish_non_exhaustive()
    }
}

impl CookieChecker {
    /// A checker whose slots count `rotation` periods from `epoch`. No secret exists until
    /// the first cookie is made, so an idle node holds no key.
    pub fn new(rotation: Duration, epoch: Instant) -> Self {
        Self {
            rotation,
            epoch,
            current: None,
            previous: None,
        }
    }

    fn slot(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.epoch).as_nanos();
        let period = self.rotation.as_nanos().max(1);
        u64::try_from(elapsed / period).unwrap_or(u64::MAX)
    }

    fn input(slot: u64, source: SocketAddr, overlay_src: Ipv6Addr) -> Vec<u8> {
        let ip = match source.ip() {
            IpAddr::V6(v6) => v6,
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        };
        let mut data = Vec::with_capacity(COOKIE_LABEL.len() + 8 + 16 + 2 + 16);
        data.extend_from_slice(COOKIE_LABEL);
        data.extend_from_slice(&slot.to_be_bytes());
        data.extend_from_slice(&ip.octets());
        data.extend_from_slice(&source.port().to_be_bytes());
        data.extend_from_slice(&overlay_src.octets());
        data
    }

    /// Makes sure the current secret belongs to the current slot, rotating (and keeping
    /// the one before) when time has moved on.
    fn rotate(
        &mut self,
        now: Instant,
        rng: &dyn SecureRandom,
    ) -> Result<(), ring::error::Unspecified> {
        let slot = self.slot(now);
        match &self.current {
            Some((s, _)) if *s >= slot => return Ok(()),
            Some((s, _)) if s.checked_add(1) == Some(slot) => self.previous = self.current.take(),
            _ => self.previous = None,
        }
        self.current = Some((slot, hmac::Key::generate(hmac::HMAC_SHA256, rng)?));
        Ok(())
    }

    /// The cookie for an initiator at underlay `source` claiming overlay `overlay_src`.
    pub fn make(
        &mut self,
        source: SocketAddr,
        overlay_src: Ipv6Addr,
        now: Instant,
        rng: &dyn SecureRandom,
    ) -> Result<[u8; COOKIE_LEN], ring::error::Unspecified> {
        self.rotate(now, rng)?;
        let (slot, key) = self.current.as_ref().ok_or(ring::error::Unspecified)?;
        let tag = hmac::sign(key, &Self::input(*slot, source, overlay_src));
        let mut cookie = [0u8; COOKIE_LEN];
        cookie.copy_from_slice(tag.as_ref());
        Ok(cookie)
    }

    /// Whether `cookie` was made for this source by the current or the previous secret
    /// within the last two slots (constant-time comparison by ring).
    pub fn verify(
        &self,
        cookie: &[u8; COOKIE_LEN],
        source: SocketAddr,
        overlay_src: Ipv6Addr,
        now: Instant,
    ) -> bool {
        let oldest = self.slot(now).saturating_sub(1);
        [&self.current, &self.previous]
            .into_iter()
            .flatten()
            .filter(|(slot, _)| *slot >= oldest)
            .any(|(slot, key)| {
                hmac::verify(key, &Self::input(*slot, source, overlay_src), cookie).is_ok()
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    #[test]
    fn valid_for_one_to_two_periods_and_bound_to_source() {
        let rng = SystemRandom::new();
        let t0 = Instant::now();
        let rot = Duration::from_secs(120);
        let mut c = CookieChecker::new(rot, t0);
        let src: SocketAddr = "[2001:db8::1]:9651".parse().unwrap();
        let other: SocketAddr = "[2001:db8::1]:9652".parse().unwrap();
        let ov: Ipv6Addr = "fd6d::1".parse().unwrap();
        let now = t0 + Duration::from_secs(10);
        let cookie = c.make(src, ov, now, &rng).unwrap();
        assert!(c.verify(&cookie, src, ov, now));
        assert!(!c.verify(&cookie, other, ov, now));
        assert!(!c.verify(&cookie, src, "fd6d::2".parse().unwrap(), now));
        // Next slot: the secret rotates on the next make, the old cookie still verifies.
        let later = t0 + Duration::from_secs(130);
        c.make(other, ov, later, &rng).unwrap();
        assert!(c.verify(&cookie, src, ov, later));
        // Two slots on: gone.
        let much_later = t0 + Duration::from_secs(250);
        assert!(!c.verify(&cookie, src, ov, much_later));
        c.make(other, ov, much_later, &rng).unwrap();
        assert!(!c.verify(&cookie, src, ov, much_later));
        assert!(!c.verify(&[0u8; COOKIE_LEN], src, ov, much_later));
    }
}
