//! The seed inputs of every target, made with the agent's own writers so they are valid
//! messages the fuzzer mutates from. `cargo run -p myconet-fuzz --example write_seeds`
//! writes them to `fuzz/corpus/<target>/`; the replay tests also run them as made, so a
//! format change that breaks a seed shows at once.

use std::net::{Ipv6Addr, SocketAddrV6};

use myconet_common::wire::{DEFAULT_HOP_LIMIT, HEADER_LEN, Packet, PacketType, Repr};
use myconet_core::{
    peers::wire::{Hello, HelloAck, LinkMessage, frame_routing},
    routing::{SignedOrigin, wire},
    session::Inbound,
};

use crate::{
    discovery,
    session::{Scenario, keypair, underlay},
    xdp::differential,
};

/// One seed: target, file name, bytes.
pub type Seed = (&'static str, String, Vec<u8>);

fn header(ty: PacketType, payload: &[u8]) -> Vec<u8> {
    let repr = Repr {
        packet_type: ty,
        hop_limit: DEFAULT_HOP_LIMIT,
        flags: 0,
        session_id: 7,
        counter: 9,
        dst_addr: "fd6d:c::1".parse().expect("literal"),
        src_addr: "fd6d:a::1".parse().expect("literal"),
    };
    let mut buf = vec![0u8; HEADER_LEN + payload.len()];
    repr.emit(&mut Packet::new_unchecked(&mut buf[..]));
    buf[HEADER_LEN..].copy_from_slice(payload);
    buf
}

fn with_mode(mode: u8, datagram: &[u8]) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(datagram);
    v
}

/// Session seeds: real messages from a fresh scenario, with the mode that makes each
/// reach the state it is meant for.
fn session() -> Vec<(String, Vec<u8>)> {
    let mut s = Scenario::new();
    let now = s.now;
    let rng = ring::rand::SystemRandom::new();
    // An init from a fourth node to b (answered, or with load, a cookie).
    let mut d = myconet_core::session::SessionTable::new(
        keypair(4),
        myconet_core::session::Config::default(),
        now,
    )
    .expect("table");
    d.connect(s.b.local_addr(), None, now, &rng)
        .expect("connect");
    let init = d.poll_transmit().expect("init").datagram;
    // b's answers to it: a response, and under load a cookie reply.
    let response = match s.b.handle_datagram(underlay(4), &init, now, &rng) {
        Ok(Inbound::Handshake(_)) => s.b.poll_transmit().expect("response").datagram,
        other => panic!("b did not answer: {other:?}"),
    };
    // Sealed data on the established session.
    let b_addr = s.b.local_addr();
    s.a.send(b_addr, b"data".to_vec(), now, &rng).expect("send");
    let data = s.a.poll_transmit().expect("data").datagram;
    vec![
        ("init_from_stranger".into(), with_mode(0, &init)),
        ("init_under_load".into(), with_mode(1, &init)),
        ("init_from_peer_endpoint".into(), with_mode(8, &init)),
        ("response_to_pending".into(), with_mode(4, &response)),
        ("b_own_init_reflected".into(), with_mode(0, &s.b_init)),
        ("data_on_session".into(), with_mode(2 | 8, &data)),
        (
            "cookie_reply_to_pending".into(),
            with_mode(4, &header(PacketType::CookieReply, &[0x11; 48])),
        ),
        (
            "control_on_session".into(),
            with_mode(2 | 8, &header(PacketType::Control, &[0; 20])),
        ),
    ]
}

fn link() -> Vec<(String, Vec<u8>)> {
    let hello = LinkMessage::Hello(Hello {
        node_key: myconet_core::id::NodeKey([7; 32]),
        sequence: 3,
        timestamp_us: 123_456,
        observed_addr: "fd00::1".parse().expect("literal"),
        observed_port: 9651,
    });
    let ack = LinkMessage::HelloAck(HelloAck {
        sequence: 3,
        echoed_timestamp_us: 123_456,
        ack_delay_us: 50,
    });
    vec![
        ("hello".into(), hello.to_vec()),
        ("hello_ack".into(), ack.to_vec()),
        ("keepalive".into(), LinkMessage::Keepalive.to_vec()),
        ("beacon".into(), discovery::beacon(5, 9651, 0)),
        (
            "routing_frame".into(),
            frame_routing(&routing_payloads()[0].1).expect("frame"),
        ),
    ]
}

fn routing_payloads() -> Vec<(String, Vec<u8>)> {
    let key = keypair(5);
    let origin = SignedOrigin::sign(&*key, 1).expect("sign");
    let mut update = vec![wire::VERSION, 0];
    wire::put_signed_update(&mut update, &origin, 256);
    let mut mixed = vec![wire::VERSION, 0];
    wire::put_retraction(&mut mixed, 64, origin.prefix);
    wire::put_route_request(&mut mixed, 0, 0);
    wire::put_seqno_request(&mut mixed, 64, 8, 2, origin.prefix);
    mixed.extend_from_slice(&[0xee, 2, 0, 0]);
    vec![("update".into(), update), ("requests".into(), mixed)]
}

fn config() -> Vec<(String, Vec<u8>)> {
    let full = r#"interfaces = ["eth0", "eth1"]
port = 7000
state_dir = "/var/lib/myconet"
socket = "/run/myconet/agent.sock"
socket_mode = "0660"
xdp_mode = "driver"
dataplane = "auto"
manage_sysctl = true
tun_name = "myc0"
hello_interval_ms = 500
discover = ["eth1"]
peers = ["[fd00::1]:7000", "fd00::2", { endpoint = "[fd00::3]:7000", cost = 400 }]
[[routes]]
prefix = "fd6d:1:2:3::/64"
via = "fd00::1"
port = 9651
ifindex = 2
"#;
    vec![
        ("full".into(), full.as_bytes().to_vec()),
        (
            "relay".into(),
            b"tun = false\ndataplane = \"xdp\"\n".to_vec(),
        ),
    ]
}

fn content() -> Vec<(String, Vec<u8>)> {
    use myconet_content::{
        GroupSet, Hash, Manifest, PackagePath,
        manifest::{AuthorKey, FileEntry, Kind, Metadata},
        wire::{ErrorCode, Message},
    };
    let key = keypair(8);
    let file = |path: &str, data: &[u8]| FileEntry {
        path: PackagePath::new(path).expect("path"),
        size: data.len() as u64,
        executable: false,
        root: Hash::of(data),
    };
    let manifest = Manifest::new(
        AuthorKey::of(&key),
        1_700_000_000,
        Metadata {
            title: "Holiday".into(),
            tags: vec!["sea".into()],
            language: "en".into(),
            licence: "MIT".into(),
            kind: Kind::Site,
            ..Metadata::default()
        },
        vec![file("site/index.html", b"<html>"), file("a.jpg", b"jpeg")],
    )
    .expect("manifest");
    let signed = manifest.sign(&key).expect("sign");
    let blob = Hash::of(b"jpeg");
    // Requests (read by a provider) and responses (read by a requester), back to back.
    let mut requests = vec![4u8];
    for m in [
        Message::GetManifest {
            id: 1,
            package: signed.id(),
        },
        Message::GetGroups {
            id: 2,
            blob,
            size: 1 << 20,
            groups: GroupSet::from_range(0..8),
        },
        Message::Cancel { id: 2 },
    ] {
        requests.extend(m.to_bytes());
    }
    // Mode 0 with a 7-byte read size: a requester reading the responses.
    let mut responses = vec![7u8 << 3];
    for m in [
        Message::Manifest {
            id: 1,
            bytes: signed.bytes(),
        },
        Message::Groups {
            id: 2,
            groups: GroupSet::from_range(0..2),
        },
        Message::Data {
            id: 2,
            bytes: b"encoded",
        },
        Message::Error {
            id: 3,
            code: ErrorCode::Busy,
            retry_after_ms: 500,
        },
    ] {
        responses.extend(m.to_bytes());
    }
    let mut unsigned = vec![1u8];
    unsigned.extend(manifest.encode());
    let mut signed_seed = vec![2u8];
    signed_seed.extend(signed.bytes());
    let mri = format!(
        "{}\nsite/index.html",
        myconet_content::Mri::package(signed.id())
    );
    let mut names = vec![3u8];
    names.extend(mri.as_bytes());
    vec![
        ("requests".into(), requests),
        ("responses".into(), responses),
        ("manifest".into(), unsigned),
        ("signed_manifest".into(), signed_seed),
        ("names".into(), names),
    ]
}

fn xdp() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = differential::base_frames()
        .into_iter()
        .map(|(name, f)| (name.to_string(), with_mode(0, &f)))
        .collect();
    // The same flows arriving on v2 (redirected back towards v0, or not ours there).
    let peer = SocketAddrV6::new(
        "fd00:2::2".parse().expect("literal"),
        differential::PORT,
        0,
        0,
    );
    let to: Ipv6Addr = "fd00:2::1".parse().expect("literal");
    out.push((
        "v2_redirect".into(),
        with_mode(
            1,
            &differential::frame(
                peer,
                to,
                PacketType::Data,
                "fd6d:c::1".parse().expect("literal"),
                64,
                b"x",
            ),
        ),
    ));
    out
}

/// Every seed of every target.
pub fn all() -> Vec<Seed> {
    let mut out = Vec::new();
    let mut add = |target: &'static str, seeds: Vec<(String, Vec<u8>)>| {
        out.extend(seeds.into_iter().map(|(n, b)| (target, n, b)));
    };
    add(
        "header",
        vec![
            ("data".into(), header(PacketType::Data, b"ciphertext")),
            ("init".into(), header(PacketType::HandshakeInit, &[1; 166])),
            ("bare".into(), header(PacketType::Control, &[])),
            ("too_big".into(), {
                // A report quoting a data header, with room for the signature.
                let mut body = vec![0x05, 0x8c, 0, 48];
                body.extend(header(PacketType::Data, &[]));
                body.extend([0u8; 64]);
                header(PacketType::TooBig, &body)
            }),
        ],
    );
    add("session", session());
    add("link", link());
    add("routing", routing_payloads());
    let mut beacons = vec![
        ("beacon".to_string(), {
            let mut v = vec![0, 2];
            v.extend(discovery::beacon(5, 9651, 0));
            v
        }),
        ("own_beacon".to_string(), {
            let mut v = vec![0, 3];
            v.extend(discovery::beacon(2, 9651, 0));
            v
        }),
    ];
    beacons.push(("stale_beacon".into(), {
        let mut v = vec![0, 4];
        v.extend(discovery::beacon(6, 9651, 3_600_000_000));
        v
    }));
    add("discovery", beacons);
    add("config", config());
    add("content", content());
    add("xdp", xdp());
    out
}
