//! Reading and writing rows: the SQL the other parts share.

use super::*;

pub(super) fn hash_from(bytes: &[u8]) -> Result<Hash> {
    <[u8; 32]>::try_from(bytes)
        .map(Hash)
        .map_err(|_| StoreError::BadRow("hash"))
}

pub(super) fn id_from(bytes: &[u8]) -> Result<PackageId> {
    hash_from(bytes).map(PackageId)
}

pub(super) fn path_from(s: String) -> Result<PackagePath> {
    PackagePath::new(s).map_err(|_| StoreError::BadRow("path"))
}

/// The committed verified groups of a partial blob, from its `verified` column. A value
/// that does not parse, or names groups past the end, counts as nothing verified: the
/// store never trusts bytes it cannot account for.
pub(super) fn verified_groups(size: u64, verified: Option<&[u8]>) -> GroupSet {
    let count = verified::group_count(size);
    let max_ranges = usize::try_from(count.div_ceil(2)).unwrap_or(usize::MAX);
    verified
        .and_then(|v| GroupSet::decode(v, max_ranges).ok())
        .filter(|g| g.end() <= count)
        .unwrap_or_default()
}

/// Bytes of a blob of `size` bytes that `groups` cover.
pub(super) fn group_set_bytes(size: u64, groups: &GroupSet) -> u64 {
    groups
        .ranges()
        .iter()
        .map(|r| {
            let start = verified::group_bytes(size, r.start).start;
            let end = verified::group_bytes(size, r.end.saturating_sub(1)).end;
            end.saturating_sub(start)
        })
        .sum()
}

pub(super) fn completeness(size: u64, complete: bool, verified: Option<Vec<u8>>) -> Completeness {
    if complete {
        Completeness::Complete
    } else {
        Completeness::Partial {
            verified_bytes: group_set_bytes(size, &verified_groups(size, verified.as_deref())),
        }
    }
}

pub(super) fn package_info(conn: &Connection, pkg: i64) -> Result<PackageInfo> {
    let (id, title, kind, total_size, file_count, added_at) = conn
        .prepare_cached(
            "SELECT id, title, kind, total_size, file_count, added_at FROM packages WHERE pkg = ?1",
        )?
        .query_row([pkg], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
    let holds = conn
        .prepare_cached("SELECT reason FROM holds WHERE pkg = ?1 ORDER BY reason")?
        .query_map([pkg], |r| r.get::<_, i64>(0))?
        .filter_map(|r| r.map(Hold::from_code).transpose())
        .collect::<rusqlite::Result<_>>()?;
    let mut complete = true;
    let mut verified_bytes = 0;
    {
        let mut stmt = conn.prepare_cached(
            "SELECT b.size, b.complete, b.verified FROM files f JOIN blobs b ON b.blob = f.blob
             WHERE f.pkg = ?1",
        )?;
        let mut rows = stmt.query([pkg])?;
        while let Some(r) = rows.next()? {
            let size = u64_of(r.get(0)?);
            match completeness(size, r.get(1)?, r.get(2)?) {
                Completeness::Complete => verified_bytes += size,
                Completeness::Partial { verified_bytes: v } => {
                    complete = false;
                    verified_bytes += v;
                }
            }
        }
    }
    let disk_bytes: i64 = conn
        .prepare_cached(
            "SELECT coalesce(sum(charge), 0) FROM blobs WHERE blob IN (SELECT blob FROM files WHERE pkg = ?1)",
        )?
        .query_row([pkg], |r| r.get(0))?;
    Ok(PackageInfo {
        id: id_from(&id)?,
        title,
        kind: kind
            .parse::<Kind>()
            .map_err(|_| StoreError::BadRow("kind"))?,
        total_size: u64_of(total_size),
        file_count: u64_of(file_count),
        completeness: if complete {
            Completeness::Complete
        } else {
            Completeness::Partial { verified_bytes }
        },
        holds,
        added_at: u64_of(added_at),
        disk_bytes: u64_of(disk_bytes),
    })
}

pub(super) fn find_package(conn: &Connection, id: &PackageId) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached("SELECT pkg FROM packages WHERE id = ?1")?
        .query_row([id.0.as_bytes()], |r| r.get(0))
        .optional()?)
}

pub(super) fn blob_row(conn: &Connection, hash: &Hash) -> Result<Option<BlobRow>> {
    Ok(conn
        .prepare_cached(
            "SELECT blob, size, complete, verified, unsynced FROM blobs WHERE hash = ?1",
        )?
        .query_row([hash.as_bytes()], |r| {
            Ok(BlobRow {
                blob: r.get(0)?,
                size: u64_of(r.get(1)?),
                complete: r.get(2)?,
                verified: r.get(3)?,
                unsynced: r.get(4)?,
            })
        })
        .optional()?)
}

pub(super) fn all_blob_hashes(conn: &Connection) -> Result<HashSet<Hash>> {
    conn.prepare("SELECT hash FROM blobs")?
        .query_map([], |r| r.get::<_, Vec<u8>>(0))?
        .map(|r| hash_from(&r?))
        .collect()
}

pub(super) fn insert_holds(tx: &Transaction<'_>, pkg: i64, holds: &[Hold]) -> Result<()> {
    let now = i64_of(now_secs());
    let mut stmt = tx.prepare_cached(
        "INSERT INTO holds (pkg, reason, since) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
    )?;
    for h in holds {
        stmt.execute(params![pkg, h.code(), now])?;
    }
    Ok(())
}

/// Inserts a package, its files (whose blob rows must exist), holds and search entry.
pub(super) fn insert_package_rows(
    tx: &Transaction<'_>,
    signed: &SignedManifest,
    holds: &[Hold],
    accessed: u64,
) -> Result<i64> {
    let m = signed.manifest();
    let md = &m.metadata;
    let optional = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    tx.prepare_cached(
        "INSERT INTO packages (id, manifest, author, created, kind, title, description, tags,
             language, licence, total_size, file_count, added_at, accessed)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )?
    .execute(params![
        signed.id().0.as_bytes(),
        signed.bytes(),
        &m.author.0[..],
        i64_of(m.created),
        md.kind.as_str(),
        &md.title,
        &md.description,
        md.tags.join("\n"),
        optional(&md.language),
        optional(&md.licence),
        i64_of(m.total_size()),
        i64_of(m.files.len() as u64),
        i64_of(now_secs()),
        i64_of(accessed),
    ])?;
    let pkg = tx.last_insert_rowid();
    {
        let mut ins = tx.prepare_cached(
            "INSERT INTO files (pkg, path, blob, executable)
             VALUES (?1, ?2, (SELECT blob FROM blobs WHERE hash = ?3), ?4)",
        )?;
        for f in &m.files {
            ins.execute(params![
                pkg,
                f.path.as_str(),
                f.root.as_bytes(),
                f.executable
            ])?;
        }
    }
    insert_holds(tx, pkg, holds)?;
    let paths: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
    tx.prepare_cached(
        "INSERT INTO search (rowid, title, description, tags, paths) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        pkg,
        &md.title,
        &md.description,
        md.tags.join("\n"),
        paths.join("\n")
    ])?;
    Ok(pkg)
}

/// Deletes a package's rows; returns the blobs it used.
pub(super) fn delete_package_rows(tx: &Transaction<'_>, pkg: i64) -> Result<Vec<i64>> {
    let blobs: Vec<i64> = tx
        .prepare_cached("SELECT DISTINCT blob FROM files WHERE pkg = ?1")?
        .query_map([pkg], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    tx.prepare_cached("DELETE FROM search WHERE rowid = ?1")?
        .execute([pkg])?;
    tx.prepare_cached("DELETE FROM packages WHERE pkg = ?1")?
        .execute([pkg])?;
    Ok(blobs)
}

/// Deletes those of `blobs` no package uses any more; returns their hashes and charges.
pub(super) fn delete_unused_blobs(tx: &Transaction<'_>, blobs: &[i64]) -> Result<Vec<(Hash, u64)>> {
    let mut stmt = tx.prepare_cached(
        "DELETE FROM blobs WHERE blob = ?1 AND NOT EXISTS (SELECT 1 FROM files WHERE blob = ?1)
         RETURNING hash, charge",
    )?;
    let mut out = Vec::new();
    for &b in blobs {
        if let Some((h, c)) = stmt
            .query_row([b], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))
            .optional()?
        {
            out.push((hash_from(&h)?, u64_of(c)));
        }
    }
    Ok(out)
}
