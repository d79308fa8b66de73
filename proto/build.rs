//! Generates the tonic client and server from myconet.proto with a vendored protoc,
//! so a fresh machine needs no system protobuf compiler.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=myconet.proto");
    println!("cargo:rerun-if-changed=content.proto");
    // The encoded descriptors, for the agent's gRPC server reflection.
    let descriptors =
        std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("myconet_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(descriptors)
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_protos(&["myconet.proto", "content.proto"], &["."])?;
    Ok(())
}
