//! The node-to-node content protocol's TCP listener on the node's overlay address.
//!
//! Riding the overlay gives the protocol its security for free: the stream is
//! end-to-end encrypted by the sessions, relays forward it in the kernel and see
//! nothing, and the source address is authenticated: the overlay delivers an inner
//! packet only if its source lies in the /64 the session's peer proved it owns. So the
//! requesting node is its source /64, and the limits are keyed by it (a node owns 2^64
//! addresses; keying by the full address would hand it that many sets of limits).
//!
//! The socket is bound to the TUN device as well as to the overlay address: Linux would
//! otherwise accept a connection to the overlay address arriving on an underlay
//! interface (the weak host model), from a source nobody authenticated.

use std::{
    collections::HashMap,
    net::{Ipv6Addr, SocketAddr, SocketAddrV6},
    sync::{Arc, Mutex},
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{debug, info, warn};

use super::{counters::Counters, serve::ServeCtx};

/// How often idle nodes are forgotten by the limits.
const LIMITS_TICK: Duration = Duration::from_secs(10);

/// The /64 of an overlay address: the identity the overlay authenticated.
pub fn node_of(addr: &Ipv6Addr) -> u64 {
    let o = addr.octets();
    u64::from_be_bytes([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]])
}

/// Binds `addr` (on `device` when given) and serves connections until aborted.
pub fn listen(
    ctx: Arc<ServeCtx>,
    addr: SocketAddrV6,
    device: Option<&str>,
    max_connections: usize,
    per_node: usize,
) -> std::io::Result<JoinHandle<()>> {
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_only_v6(true)?;
    socket.set_reuse_address(true)?;
    if let Some(dev) = device {
        socket.bind_device(Some(dev.as_bytes()))?;
    }
    socket.bind(&SocketAddr::V6(addr).into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    let listener = TcpListener::from_std(socket.into())?;
    info!(listen = %addr, device, "content protocol listening on the overlay address");
    let conns = Arc::new(Conns::default());
    let tick_ctx = ctx.clone();
    Ok(tokio::spawn(async move {
        let mut tick = tokio::time::interval(LIMITS_TICK);
        loop {
            tokio::select! {
                _ = tick.tick() => tick_ctx.handle_timeout(),
                accepted = listener.accept() => match accepted {
                    Ok((stream, SocketAddr::V6(from))) => {
                        let node = node_of(from.ip());
                        let Some(guard) = conns.enter(node, max_connections, per_node) else {
                            Counters::inc(&ctx.counters.serve_connections_refused);
                            debug!(%from, "content: connection refused (too many)");
                            continue;
                        };
                        Counters::inc(&ctx.counters.serve_connections);
                        let ctx = ctx.clone();
                        tokio::spawn(async move {
                            super::serve::serve_connection(ctx, stream, node).await;
                            drop(guard);
                        });
                    }
                    Ok(_) => {}
                    Err(e) => {
                        warn!(error = %e, "content: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    }))
}

/// Open connections, in total and per node.
#[derive(Default)]
struct Conns(Mutex<(usize, HashMap<u64, usize>)>);

impl Conns {
    fn enter(self: &Arc<Self>, node: u64, max: usize, per_node: usize) -> Option<ConnGuard> {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mine = g.1.get(&node).copied().unwrap_or(0);
        if g.0 >= max || mine >= per_node {
            return None;
        }
        g.0 += 1;
        g.1.insert(node, mine + 1);
        Some(ConnGuard {
            conns: self.clone(),
            node,
        })
    }
}

struct ConnGuard {
    conns: Arc<Conns>,
    node: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut g = self.conns.0.lock().unwrap_or_else(|e| e.into_inner());
        g.0 = g.0.saturating_sub(1);
        if let Some(n) = g.1.get_mut(&self.node) {
            *n -= 1;
            if *n == 0 {
                g.1.remove(&self.node);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_capped_in_total_and_per_node() {
        let c = Arc::new(Conns::default());
        let a1 = c.enter(1, 3, 2).unwrap();
        let _a2 = c.enter(1, 3, 2).unwrap();
        assert!(c.enter(1, 3, 2).is_none(), "per node");
        let _b = c.enter(2, 3, 2).unwrap();
        assert!(c.enter(3, 3, 2).is_none(), "in total");
        drop(a1);
        assert!(c.enter(3, 3, 2).is_some());
        assert_eq!(
            node_of(&"fd6d:1:2:3:4:5:6:7".parse().unwrap()),
            0xfd6d_0001_0002_0003
        );
    }
}
