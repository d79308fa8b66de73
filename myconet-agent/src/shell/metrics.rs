//! Prometheus metrics over plain HTTP (`GET /metrics`, text exposition format 0.0.4).
//!
//! Off unless `metrics.listen` (or `--metrics-listen`) names an address; a non-loopback
//! address needs an explicit allowance (config.rs), because the endpoint has no
//! authentication and names this node's neighbours.
//!
//! A scrape asks the control service for exactly what `myconet-ctl status`, `peers` and
//! `stats` show, so the two can never disagree, and renders it with conventional names:
//! `myconet_<section>_<unit>_total` counters with the counter's API name as a label,
//! gauges for per-peer measurements, `_info` series for labels that describe things.

use std::{convert::Infallible, fmt::Write as _, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use myconet_proto::v1::{self as pb, control_server::Control};
use tokio::{net::TcpListener, sync::Semaphore};
use tracing::{debug, info, warn};

use crate::shell::api::ControlService;

/// Connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 8;
/// A client must send its request headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection is kept, whatever it does.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// The exposition format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Binds the metrics address (during start-up, before capabilities are dropped).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))
}

/// Serves `GET /metrics` on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, service: ControlService) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics served at http://{addr}/metrics");
    }
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = service.clone();
        tokio::spawn(async move {
            let handler = service_fn(move |req| {
                let service = service.clone();
                async move { Ok::<_, Infallible>(respond(&service, &req).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), handler);
            // A connection kept past the timeout is simply closed.
            if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                debug!(error = %e, "metrics connection");
            }
            drop(permit);
        });
    }
}

fn plain(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
}

async fn respond(service: &ControlService, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    match req.uri().path() {
        "/metrics" => match scrape(service).await {
            Ok(text) => {
                let mut r = plain(StatusCode::OK, "");
                *r.body_mut() = Full::new(Bytes::from(text));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(CONTENT_TYPE),
                );
                r
            }
            Err(status) => plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("{}\n", status.message()),
            ),
        },
        "/" => plain(StatusCode::OK, "Myconet agent: metrics at /metrics\n"),
        _ => plain(StatusCode::NOT_FOUND, "not found; metrics at /metrics\n"),
    }
}

/// Asks the control service what `status`, `peers` and `stats` show and renders it.
pub async fn scrape(service: &ControlService) -> Result<String, tonic::Status> {
    let status = service
        .get_status(tonic::Request::new(pb::GetStatusRequest {}))
        .await?
        .into_inner();
    let peers = service
        .list_peers(tonic::Request::new(pb::ListPeersRequest {}))
        .await?
        .into_inner();
    let stats = service
        .get_stats(tonic::Request::new(pb::GetStatsRequest {}))
        .await?
        .into_inner();
    Ok(render(&status, &peers.peers, &stats))
}

/// One list of named counters in `Stats`, and how it is exported.
pub struct Section {
    /// The `Stats` field (the section `myconet-ctl stats` shows).
    pub field: &'static str,
    /// The list itself.
    pub get: fn(&pb::Stats) -> &[pb::Counter],
    /// Metric name stem: `myconet_<stem>_packets_total` and so on.
    pub stem: &'static str,
    /// The label carrying the counter's API name.
    pub label: &'static str,
    /// What the packet (or event) count counts.
    pub help: &'static str,
    /// Unit of the `packets` field.
    pub unit: Unit,
    /// Whether the `bytes` field means something.
    pub bytes: bool,
}

/// What a counter's `packets` field counts.
#[derive(Clone, Copy)]
pub enum Unit {
    /// Packets.
    Packets,
    /// Protocol events; counters whose name says `bytes` count bytes.
    Events,
}

/// Every counter list of `Stats`. A test checks no field of `Stats` is missing here.
pub const SECTIONS: &[Section] = &[
    Section {
        field: "xdp",
        get: |s| &s.xdp,
        stem: "xdp",
        label: "verdict",
        help: "Packets the XDP program gave each verdict (summed over CPUs); see docs/operations.md, Reading the counters.",
        unit: Unit::Packets,
        bytes: true,
    },
    Section {
        field: "agent",
        get: |s| &s.agent,
        stem: "agent",
        label: "counter",
        help: "Packets the agent handled, by packet type and outcome; see docs/operations.md, Reading the counters.",
        unit: Unit::Packets,
        bytes: true,
    },
    Section {
        field: "routing",
        get: |s| &s.routing,
        stem: "routing",
        label: "counter",
        help: "Routing protocol events (messages, updates, requests, rejections); see docs/routing.md.",
        unit: Unit::Events,
        bytes: false,
    },
    Section {
        field: "neighbours",
        get: |s| &s.neighbours,
        stem: "neighbour",
        label: "counter",
        help: "Neighbour layer events (links up and down, hellos, probes, beacons); see docs/operations.md, Reading the counters.",
        unit: Unit::Events,
        bytes: false,
    },
    Section {
        field: "kernel",
        get: |s| &s.kernel,
        stem: "kernel_udp_lost",
        label: "counter",
        help: "Datagrams the kernel lost before they reached the agent (UDP counters of the agent's network namespace, and the drops of the agent's own sockets).",
        unit: Unit::Packets,
        bytes: false,
    },
];

/// `Stats` fields rendered other than through [`SECTIONS`].
pub const OTHER_STATS_FIELDS: &[&str] = &["interfaces"];

/// Renders the exposition text.
pub fn render(status: &pb::Status, peers: &[pb::Peer], stats: &pb::Stats) -> String {
    let mut out = Exposition::default();

    out.family(
        "myconet_build_info",
        "gauge",
        "Agent version, data plane and node address (value 1).",
    );
    out.sample(
        "myconet_build_info",
        &[
            ("version", &status.version),
            ("dataplane", &status.dataplane),
            ("node_address", &status.node_address),
        ],
        1.0,
    );
    out.family(
        "myconet_uptime_seconds",
        "gauge",
        "Seconds since the agent started.",
    );
    out.sample("myconet_uptime_seconds", &[], status.uptime_seconds as f64);
    out.family("myconet_routes", "gauge", "Routes the agent holds.");
    out.sample("myconet_routes", &[], f64::from(status.route_count));

    for section in SECTIONS {
        let list = (section.get)(stats);
        let (name, byte_name) = match section.unit {
            Unit::Packets => (
                format!("myconet_{}_packets_total", section.stem),
                Some(format!("myconet_{}_bytes_total", section.stem)),
            ),
            Unit::Events => (format!("myconet_{}_events_total", section.stem), None),
        };
        let is_bytes =
            |c: &pb::Counter| matches!(section.unit, Unit::Events) && c.name.contains("bytes");
        out.family(&name, "counter", section.help);
        for c in list.iter().filter(|c| !is_bytes(c)) {
            out.sample(&name, &[(section.label, &c.name)], c.packets as f64);
        }
        match byte_name {
            Some(byte_name) if section.bytes => {
                out.family(
                    &byte_name,
                    "counter",
                    &format!("Bytes of the packets counted in {name}."),
                );
                for c in list {
                    out.sample(&byte_name, &[(section.label, &c.name)], c.bytes as f64);
                }
            }
            _ => {
                let byte_name = format!("myconet_{}_bytes_total", section.stem);
                if list.iter().any(is_bytes) {
                    out.family(
                        &byte_name,
                        "counter",
                        "Bytes of routing protocol messages, by direction.",
                    );
                    for c in list.iter().filter(|c| is_bytes(c)) {
                        out.sample(&byte_name, &[(section.label, &c.name)], c.packets as f64);
                    }
                }
            }
        }
    }

    interfaces(&mut out, stats);
    peer_metrics(&mut out, peers);
    out.text
}

fn interfaces(out: &mut Exposition, stats: &pb::Stats) {
    out.family(
        "myconet_interface_info",
        "gauge",
        "Underlay interfaces: XDP mode and how relayed frames may leave them (value 1).",
    );
    for i in &stats.interfaces {
        let ifindex = i.ifindex.to_string();
        out.sample(
            "myconet_interface_info",
            &[
                ("interface", &i.name),
                ("ifindex", &ifindex),
                ("xdp_mode", &i.xdp_mode),
                (
                    "redirect_target",
                    if i.redirect_target { "true" } else { "false" },
                ),
                ("xdp_tx", if i.xdp_tx { "true" } else { "false" }),
            ],
            1.0,
        );
    }
    type Get = fn(&pb::InterfaceCounters) -> u64;
    let kernel: [(&str, &str, Get); 4] = [
        (
            "myconet_interface_receive_packets_total",
            "Packets the kernel received on the interface.",
            |i| i.rx_packets,
        ),
        (
            "myconet_interface_receive_dropped_packets_total",
            "Packets the kernel dropped on receive.",
            |i| i.rx_dropped,
        ),
        (
            "myconet_interface_transmit_packets_total",
            "Packets the kernel transmitted on the interface.",
            |i| i.tx_packets,
        ),
        (
            "myconet_interface_transmit_dropped_packets_total",
            "Packets the kernel dropped on transmit, including frames XDP redirected or sent back that the driver could not take.",
            |i| i.tx_dropped,
        ),
    ];
    for (name, help, get) in kernel {
        out.family(name, "counter", help);
        for i in &stats.interfaces {
            out.sample(name, &[("interface", &i.name)], get(i) as f64);
        }
    }
}

/// `[addr]:port`, with `%ifindex` for a link-local neighbour.
fn peer_label(p: &pb::Peer) -> String {
    if p.interface == 0 {
        format!("[{}]:{}", p.address, p.port)
    } else {
        format!("[{}%{}]:{}", p.address, p.interface, p.port)
    }
}

fn peer_metrics(out: &mut Exposition, peers: &[pb::Peer]) {
    out.family(
        "myconet_peers",
        "gauge",
        "Neighbours known, in every state.",
    );
    out.sample("myconet_peers", &[], peers.len() as f64);
    let labelled: Vec<(String, &pb::Peer)> = peers.iter().map(|p| (peer_label(p), p)).collect();
    out.family(
        "myconet_peer_info",
        "gauge",
        "Neighbours: link state, how they were found and their overlay address (value 1).",
    );
    for (label, p) in &labelled {
        out.sample(
            "myconet_peer_info",
            &[
                ("peer", label),
                ("state", &p.state),
                ("origin", &p.origin),
                ("node_address", &p.node_address),
            ],
            1.0,
        );
    }
    type Get = fn(&pb::Peer) -> Option<f64>;
    let gauges: [(&str, &str, Get); 7] = [
        (
            "myconet_peer_up",
            "1 while the neighbour's link is up, else 0.",
            |p| Some(if p.state == "up" { 1.0 } else { 0.0 }),
        ),
        (
            "myconet_peer_relay_allowed",
            "1 while the neighbour is in the relay peer set.",
            |p| Some(if p.in_kernel { 1.0 } else { 0.0 }),
        ),
        (
            "myconet_peer_rtt_seconds",
            "Smoothed round-trip time to the neighbour (RFC 6298).",
            |p| p.rtt_us.map(|us| us as f64 / 1e6),
        ),
        (
            "myconet_peer_rtt_variation_seconds",
            "Round-trip time variation (RFC 6298).",
            |p| p.rttvar_us.map(|us| us as f64 / 1e6),
        ),
        (
            "myconet_peer_hello_loss_ratio",
            "Fraction of recent hellos not acknowledged, 0 to 1.",
            |p| p.loss,
        ),
        (
            "myconet_peer_link_cost",
            "Link cost the routing protocol applies (while up).",
            |p| p.link_cost.map(f64::from),
        ),
        (
            "myconet_peer_last_seen_seconds",
            "Seconds since the last authenticated packet from the neighbour.",
            |p| p.last_seen_ms.map(|ms| ms as f64 / 1e3),
        ),
    ];
    for (name, help, get) in gauges {
        out.family(name, "gauge", help);
        for (label, p) in &labelled {
            if let Some(v) = get(p) {
                out.sample(name, &[("peer", label)], v);
            }
        }
    }
}

/// The text being built.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape_label(v));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter(name: &str, packets: u64, bytes: u64) -> pb::Counter {
        pb::Counter {
            name: name.into(),
            packets,
            bytes,
        }
    }

    /// Every counter list `myconet-ctl stats` shows has its metric: a section added to
    /// `Stats` without one fails here.
    #[test]
    fn every_stats_field_is_exported() {
        let json = serde_json::to_value(pb::Stats::default()).unwrap();
        for field in json.as_object().unwrap().keys() {
            assert!(
                SECTIONS.iter().any(|s| s.field == field)
                    || OTHER_STATS_FIELDS.contains(&field.as_str()),
                "Stats.{field} has no metric: add it to metrics::SECTIONS"
            );
        }
    }

    #[test]
    fn renders_conventional_names_with_escaped_labels() {
        let status = pb::Status {
            version: "0.1.0".into(),
            dataplane: "xdp".into(),
            node_address: "fd6d::1".into(),
            uptime_seconds: 7,
            route_count: 2,
            ..Default::default()
        };
        let peers = [pb::Peer {
            address: "fe80::2".into(),
            port: 9651,
            interface: 3,
            state: "up".into(),
            origin: "disc\"overed".into(),
            rtt_us: Some(1500),
            loss: Some(0.25),
            ..Default::default()
        }];
        let stats = pb::Stats {
            xdp: vec![counter("redirect", 5, 500)],
            agent: vec![counter("rx_data", 3, 300)],
            routing: vec![
                counter("messages_sent", 4, 0),
                counter("bytes_sent", 400, 0),
            ],
            neighbours: vec![counter("peer_up", 2, 0)],
            kernel: vec![counter("udp6_in_csum_errors", 7, 0)],
            interfaces: vec![pb::InterfaceCounters {
                name: "eth0".into(),
                ifindex: 2,
                xdp_mode: "driver".into(),
                tx_dropped: 9,
                ..Default::default()
            }],
        };
        let text = render(&status, &peers, &stats);
        for line in [
            "# TYPE myconet_xdp_packets_total counter",
            "myconet_xdp_packets_total{verdict=\"redirect\"} 5",
            "myconet_xdp_bytes_total{verdict=\"redirect\"} 500",
            "myconet_agent_packets_total{counter=\"rx_data\"} 3",
            "myconet_routing_events_total{counter=\"messages_sent\"} 4",
            "myconet_routing_bytes_total{counter=\"bytes_sent\"} 400",
            "myconet_neighbour_events_total{counter=\"peer_up\"} 2",
            "myconet_kernel_udp_lost_packets_total{counter=\"udp6_in_csum_errors\"} 7",
            "myconet_interface_transmit_dropped_packets_total{interface=\"eth0\"} 9",
            "myconet_peer_rtt_seconds{peer=\"[fe80::2%3]:9651\"} 0.0015",
            "myconet_peer_hello_loss_ratio{peer=\"[fe80::2%3]:9651\"} 0.25",
            "myconet_peer_up{peer=\"[fe80::2%3]:9651\"} 1",
            "myconet_uptime_seconds 7",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        assert!(text.contains("origin=\"disc\\\"overed\""), "{text}");
        assert!(!text.contains("myconet_routing_events_total{counter=\"bytes_sent\"}"));
        // Every sample belongs to a family declared with HELP and TYPE before it.
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(declared.contains(name), "{name} used before its TYPE");
            }
        }
    }
}
