//! Command-line grammar. Addresses and prefixes are checked here so a typo is reported
//! by clap, with usage, before anything talks to the agent.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use clap::{Args, Parser, Subcommand};
use myconet_common::wire::DEFAULT_PORT;

/// Where the agent listens unless told otherwise (matches the agent's default).
pub const DEFAULT_SOCKET: &str = "/run/myconet/agent.sock";

/// Inspect and change a running myconet-agent over its control socket.
#[derive(Debug, Parser)]
#[command(
    name = "myconet-ctl",
    version,
    propagate_version = true,
    arg_required_else_help = true
)]
pub struct Cli {
    /// The agent's control socket.
    #[arg(
        long,
        global = true,
        env = "MYCONET_SOCKET",
        default_value = DEFAULT_SOCKET,
        value_name = "PATH"
    )]
    pub socket: PathBuf,
    /// Print the API response as JSON (proto field names) instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// Write the man pages and shell completions into DIR and exit (for packaging).
    #[arg(long, value_name = "DIR", hide = true, exclusive = true)]
    pub generate_docs: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Node identity, XDP attachment, uptime and counts.
    Status,
    /// List, add or remove underlay peers (without a subcommand: list).
    Peers {
        /// What to do with peers.
        #[command(subcommand)]
        action: Option<PeersCommand>,
    },
    /// Every prefix the agent or the kernel route map holds, side by side.
    Routes,
    /// Add or delete a static route.
    Route {
        /// What to do with the route.
        #[command(subcommand)]
        action: RouteCommand,
    },
    /// Packages: add, get from other nodes, list, read, pin, remove, verify.
    Content {
        /// What to do with content.
        #[command(subcommand)]
        action: crate::content::ContentCommand,
    },
    /// XDP verdict counters and the agent's own counters.
    Stats {
        /// Also list counters that are zero (JSON always has every counter).
        #[arg(long)]
        all: bool,
    },
    /// The key pinned for each /64 (without a subcommand: list); set or forget one.
    Pins {
        /// What to do with pins.
        #[command(subcommand)]
        action: Option<PinsCommand>,
    },
}

/// `pins ...`
#[derive(Debug, Subcommand)]
pub enum PinsCommand {
    /// List every pinned key.
    List,
    /// Pin a key for the /64 it owns, over whatever was learned: pins set KEY.
    Set {
        /// Ed25519 public key, 64 hex digits (`myconet-ctl status` shows a node's).
        #[arg(value_name = "KEY")]
        key: String,
    },
    /// Forget the pin of a /64 (and the routes to it): the next key heard owning it is
    /// taken: pins forget PREFIX.
    Forget {
        /// The /64 (fd6d:1:2:3::/64) or any address in it.
        #[arg(value_name = "PREFIX")]
        prefix: String,
    },
}

/// `peers ...`
#[derive(Debug, Subcommand)]
pub enum PeersCommand {
    /// List peers with their link state, last seen time and RTT.
    List,
    /// Add a configured neighbour (or change its link cost): it may relay through this
    /// node once its link handshake has authenticated it.
    Add(PeerAddArgs),
    /// Forget a neighbour (it leaves the relay peer map at once).
    #[command(visible_alias = "del")]
    Remove(EndpointArgs),
}

/// An underlay endpoint on the command line.
#[derive(Debug, Args)]
pub struct EndpointArgs {
    /// Underlay IPv6 address.
    #[arg(value_name = "ADDR", value_parser = parse_ipv6)]
    pub addr: Ipv6Addr,
    /// Underlay UDP port.
    #[arg(long, default_value_t = DEFAULT_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// Interface the neighbour is on; required for link-local (fe80::/10) addresses.
    #[arg(long, short = 'i')]
    pub interface: Option<String>,
}

/// `peers add ADDR [--port P] [--interface I] [--cost N]`
#[derive(Debug, Args)]
pub struct PeerAddArgs {
    /// The neighbour's endpoint.
    #[command(flatten)]
    pub endpoint: EndpointArgs,
    /// Base cost of the link to it for the routing protocol (Babel's per-interface
    /// cost; default 96): a higher cost makes routes avoid this link. Given for a
    /// neighbour that is already configured, it changes that neighbour's cost.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=65534))]
    pub cost: Option<u16>,
}

/// `route ...`
#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// Add or replace a static route: route add PREFIX via ADDR [--port P] [--ifindex N].
    Add(RouteAddArgs),
    /// Delete a route: route del PREFIX.
    #[command(visible_alias = "delete")]
    Del {
        /// Overlay prefix, e.g. fd6d:1:2:3::/64.
        #[arg(value_name = "PREFIX", value_parser = parse_prefix)]
        prefix: String,
    },
    /// Explain which route carries an overlay address and why: route get ADDR.
    Get {
        /// Overlay address, e.g. fd6d:1:2:3::1.
        #[arg(value_name = "ADDR", value_parser = parse_ipv6)]
        address: Ipv6Addr,
    },
}

/// The literal keyword `via`, kept as in iproute2 so `route add` reads like `ip route add`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Via;

/// `route add PREFIX via ADDR [--port P] [--ifindex N]`
#[derive(Debug, Args)]
pub struct RouteAddArgs {
    /// Overlay prefix, e.g. fd6d:1:2:3::/64.
    #[arg(value_name = "PREFIX", value_parser = parse_prefix)]
    pub prefix: String,
    /// The keyword `via`.
    #[arg(value_name = "via", value_parser = parse_via)]
    pub via: Via,
    /// Next hop's underlay IPv6 address.
    #[arg(value_name = "ADDR", value_parser = parse_ipv6)]
    pub next_hop: Ipv6Addr,
    /// Next hop's underlay UDP port.
    #[arg(long, default_value_t = DEFAULT_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// Egress interface index towards the next hop; 0 lets the underlay FIB choose.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub ifindex: u32,
}

fn parse_via(s: &str) -> Result<Via, String> {
    if s == "via" {
        Ok(Via)
    } else {
        Err(format!(
            "expected the keyword `via` before the next hop, as in: route add PREFIX via ADDR (got '{s}')"
        ))
    }
}

/// Accepts `addr` and `[addr]` (the form the tables print), and says plainly when an
/// IPv4 address is given, since the underlay is IPv6-only.
fn parse_ipv6(s: &str) -> Result<Ipv6Addr, String> {
    let bare = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    if let Ok(addr) = bare.parse::<Ipv6Addr>() {
        return Ok(addr);
    }
    if bare.parse::<Ipv4Addr>().is_ok() {
        return Err(format!(
            "'{s}' is an IPv4 address; the Myconet underlay is IPv6-only"
        ));
    }
    Err(format!("'{s}' is not an IPv6 address"))
}

/// Checks the `ADDR/LEN` shape; whether the prefix lies in the overlay is the agent's call.
fn parse_prefix(s: &str) -> Result<String, String> {
    let bad = || format!("'{s}' is not a prefix (expected ADDR/LEN, e.g. fd6d:1:2:3::/64)");
    let (addr, len) = s.split_once('/').ok_or_else(bad)?;
    addr.parse::<Ipv6Addr>().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    if len > 128 {
        return Err(format!("'{s}': prefix length {len} is longer than 128"));
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, error::ErrorKind};

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("myconet-ctl").chain(args.iter().copied()))
    }

    fn route_add(args: &[&str]) -> RouteAddArgs {
        match parse(args).unwrap().command.unwrap() {
            Command::Route {
                action: RouteCommand::Add(a),
            } => a,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn grammar_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn docs_generation_stands_alone() {
        let cli = parse(&["--generate-docs", "/tmp/x"]).unwrap();
        assert_eq!(cli.generate_docs, Some(PathBuf::from("/tmp/x")));
        assert!(cli.command.is_none());
        let help = Cli::command().render_help().to_string();
        assert!(!help.contains("generate-docs"), "{help}");
        assert!(help.contains(DEFAULT_SOCKET), "{help}");
    }

    #[test]
    fn route_add_reads_like_iproute2() {
        let a = route_add(&[
            "route",
            "add",
            "fd6d:1::/64",
            "via",
            "fd00::2",
            "--port",
            "9000",
        ]);
        assert_eq!(a.prefix, "fd6d:1::/64");
        assert_eq!(a.via, Via);
        assert_eq!(a.next_hop, "fd00::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!((a.port, a.ifindex), (9000, 0));

        let a = route_add(&[
            "route",
            "add",
            "fd6d:1::/64",
            "via",
            "[fd00::2]",
            "--ifindex",
            "3",
        ]);
        assert_eq!((a.port, a.ifindex), (DEFAULT_PORT, 3));
    }

    #[test]
    fn route_add_without_via_is_refused() {
        let e = parse(&["route", "add", "fd6d:1::/64", "fd00::2"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ValueValidation);
        assert!(e.to_string().contains("keyword `via`"), "{e}");

        let e = parse(&["route", "add", "fd6d:1::/64", "fd00::2", "--port", "1"]).unwrap_err();
        assert!(e.to_string().contains("keyword `via`"), "{e}");

        let e = parse(&["route", "add", "fd6d:1::/64"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::MissingRequiredArgument);
        assert!(e.to_string().contains("<via>"), "{e}");
    }

    #[test]
    fn bad_addresses_and_prefixes_are_rejected_at_parse_time() {
        let e = parse(&["route", "add", "fd6d:1::/64", "via", "192.0.2.1"]).unwrap_err();
        assert!(e.to_string().contains("IPv6-only"), "{e}");
        let e = parse(&["route", "add", "fd6d:1::/64", "via", "nonsense"]).unwrap_err();
        assert!(
            e.to_string().contains("'nonsense' is not an IPv6 address"),
            "{e}"
        );
        let e = parse(&["peers", "add", "fd00::zz"]).unwrap_err();
        assert!(
            e.to_string().contains("'fd00::zz' is not an IPv6 address"),
            "{e}"
        );
        for p in ["fd6d::", "fd6d::/x", "garbage/64", "fd6d::/200"] {
            let e = parse(&["route", "del", p]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::ValueValidation, "{p}");
            assert!(e.to_string().contains(p), "{e}");
        }
        let e = parse(&["peers", "add", "fd00::2", "--port", "0"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ValueValidation);
        assert!(parse(&["peers", "add", "fd00::2", "--port", "70000"]).is_err());
    }

    #[test]
    fn peers_defaults_to_list_and_global_flags_go_anywhere() {
        let cli = parse(&["peers", "--json", "--socket", "/tmp/x.sock"]).unwrap();
        assert!(matches!(
            cli.command.unwrap(),
            Command::Peers { action: None }
        ));
        assert!(cli.json);
        assert_eq!(cli.socket, PathBuf::from("/tmp/x.sock"));

        let cli = parse(&["--json", "peers", "remove", "fd00::2", "--port", "7"]).unwrap();
        match cli.command.unwrap() {
            Command::Peers {
                action: Some(PeersCommand::Remove(e)),
            } => assert_eq!((e.addr.to_string(), e.port), ("fd00::2".into(), 7)),
            other => panic!("parsed as {other:?}"),
        }
        let cli = parse(&["peers", "add", "fd00::2"]).unwrap();
        match cli.command.unwrap() {
            Command::Peers {
                action: Some(PeersCommand::Add(a)),
            } => assert_eq!((a.endpoint.port, a.cost), (DEFAULT_PORT, None)),
            other => panic!("parsed as {other:?}"),
        }
        let cli = parse(&["peers", "add", "fd00::2", "--cost", "400"]).unwrap();
        match cli.command.unwrap() {
            Command::Peers {
                action: Some(PeersCommand::Add(a)),
            } => assert_eq!(a.cost, Some(400)),
            other => panic!("parsed as {other:?}"),
        }
        for bad in ["0", "65535", "cheap"] {
            let e = parse(&["peers", "add", "fd00::2", "--cost", bad]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::ValueValidation, "{bad}: {e}");
        }
        assert!(parse(&["peers", "add", "fd00::2", "--cost", "-1"]).is_err());
        assert!(parse(&["peers", "remove", "fd00::2", "--cost", "5"]).is_err());
        assert!(matches!(
            parse(&["stats", "--all"]).unwrap().command.unwrap(),
            Command::Stats { all: true }
        ));
        assert!(matches!(
            parse(&["route", "delete", "fd6d:1::/64"])
                .unwrap()
                .command
                .unwrap(),
            Command::Route {
                action: RouteCommand::Del { .. }
            }
        ));
        assert!(parse(&["route", "get", "fd6d:1::/64"]).is_err());
        assert!(parse(&[]).is_err());
    }
}
