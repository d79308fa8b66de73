use super::*;
use proptest::prelude::*;

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub(crate) fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn encode_all(data: &[u8], ob: &Outboard<Vec<u8>>, groups: &GroupSet) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = Encoder::new(ob.root(), ob.size(), groups).unwrap();
    // Small fills, so the resumable path is what is tested.
    while !enc.fill(data, ob, &mut out, 700).unwrap() {}
    out
}

/// Feeds `encoded` in pieces of `step` bytes; returns the verified groups, the
/// received data laid out in a blob-sized buffer, the partial outboard, or the error.
fn decode_all(
    root: Hash,
    size: u64,
    groups: &GroupSet,
    encoded: &[u8],
    step: usize,
) -> (GroupSet, Vec<u8>, Outboard<Vec<u8>>, Option<VerifyError>) {
    let mut dec = Decoder::new(root, size, groups).unwrap();
    let mut got = GroupSet::new();
    let mut blob = vec![0u8; size as usize];
    let mut ob = Outboard::new(root, size, vec![0u8; outboard_size(size) as usize]);
    for piece in encoded.chunks(step.max(1)) {
        let mut input = piece;
        loop {
            match dec.next(&mut input) {
                Ok(Some(Verified::Parent(p))) => ob.save(&p).unwrap(),
                Ok(Some(Verified::Group {
                    group,
                    offset,
                    data,
                })) => {
                    assert_eq!(offset, group * GROUP_BYTES);
                    blob[offset as usize..offset as usize + data.len()].copy_from_slice(data);
                    got.insert(group);
                }
                Ok(None) => break,
                Err(e) => return (got, blob, ob, Some(e)),
            }
        }
        assert!(input.is_empty() || dec.remaining() == 0);
    }
    (got, blob, ob, None)
}

fn sizes() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        Just(1),
        Just(16 * 1024 - 1),
        Just(16 * 1024),
        Just(16 * 1024 + 1),
        1usize..400_000,
    ]
}

fn groups_of(size: usize) -> impl Strategy<Value = GroupSet> {
    let count = group_count(size as u64);
    proptest::collection::vec((0..count.max(1), 1u64..6), 0..5).prop_map(move |v| {
        let mut s = GroupSet::new();
        for (a, n) in v {
            s.insert_range(a.min(count)..(a + n).min(count));
        }
        s
    })
}

fn case() -> impl Strategy<Value = (usize, GroupSet, u64, usize)> {
    sizes().prop_flat_map(|size| (Just(size), groups_of(size), any::<u64>(), 1usize..40_000))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The byte count of a group set, computed on ranges, is the sum over its groups.
    #[test]
    fn groups_byte_len_is_the_sum_of_the_groups((size, groups, _, _) in case()) {
        let size = size as u64;
        let each: u64 = groups.iter().map(|g| {
            let r = group_bytes(size, g);
            r.end - r.start
        }).sum();
        prop_assert_eq!(groups_byte_len(size, &groups), each);
        prop_assert_eq!(groups_byte_len(size, &GroupSet::all(group_count(size))), size);
    }

    /// What the encoder sends is byte for byte what bao-tree's own validated encoder
    /// sends, its length is known in advance, and the decoder hands back exactly the
    /// requested groups with the true data, whatever the split of the stream.
    #[test]
    fn round_trip_matches_bao_tree((size, groups, seed, step) in case()) {
        let data = bytes(size, seed);
        let ob = Outboard::create(&data);
        prop_assert_eq!(ob.root(), Hash::of(&data));
        prop_assert_eq!(ob.data().len() as u64, outboard_size(size as u64));
        let encoded = encode_all(&data, &ob, &groups);
        let mut reference = Vec::new();
        encode_groups(&data[..], &ob, &groups, &mut reference).unwrap();
        prop_assert_eq!(&encoded, &reference);
        prop_assert_eq!(encoded.len() as u64, encoded_len(size as u64, &groups).unwrap());

        let (got, blob, partial_ob, err) = decode_all(ob.root(), size as u64, &groups, &encoded, step);
        prop_assert_eq!(err, None);
        prop_assert_eq!(&got, &groups);
        for g in groups.iter() {
            let r = group_bytes(size as u64, g);
            prop_assert_eq!(&blob[r.start as usize..r.end as usize], &data[r.start as usize..r.end as usize]);
        }
        // What was received can be served again: the partial outboard holds every
        // proof the received groups need, and they verify in the partial blob.
        prop_assert_eq!(encode_all(&blob, &partial_ob, &groups), encoded);
        prop_assert_eq!(verify_groups(&blob[..], &partial_ob, &GroupSet::all(group_count(size as u64))).unwrap(), groups);
    }

    /// Any received range verifies iff it is the true data: flipping any bit of the
    /// encoding makes the decoder fail (and it never hands out a group whose bytes are
    /// not the true ones); bao-tree's own decoder agrees that the stream is bad.
    #[test]
    fn any_corruption_is_refused((size, groups, seed, step) in case(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let data = bytes(size, seed);
        let ob = Outboard::create(&data);
        let mut encoded = encode_all(&data, &ob, &groups);
        prop_assume!(!encoded.is_empty());
        let i = at.index(encoded.len());
        encoded[i] ^= 1 << bit;
        let (got, blob, _, err) = decode_all(ob.root(), size as u64, &groups, &encoded, step);
        prop_assert!(err.is_some(), "corruption at byte {} accepted", i);
        for g in got.iter() {
            let r = group_bytes(size as u64, g);
            prop_assert_eq!(&blob[r.start as usize..r.end as usize], &data[r.start as usize..r.end as usize]);
        }
        let ranges = chunk_ranges(size as u64, &groups).unwrap();
        let mut bao_ob = bao_tree::io::outboard::PostOrderMemOutboard {
            root: ob.root().into(),
            tree: tree(size as u64),
            data: vec![0u8; outboard_size(size as u64) as usize],
        };
        let mut target = Vec::new();
        prop_assert!(bao_tree::io::sync::decode_ranges(&encoded[..], &ranges, &mut target, &mut bao_ob).is_err());
    }

    /// Garbage decoded against a real root never panics and never verifies a group.
    #[test]
    fn garbage_never_verifies((size, groups, seed, step) in case(), junk_seed: u64) {
        let data = bytes(size, seed);
        let root = Hash::of(&data);
        let len = encoded_len(size as u64, &groups).unwrap() as usize;
        let junk = bytes(len, junk_seed);
        let (got, _, _, err) = decode_all(root, size as u64, &groups, &junk, step);
        // Short encodings (a 1-byte file is its own encoding) can be the truth by chance.
        let is_true = junk == encode_all(&data, &Outboard::create(&data), &groups);
        prop_assert!(got.is_empty() || is_true);
        prop_assert!(groups.is_empty() || is_true || err.is_some());
    }
}

#[test]
fn out_of_range_groups_are_refused() {
    let size = 3 * GROUP_BYTES + 5;
    assert_eq!(group_count(size), 4);
    let e = Decoder::new(Hash::of(b""), size, &GroupSet::from_range(2..6)).unwrap_err();
    assert_eq!(
        e,
        RangeError {
            group: 4,
            size,
            count: 4
        }
    );
    assert!(Encoder::new(Hash::of(b""), 0, &GroupSet::from_range(0..1)).is_err());
    assert_eq!(
        e.to_string(),
        "group 4 is past the end of a blob of 49157 bytes (4 groups)"
    );
}

#[test]
fn wrong_root_fails_on_the_first_item() {
    let data = bytes(100_000, 7);
    let ob = Outboard::create(&data);
    let all = GroupSet::all(group_count(data.len() as u64));
    let encoded = encode_all(&data, &ob, &all);
    let (got, _, _, err) = decode_all(
        Hash::of(b"other"),
        data.len() as u64,
        &all,
        &encoded,
        1 << 20,
    );
    assert!(got.is_empty());
    assert_eq!(err, Some(VerifyError::Proof { groups: 0..7 }));
    // A size that disagrees with the data: with the same tree shape the groups before
    // the last still verify (they are the root's true data), the last never does.
    let size = data.len() as u64 + 1;
    let mut dec = Decoder::new(ob.root(), size, &all).unwrap();
    let mut input = &encoded[..];
    let mut got = GroupSet::new();
    while let Some(item) = dec.next(&mut input).unwrap() {
        if let Verified::Group { group, .. } = item {
            got.insert(group);
        }
    }
    assert_eq!(got, GroupSet::from_range(0..6));
    assert!(!dec.is_done());
    let mut tail = &[0u8][..];
    assert_eq!(dec.next(&mut tail), Err(VerifyError::Data { group: 6 }));
    // With another shape, the first proof already fails.
    let (got, _, _, err) = decode_all(
        ob.root(),
        20 * GROUP_BYTES,
        &GroupSet::all(20),
        &encoded,
        1 << 20,
    );
    assert!(got.is_empty() && err.is_some());
}

#[test]
fn local_corruption_is_found_and_never_sent() {
    let mut data = bytes(10 * GROUP_BYTES as usize + 100, 9);
    let ob = Outboard::create(&data);
    let all = GroupSet::all(11);
    data[3 * GROUP_BYTES as usize + 17] ^= 1;
    assert_eq!(
        verify_groups(&data[..], &ob, &all).unwrap(),
        all.difference(&GroupSet::from_range(3..4))
    );
    let mut out = Vec::new();
    let err = encode_groups(&data[..], &ob, &all, &mut out).unwrap_err();
    assert!(matches!(
        err,
        EncodeError::Corrupt(VerifyError::Data { group: 3 })
    ));
    let mut enc = Encoder::new(ob.root(), ob.size(), &all).unwrap();
    let mut out = Vec::new();
    let err = loop {
        match enc.fill(&data[..], &ob, &mut out, 1) {
            Ok(false) => {}
            Ok(true) => panic!("corrupt group encoded"),
            Err(e) => break e,
        }
    };
    assert!(matches!(
        err,
        EncodeError::Corrupt(VerifyError::Data { group: 3 })
    ));
    // Nothing of group 3 made it into the output.
    assert_eq!(
        out.len() as u64,
        encoded_len(ob.size(), &GroupSet::from_range(0..3)).unwrap()
    );

    // A damaged proof pair hides the groups under it, and only those.
    let data = bytes(10 * GROUP_BYTES as usize + 100, 9);
    let mut ob = Outboard::create(&data);
    ob.data_mut()[0] ^= 1; // post-order: the first pair is the parent of groups 0 and 1
    assert_eq!(
        verify_groups(&data[..], &ob, &all).unwrap(),
        GroupSet::from_range(2..11)
    );
    // An outboard of zeros (a partial blob that received nothing) proves nothing.
    let zeros = Outboard::new(ob.root(), ob.size(), vec![0u8; ob.data().len()]);
    assert!(verify_groups(&data[..], &zeros, &all).unwrap().is_empty());
    // A short outboard reads as zeros, not as an error or a panic.
    let short = Outboard::new(ob.root(), ob.size(), vec![0u8; 10]);
    assert!(verify_groups(&data[..], &short, &all).unwrap().is_empty());
}

#[test]
fn empty_and_single_group_blobs() {
    assert_eq!(group_count(0), 0);
    assert_eq!(outboard_size(0), 0);
    assert_eq!(encoded_len(0, &GroupSet::new()).unwrap(), 0);
    let ob = Outboard::create(b"");
    assert_eq!(ob.root(), Hash::of(b""));
    assert!(
        Decoder::new(ob.root(), 0, &GroupSet::new())
            .unwrap()
            .is_done()
    );
    // One group: no proof at all, the data is checked against the root directly.
    let data = bytes(5000, 1);
    let ob = Outboard::create(&data);
    assert_eq!(outboard_size(5000), 0);
    let one = GroupSet::all(1);
    assert_eq!(encoded_len(5000, &one).unwrap(), 5000);
    let (got, blob, _, err) = decode_all(ob.root(), 5000, &one, &encode_all(&data, &ob, &one), 100);
    assert_eq!((got, err), (one, None));
    assert_eq!(blob, data);
}

#[test]
fn outboard_is_computed_streaming_and_bounded() {
    // compute_outboard reads exactly `size` bytes and fails on a short reader.
    let data = bytes(70_000, 3);
    let mut out = Vec::new();
    let root = compute_outboard(&data[..], 70_000, &mut out).unwrap();
    assert_eq!(root, Hash::of(&data));
    assert_eq!(out.len() as u64, outboard_size(70_000));
    assert!(compute_outboard(&data[..60_000], 70_000, &mut Vec::new()).is_err());
}

/// Proof bytes as a share of data, for whole blobs and for 1 MiB requests: a geometric
/// fact of 16 KiB groups (no timing). Printed for the docs and the report
/// (`cargo test -p myconet-content proof_overhead -- --nocapture`).
#[test]
fn proof_overhead() {
    const MIB: u64 = 1 << 20;
    println!("size        whole blob   1 MiB aligned requests   outboard on disk");
    for size in [MIB, 16 * MIB, 200 * MIB, 1024 * MIB, 16 * 1024 * MIB] {
        let count = group_count(size);
        let whole = encoded_len(size, &GroupSet::all(count)).unwrap() - size;
        let per_req = 64; // groups in 1 MiB
        let mut req_proof = 0u64;
        let mut g = 0;
        // Every request of a 16 GiB blob would take long to walk; sample evenly.
        let step = (count / per_req / 64).max(1) * per_req;
        let mut sampled = 0u64;
        while g < count {
            let set = GroupSet::from_range(g..(g + per_req).min(count));
            let bytes: u64 = set
                .iter()
                .map(|x| group_bytes(size, x))
                .map(|r| r.end - r.start)
                .sum();
            req_proof += encoded_len(size, &set).unwrap() - bytes;
            sampled += bytes;
            g += step;
        }
        let whole_share = whole as f64 / size as f64;
        let req_share = req_proof as f64 / sampled as f64;
        println!(
            "{:>6} MiB  {:>8.4} %   {:>8.4} %                {:>8.4} %",
            size / MIB,
            100.0 * whole_share,
            100.0 * req_share,
            100.0 * outboard_size(size) as f64 / size as f64
        );
        assert!(whole_share <= 0.005, "whole-blob proofs {whole_share}");
        assert!(req_share <= 0.005, "1 MiB request proofs {req_share}");
    }
}
