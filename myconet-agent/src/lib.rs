//! The Myconet node agent as a library: the binary in `main.rs` wires these modules to
//! tokio; tests and benchmarks drive them directly.
//!
//! The house, bottom up (each layer uses only the ones before it):
//! - **Wire** (`myconet-common`, `no_std`, shared with the XDP program): the outer
//!   header, overlay addresses, BPF map types, checksums, the too-big report.
//! - **Cores** (`myconet-core`, sans-IO): sessions and handshakes, routing, neighbours,
//!   the RIB and the forwarding decision, path MTU, key pins, and the identity types
//!   they share (`NodeKey`, `Signer`, `LinkEndpoint`). Time, bytes and randomness come
//!   in as arguments; what to send comes out. The content cores are `myconet-content`.
//! - **Shell** ([`shell`], tokio): owns sockets, clocks, tasks and locks and drives the
//!   cores: the node, the overlay and underlay paths, links, discovery, content, the
//!   gRPC API and metrics.
//! - **OS adapters** ([`os`]): one module per kernel interface: the XDP data plane and
//!   its pins, TUN, batched UDP, netlink, sysctls, capabilities, state files.
//!
//! Beside the layers: [`config`] (command line and TOML), [`identity`] (the Ed25519 key
//! and the /64 derived from it), and operating the agent: [`preflight`] (start-up checks
//! before anything is claimed), [`logging`], [`generate`] (man pages and completions).
#![deny(missing_docs)]

pub mod config;
pub mod generate;
pub mod identity;
pub mod logging;
pub mod os;
pub mod preflight;
pub mod shell;
