//! The pinned data plane, driven directly (no agent process): what one agent leaves
//! pinned on a hitless exit, the next adopts, confirms or lets age out; a changed
//! program version replaces the old one on the same link; a clean exit leaves nothing.
//!
//! Each test mounts its own BPF file system and runs in a private network namespace
//! with two veths (`myconet_testbed::fixture`). Needs root (CI runs as root).

use std::{collections::BTreeSet, net::Ipv6Addr, path::Path, time::Instant};

use myconet_agent::os::{
    bpf_pins::{self, XdpLinkInfo},
    dataplane::{ADOPTION_GRACE, XdpDataplane, XdpModeChoice, program_version},
};
use myconet_common::maps::PeerKey;
use myconet_core::rib::{NextHop, RouteTarget};
use myconet_testbed::{bpffs::BpfFs, fixture::fib_namespace};

const PORT: u16 = 9651;

fn a(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

fn forward(next_hop: &str) -> myconet_common::maps::RouteValue {
    RouteTarget::Forward(NextHop {
        addr: a(next_hop),
        port: PORT,
        ifindex: 0,
    })
    .to_map_value()
}

fn peer(addr: &str) -> PeerKey {
    PeerKey::new(a(addr).octets(), PORT, 0)
}

fn routes(dp: &XdpDataplane) -> BTreeSet<(Ipv6Addr, u8)> {
    dp.routes()
        .unwrap()
        .into_iter()
        .map(|(p, l, _)| (p, l))
        .collect()
}

fn peers(dp: &XdpDataplane) -> BTreeSet<PeerKey> {
    dp.peers().unwrap().into_iter().collect()
}

/// Whether `ip -d link` shows an XDP program on `iface` (this thread's namespace).
fn xdp_attached(iface: &str) -> bool {
    let out = std::process::Command::new("ip")
        .args(["-d", "link", "show", "dev", iface])
        .output()
        .expect("run ip");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
}

fn link(dir: &Path, iface: &str) -> XdpLinkInfo {
    bpf_pins::xdp_link_info(&dir.join(format!("link-driver-{iface}")))
        .unwrap_or_else(|| panic!("no pinned link for {iface} in {}", dir.display()))
}

/// One agent attaches to v0 and v2, installs routes and peers and exits hitlessly:
/// both stay attached. The next (same program version) adopts the maps, takes over
/// v0's link (same link, our program) and drops v2, which it no longer uses; what it
/// confirms stays, the rest goes once the grace period is over, and a clean exit
/// leaves no pin and no program behind.
#[test]
fn pinned_state_is_adopted_confirmed_or_aged_out() {
    let fs = BpfFs::mount().expect("mount a BPF file system");
    let ns = fib_namespace().expect("fixture namespace");
    let dir = fs.path().join("node");
    ns.run_in(|| {
        let mut first = XdpDataplane::load_pinned(PORT, &dir).unwrap();
        for iface in ["v0", "v2"] {
            first.attach(iface, XdpModeChoice::Driver).unwrap();
        }
        first.finish_adoption().unwrap();
        for (prefix, via) in [("fd6d:c::", "fd00:1::2"), ("fd6d:d::", "fd00:2::2")] {
            first.set_route(a(prefix), 64, forward(via)).unwrap();
        }
        first.add_peer(peer("fd00:1::2")).unwrap();
        first.add_peer(peer("fd00:2::2")).unwrap();
        let before = link(&dir, "v0");
        assert!(first.release());
        drop(first);
        assert!(
            xdp_attached("v0") && xdp_attached("v2"),
            "a hitless exit detaches nothing"
        );

        let mut second = XdpDataplane::load_pinned(PORT, &dir).unwrap();
        assert_eq!(
            routes(&second),
            BTreeSet::from([(a("fd6d:c::"), 64), (a("fd6d:d::"), 64)])
        );
        assert_eq!(peers(&second).len(), 2);
        assert_eq!(second.adopted_pending(), (2, 2));
        second.attach("v0", XdpModeChoice::Auto).unwrap();
        let after = link(&dir, "v0");
        assert_eq!(after.id, before.id, "the same link, never detached");
        assert_ne!(
            after.prog_id, before.prog_id,
            "now running this agent's program"
        );
        second.finish_adoption().unwrap();
        assert!(
            !xdp_attached("v2"),
            "an interface no longer configured is detached"
        );
        assert!(!dir.join("link-driver-v2").exists());

        // Confirmed state stays; the rest goes once the grace period is over.
        second
            .set_route(a("fd6d:c::"), 64, forward("fd00:1::2"))
            .unwrap();
        second.add_peer(peer("fd00:1::2")).unwrap();
        assert_eq!(second.adopted_pending(), (1, 1));
        assert_eq!(second.expire_adopted(Instant::now()), 0, "still in grace");
        assert_eq!(second.expire_adopted(Instant::now() + ADOPTION_GRACE), 2);
        assert_eq!(routes(&second), BTreeSet::from([(a("fd6d:c::"), 64)]));
        assert_eq!(peers(&second), BTreeSet::from([peer("fd00:1::2")]));
        assert_eq!(second.adopted_pending(), (0, 0));

        drop(second);
        assert!(!xdp_attached("v0"), "a clean exit detaches");
        assert!(
            !dir.exists(),
            "a clean exit leaves no pins: {:?}",
            fs.entries()
        );
    })
    .expect("run in namespace");
}

/// An agent of another program version left its link and maps pinned: the new one
/// does not adopt maps laid out for another program, replaces the program on the same
/// link (no detach) and removes the old maps; a mode the operator no longer allows is
/// attached afresh.
#[test]
fn a_changed_program_version_replaces_the_old_one_cleanly() {
    let fs = BpfFs::mount().expect("mount a BPF file system");
    let ns = fib_namespace().expect("fixture namespace");
    let dir = fs.path().join("node");
    ns.run_in(|| {
        let old_version = "0123456789abcdef";
        assert_ne!(old_version, program_version());
        let mut old = XdpDataplane::load_pinned_as(PORT, &dir, old_version).unwrap();
        old.attach("v0", XdpModeChoice::Driver).unwrap();
        old.attach("v2", XdpModeChoice::Driver).unwrap();
        old.finish_adoption().unwrap();
        old.set_route(a("fd6d:c::"), 64, forward("fd00:1::2"))
            .unwrap();
        old.add_peer(peer("fd00:1::2")).unwrap();
        let before = link(&dir, "v0");
        assert!(old.release());
        drop(old);
        assert!(dir.join(format!("maps-{old_version}")).is_dir());

        let mut new = XdpDataplane::load_pinned(PORT, &dir).unwrap();
        assert!(
            routes(&new).is_empty(),
            "another version's maps are not adopted"
        );
        assert_eq!(new.adopted_pending(), (0, 0));
        new.attach("v0", XdpModeChoice::Auto).unwrap();
        let after = link(&dir, "v0");
        assert_eq!(after.id, before.id, "replaced on the same link");
        assert_ne!(after.prog_id, before.prog_id);
        // v2 was attached in driver mode; this agent wants generic there.
        let v2 = new.attach("v2", XdpModeChoice::Generic).unwrap();
        assert_eq!(v2.mode.as_str(), "generic");
        assert!(!dir.join("link-driver-v2").exists());
        assert!(dir.join("link-generic-v2").exists());
        new.finish_adoption().unwrap();
        assert!(!dir.join(format!("maps-{old_version}")).exists());
        assert!(dir.join(format!("maps-{}", program_version())).is_dir());

        drop(new);
        assert!(!xdp_attached("v0") && !xdp_attached("v2"));
        assert!(!dir.exists(), "{:?}", fs.entries());
    })
    .expect("run in namespace");
}
