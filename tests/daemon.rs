//! Running as a daemon: sd_notify readiness, status and watchdog, metrics,
//! the HTTP interface, journald log format, capacity warnings.

use std::collections::HashSet;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::harness::*;

/// A NOTIFY_SOCKET the test owns.
struct NotifySocket {
    socket: UnixDatagram,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        NotifySocket { socket, path, _dir: dir }
    }

    /// The next message, or `None` after `timeout`.
    fn recv(&self, timeout: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Messages that arrive within `window`.
    fn collect(&self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut messages = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.recv(left.max(Duration::from_millis(1))) {
                Some(m) => messages.push(m),
                None => break,
            }
        }
        messages
    }
}

#[test]
fn ready_is_sent_only_once_the_server_answers() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let notify = NotifySocket::new();
    // A slow disk: every flush takes 400 ms, so the first blocks (one per
    // worker) are not ready until well after the process starts.
    let started = Instant::now();
    // Returns at the "listening on" line, printed just before READY.
    let mut daemon = Daemon::start_with(
        &state,
        &["--workers", "2"],
        &[("NOTIFY_SOCKET", notify.path.to_str().unwrap()), ("TRADEID_TEST_FLUSH_DELAY_MS", "400")],
    )
    .unwrap();
    let ready = notify.recv(Duration::from_secs(20)).expect("a notification");
    let waited = started.elapsed();
    assert!(ready.starts_with("READY=1\nSTATUS="), "{ready:?}");
    assert!(waited >= Duration::from_millis(800), "READY after {waited:?}, before both first blocks were flushed");
    // The server must answer at once.
    let reply = exchange(daemon.addr, &request(1), Duration::from_millis(200)).expect("answers right after READY");
    ids_of(&reply);
    let status = daemon.signal_and_wait("TERM", Duration::from_secs(5)).expect("exits");
    let messages = notify.collect(Duration::from_secs(3));
    assert!(messages.iter().any(|m| m == "STOPPING=1"), "{messages:?}");
    assert!(status.success());
}

#[test]
fn watchdog_pings_stop_while_a_worker_is_stalled() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let stall = dir.path().join("stall");
    let notify = NotifySocket::new();
    let daemon = Daemon::start_with(
        &state,
        &["--workers", "2"],
        &[
            ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
            ("TRADEID_TEST_STALL_FILE", stall.to_str().unwrap()),
        ],
    )
    .unwrap();
    let pings = |window| notify.collect(window).iter().filter(|m| *m == "WATCHDOG=1").count();
    // Healthy: a ping every 200 ms, and no warning.
    let healthy = pings(Duration::from_millis(1500));
    assert!(healthy >= 4, "{healthy} pings in 1.5 s");
    assert!(!daemon.stderr().contains(WITHHELD), "warned while healthy:\n{}", daemon.stderr());
    // Worker 0 stalls: after a grace tick, no more pings.
    std::fs::write(&stall, "").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    notify.collect(Duration::from_millis(10));
    let stalled = pings(Duration::from_millis(1500));
    assert_eq!(stalled, 0, "pinged while a worker was stuck");
    assert!(daemon.stderr().contains(WITHHELD), "no warning for the stall:\n{}", daemon.stderr());
    // Unstalled: pings resume.
    std::fs::remove_file(&stall).unwrap();
    let resumed = pings(Duration::from_millis(1500));
    assert!(resumed >= 3, "{resumed} pings after recovery");
}

/// The warning logged when a watchdog ping is withheld.
const WITHHELD: &str = "withholding the watchdog ping";

/// A healthy start under a watchdog pings from the first period on and
/// never warns: the first tick of the ping timer comes one period after
/// the start, once the workers' heartbeats had time to move.
#[test]
fn a_healthy_start_never_warns_about_the_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let notify = NotifySocket::new();
    let mut daemon = Daemon::start_with(
        &state,
        &["--workers", "2"],
        &[("NOTIFY_SOCKET", notify.path.to_str().unwrap()), ("WATCHDOG_USEC", "400000")],
    )
    .unwrap();
    let messages = notify.collect(Duration::from_millis(1200));
    let pings = messages.iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(pings >= 3, "{pings} pings in 1.2 s: {messages:?}");
    daemon.signal_and_wait("TERM", Duration::from_secs(5)).expect("exits");
    let log = daemon.stderr_after_exit();
    assert!(!log.contains(WITHHELD), "a healthy start warned:\n{log}");
}

#[test]
fn an_idle_server_keeps_a_short_watchdog_fed() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let notify = NotifySocket::new();
    // 100 ms: pings every 50 ms, while no traffic wakes the workers.
    let _daemon = Daemon::start_with(
        &state,
        &["--workers", "2"],
        &[("NOTIFY_SOCKET", notify.path.to_str().unwrap()), ("WATCHDOG_USEC", "100000")],
    )
    .unwrap();
    let messages = notify.collect(Duration::from_millis(1500));
    let pings = messages.iter().filter(|m| *m == "WATCHDOG=1").count();
    // 30 expected; leave room for a loaded machine, but a healthy idle
    // worker must never look stuck for long.
    assert!(pings >= 15, "{pings} pings in 1.5 s: {messages:?}");
}

#[test]
fn a_second_signal_exits_at_once_when_shutdown_is_stuck() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let stall = dir.path().join("stall");
    let mut daemon = Daemon::start_with(
        &state,
        &["--workers", "2", "--admin", "127.0.0.1:0"],
        &[("TRADEID_TEST_STALL_FILE", stall.to_str().unwrap())],
    )
    .unwrap();
    assert_eq!(daemon.http_get("/readyz"), (200, "ready: serving\n".into()));
    // Wedge worker 0 (the control plane polls the file every second).
    std::fs::write(&stall, "").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // The first SIGTERM cannot finish: the wedged worker never stops.
    assert!(daemon.signal_and_wait("TERM", Duration::from_millis(800)).is_none(), "exited with a wedged worker");
    // While it is stopping, it is alive but no longer ready.
    assert_eq!(daemon.http_get("/readyz"), (503, "not ready: stopping\n".into()));
    assert_eq!(daemon.http_get("/healthz").0, 200);
    // The second one exits at once.
    let started = Instant::now();
    let status = daemon.signal_and_wait("TERM", Duration::from_secs(2)).expect("exits on the second signal");
    assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
    assert_eq!(status.code(), Some(1));
    let stderr = daemon.stderr_after_exit();
    assert!(stderr.contains("second signal, exiting at once"), "{stderr}");
}

#[test]
fn metrics_move_as_the_server_serves() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let daemon = Daemon::start(&state, &["--workers", "2", "--admin", "127.0.0.1:0"]);
    let (status, before) = daemon.http_get("/metrics");
    assert_eq!(status, 200);
    for name in [
        "tradeid_datagrams_total{worker=\"1\"}",
        "tradeid_requests_total{protocol=\"udp\"}",
        "tradeid_ids_served_total",
        "tradeid_drops_total{reason=\"not_allowed\"}",
        "tradeid_errors_total{protocol=\"udp\",code=\"507\"}",
        "tradeid_request_batch_size_bucket{le=\"175\"}",
        "tradeid_blocks_reserved_total",
        "tradeid_block_size",
        "tradeid_flush_seconds_bucket{le=\"+Inf\"}",
        "tradeid_ids_remaining",
        "tradeid_burn_rate_ids_per_second",
        "tradeid_exhaustion_eta_seconds",
        "tradeid_kernel_udp_rcvbuf_errors_total",
    ] {
        assert!(before.contains(name), "missing {name}");
    }
    for _ in 0..10 {
        ids_of(&exchange(daemon.addr, &request(10), Duration::from_secs(1)).unwrap());
    }
    assert_eq!(exchange(daemon.addr, &request(500), Duration::from_secs(1)).unwrap(), b"!ERR413");
    let (_, after) = daemon.http_get("/metrics");
    assert_eq!(metric_sum(&after, "tradeid_ids_served_total") - metric_sum(&before, "tradeid_ids_served_total"), 100.0);
    assert_eq!(metric_sum(&after, "tradeid_requests_total") - metric_sum(&before, "tradeid_requests_total"), 10.0);
    assert_eq!(metric_sum(&after, "tradeid_errors_total{protocol=\"udp\",code=\"413\"}"), 1.0);
    assert_eq!(
        metric_sum(&after, "tradeid_request_batch_size_bucket{le=\"16\"}")
            - metric_sum(&before, "tradeid_request_batch_size_bucket{le=\"16\"}"),
        10.0
    );
    assert!(metric_sum(&after, "tradeid_blocks_reserved_total") >= 2.0);
    assert!(metric_sum(&after, "tradeid_ids_remaining") < (1u64 << 35) as f64);
}

#[test]
fn http_hands_out_unique_ids_and_rejects_bad_queries() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let daemon = Daemon::start(&state, &["--workers", "1", "--admin", "127.0.0.1:0", "--max-batch", "50"]);
    let mut seen = HashSet::new();
    for _ in 0..20 {
        let (status, body) = daemon.http_get("/id");
        assert_eq!(status, 200);
        insert_unique(&mut seen, ids_of(body.trim().as_bytes()));
    }
    let (status, body) = daemon.http_get("/ids?count=50");
    assert_eq!(status, 200);
    let lines: Vec<String> = body.lines().map(String::from).collect();
    assert_eq!(lines.len(), 50);
    for id in &lines {
        ids_of(id.as_bytes());
    }
    insert_unique(&mut seen, lines);
    // UDP and HTTP never overlap either.
    insert_unique(&mut seen, ids_of(&exchange(daemon.addr, &request(50), Duration::from_secs(1)).unwrap()));

    for (query, needle) in [
        ("/ids?count=51", "count must be 1..=50"),
        ("/ids?count=0", "count must be 1..=50"),
        ("/ids?count=abc", "whole number"),
        ("/ids", "missing count"),
        ("/ids?size=3", "unknown query parameter"),
        ("/id?count=3", "takes no query string"),
    ] {
        let (status, body) = daemon.http_get(query);
        assert_eq!(status, 400, "{query}");
        assert!(body.contains(needle), "{query}: {body}");
    }
}

#[test]
fn openapi_describes_exactly_the_routes() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let daemon = Daemon::start(&state, &["--workers", "1", "--admin", "127.0.0.1:0"]);
    let (status, body) = daemon.http_get("/openapi.json");
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    for path in paths.keys() {
        let url = if path == "/ids" { "/ids?count=1".to_string() } else { path.clone() };
        let (status, _) = daemon.http_get(&url);
        assert_eq!(status, 200, "{path} is documented but answers {status}");
    }
    for undocumented in ["/", "/admin", "/metrics/", "/id/1"] {
        assert_eq!(daemon.http_get(undocumented).0, 404, "{undocumented}");
    }
    assert_eq!(daemon.http_get("/healthz"), (200, "ok\n".into()));
    assert_eq!(daemon.http_get("/readyz"), (200, "ready: serving\n".into()));
}

#[test]
fn logs_are_journald_friendly_under_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let mut daemon = Daemon::start_with(&state, &["--workers", "1"], &[("JOURNAL_STREAM", "8:1234")]).unwrap();
    daemon.signal_and_wait("TERM", Duration::from_secs(5)).unwrap();
    let log = daemon.stderr_after_exit();
    let first = log.lines().next().unwrap();
    assert!(first.starts_with("<6>state opened"), "{first}");
    assert!(first.contains("remaining=") && first.contains("shards=8192"), "{first}");
    assert!(!log.contains("\u{1b}["), "no colour codes");
}

#[test]
fn capacity_warnings_fire_as_the_space_fills() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &["--width", "12", "--shard-bits", "6"]);
    let daemon = Daemon::start(&state, &["--workers", "1", "--block-max", "64", "--max-batch", "16"]);
    let mut got = 0;
    while got < 3500 {
        match exchange(daemon.addr, &request(16), Duration::from_secs(1)).unwrap().as_slice() {
            b"!ERR503" => std::thread::sleep(Duration::from_millis(1)),
            reply => got += ids_of(reply).len(),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !daemon.stderr().contains("ID space 80% used") {
        assert!(Instant::now() < deadline, "{}", daemon.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(daemon.stderr().contains("ID space 50% used"));
}

/// Idle admin connections, silent or stopped in the middle of their
/// headers, never lock out health checks or scrapes: with 500 of them open
/// (twice the listener's limit), `/healthz` and `/metrics` still answer
/// within a second. The daemon runs with the unit's `LimitNOFILE=1024`
/// when `prlimit` is there to impose it.
#[test]
fn idle_admin_connections_never_lock_out_health_checks() {
    use std::io::Write;
    use std::net::TcpStream;
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let mut cmd = if std::process::Command::new("prlimit").arg("--version").output().is_ok() {
        let mut cmd = std::process::Command::new("prlimit");
        cmd.args(["--nofile=1024:1024", "--", env!("CARGO_BIN_EXE_tradeid")]);
        cmd
    } else {
        tradeid()
    };
    cmd.args(["serve", "--state", state.to_str().unwrap(), "--listen", "127.0.0.1:0", "--workers", "1"]);
    cmd.args(["--admin", "127.0.0.1:0"]);
    let daemon = Daemon::spawn(cmd).unwrap();
    let admin = daemon.admin.unwrap();
    let mut idle = Vec::new();
    for i in 0..500 {
        let mut stream = TcpStream::connect(admin).unwrap();
        if i % 2 == 1 {
            // Headers begun and never finished (a slowloris).
            stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n").unwrap();
        }
        idle.push(stream);
    }
    for round in 0..2 {
        for path in ["/healthz", "/metrics"] {
            let (status, body) = http_get_within(admin, path, Duration::from_secs(1))
                .unwrap_or_else(|e| panic!("{path} with 500 idle connections open (round {round}): {e}"));
            assert_eq!(status, 200, "{path}: {body}");
            assert!(body.contains(if path == "/healthz" { "ok" } else { "tradeid_ids_served_total" }), "{body}");
        }
    }
    drop(idle);
}

/// GET `path` with the connection, the request and the whole response
/// bounded by `limit`: (status, body), or what went wrong.
fn http_get_within(addr: std::net::SocketAddr, path: &str, limit: Duration) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let deadline = Instant::now() + limit;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, limit).map_err(|e| format!("connect: {e}"))?;
    stream.set_write_timeout(Some(limit)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut response = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no complete answer within {limit:?}"));
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("no complete answer within {limit:?}: {e}")),
        }
    }
    let response = String::from_utf8_lossy(&response).into_owned();
    let status =
        response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or(format!("bad answer {response:?}"))?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// HTTP IDs come from a blocking generator handle. While that handle's
/// first flush is stuck on the disk, the control runtime goes on: `/metrics`
/// and `/healthz` answer within a second, the watchdog keeps deciding on
/// time (it withholds its pings and says a flush is stuck, so systemd
/// restarts a server whose disk hangs), and once the disk answers the
/// request gets its ID and the pings resume.
#[test]
fn a_stuck_flush_behind_http_never_blocks_metrics_health_or_the_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let stuck = dir.path().join("stuck");
    let notify = NotifySocket::new();
    let daemon = Daemon::start_with(
        &state,
        &["--workers", "1", "--admin", "127.0.0.1:0"],
        &[
            ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
            ("TRADEID_TEST_STUCK_FLUSH_FILE", stuck.to_str().unwrap()),
        ],
    )
    .unwrap();
    let admin = daemon.admin.unwrap();
    std::fs::write(&stuck, "").unwrap();
    let pending = std::thread::spawn(move || http_get_within(admin, "/id", Duration::from_secs(60)));
    // Long enough for the flush to count as stuck (half the watchdog).
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!pending.is_finished(), "/id answered although its flush is stuck");
    notify.collect(Duration::from_millis(10));
    for round in 0..3 {
        for path in ["/healthz", "/metrics"] {
            let (status, body) = http_get_within(admin, path, Duration::from_secs(1))
                .unwrap_or_else(|e| panic!("{path} while a flush is stuck (round {round}): {e}"));
            assert_eq!(status, 200, "{path}: {body}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let in_flight = daemon.metric("tradeid_flush_in_progress_seconds");
    assert!(in_flight >= 1.0, "the stuck flush shows as {in_flight} s in progress");
    let pings = notify.collect(Duration::from_millis(1200)).iter().filter(|m| *m == "WATCHDOG=1").count();
    assert_eq!(pings, 0, "pinged the watchdog while a flush was stuck");
    let log = daemon.stderr();
    assert!(log.lines().any(|l| l.contains(WITHHELD) && l.contains("flush_stuck=true")), "{log}");
    // The disk answers: the request gets its ID, and the pings come back.
    std::fs::remove_file(&stuck).unwrap();
    let (status, body) = pending.join().unwrap().expect("/id answers once the flush completes");
    assert_eq!(status, 200, "{body}");
    assert_eq!(ids_of(body.trim_end().as_bytes()).len(), 1, "{body:?}");
    let pings = notify.collect(Duration::from_millis(1500)).iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(pings >= 2, "{pings} pings after the disk recovered");
}

/// The reserved and served counts of the state file, from `inspect`.
fn inspect_counts(state: &std::path::Path) -> (u64, u64) {
    let out = run(&["inspect", "--state", state.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let number = |label: &str| -> u64 {
        let line = text.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("no {label:?} in {text}"));
        let word = line[label.len()..].split_whitespace().find(|w| w.parse::<u64>().is_ok()).unwrap();
        word.parse().unwrap()
    };
    (number("reserved "), number("served "))
}

/// `inspect` tells the IDs handed out (over UDP and HTTP) from the IDs
/// reserved: while serving it never claims more than were handed out; after
/// a clean stop it counts them exactly; after a kill -9 it counts at least
/// those of the blocks used up, and never loses what an earlier run served.
#[test]
fn inspect_counts_the_ids_served_apart_from_those_reserved() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    assert_eq!(inspect_counts(&state), (0, 0));
    let mut seen = HashSet::new();
    let mut daemon = Daemon::start(&state, &["--workers", "2", "--admin", "127.0.0.1:0"]);
    for _ in 0..200 {
        insert_unique(&mut seen, fetch(daemon.addr, 175));
    }
    for _ in 0..10 {
        let (status, body) = daemon.http_get("/ids?count=100");
        assert_eq!(status, 200, "{body}");
        insert_unique(&mut seen, body.lines().map(String::from));
    }
    let handed_out = seen.len() as u64;
    assert_eq!(handed_out, 36_000);
    let (reserved, served) = inspect_counts(&state);
    assert!(served <= handed_out && reserved > handed_out, "while serving: {reserved} reserved, {served} served");
    daemon.signal_and_wait("TERM", Duration::from_secs(10)).expect("exits");
    let (reserved, served) = inspect_counts(&state);
    assert_eq!(served, handed_out, "after a clean stop ({reserved} reserved)");
    assert!(reserved > served, "the held blocks count as reserved");

    // Killed: the count is a lower bound, and the earlier run's stays.
    let mut daemon = Daemon::start(&state, &["--workers", "2", "--admin", "127.0.0.1:0"]);
    for _ in 0..400 {
        insert_unique(&mut seen, fetch(daemon.addr, 175));
    }
    daemon.kill9();
    let (after_kill, served_kill) = inspect_counts(&state);
    assert!((handed_out..=seen.len() as u64).contains(&served_kill), "{served_kill} after a kill -9");
    assert!(after_kill > reserved);
    let daemon = Daemon::start(&state, &["--workers", "2"]);
    drop(daemon); // a kill -9 once more, serving nothing
    assert!(inspect_counts(&state).1 >= served_kill, "an idle start lost the count");
}

/// The burn rate counts IDs served, not blocks reserved: right after a
/// start or restart, an idle server has reserved its first blocks but
/// burns nothing, so its exhaustion ETA is +Inf (no false alert); serving
/// moves both.
#[test]
fn an_idle_restart_burns_nothing_and_projects_no_exhaustion() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    for start in 0..2 {
        let mut daemon = Daemon::start(&state, &["--workers", "2", "--admin", "127.0.0.1:0"]);
        // Past the first sample of the rate (one every 5 s).
        std::thread::sleep(Duration::from_millis(6000));
        assert!(daemon.metric("tradeid_ids_reserved_total") > 0.0, "start {start}: no block reserved");
        assert_eq!(daemon.metric("tradeid_burn_rate_ids_per_second"), 0.0, "start {start}: idle, yet burning");
        let eta = daemon.metric("tradeid_exhaustion_eta_seconds");
        assert!(eta.is_infinite(), "start {start}: idle, yet exhausting in {eta} s");
        let mut seen = HashSet::new();
        for _ in 0..200 {
            insert_unique(&mut seen, fetch(daemon.addr, 175));
        }
        std::thread::sleep(Duration::from_millis(5500));
        let rate = daemon.metric("tradeid_burn_rate_ids_per_second");
        assert!(rate > 0.0, "start {start}: served {} IDs, burn rate {rate}", seen.len());
        assert!(daemon.metric("tradeid_exhaustion_eta_seconds").is_finite());
        daemon.signal_and_wait("TERM", Duration::from_secs(5)).expect("exits");
    }
}
