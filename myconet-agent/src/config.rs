//! Agent settings: command-line flags, optionally layered over a TOML file.
//!
//! Flags win over the file, so an operator can override one setting of a deployed
//! config without editing it.

use std::{
    net::{Ipv6Addr, SocketAddr, SocketAddrV6},
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use clap::Parser;
use myconet_common::wire::DEFAULT_PORT;
use serde::Deserialize;

use crate::os::dataplane::XdpModeChoice;
use myconet_core::rib::{NextHop, Prefix};

/// Command-line flags.
#[derive(Debug, Parser)]
#[command(name = "myconet-agent", version, about = "Myconet node agent")]
pub struct Cli {
    /// TOML configuration file; flags given here override its values.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Underlay interface to attach the XDP relay to (repeat for several).
    #[arg(long = "interface", short = 'i')]
    pub interfaces: Vec<String>,
    // The defaults are spelled out in the help rather than given to clap as default
    // values: a flag left out must leave the file's value alone.
    /// Underlay UDP port.
    #[arg(long, value_name = "PORT", help = format!("Underlay UDP port [default: {DEFAULT_PORT}]"))]
    pub port: Option<u16>,
    /// Directory for the identity key and other state.
    #[arg(long, value_name = "DIR", help = format!(
        "Directory for the identity key and other state [default: {DEFAULT_STATE_DIR}]"
    ))]
    pub state_dir: Option<PathBuf>,
    /// Unix socket of the gRPC control API.
    #[arg(long, value_name = "PATH", help = format!(
        "Unix socket of the gRPC control API [default: {DEFAULT_SOCKET}]"
    ))]
    pub socket: Option<PathBuf>,
    /// Permission bits of the control socket, in octal.
    #[arg(long, value_name = "MODE", value_parser = parse_mode,
          help = format!("Permission bits of the control socket, in octal [default: {DEFAULT_SOCKET_MODE:04o}]"))]
    pub socket_mode: Option<u32>,
    /// XDP attach mode.
    #[arg(long, value_enum)]
    pub xdp_mode: Option<XdpModeChoice>,
    /// Which path relays packets: the XDP fast path, the userspace path, or XDP where it
    /// attaches and userspace otherwise.
    #[arg(long, value_enum)]
    pub dataplane: Option<DataplaneChoice>,
    /// Leave the interfaces' IPv6 forwarding/accept_ra sysctls alone (the fast path then
    /// passes relayed traffic to userspace unless forwarding is already enabled).
    #[arg(long)]
    pub no_sysctl: bool,
    /// Static peer, `[ADDR]:PORT` or `ADDR` (repeat for several).
    #[arg(long = "peer")]
    pub peers: Vec<String>,
    /// Milliseconds between hellos to each neighbour. A hello left unanswered starts
    /// five quick probes (100 ms apart, or the link's RTT timeout if longer): a
    /// neighbour that answers none of them is down, and so is one silent for three
    /// intervals and a half. This bounds how long a dead relay keeps routes.
    #[arg(long, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub hello_interval_ms: Option<u64>,
    /// Find neighbours on this interface by signed link-local multicast beacons
    /// (repeat for several; off everywhere unless named).
    #[arg(long = "discover")]
    pub discover: Vec<String>,
    /// Name of the overlay TUN device unmodified applications use.
    #[arg(long, value_name = "NAME", help = format!(
        "Name of the overlay TUN device unmodified applications use [default: {DEFAULT_TUN_NAME}]"
    ))]
    pub tun_name: Option<String>,
    /// Do not create a TUN device (a pure relay).
    #[arg(long)]
    pub no_tun: bool,
    /// The content store and protocol.
    #[command(flatten)]
    pub content: crate::shell::content::settings::ContentFlags,
    /// Directory on a BPF file system where the XDP links and maps are pinned, so the
    /// relay keeps forwarding while the agent restarts (default: a directory under
    /// /sys/fs/bpf/myconet derived from the state directory).
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// On SIGTERM/SIGINT, leave the XDP program relaying on its pinned maps (and the
    /// sysctls set) for the next agent to adopt, as SIGUSR2 always does.
    #[arg(long)]
    pub hitless_restart: bool,
    /// Serve Prometheus metrics over HTTP on this address (e.g. `[::1]:9652`); off
    /// unless given here or as `metrics.listen` in the file.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<SocketAddr>,
    /// Allow the metrics address to be other than loopback (the counters tell anyone
    /// who can reach it about this node's neighbours and traffic).
    #[arg(long)]
    pub metrics_allow_remote: bool,
    /// Log format on stderr: `text` (colour only on a terminal) or `json` (one object
    /// per line). `RUST_LOG` sets the level (default info).
    #[arg(long, value_enum, default_value_t = crate::logging::LogFormat::Text)]
    pub log_format: crate::logging::LogFormat,
    /// Write the man page and shell completions into DIR and exit (for packaging).
    #[arg(long, value_name = "DIR", hide = true, exclusive = true)]
    pub generate_docs: Option<PathBuf>,
}

/// Which forwarding path the node uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DataplaneChoice {
    /// XDP on every interface; failing to attach is an error.
    Xdp,
    /// No XDP: the agent relays every packet itself.
    Userspace,
    /// XDP where it attaches, the userspace path (with a warning) where it does not.
    Auto,
}

impl DataplaneChoice {
    /// The flag's value, for `status`.
    pub fn as_str(self) -> &'static str {
        match self {
            DataplaneChoice::Xdp => "xdp",
            DataplaneChoice::Userspace => "userspace",
            DataplaneChoice::Auto => "auto",
        }
    }
}

/// The file format; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    interfaces: Option<Vec<String>>,
    port: Option<u16>,
    state_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
    socket_mode: Option<String>,
    xdp_mode: Option<String>,
    dataplane: Option<String>,
    manage_sysctl: Option<bool>,
    tun_name: Option<String>,
    tun: Option<bool>,
    /// `"[ADDR]:PORT"` strings or `{ endpoint = "[ADDR]:PORT", cost = N }` tables.
    #[serde(default)]
    peers: Vec<toml::Value>,
    #[serde(default)]
    discover: Vec<String>,
    hello_interval_ms: Option<u64>,
    #[serde(default)]
    routes: Vec<FileRoute>,
    storage: Option<crate::shell::content::settings::StorageSection>,
    content: Option<crate::shell::content::settings::ContentSection>,
    /// Ed25519 keys (hex) pinned for their /64 by the operator (`myconet_core::pins`).
    #[serde(default)]
    pinned_keys: Vec<String>,
    pin_dir: Option<PathBuf>,
    hitless_restart: Option<bool>,
    metrics: Option<FileMetrics>,
}

/// The `[metrics]` table of the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMetrics {
    listen: Option<String>,
    allow_remote: Option<bool>,
}

/// A static route in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRoute {
    prefix: String,
    via: String,
    port: Option<u16>,
    ifindex: Option<u32>,
}

/// Resolved settings.
#[derive(Debug)]
pub struct Settings {
    /// Interfaces to attach to.
    pub interfaces: Vec<String>,
    /// Underlay port.
    pub port: u16,
    /// State directory.
    pub state_dir: PathBuf,
    /// Control socket path.
    pub socket: PathBuf,
    /// Control socket mode.
    pub socket_mode: u32,
    /// XDP attach mode.
    pub xdp_mode: XdpModeChoice,
    /// Which path relays packets.
    pub dataplane: DataplaneChoice,
    /// Whether to set forwarding/accept_ra.
    pub manage_sysctl: bool,
    /// Static peers.
    pub peers: Vec<PeerSetting>,
    /// Interfaces to discover neighbours on.
    pub discover: Vec<String>,
    /// Neighbour timers.
    pub peer_config: myconet_core::peers::PeerConfig,
    /// Static routes.
    pub routes: Vec<(Prefix, NextHop)>,
    /// The TUN device to create, `None` for a pure relay.
    pub tun_name: Option<String>,
    /// The content store and protocol (`storage` and `content` sections).
    pub content: crate::shell::content::settings::ContentSettings,
    /// Keys the operator pins for their /64, over whatever was learned (`myconet_core::pins`).
    pub pinned_keys: Vec<[u8; 32]>,
    /// Where the data plane is pinned (see `crate::os::bpf_pins`).
    pub pin_dir: PathBuf,
    /// Whether SIGTERM/SIGINT leave the pinned data plane for the next agent.
    pub hitless_restart: bool,
    /// Where to serve Prometheus metrics, `None` for nowhere (the default).
    pub metrics_listen: Option<SocketAddr>,
}

/// A configured neighbour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSetting {
    /// Its underlay endpoint.
    pub endpoint: SocketAddrV6,
    /// The base cost of the link to it (Babel's per-interface cost), if not the default:
    /// the operator's way to prefer or avoid a link whatever its measurements say.
    pub cost: Option<u16>,
}

/// Link costs an operator may configure: 0 would make a hop free (metrics must grow
/// along a path for loop freedom), 65535 is the infinite metric.
pub const LINK_COST_RANGE: std::ops::RangeInclusive<u16> = 1..=0xFFFE;

/// Checks a configured link cost against [`LINK_COST_RANGE`].
pub fn link_cost(cost: u64) -> anyhow::Result<u16> {
    u16::try_from(cost)
        .ok()
        .filter(|c| LINK_COST_RANGE.contains(c))
        .with_context(|| {
            format!(
                "link cost {cost} is out of range ({}..={})",
                LINK_COST_RANGE.start(),
                LINK_COST_RANGE.end()
            )
        })
}

/// One `peers` entry of the file: an endpoint string or a table with a cost.
fn file_peer(value: &toml::Value) -> anyhow::Result<PeerSetting> {
    match value {
        toml::Value::String(s) => Ok(PeerSetting {
            endpoint: parse_endpoint(s)?,
            cost: None,
        }),
        toml::Value::Table(t) => {
            if let Some(key) = t
                .keys()
                .find(|k| !["endpoint", "cost"].contains(&k.as_str()))
            {
                bail!("peer {value}: unknown key {key:?} (expected endpoint and cost)");
            }
            let endpoint = t
                .get("endpoint")
                .and_then(toml::Value::as_str)
                .with_context(|| format!("peer {value}: endpoint = \"[ADDR]:PORT\" is required"))?;
            let cost = match t.get("cost") {
                None => None,
                Some(c) => {
                    let n = c
                        .as_integer()
                        .and_then(|n| u64::try_from(n).ok())
                        .with_context(|| format!("peer {value}: cost must be a number"))?;
                    Some(link_cost(n).with_context(|| format!("peer {endpoint}"))?)
                }
            };
            Ok(PeerSetting {
                endpoint: parse_endpoint(endpoint)?,
                cost,
            })
        }
        other => bail!("peer {other}: expected \"[ADDR]:PORT\" or {{ endpoint = ..., cost = N }}"),
    }
}

/// Default name of the overlay TUN device.
pub const DEFAULT_TUN_NAME: &str = crate::os::tun::DEFAULT_NAME;

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/myconet";
/// Default control socket.
pub const DEFAULT_SOCKET: &str = "/run/myconet/agent.sock";
/// Default permission bits of the control socket: the agent's user only.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// The metrics address: refused unless loopback or explicitly allowed, because the
/// endpoint has no authentication and names this node's neighbours.
fn metrics_listen(
    flag: Option<SocketAddr>,
    file: Option<FileMetrics>,
    allow_flag: bool,
) -> anyhow::Result<Option<SocketAddr>> {
    let file = file.unwrap_or_default();
    let addr = match (flag, file.listen) {
        (Some(a), _) => a,
        (None, Some(s)) => s
            .parse()
            .with_context(|| format!("metrics.listen {s:?} is not ADDR:PORT"))?,
        (None, None) => return Ok(None),
    };
    let allowed = allow_flag || file.allow_remote == Some(true);
    if !addr.ip().is_loopback() && !allowed {
        bail!(
            "metrics address {addr} is not loopback; the endpoint has no authentication, \
             so allow it explicitly (--metrics-allow-remote or metrics.allow_remote = true)"
        );
    }
    if addr.port() == 0 {
        bail!("metrics address {addr}: port must not be 0");
    }
    Ok(Some(addr))
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("not an octal mode: {s}"))?;
    if mode > 0o777 {
        return Err(format!("mode {s} has bits beyond 0777"));
    }
    Ok(mode)
}

/// Parses `[ADDR]:PORT` or a bare `ADDR` (default port).
pub fn parse_endpoint(s: &str) -> anyhow::Result<SocketAddrV6> {
    if let Ok(sa) = s.parse::<SocketAddrV6>() {
        return Ok(sa);
    }
    let addr: Ipv6Addr = s
        .parse()
        .with_context(|| format!("not an IPv6 endpoint ([ADDR]:PORT or ADDR): {s}"))?;
    Ok(SocketAddrV6::new(addr, DEFAULT_PORT, 0, 0))
}

/// Neighbour timers from the hello interval (default 1 s): down after three intervals
/// and a half without an authenticated packet, so three lost hellos in a row take a link
/// down and two never do; sooner when a hello and the five probes after it all go
/// unanswered (see `PeerConfig::probe_count`), which is what makes failover fast.
fn peer_config(hello_interval_ms: Option<u64>) -> anyhow::Result<myconet_core::peers::PeerConfig> {
    let mut config = myconet_core::peers::PeerConfig::default();
    let hello = std::time::Duration::from_millis(hello_interval_ms.unwrap_or(1000));
    if !(100..=60_000).contains(&hello.as_millis()) {
        bail!("hello_interval_ms must be 100..=60000");
    }
    config.hello_interval = hello;
    config.hello_loss_timeout = hello;
    config.dead_interval = hello * 7 / 2;
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("neighbour timers: {e}"))?;
    Ok(config)
}

impl FileConfig {
    /// Parses the text of a config file (what `--config` reads).
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }
}

impl Cli {
    /// No flags at all: the file alone decides (tests and the config fuzz target).
    pub fn without_flags() -> Self {
        Self::parse_from(["myconet-agent"])
    }

    /// Merges flags over the file (if any) and validates everything.
    pub fn resolve(self) -> anyhow::Result<Settings> {
        let file = match &self.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        self.resolve_with(file)
    }

    /// Merges flags over an already parsed `file` and validates everything.
    pub fn resolve_with(self, file: FileConfig) -> anyhow::Result<Settings> {
        let interfaces = if self.interfaces.is_empty() {
            file.interfaces.unwrap_or_default()
        } else {
            self.interfaces
        };
        let port = self.port.or(file.port).unwrap_or(DEFAULT_PORT);
        if port == 0 {
            bail!("port must not be 0");
        }
        let socket_mode = match (self.socket_mode, file.socket_mode) {
            (Some(m), _) => m,
            (None, Some(m)) => parse_mode(&m).map_err(anyhow::Error::msg)?,
            (None, None) => DEFAULT_SOCKET_MODE,
        };
        let xdp_mode = match (self.xdp_mode, file.xdp_mode) {
            (Some(m), _) => m,
            (None, Some(m)) => <XdpModeChoice as clap::ValueEnum>::from_str(&m, true)
                .map_err(|_| anyhow::anyhow!("xdp_mode must be auto, driver or generic: {m}"))?,
            (None, None) => XdpModeChoice::Auto,
        };
        let dataplane = match (self.dataplane, file.dataplane) {
            (Some(d), _) => d,
            (None, Some(d)) => <DataplaneChoice as clap::ValueEnum>::from_str(&d, true)
                .map_err(|_| anyhow::anyhow!("dataplane must be xdp, userspace or auto: {d}"))?,
            // Asking for a specific XDP mode means asking for XDP: failing to attach is
            // then an error rather than a quiet fall-back to the userspace path.
            (None, None) if xdp_mode != XdpModeChoice::Auto => DataplaneChoice::Xdp,
            (None, None) => DataplaneChoice::Auto,
        };
        let mut peers = Vec::new();
        for p in &file.peers {
            peers.push(file_peer(p)?);
        }
        for p in &self.peers {
            peers.push(PeerSetting {
                endpoint: parse_endpoint(p)?,
                cost: None,
            });
        }
        let mut routes = Vec::new();
        for r in file.routes {
            let prefix: Prefix = r
                .prefix
                .parse()
                .with_context(|| format!("route {}", r.prefix))?;
            let addr: Ipv6Addr = r
                .via
                .parse()
                .with_context(|| format!("route {}: bad next hop {}", r.prefix, r.via))?;
            routes.push((
                prefix,
                NextHop {
                    addr,
                    port: r.port.unwrap_or(DEFAULT_PORT),
                    ifindex: r.ifindex.unwrap_or(0),
                },
            ));
        }
        let mut pinned_keys = Vec::new();
        for k in &file.pinned_keys {
            pinned_keys.push(myconet_core::pins::parse_key(k).with_context(|| {
                format!("pinned_keys: {k:?} is not an Ed25519 public key (64 hex digits)")
            })?);
        }
        let tun_name = if self.no_tun || file.tun == Some(false) {
            None
        } else {
            let name = self
                .tun_name
                .or(file.tun_name)
                .unwrap_or_else(|| DEFAULT_TUN_NAME.to_string());
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
                bail!(
                    "tun name {name:?} is not a valid interface name (1-15 bytes, no '/' or spaces)"
                );
            }
            Some(name)
        };
        let state_dir = self
            .state_dir
            .or(file.state_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let content = crate::shell::content::settings::ContentSettings::resolve(
            &self.content,
            file.storage,
            file.content,
            &state_dir,
        )?;
        let pin_dir = self
            .pin_dir
            .or(file.pin_dir)
            .unwrap_or_else(|| crate::os::bpf_pins::default_dir(&state_dir));
        let metrics_listen =
            metrics_listen(self.metrics_listen, file.metrics, self.metrics_allow_remote)?;
        Ok(Settings {
            interfaces,
            tun_name,
            metrics_listen,
            port,
            content,
            pin_dir,
            hitless_restart: self.hitless_restart || file.hitless_restart.unwrap_or(false),
            state_dir,
            socket: self
                .socket
                .or(file.socket)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
            socket_mode,
            xdp_mode,
            dataplane,
            manage_sysctl: !self.no_sysctl && file.manage_sysctl.unwrap_or(true),
            peers,
            peer_config: peer_config(self.hello_interval_ms.or(file.hello_interval_ms))?,
            discover: if self.discover.is_empty() {
                file.discover
            } else {
                self.discover
            },
            routes,
            pinned_keys,
        })
    }
}

fn load_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    FileConfig::from_toml(&text).with_context(|| format!("parsing config {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file() {
        let dir = std::env::temp_dir().join(format!("myconet-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("agent.toml");
        std::fs::write(
            &f,
            r#"
interfaces = ["eth0"]
port = 7000
socket_mode = "0660"
peers = ["[fd00::1]:7000", "fd00::2", { endpoint = "[fd00::3]:7000", cost = 400 }]
pinned_keys = ["0101010101010101010101010101010101010101010101010101010101010101"]
[[routes]]
prefix = "fd6d:1:2:3::/64"
via = "fd00::1"
"#,
        )
        .unwrap();
        let cli = Cli::parse_from(["myconet-agent", "-c", f.to_str().unwrap(), "--port", "7001"]);
        let s = cli.resolve().unwrap();
        assert_eq!(s.interfaces, vec!["eth0"]);
        assert_eq!(s.port, 7001);
        assert_eq!(s.socket_mode, 0o660);
        assert_eq!(s.peers[1].endpoint.port(), DEFAULT_PORT);
        assert_eq!(s.peers[1].cost, None);
        assert_eq!(
            s.peers[2],
            PeerSetting {
                endpoint: "[fd00::3]:7000".parse().unwrap(),
                cost: Some(400)
            }
        );
        assert_eq!(s.routes.len(), 1);
        assert_eq!(s.pinned_keys, vec![[1u8; 32]]);
        std::fs::write(&f, "pinned_keys = [\"0102\"]\n").unwrap();
        let cli = Cli::parse_from(["myconet-agent", "-c", f.to_str().unwrap()]);
        let err = cli.resolve().unwrap_err();
        assert!(format!("{err:#}").contains("64 hex digits"), "{err:#}");
        // Pins default to a directory of this state directory's own; the file and the
        // flags can name one, and ask for hitless restarts.
        assert_eq!(
            s.pin_dir,
            crate::os::bpf_pins::default_dir(Path::new(DEFAULT_STATE_DIR))
        );
        assert!(!s.hitless_restart);
        std::fs::write(
            &f,
            "pin_dir = \"/sys/fs/bpf/node1\"\nhitless_restart = true\n",
        )
        .unwrap();
        let s = Cli::parse_from(["a", "-c", f.to_str().unwrap()])
            .resolve()
            .unwrap();
        assert_eq!(s.pin_dir, Path::new("/sys/fs/bpf/node1"));
        assert!(s.hitless_restart);
        let s = Cli::parse_from(["a", "--pin-dir", "/x", "--hitless-restart"])
            .resolve()
            .unwrap();
        assert_eq!(
            (s.pin_dir.as_path(), s.hitless_restart),
            (Path::new("/x"), true)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn help_shows_the_defaults() {
        let help = <Cli as clap::CommandFactory>::command()
            .render_help()
            .to_string();
        for default in [
            format!("[default: {DEFAULT_PORT}]"),
            format!("[default: {DEFAULT_STATE_DIR}]"),
            format!("[default: {DEFAULT_SOCKET}]"),
            format!("[default: {DEFAULT_TUN_NAME}]"),
            "[default: 0600]".to_string(),
        ] {
            assert!(help.contains(&default), "--help lacks {default}:\n{help}");
        }
        assert!(!help.contains("generate-docs"), "{help}");
    }

    #[test]
    fn metrics_are_off_by_default_and_loopback_unless_allowed() {
        let resolve = |args: &[&str]| {
            Cli::parse_from(std::iter::once("a").chain(args.iter().copied())).resolve()
        };
        assert_eq!(resolve(&[]).unwrap().metrics_listen, None);
        assert_eq!(
            resolve(&["--metrics-listen", "[::1]:9652"])
                .unwrap()
                .metrics_listen,
            Some("[::1]:9652".parse().unwrap())
        );
        let err = resolve(&["--metrics-listen", "[::]:9652"]).unwrap_err();
        assert!(format!("{err:#}").contains("not loopback"), "{err:#}");
        assert!(
            resolve(&["--metrics-listen", "[::]:9652", "--metrics-allow-remote"])
                .unwrap()
                .metrics_listen
                .is_some()
        );
        let dir = std::env::temp_dir().join(format!("myconet-cfg-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("agent.toml");
        for (text, ok) in [
            ("[metrics]\nlisten = \"127.0.0.1:9652\"\n", true),
            ("[metrics]\nlisten = \"192.0.2.1:9652\"\n", false),
            (
                "[metrics]\nlisten = \"192.0.2.1:9652\"\nallow_remote = true\n",
                true,
            ),
            ("[metrics]\nlisten = \"localhost\"\n", false),
            ("[metrics]\nlisten = \"[::1]:0\"\n", false),
            ("[metrics]\nlsiten = \"[::1]:9652\"\n", false),
        ] {
            std::fs::write(&f, text).unwrap();
            let got = resolve(&["-c", f.to_str().unwrap()]);
            assert_eq!(got.is_ok(), ok, "{text}: {got:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let dir = std::env::temp_dir().join(format!("myconet-cfg-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("agent.toml");
        std::fs::write(&f, "prot = 1\n").unwrap();
        let err = Cli::parse_from(["a", "-c", f.to_str().unwrap()])
            .resolve()
            .unwrap_err();
        assert!(format!("{err:#}").contains("prot"), "{err:#}");
        for (peers, needle) in [
            (r#"[{ endpoint = "fd00::1", cost = 0 }]"#, "out of range"),
            (
                r#"[{ endpoint = "fd00::1", cost = 65535 }]"#,
                "out of range",
            ),
            (
                r#"[{ endpoint = "fd00::1", cost = -3 }]"#,
                "cost must be a number",
            ),
            (
                r#"[{ endpoint = "fd00::1", weight = 3 }]"#,
                "unknown key \"weight\"",
            ),
            (r#"[{ cost = 3 }]"#, "endpoint"),
            (r#"[7]"#, "expected"),
        ] {
            std::fs::write(&f, format!("peers = {peers}\n")).unwrap();
            let err = Cli::parse_from(["a", "-c", f.to_str().unwrap()])
                .resolve()
                .unwrap_err();
            assert!(format!("{err:#}").contains(needle), "{peers}: {err:#}");
        }
        assert!(parse_endpoint("not-an-address").is_err());
        assert!(parse_mode("999").is_err());
        assert!(Cli::try_parse_from(["a", "--socket-mode", "rw"]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
