//! The underlay watcher: keeps the kernel fast path's view of this node's underlay in
//! step with the kernel, from rtnetlink notifications rather than timers.
//!
//! It subscribes to link, IPv6 address, IPv6 route and neighbour notifications before
//! it reads the current state, so nothing that changes between the dump and the
//! subscription is missed, and then:
//! - mirrors this node's underlay addresses into the XDP local-address map (the program
//!   relays only packets sent to one of them);
//! - re-resolves the per-route underlay source addresses when an address or an IPv6
//!   route changes (they are resolved once at install, to spare the program a FIB
//!   source lookup per packet);
//! - makes the forwarding caches stale (one generation bump) when a route, a link, or
//!   the link-layer address or usability of a neighbour changes, so the next packet of
//!   every flow asks the FIB again instead of waiting for the once-a-second refresh;
//! - re-checks, on link changes and every [`NEXTHOP_REFRESH_INTERVAL_MS`], how frames
//!   may leave each attached interface ([`crate::os::egress`]);
//! - asks the kernel every [`NEXTHOP_REFRESH_INTERVAL_MS`] to use (`NTF_USE`) the
//!   neighbour entry of every next hop in use. Frames relayed in XDP never touch the
//!   neighbour table, so without this an entry would go STALE and stay so forever,
//!   and a neighbour that changed its MAC address would be fed frames at the old one;
//!   with it the kernel re-validates the entry as if the stack were sending (DELAY,
//!   unicast probes, then a fresh resolution), and the change it finds is the
//!   neighbour notification that bumps the generation.
//!
//! A burst of notifications (an interface going down withdraws many routes and
//! addresses at once) is drained and acted on once.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv6Addr},
    sync::Arc,
    time::Duration,
};

use futures_util::{FutureExt, StreamExt, TryStreamExt};
use myconet_common::{
    addr::is_overlay,
    maps::{LocalAddrKey, NEXTHOP_REFRESH_INTERVAL_MS},
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage},
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    },
    route::{RouteAddress, RouteAttribute, RouteMessage},
};
use rtnetlink::{Handle, MulticastGroup, packet_core::NetlinkPayload};
use tracing::{debug, info, warn};

use crate::os::dataplane::error_chain;
use crate::shell::node::{Node, NodeError};
use myconet_core::rib::NextHop;

/// Why the watcher could not start or keep its view current.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The rtnetlink socket could not be opened or subscribed.
    #[error("opening the rtnetlink monitor socket failed")]
    Connect(#[source] std::io::Error),
    /// A dump or request was refused or the connection failed.
    #[error("{what} failed")]
    Request {
        /// What was being done.
        what: &'static str,
        /// The rtnetlink error.
        #[source]
        source: rtnetlink::Error,
    },
    /// The node refused a map update.
    #[error(transparent)]
    Node(#[from] NodeError),
}

type Notifications = futures_util::stream::BoxStream<
    'static,
    (
        rtnetlink::packet_core::NetlinkMessage<RouteNetlinkMessage>,
        rtnetlink::sys::SocketAddr,
    ),
>;

/// What a batch of notifications touched.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Changes {
    /// An IPv6 address came, went or changed flags (e.g. left DAD).
    addresses: bool,
    /// An IPv6 route changed.
    routes: bool,
    /// A link changed (state, MTU, addresses, features).
    links: bool,
    /// A neighbour's link-layer address or usability changed.
    neighbours: bool,
}

/// A neighbour entry's link-layer address while the kernel would use it to send
/// (`bpf_fib_lookup` answers from entries in these states), `None` otherwise.
fn usable_lladdr(message: &NeighbourMessage) -> Option<Vec<u8>> {
    let valid = matches!(
        message.header.state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp
    );
    if !valid {
        return None;
    }
    message.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(l) => Some(l.clone()),
        _ => None,
    })
}

fn neighbour_key(message: &NeighbourMessage) -> Option<(u32, Ipv6Addr)> {
    message.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(addr)) => {
            Some((message.header.ifindex, *addr))
        }
        _ => None,
    })
}

/// The link-layer addresses of IPv6 neighbours as last reported, to tell a change that
/// matters to cached forwarding answers (another MAC, usable or not) from the routine
/// REACHABLE / STALE / DELAY / PROBE transitions that do not.
#[derive(Debug, Default)]
struct Neighbours {
    known: HashMap<(u32, Ipv6Addr), Option<Vec<u8>>>,
}

impl Neighbours {
    /// Records a notification; returns whether cached answers may now be wrong.
    fn note(&mut self, message: &NeighbourMessage, deleted: bool) -> bool {
        if message.header.family != AddressFamily::Inet6 {
            return false;
        }
        let Some(key) = neighbour_key(message) else {
            return false;
        };
        let now = if deleted {
            None
        } else {
            usable_lladdr(message)
        };
        // Deleted entries are forgotten, so the table never outgrows the kernel's.
        let before = if deleted {
            self.known.remove(&key)
        } else {
            self.known.insert(key, now.clone())
        };
        match before {
            // A neighbour seen for the first time: no cached answer can name it (a
            // missing neighbour is never cached), unless it replaces one we missed.
            None => false,
            Some(before) => before != now && before.is_some(),
        }
    }
}

impl Changes {
    fn note(&mut self, message: &RouteNetlinkMessage, neighbours: &mut Neighbours) {
        match message {
            RouteNetlinkMessage::NewAddress(m) | RouteNetlinkMessage::DelAddress(m)
                if m.header.family == AddressFamily::Inet6 =>
            {
                self.addresses = true
            }
            RouteNetlinkMessage::NewRoute(m) | RouteNetlinkMessage::DelRoute(m)
                if m.header.address_family == AddressFamily::Inet6 =>
            {
                self.routes = true
            }
            RouteNetlinkMessage::NewLink(_) | RouteNetlinkMessage::DelLink(_) => self.links = true,
            RouteNetlinkMessage::NewNeighbour(m) => {
                self.neighbours |= neighbours.note(m, false);
            }
            RouteNetlinkMessage::DelNeighbour(m) => {
                self.neighbours |= neighbours.note(m, true);
            }
            _ => {}
        }
    }
}

/// The running watcher (see the module documentation).
pub struct UnderlayWatch {
    node: Arc<Node>,
    handle: Handle,
    notifications: Notifications,
    connection: tokio::task::JoinHandle<()>,
    neighbours: Neighbours,
    /// Where each next hop is reached on the link (egress interface, on-link neighbour:
    /// the next hop itself or the gateway towards it), forgotten on any route or link
    /// change.
    on_link: HashMap<NextHop, Option<(u32, Ipv6Addr)>>,
}

impl std::fmt::Debug for UnderlayWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnderlayWatch").finish_non_exhaustive()
    }
}

impl Drop for UnderlayWatch {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl UnderlayWatch {
    /// Subscribes to the notifications, then mirrors the current state into the kernel
    /// maps, so the data plane is current when this returns. Must run inside a tokio
    /// runtime, in the node's network namespace.
    pub async fn start(node: Arc<Node>) -> Result<Self, WatchError> {
        let (connection, handle, notifications) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Link,
            MulticastGroup::Ipv6Ifaddr,
            MulticastGroup::Ipv6Route,
            MulticastGroup::Neigh,
        ])
        .map_err(WatchError::Connect)?;
        let connection = tokio::spawn(connection);
        let mut watch = Self {
            node,
            handle,
            notifications: notifications.boxed(),
            connection,
            neighbours: Neighbours::default(),
            on_link: HashMap::new(),
        };
        watch.sync_addresses().await?;
        watch.read_neighbours().await?;
        watch.node.refresh_route_sources()?;
        Ok(watch)
    }

    /// Follows notifications, and refreshes the next hops' neighbour entries every
    /// [`NEXTHOP_REFRESH_INTERVAL_MS`], until the task is cancelled. Errors are logged
    /// and retried with the next notification: a stale view must not stop the agent.
    pub async fn run(mut self) {
        let mut refresh = tokio::time::interval(Duration::from_millis(NEXTHOP_REFRESH_INTERVAL_MS));
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                n = self.notifications.next() => n,
                _ = refresh.tick() => {
                    self.use_next_hop_neighbours().await;
                    // A veth's far end gaining or losing XDP or GRO changes what this
                    // end can take without any rtnetlink notification here.
                    if let Err(e) = self.node.refresh_egress() {
                        warn!(error = %error_chain(&e), "could not re-check egress interfaces");
                    }
                    continue;
                }
            };
            let Some((first, _)) = first else {
                warn!("rtnetlink notifications ended: the underlay view is no longer followed");
                return;
            };
            let mut changes = Changes::default();
            if let NetlinkPayload::InnerMessage(m) = &first.payload {
                changes.note(m, &mut self.neighbours);
            }
            // Drain the burst, so one interface change is acted on once.
            while let Some(Some((next, _))) = self.notifications.next().now_or_never() {
                if let NetlinkPayload::InnerMessage(m) = &next.payload {
                    changes.note(m, &mut self.neighbours);
                }
            }
            if let Err(e) = self.apply(changes).await {
                warn!(error = %error_chain(&e), "could not follow an underlay change");
            }
        }
    }

    async fn apply(&mut self, changes: Changes) -> Result<(), WatchError> {
        if changes.addresses {
            self.sync_addresses().await?;
        }
        if changes.routes || changes.links {
            self.on_link.clear();
        }
        if changes.addresses || changes.routes || changes.links {
            let rewritten = self.node.refresh_route_sources()?;
            if rewritten > 0 {
                info!(routes = rewritten, "underlay source addresses re-resolved");
            }
        }
        if changes.links {
            self.node.refresh_egress()?;
        }
        if changes.routes || changes.links || changes.neighbours {
            debug!(?changes, "underlay changed: forwarding caches made stale");
            self.node.refresh_nexthops();
        }
        Ok(())
    }

    /// Reads the IPv6 neighbour table, so later notifications can be told apart.
    async fn read_neighbours(&mut self) -> Result<(), WatchError> {
        let mut request = self.handle.neighbours().get();
        request.message_mut().header.family = AddressFamily::Inet6;
        let messages: Vec<NeighbourMessage> =
            request
                .execute()
                .try_collect()
                .await
                .map_err(|source| WatchError::Request {
                    what: "listing IPv6 neighbours",
                    source,
                })?;
        for m in &messages {
            self.neighbours.note(m, false);
        }
        Ok(())
    }

    /// Tells the kernel that every next hop's neighbour entry is in use (`NTF_USE`),
    /// creating it if missing, so the kernel keeps re-validating the entries XDP relays
    /// with (see the module documentation). Failures are logged: the next round retries.
    async fn use_next_hop_neighbours(&mut self) {
        for nh in self.node.next_hops_in_use() {
            let on_link = match self.on_link.get(&nh) {
                Some(known) => *known,
                None => {
                    let found = on_link_neighbour(&self.handle, &nh).await;
                    self.on_link.insert(nh, found);
                    found
                }
            };
            let Some((ifindex, neighbour)) = on_link else {
                continue;
            };
            let request = self
                .handle
                .neighbours()
                .add(ifindex, IpAddr::V6(neighbour))
                .state(NeighbourState::None)
                .flags(NeighbourFlags::Use)
                .replace();
            if let Err(e) = request.execute().await {
                debug!(%neighbour, ifindex, error = %e, "NTF_USE refresh of a next hop failed");
            }
        }
    }

    /// Reads every IPv6 address and makes the local-address map hold this node's
    /// underlay ones.
    async fn sync_addresses(&mut self) -> Result<(), WatchError> {
        let mut request = self.handle.address().get();
        request.message_mut().header.family = AddressFamily::Inet6;
        let messages: Vec<AddressMessage> =
            request
                .execute()
                .try_collect()
                .await
                .map_err(|source| WatchError::Request {
                    what: "listing IPv6 addresses",
                    source,
                })?;
        let wanted: BTreeSet<LocalAddrKey> = messages.iter().filter_map(underlay_address).collect();
        if self.node.sync_local_addrs(&wanted)? {
            info!(addresses = wanted.len(), "underlay addresses changed");
        } else {
            debug!("underlay addresses unchanged");
        }
        Ok(())
    }
}

/// Where `nh` is reached on the link: its own interface and address for a
/// link-local next hop, else what the kernel's route lookup says (the egress
/// interface and the gateway, or the next hop itself when it is on-link).
async fn on_link_neighbour(handle: &Handle, nh: &NextHop) -> Option<(u32, Ipv6Addr)> {
    if nh.addr.is_unicast_link_local() {
        return (nh.ifindex != 0).then_some((nh.ifindex, nh.addr));
    }
    let mut query = RouteMessage::default();
    query.header.address_family = AddressFamily::Inet6;
    query.header.destination_prefix_length = 128;
    query
        .attributes
        .push(RouteAttribute::Destination(RouteAddress::Inet6(nh.addr)));
    if nh.ifindex != 0 {
        query.attributes.push(RouteAttribute::Oif(nh.ifindex));
    }
    let mut answers = std::pin::pin!(handle.route().get(query).execute());
    let route = match answers.try_next().await {
        Ok(Some(route)) => route,
        Ok(None) => return None,
        Err(e) => {
            debug!(next_hop = %nh.addr, error = %e, "no underlay route to a next hop");
            return None;
        }
    };
    let oif = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })?;
    let gateway = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet6(g)) => Some(*g),
        _ => None,
    });
    Some((oif, gateway.unwrap_or(nh.addr)))
}

/// The local-address key for an address message, if it is an underlay address packets
/// can be sent to: not tentative or failed (the kernel does not accept packets for
/// those), not loopback or multicast, not an overlay address (those live on the TUN).
fn underlay_address(message: &AddressMessage) -> Option<LocalAddrKey> {
    if message.header.family != AddressFamily::Inet6 {
        return None;
    }
    let unusable =
        |f: AddressFlags| f.intersects(AddressFlags::Tentative | AddressFlags::Dadfailed);
    let header_unusable = message
        .header
        .flags
        .intersects(AddressHeaderFlags::Tentative | AddressHeaderFlags::Dadfailed);
    let mut local = None;
    let mut address = None;
    for attribute in &message.attributes {
        match attribute {
            AddressAttribute::Flags(f) if unusable(*f) => return None,
            AddressAttribute::Local(std::net::IpAddr::V6(a)) => local = Some(*a),
            AddressAttribute::Address(std::net::IpAddr::V6(a)) => address = Some(*a),
            _ => {}
        }
    }
    if header_unusable {
        return None;
    }
    // With a peer, IFA_LOCAL is ours and IFA_ADDRESS the peer's.
    let addr: Ipv6Addr = local.or(address)?;
    if addr.is_loopback() || addr.is_multicast() || addr.is_unspecified() || is_overlay(&addr) {
        return None;
    }
    Some(LocalAddrKey::new(addr.octets(), message.header.index))
}

/// How long to wait before the watcher is restarted after its notifications ended.
pub const RESTART_DELAY: Duration = Duration::from_secs(1);

/// Runs `watch` and, should its socket ever fail, a fresh watcher (which re-reads
/// everything), until the task is cancelled.
pub async fn follow_forever(watch: UnderlayWatch) {
    let node = watch.node.clone();
    watch.run().await;
    loop {
        tokio::time::sleep(RESTART_DELAY).await;
        match UnderlayWatch::start(node.clone()).await {
            Ok(watch) => watch.run().await,
            Err(e) => warn!(error = %error_chain(&e), "restarting the underlay watcher failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn neighbour(state: NeighbourState, mac: Option<[u8; 6]>) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet6;
        m.header.ifindex = 3;
        m.header.state = state;
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet6(
                "fd00::2".parse().unwrap(),
            )));
        if let Some(mac) = mac {
            m.attributes
                .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        }
        m
    }

    #[test]
    fn only_neighbour_changes_that_matter_to_cached_answers_count() {
        let old = [2, 0, 0, 0, 0, 1];
        let new = [2, 0, 0, 0, 0, 2];
        let mut n = Neighbours::default();
        assert!(!n.note(&neighbour(NeighbourState::Reachable, Some(old)), false));
        // Routine re-validation of the same address: cached answers stay right.
        for state in [
            NeighbourState::Stale,
            NeighbourState::Delay,
            NeighbourState::Probe,
        ] {
            assert!(!n.note(&neighbour(state, Some(old)), false), "{state:?}");
        }
        assert!(!n.note(&neighbour(NeighbourState::Reachable, Some(old)), false));
        // Another MAC: every answer naming the old one is wrong now.
        assert!(n.note(&neighbour(NeighbourState::Stale, Some(new)), false));
        // Unusable (failed), then deleted: the first matters, the second no more.
        assert!(n.note(&neighbour(NeighbourState::Failed, None), false));
        assert!(!n.note(&neighbour(NeighbourState::Failed, None), true));
        // Usable again: no cached answer can name an entry that was unusable.
        assert!(!n.note(&neighbour(NeighbourState::Reachable, Some(new)), false));
        assert!(n.note(&neighbour(NeighbourState::Reachable, Some(new)), true));
        // IPv4 (ARP) entries are not ours to follow.
        let mut v4 = neighbour(NeighbourState::Reachable, Some(old));
        v4.header.family = AddressFamily::Inet;
        assert!(!n.note(&v4, false));
    }

    #[test]
    fn underlay_addresses_exclude_what_cannot_receive() {
        let message = |addr: &str, flags: AddressFlags| {
            let mut m = AddressMessage::default();
            m.header.family = AddressFamily::Inet6;
            m.header.index = 4;
            m.attributes
                .push(AddressAttribute::Address(addr.parse().unwrap()));
            m.attributes.push(AddressAttribute::Flags(flags));
            m
        };
        let key = |addr: &str, ifindex| {
            Some(LocalAddrKey::new(
                addr.parse::<Ipv6Addr>().unwrap().octets(),
                ifindex,
            ))
        };
        assert_eq!(
            underlay_address(&message("fd00::1", AddressFlags::Permanent)),
            key("fd00::1", 0)
        );
        assert_eq!(
            underlay_address(&message("fe80::1", AddressFlags::Permanent)),
            key("fe80::1", 4),
            "link-local addresses are scoped to their interface"
        );
        for (addr, flags) in [
            ("fd00::1", AddressFlags::Tentative),
            ("fd00::1", AddressFlags::Dadfailed),
            ("::1", AddressFlags::Permanent),
            ("fd6d:1:2:3::1", AddressFlags::Permanent),
        ] {
            assert_eq!(underlay_address(&message(addr, flags)), None, "{addr}");
        }
    }
}
