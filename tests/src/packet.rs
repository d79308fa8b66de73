//! Myconet test packets: datagrams for UDP sockets, whole Ethernet/IPv6/UDP frames for
//! `BPF_PROG_TEST_RUN` fixtures, and a parser for frames the XDP program or a capture
//! hands back.
//!
//! Frames are built and checked byte by byte here rather than with a packet library so
//! the tests check the data plane against an independent, obviously simple encoder.

use std::net::Ipv6Addr;

use anyhow::{Context, Result, bail, ensure};
use myconet_common::checksum;
use myconet_common::wire::{HEADER_LEN, Packet, Repr};

/// Ethernet header length.
pub const ETH_LEN: usize = 14;
/// Fixed IPv6 header length.
pub const IPV6_LEN: usize = 40;
/// UDP header length.
pub const UDP_LEN: usize = 8;
/// Ethertype of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// IPv6 next-header value of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// Hop limit [`frame`] puts in the IPv6 header.
pub const IP_HOP_LIMIT: u8 = 64;

/// A Myconet datagram as a UDP socket sends it: the header from `repr`, then `payload`.
pub fn datagram(repr: &Repr, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; HEADER_LEN + payload.len()];
    repr.emit(&mut Packet::new_unchecked(&mut buf[..]));
    buf[HEADER_LEN..].copy_from_slice(payload);
    buf
}

/// A whole Ethernet/IPv6/UDP frame carrying the Myconet datagram `repr` + `payload`, with
/// a correct UDP checksum, as it would arrive at an XDP program.
#[allow(clippy::too_many_arguments)] // mirrors the header fields one to one
pub fn frame(
    eth_src: [u8; 6],
    eth_dst: [u8; 6],
    ip_src: Ipv6Addr,
    ip_dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    repr: &Repr,
    payload: &[u8],
) -> Vec<u8> {
    udp_frame(
        eth_src,
        eth_dst,
        ip_src,
        ip_dst,
        sport,
        dport,
        &datagram(repr, payload),
    )
}

/// `frame` (an Ethernet/IPv6/UDP frame) with its UDP checksum replaced by the partial
/// one a sender's kernel leaves with TX checksum offload (the pseudo-header sum only),
/// as such a frame arrives at an XDP program on a veth.
///
/// # Panics
/// If `frame` is not an Ethernet/IPv6/UDP frame.
pub fn with_partial_checksum(mut frame: Vec<u8>) -> Vec<u8> {
    let p = parse_frame(&frame).expect("an Ethernet/IPv6/UDP frame");
    let partial = checksum::udp_ipv6_partial(&p.ip_src.octets(), &p.ip_dst.octets(), p.udp_len);
    let at = ETH_LEN + IPV6_LEN + 6;
    frame[at..at + 2].copy_from_slice(&partial.to_be_bytes());
    frame
}

/// The datagrams of a UDP GSO superpacket (an Ethernet/IPv6/UDP frame whose payload is
/// several datagrams' payloads of `gso_size` bytes, the last one shorter), as the
/// receiver's stack cuts it: each with the same headers, its own lengths and, when
/// `partial` (the skb was `CHECKSUM_PARTIAL`), its own partial checksum, else a full
/// one. A stock veth carries such superpackets from a sender's UDP GSO to a receiver
/// without XDP whole, so a packet tap there sees one frame for many datagrams. `None`
/// for a frame that is not Ethernet/IPv6/UDP or a `gso_size` of 0.
pub fn split_udp_gso(frame: &[u8], gso_size: usize, partial: bool) -> Option<Vec<Vec<u8>>> {
    let p = parse_frame(frame).ok()?;
    if gso_size == 0 {
        return None;
    }
    let headers = &frame[..ETH_LEN + IPV6_LEN + UDP_LEN];
    let mut out = Vec::new();
    for chunk in p.udp_payload().chunks(gso_size) {
        let mut seg = Vec::with_capacity(headers.len() + chunk.len());
        seg.extend_from_slice(headers);
        seg.extend_from_slice(chunk);
        let len = u16::try_from(UDP_LEN + chunk.len()).ok()?.to_be_bytes();
        seg[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&len);
        let udp = ETH_LEN + IPV6_LEN;
        seg[udp + 4..udp + 6].copy_from_slice(&len);
        seg[udp + 6..udp + 8].copy_from_slice(&[0, 0]);
        let (src, dst) = (p.ip_src.octets(), p.ip_dst.octets());
        let csum = if partial {
            checksum::udp_ipv6_partial(&src, &dst, u16::from_be_bytes(len))
        } else {
            checksum::udp_ipv6(&src, &dst, &seg[udp..])
        };
        seg[udp + 6..udp + 8].copy_from_slice(&csum.to_be_bytes());
        out.push(seg);
    }
    Some(out)
}

/// A whole Ethernet/IPv6/UDP frame around an arbitrary UDP payload, e.g. a truncated or
/// malformed Myconet header the data plane must reject.
///
/// # Panics
/// If the payload does not fit an IPv6 packet without jumbograms (64 KiB), which no test
/// frame comes near.
pub fn udp_frame(
    eth_src: [u8; 6],
    eth_dst: [u8; 6],
    ip_src: Ipv6Addr,
    ip_dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    udp_payload: &[u8],
) -> Vec<u8> {
    let udp_len = u16::try_from(UDP_LEN + udp_payload.len())
        .expect("UDP payload larger than 64 KiB in a test frame");
    let mut f = Vec::with_capacity(ETH_LEN + IPV6_LEN + usize::from(udp_len));
    f.extend_from_slice(&eth_dst);
    f.extend_from_slice(&eth_src);
    f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
    // Version 6, traffic class 0, flow label 0.
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.push(IPPROTO_UDP);
    f.push(IP_HOP_LIMIT);
    f.extend_from_slice(&ip_src.octets());
    f.extend_from_slice(&ip_dst.octets());
    let udp_start = f.len();
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(udp_payload);
    let sum = checksum::udp_ipv6(&ip_src.octets(), &ip_dst.octets(), &f[udp_start..]);
    f[udp_start + 6..udp_start + 8].copy_from_slice(&sum.to_be_bytes());
    f
}

/// The fields of an Ethernet/IPv6/UDP frame, for assertions on what the data plane sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedFrame {
    /// Destination MAC.
    pub eth_dst: [u8; 6],
    /// Source MAC.
    pub eth_src: [u8; 6],
    /// IPv6 source.
    pub ip_src: Ipv6Addr,
    /// IPv6 destination.
    pub ip_dst: Ipv6Addr,
    /// IPv6 traffic class.
    pub traffic_class: u8,
    /// IPv6 flow label (20 bits; the kernel picks one per flow unless told otherwise).
    pub flow_label: u32,
    /// IPv6 hop limit.
    pub hop_limit: u8,
    /// IPv6 payload length field.
    pub payload_len: u16,
    /// UDP source port.
    pub sport: u16,
    /// UDP destination port.
    pub dport: u16,
    /// UDP length field.
    pub udp_len: u16,
    /// UDP checksum field as found.
    pub udp_checksum: u16,
    /// UDP header and payload (exactly `udp_len` bytes).
    pub udp_segment: Vec<u8>,
}

impl ParsedFrame {
    /// The UDP payload: the Myconet header and what follows it.
    pub fn udp_payload(&self) -> &[u8] {
        &self.udp_segment[UDP_LEN..]
    }

    /// The Myconet header bytes (fewer than [`HEADER_LEN`] if the datagram is truncated).
    pub fn myconet_header(&self) -> &[u8] {
        let p = self.udp_payload();
        &p[..p.len().min(HEADER_LEN)]
    }

    /// The bytes after the Myconet header.
    pub fn myconet_payload(&self) -> &[u8] {
        let p = self.udp_payload();
        &p[p.len().min(HEADER_LEN)..]
    }

    /// The parsed Myconet header.
    pub fn repr(&self) -> Result<Repr> {
        let packet = Packet::new_checked(self.udp_payload())?;
        Ok(Repr::parse(&packet)?)
    }

    /// Whether the UDP checksum field holds only the pseudo-header sum, as a sender's
    /// kernel leaves it for the hardware with TX checksum offload (seen on the sender's
    /// side of a veth, or relayed by a data plane that lost the skb's checksum state).
    pub fn checksum_partial(&self) -> bool {
        self.udp_checksum
            == checksum::udp_ipv6_partial(
                &self.ip_src.octets(),
                &self.ip_dst.octets(),
                self.udp_len,
            )
    }

    /// Whether the UDP checksum is correct for the addresses and segment, i.e. whether
    /// incremental checksum updates along the way were done right.
    pub fn checksum_valid(&self) -> bool {
        checksum::udp_ipv6_valid(
            &self.ip_src.octets(),
            &self.ip_dst.octets(),
            &self.udp_segment,
        )
    }
}

/// Parses an Ethernet/IPv6/UDP frame (no VLAN tags, no IPv6 extension headers, which is
/// all Myconet relays handle). Trailing bytes after the IPv6 payload are ignored.
pub fn parse_frame(frame: &[u8]) -> Result<ParsedFrame> {
    ensure!(
        frame.len() >= ETH_LEN + IPV6_LEN + UDP_LEN,
        "frame of {} bytes is too short for Ethernet/IPv6/UDP",
        frame.len()
    );
    let eth_dst = six(&frame[0..6])?;
    let eth_src = six(&frame[6..12])?;
    let ethertype = be16(frame, 12);
    if ethertype != ETHERTYPE_IPV6 {
        bail!("ethertype {ethertype:#06x} is not IPv6");
    }
    let ip = &frame[ETH_LEN..];
    let first = u32::from_be_bytes([ip[0], ip[1], ip[2], ip[3]]);
    let version = first >> 28;
    ensure!(version == 6, "IP version {version}, expected 6");
    let traffic_class = ((first >> 20) & 0xff) as u8;
    let flow_label = first & 0x000f_ffff;
    let payload_len = be16(ip, 4);
    let next_header = ip[6];
    ensure!(
        next_header == IPPROTO_UDP,
        "IPv6 next header {next_header} is not UDP"
    );
    let hop_limit = ip[7];
    let ip_src = Ipv6Addr::from(sixteen(&ip[8..24])?);
    let ip_dst = Ipv6Addr::from(sixteen(&ip[24..40])?);
    let ip_payload = &ip[IPV6_LEN..];
    ensure!(
        ip_payload.len() >= usize::from(payload_len),
        "IPv6 payload length {payload_len} exceeds the {} bytes present",
        ip_payload.len()
    );
    let udp = &ip_payload[..usize::from(payload_len)];
    ensure!(udp.len() >= UDP_LEN, "IPv6 payload too short for UDP");
    let udp_len = be16(udp, 4);
    ensure!(
        usize::from(udp_len) >= UDP_LEN && usize::from(udp_len) <= udp.len(),
        "UDP length {udp_len} does not fit the IPv6 payload of {payload_len}"
    );
    Ok(ParsedFrame {
        eth_dst,
        eth_src,
        ip_src,
        ip_dst,
        traffic_class,
        flow_label,
        hop_limit,
        payload_len,
        sport: be16(udp, 0),
        dport: be16(udp, 2),
        udp_len,
        udp_checksum: be16(udp, 6),
        udp_segment: udp[..usize::from(udp_len)].to_vec(),
    })
}

/// The UDP destination port of an Ethernet/IPv6/UDP frame, or `None` for anything else;
/// cheap enough for a capture loop's filter.
pub fn udp_dst_port(frame: &[u8]) -> Option<u16> {
    if frame.len() < ETH_LEN + IPV6_LEN + UDP_LEN
        || be16(frame, 12) != ETHERTYPE_IPV6
        || frame[ETH_LEN + 6] != IPPROTO_UDP
    {
        return None;
    }
    Some(be16(frame, ETH_LEN + IPV6_LEN + 2))
}

fn be16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

fn six(b: &[u8]) -> Result<[u8; 6]> {
    b.try_into().context("MAC address slice")
}

fn sixteen(b: &[u8]) -> Result<[u8; 16]> {
    b.try_into().context("IPv6 address slice")
}

#[cfg(test)]
mod tests {
    use super::*;
    use myconet_common::wire::{DEFAULT_HOP_LIMIT, DEFAULT_PORT, PacketType};

    fn repr() -> Repr {
        Repr {
            packet_type: PacketType::Data,
            hop_limit: DEFAULT_HOP_LIMIT,
            flags: 0,
            session_id: 0x0102_0304,
            counter: 42,
            dst_addr: "fd6d:1:2:3::1".parse().unwrap(),
            src_addr: "fd6d:4:5:6::1".parse().unwrap(),
        }
    }

    const SRC_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const DST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn sample(payload: &[u8]) -> Vec<u8> {
        frame(
            SRC_MAC,
            DST_MAC,
            "fd00::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            40000,
            DEFAULT_PORT,
            &repr(),
            payload,
        )
    }

    #[test]
    fn datagram_is_header_then_payload() {
        let d = datagram(&repr(), b"sealed");
        assert_eq!(d.len(), HEADER_LEN + 6);
        assert_eq!(&d[HEADER_LEN..], b"sealed");
        let parsed = Repr::parse(&Packet::new_checked(&d[..]).unwrap()).unwrap();
        assert_eq!(parsed, repr());
    }

    #[test]
    fn frame_roundtrips_through_parser() {
        let f = sample(b"hello, relay");
        assert_eq!(f.len(), ETH_LEN + IPV6_LEN + UDP_LEN + HEADER_LEN + 12);
        let p = parse_frame(&f).unwrap();
        assert_eq!(p.eth_src, SRC_MAC);
        assert_eq!(p.eth_dst, DST_MAC);
        assert_eq!(p.ip_src, "fd00::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.ip_dst, "fd00::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.hop_limit, IP_HOP_LIMIT);
        assert_eq!((p.traffic_class, p.flow_label), (0, 0));
        assert_eq!(usize::from(p.payload_len), UDP_LEN + HEADER_LEN + 12);
        assert_eq!(p.payload_len, p.udp_len);
        assert_eq!((p.sport, p.dport), (40000, DEFAULT_PORT));
        assert_eq!(p.myconet_header().len(), HEADER_LEN);
        assert_eq!(p.myconet_payload(), b"hello, relay");
        assert_eq!(p.repr().unwrap(), repr());
        assert!(p.checksum_valid());
        assert_ne!(p.udp_checksum, 0);
        assert_eq!(udp_dst_port(&f), Some(DEFAULT_PORT));
    }

    #[test]
    fn partial_checksums_are_recognised() {
        let f = sample(b"opaque payload");
        let full = parse_frame(&f).unwrap();
        assert!(full.checksum_valid() && !full.checksum_partial());
        let partial = parse_frame(&with_partial_checksum(f)).unwrap();
        assert!(partial.checksum_partial() && !partial.checksum_valid());
    }

    #[test]
    fn gso_superpackets_split_into_the_datagrams_sent() {
        let payloads: Vec<Vec<u8>> = (0..3u8)
            .map(|i| (0..if i == 2 { 50 } else { 200 }).map(|j| j ^ i).collect())
            .collect();
        let datagrams: Vec<Vec<u8>> = payloads.iter().map(|p| datagram(&repr(), p)).collect();
        let single = |d: &[u8]| {
            udp_frame(
                SRC_MAC,
                DST_MAC,
                "fd00::1".parse().unwrap(),
                "fd00::2".parse().unwrap(),
                40000,
                DEFAULT_PORT,
                d,
            )
        };
        let superpacket = single(&datagrams.concat());
        let gso_size = datagrams[0].len();
        let full = split_udp_gso(&superpacket, gso_size, false).unwrap();
        let want: Vec<Vec<u8>> = datagrams.iter().map(|d| single(d)).collect();
        assert_eq!(full, want);
        let partial = split_udp_gso(&superpacket, gso_size, true).unwrap();
        let want: Vec<Vec<u8>> = want.into_iter().map(with_partial_checksum).collect();
        assert_eq!(partial, want);
        assert!(split_udp_gso(&superpacket, 0, true).is_none());
        assert!(split_udp_gso(&superpacket[..20], 100, true).is_none());
    }

    #[test]
    fn checksum_detects_corruption() {
        for at in [
            ETH_LEN + 8,
            ETH_LEN + 30,
            ETH_LEN + IPV6_LEN,
            ETH_LEN + IPV6_LEN + 20,
        ] {
            let mut f = sample(b"payload!");
            f[at] ^= 0x01;
            let p = parse_frame(&f).unwrap();
            assert!(!p.checksum_valid(), "flip at {at} went unnoticed");
        }
        // Traffic class and flow label are parsed.
        let mut f = sample(b"x");
        f[ETH_LEN..ETH_LEN + 4].copy_from_slice(&[0x6a, 0xbc, 0xde, 0xf1]);
        let p = parse_frame(&f).unwrap();
        assert_eq!((p.traffic_class, p.flow_label), (0xab, 0xcdef1));
        // The hop limit is not covered by the UDP checksum.
        let mut f = sample(b"x");
        f[ETH_LEN + 7] = 1;
        assert!(parse_frame(&f).unwrap().checksum_valid());
    }

    #[test]
    fn odd_and_empty_payloads() {
        for len in [0usize, 1, 7, 1200] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let p = parse_frame(&sample(&payload)).unwrap();
            assert!(p.checksum_valid(), "len {len}");
            assert_eq!(p.myconet_payload(), &payload[..]);
        }
    }

    #[test]
    fn malformed_frames_are_rejected() {
        let good = sample(b"abc");
        assert!(parse_frame(&good[..ETH_LEN + IPV6_LEN]).is_err());
        let mut bad = good.clone();
        bad[12] = 0x08;
        bad[13] = 0x00;
        assert!(parse_frame(&bad).is_err());
        assert_eq!(udp_dst_port(&bad), None);
        let mut bad = good.clone();
        bad[ETH_LEN + 6] = 6;
        assert!(parse_frame(&bad).is_err());
        let mut bad = good.clone();
        bad[ETH_LEN] = 0x40;
        assert!(parse_frame(&bad).is_err());
        // Truncated: the IPv6 payload length claims more than is there.
        assert!(parse_frame(&good[..good.len() - 1]).is_err());
        // UDP length larger than the IPv6 payload.
        let mut bad = good.clone();
        bad[ETH_LEN + IPV6_LEN + 4] = 0xff;
        assert!(parse_frame(&bad).is_err());
        // Trailing padding is fine.
        let mut padded = good.clone();
        padded.extend_from_slice(&[0; 4]);
        assert!(parse_frame(&padded).unwrap().checksum_valid());
    }

    #[test]
    fn short_myconet_payload_is_exposed_not_rejected() {
        let f = udp_frame(
            SRC_MAC,
            DST_MAC,
            "fd00::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            1,
            DEFAULT_PORT,
            &[1, 1, 64],
        );
        let p = parse_frame(&f).unwrap();
        assert!(p.checksum_valid());
        assert_eq!(p.myconet_header(), &[1, 1, 64]);
        assert!(p.myconet_payload().is_empty());
        assert!(p.repr().is_err());
    }
}
