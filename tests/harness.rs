//! Helpers shared by the integration tests: run the real binary, start a
//! daemon on port 0 and learn its address, talk UDP, and collect IDs.

#![allow(dead_code)] // each test module uses a different subset

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn tradeid() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tradeid"))
}

/// Runs the binary to completion.
pub fn run(args: &[&str]) -> Output {
    tradeid().args(args).output().expect("run tradeid")
}

/// `tradeid init --state DIR/NAME EXTRA...`, asserting success.
pub fn init_state(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let mut args = vec!["init", "--state", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = run(&args);
    assert!(out.status.success(), "init failed: {}", String::from_utf8_lossy(&out.stderr));
    path
}

/// A running `tradeid serve`, killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub stderr: Arc<Mutex<String>>,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    /// Starts `serve --state STATE --listen 127.0.0.1:0 EXTRA...` and waits
    /// for its "listening on" line.
    pub fn start(state: &Path, extra: &[&str]) -> Daemon {
        Daemon::start_with(state, extra, &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// As `start`, with extra environment, returning the failure text.
    pub fn start_with(state: &Path, extra: &[&str], env: &[(&str, &str)]) -> Result<Daemon, String> {
        let mut cmd = tradeid();
        cmd.args(["serve", "--state", state.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
        cmd.args(extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Daemon::spawn(cmd)
    }

    /// Runs `cmd` (a `tradeid serve`, possibly under a wrapper such as
    /// strace), collects its stderr, and waits for its "listening on" line.
    pub fn spawn(mut cmd: Command) -> Result<Daemon, String> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
        let mut child = cmd.spawn().map_err(|e| e.to_string())?;
        let stdout = child.stdout.take().unwrap();
        let stderr_pipe = child.stderr.take().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let stderr_reader = {
            let stderr = Arc::clone(&stderr);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
                    let mut s = stderr.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                }
            })
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut daemon =
            Daemon { child, addr: ([0, 0, 0, 0], 0).into(), admin: None, stderr, stderr_reader: Some(stderr_reader) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(a) = line.strip_prefix("admin listening on ") {
                        daemon.admin = Some(a.parse().unwrap());
                    }
                    if let Some(a) = line.strip_prefix("listening on ") {
                        daemon.addr = a.parse().unwrap();
                        return Ok(daemon);
                    }
                }
                Err(_) => {
                    daemon.kill9();
                    let status = daemon.child.try_wait().ok().flatten();
                    return Err(format!("daemon did not start (status {status:?}):\n{}", daemon.stderr_after_exit()));
                }
            }
        }
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (e.g. `STOP`, `CONT`) and returns at once.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([&format!("-{signal}"), &self.child.id().to_string()]).status().unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Sends `signal` and waits up to `limit` for the exit.
    pub fn signal_and_wait(&mut self, signal: &str, limit: Duration) -> Option<ExitStatus> {
        Command::new("kill").args([&format!("-{signal}"), &self.child.id().to_string()]).status().unwrap();
        wait_timeout(&mut self.child, limit)
    }

    /// Waits up to `limit` for the process to exit by itself.
    pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        wait_timeout(&mut self.child, limit)
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// All of stderr, once the process has exited (waits for the reader to
    /// reach end of file, so nothing is missed).
    pub fn stderr_after_exit(&mut self) -> String {
        assert!(self.child.try_wait().unwrap().is_some(), "the process is still running");
        if let Some(reader) = self.stderr_reader.take() {
            reader.join().unwrap();
        }
        self.stderr()
    }

    /// GET a path on the admin listener: (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin.expect("daemon started with --admin"), path)
    }

    /// The sum of the samples of `selector` in a fresh `/metrics` scrape
    /// (see [`metric_sum`]).
    pub fn metric(&self, selector: &str) -> f64 {
        metric_sum(&self.http_get("/metrics").1, selector)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A stopped process (SIGSTOP) dies of SIGKILL all the same.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// A minimal HTTP/1.1 GET: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"));
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// The sum of every sample in Prometheus text `metrics` whose series starts
/// with `selector`: a bare name sums all its label sets (`tradeid_drops_total`),
/// a name with labels picks one (`tradeid_drops_total{reason="short"}`).
/// Comment lines are skipped; a line that does not parse fails the test.
pub fn metric_sum(metrics: &str, selector: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(selector).is_some_and(|rest| rest.starts_with([' ', '{']) || selector.ends_with('}'))
        })
        .map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or_else(|| panic!("bad sample {l:?}")))
        .sum()
}

/// An 8-byte NEXT request for `count` IDs.
pub fn request(count: u16) -> Vec<u8> {
    let c = count.to_be_bytes();
    vec![0x49, 0x44, 0x01, 0x01, c[0], c[1], 0, 0]
}

/// Polls `check` every 100 ms until it holds or `limit` passes.
pub fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A loopback port, free for both UDP and TCP when returned, that no
/// `bind(":0")` and no outgoing connection anywhere on the machine can take
/// while the test is not holding it: it lies outside the kernel's ephemeral
/// range (`net.ipv4.ip_local_port_range`), where the kernel never hands out
/// ports by itself. Use it wherever a test stops something and starts it
/// again on the same port: a port from the ephemeral range can be taken in
/// between by any process, and a server then rightly refuses to share it.
/// Never the same port twice in this process. (On a host whose ephemeral
/// range leaves no room outside it, an ordinary free port.)
pub fn stable_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut bounds = range.split_whitespace().map(|v| v.parse::<u16>().ok());
    let (first, last) = match (bounds.next().flatten(), bounds.next().flatten()) {
        (Some(first), Some(last)) => (first, last),
        _ => (32768, 60999),
    };
    // Below the range if there is room for a few thousand ports, else above.
    let (low, high) = if first >= 1024 + 4000 {
        (first.saturating_sub(12_000).max(1024), first)
    } else if last <= 65535 - 4000 {
        (last + 1, last.saturating_add(12_000))
    } else {
        return std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    };
    let mut given = GIVEN.lock().unwrap();
    for _ in 0..1000 {
        let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
        let port = low + (random % u64::from(high - low)) as u16;
        if given.contains(&port) {
            continue;
        }
        let free =
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() && UdpSocket::bind(("127.0.0.1", port)).is_ok();
        if free {
            given.push(port);
            return port;
        }
    }
    panic!("no free port in {low}..{high} after 1000 tries");
}

/// A connected client socket with a receive timeout.
pub fn client_socket(server: SocketAddr, timeout: Duration) -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.connect(server).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    s
}

/// Sends one datagram and returns the reply, or `None` on timeout.
pub fn exchange(server: SocketAddr, datagram: &[u8], timeout: Duration) -> Option<Vec<u8>> {
    let s = client_socket(server, timeout);
    s.send(datagram).unwrap();
    let mut buf = vec![0u8; 65536];
    s.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
}

/// Splits a reply into IDs, asserting every one is well formed.
pub fn ids_of(reply: &[u8]) -> Vec<String> {
    assert_eq!(reply.len() % 7, 0, "reply {reply:?} is not whole IDs");
    reply
        .chunks(7)
        .map(|c| {
            let s = std::str::from_utf8(c).unwrap().to_string();
            assert!(tradeid::Id::from_wire(c).is_some(), "malformed ID {s:?}");
            s
        })
        .collect()
}

/// Inserts every ID, panicking on the first duplicate.
pub fn insert_unique(seen: &mut HashSet<String>, ids: impl IntoIterator<Item = String>) {
    for id in ids {
        assert!(seen.insert(id.clone()), "duplicate ID {id}");
    }
}

/// Number of iterations for a chaos loop: `default` in CI, or the value of
/// the env var `name` for long runs.
pub fn iterations(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A small deterministic PRNG for randomised tests (seed printed on failure
/// by the caller).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A seed from the clock, or `TRADEID_TEST_SEED`.
pub fn seed() -> u64 {
    std::env::var("TRADEID_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    })
}

/// Asks for `count` IDs, retrying (bounded) while the server answers
/// `!ERR503` (no block flushed yet); panics on any other error.
pub fn fetch(addr: SocketAddr, count: u16) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = exchange(addr, &request(count), Duration::from_secs(1)).expect("a reply");
        if reply != b"!ERR503" {
            return ids_of(&reply);
        }
        assert!(Instant::now() < deadline, "still !ERR503 after 10 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// What a load run collected: every ID received, error replies by text,
/// and when each reply arrived.
#[derive(Default, Debug)]
pub struct Collected {
    pub ids: Vec<String>,
    pub errors: std::collections::BTreeMap<String, usize>,
    /// Arrival of every reply, from whom: whether it carried IDs, or the
    /// error text.
    pub timeline: Vec<(Instant, SocketAddr, Result<(), String>)>,
    /// A thread stopped at its own limit, not at `stop`.
    ran_out: bool,
}

/// The longest any load of [`hammer_targets`] runs.
pub const HAMMER_LIMIT: Duration = Duration::from_secs(180);
/// The most IDs one load of [`hammer_targets`] collects (about 1 GB).
pub const HAMMER_MAX_IDS: usize = 20_000_000;
/// The shortest time in which one load may collect [`HAMMER_MAX_IDS`]: on
/// a fast machine the threads are paced down to that rate, so a load that
/// is stopped in time never trips the ID bound, however fast the server.
const HAMMER_PACE_OVER: Duration = Duration::from_secs(60);

/// Sends a mix of single and bulk requests from `clients` threads, each
/// with its own socket, round-robin over whatever addresses `targets` holds
/// at the time, until `stop` is set; returns everything received (late
/// replies included: they are real IDs too).
///
/// Bounded whatever the caller does: each thread also stops after
/// [`HAMMER_LIMIT`] or [`HAMMER_MAX_IDS`] IDs, and the call then fails
/// (paced so that the ID bound cannot be reached within a minute). A
/// test that panics before setting `stop` (inside a `thread::scope` that
/// waits for this) would otherwise load the machine, and fill its memory,
/// forever.
pub fn hammer_targets(
    targets: &Mutex<Vec<SocketAddr>>,
    clients: usize,
    stop: &std::sync::atomic::AtomicBool,
) -> Collected {
    use std::sync::atomic::Ordering;
    let results: Vec<Collected> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                s.spawn(move || {
                    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
                    socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                    let mut got = Collected::default();
                    let mut buf = vec![0u8; 2048];
                    let mut i = c;
                    let take = |n: usize, from: SocketAddr, buf: &[u8], got: &mut Collected| {
                        if buf[..n].starts_with(b"!ERR") {
                            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                            got.timeline.push((Instant::now(), from, Err(text.clone())));
                            *got.errors.entry(text).or_default() += 1;
                        } else {
                            got.timeline.push((Instant::now(), from, Ok(())));
                            got.ids.extend(ids_of(&buf[..n]));
                        }
                    };
                    let started = Instant::now();
                    while !stop.load(Ordering::Relaxed) {
                        let elapsed = started.elapsed();
                        if elapsed > HAMMER_LIMIT || got.ids.len() > HAMMER_MAX_IDS / clients {
                            got.ran_out = true;
                            break;
                        }
                        let allowed =
                            (HAMMER_MAX_IDS / clients) as f64 * elapsed.as_secs_f64() / HAMMER_PACE_OVER.as_secs_f64();
                        if got.ids.len() as f64 > allowed {
                            std::thread::sleep(Duration::from_millis(1));
                            continue;
                        }
                        let list = targets.lock().unwrap().clone();
                        if list.is_empty() {
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        let target = list[i % list.len()];
                        let count = [1u16, 175, 16, 1, 2][i % 5];
                        i += 1;
                        if socket.send_to(&request(count), target).is_err() {
                            std::thread::sleep(Duration::from_millis(2));
                            continue;
                        }
                        if let Ok((n, from)) = socket.recv_from(&mut buf) {
                            take(n, from, &buf, &mut got);
                        }
                    }
                    socket.set_read_timeout(Some(Duration::from_millis(30))).unwrap();
                    while let Ok((n, from)) = socket.recv_from(&mut buf) {
                        take(n, from, &buf, &mut got);
                    }
                    got
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        results.iter().all(|r| !r.ran_out),
        "the load ran past {HAMMER_LIMIT:?} or {HAMMER_MAX_IDS} IDs without being stopped"
    );
    let mut all = Collected::default();
    for r in results {
        all.ids.extend(r.ids);
        all.timeline.extend(r.timeline);
        for (k, v) in r.errors {
            *all.errors.entry(k).or_default() += v;
        }
    }
    all.timeline.sort_by_key(|(at, _, _)| *at);
    all
}
