//! Builds the XDP program (myconet-ebpf) for bpfel-unknown-none with aya-build and
//! leaves the object in OUT_DIR, from where `dataplane` embeds it in the agent binary.
//! Needs the nightly toolchain with rust-src and bpf-linker: `cargo xtask setup`.
use std::path::Path;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow::anyhow!("agent crate has no parent directory"))?
        .join("myconet-ebpf");
    let root_dir = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", root.display()))?;
    // Rebuild when the shared wire/map definitions change, not only the program.
    println!(
        "cargo:rerun-if-changed={}",
        root.join("../myconet-common/src").display()
    );
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "myconet-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
