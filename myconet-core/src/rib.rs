//! The agent's routing information base: what the agent believes about every overlay
//! prefix. The kernel route map is a mirror of it (see `node`), and the userspace
//! forwarding path looks destinations up here with the same longest-prefix rule.

use std::{
    collections::BTreeMap,
    fmt,
    net::{Ipv6Addr, SocketAddrV6},
    str::FromStr,
};

use myconet_common::{
    addr::{self, OVERLAY_PREFIX_LEN},
    maps::{RouteAction, RouteValue},
};

/// Why a prefix string or value is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    /// Not of the form `addr/len`.
    #[error("not a prefix (expected ADDR/LEN, e.g. fd6d:1:2:3::/64): {0}")]
    Syntax(String),
    /// Length above 128.
    #[error("prefix length {0} is longer than 128")]
    Length(u8),
    /// Outside fd6d::/16 or shorter than it.
    #[error("{0} is not inside the overlay prefix fd6d::/16")]
    NotOverlay(String),
}

/// An overlay prefix, always stored with its host bits zeroed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    addr: Ipv6Addr,
    len: u8,
}

impl Prefix {
    /// Builds a prefix inside the overlay range, masking host bits.
    pub fn new(addr: Ipv6Addr, len: u8) -> Result<Self, PrefixError> {
        if len > 128 {
            return Err(PrefixError::Length(len));
        }
        if len < OVERLAY_PREFIX_LEN || !addr::is_overlay(&addr) {
            return Err(PrefixError::NotOverlay(format!("{addr}/{len}")));
        }
        Ok(Self {
            addr: addr::mask(addr, len),
            len,
        })
    }

    /// Network address.
    pub fn addr(&self) -> Ipv6Addr {
        self.addr
    }

    /// Length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether `addr` falls inside.
    pub fn contains(&self, addr: Ipv6Addr) -> bool {
        addr::prefix_contains(self.addr, self.len, addr)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Prefix {
    type Err = PrefixError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| PrefixError::Syntax(s.to_string()))?;
        let addr: Ipv6Addr = a.parse().map_err(|_| PrefixError::Syntax(s.to_string()))?;
        let len: u8 = l.parse().map_err(|_| PrefixError::Syntax(s.to_string()))?;
        Self::new(addr, len)
    }
}

/// Where a relay sends packets for a prefix on the underlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NextHop {
    /// Underlay address.
    pub addr: Ipv6Addr,
    /// Underlay UDP port.
    pub port: u16,
    /// Egress interface, 0 to let the underlay FIB choose.
    pub ifindex: u32,
}

impl NextHop {
    /// The UDP endpoint to send to.
    pub fn socket_addr(&self) -> SocketAddrV6 {
        SocketAddrV6::new(self.addr, self.port, 0, self.ifindex)
    }
}

/// What happens to packets for a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteTarget {
    /// This node owns the prefix.
    Local,
    /// Relay to a neighbour.
    Forward(NextHop),
}

impl RouteTarget {
    /// The kernel map value that encodes this target, leaving the underlay source
    /// address to the FIB (slower per packet; see [`RouteTarget::to_map_value_with_src`]).
    pub fn to_map_value(self) -> RouteValue {
        self.to_map_value_with_src(None)
    }

    /// The kernel map value with this node's underlay source address towards the next
    /// hop already resolved, so the XDP program need not ask the FIB for it.
    pub fn to_map_value_with_src(self, src: Option<Ipv6Addr>) -> RouteValue {
        let src = src.map(|a| a.octets()).unwrap_or([0; 16]);
        match self {
            RouteTarget::Local => RouteValue {
                next_hop: [0; 16],
                src: [0; 16],
                ifindex: 0,
                port: 0,
                action: RouteAction::Local as u8,
                reserved: 0,
            },
            RouteTarget::Forward(nh) => RouteValue {
                next_hop: nh.addr.octets(),
                src,
                ifindex: nh.ifindex,
                port: nh.port,
                action: RouteAction::Forward as u8,
                reserved: 0,
            },
        }
    }

    /// Decodes a kernel map value; `None` for an action this agent never writes.
    pub fn from_map_value(v: &RouteValue) -> Option<Self> {
        match RouteAction::from_u8(v.action)? {
            RouteAction::Local => Some(RouteTarget::Local),
            RouteAction::Forward => Some(RouteTarget::Forward(NextHop {
                addr: Ipv6Addr::from(v.next_hop),
                port: v.port,
                ifindex: v.ifindex,
            })),
        }
    }

    /// Name used by the API and the CLI.
    pub fn action_name(&self) -> &'static str {
        match self {
            RouteTarget::Local => "local",
            RouteTarget::Forward(_) => "forward",
        }
    }
}

/// Who put a route in the RIB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// The node's own prefix, derived from its key.
    Local,
    /// Added by an operator (gRPC, CLI or config file). Takes precedence over a
    /// routing-protocol route for the same prefix.
    Static,
    /// Selected by the routing protocol (`crate::routing`).
    Routing,
}

impl Origin {
    /// Name used by the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Local => "local",
            Origin::Static => "static",
            Origin::Routing => "routing",
        }
    }
}

/// One RIB entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RibEntry {
    /// Where packets go.
    pub target: RouteTarget,
    /// Who added it.
    pub origin: Origin,
}

/// The set of routes, with longest-prefix lookup.
#[derive(Debug, Default, Clone)]
pub struct Rib {
    routes: BTreeMap<Prefix, RibEntry>,
    /// How many routes exist at each prefix length, so lookups probe only lengths in use.
    lengths: BTreeMap<u8, usize>,
}

impl Rib {
    /// Adds or replaces a route, returning the previous entry.
    pub fn insert(&mut self, prefix: Prefix, entry: RibEntry) -> Option<RibEntry> {
        let old = self.routes.insert(prefix, entry);
        if old.is_none() {
            *self.lengths.entry(prefix.prefix_len()).or_default() += 1;
        }
        old
    }

    /// Removes a route.
    pub fn remove(&mut self, prefix: &Prefix) -> Option<RibEntry> {
        let old = self.routes.remove(prefix)?;
        if let Some(n) = self.lengths.get_mut(&prefix.prefix_len()) {
            *n -= 1;
            if *n == 0 {
                self.lengths.remove(&prefix.prefix_len());
            }
        }
        Some(old)
    }

    /// The entry for exactly this prefix.
    pub fn get(&self, prefix: &Prefix) -> Option<&RibEntry> {
        self.routes.get(prefix)
    }

    /// Longest-prefix match, as the kernel LPM trie does it.
    pub fn lookup(&self, addr: Ipv6Addr) -> Option<(Prefix, &RibEntry)> {
        for &len in self.lengths.keys().rev() {
            let probe = Prefix {
                addr: myconet_common::addr::mask(addr, len),
                len,
            };
            if let Some(e) = self.routes.get(&probe) {
                return Some((probe, e));
            }
        }
        None
    }

    /// Every route in prefix order.
    pub fn iter(&self) -> impl Iterator<Item = (&Prefix, &RibEntry)> {
        self.routes.iter()
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    fn fwd(last: u16) -> RibEntry {
        RibEntry {
            target: RouteTarget::Forward(NextHop {
                addr: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, last),
                port: 9651,
                ifindex: 0,
            }),
            origin: Origin::Static,
        }
    }

    #[test]
    fn longest_prefix_wins_and_removal_falls_back() {
        let mut rib = Rib::default();
        rib.insert(p("fd6d::/16"), fwd(1));
        rib.insert(p("fd6d:1:2:3::/64"), fwd(2));
        let a: Ipv6Addr = "fd6d:1:2:3::9".parse().unwrap();
        assert_eq!(rib.lookup(a).unwrap().1, &fwd(2));
        let b: Ipv6Addr = "fd6d:9::1".parse().unwrap();
        assert_eq!(rib.lookup(b).unwrap().1, &fwd(1));
        rib.remove(&p("fd6d:1:2:3::/64"));
        assert_eq!(rib.lookup(a).unwrap().1, &fwd(1));
        rib.remove(&p("fd6d::/16"));
        assert!(rib.lookup(a).is_none());
        assert!(rib.is_empty());
    }

    #[test]
    fn prefixes_are_masked_and_validated() {
        assert_eq!(p("fd6d:1:2:3:4::/64").to_string(), "fd6d:1:2:3::/64");
        assert!(matches!(
            "fd6d::/129".parse::<Prefix>(),
            Err(PrefixError::Length(129))
        ));
        assert!(matches!(
            "2001:db8::/64".parse::<Prefix>(),
            Err(PrefixError::NotOverlay(_))
        ));
        assert!(matches!(
            "fd6d::/8".parse::<Prefix>(),
            Err(PrefixError::NotOverlay(_))
        ));
        assert!(matches!(
            "fd6d::".parse::<Prefix>(),
            Err(PrefixError::Syntax(_))
        ));
        assert!(matches!(
            "nonsense/64".parse::<Prefix>(),
            Err(PrefixError::Syntax(_))
        ));
    }

    #[test]
    fn map_value_roundtrip() {
        for t in [RouteTarget::Local, fwd(7).target] {
            assert_eq!(RouteTarget::from_map_value(&t.to_map_value()), Some(t));
        }
    }
}
