//! Privileged self-tests of the testbed against the real kernel: they build namespaces
//! and veths, so they need root (CI runs as root) and fail loudly without it rather than
//! passing vacuously.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use myconet_common::wire::{DEFAULT_HOP_LIMIT, DEFAULT_PORT, PacketType, Repr};

use crate::agent::{AgentOptions, AgentProcess, counter};
use crate::netns::{self, Netns};
use crate::packet;
use crate::topology::Chain;
use crate::traffic::{Capture, CaptureOptions, Direction, UdpSender, bind_udp};
use crate::util::{self, TempDir};

fn require_root() {
    assert!(
        util::is_root(),
        "the testbed self-tests create network namespaces and must run as root \
         (cargo xtask test checks this up front)"
    );
}

fn sample_repr(counter: u64) -> Repr {
    Repr {
        packet_type: PacketType::Data,
        hop_limit: DEFAULT_HOP_LIMIT,
        flags: 0,
        session_id: 7,
        counter,
        dst_addr: "fd6d:aaaa:bbbb:cccc::1".parse().unwrap(),
        src_addr: "fd6d:1111:2222:3333::1".parse().unwrap(),
    }
}

#[test]
fn datagram_crosses_a_link_and_is_captured_byte_identical() {
    require_root();
    let mut topo = Chain::new(3).build().unwrap();
    let names: Vec<String> = topo
        .nodes()
        .iter()
        .map(|n| n.ns_name().to_owned())
        .collect();
    let (a, b, c) = (topo.node(0), topo.node(1), topo.node(2));

    // Shape: a — b — c, with b holding one interface towards each side.
    assert_eq!(a.if_names(), ["to-b"]);
    assert_eq!(b.if_names(), ["to-a", "to-c"]);
    assert_eq!(c.if_names(), ["to-b"]);
    for node in topo.nodes() {
        for iface in node.ifaces() {
            assert!(iface.name.len() <= 15);
            assert!(iface.ifindex > 0);
        }
    }
    assert_eq!(a.peer_addr(1).unwrap(), b.addr_to(0).unwrap());
    assert_eq!(b.neighbours().len(), 2);

    // Neighbours reach each other; non-neighbours do not (no routes beyond the links).
    topo.ping_all_links().unwrap();
    assert!(a.ping(c.addr_to(1).unwrap(), 1).is_err());

    // The veths are stock: TX checksum offload on, as in containers.
    for (node, iface) in [(a, "to-b"), (b, "to-a")] {
        let features = node
            .netns()
            .exec_stdout(util::tool("ethtool"), ["-k", iface])
            .unwrap();
        assert!(features.contains("tx-checksumming: on"), "{features}");
    }

    let b_addr = b.addr_to(0).unwrap();
    let a_addr = a.addr_to(1).unwrap();
    let receiver = bind_udp(b.netns(), SocketAddr::new(b_addr.into(), DEFAULT_PORT)).unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let capture = Capture::udp_port(b.netns(), "to-a", DEFAULT_PORT).unwrap();

    let datagram = packet::datagram(&sample_repr(1), b"opaque ciphertext");
    let sender = UdpSender::bind(
        a.netns(),
        SocketAddrV6::new(a_addr, 40_000, 0, 0),
        SocketAddrV6::new(b_addr, DEFAULT_PORT, 0, 0),
    )
    .unwrap();
    let report = sender.send(&datagram, 1).unwrap();
    assert_eq!(report.packets, 1);
    assert_eq!(report.bytes, datagram.len() as u64);

    assert!(
        capture.wait_for(1, Duration::from_secs(5)),
        "nothing captured"
    );
    let frames = capture.stop().unwrap();
    assert_eq!(frames.len(), 1, "{frames:?}");
    let frame = &frames[0];
    assert!(!frame.outgoing);
    let parsed = frame.parse().unwrap();
    assert_eq!(
        parsed.udp_payload(),
        &datagram[..],
        "payload changed in flight"
    );
    assert_eq!(parsed.repr().unwrap(), sample_repr(1));
    assert_eq!((parsed.ip_src, parsed.ip_dst), (a_addr, b_addr));
    assert_eq!((parsed.sport, parsed.dport), (40_000, DEFAULT_PORT));
    assert_eq!(parsed.eth_src, a.iface_to(1).unwrap().mac);
    assert_eq!(parsed.eth_dst, b.iface_to(0).unwrap().mac);
    // Sent by a's kernel through a veth with TX checksum offload, the frame carries
    // only the pseudo-header sum (the skb is CHECKSUM_PARTIAL, which b's stack trusts).
    assert!(
        parsed.checksum_partial(),
        "a stock veth's sender leaves the checksum partial"
    );
    // Rebuilding the frame from its parts gives the same bytes as the wire, except for
    // the flow label the kernel chose (and with the checksum left partial).
    let mut rebuilt = packet::with_partial_checksum(packet::frame(
        parsed.eth_src,
        parsed.eth_dst,
        a_addr,
        b_addr,
        40_000,
        DEFAULT_PORT,
        &sample_repr(1),
        b"opaque ciphertext",
    ));
    let flow = packet::ETH_LEN..packet::ETH_LEN + 4;
    rebuilt[flow.clone()].copy_from_slice(&frame.data[flow]);
    assert_eq!(rebuilt, frame.data);

    let mut buf = [0u8; 2048];
    let (n, from) = receiver.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], &datagram[..]);
    assert_eq!(
        from,
        SocketAddr::V6(SocketAddrV6::new(a_addr, 40_000, 0, 0))
    );

    drop((receiver, sender));
    topo.teardown().unwrap();
    topo.teardown().unwrap();
    let left = netns::list().unwrap();
    for name in &names {
        assert!(!left.contains(name), "{name} survived teardown: {left:?}");
    }
}

#[test]
fn blast_is_bounded_and_batches_arrive() {
    require_root();
    let topo = Chain::new(2).build().unwrap();
    let (a, b) = (topo.node(0), topo.node(1));
    topo.ping_all_links().unwrap();
    let dst = SocketAddrV6::new(b.addr_to(0).unwrap(), 9999, 0, 0);
    let capture = Capture::start(
        b.netns(),
        "to-a",
        CaptureOptions {
            udp_dst_port: Some(9999),
            direction: Direction::Incoming,
            max_frames: 50,
            max_duration: Duration::from_secs(10),
        },
    )
    .unwrap();
    let sender = UdpSender::bind(
        a.netns(),
        SocketAddrV6::new(a.addr_to(1).unwrap(), 0, 0, 0),
        dst,
    )
    .unwrap()
    .batch(32);

    let exact = sender.send(&[0xab; 100], 40).unwrap();
    assert_eq!(exact.packets, 40);
    assert_eq!(exact.bytes, 4000);

    let started = std::time::Instant::now();
    let blast = sender
        .blast(&[0xcd; 64], Duration::from_millis(200))
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(blast.packets > 0);
    assert!(blast.packets_per_sec() > 0.0);

    // The capture stops by itself at its frame limit.
    let frames = capture.wait().unwrap();
    assert_eq!(frames.len(), 50);
    assert!(
        frames[..40]
            .iter()
            .all(|f| f.parse().unwrap().udp_payload() == [0xab; 100])
    );
    assert!(
        frames[40..]
            .iter()
            .all(|f| f.parse().unwrap().udp_payload() == [0xcd; 64])
    );
}

#[test]
fn dropping_a_namespace_stops_its_processes() {
    require_root();
    let ns = Netns::create(&netns::unique_name("spawn")).unwrap();
    let name = ns.name().to_owned();
    let mut child = ns.spawn("sleep", ["60"], None).unwrap();
    assert!(child.try_wait().unwrap().is_none());
    // The process really runs in the namespace (once `ip netns exec` has switched).
    use std::os::unix::fs::MetadataExt;
    let handle = std::fs::metadata(Path::new(netns::NETNS_RUN_DIR).join(&name)).unwrap();
    let expected = format!("net:[{}]", handle.ino());
    let pid = child.id();
    util::poll(
        "the child to enter the namespace",
        Duration::from_secs(5),
        Duration::from_millis(10),
        || {
            let link = std::fs::read_link(format!("/proc/{pid}/ns/net"))?;
            Ok((link.to_string_lossy() == expected).then_some(()))
        },
    )
    .unwrap();

    drop(ns);
    let status = child.wait_timeout(Duration::from_secs(10)).unwrap();
    assert!(status.is_some(), "child survived the namespace");
    assert!(!netns::list().unwrap().contains(&name));
}

/// Writes a stand-in agent and ctl that behave like the real ones at the process level
/// (socket appears, `status` answers, SIGTERM exits cleanly), to test the lifecycle
/// handling independently of the agent's progress.
fn fake_binaries(dir: &Path, agent_body: &str) {
    let ctl = r#"#!/bin/sh
[ "$1" = --socket ] || { echo "usage" >&2; exit 2; }
sock=$2; shift 2
[ -e "$sock" ] || { echo "cannot connect to $sock" >&2; exit 1; }
[ "$1" = --json ] && shift
case "$1" in
  status) echo '{"node_prefix": "fd6d:1:2:3::/64", "port": 9651}' ;;
  stats) echo '{"xdp": [{"name": "redirect", "packets": 5, "bytes": 500}], "agent": []}' ;;
  *) echo "unknown command $1" >&2; exit 2 ;;
esac
"#;
    let agent = format!("#!/bin/bash\n{agent_body}\n");
    for (name, body) in [("myconet-ctl", ctl), ("myconet-agent", agent.as_str())] {
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

#[test]
fn agent_process_lifecycle_with_stand_in_binaries() {
    require_root();
    let topo = Chain::new(2).build().unwrap();
    let bins = TempDir::new("fakebin").unwrap();
    fake_binaries(
        bins.path(),
        r#"while [ $# -gt 0 ]; do case "$1" in --socket) sock=$2; shift ;; esac; shift; done
echo "args ok, starting"
trap 'echo "got SIGTERM"; rm -f "$sock"; exit 0' TERM
sleep 0.3; touch "$sock"
for i in $(seq 600); do sleep 0.1; done"#,
    );
    let mut agent =
        AgentProcess::start(topo.node(0), bins.path(), AgentOptions::default()).unwrap();
    assert!(agent.is_running().unwrap());
    assert!(
        agent.log_tail(5).contains("args ok"),
        "{}",
        agent.log_tail(5)
    );
    let status = agent.status().unwrap();
    assert_eq!(status["port"], 9651);
    assert_eq!(
        counter(&agent.stats().unwrap(), "xdp", "redirect").unwrap(),
        5
    );
    let err = agent.ctl(&["bogus"]).unwrap_err();
    assert!(
        format!("{err:#}").contains("unknown command bogus"),
        "{err:#}"
    );
    assert!(agent.socket_path().exists());
    assert!(agent.state_dir().is_dir());
    let log = agent.log_path().to_owned();
    agent.keep_files();
    let exit = agent.stop().unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(util::tail(&log, 5).contains("got SIGTERM"));
    if let Some(dir) = log.parent() {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn agent_that_dies_at_startup_reports_its_log() {
    require_root();
    let topo = Chain::new(2).build().unwrap();
    let bins = TempDir::new("fakebin").unwrap();
    fake_binaries(bins.path(), "echo 'fatal: no such interface' >&2; exit 3");
    let err = AgentProcess::start(topo.node(1), bins.path(), AgentOptions::default()).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("exited during startup"), "{msg}");
    assert!(msg.contains("exit status 3"), "{msg}");
    assert!(msg.contains("fatal: no such interface"), "{msg}");
}

#[test]
fn topologies_side_by_side_do_not_collide() {
    require_root();
    let one = Chain::new(2).build().unwrap();
    let two = Chain::new(2).build().unwrap();
    assert_ne!(one.node(0).ns_name(), two.node(0).ns_name());
    let addr: Ipv6Addr = one.node(0).addr_to(1).unwrap();
    assert_eq!(addr.segments()[0], 0xfd00);
    one.ping_all_links().unwrap();
    two.ping_all_links().unwrap();
}
