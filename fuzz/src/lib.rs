//! Fuzz targets for every parser a peer or a user can reach, written as plain functions
//! so the same code runs under libFuzzer (`fuzz_targets/*.rs`, nightly, `cargo xtask
//! fuzz`) and as ordinary tests on stable (`tests/replay.rs` replays the seed corpora
//! and every saved crash case).
//!
//! Each target checks properties, not only the absence of panics: parse → emit → parse
//! round trips where the format allows one, "a rejected input changes no state" and "no
//! reply is larger than what caused it" for the session core, anti-replay for beacons,
//! and for the XDP program a differential check of every verdict against the userspace
//! decision ([`xdp`]). A violated property panics, which libFuzzer reports as a crash.
//!
//! Targets drive the agent's public entry points (`SessionTable::handle_datagram`,
//! `LinkMessage::parse`, `Router::handle_message`, `PeerManager::on_beacon`,
//! `FileConfig::from_toml`, `myconet_content`'s parsers, the loaded XDP program), so they follow the formats as they
//! change instead of pinning private layouts.

pub mod config;
pub mod content;
pub mod discovery;
pub mod header;
pub mod link;
pub mod routing;
pub mod seeds;
pub mod session;
pub mod xdp;

/// A fuzz target: one input in, panics on a violated property.
pub type Target = fn(&[u8]);

/// Every target by name, in the order `cargo xtask fuzz --list` prints them.
pub const TARGETS: &[(&str, Target, &str)] = &[
    (
        "header",
        header::run,
        "Myconet header: parse → emit round trip, associated data",
    ),
    (
        "session",
        session::run,
        "handshake, cookie and sealed datagrams into the session core",
    ),
    (
        "link",
        link::run,
        "link messages and routing frames: exact round trip",
    ),
    (
        "routing",
        routing::run,
        "routing TLVs: round trip, and payloads into the router",
    ),
    (
        "discovery",
        discovery::run,
        "discovery beacons into the peer manager: verification, anti-replay",
    ),
    (
        "config",
        config::run,
        "the agent's TOML config file through resolution",
    ),
    (
        "content",
        content::run,
        "content protocol frames and streams, manifests, MRIs and paths: round trips",
    ),
    (
        "xdp",
        xdp::run,
        "frames through the XDP program (BPF_PROG_TEST_RUN) against the userspace decision; needs root",
    ),
];

/// Whether a target needs root (BPF, network namespaces); such runs go under the shared
/// lock and are skipped by the replay tests when not root.
pub fn needs_root(name: &str) -> bool {
    name == "xdp"
}

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _, _)| *n == name).map(|t| t.1)
}
