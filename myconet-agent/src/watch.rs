//! The underlay watcher: keeps the kernel fast path's view of this node's underlay in
//! step with the kernel, from rtnetlink notifications rather than timers.
//!
//! It subscribes to link, IPv6 address, IPv6 route and neighbour notifications before
//! it reads the current state, so nothing that changes between the dump and the
//! subscription is missed, and then:
//! - mirrors this node's underlay addresses into the XDP local-address map (the program
//!   relays only packets sent to one of them);
//!
//! A burst of notifications (an interface going down withdraws many routes and
//! addresses at once) is drained and acted on once.

use std::{collections::BTreeSet, net::Ipv6Addr, sync::Arc, time::Duration};

use futures_util::{FutureExt, StreamExt, TryStreamExt};
use myconet_common::{addr::is_overlay, maps::LocalAddrKey};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage},
};
use rtnetlink::{Handle, MulticastGroup, packet_core::NetlinkPayload};
use tracing::{debug, info, warn};

use crate::node::{Node, NodeError};

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
    addresses: bool,
}

impl Changes {
    fn note(&mut self, message: &RouteNetlinkMessage) {
        match message {
            RouteNetlinkMessage::NewAddress(m) | RouteNetlinkMessage::DelAddress(m)
                if m.header.family == AddressFamily::Inet6 =>
            {
                self.addresses = true
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
        };
        watch.sync_addresses().await?;
        Ok(watch)
    }

    /// Follows notifications until the task is cancelled. Errors are logged and retried
    /// with the next notification: a stale view must not stop the agent.
    pub async fn run(mut self) {
        loop {
            let Some((first, _)) = self.notifications.next().await else {
                warn!("rtnetlink notifications ended: the underlay view is no longer followed");
                return;
            };
            let mut changes = Changes::default();
            if let NetlinkPayload::InnerMessage(m) = &first.payload {
                changes.note(m);
            }
            // Drain the burst, so one interface change is acted on once.
            while let Some(Some((next, _))) = self.notifications.next().now_or_never() {
                if let NetlinkPayload::InnerMessage(m) = &next.payload {
                    changes.note(m);
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
        Ok(())
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

/// An error with its sources, for one-line logs.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
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
