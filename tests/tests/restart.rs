//! Proof that a restarted relay keeps its links, in namespaces, with default timers, in
//! the diamond (`myconet_testbed::diamond`):
//!
//! ```text
//!   a ── b ── d
//!   │         │
//!   └─── c ───┘
//! ```
//!
//! Every node names its neighbours with `--peer`. b is killed (SIGKILL) and restarted
//! with the same state directory (same identity), then c is stopped cleanly (SIGTERM)
//! and restarted. After each restart every link is up again on both ends within a few
//! hello intervals. Then every link stays up, without a flap, for one 60 s window shared
//! by all the checks: longer than every session-table timer that used to take a link
//! down after a double handshake (the 15 s grace of a replaced session, the 15 s wait for
//! an unconfirmed one, the 31 s of handshake retransmissions), while a ping stream a ⇄ d
//! crosses it without losing a probe. Finally the relay carrying the stream is killed and
//! the stream moves to the other, restarted, relay.
//!
//! Runs as root (CI is root): four namespaces, four agents, XDP on every link. Takes
//! about 75 s, most of it the window; it needs no exclusive CPU (its bounds are
//! generous), so other tests run beside it.

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use myconet_testbed::{
    agent::{Stop, bin_dir},
    diamond::{B, C, Diamond},
};

/// The agent's default hello interval.
const HELLO: Duration = Duration::from_secs(1);
/// "Within a few hello intervals": how long after a restarted agent answers `status`
/// every link must be up again on both ends.
const RELINK_BOUND: Duration = Duration::from_secs(5);
/// How long every link must then stay up.
const WINDOW: Duration = Duration::from_secs(60);

#[test]
fn restarted_relays_keep_their_links_and_take_the_traffic_back() -> Result<()> {
    let mut diamond = Diamond::start("restart", &bin_dir()?, &[])?;
    let result = scenario(&mut diamond);
    if result.is_err() {
        eprintln!("{}", diamond.dump());
    }
    result
}

fn scenario(diamond: &mut Diamond) -> Result<()> {
    diamond.wait_routes()?;

    // Restart each relay in turn: every link is back within a few hello intervals.
    let across = diamond.ping_stream()?;
    thread::sleep(Duration::from_secs(1));
    for (relay, how) in [(B, Stop::Kill), (C, Stop::Term)] {
        let netns = diamond.topo.node(relay).netns();
        let name = diamond.topo.node(relay).name().to_string();
        let stopped = Instant::now();
        diamond.agents[relay]
            .as_mut()
            .context("relay running")?
            .restart(netns, how)?;
        let restarted = Instant::now();
        eprintln!(
            "{name} stopped ({how:?}) and answering again after {:?}",
            restarted - stopped
        );
        diamond.wait_all_up(RELINK_BOUND).with_context(|| {
            format!(
                "links not all up {RELINK_BOUND:?} ({} hello intervals) after {name} restarted ({how:?})",
                RELINK_BOUND.as_secs_f64() / HELLO.as_secs_f64(),
            )
        })?;
        eprintln!(
            "{name} restarted ({how:?}): every link up {:?} after it answered",
            restarted.elapsed()
        );
    }
    diamond.wait_routes()?;
    eprintln!("across the restarts: {}", across.finish()?.summary());

    // The window: every link stays up, and the ping stream loses nothing.
    let window = diamond.ping_stream()?;
    let started = Instant::now();
    while started.elapsed() < WINDOW {
        thread::sleep(Duration::from_secs(1));
        let (down, _) = diamond.link_state()?;
        ensure!(
            down.is_empty(),
            "{:?} into the window a link went down: {down:?}",
            started.elapsed()
        );
    }
    let (down, youngest) = diamond.link_state()?;
    ensure!(
        down.is_empty() && youngest >= WINDOW,
        "every link end has been up for the whole {WINDOW:?} window (youngest {youngest:?}; down: {down:?})"
    );
    let report = window.finish()?;
    eprintln!("window: {}", report.summary());
    ensure!(
        report.lost() == 0 && report.sent_count() > 0,
        "the ping stream a ⇄ d lost probes while every link was up: {}; missing {:?}",
        report.summary(),
        report.missing()
    );

    // The relay that carries the stream dies: the stream moves to the other one.
    let failover = diamond.fail_active_relay(Duration::from_secs(2))?;
    let (killed, survivor) = (
        diamond.topo.node(failover.killed).name(),
        diamond.topo.node(failover.survivor).name(),
    );
    eprintln!(
        "{killed} killed, stream moved to {survivor}: {}",
        failover.report.summary()
    );
    ensure!(
        failover.report.flows_at_end(Duration::from_secs(1)),
        "the stream flows again through {survivor}: {}",
        failover.report.summary()
    );
    ensure!(
        failover.survivor_relayed > 0,
        "{survivor} (restarted) relays the stream in XDP after {killed} died"
    );
    Ok(())
}
