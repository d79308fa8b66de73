//! Which interfaces the XDP program may send frames out of itself, and how.
//!
//! A frame the program redirects (or sends back with `XDP_TX`) is handed to the egress
//! driver's XDP transmit path; if that path cannot take it, the kernel drops the frame
//! *after* the program counted it as relayed. The case that bites is a veth whose far
//! end has neither an XDP program nor GRO (so no NAPI to receive on): every redirect
//! into it, and every `XDP_TX` out of it, is lost. The kernel says whether an interface
//! can take redirected frames in its XDP feature set (`NETDEV_XDP_ACT_NDO_XMIT`, read
//! over the `netdev` generic-netlink family, Linux 6.3+); for a veth that bit is the far
//! end's state, so it can be read from this end without entering the far end's
//! namespace. An egress the agent cannot prove safe is not a redirect (or, for a veth,
//! `XDP_TX`) target: its frames take `XDP_PASS` and the agent's userspace path, slower
//! but delivered.

use std::{ffi::CString, mem::size_of, os::fd::AsRawFd};

use crate::os::dataplane::AttachedMode;

/// `NETDEV_XDP_ACT_NDO_XMIT`: the driver accepts frames redirected to it.
pub const XDP_ACT_NDO_XMIT: u64 = 4;

/// What the program may do with frames leaving through one interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EgressPolicy {
    /// May redirect frames from other interfaces into it.
    pub redirect: bool,
    /// May send frames back out of it with `XDP_TX`.
    pub tx: bool,
}

/// What the agent knows about an attached interface's transmit side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EgressFacts {
    /// How the program is attached.
    pub mode: AttachedMode,
    /// Whether the driver is veth (XDP transmit needs the far end's NAPI).
    pub veth: bool,
    /// The kernel's XDP feature bits, if it reports them (`None` before Linux 6.3).
    pub xdp_features: Option<u64>,
}

impl EgressFacts {
    /// The policy these facts prove safe:
    /// - generic (skb) mode: `XDP_TX` goes through the ordinary transmit path and is
    ///   always safe; redirects into it are not made (frames routed there take the
    ///   slow path, as before);
    /// - driver mode: redirects only into a driver that reports `NDO_XMIT`; `XDP_TX`
    ///   too for a veth (it transmits into the far end like a redirect), always for
    ///   other drivers. Where the kernel reports no features, a veth is unproven
    ///   (slow path) and other drivers keep the old assumption (native XDP can take
    ///   redirects).
    pub fn policy(&self) -> EgressPolicy {
        let ndo_xmit = self.xdp_features.map(|f| f & XDP_ACT_NDO_XMIT != 0);
        match (self.mode, self.veth) {
            (AttachedMode::Generic, _) => EgressPolicy {
                redirect: false,
                tx: true,
            },
            (AttachedMode::Driver, true) => {
                let safe = ndo_xmit.unwrap_or(false);
                EgressPolicy {
                    redirect: safe,
                    tx: safe,
                }
            }
            (AttachedMode::Driver, false) => EgressPolicy {
                redirect: ndo_xmit.unwrap_or(true),
                tx: true,
            },
        }
    }
}

/// Reads the facts for interface `name` / `ifindex`, attached in `mode`.
pub fn facts(name: &str, ifindex: u32, mode: AttachedMode) -> EgressFacts {
    EgressFacts {
        mode,
        veth: driver_name(name).is_some_and(|d| d == "veth"),
        xdp_features: xdp_features(ifindex),
    }
}

/// The interface's driver name (`ethtool -i`), or `None` if it cannot be read.
pub fn driver_name(name: &str) -> Option<String> {
    const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    // SAFETY: all-zero is a valid DrvInfo.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    ethtool(name, &mut info)?;
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// Whether the interface computes UDP/TCP checksums of what this host sends on it
/// (`ethtool -k`: `tx-checksumming`), or `None` if it cannot be read. On a veth it is
/// on by default, and then the kernel leaves the checksums of this host's datagrams
/// *partial* (the receiver's stack trusts the skb's state): whatever relays them in
/// driver-mode XDP must complete them, see `myconet_common::maps::Stat::CsumPartial`.
pub fn tx_checksum_offload(name: &str) -> Option<bool> {
    const ETHTOOL_GTXCSUM: u32 = 0x0000_0016;
    #[repr(C)]
    struct Value {
        cmd: u32,
        data: u32,
    }
    let mut value = Value {
        cmd: ETHTOOL_GTXCSUM,
        data: 0,
    };
    ethtool(name, &mut value)?;
    Some(value.data != 0)
}

/// One `SIOCETHTOOL` request on interface `name`; `request` is the command's struct,
/// starting with its `cmd` word. `None` if the call fails.
fn ethtool<T>(name: &str, request: &mut T) -> Option<()> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    let cname = CString::new(name).ok()?;
    let bytes = cname.as_bytes_with_nul();
    if bytes.len() > libc::IFNAMSIZ {
        return None;
    }
    let socket = std::net::UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, 0)).ok()?;
    // SAFETY: all-zero is a valid ifreq.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (request as *mut T).cast();
    // SAFETY: SIOCETHTOOL with an ifreq naming the interface and pointing at the
    // command's struct, which outlives the call.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCETHTOOL, &mut ifr) };
    (rc == 0).then_some(())
}

// Generic netlink, just enough for one request of the `netdev` family.
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// The XDP feature bits of interface `ifindex` from the kernel's `netdev` family, or
/// `None` when the kernel does not have it (before Linux 6.3) or the request fails.
pub fn xdp_features(ifindex: u32) -> Option<u64> {
    let socket = GenlSocket::open()?;
    let family = socket.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, &{
        let mut a = Vec::new();
        put_attr(&mut a, CTRL_ATTR_FAMILY_NAME, b"netdev\0");
        a
    })?;
    let family = attr(&family, CTRL_ATTR_FAMILY_ID)
        .and_then(|v| Some(u16::from_ne_bytes(v.get(..2)?.try_into().ok()?)))?;
    let dev = socket.request(family, NETDEV_CMD_DEV_GET, &{
        let mut a = Vec::new();
        put_attr(&mut a, NETDEV_A_DEV_IFINDEX, &ifindex.to_ne_bytes());
        a
    })?;
    attr(&dev, NETDEV_A_DEV_XDP_FEATURES)
        .and_then(|v| Some(u64::from_ne_bytes(v.get(..8)?.try_into().ok()?)))
}

struct GenlSocket(std::os::fd::OwnedFd);

impl GenlSocket {
    fn open() -> Option<Self> {
        // SAFETY: plain socket(2) call; the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return None;
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: valid fd and option value of the size passed.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        Some(Self(fd))
    }

    /// Sends one request and returns the attributes of its answer.
    fn request(&self, family: u16, cmd: u8, attrs: &[u8]) -> Option<Vec<u8>> {
        let len = 16 + 4 + attrs.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&family.to_ne_bytes());
        msg.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel assigns it
        msg.extend_from_slice(&[cmd, 1, 0, 0]); // genlmsghdr: cmd, version, reserved
        msg.extend_from_slice(attrs);
        // SAFETY: valid fd and buffer.
        let sent = unsafe { libc::send(self.0.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent != msg.len() as isize {
            return None;
        }
        let mut buf = vec![0u8; 8192];
        // SAFETY: valid fd and buffer of the size passed.
        let got = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let got = usize::try_from(got).ok()?;
        let reply = buf.get(..got)?;
        let msg_len = u32::from_ne_bytes(reply.get(..4)?.try_into().ok()?) as usize;
        let msg_type = u16::from_ne_bytes(reply.get(4..6)?.try_into().ok()?);
        if msg_type == NLMSG_ERROR || msg_len > reply.len() || msg_len < 20 {
            return None;
        }
        Some(reply.get(20..msg_len)?.to_vec())
    }
}

fn put_attr(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(out.len() + (4 - len % 4) % 4, 0);
}

/// The value of the first attribute of type `kind` in `attrs`; bad lengths end the
/// walk instead of panicking.
fn attr(attrs: &[u8], kind: u16) -> Option<&[u8]> {
    let mut rest = attrs;
    while rest.len() >= 4 {
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let t = u16::from_ne_bytes([rest[2], rest[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > rest.len() {
            return None;
        }
        if t == kind {
            return rest.get(4..len);
        }
        let padded = (len + 3) & !3;
        rest = rest.get(padded.min(rest.len())..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_follow_mode_driver_and_features() {
        let f = |mode, veth, xdp_features| {
            EgressFacts {
                mode,
                veth,
                xdp_features,
            }
            .policy()
        };
        let both = EgressPolicy {
            redirect: true,
            tx: true,
        };
        let none = EgressPolicy::default();
        let tx_only = EgressPolicy {
            redirect: false,
            tx: true,
        };
        use AttachedMode::{Driver, Generic};
        assert_eq!(f(Driver, true, Some(1 | 2 | 4)), both);
        assert_eq!(
            f(Driver, true, Some(1 | 2)),
            none,
            "veth far end without NAPI"
        );
        assert_eq!(f(Driver, true, None), none, "unproven veth");
        assert_eq!(f(Driver, false, Some(1 | 2 | 4)), both);
        assert_eq!(f(Driver, false, Some(1 | 2)), tx_only);
        assert_eq!(f(Driver, false, None), both);
        assert_eq!(f(Generic, true, Some(7)), tx_only);
        assert_eq!(f(Generic, false, None), tx_only);
    }

    #[test]
    fn attributes_are_walked_safely() {
        let mut a = Vec::new();
        put_attr(&mut a, 1, &7u32.to_ne_bytes());
        put_attr(&mut a, 3, &9u64.to_ne_bytes());
        assert_eq!(attr(&a, 3), Some(&9u64.to_ne_bytes()[..]));
        assert_eq!(attr(&a, 1), Some(&7u32.to_ne_bytes()[..]));
        assert_eq!(attr(&a, 2), None);
        assert_eq!(attr(&a[..5], 3), None, "truncated");
        assert_eq!(attr(&[0, 0, 1, 0], 1), None, "zero length");
    }

    /// Privileged: a veth whose far end has neither XDP nor GRO cannot take redirects;
    /// with GRO on the far end it can. Its TX checksum offload is read as set.
    #[test]
    fn veth_ndo_xmit_follows_the_far_end() -> anyhow::Result<()> {
        use myconet_testbed::netns::{Netns, unique_name};
        let ns = Netns::create(&unique_name("egress"))?;
        ns.ip(["link", "add", "e0", "type", "veth", "peer", "name", "e1"])?;
        ns.ip(["link", "set", "e0", "up"])?;
        ns.ip(["link", "set", "e1", "up"])?;
        ns.exec("ethtool", ["-K", "e1", "gro", "off"])?;
        let probe = || {
            ns.run_in(|| {
                let index = crate::os::dataplane::ifindex("e0").ok()?;
                Some((driver_name("e0")?, xdp_features(index)?))
            })
        };
        let (driver, features) = probe()?.ok_or_else(|| anyhow::anyhow!("no answer"))?;
        assert_eq!(driver, "veth");
        // A stock veth offloads TX checksums; `ethtool -K … tx off` is read back.
        let tx_csum = || ns.run_in(|| tx_checksum_offload("e0"));
        assert_eq!(tx_csum()?, Some(true));
        ns.exec("ethtool", ["-K", "e0", "tx", "off"])?;
        assert_eq!(tx_csum()?, Some(false));
        assert_eq!(features & XDP_ACT_NDO_XMIT, 0, "{features:#x}");
        ns.exec("ethtool", ["-K", "e1", "gro", "on"])?;
        let (_, features) = probe()?.ok_or_else(|| anyhow::anyhow!("no answer"))?;
        assert_ne!(features & XDP_ACT_NDO_XMIT, 0, "{features:#x}");
        Ok(())
    }
}
