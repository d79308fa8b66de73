//! Keeps timing-sensitive tests from sharing the CPU with other agent-heavy tests.
//!
//! `cargo test` runs the tests of one binary in parallel threads (binaries one after
//! another). On a 2-core CI machine, a test that measures how long something takes
//! (a failover outage, a recovery time) would otherwise measure whatever else the other
//! threads' agents are doing at the time.
//!
//! So the process has one reader–writer lock:
//! - every [`AgentProcess`](crate::agent::AgentProcess) holds it *shared* while it runs
//!   (taken in `start`, released on drop), so tests that run agents overlap freely;
//! - a timing-sensitive test takes it *exclusively* with [`exclusive`] before it starts
//!   its agents: it waits until no other test of the binary has an agent running, and
//!   no other test can start one until the guard is dropped. Its own agents do not wait
//!   (the thread that holds the exclusive guard is let through).
//!
//! Waiting exclusive tests go first: once one waits, new shared holders wait behind it
//! (a thread that already holds the lock shared is let through, so a test starting its
//! second agent cannot deadlock against a waiting exclusive one). Every wait is bounded
//! by [`MAX_WAIT`].
//!
//! The lock is per process: it orders the tests of one binary, which is what `cargo test`
//! runs concurrently. A runner that starts one process per test (nextest) needs its own
//! grouping (e.g. a `test-group` with `max-threads = 1` for these tests).

use std::{
    cell::Cell,
    sync::{Condvar, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

/// Longest wait for the lock, either way: longer than any test binary runs in CI.
pub const MAX_WAIT: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, Default)]
struct State {
    /// Shared holds (agents running), whatever thread took them.
    shared: usize,
    /// Whether an exclusive guard is held.
    exclusive: bool,
    /// Exclusive guards waiting; while any waits, new shared holders queue behind.
    exclusive_waiting: usize,
}

static STATE: Mutex<State> = Mutex::new(State {
    shared: 0,
    exclusive: false,
    exclusive_waiting: 0,
});
static CHANGED: Condvar = Condvar::new();

thread_local! {
    /// Shared holds taken by this thread (so a second one never waits).
    static SHARED_HERE: Cell<usize> = const { Cell::new(0) };
    /// Whether this thread holds the exclusive guard.
    static EXCLUSIVE_HERE: Cell<bool> = const { Cell::new(false) };
}

fn state() -> MutexGuard<'static, State> {
    // A test that panicked while holding the mutex left the counters consistent (every
    // change is one statement), so poisoning carries no meaning here.
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits on [`CHANGED`] until `ready`, at most until `deadline`.
fn wait_until(
    mut guard: MutexGuard<'static, State>,
    deadline: Instant,
    ready: impl Fn(&State) -> bool,
) -> Option<MutexGuard<'static, State>> {
    while !ready(&guard) {
        let left = deadline.checked_duration_since(Instant::now())?;
        guard = CHANGED
            .wait_timeout(guard, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    Some(guard)
}

/// Held by a timing-sensitive test while it runs: no other test of this process has an
/// agent running meanwhile.
#[derive(Debug)]
#[must_use = "the test runs alone only while the guard lives"]
pub struct Exclusive {
    _not_send: std::marker::PhantomData<*const ()>,
}

/// Takes the lock exclusively: waits (at most [`MAX_WAIT`]) until no other test runs an
/// agent. Call it first thing in a test that measures time.
pub fn exclusive() -> Result<Exclusive> {
    if EXCLUSIVE_HERE.get() {
        bail!("this thread already holds the exclusive timing lock");
    }
    if SHARED_HERE.get() > 0 {
        bail!("take the exclusive timing lock before starting agents, not after");
    }
    let deadline = Instant::now() + MAX_WAIT;
    let mut s = state();
    s.exclusive_waiting += 1;
    let Some(mut s) = wait_until(s, deadline, |s| !s.exclusive && s.shared == 0) else {
        let mut s = state();
        s.exclusive_waiting -= 1;
        CHANGED.notify_all();
        bail!("waited {MAX_WAIT:?} for the other tests' agents to stop");
    };
    s.exclusive_waiting -= 1;
    s.exclusive = true;
    EXCLUSIVE_HERE.set(true);
    Ok(Exclusive {
        _not_send: std::marker::PhantomData,
    })
}

impl Drop for Exclusive {
    fn drop(&mut self) {
        state().exclusive = false;
        EXCLUSIVE_HERE.set(false);
        CHANGED.notify_all();
    }
}

/// A shared hold on the lock, kept by a running agent.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Whether this hold counts in [`State::shared`] (not when the starting thread holds
    /// the exclusive guard: the test's own agents never wait for it).
    counted: bool,
}

/// Takes the lock shared (at most [`MAX_WAIT`]): waits while a timing-sensitive test
/// runs or waits, unless this thread already holds the lock.
pub(crate) fn shared() -> Result<Shared> {
    if EXCLUSIVE_HERE.get() {
        return Ok(Shared { counted: false });
    }
    let deadline = Instant::now() + MAX_WAIT;
    let s = state();
    let reentrant = SHARED_HERE.get() > 0;
    let Some(mut s) = wait_until(s, deadline, |s| {
        !s.exclusive && (reentrant || s.exclusive_waiting == 0)
    }) else {
        bail!("waited {MAX_WAIT:?} for a timing-sensitive test to finish");
    };
    s.shared += 1;
    SHARED_HERE.set(SHARED_HERE.get() + 1);
    Ok(Shared { counted: true })
}

impl Drop for Shared {
    fn drop(&mut self) {
        if !self.counted {
            return;
        }
        state().shared -= 1;
        // The hold may be dropped on another thread than the one that took it; the
        // per-thread count is only a hint against self-deadlock, so saturate.
        SHARED_HERE.set(SHARED_HERE.get().saturating_sub(1));
        CHANGED.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

    // One test for the whole module: the lock is process-wide, so separate tests would
    // run concurrently and see each other's holds.
    #[test]
    fn exclusive_waits_for_shared_and_shared_waits_for_exclusive() {
        let first = shared().unwrap();
        // The holder's own second hold never waits.
        let second = shared().unwrap();
        assert!(exclusive().is_err(), "exclusive after shared on one thread");

        let got = Arc::new(AtomicBool::new(false));
        let released = Arc::new(Mutex::new(None::<Instant>));
        let (got_in, released_in) = (got.clone(), released.clone());
        let waiter = std::thread::spawn(move || {
            let guard = exclusive().unwrap();
            got_in.store(true, Ordering::SeqCst);
            // Agents the exclusive test starts itself do not wait.
            let own = shared().unwrap();
            drop(own);
            std::thread::sleep(Duration::from_millis(100));
            *released_in.lock().unwrap() = Some(Instant::now());
            drop(guard);
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !got.load(Ordering::SeqCst),
            "exclusive waits for shared holders"
        );
        // A waiting exclusive test goes before new shared holders of other threads...
        let blocked = std::thread::spawn(|| {
            let hold = shared().unwrap();
            let acquired = Instant::now();
            drop(hold);
            acquired
        });
        std::thread::sleep(Duration::from_millis(50));
        // ...but a thread that already holds it is let through (no deadlock).
        drop(shared().unwrap());
        drop(first);
        drop(second);
        waiter.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
        let acquired = blocked.join().unwrap();
        let released = released
            .lock()
            .unwrap()
            .expect("the exclusive guard was released");
        assert!(
            acquired >= released,
            "the new shared holder got the lock only after the exclusive test released it"
        );
    }
}
