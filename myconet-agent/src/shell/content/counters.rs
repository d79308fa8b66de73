//! Counters of the content service: what it served, fetched, refused and dropped.
//! Plain atomics, read by `GetStats` (`myconet-ctl content stats`).

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// The content service's counters.
        #[derive(Debug, Default)]
        pub struct Counters {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        impl Counters {
            /// Every counter with its name, in declaration order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    /// Content connections accepted from other nodes.
    serve_connections,
    /// Connections refused: too many in total or from one node.
    serve_connections_refused,
    /// Requests admitted.
    serve_requests,
    /// Requests refused as busy (per-node concurrency, or the node table full).
    serve_refused_busy,
    /// Requests refused as malformed or replayed ids.
    serve_refused_bad,
    /// Manifests sent.
    serve_manifests,
    /// Groups requests answered with data.
    serve_groups_requests,
    /// Requests answered "not found" (or size mismatch).
    serve_not_found,
    /// Streams stopped by the requester's cancel.
    serve_cancelled,
    /// Encoded bytes sent (data and proofs).
    serve_bytes,
    /// Of those, file data bytes.
    serve_data_bytes,
    /// Of those, proof bytes (hash pairs).
    serve_proof_bytes,
    /// Times a stream waited for the per-node upload rate.
    serve_rate_waits,
    /// Connections closed for a malformed frame.
    serve_bad_frames,
    /// Streams stopped because this node's own copy failed to read or verify.
    serve_local_errors,
    /// Connections closed because a request frame (or a new connection's first
    /// request) did not arrive whole within `content.request_timeout_secs`.
    serve_timeouts_request,
    /// Connections closed after `content.idle_timeout_secs` with no request in progress.
    serve_timeouts_idle,
    /// Connections reset because the peer took no byte of a write for
    /// `content.write_timeout_secs`.
    serve_timeouts_write,
    /// Connections reset because the peer read below `content.min_send_rate` for
    /// longer than its credit.
    serve_timeouts_rate,
    /// Downloads started.
    fetch_started,
    /// Downloads that completed.
    fetch_completed,
    /// Downloads that failed (quota, no provider, cancelled, …).
    fetch_failed,
    /// Encoded bytes received by downloads (data and proofs).
    fetch_bytes,
    /// Verified file data bytes received and stored.
    fetch_data_bytes,
    /// Verified data bytes that were here already when downloads started (resumed).
    fetch_resumed_bytes,
    /// Connections to providers that failed to open.
    fetch_connect_failures,
    /// Providers dropped because their data or proofs failed verification.
    fetch_providers_corrupt,
    /// Providers dropped for protocol violations.
    fetch_providers_protocol,
    /// Providers dropped as unresponsive.
    fetch_providers_unresponsive,
    /// Packages added.
    add_packages,
    /// Bytes read into the store by adds.
    add_bytes,
}

impl Counters {
    /// Adds `n` to counter `c`.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one to counter `c`.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}
