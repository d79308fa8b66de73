//! Topologies of namespaces joined by veth pairs, with an IPv6-only underlay.
//!
//! Myconet relays hop by hop, so every node only ever talks to its direct neighbours:
//! each link gets its own ULA /64 and no kernel routes beyond the connected ones are
//! installed. Whatever crosses more than one link does so because Myconet relayed it.

use std::net::Ipv6Addr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::netns::{self, NAME_PREFIX, Netns};
use crate::util;

/// How long [`Chain::build`] waits for addresses to leave the tentative state and links
/// to come up.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Builder for a line of namespaces `a — b — c — …` joined by veth pairs.
#[derive(Debug, Clone)]
pub struct Chain {
    nodes: usize,
    forwarding: bool,
    gro: bool,
    tag: Option<Tag>,
    edges: Option<Vec<(usize, usize)>>,
}

#[derive(Debug, Clone)]
enum Tag {
    Label(String),
    Fixed(String),
}

fn check_tag(tag: &str) -> Result<()> {
    ensure!(
        !tag.is_empty() && tag.len() <= 8 && tag.chars().all(|c| c.is_ascii_alphanumeric()),
        "topology tag {tag:?} must be 1-8 ASCII letters or digits"
    );
    Ok(())
}

impl Chain {
    /// A chain of `nodes` namespaces (at least 2, at most 250).
    pub fn new(nodes: usize) -> Self {
        Self {
            nodes,
            forwarding: true,
            gro: true,
            tag: None,
            edges: None,
        }
    }

    /// Joins the nodes by these links instead of a line (each pair once, `a != b`), for
    /// meshes with alternative paths.
    pub fn links(mut self, edges: &[(usize, usize)]) -> Self {
        self.edges = Some(edges.to_vec());
        self
    }

    /// Whether to set `net.ipv6.conf.all.forwarding=1` inside every namespace (default:
    /// on).
    ///
    /// It is per namespace, never host-wide. The XDP relay path needs it: the kernel's
    /// `bpf_fib_lookup` answers "forwarding disabled" for an ingress device without it,
    /// which sends every relayed packet to the slow path.
    pub fn ipv6_forwarding(mut self, on: bool) -> Self {
        self.forwarding = on;
        self
    }

    /// Whether to enable GRO on every veth (default: on).
    ///
    /// A veth only accepts frames redirected or `XDP_TX`ed into it by a native-mode XDP
    /// program when its peer runs XDP or has NAPI enabled, and GRO on enables NAPI.
    /// Without it an endpoint that runs no XDP itself silently loses relayed frames.
    pub fn veth_gro(mut self, on: bool) -> Self {
        self.gro = on;
        self
    }

    /// Adds a readable label (1-8 ASCII letters or digits) to the namespace names:
    /// `myc<pid>x<n>-<label>-a`, …. Names stay unique, so labelled topologies can still
    /// be built by tests running in parallel.
    pub fn tag(mut self, label: &str) -> Self {
        self.tag = Some(Tag::Label(label.to_owned()));
        self
    }

    /// Uses exactly `myc<tag>-a`, `myc<tag>-b`, … as names (tag: 1-8 ASCII letters or
    /// digits), so a person or `cargo xtask netns down` can find them again. Building
    /// fails if they exist already; tests should use [`Chain::tag`] instead.
    pub fn fixed_tag(mut self, tag: &str) -> Self {
        self.tag = Some(Tag::Fixed(tag.to_owned()));
        self
    }

    /// Creates the namespaces and links and waits until the underlay is usable.
    ///
    /// On error everything created so far is torn down again.
    pub fn build(self) -> Result<Topology> {
        ensure!(
            (2..=250).contains(&self.nodes),
            "a chain needs 2..=250 nodes, not {}",
            self.nodes
        );
        let tag = match &self.tag {
            Some(Tag::Label(label)) => {
                check_tag(label)?;
                format!("{}-{label}", util::unique_tag())
            }
            Some(Tag::Fixed(tag)) => {
                check_tag(tag)?;
                tag.clone()
            }
            None => util::unique_tag(),
        };
        let tag16 = tag_hash(&tag);

        let mut topo = Topology {
            tag: tag.clone(),
            nodes: Vec::with_capacity(self.nodes),
            links: Vec::with_capacity(self.nodes - 1),
        };
        for index in 0..self.nodes {
            let name = node_name(index);
            let netns = Netns::create(&format!("{NAME_PREFIX}{tag}-{name}"))?;
            prepare_namespace(&netns, self.forwarding)?;
            topo.nodes.push(Node {
                index,
                name,
                netns,
                ifaces: Vec::new(),
            });
        }
        let edges: Vec<(usize, usize)> = match &self.edges {
            Some(edges) => edges.clone(),
            None => (0..self.nodes - 1).map(|i| (i, i + 1)).collect(),
        };
        for (index, (a, b)) in edges.into_iter().enumerate() {
            ensure!(
                a != b && a < self.nodes && b < self.nodes,
                "link {a}-{b} does not join two of the {} nodes",
                self.nodes
            );
            let link = Link::new(index, tag16, a, b);
            topo.connect(&link, self.gro)?;
            topo.links.push(link);
        }
        topo.settle(SETTLE_TIMEOUT)?;
        Ok(topo)
    }
}

/// One veth link between nodes `a` and `b`, with its own /64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Position in [`Topology::links`].
    pub index: usize,
    /// The link's /64 (network address, host bits zero).
    pub prefix: Ipv6Addr,
    /// Node holding `::1`.
    pub a: usize,
    /// Node holding `::2`.
    pub b: usize,
}

impl Link {
    fn new(index: usize, tag16: u16, a: usize, b: usize) -> Self {
        // Links of one topology never share a namespace with another topology's, so
        // the tag in the address is only there to make captures easy to tell apart.
        let group = u16::try_from(index + 1).unwrap_or(u16::MAX);
        let prefix = Ipv6Addr::new(0xfd00, tag16, group, 0, 0, 0, 0, 0);
        Self {
            index,
            prefix,
            a,
            b,
        }
    }

    /// The address node `a` (`::1`) or `b` (`::2`) holds on this link.
    pub fn addr_of(&self, node: usize) -> Option<Ipv6Addr> {
        let host = if node == self.a {
            1
        } else if node == self.b {
            2
        } else {
            return None;
        };
        Some(Ipv6Addr::from(u128::from(self.prefix) | host))
    }
}

/// One end of a link, as seen from the node that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    /// Interface name inside the node's namespace: `to-<peer name>` (at most 15 bytes).
    pub name: String,
    /// Interface index inside the node's namespace (for `route add … --ifindex`).
    pub ifindex: u32,
    /// Fixed MAC address, so frame fixtures and captures can be checked exactly.
    pub mac: [u8; 6],
    /// This node's underlay address on the link (`/64`, no DAD).
    pub addr: Ipv6Addr,
    /// Index of the link in [`Topology::links`].
    pub link: usize,
    /// Index of the neighbour on the other end.
    pub peer: usize,
    /// The neighbour's interface name.
    pub peer_name: String,
    /// The neighbour's MAC address.
    pub peer_mac: [u8; 6],
    /// The neighbour's underlay address on the link.
    pub peer_addr: Ipv6Addr,
}

/// One node: a namespace and its link ends.
#[derive(Debug)]
pub struct Node {
    index: usize,
    name: String,
    netns: Netns,
    ifaces: Vec<Iface>,
}

impl Node {
    /// Position in the topology.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Short name (`a`, `b`, …), used in interface names.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace name, for `ip netns exec`.
    pub fn ns_name(&self) -> &str {
        self.netns.name()
    }

    /// The namespace, to run code or commands inside it.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// Every link end of this node, in link order.
    pub fn ifaces(&self) -> &[Iface] {
        &self.ifaces
    }

    /// Interface names, e.g. for the agent's `--interface` flags.
    pub fn if_names(&self) -> Vec<&str> {
        self.ifaces.iter().map(|i| i.name.as_str()).collect()
    }

    /// The interface facing neighbour `peer`.
    pub fn iface_to(&self, peer: usize) -> Result<&Iface> {
        self.ifaces
            .iter()
            .find(|i| i.peer == peer)
            .with_context(|| format!("node {} has no link to node {peer}", self.name))
    }

    /// This node's underlay address on the link to neighbour `peer`.
    pub fn addr_to(&self, peer: usize) -> Result<Ipv6Addr> {
        Ok(self.iface_to(peer)?.addr)
    }

    /// Neighbour `peer`'s underlay address on the shared link.
    pub fn peer_addr(&self, peer: usize) -> Result<Ipv6Addr> {
        Ok(self.iface_to(peer)?.peer_addr)
    }

    /// Every neighbour as `(node index, its address on the shared link)`.
    pub fn neighbours(&self) -> Vec<(usize, Ipv6Addr)> {
        self.ifaces.iter().map(|i| (i.peer, i.peer_addr)).collect()
    }

    /// Pings `addr` once from this namespace (up to `attempts` tries, 1 s each).
    ///
    /// Besides checking reachability this resolves the neighbour entry, so a following
    /// burst of datagrams is not dropped while neighbour discovery runs.
    pub fn ping(&self, addr: Ipv6Addr, attempts: u32) -> Result<()> {
        let target = addr.to_string();
        let mut last = None;
        for _ in 0..attempts.max(1) {
            match self.netns.exec(
                util::tool("ping"),
                ["-6", "-n", "-c", "1", "-W", "1", target.as_str()],
            ) {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last
            .unwrap_or_else(|| anyhow::anyhow!("no ping attempt ran"))
            .context(format!("{} cannot ping {addr}", self.ns_name())))
    }
}

/// A built topology; tears itself down on drop.
#[derive(Debug)]
pub struct Topology {
    tag: String,
    nodes: Vec<Node>,
    links: Vec<Link>,
}

impl Topology {
    /// The tag embedded in every namespace name of this topology.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Every node, in order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `index`; panics when out of range, like slice indexing (a test bug).
    pub fn node(&self, index: usize) -> &Node {
        &self.nodes[index]
    }

    /// Every link, in order.
    pub fn links(&self) -> &[Link] {
        &self.links
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the topology has no nodes (only after [`Topology::persist`]).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Pings across every link in both directions, which proves the underlay works and
    /// resolves all neighbour entries.
    pub fn ping_all_links(&self) -> Result<()> {
        for link in &self.links {
            for (from, to) in [(link.a, link.b), (link.b, link.a)] {
                let node = self.node(from);
                node.ping(node.peer_addr(to)?, 3)?;
            }
        }
        Ok(())
    }

    /// Deletes every namespace (and so every veth), stopping the processes the testbed
    /// started in them. Idempotent; runs from drop as well.
    pub fn teardown(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        for node in &mut self.nodes {
            if let Err(e) = node.netns.delete() {
                errors.push(format!("{e:#}"));
            }
        }
        if !errors.is_empty() {
            bail!("teardown failed: {}", errors.join("; "));
        }
        Ok(())
    }

    /// Leaves the namespaces in place after this value is gone (for manual poking) and
    /// returns their names.
    pub fn persist(mut self) -> Vec<String> {
        std::mem::take(&mut self.nodes)
            .into_iter()
            .map(|n| n.netns.persist())
            .collect()
    }

    fn connect(&mut self, link: &Link, gro: bool) -> Result<()> {
        let (a, b) = (link.a, link.b);
        let tag16 = tag_hash(&self.tag);
        let a_if = format!("to-{}", node_name(b));
        let b_if = format!("to-{}", node_name(a));
        let a_mac = mac(tag16, a, b);
        let b_mac = mac(tag16, b, a);
        let a_addr = link.addr_of(a).context("link end a")?;
        let b_addr = link.addr_of(b).context("link end b")?;
        let b_ns = self.nodes[b].netns.name().to_owned();

        // Both ends are created directly inside their namespaces, so the short interface
        // names never exist in (or clash within) the host namespace.
        self.nodes[a].netns.ip([
            "link",
            "add",
            &a_if,
            "address",
            &fmt_mac(&a_mac),
            "type",
            "veth",
            "peer",
            "name",
            &b_if,
            "address",
            &fmt_mac(&b_mac),
            "netns",
            &b_ns,
        ])?;
        for (node, ifname, addr) in [(a, &a_if, a_addr), (b, &b_if, b_addr)] {
            let ns = &self.nodes[node].netns;
            ns.ip(["addr", "add", &format!("{addr}/64"), "dev", ifname, "nodad"])?;
            // Offloads stay as a stock veth has them (TX checksum offload on: senders
            // leave partial checksums, which the data plane must cope with); only GRO,
            // which the far end of an XDP redirect needs, is switched on.
            if gro {
                ns.exec(util::tool("ethtool"), ["-K", ifname.as_str(), "gro", "on"])
                    .with_context(|| format!("failed to enable GRO on {ifname}"))?;
            }
            ns.ip(["link", "set", "dev", ifname, "up"])?;
        }
        for (node, peer, name, peer_name, own_mac, peer_mac, addr, peer_addr) in [
            (a, b, &a_if, &b_if, a_mac, b_mac, a_addr, b_addr),
            (b, a, &b_if, &a_if, b_mac, a_mac, b_addr, a_addr),
        ] {
            let ifindex = ifindex(&self.nodes[node].netns, name)?;
            self.nodes[node].ifaces.push(Iface {
                name: name.clone(),
                ifindex,
                mac: own_mac,
                addr,
                link: link.index,
                peer,
                peer_name: peer_name.clone(),
                peer_mac,
                peer_addr,
            });
        }
        Ok(())
    }

    /// Waits until no address is tentative and every veth reports carrier.
    fn settle(&self, timeout: Duration) -> Result<()> {
        for node in &self.nodes {
            util::poll(
                &format!("the underlay of {} to settle", node.ns_name()),
                timeout,
                Duration::from_millis(50),
                || {
                    let tentative = node.netns.ip(["-6", "-o", "addr", "show", "tentative"])?;
                    let tentative = String::from_utf8_lossy(&tentative.stdout);
                    if !tentative.trim().is_empty() {
                        return Ok(None);
                    }
                    for iface in &node.ifaces {
                        let out = node.netns.ip(["-o", "link", "show", "dev", &iface.name])?;
                        if !String::from_utf8_lossy(&out.stdout).contains("state UP") {
                            return Ok(None);
                        }
                    }
                    Ok(Some(()))
                },
            )?;
        }
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("testbed: {e:#}");
        }
    }
}

/// Removes leftover namespaces of a fixed-tag topology (see [`Chain::fixed_tag`]), e.g. after
/// `cargo xtask netns up`. Returns the names it deleted.
pub fn teardown_tag(tag: &str) -> Result<Vec<String>> {
    let prefix = format!("{NAME_PREFIX}{tag}-");
    let mut deleted = Vec::new();
    for name in netns::list()? {
        if name.starts_with(&prefix) {
            netns::delete_named(&name)?;
            deleted.push(name);
        }
    }
    Ok(deleted)
}

/// `a`..`z`, then `n26`, `n27`, …
fn node_name(index: usize) -> String {
    match u8::try_from(index) {
        Ok(i) if i < 26 => char::from(b'a' + i).to_string(),
        _ => format!("n{index}"),
    }
}

/// A locally administered unicast MAC: `02:6d:<tag16>:<node>:<peer>`.
fn mac(tag16: u16, node: usize, peer: usize) -> [u8; 6] {
    let [t0, t1] = tag16.to_be_bytes();
    // Nodes are capped at 250, so the casts are exact.
    [0x02, 0x6d, t0, t1, node as u8, peer as u8]
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn fmt_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A 16-bit digest of the tag (FNV-1a folded), for the second group of link prefixes.
fn tag_hash(tag: &str) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in tag.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    ((h >> 16) ^ (h & 0xffff)) as u16
}

fn ifindex(netns: &Netns, ifname: &str) -> Result<u32> {
    let cname = std::ffi::CString::new(ifname).context("interface name contains NUL")?;
    let index = netns.run_in(move || {
        // SAFETY: cname is a valid NUL-terminated string for the duration of the call.
        unsafe { libc::if_nametoindex(cname.as_ptr()) }
    })?;
    if index == 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("no interface {ifname} in {}", netns.name()));
    }
    Ok(index)
}

/// Disables DAD (so addresses are usable at once) and sets forwarding, before any link
/// exists so new interfaces inherit the defaults.
fn prepare_namespace(netns: &Netns, forwarding: bool) -> Result<()> {
    netns.ip(["link", "set", "dev", "lo", "up"])?;
    let fwd = if forwarding { "1" } else { "0" };
    netns
        .exec(
            util::tool("sysctl"),
            [
                "-q",
                "-w",
                "net.ipv6.conf.all.accept_dad=0",
                "-w",
                "net.ipv6.conf.default.accept_dad=0",
                "-w",
                &format!("net.ipv6.conf.all.forwarding={fwd}"),
                "-w",
                &format!("net.ipv6.conf.default.forwarding={fwd}"),
            ],
        )
        .with_context(|| format!("failed to set sysctls in {}", netns.name()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses() {
        assert_eq!(node_name(0), "a");
        assert_eq!(node_name(25), "z");
        assert_eq!(node_name(26), "n26");
        assert!(format!("to-{}", node_name(249)).len() <= 15);
        let link = Link::new(1, 0xabcd, 1, 2);
        assert_eq!(link.prefix, "fd00:abcd:2::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            link.addr_of(1),
            Some("fd00:abcd:2::1".parse::<Ipv6Addr>().unwrap())
        );
        assert_eq!(
            link.addr_of(2),
            Some("fd00:abcd:2::2".parse::<Ipv6Addr>().unwrap())
        );
        assert_eq!(link.addr_of(0), None);
        assert_eq!(fmt_mac(&mac(0x1234, 1, 2)), "02:6d:12:34:01:02".to_owned());
        assert_ne!(tag_hash("1x0"), tag_hash("1x1"));
    }

    #[test]
    fn bad_chains_are_rejected() {
        assert!(Chain::new(1).build().is_err());
        assert!(Chain::new(3).tag("no spaces").build().is_err());
        assert!(Chain::new(3).fixed_tag("").build().is_err());
        assert!(Chain::new(3).fixed_tag("123456789").build().is_err());
    }
}
