//! Generated types and tonic stubs for the Myconet control API (`myconet.proto`).
#![allow(missing_docs, clippy::all)]

/// Version 1 of the control API.
pub mod v1 {
    tonic::include_proto!("myconet.v1");

    /// The encoded `FileDescriptorSet` of `myconet.proto`, which the agent's gRPC
    /// server reflection serves so generic tools (grpcurl) can call the API.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("myconet_descriptor");
}

/// The content API (`content.proto`): packages, downloads, the store.
pub mod content {
    /// Version 1 of the content API.
    pub mod v1 {
        tonic::include_proto!("myconet.content.v1");
    }
}
