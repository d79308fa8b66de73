//! Myconet's sans-IO protocol cores: every protocol decision the agent makes, as plain
//! state machines that take time as an argument, bytes as slices and randomness as a
//! [`ring::rand::SecureRandom`], and answer with what to send and what happened. Nothing
//! here opens a socket, reads a clock, sleeps, spawns or touches a file; the agent
//! (`myconet-agent`, the tokio shell and the OS adapters) does all of that. So the cores
//! build and test on stable Rust with no eBPF toolchain, and many nodes can be driven on
//! one simulated clock (the routing simulator, behind the `sim` feature, does).
//!
//! - [`id`]: the types every core shares, once: [`id::NodeKey`], [`id::Signer`],
//!   [`id::LinkEndpoint`], [`id::PUBLIC_KEY_LEN`].
//! - [`session`]: the end-to-end handshake, transport sessions and their DoS defences
//!   (`docs/handshake.md`).
//! - [`routing`]: the distance-vector routing core with key-signed origins
//!   (`docs/routing.md`).
//! - [`peers`]: neighbours: liveness, RTT and loss, link control messages, discovery
//!   beacons.
//! - [`rib`]: the routing table the data plane is programmed from; [`forward`]: the
//!   userspace forwarding decision with the XDP program's semantics.
//! - [`pmtu`]: path MTU across relays (signed too-big reports, ICMPv6 towards the
//!   application).
//! - [`pins`]: the key pinned per /64 (trust on first use), consulted by routing and
//!   sessions.
#![deny(missing_docs)]

pub mod forward;
pub mod id;
pub mod peers;
pub mod pins;
pub mod pmtu;
pub mod rib;
pub mod routing;
pub mod session;
