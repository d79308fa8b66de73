//! Start-up checks that claim nothing.
//!
//! Everything the agent can find wrong with its settings and its machine is found here,
//! before it opens the control socket, locks the state directory, creates a key or
//! touches an interface: an agent that cannot run says why and leaves nothing behind,
//! and no warning about a later step comes before the real error.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::os::{
    caps::{self, CAP_NET_ADMIN},
    dataplane,
};
use crate::shell::api;
use crate::{config::Settings, identity::Identity};

/// Runs every check; the first failure is the error.
pub fn check(settings: &Settings) -> anyhow::Result<()> {
    for iface in settings.interfaces.iter().chain(&settings.discover) {
        dataplane::ifindex(iface)?;
    }
    check_dir_path("state directory", &settings.state_dir)?;
    Identity::check(&settings.state_dir)?;
    api::check_socket_path(&settings.socket)?;
    if let Some(name) = &settings.tun_name {
        check_tun(name, caps::effective().has(CAP_NET_ADMIN))?;
    }
    Ok(())
}

/// `dir` is a directory, or the nearest existing ancestor is one, so it can be created.
pub fn check_dir_path(what: &str, dir: &Path) -> anyhow::Result<()> {
    let mut probe: PathBuf = dir.to_path_buf();
    loop {
        match std::fs::metadata(&probe) {
            Ok(meta) if meta.is_dir() => return Ok(()),
            Ok(_) if probe == dir => {
                bail!("{what} {} exists and is not a directory", dir.display())
            }
            Ok(_) => bail!(
                "{what} {} cannot be created: {} is not a directory",
                dir.display(),
                probe.display()
            ),
            // Missing, or below a file (ENOTDIR): look further up.
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENOTDIR) => {}
            Err(e) => return Err(e).with_context(|| format!("{what} {}", dir.display())),
        }
        if !probe.pop() || probe.as_os_str().is_empty() {
            // A relative path whose every component is missing: the working directory
            // is its parent, and that exists.
            return Ok(());
        }
    }
}

/// The message for a TUN device the agent may not create.
pub fn tun_capability_error(name: &str) -> String {
    format!(
        "creating the TUN device {name} needs {CAP_NET_ADMIN}, which this process does not \
         have (run as root, grant it with AmbientCapabilities=CAP_NET_ADMIN, or use --no-tun \
         for a pure relay)"
    )
}

/// The message for a `/dev/net/tun` the agent may not open.
pub fn tun_device_error(name: &str) -> String {
    format!(
        "creating the TUN device {name} needs read and write access to {TUN_DEVICE}, which \
         this process does not have (Debian makes it mode 0666; under systemd it needs \
         DeviceAllow={TUN_DEVICE} rw; or use --no-tun for a pure relay)"
    )
}

const TUN_DEVICE: &str = "/dev/net/tun";

fn check_tun(name: &str, net_admin: bool) -> anyhow::Result<()> {
    if !net_admin {
        bail!("{}", tun_capability_error(name));
    }
    if !Path::new(TUN_DEVICE).exists() {
        bail!(
            "creating the TUN device {name} needs {TUN_DEVICE}, which does not exist \
             (load the tun module: modprobe tun; or use --no-tun for a pure relay)"
        );
    }
    let path = std::ffi::CString::new(TUN_DEVICE).expect("no NUL in a constant");
    // SAFETY: a valid NUL-terminated path; faccessat only reads it. AT_EACCESS checks
    // with the effective ids and capabilities, as open(2) will.
    let rc = unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::R_OK | libc::W_OK,
            libc::AT_EACCESS,
        )
    };
    if rc != 0 {
        bail!("{}", tun_device_error(name));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_where_a_directory_belongs_is_named() {
        let dir = std::env::temp_dir().join(format!("myconet-preflight-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, b"").unwrap();
        let err = check_dir_path("state directory", &file)
            .unwrap_err()
            .to_string();
        assert!(err.contains("exists and is not a directory"), "{err}");
        let err = check_dir_path("state directory", &file.join("below"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is not a directory") && err.contains("cannot be created"),
            "{err}"
        );
        check_dir_path("state directory", &dir.join("new/deeper")).unwrap();
        check_dir_path("state directory", &dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tun_without_net_admin_names_the_capability() {
        let err = check_tun("myconet0", false).unwrap_err().to_string();
        assert!(
            err.contains("CAP_NET_ADMIN") && err.contains("--no-tun"),
            "{err}"
        );
    }
}
