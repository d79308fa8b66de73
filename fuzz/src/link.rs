//! Link messages (`peers::wire`): hello, hello-ack, keepalive and beacon
//! bodies, opened from a neighbour's link session or (beacons) received in the clear,
//! and the routing frame around routing payloads.

use myconet_core::peers::wire::{
    LINK_HEADER_LEN, LinkMessage, LinkMessageError, MAX_LINK_MESSAGE_LEN, frame_routing,
    routing_payload,
};

/// Every message that parses emits to exactly its input; every routing frame that
/// parses re-frames to exactly its input.
pub fn run(data: &[u8]) {
    match LinkMessage::parse(data) {
        Ok(message) => {
            assert_eq!(message.buffer_len(), data.len());
            assert!(data.len() <= MAX_LINK_MESSAGE_LEN);
            assert_eq!(
                message.to_vec(),
                data,
                "parse → emit must reproduce the bytes"
            );
            assert_eq!(LinkMessage::parse(&message.to_vec()), Ok(message));
            // Emitting into a buffer one byte short fails cleanly.
            let mut short = vec![0u8; data.len() - 1];
            assert!(matches!(
                message.emit(&mut short),
                Err(LinkMessageError::BufferTooSmall { .. })
            ));
            assert!(
                routing_payload(data).is_none(),
                "a control kind is not routing"
            );
        }
        Err(LinkMessageError::Truncated { len, need }) => {
            assert_eq!(len, data.len());
            assert!(need > len);
        }
        Err(LinkMessageError::Trailing(n)) => assert!(n > 0 && n < data.len()),
        Err(_) => {}
    }
    match routing_payload(data) {
        Some(Ok(body)) => {
            assert_eq!(body.len() + LINK_HEADER_LEN, data.len());
            assert_eq!(frame_routing(body).as_deref(), Some(data));
        }
        Some(Err(_)) => {}
        None => {}
    }
}
