//! HandshakeInits made the way an initiator makes them, for tools that play a hostile
//! or load-generating initiator against a real node (the flood benchmark's attacker):
//! they use the core's own builders, so what they send is exactly what a node would.
//! Nothing in the agent uses this.

use std::net::Ipv6Addr;

use myconet_common::addr::node_address;
use ring::rand::SecureRandom;

use super::{
    HandshakeError, PUBLIC_KEY_LEN, Signer, Suite,
    handshake::Initiation,
    msg::{CookieReplyMsg, init},
};

/// Length of a HandshakeInit on the wire.
pub const INIT_LEN: usize = init::LEN;

/// One initiation from `signer`'s identity to an overlay address, re-signed when a
/// cookie reply for it comes back.
pub struct ForgedInit {
    initiation: Initiation,
}

impl std::fmt::Debug for ForgedInit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForgedInit")
            .field("local_index", &self.initiation.local_index)
            .field("remote_addr", &self.initiation.remote_addr)
            .finish_non_exhaustive()
    }
}

impl ForgedInit {
    /// A signed init from the node whose key `signer` holds (its own overlay address
    /// as the source) to `dst`, with receiver index `index` and init timestamp
    /// `timestamp`.
    pub fn new(
        signer: &dyn Signer,
        dst: Ipv6Addr,
        index: u32,
        timestamp: u64,
        rng: &dyn SecureRandom,
    ) -> Result<Self, HandshakeError> {
        let key = <[u8; PUBLIC_KEY_LEN]>::try_from(signer.public_key())
            .map_err(|_| HandshakeError::Malformed("signer key"))?;
        let initiation = Initiation::new(
            signer,
            key,
            node_address(&key),
            dst,
            index.max(1),
            None,
            &[Suite::Aes256Gcm, Suite::ChaCha20Poly1305],
            timestamp,
            None,
            rng,
        )?;
        Ok(Self { initiation })
    }

    /// The datagram to send.
    pub fn message(&self) -> &[u8] {
        self.initiation.message()
    }

    /// The receiver index the init carries (cookie replies and responses name it).
    pub fn index(&self) -> u32 {
        self.initiation.local_index
    }

    /// Takes the cookie out of a CookieReply for this init and re-signs the init with
    /// it; false if the datagram is not such a reply.
    pub fn accept_cookie_reply(&mut self, datagram: &[u8], signer: &dyn Signer) -> bool {
        let Ok(reply) = CookieReplyMsg::parse(datagram) else {
            return false;
        };
        let Ok(cookie) = self.initiation.check_cookie_reply(&reply) else {
            return false;
        };
        self.initiation.set_cookie(Some(cookie), signer).is_ok()
    }
}
