//! The `storage` and `content` sections of the agent's configuration, their flags and
//! defaults, validated in one place.
//!
//! ```toml
//! [storage]
//! dir = "/var/lib/myconet/store"   # default: <state_dir>/store
//! max_bytes = "10 GiB"             # or a plain number of bytes
//!
//! [content]
//! port = 9651                      # TCP, on the node's overlay address
//! max_concurrent_requests = 8      # per requesting node (/64)
//! upload_rate = "0"                # bytes/s per requesting node, 0: unlimited
//! upload_burst = "4 MiB"
//! max_connections = 256            # in total; 8 per requesting node
//! request_timeout_secs = 10        # a request frame whole (and a new connection's first)
//! idle_timeout_secs = 30           # no request in progress
//! write_timeout_secs = 20          # a write the peer takes nothing of
//! min_send_rate = "4 KiB"          # bytes/s a peer must take while it holds us; 0: none
//! ```

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use serde::Deserialize;

use super::serve::Deadlines;

/// Default quota of the store: `storage.max_bytes`.
pub const DEFAULT_MAX_BYTES: u64 = 10 << 30;
/// Smallest quota accepted: the store's own slack alone is 16 MiB.
pub const MIN_MAX_BYTES: u64 = 32 << 20;
/// The node-to-node content protocol's TCP port on the overlay address. The same number
/// as the underlay's UDP port (`wire::DEFAULT_PORT`): another protocol, another address.
pub const DEFAULT_CONTENT_PORT: u16 = myconet_common::wire::DEFAULT_PORT;
/// Default requests in progress per requesting node.
pub const DEFAULT_MAX_CONCURRENT: usize = 8;
/// Default burst above the upload rate.
pub const DEFAULT_UPLOAD_BURST: u64 = 4 << 20;
/// Default cap on simultaneous content connections (all requesters together).
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Simultaneous content connections one requesting node (/64) may hold.
pub const MAX_CONNECTIONS_PER_PEER: usize = 8;
/// Longest any of the connection deadlines may be set to (an hour).
const MAX_DEADLINE_SECS: u64 = 3600;

/// Command-line flags of the two sections (flattened into the agent's flags).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ContentFlags {
    /// Directory of the content store (default: <state-dir>/store).
    #[arg(long, value_name = "DIR")]
    pub storage_dir: Option<PathBuf>,
    /// Disk the content store may use, in bytes or with a unit ("10 GiB", "500M").
    #[arg(long, value_name = "SIZE", value_parser = parse_size_flag)]
    pub storage_max_bytes: Option<u64>,
    /// TCP port of the node-to-node content protocol on the overlay address.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub content_port: Option<u16>,
    /// Upload limit per requesting node, bytes per second with an optional unit
    /// ("20 MiB"); 0 is unlimited.
    #[arg(long, value_name = "RATE", value_parser = parse_size_flag)]
    pub content_upload_rate: Option<u64>,
    /// Test only: serve data with one byte flipped in every data frame, to prove that
    /// requesters detect and drop a corrupt provider.
    #[arg(long, hide = true)]
    pub content_fault_corrupt: bool,
}

/// `[storage]` in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    dir: Option<PathBuf>,
    max_bytes: Option<toml::Value>,
}

/// `[content]` in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContentSection {
    port: Option<u16>,
    max_concurrent_requests: Option<u64>,
    upload_rate: Option<toml::Value>,
    upload_burst: Option<toml::Value>,
    max_connections: Option<u64>,
    request_timeout_secs: Option<u64>,
    idle_timeout_secs: Option<u64>,
    write_timeout_secs: Option<u64>,
    min_send_rate: Option<toml::Value>,
}

/// Resolved, validated settings of the content service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentSettings {
    /// The store's directory.
    pub store_dir: PathBuf,
    /// The store's quota.
    pub max_bytes: u64,
    /// TCP port on the overlay address.
    pub port: u16,
    /// Requests in progress per requesting node.
    pub max_concurrent: usize,
    /// Upload bytes per second per requesting node (0: unlimited).
    pub upload_rate: u64,
    /// Bytes a requesting node may receive at once above the rate.
    pub upload_burst: u64,
    /// Simultaneous connections, all requesters together.
    pub max_connections: usize,
    /// What a slow or stalled requester can hold a connection for.
    pub deadlines: Deadlines,
    /// Test only: corrupt what is served (see [`ContentFlags::content_fault_corrupt`]).
    pub fault_corrupt: bool,
}

impl ContentSettings {
    /// The defaults for a state directory.
    pub fn defaults(state_dir: &Path) -> Self {
        Self {
            store_dir: state_dir.join("store"),
            max_bytes: DEFAULT_MAX_BYTES,
            port: DEFAULT_CONTENT_PORT,
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            upload_rate: 0,
            upload_burst: DEFAULT_UPLOAD_BURST,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            deadlines: Deadlines::default(),
            fault_corrupt: false,
        }
    }

    /// Flags over the file's sections over the defaults, validated.
    pub fn resolve(
        flags: &ContentFlags,
        storage: Option<StorageSection>,
        content: Option<ContentSection>,
        state_dir: &Path,
    ) -> anyhow::Result<Self> {
        let mut s = Self::defaults(state_dir);
        let storage = storage.unwrap_or_default();
        let content = content.unwrap_or_default();
        if let Some(dir) = flags.storage_dir.clone().or(storage.dir) {
            s.store_dir = dir;
        }
        if s.store_dir.as_os_str().is_empty() {
            bail!("storage.dir must not be empty");
        }
        if let Some(v) = &storage.max_bytes {
            s.max_bytes = size_value(v).context("storage.max_bytes")?;
        }
        if let Some(v) = flags.storage_max_bytes {
            s.max_bytes = v;
        }
        if s.max_bytes < MIN_MAX_BYTES {
            bail!(
                "storage.max_bytes is {} bytes; at least {MIN_MAX_BYTES} (32 MiB) are needed",
                s.max_bytes
            );
        }
        if let Some(p) = flags.content_port.or(content.port) {
            if p == 0 {
                bail!("content.port must not be 0");
            }
            s.port = p;
        }
        if let Some(n) = content.max_concurrent_requests {
            s.max_concurrent = bounded(n, 1..=1024, "content.max_concurrent_requests")?;
        }
        if let Some(v) = &content.upload_rate {
            s.upload_rate = size_value(v).context("content.upload_rate")?;
        }
        if let Some(v) = flags.content_upload_rate {
            s.upload_rate = v;
        }
        if let Some(v) = &content.upload_burst {
            s.upload_burst = size_value(v).context("content.upload_burst")?;
        }
        // A burst smaller than one data frame would split every frame into slivers.
        if s.upload_burst < 64 << 10 {
            bail!(
                "content.upload_burst is {} bytes; at least 65536 (one data frame)",
                s.upload_burst
            );
        }
        if let Some(n) = content.max_connections {
            s.max_connections = bounded(n, 1..=65_536, "content.max_connections")?;
        }
        let secs = |v: Option<u64>, what: &str, default: Duration| -> anyhow::Result<Duration> {
            match v {
                None => Ok(default),
                Some(n) => Ok(Duration::from_secs(
                    bounded(n, 1..=MAX_DEADLINE_SECS, what)? as u64,
                )),
            }
        };
        let d = &mut s.deadlines;
        d.request = secs(
            content.request_timeout_secs,
            "content.request_timeout_secs",
            d.request,
        )?;
        d.idle = secs(
            content.idle_timeout_secs,
            "content.idle_timeout_secs",
            d.idle,
        )?;
        d.write = secs(
            content.write_timeout_secs,
            "content.write_timeout_secs",
            d.write,
        )?;
        if let Some(v) = &content.min_send_rate {
            d.min_rate = size_value(v).context("content.min_send_rate")?;
        }
        s.fault_corrupt = flags.content_fault_corrupt;
        Ok(s)
    }
}

fn bounded(n: u64, range: std::ops::RangeInclusive<u64>, what: &str) -> anyhow::Result<usize> {
    if !range.contains(&n) {
        bail!(
            "{what} is {n}; it must be {}..={}",
            range.start(),
            range.end()
        );
    }
    usize::try_from(n).with_context(|| format!("{what} is too large"))
}

/// A size from the file: a non-negative integer or a string [`parse_size`] accepts.
fn size_value(v: &toml::Value) -> anyhow::Result<u64> {
    match v {
        toml::Value::Integer(n) => {
            u64::try_from(*n).with_context(|| format!("{n} is negative; sizes are bytes"))
        }
        toml::Value::String(s) => parse_size(s),
        other => bail!("expected a number of bytes or a string like \"10 GiB\", got {other}"),
    }
}

fn parse_size_flag(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| format!("{e:#}"))
}

/// Parses a size: a number of bytes with an optional unit, `K`/`M`/`G`/`T` or
/// `KB`/`MB`/… (powers of 1000) and `KiB`/`MiB`/… (powers of 1024), case-insensitive,
/// spaces allowed: `"10 GiB"`, `"500M"`, `"1048576"`.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        bail!("{s:?} is not a size (a number of bytes, optionally with a unit like MiB or G)");
    }
    let n: u64 = num
        .parse()
        .with_context(|| format!("{s:?}: the number is too large"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => bail!("{s:?}: unknown unit {other:?} (use B, K, M, G, T, KiB, MiB, GiB or TiB)"),
    };
    n.checked_mul(mult)
        .with_context(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("10 GiB").unwrap(), 10 << 30);
        assert_eq!(parse_size("500M").unwrap(), 500_000_000);
        assert_eq!(parse_size(" 2 tib ").unwrap(), 2 << 40);
        for bad in ["", "GiB", "-5", "5 parsecs", "1.5G", "99999999999999999999"] {
            assert!(parse_size(bad).is_err(), "{bad:?} parsed");
        }
        assert!(format!("{:#}", parse_size("5 parsecs").unwrap_err()).contains("unknown unit"));
        assert!(parse_size("20000000 TiB").is_err());
    }

    #[test]
    fn sections_over_defaults_and_flags_over_sections() {
        let state = Path::new("/var/lib/myconet");
        let d = ContentSettings::resolve(&ContentFlags::default(), None, None, state).unwrap();
        assert_eq!(d, ContentSettings::defaults(state));
        assert_eq!(d.store_dir, Path::new("/var/lib/myconet/store"));
        let storage: StorageSection =
            toml::from_str("dir = \"/srv/store\"\nmax_bytes = \"1 GiB\"").unwrap();
        let content: ContentSection = toml::from_str(
            "port = 7000\nmax_concurrent_requests = 2\nupload_rate = \"1 MiB\"\nmax_connections = 9\n\
             request_timeout_secs = 2\nidle_timeout_secs = 3\nwrite_timeout_secs = 4\n\
             min_send_rate = \"1 KiB\"",
        )
        .unwrap();
        let flags = ContentFlags {
            storage_max_bytes: Some(2 << 30),
            ..ContentFlags::default()
        };
        let s = ContentSettings::resolve(&flags, Some(storage), Some(content), state).unwrap();
        assert_eq!(s.store_dir, Path::new("/srv/store"));
        assert_eq!(s.max_bytes, 2 << 30);
        assert_eq!(s.port, 7000);
        assert_eq!(s.max_concurrent, 2);
        assert_eq!(s.upload_rate, 1 << 20);
        assert_eq!(s.max_connections, 9);
        assert_eq!(
            s.deadlines,
            Deadlines {
                request: Duration::from_secs(2),
                idle: Duration::from_secs(3),
                write: Duration::from_secs(4),
                min_rate: 1024,
            }
        );
    }

    #[test]
    fn bad_values_name_the_setting() {
        let state = Path::new("/s");
        let check = |storage: &str, content: &str, needle: &str| {
            let st: StorageSection = toml::from_str(storage).unwrap();
            let ct: ContentSection = toml::from_str(content).unwrap();
            let e = ContentSettings::resolve(&ContentFlags::default(), Some(st), Some(ct), state)
                .unwrap_err();
            assert!(format!("{e:#}").contains(needle), "{e:#}");
        };
        check("max_bytes = 1000", "", "storage.max_bytes");
        check("max_bytes = -1", "", "negative");
        check("max_bytes = \"lots\"", "", "storage.max_bytes");
        check("max_bytes = true", "", "expected a number");
        check("", "max_concurrent_requests = 0", "max_concurrent_requests");
        check("", "upload_burst = 10", "upload_burst");
        check("", "port = 0", "content.port");
        check("", "max_connections = 0", "max_connections");
        check(
            "",
            "request_timeout_secs = 0",
            "content.request_timeout_secs",
        );
        check("", "idle_timeout_secs = 3601", "content.idle_timeout_secs");
        check("", "write_timeout_secs = 0", "content.write_timeout_secs");
        check("", "min_send_rate = \"fast\"", "content.min_send_rate");
        assert!(toml::from_str::<ContentSection>("prot = 1").is_err());
        assert!(toml::from_str::<StorageSection>("maxbytes = 1").is_err());
    }
}
