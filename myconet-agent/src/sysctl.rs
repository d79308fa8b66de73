//! The per-interface IPv6 sysctls the fast path depends on, set on attach and restored
//! on shutdown.
//!
//! `bpf_fib_lookup` refuses to resolve a next hop (BPF_FIB_LKUP_RET_FWD_DISABLED) unless
//! IPv6 forwarding is enabled on the interface. Enabling it makes the kernel ignore
//! router advertisements there when `accept_ra` is 1, so that is raised to 2 to keep
//! SLAAC-configured hosts configured.

use std::{fs, io, path::PathBuf};

use tracing::{info, warn};

/// A sysctl value to put back when the agent stops.
#[derive(Debug)]
pub struct Saved {
    path: PathBuf,
    value: String,
}

fn path(iface: &str, key: &str) -> PathBuf {
    PathBuf::from(format!("/proc/sys/net/ipv6/conf/{iface}/{key}"))
}

fn set(iface: &str, key: &str, want: &str, saved: &mut Vec<Saved>) -> io::Result<()> {
    let p = path(iface, key);
    let old = fs::read_to_string(&p)?.trim().to_string();
    if old != want {
        fs::write(&p, want)?;
        info!(iface, key, from = %old, to = want, "sysctl set");
        saved.push(Saved {
            path: p,
            value: old,
        });
    }
    Ok(())
}

/// Prepares `iface` for in-kernel relaying; returns what to restore.
pub fn prepare(iface: &str) -> io::Result<Vec<Saved>> {
    let mut saved = Vec::new();
    let accept_ra = fs::read_to_string(path(iface, "accept_ra"))?;
    if accept_ra.trim() == "1" {
        set(iface, "accept_ra", "2", &mut saved)?;
    }
    set(iface, "forwarding", "1", &mut saved)?;
    Ok(saved)
}

/// Puts values back, newest first; failures are logged, not fatal.
pub fn restore(saved: Vec<Saved>) {
    for s in saved.into_iter().rev() {
        if let Err(e) = fs::write(&s.path, &s.value) {
            warn!(path = %s.path.display(), error = %e, "could not restore sysctl");
        }
    }
}
