//! The key pins on disk: `state_dir/pins`, the text form of
//! [`myconet_core::pins::Pins`], read at start-up and written when changed.

use myconet_core::pins::{Pins, SharedPins, lock};

/// File name of the persisted pins inside the state directory.
pub const PINS_FILE: &str = "pins";

/// Reads `state_dir/pins` (an empty set if there is none). What cannot be read or
/// parsed is logged and skipped: losing pins weakens nothing that worked before them.
pub fn load(state_dir: &std::path::Path, capacity: usize) -> Pins {
    let path = state_dir.join(PINS_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let (pins, skipped) = Pins::from_text(&text, capacity);
            if skipped > 0 {
                tracing::warn!(path = %path.display(), skipped, "pins: lines skipped (unparsable, or the key does not own the prefix)");
            }
            pins
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Pins::new(capacity),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the pins; starting without");
            Pins::new(capacity)
        }
    }
}

/// Writes the pins to `state_dir/pins` if they changed since the last write (the text
/// is made under the lock, written after it). Returns whether it wrote.
pub fn save_if_changed(pins: &SharedPins, state_dir: &std::path::Path) -> std::io::Result<bool> {
    let text = {
        let mut p = lock(pins);
        if !p.take_dirty() {
            return Ok(false);
        }
        p.to_text()
    };
    let path = state_dir.join(PINS_FILE);
    crate::os::seqno_store::write_atomically(&path, text.as_bytes()).inspect_err(|_| {
        // Try again next time.
        lock(pins).mark_dirty();
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use myconet_core::pins::prefix_of;

    fn key(i: u8) -> [u8; 32] {
        [i; 32]
    }

    #[test]
    fn saved_when_changed_and_loaded_back() {
        let d = std::env::temp_dir().join(format!("myconet-pins-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let pins = Pins::new(10).shared();
        assert!(!save_if_changed(&pins, &d).unwrap(), "nothing to write");
        lock(&pins).check(prefix_of(&key(3)), &key(3));
        assert!(save_if_changed(&pins, &d).unwrap());
        assert!(!save_if_changed(&pins, &d).unwrap());
        let back = load(&d, 10);
        assert_eq!(back.list(), lock(&pins).list());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
