//! The `Content` gRPC service (`proto/content.proto`): a thin translation between the
//! proto messages and the content service; every refusal is a [`ContentError`] mapped
//! to a gRPC code, with a message the CLI prints as it is.

use std::{io::Read, pin::Pin, sync::Arc};

use myconet_content::{Mri, PackageId, PackagePath, SignedManifest};
use myconet_proto::content::v1::{self as pb, content_server::Content as ContentApi};
use myconet_store::{Completeness, FileInfo, Hold, PackageInfo, Usage};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use super::{
    Content,
    add::{self, MetadataInput, StagedFile},
    counters::Counters,
    download::is_final,
    error::{ContentError, Result},
    export,
};

type Stream_<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send>>;

/// Bytes per `ReadChunk`.
const READ_CHUNK: usize = 256 << 10;

/// The gRPC face of [`Content`].
#[derive(Debug, Clone)]
pub struct ContentService {
    content: Arc<Content>,
}

impl ContentService {
    /// The service over `content`.
    pub fn new(content: Arc<Content>) -> Self {
        Self { content }
    }
}

fn parse_mri(s: &str) -> Result<Mri> {
    s.trim()
        .parse::<Mri>()
        .map_err(|e| ContentError::Invalid(format!("{s:?} is not an MRI: {e}")))
}

fn package_mri(s: &str) -> Result<PackageId> {
    Ok(parse_mri(s)?.package)
}

fn metadata_input(m: Option<pb::Metadata>) -> MetadataInput {
    let m = m.unwrap_or_default();
    MetadataInput {
        title: m.title,
        description: m.description,
        tags: m.tags,
        language: m.language,
        licence: m.licence,
        kind: m.kind,
        extra: m.extra.into_iter().collect(),
    }
}

/// A stored package as the API shows it.
pub fn package(info: &PackageInfo) -> pb::Package {
    let (complete, verified) = match info.completeness {
        Completeness::Complete => (true, info.total_size),
        Completeness::Partial { verified_bytes } => (false, verified_bytes),
    };
    pb::Package {
        mri: Mri::package(info.id).to_string(),
        title: info.title.clone(),
        kind: info.kind.to_string(),
        total_size: info.total_size,
        file_count: info.file_count,
        complete,
        verified_bytes: verified,
        pinned: info.holds.contains(&Hold::Pin),
        holds: info.holds.iter().map(ToString::to_string).collect(),
        added_at: info.added_at,
        disk_bytes: info.disk_bytes,
    }
}

fn file(id: PackageId, f: &FileInfo) -> pb::FileDetail {
    let (complete, verified) = match f.completeness {
        Completeness::Complete => (true, f.size),
        Completeness::Partial { verified_bytes } => (false, verified_bytes),
    };
    pb::FileDetail {
        path: f.path.to_string(),
        size: f.size,
        executable: f.executable,
        hash: f.hash.to_string(),
        complete,
        verified_bytes: verified,
        mri: Mri::file(id, f.path.clone()).to_string(),
    }
}

/// The store's usage as the API shows it.
pub fn usage(u: &Usage) -> pb::Usage {
    pb::Usage {
        max_bytes: u.max_bytes,
        used: u.used,
        held_bytes: u.held_bytes,
        cached_bytes: u.cached_bytes,
        reserved_bytes: u.reserved_bytes,
        staging_bytes: u.staging_bytes,
        database_bytes: u.database_bytes,
        slack: u.slack,
    }
}

fn added(content: &Content, signed: &SignedManifest, info: &PackageInfo) -> pb::AddResponse {
    Counters::inc(&content.counters().add_packages);
    Counters::add(
        &content.counters().add_bytes,
        signed.manifest().total_size(),
    );
    pb::AddResponse {
        mri: Mri::package(signed.id()).to_string(),
        package: Some(package(info)),
    }
}

impl ContentService {
    async fn run_add_paths(&self, req: pb::AddPathsRequest) -> Result<pb::AddResponse> {
        let paths = req
            .paths
            .iter()
            .map(|p| Content::absolute(p, "path"))
            .collect::<Result<Vec<_>>>()?;
        let meta = metadata_input(req.metadata);
        // Checked before a byte is read: a bad kind or language fails at once.
        meta.to_metadata()?;
        let content = self.content.clone();
        let (signed, info) = self
            .content
            .store()
            .run(move |store| {
                let files = add::collect(&paths)?;
                let mut staged = Vec::with_capacity(files.len());
                for f in &files {
                    staged.push(StagedFile {
                        path: f.path.clone(),
                        executable: f.executable,
                        staged: add::stage_file(store, f)?,
                    });
                }
                add::insert(
                    store,
                    content.identity().key_pair(),
                    &meta,
                    staged,
                    req.no_pin,
                )
            })
            .await?;
        Ok(added(&self.content, &signed, &info))
    }

    /// `AddStream` over any stream of messages (the gRPC one, or a test's).
    pub async fn run_add_stream<S>(&self, mut stream: S) -> Result<pb::AddResponse>
    where
        S: Stream<Item = std::result::Result<pb::AddStreamMessage, Status>> + Unpin + Send,
    {
        use pb::add_stream_message::Item;
        let first = next_message(&mut stream).await?;
        let Some(pb::AddStreamMessage {
            item: Some(Item::Start(start)),
        }) = first
        else {
            return Err(ContentError::Invalid(
                "an add stream starts with a `start` message".into(),
            ));
        };
        let meta = metadata_input(start.metadata);
        meta.to_metadata()?;
        let mut files: Vec<StagedFile> = Vec::new();
        let mut next = next_message(&mut stream).await?;
        loop {
            let header = match next {
                None => break,
                Some(pb::AddStreamMessage {
                    item: Some(Item::File(h)),
                }) => h,
                Some(_) => {
                    return Err(ContentError::Invalid(
                        "expected a `file` header (or the end of the stream)".into(),
                    ));
                }
            };
            let path = PackagePath::new(header.path.clone())
                .map_err(|e| ContentError::Invalid(format!("{:?}: {e}", header.path)))?;
            // The file's bytes go to a blocking thread that stages them as they come.
            let (tx, rx) = mpsc::channel::<Vec<u8>>(8);
            let size = header.size;
            let staging = self.content.store().run(move |store| {
                let mut reader = ChannelReader {
                    rx,
                    buf: Vec::new(),
                    at: 0,
                };
                Ok(store.stage(&mut reader, size)?)
            });
            let feed = async {
                // Moved in: dropping it when the file's bytes are all sent ends the file.
                let tx = tx;
                let mut sent = 0u64;
                loop {
                    let m = next_message(&mut stream).await?;
                    match m {
                        Some(pb::AddStreamMessage {
                            item: Some(Item::Data(d)),
                        }) => {
                            sent += d.len() as u64;
                            if sent > size {
                                return Err(ContentError::Invalid(format!(
                                    "{path}: more than the {size} bytes its header declared"
                                )));
                            }
                            if tx.send(d).await.is_err() {
                                // Staging ended early: its error tells why.
                                return Ok(None);
                            }
                        }
                        other => return Ok(other),
                    }
                }
            };
            // Feed and stage together.
            let (fed, staged) = tokio::join!(feed, staging);
            // The stream's own fault first: staging then only saw it end early.
            let fed = fed?;
            let staged = staged.map_err(|e| match e {
                ContentError::Store(e) => ContentError::Invalid(format!("{path}: {e}")),
                e => e,
            })?;
            next = fed;
            files.push(StagedFile {
                path,
                executable: header.executable,
                staged,
            });
        }
        let content = self.content.clone();
        let no_pin = start.no_pin;
        let (signed, info) = self
            .content
            .store()
            .run(move |store| {
                add::insert(store, content.identity().key_pair(), &meta, files, no_pin)
            })
            .await?;
        Ok(added(&self.content, &signed, &info))
    }

    async fn info_of(&self, id: PackageId) -> Result<pb::PackageDetail> {
        self.content
            .store()
            .run(move |s| {
                let info = s.package(&id)?.ok_or_else(|| {
                    ContentError::NotFound(format!("{} is not in the store", Mri::package(id)))
                })?;
                let bytes = s.manifest(&id)?.ok_or_else(|| {
                    ContentError::NotFound(format!("{} is not in the store", Mri::package(id)))
                })?;
                let signed = SignedManifest::parse(&bytes).map_err(|e| {
                    ContentError::Internal(format!("the stored manifest is invalid: {e}"))
                })?;
                let m = signed.manifest();
                let md = &m.metadata;
                let files = s.files(&id)?;
                Ok(pb::PackageDetail {
                    package: Some(package(&info)),
                    author: m.author.to_string(),
                    created: m.created,
                    metadata: Some(pb::Metadata {
                        title: md.title.clone(),
                        description: md.description.clone(),
                        tags: md.tags.clone(),
                        language: md.language.clone(),
                        licence: md.licence.clone(),
                        kind: md.kind.to_string(),
                        extra: md.extra.clone().into_iter().collect(),
                    }),
                    files: files.iter().map(|f| file(id, f)).collect(),
                })
            })
            .await
    }

    async fn hold(&self, mri: &str, pin: bool) -> Result<pb::Package> {
        let id = package_mri(mri)?;
        self.content
            .store()
            .run(move |s| {
                if pin {
                    s.hold(&id, Hold::Pin)?;
                } else {
                    s.release(&id, Hold::Pin)?;
                }
                let info = s.package(&id)?.ok_or_else(|| {
                    ContentError::NotFound(format!("{} is not in the store", Mri::package(id)))
                })?;
                Ok(package(&info))
            })
            .await
    }
}

/// The next message of a client stream (`None` at its end).
async fn next_message<S, T>(stream: &mut S) -> Result<Option<T>>
where
    S: Stream<Item = std::result::Result<T, Status>> + Unpin,
{
    use tokio_stream::StreamExt;
    stream
        .next()
        .await
        .transpose()
        .map_err(|s| ContentError::Invalid(format!("reading the stream: {}", s.message())))
}

/// Reads what a channel brings, for staging a streamed file on a blocking thread.
struct ChannelReader {
    rx: mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    at: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.buf.len() {
            match self.rx.blocking_recv() {
                Some(b) => {
                    self.buf = b;
                    self.at = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[tonic::async_trait]
impl ContentApi for ContentService {
    async fn add_paths(
        &self,
        req: Request<pb::AddPathsRequest>,
    ) -> std::result::Result<Response<pb::AddResponse>, Status> {
        Ok(Response::new(self.run_add_paths(req.into_inner()).await?))
    }

    async fn add_stream(
        &self,
        req: Request<Streaming<pb::AddStreamMessage>>,
    ) -> std::result::Result<Response<pb::AddResponse>, Status> {
        Ok(Response::new(self.run_add_stream(req.into_inner()).await?))
    }

    type GetStream = Stream_<pb::Progress>;

    async fn get(
        &self,
        req: Request<pb::GetRequest>,
    ) -> std::result::Result<Response<Self::GetStream>, Status> {
        let req = req.into_inner();
        let id = package_mri(&req.mri)?;
        let providers = req
            .providers
            .iter()
            .map(|p| self.content.provider(p))
            .collect::<Result<Vec<_>>>()?;
        let output = if req.output_dir.is_empty() {
            None
        } else {
            Some(Content::absolute(&req.output_dir, "output directory")?)
        };
        let pin = !req.no_pin;
        let handle = self.content.get(id, providers, pin)?;
        let (tx, rx) = mpsc::channel(16);
        let content = self.content.clone();
        tokio::spawn(async move {
            let (latest, mut updates) = handle.subscribe();
            let mut last = latest;
            loop {
                if is_final(&last.state) {
                    break;
                }
                if tx.send(Ok(last.clone())).await.is_err() {
                    // The client left; the download goes on.
                    return;
                }
                last = match updates.recv().await {
                    Ok(p) => p,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => break,
                };
            }
            drop(handle);
            if last.state != "complete" {
                let _ = tx.send(Ok(last)).await;
                return;
            }
            let store = content.store().clone();
            if pin {
                let _ = store.run(move |s| Ok(s.hold(&id, Hold::Pin)?)).await;
            }
            let Some(dir) = output else {
                last.state = "done".into();
                let _ = tx.send(Ok(last)).await;
                return;
            };
            last.state = "exporting".into();
            let _ = tx.send(Ok(last.clone())).await;
            let d = dir.clone();
            match store.run(move |s| export::export(s, &id, &d)).await {
                Ok(done) => {
                    last.state = "done".into();
                    last.event = format!(
                        "wrote {} files ({} bytes) to {}",
                        done.files,
                        done.bytes,
                        dir.display()
                    );
                }
                Err(e) => {
                    last.state = "failed".into();
                    last.error = format!("the package is here, but exporting it failed: {e}");
                }
            }
            let _ = tx.send(Ok(last)).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ReadStream = Stream_<pb::ReadChunk>;

    async fn read(
        &self,
        req: Request<pb::ReadRequest>,
    ) -> std::result::Result<Response<Self::ReadStream>, Status> {
        let req = req.into_inner();
        let mri = parse_mri(&req.mri)?;
        let path = mri.path.clone().ok_or_else(|| {
            ContentError::Invalid(format!(
                "{} names a package; read one file of it: {}/PATH",
                req.mri, req.mri
            ))
        })?;
        let id = mri.package;
        let (info, reader) = self
            .content
            .store()
            .run(move |s| Ok(s.open_file(&id, &path)?))
            .await?;
        let size = info.size;
        if req.offset > size {
            return Err(ContentError::Invalid(format!(
                "offset {} is past the end of the {size}-byte file",
                req.offset
            ))
            .into());
        }
        let end = if req.length == 0 {
            size
        } else {
            req.offset.saturating_add(req.length).min(size)
        };
        let (tx, rx) = mpsc::channel(4);
        let start = req.offset;
        tokio::task::spawn_blocking(move || {
            let mut at = start;
            while at < end {
                let n = usize::try_from(end - at)
                    .unwrap_or(READ_CHUNK)
                    .min(READ_CHUNK);
                let mut buf = vec![0u8; n];
                let msg = match reader.read_exact_at(at, &mut buf) {
                    Ok(()) => Ok(pb::ReadChunk {
                        offset: at,
                        data: buf,
                        file_size: size,
                    }),
                    Err(e) => Err(Status::internal(format!("reading the file at {at}: {e}"))),
                };
                let failed = msg.is_err();
                if tx.blocking_send(msg).is_err() || failed {
                    return;
                }
                at += n as u64;
            }
            if start == end {
                let _ = tx.blocking_send(Ok(pb::ReadChunk {
                    offset: start,
                    data: Vec::new(),
                    file_size: size,
                }));
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn export(
        &self,
        req: Request<pb::ExportRequest>,
    ) -> std::result::Result<Response<pb::ExportResponse>, Status> {
        let req = req.into_inner();
        let id = package_mri(&req.mri)?;
        let dir = Content::absolute(&req.output_dir, "output directory")?;
        let d = dir.clone();
        let done = self
            .content
            .store()
            .run(move |s| export::export(s, &id, &d))
            .await?;
        Ok(Response::new(pb::ExportResponse {
            output_dir: dir.display().to_string(),
            files: done.files,
            bytes: done.bytes,
        }))
    }

    async fn list(
        &self,
        _: Request<pb::ListRequest>,
    ) -> std::result::Result<Response<pb::ListResponse>, Status> {
        let (packages, u) = self
            .content
            .store()
            .run(|s| Ok((s.packages()?, s.usage()?)))
            .await?;
        Ok(Response::new(pb::ListResponse {
            packages: packages.iter().map(package).collect(),
            usage: Some(usage(&u)),
        }))
    }

    async fn info(
        &self,
        req: Request<pb::InfoRequest>,
    ) -> std::result::Result<Response<pb::PackageDetail>, Status> {
        let id = package_mri(&req.into_inner().mri)?;
        Ok(Response::new(self.info_of(id).await?))
    }

    async fn pin(
        &self,
        req: Request<pb::PinRequest>,
    ) -> std::result::Result<Response<pb::Package>, Status> {
        Ok(Response::new(self.hold(&req.into_inner().mri, true).await?))
    }

    async fn unpin(
        &self,
        req: Request<pb::PinRequest>,
    ) -> std::result::Result<Response<pb::Package>, Status> {
        Ok(Response::new(
            self.hold(&req.into_inner().mri, false).await?,
        ))
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveRequest>,
    ) -> std::result::Result<Response<pb::RemoveResponse>, Status> {
        let id = package_mri(&req.into_inner().mri)?;
        if let Some(d) = self.content.download(&id) {
            d.cancel("the package was removed").await;
            for _ in 0..100 {
                if self.content.download(&id).is_none() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        let freed = self
            .content
            .store()
            .run(move |s| Ok(s.remove(&id)?))
            .await?;
        Ok(Response::new(pb::RemoveResponse { bytes_freed: freed }))
    }

    async fn verify(
        &self,
        _: Request<pb::VerifyRequest>,
    ) -> std::result::Result<Response<pb::VerifyResponse>, Status> {
        let r = self.content.store().run(|s| Ok(s.verify()?)).await?;
        Ok(Response::new(pb::VerifyResponse {
            blobs_checked: r.blobs_checked,
            bytes_checked: r.bytes_checked,
            corrupt: r
                .corrupt
                .iter()
                .map(|c| pb::Corruption {
                    hash: c.hash.to_string(),
                    problem: c.problem.to_string(),
                    verified_bytes_kept: c.verified_bytes_kept,
                    packages: c
                        .packages
                        .iter()
                        .map(|p| Mri::package(*p).to_string())
                        .collect(),
                })
                .collect(),
        }))
    }

    type WatchStream = Stream_<pb::Progress>;

    async fn watch(
        &self,
        _: Request<pb::WatchRequest>,
    ) -> std::result::Result<Response<Self::WatchStream>, Status> {
        let mut rx = self.content.watch();
        let (tx, out) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(p) => {
                        if tx.send(Ok(p)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn get_stats(
        &self,
        _: Request<pb::StatsRequest>,
    ) -> std::result::Result<Response<pb::ContentStats>, Status> {
        let u = self.content.store().run(|s| Ok(s.usage()?)).await?;
        Ok(Response::new(pb::ContentStats {
            counters: self
                .content
                .counters()
                .snapshot()
                .into_iter()
                .map(|(name, value)| pb::ContentCounter {
                    name: name.to_owned(),
                    value,
                })
                .collect(),
            usage: Some(usage(&u)),
            listen: self
                .content
                .listen_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shell::content::{settings::ContentSettings, store::StoreAccess};
    use myconet_store::{MemStore, StoreConfig};
    use pb::add_stream_message::Item;

    fn service(tag: &str) -> (ContentService, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("myconet-grpc-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let identity = Arc::new(crate::identity::Identity::load_or_create(&dir).unwrap());
        let store = MemStore::new(StoreConfig::with_max_bytes(64 << 20)).unwrap();
        let content = Content::with_store(
            ContentSettings::defaults(&dir),
            identity,
            StoreAccess::new(Arc::new(store)),
            Default::default(),
        );
        (ContentService::new(content), dir)
    }

    fn msg(item: Item) -> std::result::Result<pb::AddStreamMessage, Status> {
        Ok(pb::AddStreamMessage { item: Some(item) })
    }

    fn start() -> std::result::Result<pb::AddStreamMessage, Status> {
        msg(Item::Start(pb::AddStart {
            metadata: Some(pb::Metadata {
                title: "t".into(),
                ..Default::default()
            }),
            no_pin: false,
        }))
    }

    fn file(path: &str, size: u64) -> std::result::Result<pb::AddStreamMessage, Status> {
        msg(Item::File(pb::FileHeader {
            path: path.into(),
            size,
            executable: false,
        }))
    }

    async fn add(
        svc: &ContentService,
        items: Vec<std::result::Result<pb::AddStreamMessage, Status>>,
    ) -> Result<pb::AddResponse> {
        svc.run_add_stream(tokio_stream::iter(items)).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streamed_files_become_a_package_that_reads_back() {
        let (svc, dir) = service("ok");
        let data = vec![7u8; 3 << 20];
        let r = add(
            &svc,
            vec![
                start(),
                file("a/b.bin", data.len() as u64),
                msg(Item::Data(data[..1 << 20].to_vec())),
                msg(Item::Data(data[1 << 20..].to_vec())),
                file("empty", 0),
            ],
        )
        .await
        .unwrap();
        let mri: Mri = r.mri.parse().unwrap();
        let detail = svc.info_of(mri.package).await.unwrap();
        assert_eq!(detail.files.len(), 2);
        assert!(detail.package.unwrap().complete);
        let id = mri.package;
        let path = PackagePath::new("a/b.bin").unwrap();
        let (info, reader) = svc
            .content
            .store()
            .run(move |s| Ok(s.open_file(&id, &path)?))
            .await
            .unwrap();
        assert_eq!(info.size, data.len() as u64);
        let mut back = vec![0u8; data.len()];
        reader.read_exact_at(0, &mut back).unwrap();
        assert_eq!(back, data);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_streams_are_refused_with_the_reason() {
        let (svc, dir) = service("bad");
        let err = |r: Result<pb::AddResponse>| r.unwrap_err().to_string();
        for (items, needle) in [
            (vec![file("x", 1)], "starts with a `start`"),
            (
                vec![start(), file("../etc/passwd", 1), msg(Item::Data(vec![1]))],
                "\"..\"",
            ),
            (
                vec![start(), file("/etc/passwd", 1), msg(Item::Data(vec![1]))],
                "absolute",
            ),
            (
                vec![start(), file("a", 1), msg(Item::Data(vec![1, 2]))],
                "more than the 1 bytes",
            ),
            (
                vec![start(), file("a", 5), msg(Item::Data(vec![1]))],
                "ended after 1 bytes",
            ),
            (
                vec![start(), msg(Item::Data(vec![1]))],
                "expected a `file` header",
            ),
            (vec![start()], "at least one file"),
            (
                vec![
                    start(),
                    file("a", 1),
                    msg(Item::Data(vec![1])),
                    file("a", 1),
                    msg(Item::Data(vec![1])),
                ],
                "duplicate",
            ),
        ] {
            let e = err(add(&svc, items).await);
            assert!(
                e.to_lowercase().contains(&needle.to_lowercase()),
                "{needle}: {e}"
            );
        }
        // An oversized title is refused before any byte is staged.
        let big = msg(Item::Start(pb::AddStart {
            metadata: Some(pb::Metadata {
                title: "x".repeat(300),
                ..Default::default()
            }),
            no_pin: false,
        }));
        let e = err(add(&svc, vec![big, file("a", 1), msg(Item::Data(vec![1]))]).await);
        assert!(e.contains("title"), "{e}");
        // Nothing was left staged by the failures.
        let usage = svc.content.store().run(|s| Ok(s.usage()?)).await.unwrap();
        assert_eq!(usage.staging_bytes, 0);
        let _ = std::fs::remove_dir_all(dir);
    }
}
