//! `myconet-ctl content …`: packages in the agent's store, downloads from other nodes,
//! reading them back. Speaks the `Content` service on the same socket as the rest.

mod progress;
mod render;

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use myconet_content::manifest::{Kind, check_language, check_spdx};
use myconet_proto::content::v1::{self as pb, content_client::ContentClient};
use tonic::transport::Channel;

use crate::{
    client::{self, CtlError},
    show,
};

/// `content …`
#[derive(Debug, Subcommand)]
pub enum ContentCommand {
    /// Add files and directories as a package (signed by this node) and print its MRI.
    /// One directory alone becomes the package's root; otherwise each path enters
    /// under its own name.
    Add(AddArgs),
    /// Download a package from the named providers (resuming what is here), showing
    /// progress; with -o, write its files into DIR.
    Get(GetArgs),
    /// List the packages in the store and its use of the quota.
    #[command(visible_alias = "list")]
    Ls,
    /// A package's metadata, files and what is here of it.
    Info {
        /// mri:…
        #[arg(value_name = "MRI")]
        mri: String,
    },
    /// Write one file of a complete package to standard output.
    Cat(CatArgs),
    /// Keep a package whatever room is needed (pinned packages are never evicted).
    Pin {
        /// mri:…
        #[arg(value_name = "MRI")]
        mri: String,
    },
    /// Let a package be evicted when room is needed.
    Unpin {
        /// mri:…
        #[arg(value_name = "MRI")]
        mri: String,
    },
    /// Remove a package now (files no other package uses are deleted).
    #[command(visible_alias = "remove")]
    Rm {
        /// mri:…
        #[arg(value_name = "MRI")]
        mri: String,
    },
    /// Re-hash every complete file in the store and report corruption.
    Verify,
    /// Counters of the content service and the store's usage.
    Stats,
    /// Follow every download's progress as it happens (until interrupted).
    Watch,
}

/// `content add PATH… [metadata]`
#[derive(Debug, Args)]
pub struct AddArgs {
    /// Files or directories (a single directory becomes the package's root).
    #[arg(value_name = "PATH", required = true)]
    pub paths: Vec<PathBuf>,
    /// Title.
    #[arg(long)]
    pub title: Option<String>,
    /// Description.
    #[arg(long)]
    pub description: Option<String>,
    /// Tag (repeat for several).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Language, a BCP 47 tag (en, pt-BR, zh-Hant-TW).
    #[arg(long = "lang", value_name = "TAG", value_parser = parse_language)]
    pub lang: Option<String>,
    /// Licence, an SPDX expression (MIT OR Apache-2.0).
    #[arg(long, visible_alias = "license", value_name = "SPDX", value_parser = parse_licence)]
    pub licence: Option<String>,
    /// What the package holds.
    #[arg(long, value_parser = parse_kind)]
    pub kind: Option<String>,
    /// Free metadata, KEY=VALUE (repeat for several).
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub extra: Vec<(String, String)>,
    /// Keep the package cached (evictable) instead of pinned.
    #[arg(long)]
    pub no_pin: bool,
    /// Send the files' bytes over the control socket instead of letting the agent read
    /// them (for files the agent cannot see); regular files only.
    #[arg(long)]
    pub stream: bool,
}

/// `content get MRI [-o DIR] [--from ADDR]…`
#[derive(Debug, Args)]
pub struct GetArgs {
    /// mri:…
    #[arg(value_name = "MRI")]
    pub mri: String,
    /// Write the package's files into this (new or empty) directory once complete.
    #[arg(short = 'o', long = "output", value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// A node that holds the package: its overlay address, ADDR or [ADDR]:PORT
    /// (repeat for several; downloads use them all in parallel).
    #[arg(long = "from", value_name = "ADDR")]
    pub from: Vec<String>,
    /// Keep the package cached (evictable) instead of pinned.
    #[arg(long)]
    pub no_pin: bool,
}

/// `content cat MRI/PATH`
#[derive(Debug, Args)]
pub struct CatArgs {
    /// mri:…/path
    #[arg(value_name = "MRI/PATH")]
    pub mri: String,
    /// First byte to write.
    #[arg(long, default_value_t = 0)]
    pub offset: u64,
    /// Bytes to write (default: to the end).
    #[arg(long)]
    pub length: Option<u64>,
}

fn parse_language(s: &str) -> Result<String, String> {
    check_language(s).map_err(|e| format!("'{s}' is not a BCP 47 language tag: {e}"))?;
    Ok(s.to_owned())
}

fn parse_licence(s: &str) -> Result<String, String> {
    check_spdx(s).map_err(|e| format!("'{s}' is not an SPDX expression: {e}"))?;
    Ok(s.to_owned())
}

fn parse_kind(s: &str) -> Result<String, String> {
    s.parse::<Kind>().map_err(|_| {
        let names: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        format!("'{s}' is not a kind (one of {})", names.join(", "))
    })?;
    Ok(s.to_owned())
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("'{s}': the key is empty"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// A path the agent can use: absolute, from the caller's working directory (links are
/// left for the agent to judge).
fn absolute(p: &Path) -> anyhow::Result<String> {
    let abs = std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))?;
    abs.to_str()
        .map(str::to_owned)
        .with_context(|| format!("{}: the path is not UTF-8", abs.display()))
}

/// Runs one `content` command; returns what to print on standard output.
pub async fn run(socket: &Path, json: bool, command: ContentCommand) -> anyhow::Result<String> {
    let channel = client::channel(socket, None).await?;
    let mut c = ContentClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    match command {
        ContentCommand::Add(a) => add(&mut c, json, a).await,
        ContentCommand::Get(g) => progress::get(&mut c, json, g).await,
        ContentCommand::Ls => {
            let r = c.list(pb::ListRequest {}).await.map_err(CtlError::from)?;
            show(json, r.get_ref(), render::list)
        }
        ContentCommand::Info { mri } => {
            let r = c
                .info(pb::InfoRequest { mri })
                .await
                .map_err(CtlError::from)?;
            show(json, r.get_ref(), render::info)
        }
        ContentCommand::Cat(a) => cat(&mut c, a).await,
        ContentCommand::Pin { mri } => {
            let r = c
                .pin(pb::PinRequest { mri })
                .await
                .map_err(CtlError::from)?;
            show(json, r.get_ref(), |p| format!("pinned {}\n", p.mri))
        }
        ContentCommand::Unpin { mri } => {
            let r = c
                .unpin(pb::PinRequest { mri })
                .await
                .map_err(CtlError::from)?;
            show(json, r.get_ref(), |p| {
                format!("unpinned {} (cached: evicted when room is needed)\n", p.mri)
            })
        }
        ContentCommand::Rm { mri } => {
            let r = c
                .remove(pb::RemoveRequest { mri: mri.clone() })
                .await
                .map_err(CtlError::from)?;
            show(json, r.get_ref(), |r| {
                format!("removed {mri} ({} freed)\n", render::bytes(r.bytes_freed))
            })
        }
        ContentCommand::Verify => {
            let r = c
                .verify(pb::VerifyRequest {})
                .await
                .map_err(CtlError::from)?;
            let text = show(json, r.get_ref(), render::verify)?;
            if !r.get_ref().corrupt.is_empty() {
                // Scripts must notice: print the report, then fail.
                print!("{text}");
                bail!("{} corrupt file(s) found", r.get_ref().corrupt.len());
            }
            Ok(text)
        }
        ContentCommand::Stats => {
            let r = c
                .get_stats(pb::StatsRequest {})
                .await
                .map_err(CtlError::from)?;
            show(json, r.get_ref(), render::stats)
        }
        ContentCommand::Watch => progress::watch(&mut c, json).await,
    }
}

async fn add(c: &mut ContentClient<Channel>, json: bool, a: AddArgs) -> anyhow::Result<String> {
    let metadata = pb::Metadata {
        title: a.title.unwrap_or_default(),
        description: a.description.unwrap_or_default(),
        tags: a.tags,
        language: a.lang.unwrap_or_default(),
        licence: a.licence.unwrap_or_default(),
        kind: a.kind.unwrap_or_default(),
        extra: a.extra.into_iter().collect(),
    };
    let r = if a.stream {
        add_stream(c, metadata, a.no_pin, &a.paths).await?
    } else {
        let paths = a
            .paths
            .iter()
            .map(|p| absolute(p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        c.add_paths(pb::AddPathsRequest {
            paths,
            metadata: Some(metadata),
            no_pin: a.no_pin,
        })
        .await
        .map_err(CtlError::from)?
        .into_inner()
    };
    show(json, &r, |r| format!("{}\n", r.mri))
}

/// Bytes per `data` message of a streamed add.
const STREAM_CHUNK: usize = 1 << 20;

async fn add_stream(
    c: &mut ContentClient<Channel>,
    metadata: pb::Metadata,
    no_pin: bool,
    paths: &[PathBuf],
) -> anyhow::Result<pb::AddResponse> {
    use pb::add_stream_message::Item;
    use std::os::unix::fs::PermissionsExt;
    // Checked before anything is sent: regular files, distinct names.
    let mut files = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).with_context(|| format!("{}", p.display()))?;
        if !meta.is_file() {
            bail!(
                "{}: --stream sends regular files only (let the agent read directories: drop --stream)",
                p.display()
            );
        }
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{}: no UTF-8 file name", p.display()))?
            .to_owned();
        files.push((
            p.clone(),
            name,
            meta.len(),
            meta.permissions().mode() & 0o111 != 0,
        ));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let sender = tokio::spawn(async move {
        let send = |item| {
            let tx = tx.clone();
            async move {
                tx.send(pb::AddStreamMessage { item: Some(item) })
                    .await
                    .map_err(|_| anyhow::anyhow!("the agent stopped reading"))
            }
        };
        send(Item::Start(pb::AddStart {
            metadata: Some(metadata),
            no_pin,
        }))
        .await?;
        for (path, name, size, executable) in files {
            send(Item::File(pb::FileHeader {
                path: name,
                size,
                executable,
            }))
            .await?;
            let mut f = tokio::fs::File::open(&path)
                .await
                .with_context(|| format!("{}", path.display()))?;
            let mut left = size;
            while left > 0 {
                let mut buf =
                    vec![0u8; STREAM_CHUNK.min(usize::try_from(left).unwrap_or(STREAM_CHUNK))];
                tokio::io::AsyncReadExt::read_exact(&mut f, &mut buf)
                    .await
                    .with_context(|| format!("reading {}", path.display()))?;
                left -= buf.len() as u64;
                send(Item::Data(buf)).await?;
            }
        }
        anyhow::Ok(())
    });
    let resp = c
        .add_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let sent = sender.await.context("the sending task failed")?;
    let resp = resp.map_err(CtlError::from)?.into_inner();
    sent?;
    Ok(resp)
}

async fn cat(c: &mut ContentClient<Channel>, a: CatArgs) -> anyhow::Result<String> {
    let mut stream = c
        .read(pb::ReadRequest {
            mri: a.mri,
            offset: a.offset,
            length: a.length.unwrap_or(0),
        })
        .await
        .map_err(CtlError::from)?
        .into_inner();
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = stream.message().await.map_err(CtlError::from)? {
        match out.write_all(&chunk.data) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(String::new()),
            Err(e) => return Err(e).context("writing to standard output"),
        }
    }
    out.flush().context("writing to standard output")?;
    Ok(String::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_is_checked_on_the_command_line() {
        assert!(parse_language("pt-BR").is_ok());
        assert!(parse_language("not a tag").unwrap_err().contains("BCP 47"));
        assert!(parse_licence("MIT OR Apache-2.0").is_ok());
        assert!(parse_licence("MIT OR").unwrap_err().contains("SPDX"));
        assert!(parse_kind("video").is_ok());
        assert!(parse_kind("movie").unwrap_err().contains("site"));
        assert_eq!(
            parse_key_value("a=b=c").unwrap(),
            ("a".into(), "b=c".into())
        );
        assert!(parse_key_value("=x").is_err());
        assert!(parse_key_value("x").is_err());
    }
}
