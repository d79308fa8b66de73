//! `myconet-agent`: loads the XDP relay, serves the control API (`shell::api` in lib.rs)
//! and handles what the kernel passes up, until SIGTERM or SIGINT.

use std::{sync::Arc, time::Instant};

use anyhow::Context;
use clap::{CommandFactory, Parser};
use myconet_agent::os::{
    bpf_pins::PinDir,
    caps::{self, CapSet},
    dataplane::{self, XdpDataplane},
    netlink::{self, Netlink},
    pin_store,
    seqno_store::SeqnoStore,
    sysctl,
    tun::{Tun, TunError, TunOptions},
    watch::{self, UnderlayWatch},
};
use myconet_agent::shell::{
    api::{self, ControlService, ControlSocket},
    content::Content,
    discovery::{Beaconer, DiscoveryConfig, ReceivedBeacon},
    link::Links,
    metrics,
    node::{ConfiguredInterface, Node},
    overlay::{self, Overlay},
    underlay,
};
use myconet_agent::{
    config::{Cli, DataplaneChoice},
    generate,
    identity::{Identity, KEY_FILE, StateLock},
    logging, preflight,
};
use myconet_core::{id::LinkEndpoint, pins, routing::RoutingConfig};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, info, warn};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(dir) = &cli.generate_docs {
        return generate::write_docs(Cli::command(), dir);
    }
    if let Some(problem) = logging::init(cli.log_format) {
        warn!("{problem}");
    }
    let settings = cli.resolve()?;
    // Everything that can be found wrong is found before anything is claimed.
    preflight::check(&settings)?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run(settings))
}

async fn run(settings: myconet_agent::config::Settings) -> anyhow::Result<()> {
    // Claim the control socket before touching the system: a second agent started by
    // mistake must fail with "already serving" and change nothing.
    let control_socket = ControlSocket::claim(&settings.socket, settings.socket_mode).await?;
    let _state_lock = StateLock::acquire(&settings.state_dir)?;
    let (identity, created) = Identity::open(&settings.state_dir)?;
    let key_path = settings.state_dir.join(KEY_FILE);
    if created {
        info!(
            path = %key_path.display(),
            address = %identity.node_address(),
            prefix = %identity.node_prefix(),
            "identity created"
        );
    } else {
        info!(
            path = %key_path.display(),
            address = %identity.node_address(),
            prefix = %identity.node_prefix(),
            "identity loaded"
        );
    }

    // A predecessor that left its data plane pinned (killed, or a hitless exit) is
    // still relaying: its sysctls must stay until this agent has taken over.
    let adopting = settings.dataplane != DataplaneChoice::Userspace
        && !settings.interfaces.is_empty()
        && PinDir::has_links(&settings.pin_dir);
    let mut journal = sysctl::Journal::open(&settings.state_dir, adopting).with_context(|| {
        format!(
            "opening the sysctl journal in {}",
            settings.state_dir.display()
        )
    })?;
    let (dataplane, interfaces) = set_up_dataplane(&settings, &mut journal)?;
    let xdp_loaded = dataplane.is_some();
    let node = Arc::new(Node::new(identity, settings.port, dataplane, journal)?);
    node.set_interfaces(settings.dataplane.as_str(), interfaces);
    let content = Content::open(settings.content.clone(), node.identity_arc()).await?;
    let result = serve(&node, &settings, control_socket, xdp_loaded, &content).await;
    content.shutdown().await;
    let hitless = matches!(result, Ok(Exit::Hitless));
    node.shutdown(hitless);
    info!(hitless, "stopped");
    result.map(|_| ())
}

/// How the agent was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// Detach, remove the pins, restore the sysctls.
    Clean,
    /// Leave the pinned data plane relaying for the next agent.
    Hitless,
}

/// Loads the program, pinned under `settings.pin_dir` when that is on a BPF file
/// system (with a warning naming the remedy when it is not).
fn load_dataplane(
    settings: &myconet_agent::config::Settings,
) -> Result<XdpDataplane, dataplane::DataplaneError> {
    match XdpDataplane::load_pinned(settings.port, &settings.pin_dir) {
        Ok(dp) => Ok(dp),
        Err(dataplane::DataplaneError::Pins(reason)) => {
            warn!(
                reason,
                "XDP not pinned: the program and its maps go with this process, so an \
                 agent restart stops relaying until the new agent is up"
            );
            XdpDataplane::load(settings.port)
        }
        Err(e) => Err(e),
    }
}

/// Attaches XDP as `--dataplane` asks and records which path relays each interface.
///
/// - `userspace`: nothing is attached.
/// - `xdp`: every interface must attach (and get its sysctls), or start-up fails with
///   the kernel's reason and nothing is left changed.
/// - `auto`: each interface gets XDP where it attaches and the agent's userspace path,
///   with a warning naming the reason, where it does not; if the program does not even
///   load, every interface does. The userspace path relays whatever reaches the agent,
///   so XDP and userspace interfaces mix: XDP passes packets bound for a userspace
///   interface up to the agent (`pass_slow_path`), which relays them.
fn set_up_dataplane(
    settings: &myconet_agent::config::Settings,
    journal: &mut sysctl::Journal,
) -> anyhow::Result<(Option<XdpDataplane>, Vec<ConfiguredInterface>)> {
    let mut interfaces = Vec::with_capacity(settings.interfaces.len());
    for name in &settings.interfaces {
        interfaces.push(ConfiguredInterface {
            name: name.clone(),
            ifindex: dataplane::ifindex(name)?,
            userspace_reason: None,
        });
    }
    let all_userspace = |mut list: Vec<ConfiguredInterface>, reason: &str| {
        for i in &mut list {
            i.userspace_reason = Some(reason.to_string());
        }
        list
    };
    if interfaces.is_empty() {
        warn!("no --interface given: relaying on the userspace path only");
        return Ok((None, interfaces));
    }
    let strict = match settings.dataplane {
        DataplaneChoice::Userspace => {
            info!("--dataplane userspace: XDP not attached, the agent relays every packet");
            dataplane::remove_pins(&settings.pin_dir);
            return Ok((None, all_userspace(interfaces, "--dataplane userspace")));
        }
        DataplaneChoice::Xdp => true,
        DataplaneChoice::Auto => false,
    };
    let mut dp = match load_dataplane(settings) {
        Ok(dp) => dp,
        Err(e) if !strict => {
            let reason = format!("{e:#}");
            warn!(
                error = reason,
                "XDP unavailable: every interface takes the userspace data path (slower)"
            );
            dataplane::remove_pins(&settings.pin_dir);
            return Ok((None, all_userspace(interfaces, &reason)));
        }
        Err(e) => {
            dataplane::remove_pins(&settings.pin_dir);
            return Err(e.into());
        }
    };
    for iface in &mut interfaces {
        match attach_one(&mut dp, iface, settings, journal) {
            Ok(()) => {}
            Err(e) if strict => {
                // Dropping `dp` detaches what was attached; the sysctls go back too.
                drop(dp);
                journal.restore_and_clear();
                return Err(e);
            }
            Err(e) => {
                let reason = format!("{e:#}");
                warn!(
                    iface = iface.name,
                    error = reason,
                    "XDP not attached: this interface's traffic takes the userspace data path (slower)"
                );
                iface.userspace_reason = Some(reason);
            }
        }
    }
    // Whatever a predecessor pinned that this agent does not use goes now.
    if let Err(e) = dp.finish_adoption() {
        warn!(error = %e, "could not remove all the pinned state this agent does not use");
    }
    if interfaces.iter().all(|i| i.userspace_reason.is_some()) {
        warn!("XDP attached nowhere: every interface takes the userspace data path (slower)");
        return Ok((None, interfaces));
    }
    Ok((Some(dp), interfaces))
}

/// Attaches XDP to one interface, then enables the IPv6 forwarding `bpf_fib_lookup`
/// needs on it (only where XDP runs: the userspace path does not need it). Under
/// `auto`, a sysctl failure leaves the attachment in place (relayed packets then take
/// the slow path) and is only logged.
fn attach_one(
    dp: &mut XdpDataplane,
    iface: &ConfiguredInterface,
    settings: &myconet_agent::config::Settings,
    journal: &mut sysctl::Journal,
) -> anyhow::Result<()> {
    dp.attach(&iface.name, settings.xdp_mode)?;
    if settings.manage_sysctl
        && let Err(e) = journal.prepare(&iface.name)
    {
        let e = anyhow::Error::new(e).context(format!("setting IPv6 sysctls on {}", iface.name));
        if settings.dataplane == DataplaneChoice::Xdp {
            return Err(e);
        }
        warn!(
            iface = iface.name,
            error = format!("{e:#}"),
            "relayed packets will take the slow path"
        );
    }
    Ok(())
}

async fn serve(
    node: &Arc<Node>,
    settings: &myconet_agent::config::Settings,
    control_socket: ControlSocket,
    xdp_loaded: bool,
    content: &Arc<Content>,
) -> anyhow::Result<Exit> {
    let pins = pin_store::load(&settings.state_dir, pins::DEFAULT_CAPACITY).shared();
    for key in &settings.pinned_keys {
        pins::lock(&pins).set_operator(key);
    }
    let links = Arc::new(Links::new(
        node.clone(),
        settings.peer_config.clone(),
        RoutingConfig::default(),
        SeqnoStore::open(&settings.state_dir),
        pins.clone(),
        Instant::now(),
        myconet_agent::shell::jitter_seed(),
    )?);
    for p in &settings.peers {
        // Configured neighbours are known by endpoint; they enter the relay peer map
        // only once their link handshake proves a key.
        let endpoint = LinkEndpoint::from(p.endpoint);
        links
            .add_static(endpoint)
            .with_context(|| format!("static peer {}", p.endpoint))?;
        if p.cost.is_some() {
            links.set_link_cost(endpoint, p.cost);
        }
    }
    for (prefix, nh) in &settings.routes {
        node.add_route(*prefix, *nh)
            .with_context(|| format!("static route {prefix}"))?;
    }
    // The data plane relays only packets sent to this node's own addresses: read them
    // (and follow every later change) before the agent reports ready.
    let watch = UnderlayWatch::start(node.clone())
        .await
        .context("reading the underlay state over rtnetlink")?;
    let socket = Arc::new(
        underlay::bind(settings.port)
            .with_context(|| format!("binding UDP [::]:{}", settings.port))?,
    );
    let tun = match &settings.tun_name {
        Some(name) => Some(open_tun(node, settings, name).await?),
        None => None,
    };
    match &tun {
        // The content protocol rides the overlay: it listens on the overlay address.
        Some(t) => {
            content.listen(Some(t.name()))?;
        }
        None => info!("no TUN device: the content protocol does not listen (local API only)"),
    }
    let overlay = Arc::new(Overlay::new(
        node.clone(),
        socket.clone(),
        tun,
        links.clone(),
        overlay::session_config(),
    )?);
    let mut tasks = vec![
        tokio::spawn(underlay::run(node.clone(), socket, overlay.clone())),
        tokio::spawn(overlay.clone().run_tun()),
        tokio::spawn(overlay.run_timers()),
        tokio::spawn(node.clone().refresh_nexthops_forever()),
        tokio::spawn(watch::follow_forever(watch)),
        tokio::spawn(save_pins_forever(pins.clone(), settings.state_dir.clone())),
    ];
    if !settings.discover.is_empty() {
        tasks.extend(start_discovery(node, &links, settings)?);
    }
    if let Some(addr) = settings.metrics_listen {
        let listener = metrics::bind(addr).await?;
        let service = ControlService::new(node.clone(), links.clone());
        tasks.push(tokio::spawn(metrics::serve(listener, service)));
    }
    // Everything that needs privilege at set-up is done: sockets bound, TUN open, XDP
    // attached. Keep only what running needs (caps.rs says which and why).
    drop_capabilities(xdp_loaded)?;

    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("installing SIGUSR2 handler")?;
    // SIGTERM and SIGINT stop cleanly unless the operator configured hitless restarts;
    // SIGUSR2 always leaves the pinned data plane relaying for the next agent.
    let on_stop = if settings.hitless_restart {
        Exit::Hitless
    } else {
        Exit::Clean
    };
    let exit = Arc::new(std::sync::Mutex::new(Exit::Clean));
    let asked = exit.clone();
    let shutdown = async move {
        let how = tokio::select! {
            _ = term.recv() => { info!("SIGTERM: shutting down"); on_stop }
            _ = int.recv() => { info!("SIGINT: shutting down"); on_stop }
            _ = usr2.recv() => { info!("SIGUSR2: exiting, leaving the data plane relaying"); Exit::Hitless }
        };
        *asked.lock().unwrap_or_else(|p| p.into_inner()) = how;
    };
    info!(socket = %settings.socket.display(), port = settings.port, "agent ready");
    let served = api::serve_on(
        node.clone(),
        links,
        Some(content.service()),
        control_socket,
        shutdown,
    )
    .await;
    for t in tasks {
        t.abort();
    }
    save_pins(&pins, &settings.state_dir);
    served?;
    let how = *exit.lock().unwrap_or_else(|p| p.into_inner());
    Ok(how)
}

/// Persists the pins once a minute when they changed (a crash loses at most a minute
/// of newly learned pins; they are learned again from the next announcements).
async fn save_pins_forever(pins: pins::SharedPins, state_dir: std::path::PathBuf) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (p, d) = (pins.clone(), state_dir.clone());
        let _ = tokio::task::spawn_blocking(move || save_pins(&p, &d)).await;
    }
}

fn save_pins(pins: &pins::SharedPins, state_dir: &std::path::Path) {
    if let Err(e) = pin_store::save_if_changed(pins, state_dir) {
        warn!(error = %e, dir = %state_dir.display(), "cannot persist the key pins");
    }
}

/// Starts beaconing on the `--discover` interfaces and feeds what arrives to the
/// neighbour layer, which verifies each beacon and starts a link handshake that must
/// prove the announced key.
fn start_discovery(
    node: &Arc<Node>,
    links: &Arc<Links>,
    settings: &myconet_agent::config::Settings,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut ifindexes = Vec::new();
    for iface in &settings.discover {
        let index = dataplane::ifindex(iface)?;
        links.enable_discovery(index);
        ifindexes.push(index);
    }
    let beaconer = Beaconer::bind(DiscoveryConfig::new(settings.port), &ifindexes)
        .context("opening the discovery sockets")?;
    info!(interfaces = ?settings.discover, "discovering neighbours by link-local beacons");
    let (tx, mut rx) = tokio::sync::mpsc::channel::<ReceivedBeacon>(256);
    let signer = node.clone();
    let beacons = tokio::spawn(async move {
        if let Err(e) = beaconer.run(signer, tx).await {
            warn!(error = %e, "discovery stopped");
        }
    });
    let links = links.clone();
    let intake = tokio::spawn(async move {
        while let Some(beacon) = rx.recv().await {
            match links.with_manager(|m| beacon.deliver(m)) {
                Ok(outcome) => debug!(?outcome, from = %beacon.from, "beacon"),
                Err(reason) => {
                    debug!(reason = reason.name(), from = %beacon.from, "beacon rejected")
                }
            }
        }
    });
    Ok(vec![beacons, intake])
}

/// Drops every capability the running agent does not need, in every thread, and says
/// which it kept.
fn drop_capabilities(xdp_loaded: bool) -> anyhow::Result<()> {
    let before = caps::effective();
    let kept = caps::drop_to(caps::needed_after_setup(xdp_loaded))
        .context("dropping the capabilities set-up needed")?;
    info!(
        kept = %kept,
        dropped = %CapSet(before.0 & !kept.0),
        "capabilities dropped after set-up"
    );
    Ok(())
}

/// Creates the TUN device and gives it the node's address, the overlay route and an MTU
/// that fits the smallest underlay link after encapsulation.
async fn open_tun(
    node: &Node,
    settings: &myconet_agent::config::Settings,
    name: &str,
) -> anyhow::Result<Tun> {
    let tun = create_tun(name)?;
    let nl = Netlink::connect().context("opening rtnetlink")?;
    let mut underlay_mtu = u32::MAX;
    for iface in &settings.interfaces {
        let index = dataplane::ifindex(iface)?;
        underlay_mtu = underlay_mtu.min(nl.underlay_mtu(index).await?);
    }
    if underlay_mtu == u32::MAX {
        underlay_mtu = 1500;
    }
    let mtu = netlink::overlay_mtu(underlay_mtu)?;
    let index = nl.link_index(tun.name()).await?;
    nl.configure_tun(index, node.identity().node_address(), mtu)
        .await
        .with_context(|| format!("configuring {name}"))?;
    info!(tun = name, mtu, address = %node.identity().node_address(), "overlay interface up");
    Ok(tun)
}

/// Opens the TUN device with checksum/segmentation offload (TCP moves across it in
/// superpackets), or without it where the kernel refuses, which is logged once: the
/// plain path carries the same packets, only one per system call.
fn create_tun(name: &str) -> anyhow::Result<Tun> {
    let offload = TunOptions {
        offload: true,
        ..TunOptions::default()
    };
    match Tun::create(name, offload) {
        Ok(tun) => {
            if let Some(flags) = tun.offload() {
                info!(tun = name, offload = %flags, "TUN offload on");
            }
            Ok(tun)
        }
        // Not an offload problem: no fallback, and no warning about offload before the
        // real error.
        Err(e @ TunError::Open { .. }) if os_error(&e).is_some_and(is_denied) => {
            Err(anyhow::Error::new(e).context(preflight::tun_device_error(name)))
        }
        Err(e) if os_error(&e).is_some_and(is_denied) => {
            Err(anyhow::Error::new(e).context(preflight::tun_capability_error(name)))
        }
        Err(e) => {
            warn!(tun = name, error = %e, "TUN offload unavailable: one packet per read and write");
            Tun::create(name, TunOptions::default())
                .with_context(|| format!("creating TUN device {name}"))
        }
    }
}

/// The OS error at the root of `e`, if any.
fn os_error(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(code) = c
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
        {
            return Some(code);
        }
        cause = c.source();
    }
    None
}

/// EPERM or EACCES: a missing capability or file permission, not something an
/// offload-less retry would fix.
fn is_denied(code: i32) -> bool {
    code == libc::EPERM || code == libc::EACCES
}
