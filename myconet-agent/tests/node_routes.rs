//! The node's route changes from two sides at once: the routing protocol installing its
//! choice (`set_routed`) while an operator adds and removes a static route for the same
//! prefix. A static route, once added, must stay in force until it is removed: the
//! protocol's install may never slip in between its check and its write.
//!
//! No kernel data plane is needed: the RIB is the same structure the kernel map mirrors.

use std::{
    net::Ipv6Addr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
};

use myconet_agent::identity::Identity;
use myconet_agent::shell::node::Node;
use myconet_core::rib::{NextHop, Origin, Prefix};

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn node() -> (TempDir, Arc<Node>) {
    let dir =
        TempDir(std::env::temp_dir().join(format!("myconet-node-routes-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let identity = Identity::load_or_create(&dir.0).expect("identity");
    let node = Node::new(identity, 9651, None, Default::default()).expect("node");
    (dir, Arc::new(node))
}

fn hop(last: u16) -> NextHop {
    NextHop {
        addr: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, last),
        port: 9651,
        ifindex: 0,
    }
}

fn origin_of(node: &Node, prefix: Prefix) -> Option<Origin> {
    node.routes()
        .expect("routes")
        .into_iter()
        .find(|r| r.prefix == prefix)
        .and_then(|r| r.agent.map(|e| e.origin))
}

#[test]
fn a_static_route_is_never_overwritten_by_a_concurrent_routing_install() {
    let (_dir, node) = node();
    let prefix: Prefix = "fd6d:1:2:3::/64".parse().expect("prefix");
    let stop = Arc::new(AtomicBool::new(false));
    let protocol = {
        let (node, stop) = (node.clone(), stop.clone());
        thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) && n < 5_000_000 {
                node.set_routed(prefix, hop(2 + (n % 2) as u16))
                    .expect("set_routed");
                n += 1;
            }
        })
    };
    let mut violations = 0;
    for _ in 0..20_000 {
        node.add_route(prefix, hop(1)).expect("add_route");
        // Until we remove it, the static route must be what the node holds.
        for _ in 0..4 {
            if origin_of(&node, prefix) != Some(Origin::Static) {
                violations += 1;
            }
        }
        node.remove_route(prefix).expect("remove_route");
    }
    stop.store(true, Ordering::Relaxed);
    protocol.join().expect("protocol thread");
    assert_eq!(
        violations, 0,
        "a routing install overwrote an operator's static route"
    );
    // After the last removal the protocol's choice is in force again.
    assert_eq!(origin_of(&node, prefix), Some(Origin::Routing));
}
