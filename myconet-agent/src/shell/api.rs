//! The gRPC control API (`proto/myconet.proto`) served on a Unix socket.
//!
//! A Unix socket rather than TCP so that access control is plain file permissions: the
//! socket is created with the requested mode before anyone can reach it (it is bound in a
//! private directory and linked into place), so there is no window in which a client
//! with fewer rights could connect.
//!
//! Two agents started at once on one path must not both believe they serve it: the
//! claim holds an exclusive `flock` on `<socket>.lock` for the agent's lifetime, taken
//! before the stale-socket check, and the fresh socket is placed with `link(2)`, which
//! never replaces an existing file. Every RPC is a thin translation between the proto
//! messages and [`Node`]; validation beyond syntax lives in `Node`, and every refusal is
//! mapped to a gRPC code the CLI can show as is.

use std::{
    future::Future,
    io,
    net::Ipv6Addr,
    os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use myconet_common::{addr, wire::DEFAULT_PORT};
use myconet_proto::content::v1::content_server::ContentServer;
use myconet_proto::v1 as pb;
use myconet_proto::v1::control_server::{Control, ControlServer};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use tracing::{error, info, warn};

use crate::os::lockfile::{LockError, LockFile};
use crate::shell::{
    content::grpc::ContentService,
    link::Links,
    node::{Node, NodeError, RouteRow},
};
use myconet_core::{
    id::LinkEndpoint,
    rib::{NextHop, Origin, Prefix, RouteTarget},
    routing::{Explanation, NotChosen, RouteSnapshot, Selection},
};

/// A control socket claimed by this agent, not yet serving.
///
/// Claiming happens first at start-up, before XDP or sysctls are touched, so a second
/// agent started by mistake fails with "already serving" and changes nothing.
#[derive(Debug)]
pub struct ControlSocket {
    listener: Option<UnixListener>,
    identity: FileIdentity,
    path: PathBuf,
    // Dropped last: the socket file goes before the lock that guards its path.
    _lock: SocketLock,
}

impl ControlSocket {
    /// Claims `socket` with permission bits `mode`.
    ///
    /// Refuses when another agent answers on the same path, because silently replacing
    /// its socket would leave that agent unreachable. A socket file nobody answers on is
    /// a leftover from a crash and is replaced. `mode` is applied before the socket
    /// becomes reachable under `socket`.
    pub async fn claim(socket: &Path, mode: u32) -> anyhow::Result<Self> {
        check_path(socket)?;
        create_parent(socket)?;
        let lock = SocketLock::acquire(socket)?;
        let (listener, identity) = bind(socket, mode).await?;
        info!(
            socket = %socket.display(),
            mode = format_args!("{:o}", mode & 0o7777),
            "control API listening"
        );
        Ok(Self {
            listener: Some(listener),
            identity,
            path: socket.to_path_buf(),
            _lock: lock,
        })
    }
}

/// An exclusive lock on `<socket>.lock`, held while an agent owns the socket path.
///
/// Whoever holds it is the only agent checking for, removing or placing a socket at that
/// path, so two agents started at once cannot both pass the stale check.
#[derive(Debug)]
struct SocketLock(#[allow(dead_code)] LockFile);

impl SocketLock {
    fn acquire(socket: &Path) -> anyhow::Result<Self> {
        let mut name = socket.file_name().unwrap_or_default().to_os_string();
        name.push(".lock");
        let path = socket.with_file_name(name);
        match LockFile::acquire(&path) {
            Ok(lock) => Ok(Self(lock)),
            Err(LockError::Held(path)) => bail!(
                "another agent is already serving on {} (it holds {})",
                socket.display(),
                path.display()
            ),
            Err(e) => Err(anyhow::Error::new(e).context("control socket lock")),
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        remove_if_ours(&self.path, self.identity);
    }
}

/// Serves the control API on a claimed socket until `shutdown` completes, then removes
/// the socket.
pub async fn serve_on(
    node: Arc<Node>,
    links: Arc<Links>,
    content: Option<ContentServer<ContentService>>,
    socket: ControlSocket,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut socket = socket;
    let listener = socket
        .listener
        .take()
        .context("control socket already served")?;
    // Standard gRPC health checking (`grpc.health.v1.Health`: "" and
    // "myconet.v1.Control" answer SERVING) and server reflection, so generic tools
    // (grpcurl, grpc-health-probe) can probe and call the API without the .proto file.
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<ControlServer<ControlService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the gRPC reflection service")?;
    let served = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(ControlServer::new(ControlService::new(node, links)))
        .add_optional_service(content)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .with_context(|| format!("serving the control API on {}", socket.path.display()));
    // Dropping `socket` removes the socket file if it is still ours.
    drop(socket);
    served
}

/// Claims `socket` and serves on it until `shutdown` completes (see
/// [`ControlSocket::claim`] and [`serve_on`]).
pub async fn serve(
    node: Arc<Node>,
    links: Arc<Links>,
    socket: &Path,
    mode: u32,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let claimed = ControlSocket::claim(socket, mode).await?;
    serve_on(node, links, None, claimed, shutdown).await
}

/// Longest path a Unix socket can be bound at (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Device and inode of the socket we created, so shutdown never removes a file that
/// someone else put at the same path in the meantime.
type FileIdentity = (u64, u64);

/// Refuses paths a Unix socket cannot be bound at, before anything is created.
fn check_path(socket: &Path) -> anyhow::Result<()> {
    if socket.file_name().is_none() {
        bail!("control socket path {} has no file name", socket.display());
    }
    let len = socket.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        bail!(
            "control socket path {} is {len} bytes long; Unix sockets allow at most {MAX_SOCKET_PATH}",
            socket.display()
        );
    }
    Ok(())
}

/// What can be known about `socket` without claiming it, for the start-up checks: a
/// path a Unix socket can be bound at, nothing there but (at most) a socket, and a
/// parent that is, or can become, a directory.
pub fn check_socket_path(socket: &Path) -> anyhow::Result<()> {
    check_path(socket)?;
    match std::fs::symlink_metadata(socket) {
        Ok(meta) if !meta.file_type().is_socket() => bail!(
            "{} exists and is not a socket; refusing to replace it",
            socket.display()
        ),
        _ => {}
    }
    crate::preflight::check_dir_path("control socket directory", &parent_dir(socket))
}

fn parent_dir(socket: &Path) -> PathBuf {
    match socket.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn create_parent(socket: &Path) -> anyhow::Result<()> {
    let parent = parent_dir(socket);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&parent)
        .with_context(|| format!("creating {}", parent.display()))
}

/// Replaces a stale socket at `socket` and binds a fresh one there with `mode`. Only
/// called with the path's [`SocketLock`] held.
async fn bind(socket: &Path, mode: u32) -> anyhow::Result<(UnixListener, FileIdentity)> {
    let parent = parent_dir(socket);
    match std::fs::symlink_metadata(socket) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(socket).await {
            Ok(_) => bail!("another agent is already serving on {}", socket.display()),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                warn!(socket = %socket.display(), "removing stale control socket");
                std::fs::remove_file(socket)
                    .with_context(|| format!("removing stale socket {}", socket.display()))?;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "checking whether an agent is serving on {}",
                        socket.display()
                    )
                });
            }
        },
        Ok(_) => bail!(
            "{} exists and is not a socket; refusing to replace it",
            socket.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", socket.display())),
    }

    // Bind inside a directory only we can enter, fix the mode, then link into place:
    // the socket is never reachable with the umask's permissions.
    // Short names: the staged path must fit in sun_path just like the final one.
    static STAGED: AtomicU32 = AtomicU32::new(0);
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let private = parent.join(format!(
        ".{:x}{nonce:x}{:x}",
        std::process::id(),
        STAGED.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .with_context(|| format!("creating {}", private.display()))?;
    let staged = private.join("s");
    let bound = stage(&staged, socket, mode);
    let _ = std::fs::remove_file(&staged);
    if let Err(e) = std::fs::remove_dir(&private) {
        warn!(dir = %private.display(), error = %e, "could not remove temporary directory");
    }
    let listener = bound?;
    let meta = std::fs::symlink_metadata(socket)
        .with_context(|| format!("inspecting {}", socket.display()))?;
    Ok((listener, (meta.dev(), meta.ino())))
}

/// Binds at `staged`, applies `mode` and links the socket to `socket`. A hard link
/// (unlike `rename`) fails rather than replace a file that appeared at `socket` since
/// the check, e.g. one placed by a program that does not take the lock.
fn stage(staged: &Path, socket: &Path, mode: u32) -> anyhow::Result<UnixListener> {
    let listener =
        UnixListener::bind(staged).with_context(|| format!("binding {}", staged.display()))?;
    std::fs::set_permissions(staged, std::fs::Permissions::from_mode(mode & 0o7777))
        .with_context(|| format!("setting mode {:o} on {}", mode, staged.display()))?;
    match std::fs::hard_link(staged, socket) {
        Ok(()) => Ok(listener),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => bail!(
            "{} appeared while this agent was starting; refusing to replace it",
            socket.display()
        ),
        Err(e) => {
            Err(e).with_context(|| format!("placing the control socket at {}", socket.display()))
        }
    }
}

fn remove_if_ours(socket: &Path, identity: FileIdentity) {
    match std::fs::symlink_metadata(socket) {
        Ok(meta) if (meta.dev(), meta.ino()) == identity => {
            if let Err(e) = std::fs::remove_file(socket) {
                warn!(socket = %socket.display(), error = %e, "could not remove control socket");
            }
        }
        Ok(_) => warn!(
            socket = %socket.display(),
            "control socket was replaced by someone else; leaving it"
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!(socket = %socket.display(), error = %e, "could not inspect control socket"),
    }
}

/// The `Control` service: translates proto messages to [`Node`] calls and back.
#[derive(Debug, Clone)]
pub struct ControlService {
    node: Arc<Node>,
    links: Arc<Links>,
}

impl ControlService {
    /// Wraps the node and the neighbour layer the RPCs act on.
    pub fn new(node: Arc<Node>, links: Arc<Links>) -> Self {
        Self { node, links }
    }

    /// The endpoint a peer request names: a link-local address needs its interface.
    fn endpoint(&self, address: &str, port: u32, interface: &str) -> Result<LinkEndpoint, Status> {
        let addr = parse_addr("address", address)?;
        let port = parse_port("port", port)?;
        let interface = interface.trim();
        let scope = if addr.is_unicast_link_local() {
            if interface.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "{addr} is link-local: name the interface it is on"
                )));
            }
            crate::os::dataplane::ifindex(interface)
                .map_err(|e| Status::invalid_argument(format!("interface {interface:?}: {e}")))?
        } else {
            0
        };
        let endpoint = LinkEndpoint::new(addr, port, scope);
        endpoint
            .validate()
            .map_err(|e| Status::invalid_argument(format!("peer {endpoint}: {e}")))?;
        Ok(endpoint)
    }

    /// Every neighbour with its link state, and whether the relay peer map holds it.
    fn peer_rows(&self) -> Result<Vec<pb::Peer>, Status> {
        let in_map: std::collections::BTreeSet<LinkEndpoint> = self
            .node
            .peers()
            .map_err(node_status)?
            .into_iter()
            .filter(|(_, in_kernel)| *in_kernel || !self.node.has_dataplane())
            .map(|(e, _)| e)
            .collect();
        let millis = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let micros = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        Ok(self
            .links
            .snapshot(std::time::Instant::now())
            .into_iter()
            .map(|p| pb::Peer {
                address: p.endpoint.addr().to_string(),
                port: u32::from(p.endpoint.port()),
                in_kernel: in_map.contains(&p.endpoint),
                state: p.state_name().to_string(),
                origin: p.origin.name().to_string(),
                node_key: p.node_key_hex().unwrap_or_default(),
                node_address: p
                    .node_key
                    .or(p.announced_key)
                    .map(|k| k.node_address().to_string())
                    .unwrap_or_default(),
                interface: p.endpoint.scope_id(),
                last_seen_ms: p.last_seen_age.map(millis),
                state_age_ms: millis(p.state_age),
                rtt_us: p.srtt.map(micros),
                rttvar_us: p.rttvar.map(micros),
                loss: p.loss,
                connect_attempts: p.connect_attempts,
                link_cost: self.links.link_cost(p.endpoint).map(u32::from),
            })
            .collect())
    }
}

/// Maps a node refusal to the gRPC code that tells the caller whether retrying with
/// different input can help.
fn node_status(e: NodeError) -> Status {
    match e {
        NodeError::OwnPrefix(_) => Status::failed_precondition(e.to_string()),
        NodeError::InvalidNextHop(..) | NodeError::InvalidPeer(..) => {
            Status::invalid_argument(e.to_string())
        }
        NodeError::Dataplane(_) => {
            error!(error = %e, "data plane operation failed");
            Status::internal(e.to_string())
        }
    }
}

fn key_pin(prefix: u64, key: [u8; 32], source: myconet_core::pins::PinSource) -> pb::KeyPin {
    pb::KeyPin {
        prefix: format!("{}/64", Ipv6Addr::from(u128::from(prefix) << 64)),
        key: key.iter().map(|b| format!("{b:02x}")).collect(),
        source: source.name().to_string(),
    }
}

fn parse_addr(field: &str, value: &str) -> Result<Ipv6Addr, Status> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    trimmed.parse().map_err(|_| {
        Status::invalid_argument(format!(
            "{field} {value:?} is not an IPv6 address (the underlay is IPv6-only)"
        ))
    })
}

/// Port 0 (the proto default) means the Myconet default port.
fn parse_port(field: &str, value: u32) -> Result<u16, Status> {
    match value {
        0 => Ok(DEFAULT_PORT),
        v => u16::try_from(v).map_err(|_| {
            Status::invalid_argument(format!("{field} {v} is out of range (1-65535)"))
        }),
    }
}

fn parse_prefix(value: &str) -> Result<Prefix, Status> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(Status::invalid_argument("prefix is required"));
    }
    trimmed
        .parse()
        .map_err(|e| Status::invalid_argument(format!("prefix {value:?}: {e}")))
}

fn route_entry(target: RouteTarget, origin: Option<Origin>) -> pb::RouteEntry {
    pb::RouteEntry {
        action: target.action_name().to_string(),
        next_hop: match target {
            RouteTarget::Local => None,
            RouteTarget::Forward(nh) => Some(pb::NextHop {
                address: nh.addr.to_string(),
                port: u32::from(nh.port),
                ifindex: nh.ifindex,
            }),
        },
        origin: origin.map(|o| o.as_str().to_string()).unwrap_or_default(),
    }
}

/// A RIB/kernel row with the routing protocol's selected route for the prefix.
fn route_row(row: &RouteRow, candidates: &[RouteSnapshot<LinkEndpoint>]) -> pb::RouteRow {
    let mine = candidates.iter().filter(|c| {
        Prefix::new(c.prefix, c.plen).is_ok_and(|p| p == row.prefix) && c.next_hop.is_some()
    });
    let count = mine.clone().count();
    pb::RouteRow {
        prefix: row.prefix.to_string(),
        agent: row.agent.map(|e| route_entry(e.target, Some(e.origin))),
        kernel: row.kernel.map(|t| route_entry(t, None)),
        in_sync: row.in_sync(),
        routing: mine.clone().find(|c| c.selected).map(routing_info),
        candidates: saturating_u32(count),
    }
}

fn hex(key: &[u8; 32]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

fn routing_info(r: &RouteSnapshot<LinkEndpoint>) -> pb::RoutingInfo {
    pb::RoutingInfo {
        next_hop: r.next_hop.map(|n| pb::NextHop {
            address: n.addr().to_string(),
            port: u32::from(n.port()),
            ifindex: n.scope_id(),
        }),
        next_hop_key: r.next_hop_key.as_ref().map(hex).unwrap_or_default(),
        origin_key: hex(&r.origin),
        metric: u32::from(r.metric),
        advertised_metric: u32::from(r.advertised_metric),
        link_cost: u32::from(r.link_cost),
        seqno: r.seqno,
        feasible: r.feasible,
        fd_seqno: r.feasibility_distance.map(|f| f.seqno),
        fd_metric: r.feasibility_distance.map(|f| u32::from(f.metric)),
        age_ms: u64::try_from(r.age.as_millis()).unwrap_or(u64::MAX),
        selected: r.selected,
    }
}

/// What carries an address and why, from the installed route and the routing
/// protocol's view, for `route get`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Decision {
    /// "local", "static", "routing" or "none".
    decided_by: &'static str,
    /// A static route carries it although the protocol selected another next hop.
    overridden: bool,
    /// The same for people.
    sentence: String,
}

/// Why the routing protocol selected what it did, as a clause.
fn selection_reason(e: &Explanation<LinkEndpoint>) -> String {
    match e.selection {
        Selection::NotOverlay => "not an overlay address".to_string(),
        Selection::Local => "this node's own prefix".to_string(),
        Selection::NoRoute => "no feasible route".to_string(),
        Selection::OnlyFeasible => "the only feasible route".to_string(),
        Selection::LowestMetric => {
            let feasible = 1 + e
                .alternatives
                .iter()
                .filter(|(_, why)| matches!(why, NotChosen::HigherMetric))
                .count();
            format!("the lowest metric of {feasible} feasible routes")
        }
        Selection::Hysteresis {
            best_alternative,
            margin,
        } => format!(
            "kept by hysteresis: the best alternative (metric {best_alternative}) is not \
             better by the required {margin}"
        ),
    }
}

fn decide(e: &Explanation<LinkEndpoint>, installed: Option<&RouteRow>) -> Decision {
    let addr = e.addr;
    let chosen = e
        .selected
        .as_ref()
        .and_then(|s| s.next_hop.map(|n| (n, s.metric, s.seqno)));
    let protocol = match chosen {
        Some((n, metric, seqno)) => format!(
            "via {n} (metric {metric}, seqno {seqno}: {})",
            selection_reason(e)
        ),
        None => String::new(),
    };
    let entry = installed.and_then(|row| row.agent.map(|a| (row.prefix, a)));
    let Some((prefix, entry)) = entry else {
        let sentence = match e.selection {
            Selection::NotOverlay => {
                format!("{addr} is not an overlay address (outside fd6d::/16); nothing routes it")
            }
            _ => format!(
                "no route carries {addr}: the routing protocol has {}",
                if protocol.is_empty() {
                    "no feasible route to it".to_string()
                } else {
                    format!("selected {protocol}, but nothing is installed")
                }
            ),
        };
        return Decision {
            decided_by: "none",
            overridden: false,
            sentence,
        };
    };
    let via = match entry.target {
        RouteTarget::Local => String::new(),
        RouteTarget::Forward(nh) => format!("[{}]:{}", nh.addr, nh.port),
    };
    match (entry.origin, entry.target) {
        (Origin::Local, _) | (_, RouteTarget::Local) => Decision {
            decided_by: "local",
            overridden: false,
            sentence: format!("{addr} is in {prefix}, local to this node: delivered here"),
        },
        (Origin::Static, RouteTarget::Forward(nh)) => {
            let same = chosen.is_some_and(|(n, ..)| n.addr() == nh.addr && n.port() == nh.port);
            let sentence = match chosen {
                None => format!(
                    "a static route via {via} carries {addr} ({prefix}); the routing \
                     protocol has no route to it"
                ),
                Some(_) if same => format!(
                    "a static route via {via} carries {addr} ({prefix}); the routing \
                     protocol selects the same next hop {protocol}"
                ),
                Some(_) => format!(
                    "a static route via {via} carries {addr} ({prefix}), overriding the \
                     routing protocol's choice {protocol}"
                ),
            };
            Decision {
                decided_by: "static",
                overridden: chosen.is_some() && !same,
                sentence,
            }
        }
        (Origin::Routing, RouteTarget::Forward(_)) => Decision {
            decided_by: "routing",
            overridden: false,
            sentence: if protocol.is_empty() {
                format!(
                    "the routing protocol's route via {via} carries {addr} ({prefix}); \
                     it is being withdrawn"
                )
            } else {
                format!("the routing protocol carries {addr} ({prefix}) {protocol}")
            },
        },
    }
}

fn selection_name(s: &Selection) -> &'static str {
    match s {
        Selection::NotOverlay => "not_overlay",
        Selection::Local => "local",
        Selection::NoRoute => "no_route",
        Selection::OnlyFeasible => "only_feasible",
        Selection::LowestMetric => "lowest_metric",
        Selection::Hysteresis { .. } => "hysteresis",
    }
}

fn not_chosen_name(n: &NotChosen) -> &'static str {
    match n {
        NotChosen::Unfeasible => "unfeasible",
        NotChosen::InfiniteMetric => "infinite_metric",
        NotChosen::HigherMetric => "higher_metric",
        NotChosen::WithinHysteresis => "within_hysteresis",
    }
}

fn counter(name: &str, c: myconet_common::maps::Counter) -> pb::Counter {
    pb::Counter {
        name: name.to_string(),
        packets: c.packets,
        bytes: c.bytes,
    }
}

fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn get_status(
        &self,
        _request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::Status>, Status> {
        let s = self.node.status();
        Ok(Response::new(pb::Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            public_key: s.public_key,
            node_prefix: s.node_prefix.to_string(),
            node_address: s.node_address.to_string(),
            port: u32::from(s.port),
            interfaces: s
                .interfaces
                .iter()
                .map(|i| pb::Interface {
                    name: i.name.clone(),
                    ifindex: i.ifindex,
                    xdp_mode: i.xdp.map_or("none", |m| m.as_str()).to_string(),
                    userspace_reason: i.userspace_reason.clone(),
                })
                .collect(),
            uptime_seconds: s.uptime_seconds,
            peer_count: saturating_u32(s.peer_count),
            route_count: saturating_u32(s.route_count),
            dataplane: s.dataplane.as_str().to_string(),
            dataplane_requested: s.dataplane_requested,
        }))
    }

    async fn list_peers(
        &self,
        _request: Request<pb::ListPeersRequest>,
    ) -> Result<Response<pb::ListPeersResponse>, Status> {
        Ok(Response::new(pb::ListPeersResponse {
            peers: self.peer_rows()?,
        }))
    }

    /// Adds a configured neighbour. It starts "connecting" and enters the relay peer map
    /// only once its link handshake proves a key.
    async fn add_peer(
        &self,
        request: Request<pb::AddPeerRequest>,
    ) -> Result<Response<pb::Peer>, Status> {
        let req = request.into_inner();
        let endpoint = self.endpoint(&req.address, req.port, &req.interface)?;
        let cost = req
            .cost
            .map(|c| crate::config::link_cost(u64::from(c)))
            .transpose()
            .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        let added = self
            .links
            .add_static(endpoint)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // A new neighbour starts at the default unless told otherwise (a cost set for
        // an earlier one at this endpoint is not inherited); an existing one keeps its
        // cost unless a new one is given.
        if cost.is_some() || added {
            self.links.set_link_cost(endpoint, cost);
        }
        info!(peer = %endpoint, ?cost, added, "peer configured via control API");
        self.peer_rows()?
            .into_iter()
            .find(|p| {
                p.address == endpoint.addr().to_string() && p.port == u32::from(endpoint.port())
            })
            .map(Response::new)
            .ok_or_else(|| Status::internal("peer vanished right after it was added"))
    }

    async fn remove_peer(
        &self,
        request: Request<pb::RemovePeerRequest>,
    ) -> Result<Response<pb::RemovePeerResponse>, Status> {
        let req = request.into_inner();
        let endpoint = self.endpoint(&req.address, req.port, &req.interface)?;
        let removed = self.links.remove(endpoint);
        if removed {
            info!(peer = %endpoint, "peer removed via control API");
        }
        Ok(Response::new(pb::RemovePeerResponse { removed }))
    }

    async fn list_routes(
        &self,
        _request: Request<pb::ListRoutesRequest>,
    ) -> Result<Response<pb::ListRoutesResponse>, Status> {
        let candidates = self.links.route_snapshot(std::time::Instant::now());
        let routes = self
            .node
            .routes()
            .map_err(node_status)?
            .into_iter()
            .map(|row| route_row(&row, &candidates))
            .collect();
        Ok(Response::new(pb::ListRoutesResponse { routes }))
    }

    async fn get_route(
        &self,
        request: Request<pb::GetRouteRequest>,
    ) -> Result<Response<pb::RouteExplanation>, Status> {
        let addr = parse_addr("address", &request.into_inner().address)?;
        let now = std::time::Instant::now();
        let e = self.links.explain(addr, now);
        let candidates = self.links.route_snapshot(now);
        let installed_row = self
            .node
            .routes()
            .map_err(node_status)?
            .into_iter()
            .filter(|row| row.prefix.contains(addr))
            .max_by_key(|row| row.prefix.prefix_len());
        let installed = installed_row
            .as_ref()
            .map(|row| route_row(row, &candidates));
        let decision = decide(&e, installed_row.as_ref());
        Ok(Response::new(pb::RouteExplanation {
            address: addr.to_string(),
            prefix: e
                .prefix
                .map(|(p, l)| format!("{p}/{l}"))
                .or_else(|| installed_row.as_ref().map(|r| r.prefix.to_string()))
                .unwrap_or_default(),
            selection: selection_name(&e.selection).to_string(),
            explanation: decision.sentence,
            decided_by: decision.decided_by.to_string(),
            overridden: decision.overridden,
            selected: e.selected.as_ref().map(routing_info),
            alternatives: e
                .alternatives
                .iter()
                .map(|(r, why)| pb::RejectedRoute {
                    route: Some(routing_info(r)),
                    reason: not_chosen_name(why).to_string(),
                })
                .collect(),
            installed,
        }))
    }

    async fn add_route(
        &self,
        request: Request<pb::AddRouteRequest>,
    ) -> Result<Response<pb::Route>, Status> {
        let req = request.into_inner();
        let prefix = parse_prefix(&req.prefix)?;
        let nh = req
            .next_hop
            .ok_or_else(|| Status::invalid_argument("next_hop is required"))?;
        let next_hop = NextHop {
            addr: parse_addr("next_hop.address", &nh.address)?,
            port: parse_port("next_hop.port", nh.port)?,
            ifindex: nh.ifindex,
        };
        let entry = self.node.add_route(prefix, next_hop).map_err(node_status)?;
        info!(
            %prefix,
            next_hop = %format_args!("[{}]:{}", next_hop.addr, next_hop.port),
            ifindex = next_hop.ifindex,
            "route added via control API"
        );
        Ok(Response::new(pb::Route {
            prefix: prefix.to_string(),
            entry: Some(route_entry(entry.target, Some(entry.origin))),
        }))
    }

    async fn remove_route(
        &self,
        request: Request<pb::RemoveRouteRequest>,
    ) -> Result<Response<pb::RemoveRouteResponse>, Status> {
        let prefix = parse_prefix(&request.into_inner().prefix)?;
        let removed = self.node.remove_route(prefix).map_err(node_status)?;
        if removed {
            info!(%prefix, "route removed via control API");
        }
        Ok(Response::new(pb::RemoveRouteResponse { removed }))
    }

    async fn list_pins(
        &self,
        _request: Request<pb::ListPinsRequest>,
    ) -> Result<Response<pb::ListPinsResponse>, Status> {
        let pins = myconet_core::pins::lock(self.links.pins())
            .list()
            .into_iter()
            .map(|(p, pin)| key_pin(p, pin.key, pin.source))
            .collect();
        Ok(Response::new(pb::ListPinsResponse { pins }))
    }

    async fn set_pin(
        &self,
        request: Request<pb::SetPinRequest>,
    ) -> Result<Response<pb::KeyPin>, Status> {
        let text = request.into_inner().key;
        let key = myconet_core::pins::parse_key(&text).ok_or_else(|| {
            Status::invalid_argument(format!(
                "key {text:?} is not an Ed25519 public key (64 hex digits)"
            ))
        })?;
        let prefix = self.links.pin_key(key, std::time::Instant::now());
        info!(%prefix, key = %text.trim(), "key pinned via control API");
        let bits = (u128::from(prefix) >> 64) as u64;
        Ok(Response::new(key_pin(
            bits,
            key,
            myconet_core::pins::PinSource::Operator,
        )))
    }

    async fn forget_pin(
        &self,
        request: Request<pb::ForgetPinRequest>,
    ) -> Result<Response<pb::ForgetPinResponse>, Status> {
        let value = request.into_inner().prefix;
        let addr = value.trim().split('/').next().unwrap_or_default();
        let addr = parse_addr("prefix", addr)?;
        if !addr::is_overlay(&addr) {
            return Err(Status::invalid_argument(format!(
                "{value:?} is not an overlay address"
            )));
        }
        let forgotten = self.links.forget_pin(addr, std::time::Instant::now());
        info!(prefix = %value.trim(), forgotten, "key pin forgotten via control API");
        Ok(Response::new(pb::ForgetPinResponse { forgotten }))
    }

    async fn get_stats(
        &self,
        _request: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::Stats>, Status> {
        let xdp = self
            .node
            .xdp_stats()
            .map_err(node_status)?
            .into_iter()
            .map(|(stat, c)| counter(stat.name(), c))
            .collect();
        let agent = self
            .node
            .agent_stats()
            .into_iter()
            .map(|(stat, c)| counter(stat.name(), c))
            .collect();
        let routing = self
            .links
            .routing_counters()
            .into_iter()
            .map(|(name, n)| pb::Counter {
                name: name.to_string(),
                packets: n,
                bytes: 0,
            })
            .collect();
        let neighbours = self
            .links
            .stats()
            .counters()
            .into_iter()
            .map(|(name, n)| pb::Counter {
                name: name.to_string(),
                packets: n,
                bytes: 0,
            })
            .collect();
        let mut interfaces = Vec::new();
        let attachments = self.node.status().interfaces;
        if !attachments.is_empty() {
            let nl = crate::os::netlink::Netlink::connect()
                .map_err(|e| Status::internal(format!("rtnetlink: {e}")))?;
            for a in attachments {
                // An interface that vanished has no counters; list it with zeros.
                let s = nl.link_stats(a.ifindex).await.unwrap_or_default();
                interfaces.push(pb::InterfaceCounters {
                    name: a.name,
                    ifindex: a.ifindex,
                    xdp_mode: a.xdp.map_or("none", |m| m.as_str()).to_string(),
                    redirect_target: a.policy.is_some_and(|p| p.redirect),
                    xdp_tx: a.policy.is_some_and(|p| p.tx),
                    rx_packets: s.rx_packets,
                    rx_dropped: s.rx_dropped,
                    tx_packets: s.tx_packets,
                    tx_dropped: s.tx_dropped,
                });
            }
        }
        let kernel = crate::os::kstats::read(self.node.port())
            .map_err(|e| Status::internal(format!("reading /proc/net: {e}")))?
            .into_iter()
            .map(|(name, n)| pb::Counter {
                name: name.to_string(),
                packets: n,
                bytes: 0,
            })
            .collect();
        Ok(Response::new(pb::Stats {
            xdp,
            agent,
            routing,
            interfaces,
            neighbours,
            kernel,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use myconet_proto::v1::control_client::ControlClient;
    use tonic::Code;

    use super::*;
    use crate::identity::Identity;
    use crate::shell::node::AgentStat;

    /// A directory removed on drop (the agent has no tempfile dependency).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "myconet-ctl-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn node(dir: &TempDir) -> Arc<Node> {
        let identity = Identity::load_or_create(&dir.0.join("state")).unwrap();
        Arc::new(Node::new(identity, DEFAULT_PORT, None, Default::default()).unwrap())
    }

    fn links(node: &Arc<Node>) -> Arc<Links> {
        let config = myconet_core::peers::PeerConfig::default();
        let routing = myconet_core::routing::RoutingConfig::default();
        let seqnos = crate::os::seqno_store::SeqnoStore::ephemeral(1);
        let pins = myconet_core::pins::Pins::new(64).shared();
        let now = std::time::Instant::now();
        Arc::new(Links::new(node.clone(), config, routing, seqnos, pins, now, 1).unwrap())
    }

    async fn serve_test(
        node: Arc<Node>,
        socket: &Path,
        mode: u32,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let links = links(&node);
        serve(node, links, socket, mode, shutdown).await
    }

    fn service() -> (TempDir, ControlService) {
        let dir = TempDir::new();
        let node = node(&dir);
        let svc = ControlService::new(node.clone(), links(&node));
        (dir, svc)
    }

    fn add_route_req(prefix: &str, addr: &str, port: u32) -> Request<pb::AddRouteRequest> {
        Request::new(pb::AddRouteRequest {
            prefix: prefix.into(),
            next_hop: Some(pb::NextHop {
                address: addr.into(),
                port,
                ifindex: 0,
            }),
        })
    }

    fn peer_req(addr: &str, port: u32) -> Request<pb::AddPeerRequest> {
        Request::new(pb::AddPeerRequest {
            address: addr.into(),
            port,
            interface: String::new(),
            cost: None,
        })
    }

    #[tokio::test]
    async fn status_reports_identity_and_counts() {
        let (_dir, svc) = service();
        let s = svc
            .get_status(Request::new(pb::GetStatusRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(s.node_prefix, svc.node.node_prefix().to_string());
        assert!(s.node_prefix.ends_with("/64"), "{}", s.node_prefix);
        assert_eq!(
            s.node_address,
            svc.node.identity().node_address().to_string()
        );
        assert_eq!(s.public_key, svc.node.identity().public_key_hex());
        assert_eq!(s.port, u32::from(DEFAULT_PORT));
        assert!(s.interfaces.is_empty());
        // The node's /64 and the reserved link address.
        assert_eq!((s.peer_count, s.route_count), (0, 2));
    }

    #[tokio::test]
    async fn status_reports_the_data_plane_per_interface() {
        let (_dir, svc) = service();
        svc.node.set_interfaces(
            "auto",
            vec![crate::shell::node::ConfiguredInterface {
                name: "eth9".into(),
                ifindex: 9,
                userspace_reason: Some("attaching XDP to eth9 failed: busy".into()),
            }],
        );
        let s = svc
            .get_status(Request::new(pb::GetStatusRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (s.dataplane.as_str(), s.dataplane_requested.as_str()),
            ("userspace", "auto")
        );
        assert_eq!(
            s.interfaces,
            [pb::Interface {
                name: "eth9".into(),
                ifindex: 9,
                xdp_mode: "none".into(),
                userspace_reason: "attaching XDP to eth9 failed: busy".into(),
            }]
        );
    }

    #[tokio::test]
    async fn route_get_says_a_static_route_decides() {
        let (_dir, svc) = service();
        svc.add_route(add_route_req("fd6d:1:2:3::/64", "fd00::2", 0))
            .await
            .unwrap();
        let get = |addr: &str| {
            svc.get_route(Request::new(pb::GetRouteRequest {
                address: addr.into(),
            }))
        };
        let e = get("fd6d:1:2:3::9").await.unwrap().into_inner();
        assert_eq!(e.prefix, "fd6d:1:2:3::/64");
        assert_eq!((e.decided_by.as_str(), e.overridden), ("static", false));
        assert_eq!(
            e.explanation,
            "a static route via [fd00::2]:9651 carries fd6d:1:2:3::9 (fd6d:1:2:3::/64); \
             the routing protocol has no route to it"
        );
        let e = get("fd6d:9::1").await.unwrap().into_inner();
        assert_eq!(e.decided_by, "none");
        assert!(
            e.explanation.starts_with("no route carries fd6d:9::1"),
            "{e:?}"
        );
        let own = svc.node.identity().node_address().to_string();
        let e = get(&own).await.unwrap().into_inner();
        assert_eq!(e.decided_by, "local");
        let e = get("2001:db8::1").await.unwrap().into_inner();
        assert_eq!(e.decided_by, "none");
        assert!(e.explanation.contains("not an overlay address"), "{e:?}");
    }

    #[tokio::test]
    async fn pins_set_list_forget() {
        let (_dir, svc) = service();
        let key = "07".repeat(32);
        let set = svc
            .set_pin(Request::new(pb::SetPinRequest { key: key.clone() }))
            .await
            .unwrap()
            .into_inner();
        let prefix = myconet_common::addr::node_prefix(&[7u8; 32]);
        assert_eq!(set.prefix, format!("{prefix}/64"));
        assert_eq!(set.source, "operator");
        let list = svc
            .list_pins(Request::new(pb::ListPinsRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(list.pins, vec![set.clone()]);
        let bad = svc
            .set_pin(Request::new(pb::SetPinRequest { key: "12".into() }))
            .await
            .unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        let forget = |p: String| svc.forget_pin(Request::new(pb::ForgetPinRequest { prefix: p }));
        assert!(
            forget(set.prefix.clone())
                .await
                .unwrap()
                .into_inner()
                .forgotten
        );
        assert!(
            !forget(set.prefix.clone())
                .await
                .unwrap()
                .into_inner()
                .forgotten
        );
        assert_eq!(
            forget("2001:db8::/64".into()).await.unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[tokio::test]
    async fn peer_costs_are_validated() {
        let (_dir, svc) = service();
        for (cost, ok) in [
            (0, false),
            (1, true),
            (65_534, true),
            (65_535, false),
            (70_000, false),
        ] {
            let mut req = peer_req("fd00::2", 0);
            req.get_mut().cost = Some(cost);
            let r = svc.add_peer(req).await;
            match (ok, r) {
                (true, Ok(_)) => {}
                (false, Err(e)) => {
                    assert_eq!(e.code(), Code::InvalidArgument, "{cost}");
                    assert!(e.message().contains("out of range"), "{cost}: {e:?}");
                }
                (_, r) => panic!("cost {cost}: {r:?}"),
            }
        }
    }

    #[tokio::test]
    async fn peers_add_list_remove() {
        let (_dir, svc) = service();
        let p = svc
            .add_peer(peer_req("fd00::2", 0))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(p.address, "fd00::2");
        assert_eq!(p.port, u32::from(DEFAULT_PORT));
        // Configured, not yet authenticated: connecting, and not a relay peer.
        assert_eq!(
            (p.state.as_str(), p.origin.as_str()),
            ("connecting", "static")
        );
        assert!(!p.in_kernel);
        assert!(p.node_key.is_empty() && p.rtt_us.is_none() && p.last_seen_ms.is_none());
        svc.add_peer(peer_req(" fd00::3 ", 9000)).await.unwrap();

        let list = svc
            .list_peers(Request::new(pb::ListPeersRequest {}))
            .await
            .unwrap()
            .into_inner();
        let shown: Vec<_> = list
            .peers
            .iter()
            .map(|p| (p.address.as_str(), p.port))
            .collect();
        assert_eq!(
            shown,
            [("fd00::2", u32::from(DEFAULT_PORT)), ("fd00::3", 9000)]
        );

        let remove = |addr: &str, port| {
            svc.remove_peer(Request::new(pb::RemovePeerRequest {
                address: addr.into(),
                port,
                interface: String::new(),
            }))
        };
        assert!(remove("fd00::2", 0).await.unwrap().into_inner().removed);
        assert!(!remove("fd00::2", 0).await.unwrap().into_inner().removed);
        assert!(!remove("fd00::3", 9001).await.unwrap().into_inner().removed);
        assert_eq!(
            remove("nope", 0).await.unwrap_err().code(),
            Code::InvalidArgument
        );
    }

    #[tokio::test]
    async fn bad_peers_are_invalid_arguments() {
        let (_dir, svc) = service();
        for (addr, port, needle) in [
            ("not-an-address", 0, "not-an-address"),
            ("192.0.2.1", 0, "192.0.2.1"),
            ("", 0, "required"),
            ("fd00::2", 70_000, "70000"),
            ("fd6d::1", 0, "underlay"),
            ("ff02::1", 0, "unicast"),
        ] {
            let e = svc.add_peer(peer_req(addr, port)).await.unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{addr}: {e:?}");
            assert!(e.message().contains(needle), "{addr}: {}", e.message());
        }
    }

    #[tokio::test]
    async fn routes_add_list_remove() {
        let (_dir, svc) = service();
        let r = svc
            .add_route(add_route_req("fd6d:1:2:3:4::/64", "fd00::2", 0))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.prefix, "fd6d:1:2:3::/64");
        let entry = r.entry.unwrap();
        assert_eq!(entry.action, "forward");
        assert_eq!(entry.origin, "static");
        let nh = entry.next_hop.unwrap();
        assert_eq!(
            (nh.address.as_str(), nh.port, nh.ifindex),
            ("fd00::2", u32::from(DEFAULT_PORT), 0)
        );

        let rows = svc
            .list_routes(Request::new(pb::ListRoutesRequest {}))
            .await
            .unwrap()
            .into_inner()
            .routes;
        // The own /64, the reserved link address and the added route.
        assert_eq!(rows.len(), 3);
        assert!(rows.iter().any(|r| r.prefix == "fd6d::/128"));
        let own = rows
            .iter()
            .find(|r| r.prefix == svc.node.node_prefix().to_string())
            .unwrap();
        let own_agent = own.agent.as_ref().unwrap();
        assert_eq!(
            (own_agent.action.as_str(), own_agent.origin.as_str()),
            ("local", "local")
        );
        assert!(own_agent.next_hop.is_none());
        let added = rows.iter().find(|r| r.prefix == "fd6d:1:2:3::/64").unwrap();
        assert_eq!(added.agent.as_ref().unwrap().origin, "static");
        // No data plane: the kernel side holds nothing, so the row is out of sync.
        assert!(added.kernel.is_none());
        assert!(!added.in_sync);

        let remove =
            |p: &str| svc.remove_route(Request::new(pb::RemoveRouteRequest { prefix: p.into() }));
        assert!(
            remove("fd6d:1:2:3::/64")
                .await
                .unwrap()
                .into_inner()
                .removed
        );
        assert!(
            !remove("fd6d:1:2:3::/64")
                .await
                .unwrap()
                .into_inner()
                .removed
        );
        assert!(!remove("fd6d:9::/32").await.unwrap().into_inner().removed);
    }

    #[tokio::test]
    async fn bad_routes_are_refused_with_the_right_code() {
        let (_dir, svc) = service();
        let own = svc.node.node_prefix().to_string();
        for (prefix, addr, port, code, needle) in [
            ("garbage", "fd00::2", 0, Code::InvalidArgument, "garbage"),
            (
                "2001:db8::/64",
                "fd00::2",
                0,
                Code::InvalidArgument,
                "2001:db8::/64",
            ),
            ("fd6d::/129", "fd00::2", 0, Code::InvalidArgument, "129"),
            (
                "",
                "fd00::2",
                0,
                Code::InvalidArgument,
                "prefix is required",
            ),
            ("fd6d:1::/64", "bogus", 0, Code::InvalidArgument, "bogus"),
            (
                "fd6d:1::/64",
                "fd6d::1",
                0,
                Code::InvalidArgument,
                "underlay",
            ),
            ("fd6d:1::/64", "::", 0, Code::InvalidArgument, "unicast"),
            (
                "fd6d:1::/64",
                "fd00::2",
                65_536,
                Code::InvalidArgument,
                "65536",
            ),
            (
                own.as_str(),
                "fd00::2",
                0,
                Code::FailedPrecondition,
                "own prefix",
            ),
        ] {
            let e = svc
                .add_route(add_route_req(prefix, addr, port))
                .await
                .unwrap_err();
            assert_eq!(e.code(), code, "{prefix} via {addr}: {e:?}");
            assert!(e.message().contains(needle), "{prefix}: {}", e.message());
        }

        let e = svc
            .add_route(Request::new(pb::AddRouteRequest {
                prefix: "fd6d:1::/64".into(),
                next_hop: None,
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("next_hop"));

        let e = svc
            .remove_route(Request::new(pb::RemoveRouteRequest { prefix: own }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        let e = svc
            .remove_route(Request::new(pb::RemoveRouteRequest {
                prefix: "fd6d::".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
    }

    #[tokio::test]
    async fn stats_name_every_agent_counter() {
        let (_dir, svc) = service();
        svc.node.count(AgentStat::RxControl, 100);
        let stats = svc
            .get_stats(Request::new(pb::GetStatsRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert!(stats.xdp.is_empty());
        let names: Vec<_> = stats.agent.iter().map(|c| c.name.as_str()).collect();
        let expected: Vec<_> = AgentStat::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(names, expected);
        let rx = stats.agent.iter().find(|c| c.name == "rx_control").unwrap();
        assert_eq!((rx.packets, rx.bytes), (1, 100));
        // The neighbour layer's counters are there too (flaps, probes, beacons).
        let neighbours: Vec<_> = stats.neighbours.iter().map(|c| c.name.as_str()).collect();
        for name in [
            "peer_up",
            "peer_down",
            "peer_down_unanswered",
            "hello_probe_sent",
        ] {
            assert!(neighbours.contains(&name), "{name} in {neighbours:?}");
        }
    }

    async fn wait_for(path: &Path) {
        for _ in 0..500 {
            if path.exists() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{} never appeared", path.display());
    }

    #[tokio::test]
    async fn health_and_reflection_answer_on_the_socket() {
        use tonic_health::pb::{
            HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
        };
        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };

        let dir = TempDir::new();
        let node = node(&dir);
        let socket = dir.0.join("agent.sock");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn({
            let socket = socket.clone();
            async move {
                serve_test(node, &socket, 0o600, async {
                    let _ = stopped.await;
                })
                .await
            }
        });
        wait_for(&socket).await;
        let channel = tonic::transport::Endpoint::from_shared(format!("unix:{}", socket.display()))
            .unwrap()
            .connect()
            .await
            .unwrap();

        let mut health = HealthClient::new(channel.clone());
        for service in ["", "myconet.v1.Control"] {
            let status = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status;
            assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
        }
        let unknown = health
            .check(HealthCheckRequest {
                service: "no.such.Service".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(unknown.code(), Code::NotFound);

        let mut reflection = ServerReflectionClient::new(channel);
        let ask = |request| ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        };
        let mut answers = reflection
            .server_reflection_info(tokio_stream::iter([
                ask(MessageRequest::ListServices(String::new())),
                ask(MessageRequest::FileContainingSymbol(
                    "myconet.v1.Control".into(),
                )),
            ]))
            .await
            .unwrap()
            .into_inner();
        let listed = answers.message().await.unwrap().unwrap().message_response;
        let Some(MessageResponse::ListServicesResponse(list)) = listed else {
            panic!("expected a service list, got {listed:?}");
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        for want in [
            "myconet.v1.Control",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ] {
            assert!(names.contains(&want), "{want} not listed: {names:?}");
        }
        let file = answers.message().await.unwrap().unwrap().message_response;
        let Some(MessageResponse::FileDescriptorResponse(file)) = file else {
            panic!("expected the descriptor of myconet.proto, got {file:?}");
        };
        assert!(!file.file_descriptor_proto.is_empty());
        // The descriptor is myconet.proto's: it names the service's methods.
        let bytes = &file.file_descriptor_proto[0];
        assert!(
            bytes.windows(b"GetStats".len()).any(|w| w == b"GetStats"),
            "the descriptor does not describe the Control service"
        );

        stop.send(()).unwrap();
        drop(answers);
        drop(reflection);
        drop(health);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("server stops on shutdown")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn serves_on_a_unix_socket_and_cleans_up() {
        let dir = TempDir::new();
        let node = node(&dir);
        // The parent directory does not exist yet: serve creates it.
        let socket = dir.0.join("run").join("agent.sock");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn({
            let node = node.clone();
            let socket = socket.clone();
            async move {
                serve_test(node, &socket, 0o600, async {
                    let _ = stopped.await;
                })
                .await
            }
        });
        wait_for(&socket).await;

        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Nothing but the socket and its lock is left in the directory (no staging
        // leftovers).
        let entries = |dir: &Path| {
            let mut names: Vec<_> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            names
        };
        let run = socket.parent().unwrap();
        assert_eq!(entries(run), ["agent.sock", "agent.sock.lock"]);

        let channel = tonic::transport::Endpoint::from_shared(format!("unix:{}", socket.display()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = ControlClient::new(channel);
        let status = client
            .get_status(pb::GetStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status.node_prefix, node.node_prefix().to_string());
        let e = client
            .add_route(pb::AddRouteRequest {
                prefix: "nonsense".into(),
                next_hop: None,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);

        let second = tokio::time::timeout(
            Duration::from_secs(5),
            serve_test(node.clone(), &socket, 0o600, std::future::pending()),
        )
        .await
        .expect("second serve must fail fast")
        .unwrap_err();
        assert!(
            second
                .to_string()
                .contains("another agent is already serving on"),
            "{second:#}"
        );
        // The refused second agent left the first one's socket alone.
        assert!(client.get_status(pb::GetStatusRequest {}).await.is_ok());

        stop.send(()).unwrap();
        drop(client);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("server stops on shutdown")
            .unwrap()
            .unwrap();
        assert!(!socket.exists(), "socket removed after shutdown");
        assert!(entries(run).is_empty(), "lock removed after shutdown");
    }

    /// Waits (at most 10 s) until connecting to the socket at `path` is refused. A
    /// listener this process just closed can still accept for a moment: other tests in
    /// this binary start processes, and a child between fork and exec holds a copy of
    /// every descriptor, close-on-exec or not. A claimant that got through to such a
    /// socket would rightly refuse to replace it.
    fn wait_until_refused(path: &std::path::Path) {
        for _ in 0..10_000 {
            match std::os::unix::net::UnixStream::connect(path) {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return,
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        panic!("{} still accepts connections after 10 s", path.display());
    }

    /// Two claims of one path racing each other, many times: exactly one wins, the other
    /// is told another agent serves there, and the winner's socket is the one in place.
    #[test]
    fn concurrent_claims_have_exactly_one_winner() {
        let dir = TempDir::new();
        let socket = dir.0.join("race.sock");
        // One runtime both claimants block on, outliving every listener it registers.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        for round in 0..200 {
            if round % 2 == 1 {
                // Every other round starts from a stale socket, as after a crash.
                drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
                wait_until_refused(&socket);
            }
            let barrier = std::sync::Barrier::new(2);
            let outcomes: Vec<anyhow::Result<ControlSocket>> = std::thread::scope(|s| {
                let claim = || {
                    barrier.wait();
                    rt.block_on(ControlSocket::claim(&socket, 0o600))
                };
                let a = s.spawn(claim);
                let b = s.spawn(claim);
                vec![a.join().unwrap(), b.join().unwrap()]
            });
            let seen: Vec<String> = outcomes
                .iter()
                .map(|o| match o {
                    Ok(_) => "claimed".to_string(),
                    Err(e) => format!("{e:#}"),
                })
                .collect();
            let (won, lost): (Vec<_>, Vec<_>) = outcomes.into_iter().partition(Result::is_ok);
            assert_eq!((won.len(), lost.len()), (1, 1), "round {round}: {seen:?}");
            let e = lost.into_iter().next().unwrap().unwrap_err();
            assert!(
                e.to_string()
                    .contains("another agent is already serving on"),
                "round {round}: {e:#}"
            );
            let winner = won.into_iter().next().unwrap().unwrap();
            let meta = std::fs::symlink_metadata(&socket).unwrap();
            assert_eq!((meta.dev(), meta.ino()), winner.identity, "round {round}");
            drop(winner);
            assert!(
                !socket.exists(),
                "round {round}: socket removed with its owner"
            );
        }
    }

    #[tokio::test]
    async fn overlong_socket_paths_are_refused_up_front() {
        let dir = TempDir::new();
        let socket = dir.0.join("x".repeat(120));
        let e = serve_test(node(&dir), &socket, 0o600, async {})
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("Unix sockets allow at most 107"),
            "{e:#}"
        );
    }

    #[tokio::test]
    async fn replaces_a_stale_socket_but_not_other_files() {
        let dir = TempDir::new();
        let node = node(&dir);
        let socket = dir.0.join("agent.sock");
        // A socket file nobody listens on any more, as after a crash.
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        assert!(socket.exists());
        serve_test(node.clone(), &socket, 0o600, async {})
            .await
            .unwrap();
        assert!(!socket.exists());

        std::fs::write(&socket, b"precious").unwrap();
        let e = serve_test(node, &socket, 0o600, async {})
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e:#}");
        assert_eq!(std::fs::read(&socket).unwrap(), b"precious");
    }
}
