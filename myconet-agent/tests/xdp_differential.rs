//! The XDP program against the userspace decision, on the same frames: every verdict,
//! counter and rewritten byte BPF_PROG_TEST_RUN reports must be what `forward::decide`
//! (over a RIB and peer set holding exactly what the program's maps hold) and the
//! agent's header parser say (the harness is `support/xdp_differential.rs`, shared with
//! the `xdp` fuzz target). Frames: one per verdict, from both interfaces, then every
//! one of them with each header byte changed and cut at every length. Needs root.

#[path = "support/xdp_differential.rs"]
mod differential;

use differential::{Harness, MAX_FRAME, base_frames};
use myconet_testbed::fixture::fib_namespace;

/// The first differences, and how many frames disagreed.
fn check_all(h: &Harness, frames: &[(String, Vec<u8>, u32)]) -> Result<usize, String> {
    let mut failures = Vec::new();
    for (name, frame, ingress) in frames {
        if let Err(diff) = h.check(frame, *ingress) {
            failures.push(format!("{name}: {diff}"));
        }
    }
    if failures.is_empty() {
        Ok(frames.len())
    } else {
        Err(format!(
            "{} of {} frames: XDP and the userspace decision disagree; first:\n{}",
            failures.len(),
            frames.len(),
            failures[..failures.len().min(5)].join("\n")
        ))
    }
}

#[test]
fn xdp_verdicts_match_the_userspace_decision() {
    let ns = fib_namespace().expect("fixture namespace");
    ns.run_in(|| {
        let h = Harness::new().expect("load XDP program (root needed)");
        let bases = base_frames();
        let mut frames = Vec::new();
        for (name, frame) in &bases {
            for ingress in h.ifaces {
                // Twice: the second may come from the forwarding cache.
                for round in 0..2 {
                    frames.push((
                        format!("{name} on {ingress} #{round}"),
                        frame.clone(),
                        ingress,
                    ));
                }
            }
        }
        // Every byte of the Ethernet, IPv6, UDP and Myconet headers changed four ways,
        // and every cut from the Ethernet header on.
        let v0 = h.ifaces[0];
        for (name, frame) in &bases {
            for i in 0..frame.len().min(14 + 40 + 8 + 48) {
                for value in [frame[i] ^ 0x01, frame[i] ^ 0x80, 0x00, 0xff] {
                    let mut f = frame.clone();
                    f[i] = value;
                    frames.push((format!("{name} byte {i} = {value:#04x}"), f, v0));
                }
            }
            for cut in 14..frame.len() {
                frames.push((format!("{name} cut at {cut}"), frame[..cut].to_vec(), v0));
            }
        }
        let checked = check_all(&h, &frames).unwrap_or_else(|e| panic!("{e}"));
        assert!(checked > 10_000, "only {checked} frames checked");
    })
    .expect("run in namespace");
}

/// The check can fail: when the program's maps and the model disagree (a neighbour
/// revoked in the kernel only), the frames it relayed before are reported.
#[test]
fn the_differential_check_reports_a_disagreement() {
    let ns = fib_namespace().expect("fixture namespace");
    ns.run_in(|| {
        let mut h = Harness::new().expect("load XDP program (root needed)");
        let (_, tx) = base_frames()
            .into_iter()
            .find(|(n, _)| *n == "tx")
            .expect("tx frame");
        assert!(tx.len() <= MAX_FRAME);
        h.check(&tx, h.ifaces[0]).expect("in agreement");
        let peer = myconet_common::maps::PeerKey::new(
            "fd00:1::2".parse::<std::net::Ipv6Addr>().unwrap().octets(),
            differential::PORT,
            0,
        );
        assert!(h.dataplane_mut().remove_peer(peer).unwrap());
        let diff = h
            .check(&tx, h.ifaces[0])
            .expect_err("the program now drops it");
        assert!(diff.contains("DropUnknownPeer"), "{diff}");
        assert!(diff.contains("action 1, expected 3"), "{diff}");
    })
    .expect("run in namespace");
}
