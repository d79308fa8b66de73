//! The store's behaviour through its public API, on disk and in memory alike.

mod common;

use std::{
    io::{Read, Seek, SeekFrom},
    path::Path,
    sync::{Arc, Mutex},
};

use common::*;
use myconet_content::verified::{self, GROUP_BYTES};
use myconet_store::{
    BlobStatus, Completeness, DiskStore, GroupSet, Hash, Hold, MemStore, PackageId, Problem, Store,
    StoreConfig, StoreError,
};

const MIB: u64 = 1 << 20;

/// Runs a test against a memory store and a disk store of the same quota.
macro_rules! both {
    ($name:ident, $max:expr, $body:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn mem() {
                let store = MemStore::new(StoreConfig::with_max_bytes($max)).unwrap();
                ($body)(&store as &dyn Store);
            }
            #[test]
            fn disk() {
                let dir = tempfile::tempdir().unwrap();
                let store = DiskStore::open(dir.path(), StoreConfig::with_max_bytes($max)).unwrap();
                ($body)(&store as &dyn Store);
            }
        }
    };
}

fn read_all(store: &dyn Store, id: &PackageId, p: &str) -> Vec<u8> {
    let (_, mut r) = store.open_file(id, &path(p)).unwrap();
    let mut v = Vec::new();
    r.read_to_end(&mut v).unwrap();
    v
}

both!(
    added_files_read_back_byte_identical,
    64 * MIB,
    |s: &dyn Store| {
        let big = data(1, 3 * GROUP_BYTES as usize + 777);
        let small = data(2, 1000);
        let files: &[(&str, &[u8])] =
            &[("big.bin", &big), ("empty", b""), ("dir/small.txt", &small)];
        let m = manifest("a", files);
        let info = add(s, &m, files, &[Hold::Pin]).unwrap();
        assert_eq!(info.completeness, Completeness::Complete);
        assert_eq!(info.holds, vec![Hold::Pin]);
        assert_eq!(info.total_size, (big.len() + small.len()) as u64);
        assert_eq!(info.file_count, 3);
        assert_eq!(read_all(s, &m.id(), "big.bin"), big);
        assert_eq!(read_all(s, &m.id(), "dir/small.txt"), small);
        assert_eq!(read_all(s, &m.id(), "empty"), b"");
        // Ranged reads (what a gateway serving HTTP Range does).
        let (_, mut r) = s.open_file(&m.id(), &path("big.bin")).unwrap();
        r.seek(SeekFrom::Start(40_000)).unwrap();
        let mut buf = [0u8; 100];
        r.read_exact(&mut buf).unwrap();
        assert_eq!(&buf[..], &big[40_000..40_100]);
        assert_eq!(s.manifest(&m.id()).unwrap(), Some(m.bytes().to_vec()));
        let files = s.files(&m.id()).unwrap();
        assert_eq!(
            files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
            ["big.bin", "dir/small.txt", "empty"]
        );
        assert!(matches!(
            s.open_file(&m.id(), &path("nope")),
            Err(StoreError::UnknownFile { .. })
        ));
        // Adding the same package again only adds holds.
        let again = add(s, &m, &[("big.bin", &big)], &[Hold::Replica]).unwrap();
        assert_eq!(again.holds, vec![Hold::Pin, Hold::Replica]);
        assert_eq!(s.packages().unwrap().len(), 1);
    }
);

both!(
    identical_files_are_stored_once,
    64 * MIB,
    |s: &dyn Store| {
        let shared = data(3, 5 * GROUP_BYTES as usize);
        let a_only = data(4, 20_000);
        let fa: &[(&str, &[u8])] = &[("x", &shared), ("y", &a_only)];
        let fb: &[(&str, &[u8])] = &[("copy/of/x", &shared), ("again", &shared)];
        let (ma, mb) = (manifest("a", fa), manifest("b", fb));
        add(s, &ma, fa, &[]).unwrap();
        let used_a = s.usage().unwrap().cached_bytes;
        let b = add(s, &mb, fb, &[]).unwrap();
        assert_eq!(
            s.usage().unwrap().cached_bytes,
            used_a,
            "b added no blob bytes"
        );
        assert!(b.disk_bytes > 0);
        // Removing a keeps the shared blob for b; removing b frees it.
        let freed_a = s.remove(&ma.id()).unwrap();
        assert!(freed_a > 0 && freed_a < used_a);
        assert_eq!(read_all(s, &mb.id(), "again"), shared);
        assert_eq!(
            s.blob_status(&Hash::of(&a_only)).unwrap(),
            BlobStatus::Missing
        );
        s.remove(&mb.id()).unwrap();
        assert_eq!(s.usage().unwrap().cached_bytes, 0);
        assert_eq!(
            s.blob_status(&Hash::of(&shared)).unwrap(),
            BlobStatus::Missing
        );
        assert!(matches!(
            s.remove(&mb.id()),
            Err(StoreError::UnknownPackage(_))
        ));
    }
);

both!(
    staging_refuses_data_of_the_wrong_size,
    64 * MIB,
    |s: &dyn Store| {
        let d = data(5, 50_000);
        assert!(matches!(
            s.stage(&mut &d[..], 60_000),
            Err(StoreError::DataTooShort {
                declared: 60_000,
                actual: 50_000
            })
        ));
        assert!(matches!(
            s.stage(&mut &d[..], 40_000),
            Err(StoreError::DataTooLong { declared: 40_000 })
        ));
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("boom"))
            }
        }
        assert!(matches!(
            s.stage(&mut Failing, 10),
            Err(StoreError::Read(_))
        ));
        // Nothing stays reserved after the failures.
        assert_eq!(s.usage().unwrap().staging_bytes, 0);
    }
);

both!(
    insert_refuses_manifests_the_data_does_not_match,
    64 * MIB,
    |s: &dyn Store| {
        let d = data(6, 70_000);
        let ok: &[(&str, &[u8])] = &[("f", &d)];
        // A file nobody staged.
        let m = manifest("m", ok);
        assert!(matches!(
            s.insert_package(&m, vec![], &[]),
            Err(StoreError::MissingData { .. })
        ));
        // A manifest whose size disagrees with the data of that root.
        let lying = manifest_of("l", vec![("f".into(), 69_999, Hash::of(&d))]);
        let st = s.stage(&mut &d[..], d.len() as u64).unwrap();
        assert!(matches!(
            s.insert_package(&lying, vec![st], &[]),
            Err(StoreError::ManifestSizeMismatch {
                manifest: 69_999,
                staged: 70_000,
                ..
            })
        ));
        // A size that disagrees with the blob of that root already here (the manifest
        // format itself refuses an empty root with a size and the reverse).
        let here = data(8, 30_000);
        let fh: &[(&str, &[u8])] = &[("h", &here)];
        let mh = manifest("here", fh);
        add(s, &mh, fh, &[]).unwrap();
        let other_size = manifest_of("w", vec![("g".into(), 29_999, Hash::of(&here))]);
        assert!(matches!(
            s.put_manifest(&other_size, &[]),
            Err(StoreError::ImpossibleFile { size: 29_999, .. })
        ));
        assert!(matches!(
            s.insert_package(&other_size, vec![], &[]),
            Err(StoreError::ImpossibleFile { size: 29_999, .. })
        ));
        s.remove(&mh.id()).unwrap();
        // None of it left anything behind.
        assert!(s.packages().unwrap().is_empty());
        let u = s.usage().unwrap();
        assert_eq!((u.cached_bytes, u.staging_bytes), (0, 0));
    }
);

#[test]
fn staged_data_of_another_store_is_refused() {
    let a = MemStore::new(StoreConfig::with_max_bytes(MIB)).unwrap();
    let b = MemStore::new(StoreConfig::with_max_bytes(MIB)).unwrap();
    let d = data(7, 100);
    let m = manifest("m", &[("f", &d)]);
    let st = a.stage(&mut &d[..], 100).unwrap();
    assert!(matches!(
        b.insert_package(&m, vec![st], &[]),
        Err(StoreError::ForeignStaged(_))
    ));
}

both!(
    quota_refusal_names_the_quota_and_evicts_nothing,
    2 * MIB,
    |s: &dyn Store| {
        let pinned = data(8, MIB as usize);
        let fp: &[(&str, &[u8])] = &[("p", &pinned)];
        let mp = manifest("p", fp);
        add(s, &mp, fp, &[Hold::Pin]).unwrap();
        let cached = data(9, 200_000);
        let fc: &[(&str, &[u8])] = &[("c", &cached)];
        let mc = manifest("c", fc);
        add(s, &mc, fc, &[]).unwrap();
        let big = data(10, (1200 * 1024) as usize);
        let err = s.stage(&mut &big[..], big.len() as u64).unwrap_err();
        let StoreError::Quota {
            max_bytes,
            evictable,
            ..
        } = err
        else {
            panic!("{err}")
        };
        assert_eq!(max_bytes, 2 * MIB);
        assert!(
            evictable >= 200_000,
            "the cached package could go: {evictable}"
        );
        assert!(
            err.to_string()
                .contains("storage.max_bytes (2097152 bytes)"),
            "{err}"
        );
        // Not enough could be freed, so nothing was evicted.
        assert!(s.package(&mc.id()).unwrap().is_some());
        assert_eq!(read_all(s, &mp.id(), "p"), pinned);
        // A fetch beyond the quota is refused the same way, pinned data intact.
        let remote = manifest_of("r", vec![("r".into(), 3 * MIB, Hash::of(b"not fetched"))]);
        assert!(matches!(
            s.put_manifest(&remote, &[]),
            Err(StoreError::Quota { .. })
        ));
        assert!(s.package(&remote.id()).unwrap().is_none());
        assert_eq!(read_all(s, &mp.id(), "p"), pinned);
    }
);

both!(
    room_is_made_by_evicting_the_least_recently_used_cached_package,
    3 * MIB,
    |s: &dyn Store| {
        let mut ids = Vec::new();
        for i in 0..3u64 {
            let d = data(20 + i, 900_000);
            let f: &[(&str, &[u8])] = &[("f", &d)];
            let m = manifest(&format!("lru{i}"), f);
            add(s, &m, f, &[]).unwrap();
            ids.push(m.id());
        }
        // 0 is used again: 1 is now the least recently used.
        read_all(s, &ids[0], "f");
        let d = data(30, 900_000);
        let f: &[(&str, &[u8])] = &[("f", &d)];
        let m = manifest("new", f);
        add(s, &m, f, &[]).unwrap();
        assert!(s.package(&ids[1]).unwrap().is_none(), "1 was evicted");
        assert!(s.package(&ids[0]).unwrap().is_some() && s.package(&ids[2]).unwrap().is_some());
        let u = s.usage().unwrap();
        assert!(u.used <= u.max_bytes, "{u:?}");
    }
);

#[test]
fn protected_and_held_packages_are_never_evicted() {
    let protected: Arc<Mutex<Option<PackageId>>> = Arc::default();
    let p2 = protected.clone();
    let config = StoreConfig {
        max_bytes: 3 * MIB,
        protect: Some(Arc::new(move |id: &PackageId| {
            *p2.lock().unwrap() == Some(*id)
        })),
    };
    let s = MemStore::new(config).unwrap();
    let mut ids = Vec::new();
    for i in 0..3u64 {
        let d = data(40 + i, 900_000);
        let f: &[(&str, &[u8])] = &[("f", &d)];
        let m = manifest(&format!("p{i}"), f);
        add(&s, &m, f, &[]).unwrap();
        ids.push(m.id());
    }
    *protected.lock().unwrap() = Some(ids[0]);
    s.hold(&ids[1], Hold::Replica).unwrap();
    let d = data(50, 900_000);
    let f: &[(&str, &[u8])] = &[("f", &d)];
    add(&s, &manifest("n", f), f, &[]).unwrap();
    assert!(s.package(&ids[0]).unwrap().is_some(), "protected");
    assert!(s.package(&ids[1]).unwrap().is_some(), "held");
    assert!(
        s.package(&ids[2]).unwrap().is_none(),
        "the only evictable one"
    );
    // Released, the replica becomes evictable again.
    s.release(&ids[1], Hold::Replica).unwrap();
    let d = data(51, 900_000);
    let f: &[(&str, &[u8])] = &[("f", &d)];
    add(&s, &manifest("n2", f), f, &[]).unwrap();
    assert!(s.package(&ids[1]).unwrap().is_none());
}

both!(
    a_fetch_fills_partial_blobs_with_verified_groups,
    64 * MIB,
    |s: &dyn Store| {
        let provider = MemStore::new(StoreConfig::with_max_bytes(64 * MIB)).unwrap();
        let a = data(60, 100 * GROUP_BYTES as usize + 5);
        let b = data(61, GROUP_BYTES as usize);
        let files: &[(&str, &[u8])] = &[("a", &a), ("b", &b), ("e", b"")];
        let m = manifest("f", files);
        add(&provider, &m, files, &[]).unwrap();
        let info = s.put_manifest(&m, &[Hold::Pin]).unwrap();
        assert_eq!(
            info.completeness,
            Completeness::Partial { verified_bytes: 0 }
        );
        assert!(matches!(
            s.open_file(&m.id(), &path("a")),
            Err(StoreError::Incomplete(_))
        ));
        assert_eq!(
            read_all(s, &m.id(), "e"),
            b"",
            "the empty file is complete at once"
        );
        // Room for everything is reserved up front.
        let reserved = s.usage().unwrap().reserved_bytes;
        assert_eq!(reserved, (a.len() + b.len()) as u64);
        fetch(s, &provider, &m, &[], &mut Rng(1)).unwrap();
        let info = s.package(&m.id()).unwrap().unwrap();
        assert_eq!(info.completeness, Completeness::Complete);
        assert_eq!(read_all(s, &m.id(), "a"), a);
        assert_eq!(read_all(s, &m.id(), "b"), b);
        assert_eq!(s.usage().unwrap().reserved_bytes, 0);
        // It now serves what it fetched, proofs included.
        let g = GroupSet::from_range(3..9);
        assert_eq!(
            encoded(s, &Hash::of(&a), &g),
            encoded(&provider, &Hash::of(&a), &g)
        );
        assert!(s.verify().unwrap().corrupt.is_empty());
    }
);

both!(
    groups_before_a_corrupt_one_are_kept_and_served,
    64 * MIB,
    |s: &dyn Store| {
        let provider = MemStore::new(StoreConfig::with_max_bytes(64 * MIB)).unwrap();
        let a = data(70, 20 * GROUP_BYTES as usize);
        let files: &[(&str, &[u8])] = &[("a", &a)];
        let m = manifest("c", files);
        add(&provider, &m, files, &[]).unwrap();
        s.put_manifest(&m, &[]).unwrap();
        let h = Hash::of(&a);
        let req = GroupSet::from_range(0..8);
        let mut enc = encoded(&provider, &h, &req);
        // Flip a byte in the data of the 6th group (well past the proofs at the start).
        let at = enc.len() - 3 * GROUP_BYTES as usize + 10;
        enc[at] ^= 1;
        let r = transfer(s, &h, a.len() as u64, &req, &enc, &mut Rng(4));
        assert!(matches!(r, Err(TransferError::Verify(_))), "{r:?}");
        // The groups before the bad one were written; after a flush they are committed.
        s.flush().unwrap();
        let BlobStatus::Partial { verified, .. } = s.blob_status(&h).unwrap() else {
            panic!()
        };
        assert_eq!(verified, GroupSet::from_range(0..5));
        assert_eq!(
            s.have(&m.id()).unwrap(),
            vec![(h, GroupSet::from_range(0..5))]
        );
        // Serving them works and matches the provider, serving more is refused.
        let five = GroupSet::from_range(0..5);
        assert_eq!(encoded(s, &h, &five), encoded(&provider, &h, &five));
        assert!(matches!(
            s.encode(&h, &GroupSet::from_range(0..6), &mut Vec::new()),
            Err(StoreError::NotVerified { .. })
        ));
    }
);

both!(
    verified_items_that_do_not_fit_the_blob_are_refused,
    64 * MIB,
    |s: &dyn Store| {
        let a = data(71, 3 * GROUP_BYTES as usize + 10);
        let m = manifest("fit", &[("a", &a)]);
        s.put_manifest(&m, &[]).unwrap();
        let h = Hash::of(&a);
        let g = GROUP_BYTES as usize;
        assert!(matches!(
            s.write_group(&h, 4, &a[..10]),
            Err(StoreError::GroupOutOfRange { group: 4, .. })
        ));
        assert!(matches!(
            s.write_group(&h, 3, &a[..11]),
            Err(StoreError::GroupOutOfRange { group: 3, .. })
        ));
        assert!(matches!(
            s.write_group(&h, 0, &a[..g - 1]),
            Err(StoreError::GroupOutOfRange { .. })
        ));
        let pair = verified::VerifiedParent {
            offset: 3 * 64,
            pair: [0; 64],
        };
        assert!(matches!(
            s.write_parent(&h, &pair),
            Err(StoreError::ParentOutOfRange { offset: 192, .. })
        ));
        let huge = verified::VerifiedParent {
            offset: u64::MAX - 63,
            pair: [0; 64],
        };
        assert!(matches!(
            s.write_parent(&h, &huge),
            Err(StoreError::ParentOutOfRange { .. })
        ));
        let odd = verified::VerifiedParent {
            offset: 1,
            pair: [0; 64],
        };
        assert!(matches!(
            s.write_parent(&h, &odd),
            Err(StoreError::ParentOutOfRange { .. })
        ));
        assert!(matches!(
            s.write_group(&Hash::of(b"?"), 0, b"?"),
            Err(StoreError::UnknownBlob(_))
        ));
        // None of it counted as verified.
        assert_eq!(s.have(&m.id()).unwrap(), vec![(h, GroupSet::new())]);
    }
);

#[test]
fn an_interrupted_fetch_resumes_from_what_was_committed() {
    let dir = tempfile::tempdir().unwrap();
    let provider = MemStore::new(StoreConfig::with_max_bytes(1 << 30)).unwrap();
    let a = data(80, (300 * GROUP_BYTES + 1) as usize);
    let files: &[(&str, &[u8])] = &[("a", &a)];
    let m = manifest("r", files);
    add(&provider, &m, files, &[]).unwrap();
    let h = Hash::of(&a);
    {
        let s = DiskStore::open(dir.path(), StoreConfig::with_max_bytes(1 << 30)).unwrap();
        s.put_manifest(&m, &[]).unwrap();
        let req = GroupSet::from_range(0..150);
        let enc = encoded(&provider, &h, &req);
        transfer(&s, &h, a.len() as u64, &req, &enc, &mut Rng(2)).unwrap();
        s.close().unwrap();
    }
    let s = DiskStore::open(dir.path(), StoreConfig::with_max_bytes(1 << 30)).unwrap();
    assert!(!s.open_report().unclean);
    let BlobStatus::Partial { verified, .. } = s.blob_status(&h).unwrap() else {
        panic!()
    };
    assert_eq!(verified, GroupSet::from_range(0..150));
    let rest = GroupSet::from_range(150..301);
    let enc = encoded(&provider, &h, &rest);
    transfer(&s, &h, a.len() as u64, &rest, &enc, &mut Rng(3)).unwrap();
    assert_eq!(
        s.blob_status(&h).unwrap(),
        BlobStatus::Complete {
            size: a.len() as u64
        }
    );
    assert_eq!(read_all(&s, &m.id(), "a"), a);
}

/// Where the store keeps a blob's file (its shard directory made if missing, so a
/// test can plant a file there).
fn blob_file(dir: &Path, h: &Hash, ext: &str) -> std::path::PathBuf {
    let shard = dir.join("blobs").join(format!("{:02x}", h.0[0]));
    std::fs::create_dir_all(&shard).unwrap();
    shard.join(format!("{h}.{ext}"))
}

#[test]
fn verify_finds_corruption_keeps_what_verifies_and_repairs_outboards() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path(), StoreConfig::with_max_bytes(64 * MIB)).unwrap();
    let a = data(90, 10 * GROUP_BYTES as usize);
    let b = data(91, 7 * GROUP_BYTES as usize);
    let files: &[(&str, &[u8])] = &[("a", &a), ("b", &b)];
    let m = manifest("v", files);
    add(&s, &m, files, &[Hold::Pin]).unwrap();
    assert_eq!(s.verify().unwrap().corrupt, vec![]);
    let (ha, hb) = (Hash::of(&a), Hash::of(&b));
    // Flip one byte of a's group 4; scribble over b's outboard.
    let mut bytes = std::fs::read(blob_file(dir.path(), &ha, "data")).unwrap();
    bytes[4 * GROUP_BYTES as usize + 3] ^= 0x80;
    std::fs::write(blob_file(dir.path(), &ha, "data"), &bytes).unwrap();
    std::fs::write(blob_file(dir.path(), &hb, "obao"), vec![0u8; 6 * 64]).unwrap();
    let report = s.verify().unwrap();
    assert_eq!(report.blobs_checked, 2);
    assert_eq!(report.corrupt.len(), 2, "{report:?}");
    let ca = report.corrupt.iter().find(|c| c.hash == ha).unwrap();
    assert_eq!(ca.problem, Problem::DataMismatch);
    assert_eq!(ca.packages, vec![m.id()]);
    assert_eq!(ca.verified_bytes_kept, 9 * GROUP_BYTES);
    let cb = report.corrupt.iter().find(|c| c.hash == hb).unwrap();
    assert_eq!(cb.problem, Problem::OutboardRepaired);
    // a is no longer served as complete; b still is, with a good outboard again.
    assert!(matches!(
        s.open_file(&m.id(), &path("a")),
        Err(StoreError::Incomplete(_))
    ));
    assert!(matches!(
        s.package(&m.id()).unwrap().unwrap().completeness,
        Completeness::Partial { .. }
    ));
    let BlobStatus::Partial { verified, .. } = s.blob_status(&ha).unwrap() else {
        panic!()
    };
    assert_eq!(
        verified,
        GroupSet::from_range(0..4).union(&GroupSet::from_range(5..10))
    );
    assert_eq!(read_all(&s, &m.id(), "b"), b);
    assert!(s.verify().unwrap().corrupt.is_empty(), "repairs hold");
    // The bad group is fetched again and a is complete.
    let provider = MemStore::new(StoreConfig::with_max_bytes(64 * MIB)).unwrap();
    add(&provider, &m, files, &[]).unwrap();
    let g = GroupSet::from_range(4..5);
    let enc = encoded(&provider, &ha, &g);
    transfer(&s, &ha, a.len() as u64, &g, &enc, &mut Rng(6)).unwrap();
    assert_eq!(read_all(&s, &m.id(), "a"), a);
}

#[test]
fn reopening_after_a_crash_reconciles_files_with_rows() {
    let dir = tempfile::tempdir().unwrap();
    let a = data(100, 3 * GROUP_BYTES as usize);
    let b = data(101, 2 * GROUP_BYTES as usize);
    let fa: &[(&str, &[u8])] = &[("a", &a)];
    let fb: &[(&str, &[u8])] = &[("b", &b)];
    let (ma, mb) = (manifest("a", fa), manifest("b", fb));
    {
        let s = DiskStore::open(dir.path(), StoreConfig::with_max_bytes(64 * MIB)).unwrap();
        add(&s, &ma, fa, &[]).unwrap();
        add(&s, &mb, fb, &[]).unwrap();
        // A crash: the store is not closed.
        std::mem::forget(s);
    }
    // An orphan as a crash between rename and commit leaves it, a half-written staging
    // file, and a blob whose file vanished.
    let orphan = Hash::of(b"orphan");
    std::fs::write(blob_file(dir.path(), &orphan, "data"), b"orphan").unwrap();
    std::fs::write(dir.path().join("staging/9.data"), b"half").unwrap();
    std::fs::remove_file(blob_file(dir.path(), &Hash::of(&b), "data")).unwrap();
    // The forgotten store still holds the lock in this process: release it by hand is
    // impossible, so open through a fresh process-level lock file descriptor instead.
    let s = reopen_after_forget(dir.path());
    let r = s.open_report();
    assert!(r.unclean);
    assert_eq!(
        (
            r.orphan_files_deleted,
            r.staging_files_deleted,
            r.blobs_damaged
        ),
        (1, 1, 1),
        "{r:?}"
    );
    assert!(!blob_file(dir.path(), &orphan, "data").exists());
    assert_eq!(read_all(&s, &ma.id(), "a"), a);
    assert!(matches!(
        s.open_file(&mb.id(), &path("b")),
        Err(StoreError::Incomplete(_))
    ));
}

/// `mem::forget` keeps the forgotten store's lock descriptor open; flock locks belong
/// to the open file description, so this process cannot take it again. Close every
/// descriptor of the LOCK file first, as a dead process would have.
fn reopen_after_forget(dir: &Path) -> DiskStore {
    let lock = std::fs::canonicalize(dir.join("LOCK")).unwrap();
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        if std::fs::read_link(e.path()).ok().as_deref() == Some(lock.as_path())
            && let Ok(fd) = e.file_name().to_string_lossy().parse::<i32>()
        {
            // SAFETY: closing a descriptor only the forgotten store used.
            unsafe { libc::close(fd) };
        }
    }
    DiskStore::open(dir, StoreConfig::with_max_bytes(64 * MIB)).unwrap()
}

#[test]
fn a_store_is_opened_by_one_process_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let _s = DiskStore::open(dir.path(), StoreConfig::with_max_bytes(MIB)).unwrap();
    assert!(matches!(
        DiskStore::open(dir.path(), StoreConfig::with_max_bytes(MIB)),
        Err(StoreError::Locked { .. })
    ));
}

#[test]
fn a_lowered_quota_evicts_cached_packages_on_open_and_gc_frees_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    let keep = data(110, 500_000);
    let go = data(111, 500_000);
    let fk: &[(&str, &[u8])] = &[("k", &keep)];
    let fg: &[(&str, &[u8])] = &[("g", &go)];
    let (mk, mg) = (manifest("k", fk), manifest("g", fg));
    {
        let s = DiskStore::open(dir.path(), StoreConfig::with_max_bytes(64 * MIB)).unwrap();
        add(&s, &mk, fk, &[Hold::Pin]).unwrap();
        add(&s, &mg, fg, &[]).unwrap();
    }
    let s = DiskStore::open(dir.path(), StoreConfig::with_max_bytes(MIB)).unwrap();
    assert!(s.package(&mg.id()).unwrap().is_none());
    assert_eq!(read_all(&s, &mk.id(), "k"), keep);
    let u = s.usage().unwrap();
    assert!(u.used <= u.max_bytes, "{u:?}");
    // GC removes files no row names.
    let stray = Hash::of(b"stray");
    std::fs::write(blob_file(dir.path(), &stray, "data"), b"stray").unwrap();
    let r = s.gc().unwrap();
    assert_eq!(r.blobs_deleted, 1);
    assert!(!blob_file(dir.path(), &stray, "data").exists());
}

#[test]
fn disk_use_stays_within_the_quota_and_its_slack() {
    let dir = tempfile::tempdir().unwrap();
    let max = 8 * MIB;
    let s = DiskStore::open(dir.path(), StoreConfig::with_max_bytes(max)).unwrap();
    let mut rng = Rng(5);
    let provider = MemStore::new(StoreConfig::with_max_bytes(1 << 30)).unwrap();
    for i in 0..40u64 {
        let d = data(200 + i, 1 + rng.below(MIB) as usize);
        let f: &[(&str, &[u8])] = &[("f", &d)];
        let m = manifest(&format!("q{i}"), f);
        if i % 2 == 0 {
            let _ = add(&s, &m, f, if i % 10 == 0 { &[Hold::Pin] } else { &[] });
        } else {
            add(&provider, &m, f, &[]).unwrap();
            if s.put_manifest(&m, &[]).is_ok() {
                fetch(&s, &provider, &m, &[], &mut rng).unwrap();
            }
        }
        let u = s.usage().unwrap();
        assert!(u.used <= max, "{u:?}");
        // Tighter than the documented slack: 1 MiB of it is the 256 shard directories.
        let du = disk_bytes(dir.path());
        assert!(du <= max + 2 * MIB, "{du} bytes on disk, {u:?}");
    }
}

#[test]
fn concurrent_adds_fetches_and_gc_leave_a_consistent_store() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(DiskStore::open(dir.path(), StoreConfig::with_max_bytes(6 * MIB)).unwrap());
    let provider = Arc::new(MemStore::new(StoreConfig::with_max_bytes(1 << 30)).unwrap());
    let threads: Vec<_> = (0..3u64)
        .map(|t| {
            let (s, provider) = (s.clone(), provider.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(t);
                for i in 0..12u64 {
                    let d = data(t * 1000 + i, 1 + rng.below(700_000) as usize);
                    let f: &[(&str, &[u8])] = &[("f", &d)];
                    let m = manifest(&format!("t{t}-{i}"), f);
                    match t {
                        0 => {
                            let _ = add(&*s, &m, f, &[]);
                        }
                        1 => {
                            add(&*provider, &m, f, &[]).unwrap();
                            // Refused for quota, or evicted by another thread mid-fetch.
                            match fetch(&*s, &*provider, &m, &[], &mut rng) {
                                Ok(())
                                | Err(StoreError::Quota { .. })
                                | Err(StoreError::UnknownBlob(_))
                                | Err(StoreError::AlreadyComplete(_)) => {}
                                Err(e) => panic!("{e}"),
                            }
                        }
                        _ => {
                            s.gc().unwrap();
                            let _ = s.verify().unwrap();
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(s.verify().unwrap().corrupt.is_empty());
    for p in s.packages().unwrap() {
        if p.completeness == Completeness::Complete {
            for f in s.files(&p.id).unwrap() {
                let (_, mut r) = s.open_file(&p.id, &f.path).unwrap();
                let mut v = Vec::new();
                r.read_to_end(&mut v).unwrap();
                assert_eq!(Hash::of(&v), f.hash);
            }
        }
    }
    assert_eq!(s.gc().unwrap().blobs_deleted, 0, "nothing left for GC");
}

#[test]
fn groups_committed_before_an_fsync_are_verified_again_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let provider = MemStore::new(StoreConfig::with_max_bytes(1 << 30)).unwrap();
    let a = data(120, (300 * GROUP_BYTES) as usize);
    let files: &[(&str, &[u8])] = &[("a", &a)];
    let m = manifest("u", files);
    add(&provider, &m, files, &[]).unwrap();
    let h = Hash::of(&a);
    {
        let s = DiskStore::open(dir.path(), StoreConfig::with_max_bytes(1 << 30)).unwrap();
        s.put_manifest(&m, &[]).unwrap();
        let req = GroupSet::from_range(0..150);
        let enc = encoded(&provider, &h, &req);
        transfer(&s, &h, a.len() as u64, &req, &enc, &mut Rng(7)).unwrap();
        // Killed: nothing flushed, nothing fsynced.
        std::mem::forget(s);
    }
    // A power loss took group 10's bytes (they never reached the disk).
    let path = blob_file(dir.path(), &h, "data");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10 * GROUP_BYTES as usize..11 * GROUP_BYTES as usize].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    let s = reopen_after_forget(dir.path());
    let r = s.open_report();
    // Committed unsynced every 256 KiB (16 groups): 144 of the 150 groups.
    assert_eq!(
        (r.unsynced_groups_checked, r.unsynced_groups_lost),
        (144, 1),
        "{r:?}"
    );
    let BlobStatus::Partial { verified, .. } = s.blob_status(&h).unwrap() else {
        panic!()
    };
    let mut expected = GroupSet::from_range(0..144);
    expected.remove_range(10..11);
    assert_eq!(verified, expected);
    assert!(s.verify().unwrap().corrupt.is_empty());
    // The rest arrives and the blob is whole.
    let rest = GroupSet::all(300).difference(&expected);
    let enc = encoded(&provider, &h, &rest);
    transfer(&s, &h, a.len() as u64, &rest, &enc, &mut Rng(8)).unwrap();
    assert_eq!(read_all(&s, &m.id(), "a"), a);
}

both!(files_export_to_a_file_whole, 64 * MIB, |s: &dyn Store| {
    let d = data(130, 5 * GROUP_BYTES as usize + 3);
    let files: &[(&str, &[u8])] = &[("out.bin", &d)];
    let m = manifest("x", files);
    add(s, &m, files, &[]).unwrap();
    let (_, mut r) = s.open_file(&m.id(), &path("out.bin")).unwrap();
    // The cursor does not matter: the whole blob is copied.
    r.seek(SeekFrom::Start(100)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("out.bin");
    let mut f = std::fs::File::create(&dest).unwrap();
    assert_eq!(r.copy_to(&mut f).unwrap(), d.len() as u64);
    drop(f);
    assert_eq!(std::fs::read(&dest).unwrap(), d);
});

#[test]
fn the_search_index_is_written_and_cleared_with_the_package() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path(), StoreConfig::with_max_bytes(64 * MIB)).unwrap();
    let d = data(140, 1000);
    let files: &[(&str, &[u8])] = &[("docs/spores.html", &d)];
    let m = manifest("mycelium", files);
    add(&s, &m, files, &[]).unwrap();
    let db = rusqlite::Connection::open(dir.path().join("store.sqlite")).unwrap();
    let hits = |q: &str| -> i64 {
        db.query_row(
            "SELECT count(*) FROM search WHERE search MATCH ?1",
            [q],
            |r| r.get(0),
        )
        .unwrap()
    };
    // Title, tags and file paths are indexed, in the package's own commit.
    assert_eq!(hits("mycelium"), 1);
    assert_eq!(hits("spores"), 1);
    assert_eq!(hits("test"), 1);
    assert_eq!(hits("nothing"), 0);
    s.remove(&m.id()).unwrap();
    assert_eq!(hits("mycelium"), 0);
}

both!(
    eviction_never_frees_a_blob_the_incoming_package_uses,
    3 * MIB,
    |s: &dyn Store| {
        // A cached package holds blobs x and z; a new package shares x and needs room
        // that only evicting the cached one can make (by freeing z, not x).
        let x = data(150, 1_000_000);
        let z = data(152, 900_000);
        let fp: &[(&str, &[u8])] = &[("x", &x), ("z", &z)];
        let mp = manifest("old", fp);
        add(s, &mp, fp, &[]).unwrap();
        let y = data(151, 1_200_000);
        let fq: &[(&str, &[u8])] = &[("x", &x), ("y", &y)];
        let mq = manifest("new", fq);
        let info = s.put_manifest(&mq, &[Hold::Pin]).unwrap();
        assert!(
            s.package(&mp.id()).unwrap().is_none(),
            "the old package made room"
        );
        assert_eq!(
            info.completeness,
            Completeness::Partial {
                verified_bytes: x.len() as u64
            }
        );
        assert_eq!(read_all(s, &mq.id(), "x"), x);
        // An add stages every file: room made while staging may evict x's other
        // package, and the staged copy of x is what the add then installs.
        s.remove(&mq.id()).unwrap();
        add(s, &mp, fp, &[]).unwrap();
        let mr = manifest("add", fq);
        let info = add(s, &mr, fq, &[]).unwrap();
        assert!(
            s.package(&mp.id()).unwrap().is_none(),
            "the old package made room"
        );
        assert_eq!(info.completeness, Completeness::Complete);
        assert_eq!(read_all(s, &mr.id(), "x"), x);
        assert!(s.verify().unwrap().corrupt.is_empty());
    }
);

both!(
    adding_a_package_being_fetched_completes_it,
    64 * MIB,
    |s: &dyn Store| {
        let provider = MemStore::new(StoreConfig::with_max_bytes(64 * MIB)).unwrap();
        let a = data(160, 30 * GROUP_BYTES as usize);
        let b = data(161, 10 * GROUP_BYTES as usize);
        let files: &[(&str, &[u8])] = &[("a", &a), ("b", &b)];
        let m = manifest("half", files);
        add(&provider, &m, files, &[]).unwrap();
        s.put_manifest(&m, &[]).unwrap();
        let (ha, hb) = (Hash::of(&a), Hash::of(&b));
        let req = GroupSet::from_range(0..12);
        let enc = encoded(&provider, &ha, &req);
        transfer(s, &ha, a.len() as u64, &req, &enc, &mut Rng(9)).unwrap();
        // The user adds the same files: the package is complete and pinned.
        let info = add(s, &m, files, &[Hold::Pin]).unwrap();
        assert_eq!(info.completeness, Completeness::Complete);
        assert_eq!(info.holds, vec![Hold::Pin]);
        assert_eq!(
            s.blob_status(&hb).unwrap(),
            BlobStatus::Complete {
                size: b.len() as u64
            }
        );
        // A late group of the fetch is ignored: the blob is already whole.
        assert!(
            s.write_group(
                &ha,
                20,
                &a[20 * GROUP_BYTES as usize..21 * GROUP_BYTES as usize]
            )
            .unwrap()
        );
        s.flush().unwrap();
        assert_eq!(read_all(s, &m.id(), "a"), a);
        assert!(s.verify().unwrap().corrupt.is_empty());
    }
);

both!(
    a_package_of_many_files_is_added_whole,
    64 * MIB,
    |s: &dyn Store| {
        // More files than are fsynced one by one: the file system is synced at once.
        let bodies: Vec<Vec<u8>> = (0..40)
            .map(|i| data(300 + i, 100 + 999 * i as usize))
            .collect();
        let names: Vec<String> = (0..40).map(|i| format!("d{}/f{i}", i % 7)).collect();
        let files: Vec<(&str, &[u8])> = names
            .iter()
            .zip(&bodies)
            .map(|(n, b)| (n.as_str(), &b[..]))
            .collect();
        let m = manifest("many", &files);
        let info = add(s, &m, &files, &[]).unwrap();
        assert_eq!(info.completeness, Completeness::Complete);
        for (n, b) in &files {
            assert_eq!(read_all(s, &m.id(), n), *b);
        }
    }
);

/// A source opened for serving tells when its blob was removed under it, so a server
/// streaming from it can let go of the unlinked files (whose blocks the quota no longer
/// counts) instead of holding them for as long as a slow peer keeps the stream open.
#[test]
fn a_source_knows_when_its_blob_was_removed() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path(), StoreConfig::with_max_bytes(64 * MIB)).unwrap();
    let d = data(9, 3 * GROUP_BYTES as usize);
    let files: &[(&str, &[u8])] = &[("f", &d)];
    let m = manifest("unlinked", files);
    add(&s, &m, files, &[]).unwrap();
    let src = s.source(&Hash::of(&d)).unwrap();
    assert!(!src.is_unlinked());
    s.remove(&m.id()).unwrap();
    assert!(src.is_unlinked(), "the removed blob's files are unlinked");
    // Still readable: the reader holds the inode until it is dropped.
    let mut buf = vec![0u8; 16];
    src.data.read_exact_at(0, &mut buf).unwrap();
    assert_eq!(buf, d[..16]);
    let mem = MemStore::new(StoreConfig::with_max_bytes(64 * MIB)).unwrap();
    add(&mem, &m, files, &[]).unwrap();
    assert!(!mem.source(&Hash::of(&d)).unwrap().is_unlinked());
}
