//! The Myconet node agent as a library: the binary in `main.rs` wires these modules to
//! tokio; tests and benchmarks drive them directly.
//!
//! Where things live:
//! - `dataplane`: the XDP program, its maps (route map, peer map, counters) and attach.
//! - `rib`: the agent's routing table; `forward`: the userspace forwarding decision.
//! - `node`: identity + RIB + peers + data plane behind one lock, the operations the
//!   control API calls.
//! - `underlay`: the UDP socket and what happens to packets the kernel passes up.
//! - `control`: the gRPC control API on a Unix socket.
//! - `identity`: the Ed25519 key and the /64 derived from it.
//! - `content`: packages: the store, downloads and serving over the overlay, and the
//!   `Content` gRPC service.
//! - `seqno_store`: the routing sequence numbers reserved across restarts.
//! - `pins`: the key pinned per /64 (trust on first use), for routing and sessions.
//! - `bpf_pins`: where the data plane's links and maps are pinned (a BPF file system)
//!   so they outlive the agent.
//! - `kstats`: the kernel's own UDP loss counters, shown beside the agent's.
//! - `watch`: follows rtnetlink so the data plane's view of the underlay (own
//!   addresses, sources, neighbours, egress interfaces) stays current.
//! - Operating the agent: `preflight` (start-up checks before anything is claimed),
//!   `caps` (which capabilities, dropped after set-up), `lockfile`, `logging`,
//!   `metrics` (Prometheus), `generate` (man pages and completions).
#![deny(missing_docs)]

pub mod batch_io;
pub mod bpf_pins;
pub mod caps;
pub mod config;
pub mod content;
pub mod control;
pub mod dataplane;
pub mod discovery;
pub mod egress;
pub mod generate;
pub mod identity;
pub mod kstats;
pub mod link;
pub mod lockfile;
pub mod logging;
pub mod metrics;
pub mod netlink;
pub mod next_hop;
pub mod node;
pub mod overlay;
pub mod pin_store;
pub mod preflight;
pub mod seqno_store;
pub mod sysctl;
pub mod tun;
pub mod underlay;
pub mod watch;
