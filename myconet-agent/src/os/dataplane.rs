//! The kernel fast path: loads the embedded XDP program, attaches it to the underlay
//! interfaces and owns its maps (routes, peers, device map, config, counters).
//!
//! The agent decides; this module only mirrors its decisions into the kernel.

use std::{
    collections::BTreeSet,
    ffi::CString,
    net::Ipv6Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{
        Array, DevMapHash, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuValues,
        lpm_trie::Key as LpmKey,
    },
    programs::{
        ProgramError, TestRun, TestRunOptions, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use myconet_common::maps::{
    CONFIG_MAP, Config, Counter, DEVMAP_MAP, EGRESS_MAP, EGRESS_REDIRECT, EGRESS_TX, Gcra,
    HandshakeLimits, IFACE_GENERIC, LOCAL_ADDRS_MAP, LocalAddrKey, PEERS_MAP, PROGRAM_NAME,
    PeerKey, PeerValue, ROUTES_MAP, RouteValue, STATS_MAP, Stat,
};

use crate::os::{
    bpf_pins::{self, LinkPin, PinDir},
    egress::{self, EgressPolicy},
};
use tracing::{info, warn};

/// The maps that hold the data plane's state, pinned so a restarted agent adopts them.
/// The caches and the scratch space are not: a new program instance starts them empty.
const PINNED_MAPS: [&str; 7] = [
    ROUTES_MAP,
    PEERS_MAP,
    LOCAL_ADDRS_MAP,
    STATS_MAP,
    CONFIG_MAP,
    DEVMAP_MAP,
    EGRESS_MAP,
];

/// How long routes and relay peers adopted from a predecessor's pinned maps stay when
/// this agent does not install them again: long enough for links to re-authenticate
/// and routing to converge after a restart, after which whatever it did not confirm is
/// stale and removed.
pub const ADOPTION_GRACE: Duration = Duration::from_secs(30);

/// The XDP program's handshake gate for an agent whose session layer admits inits by
/// `admission`, so the two layers agree (`docs/handshake.md`, "Shedding in the
/// kernel"). Every bucket is per CPU.
/// - Per source /64, cookieless: what the agent can do with one last hop's cookieless
///   inits in a second, its cookieless share (signature checks) plus its cookie
///   replies; the agent drops the rest of them unanswered anyway.
/// - Per (source /64, cookie): the agent's share of cookie-bearing inits per last hop.
/// - The node's cookieless inits: twice the agent's load threshold (above it the agent
///   answers everyone with cookies, each a reply to send), a second's worth at once.
/// - The node's cookie-bearing inits: twice the agent's verification budget, whose
///   excess the agent refuses; the other half is room for garbage cookies, which the
///   program cannot tell from real ones.
pub fn handshake_limits(admission: &myconet_core::session::Config, seed: u64) -> HandshakeLimits {
    let source = &admission.source_rate_limit;
    let replies = &admission.cookie_reply_rate_limit;
    let cookie = &admission.cookie_rate_limit;
    let budget = &admission.verify_budget;
    HandshakeLimits {
        seed,
        source_cookieless: Gcra::new(
            source.per_second.saturating_add(replies.per_second),
            source.burst.saturating_add(replies.burst),
        ),
        cookie: Gcra::new(cookie.per_second, cookie.burst),
        node_cookieless: Gcra::new(
            admission.load_threshold.saturating_mul(2),
            admission.load_threshold,
        ),
        node_cookie: Gcra::new(
            budget.per_second.saturating_mul(2),
            budget.burst.saturating_mul(2),
        ),
    }
}

/// A random key for the handshake gate's slot hash.
fn random_seed() -> Result<u64, DataplaneError> {
    use ring::rand::SecureRandom as _;
    let mut seed = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| DataplaneError::Load("no randomness for the handshake gate".into()))?;
    Ok(u64::from_ne_bytes(seed))
}

/// The version of the embedded program, as its pins record it.
pub fn program_version() -> String {
    bpf_pins::object_version(XDP_OBJECT)
}

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
    /// Pinning or adopting pinned state failed.
    #[error("pinned data plane: {0}")]
    Pins(String),
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
    /// How the program may send frames out of it (see [`crate::os::egress`]).
    pub policy: EgressPolicy,
}

/// How an attachment holds its XDP link.
#[derive(Debug)]
enum AttachLink {
    /// A BPF link pinned at `pin`: it stays attached after the process is gone, until
    /// the pin is removed.
    Pinned { link: FdLink, pin: PathBuf },
    /// A link the program owns (unpinned data plane): it goes with the process.
    Owned(XdpLinkId),
}

/// Routes and relay peers found in adopted maps that this agent has not installed
/// again yet; removed when [`ADOPTION_GRACE`] is over.
#[derive(Debug)]
struct Adopted {
    routes: BTreeSet<(Ipv6Addr, u8)>,
    peers: BTreeSet<PeerKey>,
    until: Instant,
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
    attachments: Vec<(Attachment, AttachLink)>,
    /// Where the links and maps are pinned, if they are.
    pins: Option<PinDir>,
    /// State adopted from a predecessor, until confirmed or expired.
    adopted: Option<Adopted>,
    /// Set by [`XdpDataplane::release`]: drop leaves everything attached and pinned.
    released: bool,
}

impl std::fmt::Debug for XdpDataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdpDataplane")
            .field("attachments", &self.attachments())
            .finish_non_exhaustive()
    }
}

impl XdpDataplane {
    /// Loads the program and its maps and writes the configuration; attaches nothing
    /// and pins nothing (everything goes when the value is dropped).
    pub fn load(port: u16) -> Result<Self, DataplaneError> {
        Self::load_with(port, None)
    }

    /// Like [`XdpDataplane::load`] with links and maps pinned under `pin_dir` (which
    /// must be on a BPF file system): maps a predecessor of the same program version
    /// pinned there are adopted with their routes, peers and counters, and
    /// [`XdpDataplane::attach`] takes over its pinned links. Dropping the value removes
    /// everything unless [`XdpDataplane::release`] was called.
    pub fn load_pinned(port: u16, pin_dir: &Path) -> Result<Self, DataplaneError> {
        Self::load_pinned_as(port, pin_dir, &program_version())
    }

    /// [`XdpDataplane::load_pinned`] under another program version: tests use it to
    /// stand for an older agent's pins.
    pub fn load_pinned_as(
        port: u16,
        pin_dir: &Path,
        version: &str,
    ) -> Result<Self, DataplaneError> {
        // XDP attachments are BPF links (which can be pinned) from Linux 5.9 on; before
        // that aya attaches over netlink.
        if aya::util::KernelVersion::current()
            .is_ok_and(|v| v < aya::util::KernelVersion::new(5, 9, 0))
        {
            return Err(DataplaneError::Pins(
                "pinned XDP links need Linux 5.9 or later".into(),
            ));
        }
        let pins =
            PinDir::open(pin_dir, version).map_err(|e| DataplaneError::Pins(e.to_string()))?;
        Self::load_with(port, Some(pins))
    }

    fn load_with(port: u16, pins: Option<PinDir>) -> Result<Self, DataplaneError> {
        let adopting = pins.as_ref().is_some_and(PinDir::has_maps);
        let btf = Btf::from_sys_fs().ok();
        let mut loader = EbpfLoader::new();
        loader.btf(btf.as_ref());
        if let Some(p) = &pins {
            for name in PINNED_MAPS {
                loader.map_pin_path(name, p.maps_dir().join(name));
            }
        }
        let mut ebpf = loader
            .load(XDP_OBJECT)
            .map_err(|e| DataplaneError::Load(error_chain(&e)))?;
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
        // An adopted map holds the generation the running program compares against:
        // continue from it, so every cached decision of the predecessor goes stale.
        let generation = if adopting {
            config
                .get(&0, 0)
                .map_err(map_err(CONFIG_MAP))?
                .generation
                .wrapping_add(1)
        } else {
            0
        };
        let current = Config {
            port,
            generation,
            handshake: handshake_limits(&crate::shell::overlay::session_config(), random_seed()?),
            ..Config::default()
        };
        config.set(0, current, 0).map_err(map_err(CONFIG_MAP))?;
        let routes = take(&mut ebpf, ROUTES_MAP)?;
        let peers = take(&mut ebpf, PEERS_MAP)?;
        let local_addrs = take(&mut ebpf, LOCAL_ADDRS_MAP)?;
        let stats = take(&mut ebpf, STATS_MAP)?;
        let devmap = take(&mut ebpf, DEVMAP_MAP)?;
        let egress = take(&mut ebpf, EGRESS_MAP)?;
        let mut dp = Self {
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
            pins,
            adopted: None,
            released: false,
        };
        if adopting {
            let routes: BTreeSet<(Ipv6Addr, u8)> =
                dp.routes()?.into_iter().map(|(a, l, _)| (a, l)).collect();
            let peers: BTreeSet<PeerKey> = dp.peers()?.into_iter().collect();
            info!(
                routes = routes.len(),
                peers = peers.len(),
                grace_s = ADOPTION_GRACE.as_secs(),
                "adopting the pinned data plane: its routes and relay peers stay until \
                 this agent confirms them or the grace period ends"
            );
            dp.adopted = Some(Adopted {
                routes,
                peers,
                until: Instant::now() + ADOPTION_GRACE,
            });
        }
        Ok(dp)
    }

    /// Whether the links and maps are pinned.
    pub fn is_pinned(&self) -> bool {
        self.pins.is_some()
    }

    /// The pin directory, if pinned.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_ref().map(PinDir::root)
    }

    /// Leaves everything attached and pinned when this value is dropped (a hitless
    /// exit): the program keeps relaying on the maps as they are until the next agent
    /// on the same pin directory adopts them. Returns whether anything is pinned (an
    /// unpinned data plane still goes with the process).
    pub fn release(&mut self) -> bool {
        self.released = self.pins.is_some();
        self.released
    }

    /// Removes what this agent's predecessor left and this agent does not use: pinned
    /// links of interfaces it did not attach to (which detaches them), their device
    /// and egress entries, and the maps of other program versions. Call after the last
    /// [`XdpDataplane::attach`].
    pub fn finish_adoption(&mut self) -> Result<(), DataplaneError> {
        let Some(pins) = self.pins.clone() else {
            return Ok(());
        };
        let ours: BTreeSet<PathBuf> = self
            .attachments
            .iter()
            .filter_map(|(_, l)| match l {
                AttachLink::Pinned { pin, .. } => Some(pin.clone()),
                AttachLink::Owned(_) => None,
            })
            .collect();
        for stale in pins.links() {
            if !ours.contains(&stale.path) {
                remove_pin(&stale.path)?;
                info!(
                    iface = stale.iface,
                    "removed the pinned XDP link of an interface this agent does not use"
                );
            }
        }
        let attached: BTreeSet<u32> = self.attachments.iter().map(|(a, _)| a.ifindex).collect();
        let listed: Vec<u32> = self
            .egress
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(EGRESS_MAP))?;
        for ifindex in listed.into_iter().filter(|i| !attached.contains(i)) {
            let _ = self.devmap.remove(ifindex);
            let _ = self.egress.remove(&ifindex);
        }
        for old in pins.other_versions() {
            PinDir::remove_maps(&old)
                .map_err(|e| DataplaneError::Pins(format!("removing {}: {e}", old.display())))?;
            info!(dir = %old.display(), "removed the maps of an earlier program version");
        }
        self.invalidate_caches();
        Ok(())
    }

    /// Removes the routes and relay peers adopted from a predecessor that this agent
    /// has not installed again once [`ADOPTION_GRACE`] is over at `now`; returns how
    /// many entries went. Cheap when nothing is adopted (called every second).
    pub fn expire_adopted(&mut self, now: Instant) -> usize {
        let Some(adopted) = self.adopted.as_ref() else {
            return 0;
        };
        if now < adopted.until {
            return 0;
        }
        let Some(adopted) = self.adopted.take() else {
            return 0;
        };
        let mut removed = 0;
        for (addr, len) in &adopted.routes {
            let key = LpmKey::new(u32::from(*len), addr.octets());
            if self.routes.remove(&key).is_ok() {
                removed += 1;
            }
        }
        for peer in &adopted.peers {
            if self.peers.remove(peer).is_ok() {
                removed += 1;
            }
        }
        self.invalidate_caches();
        info!(
            routes = adopted.routes.len(),
            peers = adopted.peers.len(),
            "removed the adopted routes and relay peers this agent did not confirm"
        );
        removed
    }

    /// How many adopted routes and peers await confirmation (0 when none are).
    pub fn adopted_pending(&self) -> (usize, usize) {
        self.adopted
            .as_ref()
            .map_or((0, 0), |a| (a.routes.len(), a.peers.len()))
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
    /// remember the policy their egress had. The interface keeps the mode it is
    /// attached in (driver mode if it is not attached).
    pub fn set_egress(&mut self, ifindex: u32, policy: EgressPolicy) -> Result<(), DataplaneError> {
        let mode = self
            .attachments
            .iter()
            .find(|(a, _)| a.ifindex == ifindex)
            .map_or(AttachedMode::Driver, |(a, _)| a.mode);
        self.set_interface(ifindex, policy, mode)
    }

    /// [`XdpDataplane::set_egress`] with the mode the program runs in on `ifindex`:
    /// frames arriving on a generic-mode interface are skbs that keep a partial
    /// checksum's state when relayed, so the program treats them differently
    /// ([`myconet_common::maps::Stat::CsumPartial`]). Public for test fixtures.
    pub fn set_interface(
        &mut self,
        ifindex: u32,
        policy: EgressPolicy,
        mode: AttachedMode,
    ) -> Result<(), DataplaneError> {
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
            | (if policy.tx { EGRESS_TX } else { 0 })
            | (if mode == AttachedMode::Generic {
                IFACE_GENERIC
            } else {
                0
            });
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
            let (ifindex, mode) = (a.ifindex, a.mode);
            self.set_interface(ifindex, policy, mode)?;
            self.attachments[i].0.policy = policy;
            changed.push(self.attachments[i].0.clone());
        }
        Ok(changed)
    }

    fn xdp_program_mut(&mut self) -> Result<&mut Xdp, DataplaneError> {
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(DataplaneError::Missing("program"))?
            .try_into()
            .map_err(|e: ProgramError| DataplaneError::Load(e.to_string()))
    }

    /// Attaches to `iface`; in driver mode, other attached interfaces may redirect into
    /// it. With pins, a link a predecessor pinned for `iface` (in a mode `choice`
    /// allows) is taken over by replacing its program atomically, so relaying never
    /// stops; otherwise a new link is attached and pinned.
    pub fn attach(
        &mut self,
        iface: &str,
        choice: XdpModeChoice,
    ) -> Result<Attachment, DataplaneError> {
        let ifindex = ifindex(iface)?;
        let (link, mode) = match self.adopt_pinned_link(iface, ifindex, choice)? {
            Some(adopted) => adopted,
            None => {
                let (id, mode) = self.attach_new(iface, ifindex, choice)?;
                (self.keep_link(id, iface, mode)?, mode)
            }
        };
        // Frames go out of the interface only in the ways its driver proved it takes
        // them (see crate::os::egress); the rest take the slow path instead of vanishing.
        let facts = egress::facts(iface, ifindex, mode);
        let policy = facts.policy();
        let attachment = Attachment {
            name: iface.to_string(),
            ifindex,
            mode,
            policy,
        };
        self.attachments.push((attachment.clone(), link));
        if let Err(e) = self.set_interface(ifindex, policy, mode) {
            if let Some((_, link)) = self.attachments.pop() {
                self.detach_link(iface, link);
            }
            return Err(e);
        }
        let tx_csum_offload = egress::tx_checksum_offload(iface);
        info!(
            iface,
            ifindex,
            mode = mode.as_str(),
            redirect_target = policy.redirect,
            xdp_tx = policy.tx,
            veth = facts.veth,
            xdp_features = ?facts.xdp_features,
            tx_csum_offload = ?tx_csum_offload,
            pinned = self.pins.is_some(),
            "XDP attached"
        );
        if facts.veth && tx_csum_offload == Some(true) {
            // Not a fault: this node's relays complete such checksums (`csum_partial`).
            // A relay that cannot, on the far end, would drop our data silently.
            info!(
                iface,
                "veth with TX checksum offload: datagrams this node sends here leave with \
                 partial checksums, which a relay on the far end must complete (Myconet \
                 relays do, counted as csum_partial); if the far end's kernel counts \
                 Udp6InCsumErrors, `ethtool -K {iface} tx off` makes this kernel compute them"
            );
        }
        Ok(attachment)
    }

    /// Takes over the link a predecessor pinned for `iface`, if there is one this
    /// agent can use: attached to this very interface (not to one that had its name)
    /// in a mode `choice` allows. Its program is replaced by ours in one
    /// `BPF_LINK_UPDATE`. A pin that cannot be used is removed, which detaches it, and
    /// the caller attaches afresh.
    fn adopt_pinned_link(
        &mut self,
        iface: &str,
        ifindex: u32,
        choice: XdpModeChoice,
    ) -> Result<Option<(AttachLink, AttachedMode)>, DataplaneError> {
        let Some(found) = self
            .pins
            .as_ref()
            .and_then(|p| p.links().into_iter().find(|l| l.iface == iface))
        else {
            return Ok(None);
        };
        let mode_ok = match choice {
            XdpModeChoice::Auto => true,
            XdpModeChoice::Driver => found.mode == AttachedMode::Driver,
            XdpModeChoice::Generic => found.mode == AttachedMode::Generic,
        };
        let on = bpf_pins::xdp_link_ifindex(&found.path);
        let why_not = if !mode_ok {
            format!("it is in {} mode", found.mode.as_str())
        } else if on != Some(ifindex) {
            format!("it is attached to ifindex {on:?}, {iface} is {ifindex}")
        } else {
            match self.update_link(&found) {
                Ok(link) => {
                    info!(
                        iface,
                        mode = found.mode.as_str(),
                        "took over the pinned XDP link: relaying went on throughout"
                    );
                    return Ok(Some((
                        AttachLink::Pinned {
                            link,
                            pin: found.path,
                        },
                        found.mode,
                    )));
                }
                Err(e) => e,
            }
        };
        info!(
            iface,
            reason = why_not,
            "not taking over the pinned XDP link: detaching it and attaching afresh"
        );
        remove_pin(&found.path)?;
        Ok(None)
    }

    /// Replaces the program of the link pinned at `found` with ours.
    fn update_link(&mut self, found: &LinkPin) -> Result<FdLink, String> {
        let pinned = PinnedLink::from_pin(&found.path).map_err(|e| error_chain(&e))?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| error_chain(&e))?;
        let program = self.xdp_program_mut().map_err(|e| e.to_string())?;
        let id = program
            .attach_to_link(link)
            .map_err(|e| format!("BPF_LINK_UPDATE: {}", error_chain(&e)))?;
        let link = program.take_link(id).map_err(|e| error_chain(&e))?;
        FdLink::try_from(link).map_err(|e| error_chain(&e))
    }

    /// Attaches a new link to `iface` as `choice` asks.
    fn attach_new(
        &mut self,
        iface: &str,
        ifindex: u32,
        choice: XdpModeChoice,
    ) -> Result<(XdpLinkId, AttachedMode), DataplaneError> {
        let program = self.xdp_program_mut()?;
        Ok(match choice {
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
        })
    }

    /// Pins a new link (with pins) or leaves it with the program (without).
    fn keep_link(
        &mut self,
        id: XdpLinkId,
        iface: &str,
        mode: AttachedMode,
    ) -> Result<AttachLink, DataplaneError> {
        let Some(path) = self.pins.as_ref().map(|p| p.link_path(iface, mode)) else {
            return Ok(AttachLink::Owned(id));
        };
        let program = self.xdp_program_mut()?;
        let link = program
            .take_link(id)
            .map_err(|e| DataplaneError::Pins(error_chain(&e)))?;
        let pins_err = |e: &dyn std::error::Error| {
            DataplaneError::Pins(format!(
                "pinning the XDP link of {iface}: {}",
                error_chain(e)
            ))
        };
        // Dropped on error, which detaches it again.
        let link = FdLink::try_from(link).map_err(|e| pins_err(&e))?;
        let pinned = link.pin(&path).map_err(|e| pins_err(&e))?;
        Ok(AttachLink::Pinned {
            link: FdLink::from(pinned),
            pin: path,
        })
    }

    /// Detaches one link, logging (not failing) what goes wrong.
    fn detach_link(&mut self, iface: &str, link: AttachLink) {
        let result = match link {
            AttachLink::Pinned { link, pin } => {
                let removed = std::fs::remove_file(&pin);
                // The last reference: the kernel detaches the program now.
                drop(link);
                match removed {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        Err(format!("removing {}: {e}", pin.display()))
                    }
                    _ => Ok(()),
                }
            }
            AttachLink::Owned(id) => self
                .xdp_program_mut()
                .map_err(|e| e.to_string())
                .and_then(|p| p.detach(id).map_err(|e| error_chain(&e))),
        };
        match result {
            Ok(()) => info!(iface, "XDP detached"),
            Err(e) => warn!(iface, error = e, "XDP detach failed"),
        }
    }

    /// Detaches from every interface; the maps stay loaded until drop. Pins go too: a
    /// clean exit leaves nothing behind.
    pub fn detach_all(&mut self) {
        let attachments = std::mem::take(&mut self.attachments);
        for (a, link) in attachments {
            let _ = self.devmap.remove(a.ifindex);
            let _ = self.egress.remove(&a.ifindex);
            self.detach_link(&a.name, link);
        }
        if let Some(pins) = self.pins.take() {
            match pins.remove_all() {
                Ok(()) => info!(dir = %pins.root().display(), "pins removed"),
                Err(e) => {
                    warn!(dir = %pins.root().display(), error = %e, "could not remove the pins")
                }
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
        if let Some(a) = self.adopted.as_mut() {
            a.routes.remove(&(prefix, len));
        }
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

    /// The handshake gate's parameters in the program's config.
    pub fn handshake_limits(&self) -> HandshakeLimits {
        self.current.handshake
    }

    /// Replaces the handshake gate's parameters (the agent sets them from its
    /// admission rates when it loads the program; tests set their own, or none).
    pub fn set_handshake_limits(&mut self, limits: HandshakeLimits) -> Result<(), DataplaneError> {
        let next = Config {
            handshake: limits,
            ..self.current
        };
        self.config.set(0, next, 0).map_err(map_err(CONFIG_MAP))?;
        self.current = next;
        Ok(())
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
        if let Some(a) = self.adopted.as_mut() {
            a.routes.remove(&(prefix, len));
        }
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
            .map_err(map_err(PEERS_MAP))?;
        if let Some(a) = self.adopted.as_mut() {
            a.peers.remove(&key);
        }
        Ok(())
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
        if let Some(a) = self.adopted.as_mut() {
            a.peers.remove(&key);
        }
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
        if self.released {
            info!(
                dir = ?self.pin_dir(),
                "leaving the XDP program attached with its maps pinned for the next agent"
            );
            return;
        }
        self.detach_all();
    }
}

/// Removes a link's pin and detaches the link before returning. The kernel releases a
/// link whose last reference was a pin only later, from a work queue, and until then
/// its interface refuses an attachment in another mode; so the link is opened first,
/// and closing that last descriptor detaches it at once.
fn remove_pin(path: &Path) -> Result<(), DataplaneError> {
    let held = PinnedLink::from_pin(path).ok().map(FdLink::from);
    let removed = match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DataplaneError::Pins(format!(
            "removing {}: {e}",
            path.display()
        ))),
        _ => Ok(()),
    };
    drop(held);
    removed
}

/// Removes the pins a predecessor left under `pin_dir` (detaching its program), for an
/// agent that will not adopt them: it relays on the userspace path, or could not load
/// the program. A directory not on a BPF file system holds no pins.
pub fn remove_pins(pin_dir: &Path) {
    if !bpf_pins::is_bpffs(pin_dir) {
        return;
    }
    match std::fs::remove_dir_all(pin_dir) {
        Ok(()) => {
            info!(dir = %pin_dir.display(), "removed the data plane a previous agent left pinned")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(dir = %pin_dir.display(), error = %e, "could not remove the pins"),
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
