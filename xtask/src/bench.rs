//! `cargo xtask bench relay`: the XDP relay's packets per second in the a — b — c
//! topology, next to the kernel's own per-packet cost of the program
//! (BPF_PROG_TEST_RUN `repeat`), in one run, printed as a table and saved as JSON
//! under `target/bench/` so runs can be compared.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::{Context, Result, bail};
use myconet_testbed::bench::{self, RelayRun};

use crate::cmd;

/// Datagram sizes (Myconet header + payload) the topology run offers.
const SIZES: [usize; 3] = [112, 512, 1400];

struct TestRunRow {
    case: String,
    action: u64,
    ns: f64,
}

/// Runs the relay benchmark with release binaries.
pub fn relay(root: &Path, seconds: u64) -> Result<()> {
    let target = cmd::target_dir(root)?;
    let bin_dir = target.join("release");

    println!("==> BPF_PROG_TEST_RUN: per-packet cost of the XDP program by verdict");
    let mut test_run = Vec::new();
    let mut bench_cmd = cmd::cargo(root);
    bench_cmd.args(["bench", "-p", "myconet-agent", "--bench", "xdp_test_run"]);
    cmd::run_streaming(&mut bench_cmd, |line| {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            test_run.push(TestRunRow {
                case: v["case"].as_str().unwrap_or("?").to_string(),
                action: v["action"].as_u64().unwrap_or(0),
                ns: v["ns_per_packet"].as_f64().unwrap_or(f64::NAN),
            });
        }
    })?;
    if test_run.is_empty() {
        bail!("the xdp_test_run bench printed no results");
    }
    for row in &test_run {
        let want = match row.case.split('@').next().unwrap_or_default() {
            "relay_xdp_tx" => 3,
            "relay_redirect"
            | "relay_redirect_fib_src"
            | "relay_redirect_partial_csum"
            | "partial_csum_completion" => 4,
            "pass_local" => 2,
            _ => 1,
        };
        if row.action != want {
            bail!(
                "bench case {} ended with XDP action {} (want {want}): the fixture no longer exercises that path",
                row.case,
                row.action
            );
        }
    }

    println!("==> topology: generator in a, XDP relay in b, sink in c ({seconds} s per size)");
    let runs = bench::relay(&bin_dir, "driver", &SIZES, Duration::from_secs(seconds))?;

    let report = render(&test_run, &runs);
    println!("\n{report}");
    let dir = target.join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::json!({
        // `program_only_ceiling_mpps`: 1 ÷ ns_per_packet on one core with a cache-hot
        // frame and no receive or transmit work; an upper bound, not a relay rate.
        "test_run": test_run.iter().map(|r| serde_json::json!({
            "case": r.case, "action": r.action, "ns_per_packet": r.ns,
            "program_only_ceiling_mpps": 1e3 / r.ns,
        })).collect::<Vec<_>>(),
        "topology": runs.iter().map(|r| serde_json::json!({
            "datagram_bytes": r.datagram_bytes, "seconds": r.seconds, "offered": r.offered,
            "relayed_xdp": r.relayed_xdp, "relay_agent_rx": r.relay_agent_rx, "delivered": r.delivered,
            "relayed_pps": r.relayed_pps(),
        })).collect::<Vec<_>>(),
    });
    let path = dir.join("relay.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("saved {}", path.display());
    Ok(())
}

fn render(test_run: &[TestRunRow], runs: &[RelayRun]) -> String {
    let mut s = String::new();
    let relay_ns = test_run
        .iter()
        .find(|r| r.case == "relay_redirect")
        .map(|r| r.ns)
        .unwrap_or(f64::NAN);
    let _ = writeln!(
        s,
        "XDP program cost (kernel-measured, BPF_PROG_TEST_RUN repeat)"
    );
    let _ = writeln!(
        s,
        "  {:<20} {:>12} {:>22} {:>14}",
        "case", "ns/packet", "program-only ceiling", "vs redirect"
    );
    for r in test_run {
        let _ = writeln!(
            s,
            "  {:<20} {:>12.1} {:>17.2} Mpps {:>13.2}x",
            r.case,
            r.ns,
            1e3 / r.ns,
            r.ns / relay_ns
        );
    }
    let _ = writeln!(
        s,
        "  program-only ceiling: 1 ÷ ns/packet, one core running nothing but the program on a \
         cache-hot frame (test_run repeats it); no receive, copy, redirect or transmit. Not a \
         relay rate: the topology rows below are."
    );
    let _ = writeln!(
        s,
        "\nRelay in the a — b — c topology (driver-mode XDP on veth; generator, relay and sink share 2 cores)"
    );
    let _ = writeln!(
        s,
        "  {:>8} {:>12} {:>12} {:>10} {:>10} {:>12} {:>10} {:>14}",
        "bytes",
        "offered pps",
        "relayed pps",
        "relayed %",
        "Gbit/s",
        "b agent rx",
        "c got %",
        "ns/pkt (wall)"
    );
    for r in runs {
        let _ = writeln!(
            s,
            "  {:>8} {:>12.0} {:>12.0} {:>9.1}% {:>10.2} {:>12} {:>9.1}% {:>14.1}",
            r.datagram_bytes,
            r.offered_pps(),
            r.relayed_pps(),
            100.0 * r.relayed_xdp as f64 / r.offered.max(1) as f64,
            r.relayed_bps() / 1e9,
            r.relay_agent_rx,
            100.0 * r.delivered as f64 / r.relayed_xdp.max(1) as f64,
            1e9 / r.relayed_pps(),
        );
    }
    let _ = writeln!(
        s,
        "\n  ns/pkt (wall) is the whole chain's wall-clock cost per relayed packet (sender syscalls, two veth hops, the relay, the sink);\n  the XDP program's own share is the redirect row above."
    );
    s
}
