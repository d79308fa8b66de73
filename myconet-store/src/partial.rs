//! [`Partial`]: a partial blob open for writing verified groups and proof pairs, with
//! what is written but not committed, and the coalescing of small writes.

use std::io;

use myconet_content::GroupSet;

use crate::backend::PartialFiles;

/// Contiguous verified data gathered before one `pwrite`: a download unit (64 groups).
const DATA_RUN: usize = 1 << 20;
/// Proof pairs gathered before they are written.
const MAX_PAIRS: usize = 4096;

/// A partial blob open for writing verified groups. Groups are written to the files as
/// they verify (`pending`) and committed to the database in batches (`committed`), two
/// ways: often *unsynced* (no fsync; the groups are also listed in `blobs.unsynced`,
/// and re-verified against the root on open after a crash), and now and then durably
/// (fsync the files, then commit). A killed process loses at most its pending batch;
/// a power loss at most what its unsynced groups lost, found by re-verifying them.
///
/// Data arrives one 16 KiB group and one 64-byte pair at a time; written as such it
/// costs a system call each, so contiguous groups are gathered into runs of up to
/// 1 MiB and pairs into sorted, merged runs, all written before anything is committed
/// ([`Partial::write_buffered`]).
pub(crate) struct Partial<P> {
    /// The blob's row.
    pub(crate) blob: i64,
    /// Its size.
    pub(crate) size: u64,
    pub(crate) files: P,
    /// Groups the database holds as verified (as of the last commit from here).
    pub(crate) committed: GroupSet,
    /// Groups verified since, not committed yet.
    pub(crate) pending: GroupSet,
    pub(crate) pending_bytes: u64,
    /// Bytes committed since the files were last fsynced.
    pub(crate) unsynced_bytes: u64,
    data_at: u64,
    data: Vec<u8>,
    pairs: Vec<(u64, [u8; 64])>,
}

impl<P: PartialFiles> Partial<P> {
    pub(crate) fn new(blob: i64, size: u64, files: P, committed: GroupSet) -> Self {
        Self {
            blob,
            size,
            files,
            committed,
            pending: GroupSet::new(),
            pending_bytes: 0,
            unsynced_bytes: 0,
            data_at: 0,
            data: Vec::new(),
            pairs: Vec::new(),
        }
    }

    /// Takes verified bytes at `offset`: appended to the current run if they continue
    /// it, else the run is written and a new one starts.
    pub(crate) fn put_data(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        if !self.data.is_empty() && offset != self.data_at + self.data.len() as u64 {
            self.write_data()?;
        }
        if self.data.is_empty() {
            self.data_at = offset;
        }
        self.data.extend_from_slice(bytes);
        if self.data.len() >= DATA_RUN {
            self.write_data()?;
        }
        Ok(())
    }

    /// Takes a verified pair at `offset` of the outboard.
    pub(crate) fn put_pair(&mut self, offset: u64, pair: &[u8; 64]) -> io::Result<()> {
        self.pairs.push((offset, *pair));
        if self.pairs.len() >= MAX_PAIRS {
            self.write_pairs()?;
        }
        Ok(())
    }

    /// Records `group` (of `len` bytes) as verified and taken.
    pub(crate) fn add_pending(&mut self, group: u64, len: u64) {
        if !self.pending.contains(group) {
            self.pending.insert(group);
            self.pending_bytes += len;
        }
    }

    /// Whether every one of the blob's `count` groups is committed or pending.
    pub(crate) fn is_whole(&self, count: u64) -> bool {
        self.committed.union(&self.pending).len() == count
    }

    /// Writes every gathered byte and pair to the files (not to the disk).
    pub(crate) fn write_buffered(&mut self) -> io::Result<()> {
        self.write_pairs()?;
        crate::crash_point();
        self.write_data()
    }

    fn write_data(&mut self) -> io::Result<()> {
        if !self.data.is_empty() {
            self.files.write_data(self.data_at, &self.data)?;
            self.data.clear();
        }
        Ok(())
    }

    fn write_pairs(&mut self) -> io::Result<()> {
        if self.pairs.is_empty() {
            return Ok(());
        }
        self.pairs.sort_unstable_by_key(|&(o, _)| o);
        self.pairs.dedup_by_key(|&mut (o, _)| o);
        let mut run: Vec<u8> = Vec::new();
        let mut run_at = 0;
        for &(offset, pair) in &self.pairs {
            if !run.is_empty() && offset != run_at + run.len() as u64 {
                self.files.write_outboard(run_at, &run)?;
                run.clear();
            }
            if run.is_empty() {
                run_at = offset;
            }
            run.extend_from_slice(&pair);
        }
        self.files.write_outboard(run_at, &run)?;
        self.pairs.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every write.
    #[derive(Default)]
    struct Log {
        data: Vec<(u64, usize)>,
        outboard: Vec<(u64, usize)>,
    }

    impl PartialFiles for Log {
        fn write_data(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
            self.data.push((offset, bytes.len()));
            Ok(())
        }
        fn write_outboard(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
            self.outboard.push((offset, bytes.len()));
            Ok(())
        }
        fn sync(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn contiguous_groups_and_adjacent_pairs_are_written_together() {
        let mut p = Partial::new(1, 1 << 30, Log::default(), GroupSet::new());
        let g = [7u8; 16384];
        for i in 0..70u64 {
            p.put_data(i * 16384, &g).unwrap();
        }
        // 64 groups make a run; a gap starts another.
        p.put_data(100 * 16384, &g).unwrap();
        for o in [3u64, 1, 2, 9, 3] {
            p.put_pair(o * 64, &[1; 64]).unwrap();
        }
        p.write_buffered().unwrap();
        assert_eq!(
            p.files.data,
            vec![(0, 1 << 20), (64 * 16384, 6 * 16384), (100 * 16384, 16384)]
        );
        assert_eq!(p.files.outboard, vec![(64, 3 * 64), (9 * 64, 64)]);
        p.write_buffered().unwrap();
        assert_eq!(p.files.data.len(), 3, "nothing left to write");
    }
}
