//! The SQLite schema and its migrations.
//!
//! `PRAGMA user_version` is the number of migrations applied; opening applies the missing
//! ones in one transaction each. Later issues add tables by appending migrations
//! (community records, replica bookkeeping), never by editing an applied one.

use rusqlite::Connection;

use crate::{Result, StoreError};

/// The migrations, in order. Migration `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: packages, their files, blobs, holds and the full-text index.
    r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;

-- One row per package this store holds, complete or partial.
CREATE TABLE packages (
    pkg         INTEGER PRIMARY KEY,
    id          BLOB NOT NULL UNIQUE CHECK (length(id) = 32),
    manifest    BLOB NOT NULL,            -- signed manifest bytes, hash to id
    author      BLOB NOT NULL CHECK (length(author) = 32),
    created     INTEGER NOT NULL,         -- author's creation time, Unix seconds
    kind        TEXT NOT NULL,
    title       TEXT NOT NULL,
    description TEXT NOT NULL,
    tags        TEXT NOT NULL,            -- newline-separated
    language    TEXT,
    licence     TEXT,
    total_size  INTEGER NOT NULL,
    file_count  INTEGER NOT NULL,
    added_at    INTEGER NOT NULL,         -- when this store first stored it, Unix seconds
    accessed    INTEGER NOT NULL,         -- LRU clock: higher is more recently used
    replicas    INTEGER                   -- per-package replica count k; NULL: node default
);
CREATE INDEX packages_by_access ON packages (accessed);

-- One row per distinct blob (file data), whoever uses it: identical files are stored once.
CREATE TABLE blobs (
    blob     INTEGER PRIMARY KEY,
    hash     BLOB NOT NULL UNIQUE CHECK (length(hash) = 32),
    size     INTEGER NOT NULL CHECK (size >= 0),
    complete INTEGER NOT NULL CHECK (complete IN (0, 1)),
    verified BLOB,                        -- partial: committed verified groups; NULL if complete
    unsynced BLOB,                        -- the part of `verified` committed before its bytes
                                          -- were fsynced: re-verified after a crash
    charge   INTEGER NOT NULL             -- bytes counted against the quota
);

-- The file tree of each package. A blob is in use while a row here names it: reference
-- counts are queries over this table, never counters.
CREATE TABLE files (
    pkg        INTEGER NOT NULL REFERENCES packages (pkg) ON DELETE CASCADE,
    path       TEXT NOT NULL,
    blob       INTEGER NOT NULL REFERENCES blobs (blob),
    executable INTEGER NOT NULL CHECK (executable IN (0, 1)),
    PRIMARY KEY (pkg, path)
) WITHOUT ROWID;
CREATE INDEX files_by_blob ON files (blob, pkg);

-- Why a package is kept (Hold codes); none: cached, evictable.
CREATE TABLE holds (
    pkg    INTEGER NOT NULL REFERENCES packages (pkg) ON DELETE CASCADE,
    reason INTEGER NOT NULL,
    since  INTEGER NOT NULL,
    PRIMARY KEY (pkg, reason)
) WITHOUT ROWID;

-- Full-text index over package metadata and file paths, rowid = packages.pkg; written
-- in the same transaction as the package.
CREATE VIRTUAL TABLE search USING fts5 (
    title, description, tags, paths,
    content = '', contentless_delete = 1,
    tokenize = 'unicode61 remove_diacritics 2'
);
"#,
];

/// The size the write-ahead log is kept to: a checkpoint runs when it holds this many
/// bytes of pages (`wal_autocheckpoint`) and cuts the file back to it
/// (`journal_size_limit`). 1/64 of the quota, between 64 KiB and 4 MiB, so a small
/// store is not mostly log.
pub(crate) fn wal_limit(max_bytes: u64) -> u64 {
    (max_bytes / 64).clamp(64 << 10, 4 << 20)
}

/// The schema version this build writes.
pub(crate) const VERSION: i64 = MIGRATIONS.len() as i64;

/// Sets the connection's pragmas. WAL lets readers run beside the writer; `synchronous =
/// FULL` makes a commit durable when it returns (one fsync of the log per commit, and
/// the store commits in batches); the log is kept to [`wal_limit`].
pub(crate) fn configure(conn: &Connection, in_memory: bool, max_bytes: u64) -> Result<()> {
    if !in_memory {
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NoWal(mode));
        }
    }
    conn.execute_batch(
        "PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;
         PRAGMA temp_store = MEMORY;",
    )?;
    let limit = wal_limit(max_bytes);
    conn.pragma_update(None, "journal_size_limit", limit as i64)?;
    let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    conn.pragma_update(
        None,
        "wal_autocheckpoint",
        (limit as i64 / page.max(512)).max(16),
    )?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

/// Brings the schema to [`VERSION`].
pub(crate) fn migrate(conn: &mut Connection) -> Result<()> {
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            known: VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_apply_once_and_refuse_newer() {
        let mut conn = Connection::open_in_memory().unwrap();
        configure(&conn, true, 1 << 20).unwrap();
        migrate(&mut conn).unwrap();
        migrate(&mut conn).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, VERSION);
        conn.pragma_update(None, "user_version", VERSION + 1)
            .unwrap();
        assert!(matches!(
            migrate(&mut conn),
            Err(StoreError::SchemaTooNew { found, known }) if found == VERSION + 1 && known == VERSION
        ));
    }

    #[test]
    fn a_used_blob_cannot_be_deleted() {
        let mut conn = Connection::open_in_memory().unwrap();
        configure(&conn, true, 1 << 20).unwrap();
        migrate(&mut conn).unwrap();
        conn.execute_batch(
            "INSERT INTO blobs (blob, hash, size, complete, charge) VALUES (1, zeroblob(32), 0, 1, 0);
             INSERT INTO packages (pkg, id, manifest, author, created, kind, title, description,
                 tags, total_size, file_count, added_at, accessed)
                 VALUES (1, zeroblob(32), x'', zeroblob(32), 0, 'file', '', '', '', 0, 1, 0, 0);
             INSERT INTO files (pkg, path, blob, executable) VALUES (1, 'a', 1, 0);",
        )
        .unwrap();
        assert!(
            conn.execute("DELETE FROM blobs WHERE blob = 1", [])
                .is_err()
        );
        conn.execute("DELETE FROM packages WHERE pkg = 1", [])
            .unwrap();
        conn.execute("DELETE FROM blobs WHERE blob = 1", [])
            .unwrap();
    }
}
