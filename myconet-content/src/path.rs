//! [`PackagePath`]: the path of a file inside a package, normalised and checked once.
//!
//! A path is relative, `/`-separated UTF-8. It can be joined to any directory on any
//! node without leaving it, so the rules refuse everything that could escape or mean
//! two things: absolute paths, `.` and `..`, empty components, backslashes, NUL and
//! control characters, and names too long for a Linux file system.
//!
//! **Unicode normalisation:** none is applied and none is required. A path is its exact
//! UTF-8 bytes, as Linux file systems treat names: `é` as one code point and as `e` plus
//! a combining accent are two different paths (the importer keeps the names the file
//! system reports). The manifest refuses two paths with equal bytes, so extraction on
//! Linux never collides; a normalising or case-folding file system elsewhere may merge
//! names, which the extractor there must refuse.

use std::{collections::VecDeque, fmt, str::FromStr};

/// Longest path in bytes.
pub const MAX_PATH_BYTES: usize = 1024;
/// Longest component in bytes (Linux's `NAME_MAX`).
pub const MAX_COMPONENT_BYTES: usize = 255;
/// Most components in one path.
pub const MAX_DEPTH: usize = 64;
/// Most symbolic links followed to resolve one (Linux's limit for a path lookup).
pub const MAX_SYMLINK_HOPS: usize = 40;

/// A normalised relative path inside a package.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PackagePath(String);

/// Why a string is not a [`PackagePath`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The empty string.
    #[error("empty path")]
    Empty,
    /// Longer than [`MAX_PATH_BYTES`].
    #[error("path is {0} bytes, at most {MAX_PATH_BYTES} (MAX_PATH_BYTES) allowed")]
    TooLong(usize),
    /// More than [`MAX_DEPTH`] components.
    #[error("path has {0} components, at most {MAX_DEPTH} (MAX_DEPTH) allowed")]
    TooDeep(usize),
    /// Starts with `/`.
    #[error("absolute path (starts with '/'): package paths are relative")]
    Absolute,
    /// An empty component: `//`, or a trailing `/`.
    #[error("empty component at byte {0} ('//' or a trailing '/')")]
    EmptyComponent(usize),
    /// A `.` or `..` component.
    #[error("component {0:?} at byte {1}: '.' and '..' are not allowed")]
    DotComponent(&'static str, usize),
    /// A component longer than [`MAX_COMPONENT_BYTES`].
    #[error(
        "component at byte {at} is {len} bytes, at most {MAX_COMPONENT_BYTES} (MAX_COMPONENT_BYTES) allowed"
    )]
    ComponentTooLong {
        /// Byte offset of the component.
        at: usize,
        /// Its length.
        len: usize,
    },
    /// A backslash (a separator elsewhere, so refused to keep one meaning).
    #[error("backslash at byte {0}: use '/' to separate components")]
    Backslash(usize),
    /// NUL or another control character.
    #[error("control character U+{code:04X} at byte {at}")]
    Control {
        /// The code point.
        code: u32,
        /// Byte offset.
        at: usize,
    },
    /// A chain of symbolic links longer than [`MAX_SYMLINK_HOPS`] (a loop).
    #[error("symbolic link {link}: more than {MAX_SYMLINK_HOPS} links followed (a loop?)")]
    SymlinkLoop {
        /// The link's own path.
        link: String,
    },
    /// A symbolic link whose target leaves the package.
    #[error("symbolic link {link} points to {target:?}, outside the package")]
    SymlinkEscapes {
        /// The link's own path.
        link: String,
        /// Its target as stored in the link.
        target: String,
    },
}

impl PackagePath {
    /// Checks `s` and makes it a path.
    pub fn new(s: impl Into<String>) -> Result<Self, PathError> {
        let s = s.into();
        check(&s)?;
        Ok(Self(s))
    }

    /// The path as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The components, in order.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The directory part (`None` at top level).
    pub fn parent(&self) -> Option<&str> {
        self.0.rsplit_once('/').map(|(d, _)| d)
    }

    /// Every directory that contains this path: `a`, `a/b` for `a/b/c`.
    pub fn ancestors(&self) -> impl Iterator<Item = &str> {
        self.0.match_indices('/').map(|(i, _)| &self.0[..i])
    }

    /// Where a symbolic link at `link` with target `target` leads inside the package, or
    /// [`PathError::SymlinkEscapes`] if it leaves it (absolute targets always do; so
    /// does a target that is the package's root, which is no file). Importers use this
    /// to follow links that stay inside the tree and refuse the others.
    ///
    /// Resolution is the kernel's, not lexical: each component of the target is looked
    /// up in turn, and one that is itself a link is replaced by that link's target
    /// (`read_link` gives the target of a path in the package if it is a symbolic link,
    /// `None` if it is not). Lexically `a/b/l -> s/../../../x` is `x`, but with
    /// `a/b/s -> ../../c` the `..` after `s` climb from `c`, not from `a/b/s`, and the
    /// link leaves the package. `link` is where the importer found the link, walking
    /// real directories. More than [`MAX_SYMLINK_HOPS`] links is
    /// [`PathError::SymlinkLoop`].
    pub fn resolve_symlink(
        link: &PackagePath,
        target: &str,
        mut read_link: impl FnMut(&PackagePath) -> Option<String>,
    ) -> Result<PackagePath, PathError> {
        let escapes = || PathError::SymlinkEscapes {
            link: link.0.clone(),
            target: target.to_owned(),
        };
        if target.starts_with('/') {
            return Err(escapes());
        }
        let mut parts: Vec<String> = link
            .parent()
            .map_or_else(Vec::new, |d| d.split('/').map(str::to_owned).collect());
        let mut pending: VecDeque<String> = target.split('/').map(str::to_owned).collect();
        let mut hops = 0;
        while let Some(c) = pending.pop_front() {
            match c.as_str() {
                "" | "." => {}
                ".." => {
                    parts.pop().ok_or_else(escapes)?;
                }
                _ => {
                    parts.push(c);
                    let here = PackagePath::new(parts.join("/"))?;
                    if let Some(next) = read_link(&here) {
                        hops += 1;
                        if hops > MAX_SYMLINK_HOPS {
                            return Err(PathError::SymlinkLoop {
                                link: link.0.clone(),
                            });
                        }
                        if next.starts_with('/') {
                            return Err(escapes());
                        }
                        // The link's own name goes; its target is read from its
                        // directory.
                        parts.pop();
                        for comp in next.split('/').rev() {
                            pending.push_front(comp.to_owned());
                        }
                    }
                }
            }
        }
        if parts.is_empty() {
            return Err(escapes());
        }
        PackagePath::new(parts.join("/"))
    }
}

fn check(s: &str) -> Result<(), PathError> {
    if s.is_empty() {
        return Err(PathError::Empty);
    }
    if s.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong(s.len()));
    }
    if s.starts_with('/') {
        return Err(PathError::Absolute);
    }
    for (at, c) in s.char_indices() {
        if c == '\\' {
            return Err(PathError::Backslash(at));
        }
        if c.is_control() {
            return Err(PathError::Control { code: c as u32, at });
        }
    }
    let mut at = 0;
    let mut depth = 0;
    for comp in s.split('/') {
        depth += 1;
        match comp {
            "" => return Err(PathError::EmptyComponent(at)),
            "." => return Err(PathError::DotComponent(".", at)),
            ".." => return Err(PathError::DotComponent("..", at)),
            c if c.len() > MAX_COMPONENT_BYTES => {
                return Err(PathError::ComponentTooLong { at, len: c.len() });
            }
            _ => {}
        }
        at += comp.len() + 1;
    }
    if depth > MAX_DEPTH {
        return Err(PathError::TooDeep(depth));
    }
    Ok(())
}

impl FromStr for PackagePath {
    type Err = PathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for PackagePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PackagePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackagePath({:?})", self.0)
    }
}

impl AsRef<str> for PackagePath {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn good_paths() {
        for p in [
            "a",
            "a/b",
            "index.html",
            "dir/sub dir/é.txt",
            "..a/b..",
            ".hidden/x",
        ] {
            assert_eq!(PackagePath::new(p).unwrap().as_str(), p);
        }
        let p = PackagePath::new("a/b/c").unwrap();
        assert_eq!(p.ancestors().collect::<Vec<_>>(), ["a", "a/b"]);
        assert_eq!(p.parent(), Some("a/b"));
        assert_eq!(p.components().count(), 3);
    }

    #[test]
    fn bad_paths_name_what_is_wrong() {
        let cases: &[(&str, PathError)] = &[
            ("", PathError::Empty),
            ("/etc/passwd", PathError::Absolute),
            ("a//b", PathError::EmptyComponent(2)),
            ("a/", PathError::EmptyComponent(2)),
            ("../x", PathError::DotComponent("..", 0)),
            ("a/../../x", PathError::DotComponent("..", 2)),
            ("a/./b", PathError::DotComponent(".", 2)),
            (".", PathError::DotComponent(".", 0)),
            ("a\\b", PathError::Backslash(1)),
            ("a\0b", PathError::Control { code: 0, at: 1 }),
            ("a\nb", PathError::Control { code: 10, at: 1 }),
            ("a\u{85}", PathError::Control { code: 0x85, at: 1 }),
        ];
        for (p, e) in cases {
            assert_eq!(PackagePath::new(*p).unwrap_err(), *e, "{p:?}");
        }
        let long = "x".repeat(256);
        assert_eq!(
            PackagePath::new(format!("a/{long}")).unwrap_err(),
            PathError::ComponentTooLong { at: 2, len: 256 }
        );
        assert_eq!(
            PackagePath::new("a/".repeat(600) + "a").unwrap_err(),
            PathError::TooLong(1201)
        );
        assert_eq!(
            PackagePath::new("a/".repeat(64) + "a").unwrap_err(),
            PathError::TooDeep(65)
        );
        assert!(
            PathError::Absolute.to_string().contains("relative"),
            "errors say what is wrong"
        );
    }

    #[test]
    fn symlinks_inside_resolve_and_outside_are_refused() {
        let link = PackagePath::new("site/img/logo").unwrap();
        let ok = |t: &str| PackagePath::resolve_symlink(&link, t, |_| None).map(|p| p.0);
        assert_eq!(ok("real.png").as_deref(), Ok("site/img/real.png"));
        assert_eq!(ok("../css/./a.css").as_deref(), Ok("site/css/a.css"));
        assert_eq!(ok("../../top").as_deref(), Ok("top"));
        for bad in ["../../../etc/passwd", "/etc/passwd", "../..", "../../.."] {
            assert!(
                matches!(ok(bad), Err(PathError::SymlinkEscapes { .. })),
                "{bad}"
            );
        }
    }

    /// Links met on the way are followed as the kernel would, not skipped lexically: a
    /// `..` after a link climbs from where the link leads.
    #[test]
    fn links_on_the_way_are_followed() {
        let links: std::collections::HashMap<&str, &str> = [
            ("a/b/s", "../../c"), // a directory at the top
            ("a/b/deep", "../../c/d/e"),
            ("loop1", "loop2"),
            ("loop2", "loop1"),
            ("a/up", ".."),
        ]
        .into_iter()
        .collect();
        let read = |p: &PackagePath| links.get(p.as_str()).map(|t| t.to_string());
        let l = PackagePath::new("a/b/l").unwrap();
        let resolve = |t: &str| PackagePath::resolve_symlink(&l, t, read).map(|p| p.0);
        // Lexically "x"; really c/.. is the top and one more .. leaves the package.
        assert!(
            matches!(
                resolve("s/../../../x"),
                Err(PathError::SymlinkEscapes { .. })
            ),
            "{:?}",
            resolve("s/../../../x")
        );
        // Lexically "a/x"; really c/d/e/../.. is c.
        assert_eq!(resolve("deep/../../x").as_deref(), Ok("c/x"));
        assert_eq!(resolve("s/y").as_deref(), Ok("c/y"));
        // A link to a link: a/up leads to the top.
        assert_eq!(resolve("../up/z").as_deref(), Ok("z"));
        assert!(matches!(
            resolve("../up/../z"),
            Err(PathError::SymlinkEscapes { .. })
        ));
        let top = PackagePath::new("start").unwrap();
        assert_eq!(
            PackagePath::resolve_symlink(&top, "loop1", read),
            Err(PathError::SymlinkLoop {
                link: "start".into()
            })
        );
    }

    proptest! {
        #[test]
        fn never_panics_and_accepted_paths_are_clean(s in "\\PC{0,40}|[a./\\\\]{0,12}") {
            if let Ok(p) = PackagePath::new(s.clone()) {
                prop_assert_eq!(p.as_str(), &s[..]);
                prop_assert!(!s.starts_with('/') && !s.ends_with('/') && !s.contains("//"));
                prop_assert!(p.components().all(|c| c != "." && c != ".." && !c.is_empty()));
                prop_assert_eq!(s.parse::<PackagePath>().unwrap(), p);
            }
        }
    }
}
