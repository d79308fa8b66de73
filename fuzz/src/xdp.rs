//! Frames through the loaded XDP program (BPF_PROG_TEST_RUN), each verdict checked
//! against the userspace decision (`forward::decide`) by the differential harness the
//! agent's test suite shares (`myconet-agent/tests/support/xdp_differential.rs`).
//!
//! Input layout: one byte whose lowest bit picks the ingress interface (v0 or v2),
//! then the frame (cut to the MTU). Every frame runs twice: the second run may be
//! served from the program's per-CPU forwarding cache, which must not change the
//! answer. Needs root: the first input creates the fixture namespace, moves this thread
//! into it and deletes its name, so the namespace vanishes with the process however it
//! ends.

use std::{fs::File, os::fd::AsRawFd, sync::OnceLock};

#[path = "../../myconet-agent/tests/support/xdp_differential.rs"]
pub mod differential;

use differential::{Harness, MAX_FRAME};

struct Shared(Harness);

// SAFETY: the harness is only ever used from the thread that created it (libFuzzer calls
// the target from its main thread; the replay tests call it from one test thread), which
// is also the only thread in the fixture namespace. `Sync` is needed only to keep it in a
// static.
unsafe impl Sync for Shared {}
// SAFETY: see above.
unsafe impl Send for Shared {}

static HARNESS: OnceLock<(std::thread::ThreadId, Shared)> = OnceLock::new();

/// Creates the fixture namespace, moves the calling thread into it for good, and loads
/// the program there.
pub fn enter_fixture() -> anyhow::Result<Harness> {
    let mut ns = myconet_testbed::fixture::fib_namespace()?;
    let path = std::path::Path::new(myconet_testbed::netns::NETNS_RUN_DIR).join(ns.name());
    let handle = File::open(&path)?;
    // SAFETY: setns changes only the calling thread's network namespace; the fd is open.
    if unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // The thread keeps the namespace alive; without a name nothing is left behind.
    ns.delete()?;
    Harness::new()
}

fn harness() -> &'static Harness {
    let (owner, shared) = HARNESS.get_or_init(|| {
        let h = enter_fixture().expect("XDP fixture (needs root)");
        (std::thread::current().id(), Shared(h))
    });
    assert_eq!(
        *owner,
        std::thread::current().id(),
        "the XDP target runs on one thread only"
    );
    &shared.0
}

/// The fuzz target; see the module documentation.
pub fn run(data: &[u8]) {
    let Some((&sel, frame)) = data.split_first() else {
        return;
    };
    // The kernel refuses BPF_PROG_TEST_RUN for less than an Ethernet header.
    if frame.len() < 14 {
        return;
    }
    let frame = &frame[..frame.len().min(MAX_FRAME)];
    let h = harness();
    let ingress = h.ifaces[usize::from(sel & 1)];
    for round in 0..2 {
        if let Err(diff) = h.check(frame, ingress) {
            panic!("XDP and the userspace decision disagree (run {round}):\n{diff}");
        }
    }
}
