//! The store, reached from async code on blocking threads: every [`Store`] method does
//! disk I/O (and SQLite commits with fsyncs), which must never stall the runtime's two
//! worker threads that also carry the overlay.

use std::{
    collections::HashSet,
    path::Path,
    sync::{Arc, Mutex},
};

use myconet_store::{DiskStore, PackageId, Store, StoreConfig};
use tracing::{info, warn};

use super::error::{ContentError, Result};

/// Packages in use outside the store (downloads in progress): never evicted.
pub type InUse = Arc<Mutex<HashSet<PackageId>>>;

/// A shared handle on the store.
#[derive(Clone)]
pub struct StoreAccess {
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for StoreAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreAccess")
    }
}

impl StoreAccess {
    /// Opens (creating) the on-disk store in `dir` with quota `max_bytes`; packages in
    /// `in_use` are protected from eviction. Blocking: call it from a blocking thread.
    pub fn open_disk(dir: &Path, max_bytes: u64, in_use: InUse) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| {
            ContentError::Internal(format!(
                "creating the store directory {}: {e}",
                dir.display()
            ))
        })?;
        let protect: myconet_store::Protect = Arc::new(move |id: &PackageId| {
            in_use
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(id)
        });
        let store = DiskStore::open(
            dir,
            StoreConfig {
                max_bytes,
                protect: Some(protect),
            },
        )?;
        let report = store.open_report();
        if report.unclean {
            warn!(
                staging_deleted = report.staging_files_deleted,
                orphans_deleted = report.orphan_files_deleted,
                damaged = report.blobs_damaged,
                unsynced_checked = report.unsynced_groups_checked,
                unsynced_lost = report.unsynced_groups_lost,
                "content store was not closed cleanly; reconciled"
            );
        }
        info!(dir = %dir.display(), max_bytes, "content store open");
        Ok(Self::new(Arc::new(store)))
    }

    /// Wraps any store (tests use `MemStore`).
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// The store, for code already on a blocking thread.
    pub fn blocking(&self) -> &dyn Store {
        &*self.store
    }

    /// Runs `f` with the store on a blocking thread.
    pub async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&*store))
            .await
            .map_err(|e| ContentError::Internal(format!("store task failed: {e}")))?
    }
}
