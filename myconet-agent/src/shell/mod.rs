//! The tokio shell: drives the sans-IO cores of `myconet-core` with sockets, clocks,
//! tasks and locks. It owns the node's state and decides nothing a core decides.
//!
//! - [`node`]: identity, RIB, peers and the data plane behind one lock; the operations
//!   the control API and the packet paths call.
//! - [`overlay`]: the end-to-end path: TUN packets sealed by the session core and sent,
//!   arriving datagrams opened and written to the TUN device; path MTU.
//! - [`underlay`]: the underlay UDP socket, what the XDP program passes up, userspace
//!   relaying, too-big reports.
//! - [`link`]: the neighbour layer: the peer manager and the routing core wired to the
//!   session table and the node (link handshakes, link messages, route installs).
//! - [`discovery`]: link-local beacons, sent and received.
//! - [`content`]: packages: the store, downloads and serving over the overlay, and the
//!   `Content` gRPC service.
//! - [`api`]: the gRPC control API on a Unix socket; [`metrics`]: Prometheus over HTTP.

pub mod api;
pub mod content;
pub mod discovery;
pub mod link;
pub mod metrics;
pub mod node;
pub mod overlay;
pub mod underlay;

/// Fresh randomness for timer jitter (beacons, hellos), so neighbours do not
/// synchronise; falls back to the clock, which is good enough for spreading timers
/// (nothing depends on it being secret).
pub fn jitter_seed() -> u64 {
    use ring::rand::{SecureRandom, SystemRandom};
    use std::time::{SystemTime, UNIX_EPOCH};

    let mut bytes = [0u8; 8];
    if SystemRandom::new().fill(&mut bytes).is_ok() {
        return u64::from_le_bytes(bytes);
    }
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0x6d79_636f, |d| d.as_nanos() as u64)
}
