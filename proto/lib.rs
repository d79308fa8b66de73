//! Generated types and tonic stubs for the Myconet control API (`myconet.proto`).
#![allow(missing_docs, clippy::all)]

/// Version 1 of the control API.
pub mod v1 {
    tonic::include_proto!("myconet.v1");
}

/// The content API (`content.proto`): packages, downloads, the store.
pub mod content {
    /// Version 1 of the content API.
    pub mod v1 {
        tonic::include_proto!("myconet.content.v1");
    }
}
