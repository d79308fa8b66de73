//! Myconet's content cores, sans-IO: nothing here opens a file, a socket or a clock.
//! The agent's shell drives them with the one contract every Myconet protocol core
//! follows (`handle_*`, `handle_timeout`, `poll_transmit`, `poll_event`, `poll_timeout`).
#![deny(missing_docs)]

pub mod fetch;
pub mod groups;
pub mod hash;
pub mod manifest;
pub mod mri;
pub mod path;
pub mod serve;
pub mod verified;
pub mod wire;

pub use groups::GroupSet;
pub use hash::Hash;
pub use manifest::{Manifest, SignedManifest};
pub use mri::{Mri, PackageId};
pub use path::PackagePath;
