//! A private BPF file system for tests that pin the data plane.
//!
//! Agents run under `ip netns exec`, which gives them a fresh mount namespace with a
//! new sysfs, so `/sys/fs/bpf` there is never a BPF file system and the agents' default
//! pin directories are unusable (they run unpinned, as before pinning existed). A test
//! that wants pins mounts one of these in its own mount namespace *before* starting the
//! agent: the agent's namespace is a copy and sees the same file system, and the pins
//! outlive the agent process because this mount holds the file system.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

use crate::util::TempDir;

/// A BPF file system mounted on a temporary directory; unmounted (lazily, so a pin a
/// process still holds goes when it does) and removed on drop.
#[derive(Debug)]
pub struct BpfFs {
    mount: PathBuf,
    mounted: bool,
    // Dropped after the unmount.
    dir: TempDir,
}

impl BpfFs {
    /// Mounts a fresh BPF file system.
    pub fn mount() -> Result<Self> {
        let dir = TempDir::new("bpffs")?;
        let mount = dir.path().join("fs");
        std::fs::create_dir(&mount).with_context(|| format!("creating {}", mount.display()))?;
        let target = c_path(&mount)?;
        let fstype = CString::new("bpf").context("literal")?;
        // SAFETY: valid NUL-terminated strings; no mount data.
        let rc = unsafe {
            libc::mount(
                fstype.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            bail!("mount -t bpf on {} failed: {e}", mount.display());
        }
        Ok(Self {
            mount,
            mounted: true,
            dir,
        })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// Every path under the mount point (pins and directories), sorted.
    pub fn entries(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    let p = e.path();
                    out.push(p.clone());
                    if p.is_dir() {
                        walk(&p, out);
                    }
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.mount, &mut out);
        out.sort();
        out
    }
}

fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .with_context(|| format!("{} contains NUL", path.display()))
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        let Ok(target) = c_path(&self.mount) else {
            return;
        };
        // SAFETY: valid NUL-terminated path.
        let rc = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        if rc != 0 {
            eprintln!(
                "testbed: unmounting {}: {}",
                self.mount.display(),
                std::io::Error::last_os_error()
            );
            // Keep the directory: removing files under a live mount would remove pins.
            self.dir.keep();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Privileged: the mount is a BPF file system and goes on drop.
    #[test]
    fn mounts_and_unmounts() {
        let fs = BpfFs::mount().unwrap();
        let path = fs.path().to_path_buf();
        let c = c_path(&path).unwrap();
        // SAFETY: all-zero statfs is valid; valid path.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut st) }, 0);
        assert_eq!(st.f_type as i64, 0xcafe_4a11);
        std::fs::create_dir(path.join("d")).unwrap();
        // The kernel may preload iterators (maps.debug, progs.debug) into a new mount.
        assert!(fs.entries().contains(&path.join("d")), "{:?}", fs.entries());
        drop(fs);
        assert!(!path.exists());
    }
}
