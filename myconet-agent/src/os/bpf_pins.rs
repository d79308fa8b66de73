//! Where the data plane keeps its XDP links and maps pinned in a BPF file system, so
//! they outlive the agent process: a relay keeps forwarding on its last routes while
//! its agent restarts (crash, SIGKILL, upgrade), and the next agent adopts them.
//!
//! Layout of one agent instance's pin directory (derived from its state directory, or
//! configured), so agents on one host never share pins:
//!
//! ```text
//! <pin_dir>/
//!   maps-<version>/ROUTES, PEERS, …   the program's state maps, per program version
//!   link-<mode>-<ifname>               the XDP link on that interface (driver|generic)
//! ```
//!
//! `<version>` is a digest of the embedded XDP object. An agent adopts the maps only
//! of its own version (their layout is the one its program was built for); a link is
//! adopted whatever program it runs, by replacing that program atomically
//! (`BPF_LINK_UPDATE`), so a changed version replaces the old one without detaching.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use crate::os::dataplane::AttachedMode;

/// `BPF_FS_MAGIC` (linux/magic.h): `statfs` of a path on a BPF file system.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Default root under which every agent gets its own pin directory.
pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/myconet";

/// Prefix of a map directory's name; the program version follows.
const MAPS_PREFIX: &str = "maps-";
/// Prefix of a link pin's name; `<mode>-<ifname>` follows.
const LINK_PREFIX: &str = "link-";

/// The default pin directory of the agent whose state directory is `state_dir`: one per
/// instance, so agents in parallel (other namespaces, tests) never collide.
pub fn default_dir(state_dir: &Path) -> PathBuf {
    let absolute = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        absolute.as_os_str().as_encoded_bytes(),
    );
    Path::new(DEFAULT_ROOT).join(hex(&digest.as_ref()[..8]))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The version of an XDP object: the first 8 bytes of its SHA-256, in hex.
pub fn object_version(object: &[u8]) -> String {
    hex(&ring::digest::digest(&ring::digest::SHA256, object).as_ref()[..8])
}

/// Why pins cannot be used at a directory.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// No BPF file system there.
    #[error(
        "{0} is not on a BPF file system (mount one in the host's mount namespace, e.g. \
         `mount -t bpf bpf /sys/fs/bpf`, or set pin_dir to a directory on one)"
    )]
    NotBpffs(PathBuf),
    /// A file-system call failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
}

/// One agent instance's pin directory on a BPF file system.
#[derive(Debug, Clone)]
pub struct PinDir {
    root: PathBuf,
    version: String,
}

/// A pinned XDP link found in the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkPin {
    /// Interface name.
    pub iface: String,
    /// Mode the link was attached in.
    pub mode: AttachedMode,
    /// Where it is pinned.
    pub path: PathBuf,
}

impl PinDir {
    /// Opens (creating it if needed) the pin directory `root` for program `version`;
    /// fails without creating anything unless `root` is, or would be, on a BPF file
    /// system.
    pub fn open(root: &Path, version: &str) -> Result<Self, PinError> {
        let mut existing = root;
        while !existing.exists() {
            existing = existing
                .parent()
                .ok_or_else(|| PinError::NotBpffs(root.to_path_buf()))?;
        }
        if !is_bpffs(existing) {
            return Err(PinError::NotBpffs(root.to_path_buf()));
        }
        let dir = Self {
            root: root.to_path_buf(),
            version: version.to_string(),
        };
        let maps = dir.maps_dir();
        std::fs::create_dir_all(&maps).map_err(|source| PinError::Io { path: maps, source })?;
        Ok(dir)
    }

    /// Whether `root` holds pins an agent left running (at least one link): the next
    /// agent then adopts the data plane instead of starting from scratch.
    pub fn has_links(root: &Path) -> bool {
        is_bpffs(root) && !Self::scan_links(root).is_empty()
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where this version's maps are pinned.
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join(format!("{MAPS_PREFIX}{}", self.version))
    }

    /// Whether this version's maps hold state already (adopted from an earlier agent).
    pub fn has_maps(&self) -> bool {
        std::fs::read_dir(self.maps_dir()).is_ok_and(|mut d| d.next().is_some())
    }

    /// Where the link on `iface` in `mode` is pinned.
    pub fn link_path(&self, iface: &str, mode: AttachedMode) -> PathBuf {
        self.root
            .join(format!("{LINK_PREFIX}{}-{iface}", mode.as_str()))
    }

    /// Every pinned link.
    pub fn links(&self) -> Vec<LinkPin> {
        Self::scan_links(&self.root)
    }

    fn scan_links(root: &Path) -> Vec<LinkPin> {
        let Ok(entries) = std::fs::read_dir(root) else {
            return Vec::new();
        };
        let mut out: Vec<LinkPin> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let (mode, iface) = name.strip_prefix(LINK_PREFIX)?.split_once('-')?;
                let mode = match mode {
                    "driver" => AttachedMode::Driver,
                    "generic" => AttachedMode::Generic,
                    _ => return None,
                };
                Some(LinkPin {
                    iface: iface.to_string(),
                    mode,
                    path: e.path(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }

    /// Map directories of other program versions (stale once the links run this one).
    pub fn other_versions(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let own = self.maps_dir();
        entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p != &own
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(MAPS_PREFIX))
            })
            .collect()
    }

    /// Removes a map directory and its pins; the maps live on while a program uses them.
    pub fn remove_maps(dir: &Path) -> io::Result<()> {
        std::fs::remove_dir_all(dir)
    }

    /// Removes everything: links (which detaches them once no process holds them),
    /// maps, the directory. Entries that are already gone are no error.
    pub fn remove_all(&self) -> io::Result<()> {
        match std::fs::remove_dir_all(&self.root) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Whether `path` is on a BPF file system.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: all-zero is a valid statfs; the call fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a live statfs.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// The interface a pinned XDP link is attached to: `Some(0)` for a link whose interface
/// is gone (defunct), `None` if `path` is not a readable XDP link.
pub fn xdp_link_ifindex(path: &Path) -> Option<u32> {
    xdp_link_info(path).map(|i| i.ifindex)
}

/// What the kernel says about a pinned XDP link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XdpLinkInfo {
    /// The link's id: the same link keeps it when its program is replaced.
    pub id: u32,
    /// The id of the program it runs.
    pub prog_id: u32,
    /// The interface it is attached to (0 once that is gone).
    pub ifindex: u32,
}

/// [`XdpLinkInfo`] of the XDP link pinned at `path`, `None` if there is none.
pub fn xdp_link_info(path: &Path) -> Option<XdpLinkInfo> {
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_TYPE_XDP: u32 = 6;
    let c = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // union bpf_attr for BPF_OBJ_GET: pathname, bpf_fd, file_flags, path_fd.
    let mut get = [0u64; 3];
    get[0] = c.as_ptr() as u64;
    // SAFETY: the attr points at a live NUL-terminated path; the size is the attr's.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            get.as_mut_ptr(),
            std::mem::size_of_val(&get),
        )
    };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: a fresh descriptor the kernel just gave us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // struct bpf_link_info: type, id, prog_id, then an 8-aligned union (xdp.ifindex at
    // offset 16); zero beyond what the kernel fills.
    let mut info = [0u64; 16];
    // union bpf_attr for BPF_OBJ_GET_INFO_BY_FD: bpf_fd, info_len, info.
    let mut attr = [0u64; 2];
    attr[0] = u64::from(fd.as_raw_fd() as u32) | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: the attr points at a live buffer of the length it states.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if rc != 0 || info[0] as u32 != BPF_LINK_TYPE_XDP {
        return None;
    }
    Some(XdpLinkInfo {
        id: (info[0] >> 32) as u32,
        prog_id: info[1] as u32,
        ifindex: info[2] as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_dirs_differ_per_state_dir_and_are_stable() {
        let a = default_dir(Path::new("/var/lib/myconet"));
        assert_eq!(a, default_dir(Path::new("/var/lib/myconet")));
        assert_ne!(a, default_dir(Path::new("/var/lib/myconet2")));
        assert!(a.starts_with(DEFAULT_ROOT));
        assert_eq!(a.file_name().unwrap().len(), 16);
    }

    #[test]
    fn versions_follow_the_object() {
        assert_eq!(object_version(b"x"), object_version(b"x"));
        assert_ne!(object_version(b"x"), object_version(b"y"));
        assert_eq!(object_version(b"x").len(), 16);
    }

    #[test]
    fn only_a_bpffs_is_accepted() {
        let dir = std::env::temp_dir().join(format!("myconet-pins-{}", std::process::id()));
        let err = PinDir::open(&dir.join("a/b"), "v").unwrap_err();
        assert!(matches!(err, PinError::NotBpffs(_)), "{err}");
        assert!(!dir.exists(), "nothing may be created off a bpffs");
        assert!(!PinDir::has_links(&dir));
    }
}
