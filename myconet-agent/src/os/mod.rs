//! OS adapters: everything that talks to the Linux kernel or the file system on the
//! shell's behalf (ioctls, netlink, BPF, sysctls, capabilities, state files). No protocol
//! decisions; each module is one kernel interface.
//!
//! - [`dataplane`]: the XDP program, its maps (route map, peer map, counters) and
//!   attach; [`bpf_pins`]: where its links and maps are pinned so they outlive the
//!   agent; [`egress`]: which interfaces it may send out of; [`sysctl`]: the per
//!   interface IPv6 sysctls it depends on.
//! - [`tun`]: the TUN device (virtio header, GSO, batches); [`batch_io`]:
//!   `recvmmsg`/`sendmmsg` on the underlay socket.
//! - [`netlink`]: addresses, routes and MTU over rtnetlink; [`watch`]: follows
//!   rtnetlink so the data plane's view of the underlay stays current;
//!   [`next_hop`]: what the kernel's route says about a next hop (source, path MTU).
//! - [`kstats`]: the kernel's own UDP loss counters; [`caps`]: Linux capabilities,
//!   dropped after set-up.
//! - State files: [`lockfile`] (`flock`), [`seqno_store`] (the routing sequence
//!   numbers reserved across restarts), [`pin_store`] (the key pins).

pub mod batch_io;
pub mod bpf_pins;
pub mod caps;
pub mod dataplane;
pub mod egress;
pub mod kstats;
pub mod lockfile;
pub mod netlink;
pub mod next_hop;
pub mod pin_store;
pub mod seqno_store;
pub mod sysctl;
pub mod tun;
pub mod watch;
