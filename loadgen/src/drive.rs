//! The generator threads. Each owns its connected sockets (distinct source
//! ports, so SO_REUSEPORT spreads them over the server's workers), sends
//! with sendmmsg, receives with recvmmsg, and keeps its own tally; nothing
//! is shared on the hot path but a few progress counters.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tradeid_udp::{RecvBatch, SendBatch, Wait};

use crate::sockets::{connect_udp, send_copies, wait_readable};

use crate::matcher::{id_values, Expect, InFlight, Verdict};
use crate::report::{new_histogram, Tally};
use crate::schedule::Schedule;

/// What every thread does.
pub(crate) struct Plan {
    pub(crate) target: SocketAddr,
    pub(crate) request: Vec<u8>,
    pub(crate) expect: Expect,
    pub(crate) sockets_per_thread: Vec<usize>,
    pub(crate) window: usize,
    /// Open loop: sends per second for the whole run.
    pub(crate) rate: Option<f64>,
    pub(crate) poisson: bool,
    pub(crate) seed: u64,
    pub(crate) timeout: Duration,
    pub(crate) duration: Duration,
    pub(crate) max_requests_per_thread: u64,
    pub(crate) check_unique: bool,
    pub(crate) cpus: Vec<usize>,
}

/// Live counters for the progress line.
#[derive(Default)]
pub(crate) struct Live {
    pub(crate) replies: AtomicU64,
    pub(crate) ids: AtomicU64,
    pub(crate) lost: AtomicU64,
}

/// Runs thread `index` of the plan from `start` until its end; sends its
/// latency histogram for the last interval on `progress` once a second.
pub(crate) fn run_thread(
    plan: Arc<Plan>,
    index: usize,
    start: Instant,
    live: Arc<Live>,
    progress: Sender<Histogram<u64>>,
) -> io::Result<Tally> {
    if let Some(&cpu) = plan.cpus.get(index % plan.cpus.len().max(1)) {
        core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
    }
    let sockets: Vec<UdpSocket> = (0..plan.sockets_per_thread[index])
        .map(|_| {
            let s = connect_udp(plan.target)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect::<io::Result<_>>()?;
    let threads = plan.sockets_per_thread.len() as f64;
    let mut schedule = plan.rate.map(|rate| {
        let per_thread = rate / threads;
        // Interleave the threads' schedules evenly.
        Schedule::new(per_thread, plan.poisson, plan.seed ^ index as u64, index as f64 * 1e9 / rate)
    });
    let mut inflight: Vec<InFlight> = sockets.iter().map(|_| InFlight::default()).collect();
    // Open loop: requests due but not yet accepted by their socket.
    let mut backlog: Vec<VecDeque<u64>> = sockets.iter().map(|_| VecDeque::new()).collect();
    let mut rx = RecvBatch::new();
    let mut tx = SendBatch::new(plan.request.len());
    let mut tally = Tally::new();
    let mut interval = new_histogram();
    let end = plan.duration.as_nanos() as u64;
    let timeout = plan.timeout.as_nanos() as u64;
    let mut next_progress = 1_000_000_000u64;
    let mut rr = 0usize;
    let mut draining = false;
    loop {
        let now = nanos(start);
        // Past the end (or the request budget), stop sending but keep
        // receiving for up to one timeout, so replies in flight are counted
        // rather than reported as lost.
        if now >= end || tally.sent >= plan.max_requests_per_thread {
            draining = true;
        }
        if now >= end + timeout {
            break;
        }
        if !draining {
            match schedule.as_mut() {
                None => {
                    // Closed loop: keep `window` requests outstanding per socket.
                    for (s, socket) in sockets.iter().enumerate() {
                        let want = (plan.window - inflight[s].len().min(plan.window))
                            .min((plan.max_requests_per_thread - tally.sent) as usize);
                        if want > 0 {
                            let k = send_copies(&mut tx, socket, &plan.request, want)?;
                            for _ in 0..k {
                                inflight[s].push(now);
                            }
                            tally.sent += k as u64;
                        }
                    }
                }
                Some(schedule) => {
                    // Open loop: everything now due joins its socket's
                    // backlog (round-robin), stamped with its *intended*
                    // time; each backlog then goes out in one sendmmsg.
                    // What the socket does not take stays queued, still
                    // timed from its intended time.
                    while schedule.peek() <= now && tally.sent + queued(&backlog) < plan.max_requests_per_thread {
                        let intended = schedule.take();
                        backlog[rr % sockets.len()].push_back(intended);
                        rr += 1;
                    }
                    for (s, socket) in sockets.iter().enumerate() {
                        if backlog[s].is_empty() {
                            continue;
                        }
                        let k = send_copies(&mut tx, socket, &plan.request, backlog[s].len())?;
                        for intended in backlog[s].drain(..k) {
                            if now - intended > LATE {
                                tally.late_sends += 1;
                            }
                            inflight[s].push(intended);
                        }
                        tally.sent += k as u64;
                    }
                }
            }
        }
        let mut received = 0;
        for (s, socket) in sockets.iter().enumerate() {
            loop {
                let n = rx.recv(socket, Wait::No)?;
                if n == 0 {
                    break;
                }
                let at = nanos(start);
                received += n;
                for i in 0..n {
                    account(&plan, &mut tally, &mut interval, &mut inflight[s], rx.payload(i), at);
                }
            }
        }
        let now = nanos(start);
        let mut lost = 0;
        for f in inflight.iter_mut() {
            lost += f.expire(now.saturating_sub(timeout));
        }
        tally.lost += lost as u64;
        live.lost.fetch_add(lost as u64, Ordering::Relaxed);
        live.replies.store(tally.replies, Ordering::Relaxed);
        live.ids.store(tally.ids, Ordering::Relaxed);
        if now >= next_progress {
            let _ = progress.send(std::mem::replace(&mut interval, new_histogram()));
            next_progress += 1_000_000_000;
        }
        if draining && inflight.iter().all(|f| f.len() == 0) {
            break;
        }
        if received == 0 {
            // Nothing arrived: block briefly instead of spinning, but wake
            // for the next scheduled send.
            let wait = match &schedule {
                Some(s) if !draining => Duration::from_nanos(s.peek().saturating_sub(now)).min(POLL_WAIT),
                _ => POLL_WAIT,
            };
            if !wait.is_zero() {
                wait_readable(&sockets, wait)?;
            }
        }
    }
    // Whatever is still outstanding after the drain is lost.
    let outstanding: usize = inflight.iter().map(InFlight::len).sum();
    tally.lost += outstanding as u64;
    Ok(tally)
}

fn account(
    plan: &Plan,
    tally: &mut Tally,
    interval: &mut Histogram<u64>,
    inflight: &mut InFlight,
    reply: &[u8],
    at: u64,
) {
    match inflight.pop() {
        Some(sent) => {
            let micros = (at.saturating_sub(sent) / 1000).max(1);
            tally.latency_us.saturating_record(micros);
            interval.saturating_record(micros);
        }
        None => tally.unmatched += 1,
    }
    match plan.expect.judge(reply) {
        Verdict::Good(ids) => {
            tally.replies += 1;
            tally.ids += ids as u64;
            if plan.check_unique {
                tally.id_values.extend(id_values(reply));
            }
        }
        Verdict::Error(code) => *tally.errors.entry(code.number()).or_default() += 1,
        Verdict::Malformed => tally.malformed += 1,
    }
}

fn queued(backlog: &[VecDeque<u64>]) -> u64 {
    backlog.iter().map(|b| b.len() as u64).sum()
}

fn nanos(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

/// A send this far behind its intended time counts as late.
const LATE: u64 = 1_000_000;
/// Longest idle wait between checks.
const POLL_WAIT: Duration = Duration::from_millis(1);

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            target: "127.0.0.1:9".parse().unwrap(),
            request: Vec::new(),
            expect: Expect::Tradeid,
            sockets_per_thread: vec![1],
            window: 1,
            rate: Some(1000.0),
            poisson: false,
            seed: 1,
            timeout: Duration::from_secs(1),
            duration: Duration::from_secs(1),
            max_requests_per_thread: 10,
            check_unique: true,
            cpus: Vec::new(),
        }
    }

    #[test]
    fn latency_is_measured_from_the_intended_send_time() {
        let plan = plan();
        let (mut tally, mut interval, mut inflight) = (Tally::new(), new_histogram(), InFlight::default());
        // Intended at 1 ms (the open loop pushes the intended time, even if
        // the send itself went out late); the reply arrives at 5 ms.
        inflight.push(1_000_000);
        account(&plan, &mut tally, &mut interval, &mut inflight, b"B762F00", 5_000_000);
        let latency = tally.latency_us.value_at_quantile(1.0);
        assert!((3990..=4010).contains(&latency), "{latency} us, want 4000");
        assert_eq!(interval.len(), 1);
        assert_eq!((tally.replies, tally.ids), (1, 1));
        assert_eq!(tally.id_values, vec![tradeid::Id::parse("B762F00").unwrap().value()]);
        // A reply with nothing outstanding is counted, not timed.
        account(&plan, &mut tally, &mut interval, &mut inflight, b"!ERR503", 6_000_000);
        assert_eq!(tally.unmatched, 1);
        assert_eq!(tally.latency_us.len(), 1);
        assert_eq!(tally.errors[&503], 1);
    }
}
