//! Kernel network configuration over rtnetlink: the agent gives its TUN device an MTU,
//! the node's overlay address and the route that sends the whole overlay into it.
//!
//! Everything goes through one rtnetlink socket ([`Netlink`]) whose connection task runs
//! on the caller's tokio runtime, so configuration never blocks the data path and never
//! shells out to `ip`. The socket belongs to the network namespace of the thread that
//! called [`Netlink::connect`], which is what the namespace tests rely on.
//!
//! Every mutating call is idempotent: the agent re-applies its configuration after a
//! restart or a link flap, and "already there" must not be an error then.

use std::net::{IpAddr, Ipv6Addr};
use std::pin::pin;
use std::time::Duration;

use futures_util::stream::TryStreamExt;
use myconet_common::{addr, wire};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tokio::task::JoinHandle;

/// Outer (underlay) IPv6 header: fixed 40 bytes, Myconet uses no extension headers.
pub const OUTER_IPV6_HEADER_LEN: u32 = 40;

/// Outer UDP header carrying the Myconet datagram.
pub const UDP_HEADER_LEN: u32 = 8;

/// Authentication tag the end-to-end AEAD (ChaCha20-Poly1305 / AES-256-GCM) appends.
pub const AEAD_TAG_LEN: u32 = myconet_core::session::TAG_LEN as u32;

/// Transmit queue length given to the TUN device: packets (with offload, superpackets)
/// the kernel queues for the agent's reader. Large enough to ride out a scheduling delay
/// of the reader at full rate instead of dropping and making TCP retransmit.
pub const TUN_TXQUEUELEN: u32 = 10_000;

/// Bytes every overlay packet grows by on the underlay: outer IPv6 (40) + UDP (8) +
/// Myconet header (48, [`wire::HEADER_LEN`]) + AEAD tag (16) = 112 (docs/protocol.md,
/// "Encapsulation overhead").
pub const ENCAPSULATION_OVERHEAD: u32 =
    OUTER_IPV6_HEADER_LEN + UDP_HEADER_LEN + wire::HEADER_LEN as u32 + AEAD_TAG_LEN;

/// How long [`Netlink::configure_tun`] waits for the kernel to start delivering to the
/// node address: the local route appears from the kernel's address work queue, normally
/// within milliseconds.
pub const ADDRESS_READY_TIMEOUT: Duration = Duration::from_secs(3);

/// The IPv6 minimum link MTU (RFC 8200 §5): the kernel disables IPv6 on a link with a
/// smaller MTU, so the overlay must never go below it.
pub const IPV6_MIN_MTU: u32 = 1280;

/// The MTU the overlay (TUN) interface gets on top of an underlay link of
/// `underlay_mtu` bytes: `underlay_mtu - 112`, so that a full-size overlay packet still
/// fits into one underlay packet after encapsulation and encryption
/// ([`ENCAPSULATION_OVERHEAD`]: outer IPv6 40 + UDP 8 + Myconet header 48 + AEAD tag 16).
///
/// Fails when the result would be below the IPv6 minimum of 1280, i.e. when the underlay
/// cannot carry 1280 + 112 = 1392 bytes: Myconet never fragments on the underlay, so such
/// a link cannot carry the overlay at all and saying so beats a silently broken MTU.
pub fn overlay_mtu(underlay_mtu: u32) -> Result<u32, NetlinkError> {
    match underlay_mtu.checked_sub(ENCAPSULATION_OVERHEAD) {
        Some(mtu) if mtu >= IPV6_MIN_MTU => Ok(mtu),
        _ => Err(NetlinkError::UnderlayMtuTooSmall {
            underlay_mtu,
            needed: IPV6_MIN_MTU + ENCAPSULATION_OVERHEAD,
        }),
    }
}

/// What can go wrong while configuring links, addresses and routes, with enough context
/// (interface, address, operation) to act on the message without a debugger.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// [`Netlink::connect`] was called outside a tokio runtime: the connection task needs
    /// one to run on.
    #[error("rtnetlink needs a tokio runtime: call Netlink::connect from inside one")]
    NoRuntime,
    /// The rtnetlink socket could not be opened.
    #[error("opening the rtnetlink socket failed")]
    Connect {
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// A request was refused by the kernel or the connection failed.
    #[error("{what} failed")]
    Request {
        /// What was being done, naming the interface and address involved.
        what: String,
        /// The rtnetlink error (the kernel's errno for refused requests).
        #[source]
        source: rtnetlink::Error,
    },
    /// No interface carries this name in the current network namespace.
    #[error("interface {name:?} does not exist")]
    LinkNotFound {
        /// The name looked up.
        name: String,
    },
    /// No interface has this index in the current network namespace.
    #[error("interface with index {ifindex} does not exist")]
    IndexNotFound {
        /// The index looked up.
        ifindex: u32,
    },
    /// The kernel's link message carried no MTU attribute.
    #[error("interface {ifindex} reported no MTU")]
    NoMtu {
        /// The interface index.
        ifindex: u32,
    },
    /// The address is already on the interface with another prefix length; replacing it
    /// silently could cut off whoever configured it.
    #[error(
        "{address} is already on interface {ifindex} as /{existing}, not /{wanted}; remove it first"
    )]
    AddressConflict {
        /// The interface index.
        ifindex: u32,
        /// The address.
        address: Ipv6Addr,
        /// Prefix length found on the interface.
        existing: u8,
        /// Prefix length asked for.
        wanted: u8,
    },
    /// A prefix length above 128.
    #[error("invalid IPv6 prefix length /{prefix_len} for {address}")]
    InvalidPrefixLen {
        /// The address or prefix.
        address: Ipv6Addr,
        /// The bad length.
        prefix_len: u8,
    },
    /// The TUN was to get an address outside the overlay `fd6d::/16`.
    #[error("{address} is not an overlay address (fd6d::/16)")]
    NotOverlay {
        /// The address.
        address: Ipv6Addr,
    },
    /// An overlay MTU below the IPv6 minimum was asked for.
    #[error("MTU {mtu} on interface {ifindex} is below the IPv6 minimum of {IPV6_MIN_MTU}")]
    MtuTooSmall {
        /// The interface index.
        ifindex: u32,
        /// The MTU asked for.
        mtu: u32,
    },
    /// The address was added but the kernel did not start treating it as local in time.
    #[error("{address} on interface {ifindex} did not become a local address within {waited:?}")]
    AddressNotReady {
        /// The interface index.
        ifindex: u32,
        /// The address.
        address: Ipv6Addr,
        /// How long we waited.
        waited: Duration,
    },
    /// The underlay cannot carry a minimum-size overlay packet plus encapsulation.
    #[error(
        "underlay MTU {underlay_mtu} is too small for the overlay: it must carry at least {needed} bytes (1280 + {ENCAPSULATION_OVERHEAD} encapsulation)"
    )]
    UnderlayMtuTooSmall {
        /// The underlay link MTU.
        underlay_mtu: u32,
        /// The smallest underlay MTU that works.
        needed: u32,
    },
}

/// The errno a refused request carried, if it was refused by the kernel.
fn errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => Some(message.raw_code().abs()),
        _ => None,
    }
}

fn check_prefix_len(address: Ipv6Addr, prefix_len: u8) -> Result<(), NetlinkError> {
    if prefix_len > 128 {
        return Err(NetlinkError::InvalidPrefixLen {
            address,
            prefix_len,
        });
    }
    Ok(())
}

/// An rtnetlink connection in the calling thread's network namespace.
///
/// The connection task is aborted when this is dropped, so a `Netlink` can be made for a
/// single configuration step and thrown away.
#[derive(Debug)]
pub struct Netlink {
    handle: Handle,
    task: JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Netlink {
    /// Opens an rtnetlink socket and spawns its connection task on the current tokio
    /// runtime.
    ///
    /// The socket uses `NETLINK_GET_STRICT_CHK`, so dumps are filtered by the kernel
    /// (address family, interface) and unsupported attributes are refused instead of
    /// silently ignored.
    pub fn connect() -> Result<Self, NetlinkError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| NetlinkError::NoRuntime)?;
        let _guard = runtime.enter();
        let (connection, handle, _notifications) = rtnetlink::new_connection_with_strict_check()
            .map_err(|source| NetlinkError::Connect { source })?;
        let task = runtime.spawn(connection);
        Ok(Self { handle, task })
    }

    /// The index of the interface called `name`: every other call takes an index, which
    /// stays valid across renames.
    pub async fn link_index(&self, name: &str) -> Result<u32, NetlinkError> {
        let mut links = pin!(self.handle.link().get().match_name(name).execute());
        match links.try_next().await {
            Ok(Some(link)) => Ok(link.header.index),
            Ok(None) => Err(NetlinkError::LinkNotFound {
                name: name.to_owned(),
            }),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Err(NetlinkError::LinkNotFound {
                name: name.to_owned(),
            }),
            Err(source) => Err(NetlinkError::Request {
                what: format!("looking up interface {name:?}"),
                source,
            }),
        }
    }

    async fn link(&self, ifindex: u32) -> Result<LinkMessage, NetlinkError> {
        let mut links = pin!(self.handle.link().get().match_index(ifindex).execute());
        match links.try_next().await {
            Ok(Some(link)) => Ok(link),
            Ok(None) => Err(NetlinkError::IndexNotFound { ifindex }),
            Err(e) if errno(&e) == Some(libc::ENODEV) => {
                Err(NetlinkError::IndexNotFound { ifindex })
            }
            Err(source) => Err(NetlinkError::Request {
                what: format!("reading interface {ifindex}"),
                source,
            }),
        }
    }

    /// The MTU of interface `ifindex`, e.g. the underlay link, to derive the overlay MTU
    /// from with [`overlay_mtu`].
    pub async fn underlay_mtu(&self, ifindex: u32) -> Result<u32, NetlinkError> {
        let link = self.link(ifindex).await?;
        link.attributes
            .iter()
            .find_map(|attribute| match attribute {
                LinkAttribute::Mtu(mtu) => Some(*mtu),
                _ => None,
            })
            .ok_or(NetlinkError::NoMtu { ifindex })
    }

    /// The kernel's 64-bit counters of interface `ifindex` (`ip -s link`): where frames
    /// dropped after the XDP program (e.g. a redirect the egress could not take) show.
    pub async fn link_stats(
        &self,
        ifindex: u32,
    ) -> Result<netlink_packet_route::link::Stats64, NetlinkError> {
        let link = self.link(ifindex).await?;
        Ok(link
            .attributes
            .iter()
            .find_map(|attribute| match attribute {
                LinkAttribute::Stats64(s) => Some(*s),
                _ => None,
            })
            .unwrap_or_default())
    }

    /// Sets the MTU of interface `ifindex` (`ip link set dev X mtu N`).
    pub async fn set_mtu(&self, ifindex: u32, mtu: u32) -> Result<(), NetlinkError> {
        let message = LinkUnspec::new_with_index(ifindex).mtu(mtu).build();
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                what: format!("setting MTU {mtu} on interface {ifindex}"),
                source,
            })
    }

    /// Sets the transmit queue length of interface `ifindex` (`ip link set dev X
    /// txqueuelen N`). On the TUN device this is how many packets the kernel holds for
    /// the agent to read before dropping; the default 500 overflows during TCP bursts
    /// and every drop costs the sender a retransmission.
    pub async fn set_txqueuelen(&self, ifindex: u32, len: u32) -> Result<(), NetlinkError> {
        let message = LinkUnspec::new_with_index(ifindex).txqueuelen(len).build();
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                what: format!("setting txqueuelen {len} on interface {ifindex}"),
                source,
            })
    }

    /// Brings interface `ifindex` up (`ip link set dev X up`); a link that is already up
    /// stays up.
    pub async fn set_up(&self, ifindex: u32) -> Result<(), NetlinkError> {
        let message = LinkUnspec::new_with_index(ifindex).up().build();
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                what: format!("bringing interface {ifindex} up"),
                source,
            })
    }

    /// Adds `address/prefix_len` to interface `ifindex` with `nodad`, so the address is
    /// usable at once instead of staying tentative during duplicate address detection
    /// (the overlay address is key-derived; nobody else on a TUN can hold it).
    ///
    /// Idempotent: the same address with the same prefix length already present is fine.
    /// The same address with another prefix length is [`NetlinkError::AddressConflict`].
    pub async fn add_address(
        &self,
        ifindex: u32,
        address: Ipv6Addr,
        prefix_len: u8,
    ) -> Result<(), NetlinkError> {
        check_prefix_len(address, prefix_len)?;
        let mut request = self
            .handle
            .address()
            .add(ifindex, IpAddr::V6(address), prefix_len);
        let message = request.message_mut();
        message.header.flags |= AddressHeaderFlags::Nodad;
        message
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        match request.execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => {
                let present = self.addresses(ifindex).await?;
                match present.iter().find(|(a, _)| *a == address) {
                    Some((_, len)) if *len == prefix_len => Ok(()),
                    Some((_, len)) => Err(NetlinkError::AddressConflict {
                        ifindex,
                        address,
                        existing: *len,
                        wanted: prefix_len,
                    }),
                    // EEXIST but not on this interface: the kernel's answer is the best
                    // explanation we have.
                    None => Err(NetlinkError::Request {
                        what: format!("adding {address}/{prefix_len} to interface {ifindex}"),
                        source: e,
                    }),
                }
            }
            Err(source) => Err(NetlinkError::Request {
                what: format!("adding {address}/{prefix_len} to interface {ifindex}"),
                source,
            }),
        }
    }

    /// The IPv6 addresses on interface `ifindex` with their prefix lengths, link-local
    /// ones included, in the kernel's order.
    pub async fn addresses(&self, ifindex: u32) -> Result<Vec<(Ipv6Addr, u8)>, NetlinkError> {
        let mut request = self.handle.address().get().set_link_index_filter(ifindex);
        request.message_mut().header.family = AddressFamily::Inet6;
        request.message_mut().header.index = ifindex;
        let messages: Vec<AddressMessage> =
            request
                .execute()
                .try_collect()
                .await
                .map_err(|source| NetlinkError::Request {
                    what: format!("listing addresses of interface {ifindex}"),
                    source,
                })?;
        Ok(messages
            .iter()
            .filter_map(|message| {
                // With a peer, IFA_LOCAL is ours and IFA_ADDRESS the peer's; without one
                // the kernel sends IFA_ADDRESS only.
                let local = message.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V6(v6)) => Some(*v6),
                    _ => None,
                });
                let address = message.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(IpAddr::V6(v6)) => Some(*v6),
                    _ => None,
                });
                local.or(address).map(|a| (a, message.header.prefix_len))
            })
            .collect())
    }

    /// Routes `dst/prefix_len` into interface `ifindex` in the main table
    /// (`ip -6 route replace dst/len dev X`). Host bits of `dst` are ignored.
    ///
    /// Idempotent: an existing route for the same prefix (same metric) is replaced, so
    /// it also moves a route that pointed elsewhere.
    pub async fn add_route(
        &self,
        dst: Ipv6Addr,
        prefix_len: u8,
        ifindex: u32,
    ) -> Result<(), NetlinkError> {
        check_prefix_len(dst, prefix_len)?;
        let prefix = addr::mask(dst, prefix_len);
        let route = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(prefix, prefix_len)
            .output_interface(ifindex)
            .build();
        self.handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                what: format!("adding route {prefix}/{prefix_len} dev {ifindex}"),
                source,
            })
    }

    /// Removes the route `dst/prefix_len` through interface `ifindex` from the main
    /// table, whoever installed it. Returns whether a route was removed: a missing route
    /// is not an error, so teardown can run twice.
    pub async fn del_route(
        &self,
        dst: Ipv6Addr,
        prefix_len: u8,
        ifindex: u32,
    ) -> Result<bool, NetlinkError> {
        check_prefix_len(dst, prefix_len)?;
        let prefix = addr::mask(dst, prefix_len);
        let mut route = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(prefix, prefix_len)
            .output_interface(ifindex)
            .build();
        // The kernel only deletes routes whose protocol matches a non-zero one; leave it
        // unspecified so routes added by `ip` (proto boot) go too.
        route.header.protocol = RouteProtocol::Unspec;
        match self.handle.route().del(route).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::ESRCH) => Ok(false),
            Err(source) => Err(NetlinkError::Request {
                what: format!("deleting route {prefix}/{prefix_len} dev {ifindex}"),
                source,
            }),
        }
    }

    /// Whether the kernel currently routes `address` as one of its own (`ip -6 route get`
    /// answers `local`), i.e. delivers packets for it instead of forwarding them.
    pub async fn is_local(&self, address: Ipv6Addr) -> Result<bool, NetlinkError> {
        // A strict-checked route get wants a bare header: family and /128 only.
        let mut query = RouteMessage::default();
        query.header.address_family = AddressFamily::Inet6;
        query.header.destination_prefix_length = 128;
        query
            .attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet6(address)));
        let mut routes = pin!(self.handle.route().get(query).execute());
        match routes.try_next().await {
            Ok(route) => Ok(route.is_some_and(|r| r.header.kind == RouteType::Local)),
            // No route at all (e.g. the link is down): certainly not local.
            Err(e) if matches!(errno(&e), Some(libc::ENETUNREACH | libc::EHOSTUNREACH)) => {
                Ok(false)
            }
            Err(source) => Err(NetlinkError::Request {
                what: format!("looking up the route to {address}"),
                source,
            }),
        }
    }

    /// Waits until the kernel delivers packets for `address` (added to `ifindex`) locally.
    ///
    /// Adding an IPv6 address returns before the kernel installs its local route: that
    /// happens on the address work queue, even with `nodad`. Until then a packet for the
    /// address arriving on the TUN is forwarded (and, with forwarding off, dropped), so
    /// whoever writes into the TUN right after configuring it must wait for this.
    pub async fn wait_address_ready(
        &self,
        ifindex: u32,
        address: Ipv6Addr,
        timeout: Duration,
    ) -> Result<(), NetlinkError> {
        let start = tokio::time::Instant::now();
        loop {
            if self.is_local(address).await? {
                return Ok(());
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(NetlinkError::AddressNotReady {
                    ifindex,
                    address,
                    waited,
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Configures the overlay TUN interface `ifindex`: MTU `mtu` (normally
    /// [`overlay_mtu`] of the underlay), a transmit queue of [`TUN_TXQUEUELEN`] packets,
    /// the node's address as `<node_address>/64`
    /// (its whole key-derived prefix, so the kernel's prefix route covers it), link up,
    /// and `fd6d::/16 dev <tun>` so every overlay destination goes to the agent.
    ///
    /// Returns once the kernel delivers packets for `node_address` (see
    /// [`Netlink::wait_address_ready`]), so the caller can start writing into the TUN.
    /// Idempotent, so the agent can call it again after a restart.
    pub async fn configure_tun(
        &self,
        ifindex: u32,
        node_address: Ipv6Addr,
        mtu: u32,
    ) -> Result<(), NetlinkError> {
        if !addr::is_overlay(&node_address) {
            return Err(NetlinkError::NotOverlay {
                address: node_address,
            });
        }
        if mtu < IPV6_MIN_MTU {
            return Err(NetlinkError::MtuTooSmall { ifindex, mtu });
        }
        self.set_mtu(ifindex, mtu).await?;
        self.set_txqueuelen(ifindex, TUN_TXQUEUELEN).await?;
        self.add_address(ifindex, node_address, addr::NODE_PREFIX_LEN)
            .await?;
        // Routes need the link up ("Nexthop device is not up" otherwise).
        self.set_up(ifindex).await?;
        self.add_route(addr::OVERLAY_NETWORK, addr::OVERLAY_PREFIX_LEN, ifindex)
            .await?;
        self.wait_address_ready(ifindex, node_address, ADDRESS_READY_TIMEOUT)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use myconet_testbed::netns::{Netns, unique_name};

    #[test]
    fn overhead_is_112_bytes() {
        assert_eq!(ENCAPSULATION_OVERHEAD, 112);
    }

    #[test]
    fn overlay_mtu_arithmetic() {
        assert_eq!(overlay_mtu(1500).ok(), Some(1388));
        assert_eq!(overlay_mtu(9000).ok(), Some(8888));
        assert_eq!(overlay_mtu(1392).ok(), Some(1280));
        for too_small in [0, 112, 1280, 1391] {
            match overlay_mtu(too_small) {
                Err(NetlinkError::UnderlayMtuTooSmall {
                    underlay_mtu,
                    needed,
                }) => {
                    assert_eq!(underlay_mtu, too_small);
                    assert_eq!(needed, 1392);
                }
                other => panic!("underlay MTU {too_small}: unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn connect_outside_runtime_is_an_error() {
        assert!(matches!(Netlink::connect(), Err(NetlinkError::NoRuntime)));
    }

    fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }

    /// Privileged: configures a link in a fresh namespace through this module and
    /// checks the result with iproute2.
    #[test]
    fn configures_link_in_namespace() -> anyhow::Result<()> {
        let ns = Netns::create(&unique_name("nl"))?;
        // A veth end stands in for the underlay/TUN link: dummy is not built into every
        // kernel (CI's has no modules), veth always is where the testbed runs.
        ns.ip([
            "link", "add", "myc0", "type", "veth", "peer", "name", "myc0p",
        ])?;
        let node: Ipv6Addr = "fd6d:1:2:3::1".parse()?;
        let extra: Ipv6Addr = "fd6d:aaaa::".parse()?;

        ns.run_in(|| {
            runtime()?.block_on(async {
                let nl = Netlink::connect()?;
                let index = nl.link_index("myc0").await?;
                assert!(matches!(
                    nl.link_index("nope0").await,
                    Err(NetlinkError::LinkNotFound { .. })
                ));
                assert!(matches!(
                    nl.underlay_mtu(999_999).await,
                    Err(NetlinkError::IndexNotFound { ifindex: 999_999 })
                ));
                assert!(matches!(
                    nl.configure_tun(index, "fe80::1".parse()?, 1388).await,
                    Err(NetlinkError::NotOverlay { .. })
                ));
                assert!(matches!(
                    nl.configure_tun(index, node, 1279).await,
                    Err(NetlinkError::MtuTooSmall { mtu: 1279, .. })
                ));

                let mtu = overlay_mtu(1500)?;
                // Twice: the second call must find everything in place and succeed.
                nl.configure_tun(index, node, mtu).await?;
                nl.configure_tun(index, node, mtu).await?;
                assert_eq!(nl.underlay_mtu(index).await?, 1388);
                assert!(nl.is_local(node).await?);
                assert!(!nl.is_local("fd6d:1:2:3::2".parse()?).await?);
                assert!(nl.addresses(index).await?.contains(&(node, 64)));
                assert!(matches!(
                    nl.add_address(index, node, 48).await,
                    Err(NetlinkError::AddressConflict {
                        existing: 64,
                        wanted: 48,
                        ..
                    })
                ));

                nl.add_route(extra, 32, index).await?;
                nl.add_route(extra, 32, index).await?;
                anyhow::Ok(index)
            })
        })??;

        let addrs = ns.ip(["-6", "addr", "show", "dev", "myc0"])?;
        let addrs = String::from_utf8_lossy(&addrs.stdout);
        assert!(addrs.contains("inet6 fd6d:1:2:3::1/64"), "{addrs}");
        assert!(addrs.contains("nodad"), "{addrs}");
        assert!(!addrs.contains("tentative"), "{addrs}");

        let routes = ns.ip(["-6", "route", "show"])?;
        let routes = String::from_utf8_lossy(&routes.stdout);
        assert!(routes.contains("fd6d::/16 dev myc0"), "{routes}");
        assert!(routes.contains("fd6d:aaaa::/32 dev myc0"), "{routes}");
        assert!(routes.contains("fd6d:1:2:3::/64 dev myc0"), "{routes}");

        let link = ns.ip(["link", "show", "dev", "myc0"])?;
        let link = String::from_utf8_lossy(&link.stdout);
        assert!(link.contains("mtu 1388"), "{link}");
        assert!(link.contains(",UP"), "{link}");

        // Deleting: once removes, twice reports nothing to remove.
        let removed = ns.run_in(|| {
            runtime()?.block_on(async {
                let nl = Netlink::connect()?;
                let index = nl.link_index("myc0").await?;
                let first = nl.del_route(extra, 32, index).await?;
                let second = nl.del_route(extra, 32, index).await?;
                anyhow::Ok((first, second))
            })
        })??;
        assert_eq!(removed, (true, false));
        let routes = ns.ip(["-6", "route", "show"])?;
        let routes = String::from_utf8_lossy(&routes.stdout);
        assert!(!routes.contains("fd6d:aaaa::/32"), "{routes}");
        assert!(routes.contains("fd6d::/16 dev myc0"), "{routes}");
        Ok(())
    }
}
