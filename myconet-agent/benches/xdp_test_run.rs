//! Per-packet cost of the XDP program by verdict, measured by the kernel with
//! BPF_PROG_TEST_RUN `repeat` (run by `cargo xtask bench relay`; needs root).
//!
//! Prints one JSON object per line: `{"case": …, "action": …, "ns_per_packet": …}`.
//!
//! Relayed frames are rewritten in place, and `repeat` runs the program on the same
//! buffer again, so the relay cases are built to stay relayable: the next hop's port is
//! the Myconet port and the relay's own addresses are peers, so every repetition takes
//! the full forward path. The hop limit still decrements once per repetition, which
//! bounds `repeat` for those cases to [`RELAY_REPEAT`]; the result is averaged over many
//! such batches, each starting from a fresh copy of the frame, and the fixed per-call
//! cost is separated out by measuring at two repeat counts (the raw figure is printed
//! too, as `<case>@<repeat>_raw`). A frame with a partial checksum (as a sender on a
//! stock veth leaves it) is partial only until the first repetition completes it, so
//! that cost is measured one packet per call next to the same frame with a full
//! checksum (`partial_csum_completion`, the difference of the two `@1_raw` figures).

use std::{net::Ipv6Addr, time::Duration};

use myconet_agent::os::dataplane::{XdpDataplane, ifindex};
use myconet_common::{
    maps::{LocalAddrKey, PeerKey},
    wire::{PacketType, Repr},
};
use myconet_core::rib::{NextHop, RouteTarget};
use myconet_testbed::{
    fixture::{PEER_MAC, V0_MAC, fib_namespace},
    packet,
};

const PORT: u16 = 9651;
/// Repetitions per batch for relay cases (hop limit 64 allows up to 63; relays clamp
/// larger ones to 64).
const RELAY_REPEAT: u32 = 60;
/// Repetitions per batch for verdicts that leave the frame unchanged.
const STATIC_REPEAT: u32 = 100_000;

fn a(s: &str) -> Ipv6Addr {
    s.parse().expect("literal address")
}

fn frame(dst: &str, sport: u16, hop_limit: u8) -> Vec<u8> {
    let repr = Repr {
        packet_type: PacketType::Data,
        hop_limit,
        flags: 0,
        session_id: 1,
        counter: 1,
        dst_addr: a(dst),
        src_addr: a("fd6d:a::1"),
    };
    packet::frame(
        PEER_MAC,
        V0_MAC,
        a("fd00:1::2"),
        a("fd00:1::1"),
        sport,
        PORT,
        &repr,
        &[0x5a; 1200],
    )
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; any other argument selects nothing here.
    let batches: u32 = std::env::var("MYCONET_BENCH_BATCHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    // Repetitions per call for the relay cases (at most RELAY_REPEAT): per-call cold-start
    // cost is amortised over them, so comparisons must use the same value.
    let relay_repeat: u32 = std::env::var("MYCONET_BENCH_RELAY_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(RELAY_REPEAT, |r: u32| r.clamp(1, RELAY_REPEAT));
    let ns = fib_namespace()?;
    let results = ns.run_in(move || -> anyhow::Result<Vec<(String, u32, f64)>> {
        let relay_repeat = relay_repeat;
        let mut dp = XdpDataplane::load(PORT)?;
        let v0 = ifindex("v0")?;
        dp.allow_redirect(v0)?;
        dp.allow_redirect(ifindex("v2")?)?;
        let fwd = |addr: &str, src: Option<&str>| {
            RouteTarget::Forward(NextHop {
                addr: a(addr),
                port: PORT,
                ifindex: 0,
            })
            .to_map_value_with_src(src.map(a))
        };
        dp.set_route(a("fd6d:b::"), 64, RouteTarget::Local.to_map_value())?;
        // The agent's routes carry the resolved source address ...
        dp.set_route(a("fd6d:c::"), 64, fwd("fd00:1::2", Some("fd00:1::1")))?;
        dp.set_route(a("fd6d:d::"), 64, fwd("fd00:2::2", Some("fd00:2::1")))?;
        // ... and this one makes the program ask the FIB for it, for comparison.
        dp.set_route(a("fd6d:e::"), 64, fwd("fd00:2::2", None))?;
        for peer in ["fd00:1::2", "fd00:1::1", "fd00:2::1"] {
            dp.add_peer(PeerKey::new(a(peer).octets(), PORT, 0))?;
        }
        // Relayed frames are sent on to the next hop's address; counting the next hops
        // as local keeps every repetition relayable.
        let local: std::collections::BTreeSet<LocalAddrKey> =
            ["fd00:1::1", "fd00:1::2", "fd00:2::1", "fd00:2::2"]
                .iter()
                .map(|addr| LocalAddrKey::new(a(addr).octets(), 0))
                .collect();
        dp.sync_local_addrs(&local)?;
        let cases: [(&str, Vec<u8>, u32); 6] = [
            ("relay_xdp_tx", frame("fd6d:c::1", PORT, 64), RELAY_REPEAT),
            ("relay_redirect", frame("fd6d:d::1", PORT, 64), RELAY_REPEAT),
            (
                "relay_redirect_fib_src",
                frame("fd6d:e::1", PORT, 64),
                RELAY_REPEAT,
            ),
            ("pass_local", frame("fd6d:b::1", PORT, 64), STATIC_REPEAT),
            (
                "drop_unknown_peer",
                frame("fd6d:c::1", 4444, 64),
                STATIC_REPEAT,
            ),
            ("drop_no_route", frame("fd6d:9::1", PORT, 64), STATIC_REPEAT),
        ];
        let mut out = Vec::new();
        // Average kernel-measured ns/packet over `runs` calls of `repeat` repetitions.
        let measure = |f: &[u8], repeat: u32, runs: u32| -> anyhow::Result<(u32, f64)> {
            let mut total = Duration::ZERO;
            let mut action = 0;
            for _ in 0..runs {
                let r = dp.test_run(f, v0, repeat)?;
                total += r.duration;
                action = r.action;
            }
            Ok((action, total.as_nanos() as f64 / f64::from(runs)))
        };
        // A frame as a sender on a stock veth leaves it (partial checksum) stays partial
        // only for the first repetition: the program completes it. So it is measured
        // one packet per call, beside the same frame with a full checksum measured the
        // same way, alternating; the difference is the completion's cost per packet.
        {
            let full = frame("fd6d:d::1", PORT, 64);
            let partial = packet::with_partial_checksum(full.clone());
            let (mut t_full, mut t_partial) = (Duration::ZERO, Duration::ZERO);
            let (mut a_full, mut a_partial) = (0, 0);
            for _ in 0..batches * 4 {
                let r = dp.test_run(&full, v0, 1)?;
                t_full += r.duration;
                a_full = r.action;
                let r = dp.test_run(&partial, v0, 1)?;
                t_partial += r.duration;
                a_partial = r.action;
            }
            let n = f64::from(batches * 4);
            let (full_ns, partial_ns) = (
                t_full.as_nanos() as f64 / n,
                t_partial.as_nanos() as f64 / n,
            );
            out.push(("relay_redirect@1_raw".to_string(), a_full, full_ns));
            out.push((
                "relay_redirect_partial_csum@1_raw".to_string(),
                a_partial,
                partial_ns,
            ));
            out.push((
                "partial_csum_completion".to_string(),
                a_partial,
                partial_ns - full_ns,
            ));
        }
        for (name, f, repeat) in cases {
            // Every BPF_PROG_TEST_RUN call waits for an RCU grace period (XDP dispatcher
            // update), so fewer, longer calls keep the benchmark quick.
            if repeat != RELAY_REPEAT {
                let (action, ns) = measure(&f, repeat, 10)?;
                out.push((name.to_string(), action, ns));
                continue;
            }
            // Relay cases can repeat at most ~60 times per call (the hop limit runs out),
            // too few to hide each call's fixed cold-start cost (a few µs). Measuring at two
            // repeat counts separates the two: t(r) = per_packet + per_call / r.
            let (action, hi) = measure(&f, relay_repeat, batches)?;
            let lo_repeat = (relay_repeat / 3).max(1);
            let (_, lo) = measure(&f, lo_repeat, batches)?;
            let (rh, rl) = (f64::from(relay_repeat), f64::from(lo_repeat));
            let per_packet = if relay_repeat > lo_repeat {
                (hi * rh - lo * rl) / (rh - rl)
            } else {
                hi
            };
            out.push((name.to_string(), action, per_packet));
            out.push((format!("{name}@{relay_repeat}_raw"), action, hi));
        }
        Ok(out)
    })??;
    for (case, action, ns) in results {
        println!("{{\"case\": \"{case}\", \"action\": {action}, \"ns_per_packet\": {ns:.1}}}");
    }
    Ok(())
}
