//! `cargo xtask package`: the Debian package from release binaries (see
//! `myconet_testbed::package` for what goes in; the test suite builds the same package
//! from its debug binaries).

use std::path::{Path, PathBuf};

use anyhow::Result;
use myconet_testbed::package::{self, PackageInputs};

use crate::{cmd, setup};

/// Builds the binaries (release unless `debug`) and the `.deb`, into `out` or
/// `target/debian/`.
pub fn run(root: &Path, debug: bool, out: Option<PathBuf>) -> Result<()> {
    setup::run()?;
    let mut build = cmd::cargo(root);
    build.args(["build", "--bins"]);
    if !debug {
        build.arg("--release");
    }
    cmd::run(&mut build)?;
    let target = cmd::target_dir(root)?;
    let bin_dir = target.join(if debug { "debug" } else { "release" });
    let out_dir = out.unwrap_or_else(|| target.join("debian"));
    let version = package::workspace_version(root)?;
    let deb = package::build(&PackageInputs {
        workspace: root,
        bin_dir: &bin_dir,
        version: &version,
        out_dir: &out_dir,
        quick: false,
    })?;
    println!("{}", deb.display());
    Ok(())
}
