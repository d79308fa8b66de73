//! The cleartext Myconet header (`myconet_common::wire`), which every relay and every
//! agent parses before anything is authenticated, and the body of a too-big report
//! (`myconet_common::too_big`), which a relay sends to a packet's source.

use myconet_common::{
    too_big,
    wire::{HEADER_LEN, Packet, PacketType, Repr, WireError, field},
};

/// Parses `data` as a header; whatever parses re-emits to the same 48 bytes, and what
/// does not is rejected for the reason its bytes show.
pub fn run(data: &[u8]) {
    let checked = Packet::new_checked(data);
    let unchecked = Packet::new_unchecked(data);
    match Repr::parse(&unchecked) {
        Ok(repr) => {
            let packet = checked.expect("a header that parses passes the length check");
            let mut out = vec![0u8; data.len()];
            out[HEADER_LEN..].copy_from_slice(&data[HEADER_LEN..]);
            let mut view = Packet::new_checked(&mut out[..]).expect("same length");
            repr.emit(&mut view);
            assert_eq!(repr.header_len(), HEADER_LEN);
            assert_eq!(out, data, "parse → emit must reproduce the bytes");
            let again = Repr::parse(&Packet::new_unchecked(&out[..])).expect("re-parse");
            assert_eq!(again, repr);
            assert_eq!(packet.payload(), &data[HEADER_LEN..]);
            // The associated data is the header with only the hop limit cleared.
            let aad = packet.associated_data();
            for (i, (a, d)) in aad.iter().zip(data).enumerate() {
                let want = if i == field::HOP_LIMIT { 0 } else { *d };
                assert_eq!(*a, want, "associated data byte {i}");
            }
            if repr.packet_type == PacketType::TooBig {
                too_big_round_trip(data);
            }
        }
        Err(WireError::Truncated(n)) => {
            assert_eq!(n, data.len());
            assert!(n < HEADER_LEN);
            assert!(checked.is_err());
        }
        Err(WireError::BadVersion(v)) => {
            assert_eq!(v, data[field::VERSION]);
            assert_ne!(v, myconet_common::wire::VERSION);
        }
        Err(WireError::UnknownType(t)) => {
            assert_eq!(t, data[field::TYPE]);
            assert!(PacketType::from_u8(t).is_none());
        }
    }
}

/// A too-big report that parses emits to a report that parses to the same value.
fn too_big_round_trip(data: &[u8]) {
    let Ok(packet) = too_big::Packet::new_checked(data) else {
        return;
    };
    let Ok(repr) = too_big::Repr::parse(&packet) else {
        return;
    };
    let mut out = [0u8; too_big::LEN];
    repr.emit(&mut too_big::Packet::new_unchecked(&mut out[..]));
    let again = too_big::Repr::parse(&too_big::Packet::new_checked(&out[..]).expect("length"))
        .expect("an emitted report parses");
    assert_eq!(again, repr, "too-big parse → emit → parse");
}
