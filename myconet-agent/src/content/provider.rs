//! The requesting side's connection to one provider: a TCP stream to its overlay
//! address, frames read whole and handed to the download's driver, requests written
//! as the driver hands them over. One connection per provider and download, so each
//! download's request ids (numbered from 1 by its `Fetch`) stay apart.

use std::{net::SocketAddrV6, time::Duration};

use myconet_content::wire::Role;
use tokio::{
    io::{AsyncWriteExt, BufReader},
    net::TcpStream,
    sync::mpsc,
};

use super::{download::Input, frames::read_frame};

/// How long opening a connection to a provider may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Read buffer of a provider connection (several data frames per read).
const READ_BUFFER: usize = 256 << 10;

/// Runs one connection to `provider` until it ends: requests from `out` are written,
/// every frame read goes to `input` tagged with `generation`. Ends by sending
/// [`Input::Closed`] (unless the driver is gone); the driver closes it by dropping
/// `out`'s sender or aborting the task.
pub async fn run(
    provider: SocketAddrV6,
    generation: u64,
    mut out: mpsc::UnboundedReceiver<Vec<u8>>,
    input: mpsc::Sender<Input>,
) {
    let error = connect_and_run(provider, generation, &mut out, &input)
        .await
        .err();
    let _ = input
        .send(Input::Closed {
            provider,
            generation,
            error,
        })
        .await;
}

async fn connect_and_run(
    provider: SocketAddrV6,
    generation: u64,
    out: &mut mpsc::UnboundedReceiver<Vec<u8>>,
    input: &mpsc::Sender<Input>,
) -> Result<(), String> {
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(provider)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("connecting: {e}")),
        Err(_) => return Err(format!("connecting: no answer in {CONNECT_TIMEOUT:?}")),
    };
    let _ = stream.set_nodelay(true);
    let (r, mut w) = stream.into_split();
    let writer = async {
        while let Some(frame) = out.recv().await {
            w.write_all(&frame)
                .await
                .map_err(|e| format!("writing: {e}"))?;
        }
        // The driver closed the connection.
        Ok(())
    };
    let reader = async {
        let mut r = BufReader::with_capacity(READ_BUFFER, r);
        loop {
            match read_frame(&mut r, Role::Requester).await {
                Ok(Some(frame)) => {
                    let sent = input
                        .send(Input::Frame {
                            provider,
                            generation,
                            frame,
                        })
                        .await;
                    if sent.is_err() {
                        return Ok(());
                    }
                }
                Ok(None) => return Err("the provider closed the connection".to_owned()),
                Err(e) => return Err(format!("reading: {e}")),
            }
        }
    };
    tokio::select! {
        r = writer => r,
        r = reader => r,
    }
}
