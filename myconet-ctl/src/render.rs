//! Human-readable output: pure functions from proto messages to text, so the layout is
//! tested without an agent. `--json` bypasses all of this.

use myconet_proto::v1 as pb;

/// Column alignment in [`table`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Align {
    Left,
    Right,
}

/// Lays out `rows` under `headers`, two spaces between columns, no trailing blanks.
pub(crate) fn table(headers: &[&str], align: &[Align], rows: &[Vec<String>]) -> String {
    let width = |i: usize| {
        rows.iter()
            .filter_map(|r| r.get(i))
            .map(|c| c.chars().count())
            .chain(std::iter::once(headers[i].chars().count()))
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..headers.len()).map(width).collect();
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, w) in widths.iter().enumerate() {
            let cell = row.get(i).map(String::as_str).unwrap_or("");
            if i > 0 {
                line.push_str("  ");
            }
            let pad = w.saturating_sub(cell.chars().count());
            match align.get(i).copied().unwrap_or(Align::Left) {
                Align::Left => {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad));
                }
                Align::Right => {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `3d 4h 5m 6s`, leading zero units left out.
pub fn uptime(seconds: u64) -> String {
    let units = [
        (seconds / 86_400, "d"),
        (seconds / 3_600 % 24, "h"),
        (seconds / 60 % 60, "m"),
        (seconds % 60, "s"),
    ];
    let first = units.iter().position(|(n, _)| *n != 0).unwrap_or(3);
    units[first..]
        .iter()
        .map(|(n, u)| format!("{n}{u}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `[addr]:port`, the way the underlay endpoint is written everywhere.
pub fn endpoint(address: &str, port: u32) -> String {
    format!("[{address}]:{port}")
}

/// `forward [fd00::2]:9651 dev 3 (static)`; the origin only when given and wanted.
pub fn route_entry(entry: Option<&pb::RouteEntry>, with_origin: bool) -> String {
    let Some(e) = entry else {
        return "-".to_string();
    };
    let mut s = e.action.clone();
    if let Some(nh) = &e.next_hop {
        s.push(' ');
        s.push_str(&endpoint(&nh.address, nh.port));
        if nh.ifindex != 0 {
            s.push_str(&format!(" dev {}", nh.ifindex));
        }
    }
    if with_origin && !e.origin.is_empty() {
        s.push_str(&format!(" ({})", e.origin));
    }
    s
}

/// `status`: one `key: value` line per fact.
pub fn status(s: &pb::Status) -> String {
    let interfaces: Vec<String> = if s.interfaces.is_empty() {
        vec!["none (userspace only, no XDP)".to_string()]
    } else {
        s.interfaces
            .iter()
            .map(|i| {
                if i.xdp_mode == "none" || i.xdp_mode.is_empty() {
                    format!(
                        "{} (ifindex {}, userspace: {})",
                        i.name, i.ifindex, i.userspace_reason
                    )
                } else {
                    format!("{} (ifindex {}, XDP {})", i.name, i.ifindex, i.xdp_mode)
                }
            })
            .collect()
    };
    let mut lines: Vec<(&str, String)> = vec![
        ("node address", s.node_address.clone()),
        ("node prefix", s.node_prefix.clone()),
        ("public key", s.public_key.clone()),
        ("port", s.port.to_string()),
    ];
    if !s.dataplane.is_empty() {
        let asked = if s.dataplane_requested.is_empty() {
            String::new()
        } else {
            format!(" (--dataplane {})", s.dataplane_requested)
        };
        lines.push(("data plane", format!("{}{asked}", s.dataplane)));
    }
    for (i, iface) in interfaces.into_iter().enumerate() {
        lines.push((if i == 0 { "interfaces" } else { "" }, iface));
    }
    lines.extend([
        ("uptime", uptime(s.uptime_seconds)),
        ("peers", s.peer_count.to_string()),
        ("routes", s.route_count.to_string()),
        ("version", s.version.clone()),
    ]);
    let key_width = lines.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    lines
        .iter()
        .map(|(k, v)| {
            let key = if k.is_empty() {
                String::new()
            } else {
                format!("{k}:")
            };
            format!("{key:<key_width$}  {v}\n")
        })
        .collect()
}

/// `peers`: ENDPOINT | IN KERNEL.
pub fn peers(r: &pb::ListPeersResponse) -> String {
    if r.peers.is_empty() {
        return "no peers\n".to_string();
    }
    let rows: Vec<Vec<String>> = r
        .peers
        .iter()
        .map(|p| {
            vec![
                scoped_endpoint(p),
                p.state.clone(),
                p.origin.clone(),
                if p.node_address.is_empty() {
                    "-".to_string()
                } else {
                    p.node_address.clone()
                },
                p.last_seen_ms
                    .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
                    .unwrap_or_else(|| "never".to_string()),
                p.rtt_us
                    .map(|us| format!("{:.2}ms", us as f64 / 1000.0))
                    .unwrap_or_else(|| "-".to_string()),
                p.loss
                    .map(|l| format!("{:.0}%", l * 100.0))
                    .unwrap_or_else(|| "-".to_string()),
                p.link_cost
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".to_string()),
                yes_no(p.in_kernel).to_string(),
            ]
        })
        .collect();
    table(
        &[
            "ENDPOINT",
            "STATE",
            "ORIGIN",
            "NODE",
            "LAST SEEN",
            "RTT",
            "LOSS",
            "COST",
            "RELAY PEER",
        ],
        &[
            Align::Left,
            Align::Left,
            Align::Left,
            Align::Left,
            Align::Right,
            Align::Right,
            Align::Right,
            Align::Right,
            Align::Left,
        ],
        &rows,
    )
}

/// `[addr%ifindex]:port` for link-local neighbours, `[addr]:port` otherwise.
fn scoped_endpoint(p: &pb::Peer) -> String {
    if p.interface == 0 {
        endpoint(&p.address, p.port)
    } else {
        format!("[{}%{}]:{}", p.address, p.interface, p.port)
    }
}

/// `routes`: what the agent and the kernel map hold per prefix, and whether they agree.
pub fn routes(r: &pb::ListRoutesResponse) -> String {
    if r.routes.is_empty() {
        return "no routes\n".to_string();
    }
    let rows: Vec<Vec<String>> = r
        .routes
        .iter()
        .map(|row| {
            let r = row.routing.as_ref();
            let dash = || "-".to_string();
            vec![
                row.prefix.clone(),
                route_entry(row.agent.as_ref(), true),
                route_entry(row.kernel.as_ref(), false),
                if row.in_sync { "yes" } else { "NO" }.to_string(),
                r.map(|r| r.metric.to_string()).unwrap_or_else(dash),
                r.map(|r| r.seqno.to_string()).unwrap_or_else(dash),
                r.and_then(fd).unwrap_or_else(dash),
                r.map(|r| format!("{:.1}s", r.age_ms as f64 / 1000.0))
                    .unwrap_or_else(dash),
                if row.candidates == 0 {
                    dash()
                } else {
                    row.candidates.to_string()
                },
            ]
        })
        .collect();
    table(
        &[
            "PREFIX",
            "AGENT",
            "KERNEL MAP",
            "SYNC",
            "METRIC",
            "SEQNO",
            "FD",
            "AGE",
            "ROUTES",
        ],
        &[
            Align::Left,
            Align::Left,
            Align::Left,
            Align::Left,
            Align::Right,
            Align::Right,
            Align::Right,
            Align::Right,
            Align::Right,
        ],
        &rows,
    )
}

/// A feasibility distance as `seqno/metric`.
fn fd(r: &pb::RoutingInfo) -> Option<String> {
    Some(format!("{}/{}", r.fd_seqno?, r.fd_metric?))
}

fn routing_line(r: &pb::RoutingInfo) -> String {
    let via = r
        .next_hop
        .as_ref()
        .map(|n| endpoint(&n.address, n.port))
        .unwrap_or_else(|| "this node".to_string());
    format!(
        "via {via} metric {} (advertised {} + link {}) seqno {} fd {} feasible {} age {:.1}s",
        r.metric,
        r.advertised_metric,
        r.link_cost,
        r.seqno,
        fd(r).unwrap_or_else(|| "-".to_string()),
        yes_no(r.feasible),
        r.age_ms as f64 / 1000.0
    )
}

/// The `decision` line: who decides, and where a static route overrides the routing
/// protocol, what the protocol itself decided.
fn decision(e: &pb::RouteExplanation) -> String {
    let protocol = e.selection.replace('_', " ");
    match e.decided_by.as_str() {
        "static" if e.overridden => {
            format!("static route, overriding the routing protocol ({protocol})")
        }
        "static" if e.selected.is_some() => {
            format!("static route (the routing protocol agrees: {protocol})")
        }
        "static" => "static route (the routing protocol has no route)".to_string(),
        "none" if e.selection != "not_overlay" => format!("nothing installed ({protocol})"),
        _ => protocol,
    }
}

/// `route get ADDR`: the route carrying the address, why, and what else was considered.
pub fn route_explanation(e: &pb::RouteExplanation) -> String {
    let mut out = format!("{}\n", e.address);
    if !e.prefix.is_empty() {
        out.push_str(&format!("  prefix    {}\n", e.prefix));
    }
    out.push_str(&format!("  decision  {}\n", decision(e)));
    if !e.explanation.is_empty() {
        out.push_str(&format!("  why       {}\n", e.explanation));
    }
    if let Some(s) = &e.selected {
        let label = if e.overridden { "protocol" } else { "selected" };
        out.push_str(&format!("  {label:<9} {}\n", routing_line(s)));
    }
    for alt in &e.alternatives {
        if let Some(r) = &alt.route {
            out.push_str(&format!(
                "  rejected  {} ({})\n",
                routing_line(r),
                alt.reason.replace('_', " ")
            ));
        }
    }
    match &e.installed {
        Some(row) => out.push_str(&format!(
            "  installed {} agent: {}; kernel map: {}; in sync: {}\n",
            row.prefix,
            route_entry(row.agent.as_ref(), true),
            route_entry(row.kernel.as_ref(), false),
            yes_no(row.in_sync)
        )),
        None => out.push_str("  installed nothing covers it\n"),
    }
    out
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn counter_table(counters: &[pb::Counter], all: bool) -> String {
    let rows: Vec<Vec<String>> = counters
        .iter()
        .filter(|c| all || c.packets != 0 || c.bytes != 0)
        .map(|c| vec![c.name.clone(), c.packets.to_string(), c.bytes.to_string()])
        .collect();
    if rows.is_empty() {
        return "  all counters are zero (--all lists them)\n".to_string();
    }
    table(
        &["NAME", "PACKETS", "BYTES"],
        &[Align::Left, Align::Right, Align::Right],
        &rows,
    )
}

/// Packets relayed in the kernel, passed up and dropped, from the verdict names.
fn xdp_summary(counters: &[pb::Counter]) -> (u64, u64, u64) {
    let sum = |pred: &dyn Fn(&str) -> bool| {
        counters
            .iter()
            .filter(|c| pred(&c.name))
            .fold(0u64, |acc, c| acc.saturating_add(c.packets))
    };
    (
        sum(&|n| n == "tx" || n == "redirect"),
        sum(&|n| n.starts_with("pass_")),
        sum(&|n| n.starts_with("drop_")),
    )
}

/// `stats`: XDP verdicts with a forwarded/passed/dropped summary, then agent counters.
/// Zero counters are hidden unless `all`.
pub fn stats(s: &pb::Stats, all: bool) -> String {
    let mut out = String::from("XDP (kernel fast path)\n");
    if s.xdp.is_empty() {
        out.push_str("  no XDP program attached (userspace only)\n");
    } else {
        out.push_str(&counter_table(&s.xdp, all));
        let (forwarded, passed, dropped) = xdp_summary(&s.xdp);
        out.push_str(&format!(
            "forwarded {forwarded} (tx + redirect), passed {passed}, dropped {dropped} packets\n"
        ));
    }
    if !s.interfaces.is_empty() {
        out.push_str("\nInterfaces (kernel counters; tx_dropped includes relayed frames the egress could not take)\n");
        let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
        let rows: Vec<Vec<String>> = s
            .interfaces
            .iter()
            .map(|i| {
                vec![
                    i.name.clone(),
                    i.xdp_mode.clone(),
                    yes_no(i.redirect_target),
                    yes_no(i.xdp_tx),
                    i.rx_packets.to_string(),
                    i.rx_dropped.to_string(),
                    i.tx_packets.to_string(),
                    i.tx_dropped.to_string(),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "INTERFACE",
                "MODE",
                "REDIRECT IN",
                "XDP_TX",
                "RX",
                "RX DROPPED",
                "TX",
                "TX DROPPED",
            ],
            &[
                Align::Left,
                Align::Left,
                Align::Left,
                Align::Left,
                Align::Right,
                Align::Right,
                Align::Right,
                Align::Right,
            ],
            &rows,
        ));
    }
    out.push_str("\nAgent (userspace)\n");
    out.push_str(&counter_table(&s.agent, all));
    if !s.kernel.is_empty() {
        // Always listed, zeros included: "nothing lost in the kernel" is an answer.
        out.push_str(
            "\nKernel (datagrams lost before the agent; UDP counters of this network namespace)\n",
        );
        let rows: Vec<Vec<String>> = s
            .kernel
            .iter()
            .map(|c| vec![c.name.clone(), c.packets.to_string()])
            .collect();
        out.push_str(&table(
            &["NAME", "COUNT"],
            &[Align::Left, Align::Right],
            &rows,
        ));
    }
    for (title, counts) in [
        ("Neighbours", &s.neighbours),
        ("Routing protocol", &s.routing),
    ] {
        if !counts.is_empty() {
            out.push_str(&format!("\n{title}\n"));
            out.push_str(&count_table(counts, all));
        }
    }
    out
}

/// Counters that count events rather than packets: name and count, zeros hidden
/// unless `all`.
fn count_table(counts: &[pb::Counter], all: bool) -> String {
    let rows: Vec<Vec<String>> = counts
        .iter()
        .filter(|c| all || c.packets != 0)
        .map(|c| vec![c.name.clone(), c.packets.to_string()])
        .collect();
    if rows.is_empty() {
        return "  all counters are zero (--all lists them)\n".to_string();
    }
    table(&["NAME", "COUNT"], &[Align::Left, Align::Right], &rows)
}

/// One line confirming `peers add`.
pub fn peer_added(p: &pb::Peer) -> String {
    format!(
        "added peer {} ({}; it may relay through this node once its link handshake authenticates it)\n",
        scoped_endpoint(p),
        p.state
    )
}

/// One line for `peers remove`.
pub fn peer_removed(address: &str, port: u32, removed: bool) -> String {
    if removed {
        format!("removed peer {}\n", endpoint(address, port))
    } else {
        format!(
            "{} was not a peer; nothing removed\n",
            endpoint(address, port)
        )
    }
}

/// One line confirming `route add`.
pub fn route_added(r: &pb::Route) -> String {
    format!(
        "route {}: {}\n",
        r.prefix,
        route_entry(r.entry.as_ref(), true)
    )
}

/// One line for `route del`.
pub fn route_removed(prefix: &str, removed: bool) -> String {
    if removed {
        format!("removed route {prefix}\n")
    } else {
        format!("no route for {prefix}; nothing removed\n")
    }
}

/// `pins`: one line per pinned /64.
pub fn pins(r: &pb::ListPinsResponse) -> String {
    if r.pins.is_empty() {
        return "no pinned keys\n".to_string();
    }
    let mut out = format!("{:<26} {:<9} KEY\n", "PREFIX", "SOURCE");
    for p in &r.pins {
        out.push_str(&format!("{:<26} {:<9} {}\n", p.prefix, p.source, p.key));
    }
    out
}

/// One line for `pins set`.
pub fn pin_set(p: &pb::KeyPin) -> String {
    format!("pinned {} to key {} ({})\n", p.prefix, p.key, p.source)
}

/// One line for `pins forget`.
pub fn pin_forgotten(prefix: &str, forgotten: bool) -> String {
    if forgotten {
        format!("forgot the pin of {prefix}: the next key heard owning it is taken\n")
    } else {
        format!("no pin for {prefix}; nothing forgotten (its routes were dropped)\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_table() {
        let r = pb::ListPinsResponse {
            pins: vec![pb::KeyPin {
                prefix: "fd6d:1:2:3::/64".into(),
                key: "ab".repeat(32),
                source: "learned".into(),
            }],
        };
        let t = pins(&r);
        assert!(t.starts_with("PREFIX"), "{t}");
        assert!(t.contains("fd6d:1:2:3::/64            learned"), "{t}");
        assert_eq!(pins(&pb::ListPinsResponse::default()), "no pinned keys\n");
    }

    fn counter(name: &str, packets: u64, bytes: u64) -> pb::Counter {
        pb::Counter {
            name: name.into(),
            packets,
            bytes,
        }
    }

    fn forward(addr: &str, port: u32, ifindex: u32, origin: &str) -> pb::RouteEntry {
        pb::RouteEntry {
            action: "forward".into(),
            next_hop: Some(pb::NextHop {
                address: addr.into(),
                port,
                ifindex,
            }),
            origin: origin.into(),
        }
    }

    #[test]
    fn uptime_is_compact() {
        assert_eq!(uptime(0), "0s");
        assert_eq!(uptime(59), "59s");
        assert_eq!(uptime(65), "1m 5s");
        assert_eq!(uptime(3_600), "1h 0m 0s");
        assert_eq!(uptime(2 * 86_400 + 3 * 3_600 + 4 * 60 + 5), "2d 3h 4m 5s");
    }

    #[test]
    fn status_lines_are_aligned() {
        let s = pb::Status {
            version: "0.1.0".into(),
            public_key: "ab".repeat(32),
            node_prefix: "fd6d:1:2:3::/64".into(),
            node_address: "fd6d:1:2:3::1".into(),
            port: 9651,
            interfaces: vec![
                pb::Interface {
                    name: "eth0".into(),
                    ifindex: 2,
                    xdp_mode: "driver".into(),
                    ..Default::default()
                },
                pb::Interface {
                    name: "eth1".into(),
                    ifindex: 3,
                    xdp_mode: "generic".into(),
                    ..Default::default()
                },
                pb::Interface {
                    name: "eth2".into(),
                    ifindex: 4,
                    xdp_mode: "none".into(),
                    userspace_reason: "attaching XDP to eth2 failed: busy".into(),
                },
            ],
            uptime_seconds: 3_725,
            peer_count: 2,
            route_count: 3,
            dataplane: "mixed".into(),
            dataplane_requested: "auto".into(),
        };
        let text = status(&s);
        let expected = format!(
            "node address:  fd6d:1:2:3::1\n\
             node prefix:   fd6d:1:2:3::/64\n\
             public key:    {}\n\
             port:          9651\n\
             data plane:    mixed (--dataplane auto)\n\
             interfaces:    eth0 (ifindex 2, XDP driver)\n               \
             eth1 (ifindex 3, XDP generic)\n               \
             eth2 (ifindex 4, userspace: attaching XDP to eth2 failed: busy)\n\
             uptime:        1h 2m 5s\n\
             peers:         2\n\
             routes:        3\n\
             version:       0.1.0\n",
            "ab".repeat(32)
        );
        assert_eq!(text, expected);

        let bare = status(&pb::Status {
            interfaces: Vec::new(),
            ..s
        });
        assert!(bare.contains("interfaces:    none (userspace only, no XDP)\n"));
    }

    #[test]
    fn routes_table_shows_both_sides() {
        let r = pb::ListRoutesResponse {
            routes: vec![
                pb::RouteRow {
                    prefix: "fd6d:1:2:3::/64".into(),
                    agent: Some(pb::RouteEntry {
                        action: "local".into(),
                        next_hop: None,
                        origin: "local".into(),
                    }),
                    kernel: Some(pb::RouteEntry {
                        action: "local".into(),
                        next_hop: None,
                        origin: String::new(),
                    }),
                    in_sync: true,
                    ..Default::default()
                },
                pb::RouteRow {
                    prefix: "fd6d:9::/32".into(),
                    agent: Some(forward("fd00::2", 9000, 3, "static")),
                    kernel: None,
                    in_sync: false,
                    ..Default::default()
                },
                pb::RouteRow {
                    prefix: "fd6d:a::/48".into(),
                    agent: None,
                    kernel: Some(forward("fd00::3", 9651, 0, "")),
                    in_sync: false,
                    ..Default::default()
                },
                pb::RouteRow {
                    prefix: "fd6d:b::/64".into(),
                    agent: Some(forward("fd00::4", 9651, 0, "routing")),
                    kernel: Some(forward("fd00::4", 9651, 0, "")),
                    in_sync: true,
                    routing: Some(pb::RoutingInfo {
                        metric: 192,
                        seqno: 7,
                        fd_seqno: Some(7),
                        fd_metric: Some(192),
                        age_ms: 2500,
                        selected: true,
                        feasible: true,
                        ..Default::default()
                    }),
                    candidates: 2,
                },
            ],
        };
        assert_eq!(
            routes(&r),
            "PREFIX           AGENT                                  KERNEL MAP              SYNC  METRIC  SEQNO     FD   AGE  ROUTES\n\
             fd6d:1:2:3::/64  local (local)                          local                   yes        -      -      -     -       -\n\
             fd6d:9::/32      forward [fd00::2]:9000 dev 3 (static)  -                       NO         -      -      -     -       -\n\
             fd6d:a::/48      -                                      forward [fd00::3]:9651  NO         -      -      -     -       -\n\
             fd6d:b::/64      forward [fd00::4]:9651 (routing)       forward [fd00::4]:9651  yes      192      7  7/192  2.5s       2\n"
        );
        assert_eq!(
            routes(&pb::ListRoutesResponse { routes: vec![] }),
            "no routes\n"
        );
    }

    #[test]
    fn peers_table() {
        let r = pb::ListPeersResponse {
            peers: vec![
                pb::Peer {
                    address: "fd00::2".into(),
                    port: 9651,
                    in_kernel: true,
                    state: "up".into(),
                    origin: "static".into(),
                    node_address: "fd6d:1:2:3::1".into(),
                    last_seen_ms: Some(1500),
                    rtt_us: Some(250),
                    loss: Some(0.0),
                    link_cost: Some(400),
                    ..Default::default()
                },
                pb::Peer {
                    address: "fe80::3".into(),
                    port: 7,
                    interface: 4,
                    state: "connecting".into(),
                    origin: "discovered".into(),
                    ..Default::default()
                },
            ],
        };
        assert_eq!(
            peers(&r),
            "ENDPOINT        STATE       ORIGIN      NODE           LAST SEEN     RTT  LOSS  COST  RELAY PEER\n\
             [fd00::2]:9651  up          static      fd6d:1:2:3::1       1.5s  0.25ms    0%   400  yes\n\
             [fe80::3%4]:7   connecting  discovered  -                  never       -     -     -  no\n"
        );
        assert_eq!(
            peers(&pb::ListPeersResponse { peers: vec![] }),
            "no peers\n"
        );
    }

    #[test]
    fn route_get_prints_the_sentence_and_a_static_override() {
        let selected = pb::RoutingInfo {
            next_hop: Some(pb::NextHop {
                address: "fd00::2".into(),
                port: 9651,
                ifindex: 0,
            }),
            metric: 192,
            advertised_metric: 96,
            link_cost: 96,
            seqno: 3,
            feasible: true,
            fd_seqno: Some(3),
            fd_metric: Some(192),
            selected: true,
            ..Default::default()
        };
        let routed = pb::RouteExplanation {
            address: "fd6d:1:2:3::1".into(),
            prefix: "fd6d:1:2:3::/64".into(),
            selection: "only_feasible".into(),
            explanation: "the routing protocol carries it".into(),
            selected: Some(selected.clone()),
            installed: Some(pb::RouteRow {
                prefix: "fd6d:1:2:3::/64".into(),
                agent: Some(forward("fd00::2", 9651, 0, "routing")),
                kernel: Some(forward("fd00::2", 9651, 0, "")),
                in_sync: true,
                ..Default::default()
            }),
            decided_by: "routing".into(),
            overridden: false,
            ..Default::default()
        };
        assert_eq!(
            route_explanation(&routed),
            "fd6d:1:2:3::1\n  \
             prefix    fd6d:1:2:3::/64\n  \
             decision  only feasible\n  \
             why       the routing protocol carries it\n  \
             selected  via [fd00::2]:9651 metric 192 (advertised 96 + link 96) seqno 3 fd 3/192 feasible yes age 0.0s\n  \
             installed fd6d:1:2:3::/64 agent: forward [fd00::2]:9651 (routing); kernel map: forward [fd00::2]:9651; in sync: yes\n"
        );
        let overridden = pb::RouteExplanation {
            explanation: "a static route via [fd00::9]:9651 overrides it".into(),
            installed: Some(pb::RouteRow {
                prefix: "fd6d:1:2:3::/64".into(),
                agent: Some(forward("fd00::9", 9651, 0, "static")),
                kernel: Some(forward("fd00::9", 9651, 0, "")),
                in_sync: true,
                ..Default::default()
            }),
            decided_by: "static".into(),
            overridden: true,
            ..routed.clone()
        };
        let text = route_explanation(&overridden);
        assert!(
            text.contains(
                "  decision  static route, overriding the routing protocol (only feasible)\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("  why       a static route via [fd00::9]:9651 overrides it\n"),
            "{text}"
        );
        assert!(
            text.contains("  protocol  via [fd00::2]:9651 metric 192"),
            "{text}"
        );
        let agreeing = route_explanation(&pb::RouteExplanation {
            overridden: false,
            ..overridden.clone()
        });
        assert!(
            agreeing.contains(
                "  decision  static route (the routing protocol agrees: only feasible)\n"
            ),
            "{agreeing}"
        );
        let alone = route_explanation(&pb::RouteExplanation {
            selection: "no_route".into(),
            selected: None,
            overridden: false,
            ..overridden
        });
        assert!(
            alone.contains("  decision  static route (the routing protocol has no route)\n"),
            "{alone}"
        );
        let nothing = route_explanation(&pb::RouteExplanation {
            selection: "no_route".into(),
            selected: None,
            installed: None,
            decided_by: "none".into(),
            ..routed
        });
        assert!(
            nothing.contains("  decision  nothing installed (no route)\n")
                && nothing.contains("  installed nothing covers it\n"),
            "{nothing}"
        );
    }

    #[test]
    fn stats_hide_zeros_and_summarise() {
        let s = pb::Stats {
            xdp: vec![
                counter("pass_not_myconet", 100, 10_000),
                counter("pass_local", 5, 500),
                counter("tx", 7, 700),
                counter("redirect", 1_000, 1_500_000),
                counter("drop_malformed", 0, 0),
                counter("drop_no_route", 3, 300),
            ],
            agent: vec![counter("rx_data", 0, 0), counter("rx_control", 2, 180)],
            routing: vec![],
            interfaces: vec![],
            neighbours: vec![],
            kernel: vec![],
        };
        let text = stats(&s, false);
        assert_eq!(
            text,
            "XDP (kernel fast path)\n\
             NAME              PACKETS    BYTES\n\
             pass_not_myconet      100    10000\n\
             pass_local              5      500\n\
             tx                      7      700\n\
             redirect             1000  1500000\n\
             drop_no_route           3      300\n\
             forwarded 1007 (tx + redirect), passed 105, dropped 3 packets\n\
             \n\
             Agent (userspace)\n\
             NAME        PACKETS  BYTES\n\
             rx_control        2    180\n"
        );
        let all = stats(&s, true);
        assert!(all.contains("drop_malformed"));
        assert!(all.contains("rx_data"));

        let idle = stats(
            &pb::Stats {
                xdp: vec![],
                agent: vec![counter("rx_data", 0, 0)],
                routing: vec![counter("rejected_unowned_prefix", 1, 0)],
                interfaces: vec![],
                neighbours: vec![counter("peer_up", 2, 0), counter("peer_down", 0, 0)],
                kernel: vec![],
            },
            false,
        );
        assert_eq!(
            idle,
            "XDP (kernel fast path)\n  no XDP program attached (userspace only)\n\n\
             Agent (userspace)\n  all counters are zero (--all lists them)\n\n\
             Neighbours\n\
             NAME     COUNT\n\
             peer_up      2\n\n\
             Routing protocol\n\
             NAME                     COUNT\n\
             rejected_unowned_prefix      1\n"
        );
    }

    #[test]
    fn stats_show_interfaces_and_kernel_drops() {
        let s = pb::Stats {
            xdp: vec![counter("redirect", 10, 1000)],
            agent: vec![],
            routing: vec![],
            interfaces: vec![pb::InterfaceCounters {
                name: "to-c".into(),
                ifindex: 3,
                xdp_mode: "driver".into(),
                redirect_target: false,
                xdp_tx: false,
                rx_packets: 5,
                rx_dropped: 0,
                tx_packets: 7,
                tx_dropped: 42,
            }],
            neighbours: vec![],
            kernel: vec![
                counter("udp6_in_errors", 5, 0),
                counter("udp6_in_csum_errors", 5, 0),
                counter("socket_drops", 0, 0),
            ],
        };
        let text = stats(&s, false);
        assert!(text.contains("TX DROPPED"), "{text}");
        // Kernel losses are listed with their zeros, after the agent's counters.
        let kernel = text.split("\nKernel (").nth(1).expect("a kernel section");
        let rows: Vec<Vec<&str>> = kernel
            .lines()
            .skip(2)
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows,
            [
                ["udp6_in_errors", "5"],
                ["udp6_in_csum_errors", "5"],
                ["socket_drops", "0"]
            ]
        );
        let row = text
            .lines()
            .find(|l| l.starts_with("to-c"))
            .expect("a row for to-c");
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells, ["to-c", "driver", "no", "no", "5", "0", "7", "42"]);
    }

    #[test]
    fn confirmations() {
        let r = pb::Route {
            prefix: "fd6d:1::/64".into(),
            entry: Some(forward("fd00::2", 9000, 0, "static")),
        };
        assert_eq!(
            route_added(&r),
            "route fd6d:1::/64: forward [fd00::2]:9000 (static)\n"
        );
        assert_eq!(
            route_removed("fd6d:1::/64", false),
            "no route for fd6d:1::/64; nothing removed\n"
        );
        assert_eq!(
            peer_removed("fd00::2", 9651, true),
            "removed peer [fd00::2]:9651\n"
        );
    }
}
