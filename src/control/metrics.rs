//! Observing the data plane: sums the per-worker counters at scrape time,
//! tracks the burn rate of IDs *served*, and renders Prometheus text
//! (every metric is described in `docs/metrics.md`). Reads atomics only;
//! the hot path never waits for it.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_utils::CachePadded;
use tradeid::protocol::ErrorCode;
use tradeid::respond::DropReason;
use tradeid::Generator;

use super::ids::OffPlaneIds;

use crate::cluster::ledger::ClusterStats;
use crate::dataplane::{Counters, StartReport, BATCH_BUCKETS};

/// Requests, IDs and errors of one protocol served off the data plane
/// (HTTP, gRPC). Several tasks write these, so they use atomic adds.
#[derive(Debug, Default)]
pub(crate) struct ProtocolCounters {
    pub(crate) requests: AtomicU64,
    pub(crate) ids: AtomicU64,
    pub(crate) errors: [AtomicU64; ErrorCode::ALL.len()],
}

impl ProtocolCounters {
    pub(crate) fn served(&self, ids: usize) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.ids.fetch_add(ids as u64, Ordering::Relaxed);
    }

    pub(crate) fn error(&self, code: ErrorCode) {
        self.errors[code.index()].fetch_add(1, Ordering::Relaxed);
    }
}

/// A read-only view of a running data plane for the control plane.
pub(crate) struct Observer {
    /// The generator (store, reservation stats).
    pub(crate) generator: Arc<Generator>,
    counters: Arc<[Arc<CachePadded<Counters>>]>,
    /// Coordination state, in cluster mode.
    pub(crate) cluster: Option<Arc<ClusterStats>>,
    start_report: StartReport,
    /// Largest batch, for `/ids`.
    pub(crate) max_batch: u16,
    /// The most IDs one restart can skip.
    pub(crate) max_waste_per_restart: u64,
    started: Instant,
    /// Cleared when shutting down.
    pub(crate) running: AtomicBool,
    rate: Mutex<RateSample>,
    /// IDs handed out over HTTP.
    pub(crate) http: ProtocolCounters,
    /// IDs handed out over gRPC.
    pub(crate) grpc: ProtocolCounters,
    /// Where HTTP requests draw IDs from.
    pub(crate) http_ids: OffPlaneIds,
    /// Where gRPC requests draw IDs from.
    pub(crate) grpc_ids: OffPlaneIds,
    /// Sockets of other processes bound to our UDP address at the last
    /// check (set by the control loop).
    pub(crate) listen_foreign_sockets: AtomicU64,
}

struct RateSample {
    at: Instant,
    served: u64,
    ids_per_second: f64,
}

/// Whether the node can serve, and why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Readiness {
    /// Serving (in cluster mode: etcd answers, or blocks are held).
    Ready(String),
    /// Not serving: stopping, or no block held and etcd unreachable.
    NotReady(String),
}

impl Observer {
    /// Observes a data plane through its generator and worker counters.
    pub(crate) fn new(
        generator: Arc<Generator>,
        counters: Arc<[Arc<CachePadded<Counters>>]>,
        cluster: Option<Arc<ClusterStats>>,
        start_report: StartReport,
        max_batch: u16,
        max_waste_per_restart: u64,
    ) -> Observer {
        Observer {
            counters,
            cluster,
            start_report,
            max_batch,
            max_waste_per_restart,
            started: Instant::now(),
            running: AtomicBool::new(true),
            rate: Mutex::new(RateSample { at: Instant::now(), served: 0, ids_per_second: 0.0 }),
            http: ProtocolCounters::default(),
            grpc: ProtocolCounters::default(),
            http_ids: OffPlaneIds::new(Arc::clone(&generator)),
            grpc_ids: OffPlaneIds::new(Arc::clone(&generator)),
            listen_foreign_sockets: AtomicU64::new(0),
            generator,
        }
    }

    fn sum(&self, get: impl Fn(&Counters) -> &AtomicU64) -> u64 {
        self.counters.iter().map(|c| get(c).load(Ordering::Relaxed)).sum()
    }

    /// Per worker, in worker order: the replies the kernel refused so far,
    /// and the OS error of the latest of them (0: none yet).
    pub(crate) fn send_failures(&self) -> Vec<(u64, i32)> {
        self.counters
            .iter()
            .map(|c| (c.send_failures.load(Ordering::Relaxed), c.last_send_errno.load(Ordering::Relaxed) as i32))
            .collect()
    }

    /// Every worker's heartbeat, in worker order.
    pub(crate) fn heartbeats(&self) -> Vec<u64> {
        self.counters.iter().map(|c| c.heartbeat.load(Ordering::Relaxed)).collect()
    }

    /// IDs handed out so far over every protocol.
    pub(crate) fn served(&self) -> u64 {
        self.sum(|c| &c.ids) + self.http.ids.load(Ordering::Relaxed) + self.grpc.ids.load(Ordering::Relaxed)
    }

    /// IDs this process reserved but has not handed out yet: what it can
    /// still serve if it cannot reserve more (etcd down, disk stuck).
    pub(crate) fn held(&self) -> u64 {
        self.generator.stats().ids_reserved.load(Ordering::Relaxed).saturating_sub(self.served())
    }

    /// IDs of the space consumed (issued or reserved) and its capacity:
    /// this node's partition, or in cluster mode the whole cluster's space
    /// as this node last saw it.
    pub(crate) fn usage(&self) -> (u64, u64) {
        match &self.cluster {
            Some(c) => (c.cluster_used.load(Ordering::Relaxed), c.capacity),
            None => {
                let store = self.generator.store();
                (store.used(), store.header().geometry.node_capacity())
            }
        }
    }

    /// Fraction of the space consumed.
    pub(crate) fn used_fraction(&self) -> f64 {
        let (used, capacity) = self.usage();
        used as f64 / capacity as f64
    }

    /// Updates the burn rate from the IDs served (never from blocks
    /// reserved: a restart reserves blocks without serving any). Call every
    /// few seconds.
    pub(crate) fn sample_rate(&self) {
        let served = self.served();
        let mut sample = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        let secs = sample.at.elapsed().as_secs_f64();
        if secs >= 1.0 {
            let instant = served.saturating_sub(sample.served) as f64 / secs;
            // Smooth over about a minute of samples.
            sample.ids_per_second = 0.9 * sample.ids_per_second + 0.1 * instant;
            sample.at = Instant::now();
            sample.served = served;
        }
    }

    /// IDs served per second, smoothed.
    pub(crate) fn burn_rate(&self) -> f64 {
        self.rate.lock().unwrap_or_else(|p| p.into_inner()).ids_per_second
    }

    /// Whether the node can serve, with the coordination state in words.
    pub(crate) fn readiness(&self) -> Readiness {
        if !self.running.load(Ordering::Relaxed) {
            return Readiness::NotReady("stopping".into());
        }
        let Some(cluster) = &self.cluster else { return Readiness::Ready("serving".into()) };
        let held = self.held();
        // Stopped for good (etcd's metadata vanished or changed): out of
        // rotation, whatever it still holds, until an operator acts.
        if let Some(reason) = cluster.stopped.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Readiness::NotReady(format!("{reason}; {held} IDs held"));
        }
        match self.generator.ledger_down_for() {
            None if cluster.up.load(Ordering::Relaxed) => {
                Readiness::Ready(format!("serving; etcd ok; {held} IDs held"))
            }
            None => Readiness::Ready(format!("serving; etcd membership unreachable; {held} IDs held")),
            Some(down) if held > 0 => {
                let rate = self.burn_rate();
                let ride = if rate > 0.0 {
                    format!("about {:.0} s", held as f64 / rate)
                } else {
                    "indefinitely at no load".into()
                };
                Readiness::Ready(format!(
                    "serving held blocks; etcd unreachable for {:.0} s; {held} IDs held, enough for {ride}",
                    down.as_secs_f64()
                ))
            }
            Some(down) => Readiness::NotReady(format!(
                "etcd unreachable for {:.0} s and no IDs held: answering !ERR503 until etcd is back",
                down.as_secs_f64()
            )),
        }
    }

    /// A one-line summary for systemd's STATUS=.
    pub(crate) fn status_line(&self) -> String {
        let (used, capacity) = self.usage();
        let state = match self.readiness() {
            Readiness::Ready(s) | Readiness::NotReady(s) => s,
        };
        format!(
            "{state}; {} IDs sent, burn {:.0} IDs/s, {} remaining ({:.3}% used)",
            self.served(),
            self.burn_rate(),
            capacity.saturating_sub(used),
            100.0 * used as f64 / capacity as f64
        )
    }

    /// Renders every metric in the Prometheus text format.
    pub(crate) fn render(&self) -> String {
        let mut p = Prom::default();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        p.one(
            "tradeid_build_info",
            "gauge",
            "The running build.",
            &format!("version=\"{}\"", env!("CARGO_PKG_VERSION")),
            1.0,
        );
        p.single(
            "tradeid_ready",
            "gauge",
            "1 while this node can serve IDs (see /readyz).",
            f64::from(matches!(self.readiness(), Readiness::Ready(_))),
        );
        p.single(
            "tradeid_uptime_seconds",
            "gauge",
            "Seconds since start.",
            self.started.elapsed().as_secs_f64().floor(),
        );

        let workers: Vec<(String, &Counters)> =
            self.counters.iter().enumerate().map(|(i, c)| (format!("worker=\"{i}\""), &***c)).collect();
        p.family(
            "tradeid_datagrams_total",
            "counter",
            "UDP datagrams received.",
            workers.iter().map(|(l, c)| (l.clone(), load(&c.datagrams) as f64)),
        );
        p.family(
            "tradeid_worker_heartbeat_total",
            "counter",
            "Worker loop iterations (at least 10 a second while healthy).",
            workers.iter().map(|(l, c)| (l.clone(), load(&c.heartbeat) as f64)),
        );

        let protocols = [
            ("udp", self.sum(|c| &c.requests), self.sum(|c| &c.ids)),
            ("http", load(&self.http.requests), load(&self.http.ids)),
            ("grpc", load(&self.grpc.requests), load(&self.grpc.ids)),
        ];
        p.family(
            "tradeid_requests_total",
            "counter",
            "Requests answered with IDs, by protocol.",
            protocols.iter().map(|(name, r, _)| (format!("protocol=\"{name}\""), *r as f64)),
        );
        p.family(
            "tradeid_ids_served_total",
            "counter",
            "IDs handed out, by protocol.",
            protocols.iter().map(|(name, _, i)| (format!("protocol=\"{name}\""), *i as f64)),
        );
        let mut errors = Vec::new();
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            let number = code.number();
            errors.push((format!("protocol=\"udp\",code=\"{number}\""), self.sum(|c| &c.errors[i]) as f64));
            errors.push((format!("protocol=\"http\",code=\"{number}\""), load(&self.http.errors[i]) as f64));
            errors.push((format!("protocol=\"grpc\",code=\"{number}\""), load(&self.grpc.errors[i]) as f64));
        }
        p.family(
            "tradeid_errors_total",
            "counter",
            "Error replies, by protocol and code (gRPC and HTTP use the numbers of the equivalent UDP errors).",
            errors,
        );
        p.family(
            "tradeid_drops_total",
            "counter",
            "Datagrams dropped without a reply, by reason.",
            DropReason::ALL
                .iter()
                .map(|r| (format!("reason=\"{}\"", r.label()), self.sum(|c| &c.drops[r.index()]) as f64)),
        );
        p.single(
            "tradeid_amplification_limited_total",
            "counter",
            "UDP replies cut to 3x the request size.",
            self.sum(|c| &c.amplification_limited) as f64,
        );
        p.single(
            "tradeid_send_failures_total",
            "counter",
            "UDP replies the kernel refused.",
            self.sum(|c| &c.send_failures) as f64,
        );
        p.single(
            "tradeid_recv_failures_total",
            "counter",
            "Failed UDP receive calls.",
            self.sum(|c| &c.recv_failures) as f64,
        );

        let mut cumulative = 0;
        let mut buckets = Vec::new();
        for (i, bound) in BATCH_BUCKETS.iter().enumerate() {
            cumulative += self.sum(|c| &c.batch_sizes[i]);
            let le = if *bound == u16::MAX { "+Inf".to_string() } else { bound.to_string() };
            buckets.push((le, cumulative));
        }
        p.histogram(
            "tradeid_request_batch_size",
            "IDs asked for per answered UDP request.",
            &buckets,
            None,
            cumulative,
        );

        let stats = self.generator.stats();
        p.single(
            "tradeid_blocks_reserved_total",
            "counter",
            "Blocks of IDs reserved and flushed since start.",
            load(&stats.blocks_reserved) as f64,
        );
        p.single(
            "tradeid_ids_reserved_total",
            "counter",
            "IDs covered by the blocks reserved since start.",
            load(&stats.ids_reserved) as f64,
        );
        p.single(
            "tradeid_block_size",
            "gauge",
            "Size of the most recently reserved block.",
            load(&stats.last_block_size) as f64,
        );
        p.single(
            "tradeid_ids_held",
            "gauge",
            "IDs reserved but not yet handed out: what this node can still serve without reserving.",
            self.held() as f64,
        );
        self.render_flush_histogram(&mut p);
        p.single(
            "tradeid_flush_in_progress_seconds",
            "gauge",
            "How long the flush now running has been running (0: none).",
            self.generator.flush_in_progress_for().map_or(0.0, |d| d.as_secs_f64()),
        );

        let (used, capacity) = self.usage();
        let remaining = capacity.saturating_sub(used);
        let rate = self.burn_rate();
        p.single(
            "tradeid_ids_capacity",
            "gauge",
            "IDs the space can ever issue (this node's partition, or the whole cluster).",
            capacity as f64,
        );
        p.single("tradeid_ids_used", "gauge", "IDs of the space consumed: issued or reserved.", used as f64);
        p.single("tradeid_ids_remaining", "gauge", "IDs left in the space.", remaining as f64);
        p.single(
            "tradeid_burn_rate_ids_per_second",
            "gauge",
            "IDs served per second, smoothed over about a minute.",
            (rate * 1000.0).round() / 1000.0,
        );
        let eta = if rate > 0.0 { (remaining as f64 / rate).round() } else { f64::INFINITY };
        p.single(
            "tradeid_exhaustion_eta_seconds",
            "gauge",
            "Time to exhaustion at the current burn rate (+Inf when idle).",
            eta,
        );
        p.single(
            "tradeid_waste_per_restart_max",
            "gauge",
            "Upper bound of IDs skipped by one restart.",
            self.max_waste_per_restart as f64,
        );
        p.single(
            "tradeid_listen_foreign_sockets",
            "gauge",
            "Sockets of other processes bound to the UDP --listen address at the last check (0 normally).",
            self.listen_foreign_sockets.load(Ordering::Relaxed) as f64,
        );
        p.single(
            "tradeid_mirror_repaired_shards",
            "gauge",
            "Shards found behind in a state mirror at start and repaired.",
            f64::from(self.start_report.repaired_shards),
        );
        p.single(
            "tradeid_torn_slots",
            "gauge",
            "Shards whose newest slot was torn at start (the older one was used).",
            f64::from(self.start_report.torn_slots),
        );
        if let Some((rcvbuf, in_errors)) = kernel_udp_errors() {
            p.single(
                "tradeid_kernel_udp_rcvbuf_errors_total",
                "counter",
                "Host-wide UDP RcvbufErrors (/proc/net/snmp): datagrams dropped for a full socket buffer.",
                rcvbuf as f64,
            );
            p.single(
                "tradeid_kernel_udp_in_errors_total",
                "counter",
                "Host-wide UDP InErrors (/proc/net/snmp).",
                in_errors as f64,
            );
        }
        if let Some(c) = &self.cluster {
            self.render_cluster(&mut p, c);
        }
        p.out
    }

    fn render_cluster(&self, p: &mut Prom, c: &ClusterStats) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        p.one(
            "tradeid_cluster_info",
            "gauge",
            "The cluster this node belongs to.",
            &format!("cluster=\"{}\",node=\"{}\"", c.cluster, c.node_id),
            1.0,
        );
        p.single(
            "tradeid_etcd_up",
            "gauge",
            "1 if the last etcd request succeeded.",
            f64::from(c.up.load(Ordering::Relaxed) && self.generator.ledger_down_for().is_none()),
        );
        p.family(
            "tradeid_etcd_txn_total",
            "counter",
            "Reservation compare-and-swaps by result.",
            [
                ("result=\"committed\"".to_string(), load(&c.committed)),
                ("result=\"conflict\"".to_string(), load(&c.conflicts)),
                ("result=\"error\"".to_string(), load(&c.errors)),
            ],
        );
        p.single(
            "tradeid_etcd_reservation_failures_total",
            "counter",
            "Block reservations that failed at etcd (claim, refresh or compare-and-swap), each retried after a backoff.",
            self.generator.stats().ledger_failures.load(Ordering::Relaxed) as f64,
        );
        p.single(
            "tradeid_etcd_rollbacks_total",
            "counter",
            "Times etcd showed a shard mark below one this node knew it held (etcd rolled back or its keys deleted).",
            load(&c.rollbacks),
        );
        p.single(
            "tradeid_etcd_marks_raised_total",
            "counter",
            "Shard marks this node raised back in etcd to what it knew (healing a rolled-back etcd).",
            load(&c.marks_raised),
        );
        p.single(
            "tradeid_etcd_reservations_stopped",
            "gauge",
            "1 if this node stopped reserving for good: the cluster's metadata in etcd vanished or changed.",
            f64::from(c.stopped.lock().unwrap_or_else(|p| p.into_inner()).is_some()),
        );
        p.single(
            "tradeid_etcd_last_success_timestamp_seconds",
            "gauge",
            "Unix time of the last successful etcd request.",
            load(&c.last_success_unix),
        );
        let h = c.latency_micros.lock().unwrap_or_else(|h| h.into_inner());
        let buckets: Vec<(String, u64)> = LATENCY_BOUNDS_US
            .iter()
            .map(|&us| (format!("{}", us as f64 / 1e6), h.count_between(0, us)))
            .chain(std::iter::once(("+Inf".to_string(), h.len())))
            .collect();
        p.histogram(
            "tradeid_etcd_reservation_seconds",
            "Time for one reservation compare-and-swap in etcd.",
            &buckets,
            Some(h.mean() * h.len() as f64 / 1e6),
            h.len(),
        );
    }

    fn render_flush_histogram(&self, p: &mut Prom) {
        let guard = self.generator.stats().flush_micros.lock().unwrap_or_else(|g| g.into_inner());
        let Some(h) = guard.as_ref() else { return };
        let buckets: Vec<(String, u64)> = LATENCY_BOUNDS_US
            .iter()
            .map(|&us| (format!("{}", us as f64 / 1e6), h.count_between(0, us)))
            .chain(std::iter::once(("+Inf".to_string(), h.len())))
            .collect();
        p.histogram(
            "tradeid_flush_seconds",
            "Time to flush a block's mark to disk.",
            &buckets,
            Some(h.mean() * h.len() as f64 / 1e6),
            h.len(),
        );
    }
}

/// Prometheus text, one metric family at a time.
#[derive(Default)]
struct Prom {
    out: String,
}

impl Prom {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.head(name, kind, help);
        let _ = writeln!(self.out, "{name} {}", number(value));
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, labels: &str, value: f64) {
        self.family(name, kind, help, [(labels.to_string(), value)]);
    }

    fn family(&mut self, name: &str, kind: &str, help: &str, samples: impl IntoIterator<Item = (String, f64)>) {
        self.head(name, kind, help);
        for (labels, value) in samples {
            let _ = writeln!(self.out, "{name}{{{labels}}} {}", number(value));
        }
    }

    /// `buckets` are (le, cumulative count), the last one `+Inf`.
    fn histogram(&mut self, name: &str, help: &str, buckets: &[(String, u64)], sum: Option<f64>, count: u64) {
        self.head(name, "histogram", help);
        for (le, n) in buckets {
            let _ = writeln!(self.out, "{name}_bucket{{le=\"{le}\"}} {n}");
        }
        if let Some(sum) = sum {
            let _ = writeln!(self.out, "{name}_sum {sum:.6}");
        }
        let _ = writeln!(self.out, "{name}_count {count}");
    }
}

fn number(value: f64) -> String {
    if value.is_infinite() {
        "+Inf".into()
    } else if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else {
        format!("{value}")
    }
}

/// Latency histogram bucket bounds, in microseconds.
const LATENCY_BOUNDS_US: [u64; 16] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    10_000_000,
];

/// (RcvbufErrors, InErrors) from the `Udp:` lines of /proc/net/snmp (read
/// through /proc/self, which stays visible under systemd's ProcSubset=pid).
fn kernel_udp_errors() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/net/snmp").ok()?;
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let names: Vec<&str> = udp.next()?.split_whitespace().collect();
    let values: Vec<&str> = udp.next()?.split_whitespace().collect();
    let get = |name: &str| names.iter().position(|n| *n == name).and_then(|i| values.get(i)?.parse().ok());
    Some((get("RcvbufErrors")?, get("InErrors")?))
}
