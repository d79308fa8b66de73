//! What a peer sends on a content connection (`myconet_content::wire`) and what a user
//! or peer hands over as content names and manifests: frames, signed and unsigned
//! manifests, MRIs and package paths.
//!
//! Input layout: one mode byte, then the bytes. Mode `& 3`: 0 = a byte stream to the
//! content protocol (bit 2 picks the reading side, bits 3–7 the read size), 1 = an
//! unsigned manifest, 2 = a signed manifest, 3 = an MRI and a package path as text.
//!
//! Properties: every frame that parses re-emits to exactly its bytes, and a stream
//! reassembles into the same frames (or the same error) whatever the read size; a
//! manifest that decodes re-encodes to exactly its bytes (one encoding); a signed
//! manifest keeps exactly the bytes it was parsed from; names print back to text that
//! parses to the same name.

use myconet_content::{
    Manifest, Mri, PackagePath, SignedManifest,
    wire::{Deframer, Frame, Message, Role},
};

/// Every frame (or the error) a deframer yields for `stream` read `chunk` bytes at a
/// time.
fn deframe(stream: &[u8], role: Role, chunk: usize) -> (Vec<Vec<u8>>, bool) {
    let mut d = Deframer::new(role);
    let mut frames = Vec::new();
    for piece in stream.chunks(chunk.max(1)) {
        let mut input = piece;
        loop {
            match d.next_frame(&mut input) {
                Ok(Some(f)) => frames.push(f.to_vec()),
                Ok(None) => break,
                Err(_) => return (frames, true),
            }
        }
    }
    (frames, false)
}

fn stream(data: &[u8], mode: u8) {
    let role = if mode & 4 != 0 {
        Role::Provider
    } else {
        Role::Requester
    };
    let chunk = usize::from(mode >> 3) + 1;
    let whole = deframe(data, role, data.len());
    let pieces = deframe(data, role, chunk);
    assert_eq!(whole, pieces, "reassembly depends on the read size {chunk}");
    for f in &whole.0 {
        let frame = Frame::new_checked(&f[..]).expect("a deframed frame is whole");
        assert_eq!(frame.frame_len(), f.len());
        if let Ok(m) = Message::parse(&frame, role) {
            assert_eq!(m.to_bytes(), *f, "parse → emit must reproduce the frame");
            assert_eq!(m.frame_len(), f.len());
            let _ = m.to_string();
        }
    }
}

fn names(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (mri, path) = text.split_once('\n').unwrap_or((text, text));
    if let Ok(m) = mri.parse::<Mri>() {
        let again: Mri = m.to_string().parse().expect("a printed MRI parses");
        assert_eq!(again, m);
    }
    if let Ok(p) = path.parse::<PackagePath>() {
        let again: PackagePath = p.to_string().parse().expect("a printed path parses");
        assert_eq!(again, p);
    }
}

/// The fuzz target; see the module documentation.
pub fn run(data: &[u8]) {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    match mode & 3 {
        0 => stream(bytes, mode),
        1 => {
            if let Ok(m) = Manifest::decode(bytes) {
                assert_eq!(m.encode(), bytes, "a manifest has one encoding");
            }
        }
        2 => {
            if let Ok(s) = SignedManifest::parse(bytes) {
                assert_eq!(s.bytes(), bytes);
                assert_eq!(
                    Manifest::decode(&s.manifest().encode()).as_ref(),
                    Ok(s.manifest())
                );
            }
        }
        _ => names(bytes),
    }
}
