//! Linux capabilities: what the agent needs, checking for them before start-up claims
//! anything, and dropping every other one once set-up is done.
//!
//! What needs which (Linux 5.8 and later; before 5.8, CAP_SYS_ADMIN stands in for
//! CAP_BPF):
//!
//! | capability      | set-up                                                   | afterwards |
//! |-----------------|----------------------------------------------------------|------------|
//! | `CAP_NET_ADMIN` | creating and configuring the TUN device, attaching XDP, IPv6 sysctls | rtnetlink requests (`NTF_USE` refreshes of next hops), restoring the sysctls at exit |
//! | `CAP_BPF`       | loading the XDP program and creating its maps             | map updates (routes, peers) on kernels before 6.5, which check it on every `bpf(2)` call while unprivileged BPF is disabled |
//! | `CAP_PERFMON`   | lets the verifier skip Spectre v1 masking for the program  | no |
//! | `CAP_NET_BIND_SERVICE` | only for a port below 1024                         | no |
//!
//! Capabilities belong to threads, not processes, and the tokio runtime has several:
//! [`drop_to`] changes every thread of the process (each one applies the change
//! itself in a signal handler, as glibc does for `setuid`) and then reads every
//! thread's sets back from `/proc/self/task` to prove it.

use std::{
    fmt,
    sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// One capability, by its number in `<linux/capability.h>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap(u8);

/// Let the process change its bounding set (needed to drop from it).
pub const CAP_SETPCAP: Cap = Cap(8);
/// Bind ports below 1024.
pub const CAP_NET_BIND_SERVICE: Cap = Cap(10);
/// Network configuration: TUN, XDP attach, rtnetlink changes, net sysctls.
pub const CAP_NET_ADMIN: Cap = Cap(12);
/// Raw and packet sockets (the agent uses none).
pub const CAP_NET_RAW: Cap = Cap(13);
/// Everything else; BPF before Linux 5.8.
pub const CAP_SYS_ADMIN: Cap = Cap(21);
/// Performance monitoring; relaxes the BPF verifier's Spectre masking.
pub const CAP_PERFMON: Cap = Cap(38);
/// Loading BPF programs and creating maps.
pub const CAP_BPF: Cap = Cap(39);

const NAMES: &[(u8, &str)] = &[
    (0, "cap_chown"),
    (1, "cap_dac_override"),
    (2, "cap_dac_read_search"),
    (3, "cap_fowner"),
    (4, "cap_fsetid"),
    (5, "cap_kill"),
    (6, "cap_setgid"),
    (7, "cap_setuid"),
    (8, "cap_setpcap"),
    (9, "cap_linux_immutable"),
    (10, "cap_net_bind_service"),
    (11, "cap_net_broadcast"),
    (12, "cap_net_admin"),
    (13, "cap_net_raw"),
    (14, "cap_ipc_lock"),
    (15, "cap_ipc_owner"),
    (16, "cap_sys_module"),
    (17, "cap_sys_rawio"),
    (18, "cap_sys_chroot"),
    (19, "cap_sys_ptrace"),
    (20, "cap_sys_pacct"),
    (21, "cap_sys_admin"),
    (22, "cap_sys_boot"),
    (23, "cap_sys_nice"),
    (24, "cap_sys_resource"),
    (25, "cap_sys_time"),
    (26, "cap_sys_tty_config"),
    (27, "cap_mknod"),
    (28, "cap_lease"),
    (29, "cap_audit_write"),
    (30, "cap_audit_control"),
    (31, "cap_setfcap"),
    (32, "cap_mac_override"),
    (33, "cap_mac_admin"),
    (34, "cap_syslog"),
    (35, "cap_wake_alarm"),
    (36, "cap_block_suspend"),
    (37, "cap_audit_read"),
    (38, "cap_perfmon"),
    (39, "cap_bpf"),
    (40, "cap_checkpoint_restore"),
];

impl Cap {
    /// The name `capsh` and the man pages use, e.g. `cap_net_admin`.
    pub fn name(self) -> String {
        NAMES
            .iter()
            .find(|(n, _)| *n == self.0)
            .map_or_else(|| format!("cap_{}", self.0), |(_, s)| (*s).to_string())
    }

    fn bit(self) -> u64 {
        1 << self.0
    }
}

impl fmt::Display for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name().to_uppercase())
    }
}

/// A set of capabilities as the kernel's 64-bit mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapSet(pub u64);

impl CapSet {
    /// The set holding `caps`.
    pub fn of(caps: &[Cap]) -> Self {
        Self(caps.iter().fold(0, |m, c| m | c.bit()))
    }

    /// Whether `cap` is in the set.
    pub fn has(self, cap: Cap) -> bool {
        self.0 & cap.bit() != 0
    }

    /// The members, lowest number first.
    pub fn members(self) -> Vec<Cap> {
        (0..64u8)
            .map(Cap)
            .filter(|c| self.0 & c.bit() != 0)
            .collect()
    }
}

impl fmt::Display for CapSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("none");
        }
        let names: Vec<String> = self.members().iter().map(|c| c.name()).collect();
        f.write_str(&names.join(","))
    }
}

/// Why the capabilities could not be read or dropped.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    /// A system call failed.
    #[error("{call}: {source}")]
    Sys {
        /// What was called.
        call: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// Some thread still has capabilities it should not.
    #[error("thread {tid} still holds {held} after the drop (wanted at most {want})")]
    NotDropped {
        /// The thread.
        tid: u32,
        /// What `/proc` shows it holding.
        held: CapSet,
        /// What it should hold.
        want: CapSet,
    },
}

const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The calling thread's (effective, permitted) sets.
fn current() -> Result<(CapSet, CapSet), CapsError> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and a two-element data array, as capget(2) with version 3 expects.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(CapsError::Sys {
            call: "capget",
            source: std::io::Error::last_os_error(),
        });
    }
    let join = |lo: u32, hi: u32| CapSet(u64::from(lo) | (u64::from(hi) << 32));
    Ok((
        join(data[0].effective, data[1].effective),
        join(data[0].permitted, data[1].permitted),
    ))
}

/// The capabilities this thread can use now.
pub fn effective() -> CapSet {
    current().map(|(e, _)| e).unwrap_or_default()
}

// What every thread applies in `apply_in_this_thread`, set before the signals go out.
static TARGET: AtomicU64 = AtomicU64::new(0);
static LAST_CAP: AtomicU32 = AtomicU32::new(40);
static DROP_BOUNDING: AtomicBool = AtomicBool::new(false);
static ACKS: AtomicU32 = AtomicU32::new(0);
static FAILURES: AtomicU32 = AtomicU32::new(0);

/// Lowers the calling thread's sets to [`TARGET`]: bounding set (when allowed), ambient
/// set, then effective, permitted and inheritable. Only raw system calls and atomics:
/// it runs inside a signal handler.
fn apply_in_this_thread() -> bool {
    let target = TARGET.load(Ordering::SeqCst);
    let mut ok = true;
    if DROP_BOUNDING.load(Ordering::SeqCst) {
        for cap in 0..=LAST_CAP.load(Ordering::SeqCst).min(63) {
            if target & (1 << cap) == 0 {
                // SAFETY: prctl with integer arguments only.
                let rc = unsafe {
                    libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0)
                };
                ok &= rc == 0;
            }
        }
    }
    // SAFETY: prctl with integer arguments only. Fails harmlessly (EINVAL) on kernels
    // without ambient capabilities, which then have none to clear.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: target as u32,
            permitted: target as u32,
            inheritable: 0,
        },
        CapData {
            effective: (target >> 32) as u32,
            permitted: (target >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: header and two data elements as capset(2) with version 3 expects.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    ok && rc == 0
}

extern "C" fn on_signal(_: libc::c_int) {
    let saved = std::io::Error::last_os_error().raw_os_error();
    if !apply_in_this_thread() {
        FAILURES.fetch_add(1, Ordering::SeqCst);
    }
    ACKS.fetch_add(1, Ordering::SeqCst);
    // Restore errno for the interrupted code.
    if let Some(e) = saved {
        // SAFETY: errno location of this thread.
        unsafe { *libc::__errno_location() = e };
    }
}

/// The signal the other threads receive to drop their capabilities.
fn drop_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

fn thread_ids() -> Result<Vec<u32>, CapsError> {
    let sys = |source| CapsError::Sys {
        call: "reading /proc/self/task",
        source,
    };
    let mut tids = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").map_err(sys)? {
        if let Some(tid) = entry
            .map_err(sys)?
            .file_name()
            .to_str()
            .and_then(|s| s.parse().ok())
        {
            tids.push(tid);
        }
    }
    Ok(tids)
}

/// One thread's sets as `/proc` shows them: (effective, permitted, bounding, ambient).
/// `None` when the thread is gone.
pub fn thread_sets(pid: u32, tid: u32) -> Option<[CapSet; 4]> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
    parse_status(&text)
}

/// Reads `CapEff`, `CapPrm`, `CapBnd` and `CapAmb` from a `/proc/…/status` text.
pub fn parse_status(text: &str) -> Option<[CapSet; 4]> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .map(CapSet)
    };
    Some([
        field("CapEff:")?,
        field("CapPrm:")?,
        field("CapBnd:")?,
        field("CapAmb:")?,
    ])
}

/// How long [`drop_to`] waits for the other threads to answer one round of signals.
const ROUND_TIMEOUT: Duration = Duration::from_secs(2);
/// Rounds before giving up (a thread created by a thread that had not dropped yet is
/// found by the check after a round and gets the next one).
const ROUNDS: usize = 5;

/// Lowers every thread of the process to the capabilities in `keep` that it holds now,
/// dropping the others from the effective, permitted, inheritable, ambient and (when
/// this process may change it) bounding sets. Returns what is kept.
///
/// Every thread is checked afterwards; a thread that still holds more is an error, and
/// the caller should stop rather than run with capabilities it said it gave up.
pub fn drop_to(keep: CapSet) -> Result<CapSet, CapsError> {
    let (effective, permitted) = current()?;
    let target = CapSet(keep.0 & permitted.0);
    let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    TARGET.store(target.0, Ordering::SeqCst);
    LAST_CAP.store(last_cap, Ordering::SeqCst);
    DROP_BOUNDING.store(effective.has(CAP_SETPCAP), Ordering::SeqCst);
    FAILURES.store(0, Ordering::SeqCst);

    // SAFETY: a handler that only makes raw system calls and touches atomics.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(drop_signal(), &action, std::ptr::null_mut()) != 0 {
            return Err(CapsError::Sys {
                call: "sigaction",
                source: std::io::Error::last_os_error(),
            });
        }
    }
    let pid = std::process::id();
    // SAFETY: gettid has no arguments.
    let me = unsafe { libc::gettid() } as u32;
    let want = |sets: [CapSet; 4]| {
        let [eff, prm, bnd, amb] = sets;
        let bounding_ok = !DROP_BOUNDING.load(Ordering::SeqCst) || bnd.0 & !target.0 == 0;
        eff.0 & !target.0 == 0 && prm.0 & !target.0 == 0 && amb.0 == 0 && bounding_ok
    };
    let mut pending: Vec<u32> = thread_ids()?.into_iter().filter(|&t| t != me).collect();
    for _ in 0..ROUNDS {
        ACKS.store(0, Ordering::SeqCst);
        let mut sent = 0;
        for &tid in &pending {
            // SAFETY: tgkill with this process's id and one of its thread ids.
            if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, drop_signal()) } == 0 {
                sent += 1;
            }
        }
        let deadline = Instant::now() + ROUND_TIMEOUT;
        while ACKS.load(Ordering::SeqCst) < sent && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        pending = thread_ids()?
            .into_iter()
            .filter(|&t| t != me && thread_sets(pid, t).is_some_and(|s| !want(s)))
            .collect();
        if pending.is_empty() {
            break;
        }
    }
    // This thread last, so it could still signal the others with every capability.
    if !apply_in_this_thread() {
        FAILURES.fetch_add(1, Ordering::SeqCst);
    }
    for tid in thread_ids()? {
        if let Some(sets) = thread_sets(pid, tid)
            && !want(sets)
        {
            return Err(CapsError::NotDropped {
                tid,
                held: CapSet(sets[0].0 | sets[1].0),
                want: target,
            });
        }
    }
    if FAILURES.load(Ordering::SeqCst) != 0 {
        return Err(CapsError::Sys {
            call: "capset",
            source: std::io::Error::other("a thread could not lower its capabilities"),
        });
    }
    Ok(target)
}

/// What the running agent keeps once set-up is done:
/// - `CAP_NET_ADMIN`, always: rtnetlink requests at run time (the `NTF_USE` refresh of
///   next hops the XDP program uses) and restoring the IPv6 sysctls at exit;
/// - `CAP_BPF` (before Linux 5.8: `CAP_SYS_ADMIN`) only with an XDP data plane on a
///   kernel where updating its maps needs it (see [`map_updates_need_cap_bpf`]).
///
/// Everything else goes, `CAP_BPF` and `CAP_PERFMON` (the program is loaded),
/// `CAP_SYS_ADMIN` and `CAP_NET_BIND_SERVICE` (sockets are bound) included.
pub fn needed_after_setup(xdp_loaded: bool) -> CapSet {
    let mut keep = vec![CAP_NET_ADMIN];
    if xdp_loaded && map_updates_need_cap_bpf() {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        keep.push(if kernel_before(&release, (5, 8)) {
            CAP_SYS_ADMIN
        } else {
            CAP_BPF
        });
    }
    CapSet::of(&keep)
}

/// Whether `bpf(2)` calls on maps the agent already holds still need CAP_BPF: before
/// Linux 6.5 every `bpf(2)` call checks it while unprivileged BPF is disabled (Debian's
/// default); from 6.5 on only creating maps and loading programs do.
pub fn map_updates_need_cap_bpf() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    kernel_before(&release, (6, 5))
}

fn kernel_before(release: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    match (parts.next(), parts.next()) {
        (Some(a), Some(b)) => (a, b) < (major, minor),
        // Unknown: assume the older rule, which keeps the capability.
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_print_by_name() {
        assert_eq!(
            CapSet::of(&[CAP_NET_ADMIN, CAP_BPF]).to_string(),
            "cap_net_admin,cap_bpf"
        );
        assert_eq!(CapSet(0).to_string(), "none");
        assert_eq!(CAP_NET_ADMIN.to_string(), "CAP_NET_ADMIN");
        assert!(CapSet::of(&[CAP_BPF]).has(CAP_BPF));
        assert!(!CapSet::of(&[CAP_BPF]).has(CAP_PERFMON));
    }

    #[test]
    fn status_fields_are_parsed() {
        let text = "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t0000000000001000\n\
                    CapEff:\t0000000000001000\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n";
        let [eff, prm, bnd, amb] = parse_status(text).unwrap();
        assert_eq!(eff, CapSet::of(&[CAP_NET_ADMIN]));
        assert_eq!(prm, eff);
        assert_eq!(bnd.0, 0x1ff_ffff_ffff);
        assert_eq!(amb.0, 0);
        assert!(parse_status("Name:\tx\n").is_none());
    }

    #[test]
    fn kernel_versions_compare() {
        assert!(kernel_before("6.1.0-18-amd64\n", (6, 5)));
        assert!(kernel_before("5.15.0", (6, 5)));
        assert!(!kernel_before("6.5.0", (6, 5)));
        assert!(!kernel_before("6.18.44-fc-v1300", (6, 5)));
        assert!(kernel_before("garbage", (6, 5)));
    }
}
