//! `--generate-docs DIR`: the man page and shell completions, generated from the clap
//! definitions so they always match the flags (`cargo xtask package` calls it).

use std::path::Path;

use anyhow::Context;
use clap_complete::Shell;

/// Writes `DIR/man/<bin>.1` and `DIR/completions/` (bash, zsh, fish) for `cmd`.
pub fn write_docs(cmd: clap::Command, dir: &Path) -> anyhow::Result<()> {
    let bin = cmd.get_name().to_string();
    let man = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    clap_mangen::generate_to(cmd.clone(), &man)
        .with_context(|| format!("writing man pages to {}", man.display()))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd.clone(), &bin, &completions)
            .with_context(|| format!("writing {shell} completions to {}", completions.display()))?;
    }
    Ok(())
}
