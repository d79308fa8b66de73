use super::*;
use crate::{GroupSet, Hash, mri::PackageId};
use proptest::prelude::*;

fn groups(max_ranges: usize) -> impl Strategy<Value = GroupSet> {
    proptest::collection::vec((0u64..1 << 40, 1u64..100), 0..max_ranges).prop_map(|v| {
        let mut s = GroupSet::new();
        for (a, n) in v {
            s.insert_range(a..a + n);
        }
        s
    })
}

fn hash() -> impl Strategy<Value = Hash> {
    any::<[u8; 32]>().prop_map(Hash)
}

fn code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::NotFound),
        Just(ErrorCode::Busy),
        Just(ErrorCode::BadRequest),
        Just(ErrorCode::SizeMismatch),
        Just(ErrorCode::TooLarge),
        Just(ErrorCode::Unavailable),
        Just(ErrorCode::Cancelled),
    ]
}

/// Owned test messages (payload bytes kept beside the message).
fn message() -> impl Strategy<Value = (u8, u32, Hash, u64, GroupSet, Vec<u8>, ErrorCode, u32)> {
    (
        0u8..10,
        any::<u32>(),
        hash(),
        any::<u64>(),
        groups(8),
        proptest::collection::vec(any::<u8>(), 1..200),
        code(),
        any::<u32>(),
    )
}

fn build<'a>(
    (kind, id, h, n, g, bytes, code, retry): &'a (
        u8,
        u32,
        Hash,
        u64,
        GroupSet,
        Vec<u8>,
        ErrorCode,
        u32,
    ),
) -> Message<'a> {
    let (id, h, n) = (*id, *h, *n);
    match kind {
        0 => Message::GetManifest {
            id,
            package: PackageId(h),
        },
        1 => Message::GetGroups {
            id,
            blob: h,
            size: n,
            groups: g.clone(),
        },
        2 => Message::GetHave {
            id,
            target: HaveTarget::Blob { hash: h, size: n },
        },
        3 => Message::GetHave {
            id,
            target: HaveTarget::Package(PackageId(h)),
        },
        4 => Message::Cancel { id },
        5 => Message::Manifest { id, bytes },
        6 => Message::Groups {
            id,
            groups: g.clone(),
        },
        7 => Message::Data { id, bytes },
        8 => Message::Have {
            id,
            state: if g.is_empty() {
                HaveState::Complete
            } else {
                HaveState::Partial
            },
            groups: g.clone(),
        },
        _ => Message::Error {
            id,
            code: *code,
            retry_after_ms: *retry,
        },
    }
}

fn role_for(m: &Message<'_>) -> Role {
    if m.message_type().is_request() {
        Role::Provider
    } else {
        Role::Requester
    }
}

proptest! {
    /// emit, then reassemble from arbitrary stream splits, then parse: the same
    /// messages in the same order, and Display never panics.
    #[test]
    fn emit_deframe_parse_round_trip(msgs in proptest::collection::vec(message(), 1..6), step in 1usize..300) {
        let built: Vec<Message<'_>> = msgs.iter().map(build).collect();
        let role = role_for(&built[0]);
        let same_side: Vec<&Message<'_>> = built.iter().filter(|m| role_for(m) == role).collect();
        let mut stream = Vec::new();
        for m in &same_side {
            m.emit(&mut stream);
            prop_assert_eq!(m.to_bytes().len(), m.frame_len());
        }
        let mut d = Deframer::new(role);
        let mut parsed = 0;
        for piece in stream.chunks(step) {
            let mut input = piece;
            while let Some(frame) = d.next_frame(&mut input).unwrap() {
                let frame = Frame::new_checked(frame).unwrap();
                let m = Message::parse(&frame, role).unwrap();
                prop_assert_eq!(&m, same_side[parsed]);
                let _ = m.to_string();
                parsed += 1;
            }
        }
        prop_assert_eq!(parsed, same_side.len());
        prop_assert_eq!(d.buffered(), 0);
    }

    /// Any bytes: the deframer and parser return errors, never panic, and what parses
    /// re-emits to the same bytes (one encoding per message).
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), provider: bool) {
        let role = if provider { Role::Provider } else { Role::Requester };
        if let Ok(frame) = Frame::new_checked(&bytes[..])
            && let Ok(m) = Message::parse(&frame, role) {
                prop_assert_eq!(m.to_bytes(), &bytes[..frame.frame_len()]);
            }
        let mut d = Deframer::new(role);
        let mut input = &bytes[..];
        while let Ok(Some(_)) = d.next_frame(&mut input) {}
    }

    /// Valid frames with body bytes overwritten (ids, counts, ranges, states, codes,
    /// lengths inside the body): the deframer hands over exactly the frame, parsing
    /// never panics, and what parses re-emits to exactly the same bytes, so no message
    /// has two encodings.
    #[test]
    fn edited_bodies_parse_only_in_canonical_form(
        m in message(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let msg = build(&m);
        let role = role_for(&msg);
        let mut frame = msg.to_bytes();
        for (at, byte) in &edits {
            if frame.len() > HEADER_LEN {
                let i = HEADER_LEN + at.index(frame.len() - HEADER_LEN);
                frame[i] = *byte;
            }
        }
        let mut d = Deframer::new(role);
        let mut input = &frame[..];
        let got = d.next_frame(&mut input).map(|f| f.map(<[u8]>::to_vec));
        prop_assert_eq!(got, Ok(Some(frame.clone())));
        let f = Frame::new_checked(&frame[..]).unwrap();
        if let Ok(parsed) = Message::parse(&f, role) {
            prop_assert_eq!(parsed.to_bytes(), frame.clone());
            let _ = parsed.to_string();
        }
    }

    #[test]
    fn truncated_frames_are_refused(m in message(), cut in 0usize..400) {
        let msg = build(&m);
        let bytes = msg.to_bytes();
        let cut = cut % bytes.len();
        let refused = matches!(Frame::new_checked(&bytes[..cut]), Err(WireError::Truncated { .. }));
        prop_assert!(refused);
    }
}

#[test]
fn headers_are_checked_before_the_body_is_buffered() {
    // A data frame announcing 1 GiB: refused on its 8 header bytes.
    let mut h = vec![VERSION, MessageType::Data as u8, 0, 0];
    h.extend_from_slice(&(1u32 << 30).to_be_bytes());
    let mut d = Deframer::new(Role::Requester);
    let mut input = &h[..];
    assert_eq!(
        d.next_frame(&mut input),
        Err(WireError::TooLong {
            ty: MessageType::Data,
            len: 1 << 30,
            max: 4 + MAX_DATA_BYTES
        })
    );
    // A request sent to a requester, a response sent to a provider.
    let req = Message::Cancel { id: 1 }.to_bytes();
    assert_eq!(
        Deframer::new(Role::Requester).next_frame(&mut &req[..]),
        Err(WireError::WrongDirection(MessageType::Cancel))
    );
    let resp = Message::Data { id: 1, bytes: b"x" }.to_bytes();
    assert_eq!(
        Deframer::new(Role::Provider).next_frame(&mut &resp[..]),
        Err(WireError::WrongDirection(MessageType::Data))
    );
    let mut bad = req.clone();
    bad[0] = 2;
    assert_eq!(
        Deframer::new(Role::Provider).next_frame(&mut &bad[..]),
        Err(WireError::BadVersion(2))
    );
    let mut bad = req.clone();
    bad[1] = 0x7f;
    assert_eq!(
        Deframer::new(Role::Provider).next_frame(&mut &bad[..]),
        Err(WireError::UnknownType(0x7f))
    );
    let mut bad = req.clone();
    bad[3] = 1;
    assert_eq!(
        Deframer::new(Role::Provider).next_frame(&mut &bad[..]),
        Err(WireError::Reserved(1))
    );
}

#[test]
fn bodies_must_be_used_exactly() {
    let mut b = Message::Cancel { id: 7 }.to_bytes();
    b.push(0);
    b[7] = 5;
    let f = Frame::new_checked(&b[..]).unwrap();
    assert!(matches!(
        Message::parse(&f, Role::Provider),
        Err(WireError::TooLong { .. })
    ));
    let mut b = Message::GetHave {
        id: 7,
        target: HaveTarget::Package(PackageId(Hash::of(b"p"))),
    }
    .to_bytes();
    b.push(0);
    b[7] += 1;
    let f = Frame::new_checked(&b[..]).unwrap();
    assert_eq!(
        Message::parse(&f, Role::Provider),
        Err(WireError::BadField {
            ty: MessageType::GetHave,
            what: "1 bytes after the last field".into()
        })
    );
    let mut b = Message::Error {
        id: 7,
        code: ErrorCode::Busy,
        retry_after_ms: 5,
    }
    .to_bytes();
    b[12] = 99;
    let f = Frame::new_checked(&b[..]).unwrap();
    assert_eq!(
        Message::parse(&f, Role::Requester),
        Err(WireError::BadField {
            ty: MessageType::Error,
            what: "unknown error code 99".into()
        })
    );
    // A have reply listing groups with state complete is not canonical.
    let mut b = Message::Have {
        id: 1,
        state: HaveState::Partial,
        groups: GroupSet::from_range(0..3),
    }
    .to_bytes();
    b[12] = HaveState::Complete as u8;
    let f = Frame::new_checked(&b[..]).unwrap();
    assert!(matches!(
        Message::parse(&f, Role::Requester),
        Err(WireError::BadField { .. })
    ));
    // An empty data frame says nothing and is refused.
    let b = Message::Data { id: 1, bytes: b"" }.to_bytes();
    let f = Frame::new_checked(&b[..]).unwrap();
    assert!(matches!(
        Message::parse(&f, Role::Requester),
        Err(WireError::BadField { .. })
    ));
    assert_eq!(
        Message::GetGroups {
            id: 3,
            blob: Hash::of(b"x"),
            size: 9,
            groups: GroupSet::from_range(0..2)
        }
        .to_string(),
        format!(
            "get-groups id=3 blob={} size=9 groups={{0..2}}",
            Hash::of(b"x")
        )
    );
}

/// An 8-byte header announcing the largest manifest must not make a requester allocate
/// 16 MiB: memory follows the bytes that actually arrived (the sender pays for what we
/// hold), and a large frame's buffer is not kept once the next frame starts.
#[test]
fn memory_follows_the_bytes_received_not_the_announced_length() {
    let max = MessageType::Manifest.max_body();
    let mut h = vec![VERSION, MessageType::Manifest as u8, 0, 0];
    h.extend_from_slice(&(max as u32).to_be_bytes());
    h.extend_from_slice(&[0u8; 100]);
    let mut d = Deframer::new(Role::Requester);
    let mut input = &h[..];
    assert_eq!(d.next_frame(&mut input), Ok(None));
    assert_eq!(d.buffered(), 108);
    assert!(
        d.buf.capacity() <= 4096,
        "{} bytes held for 108 received",
        d.buf.capacity()
    );
    // A whole 1 MiB manifest frame, then a small frame: the big buffer is released.
    let big = vec![7u8; 1 << 20];
    let frame = Message::Manifest { id: 1, bytes: &big }.to_bytes();
    let small = Message::Error {
        id: 2,
        code: ErrorCode::NotFound,
        retry_after_ms: 0,
    }
    .to_bytes();
    let mut d = Deframer::new(Role::Requester);
    let mut input = &frame[..];
    assert_eq!(
        d.next_frame(&mut input).unwrap().map(<[u8]>::len),
        Some(frame.len())
    );
    let mut input = &small[..];
    assert_eq!(
        d.next_frame(&mut input).unwrap().map(<[u8]>::len),
        Some(small.len())
    );
    assert!(
        d.buf.capacity() <= Deframer::KEEP_CAPACITY,
        "{}",
        d.buf.capacity()
    );
}
