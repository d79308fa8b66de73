//! The connection to the agent's Unix socket, and turning every way it can fail into a
//! message that tells the operator what to do.

use std::{
    error::Error as StdError,
    io,
    os::unix::fs::FileTypeExt,
    path::{Path, PathBuf},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use myconet_proto::v1 as pb;
use myconet_proto::v1::control_client::ControlClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long to wait for the agent to accept the connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long any single request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the CLI could not get an answer, phrased for the operator.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Nothing at the socket path: the agent is not running or the path is wrong.
    #[error(
        "no agent socket at {} — is myconet-agent running? (set --socket or MYCONET_SOCKET)",
        .0.display()
    )]
    NoSocket(PathBuf),
    /// The socket is mode 0600 by default, so only its owner may connect.
    #[error(
        "cannot access {}: permission denied — run as root or as the agent's user",
        .0.display()
    )]
    PermissionDenied(PathBuf),
    /// A socket file nobody listens on: left behind by an agent that died.
    #[error("agent at {} is not running (stale socket)", .0.display())]
    Stale(PathBuf),
    /// Something other than a socket lives at the path.
    #[error("{} is not a socket (set --socket or MYCONET_SOCKET)", .0.display())]
    NotASocket(PathBuf),
    /// Any other connection failure.
    #[error("cannot connect to the agent at {}: {reason}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// What went wrong, with its causes.
        reason: String,
    },
    /// The agent answered with an error. Not marked as the error's source: the code and
    /// message are all there is to say, and `{:#}` would repeat them.
    #[error("{:?}: {}", .0.code(), .0.message())]
    Rpc(tonic::Status),
}

impl From<tonic::Status> for CtlError {
    fn from(status: tonic::Status) -> Self {
        CtlError::Rpc(status)
    }
}

impl CtlError {
    /// Process exit code: 2 when there is no agent to talk to, so scripts can tell
    /// "not running" from "refused".
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::NoSocket(_) => 2,
            _ => 1,
        }
    }

    /// Classifies an I/O failure on `path`.
    fn from_io(path: &Path, e: &io::Error) -> Self {
        let path = path.to_path_buf();
        match e.kind() {
            io::ErrorKind::NotFound => CtlError::NoSocket(path),
            io::ErrorKind::PermissionDenied => CtlError::PermissionDenied(path),
            io::ErrorKind::ConnectionRefused => CtlError::Stale(path),
            io::ErrorKind::TimedOut => CtlError::Connect {
                path,
                reason: format!(
                    "no answer within {} s (is the agent hung?)",
                    CONNECT_TIMEOUT.as_secs()
                ),
            },
            _ => CtlError::Connect {
                path,
                reason: e.to_string(),
            },
        }
    }

    /// Finds the OS error under tonic's wrappers, which is what tells the cases apart.
    fn from_transport(path: &Path, e: &(dyn StdError + 'static)) -> Self {
        let mut cause = Some(e);
        let mut reasons = Vec::new();
        while let Some(c) = cause {
            if let Some(io) = c.downcast_ref::<io::Error>() {
                let telling = matches!(
                    io.kind(),
                    io::ErrorKind::NotFound
                        | io::ErrorKind::PermissionDenied
                        | io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::TimedOut
                );
                match io.get_ref() {
                    // A generic wrapper: the telling error is the one inside it
                    // (`io::Error::source` would skip that one).
                    Some(inner) if !telling => {
                        cause = Some(inner);
                        continue;
                    }
                    _ => return Self::from_io(path, io),
                }
            }
            reasons.push(c.to_string());
            cause = c.source();
        }
        CtlError::Connect {
            path: path.to_path_buf(),
            reason: reasons.join(": "),
        }
    }
}

/// A connected control client whose calls return [`CtlError`].
#[derive(Debug, Clone)]
pub struct Client {
    inner: ControlClient<Channel>,
}

/// Connects to the agent at `path`.
pub async fn connect(path: &Path) -> Result<Client, CtlError> {
    Ok(Client {
        inner: ControlClient::new(channel(path, Some(REQUEST_TIMEOUT)).await?),
    })
}

/// A channel to the agent at `path`; calls on it time out after `timeout` (`None`: never,
/// for streams that last as long as a download).
pub async fn channel(path: &Path, timeout: Option<Duration>) -> Result<Channel, CtlError> {
    match std::fs::metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(CtlError::NotASocket(path.to_path_buf()));
        }
        Ok(_) => {}
        Err(e) => return Err(CtlError::from_io(path, &e)),
    }
    // The URI is never used: the connector below always dials the Unix socket.
    let mut endpoint = Endpoint::try_from("http://[::]:50051")
        .map_err(|e| CtlError::from_transport(path, &e))?
        .connect_timeout(CONNECT_TIMEOUT);
    if let Some(t) = timeout {
        endpoint = endpoint.timeout(t);
    }
    let socket = path.to_path_buf();
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .map_err(|e| CtlError::from_transport(path, &e))
}

impl Client {
    /// `GetStatus`.
    pub async fn status(&mut self) -> Result<pb::Status, CtlError> {
        Ok(self
            .inner
            .get_status(pb::GetStatusRequest {})
            .await?
            .into_inner())
    }

    /// `ListPeers`.
    pub async fn peers(&mut self) -> Result<pb::ListPeersResponse, CtlError> {
        Ok(self
            .inner
            .list_peers(pb::ListPeersRequest {})
            .await?
            .into_inner())
    }

    /// `AddPeer`.
    pub async fn add_peer(&mut self, req: pb::AddPeerRequest) -> Result<pb::Peer, CtlError> {
        Ok(self.inner.add_peer(req).await?.into_inner())
    }

    /// `RemovePeer`.
    pub async fn remove_peer(
        &mut self,
        req: pb::RemovePeerRequest,
    ) -> Result<pb::RemovePeerResponse, CtlError> {
        Ok(self.inner.remove_peer(req).await?.into_inner())
    }

    /// `ListRoutes`.
    pub async fn routes(&mut self) -> Result<pb::ListRoutesResponse, CtlError> {
        Ok(self
            .inner
            .list_routes(pb::ListRoutesRequest {})
            .await?
            .into_inner())
    }

    /// `ListPins`.
    pub async fn pins(&mut self) -> Result<pb::ListPinsResponse, CtlError> {
        Ok(self
            .inner
            .list_pins(pb::ListPinsRequest {})
            .await?
            .into_inner())
    }

    /// `SetPin`.
    pub async fn set_pin(&mut self, req: pb::SetPinRequest) -> Result<pb::KeyPin, CtlError> {
        Ok(self.inner.set_pin(req).await?.into_inner())
    }

    /// `ForgetPin`.
    pub async fn forget_pin(
        &mut self,
        req: pb::ForgetPinRequest,
    ) -> Result<pb::ForgetPinResponse, CtlError> {
        Ok(self.inner.forget_pin(req).await?.into_inner())
    }

    /// `AddRoute`.
    pub async fn add_route(&mut self, req: pb::AddRouteRequest) -> Result<pb::Route, CtlError> {
        Ok(self.inner.add_route(req).await?.into_inner())
    }

    /// `RemoveRoute`.
    pub async fn remove_route(
        &mut self,
        req: pb::RemoveRouteRequest,
    ) -> Result<pb::RemoveRouteResponse, CtlError> {
        Ok(self.inner.remove_route(req).await?.into_inner())
    }

    /// `GetRoute`.
    pub async fn get_route(
        &mut self,
        req: pb::GetRouteRequest,
    ) -> Result<pb::RouteExplanation, CtlError> {
        Ok(self.inner.get_route(req).await?.into_inner())
    }

    /// `GetStats`.
    pub async fn stats(&mut self) -> Result<pb::Stats, CtlError> {
        Ok(self
            .inner
            .get_stats(pb::GetStatsRequest {})
            .await?
            .into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("myconet-ctl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn missing_socket_is_exit_code_2_with_a_hint() {
        let dir = temp_dir("missing");
        let path = dir.join("agent.sock");
        let e = connect(&path).await.unwrap_err();
        assert!(matches!(e, CtlError::NoSocket(_)), "{e:?}");
        assert_eq!(e.exit_code(), 2);
        assert_eq!(
            e.to_string(),
            format!(
                "no agent socket at {} — is myconet-agent running? (set --socket or MYCONET_SOCKET)",
                path.display()
            )
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn stale_socket_and_non_socket_are_told_apart() {
        let dir = temp_dir("stale");
        let path = dir.join("agent.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let e = connect(&path).await.unwrap_err();
        assert!(matches!(e, CtlError::Stale(_)), "{e:?}");
        assert_eq!(e.exit_code(), 1);
        assert!(e.to_string().ends_with("is not running (stale socket)"));

        let file = dir.join("plain");
        std::fs::write(&file, b"").unwrap();
        let e = connect(&file).await.unwrap_err();
        assert!(matches!(e, CtlError::NotASocket(_)), "{e:?}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn io_errors_map_to_operator_messages() {
        let p = Path::new("/run/myconet/agent.sock");
        let denied = CtlError::from_io(p, &io::Error::from(io::ErrorKind::PermissionDenied));
        assert_eq!(
            denied.to_string(),
            "cannot access /run/myconet/agent.sock: permission denied — run as root or as the agent's user"
        );
        // A generic io::Error wrapping the telling one is looked through.
        let wrapped = io::Error::other(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert!(matches!(
            CtlError::from_transport(p, &wrapped),
            CtlError::Stale(_)
        ));
        let opaque = io::Error::other("something odd");
        match CtlError::from_transport(p, &opaque) {
            CtlError::Connect { reason, .. } => assert_eq!(reason, "something odd"),
            other => panic!("{other:?}"),
        }
        let timeout = CtlError::from_io(p, &io::Error::from(io::ErrorKind::TimedOut));
        assert!(timeout.to_string().contains("no answer within 5 s"));
    }

    #[test]
    fn rpc_errors_show_code_and_message() {
        let e = CtlError::from(tonic::Status::invalid_argument("prefix \"x\": bad"));
        assert_eq!(e.exit_code(), 1);
        assert_eq!(e.to_string(), "InvalidArgument: prefix \"x\": bad");
        // What main prints: no repeated cause chain.
        assert_eq!(
            format!("{:#}", anyhow::Error::from(e)),
            "InvalidArgument: prefix \"x\": bad"
        );
    }
}
