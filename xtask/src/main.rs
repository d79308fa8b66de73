//! Myconet's task runner (`cargo xtask <command>`): one place that knows how to prepare
//! a machine, build, and run the full test gate, so developers and CI do the same thing.

mod bench;
mod cmd;
mod content_bench;
mod failover;
mod flood;
mod fuzz;
mod package;
mod setup;
mod test;
mod throughput;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use myconet_testbed::topology::{self, Chain, fmt_mac};

/// Tag of the namespaces `netns up` creates (`myc<tag>-a`, …), fixed so `netns down`
/// finds them again.
const DEV_TAG: &str = "dev";

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Myconet development tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install missing system packages, nightly rust-src, bpf-linker and cargo-fuzz
    /// (idempotent).
    Setup,
    /// Setup, then build the release binaries.
    Build,
    /// Setup, then fmt check, clippy (host and eBPF), build and all tests; needs root.
    ///
    /// Arguments after `--` go to `cargo test`, e.g. `cargo xtask test -- relay`.
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Setup, release build, then the three-namespace relay demo; needs root.
    Demo,
    /// Setup, release build, then a benchmark; needs root.
    Bench {
        #[command(subcommand)]
        which: BenchCmd,
    },
    /// Setup, release build, then the Debian package (target/debian/myconet_*.deb):
    /// binaries, systemd unit, sample config, man pages, completions and docs.
    Package {
        /// Package the debug binaries instead (quicker; what the test suite does).
        #[arg(long)]
        debug: bool,
        /// Directory for the .deb (default: target/debian).
        #[arg(long, value_name = "DIR")]
        out: Option<std::path::PathBuf>,
    },
    /// Coverage-guided fuzzing (cargo-fuzz, nightly): list the targets with no argument
    /// or `--list`, run one with `TARGET`, or all in turn with `all`. The `xdp` target
    /// needs root.
    Fuzz {
        /// Target to run (`all` for every target in turn); none lists them.
        target: Option<String>,
        /// List the targets.
        #[arg(long)]
        list: bool,
        /// Seconds each target runs.
        #[arg(long, default_value_t = 60)]
        time: u64,
    },
    /// Bring up or tear down a chain of namespaces for manual experiments; needs root.
    Netns {
        #[command(subcommand)]
        action: NetnsCmd,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCmd {
    /// XDP relay packets/s in a — b — c next to the BPF_PROG_TEST_RUN ns/packet figures.
    Relay {
        /// Seconds the generator runs per datagram size.
        #[arg(long, default_value_t = 3)]
        seconds: u64,
    },
    /// TCP throughput a → c through relay b, XDP relay next to userspace relay, with
    /// relay CPU time per packet for each, and plain kernel forwarding (no overlay,
    /// with and without GRO) as the testbed's own ceiling.
    Throughput {
        /// Seconds each iperf3 run lasts (one run per relay data plane, two for
        /// kernel forwarding).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Failover of a ping stream across the diamond a — b|c — d when the active relay is
    /// killed (outage per run), and the links' steady-state control traffic; for the
    /// release build, or for the builds named with --bin-dir, side by side.
    Failover {
        /// Failovers per build (each in a fresh diamond).
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Seconds of idle control traffic measured per build (0: skip; at least 60
        /// covers the routing protocol's 30 s periodic updates).
        #[arg(long, default_value_t = 60)]
        control_seconds: u64,
        /// A directory with myconet-agent and myconet-ctl to measure instead of this
        /// tree's release build (repeat to compare builds; runs are interleaved).
        #[arg(long = "bin-dir")]
        bin_dirs: Vec<std::path::PathBuf>,
        /// Hello interval for every agent (default: the agent's own default).
        #[arg(long)]
        hello_interval_ms: Option<u64>,
    },
    /// a → c TCP throughput while an attacker floods the receiver c (then the relay b)
    /// with handshake inits, fresh keys echoing cookies and replays, each next to an
    /// unflooded window: throughput ratio, inits verified per second, target agent CPU.
    Flood {
        /// Seconds each iperf3 window lasts (three windows per target).
        #[arg(long, default_value_t = 8)]
        seconds: u64,
        /// Flood only this node (`c` or `b`); both by default.
        #[arg(long)]
        target: Option<String>,
        /// How many underlay /64s the attacker sends from.
        #[arg(long, default_value_t = 16)]
        sources: usize,
        /// A directory with myconet-agent and myconet-ctl to measure instead of this
        /// tree's release build (repeat to compare builds; run in turn per target).
        #[arg(long = "bin-dir")]
        bin_dirs: Vec<std::path::PathBuf>,
    },
    /// Content: add against raw BLAKE3 and a raw write, fetch against iperf3 over the
    /// same overlay path, proof overhead, time to first byte, the share fetched again
    /// after a killed download, and the agents' memory while serving and fetching.
    Content {
        /// Size of the large file, MiB.
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        /// Seconds of the iperf3 run.
        #[arg(long, default_value_t = 5)]
        iperf_seconds: u64,
    },
    /// The routing simulator at scale (random and scale-free topologies, link and node
    /// failures): convergence time, messages and bytes per node per minute, memory per
    /// route. Needs no root: it is a deterministic simulation.
    Routing {
        /// Nodes per topology (10^8 routes across all simulated nodes at 10,000: about
        /// 13 GB RSS and about 37 minutes per topology on one core; see docs/routing.md).
        #[arg(long, default_value_t = 10_000)]
        nodes: u32,
        /// Simulator seed (runs are reproducible).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Run only this topology (`random` or `scale-free`); both by default.
        #[arg(long)]
        topology: Option<String>,
        /// Add a table-fill attack: a host nobody configured attaches to the node with
        /// the most links after cold start and announces this many prefixes of keys it
        /// made (0: none; see docs/routing.md, "Self-admitted neighbours").
        #[arg(long, default_value_t = 0)]
        attack_junk: usize,
        /// What the attacked node takes the attacker for: `self-admitted` or
        /// `configured` (how every neighbour was treated before the limits).
        #[arg(long, default_value = "self-admitted")]
        attack_admission: String,
        /// Most prefixes a node holds (default: the router's, 200,000).
        #[arg(long)]
        max_routes: Option<usize>,
    },
}

#[derive(Debug, Subcommand)]
enum NetnsCmd {
    /// Create a chain `myc<tag>-a — myc<tag>-b — …` and leave it running.
    Up {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
    /// Delete the namespaces `netns up` created.
    Down,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let root = cmd::workspace_root()?;
    match cli.command {
        Cmd::Setup => setup::run(),
        Cmd::Build => {
            setup::run()?;
            cmd::run(cmd::cargo(&root).args(["build", "--release", "--bins"]))
        }
        Cmd::Test { cargo_test_args } => test::run(&root, &cargo_test_args),
        Cmd::Demo => {
            require_root()?;
            setup::run()?;
            cmd::run(cmd::cargo(&root).args(["build", "--release", "--bins"]))?;
            myconet_testbed::demo::run(&cmd::target_dir(&root)?.join("release"))
        }
        Cmd::Bench {
            which:
                BenchCmd::Routing {
                    nodes,
                    seed,
                    topology,
                    attack_junk,
                    attack_admission,
                    max_routes,
                },
        } => {
            let mut extra = Vec::new();
            if attack_junk > 0 {
                extra.extend([
                    "--attack-junk".to_string(),
                    attack_junk.to_string(),
                    "--attack-admission".to_string(),
                    attack_admission,
                ]);
            }
            if let Some(m) = max_routes {
                extra.extend(["--max-routes".to_string(), m.to_string()]);
            }
            routing_bench(&root, nodes, seed, topology.as_deref(), &extra)
        }
        Cmd::Bench {
            which:
                BenchCmd::Failover {
                    runs,
                    control_seconds,
                    bin_dirs,
                    hello_interval_ms,
                },
        } => {
            require_root()?;
            setup::run()?;
            let target = cmd::target_dir(&root)?;
            let bin_dirs = if bin_dirs.is_empty() {
                cmd::run(cmd::cargo(&root).args(["build", "--release", "--bins"]))?;
                vec![target.join("release")]
            } else {
                bin_dirs
            };
            let extra: Vec<String> = hello_interval_ms
                .map(|ms| vec!["--hello-interval-ms".to_string(), ms.to_string()])
                .unwrap_or_default();
            failover::run(
                &target,
                &bin_dirs,
                &extra,
                runs.clamp(1, 100),
                std::time::Duration::from_secs(control_seconds.min(3600)),
            )
        }
        Cmd::Bench { which } => {
            require_root()?;
            setup::run()?;
            cmd::run(cmd::cargo(&root).args(["build", "--release", "--bins"]))?;
            match which {
                BenchCmd::Relay { seconds } => bench::relay(&root, seconds.clamp(1, 60)),
                BenchCmd::Throughput { seconds } => throughput::run(&root, seconds.clamp(1, 120)),
                BenchCmd::Content { mib, iperf_seconds } => {
                    content_bench::run(&root, mib.clamp(16, 8192), iperf_seconds.clamp(1, 60))
                }
                BenchCmd::Routing { .. } | BenchCmd::Failover { .. } => {
                    unreachable!("handled above")
                }
                BenchCmd::Flood {
                    seconds,
                    target,
                    sources,
                    bin_dirs,
                } => {
                    use myconet_testbed::flood::Target;
                    let targets = match target.as_deref() {
                        None => vec![Target::C, Target::B],
                        Some("c") => vec![Target::C],
                        Some("b") => vec![Target::B],
                        Some(other) => anyhow::bail!("--target {other}: c or b"),
                    };
                    flood::run(
                        &root,
                        seconds.clamp(2, 60),
                        &targets,
                        sources.clamp(1, 200),
                        &bin_dirs,
                    )
                }
            }
        }
        Cmd::Package { debug, out } => package::run(&root, debug, out),
        Cmd::Fuzz { target, list, time } => match target {
            Some(t) if !list => {
                let targets: Vec<String> = if t == "all" {
                    fuzz::TARGETS.iter().map(|t| t.0.to_string()).collect()
                } else {
                    vec![t]
                };
                fuzz::run(&root, &targets, time.max(1))
            }
            _ => {
                fuzz::list();
                Ok(())
            }
        },
        Cmd::Netns { action } => match action {
            NetnsCmd::Up { nodes } => netns_up(nodes),
            NetnsCmd::Down => netns_down(),
        },
    }
}

fn require_root() -> Result<()> {
    if !cmd::is_root() {
        anyhow::bail!("this needs root (network namespaces, XDP): run it with sudo or as root");
    }
    Ok(())
}

fn netns_up(nodes: usize) -> Result<()> {
    let topo = Chain::new(nodes).fixed_tag(DEV_TAG).build().context(
        "could not build the chain (left over from an earlier `up`? run `cargo xtask netns down`)",
    )?;
    topo.ping_all_links()?;
    for node in topo.nodes() {
        println!("{}", node.ns_name());
        for iface in node.ifaces() {
            println!(
                "  {:<6} ifindex {:<3} {} {}/64  -> {} ({}) {}",
                iface.name,
                iface.ifindex,
                fmt_mac(&iface.mac),
                iface.addr,
                topo.node(iface.peer).ns_name(),
                iface.peer_name,
                iface.peer_addr,
            );
        }
    }
    if let (Some(first), Some(second)) = (topo.nodes().first(), topo.nodes().get(1)) {
        println!(
            "\ntry: ip netns exec {} ping -6 -c1 {}",
            first.ns_name(),
            first.peer_addr(second.index())?
        );
    }
    println!("tear down with: cargo xtask netns down");
    topo.persist();
    Ok(())
}

fn netns_down() -> Result<()> {
    let deleted = topology::teardown_tag(DEV_TAG)?;
    if deleted.is_empty() {
        println!("no namespaces from `cargo xtask netns up` found");
    }
    for name in deleted {
        println!("deleted {name}");
    }
    Ok(())
}

/// Runs the routing simulator (release build) on a random and a scale-free topology;
/// each run prints its report and saves it as JSON under `target/bench/`.
fn routing_bench(
    root: &std::path::Path,
    nodes: u32,
    seed: u64,
    only: Option<&str>,
    extra: &[String],
) -> Result<()> {
    let out = cmd::target_dir(root)?.join("bench");
    std::fs::create_dir_all(&out)?;
    let all = ["random", "scale-free"];
    if let Some(t) = only
        && !all.contains(&t)
    {
        anyhow::bail!("unknown topology {t:?} (random or scale-free)");
    }
    for topology in all.into_iter().filter(|t| only.is_none_or(|o| o == *t)) {
        let tag = if extra.is_empty() { "" } else { "-attack" };
        let json = out.join(format!("routing-{topology}-{nodes}{tag}.json"));
        println!("==> routing simulator: {nodes} nodes, {topology}, seed {seed}");
        cmd::run(
            cmd::cargo(root)
                .args([
                    "run",
                    "--release",
                    "-p",
                    "myconet-core",
                    "--features",
                    "sim",
                    "--example",
                    "routing_sim",
                    "--",
                    "--nodes",
                    &nodes.to_string(),
                    "--topology",
                    topology,
                    "--seed",
                    &seed.to_string(),
                    "--json",
                    &json.display().to_string(),
                ])
                .args(extra),
        )?;
        println!("saved {}", json.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_args_after_double_dash_reach_cargo_test() {
        let cli =
            Cli::try_parse_from(["xtask", "test", "--", "relay", "--", "--nocapture"]).unwrap();
        match cli.command {
            Cmd::Test { cargo_test_args } => {
                assert_eq!(cargo_test_args, ["relay", "--", "--nocapture"]);
            }
            other => panic!("parsed as {other:?}"),
        }
        let cli = Cli::try_parse_from(["xtask", "test"]).unwrap();
        assert!(matches!(cli.command, Cmd::Test { cargo_test_args } if cargo_test_args.is_empty()));
        assert!(Cli::try_parse_from(["xtask", "test", "relay"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "netns", "up", "--nodes", "4"]).is_ok());
        assert!(Cli::try_parse_from(["xtask", "demo"]).is_ok());
        assert!(Cli::try_parse_from(["xtask", "bench", "relay", "--seconds", "2"]).is_ok());
        assert!(
            Cli::try_parse_from([
                "xtask",
                "bench",
                "failover",
                "--runs",
                "3",
                "--bin-dir",
                "/a",
                "--bin-dir",
                "/b"
            ])
            .is_ok()
        );
        assert!(Cli::try_parse_from(["xtask", "bench", "nonsense"]).is_err());
        assert!(matches!(
            Cli::try_parse_from(["xtask", "fuzz", "header", "--time", "5"]).unwrap().command,
            Cmd::Fuzz { target: Some(t), list: false, time: 5 } if t == "header"
        ));
        assert!(matches!(
            Cli::try_parse_from(["xtask", "fuzz"]).unwrap().command,
            Cmd::Fuzz { target: None, .. }
        ));
        assert!(matches!(
            Cli::try_parse_from(["xtask", "fuzz", "--list"])
                .unwrap()
                .command,
            Cmd::Fuzz { list: true, .. }
        ));
    }
}
