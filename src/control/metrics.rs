//! Observing the data plane: sums the per-worker counters at scrape time,
//! tracks the burn rate, and renders Prometheus text. Reads atomics only;
//! the hot path never waits for it.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_utils::CachePadded;

use tradeid::protocol::ErrorCode;
use tradeid::respond::DropReason;
use tradeid::{Generator, Handle};

use crate::dataplane::{Counters, BATCH_BUCKETS};

/// A read-only view of a running data plane for the control plane.
pub(crate) struct Observer {
    /// The generator (store, reservation stats).
    pub(crate) generator: Arc<Generator>,
    counters: Arc<[Arc<CachePadded<Counters>>]>,
    /// Largest batch, for `/ids`.
    pub(crate) max_batch: u16,
    /// The most IDs one restart can skip.
    pub(crate) max_waste_per_restart: u64,
    started: Instant,
    /// Cleared when shutting down, for `/readyz`.
    pub(crate) ready: AtomicBool,
    rate: Mutex<RateSample>,
    /// IDs handed out over HTTP.
    pub(crate) http_ids: AtomicU64,
    /// The admin plane's own handle, created on the first HTTP ID request
    /// (so an unused admin listener wastes no IDs on restart).
    pub(crate) http_handle: Mutex<Option<Handle>>,
}

struct RateSample {
    at: Instant,
    used: u64,
    ids_per_second: f64,
}

impl Observer {
    /// Observes a data plane through its generator and worker counters.
    pub(crate) fn new(
        generator: Arc<Generator>,
        counters: Arc<[Arc<CachePadded<Counters>>]>,
        max_batch: u16,
        max_waste_per_restart: u64,
    ) -> Observer {
        let used = generator.store().used();
        Observer {
            generator,
            counters,
            max_batch,
            max_waste_per_restart,
            started: Instant::now(),
            ready: AtomicBool::new(true),
            rate: Mutex::new(RateSample { at: Instant::now(), used, ids_per_second: 0.0 }),
            http_ids: AtomicU64::new(0),
            http_handle: Mutex::new(None),
        }
    }

    /// Replies the kernel refused so far, and the OS error of the latest.
    pub(crate) fn send_failures(&self) -> (u64, Option<i32>) {
        let total = self.counters.iter().map(|c| c.send_failures.load(Ordering::Relaxed)).sum();
        let errno = self.counters.iter().map(|c| c.last_send_errno.load(Ordering::Relaxed)).find(|&e| e != 0);
        (total, errno.map(|e| e as i32))
    }

    /// Every worker's heartbeat, in worker order.
    pub(crate) fn heartbeats(&self) -> Vec<u64> {
        self.counters.iter().map(|c| c.heartbeat.load(Ordering::Relaxed)).collect()
    }

    /// IDs of the node's space consumed (reserved), and its capacity.
    pub(crate) fn usage(&self) -> (u64, u64) {
        let store = self.generator.store();
        (store.used(), store.header().geometry.node_capacity())
    }

    /// Fraction of the node's space consumed.
    pub(crate) fn used_fraction(&self) -> f64 {
        let (used, capacity) = self.usage();
        used as f64 / capacity as f64
    }

    /// Updates the burn rate (IDs consumed per second, reservations
    /// included) from the marks. Call every few seconds.
    pub(crate) fn sample_rate(&self) {
        let (used, _) = self.usage();
        let mut sample = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        let secs = sample.at.elapsed().as_secs_f64();
        if secs >= 1.0 {
            let instant = used.saturating_sub(sample.used) as f64 / secs;
            // Smooth over about a minute of samples.
            sample.ids_per_second =
                if sample.ids_per_second == 0.0 { instant } else { 0.9 * sample.ids_per_second + 0.1 * instant };
            sample.at = Instant::now();
            sample.used = used;
        }
    }

    /// IDs consumed per second, smoothed.
    pub(crate) fn burn_rate(&self) -> f64 {
        self.rate.lock().unwrap_or_else(|p| p.into_inner()).ids_per_second
    }

    /// A one-line summary for systemd's STATUS=.
    pub(crate) fn status_line(&self) -> String {
        let (used, capacity) = self.usage();
        let ids: u64 = self.counters.iter().map(|c| c.ids.load(Ordering::Relaxed)).sum();
        format!(
            "serving; {ids} IDs sent, burn {:.0} IDs/s, {} remaining ({:.3}% used)",
            self.burn_rate(),
            capacity - used,
            100.0 * used as f64 / capacity as f64
        )
    }

    /// Renders every metric in the Prometheus text format.
    pub(crate) fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        let c = &self.counters;
        let per_worker = |out: &mut String, name: &str, help: &str, get: &dyn Fn(&Counters) -> u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (i, w) in c.iter().enumerate() {
                let _ = writeln!(out, "{name}{{worker=\"{i}\"}} {}", get(w));
            }
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        per_worker(&mut out, "tradeid_datagrams_total", "UDP datagrams received.", &|w| load(&w.datagrams));
        per_worker(&mut out, "tradeid_requests_total", "Requests answered with IDs.", &|w| load(&w.requests));
        per_worker(&mut out, "tradeid_ids_served_total", "IDs sent over UDP.", &|w| load(&w.ids));
        per_worker(&mut out, "tradeid_worker_heartbeat_total", "Worker loop iterations.", &|w| load(&w.heartbeat));

        let sum = |get: &dyn Fn(&Counters) -> u64| c.iter().map(|w| get(w)).sum::<u64>();
        let _ = writeln!(out, "# HELP tradeid_drops_total Datagrams dropped without a reply, by reason.\n# TYPE tradeid_drops_total counter");
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            let _ =
                writeln!(out, "tradeid_drops_total{{reason=\"{}\"}} {}", reason.label(), sum(&|w| load(&w.drops[i])));
        }
        let _ = writeln!(
            out,
            "# HELP tradeid_errors_total Error replies sent, by code.\n# TYPE tradeid_errors_total counter"
        );
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            let _ =
                writeln!(out, "tradeid_errors_total{{code=\"{}\"}} {}", code.number(), sum(&|w| load(&w.errors[i])));
        }
        let simple = |out: &mut String, name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        simple(
            &mut out,
            "tradeid_amplification_limited_total",
            "counter",
            "Replies cut to 3x the request size.",
            sum(&|w| load(&w.amplification_limited)).to_string(),
        );
        simple(
            &mut out,
            "tradeid_send_failures_total",
            "counter",
            "Replies the kernel refused.",
            sum(&|w| load(&w.send_failures)).to_string(),
        );
        simple(
            &mut out,
            "tradeid_recv_failures_total",
            "counter",
            "Failed receive calls.",
            sum(&|w| load(&w.recv_failures)).to_string(),
        );
        simple(&mut out, "tradeid_http_ids_total", "counter", "IDs sent over HTTP.", load(&self.http_ids).to_string());

        let _ = writeln!(
            out,
            "# HELP tradeid_request_batch_size IDs asked for per request.\n# TYPE tradeid_request_batch_size histogram"
        );
        let mut cumulative = 0;
        for (i, bound) in BATCH_BUCKETS.iter().enumerate() {
            cumulative += sum(&|w| load(&w.batch_sizes[i]));
            let le = if *bound == u16::MAX { "+Inf".to_string() } else { bound.to_string() };
            let _ = writeln!(out, "tradeid_request_batch_size_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "tradeid_request_batch_size_count {cumulative}");

        let stats = self.generator.stats();
        simple(
            &mut out,
            "tradeid_blocks_reserved_total",
            "counter",
            "Blocks of IDs reserved and flushed.",
            load(&stats.blocks_reserved).to_string(),
        );
        simple(
            &mut out,
            "tradeid_block_size",
            "gauge",
            "Size of the most recently reserved block.",
            load(&stats.last_block_size).to_string(),
        );
        self.render_flush_histogram(&mut out);

        let (used, capacity) = self.usage();
        let remaining = capacity - used;
        let rate = self.burn_rate();
        simple(&mut out, "tradeid_ids_capacity", "gauge", "IDs this node can ever issue.", capacity.to_string());
        simple(&mut out, "tradeid_ids_used", "gauge", "IDs consumed (issued or reserved).", used.to_string());
        simple(&mut out, "tradeid_ids_remaining", "gauge", "IDs left in this node's space.", remaining.to_string());
        simple(
            &mut out,
            "tradeid_burn_rate_ids_per_second",
            "gauge",
            "IDs consumed per second, smoothed.",
            format!("{rate:.3}"),
        );
        let eta = if rate > 0.0 { format!("{:.0}", remaining as f64 / rate) } else { "+Inf".into() };
        simple(
            &mut out,
            "tradeid_exhaustion_eta_seconds",
            "gauge",
            "Time to exhaustion at the current burn rate.",
            eta,
        );
        simple(
            &mut out,
            "tradeid_waste_per_restart_max",
            "gauge",
            "Upper bound of IDs skipped by one restart.",
            self.max_waste_per_restart.to_string(),
        );
        simple(
            &mut out,
            "tradeid_uptime_seconds",
            "gauge",
            "Seconds since start.",
            self.started.elapsed().as_secs().to_string(),
        );
        if let Some((rcvbuf, in_errors)) = kernel_udp_errors() {
            simple(
                &mut out,
                "tradeid_kernel_udp_rcvbuf_errors_total",
                "counter",
                "Host-wide UDP RcvbufErrors (/proc/net/snmp): datagrams dropped for a full socket buffer.",
                rcvbuf.to_string(),
            );
            simple(
                &mut out,
                "tradeid_kernel_udp_in_errors_total",
                "counter",
                "Host-wide UDP InErrors (/proc/net/snmp).",
                in_errors.to_string(),
            );
        }
        out
    }

    fn render_flush_histogram(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP tradeid_flush_seconds Time to flush a block's mark to disk.\n# TYPE tradeid_flush_seconds histogram");
        let guard = self.generator.stats().flush_micros.lock().unwrap_or_else(|p| p.into_inner());
        let Some(h) = guard.as_ref() else { return };
        for bound_us in [50u64, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 100_000, 1_000_000] {
            let count = h.count_between(0, bound_us);
            let _ = writeln!(out, "tradeid_flush_seconds_bucket{{le=\"{}\"}} {count}", bound_us as f64 / 1e6);
        }
        let _ = writeln!(out, "tradeid_flush_seconds_bucket{{le=\"+Inf\"}} {}", h.len());
        let _ = writeln!(out, "tradeid_flush_seconds_sum {:.6}", h.mean() * h.len() as f64 / 1e6);
        let _ = writeln!(out, "tradeid_flush_seconds_count {}", h.len());
    }
}

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
