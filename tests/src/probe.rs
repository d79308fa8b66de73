//! Numbered, timestamped probe datagrams across the overlay, to measure outages by the
//! clock rather than by counting.
//!
//! The sender paces probes on an absolute schedule (one every [`PROBE_INTERVAL`], sent
//! late rather than skipped when the thread was not scheduled in time) and records when
//! each really left; every probe carries its number and send time. The receiver records
//! when each arrived. Both threads run in the test process, so one monotonic clock
//! serves both ends. In [`Mode::Echo`] the far end sends every probe straight back (a
//! ping stream: a probe counts only if both directions work).
//!
//! An outage is then measured in real time: the longest span of send times in which no
//! probe got through ([`ProbeReport::outage`]), and, independently, the longest silence
//! at the receiver ([`ProbeReport::arrival_gap`]). Neither depends on the nominal
//! interval, so a loaded machine that paces probes late does not shrink the figure.

use std::{
    collections::BTreeMap,
    net::{Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};

use crate::{netns::Netns, traffic::bind_udp};

/// Nominal time between probes.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(20);
/// UDP port the far end listens on.
pub const PROBE_PORT: u16 = 7777;
/// Probe payload: sequence number (4 bytes) and send time in ns since the probe's epoch
/// (8 bytes), both big-endian.
const PAYLOAD_LEN: usize = 12;
/// Most probes one run sends (ten minutes' worth), so a forgotten probe stops by itself.
const MAX_PROBES: u32 = 30_000;
/// How long the receiver waits for stragglers after the sender stopped.
const DRAIN: Duration = Duration::from_millis(300);

/// Which way probes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// From the near end to the far end only.
    OneWay,
    /// To the far end and back, as `ping` does.
    Echo,
}

/// One probe that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// The probe's number.
    pub seq: u32,
    /// When the sender sent it (from the probe itself).
    pub sent: Instant,
    /// When it arrived (back at the near end in [`Mode::Echo`]).
    pub arrived: Instant,
}

/// A probe stream running between two overlay addresses.
#[derive(Debug)]
pub struct Probe {
    stop_sending: Arc<AtomicBool>,
    stop_receiving: Arc<AtomicBool>,
    sender: thread::JoinHandle<Result<Vec<Instant>>>,
    receiver: thread::JoinHandle<Result<Vec<Arrival>>>,
    echo: Option<thread::JoinHandle<Result<()>>>,
}

fn socket(netns: &Netns, addr: Ipv6Addr, port: u16) -> Result<UdpSocket> {
    let s = bind_udp(netns, SocketAddr::V6(SocketAddrV6::new(addr, port, 0, 0)))?;
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    Ok(s)
}

impl Probe {
    /// Starts probing from `src` (an overlay address in namespace `near`) to `dst` (one
    /// in `far`).
    pub fn start(
        (near, src): (&Netns, Ipv6Addr),
        (far, dst): (&Netns, Ipv6Addr),
        mode: Mode,
    ) -> Result<Self> {
        let far_socket = socket(far, dst, PROBE_PORT)?;
        let tx = socket(near, src, 0)?;
        let to = SocketAddr::V6(SocketAddrV6::new(dst, PROBE_PORT, 0, 0));
        let epoch = Instant::now();
        let stop_sending = Arc::new(AtomicBool::new(false));
        let stop_receiving = Arc::new(AtomicBool::new(false));

        let (rx, echo) = match mode {
            Mode::OneWay => (far_socket, None),
            Mode::Echo => {
                let stop = stop_receiving.clone();
                let echo = thread::spawn(move || echo_back(&far_socket, &stop));
                (
                    tx.try_clone().context("cloning the probe socket")?,
                    Some(echo),
                )
            }
        };
        let stop = stop_sending.clone();
        let sender = thread::spawn(move || send_paced(&tx, to, epoch, &stop));
        let stop = stop_receiving.clone();
        let receiver = thread::spawn(move || receive(&rx, epoch, &stop));
        Ok(Self {
            stop_sending,
            stop_receiving,
            sender,
            receiver,
            echo,
        })
    }

    /// Stops sending, collects stragglers, and reports what was sent and what arrived.
    pub fn finish(self) -> Result<ProbeReport> {
        self.stop_sending.store(true, Ordering::Relaxed);
        let sent = self
            .sender
            .join()
            .map_err(|_| anyhow!("probe sender panicked"))??;
        thread::sleep(DRAIN);
        self.stop_receiving.store(true, Ordering::Relaxed);
        let arrivals = self
            .receiver
            .join()
            .map_err(|_| anyhow!("probe receiver panicked"))??;
        if let Some(echo) = self.echo {
            echo.join().map_err(|_| anyhow!("probe echo panicked"))??;
        }
        Ok(ProbeReport { sent, arrivals })
    }
}

fn send_paced(
    tx: &UdpSocket,
    to: SocketAddr,
    epoch: Instant,
    stop: &AtomicBool,
) -> Result<Vec<Instant>> {
    let mut sent = Vec::new();
    let mut seq: u32 = 0;
    while !stop.load(Ordering::Relaxed) && seq < MAX_PROBES {
        let due = epoch + PROBE_INTERVAL * seq;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let now = Instant::now();
        let ns = u64::try_from(now.duration_since(epoch).as_nanos()).unwrap_or(u64::MAX);
        let mut payload = [0u8; PAYLOAD_LEN];
        payload[..4].copy_from_slice(&seq.to_be_bytes());
        payload[4..].copy_from_slice(&ns.to_be_bytes());
        // A send may fail while routes change (no route yet): that is a loss too.
        let _ = tx.send_to(&payload, to);
        sent.push(now);
        seq += 1;
    }
    Ok(sent)
}

fn receive(rx: &UdpSocket, epoch: Instant, stop: &AtomicBool) -> Result<Vec<Arrival>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    // Bounded even if nobody stops us: the sender's own cap plus margin.
    let deadline = Instant::now() + PROBE_INTERVAL * MAX_PROBES + Duration::from_secs(60);
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        if let Ok(PAYLOAD_LEN) = rx.recv(&mut buf) {
            let arrived = Instant::now();
            let (seq, ns) = parse(&buf);
            got.push(Arrival {
                seq,
                sent: epoch + Duration::from_nanos(ns),
                arrived,
            });
        }
    }
    Ok(got)
}

fn echo_back(socket: &UdpSocket, stop: &AtomicBool) -> Result<()> {
    let mut buf = [0u8; 64];
    let deadline = Instant::now() + PROBE_INTERVAL * MAX_PROBES + Duration::from_secs(60);
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        if let Ok((PAYLOAD_LEN, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..PAYLOAD_LEN], from);
        }
    }
    Ok(())
}

fn parse(buf: &[u8; 64]) -> (u32, u64) {
    let mut seq = [0u8; 4];
    let mut ns = [0u8; 8];
    seq.copy_from_slice(&buf[..4]);
    ns.copy_from_slice(&buf[4..PAYLOAD_LEN]);
    (u32::from_be_bytes(seq), u64::from_be_bytes(ns))
}

/// The longest stretch without a probe getting through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outage {
    /// From the send time of the first lost probe of the run to that of the first probe
    /// after it that got through (to the last send plus one interval if none did).
    pub duration: Duration,
    /// Probes lost in the run.
    pub probes: u32,
    /// Number of the first lost probe.
    pub first: u32,
}

/// What a probe run sent and received.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    /// When each probe was sent, indexed by its number.
    pub sent: Vec<Instant>,
    /// Every probe that arrived, in arrival order (duplicates included).
    pub arrivals: Vec<Arrival>,
}

impl ProbeReport {
    /// Probes sent.
    pub fn sent_count(&self) -> u32 {
        u32::try_from(self.sent.len()).unwrap_or(u32::MAX)
    }

    /// Distinct probes that arrived.
    pub fn received_count(&self) -> u32 {
        u32::try_from(self.arrived().len()).unwrap_or(u32::MAX)
    }

    /// Arrival time of each distinct probe that arrived, by number.
    fn arrived(&self) -> BTreeMap<u32, Instant> {
        let mut by_seq = BTreeMap::new();
        for a in &self.arrivals {
            by_seq.entry(a.seq).or_insert(a.arrived);
        }
        by_seq
    }

    /// Probes sent that never arrived.
    pub fn lost(&self) -> u32 {
        self.sent_count() - self.received_count()
    }

    /// Numbers of the probes that never arrived.
    pub fn missing(&self) -> Vec<u32> {
        let arrived = self.arrived();
        (0..self.sent_count())
            .filter(|s| !arrived.contains_key(s))
            .collect()
    }

    /// Whether probes sent in the last `tail` of the run got through (traffic flows at
    /// the end).
    pub fn flows_at_end(&self, tail: Duration) -> bool {
        let Some(last) = self.sent.last() else {
            return false;
        };
        let arrived = self.arrived();
        self.sent
            .iter()
            .enumerate()
            .any(|(seq, at)| *last - *at <= tail && arrived.contains_key(&(seq as u32)))
    }

    /// The longest run of lost probes, measured by their send times; `None` if none was
    /// lost.
    pub fn outage(&self) -> Option<Outage> {
        let arrived = self.arrived();
        let n = self.sent.len();
        let mut worst: Option<Outage> = None;
        let mut seq = 0;
        while seq < n {
            if arrived.contains_key(&(seq as u32)) {
                seq += 1;
                continue;
            }
            let first = seq;
            while seq < n && !arrived.contains_key(&(seq as u32)) {
                seq += 1;
            }
            let end = match self.sent.get(seq) {
                Some(next) => *next,
                None => self.sent[n - 1] + PROBE_INTERVAL,
            };
            let run = Outage {
                duration: end - self.sent[first],
                probes: (seq - first) as u32,
                first: first as u32,
            };
            if worst.is_none_or(|w| run.duration > w.duration) {
                worst = Some(run);
            }
        }
        worst
    }

    /// The longest time between two consecutive arrivals at the receiver, whatever was
    /// sent meanwhile.
    pub fn arrival_gap(&self) -> Duration {
        let mut times: Vec<Instant> = self.arrivals.iter().map(|a| a.arrived).collect();
        times.sort_unstable();
        times
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }

    /// One line for the test log.
    pub fn summary(&self) -> String {
        let outage = self.outage().map_or_else(
            || "none".to_string(),
            |o| format!("{:?} ({} probes from #{})", o.duration, o.probes, o.first),
        );
        format!(
            "{} of {} probes arrived; longest outage {outage}; longest silence at the receiver {:?}",
            self.received_count(),
            self.sent_count(),
            self.arrival_gap()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(sent_ms: &[u64], arrived: &[(u32, u64)]) -> ProbeReport {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        ProbeReport {
            sent: sent_ms.iter().map(|&ms| at(ms)).collect(),
            arrivals: arrived
                .iter()
                .map(|&(seq, ms)| Arrival {
                    seq,
                    sent: at(sent_ms[seq as usize]),
                    arrived: at(ms),
                })
                .collect(),
        }
    }

    #[test]
    fn outage_is_measured_by_send_times_not_by_counting() {
        // Probes 2..4 lost; the sender was late (probe 3 left 500 ms after probe 2).
        let r = report(
            &[0, 20, 40, 540, 560, 580],
            &[(0, 1), (1, 21), (4, 561), (5, 581)],
        );
        assert_eq!(r.lost(), 2);
        assert_eq!(r.missing(), vec![2, 3]);
        assert_eq!(
            r.outage(),
            Some(Outage {
                duration: Duration::from_millis(520),
                probes: 2,
                first: 2
            })
        );
        assert_eq!(r.arrival_gap(), Duration::from_millis(540));
        assert!(r.flows_at_end(Duration::from_millis(30)));
    }

    #[test]
    fn no_loss_no_outage_and_trailing_loss_is_open_ended() {
        let r = report(&[0, 20, 40], &[(0, 1), (2, 41), (1, 42)]);
        assert_eq!(r.outage(), None);
        assert_eq!(r.lost(), 0);
        let r = report(&[0, 20, 40], &[(0, 1)]);
        assert_eq!(r.outage().unwrap().duration, Duration::from_millis(40));
        assert!(!r.flows_at_end(Duration::from_millis(30)));
    }
}
