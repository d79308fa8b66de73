//! Frames of the content protocol on a TCP stream: reading one whole frame, and
//! building data frames in place. The checks are the core's (`wire::check_header`,
//! `Message::parse`); this only moves bytes.

use myconet_content::wire::{self, Frame, HEADER_LEN, MessageType, Role};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Reads one frame (header and body) from `r`, checking the header before a byte of
/// the body is read. `None` at a clean end of stream between frames. The buffer grows
/// with the bytes that arrive, never from the announced length alone.
///
/// Not cancel-safe: use it where the whole connection ends when it is dropped.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    role: Role,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    wire::check_header(&header, role)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let body = Frame::new_unchecked(&header[..]).body_len();
    // Data frames (the bulk) are at most 64 KiB: take them in one allocation. Larger
    // frames (manifests) grow as their bytes arrive.
    let mut frame = Vec::with_capacity(HEADER_LEN + body.min(wire::MAX_DATA_BYTES + 16));
    frame.extend_from_slice(&header);
    let read = r.take(body as u64).read_to_end(&mut frame).await?;
    if read != body {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(Some(frame))
}

/// Room before a data frame's payload: the header and the request id.
pub const DATA_PREFIX: usize = HEADER_LEN + 4;

/// Starts a data frame for request `id` at the end of `out`; returns where it starts.
/// Append the payload, then call [`finish_data`].
pub fn start_data(out: &mut Vec<u8>, id: u32) -> usize {
    let start = out.len();
    out.resize(start + HEADER_LEN, 0);
    out.extend_from_slice(&id.to_be_bytes());
    start
}

/// Writes the header of the data frame begun at `start` (payload: everything after it).
pub fn finish_data(out: &mut [u8], start: usize) {
    let body = out.len() - start - HEADER_LEN;
    Frame::new_unchecked(&mut out[start..]).set_header(MessageType::Data as u8, body as u32);
}

/// The header and request id of a manifest frame for request `id` carrying `len`
/// bytes, to be written before the stored bytes themselves (a manifest may be 16 MiB:
/// no second copy of it is made to frame it). `len` is at most the manifest limit.
pub fn manifest_prefix(id: u32, len: usize) -> [u8; DATA_PREFIX] {
    let mut out = [0u8; DATA_PREFIX];
    let body = u32::try_from(len + 4).unwrap_or(u32::MAX);
    Frame::new_unchecked(&mut out[..]).set_header(MessageType::Manifest as u8, body);
    out[HEADER_LEN..].copy_from_slice(&id.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use myconet_content::wire::Message;

    #[tokio::test]
    async fn frames_round_trip_and_bad_headers_fail() {
        let mut out = Vec::new();
        let s = start_data(&mut out, 7);
        out.extend_from_slice(b"payload");
        finish_data(&mut out, s);
        Message::Cancel { id: 3 }.emit(&mut out);
        let mut r = &out[..];
        let f = read_frame(&mut r, Role::Requester).await.unwrap().unwrap();
        let m = Message::parse(&Frame::new_checked(&f[..]).unwrap(), Role::Requester).unwrap();
        assert_eq!(
            m,
            Message::Data {
                id: 7,
                bytes: b"payload"
            }
        );
        // A request read by a requester is refused on its header.
        assert!(read_frame(&mut r, Role::Requester).await.is_err());
        let mut empty: &[u8] = &[];
        assert!(
            read_frame(&mut empty, Role::Provider)
                .await
                .unwrap()
                .is_none()
        );
        let mut short: &[u8] = &out[..10];
        assert!(read_frame(&mut short, Role::Requester).await.is_err());
    }

    #[test]
    fn a_manifest_prefix_and_its_bytes_are_the_manifest_frame() {
        let bytes = b"signed manifest bytes";
        let mut framed = manifest_prefix(9, bytes.len()).to_vec();
        framed.extend_from_slice(bytes);
        assert_eq!(framed, Message::Manifest { id: 9, bytes }.to_bytes());
    }
}
