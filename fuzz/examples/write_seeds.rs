//! Writes every target's seeds (`myconet_fuzz::seeds`) to `fuzz/corpus/<target>/`,
//! replacing the files of the same name. Run after a format change:
//! `cargo run -p myconet-fuzz --example write_seeds`.

use std::path::Path;

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, name, bytes) in myconet_fuzz::seeds::all() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
    }
    println!("seeds written under {}", root.display());
    Ok(())
}
