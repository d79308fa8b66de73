//! Network-namespace testbed for Myconet: builds small underlay topologies out of
//! namespaces and veth pairs on one machine, runs the real agent in them, and sends and
//! captures real traffic, so the integration tests, the demo and the benchmarks all
//! exercise the same code paths a deployment does.
//!
//! Everything here needs root (namespaces, veths, raw sockets) except [`packet`], and
//! every resource it creates is torn down by `Drop`, even when a test panics.
#![deny(missing_docs)]

pub mod agent;
pub mod bench;
pub mod bpffs;
pub mod content;
pub mod content_bench;
pub mod demo;
pub mod diamond;
pub mod fixture;
pub mod flood;
pub mod identities;
pub mod netns;
pub mod package;
pub mod packet;
pub mod probe;
pub mod scenario;
pub mod throughput;
pub mod timing;
pub mod topology;
pub mod traffic;
pub mod util;

#[cfg(test)]
mod selftest;

pub use agent::{AgentOptions, AgentProcess, bin_dir, counter};
pub use netns::Netns;
pub use topology::{Chain, Iface, Link, Node, Topology};
pub use traffic::{Capture, CaptureOptions, CapturedFrame, Direction, SendReport, UdpSender};
