//! Types shared by the Myconet XDP program and the userspace agent.
//!
//! Everything here is `no_std` so the eBPF object and the agent agree byte for byte
//! on the wire header and on the layout of every BPF map key and value.
#![cfg_attr(not(any(feature = "std", test)), no_std)]
#![deny(missing_docs)]

pub mod addr;
pub mod checksum;
pub mod maps;
pub mod too_big;
pub mod wire;
