//! The flood benchmark's attacker: sends HandshakeInits to one node as fast as it can,
//! built with the session core's own message builders, and prints what it did as one
//! JSON line. `cargo xtask bench flood` runs it in a namespace of its own.
//!
//! ```text
//! flood --dst OVERLAY_ADDR --to [UNDERLAY]:PORT --from ADDR[,ADDR…] --mode fresh|replay
//!       --seconds S
//! ```
//!
//! - `fresh`: every init is from a new identity (a new Ed25519 key and signature each,
//!   which is what limits the rate), and every cookie reply that comes back is echoed
//!   at once with the init re-signed: the strongest attack a host that can receive at
//!   its source addresses can make on the responder's signature checks.
//! - `replay`: a few inits are made once and sent again and again, byte for byte, as
//!   fast as the socket takes them: the cheapest attack per packet.
//!
//! Several `--from` addresses (in different /64s) spread the flood over that many
//! sources, so per-source limits see many senders.

use std::{
    collections::{HashMap, VecDeque},
    net::{Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail};
use myconet_core::session::forge::{ForgedInit, INIT_LEN};
use ring::{rand::SystemRandom, signature::Ed25519KeyPair};

/// Fresh-key inits remembered for echoing their cookie replies.
const REMEMBERED: usize = 4096;
/// Distinct inits a replay flood cycles through.
const REPLAYED: usize = 64;

struct Args {
    dst: Ipv6Addr,
    to: SocketAddr,
    from: Vec<Ipv6Addr>,
    fresh: bool,
    seconds: f64,
}

fn parse_args() -> Result<Args> {
    let mut dst = None;
    let mut to = None;
    let mut from = Vec::new();
    let mut fresh = None;
    let mut seconds = 10.0;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--dst" => dst = Some(value.parse().context("--dst")?),
            "--to" => to = Some(value.parse().context("--to")?),
            "--from" => {
                for a in value.split(',') {
                    from.push(a.parse().with_context(|| format!("--from {a}"))?);
                }
            }
            "--mode" => {
                fresh = Some(match value.as_str() {
                    "fresh" => true,
                    "replay" => false,
                    other => bail!("--mode {other}: fresh or replay"),
                })
            }
            "--seconds" => seconds = value.parse().context("--seconds")?,
            other => bail!("unknown flag {other}"),
        }
    }
    if from.is_empty() {
        bail!("--from is required");
    }
    Ok(Args {
        dst: dst.context("--dst is required")?,
        to: to.context("--to is required")?,
        from,
        fresh: fresh.context("--mode is required")?,
        seconds,
    })
}

fn key(n: u64) -> Result<Ed25519KeyPair> {
    let mut seed = [0x7eu8; 32];
    seed[..8].copy_from_slice(&n.to_be_bytes());
    seed[8..16].copy_from_slice(&std::process::id().to_be_bytes().repeat(2));
    Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| anyhow::anyhow!("bad seed"))
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[derive(Default)]
struct Counts {
    sent: u64,
    would_block: u64,
    generated: u64,
    cookie_replies: u64,
    echoed: u64,
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let rng = SystemRandom::new();
    let sockets: Vec<UdpSocket> = args
        .from
        .iter()
        .map(|a| {
            let s = UdpSocket::bind(SocketAddr::V6(SocketAddrV6::new(*a, 0, 0, 0)))
                .with_context(|| format!("binding [{a}]:0"))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect::<Result<_>>()?;
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let started = Instant::now();
    let mut counts = Counts::default();
    let send = |socket: &UdpSocket, datagram: &[u8], counts: &mut Counts| match socket
        .send_to(datagram, args.to)
    {
        Ok(_) => counts.sent += 1,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => counts.would_block += 1,
        Err(_) => {}
    };
    if args.fresh {
        let mut live: HashMap<u32, (Ed25519KeyPair, ForgedInit, usize)> = HashMap::new();
        let mut order: VecDeque<u32> = VecDeque::new();
        let mut buf = [0u8; 2048];
        let mut n: u64 = 0;
        while Instant::now() < deadline {
            n += 1;
            let which = (n as usize) % sockets.len();
            let signer = key(n)?;
            let init = ForgedInit::new(&signer, args.dst, n as u32, now_ns(), &rng)
                .map_err(|e| anyhow::anyhow!("forging an init: {e}"))?;
            counts.generated += 1;
            send(&sockets[which], init.message(), &mut counts);
            let index = init.index();
            live.insert(index, (signer, init, which));
            order.push_back(index);
            while order.len() > REMEMBERED {
                if let Some(old) = order.pop_front() {
                    live.remove(&old);
                }
            }
            // Echo every cookie that came back, at once.
            for socket in &sockets {
                while let Ok((len, _)) = socket.recv_from(&mut buf) {
                    let reply = &buf[..len];
                    if reply.get(1) != Some(&4) || len < 8 {
                        continue;
                    }
                    counts.cookie_replies += 1;
                    let index = u32::from_be_bytes([reply[4], reply[5], reply[6], reply[7]]);
                    if let Some((signer, init, which)) = live.get_mut(&index)
                        && init.accept_cookie_reply(reply, signer)
                    {
                        counts.echoed += 1;
                        let which = *which;
                        let datagram = init.message().to_vec();
                        send(&sockets[which], &datagram, &mut counts);
                    }
                }
            }
        }
    } else {
        let inits: Vec<ForgedInit> = (0..REPLAYED as u64)
            .map(|n| {
                let signer = key(n + 1)?;
                ForgedInit::new(&signer, args.dst, n as u32 + 1, now_ns(), &rng)
                    .map_err(|e| anyhow::anyhow!("forging an init: {e}"))
            })
            .collect::<Result<_>>()?;
        counts.generated = inits.len() as u64;
        let mut i = 0usize;
        while Instant::now() < deadline {
            for _ in 0..256 {
                i = i.wrapping_add(1);
                let init = &inits[i % inits.len()];
                send(&sockets[i % sockets.len()], init.message(), &mut counts);
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "mode": if args.fresh { "fresh" } else { "replay" },
            "sources": args.from.len(),
            "seconds": seconds,
            "sent": counts.sent,
            "sent_per_second": counts.sent as f64 / seconds,
            "would_block": counts.would_block,
            "inits_generated": counts.generated,
            "cookie_replies": counts.cookie_replies,
            "cookies_echoed": counts.echoed,
            "init_bytes": INIT_LEN,
        })
    );
    Ok(())
}
