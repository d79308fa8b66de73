//! Generates node identities with the identity proof of work, as the agent does on
//! first start (`identity::generate_pkcs8`), and reports how long each took: the
//! figures in docs/protocol.md, and the testbed's pre-generated identities
//! (`tests/src/identities.rs`: one PKCS#8 document in hex per line on stdout).
//!
//! `cargo run --release --example identity_pool -p myconet-agent -- [COUNT]`

use std::time::Instant;

use myconet_agent::identity::generate_pkcs8;
use myconet_common::addr::IDENTITY_WORK_BITS;

fn main() -> anyhow::Result<()> {
    let n: usize = match std::env::args().nth(1) {
        Some(a) => a.parse()?,
        None => 32,
    };
    let mut tries = 0u64;
    let mut times = Vec::with_capacity(n);
    let all = Instant::now();
    for _ in 0..n.max(1) {
        let t = Instant::now();
        let (doc, k) = generate_pkcs8(IDENTITY_WORK_BITS)?;
        times.push(t.elapsed().as_secs_f64());
        tries += k;
        println!(
            "    \"{}\",",
            doc.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
    }
    times.sort_by(f64::total_cmp);
    let n = times.len();
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    eprintln!(
        "{n} identities ({IDENTITY_WORK_BITS} bits) on {threads} threads: mean {:.2} s, median {:.2} s, 90th percentile {:.2} s, max {:.2} s; {:.0} tries per identity, {:.1} µs per try per thread",
        times.iter().sum::<f64>() / n as f64,
        times[n / 2],
        times[(n * 9 / 10).min(n - 1)],
        times[n - 1],
        tries as f64 / n as f64,
        all.elapsed().as_secs_f64() * 1e6 * threads as f64 / tries as f64,
    );
    Ok(())
}
