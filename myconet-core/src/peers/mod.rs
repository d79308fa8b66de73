//! Underlay neighbours: who they are, whether they are alive, and how to find them.
//!
//! Written like the session core: a sans-IO state machine ([`PeerManager`]) that gets
//! time as [`std::time::Instant`] and bytes as slices and answers with [`Action`]s. The
//! one piece of I/O that belongs to this layer alone, link-local multicast discovery, is
//! the agent's (`myconet-agent`'s `discovery::Beaconer`), which hands received beacons
//! to [`PeerManager::on_beacon`]. Every protocol decision is therefore testable with a
//! simulated clock.
//!
//! What the manager does and does not do:
//! - It never does cryptography on links. When a neighbour needs a link session it emits
//!   [`Action::StartLinkHandshake`]; the session layer runs the handshake and reports
//!   [`PeerManager::on_link_authenticated`]. Only then does the manager emit
//!   [`Action::PeerUp`], which is what lets the agent put the endpoint into the XDP peer
//!   map, so only authenticated neighbours can ever relay through this node.
//! - It defines the plaintext of link-level control messages ([`wire`]); sealing
//!   them into `Control` packets under the link session is the session layer's job.
//! - It verifies discovery beacons (signed with the node's Ed25519 key, sent in the
//!   clear), because they arrive before any session exists.
//!
//! Modules:
//! - [`wire`]: wire format of hello, hello-ack, keepalive and discovery beacons.
//! - [`manager`]: the per-neighbour state machine, RTT/loss estimation, discovery intake.
//!
//! A neighbour's key and endpoint types ([`crate::id::NodeKey`],
//! [`crate::id::LinkEndpoint`]) are shared with the other cores and live in [`crate::id`].

pub mod manager;
pub mod wire;

mod limit;

#[cfg(test)]
mod tests;

pub use manager::{
    Action, BeaconOutcome, BeaconReject, Origin, PeerConfig, PeerError, PeerManager, PeerSnapshot,
    PeerState, PeerStats,
};
pub use wire::{
    Beacon, BeaconError, Hello, HelloAck, Kind, LinkMessage, LinkMessageError, SignedBeacon,
};
