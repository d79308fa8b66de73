//! The agent's content service: the shell around the content cores
//! (`myconet-content`) and the store (`myconet-store`).
//!
//! - `listener` + `serve`: the node-to-node protocol on the overlay address (TCP,
//!   `content.port`), answering manifests, verified groups and have requests, with
//!   per-node limits (`serve::Server`).
//! - `download` + `provider`: downloads, one thread per download driving `fetch::Fetch`
//!   with one TCP connection per provider.
//! - `store`: the store on blocking threads; `add`, `export`: files in and out.
//! - `grpc`: the `Content` gRPC service on the control socket (`proto/content.proto`).
//! - `settings`: the `storage` and `content` configuration sections.
//!
//! docs/content.md describes the protocol, the store and the API; docs/operations.md the
//! configuration.

pub mod add;
pub mod counters;
pub mod download;
pub mod error;
pub mod export;
pub mod frames;
pub mod grpc;
pub mod listener;
pub mod provider;
pub mod serve;
pub mod settings;
pub mod store;

use std::{
    collections::{HashMap, HashSet},
    net::{Ipv6Addr, SocketAddrV6},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use myconet_content::{Mri, PackageId, fetch::FetchConfig, serve::ServeConfig, serve::Server};
use myconet_proto::content::v1 as pb;
use tokio::{sync::broadcast, task::JoinHandle};
use tracing::info;

use self::{
    counters::Counters,
    download::{DownloadHandle, DriverCtx},
    error::{ContentError, Result},
    serve::ServeCtx,
    settings::ContentSettings,
    store::{InUse, StoreAccess},
};
use crate::identity::Identity;

/// Progress messages of all downloads kept for a slow `Watch` subscriber.
const WATCH_QUEUE: usize = 256;

/// The content service of one agent.
pub struct Content {
    settings: ContentSettings,
    identity: Arc<Identity>,
    store: StoreAccess,
    counters: Arc<Counters>,
    downloads: Mutex<HashMap<PackageId, Arc<DownloadHandle>>>,
    in_use: InUse,
    global: broadcast::Sender<pb::Progress>,
    serve: Arc<ServeCtx>,
    listening: Mutex<Option<(SocketAddrV6, JoinHandle<()>)>>,
}

impl std::fmt::Debug for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Content")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Content {
    /// Opens the store (reconciling it after a crash) and prepares the service; nothing
    /// listens until [`Content::listen`].
    pub async fn open(
        settings: ContentSettings,
        identity: Arc<Identity>,
    ) -> anyhow::Result<Arc<Self>> {
        let in_use: InUse = Arc::new(Mutex::new(HashSet::new()));
        let (dir, max, protect) = (
            settings.store_dir.clone(),
            settings.max_bytes,
            in_use.clone(),
        );
        let store = tokio::task::spawn_blocking(move || StoreAccess::open_disk(&dir, max, protect))
            .await
            .context("opening the content store")?
            .with_context(|| {
                format!(
                    "opening the content store in {}",
                    settings.store_dir.display()
                )
            })?;
        Ok(Self::with_store(settings, identity, store, in_use))
    }

    /// The service over an already open store (tests use a `MemStore`).
    pub fn with_store(
        settings: ContentSettings,
        identity: Arc<Identity>,
        store: StoreAccess,
        in_use: InUse,
    ) -> Arc<Self> {
        let counters = Arc::new(Counters::default());
        let limits = Server::new(ServeConfig {
            max_concurrent: settings.max_concurrent,
            rate: settings.upload_rate,
            burst: settings.upload_burst,
            ..ServeConfig::default()
        });
        let serve = Arc::new(ServeCtx::new(
            store.clone(),
            limits,
            counters.clone(),
            settings.deadlines,
            settings.fault_corrupt,
        ));
        let (global, _) = broadcast::channel(WATCH_QUEUE);
        Arc::new(Self {
            settings,
            identity,
            store,
            counters,
            downloads: Mutex::new(HashMap::new()),
            in_use,
            global,
            serve,
            listening: Mutex::new(None),
        })
    }

    /// Starts serving the node-to-node protocol on the node's overlay address (which
    /// must be assigned: the TUN device is up), bound to `device`.
    pub fn listen(&self, device: Option<&str>) -> anyhow::Result<SocketAddrV6> {
        let addr = SocketAddrV6::new(self.identity.node_address(), self.settings.port, 0, 0);
        let task = listener::listen(
            self.serve.clone(),
            addr,
            device,
            self.settings.max_connections,
            settings::MAX_CONNECTIONS_PER_PEER,
        )
        .with_context(|| {
            format!(
                "listening for the content protocol on [{}]:{}",
                addr.ip(),
                addr.port()
            )
        })?;
        *self.listening.lock().unwrap_or_else(|e| e.into_inner()) = Some((addr, task));
        Ok(addr)
    }

    /// Where the node-to-node protocol listens, if it does.
    pub fn listen_addr(&self) -> Option<SocketAddrV6> {
        self.listening
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(a, _)| *a)
    }

    /// The gRPC service to add to the control socket's server.
    pub fn service(self: &Arc<Self>) -> pb::content_server::ContentServer<grpc::ContentService> {
        pb::content_server::ContentServer::new(grpc::ContentService::new(self.clone()))
            // Added files stream in 1 MiB chunks; the default 4 MiB limit is ample for
            // them and for manifests' metadata.
            .max_decoding_message_size(8 << 20)
    }

    /// Stops listening and every download (they flush what they verified), waiting a
    /// little for them to end.
    pub async fn shutdown(&self) {
        if let Some((_, task)) = self
            .listening
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
        let running: Vec<Arc<DownloadHandle>> = self.downloads_map().values().cloned().collect();
        for d in &running {
            d.cancel("the agent is shutting down").await;
        }
        for _ in 0..50 {
            if self.downloads_map().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn downloads_map(&self) -> std::sync::MutexGuard<'_, HashMap<PackageId, Arc<DownloadHandle>>> {
        self.downloads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The store.
    pub fn store(&self) -> &StoreAccess {
        &self.store
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Every download's progress as it happens.
    pub fn watch(&self) -> broadcast::Receiver<pb::Progress> {
        self.global.subscribe()
    }

    /// The node's signing key signs the manifests it adds.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Parses a provider: `ADDR` or `[ADDR]:PORT`, an overlay address.
    pub fn provider(&self, s: &str) -> Result<SocketAddrV6> {
        let s = s.trim();
        let addr = match s.parse::<SocketAddrV6>() {
            Ok(a) => a,
            Err(_) => {
                let ip: Ipv6Addr = s.parse().map_err(|_| {
                    ContentError::Invalid(format!(
                        "provider {s:?} is not an overlay address (ADDR or [ADDR]:PORT)"
                    ))
                })?;
                SocketAddrV6::new(ip, self.settings.port, 0, 0)
            }
        };
        if addr.port() == 0 {
            return Err(ContentError::Invalid(format!("provider {s:?}: port 0")));
        }
        if addr.ip().is_unspecified() || addr.ip().is_multicast() {
            return Err(ContentError::Invalid(format!(
                "provider {s:?} is not a node's address"
            )));
        }
        Ok(addr)
    }

    /// Starts (or joins) the download of `id` from `providers`.
    pub fn get(
        self: &Arc<Self>,
        id: PackageId,
        providers: Vec<SocketAddrV6>,
        pin: bool,
    ) -> Result<Arc<DownloadHandle>> {
        let mut map = self.downloads_map();
        if let Some(d) = map.get(&id) {
            d.add_providers(providers);
            return Ok(d.clone());
        }
        self.in_use
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id);
        let ctx = DriverCtx {
            store: self.store.clone(),
            counters: self.counters.clone(),
            runtime: tokio::runtime::Handle::current(),
            global: self.global.clone(),
            config: FetchConfig::default(),
        };
        let me = Arc::downgrade(self);
        let finished = move || {
            if let Some(me) = me.upgrade() {
                me.downloads_map().remove(&id);
                me.in_use
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
            }
        };
        info!(package = %Mri::package(id), providers = ?providers, "content: download starts");
        let handle = download::start(ctx, id, providers, pin, finished)
            .map_err(|e| ContentError::Internal(format!("starting the download thread: {e}")))?;
        map.insert(id, handle.clone());
        Ok(handle)
    }

    /// The running download of `id`, if any.
    pub fn download(&self, id: &PackageId) -> Option<Arc<DownloadHandle>> {
        self.downloads_map().get(id).cloned()
    }

    /// The content settings in force.
    pub fn settings(&self) -> &ContentSettings {
        &self.settings
    }

    /// Makes `p` absolute against nothing: relative paths are refused (the agent does
    /// not share the client's working directory).
    pub fn absolute(p: &str, what: &str) -> Result<PathBuf> {
        let path = PathBuf::from(p);
        if p.is_empty() || !path.is_absolute() {
            return Err(ContentError::Invalid(format!(
                "{what} {p:?} must be an absolute path on the agent's host"
            )));
        }
        Ok(path)
    }
}
