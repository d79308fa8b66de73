//! The Myconet content store: manifests, metadata, pins and reference counts in SQLite;
//! blob data as files named by hash, each with its verified-streaming outboard.
#![deny(missing_docs)]

pub use myconet_content::Hash;
