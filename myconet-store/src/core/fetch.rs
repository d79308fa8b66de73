//! Fetching: partial blobs filled with verified pairs and groups, their commits, and
//! serving what is verified.

use super::*;

/// Pending bytes after which a partial blob's verified groups are committed *unsynced*
/// (no fsync: what a killed process loses, since the page cache outlives it): 1/256 of
/// the blob, between 256 KiB and 4 MiB.
fn soft_commit_bytes(size: u64) -> u64 {
    (size / 256).clamp(256 << 10, 4 << 20)
}

/// Unsynced bytes after which a partial blob's files are fsynced and its groups
/// committed durably (what a power loss can make us re-verify, and re-fetch if lost):
/// 1/8 of the blob, between 8 MiB and 256 MiB.
fn sync_bytes(size: u64) -> u64 {
    (size / 8).clamp(8 << 20, 256 << 20)
}

impl<B: Backend> Core<B> {
    pub(super) fn partials_map(&self) -> MutexGuard<'_, HashMap<Hash, SharedPartial<B>>> {
        self.partials.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Groups of `hash` verified and written but not committed yet.
    pub(super) fn pending_groups(&self, hash: &Hash) -> GroupSet {
        let p = self.partials_map().get(hash).cloned();
        p.map(|p| p.lock().unwrap_or_else(|e| e.into_inner()).pending.clone())
            .unwrap_or_default()
    }

    /// The open partial blob `hash`, opening its files if needed.
    pub(super) fn partial(&self, hash: &Hash) -> Result<SharedPartial<B>> {
        let db = self.lock_db();
        if let Some(p) = self.partials_map().get(hash) {
            return Ok(p.clone());
        }
        let row = blob_row(&db.conn, hash)?.ok_or(StoreError::UnknownBlob(*hash))?;
        if row.complete {
            return Err(StoreError::AlreadyComplete(*hash));
        }
        // Under the database lock, so GC's sweep never sees the files without the row.
        let files = self
            .backend
            .open_partial(hash, row.size, verified::outboard_size(row.size))?;
        let p = Arc::new(Mutex::new(Partial::new(
            row.blob,
            row.size,
            files,
            verified_groups(row.size, row.verified.as_deref()),
        )));
        self.partials_map().insert(*hash, p.clone());
        Ok(p)
    }

    /// The open partial blob `hash`, or `None` if it is complete (nothing to write).
    pub(super) fn writable(&self, hash: &Hash) -> Result<Option<SharedPartial<B>>> {
        match self.partial(hash) {
            Ok(p) => Ok(Some(p)),
            Err(StoreError::AlreadyComplete(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn write_parent(&self, hash: &Hash, parent: &VerifiedParent) -> Result<()> {
        let Some(partial) = self.writable(hash)? else {
            return Ok(());
        };
        let mut p = partial.lock().unwrap_or_else(|e| e.into_inner());
        let outboard = verified::outboard_size(p.size);
        let fits = parent
            .offset
            .checked_add(PAIR_BYTES)
            .is_some_and(|end| end <= outboard);
        if !parent.offset.is_multiple_of(PAIR_BYTES) || !fits {
            return Err(StoreError::ParentOutOfRange {
                hash: *hash,
                offset: parent.offset,
            });
        }
        p.put_pair(parent.offset, &parent.pair)
            .map_err(io_err("writing partial blob", hash.to_string()))
    }

    pub(crate) fn write_group(&self, hash: &Hash, group: u64, data: &[u8]) -> Result<bool> {
        let Some(partial) = self.writable(hash)? else {
            return Ok(true);
        };
        let mut p = partial.lock().unwrap_or_else(|e| e.into_inner());
        let count = verified::group_count(p.size);
        let range = verified::group_bytes(p.size, group);
        if group >= count || data.len() as u64 != range.end - range.start {
            return Err(StoreError::GroupOutOfRange {
                hash: *hash,
                group,
                len: data.len() as u64,
            });
        }
        p.put_data(range.start, data)
            .map_err(io_err("writing partial blob", hash.to_string()))?;
        // A group committed before is taken again: verify may have dropped it.
        p.add_pending(group, data.len() as u64);
        let whole = p.is_whole(count);
        if whole || p.unsynced_bytes + p.pending_bytes >= sync_bytes(p.size) {
            return self.commit_partial(hash, &mut p, true);
        }
        if p.pending_bytes >= soft_commit_bytes(p.size) {
            return self.commit_partial(hash, &mut p, false);
        }
        Ok(false)
    }

    pub(crate) fn have(&self, id: &PackageId) -> Result<Vec<(Hash, GroupSet)>> {
        let rows: Vec<(Hash, u64, bool, Option<Vec<u8>>)> = {
            let db = self.lock_db();
            let pkg = find_package(&db.conn, id)?.ok_or(StoreError::UnknownPackage(*id))?;
            db.conn
                .prepare_cached(
                    "SELECT b.hash, b.size, b.complete, b.verified FROM blobs b
                     WHERE b.blob IN (SELECT blob FROM files WHERE pkg = ?1)",
                )?
                .query_map([pkg], |r| {
                    Ok((r.get::<_, Vec<u8>>(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?
                .map(|r| {
                    let (h, s, c, v) = r?;
                    Ok((hash_from(&h)?, u64_of(s), c, v))
                })
                .collect::<Result<_>>()?
        };
        // Pending groups are read after the database lock is let go (lock order).
        Ok(rows
            .into_iter()
            .map(|(hash, size, complete, verified)| {
                let groups = if complete {
                    GroupSet::all(verified::group_count(size))
                } else {
                    verified_groups(size, verified.as_deref()).union(&self.pending_groups(&hash))
                };
                (hash, groups)
            })
            .collect())
    }

    /// Commits a partial blob's pending groups: `durable`, after fsyncing its files
    /// (and then its unsynced groups are durable too); otherwise unsynced. Marks the
    /// blob complete, always durably, when every group is verified. Returns whether it
    /// is complete.
    pub(super) fn commit_partial(
        &self,
        hash: &Hash,
        p: &mut Partial<B::Partial>,
        durable: bool,
    ) -> Result<bool> {
        // Gathered bytes and pairs reach the files before anything is committed (pairs
        // may precede the groups they prove by a call or more).
        p.write_buffered()
            .map_err(io_err("writing partial blob", hash.to_string()))?;
        crate::crash_point();
        if p.pending.is_empty() && !(durable && p.unsynced_bytes > 0) {
            return Ok(false);
        }
        let sync = |p: &mut Partial<B::Partial>| {
            p.files
                .sync()
                .map_err(io_err("syncing partial blob", hash.to_string()))
        };
        if durable {
            sync(p)?;
            crate::crash_point();
        }
        let db = self.lock_db();
        let row = match blob_row(&db.conn, hash)? {
            Some(r) if r.blob == p.blob => r,
            // Evicted or removed meanwhile.
            _ => {
                self.partials_map().remove(hash);
                return Err(StoreError::UnknownBlob(*hash));
            }
        };
        if row.complete {
            self.partials_map().remove(hash);
            return Ok(true);
        }
        // The row, not memory, says what was committed: verify may have shrunk it.
        let now = verified_groups(row.size, row.verified.as_deref()).union(&p.pending);
        let complete = now.len() == verified::group_count(row.size);
        if complete {
            if !durable {
                sync(p)?;
            }
            db.conn.execute(
                "UPDATE blobs SET complete = 1, verified = NULL, unsynced = NULL WHERE blob = ?1",
                [row.blob],
            )?;
            self.partials_map().remove(hash);
        } else if durable {
            db.conn.execute(
                "UPDATE blobs SET verified = ?2, unsynced = NULL WHERE blob = ?1",
                params![row.blob, now.to_bytes()],
            )?;
        } else {
            let unsynced = verified_groups(row.size, row.unsynced.as_deref()).union(&p.pending);
            // Not durable on its own (the log is not fsynced): a power loss may take
            // the commit back, which loses nothing but the groups' record.
            db.conn.pragma_update(None, "synchronous", "NORMAL")?;
            let updated = db.conn.execute(
                "UPDATE blobs SET verified = ?2, unsynced = ?3 WHERE blob = ?1",
                params![row.blob, now.to_bytes(), unsynced.to_bytes()],
            );
            db.conn.pragma_update(None, "synchronous", "FULL")?;
            updated?;
        }
        crate::crash_point();
        p.committed = now;
        p.unsynced_bytes = if durable || complete {
            0
        } else {
            p.unsynced_bytes + p.pending_bytes
        };
        p.pending = GroupSet::new();
        p.pending_bytes = 0;
        Ok(complete)
    }

    /// Commits every partial blob's pending and unsynced groups durably.
    pub(crate) fn flush(&self) -> Result<()> {
        let open: Vec<(Hash, SharedPartial<B>)> = self
            .partials_map()
            .iter()
            .map(|(h, p)| (*h, p.clone()))
            .collect();
        for (hash, partial) in open {
            let mut p = partial.lock().unwrap_or_else(|e| e.into_inner());
            match self.commit_partial(&hash, &mut p, true) {
                Ok(_) | Err(StoreError::UnknownBlob(_)) => {}
                Err(e) => return Err(e),
            }
            // Everything is written and committed: let the files and buffers go (a
            // later write opens them again). Not if a writer took it meanwhile.
            let mut map = self.partials_map();
            if map.get(&hash).is_some_and(|q| Arc::ptr_eq(q, &partial))
                && Arc::strong_count(&partial) == 2
            {
                map.remove(&hash);
            }
        }
        Ok(())
    }

    pub(crate) fn source(&self, hash: &Hash) -> Result<BlobSource> {
        let db = self.lock_db();
        let row = blob_row(&db.conn, hash)?.ok_or(StoreError::UnknownBlob(*hash))?;
        let data = self.backend.open_data(hash)?;
        let outboard = self.backend.open_outboard(hash)?;
        drop(db);
        let count = verified::group_count(row.size);
        let verified = if row.complete {
            if data.is_none() {
                return Err(StoreError::UnknownBlob(*hash));
            }
            GroupSet::all(count)
        } else if data.is_none() {
            GroupSet::new()
        } else {
            // Committed groups only: pending ones may still be in a write buffer.
            verified_groups(row.size, row.verified.as_deref())
        };
        Ok(BlobSource {
            hash: *hash,
            size: row.size,
            verified,
            data: data.unwrap_or_else(BlobReader::empty),
            outboard: Outboard::new(*hash, row.size, outboard.unwrap_or_else(BlobReader::empty)),
        })
    }

    pub(crate) fn encode(&self, hash: &Hash, groups: &GroupSet, out: &mut dyn Write) -> Result<()> {
        let src = self.source(hash)?;
        let missing = groups.difference(&src.verified);
        if !missing.is_empty() {
            return Err(StoreError::NotVerified {
                hash: *hash,
                groups: missing,
            });
        }
        verified::encode_groups(&src.data, &src.outboard, groups, out).map_err(|e| match e {
            verified::EncodeError::Corrupt(error) => {
                StoreError::LocalCorrupt { hash: *hash, error }
            }
            verified::EncodeError::Io(e) => StoreError::Write(e),
        })
    }
}
