//! The kernel's own counts of UDP datagrams lost before they reach the agent, read from
//! `/proc/net` of the agent's network namespace.
//!
//! Myconet's counters only see what reaches the program or the socket. A datagram the
//! kernel discards on the way up (a bad checksum, a full receive buffer) is counted
//! nowhere else, and such losses look exactly like a peer that sends nothing: relayed
//! data with a checksum the relay could not complete, a socket the agent cannot drain
//! fast enough. `myconet-ctl stats` shows these next to the agent's counters.

use std::io;

/// One kernel counter: a stable snake_case name and its value.
pub type KernelCounter = (&'static str, u64);

/// The `/proc/net/snmp6` counters reported, with the names the API uses. They count
/// for every UDP socket of the namespace, not only the agent's.
const SNMP6: [(&str, &str); 4] = [
    // Every datagram dropped on receive, including the two below.
    ("Udp6InErrors", "udp6_in_errors"),
    // Dropped because the receiving socket's buffer was full.
    ("Udp6RcvbufErrors", "udp6_rcvbuf_errors"),
    // Dropped because the UDP checksum did not verify.
    ("Udp6InCsumErrors", "udp6_in_csum_errors"),
    // Sends refused because the socket's send buffer was full.
    ("Udp6SndbufErrors", "udp6_sndbuf_errors"),
];

/// Name of the counter of datagrams dropped at the agent's own sockets.
pub const SOCKET_DROPS: &str = "socket_drops";

/// The kernel-side losses that matter to a node on `port`: the namespace's UDP receive
/// errors by cause (`/proc/net/snmp6`) and the drops of the UDP sockets bound to `port`
/// (`/proc/net/udp6`: the agent's underlay and discovery sockets).
pub fn read(port: u16) -> io::Result<Vec<KernelCounter>> {
    let snmp6 = std::fs::read_to_string("/proc/net/snmp6")?;
    let udp6 = std::fs::read_to_string("/proc/net/udp6")?;
    let mut out = parse_snmp6(&snmp6);
    out.push((SOCKET_DROPS, socket_drops(&udp6, port)));
    Ok(out)
}

/// The reported counters from `/proc/net/snmp6` text (`Name<whitespace>value` lines); a
/// counter this kernel does not have reads as 0.
pub fn parse_snmp6(text: &str) -> Vec<KernelCounter> {
    SNMP6
        .iter()
        .map(|(kernel, name)| {
            let value = text
                .lines()
                .filter_map(|l| l.split_once(char::is_whitespace))
                .find(|(k, _)| k == kernel)
                .and_then(|(_, v)| v.trim().parse().ok())
                .unwrap_or(0);
            (*name, value)
        })
        .collect()
}

/// The summed `drops` column of the `/proc/net/udp6` rows whose local port is `port`.
pub fn socket_drops(text: &str, port: u16) -> u64 {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl, local_address, rem_address, st, …, drops (the last column).
            let local = cols.get(1)?;
            let (_, hex_port) = local.rsplit_once(':')?;
            let p = u16::from_str_radix(hex_port, 16).ok()?;
            (p == port).then(|| cols.last()?.parse::<u64>().ok())?
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snmp6_counters_are_picked_by_exact_name() {
        let text = "Udp6InDatagrams                 \t120\n\
                    Udp6NoPorts                     \t3\n\
                    Udp6InErrors                    \t9\n\
                    Udp6OutDatagrams                \t7\n\
                    Udp6RcvbufErrors                \t4\n\
                    Udp6SndbufErrors                \t0\n\
                    Udp6InCsumErrors                \t5\n\
                    UdpLite6InErrors                \t77\n";
        assert_eq!(
            parse_snmp6(text),
            [
                ("udp6_in_errors", 9),
                ("udp6_rcvbuf_errors", 4),
                ("udp6_in_csum_errors", 5),
                ("udp6_sndbuf_errors", 0),
            ]
        );
        // A kernel without a counter reports 0 for it, not an error.
        assert_eq!(parse_snmp6("")[2], ("udp6_in_csum_errors", 0));
    }

    #[test]
    fn socket_drops_sum_the_rows_on_our_port() {
        let text = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  12: 00000000000000000000000000000000:25B3 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4242 2 0000000000000000 17\n\
  13: 000080FE00000000FF0000000200005E:25B3 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4243 2 0000000000000000 3\n\
  14: 00000000000000000000000000000000:0035 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4244 2 0000000000000000 99\n\
  garbage\n";
        assert_eq!(socket_drops(text, 9651), 20);
        assert_eq!(socket_drops(text, 53), 99);
        assert_eq!(socket_drops(text, 1), 0);
    }

    #[test]
    fn this_namespace_can_be_read() {
        let counters = read(9651).unwrap();
        assert_eq!(counters.len(), SNMP6.len() + 1);
        assert_eq!(counters.last().unwrap().0, SOCKET_DROPS);
    }
}
