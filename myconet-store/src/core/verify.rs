//! Verify, and reconciling files with rows after an unclean shutdown.

use super::*;

/// Compares what is written with the bytes of a reader.
struct CompareWriter<'a> {
    expected: Option<&'a BlobReader>,
    offset: u64,
    equal: bool,
    buf: Vec<u8>,
}

impl Write for CompareWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.equal {
            match self.expected {
                None => self.equal = data.is_empty(),
                Some(r) => {
                    self.buf.resize(data.len(), 0);
                    if r.read_exact_at(self.offset, &mut self.buf).is_err() || self.buf != data {
                        self.equal = false;
                    }
                }
            }
        }
        self.offset += data.len() as u64;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<B: Backend> Core<B> {
    pub(crate) fn verify(&self) -> Result<VerifyReport> {
        // Pending groups are verified but not committed: commit them so they are checked.
        self.flush()?;
        let rows: Vec<(Hash, u64, bool, Option<Vec<u8>>)> = {
            let db = self.lock_db();
            db.conn
                .prepare("SELECT hash, size, complete, verified FROM blobs ORDER BY blob")?
                .query_map([], |r| {
                    Ok((r.get::<_, Vec<u8>>(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?
                .map(|r| {
                    let (h, s, c, v) = r?;
                    Ok((hash_from(&h)?, u64_of(s), c, v))
                })
                .collect::<Result<_>>()?
        };
        let mut report = VerifyReport::default();
        for (hash, size, complete, verified) in rows {
            report.blobs_checked += 1;
            let found = if complete {
                self.check_complete(&hash, size, &mut report.bytes_checked)?
            } else {
                let committed = verified_groups(size, verified.as_deref());
                self.check_partial(&hash, size, &committed, &mut report.bytes_checked)?
            };
            let Some((problem, good)) = found else {
                continue;
            };
            let db = self.lock_db();
            // Removed while being checked: nothing to report.
            let Some(row) = blob_row(&db.conn, &hash)? else {
                continue;
            };
            if problem != Problem::OutboardRepaired {
                db.conn.execute(
                    "UPDATE blobs SET complete = 0, verified = ?2, unsynced = NULL WHERE blob = ?1",
                    params![row.blob, good.to_bytes()],
                )?;
            }
            let packages = db
                .conn
                .prepare_cached(
                    "SELECT DISTINCT p.id FROM files f JOIN packages p ON p.pkg = f.pkg WHERE f.blob = ?1",
                )?
                .query_map([row.blob], |r| r.get::<_, Vec<u8>>(0))?
                .map(|r| id_from(&r?))
                .collect::<Result<_>>()?;
            report.corrupt.push(Corruption {
                hash,
                problem,
                verified_bytes_kept: group_set_bytes(size, &good),
                packages,
            });
        }
        Ok(report)
    }

    /// Re-hashes one complete blob. Wrong data: which groups still verify. A wrong
    /// outboard over right data is rewritten from the data.
    pub(super) fn check_complete(
        &self,
        hash: &Hash,
        size: u64,
        bytes: &mut u64,
    ) -> Result<Option<(Problem, GroupSet)>> {
        let Some(mut data) = self.backend.open_data(hash)? else {
            return Ok(Some((Problem::Missing, GroupSet::new())));
        };
        if data.len() != size {
            return Ok(Some((
                Problem::WrongLength { found: data.len() },
                GroupSet::new(),
            )));
        }
        let outboard = self
            .backend
            .open_outboard(hash)?
            .unwrap_or_else(BlobReader::empty);
        let mut cmp = CompareWriter {
            expected: Some(&outboard),
            offset: 0,
            equal: true,
            buf: Vec::new(),
        };
        let root = verified::compute_outboard(
            io::BufReader::with_capacity(crate::IO_BUFFER, &mut data),
            size,
            &mut cmp,
        );
        *bytes += size;
        let root = match root {
            Ok(r) => r,
            // Shrunk while being read.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Ok(Some((
                    Problem::WrongLength { found: data.len() },
                    GroupSet::new(),
                )));
            }
            Err(e) => return Err(io_err("reading blob", hash.to_string())(e)),
        };
        if root != *hash {
            let all = GroupSet::all(verified::group_count(size));
            let good = verified::verify_groups(&data, &Outboard::new(*hash, size, &outboard), &all)
                .unwrap_or_default();
            return Ok(Some((Problem::DataMismatch, good)));
        }
        let expected_len = verified::outboard_size(size);
        if cmp.equal && cmp.offset == expected_len && outboard.len() == expected_len {
            return Ok(None);
        }
        let mut again = self
            .backend
            .open_data(hash)?
            .ok_or(StoreError::UnknownBlob(*hash))?;
        self.backend
            .write_outboard(hash, &mut |out: &mut dyn Write| {
                verified::compute_outboard(
                    io::BufReader::with_capacity(crate::IO_BUFFER, &mut again),
                    size,
                    out,
                )
                .map(|_| ())
            })?;
        Ok(Some((
            Problem::OutboardRepaired,
            GroupSet::all(verified::group_count(size)),
        )))
    }

    /// Re-checks the committed groups of a partial blob against the root.
    pub(super) fn check_partial(
        &self,
        hash: &Hash,
        size: u64,
        committed: &GroupSet,
        bytes: &mut u64,
    ) -> Result<Option<(Problem, GroupSet)>> {
        if committed.is_empty() {
            return Ok(None);
        }
        let Some(data) = self.backend.open_data(hash)? else {
            return Ok(Some((Problem::Missing, GroupSet::new())));
        };
        let outboard = self
            .backend
            .open_outboard(hash)?
            .unwrap_or_else(BlobReader::empty);
        let good =
            verified::verify_groups(&data, &Outboard::new(*hash, size, &outboard), committed)
                .map_err(io_err("reading blob", hash.to_string()))?;
        *bytes += group_set_bytes(size, committed);
        Ok((good != *committed).then_some((Problem::DataMismatch, good)))
    }
}

/// After an unclean shutdown: deletes blob rows no package uses and files no row names;
/// marks complete blobs whose files are missing or the wrong size as partial (nothing
/// verified), so they are fetched again rather than served.
pub(super) fn reconcile<B: Backend>(
    backend: &B,
    conn: &mut Connection,
    report: &mut OpenReport,
) -> Result<()> {
    let tx = conn.transaction()?;
    let unused: Vec<i64> = tx
        .prepare("SELECT blob FROM blobs b WHERE NOT EXISTS (SELECT 1 FROM files f WHERE f.blob = b.blob)")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    report.blobs_collected = delete_unused_blobs(&tx, &unused)?.len() as u64;
    let rows: Vec<(i64, Vec<u8>, i64)> = tx
        .prepare("SELECT blob, hash, size FROM blobs WHERE complete = 1")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (blob, hash, size) in rows {
        let hash = hash_from(&hash)?;
        let size = u64_of(size);
        let data_ok = backend.open_data(&hash)?.is_some_and(|d| d.len() == size);
        let ob_len = verified::outboard_size(size);
        let outboard_ok = ob_len == 0
            || backend
                .open_outboard(&hash)?
                .is_some_and(|o| o.len() == ob_len);
        if !(data_ok && outboard_ok) {
            tx.execute(
                "UPDATE blobs SET complete = 0, verified = x'', unsynced = NULL WHERE blob = ?1",
                [blob],
            )?;
            report.blobs_damaged += 1;
        }
    }
    // Groups committed before their bytes were fsynced: a power loss may have lost
    // their bytes (or the pairs proving them). Kept only if they verify again.
    /// A partial blob with groups committed unsynced.
    struct Unsynced {
        blob: i64,
        hash: Vec<u8>,
        size: i64,
        verified: Option<Vec<u8>>,
        unsynced: Vec<u8>,
    }
    let rows: Vec<Unsynced> = tx
        .prepare(
            "SELECT blob, hash, size, verified, unsynced FROM blobs
             WHERE complete = 0 AND unsynced IS NOT NULL",
        )?
        .query_map([], |r| {
            Ok(Unsynced {
                blob: r.get(0)?,
                hash: r.get(1)?,
                size: r.get(2)?,
                verified: r.get(3)?,
                unsynced: r.get(4)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    for row in rows {
        let hash = hash_from(&row.hash)?;
        let size = u64_of(row.size);
        let claimed = verified_groups(size, Some(&row.unsynced));
        let good = match backend.open_data(&hash)? {
            Some(data) => {
                let outboard = backend
                    .open_outboard(&hash)?
                    .unwrap_or_else(BlobReader::empty);
                verified::verify_groups(&data, &Outboard::new(hash, size, &outboard), &claimed)
                    .unwrap_or_default()
            }
            None => GroupSet::new(),
        };
        let lost = claimed.difference(&good);
        report.unsynced_groups_checked += claimed.len();
        report.unsynced_groups_lost += lost.len();
        let kept = verified_groups(size, row.verified.as_deref()).difference(&lost);
        tx.execute(
            "UPDATE blobs SET verified = ?2, unsynced = NULL WHERE blob = ?1",
            params![row.blob, kept.to_bytes()],
        )?;
    }
    let known = all_blob_hashes(&tx)?;
    tx.commit()?;
    for h in backend.list()? {
        if !known.contains(&h) {
            backend.delete(&h)?;
            report.orphan_files_deleted += 1;
        }
    }
    Ok(())
}
