//! The node's routing sequence numbers across restarts: a reservation kept in the state
//! directory, so that every run starts above every seqno an earlier run announced.
//!
//! Why: sequence numbers never wrap (see `routing::seqno_newer`), so an archived
//! announcement stays older than the origin's current one for good, and a seqno request
//! raises the origin's seqno by one only. Both need the origin to start each run above
//! what it announced before: otherwise its fresh announcements are unfeasible wherever an
//! older feasibility distance is still held (up to `source_gc_time`), and one-step bumps
//! would take a long time to catch up.
//!
//! How: the file holds a seqno the node has not used yet (decimal text). A run starts at
//! it and, before announcing anything, writes it plus [`BLOCK`] (write to a temporary
//! file, fsync, rename): the block is this run's. When the seqno comes within half a
//! block of the reservation (512 one-step bumps, at least four minutes of back-to-back
//! requests), the next block is written. A crash therefore never lets a later run start
//! below a seqno already announced, and a run costs at most one block of the 2^32 space
//! (four million restarts).
//!
//! The routing core stays free of I/O: the agent reads [`SeqnoStore::first`] when it
//! creates the router and calls [`SeqnoStore::cover`] with the router's seqno after
//! routing work.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use tracing::warn;

/// File name of the reservation inside the state directory.
pub const SEQNO_FILE: &str = "routing-seqno";

/// Sequence numbers reserved per write.
pub const BLOCK: u32 = 1024;

/// The reservation of this node's sequence numbers.
#[derive(Debug)]
pub struct SeqnoStore {
    /// `None`: nothing is persisted (tests, or a state directory that refused writes).
    path: Option<PathBuf>,
    first: u32,
    reserved: u32,
}

impl SeqnoStore {
    /// Reads the reservation in `state_dir` and reserves this run's first block.
    ///
    /// Never fails: a missing file starts at 1; an unreadable or corrupt one, or a
    /// reservation that cannot be written, is logged and the node starts anyway (at the
    /// value read, or 1). The cost of a lost reservation is a delay, not a hole: a
    /// restarted node whose announcements are older than what others hold jumps past
    /// the newest one of its own it hears, or waits for those feasibility distances to
    /// expire (`source_gc_time`, 180 s).
    pub fn open(state_dir: &Path) -> Self {
        let path = state_dir.join(SEQNO_FILE);
        let first = match fs::read_to_string(&path) {
            Ok(text) => match text.trim().parse::<u32>() {
                Ok(v) => v.max(1),
                Err(_) => {
                    warn!(
                        path = %path.display(),
                        "routing seqno reservation is not a number; starting at 1 (announcements may be ignored for up to 180 s)"
                    );
                    1
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 1,
            Err(e) => {
                warn!(
                    path = %path.display(),
                    error = %e,
                    "cannot read the routing seqno reservation; starting at 1"
                );
                1
            }
        };
        let mut store = SeqnoStore {
            path: Some(path),
            first,
            reserved: first,
        };
        store.reserve(first.saturating_add(BLOCK));
        store
    }

    /// A reservation that is not persisted, starting at `first` (tests, simulations).
    pub fn ephemeral(first: u32) -> Self {
        SeqnoStore {
            path: None,
            first,
            reserved: u32::MAX,
        }
    }

    /// The first sequence number of this run.
    pub fn first(&self) -> u32 {
        self.first
    }

    /// The seqno the reservation covers up to (exclusive).
    pub fn reserved(&self) -> u32 {
        self.reserved
    }

    /// Extends the reservation when `current` (the router's own seqno) comes within
    /// half a block of it. Cheap when nothing needs writing; returns whether it wrote.
    pub fn cover(&mut self, current: u32) -> bool {
        if self.path.is_none() || current.saturating_add(BLOCK / 2) < self.reserved {
            return false;
        }
        self.reserve(current.saturating_add(BLOCK))
    }

    fn reserve(&mut self, upto: u32) -> bool {
        let Some(path) = &self.path else {
            return false;
        };
        match write_atomically(path, format!("{upto}\n").as_bytes()) {
            Ok(()) => {
                self.reserved = upto;
                true
            }
            Err(e) => {
                warn!(
                    path = %path.display(),
                    error = %e,
                    "cannot persist the routing seqno reservation: after a crash this node's announcements may be ignored for up to 180 s"
                );
                // Retry at the next bump rather than on every call.
                self.reserved = upto;
                false
            }
        }
    }
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename, so a crash leaves
/// either the old or the new content (also used for the pins).
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("myconet-seqno-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn every_run_starts_above_everything_an_earlier_run_could_announce() {
        let d = tmpdir("runs");
        let mut a = SeqnoStore::open(&d);
        assert_eq!(a.first(), 1);
        assert_eq!(a.reserved(), 1 + BLOCK);
        // Bumps within the first half of the block write nothing.
        assert!(!a.cover(1 + BLOCK / 2 - 1));
        // Closer than half a block: the next block is reserved before it is used.
        assert!(a.cover(1 + BLOCK / 2 + 5));
        let used = 1 + BLOCK / 2 + 5;
        assert_eq!(a.reserved(), used + BLOCK);
        // A crash right now (no clean shutdown): the next run starts above `used`.
        drop(a);
        let b = SeqnoStore::open(&d);
        assert!(b.first() > used, "{} must be above {used}", b.first());
        assert_eq!(b.reserved(), b.first() + BLOCK);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_corrupt_reservation_is_replaced_not_fatal() {
        let d = tmpdir("corrupt");
        fs::write(d.join(SEQNO_FILE), b"not a number").unwrap();
        let s = SeqnoStore::open(&d);
        assert_eq!(s.first(), 1);
        assert_eq!(
            fs::read_to_string(d.join(SEQNO_FILE)).unwrap().trim(),
            (1 + BLOCK).to_string()
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_space_saturates_instead_of_wrapping() {
        let d = tmpdir("top");
        fs::write(d.join(SEQNO_FILE), format!("{}\n", u32::MAX - 10)).unwrap();
        let mut s = SeqnoStore::open(&d);
        assert_eq!(s.first(), u32::MAX - 10);
        assert_eq!(s.reserved(), u32::MAX);
        s.cover(u32::MAX);
        assert_eq!(s.reserved(), u32::MAX);
        fs::remove_dir_all(&d).unwrap();
    }
}
