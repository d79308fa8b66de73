use super::*;
use crate::mri::Mri;
use proptest::prelude::*;

fn key(n: u8) -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_unchecked(&[n; 32]).unwrap()
}

fn file(path: &str, data: &[u8]) -> FileEntry {
    FileEntry {
        path: PackagePath::new(path).unwrap(),
        size: data.len() as u64,
        executable: false,
        root: Hash::of(data),
    }
}

fn sample() -> Manifest {
    let mut extra = BTreeMap::new();
    extra.insert("source".to_owned(), "camera".to_owned());
    Manifest::new(
        AuthorKey::of(&key(1)),
        1_700_000_000,
        Metadata {
            title: "Holiday".into(),
            description: "Pictures\nand a site".into(),
            tags: vec!["sea".into(), "beach".into(), "sea".into()],
            language: "pt-BR".into(),
            licence: "CC-BY-4.0 OR MIT".into(),
            kind: Kind::Site,
            extra,
        },
        vec![
            file("site/index.html", b"<html>"),
            file("a.jpg", b"jpeg"),
            file("empty", b""),
        ],
    )
    .unwrap()
}

/// Encodes a raw (possibly invalid) wire manifest, signed by `k`.
fn raw_signed(m: &pb::Manifest, k: &Ed25519KeyPair) -> Vec<u8> {
    let manifest = m.encode_to_vec();
    let signature = k.sign(&signed_message(&manifest)).as_ref().to_vec();
    pb::Signed {
        manifest,
        signature,
    }
    .encode_to_vec()
}

#[test]
fn sign_parse_round_trip() {
    let m = sample();
    // Sorted files and sorted, deduplicated tags.
    let paths: Vec<_> = m.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["a.jpg", "empty", "site/index.html"]);
    assert_eq!(m.metadata.tags, ["beach", "sea"]);
    let s = m.sign(&key(1)).unwrap();
    assert_eq!(s.id(), PackageId::of_signed_manifest(s.bytes()));
    let p = SignedManifest::parse(s.bytes()).unwrap();
    assert_eq!(p, s);
    assert_eq!(p.manifest(), &m);
    let mri = Mri::package(p.id()).to_string();
    assert_eq!(mri.parse::<Mri>().unwrap().package, s.id());
    // Signing is deterministic: one manifest, one MRI.
    assert_eq!(m.sign(&key(1)).unwrap().id(), s.id());
    assert_eq!(m.total_size(), 10);
    assert_eq!(m.blobs().len(), 3);
    assert!(m.file(&PackagePath::new("empty").unwrap()).is_some());
}

#[test]
fn signatures_are_checked() {
    let m = sample();
    assert!(matches!(
        m.sign(&key(2)),
        Err(ManifestError::WrongSigner { .. })
    ));
    let s = m.sign(&key(1)).unwrap();
    let mut bytes = s.bytes().to_vec();
    let n = bytes.len();
    bytes[n - 1] ^= 1; // last byte of the signature
    assert_eq!(
        SignedManifest::parse(&bytes),
        Err(ManifestError::BadSignature)
    );
    // A valid signature by someone who is not the author.
    let raw = raw_signed(&m.to_pb(), &key(2));
    assert_eq!(
        SignedManifest::parse(&raw),
        Err(ManifestError::BadSignature)
    );
    // The signature is domain-separated: a signature over the bare manifest bytes
    // (as another protocol might produce) does not verify.
    let manifest = m.encode();
    let bare = pb::Signed {
        signature: key(1).sign(&manifest).as_ref().to_vec(),
        manifest,
    }
    .encode_to_vec();
    assert_eq!(
        SignedManifest::parse(&bare),
        Err(ManifestError::BadSignature)
    );
}

#[test]
fn non_canonical_encodings_are_refused() {
    let m = sample();
    let k = key(1);
    // Unknown field appended to the manifest.
    let mut manifest = m.encode();
    manifest.extend_from_slice(&[0x78, 0x01]); // field 15, varint 1
    let signature = k.sign(&signed_message(&manifest)).as_ref().to_vec();
    let bytes = pb::Signed {
        manifest,
        signature,
    }
    .encode_to_vec();
    assert_eq!(
        SignedManifest::parse(&bytes),
        Err(ManifestError::NotCanonical("manifest"))
    );
    // Unknown field in the envelope.
    let mut bytes = m.sign(&k).unwrap().bytes().to_vec();
    bytes.extend_from_slice(&[0x18, 0x00]);
    assert_eq!(
        SignedManifest::parse(&bytes),
        Err(ManifestError::NotCanonical("signed envelope"))
    );
    // Unsorted files and tags, crafted on the wire.
    let mut p = m.to_pb();
    p.files.swap(0, 2);
    assert!(matches!(
        SignedManifest::parse(&raw_signed(&p, &k)),
        Err(ManifestError::Unsorted { .. })
    ));
    let mut p = m.to_pb();
    p.metadata.as_mut().unwrap().tags.reverse();
    assert!(matches!(
        SignedManifest::parse(&raw_signed(&p, &k)),
        Err(ManifestError::TagsNotSorted(_))
    ));
    let mut p = m.to_pb();
    p.metadata = None;
    assert!(matches!(
        SignedManifest::parse(&raw_signed(&p, &k)),
        Err(ManifestError::NotCanonical(_))
    ));
}

#[test]
fn bad_files_are_refused_with_their_reason() {
    let k = key(1);
    let base = sample().to_pb();
    let with = |f: &dyn Fn(&mut pb::Manifest)| {
        let mut p = base.clone();
        f(&mut p);
        SignedManifest::parse(&raw_signed(&p, &k)).unwrap_err()
    };
    assert_eq!(
        with(&|p| p.files[0].path = "../etc/passwd".into()),
        ManifestError::Path {
            index: 0,
            error: PathError::DotComponent("..", 0)
        }
    );
    assert!(matches!(
        with(&|p| p.files[0].path = "/abs".into()),
        ManifestError::Path {
            error: PathError::Absolute,
            ..
        }
    ));
    assert_eq!(
        with(&|p| p.files[1] = p.files[0].clone()),
        ManifestError::Duplicate("a.jpg".into())
    );
    assert_eq!(
        with(&|p| p.files[1].path = "a.jpg/inner".into()),
        ManifestError::FileIsDirectory("a.jpg".into())
    );
    assert_eq!(
        with(&|p| p.files[1].root = vec![7; 32]),
        ManifestError::EmptyFileHash("empty".into())
    );
    // One hash at two sizes: at most one of them is the data's. Were it accepted, the
    // package would list one blob (the first size) and present the other file as
    // complete at a size its bytes do not have.
    assert_eq!(
        with(&|p| p.files[2].root = p.files[0].root.clone()),
        ManifestError::RootSizeConflict {
            path: "site/index.html".into(),
            size: 6,
            other_path: "a.jpg".into(),
            other_size: 4,
        }
    );
    // The hash of no bytes at a size that is not 0: no data can ever match it.
    assert_eq!(
        with(&|p| p.files[0].root = Hash::of(b"").0.to_vec()),
        ManifestError::EmptyHashSize {
            path: "a.jpg".into(),
            size: 4
        }
    );
    assert!(matches!(
        with(&|p| p.files[0].root = vec![7; 31]),
        ManifestError::RootLength { len: 31, .. }
    ));
    assert!(matches!(
        with(&|p| p.files[0].size = MAX_FILE_BYTES + 1),
        ManifestError::FileTooLarge { .. }
    ));
    assert_eq!(with(&|p| p.files.clear()), ManifestError::NoFiles);
    assert_eq!(with(&|p| p.version = 2), ManifestError::Version(2));
    assert_eq!(
        with(&|p| p.metadata.as_mut().unwrap().kind = 42),
        ManifestError::Kind(42)
    );
    assert!(matches!(
        with(&|p| p.metadata.as_mut().unwrap().language = "english language".into()),
        ManifestError::Language { .. }
    ));
    assert!(matches!(
        with(&|p| p.metadata.as_mut().unwrap().licence = "MIT or GPL".into()),
        ManifestError::Licence { .. }
    ));
    assert!(matches!(
        with(&|p| p.metadata.as_mut().unwrap().title = "x".repeat(300)),
        ManifestError::FieldTooLong {
            constant: "MAX_TITLE_BYTES",
            ..
        }
    ));
    assert_eq!(
        with(&|p| p.metadata.as_mut().unwrap().title = "a\u{1b}[31m".into()),
        ManifestError::Control("title")
    );
}

#[test]
fn hostile_sizes_are_refused_before_allocation() {
    // 16 MiB + 1.
    let big = vec![0u8; MAX_MANIFEST_BYTES + 1];
    assert_eq!(
        SignedManifest::parse(&big),
        Err(ManifestError::TooLarge(MAX_MANIFEST_BYTES + 1))
    );
    // A manifest of empty file entries, two bytes each: refused by the scan at
    // MAX_FILES + 1, before prost would build a struct for each.
    let mut many = Vec::new();
    for _ in 0..MAX_FILES + 5 {
        many.extend_from_slice(&[0x2a, 0x00]);
    }
    assert_eq!(
        Manifest::decode(&many),
        Err(ManifestError::TooManyFiles(MAX_FILES + 1))
    );
    // Metadata over its limit.
    let mut meta = vec![0x22];
    let len = MAX_METADATA_BYTES + 1;
    let mut l = len;
    while l >= 0x80 {
        meta.push((l as u8) | 0x80);
        l >>= 7;
    }
    meta.push(l as u8);
    meta.resize(meta.len() + len, 0);
    assert_eq!(
        Manifest::decode(&meta),
        Err(ManifestError::MetadataTooLarge(len))
    );
    // Truncated bytes say so.
    assert!(matches!(
        Manifest::decode(&[0x22, 0x05, 0x00]),
        Err(ManifestError::Decode(_))
    ));
}

#[test]
fn language_tags() {
    for ok in [
        "en",
        "pt-BR",
        "zh-Hant-TW",
        "sr-Latn-RS",
        "de-CH-1996",
        "es-419",
        "en-US-x-twain",
        "x-whatever",
        "zh-yue-HK",
        "en-a-bbb-x-a-ccc",
    ] {
        assert_eq!(check_language(ok), Ok(()), "{ok}");
    }
    for bad in [
        "",
        "e",
        "english-",
        "en--US",
        "en_US",
        "toolonglanguage",
        "en-US-x",
        "en-a",
        "de-1996-1996",
        "en-a-bb-a-cc",
        "123",
    ] {
        assert!(check_language(bad).is_err(), "{bad}");
    }
}

#[test]
fn spdx_expressions() {
    for ok in [
        "MIT",
        "MIT OR Apache-2.0",
        "GPL-2.0-or-later WITH Classpath-exception-2.0",
        "(MIT AND BSD-3-Clause) OR GPL-3.0+",
        "LicenseRef-my-licence",
        "DocumentRef-spdx-tool-1.2:LicenseRef-MIT-Style-2",
        "CC-BY-4.0",
    ] {
        assert_eq!(check_spdx(ok), Ok(()), "{ok}");
    }
    for bad in [
        "",
        "MIT or Apache-2.0",
        "MIT OR",
        "(MIT",
        "MIT)",
        "AND MIT",
        "MIT WITH",
        "M!T",
        "DocumentRef-x:MIT",
        "MIT Apache-2.0",
        &"(".repeat(40),
    ] {
        assert!(check_spdx(bad).is_err(), "{bad}");
    }
}

#[test]
fn kinds_parse_and_print() {
    for k in Kind::ALL {
        assert_eq!(k.as_str().parse::<Kind>().unwrap(), k);
        assert_eq!(Kind::from_i32(k as i32), Some(k));
    }
    assert!("movie".parse::<Kind>().is_err());
}

fn arb_manifest() -> impl Strategy<Value = Manifest> {
    (
        proptest::collection::btree_map(
            "[a-z]{1,6}(/[a-z]{1,6}){0,2}\\.[a-z]{1,3}",
            (any::<u64>(), any::<bool>()),
            1..8,
        ),
        "[ -~]{0,30}",
        proptest::collection::vec("[a-z]{1,8}", 0..5),
        any::<u64>(),
        0usize..9,
    )
        .prop_map(|(files, title, tags, created, kind)| {
            let files = files
                .into_iter()
                .map(|(p, (seed, x))| FileEntry {
                    path: PackagePath::new(p).unwrap(),
                    size: seed % 100_000 + 1,
                    executable: x,
                    root: Hash::of(&seed.to_le_bytes()),
                })
                .collect();
            Manifest::new(
                AuthorKey::of(&key(3)),
                created,
                Metadata {
                    title,
                    tags,
                    kind: Kind::ALL[kind],
                    ..Metadata::default()
                },
                files,
            )
        })
        .prop_filter_map("valid", |m| m.ok())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever is signed parses back to the same manifest and bytes; flipping any bit
    /// of the signed bytes is refused (so one MRI names one manifest).
    #[test]
    fn signed_round_trip_and_any_flip_refused(m in arb_manifest(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let s = m.sign(&key(3)).unwrap();
        let p = SignedManifest::parse(s.bytes()).unwrap();
        prop_assert_eq!(p.manifest(), &m);
        prop_assert_eq!(p.bytes(), s.bytes());
        let mut bytes = s.bytes().to_vec();
        let i = at.index(bytes.len());
        bytes[i] ^= 1 << bit;
        prop_assert!(SignedManifest::parse(&bytes).is_err());
    }

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = SignedManifest::parse(&bytes);
        let _ = Manifest::decode(&bytes);
    }

    #[test]
    fn language_and_licence_checks_never_panic(s in "\\PC{0,40}") {
        let _ = check_language(&s);
        let _ = check_spdx(&s);
    }
}

/// Every encoding of an Ed25519 point of small order: the seven y values (0, 1, -1, the
/// two of order 8, and the non-canonical p and p + 1), each with either sign bit.
fn small_order_encodings() -> Vec<[u8; 32]> {
    let mut out = Vec::new();
    for y in SMALL_ORDER_Y {
        out.push(y);
        let mut neg = y;
        neg[31] |= 0x80;
        out.push(neg);
    }
    out
}

/// Under a small-order key a "signature" of a small-order R and S = 0 verifies for about
/// seven messages in eight: nobody holds the key, so anybody can sign as it, and one
/// manifest gets as many ids as forgers like. ring accepts such keys, so the manifest
/// must refuse them.
#[test]
fn small_order_author_keys_are_refused() {
    let encodings = small_order_encodings();
    for author in &encodings {
        let mut p = sample().to_pb();
        p.author = author.to_vec();
        let mut forged = None;
        'search: for created in 0..64 {
            p.created = created;
            let manifest = p.encode_to_vec();
            for r in &encodings {
                let mut signature = r.to_vec();
                signature.resize(64, 0);
                if UnparsedPublicKey::new(&ED25519, author)
                    .verify(&signed_message(&manifest), &signature)
                    .is_ok()
                {
                    forged = Some(
                        pb::Signed {
                            manifest,
                            signature,
                        }
                        .encode_to_vec(),
                    );
                    break 'search;
                }
            }
        }
        let forged = forged.expect("a forgery verifies under a small-order key");
        assert_eq!(
            SignedManifest::parse(&forged),
            Err(ManifestError::WeakAuthorKey(AuthorKey(*author))),
        );
    }
    // Ordinary keys are not caught by the check.
    for n in 0..=255u8 {
        assert!(!AuthorKey::of(&key(n)).is_small_order());
    }
}

/// Edits of a canonical manifest's bytes, as a forger trying a second encoding would
/// make them: splice a copy of a span elsewhere (repeated fields, duplicated entries),
/// delete a span, insert bytes, or overwrite one byte.
#[derive(Debug, Clone)]
enum Edit {
    Duplicate {
        from: prop::sample::Index,
        len: usize,
        to: prop::sample::Index,
    },
    Delete {
        at: prop::sample::Index,
        len: usize,
    },
    Insert {
        at: prop::sample::Index,
        bytes: Vec<u8>,
    },
    Set {
        at: prop::sample::Index,
        byte: u8,
    },
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (
            any::<prop::sample::Index>(),
            1usize..40,
            any::<prop::sample::Index>()
        )
            .prop_map(|(from, len, to)| Edit::Duplicate { from, len, to }),
        (any::<prop::sample::Index>(), 1usize..8).prop_map(|(at, len)| Edit::Delete { at, len }),
        (
            any::<prop::sample::Index>(),
            proptest::collection::vec(any::<u8>(), 1..6)
        )
            .prop_map(|(at, bytes)| Edit::Insert { at, bytes }),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(at, byte)| Edit::Set { at, byte }),
    ]
}

fn apply(b: &mut Vec<u8>, e: &Edit) {
    if b.is_empty() {
        return;
    }
    match e {
        Edit::Duplicate { from, len, to } => {
            let f = from.index(b.len());
            let span = b[f..(f + len).min(b.len())].to_vec();
            let t = to.index(b.len() + 1);
            b.splice(t..t, span);
        }
        Edit::Delete { at, len } => {
            let a = at.index(b.len());
            b.drain(a..(a + len).min(b.len()));
        }
        Edit::Insert { at, bytes } => {
            let a = at.index(b.len() + 1);
            b.splice(a..a, bytes.iter().copied());
        }
        Edit::Set { at, byte } => {
            let a = at.index(b.len());
            b[a] = *byte;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// One manifest, one encoding: whatever edited bytes the author's key signs, if they
    /// parse they are exactly the canonical encoding of what they parse to, and so
    /// the package id names one manifest. (A forger holding the key is the strongest
    /// case: every edit gets a valid signature.)
    #[test]
    fn edited_manifests_parse_only_in_canonical_form(m in arb_manifest(), edits in proptest::collection::vec(edit(), 1..4)) {
        let k = key(3);
        let mut bytes = m.encode();
        for e in &edits {
            apply(&mut bytes, e);
        }
        let signature = k.sign(&signed_message(&bytes)).as_ref().to_vec();
        let signed = pb::Signed { manifest: bytes.clone(), signature }.encode_to_vec();
        if let Ok(p) = SignedManifest::parse(&signed) {
            prop_assert_eq!(p.manifest().encode(), bytes);
            prop_assert_eq!(p.bytes(), &signed[..]);
            prop_assert!(p.manifest().validate().is_ok());
        }
    }
}
