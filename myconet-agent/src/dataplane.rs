//! The kernel fast path: loads the embedded XDP program, attaches it to the underlay
//! interfaces and owns its maps (routes, peers, device map, config, counters).
//!
//! The agent decides; this module only mirrors its decisions into the kernel.

use std::{ffi::CString, net::Ipv6Addr};

use aya::{
    Ebpf,
    maps::{
        Array, DevMapHash, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuValues,
        lpm_trie::Key as LpmKey,
    },
    programs::{ProgramError, TestRun, TestRunOptions, Xdp, XdpMode, xdp::XdpLinkId},
};
use myconet_common::maps::{
    CONFIG_MAP, Config, Counter, DEVMAP_MAP, EGRESS_MAP, EGRESS_REDIRECT, EGRESS_TX,
    LOCAL_ADDRS_MAP, LocalAddrKey, PEERS_MAP, PROGRAM_NAME, PeerKey, PeerValue, ROUTES_MAP,
    RouteValue, STATS_MAP, Stat,
};

use crate::egress::{self, EgressPolicy};
use tracing::{info, warn};

/// The XDP object built by build.rs (aya-build) from the myconet-ebpf crate.
static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/myconet"));

/// How the operator wants the program attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpModeChoice {
    /// Driver (native) mode, falling back to generic mode with a warning.
    Auto,
    /// Driver mode only.
    Driver,
    /// Generic (skb) mode only: works everywhere, slower.
    Generic,
}

/// The mode an interface ended up in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachedMode {
    /// Native XDP in the driver.
    Driver,
    /// Generic XDP in the stack.
    Generic,
}

impl AttachedMode {
    /// Name used by the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            AttachedMode::Driver => "driver",
            AttachedMode::Generic => "generic",
        }
    }
}

/// Why the data plane could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The object would not load (no BPF permission, verifier rejection, ...).
    #[error(
        "loading the XDP program failed (are you root / CAP_BPF+CAP_PERFMON+CAP_NET_ADMIN?): {0}"
    )]
    Load(String),
    /// An expected map or program is missing from the object.
    #[error("the XDP object has no {0}")]
    Missing(&'static str),
    /// An interface name that does not exist.
    #[error("no such interface: {0}")]
    NoSuchInterface(String),
    /// Neither driver nor generic attach worked.
    #[error("attaching XDP to {iface} failed: {reason}")]
    Attach {
        /// Interface name.
        iface: String,
        /// What the kernel said.
        reason: String,
    },
    /// A map operation failed.
    #[error("BPF map {map}: {reason}")]
    Map {
        /// Map name.
        map: &'static str,
        /// What the kernel said.
        reason: String,
    },
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |e| DataplaneError::Map {
        map,
        reason: e.to_string(),
    }
}

/// What one BPF_PROG_TEST_RUN returned.
#[derive(Debug, Clone)]
pub struct TestRunOutcome {
    /// The XDP action (`XDP_PASS` = 2, `XDP_DROP` = 1, `XDP_TX` = 3, `XDP_REDIRECT` = 4).
    pub action: u32,
    /// The frame after the program ran.
    pub frame: Vec<u8>,
    /// Average time per repetition, as measured by the kernel.
    pub duration: std::time::Duration,
}

/// One interface the program is attached to.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// Interface name.
    pub name: String,
    /// Kernel interface index.
    pub ifindex: u32,
    /// Attach mode in effect.
    pub mode: AttachedMode,
    /// How the program may send frames out of it (see [`crate::egress`]).
    pub policy: EgressPolicy,
}

/// The loaded program and its maps.
pub struct XdpDataplane {
    ebpf: Ebpf,
    routes: LpmTrie<MapData, [u8; 16], RouteValue>,
    peers: HashMap<MapData, PeerKey, PeerValue>,
    local_addrs: HashMap<MapData, LocalAddrKey, u32>,
    stats: PerCpuArray<MapData, Counter>,
    devmap: DevMapHash<MapData>,
    egress: HashMap<MapData, u32, u32>,
    config: Array<MapData, Config>,
    /// What `config` holds: the port and the generation of the forwarding caches.
    current: Config,
    attachments: Vec<(Attachment, XdpLinkId)>,
}

impl std::fmt::Debug for XdpDataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdpDataplane")
            .field("attachments", &self.attachments())
            .finish_non_exhaustive()
    }
}

impl XdpDataplane {
    /// Loads the program and its maps and writes the configuration; attaches nothing.
    pub fn load(port: u16) -> Result<Self, DataplaneError> {
        let mut ebpf = Ebpf::load(XDP_OBJECT).map_err(|e| DataplaneError::Load(e.to_string()))?;
        {
            let program: &mut Xdp = ebpf
                .program_mut(PROGRAM_NAME)
                .ok_or(DataplaneError::Missing("program"))?
                .try_into()
                .map_err(|e: ProgramError| DataplaneError::Load(e.to_string()))?;
            program
                .load()
                .map_err(|e| DataplaneError::Load(verifier_detail(e)))?;
        }
        let mut config: Array<MapData, Config> = take(&mut ebpf, CONFIG_MAP)?;
        let current = Config {
            port,
            ..Config::default()
        };
        config.set(0, current, 0).map_err(map_err(CONFIG_MAP))?;
        let routes = take(&mut ebpf, ROUTES_MAP)?;
        let peers = take(&mut ebpf, PEERS_MAP)?;
        let local_addrs = take(&mut ebpf, LOCAL_ADDRS_MAP)?;
        let stats = take(&mut ebpf, STATS_MAP)?;
        let devmap = take(&mut ebpf, DEVMAP_MAP)?;
        let egress = take(&mut ebpf, EGRESS_MAP)?;
        Ok(Self {
            ebpf,
            routes,
            peers,
            local_addrs,
            stats,
            devmap,
            egress,
            config,
            current,
            attachments: Vec::new(),
        })
    }

    /// The loaded program, for BPF_PROG_TEST_RUN.
    pub fn program(&self) -> Result<&Xdp, DataplaneError> {
        self.ebpf
            .program(PROGRAM_NAME)
            .ok_or(DataplaneError::Missing("program"))?
            .try_into()
            .map_err(|e: ProgramError| DataplaneError::Load(e.to_string()))
    }

    /// Runs the program once per `repeat` on `frame` as if it arrived on
    /// `ingress_ifindex` (BPF_PROG_TEST_RUN, in the caller's network namespace), without
    /// sending anything: returns the XDP action, the frame as the program left it, and
    /// the kernel's average run time per repetition.
    pub fn test_run(
        &self,
        frame: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
    ) -> Result<TestRunOutcome, DataplaneError> {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex.
        let words = [0, frame.len() as u32, 0, ingress_ifindex, 0, 0];
        let ctx: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut out = vec![0u8; frame.len() + 256];
        let result = self
            .program()?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                repeat: repeat.max(1),
                ..TestRunOptions::default()
            })
            .map_err(|e| DataplaneError::Load(format!("BPF_PROG_TEST_RUN: {e}")))?;
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutcome {
            action: result.return_value,
            frame: out,
            duration: result.duration,
        })
    }

    /// Lets the program redirect frames into `ifindex` and send them back out of it
    /// (`XDP_TX`), e.g. for test fixtures; attach uses [`XdpDataplane::set_egress`] with
    /// what it proved instead.
    pub fn allow_redirect(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        self.set_egress(
            ifindex,
            EgressPolicy {
                redirect: true,
                tx: true,
            },
        )
    }

    /// Stops redirects into `ifindex` (`XDP_TX` stays allowed); frames routed there go
    /// to the slow path.
    pub fn remove_redirect(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        self.set_egress(
            ifindex,
            EgressPolicy {
                redirect: false,
                tx: true,
            },
        )
    }

    /// Sets how the program may send frames out of `ifindex` (device map entry for
    /// redirects, `EGRESS` bits for both) and makes cached decisions stale, since they
    /// remember the policy their egress had.
    pub fn set_egress(&mut self, ifindex: u32, policy: EgressPolicy) -> Result<(), DataplaneError> {
        if policy.redirect {
            self.devmap
                .insert(ifindex, ifindex, None, 0)
                .map_err(|e| DataplaneError::Map {
                    map: DEVMAP_MAP,
                    reason: e.to_string(),
                })?;
        } else {
            match self.devmap.remove(ifindex) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(map_err(DEVMAP_MAP)(e)),
            }
        }
        let bits = (if policy.redirect { EGRESS_REDIRECT } else { 0 })
            | (if policy.tx { EGRESS_TX } else { 0 });
        self.egress
            .insert(ifindex, bits, 0)
            .map_err(map_err(EGRESS_MAP))?;
        self.invalidate_caches();
        Ok(())
    }

    /// Re-reads what each attached interface's driver can take (a veth's far end may
    /// have gained or lost its XDP program or GRO) and applies every policy that
    /// changed; returns the attachments whose policy changed.
    pub fn refresh_egress(&mut self) -> Result<Vec<Attachment>, DataplaneError> {
        let mut changed = Vec::new();
        for i in 0..self.attachments.len() {
            let a = &self.attachments[i].0;
            let policy = egress::facts(&a.name, a.ifindex, a.mode).policy();
            if policy == a.policy {
                continue;
            }
            let ifindex = a.ifindex;
            self.set_egress(ifindex, policy)?;
            self.attachments[i].0.policy = policy;
            changed.push(self.attachments[i].0.clone());
        }
        Ok(changed)
    }

    /// Attaches to `iface`; in driver mode, other attached interfaces may redirect into it.
    pub fn attach(
        &mut self,
        iface: &str,
        choice: XdpModeChoice,
    ) -> Result<Attachment, DataplaneError> {
        let ifindex = ifindex(iface)?;
        let program: &mut Xdp = self
            .ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(DataplaneError::Missing("program"))?
            .try_into()
            .map_err(|e: ProgramError| DataplaneError::Load(e.to_string()))?;
        let (link, mode) = match choice {
            XdpModeChoice::Driver => (
                program
                    .attach_to_if_index(ifindex, XdpMode::Driver)
                    .map_err(|e| attach_err(iface, e))?,
                AttachedMode::Driver,
            ),
            XdpModeChoice::Generic => (
                program
                    .attach_to_if_index(ifindex, XdpMode::Skb)
                    .map_err(|e| attach_err(iface, e))?,
                AttachedMode::Generic,
            ),
            XdpModeChoice::Auto => match program.attach_to_if_index(ifindex, XdpMode::Driver) {
                Ok(link) => (link, AttachedMode::Driver),
                Err(driver_err) => {
                    warn!(
                        iface,
                        error = %error_chain(&driver_err),
                        "driver-mode XDP unavailable, falling back to generic mode (slower)"
                    );
                    let link = program
                        .attach_to_if_index(ifindex, XdpMode::Skb)
                        .map_err(|e| DataplaneError::Attach {
                            iface: iface.to_string(),
                            reason: format!(
                                "driver mode: {}; generic mode: {}",
                                error_chain(&driver_err),
                                error_chain(&e)
                            ),
                        })?;
                    (link, AttachedMode::Generic)
                }
            },
        };
        // Frames go out of the interface only in the ways its driver proved it takes
        // them (see crate::egress); the rest take the slow path instead of vanishing.
        let facts = egress::facts(iface, ifindex, mode);
        let policy = facts.policy();
        self.set_egress(ifindex, policy)?;
        let attachment = Attachment {
            name: iface.to_string(),
            ifindex,
            mode,
            policy,
        };
        self.attachments.push((attachment.clone(), link));
        info!(
            iface,
            ifindex,
            mode = mode.as_str(),
            redirect_target = policy.redirect,
            xdp_tx = policy.tx,
            veth = facts.veth,
            xdp_features = ?facts.xdp_features,
            "XDP attached"
        );
        Ok(attachment)
    }

    /// Detaches from every interface; the maps stay loaded until drop.
    pub fn detach_all(&mut self) {
        let attachments = std::mem::take(&mut self.attachments);
        for (a, link) in attachments {
            let _ = self.devmap.remove(a.ifindex);
            let _ = self.egress.remove(&a.ifindex);
            let program: Result<&mut Xdp, _> = match self.ebpf.program_mut(PROGRAM_NAME) {
                Some(p) => p.try_into(),
                None => continue,
            };
            match program.map(|p| p.detach(link)) {
                Ok(Ok(())) => info!(iface = a.name, "XDP detached"),
                Ok(Err(e)) => warn!(iface = a.name, error = %e, "XDP detach failed"),
                Err(e) => warn!(iface = a.name, error = %e, "XDP detach failed"),
            }
        }
    }

    /// Interfaces the program is attached to.
    pub fn attachments(&self) -> Vec<Attachment> {
        self.attachments.iter().map(|(a, _)| a.clone()).collect()
    }

    /// Installs or replaces the route for `prefix/len` in one map update, so the prefix
    /// is never unroutable while it changes.
    pub fn set_route(
        &mut self,
        prefix: Ipv6Addr,
        len: u8,
        value: RouteValue,
    ) -> Result<(), DataplaneError> {
        let key = LpmKey::new(u32::from(len), prefix.octets());
        self.routes
            .insert(&key, value, 0)
            .map_err(map_err(ROUTES_MAP))?;
        self.invalidate_caches();
        Ok(())
    }

    /// Makes every forwarding-cache slot and cached FIB answer stale at once (one write
    /// of the generation the program compares against), so a changed route, source
    /// address or redirect target takes effect on the next packet. Also called every
    /// [`myconet_common::maps::NEXTHOP_REFRESH_INTERVAL_MS`] so changed neighbours are
    /// picked up without a clock read per packet. A failed write is logged and retried
    /// by the next call.
    pub fn invalidate_caches(&mut self) {
        if let Err(e) = self.bump_generation() {
            warn!(error = %e, "could not invalidate the XDP forwarding caches");
        }
    }

    fn bump_generation(&mut self) -> Result<(), DataplaneError> {
        let next = Config {
            generation: self.current.generation.wrapping_add(1),
            ..self.current
        };
        self.config.set(0, next, 0).map_err(map_err(CONFIG_MAP))?;
        self.current = next;
        Ok(())
    }

    /// Removes the route for `prefix/len`; `false` if there was none.
    pub fn remove_route(&mut self, prefix: Ipv6Addr, len: u8) -> Result<bool, DataplaneError> {
        let key = LpmKey::new(u32::from(len), prefix.octets());
        let removed = self.routes.remove(&key);
        self.invalidate_caches();
        match removed {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(map_err(ROUTES_MAP)(e)),
        }
    }

    /// Every route in the kernel map.
    pub fn routes(&self) -> Result<Vec<(Ipv6Addr, u8, RouteValue)>, DataplaneError> {
        let mut out = Vec::new();
        for entry in self.routes.iter() {
            let (key, value) = entry.map_err(map_err(ROUTES_MAP))?;
            let len = key.prefix_len() as u8;
            out.push((Ipv6Addr::from(key.data()), len, value));
        }
        Ok(out)
    }

    /// Allows an underlay endpoint to use this node as a relay.
    pub fn add_peer(&mut self, key: PeerKey) -> Result<(), DataplaneError> {
        self.peers
            .insert(key, PeerValue::default(), 0)
            .map_err(map_err(PEERS_MAP))
    }

    /// Revokes an endpoint; `false` if it was not present. The forwarding cache holds
    /// decisions that include "this sender is a neighbour", so they are made stale too,
    /// and a failure to do so is an error: a revoked peer must not keep relaying.
    pub fn remove_peer(&mut self, key: PeerKey) -> Result<bool, DataplaneError> {
        let removed = match self.peers.remove(&key) {
            Ok(()) => true,
            Err(e) if is_not_found(&e) => false,
            Err(e) => return Err(map_err(PEERS_MAP)(e)),
        };
        self.bump_generation()?;
        Ok(removed)
    }

    /// Every endpoint in the kernel peer map.
    pub fn peers(&self) -> Result<Vec<PeerKey>, DataplaneError> {
        self.peers
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(PEERS_MAP))
    }

    /// Makes the local-address map hold exactly `wanted` (this node's underlay
    /// addresses): the program relays only packets sent to one of them. Returns whether
    /// anything changed; a change makes the forwarding caches stale (their slots are
    /// keyed by the outer destination they were checked for), so a removed address
    /// stops being relayed for at once.
    pub fn sync_local_addrs(
        &mut self,
        wanted: &std::collections::BTreeSet<LocalAddrKey>,
    ) -> Result<bool, DataplaneError> {
        let present: std::collections::BTreeSet<LocalAddrKey> = self
            .local_addrs
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(LOCAL_ADDRS_MAP))?;
        let mut changed = false;
        for key in wanted.difference(&present) {
            self.local_addrs
                .insert(*key, 0, 0)
                .map_err(map_err(LOCAL_ADDRS_MAP))?;
            changed = true;
        }
        for key in present.difference(wanted) {
            match self.local_addrs.remove(key) {
                Ok(()) => changed = true,
                Err(e) if is_not_found(&e) => changed = true,
                Err(e) => return Err(map_err(LOCAL_ADDRS_MAP)(e)),
            }
        }
        if changed {
            self.bump_generation()?;
        }
        Ok(changed)
    }

    /// Every address in the local-address map.
    pub fn local_addrs(&self) -> Result<Vec<LocalAddrKey>, DataplaneError> {
        self.local_addrs
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(LOCAL_ADDRS_MAP))
    }

    /// Counters summed over CPUs, in [`Stat`] order.
    pub fn stats(&self) -> Result<Vec<(Stat, Counter)>, DataplaneError> {
        let mut out = Vec::with_capacity(Stat::ALL.len());
        for stat in Stat::ALL {
            let per_cpu: PerCpuValues<Counter> = self
                .stats
                .get(&(stat as u32), 0)
                .map_err(map_err(STATS_MAP))?;
            let sum = per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets.wrapping_add(c.packets),
                bytes: acc.bytes.wrapping_add(c.bytes),
            });
            out.push((stat, sum));
        }
        Ok(out)
    }
}

impl Drop for XdpDataplane {
    fn drop(&mut self) {
        self.detach_all();
    }
}

/// Whether a map error means "no such key" (a device map reports it as a failed
/// delete syscall with ENOENT rather than as `KeyNotFound`).
fn is_not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(DataplaneError::Missing(name))?;
    T::try_from(map).map_err(map_err(name))
}

fn attach_err(iface: &str, e: ProgramError) -> DataplaneError {
    DataplaneError::Attach {
        iface: iface.to_string(),
        reason: error_chain(&e),
    }
}

/// An error with every `source()` behind it, for one-line logs: aya's top-level attach
/// errors ("bpf_link_create failed") and netlink errors hide the kernel's reason one
/// level down.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Includes the verifier log, which is where the reason for a rejection lives.
fn verifier_detail(e: ProgramError) -> String {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            format!("{io_error}\nverifier log:\n{verifier_log}")
        }
        other => other.to_string(),
    }
}

/// Resolves an interface name to its index.
pub fn ifindex(iface: &str) -> Result<u32, DataplaneError> {
    let name =
        CString::new(iface).map_err(|_| DataplaneError::NoSuchInterface(iface.to_string()))?;
    // SAFETY: valid NUL-terminated string; the call only reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        Err(DataplaneError::NoSuchInterface(iface.to_string()))
    } else {
        Ok(index)
    }
}
