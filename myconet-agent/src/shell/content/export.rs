//! Writing a complete package's files out of the store into a directory (`get -o`,
//! `Export`). Blocking.
//!
//! Never overwrites: every file is created with `create_new` (which also refuses to
//! follow a link planted at its name, and keeps two paths that a case-folding file
//! system would merge from replacing each other), and a directory on the way must be a
//! real directory, not a link. Files get mode 0644, or 0755 when executable.

use std::{
    fs::{DirBuilder, File, OpenOptions, Permissions},
    io,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
};

use myconet_store::{Completeness, PackageId, Store};

use super::error::{ContentError, Result};

/// What an export wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exported {
    /// Files written.
    pub files: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// Writes every file of package `id` (complete here) under `dir`.
pub fn export(store: &dyn Store, id: &PackageId, dir: &Path) -> Result<Exported> {
    if !dir.is_absolute() {
        return Err(ContentError::Invalid(format!(
            "{}: the agent writes on its own host and needs an absolute directory",
            dir.display()
        )));
    }
    let info = store
        .package(id)?
        .ok_or_else(|| ContentError::NotFound(format!("package {id} is not in the store")))?;
    if let Completeness::Partial { verified_bytes } = info.completeness {
        return Err(ContentError::Precondition(format!(
            "package {id} is not complete here ({verified_bytes} of {} bytes verified); \
             fetch it first",
            info.total_size
        )));
    }
    ensure_dir(dir)?;
    let mut done = Exported { files: 0, bytes: 0 };
    for f in store.files(id)? {
        let target = dir.join(f.path.as_str());
        let mut at = dir.to_path_buf();
        let comps: Vec<&str> = f.path.components().collect();
        for c in &comps[..comps.len().saturating_sub(1)] {
            at.push(c);
            ensure_dir(&at)?;
        }
        let (_, reader) = store.open_file(id, &f.path)?;
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => ContentError::Exists(format!(
                    "{} exists; an export never overwrites (choose an empty directory)",
                    target.display()
                )),
                _ => io_error(&target, e),
            })?;
        let n = reader.copy_to(&mut out).map_err(|e| io_error(&target, e))?;
        set_mode(&out, f.executable).map_err(|e| io_error(&target, e))?;
        done.files += 1;
        done.bytes += n;
    }
    Ok(done)
}

fn set_mode(f: &File, executable: bool) -> io::Result<()> {
    f.set_permissions(Permissions::from_mode(if executable {
        0o755
    } else {
        0o644
    }))
}

/// Makes `dir` if missing; an existing one must be a real directory.
fn ensure_dir(dir: &Path) -> Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(m) if m.file_type().is_symlink() => Err(ContentError::Exists(format!(
            "{} is a symbolic link; an export does not follow links",
            dir.display()
        ))),
        Ok(_) => Err(ContentError::Exists(format!(
            "{} exists and is not a directory",
            dir.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            match DirBuilder::new().mode(0o755).create(dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // The parent is missing too (only above the export's root).
                    let parent: PathBuf = dir.parent().map(Path::to_path_buf).unwrap_or_default();
                    ensure_dir(&parent)?;
                    DirBuilder::new()
                        .mode(0o755)
                        .create(dir)
                        .map_err(|e| io_error(dir, e))
                }
                Err(e) => Err(io_error(dir, e)),
            }
        }
        Err(e) => Err(io_error(dir, e)),
    }
}

fn io_error(p: &Path, e: io::Error) -> ContentError {
    ContentError::Internal(format!("{}: {e}", p.display()))
}
