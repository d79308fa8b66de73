//! A private namespace in which `bpf_fib_lookup` answers deterministically, for running
//! the XDP program with BPF_PROG_TEST_RUN (verdict tests and the per-packet benchmark).
//!
//! Layout: `v0` (ingress, fd00:1::1, MAC [`V0_MAC`]) with a permanent neighbour
//! fd00:1::2 ([`PEER_MAC`]); `v2` (second egress, fd00:2::1, [`V2_MAC`]) with a permanent
//! neighbour fd00:2::2 ([`NEIGH2_MAC`]); fd00:1::3 has no neighbour entry; fd00:99::/64
//! is a blackhole. IPv6 forwarding is on for v0 and v2.

use anyhow::{Context, Result};

use crate::netns::{Netns, unique_name};

/// MAC of the ingress interface v0.
pub const V0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// MAC of the neighbour fd00:1::2 behind v0 (the sending peer).
pub const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// MAC of the second egress interface v2.
pub const V2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x21];
/// MAC of the neighbour fd00:2::2 behind v2.
pub const NEIGH2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x22];

/// Creates the namespace described in the module docs.
pub fn fib_namespace() -> Result<Netns> {
    let ns = Netns::create(&unique_name("xdpfix"))?;
    let cmds: &[&[&str]] = &[
        &["link", "set", "lo", "up"],
        &[
            "link",
            "add",
            "v0",
            "address",
            "02:00:00:00:00:01",
            "type",
            "veth",
            "peer",
            "name",
            "v1",
        ],
        &[
            "link",
            "add",
            "v2",
            "address",
            "02:00:00:00:00:21",
            "type",
            "veth",
            "peer",
            "name",
            "v3",
        ],
        &["link", "set", "v0", "up"],
        &["link", "set", "v1", "up"],
        &["link", "set", "v2", "up"],
        &["link", "set", "v3", "up"],
        &["-6", "addr", "add", "fd00:1::1/64", "dev", "v0", "nodad"],
        &["-6", "addr", "add", "fd00:2::1/64", "dev", "v2", "nodad"],
        &[
            "-6",
            "neigh",
            "add",
            "fd00:1::2",
            "lladdr",
            "02:00:00:00:00:02",
            "dev",
            "v0",
            "nud",
            "permanent",
        ],
        &[
            "-6",
            "neigh",
            "add",
            "fd00:2::2",
            "lladdr",
            "02:00:00:00:00:22",
            "dev",
            "v2",
            "nud",
            "permanent",
        ],
        &["-6", "route", "add", "blackhole", "fd00:99::/64"],
    ];
    for c in cmds {
        ns.ip(*c).with_context(|| format!("ip {}", c.join(" ")))?;
    }
    for dev in ["v0", "v2"] {
        ns.exec(
            "sysctl",
            ["-qw", &format!("net.ipv6.conf.{dev}.forwarding=1")],
        )?;
    }
    Ok(ns)
}
