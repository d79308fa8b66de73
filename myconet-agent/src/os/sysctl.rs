//! The per-interface IPv6 sysctls the fast path depends on, set on attach and restored
//! on shutdown — even after a crash.
//!
//! `bpf_fib_lookup` refuses to resolve a next hop (BPF_FIB_LKUP_RET_FWD_DISABLED) unless
//! IPv6 forwarding is enabled on the interface. Enabling it makes the kernel ignore
//! router advertisements there when `accept_ra` is 1, so that is raised to 2 to keep
//! SLAAC-configured hosts configured.
//!
//! Original values are written to a journal in the state directory *before* anything is
//! changed. A clean shutdown restores them and removes the journal; an agent that finds
//! a journal at start-up (its predecessor was killed) restores those values first, so a
//! crash never turns the agent's setting into the "original" one. An agent that adopts
//! its predecessor's pinned data plane (see `crate::os::bpf_pins`) takes the journal over
//! instead: the pinned program keeps relaying only while forwarding stays on, and the
//! values it restores at its own clean shutdown are still the true originals. A hitless
//! exit leaves both the values and the journal for the next agent.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use tracing::{info, warn};

/// File name of the journal inside the state directory.
pub const JOURNAL_FILE: &str = "sysctl-restore";

/// One sysctl value to put back.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Saved {
    path: PathBuf,
    value: String,
}

/// The sysctls this agent changed, with their original values, mirrored on disk.
#[derive(Debug, Default)]
pub struct Journal {
    file: Option<PathBuf>,
    saved: Vec<Saved>,
}

fn sysctl_path(iface: &str, key: &str) -> PathBuf {
    PathBuf::from(format!("/proc/sys/net/ipv6/conf/{iface}/{key}"))
}

impl Journal {
    /// Opens the journal in `state_dir`. What a previous agent that did not shut down
    /// cleanly left changed is restored first, unless `take_over` (this agent adopts
    /// its predecessor's pinned data plane, which needs the values as they are): then
    /// the entries become this journal's, to be restored at its clean shutdown.
    pub fn open(state_dir: &Path, take_over: bool) -> io::Result<Self> {
        let file = state_dir.join(JOURNAL_FILE);
        match fs::read_to_string(&file) {
            Ok(text) => {
                let leftover = Self {
                    file: Some(file.clone()),
                    saved: parse(&text),
                };
                if take_over {
                    info!(
                        entries = leftover.saved.len(),
                        "keeping the sysctls of the agent whose pinned data plane this one adopts"
                    );
                    return Ok(leftover);
                }
                warn!(
                    entries = leftover.saved.len(),
                    "restoring sysctls left changed by an agent that did not shut down cleanly"
                );
                leftover.restore();
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(Self {
            file: Some(file),
            saved: Vec::new(),
        })
    }

    /// Forgets the changes without restoring them and leaves the journal on disk, for a
    /// hitless exit: the next agent on this state directory takes it over.
    pub fn keep_for_successor(&mut self) {
        self.saved.clear();
        self.file = None;
    }

    /// Prepares `iface` for in-kernel relaying.
    pub fn prepare(&mut self, iface: &str) -> io::Result<()> {
        let accept_ra = fs::read_to_string(sysctl_path(iface, "accept_ra"))?;
        if accept_ra.trim() == "1" {
            self.set(iface, "accept_ra", "2")?;
        }
        self.set(iface, "forwarding", "1")
    }

    fn set(&mut self, iface: &str, key: &str, want: &str) -> io::Result<()> {
        let path = sysctl_path(iface, key);
        let old = fs::read_to_string(&path)?.trim().to_string();
        if old == want {
            return Ok(());
        }
        if !self.saved.iter().any(|s| s.path == path) {
            self.saved.push(Saved {
                path: path.clone(),
                value: old.clone(),
            });
            self.persist()?;
        }
        fs::write(&path, want)?;
        info!(iface, key, from = %old, to = want, "sysctl set");
        Ok(())
    }

    fn persist(&self) -> io::Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let text: String = self
            .saved
            .iter()
            .map(|s| format!("{}\t{}\n", s.path.display(), s.value))
            .collect();
        let tmp = file.with_extension("tmp");
        fs::write(&tmp, text)?;
        fs::rename(&tmp, file)
    }

    /// Puts every value back, newest first, and removes the journal; failures are
    /// logged, not fatal (an interface may be gone by now).
    pub fn restore(&self) {
        for s in self.saved.iter().rev() {
            if let Err(e) = fs::write(&s.path, &s.value) {
                warn!(path = %s.path.display(), error = %e, "could not restore sysctl");
            }
        }
        if let Some(file) = &self.file
            && let Err(e) = fs::remove_file(file)
            && e.kind() != io::ErrorKind::NotFound
        {
            warn!(file = %file.display(), error = %e, "could not remove the sysctl journal");
        }
    }

    /// Restores and forgets; idempotent.
    pub fn restore_and_clear(&mut self) {
        self.restore();
        self.saved.clear();
    }
}

/// Parses journal lines `path<TAB>value`, keeping only paths under
/// /proc/sys/net/ipv6/conf so a tampered journal cannot make the agent write elsewhere.
fn parse(text: &str) -> Vec<Saved> {
    text.lines()
        .filter_map(|line| {
            let (path, value) = line.split_once('\t')?;
            let path = PathBuf::from(path);
            let safe = path.starts_with("/proc/sys/net/ipv6/conf/")
                && !path
                    .components()
                    .any(|c| c == std::path::Component::ParentDir)
                && value.chars().all(|c| c.is_ascii_digit() || c == '-');
            safe.then(|| Saved {
                path,
                value: value.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_is_restored_or_taken_over() {
        let dir = std::env::temp_dir().join(format!("myconet-sysctl-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        // A value only this test reads back: the journal is validated to point under
        // /proc/sys/net/ipv6/conf, so taking it over must keep it without writing it.
        let text = "/proc/sys/net/ipv6/conf/myc-nonexistent/forwarding\t0\n";
        fs::write(dir.join(JOURNAL_FILE), text).unwrap();
        let mut taken = Journal::open(&dir, true).unwrap();
        assert_eq!(taken.saved.len(), 1);
        assert!(
            dir.join(JOURNAL_FILE).exists(),
            "a taken-over journal stays"
        );
        taken.keep_for_successor();
        taken.restore_and_clear();
        assert!(dir.join(JOURNAL_FILE).exists(), "left for the next agent");
        let fresh = Journal::open(&dir, false).unwrap();
        assert!(fresh.saved.is_empty());
        assert!(!dir.join(JOURNAL_FILE).exists(), "restored and removed");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn journal_lines_are_validated() {
        let text = "/proc/sys/net/ipv6/conf/eth0/forwarding\t0\n\
                    /etc/passwd\t0\n\
                    /proc/sys/net/ipv6/conf/../../kernel/x\t1\n\
                    /proc/sys/net/ipv6/conf/eth0/accept_ra\t1; rm\n\
                    garbage\n";
        let saved = parse(text);
        assert_eq!(
            saved,
            vec![Saved {
                path: PathBuf::from("/proc/sys/net/ipv6/conf/eth0/forwarding"),
                value: "0".into()
            }]
        );
    }
}
