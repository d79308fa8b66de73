//! Runs the routing simulator at scale and prints (optionally saves as JSON) the report:
//! convergence times, message rates, memory per route, loop and reachability checks.
//!
//! `cargo run --release --example routing_sim -p myconet-core --features sim -- --nodes 10000 --topology scale-free --seed 1`

use std::time::Duration;

use clap::{Parser, ValueEnum};
use myconet_core::routing::sim::{Scenario, SimConfig, TableFill, Topology};
use myconet_core::routing::{Admission, RoutingConfig};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AttackAdmission {
    SelfAdmitted,
    Configured,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Shape {
    Random,
    ScaleFree,
}

/// Deterministic discrete-event simulation of the Myconet routing core.
#[derive(Debug, Parser)]
struct Args {
    /// Number of nodes.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Topology.
    #[arg(long, value_enum, default_value_t = Shape::ScaleFree)]
    topology: Shape,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Average degree (random topology).
    #[arg(long, default_value_t = 5.0)]
    degree: f64,
    /// Links per new node (scale-free topology).
    #[arg(long, default_value_t = 2)]
    m: usize,
    /// Failure/recovery rounds.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Links failed per round (default: nodes / 50).
    #[arg(long)]
    link_failures: Option<usize>,
    /// Nodes failed per round (default: nodes / 200).
    #[arg(long)]
    node_failures: Option<usize>,
    /// Seconds of steady state to measure periodic-update traffic (0: skip).
    #[arg(long, default_value_t = 35)]
    steady_secs: u64,
    /// Loss probability of each routing payload.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Most candidate routes kept per prefix (default: the router's default).
    #[arg(long)]
    max_candidates: Option<u8>,
    /// Repeats of urgent triggered updates (default: the router's default).
    #[arg(long)]
    urgent_repeats: Option<u8>,
    /// Most pending requests and queued replies per node (default: the router's
    /// default).
    #[arg(long)]
    max_pending_requests: Option<usize>,
    /// Skip the all-pairs checks after each phase (O(N²)).
    #[arg(long)]
    no_check: bool,
    /// Table-fill attack (adversarial finding 4): after cold start a host nobody
    /// configured attaches to the node with the most links and announces this many
    /// validly signed prefixes of keys it made, for the rest of the run (0: none).
    #[arg(long, default_value_t = 0)]
    attack_junk: usize,
    /// What the attacked node takes the attacker for: `self-admitted` (what the agent
    /// makes of a discovered or inbound neighbour) or `configured` (how every neighbour
    /// was treated before self-admitted ones were limited).
    #[arg(long, value_enum, default_value_t = AttackAdmission::SelfAdmitted)]
    attack_admission: AttackAdmission,
    /// Most prefixes a node holds (default: the router's default).
    #[arg(long)]
    max_routes: Option<usize>,
    /// Write the report as JSON to this path.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let topology = match a.topology {
        Shape::Random => Topology::Random {
            avg_degree: a.degree,
        },
        Shape::ScaleFree => Topology::ScaleFree { m: a.m },
    };
    let scenario = Scenario {
        sim: SimConfig {
            nodes: a.nodes,
            topology,
            seed: a.seed,
            loss: a.loss,
            routing: RoutingConfig {
                max_candidates: a
                    .max_candidates
                    .unwrap_or(RoutingConfig::default().max_candidates),
                urgent_repeats: a
                    .urgent_repeats
                    .unwrap_or(RoutingConfig::default().urgent_repeats),
                max_pending_requests: a
                    .max_pending_requests
                    .unwrap_or(RoutingConfig::default().max_pending_requests),
                max_routes: a.max_routes.unwrap_or(RoutingConfig::default().max_routes),
                ..SimConfig::default().routing
            },
            loop_sample_destinations: 2,
            loop_sample_interval: Duration::from_millis(250),
            ..SimConfig::default()
        },
        rounds: a.rounds,
        link_failures: a.link_failures.unwrap_or(a.nodes / 50),
        node_failures: a.node_failures.unwrap_or(a.nodes / 200),
        quiet: Duration::from_secs(3),
        max_phase: Duration::from_secs(120),
        steady_window: Duration::from_secs(a.steady_secs),
        full_checks: !a.no_check,
        table_fill: (a.attack_junk > 0).then_some(TableFill {
            junk: a.attack_junk,
            admission: match a.attack_admission {
                AttackAdmission::SelfAdmitted => Admission::SelfAdmitted,
                AttackAdmission::Configured => Admission::Configured,
            },
        }),
    };
    let report = scenario.run();
    println!("{report}");
    if let Some(p) = a.json {
        std::fs::write(&p, report.to_json() + "\n")?;
        println!("report written to {}", p.display());
    }
    if !report.ok() {
        anyhow::bail!("simulation found problems");
    }
    Ok(())
}
