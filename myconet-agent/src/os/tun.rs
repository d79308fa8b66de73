//! The overlay's TUN device: where the local host's IPv6 packets for `fd6d::/16` leave the
//! kernel towards the agent, and where packets that arrived over the overlay re-enter it.
//!
//! The device is opened with raw ioctls (no tun crate) so the agent controls
//! `IFF_VNET_HDR` and `TUNSETOFFLOAD` itself. With offload on, every packet crossing the
//! TUN carries a 10-byte `virtio_net_hdr` and the kernel may:
//!
//! - hand us TCP (and, if accepted, UDP) "superpackets" of up to 64 KiB with one header
//!   plus `gso_size`, and packets whose transport checksum is only partially computed
//!   (`NEEDS_CSUM`): [`split_gso`] turns those into ordinary wire-ready IPv6 packets;
//! - accept such superpackets from us: [`Coalescer`] merges consecutive in-order TCP
//!   segments of one flow that arrived over the overlay into one superpacket, so a whole
//!   window of data enters the kernel's TCP stack in one `write` instead of forty.
//!
//! Both cut the per-packet syscall and stack cost that otherwise bounds TCP throughput
//! over a userspace tunnel. Without offload, packets cross the TUN unchanged.
//!
//! The `virtio_net_hdr` is in the host's byte order: the legacy header the TUN driver
//! uses is little-endian exactly when the host is, and we never switch that with
//! `TUNSETVNETLE`/`TUNSETVNETBE`.

use std::collections::HashMap;
use std::ffi::c_char;
use std::fs::OpenOptions;
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use myconet_common::checksum::{fold, sum_bytes};
use tokio::io::unix::AsyncFd;

/// The agent's default TUN name.
pub const DEFAULT_NAME: &str = "myconet0";

/// Longest interface name the kernel takes (`IFNAMSIZ` minus the terminating NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Length of the legacy `virtio_net_hdr` prepended to every packet when offload is on.
pub const VNET_HDR_LEN: usize = 10;

/// Largest IPv6 packet (fixed header + maximal payload length) without jumbograms.
pub const MAX_PACKET_LEN: usize = IPV6_HEADER_LEN + u16::MAX as usize;

/// A receive buffer of this size holds any packet the TUN can hand over, a 64 KiB
/// superpacket with its `virtio_net_hdr` included; the TUN truncates into smaller ones.
pub const RECV_BUFFER_LEN: usize = VNET_HDR_LEN + MAX_PACKET_LEN;

const IPV6_HEADER_LEN: usize = 40;
const TCP_HEADER_MIN_LEN: usize = 20;
const UDP_HEADER_LEN: usize = 8;
const NEXT_HEADER_TCP: u8 = 6;
const NEXT_HEADER_UDP: u8 = 17;
const TCP_CHECKSUM_OFFSET: usize = 16;
const UDP_CHECKSUM_OFFSET: usize = 6;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;
const TCP_ECE: u8 = 0x40;
const TCP_CWR: u8 = 0x80;

/// How to open the TUN device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunOptions {
    /// Turn on `IFF_VNET_HDR` and checksum/segmentation offload, so TCP moves in 64 KiB
    /// superpackets across the TUN (see the module docs). Every packet then carries a
    /// `virtio_net_hdr`: use [`split_gso`] after [`Tun::recv`] and a [`Coalescer`]
    /// before [`Tun::send`].
    pub offload: bool,
    /// Open with `IFF_MULTI_QUEUE`, so [`Tun::clone_queue`] can add queues that separate
    /// tasks or threads read and write in parallel (the kernel spreads flows by hash).
    pub multi_queue: bool,
}

/// Offload features the kernel accepted through `TUNSETOFFLOAD` (`TUN_F_*` bits).
///
/// Recorded because the kernel only hands over what it accepted: a kernel without UDP
/// segmentation offload never produces `GSO_UDP_L4` packets, and the agent can say so.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OffloadFlags(u32);

impl OffloadFlags {
    /// The kernel may leave transport checksums to us (`NEEDS_CSUM`) and trusts ours.
    pub const CSUM: Self = Self(libc::TUN_F_CSUM);
    /// TCP over IPv6 segmentation offload (`GSO_TCPV6` superpackets both ways).
    pub const TSO6: Self = Self(libc::TUN_F_TSO6);
    /// UDP segmentation offload for IPv4 (the kernel only accepts it together with
    /// [`Self::USO6`]; the overlay never routes IPv4 into the TUN).
    pub const USO4: Self = Self(libc::TUN_F_USO4);
    /// UDP segmentation offload for IPv6 (`GSO_UDP_L4` superpackets).
    pub const USO6: Self = Self(libc::TUN_F_USO6);

    /// The raw `TUN_F_*` bits, as passed to `TUNSETOFFLOAD`.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// The union of both sets.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

impl std::fmt::Display for OffloadFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = [
            (Self::CSUM, "csum"),
            (Self::TSO6, "tso6"),
            (Self::USO4, "uso4"),
            (Self::USO6, "uso6"),
        ];
        let mut first = true;
        for (flag, name) in names {
            if self.contains(flag) {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

/// Offload sets tried in order: TCP + UDP segmentation first, then TCP only, so older
/// kernels (no USO, before 6.2) still get the TCP fast path.
const OFFLOAD_ATTEMPTS: [OffloadFlags; 2] = [
    OffloadFlags::CSUM
        .union(OffloadFlags::TSO6)
        .union(OffloadFlags::USO4)
        .union(OffloadFlags::USO6),
    OffloadFlags::CSUM.union(OffloadFlags::TSO6),
];

/// What can go wrong while opening or configuring the TUN device.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// The interface name is not one the kernel accepts.
    #[error("invalid TUN name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `/dev/net/tun` could not be opened (no `tun` module, no permission, no device
    /// node in this container).
    #[error("opening /dev/net/tun for {name:?} failed")]
    Open {
        /// The interface name.
        name: String,
        /// The open error.
        #[source]
        source: io::Error,
    },
    /// An ioctl on the TUN file descriptor failed.
    #[error("{op} on TUN {name:?} failed")]
    Ioctl {
        /// The interface name.
        name: String,
        /// Which ioctl, with its argument.
        op: String,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// The device was created outside a tokio runtime, which its async I/O needs.
    #[error("TUN {name:?} needs a tokio runtime: create it from inside one")]
    NoRuntime {
        /// The interface name.
        name: String,
    },
    /// Registering the descriptor with tokio's reactor failed.
    #[error("registering TUN {name:?} with the tokio reactor failed")]
    Register {
        /// The interface name.
        name: String,
        /// The epoll error.
        #[source]
        source: io::Error,
    },
    /// [`Tun::clone_queue`] on a device opened without [`TunOptions::multi_queue`].
    #[error("TUN {name:?} was not opened multi-queue; cannot add a queue")]
    NotMultiQueue {
        /// The interface name.
        name: String,
    },
}

/// One queue of an open TUN device with tokio-driven non-blocking I/O.
///
/// The interface exists while at least one queue is open and disappears with the last
/// one (it is never made persistent), so a crashed agent leaves no device behind.
#[derive(Debug)]
pub struct Tun {
    fd: AsyncFd<OwnedFd>,
    name: String,
    ifr_flags: libc::c_short,
    offload: Option<OffloadFlags>,
}

fn validate_name(name: &str) -> Result<(), TunError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("it is longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("\".\" and \"..\" are reserved")
    } else if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        Some("it contains '/', ':', NUL or whitespace")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(TunError::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

fn ioctl_error(name: &str, op: impl Into<String>) -> TunError {
    TunError::Ioctl {
        name: name.to_owned(),
        op: op.into(),
        source: io::Error::last_os_error(),
    }
}

/// Opens `/dev/net/tun` and attaches it to interface `name` (created if missing).
/// Returns the descriptor and the name the kernel reports back.
fn open_queue(name: &str, ifr_flags: libc::c_short) -> Result<(OwnedFd, String), TunError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|source| TunError::Open {
            name: name.to_owned(),
            source,
        })?;
    let fd = OwnedFd::from(file);

    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as c_char;
    }
    ifr.ifr_ifru.ifru_flags = ifr_flags;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `ifr` is, for the
    // duration of the call; `fd` is an open /dev/net/tun descriptor.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &raw mut ifr) };
    if rc < 0 {
        return Err(ioctl_error(
            name,
            format!("TUNSETIFF (flags {ifr_flags:#06x})"),
        ));
    }
    let actual: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok((fd, String::from_utf8_lossy(&actual).into_owned()))
}

fn set_vnet_hdr_len(fd: RawFd, name: &str) -> Result<(), TunError> {
    let len = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer during the call.
    let rc = unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &raw const len) };
    if rc < 0 {
        return Err(ioctl_error(name, format!("TUNSETVNETHDRSZ {VNET_HDR_LEN}")));
    }
    Ok(())
}

fn set_offload(fd: RawFd, flags: OffloadFlags) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long).
    let rc = unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(flags.bits())) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Tries [`OFFLOAD_ATTEMPTS`] in order and returns the first set the kernel accepts.
fn negotiate_offload(fd: RawFd, name: &str) -> Result<OffloadFlags, TunError> {
    let mut last = None;
    for flags in OFFLOAD_ATTEMPTS {
        match set_offload(fd, flags) {
            Ok(()) => return Ok(flags),
            Err(e) => last = Some((flags, e)),
        }
    }
    let (flags, source) = last.unwrap_or_else(|| {
        (
            OffloadFlags::default(),
            io::Error::from(io::ErrorKind::Unsupported),
        )
    });
    Err(TunError::Ioctl {
        name: name.to_owned(),
        op: format!("TUNSETOFFLOAD {flags}"),
        source,
    })
}

fn register(fd: OwnedFd, name: &str) -> Result<AsyncFd<OwnedFd>, TunError> {
    // SAFETY: the AsyncFd takes ownership of the OwnedFd, which keeps the descriptor
    // open and returns the same number from as_raw_fd until the AsyncFd drops it.
    unsafe { AsyncFd::register(fd) }.map_err(|error| TunError::Register {
        name: name.to_owned(),
        source: io::Error::from(error),
    })
}

impl Tun {
    /// Creates (or attaches to) TUN interface `name` ([`DEFAULT_NAME`] for the agent):
    /// `IFF_TUN | IFF_NO_PI`, plus `IFF_VNET_HDR` and offload negotiation when
    /// `options.offload`, plus `IFF_MULTI_QUEUE` when `options.multi_queue`.
    ///
    /// Must be called inside a tokio runtime (the descriptor is registered with its
    /// reactor). The kernel may rename a `%d` pattern; [`Tun::name`] has the real name.
    pub fn create(name: &str, options: TunOptions) -> Result<Tun, TunError> {
        validate_name(name)?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(TunError::NoRuntime {
                name: name.to_owned(),
            });
        }
        let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
        if options.offload {
            flags |= libc::IFF_VNET_HDR;
        }
        if options.multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        // The IFF_* values all fit the 16-bit ifr_flags field.
        let ifr_flags = flags as libc::c_short;
        let (fd, actual) = open_queue(name, ifr_flags)?;
        let offload = if options.offload {
            set_vnet_hdr_len(fd.as_raw_fd(), &actual)?;
            Some(negotiate_offload(fd.as_raw_fd(), &actual)?)
        } else {
            None
        };
        let fd = register(fd, &actual)?;
        Ok(Tun {
            fd,
            name: actual,
            ifr_flags,
            offload,
        })
    }

    /// Opens another queue of this multi-queue device, with the same flags and offload
    /// settings, for a second reader/writer task; flows are spread over queues by hash.
    pub fn clone_queue(&self) -> Result<Tun, TunError> {
        if self.ifr_flags & libc::IFF_MULTI_QUEUE as libc::c_short == 0 {
            return Err(TunError::NotMultiQueue {
                name: self.name.clone(),
            });
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(TunError::NoRuntime {
                name: self.name.clone(),
            });
        }
        let (fd, name) = open_queue(&self.name, self.ifr_flags)?;
        if let Some(flags) = self.offload {
            // Both are per device today; setting them again is harmless and keeps this
            // queue right should the kernel ever make them per queue.
            set_vnet_hdr_len(fd.as_raw_fd(), &name)?;
            set_offload(fd.as_raw_fd(), flags).map_err(|source| TunError::Ioctl {
                name: name.clone(),
                op: format!("TUNSETOFFLOAD {flags}"),
                source,
            })?;
        }
        let fd = register(fd, &name)?;
        Ok(Tun {
            fd,
            name,
            ifr_flags: self.ifr_flags,
            offload: self.offload,
        })
    }

    /// The interface name the kernel gave the device, for netlink configuration.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The offload features the kernel accepted, or `None` when offload is off. When
    /// `Some`, every packet read or written carries a [`VNET_HDR_LEN`]-byte header.
    pub fn offload(&self) -> Option<OffloadFlags> {
        self.offload
    }

    /// Reads one packet (with its `virtio_net_hdr` when offload is on) into `buf`.
    /// Use a [`RECV_BUFFER_LEN`] buffer: the kernel truncates packets that do not fit.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            let result = guard.try_io(|fd| {
                // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match result {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Reads one more packet if one is waiting, without waiting: `Ok(None)` when the
    /// queue is empty. Lets the reader drain a burst into one batch (one session lookup,
    /// one `sendmmsg`) after [`Tun::recv`] returned.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes; the descriptor is
        // non-blocking, so this never waits. Readiness is left to `recv`, which clears it
        // on its next EAGAIN.
        let n = unsafe {
            libc::read(
                self.fd.get_ref().as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            Ok(None)
        } else {
            Err(e)
        }
    }

    /// Writes one packet (with its `virtio_net_hdr` when offload is on) into the
    /// kernel, which delivers or routes it as if it had arrived on a network card.
    pub async fn send(&self, packet: &[u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.writable().await?;
            let result = guard.try_io(|fd| {
                // SAFETY: `packet` is valid for reads of `packet.len()` bytes.
                let n =
                    unsafe { libc::write(fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match result {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsFd for Tun {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

// ---------------------------------------------------------------------------------------
// virtio_net_hdr, segmentation and coalescing. Pure functions, no I/O.
// ---------------------------------------------------------------------------------------

/// The legacy `virtio_net_hdr` the TUN device prepends/expects with `IFF_VNET_HDR`:
/// it says whether a packet is a superpacket (and how to cut it) and whether its
/// transport checksum still has to be completed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    /// `F_NEEDS_CSUM` / `F_DATA_VALID`.
    pub flags: u8,
    /// `GSO_*`, possibly with `GSO_ECN`.
    pub gso_type: u8,
    /// Length of the headers (a hint; never trusted here).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where the checksummed region (the transport header) starts.
    pub csum_start: u16,
    /// Where, counted from `csum_start`, the checksum field sits.
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    /// The transport checksum holds only the pseudo-header sum; complete it over
    /// `csum_start..`.
    pub const F_NEEDS_CSUM: u8 = 1;
    /// The checksum was already verified.
    pub const F_DATA_VALID: u8 = 2;
    /// Not a superpacket.
    pub const GSO_NONE: u8 = 0;
    /// TCP over IPv4 superpacket (never accepted here: the overlay is IPv6-only).
    pub const GSO_TCPV4: u8 = 1;
    /// UDP fragmentation offload (obsolete, not supported).
    pub const GSO_UDP: u8 = 3;
    /// TCP over IPv6 superpacket.
    pub const GSO_TCPV6: u8 = 4;
    /// UDP segmentation offload superpacket.
    pub const GSO_UDP_L4: u8 = 5;
    /// Flag bit: the TCP superpacket has CWR set (ECN).
    pub const GSO_ECN: u8 = 0x80;

    /// Parses the header from the first [`VNET_HDR_LEN`] bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self, GsoError> {
        let Some(b) = bytes.get(..VNET_HDR_LEN) else {
            return Err(GsoError::Truncated {
                what: "virtio_net_hdr",
                need: VNET_HDR_LEN,
                have: bytes.len(),
            });
        };
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Ok(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    /// The header's wire form.
    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }
}

/// Why a packet read from the TUN could not be split. The packet is dropped; these
/// come from the local kernel, so one is a bug worth logging, not an attack.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GsoError {
    /// Shorter than a header it must contain.
    #[error("packet too short for its {what}: need {need} bytes, have {have}")]
    Truncated {
        /// Which header.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// A superpacket that is not IPv6.
    #[error("segmentation offload packet is IP version {version}, not 6")]
    NotIpv6 {
        /// The version nibble.
        version: u8,
    },
    /// IPv6 payload length and packet length disagree.
    #[error("IPv6 payload length {payload_len} does not match the {actual} bytes after the header")]
    LengthMismatch {
        /// The header's payload length.
        payload_len: usize,
        /// Bytes actually following the IPv6 header.
        actual: usize,
    },
    /// A `gso_type` we do not handle (IPv4, UFO, unknown).
    #[error("unsupported virtio_net_hdr gso_type {gso_type:#04x}")]
    UnsupportedGsoType {
        /// The raw value.
        gso_type: u8,
    },
    /// The superpacket's next header is not the transport its `gso_type` names (or an
    /// extension header precedes it).
    #[error("gso_type {gso_type:#04x} on a packet with next header {next_header}")]
    TransportMismatch {
        /// The raw gso_type.
        gso_type: u8,
        /// The IPv6 next header.
        next_header: u8,
    },
    /// `gso_size` zero on a superpacket.
    #[error("superpacket with gso_size 0")]
    ZeroGsoSize,
    /// TCP data offset below 20 bytes or past the packet.
    #[error("TCP header length {len} is invalid for a {packet_len}-byte packet")]
    BadTcpHeaderLen {
        /// Header length from the data offset.
        len: usize,
        /// Packet length.
        packet_len: usize,
    },
    /// `csum_start`/`csum_offset` point outside the packet or at the wrong field.
    #[error(
        "checksum start {csum_start} + offset {csum_offset} is invalid for a {packet_len}-byte packet"
    )]
    BadChecksumOffset {
        /// The header's csum_start.
        csum_start: u16,
        /// The header's csum_offset.
        csum_offset: u16,
        /// Packet length.
        packet_len: usize,
    },
}

/// An arena of packets: one contiguous buffer plus ranges, reused across batches.
///
/// A 64 KiB superpacket splits into ~50 packets; a `Vec<Vec<u8>>` would allocate for
/// each one on every read, while this arena stops allocating once it has grown to the
/// largest batch seen. Each packet can also get `headroom` bytes in front and
/// `tailroom` bytes behind it, so the agent can prepend the outer headers and append the
/// AEAD tag in place without copying the packet again.
///
/// The buffer never shrinks and is only zero-filled where it grows: clearing moves the
/// end of the batch back to the start, and later packets are written over what earlier
/// batches left (a profile of the sender showed the zero-fill of every slot before
/// the copy into it at 1–2 % of the machine). So head- and tailroom hold stale bytes
/// until whoever uses them writes them, as sealing does.
#[derive(Debug, Clone, Default)]
pub struct PacketBatch {
    buf: Vec<u8>,
    /// End of the last slot in `buf`; `buf` beyond it is spare.
    end: usize,
    packets: Vec<Range<usize>>,
    headroom: usize,
    tailroom: usize,
}

impl PacketBatch {
    /// An empty batch with no head- or tailroom.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty batch whose packets get `headroom` spare bytes in front and `tailroom`
    /// behind (see [`PacketBatch::slot_mut`]).
    pub fn with_room(headroom: usize, tailroom: usize) -> Self {
        Self {
            headroom,
            tailroom,
            ..Self::default()
        }
    }

    /// Forgets every packet but keeps the memory for the next batch.
    pub fn clear(&mut self) {
        self.end = 0;
        self.packets.clear();
    }

    /// Number of packets.
    pub fn len(&self) -> usize {
        self.packets.len()
    }

    /// Whether there are no packets.
    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    /// Packet `index`.
    pub fn get(&self, index: usize) -> Option<&[u8]> {
        self.packets.get(index).map(|r| &self.buf[r.clone()])
    }

    /// Packet `index`, writable.
    pub fn get_mut(&mut self, index: usize) -> Option<&mut [u8]> {
        let range = self.packets.get(index)?.clone();
        Some(&mut self.buf[range])
    }

    /// Packet `index` with its head- and tailroom: the whole slot, and where the
    /// packet sits inside it.
    pub fn slot_mut(&mut self, index: usize) -> Option<(&mut [u8], Range<usize>)> {
        let range = self.packets.get(index)?.clone();
        let start = range.start - self.headroom;
        let end = range.end + self.tailroom;
        Some((
            &mut self.buf[start..end],
            self.headroom..self.headroom + range.len(),
        ))
    }

    /// Packet `index` with its head- and tailroom, read-only: after sealing in place
    /// (see [`PacketBatch::slots_mut`]) the slot is the whole datagram.
    pub fn slot(&self, index: usize) -> Option<&[u8]> {
        let range = self.packets.get(index)?;
        self.buf
            .get(range.start - self.headroom..range.end + self.tailroom)
    }

    /// The slots (packet with head- and tailroom) of packets `indices`, writable and in
    /// order; indices past the end are skipped. The session layer seals a run of them in
    /// place under one lock.
    pub fn slots_mut(&mut self, indices: Range<usize>) -> impl Iterator<Item = &mut [u8]> + '_ {
        let (headroom, tailroom) = (self.headroom, self.tailroom);
        let end = indices.end.min(self.packets.len());
        let ranges = &self.packets[indices.start.min(end)..end];
        let mut rest: &mut [u8] = &mut self.buf;
        let mut offset = 0;
        ranges.iter().filter_map(move |r| {
            // Slots are disjoint and in increasing order, so each lies after the last.
            let start = r.start - headroom - offset;
            let len = r.len() + headroom + tailroom;
            let taken = std::mem::take(&mut rest);
            let (_, tail) = taken.split_at_mut_checked(start)?;
            let (slot, tail) = tail.split_at_mut_checked(len)?;
            rest = tail;
            offset = r.end + tailroom;
            Some(slot)
        })
    }

    /// The packets in order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.packets.iter().map(|r| &self.buf[r.clone()])
    }

    /// Appends a copy of `packet`.
    pub fn push(&mut self, packet: &[u8]) {
        self.alloc(packet.len()).copy_from_slice(packet);
    }

    /// Appends a packet of `len` bytes and returns it for the caller to fill in
    /// completely: it holds whatever an earlier batch left there.
    fn alloc(&mut self, len: usize) -> &mut [u8] {
        let start = self.end + self.headroom;
        let end = start + len;
        self.end = end + self.tailroom;
        if self.buf.len() < self.end {
            self.buf.resize(self.end, 0);
        }
        self.packets.push(start..end);
        &mut self.buf[start..end]
    }
}

/// The 16-bit one's-complement sum of `data` (as [`sum_bytes`], folded to at most
/// 0xffff): every packet crossing the TUN gets its TCP checksum computed or verified
/// here, and the byte-pair loop was the agent's largest userspace cost after the copies.
///
/// It adds native-order 32-bit words into four independent 64-bit accumulators, 16
/// bytes per step (each addend is below 2^32, so no carry is lost before 2^32 steps),
/// and swaps the folded result to network order at the end: RFC 1071 §2 (B) and (C),
/// the sum is byte-order independent and can be taken over wider words.
fn fast_sum(data: &[u8]) -> u32 {
    let word = |b: &[u8]| -> u64 {
        let mut w = [0u8; 4];
        w.copy_from_slice(b);
        u64::from(u32::from_ne_bytes(w))
    };
    let mut acc = [0u64; 4];
    let mut blocks = data.chunks_exact(16);
    for block in &mut blocks {
        acc[0] += word(&block[0..4]);
        acc[1] += word(&block[4..8]);
        acc[2] += word(&block[8..12]);
        acc[3] += word(&block[12..16]);
    }
    let rest = blocks.remainder();
    let mut words = rest.chunks_exact(4);
    for w in &mut words {
        acc[0] += word(w);
    }
    let mut sum = acc[0] + acc[1] + acc[2] + acc[3];
    // The last 0–3 bytes as native-order 16-bit words, a lone byte padded with zero.
    let tail = words.remainder();
    let mut pairs = tail.chunks_exact(2);
    for p in &mut pairs {
        sum += u64::from(u16::from_ne_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        // Padded with a zero byte after it, as in network order.
        sum += u64::from(u16::from_ne_bytes([*last, 0]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // `sum` now fits 16 bits: back from native to network byte order.
    u32::from(u16::from_be_bytes((sum as u16).to_ne_bytes()))
}

/// The IPv6 pseudo-header sum (RFC 8200 §8.1) for an upper-layer packet of `len` bytes.
fn pseudo_header_sum(ip: &[u8], next_header: u8, len: usize) -> u32 {
    let len = len as u32;
    sum_bytes(&ip[8..40]) + (len >> 16) + (len & 0xffff) + u32::from(next_header)
}

/// The checksum to store for a region whose one's-complement sum (checksum field zero
/// or holding the pseudo-header sum) is `sum`. Zero is sent as `0xffff`, as the kernel
/// does: the same value in one's complement, and mandatory for UDP over IPv6.
fn finish_checksum(sum: u32) -> u16 {
    match !fold(sum) {
        0 => 0xffff,
        c => c,
    }
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Checks the fixed IPv6 header of a superpacket and returns its next header.
fn parse_ipv6(packet: &[u8]) -> Result<u8, GsoError> {
    if packet.len() < IPV6_HEADER_LEN {
        return Err(GsoError::Truncated {
            what: "IPv6 header",
            need: IPV6_HEADER_LEN,
            have: packet.len(),
        });
    }
    let version = packet[0] >> 4;
    if version != 6 {
        return Err(GsoError::NotIpv6 { version });
    }
    let payload_len = usize::from(u16_at(packet, 4));
    let actual = packet.len() - IPV6_HEADER_LEN;
    if payload_len != actual {
        return Err(GsoError::LengthMismatch {
            payload_len,
            actual,
        });
    }
    Ok(packet[6])
}

/// Splits one packet read from an offloading TUN (its `virtio_net_hdr` first) into
/// ordinary IPv6 packets appended to `out`; returns how many were appended.
///
/// - `GSO_TCPV6`: cut into `gso_size`-byte segments with IPv6 payload lengths, TCP
///   sequence numbers and checksums fixed; FIN and PSH stay only on the last segment,
///   CWR only on the first.
/// - `GSO_UDP_L4`: cut into `gso_size`-byte datagrams with UDP lengths and checksums.
/// - `GSO_NONE` with `NEEDS_CSUM`: the transport checksum at `csum_start +
///   csum_offset` is completed.
/// - anything else with `GSO_NONE` passes through unchanged, header stripped.
///
/// `gso_size` was chosen by the kernel from the TUN MTU, so the segments fit the
/// overlay MTU. On error nothing is appended.
pub fn split_gso(hdr_and_packet: &[u8], out: &mut PacketBatch) -> Result<usize, GsoError> {
    let hdr = VirtioNetHdr::parse(hdr_and_packet)?;
    let packet = &hdr_and_packet[VNET_HDR_LEN..];
    match hdr.gso_type {
        VirtioNetHdr::GSO_NONE => {
            if hdr.flags & VirtioNetHdr::F_NEEDS_CSUM != 0 {
                let start = usize::from(hdr.csum_start);
                let field = start + usize::from(hdr.csum_offset);
                if start > packet.len() || field + 2 > packet.len() {
                    return Err(GsoError::BadChecksumOffset {
                        csum_start: hdr.csum_start,
                        csum_offset: hdr.csum_offset,
                        packet_len: packet.len(),
                    });
                }
                let copy = out.alloc(packet.len());
                copy.copy_from_slice(packet);
                let checksum = finish_checksum(fast_sum(&copy[start..]));
                copy[field..field + 2].copy_from_slice(&checksum.to_be_bytes());
            } else {
                out.push(packet);
            }
            Ok(1)
        }
        t if t & !VirtioNetHdr::GSO_ECN == VirtioNetHdr::GSO_TCPV6 => split_tcp(&hdr, packet, out),
        VirtioNetHdr::GSO_UDP_L4 => split_udp(&hdr, packet, out),
        gso_type => Err(GsoError::UnsupportedGsoType { gso_type }),
    }
}

fn check_csum_fields(
    hdr: &VirtioNetHdr,
    packet: &[u8],
    expected_offset: usize,
) -> Result<(), GsoError> {
    if hdr.flags & VirtioNetHdr::F_NEEDS_CSUM != 0
        && (usize::from(hdr.csum_start) != IPV6_HEADER_LEN
            || usize::from(hdr.csum_offset) != expected_offset)
    {
        return Err(GsoError::BadChecksumOffset {
            csum_start: hdr.csum_start,
            csum_offset: hdr.csum_offset,
            packet_len: packet.len(),
        });
    }
    Ok(())
}

fn split_tcp(hdr: &VirtioNetHdr, packet: &[u8], out: &mut PacketBatch) -> Result<usize, GsoError> {
    let next_header = parse_ipv6(packet)?;
    if next_header != NEXT_HEADER_TCP {
        return Err(GsoError::TransportMismatch {
            gso_type: hdr.gso_type,
            next_header,
        });
    }
    check_csum_fields(hdr, packet, TCP_CHECKSUM_OFFSET)?;
    if packet.len() < IPV6_HEADER_LEN + TCP_HEADER_MIN_LEN {
        return Err(GsoError::Truncated {
            what: "TCP header",
            need: IPV6_HEADER_LEN + TCP_HEADER_MIN_LEN,
            have: packet.len(),
        });
    }
    let tcp_len = usize::from(packet[IPV6_HEADER_LEN + 12] >> 4) * 4;
    let headers = IPV6_HEADER_LEN + tcp_len;
    if tcp_len < TCP_HEADER_MIN_LEN || headers > packet.len() {
        return Err(GsoError::BadTcpHeaderLen {
            len: tcp_len,
            packet_len: packet.len(),
        });
    }
    let gso_size = usize::from(hdr.gso_size);
    if gso_size == 0 {
        return Err(GsoError::ZeroGsoSize);
    }
    let payload = &packet[headers..];
    let seq0 = u32_at(packet, IPV6_HEADER_LEN + 4);
    let flags0 = packet[IPV6_HEADER_LEN + 13];
    let count = payload.len().div_ceil(gso_size).max(1);
    for i in 0..count {
        let chunk =
            &payload[(i * gso_size).min(payload.len())..((i + 1) * gso_size).min(payload.len())];
        let mut flags = flags0;
        if i + 1 < count {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            flags &= !TCP_CWR;
        }
        let seg = out.alloc(headers + chunk.len());
        seg[..headers].copy_from_slice(&packet[..headers]);
        seg[headers..].copy_from_slice(chunk);
        let l4_len = tcp_len + chunk.len();
        // l4_len <= the superpacket's payload length, which fit in 16 bits.
        seg[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        let tcp = &mut seg[IPV6_HEADER_LEN..];
        let seq = seq0.wrapping_add((i * gso_size) as u32);
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[13] = flags;
        tcp[TCP_CHECKSUM_OFFSET..TCP_CHECKSUM_OFFSET + 2].fill(0);
        let sum =
            pseudo_header_sum(seg, NEXT_HEADER_TCP, l4_len) + fast_sum(&seg[IPV6_HEADER_LEN..]);
        let checksum = finish_checksum(sum);
        let field = IPV6_HEADER_LEN + TCP_CHECKSUM_OFFSET;
        seg[field..field + 2].copy_from_slice(&checksum.to_be_bytes());
    }
    Ok(count)
}

fn split_udp(hdr: &VirtioNetHdr, packet: &[u8], out: &mut PacketBatch) -> Result<usize, GsoError> {
    let next_header = parse_ipv6(packet)?;
    if next_header != NEXT_HEADER_UDP {
        return Err(GsoError::TransportMismatch {
            gso_type: hdr.gso_type,
            next_header,
        });
    }
    check_csum_fields(hdr, packet, UDP_CHECKSUM_OFFSET)?;
    let headers = IPV6_HEADER_LEN + UDP_HEADER_LEN;
    if packet.len() < headers {
        return Err(GsoError::Truncated {
            what: "UDP header",
            need: headers,
            have: packet.len(),
        });
    }
    let gso_size = usize::from(hdr.gso_size);
    if gso_size == 0 {
        return Err(GsoError::ZeroGsoSize);
    }
    let payload = &packet[headers..];
    let count = payload.len().div_ceil(gso_size).max(1);
    for i in 0..count {
        let chunk =
            &payload[(i * gso_size).min(payload.len())..((i + 1) * gso_size).min(payload.len())];
        let seg = out.alloc(headers + chunk.len());
        seg[..headers].copy_from_slice(&packet[..headers]);
        seg[headers..].copy_from_slice(chunk);
        // Fits: at most the superpacket's payload length.
        let l4_len = (UDP_HEADER_LEN + chunk.len()) as u16;
        seg[4..6].copy_from_slice(&l4_len.to_be_bytes());
        let udp = &mut seg[IPV6_HEADER_LEN..];
        udp[4..6].copy_from_slice(&l4_len.to_be_bytes());
        udp[UDP_CHECKSUM_OFFSET..UDP_CHECKSUM_OFFSET + 2].fill(0);
        let sum = pseudo_header_sum(seg, NEXT_HEADER_UDP, usize::from(l4_len))
            + fast_sum(&seg[IPV6_HEADER_LEN..]);
        let checksum = finish_checksum(sum);
        let field = IPV6_HEADER_LEN + UDP_CHECKSUM_OFFSET;
        seg[field..field + 2].copy_from_slice(&checksum.to_be_bytes());
    }
    Ok(count)
}

/// Addresses and ports: which TCP connection (one direction) a segment belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    addrs: [u8; 32],
    ports: [u8; 4],
}

/// What [`Coalescer`] learnt about one input packet.
#[derive(Debug, Clone, Copy)]
struct Segment {
    /// Flow of an IPv6 TCP packet (even one that cannot be merged).
    key: Option<FlowKey>,
    /// Set when the packet may be merged: headers length (IPv6 + TCP) and payload.
    mergeable: Option<(usize, usize)>,
    /// Next member of the same output packet.
    next: Option<usize>,
}

/// One output packet under construction: a run of input packets.
#[derive(Debug, Clone, Copy)]
struct Group {
    first: usize,
    last: usize,
    count: usize,
    /// Payload of the first segment: the superpacket's `gso_size`.
    gso_size: usize,
    /// Payload bytes over all members.
    payload: usize,
    /// Sequence number the next member must carry.
    next_seq: u32,
    /// Whether another segment may still be appended.
    open: bool,
}

/// Merges consecutive in-order TCP segments of a flow into `GSO_TCPV6` superpackets for
/// an offloading TUN, so the kernel takes a whole burst in one `write` and runs its TCP
/// receive path once per superpacket instead of once per segment.
///
/// Segments merge when they are IPv6 + TCP without extension headers, carry data,
/// carry only ACK (and PSH on the last one), have valid checksums, continue the
/// previous segment's sequence number, and have headers identical to the first
/// segment apart from payload length, sequence number, PSH and checksum; every segment
/// but the last has exactly `gso_size` bytes of payload. Anything else passes through
/// with a zero `virtio_net_hdr`, and closes its flow's run so per-flow order is kept.
///
/// Holds scratch space reused across calls; keep one per TUN writer.
#[derive(Debug, Default)]
pub struct Coalescer {
    segments: Vec<Segment>,
    groups: Vec<Group>,
    flows: HashMap<FlowKey, usize>,
}

/// Classifies one packet for coalescing.
fn classify(packet: &[u8]) -> Segment {
    let mut segment = Segment {
        key: None,
        mergeable: None,
        next: None,
    };
    if packet.len() < IPV6_HEADER_LEN + TCP_HEADER_MIN_LEN
        || packet[0] >> 4 != 6
        || packet[6] != NEXT_HEADER_TCP
    {
        return segment;
    }
    let mut key = FlowKey {
        addrs: [0; 32],
        ports: [0; 4],
    };
    key.addrs.copy_from_slice(&packet[8..40]);
    key.ports
        .copy_from_slice(&packet[IPV6_HEADER_LEN..IPV6_HEADER_LEN + 4]);
    segment.key = Some(key);

    if usize::from(u16_at(packet, 4)) != packet.len() - IPV6_HEADER_LEN {
        return segment;
    }
    let tcp_len = usize::from(packet[IPV6_HEADER_LEN + 12] >> 4) * 4;
    let headers = IPV6_HEADER_LEN + tcp_len;
    if tcp_len < TCP_HEADER_MIN_LEN || headers >= packet.len() {
        return segment; // bad header, or no payload
    }
    let flags = packet[IPV6_HEADER_LEN + 13];
    if flags & TCP_ACK == 0
        || flags & (TCP_FIN | TCP_SYN | TCP_RST | TCP_URG | TCP_ECE | TCP_CWR) != 0
    {
        return segment;
    }
    let l4 = &packet[IPV6_HEADER_LEN..];
    let sum = pseudo_header_sum(packet, NEXT_HEADER_TCP, l4.len()) + fast_sum(l4);
    if fold(sum) != 0xffff {
        return segment; // the kernel drops it; merged, it would be trusted
    }
    segment.mergeable = Some((headers, packet.len() - headers));
    segment
}

/// Whether `b` may follow the run started by `a`: identical headers except the IPv6
/// payload length, the TCP sequence number, PSH and the checksum.
fn same_headers(a: &[u8], b: &[u8], headers: usize) -> bool {
    let t = IPV6_HEADER_LEN;
    a[..4] == b[..4]
        && a[6..t + 4] == b[6..t + 4]
        && a[t + 8..t + 13] == b[t + 8..t + 13]
        && a[t + 13] & !TCP_PSH == b[t + 13] & !TCP_PSH
        && a[t + 14..t + 16] == b[t + 14..t + 16]
        && a[t + 18..headers] == b[t + 18..headers]
}

impl Coalescer {
    /// A coalescer with empty scratch space.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends to `out` the packets to write into an offloading TUN for `packets` (plain
    /// IPv6 packets from the overlay, in arrival order), each with its
    /// `virtio_net_hdr`; returns how many were appended.
    ///
    /// Output order is the order of each run's first packet, so packets of one flow
    /// never overtake each other.
    pub fn coalesce<P: AsRef<[u8]>>(&mut self, packets: &[P], out: &mut PacketBatch) -> usize {
        self.segments.clear();
        self.groups.clear();
        self.flows.clear();

        for (index, packet) in packets.iter().enumerate() {
            let packet = packet.as_ref();
            let segment = classify(packet);
            self.segments.push(segment);
            if let (Some(key), Some((headers, payload))) = (segment.key, segment.mergeable)
                && let Some(&g) = self.flows.get(&key)
                && self.try_append(g, index, packet, headers, payload, packets)
            {
                continue;
            }
            let group = self.groups.len();
            self.groups.push(Group {
                first: index,
                last: index,
                count: 1,
                gso_size: segment.mergeable.map_or(0, |(_, payload)| payload),
                payload: segment.mergeable.map_or(0, |(_, payload)| payload),
                next_seq: match segment.mergeable {
                    Some((_, payload)) => {
                        u32_at(packet, IPV6_HEADER_LEN + 4).wrapping_add(payload as u32)
                    }
                    None => 0,
                },
                open: segment.mergeable.is_some() && packet[IPV6_HEADER_LEN + 13] & TCP_PSH == 0,
            });
            if let Some(key) = segment.key {
                if segment.mergeable.is_some() {
                    self.flows.insert(key, group);
                } else {
                    self.flows.remove(&key);
                }
            }
        }

        for group in &self.groups {
            let first = packets[group.first].as_ref();
            if group.count == 1 {
                let item = out.alloc(VNET_HDR_LEN + first.len());
                // A zero header (no GSO, checksum done) written out: the slot holds
                // whatever an earlier batch left there.
                item[..VNET_HDR_LEN].copy_from_slice(&VirtioNetHdr::default().encode());
                item[VNET_HDR_LEN..].copy_from_slice(first);
                continue;
            }
            let last = packets[group.last].as_ref();
            let headers = IPV6_HEADER_LEN + usize::from(first[IPV6_HEADER_LEN + 12] >> 4) * 4;
            let l4_len = headers - IPV6_HEADER_LEN + group.payload;
            let hdr = VirtioNetHdr {
                flags: VirtioNetHdr::F_NEEDS_CSUM,
                gso_type: VirtioNetHdr::GSO_TCPV6,
                // All fit in 16 bits: try_append keeps l4_len within the IPv6 payload
                // length field.
                hdr_len: headers as u16,
                gso_size: group.gso_size as u16,
                csum_start: IPV6_HEADER_LEN as u16,
                csum_offset: TCP_CHECKSUM_OFFSET as u16,
            };
            let item = out.alloc(VNET_HDR_LEN + headers + group.payload);
            item[..VNET_HDR_LEN].copy_from_slice(&hdr.encode());
            let (head, mut rest) = item[VNET_HDR_LEN..].split_at_mut(headers);
            head.copy_from_slice(&first[..headers]);
            head[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            let flags = &mut head[IPV6_HEADER_LEN + 13];
            *flags = (*flags & !TCP_PSH) | (last[IPV6_HEADER_LEN + 13] & TCP_PSH);
            let partial = fold(pseudo_header_sum(head, NEXT_HEADER_TCP, l4_len));
            let field = IPV6_HEADER_LEN + TCP_CHECKSUM_OFFSET;
            head[field..field + 2].copy_from_slice(&partial.to_be_bytes());

            let mut member = Some(group.first);
            while let Some(index) = member {
                let packet = packets[index].as_ref();
                let payload = &packet[headers..];
                let (dst, tail) = rest.split_at_mut(payload.len());
                dst.copy_from_slice(payload);
                rest = tail;
                member = self.segments[index].next;
            }
        }
        self.groups.len()
    }

    /// Appends packet `index` to group `g` if the rules allow it.
    fn try_append<P: AsRef<[u8]>>(
        &mut self,
        g: usize,
        index: usize,
        packet: &[u8],
        headers: usize,
        payload: usize,
        packets: &[P],
    ) -> bool {
        let group = self.groups[g];
        if !group.open || payload > group.gso_size {
            return false;
        }
        let first = packets[group.first].as_ref();
        let first_headers = IPV6_HEADER_LEN + usize::from(first[IPV6_HEADER_LEN + 12] >> 4) * 4;
        if first_headers != headers
            || u32_at(packet, IPV6_HEADER_LEN + 4) != group.next_seq
            || headers - IPV6_HEADER_LEN + group.payload + payload > usize::from(u16::MAX)
            || !same_headers(first, packet, headers)
        {
            return false;
        }
        self.segments[group.last].next = Some(index);
        let group = &mut self.groups[g];
        group.last = index;
        group.count += 1;
        group.payload += payload;
        group.next_seq = group.next_seq.wrapping_add(payload as u32);
        // A short segment or PSH ends the run: only the last may be short or pushed.
        group.open = payload == group.gso_size && packet[IPV6_HEADER_LEN + 13] & TCP_PSH == 0;
        true
    }
}

impl Coalescer {
    /// The input packets (indices into the last [`Coalescer::coalesce`] call's
    /// `packets`) that output item `item` carries, in order: what to count as delivered
    /// or lost when that one write succeeds or fails.
    pub fn members(&self, item: usize) -> impl Iterator<Item = usize> + '_ {
        let mut next = self.groups.get(item).map(|g| g.first);
        std::iter::from_fn(move || {
            let index = next?;
            next = self.segments.get(index).and_then(|s| s.next);
            Some(index)
        })
    }
}

/// [`Coalescer::coalesce`] with a throwaway coalescer, for callers that do not keep one.
pub fn coalesce<P: AsRef<[u8]>>(packets: &[P], out: &mut PacketBatch) -> usize {
    Coalescer::new().coalesce(packets, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn fast_sum_matches_the_byte_pair_sum(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000)) {
            proptest::prop_assert_eq!(fold(fast_sum(&data)), fold(sum_bytes(&data)));
            proptest::prop_assert!(fast_sum(&data) <= 0xffff);
        }
    }

    #[test]
    fn fast_sum_on_edge_values() {
        for len in 0..40 {
            let ones = vec![0xffu8; len];
            assert_eq!(
                fold(fast_sum(&ones)),
                fold(sum_bytes(&ones)),
                "{len} × 0xff"
            );
        }
        let big = vec![0xffu8; 70_000];
        assert_eq!(fold(fast_sum(&big)), fold(sum_bytes(&big)));
    }

    #[test]
    fn slots_mut_yields_disjoint_slots_with_room() {
        let mut batch = PacketBatch::with_room(3, 2);
        for p in [&b"ab"[..], b"cde", b"", b"f"] {
            batch.push(p);
        }
        for (n, slot) in batch.slots_mut(1..4).enumerate() {
            assert_eq!(slot.len(), [3, 0, 1][n] + 5);
            slot.fill(b'0' + n as u8);
        }
        assert_eq!(
            batch.get(0),
            Some(&b"ab"[..]),
            "outside the range: untouched"
        );
        assert_eq!(batch.slot(1), Some(&b"00000000"[..]));
        assert_eq!(batch.get(2), Some(&b""[..]));
        assert_eq!(batch.slot(3), Some(&b"222222"[..]));
        assert_eq!(batch.slots_mut(4..9).count(), 0);
        assert_eq!(
            batch.slots_mut(0..9).count(),
            4,
            "clamped to the packets there are"
        );
        assert_eq!(batch.slot(4), None);
    }
    use proptest::prelude::*;
    use std::net::Ipv6Addr;

    const A: Ipv6Addr = Ipv6Addr::new(0xfd6d, 0xa, 0, 0, 0, 0, 0, 1);
    const B: Ipv6Addr = Ipv6Addr::new(0xfd6d, 0xb, 0, 0, 0, 0, 0, 1);

    fn ipv6_header(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, payload_len: usize) -> Vec<u8> {
        let mut h = vec![0x60, 0, 0, 0];
        h.extend_from_slice(&(payload_len as u16).to_be_bytes());
        h.push(next_header);
        h.push(64);
        h.extend_from_slice(&src.octets());
        h.extend_from_slice(&dst.octets());
        h
    }

    /// Independent of the code under test: sums the pseudo-header field by field.
    fn pseudo(p: &[u8]) -> u32 {
        let len = (p.len() - 40) as u32;
        sum_bytes(&p[8..24])
            + sum_bytes(&p[24..40])
            + (len >> 16)
            + (len & 0xffff)
            + u32::from(p[6])
    }

    /// Whether `p` is a well-formed IPv6 TCP/UDP packet with a valid checksum.
    fn l4_valid(p: &[u8]) -> bool {
        p.len() >= 40
            && usize::from(u16::from_be_bytes([p[4], p[5]])) == p.len() - 40
            && fold(pseudo(p) + sum_bytes(&p[40..])) == 0xffff
    }

    fn with_checksum(mut p: Vec<u8>, field: usize) -> Vec<u8> {
        p[field..field + 2].fill(0);
        let c = finish_checksum(pseudo(&p) + sum_bytes(&p[40..]));
        p[field..field + 2].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[allow(clippy::too_many_arguments)]
    fn tcp_between(
        src: Ipv6Addr,
        dst: Ipv6Addr,
        sport: u16,
        dport: u16,
        seq: u32,
        flags: u8,
        options: &[u8],
        payload: &[u8],
    ) -> Vec<u8> {
        assert_eq!(options.len() % 4, 0);
        let tcp_len = 20 + options.len();
        let mut p = ipv6_header(src, dst, 6, tcp_len + payload.len());
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&7u32.to_be_bytes()); // ack
        p.push(((tcp_len / 4) as u8) << 4);
        p.push(flags);
        p.extend_from_slice(&512u16.to_be_bytes()); // window
        p.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
        p.extend_from_slice(options);
        p.extend_from_slice(payload);
        with_checksum(p, 56)
    }

    fn tcp(seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        tcp_between(A, B, 1000, 2000, seq, flags, &[], payload)
    }

    fn udp_between(
        src: Ipv6Addr,
        dst: Ipv6Addr,
        sport: u16,
        dport: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut p = ipv6_header(src, dst, 17, 8 + payload.len());
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        with_checksum(p, 46)
    }

    /// What the kernel hands over: vnet header + superpacket whose checksum field holds
    /// only the pseudo-header sum.
    fn superpacket(mut packet: Vec<u8>, gso_type: u8, gso_size: u16, field: usize) -> Vec<u8> {
        let partial = fold(pseudo(&packet));
        packet[field..field + 2].copy_from_slice(&partial.to_be_bytes());
        let hdr = VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            gso_type,
            hdr_len: 60,
            gso_size,
            csum_start: 40,
            csum_offset: (field - 40) as u16,
        };
        let mut out = hdr.encode().to_vec();
        out.extend_from_slice(&packet);
        out
    }

    fn plain(packet: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; VNET_HDR_LEN];
        out.extend_from_slice(packet);
        out
    }

    fn split(input: &[u8]) -> Result<Vec<Vec<u8>>, GsoError> {
        let mut batch = PacketBatch::new();
        let n = split_gso(input, &mut batch)?;
        assert_eq!(n, batch.len());
        Ok(batch.iter().map(<[u8]>::to_vec).collect())
    }

    fn coalesced(packets: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut batch = PacketBatch::new();
        let n = coalesce(packets, &mut batch);
        assert_eq!(n, batch.len());
        batch.iter().map(<[u8]>::to_vec).collect()
    }

    fn payload_of(p: &[u8]) -> &[u8] {
        let headers = 40 + usize::from(p[52] >> 4) * 4;
        &p[headers..]
    }

    fn seq_of(p: &[u8]) -> u32 {
        u32_at(p, 44)
    }

    #[test]
    fn vnet_header_round_trips() {
        let hdr = VirtioNetHdr {
            flags: 1,
            gso_type: VirtioNetHdr::GSO_TCPV6,
            hdr_len: 60,
            gso_size: 1328,
            csum_start: 40,
            csum_offset: 16,
        };
        assert_eq!(VirtioNetHdr::parse(&hdr.encode()), Ok(hdr));
        assert!(matches!(
            VirtioNetHdr::parse(&[0; 9]),
            Err(GsoError::Truncated { have: 9, .. })
        ));
    }

    #[test]
    fn offload_flags_display() {
        assert_eq!(OFFLOAD_ATTEMPTS[0].to_string(), "csum|tso6|uso4|uso6");
        assert_eq!(OffloadFlags::default().to_string(), "none");
    }

    #[test]
    fn names_are_validated() {
        for bad in ["", "0123456789abcdef", "a/b", "a:b", "a b", ".", ".."] {
            assert!(
                matches!(validate_name(bad), Err(TunError::InvalidName { .. })),
                "{bad:?}"
            );
        }
        for good in [DEFAULT_NAME, "0123456789abcde", "myc%d"] {
            assert!(validate_name(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn create_outside_runtime_is_an_error() {
        assert!(matches!(
            Tun::create("myc-nort", TunOptions::default()),
            Err(TunError::NoRuntime { .. })
        ));
    }

    #[test]
    fn splits_tcp_superpacket() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let flags = TCP_ACK | TCP_PSH | TCP_FIN | TCP_CWR;
        let options = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]; // NOP NOP timestamps
        let sp = superpacket(
            tcp_between(A, B, 1000, 2000, u32::MAX - 2000, flags, &options, &data),
            VirtioNetHdr::GSO_TCPV6 | VirtioNetHdr::GSO_ECN,
            1400,
            56,
        );
        let segs = split(&sp).expect("valid superpacket");
        assert_eq!(segs.len(), 4);
        let mut stream = Vec::new();
        for (i, seg) in segs.iter().enumerate() {
            assert!(l4_valid(seg), "segment {i} checksum");
            assert_eq!(seg.len(), 40 + 32 + if i < 3 { 1400 } else { 800 });
            assert_eq!(seq_of(seg), (u32::MAX - 2000).wrapping_add(1400 * i as u32));
            let f = seg[53];
            assert_eq!(f & TCP_ACK, TCP_ACK);
            assert_eq!(f & TCP_CWR != 0, i == 0, "CWR on segment {i}");
            assert_eq!(
                f & (TCP_FIN | TCP_PSH) != 0,
                i == 3,
                "FIN/PSH on segment {i}"
            );
            if i == 3 {
                assert_eq!(f & (TCP_FIN | TCP_PSH), TCP_FIN | TCP_PSH);
            }
            assert_eq!(seg[72 - 12..72], options);
            stream.extend_from_slice(payload_of(seg));
        }
        assert_eq!(stream, data);
    }

    #[test]
    fn splits_udp_superpacket() {
        let data: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let sp = superpacket(
            udp_between(A, B, 5, 6, &data),
            VirtioNetHdr::GSO_UDP_L4,
            1200,
            46,
        );
        let segs = split(&sp).expect("valid superpacket");
        assert_eq!(segs.len(), 3);
        for (i, seg) in segs.iter().enumerate() {
            assert!(l4_valid(seg), "segment {i} checksum");
            let len = if i < 2 { 1200 } else { 600 };
            assert_eq!(seg.len(), 48 + len);
            assert_eq!(usize::from(u16_at(seg, 44)), 8 + len);
            assert_eq!(seg[48..], data[i * 1200..i * 1200 + len]);
        }
    }

    #[test]
    fn completes_partial_checksum() {
        let full = udp_between(A, B, 5353, 9651, b"partial checksum");
        let sp = superpacket(full.clone(), VirtioNetHdr::GSO_NONE, 0, 46);
        assert_eq!(split(&sp).expect("valid"), vec![full.clone()]);

        let full = tcp(42, TCP_ACK, b"tcp partial");
        let sp = superpacket(full.clone(), VirtioNetHdr::GSO_NONE, 0, 56);
        assert_eq!(split(&sp).expect("valid"), vec![full]);
    }

    #[test]
    fn plain_packets_pass_through() {
        let icmp = {
            let mut p = ipv6_header(A, B, 58, 8);
            p.extend_from_slice(&[128, 0, 0x12, 0x34, 0, 1, 0, 1]);
            p
        };
        let udp = udp_between(A, B, 1, 2, b"x");
        let syn = tcp(1, TCP_SYN, b"");
        for p in [&icmp, &udp, &syn] {
            assert_eq!(split(&plain(p)).expect("plain"), vec![p.clone()]);
        }
        // The other direction: each gets a zero header, nothing merges.
        let out = coalesced(&[icmp.clone(), udp.clone(), syn.clone()]);
        assert_eq!(out, vec![plain(&icmp), plain(&udp), plain(&syn)]);
        // Non-IPv6 garbage, too.
        assert_eq!(coalesced(&[vec![0x45, 0, 0]]), vec![plain(&[0x45, 0, 0])]);
        assert_eq!(coalesced(&[Vec::new()]), vec![plain(&[])]);
    }

    #[test]
    fn malformed_input_is_an_error() {
        let good = superpacket(
            tcp(1, TCP_ACK, &[9; 3000]),
            VirtioNetHdr::GSO_TCPV6,
            1000,
            56,
        );
        assert!(split(&good).is_ok());
        let mutate = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut p = good.clone();
            f(&mut p);
            split(&p)
        };
        assert!(matches!(split(&good[..5]), Err(GsoError::Truncated { .. })));
        assert!(matches!(
            split(&good[..40]),
            Err(GsoError::Truncated { .. })
        ));
        assert!(matches!(
            mutate(&|p| p[10] = 0x45),
            Err(GsoError::NotIpv6 { version: 4 })
        ));
        assert!(matches!(
            split(&good[..good.len() - 1]),
            Err(GsoError::LengthMismatch { .. })
        ));
        assert!(matches!(
            mutate(&|p| p[1] = VirtioNetHdr::GSO_TCPV4),
            Err(GsoError::UnsupportedGsoType { gso_type: 1 })
        ));
        assert!(matches!(
            mutate(&|p| p[1] = 0x42),
            Err(GsoError::UnsupportedGsoType { .. })
        ));
        assert!(matches!(
            mutate(&|p| p[1] = VirtioNetHdr::GSO_UDP_L4),
            Err(GsoError::TransportMismatch { .. })
        ));
        assert!(matches!(
            mutate(&|p| p[16] = 0), // next header: hop-by-hop extension header
            Err(GsoError::TransportMismatch { .. })
        ));
        assert!(matches!(
            mutate(&|p| p[4..6].fill(0)),
            Err(GsoError::ZeroGsoSize)
        ));
        assert!(matches!(
            mutate(&|p| p[62] = 0x40),
            Err(GsoError::BadTcpHeaderLen { len: 16, .. })
        ));
        let short = superpacket(tcp(1, TCP_ACK, &[]), VirtioNetHdr::GSO_TCPV6, 1000, 56);
        let mut bad = short.clone();
        bad[10 + 52] = 0xf0; // 60-byte TCP header in a 20-byte one
        assert!(matches!(
            split(&bad),
            Err(GsoError::BadTcpHeaderLen { len: 60, .. })
        ));
        assert!(matches!(
            mutate(&|p| p[8] = 3),
            Err(GsoError::BadChecksumOffset { .. })
        ));
        // NEEDS_CSUM pointing past the end of a plain packet.
        let mut plain_bad = plain(&udp_between(A, B, 1, 2, b"abc"));
        plain_bad[0] = VirtioNetHdr::F_NEEDS_CSUM;
        plain_bad[6..8].copy_from_slice(&50u16.to_ne_bytes());
        plain_bad[8..10].copy_from_slice(&6u16.to_ne_bytes());
        assert!(matches!(
            split(&plain_bad),
            Err(GsoError::BadChecksumOffset { .. })
        ));
        // Errors append nothing.
        let mut batch = PacketBatch::new();
        assert!(split_gso(&plain_bad, &mut batch).is_err());
        assert!(batch.is_empty());
    }

    /// A batch that held other packets before: every byte of its old slots is 0xff.
    fn dirty_batch() -> PacketBatch {
        let mut batch = PacketBatch::new();
        for _ in 0..8 {
            batch.push(&[0xff; 70_000]);
        }
        batch.clear();
        batch
    }

    #[test]
    fn a_reused_batch_gives_the_same_bytes_as_a_fresh_one() {
        let data: Vec<u8> = (0..4000u32).map(|i| (i % 251) as u8).collect();
        let mut packets: Vec<Vec<u8>> = data
            .chunks(1300)
            .enumerate()
            .map(|(i, c)| tcp(100 + 1300 * i as u32, TCP_ACK, c))
            .collect();
        // Ones that pass through on their own: a pure ACK and an out-of-order segment.
        packets.push(tcp(9, TCP_ACK, &[]));
        packets.push(tcp(7_000_000, TCP_ACK, &data[..500]));
        let mut reused = dirty_batch();
        let mut coalescer = Coalescer::new();
        let n = coalescer.coalesce(&packets, &mut reused);
        assert_eq!(n, 3, "one superpacket and two packets on their own");
        let members: Vec<Vec<usize>> = (0..n).map(|i| coalescer.members(i).collect()).collect();
        assert_eq!(members, [vec![0, 1, 2, 3], vec![4], vec![5]]);
        assert_eq!(coalescer.members(n).count(), 0);
        let reused: Vec<Vec<u8>> = reused.iter().map(<[u8]>::to_vec).collect();
        assert_eq!(reused, coalesced(&packets));
        for single in &reused[1..] {
            assert_eq!(
                VirtioNetHdr::parse(single).expect("header"),
                VirtioNetHdr::default(),
                "a packet on its own carries a zero virtio header"
            );
        }
        // Splitting into a reused batch likewise.
        let mut reused = dirty_batch();
        split_gso(&reused_input(&data), &mut reused).expect("valid");
        let reused: Vec<Vec<u8>> = reused.iter().map(<[u8]>::to_vec).collect();
        assert_eq!(reused, split(&reused_input(&data)).expect("valid"));
    }

    /// A `GSO_TCPV6` superpacket of `data` as the kernel hands it to an offloading TUN.
    fn reused_input(data: &[u8]) -> Vec<u8> {
        let segs: Vec<Vec<u8>> = data
            .chunks(1300)
            .enumerate()
            .map(|(i, c)| tcp(100 + 1300 * i as u32, TCP_ACK, c))
            .collect();
        coalesced(&segs).remove(0)
    }

    #[test]
    fn coalesces_in_order_segments() {
        let data: Vec<u8> = (0..4000u32).map(|i| (i % 251) as u8).collect();
        let segs: Vec<Vec<u8>> = data
            .chunks(1300)
            .enumerate()
            .map(|(i, c)| {
                let psh = if i == 3 { TCP_PSH } else { 0 };
                tcp(100 + 1300 * i as u32, TCP_ACK | psh, c)
            })
            .collect();
        let out = coalesced(&segs);
        assert_eq!(out.len(), 1);
        let hdr = VirtioNetHdr::parse(&out[0]).expect("header");
        assert_eq!(
            hdr,
            VirtioNetHdr {
                flags: VirtioNetHdr::F_NEEDS_CSUM,
                gso_type: VirtioNetHdr::GSO_TCPV6,
                hdr_len: 60,
                gso_size: 1300,
                csum_start: 40,
                csum_offset: 16,
            }
        );
        let sp = &out[0][VNET_HDR_LEN..];
        assert_eq!(usize::from(u16_at(sp, 4)), 20 + 4000);
        assert_eq!(seq_of(sp), 100);
        assert_eq!(sp[53], TCP_ACK | TCP_PSH);
        assert_eq!(payload_of(sp), &data[..]);
        // The checksum field holds the pseudo-header sum (NEEDS_CSUM), so completing it
        // over the segment gives a valid checksum.
        assert_eq!(u16_at(sp, 56), fold(pseudo(sp)));
        // And splitting it again gives the original segments back, byte for byte.
        assert_eq!(split(&out[0]).expect("valid"), segs);
    }

    #[test]
    fn coalesces_interleaved_flows_separately() {
        let a = |seq: u32| tcp_between(A, B, 1, 2, seq, TCP_ACK, &[], &[1; 100]);
        let b = |seq: u32| tcp_between(A, B, 1, 3, seq, TCP_ACK, &[], &[2; 100]);
        let out = coalesced(&[a(0), b(50), a(100), b(150), a(200)]);
        assert_eq!(out.len(), 2);
        assert_eq!(split(&out[0]).expect("a"), vec![a(0), a(100), a(200)]);
        assert_eq!(split(&out[1]).expect("b"), vec![b(50), b(150)]);
    }

    #[test]
    fn run_breaks_keep_order() {
        let d = [5u8; 500];
        // Gap in sequence numbers.
        let out = coalesced(&[tcp(0, TCP_ACK, &d), tcp(600, TCP_ACK, &d)]);
        assert_eq!(
            out,
            vec![plain(&tcp(0, TCP_ACK, &d)), plain(&tcp(600, TCP_ACK, &d))]
        );
        // Reordered.
        let out = coalesced(&[tcp(500, TCP_ACK, &d), tcp(0, TCP_ACK, &d)]);
        assert_eq!(out.len(), 2);
        // A pure ACK in the middle ends the run; data after it starts a new one.
        let ack = tcp(1000, TCP_ACK, &[]);
        let out = coalesced(&[
            tcp(0, TCP_ACK, &d),
            tcp(500, TCP_ACK, &d),
            ack.clone(),
            tcp(1000, TCP_ACK, &d),
        ]);
        assert_eq!(out.len(), 3);
        assert_eq!(VirtioNetHdr::parse(&out[0]).map(|h| h.gso_size), Ok(500));
        assert_eq!(out[1], plain(&ack));
        assert_eq!(out[2], plain(&tcp(1000, TCP_ACK, &d)));
        // PSH ends a run; the pushed segment is its last.
        let out = coalesced(&[
            tcp(0, TCP_ACK, &d),
            tcp(500, TCP_ACK | TCP_PSH, &d),
            tcp(1000, TCP_ACK, &d),
        ]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0][VNET_HDR_LEN + 53], TCP_ACK | TCP_PSH);
        // A short segment ends a run too.
        let out = coalesced(&[
            tcp(0, TCP_ACK, &d),
            tcp(500, TCP_ACK, &d[..100]),
            tcp(600, TCP_ACK, &d[..100]),
        ]);
        assert_eq!(out.len(), 2);
        // A bigger segment cannot follow a smaller gso_size.
        let out = coalesced(&[tcp(0, TCP_ACK, &d[..100]), tcp(100, TCP_ACK, &d)]);
        assert_eq!(out.len(), 2);
        // FIN, and headers that differ (window), are not merged.
        let mut other_window = tcp(500, TCP_ACK, &d);
        other_window[55] ^= 1;
        let other_window = with_checksum(other_window, 56);
        let out = coalesced(&[tcp(0, TCP_ACK, &d), other_window]);
        assert_eq!(out.len(), 2);
        let out = coalesced(&[tcp(0, TCP_ACK, &d), tcp(500, TCP_ACK | TCP_FIN, &d)]);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn bad_checksums_are_never_merged() {
        let d = [5u8; 500];
        let mut corrupt = tcp(500, TCP_ACK, &d);
        corrupt[100] ^= 0xff;
        let out = coalesced(&[tcp(0, TCP_ACK, &d), corrupt.clone(), tcp(1000, TCP_ACK, &d)]);
        assert_eq!(out[1], plain(&corrupt));
        assert!(
            out.iter()
                .all(|o| VirtioNetHdr::parse(o).map(|h| h.gso_type) == Ok(0))
        );
    }

    #[test]
    fn superpackets_stay_below_64k() {
        let segs: Vec<Vec<u8>> = (0..60u32)
            .map(|i| tcp(i * 1400, TCP_ACK, &[3; 1400]))
            .collect();
        let out = coalesced(&segs);
        assert_eq!(out.len(), 2);
        let mut back = Vec::new();
        for o in &out {
            assert!(o.len() - VNET_HDR_LEN <= MAX_PACKET_LEN);
            back.extend(split(o).expect("valid"));
        }
        assert_eq!(back, segs);
    }

    #[test]
    fn batch_room_and_reuse() {
        let mut batch = PacketBatch::with_room(96, 16);
        let sp = superpacket(
            tcp(0, TCP_ACK, &[1; 3000]),
            VirtioNetHdr::GSO_TCPV6,
            1000,
            56,
        );
        assert_eq!(split_gso(&sp, &mut batch), Ok(3));
        let (slot, at) = batch.slot_mut(1).expect("slot");
        assert_eq!(slot.len(), 96 + 1060 + 16);
        assert_eq!(at, 96..96 + 1060);
        slot[..96].fill(0xee); // headroom is the caller's
        assert!(l4_valid(batch.get(1).expect("packet")));
        assert!(batch.get(3).is_none());
        batch.clear();
        assert!(batch.is_empty());
        assert_eq!(split_gso(&sp, &mut batch), Ok(3));
        assert_eq!(batch.len(), 3);
    }

    fn options() -> impl Strategy<Value = Vec<u8>> {
        (0usize..=10).prop_flat_map(|words| proptest::collection::vec(any::<u8>(), words * 4))
    }

    proptest! {
        #[test]
        fn split_then_coalesce_round_trips(
            payload in proptest::collection::vec(any::<u8>(), 1..20_000),
            gso_size in 64u16..2000,
            seq: u32,
            push: bool,
            options in options(),
        ) {
            let flags = TCP_ACK | if push { TCP_PSH } else { 0 };
            let field = 56;
            let sp = superpacket(
                tcp_between(A, B, 443, 50_000, seq, flags, &options, &payload),
                VirtioNetHdr::GSO_TCPV6,
                gso_size,
                field,
            );
            let segs = split(&sp).expect("valid superpacket");
            prop_assert_eq!(segs.len(), payload.len().div_ceil(usize::from(gso_size)));
            let mut stream = Vec::new();
            for (i, seg) in segs.iter().enumerate() {
                prop_assert!(l4_valid(seg));
                prop_assert!(seg.len() <= 40 + 20 + options.len() + usize::from(gso_size));
                prop_assert_eq!(seq_of(seg), seq.wrapping_add(u32::from(gso_size) * i as u32));
                let last = i + 1 == segs.len();
                prop_assert_eq!(seg[53] & TCP_PSH != 0, push && last);
                stream.extend_from_slice(payload_of(seg));
            }
            prop_assert_eq!(&stream, &payload);

            let out = coalesced(&segs);
            prop_assert_eq!(out.len(), 1);
            if segs.len() == 1 {
                prop_assert_eq!(&out[0], &plain(&segs[0]));
            } else {
                let hdr = VirtioNetHdr::parse(&out[0]).expect("header");
                prop_assert_eq!(hdr.gso_type, VirtioNetHdr::GSO_TCPV6);
                prop_assert_eq!(hdr.gso_size, gso_size);
            }
            let again = split(&out[0]).expect("coalesced output splits");
            prop_assert_eq!(again, segs);
        }

        #[test]
        fn split_never_panics_on_garbage(input in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut batch = PacketBatch::new();
            let _ = split_gso(&input, &mut batch);
        }

        #[test]
        fn split_never_panics_on_mutated_superpackets(
            payload_len in 0usize..3000,
            gso_size: u16,
            gso_type in prop_oneof![Just(4u8), Just(5u8), Just(0x84u8), Just(0u8), any::<u8>()],
            flip in proptest::collection::vec((0usize..200, any::<u8>()), 0..6),
            truncate in 0usize..3100,
        ) {
            let mut input = superpacket(tcp(1, TCP_ACK, &vec![0x5a; payload_len]), 4, 1000, 56);
            input[1] = gso_type;
            input[4..6].copy_from_slice(&gso_size.to_ne_bytes());
            for (at, value) in flip {
                if let Some(b) = input.get_mut(at) {
                    *b = value;
                }
            }
            input.truncate(truncate.max(1));
            let mut batch = PacketBatch::new();
            if let Ok(n) = split_gso(&input, &mut batch) {
                prop_assert_eq!(n, batch.len());
            }
        }

        #[test]
        fn coalesce_never_panics_and_keeps_every_byte(
            packets in proptest::collection::vec(
                prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..120),
                    (0u32..4, any::<bool>(), 0usize..200).prop_map(|(n, psh, len)| {
                        tcp(n * 100, TCP_ACK | if psh { TCP_PSH } else { 0 }, &vec![7; len])
                    }),
                ],
                0..12,
            ),
        ) {
            let out = coalesced(&packets);
            prop_assert!(out.len() <= packets.len());
            // Every input reappears: superpackets split back into their segments.
            let mut back = Vec::new();
            for o in &out {
                let hdr = VirtioNetHdr::parse(o).expect("header");
                if hdr.gso_type == VirtioNetHdr::GSO_NONE {
                    prop_assert_eq!(hdr, VirtioNetHdr::default());
                    back.push(o[VNET_HDR_LEN..].to_vec());
                } else {
                    back.extend(split(o).expect("coalesced output splits"));
                }
            }
            let mut sorted_in = packets.clone();
            sorted_in.sort();
            back.sort();
            prop_assert_eq!(back, sorted_in);
        }
    }
}

/// Privileged tests (root): a real TUN in a fresh network namespace.
#[cfg(test)]
mod namespace_tests {
    use super::*;
    use crate::os::netlink::Netlink;
    use anyhow::Context;
    use myconet_testbed::netns::{Netns, unique_name};
    use std::net::{Ipv6Addr, SocketAddr};
    use std::time::Duration;
    use tokio::net::UdpSocket;
    use tokio::time::timeout;

    const LOCAL: Ipv6Addr = Ipv6Addr::new(0xfd6d, 1, 0, 0, 0, 0, 0, 1);
    const REMOTE: Ipv6Addr = Ipv6Addr::new(0xfd6d, 2, 0, 0, 0, 0, 0, 5);
    const WAIT: Duration = Duration::from_secs(10);

    fn runtime() -> io::Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }

    fn udp(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let len = 8 + payload.len();
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(len as u16).to_be_bytes());
        p.extend_from_slice(&[NEXT_HEADER_UDP, 64]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&(len as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        let c = myconet_common::checksum::udp_ipv6(&src.octets(), &dst.octets(), &p[40..]);
        p[46..48].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn tcp(seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = 20 + payload.len();
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(len as u16).to_be_bytes());
        p.extend_from_slice(&[NEXT_HEADER_TCP, 64]);
        p.extend_from_slice(&REMOTE.octets());
        p.extend_from_slice(&LOCAL.octets());
        p.extend_from_slice(&40_000u16.to_be_bytes());
        p.extend_from_slice(&9u16.to_be_bytes()); // discard: nobody listens
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&77u32.to_be_bytes());
        p.extend_from_slice(&[0x50, TCP_ACK, 0xff, 0xff, 0, 0, 0, 0]);
        p.extend_from_slice(payload);
        let sum = pseudo_header_sum(&p, NEXT_HEADER_TCP, len) + sum_bytes(&p[40..]);
        p[56..58].copy_from_slice(&finish_checksum(sum).to_be_bytes());
        p
    }

    /// Creates the TUN and configures it as the agent would (MTU, fd6d:1::1/64, up,
    /// fd6d::/16 into it).
    async fn setup(name: &str, options: TunOptions) -> anyhow::Result<Tun> {
        let tun = Tun::create(name, options)?;
        let netlink = Netlink::connect()?;
        let index = netlink.link_index(tun.name()).await?;
        netlink.configure_tun(index, LOCAL, 1388).await?;
        Ok(tun)
    }

    /// Reads from any of `queues` until a packet `want` accepts arrives (the kernel also
    /// sends router solicitations and MLD reports into a fresh link), splitting
    /// superpackets when offload is on.
    async fn read_matching(
        queues: &[&Tun],
        want: impl Fn(&[u8]) -> bool,
    ) -> anyhow::Result<Vec<u8>> {
        let mut bufs = vec![vec![0u8; RECV_BUFFER_LEN]; queues.len()];
        let mut batch = PacketBatch::new();
        let search = async {
            loop {
                let reads = queues
                    .iter()
                    .zip(bufs.iter_mut())
                    .enumerate()
                    .map(|(i, (q, b))| Box::pin(async move { q.recv(b).await.map(|n| (i, n)) }));
                let (ready, _, _) = futures_util::future::select_all(reads).await;
                let (queue, len) = ready?;
                let frame = &bufs[queue][..len];
                batch.clear();
                if queues[queue].offload().is_some() {
                    split_gso(frame, &mut batch)?;
                } else {
                    batch.push(frame);
                }
                if let Some(p) = batch.iter().find(|p| want(p)) {
                    return anyhow::Ok(p.to_vec());
                }
            }
        };
        timeout(WAIT, search)
            .await
            .context("no matching packet came out of the TUN")?
    }

    fn is_udp_to(dst: Ipv6Addr) -> impl Fn(&[u8]) -> bool {
        move |p| p.len() >= 48 && p[6] == NEXT_HEADER_UDP && p[24..40] == dst.octets()
    }

    /// Socket → TUN and TUN → socket with one datagram each, compared byte for byte.
    async fn datagram_round_trip(queues: &[&Tun]) -> anyhow::Result<()> {
        let offload = queues[0].offload().is_some();
        let sender = UdpSocket::bind((LOCAL, 0)).await?;
        let sport = sender.local_addr()?.port();
        sender.send_to(b"hello overlay", (REMOTE, 5555)).await?;
        let got = read_matching(queues, is_udp_to(REMOTE)).await?;
        let expected = udp(LOCAL, REMOTE, sport, 5555, b"hello overlay");
        // The flow label is the kernel's choice (auto_flowlabels); all else is exact,
        // including the UDP checksum the kernel left to split_gso with offload on.
        assert_eq!(got[0], expected[0]);
        assert_eq!(got[1] & 0xf0, expected[1] & 0xf0);
        assert_eq!(got[4..], expected[4..]);

        let receiver = UdpSocket::bind((LOCAL, 0)).await?;
        let dport = receiver.local_addr()?.port();
        let packet = udp(REMOTE, LOCAL, 7777, dport, b"hello host");
        let mut batch = PacketBatch::new();
        let frame: &[u8] = if offload {
            assert_eq!(coalesce(&[&packet], &mut batch), 1);
            batch.get(0).unwrap_or_default()
        } else {
            &packet
        };
        assert_eq!(queues[0].send(frame).await?, frame.len());
        let mut buf = [0u8; 64];
        let (n, from) = timeout(WAIT, receiver.recv_from(&mut buf))
            .await
            .context("the datagram written into the TUN never reached the socket")??;
        assert_eq!(&buf[..n], b"hello host");
        assert_eq!(from, SocketAddr::from((REMOTE, 7777)));
        Ok(())
    }

    fn in_namespace<F>(suffix: &str, body: F) -> anyhow::Result<()>
    where
        F: AsyncFnOnce() -> anyhow::Result<()> + Send,
    {
        let ns = Netns::create(&unique_name(suffix))?;
        ns.ip(["link", "set", "lo", "up"])?;
        ns.run_in(|| runtime()?.block_on(body()))?
    }

    #[test]
    fn datagrams_cross_plain_tun() -> anyhow::Result<()> {
        in_namespace("tun", async || {
            let tun = setup("myctun0", TunOptions::default()).await?;
            assert_eq!(tun.offload(), None);
            assert!(matches!(
                tun.clone_queue(),
                Err(TunError::NotMultiQueue { .. })
            ));
            datagram_round_trip(&[&tun]).await
        })
    }

    #[test]
    fn datagrams_and_superpackets_cross_offloading_tun() -> anyhow::Result<()> {
        in_namespace("tunoff", async || {
            let options = TunOptions {
                offload: true,
                multi_queue: false,
            };
            let tun = setup("myctun0", options).await?;
            let flags = tun
                .offload()
                .ok_or_else(|| anyhow::anyhow!("offload off"))?;
            eprintln!("kernel accepted offload flags: {flags}");
            assert!(
                flags.contains(OffloadFlags::CSUM.union(OffloadFlags::TSO6)),
                "{flags}"
            );
            datagram_round_trip(&[&tun]).await?;

            // A coalesced TCP superpacket is accepted whole: the kernel parses it and
            // answers the closed port with a reset.
            let segments = [tcp(1000, &[0xab; 1000]), tcp(2000, &[0xcd; 1000])];
            let mut batch = PacketBatch::new();
            assert_eq!(coalesce(&segments, &mut batch), 1);
            let frame = batch.get(0).unwrap_or_default();
            let hdr = VirtioNetHdr::parse(frame)?;
            assert_eq!(hdr.gso_type, VirtioNetHdr::GSO_TCPV6);
            assert_eq!(tun.send(frame).await?, frame.len());
            let rst = read_matching(&[&tun], |p| {
                p.len() >= 60
                    && p[6] == NEXT_HEADER_TCP
                    && p[24..40] == REMOTE.octets()
                    && u16_at(p, 40) == 9
                    && u16_at(p, 42) == 40_000
            })
            .await?;
            assert_ne!(rst[53] & TCP_RST, 0);
            assert_eq!(
                u32_at(&rst, 44),
                77,
                "RST carries our ACK number as its sequence"
            );
            Ok(())
        })
    }

    #[test]
    fn multi_queue_tun_takes_a_second_queue() -> anyhow::Result<()> {
        in_namespace("tunmq", async || {
            let options = TunOptions {
                offload: true,
                multi_queue: true,
            };
            let first = setup("myctun0", options).await?;
            let second = first.clone_queue()?;
            assert_eq!(second.name(), first.name());
            assert_eq!(second.offload(), first.offload());
            datagram_round_trip(&[&first, &second]).await
        })
    }
}
