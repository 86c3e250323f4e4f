//! Results: per-thread tallies merged into one summary, printed for people
//! and written as JSON for scripts.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// What one generator thread counted. Threads merge into one at the end.
pub(crate) struct Tally {
    /// Latency in microseconds, from intended send time to receipt.
    pub(crate) latency_us: Histogram<u64>,
    pub(crate) sent: u64,
    pub(crate) replies: u64,
    pub(crate) ids: u64,
    pub(crate) lost: u64,
    /// Replies that arrived with no request outstanding (late or duplicated).
    pub(crate) unmatched: u64,
    pub(crate) malformed: u64,
    pub(crate) errors: BTreeMap<u16, u64>,
    /// Sends that went out more than 1 ms after their intended time.
    pub(crate) late_sends: u64,
    /// ID values kept for `--check-unique`.
    pub(crate) id_values: Vec<u64>,
}

impl Tally {
    pub(crate) fn new() -> Tally {
        Tally {
            latency_us: new_histogram(),
            sent: 0,
            replies: 0,
            ids: 0,
            lost: 0,
            unmatched: 0,
            malformed: 0,
            errors: BTreeMap::new(),
            late_sends: 0,
            id_values: Vec::new(),
        }
    }

    /// Adds `other` into `self`.
    pub(crate) fn merge(&mut self, mut other: Tally) {
        self.latency_us.add(&other.latency_us).expect("histograms share bounds");
        self.sent += other.sent;
        self.replies += other.replies;
        self.ids += other.ids;
        self.lost += other.lost;
        self.unmatched += other.unmatched;
        self.malformed += other.malformed;
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
        self.late_sends += other.late_sends;
        self.id_values.append(&mut other.id_values);
    }
}

/// A latency histogram from 1 µs to 100 s with 3 significant digits.
pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid bounds")
}

/// The machine-readable summary (`--json`).
#[derive(Debug, Serialize)]
pub(crate) struct Summary {
    pub(crate) mode: String,
    pub(crate) target: String,
    pub(crate) seconds: f64,
    pub(crate) sent: u64,
    pub(crate) replies: u64,
    pub(crate) ids: u64,
    pub(crate) requests_per_second: f64,
    pub(crate) ids_per_second: f64,
    pub(crate) target_rate: Option<f64>,
    pub(crate) generator_fell_behind: bool,
    pub(crate) late_sends: u64,
    pub(crate) latency_us: Latency,
    pub(crate) lost: u64,
    pub(crate) unmatched: u64,
    pub(crate) malformed: u64,
    pub(crate) errors: BTreeMap<String, u64>,
    pub(crate) duplicates: Option<u64>,
    pub(crate) client_cpu_seconds: f64,
    pub(crate) client_cpu_us_per_reply: f64,
    pub(crate) server_cpu_seconds: Option<f64>,
    pub(crate) server_cpu_us_per_reply: Option<f64>,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Serialize)]
pub(crate) struct Latency {
    pub(crate) p50: u64,
    pub(crate) p90: u64,
    pub(crate) p99: u64,
    pub(crate) p999: u64,
    pub(crate) p9999: u64,
    pub(crate) max: u64,
    pub(crate) mean: f64,
}

impl Latency {
    pub(crate) fn of(h: &Histogram<u64>) -> Latency {
        Latency {
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            p9999: h.value_at_quantile(0.9999),
            max: h.max(),
            mean: h.mean(),
        }
    }
}

impl Summary {
    pub(crate) fn print(&self, to_stderr: bool) {
        let mut text = String::new();
        use std::fmt::Write as _;
        let _ = writeln!(text, "--- {} against {} for {:.2} s ---", self.mode, self.target, self.seconds);
        let _ = writeln!(
            text,
            "throughput  {:.0} requests/s, {:.0} IDs/s ({} replies, {} IDs)",
            self.requests_per_second, self.ids_per_second, self.replies, self.ids
        );
        if let Some(rate) = self.target_rate {
            let _ = writeln!(
                text,
                "rate        target {rate:.0}/s, achieved {:.0}/s{}",
                self.sent as f64 / self.seconds,
                if self.generator_fell_behind {
                    "  (GENERATOR FELL BEHIND: the client, not the server, limited this run)"
                } else {
                    ""
                }
            );
        }
        let l = &self.latency_us;
        let _ = writeln!(
            text,
            "latency us  p50 {}  p90 {}  p99 {}  p99.9 {}  p99.99 {}  max {}  mean {:.1}",
            l.p50, l.p90, l.p99, l.p999, l.p9999, l.max, l.mean
        );
        let _ = writeln!(
            text,
            "loss        {} lost, {} unmatched, {} malformed",
            self.lost, self.unmatched, self.malformed
        );
        if !self.errors.is_empty() {
            let _ = writeln!(text, "errors      {:?}", self.errors);
        }
        if let Some(d) = self.duplicates {
            let _ = writeln!(text, "duplicates  {d}");
        }
        let _ = writeln!(
            text,
            "client cpu  {:.2} s ({:.2} us/reply)",
            self.client_cpu_seconds, self.client_cpu_us_per_reply
        );
        if let (Some(s), Some(per)) = (self.server_cpu_seconds, self.server_cpu_us_per_reply) {
            let _ = writeln!(text, "server cpu  {s:.2} s ({per:.2} us/reply)");
        }
        if to_stderr {
            eprint!("{text}");
        } else {
            print!("{text}");
        }
    }
}

impl Summary {
    /// Prints the summary for people and writes it as JSON to `json` ("-":
    /// standard output, which then carries only the JSON; the summary goes
    /// to standard error).
    pub(crate) fn emit(&self, json: Option<&str>) -> anyhow::Result<()> {
        self.print(json == Some("-"));
        if let Some(path) = json {
            let text = serde_json::to_string_pretty(self)?;
            if path == "-" {
                println!("{text}");
            } else {
                std::fs::write(path, text + "\n").map_err(|e| anyhow::anyhow!("cannot write --json {path}: {e}"))?;
            }
        }
        Ok(())
    }
}

/// CPU time used since it was started: by this process, and by the server
/// process given (`--server-pid`), if any.
pub(crate) struct CpuMeter {
    server_pid: Option<String>,
    server_before: Option<Duration>,
    client_before: Duration,
}

impl CpuMeter {
    pub(crate) fn start(server_pid: Option<u32>) -> CpuMeter {
        let server_pid = server_pid.map(|p| p.to_string());
        let server_before = server_pid.as_deref().and_then(cpu_time);
        CpuMeter { server_pid, server_before, client_before: cpu_time("self").unwrap_or_default() }
    }

    /// Seconds of CPU since the start: (this process, the server).
    pub(crate) fn used(&self) -> (f64, Option<f64>) {
        let client = cpu_time("self").unwrap_or_default().saturating_sub(self.client_before).as_secs_f64();
        let server = self
            .server_before
            .and_then(|before| Some(cpu_time(self.server_pid.as_deref()?)?.saturating_sub(before).as_secs_f64()));
        (client, server)
    }
}

/// CPU time (user + system) of a process from /proc/PID/stat.
pub(crate) fn cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields overall.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / CLOCK_TICKS_PER_SECOND))
}

/// USER_HZ; 100 on every Linux platform we run on.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_adds_counts_and_histograms() {
        let mut a = Tally::new();
        a.latency_us.record(100).unwrap();
        a.replies = 1;
        a.errors.insert(503, 2);
        a.id_values = vec![1, 2];
        let mut b = Tally::new();
        b.latency_us.record(300).unwrap();
        b.latency_us.record(500).unwrap();
        b.replies = 2;
        b.errors.insert(503, 1);
        b.errors.insert(507, 4);
        b.id_values = vec![3];
        a.merge(b);
        assert_eq!(a.replies, 3);
        assert_eq!(a.latency_us.len(), 3);
        assert_eq!(a.latency_us.max(), 500);
        assert_eq!(a.latency_us.value_at_quantile(0.5), 300);
        assert_eq!(a.errors[&503], 3);
        assert_eq!(a.errors[&507], 4);
        assert_eq!(a.id_values, vec![1, 2, 3]);
    }

    #[test]
    fn reads_our_own_cpu_time() {
        let spin = std::time::Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(cpu_time("self").is_some());
    }
}
