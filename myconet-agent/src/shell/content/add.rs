//! Adding a package: walking the paths a user names (directories, symbolic links), or
//! taking files streamed by a client, staging each file into the store, and building
//! and signing the manifest with the node's key. Blocking: runs on a blocking thread.
//!
//! Path rules (docs/content.md, "Adding"): one directory alone becomes the package's
//! root; otherwise every path enters under its own name. Inside a tree, a symbolic link
//! to a regular file in the package becomes that file's data under the link's name (one
//! blob, stored once); a link that leaves the tree, dangles, loops or names a directory
//! is refused, as are special files (FIFOs, sockets, devices) and names that are not
//! UTF-8.

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use myconet_content::{
    PackagePath, SignedManifest,
    manifest::{AuthorKey, FileEntry, Kind, MAX_FILES, Manifest, Metadata},
};
use myconet_store::{Hold, PackageInfo, Staged, Store, StoreError};
use ring::signature::Ed25519KeyPair;

use super::error::{ContentError, Result};

/// One file to add: where it goes in the package and where its bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// Its path in the package.
    pub path: PackagePath,
    /// Where to read it.
    pub source: PathBuf,
    /// Whether it is executable.
    pub executable: bool,
}

/// The user's metadata, as given (checked when the manifest is built).
#[derive(Debug, Clone, Default)]
pub struct MetadataInput {
    /// Title.
    pub title: String,
    /// Description.
    pub description: String,
    /// Tags.
    pub tags: Vec<String>,
    /// BCP 47 language tag.
    pub language: String,
    /// SPDX licence expression.
    pub licence: String,
    /// Kind name (`""`: other).
    pub kind: String,
    /// Free key/values.
    pub extra: BTreeMap<String, String>,
}

impl MetadataInput {
    /// The manifest's metadata, or why not.
    pub fn to_metadata(&self) -> Result<Metadata> {
        let kind = if self.kind.is_empty() {
            Kind::Other
        } else {
            self.kind.parse::<Kind>().map_err(ContentError::invalid)?
        };
        Ok(Metadata {
            title: self.title.clone(),
            description: self.description.clone(),
            tags: self.tags.clone(),
            language: self.language.clone(),
            licence: self.licence.clone(),
            kind,
            extra: self.extra.clone(),
        })
    }
}

/// The files of the package the paths make (see the module docs for the rules).
pub fn collect(paths: &[PathBuf]) -> Result<Vec<SourceFile>> {
    if paths.is_empty() {
        return Err(ContentError::Invalid("no paths to add".into()));
    }
    for p in paths {
        if !p.is_absolute() {
            return Err(ContentError::Invalid(format!(
                "{}: the agent reads paths on its own host and needs them absolute",
                p.display()
            )));
        }
    }
    let mut out = Vec::new();
    if let [only] = paths
        && std::fs::metadata(only).is_ok_and(|m| m.is_dir())
    {
        let tree = Tree::Dir(only.clone());
        walk(&tree, only, None, &mut out)?;
        return finish(out);
    }
    let mut roots = BTreeMap::new();
    for p in paths {
        let name = p
            .file_name()
            .ok_or_else(|| ContentError::Invalid(format!("{}: no file name", p.display())))?;
        let name = name.to_str().ok_or_else(|| not_utf8(p))?.to_owned();
        if roots.insert(name.clone(), p.clone()).is_some() {
            return Err(ContentError::Invalid(format!(
                "two paths enter the package as {name:?}"
            )));
        }
    }
    let tree = Tree::Roots(roots.clone());
    for (name, p) in &roots {
        // A path the user named is followed even if it is a link: they chose it.
        let meta = std::fs::metadata(p).map_err(|e| io_invalid(p, e))?;
        let pp = package_path(name)?;
        if meta.is_dir() {
            walk(&tree, p, Some(&pp), &mut out)?;
        } else if meta.is_file() {
            out.push(SourceFile {
                path: pp,
                source: p.clone(),
                executable: meta.permissions().mode() & 0o111 != 0,
            });
        } else {
            return Err(not_regular(p));
        }
        check_count(out.len())?;
    }
    finish(out)
}

fn finish(out: Vec<SourceFile>) -> Result<Vec<SourceFile>> {
    if out.is_empty() {
        return Err(ContentError::Invalid(
            "nothing to add: the paths hold no files".into(),
        ));
    }
    Ok(out)
}

/// Where package paths live on disk: under one directory, or under named roots.
enum Tree {
    Dir(PathBuf),
    Roots(BTreeMap<String, PathBuf>),
}

impl Tree {
    fn real(&self, p: &PackagePath) -> Option<PathBuf> {
        match self {
            Tree::Dir(d) => Some(d.join(p.as_str())),
            Tree::Roots(roots) => {
                let mut parts = p.as_str().splitn(2, '/');
                let root = roots.get(parts.next()?)?;
                Some(match parts.next() {
                    Some(rest) => root.join(rest),
                    None => root.clone(),
                })
            }
        }
    }
}

fn walk(
    tree: &Tree,
    dir: &Path,
    prefix: Option<&PackagePath>,
    out: &mut Vec<SourceFile>,
) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| io_invalid(dir, e))?
        .collect::<std::io::Result<_>>()
        .map_err(|e| io_invalid(dir, e))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let real = entry.path();
        let name = entry.file_name();
        let name = name.to_str().ok_or_else(|| not_utf8(&real))?;
        let pp = match prefix {
            Some(p) => package_path(&format!("{p}/{name}"))?,
            None => package_path(name)?,
        };
        let ft = entry.file_type().map_err(|e| io_invalid(&real, e))?;
        if ft.is_dir() {
            walk(tree, &real, Some(&pp), out)?;
        } else if ft.is_file() {
            let meta = entry.metadata().map_err(|e| io_invalid(&real, e))?;
            out.push(SourceFile {
                path: pp,
                source: real,
                executable: meta.permissions().mode() & 0o111 != 0,
            });
        } else if ft.is_symlink() {
            out.push(resolve_link(tree, &pp, &real)?);
        } else {
            return Err(not_regular(&real));
        }
        check_count(out.len())?;
    }
    Ok(())
}

/// A link inside the tree: the regular file it names in the package, under its name.
fn resolve_link(tree: &Tree, link: &PackagePath, real: &Path) -> Result<SourceFile> {
    let target = std::fs::read_link(real).map_err(|e| io_invalid(real, e))?;
    let target = target.to_str().ok_or_else(|| not_utf8(real))?;
    let read_link = |p: &PackagePath| -> Option<String> {
        let r = tree.real(p)?;
        let m = std::fs::symlink_metadata(&r).ok()?;
        if m.file_type().is_symlink() {
            std::fs::read_link(&r).ok()?.to_str().map(str::to_owned)
        } else {
            None
        }
    };
    let resolved = PackagePath::resolve_symlink(link, target, read_link)
        .map_err(|e| ContentError::Invalid(format!("{}: {e}", real.display())))?;
    let source = tree.real(&resolved).ok_or_else(|| {
        ContentError::Invalid(format!(
            "{}: the link {link} -> {target} points outside the package",
            real.display()
        ))
    })?;
    let meta = std::fs::symlink_metadata(&source).map_err(|e| {
        ContentError::Invalid(format!(
            "{}: the link {link} -> {target} names nothing ({e})",
            real.display()
        ))
    })?;
    if meta.is_dir() {
        return Err(ContentError::Invalid(format!(
            "{}: the link {link} -> {target} names a directory; packages hold files, so \
             links to directories are not followed",
            real.display()
        )));
    }
    if !meta.is_file() {
        return Err(not_regular(&source));
    }
    Ok(SourceFile {
        path: link.clone(),
        source,
        executable: meta.permissions().mode() & 0o111 != 0,
    })
}

fn check_count(n: usize) -> Result<()> {
    if n > MAX_FILES {
        return Err(ContentError::Invalid(format!(
            "more than {MAX_FILES} files (MAX_FILES): too many for one package"
        )));
    }
    Ok(())
}

fn package_path(s: &str) -> Result<PackagePath> {
    PackagePath::new(s).map_err(|e| ContentError::Invalid(format!("{s:?}: {e}")))
}

fn not_utf8(p: &Path) -> ContentError {
    ContentError::Invalid(format!(
        "{}: the name is not UTF-8; package paths are UTF-8",
        p.display()
    ))
}

fn not_regular(p: &Path) -> ContentError {
    ContentError::Invalid(format!(
        "{}: not a regular file or directory (FIFOs, sockets and devices cannot be added)",
        p.display()
    ))
}

fn io_invalid(p: &Path, e: std::io::Error) -> ContentError {
    ContentError::Invalid(format!("{}: {e}", p.display()))
}

/// Stages one file; a file that cannot be read is the request's fault, named.
pub fn stage_file(store: &dyn Store, f: &SourceFile) -> Result<Staged> {
    store.stage_file(&f.source).map_err(|e| match e {
        e @ (StoreError::Io { .. } | StoreError::Read(_) | StoreError::DataTooLong { .. }) => {
            ContentError::Invalid(format!("{} ({}): {e}", f.source.display(), f.path))
        }
        e => ContentError::Store(e),
    })
}

/// A staged file with its place in the package.
#[derive(Debug)]
pub struct StagedFile {
    /// Its path in the package.
    pub path: PackagePath,
    /// Whether it is executable.
    pub executable: bool,
    /// Its staged data.
    pub staged: Staged,
}

/// Builds and signs the manifest of `files` and stores the package (pinned unless
/// `no_pin`).
pub fn insert(
    store: &dyn Store,
    key: &Ed25519KeyPair,
    metadata: &MetadataInput,
    files: Vec<StagedFile>,
    no_pin: bool,
) -> Result<(SignedManifest, PackageInfo)> {
    let entries = files
        .iter()
        .map(|f| FileEntry {
            path: f.path.clone(),
            size: f.staged.size(),
            executable: f.executable,
            root: f.staged.hash(),
        })
        .collect();
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let manifest = Manifest::new(
        AuthorKey::of(key),
        created,
        metadata.to_metadata()?,
        entries,
    )
    .map_err(ContentError::invalid)?;
    let signed = manifest.sign(key).map_err(ContentError::invalid)?;
    let holds: &[Hold] = if no_pin { &[] } else { &[Hold::Pin] };
    let staged = files.into_iter().map(|f| f.staged).collect();
    let info = store.insert_package(&signed, staged, holds)?;
    Ok((signed, info))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn dir(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("myconet-add-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
    fn paths(files: &[SourceFile]) -> Vec<&str> {
        files.iter().map(|f| f.path.as_str()).collect()
    }

    #[test]
    fn a_directory_alone_is_the_root_and_links_inside_become_files() {
        let d = dir("root");
        let site = d.0.join("site");
        std::fs::create_dir_all(site.join("css")).unwrap();
        std::fs::write(site.join("index.html"), "hi").unwrap();
        std::fs::write(site.join("css/a.css"), "a").unwrap();
        symlink("css/a.css", site.join("link.css")).unwrap();
        symlink("../index.html", site.join("css/home.html")).unwrap();
        let files = collect(std::slice::from_ref(&site)).unwrap();
        assert_eq!(
            paths(&files),
            ["css/a.css", "css/home.html", "index.html", "link.css"]
        );
        assert_eq!(files[3].source, site.join("css/a.css"));
        assert_eq!(files[1].source, site.join("index.html"));
    }

    #[test]
    fn several_paths_enter_under_their_names() {
        let d = dir("names");
        std::fs::write(d.0.join("a.bin"), "a").unwrap();
        std::fs::create_dir_all(d.0.join("docs/x")).unwrap();
        std::fs::write(d.0.join("docs/x/y.txt"), "y").unwrap();
        let files = collect(&[d.0.join("a.bin"), d.0.join("docs")]).unwrap();
        assert_eq!(paths(&files), ["a.bin", "docs/x/y.txt"]);
        let one = collect(&[d.0.join("a.bin")]).unwrap();
        assert_eq!(paths(&one), ["a.bin"]);
    }

    #[test]
    fn bad_trees_are_refused_with_the_reason() {
        let d = dir("bad");
        let t = d.0.join("t");
        std::fs::create_dir_all(t.join("sub")).unwrap();
        std::fs::write(d.0.join("outside"), "x").unwrap();
        let err = |paths: &[PathBuf]| format!("{}", collect(paths).unwrap_err());
        assert!(err(&[PathBuf::from("rel/path")]).contains("absolute"));
        assert!(err(&[d.0.join("missing")]).contains("No such file"));
        assert!(err(&[]).contains("no paths"));
        symlink("../outside", t.join("escape")).unwrap();
        assert!(
            err(std::slice::from_ref(&t)).contains("outside the package"),
            "{}",
            err(std::slice::from_ref(&t))
        );
        std::fs::remove_file(t.join("escape")).unwrap();
        symlink("/etc/passwd", t.join("abs")).unwrap();
        assert!(err(std::slice::from_ref(&t)).contains("outside the package"));
        std::fs::remove_file(t.join("abs")).unwrap();
        symlink("sub", t.join("dirlink")).unwrap();
        assert!(err(std::slice::from_ref(&t)).contains("names a directory"));
        std::fs::remove_file(t.join("dirlink")).unwrap();
        symlink("nothing", t.join("dangling")).unwrap();
        assert!(err(std::slice::from_ref(&t)).contains("names nothing"));
        std::fs::remove_file(t.join("dangling")).unwrap();
        symlink("loop2", t.join("loop1")).unwrap();
        symlink("loop1", t.join("loop2")).unwrap();
        assert!(
            err(std::slice::from_ref(&t)).contains("loop"),
            "{}",
            err(std::slice::from_ref(&t))
        );
        std::fs::remove_file(t.join("loop1")).unwrap();
        std::fs::remove_file(t.join("loop2")).unwrap();
        let fifo = t.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(err(std::slice::from_ref(&t)).contains("not a regular file"));
        std::fs::remove_file(&fifo).unwrap();
        // An empty tree is nothing to add.
        assert!(err(std::slice::from_ref(&t)).contains("nothing to add"));
        // Two roots with one name.
        std::fs::create_dir_all(d.0.join("b")).unwrap();
        std::fs::write(d.0.join("b/outside"), "x").unwrap();
        assert!(err(&[d.0.join("outside"), d.0.join("b/outside")]).contains("two paths"));
    }
}
