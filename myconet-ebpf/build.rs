//! Rebuild the eBPF object when bpf-linker changes, as the aya template does, and tell
//! bpf-linker (which generates the BPF code) what the relay path relies on:
//! - `allows-misaligned-mem-access`: packet fields sit at odd offsets (the IPv6 header
//!   starts at byte 14); without it LLVM splits every word access into single bytes.
//!   The verifier accepts misaligned packet and map-value access on hosts with
//!   efficient unaligned access (x86-64, arm64), which is where Myconet relays run.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
    println!("cargo:rustc-link-arg=--cpu-features=+allows-misaligned-mem-access");
}
